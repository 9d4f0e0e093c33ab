//! The target writer: accepts authenticated sources, verifies every block and applies
//! it to the configured replica disks, acknowledging an epoch only once it is durable.
//!
//! One thread per session receives and verifies frames; an applier thread per session
//! writes verified blocks with io_uring. Nothing reaches a replica before its frame's
//! checksum, every record's bounds and every block's hash were checked.

mod apply;
pub mod failover;
pub mod points;
mod received;
pub mod rejection;
pub mod reprotect;
pub mod role;
mod session;
pub mod stamp;
pub mod state;
pub mod undo;
#[doc(hidden)] // Public only so fuzz/ can drive it; not an API.
pub mod verify;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ferry_ringbuf::pool::PoolError;
use filter_driver_shim_contract::bitmap::BitmapError;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError};
use crate::durable::StateOp;
use crate::io::{EngineKind, IoError};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::psk::{Psk, PskError};
pub use apply::ApplyError;
pub use rejection::Rejection;
pub use state::StateFileError;
pub use undo::LogDamage;

/// How long a connection has, from the moment it is accepted, to complete the whole
/// handshake (Hello, Challenge, Auth, AuthOk). A real source needs a few round trips,
/// milliseconds even across continents; five seconds leave room for a loaded host,
/// while a peer that trickles its Hello (or never sends it) is dropped long before
/// it could matter. Not configurable: `io_timeout_ms` bounds frames of an
/// authenticated session, this bounds what an unknown peer may cost.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Connections in their handshake at once, counted apart from `max_sessions`. Each
/// costs a thread and a socket for at most [`HANDSHAKE_DEADLINE`]; 64 is far more
/// than the sources of one target reconnecting together, and more than a handful of
/// hostile peers can hold. Past it, new connections are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// One replica disk the target may write.
#[derive(Debug, Clone)]
pub struct TargetDisk {
    pub name: String,
    pub path: PathBuf,
}

/// A fully resolved target configuration (built from the config by the CLI).
#[derive(Clone)]
pub struct TargetJob {
    pub listen: String,
    pub psk: [u8; 32],
    pub state_dir: PathBuf,
    pub disks: Vec<TargetDisk>,
    pub queue_depth: usize,
    pub engine: EngineKind,
    pub io_timeout: Duration,
    pub max_sessions: usize,
    /// Recovery points kept (see [`points`]).
    pub retention: points::Retention,
    /// The `[source] state_dir` of a site whose config has both roles: a disk this
    /// site's own engine replicates (it has a lineage there) is the primary's disk, and
    /// this target refuses to write it.
    pub own_source_state: Option<PathBuf>,
}

impl std::fmt::Debug for TargetJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key; its fingerprint identifies it well enough.
        f.debug_struct("TargetJob")
            .field("listen", &self.listen)
            .field("psk", &Psk::from_bytes(self.psk))
            .field("state_dir", &self.state_dir)
            .field("disks", &self.disks)
            .field("queue_depth", &self.queue_depth)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl TargetJob {
    /// Each configured disk's name and replica path.
    pub fn replicas(&self) -> Vec<(String, PathBuf)> {
        self.disks
            .iter()
            .map(|d| (d.name.clone(), d.path.clone()))
            .collect()
    }

    /// Resolves the target job from the `[target]` section and the disks of `config`.
    pub fn from_config(config: &Config) -> Result<Self, TargetError> {
        let target = config.require_target("target")?;
        let psk = Psk::load(&target.psk_file)?;
        Ok(TargetJob {
            listen: target.listen.to_string(),
            psk: *psk.as_bytes(),
            state_dir: target.state_dir.clone(),
            disks: config
                .disks
                .iter()
                .map(|d| TargetDisk {
                    name: d.name.clone(),
                    path: d.path.clone(),
                })
                .collect(),
            queue_depth: target.queue_depth as usize,
            engine: target.io_engine.into(),
            io_timeout: target.io_timeout(),
            max_sessions: target.max_sessions as usize,
            retention: points::Retention {
                points: target.retention_points,
                minutes: target.retention_minutes,
                grid: target.keep_grid.clone(),
            },
            own_source_state: config.source.as_ref().map(|s| s.state_dir.clone()),
        })
    }
}

