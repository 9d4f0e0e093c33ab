//! The io_uring engine against its contract: write-intent order (gate, mark, write,
//! leave, FUA sync, reply), FLUSH after acknowledged writes, the NBD errors of the
//! thread pool for the same failures, epochs (copy-before-write, TRIM dropped, zeros
//! written), and a freeze never waiting for this thread. Each test skips when io_uring
//! is unavailable here.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::backing::IoEngine;
use crate::bitmap::ChangedBlockBitmap;
use crate::epoch::FrozenDisk;
use crate::nbd::connection::REPLY_QUEUE_DEPTH;
use crate::nbd::engine::pool::execute;
use crate::nbd::handshake::ExportInfo;
use crate::nbd::proto::{NbdErrno, TRANSMISSION_FLAGS};
use crate::pool::BufferPool;
use crate::tracker::{Tracker, TrackerConfig};
use filter_driver_shim_contract::epoch::EpochFiles;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u32 = 64 << 10;
/// Cookies of markers the tests put in the trace.
const DRAINED: u64 = u64::MAX - 1;
const RELEASED: u64 = u64::MAX - 2;

fn unavailable() -> bool {
    match available() {
        Ok(()) => false,
        Err(why) => {
            ferry_io::require::skip(ferry_io::require::Feature::Uring, ferry_io::chain(&*why));
            true
        }
    }
}

/// The image's initial byte at `pos`.
fn initial(pos: u64) -> u8 {
    (pos / 4096 % 251) as u8 + 1
}

struct Disk {
    dir: tempfile::TempDir,
    export: Arc<Export>,
    pool: Arc<BufferPool>,
}

/// A disk of `size` bytes with known content, on tmpfs when there is one (no
/// `FALLOC_FL_ZERO_RANGE` there, so the zero-writing fallback runs too).
fn disk(size: u64) -> Disk {
    disk_with(size, |path| Backing::open(path).unwrap())
}

fn disk_with(size: u64, open: impl FnOnce(&Path) -> Backing) -> Disk {
    let dir = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let image = dir.path().join("img");
    let content: Vec<u8> = (0..size).map(initial).collect();
    std::fs::write(&image, &content).unwrap();
    let backing = open(&image);
    let tracker = Tracker::open(
        TrackerConfig {
            disk: "d".into(),
            bitmap_path: dir.path().join("d.cbt"),
            state_path: dir.path().join("d.state"),
            block_size: BLOCK,
        },
        backing.identity().unwrap(),
    )
    .unwrap();
    let info = ExportInfo {
        name: "d".into(),
        size_bytes: size,
        transmission_flags: TRANSMISSION_FLAGS,
    };
    Disk {
        export: Arc::new(Export::new(info, backing, tracker, IoEngine::Uring)),
        pool: BufferPool::new(4, 4096),
        dir,
    }
}

fn durability(fua: bool) -> Durability {
    if fua {
        Durability::ForceUnitAccess
    } else {
        Durability::Cached
    }
}

impl Disk {
    fn write(&self, cookie: u64, offset: u64, data: &[u8], fua: bool) -> Job {
        let mut buf = self.pool.get(data.len());
        buf.copy_from_slice(data);
        Job {
            cookie,
            command: Command::Write {
                offset,
                length: data.len() as u32,
                durability: durability(fua),
            },
            payload: Some(buf),
        }
    }

    fn read(&self, cookie: u64, offset: u64, length: u32) -> Job {
        Job {
            cookie,
            command: Command::Read { offset, length },
            payload: Some(self.pool.get(length as usize)),
        }
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("img")).unwrap()
    }

    /// Blocks whose bits are in the bitmap file (what survives a crash).
    fn bits_on_disk(&self) -> Vec<u64> {
        let (bits, _) = ChangedBlockBitmap::load_recovering(self.dir.path().join("d.cbt")).unwrap();
        bits.iter_runs().flat_map(|(f, n)| f..f + n).collect()
    }
}

