//! Atomic epochs on the target: an undo log of the replica bytes an epoch overwrites.
//!
//! Before a block of a replica that holds an acknowledged epoch is overwritten, its old
//! bytes are appended to the session's undo log and the log is made durable. Commit
//! makes the replicas durable, then durably marks the log committed (the commit point),
//! then records the new epoch per disk, then keeps the log as a recovery point, then
//! removes the mark. Whatever instant the target dies at, [`recover`] finds the
//! replicas either before the commit mark — and rolls every disk of the group back to
//! its previous epoch, byte for byte — or after it — and completes the records and the
//! kept log. A replica therefore always reads as exactly one acknowledged epoch, and
//! the disks of a session move together.
//!
//! A log is created under a temporary name and renamed once its header is durable, so
//! a `.undo` file always has a whole header; a `.tmp` left by a crash belongs to a
//! session that never wrote a replica and is removed.
//!
//! File layout, version 2 (little-endian): a header of `MAGIC`, `epoch u64`,
//! `disk_count u32`, then per disk `name_len u8`, `name [64]`, `generation [16]`,
//! `disk_size u64`, `logged u8`, `prev_epoch u64` (`u64::MAX`: none), and an xxh3-64 of
//! everything before it; then entries of `ENTRY_MAGIC u32`, `disk u32`, `offset u64`,
//! `len u32`, `flags u32`, `data_hash u64` (xxh3-64 of the data; the length of a zero
//! entry), `synced_len u64` (how many bytes of the log were durable when the entry was
//! written), `entry_hash u64` (xxh3-64 of the 40 bytes before it), then `len` bytes of
//! old data.
//!
//! What may be damaged, and what is refused. Entries are synced before the replica
//! writes they cover are issued, so only entries after the last completed sync can be
//! torn by a crash — and the replica ranges they cover still hold exactly their logged
//! bytes. Recovery drops such a torn tail only when it can show it is one: no later
//! entry claims (by `synced_len`) that the damaged bytes had been synced, and every
//! readable entry of the tail still matches the replica. Anything else — a damaged
//! entry in the synced part, valid data after it that was synced, a tail whose write
//! did reach the replica, a log whose previous epochs disagree with the replicas'
//! records — is refused: the log is set aside as `.damaged`, never applied, and its
//! disks are marked as needing a checksum-compare resync (see
//! [`super::state::ReplicaRecord::suspect`]). A kept log (a recovery point) is complete
//! by construction and must parse, whole, to its end.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_io::failpoint;
use filter_driver_shim_contract::GenerationId;
use xxhash_rust::xxh3::xxh3_64;

use super::state::ReplicaRecord;
use super::TargetError;
use crate::durable::StateOp;

const MAGIC: &[u8; 8] = b"FRYUNDO2";
/// The first format: no previous epochs, no synced lengths. Refused with a message.
const MAGIC_V1: &[u8; 8] = b"FRYUNDO1";
const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"UNDE");
pub(crate) const ENTRY_HEADER_LEN: usize = 48;
/// An entry's header, as written before its data.
pub(crate) type EntryBytes = [u8; ENTRY_HEADER_LEN];
/// Bytes of an entry header covered by its own hash.
const ENTRY_HASHED_LEN: usize = 40;
/// Entry flag: the range read as zeros; no data follows, the length is in the data-hash
/// field.
const FLAG_ZERO: u32 = 1;
pub(crate) const NAME_LEN: usize = 64;
/// Per-disk header record: name length, name, generation, size, logged, previous epoch.
const HEADER_DISK_LEN: usize = 1 + NAME_LEN + 16 + 8 + 1 + 8;
/// `prev_epoch` of a disk that held no acknowledged epoch.
const NO_EPOCH: u64 = u64::MAX;
/// Largest single entry: one write of the applier (a frame's worth of blocks).
pub(crate) const ENTRY_MAX: usize = 8 << 20;
/// Bytes of a damaged log's tail read at a time while recovery looks for entries in it.
const TAIL_WINDOW: usize = 1 << 20;
const _: () = assert!(TAIL_WINDOW >= ENTRY_HEADER_LEN);

/// Directory of in-progress undo logs under the target's state dir.
pub fn undo_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("undo")
}

/// One disk of the session, as its record will read after the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoDisk {
    pub name: String,
    pub generation: GenerationId,
    pub disk_size: u64,
    /// Whether this disk's old bytes are logged (it holds an acknowledged epoch).
    pub logged: bool,
    /// The acknowledged epoch the replica held before this one, if any.
    pub prev_epoch: Option<u64>,
}

pub struct UndoLog {
    file: File,
    path: PathBuf,
    marker: PathBuf,
    state_dir: PathBuf,
    epoch: u64,
    disks: Vec<UndoDisk>,
    /// Bytes written to the log so far.
    len: u64,
    /// Bytes of the log known durable (as of the last completed sync).
    synced_len: u64,
    /// Entries appended since the last sync.
    dirty: bool,
}

