//! The running shim: one NBD export per protected disk on its Unix socket, plus the
//! control socket the engine talks to.

use std::fs;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::backing::{Backing, IoEngine};
use crate::control;
use crate::disk::{DiskStatus, ServedDisk, ShimDisk};
use crate::group;
use crate::nbd::{self, proto::TRANSMISSION_FLAGS, Export, ExportInfo, Stream};
use crate::tracker::{Tracker, TrackerConfig, TrackerError};

/// Concurrent NBD connections per disk. QEMU uses one, nbdcopy up to four; the bound
/// caps threads (each connection has `2 + IO_WORKERS` with the thread pool, 4 with
/// io_uring).
pub const MAX_CONNECTIONS_PER_DISK: usize = 16;
/// How often accept loops look at the stop flag when no client arrives.
const ACCEPT_POLL_MS: i32 = 100;

/// Errors starting or stopping the shim; each names the disk and what failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShimError {
    #[error("disk `{disk}`: cannot open backing store {}", path.display())]
    OpenBacking {
        disk: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk `{disk}`: change tracking")]
    Tracker {
        disk: String,
        #[source]
        source: TrackerError,
    },
    #[error("cannot listen on {} (is another shim running? is the directory writable?)", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk `{disk}`: cannot {op}")]
    Io {
        disk: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("disk `{disk}`: another shim running serves it (lock {} is held)", lock.display())]
    AlreadyServed { disk: String, lock: PathBuf },
    #[error("disk `{disk}`: io_engine = \"uring\", but io_uring is unavailable")]
    IoEngine {
        disk: String,
        #[source]
        source: std::sync::Arc<ferry_io::uring::UringError>,
    },
    #[error("two disks share the name or socket `{0}`")]
    Duplicate(String),
    #[error("state directory {}: {problem}", dir.display())]
    StateDir { dir: PathBuf, problem: String },
    #[error("state directory {}: cannot {op}", dir.display())]
    StateDirIo {
        dir: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Mode of a state directory: its bitmaps, state files and the control socket are the
/// shim's alone.
const STATE_DIR_MODE: u32 = 0o700;

/// Makes `dir` a private state directory whatever the umask: created mode 0700 if
/// missing; an existing one that group or others can read or enter is tightened to
/// 0700 with a warning. A directory the shim cannot make private is refused: one owned
/// by another user, and one others could write (group- or world-writable, or sticky
/// like `/tmp`) — tightening that would not undo what may have been planted in it,
/// and would break everyone else using a shared directory.
fn secure_state_dir(dir: &Path) -> Result<(), ShimError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let io = |op: &'static str| {
        let dir = dir.to_path_buf();
        move |source| ShimError::StateDirIo { dir, op, source }
    };
    let refuse = |problem: String| ShimError::StateDir {
        dir: dir.to_path_buf(),
        problem,
    };
    let meta = match fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io("create the parent directories"))?;
            }
            match fs::DirBuilder::new().mode(STATE_DIR_MODE).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("create the directory")(e)),
            }
            fs::metadata(dir).map_err(io("stat the directory"))?
        }
        Err(e) => return Err(io("stat the directory")(e)),
    };
    if !meta.is_dir() {
        return Err(refuse("not a directory".into()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & (libc::S_ISVTX | libc::S_IWGRP | libc::S_IWOTH) != 0 {
        return Err(refuse(format!(
            "other users can write it (mode {mode:04o}), so its files cannot be trusted; give the shim a directory of its own (it keeps it mode 0700), or check the files and `chmod 0700` it"
        )));
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(refuse(format!(
            "owned by uid {}, not by the shim's user (uid {euid}); another user could reach its control socket",
            meta.uid()
        )));
    }
    if mode & 0o7777 != STATE_DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(STATE_DIR_MODE))
            .map_err(io("set mode 0700"))?;
        // A directory created just now took the umask only; one that existed was open.
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), old_mode = %format_args!("{mode:04o}"), "state directory was readable by other users; its mode is now 0700");
        }
    }
    Ok(())
}

