//! Failover at the secondary site: promote the replicas, in place, to a recovery
//! point, and make it final.
//!
//! `ferry failover unplanned` ([`unplanned`]) runs at the target's site when the
//! primary is lost. It takes the target's apply lock (waiting for an epoch being
//! applied; the target process may keep running), settles a half-applied epoch, fences
//! the site (see [`super::role`]) and then takes every replica back to the chosen
//! recovery point in place: the kept undo logs newer than the point are applied newest
//! first, each one's replicas synced and records moved back before the log is
//! removed. No replica is copied. Every step is durable before the next and the record
//! says where it stands, so a crash at any moment leaves a state the rerun finishes:
//! applying a log again writes the same old bytes.
//!
//! Until [`commit`], the point may still move back: rerunning with an older `--point`
//! continues the rollback, provided the promoted replicas were not written since (their
//! stamps, see [`super::stamp`], still match; once a VM wrote to them, older logs no
//! longer describe them). `ferry failover commit` discards the recovery points of the
//! old lineage and ends the replica records: the disks are the primary's now.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_io::failpoint;

use super::points;
use super::role::{PromotedDisk, Role, SiteRecord, Transition};
use super::stamp::describe;
use super::state::ReplicaRecord;
use super::{TargetError, TargetJob};
use crate::durable::StateOp;

/// Why a failover command refuses.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("the replicas hold no acknowledged epoch: there is nothing to fail over to")]
    NoPoint,
    #[error("the site was promoted to recovery point {promoted} and the failover was committed: the point can no longer change")]
    Committed { promoted: u64 },
    #[error("the site was promoted to recovery point {promoted}; recovery point {requested} is newer, and the newer epochs' bytes are gone")]
    Newer { promoted: u64, requested: u64 },
    #[error("disk {disk}: the promoted replica was written since the promotion ({}): an older recovery point would mix those writes with old bytes. Keep this point, or restore from backup", describe(changes))]
    WrittenSincePromotion {
        disk: String,
        changes: Vec<super::stamp::StampChange>,
    },
    #[error("disk {disk}: the replica was changed outside ferry since epoch {latest} ({}): it can be failed over only as it is (the latest point: omit --point); an older point would mix those changes with old bytes", describe(changes))]
    ChangedOutside {
        disk: String,
        latest: u64,
        changes: Vec<super::stamp::StampChange>,
    },
    /// A kept log does not follow from what the replicas hold: one between it and them
    /// is missing (retired as damaged), so the point cannot be reached.
    #[error("disk {disk}: the undo log of epoch {log_epoch} does not apply to the replica, which holds {}: a log between them is missing (retired as damaged?), so recovery point {point} cannot be reached; choose a newer point", held.map_or("no acknowledged epoch".to_string(), |e| format!("epoch {e}")))]
    ChainBroken {
        disk: String,
        log_epoch: u64,
        held: Option<u64>,
        point: u64,
    },
    #[error("the site is not promoted: run `ferry failover unplanned` first")]
    NotPromoted,
    #[error("the site is still being promoted (to recovery point {point}): rerun `ferry failover unplanned` to finish first")]
    StillPromoting { point: u64 },
}

/// What [`unplanned`] did.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// The recovery point the replicas hold now.
    pub point: u64,
    /// Each disk: its replica and the lineage it holds.
    pub disks: Vec<(PromotedDisk, PathBuf)>,
    /// The epochs whose bytes were undone by this run, newest first.
    pub undone: Vec<u64>,
    /// The site was already promoted to this point; nothing was done.
    pub already: bool,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Promotes the replicas of `job` to recovery point `point` (default: the latest) and
