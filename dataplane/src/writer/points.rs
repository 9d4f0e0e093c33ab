//! Recovery points: committed undo logs kept for a retention window.
//!
//! Applying epoch E logs the replica bytes it overwrites (see [`super::undo`]); once E
//! is committed that log is exactly what turns the replica at E back into the epoch
//! before it. Keeping the newest logs therefore keeps recovery points: the replica as
//! it was at any retained earlier epoch is the replica now with the logs newer than
//! that epoch applied, newest first. The replica itself is never rewritten for
//! retention.
//!
//! A point is a run of epochs that left the same bytes. An epoch that changed no block
//! (an idle changed-block epoch) restores nothing, so its empty log is not kept:
//! instead the newest kept log's record notes that the epochs after it, up to this
//! one, held its bytes ([`PointMeta::through`]). A point therefore names the epochs
//! `first..=last` it covers; `ferry points` lists it under its newest epoch (the
//! latest under the epoch the replicas hold: the latest epoch E becomes point E once a
//! newer epoch changes something), and any epoch of the run opens it in a test
//! failover.
//!
//! Retention merges points away. Merging the oldest is deleting its log. Merging a
//! point in the middle folds the log that restores it into the next newer kept log:
//! the merged log holds the older log's entries and then the newer one's (an entry the
//! older log covers whole is left out: the older bytes are written over it anyway), so
//! applying it, newest first, still takes the replica from the newer epoch to the one
//! before the dropped point. The merged log is written under a new name whose record
//! lists the logs it replaces ([`PointMeta::replaces`]); the rename that makes it
//! whole is the merge's commit point, after which the replaced logs are ignored and
//! then deleted. A tagged point ([`tag`]) is never merged away.
//!
//! Layout: `state_dir/points/<epoch>-<suffix>.undo` (the log of epoch `epoch`),
//! `<epoch>-<suffix>.json` ([`PointMeta`]) and `tags.json` ([`Tags`]), all sealed
//! (see [`super::state::seal`]).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::state::ReplicaRecord;
use super::undo::{read_log, Damage, LogContents, ReadMode, UndoDisk};
use super::TargetError;
use crate::durable::StateOp;

/// How many points to keep and for how long.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    /// Untagged points kept besides the latest epoch.
    pub points: u32,
    /// Points older than this many minutes are merged away; 0: by count only.
    pub minutes: u64,
    /// A time grid (`target.keep`): `(interval seconds, how many)`, newest first;
    /// empty: no grid. Each interval keeps the oldest point in it.
    pub grid: Vec<(u64, u32)>,
}

/// What is known about one kept undo log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointMeta {
    /// The epoch whose overwritten bytes the log holds.
    pub epoch: u64,
    pub committed_unix_s: u64,
    pub disks: Vec<PointDisk>,
    /// Size of the log in bytes.
    pub undo_bytes: u64,
    /// The epochs after `epoch` up to this one changed no block: the replicas held the
    /// bytes of `epoch` through them (`None`: only at `epoch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<u64>,
    /// When the epoch this log restores was acknowledged, once the log holding that
    /// epoch (which records it) is merged away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_committed_unix_s: Option<u64>,
    /// When the replicas stopped holding the point this log restores (the commit of
    /// the oldest epoch a merged log replaces; `None`: `committed_unix_s`, this log's
    /// own epoch). Retention ages the point by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restores_until_unix_s: Option<u64>,
    /// The kept logs (file name stems) this merged log replaces: once this log exists,
    /// they are ignored and deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaces: Vec<String>,
    /// File name stem of the log and this record (epoch and a per-session suffix).
    #[serde(skip)]
    pub stem: String,
}

impl PointMeta {
    /// The newest epoch that held this log's bytes.
    pub fn last(&self) -> u64 {
        self.through.unwrap_or(self.epoch).max(self.epoch)
    }

    /// Whether the replicas held this log's bytes at `epoch`.
    fn holds(&self, epoch: u64) -> bool {
        (self.epoch..=self.last()).contains(&epoch)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointDisk {
    pub name: String,
    /// The epoch this disk held before `epoch`; `None` if it held none (first sync).
    pub prev_epoch: Option<u64>,
}

/// A state the replicas can be restored to.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryPoint {
    /// The epoch this point is listed under: the newest of the run it covers (for the
    /// latest point, the epoch the replicas hold), so the latest epoch E becomes point
    /// E once a newer epoch changes something.
    pub id: u64,
    /// The run of epochs that held these bytes: any of them opens this point.
    pub first_epoch: u64,
    pub last_epoch: u64,
    /// When `first_epoch` was acknowledged, Unix seconds (unknown for the oldest point
    /// if its own log was merged away).
    pub committed_unix_s: Option<u64>,
    /// Until when the replicas held these bytes (the next changed epoch's
    /// acknowledgement; `None` for the latest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until_unix_s: Option<u64>,
    pub disks: Vec<String>,
    /// True for the replicas as they are now.
    pub latest: bool,
    /// Bytes of undo data that restoring this point reads.
    pub bytes: u64,
    /// Bytes this point keeps on its own: the size of the log that restores it from
    /// the next newer point (0 for the latest).
    pub log_bytes: u64,
    /// The operator's name for this point (`ferry points tag`): it is never merged away.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Why the replicas cannot be shown to be at this point (only ever on the latest):
    /// they need a checksum-compare resync first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspect: Option<String>,
}

impl RecoveryPoint {
    /// Whether restoring epoch `epoch` means restoring this point.
    pub fn covers(&self, epoch: u64) -> bool {
        (self.first_epoch..=self.last_epoch).contains(&epoch)
    }
}

/// The point among `points` that covers `epoch`, if any.
pub fn find(points: &[RecoveryPoint], epoch: u64) -> Option<&RecoveryPoint> {
    points
        .iter()
        .find(|p| p.id == epoch)
        .or_else(|| points.iter().find(|p| p.covers(epoch)))
}

pub fn points_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("points")
}

