//! One protected disk: what to serve ([`ShimDisk`], the configuration) and the disk as
//! the running shim serves it ([`ServedDisk`]: its export, connections and lock), with
//! its [`DiskStatus`].

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::backing::IoEngine;
use crate::nbd::{Export, Stream};
use crate::tracker::TrackerStatus;
use filter_driver_shim_contract::epoch::EpochFiles;

/// One protected disk as the shim serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShimDisk {
    /// Stable id; also the NBD export name (the default export "" selects it too).
    pub name: String,
    /// Backing image file or block device.
    pub path: PathBuf,
    /// Unix socket the NBD export listens on.
    pub nbd_socket: PathBuf,
    /// Changed-block bitmap file (`docs/bitmap-format.md`).
    pub bitmap_path: PathBuf,
    /// Sidecar state file recording the image identity and generation.
    pub state_path: PathBuf,
    /// Tracking granularity in bytes: a power of two, 512 ..= 1 GiB.
    pub block_size: u32,
    /// How the backing store is driven (`[source] io_engine`); `Auto` by default.
    pub io_engine: IoEngine,
    /// Refuse every write from the start: the site was demoted by a planned failover
    /// (the VMs run from the replicas elsewhere). Reads are served; changes tracked
    /// before the demotion stay in the bitmap, for the way back.
    pub writes_refused: bool,
}

impl ShimDisk {
    /// The usual layout: `<state_dir>/<name>.cbt` and `<state_dir>/<name>.shim-state`.
    pub fn in_state_dir(
        name: &str,
        path: impl Into<PathBuf>,
        nbd_socket: impl Into<PathBuf>,
        state_dir: &Path,
        block_size: u32,
    ) -> ShimDisk {
        ShimDisk {
            name: name.to_string(),
            path: path.into(),
            nbd_socket: nbd_socket.into(),
            bitmap_path: state_dir.join(format!("{name}.cbt")),
            state_path: state_dir.join(format!("{name}.shim-state")),
            block_size,
            io_engine: IoEngine::Auto,
            writes_refused: false,
        }
    }
}

/// Status of one disk for the control API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskStatus {
    pub name: String,
    pub path: PathBuf,
    pub connections: usize,
    pub tracker: TrackerStatus,
    /// Writes are refused (the site was demoted by a planned failover).
    pub writes_refused: bool,
}

/// One disk of the running shim: what its accept loop, its connections, the control
/// socket and the epochs share.
pub(crate) struct ServedDisk {
    pub(crate) disk: ShimDisk,
    pub(crate) export: Arc<Export>,
    /// Connections open now (the `connections` field of `status`).
    pub(crate) connections: AtomicUsize,
    /// Live connections: a clone of each stream (to stop it) and its thread.
    pub(crate) live: Mutex<Vec<(Stream, JoinHandle<()>)>>,
    /// The disk's lock, held while this shim serves it.
    _lock: fs::File,
}

impl ServedDisk {
    /// `disk`, served through `export`, under its `lock` (held until this is dropped).
    pub(crate) fn new(disk: ShimDisk, export: Arc<Export>, lock: fs::File) -> ServedDisk {
        ServedDisk {
            disk,
            export,
            connections: AtomicUsize::new(0),
            live: Mutex::new(Vec::new()),
            _lock: lock,
        }
    }

    /// Where this disk's epoch files live: beside its bitmap.
    pub(crate) fn epoch_dir(&self) -> &Path {
        self.disk
            .bitmap_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    /// Removes epoch files a crashed shim left behind.
    pub(crate) fn remove_stale_epoch_files(&self) {
        let Ok(entries) = fs::read_dir(self.epoch_dir()) else {
            return;
        };
        for e in entries.flatten() {
            if let Some(name) = e.file_name().to_str() {
                if EpochFiles::is_epoch_file(&self.disk.name, name) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    pub(crate) fn status(&self) -> DiskStatus {
        DiskStatus {
            name: self.disk.name.clone(),
            path: self.disk.path.clone(),
            connections: self.connections.load(Ordering::Relaxed),
            tracker: self.export.tracker.status(),
            writes_refused: self.export.gate.is_sealed(),
        }
    }
}
