//! How far the sync in flight is, for a progress bar, a progress log line, `ferry
//! status` and metrics: a few atomics the engine updates as its reader takes work (one
//! add per I/O, never per block) and anyone may read at any time.
//!
//! A sync goes through phases: connecting (and freezing the shim's epoch), comparing
//! (the hash pass of a seeded sync: the whole disk is covered once), sending (the
//! blocks that travel) and committing (waiting for the target's acknowledgement).
//! `total` and `done` count bytes of disk covered in the current phase: a hole
//! counts as covered when it is passed, so a sparse disk's progress jumps.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::plan::PlanItem;
use super::SourceError;

/// Where a sync is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Idle,
    Connecting,
    Comparing,
    Sending,
    Committing,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Connecting,
            2 => Phase::Comparing,
            3 => Phase::Sending,
            4 => Phase::Committing,
            _ => Phase::Idle,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Connecting => "connecting",
            Phase::Comparing => "comparing",
            Phase::Sending => "sending",
            Phase::Committing => "committing",
        }
    }
}

/// The live progress of one engine's syncs (shared; see the module documentation).
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    epoch: AtomicU64,
    /// When the sync in flight began, Unix milliseconds (0: idle).
    started_ms: AtomicU64,
    /// When the current phase began, Unix milliseconds.
    phase_started_ms: AtomicU64,
    total: AtomicU64,
    done: AtomicU64,
}

/// A consistent-enough reading of [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProgressSnapshot {
    pub phase: Phase,
    /// The epoch being synced (0 until it is known).
    pub epoch: u64,
    /// When the sync began, Unix milliseconds (0: idle).
    pub started_unix_ms: u64,
    /// Bytes of disk the current phase covers, and has covered.
    pub total_bytes: u64,
    pub done_bytes: u64,
    /// Bytes per second of the current phase so far.
    pub rate_bytes_per_s: f64,
    /// Seconds left in the current phase at that rate (`None` before any progress).
    pub eta_s: Option<f64>,
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// A sync begins.
    pub(crate) fn begin(&self) {
        let now = now_ms();
        self.epoch.store(0, Ordering::Relaxed);
        self.started_ms.store(now, Ordering::Relaxed);
        self.enter(Phase::Connecting, 0);
    }

    pub(crate) fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    /// The sync enters `phase`, which will cover `total` bytes.
    pub(crate) fn enter(&self, phase: Phase, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.phase_started_ms.store(now_ms(), Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// The sync ended (either way).
    pub(crate) fn end(&self) {
        self.enter(Phase::Idle, 0);
        self.started_ms.store(0, Ordering::Relaxed);
    }

    fn cover(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let phase = Phase::from_u8(self.phase.load(Ordering::Acquire));
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed).min(total);
        let elapsed_s =
            now_ms().saturating_sub(self.phase_started_ms.load(Ordering::Relaxed)) as f64 / 1e3;
        let rate = if elapsed_s > 0.0 {
            done as f64 / elapsed_s
        } else {
            0.0
        };
        ProgressSnapshot {
            phase,
            epoch: self.epoch.load(Ordering::Relaxed),
            started_unix_ms: self.started_ms.load(Ordering::Relaxed),
            total_bytes: total,
            done_bytes: done,
            rate_bytes_per_s: rate,
            eta_s: (rate > 0.0).then(|| (total - done) as f64 / rate),
        }
    }
}

/// Ends the sync's progress when dropped, however the sync ends.
pub(crate) struct Tracking<'a>(pub Option<&'a Progress>);

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            p.end();
        }
    }
}

/// `plan`, counting every item it yields as covered in `progress`.
pub(crate) fn counted<'a, I>(
    plan: I,
    progress: Option<&'a Progress>,
) -> impl Iterator<Item = Result<PlanItem, SourceError>> + Send + 'a
where
    I: Iterator<Item = Result<PlanItem, SourceError>> + Send + 'a,
{
    plan.inspect(move |item| {
        if let (Some(p), Ok(item)) = (progress, item) {
            p.cover(match *item {
                PlanItem::Read { len, .. } => u64::from(len),
                PlanItem::ZeroRun { len, .. } => len,
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_count_what_their_plans_cover() {
        let p = Progress::new();
        assert_eq!(p.snapshot().phase, Phase::Idle);
        p.begin();
        p.set_epoch(7);
        p.enter(Phase::Sending, 1 << 20);
        let plan = vec![
            Ok(PlanItem::Read {
                disk: 0,
                offset: 0,
                len: 256 << 10,
            }),
            Ok(PlanItem::ZeroRun {
                disk: 0,
                offset: 256 << 10,
                len: 256 << 10,
            }),
        ];
        assert_eq!(counted(plan.into_iter(), Some(&p)).count(), 2);
        let s = p.snapshot();
        assert_eq!((s.phase, s.epoch), (Phase::Sending, 7));
        assert_eq!((s.done_bytes, s.total_bytes), (512 << 10, 1 << 20));
        drop(Tracking(Some(&p)));
        assert_eq!(p.snapshot().phase, Phase::Idle);
    }
}