fn job(cookie: u64, command: Command) -> Job {
    Job {
        cookie,
        command,
        payload: None,
    }
}

/// Replies by cookie: NBD errno (0 for success) and the data of a read.
type Replies = BTreeMap<u64, (u32, Option<Vec<u8>>)>;

/// (cookie, NBD errno or 0, data of a read).
fn outcome(reply: Reply) -> (u64, u32, Option<Vec<u8>>) {
    match reply {
        Reply::Done {
            cookie,
            result: Ok(()),
        } => (cookie, 0, None),
        Reply::Done {
            cookie,
            result: Err(r),
        } => (cookie, r.errno as u32, None),
        Reply::Read { cookie, data, .. } => (cookie, 0, Some(data.to_vec())),
        Reply::BlockStatus { cookie, payload } => (cookie, 0, Some(payload.to_vec())),
    }
}

/// The io thread of one connection, fed directly (no socket), with its trace.
struct Engine {
    jobs: Option<SyncSender<Job>>,
    replies: Receiver<Reply>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<io::Result<()>>>,
    trace: Trace,
}

impl Engine {
    fn start(export: &Arc<Export>) -> Engine {
        let wake = Arc::new(Wake::new().unwrap());
        let ring = Ring::new(&export.backing, &wake).unwrap();
        let (job_tx, job_rx) = mpsc::sync_channel(JOB_QUEUE_DEPTH);
        let (reply_tx, reply_rx) = mpsc::sync_channel(REPLY_QUEUE_DEPTH);
        let trace = Trace::default();
        let thread = {
            let (export, wake, trace) = (Arc::clone(export), Arc::clone(&wake), trace.clone());
            std::thread::spawn(move || run_traced(ring, &export, job_rx, reply_tx, &wake, trace))
        };
        Engine {
            jobs: Some(job_tx),
            replies: reply_rx,
            wake,
            thread: Some(thread),
            trace,
        }
    }

    fn send(&self, job: Job) {
        self.jobs.as_ref().unwrap().send(job).unwrap();
        self.wake.notify();
    }

    fn reply(&self) -> (u64, u32, Option<Vec<u8>>) {
        outcome(
            self.replies
                .recv_timeout(Duration::from_secs(20))
                .expect("a reply within 20 s"),
        )
    }

    fn replies(&self, n: usize) -> Replies {
        (0..n)
            .map(|_| {
                let (c, e, d) = self.reply();
                (c, (e, d))
            })
            .collect()
    }

    /// Closes the job queue, waits for the thread, returns the trace.
    fn finish(mut self) -> Vec<(u64, Ev)> {
        drop(self.jobs.take());
        self.wake.ring();
        self.thread.take().unwrap().join().unwrap().unwrap();
        self.trace.lock().unwrap().clone()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // A failed test: let the thread end on its own (not joined: it may be stuck).
        drop(self.jobs.take());
        self.wake.ring();
    }
}

/// Positions of `cookie`'s events, in order.
fn events(trace: &[(u64, Ev)], cookie: u64) -> Vec<(usize, Ev)> {
    trace
        .iter()
        .enumerate()
        .filter(|(_, (c, _))| *c == cookie)
        .map(|(i, (_, e))| (i, *e))
        .collect()
}

fn first(trace: &[(u64, Ev)], cookie: u64, ev: Ev) -> usize {
    events(trace, cookie)
        .into_iter()
        .find(|(_, e)| *e == ev)
        .unwrap_or_else(|| panic!("request {cookie}: no {ev:?} in {:?}", events(trace, cookie)))
        .0
}

fn last(trace: &[(u64, Ev)], cookie: u64, ev: Ev) -> usize {
    events(trace, cookie)
        .into_iter()
        .rev()
        .find(|(_, e)| *e == ev)
        .unwrap_or_else(|| panic!("request {cookie}: no {ev:?} in {:?}", events(trace, cookie)))
        .0
}

