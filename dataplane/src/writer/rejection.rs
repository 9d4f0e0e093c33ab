//! Why the target refuses what a source sent: one variant per reason, holding the facts
//! the reason is about. The `Display` text is what the source is told (with the chain
//! of any `#[source]`), and [`Rejection::code`] the error code it gets with it, so the
//! two can never disagree.

use std::path::PathBuf;

use filter_driver_shim_contract::bitmap::BitmapError;
use filter_driver_shim_contract::GenerationId;

use super::TargetError;
use crate::io::IoError;
use crate::protocol::manifest::describe;
use crate::protocol::{DiskManifest, ErrorCode, FrameKind, MAX_DISKS_PER_SESSION};

/// A range of a disk a session admits, for the order check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeKind {
    DataFrame,
    ZeroRange,
}

impl std::fmt::Display for RangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::DataFrame => "data frame",
            Self::ZeroRange => "zero range",
        })
    }
}

/// A frame of a seeded sync's hash compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedFrame {
    Hashes,
    HashZeroRun,
}

impl std::fmt::Display for SeedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hashes => "hashes",
            Self::HashZeroRun => "hash zero run",
        })
    }
}

/// What a data frame's table gets wrong, before any record is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedData {
    #[error("shorter than its header")]
    Short,
    #[error("no records")]
    NoRecords,
    #[error("record table longer than the frame")]
    TableTooLong,
    #[error("record table misaligned")]
    TableMisaligned,
}

/// Why a record of a data frame lies outside what its disk and session allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordRange {
    #[error("offset {offset} is past the end of the disk ({disk_size} bytes)")]
    PastEnd { offset: u64, disk_size: u64 },
    #[error("offset {offset} is not a multiple of the block size {block_size}")]
    Unaligned { offset: u64, block_size: u64 },
    #[error("{len} bytes at offset {offset} are not a run of whole 4 KiB granules ending by the block's end at {block_end}")]
    Granules {
        offset: u64,
        len: u64,
        block_end: u64,
    },
    #[error("block at {offset} claims {len} bytes, the block there has {expected}")]
    Length {
        offset: u64,
        len: u64,
        expected: u64,
    },
    #[error("frame describes more than the {max_logical} bytes of blocks the session announced")]
    OverAnnounced { max_logical: usize },
}

/// The acknowledged epoch a replica holds, as its record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub epoch: u64,
    pub generation: GenerationId,
}

