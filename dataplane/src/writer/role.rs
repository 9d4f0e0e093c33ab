//! The role of the target's site in the DR pair, kept durably in
//! `<state_dir>/site.json` (sealed like the replica records).
//!
//! A target site starts as the **replica**: its writer applies the epochs a source
//! sends. A failover **promotes** it: the VMs are to run from its disks, so from the
//! first durable step of the promotion on it is **fenced** — every session is refused
//! with [`Rejection::Fenced`](super::rejection::Rejection::Fenced), whichever source
//! connects (an old primary that comes back after an unplanned failover included), so
//! nothing is ever applied over disks a VM may be writing. A restart reads the record
//! again and never forgets a failover.
//!
//! ```text
//!   replica ──failover unplanned──▶ promoting ──(logs applied)──▶ primary ──commit──▶ primary (committed)
//!    ▲  │                            │ crash: rerun resumes        ▲  │ --point older                 │
//!    │  │                            ▼                             │  ▼ back to promoting             │
//!    │  │                          fenced                          │ fenced                           │
//!    │  └── final epoch of failover planned, committed ────────────┘                                  │
//!    │                                                                                                │
//!    └── become-replica, after a failover to the other site: site.json removed ───────────────────────┘
//! ```
//!
//! A site is the replica while this record is absent and its target holds replica
//! records; `ferry become-replica` (at the old primary, once the other site was failed
//! over to) removes the record and writes those, and `ferry reprotect` from the other
//! site then replicates back into its disks. Each site goes once round the cycle in a
//! failover-and-failback round trip.
//!
//! The record keeps, per disk, the lineage the replica held when promoted (source
//! generation and epoch) and the replica's stamp then: `ferry reprotect` starts from
//! that lineage, and trusts the shim's bits when their generation was born on an image
//! that still matched the stamp.

use std::path::{Path, PathBuf};

use filter_driver_shim_contract::GenerationId;
use serde::{Deserialize, Serialize};

use super::rejection::Rejection;
use super::state::{seal, unseal};
use super::TargetError;
use crate::durable::StateOp;

/// Where the site stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A failover is taking the replicas back to its point; fenced already.
    Promoting,
    /// The replicas were promoted: the VMs run from them here.
    Primary,
}

/// What made the site what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transition {
    /// `ferry failover unplanned`: the primary was lost.
    UnplannedFailover,
    /// `ferry failover planned` at the primary: a final epoch, then promotion.
    PlannedFailover,
}

impl std::fmt::Display for Transition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UnplannedFailover => "an unplanned failover",
            Self::PlannedFailover => "a planned failover",
        })
    }
}

/// One promoted disk: the source lineage its replica held at the point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotedDisk {
    pub name: String,
    /// The source's tracking generation of that epoch (32 hex digits in the file).
    pub generation: GenerationId,
    pub epoch: u64,
    /// The replica's stamp when it was promoted (see [`super::stamp`]): a tracking
    /// generation born on an image that still matched it has seen every write since,
    /// so reverse replication can trust its bits. `None` from an older ferry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<super::stamp::ReplicaStamp>,
}

/// `<state_dir>/site.json`. Absent: the site is a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRecord {
    pub role: Role,
    pub how: Transition,
    /// When the promotion began, Unix seconds.
    pub since_unix_s: u64,
    /// The recovery point the replicas are (being) taken back to.
    pub point: u64,
    /// Filled in once the replicas are at `point` (role `primary`).
    #[serde(default)]
    pub disks: Vec<PromotedDisk>,
    /// `ferry failover commit` ran: the recovery points of the old lineage are gone
    /// and the point can no longer change.
    #[serde(default)]
    pub committed: bool,
}

impl SiteRecord {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("site.json")
    }

    pub fn load(state_dir: &Path) -> Result<Option<SiteRecord>, TargetError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => unseal(&bytes)
                .map(Some)
                .map_err(|source| TargetError::StateFile { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TargetError::State {
                path,
                op: StateOp::Read,
                source,
            }),
        }
    }

    /// Replaces the record atomically (durable when this returns).
    pub fn save(&self, state_dir: &Path) -> Result<(), TargetError> {
        let path = Self::path(state_dir);
        crate::durable::write_atomic(&path, &seal(self)).map_err(|source| TargetError::State {
            path,
            op: StateOp::Write,
            source,
        })
    }
}

/// Refuses every session of a promoted (or promoting) site; `Ok` at a replica site.
pub fn fence(state_dir: &Path) -> Result<(), TargetError> {
    match SiteRecord::load(state_dir)? {
        None => Ok(()),
        Some(site) => Err(Rejection::Fenced {
            how: site.how,
            since_unix_s: site.since_unix_s,
            point: site.point,
            promoting: site.role == Role::Promoting,
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_promoted_site_fences_and_a_replica_site_does_not() {
        let dir = tempfile::tempdir().unwrap();
        fence(dir.path()).unwrap();
        let site = SiteRecord {
            role: Role::Primary,
            how: Transition::UnplannedFailover,
            since_unix_s: 1_796_535_923,
            point: 7,
            disks: vec![PromotedDisk {
                name: "os".into(),
                generation: GenerationId::from_bytes([0xab; 16]),
                epoch: 7,
                stamp: None,
            }],
            committed: false,
        };
        site.save(dir.path()).unwrap();
        assert_eq!(SiteRecord::load(dir.path()).unwrap(), Some(site));
        let e = fence(dir.path()).unwrap_err();
        let text = crate::chain(&e);
        assert!(text.contains("promoted"), "{text}");
        assert!(text.contains("2026-12-06 05:45:23"), "{text}");
        assert!(text.contains("recovery point 7"), "{text}");
        assert!(
            matches!(&e, TargetError::Rejected(r) if r.code() == crate::protocol::ErrorCode::Fenced),
            "{e:?}"
        );
    }
}
