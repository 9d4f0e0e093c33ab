//! The io_uring engine: registered files, registered buffers (`READ_FIXED`/`WRITE_FIXED`)
//! where the caller's buffer has a fixed index, one ring per engine, no SQPOLL.
//!
//! Each request occupies one slot of a table allocated at start-up with `queue_depth`
//! entries; the slot index is the SQE's `user_data`. The buffer stays in its slot — so
//! its memory stays valid for the kernel — from submission until the completion is
//! reaped, through any number of continuations of short transfers and retries.
//!
//! On kernels that allow it (6.1+) the ring is single-issuer with deferred task work:
//! completions are posted only when this engine enters the kernel, which saves the
//! interrupts and wake-ups of task work on the data path. Such a ring belongs to one
//! thread; it is created disabled and enabled by the first submission, so an engine can
//! be built on one thread and handed to the I/O thread before use.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring, SubmissionQueue, Submitter};
use tracing::{debug, error};

use super::engine::{
    after_transfer, check_request, is_transient, BlockEngine, Completion, Direction, DiskId,
    IoBuffer, IoOp, Progress, TRANSIENT_RETRIES_MAX,
};
use super::{FixedBuffers, IoError, QUEUE_DEPTH_MAX};
use ferry_io::uring::{self, Op, UringError};

// Slot indices travel as SQE user data and live in a `u32` free list.
const _: () = assert!(QUEUE_DEPTH_MAX <= u32::MAX as usize);

/// Operations the engine issues, with the kernel that introduced each; checked at
/// start-up so a missing one is reported by name instead of failing the first request.
const REQUIRED_OPS: [Op; 5] = [
    Op::READ,
    Op::WRITE,
    Op::READ_FIXED,
    Op::WRITE_FIXED,
    Op::FSYNC,
];

/// How the ring was set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingSetup {
    /// `SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG`, created disabled (Linux 6.1+).
    SingleIssuer,
    /// Default flags: the kernel refused the tuned set.
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RingState {
    /// Created with `R_DISABLED`: nothing has been submitted yet, and the thread that
    /// submits first becomes the ring's only issuer.
    AwaitingEnable,
    Running,
}

/// Block I/O through io_uring, behind the [`BlockEngine`] interface.
pub struct UringEngine<B: IoBuffer> {
    ring: IoUring,
    /// In-flight requests, indexed by slot (= SQE user data). `queue_depth` entries,
    /// allocated once; `Some` from submission until the completion is reaped.
    slots: Vec<Option<InFlight<B>>>,
    /// Indices of the `None` slots; capacity `queue_depth`, never grown.
    free: Vec<u32>,
    /// Number of registered files; `DiskId`s below it are valid.
    disks: usize,
    queue_depth: usize,
    state: RingState,
    setup: RingSetup,
}

/// One request the kernel is working on.
struct InFlight<B> {
    tag: u64,
    disk: DiskId,
    /// Consecutive EINTR/EAGAIN completions of the current SQE.
    retries: u32,
    work: Work<B>,
}

enum Work<B> {
    Transfer {
        dir: Direction,
        /// Owned here until the completion is reaped; the kernel reads or writes
        /// `buf[done..len]` meanwhile.
        buf: B,
        offset: u64,
        len: u32,
        /// Bytes already transferred by earlier (short) completions.
        done: u32,
    },
    Fsync,
}

impl<B> InFlight<B> {
    fn into_completion(self, result: Result<u32, IoError>) -> Completion<B> {
        let buf = match self.work {
            Work::Transfer { buf, .. } => Some(buf),
            Work::Fsync => None,
        };
        Completion {
            tag: self.tag,
            result,
            buf,
        }
    }

    fn request_error(&self, source: io::Error) -> IoError {
        let (op, offset, len) = match &self.work {
            Work::Transfer {
                dir, offset, len, ..
            } => (dir.op(), *offset, *len),
            Work::Fsync => (IoOp::Fsync, 0, 0),
        };
        IoError::Request {
            op,
            disk: self.disk,
            offset,
            len,
            source,
        }
    }
}

/// What a completion means for its request.
enum Step {
    Complete(Result<u32, IoError>),
    Resubmit,
}

