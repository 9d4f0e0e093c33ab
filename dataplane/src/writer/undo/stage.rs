//! Staging an epoch's old bytes: reading them from a replica and appending them to the
//! undo log.
//!
//! The applier reads the old bytes of a range, a piece at a time, into one buffer of
//! its own (behind room for the entry header), hashes them there, and writes header
//! and bytes to the log with one `pwrite` from that same buffer, while they are still
//! in this core's cache. [`Stager::sync`] then makes the log durable: the replica
//! writes the entries cover are issued only after it returned.
//!
//! Why not through an I/O engine with the next old bytes read meanwhile (as ferry
//! once did): on a file system whose buffered writes io_uring cannot issue without
//! blocking (tmpfs), every log write goes to the applier's io_uring worker thread,
//! which is the same one that writes the replicas — the log waits behind the replica
//! writes of earlier frames, and each piece crosses to the worker's core to be copied.
//! Where io_uring can issue them at once (XFS, ext4), the write is made on submission,
//! by the applier, exactly as here. Writing in place costs about 0.05 s less target
//! CPU per GiB of full rewrite on tmpfs (benches/staging.sh, medians of five same-run
//! comparisons) and needs one buffer instead of sixteen. What it gives up: a log write
//! that blocks (dirty-page throttling, block allocation) is no longer overlapped with
//! reading the next piece — the `fdatasync` right after waits for it either way.
//!
//! A crash between a write and the next sync leaves the log as any crash before a sync
//! does: entries after the last sync may be missing or torn, and the replica ranges
//! they cover were never written — exactly the torn tail recovery knows.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::{UndoLog, ENTRY_HEADER_LEN, ENTRY_MAX};
use crate::durable::StateOp;
use crate::io::AlignedBuf;
use crate::writer::TargetError;

/// Most old bytes in one entry: small enough that a piece read is still in this core's
/// cache when it is hashed and written out, large enough that the system calls per
/// byte do not count.
pub(crate) const PIECE: usize = 128 << 10;
const _: () = assert!(PIECE <= ENTRY_MAX);

/// Where the old bytes start in the buffer: one cache line in, so the replica's bytes
/// are read to an aligned address; the entry header sits right before them, so header
/// and bytes go to the log in one write.
const DATA_AT: usize = 64;
const HEADER_AT: usize = DATA_AT - ENTRY_HEADER_LEN;

/// Writes undo-log entries for one applier.
pub(crate) struct Stager {
    /// The piece being staged: header room, then up to [`PIECE`] old bytes. Allocated
    /// on first use.
    buf: Option<AlignedBuf>,
    /// A log write failed: the log holds a reserved entry that may be missing or torn,
    /// so it is never synced again (no later entry may claim it durable).
    failed: Option<io::Error>,
}

impl Stager {
    /// A stager with nothing allocated yet.
    pub(crate) fn new() -> Self {
        Stager {
            buf: None,
            failed: None,
        }
    }

    /// Appends the old content of `[offset, offset + len)` of replica `file` (disk
    /// `disk`) to the log: data in entries of at most [`PIECE`] bytes, all-zero pieces
    /// as zero entries without data. With `skip_holes`, the replica's holes are found
    /// with SEEK_DATA and logged as zero entries without being read (SEEK_HOLE is not
    /// used: on some file systems it scans the page cache up to the next hole, which is
    /// quadratic over a dense file). Nothing is durable before [`sync`](Self::sync).
    pub(crate) fn log_range(
        &mut self,
        undo: &mut UndoLog,
        file: &File,
        disk: u32,
        (offset, len): (u64, u64),
        skip_holes: bool,
    ) -> Result<(), TargetError> {
        self.check(undo)?;
        let buf = self
            .buf
            .get_or_insert_with(|| AlignedBuf::zeroed(DATA_AT + PIECE));
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            if skip_holes {
                let next = next_data(file, pos, end);
                if next > pos {
                    undo.append_zero(disk, pos, next - pos)?;
                    pos = next;
                    continue;
                }
            }
            let n = ((end - pos) as usize).min(PIECE);
            let data = &mut buf[DATA_AT..DATA_AT + n];
            file.read_exact_at(data, pos)
                .map_err(|source| TargetError::ReadOldBytes {
                    disk,
                    offset: pos,
                    source,
                })?;
            if crate::protocol::is_zero(data) {
                undo.append_zero(disk, pos, n as u64)?;
            } else {
                let (at, header) = undo.reserve(disk, pos, data);
                buf[HEADER_AT..DATA_AT].copy_from_slice(&header);
                if let Err(e) = undo.write_reserved(&buf[HEADER_AT..DATA_AT + n], at) {
                    let err = append_err(undo, clone_err(&e));
                    self.failed = Some(e);
                    return Err(err);
                }
            }
            pos += n as u64;
        }
        Ok(())
    }

    /// Makes the log durable: replica writes covered by the entries appended so far may
    /// follow.
    pub(crate) fn sync(&mut self, undo: &mut UndoLog) -> Result<(), TargetError> {
        self.check(undo)?;
        undo.sync()
    }

    /// The failure of an earlier log write, again: the log must not be synced past it.
    fn check(&self, undo: &UndoLog) -> Result<(), TargetError> {
        match &self.failed {
            Some(e) => Err(append_err(undo, clone_err(e))),
            None => Ok(()),
        }
    }
}

/// Where data starts at or after `pos` in `file`, at most `end`; `pos` when the file
/// system cannot tell (no SEEK_DATA, a block device).
fn next_data(file: &File, pos: u64, end: u64) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor has no memory effects.
    let data = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        match io::Error::last_os_error().raw_os_error() {
            // A hole to the end of the file.
            Some(libc::ENXIO) => end,
            _ => pos,
        }
    } else {
        (data as u64).min(end)
    }
}

fn clone_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

fn append_err(undo: &UndoLog, source: io::Error) -> TargetError {
    super::io_err(undo.path(), StateOp::Append, source)
}
