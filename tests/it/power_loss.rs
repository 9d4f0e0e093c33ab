//! Power loss, not only kill -9 (issue 8, item 15).
//!
//! A killed process leaves its unsynced writes in the page cache, so a kill -9 test
//! passes even when an fsync is missing. Here every file ferry keeps — both images, both
//! replicas, the shim's and the engine's `state_dir` (bitmaps, state files, epoch
//! files), the target's `state_dir` (undo logs, recovery points, records) — lives on
//! `ferry-powerfail`, a FUSE file system that keeps what was not synced apart and
//! drops it (or a random part of it) when the test cuts the power. The NBD sockets
//! stay on an ordinary directory; the shim's control socket lives in its `state_dir`,
//! on the mount (Unix sockets work there).
//!
//! A guest writes stamped 4 KiB sectors through the shim, one request at a time, and
//! flushes now and then; `ferry source` replicates continuously to `ferry target`. At a
//! random moment the power goes: the file system answers EIO from then on, every
//! process is killed -9, the mount is replaced by one that holds only what was
//! durable. Then, before anything restarts, every source image must be a state the guest
//! could see after a power loss: each sector holds its last flushed write or a later
//! one (never an older one).
//!
//! Then the target restarts (it recovers before it listens), and every replica must be
//! a point in time of the source: the writes of this power cycle up to some m over the
//! content it started from, on both disks of the group at once.
//!
//! Then shim and engine restart without the guest, and the replicas must catch
//! up to exactly the source images with changed-block epochs: no lost change (a block
//! that differs and is not marked in a bitmap never catches up), no resync.
//!
//! Seeded: the seed is printed, `FERRY_TEST_SEED` replays the choices (the timing of a
//! loaded machine does not replay). Short by default; `FERRY_SOAK=1` cuts 30 times.
//! Without FUSE the test prints SKIP, unless `FERRY_REQUIRE` contains `fuse`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::nbd::{connect_retry, NbdClient};
use crate::common::shim::ShimProc;
use crate::common::*;
use ferry_powerfail::{CutMode, PowerFailFs};

const SECTOR: u64 = 4096;
const DISK_BYTES: u64 = 4 << 20;
const SECTORS: usize = (DISK_BYTES / SECTOR) as usize;
const DISKS: [&str; 2] = ["os", "data"];
/// Power cycles of the default run: short, and each still cuts under a writing guest
/// during continuous epochs.
const CUTS: u64 = 6;
const SOAK_CUTS: u64 = 30;
/// How long the replicas may take to catch up after a restart. Generous: the machine is
/// shared; a lost change never catches up, whatever the wait.
const CATCH_UP: Duration = Duration::from_secs(90);

/// One write of the guest's log.
#[derive(Clone, Copy, Debug)]
struct Write {
    seq: u64,
    disk: usize,
    first_sector: usize,
    sectors: usize,
    /// A flush of its disk completed after it was acknowledged: it survives power loss.
    flushed: bool,
}

