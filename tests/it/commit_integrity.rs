//! The target's commit, where it can fail: a commit mark that cannot be written rolls
//! the epoch back at once (never leaving an undo log that a later start replays over
//! newer epochs); records that cannot be written after a durable mark still
//! acknowledge the epoch and are completed before the disks serve again; damaged
//! recovery-point metadata never fails a commit. Real target processes, real TCP;
//! failures are injected with test-only failpoints (`FERRY_FAILPOINTS`, debug builds).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common;
use crate::common::{file_hash, Rng, TargetProc};

const DISK_BYTES: u64 = 8 << 20;
const BLOCK: u64 = 64 << 10;

/// Rewrites about a sixth of the blocks with random bytes.
fn mutate(path: &Path, rng: &mut Rng) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..DISK_BYTES / BLOCK {
        if rng.below(6) == 0 {
            rng.fill(&mut buf);
            f.write_all_at(&buf, b * BLOCK).unwrap();
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    d: PathBuf,
    source: PathBuf,
    replica: PathBuf,
    source_cfg: PathBuf,
    target: TargetProc,
    rng: Rng,
}

impl Setup {
    /// A source image, a target started with `failpoints`, and a source config.
    fn new(test: &str, failpoints: &str) -> Setup {
        let mut rng = Rng::new(common::test_seed(test));
        let dir = common::scratch_dir();
        let d = dir.path().to_path_buf();
        let key = d.join("ferry.key");
        common::keygen(&key);
        let source = d.join("vm.img");
        let replica = d.join("vm.replica");
        std::fs::File::create(&source)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        mutate(&source, &mut rng);
        let config = d.join("target.toml");
        let target = TargetProc::start_with(&config, &[("FERRY_FAILPOINTS", failpoints)], |port| {
            common::target_toml(
                port,
                &key,
                &d.join("target-state"),
                &[("vm", replica.as_path())],
                "",
            )
        });
        let source_cfg = d.join("source.toml");
        std::fs::write(
            &source_cfg,
            common::source_toml(
                target.port,
                &key,
                &d.join("source-state"),
                &[("vm", source.as_path())],
                "",
            ),
        )
        .unwrap();
        Setup {
            _dir: dir,
            d,
            source,
            replica,
            source_cfg,
            target,
            rng,
        }
    }

    fn mutate(&mut self) {
        mutate(&self.source, &mut self.rng);
    }

    fn record_epoch(&self) -> u64 {
        let bytes = std::fs::read(self.d.join("target-state/vm.replica")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["epoch"].as_u64().unwrap()
    }

    /// Stops the target and starts it again with no failpoint armed.
    fn restart_target(&mut self) {
        self.target.kill();
        self.target = TargetProc::spawn(&self.target.config.clone(), self.target.port).unwrap();
    }

    fn points(&self) -> Vec<u64> {
        let run = common::run_ferry(
            &[
                "points".as_ref(),
                "--config".as_ref(),
                self.target.config.as_os_str(),
                "--json".as_ref(),
            ],
            Duration::from_secs(60),
        );
        assert!(run.success(), "{run:?}");
        let json: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        json["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect()
    }
}

#[test]
fn a_commit_mark_that_cannot_be_written_rolls_the_epoch_back_at_once() {
    // The second session's commit mark fails as on a full state dir.
    let mut s = Setup::new("commit_mark_fails", "target.commit.mark@2");
    common::sync_ok(&s.source_cfg, &[]);
    let at_first = file_hash(&s.source);
    assert_eq!(file_hash(&s.replica), at_first);

    s.mutate();
    let failed = common::sync(&s.source_cfg, &[]);
    assert!(
        !failed.success(),
        "a commit without its mark must not succeed"
    );
    assert!(
        failed.stderr.contains("commit mark"),
        "the error names the failed step: {failed:?}"
    );
    assert_eq!(file_hash(&s.replica), at_first, "the epoch was rolled back");
    assert_eq!(s.record_epoch(), 1);
    let undo = s.d.join("target-state/undo");
    let left: Vec<_> = std::fs::read_dir(&undo)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "no undo log left behind: {left:?}");

    // Later epochs commit; a restart must not take any of their bytes back.
    for _ in 0..2 {
        s.mutate();
        common::sync_ok(&s.source_cfg, &[]);
    }
    let now = file_hash(&s.source);
    assert_eq!(file_hash(&s.replica), now);
    let epoch = s.record_epoch();
    s.restart_target();
    assert_eq!(
        file_hash(&s.replica),
        now,
        "a restart changed the replica: {}",
        s.target.stderr()
    );
    assert_eq!(s.record_epoch(), epoch);
}

/// An epoch in which nothing changed is committed without the target's receive
/// pipeline, but through the same commit: when its mark cannot be written it is not
/// acknowledged, nothing of it stays behind, and the next one commits.
#[test]
fn an_unchanged_epoch_whose_commit_mark_fails_is_not_acknowledged() {
    let s = Setup::new("unchanged_epoch_commit_mark_fails", "target.commit.mark@2");
    common::sync_ok(&s.source_cfg, &[]);
    let at_first = file_hash(&s.replica);
    assert_eq!(at_first, file_hash(&s.source));
    let unchanged = || {
        let (generation, epoch) = common::read_source_state(&s.d.join("source-state"), "vm");
        let bitmap = s.d.join("vm.cbt");
        common::write_bitmap(&bitmap, DISK_BYTES, BLOCK as u32, generation, epoch, []);
        format!("vm={}", bitmap.display())
    };

    let spec = unchanged();
    let failed = common::sync(&s.source_cfg, &["--mode", "changed", "--bitmap", &spec]);
    assert!(
        !failed.success(),
        "a commit without its mark must not succeed"
    );
    assert!(
        failed.stderr.contains("commit mark"),
        "the error names the failed step: {failed:?}"
    );
    assert_eq!(file_hash(&s.replica), at_first);
    assert_eq!(s.record_epoch(), 1, "not committed");
    let undo = s.d.join("target-state/undo");
    let left: Vec<_> = std::fs::read_dir(&undo)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "no undo log left behind: {left:?}");

    let spec = unchanged();
    common::sync_ok(&s.source_cfg, &["--mode", "changed", "--bitmap", &spec]);
    assert_eq!(s.record_epoch(), 2, "the next unchanged epoch commits");
    assert_eq!(file_hash(&s.replica), at_first);
}

#[test]
fn records_that_fail_after_a_durable_mark_still_acknowledge_and_are_completed() {
    let mut s = Setup::new("commit_records_fail", "target.commit.records@2");
    common::sync_ok(&s.source_cfg, &[]);
    s.mutate();
    // The mark is durable: the epoch is committed and is acknowledged as such.
    let report = common::sync_ok(&s.source_cfg, &[]);
    let second = report["epoch"].as_u64().unwrap();
    let at_second = file_hash(&s.source);
    assert_eq!(file_hash(&s.replica), at_second);
    assert!(
        s.target.stderr().contains("completing its records failed"),
        "{}",
        s.target.stderr()
    );
    // The next session completes the records first, then applies on top.
    s.mutate();
    let report = common::sync_ok(&s.source_cfg, &[]);
    assert_eq!(file_hash(&s.replica), file_hash(&s.source));
    assert_eq!(s.record_epoch(), report["epoch"].as_u64().unwrap());
    // The committed epoch's log was kept: its point opens.
    assert!(s.points().contains(&second), "{:?}", s.points());
    s.restart_target();
    assert_eq!(file_hash(&s.replica), file_hash(&s.source));
}

#[test]
fn damaged_point_metadata_never_fails_a_commit() {
    let mut s = Setup::new("point_meta_damaged", "");
    for _ in 0..3 {
        common::sync_ok(&s.source_cfg, &[]);
        s.mutate();
    }
    assert_eq!(s.points(), vec![3, 2, 1]);
    // Damage the metadata of the point that restores epoch 1 (the log of epoch 2).
    let points = s.d.join("target-state/points");
    let meta = std::fs::read_dir(&points)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("00000000000000000002-")
        })
        .unwrap();
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, text.replace("\"epoch\": 2", "\"epoch\": 7")).unwrap();

    let report = common::sync_ok(&s.source_cfg, &[]);
    assert_eq!(report["epoch"].as_u64(), Some(4));
    assert_eq!(s.record_epoch(), 4);
    assert_eq!(file_hash(&s.replica), file_hash(&s.source));
    // The point behind the damaged metadata is no longer offered; newer ones are.
    assert_eq!(s.points(), vec![4, 3, 2]);
}

