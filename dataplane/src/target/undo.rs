//! Atomic epochs on the target: an undo log of the replica bytes an epoch overwrites.
//!
//! Before a block of a replica that holds an acknowledged epoch is overwritten, its old
//! bytes are appended to the session's undo log and the log is made durable. Commit
//! makes the replicas durable, then durably marks the log committed, then records the
//! new epoch per disk, then deletes the log. Whatever instant the target dies at,
//! [`recover`] finds the replicas either before the commit mark — and rolls every
//! disk of the group back to its previous epoch, byte for byte — or after it — and
//! rolls the records forward. A replica therefore always reads as exactly one
//! acknowledged epoch, and the disks of a session move together.
//!
//! File layout (little-endian): a header of `MAGIC`, `epoch u64`, `disk_count u32`,
//! then per disk `name_len u8`, `name [64]`, `generation [16]`, `disk_size u64`, and an
//! xxh3-64 of everything before it; then entries of `ENTRY_MAGIC u32`, `disk u32`,
//! `offset u64`, `len u32`, `reserved u32`, `data_hash u64` (xxh3-64 of the data),
//! `entry_hash u64` (xxh3-64 of the 32 bytes before it), then `len` bytes of old data.
//! A torn last entry fails its checks and is ignored: its replica write was never
//! issued, since writes wait for the entry to be durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use xxhash_rust::xxh3::xxh3_64;

use super::state::ReplicaRecord;
use super::TargetError;

const MAGIC: &[u8; 8] = b"FRYUNDO1";
const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"UNDE");
const ENTRY_HEADER_LEN: usize = 40;
/// Entry flag: the range read as zeros; no data follows, the length is in the data-hash
/// field.
const FLAG_ZERO: u32 = 1;
const NAME_LEN: usize = 64;
/// Largest single entry: one write of the applier (a frame's worth of blocks).
const ENTRY_MAX: usize = 8 << 20;

/// Directory of in-progress undo logs under the target's state dir.
pub fn undo_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("undo")
}

/// One disk of the session, as its record will read after the commit.
#[derive(Debug, Clone)]
pub struct UndoDisk {
    pub name: String,
    pub generation: [u8; 16],
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
    /// Entries appended since the last sync.
    dirty: bool,
}

fn io_err(path: &Path, what: &str, e: io::Error) -> TargetError {
    TargetError::State {
        path: path.to_path_buf(),
        problem: format!("{what}: {e}"),
    }
}

