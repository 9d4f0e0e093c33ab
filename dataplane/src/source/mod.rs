//! The source engine: brings replicas up to date from the primary site.
//!
//! A session connects to the target, authenticates, opens every configured disk, then
//! per disk picks how to sync it — full (zero blocks and holes skipped), seeded (hash
//! compare first, only differing blocks travel) or changed (only the blocks of a
//! changed-block bitmap) — and streams the blocks through the [`pipeline`]. It returns
//! only after the target acknowledged the epoch as durable.

pub mod abort;
pub mod continuous;
pub mod failover;
pub mod live;
pub mod lock;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod reprotect;
pub mod throttle;

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_ringbuf::pool::PoolError;
use filter_driver_shim_contract::bitmap::{BitmapError, ChangedBlockBitmap};
use filter_driver_shim_contract::control::{EpochId, FreezeDisk, StatusDisk};
use filter_driver_shim_contract::epoch::EpochView;
use filter_driver_shim_contract::granules::{GranuleFileError, GranuleMasks};
use filter_driver_shim_contract::GenerationId;
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use crate::config::{Compression, Config, ConfigError};
use crate::durable::StateOp;
use crate::io::{self, Disk, EngineKind, IoError};
use crate::protocol::{
    auth, Commit, Committed, DiskManifest, DiskRun, FrameDeadline, FrameKind, FrameReader,
    FrameWriter, ManifestBuilder, OpenDisk, OpenDiskReply, OpenHeader, ProtocolError, SyncMode,
    TimedStream, GRANULE_RECORDS_VERSION, MAX_NAME_LEN, MAX_REPLY_PAYLOAD, MULTI_EPOCH_VERSION,
    OPEN_DISCARD_REPLICA_CHANGES, REPLICA_CREATED, STREAM_RECORDS_VERSION,
};
use crate::psk::{Psk, PskError};
pub use live::ShimControlError;
use lock::{EngineLock, EngineRole};
use pipeline::{DiskInfo, Output, PipelineConfig, PipelineStats};
pub use pipeline::{Stage, StageFailure};
use plan::{Chunker, ExtentRegions, Geometry, PlanItem, RangeReads, Region};

