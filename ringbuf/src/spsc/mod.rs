//! Bounded lock-free single-producer/single-consumer ring.
//!
//! [`channel`] returns the two ends. The [`Producer`] owns the tail index and the
//! [`Consumer`] owns the head index; each is the only writer of its index, so a push
//! or a pop is a plain load and store, never a read-modify-write. The indices run
//! freely (wrapping at `usize::MAX`) and a slot is `index & (capacity - 1)`, so
//! `tail - head` is the number of items without a "full vs. empty" ambiguity.
//!
//! Each end keeps a copy of the other end's index from its last load and only
//! reloads it when the copy says the ring is full (producer) or empty (consumer), so
//! in a steady stream the two cache lines holding the indices move between cores
//! once per batch of items, not once per item.
//!
//! # Memory ordering in one paragraph
//!
//! The producer writes a slot, then stores `tail` with `Release`; the consumer loads
//! `tail` with `Acquire` before it reads the slot. The consumer moves the value out,
//! then stores `head` with `Release`; the producer loads `head` with `Acquire` before
//! it writes the slot again. So a slot is owned by exactly one end at a time and the
//! hand-over carries the bytes. Waking a blocked end adds one `SeqCst` fence to every
//! push and pop (see `park.rs` for why a fence and not release/acquire).
//!
//! # Blocking
//!
//! [`Producer::push_wait`], [`Consumer::pop_wait`] and
//! [`Consumer::pop_wait_timeout`] spin for a few microseconds and then sleep with
//! `std::thread::park`. Every [`Producer::push`] and [`Consumer::pop`] (and each
//! end's drop) checks whether the other end is asleep and unparks it, so the
//! blocking and non-blocking calls can be mixed freely and no wake-up is lost.
//! When nobody sleeps that check costs a fence and a load, with no lock or system
//! call — few instructions, but the fence exposes the latency of the index store
//! (measured in `park.rs`).
//!
//! ```
//! use ferry_ringbuf::spsc;
//!
//! let (mut tx, mut rx) = spsc::channel::<u64>(1024);
//! let worker = std::thread::spawn(move || {
//!     let mut sum = 0;
//!     // `None` once the producer is gone and the ring is drained.
//!     while let Some(descriptor) = rx.pop_wait() {
//!         sum += descriptor;
//!     }
//!     sum
//! });
//! for descriptor in 0..100 {
//!     tx.push_wait(descriptor).expect("worker is alive");
//! }
//! drop(tx);
//! assert_eq!(worker.join().unwrap(), 4950);
//! ```

mod park;

use std::fmt;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use crate::sync::{Arc, UnsafeCell};
use park::{Deadline, Parker};

/// Largest capacity [`channel`] accepts, in slots.
///
/// 2^24 slots is 128 MiB of ring for `u64` descriptors, several orders of magnitude
/// beyond any queue depth of the data plane (io_uring caps a submission queue at
/// 32768 entries). A larger request is a unit mix-up (bytes for slots), not a sizing
/// decision, so [`channel`] panics on it. The bound also keeps the free-running
/// index arithmetic exact: `tail - head` modulo 2^`usize::BITS` is the true distance
/// while the capacity is at most half the index space.
pub const MAX_CAPACITY: usize = 1 << 24;
const _: () = assert!(MAX_CAPACITY.is_power_of_two());
const _: () = assert!(MAX_CAPACITY <= usize::MAX / 2);

/// Creates a ring holding at least `capacity` items (rounded up to a power of two).
///
/// # Panics
///
/// If `capacity` is 0 or greater than [`MAX_CAPACITY`].
pub fn channel<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(capacity > 0, "ring capacity must be at least 1 slot");
    assert!(
        capacity <= MAX_CAPACITY,
        "ring capacity {capacity} slots exceeds MAX_CAPACITY ({MAX_CAPACITY} slots)"
    );
    let capacity = capacity.next_power_of_two();
    let buffer = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        control: CachePadded::new(Control {
            producer_alive: AtomicBool::new(true),
            consumer_alive: AtomicBool::new(true),
            consumer_parker: Parker::new(),
            producer_parker: Parker::new(),
        }),
        mask: capacity - 1,
        buffer,
    });
    let producer = Producer {
        shared: Arc::clone(&shared),
        tail: 0,
        head_cache: 0,
    };
    let consumer = Consumer {
        shared,
        head: 0,
        tail_cache: 0,
    };
    (producer, consumer)
}

