//! Recovery points and test failover against a real target: every listed point opens
//! as images that hash exactly like the source did at that epoch, replication goes on
//! meanwhile, and retention merges the oldest points away.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::common;
use crate::common::{file_hash, Rng, TargetProc};

const DISK_BYTES: u64 = 16 << 20;
const BLOCK: u64 = 64 << 10;

fn mutate(path: &Path, rng: &mut Rng) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..DISK_BYTES / BLOCK {
        match rng.below(6) {
            0 => {
                rng.fill(&mut buf);
                f.write_all_at(&buf, b * BLOCK).unwrap();
            }
            1 => f
                .write_all_at(&vec![0u8; BLOCK as usize], b * BLOCK)
                .unwrap(),
            _ => {}
        }
    }
}

fn ferry(args: &[&str]) -> common::Run {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    common::run_ferry(&args, Duration::from_secs(120))
}

#[test]
fn every_point_opens_exactly_as_the_source_was() {
    let mut rng = Rng::new(common::test_seed("recovery_points"));
    let dir = common::scratch_dir();
    let d = dir.path();
    let key = d.join("ferry.key");
    common::keygen(&key);
    let sources = [d.join("os.img"), d.join("data.img")];
    let replicas = [d.join("os.replica"), d.join("data.replica")];
    for s in &sources {
        std::fs::File::create(s)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        mutate(s, &mut rng);
    }
    let target = TargetProc::start(
        d,
        &key,
        &[
            ("os", replicas[0].as_path()),
            ("data", replicas[1].as_path()),
        ],
        "retention_points = 2",
    );
    let source_cfg = d.join("source.toml");
    std::fs::write(
        &source_cfg,
        common::source_toml(
            target.port,
            &key,
            &d.join("source-state"),
            &[("os", sources[0].as_path()), ("data", sources[1].as_path())],
            "",
        ),
    )
    .unwrap();
    let target_cfg = target.config.clone();
    let tcfg = target_cfg.to_str().unwrap();

    // Epochs 1..=4, remembering what the source held at each.
    let mut at_epoch = Vec::new();
    for epoch in 1..=4u64 {
        if epoch > 1 {
            for s in &sources {
                mutate(s, &mut rng);
            }
        }
        let report = common::sync_ok(&source_cfg, &[]);
        assert_eq!(report["epoch"].as_u64(), Some(epoch));
        at_epoch.push(sources.iter().map(|s| file_hash(s)).collect::<Vec<_>>());
    }

    // Retention 2: the latest (4) plus two earlier points (3, 2); 1 was merged away.
    let listed = ferry(&["points", "--config", tcfg, "--json"]);
    assert!(listed.success(), "{listed:?}");
    let json: serde_json::Value = serde_json::from_str(listed.stdout.trim()).unwrap();
    let ids: Vec<u64> = json["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![4, 3, 2], "{json}");

    let mut replica_now = at_epoch[3][0];
    for point in [2u64, 3, 4] {
        let run = ferry(&[
            "failover",
            "test",
            "--config",
            tcfg,
            "--point",
            &point.to_string(),
        ]);
        assert!(run.success(), "{run:?}");
        let images = [
            d.join("target-state/failover/os.img"),
            d.join("target-state/failover/data.img"),
        ];
        let got: Vec<u128> = images.iter().map(|p| file_hash(p)).collect();
        assert_eq!(
            got,
            at_epoch[point as usize - 1],
            "point {point} does not match the source at epoch {point}"
        );
        // The images are writable and separate from the replicas.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&images[0])
            .unwrap()
            .write_all_at(b"test vm", 0)
            .unwrap();
        assert_eq!(
            file_hash(&replicas[0]),
            replica_now,
            "writing the test image touched the replica"
        );
        // Replication goes on while a test failover is open.
        if point == 3 {
            for s in &sources {
                mutate(s, &mut rng);
            }
            common::sync_ok(&source_cfg, &[]);
            let now: Vec<u128> = sources.iter().map(|s| file_hash(s)).collect();
            assert_eq!(
                now,
                replicas.iter().map(|r| file_hash(r)).collect::<Vec<_>>()
            );
            replica_now = now[0];
        }
        let clean = ferry(&["failover", "cleanup", "--config", tcfg]);
        assert!(clean.success(), "{clean:?}");
        assert!(!d.join("target-state/failover").exists());
        // After point 3, epoch 5 exists: point 4 is no longer the latest, and must still
        // open exactly as it was.
    }
    let bad = ferry(&["failover", "test", "--config", tcfg, "--point", "1"]);
    assert!(!bad.success());
    assert!(bad.stderr.contains("no recovery point 1"), "{}", bad.stderr);
}

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn a_point_of_a_block_device_replica_opens_whole() {
    let mut rng = Rng::new(common::test_seed("recovery_points_blockdev"));
    let dir = common::scratch_dir();
    let d = dir.path();
    let backing = d.join("loop-backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        other => {
            ferry_io::require::skip(
                ferry_io::require::Feature::Loop,
                format!("losetup -f --show: {other:?}"),
            );
            return;
        }
    };
    let _loop = Loop(dev.clone());
    let key = d.join("ferry.key");
    common::keygen(&key);
    let source = d.join("vm.img");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    mutate(&source, &mut rng);
    let target = TargetProc::start(d, &key, &[("vm", Path::new(&dev))], "");
    let cfg = d.join("source.toml");
    std::fs::write(
        &cfg,
        common::source_toml(
            target.port,
            &key,
            &d.join("source-state"),
            &[("vm", source.as_path())],
            "",
        ),
    )
    .unwrap();
    let mut at_epoch = Vec::new();
    for _ in 0..3 {
        mutate(&source, &mut rng);
        common::sync_ok(&cfg, &[]);
        at_epoch.push(file_hash(&source));
    }
    let tcfg = target.config.to_str().unwrap().to_string();
    let run = ferry(&["failover", "test", "--config", &tcfg, "--point", "2"]);
    assert!(run.success(), "{run:?}");
    let image = d.join("target-state/failover/vm.img");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), DISK_BYTES);
    assert_eq!(
        file_hash(&image),
        at_epoch[1],
        "point 2 of a block-device replica"
    );
    assert!(ferry(&["failover", "cleanup", "--config", &tcfg]).success());
}