/// Something a source sent that the target refuses. The source is told the `Display`
/// text (and its sources' chain) with [`Rejection::code`].
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("target is at its limit of {max} sessions")]
    SessionLimit { max: usize },
    #[error("open frame shorter than its header")]
    OpenShort,
    #[error("open names {count} disks; 1..={MAX_DISKS_PER_SESSION} allowed")]
    DiskCount { count: usize },
    #[error("open frame length does not match its disk count")]
    OpenLength,
    #[error("disk name is not valid UTF-8 or too long")]
    BadDiskName,
    #[error("unknown disk {name:?}: this target is configured for {}", configured.join(", "))]
    UnknownDisk {
        name: String,
        configured: Vec<String>,
    },
    #[error("disk {name:?} opened twice")]
    OpenedTwice { name: String },
    #[error("disk {name:?} is being replicated by another session")]
    DiskBusy { name: String },
    #[error("disk(s) {}: the replica is between epochs because settling an interrupted epoch failed: {}; the next session retries", disks.join(", "), crate::chain(&**error))]
    Unsettled {
        disks: Vec<String>,
        error: Box<TargetError>,
    },
    #[error("disk {disk}: block size {block_size} is not a power of two in 4096..=1048576")]
    BlockSize { disk: String, block_size: u64 },
    #[error("disk {disk}: size is zero")]
    ZeroSize { disk: String },
    #[error("disk {disk}: unknown sync mode {mode}")]
    UnknownMode { disk: String, mode: u8 },
    #[error("disk {disk}: the replica cannot be shown to hold an acknowledged epoch ({why}); a changed-block epoch would build on unknown bytes — run a seeded sync (--mode seeded), which compares checksums and repairs it")]
    Suspect { disk: String, why: String },
    #[error("disk {disk}: the change set is based on epoch {base_epoch} of generation {generation}, but the replica holds {}; run a seeded sync (--mode seeded)", held.as_ref().map_or("no acknowledged epoch".to_string(), |h| format!("epoch {} of generation {}", h.epoch, h.generation)))]
    BaseMismatch {
        disk: String,
        base_epoch: u64,
        generation: GenerationId,
        held: Option<Held>,
    },
    /// Reverse replication onto a disk this site never held as a replica.
    #[error("disk {disk}: reverse replication needs a replica prepared by `ferry become-replica` at this site (it records what the disk holds and what was written to it since); this target has no record of it")]
    NotPrepared { disk: String },
    #[error("disk {disk}: reverse replication needs the replica {} the record describes, and it is missing; restore it, or resync with `ferry sync --mode full` from the primary", path.display())]
    ReprotectMissing { disk: String, path: PathBuf },
    #[error("disk {disk}: reverse replication of a {source_bytes}-byte disk onto a replica recorded as {replica_bytes} bytes")]
    ReprotectSize {
        disk: String,
        source_bytes: u64,
        replica_bytes: u64,
    },
    /// Split brain: see [`super::stamp`].
    #[error("disk {disk}: the replica {} was changed by something other than this target since it applied epoch {epoch} ({}); applying more epochs would leave it different from every acknowledged epoch (split brain). Choose: rerun the source with --discard-replica-changes to resync it from the source (a seeded sync; the replica's own changes are lost), or fail over to the replica as it is", path.display(), super::stamp::describe(changes))]
    ReplicaChanged {
        disk: String,
        path: PathBuf,
        epoch: u64,
        changes: Vec<super::stamp::StampChange>,
    },
    /// The site was promoted by a failover (see [`super::role`]).
    #[error("this target's site was promoted to primary by {how} at {} (recovery point {point}){}: it takes no replication, whichever source connects. The VMs run from these disks now; the site that sent this must not replicate to them (if it was the primary, it was failed over)", crate::utc::Utc::from_unix_s(*since_unix_s), if *promoting { ", still rolling its replicas back (rerun the failover to finish)" } else { "" })]
    Fenced {
        how: super::role::Transition,
        since_unix_s: u64,
        point: u64,
        promoting: bool,
    },
    /// A site with both roles: its own engine replicates this disk out.
    #[error("disk {disk}: this site is its primary (its engine replicates it: {}); a target writes only a replica — the site that sent this must not replicate here unless this site failed over or became the replica (`ferry become-replica`)", lineage.display())]
    PrimaryHere { disk: String, lineage: PathBuf },
    #[error("a planned failover's final epoch must carry every disk of this target, and mark each for promotion; missing: {}", missing.join(", "))]
    PromoteNeedsAllDisks { missing: Vec<String> },
    /// Another program holds a lock on the replica (see [`super::stamp::hold`]).
    #[error("disk {disk}: the replica {} is in use by another program (it holds a lock on it, as QEMU does for an image it opened): the target does not write a replica something else may be writing; retrying", path.display())]
    ReplicaInUse { disk: String, path: PathBuf },
    #[error("disk {disk}: discarding the replica's changes needs a full or seeded sync, which compares every block, not a changed-block epoch")]
    DiscardNeedsResync { disk: String },
    /// The replica cannot be opened at the announced size.
    #[error("disk {disk}")]
    OpenReplica {
        disk: String,
        #[source]
        source: IoError,
    },
    #[error("disk {disk}: open {}", path.display())]
    OpenBuffered {
        disk: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The diff bitmap of a seeded disk cannot be built for the announced shape.
    #[error("disk {disk}")]
    DiffShape {
        disk: String,
        #[source]
        source: BitmapError,
    },
    #[error("announced batch of {announced} bytes is not a multiple of 4096 of at least one block ({min_block})")]
    BadBatch { announced: usize, min_block: usize },
    #[error("source closed the connection before committing")]
    ClosedBeforeCommit,
    #[error("unexpected {kind:?} frame during replication")]
    UnexpectedFrame { kind: FrameKind },
    #[error("zero frame has the wrong length")]
    ZeroLength,
    #[error("zero frame names disk #{disk}, the session opened {opened}")]
    ZeroUnknownDisk { disk: u32, opened: usize },
    #[error("disk {disk}: zero range at {offset} of {len} bytes is outside the disk ({disk_size} bytes) or unaligned")]
    ZeroOutside {
        disk: String,
        offset: u64,
        len: u64,
        disk_size: u64,
    },
    #[error("disk {disk}: {kind} [{start}, {end}) overlaps or goes back behind a range this session already sent (up to {next}); ranges of a disk must come in increasing offset order")]
    OutOfOrder {
        disk: String,
        kind: RangeKind,
        start: u64,
        end: u64,
        next: u64,
    },
    #[error("hash zero run frame has the wrong length")]
    HashZeroRunLength,
    #[error("hashes frame shorter than its header")]
    HashesShort,
    #[error("{frame} for disk #{disk}, which is not being seeded")]
    NotSeeded { frame: SeedFrame, disk: u32 },
    #[error("disk {disk}: hashes for blocks {first}+{count} do not fit the frame or the disk ({blocks} blocks)")]
    HashesOutside {
        disk: String,
        first: u64,
        count: u64,
        blocks: u64,
    },
    #[error("disk {disk}: zero run {first}+{count} is past the disk's {blocks} blocks")]
    ZeroRunOutside {
        disk: String,
        first: u64,
        count: u64,
        blocks: u64,
    },
    /// Reading the replica for the hash compare failed.
    #[error("disk {disk}: read at {offset}")]
    ReadReplica {
        disk: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("commit frame has the wrong length for its disk count")]
    CommitLength,
    #[error("commit of epoch {got} in a session opened for epoch {session}")]
    CommitEpoch { got: u64, session: u64 },
    #[error("commit carries {sent} disk manifests, the session opened {opened} disks")]
    ManifestCount { sent: usize, opened: usize },
    #[error("disk {disk}: the epoch's manifest does not match what arrived: the source sent {}, the target received {}; the epoch is not committed", describe(sent), describe(received))]
    ManifestMismatch {
        disk: String,
        sent: DiskManifest,
        received: DiskManifest,
    },
    #[error("malformed data frame: {0}")]
    MalformedData(MalformedData),
    #[error("data frame names disk #{disk}, but the session opened {opened} disk(s)")]
    DataUnknownDisk { disk: u32, opened: usize },
    #[error("disk {disk}: record {record}: block at {offset} repeats or goes back (previous block ended at {previous_end})")]
    GoesBack {
        disk: String,
        record: usize,
        offset: u64,
        previous_end: u64,
    },
    #[error("disk {disk}: record {record}: {why}")]
    RecordOutside {
        disk: String,
        record: usize,
        why: RecordRange,
    },
    #[error("disk {disk}: record {record}: unknown codec {codec}")]
    UnknownCodec {
        disk: String,
        record: usize,
        codec: u8,
    },
    #[error("disk {disk}: record {record}: compression stream {stream}: {why}")]
    StreamChunk {
        disk: String,
        record: usize,
        stream: u8,
        why: &'static str,
    },
    #[error("disk {disk}: record {record}: payload [{at}, +{stored}) lies outside the frame")]
    PayloadOutside {
        disk: String,
        record: usize,
        at: usize,
        stored: usize,
    },
    #[error("disk {disk}: block at offset {offset} fails its hash check: corrupted in transit")]
    HashMismatch { disk: String, offset: u64 },
    #[error("disk {disk}: record {record}: zero block carries {stored} payload bytes")]
    ZeroCarriesPayload {
        disk: String,
        record: usize,
        stored: usize,
    },
    #[error("disk {disk}: record {record}: raw block of {len} bytes stores {stored}")]
    RawLength {
        disk: String,
        record: usize,
        len: u64,
        stored: usize,
    },
    #[error("frame needs more than the {cap}-byte staging buffer")]
    StagingTooSmall { cap: usize },
}

