//! Library-level end-to-end: a target and a source in one process over loopback TCP,
//! through the real pipelines, checking replica bytes.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::io::EngineKind;
use dataplane::source::{self, JobDisk, ModeRequest, SyncJob};
use dataplane::writer::{Target, TargetDisk, TargetJob};

fn start_target(
    dir: &Path,
    disks: &[(&str, PathBuf)],
    psk: [u8; 32],
    engine: EngineKind,
) -> String {
    let job = TargetJob {
        listen: "127.0.0.1:0".into(),
        psk,
        state_dir: dir.join("target-state"),
        disks: disks
            .iter()
            .map(|(n, p)| TargetDisk {
                name: n.to_string(),
                path: p.clone(),
            })
            .collect(),
        queue_depth: 8,
        engine,
        io_timeout: Duration::from_secs(10),
        max_sessions: 2,
        retention: dataplane::writer::points::Retention {
            points: 4,
            minutes: 0,
            grid: Vec::new(),
        },
        own_source_state: None,
    };
    let target = Target::bind(job).unwrap();
    let addr = target.local_addr().unwrap().to_string();
    std::thread::spawn(move || target.serve());
    addr
}

fn job(
    addr: &str,
    dir: &Path,
    disks: &[(&str, PathBuf)],
    psk: [u8; 32],
    zstd: Option<i32>,
    engine: EngineKind,
) -> SyncJob {
    SyncJob {
        target: addr.to_string(),
        psk,
        state_dir: dir.join("source-state"),
        disks: disks
            .iter()
            .map(|(n, p)| JobDisk {
                name: n.to_string(),
                path: p.clone(),
                bitmap: None,
            })
            .collect(),
        block_size: 64 << 10,
        io_size: 256 << 10,
        queue_depth: 8,
        workers: 2,
        compression: zstd.into(),
        engine,
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        mode: ModeRequest::Auto,
        shim_control: None,
        require_shim: false,
        discard_replica_changes: false,
        promote: false,
        reprotect: None,
        progress: None,
        throttle: None,
    }
}

/// A deterministic image: text-like, random and zero blocks, and a real hole.
fn make_image(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut block = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < size / 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match x % 4 {
            0 => {} // leave zeros unwritten (hole)
            1 => {
                block
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = b"ferry replicates disks "[i % 23]);
                f.write_all_at(&block, off).unwrap();
            }
            _ => {
                let mut y = x;
                for b in block.iter_mut() {
                    y = y
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *b = (y >> 56) as u8;
                }
                f.write_all_at(&block, off).unwrap();
            }
        }
        off += block.len() as u64;
    }
    // Some bytes near the end of the disk too.
    f.write_all_at(b"tail", size - 4).unwrap();
}

fn same(a: &Path, b: &Path) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len(), "sizes differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("replica differs from source at byte {i}");
    }
}

#[test]
fn full_then_seeded_sync_gives_identical_replicas() {
    for (zstd, engine) in [(None, EngineKind::Auto), (Some(1), EngineKind::Sync)] {
        let dir = tempfile::tempdir().unwrap();
        let psk = [42u8; 32];
        let src = dir.path().join("a.img");
        let src2 = dir.path().join("b.img");
        make_image(&src, 32 << 20, 7);
        make_image(&src2, (8 << 20) + 4096, 9);
        let rep = dir.path().join("a.replica");
        let rep2 = dir.path().join("b.replica");
        let addr = start_target(
            dir.path(),
            &[("a", rep.clone()), ("b", rep2.clone())],
            psk,
            engine,
        );
        let j = job(
            &addr,
            dir.path(),
            &[("a", src.clone()), ("b", src2.clone())],
            psk,
            zstd,
            engine,
        );
        let r = source::sync(&j).unwrap();
        assert!(r.disks.iter().all(|d| d.mode == "full"), "{r:?}");
        same(&src, &rep);
        same(&src2, &rep2);

        // Change a few blocks, zero one, re-sync: seeded, few bytes travel.
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&[0xAB; 70_000], 5 << 20).unwrap();
        f.write_all_at(&vec![0u8; 64 << 10], 0).unwrap();
        let r = source::sync(&j).unwrap();
        assert!(r.disks.iter().all(|d| d.mode == "seeded"), "{r:?}");
        assert!(r.blocks_sent <= 3, "{r:?}");
        same(&src, &rep);
        same(&src2, &rep2);
    }
}

/// Small blocks, the largest batches and compression: frames mix packed compressed and
/// raw payloads and must stay within the batch the session announced.
#[test]
fn small_blocks_large_batches_compressed_stay_within_the_announced_frame() {
    let dir = tempfile::tempdir().unwrap();
    let psk = [9u8; 32];
    let src = dir.path().join("a.img");
    make_image(&src, 24 << 20, 3);
    let rep = dir.path().join("a.replica");
    let addr = start_target(dir.path(), &[("a", rep.clone())], psk, EngineKind::Auto);
    let mut j = job(
        &addr,
        dir.path(),
        &[("a", src.clone())],
        psk,
        Some(1),
        EngineKind::Auto,
    );
    j.block_size = 4096;
    j.io_size = 4 << 20;
    source::sync(&j).unwrap();
    same(&src, &rep);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&[0x5A; 300_000], 7 << 20).unwrap();
    let r = source::sync(&j).unwrap();
    assert_eq!(r.disks[0].mode, "seeded");
    same(&src, &rep);
}
