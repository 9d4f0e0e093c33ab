//! End to end between real processes over real TCP: `ferry keygen`, `ferry target`,
//! `ferry sync --json`. Every test compares the replicas' bytes with the sources'.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::*;

/// Peak memory either process may use for any disk in these tests: buffers are fixed
/// (queue depth × I/O size, a few frames in flight) and bitmaps are 1 bit per block,
/// so this does not depend on the disk's size.
const MEMORY_BOUND_KIB: u64 = 256 << 10;

/// The start of most tests here: the test's generator with its seed printed, a scratch
/// directory, and the named disks of a source/target [`Pair`] in it (no images yet).
fn setup<const N: usize>(test: &str, names: [&str; N]) -> (Rng, tempfile::TempDir, [PairDisk; N]) {
    let rng = Rng::new(test_seed(test));
    let dir = scratch_dir();
    let disks = names.map(|name| PairDisk::new(dir.path(), name));
    (rng, dir, disks)
}

/// Flips every byte of each `(offset, len)` range of the image at `path`.
fn flip(path: &Path, ranges: &[(u64, usize)], rng: &mut Rng) {
    let f = open_rw(path);
    for &(offset, len) in ranges {
        flip_range(&f, offset, len, rng);
    }
}

/// Writes `<disk>.cbt` into the pair's directory: a bitmap of `blocks` with the
/// generation and epoch of the source's state file for `disk`. Returns the `--bitmap`
/// argument for it and that epoch.
fn bitmap_on_state(
    pair: &Pair,
    disk: &str,
    size: u64,
    blocks: impl IntoIterator<Item = u64>,
) -> (String, u64) {
    let (generation, epoch) = read_source_state(&pair.source_state, disk);
    let bitmap = pair.path().join(format!("{disk}.cbt"));
    write_bitmap(&bitmap, size, BLOCK as u32, generation, epoch, blocks);
    (format!("{disk}={}", bitmap.display()), epoch)
}

/// Full sync of two disks — one mixed image with data, text, written zeros and holes,
/// one whose size is not a multiple of the block (nor of 512 bytes) — into replicas the
/// target creates; then an unchanged re-sync moves no data.
#[test]
fn full_sync_of_two_disks_is_byte_identical() {
    let (mut rng, dir, [a, b]) = setup(
        "full_sync_of_two_disks_is_byte_identical",
        ["vm1-os", "vm1-data"],
    );
    let size_a = 24 << 20;
    let size_b = (5 << 20) + 12_345;
    make_mixed_image(&a.source, size_a, &mut rng);
    make_mixed_image(&b.source, size_b, &mut rng);
    // The first half of disk a is one big hole, so holes must not be read.
    let f = open_rw(&a.source);
    punch_hole(&f, 0, 12 << 20);
    let mut data = vec![0u8; 8 << 20];
    rng.fill(&mut data);
    f.write_all_at(&data, 12 << 20).unwrap();
    drop(f);

    let pair = Pair::start(dir, vec![a.clone(), b.clone()], "", "");
    assert!(!a.replica.exists() && !b.replica.exists());
    let report = pair.sync_ok(&[]);
    pair.assert_replicas_identical();

    // The report.
    assert_eq!(
        u64_field(&report, "bytes_logical"),
        size_a + size_b,
        "{report}"
    );
    let data_blocks = nonzero_blocks(&a.source, BLOCK) + nonzero_blocks(&b.source, BLOCK);
    assert_eq!(
        u64_field(&report, "blocks_sent"),
        data_blocks,
        "a full sync sends exactly the blocks holding data (zero blocks and holes travel as zero ranges): {report}"
    );
    let bytes_sent = u64_field(&report, "bytes_sent");
    assert!(
        bytes_sent > 8 << 20,
        "8 MiB of random data cannot travel in {bytes_sent} bytes: {report}"
    );
    assert!(bytes_sent < size_a + size_b, "holes were sent: {report}");
    if let Some(read) = report["bytes_read"].as_u64() {
        assert!(
            read <= size_a + size_b - (12 << 20),
            "the 12 MiB hole was read: {report}"
        );
    }
    let seconds = report["seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no seconds in {report}"));
    assert!(seconds.is_finite() && seconds > 0.0, "{report}");
    for d in [&a, &b] {
        assert_eq!(mode_of(&report, &d.name), "full", "{report}");
    }
    let disks = report["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{report}");

    // Nothing changed: the second sync compares hashes and moves no block.
    let again = pair.sync_ok(&[]);
    for d in [&a, &b] {
        assert_eq!(mode_of(&again, &d.name), "seeded", "{again}");
    }
    assert_eq!(u64_field(&again, "blocks_sent"), 0, "{again}");
    pair.assert_replicas_identical();
}