/// Takes the disk's exclusive lock (`<state file>.lock`, flock), before anything of
/// the disk is opened or written: a second shim on the same state must fail without
/// replacing the running one's bitmap or state files.
fn lock_disk(disk: &ShimDisk) -> Result<fs::File, ShimError> {
    let path = PathBuf::from(format!("{}.lock", disk.state_path.display()));
    let io = |op: &'static str| {
        let disk = disk.name.clone();
        move |source| ShimError::Io { disk, op, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io("create the state directory"))?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("open the disk's lock file"))?;
    // SAFETY: flock(2) on a descriptor we own for the duration of the call; the lock
    // lives as long as the returned file.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(ShimError::AlreadyServed {
                disk: disk.name.clone(),
                lock: path,
            });
        }
        return Err(io("lock the disk")(err));
    }
    Ok(file)
}

/// A running shim. Dropping it without [`Shim::shutdown`] leaves the state files
/// marked "running", exactly like a crash — which is safe, only less informative.
pub struct Shim {
    disks: Arc<Vec<Arc<ServedDisk>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    sockets: Vec<PathBuf>,
}

/// Binds a Unix socket, replacing a stale socket file left by a crash (never any
/// other kind of file). With `mode`, the socket file has exactly that mode whatever
/// the umask, from the moment it appears (see [`bind_private`]).
fn bind_unix(path: &Path, mode: Option<u32>) -> Result<UnixListener, ShimError> {
    let listen_err = |source| ShimError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(listen_err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "a server is already listening there",
                )));
            }
            fs::remove_file(path).map_err(listen_err)?;
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(listen_err)?;
    }
    match mode {
        None => UnixListener::bind(path).map_err(listen_err),
        Some(mode) => bind_private(path, mode).map_err(listen_err),
    }
}

