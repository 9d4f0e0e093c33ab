//! ferry's data plane: the io_uring source engine ([`source`]), the wire protocol
//! ([`protocol`]) and the target writer ([`writer`]; not `target`: that name is Cargo's
//! build directory, which tools skip). The source engine and the target writer share
//! only [`protocol`], [`io`] and the small common pieces ([`buffers`], [`durable`],
//! [`config`], [`psk`], [`chain`]); [`utc`] prints times for the writer and the CLI.
//!
//! Two crates hold what this one shares with the shim, which it never links: the
//! contract (`filter-driver-shim-contract`: the bitmap format, `GenerationId`, the
//! epoch view, the control protocol's types) and `ferry-io` (`dataplane/io/`: durable
//! writes, io_uring probes, error chains, fault injection, `FERRY_REQUIRE`).

pub mod buffers;
pub mod config;
pub mod durable;
pub mod io;
pub mod metrics;
pub mod protocol;
pub mod psk;
pub mod source;
pub mod utc;
pub mod writer;

/// Formats an error with its sources on one line ([`ferry_io::chain`]).
pub use ferry_io::chain;

impl From<config::IoEngineKind> for io::EngineKind {
    fn from(k: config::IoEngineKind) -> Self {
        match k {
            config::IoEngineKind::Auto => io::EngineKind::Auto,
            config::IoEngineKind::Uring => io::EngineKind::Uring,
            config::IoEngineKind::Sync => io::EngineKind::Sync,
        }
    }
}