/// 1 GiB image: full sync, change 1% of the 64 KiB blocks, re-sync. Only the changed
/// blocks travel (seeded compare), well under 5% of the image.
#[test]
fn seeded_resync_of_1gib_sends_only_changed_blocks() {
    let (mut rng, dir, [d]) = setup("seeded_resync_of_1gib_sends_only_changed_blocks", ["big"]);
    let size: u64 = 1 << 30;
    {
        // Three quarters data (random and text), one quarter holes, in 4 MiB runs.
        let f = create_sparse(&d.source, size);
        let mut chunk = vec![0u8; 4 << 20];
        for (i, off) in (0..size).step_by(chunk.len()).enumerate() {
            match i % 4 {
                0 | 1 => {
                    rng.fill(&mut chunk);
                    f.write_all_at(&chunk, off).unwrap();
                }
                2 => {
                    fill_text(&mut chunk, i as u64);
                    f.write_all_at(&chunk, off).unwrap();
                }
                _ => {}
            }
        }
    }
    let pair = Pair::start(dir, vec![d.clone()], "compression = \"none\"\n", "");
    let full = pair.sync_ok(&[]);
    assert_eq!(mode_of(&full, "big"), "full", "{full}");
    assert_same_file(&d.source, &d.replica);

    // Change 1% of the blocks: some a single byte, some whole, some in holes.
    let blocks = size / BLOCK;
    let changed_count = blocks / 100;
    let mut changed = std::collections::BTreeSet::new();
    while (changed.len() as u64) < changed_count {
        changed.insert(rng.below(blocks));
    }
    let f = open_rw(&d.source);
    for &b in &changed {
        let at = rng.below(BLOCK);
        let len = 1 + rng.below(BLOCK - at);
        flip_range(&f, b * BLOCK + at, len as usize, &mut rng);
    }
    drop(f);

    let seeded = pair.sync_ok(&[]);
    assert_eq!(mode_of(&seeded, "big"), "seeded", "{seeded}");
    assert_eq!(
        u64_field(&seeded, "blocks_sent"),
        changed_count,
        "exactly the changed blocks must travel: {seeded}"
    );
    let sent = u64_field(&seeded, "bytes_sent");
    assert!(
        sent < size / 20,
        "re-sync after changing 1% of the blocks sent {sent} bytes, more than 5% of {size}: {seeded}"
    );
    assert!(sent >= changed_count * 16, "{seeded}");
    assert_same_file(&d.source, &d.replica);
}

