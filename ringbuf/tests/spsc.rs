//! Behaviour of `ferry_ringbuf::spsc` through its public API: single-threaded semantics,
//! blocking and abandonment across threads, and a two-thread stress run.
//!
//! Tests that loop shrink under Miri (`cfg!(miri)`); the loom models in
//! `src/loom_models.rs` cover the interleavings these runs can only sample.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ferry_ringbuf::spsc::{channel, Consumer, PopWait, Producer, PushError, MAX_CAPACITY};

/// Items moved by each stress test.
const STRESS_ITEMS: u64 = if cfg!(miri) { 100 } else { 1_000_000 };

/// Long enough that a waiting thread really goes to sleep (its spin phase is a few
/// microseconds); only makes the blocking path likely, no result depends on it.
const SLEEPER_DELAY: Duration = Duration::from_millis(if cfg!(miri) { 1 } else { 20 });

/// Counts how often values of this type are dropped.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn capacity_rounds_up_to_power_of_two() {
    for (requested, expected) in [(1, 1), (2, 2), (3, 4), (5, 8), (1000, 1024), (1024, 1024)] {
        let (producer, consumer) = channel::<u8>(requested);
        assert_eq!(producer.capacity(), expected, "requested {requested}");
        assert_eq!(consumer.capacity(), expected, "requested {requested}");
    }
}

#[test]
#[should_panic(expected = "at least 1 slot")]
fn zero_capacity_panics() {
    let _ = channel::<u8>(0);
}

#[test]
#[should_panic(expected = "exceeds MAX_CAPACITY")]
fn capacity_above_maximum_panics() {
    let _ = channel::<u8>(MAX_CAPACITY + 1);
}

#[test]
fn fifo_across_many_wrap_arounds() {
    let (mut producer, mut consumer) = channel::<u32>(4);
    let mut next_in = 0;
    let mut next_out = 0;
    for round in 0..100 {
        // Vary the fill level so head and tail wrap at different offsets.
        let batch = round % 4 + 1;
        for _ in 0..batch {
            producer.push(next_in).unwrap();
            next_in += 1;
        }
        assert_eq!(producer.len(), batch as usize);
        assert_eq!(consumer.len(), batch as usize);
        for _ in 0..batch {
            assert_eq!(consumer.pop(), Some(next_out));
            next_out += 1;
        }
        assert_eq!(consumer.pop(), None);
        assert!(producer.is_empty() && consumer.is_empty());
    }
}

#[test]
fn full_ring_hands_the_value_back() {
    let (mut producer, mut consumer) = channel::<String>(2);
    producer.push("a".to_owned()).unwrap();
    producer.push("b".to_owned()).unwrap();
    let err = producer.push("c".to_owned()).unwrap_err();
    assert_eq!(err.to_string(), "ring is full");
    assert_eq!(format!("{err:?}"), "Full(..)");
    let PushError::Full(back) = err;
    assert_eq!(back, "c");
    assert_eq!(consumer.pop().as_deref(), Some("a"));
    producer.push(back).unwrap();
    assert_eq!(consumer.pop().as_deref(), Some("b"));
    assert_eq!(consumer.pop().as_deref(), Some("c"));
    assert_eq!(consumer.pop(), None);
}

#[test]
fn push_error_into_inner() {
    let (mut producer, _consumer) = channel::<u8>(1);
    producer.push(1).unwrap();
    assert_eq!(producer.push(2).unwrap_err().into_inner(), 2);
}

#[test]
fn remaining_items_drop_exactly_once() {
    for consumer_first in [false, true] {
        let drops = Arc::new(AtomicUsize::new(0));
        let (mut producer, mut consumer) = channel(8);
        for _ in 0..5 {
            assert!(producer.push(Counted(Arc::clone(&drops))).is_ok());
        }
        drop(consumer.pop());
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        if consumer_first {
            drop(consumer);
            assert_eq!(
                drops.load(Ordering::Relaxed),
                1,
                "ring still owned by producer"
            );
            drop(producer);
        } else {
            drop(producer);
            assert_eq!(
                drops.load(Ordering::Relaxed),
                1,
                "ring still owned by consumer"
            );
            drop(consumer);
        }
        assert_eq!(
            drops.load(Ordering::Relaxed),
            5,
            "consumer_first={consumer_first}"
        );
    }
}