impl Rejection {
    /// The error code the source gets with this rejection.
    pub fn code(&self) -> ErrorCode {
        use Rejection::*;
        match self {
            SessionLimit { .. } | DiskBusy { .. } | ReplicaInUse { .. } => ErrorCode::Busy,
            UnknownDisk { .. } | ZeroUnknownDisk { .. } | DataUnknownDisk { .. } => {
                ErrorCode::UnknownDisk
            }
            Suspect { .. }
            | BaseMismatch { .. }
            | NotPrepared { .. }
            | ReprotectMissing { .. }
            | ReprotectSize { .. } => ErrorCode::BaseMismatch,
            ReplicaChanged { .. } => ErrorCode::ReplicaChanged,
            Fenced { .. } | PrimaryHere { .. } => ErrorCode::Fenced,
            OpenReplica { source, .. } => match source {
                IoError::ReplicaTooSmall { .. } | IoError::ReplicaSizeMismatch { .. } => {
                    ErrorCode::ReplicaTooSmall
                }
                _ => ErrorCode::Io,
            },
            Unsettled { .. } | OpenBuffered { .. } | ReadReplica { .. } => ErrorCode::Io,
            ZeroOutside { .. }
            | HashesOutside { .. }
            | ZeroRunOutside { .. }
            | RecordOutside { .. }
            | StagingTooSmall { .. } => ErrorCode::OutOfRange,
            ManifestMismatch { .. } | HashMismatch { .. } => ErrorCode::Integrity,
            OpenShort
            | DiskCount { .. }
            | OpenLength
            | BadDiskName
            | OpenedTwice { .. }
            | BlockSize { .. }
            | ZeroSize { .. }
            | UnknownMode { .. }
            | DiscardNeedsResync { .. }
            | PromoteNeedsAllDisks { .. }
            | DiffShape { .. }
            | BadBatch { .. }
            | ClosedBeforeCommit
            | UnexpectedFrame { .. }
            | ZeroLength
            | OutOfOrder { .. }
            | HashZeroRunLength
            | HashesShort
            | NotSeeded { .. }
            | CommitLength
            | CommitEpoch { .. }
            | ManifestCount { .. }
            | MalformedData(_)
            | GoesBack { .. }
            | UnknownCodec { .. }
            | StreamChunk { .. }
            | PayloadOutside { .. }
            | ZeroCarriesPayload { .. }
            | RawLength { .. } => ErrorCode::Protocol,
        }
    }
}

