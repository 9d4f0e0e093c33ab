//! Live epochs: replication of disks a guest keeps writing through the shim.
//!
//! A sequential writer (one request in flight, alternating between two disks of one
//! consistency group) stamps every 4 KiB sector it writes with the write's sequence
//! number. Because each write is acknowledged before the next is issued, a
//! point-in-time cut of the group is exactly "writes 1..=m applied, none after" for
//! some m. After every epoch the test reads the replicas and checks that they are
//! such a cut: it finds m as the newest stamp present and verifies every sector of
//! both disks against the log replayed up to m. A write after the freeze leaking into
//! the epoch, a write before it missing, or the two disks cut at different instants
//! all fail that check.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::nbd::{connect_retry, NbdClient};
use crate::common::shim::ShimProc;
use crate::common::*;

const SECTOR: u64 = 4096;
const DISK_BYTES: u64 = 8 << 20;

/// One write of the log: sequence number (from 1), disk index, byte range.
#[derive(Clone, Copy, Debug)]
struct Write {
    seq: u64,
    disk: usize,
    offset: u64,
    len: u64,
}

/// A scratch rig: target process, shim process, two disks, a source config.
struct Rig {
    shim: Option<ShimProc>,
    target: TargetProc,
    config: PathBuf,
    state: PathBuf,
    disks: Vec<(String, PathBuf, PathBuf, PathBuf)>, // name, image, replica, socket
    initial: Vec<Vec<u8>>,
    dir: tempfile::TempDir,
}

impl Rig {
    fn new(seed: u64, extra: &str) -> Rig {
        let dir = scratch_dir();
        let key = dir.path().join("ferry.key");
        keygen(&key);
        let mut rng = Rng::new(seed);
        let mut disks = Vec::new();
        let mut initial = Vec::new();
        for name in ["os", "data"] {
            let image = dir.path().join(format!("{name}.img"));
            let mut content = vec![0u8; DISK_BYTES as usize];
            // Random data in the first half, a hole in the second.
            rng.fill(&mut content[..(DISK_BYTES / 2) as usize]);
            std::fs::write(&image, &content[..(DISK_BYTES / 2) as usize]).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap()
                .set_len(DISK_BYTES)
                .unwrap();
            initial.push(content);
            disks.push((
                name.to_string(),
                image,
                dir.path().join(format!("{name}.replica")),
                dir.path().join(format!("{name}.sock")),
            ));
        }
        let replicas: Vec<(&str, &Path)> = disks
            .iter()
            .map(|(n, _, r, _)| (n.as_str(), r.as_path()))
            .collect();
        let target = TargetProc::start(dir.path(), &key, &replicas, "");
        let state = dir.path().join("source-state");
        let mut toml = format!(
            "[source]\ntarget = \"127.0.0.1:{}\"\npsk_file = {}\nstate_dir = {}\nio_timeout_ms = 20000\nepoch_interval_ms = 200\n{extra}\n",
            target.port,
            toml_path(&key),
            toml_path(&state)
        );
        for (name, image, _, socket) in &disks {
            toml.push_str(&format!(
                "\n[[disk]]\nname = \"{name}\"\npath = {}\nnbd_socket = {}\ngroup = \"vm1\"\n",
                toml_path(image),
                toml_path(socket)
            ));
        }
        let config = dir.path().join("source.toml");
        std::fs::write(&config, toml).unwrap();
        let mut rig = Rig {
            shim: None,
            target,
            config,
            state,
            disks,
            initial,
            dir,
        };
        rig.start_shim();
        rig
    }

    fn start_shim(&mut self) {
        self.shim = Some(ShimProc::start(&self.config, &self.state));
    }

    fn kill_shim(&mut self) {
        if let Some(shim) = self.shim.take() {
            shim.kill9();
        }
    }

    fn shim(&self) -> &ShimProc {
        self.shim.as_ref().expect("the shim runs")
    }

