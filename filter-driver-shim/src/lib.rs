//! ferry's filter shim: the small, robust piece that sits in the guest's I/O path.
//!
//! The shim serves each protected disk to the hypervisor over NBD and records every
//! written block in a persistent changed-block bitmap. The engine in `dataplane`
//! consumes those bitmaps, so everything both sides must agree on — the bitmap and its
//! on-disk format (`docs/bitmap-format.md`) — lives here and never depends on
//! `dataplane`.
//!
//! * [`nbd`] — the NBD server (protocol, handshake, per-connection pipeline, I/O engines).
//! * [`tracker`] — write-intent change tracking over the bitmap file.
//! * [`backing`] — the backing image or block device.
//! * [`pool`] — bounded, reusable I/O buffers.
//! * [`shim`] — [`Shim`], [`serve`]: the running shim (start-up, accept loops, shutdown).
//! * [`disk`] — [`ShimDisk`] (what to serve) and the disk as the running shim serves it.
//! * [`control`] — the control socket protocol.
//! * [`group`] — epochs across the disks of one freeze: freeze, check, commit or abort.
//! * [`epoch`] — frozen epochs: copy-before-write and the state map shared with the engine.

pub mod backing;
pub mod bitmap;
pub mod control;
pub mod disk;
pub mod epoch;
pub mod group;
pub mod nbd;
pub mod pool;
pub mod shim;
pub mod tracker;

pub use bitmap::{BitmapError, ChangedBlockBitmap, FileState, GenerationId, Recovery};
pub use disk::{DiskStatus, ShimDisk};
pub use shim::{serve, Shim, ShimError, MAX_CONNECTIONS_PER_DISK};
pub use tracker::{ResyncReason, TrackerStatus, DEFAULT_BLOCK_SIZE};
