//! Split brain: a replica written by anything but the target is never applied over.
//!
//! With target, shim and `ferry source` running and a guest writing through the shim,
//! another program writes the replica file (as an operator's stray `qemu-io` would).
//! The next epoch must be refused before it touches the replica, `ferry source` must
//! stop saying why and what to do, and the foreign bytes must still be there. Then the
//! operator chooses to discard them: `--discard-replica-changes` resyncs the replica
//! from the source, byte for byte, and replication goes on with changed-block epochs.

use std::process::Command;
use std::time::Duration;

use crate::common::rig::{modes, Guest, Rig, RigSpec};
use crate::common::shim::wait_timeout;
use crate::common::*;

const DISK_BYTES: u64 = 64 << 20;
const FOREIGN_AT: u64 = 50 << 20;
const FOREIGN_LEN: usize = 1 << 20;

fn spec() -> RigSpec {
    RigSpec {
        names: vec!["d1"],
        disk_bytes: DISK_BYTES,
        group: None,
        proxy: false,
        source_extra: "io_timeout_ms = 20000\nepoch_interval_ms = 200\n".into(),
        target_io_timeout_ms: 20000,
    }
}

#[test]
fn a_replica_written_outside_ferry_is_refused_until_the_operator_chooses() {
    if !tool_or_skip("qemu-io") {
        return;
    }
    let seed = test_seed("split_brain");
    let rig = Rig::new(seed, &spec());
    let mut guest = Guest::start(&rig, seed ^ 1, 16, Duration::from_millis(2));
    guest.wait_for(20);
    let mut source = rig.start_source();
    rig.wait_first_epoch(Duration::from_secs(60));
    guest.wait_for(50);

    // Another program writes the replica while everything runs. While a session
    // applies an epoch the target holds the replica locked and qemu-io cannot open it;
    // between sessions it can.
    let replica = &rig.disks[0].replica;
    let mut locked_out = 0;
    loop {
        let out = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(replica)
            .args(["-c", &format!("write -P 0x77 {FOREIGN_AT} {FOREIGN_LEN}")])
            .output()
            .expect("run qemu-io");
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lock"), "qemu-io failed otherwise: {err}");
        locked_out += 1;
        assert!(locked_out < 1000, "the replica stayed locked");
        std::thread::sleep(Duration::from_millis(7));
    }
    eprintln!("qemu-io was locked out {locked_out} time(s) before it could write");
    guest.wait_for(50);

    // The next epoch is refused and `ferry source` stops, saying why and what to do.
    let status = wait_timeout(&mut source, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("ferry source kept going: {}", rig.log("source.log")));
    let log = rig.log("source.log");
    assert_eq!(status.code(), Some(6), "a data-integrity refusal: {log}");
    for words in [
        "split brain",
        "was changed by something other than this target",
        "--discard-replica-changes",
        "fail over",
    ] {
        assert!(log.contains(words), "source log lacks {words:?}: {log}");
    }
    // Nothing was applied over the foreign write.
    let bytes = std::fs::read(replica).unwrap();
    let foreign = &bytes[FOREIGN_AT as usize..FOREIGN_AT as usize + FOREIGN_LEN];
    assert!(
        foreign.iter().all(|&b| b == 0x77),
        "the foreign write was overwritten"
    );
    // No recovery point describes the replica any more, and a failover can take it
    // only as it is.
    let target_config = rig.target.config.to_str().unwrap();
    let points = run_ferry(
        &[
            "points".as_ref(),
            "--config".as_ref(),
            target_config.as_ref(),
        ],
        Duration::from_secs(30),
    );
    assert!(
        points.stdout.contains("changed outside ferry"),
        "{}",
        points.stdout
    );
    let older = run_ferry(
        &[
            "failover".as_ref(),
            "unplanned".as_ref(),
            "--config".as_ref(),
            target_config.as_ref(),
            // Any point but the latest (epoch 0 precedes every epoch).
            "--point".as_ref(),
            "0".as_ref(),
        ],
        Duration::from_secs(30),
    );
    assert!(
        !older.success() && older.stderr.contains("only as it is"),
        "{}",
        older.stderr
    );
    // Refused again on a rerun, as long as the operator has not chosen.
    let again = sync(&rig.config, &[]);
    assert_eq!(
        again.status.code(),
        Some(6),
        "a data-integrity refusal: {}",
        again.stderr
    );
    assert!(again.stderr.contains("split brain"), "{}", again.stderr);

    // The operator discards the replica's changes: a seeded sync repairs every block.
    let log = guest.stop();
    assert!(!log.is_empty());
    let repaired = sync(&rig.config, &["--discard-replica-changes"]);
    assert!(repaired.success(), "{}", repaired.stderr);
    assert_eq!(modes(&repaired.json()), ["seeded"], "{}", repaired.stdout);
    assert_eq!(
        rig.replicas(),
        rig.images(),
        "the replica is the source again"
    );
    // Changed-block epochs are accepted again.
    let mut guest = Guest::start(&rig, seed ^ 2, 16, Duration::ZERO);
    guest.wait_for(30);
    guest.stop();
    let next = sync(&rig.config, &[]);
    assert!(next.success(), "{}", next.stderr);
    assert_eq!(modes(&next.json()), ["changed"], "{}", next.stdout);
    assert_eq!(rig.replicas(), rig.images());
}

#[test]
fn discarding_replica_changes_needs_a_sync_that_compares_every_block() {
    let seed = test_seed("split_brain_usage");
    let rig = Rig::new(seed, &spec());
    let run = sync(
        &rig.config,
        &["--discard-replica-changes", "--mode", "changed"],
    );
    assert!(!run.success());
    assert!(
        run.stderr
            .contains("needs a sync that compares every block"),
        "{}",
        run.stderr
    );
}