impl UndoLog {
    /// Creates the log for `epoch`, durable (file and directory entry) on return.
    pub fn create(state_dir: &Path, epoch: u64, disks: Vec<UndoDisk>) -> Result<Self, TargetError> {
        let dir = undo_dir(state_dir);
        crate::durable::ensure_dir(&dir).map_err(|e| io_err(&dir, "create", e))?;
        // Epochs count per disk lineage, so concurrent sessions for different disks can
        // apply the same epoch number: a random suffix keeps their logs apart.
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).map_err(|e| {
            io_err(
                &dir,
                "draw a log name",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let stem = format!("{epoch:020}-{:08x}", u32::from_le_bytes(nonce));
        let path = dir.join(format!("{stem}.undo"));
        let marker = dir.join(format!("{stem}.committed"));
        let mut header = Vec::with_capacity(32 + disks.len() * 96);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&epoch.to_le_bytes());
        header.extend_from_slice(&(disks.len() as u32).to_le_bytes());
        for d in &disks {
            let mut name = [0u8; NAME_LEN];
            name[..d.name.len()].copy_from_slice(d.name.as_bytes());
            header.push(d.name.len() as u8);
            header.extend_from_slice(&name);
            header.extend_from_slice(&d.generation);
            header.extend_from_slice(&d.disk_size.to_le_bytes());
        }
        let h = xxh3_64(&header);
        header.extend_from_slice(&h.to_le_bytes());
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_err(&path, "create", e))?;
        file.write_all(&header)
            .map_err(|e| io_err(&path, "write header", e))?;
        file.sync_all().map_err(|e| io_err(&path, "fsync", e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(&dir, "fsync directory", e))?;
        Ok(UndoLog {
            file,
            path,
            marker,
            state_dir: state_dir.to_path_buf(),
            epoch,
            disks,
            dirty: false,
        })
    }

    /// Whether old bytes of `disk` must be logged before it is overwritten.
    pub fn logs(&self, disk: u32) -> bool {
        self.disks.get(disk as usize).is_some_and(|d| d.logged)
    }

    /// Appends the old bytes of `[offset, offset + data.len())` of `disk`.
    pub fn append(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), TargetError> {
        assert!(data.len() <= ENTRY_MAX, "undo entry larger than one write");
        let mut h = [0u8; ENTRY_HEADER_LEN];
        h[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&disk.to_le_bytes());
        h[8..16].copy_from_slice(&offset.to_le_bytes());
        h[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
        h[24..32].copy_from_slice(&xxh3_64(data).to_le_bytes());
        let eh = xxh3_64(&h[..32]);
        h[32..40].copy_from_slice(&eh.to_le_bytes());
        self.file
            .write_all(&h)
            .and_then(|_| self.file.write_all(data))
            .map_err(|e| io_err(&self.path, "append", e))?;
        self.dirty = true;
        Ok(())
    }

    /// Records that `[offset, offset + len)` of `disk` read as zeros before this epoch.
    pub fn append_zero(&mut self, disk: u32, offset: u64, len: u64) -> Result<(), TargetError> {
        let mut h = [0u8; ENTRY_HEADER_LEN];
        h[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&disk.to_le_bytes());
        h[8..16].copy_from_slice(&offset.to_le_bytes());
        // A zero entry's length may exceed u32: it lives in the data-hash field.
        h[20..24].copy_from_slice(&FLAG_ZERO.to_le_bytes());
        h[24..32].copy_from_slice(&len.to_le_bytes());
        let eh = xxh3_64(&h[..32]);
        h[32..40].copy_from_slice(&eh.to_le_bytes());
        self.file
            .write_all(&h)
            .map_err(|e| io_err(&self.path, "append", e))?;
        self.dirty = true;
        Ok(())
    }

    /// Makes every appended entry durable. Replica writes covered by them may follow.
    pub fn sync(&mut self) -> Result<(), TargetError> {
        if self.dirty {
            self.file
                .sync_data()
                .map_err(|e| io_err(&self.path, "fdatasync", e))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// The commit point, called once the replicas are durable: marks the log
    /// committed, records the new epoch on every disk, and removes the log.
    /// The log then becomes a recovery point (see [`super::points`]); `keep` prunes
    /// the points beyond the retention.
    pub fn commit(self, keep: &super::points::Retention) -> Result<(), TargetError> {
        crate::durable::write_atomic(&self.marker, &self.epoch.to_le_bytes())
            .map_err(|e| io_err(&self.marker, "write commit mark", e))?;
        write_records(&self.state_dir, self.epoch, &self.disks)?;
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        drop(self.file);
        super::points::keep_log(
            &self.state_dir,
            self.epoch,
            &self.path,
            &self.disks,
            size,
            keep,
        )?;
        remove_marker(&self.marker)
    }
}

impl UndoLog {
    /// Undoes this (uncommitted) epoch now: restores every logged byte and removes the
    /// log. Used when a session fails while the target keeps running.
    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disks the log covers.
    pub fn disk_names(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.name.clone()).collect()
    }

    pub fn roll_back(
        self,
        replica_path: &dyn Fn(&str) -> Option<PathBuf>,
    ) -> Result<Recovery, TargetError> {
        let UndoLog {
            file,
            path,
            state_dir,
            ..
        } = self;
        drop(file);
        recover_one(&state_dir, &path, replica_path)
    }
}

fn write_records(state_dir: &Path, epoch: u64, disks: &[UndoDisk]) -> Result<(), TargetError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for d in disks {
        ReplicaRecord {
            generation: crate::protocol::hex16(&d.generation),
            epoch,
            disk_size: d.disk_size,
            committed_unix_s: now,
        }
        .save(state_dir, &d.name)?;
    }
    Ok(())
}

fn remove_marker(marker: &Path) -> Result<(), TargetError> {
    match fs::remove_file(marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(marker, "remove", e)),
    }
}

fn remove(path: &Path, marker: &Path) -> Result<(), TargetError> {
    fs::remove_file(path).map_err(|e| io_err(path, "remove", e))?;
    match fs::remove_file(marker) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(marker, "remove", e)),
    }
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, "fsync directory", e))?;
    }
    Ok(())
}

/// What [`recover`] did to one log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The epoch had not committed: every disk was restored to its previous epoch.
    RolledBack {
        epoch: u64,
        entries: usize,
        disks: Vec<String>,
    },
    /// The epoch had committed: the records were completed.
    RolledForward { epoch: u64, disks: Vec<String> },
}

