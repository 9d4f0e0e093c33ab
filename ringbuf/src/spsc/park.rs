//! Sleeping and waking for the blocking helpers (`push_wait`, `pop_wait`).
//!
//! Each side of a ring owns one [`Parker`]: the consumer sleeps on its own when the
//! ring is empty, the producer on its own when the ring is full. The other side calls
//! [`Parker::notify`] after every state change the sleeper could be waiting for: a
//! push or a pop (the index store), and its own drop (the "alive" flag store).
//!
//! # Why no wake-up is lost
//!
//! The sleeper and the notifier each do a store followed by a load of the other's
//! location, with a `SeqCst` fence in between:
//!
//! ```text
//! sleeper (prepare + ready)              notifier (after push/pop/drop)
//!   waiting = true                         tail/head/alive = new value
//!   fence(SeqCst)             (Y)          fence(SeqCst)             (X)
//!   ready()? reads tail/head/alive         waiting? -> unpark
//! ```
//!
//! All `SeqCst` fences are in one total order. If `X` comes before `Y`, the sleeper's
//! `ready()` sees the new index (C++ [atomics.fences]: a load after `Y` observes a
//! store before `X`) and it does not sleep. If `Y` comes before `X`, the notifier's
//! load sees `waiting == true` (or a later value, which only the sleeper writes once
//! it has stopped waiting) and unparks it. Release/acquire alone would allow both
//! loads to read the old values — the store-buffering outcome — and the sleeper would
//! wait for a wake-up that never comes. `SeqCst` stores and loads instead of the
//! fences would also close the gap at the same cost on x86 (an `xchg` instead of an
//! `mfence`), but loom models `SeqCst` fences faithfully and `SeqCst` accesses not.
//!
//! `std::thread::park` keeps a token, so an `unpark` that lands between the
//! sleeper's check and its `park` makes the `park` return at once. Spurious returns
//! from `park` are allowed; the caller loops and checks again.
//!
//! # Cost on the fast path
//!
//! [`Parker::notify`] is one fence and one load of a line that is only written when
//! a side goes to sleep: no lock, no read-modify-write, no system call. The mutex
//! holding the sleeper's [`Thread`] is only taken by a side that is about to sleep
//! and by a notifier that saw it doing so.
//!
//! The fence is still the dominant cost of a push or pop in a cross-thread stream:
//! it cannot retire before the index store before it owns its cache line, which the
//! other core keeps pulling away, so the store's latency is no longer hidden. The
//! `spsc` benchmark moved `u64`s about 5 times faster with the check removed (on a
//! shared 2-core machine); a ring that never blocks pays it too, since either end
//! may start waiting at any time. Batching pushes and pops would amortise it.

use std::sync::PoisonError;
use std::time::Instant;

use crate::sync::atomic::{fence, AtomicBool, Ordering};
use crate::sync::thread::{self, Thread};
use crate::sync::Mutex;

/// Rounds of busy-waiting before going to sleep; round `k` issues `2^k` spin hints.
///
/// Six rounds are 63 hints: a few microseconds on current x86 cores (a `PAUSE` is
/// about 40 ns there), long enough to catch a peer that is actively running on the
/// other core, short enough not to steal much from a 2-core machine where the peer may
/// be descheduled and spinning can only delay it.
#[cfg(not(loom))]
const SPIN_ROUNDS: u32 = 6;

/// Busy-waits for `ready()` for up to [`SPIN_ROUNDS`]; returns whether it became true.
#[cfg(not(loom))]
fn spin_briefly(ready: &mut impl FnMut() -> bool) -> bool {
    for round in 0..SPIN_ROUNDS {
        if ready() {
            return true;
        }
        for _ in 0..1u32 << round {
            std::hint::spin_loop();
        }
    }
    false
}

/// Under loom every spin hint is a yield that multiplies the explored schedules
/// without modelling anything new, so the models go straight to the park handshake.
#[cfg(loom)]
fn spin_briefly(_ready: &mut impl FnMut() -> bool) -> bool {
    false
}

/// When a wait gives up.
#[derive(Clone, Copy, Debug)]
pub(super) enum Deadline {
    /// Wait until ready, however long that takes.
    Never,
    /// Give up once this instant has passed.
    At(Instant),
}

