//! Pool slots as I/O buffers: the glue between `ringbuf`'s pool and the I/O engines.

use ferry_ringbuf::pool::Slot;

use crate::io::IoBuffer;

// SAFETY: a slot's bytes live in the pool's single heap allocation, not inline in the
// `Slot` value, so its address is stable across moves; the pool keeps that allocation
// alive while any slot exists (it holds an `Arc` to it); and owning the `Slot` is the
// only way to reach its bytes, so while the engine holds it nothing else touches them.
// Its fixed index is the slot's index in its pool: registered buffer `i` is slot `i` of
// the pool an [`IovecTable`] was built with ([`IovecTable::with_first_pool`]), the only
// pool whose slots engines take whole. A slot of a later pool is reached through a
// [`SlotView`], which carries the pool's [`FixedBase`]. (Were a slot of another pool
// passed whole, the kernel would refuse the request with EFAULT: the index names a
// registered buffer that does not contain the slot's bytes.)
unsafe impl IoBuffer for Slot {
    fn as_ptr(&self) -> *const u8 {
        Slot::as_ptr(self)
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        Slot::as_mut_ptr(self)
    }
    fn capacity(&self) -> usize {
        Slot::capacity(self)
    }
    fn fixed_index(&self) -> Option<u16> {
        u16::try_from(self.index()).ok()
    }
}

/// A window into a slot that the applier keeps alive elsewhere, so that one receive
/// buffer can feed several writes at once.
pub struct SlotView {
    ptr: *mut u8,
    len: usize,
    fixed_index: Option<u16>,
}

// SAFETY: a view is only a pointer and a length; the bytes it names belong to a slot
// that stays owned by the thread that created the view (see `SlotView::new`).
unsafe impl Send for SlotView {}

impl SlotView {
    /// A view of `slot[at..at + len]` registered as buffer `base + slot.index()`, where
    /// `base` is what [`IovecTable`] answered when the slot's pool was registered.
    ///
    /// # Safety
    ///
    /// The caller keeps `slot` alive, unmoved in ownership terms (not released to its
    /// pool, not written through), until every I/O using the view has completed and the
    /// view was dropped.
    pub unsafe fn new(slot: &mut Slot, at: usize, len: usize, base: FixedBase) -> Self {
        assert!(at + len <= slot.capacity(), "view past the end of its slot");
        SlotView {
            // SAFETY: `at + len <= capacity` was asserted, so the offset pointer stays in
            // bounds of the slot's allocation.
            ptr: unsafe { slot.as_mut_ptr().add(at) },
            len,
            fixed_index: u16::try_from(slot.index())
                .ok()
                .and_then(|i| i.checked_add(base.0)),
        }
    }
}

// SAFETY: the address is a fixed position inside a pool allocation (stable across moves),
// valid for `len` bytes while the owning slot lives, which `SlotView::new`'s contract
// extends past the I/O; the applier does not touch the slot's bytes while views are in
// flight.
unsafe impl IoBuffer for SlotView {
    fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    fn capacity(&self) -> usize {
        self.len
    }
    fn fixed_index(&self) -> Option<u16> {
        self.fixed_index
    }
}

/// Where a pool's slots start among the registered buffers: slot `i` of the pool is
/// registered buffer `base + i`. Only [`IovecTable`] makes one, when it registers the
/// pool, so a view's index cannot be computed by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedBase(u16);

/// The iovecs of one or more pools, in slot order, for io_uring buffer registration:
/// slot `i` of the first pool is registered buffer `i` (so its slots can be passed to an
/// engine whole), each later pool follows at the [`FixedBase`] its registration returns.
pub struct IovecTable(Vec<libc::iovec>);

// SAFETY: the table holds only addresses and lengths of pool memory; it is never
// dereferenced by Rust code, only handed to the kernel at registration. The pools it
// describes are owned elsewhere and outlive every engine registered with it.
unsafe impl Send for IovecTable {}
// SAFETY: as above; shared access only reads the addresses.
unsafe impl Sync for IovecTable {}

impl IovecTable {
    /// A table whose registered buffer `i` is slot `i` of the pool behind `first`.
    pub fn with_first_pool(first: ferry_ringbuf::pool::PoolRegion) -> Self {
        let mut table = IovecTable(Vec::new());
        table.push_pool(first);
        table
    }

    /// Appends one iovec per slot of the pool behind `region`; returns where its slots
    /// start among the registered buffers.
    pub fn push_pool(&mut self, region: ferry_ringbuf::pool::PoolRegion) -> FixedBase {
        let base = FixedBase(u16::try_from(self.0.len()).unwrap_or(u16::MAX));
        self.0
            .extend((0..region.slot_count as u32).map(|i| libc::iovec {
                iov_base: region.slot_ptr(i).cast(),
                iov_len: region.slot_size,
            }));
        base
    }

    /// Where the first pool's slots start: buffer 0.
    pub fn first_base() -> FixedBase {
        FixedBase(0)
    }

    /// For registration with an engine.
    ///
    /// # Safety
    ///
    /// The caller keeps every pool in the table alive until every engine built with the
    /// result is dropped, and touches pool memory only through slots (see
    /// [`crate::io::FixedBuffers::new`]).
    pub unsafe fn fixed(&self) -> crate::io::FixedBuffers<'_> {
        // SAFETY: forwarded to our caller, see above.
        unsafe { crate::io::FixedBuffers::new(&self.0) }
    }
}