/// The engine dies after the target acknowledged an epoch but before recording it:
/// the next sync must not reuse that epoch number (it names a recovery point).
#[test]
fn an_unrecorded_acknowledgement_does_not_repeat_an_epoch_number() {
    let mut rng = Rng::new(common::test_seed("unrecorded_ack"));
    let dir = common::scratch_dir();
    let d = dir.path();
    let key = d.join("ferry.key");
    common::keygen(&key);
    let source = d.join("os.img");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    mutate(&source, &mut rng);
    let target = TargetProc::start(d, &key, &[("os", d.join("os.replica").as_path())], "");
    let state = d.join("source-state");
    let cfg = d.join("source.toml");
    std::fs::write(
        &cfg,
        common::source_toml(target.port, &key, &state, &[("os", source.as_path())], ""),
    )
    .unwrap();
    assert_eq!(common::sync_ok(&cfg, &[])["epoch"], 1);
    mutate(&source, &mut rng);
    assert_eq!(common::sync_ok(&cfg, &[])["epoch"], 2);
    // Roll the engine's record back to epoch 1, as if it died before saving epoch 2.
    let state_file = state.join("os.state");
    let text = std::fs::read_to_string(&state_file).unwrap();
    std::fs::write(&state_file, text.replace("\"epoch\": 2", "\"epoch\": 1")).unwrap();
    mutate(&source, &mut rng);
    let r = common::sync_ok(&cfg, &[]);
    assert_eq!(r["epoch"], 3, "continues above the acknowledged epoch: {r}");
    assert_eq!(file_hash(&source), file_hash(&d.join("os.replica")));
    let tcfg = target.config.to_str().unwrap().to_string();
    let points = ferry(&["points", "--config", &tcfg, "--json"]);
    assert!(points.success(), "{points:?}");
    let v: serde_json::Value = serde_json::from_str(points.stdout.trim()).unwrap();
    let mut ids: Vec<u64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "recovery point ids are unique: {v}");
}