/// fences the site. See the module documentation.
pub fn unplanned(job: &TargetJob, point: Option<u64>) -> Result<Promotion, TargetError> {
    let state_dir = &job.state_dir;
    let replicas = job.replicas();
    let names: Vec<String> = replicas.iter().map(|(n, _)| n.clone()).collect();
    let _lock = super::apply_lock(state_dir, true)?;
    let site = SiteRecord::load(state_dir)?;
    if let Some(done) = already_there(job, site.as_ref(), point)? {
        return Ok(done);
    }
    points::settle_interrupted(state_dir, &replicas)?;
    // An interrupted promotion is finished first: its point binds (logs newer than it
    // may be undone already), though the rerun may go further back.
    let resuming = site
        .as_ref()
        .filter(|s| s.role == Role::Promoting)
        .map(|s| s.point);
    if resuming.is_some() {
        forget_consumed(state_dir, &names)?;
    }
    let since = site.as_ref().map_or_else(now_s, |s| s.since_unix_s);
    let how = site
        .as_ref()
        .map_or(Transition::UnplannedFailover, |s| s.how);
    let mut undone = match resuming {
        Some(bound) => resume(state_dir, bound, point, &names, &replicas)?,
        None => Vec::new(),
    };
    let point = match (point, resuming) {
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => latest(state_dir, &names)?,
    };
    if site.is_none() {
        check_changed_outside(state_dir, &replicas, &names, point)?;
    }
    if resuming != Some(point) {
        check_offered(state_dir, &names, point)?;
        SiteRecord {
            role: Role::Promoting,
            how,
            since_unix_s: since,
            point,
            disks: Vec::new(),
            committed: false,
        }
        .save(state_dir)?;
        undone.extend(roll_back_to(state_dir, point, &names, &replicas)?);
    }
    let disks = record_primary(state_dir, &replicas, point, how, since)?;
    Ok(Promotion {
        point,
        disks,
        undone,
        already: false,
    })
}

/// Records the site primary at `point`, once every disk's record says it holds it (or
/// refuses: the promotion is then not recorded). Any later write to the promoted disks
/// gets a later time than their stamps.
fn record_primary(
    state_dir: &Path,
    replicas: &[(String, PathBuf)],
    point: u64,
    how: Transition,
    since: u64,
) -> Result<Vec<(PromotedDisk, PathBuf)>, TargetError> {
    super::stamp::wait_for_clock_tick();
    let disks = promoted_disks(state_dir, replicas)?;
    if let Some((d, _)) = disks.iter().find(|(d, _)| d.epoch != point) {
        return Err(FailoverError::ChainBroken {
            disk: d.name.clone(),
            log_epoch: point,
            held: Some(d.epoch),
            point,
        }
        .into());
    }
    SiteRecord {
        role: Role::Primary,
        how,
        since_unix_s: since,
        point,
        disks: disks.iter().map(|(d, _)| d.clone()).collect(),
        committed: false,
    }
    .save(state_dir)?;
    Ok(disks)
}

/// Finishes an interrupted promotion to `bound` (its point binds: `requested` may not
/// be newer), without asking `points::list`: a crash between two disks' records leaves
/// a log half recorded, which breaks the chain of points until it is applied again
/// (applying it again is harmless). The epochs undone.
fn resume(
    state_dir: &Path,
    bound: u64,
    requested: Option<u64>,
    names: &[String],
    replicas: &[(String, PathBuf)],
) -> Result<Vec<u64>, TargetError> {
    if let Some(requested) = requested.filter(|&q| q > bound) {
        return Err(FailoverError::Newer {
            promoted: bound,
            requested,
        }
        .into());
    }
    roll_back_to(state_dir, bound, names, replicas)
}

/// With the site promoted already: the promotion as it stands if `point` asks for
/// nothing else; an error if it cannot move there; `None` to go on rolling back.
fn already_there(
    job: &TargetJob,
    site: Option<&SiteRecord>,
    point: Option<u64>,
) -> Result<Option<Promotion>, TargetError> {
    let Some(site) = site.filter(|s| s.role == Role::Primary) else {
        return Ok(None);
    };
    let promoted = site.point;
    match point {
        None => return Ok(Some(standing(job, site)?)),
        Some(p) if p == promoted => return Ok(Some(standing(job, site)?)),
        Some(_) if site.committed => return Err(FailoverError::Committed { promoted }.into()),
        Some(requested) if requested > promoted => {
            return Err(FailoverError::Newer {
                promoted,
                requested,
            }
            .into())
        }
        Some(_) => {}
    }
    if let Some((disk, changes)) = first_change(&job.state_dir, &job.replicas())? {
        return Err(FailoverError::WrittenSincePromotion { disk, changes }.into());
    }
    Ok(None)
}

