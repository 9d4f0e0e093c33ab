//! Block I/O shared by the source engine (reads) and the target writer (writes).
//!
//! - [`Disk`] opens an image file or block device — a source read-only, a replica
//!   read-write and created or grown as needed — with `O_DIRECT` whenever the file system
//!   takes it, and zeroes ranges the cheapest way the disk allows.
//! - [`data_extents`] walks the allocated parts of a sparse image, so initial
//!   replication skips holes without reading them.
//! - [`BlockEngine`] is the seam to the kernel, with two engines side by side:
//!   [`UringEngine`] (io_uring with registered files and buffers) and [`SyncEngine`]
//!   (`pread`/`pwrite`, the fallback and the reference in differential tests).
//!   [`open_engine`] picks one.
//!
//! # O_DIRECT alignment
//!
//! On a disk opened with `O_DIRECT` ([`Disk::is_direct`]) the buffer address, the offset
//! and the length of every request must be multiples of the device's logical block size
//! (512 or 4096 bytes); the kernel fails anything else with `EINVAL`. ferry keeps all
//! three multiples of [`DIRECT_IO_ALIGN`], which satisfies every device. The only
//! exception is the tail of a disk whose size is not a multiple of it: a read there
//! completes short with the bytes up to the end (see [`BlockEngine`] for the rules).

mod aligned;
mod disk;
mod engine;
mod engine_sync;
mod engine_uring;
mod error;
mod extents;
#[cfg(test)]
mod test_support;

use std::fmt;
use std::os::fd::RawFd;
use std::str::FromStr;

use tracing::warn;

pub use aligned::AlignedBuf;
pub use disk::{identify_path, CacheMode, Disk, DiskKind, DiskOp, ReplicaState};
pub use engine::{BlockEngine, Completion, DiskId, IoBuffer, IoOp, TRANSIENT_RETRIES_MAX};
pub use engine_sync::SyncEngine;
pub use engine_uring::{RingSetup, UringEngine};
pub use error::IoError;
pub use extents::{data_extents, DataExtents};

/// Alignment ferry uses for buffer addresses, offsets and lengths of direct I/O: the
/// largest logical block size of common devices (4Kn disks), hence valid for all of them.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Upper bound on an engine's queue depth. io_uring allows 32768 entries, but at
/// ferry's request sizes (up to 1 MiB) 4096 requests in flight already pin 4 GiB of
/// buffers, far past what saturates any device; a larger value is a configuration mistake.
pub const QUEUE_DEPTH_MAX: usize = 4096;

/// Upper bound on the disks of one engine: the registered-file limit of the oldest
/// kernels that can run the engine (IORING_MAX_FIXED_FILES was 32768 before 5.15).
pub const DISKS_MAX: usize = 1 << 15;

/// Buffers to register with an io_uring engine for `READ_FIXED`/`WRITE_FIXED`: index `i`
/// of the slice is the buffer that [`IoBuffer::fixed_index`] `Some(i)` refers to.
#[derive(Clone, Copy)]
pub struct FixedBuffers<'a> {
    iovecs: &'a [libc::iovec],
}

impl<'a> FixedBuffers<'a> {
    /// Wraps the iovecs of memory the caller owns, typically a buffer pool.
    ///
    /// # Safety
    ///
    /// The kernel pins the described pages at registration and reads and writes them for
    /// I/O on buffers whose `fixed_index` names them. The caller promises that each
    /// `iovec` describes memory valid for reads and writes of `iov_len` bytes that stays
    /// allocated — not freed, unmapped or reused — until every engine built with these
    /// buffers has been dropped, and that the memory is accessed only through
    /// [`IoBuffer`] values following that trait's contract.
    pub unsafe fn new(iovecs: &'a [libc::iovec]) -> FixedBuffers<'a> {
        FixedBuffers { iovecs }
    }

    /// The registered iovecs.
    pub fn iovecs(&self) -> &'a [libc::iovec] {
        self.iovecs
    }
}

impl fmt::Debug for FixedBuffers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedBuffers")
            .field("count", &self.iovecs.len())
            .finish()
    }
}

/// Which engine [`open_engine`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring, or an error saying why it cannot be used.
    Uring,
    /// Blocking `pread`/`pwrite`.
    Sync,
    /// io_uring if it can be set up here, otherwise the sync engine with a warning.
    #[default]
    Auto,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
            EngineKind::Auto => "auto",
        })
    }
}