impl<B: IoBuffer> UringEngine<B> {
    /// Builds a ring of `queue_depth` entries with `files` registered (indexed by
    /// [`DiskId`]) and, if given, `fixed_buffers` registered for `READ_FIXED` and
    /// `WRITE_FIXED`: iovec `i` is the buffer that [`IoBuffer::fixed_index`] `Some(i)`
    /// names.
    ///
    /// Fails with the missing opcode and the kernel it needs, or with the likely fix when
    /// io_uring is disabled or limited ([`IoError::is_uring_unavailable`]).
    pub fn new(
        queue_depth: usize,
        files: &[RawFd],
        fixed_buffers: Option<FixedBuffers<'_>>,
    ) -> Result<Self, IoError> {
        super::check_engine_config(queue_depth, files)?;
        let (ring, setup) = build_ring(queue_depth as u32)?;
        let submitter = ring.submitter();
        uring::check_ops(&submitter, &REQUIRED_OPS)?;
        submitter
            .register_files(files)
            .map_err(|source| UringError::register("file registration", source))?;
        if let Some(iovecs) = fixed_buffers.map(|fixed| fixed.iovecs()) {
            if !iovecs.is_empty() {
                // SAFETY: `FixedBuffers::new` obliged its caller to keep every iovec's
                // memory allocated and mapped until every engine built with it is dropped
                // (the ring, and with it the pinning, dies with this engine), and to touch
                // it only through IoBuffers, which this engine owns while the kernel uses
                // their bytes.
                unsafe { submitter.register_buffers(iovecs) }
                    .map_err(|source| UringError::register("buffer registration", source))?;
            }
        }
        debug!(
            queue_depth,
            disks = files.len(),
            ?setup,
            "io_uring engine ready"
        );
        Ok(UringEngine {
            ring,
            slots: (0..queue_depth).map(|_| None).collect(),
            free: (0..queue_depth as u32).rev().collect(),
            disks: files.len(),
            queue_depth,
            state: match setup {
                RingSetup::SingleIssuer => RingState::AwaitingEnable,
                RingSetup::Plain => RingState::Running,
            },
            setup,
        })
    }

    /// How the ring was set up.
    pub fn setup(&self) -> RingSetup {
        self.setup
    }

    fn enable(&mut self) -> Result<(), IoError> {
        if self.state == RingState::AwaitingEnable {
            self.ring
                .submitter()
                .register_enable_rings()
                .map_err(|source| UringError::register("enabling the ring", source))?;
            self.state = RingState::Running;
        }
        Ok(())
    }

    /// Reserves a slot for a new request, enabling the ring on first use.
    fn reserve(&mut self) -> Result<u32, IoError> {
        self.enable()?;
        let queue_depth = self.queue_depth;
        self.free.pop().ok_or(IoError::QueueFull { queue_depth })
    }

    /// Queues `entry` for the request about to occupy `slot`, or releases the slot.
    fn push(&mut self, slot: u32, entry: &squeue::Entry) -> Result<(), IoError> {
        let (submitter, mut sq, _) = self.ring.split();
        let pushed = push_sqe(&submitter, &mut sq, entry, self.queue_depth);
        if pushed.is_err() {
            self.free.push(slot);
        }
        pushed
    }

    fn submit_transfer(
        &mut self,
        dir: Direction,
        disk: DiskId,
        mut buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)> {
        if let Err(err) = check_request(dir.op(), disk, self.disks, buf.capacity(), offset, len) {
            return Err((err, buf));
        }
        let slot = match self.reserve() {
            Ok(slot) => slot,
            Err(err) => return Err((err, buf)),
        };
        let entry = transfer_sqe(slot, disk, dir, &mut buf, offset, len, 0);
        if let Err(err) = self.push(slot, &entry) {
            return Err((err, buf));
        }
        // Without SQPOLL the kernel reads the SQE only at our next io_uring_enter, by
        // which time the buffer it points at sits in its slot.
        self.slots[slot as usize] = Some(InFlight {
            tag,
            disk,
            retries: 0,
            work: Work::Transfer {
                dir,
                buf,
                offset,
                len,
                done: 0,
            },
        });
        Ok(())
    }