fn io_err(path: &Path, op: StateOp, source: io::Error) -> TargetError {
    TargetError::State {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Why an undo log (or a kept recovery-point log) cannot be trusted. Such a log is
/// never applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogDamage {
    #[error("undo log of format 1 (an older ferry) carries no previous epochs; it cannot be checked and is not applied")]
    FormatV1,
    #[error("undo log header is damaged")]
    Header,
    /// A committed log must parse to its end.
    #[error("kept undo log is damaged at byte {bad_at} of {size}: it does not parse to its end")]
    KeptTail { bad_at: u64, size: u64 },
    /// A kept log's size differs from the one its metadata recorded.
    #[error("kept undo log is {size} bytes, its metadata says {recorded}")]
    KeptSize { size: u64, recorded: u64 },
    #[error("undo log is damaged at byte {bad_at}, inside its synced part (an entry at byte {entry_at} was written after {synced_len} bytes were durable); the replicas may hold bytes it can no longer restore")]
    SyncedPart {
        bad_at: u64,
        entry_at: u64,
        synced_len: u64,
    },
    #[error("undo log entry at byte {entry_at} names disk #{disk} whose bytes are not logged")]
    UnloggedDisk { entry_at: u64, disk: usize },
    /// The torn tail's write reached the replica: the old bytes are gone.
    #[error("undo log is damaged at byte {bad_at}, and the write its entry at byte {entry_at} covers (disk {disk:?}, offset {offset}, {len} bytes) reached the replica; the old bytes are lost")]
    ReachedReplica {
        bad_at: u64,
        entry_at: u64,
        disk: String,
        offset: u64,
        len: u64,
    },
    /// An uncommitted log that would take a replica back past its record's epoch.
    #[error("uncommitted log of epoch {epoch} would take disk {disk:?} back to epoch {}, but its record says it holds {}; refusing to roll back (the log is stale)", prev_epoch.map_or("none".into(), |e| e.to_string()), held.map_or("no epoch".into(), |e| e.to_string()))]
    Stale {
        epoch: u64,
        disk: String,
        prev_epoch: Option<u64>,
        held: Option<u64>,
    },
}

fn sync_dir(dir: &Path) -> Result<(), TargetError> {
    crate::durable::sync_dir(dir).map_err(|e| io_err(dir, StateOp::FsyncDir, e))
}

/// How committing an epoch ended, when it did not end complete.
pub enum CommitFailure {
    /// The commit mark is not durable, and not present: the epoch did not commit. The
    /// log is handed back so the caller rolls the replicas back.
    NotCommitted { log: UndoLog, error: TargetError },
    /// Whether the commit mark is durable is unknown (it could not be written whole,
    /// nor removed). The replicas must stay out of service until [`recover_one`]
    /// settles the log either way; the epoch must not be acknowledged.
    Undecided {
        log: PathBuf,
        disks: Vec<String>,
        error: TargetError,
    },
    /// The commit mark is durable — the epoch is committed and may be acknowledged —
    /// but its records or kept log are not complete. The replicas must stay out of
    /// service until [`recover_one`] completes them.
    Unfinished {
        log: PathBuf,
        disks: Vec<String>,
        error: TargetError,
    },
}

impl UndoLog {
    /// Creates the log for `epoch`, durable (file and directory entry) on return. The
    /// header is written to a temporary name and renamed into place once durable.
    pub fn create(state_dir: &Path, epoch: u64, disks: Vec<UndoDisk>) -> Result<Self, TargetError> {
        let dir = undo_dir(state_dir);
        crate::durable::ensure_dir(&dir).map_err(|e| io_err(&dir, StateOp::Create, e))?;
        // Epochs count per disk generation, so concurrent sessions for different disks can
        // apply the same epoch number: a random suffix keeps their logs apart.
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).map_err(|e| {
            io_err(
                &dir,
                StateOp::DrawLogName,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let stem = format!("{epoch:020}-{:08x}", u32::from_le_bytes(nonce));
        let path = dir.join(format!("{stem}.undo"));
        let tmp = dir.join(format!("{stem}.tmp"));
        let marker = dir.join(format!("{stem}.committed"));
        let header = encode_header(epoch, &disks);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, StateOp::Create, e))?;
        let written = file
            .write_all(&header)
            .map_err(|e| io_err(&tmp, StateOp::WriteHeader, e))
            .and_then(|_| file.sync_all().map_err(|e| io_err(&tmp, StateOp::Fsync, e)))
            .and_then(|_| fs::rename(&tmp, &path).map_err(|e| io_err(&tmp, StateOp::Rename, e)))
            .and_then(|_| sync_dir(&dir));
        if let Err(e) = written {
            // No replica was touched under this log: it can simply go.
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        let len = header.len() as u64;
        Ok(UndoLog {
            file,
            path,
            marker,
            state_dir: state_dir.to_path_buf(),
            epoch,
            disks,
            len,
            synced_len: len,
            dirty: false,
        })
    }

    /// Marks, durably, that this log must not be kept as a recovery point when its epoch
    /// commits: the bytes it saves include changes made to a replica outside ferry
    /// (the session discards them), so restoring it would bring them back under an
    /// epoch's name.
    ///
    /// `discards`: the session discards changes made outside ferry, so a rollback of it
    /// brings them back and the replica's stamp must stay as it was (the next session
    /// sees them again). Otherwise (reverse replication) a rollback restores exactly
    /// the bytes the record names, and the replica is restamped as after any rollback.
    pub fn not_a_point(&self, discards: bool) -> Result<(), TargetError> {
        let marker = no_point_marker(&self.path);
        let content: &[u8] = if discards { b"" } else { REPROTECT_MARK };
        crate::durable::write_atomic(&marker, content)
            .map_err(|e| io_err(&marker, StateOp::Create, e))
    }

    /// Whether old bytes of `disk` must be logged before it is overwritten.
    pub fn logs(&self, disk: u32) -> bool {
        self.disks.get(disk as usize).is_some_and(|d| d.logged)
    }

    /// Whether the old bytes of any disk are logged.
    pub(crate) fn logs_any(&self) -> bool {
        self.disks.iter().any(|d| d.logged)
    }

    fn entry_header(&self, disk: u32, offset: u64, len: u32, flags: u32, word: u64) -> EntryBytes {
        encode_entry(disk, offset, len, flags, word, self.synced_len)
    }

    /// Appends the old bytes of `[offset, offset + data.len())` of `disk`.
    pub fn append(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), TargetError> {
        let (at, h) = self.reserve(disk, offset, data);
        self.file
            .write_all_at(&h, at)
            .and_then(|_| self.file.write_all_at(data, at + h.len() as u64))
            .map_err(|e| io_err(&self.path, StateOp::Append, e))
    }

    /// Reserves the log bytes of an entry holding `data`, the old bytes of `[offset,
    /// offset + data.len())` of `disk`: where the entry goes and its header. The caller
    /// writes the header there, then `data` right after it (one
    /// [`write_reserved`](Self::write_reserved) of both, from a buffer that holds them
    /// side by side), before the next [`sync`](Self::sync). Entries are written at
    /// their own positions, never through the file's cursor.
    pub(crate) fn reserve(&mut self, disk: u32, offset: u64, data: &[u8]) -> (u64, EntryBytes) {
        assert!(data.len() <= ENTRY_MAX, "undo entry larger than one write");
        let h = self.entry_header(disk, offset, data.len() as u32, 0, xxh3_64(data));
        let at = self.len;
        self.len += (h.len() + data.len()) as u64;
        self.dirty = true;
        (at, h)
    }

    /// Writes a reserved entry, header and data as one slice, at `at` (see
    /// [`reserve`](Self::reserve)).
    pub(crate) fn write_reserved(&self, entry: &[u8], at: u64) -> io::Result<()> {
        self.file.write_all_at(entry, at)
    }

    /// Records that `[offset, offset + len)` of `disk` read as zeros before this epoch.
    pub fn append_zero(&mut self, disk: u32, offset: u64, len: u64) -> Result<(), TargetError> {
        // A zero entry's length may exceed u32: it lives in the data-hash field.
        let h = self.entry_header(disk, offset, 0, FLAG_ZERO, len);
        self.file
            .write_all_at(&h, self.len)
            .map_err(|e| io_err(&self.path, StateOp::Append, e))?;
        self.len += h.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Makes every appended entry durable. Replica writes covered by them may follow.
    pub fn sync(&mut self) -> Result<(), TargetError> {
        if self.dirty {
            self.file
                .sync_data()
                .map_err(|e| io_err(&self.path, StateOp::Fdatasync, e))?;
            self.dirty = false;
            self.synced_len = self.len;
        }
        Ok(())
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disks the log covers.
    pub fn disk_names(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.name.clone()).collect()
    }

    /// The commit point, called once the replicas are durable: durably marks the log
    /// committed, then records the new epoch on every disk, keeps the log as a
    /// recovery point (see [`super::points`]) and removes the mark. `keep` prunes the
    /// points beyond the retention (a failure to prune is logged, not returned: the
    /// epoch is committed whatever happens to older points).
    pub fn commit(
        self,
        keep: &super::points::Retention,
        replicas: &[(String, PathBuf)],
    ) -> Result<(), Box<CommitFailure>> {
        if failpoint::hit("target.commit.crash") {
            // A crash at the last instant before the commit point: every replica write
            // and every log entry is durable, the mark is not.
            std::process::abort();
        }
        let marked = if failpoint::hit("target.commit.mark") {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        } else {
            crate::durable::write_atomic(&self.marker, &self.epoch.to_le_bytes())
        };
        if let Err(e) = marked {
            let error = io_err(&self.marker, StateOp::WriteCommitMark, e);
            // The mark may have reached the directory (a failed directory fsync after
            // the rename): take it back, durably, before anything is rolled back —
            // a mark that surfaced after a rollback would roll the records forward
            // over restored bytes.
            let tmp = crate::durable::temp_path(&self.marker);
            let _ = fs::remove_file(tmp);
            let taken_back = match fs::remove_file(&self.marker) {
                Ok(()) => true,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            } && self.marker.parent().is_some_and(|d| sync_dir(d).is_ok());
            if taken_back {
                return Err(Box::new(CommitFailure::NotCommitted { log: self, error }));
            }
            return Err(Box::new(CommitFailure::Undecided {
                disks: self.disk_names(),
                log: self.path,
                error,
            }));
        }
        let size = self.len;
        let UndoLog {
            file,
            path,
            state_dir,
            epoch,
            disks,
            ..
        } = self;
        drop(file);
        finish_commit(&state_dir, &path, epoch, &disks, size, replicas).map_err(|error| {
            Box::new(CommitFailure::Unfinished {
                disks: disks.iter().map(|d| d.name.clone()).collect(),
                log: path.clone(),
                error,
            })
        })?;
        let names: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
        if let Err(e) = super::points::prune(&state_dir, keep, &names) {
            tracing::warn!(
                "epoch {epoch} committed; merging old recovery points away failed: {}",
                crate::chain(&e)
            );
        }
        Ok(())
    }

    /// Undoes this (uncommitted) epoch now: restores every logged byte and removes the
    /// log. Used when a session fails while the target keeps running.
    pub fn roll_back(self, replicas: &[(String, PathBuf)]) -> Result<Recovery, TargetError> {
        let UndoLog {
            file,
            path,
            state_dir,
            ..
        } = self;
        drop(file);
        recover_one(&state_dir, &path, replicas)
    }
}

/// Everything after the commit mark, idempotent: records, then the log kept as a
/// recovery point (for an epoch that changed no block: the newest point extended to
/// it and the empty log removed, see `super::points`), then the mark removed. Each
/// step is durable before the next.
fn finish_commit(
    state_dir: &Path,
    log: &Path,
    epoch: u64,
    disks: &[UndoDisk],
    size: u64,
    replicas: &[(String, PathBuf)],
) -> Result<(), TargetError> {
    if failpoint::hit("target.commit.records") {
        return Err(io_err(
            state_dir,
            StateOp::WriteRecords,
            io::Error::from_raw_os_error(libc::ENOSPC),
        ));
    }
    write_records(state_dir, epoch, disks, replicas)?;
    let no_point = no_point_marker(log);
    if no_point.exists() {
        // Its old bytes include changes made outside ferry: not a recovery point.
        if log.exists() {
            fs::remove_file(log).map_err(|e| io_err(log, StateOp::Remove, e))?;
        }
        remove_marker(&no_point)?;
    } else if log.exists() {
        // An epoch that changed no block restores nothing: its log is not a point of
        // its own when the newest kept one can be extended to it (see
        // `super::points`). The extension is durable before the log goes.
        let empty = size == header_len(disks.len())
            && disks.iter().all(|d| d.logged && d.prev_epoch.is_some());
        if empty && super::points::extend_through(state_dir, epoch, disks)? {
            if failpoint::hit("target.commit.extend.crash") {
                // A crash with the point extended and the empty log still there.
                std::process::abort();
            }
            fs::remove_file(log).map_err(|e| io_err(log, StateOp::Remove, e))?;
            if let Some(dir) = log.parent() {
                sync_dir(dir)?;
            }
        } else {
            super::points::keep_log(state_dir, epoch, log, disks, size)?;
        }
    }
    remove_marker(&log.with_extension("committed"))
}

/// Records `epoch` as the one every disk of the log holds, each with its replica's
/// stamp (the replicas are durable: the commit mark follows their sync).
fn write_records(
    state_dir: &Path,
    epoch: u64,
    disks: &[UndoDisk],
    replicas: &[(String, PathBuf)],
) -> Result<(), TargetError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for d in disks {
        ReplicaRecord {
            generation: d.generation,
            epoch,
            disk_size: d.disk_size,
            committed_unix_s: now,
            suspect: None,
            stamp: stamp_of(replicas, &d.name)?,
        }
        .save(state_dir, &d.name)?;
    }
    Ok(())
}

/// The stamp of disk `name`'s replica now (`None` if it is not configured or gone).
pub(crate) fn stamp_of(
    replicas: &[(String, PathBuf)],
    name: &str,
) -> Result<Option<super::stamp::ReplicaStamp>, TargetError> {
    let Some((_, path)) = replicas.iter().find(|(n, _)| n == name) else {
        return Ok(None);
    };
    super::stamp::ReplicaStamp::take(path).map_err(|source| TargetError::Io {
        disk: name.to_string(),
        source,
    })
}

/// After a rollback wrote `disks`' replicas back to the epoch their records hold: the
/// records get the replicas' new stamps (the rollback's writes are the writer's own).
fn restamp(
    state_dir: &Path,
    disks: &[UndoDisk],
    replicas: &[(String, PathBuf)],
) -> Result<(), TargetError> {
    for d in disks.iter().filter(|d| d.logged) {
        if let Some(mut r) = ReplicaRecord::load(state_dir, &d.name)? {
            r.stamp = stamp_of(replicas, &d.name)?;
            r.save(state_dir, &d.name)?;
        }
    }
    Ok(())
}

fn remove_marker(marker: &Path) -> Result<(), TargetError> {
    match fs::remove_file(marker) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(marker, StateOp::Remove, e)),
    }
    match marker.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Beside an undo log: the log must not become a recovery point when its epoch commits
/// (see [`UndoLog::not_a_point`]).
fn no_point_marker(log: &Path) -> PathBuf {
    log.with_extension("nopoint")
}

/// The content of a no-point marker of a reverse-replication epoch (an empty marker is
/// a discarding epoch's, see [`UndoLog::not_a_point`]).
const REPROTECT_MARK: &[u8] = b"reprotect";

/// Whether rolling back the log at `log` brings back changes made outside ferry (its
/// epoch discarded them), so the replica's stamp must stay as it was.
fn brings_back_outside_changes(log: &Path) -> bool {
    fs::read(no_point_marker(log)).is_ok_and(|content| content != REPROTECT_MARK)
}

fn remove(path: &Path, marker: &Path) -> Result<(), TargetError> {
    fs::remove_file(path).map_err(|e| io_err(path, StateOp::Remove, e))?;
    match fs::remove_file(no_point_marker(path)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, StateOp::Remove, e)),
    }
    match fs::remove_file(marker) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(marker, StateOp::Remove, e)),
    }
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// What [`recover`] did to one log.
#[derive(Debug)]
pub enum Recovery {
    /// The epoch had not committed: every disk was restored to its previous epoch.
    RolledBack {
        epoch: u64,
        entries: usize,
        disks: Vec<String>,
    },
    /// The epoch had committed: the records and the kept log were completed.
    RolledForward { epoch: u64, disks: Vec<String> },
    /// The log could not be trusted (damaged, or contradicting the replicas' records):
    /// it was set aside as `set_aside`, never applied, and `disks` were marked as
    /// needing a checksum-compare resync before any changed-block epoch.
    Distrusted {
        log: PathBuf,
        set_aside: PathBuf,
        disks: Vec<String>,
        problem: LogDamage,
    },
    /// Recovery of this log failed for a reason that may pass (an I/O error, a full
    /// disk): `disks` must stay out of service until a retry succeeds.
    Pending {
        log: PathBuf,
        disks: Vec<String>,
        error: TargetError,
    },
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RolledBack {
                epoch,
                entries,
                disks,
            } => write!(
                f,
                "epoch {epoch} rolled back ({entries} undo entries) on disk(s) {}",
                disks.join(", ")
            ),
            Self::RolledForward { epoch, disks } => write!(
                f,
                "epoch {epoch} rolled forward on disk(s) {}",
                disks.join(", ")
            ),
            Self::Distrusted {
                log,
                set_aside,
                disks,
                problem,
            } => write!(
                f,
                "undo log {} not applied: {problem}; set aside as {}, disk(s) {} need a checksum-compare resync",
                log.display(),
                set_aside.display(),
                disks.join(", ")
            ),
            Self::Pending { log, disks, error } => write!(
                f,
                "undo log {} not settled: {}; disk(s) {} stay out of service",
                log.display(),
                crate::chain(error),
                disks.join(", ")
            ),
        }
    }
}

