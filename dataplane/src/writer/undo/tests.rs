//! Undo log recovery: what is rolled back, what is rolled forward, and what is refused.

use super::*;

fn disk(name: &str) -> UndoDisk {
    UndoDisk {
        name: name.into(),
        generation: GenerationId::from_bytes([3; 16]),
        disk_size: 1 << 20,
        logged: true,
        prev_epoch: Some(1),
    }
}

fn record(dir: &Path, name: &str, epoch: u64) {
    ReplicaRecord {
        generation: GenerationId::from_bytes([3; 16]),
        epoch,
        disk_size: 1 << 20,
        committed_unix_s: 1,
        suspect: None,
        stamp: None,
    }
    .save(dir, name)
    .unwrap();
}

/// A replica of 1 MiB of known bytes with a record at epoch 1, and its log for epoch 2.
struct Fixture {
    dir: tempfile::TempDir,
    replica: PathBuf,
    old: Vec<u8>,
    file: File,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let replica = dir.path().join("a.img");
        let old: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        fs::write(&replica, &old).unwrap();
        record(dir.path(), "a", 1);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&replica)
            .unwrap();
        Fixture {
            dir,
            replica,
            old,
            file,
        }
    }

    fn replicas(&self) -> Vec<(String, PathBuf)> {
        vec![("a".into(), self.replica.clone())]
    }

    /// Logs the range, syncs, then overwrites it on the replica: one applied write.
    fn applied_write(&self, log: &mut UndoLog, off: u64, len: usize, byte: u8) {
        let mut cur = vec![0u8; len];
        self.file.read_exact_at(&mut cur, off).unwrap();
        log.append(0, off, &cur).unwrap();
        log.sync().unwrap();
        self.file.write_all_at(&vec![byte; len], off).unwrap();
    }

    /// Logs the range without syncing and without writing the replica: a crash came
    /// before the sync returned.
    fn unsynced_entry(&self, log: &mut UndoLog, off: u64, len: usize) {
        let mut cur = vec![0u8; len];
        self.file.read_exact_at(&mut cur, off).unwrap();
        log.append(0, off, &cur).unwrap();
    }

    fn now(&self) -> Vec<u8> {
        fs::read(&self.replica).unwrap()
    }

    fn suspect(&self) -> Option<String> {
        ReplicaRecord::load(self.dir.path(), "a")
            .unwrap()
            .unwrap()
            .suspect
    }
}

/// Flips one bit at `at` bytes into the file.
fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
}

fn header_len(disks: usize) -> u64 {
    (20 + disks * HEADER_DISK_LEN + 8) as u64
}

#[test]
fn uncommitted_epoch_rolls_back_byte_for_byte_even_with_a_torn_tail() {
    let fx = Fixture::new();
    let mut log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
    for (off, len) in [(0u64, 65536usize), (131072, 4096), (0, 4096)] {
        fx.applied_write(&mut log, off, len, 0xEE);
    }
    // A torn entry at the tail: its write never happened.
    log.file.write_all_at(&[0x55; 17], log.len).unwrap();
    drop(log);
    let done = recover(fx.dir.path(), &fx.replicas()).unwrap();
    assert!(
        matches!(
            &done[..],
            [Recovery::RolledBack {
                epoch: 2,
                entries: 3,
                disks,
            }] if disks == &["a"]
        ),
        "{done:?}"
    );
    assert_eq!(fx.now(), fx.old);
    assert!(
        recover(fx.dir.path(), &fx.replicas()).unwrap().is_empty(),
        "log removed"
    );
}

#[test]
fn unsynced_entries_after_a_torn_one_are_a_tail_and_dropped() {
    let fx = Fixture::new();
    let mut log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
    fx.applied_write(&mut log, 0, 4096, 0xEE);
    let second = log.len;
    // Two entries written in one batch, the crash during their sync: the first is
    // torn, the second reached the disk whole. Neither write was issued.
    fx.unsynced_entry(&mut log, 65536, 4096);
    fx.unsynced_entry(&mut log, 131072, 4096);
    drop(log);
    let path = fs::read_dir(undo_dir(fx.dir.path()))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    flip(&path, second + ENTRY_HEADER_LEN as u64 + 100);
    let done = recover(fx.dir.path(), &fx.replicas()).unwrap();
    assert!(
        matches!(done[..], [Recovery::RolledBack { entries: 1, .. }]),
        "{done:?}"
    );
    assert_eq!(fx.now(), fx.old);
}