fn state_err(path: &Path, op: StateOp, source: io::Error) -> TargetError {
    TargetError::State {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Keeps the committed log of `epoch` as a recovery point: its metadata first, then
/// the log renamed beside it, both directories synced. Pruning is separate
/// ([`prune`]): nothing about older points can make a commit fail.
pub(crate) fn keep_log(
    state_dir: &Path,
    epoch: u64,
    log: &Path,
    disks: &[UndoDisk],
    undo_bytes: u64,
) -> Result<(), TargetError> {
    let dir = points_dir(state_dir);
    crate::durable::ensure_dir(&dir).map_err(|e| state_err(&dir, StateOp::Create, e))?;
    let meta = PointMeta {
        epoch,
        committed_unix_s: now_s(),
        disks: disks
            .iter()
            .map(|d| PointDisk {
                name: d.name.clone(),
                prev_epoch: d.prev_epoch.filter(|_| d.logged),
            })
            .collect(),
        undo_bytes,
        through: None,
        prev_committed_unix_s: None,
        restores_until_unix_s: None,
        replaces: Vec::new(),
        stem: String::new(),
    };
    // The log's own name (epoch and a per-session suffix) names the point's files.
    let stem = log.file_stem().and_then(|s| s.to_str()).unwrap_or("log");
    let json = dir.join(format!("{stem}.json"));
    crate::durable::write_atomic(&json, &super::state::seal(&meta))
        .map_err(|e| state_err(&json, StateOp::Write, e))?;
    let kept = dir.join(format!("{stem}.undo"));
    fs::rename(log, &kept).map_err(|e| state_err(log, StateOp::KeepAsPoint, e))?;
    crate::durable::sync_dir(&dir).map_err(|e| state_err(&dir, StateOp::Fsync, e))?;
    if let Some(parent) = log.parent() {
        crate::durable::sync_dir(parent).map_err(|e| state_err(parent, StateOp::Fsync, e))?;
    }
    Ok(())
}

/// An epoch that changed no block committed: the replicas hold the bytes they held at
/// its previous epoch. If the newest kept log of its disks already holds those bytes
/// through that previous epoch, its record is extended (durably) to this epoch and
/// true is returned: the empty log need not be kept. False: there is no such log (it
/// was merged away, or a changed epoch was not kept), and the caller keeps the empty
/// log as a point as any other. Idempotent (recovery may run it again).
pub(crate) fn extend_through(
    state_dir: &Path,
    epoch: u64,
    disks: &[UndoDisk],
) -> Result<bool, TargetError> {
    let Some(prev) = disks.first().and_then(|d| d.prev_epoch) else {
        return Ok(false);
    };
    if disks
        .iter()
        .any(|d| !d.logged || d.prev_epoch != Some(prev))
    {
        return Ok(false);
    }
    let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
    let newest = kept(state_dir)?
        .into_iter()
        .filter(|m| m.disks.iter().any(|d| names.contains(&d.name.as_str())))
        .max_by_key(|m| m.epoch);
    let Some(mut m) = newest else {
        return Ok(false);
    };
    let same_disks =
        m.disks.len() == names.len() && m.disks.iter().zip(&names).all(|(d, n)| d.name == *n);
    if !same_disks || !m.holds(prev) {
        // Already extended past `prev` by an interrupted run of this commit?
        return Ok(same_disks && m.holds(epoch));
    }
    m.through = Some(epoch);
    save_meta(state_dir, &m)?;
    Ok(true)
}

fn save_meta(state_dir: &Path, m: &PointMeta) -> Result<(), TargetError> {
    let json = points_dir(state_dir).join(format!("{}.json", m.stem));
    crate::durable::write_atomic(&json, &super::state::seal(m))
        .map_err(|e| state_err(&json, StateOp::Write, e))
}

/// Every kept log in service, oldest first. Metadata that cannot be read (damaged, or
/// not ferry's) is skipped and logged: its point is no longer offered, and the chain of
/// older points through it ends there (see [`list`]). Logs replaced by a merged log
/// are left out.
pub(crate) fn kept(state_dir: &Path) -> Result<Vec<PointMeta>, TargetError> {
    Ok(scan(state_dir)?.0)
}

/// The kept logs in service (oldest first) and the stems of logs a merged log replaced
/// (to be deleted).
fn scan(state_dir: &Path) -> Result<(Vec<PointMeta>, Vec<String>), TargetError> {
    let dir = points_dir(state_dir);
    let mut metas = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((metas, Vec::new())),
        Err(e) => return Err(state_err(&dir, StateOp::Read, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| state_err(&dir, StateOp::Read, e))?.path();
        if path.extension().is_none_or(|x| x != "json") || path.file_name() == Some(TAGS.as_ref()) {
            continue;
        }
        let meta = fs::read(&path)
            .map_err(|e| state_err(&path, StateOp::Read, e))
            .and_then(|b| {
                super::state::unseal::<PointMeta>(&b).map_err(|source| TargetError::StateFile {
                    path: path.clone(),
                    source,
                })
            });
        let mut meta = match meta {
            Ok(m) => m,
            Err(problem) => {
                tracing::warn!(
                    "recovery point metadata is unreadable ({}); that point and the ones before it are not offered",
                    crate::chain(&problem)
                );
                continue;
            }
        };
        if path.with_extension("undo").exists() {
            meta.stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            metas.push(meta);
        }
    }
    let replaced: HashSet<String> = metas
        .iter()
        .flat_map(|m| m.replaces.iter().cloned())
        .collect();
    let (gone, mut metas): (Vec<PointMeta>, Vec<PointMeta>) =
        metas.into_iter().partition(|m| replaced.contains(&m.stem));
    metas.sort_by_key(|m| m.epoch);
    Ok((metas, gone.into_iter().map(|m| m.stem).collect()))
}
/// Takes every kept point that involves one of `disks` out of service (renamed
/// `.retired`, kept for inspection): they are reached through a replica that is no
/// longer a known epoch.
pub(crate) fn retire(state_dir: &Path, disks: &[String], why: &str) -> Result<(), TargetError> {
    let dir = points_dir(state_dir);
    for m in kept(state_dir)? {
        if m.disks.iter().any(|d| disks.contains(&d.name)) {
            retire_one(&dir, &m.stem)?;
            tracing::error!(
                "recovery point log {} retired: {why}",
                dir.join(format!("{}.undo", m.stem)).display()
            );
        }
    }
    Ok(())
}

fn retire_one(dir: &Path, stem: &str) -> Result<(), TargetError> {
    // The logs a merged log replaced first: without it they would be in service again.
    let mut stems = replaced_by(dir, stem);
    stems.push(stem.to_string());
    for stem in &stems {
        for ext in ["undo", "json"] {
            let p = dir.join(format!("{stem}.{ext}"));
            match fs::rename(&p, dir.join(format!("{stem}.{ext}.retired"))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(state_err(&p, StateOp::Retire, e)),
            }
        }
    }
    crate::durable::sync_dir(dir).map_err(|e| state_err(dir, StateOp::Fsync, e))
}

/// The logs the (merged) kept log `stem` replaces, as its record lists them; none if
/// it cannot be read.
fn replaced_by(dir: &Path, stem: &str) -> Vec<String> {
    fs::read(dir.join(format!("{stem}.json")))
        .ok()
        .and_then(|b| super::state::unseal::<PointMeta>(&b).ok())
        .map(|m| m.replaces)
        .unwrap_or_default()
}

/// Deletes the kept log `stem` and its metadata (its point is consumed or discarded),
/// durably.
pub(crate) fn remove_point(state_dir: &Path, stem: &str) -> Result<(), TargetError> {
    let dir = points_dir(state_dir);
    // The logs a merged log replaced first (left by an interrupted merge): without the
    // merged log they would be in service again. Then the log before its metadata:
    // metadata whose log is gone is never offered.
    let mut stems = replaced_by(&dir, stem);
    stems.push(stem.to_string());
    for stem in &stems {
        for ext in ["undo", "json"] {
            let p = dir.join(format!("{stem}.{ext}"));
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(state_err(&p, StateOp::Remove, e)),
            }
        }
    }
    crate::durable::sync_dir(&dir).map_err(|e| state_err(&dir, StateOp::Fsync, e))
}

/// One kept log on the way back from the replicas now, and the point it restores (none
/// where its disks do not agree on the epoch before it).
struct Link {
    /// Index of the log in the metas walked.
    meta: usize,
    point: Option<RecoveryPoint>,
}

/// Merges points away as `keep` says (see the module doc): the oldest by deleting
/// their logs, oldest first, so every kept point stays restorable; the ones between
/// kept points by folding their logs into the next newer kept one. Only the logs of
/// `disks` (the group that just committed) are considered; tagged points are kept.
pub fn prune(state_dir: &Path, keep: &Retention, disks: &[String]) -> Result<(), TargetError> {
    let (metas, replaced) = scan(state_dir)?;
    for stem in &replaced {
        // Replaced by a merged log that is whole: an interrupted merge's leftovers.
        remove_point(state_dir, stem)?;
    }
    clean_merge_leftovers(state_dir, disks)?;
    let metas: Vec<PointMeta> = metas
        .into_iter()
        .filter(|m| m.disks.iter().all(|d| disks.contains(&d.name)))
        .collect();
    let records = load_records(state_dir, disks)?;
    let links = walk(&records, &metas);
    if links.is_empty() {
        // Nothing reachable from the replicas now: merge by count and age alone.
        return prune_oldest(state_dir, keep, &metas);
    }
    let tags = Tags::load(state_dir)?;
    let kept_points = decide(keep, &links, &tags, now_s());
    // Every log older than the one restoring the oldest kept point goes, oldest first.
    let oldest_kept = kept_points.iter().rposition(|&k| k);
    let first_needed = oldest_kept.map_or(usize::MAX, |k| links[k].meta);
    if let Some(k) = oldest_kept {
        // The log that records when the oldest kept point was acknowledged goes: its
        // time moves to the log that restores the point first.
        let lead = &metas[links[k].meta];
        let when = links[k].point.as_ref().and_then(|p| p.committed_unix_s);
        if lead.prev_committed_unix_s.is_none() && when.is_some() && first_needed > 0 {
            let mut lead = lead.clone();
            lead.prev_committed_unix_s = when;
            save_meta(state_dir, &lead)?;
        }
    }
    for m in &metas[..first_needed.min(metas.len())] {
        remove_meta(state_dir, m, StateOp::MergeAway)?;
    }
    let Some(oldest_kept) = oldest_kept else {
        return Ok(());
    };
    // Runs of dropped points between kept ones: links[j..=i] with only i kept.
    let mut j = 0;
    for i in 0..=oldest_kept {
        if !kept_points[i] {
            continue;
        }
        if i > j {
            let run: Vec<&PointMeta> = links[j..=i].iter().map(|l| &metas[l.meta]).collect();
            if let Err(e) = merge(state_dir, &run) {
                tracing::warn!(
                    "merging recovery points away failed, they stay: {}",
                    crate::chain(&e)
                );
            }
        }
        j = i + 1;
    }
    Ok(())
}

/// Removes what a merge of `disks`' points left when it was interrupted before its
/// commit point: a merged log that never became whole (`.undo.part`) and its record.
/// A part without a record may be another group's merge in progress: it goes only
/// when it is older than [`LEFTOVER_AGE`].
fn clean_merge_leftovers(state_dir: &Path, disks: &[String]) -> Result<(), TargetError> {
    let dir = points_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(state_err(&dir, StateOp::Read, e)),
    };
    let mut gone = false;
    for entry in entries {
        let path = entry.map_err(|e| state_err(&dir, StateOp::Read, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let (stem, part) = if let Some(stem) = name.strip_suffix(".undo.part") {
            (stem, true)
        } else if let Some(stem) = name.strip_suffix(".json") {
            (stem, false)
        } else {
            continue;
        };
        let undo = dir.join(format!("{stem}.undo"));
        let json = dir.join(format!("{stem}.json"));
        if undo.exists() || stem == TAGS.trim_end_matches(".json") {
            continue;
        }
        let meta = fs::read(&json)
            .ok()
            .and_then(|b| super::state::unseal::<PointMeta>(&b).ok());
        let ours = match &meta {
            // Only a merge's record names logs it replaces: a kept log's record is
            // written before its log arrives, and must stay.
            Some(m) => !m.replaces.is_empty() && m.disks.iter().all(|d| disks.contains(&d.name)),
            None => {
                part && fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > LEFTOVER_AGE))
            }
        };
        if !ours {
            continue;
        }
        for p in [dir.join(format!("{stem}.undo.part")), json] {
            match fs::remove_file(&p) {
                Ok(()) => gone = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(state_err(&p, StateOp::Remove, e)),
            }
        }
    }
    if gone {
        crate::durable::sync_dir(&dir).map_err(|e| state_err(&dir, StateOp::Fsync, e))?;
    }
    Ok(())
}