/// The guest: sequential stamped writes, a flush after some of them. Unlike a guest of
/// the kill -9 tests it does not reconnect: when the power goes, the VM goes with it.
struct Guest {
    log: Arc<Mutex<Vec<Write>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Guest {
    /// `flush_one_in`: the chance of a flush after a write is 1 in that (0: never).
    fn start(sockets: Vec<PathBuf>, first_seq: u64, seed: u64, flush_one_in: u64) -> Guest {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed);
                let mut clients: Vec<NbdClient> = sockets
                    .iter()
                    .zip(DISKS)
                    .map(|(s, name)| {
                        connect_retry(s, name, Duration::from_secs(30)).expect("connect the guest")
                    })
                    .collect();
                let mut seq = first_seq;
                let mut buf = Vec::new();
                // Index in the log of each disk's writes not yet covered by a flush.
                let mut unflushed: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
                while !stop.load(Ordering::Acquire) {
                    seq += 1;
                    let disk = rng.below(2) as usize;
                    let sectors = 1 + rng.below(16) as usize;
                    let first_sector = rng.below((SECTORS - sectors + 1) as u64) as usize;
                    buf.clear();
                    for _ in 0..sectors as u64 * SECTOR / 8 {
                        buf.extend_from_slice(&seq.to_le_bytes());
                    }
                    let index = {
                        // Logged before it is issued: whatever reaches a disk is in the log.
                        let mut log = log.lock().unwrap();
                        log.push(Write {
                            seq,
                            disk,
                            first_sector,
                            sectors,
                            flushed: false,
                        });
                        log.len() - 1
                    };
                    if clients[disk]
                        .write(first_sector as u64 * SECTOR, &buf)
                        .is_err()
                    {
                        return;
                    }
                    unflushed[disk].push(index);
                    if flush_one_in > 0 && rng.below(flush_one_in) == 0 {
                        if clients[disk].flush().is_err() {
                            return;
                        }
                        let mut log = log.lock().unwrap();
                        for i in unflushed[disk].drain(..) {
                            log[i].flushed = true;
                        }
                    }
                    if rng.below(8) == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        };
        Guest {
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn writes(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Stops the guest (or collects it after the power went) and returns its log.
    fn stop(&mut self) -> Vec<Write> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("guest thread");
        }
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The stamp of a sector holding one write's content throughout, if it does.
fn stamp(sector: &[u8]) -> Option<u64> {
    let seq = u64::from_le_bytes(sector[..8].try_into().unwrap());
    sector
        .chunks_exact(8)
        .all(|c| c == seq.to_le_bytes())
        .then_some(seq)
}

fn sector(image: &[u8], s: usize) -> &[u8] {
    &image[s * SECTOR as usize..(s + 1) * SECTOR as usize]
}

/// Checks a source image after the cut against what the guest was promised: each
/// sector holds its last flushed write, or a later write, or (if no write to it was
/// flushed) its content before this power cycle.
#[allow(clippy::needless_range_loop)] // a sector indexes three tables at once
fn assert_source_survived(cut: u64, disk: usize, image: &[u8], base: &[u8], log: &[Write]) {
    assert_eq!(
        image.len() as u64,
        DISK_BYTES,
        "cut {cut}: source {disk} size"
    );
    // Per sector: the seq of its last flushed write (0: none), and every seq written.
    let mut floor = vec![0u64; SECTORS];
    let mut written: Vec<Vec<u64>> = vec![Vec::new(); SECTORS];
    for w in log.iter().filter(|w| w.disk == disk) {
        for s in w.first_sector..w.first_sector + w.sectors {
            written[s].push(w.seq);
            if w.flushed {
                floor[s] = w.seq;
            }
        }
    }
    for s in 0..SECTORS {
        let got = sector(image, s);
        if floor[s] == 0 && got == sector(base, s) {
            continue;
        }
        let seq = stamp(got).filter(|q| written[s].contains(q));
        assert!(
            seq.is_some_and(|q| q >= floor[s]),
            "cut {cut}: source disk {disk} sector {s} holds {:?} after the power cut, but \
             write {} to it was flushed before — a flushed write was lost",
            seq,
            floor[s]
        );
    }
}

/// Checks that `replicas` are a point in time of this power cycle: writes up to some m
/// over `base`, on every disk at once. Returns m (0: the replicas are `base`).
#[allow(clippy::needless_range_loop)] // (disk, sector) indexes three tables at once
fn assert_point_in_time(cut: u64, replicas: &[Vec<u8>], base: &[Vec<u8>], log: &[Write]) -> u64 {
    let mut stamps = vec![vec![0u64; SECTORS]; replicas.len()];
    for (d, replica) in replicas.iter().enumerate() {
        assert_eq!(
            replica.len() as u64,
            DISK_BYTES,
            "cut {cut}: replica {d} size"
        );
        for s in 0..SECTORS {
            if sector(replica, s) == sector(&base[d], s) {
                continue;
            }
            stamps[d][s] = stamp(sector(replica, s))
                .filter(|q| log.iter().any(|w| w.seq == *q))
                .unwrap_or_else(|| {
                    panic!(
                        "cut {cut}: replica {d} sector {s} holds neither the content before \
                         this power cycle nor one write of it: torn or foreign"
                    )
                });
        }
    }
    let m = stamps.iter().flatten().copied().max().unwrap_or(0);
    let mut expected = vec![vec![0u64; SECTORS]; replicas.len()];
    for w in log.iter().take_while(|w| w.seq <= m) {
        for s in w.first_sector..w.first_sector + w.sectors {
            expected[w.disk][s] = w.seq;
        }
    }
    for d in 0..replicas.len() {
        for s in 0..SECTORS {
            assert_eq!(
                stamps[d][s], expected[d][s],
                "cut {cut}: replica {d} sector {s} holds write {} but the cut at write {m} \
                 needs write {} — the replica is not an epoch",
                stamps[d][s], expected[d][s]
            );
        }
    }
    m
}

/// Every file of the rig and its processes.
struct Rig {
    // Processes first: they die before the mount goes.
    shim: Option<ShimProc>,
    source: Option<Child>,
    target: Option<TargetProc>,
    target_config: PathBuf,
    port: u16,
    source_config: PathBuf,
    source_state: PathBuf,
    target_state: PathBuf,
    images: Vec<PathBuf>,
    replicas: Vec<PathBuf>,
    sockets: Vec<PathBuf>,
    pfs: PowerFailFs,
    dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn sync_path(path: &Path) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

impl Rig {
    fn new(seed: u64) -> Option<Rig> {
        let dir = scratch_dir();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let pfs = PowerFailFs::mount_or_skip("power_loss", &mnt)?;
        let key = dir.path().join("ferry.key");
        keygen(&key);
        let mut rng = Rng::new(seed);
        let mut images = Vec::new();
        let mut replicas = Vec::new();
        let mut sockets = Vec::new();
        for name in DISKS {
            // Random data in the first half, zeros after: made durable before anything
            // starts (the initial image is not what this test is about).
            let image = mnt.join(format!("{name}.img"));
            let mut content = vec![0u8; DISK_BYTES as usize];
            rng.fill(&mut content[..(DISK_BYTES / 2) as usize]);
            std::fs::write(&image, &content).unwrap();
            sync_path(&image);
            images.push(image);
            replicas.push(mnt.join(format!("{name}.replica")));
            sockets.push(dir.path().join(format!("{name}.sock")));
        }
        let source_state = mnt.join("source-state");
        let target_state = mnt.join("target-state");
        std::fs::create_dir(&source_state).unwrap();
        std::fs::create_dir(&target_state).unwrap();
        sync_path(&mnt);

        let target_config = dir.path().join("target.toml");
        let source_config = dir.path().join("source.toml");
        let mut rig = Rig {
            shim: None,
            source: None,
            target: None,
            target_config,
            port: 0,
            source_config,
            source_state,
            target_state,
            images,
            replicas,
            sockets,
            pfs,
            dir,
        };
        let disks: Vec<(&str, &Path)> = DISKS
            .iter()
            .zip(&rig.replicas)
            .map(|(n, r)| (*n, r.as_path()))
            .collect();
        let target = TargetProc::start_with(&rig.target_config, &[], |port| {
            target_toml(port, &key, &rig.target_state, &disks, "")
        });
        rig.port = target.port;
        rig.target = Some(target);
        let mut toml = format!(
            "[source]\ntarget = \"127.0.0.1:{}\"\npsk_file = {}\nstate_dir = {}\n\
             io_timeout_ms = 20000\nepoch_interval_ms = 150\nblock_size_kib = 16\n",
            rig.port,
            toml_path(&key),
            toml_path(&rig.source_state)
        );
        for ((name, image), socket) in DISKS.iter().zip(&rig.images).zip(&rig.sockets) {
            toml.push_str(&format!(
                "\n[[disk]]\nname = \"{name}\"\npath = {}\nnbd_socket = {}\ngroup = \"vm1\"\n",
                toml_path(image),
                toml_path(socket)
            ));
        }
        std::fs::write(&rig.source_config, toml).unwrap();
        rig.start_shim();
        rig.start_source();
        Some(rig)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spawn_logged(&self, what: &str, log: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(log))
            .unwrap();
        Command::new(ferry_bin())
            .args([what, "--config"])
            .arg(&self.source_config)
            .env("NO_COLOR", "1")
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ferry {what}: {e}"))
    }

    fn start_shim(&mut self) {
        self.shim = Some(ShimProc::start(&self.source_config, &self.source_state));
    }

    fn start_source(&mut self) {
        self.source = Some(self.spawn_logged("source", "source.log"));
    }

    fn start_target(&mut self) {
        let t = TargetProc::spawn(&self.target_config, self.port)
            .unwrap_or_else(|e| panic!("target restart: {e}"));
        self.target = Some(t);
    }

    fn kill_all(&mut self) {
        kill(&mut self.source);
        if let Some(shim) = self.shim.take() {
            shim.kill9();
        }
        if let Some(mut t) = self.target.take() {
            t.kill();
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn durable_epochs(&self) -> Vec<String> {
        self.log("source.log")
            .lines()
            .filter(|l| l.contains("epoch durable"))
            .map(str::to_string)
            .collect()
    }

    /// The newest epoch the engine logged as durable on the target.
    fn last_durable_epoch(&self) -> Option<u64> {
        self.durable_epochs()
            .iter()
            .filter_map(|l| {
                let rest = &l[l.find(" epoch=")? + 7..];
                rest.split_whitespace().next()?.parse().ok()
            })
            .max()
    }

    /// The newest recovery point the target lists (`ferry points --json`): its epoch.
    fn latest_point(&self) -> Option<u64> {
        let run = run_ferry(
            &[
                "points".as_ref(),
                "--config".as_ref(),
                self.target_config.as_os_str(),
                "--json".as_ref(),
            ],
            SYNC_TIMEOUT,
        );
        assert!(run.success(), "ferry points: {run:?}");
        run.json()["points"]
            .as_array()
            .expect("points[] in ferry points --json")
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .max()
    }

    fn read_all(paths: &[PathBuf]) -> Vec<Vec<u8>> {
        paths
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
            .collect()
    }

    /// Waits (at most `limit`) until the target has an epoch's undo log open.
    fn wait_for_undo_log(&self, limit: Duration) {
        let undo = self.target_state.join("undo");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let open = std::fs::read_dir(&undo).is_ok_and(|entries| {
                entries
                    .filter_map(Result::ok)
                    .any(|e| e.path().extension().is_some_and(|x| x == "undo"))
            });
            if open {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The shim's `status` reply.
    fn shim_status(&self) -> serde_json::Value {
        self.shim.as_ref().expect("the shim runs").status()
    }

    fn shim_log(&self) -> String {
        self.shim.as_ref().map(ShimProc::log).unwrap_or_default()
    }

    /// Waits until every replica equals its source image. Panics naming the blocks
    /// that never caught up (a lost change) and what the shim says about them.
    fn wait_caught_up(&self, cut: u64) {
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let images = Self::read_all(&self.images);
            let replicas = Self::read_all(&self.replicas);
            if images == replicas {
                return;
            }
            if Instant::now() > deadline {
                let mut differ = Vec::new();
                for d in 0..DISKS.len() {
                    for s in 0..SECTORS {
                        if sector(&images[d], s) != sector(&replicas[d], s) {
                            differ.push((DISKS[d], s));
                        }
                    }
                }
                panic!(
                    "cut {cut}: the replicas never caught up with the sources: {} sectors \
                     differ, first {:?} — a change no bitmap remembers (lost change).\n\
                     shim status: {}\nsource log (tail): {}",
                    differ.len(),
                    &differ[..differ.len().min(8)],
                    self.shim_status(),
                    tail(&self.log("source.log"), 15)
                );
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn power_loss_under_a_writing_guest_and_continuous_epochs_loses_no_change() {
    // Held to the end: no other test of this binary mounts meanwhile (see the lock).
    let _mounts = crate::common::exclusive_mounts();
    let seed = test_seed("power_loss");
    let cuts = if soak() { SOAK_CUTS } else { CUTS };
    let Some(mut rig) = Rig::new(seed) else {
        return;
    };
    let mut rng = Rng::new(seed);
    // The first epoch copies whole disks; the cuts start once it is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while rig.durable_epochs().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no first epoch: {}",
            rig.log("source.log")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    rig.wait_caught_up(0);
    let mut base = Rig::read_all(&rig.images);
    let mut seq = 0u64;
    let mut total_writes = 0;
    let mut points = Vec::new();
    for cut in 1..=cuts {
        // Guests that flush often, seldom or never: what an epoch ships may or may not
        // be durable on the source when the power goes.
        let flush_one_in = [2, 8, 64, 0][rng.below(4) as usize];
        let epochs_before = rig.durable_epochs().len();
        let mut guest = Guest::start(rig.sockets.clone(), seq, rng.next_u64(), flush_one_in);
        // Cut at a random moment: some writes in, epochs under way.
        let wait_writes = 20 + rng.below(400) as usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        while guest.writes() < wait_writes {
            assert!(Instant::now() < deadline, "cut {cut}: the guest stalled");
            std::thread::sleep(Duration::from_millis(2));
        }
        if rng.below(2) == 0 {
            // Anywhere: between epochs, while one is frozen, shipped or applied.
            std::thread::sleep(Duration::from_millis(rng.below(600)));
        } else {
            // While the target applies an epoch: its undo log exists from the session's
            // start to the commit. A few milliseconds in, replica writes are under way.
            rig.wait_for_undo_log(Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(rng.below(20)));
        }
        // Most cuts keep a random part of what was not synced: only those reveal a
        // write that reached the disk before the record that protects it.
        let mode = if rng.below(3) == 0 {
            CutMode::DropUnsynced
        } else {
            CutMode::WritebackSome {
                seed: rng.next_u64(),
            }
        };
        let report = rig.pfs.cut(mode);
        rig.kill_all();
        let log = guest.stop();
        rig.pfs.restore().expect("power back on");
        total_writes += log.len();
        seq = log.last().map_or(seq, |w| w.seq);
        eprintln!(
            "power_loss: cut {cut} ({mode:?}) after {} writes (flush 1 in {flush_one_in}), \
             {} epochs: {report:?}",
            log.len(),
            rig.durable_epochs().len() - epochs_before
        );

        let images = Rig::read_all(&rig.images);
        for d in 0..DISKS.len() {
            assert_source_survived(cut, d, &images[d], &base[d], &log);
        }
        // The target recovers (rolls an interrupted epoch back or forward) before it
        // listens; from then on each replica must be an epoch. Before this cycle's
        // first epoch the replicas equal `base` (m = 0).
        rig.start_target();
        let replicas = Rig::read_all(&rig.replicas);
        points.push(assert_point_in_time(cut, &replicas, &base, &log));
        // And no older than the last epoch the engine heard acknowledged before the cut.
        let acknowledged = rig.last_durable_epoch();
        let latest = rig.latest_point();
        assert!(
            latest >= acknowledged,
            "cut {cut}: epoch {acknowledged:?} was acknowledged as durable, but after the \
             power cut the target's latest recovery point is {latest:?}"
        );
        eprintln!(
            "power_loss: cut {cut}: replicas are write {} of the log, at epoch {latest:?} \
             (last acknowledged {acknowledged:?})",
            points.last().expect("pushed above")
        );

        rig.start_shim();
        let status = rig.shim_status();
        for d in status["disks"].as_array().unwrap() {
            assert_eq!(
                d["resync_required"],
                false,
                "cut {cut}: tracking survived the power loss: {d}\n{}",
                rig.shim_log()
            );
        }
        rig.start_source();
        rig.wait_caught_up(cut);
        base = Rig::read_all(&rig.images);
    }
    let durable = rig.durable_epochs();
    for l in &durable[1..] {
        assert!(
            l.contains("os=changed") && l.contains("data=changed"),
            "every epoch after the first is changed-block, no resync: {l}"
        );
    }
    eprintln!(
        "power_loss: {cuts} power cuts, {total_writes} guest writes, {} epochs, replicas at \
         writes {points:?} of their cycles, {:?}",
        durable.len(),
        rig.pfs.stats()
    );
}
