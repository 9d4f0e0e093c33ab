//! The commands that turn a failover around: `ferry become-replica` at the old
//! primary, `ferry reprotect` at the new one, and the role check that keeps a replica
//! site's shim and engine from touching disks its target applies to.
//!
//! A site that runs both roles over time has one config with both a `[source]` and a
//! `[target]` section over the same `[[disk]]` paths: the shim and the engine use
//! `[source] state_dir`, the target `[target] state_dir`. Its role follows from the
//! target's records: a promoted site (`site.json`) is the primary; a site whose target
//! holds replica records of the disks, and no `site.json`, is the replica.

use std::path::{Path, PathBuf};

use dataplane::config::Config;
use dataplane::source::failover::Demotion;
use dataplane::source::lock::{EngineLock, EngineRole};
use dataplane::source::{self, ModeRequest, SourceDiskState};
use dataplane::writer::reprotect::HandedOver;
use dataplane::writer::role::SiteRecord;
use dataplane::writer::state::ReplicaRecord;
use dataplane::writer::TargetJob;
use filter_driver_shim::backing::Backing;
use filter_driver_shim::tracker::{Tracker, TrackerConfig};

use crate::error::CliError;

/// Why a DR command refuses.
#[derive(Debug, thiserror::Error)]
pub enum DrError {
    #[error("this site is the replica of disk(s) {} (its target, {}, holds their records): `ferry {command}` would write disks the other site replicates into; a failover promotes this site first", disks.join(", "), state_dir.display())]
    ReplicaSite {
        command: &'static str,
        disks: Vec<String>,
        state_dir: PathBuf,
    },
    #[error("the shim is running ({}): stop it (and the VMs) first; become-replica hands its change tracking over to this site's target", socket.display())]
    ShimRunning { socket: PathBuf },
    #[error("this site was not demoted by a planned failover: if the other site failed over while this one was down, rerun with --force — reverse replication then overwrites every write made here after the last epoch the other site holds (they are listed per disk below as blocks owed)")]
    NotDemoted,
    #[error("disk {disk} was never replicated from this site ({} has no record of it): reverse replication has no common epoch to start from; resync it with `ferry sync --mode seeded` from the other site", state_dir.display())]
    NeverReplicated { disk: String, state_dir: PathBuf },
    #[error("disk {disk}: cannot read its image {}", path.display())]
    Image {
        disk: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {disk}: its change tracking")]
    Tracking {
        disk: String,
        #[source]
        source: filter_driver_shim::tracker::TrackerError,
    },
    #[error("{}: cannot remove", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] dataplane::source::SourceError),
    #[error(transparent)]
    Target(#[from] dataplane::writer::TargetError),
}

/// Refuses `command` at a site whose target holds replicas of the configured disks
/// (and was not promoted): only the target writes them there.
pub fn refuse_if_replica(cfg: &Config, command: &'static str) -> Result<(), CliError> {
    let Some(target) = &cfg.target else {
        return Ok(());
    };
    if SiteRecord::load(&target.state_dir)?.is_some() {
        return Ok(());
    }
    let mut disks = Vec::new();
    for d in &cfg.disks {
        if ReplicaRecord::load(&target.state_dir, &d.name)?.is_some() {
            disks.push(d.name.clone());
        }
    }
    if disks.is_empty() {
        return Ok(());
    }
    Err(DrError::ReplicaSite {
        command,
        disks,
        state_dir: target.state_dir.clone(),
    }
    .into())
}

/// `ferry reprotect`: see [`dataplane::source::reprotect`].
pub fn reprotect(config: &Path, json: bool, discard_replica_changes: bool) -> Result<(), CliError> {
    let cfg = Config::load(config)?;
    let target = cfg.require_target("reprotect")?;
    let mut job = source::SyncJob::from_config(&cfg, ModeRequest::Auto)?;
    job.require_shim = true;
    job.discard_replica_changes = discard_replica_changes;
    let disks = source::reprotect::plan(&job, &target.state_dir)?;
    if !json {
        println!(
            "reverse replication to {}: only the blocks that can differ travel — written here since the promotion, rolled back by the failover, or written there after its last acknowledged epoch",
            job.target
        );
    }
    job.reprotect = Some(disks);
    let report = source::reprotect::run(&job, &target.state_dir)?;
    crate::print_sync_report(&report, json);
    if !json {
        let sent_pct = 100.0 * report.bytes_sent as f64 / report.bytes_logical.max(1) as f64;
        let read_pct = 100.0 * report.bytes_read as f64 / report.bytes_logical.max(1) as f64;
        println!(
            "reprotected: {sent_pct:.2}% of the disks' bytes sent, {read_pct:.2}% read; the other site is this site's replica now — run `ferry source --config {}` to keep it current",
            config.display()
        );
    }
    Ok(())
}

/// `ferry become-replica`: at the old primary after a failover, hands the disks to
/// this site's target as replicas of the other site, with the blocks written here
/// since the last epoch the other site holds (this site's shim's bits).
pub fn become_replica(config: &Path, force: bool) -> Result<(), CliError> {
    let cfg = Config::load(config)?;
    let source_cfg = cfg.require_source("become-replica")?;
    let job = TargetJob::from_config(&cfg)?;
    let handed = hand_site_over(
        &source_cfg.state_dir,
        &job,
        source_cfg.block_size_bytes(),
        force,
    )?;
    for d in &handed.already {
        println!("disk {d}: handed over already");
    }
    for d in &handed.now {
        match &d.owed {
            Ok(set) => println!(
                "disk {}: replica of epoch {} (generation {}); {} block(s) written here since are owed back by reverse replication",
                d.name,
                d.epoch,
                d.generation,
                set.count()
            ),
            Err(why) => println!(
                "disk {}: replica of epoch {} (generation {}); what was written here since is not known ({why}): reverse replication compares every block",
                d.name, d.epoch, d.generation
            ),
        }
    }
    println!(
        "this site is the replica now: start `ferry target --config {}`, then run `ferry reprotect` at the primary",
        config.display()
    );
    Ok(())
}

/// What [`hand_site_over`] did.
pub struct HandedSite {
    /// The disks handed over by this run, with what each owes.
    pub now: Vec<HandedOver>,
    /// Disks an interrupted earlier run handed over.
    pub already: Vec<String>,
}

/// The work of `ferry become-replica` for the site whose shim and engine keep their
/// state in `source_state` and whose target is `job` (over the same disk paths).
pub fn hand_site_over(
    source_state: &Path,
    job: &TargetJob,
    block_size: u32,
    force: bool,
) -> Result<HandedSite, DrError> {
    let sa = source_state;
    // No engine, no shim, no target session: nothing else writes the disks or the
    // records while they change hands.
    let _engine = EngineLock::acquire(sa, EngineRole::Sync)?;
    let socket = sa.join(source::SHIM_CONTROL_SOCKET);
    if source::live::ShimControl::connect(&socket)?.is_some() {
        return Err(DrError::ShimRunning { socket });
    }
    let _apply = dataplane::writer::apply_lock(&job.state_dir, true)?;
    let demoted = Demotion::load(sa)?.is_some_and(|d| d.complete);
    if !demoted && !force && !handed_over_already(job, sa)? {
        return Err(DrError::NotDemoted);
    }
    let mut handed = HandedSite {
        now: Vec::new(),
        already: Vec::new(),
    };
    for d in &job.disks {
        let Some(state) = SourceDiskState::load(sa, &d.name)? else {
            if ReplicaRecord::load(&job.state_dir, &d.name)?.is_some() {
                // An interrupted run handed it over and removed its lineage last.
                consume_tracking(sa, &d.name)?;
                handed.already.push(d.name.clone());
                continue;
            }
            return Err(DrError::NeverReplicated {
                disk: d.name.clone(),
                state_dir: sa.to_path_buf(),
            });
        };
        handed
            .now
            .push(hand_over_disk(&d.name, &d.path, sa, block_size, &state)?);
    }
    dataplane::writer::reprotect::hand_over(job, &handed.now)?;
    if ferry_io::failpoint::hit("become-replica.crash") {
        // A crash with the records written and this site's tracking still in place.
        std::process::abort();
    }
    for d in &handed.now {
        consume_tracking(sa, &d.name)?;
    }
    remove(&SiteRecord::path(&job.state_dir))?;
    remove(&Demotion::path(sa))?;
    for dir in [sa, job.state_dir.as_path()] {
        ferry_io::durable::sync_dir(dir).map_err(|source| DrError::Remove {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    Ok(handed)
}

/// A rerun after a run that finished (its last step removes the demotion record):
/// every disk's lineage moved to the target, which is not promoted.
fn handed_over_already(job: &TargetJob, sa: &Path) -> Result<bool, DrError> {
    let ta = &job.state_dir;
    if SiteRecord::load(ta)?.is_some() {
        return Ok(false);
    }
    for d in &job.disks {
        if SourceDiskState::load(sa, &d.name)?.is_some()
            || ReplicaRecord::load(ta, &d.name)?.is_none()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One disk's lineage and the bits its stopped shim left.
fn hand_over_disk(
    name: &str,
    path: &Path,
    state_dir: &Path,
    block_size: u32,
    state: &SourceDiskState,
) -> Result<HandedOver, DrError> {
    let image = |source| DrError::Image {
        disk: name.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let backing = Backing::open(path).map_err(image)?;
    let identity = backing.identity().map_err(image)?;
    let tracking = TrackerConfig {
        disk: name.to_string(),
        bitmap_path: state_dir.join(format!("{name}.cbt")),
        state_path: state_dir.join(format!("{name}.shim-state")),
        block_size,
    };
    let found = Tracker::inspect(&tracking, identity).map_err(|source| DrError::Tracking {
        disk: name.to_string(),
        source,
    })?;
    let owed = match found.resync {
        Some(reason) => Err(format!("the shim's tracking was not continuous: {reason}")),
        None if found.bitmap.generation_id() != state.generation => Err(format!(
            "the shim tracks generation {}, the last acknowledged epoch was of generation {}",
            found.bitmap.generation_id(),
            state.generation
        )),
        None => Ok(found.bitmap),
    };
    Ok(HandedOver {
        name: name.to_string(),
        generation: state.generation,
        epoch: state.epoch,
        disk_size: identity.size_bytes,
        owed,
    })
}

/// Removes what the shim and the engine kept of disk `name` in `state_dir`: the
/// tracking first, the lineage (which says the disk is not handed over yet) last. A
/// shim started here later begins a new generation.
fn consume_tracking(state_dir: &Path, name: &str) -> Result<(), DrError> {
    for path in [
        state_dir.join(format!("{name}.cbt")),
        state_dir.join(format!("{name}.shim-state")),
        SourceDiskState::path(state_dir, name),
    ] {
        remove(&path)?;
    }
    Ok(())
}

fn remove(path: &Path) -> Result<(), DrError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DrError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}