/// Everything that can stop a sync.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("disk {disk}: cannot open {path}")]
    Open {
        disk: String,
        path: PathBuf,
        #[source]
        source: IoError,
    },
    #[error("I/O error{}", disk.map(|d| format!(" on disk #{d}")).unwrap_or_default())]
    Io {
        disk: Option<u32>,
        #[source]
        source: IoError,
    },
    #[error("disk #{disk}: short read at offset {offset}: expected {expected} bytes, got {got} (did the source shrink?)")]
    ShortRead {
        disk: u32,
        offset: u64,
        expected: u32,
        got: usize,
    },
    #[error("cannot reach the target at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The disk's changed-block bitmap cannot carry this sync.
    #[error("disk {disk}")]
    Bitmap {
        disk: String,
        #[source]
        source: BitmapProblem,
    },
    /// A system call on a state file or the state directory failed.
    #[error("state file {path}: {op}")]
    State {
        path: PathBuf,
        op: StateOp,
        #[source]
        source: std::io::Error,
    },
    /// A state file holds something else than a state record (the source names the
    /// field: a generation that is not 32 hex digits, a missing epoch).
    #[error("state file {path}: not a state record")]
    StateContent {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("buffer pool")]
    Pool(#[source] PoolError),
    #[error("compression")]
    Compression(#[source] std::io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// The configuration has no usable `[source]` section.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The key file cannot be used.
    #[error(transparent)]
    Key(#[from] PskError),
    /// The system gave no randomness for a new generation id.
    #[error("no randomness")]
    Randomness(#[source] std::io::Error),
    #[error("disk name {disk:?} is too long")]
    NameTooLong { disk: String },
    /// The shim and the engine were started from configs with different block sizes.
    #[error("disk {disk}: the shim tracks {shim_block_size}-byte blocks, the engine ships {block_size}-byte blocks; run both from the same config")]
    BlockSizeMismatch {
        disk: String,
        shim_block_size: u64,
        block_size: usize,
    },
    /// Continuous replication was asked for an io_uring engine that cannot run here.
    #[error("io_engine = \"uring\" cannot work here")]
    Engine(#[source] IoError),
    #[error("replication aborted")]
    Aborted,
    /// A stage of the source pipeline failed without an error of its own (it panicked,
    /// or stopped before the end of its input): the epoch is incomplete.
    #[error("source pipeline: the {stage} failed")]
    Stage {
        stage: Stage,
        #[source]
        source: StageFailure,
    },
    #[error("the target interrupted the session without saying why")]
    PeerInterrupted,
    /// The shim's control protocol failed or refused (see `live`).
    #[error("shim")]
    Shim(#[from] ShimControlError),
    /// A replica already holds an epoch at least as new as the one being opened (the
    /// session is given up before anything is sent; [`sync`] retries above it).
    #[error("the target already holds epoch {held}")]
    EpochBehind { held: u64 },
    /// Another engine holds the state directory.
    #[error("{} is running on {} (lock {}): one `ferry source` or `ferry sync` per state_dir at a time; stop it first", holder.as_deref().unwrap_or("another engine (pid not recorded)"), state_dir.display(), lock.display())]
    Busy {
        state_dir: PathBuf,
        lock: PathBuf,
        /// The engine holding the lock, `command (pid N)`, when its note says.
        holder: Option<String>,
    },
    /// This site handed its disks over in a planned failover (see [`failover`]).
    #[error("this site was demoted by a planned failover begun at {}{}: the VMs run at the secondary site now and this site replicates nothing", crate::utc::Utc::from_unix_s(*since_unix_s), demotion_state(*complete, *epoch, target))]
    Demoted {
        since_unix_s: u64,
        target: String,
        epoch: Option<u64>,
        complete: bool,
    },
    /// A planned failover found the target promoted by a failover at the secondary, not
    /// by its own final epoch: the writes acknowledged here after that failover's point
    /// are not on the promoted replicas. This site is demoted all the same.
    #[error("the target at {target} was promoted by a failover there, not by this handover: writes acknowledged here after its recovery point are not on its disks; this site is demoted")]
    PromotedElsewhere {
        target: String,
        #[source]
        source: Box<SourceError>,
    },
    /// After `demote`, the shim still accepts writes on some disks.
    #[error("the shim still accepts writes on disk(s) {} after `demote`; the planned failover stops before its final epoch", disks.join(", "))]
    NotDemoted { disks: Vec<String> },
    #[error("state {}", path.display())]
    SiteRecord {
        path: PathBuf,
        #[source]
        source: crate::writer::state::StateFileError,
    },
    /// The final epoch was acknowledged but the target still takes sessions: it did
    /// not promote (a target that predates planned failover ignores the request).
    #[error("the target at {target} acknowledged the final epoch {epoch} but did not promote its site (is it an older ferry?); this site is demoted (writes refused by the shim) but not handed over — upgrade the target and rerun, or fail over there with `ferry failover unplanned`")]
    NotPromoted { target: String, epoch: u64 },
    #[error(transparent)]
    Reprotect(#[from] reprotect::ReprotectError),
    /// This site's target state (its role, its change sets) could not be used.
    #[error(transparent)]
    Target(Box<crate::writer::TargetError>),
}

/// The end of [`SourceError::Demoted`]'s message.
fn demotion_state(complete: bool, epoch: Option<u64>, target: &str) -> String {
    match (complete, epoch) {
        (false, _) => format!(
            " and not finished (rerun `ferry failover planned` to hand the disks over to {target})"
        ),
        (true, Some(e)) => format!(" (final epoch {e}; the replicas at {target} were promoted)"),
        (true, None) => format!(" (the replicas at {target} were found promoted already)"),
    }
}

/// Why a changed-block bitmap cannot carry a sync of its disk.
#[derive(Debug, thiserror::Error)]
pub enum BitmapProblem {
    #[error("bitmap {}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: BitmapError,
    },
    #[error("frozen bitmap {}", path.display())]
    LoadFrozen {
        path: PathBuf,
        #[source]
        source: BitmapError,
    },
    #[error("bitmap {} covers {bitmap_bytes} bytes in {bitmap_block_size}-byte blocks, the disk is {disk_bytes} bytes in {block_size}-byte blocks", path.display())]
    Geometry {
        path: PathBuf,
        bitmap_bytes: u64,
        bitmap_block_size: u32,
        disk_bytes: u64,
        block_size: usize,
    },
    #[error("bitmap {} has no base: this disk was never synced; a full or seeded sync comes first", path.display())]
    NoBase { path: PathBuf },
    #[error("bitmap {} tracks changes since epoch {bitmap_epoch} of generation {bitmap_generation}, the replica was last synced at epoch {epoch} of generation {generation}", path.display())]
    Generation {
        path: PathBuf,
        bitmap_epoch: u64,
        bitmap_generation: GenerationId,
        epoch: u64,
        generation: GenerationId,
    },
    /// Changed mode was asked for a disk whose shim tracks another generation than the
    /// replica holds.
    #[error("the shim tracks generation {shim_generation} but the replica was last synced {}; a seeded sync comes first", match synced { Some((epoch, generation)) => format!("at epoch {epoch} of generation {generation}"), None => "never".to_string() })]
    ShimGeneration {
        shim_generation: GenerationId,
        /// The replica's last epoch and generation, if it was ever synced.
        synced: Option<(u64, GenerationId)>,
    },
    #[error("changed mode needs a bitmap (--bitmap NAME=FILE)")]
    Missing,
    #[error("the frozen bitmap does not match the disk")]
    FrozenMismatch,
    /// The shim froze the disk granule by granule but its granule file cannot be
    /// used; reading whole blocks instead could see writes made after the freeze.
    #[error("frozen granule masks")]
    Granules(#[source] GranuleFileError),
    #[error("the shim was asked for granule masks and named no granule file")]
    GranulesMissing,
    /// Building or filling the bitmap of a seeded disk's differences failed.
    #[error(transparent)]
    Diff(BitmapError),
}

/// The shim's control socket, in `[source] state_dir`.
pub const SHIM_CONTROL_SOCKET: &str = "shim.ctl";

/// How the operator asked for each disk to be synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModeRequest {
    /// Changed-block if a valid bitmap is at hand, full if the replica is new, seeded
    /// otherwise.
    #[default]
    Auto,
    Full,
    Seeded,
    Changed,
}

/// One disk to sync.
#[derive(Debug, Clone)]
pub struct JobDisk {
    pub name: String,
    pub path: PathBuf,
    /// A changed-block bitmap to use for this disk (changed mode).
    pub bitmap: Option<PathBuf>,
}

/// A fully resolved sync job (built from the config by the CLI).
#[derive(Clone)]
pub struct SyncJob {
    pub target: String,
    pub psk: [u8; 32],
    pub state_dir: PathBuf,
    pub disks: Vec<JobDisk>,
    pub block_size: usize,
    pub io_size: usize,
    pub queue_depth: usize,
    pub workers: usize,
    /// None, a fixed zstd level, or `auto`, which picks per frame (see
    /// `docs/architecture.md`, "Adaptive compression").
    pub compression: Compression,
    pub engine: EngineKind,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    pub mode: ModeRequest,
    /// The shim's control socket. When a shim listens there, every sync is a live
    /// epoch of it (see [`live`]); otherwise the disks are read as they are.
    pub shim_control: Option<PathBuf>,
    /// Fail instead of reading the disks directly when no shim listens
    /// (continuous replication needs the shim's epochs).
    pub require_shim: bool,
    /// The operator chose to discard what was written to the replicas by anything but
    /// the target (split brain): the target accepts them for this sync, which must
    /// compare every block (`mode` seeded or full).
    pub discard_replica_changes: bool,
    /// The final epoch of a planned failover (see [`failover`]): the target promotes
    /// its site once it commits.
    pub promote: bool,
    /// Reverse replication after a failover (see [`reprotect`]): what each disk was
    /// promoted from. A disk whose replica already holds the shim's generation (the
    /// reverse epoch committed) goes as a changed-block epoch.
    pub reprotect: Option<Vec<reprotect::ReprotectDisk>>,
    /// Where the engine reports how far each sync is (see [`progress`]).
    pub progress: Option<std::sync::Arc<progress::Progress>>,
    /// The bandwidth limit, shared by every sync of the engine (see [`throttle`]).
    pub throttle: Option<std::sync::Arc<throttle::Throttle>>,
}

impl std::fmt::Debug for SyncJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key; its fingerprint identifies it well enough.
        f.debug_struct("SyncJob")
            .field("target", &self.target)
            .field("psk", &Psk::from_bytes(self.psk))
            .field("state_dir", &self.state_dir)
            .field("disks", &self.disks)
            .field("block_size", &self.block_size)
            .field("io_size", &self.io_size)
            .field("queue_depth", &self.queue_depth)
            .field("workers", &self.workers)
            .field("compression", &self.compression)
            .field("engine", &self.engine)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl SyncJob {
    /// Resolves a sync job from the `[source]` section and the disks of `config`.
    pub fn from_config(config: &Config, mode: ModeRequest) -> Result<Self, SourceError> {
        let source = config.require_source("sync")?;
        let psk = Psk::load(&source.psk_file)?;
        Ok(SyncJob {
            target: source.target.clone(),
            psk: *psk.as_bytes(),
            state_dir: source.state_dir.clone(),
            disks: config
                .disks
                .iter()
                .map(|d| JobDisk {
                    name: d.name.clone(),
                    path: d.path.clone(),
                    bitmap: None,
                })
                .collect(),
            block_size: source.block_size_bytes() as usize,
            io_size: source.io_size_bytes() as usize,
            queue_depth: source.queue_depth as usize,
            workers: source.workers as usize,
            compression: source.compression(),
            engine: source.io_engine.into(),
            connect_timeout: source.connect_timeout(),
            io_timeout: source.io_timeout(),
            mode,
            shim_control: Some(source.state_dir.join(SHIM_CONTROL_SOCKET)),
            require_shim: false,
            discard_replica_changes: false,
            promote: false,
            reprotect: None,
            progress: None,
            throttle: {
                let limit = source.limit();
                (!limit.is_unlimited()).then(|| std::sync::Arc::new(throttle::Throttle::new(limit)))
            },
        })
    }
}

/// Per-disk outcome.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub mode: &'static str,
    pub bytes_logical: u64,
    pub replica_created: bool,
}

/// What a sync did; `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub epoch: u64,
    /// Disk bytes covered by the sync (sum of disk sizes).
    pub bytes_logical: u64,
    /// Bytes put on the wire (frames, headers included).
    pub bytes_sent: u64,
    /// Uncompressed bytes of the blocks whose data travelled (with `bytes_sent`, the
    /// compression ratio).
    pub bytes_payload: u64,
    /// Seconds the bandwidth limit (`max_rate`) held this sync back.
    pub throttled_s: f64,
    /// Blocks whose data travelled.
    pub blocks_sent: u64,
    /// Blocks that travelled as zero records (no data).
    pub zero_blocks_sent: u64,
    /// Bytes read from the source disks.
    pub bytes_read: u64,
    /// Bytes the target applied (data written plus ranges zeroed).
    pub bytes_applied: u64,
    pub seconds: f64,
    /// MB/s (10^6 bytes): of disk covered when every disk went whole (full or
    /// seeded), of bytes read otherwise (changed blocks).
    pub mb_per_s: f64,
    pub disks: Vec<DiskReport>,
    /// The shim's epoch this sync carried, when a shim served the disks.
    pub shim_epoch: Option<EpochId>,
    /// How long the freeze held the guest's writes, in microseconds.
    pub freeze_pause_us: Option<u64>,
    /// Data frames (one per read of `io_size`) whose blocks went uncompressed.
    pub frames_raw: u64,
    /// Data frames compressed, by zstd level: what `compression = "auto"` chose.
    pub frames_zstd: std::collections::BTreeMap<i32, u64>,
}

/// The source's record of what the replica of one disk holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceDiskState {
    /// Tracking generation (32 hex digits in the file).
    pub generation: GenerationId,
    /// Last epoch the target acknowledged for this disk.
    pub epoch: u64,
}

impl SourceDiskState {
    pub fn path(state_dir: &Path, disk: &str) -> PathBuf {
        state_dir.join(format!("{disk}.state"))
    }

    pub fn load(state_dir: &Path, disk: &str) -> Result<Option<Self>, SourceError> {
        let path = Self::path(state_dir, disk);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let s: Self = serde_json::from_slice(&bytes)
                    .map_err(|source| SourceError::StateContent { path, source })?;
                Ok(Some(s))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SourceError::State {
                path,
                op: StateOp::Read,
                source,
            }),
        }
    }

    pub fn save(&self, state_dir: &Path, disk: &str) -> Result<(), SourceError> {
        let path = Self::path(state_dir, disk);
        let bytes = serde_json::to_vec_pretty(self).expect("state serialises");
        crate::durable::write_atomic(&path, &bytes).map_err(|source| SourceError::State {
            path,
            op: StateOp::Write,
            source,
        })
    }
}

fn random_generation() -> Result<GenerationId, SourceError> {
    GenerationId::random().map_err(SourceError::Randomness)
}

struct OpenedDisk {
    spec: JobDisk,
    disk: Disk,
    generation: GenerationId,
    base_epoch: u64,
    bitmap: Option<ChangedBlockBitmap>,
    /// Which granules of `bitmap`'s blocks to send (a live epoch frozen with
    /// `granules=on`); `None`: whole blocks.
    granules: Option<GranuleMasks>,
    mode: SyncMode,
    replica_created: bool,
    /// Reverse replication: the lineage the replica must answer with.
    lineage: Option<GenerationId>,
    /// Reverse replication: hash every block (one side's change set is not known).
    compare: bool,
}

