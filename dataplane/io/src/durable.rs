//! Files that must survive a crash whole or not at all, and the locks and directories
//! around them: the one implementation of an atomic replacement in ferry (the shim's
//! bitmap and tracker state, the engine's and the writer's records and points).
//!
//! [`write_atomic`] writes a temporary file in the same directory, fsyncs it, renames it
//! over the old one and fsyncs the directory: after a crash the reader sees either the
//! old or the new content, whole. The temporary file has one fixed name per target
//! ([`temp_path`]), so a crash leaves at most one behind, which the next write of the
//! same file replaces; a failed write removes it at once (a full disk gets its space
//! back). Each file has one writer at a time (its owner holds a lock or is the only
//! thread that writes it), which is what makes the fixed name safe.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The temporary file [`write_atomic`] writes before renaming it over `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let dir = parent_dir(path);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(".tmp");
    dir.join(tmp_name)
}

/// The step of [`write_atomic`] that failed, named in its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomicStep {
    /// The target path has no file name (it ends in `..` or is `/`).
    NoFileName,
    CreateTemp,
    WriteTemp,
    FsyncTemp,
    Rename,
    FsyncDir,
}

impl std::fmt::Display for AtomicStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NoFileName => "the path has no file name",
            Self::CreateTemp => "cannot create the temporary file",
            Self::WriteTemp => "cannot write the temporary file",
            Self::FsyncTemp => "cannot fsync the temporary file",
            Self::Rename => "cannot rename the temporary file into place",
            Self::FsyncDir => "cannot fsync the directory",
        })
    }
}

/// How [`write_atomic`] failed: the step, and the file or directory it acted on. It
/// travels inside the returned `io::Error` (whose kind is the system call's), so callers
/// that hold an `io::Error` keep the detail in their error chain.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {}", path.display())]
pub struct AtomicWriteError {
    pub step: AtomicStep,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Atomically replaces `path` with `bytes`, mode 0600 (durable when this returns). On
/// failure the temporary file is removed and the old content of `path` is untouched;
/// the `io::Error` has the system call's kind and an [`AtomicWriteError`] inside.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    fn fail(step: AtomicStep, path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
        move |source| {
            let kind = source.kind();
            let path = path.to_path_buf();
            io::Error::new(kind, AtomicWriteError { step, path, source })
        }
    }
    if path.file_name().is_none() {
        let e = io::Error::from(io::ErrorKind::InvalidInput);
        return Err(fail(AtomicStep::NoFileName, path)(e));
    }
    let tmp = temp_path(path);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail(AtomicStep::CreateTemp, &tmp))?;
        f.write_all(bytes)
            .map_err(fail(AtomicStep::WriteTemp, &tmp))?;
        f.sync_all().map_err(fail(AtomicStep::FsyncTemp, &tmp))?;
        fs::rename(&tmp, path).map_err(fail(AtomicStep::Rename, path))
    })();
    if let Err(e) = written {
        // Best effort: the write's error is what the caller needs; removing the
        // partial file gives a full disk its space back.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = parent_dir(path);
    sync_dir(dir).map_err(fail(AtomicStep::FsyncDir, dir))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
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

    #[test]
    fn a_failed_write_names_the_step_and_leaves_old_content_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        write_atomic(&p, b"old").unwrap();
        // A directory where the temporary file would go makes the rename fail.
        fs::create_dir(temp_path(&p)).unwrap();
        let e = write_atomic(&p, b"new").unwrap_err();
        let inner = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<AtomicWriteError>())
            .expect("the step travels inside the io::Error");
        assert_eq!(inner.step, AtomicStep::CreateTemp, "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        fs::remove_dir(temp_path(&p)).unwrap();
        assert!(write_atomic(Path::new("/"), b"x").is_err());
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