/// How old a merged log's part must be before a merge of another group removes it.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Which points of `links` (newest first) `keep` keeps: every tagged one, and of the
/// others those within the count, the age and the grid.
fn decide(keep: &Retention, links: &[Link], tags: &Tags, now: u64) -> Vec<bool> {
    let mut verdict = vec![false; links.len()];
    // A point acknowledged "in the future" means the clock went back: the grid would
    // put every such point in its first slot and merge all but one away. Until the
    // clock passes them again, the grid keeps what the count and age keep.
    let clock_went_back = links
        .iter()
        .filter_map(|l| l.point.as_ref()?.until_unix_s)
        .any(|t| t > now.saturating_add(60));
    if clock_went_back && !keep.grid.is_empty() {
        tracing::warn!("a recovery point is newer than the clock: the keep grid merges nothing until the clock passes it");
    }
    // Grid bucket of each untagged point: the oldest point in a bucket stays.
    let mut oldest_in: HashMap<(usize, u64), usize> = HashMap::new();
    let mut rank = 0u64;
    for (k, l) in links.iter().enumerate() {
        let Some(p) = &l.point else { continue };
        if tags.of(p).is_some() {
            verdict[k] = true;
            continue;
        }
        let age = now.saturating_sub(p.until_unix_s.unwrap_or(0));
        let counted = rank < u64::from(keep.points);
        rank += 1;
        let young = keep.minutes == 0 || age <= keep.minutes * 60;
        if !(counted && young) {
            continue;
        }
        if keep.grid.is_empty() || clock_went_back {
            verdict[k] = true;
            continue;
        }
        if let Some(bucket) = grid_bucket(&keep.grid, age) {
            // Links run newest first: a later one in the same bucket is older.
            oldest_in.insert(bucket, k);
        }
    }
    for k in oldest_in.into_values() {
        verdict[k] = true;
    }
    verdict
}