/// Runs one sync session to completion; returns after the target's acknowledgement.
///
/// With a shim listening on [`SyncJob::shim_control`], the sync is one live epoch of
/// it: frozen, read consistently while the guest writes on, committed to the shim
/// after the target acknowledged it.
pub fn sync(job: &SyncJob) -> Result<SyncReport, SourceError> {
    let lock = EngineLock::acquire(&job.state_dir, EngineRole::Sync)?;
    sync_locked(job, &lock)
}

/// [`sync`] by an engine that already holds the state directory's lock (`ferry
/// source` holds it for its whole life).
pub fn sync_locked(job: &SyncJob, lock: &EngineLock) -> Result<SyncReport, SourceError> {
    sync_linked(job, lock, &mut Link::default())
}

/// [`sync_locked`] over `link`: the epoch goes on the connection `link` kept from the
/// previous one when the target still holds it open, on a new one otherwise, and
/// `link` keeps the connection for the next epoch when the target speaks
/// [`MULTI_EPOCH_VERSION`] and this one was acknowledged.
pub fn sync_linked(
    job: &SyncJob,
    _lock: &EngineLock,
    link: &mut Link,
) -> Result<SyncReport, SourceError> {
    let _tracking = progress::Tracking(job.progress.as_deref());
    if let Some(p) = &job.progress {
        p.begin();
    }
    if !job.promote {
        // A planned failover's own final epoch runs once its demotion is begun.
        failover::refuse_if_demoted(&job.state_dir)?;
    }
    // An explicit `--bitmap` means the operator supplies the change set: no shim epoch.
    let explicit_bitmaps = job.disks.iter().any(|d| d.bitmap.is_some());
    let shim = match &job.shim_control {
        Some(path) if !explicit_bitmaps => shim_status(path, link)?,
        _ => None,
    };
    match shim {
        Some((control, served)) => sync_live(job, control, &served, link),
        None if job.require_shim => Err(ShimControlError::NotListening {
            socket: job.shim_control.clone(),
        }
        .into()),
        None => {
            let started = Instant::now();
            let mut disks = Vec::with_capacity(job.disks.len());
            for spec in &job.disks {
                disks.push(open_disk(job, spec)?);
            }
            let views = vec![None; disks.len()];
            let (epoch, stats, applied) =
                run_epoch(job, &mut disks, &views, &mut || Ok(()), None, link)?;
            Ok(report(&disks, epoch, &stats, applied, started, None))
        }
    }
}

/// The `OPEN_*` flags every disk of `job`'s session carries.
fn open_flags(job: &SyncJob) -> u8 {
    let mut flags = 0;
    if job.discard_replica_changes {
        flags |= OPEN_DISCARD_REPLICA_CHANGES;
    }
    if job.promote {
        flags |= crate::protocol::OPEN_PROMOTE;
    }
    flags
}

/// How one disk goes in a live epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LivePlan {
    /// The shim's frozen bitmap of changed blocks.
    Changed,
    /// The whole disk, full or by checksum compare.
    Whole,
}

/// Decides how one disk goes in a live epoch from what the shim reports of it and the
/// source's record of the replica: changed blocks only when the replica holds an epoch
/// of the shim's tracking generation (and the operator did not ask for a whole disk).
fn plan_live_disk(
    mode: ModeRequest,
    block_size: usize,
    shim_disk: &StatusDisk,
    state: Option<&SourceDiskState>,
) -> Result<LivePlan, SourceError> {
    let generation_ok = state.is_some_and(|s| s.generation == shim_disk.generation_id);
    let plan = match mode {
        ModeRequest::Full | ModeRequest::Seeded => LivePlan::Whole,
        ModeRequest::Auto if generation_ok => LivePlan::Changed,
        ModeRequest::Auto => LivePlan::Whole,
        ModeRequest::Changed if generation_ok => LivePlan::Changed,
        ModeRequest::Changed => {
            return Err(SourceError::Bitmap {
                disk: shim_disk.name.clone(),
                source: BitmapProblem::ShimGeneration {
                    shim_generation: shim_disk.generation_id,
                    synced: state.map(|s| (s.epoch, s.generation)),
                },
            })
        }
    };
    if plan == LivePlan::Changed {
        check_block_size(block_size, shim_disk)?;
    }
    Ok(plan)
}

/// The shim's bits are of `block_size` blocks.
fn check_block_size(block_size: usize, shim_disk: &StatusDisk) -> Result<(), SourceError> {
    if u64::from(shim_disk.block_size) != block_size as u64 {
        return Err(SourceError::BlockSizeMismatch {
            disk: shim_disk.name.clone(),
            shim_block_size: u64::from(shim_disk.block_size),
            block_size,
        });
    }
    Ok(())
}

/// A disk of a reverse replication epoch (see [`reprotect`]).
struct Reverse<'a> {
    disk: &'a reprotect::ReprotectDisk,
    /// The shim's bits cover every write since the promotion.
    tracked: bool,
}

/// Whether `spec` goes in reverse replication: `job` reprotects it and its replica
/// does not hold the shim's generation yet.
fn reverse<'a>(
    job: &'a SyncJob,
    spec: &JobDisk,
    shim_disk: &StatusDisk,
    state: Option<&SourceDiskState>,
) -> Result<Option<Reverse<'a>>, SourceError> {
    let Some(disk) = job.reprotect.iter().flatten().find(|d| d.name == spec.name) else {
        return Ok(None);
    };
    if state.is_some_and(|s| s.generation == shim_disk.generation_id) {
        tracing::info!(disk = %spec.name, "reverse replication of this disk is done already: a changed-block epoch");
        return Ok(None);
    }
    check_block_size(job.block_size, shim_disk)?;
    let tracked = disk.tracked_since_promotion(shim_disk.generation_born.as_ref());
    if tracked {
        tracing::info!(
            disk = %spec.name,
            dirty_blocks = shim_disk.dirty_blocks,
            "reverse replication: the shim has tracked every write since the promotion at epoch {}",
            disk.point
        );
    } else {
        tracing::warn!(
            disk = %spec.name,
            "reverse replication: the shim's tracking began after the promoted replica was changed (or on a block device), so its bits may miss writes: comparing every block (seeded)"
        );
    }
    Ok(Some(Reverse { disk, tracked }))
}

/// One configured disk of a live epoch, before the freeze.
struct PlannedDisk<'a> {
    spec: &'a JobDisk,
    /// The source's record of what its replica holds.
    state: Option<SourceDiskState>,
    plan: LivePlan,
    reverse: Option<Reverse<'a>>,
}

impl PlannedDisk<'_> {
    /// The disk's name if it goes whole.
    fn whole_name(&self) -> Option<&str> {
        (self.plan == LivePlan::Whole).then_some(self.spec.name.as_str())
    }
}

/// Each configured disk with its recorded state and [`plan_live_disk`]'s decision,
/// after checking the shim serves it, from the same file.
fn plan_live_disks<'a>(
    job: &'a SyncJob,
    served: &[StatusDisk],
) -> Result<Vec<PlannedDisk<'a>>, SourceError> {
    let mut plans = Vec::with_capacity(job.disks.len());
    for spec in &job.disks {
        let shim_disk = served.iter().find(|d| d.name == spec.name).ok_or_else(|| {
            ShimControlError::NotServed {
                disk: spec.name.clone(),
            }
        })?;
        if !same_file(&shim_disk.path, &spec.path) {
            return Err(ShimControlError::PathMismatch {
                disk: spec.name.clone(),
                shim_path: shim_disk.path.clone(),
                config_path: spec.path.clone(),
            }
            .into());
        }
        let state = SourceDiskState::load(&job.state_dir, &spec.name)?;
        let reverse = reverse(job, spec, shim_disk, state.as_ref())?;
        let plan = match reverse {
            Some(_) => LivePlan::Changed,
            None => plan_live_disk(job.mode, job.block_size, shim_disk, state.as_ref())?,
        };
        if plan == LivePlan::Whole {
            match (&shim_disk.resync_reason, &state) {
                (_, None) => {
                    tracing::info!(disk = %spec.name, "first sync of this disk: the whole disk goes (full into a new replica, checksum compare into an existing one)")
                }
                (Some(reason), Some(_)) => {
                    tracing::warn!(disk = %spec.name, %reason, "shim tracking restarted: checksum-compare resync of this disk")
                }
                (None, Some(_)) => {}
            }
        }
        plans.push(PlannedDisk {
            spec,
            state,
            plan,
            reverse,
        });
    }
    Ok(plans)
}

/// The shim's control connection and its `status` (the disks it serves): on the
/// connection `link` kept from the previous epoch while it answers, else on a new one;
/// `None` when no shim listens.
fn shim_status(
    path: &Path,
    link: &mut Link,
) -> Result<Option<(live::ShimControl, Vec<StatusDisk>)>, SourceError> {
    if let Some(mut kept) = link.shim.take() {
        match kept.status() {
            Ok(served) => return Ok(Some((kept, served))),
            // The shim restarted since: its new instance listens, or none does.
            Err(e) => tracing::info!(
                "the shim's control connection kept from the previous epoch failed ({}); connecting again",
                crate::chain(&e)
            ),
        }
    }
    match live::ShimControl::connect(path)? {
        Some(mut control) => {
            let served = control.status()?;
            Ok(Some((control, served)))
        }
        None => Ok(None),
    }
}

