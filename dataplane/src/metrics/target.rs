//! The metrics of `ferry target`: its sessions, what they applied and committed, the
//! sessions it refused, and at scrape time the recovery points it keeps.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::{group, reason, unix_now, Named, Reason};
use crate::config::{Config, TargetConfig};
use crate::protocol::ErrorCode;
use crate::writer::{points, TargetError};

/// Every `reason` a refused session is counted under (see [`refusal_reason`]).
pub const REASONS: [&str; 6] = [
    "fenced",
    "replica_changed",
    "busy",
    "base_mismatch",
    "auth",
    "other",
];

/// Why the target refused a session, one of [`REASONS`]; `None` for a session that
/// ended otherwise (it succeeded, the source went away, a disk failed).
pub fn refusal_reason(e: &TargetError) -> Option<&'static str> {
    match e {
        TargetError::Rejected(r) => Some(match r.code() {
            ErrorCode::Fenced => "fenced",
            ErrorCode::ReplicaChanged => "replica_changed",
            ErrorCode::Busy => "busy",
            ErrorCode::BaseMismatch => "base_mismatch",
            ErrorCode::Auth => "auth",
            _ => "other",
        }),
        // Whichever side found that the keys differ (the source checks first and
        // tells the target), and a source of an unsupported protocol version.
        TargetError::Handshake(p) => match p.code() {
            ErrorCode::Auth => Some("auth"),
            ErrorCode::Version => Some("other"),
            _ => None,
        },
        _ => None,
    }
}

/// A gauge of seconds.
type F64Gauge = Gauge<f64, AtomicU64>;

/// The metrics of this process's target writer.
#[derive(Debug)]
pub struct TargetMetrics {
    sessions: Counter,
    active: Gauge,
    applied_bytes: Counter,
    epochs_committed: Counter,
    last_commit: F64Gauge,
    refused: Family<Reason, Counter>,
    points: Family<Named, Gauge>,
    point_bytes: Family<Named, Gauge>,
}

/// An authenticated session, counted as active until dropped.
#[must_use = "the session counts as active while this lives"]
pub struct ActiveSession<'a>(&'a Gauge);

impl Drop for ActiveSession<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a scrape reads: each group's disks in the target's state directory.
pub struct Scrape {
    state_dir: PathBuf,
    groups: Vec<(Named, Vec<String>)>,
}

impl Scrape {
    pub fn new(config: &Config, target: &TargetConfig) -> Scrape {
        Scrape {
            state_dir: target.state_dir.clone(),
            groups: config
                .groups()
                .into_iter()
                .map(|(g, disks)| (group(g), disks.iter().map(|d| d.name.clone()).collect()))
                .collect(),
        }
    }
}

impl TargetMetrics {
    pub(super) fn new() -> TargetMetrics {
        let m = TargetMetrics {
            sessions: Counter::default(),
            active: Gauge::default(),
            applied_bytes: Counter::default(),
            epochs_committed: Counter::default(),
            last_commit: F64Gauge::default(),
            refused: Family::default(),
            points: Family::default(),
            point_bytes: Family::default(),
        };
        for r in REASONS {
            drop(m.refused.get_or_create(&reason(r)));
        }
        m
    }

    /// Adds every metric to `registry` (prefixed `ferry_target_`).
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "sessions",
            "Sources that authenticated",
            self.sessions.clone(),
        );
        registry.register(
            "sessions_active",
            "Authenticated sessions open now",
            self.active.clone(),
        );
        registry.register(
            "sessions_refused",
            "Sessions the target refused, by reason (auth: the handshake found the keys differ)",
            self.refused.clone(),
        );
        registry.register_with_unit(
            "applied",
            "Bytes committed epochs applied to the replicas (data written and ranges zeroed)",
            Unit::Bytes,
            self.applied_bytes.clone(),
        );
        registry.register(
            "epochs_committed",
            "Epochs committed durably on the replicas",
            self.epochs_committed.clone(),
        );
        registry.register_with_unit(
            "last_commit_timestamp",
            "When the newest epoch committed, Unix time (0: none since this process started)",
            Unit::Seconds,
            self.last_commit.clone(),
        );
        registry.register(
            "recovery_points",
            "Recovery points offered now (as `ferry points` lists them, the latest included), per consistency group",
            self.points.clone(),
        );
        registry.register_with_unit(
            "recovery_points",
            "Undo data kept for the recovery points (what restoring the oldest reads), per consistency group",
            Unit::Bytes,
            self.point_bytes.clone(),
        );
    }

    /// Creates a series of each family whose labels come from the config (the encoder
    /// leaves out families without any).
    #[cfg(test)]
    pub(super) fn touch_all(&self) {
        drop(self.points.get_or_create(&group("g")));
        drop(self.point_bytes.get_or_create(&group("g")));
    }

    /// An authenticated session begins; it is active until the guard drops.
    pub fn session(&self) -> ActiveSession<'_> {
        self.sessions.inc();
        self.active.inc();
        ActiveSession(&self.active)
    }

    /// An epoch committed durably, having applied `applied` bytes.
    pub fn committed(&self, applied: u64) {
        self.epochs_committed.inc();
        self.applied_bytes.inc_by(applied);
        self.last_commit.set(unix_now());
    }

    /// A connection's session ended: counts it if the target refused it.
    pub fn ended<T>(&self, result: &Result<T, TargetError>) {
        if let Some(r) = result.as_ref().err().and_then(refusal_reason) {
            self.refused.get_or_create(&reason(r)).inc();
        }
    }

    /// Computes what is read at scrape time: the recovery points of each group.
    pub(super) fn refresh(&self, scrape: &Scrape) {
        for (g, disks) in &scrape.groups {
            match points::list(&scrape.state_dir, disks) {
                Ok(list) => {
                    let count = i64::try_from(list.len()).unwrap_or(i64::MAX);
                    let bytes = list.iter().map(|p| p.bytes).max().unwrap_or(0);
                    self.points.get_or_create(g).set(count);
                    self.point_bytes
                        .get_or_create(g)
                        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                }
                Err(e) => tracing::debug!("metrics: recovery points: {}", crate::chain(&e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ProtocolError;
    use crate::writer::Rejection;

    #[test]
    fn refusals_are_counted_by_reason_and_other_endings_are_not() {
        let m = TargetMetrics::new();
        m.ended::<()>(&Err(TargetError::Rejected(Rejection::SessionLimit {
            max: 1,
        })));
        m.ended::<()>(&Err(TargetError::Handshake(ProtocolError::AuthFailed {
            detail: "x",
        })));
        m.ended::<()>(&Err(TargetError::Handshake(ProtocolError::Remote {
            code: ErrorCode::Auth,
            message: String::new(),
        })));
        m.ended::<()>(&Err(TargetError::Handshake(ProtocolError::TimedOut {
            op: "read",
            after_ms: 1,
        })));
        m.ended::<()>(&Err(TargetError::ApplierGone));
        m.ended(&Ok(()));
        assert_eq!(m.refused.get_or_create(&reason("busy")).get(), 1);
        assert_eq!(m.refused.get_or_create(&reason("auth")).get(), 2);
        assert_eq!(m.refused.get_or_create(&reason("other")).get(), 0);
        {
            let _s = m.session();
            assert_eq!(m.active.get(), 1);
        }
        assert_eq!((m.active.get(), m.sessions.get()), (0, 1));
        m.committed(4096);
        assert_eq!((m.epochs_committed.get(), m.applied_bytes.get()), (1, 4096));
    }
}
