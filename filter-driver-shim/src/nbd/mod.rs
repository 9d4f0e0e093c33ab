//! The NBD server the hypervisor attaches to (fixed newstyle, structured replies,
//! `base:allocation`), one export per protected disk.
//!
//! * [`proto`] — wire constants and the pure, fuzzed request/option decoders.
//! * [`handshake`] — option haggling up to the transmission phase.
//! * [`export`] — [`Export`]: one served disk, as every connection to it shares it.
//! * [`connection`] — the transmission phase: a reader thread decodes requests and
//!   hands them to the connection's I/O engine, a writer thread serialises the
//!   replies. Queues between them are bounded, and so are the payload bytes in
//!   flight, so a fast client meets back-pressure on its socket, never unbounded
//!   buffering in the shim.
//! * [`engine`] — the I/O engines behind one trait: [`engine::pool`] (a fixed set of
//!   worker threads) and [`engine::uring`] (one thread and one ring per connection).
//!   Both mark the change tracker first for anything that writes.
//! * [`gate`] — the write gate a freeze drains.
//! * [`client`] — a small NBD client sharing no code with the server: `ferry demo`'s
//!   guest and the tests' sequential writer.

pub mod client;
pub mod connection;
pub mod engine;
pub mod export;
pub mod gate;
pub mod handshake;
pub mod proto;

use std::io;

pub use connection::{serve_connection, Stream};
pub use export::Export;
pub use handshake::{ExportInfo, Negotiated};

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The socket failed or the client hung up mid-message.
    #[error("connection I/O")]
    Io(#[from] io::Error),
    /// The client set flags this server did not offer.
    #[error("client flags {0:#x} include bits the server did not offer")]
    ClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist.
    #[error("client asked for an unknown export with NBD_OPT_EXPORT_NAME")]
    UnknownExport,
    /// A request did not start with the request magic: hard disconnect.
    #[error("malformed request")]
    BadRequest(#[from] proto::BadRequestMagic),
}