/// The promotion recorded in `site`, for a rerun that asks for nothing new.
fn standing(job: &TargetJob, site: &SiteRecord) -> Result<Promotion, TargetError> {
    let replicas = job.replicas();
    let disks = site
        .disks
        .iter()
        .map(|d| {
            let path = replicas
                .iter()
                .find(|(n, _)| *n == d.name)
                .map(|(_, p)| p.clone())
                .unwrap_or_default();
            (d.clone(), path)
        })
        .collect();
    Ok(Promotion {
        point: site.point,
        disks,
        undone: Vec::new(),
        already: true,
    })
}

/// A replica changed outside ferry (split brain, see [`super::stamp`]) can be failed
/// over only as it is; logged when it is.
fn check_changed_outside(
    state_dir: &Path,
    replicas: &[(String, PathBuf)],
    names: &[String],
    point: u64,
) -> Result<(), TargetError> {
    let Some((disk, changes)) = first_change(state_dir, replicas)? else {
        return Ok(());
    };
    let latest = latest(state_dir, names)?;
    if point != latest {
        return Err(FailoverError::ChangedOutside {
            disk,
            latest,
            changes,
        }
        .into());
    }
    tracing::warn!(
        disk,
        "failing over to a replica changed outside ferry since epoch {latest} ({}): it is promoted as it is",
        describe(&changes)
    );
    Ok(())
}

/// The newest point: the replicas as they are.
fn latest(state_dir: &Path, names: &[String]) -> Result<u64, TargetError> {
    points::list(state_dir, names)?
        .first()
        .map(|p| p.id)
        .ok_or_else(|| FailoverError::NoPoint.into())
}

/// `point` must be one [`points::list`] offers, with the replicas at a known epoch.
fn check_offered(state_dir: &Path, names: &[String], point: u64) -> Result<(), TargetError> {
    let offered = points::list(state_dir, names)?;
    if let Some(why) = offered.first().and_then(|p| p.suspect.as_ref()) {
        return Err(TargetError::NotAtKnownEpoch {
            state_dir: state_dir.to_path_buf(),
            why: why.clone(),
        });
    }
    if offered.iter().any(|p| p.id == point) {
        return Ok(());
    }
    Err(TargetError::NoSuchPoint {
        dir: points::points_dir(state_dir),
        point,
        available: offered.iter().map(|p| p.id).collect(),
    })
}

/// A rollback interrupted after a log's records moved back but before the log was
/// removed leaves a kept log newer than every disk it names: it was applied; it goes.
fn forget_consumed(state_dir: &Path, names: &[String]) -> Result<(), TargetError> {
    for m in points::kept(state_dir)? {
        if !m.disks.iter().all(|d| names.contains(&d.name)) {
            continue;
        }
        let mut consumed = true;
        for d in &m.disks {
            let held = ReplicaRecord::load(state_dir, &d.name)?.map(|r| r.epoch);
            consumed &= held.is_some_and(|h| h < m.epoch);
        }
        if consumed {
            points::remove_point(state_dir, &m.stem)?;
        }
    }
    Ok(())
}