/// Finishes or undoes every interrupted epoch found in `state_dir`. `replicas` maps
/// each configured disk name to its replica. Must run before any session. A log that
/// cannot be settled now is reported as [`Recovery::Pending`]; the caller keeps its
/// disks out of service.
pub fn recover(
    state_dir: &Path,
    replicas: &[(String, PathBuf)],
) -> Result<Vec<Recovery>, TargetError> {
    let dir = undo_dir(state_dir);
    let entries: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir, StateOp::Read, e)),
    };
    let has_ext = |p: &Path, x: &str| p.extension().is_some_and(|e| e == x);
    for p in &entries {
        // A log whose header never became durable: no replica was written under it.
        // A mark whose log is gone: the log was kept after its records were written.
        if has_ext(p, "tmp") || (has_ext(p, "committed") && !p.with_extension("undo").exists()) {
            fs::remove_file(p).map_err(|e| io_err(p, StateOp::Remove, e))?;
        }
    }
    let mut logs: Vec<&PathBuf> = entries.iter().filter(|p| has_ext(p, "undo")).collect();
    // Newest first: undoing a later epoch before an earlier one restores in order.
    logs.sort();
    logs.reverse();
    let mut done = Vec::new();
    for path in logs {
        match recover_one(state_dir, path, replicas) {
            Ok(r) => done.push(r),
            Err(e) => done.push(Recovery::Pending {
                log: path.clone(),
                disks: read_log(path, ReadMode::Header)
                    .map(|l| l.disks.into_iter().map(|d| d.name).collect())
                    .unwrap_or_else(|_| replicas.iter().map(|(n, _)| n.clone()).collect()),
                error: e,
            }),
        }
    }
    Ok(done)
}