    /// Submits queued SQEs and waits for `want` CQEs. Returns false if the kernel was
    /// busy (CQ overflow backlog or no memory) and the caller should reap and come back.
    fn enter(&mut self, want: usize) -> Result<bool, IoError> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(true),
                Err(err) => match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EBUSY | libc::EAGAIN) => return Ok(false),
                    _ => return Err(IoError::Submit { source: err }),
                },
            }
        }
    }

    /// Moves every available CQE either to `out` or back to the SQ (continuation or
    /// retry). Returns how many requests completed.
    fn reap(&mut self, out: &mut Vec<Completion<B>>) -> usize {
        let UringEngine {
            ring,
            slots,
            free,
            queue_depth,
            ..
        } = self;
        let (submitter, mut sq, cq) = ring.split();
        let mut completed = 0;
        for cqe in cq {
            let slot = cqe.user_data() as usize;
            let Some(request) = slots.get_mut(slot).and_then(Option::as_mut) else {
                // The kernel echoes only user data we gave it, and we give each slot to
                // one SQE at a time; anything else means the table is corrupt and
                // buffers might be handed out while the kernel still writes them.
                panic!("io_uring completion for slot {slot}, which holds no request");
            };
            let result = match advance(request, cqe.result()) {
                Step::Complete(result) => result,
                Step::Resubmit => {
                    let entry = resubmit_sqe(slot as u32, request);
                    match push_sqe(&submitter, &mut sq, &entry, *queue_depth) {
                        Ok(()) => continue,
                        Err(err) => Err(err),
                    }
                }
            };
            if let Some(request) = slots[slot].take() {
                out.push(request.into_completion(result));
                free.push(slot as u32);
                completed += 1;
            }
        }
        completed
    }
}

/// Decides what a CQE result means for `request`, updating its progress.
fn advance<B>(request: &mut InFlight<B>, result: i32) -> Step {
    if result < 0 {
        let errno = -result;
        if is_transient(errno) && request.retries < TRANSIENT_RETRIES_MAX {
            request.retries += 1;
            return Step::Resubmit;
        }
        let err = request.request_error(io::Error::from_raw_os_error(errno));
        return Step::Complete(Err(err));
    }
    request.retries = 0;
    let disk = request.disk;
    match &mut request.work {
        Work::Fsync => Step::Complete(Ok(0)),
        Work::Transfer {
            dir,
            offset,
            len,
            done,
            ..
        } => match after_transfer(*dir, *offset, *len, *done, result as u32) {
            Progress::Complete(bytes) => Step::Complete(Ok(bytes)),
            Progress::Continue(now) => {
                *done = now;
                Step::Resubmit
            }
            Progress::Stalled => Step::Complete(Err(IoError::NoProgress {
                op: dir.op(),
                disk,
                offset: *offset,
                len: *len,
                done_bytes: *done,
            })),
        },
    }
}

/// The SQE continuing or retrying `request`, tagged with its slot.
fn resubmit_sqe<B: IoBuffer>(slot: u32, request: &mut InFlight<B>) -> squeue::Entry {
    match &mut request.work {
        Work::Fsync => fsync_sqe(slot, request.disk),
        Work::Transfer {
            dir,
            buf,
            offset,
            len,
            done,
        } => transfer_sqe(slot, request.disk, *dir, buf, *offset, *len, *done),
    }
}

fn fsync_sqe(slot: u32, disk: DiskId) -> squeue::Entry {
    opcode::Fsync::new(types::Fixed(disk.0))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .user_data(u64::from(slot))
}

