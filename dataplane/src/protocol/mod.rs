//! The ferry wire protocol: framing, handshake and message layouts.
//!
//! Shared by the source engine and the target writer — the only code they share besides
//! the I/O layer. Specified in `docs/protocol.md`.

pub mod auth;
pub mod deadline;
pub mod frame;
pub mod manifest;
pub mod wire;
pub mod zstream;

pub use deadline::{tune_socket, DeadlineExceeded, FrameDeadline, TimedStream};
pub use frame::{data_table_extent, FrameReader, FrameWriter, Incoming};
pub use manifest::ManifestBuilder;
pub use wire::*;

/// The first protocol version whose sessions carry several epochs: after Committed the
/// source may send Keepalive frames and the next epoch's Open on the same connection
/// (see docs/protocol.md, "Session"). On a version-2 connection the session ends with
/// its one epoch.
pub const MULTI_EPOCH_VERSION: u16 = 3;

/// Everything that can go wrong on the wire.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A frame was not sent or received within its deadline (`io_timeout_ms`, or the
    /// handshake deadline): the peer or the link stalled.
    #[error("{op}: timed out after {after_ms} ms")]
    TimedOut { op: &'static str, after_ms: u64 },
    #[error("connection truncated: {what}")]
    Truncated { what: &'static str },
    #[error("bad frame magic {found:#010x}: the peer is not speaking the ferry protocol")]
    BadMagic { found: u32 },
    #[error("frame header checksum mismatch: corrupted on the wire")]
    HeaderChecksum,
    #[error("{kind:?} frame payload checksum mismatch: corrupted on the wire")]
    PayloadChecksum { kind: FrameKind },
    /// From [`TABLE_HASH_VERSION`] on, the checksum of a Data frame covers its record
    /// table (block offsets, lengths, codecs, payload offsets and hashes), and that
    /// did not match.
    #[error("Data frame record table checksum mismatch: corrupted on the wire")]
    TableChecksum,
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("{kind:?} frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        kind: FrameKind,
        len: usize,
        max: usize,
    },
    #[error("frame sequence {found}, expected {expected}: a frame was lost or replayed")]
    Sequence { expected: u32, found: u32 },
    #[error("expected a {expected:?} frame, got {found:?}")]
    Unexpected {
        expected: FrameKind,
        found: FrameKind,
    },
    #[error("malformed frame: {what}")]
    Malformed { what: &'static str },
    /// The Committed frame names another epoch than the one committed.
    #[error("malformed frame: target acknowledged epoch {acknowledged} while epoch {committed} was committed")]
    WrongAck { acknowledged: u64, committed: u64 },
    #[error("authentication failed: {detail}")]
    AuthFailed { detail: &'static str },
    #[error(
        "no common protocol version: we speak {offered_min}..={offered_max}, peer offered {peer}"
    )]
    Version {
        offered_min: u16,
        offered_max: u16,
        peer: u16,
    },
    #[error("peer reported {code:?} error: {message}")]
    Remote { code: ErrorCode, message: String },
}

impl ProtocolError {
    /// An I/O failure during `op`; a frame deadline that passed becomes
    /// [`TimedOut`](Self::TimedOut).
    pub fn io(op: &'static str, source: std::io::Error) -> Self {
        match source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<DeadlineExceeded>())
        {
            Some(d) => Self::TimedOut {
                op,
                after_ms: d.after_ms,
            },
            None => Self::Io { op, source },
        }
    }

    /// The error code to report to the peer for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::AuthFailed { .. } => ErrorCode::Auth,
            Self::Version { .. } => ErrorCode::Version,
            Self::Remote { code, .. } => *code,
            Self::Io { .. } | Self::TimedOut { .. } => ErrorCode::Io,
            Self::PayloadChecksum { .. } | Self::TableChecksum | Self::HeaderChecksum => {
                ErrorCode::Integrity
            }
            _ => ErrorCode::Protocol,
        }
    }
}