/// Settles one log: rolls it forward if its commit mark exists, else back; a log that
/// cannot be trusted is set aside and its disks marked (see [`Recovery::Distrusted`]).
/// Errors are transient: the log is left as it was, to be retried.
pub(crate) fn recover_one(
    state_dir: &Path,
    path: &Path,
    replicas: &[(String, PathBuf)],
) -> Result<Recovery, TargetError> {
    let marker = path.with_extension("committed");
    let log = match read_log(path, ReadMode::Header) {
        Ok(log) => log,
        Err(Damage::Io(e)) => return Err(e),
        Err(Damage::Untrusted(problem)) => {
            // Without a header nobody knows which disks the log touched: every one.
            let all: Vec<String> = replicas.iter().map(|(n, _)| n.clone()).collect();
            return distrust(state_dir, path, &all, problem);
        }
    };
    let names: Vec<String> = log.disks.iter().map(|d| d.name.clone()).collect();
    if marker.exists() {
        let size = fs::metadata(path)
            .map_err(|e| io_err(path, StateOp::Stat, e))?
            .len();
        finish_commit(state_dir, path, log.epoch, &log.disks, size, replicas)?;
        return Ok(Recovery::RolledForward {
            epoch: log.epoch,
            disks: names,
        });
    }
    let logged: Vec<String> = log
        .disks
        .iter()
        .filter(|d| d.logged)
        .map(|d| d.name.clone())
        .collect();
    if let Some(problem) = stale(state_dir, &log)? {
        return distrust(state_dir, path, &logged, problem);
    }
    let files = open_for_rollback(path, &log.disks, replicas)?;
    let refs: Vec<Option<&File>> = files.iter().map(Option::as_ref).collect();
    let log = match read_log(path, ReadMode::Live { replicas: &refs }) {
        Ok(log) => log,
        Err(Damage::Io(e)) => return Err(e),
        Err(Damage::Untrusted(problem)) => return distrust(state_dir, path, &logged, problem),
    };
    log.apply_reversed(&refs)
        .map_err(|e| io_err(path, StateOp::RollBack, e))?;
    for f in files.iter().flatten() {
        f.sync_data()
            .map_err(|e| io_err(path, StateOp::FsyncReplicaAfterRollback, e))?;
    }
    // A discarding epoch's log brought back changes made outside ferry: the stamp stays
    // as it was, so the next session still sees them and asks the operator again.
    if !brings_back_outside_changes(path) {
        restamp(state_dir, &log.disks, replicas)?;
    }
    remove(path, &marker)?;
    Ok(Recovery::RolledBack {
        epoch: log.epoch,
        entries: log.entries.len(),
        disks: names,
    })
}

