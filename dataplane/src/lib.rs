//! ferry's data plane: the io_uring source engine, the wire protocol and the target
//! writer. The source engine and the target writer share only [`protocol`], [`io`]
//! and the small common pieces ([`buffers`], [`durable`], [`config`], [`psk`], [`chain`]).
//! The target writer lives in [`writer`] (not `target`: that name is Cargo's build
//! directory, which tools skip).

pub mod buffers;
pub mod config;
pub mod durable;
pub mod io;
pub mod protocol;
pub mod psk;
pub mod source;
pub mod writer;

/// Formats an error with its sources, one after another, for logs and for the peer.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl From<config::IoEngineKind> for io::EngineKind {
    fn from(k: config::IoEngineKind) -> Self {
        match k {
            config::IoEngineKind::Auto => io::EngineKind::Auto,
            config::IoEngineKind::Uring => io::EngineKind::Uring,
            config::IoEngineKind::Sync => io::EngineKind::Sync,
        }
    }
}
