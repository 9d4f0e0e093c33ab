//! The io_uring engine of one NBD connection: one io thread with one ring, up to
//! [`QUEUE_DEPTH`] requests in flight, and a mark waiter thread beside it.
//!
//! ```text
//!  reader ──jobs──► io thread ──SQEs──► ring ──CQEs──► io thread ──replies──► writer
//!    │                 │  ▲
//!    │        tickets  ▼  │ marked
//!    │             mark waiter (Tracker::mark_wait: group-committed bitmap sync)
//!    └── eventfd (written only when the io thread sleeps in its ring) ──► wake read
//! ```
//!
//! The io thread takes decoded requests from the job queue (`JOBS_PER_ROUND` at a
//! time), turns each into one SQE at a time (a request that needs several steps — a
//! short transfer's remainder, a FUA write's `fdatasync`, zeros written in 1 MiB
//! pieces — gets its next SQE when the previous one completes), and turns completions
//! into replies. Every request keeps its buffer (from the connection's
//! [`crate::pool::BufferPool`]) in its slot from submission until its last completion
//! is reaped, so the kernel never touches memory the shim has reused; the slot table
//! is allocated once per connection.
//!
//! What goes through the ring: reads (completed during submission when the page cache
//! has them and the file system reads without blocking — ext4, XFS, block devices —
//! otherwise asynchronously, many at once, which is where the ring beats the pool),
//! writes over [`INLINE_WRITE_MAX_BYTES`], `fdatasync` (FLUSH, FUA), `fallocate`
//! (TRIM, WRITE_ZEROES) and zero writing. Smaller writes are copied into the page
//! cache by the io thread itself, in the place of their SQE.
//!
//! **Write-intent order** is that of the thread pool ([`super::pool::execute`]):
//!
//! ```text
//! WRITE / WRITE_ZEROES:  enter gate → [preserve] → mark → (bits durable) → write … done
//!                          → leave gate → (FUA) fdatasync SQE … CQE → reply
//! TRIM:                  enter gate → frozen? leave, no-op : mark → … → fallocate … → leave → (FUA) …
//! FLUSH:                 fdatasync SQE … CQE → reply
//! ```
//!
//! The gate pass and the copy-before-write are taken on the io thread before the
//! write exists; the mark is split: [`crate::tracker::Tracker::mark_begin`] sets the
//! bits on the io thread without waiting, and if they are not durable yet the request
//! is *parked* in its slot (with its pass) while the mark waiter waits for them, so a
//! bitmap `fdatasync` never stalls the ring, and every write arriving meanwhile joins
//! the same group commit. The write is issued only once its bits are durable. The pass
//! is dropped when the write has completed. A FLUSH's `fdatasync` is submitted after
//! every write acknowledged before the FLUSH arrived has completed, because a write is
//! acknowledged only after its completion; writes still in flight are not
//! acknowledged, so NBD does not ask the FLUSH to cover them.
//!
//! **Never blocking while holding the gate.** A freeze drains the gate, that is waits
//! until every pass is dropped. Passes of this connection are dropped only by this
//! thread, so it must not block on anything a freeze can wait behind: before it waits
//! at a closed gate, or for room in the reply queue (a client that does not read its
//! replies), it first finishes every request of its own that holds a pass. Those
//! complete without anyone's help (page-cache I/O, a bitmap sync), so the freeze's
//! pause is still bounded by the slowest write in flight, as with the thread pool.
//!
//! **Costs.** BLOCK_STATUS (`lseek`), copy-before-write (one 4 KiB `pread`+`pwrite` per
//! first write to a granule of a frozen block) and small writes run on the io thread:
//! one that blocks in the kernel (dirty-page throttling, say) holds up this
//! connection's other requests meanwhile, where the pool has three more workers. And
//! one io thread does every page-cache copy of the connection: cached reads are capped
//! by one core per connection (the pool spreads them over four workers).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};

use ferry_io::uring::{self as uring_probe, UringError};
use io_uring::{opcode, squeue, types, IoUring};

use super::{
    block_status, io_refusal, sealed_refusal, tracker_refusal, Engine, Job, Reply, JOB_QUEUE_DEPTH,
};
use crate::backing::{fallocate_unsupported, Backing, ZEROS, ZERO_CHUNK_BYTES};
use crate::nbd::export::Export;
use crate::nbd::gate::{GatePass, Sealed};
use crate::nbd::proto::{Command, Durability, NbdErrno, Refusal, ZeroMode};
use crate::pool::PooledBuf;
use crate::tracker::MarkTicket;

/// Requests in flight per connection: as many as the job queue holds, so a client at
/// QD32 (fio, QEMU) never waits for a slot, and the payload budget of the connection's
/// buffer pool, not the ring, bounds memory.
pub const QUEUE_DEPTH: usize = JOB_QUEUE_DEPTH;
/// SQ entries: one per request slot plus the wake read, rounded up; the CQ is twice
/// that, and with `IORING_FEAT_NODROP` nothing is lost even beyond it.
const RING_ENTRIES: u32 = (2 * QUEUE_DEPTH) as u32;
const _: () = assert!(RING_ENTRIES as usize > QUEUE_DEPTH);
/// Registered file indices.
const BACKING_FILE: types::Fixed = types::Fixed(0);
const WAKE_FILE: types::Fixed = types::Fixed(1);
/// Writes up to this size are copied into the page cache by the io thread itself
/// (`pwrite`), larger ones go through the ring. ext4 and tmpfs have no non-blocking
/// buffered writes, so the kernel hands every ring write to an io-wq worker: two
/// context switches per write, which cost 4 KiB random writes 30–40% (measured); a
/// copy of up to 128 KiB takes the io thread tens of microseconds. Larger writes (up
/// to 32 MiB, about 10 ms of copying) stay in the ring so that the connection's other
/// requests do not wait behind them; at 256 KiB and 1 MiB both ways measured the same.
pub const INLINE_WRITE_MAX_BYTES: usize = 128 << 10;
/// Jobs started per round of the loop, before completions are reaped and replies
/// handed to the writer. Taking every queued job at once (up to 32 from a QD32 client)
/// makes a convoy: the client, the reader and the writer wait while the io thread
/// works through the batch, then all wake together; 4 keeps them overlapping (4 KiB
/// random writes at QD32: 98–119k IOPS with 64, 125–136k with 4) and still batches
/// the SQEs of reads.
const JOBS_PER_ROUND: usize = 4;
/// User data of the eventfd read; request slots use their index.
const WAKE_TAG: u64 = u64::MAX;
/// Consecutive EINTR/EAGAIN completions of one SQE before the request fails.
const TRANSIENT_RETRIES: u32 = 16;