/// A target with one disk and a source config for it: the scratch dir, the target
/// (kept alive by the caller), the source config, the source disk and the replica.
struct OneDisk {
    dir: tempfile::TempDir,
    target: TargetProc,
    source_cfg: std::path::PathBuf,
    source: std::path::PathBuf,
    tcfg: String,
}

impl OneDisk {
    fn start(target_extra: &str, rng: &mut Rng) -> OneDisk {
        let dir = common::scratch_dir();
        let d = dir.path();
        let key = d.join("ferry.key");
        common::keygen(&key);
        let source = d.join("vm.img");
        std::fs::File::create(&source)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        mutate(&source, rng);
        let target = TargetProc::start(
            d,
            &key,
            &[("vm", d.join("vm.replica").as_path())],
            target_extra,
        );
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
        let tcfg = target.config.to_str().unwrap().to_string();
        OneDisk {
            dir,
            target,
            source_cfg,
            source,
            tcfg,
        }
    }

    /// Syncs; the epoch acknowledged.
    fn sync(&self) -> u64 {
        common::sync_ok(&self.source_cfg, &[])["epoch"]
            .as_u64()
            .unwrap()
    }

    /// `ferry points --json`: the points, newest first.
    fn points(&self) -> Vec<serde_json::Value> {
        let listed = ferry(&["points", "--config", &self.tcfg, "--json"]);
        assert!(listed.success(), "{listed:?}");
        let json: serde_json::Value = serde_json::from_str(listed.stdout.trim()).unwrap();
        json["points"].as_array().unwrap().clone()
    }

    fn ids(&self) -> Vec<u64> {
        self.points()
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect()
    }

    /// Opens `point` as a test failover; the image's hash.
    fn open(&self, point: u64) -> u128 {
        let run = ferry(&[
            "failover",
            "test",
            "--config",
            &self.tcfg,
            "--point",
            &point.to_string(),
        ]);
        assert!(run.success(), "point {point}: {run:?}");
        let hash = file_hash(&self.dir.path().join("target-state/failover/vm.img"));
        let clean = ferry(&["failover", "cleanup", "--config", &self.tcfg]);
        assert!(clean.success(), "{clean:?}");
        hash
    }

    /// Kept undo logs in the points directory.
    fn kept_logs(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("target-state/points"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "undo"))
                })
                .count()
            })
            .unwrap_or(0)
    }
}

/// Idle epochs (a sync with nothing written) change no block: they extend the newest
/// point instead of taking a retention slot, so a point written before them survives
/// any number of them and opens byte for byte — under any epoch of its run.
#[test]
fn empty_epochs_do_not_consume_points() {
    let mut rng = Rng::new(common::test_seed("empty_epochs"));
    let t = OneDisk::start("retention_points = 3", &mut rng);
    assert_eq!(t.sync(), 1);
    let at_1 = file_hash(&t.source);
    mutate(&t.source, &mut rng);
    assert_eq!(t.sync(), 2);
    let written = file_hash(&t.source);
    let before = t.kept_logs();
    for epoch in 3..=32 {
        assert_eq!(t.sync(), epoch);
    }
    assert_eq!(t.kept_logs(), before, "an empty epoch kept a log");
    let points = t.points();
    assert_eq!(points[0]["id"], 32, "{points:?}");
    assert_eq!(points[0]["first_epoch"], 2, "{points:?}");
    assert_eq!(points[0]["last_epoch"], 32, "{points:?}");
    assert!(
        points.iter().any(|p| p["id"] == 1),
        "point 1 merged away: {points:?}"
    );
    assert_eq!(t.open(2), written);
    assert_eq!(t.open(17), written);

    // A changed epoch ends the run: the latest (32) becomes an older point covering
    // epochs 2 to 32.
    mutate(&t.source, &mut rng);
    assert_eq!(t.sync(), 33);
    let now = file_hash(&t.source);
    let points = t.points();
    let run = points
        .iter()
        .find(|p| p["id"] == 32)
        .expect("point 32 listed");
    assert_eq!(run["first_epoch"], 2, "{points:?}");
    assert_eq!(run["last_epoch"], 32, "{points:?}");
    assert_eq!(t.open(32), written, "point 32 after the run ended");
    assert_eq!(t.open(2), written, "point 32 opened as epoch 2");
    assert_eq!(t.open(33), now);
    let human = ferry(&["points", "--config", &t.tcfg]);
    assert!(human.stdout.contains(" 2-32 "), "{}", human.stdout);

    // An unplanned failover takes the replica back in place, through the run, to
    // exactly what each point names.
    let mut t = t;
    t.target.kill();
    let replica = t.dir.path().join("vm.replica");
    for (point, expected) in [(32u64, written), (1, at_1)] {
        let run = ferry(&[
            "failover",
            "unplanned",
            "--config",
            &t.tcfg,
            "--point",
            &point.to_string(),
        ]);
        assert!(run.success(), "point {point}: {run:?}");
        assert_eq!(file_hash(&replica), expected, "replica at point {point}");
    }
}

