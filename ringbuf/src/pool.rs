//! Page-aligned buffer pool for io_uring registered buffers.
//!
//! [`BufferPool::new`] makes one zeroed allocation of `slot_count` slots of
//! `slot_size` bytes each, aligned to [`SLOT_ALIGN`], and splits the right to use it
//! between two handles: [`PoolAlloc`] hands slots out on one thread, [`PoolReturn`]
//! takes them back on (at most) one other thread. Free slot indices travel from
//! the returning thread to the allocating thread through an [`spsc`]
//! ring that is large enough for every slot, so a release never fails and neither
//! side takes a lock or allocates.
//!
//! ```
//! use ferry_ringbuf::pool::{BufferPool, SLOT_ALIGN};
//!
//! let (mut alloc, mut release) = BufferPool::new(64 * 1024, 32)?;
//! // Register `region.slot_ptr(i)` (`region.slot_size` bytes each) for every slot
//! // with io_uring once; `slot.index()` is then the fixed-buffer index.
//! let region = alloc.region();
//! let mut slot = alloc.alloc().expect("all slots are free");
//! assert_eq!(slot.as_ptr(), region.slot_ptr(slot.index()).cast_const());
//! assert_eq!(slot.as_ptr() as usize % SLOT_ALIGN, 0);
//! slot.as_mut_slice()[..5].copy_from_slice(b"ferry");
//! // The completion thread gives the slot back.
//! std::thread::spawn(move || release.release(slot)).join().unwrap();
//! assert!(alloc.alloc_wait().is_some());
//! # Ok::<(), ferry_ringbuf::pool::PoolError>(())
//! ```
//!
//! # Ownership of the bytes
//!
//! A [`Slot`] is the only way to reach its bytes, and every slot index is in exactly
//! one place: in the free ring, or in one `Slot` value (which is neither `Clone` nor
//! `Copy`). Holding a `Slot` therefore means owning its bytes, and `&Slot` /
//! `&mut Slot` give shared / exclusive access like any owned buffer. The kernel is
//! the one exception the type system cannot see: while an I/O on a slot is in flight
//! the caller keeps the `Slot` aside (in its in-flight table, say) and does not touch
//! its bytes until the completion is reaped.
//!
//! # Lifetime of the memory
//!
//! The allocation is freed when the last of the two handles and all slots are gone.
//! The region reported by [`PoolAlloc::region`] (what io_uring registers) is valid
//! exactly that long: keep a handle alive until the buffers are unregistered or the
//! ring is closed.
//!
//! # Slots dropped instead of released
//!
//! Dropping a `Slot` without [`PoolReturn::release`] is a bug in the caller, but not
//! a memory-safety one: the slot is lost to the pool (never handed out again, so it
//! is never used twice) and its bytes are freed with the rest of the region.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

use crate::spsc::{self, Consumer, Producer, PushError};
use crate::sync::Arc;

/// Alignment and granularity of every slot, in bytes.
///
/// 4096 is the page size of the x86_64 and aarch64 Linux machines ferry runs on, and
/// a multiple of every logical block size `O_DIRECT` asks for (512 or 4096), so any
/// slot can be the target of a direct read or write without a bounce buffer.
/// io_uring pins registered buffers by page, so no two slots share a pinned page.
pub const SLOT_ALIGN: usize = 4096;

/// Largest slot, in bytes: the kernel refuses to register an io_uring buffer larger
/// than 1 GiB.
pub const MAX_SLOT_SIZE: usize = 1 << 30;

/// Most slots in one pool: `IORING_MAX_REG_BUFFERS` (2^14), the kernel's limit on
/// buffers registered with one io_uring since Linux 5.13. Older kernels allow
/// `UIO_MAXIOV` (1024); there registration, not the pool, reports the excess.
pub const MAX_SLOT_COUNT: usize = 1 << 14;