/// Binds and listens on a Unix socket whose file has `mode`. Linux gives the socket
/// file the socket inode's mode less the umask at `bind`, so the mode is set on the
/// descriptor before `bind` (no moment exists where a wider mode lets someone connect)
/// and again on the file after it, for a umask that also masked owner bits.
fn bind_private(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: zeroed sockaddr_un is a valid (empty) address; every field is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    // One byte stays zero: the kernel reads the path up to a NUL or the end.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path must be under {} bytes without NUL",
                addr.sun_path.len()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else; the
    // OwnedFd closes it on every path below.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on the descriptor `socket` owns; no memory is passed.
    if unsafe { libc::fchmod(fd, mode as libc::mode_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un on our stack for the duration of the call,
    // and `len` does not exceed its size (checked against sun_path above).
    let rc = unsafe {
        libc::bind(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on the descriptor `socket` owns; no memory is passed.
    if unsafe { libc::listen(fd, 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(UnixListener::from(socket))
}

/// Waits up to `timeout_ms` for `listener` to be readable.
fn poll_readable(listener: &UnixListener, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd on our stack for the duration of the call and
    // the count passed is 1; the descriptor is borrowed from `listener`, alive here.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    rc > 0 && pfd.revents & libc::POLLIN != 0
}

/// The engine a disk's connections use: `auto` takes io_uring when the probe (run
/// once per process) allows it and otherwise falls back to the thread pool, saying so
/// once; `uring` without io_uring refuses to start.
fn resolve_engine(disk: &ShimDisk) -> Result<IoEngine, ShimError> {
    static FALLBACK_LOGGED: std::sync::Once = std::sync::Once::new();
    match (disk.io_engine, nbd::engine::uring::available()) {
        (IoEngine::Sync, _) => Ok(IoEngine::Sync),
        (IoEngine::Auto | IoEngine::Uring, Ok(())) => Ok(IoEngine::Uring),
        (IoEngine::Uring, Err(source)) => Err(ShimError::IoEngine {
            disk: disk.name.clone(),
            source,
        }),
        (IoEngine::Auto, Err(reason)) => {
            FALLBACK_LOGGED.call_once(|| {
                let reason = ferry_io::chain(&*reason);
                tracing::warn!(%reason, "io_uring is unavailable: the backing stores are served by the thread pool (io_engine = \"sync\")");
            });
            Ok(IoEngine::Sync)
        }
    }
}

fn open_disk(disk: &ShimDisk) -> Result<ServedDisk, ShimError> {
    let engine = resolve_engine(disk)?;
    for p in [&disk.bitmap_path, &disk.state_path] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            secure_state_dir(dir)?;
        }
    }
    let lock = lock_disk(disk)?;
    let backing = Backing::open(&disk.path).map_err(|source| ShimError::OpenBacking {
        disk: disk.name.clone(),
        path: disk.path.clone(),
        source,
    })?;
    let identity = backing.identity().map_err(|source| ShimError::Io {
        disk: disk.name.clone(),
        op: "stat the backing store",
        source,
    })?;
    let tracker = Tracker::open(
        TrackerConfig {
            disk: disk.name.clone(),
            bitmap_path: disk.bitmap_path.clone(),
            state_path: disk.state_path.clone(),
            block_size: disk.block_size,
        },
        identity,
    )
    .map_err(|source| ShimError::Tracker {
        disk: disk.name.clone(),
        source,
    })?;
    let export = Export::new(
        ExportInfo {
            name: disk.name.clone(),
            size_bytes: backing.size_bytes(),
            transmission_flags: TRANSMISSION_FLAGS,
        },
        backing,
        tracker,
        engine,
    );
    if disk.writes_refused {
        export.gate.seal();
        tracing::warn!(disk = %disk.name, "this site was demoted by a planned failover: writes are refused");
    }
    Ok(ServedDisk::new(disk.clone(), Arc::new(export), lock))
}

fn accept_loop(listener: UnixListener, served: Arc<ServedDisk>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        if !poll_readable(&listener, ACCEPT_POLL_MS) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(disk = %served.disk.name, error = %e, "accept failed");
                continue;
            }
        };
        let mut live = served.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(_, t)| !t.is_finished());
        if live.len() >= MAX_CONNECTIONS_PER_DISK {
            tracing::warn!(disk = %served.disk.name, "connection refused: {MAX_CONNECTIONS_PER_DISK} already open");
            continue;
        }
        let stream = Stream::Unix(stream);
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let export = Arc::clone(&served.export);
        let counter = Arc::clone(&served);
        counter.connections.fetch_add(1, Ordering::Relaxed);
        let spawned = thread::Builder::new()
            .name(format!("nbd-r-{}", served.disk.name))
            .spawn(move || {
                if let Err(e) = nbd::serve_connection(stream, export) {
                    let why = ferry_io::chain(&e);
                    tracing::warn!(disk = %counter.disk.name, %why, "NBD connection ended with an error");
                }
                counter.connections.fetch_sub(1, Ordering::Relaxed);
            });
        match spawned {
            Ok(t) => live.push((handle, t)),
            Err(e) => {
                served.connections.fetch_sub(1, Ordering::Relaxed);
                tracing::error!(error = %e, "cannot spawn a connection thread");
            }
        }
    }
}

/// No two disks share a name or a socket.
fn check_unique(disks: &[ShimDisk]) -> Result<(), ShimError> {
    for (i, a) in disks.iter().enumerate() {
        for b in &disks[i + 1..] {
            if a.name == b.name || a.nbd_socket == b.nbd_socket {
                return Err(ShimError::Duplicate(a.name.clone()));
            }
        }
    }
    Ok(())
}