/// Changed-block sync: after a sync, modify blocks (including the partial last block
/// and a block that becomes all zeros), describe exactly those in a bitmap whose
/// generation/epoch come from the source's state file, sync with `--bitmap`.
#[test]
fn changed_block_sync_sends_exactly_the_bitmap() {
    let (mut rng, dir, [d]) = setup("changed_block_sync_sends_exactly_the_bitmap", ["cbt"]);
    let size = (32 << 20) + 3000;
    make_mixed_image(&d.source, size, &mut rng);
    let pair = Pair::start(dir, vec![d.clone()], "", "");
    pair.sync_ok(&[]);
    assert_same_file(&d.source, &d.replica);
    let blocks = size.div_ceil(BLOCK);

    for round in 0..2 {
        // Blocks that get new (non-zero) data, and one data block that becomes zeros.
        let mut dirty = std::collections::BTreeSet::new();
        dirty.insert(blocks - 1);
        while dirty.len() < 20 {
            dirty.insert(rng.below(blocks));
        }
        let f = open_rw(&d.source);
        for &b in &dirty {
            let start = b * BLOCK;
            let len = BLOCK.min(size - start);
            let at = rng.below(len);
            flip_range(&f, start + at, (1 + rng.below(len - at)) as usize, &mut rng);
        }
        let zeroed = (0..blocks)
            .find(|b| {
                !dirty.contains(b) && {
                    let mut buf = vec![0u8; BLOCK as usize];
                    f.read_exact_at(&mut buf, b * BLOCK).unwrap();
                    buf.iter().any(|&x| x != 0)
                }
            })
            .expect("the image has data blocks");
        f.write_all_at(&vec![0u8; BLOCK as usize], zeroed * BLOCK)
            .unwrap();
        drop(f);

        let (spec, epoch) =
            bitmap_on_state(&pair, "cbt", size, dirty.iter().copied().chain([zeroed]));
        let args: Vec<&str> = if round == 0 {
            vec!["--bitmap", &spec]
        } else {
            vec!["--mode", "changed", "--bitmap", &spec]
        };
        let report = pair.sync_ok(&args);
        assert_eq!(mode_of(&report, "cbt"), "changed", "{report}");
        assert_eq!(
            u64_field(&report, "blocks_sent"),
            dirty.len() as u64,
            "round {round}: exactly the changed data blocks travel: {report}"
        );
        if let Some(zeros) = report["zero_blocks_sent"].as_u64() {
            assert_eq!(
                zeros, 1,
                "round {round}: the zeroed block travels as a zero record: {report}"
            );
        }
        assert!(
            u64_field(&report, "bytes_sent") < 2 * 21 * BLOCK + (64 << 10),
            "{report}"
        );
        assert_same_file(&d.source, &d.replica);
        let (_, after) = read_source_state(&pair.source_state, "cbt");
        assert!(
            after > epoch,
            "round {round}: the state file's epoch must advance ({epoch} → {after})"
        );
    }
}