/// State shared by the two ends; freed (with any items still in it) when both are
/// gone.
struct Shared<T> {
    /// Free-running index of the next slot the consumer reads.
    /// Written only by the consumer, in `pop`; read by the producer to find space.
    /// Range: `tail - capacity ..= tail`, modulo 2^`usize::BITS`.
    head: CachePadded<AtomicUsize>,
    /// Free-running index of the next slot the producer writes.
    /// Written only by the producer, in `push`; read by the consumer to find items.
    /// Range: `head ..= head + capacity`, modulo 2^`usize::BITS`.
    tail: CachePadded<AtomicUsize>,
    /// Written rarely (on sleep and on drop) but read on every push and pop, so it
    /// has a line of its own that stays cached on both cores.
    control: CachePadded<Control>,
    /// `capacity - 1`; the capacity is a power of two. Immutable.
    mask: usize,
    /// The slots. Those at `head..tail` hold an initialised item that the ring owns;
    /// the rest are uninitialised. Only the producer touches slots outside
    /// `head..tail`, only the consumer slots inside it.
    buffer: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

/// Liveness of the two ends and their places to sleep.
struct Control {
    /// `true` until the producer is dropped. Written once, by the producer's drop;
    /// read by the consumer.
    producer_alive: AtomicBool,
    /// `true` until the consumer is dropped. Written once, by the consumer's drop;
    /// read by the producer.
    consumer_alive: AtomicBool,
    /// Where the consumer sleeps waiting for an item; notified by the producer after
    /// each push and on its drop.
    consumer_parker: Parker,
    /// Where the producer sleeps waiting for space; notified by the consumer after
    /// each pop and on its drop.
    producer_parker: Parker,
}

// SAFETY: `Shared` is reached from two threads through `Arc`. Its slots are the only
// non-thread-safe part: a slot is written only by the one `Producer` while it lies
// outside `head..tail` and read (moved out) only by the one `Consumer` while inside,
// and each hand-over is a release store / acquire load of `tail` or `head`. Items
// move from one thread to the other, hence `T: Send`; no `&T` is ever shared between
// threads, so `T: Sync` is not needed.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as for `Send` above; `&Shared` only gives access to atomics, to the mutexes
// inside the parkers, and to slots under the ownership rule described there.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// The slot for free-running index `index`.
    fn slot(&self, index: usize) -> &UnsafeCell<MaybeUninit<T>> {
        &self.buffer[index & self.mask]
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Relaxed: `&mut self` means both ends are gone, and dropping the last `Arc`
        // synchronised with the release of every other reference, so both ends'
        // final index stores are visible.
        let mut head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        while head != tail {
            self.slot(head).with_mut(|slot| {
                // SAFETY: slots in `head..tail` hold an item that was pushed and not
                // popped; the ring owns it and, with both ends gone, nobody else can
                // reach it. Each index is visited once, so each item drops once.
                unsafe { (*slot).assume_init_drop() }
            });
            head = head.wrapping_add(1);
        }
    }
}

/// A push that did not happen; the value is handed back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PushError<T> {
    /// The ring holds `capacity` items; here is the value that did not fit.
    Full(T),
}

impl<T> PushError<T> {
    /// The value that was not pushed.
    pub fn into_inner(self) -> T {
        match self {
            Self::Full(value) => value,
        }
    }
}

// By hand so that `T` need not be `Debug`: the value is not part of the error.
impl<T> fmt::Debug for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("Full(..)"),
        }
    }
}

impl<T> fmt::Display for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("ring is full"),
        }
    }
}

impl<T> std::error::Error for PushError<T> {}

/// Outcome of [`Consumer::pop_wait_timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum PopWait<T> {
    /// The next item.
    Item(T),
    /// The timeout passed with the ring empty and the producer alive.
    Timeout,
    /// The producer is gone and every item it pushed has been popped.
    Abandoned,
}

/// The writing end of a ring; see [`channel`].
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    /// Copy of `shared.tail`. The producer is the only writer of `tail`, so this is
    /// always exact and `push` never loads its own index.
    tail: usize,
    /// `shared.head` as last loaded by the producer. The consumer only moves `head`
    /// forward, so this lags the truth and the space computed from it is a lower
    /// bound; it is reloaded only when it says the ring is full.
    /// Range: `tail - capacity ..= tail`.
    head_cache: usize,
}