/// The grid interval (its index, and which of its slots) that a point `age` seconds
/// old falls in; `None` past the grid.
fn grid_bucket(grid: &[(u64, u32)], age: u64) -> Option<(usize, u64)> {
    let mut start = 0u64;
    for (i, &(every, count)) in grid.iter().enumerate() {
        let span = every.saturating_mul(u64::from(count));
        if age < start.saturating_add(span) {
            return Some((i, (age - start) / every.max(1)));
        }
        start = start.saturating_add(span);
    }
    None
}

/// The old rule, for logs no replica reaches: the oldest go while there are more than
/// `keep.points` or they are older than `keep.minutes`.
fn prune_oldest(
    state_dir: &Path,
    keep: &Retention,
    metas: &[PointMeta],
) -> Result<(), TargetError> {
    let now = now_s();
    let mut left = metas.len();
    for m in metas {
        let too_many = left > keep.points as usize;
        let too_old =
            keep.minutes > 0 && now.saturating_sub(m.committed_unix_s) > keep.minutes * 60;
        if !(too_many || too_old) {
            break;
        }
        remove_meta(state_dir, m, StateOp::MergeAway)?;
        left -= 1;
    }
    Ok(())
}

/// Deletes one kept log and then its record, not syncing the directory (the caller's
/// next step or the next prune does; a log whose deletion is lost is merged again).
fn remove_meta(state_dir: &Path, m: &PointMeta, op: StateOp) -> Result<(), TargetError> {
    let dir = points_dir(state_dir);
    for ext in ["undo", "json"] {
        let p = dir.join(format!("{}.{ext}", m.stem));
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(state_err(&p, op, e)),
        }
    }
    Ok(())
}

/// Folds the logs of `run` (newest first; the points the newer ones restore are
/// dropped, the oldest one's is kept) into one log under a new name: the epoch of the
/// newest, the previous epochs of the oldest. Durable before the replaced logs go.
/// Whether every point of `run` names the same disks as `newest`, each holding an
/// epoch before it.
fn mergeable(newest: &PointMeta, run: &[&PointMeta]) -> bool {
    let names: Vec<&str> = newest.disks.iter().map(|d| d.name.as_str()).collect();
    run.iter().all(|m| {
        m.disks.len() == names.len()
            && m.disks
                .iter()
                .zip(&names)
                .all(|(d, n)| d.name == *n && d.prev_epoch.is_some())
    })
}

fn merge(state_dir: &Path, run: &[&PointMeta]) -> Result<(), TargetError> {
    let (Some(newest), Some(oldest)) = (run.first(), run.last()) else {
        return Ok(());
    };
    if !mergeable(newest, run) {
        // Disks joined or left the group, or one held no epoch: kept as they are.
        return Ok(());
    }
    let dir = points_dir(state_dir);
    // Oldest first: that is the order of the merged entries.
    let mut logs = Vec::with_capacity(run.len());
    for m in run.iter().rev() {
        let path = dir.join(format!("{}.undo", m.stem));
        logs.push(read_kept(&path, m).map_err(|e| e.into_error(&path))?);
    }
    let Some(newest_log) = logs.last() else {
        return Ok(());
    };
    let mut disks = newest_log.disks.clone();
    for (d, o) in disks.iter_mut().zip(&oldest.disks) {
        d.prev_epoch = o.prev_epoch;
        d.logged = true;
    }
    let mut nonce = [0u8; 4];
    getrandom::fill(&mut nonce)
        .map_err(|e| state_err(&dir, StateOp::DrawLogName, io::Error::other(e.to_string())))?;
    let stem = format!("{:020}-{:08x}", newest.epoch, u32::from_le_bytes(nonce));
    let part = dir.join(format!("{stem}.undo.part"));
    let refs: Vec<&LogContents> = logs.iter().collect();
    let size = super::undo::write_merged(&part, newest.epoch, &disks, &refs)?;
    let meta = PointMeta {
        epoch: newest.epoch,
        committed_unix_s: newest.committed_unix_s,
        disks: disks
            .iter()
            .map(|d| PointDisk {
                name: d.name.clone(),
                prev_epoch: d.prev_epoch,
            })
            .collect(),
        undo_bytes: size,
        through: newest.through,
        prev_committed_unix_s: oldest.prev_committed_unix_s,
        // The merged log restores the point before its oldest part: the replicas
        // stopped holding it when that part's epoch committed.
        restores_until_unix_s: Some(
            oldest
                .restores_until_unix_s
                .unwrap_or(oldest.committed_unix_s),
        ),
        replaces: run.iter().map(|m| m.stem.clone()).collect(),
        stem: stem.clone(),
    };
    save_meta(state_dir, &meta)?;
    let undo = dir.join(format!("{stem}.undo"));
    fs::rename(&part, &undo).map_err(|e| state_err(&part, StateOp::Rename, e))?;
    // The commit point of the merge: from here the replaced logs are out of service.
    crate::durable::sync_dir(&dir).map_err(|e| state_err(&dir, StateOp::Fsync, e))?;
    if ferry_io::failpoint::hit("points.merge.crash") {
        // A crash with the merged log whole and the replaced ones still there.
        std::process::abort();
    }
    for m in run {
        remove_meta(state_dir, m, StateOp::MergeAway)?;
    }
    crate::durable::sync_dir(&dir).map_err(|e| state_err(&dir, StateOp::Fsync, e))
}