/// One sync as a live epoch of the running shim behind `control`, which serves the
/// disks `served`. Once the epoch is acknowledged, `link` keeps `control` for the next
/// one (a failed epoch drops it, which aborts the epoch in the shim).
fn sync_live(
    job: &SyncJob,
    mut control: live::ShimControl,
    served: &[StatusDisk],
    link: &mut Link,
) -> Result<SyncReport, SourceError> {
    let started = Instant::now();
    let plans = plan_live_disks(job, served)?;
    let names: Vec<&str> = plans.iter().map(|p| p.spec.name.as_str()).collect();
    let whole: Vec<&str> = plans.iter().filter_map(PlannedDisk::whole_name).collect();
    // Reach the target before freezing: while it is unreachable the guest is never
    // paused for an epoch that cannot go anywhere.
    let connection = link.take(job)?;
    // Sub-block epochs need a shim that keeps granule masks and a target that takes
    // records smaller than a block. Reverse replication adds whole blocks the shim did
    // not freeze to the epoch, so it goes by whole blocks.
    let granular = control.offers_granules()
        && connection.version >= GRANULE_RECORDS_VERSION
        && plans.iter().all(|p| p.reverse.is_none());
    // From here on, any early return drops `control`, which aborts the epoch: the shim
    // puts its bits back.
    let epoch = control.freeze(&names, &whole, granular)?;
    let mut disks = Vec::with_capacity(plans.len());
    let mut views = Vec::with_capacity(plans.len());
    for planned in &plans {
        let (disk, view) = open_frozen_disk(job, planned, &epoch, granular)?;
        disks.push(disk);
        views.push(Some(view));
    }
    let view_refs: Vec<Option<&EpochView>> = views.iter().map(Option::as_ref).collect();
    let outcome = live::keep_alive(&mut control, &epoch, |control| {
        run_epoch(
            job,
            &mut disks,
            &view_refs,
            &mut || {
                // Test-only: an engine slower than the shim's idle bound, which only its
                // keepalives save from losing the epoch.
                if ferry_io::failpoint::hit("engine-stall-before-check") {
                    std::thread::sleep(2 * epoch.idle_timeout.unwrap_or_default());
                }
                // Every read is done: if the shim kept the epoch intact until now, what
                // was read is the frozen point in time.
                control
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .check(&epoch)
            },
            Some(connection),
            link,
        )
    });
    let (number, stats, applied) = match outcome {
        Ok(done) => done,
        Err(e) => {
            drop(views);
            give_back(&mut control, &epoch);
            return Err(e);
        }
    };
    release_live_epoch(&mut control, &epoch, number, &disks);
    link.shim = Some(control);
    let live = Some(&epoch);
    Ok(report(&disks, number, &stats, applied, started, live))
}

/// Gives a failed epoch back to the shim now, saying so, rather than when the control
/// connection closes: its bits go in the next epoch, and the guest's writes stop paying
/// for copy-before-write at once.
fn give_back(control: &mut live::ShimControl, epoch: &live::LiveEpoch) {
    if let Err(abort) = control.abort(epoch) {
        tracing::warn!(
            "epoch {} failed and the shim did not confirm its abort ({}); closing the control connection aborts it",
            epoch.id,
            crate::chain(&abort)
        );
    }
}

/// Opens one disk of a frozen epoch and the view of its frozen blocks; for a
/// changed-block sync, loads the shim's frozen bitmap of it.
fn open_frozen_disk(
    job: &SyncJob,
    planned: &PlannedDisk<'_>,
    epoch: &live::LiveEpoch,
    granular: bool,
) -> Result<(OpenedDisk, EpochView), SourceError> {
    let PlannedDisk {
        spec,
        state,
        plan,
        reverse,
    } = planned;
    let frozen = epoch
        .disks
        .iter()
        .find(|d| d.name == spec.name)
        .ok_or_else(|| ShimControlError::FreezeLacksDisk {
            disk: spec.name.clone(),
        })?;
    let disk = Disk::open_source(&spec.path).map_err(|e| SourceError::Open {
        disk: spec.name.clone(),
        path: spec.path.clone(),
        source: e,
    })?;
    if disk.size() != frozen.disk_size {
        return Err(ShimControlError::SizeMismatch {
            disk: spec.name.clone(),
            shim_bytes: frozen.disk_size,
            image_bytes: disk.size(),
        }
        .into());
    }
    let generation = frozen.generation_id;
    let (bitmap, granules, mode) = match plan {
        LivePlan::Whole if job.mode == ModeRequest::Full => (None, None, SyncMode::Full),
        LivePlan::Whole => (None, None, SyncMode::Seeded),
        LivePlan::Changed => {
            let bitmap = frozen_bitmap(spec, frozen, &disk)?;
            let granules = frozen_granules(spec, frozen, &bitmap, granular)?;
            (Some(bitmap), granules, SyncMode::Changed)
        }
    };
    let mut opened = OpenedDisk {
        spec: (*spec).clone(),
        disk,
        generation,
        base_epoch: state.as_ref().map_or(0, |s| s.epoch),
        bitmap,
        granules,
        mode,
        replica_created: false,
        lineage: None,
        compare: false,
    };
    if let Some(r) = reverse {
        reverse_disk(&mut opened, r)?;
    }
    Ok((opened, live::view(frozen)?))
}

/// The frozen bits of a changed-block disk, checked against the disk and the epoch.
fn frozen_bitmap(
    spec: &JobDisk,
    frozen: &FreezeDisk,
    disk: &Disk,
) -> Result<ChangedBlockBitmap, SourceError> {
    let bitmap =
        ChangedBlockBitmap::load(&frozen.bitmap).map_err(|source| SourceError::Bitmap {
            disk: spec.name.clone(),
            source: BitmapProblem::LoadFrozen {
                path: frozen.bitmap.clone(),
                source,
            },
        })?;
    if bitmap.disk_size() != disk.size() || bitmap.generation_id() != frozen.generation_id {
        return Err(SourceError::Bitmap {
            disk: spec.name.clone(),
            source: BitmapProblem::FrozenMismatch,
        });
    }
    Ok(bitmap)
}

/// The granule masks of a changed-block disk frozen with `granules=on`. The shim then
/// preserved only those granules, so a file that cannot be read fails the epoch:
/// reading whole blocks instead could see writes made after the freeze.
fn frozen_granules(
    spec: &JobDisk,
    frozen: &FreezeDisk,
    bitmap: &ChangedBlockBitmap,
    granular: bool,
) -> Result<Option<GranuleMasks>, SourceError> {
    if !granular {
        return Ok(None);
    }
    let problem = |source| SourceError::Bitmap {
        disk: spec.name.clone(),
        source,
    };
    let path = frozen
        .granules
        .as_ref()
        .ok_or_else(|| problem(BitmapProblem::GranulesMissing))?;
    if ferry_io::failpoint::hit("source.granules.damaged") {
        // Test-only: the file damaged between the shim's write and this read.
        let _ = std::fs::write(path, b"damaged");
    }
    GranuleMasks::load(path, bitmap)
        .map(Some)
        .map_err(|e| problem(BitmapProblem::Granules(e)))
}

/// Turns a changed-block disk into one of reverse replication: the blocks rolled back
/// by the failover join the shim's bits.
fn reverse_disk(d: &mut OpenedDisk, r: &Reverse<'_>) -> Result<(), SourceError> {
    let bitmap = d
        .bitmap
        .as_mut()
        .expect("reverse disks go as changed blocks");
    if let Some(undone) = &r.disk.undone {
        let bs = u64::from(undone.block_size());
        let size = undone.disk_size().min(d.disk.size());
        for (first, count) in undone.iter_runs() {
            let start = first * bs;
            if start >= size {
                break;
            }
            let len = (count * bs).min(size - start);
            bitmap
                .set_range(start, len)
                .map_err(|e| SourceError::Bitmap {
                    disk: d.spec.name.clone(),
                    source: BitmapProblem::Diff(e),
                })?;
            if let Some(g) = &mut d.granules {
                g.mark(start, len);
            }
        }
        tracing::info!(
            disk = %d.spec.name,
            blocks = undone.count(),
            "reverse replication: the blocks the failover rolled back go too"
        );
    }
    d.mode = SyncMode::Reprotect;
    d.base_epoch = r.disk.point;
    d.lineage = Some(r.disk.lineage);
    d.compare = !r.tracked;
    Ok(())
}

