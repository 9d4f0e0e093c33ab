//! The source data path: one io_uring reader thread, `workers` hash/compress threads and
//! the sender (the calling thread), joined by SPSC rings of buffer descriptors.
//!
//! ```text
//!            input pool (registered, io_size slots)
//!   plan ─▶ reader ──ring──▶ worker 0 ──ring──▶ sender ─▶ TCP
//!            (uring)  ╲──ring──▶ worker 1 ──ring──╱   │
//!              ▲                                      │ releases input slots
//!              └──────────────── free ring ◀─────────┘ and worker output slots
//! ```
//!
//! Ownership: a [`Slot`] is owned by exactly one stage at a time — the reader from
//! allocation until its read completes, then the worker, then the sender, which returns
//! it through the pool's free ring after the bytes are on the socket. The reader hands
//! messages on in plan order (a read that completes early, or a zero run, waits until
//! everything planned before it went), messages are assigned to workers round-robin (a
//! run of consecutive messages per turn when workers keep compression streams) and the
//! sender takes them back in the same rotation, so frames leave in plan order: each
//! disk's ranges in increasing offset order, as the protocol requires.
//!
//! Termination is by abandonment: the reader drops its ring producers when the plan is
//! exhausted, each worker drops its own when its input ring is drained, and the sender
//! stops when the next ring in the rotation is abandoned and empty. On error any stage
//! drops its ends and the cascade unblocks the others.
//!
//! An abandoned ring alone does not mean "done": a stage that panicked drops its ends
//! too. So every stage runs under `catch_unwind`, records its outcome — the error or
//! panic in [`Failure`], a clean end of its input in [`Finished`] — and only then drops
//! its ring ends; the sender ends the stream only at the ring of a worker that finished,
//! after checking every other ring is drained as well, and every thread's `join` result
//! is checked. Anything else fails the epoch, naming the stage, and the Commit frame is
//! never sent.
//!
//! Failpoints (debug builds, `FERRY_FAILPOINTS`, see `ferry_io::failpoint`):
//! `source.worker.panic` panics a worker when it takes its N-th message (one per planned
//! read or zero run, counted over all workers).

use std::any::Any;
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ferry_ringbuf::pool::{BufferPool, PoolAlloc, PoolReturn, Slot};
use ferry_ringbuf::spsc;
use filter_driver_shim_contract::epoch::EpochView;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::plan::PlanItem;
use super::SourceError;
use crate::config::{Compression, COMPRESSION_LEVEL_RANGE};
use crate::io::{self, BlockEngine, Completion, EngineKind};
use crate::protocol::zstream::StreamEncoder;
use crate::protocol::{
    block_hash, is_zero, BlockRecord, Codec, DataHeader, DiskRun, FrameKind, FrameWriter,
    HashesHeader, ManifestBuilder, BLOCK_RECORD_LEN, MAX_STREAMS, PAYLOAD_ALIGN, ZERO_BLOCK_HASH,
};

/// What the pipeline produces for each planned read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Data frames carrying the blocks (zero blocks as zero records).
    Data,
    /// Hashes frames only (the first half of a seeded sync).
    Hashes,
}

/// Per-disk facts the reader and workers need.
#[derive(Debug, Clone, Copy)]
pub struct DiskInfo<'a> {
    pub fd: RawFd,
    pub disk_size: u64,
    /// The replica is known to be all zeros: zero blocks need not travel at all.
    pub replica_zeroed: bool,
    /// The disk is served by a running shim and this is its frozen epoch: every read
    /// is settled against it so that no write after the freeze leaks in.
    pub frozen: Option<&'a EpochView>,
}

/// Tuning of one pipeline run.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub block_size: usize,
    pub io_size: usize,
    pub queue_depth: usize,
    pub workers: usize,
    /// None, a fixed zstd level, or `auto` (see [`auto`]).
    pub compression: Compression,
    pub engine: EngineKind,
    pub output: Output,
    /// The session's socket: checked for readability before each frame, since the
    /// target speaks during a stream only to say why it stopped.
    pub watch_fd: Option<RawFd>,
    /// The bandwidth limit the sender pays every frame into.
    pub throttle: Option<std::sync::Arc<super::throttle::Throttle>>,
    /// The target takes compression streams (protocol 4): each worker compresses its
    /// blocks as one stream, each block with those before it as context (see
    /// [`crate::protocol::zstream`]).
    pub streams: bool,
}

/// Counters the sender keeps.
#[derive(Debug, Default, Clone, Copy)]
pub struct PipelineStats {
    /// Bytes written to the socket (headers included).
    pub bytes_sent: u64,
    /// Blocks whose data travelled.
    pub blocks_sent: u64,
    /// Blocks that travelled as zero records or runs.
    pub zero_blocks: u64,
    /// Bytes read from the source disks.
    pub bytes_read: u64,
    /// Uncompressed bytes of the blocks that travelled.
    pub bytes_payload_logical: u64,
    /// Seconds the sender slept for the bandwidth limit.
    pub throttled_s: f64,
    /// Data frames whose blocks were not compressed.
    pub frames_raw: u64,
    /// Data frames compressed, per zstd level (index: level minus the lowest level of
    /// [`COMPRESSION_LEVEL_RANGE`]); see [`PipelineStats::zstd_frames`].
    pub frames_zstd: [u64; ZSTD_LEVELS],
}

/// Number of zstd levels a frame can be compressed at.
pub const ZSTD_LEVELS: usize =
    (*COMPRESSION_LEVEL_RANGE.end() - *COMPRESSION_LEVEL_RANGE.start() + 1) as usize;

impl PipelineStats {
    /// Data frames compressed, as (zstd level, frames), for the levels used.
    pub fn zstd_frames(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        (*COMPRESSION_LEVEL_RANGE.start()..)
            .zip(self.frames_zstd.iter().copied())
            .filter(|&(_, n)| n > 0)
    }

    /// Counts one Data frame encoded at `level` (`None`: not compressed).
    fn count_frame(&mut self, level: Option<i32>) {
        let slot = level.and_then(|l| {
            usize::try_from(l - *COMPRESSION_LEVEL_RANGE.start())
                .ok()
                .filter(|&i| i < ZSTD_LEVELS)
        });
        match slot {
            Some(i) => self.frames_zstd[i] += 1,
            None => self.frames_raw += 1,
        }
    }
}

/// Slots in the reader's pool beyond the queue depth: enough for every worker to hold
/// one input and one queued message while the sender holds one, so reads never wait on
/// a slot while work is queued behind them.
const EXTRA_INPUT_SLOTS_PER_WORKER: usize = 2;
/// Depth of each reader→worker and worker→sender ring.
const RING_DEPTH: usize = 8;
/// Output slots per worker: one being filled, the ring's worth in flight, one at the
/// sender.
const OUTPUT_SLOTS_PER_WORKER: usize = RING_DEPTH + 2;

/// With compression streams, a worker takes this many bytes of consecutive reads per
/// turn of the rotation (at most a ring's worth): its stream then sees runs of the
/// disk, not every other read. Two streams over an OS image's blocks, alternating by
/// 256 KiB read: 69.4 MB at `zstd -9`; by runs of 1 MiB: 65.3 MB; one stream: 60.1 MB.
/// `ferry sync` at the defaults over 100 Mbit/s, same image: 72.0 MB sent alternating
/// by read, 70.6 MB by runs of 1 MiB, 69.0-69.9 MB by runs of 2 MiB.
const STREAM_RUN_BYTES: usize = 2 << 20;

/// The order in which messages go to the workers and come back from them: the reader
/// and the sender keep one each, alike, so frames leave in the order they were read.
struct Rotation {
    workers: usize,
    /// Messages per worker per turn.
    run: usize,
    at: usize,
    taken: usize,
}

impl Rotation {
    fn new(cfg: &PipelineConfig, workers: usize) -> Self {
        let run = if cfg.streams {
            (STREAM_RUN_BYTES / cfg.io_size).clamp(1, RING_DEPTH)
        } else {
            1
        };
        Self {
            workers,
            run,
            at: 0,
            taken: 0,
        }
    }

    /// The worker whose turn it is.
    fn worker(&self) -> usize {
        self.at
    }

    /// One message went to (or came from) the current worker.
    fn advance(&mut self) {
        self.taken += 1;
        if self.taken == self.run {
            self.taken = 0;
            self.at = (self.at + 1) % self.workers;
        }
    }
}

/// An item of the plan the reader has taken but not yet forwarded.
#[derive(Clone, Copy)]
enum Queued {
    /// A zero run: nothing to read, forwarded when its turn comes.
    Zero { disk: u32, offset: u64, len: u64 },
    /// A read with this tag, forwarded once completed and its turn comes.
    Read(usize),
}

/// What the reader hands a worker for one item of the plan.
enum ReadDone {
    /// A hole: nothing was read.
    ZeroRun { disk: u32, offset: u64, len: u64 },
    /// A completed read: `slot` holds the `len` bytes read at `offset`, settled
    /// against the frozen epoch. The slot goes back to the reader's pool once the
    /// sender is done with it.
    Read {
        disk: u32,
        offset: u64,
        len: u32,
        slot: Slot,
    },
}

/// What a worker hands the sender for one item of the plan.
// A `Read` carries its gathered reads inline: messages move through fixed rings of
// `RING_DEPTH`, and boxing them would allocate per frame on the data path.
#[allow(clippy::large_enum_variant)]
enum Encoded {
    /// A hole: no buffers, sent as a zero run.
    ZeroRun { disk: u32, offset: u64, len: u64 },
    /// A completed read, encoded: `input` holds the `len` bytes read at `offset`,
    /// `output` the frame table and packed payloads (Data) or the whole payload
    /// (Hashes), `gathered` the small reads after it whose blocks the same frame
    /// carries. Every slot goes back to its pool once the sender is done.
    Read {
        disk: u32,
        offset: u64,
        len: u32,
        input: Slot,
        output: Slot,
        frame: Frame,
        gathered: Gathered,
    },
    /// A read whose blocks went out in the frame of an earlier read of the same worker
    /// (see [`Gathered`]): nothing to send, it only keeps its place in the rotation.
    Absorbed,
}

/// Most reads one frame gathers: a worker's turn of the rotation at most.
const GATHER_MAX: usize = RING_DEPTH;

/// The reads after the first that a worker put into the same frame, in plan order:
/// small reads of one disk (a random-write epoch's granules) that were already queued
/// behind it in the worker's turn, as many as the frame's logical bytes (`io_size`)
/// and record table allow. Their slots travel with the frame; each of them is followed
/// by an [`Encoded::Absorbed`] in its place in the rotation.
#[derive(Default)]
struct Gathered {
    n: usize,
    reads: [(u64, u32); GATHER_MAX - 1],
    slots: [Option<Slot>; GATHER_MAX - 1],
}

impl Gathered {
    fn push(&mut self, offset: u64, len: u32, slot: Slot) {
        self.reads[self.n] = (offset, len);
        self.slots[self.n] = Some(slot);
        self.n += 1;
    }

    /// Every read of the frame, the first one included: disk offset and bytes.
    fn pieces<'s>(&'s self, (offset, data): (u64, &'s [u8])) -> Pieces<'s> {
        let mut p = Pieces::one(offset, data);
        for i in 0..self.n {
            let (offset, len) = self.reads[i];
            let slot = self.slots[i]
                .as_ref()
                .expect("a gathered read holds its slot");
            p.at[i + 1] = (offset, &slot.as_slice()[..len as usize]);
            p.n += 1;
        }
        p
    }
}

/// The reads whose blocks one Data frame carries, in disk order: where each starts on
/// the disk, and its bytes.
#[derive(Clone, Copy)]
struct Pieces<'a> {
    n: usize,
    at: [(u64, &'a [u8]); GATHER_MAX],
}

impl<'a> Pieces<'a> {
    fn one(offset: u64, data: &'a [u8]) -> Self {
        let mut p = Pieces {
            n: 1,
            at: [(0, &[][..]); GATHER_MAX],
        };
        p.at[0] = (offset, data);
        p
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &'a [u8])> + '_ {
        self.at[..self.n].iter().copied()
    }

    /// Bytes of all pieces.
    fn len(&self) -> usize {
        self.iter().map(|(_, d)| d.len()).sum()
    }
}

/// What encoding one read produced.
#[derive(Clone, Copy, Default)]
struct Frame {
    /// Bytes of the output slot that hold the frame table (Data) or whole payload
    /// (Hashes).
    table_len: usize,
    records: usize,
    zero_blocks: u64,
    data_blocks: u64,
    logical_bytes: u64,
    /// Payload bytes of the data blocks as they travel (compressed or not).
    stored_bytes: u64,
    /// The zstd level the frame was encoded with; `None`: not compressed.
    level: Option<i32>,
}

impl Encoded {
    /// Gives the message's slots back: `input` to the reader's pool, `output` to the
    /// pool of the worker that encoded it.
    fn release(self, input_return: &mut PoolReturn, output_return: &mut PoolReturn) {
        if let Encoded::Read {
            input,
            output,
            gathered,
            ..
        } = self
        {
            input_return.release(input);
            output_return.release(output);
            gathered
                .slots
                .into_iter()
                .flatten()
                .for_each(|s| input_return.release(s));
        }
    }
}

/// Shared failure slot: the first error wins; all stages watch `stop`.
#[derive(Default)]
struct Failure {
    stop: AtomicBool,
    first: Mutex<Option<SourceError>>,
}

impl Failure {
    fn set(&self, e: SourceError) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        // `Aborted` only says "another stage stopped"; the real cause, which may be
        // reported a moment later, replaces it.
        if first.is_none() || matches!(*first, Some(SourceError::Aborted)) {
            *first = Some(e);
        }
        self.stop.store(true, Ordering::Release);
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
    fn take(&self) -> Option<SourceError> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Which stages reached the end of their input. Each flag is set before the stage drops
/// its ring ends (the drop's release store publishes it), so a consumer that finds a ring
/// abandoned can tell a finished producer from one that died.
struct Finished {
    reader: AtomicBool,
    workers: Vec<AtomicBool>,
}

impl Finished {
    fn new(workers: usize) -> Self {
        Self {
            reader: AtomicBool::new(false),
            workers: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        }
    }
}

/// A stage of the pipeline, as [`SourceError::Stage`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Reader,
    Worker(usize),
    Sender,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reader => f.write_str("reader thread"),
            Self::Worker(i) => write!(f, "worker thread {i}"),
            Self::Sender => f.write_str("sender"),
        }
    }
}

/// How a stage failed without an error of its own.
#[derive(Debug, thiserror::Error)]
pub enum StageFailure {
    /// `message` is the panic's payload, when it was a string.
    #[error("panicked: {message}")]
    Panicked { message: String },
    /// Messages go round-robin, so every worker reaches the end of the plan together.
    #[error("worker thread {worker} still had a frame after worker thread {finished} reached the end of the plan")]
    StrayFrame { worker: usize, finished: usize },
    /// The pipeline ended cleanly, yet buffers of the stage's pool never came back.
    #[error("{missing} of the {slots} buffers of its pool never came back after the last frame was sent")]
    SlotsLost { missing: usize, slots: usize },
}

/// A worker's ends: its input ring, its output ring and its output pool.
struct WorkerEnds {
    rx: spsc::Consumer<ReadDone>,
    otx: spsc::Producer<Encoded>,
    oalloc: PoolAlloc,
}

/// The rings and output pools between the reader, each worker and the sender.
struct Rings {
    to_workers: Vec<spsc::Producer<ReadDone>>,
    from_workers: Vec<spsc::Consumer<Encoded>>,
    worker_parts: Vec<WorkerEnds>,
    /// Per worker, the return end of its output pool (the sender's).
    output_returns: Vec<PoolReturn>,
}

impl Rings {
    fn new(workers: usize, out_size: usize) -> Result<Self, SourceError> {
        let mut rings = Self {
            to_workers: Vec::with_capacity(workers),
            from_workers: Vec::with_capacity(workers),
            worker_parts: Vec::with_capacity(workers),
            output_returns: Vec::with_capacity(workers),
        };
        for _ in 0..workers {
            let (tx, rx) = spsc::channel::<ReadDone>(RING_DEPTH);
            let (otx, orx) = spsc::channel::<Encoded>(RING_DEPTH);
            let (oalloc, oret) =
                BufferPool::new(out_size, OUTPUT_SLOTS_PER_WORKER).map_err(SourceError::Pool)?;
            rings.to_workers.push(tx);
            rings.from_workers.push(orx);
            rings.worker_parts.push(WorkerEnds { rx, otx, oalloc });
            rings.output_returns.push(oret);
        }
        Ok(rings)
    }
}

/// Joins the reader and the workers once the sender has dropped its ring ends (the
/// cascade ends the other stages), then checks their pools. Each stage catches its own
/// panics, so a failed join means one escaped even that.
fn join_stages(
    reader: std::thread::ScopedJoinHandle<'_, PoolAlloc>,
    workers: Vec<std::thread::ScopedJoinHandle<'_, PoolAlloc>>,
    failure: &Failure,
) {
    let mut pools = Vec::with_capacity(1 + workers.len());
    match reader.join() {
        Ok(alloc) => pools.push((Stage::Reader, alloc)),
        Err(panic) => failure.set(panicked(Stage::Reader, panic.as_ref())),
    }
    for (i, w) in workers.into_iter().enumerate() {
        match w.join() {
            Ok(alloc) => pools.push((Stage::Worker(i), alloc)),
            Err(panic) => failure.set(panicked(Stage::Worker(i), panic.as_ref())),
        }
    }
    // Every stage has ended and the sender released what it was sent. After a
    // failure, messages dropped in the rings take their slots with them; after a
    // clean end, none may: a slot still out is a message that went missing.
    if !failure.stopped() {
        for (stage, alloc) in pools {
            check_all_slots_back(stage, alloc, failure);
        }
    }
}

/// Fails the epoch if a slot of the pool behind `alloc` (the pool `stage` allocates
/// from) is not free. Counts them by taking every free slot: the pool is not used again.
fn check_all_slots_back(stage: Stage, mut alloc: PoolAlloc, failure: &Failure) {
    let slots = alloc.slot_count();
    let free = std::iter::from_fn(|| alloc.alloc()).count();
    if free != slots {
        failure.set(SourceError::Stage {
            stage,
            source: StageFailure::SlotsLost {
                missing: slots - free,
                slots,
            },
        });
    }
}

/// The panic of `stage`, as the error that fails the epoch.
fn panicked(stage: Stage, payload: &(dyn Any + Send)) -> SourceError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    SourceError::Stage {
        stage,
        source: StageFailure::Panicked { message },
    }
}

