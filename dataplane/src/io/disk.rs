//! An opened disk: an image file or a block device, source (read-only) or replica
//! (read-write).
//!
//! Disks are opened with `O_DIRECT` whenever the file system accepts it, so replication
//! neither pollutes nor depends on the page cache: what a replica write completes is on
//! its way to the device, and what `sync_data` acknowledges is durable.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;
use tracing::{debug, info, warn};

use super::engine::{is_transient, TRANSIENT_RETRIES_MAX};
use super::{AlignedBuf, IoError};

// BLKGETSIZE64 = _IOR(0x12, 114, size_t): the device size in bytes (a u64 on the 64-bit
// targets ferry supports).
nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
// BLKZEROOUT = _IO(0x12, 127) taking `[start, len]` in bytes.
nix::ioctl_write_ptr_bad!(blk_zero_out, nix::request_code_none!(0x12, 127), [u64; 2]);

const _: () = assert!(
    std::mem::size_of::<usize>() == 8,
    "BLKGETSIZE64 writes a size_t; ferry reads it as u64"
);

/// Bytes of zeros written per system call when a disk can neither punch holes nor
/// BLKZEROOUT: 1 MiB reaches device speed on every device we measured and is allocated
/// only once per disk, only if the fallback is ever taken.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

const _: () = assert!(ZERO_CHUNK_BYTES.is_multiple_of(super::DIRECT_IO_ALIGN));

/// Permission bits of a replica file ferry creates: it holds a copy of someone's disk.
const REPLICA_FILE_MODE: u32 = 0o600;

/// What backs a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A regular (image) file; may be sparse.
    File,
    /// A block device; its first `size()` bytes are the disk.
    BlockDevice,
}

/// Whether I/O bypasses the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Opened with `O_DIRECT`: buffers, offsets and lengths must be aligned (see
    /// [`super::DIRECT_IO_ALIGN`]).
    Direct,
    /// The file system refused `O_DIRECT` (`EINVAL`); I/O goes through the page cache.
    Buffered,
}

/// What [`Disk::open_replica`] found at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// The file did not exist and was created at the required size: it reads as zeros.
    Created,
    /// The file or device existed; its content is whatever it held (a file that was
    /// too small was grown, the new tail reads as zeros).
    Existing,
}

/// The system call a [`IoError::Disk`] error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    Open,
    Create,
    Stat,
    GetSize,
    Truncate,
    SyncDir,
    ZeroRange,
    PunchHole,
    ZeroOut,
    WriteZeros,
    SyncData,
    SeekData,
    SeekHole,
}

impl fmt::Display for DiskOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskOp::Open => "open",
            DiskOp::Create => "create",
            DiskOp::Stat => "fstat",
            DiskOp::GetSize => "ioctl(BLKGETSIZE64)",
            DiskOp::Truncate => "ftruncate",
            DiskOp::SyncDir => "fsync of the directory holding",
            DiskOp::ZeroRange => "zero range",
            DiskOp::PunchHole => "fallocate(PUNCH_HOLE)",
            DiskOp::ZeroOut => "ioctl(BLKZEROOUT)",
            DiskOp::WriteZeros => "writing zeros to",
            DiskOp::SyncData => "fdatasync",
            DiskOp::SeekData => "lseek(SEEK_DATA)",
            DiskOp::SeekHole => "lseek(SEEK_HOLE)",
        })
    }
}

/// Whether a disk is opened for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadOnly,
    ReadWrite,
}

/// An opened image file or block device.
pub struct Disk {
    file: File,
    path: PathBuf,
    kind: DiskKind,
    cache: CacheMode,
    /// Bytes of the disk: the file or device size for a source, the required size for a
    /// replica (a larger replica device holds the disk in its first `size_bytes`).
    size_bytes: u64,
    /// Aligned zeros for `zero_range` on disks that can neither punch holes nor
    /// BLKZEROOUT; allocated on first use.
    zeros: OnceLock<AlignedBuf>,
}

impl Disk {
    /// Opens a source disk read-only, with `O_DIRECT` unless the file system refuses it.
    pub fn open_source(path: impl AsRef<Path>) -> Result<Disk, IoError> {
        let path = path.as_ref();
        let (file, cache) = open_preferring_direct(path, Access::ReadOnly)?;
        let (kind, size_bytes) = identify(&file, path)?;
        debug!(path = %path.display(), ?kind, ?cache, size_bytes, "opened source disk");
        Ok(Disk::new(file, path, kind, cache, size_bytes))
    }

