//! Unplanned failover at the secondary site, with the primary lost: the replicas are
//! taken back in place to a recovery point, byte for byte, and the site is fenced.
//!
//! A guest writes through the shim while one-shot syncs make epochs; after each, the
//! replicas are recorded as the epoch holds them (the live-epoch tests show they are
//! exact point-in-time cuts of the source). Then the primary is lost (shim gone), and
//! `ferry failover unplanned` runs with the target still running: the latest point
//! first, then every older point in turn (once with a crash in the middle of the
//! rollback, then the rerun), each compared byte for byte. Sources are refused
//! (fenced), a write to a promoted disk stops the point from moving further back, and
//! `ferry failover commit` ends the old lineage's points.

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::process::ExitStatus;
use std::time::Duration;

use crate::common::rig::{Guest, Rig, RigSpec};
use crate::common::*;

const DISK_BYTES: u64 = 8 << 20;
const EPOCHS: usize = 5;

/// [`ferry_status`] with the status as success or failure.
fn ferry(args: &[&OsStr], env: &[(&str, &str)]) -> (bool, String, String) {
    let (status, out, err) = ferry_status(args, env);
    (status.success(), out, err)
}

/// The arguments of `ferry failover planned` for the rig's primary.
fn planned_args(rig: &Rig) -> [&OsStr; 4] {
    [
        "failover".as_ref(),
        "planned".as_ref(),
        "--config".as_ref(),
        rig.config.as_os_str(),
    ]
}

/// `ferry failover planned` on the rig's primary, with `env`.
fn planned(rig: &Rig, env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    ferry_status(&planned_args(rig), env)
}

fn unplanned(rig: &Rig, point: Option<u64>, env: &[(&str, &str)]) -> (bool, String, String) {
    let point = point.map(|p| p.to_string());
    let mut args: Vec<&OsStr> = vec![
        "failover".as_ref(),
        "unplanned".as_ref(),
        "--config".as_ref(),
        rig.target.config.as_os_str(),
    ];
    if let Some(p) = &point {
        args.extend(["--point".as_ref(), OsStr::new(p)]);
    }
    ferry(&args, env)
}

/// Every block where the replicas at the point (`now`) differ from the latest epoch
/// is in the disk's `.undone` set, which reverse replication sends back.
fn assert_undone_covers(rig: &Rig, latest: &[Vec<u8>], now: &[Vec<u8>]) {
    use filter_driver_shim_contract::bitmap::ChangedBlockBitmap;
    for (d, (was, is)) in rig.disks.iter().zip(latest.iter().zip(now)) {
        let path = rig.target_state.join(format!("{}.undone", d.name));
        let set =
            ChangedBlockBitmap::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let bs = set.block_size() as usize;
        for (block, (a, b)) in was.chunks(bs).zip(is.chunks(bs)).enumerate() {
            if a != b {
                assert!(
                    set.test(block as u64).unwrap(),
                    "disk {}: block {block} was rolled back but is not in {}",
                    d.name,
                    path.display()
                );
            }
        }
    }
}

fn target_cmd(rig: &Rig, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend(["--config".as_ref(), rig.target.config.as_os_str()]);
    ferry(&all, &[])
}