/// Operations the engine issues.
const REQUIRED_OPS: [uring_probe::Op; 5] = {
    use uring_probe::Op;
    [Op::NOP, Op::READ, Op::WRITE, Op::FSYNC, Op::FALLOCATE]
};

/// Whether io_uring can serve the shim's data path here (see [`ferry_io::uring::usable`]:
/// a ring can be created, it has every opcode the engine uses and runs a request).
/// Probed once per process; the answer is cached.
pub fn available() -> Result<(), Arc<UringError>> {
    static PROBED: OnceLock<Result<(), Arc<UringError>>> = OnceLock::new();
    PROBED
        .get_or_init(|| uring_probe::usable(&REQUIRED_OPS).map_err(Arc::new))
        .clone()
}

/// How the reader wakes the io thread when it sleeps in its ring: an eventfd the ring
/// reads, written only if the io thread said it is going to sleep.
#[derive(Debug)]
struct Wake {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Wake {
    fn new() -> io::Result<Wake> {
        // SAFETY: eventfd(2) with constant flags; the descriptor it returns is ours.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Wake {
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        })
    }

    /// Call after queueing a job or a mark result: wakes the io thread if it is asleep
    /// in its ring (or about to be).
    fn notify(&self) {
        // Pairs with the fence in `IoLoop::block`: either the io thread sees what was
        // queued, or this thread sees `sleeping` (store-buffering is forbidden between
        // SeqCst fences).
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.ring();
        }
    }

    /// Makes the wake read complete (if one is armed, now; else when next armed).
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. EAGAIN (the counter
        // at its maximum) means a wake is already pending: nothing to do.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// A ring set up for one connection, not yet running.
struct Ring {
    ring: IoUring,
    /// Created disabled (single issuer): the io thread enables it.
    disabled: bool,
}

impl Ring {
    /// A ring with the backing store and `wake`'s eventfd registered. Where the kernel
    /// allows it (6.1+) the ring is single-issuer with deferred task work: completions
    /// are posted only when the io thread enters the kernel, which saves interrupting
    /// it. Created disabled, so the io thread that enables it becomes its issuer.
    fn new(backing: &Backing, wake: &Wake) -> io::Result<Ring> {
        let tuned = IoUring::builder()
            .dontfork()
            .setup_r_disabled()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES);
        let (ring, disabled) = match tuned {
            Ok(ring) => (ring, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (IoUring::builder().dontfork().build(RING_ENTRIES)?, false)
            }
            Err(e) => return Err(e),
        };
        ring.submitter()
            .register_files(&[backing.as_raw_fd(), wake.fd.as_raw_fd()])?;
        Ok(Ring { ring, disabled })
    }
}