    /// Opens (creating if needed) the replica of a disk of `required_size` bytes,
    /// read-write, with `O_DIRECT` unless the file system refuses it.
    ///
    /// A missing path becomes a new file of `required_size` bytes (mode 0600; the parent
    /// directory must exist) and [`ReplicaState::Created`]. An existing smaller file is
    /// grown; a larger file is refused ([`IoError::ReplicaSizeMismatch`]). A block device
    /// must hold at least `required_size` bytes ([`IoError::ReplicaTooSmall`]); only its
    /// first `required_size` bytes are used.
    pub fn open_replica(
        path: impl AsRef<Path>,
        required_size: u64,
    ) -> Result<(Disk, ReplicaState), IoError> {
        let path = path.as_ref();
        let created = create_if_missing(path)?;
        let opened = Disk::open_replica_existing(path, required_size, created);
        if created && opened.is_err() {
            // Leave no half-made replica behind to be mistaken for an existing one.
            let _ = std::fs::remove_file(path);
        }
        opened
    }

    fn open_replica_existing(
        path: &Path,
        required_size: u64,
        created: bool,
    ) -> Result<(Disk, ReplicaState), IoError> {
        let (file, cache) = open_preferring_direct(path, Access::ReadWrite)?;
        let (kind, found_bytes) = identify(&file, path)?;
        let state = match kind {
            DiskKind::BlockDevice => {
                if found_bytes < required_size {
                    return Err(IoError::ReplicaTooSmall {
                        path: path.to_owned(),
                        device_bytes: found_bytes,
                        required_bytes: required_size,
                    });
                }
                ReplicaState::Existing
            }
            DiskKind::File if found_bytes > required_size => {
                return Err(IoError::ReplicaSizeMismatch {
                    path: path.to_owned(),
                    file_bytes: found_bytes,
                    required_bytes: required_size,
                });
            }
            DiskKind::File => {
                if found_bytes < required_size {
                    set_len(&file, path, required_size)?;
                    if !created {
                        info!(
                            path = %path.display(),
                            from_bytes = found_bytes,
                            to_bytes = required_size,
                            "grew replica file to the source disk's size"
                        );
                    }
                }
                if created {
                    // The new directory entry must be durable before anything written to
                    // the file is acknowledged.
                    sync_parent_dir(path)?;
                    ReplicaState::Created
                } else {
                    ReplicaState::Existing
                }
            }
        };
        debug!(path = %path.display(), ?kind, ?cache, ?state, required_size, "opened replica disk");
        Ok((Disk::new(file, path, kind, cache, required_size), state))
    }

    fn new(file: File, path: &Path, kind: DiskKind, cache: CacheMode, size_bytes: u64) -> Disk {
        Disk {
            file,
            path: path.to_owned(),
            kind,
            cache,
            size_bytes,
            zeros: OnceLock::new(),
        }
    }