const _: () = assert!(SLOT_ALIGN.is_power_of_two());
const _: () = assert!(MAX_SLOT_SIZE % SLOT_ALIGN == 0);
// Slot indices are `u32`.
const _: () = assert!(MAX_SLOT_COUNT <= u32::MAX as usize);
// The free ring holds every slot at once, so a release can never find it full.
const _: () = assert!(MAX_SLOT_COUNT <= spsc::MAX_CAPACITY);

/// Why a pool could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// `slot_size` is zero, not a multiple of [`SLOT_ALIGN`], or above
    /// [`MAX_SLOT_SIZE`].
    SlotSize {
        /// The requested slot size, in bytes.
        slot_size: usize,
    },
    /// `slot_count` is zero or above [`MAX_SLOT_COUNT`].
    SlotCount {
        /// The requested number of slots.
        slot_count: usize,
    },
    /// `slot_size * slot_count` does not fit this machine's address space.
    TooLarge {
        /// The requested slot size, in bytes.
        slot_size: usize,
        /// The requested number of slots.
        slot_count: usize,
    },
    /// The allocator could not provide the region.
    Alloc {
        /// Size of the region that was asked for, in bytes.
        size_bytes: usize,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SlotSize { slot_size } => write!(
                f,
                "buffer pool slot size {slot_size} bytes is not a non-zero multiple of \
                 {SLOT_ALIGN} up to {MAX_SLOT_SIZE}"
            ),
            Self::SlotCount { slot_count } => write!(
                f,
                "buffer pool slot count {slot_count} is not between 1 and {MAX_SLOT_COUNT}"
            ),
            Self::TooLarge {
                slot_size,
                slot_count,
            } => write!(
                f,
                "buffer pool of {slot_count} slots of {slot_size} bytes exceeds the \
                 address space"
            ),
            Self::Alloc { size_bytes } => write!(
                f,
                "could not allocate a {size_bytes}-byte buffer pool (lower slot_count \
                 or slot_size, or check the memory limit)"
            ),
        }
    }
}

impl std::error::Error for PoolError {}

/// The region behind every slot; freed when the last `Arc` to it goes.
struct PoolMemory {
    /// Start of the region, `SLOT_ALIGN`-aligned, `layout.size()` bytes, zeroed at
    /// creation. Owned by this struct and freed in its drop.
    base: NonNull<u8>,
    layout: Layout,
    /// Bytes per slot; a non-zero multiple of `SLOT_ALIGN`, at most `MAX_SLOT_SIZE`.
    slot_size: usize,
    /// Number of slots; `1..=MAX_SLOT_COUNT`.
    slot_count: u32,
}

// SAFETY: `PoolMemory` itself never reads or writes the region (apart from freeing
// it when nothing else refers to it); every byte access goes through the one `Slot`
// that owns that byte range, on whichever thread holds the `Slot`.
unsafe impl Send for PoolMemory {}
// SAFETY: as above: `&PoolMemory` only exposes the immutable geometry and the base
// address, not the bytes.
unsafe impl Sync for PoolMemory {}