#[test]
fn remaining_items_drop_exactly_once_after_wrap_around() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (mut producer, mut consumer) = channel(4);
    for _ in 0..7 {
        assert!(producer.push(Counted(Arc::clone(&drops))).is_ok());
        drop(consumer.pop());
    }
    for _ in 0..3 {
        assert!(producer.push(Counted(Arc::clone(&drops))).is_ok());
    }
    drop((producer, consumer));
    assert_eq!(drops.load(Ordering::Relaxed), 10);
}

#[test]
fn abandonment_is_seen_by_the_other_side() {
    let (producer, consumer) = channel::<u8>(2);
    assert!(!producer.is_abandoned() && !consumer.is_abandoned());
    drop(producer);
    assert!(consumer.is_abandoned());

    let (producer, consumer) = channel::<u8>(2);
    drop(consumer);
    assert!(producer.is_abandoned());
}

#[test]
fn plain_push_into_abandoned_ring_still_succeeds() {
    let (mut producer, consumer) = channel::<u8>(2);
    drop(consumer);
    assert!(producer.push(1).is_ok());
}

#[test]
fn pop_wait_drains_before_reporting_abandonment() {
    let (mut producer, mut consumer) = channel::<u8>(4);
    producer.push(1).unwrap();
    producer.push(2).unwrap();
    drop(producer);
    assert_eq!(consumer.pop_wait(), Some(1));
    assert_eq!(consumer.pop_wait_timeout(Duration::ZERO), PopWait::Item(2));
    assert_eq!(consumer.pop_wait(), None);
    assert_eq!(
        consumer.pop_wait_timeout(Duration::ZERO),
        PopWait::Abandoned
    );
}

#[test]
fn pop_wait_timeout_times_out_on_empty_ring() {
    let (_producer, mut consumer) = channel::<u8>(4);
    assert_eq!(consumer.pop_wait_timeout(Duration::ZERO), PopWait::Timeout);
    assert_eq!(
        consumer.pop_wait_timeout(Duration::from_millis(5)),
        PopWait::Timeout
    );
}

#[test]
fn pop_wait_timeout_with_huge_timeout_still_returns_items() {
    let (mut producer, mut consumer) = channel::<u8>(4);
    producer.push(9).unwrap();
    assert_eq!(consumer.pop_wait_timeout(Duration::MAX), PopWait::Item(9));
}

#[test]
fn pop_wait_is_woken_by_a_later_push() {
    let (mut producer, mut consumer) = channel::<u64>(4);
    thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(SLEEPER_DELAY);
            producer.push(42).unwrap();
            thread::sleep(SLEEPER_DELAY);
            producer.push(43).unwrap();
        });
        assert_eq!(consumer.pop_wait(), Some(42));
        assert_eq!(
            consumer.pop_wait_timeout(Duration::from_secs(60)),
            PopWait::Item(43)
        );
        assert_eq!(consumer.pop_wait(), None);
    });
}

#[test]
fn pop_wait_is_woken_by_producer_drop() {
    let (producer, mut consumer) = channel::<u64>(4);
    thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(SLEEPER_DELAY);
            drop(producer);
        });
        assert_eq!(consumer.pop_wait(), None);
    });
}

#[test]
fn push_wait_is_woken_by_a_later_pop() {
    let (mut producer, mut consumer) = channel::<u64>(1);
    producer.push(1).unwrap();
    thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(SLEEPER_DELAY);
            assert_eq!(consumer.pop(), Some(1));
            assert_eq!(consumer.pop_wait(), Some(2));
        });
        assert_eq!(producer.push_wait(2), Ok(()));
    });
}

