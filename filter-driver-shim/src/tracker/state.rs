//! The sidecar state file next to a bitmap: which image the bitmap describes.
//!
//! The bitmap says which blocks changed; this file says *of what*. It records the
//! generation id and the backing store's identity (size, device, inode, mtime) and
//! whether the shim shut down cleanly. At start the shim compares it with the image
//! as it finds it: a mismatch means someone changed the image while no shim was
//! watching, so the bits cannot be trusted and a checksum-compare resync is needed.
//!
//! Format: a few `key value` lines of ASCII, the last one an xxh3-64 checksum of
//! everything before it. Written atomically (temp file, fsync, rename, fsync dir).

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use crate::backing::Identity;
use crate::bitmap::GenerationId;

use super::ResyncReason;

const HEADER: &str = "ferry-shim-state 1";

/// How the shim last left the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Stopped cleanly: every write synced, identity recorded after the last one.
    Clean,
    /// Running, or killed: the recorded mtime predates the shim's own writes.
    Running,
}

/// One state file's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRecord {
    pub generation_id: GenerationId,
    pub block_size: u32,
    pub identity: Identity,
    pub shutdown: Shutdown,
    /// A checksum-compare resync is owed to the consumer and has not been done.
    pub resync: Option<ResyncReason>,
    /// The image's identity when this generation was drawn (an optional last line,
    /// `born <size> <dev> <ino> <mtime_ns>`; absent in files of an older shim). Reverse
    /// replication compares it with the replica's stamp at promotion: equal, the
    /// generation's bits cover every write since then (see `ferry reprotect`).
    pub born: Option<Identity>,
}

impl StateRecord {
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let id = &self.identity;
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{HEADER}");
        let _ = writeln!(s, "generation {}", self.generation_id);
        let _ = writeln!(s, "block_size {}", self.block_size);
        let _ = writeln!(s, "size_bytes {}", id.size_bytes);
        let _ = writeln!(s, "dev {}", id.dev);
        let _ = writeln!(s, "ino {}", id.ino);
        let _ = writeln!(s, "rdev {}", id.rdev);
        let _ = writeln!(s, "mtime_ns {}", id.mtime_ns);
        let shutdown = match self.shutdown {
            Shutdown::Clean => "clean",
            Shutdown::Running => "running",
        };
        let _ = writeln!(s, "shutdown {shutdown}");
        let resync = self.resync.map_or("none", ResyncReason::as_str);
        let _ = writeln!(s, "resync {resync}");
        if let Some(b) = &self.born {
            let _ = writeln!(
                s,
                "born {} {} {} {}",
                b.size_bytes, b.dev, b.ino, b.mtime_ns
            );
        }
        let checksum = xxh3_64(s.as_bytes());
        let _ = writeln!(s, "checksum {checksum:016x}");
        s
    }

    /// Parses a state file; any deviation is an error naming what is wrong.
    pub fn decode(text: &str) -> Result<StateRecord, StateFileError> {
        use StateFileError as E;
        let body = checked_body(text)?;
        let mut lines = body.lines();
        if lines.next() != Some(HEADER) {
            return Err(E::Header);
        }
        let mut field = |key: &'static str| -> Result<&str, StateFileError> {
            let line = lines.next().ok_or(E::Missing { key })?;
            line.strip_prefix(key)
                .and_then(|v| v.strip_prefix(' '))
                .ok_or_else(|| E::Unexpected {
                    key,
                    found: line.to_string(),
                })
        };
        fn num<T: std::str::FromStr>(key: &'static str, v: &str) -> Result<T, StateFileError> {
            v.parse().map_err(|_| E::NotANumber {
                key,
                value: v.to_string(),
            })
        }
        let generation_id = parse_generation(field("generation")?)?;
        let block_size = num("block_size", field("block_size")?)?;
        let identity = Identity {
            size_bytes: num("size_bytes", field("size_bytes")?)?,
            dev: num("dev", field("dev")?)?,
            ino: num("ino", field("ino")?)?,
            rdev: num("rdev", field("rdev")?)?,
            mtime_ns: num("mtime_ns", field("mtime_ns")?)?,
        };
        let shutdown = match field("shutdown")? {
            "clean" => Shutdown::Clean,
            "running" => Shutdown::Running,
            other => return Err(E::Shutdown(other.to_string())),
        };
        let resync = match field("resync")? {
            "none" => None,
            other => {
                Some(ResyncReason::from_token(other).ok_or_else(|| E::Resync(other.to_string()))?)
            }
        };
        let born = match lines.next() {
            None => None,
            Some(line) => Some(parse_born(line)?),
        };
        if lines.next().is_some() {
            return Err(E::TrailingLines);
        }
        Ok(StateRecord {
            generation_id,
            block_size,
            identity,
            shutdown,
            resync,
            born,
        })
    }
}

