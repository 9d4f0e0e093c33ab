//! loom models: exhaustive interleavings (and weak-memory outcomes) of small
//! scenarios. Each model is sized to finish in seconds; the state space grows
//! exponentially with items and threads, so they stay at two or three items.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p ferry-ringbuf --release --lib`.

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use crate::pool::BufferPool;
use crate::spsc::{channel, PopWait, Producer, PushError};

/// Preemption bound of the models whose full state space is too large for a test
/// run (the two-sided blocking ones; an unbounded search of a one-slot ring with two
/// items ran for more than 15 minutes). Lost wake-ups and ordering bugs in a
/// two-party protocol need only a few forced switches: with this bound, each of
/// these deliberate breakages still makes at least one model fail — either fence of
/// the park handshake removed or weakened to `AcqRel`, `tail` or `head` stored
/// `Relaxed`, the waiter check moved before the `tail` store, no notification on
/// drop, no final drain before reporting abandonment.
const PREEMPTION_BOUND: usize = 3;

/// Explores every execution of `f`.
fn model(f: impl Fn() + Sync + Send + 'static) {
    loom::model::Builder::new().check(f);
}

/// Explores the executions of `f` with at most `PREEMPTION_BOUND` preemptions.
fn model_bounded(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(PREEMPTION_BOUND);
    builder.check(f);
}

/// Pushes with `push`, yielding while the ring is full (loom needs the yield to see
/// the spin as one).
fn push_spinning<T>(producer: &mut Producer<T>, mut value: T) {
    loop {
        match producer.push(value) {
            Ok(()) => return,
            Err(PushError::Full(back)) => {
                value = back;
                thread::yield_now();
            }
        }
    }
}

/// Counts drops, to check that every item is dropped exactly once.
struct Counted {
    value: usize,
    drops: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }
}

/// Three items through two slots: the indices wrap, items arrive in order, and the
/// slot accesses of the two ends never overlap (loom's `UnsafeCell` tracking would
/// flag it).
#[test]
fn push_pop_in_order_across_wrap_around() {
    model(|| {
        let (mut producer, mut consumer) = channel::<usize>(2);
        let pusher = thread::spawn(move || {
            for value in 0..3 {
                push_spinning(&mut producer, value);
            }
        });
        let mut expected = 0;
        while expected < 3 {
            match consumer.pop() {
                Some(value) => {
                    assert_eq!(value, expected);
                    expected += 1;
                }
                None => thread::yield_now(),
            }
        }
        assert_eq!(consumer.pop(), None);
        pusher.join().unwrap();
    });
}

/// Both ends drop on different threads while items remain; whichever drops last
/// frees the ring and drops the items left, each exactly once.
#[test]
fn remaining_items_drop_exactly_once() {
    model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let (mut producer, mut consumer) = channel::<Counted>(2);
        for value in 0..2 {
            let item = Counted {
                value,
                drops: Arc::clone(&drops),
            };
            assert!(producer.push(item).is_ok());
        }
        let popper = thread::spawn(move || {
            let first = consumer.pop().expect("two items were pushed");
            assert_eq!(first.value, 0);
        });
        drop(producer);
        popper.join().unwrap();
        assert_eq!(drops.load(Ordering::Relaxed), 2);
    });
}

/// A consumer blocked in `pop_wait` sees the producer's last item and then its
/// drop: the drop wakes it, and `None` comes only after the ring is drained.
#[test]
fn pop_wait_drains_then_sees_abandonment() {
    model(|| {
        let (mut producer, mut consumer) = channel::<usize>(1);
        let pusher = thread::spawn(move || {
            assert!(producer.push(7).is_ok());
        });
        assert_eq!(consumer.pop_wait(), Some(7));
        assert_eq!(consumer.pop_wait(), None);
        assert!(consumer.is_abandoned());
        pusher.join().unwrap();
    });
}

/// A producer blocked in `push_wait` on a full ring is woken by the consumer's
/// drop and gets its value back.
#[test]
fn push_wait_returns_value_when_consumer_leaves() {
    model(|| {
        let (mut producer, consumer) = channel::<usize>(1);
        assert!(producer.push(1).is_ok());
        let dropper = thread::spawn(move || drop(consumer));
        assert_eq!(producer.push_wait(2), Err(2));
        assert!(producer.is_abandoned());
        dropper.join().unwrap();
    });
}

/// Both ends block on each other through a one-slot ring: the producer sleeps on
/// full, the consumer on empty. A lost wake-up leaves both parked, which loom
/// reports as a deadlock.
#[test]
fn wait_handshake_loses_no_wakeup() {
    model_bounded(|| {
        let (mut producer, mut consumer) = channel::<usize>(1);
        let pusher = thread::spawn(move || {
            for value in 0..2 {
                assert_eq!(producer.push_wait(value), Ok(()));
            }
        });
        for value in 0..2 {
            assert_eq!(consumer.pop_wait(), Some(value));
        }
        assert_eq!(consumer.pop_wait(), None);
        pusher.join().unwrap();
    });
}

/// Request/response over two one-slot rings: each thread alternately waits on one
/// ring and publishes on the other, and both ends stay alive until the end, so
/// only the push and pop notifications — not a drop — can wake a sleeper.
#[test]
fn ping_pong_wakes_without_drop() {
    model_bounded(|| {
        let (mut ping_tx, mut ping_rx) = channel::<usize>(1);
        let (mut pong_tx, mut pong_rx) = channel::<usize>(1);
        let echo = thread::spawn(move || {
            for _ in 0..2 {
                let value = ping_rx.pop_wait().expect("pinger alive");
                assert_eq!(pong_tx.push_wait(value + 10), Ok(()));
            }
            (ping_rx, pong_tx)
        });
        for value in 0..2 {
            assert_eq!(ping_tx.push_wait(value), Ok(()));
            assert_eq!(pong_rx.pop_wait(), Some(value + 10));
        }
        let ends = echo.join().unwrap();
        drop((ping_tx, pong_rx, ends));
    });
}

/// A zero-timeout wait never reports `Timeout` for an item that was there, nor
/// `Abandoned` before the ring is drained. (loom has no clock, so only a zero
/// timeout keeps executions deterministic: it times out without parking.)
#[test]
fn pop_wait_timeout_outcomes_are_consistent() {
    model(|| {
        let (mut producer, mut consumer) = channel::<usize>(1);
        let pusher = thread::spawn(move || {
            assert!(producer.push(5).is_ok());
        });
        let mut got_item = false;
        loop {
            match consumer.pop_wait_timeout(std::time::Duration::ZERO) {
                PopWait::Item(value) => {
                    assert_eq!(value, 5);
                    assert!(!got_item);
                    got_item = true;
                }
                PopWait::Timeout => thread::yield_now(),
                PopWait::Abandoned => break,
            }
        }
        assert!(got_item);
        pusher.join().unwrap();
    });
}

/// A slot released on another thread reaches an `alloc_wait` that sleeps for it.
#[test]
fn pool_cross_thread_release_wakes_alloc_wait() {
    model(|| {
        let (mut alloc, mut release) = BufferPool::new(4096, 1).unwrap();
        let slot = alloc.alloc().expect("one free slot");
        assert!(alloc.alloc().is_none());
        let releaser = thread::spawn(move || release.release(slot));
        let again = alloc.alloc_wait().expect("the slot comes back");
        assert_eq!(again.index(), 0);
        releaser.join().unwrap();
        drop(again);
        assert!(alloc.alloc_wait().is_none(), "return side gone, pool empty");
    });
}
