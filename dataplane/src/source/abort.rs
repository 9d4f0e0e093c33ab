//! Aborting the epoch in flight from a signal handler (`ferry source`, second SIGINT):
//! the session's socket is shut down, so the sync fails as if the link broke — the
//! target rolls the epoch back and the shim puts its bits back; nothing is lost.
//!
//! The session publishes its socket here while it runs; the handler only loads an
//! atomic and calls shutdown(2), both async-signal-safe.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

/// The socket of the session in flight, or -1.
static SESSION_FD: AtomicI32 = AtomicI32::new(-1);

/// Publishes `fd` as the session in flight until the guard drops (before the socket
/// closes, so a handler never shuts down a reused descriptor).
pub(crate) fn publish(fd: RawFd) -> Published {
    SESSION_FD.store(fd, Ordering::SeqCst);
    Published
}

pub(crate) struct Published;

impl Drop for Published {
    fn drop(&mut self) {
        SESSION_FD.store(-1, Ordering::SeqCst);
    }
}

/// Breaks the session in flight, if there is one. Async-signal-safe.
pub fn abort_session_in_flight() {
    let fd = SESSION_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: shutdown(2) on a descriptor the session owns and keeps open while it
        // is published; it has no memory effects.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }
}
