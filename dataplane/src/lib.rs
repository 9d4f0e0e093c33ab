//! ferry's data plane: the io_uring source engine, the wire protocol and the target
//! writer. The source engine and the target writer share only [`protocol`], [`io`]
//! and the small common pieces ([`buffers`], [`durable`], [`config`], [`psk`]).

pub mod buffers;
pub mod config;
pub mod durable;
pub mod io;
pub mod protocol;
pub mod psk;
pub mod source;
pub mod target;

impl From<config::IoEngineKind> for io::EngineKind {
    fn from(k: config::IoEngineKind) -> Self {
        match k {
            config::IoEngineKind::Auto => io::EngineKind::Auto,
            config::IoEngineKind::Uring => io::EngineKind::Uring,
            config::IoEngineKind::Sync => io::EngineKind::Sync,
        }
    }
}