#[test]
fn a_damaged_recovery_point_is_refused_by_name_never_opened_wrong() {
    let mut s = Setup::new("point_log_damaged", "");
    let mut at = Vec::new();
    for _ in 0..4 {
        common::sync_ok(&s.source_cfg, &[]);
        at.push(file_hash(&s.source));
        s.mutate();
    }
    assert_eq!(s.points(), vec![4, 3, 2, 1]);
    // One bit in the old data of the log of epoch 3 (the one that restores epoch 2).
    let log = std::fs::read_dir(s.d.join("target-state/points"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "undo")
                && p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("00000000000000000003-")
        })
        .unwrap();
    let len = std::fs::metadata(&log).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&log)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len - 100).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], len - 100).unwrap();
    drop(f);

    let tcfg = s.target.config.clone();
    let open = |point: u64| {
        common::run_ferry(
            &[
                "failover".as_ref(),
                "test".as_ref(),
                "--config".as_ref(),
                tcfg.as_os_str(),
                "--point".as_ref(),
                point.to_string().as_ref(),
            ],
            Duration::from_secs(60),
        )
    };
    let refused = open(2);
    assert!(!refused.success(), "a damaged point opened: {refused:?}");
    assert!(
        refused.stderr.contains(log.to_str().unwrap()),
        "the error names the damaged file: {refused:?}"
    );
    assert!(
        !s.d.join("target-state/failover").exists(),
        "nothing was materialised"
    );
    // The points behind the damaged log are no longer offered; the newer ones open
    // exactly.
    assert_eq!(s.points(), vec![4, 3]);
    let ok = open(3);
    assert!(ok.success(), "{ok:?}");
    assert_eq!(file_hash(&s.d.join("target-state/failover/vm.img")), at[2]);
}