/// The optional `born <size> <dev> <ino> <mtime_ns>` line.
fn parse_born(line: &str) -> Result<Identity, StateFileError> {
    let unexpected = || StateFileError::Unexpected {
        key: "born",
        found: line.to_string(),
    };
    let mut parts = line
        .strip_prefix("born ")
        .ok_or_else(unexpected)?
        .split(' ');
    let mut next = || parts.next().ok_or_else(unexpected);
    let (size, dev, ino, mtime) = (next()?, next()?, next()?, next()?);
    let number = |v: &str| v.parse::<u64>().map_err(|_| unexpected());
    let born = Identity {
        size_bytes: number(size)?,
        dev: number(dev)?,
        ino: number(ino)?,
        rdev: 0,
        mtime_ns: mtime.parse().map_err(|_| unexpected())?,
    };
    if parts.next().is_some() {
        return Err(unexpected());
    }
    Ok(born)
}

/// Why a state file cannot be used; the shim then starts a new generation owing a
/// resync (`state-unreadable`) and logs this.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read it")]
    Read(#[source] io::Error),
    #[error("{0} bytes is too long for a state file")]
    TooLong(usize),
    #[error("not UTF-8")]
    NotUtf8,
    #[error("no checksum line")]
    NoChecksum,
    #[error("malformed checksum line")]
    MalformedChecksum,
    #[error("checksum mismatch: stored {stored:016x}, computed {computed:016x}")]
    ChecksumMismatch { stored: u64, computed: u64 },
    #[error("first line is not `{HEADER}`")]
    Header,
    #[error("missing `{key}`")]
    Missing { key: &'static str },
    #[error("expected `{key}`, found `{found}`")]
    Unexpected { key: &'static str, found: String },
    #[error("`{key}` is not a number: `{value}`")]
    NotANumber { key: &'static str, value: String },
    #[error("generation `{0}` is not 32 hex digits")]
    Generation(String),
    #[error("generation is all zeros")]
    NilGeneration,
    #[error("unknown shutdown state `{0}`")]
    Shutdown(String),
    #[error("unknown resync reason `{0}`")]
    Resync(String),
    #[error("unexpected trailing lines")]
    TrailingLines,
}

/// The text before the checksum line, if the checksum matches it.
fn checked_body(text: &str) -> Result<&str, StateFileError> {
    let body_end = text.rfind("checksum ").ok_or(StateFileError::NoChecksum)?;
    let (body, tail) = text.split_at(body_end);
    let stored = tail
        .strip_prefix("checksum ")
        .and_then(|t| t.strip_suffix('\n'))
        .and_then(|t| u64::from_str_radix(t, 16).ok())
        .ok_or(StateFileError::MalformedChecksum)?;
    let computed = xxh3_64(body.as_bytes());
    if stored != computed {
        return Err(StateFileError::ChecksumMismatch { stored, computed });
    }
    Ok(body)
}

fn parse_generation(hex: &str) -> Result<GenerationId, StateFileError> {
    let id: GenerationId = hex
        .parse()
        .map_err(|_| StateFileError::Generation(hex.to_string()))?;
    if id.is_nil() {
        return Err(StateFileError::NilGeneration);
    }
    Ok(id)
}

/// Reads the state file: `Ok(None)` if absent.
pub fn read(path: &Path) -> Result<Option<StateRecord>, StateFileError> {
    match fs::read(path) {
        Ok(bytes) if bytes.len() > 4096 => Err(StateFileError::TooLong(bytes.len())),
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|_| StateFileError::NotUtf8)?;
            StateRecord::decode(&text).map(Some)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateFileError::Read(e)),
    }
}

/// Replaces the state file atomically: after a crash it holds the old or the new
/// record, whole ([`ferry_io::durable::write_atomic`]).
pub fn write(path: &Path, record: &StateRecord) -> io::Result<()> {
    ferry_io::durable::write_atomic(path, record.encode().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> StateRecord {
        StateRecord {
            generation_id: GenerationId::from_bytes(*b"0123456789abcdef"),
            block_size: 65536,
            identity: Identity {
                size_bytes: 1 << 30,
                dev: 2049,
                ino: 1234,
                rdev: 0,
                mtime_ns: 1_700_000_000_123_456_789,
            },
            shutdown: Shutdown::Running,
            resync: Some(ResyncReason::ImageModified),
            born: None,
        }
    }

    #[test]
    fn the_birth_line_is_optional_and_round_trips() {
        let mut r = record();
        assert!(!r.encode().contains("born"));
        r.born = Some(Identity {
            size_bytes: 1 << 30,
            dev: 2049,
            ino: 99,
            rdev: 0,
            mtime_ns: 1_700_000_000_000_000_001,
        });
        let text = r.encode();
        assert!(
            text.contains("born 1073741824 2049 99 1700000000000000001\n"),
            "{text}"
        );
        assert_eq!(StateRecord::decode(&text).unwrap(), r);
    }

    #[test]
    fn roundtrip_and_corruption() {
        let r = record();
        let text = r.encode();
        assert_eq!(StateRecord::decode(&text).unwrap(), r);
        for i in 0..text.len() {
            let mut bad = text.clone().into_bytes();
            bad[i] ^= 0x01;
            if let Ok(bad) = String::from_utf8(bad) {
                assert!(StateRecord::decode(&bad).is_err(), "flip at {i} accepted");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        assert_eq!(read(&p).unwrap(), None);
        write(&p, &r).unwrap();
        assert_eq!(read(&p).unwrap(), Some(r));
    }
}