/// `keep = "1h:1"`: one point per hour, the oldest in it. Every newer point of the hour
/// is merged away as it is superseded — its log folded into the next newer one — and
/// the point that stays still opens exactly as the source was.
#[test]
fn a_keep_grid_merges_points_away_and_the_rest_open_exactly() {
    let mut rng = Rng::new(common::test_seed("keep_grid"));
    let t = OneDisk::start("keep = \"1h:1\"", &mut rng);
    let mut at = vec![0u128];
    for epoch in 1..=8u64 {
        if epoch > 1 {
            mutate(&t.source, &mut rng);
        }
        assert_eq!(t.sync(), epoch);
        at.push(file_hash(&t.source));
    }
    assert_eq!(
        t.ids(),
        vec![8, 1],
        "one point in the hour besides the latest"
    );
    assert_eq!(t.kept_logs(), 1, "the merged logs were deleted");
    assert_eq!(t.open(1), at[1]);
    assert_eq!(t.open(8), at[8]);

    // A short grid: points older than it go, the newest stays.
    let mut t = t;
    let cfg = std::fs::read_to_string(&t.tcfg).unwrap();
    assert!(cfg.contains("keep = \"1h:1\""), "{cfg}");
    std::fs::write(&t.tcfg, cfg.replace("keep = \"1h:1\"", "keep = \"2s:1\"")).unwrap();
    let port = t.target.port;
    t.target.kill();
    t.target = TargetProc::spawn(Path::new(&t.tcfg), port).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    mutate(&t.source, &mut rng);
    assert_eq!(t.sync(), 9);
    at.push(file_hash(&t.source));
    assert_eq!(t.ids(), vec![9, 8], "point 1 is off the grid now");
    assert_eq!(t.open(8), at[8]);
    assert_eq!(t.open(9), at[9]);
}

/// A grid of one-second slots keeps a point per second while epochs run for longer
/// than the grid's first slot: a merged log is aged by the oldest epoch it replaces,
/// so new points keep coming (ages from the newest part kept one point for ever).
#[test]
fn a_keep_grid_keeps_taking_new_points_after_merges() {
    let mut rng = Rng::new(common::test_seed("keep_grid_ongoing"));
    let t = OneDisk::start("keep = \"2s:3\"", &mut rng);
    let mut at = vec![0u128];
    for epoch in 1..=24u64 {
        if epoch > 1 {
            mutate(&t.source, &mut rng);
        }
        assert_eq!(t.sync(), epoch);
        at.push(file_hash(&t.source));
        std::thread::sleep(Duration::from_millis(150));
    }
    let ids = t.ids();
    // The latest, and points of the last seconds: the newest of them from the last
    // few epochs, not epoch 1 held for ever.
    assert!(ids.len() >= 3, "{ids:?}");
    assert!(ids[1] >= 16, "a recent point is kept: {ids:?}");
    for &id in &ids {
        assert_eq!(t.open(id), at[id as usize], "point {id}");
    }
}

