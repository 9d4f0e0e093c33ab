//! The control protocol: the requests the engine (or an operator with `socat`) sends
//! on the shim's control socket and the replies the shim sends back.
//!
//! A request is one line of ASCII ([`Request`]'s `Display` writes it, its `FromStr`
//! reads it); a reply is one line of JSON with `"ok"`. The table of requests and
//! replies is in the shim's `control` module and in `docs/shim.md`; the reply types
//! here are that table in code, so a field renamed on one side fails to compile (or
//! fails `tests::reply_field_names`) instead of failing an end-to-end test.
//!
//! # Versioning
//!
//! The shim and the engine usually come from one `ferry` binary, but a shim keeps
//! running across an engine upgrade (and the other way round), so:
//!
//! * Replies may **gain** fields: no reply type denies unknown fields, so an older
//!   engine reads a newer shim's reply. A field the engine needs and an older shim may
//!   lack is an `Option` (serde reads a missing `Option` as `None`; it is marked
//!   `#[serde(default)]` to say so, as [`FreezeReply::idle_timeout_ms`]). Any other
//!   missing field makes the reply unreadable, naming the field.
//! * Fields are never renamed or removed and their types never change; that would be
//!   a new field.
//! * New *values* of a text field are compatible where the engine treats it as text
//!   ([`StatusDisk::resync_reason`]: an older engine reports a newer reason as given).
//! * Requests may gain commands and optional `key=value` arguments; an older shim
//!   refuses what it does not know with an error reply, never by guessing.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::generation::GenerationId;

/// Longest request line the shim accepts, newline included, however it arrives. The
/// longest request the engine sends, a `freeze` naming each of a session's 256 disks
/// (64-byte names) in `disks=` and `whole=`, is about 33 KB (the engine checks that at
/// compile time); the bound keeps a client from growing a connection's buffer at will.
pub const MAX_LINE_BYTES: u64 = 64 << 10;

/// The shim's id of a frozen epoch: 16 hex digits on the line and in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EpochId(u64);

impl EpochId {
    pub const fn new(id: u64) -> EpochId {
        EpochId(id)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for EpochId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for EpochId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EpochId({self})")
    }
}

/// Text that is not an epoch id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not an epoch id (16 hex digits)")]
pub struct NotAnEpoch {
    pub text: String,
}

impl FromStr for EpochId {
    type Err = NotAnEpoch;

    /// Hex digits, as [`Display`](fmt::Display) writes them (fewer than 16 are accepted,
    /// as the shim always has).
    fn from_str(s: &str) -> Result<EpochId, NotAnEpoch> {
        u64::from_str_radix(s, 16)
            .map(EpochId)
            .map_err(|_| NotAnEpoch {
                text: s.to_string(),
            })
    }
}

impl Serialize for EpochId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EpochId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<EpochId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `status`: the epoch frozen now, the freeze pauses so far and every disk.
    Status,
    /// `freeze [disks=NAME,…] [whole=NAME,…] [granules=on]`.
    Freeze {
        /// The disks to freeze; `None` (no `disks=`) means every disk the shim serves.
        disks: Option<Vec<String>>,
        /// Those of them whose every block must be preserved (their sync reads the
        /// whole disk).
        whole: Vec<String>,
        /// `granules=on`: the engine reads only the written granules of each frozen
        /// block (crate::granules), so the shim preserves only those. Sent only to
        /// a shim whose status says [`StatusReply::granules`]; without it the engine
        /// reads frozen blocks whole and the shim preserves them whole.
        granules: bool,
    },
    /// `check <epoch>`: the epoch is still frozen and intact on every disk.
    Check(EpochId),
    /// `commit <epoch>`: the target holds the epoch; the shim clears its bits.
    Commit(EpochId),
    /// `abort <epoch>`: the epoch's bits join the active bits again.
    Abort(EpochId),
    /// `resync-done <disk> <generation>`: the engine holds a replica of the disk at
    /// that generation.
    ResyncDone {
        disk: String,
        generation: GenerationId,
    },
    /// `demote`: the site is being failed over (planned): every disk's writes are
    /// refused from now on (`EPERM`), for good in this shim process; writes already
    /// in flight complete. The next freeze is then a cut after which no write is ever
    /// acknowledged.
    Demote,
}

