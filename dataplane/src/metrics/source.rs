//! The metrics of `ferry source`: its epochs, their failures and what they carried,
//! and at scrape time the RPO and the shim's pending and frozen blocks.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filter_driver_shim_contract::control::{Request, StatusReply};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::{disk, group, reason, unix_now, Named, Reason};
use crate::config::{Config, SourceConfig};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::source::continuous::needs_operator;
use crate::source::progress::{Phase, Progress};
use crate::source::{SourceError, SyncReport, SHIM_CONTROL_SOCKET};

/// A gauge of seconds or a ratio.
type F64Gauge = Gauge<f64, AtomicU64>;

/// Every `reason` an epoch failure is counted under (see [`failure_reason`]).
pub const REASONS: [&str; 9] = [
    "target_unreachable",
    "busy",
    "fenced",
    "replica_changed",
    "base_mismatch",
    "auth",
    "shim",
    "io",
    "other",
];

/// Buckets of `freeze_pause_seconds`: 100 µs to 1 s.
const FREEZE_PAUSE_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Buckets of `epoch_duration_seconds`: 10 ms to an hour.
const EPOCH_DURATION_BUCKETS: [f64; 17] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// How long a scrape waits for the shim's `status` (the shim accepts every 100 ms).
const SHIM_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest `status` reply read.
const MAX_STATUS_BYTES: u64 = 1 << 20;

/// The failure reason of a failed epoch, one of [`REASONS`]: a small fixed set, from
/// what the error says about where it failed.
pub fn failure_reason(e: &SourceError) -> &'static str {
    use SourceError as E;
    match e {
        E::Connect { .. } | E::PeerInterrupted => "target_unreachable",
        E::Protocol(p) => match p {
            ProtocolError::Io { .. }
            | ProtocolError::TimedOut { .. }
            | ProtocolError::Truncated { .. } => "target_unreachable",
            ProtocolError::AuthFailed { .. } => "auth",
            ProtocolError::Remote { code, .. } => match code {
                ErrorCode::Busy => "busy",
                ErrorCode::Fenced => "fenced",
                ErrorCode::ReplicaChanged => "replica_changed",
                ErrorCode::BaseMismatch => "base_mismatch",
                ErrorCode::Auth => "auth",
                ErrorCode::Io => "io",
                _ => "other",
            },
            _ => "other",
        },
        // This site handed its disks over: like a fenced target, not the primary.
        E::Demoted { .. } => "fenced",
        E::Key(_) => "auth",
        E::Shim(_) => "shim",
        E::Open { .. } | E::Io { .. } | E::ShortRead { .. } | E::State { .. } => "io",
        _ => "other",
    }
}

/// The metrics of this process's continuous replication.
#[derive(Debug)]
pub struct SourceMetrics {
    epochs: Counter,
    failures: Family<Reason, Counter>,
    halts: Family<Reason, Counter>,
    read_bytes: Counter,
    sent_bytes: Counter,
    compression_ratio: F64Gauge,
    freeze_pause: Histogram,
    epoch_duration: Histogram,
    last_success: Family<Named, F64Gauge>,
    rpo: Family<Named, F64Gauge>,
    pending: Family<Named, Gauge>,
    inflight: Family<Named, Gauge>,
    remaining: Gauge,
    shim_up: Gauge,
    /// Unix seconds (`f64` bits) when the newest acknowledged epoch's round began, an
    /// upper bound of its cut; 0: none yet.
    newest_cut: AtomicU64,
    /// Unix seconds (`f64` bits) when the newest epoch was acknowledged; 0: none yet.
    last_ack: AtomicU64,
    /// Unix seconds when these metrics were made: the RPO counts from here until the
    /// first epoch.
    created: f64,
}

/// What a scrape reads besides the counters: the config's groups and disks, the
/// shim's control socket and the engine's progress.
pub struct Scrape {
    groups: Vec<Named>,
    disks: Vec<String>,
    block_size: u64,
    shim_socket: PathBuf,
    progress: Option<Arc<Progress>>,
}

impl Scrape {
    pub fn new(config: &Config, source: &SourceConfig, progress: Option<Arc<Progress>>) -> Scrape {
        Scrape {
            progress,
            groups: config.groups().keys().map(|g| group(g)).collect(),
            disks: config.disks.iter().map(|d| d.name.clone()).collect(),
            block_size: u64::from(source.block_size_kib) * 1024,
            shim_socket: source.state_dir.join(SHIM_CONTROL_SOCKET),
        }
    }
}