impl Shim {
    /// Opens every disk (validating or restarting its tracking), binds its NBD socket
    /// and, if given, the control socket (mode 0600), and starts serving.
    pub fn start(
        disks: Vec<ShimDisk>,
        control: Option<control::ControlConfig>,
    ) -> Result<Shim, ShimError> {
        check_unique(&disks)?;
        let mut served = Vec::with_capacity(disks.len());
        let mut listeners = Vec::with_capacity(disks.len());
        for disk in &disks {
            let d = open_disk(disk)?;
            d.remove_stale_epoch_files();
            served.push(Arc::new(d));
            listeners.push(bind_unix(&disk.nbd_socket, None)?);
        }
        let control_listener = control
            .as_ref()
            .map(|c| bind_unix(&c.path, Some(control::SOCKET_MODE)))
            .transpose()?;
        let disks = Arc::new(served);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut sockets: Vec<PathBuf> = disks.iter().map(|d| d.disk.nbd_socket.clone()).collect();
        for (listener, d) in listeners.into_iter().zip(disks.iter()) {
            let d = Arc::clone(d);
            let stop = Arc::clone(&stop);
            let name = format!("nbd-accept-{}", d.disk.name);
            threads.push(
                thread::Builder::new()
                    .name(name)
                    .spawn(move || accept_loop(listener, d, stop))
                    .map_err(|source| ShimError::Io {
                        disk: String::new(),
                        op: "spawn an accept thread",
                        source,
                    })?,
            );
        }
        if let (Some(listener), Some(control)) = (control_listener, control) {
            sockets.push(control.path.clone());
            let disks = Arc::clone(&disks);
            let stop = Arc::clone(&stop);
            threads.push(
                thread::Builder::new()
                    .name("shim-control".into())
                    .spawn(move || {
                        let state = control::ControlState::new(
                            disks,
                            control.freeze_idle_timeout,
                            control.path.parent().map(Path::to_path_buf),
                        );
                        control::serve(listener, Arc::new(state), stop)
                    })
                    .map_err(|source| ShimError::Io {
                        disk: String::new(),
                        op: "spawn the control thread",
                        source,
                    })?,
            );
        }
        for d in disks.iter() {
            tracing::info!(disk = %d.disk.name, socket = %d.disk.nbd_socket.display(), size_bytes = d.export.info.size_bytes, io_engine = %d.export.engine, "serving NBD");
        }
        Ok(Shim {
            disks,
            stop,
            threads,
            sockets,
        })
    }

    /// Per-disk status, as the control API reports it.
    pub fn status(&self) -> Vec<DiskStatus> {
        self.disks.iter().map(|d| d.status()).collect()
    }

    /// Stops accepting, lets every connection finish its outstanding requests, syncs
    /// each backing store and records a clean shutdown in its state file.
    pub fn shutdown(mut self) -> Result<(), ShimError> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for d in self.disks.iter() {
            let live = std::mem::take(&mut *d.live.lock().unwrap_or_else(|e| e.into_inner()));
            for (stream, _) in &live {
                let _ = stream.shutdown(Shutdown::Read);
            }
            for (_, t) in live {
                let _ = t.join();
            }
        }
        // An epoch still frozen is abandoned: its bits stay in the file.
        let _ = group::finish(&self.disks, false);
        let mut first_error = None;
        for d in self.disks.iter() {
            let name = &d.disk.name;
            let result =
                d.export
                    .backing
                    .sync_data()
                    .and_then(|()| d.export.backing.identity())
                    .map_err(|source| ShimError::Io {
                        disk: name.clone(),
                        op: "sync the backing store at shutdown",
                        source,
                    })
                    .and_then(|identity| {
                        d.export.tracker.close_clean(identity).map_err(|source| {
                            ShimError::Tracker {
                                disk: name.clone(),
                                source,
                            }
                        })
                    });
            if let Err(e) = result {
                tracing::error!(error = %e, "unclean shutdown");
                first_error.get_or_insert(e);
            }
        }
        for s in &self.sockets {
            let _ = fs::remove_file(s);
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Runs the shim until `stop` becomes true (set it from a signal handler), then shuts
/// down cleanly. This is what `ferry shim --config FILE` calls.
pub fn serve(
    disks: Vec<ShimDisk>,
    control: Option<control::ControlConfig>,
    stop: &AtomicBool,
) -> Result<(), ShimError> {
    let shim = Shim::start(disks, control)?;
    while !stop.load(Ordering::Acquire) {
        thread::sleep(Duration::from_millis(100));
    }
    shim.shutdown()
}