/// Why a line is not a [`Request`]. The messages are the shim's error replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty request")]
    Empty,
    #[error("unknown command `{0}`")]
    UnknownCommand(String),
    #[error("unknown freeze argument `{0}`")]
    UnknownFreezeArgument(String),
    #[error("missing epoch id")]
    MissingEpoch,
    #[error("{0}")]
    NotAnEpoch(#[from] NotAnEpoch),
    #[error("usage: resync-done <disk> <generation>")]
    ResyncDoneUsage,
    #[error("`{0}` is not a generation id (32 hex digits)")]
    NotAGeneration(String),
}

impl FromStr for Request {
    type Err = RequestError;

    /// Parses one line (a trailing newline is ignored, as are words after the last
    /// argument a command takes).
    fn from_str(line: &str) -> Result<Request, RequestError> {
        let mut words = line.split_ascii_whitespace();
        let epoch = |word: Option<&str>| -> Result<EpochId, RequestError> {
            Ok(word.ok_or(RequestError::MissingEpoch)?.parse()?)
        };
        match words.next().unwrap_or("") {
            "status" => Ok(Request::Status),
            "freeze" => parse_freeze(words),
            "check" => Ok(Request::Check(epoch(words.next())?)),
            "commit" => Ok(Request::Commit(epoch(words.next())?)),
            "abort" => Ok(Request::Abort(epoch(words.next())?)),
            "resync-done" => parse_resync_done(words.next(), words.next()),
            "demote" => Ok(Request::Demote),
            "" => Err(RequestError::Empty),
            other => Err(RequestError::UnknownCommand(other.to_string())),
        }
    }
}

/// `freeze`'s arguments: each `disks=` and `whole=` adds to its list.
fn parse_freeze(words: std::str::SplitAsciiWhitespace<'_>) -> Result<Request, RequestError> {
    let list = |l: &str| {
        l.split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let mut disks: Option<Vec<String>> = None;
    let mut whole = Vec::new();
    let mut granules = false;
    for w in words {
        if w == "granules=on" {
            granules = true;
        } else if let Some(l) = w.strip_prefix("whole=") {
            whole.extend(list(l));
        } else if let Some(l) = w.strip_prefix("disks=") {
            disks.get_or_insert_with(Vec::new).extend(list(l));
        } else {
            return Err(RequestError::UnknownFreezeArgument(w.to_string()));
        }
    }
    Ok(Request::Freeze {
        disks,
        whole,
        granules,
    })
}

fn parse_resync_done(disk: Option<&str>, gen: Option<&str>) -> Result<Request, RequestError> {
    let (Some(disk), Some(gen)) = (disk, gen) else {
        return Err(RequestError::ResyncDoneUsage);
    };
    let generation = gen
        .parse()
        .map_err(|_| RequestError::NotAGeneration(gen.to_string()))?;
    Ok(Request::ResyncDone {
        disk: disk.to_string(),
        generation,
    })
}

impl fmt::Display for Request {
    /// The request line, without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Status => f.write_str("status"),
            Request::Freeze {
                disks,
                whole,
                granules,
            } => {
                f.write_str("freeze")?;
                if let Some(disks) = disks {
                    write!(f, " disks={}", disks.join(","))?;
                }
                if !whole.is_empty() {
                    write!(f, " whole={}", whole.join(","))?;
                }
                if *granules {
                    f.write_str(" granules=on")?;
                }
                Ok(())
            }
            Request::Check(id) => write!(f, "check {id}"),
            Request::Commit(id) => write!(f, "commit {id}"),
            Request::Abort(id) => write!(f, "abort {id}"),
            Request::ResyncDone { disk, generation } => {
                write!(f, "resync-done {disk} {generation}")
            }
            Request::Demote => f.write_str("demote"),
        }
    }
}

/// A JSON boolean that can only be `B`: the `"ok"` of a reply, so that a success
/// reply type cannot carry `"ok": false` and a refusal cannot carry `true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flag<const B: bool>;

/// `"ok": true`.
pub type True = Flag<true>;
/// `"ok": false`.
pub type False = Flag<false>;

impl<const B: bool> Serialize for Flag<B> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(B)
    }
}

impl<'de, const B: bool> Deserialize<'de> for Flag<B> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Flag<B>, D::Error> {
        if bool::deserialize(d)? == B {
            Ok(Flag)
        } else {
            Err(serde::de::Error::custom(format_args!("expected {B}")))
        }
    }
}

/// What every reply says first: whether the request was done, and if not why. The
/// engine reads this before the reply's own type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `{"ok":false,"error":"…"}`: a request refused, or the shim's last words before it
/// closes a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub ok: False,
    pub error: String,
}

