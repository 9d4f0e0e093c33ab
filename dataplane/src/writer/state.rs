//! What the target knows about each replica: the last epoch applied, and of which
//! generation. Written only after the replica was made durable, so after any crash it
//! never claims more than the disk holds.

use std::path::{Path, PathBuf};

use filter_driver_shim_contract::GenerationId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::TargetError;
use crate::durable::StateOp;

/// Why a sealed state file (see [`seal`]) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("checksum mismatch (stored {stored}, content hashes to {computed:016x}): the file is damaged")]
    Checksum { stored: String, computed: u64 },
    /// Valid, checksummed JSON, but not the fields of this record.
    #[error("unexpected content")]
    Content(#[source] serde_json::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRecord {
    /// Tracking generation of the source disk (32 hex digits in the file).
    pub generation: GenerationId,
    /// Last epoch acknowledged as durable.
    pub epoch: u64,
    /// Source disk size at that epoch, bytes.
    pub disk_size: u64,
    /// Unix time of the acknowledgement, seconds.
    pub committed_unix_s: u64,
    /// Set when the replica can no longer be shown to hold `epoch` (an undo log that
    /// could not be applied, see [`super::undo`]): why. Until a full or seeded
    /// (checksum-compare) epoch commits, changed-block epochs and recovery points of
    /// this disk are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect: Option<String>,
    /// What the replica looked like when the writer last left it (after this epoch's
    /// commit, or after a rollback to it); a session refuses a replica that no longer
    /// matches (see [`super::stamp`]). `None`: recorded by an older ferry, or the
    /// replica could not be found when the record was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<super::stamp::ReplicaStamp>,
}

impl ReplicaRecord {
    pub fn path(state_dir: &Path, disk: &str) -> PathBuf {
        state_dir.join(format!("{disk}.replica"))
    }

    pub fn load(state_dir: &Path, disk: &str) -> Result<Option<Self>, TargetError> {
        let path = Self::path(state_dir, disk);
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

    pub fn save(&self, state_dir: &Path, disk: &str) -> Result<(), TargetError> {
        let path = Self::path(state_dir, disk);
        let bytes = seal(self);
        crate::durable::write_atomic(&path, &bytes).map_err(|source| TargetError::State {
            path,
            op: StateOp::Write,
            source,
        })
    }
}

/// Key of the checksum [`seal`] adds to a JSON state file.
const CHECKSUM_KEY: &str = "xxh3";

/// Serialises `value` as a JSON object with an xxh3-64 of its other fields under
/// `"xxh3"`, so a damaged or hand-edited file is told apart from a valid one.
pub(crate) fn seal<T: Serialize>(value: &T) -> Vec<u8> {
    let serde_json::Value::Object(mut map) = serde_json::to_value(value).expect("state serialises")
    else {
        unreachable!("state files are JSON objects")
    };
    // The map is ordered by key (serde_json's default map), so the bytes hashed are
    // the same when the file is read back.
    let sum = xxh3_64(&serde_json::to_vec(&map).expect("state serialises"));
    map.insert(CHECKSUM_KEY.into(), format!("{sum:016x}").into());
    serde_json::to_vec_pretty(&map).expect("state serialises")
}

/// Parses a file written by [`seal`], checking its checksum. A file without one
/// (written by an older ferry) is accepted as it is.
pub(crate) fn unseal<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateFileError> {
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes).map_err(StateFileError::Json)?;
    if let Some(stored) = map.remove(CHECKSUM_KEY) {
        let sum = xxh3_64(&serde_json::to_vec(&map).expect("state serialises"));
        if stored.as_str() != Some(format!("{sum:016x}").as_str()) {
            return Err(StateFileError::Checksum {
                stored: stored.to_string(),
                computed: sum,
            });
        }
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(StateFileError::Content)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the writer wrote it while it held the generation as a hex `String`
    /// (these bytes are that code's output): it still loads, and saving it again gives
    /// the same bytes, so switching to `GenerationId` changed no file.
    #[test]
    fn a_record_written_with_a_hex_string_reads_and_writes_the_same_bytes() {
        const OLD: &str = r#"{
  "committed_unix_s": 1,
  "disk_size": 1048576,
  "epoch": 7,
  "generation": "0123456789abcdeffedcba9876543210",
  "xxh3": "e660a76e588bc3ae"
}"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(ReplicaRecord::path(dir.path(), "a"), OLD).unwrap();
        let r = ReplicaRecord::load(dir.path(), "a").unwrap().unwrap();
        let bytes = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ];
        assert_eq!(r.generation, GenerationId::from_bytes(bytes));
        assert_eq!((r.epoch, r.disk_size, r.committed_unix_s), (7, 1 << 20, 1));
        r.save(dir.path(), "b").unwrap();
        let again = std::fs::read_to_string(ReplicaRecord::path(dir.path(), "b")).unwrap();
        assert_eq!(again, OLD);
    }

    #[test]
    fn sealed_records_round_trip_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let r = ReplicaRecord {
            generation: GenerationId::from_bytes([0x5a; 16]),
            epoch: 7,
            disk_size: 1 << 20,
            committed_unix_s: 1,
            suspect: None,
            stamp: None,
        };
        r.save(dir.path(), "a").unwrap();
        assert_eq!(ReplicaRecord::load(dir.path(), "a").unwrap(), Some(r));
        let path = ReplicaRecord::path(dir.path(), "a");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"epoch\": 7", "\"epoch\": 8")).unwrap();
        let err = ReplicaRecord::load(dir.path(), "a").unwrap_err();
        assert!(
            matches!(
                &err,
                TargetError::StateFile {
                    path: p,
                    source: StateFileError::Checksum { .. },
                } if *p == path
            ),
            "{err:?}"
        );
    }
}