/// After the target acknowledged epoch `number`: lets the shim forget its bits and
/// tells it which owed resyncs are done. Failures only warn: the next epoch resends.
fn release_live_epoch(
    control: &mut live::ShimControl,
    epoch: &live::LiveEpoch,
    number: u64,
    disks: &[OpenedDisk],
) {
    // The target holds the epoch (and the state files say so): the shim may forget
    // the bits. If this fails they stay, and the next epoch carries them again.
    if let Err(e) = control.commit(epoch) {
        tracing::warn!(
            "epoch {number} is durable on the target but the shim did not clear its bits ({}); the next epoch resends them",
            crate::chain(&e)
        );
    }
    // A disk whose shim still owes a resync is now in sync at the shim's generation,
    // whatever mode carried it (a changed epoch means an earlier whole-disk epoch of
    // this generation was acknowledged, and its `resync-done` may have been lost).
    for d in disks {
        let owed = epoch
            .disks
            .iter()
            .any(|f| f.name == d.spec.name && f.resync_required);
        if owed {
            if let Err(e) = control.resync_done(&d.spec.name, d.generation) {
                tracing::warn!(
                    disk = %d.spec.name,
                    "cannot tell the shim the resync is done: {}",
                    crate::chain(&e)
                );
            }
        }
    }
}

/// Whether two paths name the same file (or device).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => a == b,
    }
}

/// Streams the epoch on `connected` (or on `link`'s connection, or a new one) and
/// waits for the target's acknowledgement; then records the new epoch in the state
/// files and leaves the connection to `link` for the next epoch. `before_commit` runs
/// after the last block was sent and before the Commit frame.
///
/// A connection kept from an earlier epoch that fails on the wire before the target
/// answered the Open (the target closed it meanwhile: restarted, or timed the idle
/// session out) is replaced by a new one: nothing of the epoch reached the target.
/// A connection that breaks later fails the epoch, as a new one does.
fn run_epoch(
    job: &SyncJob,
    disks: &mut [OpenedDisk],
    views: &[Option<&EpochView>],
    before_commit: &mut dyn FnMut() -> Result<(), SourceError>,
    mut connected: Option<Connection>,
    link: &mut Link,
) -> Result<(u64, PipelineStats, u64), SourceError> {
    let mut attempts = 0;
    let mut busy_retries = 0;
    let (epoch, stats, applied) = loop {
        let epoch = disks.iter().map(|d| d.base_epoch).max().unwrap_or(0) + 1;
        if let Some(p) = &job.progress {
            p.set_epoch(epoch);
        }
        let mut conn = match connected.take() {
            Some(c) => c,
            None => link.take(job)?,
        };
        let reused = conn.epochs > 0;
        match session_once(job, disks, views, epoch, before_commit, &mut conn) {
            Err(e) if reused && !conn.opened && is_transport(&e) => {
                attempts += 1;
                tracing::info!(
                    "the connection kept from the previous epoch failed ({}); epoch {epoch} goes on a new one",
                    crate::chain(&e)
                );
            }
            // Right after giving a session up, the target may still be releasing it.
            Err(SourceError::Protocol(ProtocolError::Remote {
                code: crate::protocol::ErrorCode::Busy,
                ..
            })) if attempts > 0 && busy_retries < 40 => {
                busy_retries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(SourceError::EpochBehind { held }) if attempts < 2 => {
                attempts += 1;
                tracing::info!(
                    "the target already holds epoch {held} (acknowledged after this engine last recorded one); continuing from there"
                );
                for d in disks.iter_mut() {
                    d.base_epoch = d.base_epoch.max(held);
                }
            }
            Err(e) => return Err(e),
            Ok((stats, applied)) => {
                conn.epochs += 1;
                link.keep(conn);
                break (epoch, stats, applied);
            }
        }
    };

    for d in disks.iter() {
        SourceDiskState {
            generation: d.generation,
            epoch,
        }
        .save(&job.state_dir, &d.spec.name)?;
    }
    Ok((epoch, stats, applied))
}

/// An authenticated connection to the target. Every frame sent or received must
/// complete within `io_timeout` of its start (see [`crate::protocol::deadline`]).
struct Connection {
    reader: FrameReader<std::io::BufReader<TimedStream>>,
    writer: FrameWriter<TimedStream>,
    /// The protocol version agreed at the handshake.
    version: u16,
    /// Epochs acknowledged on this connection.
    epochs: u64,
    /// When the last frame went out.
    last_sent: Instant,
    /// The target answered the current epoch's Open.
    opened: bool,
}

impl Connection {
    /// Whether the target may still read an Open on this connection: between epochs it
    /// sends nothing, so anything readable (end of stream, a reset, an Error frame
    /// saying why it gave the session up) means it closed the session.
    fn open_between_epochs(&self) -> bool {
        if !self.reader.get_ref().buffer().is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        // The socket is non-blocking (see `TimedStream`): nothing to read is the answer
        // hoped for.
        matches!(
            self.writer.get_ref().get_ref().peek(&mut byte),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}

/// How long a connection kept between epochs may stay silent before it carries a
/// Keepalive: well within any target's `io_timeout_ms` but one below a few seconds
/// (the source also caps it at a quarter of its own), and a 32-byte frame a second
/// costs nothing.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

/// The connection to the target that `ferry source` keeps from one epoch to the next
/// ([`MULTI_EPOCH_VERSION`]): no connect and no handshake per epoch. Empty before the
/// first epoch, after an epoch that failed (the next one connects anew), and with a
/// target that speaks only version 2 (every epoch connects).
///
/// It keeps the shim's control connection too: the shim accepts control connections
/// on a poll (every 100 ms), which a connection per epoch would wait for every time.
#[derive(Default)]
pub struct Link {
    conn: Option<Connection>,
    shim: Option<live::ShimControl>,
}

impl Link {
    /// The connection for the next epoch: the one kept, if the target has not closed
    /// it, else a new one.
    fn take(&mut self, job: &SyncJob) -> Result<Connection, SourceError> {
        match self.conn.take() {
            Some(c) if c.open_between_epochs() => Ok(c),
            Some(c) => {
                tracing::info!(
                    "the target closed the connection after {} epoch(s); connecting again",
                    c.epochs
                );
                open_connection(job)
            }
            None => open_connection(job),
        }
    }

    /// Keeps `conn` for the next epoch if the target serves several on one connection.
    fn keep(&mut self, conn: Connection) {
        if conn.version >= MULTI_EPOCH_VERSION {
            self.conn = Some(conn);
        }
    }

    /// Between epochs: sends a Keepalive on the kept connection if nothing went out for
    /// [`KEEPALIVE_EVERY`] (or a quarter of `io_timeout`, if shorter), so that the
    /// target, which allows `io_timeout` for every frame, keeps the session however
    /// long the source waits for its next epoch. A connection that cannot take it is
    /// given up; the next epoch connects anew.
    pub fn keepalive(&mut self, io_timeout: Duration) {
        let Some(c) = &mut self.conn else { return };
        if c.last_sent.elapsed() < KEEPALIVE_EVERY.min(io_timeout / 4) {
            return;
        }
        match c.writer.send(FrameKind::Keepalive, &[]) {
            Ok(()) => c.last_sent = Instant::now(),
            Err(e) => {
                tracing::info!(
                    "the connection kept between epochs failed ({}); the next epoch connects anew",
                    crate::chain(&e)
                );
                self.conn = None;
            }
        }
    }
}

/// Connects to the target and authenticates.
fn open_connection(job: &SyncJob) -> Result<Connection, SourceError> {
    let stream = connect(&job.target, job.connect_timeout)?;
    let setup = |e| SourceError::Connect {
        addr: job.target.clone(),
        source: e,
    };
    crate::protocol::tune_socket(&stream, job.io_timeout).map_err(setup)?;
    let read_half = stream.try_clone().map_err(setup)?;
    let (read_deadline, write_deadline) = (
        FrameDeadline::new(job.io_timeout),
        FrameDeadline::new(job.io_timeout),
    );
    let mut reader = FrameReader::with_deadline(
        std::io::BufReader::with_capacity(
            64 << 10,
            TimedStream::new(read_half, read_deadline.clone()).map_err(setup)?,
        ),
        read_deadline,
    );
    let mut writer = FrameWriter::with_deadline(
        TimedStream::new(stream, write_deadline.clone()).map_err(setup)?,
        write_deadline,
    );
    let version = auth::client_handshake(&mut reader, &mut writer, &job.psk)?;
    Ok(Connection {
        reader,
        writer,
        version,
        epochs: 0,
        last_sent: Instant::now(),
        opened: false,
    })
}

/// Reaches the target of `job` and authenticates, then closes the connection without
/// opening anything (`ferry check --connect`); the protocol version agreed.
pub fn probe_target(job: &SyncJob) -> Result<u16, SourceError> {
    Ok(open_connection(job)?.version)
}

/// One session on `conn`: stream the epoch, wait for the acknowledgement.
fn session_once(
    job: &SyncJob,
    disks: &mut [OpenedDisk],
    views: &[Option<&EpochView>],
    epoch: u64,
    before_commit: &mut dyn FnMut() -> Result<(), SourceError>,
    conn: &mut Connection,
) -> Result<(PipelineStats, u64), SourceError> {
    let Connection {
        reader,
        writer,
        opened,
        version,
        ..
    } = conn;
    *opened = false;
    let watch_fd = std::os::fd::AsRawFd::as_raw_fd(writer.get_ref());
    let published = abort::publish(watch_fd);
    let result = run_session(
        job,
        disks,
        views,
        epoch,
        (reader, writer, opened),
        (watch_fd, *version),
        before_commit,
    );
    drop(published);
    conn.last_sent = Instant::now();
    // The target may have said why it stopped; prefer its words.
    result.map_err(|e| explain(e, &mut conn.reader))
}

fn report(
    disks: &[OpenedDisk],
    epoch: u64,
    stats: &PipelineStats,
    applied: u64,
    started: Instant,
    live: Option<&live::LiveEpoch>,
) -> SyncReport {
    let seconds = started.elapsed().as_secs_f64();
    let bytes_logical: u64 = disks.iter().map(|d| d.disk.size()).sum();
    SyncReport {
        epoch,
        bytes_logical,
        bytes_sent: stats.bytes_sent,
        bytes_payload: stats.bytes_payload_logical,
        throttled_s: stats.throttled_s,
        blocks_sent: stats.blocks_sent,
        zero_blocks_sent: stats.zero_blocks,
        bytes_read: stats.bytes_read,
        bytes_applied: applied,
        seconds,
        mb_per_s: rate_bytes(disks, stats) as f64 / seconds.max(1e-9) / 1e6,
        disks: disks
            .iter()
            .map(|d| DiskReport {
                name: d.spec.name.clone(),
                mode: d.mode.as_str(),
                bytes_logical: d.disk.size(),
                replica_created: d.replica_created,
            })
            .collect(),
        shim_epoch: live.map(|e| e.id),
        freeze_pause_us: live.map(|e| e.pause_us),
        frames_raw: stats.frames_raw,
        frames_zstd: stats.zstd_frames().collect(),
    }
}

/// The bytes a sync's rate is reported over: the disks it covered when every disk went
/// whole (full or seeded), the bytes it read when only changed blocks went (an empty
/// changed-block epoch moves nothing, at no rate).
fn rate_bytes(disks: &[OpenedDisk], stats: &PipelineStats) -> u64 {
    let whole = disks
        .iter()
        .all(|d| matches!(d.mode, SyncMode::Full | SyncMode::Seeded));
    if whole {
        disks.iter().map(|d| d.disk.size()).sum()
    } else {
        stats.bytes_read
    }
}

/// Whether `e` is the connection failing rather than the target refusing something.
fn is_transport(e: &SourceError) -> bool {
    matches!(
        e,
        SourceError::Protocol(ProtocolError::Io { .. })
            | SourceError::Protocol(ProtocolError::Truncated { .. })
            | SourceError::PeerInterrupted
    )
}

fn explain<R: std::io::Read>(e: SourceError, reader: &mut FrameReader<R>) -> SourceError {
    if is_transport(&e) {
        let mut buf = vec![0u8; 8192];
        if let Err(remote @ ProtocolError::Remote { .. }) = reader.read_frame(&mut buf) {
            return SourceError::Protocol(remote);
        }
    }
    e
}

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, SourceError> {
    let err = |source| SourceError::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut last = None;
    for a in addr.to_socket_addrs().map_err(err)? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "address resolved to nothing")
    })))
}

