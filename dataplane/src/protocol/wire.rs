//! Fixed-layout, little-endian wire structures.
//!
//! Every structure here is `#[repr(C)]` over byte-aligned little-endian integers, so it
//! can be read from and written to a byte buffer without copies or padding surprises
//! (zerocopy checks the layout at compile time). `docs/protocol.md` documents each one
//! byte by byte; a change here is a protocol version change.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First four bytes of every frame: "FRY1" read as a little-endian u32.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FRY1");

/// Protocol versions this build speaks. The handshake picks the highest common one.
///
/// Version 2 made Commit carry the epoch's manifest and requires every disk's ranges
/// in increasing offset order across the session. Version 1 is not spoken any more: a
/// target that accepted its bare Commit could not tell a complete epoch from one that
/// lost blocks on the way, so a version-1 peer is refused at the handshake.
///
/// Version 3 lets a Data record carry part of a block ([`GRANULE_RECORDS_VERSION`]).
/// A version-2 peer is still served: its records are whole blocks.
///
/// Version 4 hashes only a Data frame's record table ([`TABLE_HASH_VERSION`]) and adds
/// compression streams ([`STREAM_RECORDS_VERSION`]). Older peers get whole-payload
/// hashes and blocks compressed one by one.
pub const PROTOCOL_VERSION_MIN: u16 = 2;
pub const PROTOCOL_VERSION_MAX: u16 = 4;

/// From this version a Data record may carry any run of 4 KiB granules inside one
/// block (a changed-block epoch sends only what the guest wrote), not only whole
/// blocks: its offset is a multiple of [`RECORD_GRANULE`], it ends inside the same
/// block, and its length is a multiple of the granule unless it ends at the disk's end.
pub const GRANULE_RECORDS_VERSION: u16 = 3;
/// Alignment of a record's offset and length from [`GRANULE_RECORDS_VERSION`] on.
pub const RECORD_GRANULE: u64 = 4096;
/// From this version the payload hash in a Data frame's header covers only the frame's
/// record table ([`data_table_extent`](super::frame::data_table_extent)), not its block
/// payloads: each of those is covered by its record's block hash, which the target
/// checks before anything is written. Every other frame kind hashes its whole payload.
pub const TABLE_HASH_VERSION: u16 = 4;

/// From this version a record may be [`Codec::ZstdStream`]: a chunk of one of the
/// session's zstd streams, so that each block is compressed with the blocks before it
/// as context (a block compressed on its own restarts from nothing 16 times a MiB).
pub const STREAM_RECORDS_VERSION: u16 = 4;
/// Compression streams a session may use: [`BlockRecord::stream`] is below this.
pub const MAX_STREAMS: usize = 16;
/// Largest window (log2 bytes) a compression stream may use: the target keeps one
/// window per stream in use, so a session's decoders hold at most
/// `MAX_STREAMS << STREAM_WINDOW_LOG_MAX` bytes (128 MiB).
pub const STREAM_WINDOW_LOG_MAX: u32 = 23;
/// [`BlockRecord::stream_flags`]: this chunk starts a new zstd frame on its stream;
/// whatever the stream held before is forgotten.
pub const STREAM_START: u8 = 1;

/// Largest frame payload either side accepts: a 4 MiB data batch (the largest
/// `io_size_kib`) plus its record table for 4 KiB blocks (1024 records of 48 bytes,
/// rounded up) plus alignment padding. Anything longer is rejected before it is read.
pub const MAX_FRAME_PAYLOAD: usize = (4 << 20) + (64 << 10);
const _: () = assert!(MAX_FRAME_PAYLOAD.is_multiple_of(4096));

/// Longest disk name on the wire (matches the config's name rule).
pub const MAX_NAME_LEN: usize = 64;
/// Most disks one session may carry; bounds the Open frame.
pub const MAX_DISKS_PER_SESSION: usize = 256;
/// Longest error message carried by an Error frame.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Alignment the sender gives raw block payloads inside a data frame so the target can
/// write them with O_DIRECT straight from its receive buffer.
pub const PAYLOAD_ALIGN: usize = 4096;

