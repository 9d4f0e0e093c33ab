//! `ferry source`: continuous replication, one live epoch of the shim every
//! `epoch_interval_ms`.
//!
//! Each round is a [`sync`](super::sync) that requires the shim. A failed round (the
//! target unreachable, out of space, restarting; the shim restarting) loses nothing:
//! the shim put the epoch's bits back and the target rolled it back, so the next
//! round carries them again. Rounds after failures back off exponentially, up to
//! [`MAX_BACKOFF`]. When the target reports that the replica no longer holds the base
//! the change set builds on (it was replaced or reset), the next round is a seeded
//! (checksum-compare) sync.
//!
//! Two refusals end the loop instead, because retrying cannot help and only the
//! operator can choose: the replica was changed by something other than the target
//! (split brain: resync with `--discard-replica-changes`, or fail over), and the
//! target's site was promoted by a failover (this site is no longer the primary).
//! With `discard_replica_changes` the first rounds are seeded syncs carrying the
//! operator's choice, until one succeeds; later rounds are ordinary again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::lock::{EngineLock, EngineRole};
use super::{Link, ModeRequest, SourceError, SyncJob, SyncReport};
use crate::io::{probe_engine, EngineKind, ProbeShape};
use crate::protocol::{ErrorCode, ProtocolError};

/// Longest wait between rounds after repeated failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How a round ended, for the caller's log or counters.
pub type Round<'a> = &'a Result<SyncReport, SourceError>;

/// Whether the target refused the change set because the replica lacks its base.
fn base_lost(e: &SourceError) -> bool {
    matches!(
        e,
        SourceError::Protocol(ProtocolError::Remote {
            code: ErrorCode::BaseMismatch,
            ..
        })
    )
}

/// Whether the target's refusal needs the operator: retrying would be refused the same
/// way for good.
pub fn needs_operator(e: &SourceError) -> bool {
    matches!(
        e,
        SourceError::Protocol(ProtocolError::Remote {
            code: ErrorCode::ReplicaChanged | ErrorCode::Fenced,
            ..
        }) | SourceError::Demoted { .. }
            // A damaged state file does not mend itself.
            | SourceError::SiteRecord { .. }
            | SourceError::StateContent { .. }
    )
}

/// Runs rounds until `stop` is set (checked between rounds and while waiting; a
/// round in progress completes). `on_round` sees every round's outcome.
///
/// The engine lock of `state_dir` is taken first and held until this returns: while
/// it runs, another `ferry source` or a `ferry sync` on the same state directory is
/// refused, and if one already runs this returns its [`SourceError::Busy`] at once.
/// A round the target refuses for a reason only the operator can resolve (see
/// [`needs_operator`]) ends the loop with that error, after `on_round` saw it.
/// A forced io_uring engine that cannot work here is an error at once too, rather than
/// the same failure every round.
pub fn run(
    job: &SyncJob,
    interval: Duration,
    stop: &AtomicBool,
    on_round: &mut dyn FnMut(Round<'_>),
) -> Result<(), SourceError> {
    let lock = EngineLock::acquire(&job.state_dir, EngineRole::Source)?;
    if job.engine == EngineKind::Uring {
        // At least the buffers of the reads in flight are registered; the pipeline
        // adds a few per worker, so this is a lower bound on what a round needs.
        let shape = ProbeShape {
            queue_depth: job.queue_depth,
            slots: job.queue_depth,
            slot_bytes: job.io_size,
        };
        probe_engine(job.engine, shape).map_err(SourceError::Engine)?;
    }
    let mut job = job.clone();
    job.require_shim = true;
    let requested = job.mode;
    let mut failures: u32 = 0;
    let mut reseed = false;
    let mut discard = job.discard_replica_changes;
    let mut link = Link::default(); // The connections kept from one round to the next.
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        job.mode = if reseed || discard {
            ModeRequest::Seeded
        } else {
            requested
        };
        job.discard_replica_changes = discard;
        let result = super::sync_linked(&job, &lock, &mut link);
        crate::metrics::source().round(started, &result);
        match &result {
            Ok(_) => {
                failures = 0;
                reseed = false;
                discard = false;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if base_lost(e) {
                    reseed = true;
                }
            }
        }
        on_round(&result);
        if let Err(e) = result {
            if needs_operator(&e) {
                return Err(e);
            }
        }
        let wait = if failures == 0 {
            interval.saturating_sub(started.elapsed())
        } else {
            backoff(interval, failures)
        };
        let until = Instant::now() + wait;
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            link.keepalive(job.io_timeout);
            std::thread::sleep((until - now).min(Duration::from_millis(50)));
        }
    }
    Ok(())
}

/// `interval × 2^(failures-1)`, at least 100 ms, at most [`MAX_BACKOFF`].
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    interval
        .max(Duration::from_millis(100))
        .saturating_mul(factor)
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let i = Duration::from_millis(500);
        assert_eq!(backoff(i, 1), i);
        assert_eq!(backoff(i, 2), 2 * i);
        assert_eq!(backoff(i, 4), 8 * i);
        assert_eq!(backoff(i, 40), MAX_BACKOFF);
        assert_eq!(backoff(Duration::ZERO, 1), Duration::from_millis(100));
    }
}
