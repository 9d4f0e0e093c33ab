//! ferry's data plane: the io_uring source engine, the wire protocol and the target
//! writer. The source engine and the target writer share only [`protocol`], [`io`]
//! and the small common pieces ([`buffers`], [`durable`], [`config`], [`psk`], [`chain`]).
//! The target writer lives in [`writer`] (not `target`: that name is Cargo's build
//! directory, which tools skip). What the shim shares with these processes —
//! durable writes, io_uring probes, error chains, fault injection — is the `ferry-io`
//! crate (`dataplane/io/`), which the shim links without linking this one.

pub mod buffers;
pub mod config;
pub mod durable;
pub mod io;
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
