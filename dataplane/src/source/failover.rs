//! `ferry failover planned`, at the primary: hand the disks to the secondary site with
//! no data loss.
//!
//! 1. The engine lock is taken (a running `ferry source` must be stopped first: the
//!    final epoch must be the last one), and the demotion is recorded as begun
//!    (`<state_dir>/demoted.json` without a final epoch): from here on a restarted shim
//!    serves the disks read-only, so no write can be acknowledged behind the cut.
//! 2. The shim is **demoted**: every write is refused from now on (`EPERM`); writes in
//!    flight complete. Every disk must then report its writes refused. The VMs should
//!    be shut down before (then nothing is refused).
//! 3. A final live epoch carries every acknowledged write (the freeze drains the
//!    writes in flight, and no write is accepted after it) with [`OPEN_PROMOTE`] on
//!    every disk: once it commits, the target promotes its site (fenced from then on)
//!    before acknowledging.
//! 4. The promotion is checked: a further session must be refused as fenced (a target
//!    that predates the flag would have acknowledged without promoting).
//! 5. This site records its demotion complete, with the final epoch: `ferry source`
//!    and `ferry sync` refuse to run (they already did once it was begun), and
//!    `ferry shim` starts with writes refused. The shim's bitmap keeps what it
//!    tracked, for the way back.
//!
//! Rerunning after a failure is safe: each step is idempotent, and a completed
//! demotion is reported as it was recorded. A rerun whose final epoch is refused as
//! fenced finds the target promoted already (by the earlier run, whose answer was
//! lost, or by a failover there) and completes the demotion without a final epoch.
//!
//! [`OPEN_PROMOTE`]: crate::protocol::OPEN_PROMOTE

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use filter_driver_shim_contract::generation::GenerationId;
use serde::{Deserialize, Serialize};

use super::lock::{EngineLock, EngineRole};
use super::{live, ModeRequest, SourceError, SyncJob, SyncReport};
use crate::durable::StateOp;
use crate::protocol::{ErrorCode, ProtocolError};

/// `<state_dir>/demoted.json`: this site handed its disks over in a planned failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demotion {
    /// When the final epoch was acknowledged, Unix seconds.
    pub since_unix_s: u64,
    /// The target that was promoted.
    pub target: String,
    /// The final epoch, the cut the promoted replicas hold; `None` while the handover
    /// is in progress (or when the target was found promoted already).
    pub epoch: Option<u64>,
    /// The handover finished (the target is promoted).
    #[serde(default)]
    pub complete: bool,
    /// Each disk's tracking generation at the cut.
    pub disks: Vec<DemotedDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemotedDisk {
    pub name: String,
    pub generation: GenerationId,
}

impl Demotion {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("demoted.json")
    }

    /// The demotion recorded in `state_dir`, if this site was demoted.
    pub fn load(state_dir: &Path) -> Result<Option<Demotion>, SourceError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => crate::writer::state::unseal(&bytes)
                .map(Some)
                .map_err(|source| SourceError::SiteRecord { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SourceError::State {
                path,
                op: StateOp::Read,
                source,
            }),
        }
    }

    fn save(&self, state_dir: &Path) -> Result<(), SourceError> {
        let path = Self::path(state_dir);
        crate::durable::write_atomic(&path, &crate::writer::state::seal(self)).map_err(|source| {
            SourceError::State {
                path,
                op: StateOp::Write,
                source,
            }
        })
    }
}

/// Refuses to replicate from a demoted site.
pub fn refuse_if_demoted(state_dir: &Path) -> Result<(), SourceError> {
    match Demotion::load(state_dir)? {
        None => Ok(()),
        Some(d) => Err(SourceError::Demoted {
            since_unix_s: d.since_unix_s,
            target: d.target,
            epoch: d.epoch,
            complete: d.complete,
        }),
    }
}

/// What [`planned`] did.
#[derive(Debug)]
pub struct Handover {
    pub demotion: Demotion,
    /// The final epoch's report; `None` when the site was demoted already or the
    /// target was found promoted.
    pub report: Option<SyncReport>,
    /// The demotion was complete before this run: nothing was done.
    pub already: bool,
}

