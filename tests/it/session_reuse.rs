//! One session per stream (protocol version 3): `ferry source` keeps its authenticated
//! connection from one epoch to the next, and the target serves the epochs one after
//! the other on it, each claimed, staged, committed and acknowledged on its own.
//!
//! Real processes over TCP through the fault proxy (`common::proxy`), which counts the
//! connections the target saw; the target logs one `session of … authenticated` line
//! per connection. The replicas are checked with the live rig's point-in-time check
//! (`common::rig`) whenever the link is quiet.

use std::net::SocketAddr;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::proxy::{Dir, Fault};
use crate::common::rig::{assert_point_in_time, Guest, Rig, RigSpec};
use crate::common::TargetProc;
use dataplane::protocol::PROTOCOL_VERSION_MAX;

const DISK_BYTES: u64 = 8 << 20;
/// The guest's largest write, in sectors.
const MAX_SECTORS: u64 = 16;

/// Two disks of one group behind a proxy; `epoch_interval_ms` and the target's
/// `io_timeout_ms` as given.
fn spec(interval_ms: u64, target_io_timeout_ms: u64) -> RigSpec {
    RigSpec {
        proxy: true,
        source_extra: format!(
            "io_timeout_ms = 20000\nconnect_timeout_ms = 2000\nepoch_interval_ms = {interval_ms}\n"
        ),
        target_io_timeout_ms,
        ..RigSpec::two_disk_group(DISK_BYTES)
    }
}

/// Lines of `source.log` saying an epoch is durable.
fn durable(rig: &Rig) -> usize {
    rig.log("source.log")
        .lines()
        .filter(|l| l.contains("epoch durable"))
        .count()
}