/// A log may only take a replica back to the epoch it held when the log began: a log
/// left behind by a failed commit must never roll back later epochs. Why this one
/// would, if it would.
fn stale(state_dir: &Path, log: &LogContents) -> Result<Option<LogDamage>, TargetError> {
    for d in log.disks.iter().filter(|d| d.logged) {
        let record = ReplicaRecord::load(state_dir, &d.name)?;
        let held = record.as_ref().map(|r| r.epoch);
        if held != d.prev_epoch {
            return Ok(Some(LogDamage::Stale {
                epoch: log.epoch,
                disk: d.name.clone(),
                prev_epoch: d.prev_epoch,
                held,
            }));
        }
    }
    Ok(None)
}

/// Opens, for writing, the replica of every disk of the log (at `path`) that has
/// logged bytes; `None` for the others. Every disk must still be configured.
pub(crate) fn open_for_rollback(
    path: &Path,
    disks: &[UndoDisk],
    replicas: &[(String, PathBuf)],
) -> Result<Vec<Option<File>>, TargetError> {
    let mut files = Vec::with_capacity(disks.len());
    for d in disks {
        let Some((_, p)) = replicas.iter().find(|(n, _)| *n == d.name) else {
            return Err(TargetError::UnconfiguredDisk {
                log: path.to_path_buf(),
                disk: d.name.clone(),
            });
        };
        files.push(if d.logged {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(|e| io_err(p, StateOp::OpenReplicaForRollback, e))?,
            )
        } else {
            None
        });
    }
    Ok(files)
}