/// Applies the kept logs newer than `point`, newest first, to the replicas in place;
/// after each, the replicas are synced, their records moved back to the epoch before
/// the log (with new stamps) and the log removed. The epochs undone, newest first.
fn roll_back_to(
    state_dir: &Path,
    point: u64,
    names: &[String],
    replicas: &[(String, PathBuf)],
) -> Result<Vec<u64>, TargetError> {
    let logs = points::logs_back_to(state_dir, point, names)?;
    let mut undone = Vec::new();
    for (path, log) in &logs {
        check_applies(state_dir, log, point)?;
        // The old primary holds these blocks at newer epochs: reverse replication
        // must send them back (see `super::reprotect`).
        super::reprotect::record_undone(state_dir, log)?;
        let files = super::undo::open_for_rollback(path, &log.disks, replicas)?;
        let refs: Vec<Option<&std::fs::File>> = files.iter().map(Option::as_ref).collect();
        log.apply_reversed(&refs)
            .map_err(|source| TargetError::State {
                path: path.clone(),
                op: StateOp::RollBack,
                source,
            })?;
        for f in files.iter().flatten() {
            f.sync_data().map_err(|source| TargetError::State {
                path: path.clone(),
                op: StateOp::FsyncReplicaAfterRollback,
                source,
            })?;
        }
        if failpoint::hit("failover.rollback.crash") {
            // A crash with this log's bytes undone but its records not yet moved back.
            std::process::abort();
        }
        for (i, d) in log.disks.iter().enumerate() {
            if i == 1 && failpoint::hit("failover.records.crash") {
                // A crash with one disk's record moved back and the others not.
                std::process::abort();
            }
            if let Some(mut r) = ReplicaRecord::load(state_dir, &d.name)? {
                if let Some(prev) = d.prev_epoch {
                    r.epoch = prev;
                }
                r.stamp = super::undo::stamp_of(replicas, &d.name)?;
                r.save(state_dir, &d.name)?;
            }
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        points::remove_point(state_dir, stem)?;
        undone.push(log.epoch);
    }
    Ok(undone)
}

/// A log applies to a replica that holds its epoch (or a later one that changed
/// nothing, see `points::PointMeta::through`), or the epoch before it (applied
/// already by an interrupted run: applying it again is harmless). Anything else means a
/// log between it and the replica is missing.
fn check_applies(
    state_dir: &Path,
    log: &super::undo::LogContents,
    point: u64,
) -> Result<(), TargetError> {
    for d in &log.disks {
        let held = ReplicaRecord::load(state_dir, &d.name)?.map(|r| r.epoch);
        let at_log = held.is_some_and(|h| (log.epoch..=log.last_epoch).contains(&h));
        if !at_log && held != d.prev_epoch {
            return Err(FailoverError::ChainBroken {
                disk: d.name.clone(),
                log_epoch: log.epoch,
                held,
                point,
            }
            .into());
        }
    }
    Ok(())
}

/// Each configured disk's replica and the lineage its record says it holds.
fn promoted_disks(
    state_dir: &Path,
    replicas: &[(String, PathBuf)],
) -> Result<Vec<(PromotedDisk, PathBuf)>, TargetError> {
    let mut disks = Vec::new();
    for (name, path) in replicas {
        let record =
            ReplicaRecord::load(state_dir, name)?.ok_or_else(|| TargetError::NoRecord {
                replica: path.clone(),
                disk: name.clone(),
            })?;
        disks.push((
            PromotedDisk {
                name: name.clone(),
                generation: record.generation,
                epoch: record.epoch,
                stamp: record.stamp,
            },
            path.clone(),
        ));
    }
    Ok(disks)
}

/// Promotes the site after the final epoch of a planned failover committed (the
/// caller holds the apply lock and the session's claim on every disk): the replicas
/// hold `epoch`, which is the latest point; nothing is rolled back. Durable before the
/// source hears that the epoch committed.
pub(crate) fn promote_planned(job: &TargetJob, epoch: u64) -> Result<(), TargetError> {
    let disks = promoted_disks(&job.state_dir, &job.replicas())?;
    SiteRecord {
        role: Role::Primary,
        how: Transition::PlannedFailover,
        since_unix_s: now_s(),
        point: epoch,
        disks: disks.into_iter().map(|(d, _)| d).collect(),
        committed: false,
    }
    .save(&job.state_dir)?;
    tracing::warn!(
        epoch,
        "planned failover: this site is promoted to primary and refuses every source from now on"
    );
    Ok(())
}

/// What [`commit`] did.
#[derive(Debug, Clone)]
pub struct Committed {
    pub point: u64,
    /// Recovery points of the old lineage discarded by this run.
    pub discarded: usize,
    pub already: bool,
}

/// Makes the failover final: the recovery points of the old lineage are discarded and
/// the replica records end (they described replicas the VMs now write); the site
/// record keeps each disk's lineage at the point, for reverse replication. Idempotent.
pub fn commit(job: &TargetJob) -> Result<Committed, TargetError> {
    let state_dir = &job.state_dir;
    let _lock = super::apply_lock(state_dir, true)?;
    let mut site = SiteRecord::load(state_dir)?.ok_or(FailoverError::NotPromoted)?;
    if site.role == Role::Promoting {
        return Err(FailoverError::StillPromoting { point: site.point }.into());
    }
    let already = site.committed;
    let names: Vec<String> = job.disks.iter().map(|d| d.name.clone()).collect();
    let mut discarded = 0;
    for m in points::kept(state_dir)? {
        if m.disks.iter().any(|d| names.contains(&d.name)) {
            points::remove_point(state_dir, &m.stem)?;
            discarded += 1;
        }
    }
    for name in &names {
        let path = ReplicaRecord::path(state_dir, name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TargetError::State {
                    path,
                    op: StateOp::Remove,
                    source,
                })
            }
        }
    }
    crate::durable::sync_dir(state_dir).map_err(|source| TargetError::State {
        path: state_dir.clone(),
        op: StateOp::FsyncDir,
        source,
    })?;
    site.committed = true;
    site.save(state_dir)?;
    Ok(Committed {
        point: site.point,
        discarded,
        already,
    })
}