#[test]
fn push_wait_returns_the_value_when_the_consumer_leaves() {
    let (mut producer, consumer) = channel::<u64>(1);
    producer.push(1).unwrap();
    thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(SLEEPER_DELAY);
            drop(consumer);
        });
        assert_eq!(producer.push_wait(2), Err(2));
    });
    // Space or not, a gone consumer means the value comes back at once.
    let (mut producer, consumer) = channel::<u64>(4);
    drop(consumer);
    assert_eq!(producer.push_wait(3), Err(3));
}

/// Sends `0..items` and checks that the consumer receives exactly that sequence.
fn stress(
    capacity: usize,
    items: u64,
    send: fn(&mut Producer<u64>, u64),
    recv: fn(&mut Consumer<u64>) -> Option<u64>,
) {
    let (mut producer, mut consumer) = channel::<u64>(capacity);
    thread::scope(|s| {
        s.spawn(move || {
            for value in 0..items {
                send(&mut producer, value);
            }
        });
        let mut expected = 0;
        while let Some(value) = recv(&mut consumer) {
            assert_eq!(value, expected, "out of order or duplicated");
            expected += 1;
        }
        assert_eq!(expected, items, "items lost");
    });
}

fn push_yielding(producer: &mut Producer<u64>, mut value: u64) {
    while let Err(PushError::Full(back)) = producer.push(value) {
        value = back;
        thread::yield_now();
    }
}

fn pop_yielding(consumer: &mut Consumer<u64>) -> Option<u64> {
    loop {
        if let Some(value) = consumer.pop() {
            return Some(value);
        }
        if consumer.is_abandoned() {
            return consumer.pop();
        }
        thread::yield_now();
    }
}

#[test]
fn stress_non_blocking_two_threads() {
    stress(1024, STRESS_ITEMS, push_yielding, pop_yielding);
}

#[test]
fn stress_blocking_two_threads_small_ring() {
    // A small ring makes both sides sleep often, exercising the wake-up handshake.
    stress(
        8,
        STRESS_ITEMS,
        |producer, value| producer.push_wait(value).unwrap(),
        Consumer::pop_wait,
    );
}

#[test]
fn stress_mixed_blocking_and_non_blocking() {
    // `push` (not `push_wait`) must still wake a consumer asleep in `pop_wait`.
    stress(16, STRESS_ITEMS, push_yielding, Consumer::pop_wait);
    // `pop` (not `pop_wait`) must still wake a producer asleep in `push_wait`.
    stress(
        16,
        STRESS_ITEMS,
        |producer, value| producer.push_wait(value).unwrap(),
        pop_yielding,
    );
}

#[test]
fn stress_heap_items_exactly_once() {
    // Heap-owning items make a double drop or a leak visible to Miri; the counter
    // makes it visible everywhere. The consumer leaves half-way, so the items then
    // in flight are dropped by the ring and the one being pushed comes back.
    struct Item {
        value: Box<u64>,
        _drops: Counted,
    }
    let items = STRESS_ITEMS / 10;
    let drops = Arc::new(AtomicUsize::new(0));
    let (mut producer, consumer) = channel::<Item>(64);
    let created = thread::scope(|s| {
        let pusher = s.spawn(|| {
            let mut created = 0;
            for value in 0..items {
                created += 1;
                let item = Item {
                    value: Box::new(value),
                    _drops: Counted(Arc::clone(&drops)),
                };
                if producer.push_wait(item).is_err() {
                    break;
                }
            }
            created
        });
        let mut consumer = consumer;
        for expected in 0..items / 2 {
            assert_eq!(*consumer.pop_wait().unwrap().value, expected);
        }
        drop(consumer);
        pusher.join().unwrap()
    });
    drop(producer);
    assert_eq!(drops.load(Ordering::Relaxed), created);
}

#[test]
fn ends_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Producer<Box<u8>>>();
    send_sync::<Consumer<Box<u8>>>();
    // `T: Send` is all a ring needs: values move, they are never shared.
    send_sync::<Producer<std::cell::Cell<u8>>>();
}
