//! ferry's filter shim: the small, robust piece that sits in the guest's I/O path.
//!
//! The shim serves each protected disk to the hypervisor over NBD and records every
//! written block in a persistent changed-block bitmap. The engine in `dataplane`
//! consumes those bitmaps and drives epochs over the control socket; everything both
//! sides must agree on — the bitmap file format (`docs/bitmap-format.md`), generation
//! and epoch ids, the epoch state map and the control protocol's requests and replies —
//! is in the `filter-driver-shim-contract` crate, which both depend on. The engine
//! never links this crate.
//!
//! * [`nbd`] — the NBD server (protocol, handshake, per-connection pipeline, I/O engines).
//! * [`tracker`] — write-intent change tracking over the bitmap file.
//! * [`backing`] — the backing image or block device.
//! * [`pool`] — bounded, reusable I/O buffers.
//! * [`shim`] — [`Shim`], [`serve`]: the running shim (start-up, accept loops, shutdown).
//! * [`disk`] — [`ShimDisk`] (what to serve) and the disk as the running shim serves it.
//! * [`control`] — the control socket: the shim's side of
//!   [`filter_driver_shim_contract::control`].
//! * [`group`] — epochs across the disks of one freeze: freeze, check, commit or abort.
//! * [`epoch`] — frozen epochs: copy-before-write into the state map of
//!   [`filter_driver_shim_contract::epoch`].

pub mod backing;
pub mod control;
pub mod disk;
pub mod epoch;
pub mod group;
pub mod nbd;
pub mod pool;
pub mod shim;
pub mod tracker;

/// The bitmap format is the contract's; inside the shim it keeps its short path.
pub(crate) use filter_driver_shim_contract::{bitmap, granules};

pub use disk::{DiskStatus, ShimDisk};
pub use shim::{serve, Shim, ShimError, MAX_CONNECTIONS_PER_DISK};
pub use tracker::{ResyncReason, TrackerStatus, DEFAULT_BLOCK_SIZE};
