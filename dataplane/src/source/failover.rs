//! `ferry failover planned`, at the primary: hand the disks to the secondary site with
//! no data loss.
//!
//! 1. The engine lock is taken (a running `ferry source` must be stopped first: the
//!    final epoch must be the last one).
//! 2. The shim is **demoted**: every write is refused from now on (`EPERM`); writes in
//!    flight complete. The VMs should be shut down before (then nothing is refused).
//! 3. A final live epoch carries every acknowledged write (the freeze drains the
//!    writes in flight, and no write is accepted after it) with [`OPEN_PROMOTE`] on
//!    every disk: once it commits, the target promotes its site (fenced from then on)
//!    before acknowledging.
//! 4. The promotion is checked: a further session must be refused as fenced (a target
//!    that predates the flag would have acknowledged without promoting).
//! 5. This site records its demotion (`<state_dir>/demoted.json`): `ferry source` and
//!    `ferry sync` refuse to run, and `ferry shim` starts with writes refused. The
//!    shim's bitmap keeps what it tracked, for the way back.
//!
//! Rerunning after a failure is safe: each step is idempotent, and a demoted site
//! reports the demotion it recorded.
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
    /// The final epoch: the cut the promoted replicas hold.
    pub epoch: u64,
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
        }),
    }
}

/// What [`planned`] did.
#[derive(Debug)]
pub struct Handover {
    pub demotion: Demotion,
    /// The final epoch's report; `None` when the site was demoted already.
    pub report: Option<SyncReport>,
}

/// Runs the planned failover of `job`'s disks; see the module documentation.
pub fn planned(job: &SyncJob) -> Result<Handover, SourceError> {
    if let Some(demotion) = Demotion::load(&job.state_dir)? {
        return Ok(Handover {
            demotion,
            report: None,
        });
    }
    let lock = EngineLock::acquire(&job.state_dir, EngineRole::Sync)?;
    let socket = job.shim_control.clone();
    let mut control = socket
        .as_deref()
        .map(live::ShimControl::connect)
        .transpose()?
        .flatten()
        .ok_or(live::ShimControlError::NotListening { socket })?;
    control.demote()?;
    drop(control);
    let mut last = job.clone();
    last.require_shim = true;
    last.mode = ModeRequest::Auto;
    last.promote = true;
    let report = super::sync_locked(&last, &lock)?;
    check_fenced(job, &lock)?;
    let mut disks = Vec::with_capacity(report.disks.len());
    for d in &report.disks {
        if let Some(state) = super::SourceDiskState::load(&job.state_dir, &d.name)? {
            disks.push(DemotedDisk {
                name: d.name.clone(),
                generation: state.generation,
            });
        }
    }
    let demotion = Demotion {
        since_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        target: job.target.clone(),
        epoch: report.epoch,
        disks,
    };
    demotion.save(&job.state_dir)?;
    Ok(Handover {
        demotion,
        report: Some(report),
    })
}

/// The target must now refuse a session as fenced.
fn check_fenced(job: &SyncJob, lock: &EngineLock) -> Result<(), SourceError> {
    let mut probe = job.clone();
    probe.require_shim = true;
    probe.mode = ModeRequest::Auto;
    match super::sync_locked(&probe, lock) {
        Err(SourceError::Protocol(ProtocolError::Remote {
            code: ErrorCode::Fenced,
            ..
        })) => Ok(()),
        Ok(report) => Err(SourceError::NotPromoted {
            target: job.target.clone(),
            epoch: report.epoch,
        }),
        Err(e) => Err(e),
    }
}