/// Records a stage's outcome in `failure`: its error, or its panic as a stage error.
fn record_outcome(
    stage: Stage,
    outcome: std::thread::Result<Result<(), SourceError>>,
    failure: &Failure,
) -> bool {
    match outcome {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            failure.set(e);
            false
        }
        Err(panic) => {
            failure.set(panicked(stage, panic.as_ref()));
            false
        }
    }
}

/// Largest record table of one frame, padded so that payloads start aligned.
fn table_capacity(cfg: &PipelineConfig) -> usize {
    let blocks = cfg.io_size / cfg.block_size;
    (core::mem::size_of::<DataHeader>() + blocks * BLOCK_RECORD_LEN).next_multiple_of(PAYLOAD_ALIGN)
}

/// A worker's output slot: the largest table, then the blocks' payloads, which take at
/// most `io_size` and the slack a compression stream's chunks may add (see
/// [`encode_data`]), as the target's frame bound allows.
fn output_slot_size(cfg: &PipelineConfig) -> usize {
    (table_capacity(cfg) + cfg.io_size + PAYLOAD_ALIGN).next_multiple_of(PAYLOAD_ALIGN)
}

/// Runs the plan through reader, workers and sender; returns once every frame is on
/// the socket (the caller then commits), or the first failure of any stage. With
/// `manifests` (one per disk), every Data record and Zero frame sent is added to its
/// disk's manifest.
pub fn run<W, P>(
    cfg: &PipelineConfig,
    disks: &[DiskInfo<'_>],
    plan: P,
    writer: &mut FrameWriter<W>,
    manifests: Option<&mut [ManifestBuilder]>,
) -> Result<PipelineStats, SourceError>
where
    W: Write,
    P: Iterator<Item = Result<PlanItem, SourceError>> + Send,
{
    assert!(cfg.workers >= 1 && cfg.queue_depth >= 1);
    assert!(
        cfg.io_size.is_multiple_of(cfg.block_size) && cfg.io_size.is_multiple_of(PAYLOAD_ALIGN)
    );
    let input_slots = cfg.queue_depth + cfg.workers * EXTRA_INPUT_SLOTS_PER_WORKER + 1;
    let (input_alloc, input_return) =
        BufferPool::new(cfg.io_size, input_slots).map_err(SourceError::Pool)?;
    let out_size = output_slot_size(cfg);
    let failure = Failure::default();
    let finished = Finished::new(cfg.workers);
    let auto_shared = auto::Shared::for_run(cfg);

    let Rings {
        to_workers,
        from_workers,
        worker_parts,
        output_returns,
    } = Rings::new(cfg.workers, out_size)?;

    let mut stats = PipelineStats::default();
    std::thread::scope(|scope| {
        let stages = Stages {
            scope,
            cfg,
            disks,
            failure: &failure,
            finished: &finished,
            auto: auto_shared.as_ref(),
        };
        let reader = stages.spawn_reader(plan, input_alloc, to_workers)?;
        let workers = worker_parts
            .into_iter()
            .enumerate()
            .map(|(i, ends)| stages.spawn_worker(i, ends))
            .collect::<Result<Vec<_>, _>>()?;
        // The sender owns the return ends of every pool: when it stops, for whatever
        // reason, dropping them wakes a reader or worker blocked on an empty pool.
        let result = sender_loop(
            cfg,
            from_workers,
            input_return,
            output_returns,
            writer,
            &mut stats,
            (&failure, &finished, auto_shared.as_ref()),
            manifests,
        );
        if let Err(e) = result {
            failure.set(e);
        }
        join_stages(reader, workers, &failure);
        Ok::<(), SourceError>(())
    })?;
    if let Some(e) = failure.take() {
        return Err(e);
    }
    Ok(stats)
}

/// What the stage threads of one [`run`] share, and how each is started: its loop
/// under `catch_unwind`, its outcome recorded, its ring end dropped only after that
/// (so the next stage sees an abandoned ring only once the reason is recorded), and
/// its pool end handed back to [`join_stages`].
struct Stages<'scope, 'env, 'd> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    cfg: &'scope PipelineConfig,
    disks: &'scope [DiskInfo<'d>],
    failure: &'scope Failure,
    finished: &'scope Finished,
    /// What the sender and workers share under `compression = "auto"`.
    auto: Option<&'scope auto::Shared>,
}

impl<'scope, 'd: 'scope> Stages<'scope, '_, 'd> {
    fn spawn_reader<P>(
        &self,
        plan: P,
        mut input_alloc: PoolAlloc,
        mut to_workers: Vec<spsc::Producer<ReadDone>>,
    ) -> Result<std::thread::ScopedJoinHandle<'scope, PoolAlloc>, SourceError>
    where
        P: Iterator<Item = Result<PlanItem, SourceError>> + Send + 'scope,
    {
        let engine_files: Vec<RawFd> = self.disks.iter().map(|d| d.fd).collect();
        let frozen: Vec<Option<&EpochView>> = self.disks.iter().map(|d| d.frozen).collect();
        let cfg = self.cfg.clone();
        let (failure, finished) = (self.failure, self.finished);
        std::thread::Builder::new()
            .name("ferry-reader".into())
            .spawn_scoped(self.scope, move || {
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    reader_loop(
                        &cfg,
                        &engine_files,
                        &frozen,
                        plan,
                        &mut input_alloc,
                        &mut to_workers,
                        failure,
                    )
                }));
                if record_outcome(Stage::Reader, outcome, failure) {
                    finished.reader.store(true, Ordering::Release);
                }
                // Only now may the workers see their input abandoned.
                drop(to_workers);
                input_alloc
            })
            .map_err(SourceError::Thread)
    }

    fn spawn_worker(
        &self,
        i: usize,
        ends: WorkerEnds,
    ) -> Result<std::thread::ScopedJoinHandle<'scope, PoolAlloc>, SourceError> {
        let WorkerEnds {
            rx,
            mut otx,
            mut oalloc,
        } = ends;
        let cfg = self.cfg.clone();
        let (disks, failure, finished) = (self.disks, self.failure, self.finished);
        let auto = self.auto;
        std::thread::Builder::new()
            .name(format!("ferry-worker-{i}"))
            .spawn_scoped(self.scope, move || {
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    let codec = WorkerCodec::new(&cfg, auto, i)?;
                    let ends = (rx, &mut otx, &mut oalloc);
                    worker_loop(&cfg, disks, ends, codec, failure, finished)
                }));
                if record_outcome(Stage::Worker(i), outcome, failure) {
                    finished.workers[i].store(true, Ordering::Release);
                }
                // Only now may the sender see this ring abandoned.
                drop(otx);
                oalloc
            })
            .map_err(SourceError::Thread)
    }
}

fn reader_loop<P>(
    cfg: &PipelineConfig,
    files: &[RawFd],
    frozen: &[Option<&EpochView>],
    plan: P,
    alloc: &mut PoolAlloc,
    to_workers: &mut [spsc::Producer<ReadDone>],
    failure: &Failure,
) -> Result<(), SourceError>
where
    P: Iterator<Item = Result<PlanItem, SourceError>>,
{
    let iovecs = crate::buffers::IovecTable::with_first_pool(alloc.region());
    // SAFETY: the pool behind `alloc` is borrowed for this whole function, so it outlives
    // the engine, which is dropped when this function returns; slots are only touched
    // through their `Slot` handles.
    let fixed = unsafe { iovecs.fixed() };
    let mut engine =
        io::open_engine(cfg.engine, cfg.queue_depth, files, Some(fixed)).map_err(|e| {
            SourceError::Io {
                disk: None,
                source: e,
            }
        })?;
    let mut queue = ReadQueue::new(cfg.queue_depth);
    let mut completions: Vec<Completion<Slot>> = Vec::with_capacity(cfg.queue_depth);
    let mut plan = plan.peekable();
    let mut rotation = Rotation::new(cfg, to_workers.len());

    let result = (|| loop {
        if failure.stopped() {
            return Err(SourceError::Aborted);
        }
        queue.fill(&mut plan, &mut engine, alloc)?;
        // Forward what is ready at the front, in plan order, round-robin.
        while let Some(msg) = queue.pop_ready() {
            to_workers[rotation.worker()]
                .push_wait(msg)
                .map_err(|_| SourceError::Aborted)?;
            rotation.advance();
        }
        if engine.in_flight() == 0 {
            // Nothing is being read, so nothing waits in the queue either.
            debug_assert!(queue.is_empty());
            if plan.peek().is_none() {
                return Ok(());
            }
            continue;
        }
        completions.clear();
        engine
            .wait(1, &mut completions)
            .map_err(|e| SourceError::Io {
                disk: None,
                source: e,
            })?;
        for c in completions.drain(..) {
            queue.complete(c, cfg.output, frozen)?;
        }
    })();
    if result.is_err() {
        failure.stop.store(true, Ordering::Release);
    }
    reap_all(&mut engine, &mut completions);
    result
}

/// Reaps whatever is still in flight so no buffer is freed under the kernel.
fn reap_all<E: BlockEngine<Slot>>(engine: &mut E, completions: &mut Vec<Completion<Slot>>) {
    while engine.in_flight() > 0 {
        completions.clear();
        if engine.wait(1, completions).is_err() {
            break;
        }
    }
}

/// A read the reader submitted and has not yet forwarded, under its tag.
struct TagRead {
    disk: u32,
    offset: u64,
    len: u32,
    /// The buffer, once the read completed and was settled; `None` while the engine
    /// holds it.
    done: Option<Slot>,
}

/// Everything the reader took from the plan and has not yet forwarded, in plan order.
///
/// Completions arrive in any order, and a zero run needs no read at all, but messages
/// are forwarded strictly from the front: the sender's rotation then puts every disk's
/// ranges on the wire in increasing offset order, as the protocol requires.
struct ReadQueue {
    /// Indexed by tag; sized once to the queue depth. A read keeps its tag from
    /// submission until it is forwarded; once completed, its buffer waits here.
    tags: Vec<Option<TagRead>>,
    free_tags: Vec<usize>,
    order: VecDeque<Queued>,
    /// Bound of `order`. Reads in it are bounded by the tags; regions alternate between
    /// data and holes, so twice the queue depth leaves room for a zero run after every
    /// read.
    order_window: usize,
}