    fn shim_log(&self) -> String {
        self.shim.as_ref().map(ShimProc::log).unwrap_or_default()
    }

    /// The shim's `status` reply.
    fn shim_status(&self) -> serde_json::Value {
        self.shim().status()
    }

    fn replicas(&self) -> Vec<Vec<u8>> {
        self.disks
            .iter()
            .map(|(_, _, r, _)| std::fs::read(r).unwrap())
            .collect()
    }

    fn images(&self) -> Vec<Vec<u8>> {
        self.disks
            .iter()
            .map(|(_, i, _, _)| std::fs::read(i).unwrap())
            .collect()
    }
}

/// The guest: writes stamped sectors, sequentially, reconnecting when the shim goes
/// away and retrying the write it was in (NBD writes are idempotent).
struct Writer {
    log: Arc<Mutex<Vec<Write>>>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    /// Writes that failed and were retried on a new connection.
    retries: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(rig: &Rig, seed: u64, pace: Duration) -> Writer {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let retries = Arc::new(AtomicU64::new(0));
        let sockets: Vec<(PathBuf, String)> = rig
            .disks
            .iter()
            .map(|(n, _, _, s)| (s.clone(), n.clone()))
            .collect();
        let thread = {
            let (log, stop, done, retried) =
                (log.clone(), stop.clone(), done.clone(), retries.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed);
                let connect = |i: usize| {
                    connect_retry(&sockets[i].0, &sockets[i].1, Duration::from_secs(60))
                        .expect("reconnect to the shim")
                };
                let mut clients: Vec<NbdClient> = (0..sockets.len()).map(connect).collect();
                let mut seq = 0u64;
                let mut buf = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    seq += 1;
                    let disk = (seq % 2) as usize;
                    let sectors = 1 + rng.below(24);
                    let first = rng.below(DISK_BYTES / SECTOR - sectors + 1);
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
                    // Logged before it is issued: whatever reaches a replica is in the log.
                    log.lock().unwrap().push(w);
                    loop {
                        match clients[disk].write(w.offset, &buf) {
                            Ok(()) => break,
                            Err(_) => {
                                retried.fetch_add(1, Ordering::Relaxed);
                                clients[disk] = connect(disk);
                            }
                        }
                    }
                    done.store(seq, Ordering::Release);
                    if !pace.is_zero() {
                        std::thread::sleep(pace);
                    }
                }
            })
        };
        Writer {
            log,
            stop,
            done,
            retries,
            thread: Some(thread),
        }
    }

    fn wait_for(&self, writes: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let target = self.done.load(Ordering::Acquire) + writes;
        while self.done.load(Ordering::Acquire) < target {
            assert!(Instant::now() < deadline, "the writer stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(&mut self) -> Vec<Write> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread");
        }
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
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

/// Checks that `replicas` are the disks after writes `1..=m` for some m, and returns
/// that m. Panics naming the first sector that proves otherwise.
#[allow(clippy::needless_range_loop)] // (disk, sector) indexes three tables at once
fn assert_point_in_time(replicas: &[Vec<u8>], initial: &[Vec<u8>], log: &[Write]) -> u64 {
    let sectors = (DISK_BYTES / SECTOR) as usize;
    let mut stamps = vec![vec![0u64; sectors]; replicas.len()];
    for (d, replica) in replicas.iter().enumerate() {
        assert_eq!(replica.len() as u64, DISK_BYTES, "replica {d} size");
        for s in 0..sectors {
            let r = s * SECTOR as usize..(s + 1) * SECTOR as usize;
            stamps[d][s] = stamp(&replica[r.clone()], &initial[d][r])
                .unwrap_or_else(|| panic!("disk {d} sector {s}: torn or foreign content"));
        }
    }
    let m = stamps.iter().flatten().copied().max().unwrap_or(0);
    let mut expected = vec![vec![0u64; sectors]; replicas.len()];
    for w in log.iter().take_while(|w| w.seq <= m) {
        for s in w.offset / SECTOR..(w.offset + w.len) / SECTOR {
            expected[w.disk][s as usize] = w.seq;
        }
    }
    for d in 0..replicas.len() {
        for s in 0..sectors {
            assert_eq!(
                stamps[d][s], expected[d][s],
                "disk {d} sector {s}: the replica holds write {} but the cut at write {m} \
                 needs write {} — not a point in time",
                stamps[d][s], expected[d][s]
            );
        }
    }
    m
}

fn modes(report: &serde_json::Value) -> Vec<String> {
    report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["mode"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn live_epochs_are_group_consistent_points_in_time_while_the_guest_writes() {
    let seed = test_seed("live_epochs");
    let rig = Rig::new(seed, "");
    // First epoch: new replicas, whole-disk copy of a live, frozen group.
    let mut writer = Writer::start(&rig, seed ^ 1, Duration::ZERO);
    writer.wait_for(50);
    let first = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&first), ["full", "full"], "{first}");
    assert!(first["shim_epoch"].is_string(), "a live epoch: {first}");
    let log = writer.log.lock().unwrap().clone();
    let mut last_m = assert_point_in_time(&rig.replicas(), &rig.initial, &log);

    for round in 0..6 {
        writer.wait_for(30 + 20 * round);
        let r = sync_ok(&rig.config, &[]);
        assert_eq!(modes(&r), ["changed", "changed"], "round {round}: {r}");
        let log = writer.log.lock().unwrap().clone();
        let m = assert_point_in_time(&rig.replicas(), &rig.initial, &log);
        assert!(
            m > last_m,
            "round {round}: the cut moved forward ({last_m} -> {m})"
        );
        last_m = m;
    }
    let log = writer.stop();
    let r = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&r), ["changed", "changed"]);
    assert_eq!(
        assert_point_in_time(&rig.replicas(), &rig.initial, &log),
        log.len() as u64,
        "after the last epoch the replicas hold every write"
    );
    assert_eq!(rig.replicas(), rig.images());
    let status = rig.shim_status();
    for d in status["disks"].as_array().unwrap() {
        assert_eq!(
            d["dirty_blocks"], 0,
            "committed epochs cleared the bits: {d}"
        );
        assert_eq!(
            d["resync_required"], false,
            "the first epoch was the resync: {d}"
        );
    }
    assert!(status["epoch"].is_null(), "no epoch left frozen: {status}");
    assert!(status["pauses"]["count"].as_u64().unwrap() >= 8, "{status}");
}

