//! A full disk on the target: the sync fails with a clear error and no acknowledgement,
//! the replica stays at its last acknowledged epoch, nothing is lost at the source, and
//! the next sync succeeds once space returns. Needs root to mount a small tmpfs; skips
//! with a message otherwise.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{file_hash, Rng, TargetProc};

const DISK_BYTES: u64 = 16 << 20;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn enospc_is_reported_and_replication_resumes_when_space_returns() {
    let dir = common::scratch_dir();
    let d = dir.path();
    let small = d.join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=22m", "tmpfs"])
        .arg(&small)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        filter_driver_shim::require::skip(
            filter_driver_shim::require::Feature::Root,
            "cannot mount a small tmpfs here (needs root)",
        );
        return;
    }
    let _mount = Mount(small.clone());
    let mut rng = Rng::new(common::test_seed("disk_full"));
    let key = d.join("ferry.key");
    common::keygen(&key);
    let source = d.join("vm.img");
    let replica = small.join("vm.replica");
    let f = std::fs::File::create(&source).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    let mut buf = vec![0u8; DISK_BYTES as usize];
    rng.fill(&mut buf);
    f.write_all_at(&buf, 0).unwrap();

    let target_dir = small.join("t");
    std::fs::create_dir(&target_dir).unwrap();
    let target = TargetProc::start(&target_dir, &key, &[("vm", replica.as_path())], "");
    let cfg = d.join("source.toml");
    std::fs::write(
        &cfg,
        common::source_toml(
            target.port,
            &key,
            &d.join("source-state"),
            &[("vm", source.as_path())],
            "compression = \"none\"",
        ),
    )
    .unwrap();
    common::sync_ok(&cfg, &[]);
    let epoch1 = file_hash(&replica);
    assert_eq!(epoch1, file_hash(&source));

    // Rewrite everything: the undo log needs another 16 MiB, which the disk lacks.
    rng.fill(&mut buf);
    f.write_all_at(&buf, 0).unwrap();
    let run = common::sync(&cfg, &[]);
    assert!(
        !run.success(),
        "a sync that could not be made durable was reported as done"
    );
    let all = format!("{}{}", run.stderr, run.stdout);
    assert!(
        all.contains("No space left") || all.contains("ENOSPC"),
        "the error should name the full disk: {all}"
    );
    assert_eq!(
        file_hash(&replica),
        epoch1,
        "the replica left its acknowledged epoch"
    );

    // Space returns: the next sync succeeds and nothing was lost.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=80m"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(grown.success());
    common::sync_ok(&cfg, &[]);
    assert_eq!(file_hash(&replica), file_hash(&source));
}