impl<T> Producer<T> {
    /// Appends `value`, or hands it back in [`PushError::Full`] if the ring is full.
    ///
    /// Wakes the consumer if it sleeps in [`Consumer::pop_wait`]. Succeeds even if
    /// the consumer is gone (see [`Producer::is_abandoned`]); the item is then
    /// dropped with the ring.
    pub fn push(&mut self, value: T) -> Result<(), PushError<T>> {
        let tail = self.tail;
        let capacity = self.shared.capacity();
        if tail.wrapping_sub(self.head_cache) == capacity {
            // Acquire: pairs with the consumer's release store of `head` in `pop`, so
            // its move out of the slot we are about to overwrite is complete.
            self.head_cache = self.shared.head.load(Ordering::Acquire);
            if tail.wrapping_sub(self.head_cache) == capacity {
                return Err(PushError::Full(value));
            }
        }
        self.shared.slot(tail).with_mut(|slot| {
            // SAFETY: `tail - head < capacity`, so the slot `tail` lies outside
            // `head..tail` and belongs to the producer, which `&mut self` makes
            // unique, until the store to `tail` below. Its previous item, if any, was
            // moved out by the consumer before it published the `head` loaded above,
            // so nothing is overwritten without being dropped.
            unsafe { slot.write(MaybeUninit::new(value)) };
        });
        let next = tail.wrapping_add(1);
        // Release: pairs with the consumer's acquire load of `tail` in `pop`, handing
        // it the slot together with the item just written.
        self.shared.tail.store(next, Ordering::Release);
        self.tail = next;
        self.shared.control.consumer_parker.notify();
        Ok(())
    }

    /// Appends `value`, sleeping while the ring is full.
    ///
    /// Returns `Err(value)` only if the consumer is gone — checked before the push
    /// and while waiting — so a value is never left in a ring that nobody will read.
    /// Spins for a few microseconds before sleeping; the consumer's next pop (or its
    /// drop) wakes it.
    pub fn push_wait(&mut self, mut value: T) -> Result<(), T> {
        loop {
            if self.is_abandoned() {
                return Err(value);
            }
            match self.push(value) {
                Ok(()) => return Ok(()),
                Err(PushError::Full(back)) => value = back,
            }
            let shared = &*self.shared;
            let tail = self.tail;
            park::wait_until(&shared.control.producer_parker, Deadline::Never, || {
                // Relaxed: only decides whether to sleep; `is_abandoned` and `push`
                // reload with acquire before anything is written.
                let head = shared.head.load(Ordering::Relaxed);
                tail.wrapping_sub(head) < shared.capacity()
                    || !shared.control.consumer_alive.load(Ordering::Relaxed)
            });
        }
    }

    /// Number of items in the ring: exact for what the producer pushed, a snapshot
    /// of what the consumer has popped.
    pub fn len(&self) -> usize {
        // Relaxed: a count for the caller; no slot is accessed on the strength of it.
        // It cannot exceed `tail`: the consumer never passes a tail it has not seen.
        self.tail
            .wrapping_sub(self.shared.head.load(Ordering::Relaxed))
    }

    /// Whether the ring holds no items (a snapshot, see [`Producer::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots: the requested capacity rounded up to a power of two.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Whether the consumer has been dropped. Once `true`, stays `true`.
    pub fn is_abandoned(&self) -> bool {
        // Acquire: pairs with the release store in the consumer's drop; orders
        // everything the consumer did before leaving before whatever the caller does
        // on seeing it gone.
        !self.shared.control.consumer_alive.load(Ordering::Acquire)
    }
}

impl<T> Drop for Producer<T> {
    fn drop(&mut self) {
        // Release: pairs with the consumer's acquire load in `is_abandoned`; every
        // `tail` store happens before it, so a consumer that sees the producer gone
        // and then finds the ring empty has really drained it.
        self.shared
            .control
            .producer_alive
            .store(false, Ordering::Release);
        self.shared.control.consumer_parker.notify();
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .field("abandoned", &self.is_abandoned())
            .finish()
    }
}

/// The reading end of a ring; see [`channel`].
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// Copy of `shared.head`. The consumer is the only writer of `head`, so this is
    /// always exact and `pop` never loads its own index.
    head: usize,
    /// `shared.tail` as last loaded by the consumer. The producer only moves `tail`
    /// forward, so this lags the truth and the item count computed from it is a lower
    /// bound; it is reloaded only when it says the ring is empty.
    /// Range: `head ..= head + capacity`.
    tail_cache: usize,
}

