//! Limits of one session that must never refuse a legitimate source: a seeded compare
//! whose difference list is as long as a disk can make it.

mod common;

use common::*;

/// A seeded sync where every other 4 KiB block of a 32 MiB disk differs: 4,096
/// separate runs, the most a disk of 8,192 blocks can have, which the target sends as
/// one full DiffRuns frame. The source must take it, ship exactly those blocks, and
/// leave the replica equal to the source.
#[test]
fn seeded_sync_takes_a_difference_in_every_other_block() {
    const SIZE: u64 = 32 << 20;
    const BS: u64 = 4096;
    let seed = test_seed("seeded_every_other_block");
    let mut rng = Rng::new(seed);
    let dir = scratch_dir();
    let disk = PairDisk::new(dir.path(), "d1");
    let mut content = vec![0u8; SIZE as usize];
    rng.fill(&mut content);
    std::fs::write(&disk.replica, &content).unwrap();
    std::fs::write(&disk.source, &content).unwrap();
    let source = open_rw(&disk.source);
    for block in (0..SIZE / BS).step_by(2) {
        flip_range(&source, block * BS, BS as usize, &mut rng);
    }
    drop(source);
    let pair = Pair::start(dir, vec![disk], "block_size_kib = 4\n", "");
    let report = pair.sync_ok(&["--mode", "seeded"]);
    assert_eq!(mode_of(&report, "d1"), "seeded", "{report}");
    assert_eq!(
        u64_field(&report, "blocks_sent"),
        SIZE / BS / 2,
        "exactly the differing blocks travel: {report}"
    );
    pair.assert_replicas_identical();
}