impl Drop for PoolMemory {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc_zeroed(self.layout)` and is freed only here,
        // once: this is the last reference, and every `Slot` holds one, so no slot
        // (and no borrow of its bytes) outlives this point.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

impl Slot {
    /// Makes the `Slot` for `index` of `memory`; the caller guarantees that it holds
    /// the only copy of `index` (it was just taken off the free ring).
    fn new(memory: &Arc<PoolMemory>, index: u32) -> Self {
        assert!(
            index < memory.slot_count,
            "slot index {index} out of range for a pool of {} slots",
            memory.slot_count
        );
        let offset = index as usize * memory.slot_size;
        // SAFETY: `index < slot_count`, so `offset + slot_size <= layout.size()` and
        // the pointer stays inside the region (which fits in `isize` by `Layout`).
        let ptr = unsafe { memory.base.add(offset) };
        Self {
            memory: Arc::clone(memory),
            ptr,
            index,
        }
    }
}

/// Constructor of a buffer pool; the pool itself is the pair of handles it returns.
#[derive(Debug)]
pub enum BufferPool {}

impl BufferPool {
    /// Allocates `slot_count` zeroed slots of `slot_size` bytes in one region aligned
    /// to [`SLOT_ALIGN`], all of them free.
    ///
    /// Allocation happens here, once; nothing on the alloc/release path allocates.
    #[allow(clippy::new_ret_no_self)] // The pool has no value of its own: its two handles are the pool.
    pub fn new(slot_size: usize, slot_count: usize) -> Result<(PoolAlloc, PoolReturn), PoolError> {
        if slot_size == 0 || slot_size % SLOT_ALIGN != 0 || slot_size > MAX_SLOT_SIZE {
            return Err(PoolError::SlotSize { slot_size });
        }
        if slot_count == 0 || slot_count > MAX_SLOT_COUNT {
            return Err(PoolError::SlotCount { slot_count });
        }
        let layout = slot_size
            .checked_mul(slot_count)
            .and_then(|size_bytes| Layout::from_size_align(size_bytes, SLOT_ALIGN).ok())
            .ok_or(PoolError::TooLarge {
                slot_size,
                slot_count,
            })?;
        // SAFETY: `layout` has a non-zero size (both factors are at least 1).
        let base = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(base).ok_or(PoolError::Alloc {
            size_bytes: layout.size(),
        })?;
        let memory = Arc::new(PoolMemory {
            base,
            layout,
            slot_size,
            slot_count: u32::try_from(slot_count).expect("MAX_SLOT_COUNT fits in u32"),
        });

        let (mut free_tx, free_rx) = spsc::channel(slot_count);
        for index in 0..memory.slot_count {
            if let Err(PushError::Full(index)) = free_tx.push(index) {
                unreachable!("free ring of {slot_count} slots is full at index {index}");
            }
        }
        let alloc = PoolAlloc {
            memory: Arc::clone(&memory),
            free: free_rx,
        };
        let release = PoolReturn {
            memory,
            free: free_tx,
        };
        Ok((alloc, release))
    }
}

/// One slot of a pool: exclusive ownership of `capacity()` bytes aligned to
/// [`SLOT_ALIGN`].
///
/// Give it back with [`PoolReturn::release`]; a slot that is dropped instead is lost
/// to the pool (see the [module docs](self)). It keeps the pool's memory alive, so it
/// may outlive both handles.
pub struct Slot {
    /// Keeps the region alive while the slot exists.
    memory: Arc<PoolMemory>,
    /// `memory.base + index * slot_size`; the first of the `slot_size` bytes this
    /// slot owns.
    ptr: NonNull<u8>,
    /// Position in the pool; `< memory.slot_count`, held by no other `Slot`.
    index: u32,
}

// SAFETY: a `Slot` owns its byte range outright (no other `Slot` covers it and the
// pool does not touch it), so moving the `Slot` to another thread moves that
// ownership; the `Arc` keeps the region alive wherever the slot goes.
unsafe impl Send for Slot {}

impl Slot {
    /// Position of the slot in its pool, in `0..slot_count`: the buffer index to use
    /// with io_uring's fixed-buffer operations after registering
    /// [`PoolAlloc::region`] slot by slot.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Size of the slot, in bytes (the pool's `slot_size`).
    pub fn capacity(&self) -> usize {
        self.memory.slot_size
    }

    /// Start of the slot's bytes, for reading. Aligned to [`SLOT_ALIGN`].
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the slot's bytes, for writing (e.g. the target of a read I/O).
    /// Aligned to [`SLOT_ALIGN`]. While the kernel may write through it, do not read
    /// the slot through [`Slot::as_slice`].
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The slot's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the slot owns these `capacity()` bytes (see the module docs), they
        // are initialised (zeroed at creation, and only ever written as bytes), and the
        // `Arc` in `self` keeps them allocated for the borrow. `&self` rules out a
        // `&mut` to them for as long as the slice lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity()) }
    }

    /// The slot's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`; `&mut self` makes this the only borrow of the
        // bytes while it lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity()) }
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("index", &self.index)
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// Where the pool's memory lies, for registering it with io_uring.
///
/// Slot `i` starts at `base_ptr + i * slot_size`. The memory is valid while any
/// handle or [`Slot`] of the pool lives; only the kernel should access it through
/// these pointers (Rust code goes through a [`Slot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolRegion {
    /// Start of slot 0, aligned to [`SLOT_ALIGN`].
    pub base_ptr: *mut u8,
    /// Bytes per slot.
    pub slot_size: usize,
    /// Number of slots.
    pub slot_count: usize,
}