/// `cookie`'s events include `order` as a subsequence.
fn assert_in_order(trace: &[(u64, Ev)], cookie: u64, order: &[Ev]) {
    let evs = events(trace, cookie);
    let mut it = evs.iter();
    for want in order {
        assert!(
            it.any(|(_, e)| e == want),
            "request {cookie}: {want:?} missing or out of order in {evs:?}"
        );
    }
}

/// Write-intent order of a write: in the gate, marked, then written; the gate left
/// only once the write completed; (FUA) synced after; replied last.
fn assert_write_order(trace: &[(u64, Ev)], cookie: u64, fua: bool, kind: Kind) {
    let mut order = vec![
        Ev::Entered,
        Ev::Marked,
        Ev::Submitted(kind),
        Ev::Completed(kind),
        Ev::Left,
    ];
    if fua {
        order.extend([Ev::Submitted(Kind::Sync), Ev::Completed(Kind::Sync)]);
    }
    order.push(Ev::Replied);
    assert_in_order(trace, cookie, &order);
    assert!(
        last(trace, cookie, Ev::Completed(kind)) < first(trace, cookie, Ev::Left),
        "request {cookie} left the gate before its write completed"
    );
    let replied = first(trace, cookie, Ev::Replied);
    assert!(
        events(trace, cookie).iter().all(|&(i, _)| i <= replied),
        "request {cookie} did something after its reply: {:?}",
        events(trace, cookie)
    );
}

#[test]
fn writes_follow_write_intent_order_and_flush_follows_acknowledged_writes() {
    if unavailable() {
        return;
    }
    let d = disk(20 * MIB);
    let e = Engine::start(&d.export);
    // 48 pipelined writes, none overlapping: 4 KiB, some 256 KiB, every third FUA.
    let write = |i: u64| {
        let len = if i.is_multiple_of(8) {
            256 * KIB
        } else {
            4 * KIB
        };
        (
            i * 320 * KIB + (i % 5) * 512,
            len as usize,
            i.is_multiple_of(3),
        )
    };
    for i in 0..48 {
        let (off, len, fua) = write(i);
        e.send(d.write(i, off, &vec![i as u8 + 100; len], fua));
    }
    let first_batch = e.replies(48);
    assert!(first_batch.values().all(|(errno, _)| *errno == 0));
    // A FLUSH after those replies; then writes and a FLUSH pipelined together.
    e.send(job(1000, Command::Flush));
    assert_eq!(e.reply(), (1000, 0, None));
    for i in 48..56 {
        let (off, len, fua) = write(i);
        e.send(d.write(i, off, &vec![i as u8 + 100; len], fua));
    }
    e.send(job(1001, Command::Flush));
    assert!(e.replies(9).values().all(|(errno, _)| *errno == 0));
    for i in 0..56 {
        let (off, len, _) = write(i);
        e.send(d.read(2000 + i, off, len as u32));
        let (cookie, errno, data) = e.reply();
        assert_eq!((cookie, errno), (2000 + i, 0));
        assert!(
            data.unwrap().iter().all(|&b| b == i as u8 + 100),
            "write {i}"
        );
    }
    let trace = e.finish();

    for i in 0..56 {
        assert_write_order(&trace, i, write(i).2, Kind::Write);
    }
    // FLUSH 1000 came after every reply of the first batch: its fdatasync was
    // submitted after each of those writes completed.
    let flush = first(&trace, 1000, Ev::Submitted(Kind::Sync));
    for i in 0..48 {
        assert!(last(&trace, i, Ev::Completed(Kind::Write)) < flush);
    }
    // In general: a write replied before a FLUSH started is covered by it.
    let flush = first(&trace, 1001, Ev::Submitted(Kind::Sync));
    for i in 0..56 {
        if first(&trace, i, Ev::Replied) < flush {
            assert!(last(&trace, i, Ev::Completed(Kind::Write)) < flush);
        }
    }
    // Every acknowledged write's block is in the bitmap file, and the image has it.
    let bits = d.bits_on_disk();
    let image = d.image();
    for i in 0..56 {
        let (off, len, _) = write(i);
        for b in off / u64::from(BLOCK)..(off + len as u64).div_ceil(u64::from(BLOCK)) {
            assert!(bits.contains(&b), "block {b} of write {i}");
        }
        assert!(image[off as usize..off as usize + len]
            .iter()
            .all(|&b| b == i as u8 + 100));
    }
}

