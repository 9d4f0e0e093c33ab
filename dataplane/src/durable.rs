//! Small files that must survive a crash whole or not at all (state records).
//!
//! Common I/O shared by the source engine and the target writer: write a temporary
//! file in the same directory, fsync it, rename it over the old one, fsync the
//! directory. After a crash the reader sees either the old or the new content.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What was being done to a state file or directory (source or target) when a
/// system call failed; the error that carries it holds the path and the `io::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateOp {
    Create,
    Open,
    Read,
    Write,
    WriteHeader,
    Append,
    Stat,
    Size,
    Remove,
    Rename,
    Fsync,
    FsyncDir,
    Fdatasync,
    Lock,
    DrawLogName,
    WriteCommitMark,
    OpenReplicaForRollback,
    RollBack,
    FsyncReplicaAfterRollback,
    SetAside,
    Retire,
    MergeAway,
    KeepAsPoint,
    WriteRecords,
    Copy,
    ApplyToCopy,
}

impl std::fmt::Display for StateOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Create => "create",
            Self::Open => "open",
            Self::Read => "read",
            Self::Write => "write",
            Self::WriteHeader => "write header",
            Self::Append => "append",
            Self::Stat => "stat",
            Self::Size => "size",
            Self::Remove => "remove",
            Self::Rename => "rename",
            Self::Fsync => "fsync",
            Self::FsyncDir => "fsync directory",
            Self::Fdatasync => "fdatasync",
            Self::Lock => "flock",
            Self::DrawLogName => "draw a log name",
            Self::WriteCommitMark => "write commit mark",
            Self::OpenReplicaForRollback => "open replica for rollback",
            Self::RollBack => "roll back",
            Self::FsyncReplicaAfterRollback => "fsync replica after rollback",
            Self::SetAside => "set aside",
            Self::Retire => "retire",
            Self::MergeAway => "merge away",
            Self::KeepAsPoint => "keep as recovery point",
            Self::WriteRecords => "write replica records",
            Self::Copy => "copy",
            Self::ApplyToCopy => "apply to the copy",
        })
    }
}

/// The temporary file [`write_atomic`] writes before renaming it over `path`.
pub fn temp_path(path: &Path) -> std::path::PathBuf {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(".tmp");
    dir.join(tmp_name)
}

/// Atomically replaces `path` with `bytes` (durable when this returns).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if path.file_name().is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no file name",
        ));
    }
    let tmp = temp_path(path);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Makes the entries of `dir` durable (names created, renamed or removed in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) if missing, with owner-only permissions.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        write_atomic(&p, b"first version, longer").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}

/// How [`lock`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Shared with other shared holders; waits for an exclusive holder.
    SharedWait,
    /// Alone; waits for every other holder.
    ExclusiveWait,
    /// Alone, or `Ok(None)` at once if anyone else holds it.
    ExclusiveTry,
}

/// Takes an advisory `flock` on `path` (created if missing). The lock lives as long
/// as the returned file; the kernel drops it when the process dies, kill -9 included.
pub fn lock(path: &Path, mode: LockMode) -> io::Result<Option<File>> {
    use std::os::fd::AsRawFd;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let op = match mode {
        LockMode::SharedWait => libc::LOCK_SH,
        LockMode::ExclusiveWait => libc::LOCK_EX,
        LockMode::ExclusiveTry => libc::LOCK_EX | libc::LOCK_NB,
    };
    loop {
        // SAFETY: flock(2) on a descriptor we own for the duration of the call; it has
        // no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(Some(file));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if mode == LockMode::ExclusiveTry => return Ok(None),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn exclusive_try_fails_while_held_and_succeeds_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let shared = lock(&path, LockMode::SharedWait).unwrap().unwrap();
        let also_shared = lock(&path, LockMode::SharedWait).unwrap();
        assert!(also_shared.is_some(), "shared holders coexist");
        assert!(lock(&path, LockMode::ExclusiveTry).unwrap().is_none());
        drop((shared, also_shared));
        let held = lock(&path, LockMode::ExclusiveTry).unwrap();
        assert!(held.is_some());
        assert!(lock(&path, LockMode::ExclusiveTry).unwrap().is_none());
    }
}
