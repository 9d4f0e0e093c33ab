//! A test file system that loses what was not synced: a FUSE mount whose files live in
//! the test process's memory ([`model`]), with a durable and a live state per file and
//! for the namespace, and a power switch.
//!
//! ```text
//! let mut fs = PowerFailFs::mount(&mnt)?;      // processes under test use `mnt`
//! ...                                          // they write, fsync, rename ...
//! fs.cut(CutMode::DropUnsynced);               // power gone: every request fails EIO
//! // kill -9 every process that uses the mount (their page cache is gone with them)
//! fs.restore()?;                               // new mount: only the durable state
//! ```
//!
//! The cut happens in the model, atomically with respect to every request (one lock),
//! so "before the cut" and "after the cut" are well defined for each system call. The
//! kernel's page cache of the old mount still holds what the model dropped, so
//! [`PowerFailFs::restore`] detaches the old mount (aborting its connection) and mounts
//! a fresh one: nothing cached survives.
//!
//! What the mount supports is what ferry uses: files (read, write, truncate,
//! `fallocate` plain/punch-hole/zero-range, fsync, fdatasync, shared `mmap` through the
//! page cache, `O_DIRECT` through FUSE's direct I/O path), directories (mkdir, rmdir,
//! readdir, rename, unlink, fsync) and the nodes of Unix sockets (`bind(2)` creates
//! them with mknod; the sockets themselves work, they are the kernel's). `flock` and
//! POSIX locks are the kernel's own (the file system does not take over locking), which
//! is exactly what processes on one host see. No hard links, symlinks or xattrs.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod model;

mod fuse;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use model::{CutMode, CutReport, Model, Stats};

/// A mounted power-fail file system.
pub struct PowerFailFs {
    model: Arc<Mutex<Model>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    /// The mount's device number (`st_dev`), which [`PowerFailFs::restore`] keeps.
    dev: u64,
    /// Held for the mount's life: one power-fail mount at a time on this host, so two
    /// of them never take each other's device number while one is detached.
    _exclusive: std::fs::File,
}

/// The lock file every [`PowerFailFs`] holds (flock, exclusive) while it exists.
const HOST_LOCK: &str = "/tmp/ferry-powerfail.lock";

