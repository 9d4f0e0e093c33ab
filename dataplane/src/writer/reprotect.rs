//! Reverse replication after a failover, at the target's end: the change sets a
//! replica keeps so that `ferry reprotect` sends only the blocks that can differ.
//!
//! Two files per disk in the target's state directory, both in the bitmap format of
//! the filter shim's contract (sealed, checksummed), both naming the lineage (source
//! generation) they belong to:
//!
//! * `<disk>.undone` — at a **promoted** site: the blocks an unplanned failover rolled
//!   back (the union of every undo log it applied, whatever source generation each
//!   log was of: a rollback across a resync of the source still undid them). The old
//!   primary holds those blocks at newer epochs, so reverse replication must send
//!   them. Written, durably, before each log is removed; applying a log again unions
//!   the same blocks. A set left by an earlier promotion only adds blocks: it is
//!   removed once a reverse replication delivered it.
//! * `<disk>.owed` — at a site that **became the replica** (`ferry become-replica`):
//!   the blocks its own shim tracked and never had acknowledged (written after the last
//!   epoch the other side holds). The target reports them to the reprotecting source
//!   (as DiffRuns), which sends its bytes for them.
//!
//! A `<disk>.replica` record with no `.owed` set (or one of another lineage) means the
//! target does not know what was written to the replica: it asks the source to compare
//! every block ([`REPLICA_COMPARE`](crate::protocol::REPLICA_COMPARE)).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use filter_driver_shim_contract::bitmap::{BitmapError, ChangedBlockBitmap};
use filter_driver_shim_contract::GenerationId;

use super::state::ReplicaRecord;
use super::undo::LogContents;
use super::{TargetError, TargetJob};
use crate::durable::StateOp;

/// Granularity of the `.undone` sets: the replication block size by default. A
/// reprotecting source with another block size widens each run to its own blocks.
const UNDONE_BLOCK: u32 = 64 << 10;

/// Why a change-set file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("state {}: change set", path.display())]
pub struct ChangeSetError {
    pub path: PathBuf,
    #[source]
    pub source: BitmapError,
}

/// `<state_dir>/<disk>.undone`.
pub fn undone_path(state_dir: &Path, disk: &str) -> PathBuf {
    state_dir.join(format!("{disk}.undone"))
}

/// `<state_dir>/<disk>.owed`.
pub fn owed_path(state_dir: &Path, disk: &str) -> PathBuf {
    state_dir.join(format!("{disk}.owed"))
}