impl Refusal {
    pub fn new(error: impl fmt::Display) -> Refusal {
        Refusal {
            ok: Flag,
            error: error.to_string(),
        }
    }
}

/// `{"ok":true}`: the reply to `check`, `commit`, `abort` and `resync-done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Done {
    pub ok: True,
}

/// The reply to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub ok: True,
    /// The epoch frozen now, if one is (JSON `null` otherwise).
    pub epoch: Option<EpochStatus>,
    pub pauses: Pauses,
    pub disks: Vec<StatusDisk>,
    /// What the engine replicating these disks last reported (its
    /// `engine-status.json` in the shim's state directory), if it ever ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::engine_status::EngineStatus>,
    /// The shim keeps granule masks and honours `freeze … granules=on` (false from a
    /// shim that tracks whole blocks only).
    #[serde(default)]
    pub granules: bool,
}

/// The frozen epoch as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStatus {
    pub id: EpochId,
    /// Whether the asking connection owns it.
    pub owned: bool,
    /// Its disks' names.
    pub disks: Vec<String>,
}

/// Freeze pause statistics since the shim started, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Pauses {
    pub count: u64,
    pub last_us: u64,
    pub max_us: u64,
    pub total_us: u64,
}

impl Pauses {
    /// Counts one more freeze that held the guest's writes for `us`.
    pub fn add(&mut self, us: u64) {
        self.count += 1;
        self.last_us = us;
        self.max_us = self.max_us.max(us);
        self.total_us += us;
    }
}

/// One disk as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusDisk {
    pub name: String,
    /// The image or device the shim serves.
    pub path: PathBuf,
    pub generation_id: GenerationId,
    pub block_size: u32,
    pub block_count: u64,
    pub dirty_blocks: u64,
    /// Blocks of the epoch frozen now (`null` if none is).
    pub frozen_blocks: Option<u64>,
    /// A checksum-compare resync is owed ([`resync_reason`](Self::resync_reason) says why).
    pub resync_required: bool,
    /// The shim's reason token (`image-modified`, …). Text, not an enum, so that an
    /// older engine reports a newer shim's reason instead of refusing the reply.
    pub resync_reason: Option<String>,
    /// Bitmap page syncs so far (each one `fdatasync`).
    pub bitmap_syncs: u64,
    /// Marks that had to wait for a bitmap sync.
    pub marks_waited: u64,
    /// A bitmap write failed and writes are being refused.
    pub tracking_failed: bool,
    /// NBD connections open now.
    pub connections: u64,
    /// Writes are refused: the site was demoted by a planned failover. `false` from a
    /// shim that predates demotion.
    #[serde(default)]
    pub writes_refused: bool,
    /// The image as it was when the shim drew this tracking generation (`null` from a
    /// shim that predates the field, or for a generation an older shim drew).
    #[serde(default)]
    pub generation_born: Option<ImageAtBirth>,
}

/// What a disk's image looked like when a tracking generation was drawn: a generation
/// whose birth matches the stamp a replica had when it was promoted has tracked every
/// write made to it since (reverse replication relies on this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageAtBirth {
    pub size_bytes: u64,
    pub ino: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
}

/// The reply to `freeze`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeReply {
    pub ok: True,
    pub epoch: EpochId,
    /// How long the guest's writes were held for the freeze.
    pub pause_us: u64,
    /// The shim aborts the epoch when its connection is silent this long; `None` from
    /// a shim without the bound.
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    pub disks: Vec<FreezeDisk>,
}

/// One disk of a frozen epoch, as the `freeze` reply names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeDisk {
    pub name: String,
    pub path: PathBuf,
    pub generation_id: GenerationId,
    pub resync_required: bool,
    /// As [`StatusDisk::resync_reason`].
    pub resync_reason: Option<String>,
    pub block_size: u32,
    pub disk_size: u64,
    pub frozen_blocks: u64,
    /// Every block is preserved, not only the frozen ones.
    pub whole_disk: bool,
    /// The epoch's files ([`crate::epoch::EpochFiles`]).
    pub bitmap: PathBuf,
    pub map: PathBuf,
    pub scratch: PathBuf,
    /// The frozen blocks' granule masks; `None` from a shim that tracks whole blocks
    /// only (the engine then reads every frozen block whole).
    #[serde(default)]
    pub granules: Option<PathBuf>,
}

#[cfg(test)]
mod tests;
