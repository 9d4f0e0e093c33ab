//! `ferry status` on both sides of a live replication: role, RPO, the engine's last
//! epochs and errors, pending changes, the target's replicas; the same engine report
//! in the shim's `status` reply.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::rig::{Guest, Rig, RigSpec};
use crate::common::*;

fn status(config: &Path) -> serde_json::Value {
    let run = run_ferry(
        &[
            "status".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--json".as_ref(),
        ],
        Duration::from_secs(30),
    );
    assert!(run.success(), "{}{}", run.stdout, run.stderr);
    serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

fn human(config: &Path) -> String {
    let run = run_ferry(
        &["status".as_ref(), "--config".as_ref(), config.as_os_str()],
        Duration::from_secs(30),
    );
    assert!(run.success(), "{}{}", run.stdout, run.stderr);
    run.stdout
}

#[test]
fn status_shows_both_sides_of_a_live_replication() {
    let seed = test_seed("status");
    let mut rig = Rig::new(seed, &RigSpec::two_disk_group(8 << 20));
    // Before anything ran: the primary, no epoch, never synced.
    let before = status(&rig.config);
    assert_eq!(before["role"], "primary", "{before}");
    assert_eq!(before["source"]["engine"]["running"], false, "{before}");
    assert!(before["source"]["engine"]["rpo_s"].is_null(), "{before}");
    assert!(human(&rig.config).contains("RPO unknown"));

    let mut guest = Guest::start(&rig, seed ^ 1, 16, Duration::from_millis(2));
    let mut source = rig.start_source();
    rig.wait_first_epoch(Duration::from_secs(60));
    guest.wait_for(50);
    // Wait for a few epochs while the guest writes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let live = loop {
        let s = status(&rig.config);
        let acked = s["source"]["engine"]["last_acknowledged"]["epoch"].as_u64();
        if acked.is_some_and(|e| e >= 3) {
            break s;
        }
        assert!(Instant::now() < deadline, "no third epoch: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let engine = &live["source"]["engine"];
    assert_eq!(engine["running"], true, "{live}");
    let rpo = engine["rpo_s"].as_f64().unwrap();
    assert!((0.0..30.0).contains(&rpo), "RPO {rpo}: {live}");
    assert!(engine["recent_mb_per_s"].as_f64().is_some(), "{live}");
    assert_eq!(live["source"]["shim_running"], true, "{live}");
    let group = &live["source"]["groups"][0];
    assert_eq!(group["name"], "vm1", "{live}");
    for d in group["disks"].as_array().unwrap() {
        assert!(d["acknowledged_epoch"].as_u64().is_some(), "{d}");
        assert!(d["pending_bytes"].as_u64().is_some(), "{d}");
    }
    let text = human(&rig.config);
    assert!(
        text.contains("engine running") && text.contains("RPO "),
        "{text}"
    );
    // The shim passes the engine's report on.
    let shim = rig.shim_status();
    assert!(
        shim["engine"]["recent"][0]["epoch"].as_u64().is_some(),
        "{shim}"
    );

    // The target's side: the replica site, its replicas at an epoch.
    let t = status(&rig.target.config);
    assert_eq!(t["role"], "replica", "{t}");
    for r in t["target"]["replicas"].as_array().unwrap() {
        assert!(r["epoch"].as_u64().is_some(), "{r}");
    }
    guest.stop();

    // The target goes away: the engine reports the failures and when.
    rig.target.kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    let failing = loop {
        let s = status(&rig.config);
        if s["source"]["engine"]["failures_since_success"].as_u64() >= Some(1) {
            break s;
        }
        assert!(Instant::now() < deadline, "no failure reported: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = &failing["source"]["engine"]["last_error"];
    // The epoch in flight was cut, or the next one found nobody listening: either
    // way, in words.
    assert!(
        err["message"].as_str().is_some_and(|m| m.len() > 10),
        "{failing}"
    );
    assert_eq!(err["needs_operator"], false, "{failing}");
    assert!(human(&rig.config).contains("last error"));
    // SIGTERM: the engine says it stopped, and why.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(source.id() as libc::pid_t, libc::SIGTERM) };
    let _ = source.wait();
    let after = status(&rig.config);
    assert_eq!(after["source"]["engine"]["running"], false, "{after}");
    assert!(
        after["source"]["engine"]["stopped"]
            .as_str()
            .is_some_and(|s| s.contains("signal")),
        "{after}"
    );
    assert!(human(&rig.config).contains("stopped"));
}