/// The change set at `path` if it exists and, when `lineage` is given, belongs to it;
/// `Ok(None)` when there is none (or only one of another lineage, which says nothing
/// about this one).
pub fn load_change_set(
    path: &Path,
    lineage: Option<GenerationId>,
) -> Result<Option<ChangedBlockBitmap>, ChangeSetError> {
    if !path.exists() {
        return Ok(None);
    }
    let set = ChangedBlockBitmap::load(path).map_err(|source| ChangeSetError {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(lineage
        .is_none_or(|g| set.generation_id() == g)
        .then_some(set))
}

/// `set` widened to a set of `disk_size` bytes (every block it marks, clipped).
fn resized(
    set: ChangedBlockBitmap,
    disk_size: u64,
    epoch: u64,
) -> Result<ChangedBlockBitmap, BitmapError> {
    if set.disk_size() == disk_size {
        return Ok(set);
    }
    let mut wider = ChangedBlockBitmap::new(disk_size, UNDONE_BLOCK, set.generation_id(), epoch)?;
    let bs = u64::from(set.block_size());
    for (first, count) in set.iter_runs() {
        let start = first * bs;
        if start < disk_size {
            wider.set_range(start, (count * bs).min(disk_size - start))?;
        }
    }
    Ok(wider)
}

fn save(set: &ChangedBlockBitmap, path: &Path) -> Result<(), TargetError> {
    set.save(path).map_err(|source| {
        TargetError::ChangeSet(ChangeSetError {
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Adds the blocks undo log `log` restores to each of its disks' `.undone` sets,
/// durably: called before the log is applied and removed.
pub(crate) fn record_undone(state_dir: &Path, log: &LogContents) -> Result<(), TargetError> {
    for (i, d) in log.disks.iter().enumerate() {
        let path = undone_path(state_dir, &d.name);
        let existing = load_change_set(&path, None).map_err(TargetError::ChangeSet)?;
        let set = match existing {
            Some(s) => resized(s, d.disk_size, log.epoch),
            None => ChangedBlockBitmap::new(d.disk_size, UNDONE_BLOCK, d.generation, log.epoch),
        };
        let mut set = set.map_err(|source| {
            TargetError::ChangeSet(ChangeSetError {
                path: path.clone(),
                source,
            })
        })?;
        for (offset, len) in log.ranges(i) {
            set.set_range(offset, len.min(d.disk_size.saturating_sub(offset)))
                .map_err(|source| {
                    TargetError::ChangeSet(ChangeSetError {
                        path: path.clone(),
                        source,
                    })
                })?;
        }
        if ferry_io::failpoint::hit("failover.undone.fail") {
            // The state directory filled up: the set is not saved, the log not applied.
            return Err(TargetError::State {
                path,
                op: StateOp::Write,
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        save(&set, &path)?;
    }
    Ok(())
}

/// Removes `path` if it exists, durably.
pub(crate) fn remove_set(state_dir: &Path, path: &Path) -> Result<(), TargetError> {
    match std::fs::remove_file(path) {
        Ok(()) => crate::durable::sync_dir(state_dir).map_err(|source| TargetError::State {
            path: state_dir.to_path_buf(),
            op: StateOp::FsyncDir,
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TargetError::State {
            path: path.to_path_buf(),
            op: StateOp::Remove,
            source,
        }),
    }
}

/// One disk a demoted primary hands to its target as a replica.
#[derive(Debug)]
pub struct HandedOver {
    pub name: String,
    /// The lineage its last acknowledged epoch belongs to, and that epoch.
    pub generation: GenerationId,
    pub epoch: u64,
    pub disk_size: u64,
    /// Blocks written since that epoch (its shim's bits, frozen ones included); `None`
    /// when they cannot be trusted: the replica is then compared block by block.
    pub owed: Result<ChangedBlockBitmap, String>,
}

/// Makes this site's disks the replicas of the other site's (`ferry become-replica`):
/// for each disk, its change set (or the reason there is none) and then its replica
/// record, durably, with the disk's stamp now. The caller made sure nothing else writes
/// the disks (no shim, no engine) and holds the apply lock.
pub fn hand_over(job: &TargetJob, disks: &[HandedOver]) -> Result<(), TargetError> {
    let replicas = job.replicas();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for d in disks {
        let path = owed_path(&job.state_dir, &d.name);
        let suspect = match &d.owed {
            Ok(_) if ferry_io::failpoint::hit("become-replica.owed.fail") => {
                return Err(TargetError::State {
                    path,
                    op: StateOp::Write,
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                });
            }
            Ok(set) => {
                save(set, &path)?;
                None
            }
            Err(why) => {
                remove_set(&job.state_dir, &path)?;
                Some(format!(
                    "its writes since epoch {} are not known ({why}); reverse replication compares every block",
                    d.epoch
                ))
            }
        };
        ReplicaRecord {
            generation: d.generation,
            epoch: d.epoch,
            disk_size: d.disk_size,
            committed_unix_s: now,
            suspect,
            stamp: super::undo::stamp_of(&replicas, &d.name)?,
        }
        .save(&job.state_dir, &d.name)?;
    }
    // Any write after this instant gets a later time than the stamps just taken.
    super::stamp::wait_for_clock_tick();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_load_with_or_without_a_lineage_and_widen_to_a_new_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.undone");
        let g = GenerationId::from_bytes([1; 16]);
        assert!(load_change_set(&path, None).unwrap().is_none());
        let mut set = ChangedBlockBitmap::new(1 << 20, 4096, g, 3).unwrap();
        set.set_range(8192, 4096).unwrap();
        set.save(&path).unwrap();
        assert!(
            load_change_set(&path, Some(GenerationId::from_bytes([2; 16])))
                .unwrap()
                .is_none()
        );
        let any = load_change_set(&path, None).unwrap().unwrap();
        assert_eq!(any.count(), 1);
        let wider = resized(any, 2 << 20, 4).unwrap();
        assert_eq!(wider.disk_size(), 2 << 20);
        assert!(
            wider.test(0).unwrap(),
            "block 8192..12288 of 4 KiB lies in the first 64 KiB block"
        );
        assert_eq!(wider.count(), 1);
    }
}