/// Frame header: 32 bytes in front of every payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FrameHeader {
    /// [`FRAME_MAGIC`].
    pub magic: U32,
    /// [`FrameKind`] as u8.
    pub kind: u8,
    /// Reserved, zero.
    pub flags: u8,
    /// Reserved, zero.
    pub reserved: U16,
    /// Payload bytes that follow, at most [`MAX_FRAME_PAYLOAD`].
    pub payload_len: U32,
    /// Per-direction frame counter starting at 0; a gap or repeat is a protocol error.
    pub seq: U32,
    /// xxh3-64 of the payload; from [`TABLE_HASH_VERSION`] on, of a Data payload's
    /// record table only ([`data_table_extent`](super::frame::data_table_extent)).
    pub payload_hash: U64,
    /// xxh3-64 of the 24 header bytes before this field.
    pub header_hash: U64,
}
pub const FRAME_HEADER_LEN: usize = core::mem::size_of::<FrameHeader>();
const _: () = assert!(FRAME_HEADER_LEN == 32);

/// What a frame carries. Values are stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// client → server: versions and client nonce.
    Hello = 1,
    /// server → client: chosen version, server nonce, server proof.
    Challenge = 2,
    /// client → server: client proof.
    Auth = 3,
    /// server → client: authentication accepted.
    AuthOk = 4,
    /// client → server: the disks of this session and how each is synced.
    Open = 10,
    /// server → client: per-disk replica state.
    OpenOk = 11,
    /// client → server: hashes of consecutive source blocks (seeded sync).
    Hashes = 20,
    /// client → server: a run of source blocks that are all zero (seeded sync).
    HashZeroRun = 21,
    /// client → server: all hashes of the session were sent.
    HashesDone = 22,
    /// server → client: runs of blocks whose replica content differs.
    DiffRuns = 23,
    /// server → client: the difference report is complete.
    DiffDone = 24,
    /// client → server: a batch of blocks.
    Data = 30,
    /// client → server: a byte range of a disk that must read back as zeros.
    Zero = 31,
    /// client → server: make everything sent so far durable and record the epoch.
    Commit = 40,
    /// server → client: the epoch is durable on every replica disk.
    Committed = 41,
    /// either way: a fatal error with a message; the connection closes after it.
    Error = 50,
    /// client → server, between epochs (version 3): the source is alive and will open
    /// another epoch on this connection.
    Keepalive = 60,
}

impl FrameKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        use FrameKind::*;
        Some(match v {
            1 => Hello,
            2 => Challenge,
            3 => Auth,
            4 => AuthOk,
            10 => Open,
            11 => OpenOk,
            20 => Hashes,
            21 => HashZeroRun,
            22 => HashesDone,
            23 => DiffRuns,
            24 => DiffDone,
            30 => Data,
            31 => Zero,
            40 => Commit,
            41 => Committed,
            50 => Error,
            60 => Keepalive,
            _ => return None,
        })
    }
}

