//! A full disk on the target: the sync fails with a clear error and no acknowledgement,
//! the replica stays at its last acknowledged epoch, nothing is lost at the source, and
//! the next sync succeeds once space returns. Needs root to mount a small tmpfs; skips
//! with a message otherwise.

use std::os::unix::fs::FileExt;
use std::process::Command;

use crate::common;
use crate::common::{file_hash, Rng, TargetProc};

const DISK_BYTES: u64 = 16 << 20;

struct Mount(std::path::PathBuf);

impl Mount {
    /// A tmpfs mounted with `options` (e.g. `size=22m`) on the new directory `dir`, or
    /// `None` after a SKIP where mounting needs root we do not have (a failure instead
    /// under `FERRY_REQUIRE=root`).
    fn tmpfs(dir: &std::path::Path, options: &str) -> Option<Mount> {
        std::fs::create_dir(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !mounted {
            ferry_io::require::skip(
                ferry_io::require::Feature::Root,
                "cannot mount a small tmpfs here (needs root)",
            );
            return None;
        }
        Some(Mount(dir.to_path_buf()))
    }

    /// Remounts with new `options` (e.g. `size=80m`).
    fn remount(&self, options: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success(), "remount {options}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn enospc_is_reported_and_replication_resumes_when_space_returns() {
    // Held to the end: no other test of this binary mounts meanwhile (see the lock).
    let _mounts = common::exclusive_mounts();
    let dir = common::scratch_dir();
    let d = dir.path();
    let small = d.join("small");
    let Some(mount) = Mount::tmpfs(&small, "size=22m") else {
        return;
    };
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
    mount.remount("size=80m");
    common::sync_ok(&cfg, &[]);
    assert_eq!(file_hash(&replica), file_hash(&source));
}

/// Inodes in use on the file system holding `path`.
fn inodes_used(path: &std::path::Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%c %d"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    let (total, free) = (it.next().unwrap(), it.next().unwrap());
    total - free
}

/// The reproduction, with a real ENOSPC: the target's state dir on a tmpfs with
/// room for exactly one more file — the new epoch's undo log — so the commit mark is the
/// first thing that cannot be written. The epoch must be rolled back at once, and after
/// space returns and later epochs commit, a restart must not take their bytes back.
#[test]
fn a_commit_mark_refused_by_a_full_state_dir_never_rolls_back_later_epochs() {
    // Held to the end: no other test of this binary mounts meanwhile (see the lock).
    let _mounts = common::exclusive_mounts();
    let dir = common::scratch_dir();
    let d = dir.path();
    let small = d.join("state");
    let Some(mount) = Mount::tmpfs(&small, "size=64m") else {
        return;
    };
    let mut rng = Rng::new(common::test_seed("commit_mark_enospc"));
    let key = d.join("ferry.key");
    common::keygen(&key);
    let source = d.join("vm.img");
    let replica = d.join("vm.replica");
    let f = std::fs::File::create(&source).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    let mut buf = vec![0u8; DISK_BYTES as usize];
    let mut rewrite = |rng: &mut Rng| {
        // A quarter of the disk, in 64 KiB pieces.
        for b in 0..DISK_BYTES / 65536 {
            if rng.below(4) == 0 {
                rng.fill(&mut buf[..65536]);
                f.write_all_at(&buf[..65536], b * 65536).unwrap();
            }
        }
    };
    rewrite(&mut rng);
    let mut target = TargetProc::start(&small, &key, &[("vm", replica.as_path())], "");
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
    common::sync_ok(&cfg, &[]);
    rewrite(&mut rng);
    common::sync_ok(&cfg, &[]);
    let at_2 = file_hash(&replica);

    // Room for one more inode: the next undo log. Its commit mark finds none.
    let limit = inodes_used(&small) + 1;
    mount.remount(&format!("nr_inodes={limit}"));
    rewrite(&mut rng);
    let run = common::sync(&cfg, &[]);
    assert!(!run.success(), "an epoch without its commit mark: {run:?}");
    assert!(
        run.stderr.contains("commit mark") && run.stderr.contains("No space left"),
        "{run:?}"
    );
    assert_eq!(
        file_hash(&replica),
        at_2,
        "the epoch was rolled back at once"
    );

    mount.remount("nr_inodes=100000");
    for _ in 0..2 {
        rewrite(&mut rng);
        common::sync_ok(&cfg, &[]);
    }
    let now = file_hash(&source);
    assert_eq!(file_hash(&replica), now);
    target.kill();
    let target = TargetProc::spawn(&target.config.clone(), target.port).unwrap();
    assert_eq!(
        file_hash(&replica),
        now,
        "a restart took committed bytes back: {}",
        target.stderr()
    );
}