impl<T> Consumer<T> {
    /// Removes the oldest item, or returns `None` if the ring is empty.
    ///
    /// Wakes the producer if it sleeps in [`Producer::push_wait`].
    pub fn pop(&mut self) -> Option<T> {
        let head = self.head;
        if head == self.tail_cache {
            // Acquire: pairs with the producer's release store of `tail` in `push`, so
            // the items it published are fully written before we read them.
            self.tail_cache = self.shared.tail.load(Ordering::Acquire);
            if head == self.tail_cache {
                return None;
            }
        }
        let value = self.shared.slot(head).with(|slot| {
            // SAFETY: `head != tail`, so the slot `head` lies inside `head..tail`: it
            // holds an initialised item (written before the `tail` store we acquired)
            // and belongs to the consumer, which `&mut self` makes unique, until the
            // store to `head` below. Reading it moves the item out; the slot counts
            // as uninitialised from that store on, so the item is never dropped twice.
            unsafe { slot.read().assume_init() }
        });
        let next = head.wrapping_add(1);
        // Release: pairs with the producer's acquire load of `head` in `push`; our read
        // of the slot is complete before the producer may overwrite it.
        self.shared.head.store(next, Ordering::Release);
        self.head = next;
        self.shared.control.producer_parker.notify();
        Some(value)
    }

    /// Removes the oldest item, sleeping while the ring is empty.
    ///
    /// Returns `None` only when the producer is gone and every item it pushed has
    /// been popped. Spins for a few microseconds before sleeping; the producer's next
    /// push (or its drop) wakes it.
    pub fn pop_wait(&mut self) -> Option<T> {
        match self.pop_until(Deadline::Never) {
            PopWait::Item(value) => Some(value),
            PopWait::Abandoned => None,
            PopWait::Timeout => unreachable!("a wait without deadline timed out"),
        }
    }

    /// Like [`Consumer::pop_wait`], but gives up after `timeout`.
    ///
    /// A zero timeout makes one non-blocking attempt that still tells an abandoned
    /// ring from an empty one. A timeout too large to add to the current time waits
    /// without limit.
    pub fn pop_wait_timeout(&mut self, timeout: Duration) -> PopWait<T> {
        let deadline = match Instant::now().checked_add(timeout) {
            Some(at) => Deadline::At(at),
            None => Deadline::Never,
        };
        self.pop_until(deadline)
    }

    fn pop_until(&mut self, deadline: Deadline) -> PopWait<T> {
        let mut timed_out = false;
        loop {
            if let Some(value) = self.pop() {
                return PopWait::Item(value);
            }
            if self.is_abandoned() {
                // The producer's last push happens before its drop, which we have just
                // acquired, so this pop sees every item it ever pushed.
                return self.pop().map_or(PopWait::Abandoned, PopWait::Item);
            }
            if timed_out {
                return PopWait::Timeout;
            }
            let shared = &*self.shared;
            let head = self.head;
            timed_out = !park::wait_until(&shared.control.consumer_parker, deadline, || {
                // Relaxed: only decides whether to sleep; `pop` and `is_abandoned`
                // reload with acquire before any slot is read.
                shared.tail.load(Ordering::Relaxed) != head
                    || !shared.control.producer_alive.load(Ordering::Relaxed)
            });
        }
    }

    /// Number of items in the ring: exact for what the consumer popped, a snapshot
    /// of what the producer has pushed.
    pub fn len(&self) -> usize {
        // Relaxed: a count for the caller; `pop` reloads `tail` with acquire before it
        // reads a slot.
        self.shared
            .tail
            .load(Ordering::Relaxed)
            .wrapping_sub(self.head)
    }

    /// Whether the ring holds no items (a snapshot, see [`Consumer::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots: the requested capacity rounded up to a power of two.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Whether the producer has been dropped. Once `true`, stays `true`.
    ///
    /// Items it pushed before leaving are still in the ring: drain them with
    /// [`Consumer::pop`] (or use [`Consumer::pop_wait`], which does).
    pub fn is_abandoned(&self) -> bool {
        // Acquire: pairs with the release store in the producer's drop, so every item
        // it pushed is visible to the next `pop`.
        !self.shared.control.producer_alive.load(Ordering::Acquire)
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        // Release: pairs with the producer's acquire load in `is_abandoned`.
        self.shared
            .control
            .consumer_alive
            .store(false, Ordering::Release);
        self.shared.control.producer_parker.notify();
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .field("abandoned", &self.is_abandoned())
            .finish()
    }
}