#[test]
fn unplanned_failover_takes_the_replicas_back_in_place_to_every_point_and_fences() {
    let seed = test_seed("failover_unplanned");
    let mut rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    let mut guest = Guest::start(&rig, seed ^ 1, 24, Duration::ZERO);
    guest.wait_for(30);
    let mut epochs: Vec<(u64, Vec<Vec<u8>>)> = Vec::new();
    for _ in 0..EPOCHS {
        guest.wait_for(40);
        let r = sync_ok(&rig.config, &[]);
        epochs.push((u64_field(&r, "epoch"), rig.replicas()));
    }
    guest.stop();
    // The primary is lost: its shim is gone (so are its writes after the last epoch).
    rig.kill_shim();

    let (ok, out, err) = unplanned(&rig, None, &[]);
    assert!(ok, "{out}{err}");
    let (latest, at_latest) = epochs.last().unwrap();
    assert!(out.contains(&format!("recovery point {latest}")), "{out}");
    assert!(out.contains("boot the VMs here"), "{out}");
    assert!(
        rig.replicas() == *at_latest,
        "the latest point is the replicas as they were"
    );
    // Rerun: idempotent.
    let (ok, out, err) = unplanned(&rig, None, &[]);
    assert!(ok && out.contains("already promoted"), "{out}{err}");

    // Fenced: a source (the old primary coming back) is refused, saying why.
    let refused = sync(&rig.config, &[]);
    assert_eq!(
        refused.status.code(),
        Some(8),
        "a role refusal: {}",
        refused.stderr
    );
    assert!(
        refused
            .stderr
            .contains("promoted to primary by an unplanned failover")
            && refused.stderr.contains("takes no replication"),
        "{}",
        refused.stderr
    );
    assert!(
        rig.replicas() == *at_latest,
        "nothing applied after the promotion"
    );

    // Every older point in turn, in place, byte for byte; the first through a crash
    // in the middle of its rollback and a rerun.
    let older: Vec<&(u64, Vec<Vec<u8>>)> = epochs.iter().rev().skip(1).collect();
    for (i, (point, expected)) in older.iter().enumerate().take(older.len() - 1) {
        if i < 3 {
            // The first time with the log's bytes undone and no record moved back;
            // the second with one disk's record moved back and the other's not; the
            // third with the state directory full when the rolled-back blocks are
            // recorded for reverse replication (nothing undone yet).
            let failpoint = [
                "failover.rollback.crash@1",
                "failover.records.crash@1",
                "failover.undone.fail@1",
            ][i];
            let (ok, _, err) = unplanned(&rig, Some(*point), &[("FERRY_FAILPOINTS", failpoint)]);
            assert!(!ok, "the failpoint aborts the rollback: {err}");
            let (ok, out, _) = target_cmd(&rig, &["points"]);
            assert!(ok && out.contains("being promoted"), "{out}");
            // The interrupted promotion's point binds: the epoch half undone cannot be
            // chosen any more.
            let (ok, _, err) = unplanned(&rig, Some(*latest), &[]);
            assert!(!ok && err.contains("is newer"), "{err}");
        }
        let (ok, out, err) = unplanned(&rig, Some(*point), &[]);
        assert!(ok, "point {point}: {out}{err}");
        assert!(
            rig.replicas() == *expected,
            "the replicas are exactly recovery point {point}"
        );
        assert_undone_covers(&rig, at_latest, expected);
    }

    // A VM writes to a promoted disk: older points no longer describe it.
    let (oldest, _) = older.last().unwrap();
    let vm = open_rw(&rig.disks[0].replica);
    vm.write_all_at(b"written by the VM after the failover", 4096)
        .unwrap();
    vm.set_modified(std::time::SystemTime::now() + Duration::from_secs(1))
        .unwrap();
    let (ok, _, err) = unplanned(&rig, Some(*oldest), &[]);
    assert!(!ok && err.contains("written since the promotion"), "{err}");
    let (ok, out, _) = target_cmd(&rig, &["points"]);
    assert!(
        ok && out.contains("promoted at") && !out.contains("(latest)"),
        "{out}"
    );

    // Commit: the old lineage's points are gone, for good.
    let (ok, out, err) = target_cmd(&rig, &["failover", "commit"]);
    assert!(ok && out.contains("committed"), "{out}{err}");
    let (ok, out, _) = target_cmd(&rig, &["points", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(ok && v["points"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["site"]["committed"], true, "{v}");
    let (ok, _, err) = target_cmd(&rig, &["failover", "test"]);
    assert!(!ok && err.contains("promoted"), "{err}");
    let (ok, out, _) = target_cmd(&rig, &["failover", "commit"]);
    assert!(ok && out.contains("already committed"), "{out}");
    // Still fenced after a restart of the target.
    rig.restart_target().unwrap();
    let refused = sync(&rig.config, &[]);
    assert!(
        refused.stderr.contains("takes no replication"),
        "{}",
        refused.stderr
    );
}

#[test]
fn failover_of_a_target_that_never_applied_an_epoch_says_so() {
    let seed = test_seed("failover_nothing");
    let rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    let (ok, _, err) = unplanned(&rig, None, &[]);
    assert!(!ok && err.contains("nothing to fail over to"), "{err}");
    // Refused before anything: the site is not fenced.
    sync_ok(&rig.config, &[]);
}

/// `ferry failover planned` with a guest still writing: nothing acknowledged is left
/// behind, nothing is acknowledged after the cut, the target is promoted and this site
/// demoted — across a shim restart too.
#[test]
fn planned_failover_hands_over_every_acknowledged_write_and_demotes_the_primary() {
    let seed = test_seed("failover_planned");
    let mut rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    let mut source = rig.start_source();
    rig.wait_first_epoch(Duration::from_secs(60));
    let mut guest = Guest::until_refused(&rig, seed ^ 1, 24);
    guest.wait_for(100);
    // Continuous replication stops first (its epoch in progress completes).
    // SAFETY: signalling our own child process, which has not been reaped.
    unsafe { libc::kill(source.id() as libc::pid_t, libc::SIGTERM) };
    let status = crate::common::shim::wait_timeout(&mut source, Duration::from_secs(60))
        .expect("ferry source stops on SIGTERM");
    assert!(status.success(), "{}", rig.log("source.log"));
    guest.wait_for(50);

    // The first run dies once the target promoted, before this site recorded it; the
    // rerun finds the target promoted and completes the demotion.
    let (status, _, err) = planned(&rig, &[("FERRY_FAILPOINTS", "source.planned.crash")]);
    assert!(
        !status.success(),
        "the failpoint aborts the handover: {err}"
    );
    let (status, out, err) = planned(&rig, &[]);
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("found promoted already") && out.contains("boot the VMs"),
        "{out}"
    );
    // The guest was refused from the cut on; every write it saw acknowledged is on
    // the promoted replicas, and nothing else: they equal the primary's disks.
    guest.stop();
    let refused = guest.refused.lock().unwrap().clone();
    assert!(refused.is_some_and(|e| e.contains("EPERM") || e.contains("ermission")));
    let acknowledged = guest.acknowledged();
    assert_eq!(
        crate::common::rig::assert_point_in_time(
            &rig.replicas(),
            &rig.initial,
            &acknowledged,
            "planned failover"
        ),
        acknowledged.len() as u64,
        "every acknowledged write reached the promoted replicas"
    );
    assert!(
        rig.replicas() == rig.images(),
        "zero data loss: replicas equal the disks at the cut"
    );

    // The secondary is the primary now; this site is demoted, idempotently.
    let (ok, out, _) = target_cmd(&rig, &["points"]);
    assert!(ok && out.contains("promoted at"), "{out}");
    let refused = sync(&rig.config, &[]);
    assert_eq!(refused.status.code(), Some(8), "a role refusal");
    assert!(
        refused.stderr.contains("demoted by a planned failover"),
        "{}",
        refused.stderr
    );
    let (status, out, err) = planned(&rig, &[]);
    assert!(
        status.success() && out.contains("already demoted"),
        "{out}{err}"
    );
    // A restarted shim keeps refusing writes.
    rig.kill_shim();
    rig.start_shim();
    let status = rig.shim_status();
    for d in status["disks"].as_array().unwrap() {
        assert_eq!(d["writes_refused"], true, "{d}");
    }
    let mut nbd = crate::common::nbd::connect_retry(
        &rig.disks[0].socket,
        &rig.disks[0].name,
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        nbd.write(0, &[0x55; 4096]).is_err(),
        "a demoted shim refuses writes"
    );
    assert!(rig.replicas() == rig.images());
}

/// With the target process stopped (the secondary host rebooted, say), the failover
/// works the same, and the target started afterwards is fenced.
#[test]
fn unplanned_failover_with_the_target_stopped_is_fenced_when_it_starts() {
    let seed = test_seed("failover_target_stopped");
    let mut rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    let mut guest = Guest::start(&rig, seed ^ 1, 24, Duration::ZERO);
    guest.wait_for(30);
    let first = u64_field(&sync_ok(&rig.config, &[]), "epoch");
    let at_first = rig.replicas();
    guest.wait_for(40);
    sync_ok(&rig.config, &[]);
    guest.stop();
    rig.kill_shim();
    rig.target.kill();

    let (ok, out, err) = unplanned(&rig, Some(first), &[]);
    assert!(ok, "{out}{err}");
    assert!(
        rig.replicas() == at_first,
        "recovery point {first}, byte for byte"
    );
    rig.restart_target().unwrap();
    let refused = sync(&rig.config, &[]);
    assert!(
        !refused.success() && refused.stderr.contains("takes no replication"),
        "{}",
        refused.stderr
    );
    assert!(rig.replicas() == at_first);
}

/// kill -9 of `ferry failover unplanned` at random moments, again and again: every
/// rerun resumes, and the replicas end exactly at the chosen point.
#[test]
fn unplanned_failover_killed_at_random_moments_ends_byte_exact() {
    let seed = test_seed("failover_kill9");
    let mut rng = Rng::new(seed);
    let mut rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    let mut guest = Guest::start(&rig, seed ^ 1, 24, Duration::ZERO);
    guest.wait_for(30);
    let first = u64_field(&sync_ok(&rig.config, &[]), "epoch");
    let at_first = rig.replicas();
    for _ in 0..4 {
        guest.wait_for(60);
        sync_ok(&rig.config, &[]);
    }
    guest.stop();
    rig.kill_shim();

    let kills = if soak() { 40 } else { 8 };
    let mut states = Vec::new();
    let point = first.to_string();
    let args: Vec<&OsStr> = ["failover", "unplanned", "--point", &point, "--config"]
        .map(OsStr::new)
        .into_iter()
        .chain([rig.target.config.as_os_str()])
        .collect();
    kill_at_random(&args, kills, Duration::from_millis(40), &mut rng, || {
        let site = std::fs::read_to_string(rig.target_state.join("site.json")).unwrap_or_default();
        states.push(if site.contains("\"promoting\"") {
            'p'
        } else if site.contains("\"primary\"") {
            'P'
        } else {
            '-'
        });
    });
    // What the kills interrupted: '-' before the promotion began, 'p' in the middle of
    // it, 'P' after it.
    eprintln!("kills: {}", states.iter().collect::<String>());
    let (ok, out, err) = unplanned(&rig, Some(first), &[]);
    assert!(ok, "{out}{err}");
    assert!(
        rig.replicas() == at_first,
        "after {kills} kills, recovery point {first} byte for byte"
    );
    let refused = sync(&rig.config, &[]);
    assert!(
        refused.stderr.contains("takes no replication"),
        "{}",
        refused.stderr
    );
}

/// kill -9 of `ferry failover planned` at random moments, with a guest writing: every
/// rerun resumes, and in the end every acknowledged write is on the promoted replicas.
#[test]
fn planned_failover_killed_at_random_moments_loses_no_acknowledged_write() {
    let seed = test_seed("planned_kill9");
    let mut rng = Rng::new(seed);
    let rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    sync_ok(&rig.config, &[]);
    let mut guest = Guest::until_refused(&rig, seed ^ 1, 24);
    guest.wait_for(50);
    let kills = if soak() { 30 } else { 6 };
    kill_at_random(
        &planned_args(&rig),
        kills,
        Duration::from_millis(150),
        &mut rng,
        || {},
    );
    let (status, out, err) = planned(&rig, &[]);
    assert!(status.success(), "{out}{err}");
    guest.stop();
    let acknowledged = guest.acknowledged();
    assert_eq!(
        crate::common::rig::assert_point_in_time(
            &rig.replicas(),
            &rig.initial,
            &acknowledged,
            "planned failover after kills"
        ),
        acknowledged.len() as u64,
        "every acknowledged write reached the promoted replicas"
    );
    assert!(rig.replicas() == rig.images());
}

/// A planned failover that finds the target promoted by an unplanned failover there
/// says so and exits as a role refusal: it cannot vouch for writes after that point.
/// This site is demoted all the same.
#[test]
fn planned_failover_after_an_unplanned_one_does_not_claim_the_handover() {
    let seed = test_seed("planned_after_unplanned");
    let rig = Rig::new(seed, &RigSpec::two_disk_group(DISK_BYTES));
    sync_ok(&rig.config, &[]);
    let (ok, out, err) = unplanned(&rig, None, &[]);
    assert!(ok, "{out}{err}");
    let (status, _, err) = planned(&rig, &[]);
    assert_eq!(status.code(), Some(8), "{err}");
    assert!(err.contains("not by this handover"), "{err}");
    let (status, out, _) = planned(&rig, &[]);
    assert!(status.success() && out.contains("already demoted"), "{out}");
    let refused = sync(&rig.config, &[]);
    assert_eq!(refused.status.code(), Some(8), "{}", refused.stderr);
}