impl SourceMetrics {
    pub(super) fn new() -> SourceMetrics {
        let m = SourceMetrics {
            epochs: Counter::default(),
            failures: Family::default(),
            halts: Family::default(),
            read_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            compression_ratio: F64Gauge::default(),
            freeze_pause: Histogram::new(FREEZE_PAUSE_BUCKETS),
            epoch_duration: Histogram::new(EPOCH_DURATION_BUCKETS),
            last_success: Family::default(),
            rpo: Family::default(),
            pending: Family::default(),
            inflight: Family::default(),
            remaining: Gauge::default(),
            shim_up: Gauge::default(),
            newest_cut: AtomicU64::new(0),
            last_ack: AtomicU64::new(0),
            created: unix_now(),
        };
        // Every reason's series exists from the start, so increase() sees the first.
        for r in REASONS {
            drop(m.failures.get_or_create(&reason(r)));
            drop(m.halts.get_or_create(&reason(r)));
        }
        m
    }

    /// Adds every metric to `registry` (prefixed `ferry_source_`).
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "epochs",
            "Epochs the target acknowledged as durable",
            self.epochs.clone(),
        );
        registry.register(
            "epoch_failures",
            "Epochs that failed (nothing is lost: the next one carries their blocks), by reason",
            self.failures.clone(),
        );
        registry.register(
            "halts",
            "Failures that stopped continuous replication because only an operator can resolve them (fenced: the target was promoted or this site demoted; replica_changed: split brain), by reason",
            self.halts.clone(),
        );
        registry.register_with_unit(
            "read",
            "Bytes read from the source disks by acknowledged epochs",
            Unit::Bytes,
            self.read_bytes.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Bytes put on the wire by acknowledged epochs (frames, headers included)",
            Unit::Bytes,
            self.sent_bytes.clone(),
        );
        self.register_gauges(registry);
    }

    /// The rest of [`Self::register`]: ratios, histograms and gauges.
    fn register_gauges(&self, registry: &mut Registry) {
        registry.register(
            "compression_ratio",
            "Bytes read per byte sent in the last acknowledged epoch that read any (compression, zero blocks, blocks the replica already held)",
            self.compression_ratio.clone(),
        );
        registry.register_with_unit(
            "freeze_pause",
            "How long each acknowledged epoch's freeze held the guest's writes",
            Unit::Seconds,
            self.freeze_pause.clone(),
        );
        registry.register_with_unit(
            "epoch_duration",
            "Duration of each acknowledged epoch, from its start (the shim's status, connecting, the freeze) to the target's acknowledgement",
            Unit::Seconds,
            self.epoch_duration.clone(),
        );
        registry.register_with_unit(
            "last_success_timestamp",
            "When the newest epoch was acknowledged, Unix time (0: none since this process started)",
            Unit::Seconds,
            self.last_success.clone(),
        );
        registry.register_with_unit(
            "rpo",
            "Age of the newest acknowledged epoch at scrape time (from the start of its round); before the first, the time since this process started",
            Unit::Seconds,
            self.rpo.clone(),
        );
        registry.register_with_unit(
            "pending",
            "Changed bytes the shim tracks that no epoch carries yet (dirty blocks times the block size)",
            Unit::Bytes,
            self.pending.clone(),
        );
        registry.register_with_unit(
            "inflight",
            "Changed bytes of the epoch frozen now (its total while it is read and sent, 0 when none is frozen)",
            Unit::Bytes,
            self.inflight.clone(),
        );
        registry.register_with_unit(
            "epoch_remaining",
            "Bytes of disk the epoch in flight has still to compare or send in its current phase (0 when idle, connecting or committing)",
            Unit::Bytes,
            self.remaining.clone(),
        );
        registry.register(
            "shim_up",
            "Whether the shim answered this scrape's status request (1) or not (0)",
            self.shim_up.clone(),
        );
    }

    /// Creates a series of each family whose labels come from the config (the encoder
    /// leaves out families without any).
    #[cfg(test)]
    pub(super) fn touch_all(&self) {
        drop(self.last_success.get_or_create(&group("g")));
        drop(self.rpo.get_or_create(&group("g")));
        drop(self.pending.get_or_create(&disk("d")));
        drop(self.inflight.get_or_create(&disk("d")));
    }

    /// Records a round of the continuous loop begun at `started`: one call per epoch.
    pub fn round(&self, started: Instant, result: &Result<SyncReport, SourceError>) {
        let now = unix_now();
        match result {
            Ok(r) => {
                self.epochs.inc();
                self.read_bytes.inc_by(r.bytes_read);
                self.sent_bytes.inc_by(r.bytes_sent);
                if r.bytes_read > 0 && r.bytes_sent > 0 {
                    self.compression_ratio
                        .set(r.bytes_read as f64 / r.bytes_sent as f64);
                }
                if let Some(us) = r.freeze_pause_us {
                    self.freeze_pause.observe(us as f64 / 1e6);
                }
                self.epoch_duration.observe(r.seconds);
                let cut = (now - started.elapsed().as_secs_f64()).max(0.0);
                // Non-negative f64s order as their bits do.
                self.newest_cut.fetch_max(cut.to_bits(), Ordering::AcqRel);
                self.last_ack.fetch_max(now.to_bits(), Ordering::AcqRel);
            }
            Err(e) => {
                let r = reason(failure_reason(e));
                self.failures.get_or_create(&r).inc();
                if needs_operator(e) {
                    self.halts.get_or_create(&r).inc();
                }
            }
        }
    }

    /// Computes what is read at scrape time.
    pub(super) fn refresh(&self, scrape: &Scrape) {
        let now = unix_now();
        let cut = f64::from_bits(self.newest_cut.load(Ordering::Acquire));
        let since = if cut > 0.0 { cut } else { self.created };
        let ack = f64::from_bits(self.last_ack.load(Ordering::Acquire));
        for g in &scrape.groups {
            // One `ferry source` carries every disk of its config in each epoch.
            self.rpo.get_or_create(g).set((now - since).max(0.0));
            self.last_success.get_or_create(g).set(ack);
        }
        if let Some(progress) = &scrape.progress {
            let s = progress.snapshot();
            let left = match s.phase {
                Phase::Comparing | Phase::Sending => s.total_bytes.saturating_sub(s.done_bytes),
                Phase::Idle | Phase::Connecting | Phase::Committing => 0,
            };
            self.remaining.set(i64::try_from(left).unwrap_or(i64::MAX));
        }
        match shim_status(&scrape.shim_socket) {
            Ok(status) => {
                self.shim_up.set(1);
                let bytes = |blocks: u64, block_size: u32| {
                    i64::try_from(blocks.saturating_mul(u64::from(block_size))).unwrap_or(i64::MAX)
                };
                for d in status
                    .disks
                    .iter()
                    .filter(|d| scrape.disks.contains(&d.name))
                {
                    let block_size = if d.block_size > 0 {
                        d.block_size
                    } else {
                        u32::try_from(scrape.block_size).unwrap_or(u32::MAX)
                    };
                    let name = disk(&d.name);
                    self.pending
                        .get_or_create(&name)
                        .set(bytes(d.dirty_blocks, block_size));
                    self.inflight
                        .get_or_create(&name)
                        .set(bytes(d.frozen_blocks.unwrap_or(0), block_size));
                }
            }
            Err(e) => {
                self.shim_up.set(0);
                tracing::debug!("metrics: shim status: {e}");
            }
        }
    }
}

