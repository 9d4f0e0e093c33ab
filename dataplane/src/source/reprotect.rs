//! `ferry reprotect`, at the new primary after a failover: replicate back to the old
//! primary, sending only the blocks that can differ.
//!
//! The old primary ran `ferry become-replica` first: its target records, per disk, the
//! lineage (source generation and last acknowledged epoch) the disk holds, and the
//! blocks its shim tracked and never had acknowledged (see
//! [`crate::writer::reprotect`]). This site was promoted from the same lineage, at a
//! recovery point its `site.json` names. Both disks are that point plus known changes:
//!
//! * here, the writes since the promotion — the running shim's bits, provided its
//!   tracking generation was born on the promoted replica untouched (its birth stamp
//!   matches the replica's stamp at promotion); otherwise every block is compared;
//! * here, the blocks an unplanned failover rolled back to reach the point
//!   (`<disk>.undone`): the old primary holds them at newer epochs;
//! * there, the writes since its last acknowledged epoch (its shim's bits, handed to
//!   its target), which the target reports back before any data travels; if those were
//!   lost, the target asks for a compare of every block.
//!
//! One live epoch of mode [`SyncMode::Reprotect`] sends the union. The target's reply
//! must name the lineage this site was promoted from — anything else is unrelated data,
//! and the session stops before a block is sent. Once the epoch commits, the replica
//! holds this site's tracking generation, and `ferry source` goes on with changed-block
//! epochs. No bit is dropped before the other side holds its block durably: the shim
//! forgets its bits only after the acknowledgement, and the change sets on both sides
//! are removed only after it.
//!
//! [`SyncMode::Reprotect`]: crate::protocol::SyncMode::Reprotect

use std::path::{Path, PathBuf};

use filter_driver_shim_contract::bitmap::ChangedBlockBitmap;
use filter_driver_shim_contract::control::ImageAtBirth;
use filter_driver_shim_contract::GenerationId;

use super::{SourceError, SyncJob, SyncReport};
use crate::writer::reprotect::{load_change_set, undone_path};
use crate::writer::role::{Role, SiteRecord};
use crate::writer::stamp::{ReplicaStamp, StampKind};
use crate::writer::TargetError;

/// Why `ferry reprotect` refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ReprotectError {
    #[error("this site was not promoted by a failover ({} has no site record): there is nothing to reprotect from here", state_dir.display())]
    NotPromoted { state_dir: PathBuf },
    #[error("the failover to recovery point {point} is not finished; rerun `ferry failover unplanned` first")]
    StillPromoting { point: u64 },
    #[error("the failover to recovery point {point} is not committed: reverse replication makes it final (the old lineage's recovery points end); run `ferry failover commit` first")]
    NotCommitted { point: u64 },
    #[error("disk {disk} was not promoted with this site (site.json names {}); every disk of the config must come from the failover", promoted.join(", "))]
    NotPromotedDisk { disk: String, promoted: Vec<String> },
    #[error("disk {disk}: the old primary's replica holds generation {replica}, but this site was promoted from generation {promoted}: unrelated data, nothing was sent; check that [source] target names the old primary of these disks, or resync it with `ferry sync --mode seeded`")]
    UnrelatedLineage {
        disk: String,
        promoted: GenerationId,
        replica: GenerationId,
    },
}

/// One disk to reprotect: what this site was promoted from.
#[derive(Debug, Clone)]
pub struct ReprotectDisk {
    pub name: String,
    /// The source generation (lineage) the promoted replica held.
    pub lineage: GenerationId,
    /// The recovery point it was promoted at.
    pub point: u64,
    /// The replica's stamp at promotion.
    pub stamp: Option<ReplicaStamp>,
    /// Blocks an unplanned failover rolled back to reach the point.
    pub undone: Option<ChangedBlockBitmap>,
}

impl ReprotectDisk {
    /// Whether a shim generation born on `born` has tracked every write since the
    /// promotion: the image then still matched the stamp taken at promotion (a file;
    /// a block device's stamp cannot tell).
    pub fn tracked_since_promotion(&self, born: Option<&ImageAtBirth>) -> bool {
        match (&self.stamp, born) {
            (Some(s), Some(b)) => {
                s.kind == StampKind::File
                    && s.size == b.size_bytes
                    && s.ino == b.ino
                    && s.mtime_ns == b.mtime_ns
            }
            _ => false,
        }
    }
}

/// The disks of `job` as this promoted site (target state in `target_state_dir`)
/// records them; refuses unless the failover is complete and committed.
pub fn plan(job: &SyncJob, target_state_dir: &Path) -> Result<Vec<ReprotectDisk>, SourceError> {
    let site = SiteRecord::load(target_state_dir)
        .map_err(|e| SourceError::Target(Box::new(e)))?
        .ok_or_else(|| ReprotectError::NotPromoted {
            state_dir: target_state_dir.to_path_buf(),
        })?;
    if site.role == Role::Promoting {
        return Err(ReprotectError::StillPromoting { point: site.point }.into());
    }
    if !site.committed {
        return Err(ReprotectError::NotCommitted { point: site.point }.into());
    }
    let mut disks = Vec::with_capacity(job.disks.len());
    for spec in &job.disks {
        let promoted = site
            .disks
            .iter()
            .find(|d| d.name == spec.name)
            .ok_or_else(|| ReprotectError::NotPromotedDisk {
                disk: spec.name.clone(),
                promoted: site.disks.iter().map(|d| d.name.clone()).collect(),
            })?;
        // Whatever generation each undone log was of (see the writer's reprotect).
        let undone = load_change_set(&undone_path(target_state_dir, &spec.name), None)
            .map_err(|e| SourceError::Target(Box::new(TargetError::ChangeSet(e))))?;
        disks.push(ReprotectDisk {
            name: spec.name.clone(),
            lineage: promoted.generation,
            point: promoted.epoch,
            stamp: promoted.stamp,
            undone,
        });
    }
    Ok(disks)
}

/// Runs the reverse replication epoch of `job` (whose `reprotect` is set) and, once
/// it is acknowledged, removes the rollback sets it delivered.
pub fn run(job: &SyncJob, target_state_dir: &Path) -> Result<SyncReport, SourceError> {
    let report = super::sync(job)?;
    if ferry_io::failpoint::hit("reprotect.undone.crash") {
        // A crash with the reverse epoch acknowledged and recorded, the rollback sets
        // still there.
        std::process::abort();
    }
    for d in &job.disks {
        crate::writer::reprotect::remove_set(
            target_state_dir,
            &undone_path(target_state_dir, &d.name),
        )
        .map_err(|e| SourceError::Target(Box::new(e)))?;
    }
    Ok(report)
}