/// The SQE moving `buf[done..len]` to or from `offset + done` of `disk`.
fn transfer_sqe<B: IoBuffer>(
    slot: u32,
    disk: DiskId,
    dir: Direction,
    buf: &mut B,
    offset: u64,
    len: u32,
    done: u32,
) -> squeue::Entry {
    let file = types::Fixed(disk.0);
    let at = offset + u64::from(done);
    let remaining = len - done;
    // Pointer arithmetic only; `done < len <= capacity` keeps it inside the buffer.
    let skip = done as usize;
    let entry = match (dir, buf.fixed_index()) {
        (Direction::Read, Some(index)) => {
            let dst = buf.as_mut_ptr().wrapping_add(skip);
            opcode::ReadFixed::new(file, dst, remaining, index)
                .offset(at)
                .build()
        }
        (Direction::Read, None) => {
            let dst = buf.as_mut_ptr().wrapping_add(skip);
            opcode::Read::new(file, dst, remaining).offset(at).build()
        }
        (Direction::Write, Some(index)) => {
            let src = buf.as_ptr().wrapping_add(skip);
            opcode::WriteFixed::new(file, src, remaining, index)
                .offset(at)
                .build()
        }
        (Direction::Write, None) => {
            let src = buf.as_ptr().wrapping_add(skip);
            opcode::Write::new(file, src, remaining).offset(at).build()
        }
    };
    entry.user_data(u64::from(slot))
}

/// Pushes one SQE. The SQ has room for `queue_depth` entries and holds at most one per
/// in-flight request, so it is never full; if it were, flushing it to the kernel makes
/// room, and failing that the request is refused — never unwrapped.
fn push_sqe(
    submitter: &Submitter<'_>,
    sq: &mut SubmissionQueue<'_>,
    entry: &squeue::Entry,
    queue_depth: usize,
) -> Result<(), IoError> {
    for attempt in 0..2 {
        // SAFETY: the entry names a registered file and, for reads and writes, the bytes
        // `buf[done..len]` of a buffer that its caller keeps in the in-flight slot named by
        // the entry's user data until the completion is reaped; the IoBuffer contract
        // keeps that address valid and unaliased for as long.
        if unsafe { sq.push(entry) }.is_ok() {
            return Ok(());
        }
        if attempt == 0 {
            sq.sync();
            match submitter.submit() {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
                Err(source) => return Err(IoError::Submit { source }),
            }
            sq.sync();
        }
    }
    Err(IoError::QueueFull { queue_depth })
}

fn build_ring(entries: u32) -> Result<(IoUring, RingSetup), IoError> {
    let tuned = IoUring::builder()
        .dontfork()
        .setup_r_disabled()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(entries);
    match tuned {
        Ok(ring) => return Ok((ring, RingSetup::SingleIssuer)),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            debug!("kernel refused a single-issuer ring with deferred task work (needs Linux 6.1); using default flags");
        }
        Err(source) => return Err(UringError::setup(source).into()),
    }
    IoUring::builder()
        .dontfork()
        .build(entries)
        .map(|ring| (ring, RingSetup::Plain))
        .map_err(|e| UringError::setup(e).into())
}

impl<B: IoBuffer> BlockEngine<B> for UringEngine<B> {
    fn submit_read(
        &mut self,
        disk: DiskId,
        buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)> {
        self.submit_transfer(Direction::Read, disk, buf, offset, len, tag)
    }

    fn submit_write(
        &mut self,
        disk: DiskId,
        buf: B,
        offset: u64,
        len: u32,
        tag: u64,
    ) -> Result<(), (IoError, B)> {
        self.submit_transfer(Direction::Write, disk, buf, offset, len, tag)
    }

    fn submit_fsync(&mut self, disk: DiskId, tag: u64) -> Result<(), IoError> {
        if disk.0 as usize >= self.disks {
            return Err(IoError::InvalidRequest {
                op: IoOp::Fsync,
                disk,
                offset: 0,
                len: 0,
                reason: "no such disk in the engine's file table",
            });
        }
        let slot = self.reserve()?;
        self.push(slot, &fsync_sqe(slot, disk))?;
        self.slots[slot as usize] = Some(InFlight {
            tag,
            disk,
            retries: 0,
            work: Work::Fsync,
        });
        Ok(())
    }

