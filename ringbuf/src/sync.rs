//! The synchronisation primitives the crate is built on: `std`'s normally, loom's
//! under `--cfg loom` so the models in `loom_models.rs` can explore every
//! interleaving and every weak-memory outcome of the same code.
//!
//! Only what the crate uses is re-exported. `UnsafeCell` follows loom's closure API
//! (`with` / `with_mut`) so loom can check that slot accesses never overlap; the std
//! version compiles down to a plain pointer.

#[cfg(loom)]
pub(crate) use loom::{
    cell::UnsafeCell,
    sync::{Arc, Mutex},
};

#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex};

pub(crate) mod atomic {
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
    #[cfg(not(loom))]
    pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
}

pub(crate) mod thread {
    #[cfg(loom)]
    pub(crate) use loom::thread::{current, park, Thread};
    #[cfg(not(loom))]
    pub(crate) use std::thread::{current, park, park_timeout, Thread};

    /// loom has no clock, so a timed park is modelled as a yield. That is one of the
    /// outcomes `std::thread::park_timeout` allows anyway (it may return early, for no
    /// reason), so callers that are correct under std stay correct here.
    #[cfg(loom)]
    pub(crate) fn park_timeout(_timeout: std::time::Duration) {
        loom::thread::yield_now();
    }
}

/// `std::cell::UnsafeCell` behind loom's closure API.
#[cfg(not(loom))]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Calls `f` with a pointer for reading the contents.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Calls `f` with a pointer for writing the contents.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
