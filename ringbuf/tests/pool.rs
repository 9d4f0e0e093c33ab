//! Behaviour of `ferry_ringbuf::pool` through its public API.
#![cfg(not(loom))]

use std::collections::HashSet;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use ferry_ringbuf::pool::{
    BufferPool, PoolAlloc, PoolError, PoolReturn, Slot, MAX_SLOT_COUNT, MAX_SLOT_SIZE, SLOT_ALIGN,
};

/// Slots in the pools of these tests; small under Miri, which checks every byte.
const SLOTS: usize = if cfg!(miri) { 4 } else { 64 };
/// Round trips through the cross-thread test.
const ROUND_TRIPS: usize = if cfg!(miri) { 20 } else { 100_000 };

fn pool(slot_size: usize, slot_count: usize) -> (PoolAlloc, PoolReturn) {
    BufferPool::new(slot_size, slot_count).expect("valid pool geometry")
}

#[test]
fn rejects_bad_slot_sizes() {
    for slot_size in [
        0,
        1,
        SLOT_ALIGN - 1,
        SLOT_ALIGN + 1,
        3 * SLOT_ALIGN / 2,
        MAX_SLOT_SIZE + SLOT_ALIGN,
    ] {
        assert_eq!(
            BufferPool::new(slot_size, 1).unwrap_err(),
            PoolError::SlotSize { slot_size },
            "slot_size {slot_size}"
        );
    }
}

#[test]
fn rejects_bad_slot_counts() {
    for slot_count in [0, MAX_SLOT_COUNT + 1] {
        assert_eq!(
            BufferPool::new(SLOT_ALIGN, slot_count).unwrap_err(),
            PoolError::SlotCount { slot_count },
        );
    }
}

#[test]
fn errors_name_the_limits() {
    let message = BufferPool::new(100, 1).unwrap_err().to_string();
    assert!(
        message.contains("100") && message.contains("4096"),
        "{message}"
    );
    let message = BufferPool::new(SLOT_ALIGN, 0).unwrap_err().to_string();
    assert!(message.contains(&MAX_SLOT_COUNT.to_string()), "{message}");
}

#[test]
fn slots_are_aligned_distinct_zeroed_and_inside_the_region() {
    let slot_size = 2 * SLOT_ALIGN;
    let (mut alloc, _release) = pool(slot_size, SLOTS);
    assert_eq!(alloc.slot_size(), slot_size);
    assert_eq!(alloc.slot_count(), SLOTS);
    let region = alloc.region();
    assert_eq!(region.base_ptr as usize % SLOT_ALIGN, 0);
    assert_eq!(region.size_bytes(), slot_size * SLOTS);

    let mut slots = Vec::new();
    while let Some(slot) = alloc.alloc() {
        slots.push(slot);
    }
    assert_eq!(slots.len(), SLOTS, "every slot can be allocated, no more");

    let indices: HashSet<u32> = slots.iter().map(Slot::index).collect();
    assert_eq!(
        indices,
        (0..SLOTS as u32).collect(),
        "each index exactly once"
    );
    for slot in &slots {
        assert_eq!(slot.capacity(), slot_size);
        assert_eq!(slot.as_ptr() as usize % SLOT_ALIGN, 0);
        assert_eq!(slot.as_ptr(), region.slot_ptr(slot.index()).cast_const());
        assert!(
            slot.as_slice().iter().all(|&byte| byte == 0),
            "zero-initialised"
        );
    }
}

#[test]
fn writes_to_one_slot_stay_in_it() {
    let (mut alloc, _release) = pool(SLOT_ALIGN, SLOTS);
    let mut slots: Vec<Slot> = std::iter::from_fn(|| alloc.alloc()).collect();
    for slot in &mut slots {
        let fill = slot.index() as u8 + 1;
        slot.as_mut_slice().fill(fill);
    }
    for slot in &slots {
        let fill = slot.index() as u8 + 1;
        assert!(
            slot.as_slice().iter().all(|&byte| byte == fill),
            "slot {}",
            slot.index()
        );
    }
    // The raw pointer sees the same bytes.
    let mut first = slots.swap_remove(0);
    // SAFETY: `first` owns its `capacity()` bytes and no slice of them is alive.
    unsafe { first.as_mut_ptr().write(0xAB) };
    assert_eq!(first.as_slice()[0], 0xAB);
}