#[test]
fn a_damaged_undo_log_is_never_applied_and_a_seeded_sync_repairs_the_replica() {
    // The target dies just before the third session's commit mark: a full undo log,
    // every write done.
    let mut s = Setup::new("undo_log_damaged", "target.commit.crash@3");
    common::sync_ok(&s.source_cfg, &[]);
    common::sync_ok(&s.source_cfg, &[]);
    s.mutate();
    let crashed = common::sync(&s.source_cfg, &[]);
    assert!(!crashed.success(), "{crashed:?}");
    s.target.kill();
    let undo = s.d.join("target-state/undo");
    let log = std::fs::read_dir(&undo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "undo"))
        .expect("the interrupted epoch's undo log");
    // One bit in the middle of the log, well inside its synced part.
    let len = std::fs::metadata(&log).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&log)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len / 2).unwrap();
    f.write_all_at(&[b[0] ^ 0x04], len / 2).unwrap();
    drop(f);
    let replica_before = file_hash(&s.replica);

    s.target = TargetProc::spawn(&s.target.config.clone(), s.target.port).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s.target.stderr().contains("listening") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log_text = s.target.stderr();
    assert!(
        log_text.contains("cannot be trusted") && log_text.contains(log.to_str().unwrap()),
        "recovery names the damaged log: {log_text}"
    );
    assert_eq!(
        file_hash(&s.replica),
        replica_before,
        "nothing was applied from a damaged log"
    );
    assert!(log.with_extension("damaged").exists(), "set aside");
    // The replica is not a known epoch: no point opens, and `points` says why.
    let tcfg = s.target.config.clone();
    let open = common::run_ferry(
        &[
            "failover".as_ref(),
            "test".as_ref(),
            "--config".as_ref(),
            tcfg.as_os_str(),
        ],
        Duration::from_secs(60),
    );
    assert!(!open.success(), "{open:?}");
    assert!(open.stderr.contains("not at a known epoch"), "{open:?}");
    // A seeded sync compares checksums, repairs every difference and clears the mark.
    let report = common::sync_ok(&s.source_cfg, &["--mode", "seeded"]);
    assert_eq!(common::mode_of(&report, "vm"), "seeded");
    assert_eq!(file_hash(&s.replica), file_hash(&s.source));
    let ok = common::run_ferry(
        &[
            "failover".as_ref(),
            "test".as_ref(),
            "--config".as_ref(),
            tcfg.as_os_str(),
        ],
        Duration::from_secs(60),
    );
    assert!(ok.success(), "{ok:?}");
}