/// Why a connection could not start its io_uring engine.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// No ring for this connection now (memory locked for rings exhausted, say): the
    /// thread pool can still serve it.
    #[error("cannot set up an io_uring")]
    Ring(#[source] io::Error),
    /// The io thread could not be spawned.
    #[error("cannot spawn the io_uring thread")]
    Spawn(#[source] io::Error),
}

/// The io_uring engine of one connection: its io thread, the queue that feeds it, and
/// the wake that tells the thread a job is queued when it sleeps in its ring.
pub(crate) struct UringEngine {
    jobs: SyncSender<Job>,
    wake: Arc<Wake>,
    io: JoinHandle<()>,
}

impl UringEngine {
    /// Sets up a ring on `export`'s backing store and starts the io thread on it,
    /// answering into `replies`. If the ring fails later, the thread logs it and calls
    /// `on_failure`, which closes the connection.
    pub(crate) fn start(
        export: &Arc<Export>,
        replies: SyncSender<Reply>,
        on_failure: impl FnOnce() + Send + 'static,
    ) -> Result<UringEngine, StartError> {
        let wake = Arc::new(Wake::new().map_err(StartError::Ring)?);
        let ring = Ring::new(&export.backing, &wake).map_err(StartError::Ring)?;
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(JOB_QUEUE_DEPTH);
        let io = {
            let export = Arc::clone(export);
            let wake = Arc::clone(&wake);
            thread::Builder::new()
                .name(format!("nbd-uring-{}", export.info.name))
                .spawn(move || {
                    if let Err(e) = run(ring, &export, job_rx, replies, &wake) {
                        tracing::error!(disk = %export.info.name, error = %e, "io_uring engine failed: closing the connection");
                        on_failure();
                    }
                })
                .map_err(StartError::Spawn)?
        };
        Ok(UringEngine {
            jobs: job_tx,
            wake,
            io,
        })
    }
}

impl Engine for UringEngine {
    fn submit(&self, job: Job) -> Result<(), Job> {
        self.jobs.send(job).map_err(|refused| refused.0)?;
        self.wake.notify();
        Ok(())
    }

    fn finish(self) {
        drop(self.jobs);
        // The io thread may be asleep in its ring: it notices the end only when woken.
        self.wake.ring();
        let _ = self.io.join();
    }
}

/// Runs the io thread of one connection until the job queue is closed and every
/// request has been answered, with its mark waiter beside it. An error means the ring
/// failed; requests still in flight were waited for (or, if even that failed, their
/// buffers leaked), and the caller closes the connection.
fn run(
    ring: Ring,
    export: &Export,
    jobs: Receiver<Job>,
    replies: SyncSender<Reply>,
    wake: &Wake,
) -> io::Result<()> {
    run_with(ring, export, jobs, replies, wake, |_| {})
}

/// [`run`] recording every request's events into `trace` (ordering tests).
#[cfg(test)]
fn run_traced(
    ring: Ring,
    export: &Export,
    jobs: Receiver<Job>,
    replies: SyncSender<Reply>,
    wake: &Wake,
    trace: Trace,
) -> io::Result<()> {
    run_with(ring, export, jobs, replies, wake, |io| {
        io.trace = Some(trace)
    })
}

fn run_with(
    ring: Ring,
    export: &Export,
    jobs: Receiver<Job>,
    replies: SyncSender<Reply>,
    wake: &Wake,
    setup: impl FnOnce(&mut IoLoop<'_>),
) -> io::Result<()> {
    if ring.disabled {
        ring.ring.submitter().register_enable_rings()?;
    }
    // At most QUEUE_DEPTH requests wait for marks at once: neither channel ever fills.
    let (ticket_tx, ticket_rx) = mpsc::sync_channel::<(u32, MarkTicket)>(QUEUE_DEPTH);
    let (marked_tx, marked_rx) = mpsc::sync_channel::<(u32, Result<(), Refusal>)>(QUEUE_DEPTH);
    thread::scope(|scope| {
        thread::Builder::new()
            .name(format!("nbd-mark-{}", export.info.name))
            .spawn_scoped(scope, move || {
                wait_marks(export, &ticket_rx, &marked_tx, wake)
            })?;
        let mut io = IoLoop::new(ring.ring, export, replies, wake, ticket_tx, marked_rx);
        setup(&mut io);
        io.serve(&jobs)
        // `io` drops here, closing the ticket channel: the waiter ends, the scope joins.
    })
}

/// The mark waiter of one connection: waits until each parked request's bits are
/// durable (becoming the tracker's syncer when nobody else is, so every bit set
/// meanwhile, by any connection, joins that one `fdatasync`), then hands the request
/// back to the io thread.
fn wait_marks(
    export: &Export,
    tickets: &Receiver<(u32, MarkTicket)>,
    marked: &SyncSender<(u32, Result<(), Refusal>)>,
    wake: &Wake,
) {
    for (slot, ticket) in tickets {
        let result = export
            .tracker
            .mark_wait(ticket)
            .map_err(|e| tracker_refusal(export, &e));
        if marked.send((slot, result)).is_err() {
            return;
        }
        wake.notify();
    }
}

#[cfg(test)]
mod tests;

/// Steps of requests in flight. Each holds what its SQE points at.
enum Step<'a> {
    Read {
        buf: PooledBuf,
        offset: u64,
        done: usize,
    },
    Write {
        buf: PooledBuf,
        offset: u64,
        done: usize,
        durability: Durability,
        _pass: GatePass<'a>,
    },
    Fallocate {
        what: Alloc,
        offset: u64,
        len: u64,
        durability: Durability,
        pass: GatePass<'a>,
    },
    /// Zeros written from the static zero buffer, one piece at a time.
    ZeroFill {
        offset: u64,
        len: u64,
        done: u64,
        durability: Durability,
        _pass: GatePass<'a>,
    },
    /// `fdatasync`: a FLUSH, or the second half of a FUA command named `op`.
    Sync { op: &'static str, offset: u64 },
}

#[derive(Clone, Copy, Debug)]
enum Alloc {
    Trim,
    Zeroes(ZeroMode),
}

impl Step<'_> {
    fn holds_gate(&self) -> bool {
        matches!(
            self,
            Step::Write { .. } | Step::Fallocate { .. } | Step::ZeroFill { .. }
        )
    }

    fn kind(&self) -> Kind {
        match self {
            Step::Read { .. } => Kind::Read,
            Step::Write { .. } => Kind::Write,
            Step::Fallocate { .. } => Kind::Fallocate,
            Step::ZeroFill { .. } => Kind::ZeroFill,
            Step::Sync { .. } => Kind::Sync,
        }
    }

    /// The SQE for this step's next piece of work.
    fn sqe(&mut self) -> squeue::Entry {
        match self {
            Step::Read { buf, offset, done } => {
                let rest = &mut buf[*done..];
                opcode::Read::new(BACKING_FILE, rest.as_mut_ptr(), rest.len() as u32)
                    .offset(*offset + *done as u64)
                    .build()
            }
            Step::Write {
                buf, offset, done, ..
            } => {
                let rest = &buf[*done..];
                opcode::Write::new(BACKING_FILE, rest.as_ptr(), rest.len() as u32)
                    .offset(*offset + *done as u64)
                    .build()
            }
            Step::Fallocate {
                what, offset, len, ..
            } => {
                let mode = match what {
                    Alloc::Trim => Backing::TRIM_FLAGS,
                    Alloc::Zeroes(mode) => Backing::zero_flags(*mode),
                };
                opcode::Fallocate::new(BACKING_FILE, *len)
                    .offset(*offset)
                    .mode(mode)
                    .build()
            }
            Step::ZeroFill {
                offset, len, done, ..
            } => {
                let n = (*len - *done).min(ZERO_CHUNK_BYTES as u64) as u32;
                opcode::Write::new(BACKING_FILE, ZEROS.as_ptr(), n)
                    .offset(*offset + *done)
                    .build()
            }
            Step::Sync { .. } => opcode::Fsync::new(BACKING_FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }
}

/// One request in flight.
struct Op<'a> {
    cookie: u64,
    /// Consecutive EINTR/EAGAIN completions of the current SQE.
    retries: u32,
    /// Parked: its step waits for the mark waiter, not for the kernel (no SQE yet).
    parked: bool,
    step: Step<'a>,
}

enum Outcome<'a> {
    /// Submit the op's (next) step.
    Continue(Op<'a>),
    Done(Reply),
}

/// What the ordering tests observe: the kind of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Fallocate,
    ZeroFill,
    Sync,
}

/// What the ordering tests observe: one event of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ev {
    Entered,
    Marked,
    Submitted(Kind),
    Completed(Kind),
    Left,
    Replied,
}

