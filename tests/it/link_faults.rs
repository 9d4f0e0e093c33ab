//! Link faults between the source and the target, injected by a real TCP proxy
//! (`common::proxy`): a stalled or trickling link must fail an epoch within the
//! configured `io_timeout_ms`, in words, and give the shim's epoch back; and
//! continuous replication under a writing guest must ride out cuts at random byte
//! offsets in either direction, half-closed connections and stalls — the replicas
//! always an acknowledged point in time, every resume changed-block, and in the end
//! equal to the sources.

use crate::common;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::nbd::{connect_retry, NbdClient};
use crate::common::proxy::{Dir, Fault, FaultProxy};
use crate::common::shim::ShimProc;
use crate::common::*;

const SECTOR: u64 = 4096;
const DISK_BYTES: u64 = 8 << 20;
/// The source's `io_timeout_ms` in these tests: short, so faults cost little time.
const SOURCE_IO_TIMEOUT_MS: u64 = 1500;

/// A target, a proxy in front of it, a shim and a source config that goes through the
/// proxy; disks named `os` and `data`, the first half random, the rest a hole.
struct Rig {
    shim: Option<ShimProc>,
    proxy: FaultProxy,
    target: TargetProc,
    config: PathBuf,
    state: PathBuf,
    target_state: PathBuf,
    disks: Vec<(String, PathBuf, PathBuf, PathBuf)>, // name, image, replica, socket
    initial: Vec<Vec<u8>>,
    dir: tempfile::TempDir,
}