/// Sets a log that must not be applied aside (`.damaged`, kept for inspection), marks
/// `disks` as needing a checksum-compare resync, and retires their recovery points
/// (they were reached through replicas that are no longer a known epoch).
fn distrust(
    state_dir: &Path,
    path: &Path,
    disks: &[String],
    problem: LogDamage,
) -> Result<Recovery, TargetError> {
    let reason = format!("{}: {problem}", path.display());
    for name in disks {
        if let Some(mut r) = ReplicaRecord::load(state_dir, name)? {
            if r.suspect.is_none() {
                r.suspect = Some(reason.clone());
                r.save(state_dir, name)?;
            }
        }
    }
    super::points::retire(state_dir, disks, &reason)?;
    let set_aside = path.with_extension("damaged");
    fs::rename(path, &set_aside).map_err(|e| io_err(path, StateOp::SetAside, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(Recovery::Distrusted {
        log: path.to_path_buf(),
        set_aside,
        disks: disks.to_vec(),
        problem,
    })
}

/// Bytes of the header of a log of `disks` disks: a log this long has no entries.
fn header_len(disks: usize) -> u64 {
    (20 + disks * HEADER_DISK_LEN + 8) as u64
}

fn encode_entry(disk: u32, offset: u64, len: u32, flags: u32, word: u64, synced: u64) -> [u8; 48] {
    let mut h = [0u8; ENTRY_HEADER_LEN];
    h[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&disk.to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    h[20..24].copy_from_slice(&flags.to_le_bytes());
    h[24..32].copy_from_slice(&word.to_le_bytes());
    h[32..40].copy_from_slice(&synced.to_le_bytes());
    let eh = xxh3_64(&h[..ENTRY_HASHED_LEN]);
    h[40..48].copy_from_slice(&eh.to_le_bytes());
    h
}

/// Writes, durably, the kept log at `path` that merges `parts` (committed logs of the
/// same disks, oldest first): a header for `epoch` and `disks`, then the entries of
/// every part in order. Applied newest first, it does what applying the parts newest
/// first does; an entry whose range the older parts cover whole is left out (their
/// bytes are written over it anyway). The log's size.
pub(crate) fn write_merged(
    path: &Path,
    epoch: u64,
    disks: &[UndoDisk],
    parts: &[&LogContents],
) -> Result<u64, TargetError> {
    let io = |op: StateOp| move |e: io::Error| io_err(path, op, e);
    let header = encode_header(epoch, disks);
    let mut out = io::BufWriter::new(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io(StateOp::Create))?,
    );
    out.write_all(&header).map_err(io(StateOp::WriteHeader))?;
    let mut len = header.len() as u64;
    // Per disk, the ranges the older parts cover, sorted and coalesced.
    let mut covered: Vec<Vec<(u64, u64)>> = vec![Vec::new(); disks.len()];
    let mut buf = Vec::new();
    for part in parts {
        let mut added: Vec<Vec<(u64, u64)>> = vec![Vec::new(); disks.len()];
        for entry in &part.entries {
            let (disk, offset, size) = match *entry {
                Entry::Data {
                    disk, offset, len, ..
                } => (disk, offset, len as u64),
                Entry::Zero { disk, offset, len } => (disk, offset, len),
            };
            if disk >= disks.len() {
                continue;
            }
            added[disk].push((offset, offset + size));
            if covers(&covered[disk], offset, offset + size) {
                continue;
            }
            let h = match *entry {
                Entry::Data { start, len: n, .. } => {
                    buf.resize(n, 0);
                    part.file
                        .read_exact_at(&mut buf, start)
                        .map_err(io(StateOp::Read))?;
                    encode_entry(disk as u32, offset, n as u32, 0, xxh3_64(&buf), len)
                }
                Entry::Zero { .. } => {
                    buf.clear();
                    encode_entry(disk as u32, offset, 0, FLAG_ZERO, size, len)
                }
            };
            out.write_all(&h)
                .and_then(|_| out.write_all(&buf))
                .map_err(io(StateOp::Append))?;
            len += (h.len() + buf.len()) as u64;
        }
        for (c, a) in covered.iter_mut().zip(added) {
            c.extend(a);
            coalesce(c);
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| io_err(path, StateOp::Append, e.into_error()))?;
    file.sync_all().map_err(io(StateOp::Fsync))?;
    Ok(len)
}

/// Sorts and joins overlapping or touching ranges.
fn coalesce(ranges: &mut Vec<(u64, u64)>) {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(s, e) in ranges.iter() {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    *ranges = out;
}

/// Whether coalesced `ranges` contain `[start, end)` whole.
fn covers(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.0 <= start);
    i > 0 && ranges[i - 1].1 >= end
}

fn encode_header(epoch: u64, disks: &[UndoDisk]) -> Vec<u8> {
    let mut header = Vec::with_capacity(24 + disks.len() * HEADER_DISK_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&epoch.to_le_bytes());
    header.extend_from_slice(&(disks.len() as u32).to_le_bytes());
    for d in disks {
        let mut name = [0u8; NAME_LEN];
        name[..d.name.len()].copy_from_slice(d.name.as_bytes());
        header.push(d.name.len() as u8);
        header.extend_from_slice(&name);
        header.extend_from_slice(d.generation.as_bytes());
        header.extend_from_slice(&d.disk_size.to_le_bytes());
        header.push(d.logged as u8);
        header.extend_from_slice(&d.prev_epoch.unwrap_or(NO_EPOCH).to_le_bytes());
    }
    let h = xxh3_64(&header);
    header.extend_from_slice(&h.to_le_bytes());
    header
}

/// Largest log header: 256 disks plus the fixed part and the checksum.
const HEADER_MAX: usize = 20 + crate::protocol::MAX_DISKS_PER_SESSION * HEADER_DISK_LEN + 8;

/// A log opened for reading: its header and an index of its valid entries. The data
/// stays in the file and is read one entry at a time, so memory does not grow with the
/// size of an epoch (the index holds 32 bytes per entry of up to 8 MiB).
pub(crate) struct LogContents {
    file: File,
    pub epoch: u64,
    /// The newest epoch whose bytes this log restores from: a kept log's point may
    /// cover a run of epochs that changed nothing (see `super::points`); else `epoch`.
    pub last_epoch: u64,
    pub disks: Vec<UndoDisk>,
    pub entries: Vec<Entry>,
}

/// How much of a log [`read_log`] reads, and what damage it tolerates.
pub(crate) enum ReadMode<'a> {
    /// The header only.
    Header,
    /// An uncommitted log about to be rolled back over `replicas` (indexed like the
    /// log's disks; `None` for disks without logged bytes): a torn tail is dropped
    /// once shown to be one against the replicas.
    Live { replicas: &'a [Option<&'a File>] },
    /// A committed log: every byte must parse, to the end of the file.
    Kept,
}

/// Why a log could not be read.
pub(crate) enum Damage {
    /// Reading failed; may pass.
    Io(TargetError),
    /// The log's content cannot be trusted; says why.
    Untrusted(LogDamage),
}

impl Damage {
    /// As an error for callers that only report it.
    pub(crate) fn into_error(self, path: &Path) -> TargetError {
        match self {
            Damage::Io(e) => e,
            Damage::Untrusted(source) => TargetError::UntrustedLog {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

/// One entry header, decoded and checked against its own hash.
struct EntryHeader {
    disk: usize,
    offset: u64,
    len: usize,
    zero_len: Option<u64>,
    data_hash: u64,
    synced_len: u64,
}

fn decode_entry(h: &[u8; ENTRY_HEADER_LEN], disks: usize) -> Option<EntryHeader> {
    let word = |a: usize| u64::from_le_bytes(h[a..a + 8].try_into().expect("8 bytes"));
    let half = |a: usize| u32::from_le_bytes(h[a..a + 4].try_into().expect("4 bytes"));
    if half(0) != ENTRY_MAGIC || xxh3_64(&h[..ENTRY_HASHED_LEN]) != word(40) {
        return None;
    }
    let disk = half(4) as usize;
    let len = half(16) as usize;
    let zero = half(20) == FLAG_ZERO;
    if disk >= disks || (!zero && len > ENTRY_MAX) {
        return None;
    }
    Some(EntryHeader {
        disk,
        offset: word(8),
        len: if zero { 0 } else { len },
        zero_len: zero.then(|| word(24)),
        data_hash: word(24),
        synced_len: word(32),
    })
}

/// Opens a log and checks it as `mode` says (see the module doc for what is refused).
pub(crate) fn read_log(path: &Path, mode: ReadMode<'_>) -> Result<LogContents, Damage> {
    let io = |op: StateOp, e: io::Error| Damage::Io(io_err(path, op, e));
    let file = File::open(path).map_err(|e| io(StateOp::Open, e))?;
    let size = file.metadata().map_err(|e| io(StateOp::Stat, e))?.len();
    let mut head = vec![0u8; HEADER_MAX.min(size as usize)];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| io(StateOp::Read, e))?;
    if head.len() >= 8 && &head[..8] == MAGIC_V1 {
        return Err(Damage::Untrusted(LogDamage::FormatV1));
    }
    let (epoch, disks, header_len) =
        parse_header(&head).ok_or(Damage::Untrusted(LogDamage::Header))?;
    let mut log = LogContents {
        file,
        epoch,
        last_epoch: epoch,
        disks,
        entries: Vec::new(),
    };
    let replicas = match mode {
        ReadMode::Header => return Ok(log),
        ReadMode::Live { replicas } => Some(replicas),
        ReadMode::Kept => None,
    };
    let bad_at = log.index_entries(path, header_len as u64, size)?;
    let Some(bad_at) = bad_at else {
        return Ok(log);
    };
    let Some(replicas) = replicas else {
        return Err(Damage::Untrusted(LogDamage::KeptTail { bad_at, size }));
    };
    check_torn_tail(&log, bad_at, size, replicas)?;
    Ok(log)
}

impl LogContents {
    /// Indexes the entries from `pos` to `size`, each checked against its hash; where
    /// the first entry that does not check out starts, if any.
    fn index_entries(
        &mut self,
        path: &Path,
        mut pos: u64,
        size: u64,
    ) -> Result<Option<u64>, Damage> {
        let io = |op: StateOp, e: io::Error| Damage::Io(io_err(path, op, e));
        let mut buf = Vec::new();
        let mut h = [0u8; ENTRY_HEADER_LEN];
        loop {
            if pos == size {
                return Ok(None);
            }
            if pos + ENTRY_HEADER_LEN as u64 > size {
                return Ok(Some(pos));
            }
            self.file
                .read_exact_at(&mut h, pos)
                .map_err(|e| io(StateOp::Read, e))?;
            let Some(e) = decode_entry(&h, self.disks.len()) else {
                return Ok(Some(pos));
            };
            let start = pos + ENTRY_HEADER_LEN as u64;
            if let Some(len) = e.zero_len {
                self.entries.push(Entry::Zero {
                    disk: e.disk,
                    offset: e.offset,
                    len,
                });
                pos = start;
                continue;
            }
            if start + e.len as u64 > size {
                return Ok(Some(pos));
            }
            buf.resize(e.len, 0);
            self.file
                .read_exact_at(&mut buf, start)
                .map_err(|e| io(StateOp::Read, e))?;
            if xxh3_64(&buf) != e.data_hash {
                return Ok(Some(pos));
            }
            self.entries.push(Entry::Data {
                disk: e.disk,
                offset: e.offset,
                start,
                len: e.len,
            });
            pos = start + e.len as u64;
        }
    }
}

/// Shows that everything from `bad_at` on is a torn tail: bytes written after the last
/// completed sync, whose replica writes were never issued. Every entry header that can
/// still be found there must not claim a later sync, and its range must still hold its
/// logged bytes on the replica.
fn check_torn_tail(
    log: &LogContents,
    bad_at: u64,
    size: u64,
    replicas: &[Option<&File>],
) -> Result<(), Damage> {
    let untrusted = Damage::Untrusted;
    // The tail is scanned through a bounded window, however long it is (a damaged entry
    // near the start of a large log).
    let mut window = vec![0u8; TAIL_WINDOW.min((size - bad_at) as usize)];
    let (mut win_start, mut win_len) = (0u64, 0usize);
    let mut at = bad_at;
    let mut data = Vec::new();
    while at + ENTRY_HEADER_LEN as u64 <= size {
        if at < win_start || at + ENTRY_HEADER_LEN as u64 > win_start + win_len as u64 {
            win_start = at;
            win_len = ((size - at) as usize).min(window.len());
            log.file
                .read_exact_at(&mut window[..win_len], at)
                .map_err(|e| Damage::Io(io_err(Path::new("undo log"), StateOp::Read, e)))?;
        }
        let i = (at - win_start) as usize;
        let h: &[u8; ENTRY_HEADER_LEN] = window[i..i + ENTRY_HEADER_LEN]
            .try_into()
            .expect("sliced to the header length");
        let Some(e) = decode_entry(h, log.disks.len()) else {
            at += 1;
            continue;
        };
        if e.synced_len > bad_at {
            return Err(untrusted(LogDamage::SyncedPart {
                bad_at,
                entry_at: at,
                synced_len: e.synced_len,
            }));
        }
        let Some(replica) = replicas.get(e.disk).copied().flatten() else {
            return Err(untrusted(LogDamage::UnloggedDisk {
                entry_at: at,
                disk: e.disk,
            }));
        };
        let len = e.zero_len.unwrap_or(e.len as u64);
        // What the replica holds there now must be what the entry logged: then its
        // write never happened and dropping the entry loses nothing.
        let unchanged = if e.zero_len.is_some() {
            range_is_zero(replica, e.offset, len)
        } else {
            data.resize(len as usize, 0);
            replica
                .read_exact_at(&mut data, e.offset)
                .map(|_| xxh3_64(&data) == e.data_hash)
        }
        .map_err(|err| Damage::Io(io_err(Path::new("replica"), StateOp::Read, err)))?;
        if !unchanged {
            return Err(untrusted(LogDamage::ReachedReplica {
                bad_at,
                entry_at: at,
                disk: log.disks[e.disk].name.clone(),
                offset: e.offset,
                len,
            }));
        }
        // Past its data (torn or not): bytes inside it are not entry headers.
        at += (ENTRY_HEADER_LEN + e.len) as u64;
    }
    Ok(())
}

fn range_is_zero(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let end = offset + len;
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut at = offset;
    while at < end {
        // Holes read as zeros: skip to the next data (a block device has no SEEK_DATA
        // and is read whole).
        // SAFETY: lseek on an open descriptor has no memory effects.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                return Ok(true);
            }
        } else {
            at = at.max(data as u64);
            if at >= end {
                return Ok(true);
            }
        }
        let n = ((end - at) as usize).min(buf.len());
        let got = file.read_at(&mut buf[..n], at)?;
        if got == 0 {
            return Ok(true); // past the end reads as zeros after the size is set
        }
        if !crate::protocol::is_zero(&buf[..got]) {
            return Ok(false);
        }
        at += got as u64;
    }
    Ok(true)
}

impl LogContents {
    /// The byte ranges `(offset, len)` of disk `disk` (its index in the log) whose old
    /// bytes the log holds.
    pub(crate) fn ranges(&self, disk: usize) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.entries.iter().filter_map(move |e| match *e {
            Entry::Data {
                disk: d,
                offset,
                len,
                ..
            } if d == disk => Some((offset, len as u64)),
            Entry::Zero {
                disk: d,
                offset,
                len,
            } if d == disk => Some((offset, len)),
            _ => None,
        })
    }

    /// The log file's length in bytes.
    pub(crate) fn file_len(&self) -> io::Result<u64> {
        self.file.metadata().map(|m| m.len())
    }

    /// Writes every entry's old bytes back, newest first, to `files[disk]` (disks
    /// mapped to `None` are skipped).
    pub(crate) fn apply_reversed(&self, files: &[Option<&File>]) -> io::Result<()> {
        let mut buf = Vec::new();
        for entry in self.entries.iter().rev() {
            match *entry {
                Entry::Data {
                    disk,
                    offset,
                    start,
                    len,
                } => {
                    if let Some(f) = files[disk] {
                        buf.resize(len, 0);
                        self.file.read_exact_at(&mut buf, start)?;
                        f.write_all_at(&buf, offset)?;
                    }
                }
                Entry::Zero { disk, offset, len } => {
                    if let Some(f) = files[disk] {
                        zero_fill(f, offset, len)?;
                    }
                }
            }
        }
        Ok(())
    }
}

pub(crate) enum Entry {
    Data {
        disk: usize,
        offset: u64,
        /// Where the old bytes sit in the log file.
        start: u64,
        len: usize,
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
}

/// Makes a range read as zeros: punch a hole, or write zeros where that is refused
/// (block devices, file systems without hole punching).
fn zero_fill(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on an open descriptor has no memory effects.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; (1 << 20).min(len as usize)];
    let mut at = offset;
    while at < offset + len {
        let n = ((offset + len - at) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

fn parse_header(bytes: &[u8]) -> Option<(u64, Vec<UndoDisk>, usize)> {
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return None;
    }
    let epoch = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let count = u32::from_le_bytes(bytes[16..20].try_into().ok()?) as usize;
    let end = 20usize.checked_add(count.checked_mul(HEADER_DISK_LEN)?)?;
    if count > crate::protocol::MAX_DISKS_PER_SESSION || bytes.len() < end + 8 {
        return None;
    }
    if xxh3_64(&bytes[..end]) != u64::from_le_bytes(bytes[end..end + 8].try_into().ok()?) {
        return None;
    }
    let mut disks = Vec::with_capacity(count);
    for i in 0..count {
        let d = &bytes[20 + i * HEADER_DISK_LEN..20 + (i + 1) * HEADER_DISK_LEN];
        let len = (d[0] as usize).min(NAME_LEN);
        let name = std::str::from_utf8(&d[1..1 + len]).ok()?.to_string();
        let at = 1 + NAME_LEN;
        let generation = GenerationId::from_bytes(d[at..at + 16].try_into().ok()?);
        let disk_size = u64::from_le_bytes(d[at + 16..at + 24].try_into().ok()?);
        let logged = d[at + 24] != 0;
        let prev = u64::from_le_bytes(d[at + 25..at + 33].try_into().ok()?);
        disks.push(UndoDisk {
            name,
            generation,
            disk_size,
            logged,
            prev_epoch: (prev != NO_EPOCH).then_some(prev),
        });
    }
    Some((epoch, disks, end + 8))
}

pub(crate) mod stage;

#[cfg(test)]
mod tests;