/// Retention by count (`retention_points = 1`) keeps a tagged point however many epochs
/// follow — the points between are merged away around it — and it opens exactly; the
/// tag survives a restart; untagged, the point goes. An id that is no point is refused.
#[test]
fn a_tagged_point_survives_retention_until_untagged() {
    let mut rng = Rng::new(common::test_seed("tagged_point"));
    let t = OneDisk::start("retention_points = 1", &mut rng);
    let mut at = vec![0u128];
    for epoch in 1..=3u64 {
        if epoch > 1 {
            mutate(&t.source, &mut rng);
        }
        assert_eq!(t.sync(), epoch);
        at.push(file_hash(&t.source));
    }
    let bad = ferry(&["points", "tag", "--config", &t.tcfg, "99", "gold"]);
    assert!(!bad.success());
    assert!(
        bad.stderr.contains("no recovery point 99"),
        "{}",
        bad.stderr
    );
    let tag = ferry(&["points", "tag", "--config", &t.tcfg, "2", "gold"]);
    assert!(tag.success(), "{tag:?}");
    for epoch in 4..=7u64 {
        mutate(&t.source, &mut rng);
        assert_eq!(t.sync(), epoch);
        at.push(file_hash(&t.source));
    }
    let points = t.points();
    let ids: Vec<u64> = points.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![7, 6, 2], "{points:?}");
    assert_eq!(points[2]["tag"], "gold");
    let human = ferry(&["points", "--config", &t.tcfg]);
    assert!(human.stdout.contains("tag gold"), "{}", human.stdout);
    for p in ids {
        assert_eq!(t.open(p), at[p as usize], "point {p}");
    }
    // The tag survives a restart of the target.
    let mut t = t;
    let port = t.target.port;
    t.target.kill();
    t.target = TargetProc::spawn(Path::new(&t.tcfg), port).unwrap();
    assert!(t.points().iter().any(|p| p["tag"] == "gold"));
    let untag = ferry(&["points", "untag", "--config", &t.tcfg, "gold"]);
    assert!(untag.success(), "{untag:?}");
    mutate(&t.source, &mut rng);
    assert_eq!(t.sync(), 8);
    assert_eq!(t.ids(), vec![8, 7]);
}