fn load_records(
    state_dir: &Path,
    disks: &[String],
) -> Result<Vec<(String, ReplicaRecord)>, TargetError> {
    let mut records = Vec::new();
    for name in disks {
        if let Some(r) = ReplicaRecord::load(state_dir, name)? {
            records.push((name.clone(), r));
        }
    }
    Ok(records)
}

/// The recovery points of the configured disks, newest first. A point is offered only
/// when every kept log between it and the replicas now is present and continuous (each
/// log holds the epoch its disks held after the previous one), and no disk is suspect
/// (see [`ReplicaRecord::suspect`]): the replicas themselves are then only the latest
/// point, flagged.
pub fn list(state_dir: &Path, disks: &[String]) -> Result<Vec<RecoveryPoint>, TargetError> {
    let records = load_records(state_dir, disks)?;
    let Some(mut latest) = latest_point(&records) else {
        return Ok(Vec::new());
    };
    if latest.suspect.is_some() {
        return Ok(vec![latest]);
    }
    // Only logs of these disks: several groups may share a state dir, and their epoch
    // numbers are independent.
    let metas: Vec<PointMeta> = kept(state_dir)?
        .into_iter()
        .filter(|m| m.disks.iter().all(|d| disks.contains(&d.name)))
        .collect();
    let links = walk(&records, &metas);
    if let Some(l) = links.first() {
        // The newest log holds the latest epoch: the replicas have held its bytes
        // since that log's epoch.
        latest.first_epoch = metas[l.meta].epoch.min(latest.id);
    }
    let mut points = vec![latest];
    points.extend(links.into_iter().filter_map(|l| l.point));
    let tags = Tags::load(state_dir)?;
    for p in &mut points {
        p.tag = tags.of(p).map(|t| t.name.clone());
    }
    Ok(points)
}

/// The replicas as they are now, from their records (none without a record).
fn latest_point(records: &[(String, ReplicaRecord)]) -> Option<RecoveryPoint> {
    let latest = records.iter().map(|(_, r)| r.epoch).max()?;
    Some(RecoveryPoint {
        id: latest,
        first_epoch: latest,
        last_epoch: latest,
        committed_unix_s: records.iter().map(|(_, r)| r.committed_unix_s).max(),
        until_unix_s: None,
        disks: records
            .iter()
            .filter(|(_, r)| r.epoch == latest)
            .map(|(n, _)| n.clone())
            .collect(),
        latest: true,
        bytes: 0,
        log_bytes: 0,
        tag: None,
        suspect: records
            .iter()
            .find_map(|(n, r)| r.suspect.as_ref().map(|s| format!("disk {n:?}: {s}"))),
    })
}

/// The kept logs behind the latest point, newest first, each with the point it
/// restores: walks back from the disks' epochs now (`records`) through the kept logs
/// (`metas`, oldest first) while they are continuous.
fn walk(records: &[(String, ReplicaRecord)], metas: &[PointMeta]) -> Vec<Link> {
    let mut links = Vec::new();
    // The epoch each disk is at, walking back from now through the kept logs.
    let mut at: HashMap<&str, u64> = records.iter().map(|(n, r)| (n.as_str(), r.epoch)).collect();
    let mut bytes = 0;
    for (i, m) in metas.iter().enumerate().rev() {
        if m.disks
            .iter()
            .any(|d| !at.get(d.name.as_str()).is_some_and(|&e| m.holds(e)))
        {
            // A log is missing (or unreadable) between here and now: nothing older can
            // be restored.
            break;
        }
        bytes += m.undo_bytes;
        for d in &m.disks {
            match d.prev_epoch {
                Some(p) => at.insert(&d.name, p),
                None => at.remove(d.name.as_str()),
            };
        }
        // The log of epoch m.epoch restores each disk to its previous epoch; a point
        // exists where the disks agree on it.
        let prevs: Vec<u64> = m.disks.iter().filter_map(|d| d.prev_epoch).collect();
        let agreed = prevs
            .first()
            .copied()
            .filter(|&p| prevs.len() == m.disks.len() && prevs.iter().all(|&q| q == p));
        let point = agreed.map(|prev| {
            // The older log that holds `prev` names the run of epochs with its bytes.
            let older = metas[..i].iter().rev().find(|o| {
                o.holds(prev)
                    && o.disks.len() == m.disks.len()
                    && o.disks.iter().zip(&m.disks).all(|(a, b)| a.name == b.name)
            });
            RecoveryPoint {
                id: prev,
                first_epoch: older.map_or(prev, |o| o.epoch.min(prev)),
                last_epoch: prev,
                committed_unix_s: older
                    .map(|o| o.committed_unix_s)
                    .or(m.prev_committed_unix_s),
                until_unix_s: Some(m.restores_until_unix_s.unwrap_or(m.committed_unix_s)),
                disks: m.disks.iter().map(|d| d.name.clone()).collect(),
                latest: false,
                bytes,
                log_bytes: m.undo_bytes,
                tag: None,
                suspect: None,
            }
        });
        links.push(Link { meta: i, point });
    }
    links
}