/// The same requests through the thread pool's `execute` and through the ring.
fn both_engines(make: impl Fn() -> Disk, jobs: impl Fn(&Disk) -> Vec<Job>) -> [(Disk, Replies); 2] {
    let sync = make();
    let by_sync: BTreeMap<_, _> = jobs(&sync)
        .into_iter()
        .map(|j| {
            let (c, e, d) = outcome(execute(&sync.export, j));
            (c, (e, d))
        })
        .collect();
    let uring = make();
    let e = Engine::start(&uring.export);
    let list = jobs(&uring);
    let n = list.len();
    // One at a time: results must not depend on the order of overlapping requests.
    let mut by_uring = BTreeMap::new();
    for j in list {
        e.send(j);
        let (c, errno, data) = e.reply();
        by_uring.insert(c, (errno, data));
    }
    assert_eq!(by_uring.len(), n);
    e.finish();
    [(sync, by_sync), (uring, by_uring)]
}

#[test]
fn errors_map_to_the_same_nbd_errors_as_the_thread_pool() {
    if unavailable() {
        return;
    }
    let size = 4 * MIB;
    // Opened read-only: every write, punch and zeroing fails with EBADF.
    let make = || {
        disk_with(size, |path| {
            Backing::from_file(File::open(path).unwrap(), path).unwrap()
        })
    };
    let jobs = |d: &Disk| {
        vec![
            d.write(1, 0, &[7; 4096], false),
            d.write(2, 4096, &[7; 4096], true),
            job(
                3,
                Command::WriteZeroes {
                    offset: 64 * KIB,
                    length: 64 * KIB as u32,
                    mode: ZeroMode::MayPunch,
                    durability: Durability::Cached,
                },
            ),
            job(
                4,
                Command::WriteZeroes {
                    offset: 0,
                    length: 4096,
                    mode: ZeroMode::Allocate,
                    durability: Durability::ForceUnitAccess,
                },
            ),
            job(
                5,
                Command::Trim {
                    offset: 128 * KIB,
                    length: 64 * KIB as u32,
                    durability: Durability::Cached,
                },
            ),
            d.read(6, 8192, 4096),
            job(7, Command::Flush),
            // Past the tracker's range: refused before anything is written.
            d.write(8, size, &[7; 4096], false),
            // The file is shorter than the request: a short read.
            d.read(9, size - 4096, 8192),
            job(10, Command::Cache),
            d.read(11, 0, 0),
        ]
    };
    let [(_, sync), (_, uring)] = both_engines(make, jobs);
    assert_eq!(sync, uring);
    let errno = |c: u64| uring[&c].0;
    for c in [1, 2, 3, 4, 5, 9] {
        assert_eq!(errno(c), NbdErrno::Io as u32, "request {c}");
    }
    assert_eq!(errno(8), NbdErrno::Inval as u32);
    for c in [6, 7, 10, 11] {
        assert_eq!(errno(c), 0, "request {c}");
    }
    let expected: Vec<u8> = (8192..8192 + 4096).map(initial).collect();
    assert_eq!(uring[&6].1.as_deref(), Some(&expected[..]));
}