impl PoolRegion {
    /// Size of the whole region, in bytes.
    pub fn size_bytes(&self) -> usize {
        self.slot_size * self.slot_count
    }

    /// Start of slot `index`, e.g. for one `iovec` per slot.
    ///
    /// # Panics
    ///
    /// If `index` is not below `slot_count`.
    pub fn slot_ptr(&self, index: u32) -> *mut u8 {
        let index = index as usize;
        assert!(
            index < self.slot_count,
            "slot index {index} out of range for a pool of {} slots",
            self.slot_count
        );
        self.base_ptr.wrapping_add(index * self.slot_size)
    }
}

/// The allocating handle of a pool; see [`BufferPool::new`].
pub struct PoolAlloc {
    memory: Arc<PoolMemory>,
    /// Indices of the free slots; filled by [`PoolReturn`].
    free: Consumer<u32>,
}

impl PoolAlloc {
    /// Takes a free slot, or returns `None` if all are in use.
    pub fn alloc(&mut self) -> Option<Slot> {
        self.free.pop().map(|index| Slot::new(&self.memory, index))
    }

    /// Takes a free slot, sleeping until one is released if all are in use.
    ///
    /// Returns `None` only when the [`PoolReturn`] is gone and no free slot is left,
    /// since then none can come back. It cannot detect the other deadlock: every slot
    /// held (or dropped) by the calling thread itself while the `PoolReturn` lives.
    pub fn alloc_wait(&mut self) -> Option<Slot> {
        self.free
            .pop_wait()
            .map(|index| Slot::new(&self.memory, index))
    }

    /// The pool's memory, for registering every slot with io_uring once.
    pub fn region(&self) -> PoolRegion {
        PoolRegion {
            base_ptr: self.memory.base.as_ptr(),
            slot_size: self.memory.slot_size,
            slot_count: self.slot_count(),
        }
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.memory.slot_size
    }

    /// Number of slots in the pool (free or not).
    pub fn slot_count(&self) -> usize {
        self.memory.slot_count as usize
    }
}

impl fmt::Debug for PoolAlloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolAlloc")
            .field("slot_size", &self.slot_size())
            .field("slot_count", &self.slot_count())
            .field("free", &self.free.len())
            .finish()
    }
}

/// The releasing handle of a pool; see [`BufferPool::new`].
pub struct PoolReturn {
    memory: Arc<PoolMemory>,
    /// Indices of the free slots; drained by [`PoolAlloc`].
    free: Producer<u32>,
}

impl PoolReturn {
    /// Gives `slot` back to the pool, waking [`PoolAlloc::alloc_wait`] if it sleeps.
    ///
    /// # Panics
    ///
    /// If `slot` belongs to another pool.
    pub fn release(&mut self, slot: Slot) {
        assert!(
            Arc::ptr_eq(&slot.memory, &self.memory),
            "slot {} released to a pool it was not allocated from",
            slot.index
        );
        // Drop the `Slot` before its index becomes free again, so that at no point
        // do two `Slot`s with the same index exist.
        let index = slot.index;
        drop(slot);
        if let Err(PushError::Full(index)) = self.free.push(index) {
            // Each index is in the ring or in one `Slot`, and the ring holds them all.
            unreachable!("free ring is full while slot {index} is out");
        }
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.memory.slot_size
    }

    /// Number of slots in the pool (free or not).
    pub fn slot_count(&self) -> usize {
        self.memory.slot_count as usize
    }
}

impl fmt::Debug for PoolReturn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolReturn")
            .field("slot_size", &self.slot_size())
            .field("slot_count", &self.slot_count())
            .finish()
    }
}
