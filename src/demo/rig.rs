//! What `ferry demo`, its live step and `ferry bench` share: the loopback rig (an
//! in-process target plus a [`SyncJob`] with the product defaults), the byte-for-byte
//! comparison of a replica with its source, and the errors of all three.

use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::config::Compression;
use dataplane::config::{
    default_workers, DEFAULT_BLOCK_SIZE_KIB, DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_IO_SIZE_KIB,
    DEFAULT_IO_TIMEOUT_MS, DEFAULT_MAX_SESSIONS, DEFAULT_QUEUE_DEPTH,
};
use dataplane::io::EngineKind;
use dataplane::psk::{Psk, PskError};
use dataplane::source::{JobDisk, ModeRequest, SourceError, SyncJob};
use dataplane::writer::{Target, TargetDisk, TargetError, TargetJob};
use filter_driver_shim::ShimError;
use filter_driver_shim_contract::bitmap::BitmapError;

use dataplane::chain;

use crate::imagegen::{ImageError, MIB};
use crate::io_failure::IoFailure;

/// Why the demo or the benchmark could not run, or found a replica wrong.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot generate a pre-shared key")]
    Key(#[source] PskError),
    #[error("cannot start the target")]
    TargetStart(#[source] TargetError),
    #[error("cannot learn the target's address")]
    TargetAddr(#[source] io::Error),
    #[error("cannot start the target thread")]
    TargetThread(#[source] io::Error),
    /// A demo step's sync failed; `label` names the step.
    #[error("{label}: sync failed")]
    Sync {
        label: String,
        #[source]
        source: Box<SourceError>,
    },
    /// A benchmark run's sync failed.
    #[error("full sync failed")]
    FullSync(#[source] Box<SourceError>),
    #[error(transparent)]
    Compare(#[from] CompareError),
    #[error("disk {disk}")]
    DiskState {
        disk: String,
        #[source]
        source: Box<SourceError>,
    },
    #[error("disk {disk}: no state file {} after a successful sync", path.display())]
    NoState { disk: String, path: PathBuf },
    #[error("block size {block_size} does not fit a bitmap")]
    BlockSize { block_size: usize },
    #[error("disk {disk}: cannot make a bitmap")]
    BitmapNew {
        disk: String,
        #[source]
        source: BitmapError,
    },
    #[error("disk {disk}: cannot mark block {block}")]
    BitmapMark {
        disk: String,
        block: u64,
        #[source]
        source: BitmapError,
    },
    #[error("disk {disk}: cannot save bitmap {}", out.display())]
    BitmapSave {
        disk: String,
        out: PathBuf,
        #[source]
        source: BitmapError,
    },
    #[error("cannot start the shim")]
    ShimStart(#[source] ShimError),
    /// A step of reverse replication or failback failed; `step` names it.
    #[error("{step}")]
    Failback {
        step: &'static str,
        #[source]
        source: Box<crate::dr::DrError>,
    },
    #[error("shim shutdown")]
    ShimShutdown(#[source] ShimError),
    #[error("guest: cannot attach to {}", socket.display())]
    GuestAttach {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("guest write at {offset}")]
    GuestWrite {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("guest flush and disconnect")]
    GuestFlush(#[source] io::Error),
    /// Every step ran, and these checks failed (one line each).
    #[error("demo failed:\n  {}", failures.join("\n  "))]
    Failed { failures: Vec<String> },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Io(#[from] IoFailure),
}

/// How a replica differs from its source, or why they could not be compared.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("cannot open {} to verify it", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot stat {}", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {} at offset {offset}", path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("replica {} is {replica_len} bytes, its source {} is {original_len} bytes", replica.display(), original.display())]
    Length {
        replica: PathBuf,
        replica_len: u64,
        original: PathBuf,
        original_len: u64,
    },
    #[error("replica {} differs from its source {} at byte {at}", replica.display(), original.display())]
    Differs {
        replica: PathBuf,
        original: PathBuf,
        at: u64,
    },
}

/// A target writer serving on loopback from a thread of this process.
pub(crate) struct Rig {
    pub addr: SocketAddr,
    pub psk: [u8; 32],
    /// What the target serves (for the failover commands, which act on its state).
    pub job: TargetJob,
}

impl Rig {
    /// Binds a target on `127.0.0.1:0` for `disks` and serves it on a background
    /// thread that lives as long as the process.
    pub fn start(
        state_dir: &Path,
        disks: Vec<TargetDisk>,
        queue_depth: usize,
    ) -> Result<Rig, DemoError> {
        let psk = Psk::generate().map_err(DemoError::Key)?;
        Rig::start_with_key(state_dir, disks, queue_depth, *psk.as_bytes())
    }

    /// [`Rig::start`] with the key `psk` (the other site's target, in the demo's
    /// failback).
    pub fn start_with_key(
        state_dir: &Path,
        disks: Vec<TargetDisk>,
        queue_depth: usize,
        psk: [u8; 32],
    ) -> Result<Rig, DemoError> {
        let job = TargetJob {
            listen: "127.0.0.1:0".into(),
            psk,
            state_dir: state_dir.to_path_buf(),
            disks,
            queue_depth,
            engine: EngineKind::Auto,
            io_timeout: Duration::from_millis(DEFAULT_IO_TIMEOUT_MS),
            max_sessions: DEFAULT_MAX_SESSIONS as usize,
            retention: dataplane::writer::points::Retention {
                points: 4,
                minutes: 0,
                grid: Vec::new(),
            },
            own_source_state: None,
        };
        let target = Target::bind(job.clone()).map_err(DemoError::TargetStart)?;
        let addr = target.local_addr().map_err(DemoError::TargetAddr)?;
        std::thread::Builder::new()
            .name("ferry-target".into())
            .spawn(move || {
                if let Err(e) = target.serve() {
                    tracing::error!("target stopped: {}", chain(&e));
                }
            })
            .map_err(DemoError::TargetThread)?;
        Ok(Rig { addr, psk, job })
    }

    /// A sync job against this target with the product's defaults.
    pub fn sync_job(
        &self,
        state_dir: &Path,
        disks: Vec<JobDisk>,
        mode: ModeRequest,
        compression: Compression,
    ) -> SyncJob {
        SyncJob {
            target: self.addr.to_string(),
            psk: self.psk,
            state_dir: state_dir.to_path_buf(),
            disks,
            block_size: DEFAULT_BLOCK_SIZE_KIB as usize * 1024,
            io_size: DEFAULT_IO_SIZE_KIB as usize * 1024,
            queue_depth: DEFAULT_QUEUE_DEPTH as usize,
            workers: default_workers() as usize,
            compression,
            engine: EngineKind::Auto,
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS),
            io_timeout: Duration::from_millis(DEFAULT_IO_TIMEOUT_MS),
            mode,
            shim_control: None,
            require_shim: false,
            discard_replica_changes: false,
            promote: false,
            reprotect: None,
            progress: None,
            throttle: None,
        }
    }
}

/// Compares two files byte for byte; `Ok(bytes compared)` when they are identical,
/// `Err` naming the first difference (or the failed read) otherwise.
pub(crate) fn compare_files(source: &Path, replica: &Path) -> Result<u64, CompareError> {
    /// Large enough that the comparison runs at memory speed, small enough to stay off
    /// the heap's large-allocation path twice over.
    const CHUNK_BYTES: usize = 4 << 20;
    let open = |p: &Path| {
        File::open(p).map_err(|source| CompareError::Open {
            path: p.to_path_buf(),
            source,
        })
    };
    let (mut a, mut b) = (open(source)?, open(replica)?);
    let len = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|source| CompareError::Stat {
                path: p.to_path_buf(),
                source,
            })
    };
    let (len_a, len_b) = (len(&a, source)?, len(&b, replica)?);
    if len_a != len_b {
        return Err(CompareError::Length {
            replica: replica.to_path_buf(),
            replica_len: len_b,
            original: source.to_path_buf(),
            original_len: len_a,
        });
    }
    let mut buf_a = vec![0u8; CHUNK_BYTES];
    let mut buf_b = vec![0u8; CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < len_a {
        let n = (len_a - offset).min(CHUNK_BYTES as u64) as usize;
        let read = |f: &mut File, buf: &mut [u8], path: &Path| {
            f.read_exact(buf).map_err(|source| CompareError::Read {
                path: path.to_path_buf(),
                offset,
                source,
            })
        };
        read(&mut a, &mut buf_a[..n], source)?;
        read(&mut b, &mut buf_b[..n], replica)?;
        if buf_a[..n] != buf_b[..n] {
            let at = buf_a[..n]
                .iter()
                .zip(&buf_b[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Err(CompareError::Differs {
                replica: replica.to_path_buf(),
                original: source.to_path_buf(),
                at: offset + at as u64,
            });
        }
        offset += n as u64;
    }
    Ok(len_a)
}

/// `bytes` in MiB for humans.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imagegen::TempDir;

    #[test]
    fn compare_files_finds_the_first_difference() {
        let dir = TempDir::new("ferry-demo-test").expect("temp dir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let mut bytes = vec![7u8; 5 << 20];
        std::fs::write(&a, &bytes).expect("write a");
        std::fs::write(&b, &bytes).expect("write b");
        assert_eq!(compare_files(&a, &b).expect("identical"), 5 << 20);
        bytes[(4 << 20) + 3] = 8;
        std::fs::write(&b, &bytes).expect("rewrite b");
        let err = compare_files(&a, &b).expect_err("differs").to_string();
        assert!(err.contains(&format!("at byte {}", (4 << 20) + 3)), "{err}");
        std::fs::write(&b, &bytes[..10]).expect("shorten b");
        assert!(compare_files(&a, &b)
            .expect_err("sizes")
            .to_string()
            .contains("is 10 bytes"));
    }
}
