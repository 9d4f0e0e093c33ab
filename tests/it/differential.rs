//! Differential test: random write patterns hit a source image between syncs; after
//! every sync the replica must equal the source byte for byte, whatever the sync mode.
//!
//! Writes are random in offset and length (unaligned, across block boundaries, at the
//! disk's tail), some write zeros, some punch holes. The syncs after the first (full)
//! one alternate between changed-block (with a bitmap built from the pattern, as the
//! shim would record it) and seeded (hash compare). Besides the bytes, the counts must
//! be exact: a changed sync reads exactly the bitmap's blocks; a seeded sync sends
//! exactly the blocks that differ.
//!
//! The proptest cases run against an in-process target (fast); some cases run the
//! same kind of scenario through the real `ferry` binary. `FERRY_SOAK=1` runs many
//! more cases; `FERRY_TEST_SEED` replays the binary cases.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::common::Rng as SeedRng;
use crate::common::*;
use dataplane::config::Config;
use dataplane::protocol::{ErrorCode, ProtocolError};
use dataplane::source::{self, ModeRequest, SyncJob};
use dataplane::writer::{Target, TargetJob};
use filter_driver_shim_contract::bitmap::{ChangedBlockBitmap, GenerationId};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};

/// One change to the source image between syncs. Offsets and lengths are raw random
/// numbers, reduced to the disk's geometry when applied (so shrinking stays valid).
#[derive(Debug, Clone)]
enum Op {
    /// Random bytes.
    Data { at: u64, len: u64, seed: u64 },
    /// Written zeros (allocated).
    Zeros { at: u64, len: u64 },
    /// A punched hole (reads as zeros, unallocated).
    Punch { at: u64, len: u64 },
    /// Random bytes ending exactly at the disk's end.
    Tail { len: u64, seed: u64 },
}

#[derive(Debug, Clone)]
struct Scenario {
    block_kib: u32,
    blocks: u64,
    tail: u64,
    image_seed: u64,
    compression: bool,
    /// Changes before each sync after the first.
    rounds: Vec<Vec<Op>>,
}

impl Scenario {
    fn block(&self) -> u64 {
        self.block_kib as u64 * 1024
    }
    fn size(&self) -> u64 {
        self.blocks * self.block() + self.tail % self.block()
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(at, len, seed)| Op::Data { at, len, seed }),
        2 => (any::<u64>(), any::<u64>()).prop_map(|(at, len)| Op::Zeros { at, len }),
        2 => (any::<u64>(), any::<u64>()).prop_map(|(at, len)| Op::Punch { at, len }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(len, seed)| Op::Tail { len, seed }),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop_oneof![Just(4u32), Just(16), Just(64)],
        1u64..40,
        prop_oneof![Just(0u64), 1u64..(64 << 10)],
        any::<u64>(),
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(op(), 0..7), 2..6),
    )
        .prop_map(
            |(block_kib, blocks, tail, image_seed, compression, rounds)| Scenario {
                block_kib,
                blocks,
                tail,
                image_seed,
                compression,
                rounds,
            },
        )
}

/// Applies `op` to the image and marks what it touched in `dirty`.
fn apply(f: &std::fs::File, size: u64, op: &Op, dirty: &mut ChangedBlockBitmap) {
    let range = |at: u64, len: u64| {
        let at = at % size;
        let max = (size - at).min(3 * (64 << 10));
        (at, 1 + len % max)
    };
    let (at, len) = match *op {
        Op::Data { at, len, seed } => {
            let (at, len) = range(at, len);
            let mut buf = vec![0u8; len as usize];
            SeedRng::new(seed).fill(&mut buf);
            f.write_all_at(&buf, at).unwrap();
            (at, len)
        }
        Op::Zeros { at, len } => {
            let (at, len) = range(at, len);
            f.write_all_at(&vec![0u8; len as usize], at).unwrap();
            (at, len)
        }
        Op::Punch { at, len } => {
            let (at, len) = range(at, len);
            punch_hole(f, at, len);
            (at, len)
        }
        Op::Tail { len, seed } => {
            let len = 1 + len % size.min(2 * (64 << 10));
            let mut buf = vec![0u8; len as usize];
            SeedRng::new(seed).fill(&mut buf);
            f.write_all_at(&buf, size - len).unwrap();
            (size - len, len)
        }
    };
    dirty.set_range(at, len).unwrap();
}

/// Blocks in which `a` and `b` differ, and how many of those are all zeros in `a`.
fn differing_blocks(a: &Path, b: &Path, block: u64) -> (u64, u64) {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let size = fa.metadata().unwrap().len();
    let (mut ba, mut bb) = (vec![0u8; block as usize], vec![0u8; block as usize]);
    let (mut differ, mut zero) = (0, 0);
    let mut off = 0;
    while off < size {
        let n = block.min(size - off) as usize;
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            differ += 1;
            if ba[..n].iter().all(|&x| x == 0) {
                zero += 1;
            }
        }
        off += n as u64;
    }
    (differ, zero)
}