/// Size of handshake nonces and proofs.
pub const NONCE_LEN: usize = 32;

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Hello {
    pub version_min: U16,
    pub version_max: U16,
    pub flags: U32,
    pub nonce: [u8; NONCE_LEN],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Challenge {
    pub version: U16,
    pub reserved: U16,
    pub flags: U32,
    pub nonce: [u8; NONCE_LEN],
    /// keyed BLAKE3 (key = PSK) of "ferry-v1 server" ‖ client nonce ‖ server nonce.
    pub proof: [u8; NONCE_LEN],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Auth {
    /// keyed BLAKE3 (key = PSK) of "ferry-v1 client" ‖ server nonce ‖ client nonce.
    pub proof: [u8; NONCE_LEN],
}

/// How one disk is brought up to date in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SyncMode {
    /// Every data block is sent; holes and zero blocks travel as zero ranges.
    Full = 1,
    /// Hashes are compared first; only differing blocks travel.
    Seeded = 2,
    /// Only the blocks of a changed-block bitmap travel; the replica must hold the
    /// bitmap's base epoch.
    Changed = 3,
    /// Reverse replication after a failover (`ferry reprotect`): the source's changed
    /// blocks since the promotion (and those a failover rolled back), plus the blocks
    /// the target reports it wrote itself since the lineage point (its old primary's
    /// bits, sent as DiffRuns), travel; with hashes when either side cannot vouch for
    /// its set. `generation` is the source's new tracking generation, which the replica
    /// takes; the source checks the replica's reply names the lineage it was promoted
    /// from.
    Reprotect = 4,
}

impl SyncMode {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Full),
            2 => Some(Self::Seeded),
            3 => Some(Self::Changed),
            4 => Some(Self::Reprotect),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Seeded => "seeded",
            Self::Changed => "changed",
            Self::Reprotect => "reprotect",
        }
    }
}

/// Open payload: `OpenHeader` then `disk_count` × `OpenDisk`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OpenHeader {
    /// Epoch this session will commit (monotonic per disk generation).
    pub epoch: U64,
    pub disk_count: U32,
    /// Most bytes of disk one Data frame of this session describes (the source's I/O
    /// size), so the target can size its buffers; 0 means the protocol maximum, 4 MiB.
    pub max_batch_bytes: U32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OpenDisk {
    /// Disk name, zero padded; `name_len` bytes are significant.
    pub name: [u8; MAX_NAME_LEN],
    pub name_len: u8,
    /// [`SyncMode`] as u8.
    pub mode: u8,
    /// `OPEN_*` flags. A target that predates a flag ignores it.
    pub flags: u8,
    pub reserved: u8,
    /// Replication block size in bytes (power of two, 4 KiB ..= 1 MiB).
    pub block_size: U32,
    /// Source disk size in bytes.
    pub disk_size: U64,
    /// Tracking generation of the source disk.
    pub generation: [u8; 16],
    /// For `Changed`: the epoch the replica must hold; for `Reprotect`: the lineage
    /// point the source was promoted at; otherwise zero.
    pub base_epoch: U64,
}

/// OpenOk payload: `disk_count` × `OpenDiskReply`, in the order of the Open.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OpenDiskReply {
    /// 1 = the replica was created for this session (all zeros), 2 = it existed.
    pub state: u8,
    pub reserved: [u8; 7],
    /// Generation of the last epoch committed to this replica (zero if none).
    pub generation: [u8; 16],
    /// Last epoch committed to this replica (zero if none).
    pub epoch: U64,
}

/// [`OpenDisk::flags`]: the operator chose to discard whatever was written to the
/// replica by anything but the target (split brain, see the writer's `stamp`); only a
/// full or seeded sync, which repairs every block, may carry it.
pub const OPEN_DISCARD_REPLICA_CHANGES: u8 = 1;
/// [`OpenDisk::flags`]: the final epoch of a planned failover. Carried by every disk of
/// the session, which must name every disk the target is configured with; once the
/// epoch commits, the target promotes its site (and is fenced) before acknowledging.
/// A target that predates the flag ignores it, so the source checks afterwards that
/// the target refuses sessions.
pub const OPEN_PROMOTE: u8 = 2;

pub const REPLICA_CREATED: u8 = 1;
pub const REPLICA_EXISTING: u8 = 2;
/// In answer to a [`SyncMode::Reprotect`] disk only: the replica exists and holds the
/// lineage, but what was written to it since is not known (its primary's bits were
/// lost): the source must send the hash of every block.
pub const REPLICA_COMPARE: u8 = 3;

/// Hashes payload: `HashesHeader` then `block_count` × 16-byte block hashes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HashesHeader {
    /// Index of the disk in the Open frame.
    pub disk: U32,
    pub block_count: U32,
    pub first_block: U64,
}

