//! `<state_dir>/engine-status.json`: what `ferry source` reports of itself for `ferry
//! status`, the shim's `status` reply and metrics — its last epochs, the epoch in
//! flight and its last error. Rewritten (temp file and rename, not synced: it is
//! advisory, never used to decide anything) after every round and about once a second
//! while an epoch runs. Fields are only ever added, with defaults, so an older reader
//! keeps working.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name in the engine's (and shim's) state directory.
pub const ENGINE_STATUS_FILE: &str = "engine-status.json";

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// The `ferry source` process.
    pub pid: u32,
    pub started_unix_ms: u64,
    /// When this was written; a running engine rewrites it at least every
    /// `epoch_interval_ms` (and every second while an epoch runs).
    pub updated_unix_ms: u64,
    pub epoch_interval_ms: u64,
    /// The epoch in flight, if one is.
    #[serde(default)]
    pub in_flight: Option<InFlight>,
    /// The newest epochs acknowledged by the target, newest first (at most
    /// [`RECENT_EPOCHS`]).
    #[serde(default)]
    pub recent: Vec<EpochSummary>,
    /// The last failed round, if any since the engine started.
    #[serde(default)]
    pub last_error: Option<LastError>,
    /// Rounds failed since the last success.
    #[serde(default)]
    pub failures_since_success: u32,
    /// Set when the engine stopped: why (the operator must act, or it was told to stop).
    #[serde(default)]
    pub stopped: Option<String>,
}

/// How many acknowledged epochs [`EngineStatus::recent`] keeps.
pub const RECENT_EPOCHS: usize = 10;

/// An epoch in flight.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub epoch: u64,
    /// `connecting`, `comparing`, `sending` or `committing`.
    pub phase: String,
    pub started_unix_ms: u64,
    /// Bytes of disk the phase covers, and has covered.
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub rate_bytes_per_s: f64,
    pub eta_s: Option<f64>,
}

/// One acknowledged epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    pub epoch: u64,
    /// When the round began (its point in time is at most this much older than its
    /// freeze, which follows at once), Unix milliseconds.
    pub started_unix_ms: u64,
    pub acknowledged_unix_ms: u64,
    pub seconds: f64,
    pub bytes_read: u64,
    /// On the wire.
    pub bytes_sent: u64,
    /// Uncompressed bytes of the blocks that travelled.
    pub bytes_payload: u64,
    pub blocks_sent: u64,
    pub freeze_pause_us: Option<u64>,
    /// `disk=mode` for each disk.
    pub modes: Vec<String>,
    /// Seconds the bandwidth limit (`max_rate`) held this epoch back.
    #[serde(default)]
    pub throttled_s: f64,
}

/// A failed round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LastError {
    pub unix_ms: u64,
    pub message: String,
    /// Retrying cannot help: the operator must act.
    pub needs_operator: bool,
}

impl EngineStatus {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(ENGINE_STATUS_FILE)
    }

    /// The file in `state_dir`, if there is a readable one.
    pub fn load(state_dir: &Path) -> Option<EngineStatus> {
        let bytes = std::fs::read(Self::path(state_dir)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Replaces the file (temp file and rename; not synced, see the module docs).
    pub fn store(&self, state_dir: &Path) -> std::io::Result<()> {
        let path = Self::path(state_dir);
        let tmp = state_dir.join(format!(".{ENGINE_STATUS_FILE}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &path)
    }

    /// The newest acknowledged epoch.
    pub fn last_success(&self) -> Option<&EpochSummary> {
        self.recent.first()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_loads_and_reads_an_older_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(EngineStatus::load(dir.path()).is_none());
        let s = EngineStatus {
            pid: 7,
            recent: vec![EpochSummary {
                epoch: 3,
                modes: vec!["os=changed".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        s.store(dir.path()).unwrap();
        assert_eq!(EngineStatus::load(dir.path()), Some(s));
        std::fs::write(
            EngineStatus::path(dir.path()),
            r#"{"pid":1,"started_unix_ms":2,"updated_unix_ms":3,"epoch_interval_ms":4}"#,
        )
        .unwrap();
        assert_eq!(EngineStatus::load(dir.path()).unwrap().pid, 1);
    }
}
