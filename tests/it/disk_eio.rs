//! EIO on the target's replica: a replica whose writes fail on demand (nbdkit's error
//! filter under nbdfuse, a real file the target opens like any other). A sync that
//! meets the errors fails with a clear error and is not acknowledged; the rollback of
//! the abandoned epoch fails too while the device keeps failing, so the disk stays out
//! of service (no session may write or read a replica between epochs); once the
//! device heals, the next sync finishes the rollback, replicates, and the replica
//! equals the source.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{file_hash, keygen, scratch_dir, source_toml, sync, sync_ok, test_seed, Rng};

const DISK_BYTES: u64 = 8 << 20;

/// An nbdfuse mount of an nbdkit `file` export with the error filter: writes fail
/// with EIO while `trigger` exists.
struct FailingDisk {
    mnt: PathBuf,
    child: Child,
}

impl FailingDisk {
    fn start(dir: &Path, backing: &Path, trigger: &Path) -> FailingDisk {
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let child = Command::new("nbdfuse")
            .arg(mnt.join("disk"))
            .args(["--command", "nbdkit", "-s", "--filter=error", "file"])
            .arg(backing)
            .args(["error=EIO", "error-pwrite-rate=1"])
            .arg(format!("error-pwrite-file={}", trigger.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "nbdfuse (libnbd-bin) and nbdkit must be installed: tools/test.sh installs them",
            );
        let disk = mnt.join("disk");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) != DISK_BYTES {
            assert!(Instant::now() < deadline, "nbdfuse did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        FailingDisk { mnt, child }
    }

    fn path(&self) -> PathBuf {
        self.mnt.join("disk")
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state_epoch(state: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("os.state")).unwrap()).unwrap();
    v["epoch"].as_u64().unwrap()
}

#[test]
fn eio_on_the_replica_is_reported_never_acknowledged_and_healed_by_the_next_sync() {
    // Held to the end: no other test of this binary mounts meanwhile (see the lock).
    let _mounts = common::exclusive_mounts();
    let mut rng = Rng::new(test_seed("disk_eio"));
    let dir = scratch_dir();
    let d = dir.path();
    let key = d.join("ferry.key");
    keygen(&key);
    let source = d.join("os.img");
    let mut content = vec![0u8; DISK_BYTES as usize];
    rng.fill(&mut content);
    std::fs::write(&source, &content).unwrap();
    let backing = d.join("replica-backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let trigger = d.join("fail-writes");
    let failing = FailingDisk::start(d, &backing, &trigger);
    let target = common::TargetProc::start(d, &key, &[("os", failing.path().as_path())], "");
    let state = d.join("source-state");
    let cfg = d.join("source.toml");
    std::fs::write(
        &cfg,
        source_toml(target.port, &key, &state, &[("os", source.as_path())], ""),
    )
    .unwrap();

    sync_ok(&cfg, &[]);
    assert_eq!(file_hash(&source), file_hash(&failing.path()));

    // Change a tenth of the blocks, then make the device fail every write.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&source)
        .unwrap();
    let mut block = vec![0u8; 64 << 10];
    for b in 0..DISK_BYTES / (64 << 10) {
        if rng.below(10) == 0 {
            rng.fill(&mut block);
            f.write_all_at(&block, b * (64 << 10)).unwrap();
        }
    }
    drop(f);
    std::fs::write(&trigger, b"").unwrap();
    let r = sync(&cfg, &[]);
    assert!(
        !r.success(),
        "a sync onto a failing device succeeded: {r:?}"
    );
    assert!(
        r.stderr.contains("EIO") && r.stderr.contains("replica write failed"),
        "the error names EIO: {}",
        r.stderr
    );
    assert_eq!(state_epoch(&state), 1, "nothing was acknowledged");
    // Still failing: the replica is between epochs and stays out of service.
    let r = sync(&cfg, &[]);
    assert!(!r.success());
    assert!(r.stderr.contains("between epochs"), "{}", r.stderr);
    assert_eq!(state_epoch(&state), 1);

    // The device heals: the next sync finishes the rollback and replicates.
    std::fs::remove_file(&trigger).unwrap();
    let r = sync_ok(&cfg, &[]);
    assert_eq!(r["epoch"], 2, "{r}");
    assert_eq!(file_hash(&source), file_hash(&failing.path()));
    // No stale undo log is left behind to be "recovered" over the committed epoch at
    // the next start.
    let mut target = target;
    target.kill();
    let (config, port) = (target.config.clone(), target.port);
    let target = common::TargetProc::spawn(&config, port).unwrap();
    assert_eq!(file_hash(&source), file_hash(&failing.path()));
    drop(target);
}
