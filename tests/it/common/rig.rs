//! The live rig: a target, a shim serving disks that a guest writes, a source config
//! for `ferry sync` / `ferry source`, optionally a fault proxy between source and
//! target; and the guest: a sequential writer that stamps every 4 KiB sector it writes
//! with the write's sequence number, so that the replicas can be checked to be a
//! point-in-time cut of its log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::nbd::{connect_retry, NbdClient};
use super::proxy::FaultProxy;
use super::shim::ShimProc;
use super::{disk_entries, ferry_bin, keygen, open_rw, scratch_dir, toml_path, Rng, TargetProc};

/// The unit the guest stamps and the checks compare.
pub const SECTOR: u64 = 4096;

/// What a [`Rig`] is made of.
#[derive(Debug, Clone)]
pub struct RigSpec {
    /// The disks' names, in order (the guest alternates between them).
    pub names: Vec<&'static str>,
    /// Size of every disk; the first half starts random, the rest a hole.
    pub disk_bytes: u64,
    /// The consistency group of all disks, if any.
    pub group: Option<&'static str>,
    /// Route the source to the target through a [`FaultProxy`].
    pub proxy: bool,
    /// Lines for the source's `[source]` table (`target`, `psk_file` and `state_dir`
    /// are set by the rig).
    pub source_extra: String,
    /// The target's `io_timeout_ms`.
    pub target_io_timeout_ms: u64,
}

impl RigSpec {
    /// Two disks, `os` and `data`, of one group `vm1`, an epoch every 200 ms.
    pub fn two_disk_group(disk_bytes: u64) -> RigSpec {
        RigSpec {
            names: vec!["os", "data"],
            disk_bytes,
            group: Some("vm1"),
            proxy: false,
            source_extra: "io_timeout_ms = 20000\nepoch_interval_ms = 200\n".into(),
            target_io_timeout_ms: 20000,
        }
    }
}

/// One disk of a [`Rig`].
#[derive(Debug, Clone)]
pub struct RigDisk {
    pub name: String,
    pub image: PathBuf,
    pub replica: PathBuf,
    pub socket: PathBuf,
}

