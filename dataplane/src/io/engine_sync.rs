//! The synchronous engine: `pread`/`pwrite`/`fdatasync` at submit time, completions
//! queued for `wait`.
//!
//! It is the fallback where io_uring is unavailable and the reference the io_uring engine
//! is tested against, so it follows the same rules (see [`super::engine`]) through the
//! same helpers, and nothing more.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::engine::{
    after_transfer, check_request, is_transient, BlockEngine, Completion, Direction, DiskId,
    IoBuffer, IoOp, Progress, TRANSIENT_RETRIES_MAX,
};
use super::IoError;

/// Block I/O with blocking system calls, behind the [`BlockEngine`] interface.
pub struct SyncEngine<B> {
    /// Duplicates of the caller's descriptors, indexed by [`DiskId`], so the engine never
    /// outlives the files it writes to.
    files: Vec<OwnedFd>,
    /// Completed requests not yet reaped; capacity `queue_depth`, never grown.
    done: VecDeque<Completion<B>>,
    queue_depth: usize,
}

impl<B: IoBuffer> SyncEngine<B> {
    /// Builds an engine over `files` (indexed by [`DiskId`]) with room for `queue_depth`
    /// unreaped completions. The descriptors are duplicated; the caller keeps its own.
    pub fn new(queue_depth: usize, files: &[RawFd]) -> Result<Self, IoError> {
        super::check_engine_config(queue_depth, files)?;
        let mut owned = Vec::with_capacity(files.len());
        for (index, &fd) in files.iter().enumerate() {
            let disk = DiskId(index as u32);
            // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; an invalid `fd`
            // yields EBADF, reported below.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                let source = io::Error::last_os_error();
                return Err(IoError::EngineFile { disk, source });
            }
            // SAFETY: `dup` is a descriptor the kernel just created for us; nothing else
            // owns it, and the `OwnedFd` closes it exactly once.
            owned.push(unsafe { OwnedFd::from_raw_fd(dup) });
        }
        Ok(SyncEngine {
            files: owned,
            done: VecDeque::with_capacity(queue_depth),
            queue_depth,
        })
    }

    fn submit_transfer(
        &mut self,
        dir: Direction,
        disk: DiskId,
        mut buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)> {
        let disks = self.files.len();
        if let Err(err) = check_request(dir.op(), disk, disks, buf.capacity(), offset, len) {
            return Err((err, buf));
        }
        if self.done.len() == self.queue_depth {
            let queue_depth = self.queue_depth;
            return Err((IoError::QueueFull { queue_depth }, buf));
        }
        let fd = self.files[disk.0 as usize].as_raw_fd();
        let result = transfer(fd, dir, disk, &mut buf, offset, len);
        self.done.push_back(Completion {
            tag,
            result,
            buf: Some(buf),
        });
        Ok(())
    }
}

/// Moves `len` bytes between `buf` and `offset` of `fd`, continuing short transfers and
/// retrying transient errors like the io_uring engine does.
fn transfer<B: IoBuffer>(
    fd: RawFd,
    dir: Direction,
    disk: DiskId,
    buf: &mut B,
    offset: u64,
    len: u32,
) -> Result<u32, IoError> {
    let mut done = 0u32;
    let mut retries = 0;
    loop {
        let at = (offset + u64::from(done)) as libc::off_t;
        let remaining = (len - done) as usize;
        let result = match dir {
            Direction::Read => {
                let dst = buf.as_mut_ptr().wrapping_add(done as usize);
                // SAFETY: `check_request` ensured `len <= buf.capacity()`, so `dst` has
                // `remaining` writable bytes (the IoBuffer contract); `buf` is borrowed
                // exclusively for this call, so nothing else touches them meanwhile.
                unsafe { libc::pread(fd, dst.cast(), remaining, at) }
            }
            Direction::Write => {
                let src = buf.as_ptr().wrapping_add(done as usize);
                // SAFETY: as for reads; the kernel only reads `remaining` bytes at `src`.
                unsafe { libc::pwrite(fd, src.cast(), remaining, at) }
            }
        };
        if result < 0 {
            let source = io::Error::last_os_error();
            let errno = source.raw_os_error().unwrap_or(0);
            if is_transient(errno) && retries < TRANSIENT_RETRIES_MAX {
                retries += 1;
                continue;
            }
            return Err(IoError::Request {
                op: dir.op(),
                disk,
                offset,
                len,
                source,
            });
        }
        retries = 0;
        match after_transfer(dir, offset, len, done, result as u32) {
            Progress::Complete(bytes) => return Ok(bytes),
            Progress::Continue(now) => done = now,
            Progress::Stalled => {
                return Err(IoError::NoProgress {
                    op: dir.op(),
                    disk,
                    offset,
                    len,
                    done_bytes: done,
                })
            }
        }
    }
}