/// Why a session (or the listener) stopped.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer did not complete the handshake (or failed to authenticate).
    #[error("handshake")]
    Handshake(#[source] ProtocolError),
    /// The peer sent something we refuse; the peer was told why, with its code.
    #[error(transparent)]
    Rejected(Rejection),
    #[error("disk {disk}: replica I/O failed")]
    Io {
        disk: String,
        #[source]
        source: IoError,
    },
    /// A system call on a state file or directory failed.
    #[error("state {}: {op}", path.display())]
    State {
        path: PathBuf,
        op: StateOp,
        #[source]
        source: std::io::Error,
    },
    /// A state file (replica record, point metadata) holds something unusable.
    #[error("state {}", path.display())]
    StateFile {
        path: PathBuf,
        #[source]
        source: StateFileError,
    },
    /// An undo log cannot be trusted: it is not applied.
    #[error("state {}", path.display())]
    UntrustedLog {
        path: PathBuf,
        #[source]
        source: LogDamage,
    },
    /// An interrupted epoch's log names a disk the config no longer has.
    #[error("state {}: disk {disk:?} of an interrupted epoch is no longer configured; restore its [[disk]] entry to recover", log.display())]
    UnconfiguredDisk { log: PathBuf, disk: String },
    /// Reading the bytes an epoch is about to overwrite, for its undo log, failed.
    #[error("replica of disk #{disk}: reading old bytes at {offset}")]
    ReadOldBytes {
        disk: u32,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// Opening a point first settles interrupted epochs; this one cannot be settled.
    #[error("state {}: an interrupted epoch cannot be settled, so no point can be opened", log.display())]
    Unsettled {
        log: PathBuf,
        #[source]
        source: Box<TargetError>,
    },
    /// A replica is suspect (see [`state::ReplicaRecord::suspect`]): no point opens.
    #[error("state {}: the replicas are not at a known epoch ({why}); a full or seeded sync must verify them before any point opens", state_dir.display())]
    NotAtKnownEpoch { state_dir: PathBuf, why: String },
    #[error("state {}: no recovery point {point}; available: {}", dir.display(), available.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))]
    NoSuchPoint {
        dir: PathBuf,
        point: u64,
        available: Vec<u64>,
    },
    /// A kept log on the way to the point is damaged; it was retired.
    #[error("state {}: recovery point {point} (and every older one) cannot be restored, the log was retired", log.display())]
    PointRetired {
        log: PathBuf,
        point: u64,
        #[source]
        source: LogDamage,
    },
    #[error("state {}: no acknowledged epoch for disk {disk:?}", replica.display())]
    NoRecord { replica: PathBuf, disk: String },
    #[error("state {}: copy: the replica is shorter than its recorded size", replica.display())]
    ReplicaShort { replica: PathBuf },
    /// The configured engine cannot run sessions here; found at start-up.
    #[error("io_engine = \"{kind}\" cannot work here, where a session registers {registered_kib} KiB of buffers (io_engine = \"auto\" would fall back to the synchronous engine)")]
    Engine {
        kind: EngineKind,
        registered_kib: usize,
        #[source]
        source: IoError,
    },
    /// The configuration has no usable `[target]` section.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The key file cannot be used.
    #[error(transparent)]
    Key(#[from] PskError),
    #[error("socket setup")]
    Socket(#[source] std::io::Error),
    #[error("buffer pool")]
    Pool(#[source] PoolError),
    #[error("zstd")]
    Zstd(#[source] std::io::Error),
    #[error("cannot start the applier")]
    ApplierThread(#[source] std::io::Error),
    /// The applier stopped taking work or answering (it failed or panicked).
    #[error("applier gone")]
    ApplierGone,
    #[error("the applier thread panicked")]
    ApplierPanicked,
    /// A frame that needs a scratch buffer arrived without one (a bug).
    #[error("scratch buffer missing")]
    ScratchMissing,
    #[error("diff bitmap")]
    DiffBitmap(#[source] BitmapError),
    /// Applying the epoch to the replicas failed (reported by the applier's barrier).
    #[error(transparent)]
    Apply(Arc<ApplyError>),
    #[error(transparent)]
    ChangeSet(reprotect::ChangeSetError),
    /// The source authenticated and closed the connection without opening an epoch
    /// (`ferry check --connect` does).
    #[error("authenticated and closed without an epoch (a connection check)")]
    ClosedBeforeOpen,
    /// A failover command refuses (see [`failover`]).
    #[error(transparent)]
    Failover(#[from] failover::FailoverError),
}

impl TargetError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Rejected(r) => r.code(),
            Self::Protocol(p) | Self::Handshake(p) => p.code(),
            Self::Io { .. } | Self::Apply(_) => ErrorCode::Io,
            _ => ErrorCode::Internal,
        }
    }
}

/// State shared by every session of one target process.
pub(crate) struct Shared {
    pub job: TargetJob,
    /// Disks held by a live session: a replica has one writer at a time.
    pub busy: Mutex<HashSet<String>>,
    /// Authenticated sessions, bounded by `max_sessions`.
    pub sessions: AtomicUsize,
    /// Connections still in their handshake, bounded by [`MAX_PENDING_HANDSHAKES`].
    pub pending: AtomicUsize,
    /// Undo logs of abandoned epochs whose rollback failed (EIO, a vanished device),
    /// with their disks. Those disks stay in `busy` — between epochs, no session may
    /// write or read them — until the next session that asks for one of them
    /// completes the rollback.
    pub quarantine: Mutex<Vec<(std::path::PathBuf, Vec<String>)>>,
}

/// A bound, not yet serving, target. Split from [`Target::serve`] so callers (tests,
/// the demo) can learn the port before serving.
pub struct Target {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Target {
    pub fn bind(job: TargetJob) -> Result<Self, TargetError> {
        crate::durable::ensure_dir(&job.state_dir).map_err(|source| TargetError::State {
            path: job.state_dir.clone(),
            op: StateOp::Create,
            source,
        })?;
        // Finish or undo any epoch a previous run was applying when it died, before
        // anything can read or write a replica. A log that cannot be settled now keeps
        // its disks out of service (the next session for them retries); the others
        // serve.
        let mut quarantine = Vec::new();
        let mut busy = HashSet::new();
        // Under the apply lock, like an epoch: a failover running meanwhile takes it
        // alone.
        let settle_lock = apply_lock(&job.state_dir, false)?;
        let recovered = undo::recover(&job.state_dir, &job.replicas())?;
        drop(settle_lock);
        for r in recovered {
            match r {
                undo::Recovery::Pending { log, disks, error } => {
                    tracing::error!(
                        "an interrupted epoch ({}) cannot be settled now: {}; disk(s) {} stay out of service until a session for them settles it",
                        log.display(),
                        crate::chain(&error),
                        disks.join(", ")
                    );
                    busy.extend(disks.iter().cloned());
                    quarantine.push((log, disks));
                }
                undo::Recovery::Distrusted {
                    log,
                    set_aside,
                    disks,
                    problem,
                } => tracing::error!(
                    "undo log {} cannot be trusted and was not applied: {problem}; it was set aside as {}, and disk(s) {} need a checksum-compare (seeded) resync before any changed-block epoch; their recovery points were retired",
                    log.display(),
                    set_aside.display(),
                    disks.join(", ")
                ),
                r => tracing::warn!("recovered an interrupted epoch: {r}"),
            }
        }
        probe_engine(&job)?;
        let listener = TcpListener::bind(&job.listen).map_err(|e| TargetError::Listen {
            addr: job.listen.clone(),
            source: e,
        })?;
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                job,
                busy: Mutex::new(busy),
                sessions: AtomicUsize::new(0),
                pending: AtomicUsize::new(0),
                quarantine: Mutex::new(quarantine),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves sessions until the process ends. Each session runs on its own thread; a
    /// failed session is logged and never takes the listener down.
    pub fn serve(self) -> Result<(), TargetError> {
        tracing::info!(
            "target listening on {} for {} disk(s)",
            self.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            self.shared.job.disks.len()
        );
        for conn in self.listener.incoming() {
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            };
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            let shared = Arc::clone(&self.shared);
            let peer_for_thread = peer.clone();
            // Until it has authenticated, a connection counts against its own bound,
            // not `max_sessions`: peers that never finish a handshake cannot keep a
            // source out, and each is dropped at the handshake deadline.
            let pending = shared.pending.fetch_add(1, Ordering::AcqRel);
            if pending >= MAX_PENDING_HANDSHAKES {
                shared.pending.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!("{peer}: refused, {pending} connections already in their handshake");
                continue;
            }
            let accepted = Instant::now();
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-session-{peer}"))
                .spawn(move || {
                    let peer = peer_for_thread;
                    let result = session::run(&shared, stream, accepted);
                    crate::metrics::target().ended(&result);
                    match result {
                        Ok(summary) => tracing::info!("{peer}: {summary}"),
                        Err(e @ TargetError::Handshake(_)) => {
                            tracing::warn!("{peer}: dropped: {}", crate::chain(&e))
                        }
                        // A promoted site refusing a source is its role working, not
                        // a failure here; the source reports it as one.
                        Err(e @ TargetError::ClosedBeforeOpen) => {
                            tracing::info!("{peer}: {e}")
                        }
                        Err(e @ TargetError::Rejected(Rejection::Fenced { .. })) => {
                            tracing::warn!("{peer}: refused: {}", crate::chain(&e))
                        }
                        Err(e) => tracing::error!("{peer}: session failed: {}", crate::chain(&e)),
                    }
                });
            if let Err(e) = spawned {
                // The closure (and its stream) was dropped unrun: give its place back.
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                tracing::error!("{peer}: cannot start a session thread: {e}");
            }
        }
        Ok(())
    }
}

/// Builds, once at start-up, the engine a session with the default batch size would
/// build — ring, opcodes, registered buffers — so that an `io_engine = "uring"` that
/// cannot work (io_uring disabled, RLIMIT_MEMLOCK too low to pin the buffers) stops the
/// target with the likely fix instead of failing every session after `listening`.
/// With `auto` a failing probe only warns: each session falls back on its own.
fn probe_engine(job: &TargetJob) -> Result<(), TargetError> {
    let slot_bytes = verify::frame_bound(
        crate::config::DEFAULT_IO_SIZE_KIB as usize * 1024,
        crate::io::DIRECT_IO_ALIGN,
    )
    .min(crate::protocol::MAX_FRAME_PAYLOAD);
    let slots = session::RECV_SLOTS + session::SCRATCH_SLOTS;
    let shape = crate::io::ProbeShape {
        queue_depth: job.queue_depth,
        slots,
        slot_bytes,
    };
    crate::io::probe_engine(job.engine, shape)
        .map(drop)
        .map_err(|source| TargetError::Engine {
            kind: job.engine,
            registered_kib: slots * slot_bytes / 1024,
            source,
        })
}

/// The target's apply lock: sessions hold it shared while they stage and apply an
/// epoch; opening a recovery point holds it exclusively, so it never reads a replica
/// between epochs. Released when the returned file is dropped.
pub fn apply_lock(
    state_dir: &std::path::Path,
    exclusive: bool,
) -> Result<std::fs::File, TargetError> {
    use crate::durable::LockMode;
    crate::durable::ensure_dir(state_dir).map_err(|source| TargetError::State {
        path: state_dir.to_path_buf(),
        op: StateOp::Create,
        source,
    })?;
    let path = state_dir.join("apply.lock");
    let mode = if exclusive {
        LockMode::ExclusiveWait
    } else {
        LockMode::SharedWait
    };
    match crate::durable::lock(&path, mode) {
        Ok(Some(file)) => Ok(file),
        Ok(None) => unreachable!("a waiting lock is always taken"),
        Err(source) => Err(TargetError::State {
            path,
            op: StateOp::Lock,
            source,
        }),
    }
}

/// Runs the target in the foreground.
pub fn run(job: TargetJob) -> Result<(), TargetError> {
    Target::bind(job)?.serve()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/protocol.md states the handshake's bounds and the DiffRuns bound as the
    /// code has them.
    #[test]
    fn protocol_doc_states_the_connection_bounds() {
        let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));
        for needle in [
            format!(
                "`HANDSHAKE_DEADLINE` = {} seconds",
                HANDSHAKE_DEADLINE.as_secs()
            ),
            format!("`MAX_PENDING_HANDSHAKES` = {MAX_PENDING_HANDSHAKES}"),
            format!(
                "| DiffRuns per frame | {} runs of {} bytes |",
                crate::protocol::MAX_DIFF_RUNS_PER_FRAME,
                core::mem::size_of::<crate::protocol::DiskRun>()
            ),
        ] {
            assert!(doc.contains(&needle), "docs/protocol.md lacks {needle:?}");
        }
        assert_eq!(
            HANDSHAKE_DEADLINE.subsec_nanos(),
            0,
            "stated in whole seconds"
        );
    }
}