    /// Makes `len` bytes at `offset` read back as zeros: a punched hole in a file,
    /// BLKZEROOUT on a block device, or — where those are unsupported — written zeros
    /// (with O_DIRECT the range must then be aligned to the logical block size).
    /// Not durable until [`sync_data`](Self::sync_data), and not ordered against engine
    /// requests in flight on the same range: reap those first.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let past_end = match offset.checked_add(len) {
            Some(end) => end > self.size_bytes,
            None => true,
        };
        if past_end {
            return Err(IoError::OutOfRange {
                op: DiskOp::ZeroRange,
                path: self.path.clone(),
                offset,
                len_bytes: len,
                size_bytes: self.size_bytes,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let (op, attempt) = match self.kind {
            DiskKind::File => (DiskOp::PunchHole, self.punch_hole(offset, len)),
            DiskKind::BlockDevice => (DiskOp::ZeroOut, self.blk_zero_out(offset, len)),
        };
        match attempt {
            Ok(()) => Ok(()),
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::ENOTTY) => {
                debug!(path = %self.path.display(), %op, "unsupported here; writing zeros instead");
                self.write_zeros(offset, len)
            }
            Err(errno) => Err(self.error(op, Some(offset), errno.into())),
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Errno> {
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        // Range checked against size_bytes, which is at most i64::MAX (a file size).
        retry_transient(|| nix::fcntl::fallocate(self.fd(), mode, offset as i64, len as i64))
    }

    fn blk_zero_out(&self, offset: u64, len: u64) -> Result<(), Errno> {
        let range = [offset, len];
        retry_transient(|| {
            // SAFETY: BLKZEROOUT reads two u64 from the pointer during the call; `range`
            // lives on this stack frame until the call returns. `self.file` is an open
            // block device (kind checked by the caller).
            unsafe { blk_zero_out(self.fd(), &range) }.map(drop)
        })
    }

    fn write_zeros(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let zeros = self
            .zeros
            .get_or_init(|| AlignedBuf::zeroed(ZERO_CHUNK_BYTES));
        let end = offset + len;
        let mut pos = offset;
        let mut retries = 0;
        while pos < end {
            let chunk = (end - pos).min(ZERO_CHUNK_BYTES as u64) as usize;
            match nix::sys::uio::pwrite(&self.file, &zeros[..chunk], pos as i64) {
                Ok(0) => {
                    let source = io::Error::from(io::ErrorKind::WriteZero);
                    return Err(self.error(DiskOp::WriteZeros, Some(pos), source));
                }
                Ok(written) => {
                    pos += written as u64;
                    retries = 0;
                }
                Err(errno) if is_transient(errno as i32) && retries < TRANSIENT_RETRIES_MAX => {
                    retries += 1;
                }
                Err(errno) => return Err(self.error(DiskOp::WriteZeros, Some(pos), errno.into())),
            }
        }
        Ok(())
    }

    /// `fdatasync`: everything written before is durable when this returns, for block
    /// devices too (it flushes the device's volatile cache).
    pub fn sync_data(&self) -> Result<(), IoError> {
        retry_transient(|| nix::unistd::fdatasync(self.fd()))
            .map_err(|errno| self.error(DiskOp::SyncData, None, errno.into()))
    }

    /// The raw file descriptor, owned by this `Disk` for as long as it lives.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The path the disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the disk in bytes (for a replica, the required size).
    pub fn size(&self) -> u64 {
        self.size_bytes
    }

    /// What backs the disk.
    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    /// Whether the disk is opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.cache == CacheMode::Direct
    }

    pub(super) fn error(&self, op: DiskOp, offset: Option<u64>, source: io::Error) -> IoError {
        IoError::Disk {
            op,
            path: self.path.clone(),
            offset,
            source,
        }
    }
}

impl AsFd for Disk {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Disk {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.path)
            .field("fd", &self.fd())
            .field("kind", &self.kind)
            .field("cache", &self.cache)
            .field("size_bytes", &self.size_bytes)
            .finish()
    }
}

fn retry_transient(mut call: impl FnMut() -> nix::Result<()>) -> Result<(), Errno> {
    let mut retries = 0;
    loop {
        match call() {
            Err(errno) if is_transient(errno as i32) && retries < TRANSIENT_RETRIES_MAX => {
                retries += 1;
            }
            other => return other,
        }
    }
}

fn disk_error(op: DiskOp, path: &Path, source: io::Error) -> IoError {
    IoError::Disk {
        op,
        path: path.to_owned(),
        offset: None,
        source,
    }
}

/// Opens with `O_DIRECT`, or without it if the file system answers `EINVAL` (it does not
/// support direct I/O).
fn open_preferring_direct(path: &Path, access: Access) -> Result<(File, CacheMode), IoError> {
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        Ok(file) => Ok((file, CacheMode::Direct)),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            warn!(
                path = %path.display(),
                "the file system refuses O_DIRECT; using buffered I/O through the page cache"
            );
            let file = open(0).map_err(|source| disk_error(DiskOp::Open, path, source))?;
            Ok((file, CacheMode::Buffered))
        }
        Err(source) => Err(disk_error(DiskOp::Open, path, source)),
    }
}

/// Creates an empty replica file unless the path exists. Returns whether it created one.
fn create_if_missing(path: &Path) -> Result<bool, IoError> {
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(REPLICA_FILE_MODE)
        .custom_flags(libc::O_CLOEXEC)
        .open(path);
    match created {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(disk_error(DiskOp::Create, path, source)),
    }
}

/// Tells a file from a block device and measures it, by path (opened read-only for the
/// call).
pub fn identify_path(path: &Path) -> Result<(DiskKind, u64), IoError> {
    let file = File::open(path).map_err(|source| disk_error(DiskOp::Open, path, source))?;
    identify(&file, path)
}