#[cfg(test)]
pub(crate) type Trace = std::sync::Arc<std::sync::Mutex<Vec<(u64, Ev)>>>;

fn reply_cookie(reply: &Reply) -> u64 {
    match reply {
        Reply::Done { cookie, .. } | Reply::Read { cookie, .. } => *cookie,
        Reply::BlockStatus { cookie, .. } => *cookie,
    }
}

/// Where the completion of one step leaves its request.
enum StepEnd<'a> {
    /// Submit this step: the rest of a short transfer, or a fallback.
    Next(Step<'a>),
    /// The change `op` at `offset` is complete, its gate pass dropped with its step.
    Changed {
        durability: Durability,
        op: &'static str,
        offset: u64,
    },
    /// The request is answered.
    Reply(Reply),
    /// The request failed; `op` at `offset` names it in the refusal.
    Failed {
        op: &'static str,
        offset: u64,
        error: io::Error,
    },
}

/// A read step completed `res`: the rest of a short read, or the data.
fn read_step_done<'a>(
    cookie: u64,
    buf: PooledBuf,
    offset: u64,
    done: usize,
    res: i32,
) -> StepEnd<'a> {
    let failed = |error| StepEnd::Failed {
        op: "read",
        offset,
        error,
    };
    if res < 0 {
        return failed(os_error(res));
    }
    if res == 0 {
        // The file shrank under us: what `read_exact_at` reports.
        return failed(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "failed to fill whole buffer",
        ));
    }
    let done = done + res as usize;
    if done < buf.len() {
        return StepEnd::Next(Step::Read { buf, offset, done });
    }
    StepEnd::Reply(Reply::Read {
        cookie,
        offset,
        data: buf,
    })
}

/// A write step completed `res`: the rest of a short write, or the change is done.
fn write_step_done(
    buf: PooledBuf,
    offset: u64,
    done: usize,
    durability: Durability,
    pass: GatePass<'_>,
    res: i32,
) -> StepEnd<'_> {
    let failed = |error| StepEnd::Failed {
        op: "write",
        offset,
        error,
    };
    if res < 0 {
        return failed(os_error(res));
    }
    if res == 0 {
        return failed(io::Error::new(
            io::ErrorKind::WriteZero,
            "failed to write whole buffer",
        ));
    }
    let done = done + res as usize;
    if done < buf.len() {
        return StepEnd::Next(Step::Write {
            buf,
            offset,
            done,
            durability,
            _pass: pass,
        });
    }
    drop((buf, pass));
    StepEnd::Changed {
        durability,
        op: "write",
        offset,
    }
}

/// A trim or write-zeroes fallocate completed `res`: done, or zeros written instead
/// where the store cannot zero a range by itself.
fn fallocate_step_done(
    what: Alloc,
    offset: u64,
    len: u64,
    durability: Durability,
    pass: GatePass<'_>,
    res: i32,
) -> StepEnd<'_> {
    let (op, fallback) = match what {
        Alloc::Trim => ("trim", false),
        Alloc::Zeroes(_) => ("write zeroes", true),
    };
    if res < 0 && !fallocate_unsupported(-res) {
        return StepEnd::Failed {
            op,
            offset,
            error: os_error(res),
        };
    }
    if res < 0 && fallback {
        // The store cannot zero a range by itself: write zeros.
        return StepEnd::Next(Step::ZeroFill {
            offset,
            len,
            done: 0,
            durability,
            _pass: pass,
        });
    }
    // Done, or a TRIM the store cannot do (a hint: success).
    drop(pass);
    StepEnd::Changed {
        durability,
        op,
        offset,
    }
}

/// A piece of zeros was written (`res`): the next piece, or the change is done.
fn zero_fill_step_done(
    offset: u64,
    len: u64,
    done: u64,
    durability: Durability,
    pass: GatePass<'_>,
    res: i32,
) -> StepEnd<'_> {
    let failed = |error| StepEnd::Failed {
        op: "write zeroes",
        offset,
        error,
    };
    if res < 0 {
        return failed(os_error(res));
    }
    if res == 0 {
        return failed(io::Error::new(
            io::ErrorKind::WriteZero,
            "failed to write whole buffer",
        ));
    }
    let done = done + res as u64;
    if done < len {
        return StepEnd::Next(Step::ZeroFill {
            offset,
            len,
            done,
            durability,
            _pass: pass,
        });
    }
    drop(pass);
    StepEnd::Changed {
        durability,
        op: "write zeroes",
        offset,
    }
}

fn os_error(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

fn transient(res: i32) -> bool {
    matches!(-res, libc::EINTR | libc::EAGAIN)
}

struct IoLoop<'a> {
    export: &'a Export,
    ring: IoUring,
    /// Requests in flight (in the kernel, or parked for a mark), by slot (= SQE user
    /// data). Allocated once.
    slots: Vec<Option<Op<'a>>>,
    /// Free slot indices; capacity QUEUE_DEPTH, never grown.
    free: Vec<u32>,
    /// Requests in flight that hold a gate pass.
    gated: usize,
    /// Requests parked for a mark.
    parked: usize,
    /// Writes up to this size are done inline (`pwrite`), larger ones in the ring.
    inline_write_max: usize,
    /// Replies not yet handed to the writer, oldest first: those of the current round
    /// (handed over together, so the writer wakes once per round and coalesces its
    /// socket writes), and those its queue had no room for. At most QUEUE_DEPTH: a job
    /// is taken only while requests in flight plus replies here are fewer, and each
    /// job makes one reply.
    backlog: VecDeque<Reply>,
    replies: SyncSender<Reply>,
    /// A job taken off the queue while going to sleep, started next.
    next_job: Option<Job>,
    /// Parked requests to the mark waiter, and their results back.
    tickets: SyncSender<(u32, MarkTicket)>,
    marked: Receiver<(u32, Result<(), Refusal>)>,
    wake: &'a Wake,
    /// The eventfd read is in the ring.
    wake_armed: bool,
    /// Where the eventfd read lands; boxed so its address is stable.
    wake_word: Box<u64>,
    #[cfg(test)]
    trace: Option<Trace>,
}