fn count_zero_blocks(path: &Path, bitmap: &ChangedBlockBitmap) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let bs = bitmap.block_size() as u64;
    let mut buf = vec![0u8; bs as usize];
    let mut zero = 0;
    for (first, count) in bitmap.iter_runs() {
        for b in first..first + count {
            let n = bs.min(bitmap.disk_size() - b * bs) as usize;
            f.read_exact_at(&mut buf[..n], b * bs).unwrap();
            if buf[..n].iter().all(|&x| x == 0) {
                zero += 1;
            }
        }
    }
    zero
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    Seeded,
    Changed,
}

/// What a sync reported, whichever way it ran.
#[derive(Debug)]
struct Outcome {
    mode: String,
    blocks_sent: u64,
    zero_blocks_sent: u64,
}

/// Runs syncs of the disk "d" one way or another.
trait Syncer {
    fn sync(&mut self, mode: Mode, bitmap: Option<&Path>) -> Outcome;
    fn source_state(&self) -> PathBuf;
}

/// In-process target on an ephemeral port, source engine called as a library; both
/// built from config text through the product's own loaders.
struct InProcess {
    source_config: Config,
    state: PathBuf,
}

impl InProcess {
    fn start(dir: &Path, image: &Path, replica: &Path, source_extra: &str) -> InProcess {
        let key = dir.join("ferry.key");
        keygen(&key);
        let target_text = target_toml(
            0,
            &key,
            &dir.join("target-state"),
            &[("d", replica)],
            engine_line(),
        );
        let target_config = Config::from_str(&target_text, dir).expect("target config");
        let job = TargetJob::from_config(&target_config).expect("target job");
        let target = Target::bind(job).expect("bind the target");
        let port = target.local_addr().unwrap().port();
        // The listener lives as long as the test process; each case has its own.
        std::thread::spawn(move || target.serve());
        let state = dir.join("source-state");
        let source_text = source_toml(port, &key, &state, &[("d", image)], source_extra);
        InProcess {
            source_config: Config::from_str(&source_text, dir).expect("source config"),
            state,
        }
    }
}

impl Syncer for InProcess {
    fn sync(&mut self, mode: Mode, bitmap: Option<&Path>) -> Outcome {
        let request = match mode {
            Mode::Auto => ModeRequest::Auto,
            Mode::Seeded => ModeRequest::Seeded,
            Mode::Changed => ModeRequest::Changed,
        };
        let mut job = SyncJob::from_config(&self.source_config, request).expect("sync job");
        job.disks[0].bitmap = bitmap.map(Path::to_path_buf);
        // The target may still hold the disk for a moment after acknowledging the
        // previous sync (see `back_to_back_syncs_are_accepted`); this test is about
        // the bytes, so it waits that out.
        let mut attempts = 0;
        let report = loop {
            match source::sync(&job) {
                Ok(r) => break r,
                Err(e) if is_busy(&e) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{mode:?} sync failed: {}", dataplane::chain(&e)),
            }
        };
        Outcome {
            mode: report.disks[0].mode.to_string(),
            blocks_sent: report.blocks_sent,
            zero_blocks_sent: report.zero_blocks_sent,
        }
    }

    fn source_state(&self) -> PathBuf {
        self.state.clone()
    }
}

fn is_busy(e: &source::SourceError) -> bool {
    matches!(
        e,
        source::SourceError::Protocol(ProtocolError::Remote {
            code: ErrorCode::Busy,
            ..
        })
    )
}

/// The real binaries: `ferry target` process, `ferry sync --json`.
struct Binary {
    pair: Pair,
}

impl Syncer for Binary {
    fn sync(&mut self, mode: Mode, bitmap: Option<&Path>) -> Outcome {
        let spec = bitmap.map(|b| format!("d={}", b.display()));
        let mut args = match mode {
            Mode::Auto => vec![],
            Mode::Seeded => vec!["--mode", "seeded"],
            Mode::Changed => vec!["--mode", "changed"],
        };
        if let Some(spec) = &spec {
            args.extend(["--bitmap", spec.as_str()]);
        }
        let report = self.pair.sync_ok(&args);
        Outcome {
            mode: mode_of(&report, "d").to_string(),
            blocks_sent: u64_field(&report, "blocks_sent"),
            zero_blocks_sent: u64_field(&report, "zero_blocks_sent"),
        }
    }

    fn source_state(&self) -> PathBuf {
        self.pair.source_state.clone()
    }
}

fn source_extra(s: &Scenario) -> String {
    format!(
        "block_size_kib = {}\ncompression = \"{}\"\nworkers = 2\n{}\n",
        s.block_kib,
        if s.compression { "zstd" } else { "none" },
        engine_line()
    )
}

/// With `FERRY_REQUIRE=uring` both sides force io_uring: under `auto` a machine
/// without it would fall back to the synchronous engine in silence, and the
/// comparison would prove nothing about the io_uring data path.
fn engine_line() -> &'static str {
    if ferry_io::require::required(ferry_io::require::Feature::Uring) {
        "io_engine = \"uring\""
    } else {
        ""
    }
}

