//! Lock-free rings and a registered-buffer pool for ferry's data path.
//!
//! - [`spsc`]: a bounded single-producer/single-consumer ring. Each end is the sole
//!   writer of one index (tail or head), the indices sit on separate cache lines, and
//!   each end caches the other's index, so a push or pop is a slot access plus one
//!   release store and, usually, no cache miss. Optional blocking helpers spin
//!   briefly and then park the thread, with a fence-based handshake that cannot lose
//!   a wake-up; when nobody sleeps they cost no lock and no system call.
//! - [`pool`]: one zeroed, page-aligned allocation cut into fixed-size slots for
//!   io_uring registered buffers. A [`pool::Slot`] owns its bytes; slots go back
//!   from a releasing thread to the allocating thread through an [`spsc`] ring of
//!   slot indices, so neither path locks or allocates.
//!
//! Both are verified beyond unit tests: loom models of the ring, including the
//! park/unpark handshake, live in `src/loom_models.rs` and run with
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p ferry-ringbuf --release --lib
//! ```
//!
//! and the integration tests shrink their iteration counts under Miri.
#![warn(missing_docs)]

pub mod pool;
pub mod spsc;
mod sync;

#[cfg(all(test, loom))]
mod loom_models;