/// A bitmap of the wrong epoch or generation is refused, loudly, and nothing is written.
/// Also when the source's own state was tampered with: then the target refuses.
#[test]
fn changed_block_sync_with_a_stale_bitmap_is_refused() {
    let (mut rng, dir, [d]) = setup("changed_block_sync_with_a_stale_bitmap_is_refused", ["cbt"]);
    let size = 8 << 20;
    make_mixed_image(&d.source, size, &mut rng);
    let mut pair = Pair::start(dir, vec![d.clone()], "", "");
    pair.sync_ok(&[]);
    pair.sync_ok(&[]); // epoch 2
    flip(&d.source, &[(3 * BLOCK + 17, 100)], &mut rng);
    let (generation, epoch) = read_source_state(&pair.source_state, "cbt");
    assert!(epoch >= 2, "epoch {epoch}");
    let before = fingerprint(&d.replica);
    let state_file = pair.source_state.join("cbt.state");
    let state_before = std::fs::read(&state_file).unwrap();

    let mut other = generation;
    other[0] ^= 0xff;
    let cases = [
        ("older epoch", generation, epoch - 1, "epoch"),
        ("newer epoch", generation, epoch + 1, "epoch"),
        ("other generation", other, epoch, "generation"),
    ];
    for (what, gen, ep, word) in cases {
        let bitmap = pair.path().join("stale.cbt");
        write_bitmap(&bitmap, size, BLOCK as u32, gen, ep, [3]);
        let spec = format!("cbt={}", bitmap.display());
        for args in [
            vec!["--bitmap", spec.as_str()],
            vec!["--mode", "changed", "--bitmap", spec.as_str()],
        ] {
            let run = pair.sync(&args);
            assert!(
                !run.success(),
                "{what}: a stale bitmap was accepted: {run:?}"
            );
            let err = run.stderr.to_lowercase();
            assert!(
                err.contains("bitmap") && err.contains(word),
                "{what}: the error should say the bitmap's {word} is wrong: {}",
                run.stderr
            );
            assert_eq!(
                fingerprint(&d.replica),
                before,
                "{what}: the replica was written"
            );
            assert_eq!(
                std::fs::read(&state_file).unwrap(),
                state_before,
                "{what}: the source state changed"
            );
        }
    }

    // The source's state file claims an epoch the replica never held: the source
    // cannot tell, the target must (BaseMismatch).
    let forged = format!(
        "{{\"generation\": \"{}\", \"epoch\": {}}}",
        generation
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        epoch + 7
    );
    std::fs::write(&state_file, forged).unwrap();
    let bitmap = pair.path().join("forged.cbt");
    write_bitmap(&bitmap, size, BLOCK as u32, generation, epoch + 7, [3]);
    let spec = format!("cbt={}", bitmap.display());
    let run = pair.sync(&["--mode", "changed", "--bitmap", &spec]);
    assert!(
        !run.success(),
        "the target accepted a change set on a base it does not hold: {run:?}"
    );
    assert!(
        run.stderr.contains(&format!("{}", epoch + 7))
            && run.stderr.to_lowercase().contains("epoch"),
        "the error should name the epochs: {}",
        run.stderr
    );
    assert_eq!(
        fingerprint(&d.replica),
        before,
        "the replica was written on a base mismatch"
    );
    pair.target.assert_alive();

    // Back to the truth: a seeded sync repairs everything.
    std::fs::write(&state_file, &state_before).unwrap();
    let report = pair.sync_ok(&["--mode", "seeded"]);
    assert_eq!(mode_of(&report, "cbt"), "seeded", "{report}");
    assert_same_file(&d.source, &d.replica);
}

/// A 100 GiB sparse image with a few MiB of data: the full sync (and a seeded re-sync)
/// complete without reading or sending the holes; the replica matches.
#[test]
fn sparse_100gib_image_syncs_quickly_and_matches() {
    let (mut rng, dir, [d]) = setup("sparse_100gib_image_syncs_quickly_and_matches", ["sparse"]);
    let size: u64 = 100 << 30;
    let f = create_sparse(&d.source, size);
    let mut mib = vec![0u8; 1 << 20];
    let offsets = [
        0,
        (37 << 30) + 12_345,
        (64 << 30) - 100,
        (99 << 30) + 7,
        size - (1 << 20),
    ];
    for off in offsets {
        rng.fill(&mut mib);
        f.write_all_at(&mib, off).unwrap();
    }
    drop(f);
    let data: u64 = data_extents(&d.source).iter().map(|e| e.1).sum();
    assert!(
        data < 16 << 20,
        "tmpfs allocated {data} bytes for 5 MiB of data"
    );

    let pair = Pair::start(dir, vec![d.clone()], "", "");
    let run = pair.sync(&[]);
    assert!(run.success(), "{run:?}");
    let full = run.json();
    assert_eq!(mode_of(&full, "sparse"), "full", "{full}");
    assert_eq!(u64_field(&full, "bytes_logical"), size, "{full}");
    // Memory does not grow with the disk: 100 GiB is 1.6 M blocks (a 200 KiB bitmap).
    eprintln!(
        "peak memory: source {} KiB, target {} KiB",
        run.max_rss_kib,
        pair.target.peak_rss_kib()
    );
    assert!(
        run.max_rss_kib < MEMORY_BOUND_KIB,
        "ferry sync peaked at {} KiB for a sparse disk",
        run.max_rss_kib
    );
    assert!(
        pair.target.peak_rss_kib() < MEMORY_BOUND_KIB,
        "ferry target peaked at {} KiB",
        pair.target.peak_rss_kib()
    );
    assert!(
        u64_field(&full, "bytes_sent") < 64 << 20,
        "holes travelled: {full}"
    );
    assert_same_sparse(&d.source, &d.replica, &mut rng);

    flip(
        &d.source,
        &[((50 << 30) + 999, 5000), (12_345 + (37 << 30), 10)],
        &mut rng,
    );
    let run = pair.sync(&[]);
    assert!(run.success(), "{run:?}");
    let seeded = run.json();
    assert_eq!(mode_of(&seeded, "sparse"), "seeded", "{seeded}");
    assert_eq!(u64_field(&seeded, "blocks_sent"), 2, "{seeded}");
    assert_same_sparse(&d.source, &d.replica, &mut rng);
    assert!(
        run.max_rss_kib < MEMORY_BOUND_KIB,
        "seeded ferry sync peaked at {} KiB",
        run.max_rss_kib
    );
    assert!(
        pair.target.peak_rss_kib() < MEMORY_BOUND_KIB,
        "ferry target peaked at {} KiB",
        pair.target.peak_rss_kib()
    );
}