#[test]
fn damage_inside_the_synced_part_is_refused_not_half_rolled_back() {
    let fx = Fixture::new();
    let mut log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
    let mut starts = Vec::new();
    for (i, off) in [0u64, 65536, 131072, 196608].into_iter().enumerate() {
        starts.push(log.len);
        fx.applied_write(&mut log, off, 4096, 0xE0 + i as u8);
    }
    let path = log.path.clone();
    drop(log);
    let after = fx.now();
    // One bit of entry 2's data.
    flip(&path, starts[1] + ENTRY_HEADER_LEN as u64 + 7);
    let done = recover(fx.dir.path(), &fx.replicas()).unwrap();
    let [Recovery::Distrusted {
        set_aside, problem, ..
    }] = &done[..]
    else {
        panic!("{done:?}")
    };
    assert!(
        matches!(
            problem,
            LogDamage::SyncedPart { bad_at, .. } | LogDamage::ReachedReplica { bad_at, .. }
                if *bad_at == starts[1]
        ),
        "{problem:?}"
    );
    assert!(set_aside.exists() && !path.exists());
    assert_eq!(fx.now(), after, "nothing applied from a damaged log");
    let why = fx
        .suspect()
        .expect("the disk is marked for a checksum resync");
    assert!(why.contains(path.to_str().unwrap()), "{why}");
}

#[test]
fn damage_in_a_header_in_the_synced_part_is_refused() {
    let fx = Fixture::new();
    let mut log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
    let mut starts = Vec::new();
    for off in [0u64, 65536, 131072] {
        starts.push(log.len);
        fx.applied_write(&mut log, off, 4096, 0xEE);
    }
    let path = log.path.clone();
    drop(log);
    flip(&path, starts[1] + 9); // the offset field of entry 2
    let done = recover(fx.dir.path(), &fx.replicas()).unwrap();
    assert!(
        matches!(done[..], [Recovery::Distrusted { .. }]),
        "{done:?}"
    );
    assert!(fx.suspect().is_some());
}

#[test]
fn a_damaged_last_entry_whose_write_reached_the_replica_is_refused() {
    let fx = Fixture::new();
    let mut log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
    fx.applied_write(&mut log, 0, 4096, 0xEE);
    let last = log.len;
    fx.applied_write(&mut log, 65536, 4096, 0xEF);
    let path = log.path.clone();
    drop(log);
    // Nothing was written after it, so no later entry vouches for its sync; but the
    // replica shows its write happened: its old bytes are gone.
    flip(&path, last + ENTRY_HEADER_LEN as u64 + 1);
    let done = recover(fx.dir.path(), &fx.replicas()).unwrap();
    let [Recovery::Distrusted { problem, .. }] = &done[..] else {
        panic!("{done:?}")
    };
    assert!(
        matches!(problem, LogDamage::ReachedReplica { bad_at, disk, offset: 65536, .. } if *bad_at == last && disk == "a"),
        "{problem:?}"
    );
}

#[test]
fn a_stale_log_never_rolls_back_later_epochs() {
    let fx = Fixture::new();
    let mut log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
    fx.applied_write(&mut log, 0, 4096, 0xEE);
    drop(log);
    // The epoch's commit failed, yet later epochs committed over it.
    record(fx.dir.path(), "a", 4);
    let after = fx.now();
    let done = recover(fx.dir.path(), &fx.replicas()).unwrap();
    let [Recovery::Distrusted { problem, .. }] = &done[..] else {
        panic!("{done:?}")
    };
    assert_eq!(
        problem,
        &LogDamage::Stale {
            epoch: 2,
            disk: "a".into(),
            prev_epoch: Some(1),
            held: Some(4)
        }
    );
    assert_eq!(fx.now(), after);
}

#[test]
fn committed_epoch_rolls_records_forward_and_keeps_its_point() {
    let dir = tempfile::tempdir().unwrap();
    let log = UndoLog::create(dir.path(), 9, vec![disk("a"), disk("b")]).unwrap();
    // Crash after the commit mark, before the records: simulate by writing the mark only.
    crate::durable::write_atomic(&log.marker, &9u64.to_le_bytes()).unwrap();
    drop(log);
    let done = recover(dir.path(), &[]).unwrap();
    assert!(
        matches!(
            &done[..],
            [Recovery::RolledForward { epoch: 9, disks }] if disks == &["a", "b"]
        ),
        "{done:?}"
    );
    for n in ["a", "b"] {
        assert_eq!(
            ReplicaRecord::load(dir.path(), n).unwrap().unwrap().epoch,
            9
        );
    }
    let kept: Vec<_> = fs::read_dir(super::super::points::points_dir(dir.path()))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 2, "the log and its metadata: {kept:?}");
    assert_eq!(fs::read_dir(undo_dir(dir.path())).unwrap().count(), 0);
}