impl FromStr for EngineKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            "auto" => Ok(EngineKind::Auto),
            other => Err(format!(
                "unknown I/O engine {other:?}; expected \"uring\", \"sync\" or \"auto\""
            )),
        }
    }
}

/// An engine chosen at run time. Dispatch is a `match`, not a virtual call.
// One engine lives on each I/O thread, built once; boxing the larger variant would save
// a few hundred bytes of stack at the cost of an indirection on every request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Engine<B: IoBuffer> {
    Uring(UringEngine<B>),
    Sync(SyncEngine<B>),
}

/// Builds the engine `kind` asks for over `files` (indexed by [`DiskId`]).
///
/// `fixed_buffers` is registered with an io_uring engine and ignored by the sync engine.
/// With [`EngineKind::Auto`], an io_uring that cannot be set up (disabled, too old,
/// limited) falls back to the sync engine with a `warn!` naming why.
pub fn open_engine<B: IoBuffer>(
    kind: EngineKind,
    queue_depth: usize,
    files: &[RawFd],
    fixed_buffers: Option<FixedBuffers<'_>>,
) -> Result<Engine<B>, IoError> {
    match kind {
        EngineKind::Uring => UringEngine::new(queue_depth, files, fixed_buffers).map(Engine::Uring),
        EngineKind::Sync => SyncEngine::new(queue_depth, files).map(Engine::Sync),
        EngineKind::Auto => match UringEngine::new(queue_depth, files, fixed_buffers) {
            Ok(engine) => Ok(Engine::Uring(engine)),
            Err(err) if err.is_uring_unavailable() => {
                warn!(
                    %err,
                    "io_uring is unavailable; falling back to the synchronous engine \
                     (slower: one blocking system call per request)"
                );
                SyncEngine::new(queue_depth, files).map(Engine::Sync)
            }
            Err(err) => Err(err),
        },
    }
}

/// What an engine will register, for a start-up probe: `slots` buffers of
/// `slot_bytes` each, as one session's buffer pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeShape {
    pub queue_depth: usize,
    pub slots: usize,
    pub slot_bytes: usize,
}

/// Checks at start-up, before anything is served, that the engine `kind` asks for can
/// be built here with the buffers of `shape` registered — the things that fail only
/// when the first session builds its engine: io_uring disabled or filtered, opcodes
/// missing, or a locked-memory limit (RLIMIT_MEMLOCK) too low to pin the buffers.
///
/// `Uring` returns the error (with its likely fix) so the caller can refuse to start.
/// `Auto` returns `Ok(Sync)` when io_uring cannot work, after a warning naming why,
/// and `Ok(Uring)` when it can; `Sync` needs no probe.
pub fn probe_engine(kind: EngineKind, shape: ProbeShape) -> Result<EngineKind, IoError> {
    if kind == EngineKind::Sync {
        return Ok(EngineKind::Sync);
    }
    // Any descriptor can be registered; the probe submits no request.
    let null = match std::fs::File::open("/dev/null") {
        Ok(file) => file,
        Err(source) => {
            let err = IoError::EngineFile {
                disk: DiskId(0),
                source,
            };
            return probe_failed(kind, err);
        }
    };
    let mut bufs: Vec<AlignedBuf> = (0..shape.slots)
        .map(|_| AlignedBuf::zeroed(shape.slot_bytes.max(DIRECT_IO_ALIGN)))
        .collect();
    let iovecs: Vec<libc::iovec> = bufs.iter_mut().map(AlignedBuf::iovec).collect();
    // SAFETY: the buffers' memory lives in `bufs`, untouched, until after the probe
    // engine is dropped at the end of the match below.
    let fixed = unsafe { FixedBuffers::new(&iovecs) };
    let probed = UringEngine::<AlignedBuf>::new(
        shape.queue_depth,
        &[std::os::fd::AsRawFd::as_raw_fd(&null)],
        Some(fixed),
    );
    let result = match probed {
        Ok(engine) => {
            drop(engine);
            Ok(EngineKind::Uring)
        }
        Err(err) => probe_failed(kind, err),
    };
    drop(bufs);
    result
}

/// `Auto` never fails a start-up over the probe: sessions decide for themselves.
fn probe_failed(kind: EngineKind, err: IoError) -> Result<EngineKind, IoError> {
    match kind {
        EngineKind::Auto => {
            warn!(
                %err,
                "io_uring cannot work here; the synchronous engine will be used \
                 (slower: one blocking system call per request)"
            );
            Ok(EngineKind::Sync)
        }
        _ => Err(err),
    }
}