    fn wait(&mut self, min_complete: usize, out: &mut Vec<Completion<B>>) -> Result<(), IoError> {
        if self.in_flight() == 0 {
            return Ok(());
        }
        let target = min_complete.min(self.in_flight());
        let mut reaped = 0;
        let mut busy_rounds = 0;
        loop {
            let entered = self.enter(target.saturating_sub(reaped))?;
            let newly = self.reap(out);
            reaped += newly;
            if !entered && newly == 0 {
                busy_rounds += 1;
                if busy_rounds > TRANSIENT_RETRIES_MAX {
                    let source = io::Error::from_raw_os_error(libc::EAGAIN);
                    return Err(IoError::Submit { source });
                }
            }
            if entered && reaped >= target {
                break;
            }
        }
        // Continuations queued while reaping go to the kernel now rather than at the
        // caller's next wait.
        if !self.ring.submission().is_empty() {
            self.enter(0)?;
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.queue_depth - self.free.len()
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl<B: IoBuffer> Drop for UringEngine<B> {
    fn drop(&mut self) {
        // The kernel may still write into the buffers of in-flight requests: reap them all
        // before the slots (and the buffers in them) are freed.
        let mut reaped = Vec::with_capacity(self.queue_depth);
        while self.in_flight() > 0 {
            reaped.clear();
            if let Err(err) = self.wait(self.in_flight(), &mut reaped) {
                error!(
                    %err,
                    in_flight = self.in_flight(),
                    "cannot reap in-flight io_uring requests; leaking their buffers so the \
                     kernel never writes into freed memory"
                );
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
        }
    }
}

impl<B: IoBuffer> std::fmt::Debug for UringEngine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("queue_depth", &self.queue_depth)
            .field("in_flight", &self.in_flight())
            .field("disks", &self.disks)
            .field("setup", &self.setup)
            .field("state", &self.state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::test_support::{contract, uring_unavailable};
    use crate::io::{AlignedBuf, Disk};

    /// Builds an engine, or prints why io_uring cannot run here and returns `None`. When
    /// a plain ring can be created, the engine must come up too: a failure then is ours.
    fn make<B: IoBuffer>(queue_depth: usize, files: &[RawFd]) -> Option<UringEngine<B>> {
        if let Some(why) = uring_unavailable() {
            ferry_io::require::skip(ferry_io::require::Feature::Uring, why);
            return None;
        }
        Some(UringEngine::new(queue_depth, files, None).unwrap())
    }

    #[test]
    fn round_trip_and_fsync() {
        contract::round_trip_and_fsync(make);
    }

    #[test]
    fn short_reads_at_end_of_disk() {
        contract::short_reads_at_end_of_disk(make);
    }

    #[test]
    fn refusals_hand_the_buffer_back() {
        contract::refusals_hand_the_buffer_back(make);
    }

    #[test]
    fn kernel_errors_complete_with_the_buffer() {
        contract::kernel_errors_complete_with_the_buffer(make);
    }

    #[test]
    fn misaligned_direct_io_fails_cleanly() {
        contract::misaligned_direct_io_fails_cleanly(make, make);
    }

    #[test]
    fn probe_and_setup_on_this_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open_replica(dir.path().join("r.img"), 1 << 20).unwrap();
        let Some(engine) = make::<AlignedBuf>(4, &[disk.fd()]) else {
            return;
        };
        // The machines ferry targets run Linux 6.1+, where the tuned ring must be taken.
        eprintln!("ring setup: {:?}", engine.setup());
        assert_eq!(engine.name(), "io_uring");
        assert_eq!(engine.in_flight(), 0);
    }

    /// Registered buffers go through READ_FIXED/WRITE_FIXED; a buffer claiming the wrong
    /// registered index fails with EFAULT instead of touching other memory.
    #[test]
    fn fixed_buffers_round_trip_and_wrong_index_faults() {
        if let Some(why) = uring_unavailable() {
            ferry_io::require::skip(ferry_io::require::Feature::Uring, why);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open_replica(dir.path().join("r.img"), 1 << 20).unwrap();
        // Buffers come back here and are freed only after the engine is dropped.
        let mut returned: Vec<AlignedBuf> = Vec::new();
        let mut bufs: Vec<AlignedBuf> = (0..2).map(|_| AlignedBuf::zeroed(8192)).collect();
        let iovecs: Vec<libc::iovec> = bufs.iter_mut().map(|buf| buf.iovec()).collect();
        // SAFETY: the buffers' heap memory is freed only after `drop(engine)` below: they
        // live in `bufs`, in the engine, or in `returned` until then.
        let fixed = unsafe { FixedBuffers::new(&iovecs) };
        let mut engine = UringEngine::new(4, &[disk.fd()], Some(fixed)).unwrap();
        let mut out = Vec::with_capacity(4);

        let mut read_buf = bufs.pop().unwrap();
        let mut write_buf = bufs.pop().unwrap();
        write_buf.set_fixed_index(Some(0));
        write_buf.fill(0x6c);
        engine
            .submit_write(DiskId(0), write_buf, 65_536, 8192, 1)
            .map_err(|(err, _)| err)
            .unwrap();
        engine.wait(1, &mut out).unwrap();
        let written = out.pop().unwrap();
        assert_eq!(written.result.unwrap(), 8192);
        returned.extend(written.buf);

        read_buf.set_fixed_index(Some(1));
        engine
            .submit_read(DiskId(0), read_buf, 65_536, 8192, 2)
            .map_err(|(err, _)| err)
            .unwrap();
        engine.wait(1, &mut out).unwrap();
        let read = out.pop().unwrap();
        assert_eq!(read.result.unwrap(), 8192);
        let mut read_buf = read.buf.unwrap();
        assert!(read_buf.iter().all(|&b| b == 0x6c));

        // Buffer 1's bytes are not inside registered buffer 0.
        read_buf.set_fixed_index(Some(0));
        read_buf.fill(0);
        engine
            .submit_read(DiskId(0), read_buf, 65_536, 8192, 3)
            .map_err(|(err, _)| err)
            .unwrap();
        engine.wait(1, &mut out).unwrap();
        let wrong = out.pop().unwrap();
        assert_eq!(wrong.result.unwrap_err().raw_os_error(), Some(libc::EFAULT));
        let read_buf = wrong.buf.unwrap();
        assert!(read_buf.iter().all(|&b| b == 0));
        returned.push(read_buf);

        drop(engine);
        drop(returned);
    }

    /// A single-issuer ring must work from the thread that uses it, not the one that
    /// built it: the engine is typically built by a coordinator and moved to an I/O thread.
    #[test]
    fn built_on_one_thread_used_on_another() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open_replica(dir.path().join("r.img"), 1 << 20).unwrap();
        let Some(mut engine) = make::<AlignedBuf>(4, &[disk.fd()]) else {
            return;
        };
        std::thread::spawn(move || {
            let mut buf = AlignedBuf::zeroed(4096);
            buf.fill(0x11);
            engine
                .submit_write(DiskId(0), buf, 0, 4096, 1)
                .map_err(|(err, _)| err)
                .unwrap();
            engine.submit_fsync(DiskId(0), 2).unwrap();
            let mut out = Vec::with_capacity(4);
            while engine.in_flight() > 0 {
                engine.wait(1, &mut out).unwrap();
            }
            assert!(out.iter().all(|completion| completion.result.is_ok()));
        })
        .join()
        .unwrap();
        assert!(std::fs::read(disk.path()).unwrap()[..4096]
            .iter()
            .all(|&b| b == 0x11));
    }

    /// Dropping an engine with requests in flight reaps them before freeing their buffers.
    #[test]
    fn drop_reaps_in_flight_requests() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open_replica(dir.path().join("r.img"), 4 << 20).unwrap();
        let Some(mut engine) = make::<AlignedBuf>(8, &[disk.fd()]) else {
            return;
        };
        for tag in 0..8u64 {
            let mut buf = AlignedBuf::zeroed(1 << 19);
            buf.fill(tag as u8 + 1);
            engine
                .submit_write(DiskId(0), buf, tag << 19, 1 << 19, tag)
                .map_err(|(err, _)| err)
                .unwrap();
        }
        // Push them into the kernel without waiting for any.
        let mut out = Vec::with_capacity(8);
        engine.wait(0, &mut out).unwrap();
        drop(engine);
        let bytes = std::fs::read(disk.path()).unwrap();
        for tag in 0..8usize {
            let chunk = &bytes[tag << 19..(tag + 1) << 19];
            assert!(
                chunk.iter().all(|&b| b == tag as u8 + 1),
                "request {tag} lost"
            );
        }
    }
}