/// `ferry points` for a person: local times, ages and sizes, and a warning while an
/// epoch is half-applied (a target killed in the middle of one).
#[test]
fn points_show_age_size_and_a_half_applied_epoch() {
    let mut rng = Rng::new(common::test_seed("points_human"));
    let mut t = OneDisk::start("", &mut rng);
    t.sync();
    mutate(&t.source, &mut rng);
    t.sync();
    let human = ferry(&["points", "--config", &t.tcfg]);
    assert!(human.success(), "{human:?}");
    for word in ["age", "size", "acknowledged (local time)", "(latest)"] {
        assert!(
            human.stdout.contains(word),
            "{word:?} missing:\n{}",
            human.stdout
        );
    }
    // Sizes in binary units: point 1 keeps the bytes epoch 2 overwrote.
    assert!(
        human.stdout.contains(" KiB ") || human.stdout.contains(" MiB "),
        "{}",
        human.stdout
    );
    // Ages read like "3s" or "1m 02s".
    let row = human.stdout.lines().nth(1).unwrap();
    assert!(
        row.split_whitespace()
            .any(|w| w.ends_with('s') && w[..w.len() - 1].parse::<u64>().is_ok()),
        "no age in {row:?}"
    );
    assert!(!human.stdout.contains("half-applied"), "{}", human.stdout);
    let list = ferry(&["points", "list", "--config", &t.tcfg]);
    assert_eq!(list.stdout, human.stdout);

    // A target that dies at its commit point leaves the epoch half-applied.
    let (config, port) = (Path::new(&t.tcfg).to_path_buf(), t.target.port);
    t.target.kill();
    t.target = TargetProc::spawn_env(
        &config,
        port,
        &[("FERRY_FAILPOINTS", "target.commit.crash")],
    )
    .unwrap();
    mutate(&t.source, &mut rng);
    assert!(!common::sync(&t.source_cfg, &[]).success());
    t.target.kill();
    let human = ferry(&["points", "--config", &t.tcfg]);
    assert!(human.success(), "{human:?}");
    assert!(
        human.stdout.contains("warning: an epoch is half-applied"),
        "{}",
        human.stdout
    );
    let json = ferry(&["points", "--config", &t.tcfg, "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(v["half_applied"].as_array().unwrap().len(), 1, "{v}");
    // The restarted target settles it.
    t.target = TargetProc::spawn(&config, port).unwrap();
    let human = ferry(&["points", "--config", &t.tcfg]);
    assert!(!human.stdout.contains("half-applied"), "{}", human.stdout);
}

impl OneDisk {
    /// Restarts the target, with `env` (e.g. a failpoint).
    fn restart(&mut self, env: &[(&str, &str)]) {
        let port = self.target.port;
        self.target.kill();
        self.target = TargetProc::spawn_env(Path::new(&self.tcfg), port, env).unwrap();
    }

    /// `ferry points` says nothing is half-applied.
    fn assert_settled(&self) {
        let human = ferry(&["points", "--config", &self.tcfg]);
        assert!(human.success(), "{human:?}");
        assert!(!human.stdout.contains("half-applied"), "{}", human.stdout);
    }
}

/// A target that dies after extending the newest point to an empty epoch, before the
/// empty log is gone: started again, it finishes that commit, and the point opens as
/// before.
#[test]
fn a_crash_while_an_empty_epoch_extends_a_point_is_finished_at_start() {
    let mut rng = Rng::new(common::test_seed("extend_crash"));
    let mut t = OneDisk::start("", &mut rng);
    assert_eq!(t.sync(), 1);
    mutate(&t.source, &mut rng);
    assert_eq!(t.sync(), 2);
    let written = file_hash(&t.source);
    let logs = t.kept_logs();
    t.restart(&[("FERRY_FAILPOINTS", "target.commit.extend.crash")]);
    assert!(!common::sync(&t.source_cfg, &[]).success());
    t.restart(&[]);
    t.assert_settled();
    let points = t.points();
    assert_eq!(points[0]["first_epoch"], 2, "{points:?}");
    assert_eq!(points[0]["last_epoch"], 3, "{points:?}");
    assert_eq!(t.kept_logs(), logs, "the empty log was kept");
    for _ in 0..3 {
        t.sync();
    }
    mutate(&t.source, &mut rng);
    let latest = t.sync();
    assert_eq!(t.open(2), written);
    assert_eq!(t.open(latest - 1), written);
    assert_eq!(t.open(latest), file_hash(&t.source));
}

/// A target that dies in the middle of merging points away (the merged log whole, the
/// logs it replaces still there): started again, the replaced logs are out of service
/// and then deleted, and every point opens exactly.
#[test]
fn a_crash_in_the_middle_of_a_merge_leaves_every_point_exact() {
    let mut rng = Rng::new(common::test_seed("merge_crash"));
    let mut t = OneDisk::start("keep = \"1h:1\"", &mut rng);
    let mut at = vec![0u128];
    for epoch in 1..=3u64 {
        if epoch > 1 {
            mutate(&t.source, &mut rng);
        }
        assert_eq!(t.sync(), epoch);
        at.push(file_hash(&t.source));
    }
    t.restart(&[("FERRY_FAILPOINTS", "points.merge.crash")]);
    mutate(&t.source, &mut rng);
    // The epoch commits, then the target dies merging: no acknowledgement.
    assert!(!common::sync(&t.source_cfg, &[]).success());
    let committed = file_hash(&t.source);
    t.restart(&[]);
    t.assert_settled();
    let ids = t.ids();
    assert_eq!(ids.len(), 2, "the latest and point 1: {ids:?}");
    assert_eq!(ids[1], 1);
    assert_eq!(t.open(1), at[1]);
    assert_eq!(t.open(ids[0]), committed);
    mutate(&t.source, &mut rng);
    let latest = t.sync();
    assert_eq!(t.ids(), vec![latest, 1]);
    assert_eq!(t.kept_logs(), 1, "the replaced logs were deleted");
    assert_eq!(t.open(1), at[1]);
    assert_eq!(t.open(latest), file_hash(&t.source));
}