/// A scratch rig: target process (behind a proxy if asked), shim process, disks and a
/// source config. Field order matters: processes go before the directory.
pub struct Rig {
    pub shim: Option<ShimProc>,
    pub proxy: Option<FaultProxy>,
    pub target: TargetProc,
    pub config: PathBuf,
    /// The source's (and the shim's) `state_dir`.
    pub state: PathBuf,
    pub target_state: PathBuf,
    pub disks: Vec<RigDisk>,
    /// Every disk's content before the guest wrote.
    pub initial: Vec<Vec<u8>>,
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// Builds the rig from `seed` (the initial content) and starts target and shim.
    pub fn new(seed: u64, spec: &RigSpec) -> Rig {
        let dir = scratch_dir();
        let key = dir.path().join("ferry.key");
        keygen(&key);
        let mut rng = Rng::new(seed);
        let mut disks = Vec::new();
        let mut initial = Vec::new();
        let half = (spec.disk_bytes / 2) as usize;
        for name in &spec.names {
            let image = dir.path().join(format!("{name}.img"));
            let mut content = vec![0u8; spec.disk_bytes as usize];
            rng.fill(&mut content[..half]);
            std::fs::write(&image, &content[..half]).unwrap();
            open_rw(&image).set_len(spec.disk_bytes).unwrap();
            initial.push(content);
            disks.push(RigDisk {
                name: name.to_string(),
                image,
                replica: dir.path().join(format!("{name}.replica")),
                socket: dir.path().join(format!("{name}.sock")),
            });
        }
        let target_state = dir.path().join("target-state");
        let replicas: Vec<(&str, &Path)> = disks
            .iter()
            .map(|d| (d.name.as_str(), d.replica.as_path()))
            .collect();
        let target = TargetProc::start_with(&dir.path().join("target.toml"), &[], |port| {
            format!(
                "[target]\nlisten = \"127.0.0.1:{port}\"\npsk_file = {}\nstate_dir = {}\nio_timeout_ms = {}\n{}",
                toml_path(&key),
                toml_path(&target_state),
                spec.target_io_timeout_ms,
                disk_entries(&replicas)
            )
        });
        let proxy = spec
            .proxy
            .then(|| FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], target.port))));
        let target_addr = match &proxy {
            Some(p) => p.addr.to_string(),
            None => target.addr(),
        };
        let state = dir.path().join("source-state");
        let mut toml = format!(
            "[source]\ntarget = \"{target_addr}\"\npsk_file = {}\nstate_dir = {}\n{}\n",
            toml_path(&key),
            toml_path(&state),
            spec.source_extra
        );
        for d in &disks {
            toml.push_str(&format!(
                "\n[[disk]]\nname = \"{}\"\npath = {}\nnbd_socket = {}\n",
                d.name,
                toml_path(&d.image),
                toml_path(&d.socket)
            ));
            if let Some(group) = spec.group {
                toml.push_str(&format!("group = \"{group}\"\n"));
            }
        }
        let config = dir.path().join("source.toml");
        std::fs::write(&config, toml).unwrap();
        let mut rig = Rig {
            shim: None,
            proxy,
            target,
            config,
            state,
            target_state,
            disks,
            initial,
            dir,
        };
        rig.start_shim();
        rig
    }

    /// A rig whose disks hold what `make(image, disk_bytes)` writes (a file system for
    /// a real guest, say) instead of random bytes. The shim stops while `make` runs and
    /// starts again on the new content, before any source ran: the first epoch copies
    /// it whole.
    pub fn with_images(spec: &RigSpec, make: impl Fn(&Path, u64)) -> Rig {
        let mut rig = Rig::new(0, spec);
        if let Some(shim) = rig.shim.take() {
            shim.stop();
        }
        for d in &rig.disks {
            make(&d.image, spec.disk_bytes);
        }
        rig.initial = rig.images();
        rig.start_shim();
        rig
    }

    pub fn start_shim(&mut self) {
        self.shim = Some(ShimProc::start(&self.config, &self.state));
    }

    /// kill -9 of the shim, if it runs.
    pub fn kill_shim(&mut self) {
        if let Some(shim) = self.shim.take() {
            shim.kill9();
        }
    }

    pub fn shim(&self) -> &ShimProc {
        self.shim.as_ref().expect("the shim runs")
    }

    /// The running shim's log (empty when none runs).
    pub fn shim_log(&self) -> String {
        self.shim.as_ref().map(ShimProc::log).unwrap_or_default()
    }

    /// The shim's `status` reply.
    pub fn shim_status(&self) -> serde_json::Value {
        self.shim().status()
    }

    pub fn proxy(&self) -> &FaultProxy {
        self.proxy.as_ref().expect("a rig with a proxy")
    }

    /// Kills the target and starts it again on the same config and port.
    pub fn restart_target(&mut self) -> Result<(), String> {
        self.target.kill();
        let (config, port) = (self.target.config.clone(), self.target.port);
        self.target = TargetProc::spawn(&config, port)?;
        Ok(())
    }

    pub fn replicas(&self) -> Vec<Vec<u8>> {
        self.disks
            .iter()
            .map(|d| std::fs::read(&d.replica).unwrap())
            .collect()
    }

    pub fn images(&self) -> Vec<Vec<u8>> {
        self.disks
            .iter()
            .map(|d| std::fs::read(&d.image).unwrap())
            .collect()
    }

    /// A log file of the rig's directory (`source.log`), empty if there is none yet.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// `ferry source --config` as a child, appending to `source.log`.
    pub fn start_source(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("source.log"))
            .unwrap();
        Command::new(ferry_bin())
            .args(["source", "--config"])
            .arg(&self.config)
            .env("NO_COLOR", "1")
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferry source")
    }

    /// Waits until `source.log` says an epoch is durable.
    pub fn wait_first_epoch(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log("source.log").contains("epoch durable") {
            assert!(
                Instant::now() < deadline,
                "no first epoch: {}",
                self.log("source.log")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One write of the guest's log: sequence number (from 1), disk index, byte range.
#[derive(Clone, Copy, Debug)]
pub struct Write {
    pub seq: u64,
    pub disk: usize,
    pub offset: u64,
    pub len: u64,
}

/// The guest: one write in flight, alternating between the disks, each sector stamped
/// with the write's sequence number, every write logged before it is issued (so
/// whatever reaches a replica is in the log). When the shim goes away it reconnects
/// and retries the write it was in (NBD writes are idempotent), counting the retry.
pub struct Guest {
    pub log: Arc<Mutex<Vec<Write>>>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    /// Writes that failed and were retried on a new connection.
    pub retries: Arc<AtomicU64>,
    /// The error that stopped a guest started with [`Guest::until_refused`].
    pub refused: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Guest {
    /// Starts writing: each write covers 1 to `max_sectors` sectors at a random place,
    /// `pace` apart (back to back when zero).
    pub fn start(rig: &Rig, seed: u64, max_sectors: u64, pace: Duration) -> Guest {
        Guest::spawn(rig, seed, max_sectors, pace, true)
    }

    /// Like [`Guest::start`], but the first write the shim refuses ends the guest (the
    /// error is kept in [`Guest::refused`]) instead of being retried. Every write is
    /// logged before it is issued, so the refused one is the log's last;
    /// [`Guest::acknowledged`] leaves it out.
    pub fn until_refused(rig: &Rig, seed: u64, max_sectors: u64) -> Guest {
        Guest::spawn(rig, seed, max_sectors, Duration::ZERO, false)
    }

    /// The writes the shim acknowledged (the log without a refused last write).
    pub fn acknowledged(&self) -> Vec<Write> {
        let mut log = self.log();
        if self.refused.lock().unwrap().is_some() {
            log.pop();
        }
        log
    }

    fn spawn(rig: &Rig, seed: u64, max_sectors: u64, pace: Duration, retry: bool) -> Guest {
        let log = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let retries = Arc::new(AtomicU64::new(0));
        let sockets: Vec<(PathBuf, String)> = rig
            .disks
            .iter()
            .map(|d| (d.socket.clone(), d.name.clone()))
            .collect();
        let disk_sectors = rig.initial[0].len() as u64 / SECTOR;
        let thread = {
            let (log, stop, done, retries) =
                (log.clone(), stop.clone(), done.clone(), retries.clone());
            let refused = refused.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed);
                let connect = |i: usize| {
                    connect_retry(&sockets[i].0, &sockets[i].1, Duration::from_secs(60))
                        .expect("connect to the shim")
                };
                let mut clients: Vec<NbdClient> = (0..sockets.len()).map(connect).collect();
                let mut seq = 0u64;
                let mut buf = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    seq += 1;
                    let disk = (seq as usize) % clients.len();
                    let sectors = 1 + rng.below(max_sectors);
                    let first = rng.below(disk_sectors - sectors + 1);
                    let w = Write {
                        seq,
                        disk,
                        offset: first * SECTOR,
                        len: sectors * SECTOR,
                    };
                    buf.clear();
                    for _ in 0..w.len / 8 {
                        buf.extend_from_slice(&seq.to_le_bytes());
                    }
                    log.lock().unwrap().push(w);
                    while let Err(e) = clients[disk].write(w.offset, &buf) {
                        if !retry {
                            *refused.lock().unwrap() = Some(e.to_string());
                            return;
                        }
                        retries.fetch_add(1, Ordering::Relaxed);
                        clients[disk] = connect(disk);
                    }
                    done.store(seq, Ordering::Release);
                    if !pace.is_zero() {
                        std::thread::sleep(pace);
                    }
                }
            })
        };
        Guest {
            log,
            stop,
            done,
            retries,
            refused,
            thread: Some(thread),
        }
    }

    /// Waits until `writes` more writes were acknowledged.
    pub fn wait_for(&self, writes: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let target = self.done.load(Ordering::Acquire) + writes;
        while self.done.load(Ordering::Acquire) < target {
            assert!(Instant::now() < deadline, "the guest stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The log so far.
    pub fn log(&self) -> Vec<Write> {
        self.log.lock().unwrap().clone()
    }

    /// Stops writing; returns the whole log.
    pub fn stop(&mut self) -> Vec<Write> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("guest thread");
        }
        self.log()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Checks that `replicas` are the disks after guest writes `1..=m` for some m — an
/// epoch as the source held it at its freeze, the same instant on every disk — and
/// nothing else; returns that m. Panics naming the first sector that proves otherwise,
/// prefixed with `when`.
pub fn assert_point_in_time(
    replicas: &[Vec<u8>],
    initial: &[Vec<u8>],
    log: &[Write],
    when: &str,
) -> u64 {
    let mut found = Vec::with_capacity(replicas.len());
    for (d, (replica, initial)) in replicas.iter().zip(initial).enumerate() {
        assert_eq!(replica.len(), initial.len(), "{when}: replica {d} size");
        let stamps: Vec<u64> = replica
            .chunks_exact(SECTOR as usize)
            .zip(initial.chunks_exact(SECTOR as usize))
            .enumerate()
            .map(|(s, (sector, before))| {
                stamp(sector, before).unwrap_or_else(|| {
                    panic!(
                        "{when}: disk {d} sector {s} holds neither its initial content nor \
                         one write (torn or foreign content)"
                    )
                })
            })
            .collect();
        found.push(stamps);
    }
    let m = found.iter().flatten().copied().max().unwrap_or(0);
    let mut expected: Vec<Vec<u64>> = found.iter().map(|f| vec![0; f.len()]).collect();
    for w in log.iter().take_while(|w| w.seq <= m) {
        for s in w.offset / SECTOR..(w.offset + w.len) / SECTOR {
            expected[w.disk][s as usize] = w.seq;
        }
    }
    for (d, (got, want)) in found.iter().zip(&expected).enumerate() {
        if let Some(s) = (0..got.len()).find(|&s| got[s] != want[s]) {
            panic!(
                "{when}: disk {d} sector {s} holds write {} but the cut at write {m} needs \
                 write {}: not a point in time",
                got[s], want[s]
            );
        }
    }
    m
}

/// The stamp of a sector: 0 if it holds its initial content, the write's sequence
/// number if it holds one write's stamp throughout, `None` if it holds anything else.
fn stamp(sector: &[u8], initial: &[u8]) -> Option<u64> {
    if sector == initial {
        return Some(0);
    }
    let seq = u64::from_le_bytes(sector[..8].try_into().unwrap());
    sector
        .chunks_exact(8)
        .all(|c| c == seq.to_le_bytes())
        .then_some(seq)
}

/// The sync mode of every disk of a `--json` report, in order.
pub fn modes(report: &serde_json::Value) -> Vec<String> {
    report["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("no disks[] in {report}"))
        .iter()
        .map(|d| d["mode"].as_str().unwrap().to_string())
        .collect()
}