#[test]
fn os_errors_map_like_the_thread_pool() {
    // The ring reports `-errno`; the refusal is built from the same io::Error the
    // system call would have returned.
    for (errno, nbd) in [
        (libc::ENOSPC, NbdErrno::NoSpc),
        (libc::EDQUOT, NbdErrno::NoSpc),
        (libc::EFBIG, NbdErrno::NoSpc),
        (libc::EPERM, NbdErrno::Perm),
        (libc::EROFS, NbdErrno::Perm),
        (libc::ENOMEM, NbdErrno::NoMem),
        (libc::EINVAL, NbdErrno::Inval),
        (libc::EIO, NbdErrno::Io),
        (libc::EBADF, NbdErrno::Io),
    ] {
        assert_eq!(NbdErrno::from_io(&os_error(-errno)), nbd, "errno {errno}");
    }
    assert!(transient(-libc::EINTR) && transient(-libc::EAGAIN) && !transient(-libc::EIO));
}

#[test]
fn zeroes_and_trim_leave_what_the_thread_pool_leaves() {
    if unavailable() {
        return;
    }
    let size = 16 * MIB;
    let zeroes = |cookie, offset, length: u64, mode, fua| {
        job(
            cookie,
            Command::WriteZeroes {
                offset,
                length: length as u32,
                mode,
                durability: durability(fua),
            },
        )
    };
    let jobs = |d: &Disk| {
        vec![
            zeroes(1, 64 * KIB, 128 * KIB, ZeroMode::MayPunch, false),
            // NO_HOLE: FALLOC_FL_ZERO_RANGE, which tmpfs lacks: zeros are written, in
            // 1 MiB pieces, the last one partial.
            zeroes(2, MIB + 512, 3 * MIB + 5, ZeroMode::Allocate, true),
            zeroes(3, 6 * MIB, 0, ZeroMode::MayPunch, false),
            job(
                4,
                Command::Trim {
                    offset: 8 * MIB,
                    length: 64 * KIB as u32,
                    durability: Durability::ForceUnitAccess,
                },
            ),
            job(
                5,
                Command::Trim {
                    offset: 9 * MIB + 100,
                    length: 5000,
                    durability: Durability::Cached,
                },
            ),
            d.write(6, 10 * MIB, &[9; 0], true),
            Job {
                cookie: 7,
                command: Command::BlockStatus {
                    offset: 0,
                    length: (16 * MIB) as u32,
                    one_extent: false,
                },
                payload: Some(d.pool.get(4 + 8 * 64)),
            },
        ]
    };
    let [(sync_disk, sync), (uring_disk, uring)] = both_engines(|| disk(size), jobs);
    assert_eq!(sync, uring, "same replies, block status included");
    assert!(uring.values().all(|(errno, _)| *errno == 0));
    assert!(
        sync_disk.image() == uring_disk.image(),
        "same image content"
    );
    let runs = |d: &Disk| d.export.tracker.snapshot().iter_runs().collect::<Vec<_>>();
    assert_eq!(runs(&sync_disk), runs(&uring_disk), "same blocks tracked");
    let image = uring_disk.image();
    assert!(image[MIB as usize + 512..(4 * MIB) as usize + 517]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(image[MIB as usize + 511], initial(MIB + 511));
    assert_eq!(image[(4 * MIB) as usize + 517], initial(4 * MIB + 517));
}

/// Holes as `base:allocation` sees them: (offset, length) of each hole in `range`.
fn holes(d: &Disk, offset: u64, len: u32) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut at = offset;
    d.export.backing.extents(offset, len, 1024, |n, flags| {
        if flags != 0 {
            out.push((at, n));
        }
        at += u64::from(n);
    });
    out
}

