//! A bounded pool of reusable I/O buffers for one NBD connection.
//!
//! Buffers keep their capacity when they come back, so a steady workload (4 KiB random
//! writes, 256 KiB copies, 1 MiB sequential writes) stops allocating after its first
//! few requests. The pool also bounds the payload bytes a connection holds in flight:
//! a reader that would exceed [`MAX_IN_FLIGHT_BYTES`] waits, which pushes back on the
//! client through the socket instead of growing memory.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::nbd::proto::MAX_PAYLOAD_BYTES;

/// Payload bytes one connection may hold in buffers at once: two maximum-size
/// requests, or 16 384 requests of 4 KiB — far more than any client's queue depth.
pub const MAX_IN_FLIGHT_BYTES: usize = 2 * MAX_PAYLOAD_BYTES as usize;
/// Free buffers kept for reuse; matches the deepest queue a client is likely to use
/// (fio iodepth 32 ×2 for replies still being written).
pub const MAX_FREE_BUFFERS: usize = 64;
/// A returning buffer larger than this is freed rather than kept, so one 32 MiB
/// request does not pin 32 MiB per pooled slot forever.
pub const MAX_RETAINED_BUFFER_BYTES: usize = 4 << 20;

const _: () = assert!(MAX_IN_FLIGHT_BYTES >= MAX_PAYLOAD_BYTES as usize);

struct PoolState {
    /// Buffers ready for reuse. Each is fully initialised up to its `len()`.
    free: Vec<Vec<u8>>,
    /// Sum of `len` over buffers handed out and not yet returned.
    in_flight_bytes: usize,
}

/// A pool shared by the threads of one connection.
pub struct BufferPool {
    state: Mutex<PoolState>,
    returned: Condvar,
}

/// A buffer of exactly the requested length; goes back to its pool when dropped.
pub struct PooledBuf {
    /// Initialised storage, at least `len` bytes; only `..len` is exposed.
    storage: Vec<u8>,
    len: usize,
    /// What `get` charged to the in-flight budget; `truncate` does not change it.
    charged: usize,
    pool: Arc<BufferPool>,
}

impl BufferPool {
    /// A pool with `prealloc` buffers of `prealloc_bytes` each allocated up front.
    pub fn new(prealloc: usize, prealloc_bytes: usize) -> Arc<BufferPool> {
        let mut free = Vec::with_capacity(MAX_FREE_BUFFERS);
        for _ in 0..prealloc.min(MAX_FREE_BUFFERS) {
            free.push(vec![0u8; prealloc_bytes]);
        }
        Arc::new(BufferPool {
            state: Mutex::new(PoolState {
                free,
                in_flight_bytes: 0,
            }),
            returned: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding this lock leaves only plain data behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` bytes (contents unspecified), waiting while the connection
    /// already holds [`MAX_IN_FLIGHT_BYTES`]. A single request larger than the budget
    /// is let through when nothing else is in flight, so it cannot wait forever.
    pub fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut state = self.lock();
        while state.in_flight_bytes > 0 && state.in_flight_bytes + len > MAX_IN_FLIGHT_BYTES {
            state = self.returned.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.in_flight_bytes += len;
        // Best fit is not worth a scan: take the most recently returned buffer, which
        // under a uniform workload already has the right size.
        let mut storage = state.free.pop().unwrap_or_default();
        drop(state);
        if storage.len() < len {
            // Growth happens only until the pool has seen the workload's largest size.
            storage.resize(len, 0);
        }
        PooledBuf {
            storage,
            len,
            charged: len,
            pool: Arc::clone(self),
        }
    }

    fn put(&self, mut storage: Vec<u8>, len: usize) {
        let mut state = self.lock();
        state.in_flight_bytes -= len;
        if storage.len() > MAX_RETAINED_BUFFER_BYTES {
            storage = Vec::new();
        }
        if state.free.len() < MAX_FREE_BUFFERS && storage.capacity() > 0 {
            state.free.push(storage);
        }
        drop(state);
        self.returned.notify_all();
    }

    /// Payload bytes currently handed out.
    pub fn in_flight_bytes(&self) -> usize {
        self.lock().in_flight_bytes
    }
}

impl PooledBuf {
    /// Shortens the visible length (e.g. a block-status reply smaller than reserved).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[..self.len]
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let storage = std::mem::take(&mut self.storage);
        self.pool.put(storage, self.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_budget_returns() {
        let pool = BufferPool::new(2, 4096);
        let mut a = pool.get(4096);
        a[0] = 7;
        let ptr = a.as_ptr();
        assert_eq!(pool.in_flight_bytes(), 4096);
        drop(a);
        assert_eq!(pool.in_flight_bytes(), 0);
        let mut b = pool.get(100);
        assert_eq!(b.as_ptr(), ptr, "the returned buffer is reused");
        assert_eq!(b.len(), 100);
        b.truncate(10);
        assert_eq!(b.len(), 10);
        drop(b);
        assert_eq!(pool.in_flight_bytes(), 0);
        let big = pool.get(MAX_RETAINED_BUFFER_BYTES + 1);
        drop(big);
        assert!(pool
            .lock()
            .free
            .iter()
            .all(|f| f.len() <= MAX_RETAINED_BUFFER_BYTES));
    }
}