/// Name of the tags file in the points directory.
const TAGS: &str = "tags.json";

/// The operator's names for points (`ferry points tag`); a tagged point is never merged
/// away.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    pub tags: Vec<Tag>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tag {
    pub name: String,
    /// The oldest epoch of the tagged point's run (any epoch of the run would do: the
    /// run only grows newer while the point is the latest).
    pub epoch: u64,
    pub disks: Vec<String>,
}

/// What [`tag`] or [`untag`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Tagged {
    pub name: String,
    /// The point's id as `ferry points` lists it.
    pub point: u64,
    /// A tag of this name was moved from that point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_from: Option<u64>,
}

impl Tags {
    fn path(state_dir: &Path) -> PathBuf {
        points_dir(state_dir).join(TAGS)
    }

    /// The tags (none without a file). A damaged file is an error: tags must not be
    /// lost silently, or retention would merge the points away.
    pub fn load(state_dir: &Path) -> Result<Tags, TargetError> {
        let path = Self::path(state_dir);
        match fs::read(&path) {
            Ok(b) => super::state::unseal(&b).map_err(|source| TargetError::StateFile {
                path: path.clone(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Tags::default()),
            Err(e) => Err(state_err(&path, StateOp::Read, e)),
        }
    }

    fn save(&self, state_dir: &Path) -> Result<(), TargetError> {
        let dir = points_dir(state_dir);
        crate::durable::ensure_dir(&dir).map_err(|e| state_err(&dir, StateOp::Create, e))?;
        let path = Self::path(state_dir);
        crate::durable::write_atomic(&path, &super::state::seal(self))
            .map_err(|e| state_err(&path, StateOp::Write, e))
    }

    /// The tag of point `p`, if any.
    fn of(&self, p: &RecoveryPoint) -> Option<&Tag> {
        self.tags
            .iter()
            .find(|t| p.covers(t.epoch) && t.disks.iter().all(|d| p.disks.contains(d)))
    }
}

/// Tags the offered point that covers epoch `point` as `name`: it is kept until
/// [`untag`]. A tag of that name on another point moves here. `disks` are the
/// configured disks.
pub fn tag(
    state_dir: &Path,
    disks: &[String],
    point: u64,
    name: &str,
) -> Result<Tagged, TargetError> {
    let points = list(state_dir, disks)?;
    let Some(p) = find(&points, point).filter(|p| p.suspect.is_none()) else {
        return Err(TargetError::NoSuchPoint {
            dir: points_dir(state_dir),
            point,
            available: points.iter().map(|p| p.id).collect(),
        });
    };
    let mut tags = Tags::load(state_dir)?;
    let moved_from = tags
        .tags
        .iter()
        .find(|t| t.name == name && !p.covers(t.epoch))
        .map(|t| t.epoch);
    tags.tags
        .retain(|t| t.name != name && !(p.covers(t.epoch) && t.disks == p.disks));
    tags.tags.push(Tag {
        name: name.to_string(),
        // The point's id stays in its run while it exists; its first epoch does not
        // (deleting the logs below the oldest kept point shortens its run).
        epoch: p.id,
        disks: p.disks.clone(),
    });
    tags.save(state_dir)?;
    Ok(Tagged {
        name: name.to_string(),
        point: p.id,
        moved_from,
    })
}

/// Removes the tag named `which`, or the tag of the point covering epoch `which`;
/// what was removed (`None`: no such tag).
pub fn untag(
    state_dir: &Path,
    disks: &[String],
    which: &str,
) -> Result<Option<Tagged>, TargetError> {
    let mut tags = Tags::load(state_dir)?;
    let points = list(state_dir, disks)?;
    let epoch: Option<u64> = which.parse().ok();
    let by_point = epoch.and_then(|e| find(&points, e));
    let pos = tags.tags.iter().position(|t| t.name == which).or_else(|| {
        tags.tags.iter().position(|t| match by_point {
            Some(p) => p.covers(t.epoch),
            None => Some(t.epoch) == epoch,
        })
    });
    let Some(pos) = pos else {
        return Ok(None);
    };
    let t = tags.tags.remove(pos);
    tags.save(state_dir)?;
    let point = points
        .iter()
        .find(|p| p.covers(t.epoch))
        .map_or(t.epoch, |p| p.id);
    Ok(Some(Tagged {
        name: t.name,
        point,
        moved_from: None,
    }))
}

/// The undo logs of epochs that are applied right now or were left half-applied by a
/// target that stopped (the target settles them when it starts: see
/// [`super::undo::recover`]).
pub fn interrupted(state_dir: &Path) -> Result<Vec<PathBuf>, TargetError> {
    let dir = super::undo::undo_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(state_err(&dir, StateOp::Read, e)),
    };
    let mut logs = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| state_err(&dir, StateOp::Read, e))?.path();
        if path.extension().is_some_and(|x| x == "undo") {
            logs.push(path);
        }
    }
    logs.sort();
    Ok(logs)
}

/// Writes the replicas as they were at recovery point `point` into `out_dir`, one image
/// file per disk (sparse copies with the newer undo logs applied). The caller holds the
/// target's apply lock, so no epoch is applied meanwhile.
pub fn materialize(
    state_dir: &Path,
    point: u64,
    replicas: &[(String, PathBuf)],
    out_dir: &Path,
) -> Result<Vec<(String, PathBuf)>, TargetError> {
    settle_interrupted(state_dir, replicas)?;
    let names: Vec<String> = replicas.iter().map(|(n, _)| n.clone()).collect();
    let points = list(state_dir, &names)?;
    if let Some(why) = points.first().and_then(|p| p.suspect.as_ref()) {
        return Err(TargetError::NotAtKnownEpoch {
            state_dir: state_dir.to_path_buf(),
            why: why.clone(),
        });
    }
    let chosen = find(&points, point).ok_or_else(|| TargetError::NoSuchPoint {
        dir: points_dir(state_dir),
        point,
        available: points.iter().map(|p| p.id).collect(),
    })?;
    let logs = if chosen.latest {
        Vec::new()
    } else {
        logs_back_to(state_dir, chosen.last_epoch, &names)?
    };
    crate::durable::ensure_dir(out_dir).map_err(|e| state_err(out_dir, StateOp::Create, e))?;
    let mut out = Vec::new();
    let mut files = Vec::new();
    for name in &chosen.disks {
        let Some((_, replica)) = replicas.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let (dest, file) = copy_replica(state_dir, name, replica, out_dir)?;
        files.push((name.clone(), file));
        out.push((name.clone(), dest));
    }
    for (path, log) in &logs {
        let targets: Vec<Option<&File>> = log
            .disks
            .iter()
            .map(|d| files.iter().find(|(n, _)| *n == d.name).map(|(_, f)| f))
            .collect();
        log.apply_reversed(&targets)
            .map_err(|e| state_err(path, StateOp::ApplyToCopy, e))?;
    }
    for (_, f) in &files {
        f.sync_all()
            .map_err(|e| state_err(out_dir, StateOp::Fsync, e))?;
    }
    Ok(out)
}