/// Runs one scenario; panics (with the round and mode) on the first divergence.
fn run(s: &Scenario, syncer: &mut dyn Syncer, image: &Path, replica: &Path, dir: &Path) {
    let size = s.size();
    let bs = s.block();
    let first = syncer.sync(Mode::Auto, None);
    assert_eq!(first.mode, "full", "first sync of a new replica");
    assert_same_file(image, replica);

    for (round, ops) in s.rounds.iter().enumerate() {
        let (generation, epoch) = read_source_state(&syncer.source_state(), "d");
        let mut dirty =
            ChangedBlockBitmap::new(size, bs as u32, GenerationId::from_bytes(generation), epoch)
                .unwrap();
        let f = open_rw(image);
        for op in ops {
            apply(&f, size, op, &mut dirty);
        }
        drop(f);
        let ctx = format!("round {round} after {ops:?}");
        if round % 2 == 0 {
            let bitmap = dir.join(format!("round-{round}.cbt"));
            dirty.save(&bitmap).unwrap();
            let zeros = count_zero_blocks(image, &dirty);
            let out = syncer.sync(
                if round % 4 == 0 {
                    Mode::Auto
                } else {
                    Mode::Changed
                },
                Some(&bitmap),
            );
            assert_eq!(out.mode, "changed", "{ctx}");
            assert_same_file(image, replica);
            assert_eq!(
                out.blocks_sent,
                dirty.count() - zeros,
                "{ctx}: data blocks of a changed sync: {out:?}"
            );
            assert_eq!(
                out.blocks_sent + out.zero_blocks_sent,
                dirty.count(),
                "{ctx}: a changed sync covers exactly the bitmap: {out:?}"
            );
        } else {
            let (differ, zero) = differing_blocks(image, replica, bs);
            let out = syncer.sync(Mode::Seeded, None);
            assert_eq!(out.mode, "seeded", "{ctx}");
            assert_same_file(image, replica);
            assert_eq!(
                out.blocks_sent,
                differ - zero,
                "{ctx}: a seeded sync sends exactly the differing data blocks: {out:?}"
            );
        }
    }
}

fn run_in_process(s: &Scenario) {
    let dir = scratch_dir();
    let image = dir.path().join("d.img");
    let replica = dir.path().join("d.replica");
    make_mixed_image(&image, s.size(), &mut SeedRng::new(s.image_seed));
    let mut syncer = InProcess::start(dir.path(), &image, &replica, &source_extra(s));
    run(s, &mut syncer, &image, &replica, dir.path());
}

fn run_binary(s: &Scenario) {
    let dir = scratch_dir();
    let d = PairDisk::new(dir.path(), "d");
    make_mixed_image(&d.source, s.size(), &mut SeedRng::new(s.image_seed));
    let (image, replica) = (d.source.clone(), d.replica.clone());
    let pair = Pair::start(dir, vec![d], &source_extra(s), engine_line());
    let work = pair.path().to_path_buf();
    let mut syncer = Binary { pair };
    run(s, &mut syncer, &image, &replica, &work);
    syncer.pair.target.assert_alive();
}

fn cases() -> u32 {
    if soak() {
        256
    } else {
        8
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_writes_replicate_exactly_in_process(s in scenario()) {
        run_in_process(&s);
    }
}

/// Scenarios drawn from a printed seed, through the real `ferry` binaries.
#[test]
fn random_writes_replicate_exactly_through_the_binary() {
    let seed = test_seed("random_writes_replicate_exactly_through_the_binary");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let n = if soak() { 16 } else { 2 };
    for i in 0..n {
        let s = scenario().new_tree(&mut runner).unwrap().current();
        eprintln!("binary case {i}: {s:?}");
        run_binary(&s);
    }
}

/// A sync started right after the previous one was acknowledged must be accepted:
/// the acknowledgement means the session is over. (`ferry source` syncs epoch after
/// epoch in one process; the demo does the same.)
#[test]
fn back_to_back_syncs_are_accepted() {
    let dir = scratch_dir();
    let image = dir.path().join("d.img");
    let replica = dir.path().join("d.replica");
    make_mixed_image(&image, 1 << 20, &mut SeedRng::new(1));
    let syncer = InProcess::start(dir.path(), &image, &replica, engine_line());
    let mut busy = 0;
    for _ in 0..30 {
        let job = SyncJob::from_config(&syncer.source_config, ModeRequest::Seeded).unwrap();
        match source::sync(&job) {
            Ok(_) => {}
            Err(e) if is_busy(&e) => busy += 1,
            Err(e) => panic!("sync failed: {}", dataplane::chain(&e)),
        }
    }
    assert_same_file(&image, &replica);
    assert_eq!(busy, 0, "{busy} of 30 back-to-back syncs were refused as Busy right after the previous one was acknowledged");
}