#[test]
fn exhaustion_then_release_makes_a_slot_available_again() {
    let (mut alloc, mut release) = pool(SLOT_ALIGN, 2);
    let first = alloc.alloc().unwrap();
    let second = alloc.alloc().unwrap();
    assert!(alloc.alloc().is_none());
    let index = second.index();
    release.release(second);
    let again = alloc.alloc().expect("released slot is free again");
    assert_eq!(again.index(), index);
    assert!(alloc.alloc().is_none());
    release.release(first);
    release.release(again);
}

#[test]
fn released_slot_keeps_its_bytes() {
    // Nothing zeroes a slot on release: the pool is a free list, not an allocator.
    let (mut alloc, mut release) = pool(SLOT_ALIGN, 1);
    let mut slot = alloc.alloc().unwrap();
    slot.as_mut_slice()[..4].copy_from_slice(b"ferr");
    release.release(slot);
    assert_eq!(&alloc.alloc().unwrap().as_slice()[..4], b"ferr");
}

#[test]
#[should_panic(expected = "not allocated from")]
fn releasing_a_slot_of_another_pool_panics() {
    let (mut alloc_a, _release_a) = pool(SLOT_ALIGN, 1);
    let (_alloc_b, mut release_b) = pool(SLOT_ALIGN, 1);
    release_b.release(alloc_a.alloc().unwrap());
}

#[test]
fn dropped_slot_is_lost_not_reused() {
    let (mut alloc, _release) = pool(SLOT_ALIGN, 2);
    drop(alloc.alloc().unwrap());
    assert!(alloc.alloc().is_some());
    assert!(alloc.alloc().is_none(), "the dropped slot never comes back");
}

#[test]
fn slot_outlives_both_handles() {
    let (mut alloc, release) = pool(SLOT_ALIGN, 2);
    let mut slot = alloc.alloc().unwrap();
    drop((alloc, release));
    slot.as_mut_slice()[SLOT_ALIGN - 1] = 7;
    assert_eq!(slot.as_slice()[SLOT_ALIGN - 1], 7);
}

#[test]
fn release_after_alloc_side_is_gone_is_harmless() {
    let (mut alloc, mut release) = pool(SLOT_ALIGN, 2);
    let slot = alloc.alloc().unwrap();
    drop(alloc);
    release.release(slot);
}

#[test]
fn alloc_wait_returns_none_when_no_slot_can_come_back() {
    let (mut alloc, release) = pool(SLOT_ALIGN, 1);
    let held = alloc.alloc().unwrap();
    drop(release);
    assert!(alloc.alloc_wait().is_none());
    drop(held);

    // Free slots are still handed out after the return side is gone.
    let (mut alloc, release) = pool(SLOT_ALIGN, 1);
    drop(release);
    assert!(alloc.alloc_wait().is_some());
    assert!(alloc.alloc_wait().is_none());
}

#[test]
fn alloc_wait_sleeps_until_a_release() {
    let (mut alloc, mut release) = pool(SLOT_ALIGN, 1);
    let slot = alloc.alloc().unwrap();
    thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(Duration::from_millis(if cfg!(miri) { 1 } else { 20 }));
            release.release(slot);
        });
        assert_eq!(alloc.alloc_wait().map(|slot| slot.index()), Some(0));
    });
}

#[test]
fn cross_thread_release_round_trips() {
    // The allocating thread stamps each slot, the releasing thread checks the stamp
    // and gives it back: every slot handed out is exclusively owned, across threads.
    let (mut alloc, mut release) = pool(SLOT_ALIGN, SLOTS);
    let (in_flight_tx, in_flight_rx) = mpsc::channel::<(Slot, u64)>();
    thread::scope(|s| {
        s.spawn(move || {
            for (slot, stamp) in in_flight_rx {
                let bytes = slot.as_slice();
                assert_eq!(bytes[..8], stamp.to_le_bytes());
                assert_eq!(bytes[SLOT_ALIGN - 8..], stamp.to_le_bytes());
                release.release(slot);
            }
        });
        for stamp in 0..ROUND_TRIPS as u64 {
            let mut slot = alloc.alloc_wait().expect("return side alive");
            let bytes = slot.as_mut_slice();
            bytes[..8].copy_from_slice(&stamp.to_le_bytes());
            bytes[SLOT_ALIGN - 8..].copy_from_slice(&stamp.to_le_bytes());
            in_flight_tx.send((slot, stamp)).unwrap();
        }
        drop(in_flight_tx);
    });
    let free: Vec<Slot> = std::iter::from_fn(|| alloc.alloc()).collect();
    assert_eq!(free.len(), SLOTS, "every slot came back");
}

#[test]
fn handles_and_slots_are_send() {
    fn send<T: Send>() {}
    send::<PoolAlloc>();
    send::<PoolReturn>();
    send::<Slot>();
}