/// Block devices (loop devices over tmpfs files): a full sync onto a device full of
/// garbage gives an identical device, holes included; a replica device smaller than
/// the source is refused with both sizes named and nothing written.
#[test]
fn block_devices_sync_and_a_small_replica_device_is_refused() {
    let (mut rng, dir, []) = setup(
        "block_devices_sync_and_a_small_replica_device_is_refused",
        [],
    );
    let src_file = dir.path().join("src.backing");
    let rep_file = dir.path().join("rep.backing");
    let small_file = dir.path().join("small.backing");
    let src_size: u64 = 40 << 20;
    make_mixed_image(&src_file, src_size, &mut rng);
    for (path, size) in [(&rep_file, 48u64 << 20), (&small_file, 16 << 20)] {
        std::fs::write(path, vec![0xEE; size as usize]).unwrap();
    }
    let attach = |p: &Path| LoopDev::attach(p);
    let (src, rep, small) = match (attach(&src_file), attach(&rep_file), attach(&small_file)) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (a, b, c) => {
            let why = [a.err(), b.err(), c.err()]
                .into_iter()
                .flatten()
                .next()
                .unwrap();
            ferry_io::require::skip(ferry_io::require::Feature::Loop, why);
            return;
        }
    };
    assert_eq!(size_of(&src.dev), src_size);

    let key = dir.path().join("ferry.key");
    keygen(&key);
    let target = TargetProc::start(
        dir.path(),
        &key,
        &[("dev", &rep.dev), ("small", &small.dev)],
        "",
    );
    let state = dir.path().join("source-state");
    let config = dir.path().join("source.toml");
    std::fs::write(
        &config,
        source_toml(target.port, &key, &state, &[("dev", &src.dev)], ""),
    )
    .unwrap();
    // A device always exists, so the first sync compares hashes against the garbage.
    let report = sync_ok(&config, &[]);
    assert_eq!(mode_of(&report, "dev"), "seeded", "{report}");
    assert_eq!(u64_field(&report, "bytes_logical"), src_size, "{report}");
    assert_same_prefix(&src.dev, &rep.dev, src_size);

    // A forced full sync onto garbage zeroes the device's ranges the source has as
    // holes or zero blocks (BLKZEROOUT or written zeros).
    let f = open_rw(&rep.dev);
    f.write_all_at(&vec![0xEE; src_size as usize], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let report = sync_ok(&config, &["--mode", "full"]);
    assert_eq!(mode_of(&report, "dev"), "full", "{report}");
    assert_same_prefix(&src.dev, &rep.dev, src_size);

    // Changes travel to the device too (seeded compare against a device).
    let f = open_rw(&src.dev);
    flip_range(&f, 5 * BLOCK + 3, 140_000, &mut rng);
    f.sync_all().unwrap();
    drop(f);
    let report = sync_ok(&config, &[]);
    assert_eq!(mode_of(&report, "dev"), "seeded", "{report}");
    assert_eq!(u64_field(&report, "blocks_sent"), 3, "{report}");
    assert_same_prefix(&src.dev, &rep.dev, src_size);

    let small_before = hash_prefix(&small.dev, 16 << 20);
    let config_small = dir.path().join("source-small.toml");
    std::fs::write(
        &config_small,
        source_toml(target.port, &key, &state, &[("small", &src.dev)], ""),
    )
    .unwrap();
    let run = sync(&config_small, &[]);
    assert!(
        !run.success(),
        "a 16 MiB replica device accepted a 40 MiB disk: {run:?}"
    );
    for n in [src_size, 16 << 20] {
        assert!(
            run.stderr.contains(&n.to_string()),
            "the error should name {n}: {}",
            run.stderr
        );
    }
    assert_eq!(
        hash_prefix(&small.dev, 16 << 20),
        small_before,
        "the small device was written"
    );
    drop(target);
}

