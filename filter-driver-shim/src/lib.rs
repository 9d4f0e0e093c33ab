//! ferry's filter shim: the small, robust piece that sits in the guest's I/O path.
//!
//! The shim serves each protected disk to the hypervisor over NBD and records every
//! written block in a persistent changed-block bitmap. The engine in `dataplane`
//! consumes those bitmaps, so everything both sides must agree on — the bitmap and its
//! on-disk format (`docs/bitmap-format.md`) — lives here and never depends on
//! `dataplane`.

pub mod bitmap;

pub use bitmap::{BitmapError, ChangedBlockBitmap, FileState, GenerationId, Recovery};
