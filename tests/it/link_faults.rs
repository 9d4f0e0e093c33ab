//! Link faults between the source and the target, injected by a real TCP proxy
//! (`common::proxy`): a stalled or trickling link must fail an epoch within the
//! configured `io_timeout_ms`, in words, and give the shim's epoch back; and
//! continuous replication under a writing guest must ride out cuts at random byte
//! offsets in either direction, half-closed connections and stalls — the replicas
//! always an acknowledged point in time, every resume changed-block, and in the end
//! equal to the sources.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::nbd::NbdClient;
use crate::common::proxy::{Dir, Fault};
use crate::common::rig::{assert_point_in_time, modes, Guest, Rig, RigSpec};
use crate::common::*;

const DISK_BYTES: u64 = 8 << 20;
/// The source's `io_timeout_ms` in these tests: short, so faults cost little time.
const SOURCE_IO_TIMEOUT_MS: u64 = 1500;

/// A target, a proxy in front of it, a shim and a source config that goes through the
/// proxy; the first half of every disk random, the rest a hole.
fn spec(names: &[&'static str], disk_bytes: u64) -> RigSpec {
    RigSpec {
        names: names.to_vec(),
        disk_bytes,
        group: None,
        proxy: true,
        source_extra: format!(
            "io_timeout_ms = {SOURCE_IO_TIMEOUT_MS}\nconnect_timeout_ms = 2000\nepoch_interval_ms = 200\n"
        ),
        target_io_timeout_ms: 4000,
    }
}

/// Waits until the target has ended every session the proxy ever forwarded (it
/// logs one line per connection, prefixed with the peer's address) and holds no
/// undo log: nothing is being applied, the replicas are at rest.
fn wait_target_quiet(rig: &Rig, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = rig.target.stderr();
        let open: Vec<SocketAddr> = rig
            .proxy()
            .upstream_peers()
            .into_iter()
            .filter(|p| !log.contains(&format!("{p}: ")))
            .collect();
        // Undo logs (and their commit marks) are files directly in undo/.
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

/// Writes `blocks` distinct 64 KiB blocks of `disk` through the shim.
fn guest_writes(rig: &Rig, disk: usize, blocks: u64, rng: &mut Rng) {
    let d = &rig.disks[disk];
    let mut client = NbdClient::connect(&d.socket, &d.name).unwrap();
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
    let rig = Rig::new(seed, &spec(&["d1"], DISK_BYTES));
    let first = sync_ok(&rig.config, &[]);
    assert_eq!(modes(&first), ["full"], "{first}");
    const WRITTEN: u64 = 48;
    guest_writes(&rig, 0, WRITTEN, &mut rng);
    let pauses = rig.shim_status()["pauses"]["count"].as_u64().unwrap();

    rig.proxy().arm(fault);
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
    assert!(rig.proxy().strikes() > 0, "the fault struck");
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

    rig.proxy().clear();
    rig.proxy().cut_all();
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
    let rig = Rig::new(seed, &spec(&["d1"], 96 << 20));
    rig.proxy().arm(Fault::Stall {
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
    rig.proxy().clear();
    rig.proxy().cut_all();
    // The failed session created the replica but never committed an epoch to it:
    // the next whole-disk epoch compares it by hash.
    let r = sync_ok_when_free(&rig.config);
    assert_eq!(modes(&r), ["seeded"], "{r}");
    assert!(rig.replicas() == rig.images(), "replica equals image");
}

// ---------------------------------------------------------------------------------
// Continuous replication under link faults.

/// Issue 8, item 14. `FERRY_SOAK=1` makes it 100 faults; `FERRY_TEST_SEED` replays
/// one run.
#[test]
fn continuous_replication_rides_out_cuts_half_closes_and_stalls() {
    let seed = test_seed("link_faults");
    let faults = if soak() { 100 } else { 6 };
    let mut rng = Rng::new(seed);
    let rig = Rig::new(seed, &spec(&["os", "data"], DISK_BYTES));
    let mut guest = Guest::start(&rig, seed ^ 0x9e37, 16, Duration::from_millis(1));
    let mut source = rig.start_source();
    rig.wait_first_epoch(Duration::from_secs(120));

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
        let strikes = rig.proxy().strikes();
        rig.proxy().arm(fault);
        let until = Instant::now() + Duration::from_secs(120);
        while rig.proxy().strikes() == strikes {
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
        rig.proxy().clear();
        // Quiet the link and look: the replicas are an acknowledged epoch, no older
        // than the last one seen.
        rig.proxy().hold();
        wait_target_quiet(&rig, &when);
        let m = assert_point_in_time(&rig.replicas(), &rig.initial, &guest.log(), &when);
        assert!(
            m >= last_m,
            "{when}: the replicas went back from write {last_m} to {m}"
        );
        last_m = m;
        rig.proxy().release();
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
    rig.proxy().hold();
    wait_target_quiet(&rig, "the end");
    assert_eq!(
        assert_point_in_time(&rig.replicas(), &rig.initial, &log, "the end"),
        log.len() as u64,
        "the last epoch holds every write"
    );
    assert_eq!(rig.replicas(), rig.images(), "replica equals source");
    assert_eq!(
        guest.retries.load(Ordering::Relaxed),
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