/// An epoch a crashed target left half-applied must be undone before anything is
/// copied; the caller's exclusive apply lock means no live session is applying one.
pub(crate) fn settle_interrupted(
    state_dir: &Path,
    replicas: &[(String, PathBuf)],
) -> Result<(), TargetError> {
    for r in super::undo::recover(state_dir, replicas)? {
        match r {
            super::undo::Recovery::Pending { log, error, .. } => {
                return Err(TargetError::Unsettled {
                    log,
                    source: Box::new(error),
                })
            }
            super::undo::Recovery::Distrusted { .. } => {
                tracing::error!("an interrupted epoch's log cannot be trusted: {r}")
            }
            _ => tracing::warn!("recovered an interrupted epoch before opening a point: {r}"),
        }
    }
    Ok(())
}

/// The kept logs of `names` newer than `point`, newest first, each read whole and
/// checked before the first is applied: a damaged one is refused, naming it, and taken
/// out of service so the points behind it are no longer offered — never a wrong image.
pub(crate) fn logs_back_to(
    state_dir: &Path,
    point: u64,
    names: &[String],
) -> Result<Vec<(PathBuf, LogContents)>, TargetError> {
    let dir = points_dir(state_dir);
    let mut logs = Vec::new();
    for m in kept(state_dir)?
        .iter()
        .rev()
        .filter(|m| m.epoch > point && m.disks.iter().all(|d| names.contains(&d.name)))
    {
        let path = dir.join(format!("{}.undo", m.stem));
        match read_kept(&path, m) {
            Ok(mut log) => {
                log.last_epoch = m.last();
                logs.push((path, log));
            }
            Err(Damage::Untrusted(source)) => {
                retire_one(&dir, &m.stem)?;
                return Err(TargetError::PointRetired {
                    log: path,
                    point,
                    source,
                });
            }
            Err(e) => return Err(e.into_error(&path)),
        }
    }
    Ok(logs)
}

/// Reads the kept log at `path` whole; its size must be the one `m` recorded.
fn read_kept(path: &Path, m: &PointMeta) -> Result<LogContents, Damage> {
    let log = read_log(path, ReadMode::Kept)?;
    let size = log
        .file_len()
        .map_err(|e| Damage::Io(state_err(path, StateOp::Stat, e)))?;
    if size != m.undo_bytes {
        return Err(Damage::Untrusted(super::undo::LogDamage::KeptSize {
            size,
            recorded: m.undo_bytes,
        }));
    }
    Ok(log)
}

/// Copies the replica of disk `name` to `<out_dir>/<name>.img` at its recorded size;
/// the copy's path and a handle to write the undo logs into it.
fn copy_replica(
    state_dir: &Path,
    name: &str,
    replica: &Path,
    out_dir: &Path,
) -> Result<(PathBuf, File), TargetError> {
    let size = ReplicaRecord::load(state_dir, name)?
        .map(|r| r.disk_size)
        .ok_or_else(|| TargetError::NoRecord {
            replica: replica.to_path_buf(),
            disk: name.to_string(),
        })?;
    let dest = out_dir.join(format!("{name}.img"));
    sparse_copy(replica, &dest, size)?;
    let file = OpenOptions::new()
        .write(true)
        .open(&dest)
        .map_err(|e| state_err(&dest, StateOp::Open, e))?;
    Ok((dest, file))
}

/// Copies `src` to `dest` keeping holes (SEEK_DATA/SEEK_HOLE, copy_file_range, which
/// reflinks where the file system can).
fn sparse_copy(src: &Path, dest: &Path, len: u64) -> Result<(), TargetError> {
    use std::os::fd::AsRawFd;
    let s = File::open(src).map_err(|e| state_err(src, StateOp::Open, e))?;
    let d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .map_err(|e| state_err(dest, StateOp::Create, e))?;
    d.set_len(len)
        .map_err(|e| state_err(dest, StateOp::Size, e))?;
    let (sfd, dfd) = (s.as_raw_fd(), d.as_raw_fd());
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on an open descriptor has no memory effects.
        let data = unsafe { libc::lseek(sfd, pos as libc::off_t, libc::SEEK_DATA) };
        let (data, end) = if data < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            // No SEEK_DATA here (a block device): copy everything that is left.
            (pos as libc::off_t, len)
        } else {
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
            (
                data,
                if hole < 0 {
                    len
                } else {
                    (hole as u64).min(len)
                },
            )
        };
        if data as u64 >= len {
            break;
        }
        let mut at = data;
        while (at as u64) < end {
            let mut off_in = at;
            let mut off_out = at;
            let want = (end - at as u64).min(1 << 30) as usize;
            // SAFETY: both descriptors are open; the offsets are plain integers the
            // kernel reads and updates; no user memory is involved.
            let n = unsafe { libc::copy_file_range(sfd, &mut off_in, dfd, &mut off_out, want, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Not between these files (a block device, another file system):
                    // copy through a buffer instead.
                    Some(libc::EINVAL | libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS) => {
                        copy_buffered(&s, &d, at as u64, end)
                            .map_err(|e| state_err(dest, StateOp::Copy, e))?;
                        break;
                    }
                    _ => return Err(state_err(dest, StateOp::Copy, e)),
                }
            }
            if n == 0 {
                return Err(TargetError::ReplicaShort {
                    replica: src.to_path_buf(),
                });
            }
            at += n as libc::off_t;
        }
        pos = end;
    }
    Ok(())
}