fn open_disk(job: &SyncJob, spec: &JobDisk) -> Result<OpenedDisk, SourceError> {
    if spec.name.len() > MAX_NAME_LEN {
        return Err(SourceError::NameTooLong {
            disk: spec.name.clone(),
        });
    }
    let disk = Disk::open_source(&spec.path).map_err(|e| SourceError::Open {
        disk: spec.name.clone(),
        path: spec.path.clone(),
        source: e,
    })?;
    let state = SourceDiskState::load(&job.state_dir, &spec.name)?;
    let (generation, base_epoch) = match &state {
        Some(s) => (s.generation, s.epoch),
        None => (random_generation()?, 0),
    };
    let bitmap_path = spec
        .bitmap
        .clone()
        .or_else(|| {
            let p = job.state_dir.join(format!("{}.cbt", spec.name));
            (job.mode == ModeRequest::Auto && p.exists()).then_some(p)
        })
        .filter(|_| matches!(job.mode, ModeRequest::Auto | ModeRequest::Changed));
    let mut bitmap = None;
    if let Some(path) = bitmap_path {
        match load_bitmap(&path, &spec.name, &disk, job.block_size, &state) {
            Ok(b) => bitmap = Some(b),
            Err(e) if job.mode == ModeRequest::Auto && spec.bitmap.is_none() => {
                tracing::warn!(
                    "{}; falling back to a seeded (checksum-compare) sync",
                    crate::chain(&e)
                );
            }
            Err(e) => return Err(e),
        }
    }
    let mode = match (job.mode, &bitmap) {
        (ModeRequest::Changed, None) => {
            return Err(SourceError::Bitmap {
                disk: spec.name.clone(),
                source: BitmapProblem::Missing,
            })
        }
        (ModeRequest::Changed | ModeRequest::Auto, Some(_)) => SyncMode::Changed,
        (ModeRequest::Full, _) => SyncMode::Full,
        (ModeRequest::Seeded | ModeRequest::Auto, _) => SyncMode::Seeded,
    };
    Ok(OpenedDisk {
        spec: spec.clone(),
        disk,
        generation,
        base_epoch,
        bitmap,
        granules: None,
        mode,
        replica_created: false,
        lineage: None,
        compare: false,
    })
}

fn load_bitmap(
    path: &Path,
    name: &str,
    disk: &Disk,
    block_size: usize,
    state: &Option<SourceDiskState>,
) -> Result<ChangedBlockBitmap, SourceError> {
    let bad = |source: BitmapProblem| SourceError::Bitmap {
        disk: name.to_string(),
        source,
    };
    let bitmap = ChangedBlockBitmap::load(path).map_err(|source| {
        bad(BitmapProblem::Load {
            path: path.to_path_buf(),
            source,
        })
    })?;
    if bitmap.disk_size() != disk.size() || bitmap.block_size() as usize != block_size {
        return Err(bad(BitmapProblem::Geometry {
            path: path.to_path_buf(),
            bitmap_bytes: bitmap.disk_size(),
            bitmap_block_size: bitmap.block_size(),
            disk_bytes: disk.size(),
            block_size,
        }));
    }
    let Some(state) = state else {
        return Err(bad(BitmapProblem::NoBase {
            path: path.to_path_buf(),
        }));
    };
    if bitmap.generation_id() != state.generation || bitmap.epoch() != state.epoch {
        return Err(bad(BitmapProblem::Generation {
            path: path.to_path_buf(),
            bitmap_epoch: bitmap.epoch(),
            bitmap_generation: bitmap.generation_id(),
            epoch: state.epoch,
            generation: state.generation,
        }));
    }
    Ok(bitmap)
}

type BoxedPlan<'a> = Box<dyn Iterator<Item = Result<PlanItem, SourceError>> + Send + 'a>;

/// The connection's two halves and where to note that the target answered the Open.
type Wire<'c, R, W> = (&'c mut FrameReader<R>, &'c mut FrameWriter<W>, &'c mut bool);

fn run_session<R: std::io::Read, W: std::io::Write>(
    job: &SyncJob,
    disks: &mut [OpenedDisk],
    views: &[Option<&EpochView>],
    epoch: u64,
    (reader, writer, opened): Wire<'_, R, W>,
    socket: (std::os::fd::RawFd, u16),
    before_commit: &mut dyn FnMut() -> Result<(), SourceError>,
) -> Result<(PipelineStats, u64), SourceError> {
    // Every reply the target sends fits, up to a DiffRuns frame of the most runs.
    let mut buf = vec![0u8; MAX_REPLY_PAYLOAD];
    open_epoch(job, disks, epoch, reader, writer, &mut buf)?;
    *opened = true;
    let infos: Vec<DiskInfo<'_>> = disks
        .iter()
        .zip(views)
        .map(|(d, view)| DiskInfo {
            fd: d.disk.fd(),
            disk_size: d.disk.size(),
            replica_zeroed: d.replica_created,
            frozen: *view,
        })
        .collect();
    let mut total = PipelineStats::default();
    if disks
        .iter()
        .any(|d| matches!(d.mode, SyncMode::Seeded | SyncMode::Reprotect))
    {
        if let Some(p) = &job.progress {
            let compared = disks
                .iter()
                .filter(|d| d.mode == SyncMode::Seeded || d.compare)
                .map(|d| d.disk.size())
                .sum();
            p.enter(progress::Phase::Comparing, compared);
        }
        let cfg = pipeline_config(job, Output::Hashes, socket);
        let hashes = seed_compare(job, &cfg, disks, &infos, reader, writer, &mut buf)?;
        // Hashing sends no blocks: only the data phase counts what travelled.
        add(&mut total, &hashes);
        total.blocks_sent = 0;
        total.zero_blocks = 0;
    }
    let cfg = pipeline_config(job, Output::Data, socket);
    if let Some(p) = &job.progress {
        p.enter(progress::Phase::Sending, data_bytes(job, disks));
    }
    let (stats, manifests) = stream_data(job, &cfg, disks, &infos, writer)?;
    add(&mut total, &stats);
    if let Some(p) = &job.progress {
        p.enter(progress::Phase::Committing, 0);
    }
    before_commit()?;
    let bytes_applied = commit_epoch(epoch, &manifests, reader, writer, &mut buf)?;
    // The Open and Commit frames (headers and payloads) went on the wire too.
    total.bytes_sent += (2 * crate::protocol::FRAME_HEADER_LEN
        + core::mem::size_of::<OpenHeader>()
        + disks.len() * core::mem::size_of::<OpenDisk>()
        + core::mem::size_of::<Commit>()
        + manifests.as_bytes().len()) as u64;
    Ok((total, bytes_applied))
}

