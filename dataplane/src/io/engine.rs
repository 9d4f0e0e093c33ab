//! The seam between the data path and the kernel: one small trait, [`BlockEngine`], with
//! an io_uring implementation ([`super::UringEngine`]) and a synchronous one
//! ([`super::SyncEngine`]) beside it.
//!
//! # Buffer ownership
//!
//! Buffers travel by value. `submit_read`/`submit_write` take the buffer; from then on the
//! engine owns it — it sits in the engine's in-flight table, and the kernel may write into
//! it at any moment — until [`BlockEngine::wait`] reaps the request's completion and hands
//! the buffer back in [`Completion::buf`]. A request the engine refuses hands its buffer
//! straight back with the error (`Err((IoError, B))`). No path drops or leaks a caller's
//! buffer, except that an io_uring engine dropped while it cannot reap its in-flight
//! requests leaks their buffers rather than free memory the kernel may still write.
//!
//! # Semantics shared by both engines
//!
//! - A read or write completes with the number of bytes transferred. Short transfers are
//!   continued until the request is complete. A read may complete short only at the end
//!   of the disk: when the kernel reports end of file, or when a transfer stops at an
//!   offset that is not a multiple of 512 (with O_DIRECT that happens only at end of file,
//!   and continuing from there would fail with `EINVAL`). The caller decides what a short
//!   read means.
//! - `EINTR` and `EAGAIN` are retried (up to [`TRANSIENT_RETRIES_MAX`] times in a row);
//!   every other errno completes the request with [`IoError::Request`].
//! - `submit_fsync` is `fdatasync` of the whole disk. It is not ordered against requests
//!   still in flight: it covers the writes whose completions were reaped before it was
//!   submitted.

use std::fmt;

use super::IoError;

/// Index of a disk in the file table an engine was built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskId(pub u32);

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "disk #{}", self.0)
    }
}

/// The operation of a request, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    Fsync,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Fsync => "fdatasync",
        })
    }
}

/// A buffer the caller owns and lends to an engine for one request.
///
/// The pool slots of the data path implement it (the slot's index in the pool is its
/// registered-buffer index); [`super::AlignedBuf`] implements it for everything else.
///
/// # Safety
///
/// The engine hands the pointers to the kernel, which writes (reads) through them
/// asynchronously, after the value has been moved into the engine's in-flight table.
/// Implementors promise that
/// - `as_ptr` and `as_mut_ptr` return the same address on every call, and that address
///   does not change when the value is moved: the bytes live outside the value (heap or
///   pool memory), never inline in it;
/// - that address is valid for reads and writes of `capacity()` bytes from the moment the
///   value is created until it is dropped;
/// - while an engine owns the value, nothing else reads or writes those bytes.
///
/// `fixed_index` returning `Some(i)` promises that the `capacity()` bytes lie inside the
/// buffer registered with the engine at index `i`. Getting that wrong is not unsafe: the
/// kernel checks the range and fails the request with `EFAULT`.
pub unsafe trait IoBuffer: Send {
    /// Start of the bytes, for writes to the disk.
    fn as_ptr(&self) -> *const u8;
    /// Start of the bytes, for reads from the disk.
    fn as_mut_ptr(&mut self) -> *mut u8;
    /// Number of usable bytes at that address.
    fn capacity(&self) -> usize;
    /// The registered io_uring buffer containing the bytes, if any.
    fn fixed_index(&self) -> Option<u16>;
}

/// The outcome of one request, with its buffer handed back.
#[derive(Debug)]
pub struct Completion<B> {
    /// The caller's tag from the submit call.
    pub tag: u64,
    /// Bytes transferred (0 for fdatasync), or why the request failed.
    pub result: Result<u32, IoError>,
    /// The buffer of a read or write; `None` for fdatasync.
    pub buf: Option<B>,
}

/// Asynchronous block I/O on a fixed table of disks, with at most `queue_depth()` requests
/// in flight.
///
/// Buffers travel by value: a submitted buffer is owned by the engine — kept in its
/// in-flight table, the kernel may write it at any moment — until `wait` reaps the
/// completion and hands it back in [`Completion::buf`]; a refused request hands it back
/// at once in `Err((IoError, B))`.
///
/// Reads and writes complete with the bytes transferred; short transfers are continued
/// until done, except that a read stops short at the end of the disk (end of file, or a
/// transfer ending off a 512-byte boundary, which O_DIRECT produces only at end of file).
/// `EINTR`/`EAGAIN` are retried up to [`TRANSIENT_RETRIES_MAX`] times in a row; other
/// errnos complete the request with [`IoError::Request`]. `submit_fsync` is `fdatasync`
/// and covers the writes reaped before it was submitted, not those still in flight.
pub trait BlockEngine<B: IoBuffer> {
    /// Queues a read of `len` bytes at `offset` of `disk` into the start of `buf`.
    ///
    /// The request reaches the kernel no later than the next [`wait`](Self::wait). On
    /// refusal (full queue, unknown disk, `len` zero or beyond the buffer's capacity)
    /// the buffer comes back with the error.
    fn submit_read(
        &mut self,
        disk: DiskId,
        buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)>;

