//! The one error type of the I/O layer.
//!
//! Every variant carries what an operator needs to find the problem — the disk (path or
//! engine index), the operation, the offset — and, when a system call failed, the raw
//! errno as `source`. Display names the errno symbolically (`EIO (errno 5)`) and, where
//! the cause is usually the same, the likely fix; the errno's own description stays in
//! the source chain and is not repeated.

use std::fmt;
use std::io;
use std::path::PathBuf;

use ferry_io::uring::UringError;
use ferry_io::Errno;

use super::disk::DiskOp;
use super::engine::{DiskId, IoOp};

/// Errors from opening disks, walking their extents and running I/O engines.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A system call on a disk (open, stat, ioctl, fallocate, pwrite, fdatasync, lseek)
    /// failed.
    #[error(
        "{op} {}{}: {}{}",
        .path.display(),
        OffsetSuffix(*.offset),
        Errno(.source),
        disk_hint(*.op, .source)
    )]
    Disk {
        op: DiskOp,
        path: PathBuf,
        /// Byte offset the operation worked on, when it has one.
        offset: Option<u64>,
        #[source]
        source: io::Error,
    },

    /// The path names something that cannot hold a disk image.
    #[error("{} is a {file_type}, not a regular file or a block device", .path.display())]
    NotADisk {
        path: PathBuf,
        file_type: &'static str,
    },

    /// A replica block device cannot hold the source disk.
    #[error(
        "replica device {} holds {device_bytes} bytes but the source disk needs \
         {required_bytes}: configure a device at least as large",
        .path.display()
    )]
    ReplicaTooSmall {
        path: PathBuf,
        device_bytes: u64,
        required_bytes: u64,
    },

    /// A replica image file is larger than the source disk. Shrinking it could destroy
    /// data that belongs to something else, so it is refused.
    #[error(
        "replica file {} is {file_bytes} bytes, larger than the source disk's \
         {required_bytes}: refusing to truncate it; check that the disk names match on \
         both sides, or move the file away to start a fresh replica",
        .path.display()
    )]
    ReplicaSizeMismatch {
        path: PathBuf,
        file_bytes: u64,
        required_bytes: u64,
    },

    /// A byte range reaches past the end of the disk.
    #[error(
        "{op} of {len_bytes} bytes at offset {offset} is outside {} ({size_bytes} bytes)",
        .path.display()
    )]
    OutOfRange {
        op: DiskOp,
        path: PathBuf,
        offset: u64,
        len_bytes: u64,
        size_bytes: u64,
    },

    /// A read, write or fdatasync submitted to an engine failed in the kernel.
    #[error(
        "{op} of {len} bytes at offset {offset} on {disk} failed: {}{}",
        Errno(.source),
        request_hint(.source)
    )]
    Request {
        op: IoOp,
        disk: DiskId,
        offset: u64,
        len: u32,
        #[source]
        source: io::Error,
    },

    /// A write (or a continued read) transferred zero bytes without an error, so
    /// retrying would loop forever.
    #[error(
        "{op} of {len} bytes at offset {offset} on {disk} stopped after {done_bytes} bytes: \
         the kernel accepted no more data (is the replica's file system full?)"
    )]
    NoProgress {
        op: IoOp,
        disk: DiskId,
        offset: u64,
        len: u32,
        done_bytes: u32,
    },

    /// The engine refused a request before it reached the kernel.
    #[error("refused {op} of {len} bytes at offset {offset} on {disk}: {reason}")]
    InvalidRequest {
        op: IoOp,
        disk: DiskId,
        offset: u64,
        len: u32,
        reason: &'static str,
    },

    /// Every slot of the engine is in flight. This is back-pressure, not a failure: reap
    /// completions with `wait` and submit again.
    #[error(
        "all {queue_depth} queue slots are in flight; reap completions before submitting more"
    )]
    QueueFull { queue_depth: usize },

    /// The engine was asked for something it cannot be built with.
    #[error("invalid I/O engine configuration: {reason}")]
    InvalidConfig { reason: &'static str },

    /// A file descriptor handed to an engine is unusable.
    #[error("cannot use the file descriptor of {disk}: {}", Errno(.source))]
    EngineFile {
        disk: DiskId,
        #[source]
        source: io::Error,
    },

    /// io_uring cannot serve the engine here (setup, registration, a missing opcode).
    #[error(transparent)]
    Uring(#[from] UringError),

    /// `io_uring_enter` (submitting or waiting) failed.
    #[error("io_uring_enter failed: {}{}", Errno(.source), enter_hint(.source))]
    Submit {
        #[source]
        source: io::Error,
    },
}

impl IoError {
    /// The raw errno behind this error, if a system call produced it.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            IoError::Disk { source, .. }
            | IoError::Request { source, .. }
            | IoError::EngineFile { source, .. }
            | IoError::Submit { source } => source.raw_os_error(),
            IoError::Uring(e) => e.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the error says io_uring cannot be used here at all, so that falling back
    /// to the synchronous engine is the right reaction.
    pub fn is_uring_unavailable(&self) -> bool {
        matches!(self, IoError::Uring(_))
    }
}

fn enter_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EEXIST) => {
            " (the ring is single-issuer: use and drop the engine on the thread that first \
             submitted to it)"
        }
        _ => "",
    }
}

fn request_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EINVAL) => {
            " (with O_DIRECT the buffer address, offset and length must be multiples of the \
             logical block size; ferry aligns them to 4096 bytes)"
        }
        Some(libc::EBADF) => " (the disk is not open for this operation; sources are read-only)",
        Some(libc::EFAULT) => " (the buffer is not inside the registered buffer it names)",
        Some(libc::ENOSPC) => " (the file system holding the replica is full)",
        _ => "",
    }
}

fn disk_hint(op: DiskOp, source: &io::Error) -> &'static str {
    match (op, source.raw_os_error()) {
        (DiskOp::Create, Some(libc::ENOENT)) => "; create the parent directory first",
        (DiskOp::Open, Some(libc::ENOENT)) => "; check the configured path",
        (DiskOp::Open | DiskOp::Create, Some(libc::EACCES) | Some(libc::EPERM)) => {
            "; run ferry as a user allowed to open it"
        }
        (DiskOp::Open | DiskOp::Create, Some(libc::EROFS)) => "; the file system is read-only",
        (DiskOp::Open, Some(libc::EBUSY)) => "; the device is held exclusively (mounted?)",
        (DiskOp::Truncate, Some(libc::EFBIG)) => "; the file system cannot hold a file this large",
        (_, Some(libc::ENOSPC)) => "; the file system is full",
        (DiskOp::WriteZeros, Some(libc::EINVAL)) => {
            "; with O_DIRECT the range must be aligned to the logical block size"
        }
        (DiskOp::ZeroOut, Some(libc::EINVAL)) => {
            "; BLKZEROOUT needs offset and length aligned to the logical block size"
        }
        _ => "",
    }
}

struct OffsetSuffix(Option<u64>);

impl fmt::Display for OffsetSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(offset) => write!(f, " at offset {offset}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_operation_errno_and_fix() {
        let err = IoError::from(UringError::setup(io::Error::from_raw_os_error(libc::EPERM)));
        let text = err.to_string();
        assert!(text.contains("EPERM (errno 1)"), "{text}");
        assert!(text.contains("sysctl kernel.io_uring_disabled=0"), "{text}");

        let err = IoError::Request {
            op: IoOp::Write,
            disk: DiskId(3),
            offset: 8192,
            len: 4096,
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        assert_eq!(
            err.to_string(),
            "write of 4096 bytes at offset 8192 on disk #3 failed: EIO (errno 5)"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }
}
