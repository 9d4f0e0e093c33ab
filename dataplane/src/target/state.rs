//! What the target knows about each replica: the last epoch applied, and of which
//! lineage. Written only after the replica was made durable, so after any crash it
//! never claims more than the disk holds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TargetError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRecord {
    /// Tracking lineage of the source disk, 32 hex digits.
    pub generation: String,
    /// Last epoch acknowledged as durable.
    pub epoch: u64,
    /// Source disk size at that epoch, bytes.
    pub disk_size: u64,
    /// Unix time of the acknowledgement, seconds.
    pub committed_unix_s: u64,
}

impl ReplicaRecord {
    pub fn path(state_dir: &Path, disk: &str) -> PathBuf {
        state_dir.join(format!("{disk}.replica"))
    }

    pub fn load(state_dir: &Path, disk: &str) -> Result<Option<Self>, TargetError> {
        let path = Self::path(state_dir, disk);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| TargetError::State {
                    path,
                    problem: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TargetError::State {
                path,
                problem: e.to_string(),
            }),
        }
    }

    pub fn save(&self, state_dir: &Path, disk: &str) -> Result<(), TargetError> {
        let path = Self::path(state_dir, disk);
        let bytes = serde_json::to_vec_pretty(self).expect("record serialises");
        crate::durable::write_atomic(&path, &bytes).map_err(|e| TargetError::State {
            path,
            problem: e.to_string(),
        })
    }
}