    /// Queues a write of the first `len` bytes of `buf` at `offset` of `disk`. Otherwise
    /// as [`submit_read`](Self::submit_read).
    fn submit_write(
        &mut self,
        disk: DiskId,
        buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)>;

    /// Queues an fdatasync of `disk`. It covers writes already reaped, not those in flight.
    fn submit_fsync(&mut self, disk: DiskId, tag: u64) -> Result<(), IoError>;

    /// Submits everything queued, then appends completions to `out` until at least
    /// `min(min_complete, in_flight())` requests completed; `min_complete == 0` only
    /// collects what is already done. Give `out` a capacity of `queue_depth()` to keep
    /// the call free of allocation.
    ///
    /// An error here concerns the engine itself (the ring), not a request; requests
    /// stay in flight and a later `wait` can reap them.
    fn wait(&mut self, min_complete: usize, out: &mut Vec<Completion<B>>) -> Result<(), IoError>;

    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// The most requests that can be in flight at once.
    fn queue_depth(&self) -> usize;

    /// Short name for logs: `"io_uring"` or `"sync"`.
    fn name(&self) -> &'static str;
}

/// How many times in a row `EINTR`/`EAGAIN` is retried before the request fails. A
/// transient condition that persists this long is not transient; the bound keeps a
/// confused device from spinning the I/O thread forever.
pub const TRANSIENT_RETRIES_MAX: u32 = 64;

/// Granularity at which O_DIRECT transfers can stop before end of file: the smallest
/// logical block size Linux supports.
const SECTOR_BYTES: u64 = 512;

/// Which way a read or write moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Read,
    Write,
}

impl Direction {
    pub(super) fn op(self) -> IoOp {
        match self {
            Direction::Read => IoOp::Read,
            Direction::Write => IoOp::Write,
        }
    }
}

/// Whether an errno is worth retrying unchanged.
pub(super) fn is_transient(errno: i32) -> bool {
    errno == libc::EINTR || errno == libc::EAGAIN
}

/// What to do after the kernel transferred `transferred` more bytes of a read or write of
/// `len` bytes at `offset` of which `done` were transferred before.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Progress {
    /// The request is complete with this many bytes.
    Complete(u32),
    /// Continue with the remainder; the new `done` count is given.
    Continue(u32),
    /// A write made no progress: fail it with [`IoError::NoProgress`].
    Stalled,
}

pub(super) fn after_transfer(
    dir: Direction,
    offset: u64,
    len: u32,
    done: u32,
    transferred: u32,
) -> Progress {
    debug_assert!(done < len && transferred <= len - done);
    let done_now = done + transferred.min(len - done);
    if done_now == len {
        return Progress::Complete(len);
    }
    match dir {
        Direction::Read if transferred == 0 => Progress::Complete(done_now),
        Direction::Read if !(offset + u64::from(done_now)).is_multiple_of(SECTOR_BYTES) => {
            Progress::Complete(done_now)
        }
        Direction::Write if transferred == 0 => Progress::Stalled,
        _ => Progress::Continue(done_now),
    }
}

/// The checks both engines make before accepting a read or write.
pub(super) fn check_request(
    op: IoOp,
    disk: DiskId,
    disks: usize,
    capacity: usize,
    offset: u64,
    len: u32,
) -> Result<(), IoError> {
    let reason = if disk.0 as usize >= disks {
        "no such disk in the engine's file table"
    } else if len == 0 {
        "zero-length request"
    } else if len as usize > capacity {
        "length exceeds the buffer's capacity"
    } else if offset > i64::MAX as u64 - u64::from(len) {
        "range ends beyond the largest file offset"
    } else {
        return Ok(());
    };
    Err(IoError::InvalidRequest {
        op,
        disk,
        offset,
        len,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_transfers() {
        use Direction::{Read, Write};
        use Progress::*;
        assert_eq!(after_transfer(Read, 0, 8192, 0, 8192), Complete(8192));
        assert_eq!(after_transfer(Read, 0, 8192, 0, 4096), Continue(4096));
        assert_eq!(after_transfer(Read, 0, 8192, 4096, 0), Complete(4096));
        // Stopped mid-sector: only end of file does that; continuing would be unaligned.
        assert_eq!(after_transfer(Read, 8192, 4096, 0, 1808), Complete(1808));
        assert_eq!(after_transfer(Read, 8192, 4096, 0, 512), Continue(512));
        assert_eq!(after_transfer(Write, 0, 8192, 0, 100), Continue(100));
        assert_eq!(after_transfer(Write, 0, 8192, 100, 0), Stalled);
    }

    #[test]
    fn requests_are_checked() {
        let ok = check_request(IoOp::Read, DiskId(0), 1, 4096, 0, 4096);
        assert!(ok.is_ok());
        for (disk, cap, offset, len) in [
            (1, 4096, 0, 4096),
            (0, 4096, 0, 0),
            (0, 4096, 0, 8192),
            (0, 4096, u64::MAX - 10, 4096),
            (0, 4096, i64::MAX as u64, 1),
        ] {
            let err = check_request(IoOp::Write, DiskId(disk), 1, cap, offset, len);
            assert!(
                matches!(err, Err(IoError::InvalidRequest { .. })),
                "{err:?}"
            );
        }
    }
}
