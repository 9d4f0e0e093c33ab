//! A stage of the source pipeline that dies must fail the epoch, never end it as if the
//! plan were done.
//!
//! Failpoints used (debug builds only, armed through `FERRY_FAILPOINTS` in the
//! environment of the `ferry sync` process, see `ferry_io::failpoint`):
//! - `source.worker.panic@N`: a hash/compress worker panics when it takes the N-th
//!   message of the run (one message per planned read or zero run, counted over all
//!   workers).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const DISK_BYTES: u64 = 4 << 20;
const IO_KIB: u64 = 64;
const BLOCK_KIB: u64 = 16;
/// Messages of a full sync of a disk without holes: one per read.
const READS: u64 = DISK_BYTES / (IO_KIB << 10);

/// Overwrites the whole of `path` with fresh random bytes (no holes, every block new).
fn fill_random(path: &Path, rng: &mut Rng) {
    let f = open_rw(path);
    let mut buf = vec![0u8; 1 << 20];
    for at in (0..DISK_BYTES).step_by(buf.len()) {
        rng.fill(&mut buf);
        f.write_all_at(&buf, at).unwrap();
    }
}

/// `ferry sync --mode full` with `failpoints` armed in its environment.
fn sync_with_failpoints(config: &Path, failpoints: &str) -> (bool, String) {
    let mut child = Command::new(ferry_bin())
        .args(["sync", "--config"])
        .arg(config)
        .args(["--json", "--mode", "full"])
        .env("NO_COLOR", "1")
        .env("FERRY_FAILPOINTS", failpoints)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry sync");
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferry sync with {failpoints} did not finish");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let settle = Instant::now() + Duration::from_secs(5);
    while std::sync::Arc::strong_count(&stderr) > 1 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(2));
    }
    let text = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    (status.success(), text)
}

/// A worker panics in the middle of the plan, and on its very last message (where the
/// other stages had already finished and an abandoned ring used to look like the end
/// of the plan): the sync exits non-zero naming the failed stage, the target
/// acknowledges nothing — its replica record stays at the previous epoch and the
/// replica's bytes are unchanged — and a sync without the failpoint then succeeds.
#[test]
fn a_worker_that_panics_fails_the_epoch_and_nothing_is_acknowledged() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIP: failpoints are compiled into debug builds only");
        return;
    }
    let mut rng = Rng::new(test_seed(
        "a_worker_that_panics_fails_the_epoch_and_nothing_is_acknowledged",
    ));
    let dir = scratch_dir();
    let disk = PairDisk::new(dir.path(), "d0");
    create_sparse(&disk.source, DISK_BYTES);
    fill_random(&disk.source, &mut rng);
    let pair = Pair::start(
        dir,
        vec![disk.clone()],
        &format!("block_size_kib = {BLOCK_KIB}\nio_size_kib = {IO_KIB}\nworkers = 2\n"),
        "",
    );
    pair.sync_ok(&[]);
    pair.assert_replicas_identical();
    let record = pair.target_state.join("d0.replica");
    let epoch_of = |p: &Path| -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        v["epoch"].as_u64().expect("epoch in the replica record")
    };
    let acknowledged = epoch_of(&record);

    fill_random(&disk.source, &mut rng);
    let replica_before = fingerprint(&disk.replica);
    let state_before = target_state_fingerprints(&pair.target_state);
    for at in [READS / 4, READS - 1, READS] {
        let failpoints = format!("source.worker.panic@{at}");
        let (ok, stderr) = sync_with_failpoints(&pair.source_config, &failpoints);
        assert!(
            !ok,
            "{failpoints}: ferry sync succeeded although a worker panicked:\n{stderr}"
        );
        assert!(
            stderr.contains("source pipeline") && stderr.contains("worker thread"),
            "{failpoints}: the error should name the failed stage:\n{stderr}"
        );
        assert!(
            stderr.contains("failpoint source.worker.panic"),
            "{failpoints}: the error should say why the stage failed:\n{stderr}"
        );
        // The target rolls the session back when the source goes away; give it a
        // moment to notice.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fingerprint(&disk.replica) != replica_before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            fingerprint(&disk.replica),
            replica_before,
            "{failpoints}: the replica changed"
        );
        assert_eq!(
            target_state_fingerprints(&pair.target_state),
            state_before,
            "{failpoints}: the target's records changed"
        );
        assert_eq!(epoch_of(&record), acknowledged, "{failpoints}");
    }

    let report = pair.sync_ok(&["--mode", "full"]);
    assert_eq!(
        u64_field(&report, "blocks_sent"),
        DISK_BYTES / (BLOCK_KIB << 10)
    );
    pair.assert_replicas_identical();
    assert!(epoch_of(&record) > acknowledged);
}
