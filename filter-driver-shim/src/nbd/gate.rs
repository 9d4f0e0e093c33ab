//! The write gate of one disk, and the frozen epoch it guards.
//!
//! Every command that changes the image *enters* the gate before its copy-before-write
//! and *leaves* it once its write has completed; a freeze (and the end of an epoch)
//! *drains* it: close (new writers wait), wait until no writer is inside, swap the
//! frozen epoch, open. That is the semantics of a reader–writer lock whose readers are
//! the writes, with one difference that the io_uring engine needs: a pass is an owned
//! value, so it can be taken when a write is submitted and dropped when its completion
//! is reaped, on a thread that never blocks in between. Like the lock it replaces, a
//! closed gate makes new writers wait even while older ones are still inside, so a
//! drain cannot be starved.
//!
//! ```text
//!  writer:  enter ──► [copy-before-write] ──► mark ──► write … completes ──► leave
//!  freeze:           close ──► wait writers == 0 ──► swap epoch ──► open
//! ```
//!
//! A gate can also be **sealed** (the disk's site was demoted by a planned failover):
//! from then on every writer is refused at entry, under the same lock a drain takes,
//! so the next drain (the final epoch's freeze) is a cut after which no write is ever
//! acknowledged. Writers already inside finish and are drained as usual.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::epoch::FrozenDisk;

/// A disk's write gate; see the module documentation.
#[derive(Debug, Default)]
pub struct WriteGate {
    state: Mutex<GateState>,
    /// Signalled when the gate opens and when the last writer leaves a closed gate.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// Passes handed out and not yet dropped.
    writers: usize,
    /// A drain is in progress or holds the gate: new writers wait.
    closed: bool,
    /// The frozen epoch, if any. Changed only by a drain, with no writer inside.
    frozen: Option<Arc<FrozenDisk>>,
    /// Writers are refused (see the module documentation).
    sealed: bool,
}

/// A writer refused by a sealed gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed;

/// A writer inside the gate. Dropping it leaves the gate. While it lives, the frozen
/// epoch it saw at entry stays installed.
#[must_use = "dropping the pass leaves the gate at once"]
#[derive(Debug)]
pub struct GatePass<'a> {
    gate: &'a WriteGate,
    frozen: Option<Arc<FrozenDisk>>,
}

/// The gate closed and empty: no writer is inside and none can enter until this is
/// dropped. The frozen epoch can be installed or taken meanwhile.
#[derive(Debug)]
pub struct Drained<'a> {
    gate: &'a WriteGate,
}

impl WriteGate {
    pub fn new() -> WriteGate {
        WriteGate::default()
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Only counters and an Arc live under this lock: a panic elsewhere leaves them
        // consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, st: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        self.changed.wait(st).unwrap_or_else(|e| e.into_inner())
    }

    /// Enters, waiting while the gate is closed; refused once it is sealed.
    pub fn enter(&self) -> Result<GatePass<'_>, Sealed> {
        let mut st = self.lock();
        while st.closed && !st.sealed {
            st = self.wait(st);
        }
        if st.sealed {
            return Err(Sealed);
        }
        st.writers += 1;
        Ok(GatePass {
            gate: self,
            frozen: st.frozen.clone(),
        })
    }

    /// Enters if the gate is open; `Ok(None)` while a drain is closing or holding it.
    /// For a thread that must not block while writes it started are still inside.
    pub fn try_enter(&self) -> Result<Option<GatePass<'_>>, Sealed> {
        let mut st = self.lock();
        if st.sealed {
            return Err(Sealed);
        }
        if st.closed {
            return Ok(None);
        }
        st.writers += 1;
        Ok(Some(GatePass {
            gate: self,
            frozen: st.frozen.clone(),
        }))
    }

    /// Seals the gate: every writer from now on is refused (writers waiting at a
    /// closed gate are woken to be refused). Permanent for this process.
    pub fn seal(&self) {
        self.lock().sealed = true;
        self.changed.notify_all();
    }

    /// Whether the gate is sealed.
    pub fn is_sealed(&self) -> bool {
        self.lock().sealed
    }

    fn leave(&self) {
        let mut st = self.lock();
        st.writers -= 1;
        if st.writers == 0 && st.closed {
            drop(st);
            self.changed.notify_all();
        }
    }

    /// The frozen epoch, if any (a snapshot: a drain may change it right after).
    pub fn frozen(&self) -> Option<Arc<FrozenDisk>> {
        self.lock().frozen.clone()
    }

    /// Writers inside the gate now.
    pub fn writers(&self) -> usize {
        self.lock().writers
    }

    /// Closes the gate and waits until every writer inside has left. Another drain in
    /// progress is waited for first.
    pub fn drain(&self) -> Drained<'_> {
        let mut st = self.lock();
        while st.closed {
            st = self.wait(st);
        }
        st.closed = true;
        while st.writers > 0 {
            st = self.wait(st);
        }
        Drained { gate: self }
    }
}