#[test]
fn damaged_header_is_distrusted_for_every_disk() {
    let fx = Fixture::new();
    let log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
    let path = log.path.clone();
    drop(log);
    flip(&path, 25);
    let done = recover(fx.dir.path(), &fx.replicas()).unwrap();
    assert!(
        matches!(&done[..], [Recovery::Distrusted { disks, .. }] if disks == &["a".to_string()]),
        "{done:?}"
    );
    assert!(fx.suspect().is_some());
}

#[test]
fn a_log_whose_header_never_became_durable_is_removed() {
    let fx = Fixture::new();
    let dir = undo_dir(fx.dir.path());
    crate::durable::ensure_dir(&dir).unwrap();
    // Power lost between creating the log and syncing its header.
    fs::write(dir.join("00000000000000000002-0000abcd.tmp"), b"").unwrap();
    assert!(recover(fx.dir.path(), &fx.replicas()).unwrap().is_empty());
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn a_kept_log_must_parse_to_its_end() {
    let fx = Fixture::new();
    let mut log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
    fx.applied_write(&mut log, 0, 4096, 0xEE);
    fx.applied_write(&mut log, 65536, 4096, 0xEE);
    let path = log.path.clone();
    drop(log);
    assert!(read_log(&path, ReadMode::Kept).is_ok());
    flip(&path, header_len(1) + ENTRY_HEADER_LEN as u64 + 3);
    assert!(matches!(
        read_log(&path, ReadMode::Kept),
        Err(Damage::Untrusted(LogDamage::KeptTail { .. }))
    ));
}

#[test]
fn a_tail_longer_than_the_scan_window_is_checked_to_its_end() {
    for last_write_reached_the_replica in [false, true] {
        let fx = Fixture::new();
        let mut log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
        fx.applied_write(&mut log, 0, 4096, 0xEE);
        let torn = log.len;
        // More unsynced entries than one scan window holds (the crash came during
        // their sync); none of their writes was issued...
        let mut n = 0u64;
        while log.len - torn < 2 * TAIL_WINDOW as u64 {
            // Cycling over blocks 1..=13 of the 16 of the replica.
            fx.unsynced_entry(&mut log, 65536 * (1 + n % 13), 65536);
            n += 1;
        }
        // The last entry, past the first window, covers block 15, which no other entry
        // touches...
        let last = 15 * 65536;
        fx.unsynced_entry(&mut log, last, 65536);
        // ...and only if its write was issued can the log not be trusted.
        if last_write_reached_the_replica {
            fx.file.write_all_at(&[0x77; 65536], last).unwrap();
        }
        let path = log.path.clone();
        drop(log);
        flip(&path, torn + ENTRY_HEADER_LEN as u64 + 5);
        let done = recover(fx.dir.path(), &fx.replicas()).unwrap();
        if last_write_reached_the_replica {
            assert!(
                matches!(
                    &done[..],
                    [Recovery::Distrusted {
                        problem: LogDamage::ReachedReplica { .. },
                        ..
                    }]
                ),
                "{done:?}"
            );
        } else {
            assert!(
                matches!(done[..], [Recovery::RolledBack { entries: 1, .. }]),
                "{done:?}"
            );
            assert_eq!(fx.now(), fx.old);
        }
    }
}

/// Old bytes staged by the stager — many small ranges, ranges larger than a piece, an
/// all-zero range and a hole — roll back byte for byte, and the log reads back whole.
#[test]
fn staged_entries_roll_back_byte_for_byte() {
    use super::stage::{Stager, PIECE};
    let mut fx = Fixture::new();
    // An all-zero range, read and logged as a zero entry, and a hole, skipped by
    // SEEK_DATA where the file system has it.
    fx.file.write_all_at(&[0u8; 65536], 196_608).unwrap();
    fx.old[196_608..262_144].fill(0);
    let punched = nix::fcntl::fallocate(
        std::os::fd::AsRawFd::as_raw_fd(&fx.file),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        524_288,
        131_072,
    );
    if punched.is_err() {
        fx.file.write_all_at(&[0u8; 131_072], 524_288).unwrap();
    }
    fx.old[524_288..655_360].fill(0);
    assert_eq!(fx.now(), fx.old);
    let mut log = UndoLog::create(fx.dir.path(), 2, vec![disk("a")]).unwrap();
    let mut stager = Stager::new();
    let small = 1u64 << 14;
    let mut ranges: Vec<(u64, u64)> = (0..32).map(|i| (i * small, small)).collect();
    ranges.push((0, 3 * PIECE as u64 + 4096));
    ranges.push((196_608, 65_536));
    for &(o, l) in &ranges {
        stager
            .log_range(&mut log, &fx.file, 0, (o, l), true)
            .unwrap();
    }
    stager.sync(&mut log).unwrap();
    for &(o, l) in &ranges {
        fx.file.write_all_at(&vec![0xEE; l as usize], o).unwrap();
    }
    assert_ne!(fx.now(), fx.old);
    drop(stager);
    drop(log);
    let done = recover(fx.dir.path(), &fx.replicas()).unwrap();
    assert!(
        matches!(&done[..], [Recovery::RolledBack { epoch: 2, .. }]),
        "{done:?}"
    );
    assert_eq!(fx.now(), fx.old);
}

/// Process CPU seconds (every thread, io_uring workers included) so far.
fn cpu_s() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// What staging costs, apart from the rest of a session: a full rewrite of the image
/// at `FERRY_STAGE_BENCH` (a whole number of MiB, e.g. `ferry bench --make-image`; it
/// is rewritten with its own bytes) in frames of 1 MiB, 16 frames staged under one
/// sync, then their non-zero frames written through an engine as the applier does.
/// Prints wall and process CPU seconds of runs with and without staging, alternating
/// (`REPS` of each, default 3):
/// `FERRY_STAGE_BENCH=/dev/shm/x.img cargo test --release -p ferry-dataplane --lib
/// stage_cost -- --ignored --nocapture`
#[test]
#[ignore]
fn stage_cost() {
    use super::stage::Stager;
    use crate::io::{self as dio, AlignedBuf, BlockEngine, DiskId, EngineKind};
    let Ok(path) = std::env::var("FERRY_STAGE_BENCH") else {
        return;
    };
    let reps: usize = std::env::var("REPS").map_or(3, |r| r.parse().unwrap());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let size = file.metadata().unwrap().len();
    const FRAME: u64 = 1 << 20;
    assert_eq!(size % FRAME, 0, "the image must be a whole number of MiB");
    let mut frames: Vec<AlignedBuf> = (0..16)
        .map(|_| AlignedBuf::zeroed(FRAME as usize))
        .collect();
    let image = fs::read(&path).unwrap();
    for rep in 0..2 * reps {
        let staged = rep % 2 == 0;
        let dir = tempfile::tempdir_in(Path::new(&path).parent().unwrap()).unwrap();
        let mut log = UndoLog::create(dir.path(), 2, vec![disk("a")]).unwrap();
        let mut stager = Stager::new();
        let mut engine = dio::open_engine::<AlignedBuf>(
            EngineKind::Auto,
            16,
            &[std::os::fd::AsRawFd::as_raw_fd(&file)],
            None,
        )
        .unwrap();
        let mut done = Vec::new();
        let (c0, t0) = (cpu_s(), std::time::Instant::now());
        let mut pos = 0;
        while pos < size {
            let n = ((size - pos) / FRAME).min(16);
            if staged {
                for i in 0..n {
                    stager
                        .log_range(&mut log, &file, 0, (pos + i * FRAME, FRAME), true)
                        .unwrap();
                }
                stager.sync(&mut log).unwrap();
            }
            for i in 0..n {
                while engine.in_flight() >= 16 {
                    done.clear();
                    engine.wait(1, &mut done).unwrap();
                    frames.extend(done.drain(..).filter_map(|c| c.buf));
                }
                let at = pos + i * FRAME;
                let src = &image[at as usize..(at + FRAME) as usize];
                if crate::protocol::is_zero(src) {
                    continue;
                }
                let mut b = frames.pop().unwrap();
                b.copy_from_slice(src);
                engine
                    .submit_write(DiskId(0), b, at, FRAME as u32, at)
                    .map_err(|e| e.0)
                    .unwrap();
            }
            pos += n * FRAME;
        }
        while engine.in_flight() > 0 {
            done.clear();
            engine.wait(1, &mut done).unwrap();
            frames.extend(done.drain(..).filter_map(|c| c.buf));
        }
        let (c1, t1) = (cpu_s(), t0.elapsed().as_secs_f64());
        println!(
            "{}: wall {t1:.3} s, CPU {:.3} s, log {} MB",
            if staged { "staged  " } else { "unstaged" },
            c1 - c0,
            log.len / 1_000_000
        );
    }
}