impl<'a> IoLoop<'a> {
    fn new(
        ring: IoUring,
        export: &'a Export,
        replies: SyncSender<Reply>,
        wake: &'a Wake,
        tickets: SyncSender<(u32, MarkTicket)>,
        marked: Receiver<(u32, Result<(), Refusal>)>,
    ) -> IoLoop<'a> {
        IoLoop {
            export,
            ring,
            slots: (0..QUEUE_DEPTH).map(|_| None).collect(),
            free: (0..QUEUE_DEPTH as u32).rev().collect(),
            gated: 0,
            parked: 0,
            inline_write_max: INLINE_WRITE_MAX_BYTES,
            backlog: VecDeque::with_capacity(QUEUE_DEPTH),
            replies,
            next_job: None,
            tickets,
            marked,
            wake,
            wake_armed: false,
            wake_word: Box::new(0),
            #[cfg(test)]
            trace: None,
        }
    }

    /// Records an event for the ordering tests; compiled to nothing otherwise (the
    /// closure is never called).
    #[inline]
    fn ev(&self, _cookie: u64, _ev: impl FnOnce() -> Ev) {
        #[cfg(test)]
        if let Some(t) = &self.trace {
            t.lock().unwrap().push((_cookie, _ev()));
        }
    }

    fn in_flight(&self) -> usize {
        QUEUE_DEPTH - self.free.len()
    }

    /// The main loop; returns once `jobs` is closed and everything is answered.
    fn serve(&mut self, jobs: &Receiver<Job>) -> io::Result<()> {
        let mut closing = false;
        loop {
            self.push_backlog();
            self.take_marks();
            let mut taken = 0;
            while self.in_flight() + self.backlog.len() < QUEUE_DEPTH && taken < JOBS_PER_ROUND {
                taken += 1;
                if let Some(job) = self.next_job.take() {
                    self.start(job);
                    continue;
                }
                if closing {
                    break;
                }
                match jobs.try_recv() {
                    Ok(job) => self.start(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => closing = true,
                }
            }
            self.submit()?;
            if self.reap() > 0 {
                continue;
            }
            self.push_backlog();
            if !self.backlog.is_empty() && self.gated == 0 {
                // The client is slow to read its replies. Nothing of ours holds the
                // gate, so waiting for it delays only this connection (requests in the
                // kernel complete meanwhile and wait in the CQ).
                if let Some(reply) = self.backlog.pop_front() {
                    let _ = self.replies.send(reply);
                }
                continue;
            }
            if closing
                && self.in_flight() == 0
                && self.backlog.is_empty()
                && self.next_job.is_none()
            {
                break;
            }
            // Wait for a completion or a mark; for a job too if one would be taken.
            let take_jobs = !closing && self.in_flight() + self.backlog.len() < QUEUE_DEPTH;
            if take_jobs && self.in_flight() == 0 {
                // Nothing in the kernel, nothing waiting for a mark, every reply handed
                // over: only a job can come next. Wait for it on the queue itself, as
                // a pool worker would; cheaper than a ring wait and an eventfd write.
                match jobs.recv() {
                    Ok(job) => self.next_job = Some(job),
                    Err(_) => closing = true,
                }
                continue;
            }
            if take_jobs {
                match self.block(Some(jobs))? {
                    Some(Err(TryRecvError::Disconnected)) => closing = true,
                    Some(Ok(job)) => self.next_job = Some(job),
                    _ => {}
                }
            } else {
                self.block(None)?;
            }
        }
        // The wake read must not outlive `wake_word`: complete it and reap it.
        if self.wake_armed {
            self.wake.ring();
            while self.wake_armed {
                self.enter(1)?;
                self.reap();
            }
        }
        Ok(())
    }

    /// Sleeps in the ring until a completion arrives or the wake rings: a mark result,
    /// or (with `jobs`) a job. Returns what `jobs.try_recv` gave if it was tried and
    /// found something (or found the queue closed); the caller starts that job.
    fn block(
        &mut self,
        jobs: Option<&Receiver<Job>>,
    ) -> io::Result<Option<Result<Job, TryRecvError>>> {
        self.push_backlog();
        self.arm_wake()?;
        self.wake.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // Re-check after announcing the sleep: what was queued before the notifier saw
        // `sleeping` is visible now.
        let mut found = None;
        if self.take_marks() > 0 {
            found = Some(Err(TryRecvError::Empty));
        } else if let Some(jobs) = jobs {
            match jobs.try_recv() {
                Err(TryRecvError::Empty) => {}
                other => found = Some(other),
            }
        }
        let result = if found.is_some() {
            Ok(())
        } else {
            self.enter(1)
        };
        self.wake.sleeping.store(false, Ordering::Relaxed);
        result?;
        Ok(found.filter(|f| !matches!(f, Err(TryRecvError::Empty))))
    }

    /// One round of progress without taking jobs: mark results, submissions,
    /// completions; sleeps if there was nothing.
    fn pump(&mut self) -> io::Result<()> {
        let mut progress = self.take_marks();
        self.submit()?;
        progress += self.reap();
        if progress == 0 {
            self.block(None)?;
        }
        Ok(())
    }

    /// Starts one request: answers it at once, or puts its first step in the ring.
    fn start(&mut self, job: Job) {
        let Job {
            cookie,
            command,
            payload,
        } = job;
        let export = self.export;
        let op = |step| Op {
            cookie,
            retries: 0,
            parked: false,
            step,
        };
        match command {
            Command::Read { offset, length } => {
                let Some(buf) = payload else {
                    unreachable!("the reader reserves a buffer for every read")
                };
                debug_assert_eq!(buf.len(), length as usize);
                if length == 0 {
                    return self.deliver(Reply::Read {
                        cookie,
                        offset,
                        data: buf,
                    });
                }
                self.submit_op(op(Step::Read {
                    buf,
                    offset,
                    done: 0,
                }));
            }
            Command::Write {
                offset,
                length,
                durability,
            } => {
                let Some(pass) = self.enter_gate(cookie) else {
                    return;
                };
                if let Some(frozen) = pass.frozen() {
                    frozen.preserve(&export.backing, offset, u64::from(length));
                }
                let Some(ticket) = self.mark(cookie, offset, u64::from(length)) else {
                    return;
                };
                let Some(buf) = payload.filter(|_| length > 0) else {
                    drop(pass);
                    return self.after_change(cookie, durability, "write", offset);
                };
                self.submit_change(
                    op(Step::Write {
                        buf,
                        offset,
                        done: 0,
                        durability,
                        _pass: pass,
                    }),
                    ticket,
                );
            }
            Command::Flush => self.submit_op(op(Step::Sync {
                op: "flush",
                offset: 0,
            })),
            Command::Trim {
                offset,
                length,
                durability,
            } => {
                let Some(pass) = self.enter_gate(cookie) else {
                    return;
                };
                // TRIM is advisory: while an epoch is frozen it is dropped, so no
                // range turns into a hole under the engine (and nothing changes).
                if pass.frozen().is_some() {
                    drop(pass);
                    return self.after_change(cookie, durability, "trim", offset);
                }
                let Some(ticket) = self.mark(cookie, offset, u64::from(length)) else {
                    return;
                };
                if length == 0 {
                    drop(pass);
                    return self.after_change(cookie, durability, "trim", offset);
                }
                self.submit_change(
                    op(Step::Fallocate {
                        what: Alloc::Trim,
                        offset,
                        len: u64::from(length),
                        durability,
                        pass,
                    }),
                    ticket,
                );
            }
            Command::WriteZeroes {
                offset,
                length,
                mode,
                durability,
            } => {
                let Some(pass) = self.enter_gate(cookie) else {
                    return;
                };
                let frozen = pass.frozen().is_some();
                if let Some(f) = pass.frozen() {
                    f.preserve(&export.backing, offset, u64::from(length));
                }
                let Some(ticket) = self.mark(cookie, offset, u64::from(length)) else {
                    return;
                };
                if length == 0 {
                    drop(pass);
                    return self.after_change(cookie, durability, "write zeroes", offset);
                }
                let len = u64::from(length);
                // Frozen: zeros are written, never punched (see `epoch`).
                let step = if frozen {
                    Step::ZeroFill {
                        offset,
                        len,
                        done: 0,
                        durability,
                        _pass: pass,
                    }
                } else {
                    Step::Fallocate {
                        what: Alloc::Zeroes(mode),
                        offset,
                        len,
                        durability,
                        pass,
                    }
                };
                self.submit_change(op(step), ticket);
            }
            Command::Cache | Command::Disconnect => self.deliver(Reply::Done {
                cookie,
                result: Ok(()),
            }),
            Command::BlockStatus { offset, length, .. } => {
                let reply = block_status(&export.backing, cookie, offset, length, payload);
                self.deliver(reply);
            }
        }
    }

    /// Enters the write gate. If a freeze is draining it, first reaps every request of
    /// ours inside it (they complete on their own), then waits at the gate with
    /// nothing of ours inside, so the drain never waits for this thread. Returns
    /// `None` (the request already answered) if the ring failed meanwhile or the gate
    /// is sealed (the write refused).
    fn enter_gate(&mut self, cookie: u64) -> Option<GatePass<'a>> {
        let gate = &self.export.gate;
        let sealed = |this: &mut Self| {
            this.deliver(Reply::Done {
                cookie,
                result: Err(sealed_refusal(this.export, "write")),
            });
            None
        };
        let pass = loop {
            match gate.try_enter() {
                Ok(Some(pass)) => break pass,
                Ok(None) => {}
                Err(Sealed) => return sealed(self),
            }
            if self.gated == 0 {
                // Nothing of ours inside: wait at the gate, replies handed over first.
                self.push_backlog();
                match gate.enter() {
                    Ok(pass) => break pass,
                    Err(Sealed) => return sealed(self),
                }
            }
            // Ours are inside (in the kernel, or waiting for their marks): they
            // finish on their own; the gate then drains without us.
            if let Err(e) = self.pump() {
                self.deliver(Reply::Done {
                    cookie,
                    result: Err(io_refusal(self.export, "enter the write gate", 0, &e)),
                });
                return None;
            }
        };
        self.ev(cookie, || Ev::Entered);
        Some(pass)
    }

    /// Sets the tracker's bits without waiting: `Some(None)` if they are durable
    /// already, `Some(Some(ticket))` if the change must wait for them. On failure
    /// answers the request (the pass, dropped by the caller's return, leaves the
    /// gate) and returns `None`.
    fn mark(&mut self, cookie: u64, offset: u64, len: u64) -> Option<Option<MarkTicket>> {
        match self.export.tracker.mark_begin(offset, len) {
            Ok(ticket) => {
                if ticket.is_none() {
                    self.ev(cookie, || Ev::Marked);
                }
                Some(ticket)
            }
            Err(e) => {
                let refusal = tracker_refusal(self.export, &e);
                self.deliver(Reply::Done {
                    cookie,
                    result: Err(refusal),
                });
                None
            }
        }
    }

    /// Submits a change whose bits are durable, or parks it (holding its gate pass)
    /// until the mark waiter says they are.
    fn submit_change(&mut self, op: Op<'a>, ticket: Option<MarkTicket>) {
        let Some(ticket) = ticket else {
            return self.submit_op(op);
        };
        let slot = self
            .free
            .pop()
            .expect("a job is started only when a slot is free");
        if op.step.holds_gate() {
            self.gated += 1;
        }
        self.parked += 1;
        self.slots[slot as usize] = Some(Op { parked: true, ..op });
        // Never full: it holds at most one entry per slot.
        if let Err(e) = self.tickets.try_send((slot, ticket)) {
            let (TrySendError::Full((slot, _)) | TrySendError::Disconnected((slot, _))) = e;
            let refusal = Refusal {
                errno: NbdErrno::Io,
                reason: "change tracking failed; write not performed",
            };
            tracing::error!(disk = %self.export.info.name, "the mark waiter is gone; write refused");
            self.marked_result(slot, Err(refusal));
        }
    }

    /// Takes every mark result available; returns how many there were.
    fn take_marks(&mut self) -> usize {
        let mut n = 0;
        while let Ok((slot, result)) = self.marked.try_recv() {
            self.marked_result(slot, result);
            n += 1;
        }
        n
    }

    /// A parked request's bits are durable (submit its change) or cannot be (refuse
    /// it; its pass leaves the gate).
    fn marked_result(&mut self, slot: u32, result: Result<(), Refusal>) {
        // `take_if`: a request in the kernel must stay in its slot, even on the way to
        // this panic (its buffer may still be written).
        let Some(mut op) = self.slots[slot as usize].take_if(|op| op.parked) else {
            panic!("mark result for slot {slot}, which holds no parked request");
        };
        self.parked -= 1;
        op.parked = false;
        match result {
            Ok(()) => {
                self.ev(op.cookie, || Ev::Marked);
                self.issue(slot, op);
            }
            Err(refusal) => {
                if op.step.holds_gate() {
                    self.gated -= 1;
                }
                self.free.push(slot);
                let cookie = op.cookie;
                drop(op);
                self.deliver(Reply::Done {
                    cookie,
                    result: Err(refusal),
                });
            }
        }
    }

    /// After a change completed (gate left): `fdatasync` for FUA, then reply.
    fn after_change(&mut self, cookie: u64, durability: Durability, op: &'static str, offset: u64) {
        if durability == Durability::ForceUnitAccess {
            self.submit_op(Op {
                cookie,
                retries: 0,
                parked: false,
                step: Step::Sync { op, offset },
            });
        } else {
            self.deliver(Reply::Done {
                cookie,
                result: Ok(()),
            });
        }
    }

    /// Puts a new request in a free slot and its first SQE in the ring.
    fn submit_op(&mut self, op: Op<'a>) {
        let slot = self
            .free
            .pop()
            .expect("a job is started only when a slot is free");
        if op.step.holds_gate() {
            self.gated += 1;
        }
        self.issue(slot, op);
    }

    /// Queues the SQE of `op`'s current step, tagged with `slot`, and parks `op` there.
    fn issue(&mut self, slot: u32, mut op: Op<'a>) {
        if let Step::Write {
            buf,
            offset,
            done: 0,
            ..
        } = &op.step
        {
            if buf.len() <= self.inline_write_max {
                // A small write is copied into the page cache right here, as the
                // kernel does inline for file systems with non-blocking buffered
                // writes; ext4 and tmpfs have none and would hand it to an io-wq
                // worker, two context switches per write.
                self.ev(op.cookie, || Ev::Submitted(Kind::Write));
                let res = match self.export.backing.write_at(buf, *offset) {
                    Ok(()) => buf.len() as i32,
                    Err(e) => e.raw_os_error().map_or(0, |errno| -errno),
                };
                return self.finish_step(slot, op, res);
            }
        }
        let entry = op.step.sqe().user_data(u64::from(slot));
        self.ev(op.cookie, || Ev::Submitted(op.step.kind()));
        if let Err(e) = self.push(&entry) {
            // Not in the kernel: the op and its buffer can go.
            if op.step.holds_gate() {
                self.gated -= 1;
            }
            self.free.push(slot);
            let reply = Reply::Done {
                cookie: op.cookie,
                result: Err(io_refusal(self.export, "submit", 0, &e)),
            };
            drop(op);
            return self.deliver(reply);
        }
        // Without SQPOLL the kernel reads the SQE only at our next io_uring_enter, by
        // which time the buffer it points at sits in its slot.
        self.slots[slot as usize] = Some(op);
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: the entry points at the registered backing store and, for reads
            // and writes, at bytes of a buffer owned by the op that `issue` parks in
            // the slot named by the entry's user data (or at the static zero buffer,
            // or at `wake_word`); the op stays there, untouched, until its completion
            // is reaped, and the loop never ends (nor drops the buffers) with requests
            // in flight.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // Never expected: the SQ holds every slot plus the wake read. Make room.
            self.enter(0)?;
        }
        Err(io::Error::other("io_uring submission queue full"))
    }

    /// Hands queued SQEs to the kernel and runs deferred completions, if there are any.
    fn submit(&mut self) -> io::Result<()> {
        let sq = self.ring.submission();
        let needed = !sq.is_empty() || sq.taskrun() || sq.cq_overflow();
        drop(sq);
        if needed {
            self.enter(0)?;
        }
        Ok(())
    }

    fn enter(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            // Interrupted, or the kernel is short of memory or has completions backed
            // up: the caller reaps and comes back.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                std::thread::sleep(std::time::Duration::from_micros(100));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        if self.wake_armed {
            return Ok(());
        }
        let word: *mut u64 = &mut *self.wake_word;
        let entry = opcode::Read::new(WAKE_FILE, word.cast(), 8)
            .build()
            .user_data(WAKE_TAG);
        self.push(&entry)?;
        self.wake_armed = true;
        Ok(())
    }

    /// Processes every completion available; returns how many there were.
    fn reap(&mut self) -> usize {
        let mut total = 0;
        loop {
            let mut batch = [(0u64, 0i32); 32];
            let mut n = 0;
            for cqe in self.ring.completion() {
                batch[n] = (cqe.user_data(), cqe.result());
                n += 1;
                if n == batch.len() {
                    break;
                }
            }
            for &(user_data, res) in &batch[..n] {
                self.complete(user_data, res);
            }
            total += n;
            if n < batch.len() {
                return total;
            }
        }
    }

    fn complete(&mut self, user_data: u64, res: i32) {
        if user_data == WAKE_TAG {
            self.wake_armed = false;
            return;
        }
        let slot = user_data as u32;
        let Some(op) = self
            .slots
            .get_mut(slot as usize)
            .and_then(|s| s.take_if(|op| !op.parked))
        else {
            // The kernel echoes only user data we gave it, one SQE per slot at a time;
            // anything else means the table is corrupt and a buffer might be reused
            // while the kernel still writes it.
            panic!("io_uring completion for slot {slot}, which holds no request");
        };
        self.finish_step(slot, op, res);
    }

    /// The current step of the request in `slot` (taken out of it) ended with `res`.
    fn finish_step(&mut self, slot: u32, op: Op<'a>, res: i32) {
        let cookie = op.cookie;
        let gated = op.step.holds_gate();
        self.ev(cookie, || Ev::Completed(op.step.kind()));
        match self.advance(op, res) {
            Outcome::Continue(op) => {
                if gated && !op.step.holds_gate() {
                    self.gated -= 1;
                    self.ev(cookie, || Ev::Left);
                }
                self.issue(slot, op);
            }
            Outcome::Done(reply) => {
                if gated {
                    self.gated -= 1;
                    self.ev(cookie, || Ev::Left);
                }
                self.free.push(slot);
                self.deliver(reply);
            }
        }
    }

    /// What a completion means for its request.
    fn advance(&self, mut op: Op<'a>, res: i32) -> Outcome<'a> {
        if res < 0 && transient(res) && op.retries < TRANSIENT_RETRIES {
            op.retries += 1;
            return Outcome::Continue(op);
        }
        op.retries = 0;
        let cookie = op.cookie;
        let end = match op.step {
            Step::Read { buf, offset, done } => read_step_done(cookie, buf, offset, done, res),
            Step::Write {
                buf,
                offset,
                done,
                durability,
                _pass,
            } => write_step_done(buf, offset, done, durability, _pass, res),
            Step::Fallocate {
                what,
                offset,
                len,
                durability,
                pass,
            } => fallocate_step_done(what, offset, len, durability, pass, res),
            Step::ZeroFill {
                offset,
                len,
                done,
                durability,
                _pass,
            } => zero_fill_step_done(offset, len, done, durability, _pass, res),
            Step::Sync { op, offset } if res < 0 => StepEnd::Failed {
                op,
                offset,
                error: os_error(res),
            },
            Step::Sync { .. } => StepEnd::Reply(Reply::Done {
                cookie,
                result: Ok(()),
            }),
        };
        match end {
            StepEnd::Next(step) => {
                op.step = step;
                Outcome::Continue(op)
            }
            // A change is complete (and its pass dropped with its step): sync or reply.
            StepEnd::Changed {
                durability: Durability::ForceUnitAccess,
                op,
                offset,
            } => Outcome::Continue(Op {
                cookie,
                retries: 0,
                parked: false,
                step: Step::Sync { op, offset },
            }),
            StepEnd::Changed { .. } => Outcome::Done(Reply::Done {
                cookie,
                result: Ok(()),
            }),
            StepEnd::Reply(reply) => Outcome::Done(reply),
            StepEnd::Failed { op, offset, error } => Outcome::Done(Reply::Done {
                cookie,
                result: Err(io_refusal(self.export, op, offset, &error)),
            }),
        }
    }

    /// Queues a reply; [`IoLoop::push_backlog`] hands it to the writer at the end of
    /// the round.
    fn deliver(&mut self, reply: Reply) {
        self.ev(reply_cookie(&reply), || Ev::Replied);
        self.backlog.push_back(reply);
    }

    /// Hands queued replies to the writer, without blocking; what does not fit stays.
    fn push_backlog(&mut self) {
        while let Some(reply) = self.backlog.pop_front() {
            match self.replies.try_send(reply) {
                Ok(()) => {}
                Err(TrySendError::Full(reply)) => {
                    self.backlog.push_front(reply);
                    return;
                }
                // The writer is gone (it drains until every sender is dropped, so this
                // does not happen while the loop runs); nobody wants the reply.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

impl Drop for IoLoop<'_> {
    /// Normally nothing is in flight here. After a ring error or a panic, the kernel
    /// may still use the buffers of requests in flight and the wake word: wait for
    /// them, and if even that fails, leak them rather than free memory it may write.
    /// Parked requests are not in the kernel: they simply go (their passes leave).
    fn drop(&mut self) {
        for slot in self.slots.iter_mut() {
            if slot.as_ref().is_some_and(|op| op.parked) {
                *slot = None;
            }
        }
        let in_kernel = |io: &Self| io.slots.iter().filter(|s| s.is_some()).count();
        if in_kernel(self) == 0 && !self.wake_armed {
            return;
        }
        if self.wake_armed {
            self.wake.ring();
        }
        for _ in 0..100_000 {
            if in_kernel(self) == 0 && !self.wake_armed {
                return;
            }
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let mut done = Vec::new();
            for cqe in self.ring.completion() {
                done.push(cqe.user_data());
            }
            for user_data in done {
                if user_data == WAKE_TAG {
                    self.wake_armed = false;
                } else if let Some(slot) = self.slots.get_mut(user_data as usize) {
                    // Its step is over; whatever it still had to do is abandoned.
                    *slot = None;
                }
            }
        }
        tracing::error!(
            in_kernel = in_kernel(self),
            "cannot reap in-flight io_uring requests: leaking their buffers so the kernel never writes freed memory"
        );
        std::mem::forget(std::mem::take(&mut self.slots));
        std::mem::forget(std::mem::replace(&mut self.wake_word, Box::new(0)));
    }
}