/// Finishes or undoes every interrupted epoch found in `state_dir`. `replica_path`
/// maps a disk name to its configured replica. Must run before any session.
pub fn recover(
    state_dir: &Path,
    replica_path: &dyn Fn(&str) -> Option<PathBuf>,
) -> Result<Vec<Recovery>, TargetError> {
    let dir = undo_dir(state_dir);
    let mut logs: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "undo"))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir, "read", e)),
    };
    // Newest first: undoing a later epoch before an earlier one restores in order.
    logs.sort();
    logs.reverse();
    let mut done = Vec::new();
    for path in logs {
        done.push(recover_one(state_dir, &path, replica_path)?);
    }
    Ok(done)
}

pub(crate) fn recover_one(
    state_dir: &Path,
    path: &Path,
    replica_path: &dyn Fn(&str) -> Option<PathBuf>,
) -> Result<Recovery, TargetError> {
    let bad = |problem: String| TargetError::State {
        path: path.to_path_buf(),
        problem,
    };
    let log = read_log(path).map_err(|_| {
        bad(
            "undo log header is damaged; refusing to guess (the replicas may be between epochs)"
                .into(),
        )
    })?;
    let marker = path.with_extension("committed");
    let names: Vec<String> = log.disks.iter().map(|d| d.name.clone()).collect();
    if marker.exists() {
        write_records(state_dir, log.epoch, &log.disks)?;
        remove(path, &marker)?;
        return Ok(Recovery::RolledForward {
            epoch: log.epoch,
            disks: names,
        });
    }
    let mut files = Vec::with_capacity(log.disks.len());
    for d in &log.disks {
        let p = replica_path(&d.name).ok_or_else(|| {
            bad(format!("disk {:?} of an interrupted epoch is no longer configured; restore its [[disk]] entry to recover", d.name))
        })?;
        files.push(
            OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| io_err(&p, "open replica for rollback", e))?,
        );
    }
    let targets: Vec<Option<&File>> = files.iter().map(Some).collect();
    log.apply_reversed(&targets)
        .map_err(|e| io_err(path, "roll back", e))?;
    for f in &files {
        f.sync_data()
            .map_err(|e| io_err(path, "fsync replica after rollback", e))?;
    }
    remove(path, &marker)?;
    Ok(Recovery::RolledBack {
        epoch: log.epoch,
        entries: log.entries.len(),
        disks: names,
    })
}

/// Largest log header: 256 disks of 89 bytes plus the fixed part and the checksum.
const HEADER_MAX: usize = 20 + crate::protocol::MAX_DISKS_PER_SESSION * (1 + NAME_LEN + 16 + 8) + 8;

/// A log opened for reading: its header and an index of its valid entries. The data
/// stays in the file and is read one entry at a time, so memory does not grow with the
/// size of an epoch (the index holds 32 bytes per entry of up to 4 MiB).
pub(crate) struct LogContents {
    file: File,
    pub epoch: u64,
    pub disks: Vec<UndoDisk>,
    pub entries: Vec<Entry>,
}

/// Opens a log: parses its header and indexes the valid entries, stopping at the first
/// damaged one (the torn tail). Every data entry's checksum is verified here.
pub(crate) fn read_log(path: &Path) -> Result<LogContents, TargetError> {
    let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
    let size = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
    let mut head = vec![0u8; HEADER_MAX.min(size as usize)];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| io_err(path, "read", e))?;
    let (epoch, disks, header_len) = parse_header(&head).ok_or_else(|| TargetError::State {
        path: path.to_path_buf(),
        problem: "undo log header is damaged".into(),
    })?;
    let mut entries = Vec::new();
    let mut buf = Vec::new();
    let mut pos = header_len as u64;
    let mut h = [0u8; ENTRY_HEADER_LEN];
    while pos + ENTRY_HEADER_LEN as u64 <= size {
        if file.read_exact_at(&mut h, pos).is_err() {
            break;
        }
        let word = |a: usize| u64::from_le_bytes(h[a..a + 8].try_into().expect("8 bytes"));
        let half = |a: usize| u32::from_le_bytes(h[a..a + 4].try_into().expect("4 bytes"));
        if half(0) != ENTRY_MAGIC || xxh3_64(&h[..32]) != word(32) {
            break;
        }
        let disk = half(4) as usize;
        let offset = word(8);
        let start = pos + ENTRY_HEADER_LEN as u64;
        if disk >= disks.len() {
            break;
        }
        if half(20) == FLAG_ZERO {
            entries.push(Entry::Zero {
                disk,
                offset,
                len: word(24),
            });
            pos = start;
            continue;
        }
        let len = half(16) as usize;
        if len > ENTRY_MAX || start + len as u64 > size {
            break;
        }
        buf.resize(len, 0);
        if file.read_exact_at(&mut buf, start).is_err() || xxh3_64(&buf) != word(24) {
            break;
        }
        entries.push(Entry::Data {
            disk,
            offset,
            start,
            len,
        });
        pos = start + len as u64;
    }
    Ok(LogContents {
        file,
        epoch,
        disks,
        entries,
    })
}

