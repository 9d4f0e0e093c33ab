//! Invariant 2: the replica is always crash-consistent. A real `ferry target` — or, in
//! a third of the cycles, the real `ferry sync` source engine — is killed with SIGKILL
//! at random moments while a new epoch is applied to a two-disk consistency group;
//! afterwards each replica must hash to the same acknowledged epoch as its partner —
//! the previous one, or the new one if the sync was acknowledged — never a mix. Short by default; `FERRY_SOAK=1` runs
//! many more cycles.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common;
use crate::common::{file_hash, Rng, TargetProc};

const DISK_BYTES: u64 = 48 << 20;
const BLOCK: u64 = 64 << 10;

/// Rewrites about a third of the blocks of `path` with fresh random bytes.
fn mutate(path: &Path, rng: &mut Rng) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..DISK_BYTES / BLOCK {
        if rng.below(3) == 0 {
            rng.fill(&mut buf);
            f.write_all_at(&buf, b * BLOCK).unwrap();
        }
    }
}

#[test]
fn killed_target_leaves_every_replica_at_one_acknowledged_epoch() {
    let seed = common::test_seed("atomic_epochs");
    let mut rng = Rng::new(seed);
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
    let target_disks = [
        ("os", replicas[0].as_path()),
        ("data", replicas[1].as_path()),
    ];
    let mut target = TargetProc::start(d, &key, &target_disks, "");
    let source_cfg = d.join("source.toml");
    let source_disks = [("os", sources[0].as_path()), ("data", sources[1].as_path())];
    std::fs::write(
        &source_cfg,
        common::source_toml(
            target.port,
            &key,
            &d.join("source-state"),
            &source_disks,
            "compression = \"none\"",
        ),
    )
    .unwrap();
    common::sync_ok(&source_cfg, &[]);
    let mut acked: Vec<u128> = sources.iter().map(|s| file_hash(s)).collect();
    assert_eq!(
        acked,
        replicas.iter().map(|r| file_hash(r)).collect::<Vec<_>>()
    );

    let cycles = if common::soak() { 40 } else { 5 };
    let (mut rolled_back, mut completed) = (0, 0);
    for cycle in 0..cycles {
        for s in &sources {
            mutate(s, &mut rng);
        }
        let new: Vec<u128> = sources.iter().map(|s| file_hash(s)).collect();
        let mut sync = Command::new(common::ferry_bin())
            .args(["sync", "--config"])
            .arg(&source_cfg)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        let kill_source = rng.below(3) == 0;
        let status = if kill_source {
            // SIGKILL the source engine instead: the target must notice the dead
            // connection and roll the half-applied epoch back by itself, while it
            // keeps running.
            let _ = sync.kill();
            let status = sync.wait().unwrap();
            // The session ends when the socket closes; rollback runs before the disks
            // are released, so a sync that gets in afterwards sees the old epoch.
            std::thread::sleep(Duration::from_millis(200));
            target.assert_alive();
            status
        } else {
            let port = target.port;
            let config = target.config.clone();
            drop(target); // SIGKILL
            let status = sync.wait().unwrap();
            target = TargetProc::spawn(&config, port).expect("target restarts after a kill");
            status
        };
        let now: Vec<u128> = replicas.iter().map(|r| file_hash(r)).collect();
        if status.success() {
            assert_eq!(
                now, new,
                "cycle {cycle}: the sync was acknowledged, the replicas must hold it"
            );
        }
        if now == new {
            completed += 1;
        } else {
            assert_eq!(
                now, acked,
                "cycle {cycle} (seed {seed}): a replica is between epochs after a kill"
            );
            rolled_back += 1;
        }
        // Catch up, so the next cycle starts from an acknowledged epoch equal to the source.
        common::sync_ok(&source_cfg, &[]);
        acked = sources.iter().map(|s| file_hash(s)).collect();
        assert_eq!(
            acked,
            replicas.iter().map(|r| file_hash(r)).collect::<Vec<_>>()
        );
    }
    eprintln!("{cycles} kills: {rolled_back} rolled back, {completed} completed");
}