impl GatePass<'_> {
    /// The epoch frozen when this writer entered (and still frozen while it is inside).
    pub fn frozen(&self) -> Option<&FrozenDisk> {
        self.frozen.as_deref()
    }
}

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        self.frozen = None;
        self.gate.leave();
    }
}

impl Drained<'_> {
    /// The frozen epoch, if any.
    pub fn frozen(&self) -> Option<Arc<FrozenDisk>> {
        self.gate.lock().frozen.clone()
    }

    /// Installs `frozen` as the epoch writers see from now on; returns the old one.
    pub fn install(&self, frozen: Arc<FrozenDisk>) -> Option<Arc<FrozenDisk>> {
        self.gate.lock().frozen.replace(frozen)
    }

    /// Removes the frozen epoch: copy-before-write stops.
    pub fn take(&self) -> Option<Arc<FrozenDisk>> {
        self.gate.lock().frozen.take()
    }
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        debug_assert_eq!(st.writers, 0, "nobody enters a drained gate");
        st.closed = false;
        drop(st);
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn drain_waits_for_passes_and_closed_gate_holds_new_writers() {
        let gate = WriteGate::new();
        let a = gate.enter().unwrap();
        let b = gate.try_enter().unwrap().expect("open gate");
        assert_eq!(gate.writers(), 2);
        let drained = AtomicBool::new(false);
        let entered_late = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let d = gate.drain();
                drained.store(true, Ordering::SeqCst);
                assert_eq!(gate.writers(), 0);
                assert!(d.frozen().is_none());
                // Hold the gate a moment: the late writer must still be waiting.
                std::thread::sleep(Duration::from_millis(50));
                assert!(!entered_late.load(Ordering::SeqCst));
            });
            // Wait until the drain has closed the gate.
            while gate.try_enter().unwrap().map(drop).is_some() {
                std::thread::yield_now();
            }
            s.spawn(|| {
                let _p = gate.enter().unwrap();
                assert!(
                    drained.load(Ordering::SeqCst),
                    "a writer got in before the drain"
                );
                entered_late.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(30));
            assert!(!drained.load(Ordering::SeqCst), "drain passed live writers");
            drop(a);
            std::thread::sleep(Duration::from_millis(10));
            assert!(
                !drained.load(Ordering::SeqCst),
                "drain passed a live writer"
            );
            drop(b);
        });
        assert!(entered_late.load(Ordering::SeqCst));
        assert_eq!(gate.writers(), 0);
        assert!(gate.try_enter().unwrap().is_some(), "open again");
    }

    #[test]
    fn a_sealed_gate_refuses_new_writers_and_wakes_waiting_ones() {
        let gate = WriteGate::new();
        let inside = gate.enter().unwrap();
        let refused = AtomicBool::new(false);
        std::thread::scope(|s| {
            // A drain closes the gate and waits for the writer inside.
            s.spawn(|| drop(gate.drain()));
            while gate.try_enter().unwrap().map(drop).is_some() {
                std::thread::yield_now();
            }
            // A writer waits at the closed gate, then is refused once it is sealed.
            let waiter = s.spawn(|| refused.store(gate.enter().is_err(), Ordering::SeqCst));
            std::thread::sleep(Duration::from_millis(20));
            gate.seal();
            waiter.join().unwrap();
            drop(inside);
        });
        assert!(
            refused.load(Ordering::SeqCst),
            "a waiting writer was refused"
        );
        assert!(gate.is_sealed());
        assert_eq!(gate.try_enter().unwrap_err(), Sealed);
        assert_eq!(gate.writers(), 0);
        // A drain still works on a sealed gate (the final epoch's freeze).
        drop(gate.drain());
    }

    #[test]
    fn drains_do_not_overlap() {
        let gate = WriteGate::new();
        let first = gate.drain();
        let second_done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _d = gate.drain();
                second_done.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(30));
            assert!(!second_done.load(Ordering::SeqCst));
            drop(first);
        });
        assert!(second_done.load(Ordering::SeqCst));
    }
}
