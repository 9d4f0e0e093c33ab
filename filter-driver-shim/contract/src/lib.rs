//! Everything ferry's filter shim and its engine must agree on, and nothing else.
//!
//! The shim (`filter-driver-shim`) writes what the engine (`dataplane`) reads: bitmap
//! files, epoch state maps, control replies. Both depend on this crate and neither on
//! the other, so the engine does not link the shim's NBD server or I/O engines, and a
//! change to the contract is a change to one crate that both sides compile against.
//!
//! * [`bitmap`] — the changed-block bitmap and its file format (`docs/bitmap-format.md`).
//! * [`generation`] — [`GenerationId`]: 16 bytes on disk and on the wire, 32 hex digits
//!   in text and JSON.
//! * [`epoch`] — a frozen epoch's shared state map, its files and the engine's
//!   [`EpochView`](epoch::EpochView).
//! * [`granules`] — which 4 KiB granules of each changed block changed (in memory in
//!   the shim, one file per frozen epoch for the engine).
//! * [`control`] — the control socket's requests ([`Request`](control::Request)) and
//!   replies, and how they may change compatibly.

pub mod bitmap;
pub mod control;
pub mod engine_status;
pub mod epoch;
pub mod generation;
pub mod granules;

pub use generation::GenerationId;