impl Rig {
    fn new(seed: u64, names: &[&str], disk_bytes: u64) -> Rig {
        let dir = scratch_dir();
        let key = dir.path().join("ferry.key");
        keygen(&key);
        let mut rng = Rng::new(seed);
        let mut disks = Vec::new();
        let mut initial = Vec::new();
        for name in names {
            let image = dir.path().join(format!("{name}.img"));
            let mut content = vec![0u8; disk_bytes as usize];
            rng.fill(&mut content[..(disk_bytes / 2) as usize]);
            std::fs::write(&image, &content[..(disk_bytes / 2) as usize]).unwrap();
            open_rw(&image).set_len(disk_bytes).unwrap();
            initial.push(content);
            disks.push((
                name.to_string(),
                image,
                dir.path().join(format!("{name}.replica")),
                dir.path().join(format!("{name}.sock")),
            ));
        }
        let target_state = dir.path().join("target-state");
        let target = start_target(dir.path(), &key, &target_state, &disks);
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], target.port)));
        let state = dir.path().join("source-state");
        let mut toml = format!(
            "[source]\ntarget = \"{}\"\npsk_file = {}\nstate_dir = {}\nio_timeout_ms = {SOURCE_IO_TIMEOUT_MS}\nconnect_timeout_ms = 2000\nepoch_interval_ms = 200\n",
            proxy.addr,
            toml_path(&key),
            toml_path(&state)
        );
        for (name, image, _, socket) in &disks {
            toml.push_str(&format!(
                "\n[[disk]]\nname = \"{name}\"\npath = {}\nnbd_socket = {}\n",
                toml_path(image),
                toml_path(socket)
            ));
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

    fn start_shim(&mut self) {
        self.shim = Some(ShimProc::start(&self.config, &self.state));
    }

    fn shim_status(&self) -> serde_json::Value {
        self.shim.as_ref().expect("the shim runs").status()
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

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Waits until the target has ended every session the proxy ever forwarded (it
    /// logs one line per connection, prefixed with the peer's address) and holds no
    /// undo log: nothing is being applied, the replicas are at rest.
    fn wait_target_quiet(&self, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.target.stderr();
            let open: Vec<SocketAddr> = self
                .proxy
                .upstream_peers()
                .into_iter()
                .filter(|p| !log.contains(&format!("{p}: ")))
                .collect();
            // Undo logs (and their commit marks) are files directly in undo/.
            let undo = std::fs::read_dir(self.target_state.join("undo"))
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                        .count()
                })
                .unwrap_or(0);
            if open.is_empty() && undo == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{why}: the target did not finish its sessions {open:?} ({undo} files in undo/):\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A target config of our own (the shared helper fixes `io_timeout_ms`), on a free
/// port, retried if the port was taken meanwhile.
fn start_target(
    dir: &Path,
    key: &Path,
    state: &Path,
    disks: &[(String, PathBuf, PathBuf, PathBuf)],
) -> TargetProc {
    let replicas: Vec<(&str, &Path)> = disks
        .iter()
        .map(|(n, _, r, _)| (n.as_str(), r.as_path()))
        .collect();
    let config = dir.join("target.toml");
    for _ in 0..5 {
        let port = free_port();
        let toml = format!(
            "[target]\nlisten = \"127.0.0.1:{port}\"\npsk_file = {}\nstate_dir = {}\nio_timeout_ms = 4000\n{}",
            toml_path(key),
            toml_path(state),
            disk_entries(&replicas)
        );
        std::fs::write(&config, toml).unwrap();
        match TargetProc::spawn(&config, port) {
            Ok(t) => return t,
            Err(e) if e.contains("in use") => continue,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no free port for the target");
}

/// `ferry sync`, retried while the target still holds the disks for a session the
/// proxy's fault left behind.
fn sync_ok_when_free(config: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = common::sync(config, &[]);
        if r.success() {
            return r.json();
        }
        assert!(
            r.stderr.contains("being replicated by another session") && Instant::now() < deadline,
            "ferry sync failed: {}",
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn modes(report: &serde_json::Value) -> Vec<String> {
    report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["mode"].as_str().unwrap().to_string())
        .collect()
}

/// Writes `blocks` distinct 64 KiB blocks of `disk` through the shim.
fn guest_writes(rig: &Rig, disk: usize, blocks: u64, rng: &mut Rng) {
    let (name, _, _, socket) = &rig.disks[disk];
    let mut client = NbdClient::connect(socket, name).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..blocks {
        rng.fill(&mut buf);
        client.write(b * 2 * BLOCK, &buf).unwrap();
    }
    client.flush().unwrap();
    client.disconnect().unwrap();
}

/// One stalled link, mid-epoch: the sync fails within a few `io_timeout_ms` saying
/// "timed out after", the shim's epoch is aborted at once with its bits back, and
/// the next sync ships them.
fn stalled_epoch(fault: Fault, test: &str) {
    let seed = test_seed(test);
    let mut rng = Rng::new(seed);
    let rig = Rig::new(seed, &["d1"], DISK_BYTES);
    let first = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&first), ["full"], "{first}");
    const WRITTEN: u64 = 48;
    guest_writes(&rig, 0, WRITTEN, &mut rng);
    let pauses = rig.shim_status()["pauses"]["count"].as_u64().unwrap();

    rig.proxy.arm(fault);
    let started = Instant::now();
    let r = common::sync(&rig.config, &[]);
    let took = started.elapsed();
    assert!(
        !r.success(),
        "the sync over a stalled link succeeded: {r:?}"
    );
    eprintln!("{test}: failed after {took:?}: {}", r.stderr.trim());
    let words = format!("timed out after {SOURCE_IO_TIMEOUT_MS} ms");
    assert!(
        r.stderr.contains(&words),
        "the error names the timeout ({words:?}): {}",
        r.stderr
    );
    assert!(
        took < Duration::from_millis(10 * SOURCE_IO_TIMEOUT_MS),
        "the sync took {took:?} to notice, io_timeout_ms = {SOURCE_IO_TIMEOUT_MS}"
    );
    assert!(rig.proxy.strikes() > 0, "the fault struck");
    // The stall hit a frozen epoch, and the shim has it back already.
    let status = rig.shim_status();
    assert_eq!(
        status["pauses"]["count"].as_u64().unwrap(),
        pauses + 1,
        "the stall hit after the freeze: {status}"
    );
    assert!(status["epoch"].is_null(), "the epoch was aborted: {status}");
    let dirty = status["disks"][0]["dirty_blocks"].as_u64().unwrap();
    assert!(
        dirty >= WRITTEN,
        "the aborted epoch's {WRITTEN} blocks are marked again: {status}"
    );

    rig.proxy.clear();
    rig.proxy.cut_all();
    let r = sync_ok_when_free(&rig.config);
    assert_eq!(modes(&r), ["changed"], "{r}");
    assert!(u64_field(&r, "blocks_sent") >= WRITTEN, "{r}");
    assert_eq!(rig.replicas(), rig.images());
}

/// The target's answers trickle, one byte every 100 ms, from the first frame after
/// the handshake: each read makes progress, so per-read socket timeouts never fire,
/// but no frame completes within io_timeout_ms.
#[test]
fn a_trickling_link_fails_the_epoch_within_io_timeout() {
    stalled_epoch(
        Fault::Trickle {
            dir: Dir::Down,
            // Challenge (32 + 72 bytes) and AuthOk (32) pass: the stall hits the
            // OpenOk of a frozen epoch.
            after: 136,
            every: Duration::from_millis(100),
        },
        "link_trickle",
    );
}

/// Nothing moves any more once the epoch's data started to flow.
#[test]
fn a_stalled_link_fails_the_epoch_within_io_timeout() {
    stalled_epoch(
        Fault::Stall {
            dir: Dir::Up,
            after: 64 << 10,
        },
        "link_stall",
    );
}

/// The link stalls while the source streams a whole-disk epoch far larger than the
/// socket buffers on the way: the source is stuck in a send, not waiting for an
/// answer, and must still give up within io_timeout_ms.
#[test]
fn a_link_that_stalls_mid_send_fails_the_epoch_within_io_timeout() {
    let seed = test_seed("link_stall_send");
    let rig = Rig::new(seed, &["d1"], 96 << 20);
    rig.proxy.arm(Fault::Stall {
        dir: Dir::Up,
        after: 1 << 20,
    });
    let started = Instant::now();
    let r = common::sync(&rig.config, &[]);
    let took = started.elapsed();
    assert!(
        !r.success(),
        "the sync over a stalled link succeeded: {r:?}"
    );
    eprintln!(
        "link_stall_send: failed after {took:?}: {}",
        r.stderr.trim()
    );
    let words = format!("sending frame: timed out after {SOURCE_IO_TIMEOUT_MS} ms");
    assert!(
        r.stderr.contains(&words),
        "the error names the send that timed out ({words:?}): {}",
        r.stderr
    );
    assert!(
        took < Duration::from_millis(10 * SOURCE_IO_TIMEOUT_MS),
        "the sync took {took:?} to notice, io_timeout_ms = {SOURCE_IO_TIMEOUT_MS}"
    );
    let status = rig.shim_status();
    assert!(status["epoch"].is_null(), "the epoch was aborted: {status}");
    rig.proxy.clear();
    rig.proxy.cut_all();
    // The failed session created the replica but never committed an epoch to it:
    // the next whole-disk epoch compares it by hash.
    let r = sync_ok_when_free(&rig.config);
    assert_eq!(modes(&r), ["seeded"], "{r}");
    assert!(rig.replicas() == rig.images(), "replica equals image");
}

// ---------------------------------------------------------------------------------
// Continuous replication under link faults.

/// One guest write: sequence number (from 1), disk, byte range.
#[derive(Clone, Copy, Debug)]
struct Write {
    seq: u64,
    disk: usize,
    offset: u64,
    len: u64,
}

/// The guest: one write in flight, alternating between the disks, each 4 KiB sector
/// stamped with the write's sequence number, every write logged before it is issued.
struct Guest {
    log: Arc<Mutex<Vec<Write>>>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Guest {
    fn start(rig: &Rig, seed: u64, pace: Duration) -> Guest {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let sockets: Vec<(PathBuf, String)> = rig
            .disks
            .iter()
            .map(|(n, _, _, s)| (s.clone(), n.clone()))
            .collect();
        let thread = {
            let (log, stop, done, failures) =
                (log.clone(), stop.clone(), done.clone(), failures.clone());
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
                    let sectors = 1 + rng.below(16);
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
                    log.lock().unwrap().push(w);
                    while clients[disk].write(w.offset, &buf).is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                        clients[disk] = connect(disk);
                    }
                    done.store(seq, Ordering::Release);
                    std::thread::sleep(pace);
                }
            })
        };
        Guest {
            log,
            stop,
            done,
            failures,
            thread: Some(thread),
        }
    }

    fn wait_for(&self, writes: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let target = self.done.load(Ordering::Acquire) + writes;
        while self.done.load(Ordering::Acquire) < target {
            assert!(Instant::now() < deadline, "the guest stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(&mut self) -> Vec<Write> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("guest thread");
        }
        self.log.lock().unwrap().clone()
    }

    fn log(&self) -> Vec<Write> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The replicas must be the disks after guest writes `1..=m` for some `m` — an
/// epoch as the source held it at its freeze — and nothing else. Returns `m`.
fn acknowledged_cut(replicas: &[Vec<u8>], initial: &[Vec<u8>], log: &[Write], when: &str) -> u64 {
    let sectors = (DISK_BYTES / SECTOR) as usize;
    let mut found = vec![vec![0u64; sectors]; replicas.len()];
    for (d, replica) in replicas.iter().enumerate() {
        assert_eq!(replica.len() as u64, DISK_BYTES, "{when}: replica {d} size");
        for (s, f) in found[d].iter_mut().enumerate() {
            let at = s * SECTOR as usize..(s + 1) * SECTOR as usize;
            let sector = &replica[at.clone()];
            *f = if sector == &initial[d][at] {
                0
            } else {
                let seq = u64::from_le_bytes(sector[..8].try_into().unwrap());
                assert!(
                    sector.chunks_exact(8).all(|c| c == seq.to_le_bytes()),
                    "{when}: disk {d} sector {s} holds neither its initial content nor one write"
                );
                seq
            };
        }
    }
    let m = found.iter().flatten().copied().max().unwrap_or(0);
    let mut expected = vec![vec![0u64; sectors]; replicas.len()];
    for w in log.iter().take_while(|w| w.seq <= m) {
        for s in w.offset / SECTOR..(w.offset + w.len) / SECTOR {
            expected[w.disk][s as usize] = w.seq;
        }
    }
    for (d, (got, want)) in found.iter().zip(&expected).enumerate() {
        if let Some(s) = (0..sectors).find(|&s| got[s] != want[s]) {
            panic!(
                "{when}: disk {d} sector {s} holds write {} but the cut at write {m} needs write {}: not an epoch",
                got[s], want[s]
            );
        }
    }
    m
}

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

/// Issue 8, item 14. `FERRY_SOAK=1` makes it 100 faults; `FERRY_TEST_SEED` replays
/// one run.
#[test]
fn continuous_replication_rides_out_cuts_half_closes_and_stalls() {
    let seed = test_seed("link_faults");
    let faults = if soak() { 100 } else { 6 };
    let mut rng = Rng::new(seed);
    let rig = Rig::new(seed, &["os", "data"], DISK_BYTES);
    let mut guest = Guest::start(&rig, seed ^ 0x9e37, Duration::from_millis(1));
    let mut source = start_source(&rig);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !rig.log("source.log").contains("epoch durable") {
        assert!(
            Instant::now() < deadline,
            "no first epoch: {}",
            rig.log("source.log")
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut last_m = 0;
    let mut kinds = [0u32; 4];
    for n in 0..faults {
        guest.wait_for(20 + rng.below(100));
        let dir = if rng.below(2) == 0 {
            Dir::Up
        } else {
            Dir::Down
        };
        // Offsets reach past one epoch in both directions (an epoch sends a few
        // hundred bytes down, tens to hundreds of KiB up), so some strike the next.
        let after = match dir {
            Dir::Up => rng.below(512 << 10),
            Dir::Down => rng.below(600),
        };
        let kind = rng.below(4) as usize;
        kinds[kind] += 1;
        let fault = match kind {
            0 | 1 => Fault::Cut { dir, after },
            2 => Fault::HalfClose { dir, after },
            _ => Fault::Stall { dir, after },
        };
        let when = format!("fault {n} ({fault:?}, seed {seed})");
        let strikes = rig.proxy.strikes();
        rig.proxy.arm(fault);
        let until = Instant::now() + Duration::from_secs(120);
        while rig.proxy.strikes() == strikes {
            assert!(
                Instant::now() < until,
                "{when}: never struck; source log:\n{}",
                rig.log("source.log")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if matches!(fault, Fault::Stall { .. }) {
            // Let the source's own deadline find the stall.
            std::thread::sleep(Duration::from_millis(2 * SOURCE_IO_TIMEOUT_MS));
        }
        rig.proxy.clear();
        // Quiet the link and look: the replicas are an acknowledged epoch, no older
        // than the last one seen.
        rig.proxy.hold();
        rig.wait_target_quiet(&when);
        let m = acknowledged_cut(&rig.replicas(), &rig.initial, &guest.log(), &when);
        assert!(
            m >= last_m,
            "{when}: the replicas went back from write {last_m} to {m}"
        );
        last_m = m;
        rig.proxy.release();
    }

    // Catch up: the guest stops, replication goes on until the replicas match.
    let log = guest.stop();
    let deadline = Instant::now() + Duration::from_secs(180);
    while rig.replicas() != rig.images() {
        assert!(
            Instant::now() < deadline,
            "the replicas did not catch up; source log:\n{}",
            rig.log("source.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = source.kill();
    let _ = source.wait();
    rig.proxy.hold();
    rig.wait_target_quiet("the end");
    assert_eq!(
        acknowledged_cut(&rig.replicas(), &rig.initial, &log, "the end"),
        log.len() as u64,
        "the last epoch holds every write"
    );
    assert_eq!(rig.replicas(), rig.images(), "replica equals source");
    assert_eq!(
        guest.failures.load(Ordering::Relaxed),
        0,
        "link faults never reach the guest's I/O"
    );

    let source_log = rig.log("source.log");
    let durable: Vec<&str> = source_log
        .lines()
        .filter(|l| l.contains("epoch durable"))
        .collect();
    let failed = source_log
        .lines()
        .filter(|l| l.contains("epoch failed"))
        .count();
    assert!(failed > 0, "the faults failed epochs: {source_log}");
    if kinds[3] > 0 {
        let words = format!("timed out after {SOURCE_IO_TIMEOUT_MS} ms");
        assert!(
            source_log.contains(&words),
            "a stall was found by the source's own deadline ({words:?}): {source_log}"
        );
    }
    // The first epoch copies the new replicas whole; every resume after a fault is
    // changed-block: no full or seeded resync.
    for l in &durable[1..] {
        assert!(
            l.contains("os=changed") && l.contains("data=changed"),
            "a resume was not changed-block: {l}"
        );
    }
    eprintln!(
        "link_faults: seed {seed}: {faults} faults (cut {}, half-close {}, stall {}), {} epochs durable, {failed} failed, {} guest writes",
        kinds[0] + kinds[1],
        kinds[2],
        kinds[3],
        durable.len(),
        log.len()
    );
}