#[test]
fn while_frozen_trim_is_dropped_zeroes_are_written_and_blocks_preserved() {
    if unavailable() {
        return;
    }
    let size = 8 * MIB;
    let d = disk(size);
    let files = EpochFiles::new(d.dir.path(), "d", 1);
    let frozen =
        FrozenDisk::prepare(files.clone(), &d.export.tracker.blank(), true, false).unwrap();
    assert!(d.export.gate.drain().install(Arc::new(frozen)).is_none());

    let e = Engine::start(&d.export);
    e.send(d.write(1, 4096, &[0xee; 4096], true));
    e.send(job(
        2,
        Command::Trim {
            offset: 2 * MIB,
            length: MIB as u32,
            durability: Durability::ForceUnitAccess,
        },
    ));
    e.send(job(
        3,
        Command::WriteZeroes {
            offset: 4 * MIB,
            length: (2 * MIB + 4096) as u32,
            mode: ZeroMode::MayPunch,
            durability: Durability::Cached,
        },
    ));
    let replies = e.replies(3);
    assert!(replies.values().all(|(errno, _)| *errno == 0));
    let trace = e.finish();
    assert_write_order(&trace, 1, true, Kind::Write);
    assert_write_order(&trace, 3, false, Kind::ZeroFill);
    assert!(
        !events(&trace, 3)
            .iter()
            .any(|(_, ev)| *ev == Ev::Submitted(Kind::Fallocate)),
        "nothing is punched or zero-ranged while frozen"
    );
    // The TRIM: nothing marked, nothing written, but its FUA still synced.
    assert_in_order(
        &trace,
        2,
        &[
            Ev::Entered,
            Ev::Submitted(Kind::Sync),
            Ev::Completed(Kind::Sync),
            Ev::Replied,
        ],
    );
    assert!(!events(&trace, 2).iter().any(|(_, ev)| *ev == Ev::Marked));

    let image = d.image();
    assert!(image[4096..8192].iter().all(|&b| b == 0xee));
    for pos in [2 * MIB, 3 * MIB - 1] {
        assert_eq!(image[pos as usize], initial(pos), "trim dropped");
    }
    assert!(image[(4 * MIB) as usize..(6 * MIB) as usize + 4096]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(holes(&d, 0, size as u32), vec![], "no hole appeared");
    let snapshot = d.export.tracker.snapshot();
    assert!(snapshot.test(0).unwrap(), "the write is tracked");
    assert!(
        !snapshot.test(2 * MIB / u64::from(BLOCK)).unwrap(),
        "trim is not"
    );
    assert!(snapshot.test(4 * MIB / u64::from(BLOCK)).unwrap());
    // Copy-before-write kept the frozen bytes of every overwritten granule.
    let taken = d.export.gate.drain().take().expect("still frozen");
    assert!(!taken.is_broken());
    let scratch = File::open(&files.scratch).unwrap();
    for pos in [4096, 4 * MIB, 6 * MIB + 4095] {
        let mut b = [0u8];
        scratch.read_exact_at(&mut b, pos).unwrap();
        assert_eq!(b[0], initial(pos), "frozen byte at {pos} preserved");
    }
    files.remove();
}

#[test]
fn a_freeze_waits_for_the_rings_writes_and_holds_new_ones() {
    if unavailable() {
        return;
    }
    let d = disk(64 * MIB);
    let e = Engine::start(&d.export);
    for round in 0..5u64 {
        let base = round * 100;
        // A large write that takes a while, then a drain racing it, then more writes.
        e.send(d.write(base + 1, 0, &vec![round as u8; (32 * MIB) as usize], false));
        let drainer = {
            let export = Arc::clone(&d.export);
            let trace = e.trace.clone();
            std::thread::spawn(move || {
                let drained = export.gate.drain();
                trace.lock().unwrap().push((DRAINED, Ev::Left));
                std::thread::sleep(Duration::from_millis(30));
                trace.lock().unwrap().push((RELEASED, Ev::Left));
                drop(drained);
            })
        };
        for i in 2..10 {
            e.send(d.write(
                base + i,
                40 * MIB + i * 4096,
                &[i as u8; 4096],
                i.is_multiple_of(2),
            ));
        }
        let started = Instant::now();
        let replies = e.replies(9);
        assert!(replies.values().all(|(errno, _)| *errno == 0));
        assert!(started.elapsed() < Duration::from_secs(10));
        drainer.join().unwrap();
    }
    let trace = e.finish();
    // Every write that entered before a drain finished had completed before it (its
    // completion is recorded before its pass is dropped), and nobody enters between a
    // drain and its release.
    let writes: Vec<u64> = (0..5)
        .flat_map(|r| (1..10).map(move |i| r * 100 + i))
        .collect();
    let mut drained = false;
    for (i, &(cookie, ev)) in trace.iter().enumerate() {
        match cookie {
            DRAINED => {
                drained = true;
                for &c in &writes {
                    if first(&trace, c, Ev::Entered) < i {
                        assert!(
                            last(&trace, c, Ev::Completed(Kind::Write)) < i,
                            "write {c} was still in flight when the drain finished"
                        );
                    }
                }
            }
            RELEASED => drained = false,
            c if ev == Ev::Entered => assert!(!drained, "write {c} entered a drained gate"),
            _ => {}
        }
    }
    for round in 0..5 {
        for i in 1..10 {
            assert_write_order(
                &trace,
                round * 100 + i,
                i > 1 && i.is_multiple_of(2),
                Kind::Write,
            );
        }
    }
}

#[test]
fn a_client_that_reads_no_replies_does_not_hold_up_a_freeze() {
    if unavailable() {
        return;
    }
    let d = Arc::new(disk(16 * MIB));
    let e = Engine::start(&d.export);
    let jobs = e.jobs.clone().unwrap();
    let wake = Arc::clone(&e.wake);
    let n = 300u64;
    let sender = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            for i in 0..n {
                jobs.send(d.write(i, i * 4096, &[1; 4096], false)).unwrap();
                wake.notify();
            }
        })
    };
    // Replies fill the writer's queue, then the io thread's backlog, then it waits for
    // the writer, then the job queue fills and the sender blocks.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!sender.is_finished(), "the pipeline should be full");
    let started = Instant::now();
    drop(d.export.gate.drain());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the freeze waited for the client: {:?}",
        started.elapsed()
    );
    assert_eq!(e.replies(n as usize).len(), n as usize);
    sender.join().unwrap();
    e.finish();
}