impl LogContents {
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
    let per_disk = 1 + NAME_LEN + 16 + 8;
    let end = 20usize.checked_add(count.checked_mul(per_disk)?)?;
    if count > crate::protocol::MAX_DISKS_PER_SESSION || bytes.len() < end + 8 {
        return None;
    }
    if xxh3_64(&bytes[..end]) != u64::from_le_bytes(bytes[end..end + 8].try_into().ok()?) {
        return None;
    }
    let mut disks = Vec::with_capacity(count);
    for i in 0..count {
        let at = 20 + i * per_disk;
        let len = (bytes[at] as usize).min(NAME_LEN);
        let name = std::str::from_utf8(&bytes[at + 1..at + 1 + len])
            .ok()?
            .to_string();
        let generation: [u8; 16] = bytes[at + 1 + NAME_LEN..at + 1 + NAME_LEN + 16]
            .try_into()
            .ok()?;
        let disk_size = u64::from_le_bytes(
            bytes[at + 1 + NAME_LEN + 16..at + per_disk]
                .try_into()
                .ok()?,
        );
        disks.push(UndoDisk {
            name,
            generation,
            disk_size,
            logged: true,
            prev_epoch: None,
        });
    }
    Some((epoch, disks, end + 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str) -> UndoDisk {
        UndoDisk {
            name: name.into(),
            generation: [3; 16],
            disk_size: 1 << 20,
            logged: true,
            prev_epoch: Some(1),
        }
    }

    #[test]
    fn uncommitted_epoch_rolls_back_byte_for_byte_even_with_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let replica = dir.path().join("a.img");
        let old: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        fs::write(&replica, &old).unwrap();
        let mut log = UndoLog::create(dir.path(), 7, vec![disk("a")]).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&replica)
            .unwrap();
        for (off, len) in [(0u64, 65536usize), (131072, 4096), (0, 4096)] {
            let mut cur = vec![0u8; len];
            f.read_exact_at(&mut cur, off).unwrap();
            log.append(0, off, &cur).unwrap();
            log.sync().unwrap();
            f.write_all_at(&vec![0xEE; len], off).unwrap();
        }
        // A torn entry at the tail: its write never happened.
        log.file.write_all(&[0x55; 17]).unwrap();
        drop(log);
        let lookup = |n: &str| (n == "a").then(|| replica.clone());
        let done = recover(dir.path(), &lookup).unwrap();
        assert_eq!(
            done,
            vec![Recovery::RolledBack {
                epoch: 7,
                entries: 3,
                disks: vec!["a".into()]
            }]
        );
        assert_eq!(fs::read(&replica).unwrap(), old);
        assert!(
            recover(dir.path(), &lookup).unwrap().is_empty(),
            "log removed"
        );
    }

    #[test]
    fn committed_epoch_rolls_records_forward() {
        let dir = tempfile::tempdir().unwrap();
        let log = UndoLog::create(dir.path(), 9, vec![disk("a"), disk("b")]).unwrap();
        // Crash after the commit mark, before the records: simulate by writing the mark only.
        crate::durable::write_atomic(&log.marker, &9u64.to_le_bytes()).unwrap();
        drop(log);
        let done = recover(dir.path(), &|_| None).unwrap();
        assert_eq!(
            done,
            vec![Recovery::RolledForward {
                epoch: 9,
                disks: vec!["a".into(), "b".into()]
            }]
        );
        for n in ["a", "b"] {
            assert_eq!(
                ReplicaRecord::load(dir.path(), n).unwrap().unwrap().epoch,
                9
            );
        }
    }

    #[test]
    fn damaged_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = UndoLog::create(dir.path(), 1, vec![disk("a")]).unwrap();
        let path = log.path.clone();
        drop(log);
        let mut b = fs::read(&path).unwrap();
        b[25] ^= 1;
        fs::write(&path, b).unwrap();
        assert!(recover(dir.path(), &|_| None).is_err());
    }
}