/// Asks the shim listening on `socket` for its `status`.
fn shim_status(socket: &Path) -> std::io::Result<StatusReply> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(SHIM_TIMEOUT))?;
    stream.set_write_timeout(Some(SHIM_TIMEOUT))?;
    (&stream).write_all(format!("{}\n", Request::Status).as_bytes())?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_STATUS_BYTES)).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_by_where_they_failed() {
        let remote = |code| {
            SourceError::Protocol(ProtocolError::Remote {
                code,
                message: String::new(),
            })
        };
        let cases = [
            (
                SourceError::Connect {
                    addr: "x:1".into(),
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                },
                "target_unreachable",
            ),
            (
                SourceError::Protocol(ProtocolError::TimedOut {
                    op: "read",
                    after_ms: 1,
                }),
                "target_unreachable",
            ),
            (remote(ErrorCode::Fenced), "fenced"),
            (remote(ErrorCode::ReplicaChanged), "replica_changed"),
            (remote(ErrorCode::BaseMismatch), "base_mismatch"),
            (remote(ErrorCode::Busy), "busy"),
            (remote(ErrorCode::Integrity), "other"),
            (
                SourceError::Protocol(ProtocolError::AuthFailed { detail: "x" }),
                "auth",
            ),
            (SourceError::Aborted, "other"),
        ];
        for (e, want) in cases {
            assert_eq!(failure_reason(&e), want, "{e:?}");
            assert!(REASONS.contains(&want));
        }
    }

    #[test]
    fn a_failed_round_counts_its_reason_and_a_halt() {
        let m = SourceMetrics::new();
        let fenced = Err(SourceError::Protocol(ProtocolError::Remote {
            code: ErrorCode::Fenced,
            message: String::new(),
        }));
        m.round(Instant::now(), &fenced);
        m.round(Instant::now(), &Err(SourceError::PeerInterrupted));
        assert_eq!(m.failures.get_or_create(&reason("fenced")).get(), 1);
        assert_eq!(m.halts.get_or_create(&reason("fenced")).get(), 1);
        assert_eq!(
            m.failures
                .get_or_create(&reason("target_unreachable"))
                .get(),
            1
        );
        assert_eq!(
            m.halts.get_or_create(&reason("target_unreachable")).get(),
            0
        );
        assert_eq!(m.epochs.get(), 0);
    }
}