impl ReadQueue {
    fn new(queue_depth: usize) -> Self {
        let order_window = 2 * queue_depth;
        Self {
            tags: (0..queue_depth).map(|_| None).collect(),
            free_tags: (0..queue_depth).rev().collect(),
            order: VecDeque::with_capacity(order_window),
            order_window,
        }
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Takes items from the plan and submits their reads until the window, the tags or
    /// the free slots run out.
    fn fill<P, E>(
        &mut self,
        plan: &mut std::iter::Peekable<P>,
        engine: &mut E,
        alloc: &mut PoolAlloc,
    ) -> Result<(), SourceError>
    where
        P: Iterator<Item = Result<PlanItem, SourceError>>,
        E: BlockEngine<Slot>,
    {
        while self.order.len() < self.order_window {
            let item = match plan.peek() {
                None => break,
                Some(Err(_)) => return Err(plan.next().and_then(Result::err).expect("peeked")),
                Some(Ok(item)) => *item,
            };
            match item {
                PlanItem::ZeroRun { disk, offset, len } => {
                    plan.next();
                    self.order.push_back(Queued::Zero { disk, offset, len });
                }
                PlanItem::Read { disk, offset, len } => {
                    let Some(tag) = self.free_tags.last().copied() else {
                        break;
                    };
                    // With nothing in flight, no read holds a slot (every completed one
                    // has been forwarded), so waiting for one cannot wait on ourselves.
                    let slot = if engine.in_flight() == 0 {
                        alloc.alloc_wait().ok_or(SourceError::Aborted)?
                    } else {
                        match alloc.alloc() {
                            Some(s) => s,
                            None => break,
                        }
                    };
                    plan.next();
                    // O_DIRECT wants whole sectors; the tail of a disk reads short.
                    let io_len = (len as usize).next_multiple_of(4096) as u32;
                    self.free_tags.pop();
                    self.tags[tag] = Some(TagRead {
                        disk,
                        offset,
                        len,
                        done: None,
                    });
                    self.order.push_back(Queued::Read(tag));
                    if let Err((e, slot)) =
                        engine.submit_read(io::DiskId(disk), slot, offset, io_len, tag as u64)
                    {
                        drop(slot);
                        return Err(SourceError::Io {
                            disk: Some(disk),
                            source: e,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The front of the queue, if it is a zero run or a completed read.
    fn pop_ready(&mut self) -> Option<ReadDone> {
        let msg = match *self.order.front()? {
            Queued::Zero { disk, offset, len } => ReadDone::ZeroRun { disk, offset, len },
            Queued::Read(tag) => {
                // `None` while it is still being read.
                self.tags[tag].as_ref()?.done.as_ref()?;
                let read = self.tags[tag].take()?;
                self.free_tags.push(tag);
                ReadDone::Read {
                    disk: read.disk,
                    offset: read.offset,
                    len: read.len,
                    slot: read.done?,
                }
            }
        };
        self.order.pop_front();
        Some(msg)
    }

    /// Checks one completed read and settles its blocks against the frozen epoch.
    fn complete(
        &mut self,
        c: Completion<Slot>,
        output: Output,
        frozen: &[Option<&EpochView>],
    ) -> Result<(), SourceError> {
        let read = self.tags[c.tag as usize]
            .as_mut()
            .expect("completion for an unknown tag");
        debug_assert!(read.done.is_none(), "a tag completed twice");
        let (disk, offset, len) = (read.disk, read.offset, read.len);
        let bytes = c.result.map_err(|e| SourceError::Io {
            disk: Some(disk),
            source: e,
        })? as usize;
        if bytes < len as usize {
            return Err(SourceError::ShortRead {
                disk,
                offset,
                expected: len,
                got: bytes,
            });
        }
        let mut slot = c.buf.expect("a read completion hands its buffer back");
        if let Some(view) = frozen[disk as usize] {
            // Blocks written since the freeze come from the shim's scratch copy.
            // Hash reads of a seeded sync are not the last read of a block.
            let last_read = output == Output::Data;
            view.settle(offset, &mut slot.as_mut_slice()[..len as usize], last_read)
                .map_err(|source| {
                    SourceError::Shim(super::ShimControlError::FrozenRead {
                        disk,
                        offset,
                        source,
                    })
                })?;
        }
        read.done = Some(slot);
        Ok(())
    }
}

/// How a worker compresses: not at all, at one fixed level, or at the step of
/// [`auto::LADDER`] that `auto` picks for each frame.
struct WorkerCodec<'a> {
    /// The levels this worker may use; indexes `contexts`.
    levels: Vec<Option<i32>>,
    /// The zstd context of each level, made on its first use and kept.
    contexts: Vec<Option<zstd::bulk::Compressor<'static>>>,
    auto: Option<(&'a auto::Shared, auto::Picker)>,
    /// Where a probe frame's blocks are compressed again at the current level (auto
    /// only; one block).
    scratch: Vec<u8>,
    /// This worker's compression stream, when the target takes them: every frame is
    /// then compressed into it, at the current level.
    stream: Option<StreamEncoder>,
    /// Every level was measured aside on one frame of this worker (with a stream).
    surveyed: bool,
}

/// How a worker compresses the blocks of one frame.
enum Coder<'c> {
    /// Each block on its own (a target before protocol 4).
    Bulk(&'c mut zstd::bulk::Compressor<'static>),
    /// Each block as the next chunk of the worker's stream, at this level.
    Stream(&'c mut StreamEncoder, i32),
}

impl<'a> WorkerCodec<'a> {
    /// The codec of worker `worker` of a run with `cfg`.
    fn new(
        cfg: &PipelineConfig,
        shared: Option<&'a auto::Shared>,
        worker: usize,
    ) -> Result<Self, SourceError> {
        let (levels, auto) = match (cfg.compression, shared) {
            (Compression::Auto, Some(shared)) => (
                auto::LADDER.to_vec(),
                Some((shared, auto::Picker::default())),
            ),
            (Compression::Zstd { level }, _) => (vec![Some(level)], None),
            _ => (vec![None], None),
        };
        // Workers beyond the streams a session may use compress block by block.
        let stream = match u8::try_from(worker) {
            Ok(id) if cfg.streams && levels.iter().any(Option::is_some) && worker < MAX_STREAMS => {
                let encoder = StreamEncoder::new(id)
                    .map_err(|e| SourceError::Compression(std::io::Error::other(e)))?;
                Some(encoder)
            }
            _ => None,
        };
        let mut codec = Self {
            contexts: levels.iter().map(|_| None).collect(),
            levels,
            scratch: if auto.is_some() {
                vec![0; cfg.block_size]
            } else {
                Vec::new()
            },
            auto,
            stream,
            surveyed: false,
        };
        // A fixed level's context is made now, so that a bad level fails at once.
        if codec.auto.is_none() {
            codec.compressor(0)?;
        }
        Ok(codec)
    }

    /// The index of the level the next frame gets, and of the current one (they
    /// differ for a probe).
    fn pick(&mut self) -> (usize, usize) {
        match &mut self.auto {
            Some((shared, picker)) => (picker.pick(shared), shared.current()),
            None => (0, 0),
        }
    }

    /// The context of level `i`, if it compresses.
    fn compressor(
        &mut self,
        i: usize,
    ) -> Result<Option<&mut zstd::bulk::Compressor<'static>>, SourceError> {
        let Some(level) = self.levels[i] else {
            return Ok(None);
        };
        let slot = &mut self.contexts[i];
        if slot.is_none() {
            *slot = Some(zstd::bulk::Compressor::new(level).map_err(SourceError::Compression)?);
        }
        Ok(slot.as_mut())
    }

    /// How level `i` compresses: into the stream if there is one, else block by block.
    fn coder(&mut self, i: usize) -> Result<Option<Coder<'_>>, SourceError> {
        let Some(level) = self.levels[i] else {
            return Ok(None);
        };
        if self.stream.is_some() {
            return Ok(self.stream.as_mut().map(|s| Coder::Stream(s, level)));
        }
        Ok(self.compressor(i)?.map(Coder::Bulk))
    }

    /// Encodes the Data frame of `data` read at `offset` of `disk` into `out` (see
    /// [`encode_data`]) at the level picked for it, and learns from it. With a stream
    /// every frame goes at the current level (a level holds for a whole zstd frame, and
    /// changing it restarts the stream); a probe's level is then measured aside.
    fn encode(
        &mut self,
        cfg: &PipelineConfig,
        (disk, pieces): (u32, Pieces<'_>),
        replica_zeroed: bool,
        (out, table_cap): (&mut [u8], usize),
    ) -> Result<Frame, SourceError> {
        let (probe, current) = self.pick();
        let step = if self.stream.is_some() {
            current
        } else {
            probe
        };
        let started = Instant::now();
        let coder = self.coder(step)?;
        let mut frame = encode_data(cfg, (disk, pieces), replica_zeroed, out, table_cap, coder);
        self.learn(
            (step, current),
            &mut frame,
            started,
            (pieces, cfg.block_size),
        )?;
        if self.stream.is_some() && !self.surveyed && frame.logical_bytes > 0 {
            self.survey_aside((pieces, cfg.block_size), frame.logical_bytes)?;
        } else if step != probe {
            self.probe_aside(
                (probe, current),
                (pieces, cfg.block_size),
                frame.logical_bytes,
            )?;
        }
        Ok(frame)
    }

    /// Measures every compressed step on `data` without sending it, once per worker
    /// and run: each step's cost, and the gains between neighbours on the same blocks.
    /// Probes otherwise measure one neighbour at a time, and a slow link then climbed a
    /// step per decision while the workers went on encoding at the lower levels.
    fn survey_aside(
        &mut self,
        (data, block_size): (Pieces<'_>, usize),
        logical: u64,
    ) -> Result<(), SourceError> {
        self.surveyed = true;
        let shared = self.auto.as_ref().map(|(shared, _)| *shared);
        let Some(shared) = shared.filter(|shared| shared.measures()) else {
            return Ok(());
        };
        let mut below: Option<u64> = None;
        for step in 1..self.levels.len() {
            let started = Instant::now();
            let stored = self.stored_at(step, data, block_size)?;
            shared.record_cost(step, logical, started.elapsed());
            if let Some(at_low) = below {
                shared.record_gain(step - 1, at_low, stored);
            }
            below = Some(stored);
        }
        Ok(())
    }

    /// Measures step `probe` on `data` without sending it: the non-zero blocks are
    /// compressed on their own at `probe` (timed) and at `current`, and the ratio of the
    /// two scales the current step's ratio, as for a probe frame.
    fn probe_aside(
        &mut self,
        (probe, current): (usize, usize),
        (data, block_size): (Pieces<'_>, usize),
        logical: u64,
    ) -> Result<(), SourceError> {
        let Some((shared, _)) = self.auto else {
            return Ok(());
        };
        if logical == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let stored = self.stored_at(probe, data, block_size)?;
        let elapsed = started.elapsed();
        let reference = self.stored_at(current, data, block_size)?;
        shared.record(probe, logical, stored, elapsed, Some((current, reference)));
        Ok(())
    }

    /// Labels a frame of `data` encoded at level `i` and tells `auto` what it cost. A
    /// probe's blocks are compressed again at the `current` level, so that the two
    /// levels' ratios are compared on the same data.
    fn learn(
        &mut self,
        (i, current): (usize, usize),
        frame: &mut Frame,
        started: Instant,
        (data, block_size): (Pieces<'_>, usize),
    ) -> Result<(), SourceError> {
        frame.level = self.levels[i];
        let Some((shared, _)) = self.auto else {
            return Ok(());
        };
        let elapsed = started.elapsed();
        let reference = if i != current && frame.logical_bytes > 0 {
            Some((current, self.stored_at(current, data, block_size)?))
        } else {
            None
        };
        let (logical, stored) = (frame.logical_bytes, frame.stored_bytes);
        shared.record(i, logical, stored, elapsed, reference);
        Ok(())
    }

    /// The bytes the non-zero blocks of `data` take at level `i` (as `try_compress`
    /// would store them).
    fn stored_at(
        &mut self,
        i: usize,
        data: Pieces<'_>,
        block_size: usize,
    ) -> Result<u64, SourceError> {
        self.compressor(i)?;
        let mut total = 0u64;
        let blocks = data.iter().flat_map(|(_, d)| d.chunks(block_size));
        for block in blocks.filter(|b| !is_zero(b)) {
            let mut coder = self.contexts[i].as_mut().map(Coder::Bulk);
            total += try_compress(coder.as_mut(), block, &mut self.scratch).stored as u64;
        }
        Ok(total)
    }
}

fn worker_loop(
    cfg: &PipelineConfig,
    disks: &[DiskInfo<'_>],
    (mut rx, tx, out_alloc): (
        spsc::Consumer<ReadDone>,
        &mut spsc::Producer<Encoded>,
        &mut PoolAlloc,
    ),
    mut codec: WorkerCodec<'_>,
    failure: &Failure,
    finished: &Finished,
) -> Result<(), SourceError> {
    let table_cap = table_capacity(cfg);
    let mut turn = TurnCount::new(cfg);
    let mut ahead: Option<ReadDone> = None;
    while let Some(msg) = ahead.take().or_else(|| rx.pop_wait()) {
        turn.took();
        if failure.stopped() {
            return Err(SourceError::Aborted);
        }
        if ferry_io::failpoint::hit("source.worker.panic") {
            panic!("failpoint source.worker.panic");
        }
        let (encoded, absorbed) = match msg {
            ReadDone::ZeroRun { disk, offset, len } => (Encoded::ZeroRun { disk, offset, len }, 0),
            ReadDone::Read {
                disk,
                offset,
                len,
                slot: input,
            } => {
                let mut gathered = Gathered::default();
                if cfg.output == Output::Data {
                    ahead = gather(cfg, &mut rx, &mut turn, (disk, offset, len), &mut gathered);
                }
                let mut output = out_alloc.alloc_wait().ok_or(SourceError::Aborted)?;
                let info = &disks[disk as usize];
                let data = &input.as_slice()[..len as usize];
                let frame = match cfg.output {
                    Output::Hashes => encode_hashes(cfg, disk, offset, data, output.as_mut_slice()),
                    Output::Data => {
                        let zeroed = info.replica_zeroed;
                        let out = (output.as_mut_slice(), table_cap);
                        let pieces = gathered.pieces((offset, data));
                        codec.encode(cfg, (disk, pieces), zeroed, out)?
                    }
                };
                let absorbed = gathered.n;
                let encoded = Encoded::Read {
                    disk,
                    offset,
                    len,
                    input,
                    output,
                    frame,
                    gathered,
                };
                (encoded, absorbed)
            }
        };
        if tx.push_wait(encoded).is_err() {
            return Err(SourceError::Aborted);
        }
        for _ in 0..absorbed {
            if tx.push_wait(Encoded::Absorbed).is_err() {
                return Err(SourceError::Aborted);
            }
        }
    }
    // The input is abandoned and drained: the end of the plan only if the reader got
    // there. Otherwise it recorded why it stopped before dropping the ring.
    if !finished.reader.load(Ordering::Acquire) {
        return Err(SourceError::Aborted);
    }
    Ok(())
}

/// Where a worker is in its turns of the rotation: the reader deals it `run` messages
/// per turn, and the messages after the last of a turn come after other workers' turns
/// in plan order, so a frame never gathers across a turn.
struct TurnCount {
    run: usize,
    /// Messages taken in the current turn.
    taken: usize,
}

impl TurnCount {
    fn new(cfg: &PipelineConfig) -> Self {
        Self {
            run: Rotation::new(cfg, 1).run,
            taken: 0,
        }
    }

    /// One more message of this worker's.
    fn took(&mut self) {
        self.taken = self.taken % self.run + 1;
    }

    /// Messages still to come in this turn.
    fn left(&self) -> usize {
        self.run - self.taken
    }
}

/// Gathers into `gathered` the reads queued behind the read `(disk, offset, len)` in
/// this worker's turn that fit in its frame: reads of the same disk, while the frame's
/// bytes stay within `io_size` and its records within the table. Takes only what is
/// already queued; returns the message it took and could not gather, which comes next.
fn gather(
    cfg: &PipelineConfig,
    rx: &mut spsc::Consumer<ReadDone>,
    turn: &mut TurnCount,
    (disk, offset, len): (u32, u64, u32),
    gathered: &mut Gathered,
) -> Option<ReadDone> {
    let bs = cfg.block_size as u64;
    let records = |o: u64, l: u32| ((o + u64::from(l) - 1) / bs - o / bs + 1) as usize;
    let max_records = (table_capacity(cfg) - core::mem::size_of::<DataHeader>()) / BLOCK_RECORD_LEN;
    let (mut bytes, mut recs) = (len as usize, records(offset, len));
    while gathered.n < GATHER_MAX - 1 && turn.left() > 0 && bytes < cfg.io_size {
        let next = rx.pop()?;
        turn.took();
        match next {
            ReadDone::Read {
                disk: d,
                offset: o,
                len: l,
                slot,
            } if d == disk
                && bytes + l as usize <= cfg.io_size
                && recs + records(o, l) <= max_records =>
            {
                bytes += l as usize;
                recs += records(o, l);
                gathered.push(o, l, slot);
            }
            other => {
                // Taken back when it is handled, as the next message.
                turn.taken -= 1;
                return Some(other);
            }
        }
    }
    None
}

fn encode_hashes(
    cfg: &PipelineConfig,
    disk: u32,
    offset: u64,
    data: &[u8],
    out: &mut [u8],
) -> Frame {
    let bs = cfg.block_size;
    let count = data.len().div_ceil(bs);
    let header = HashesHeader {
        disk: disk.into(),
        block_count: (count as u32).into(),
        first_block: (offset / bs as u64).into(),
    };
    let hlen = core::mem::size_of::<HashesHeader>();
    out[..hlen].copy_from_slice(header.as_bytes());
    let mut zero_blocks = 0;
    for (i, block) in data.chunks(bs).enumerate() {
        let h = if is_zero(block) {
            zero_blocks += 1;
            ZERO_BLOCK_HASH
        } else {
            block_hash(block)
        };
        out[hlen + i * 16..hlen + (i + 1) * 16].copy_from_slice(&h);
    }
    Frame {
        table_len: hlen + count * 16,
        records: count,
        zero_blocks,
        ..Frame::default()
    }
}

/// Builds the record table at the front of `out` and packs compressed payloads after
/// it; raw payloads stay in the input slot and are aligned in the frame by the sender.
///
/// The blocks' payloads as sent take at most `data.len()` plus [`PAYLOAD_ALIGN`]
/// bytes (the slack the target's frame bound allows): a stream chunk, which may be a
/// few bytes longer than its block, is made only while what the frame used, the
/// chunk's bound and the rest of `data` sent raw still fit; otherwise the block goes
/// raw, which a stream's decoder never needs.
fn encode_data(
    cfg: &PipelineConfig,
    (disk, pieces): (u32, Pieces<'_>),
    replica_zeroed: bool,
    out: &mut [u8],
    table_cap: usize,
    mut coder: Option<Coder<'_>>,
) -> Frame {
    let bs = cfg.block_size;
    let hlen = core::mem::size_of::<DataHeader>();
    let (table, packed) = out.split_at_mut(table_cap);
    let mut frame = Frame::default();
    // First pass fills records with payload offsets relative to the packed area; the
    // frame layout is fixed once the table length is known.
    let mut packed_len = 0usize;
    // Payload bytes the frame carries so far, raw and packed.
    let mut used = 0usize;
    let total = pieces.len();
    let budget = total + PAYLOAD_ALIGN;
    // Bytes of the pieces taken so far, the current block's included.
    let mut taken = 0usize;
    // One record per block a read touches: a read of granules may start and end
    // inside blocks, so records are cut at block boundaries, not every `bs` bytes.
    let blocks = pieces.iter().flat_map(|(offset, data)| {
        let mut at = 0usize;
        std::iter::from_fn(move || {
            (at < data.len()).then(|| {
                let block_offset = offset + at as u64;
                let n = (bs - (block_offset % bs as u64) as usize).min(data.len() - at);
                at += n;
                (block_offset, &data[at - n..at])
            })
        })
    });
    for (block_offset, block) in blocks {
        taken += block.len();
        let room = budget - (total - taken) - used;
        let packed_rest = &mut packed[packed_len..];
        let room = room.min(packed_rest.len());
        let Some((enc, hash)) = encode_block(
            block,
            replica_zeroed,
            coder.as_mut(),
            &mut packed_rest[..room],
        ) else {
            continue;
        };
        used += enc.stored;
        if enc.codec == Codec::Zero {
            frame.zero_blocks += 1;
        } else {
            frame.data_blocks += 1;
            frame.logical_bytes += block.len() as u64;
            frame.stored_bytes += enc.stored as u64;
        }
        // Compressed payloads are packed in record order; raw ones stay in the input.
        let mut payload_offset = usize::MAX;
        if enc.codec.is_packed() {
            payload_offset = packed_len;
            packed_len += enc.stored;
        }
        let at = hlen + frame.records * BLOCK_RECORD_LEN;
        let rec = enc.record((block_offset, block.len()), payload_offset, hash);
        table[at..at + BLOCK_RECORD_LEN].copy_from_slice(rec.as_bytes());
        frame.records += 1;
    }
    if frame.records > 0 {
        // The sender finds the packed compressed payloads at `table_cap` onwards, in
        // record order.
        let payloads = (packed_len > 0, frame.stored_bytes as usize);
        frame.table_len = seal_table(table, disk, frame.records, payloads);
    }
    frame
}

/// How one block travels.
struct Encoding {
    codec: Codec,
    /// Payload bytes in the frame.
    stored: usize,
    /// For a stream chunk: the stream and its flags.
    stream: u8,
    stream_flags: u8,
}

impl Encoding {
    fn plain(codec: Codec, stored: usize) -> Self {
        Self {
            codec,
            stored,
            stream: 0,
            stream_flags: 0,
        }
    }

    /// The record of the block of `len` bytes at `offset` so encoded.
    fn record(
        &self,
        (offset, len): (u64, usize),
        payload_offset: usize,
        hash: [u8; 16],
    ) -> BlockRecord {
        BlockRecord {
            offset: offset.into(),
            length: (len as u32).into(),
            stored_len: (self.stored as u32).into(),
            payload_offset: (payload_offset as u32).into(),
            codec: self.codec as u8,
            stream: self.stream,
            stream_flags: self.stream_flags,
            hash,
            ..BlockRecord::new_zeroed()
        }
    }
}

/// How one block travels, and its hash; `None` when nothing needs to (a zero block of
/// a new replica, which already reads as zeros). A compressed payload is written to
/// the front of `packed`.
fn encode_block(
    block: &[u8],
    replica_zeroed: bool,
    coder: Option<&mut Coder<'_>>,
    packed: &mut [u8],
) -> Option<(Encoding, [u8; 16])> {
    if is_zero(block) {
        return (!replica_zeroed).then_some((Encoding::plain(Codec::Zero, 0), ZERO_BLOCK_HASH));
    }
    let hash = block_hash(block);
    Some((try_compress(coder, block, packed), hash))
}

/// Compresses `block` into the front of `packed`. On its own, a block is kept
/// compressed when that saves at least 1/16 of it (less is not worth the target's
/// decompression); a stream chunk is kept whatever its size, since later chunks may
/// refer to it, and is made only when `packed` holds its bound. Otherwise, or when zstd
/// fails (a stream then restarts with its next chunk), the block goes raw.
fn try_compress(coder: Option<&mut Coder<'_>>, block: &[u8], packed: &mut [u8]) -> Encoding {
    match coder {
        Some(Coder::Bulk(c)) => {
            let limit = block.len() - block.len() / 16;
            if let Ok(n) = c.compress_to_buffer(block, &mut packed[..limit]) {
                if n <= limit {
                    return Encoding::plain(Codec::Zstd, n);
                }
            }
        }
        Some(Coder::Stream(s, level))
            if packed.len() >= StreamEncoder::chunk_bound(block.len()) =>
        {
            if let Ok((n, flags)) = s.chunk(*level, block, packed) {
                return Encoding {
                    codec: Codec::ZstdStream,
                    stored: n,
                    stream: s.id(),
                    stream_flags: flags,
                };
            }
        }
        _ => {}
    }
    Encoding::plain(Codec::Raw, block.len())
}

/// Second pass over a Data frame's table of `records` records (first pass done):
/// final payload offsets in frame order, the header, zeroed padding. `packed`: a
/// payload is compressed; `stored`: the payloads' bytes. Returns the table's length as
/// sent.
///
/// Two layouts. *Aligned*: the table is padded to PAYLOAD_ALIGN and every raw payload
/// starts on it (block lengths are multiples of it, bar the disk's last block, which
/// comes last), so the target writes them with O_DIRECT straight from its receive
/// buffer. *Compact*: each payload right after the table or the one before; the target
/// copies an unaligned raw block to scratch and writes it from there. As soon as one
/// block is compressed (`packed`) the frame is compact: the target decompresses into
/// scratch anyway, padding between payloads could otherwise outgrow the frame bound
/// the session announced, and a padded table would buy nothing. A frame of raw blocks
/// is compact when aligning it costs more padding than it is worth on the wire
/// ([`COMPACT_PADDING_SHARE`]): a random 4 KiB write alone in its frame then travels as
/// 4 KiB and a 56-byte table, not 8 KiB, for one 4 KiB copy at the target.
fn seal_table(
    table: &mut [u8],
    disk: u32,
    records: usize,
    (packed, stored): (bool, usize),
) -> usize {
    let hlen = core::mem::size_of::<DataHeader>();
    let table_end = hlen + records * BLOCK_RECORD_LEN;
    let aligned_table = table_end.next_multiple_of(PAYLOAD_ALIGN);
    let compact = packed || {
        let aligned_end = place_payloads(&mut table[hlen..], records, aligned_table, true);
        let padding = aligned_end - table_end - stored;
        padding * COMPACT_PADDING_SHARE > aligned_end
    };
    let table_len = if compact { table_end } else { aligned_table };
    place_payloads(&mut table[hlen..], records, table_len, !compact);
    let header = DataHeader {
        disk: disk.into(),
        record_count: (records as u32).into(),
    };
    table[..hlen].copy_from_slice(header.as_bytes());
    // The table region is sent as is, padding included; make the padding zeros.
    table[table_end..table_len].fill(0);
    table_len
}

/// A frame of raw blocks goes compact once aligning it would pad it by more than
/// 1/`COMPACT_PADDING_SHARE` of its payload (see [`seal_table`]): a lone 4 KiB granule
/// (8 KiB aligned), a 32 KiB run, or eight gathered granules (10% padding) do; a 64 KiB
/// block (5.8%) or a 256 KiB read (1.5%) does not. Above that share the padding would
/// cost more on the wire (and in the socket copies at both ends) than the target's
/// copy of the raw bytes to scratch saves.
const COMPACT_PADDING_SHARE: usize = 16;

/// Sets the payload offset of each of the `records` records in `records_table`, in frame
/// order from `table_len`, raw payloads aligned to PAYLOAD_ALIGN if `align_raw`; returns
/// where the last payload ends.
fn place_payloads(
    records_table: &mut [u8],
    records: usize,
    table_len: usize,
    align_raw: bool,
) -> usize {
    let mut cursor = table_len;
    for r in 0..records {
        let at = r * BLOCK_RECORD_LEN;
        let rec = BlockRecord::mut_from_bytes(&mut records_table[at..at + BLOCK_RECORD_LEN])
            .expect("record slice has the record's size");
        match Codec::from_u8(rec.codec) {
            Some(Codec::Raw) => {
                if align_raw {
                    cursor = cursor.next_multiple_of(PAYLOAD_ALIGN);
                }
                rec.payload_offset = (cursor as u32).into();
                cursor += rec.stored_len.get() as usize;
            }
            Some(Codec::Zstd | Codec::ZstdStream) => {
                rec.payload_offset = (cursor as u32).into();
                cursor += rec.stored_len.get() as usize;
            }
            _ => rec.payload_offset = 0.into(),
        }
    }
    cursor
}

static ZERO_PAD: [u8; PAYLOAD_ALIGN] = [0; PAYLOAD_ALIGN];

/// The sender's rotation reached the abandoned, drained ring of worker `at`: the end of
/// the plan if every worker finished its input and left nothing behind.
fn plan_ended(
    at: usize,
    from_workers: &mut [spsc::Consumer<Encoded>],
    input_return: &mut PoolReturn,
    output_returns: &mut [PoolReturn],
    finished: &Finished,
) -> Result<(), SourceError> {
    // A worker that failed recorded why before dropping the ring.
    if !finished.workers[at].load(Ordering::Acquire) {
        return Err(SourceError::Aborted);
    }
    // Messages go round-robin, so every other ring must be at its end too.
    for (w, ring) in from_workers.iter_mut().enumerate() {
        if let Some(stray) = ring.pop_wait() {
            stray.release(input_return, &mut output_returns[w]);
            return Err(SourceError::Stage {
                stage: Stage::Sender,
                source: StageFailure::StrayFrame {
                    worker: w,
                    finished: at,
                },
            });
        }
        if !finished.workers[w].load(Ordering::Acquire) {
            return Err(SourceError::Aborted);
        }
    }
    Ok(())
}

/// Whether `fd` has something to read now (the peer spoke up mid-stream).
fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd on our stack for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

#[allow(clippy::too_many_arguments)]
fn sender_loop<W: Write>(
    cfg: &PipelineConfig,
    mut from_workers: Vec<spsc::Consumer<Encoded>>,
    mut input_return: PoolReturn,
    mut output_returns: Vec<PoolReturn>,
    writer: &mut FrameWriter<W>,
    stats: &mut PipelineStats,
    (failure, finished, auto): (&Failure, &Finished, Option<&auto::Shared>),
    mut manifests: Option<&mut [ManifestBuilder]>,
) -> Result<(), SourceError> {
    let table_cap = table_capacity(cfg);
    let mut rotation = Rotation::new(cfg, from_workers.len());
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * (cfg.io_size / cfg.block_size) + 4);
    let limited = cfg.throttle.is_some();
    let meter = |shared| (shared, auto::Meter::new(cfg.watch_fd, limited, cfg.streams));
    let mut meter = auto.map(meter);
    loop {
        let next = rotation.worker();
        let waiting = Instant::now();
        let popped = from_workers[next].pop_wait();
        let (sending, wait) = (Instant::now(), waiting.elapsed());
        let Some(msg) = popped else {
            return plan_ended(
                next,
                &mut from_workers,
                &mut input_return,
                &mut output_returns,
                finished,
            );
        };
        let w = next;
        rotation.advance();
        if failure.stopped() {
            return Err(SourceError::Aborted);
        }
        if cfg.watch_fd.is_some_and(readable) {
            msg.release(&mut input_return, &mut output_returns[w]);
            return Err(SourceError::PeerInterrupted);
        }
        let sent = {
            // `parts` borrows from `msg`; reuse its allocation across frames by
            // re-typing the empty vector to this iteration's lifetime.
            let mut scoped: Vec<&[u8]> = std::mem::take(&mut parts)
                .into_iter()
                .map(|_| &[][..])
                .collect();
            scoped.clear();
            let r = send_encoded(cfg, &msg, table_cap, writer, &mut scoped);
            scoped.clear();
            parts = scoped.into_iter().map(|_| &[][..]).collect();
            r
        };
        if sent.is_ok() {
            if let Some(m) = manifests.as_deref_mut() {
                add_to_manifest(m, &msg);
            }
        }
        let read = match &msg {
            Encoded::Read {
                len,
                frame,
                gathered,
                ..
            } => {
                let more: u32 = gathered.reads[..gathered.n].iter().map(|r| r.1).sum();
                Some((len + more, *frame))
            }
            Encoded::ZeroRun { .. } => None,
            Encoded::Absorbed => {
                // Its blocks went out with an earlier frame, and were counted there.
                continue;
            }
        };
        msg.release(&mut input_return, &mut output_returns[w]);
        let bytes = sent?;
        stats.bytes_sent += bytes as u64;
        pay(cfg, bytes, stats);
        let times = (wait, sending.elapsed());
        account(cfg, stats, read, (bytes, times), meter.as_mut());
    }
}

/// Adds a frame of `bytes` to `stats` (what it carried, for the frame of a read) and
/// to the `auto` meter, with the times the sender waited for it and sent it.
fn account(
    cfg: &PipelineConfig,
    stats: &mut PipelineStats,
    read: Option<(u32, Frame)>,
    (bytes, (wait, send)): (usize, (std::time::Duration, std::time::Duration)),
    meter: Option<&mut (&auto::Shared, auto::Meter)>,
) {
    let data_frame = cfg.output == Output::Data;
    if let Some((shared, meter)) = meter {
        let frame = read.filter(|_| data_frame).map(|(_, f)| f);
        let data = frame.map_or(0, |f| f.logical_bytes);
        let step = frame.and_then(|f| auto::LADDER.iter().position(|&l| l == f.level));
        meter.sent(shared, (bytes as u64, data, step), wait, send);
    }
    let Some((len, frame)) = read else {
        return;
    };
    stats.zero_blocks += frame.zero_blocks;
    stats.blocks_sent += frame.data_blocks;
    stats.bytes_payload_logical += frame.logical_bytes;
    stats.bytes_read += len as u64;
    if data_frame && frame.data_blocks > 0 {
        stats.count_frame(frame.level);
    }
}

/// Pays the bandwidth limit for a frame of `bytes` just sent: after the frame, not
/// before, so the frame's deadline does not run while the sender sleeps off its cost.
fn pay(cfg: &PipelineConfig, bytes: usize, stats: &mut PipelineStats) {
    if let Some(t) = &cfg.throttle {
        let before = t.held_s();
        t.paid(bytes);
        stats.throttled_s += t.held_s() - before;
    }
}

/// Adds what the Data-phase frame of `msg` carried to its disk's manifest.
fn add_to_manifest(manifests: &mut [ManifestBuilder], msg: &Encoded) {
    match msg {
        &Encoded::ZeroRun { disk, offset, len } => manifests[disk as usize].zero_run(offset, len),
        Encoded::Read {
            disk,
            output,
            frame,
            ..
        } if frame.records > 0 => {
            let out = output.as_slice();
            let hlen = core::mem::size_of::<DataHeader>();
            let records = <[BlockRecord]>::ref_from_bytes(
                &out[hlen..hlen + frame.records * BLOCK_RECORD_LEN],
            )
            .expect("the table holds `records` records");
            let m = &mut manifests[*disk as usize];
            records.iter().for_each(|r| m.record(r));
        }
        Encoded::Read { .. } | Encoded::Absorbed => {}
    }
}

/// Sends the frame for one message; returns the bytes put on the socket.
fn send_encoded<'a, W: Write>(
    cfg: &PipelineConfig,
    msg: &'a Encoded,
    table_cap: usize,
    writer: &mut FrameWriter<W>,
    parts: &mut Vec<&'a [u8]>,
) -> Result<usize, SourceError> {
    const HEADER: usize = crate::protocol::FRAME_HEADER_LEN;
    match (msg, cfg.output) {
        (&Encoded::ZeroRun { disk, offset, len }, Output::Data) => {
            let run = DiskRun {
                disk: disk.into(),
                reserved: 0.into(),
                start: offset.into(),
                count: len.into(),
            };
            writer.send(FrameKind::Zero, &[run.as_bytes()])?;
            Ok(HEADER + run.as_bytes().len())
        }
        (&Encoded::ZeroRun { disk, offset, len }, Output::Hashes) => {
            let bs = cfg.block_size as u64;
            let run = DiskRun {
                disk: disk.into(),
                reserved: 0.into(),
                start: (offset / bs).into(),
                count: len.div_ceil(bs).into(),
            };
            writer.send(FrameKind::HashZeroRun, &[run.as_bytes()])?;
            Ok(HEADER + run.as_bytes().len())
        }
        (Encoded::Absorbed, _) => Ok(0),
        (Encoded::Read { frame, .. }, _) if frame.records == 0 => Ok(0),
        (Encoded::Read { output, frame, .. }, Output::Hashes) => {
            writer.send(FrameKind::Hashes, &[&output.as_slice()[..frame.table_len]])?;
            Ok(HEADER + frame.table_len)
        }
        (
            Encoded::Read {
                offset,
                len,
                input,
                output,
                frame,
                gathered,
                ..
            },
            Output::Data,
        ) => {
            let first = (*offset, &input.as_slice()[..*len as usize]);
            let pieces = gathered.pieces(first);
            let len = gather_data_frame(output.as_slice(), pieces, frame, table_cap, parts);
            writer.send(FrameKind::Data, parts)?;
            Ok(HEADER + len)
        }
    }
}

/// Lays out a Data frame's payload as `parts`: the record table from `out`, then each
/// record's payload at its offset in the frame, raw ones straight from the `input` slot
/// read at `chunk_offset`, compressed ones from the packed area of `out`, zero padding
/// between. Returns the payload's length.
fn gather_data_frame<'a>(
    out: &'a [u8],
    pieces: Pieces<'a>,
    frame: &Frame,
    table_cap: usize,
    parts: &mut Vec<&'a [u8]>,
) -> usize {
    parts.push(&out[..frame.table_len]);
    let hlen = core::mem::size_of::<DataHeader>();
    let mut cursor = frame.table_len;
    let mut packed = table_cap;
    // (index in parts, start, end in its read's slot) of the last raw piece.
    let mut raw_run: Option<(usize, usize, usize)> = None;
    // The read the records have reached (records follow the reads' order).
    let mut read = 0;
    for r in 0..frame.records {
        let at = hlen + r * BLOCK_RECORD_LEN;
        let rec = BlockRecord::ref_from_bytes(&out[at..at + BLOCK_RECORD_LEN])
            .expect("record slice has the record's size");
        let stored = rec.stored_len.get() as usize;
        let codec = Codec::from_u8(rec.codec);
        let mut piece_start = usize::MAX;
        let piece: &[u8] = match codec {
            Some(Codec::Raw) => {
                let offset = rec.offset.get();
                while offset >= pieces.at[read].0 + pieces.at[read].1.len() as u64 {
                    read += 1;
                    raw_run = None;
                }
                let (start, input) = pieces.at[read];
                piece_start = (offset - start) as usize;
                &input[piece_start..piece_start + stored]
            }
            Some(Codec::Zstd | Codec::ZstdStream) => {
                let p = &out[packed..packed + stored];
                packed += stored;
                p
            }
            _ => continue,
        };
        let at_frame = rec.payload_offset.get() as usize;
        debug_assert!(at_frame >= cursor && at_frame - cursor < PAYLOAD_ALIGN);
        if at_frame > cursor {
            parts.push(&ZERO_PAD[..at_frame - cursor]);
            raw_run = None;
        }
        // Adjacent raw blocks are adjacent in the input slot too: send them as
        // one piece.
        match (raw_run, codec) {
            (Some((idx, start, end)), Some(Codec::Raw))
                if at_frame == cursor && piece_start == end =>
            {
                let new_end = end + stored;
                parts[idx] = &pieces.at[read].1[start..new_end];
                raw_run = Some((idx, start, new_end));
            }
            _ => {
                parts.push(piece);
                raw_run = (codec == Some(Codec::Raw))
                    .then(|| (parts.len() - 1, piece_start, piece_start + stored));
            }
        }
        cursor = at_frame + stored;
    }
    cursor
}

/// `compression = "auto"`: the choice, frame by frame, between sending blocks as they
/// are and a zstd level (see also `docs/architecture.md`, "Adaptive compression").
///
/// The policy picks the step of [`LADDER`] (none, zstd 1, 3, 6, 9) that moves the most
/// disk data per second, from a simple model: a step with compression ratio `r` and a
/// worker cost of `c` seconds per byte (hashing included) delivers
/// `min(link × r, workers / c)` bytes of data per second — the link carries `r` data
/// bytes per wire byte, the workers encode `1 / c` bytes per second each. Among the steps
/// within [`NEAR_BEST`] of the best, it takes the one with the best ratio (fewer bytes on
/// a shared link for next to no time), but a step whose ratio is within [`RATIO_GAIN`] of
/// a cheaper step's is not worth its CPU: incompressible data goes as it is. Once
/// compressing is worth it, a level whose workers have [`LINK_HEADROOM`] over the link
/// is taken for any gain in ratio: the link is the bottleneck, and bytes on a WAN cost.
///
/// What it observes, all through a few atomics, with nothing allocated per block:
/// - **the link**, by the sender, over windows of at least [`WINDOW_FRAMES`] frames and
///   [`WINDOW_TIME`]: the bytes that left the socket per second (written, less what the
///   kernel's send queue grew by, read with `TIOCOUTQ`). A send queue of at least
///   [`BUSY_QUEUE`] at both ends of the window means the link was busy throughout: that
///   rate is its capacity. Otherwise the link carried all it was given and may do more;
///   the estimate then grows by [`LINK_GROWTH`] per [`LINK_GROWTH_PERIOD`], so that a
///   faster link is found again by an occasional window with less compression. Time the
///   sender spends paying a bandwidth limit counts as time on the link (a limit is a
///   slow link). Without a socket (tests), time blocked sending against time waiting
///   for the workers tells a busy link.
/// - **the workers**, per frame: the time the frame took to encode per byte of data, as
///   a moving average per step, and the current step's ratio. The current step is
///   measured by every frame; its neighbours by one probe per worker every
///   [`PROBE_EVERY`] frames (and at once while a neighbour was never measured). A probe
///   compresses the frame's blocks at both steps on their own, into a scratch block, so
///   that the two are compared on the same data: the gain between neighbouring levels.
///   Without compression streams the probe's frame is sent as the probe encoded it;
///   with them every frame goes into the worker's stream at the current step and the
///   probe is measured aside, since a stream's level holds for a whole zstd frame: a
///   probe then costs a frame's worth of work at two levels on top of the frame, so
///   workers with streams probe every [`PROBE_EVERY_STREAMS`] frames instead. The
///   other steps' ratios are the current one's times the gains between them: what a
///   level achieves ranges from 1 to hundreds from one part of a disk to another, so a
///   ratio measured elsewhere says little, while the gain between levels holds. "None"
///   is never probed: its cost is that of hashing, measured whenever a frame goes raw.
///
/// - **what it got**: the share of the model's rate the last window spent at each step
///   moved (the model taken at the ratio the window's frames had) scales the model's
///   prediction for that step for [`OBSERVED_FOR`]: a shortfall that neither the link
///   nor the workers explain. A share, not the rate itself, and at the window's own
///   ratio: a rate seen on data that compressed far better or worse would otherwise
///   pull the policy to or from a step long after the data changed.
///
/// A target on this host (a loopback or local peer address) shares the cores that
/// compression would take: blocks then go as they are, without probes — unless a
/// bandwidth limit (`max_rate`) makes the wire the bottleneck after all.
///
/// The sender decides at the end of each window and publishes the step in one atomic
/// the workers read per frame. A sync to another host starts at zstd 1, the cheapest
/// level: a fast link shows in the first window and the policy drops compression.
/// (Starting without compression cost a 100 Mbit/s link the frames the workers had
/// encoded raw before the first decision, about 20 of them.) With compression streams
/// each worker also measures every level aside on its first frame, so that a slow link
/// reaches the level it affords in one decision rather than one step per probe; and
/// since a change of level restarts every worker's stream, which forgets the data it
/// compressed against, a level holds for [`STREAM_HOLD`] unless another moves
/// [`HOLD_UNLESS`] as much ("none" is free: its blocks do not touch the streams). A
/// target on this host gets blocks as they are from the start.
pub(crate) mod auto {
    use std::os::fd::RawFd;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use crate::config::Compression;
    use std::time::{Duration, Instant};

    /// The choices, cheapest first: none, then zstd levels.
    pub const LADDER: [Option<i32>; 5] = [None, Some(1), Some(3), Some(6), Some(9)];
    /// Frames per decision of the sender, at least...
    pub const WINDOW_FRAMES: u32 = 4;
    /// ...and at least this long.
    pub const WINDOW_TIME: Duration = Duration::from_millis(25);
    /// A send queue of at least this many bytes at both ends of a window: the link was
    /// busy all along.
    pub const BUSY_QUEUE: u64 = 256 << 10;
    /// A worker encodes one frame in this many at a neighbouring step...
    pub const PROBE_EVERY: u64 = 16;
    /// ...or, with compression streams, measures one aside in this many. Measured aside,
    /// a probe compresses the frame again at two levels: every 16 frames that took 1 Gbit/s
    /// syncs, CPU-bound at zstd 1, 5% of their speed (512 MiB OS image, medians of 6:
    /// 817 against 774 ms), and gave no better choices at 100 Mbit/s (70.1 against 69.1 MB).
    pub const PROBE_EVERY_STREAMS: u64 = 64;
    /// Steps whose predicted rate is within this share of the best are "near".
    pub const NEAR_BEST: f64 = 0.92;
    /// A compressed step whose workers encode this many times what the link carries at
    /// its ratio leaves the link the bottleneck with CPU to spare.
    pub const LINK_HEADROOM: f64 = 1.5;
    /// A step must beat the ratio of a cheaper near step by this factor to be worth it
    /// (but see [`LINK_HEADROOM`]).
    pub const RATIO_GAIN: f64 = 1.02;
    /// Growth of the link estimate while the link is not the bottleneck...
    pub const LINK_GROWTH: f64 = 1.1;
    /// ...per this much time.
    pub const LINK_GROWTH_PERIOD: Duration = Duration::from_millis(100);
    /// How long the data rate seen at a step bounds what the model predicts for it.
    pub const OBSERVED_FOR: Duration = Duration::from_secs(1);
    /// Only a window in which the sender waited for the workers at least this share of
    /// the time tells what the step moves short of the model.
    pub const STARVED: f64 = 0.2;
    /// With compression streams, a level holds for at least this long: every change
    /// between levels restarts the workers' streams, and a restarted stream has
    /// forgotten the window it compressed against...
    pub const STREAM_HOLD: Duration = Duration::from_secs(1);
    /// ...unless the level it would change to moves this many times as much.
    pub const HOLD_UNLESS: f64 = 1.25;
    /// Weight of a new sample in the moving averages, as a shift (1/8).
    const EWMA_SHIFT: u32 = 3;
    /// Unit of [`StepStats::stored_ppm`].
    const PPM: u64 = 1_000_000;

    /// What the policy knows of one step.
    #[derive(Debug, Clone, Copy, Default, PartialEq)]
    pub struct Estimate {
        /// Worker picoseconds per byte of data; `None` until measured (none: hashing
        /// only, taken as free until measured).
        pub cost_ps: Option<u64>,
        /// Data bytes per stored byte.
        pub ratio: f64,
        /// The share of the model's rate the sync moved while at this step, lately (at
        /// most 1): what the model cannot see (compression taking CPU from a receiver
        /// on the same cores, say) shows here. A share, not a rate, so that a rate seen
        /// on data that compressed better or worse does not outlive it.
        pub efficiency: Option<f64>,
    }

    /// The data rate the model gives step `e`: what the link carries at its ratio, or
    /// what the workers encode, whichever is less.
    pub fn model(link_bps: f64, workers: usize, e: &Estimate) -> f64 {
        let cpu = match e.cost_ps {
            Some(ps) if ps > 0 => workers as f64 * 1e12 / ps as f64,
            _ => f64::INFINITY,
        };
        (link_bps * e.ratio).min(cpu)
    }

    /// The step of `estimates` that `auto` should use next, given the current one (kept
    /// when nothing is known), the link's capacity in wire bytes per second and the
    /// number of workers. Steps never measured are not candidates, bar "none".
    pub fn decide(current: usize, link_bps: f64, workers: usize, estimates: &[Estimate]) -> usize {
        let rate = |e: &Estimate| model(link_bps, workers, e) * e.efficiency.unwrap_or(1.0);
        let known = |i: usize| i == 0 || estimates[i].cost_ps.is_some();
        let best = (0..estimates.len())
            .filter(|&i| known(i))
            .map(|i| rate(&estimates[i]))
            .fold(0.0, f64::max);
        let near = |i: usize| known(i) && rate(&estimates[i]) >= NEAR_BEST * best;
        let top_ratio = (0..estimates.len())
            .filter(|&i| near(i))
            .map(|i| estimates[i].ratio)
            .fold(0.0, f64::max);
        // The cheapest near step whose ratio is within RATIO_GAIN of the best near one.
        let pick = (0..estimates.len())
            .find(|&i| near(i) && estimates[i].ratio * RATIO_GAIN >= top_ratio)
            .unwrap_or(current);
        // Worth compressing, and several levels keep the link busy with CPU to spare:
        // the best ratio among them sends the fewest bytes in the same time. (Probes
        // compare levels on blocks compressed on their own, which understates what a
        // higher level gains in a stream: 0.6% against 2% from zstd 6 to 9.)
        let roomy = |i: usize| {
            let e = &estimates[i];
            let cpu = model(f64::INFINITY, workers, e);
            near(i) && cpu >= LINK_HEADROOM * link_bps * e.ratio
        };
        (pick..estimates.len())
            .filter(|&i| pick > 0 && roomy(i))
            .max_by(|&a, &b| estimates[a].ratio.total_cmp(&estimates[b].ratio))
            .filter(|&i| estimates[i].ratio >= estimates[pick].ratio)
            .unwrap_or(pick)
    }

    /// One step's moving averages; 0 is "not measured".
    #[derive(Default)]
    struct StepStats {
        cost_ps: AtomicU64,
        /// Its stored bytes per million data bytes (the inverse of its ratio), from the
        /// frames sent at it while it was current (or, for zstd 1 while "none" is, from
        /// its probes). Averaged this way, not as a ratio: what the link carries adds
        /// up in stored bytes, and the average then follows data that stops
        /// compressing 300 times within a few frames. Only the current step's is fresh:
        /// the others were measured on other data, so [`Shared::estimates`] reaches
        /// them through `gains` instead.
        stored_ppm: AtomicU64,
    }

    /// What the sender and the workers share.
    pub struct Shared {
        current: AtomicUsize,
        steps: [StepStats; LADDER.len()],
        /// `gains[k]`: step k + 1's ratio over step k's, as measured by probes on the
        /// same frames (k ≥ 1; index 0 unused). How much a level gains over its
        /// neighbour changes far less from one part of a disk to another than what
        /// either level achieves, which ranges from 1 to hundreds.
        gains: [AtomicU64; LADDER.len() - 1],
        workers: usize,
        /// The target runs on this host: it shares the CPU compression would take, so
        /// blocks go as they are, with no probes.
        same_host: bool,
        /// A worker probes a neighbouring step once in this many frames.
        probe_every: u64,
    }

    /// Whether the peer of the TCP socket `fd` is an address of this host (loopback,
    /// or the socket's own local address).
    pub fn peer_on_this_host(fd: RawFd) -> bool {
        // SAFETY: `fd` is the session's socket, open for the whole pipeline run; the
        // ManuallyDrop keeps this borrowed view from closing it.
        let stream = std::mem::ManuallyDrop::new(unsafe {
            <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd)
        });
        match (stream.local_addr(), stream.peer_addr()) {
            (Ok(local), Ok(peer)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
            _ => false,
        }
    }

    fn ewma(slot: &AtomicU64, sample: u64) {
        // Load and store, not a CAS loop: a sample lost to a race costs nothing.
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            let (o, s) = (old as i128, sample as i128);
            (o + ((s - o) >> EWMA_SHIFT)) as u64
        };
        slot.store(new.max(1), Ordering::Relaxed);
    }

    impl Shared {
        /// What the stages of a run with `cfg` share, if it compresses with `auto`.
        pub fn for_run(cfg: &super::PipelineConfig) -> Option<Self> {
            // A target on this host, unless a bandwidth limit makes the wire the
            // bottleneck after all.
            let same_host = cfg.throttle.is_none() && cfg.watch_fd.is_some_and(peer_on_this_host);
            (cfg.compression == Compression::Auto).then(|| Self {
                probe_every: if cfg.streams {
                    PROBE_EVERY_STREAMS
                } else {
                    PROBE_EVERY
                },
                ..Self::new(cfg.workers, same_host)
            })
        }

        pub fn new(workers: usize, same_host: bool) -> Self {
            Self {
                current: AtomicUsize::new(usize::from(!same_host)),
                steps: Default::default(),
                gains: Default::default(),
                workers,
                same_host,
                probe_every: PROBE_EVERY,
            }
        }

        /// Whether the policy measures levels at all: not for a target on this host,
        /// which gets blocks as they are.
        pub fn measures(&self) -> bool {
            !self.same_host
        }

        /// The step frames should use now.
        pub fn current(&self) -> usize {
            self.current.load(Ordering::Relaxed)
        }

        /// What one frame encoded at `step` cost: `data` bytes of non-zero blocks stored
        /// in `stored` bytes, in `elapsed`. A probe brings `reference`: the current step
        /// and what the same blocks take there, which gives the gain between the two
        /// levels on this very data.
        pub fn record(
            &self,
            step: usize,
            data: u64,
            stored: u64,
            elapsed: Duration,
            reference: Option<(usize, u64)>,
        ) {
            if data == 0 || stored == 0 {
                return;
            }
            self.record_cost(step, data, elapsed);
            match reference {
                // A neighbour of the current compressed step: their gain.
                Some((current, at_current)) if at_current > 0 && current > 0 => {
                    if step.abs_diff(current) == 1 {
                        let (low, at_low, at_high) = if step > current {
                            (current, at_current, stored)
                        } else {
                            (step, stored, at_current)
                        };
                        self.record_gain(low, at_low, at_high);
                    }
                }
                Some((_, 0)) => {}
                // A frame at the current step, or zstd 1 probed from "none" (whose own
                // ratio is 1 on any data): an absolute ratio.
                _ => ewma(&self.steps[step].stored_ppm, stored * PPM / data),
            }
        }

        /// What `data` bytes took a worker at `step`.
        pub fn record_cost(&self, step: usize, data: u64, elapsed: Duration) {
            if data == 0 {
                return;
            }
            let ps = (elapsed.as_nanos() * 1000 / u128::from(data)).min(u128::from(u64::MAX));
            ewma(&self.steps[step].cost_ps, ps as u64);
        }

        /// The same blocks took `at_low` bytes at step `low` and `at_high` at the next
        /// step up: their gain.
        pub fn record_gain(&self, low: usize, at_low: u64, at_high: u64) {
            if low > 0 && at_high > 0 {
                ewma(&self.gains[low], at_low * 1000 / at_high);
            }
        }

        /// Makes `step` the current one; its ratio starts from what the estimates say
        /// of it on the data of late, not from when it was last current.
        pub fn make_current(&self, step: usize, estimates: &[Estimate; LADDER.len()]) {
            if step != self.current() && step > 0 && self.measured(step) {
                let ppm = (PPM as f64 / estimates[step].ratio) as u64;
                self.steps[step]
                    .stored_ppm
                    .store(ppm.max(1), Ordering::Relaxed);
            }
            self.current.store(step, Ordering::Relaxed);
        }

        /// The estimates of every step, as they stand: the current step's ratio (zstd
        /// 1's while "none" is current), and the others' through the gains between
        /// neighbours.
        pub fn estimates(&self) -> [Estimate; LADDER.len()] {
            let anchor = self.current().max(1);
            let mut ratio = [1.0f64; LADDER.len()];
            let milli = |m: u64| (m > 0).then(|| m as f64 / 1000.0);
            let ppm = self.steps[anchor].stored_ppm.load(Ordering::Relaxed);
            ratio[anchor] = if ppm > 0 {
                PPM as f64 / ppm as f64
            } else {
                1.0
            };
            let gain = |k: usize| milli(self.gains[k].load(Ordering::Relaxed)).unwrap_or(1.0);
            for k in anchor + 1..LADDER.len() {
                ratio[k] = ratio[k - 1] * gain(k - 1);
            }
            for k in (1..anchor).rev() {
                ratio[k] = ratio[k + 1] / gain(k);
            }
            std::array::from_fn(|i| {
                let cost = self.steps[i].cost_ps.load(Ordering::Relaxed);
                Estimate {
                    cost_ps: (cost > 0).then_some(cost),
                    ratio: ratio[i],
                    efficiency: None,
                }
            })
        }

        /// Whether `step` was measured at least once.
        fn measured(&self, step: usize) -> bool {
            self.steps[step].cost_ps.load(Ordering::Relaxed) > 0
        }
    }

    /// A worker's side: which step its next frame gets, probes included.
    #[derive(Default)]
    pub struct Picker {
        frames: u64,
        probes: u64,
    }

    impl Picker {
        /// The step of the next frame: mostly the current one; a neighbour now and then
        /// (at once while a compressed neighbour was never measured).
        pub fn pick(&mut self, shared: &Shared) -> usize {
            let current = shared.current();
            if shared.same_host {
                return current;
            }
            self.frames += 1;
            let up = (current + 1 < LADDER.len()).then_some(current + 1);
            // "None" is never probed: its cost is hashing, measured on every raw frame.
            let down = (current > 1).then(|| current - 1);
            if let Some(n) = [up, down]
                .into_iter()
                .flatten()
                .find(|&n| !shared.measured(n))
            {
                return n;
            }
            if !self.frames.is_multiple_of(shared.probe_every) {
                return current;
            }
            self.probes += 1;
            match (up, down) {
                (Some(u), Some(d)) => {
                    if self.probes.is_multiple_of(2) {
                        u
                    } else {
                        d
                    }
                }
                (Some(n), None) | (None, Some(n)) => n,
                (None, None) => current,
            }
        }
    }

    /// The sender's side: the link estimate over windows of frames, and the decision at
    /// the end of each window.
    pub struct Meter {
        /// The session's socket, whose send queue tells a busy link from an idle one.
        socket: Option<RawFd>,
        /// A bandwidth limit holds the sender: time paying it is time on the link.
        limited: bool,
        frames: u32,
        wire: u64,
        data: u64,
        wait_ns: u64,
        send_ns: u64,
        started: Instant,
        queued_at_start: u64,
        link_bps: Option<f64>,
        /// Per step, the share of the model's rate the last window spent at it moved,
        /// and when.
        efficiency: [Option<(f64, Instant)>; LADDER.len()],
        /// Every frame with data in this window was encoded at the current step: only
        /// then does the window tell what the step moves (right after a change, frames
        /// encoded at the old step are still on their way).
        clean: bool,
        /// The workers keep compression streams: the level they hold and since when.
        stream_level: Option<(usize, Instant)>,
    }

    /// Bytes in the socket's send queue (sent but not yet acknowledged, or not yet
    /// sent); 0 when it cannot be read.
    fn send_queue(fd: RawFd) -> u64 {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points at a
        // live local.
        let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
        if r == 0 {
            queued.max(0) as u64
        } else {
            0
        }
    }

    impl Meter {
        /// A meter of the session's `socket`; `limited`: a bandwidth limit holds the
        /// sender; `streams`: the workers keep compression streams.
        pub fn new(socket: Option<RawFd>, limited: bool, streams: bool) -> Self {
            Self {
                socket,
                limited,
                frames: 0,
                wire: 0,
                data: 0,
                wait_ns: 0,
                send_ns: 0,
                started: Instant::now(),
                queued_at_start: socket.map_or(0, send_queue),
                link_bps: None,
                efficiency: [None; LADDER.len()],
                clean: true,
                stream_level: streams.then(|| (0, Instant::now())),
            }
        }

        /// One frame of `wire` bytes carrying `data` bytes of blocks encoded at `step`,
        /// after the sender waited `wait` for it and took `send` to put it on the socket
        /// (and pay the bandwidth limit). Frames with data make the window; at its end,
        /// sets the current step.
        pub fn sent(
            &mut self,
            shared: &Shared,
            (wire, data, step): (u64, u64, Option<usize>),
            wait: Duration,
            send: Duration,
        ) {
            self.frames += u32::from(data > 0);
            self.clean &= data == 0 || step == Some(shared.current());
            self.wire += wire;
            self.data += data;
            self.wait_ns += wait.as_nanos() as u64;
            self.send_ns += send.as_nanos() as u64;
            let elapsed = self.started.elapsed();
            if shared.same_host || self.frames < WINDOW_FRAMES || elapsed < WINDOW_TIME {
                return;
            }
            let link = self.link(elapsed);
            let current = shared.current();
            let now = Instant::now();
            let mut estimates = shared.estimates();
            // What the model gives the step at the ratio this window's frames had: how
            // much better or worse the data compressed is no shortfall of the step.
            let window = Estimate {
                ratio: self.data as f64 / self.wire.max(1) as f64,
                ..estimates[current]
            };
            let predicted = model(link, shared.workers, &window);
            let got = self.data as f64 / elapsed.as_secs_f64();
            // A window in which the sender seldom waited for the workers was the link's
            // (or the socket's): a shortfall there is no fault of the step.
            let starved = self.wait_ns as f64 >= STARVED * elapsed.as_nanos() as f64;
            if self.clean && starved && predicted > 0.0 && predicted.is_finite() {
                self.efficiency[current] = Some(((got / predicted).min(1.0), now));
            }
            self.clean = true;
            for (e, seen) in estimates.iter_mut().zip(&self.efficiency) {
                e.efficiency = seen
                    .filter(|(_, at)| now.duration_since(*at) < OBSERVED_FOR)
                    .map(|(share, _)| share);
            }
            let mut next = decide(current, link, shared.workers, &estimates);
            // The sender waited for the workers longer than for the link: they are the
            // bottleneck, and a costlier step would only slow them down. (At the start
            // of a sync the link is not yet known to be busy, and its estimate is what
            // the first frames carried: at 1 Gbit/s that sent the workers to zstd 9.)
            if self.wait_ns > self.send_ns && next > current {
                next = current;
            }
            let next = self.hold((current, next), (link, shared.workers), &estimates, now);
            tracing::debug!(
                link_mb_s = link / 1e6,
                wait_ms = self.wait_ns / 1_000_000,
                send_ms = self.send_ns / 1_000_000,
                from = ?LADDER[current],
                to = ?LADDER[next],
                ?estimates,
                "auto compression"
            );
            shared.make_current(next, &estimates);
            (self.frames, self.wire, self.data) = (0, 0, 0);
            (self.wait_ns, self.send_ns) = (0, 0);
            self.started = Instant::now();
        }

        /// `next`, or the level the streams hold when changing it is not yet worth a
        /// restart ([`STREAM_HOLD`]). "None" costs the streams nothing: its blocks do
        /// not touch them, and the level they hold resumes where it was.
        pub fn hold(
            &mut self,
            (current, next): (usize, usize),
            (link, workers): (f64, usize),
            estimates: &[Estimate; LADDER.len()],
            now: Instant,
        ) -> usize {
            let Some((held, since)) = self.stream_level else {
                return next;
            };
            // Staying at the level the sync started at is no choice: until one is made,
            // nothing is held (the policy had kept zstd 1 for a second while the first
            // frames left the sender waiting, then could not leave it).
            if next == 0 || next == held || (held == 0 && next == current) {
                return next;
            }
            let rate = |e: &Estimate| model(link, workers, e) * e.efficiency.unwrap_or(1.0);
            let young = held > 0 && now.duration_since(since) < STREAM_HOLD;
            if young && rate(&estimates[next]) < HOLD_UNLESS * rate(&estimates[held]) {
                return held;
            }
            self.stream_level = Some((next, now));
            next
        }

        /// The link estimate at the end of a window of `elapsed`: what left the socket
        /// per second (the bytes written less what the send queue grew by). If the
        /// queue stayed full the link was busy throughout, and that is its capacity;
        /// otherwise it carried all it was given and may do more.
        fn link(&mut self, elapsed: Duration) -> f64 {
            let secs = elapsed.as_secs_f64().max(1e-6);
            let (busy, left) = match self.socket {
                Some(fd) => {
                    let queued = send_queue(fd);
                    let busy = self.queued_at_start.min(queued) >= BUSY_QUEUE;
                    let left = (self.wire + self.queued_at_start).saturating_sub(queued);
                    self.queued_at_start = queued;
                    (busy, left)
                }
                None => (self.send_ns >= self.wait_ns, self.wire),
            };
            let busy = busy || (self.limited && self.send_ns >= self.wait_ns);
            let rate = left as f64 / secs;
            let link = match self.link_bps {
                Some(old) if busy => (old + rate) / 2.0,
                Some(old) => {
                    let grown = old * LINK_GROWTH.powf(secs / LINK_GROWTH_PERIOD.as_secs_f64());
                    grown.max(rate)
                }
                None => rate,
            };
            let link = link.min(1e13);
            self.link_bps = Some(link);
            link
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DiskManifest, FrameReader, STREAM_RECORDS_VERSION, STREAM_START};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    const BLOCK: u64 = 4096;
    const IO: u64 = 4 * BLOCK;

    /// A run of the tests' geometry that sends Data frames, read by the sync engine.
    fn test_config(workers: usize, compression: Compression, streams: bool) -> PipelineConfig {
        PipelineConfig {
            block_size: BLOCK as usize,
            io_size: IO as usize,
            queue_depth: 8,
            workers,
            compression,
            engine: EngineKind::Sync,
            output: Output::Data,
            watch_fd: None,
            throttle: None,
            streams,
        }
    }

    #[test]
    fn a_slot_still_out_at_a_clean_end_fails_the_epoch() {
        let (mut alloc, mut release) = BufferPool::new(4096, 4).unwrap();
        let back = alloc.alloc().unwrap();
        release.release(back);
        let failure = Failure::default();
        check_all_slots_back(Stage::Reader, alloc, &failure);
        assert!(!failure.stopped(), "every slot came back");

        let (mut alloc, _release) = BufferPool::new(4096, 4).unwrap();
        let _lost = alloc.alloc().unwrap();
        check_all_slots_back(Stage::Worker(1), alloc, &failure);
        let err = failure.take().expect("a slot is out");
        assert!(
            matches!(
                err,
                SourceError::Stage {
                    stage: Stage::Worker(1),
                    source: StageFailure::SlotsLost {
                        missing: 1,
                        slots: 4
                    }
                }
            ),
            "{err:?}"
        );
    }

    /// A plan over two disks that alternates reads and zero runs, as a fragmented image
    /// gives: per disk, `pieces` reads of `IO` bytes, each followed by a zero run.
    fn plan(pieces: u64) -> Vec<PlanItem> {
        let mut items = Vec::new();
        for disk in 0..2u32 {
            for i in 0..pieces {
                let offset = i * 2 * IO;
                items.push(PlanItem::Read {
                    disk,
                    offset,
                    len: IO as u32,
                });
                items.push(PlanItem::ZeroRun {
                    disk,
                    offset: offset + IO,
                    len: IO,
                });
            }
        }
        items
    }

    /// Every disk's ranges leave in strictly increasing offset order whatever the
    /// engine, the workers and the order reads complete in — the protocol requires it
    /// (a zero run used to overtake the reads in flight before it) — and the manifests
    /// the sender builds are those of the frames on the wire.
    #[test]
    fn ranges_leave_in_plan_order_and_the_manifest_matches_the_wire() {
        let pieces = 40;
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<std::fs::File> = (0..2)
            .map(|d| {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(dir.path().join(format!("d{d}")))
                    .unwrap();
                for i in 0..pieces {
                    f.write_all_at(&[d as u8 + 1 + i as u8; IO as usize], i * 2 * IO)
                        .unwrap();
                }
                f.set_len(pieces * 2 * IO).unwrap();
                f
            })
            .collect();
        let disks: Vec<DiskInfo<'_>> = files
            .iter()
            .map(|f| DiskInfo {
                fd: f.as_raw_fd(),
                disk_size: pieces * 2 * IO,
                replica_zeroed: false,
                frozen: None,
            })
            .collect();
        let mut engines = vec![EngineKind::Sync];
        if io_uring::IoUring::new(4).is_ok() {
            engines.push(EngineKind::Uring);
        }
        for engine in engines {
            for workers in [1, 3] {
                let cfg = PipelineConfig {
                    engine,
                    ..test_config(workers, Compression::None, false)
                };
                let mut writer = FrameWriter::new(Vec::new());
                let mut manifests = vec![ManifestBuilder::new(); 2];
                run(
                    &cfg,
                    &disks,
                    plan(pieces).into_iter().map(Ok),
                    &mut writer,
                    Some(&mut manifests),
                )
                .unwrap();

                let wire = writer.get_ref().clone();
                let mut reader = FrameReader::new(&wire[..]);
                let mut buf = vec![0u8; 1 << 20];
                let mut next = [0u64; 2];
                let mut seen = vec![ManifestBuilder::new(); 2];
                let mut frames = 0;
                while let Some((kind, payload)) = reader.read_frame(&mut buf).unwrap() {
                    let (disk, start, end) = match kind {
                        FrameKind::Data => {
                            let (h, rest) = DataHeader::ref_from_prefix(payload).unwrap();
                            let n = h.record_count.get() as usize;
                            let recs =
                                <[BlockRecord]>::ref_from_bytes(&rest[..n * BLOCK_RECORD_LEN])
                                    .unwrap();
                            let disk = h.disk.get() as usize;
                            recs.iter().for_each(|r| seen[disk].record(r));
                            let last = recs.last().unwrap();
                            (
                                disk,
                                recs[0].offset.get(),
                                last.offset.get() + u64::from(last.length.get()),
                            )
                        }
                        FrameKind::Zero => {
                            let run = DiskRun::read_from_bytes(payload).unwrap();
                            let disk = run.disk.get() as usize;
                            seen[disk].zero_run(run.start.get(), run.count.get());
                            (disk, run.start.get(), run.start.get() + run.count.get())
                        }
                        other => panic!("unexpected {other:?} frame"),
                    };
                    assert!(
                        start >= next[disk],
                        "{engine:?}, {workers} workers: disk {disk} range [{start}, {end}) after one ending at {}",
                        next[disk]
                    );
                    next[disk] = end;
                    frames += 1;
                }
                assert_eq!(frames, 2 * 2 * pieces, "{engine:?}, {workers} workers");
                let finish = |m: &[ManifestBuilder]| {
                    m.iter().map(|b| b.finish()).collect::<Vec<DiskManifest>>()
                };
                assert_eq!(
                    finish(&manifests),
                    finish(&seen),
                    "{engine:?}, {workers} workers"
                );
            }
        }
    }

    /// Blocks of 4 KiB lines that recur from block to block with small changes: each
    /// compresses far better with the blocks before it as context.
    fn stream_image(blocks: u64) -> Vec<u8> {
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        let line: Vec<u8> = (0..4096).map(|_| b'a' + (next() % 26) as u8).collect();
        let mut image = Vec::new();
        for _ in 0..blocks * BLOCK / 4096 {
            let mut l = line.clone();
            l[(next() % 4096) as usize] = b'#';
            image.extend_from_slice(&l);
        }
        image
    }

    /// With streams, every worker compresses into its own stream, and the chunks decode
    /// at the target in the order they arrive, whatever the number of workers: the
    /// sender sends each worker's frames in the order it made them. Every block is
    /// checked against its hash by the target's verifier, and the stream beats blocks
    /// compressed on their own. Workers take runs of reads per turn with streams; the
    /// plan ends in the middle of one.
    #[test]
    fn stream_chunks_decode_in_wire_order_whatever_the_workers() {
        use crate::writer::verify::{self, Decoders, Geometry};
        let pieces = 26u64;
        let image = stream_image(pieces * IO / BLOCK);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        std::fs::write(&path, &image).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let disks = [DiskInfo {
            fd: file.as_raw_fd(),
            disk_size: image.len() as u64,
            replica_zeroed: true,
            frozen: None,
        }];
        let plan = || {
            (0..pieces).map(|i| {
                Ok(PlanItem::Read {
                    disk: 0,
                    offset: i * IO,
                    len: IO as u32,
                })
            })
        };
        let mut bytes = Vec::new();
        for (workers, streams) in [(1, false), (1, true), (3, true)] {
            let cfg = test_config(workers, Compression::Zstd { level: 1 }, streams);
            let mut writer = FrameWriter::new(Vec::new());
            run(&cfg, &disks, plan(), &mut writer, None).unwrap();
            let wire = writer.get_ref().clone();
            bytes.push(wire.len());
            let mut reader = FrameReader::new(&wire[..]);
            let mut buf = vec![0u8; 1 << 20];
            let mut scratch = vec![0u8; 1 << 20];
            let mut decoders = Decoders::new(STREAM_RECORDS_VERSION).unwrap();
            let geometry = [Geometry {
                disk_size: image.len() as u64,
                block_size: BLOCK,
                granular: false,
            }];
            let (mut chunks, mut starts) = (0, 0);
            while let Some((_, payload)) = reader.read_frame(&mut buf).unwrap() {
                let (_, recs) = verify::records(payload).unwrap();
                for r in recs.iter().filter(|r| r.codec == Codec::ZstdStream as u8) {
                    chunks += 1;
                    starts += usize::from(r.stream_flags == STREAM_START);
                }
                let names = ["d".to_string()];
                verify::verify_data(
                    payload,
                    &geometry,
                    &names,
                    Some(&mut scratch),
                    &mut decoders,
                )
                .unwrap_or_else(|e| panic!("{workers} workers, streams {streams}: {e}"));
            }
            let blocks = (pieces * IO / BLOCK) as usize;
            let expected = if streams { (blocks, workers) } else { (0, 0) };
            assert_eq!(
                (chunks, starts),
                expected,
                "{workers} workers, streams {streams}"
            );
        }
        assert!(
            bytes[1] * 2 < bytes[0],
            "stream {} vs blocks {}",
            bytes[1],
            bytes[0]
        );
    }

    /// A worker gathers the small reads already queued behind a read into its frame:
    /// only reads of the same disk, only within its turn of the rotation (the messages
    /// after it follow other workers' turns in plan order), only while the frame's bytes
    /// stay within `io_size`; the first message it cannot gather comes next, untouched.
    #[test]
    fn a_frame_gathers_the_small_reads_queued_in_its_turn_and_no_more() {
        const BS: u64 = 64 << 10;
        let cfg = PipelineConfig {
            block_size: BS as usize,
            io_size: (4 * BS) as usize,
            ..test_config(1, Compression::None, true)
        };
        assert_eq!(
            TurnCount::new(&cfg).run,
            RING_DEPTH,
            "2 MiB runs of 256 KiB reads"
        );
        let (mut alloc, _back) = BufferPool::new(4096, 32).unwrap();
        let read = |disk: u32, block: u64, len: u32, alloc: &mut PoolAlloc| ReadDone::Read {
            disk,
            offset: block * BS,
            len,
            slot: alloc.alloc().unwrap(),
        };
        // Behind a first 4 KiB read of disk 0 at block 0, its turn's first message.
        let granule = 4096;
        // (case, what is queued, reads gathered, the next message's disk and offset)
        type Case = (&'static str, Vec<ReadDone>, usize, Option<(u32, u64)>);
        let cases: Vec<Case> = vec![
            (
                "three granules, then a zero run",
                vec![
                    read(0, 1, granule, &mut alloc),
                    read(0, 2, granule, &mut alloc),
                    read(0, 3, granule, &mut alloc),
                    ReadDone::ZeroRun {
                        disk: 0,
                        offset: 4 * BS,
                        len: BS,
                    },
                    read(0, 5, granule, &mut alloc),
                ],
                3,
                Some((0, 4 * BS)),
            ),
            (
                "another disk",
                vec![
                    read(0, 1, granule, &mut alloc),
                    read(1, 0, granule, &mut alloc),
                ],
                1,
                Some((1, 0)),
            ),
            (
                "a read that would pass io_size",
                vec![
                    read(0, 1, 4 * BS as u32, &mut alloc),
                    read(0, 5, granule, &mut alloc),
                ],
                0,
                Some((0, BS)),
            ),
            (
                "the end of the turn",
                (1..12).map(|b| read(0, b, granule, &mut alloc)).collect(),
                RING_DEPTH - 1,
                None,
            ),
            ("nothing queued", vec![], 0, None),
        ];
        for (case, queued, gathered_n, next) in cases {
            let (mut tx, mut rx) = spsc::channel::<ReadDone>(16);
            for m in queued {
                assert!(tx.push(m).is_ok());
            }
            let mut turn = TurnCount::new(&cfg);
            turn.took();
            let mut gathered = Gathered::default();
            let ahead = gather(&cfg, &mut rx, &mut turn, (0, 0, granule), &mut gathered);
            assert_eq!(gathered.n, gathered_n, "{case}");
            let offsets: Vec<u64> = gathered.reads[..gathered.n].iter().map(|r| r.0).collect();
            let expected: Vec<u64> = (1..=gathered_n as u64).map(|b| b * BS).collect();
            assert_eq!(offsets, expected, "{case}: in plan order");
            let got = ahead.map(|m| match m {
                ReadDone::Read { disk, offset, .. } | ReadDone::ZeroRun { disk, offset, .. } => {
                    (disk, offset)
                }
            });
            assert_eq!(got, next, "{case}: what comes next");
            // The message put back is counted once, when it is taken again.
            if next.is_some() {
                turn.took();
            }
            assert_eq!(
                turn.taken,
                1 + gathered_n + usize::from(next.is_some()),
                "{case}"
            );
        }
    }

    /// An image of `blocks` blocks of `bs` bytes, text-like (it compresses), different
    /// in every 4 KiB granule and nowhere zero, in a file of its own.
    fn granule_image(blocks: u64, bs: u64) -> (Vec<u8>, tempfile::TempDir, std::fs::File) {
        let image: Vec<u8> = (0..blocks * bs)
            .map(|i| b"ferry granules "[(i % 15) as usize] ^ ((i / 4096) as u8 & 15))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        std::fs::write(&path, &image).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        (image, dir, file)
    }

    fn image_disk(file: &std::fs::File, size: usize) -> [DiskInfo<'static>; 1] {
        [DiskInfo {
            fd: file.as_raw_fd(),
            disk_size: size as u64,
            replica_zeroed: false,
            frozen: None,
        }]
    }

    /// Reads every Data frame of `wire`, verifies it as the target does (blocks of `bs`,
    /// granule records) and checks every record's bytes, where the target places them,
    /// against `image`; `each` then sees the payload, its records and whether it needed
    /// scratch. Returns the manifest of what arrived.
    fn verify_wire(
        case: &str,
        wire: &[u8],
        (image, bs): (&[u8], u64),
        mut each: impl FnMut(&[u8], &[BlockRecord], bool),
    ) -> DiskManifest {
        use crate::writer::verify::{self, Decoders, Geometry, Place, Placer};
        let mut reader = FrameReader::new(wire);
        let mut buf = vec![0u8; 2 << 20];
        let mut scratch = vec![0u8; 2 << 20];
        let mut decoders = Decoders::new(STREAM_RECORDS_VERSION).unwrap();
        let geometry = [Geometry {
            disk_size: image.len() as u64,
            block_size: bs,
            granular: true,
        }];
        let names = ["d".to_string()];
        let mut seen = ManifestBuilder::new();
        let mut end = 0;
        while let Some((_, payload)) = reader.read_frame(&mut buf).unwrap() {
            let verified = verify::verify_data(
                payload,
                &geometry,
                &names,
                Some(&mut scratch),
                &mut decoders,
            );
            let (_, scratch_used) = verified.unwrap_or_else(|e| panic!("{case}: {e}"));
            let (_, recs) = verify::records(payload).unwrap();
            let mut placer = Placer::new();
            for r in recs {
                let (at, len) = (r.offset.get(), r.length.get() as usize);
                assert!(at >= end, "{case}: a record at {at} goes back");
                end = at + len as u64;
                let here = match placer.place(r) {
                    Place::Recv(p) => &payload[p..p + len],
                    Place::Scratch(p) => &scratch[p..p + len],
                    Place::Zero => panic!("{case}: no block of the image is zero"),
                };
                assert!(
                    here == &image[at as usize..at as usize + len],
                    "{case}: at {at}"
                );
                seen.record(r);
            }
            each(payload, recs, scratch_used > 0);
        }
        seen.finish()
    }

    /// Small reads gathered into frames reach the target exactly: every granule once, in
    /// order, verified where the target places it, and the manifest is the wire's.
    #[test]
    fn gathered_granules_arrive_whole_and_in_order() {
        const BS: u64 = 64 << 10;
        let blocks = 64u64;
        let (image, _dir, file) = granule_image(blocks, BS);
        let disks = image_disk(&file, image.len());
        // A granule or two in every block, some across a block's end.
        let plan: Vec<PlanItem> = (0..blocks)
            .map(|b| {
                let (at, len) = if b % 3 == 0 {
                    (BS - 4096, 8192)
                } else {
                    (4096 * (1 + b % 7), 4096)
                };
                PlanItem::Read {
                    disk: 0,
                    offset: b * BS + at,
                    len: len.min((blocks * BS - b * BS - at) as u32),
                }
            })
            .collect();
        let (mut granules, mut bytes) = (0, 0);
        for p in &plan {
            if let PlanItem::Read { offset, len, .. } = *p {
                granules += ((offset + u64::from(len) - 1) / BS - offset / BS + 1) as usize;
                bytes += u64::from(len);
            }
        }
        for (workers, compression) in [(1, Compression::None), (2, Compression::Zstd { level: 1 })]
        {
            let cfg = PipelineConfig {
                block_size: BS as usize,
                io_size: (4 * BS) as usize,
                ..test_config(workers, compression, true)
            };
            let mut writer = FrameWriter::new(Vec::new());
            let mut manifests = vec![ManifestBuilder::new()];
            let plan_items = plan.iter().copied().map(Ok);
            let stats = run(&cfg, &disks, plan_items, &mut writer, Some(&mut manifests)).unwrap();
            let case = format!("{workers} workers, {compression:?}");
            let (mut frames, mut records) = (0, 0);
            let arrived = verify_wire(&case, writer.get_ref(), (&image, BS), |_, recs, _| {
                frames += 1;
                records += recs.len();
            });
            assert_eq!(records, granules, "{case}: every granule once");
            assert!(frames <= plan.len(), "{case}: {frames} frames");
            assert_eq!(stats.bytes_read, bytes, "{case}: bytes read");
            assert_eq!(manifests[0].finish(), arrived, "{case}: manifest");
        }
    }

    /// A lone 4 KiB granule travels compact — 4 KiB and its table, not a table padded to
    /// 4 KiB and then the granule — and whole blocks stay aligned for the target's
    /// O_DIRECT writes; the target's verifier takes both, the compact ones through
    /// scratch. The same with compression: a compressed frame's table is never padded.
    #[test]
    fn lone_granules_travel_compact_and_whole_blocks_stay_aligned() {
        const BS: u64 = 64 << 10;
        let blocks = 8u64;
        let (image, _dir, file) = granule_image(blocks, BS);
        let disks = image_disk(&file, image.len());
        let table = core::mem::size_of::<DataHeader>() + BLOCK_RECORD_LEN;
        let granules: Vec<PlanItem> = (0..blocks)
            .map(|b| PlanItem::Read {
                disk: 0,
                offset: b * BS + 8192,
                len: 4096,
            })
            .collect();
        let whole: Vec<PlanItem> = (0..blocks / 4)
            .map(|i| PlanItem::Read {
                disk: 0,
                offset: i * 4 * BS,
                len: (4 * BS) as u32,
            })
            .collect();
        // (what is read, compression, whether every frame must be compact)
        let cases = [
            (&granules, Compression::None, true),
            (&granules, Compression::Zstd { level: 1 }, true),
            (&whole, Compression::None, false),
        ];
        for (plan, compression, compact) in cases {
            // One read per frame: without streams a worker's turn is one read.
            let cfg = PipelineConfig {
                block_size: BS as usize,
                io_size: (4 * BS) as usize,
                ..test_config(1, compression, false)
            };
            let mut writer = FrameWriter::new(Vec::new());
            run(
                &cfg,
                &disks,
                plan.iter().copied().map(Ok),
                &mut writer,
                None,
            )
            .unwrap();
            let case = format!("{compression:?}");
            let mut frames = 0;
            verify_wire(
                &case,
                writer.get_ref(),
                (&image, BS),
                |payload, recs, scratch| {
                    frames += 1;
                    let stored: usize = recs.iter().map(|r| r.stored_len.get() as usize).sum();
                    let offsets = || recs.iter().map(|r| r.payload_offset.get() as usize);
                    if compact {
                        assert_eq!(
                            offsets().next(),
                            Some(table),
                            "{case}: right after the table"
                        );
                        assert_eq!(payload.len(), table + stored, "{case}: no padding");
                    } else {
                        let aligned = offsets().all(|o| o.is_multiple_of(PAYLOAD_ALIGN));
                        assert!(aligned, "{case}: raw blocks aligned");
                    }
                    assert_eq!(scratch, compact, "{case}: scratch");
                },
            );
            assert_eq!(frames, plan.len(), "{case}: one frame per read");
        }
    }

    /// A worker with a stream measures every compressed level aside on its first frame
    /// with data, so a slow link finds its level in one decision; not when the target
    /// is on this host, which gets blocks as they are and is spared the CPU.
    #[test]
    fn the_first_frame_surveys_every_level_unless_the_target_is_here() {
        let image = stream_image(IO / BLOCK);
        for same_host in [false, true] {
            let cfg = test_config(2, Compression::Auto, true);
            let shared = auto::Shared::new(cfg.workers, same_host);
            let mut codec = WorkerCodec::new(&cfg, Some(&shared), 0).unwrap();
            let mut out = vec![0u8; output_slot_size(&cfg)];
            let table_cap = table_capacity(&cfg);
            for _ in 0..2 {
                codec
                    .encode(
                        &cfg,
                        (0, Pieces::one(0, &image)),
                        true,
                        (&mut out, table_cap),
                    )
                    .unwrap();
            }
            let e = shared.estimates();
            let measured: Vec<bool> = e[1..].iter().map(|e| e.cost_ps.is_some()).collect();
            let expected = if same_host { [false; 4] } else { [true; 4] };
            assert_eq!(measured, expected, "same host {same_host}: {e:?}");
        }
    }

    /// Workers with streams measure probes aside, at a frame's worth of extra work
    /// each, and so probe four times less often than workers without.
    #[test]
    fn workers_with_streams_probe_less_often() {
        for (streams, every) in [
            (false, auto::PROBE_EVERY),
            (true, auto::PROBE_EVERY_STREAMS),
        ] {
            let cfg = test_config(2, Compression::Auto, streams);
            let shared = auto::Shared::for_run(&cfg).unwrap();
            assert_eq!(shared.current(), 1);
            // zstd 3, the only neighbour of zstd 1 that is probed, is measured: only
            // the periodic probes remain.
            shared.record_cost(2, 256 << 10, std::time::Duration::from_micros(900));
            let mut picker = auto::Picker::default();
            let probes = (0..4 * every).filter(|_| picker.pick(&shared) != 1).count();
            assert_eq!(probes, 4, "streams {streams}");
        }
    }

    mod auto_policy {
        use super::super::auto::{
            decide, Estimate, Meter, Picker, Shared, LADDER, PROBE_EVERY, STREAM_HOLD,
        };
        use std::time::{Duration, Instant};

        const MB: f64 = 1e6;

        /// Estimates from (MB/s per worker, ratio) for each compressed step; "none"
        /// hashes at 5 GB/s.
        fn steps(compressed: [(f64, f64); 4]) -> [Estimate; 5] {
            let cost = |mbps: f64| Some((1e12 / (mbps * MB)) as u64);
            let mut e = [Estimate {
                cost_ps: cost(5000.0),
                ratio: 1.0,
                efficiency: None,
            }; 5];
            for (i, (mbps, ratio)) in compressed.into_iter().enumerate() {
                e[i + 1] = Estimate {
                    cost_ps: cost(mbps),
                    ratio,
                    efficiency: None,
                };
            }
            e
        }

        /// Text-like data: zstd 1 at 400 MB/s per worker, 9 at 30.
        fn text() -> [Estimate; 5] {
            steps([(400.0, 2.6), (200.0, 2.7), (80.0, 2.8), (30.0, 2.85)])
        }

        #[test]
        fn a_fast_link_sends_blocks_as_they_are() {
            // Loopback: the socket takes 2.5 GB/s, more than two workers compress.
            for current in 0..LADDER.len() {
                assert_eq!(
                    decide(current, 2500.0 * MB, 2, &text()),
                    0,
                    "from {current}"
                );
            }
        }

        #[test]
        fn a_slow_link_buys_what_the_cpu_can_afford() {
            // 1 Gbit/s: zstd 1 and 3 both carry ~300 MB/s of data; 3 sends fewer bytes.
            assert_eq!(LADDER[decide(0, 117.0 * MB, 2, &text())], Some(3));
            // One worker cannot keep up at 3 (200 MB/s < 117 × 2.7): zstd 1.
            assert_eq!(LADDER[decide(0, 117.0 * MB, 1, &text())], Some(1));
            // 100 Mbit/s: every level keeps up with CPU to spare; the best ratio wins,
            // however small its gain.
            assert_eq!(LADDER[decide(1, 12.0 * MB, 2, &text())], Some(9));
            // One worker: zstd 9 (30 MB/s) barely keeps up with 12 × 2.85; zstd 6 has
            // room and gains over 3 by more than RATIO_GAIN.
            assert_eq!(LADDER[decide(1, 12.0 * MB, 1, &text())], Some(6));
        }

        #[test]
        fn incompressible_data_goes_as_it_is() {
            let random = steps([(300.0, 1.0), (200.0, 1.0), (80.0, 1.01), (30.0, 1.01)]);
            for current in 0..LADDER.len() {
                assert_eq!(decide(current, 12.0 * MB, 2, &random), 0, "from {current}");
            }
        }

        #[test]
        fn unmeasured_steps_are_not_candidates() {
            let mut e = text();
            for step in &mut e[2..] {
                step.cost_ps = None;
            }
            assert_eq!(LADDER[decide(0, 12.0 * MB, 2, &e)], Some(1));
            // With nothing measured but "none", a slow link still keeps it.
            e[1].cost_ps = None;
            assert_eq!(decide(3, 12.0 * MB, 2, &e), 0);
        }

        #[test]
        fn the_current_step_stays_while_near_the_best() {
            // zstd 1 and 3 within 8% of each other and of ratio: no flapping.
            let close = steps([(400.0, 2.6), (170.0, 2.62), (50.0, 2.63), (20.0, 2.64)]);
            assert_eq!(decide(1, 117.0 * MB, 2, &close), 1);
        }

        /// A level's ratio measured on other data does not outlive it: after the policy
        /// climbed from zstd 1 on data that compressed 300 times, and the data became
        /// ordinary, zstd 1 is estimated from zstd 3's ratio now and the gain between
        /// them, not from its 300.
        #[test]
        fn ratios_measured_elsewhere_do_not_outlive_the_data() {
            let shared = Shared::new(2, false);
            let frame = 256u64 << 10;
            let t = Duration::from_micros(500);
            shared.record(1, frame, frame / 300, t, None);
            // zstd 3 stores the same blocks in 100 where zstd 1 takes 105.
            shared.record(2, frame, 100, t, Some((1, 105)));
            shared.make_current(2, &shared.estimates());
            let e = shared.estimates();
            assert!((e[2].ratio - e[1].ratio * 1.05).abs() < 1.0, "{e:?}");
            for _ in 0..80 {
                shared.record(2, frame, frame / 3, t, None);
            }
            let e = shared.estimates();
            assert!((e[2].ratio - 3.0).abs() < 0.1, "{e:?}");
            assert!((e[1].ratio - 3.0 / 1.05).abs() < 0.1, "{e:?}");
            assert_ne!(decide(2, 12.0 * MB, 2, &e), 1, "{e:?}");
        }

        /// With streams, a level holds for STREAM_HOLD unless another moves far more;
        /// "none" is free to come and go, and the held level resumes after it.
        #[test]
        fn streams_hold_their_level_unless_another_moves_far_more() {
            let mut meter = Meter::new(None, false, true);
            let started = Instant::now();
            let mut e = [Estimate::default(); LADDER.len()];
            for (i, ratio) in [1.0, 4.0, 4.2, 4.4, 4.5].into_iter().enumerate() {
                e[i] = Estimate {
                    cost_ps: Some(1000 * i as u64 + 100),
                    ratio,
                    efficiency: None,
                };
            }
            let link = 10.0 * MB;
            // Staying at the level the sync started at is no choice: nothing is held...
            assert_eq!(meter.hold((1, 1), (link, 2), &e, started), 1);
            // ...so the first change is free, and its level holds from then on.
            assert_eq!(meter.hold((1, 2), (link, 2), &e, started), 2);
            // Young: zstd 9 moves 1.07 times what zstd 3 does, not enough to restart;
            // "none" comes and goes, and zstd 3 resumes.
            assert_eq!(meter.hold((2, 4), (link, 2), &e, started), 2);
            assert_eq!(meter.hold((2, 0), (link, 2), &e, started), 0);
            assert_eq!(meter.hold((0, 4), (link, 2), &e, started), 2);
            // Far more: zstd 3 held back by a shortfall seen at it.
            e[2].efficiency = Some(0.5);
            assert_eq!(meter.hold((2, 4), (link, 2), &e, started), 4);
            e[2].efficiency = None;
            // zstd 9 is now held; once old, any change goes through.
            assert_eq!(meter.hold((4, 1), (link, 2), &e, started), 4);
            let later = started + STREAM_HOLD;
            assert_eq!(meter.hold((4, 3), (link, 2), &e, later), 3);
            // Without streams nothing is held.
            let mut plain = Meter::new(None, false, false);
            assert_eq!(plain.hold((1, 2), (link, 2), &e, started), 2);
            assert_eq!(plain.hold((2, 4), (link, 2), &e, started), 4);
        }

        /// While the sender waits for the workers more than for the link, the policy
        /// does not move to a costlier step, however slow the link looks; once the link
        /// holds the sender, it does.
        #[test]
        fn workers_that_keep_the_sender_waiting_get_no_costlier_step() {
            let frame = 256u64 << 10;
            for (wait, send, expected) in [(10, 0, Some(1)), (0, 10, Some(9))] {
                let shared = Shared::new(2, false);
                shared.record(1, frame, frame / 3, Duration::from_micros(300), None);
                for (i, micros) in [(2usize, 1300u64), (3, 2600), (4, 4000)] {
                    shared.record_cost(i, frame, Duration::from_micros(micros));
                    shared.record_gain(i - 1, 100, 95);
                }
                let mut meter = Meter::new(None, false, false);
                for _ in 0..4 {
                    let (wait, send) = (Duration::from_millis(wait), Duration::from_millis(send));
                    meter.sent(&shared, (10_000, frame, Some(1)), wait, send);
                }
                // The window also needs WINDOW_TIME to pass.
                std::thread::sleep(Duration::from_millis(30));
                meter.sent(
                    &shared,
                    (10_000, frame, Some(1)),
                    Duration::ZERO,
                    Duration::ZERO,
                );
                assert_eq!(
                    LADDER[shared.current()],
                    expected,
                    "wait {wait} ms, send {send} ms"
                );
            }
        }

        /// A survey of every level on one frame lets a slow link go from zstd 1 to the
        /// level it can afford in one decision.
        #[test]
        fn a_survey_lets_a_slow_link_jump_to_the_level_it_affords() {
            let shared = Shared::new(2, false);
            let frame = 256u64 << 10;
            shared.record(1, frame, frame / 3, Duration::from_micros(300), None);
            // zstd 3, 6 and 9 took 95, 92 and 90 where zstd 1 took 100: 10-60 MB/s per
            // worker, all well above what 12 MB/s of link carries at these ratios.
            let stored = [100u64, 95, 92, 90];
            for (i, micros) in [(1usize, 300u64), (2, 1300), (3, 2600), (4, 4000)] {
                shared.record_cost(i, frame, Duration::from_micros(micros));
            }
            for low in 1..4 {
                shared.record_gain(low, stored[low - 1], stored[low]);
            }
            let e = shared.estimates();
            assert!((e[4].ratio - 3.0 * 100.0 / 90.0).abs() < 0.05, "{e:?}");
            assert_eq!(LADDER[decide(1, 12.0 * MB, 2, &e)], Some(9), "{e:?}");
        }

        #[test]
        fn workers_probe_neighbours_and_record_what_frames_cost() {
            // A sync to another host starts at zstd 1; one to this host without it.
            assert_eq!(Shared::new(2, false).current(), 1);
            assert_eq!(Shared::new(2, true).current(), 0);
            let shared = Shared::new(2, false);
            shared.make_current(0, &shared.estimates());
            let mut picker = Picker::default();
            // Nothing measured: the first frame probes zstd 1, the neighbour of "none".
            assert_eq!(picker.pick(&shared), 1);
            shared.record(1, 256 << 10, 100 << 10, Duration::from_micros(600), None);
            let e = shared.estimates();
            assert_eq!(e[1].cost_ps, Some(600_000_000 / (256 << 10)));
            assert!((e[1].ratio - 2.56).abs() < 0.01, "{:?}", e[1]);
            assert_eq!(e[2].cost_ps, None);
            // Then mostly the current step, one probe in PROBE_EVERY.
            let picks: Vec<usize> = (0..2 * PROBE_EVERY).map(|_| picker.pick(&shared)).collect();
            assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 2, "{picks:?}");
            assert!(picks.iter().all(|&p| p <= 1));
            // A probe at zstd 3 whose blocks took 90 KiB where zstd 1 took 100 KiB: its
            // ratio is zstd 1's times that gain, whatever this frame's own ratio.
            shared.record(
                2,
                256 << 10,
                90 << 10,
                Duration::from_micros(900),
                Some((1, 100 << 10)),
            );
            let e = shared.estimates();
            assert!(
                (e[2].ratio - e[1].ratio * 100.0 / 90.0).abs() < 0.01,
                "{e:?}"
            );
            // Data without a non-zero block teaches nothing.
            shared.record(3, 0, 0, Duration::from_micros(5), Some((1, 0)));
            assert_eq!(shared.estimates()[3].cost_ps, None);
        }
    }
}