/// Tells a file from a block device and measures it.
fn identify(file: &File, path: &Path) -> Result<(DiskKind, u64), IoError> {
    let meta = file
        .metadata()
        .map_err(|source| disk_error(DiskOp::Stat, path, source))?;
    let file_type = meta.file_type();
    if file_type.is_file() {
        return Ok((DiskKind::File, meta.len()));
    }
    if file_type.is_block_device() {
        let mut size_bytes = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer during the call;
        // `size_bytes` lives on this stack frame until it returns. `file` is an open block
        // device (checked just above).
        unsafe { blk_get_size64(file.as_raw_fd(), &mut size_bytes) }
            .map_err(|errno| disk_error(DiskOp::GetSize, path, errno.into()))?;
        return Ok((DiskKind::BlockDevice, size_bytes));
    }
    let described = if file_type.is_dir() {
        "directory"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Err(IoError::NotADisk {
        path: path.to_owned(),
        file_type: described,
    })
}

fn set_len(file: &File, path: &Path, size_bytes: u64) -> Result<(), IoError> {
    file.set_len(size_bytes).map_err(|source| IoError::Disk {
        op: DiskOp::Truncate,
        path: path.to_owned(),
        offset: Some(size_bytes),
        source,
    })
}

fn sync_parent_dir(path: &Path) -> Result<(), IoError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| disk_error(DiskOp::SyncDir, path, source))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

    use super::*;
    use crate::io::test_support::{LoopDevice, Skip};

    const MIB: u64 = 1 << 20;

    fn read_all(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn source_file_is_direct_read_only_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src.img");
        std::fs::write(&path, vec![7u8; 12_288]).unwrap();

        let disk = Disk::open_source(&path).unwrap();
        assert_eq!(disk.kind(), DiskKind::File);
        assert_eq!(disk.size(), 12_288);
        assert_eq!(disk.path(), path);
        // The temp dir is on ext4 or tmpfs here, both of which take O_DIRECT.
        assert!(disk.is_direct(), "{disk:?}");
        // SAFETY: F_GETFL only reads the descriptor's flags; `disk` keeps the fd open.
        let flags = unsafe { libc::fcntl(disk.fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
        assert_ne!(flags & libc::O_DIRECT, 0);
        // SAFETY: as above, F_GETFD only reads the descriptor flags.
        let fd_flags = unsafe { libc::fcntl(disk.fd(), libc::F_GETFD) };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn source_errors_name_path_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        let err = Disk::open_source(&missing).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let text = err.to_string();
        assert!(
            text.contains("missing.img") && text.contains("ENOENT"),
            "{text}"
        );

        let err = Disk::open_source(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                IoError::NotADisk {
                    file_type: "directory",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn replica_is_created_zeroed_private_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        let (disk, state) = Disk::open_replica(&path, 3 * MIB).unwrap();
        assert_eq!(state, ReplicaState::Created);
        assert_eq!(disk.size(), 3 * MIB);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 3 * MIB);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(read_all(&path).iter().all(|&b| b == 0));
        drop(disk);

        // Opening again finds it.
        let (_, state) = Disk::open_replica(&path, 3 * MIB).unwrap();
        assert_eq!(state, ReplicaState::Existing);
    }

    #[test]
    fn replica_needs_its_parent_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("replica.img");
        let err = Disk::open_replica(&path, MIB).unwrap_err();
        assert!(
            matches!(
                err,
                IoError::Disk {
                    op: DiskOp::Create,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("create the parent directory"),
            "{err}"
        );
    }

    #[test]
    fn smaller_replica_file_grows_and_keeps_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        std::fs::write(&path, vec![0xabu8; 8192]).unwrap();

        let (disk, state) = Disk::open_replica(&path, 2 * MIB).unwrap();
        assert_eq!(state, ReplicaState::Existing);
        assert_eq!(disk.size(), 2 * MIB);
        let bytes = read_all(&path);
        assert_eq!(bytes.len() as u64, 2 * MIB);
        assert!(bytes[..8192].iter().all(|&b| b == 0xab));
        assert!(bytes[8192..].iter().all(|&b| b == 0));
    }

    #[test]
    fn larger_replica_file_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        std::fs::write(&path, vec![1u8; 16_384]).unwrap();

        let err = Disk::open_replica(&path, 8192).unwrap_err();
        match &err {
            IoError::ReplicaSizeMismatch {
                file_bytes,
                required_bytes,
                ..
            } => assert_eq!((*file_bytes, *required_bytes), (16_384, 8192)),
            other => panic!("expected a size mismatch, got {other}"),
        }
        assert!(err.to_string().contains("refusing to truncate"), "{err}");
        assert_eq!(read_all(&path), vec![1u8; 16_384]);
    }

    #[test]
    fn zero_range_punches_a_file_and_reads_back_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        std::fs::write(&path, vec![0x5au8; 4 * MIB as usize]).unwrap();
        let (disk, _) = Disk::open_replica(&path, 4 * MIB).unwrap();
        let blocks_before = std::fs::metadata(&path).unwrap().blocks();

        disk.zero_range(MIB, 2 * MIB).unwrap();
        disk.sync_data().unwrap();

        let bytes = read_all(&path);
        assert!(bytes[..MIB as usize].iter().all(|&b| b == 0x5a));
        assert!(bytes[MIB as usize..3 * MIB as usize]
            .iter()
            .all(|&b| b == 0));
        assert!(bytes[3 * MIB as usize..].iter().all(|&b| b == 0x5a));
        let blocks_after = std::fs::metadata(&path).unwrap().blocks();
        assert!(
            blocks_after < blocks_before,
            "punching 2 MiB freed nothing: {blocks_before} -> {blocks_after} blocks"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * MIB);
    }

    #[test]
    fn zero_range_refuses_ranges_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open_replica(dir.path().join("r.img"), MIB).unwrap();
        for (offset, len) in [(MIB - 4096, 8192), (u64::MAX, 2), (MIB + 4096, 0)] {
            let err = disk.zero_range(offset, len).unwrap_err();
            assert!(matches!(err, IoError::OutOfRange { .. }), "{err}");
        }
        disk.zero_range(MIB, 0).unwrap();
    }

    #[test]
    fn zero_writing_fallback_reads_back_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        let len = 3 * MIB + 8192;
        std::fs::write(&path, vec![0xeeu8; len as usize]).unwrap();
        let (disk, _) = Disk::open_replica(&path, len).unwrap();

        // Spans several ZERO_CHUNK_BYTES chunks and ends off a chunk boundary.
        disk.write_zeros(4096, 2 * MIB + 8192).unwrap();
        disk.sync_data().unwrap();

        let bytes = read_all(&path);
        assert!(bytes[..4096].iter().all(|&b| b == 0xee));
        assert!(bytes[4096..(2 * MIB + 12_288) as usize]
            .iter()
            .all(|&b| b == 0));
        assert!(bytes[(2 * MIB + 12_288) as usize..]
            .iter()
            .all(|&b| b == 0xee));
    }

    #[test]
    fn block_device_source_replica_and_zeroing() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        std::fs::write(&backing, vec![0x33u8; 4 * MIB as usize]).unwrap();
        let dev = match LoopDevice::attach(&backing) {
            Ok(dev) => dev,
            Err(Skip(why)) => {
                ferry_io::require::skip(ferry_io::require::Feature::Loop, why);
                return;
            }
        };

        let source = Disk::open_source(dev.path()).unwrap();
        assert_eq!(source.kind(), DiskKind::BlockDevice);
        assert_eq!(source.size(), 4 * MIB);
        drop(source);

        let err = Disk::open_replica(dev.path(), 4 * MIB + 4096).unwrap_err();
        match err {
            IoError::ReplicaTooSmall {
                device_bytes,
                required_bytes,
                ..
            } => assert_eq!((device_bytes, required_bytes), (4 * MIB, 4 * MIB + 4096)),
            other => panic!("expected ReplicaTooSmall, got {other}"),
        }

        // A larger device is fine; the replica is its first 2 MiB.
        let (replica, state) = Disk::open_replica(dev.path(), 2 * MIB).unwrap();
        assert_eq!(state, ReplicaState::Existing);
        assert_eq!(replica.size(), 2 * MIB);
        assert_eq!(replica.kind(), DiskKind::BlockDevice);

        replica.zero_range(4096, MIB).unwrap();
        replica.sync_data().unwrap();
        let mut bytes = AlignedBuf::zeroed(2 * MIB as usize);
        replica.file.read_exact_at(&mut bytes, 0).unwrap();
        assert!(bytes[..4096].iter().all(|&b| b == 0x33));
        assert!(bytes[4096..(MIB + 4096) as usize].iter().all(|&b| b == 0));
        assert!(bytes[(MIB + 4096) as usize..].iter().all(|&b| b == 0x33));

        let err = replica.zero_range(MIB, 2 * MIB).unwrap_err();
        assert!(matches!(err, IoError::OutOfRange { .. }), "{err}");
    }
}