/// Sends the Open frame and reads the target's per-disk replies: a replica the target
/// just created turns a seeded disk into a full sync.
fn open_epoch<R: std::io::Read, W: std::io::Write>(
    job: &SyncJob,
    disks: &mut [OpenedDisk],
    epoch: u64,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    buf: &mut [u8],
) -> Result<(), SourceError> {
    let header = OpenHeader {
        epoch: epoch.into(),
        disk_count: (disks.len() as u32).into(),
        max_batch_bytes: (job.io_size as u32).into(),
    };
    let entries: Vec<OpenDisk> = disks
        .iter()
        .map(|d| {
            let mut name = [0u8; MAX_NAME_LEN];
            name[..d.spec.name.len()].copy_from_slice(d.spec.name.as_bytes());
            OpenDisk {
                name,
                name_len: d.spec.name.len() as u8,
                mode: d.mode as u8,
                flags: open_flags(job),
                reserved: 0,
                block_size: (job.block_size as u32).into(),
                disk_size: d.disk.size().into(),
                // 16 bytes on the wire.
                generation: *d.generation.as_bytes(),
                base_epoch: if matches!(d.mode, SyncMode::Changed | SyncMode::Reprotect) {
                    d.base_epoch
                } else {
                    0
                }
                .into(),
            }
        })
        .collect();
    writer.send(FrameKind::Open, &[header.as_bytes(), entries.as_bytes()])?;
    let payload = reader.expect(FrameKind::OpenOk, buf)?;
    let replies = <[OpenDiskReply]>::ref_from_bytes(payload)
        .ok()
        .filter(|r| r.len() == disks.len())
        .ok_or(ProtocolError::Malformed {
            what: "open reply does not match the disks opened",
        })?;
    check_replies(disks, replies, epoch)
}

/// The target's reply to the Open: the lineage of every reverse-replicated disk, an
/// epoch number not used yet, and which replicas it created.
fn check_replies(
    disks: &mut [OpenedDisk],
    replies: &[OpenDiskReply],
    epoch: u64,
) -> Result<(), SourceError> {
    // Reverse replication onto anything but the lineage this site was promoted from
    // would leave the replica different from both: stop before a block travels.
    for (d, r) in disks.iter_mut().zip(replies) {
        let Some(lineage) = d.lineage else { continue };
        let held = GenerationId::from_bytes(r.generation);
        if r.state == crate::protocol::REPLICA_COMPARE && !d.compare {
            tracing::warn!(disk = %d.spec.name, "reverse replication: the old primary does not know what was written to its disk since epoch {}: comparing every block (seeded)", r.epoch.get());
            d.compare = true;
        }
        if held == d.generation {
            // An earlier run's reverse epoch committed there and its answer was lost:
            // the replica holds this site's generation, and the shim's bits (not yet
            // released) cover every write since.
            tracing::info!(disk = %d.spec.name, "the reverse epoch was acknowledged before (epoch {}); continuing from it", r.epoch.get());
            continue;
        }
        if held != lineage {
            return Err(reprotect::ReprotectError::UnrelatedLineage {
                disk: d.spec.name.clone(),
                promoted: lineage,
                replica: held,
            }
            .into());
        }
    }
    // A replica may already hold this epoch number: the target acknowledged an epoch
    // the engine died before recording. Epoch numbers name recovery points, so they
    // must not repeat: start again above it.
    if let Some(held) = replies
        .iter()
        .map(|r| r.epoch.get())
        .filter(|&e| e >= epoch)
        .max()
    {
        return Err(SourceError::EpochBehind { held });
    }
    for (d, r) in disks.iter_mut().zip(replies) {
        d.replica_created = r.state == REPLICA_CREATED;
        if d.replica_created && d.mode == SyncMode::Seeded {
            // Comparing against a new, all-zero replica is a full sync.
            d.mode = SyncMode::Full;
        }
    }
    Ok(())
}

/// The pipeline settings of `job` on a connection (`watch_fd`) that speaks `version`.
fn pipeline_config(
    job: &SyncJob,
    output: Output,
    (watch_fd, version): (std::os::fd::RawFd, u16),
) -> PipelineConfig {
    PipelineConfig {
        block_size: job.block_size,
        io_size: job.io_size,
        queue_depth: job.queue_depth,
        workers: job.workers,
        compression: job.compression,
        engine: job.engine,
        output,
        watch_fd: Some(watch_fd),
        throttle: job.throttle.clone(),
        streams: version >= STREAM_RECORDS_VERSION,
    }
}

fn geometry(job: &SyncJob, i: usize, d: &OpenedDisk) -> Geometry {
    Geometry {
        disk: i as u32,
        disk_size: d.disk.size(),
        block_size: job.block_size as u64,
        io_size: job.io_size as u64,
    }
}

/// Seeded disks: sends the hash of every block, then records the runs the target
/// reports as different in each seeded disk's new bitmap.
fn seed_compare<R: std::io::Read, W: std::io::Write>(
    job: &SyncJob,
    cfg: &PipelineConfig,
    disks: &mut [OpenedDisk],
    infos: &[DiskInfo<'_>],
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    buf: &mut [u8],
) -> Result<PipelineStats, SourceError> {
    let plans: Vec<BoxedPlan<'_>> = disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.mode == SyncMode::Seeded || d.compare)
        .map(|(i, d)| extent_plan(&d.disk, geometry(job, i, d), true))
        .collect();
    let plan = progress::counted(plans.into_iter().flatten(), job.progress.as_deref());
    let stats = pipeline::run(cfg, infos, plan, writer, None)?;
    writer.send(FrameKind::HashesDone, &[])?;
    for d in disks.iter_mut().filter(|d| d.mode == SyncMode::Seeded) {
        let bitmap = ChangedBlockBitmap::new(
            d.disk.size(),
            job.block_size as u32,
            d.generation,
            d.base_epoch,
        )
        .map_err(|e| SourceError::Bitmap {
            disk: d.spec.name.clone(),
            source: BitmapProblem::Diff(e),
        })?;
        d.bitmap = Some(bitmap);
    }
    loop {
        match reader.read_frame(buf)? {
            Some((FrameKind::DiffRuns, payload)) => {
                let runs =
                    <[DiskRun]>::ref_from_bytes(payload).map_err(|_| ProtocolError::Malformed {
                        what: "diff runs payload is not a whole number of runs",
                    })?;
                for run in runs {
                    mark_diff_run(job, disks, run)?;
                }
            }
            Some((FrameKind::DiffDone, _)) => return Ok(stats),
            Some((kind, _)) => {
                return Err(ProtocolError::Unexpected {
                    expected: FrameKind::DiffDone,
                    found: kind,
                }
                .into())
            }
            None => {
                return Err(ProtocolError::Truncated {
                    what: "connection closed during the hash compare",
                }
                .into())
            }
        }
    }
}

/// Marks one run of blocks the target reported as different in its disk's bitmap.
fn mark_diff_run(
    job: &SyncJob,
    disks: &mut [OpenedDisk],
    run: &DiskRun,
) -> Result<(), SourceError> {
    let d = disks
        .get_mut(run.disk.get() as usize)
        .filter(|d| matches!(d.mode, SyncMode::Seeded | SyncMode::Reprotect))
        .ok_or(ProtocolError::Malformed {
            what: "diff run names a disk that is not being seeded",
        })?;
    let bs = job.block_size as u64;
    let disk_size = d.disk.size();
    let (start, count) = (run.start.get(), run.count.get());
    if start
        .checked_add(count)
        .is_none_or(|end| end > disk_size.div_ceil(bs))
    {
        return Err(ProtocolError::Malformed {
            what: "diff run past the end of the disk",
        }
        .into());
    }
    let bitmap = d.bitmap.as_mut().expect("seeded disks have a diff bitmap");
    let len = (count * bs).min(disk_size - start * bs);
    bitmap
        .set_range(start * bs, len)
        .map_err(|e| SourceError::Bitmap {
            disk: d.spec.name.clone(),
            source: BitmapProblem::Diff(e),
        })?;
    // Whole blocks: a granule refinement must not narrow them.
    if let Some(g) = &mut d.granules {
        g.mark(start * bs, len);
    }
    Ok(())
}

/// Bytes of disk the data phase covers: each bitmap's blocks, or the whole disk.
fn data_bytes(job: &SyncJob, disks: &[OpenedDisk]) -> u64 {
    disks
        .iter()
        .map(|d| match (&d.bitmap, &d.granules) {
            (Some(b), Some(g)) => g.ranges(b).map(|(_, len)| len).sum(),
            (Some(b), None) => (b.count() * job.block_size as u64).min(d.disk.size()),
            (None, _) => d.disk.size(),
        })
        .sum()
}

/// Streams every block to send (a bitmap's dirty blocks, or the whole disk) and returns
/// what went on the wire per disk, for the target to check before it commits.
fn stream_data<W: std::io::Write>(
    job: &SyncJob,
    cfg: &PipelineConfig,
    disks: &[OpenedDisk],
    infos: &[DiskInfo<'_>],
    writer: &mut FrameWriter<W>,
) -> Result<(PipelineStats, Vec<DiskManifest>), SourceError> {
    let plans: Vec<BoxedPlan<'_>> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| match &d.bitmap {
            Some(b) => bitmap_plan(b, d.granules.as_ref(), geometry(job, i, d)),
            None => extent_plan(&d.disk, geometry(job, i, d), !d.replica_created),
        })
        .collect();
    let mut manifests = vec![ManifestBuilder::new(); disks.len()];
    let nothing_to_send = disks
        .iter()
        .all(|d| d.bitmap.as_ref().is_some_and(|b| b.count() == 0));
    if nothing_to_send {
        // An idle epoch: no change on any disk. Its plan is empty, so the pipeline
        // (buffer pools, reader and worker threads, an io_uring ring) would start only
        // to send nothing; the empty manifests say the same.
        let manifests = manifests.iter().map(ManifestBuilder::finish).collect();
        return Ok((PipelineStats::default(), manifests));
    }
    let plan = progress::counted(plans.into_iter().flatten(), job.progress.as_deref());
    let stats = pipeline::run(cfg, infos, plan, writer, Some(&mut manifests))?;
    let manifests = manifests.iter().map(ManifestBuilder::finish).collect();
    Ok((stats, manifests))
}