/// The target creates a missing replica file with the source's size (a trailing hole
/// included) and reports it; a replica file larger than the source is refused.
#[test]
fn target_creates_and_sizes_a_missing_replica_and_refuses_a_larger_one() {
    let (mut rng, dir, [d, big]) = setup(
        "target_creates_and_sizes_a_missing_replica_and_refuses_a_larger_one",
        ["new", "big"],
    );
    let size = (6 << 20) + 4096 + 512;
    let f = create_sparse(&d.source, size);
    let mut data = vec![0u8; 100_000];
    rng.fill(&mut data);
    f.write_all_at(&data, 1 << 20).unwrap(); // then a 5 MiB trailing hole
    drop(f);
    make_mixed_image(&big.source, 4 << 20, &mut rng);
    std::fs::write(&big.replica, vec![0x5A; (4 << 20) + 65536]).unwrap();

    let pair = Pair::start(dir, vec![d.clone(), big.clone()], "", "");
    let run = pair.sync(&["--disk", "new"]);
    assert!(run.success(), "{run:?}");
    let report = run.json();
    assert_eq!(
        size_of(&d.replica),
        size,
        "the replica was not sized to the source"
    );
    assert_same_file(&d.source, &d.replica);
    let disk = &report["disks"][0];
    assert_eq!(disk["name"], "new", "{report}");
    assert_eq!(disk["replica_created"], true, "{report}");
    let again = pair.sync_ok(&["--disk", "new"]);
    assert_eq!(again["disks"][0]["replica_created"], false, "{again}");

    let before = fingerprint(&big.replica);
    let run = pair.sync(&["--disk", "big"]);
    assert!(
        !run.success(),
        "a replica file larger than the source was accepted: {run:?}"
    );
    assert!(
        run.stderr.contains(&((4u64 << 20) + 65536).to_string())
            && run.stderr.contains(&(4u64 << 20).to_string()),
        "the error should name both sizes: {}",
        run.stderr
    );
    assert_eq!(
        fingerprint(&big.replica),
        before,
        "the larger replica was modified"
    );
}

/// A full sync onto an existing replica full of garbage must also zero what the source
/// holds as holes and zero blocks (the replica was not created in this session).
#[test]
fn forced_full_sync_onto_a_garbage_replica_zeroes_the_holes() {
    let (mut rng, dir, [d]) = setup(
        "forced_full_sync_onto_a_garbage_replica_zeroes_the_holes",
        ["g"],
    );
    let size = (12 << 20) + 777;
    make_mixed_image(&d.source, size, &mut rng);
    let mut garbage = vec![0u8; size as usize];
    rng.fill(&mut garbage);
    std::fs::write(&d.replica, &garbage).unwrap();
    let pair = Pair::start(dir, vec![d.clone()], "", "");
    let report = pair.sync_ok(&["--mode", "full"]);
    assert_eq!(mode_of(&report, "g"), "full", "{report}");
    assert_eq!(report["disks"][0]["replica_created"], false, "{report}");
    assert_same_file(&d.source, &d.replica);

    // And seeded onto garbage finds every differing block. The garbage came from
    // outside ferry after an acknowledged epoch: refused as split brain unless the
    // operator discards it.
    rng.fill(&mut garbage);
    std::fs::write(&d.replica, &garbage).unwrap();
    let refused = pair.sync(&["--mode", "seeded"]);
    assert!(
        !refused.success() && refused.stderr.contains("split brain"),
        "{}",
        refused.stderr
    );
    let report = pair.sync_ok(&["--mode", "seeded", "--discard-replica-changes"]);
    assert_eq!(mode_of(&report, "g"), "seeded", "{report}");
    assert_same_file(&d.source, &d.replica);
}