impl From<Rejection> for TargetError {
    fn from(r: Rejection) -> Self {
        TargetError::Rejected(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the source is told: the chain of the session's error, as `run` sends it.
    fn told(r: Rejection) -> (ErrorCode, String) {
        let e = TargetError::from(r);
        (e.code(), crate::chain(&e))
    }

    /// A rejection with a cause tells the peer the same words as the single formatted
    /// message it replaced: its own text, then the cause's chain.
    #[test]
    fn a_cause_is_told_after_the_reason_as_before() {
        let (code, text) = told(Rejection::OpenReplica {
            disk: "d".into(),
            source: IoError::ReplicaTooSmall {
                path: "/r".into(),
                device_bytes: 1,
                required_bytes: 2,
            },
        });
        assert_eq!(code, ErrorCode::ReplicaTooSmall);
        assert!(text.starts_with("disk d: "), "{text}");
        let (code, text) = told(Rejection::ReadReplica {
            disk: "d".into(),
            offset: 4096,
            source: std::io::Error::other("boom"),
        });
        assert_eq!(code, ErrorCode::Io);
        assert_eq!(text, "disk d: read at 4096: boom");
    }

    #[test]
    fn texts_keep_their_words() {
        assert_eq!(
            told(Rejection::UnknownDisk {
                name: "x".into(),
                configured: vec!["a".into(), "b".into()],
            }),
            (
                ErrorCode::UnknownDisk,
                "unknown disk \"x\": this target is configured for a, b".to_string()
            )
        );
        assert_eq!(
            told(Rejection::BaseMismatch {
                disk: "d".into(),
                base_epoch: 3,
                generation: GenerationId::from_bytes([0xab; 16]),
                held: None,
            })
            .1,
            format!(
                "disk d: the change set is based on epoch 3 of generation {}, but the replica holds no acknowledged epoch; run a seeded sync (--mode seeded)",
                "ab".repeat(16)
            )
        );
        assert_eq!(
            told(Rejection::RecordOutside {
                disk: "d".into(),
                record: 2,
                why: RecordRange::PastEnd {
                    offset: 8,
                    disk_size: 4,
                },
            }),
            (
                ErrorCode::OutOfRange,
                "disk d: record 2: offset 8 is past the end of the disk (4 bytes)".to_string()
            )
        );
        assert_eq!(
            told(Rejection::MalformedData(MalformedData::NoRecords)),
            (
                ErrorCode::Protocol,
                "malformed data frame: no records".to_string()
            )
        );
    }
}
