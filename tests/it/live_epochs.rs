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

use std::process::Child;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::rig::{assert_point_in_time, modes, Guest, Rig, RigSpec};
use crate::common::*;

const DISK_BYTES: u64 = 8 << 20;
/// The guest's largest write, in sectors.
const MAX_SECTORS: u64 = 24;

#[test]
fn live_epochs_are_group_consistent_points_in_time_while_the_guest_writes() {
    let seed = test_seed("live_epochs");
    let rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    // First epoch: new replicas, whole-disk copy of a live, frozen group.
    let mut writer = Guest::start(&rig, seed ^ 1, MAX_SECTORS, Duration::ZERO);
    writer.wait_for(50);
    let first = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&first), ["full", "full"], "{first}");
    assert!(first["shim_epoch"].is_string(), "a live epoch: {first}");
    let log = writer.log.lock().unwrap().clone();
    let mut last_m = assert_point_in_time(&rig.replicas(), &rig.initial, &log, "live epochs");

    for round in 0..6 {
        writer.wait_for(30 + 20 * round);
        let r = sync_ok(&rig.config, &[]);
        assert_eq!(modes(&r), ["changed", "changed"], "round {round}: {r}");
        let log = writer.log.lock().unwrap().clone();
        let m = assert_point_in_time(&rig.replicas(), &rig.initial, &log, "live epochs");
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
        assert_point_in_time(&rig.replicas(), &rig.initial, &log, "live epochs"),
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
    let mut rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    sync_ok(&rig.config, &[]);
    let generation: Vec<serde_json::Value> = rig.shim_status()["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["generation_id"].clone())
        .collect();
    let mut writer = Guest::start(&rig, seed ^ 2, MAX_SECTORS, Duration::ZERO);
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
        assert_point_in_time(&rig.replicas(), &rig.initial, &log, "live epochs");
    }
    let log = writer.stop();
    sync_ok(&rig.config, &[]);
    assert_eq!(
        assert_point_in_time(&rig.replicas(), &rig.initial, &log, "live epochs"),
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
    let rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    sync_ok(&rig.config, &[]);
    let mut writer = Guest::start(&rig, seed ^ 3, MAX_SECTORS, Duration::ZERO);
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
        assert_point_in_time(&rig.replicas(), &rig.initial, &log, "live epochs"),
        log.len() as u64
    );
    assert_eq!(rig.replicas(), rig.images());
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
    let mut rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    let mut rng = Rng::new(seed);
    let mut writer = Guest::start(&rig, seed ^ 4, MAX_SECTORS, Duration::from_micros(300));
    let mut source = rig.start_source();
    // The first epoch creates the replicas; crashes start once one is acknowledged.
    rig.wait_first_epoch(Duration::from_secs(60));
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
                rig.restart_target()
                    .unwrap_or_else(|e| panic!("cycle {cycle}: target restart: {e}"));
                // Nothing is replicating now: the replicas must be an acknowledged cut.
                let log = writer.log.lock().unwrap().clone();
                let m = assert_point_in_time(&rig.replicas(), &rig.initial, &log, "live epochs");
                assert!(
                    m >= last_m,
                    "cycle {cycle}: an acknowledged epoch was lost ({last_m} -> {m})"
                );
                last_m = m;
                checks += 1;
            }
        }
        source = rig.start_source();
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
        assert_point_in_time(&rig.replicas(), &rig.initial, &log, "live epochs"),
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
    let mut rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    sync_ok(&rig.config, &[]);
    let before = rig.shim_status();
    // Clean stop, then a write nobody tracked.
    rig.shim.take().expect("the shim runs").stop();
    std::thread::sleep(Duration::from_millis(20)); // mtime granularity
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&rig.disks[1].image)
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
    let mut rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
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

/// A rig whose replicas hold a first epoch, and an NBD client of its first disk.
fn synced_rig_and_guest(seed: u64) -> (Rig, common::nbd::NbdClient) {
    let rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    sync_ok(&rig.config, &[]);
    let disk = &rig.disks[0];
    let client = common::nbd::connect_retry(&disk.socket, &disk.name, Duration::from_secs(30))
        .expect("connect to the shim");
    (rig, client)
}

/// Sub-block tracking: a 4 KiB guest write costs 4 KiB through read, wire and apply,
/// not the 64 KiB block around it. Granules next to each other travel as one read,
/// across a block's end too, and the replica ends byte-equal.
#[test]
fn small_writes_travel_as_their_granules_not_whole_blocks() {
    let seed = test_seed("live_granules");
    let (rig, mut client) = synced_rig_and_guest(seed);
    const BLOCK: u64 = 64 << 10;
    let mut written = 0;
    let mut rng = Rng::new(seed);
    // One 4 KiB granule in each of ten blocks, at a random granule of each.
    for i in 0..10u64 {
        let at = (3 + 7 * i) * BLOCK + rng.below(16) * 4096;
        client.write(at, &[i as u8 + 1; 4096]).unwrap();
        written += 4096;
    }
    // 12 KiB across the end of block 100 into block 101.
    client.write(101 * BLOCK - 8192, &[0xab; 12288]).unwrap();
    written += 12288;
    drop(client);
    let r = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&r), ["changed", "changed"], "{r}");
    assert_eq!(
        r["bytes_read"], written,
        "only the written granules were read: {r}"
    );
    assert_eq!(r["bytes_payload"], written, "and sent: {r}");
    assert!(
        r["bytes_applied"].as_u64().unwrap() <= written,
        "and applied: {r}"
    );
    assert_eq!(rig.replicas(), rig.images());
}

/// A granule file the engine cannot use fails the epoch — reading whole blocks instead
/// could see writes the shim did not preserve — and gives every bit and granule back:
/// the next epoch carries them, and the replica ends byte-equal.
#[test]
fn a_damaged_granule_file_fails_the_epoch_and_loses_nothing() {
    let (rig, mut client) = synced_rig_and_guest(test_seed("live_granules_damaged"));
    for i in 0..8u64 {
        client
            .write((5 + 9 * i) * (64 << 10) + 8192, &[0x5a; 4096])
            .unwrap();
    }
    let config = rig.config.as_os_str();
    let args = [
        "sync".as_ref(),
        "--config".as_ref(),
        config,
        "--json".as_ref(),
    ];
    let (status, _, stderr) =
        ferry_status(&args, &[("FERRY_FAILPOINTS", "source.granules.damaged")]);
    assert!(!status.success(), "the epoch must fail: {stderr}");
    assert!(
        stderr.contains("granule"),
        "the error names the granule file: {stderr}"
    );
    let os = &rig.shim_status()["disks"][0];
    assert_eq!(os["dirty_blocks"], 8, "the epoch's bits came back: {os}");
    // Written again after the failed epoch, inside the same blocks.
    client.write(5 * (64 << 10), &[0xa5; 4096]).unwrap();
    drop(client);
    let r = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&r), ["changed", "changed"], "{r}");
    assert_eq!(
        r["bytes_read"],
        9 * 4096,
        "every granule, and only those: {r}"
    );
    assert_eq!(rig.replicas(), rig.images());
}