/// `zero_blocks_sent` counts zero records that travelled, as its doc says: none when
/// the zeros were skipped (new replica) or nothing changed (seeded, all equal).
#[test]
fn json_report_counts_only_what_travelled() {
    let dir = scratch_dir();
    let d = PairDisk::new(dir.path(), "z");
    let f = create_sparse(&d.source, 4 << 20);
    f.write_all_at(&vec![0u8; 10 * BLOCK as usize], 0).unwrap(); // allocated zeros
    let mut data = vec![0u8; 2 * BLOCK as usize];
    Rng::new(5).fill(&mut data);
    f.write_all_at(&data, 20 * BLOCK).unwrap();
    drop(f);
    let pair = Pair::start(dir, vec![d.clone()], "", "");
    let full = pair.sync_ok(&[]);
    assert_same_file(&d.source, &d.replica);
    assert_eq!(u64_field(&full, "blocks_sent"), 2, "{full}");
    assert_eq!(
        u64_field(&full, "zero_blocks_sent"),
        0,
        "a new replica reads as zeros, so no zero record travels: {full}"
    );
    let again = pair.sync_ok(&[]);
    assert_eq!(u64_field(&again, "blocks_sent"), 0, "{again}");
    assert_eq!(u64_field(&again, "bytes_applied"), 0, "{again}");
    assert_eq!(
        u64_field(&again, "zero_blocks_sent"),
        0,
        "nothing differed, so no zero record travelled: {again}"
    );
}

/// The target's record of each replica survives a restart: a changed-block sync
/// based on the epoch acknowledged before the restart is accepted afterwards.
#[test]
fn changed_block_sync_after_a_target_restart() {
    let (mut rng, dir, [d]) = setup("changed_block_sync_after_a_target_restart", ["r"]);
    let size = 8 << 20;
    make_mixed_image(&d.source, size, &mut rng);
    let mut pair = Pair::start(dir, vec![d.clone()], "", "");
    pair.sync_ok(&[]);
    let (config, port) = (pair.target.config.clone(), pair.target.port);
    pair.target.kill();
    pair.target = TargetProc::spawn(&config, port).unwrap_or_else(|e| panic!("restart: {e}"));
    flip(&d.source, &[(7 * BLOCK + 1, 10)], &mut rng);
    let (spec, _) = bitmap_on_state(&pair, "r", size, [7]);
    let report = pair.sync_ok(&["--mode", "changed", "--bitmap", &spec]);
    assert_eq!(mode_of(&report, "r"), "changed", "{report}");
    assert_eq!(u64_field(&report, "blocks_sent"), 1, "{report}");
    assert_same_file(&d.source, &d.replica);
}