/// Runs the planned failover of `job`'s disks; see the module documentation.
pub fn planned(job: &SyncJob) -> Result<Handover, SourceError> {
    let begun = Demotion::load(&job.state_dir)?;
    if let Some(demotion) = begun.clone().filter(|d| d.complete) {
        return Ok(Handover {
            demotion,
            report: None,
            already: true,
        });
    }
    let lock = EngineLock::acquire(&job.state_dir, EngineRole::Sync)?;
    let mut demotion = begun.unwrap_or_else(|| Demotion {
        since_unix_s: now_s(),
        target: job.target.clone(),
        epoch: None,
        complete: false,
        disks: Vec::new(),
    });
    demotion.save(&job.state_dir)?;
    demote_shim(job)?;
    let mut last = job.clone();
    last.require_shim = true;
    last.mode = ModeRequest::Auto;
    last.promote = true;
    let report = match super::sync_locked(&last, &lock) {
        Ok(report) => {
            if ferry_io::failpoint::hit("source.planned.crash") {
                // A crash once the target promoted, before this site recorded it.
                std::process::abort();
            }
            check_fenced(job, &lock, report.epoch)?;
            Some(report)
        }
        Err(e) if fenced(&e) => {
            tracing::warn!("the target is promoted already: completing this site's demotion without a final epoch");
            let (disks, _) = demoted_disks(job)?;
            demotion.disks = disks;
            demotion.complete = true;
            match promoted_by_planned_failover(&e) {
                // This handover's final epoch, whose answer was lost.
                Some(point) => demotion.epoch = Some(point),
                None => {
                    demotion.save(&job.state_dir)?;
                    return Err(SourceError::PromotedElsewhere {
                        target: job.target.clone(),
                        source: Box::new(e),
                    });
                }
            }
            None
        }
        Err(e) => return Err(e),
    };
    let (disks, _) = demoted_disks(job)?;
    if let Some(r) = &report {
        demotion.epoch = Some(r.epoch);
    }
    demotion.disks = disks;
    demotion.complete = true;
    demotion.save(&job.state_dir)?;
    Ok(Handover {
        demotion,
        report,
        already: false,
    })
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Seals the shim's write gates and checks that every disk now refuses writes.
fn demote_shim(job: &SyncJob) -> Result<(), SourceError> {
    let socket = job.shim_control.clone();
    let mut control = socket
        .as_deref()
        .map(live::ShimControl::connect)
        .transpose()?
        .flatten()
        .ok_or(live::ShimControlError::NotListening { socket })?;
    control.demote()?;
    let open: Vec<String> = control
        .status()?
        .into_iter()
        .filter(|d| !d.writes_refused)
        .map(|d| d.name)
        .collect();
    if open.is_empty() {
        Ok(())
    } else {
        Err(SourceError::NotDemoted { disks: open })
    }
}

/// Each disk's tracking generation as the source's records hold it, and the newest
/// epoch they say the target acknowledged.
fn demoted_disks(job: &SyncJob) -> Result<(Vec<DemotedDisk>, Option<u64>), SourceError> {
    let mut disks = Vec::with_capacity(job.disks.len());
    let mut last = None;
    for d in &job.disks {
        if let Some(state) = super::SourceDiskState::load(&job.state_dir, &d.name)? {
            disks.push(DemotedDisk {
                name: d.name.clone(),
                generation: state.generation,
            });
            last = last.max(Some(state.epoch));
        }
    }
    Ok((disks, last))
}

/// The point of a promotion by a planned failover — this handover's, since only the
/// primary's final epoch promotes that way — as the target's refusal names it; `None`
/// when the target was promoted otherwise (a failover at the secondary). The refusal's
/// words are `Rejection::Fenced`'s, which `tests/it/failover.rs` exercises both ways.
fn promoted_by_planned_failover(e: &SourceError) -> Option<u64> {
    let SourceError::Protocol(ProtocolError::Remote { message, .. }) = e else {
        return None;
    };
    if !message.contains("by a planned failover") {
        return None;
    }
    let rest = message.split("(recovery point ").nth(1)?;
    rest.split(')').next()?.parse().ok()
}

fn fenced(e: &SourceError) -> bool {
    matches!(
        e,
        SourceError::Protocol(ProtocolError::Remote {
            code: ErrorCode::Fenced,
            ..
        })
    )
}

/// The target must now refuse a session as fenced (after the final epoch `epoch`).
fn check_fenced(job: &SyncJob, lock: &EngineLock, epoch: u64) -> Result<(), SourceError> {
    let mut probe = job.clone();
    probe.require_shim = true;
    probe.mode = ModeRequest::Auto;
    // Past this site's own begun demotion; a promoted target refuses it at once.
    probe.promote = true;
    match super::sync_locked(&probe, lock) {
        Err(e) if fenced(&e) => Ok(()),
        Ok(_) => Err(SourceError::NotPromoted {
            target: job.target.clone(),
            epoch,
        }),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::rejection::Rejection;
    use crate::writer::role::Transition;

    fn refusal(how: Transition) -> SourceError {
        let message = Rejection::Fenced {
            how,
            since_unix_s: 1_796_535_923,
            point: 42,
            promoting: false,
        }
        .to_string();
        SourceError::Protocol(ProtocolError::Remote {
            code: ErrorCode::Fenced,
            message,
        })
    }

    #[test]
    fn the_target_s_refusal_tells_this_handover_from_a_failover_there() {
        assert_eq!(
            promoted_by_planned_failover(&refusal(Transition::PlannedFailover)),
            Some(42)
        );
        assert_eq!(
            promoted_by_planned_failover(&refusal(Transition::UnplannedFailover)),
            None
        );
    }
}