/// HashZeroRun payload, DiffRuns entries, and Zero payload share this shape.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiskRun {
    pub disk: U32,
    pub reserved: U32,
    /// First block (HashZeroRun, DiffRuns) or byte offset (Zero).
    pub start: U64,
    /// Block count (HashZeroRun, DiffRuns) or byte length (Zero).
    pub count: U64,
}

/// Most runs one DiffRuns frame carries. The target cuts longer difference lists into
/// more frames; a source must accept a frame of this many runs (98,304 bytes), however
/// the disks differ — up to every other block of a disk, the most runs a disk can have.
pub const MAX_DIFF_RUNS_PER_FRAME: usize = 4096;

/// Largest payload of any frame the target sends before Committed — a full DiffRuns
/// frame, an OpenOk for the most disks, an Error with the longest message — so the
/// source's reply buffer (allocated once per session) holds every one of them.
pub const MAX_REPLY_PAYLOAD: usize = max3(
    MAX_DIFF_RUNS_PER_FRAME * core::mem::size_of::<DiskRun>(),
    MAX_DISKS_PER_SESSION * core::mem::size_of::<OpenDiskReply>(),
    core::mem::size_of::<ErrorHeader>() + MAX_ERROR_MESSAGE,
);
const _: () = assert!(MAX_REPLY_PAYLOAD <= MAX_FRAME_PAYLOAD);

const fn max3(a: usize, b: usize, c: usize) -> usize {
    let ab = if a > b { a } else { b };
    if ab > c {
        ab
    } else {
        c
    }
}

/// Data payload: `DataHeader`, `record_count` × `BlockRecord`, then block payloads at
/// the offsets the records give: anywhere after the table; the sender aligns raw
/// payloads to [`PAYLOAD_ALIGN`] unless padding would cost more than it saves (a compact
/// frame, see `docs/protocol.md`).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DataHeader {
    pub disk: U32,
    pub record_count: U32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlockRecord {
    /// Byte offset on the disk; a multiple of the block size.
    pub offset: U64,
    /// Bytes of disk the block covers (the block size, less at the disk's end).
    pub length: U32,
    /// Bytes of payload in the frame.
    pub stored_len: U32,
    /// Where the payload starts, from the start of the frame payload.
    pub payload_offset: U32,
    /// [`Codec`] as u8.
    pub codec: u8,
    /// [`Codec::ZstdStream`]: the compression stream the chunk belongs to, below
    /// [`MAX_STREAMS`]; zero otherwise.
    pub stream: u8,
    /// [`Codec::ZstdStream`]: [`STREAM_START`] or zero; zero otherwise.
    pub stream_flags: u8,
    pub reserved: u8,
    /// xxh3-128 of the block's uncompressed bytes, as read at the source.
    pub hash: [u8; 16],
    pub reserved2: U64,
}
pub const BLOCK_RECORD_LEN: usize = core::mem::size_of::<BlockRecord>();
const _: () = assert!(BLOCK_RECORD_LEN == 48);

/// How a block's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// `stored_len == length` bytes of the block as is.
    Raw = 0,
    /// A zstd frame that decompresses to `length` bytes.
    Zstd = 1,
    /// No payload: the block reads as zeros.
    Zero = 2,
    /// A chunk of the zstd stream [`BlockRecord::stream`] that decompresses to
    /// `length` bytes, decoded after every earlier chunk of that stream on this
    /// connection, in the order they were sent ([`STREAM_RECORDS_VERSION`] on). The
    /// compressor flushed at the chunk's end, so the chunk decodes whole.
    ZstdStream = 3,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Raw),
            1 => Some(Self::Zstd),
            2 => Some(Self::Zero),
            3 => Some(Self::ZstdStream),
            _ => None,
        }
    }

    /// Whether the payload is compressed (packed after the table, not aligned).
    pub fn is_packed(self) -> bool {
        matches!(self, Self::Zstd | Self::ZstdStream)
    }
}