/// One side's place to sleep.
pub(super) struct Parker {
    /// `true` from [`Parker::prepare`] until the sleeper cancels, or until a notifier
    /// claims the wake-up. Written by the owning side (both directions) and by the
    /// notifier (`true` -> `false` only); read by the notifier on every push or pop.
    waiting: AtomicBool,
    /// The thread to unpark. Written by the owning side in `prepare` (the side may have
    /// moved to another thread since its last wait), read by the notifier after it
    /// claimed a wake-up. Taken only on those slow paths.
    thread: Mutex<Option<Thread>>,
}

impl Parker {
    pub(super) fn new() -> Self {
        Self {
            waiting: AtomicBool::new(false),
            thread: Mutex::new(None),
        }
    }

    /// Announces that the calling thread is about to sleep.
    ///
    /// The caller must then re-check its condition with fresh loads of the shared
    /// state, sleep only if it still does not hold, and call [`Parker::cancel`] in
    /// either case before it returns or checks again.
    fn prepare(&self) {
        let current = thread::current();
        *self.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(current);
        // Relaxed: the handshake with the notifier is ordered by the fence below, and
        // the `Thread` above is handed over by the mutex, not by this flag.
        //
        // A swap rather than a store (here and in `cancel`): in C++ terms a store is
        // enough, but loom tracks modification order only through what each thread
        // has read, so after a notifier's `swap` it would let the notifier's load miss
        // this write — a false "lost wake-up" (checked with a litmus test). The extra
        // cost is one locked instruction on the way to sleep.
        let _ = self.waiting.swap(true, Ordering::Relaxed);
        // SeqCst: fence `Y` of the handshake in the module docs; orders the store above
        // before the caller's re-check of the ring.
        fence(Ordering::SeqCst);
    }

    /// Withdraws [`Parker::prepare`] once the sleeper is awake again or did not sleep.
    fn cancel(&self) {
        // Relaxed: nothing is published by clearing the flag. A notifier that still
        // reads `true` unparks a thread that is already awake: the stray token only
        // makes a later `park` return early, which every caller tolerates.
        let _ = self.waiting.swap(false, Ordering::Relaxed);
    }

    /// Wakes the other side if it is asleep (or about to be) on this parker.
    ///
    /// Call after the store that may satisfy the sleeper's condition: a push, a pop,
    /// or clearing an "alive" flag.
    #[inline]
    pub(super) fn notify(&self) {
        // SeqCst: fence `X` of the handshake; orders the caller's index or flag store
        // before the load of `waiting` below.
        fence(Ordering::SeqCst);
        // Relaxed: ordered against the sleeper's flag store by the two fences.
        if self.waiting.load(Ordering::Relaxed) {
            self.wake();
        }
    }

    #[cold]
    #[inline(never)]
    fn wake(&self) {
        // Relaxed: the swap only makes sure that one notification per sleep pays for
        // the unpark; the `Thread` it leads to is read under the mutex. A notifier that
        // read `true` written by a `prepare` cannot lock the mutex before that
        // `prepare` unlocked it (that would make its read happen before the write), so
        // it unparks that thread or a later sleeper of the same side.
        if self.waiting.swap(false, Ordering::Relaxed) {
            let sleeper = self
                .thread
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(sleeper) = sleeper {
                sleeper.unpark();
            }
        }
    }
}

/// Blocks the calling thread until `ready()` returns `true` (returns `true`) or the
/// deadline has passed (returns `false`).
///
/// Spins briefly, then sleeps on `parker`, whose other side must `notify` it after
/// every store that can make `ready()` true. `ready` must load the shared atomics
/// afresh on every call — never a side's cached copy — because only a load issued
/// after the fence in [`Parker::prepare`] is covered by the handshake. `ready` is a
/// hint: the caller re-checks with its normal acquire loads before touching data.
pub(super) fn wait_until(
    parker: &Parker,
    deadline: Deadline,
    mut ready: impl FnMut() -> bool,
) -> bool {
    if spin_briefly(&mut ready) {
        return true;
    }
    loop {
        if ready() {
            return true;
        }
        let timeout = match deadline {
            Deadline::Never => None,
            Deadline::At(at) => {
                let now = Instant::now();
                if now >= at {
                    return false;
                }
                Some(at - now)
            }
        };
        parker.prepare();
        if ready() {
            parker.cancel();
            return true;
        }
        match timeout {
            None => thread::park(),
            Some(timeout) => thread::park_timeout(timeout),
        }
        parker.cancel();
    }
}