/// Sends Commit with the manifests and waits for the target's durable acknowledgement;
/// returns the bytes the target applied.
fn commit_epoch<R: std::io::Read, W: std::io::Write>(
    epoch: u64,
    manifests: &[DiskManifest],
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    buf: &mut [u8],
) -> Result<u64, SourceError> {
    writer.send(
        FrameKind::Commit,
        &[
            Commit {
                epoch: epoch.into(),
                disk_count: (manifests.len() as u32).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
            manifests.as_bytes(),
        ],
    )?;
    writer.flush()?;
    let payload = reader.expect(FrameKind::Committed, buf)?;
    let committed = Committed::read_from_bytes(payload).map_err(|_| ProtocolError::Malformed {
        what: "committed frame has the wrong length",
    })?;
    if committed.epoch.get() != epoch {
        return Err(ProtocolError::WrongAck {
            acknowledged: committed.epoch.get(),
            committed: epoch,
        }
        .into());
    }
    Ok(committed.bytes_applied.get())
}

fn add(total: &mut PipelineStats, s: &PipelineStats) {
    total.bytes_sent += s.bytes_sent;
    total.blocks_sent += s.blocks_sent;
    total.zero_blocks += s.zero_blocks;
    total.bytes_read += s.bytes_read;
    total.bytes_payload_logical += s.bytes_payload_logical;
    total.throttled_s += s.throttled_s;
    total.frames_raw += s.frames_raw;
    for (t, n) in total.frames_zstd.iter_mut().zip(s.frames_zstd) {
        *t += n;
    }
}

fn extent_plan<'a>(disk: &'a Disk, g: Geometry, emit_holes: bool) -> BoxedPlan<'a> {
    let disk_no = g.disk;
    let extents = io::data_extents(disk).map(move |r| {
        r.map_err(|e| SourceError::Io {
            disk: Some(disk_no),
            source: e,
        })
    });
    Box::new(Chunker::new(ExtentRegions::new(extents, g), g, emit_holes))
}

/// The reads of a changed-block pass: the blocks of `bitmap`, or only their granules
/// in `granules`.
fn bitmap_plan<'a>(
    bitmap: &'a ChangedBlockBitmap,
    granules: Option<&'a GranuleMasks>,
    g: Geometry,
) -> BoxedPlan<'a> {
    if let Some(masks) = granules {
        return Box::new(RangeReads::new(masks.ranges(bitmap), g).map(Ok));
    }
    let regions = bitmap
        .iter_runs()
        .map(|(first, count)| Ok::<_, SourceError>(Region::Data { first, count }));
    Box::new(Chunker::new(regions, g, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: usize = 4096;
    const GEN: GenerationId = GenerationId::from_bytes([7; 16]);

    fn shim_disk(generation: GenerationId, block_size: u32) -> StatusDisk {
        StatusDisk {
            name: "vda".into(),
            path: PathBuf::from("/dev/null"),
            generation_id: generation,
            block_size,
            block_count: 16,
            dirty_blocks: 0,
            frozen_blocks: None,
            resync_required: false,
            resync_reason: None,
            bitmap_syncs: 0,
            marks_waited: 0,
            tracking_failed: false,
            connections: 0,
            writes_refused: false,
            generation_born: None,
        }
    }

    fn synced(generation: GenerationId) -> SourceDiskState {
        SourceDiskState {
            generation,
            epoch: 3,
        }
    }

    #[test]
    fn same_generation_goes_changed() {
        let state = synced(GEN);
        for mode in [ModeRequest::Auto, ModeRequest::Changed] {
            let plan = plan_live_disk(mode, BLOCK, &shim_disk(GEN, 4096), Some(&state));
            assert_eq!(plan.unwrap(), LivePlan::Changed, "{mode:?}");
        }
    }

    #[test]
    fn whole_disk_when_asked_whatever_the_state() {
        let state = synced(GEN);
        for mode in [ModeRequest::Full, ModeRequest::Seeded] {
            for state in [None, Some(&state)] {
                let plan = plan_live_disk(mode, BLOCK, &shim_disk(GEN, 4096), state);
                assert_eq!(plan.unwrap(), LivePlan::Whole, "{mode:?} {state:?}");
            }
        }
    }

    #[test]
    fn a_state_file_keeps_its_text_and_refuses_a_garbled_generation() {
        let text = r#"{"generation":"07070707070707070707070707070707","epoch":3}"#;
        let state: SourceDiskState = serde_json::from_str(text).unwrap();
        assert_eq!((state.generation, state.epoch), (GEN, 3));
        assert_eq!(serde_json::to_string(&state).unwrap(), text);
        let dir = tempfile::tempdir().unwrap();
        let garbled = r#"{"generation":"not hex","epoch":3}"#;
        std::fs::write(SourceDiskState::path(dir.path(), "vda"), garbled).unwrap();
        let err = SourceDiskState::load(dir.path(), "vda").unwrap_err();
        assert!(
            matches!(&err, SourceError::StateContent { source, .. }
                if source.to_string().contains("is not 32 hex digits")),
            "{err:?}"
        );
    }

    #[test]
    fn auto_goes_whole_without_the_shims_generation() {
        let other = synced(GenerationId::from_bytes([9; 16]));
        for state in [None, Some(&other)] {
            let plan = plan_live_disk(ModeRequest::Auto, BLOCK, &shim_disk(GEN, 4096), state);
            assert_eq!(plan.unwrap(), LivePlan::Whole, "{state:?}");
        }
    }

    #[test]
    fn changed_without_the_shims_generation_is_refused() {
        let other = synced(GenerationId::from_bytes([9; 16]));
        for state in [None, Some(&other)] {
            let err = plan_live_disk(ModeRequest::Changed, BLOCK, &shim_disk(GEN, 4096), state)
                .unwrap_err();
            assert!(
                matches!(
                    &err,
                    SourceError::Bitmap { disk, source: BitmapProblem::ShimGeneration { synced, .. } }
                        if disk == "vda" && *synced == state.map(|s| (s.epoch, s.generation))
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn block_size_must_match_only_for_changed_blocks() {
        let state = synced(GEN);
        let err = plan_live_disk(
            ModeRequest::Auto,
            BLOCK,
            &shim_disk(GEN, 65536),
            Some(&state),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                SourceError::BlockSizeMismatch {
                    shim_block_size: 65536,
                    block_size: BLOCK,
                    ..
                }
            ),
            "{err:?}"
        );
        // A whole-disk epoch reads the disk, not the shim's bitmap: any block size does.
        let plan = plan_live_disk(
            ModeRequest::Full,
            BLOCK,
            &shim_disk(GEN, 65536),
            Some(&state),
        );
        assert_eq!(plan.unwrap(), LivePlan::Whole);
    }
}