/// What a site can offer to restore.
#[derive(Debug)]
pub struct Offered {
    pub site: Option<SiteRecord>,
    /// Newest first; empty when none describes the replicas any more.
    pub points: Vec<points::RecoveryPoint>,
    /// A replica changed outside ferry (or by the VMs after a promotion): which, and
    /// how. No point is offered then: each would mix those changes with old bytes.
    pub changed: Option<(String, String)>,
}

/// The recovery points the site can still offer, with its role: none while a
/// promotion is unfinished or after it was committed, and none while a replica no
/// longer matches its stamp (split brain, or VMs writing to promoted disks).
pub fn offered_points(
    state_dir: &Path,
    replicas: &[(String, PathBuf)],
) -> Result<Offered, TargetError> {
    let names: Vec<String> = replicas.iter().map(|(n, _)| n.clone()).collect();
    let site = SiteRecord::load(state_dir)?;
    let changed = first_change(state_dir, replicas)?.map(|(d, c)| (d, describe(&c)));
    let closed = site
        .as_ref()
        .is_some_and(|s| s.committed || s.role == Role::Promoting);
    let points = if closed || changed.is_some() {
        Vec::new()
    } else {
        points::list(state_dir, &names)?
    };
    Ok(Offered {
        site,
        points,
        changed,
    })
}

/// The first replica that no longer matches the stamp its record holds, and how.
fn first_change(
    state_dir: &Path,
    replicas: &[(String, PathBuf)],
) -> Result<Option<(String, Vec<super::stamp::StampChange>)>, TargetError> {
    for (name, path) in replicas {
        let Some(record) = ReplicaRecord::load(state_dir, name)? else {
            continue;
        };
        if record.suspect.is_some() {
            // Not a known epoch already (the writer's own interrupted epoch): the
            // suspect mark says so, and only a comparing sync clears it.
            continue;
        }
        let now = super::stamp::ReplicaStamp::take(path).map_err(|source| TargetError::Io {
            disk: name.clone(),
            source,
        })?;
        let changes = record
            .stamp
            .map(|s| s.changes(now.as_ref()))
            .unwrap_or_default();
        if !changes.is_empty() {
            return Ok(Some((name.clone(), changes)));
        }
    }
    Ok(None)
}
