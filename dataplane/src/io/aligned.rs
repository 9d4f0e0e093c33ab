//! A heap buffer aligned for O_DIRECT.
//!
//! The data path uses the buffer pool of the `ringbuf` crate; this type serves the places
//! that need a few aligned bytes outside it — writing zeros when a disk cannot punch
//! holes, tools, and tests.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::engine::IoBuffer;
use super::DIRECT_IO_ALIGN;

/// An owned, zero-initialised heap buffer whose address is a multiple of
/// [`DIRECT_IO_ALIGN`].
pub struct AlignedBuf {
    /// Start of `len` bytes allocated with `layout()`; owned by this value until drop.
    ptr: NonNull<u8>,
    len: usize,
    /// Index of the registered io_uring buffer that contains these bytes, if the owner
    /// registered them.
    fixed_index: Option<u16>,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Box<[u8]>`); no other value
// holds the pointer, so moving it to another thread moves sole ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the bytes (`Deref`); writes need
// `&mut self`, so `&AlignedBuf` is as thread-safe as `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`DIRECT_IO_ALIGN`].
    ///
    /// # Panics
    /// If `len` is zero or too large for a `Layout`; aborts like `Vec` if the allocator
    /// fails.
    pub fn zeroed(len: usize) -> AlignedBuf {
        assert!(len > 0, "an aligned buffer must not be empty");
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (asserted above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len,
            fixed_index: None,
        }
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, DIRECT_IO_ALIGN) {
            Ok(layout) => layout,
            Err(_) => panic!("aligned buffer of {len} bytes is too large"),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty buffers cannot be created.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Marks the buffer as lying inside registered io_uring buffer `index` (or not).
    ///
    /// This is safe because the kernel checks the range: a wrong index fails the I/O with
    /// `EFAULT` instead of touching other memory.
    pub fn set_fixed_index(&mut self, index: Option<u16>) {
        self.fixed_index = index;
    }

    /// The `iovec` describing these bytes, for registering them with an engine.
    pub fn iovec(&mut self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: self.len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with this same layout and is freed
        // only here, once. Engines never drop a buffer the kernel may still write: they
        // hand it back only after its completion was reaped.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` bytes owned by `self` and initialised at allocation
        // (zeroed) and afterwards only by byte writes; the shared borrow of `self` keeps
        // them alive and, since engines own the value while the kernel writes, unaliased.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("fixed_index", &self.fixed_index)
            .finish()
    }
}

// SAFETY: the bytes live on the heap, so the address does not change when the value
// moves; they stay allocated until the value is dropped, and only the holder of the value
// (the engine, while the I/O is in flight) touches them.
unsafe impl IoBuffer for AlignedBuf {
    fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn capacity(&self) -> usize {
        self.len
    }

    fn fixed_index(&self) -> Option<u16> {
        self.fixed_index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [1, 512, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }
}