/// Commit payload: `Commit` then `disk_count` × [`DiskManifest`], in the order of the
/// Open.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Commit {
    /// The epoch of the Open.
    pub epoch: U64,
    /// Manifests that follow: the Open's disk count.
    pub disk_count: U32,
    pub reserved: U32,
}

/// What the source sent for one disk in this session (Data records and Zero frames),
/// summarised; the target recomputes it from what it received and refuses to commit
/// if the two differ. Built by [`super::manifest::ManifestBuilder`] on both sides.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DiskManifest {
    /// Records that carry data (raw or compressed).
    pub data_blocks: U64,
    /// Records of blocks that read as zeros (codec Zero).
    pub zero_blocks: U64,
    /// Zero frames.
    pub zero_runs: U64,
    /// Bytes of disk covered by every record and zero run.
    pub bytes_logical: U64,
    /// xxh3-128 over one 40-byte entry per record and zero run, in the order sent.
    pub digest: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Commit>() == 16);
const _: () = assert!(core::mem::size_of::<DiskManifest>() == 48);

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Committed {
    pub epoch: U64,
    /// Bytes the target wrote (data and zeroed) for this session.
    pub bytes_applied: U64,
}

/// Error payload: `ErrorHeader` then `message_len` bytes of UTF-8.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorHeader {
    /// [`ErrorCode`] as u32.
    pub code: U32,
    pub message_len: U32,
}

/// Why a peer gave up. Stable values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    Protocol = 1,
    Auth = 2,
    UnknownDisk = 3,
    OutOfRange = 4,
    Integrity = 5,
    Io = 6,
    Busy = 7,
    BaseMismatch = 8,
    ReplicaTooSmall = 9,
    Version = 10,
    Internal = 11,
    /// The replica was written by something other than the target since its last
    /// epoch (split brain): the operator must choose.
    ReplicaChanged = 12,
    /// The target's site was promoted by a failover: it takes no replication.
    Fenced = 13,
}

impl ErrorCode {
    pub fn from_u32(v: u32) -> Self {
        use ErrorCode::*;
        match v {
            1 => Protocol,
            2 => Auth,
            3 => UnknownDisk,
            4 => OutOfRange,
            5 => Integrity,
            6 => Io,
            7 => Busy,
            8 => BaseMismatch,
            9 => ReplicaTooSmall,
            10 => Version,
            12 => ReplicaChanged,
            13 => Fenced,
            _ => Internal,
        }
    }
}

/// The hash used for block identity: xxh3-128 of the bytes, little-endian. The all-zero
/// value is reserved to mean "this block is all zeros" in seeded comparison.
pub fn block_hash(data: &[u8]) -> [u8; 16] {
    let h = xxhash_rust::xxh3::xxh3_128(data);
    if h == 0 {
        // Astronomically unlikely; keep the zero value reserved.
        1u128.to_le_bytes()
    } else {
        h.to_le_bytes()
    }
}

/// Reserved hash value for a block that reads as zeros.
pub const ZERO_BLOCK_HASH: [u8; 16] = [0; 16];

/// True when every byte is zero. Word-at-a-time; the compiler vectorises it.
pub fn is_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: reinterpreting initialised bytes as u64 is valid for any bit pattern;
        // `align_to` only yields correctly aligned, in-bounds middle elements.
        unsafe { data.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0)
        && suffix.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0u64, |acc, &w| acc | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut buf = vec![0u8; 65536 + 3];
        assert!(is_zero(&buf));
        for pos in [0, 1, 7, 8, 4095, 65535, 65538] {
            buf[pos] = 1;
            assert!(!is_zero(&buf), "byte {pos}");
            buf[pos] = 0;
        }
    }

    #[test]
    fn kinds_roundtrip() {
        for v in 0..=255u8 {
            if let Some(k) = FrameKind::from_u8(v) {
                assert_eq!(k as u8, v);
            }
        }
    }
}