fn fdatasync(fd: RawFd, disk: DiskId) -> Result<u32, IoError> {
    let mut retries = 0;
    loop {
        // SAFETY: fdatasync takes no memory; `fd` is owned by the engine.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(0);
        }
        let source = io::Error::last_os_error();
        if is_transient(source.raw_os_error().unwrap_or(0)) && retries < TRANSIENT_RETRIES_MAX {
            retries += 1;
            continue;
        }
        return Err(IoError::Request {
            op: IoOp::Fsync,
            disk,
            offset: 0,
            len: 0,
            source,
        });
    }
}

impl<B> std::fmt::Debug for SyncEngine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncEngine")
            .field("queue_depth", &self.queue_depth)
            .field("unreaped", &self.done.len())
            .field("disks", &self.files.len())
            .finish()
    }
}

impl<B: IoBuffer> BlockEngine<B> for SyncEngine<B> {
    fn submit_read(
        &mut self,
        disk: DiskId,
        buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)> {
        self.submit_transfer(Direction::Read, disk, buf, offset, len, tag)
    }

    fn submit_write(
        &mut self,
        disk: DiskId,
        buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)> {
        self.submit_transfer(Direction::Write, disk, buf, offset, len, tag)
    }

    fn submit_fsync(&mut self, disk: DiskId, tag: u64) -> Result<(), IoError> {
        let Some(file) = self.files.get(disk.0 as usize) else {
            return Err(IoError::InvalidRequest {
                op: IoOp::Fsync,
                disk,
                offset: 0,
                len: 0,
                reason: "no such disk in the engine's file table",
            });
        };
        if self.done.len() == self.queue_depth {
            let queue_depth = self.queue_depth;
            return Err(IoError::QueueFull { queue_depth });
        }
        let result = fdatasync(file.as_raw_fd(), disk);
        self.done.push_back(Completion {
            tag,
            result,
            buf: None,
        });
        Ok(())
    }

    fn wait(&mut self, _min_complete: usize, out: &mut Vec<Completion<B>>) -> Result<(), IoError> {
        // Every request completed at submit time, so all of them satisfy any minimum.
        out.extend(self.done.drain(..));
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn name(&self) -> &'static str {
        "sync"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::test_support::contract;

    fn make<B: IoBuffer>(queue_depth: usize, files: &[RawFd]) -> Option<SyncEngine<B>> {
        Some(SyncEngine::new(queue_depth, files).unwrap())
    }

    #[test]
    fn round_trip_and_fsync() {
        contract::round_trip_and_fsync(make);
    }

    #[test]
    fn short_reads_at_end_of_disk() {
        contract::short_reads_at_end_of_disk(make);
    }

    #[test]
    fn refusals_hand_the_buffer_back() {
        contract::refusals_hand_the_buffer_back(make);
    }

    #[test]
    fn kernel_errors_complete_with_the_buffer() {
        contract::kernel_errors_complete_with_the_buffer(make);
    }

    #[test]
    fn misaligned_direct_io_fails_cleanly() {
        contract::misaligned_direct_io_fails_cleanly(make, make);
    }

    #[test]
    fn bad_descriptor_is_reported_at_build() {
        let err = SyncEngine::<crate::io::AlignedBuf>::new(4, &[-1])
            .err()
            .unwrap();
        assert!(matches!(err, IoError::EngineFile { .. }), "{err}");
    }
}
