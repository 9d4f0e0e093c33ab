//! Signals: SIGTERM and SIGINT stop `ferry source` after the epoch in flight, saying
//! so; a second SIGINT aborts that epoch safely (the target rolls it back, the shim
//! keeps its blocks, the next sync carries them); SIGHUP never stops the target.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::rig::{modes, Guest, Rig, RigSpec};
use crate::common::shim::wait_timeout;
use crate::common::*;

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_sigint_aborts_the_epoch_in_flight_and_nothing_is_lost() {
    let seed = test_seed("signals_sigint");
    let mut spec = RigSpec::two_disk_group(8 << 20);
    spec.source_extra
        .push_str("freeze_idle_timeout_ms = 2000\n");
    let rig = Rig::new(seed, &spec);
    let mut guest = Guest::start(&rig, seed ^ 1, 16, Duration::from_millis(2));
    let log = rig.dir.path().join("source.log");
    // The third epoch stalls (twice the shim's idle bound, kept alive) before it
    // commits: the window for the signals.
    let mut source = Command::new(ferry_bin())
        .args(["source", "--config"])
        .arg(&rig.config)
        .env("NO_COLOR", "1")
        .env("FERRY_LOG", "info")
        .env("FERRY_FAILPOINTS", "engine-stall-before-check@3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let durable = || rig.log("source.log").matches("epoch durable").count();
    wait_for("two epochs", Duration::from_secs(60), || durable() >= 2);
    std::thread::sleep(Duration::from_millis(1500));
    signal(&source, libc::SIGINT);
    wait_for("the first SIGINT logged", Duration::from_secs(10), || {
        rig.log("source.log").contains("SIGINT received")
    });
    signal(&source, libc::SIGINT);
    let status = wait_timeout(&mut source, Duration::from_secs(30)).expect("ferry source stops");
    let text = rig.log("source.log");
    assert!(status.success(), "{status}: {text}");
    assert!(
        text.contains("SIGINT received: finishing epoch 3"),
        "{text}"
    );
    assert!(text.contains("second SIGINT"), "{text}");
    assert_eq!(
        durable(),
        2,
        "the aborted epoch was not acknowledged: {text}"
    );
    guest.stop();
    // Nothing lost: the next sync carries the aborted epoch's blocks too.
    let r = sync_ok(&rig.config, &[]);
    assert!(modes(&r).iter().all(|m| m == "changed"), "{r}");
    assert_eq!(rig.replicas(), rig.images());
}

#[test]
fn sighup_does_not_stop_the_target_and_sigterm_stops_it_saying_so() {
    let dir = scratch_dir();
    let key = dir.path().join("ferry.key");
    keygen(&key);
    let replica = dir.path().join("r.img");
    let config = dir.path().join("target.toml");
    let port = free_port();
    std::fs::write(
        &config,
        target_toml(
            port,
            &key,
            &dir.path().join("state"),
            &[("a", &replica)],
            "",
        ),
    )
    .unwrap();
    let mut target = TargetProc::spawn(&config, port).unwrap();
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(target.pid() as libc::pid_t, libc::SIGHUP) };
    wait_for("SIGHUP logged", Duration::from_secs(10), || {
        target.stderr().contains("SIGHUP received and ignored")
    });
    std::thread::sleep(Duration::from_millis(300));
    target.assert_alive();
    // SAFETY: as above.
    unsafe { libc::kill(target.pid() as libc::pid_t, libc::SIGTERM) };
    wait_for("the target stops", Duration::from_secs(10), || {
        !target.is_running()
    });
    assert!(
        target.stderr().contains("SIGTERM received"),
        "{}",
        target.stderr()
    );
}