/// Checks what both engines require of their configuration.
fn check_engine_config(queue_depth: usize, files: &[RawFd]) -> Result<(), IoError> {
    let reason = if queue_depth == 0 {
        "queue depth must be at least 1"
    } else if queue_depth > QUEUE_DEPTH_MAX {
        "queue depth exceeds QUEUE_DEPTH_MAX (4096)"
    } else if files.is_empty() {
        "an engine needs at least one disk"
    } else if files.len() > DISKS_MAX {
        "more disks than DISKS_MAX (32768) in one engine"
    } else {
        return Ok(());
    };
    Err(IoError::InvalidConfig { reason })
}

impl<B: IoBuffer> BlockEngine<B> for Engine<B> {
    fn submit_read(
        &mut self,
        disk: DiskId,
        buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)> {
        match self {
            Engine::Uring(engine) => engine.submit_read(disk, buf, offset, len, tag),
            Engine::Sync(engine) => engine.submit_read(disk, buf, offset, len, tag),
        }
    }

    fn submit_write(
        &mut self,
        disk: DiskId,
        buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)> {
        match self {
            Engine::Uring(engine) => engine.submit_write(disk, buf, offset, len, tag),
            Engine::Sync(engine) => engine.submit_write(disk, buf, offset, len, tag),
        }
    }

    fn submit_fsync(&mut self, disk: DiskId, tag: u64) -> Result<(), IoError> {
        match self {
            Engine::Uring(engine) => engine.submit_fsync(disk, tag),
            Engine::Sync(engine) => engine.submit_fsync(disk, tag),
        }
    }

    fn wait(&mut self, min_complete: usize, out: &mut Vec<Completion<B>>) -> Result<(), IoError> {
        match self {
            Engine::Uring(engine) => engine.wait(min_complete, out),
            Engine::Sync(engine) => engine.wait(min_complete, out),
        }
    }

    fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(engine) => engine.in_flight(),
            Engine::Sync(engine) => engine.in_flight(),
        }
    }

    fn queue_depth(&self) -> usize {
        match self {
            Engine::Uring(engine) => engine.queue_depth(),
            Engine::Sync(engine) => engine.queue_depth(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Engine::Uring(engine) => engine.name(),
            Engine::Sync(engine) => engine.name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::FileExt;

    use super::test_support::{seed, uring_unavailable, Rng};
    use super::*;

    #[test]
    fn engine_kinds_parse_and_open() {
        assert_eq!("auto".parse::<EngineKind>(), Ok(EngineKind::Auto));
        assert_eq!("uring".parse::<EngineKind>(), Ok(EngineKind::Uring));
        assert!("aio".parse::<EngineKind>().is_err());

        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open_replica(dir.path().join("r.img"), 1 << 20).unwrap();
        let files = [disk.fd()];
        let sync = open_engine::<AlignedBuf>(EngineKind::Sync, 8, &files, None).unwrap();
        assert_eq!(sync.name(), "sync");
        let auto = open_engine::<AlignedBuf>(EngineKind::Auto, 8, &files, None).unwrap();
        match uring_unavailable() {
            None => assert_eq!(auto.name(), "io_uring"),
            Some(why) => {
                ferry_io::require::skip(
                    ferry_io::require::Feature::Uring,
                    format!("{why}; checking the fallback only"),
                );
                assert_eq!(auto.name(), "sync");
            }
        }
        for depth in [0, QUEUE_DEPTH_MAX + 1] {
            let err = open_engine::<AlignedBuf>(EngineKind::Auto, depth, &files, None);
            assert!(matches!(err, Err(IoError::InvalidConfig { .. })));
        }
        let err = open_engine::<AlignedBuf>(EngineKind::Sync, 8, &[], None);
        assert!(matches!(err, Err(IoError::InvalidConfig { .. })));
    }

    #[test]
    fn probe_answers_which_engine_sessions_will_get() {
        let shape = ProbeShape {
            queue_depth: 8,
            slots: 4,
            slot_bytes: 64 << 10,
        };
        assert_eq!(
            probe_engine(EngineKind::Sync, shape).unwrap(),
            EngineKind::Sync
        );
        match uring_unavailable() {
            None => {
                assert_eq!(
                    probe_engine(EngineKind::Uring, shape).unwrap(),
                    EngineKind::Uring
                );
                assert_eq!(
                    probe_engine(EngineKind::Auto, shape).unwrap(),
                    EngineKind::Uring
                );
            }
            Some(why) => {
                let err = probe_engine(EngineKind::Uring, shape).unwrap_err();
                assert!(err.is_uring_unavailable(), "{err}");
                assert_eq!(
                    probe_engine(EngineKind::Auto, shape).unwrap(),
                    EngineKind::Sync
                );
                ferry_io::require::skip(ferry_io::require::Feature::Uring, why);
            }
        }
    }

    /// Bytes of each differential-test disk: 1024 blocks, so random requests collide often.
    const DIFF_DISK_BYTES: u64 = 4 << 20;
    const DIFF_BLOCK: u64 = 4096;
    /// Largest request: 16 blocks, so requests straddle each other.
    const DIFF_MAX_BLOCKS: u64 = 16;
    const DIFF_QUEUE_DEPTH: usize = 16;
    const DIFF_OPS: usize = if cfg!(miri) { 50 } else { 3000 };

    /// A request of the differential run still in flight in the io_uring engine.
    struct Pending {
        offset: u64,
        len: u64,
        /// What a read must return (the model's bytes at submission); `None` for writes.
        expected: Option<Vec<u8>>,
    }

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    /// Drives one random sequence of writes, reads and fdatasyncs through the io_uring
    /// engine (up to its queue depth in flight, half the buffers registered) and the sync
    /// engine onto two O_DIRECT replica files, checks every read against an in-memory
    /// model, and at the end checks that both files equal the model byte for byte.
    #[test]
    fn differential_uring_vs_sync() {
        if let Some(why) = uring_unavailable() {
            ferry_io::require::skip(ferry_io::require::Feature::Uring, why);
            return;
        }
        let seed = seed();
        eprintln!("differential seed {seed} (rerun with FERRY_TEST_SEED={seed})");
        let mut rng = Rng::new(seed);

        let dir = tempfile::tempdir().unwrap();
        let (uring_disk, _) =
            Disk::open_replica(dir.path().join("uring.img"), DIFF_DISK_BYTES).unwrap();
        let (sync_disk, _) =
            Disk::open_replica(dir.path().join("sync.img"), DIFF_DISK_BYTES).unwrap();
        assert!(uring_disk.is_direct() && sync_disk.is_direct());

        let request_max = (DIFF_MAX_BLOCKS * DIFF_BLOCK) as usize;
        // The io_uring engine's buffers, registered before the engine exists and
        // dropped after it.
        let mut uring_bufs: Vec<AlignedBuf> = (0..DIFF_QUEUE_DEPTH)
            .map(|_| AlignedBuf::zeroed(request_max))
            .collect();
        let iovecs: Vec<libc::iovec> = uring_bufs.iter_mut().map(|b| b.iovec()).collect();
        for (index, buf) in uring_bufs.iter_mut().enumerate() {
            // Odd buffers stay unregistered to exercise READ/WRITE beside the FIXED ops.
            buf.set_fixed_index((index % 2 == 0).then_some(index as u16));
        }
        // SAFETY: `uring_bufs` owns the memory and outlives `uring` (dropped explicitly
        // below, before the buffers); the memory is touched only through those buffers.
        let fixed = unsafe { FixedBuffers::new(&iovecs) };
        let mut uring =
            UringEngine::new(DIFF_QUEUE_DEPTH, &[uring_disk.fd()], Some(fixed)).unwrap();
        let mut sync = SyncEngine::new(DIFF_QUEUE_DEPTH, &[sync_disk.fd()]).unwrap();
        let mut sync_buf = Some(AlignedBuf::zeroed(request_max));

        let mut model = vec![0u8; DIFF_DISK_BYTES as usize];
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut done = Vec::with_capacity(DIFF_QUEUE_DEPTH);
        let mut reads_checked = 0usize;

        let mut reap = |uring: &mut UringEngine<AlignedBuf>,
                        bufs: &mut Vec<AlignedBuf>,
                        pending: &mut HashMap<u64, Pending>,
                        min: usize| {
            done.clear();
            uring.wait(min, &mut done).unwrap();
            for completion in done.drain(..) {
                let request = pending.remove(&completion.tag).expect("unknown tag");
                let bytes = completion.result.unwrap_or_else(|err| {
                    panic!(
                        "seed {seed}: io_uring request {} failed: {err}",
                        completion.tag
                    )
                });
                if let Some(buf) = completion.buf {
                    assert_eq!(u64::from(bytes), request.len, "seed {seed}: short transfer");
                    if let Some(expected) = &request.expected {
                        assert!(
                            buf[..expected.len()] == expected[..],
                            "seed {seed}: io_uring read of {} bytes at {} differs from the model",
                            request.len,
                            request.offset
                        );
                        reads_checked += 1;
                    }
                    bufs.push(buf);
                }
            }
        };

        for tag in 0..DIFF_OPS as u64 {
            let roll = rng.below(100);
            if roll < 5 {
                if uring.in_flight() == DIFF_QUEUE_DEPTH {
                    reap(&mut uring, &mut uring_bufs, &mut pending, 1);
                }
                uring.submit_fsync(DiskId(0), tag).unwrap();
                pending.insert(
                    tag,
                    Pending {
                        offset: 0,
                        len: 0,
                        expected: None,
                    },
                );
                sync.submit_fsync(DiskId(0), tag).unwrap();
                let mut sync_done = Vec::new();
                sync.wait(1, &mut sync_done).unwrap();
                assert!(matches!(sync_done[0].result, Ok(0)));
                continue;
            }
            let blocks = 1 + rng.below(DIFF_MAX_BLOCKS);
            let first = rng.below(DIFF_DISK_BYTES / DIFF_BLOCK - blocks + 1);
            let (offset, len) = (first * DIFF_BLOCK, blocks * DIFF_BLOCK);
            let range = (offset, len);
            let is_write = roll < 60;

            // Requests in flight together must not overlap (their order is undefined),
            // and the engine takes at most queue-depth requests.
            while uring.in_flight() == DIFF_QUEUE_DEPTH
                || pending
                    .values()
                    .any(|p| p.len > 0 && overlaps(range, (p.offset, p.len)))
            {
                reap(&mut uring, &mut uring_bufs, &mut pending, 1);
            }
            let mut ubuf = uring_bufs.pop().expect("a free buffer per free slot");
            let mut sbuf = sync_buf.take().unwrap();
            let span = offset as usize..(offset + len) as usize;
            if is_write {
                rng.fill(&mut ubuf[..len as usize]);
                sbuf[..len as usize].copy_from_slice(&ubuf[..len as usize]);
                model[span].copy_from_slice(&ubuf[..len as usize]);
                uring
                    .submit_write(DiskId(0), ubuf, offset, len as u32, tag)
                    .map_err(|(err, _)| err)
                    .unwrap();
                sync.submit_write(DiskId(0), sbuf, offset, len as u32, tag)
                    .map_err(|(err, _)| err)
                    .unwrap();
                pending.insert(
                    tag,
                    Pending {
                        offset,
                        len,
                        expected: None,
                    },
                );
            } else {
                let expected = model[span].to_vec();
                uring
                    .submit_read(DiskId(0), ubuf, offset, len as u32, tag)
                    .map_err(|(err, _)| err)
                    .unwrap();
                sync.submit_read(DiskId(0), sbuf, offset, len as u32, tag)
                    .map_err(|(err, _)| err)
                    .unwrap();
                pending.insert(
                    tag,
                    Pending {
                        offset,
                        len,
                        expected: Some(expected),
                    },
                );
            }
            let mut sync_done = Vec::with_capacity(1);
            sync.wait(1, &mut sync_done).unwrap();
            let completion = sync_done.pop().unwrap();
            assert_eq!(completion.tag, tag);
            assert_eq!(completion.result.unwrap(), len as u32, "seed {seed}");
            let buf = completion.buf.unwrap();
            if !is_write {
                assert!(
                    buf[..len as usize] == model[offset as usize..(offset + len) as usize],
                    "seed {seed}: sync read of {len} bytes at {offset} differs from the model"
                );
            }
            sync_buf = Some(buf);
        }
        while uring.in_flight() > 0 {
            let in_flight = uring.in_flight();
            reap(&mut uring, &mut uring_bufs, &mut pending, in_flight);
        }
        assert!(pending.is_empty());
        assert!(
            reads_checked > DIFF_OPS / 10,
            "only {reads_checked} io_uring reads checked"
        );
        drop(uring);
        drop(uring_bufs);

        for disk in [&uring_disk, &sync_disk] {
            let mut bytes = AlignedBuf::zeroed(DIFF_DISK_BYTES as usize);
            let file = std::fs::File::open(disk.path()).unwrap();
            file.read_exact_at(&mut bytes, 0).unwrap();
            if let Some(at) = bytes.iter().zip(&model).position(|(a, b)| a != b) {
                panic!(
                    "seed {seed}: {} differs from the model at byte {at}",
                    disk.path().display()
                );
            }
        }
    }
}
