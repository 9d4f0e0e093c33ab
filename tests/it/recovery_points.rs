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