fn host_lock() -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(HOST_LOCK)?;
    loop {
        // SAFETY: flock(2) on a descriptor owned by `file` for the call; no memory
        // effects.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// A tmpfs mounted only to hold one anonymous device number while
/// [`PowerFailFs::restore`] waits for a higher one; unmounted when dropped.
struct Placeholder(tempfile_dir::Dir);

mod tempfile_dir {
    /// A directory removed when dropped (after the placeholder's unmount).
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}

impl Placeholder {
    fn mount(n: usize) -> io::Result<Placeholder> {
        let dir =
            std::env::temp_dir().join(format!("ferry-powerfail-hold-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir = tempfile_dir::Dir(dir);
        let target = CString::new(dir.0.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let fstype = CString::new("tmpfs").expect("no NUL");
        // SAFETY: every pointer is a NUL-terminated string that outlives the call; the
        // data argument may be null.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Placeholder(dir))
    }
}

impl Drop for Placeholder {
    fn drop(&mut self) {
        if let Ok(path) = CString::new(self.0 .0.as_os_str().as_bytes()) {
            // SAFETY: `path` is a NUL-terminated string that outlives the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// How many mounts [`PowerFailFs::restore`] tries, `REMOUNT_RETRY` apart, before giving
/// up on getting the old device number back. The kernel hands out the lowest free
/// anonymous device number, so the first try gets it unless another mount took it in
/// the meantime (any tmpfs, sysfs of an `ip netns exec`, FUSE mount of another test on
/// this shared machine), or a file of the old mount is still open somewhere (the old
/// superblock, and its number, live until the last one is closed). Ten seconds rides
/// out short-lived mounts of other tests.
const REMOUNT_TRIES: u32 = 200;
const REMOUNT_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Whether a `FERRY_REQUIRE` value (a comma list such as `uring,loop,fuse`) asks for FUSE.
pub fn fuse_required(ferry_require: &str) -> bool {
    ferry_require.split(',').any(|w| w.trim() == "fuse")
}

fn mount_dev(mountpoint: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(mountpoint)?.dev())
}

impl PowerFailFs {
    /// Mounts an empty file system on `mountpoint` (an existing empty directory).
    /// Needs `/dev/fuse` and root (mount(2)) or fusermount3.
    pub fn mount(mountpoint: &Path) -> io::Result<PowerFailFs> {
        let exclusive = host_lock()?;
        let model = Arc::new(Mutex::new(Model::new()));
        let session = fuse::spawn(Arc::clone(&model), mountpoint)?;
        let mut fs = PowerFailFs {
            model,
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
            dev: 0,
            _exclusive: exclusive,
        };
        fs.dev = mount_dev(mountpoint)?;
        Ok(fs)
    }

    /// Mounts on `mountpoint`, or returns `None` after printing SKIP when FUSE is not
    /// available here, unless the environment's `FERRY_REQUIRE` (a comma list)
    /// contains `fuse`: then a missing FUSE is a failure (panic), so a green run
    /// cannot hide a power-loss test that never ran.
    pub fn mount_or_skip(test: &str, mountpoint: &Path) -> Option<PowerFailFs> {
        let required = fuse_required(&std::env::var("FERRY_REQUIRE").unwrap_or_default());
        match PowerFailFs::mount(mountpoint) {
            Ok(fs) => Some(fs),
            Err(e) if required => panic!(
                "{test}: FERRY_REQUIRE contains fuse but no FUSE file system mounts here: {e} \
                 (needs /dev/fuse and root, or fusermount3 from the fuse3 package)"
            ),
            Err(e) => {
                eprintln!("SKIP {test}: no FUSE file system mounts here: {e}");
                None
            }
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn lock(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power: what was not synced is gone (or partly kept, per `mode`), and
    /// every request fails with EIO until [`PowerFailFs::restore`].
    pub fn cut(&self, mode: CutMode) -> CutReport {
        self.lock().cut(mode)
    }

    /// Brings the power back: detaches the old mount (aborting requests still in
    /// flight), waits for its session to end, and mounts the durable state afresh.
    /// Kill every process that used the old mount first; one still holding a file of
    /// it keeps the old kernel objects alive, never the new mount's.
    ///
    /// The new mount gets the old one's device number (`st_dev`), as a disk's file
    /// system has the same one after a reboot: the shim records its image's device and
    /// inode, and a different one means "another image", a resync that would hide
    /// exactly the lost changes this file system is there to reveal.
    pub fn restore(&mut self) -> io::Result<()> {
        self.detach()?;
        self.lock().power_on();
        let mut got = Vec::new();
        // Numbers below ours that came free meanwhile (another test's mount ended) are
        // held by placeholders until ours comes back: the kernel hands out the lowest.
        let mut held = Vec::new();
        for _ in 0..REMOUNT_TRIES {
            self.session = Some(fuse::spawn(Arc::clone(&self.model), &self.mountpoint)?);
            let dev = mount_dev(&self.mountpoint)?;
            if dev == self.dev {
                return Ok(());
            }
            got.push(dev);
            self.detach()?;
            if dev < self.dev {
                held.push(Placeholder::mount(held.len())?);
            } else {
                std::thread::sleep(REMOUNT_RETRY);
            }
        }
        Err(io::Error::other(format!(
            "remounting {} never got its device number {:#x} back in {REMOUNT_TRIES} tries \
             (another mount holds it?); last got {:#x?}",
            self.mountpoint.display(),
            self.dev,
            got.last()
        )))
    }

    /// Counters since the mount was created.
    pub fn stats(&self) -> Stats {
        self.lock().stats()
    }

    fn detach(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path = CString::new(self.mountpoint.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // MNT_FORCE aborts the FUSE connection (nothing waits on this process any
        // more), MNT_DETACH takes the mount out of the namespace even if a file of it
        // is still open somewhere.
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_FORCE | libc::MNT_DETACH) };
        if rc != 0 {
            return Err(io::Error::other(format!(
                "umount2({}, MNT_FORCE|MNT_DETACH): {}",
                self.mountpoint.display(),
                io::Error::last_os_error()
            )));
        }
        // The aborted connection ends the session loop; the thread's own error (the
        // device went away) is expected.
        let _ = session.join();
        Ok(())
    }
}

impl Drop for PowerFailFs {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ferry_require_names_fuse_in_its_comma_list() {
        assert!(super::fuse_required("fuse"));
        assert!(super::fuse_required("uring, fuse,loop"));
        assert!(!super::fuse_required(""));
        assert!(!super::fuse_required("uring,loop,fusex"));
    }
}