/// The target is killed in the middle of a changed-block sync: `ferry sync` exits
/// non-zero with a message, keeps its state (the epoch was not acknowledged), and the
/// same bitmap replayed against the restarted target brings the replica up to date.
#[test]
fn target_killed_mid_sync_then_the_same_change_set_completes() {
    let (mut rng, dir, [d]) = setup(
        "target_killed_mid_sync_then_the_same_change_set_completes",
        ["k"],
    );
    let size: u64 = 384 << 20;
    let f = create_sparse(&d.source, size);
    let mut chunk = vec![0u8; 4 << 20];
    for off in (0..size).step_by(chunk.len()) {
        fill_text(&mut chunk, off);
        f.write_all_at(&chunk, off).unwrap();
    }
    drop(f);
    let mut pair = Pair::start(dir, vec![d.clone()], "compression = \"none\"\n", "");
    pair.sync_ok(&[]);
    let state_file = pair.source_state.join("k.state");
    let state_before = std::fs::read(&state_file).unwrap();

    // Every block changes.
    let f = open_rw(&d.source);
    for off in (0..size).step_by(chunk.len()) {
        rng.fill(&mut chunk);
        f.write_all_at(&chunk, off).unwrap();
    }
    drop(f);
    let (spec, _) = bitmap_on_state(&pair, "k", size, 0..size / BLOCK);

    let config = pair.source_config.clone();
    let args = [
        "--mode".to_string(),
        "changed".into(),
        "--bitmap".into(),
        spec.clone(),
    ];
    let running = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sync(&config, &args)
    });
    std::thread::sleep(std::time::Duration::from_millis(150));
    let (config, port) = (pair.target.config.clone(), pair.target.port);
    pair.target.kill();
    let run = running.join().unwrap();
    if run.success() {
        eprintln!("the sync finished before the target was killed; only the replay is checked");
    } else {
        assert!(
            run.stdout.trim().is_empty(),
            "a failed sync printed a report: {}",
            run.stdout
        );
        assert!(!run.stderr.trim().is_empty(), "a failed sync must say why");
        assert_eq!(
            std::fs::read(&state_file).unwrap(),
            state_before,
            "an unacknowledged epoch was recorded"
        );
    }

    pair.target = TargetProc::spawn(&config, port).unwrap_or_else(|e| panic!("restart: {e}"));
    if run.success() {
        return;
    }
    let report = pair.sync_ok(&["--mode", "changed", "--bitmap", &spec]);
    assert_eq!(mode_of(&report, "k"), "changed", "{report}");
    assert_same_file(&d.source, &d.replica);
}

/// Two sources at once: different disks both succeed; the same disk is never written
/// by two sessions (one may be refused as busy) and ends up identical.
#[test]
fn concurrent_sessions() {
    let (mut rng, dir, [a, b]) = setup("concurrent_sessions", ["a", "b"]);
    make_mixed_image(&a.source, 48 << 20, &mut rng);
    make_mixed_image(&b.source, 40 << 20, &mut rng);
    let pair = Pair::start(dir, vec![a.clone(), b.clone()], "", "");
    let config = |name: &str, disk: &PairDisk| {
        let path = pair.path().join(format!("{name}.toml"));
        let state = pair.path().join(format!("{name}-state"));
        std::fs::write(
            &path,
            source_toml(
                pair.target.port,
                &pair.key,
                &state,
                &[(&disk.name, &disk.source)],
                "",
            ),
        )
        .unwrap();
        path
    };
    let (ca, cb) = (config("sa", &a), config("sb", &b));
    let ta = std::thread::spawn(move || sync(&ca, &[]));
    let tb = std::thread::spawn(move || sync(&cb, &[]));
    for run in [ta.join().unwrap(), tb.join().unwrap()] {
        assert!(run.success(), "{run:?}");
    }
    pair.assert_replicas_identical();

    flip(&a.source, &[(0, 20 << 20)], &mut rng);
    let (c1, c2) = (config("s1", &a), config("s2", &a));
    let t1 = std::thread::spawn(move || sync(&c1, &["--mode", "seeded"]));
    let t2 = std::thread::spawn(move || sync(&c2, &["--mode", "seeded"]));
    let runs = [t1.join().unwrap(), t2.join().unwrap()];
    assert!(
        runs.iter().any(Run::success),
        "neither sync succeeded: {runs:?}"
    );
    for run in &runs {
        if !run.success() {
            let err = run.stderr.to_lowercase();
            assert!(
                err.contains("busy") || err.contains("another session"),
                "{}",
                run.stderr
            );
        }
    }
    assert_same_file(&a.source, &a.replica);
}
