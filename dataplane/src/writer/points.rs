//! Recovery points: committed undo logs kept for a retention window.
//!
//! Applying epoch E logs the replica bytes it overwrites (see [`super::undo`]); once E
//! is committed that log is exactly what turns the replica at E back into the epoch
//! before it. Keeping the newest logs therefore keeps recovery points: the replica as
//! it was at any retained earlier epoch is the replica now with the logs newer than
//! that epoch applied, newest first. Merging the oldest point away is deleting its log;
//! the replica itself is never rewritten for retention.
//!
//! Layout: `state_dir/points/<epoch>.undo` (the log of epoch `epoch`) and
//! `<epoch>.json` ([`PointMeta`]).

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
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Points kept besides the latest epoch.
    pub points: u32,
    /// Points older than this many minutes are merged away; 0: by count only.
    pub minutes: u64,
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
    /// File name stem of the log and this record (epoch and a per-session suffix).
    #[serde(skip)]
    pub stem: String,
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
    /// The epoch this point restores.
    pub id: u64,
    /// When that epoch was acknowledged, Unix seconds (unknown for the oldest point if
    /// its own log was merged away).
    pub committed_unix_s: Option<u64>,
    pub disks: Vec<String>,
    /// True for the replicas as they are now.
    pub latest: bool,
    /// Bytes of undo data that restoring this point reads.
    pub bytes: u64,
    /// Why the replicas cannot be shown to be at this point (only ever on the latest):
    /// they need a checksum-compare resync first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspect: Option<String>,
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

/// Every kept log, oldest first. Metadata that cannot be read (damaged, or not ferry's)
/// is skipped and logged: its point is no longer offered, and the chain of older points
/// through it ends there (see [`list`]).
pub(crate) fn kept(state_dir: &Path) -> Result<Vec<PointMeta>, TargetError> {
    let dir = points_dir(state_dir);
    let mut metas = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(metas),
        Err(e) => return Err(state_err(&dir, StateOp::Read, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| state_err(&dir, StateOp::Read, e))?.path();
        if path.extension().is_none_or(|x| x != "json") {
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
    metas.sort_by_key(|m| m.epoch);
    Ok(metas)
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
    for ext in ["undo", "json"] {
        let p = dir.join(format!("{stem}.{ext}"));
        match fs::rename(&p, dir.join(format!("{stem}.{ext}.retired"))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(state_err(&p, StateOp::Retire, e)),
        }
    }
    crate::durable::sync_dir(dir).map_err(|e| state_err(dir, StateOp::Fsync, e))
}

/// Deletes the kept log `stem` and its metadata (its point is consumed or discarded),
/// durably.
pub(crate) fn remove_point(state_dir: &Path, stem: &str) -> Result<(), TargetError> {
    let dir = points_dir(state_dir);
    // The log first: metadata whose log is gone is never offered.
    for ext in ["undo", "json"] {
        let p = dir.join(format!("{stem}.{ext}"));
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(state_err(&p, StateOp::Remove, e)),
        }
    }
    crate::durable::sync_dir(&dir).map_err(|e| state_err(&dir, StateOp::Fsync, e))
}

/// Merges away the oldest points beyond the retention (oldest first, so every kept
/// point stays restorable).
pub fn prune(state_dir: &Path, keep: &Retention) -> Result<(), TargetError> {
    let metas = kept(state_dir)?;
    let dir = points_dir(state_dir);
    let now = now_s();
    let mut left = metas.len();
    for m in &metas {
        let too_many = left > keep.points as usize;
        let too_old =
            keep.minutes > 0 && now.saturating_sub(m.committed_unix_s) > keep.minutes * 60;
        if !(too_many || too_old) {
            break;
        }
        for ext in ["undo", "json"] {
            let p = dir.join(format!("{}.{ext}", m.stem));
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(state_err(&p, StateOp::MergeAway, e)),
            }
        }
        left -= 1;
    }
    Ok(())
}

/// The recovery points of the configured disks, newest first. A point is offered only
/// when every kept log between it and the replicas now is present and continuous (each
/// log's epoch is the epoch its disks held after the previous one), and no disk is
/// suspect (see [`ReplicaRecord::suspect`]): the replicas themselves are then only the
/// latest point, flagged.
pub fn list(state_dir: &Path, disks: &[String]) -> Result<Vec<RecoveryPoint>, TargetError> {
    let mut records = Vec::new();
    for name in disks {
        if let Some(r) = ReplicaRecord::load(state_dir, name)? {
            records.push((name.clone(), r));
        }
    }
    let Some(latest) = latest_point(&records) else {
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
    let mut points = vec![latest];
    points.extend(older_points(&records, &metas));
    Ok(points)
}

/// The replicas as they are now, from their records (none without a record).
fn latest_point(records: &[(String, ReplicaRecord)]) -> Option<RecoveryPoint> {
    let latest = records.iter().map(|(_, r)| r.epoch).max()?;
    Some(RecoveryPoint {
        id: latest,
        committed_unix_s: records.iter().map(|(_, r)| r.committed_unix_s).max(),
        disks: records
            .iter()
            .filter(|(_, r)| r.epoch == latest)
            .map(|(n, _)| n.clone())
            .collect(),
        latest: true,
        bytes: 0,
        suspect: records
            .iter()
            .find_map(|(n, r)| r.suspect.as_ref().map(|s| format!("disk {n:?}: {s}"))),
    })
}

/// The points behind the latest, newest first: walks back from the disks' epochs now
/// (`records`) through the kept logs (`metas`, oldest first) while they are
/// continuous.
fn older_points(records: &[(String, ReplicaRecord)], metas: &[PointMeta]) -> Vec<RecoveryPoint> {
    let mut points = Vec::new();
    // The epoch each disk is at, walking back from now through the kept logs.
    let mut at: std::collections::HashMap<&str, u64> =
        records.iter().map(|(n, r)| (n.as_str(), r.epoch)).collect();
    let mut bytes = 0;
    for (i, m) in metas.iter().enumerate().rev() {
        if m.disks
            .iter()
            .any(|d| at.get(d.name.as_str()) != Some(&m.epoch))
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
        let Some(&prev) = prevs.first() else { continue };
        if prevs.len() != m.disks.len() || prevs.iter().any(|&p| p != prev) {
            continue;
        }
        let committed = metas[..i]
            .iter()
            .rev()
            .find(|o| o.epoch == prev)
            .map(|o| o.committed_unix_s);
        points.push(RecoveryPoint {
            id: prev,
            committed_unix_s: committed,
            disks: m.disks.iter().map(|d| d.name.clone()).collect(),
            latest: false,
            bytes,
            suspect: None,
        });
    }
    points
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
    let chosen = points
        .iter()
        .find(|p| p.id == point)
        .ok_or_else(|| TargetError::NoSuchPoint {
            dir: points_dir(state_dir),
            point,
            available: points.iter().map(|p| p.id).collect(),
        })?;
    let logs = if chosen.latest {
        Vec::new()
    } else {
        logs_back_to(state_dir, point, &names)?
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
            Ok(log) => logs.push((path, log)),
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