fn copy_buffered(src: &File, dest: &File, from: u64, to: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], at)?;
        if !crate::protocol::is_zero(&buf[..n]) {
            dest.write_all_at(&buf[..n], at)?;
        }
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(until: u64, tagged_epoch: Option<u64>) -> (Link, Option<Tag>) {
        let epoch = until;
        let point = RecoveryPoint {
            id: epoch,
            first_epoch: epoch,
            last_epoch: epoch,
            committed_unix_s: None,
            until_unix_s: Some(until),
            disks: vec!["a".into()],
            latest: false,
            bytes: 0,
            log_bytes: 0,
            tag: None,
            suspect: None,
        };
        let tag = tagged_epoch.map(|e| Tag {
            name: format!("t{e}"),
            epoch: e,
            disks: vec!["a".into()],
        });
        (
            Link {
                meta: 0,
                point: Some(point),
            },
            tag,
        )
    }

    fn meta(epoch: u64, replaces: &[&str]) -> PointMeta {
        PointMeta {
            epoch,
            committed_unix_s: 0,
            disks: vec![PointDisk {
                name: "a".into(),
                prev_epoch: Some(epoch - 1),
            }],
            undo_bytes: 0,
            through: None,
            prev_committed_unix_s: None,
            restores_until_unix_s: None,
            replaces: replaces.iter().map(|s| s.to_string()).collect(),
            stem: String::new(),
        }
    }

    #[test]
    fn an_interrupted_merge_leaves_nothing_behind_and_a_kept_log_on_its_way_stays() {
        let state = tempfile::tempdir().unwrap();
        let dir = points_dir(state.path());
        fs::create_dir_all(&dir).unwrap();
        let put = |name: &str, bytes: &[u8]| fs::write(dir.join(name), bytes).unwrap();
        // A merge that died before its rename, of this group and of another one.
        put("m.undo.part", b"x");
        put(
            "m.json",
            &super::super::state::seal(&meta(5, &["r1", "r2"])),
        );
        let mut other = meta(5, &["r3"]);
        other.disks[0].name = "b".into();
        put("o.undo.part", b"x");
        put("o.json", &super::super::state::seal(&other));
        // A kept log's record, written before its log is renamed in.
        put("k.json", &super::super::state::seal(&meta(6, &[])));
        // A part of some merge just started (no record yet).
        put("n.undo.part", b"x");
        Tags::default().save(state.path()).unwrap();
        clean_merge_leftovers(state.path(), &["a".to_string()]).unwrap();
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "k.json",
                "n.undo.part",
                "o.json",
                "o.undo.part",
                "tags.json"
            ]
        );
    }

    #[test]
    fn grid_buckets_run_back_from_now() {
        let grid = [(60, 2), (3_600, 1)];
        assert_eq!(grid_bucket(&grid, 0), Some((0, 0)));
        assert_eq!(grid_bucket(&grid, 59), Some((0, 0)));
        assert_eq!(grid_bucket(&grid, 61), Some((0, 1)));
        assert_eq!(grid_bucket(&grid, 120), Some((1, 0)));
        assert_eq!(grid_bucket(&grid, 120 + 3_599), Some((1, 0)));
        assert_eq!(grid_bucket(&grid, 120 + 3_600), None);
    }

    #[test]
    fn the_grid_keeps_the_oldest_point_of_each_interval_and_every_tagged_one() {
        let now = 10_000;
        // Newest first: ages 10, 30, 50 (first minute), 70, 90 (second), 500 (off).
        let (links, tags): (Vec<Link>, Vec<Option<Tag>>) = [10, 30, 50, 70, 90, 500]
            .iter()
            .map(|age| link(now - age, (*age == 500).then_some(now - age)))
            .unzip();
        let tags = Tags {
            tags: tags.into_iter().flatten().collect(),
        };
        let keep = Retention {
            points: u32::MAX,
            minutes: 0,
            grid: vec![(60, 2)],
        };
        assert_eq!(
            decide(&keep, &links, &tags, now),
            vec![false, false, true, false, true, true]
        );
        // By count: the newest two untagged, and the tagged one.
        let keep = Retention {
            points: 2,
            minutes: 0,
            grid: Vec::new(),
        };
        assert_eq!(
            decide(&keep, &links, &tags, now),
            vec![true, true, false, false, false, true]
        );
    }

    #[test]
    fn after_the_clock_went_back_the_grid_merges_nothing() {
        let now = 10_000;
        // Acknowledged up to an hour "in the future": the clock was set back.
        let (links, _): (Vec<Link>, Vec<Option<Tag>>) = [3600, 1800, 10]
            .iter()
            .map(|ahead| link(now + ahead, None))
            .unzip();
        let keep = Retention {
            points: u32::MAX,
            minutes: 0,
            grid: vec![(60, 60)],
        };
        let tags = Tags { tags: Vec::new() };
        assert_eq!(decide(&keep, &links, &tags, now), vec![true, true, true]);
    }

    #[test]
    fn a_merged_log_ages_its_point_by_its_oldest_part() {
        // A merged log of epochs 5..=9 restores point 4: the replicas stopped holding
        // it when epoch 5 committed (time 500), not epoch 9 (time 900).
        let mut m = meta(9, &[]);
        m.committed_unix_s = 900;
        m.disks[0].prev_epoch = Some(4);
        m.restores_until_unix_s = Some(500);
        let older = meta(4, &[]);
        let record = ReplicaRecord {
            generation: filter_driver_shim_contract::GenerationId::from_bytes([7; 16]),
            epoch: 9,
            disk_size: 1 << 20,
            committed_unix_s: 900,
            suspect: None,
            stamp: None,
        };
        let points: Vec<_> = walk(&[("a".to_string(), record)], &[older, m])
            .into_iter()
            .filter_map(|l| l.point)
            .collect();
        let p = points.iter().find(|p| p.id == 4).expect("point 4");
        assert_eq!(p.until_unix_s, Some(500));
    }
}
