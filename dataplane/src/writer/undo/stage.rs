//! Staging an epoch's old bytes: reading them from a replica and appending them to the
//! undo log, with the log's writes in flight while the next old bytes are read.
//!
//! The applier reads the old bytes of a range into a buffer of its own (behind room for
//! the entry header), reserves the entry in the log, and hands header and bytes to an I/O
//! engine over the log as one write; it goes on with the next range (or frame) at once.
//! [`Stager::sync`] waits for every such write, then makes the log durable: the replica
//! writes the entries cover are issued only after it returned, as before. Memory is
//! bounded: at most [`DEPTH`] buffers of [`PIECE`] bytes, allocated on first use.
//!
//! A crash while log writes are in flight leaves the log as any crash before a sync
//! does: entries after the last sync may be missing or torn, in any order, and the
//! replica ranges they cover were never written — exactly the torn tail recovery knows.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::{UndoLog, ENTRY_HEADER_LEN, ENTRY_MAX};
use crate::durable::StateOp;
use crate::io::{self as dio, AlignedBuf, BlockEngine, Completion, DiskId, EngineKind, IoError};
use crate::writer::TargetError;

/// Most old bytes in one entry written through the engine.
pub(crate) const PIECE: usize = 128 << 10;
/// Log writes in flight at most (and buffers allocated at most).
pub(crate) const DEPTH: usize = 16;
const _: () = assert!(PIECE <= ENTRY_MAX);

/// Where the old bytes start in a buffer: after the entry header, so header and bytes
/// go to the log in one write.
const DATA_AT: usize = ENTRY_HEADER_LEN;

/// Writes undo-log entries with an I/O engine while the applier reads the next old
/// bytes. One per applier; its engine is dropped (every write reaped) with it.
pub(crate) struct Stager {
    engine: dio::Engine<AlignedBuf>,
    /// Buffers not in flight.
    free: Vec<AlignedBuf>,
    /// Buffers allocated so far (at most [`DEPTH`]).
    allocated: usize,
    completions: Vec<Completion<AlignedBuf>>,
    /// The first log write that failed; the log is not synced after it.
    failed: Option<io::Error>,
}

impl Stager {
    /// An engine of `kind` over the log's descriptor.
    pub(crate) fn new(kind: EngineKind, log: &UndoLog) -> Result<Self, IoError> {
        let engine = dio::open_engine(kind, DEPTH, &[log.fd()], None)?;
        Ok(Stager {
            engine,
            free: Vec::with_capacity(DEPTH),
            allocated: 0,
            completions: Vec::with_capacity(DEPTH),
            failed: None,
        })
    }

    /// Appends the old content of `[offset, offset + len)` of replica `file` (disk
    /// `disk`) to the log: data in entries of at most [`PIECE`] bytes written through the
    /// engine, all-zero pieces as zero entries without data. With `skip_holes`, the
    /// replica's holes are found with SEEK_DATA and logged as zero entries without being
    /// read (SEEK_HOLE is not used: on some file systems it scans the page cache up to
    /// the next hole, which is quadratic over a dense file). Nothing is durable before
    /// [`sync`](Self::sync).
    pub(crate) fn log_range(
        &mut self,
        undo: &mut UndoLog,
        file: &File,
        disk: u32,
        (offset, len): (u64, u64),
        skip_holes: bool,
    ) -> Result<(), TargetError> {
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
            let mut buf = self.buffer(undo)?;
            let data = &mut buf[DATA_AT..DATA_AT + n];
            if let Err(source) = file.read_exact_at(data, pos) {
                // The buffer goes back to the free list: the stager stays whole.
                self.free.push(buf);
                return Err(TargetError::ReadOldBytes {
                    disk,
                    offset: pos,
                    source,
                });
            }
            if crate::protocol::is_zero(data) {
                self.free.push(buf);
                undo.append_zero(disk, pos, n as u64)?;
            } else {
                let (at, header) = undo.reserve(disk, pos, data);
                buf[..DATA_AT].copy_from_slice(&header);
                self.write(undo, buf, at, DATA_AT + n)?;
            }
            pos += n as u64;
        }
        Ok(())
    }

    /// Waits for every log write, then makes the log durable: replica writes covered by
    /// the entries appended so far may follow.
    pub(crate) fn sync(&mut self, undo: &mut UndoLog) -> Result<(), TargetError> {
        while self.engine.in_flight() > 0 {
            self.reap(undo, self.engine.in_flight())?;
        }
        if let Some(e) = &self.failed {
            return Err(append_err(undo, clone_err(e)));
        }
        undo.sync()
    }

    /// A buffer for the next piece: a free one, a new one while fewer than [`DEPTH`]
    /// exist, else the next one a completed write hands back.
    fn buffer(&mut self, undo: &UndoLog) -> Result<AlignedBuf, TargetError> {
        loop {
            if let Some(b) = self.free.pop() {
                return Ok(b);
            }
            if self.allocated < DEPTH {
                self.allocated += 1;
                return Ok(AlignedBuf::zeroed(DATA_AT + PIECE));
            }
            self.reap(undo, 1)?;
        }
    }

    /// Submits the first `len` bytes of `buf` as a write at `at` of the log.
    fn write(
        &mut self,
        undo: &UndoLog,
        buf: AlignedBuf,
        at: u64,
        len: usize,
    ) -> Result<(), TargetError> {
        if let Some(e) = &self.failed {
            self.free.push(buf);
            return Err(append_err(undo, clone_err(e)));
        }
        let mut buf = Some(buf);
        loop {
            if self.engine.in_flight() >= self.engine.queue_depth() {
                self.reap(undo, 1)?;
            }
            let b = buf.take().expect("buffer present");
            match self.engine.submit_write(DiskId(0), b, at, len as u32, at) {
                Ok(()) => return Ok(()),
                Err((IoError::QueueFull { .. }, b)) => buf = Some(b),
                Err((e, b)) => {
                    self.free.push(b);
                    return Err(append_err(undo, to_io(&e)));
                }
            }
        }
    }

    /// Collects at least `min` completions; their buffers go back to the free list. A
    /// failed write is remembered (and reported by the next `write` or `sync`); a failed
    /// engine is returned at once.
    fn reap(&mut self, undo: &UndoLog, min: usize) -> Result<(), TargetError> {
        self.completions.clear();
        self.engine
            .wait(min, &mut self.completions)
            .map_err(|e| append_err(undo, to_io(&e)))?;
        for c in self.completions.drain(..) {
            if let Err(e) = c.result {
                self.failed.get_or_insert_with(|| to_io(&e));
            }
            if let Some(b) = c.buf {
                self.free.push(b);
            }
        }
        Ok(())
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

fn to_io(e: &IoError) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::other(e.to_string()),
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
