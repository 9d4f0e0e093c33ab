//! The backing image or block device behind an export: positional reads and writes,
//! hole punching, zeroing, syncing and allocation queries.
//!
//! All I/O is positional (`pread`/`pwrite`), so any number of worker threads share
//! one descriptor without a lock. I/O goes through the page cache, like `qemu-nbd
//! --cache=writeback`; durability comes from `fdatasync` on FLUSH and FUA.
//!
//! Two engines drive the data path of a connection ([`IoEngine`]): a pool of worker
//! threads calling the methods below, or one thread per connection with an io_uring
//! (`nbd::engine::uring`) that issues the same operations on [`Backing::as_raw_fd`].

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::nbd::proto::{ZeroMode, STATE_HOLE, STATE_ZERO};

/// Zeros written when the file system cannot zero a range by itself. 1 MiB: large
/// enough that a fallback zeroing loop makes few system calls, small enough to live in
/// `.bss` without anyone noticing.
pub(crate) const ZERO_CHUNK_BYTES: usize = 1 << 20;
pub(crate) static ZEROS: [u8; ZERO_CHUNK_BYTES] = [0; ZERO_CHUNK_BYTES];

/// How the backing store is driven: the `[source] io_engine` key of `ferry shim`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IoEngine {
    /// io_uring when the kernel allows it (probed once at start), else the thread
    /// pool, with one warning.
    #[default]
    Auto,
    /// io_uring, or refuse to start.
    Uring,
    /// The thread pool: `pread`/`pwrite` from worker threads. The reference path.
    Sync,
}

impl IoEngine {
    /// The variable that overrides the configured engine (tests run every suite with
    /// each engine through it; operators can force the fallback without editing a
    /// config).
    pub const ENV: &'static str = "FERRY_SHIM_IO_ENGINE";

    /// The engine named by [`IoEngine::ENV`], if set.
    pub fn from_env() -> Result<Option<IoEngine>, IoEngineEnvError> {
        match std::env::var(Self::ENV) {
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => v.parse().map(Some).map_err(IoEngineEnvError::Unknown),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(IoEngineEnvError::Unreadable(e)),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IoEngine::Auto => "auto",
            IoEngine::Uring => "uring",
            IoEngine::Sync => "sync",
        }
    }
}

impl fmt::Display for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for IoEngine {
    type Err = UnknownIoEngine;
    fn from_str(s: &str) -> Result<IoEngine, UnknownIoEngine> {
        match s.trim() {
            "auto" => Ok(IoEngine::Auto),
            "uring" | "io_uring" => Ok(IoEngine::Uring),
            "sync" => Ok(IoEngine::Sync),
            other => Err(UnknownIoEngine {
                value: other.to_string(),
            }),
        }
    }
}

/// A name that is no [`IoEngine`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown I/O engine `{value}` (auto, uring or sync)")]
pub struct UnknownIoEngine {
    /// The name as given, trimmed.
    pub value: String,
}

/// [`IoEngine::ENV`] is set but names no engine. The `Display` text is the variable's
/// name; the reason is the source, so the chain reads
/// `FERRY_SHIM_IO_ENGINE: unknown I/O engine ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoEngineEnvError {
    #[error("FERRY_SHIM_IO_ENGINE")]
    Unknown(#[source] UnknownIoEngine),
    /// Not Unicode.
    #[error("FERRY_SHIM_IO_ENGINE")]
    Unreadable(#[source] std::env::VarError),
}

/// Whether the backing store is a regular file or a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    File,
    BlockDevice,
}

/// Who the backing store is, as far as change tracking cares: if any of this changed
/// while no shim was running, the bitmap no longer describes the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub size_bytes: u64,
    pub dev: u64,
    pub ino: u64,
    /// Device number for a block device, 0 for a file.
    pub rdev: u64,
    pub mtime_ns: i128,
}

/// An open backing store.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    kind: BackingKind,
    size_bytes: u64,
}

/// Whether a `fallocate` error means "this store cannot do that" (then TRIM is a no-op
/// and zeroing falls back to writing zeros) rather than a failure.
pub(crate) fn fallocate_unsupported(errno: i32) -> bool {
    matches!(
        errno,
        libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV
    )
}

fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl Backing {
    /// Opens `path` read-write and measures it.
    pub fn open(path: &Path) -> io::Result<Backing> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let meta = file.metadata()?;
        let (kind, size_bytes) = if meta.file_type().is_block_device() {
            (BackingKind::BlockDevice, file.seek(SeekFrom::End(0))?)
        } else if meta.is_file() {
            (BackingKind::File, meta.len())
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            ));
        };
        Ok(Backing {
            file,
            path: path.to_path_buf(),
            kind,
            size_bytes,
        })
    }

    /// Wraps an already open store (tests: a descriptor opened read-only makes every
    /// write fail).
    #[cfg(test)]
    pub(crate) fn from_file(file: File, path: &Path) -> io::Result<Backing> {
        let size_bytes = file.metadata()?.len();
        Ok(Backing {
            file,
            path: path.to_path_buf(),
            kind: BackingKind::File,
            size_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The identity as it is now (mtime moves with every write).
    pub fn identity(&self) -> io::Result<Identity> {
        let meta = self.file.metadata()?;
        Ok(Identity {
            size_bytes: self.size_bytes,
            dev: meta.dev(),
            ino: meta.ino(),
            rdev: meta.rdev(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // read_exact_at retries EINTR itself; a short read means the file shrank under
        // us, which it reports as UnexpectedEof.
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    pub fn sync_data(&self) -> io::Result<()> {
        retry_eintr(|| self.file.sync_data())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        retry_eintr(|| {
            // SAFETY: fallocate(2) takes a descriptor we own (borrowed from `self.file`
            // for the duration of the call) and plain integers; no memory is shared.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        })
    }

    fn unsupported(err: &io::Error) -> bool {
        err.raw_os_error().is_some_and(fallocate_unsupported)
    }

    /// Discards a range if the store can. TRIM is a hint, so "cannot" is success.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(Self::TRIM_FLAGS, offset, len) {
            Err(e) if Self::unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes a range read as zeros, punching it when allowed, else zeroing it in place,
    /// else writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(Self::zero_flags(mode), offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if Self::unsupported(&e) => {}
            Err(e) => return Err(e),
        }
        self.write_zero_bytes(offset, len)
    }

    /// Writes zeros over a range without deallocating anything (while an epoch is
    /// frozen, a range must not turn into a hole under the engine).
    pub fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK_BYTES as u64) as usize;
            self.write_at(&ZEROS[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Flags of the `fallocate` that [`Backing::trim`] issues.
    pub(crate) const TRIM_FLAGS: libc::c_int =
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

    /// Flags of the `fallocate` that [`Backing::write_zeroes`] tries first.
    pub(crate) fn zero_flags(mode: ZeroMode) -> libc::c_int {
        match mode {
            ZeroMode::MayPunch => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ZeroMode::Allocate => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }

    fn lseek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek(2) on a descriptor borrowed from `self.file` for the call. It
        // moves the shared file position, which nothing here uses: all data I/O is
        // positional.
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        }
    }

    /// Reports `base:allocation` extents covering `offset..offset + len` (clipped to
    /// it) through `emit(length, flags)`, at most `max_extents` of them. Returns the
    /// number emitted (at least one). Where the store cannot tell, it says "data"
    /// (flags 0), which the spec allows for any block.
    pub fn extents(
        &self,
        offset: u64,
        len: u32,
        max_extents: usize,
        mut emit: impl FnMut(u32, u32),
    ) -> usize {
        let end = offset + u64::from(len);
        let mut pos = offset;
        let mut emitted = 0;
        while pos < end && emitted < max_extents {
            let (extent_end, flags) = match self.lseek(pos, libc::SEEK_DATA) {
                Ok(None) => (end, STATE_HOLE | STATE_ZERO),
                Ok(Some(data)) if data > pos => (data.min(end), STATE_HOLE | STATE_ZERO),
                Ok(Some(_)) => match self.lseek(pos, libc::SEEK_HOLE) {
                    Ok(Some(hole)) if hole > pos => (hole.min(end), 0),
                    _ => (end, 0),
                },
                Err(_) => (end, 0),
            };
            emit((extent_end - pos) as u32, flags);
            emitted += 1;
            pos = extent_end;
        }
        emitted
    }
}

impl AsRawFd for Backing {
    /// The store's descriptor, for the io_uring engine (which registers it with each
    /// connection's ring). Valid as long as the `Backing` lives.
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_parse_and_an_unknown_one_is_named_in_the_old_words() {
        assert_eq!(" io_uring ".parse::<IoEngine>(), Ok(IoEngine::Uring));
        assert_eq!("sync".parse::<IoEngine>(), Ok(IoEngine::Sync));
        let e = " fast ".parse::<IoEngine>().unwrap_err();
        assert_eq!(e.value, "fast");
        let env = IoEngineEnvError::Unknown(e);
        let source = std::error::Error::source(&env).map(ToString::to_string);
        assert_eq!(
            format!("{env}: {}", source.unwrap_or_default()),
            "FERRY_SHIM_IO_ENGINE: unknown I/O engine `fast` (auto, uring or sync)"
        );
    }
}