/// Waits until `source.log` counts at least `n` durable epochs.
fn wait_durable(rig: &Rig, n: usize, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while durable(rig) < n {
        assert!(
            Instant::now() < deadline,
            "{why}: fewer than {n} epochs; source log:\n{}\ntarget log:\n{}",
            rig.log("source.log"),
            rig.target.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sessions the target authenticated (one per connection).
fn sessions(rig: &Rig) -> usize {
    rig.target
        .stderr()
        .matches(&format!(
            "authenticated (protocol version {PROTOCOL_VERSION_MAX})"
        ))
        .count()
}

/// Waits until the target ended every session it authenticated (the line that ends one
/// starts with the peer's address) and holds no undo log.
fn wait_target_quiet(rig: &Rig, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = rig.target.stderr();
        let open: Vec<SocketAddr> = rig
            .proxy()
            .upstream_peers()
            .into_iter()
            // The sessions of this target (a restarted one never saw the old ones).
            .filter(|p| log.contains(&format!("session of {p} authenticated")))
            .filter(|p| !log.contains(&format!("{p}: ")))
            .collect();
        let undo = std::fs::read_dir(rig.target_state.join("undo"))
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

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The guest stops, replication goes on until the replicas equal the sources; then
/// the source stops and the replicas hold every write. Every epoch after the first
/// went as changed blocks.
fn catch_up(rig: &Rig, mut guest: Guest, mut source: Child) {
    let log = guest.stop();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rig.replicas() != rig.images() {
        assert!(
            Instant::now() < deadline,
            "the replicas did not catch up; source log:\n{}",
            rig.log("source.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    kill(&mut source);
    rig.proxy().hold();
    wait_target_quiet(rig, "the end");
    assert_eq!(
        assert_point_in_time(&rig.replicas(), &rig.initial, &log, "the end"),
        log.len() as u64
    );
    let source_log = rig.log("source.log");
    for l in source_log
        .lines()
        .filter(|l| l.contains("epoch durable"))
        .skip(1)
    {
        assert!(
            l.contains("os=changed") && l.contains("data=changed"),
            "a resume was not changed-block: {l}"
        );
    }
}

/// Epochs follow each other on one connection: one TCP connection and one
/// authenticated session at the target for many epochs, each acknowledged and logged
/// by the target on its own.
#[test]
fn successive_epochs_share_one_connection() {
    let seed = crate::common::test_seed("session_reuse_one");
    let rig = Rig::new(seed, &spec(200, 20000));
    let guest = Guest::start(&rig, seed ^ 1, MAX_SECTORS, Duration::from_millis(1));
    let source = rig.start_source();
    wait_durable(&rig, 8, "one connection");
    assert_eq!(
        rig.proxy().upstream_peers().len(),
        1,
        "one connection for 8 epochs; target log:\n{}",
        rig.target.stderr()
    );
    assert_eq!(sessions(&rig), 1, "{}", rig.target.stderr());
    let per_epoch = rig.target.stderr().matches("(session of ").count();
    assert!(per_epoch >= 7, "the target logs each epoch: {per_epoch}");
    guest.wait_for(10);
    catch_up(&rig, guest, source);
}

/// The source waits longer between epochs than the target allows for a frame: its
/// Keepalive frames keep the session, which still carries every epoch.
#[test]
fn keepalives_hold_the_session_across_long_intervals() {
    let seed = crate::common::test_seed("session_reuse_keepalive");
    // Epochs 2.5 s apart; the target gives up on a silent connection after 1.5 s.
    let rig = Rig::new(seed, &spec(2500, 1500));
    let guest = Guest::start(&rig, seed ^ 2, MAX_SECTORS, Duration::from_millis(5));
    let source = rig.start_source();
    wait_durable(&rig, 4, "keepalives");
    assert_eq!(
        rig.proxy().upstream_peers().len(),
        1,
        "the idle session was kept; target log:\n{}",
        rig.target.stderr()
    );
    assert!(
        !rig.target.stderr().contains("timed out"),
        "{}",
        rig.target.stderr()
    );
    catch_up(&rig, guest, source);
}

/// A connection cut between epochs is found before the next freeze and replaced, with
/// no epoch failing; one cut in the middle of an epoch fails that epoch alone, which
/// the target rolls back (the replicas stay an acknowledged point in time), and the
/// next epoch carries its blocks on a new connection.
#[test]
fn a_cut_between_or_within_epochs_reconnects_and_loses_nothing() {
    let seed = crate::common::test_seed("session_reuse_cut");
    let rig = Rig::new(seed, &spec(1000, 20000));
    let guest = Guest::start(&rig, seed ^ 3, MAX_SECTORS, Duration::from_millis(1));
    let source = rig.start_source();
    wait_durable(&rig, 2, "first epochs");

    // Between epochs: right after one is acknowledged, a second before the next.
    let n = durable(&rig);
    wait_durable(&rig, n + 1, "before the cut");
    rig.proxy().cut_all();
    wait_durable(&rig, n + 3, "after a cut between epochs");
    let source_log = rig.log("source.log");
    assert!(
        source_log.contains("the target closed the connection after"),
        "the cut was found between epochs: {source_log}"
    );
    assert!(
        !source_log.contains("epoch failed"),
        "no epoch failed: {source_log}"
    );
    assert_eq!(rig.proxy().upstream_peers().len(), 2);

    // Within an epoch: a few KiB into the next epoch's data.
    let strikes = rig.proxy().strikes();
    rig.proxy().arm(Fault::Cut {
        dir: Dir::Up,
        after: 6000,
    });
    let until = Instant::now() + Duration::from_secs(60);
    while rig.proxy().strikes() == strikes {
        assert!(Instant::now() < until, "the cut never struck");
        std::thread::sleep(Duration::from_millis(5));
    }
    rig.proxy().hold();
    wait_target_quiet(&rig, "after a cut within an epoch");
    let m = assert_point_in_time(&rig.replicas(), &rig.initial, &guest.log(), "mid-epoch cut");
    assert!(m > 0, "earlier epochs stay committed");
    rig.proxy().release();
    let n = durable(&rig);
    wait_durable(&rig, n + 2, "after a cut within an epoch");
    assert!(rig.proxy().upstream_peers().len() >= 3);
    catch_up(&rig, guest, source);
}

/// The target restarts between epochs (kill -9 and start again): the kept connection
/// is dead, the source notices and connects to the new target, which carries on from
/// the last acknowledged epoch with changed blocks.
#[test]
fn a_target_restart_between_epochs_reconnects() {
    let seed = crate::common::test_seed("session_reuse_restart");
    let mut rig = Rig::new(seed, &spec(1000, 20000));
    let guest = Guest::start(&rig, seed ^ 4, MAX_SECTORS, Duration::from_millis(1));
    let source = rig.start_source();
    wait_durable(&rig, 2, "first epochs");
    let n = durable(&rig);
    wait_durable(&rig, n + 1, "before the restart");
    rig.target.kill();
    // Between epochs, nothing was being applied: no undo log, the replicas are the
    // last acknowledged epoch. (Should an epoch have been under way after all, the
    // new target rolls it back before it listens.)
    let undo_logs = std::fs::read_dir(rig.target_state.join("undo"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .count()
        })
        .unwrap_or(0);
    if undo_logs == 0 {
        assert_point_in_time(&rig.replicas(), &rig.initial, &guest.log(), "target down");
    }
    let (config, port) = (rig.target.config.clone(), rig.target.port);
    rig.target = TargetProc::spawn(&config, port).expect("target restart");
    let n = durable(&rig);
    wait_durable(&rig, n + 2, "after the restart");
    assert_eq!(sessions(&rig), 1, "one session with the new target");
    catch_up(&rig, guest, source);
}