#[test]
fn shim_kill_9_under_writes_loses_no_change_and_needs_no_resync() {
    let seed = test_seed("live_shim_kill");
    let mut rig = Rig::new(seed, "");
    sync_ok(&rig.config, &[]);
    let generation: Vec<serde_json::Value> = rig.shim_status()["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["generation_id"].clone())
        .collect();
    let mut writer = Writer::start(&rig, seed ^ 2, Duration::ZERO);
    let mut rng = Rng::new(seed);
    for cycle in 0..4 {
        writer.wait_for(20 + rng.below(80));
        rig.kill_shim();
        std::thread::sleep(Duration::from_millis(rng.below(100)));
        rig.start_shim();
        writer.wait_for(10);
        let r = sync_ok(&rig.config, &[]);
        assert_eq!(
            modes(&r),
            ["changed", "changed"],
            "cycle {cycle}: no resync after a shim crash: {r}\n{}",
            rig.shim_log()
        );
        let log = writer.log.lock().unwrap().clone();
        assert_point_in_time(&rig.replicas(), &rig.initial, &log);
    }
    let log = writer.stop();
    sync_ok(&rig.config, &[]);
    assert_eq!(
        assert_point_in_time(&rig.replicas(), &rig.initial, &log),
        log.len() as u64
    );
    assert_eq!(
        rig.replicas(),
        rig.images(),
        "replica equals source after catch-up"
    );
    let now: Vec<serde_json::Value> = rig.shim_status()["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["generation_id"].clone())
        .collect();
    assert_eq!(now, generation, "tracking continued in the same generation");
}

#[test]
fn an_engine_killed_mid_epoch_gives_its_bits_back() {
    let seed = test_seed("live_engine_kill");
    let rig = Rig::new(seed, "");
    sync_ok(&rig.config, &[]);
    let mut writer = Writer::start(&rig, seed ^ 3, Duration::ZERO);
    writer.wait_for(200);
    // Hold an epoch on a control connection and drop it: the shim must abort it.
    {
        use std::io::{BufRead, BufReader, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(rig.shim().control_path()).unwrap();
        s.write_all(b"freeze\n").unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        let frozen: u64 = v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["frozen_blocks"].as_u64().unwrap())
            .sum();
        assert!(frozen > 0, "{v}");
        // A second engine is refused while it is held.
        let r = common::sync(&rig.config, &[]);
        assert!(!r.success());
        assert!(r.stderr.contains("already frozen"), "{}", r.stderr);
    }
    // Dropped: the shim aborts it as soon as it sees the connection close.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rig.shim_status()["epoch"].is_null() {
        assert!(
            Instant::now() < deadline,
            "the abandoned epoch was not aborted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The next sync carries those blocks.
    writer.wait_for(20);
    let log = writer.stop();
    let r = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&r), ["changed", "changed"]);
    assert_eq!(
        assert_point_in_time(&rig.replicas(), &rig.initial, &log),
        log.len() as u64
    );
    assert_eq!(rig.replicas(), rig.images());
}

/// `ferry source --config` as a child, logging to a file.
fn start_source(rig: &Rig) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(rig.dir.path().join("source.log"))
        .unwrap();
    Command::new(ferry_bin())
        .args(["source", "--config"])
        .arg(&rig.config)
        .env("NO_COLOR", "1")
        .env("FERRY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn ferry source")
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Issue 4's torture test: continuous replication under a writing guest, with kill -9
/// of the engine, of the target, or of both at random moments. After every crash of
/// the target the replicas must be a point in time no older than the last one seen
/// (acknowledged epochs survive), replication resumes without a seeded or full
/// resync, and at the end the replicas equal the sources. `FERRY_SOAK=1` runs 40
/// cycles instead of 6.
#[test]
fn continuous_replication_rides_out_kill_9_of_engine_and_target() {
    let seed = test_seed("live_torture");
    let cycles = if std::env::var_os("FERRY_SOAK").is_some() {
        40
    } else {
        6
    };
    let mut rig = Rig::new(seed, "");
    let mut rng = Rng::new(seed);
    let mut writer = Writer::start(&rig, seed ^ 4, Duration::from_micros(300));
    let mut source = start_source(&rig);
    // The first epoch creates the replicas; crashes start once one is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(rig.dir.path().join("source.log"))
        .unwrap_or_default()
        .contains("epoch durable")
    {
        assert!(Instant::now() < deadline, "no first epoch");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut last_m = 0;
    let mut checks = 0;
    for cycle in 0..cycles {
        std::thread::sleep(Duration::from_millis(300 + rng.below(900)));
        match rng.below(3) {
            0 => {
                // The engine alone: its epoch is aborted (shim) and rolled back (target).
                kill(&mut source);
            }
            victim => {
                kill(&mut source);
                if victim == 2 {
                    std::thread::sleep(Duration::from_millis(rng.below(50)));
                }
                rig.target.kill();
                let (config, port) = (rig.target.config.clone(), rig.target.port);
                rig.target = TargetProc::spawn(&config, port)
                    .unwrap_or_else(|e| panic!("cycle {cycle}: target restart: {e}"));
                // Nothing is replicating now: the replicas must be an acknowledged cut.
                let log = writer.log.lock().unwrap().clone();
                let m = assert_point_in_time(&rig.replicas(), &rig.initial, &log);
                assert!(
                    m >= last_m,
                    "cycle {cycle}: an acknowledged epoch was lost ({last_m} -> {m})"
                );
                last_m = m;
                checks += 1;
            }
        }
        source = start_source(&rig);
    }
    // Catch up: the guest stops, the engine keeps going until the replicas match.
    let log = writer.stop();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if rig.replicas() == rig.images() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not catch up; source log:\n{}",
            std::fs::read_to_string(rig.dir.path().join("source.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    kill(&mut source);
    assert_eq!(
        assert_point_in_time(&rig.replicas(), &rig.initial, &log),
        log.len() as u64
    );
    assert_eq!(
        writer.retries.load(Ordering::Relaxed),
        0,
        "killing the engine or the target never disturbed the guest's I/O"
    );
    let source_log = std::fs::read_to_string(rig.dir.path().join("source.log")).unwrap_or_default();
    let durable: Vec<&str> = source_log
        .lines()
        .filter(|l| l.contains("epoch durable"))
        .collect();
    assert!(durable.len() > cycles, "epochs went through: {source_log}");
    // Only the very first epoch copies whole disks; every resume is changed-block.
    for l in &durable[1..] {
        assert!(
            l.contains("os=changed") && l.contains("data=changed"),
            "a resume needed a resync: {l}"
        );
    }
    eprintln!(
        "{cycles} cycles, {checks} target crashes checked, {} epochs, {} writes",
        durable.len(),
        log.len()
    );
}

/// The image changed while no shim ran: tracking cannot be trusted, the shim says so
/// (new generation, `resync_required`), the next sync is a checksum compare whatever
/// the engine's records say, and the flag clears once it is done.
#[test]
fn an_image_changed_behind_the_shim_forces_one_seeded_resync() {
    let seed = test_seed("live_untrusted");
    let mut rig = Rig::new(seed, "");
    sync_ok(&rig.config, &[]);
    let before = rig.shim_status();
    // Clean stop, then a write nobody tracked.
    rig.shim.take().expect("the shim runs").stop();
    std::thread::sleep(Duration::from_millis(20)); // mtime granularity
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&rig.disks[1].1)
            .unwrap();
        f.write_all_at(&[0x5a; 8192], 3 << 20).unwrap();
    }
    rig.start_shim();
    let after = rig.shim_status();
    let data = &after["disks"][1];
    assert_eq!(data["resync_required"], true, "{after}");
    assert_eq!(data["resync_reason"], "image-modified", "{after}");
    assert_ne!(
        data["generation_id"], before["disks"][1]["generation_id"],
        "a new generation"
    );
    assert_eq!(after["disks"][0]["resync_required"], false, "{after}");
    let r = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&r), ["changed", "seeded"], "{r}");
    assert_eq!(
        rig.replicas(),
        rig.images(),
        "the untracked write reached the replica"
    );
    assert_eq!(rig.shim_status()["disks"][1]["resync_required"], false);
    let r = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&r), ["changed", "changed"], "{r}");
}

/// While the target is unreachable the guest is never paused: the engine reaches the
/// target before it freezes.
#[test]
fn an_unreachable_target_costs_the_guest_no_freeze() {
    let seed = test_seed("live_target_down");
    let mut rig = Rig::new(seed, "");
    sync_ok(&rig.config, &[]);
    let pauses = |rig: &Rig| rig.shim_status()["pauses"]["count"].as_u64().unwrap();
    let before = pauses(&rig);
    rig.target.kill();
    let r = common::sync(&rig.config, &[]);
    assert!(!r.success());
    assert!(r.stderr.contains("cannot reach the target"), "{}", r.stderr);
    assert_eq!(
        pauses(&rig),
        before,
        "no freeze for an epoch that cannot go anywhere"
    );
    let (config, port) = (rig.target.config.clone(), rig.target.port);
    rig.target = TargetProc::spawn(&config, port).unwrap();
    let r = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&r), ["changed", "changed"], "{r}");
    assert_eq!(pauses(&rig), before + 1);
}