#[test]
fn writes_waiting_for_their_marks_share_bitmap_syncs() {
    if unavailable() {
        return;
    }
    // 64 pipelined writes, each to a block no write touched before: every one needs
    // a bitmap sync before its write may start. The io thread parks them and goes on,
    // so the mark waiter's syncs cover many at once.
    let d = disk(64 * MIB);
    let e = Engine::start(&d.export);
    let before = d.export.tracker.status().bitmap_syncs;
    for i in 0..64 {
        e.send(d.write(i, i * u64::from(BLOCK), &[3; 4096], i.is_multiple_of(4)));
    }
    assert!(e.replies(64).values().all(|(errno, _)| *errno == 0));
    let trace = e.finish();
    let syncs = d.export.tracker.status().bitmap_syncs - before;
    eprintln!("64 new blocks, {syncs} bitmap syncs");
    assert!(syncs < 32, "{syncs} bitmap syncs for 64 marks");
    for i in 0..64 {
        assert_write_order(&trace, i, i.is_multiple_of(4), Kind::Write);
    }
    let bits = d.bits_on_disk();
    assert_eq!(bits, (0..64).collect::<Vec<_>>());
}

#[test]
fn the_probe_passes_and_rings_set_up_on_this_kernel() {
    if unavailable() {
        return;
    }
    let d = disk(MIB);
    let wake = Wake::new().unwrap();
    let ring = Ring::new(&d.export.backing, &wake).unwrap();
    // The machines ferry runs on are Linux 6.1+, where the tuned ring is taken.
    eprintln!(
        "single-issuer ring with deferred task work: {}",
        ring.disabled
    );
}
