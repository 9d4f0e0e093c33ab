//! The applier: writes verified frames to the replica disks with the I/O engine.
//!
//! It receives frames whose every block was already verified, in the order they
//! arrived, and writes each block from wherever the verifier left it — straight from
//! the receive buffer when aligned, else from the scratch buffer. A frame's buffers go
//! back to their pools when its last write completed. A barrier (commit) drains every
//! write and fsyncs every disk before it answers.
//!
//! Zero ranges are applied synchronously, outside the engine, so they are not ordered
//! against writes still in flight (see `Disk::zero_range`): before a range is zeroed,
//! every in-flight write that overlaps it is reaped, so the later-sent content wins
//! whatever order the kernel completes requests in.

use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use ferry_ringbuf::pool::{PoolReturn, Slot};
use ferry_ringbuf::spsc;

use super::undo::stage::Stager;
use super::undo::UndoLog;
use super::verify::{records, Place, Placer};
use crate::buffers::SlotView;
use crate::io::{self, BlockEngine, Completion, Disk, DiskId, EngineKind, IoError};

/// Why the applier stopped writing an epoch: the first failure, which every later
/// barrier reports.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot start the I/O engine")]
    EngineStart(#[source] IoError),
    /// Waiting for completions failed: the engine itself is broken.
    #[error("I/O engine failed")]
    Engine(#[source] IoError),
    /// A write the engine completed failed in the kernel.
    #[error("replica write failed")]
    Write(#[source] IoError),
    /// The engine refused a write it was handed.
    #[error("disk {disk}")]
    Submit {
        disk: String,
        #[source]
        source: IoError,
    },
    /// Writing the bytes about to be overwritten into the undo log failed.
    #[error("disk {disk}: staging the epoch")]
    Stage {
        disk: String,
        #[source]
        source: super::TargetError,
    },
    /// The partial sector at the end of an odd-sized disk, written without O_DIRECT.
    #[error("disk {disk}: write at {offset}")]
    PartialSector {
        disk: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {disk}")]
    Zero {
        disk: String,
        #[source]
        source: IoError,
    },
    /// The barrier's fdatasync of a replica failed.
    #[error("disk {disk}")]
    Sync {
        disk: String,
        #[source]
        source: IoError,
    },
}

/// Work for the applier, in arrival order.
pub enum ApplyMsg {
    /// A verified data frame: its payload is in `recv`, decompressed or realigned
    /// blocks in `scratch`.
    Data {
        disk: u32,
        recv: Slot,
        scratch: Option<Slot>,
    },
    /// Make a byte range read back as zeros.
    Zero { disk: u32, offset: u64, len: u64 },
    /// Drain, fsync every disk, answer with the bytes applied so far.
    Barrier {
        reply: mpsc::SyncSender<Result<u64, Arc<ApplyError>>>,
    },
}

/// The replica disks of a session as the applier sees them.
pub struct ApplyDisks<'a> {
    pub disks: &'a [Disk],
    /// A buffered handle per disk for the rare write O_DIRECT cannot do (a disk whose
    /// size is not a multiple of 512 bytes ends in a partial sector).
    pub buffered: &'a [std::fs::File],
    pub names: &'a [String],
}

struct InFlightFrame {
    recv: Slot,
    scratch: Option<Slot>,
    pending: usize,
    disk: u32,
    /// Bytes of `disk` the frame's writes cover, from its first write's offset to its
    /// last write's end (the writes of a frame are in increasing offset order).
    start: u64,
    end: u64,
}

/// The session's buffers as the applier sees them: the registered iovec table, the
/// pools' return ends, and where the scratch pool starts in the table.
pub struct ApplyBuffers<'a> {
    pub iovecs: &'a crate::buffers::IovecTable,
    /// Receive slots: in-flight frames are indexed by their receive slot.
    pub recv_slots: usize,
    pub scratch_base: crate::buffers::FixedBase,
    pub recv_return: PoolReturn,
    pub scratch_return: PoolReturn,
}

/// Runs until the session drops its end of the ring. Slots are released to their
/// pools here, and only here.
pub fn applier_loop(
    kind: EngineKind,
    queue_depth: usize,
    disks: ApplyDisks<'_>,
    buffers: ApplyBuffers<'_>,
    mut rx: spsc::Consumer<ApplyMsg>,
    failed: &AtomicBool,
    undo: &mut UndoLog,
) {
    let ApplyBuffers {
        iovecs,
        recv_slots,
        scratch_base,
        mut recv_return,
        mut scratch_return,
    } = buffers;
    let fds: Vec<RawFd> = disks.disks.iter().map(|d| d.fd()).collect();
    // SAFETY: the session owns both pools for longer than this function runs, and the
    // engine (held by the `Applier` below) is dropped before this function returns;
    // slot memory is reached only through slots and views of slots held in
    // `InFlight::frames` while in flight.
    let fixed = unsafe { iovecs.fixed() };
    let engine = io::open_engine::<SlotView>(kind, queue_depth, &fds, Some(fixed));
    let stager = undo.logs_any().then(Stager::new);
    let engine = match engine {
        Ok(e) => e,
        Err(e) => {
            failed.store(true, Ordering::Release);
            fail_everything(
                &mut rx,
                &mut recv_return,
                &mut scratch_return,
                Arc::new(ApplyError::EngineStart(e)),
            );
            return;
        }
    };
    let mut applier = Applier {
        inflight: InFlight {
            frames: (0..recv_slots).map(|_| None).collect(),
            completions: Vec::with_capacity(queue_depth),
            error: None,
            recv_return,
            scratch_return,
        },
        engine,
        disks,
        scratch_base,
        failed,
        undo,
        stager,
        ahead: None,
        applied: 0,
    };
    while let Some(msg) = applier.next(&mut rx) {
        match msg {
            ApplyMsg::Data {
                disk,
                recv,
                scratch,
            } => applier.data(&mut rx, (disk, recv, scratch)),
            ApplyMsg::Zero { disk, offset, len } => applier.zero(disk, offset, len),
            ApplyMsg::Barrier { reply } => applier.barrier(reply),
        }
    }
    applier.drain();
}

/// Data frames staged together, under one sync of the undo log, at most: those already
/// queued when the first is taken (the receive pool bounds them anyway).
const STAGE_BATCH: usize = 16;

/// A data frame as the applier holds it: disk, receive slot, scratch slot.
type Frame = (u32, Slot, Option<Slot>);

/// The writes of one data frame, in record order, neighbours coalesced: the first 64
/// inline, the rare rest spilled; and the zero blocks, applied apart.
struct FrameWrites {
    inline: [(Place, u64, usize); 64],
    n: usize,
    spill: Vec<(Place, u64, usize)>,
    zeros: Vec<(u64, u64)>,
}

impl FrameWrites {
    /// Plans the writes of a verified frame; returns them with the bytes of disk the
    /// frame covers (zero blocks included).
    fn plan(payload: &[u8]) -> (Self, u64) {
        let mut w = FrameWrites {
            inline: [(Place::Zero, 0, 0); 64],
            n: 0,
            spill: Vec::new(),
            zeros: Vec::new(),
        };
        let mut covered = 0u64;
        let (_, recs) = records(payload).expect("the session verified this frame");
        let mut placer = Placer::new();
        let mut last: Option<(Place, u64, usize)> = None;
        for rec in recs {
            let place = placer.place(rec);
            let offset = rec.offset.get();
            let len = rec.length.get() as usize;
            covered += len as u64;
            if place == Place::Zero {
                w.zeros.push((offset, len as u64));
                continue;
            }
            if let Some((p, o, l)) = last.as_mut() {
                let contiguous = *o + *l as u64 == offset
                    && match (*p, place) {
                        (Place::Recv(a), Place::Recv(b))
                        | (Place::Scratch(a), Place::Scratch(b)) => a + *l == b,
                        _ => false,
                    }
                    && *l % 4096 == 0;
                if contiguous {
                    *l += len;
                    continue;
                }
                w.push((*p, *o, *l));
            }
            last = Some((place, offset, len));
        }
        if let Some(last) = last {
            w.push(last);
        }
        (w, covered)
    }

    fn push(&mut self, write: (Place, u64, usize)) {
        if self.n < self.inline.len() {
            self.inline[self.n] = write;
            self.n += 1;
        } else {
            self.spill.push(write);
        }
    }

    /// Every write, in order.
    fn iter(&self) -> impl Iterator<Item = &(Place, u64, usize)> {
        self.inline[..self.n].iter().chain(self.spill.iter())
    }

    /// The bytes of the disk the writes cover, from the first's offset to the last's
    /// end.
    fn span(&self) -> (u64, u64) {
        self.iter().fold((u64::MAX, 0), |(s, e), &(_, o, l)| {
            (s.min(o), e.max(o + l as u64))
        })
    }
}

/// The applier's state for one session: the engine, the frames in flight, and the
/// undo log the old bytes go to first.
struct Applier<'a> {
    // Declared before `engine`, so dropped first, as before the split.
    inflight: InFlight,
    engine: io::Engine<SlotView>,
    disks: ApplyDisks<'a>,
    scratch_base: crate::buffers::FixedBase,
    failed: &'a AtomicBool,
    undo: &'a mut UndoLog,
    /// Writes the undo log; `None` when no disk of the session is logged.
    stager: Option<Stager>,
    /// A message taken from the ring while gathering a batch, handled next.
    ahead: Option<ApplyMsg>,
    /// Bytes of disk applied so far this epoch.
    applied: u64,
}

impl Applier<'_> {
    /// The next message, or `None` once the session dropped its end and everything was
    /// taken. With writes in flight, completions are reaped while waiting: they return
    /// the receive buffers the session is waiting for.
    fn next(&mut self, rx: &mut spsc::Consumer<ApplyMsg>) -> Option<ApplyMsg> {
        if let Some(m) = self.ahead.take() {
            return Some(m);
        }
        loop {
            if self.engine.in_flight() == 0 {
                return rx.pop_wait();
            }
            match rx.pop() {
                Some(m) => return Some(m),
                None if rx.is_abandoned() && rx.is_empty() => return None,
                None => self.inflight.reap(&mut self.engine, 1, self.failed),
            }
        }
    }

    /// Records the first failure and tells the session.
    fn fail(&mut self, error: impl FnOnce() -> ApplyError) {
        self.inflight.fail(error);
        self.failed.store(true, Ordering::Release);
    }

    fn name(&self, disk: u32) -> String {
        self.disks.names[disk as usize].clone()
    }

    /// A verified data frame, with the data frames queued behind it: their old bytes
    /// into the undo log under one sync, then, frame by frame, the zero blocks applied
    /// and the writes submitted. After a failure, their buffers only go back.
    fn data(&mut self, rx: &mut spsc::Consumer<ApplyMsg>, first: Frame) {
        let mut batch = Vec::with_capacity(if self.stager.is_some() {
            STAGE_BATCH
        } else {
            1
        });
        batch.push(first);
        if self.stager.is_some() {
            while batch.len() < STAGE_BATCH {
                match rx.pop() {
                    Some(ApplyMsg::Data {
                        disk,
                        recv,
                        scratch,
                    }) => batch.push((disk, recv, scratch)),
                    Some(other) => {
                        self.ahead = Some(other);
                        break;
                    }
                    None => break,
                }
            }
        }
        let plans: Vec<(FrameWrites, u64)> = batch
            .iter()
            .map(|(_, recv, _)| FrameWrites::plan(recv.as_slice()))
            .collect();
        // Atomic epochs: the bytes about to be overwritten are durable in the undo log
        // before any write of these frames is issued.
        let staged = self.inflight.error.is_none() && self.stage_frames(&batch, &plans);
        for ((disk, recv, scratch), (writes, covered)) in batch.into_iter().zip(plans) {
            if !staged || self.inflight.error.is_some() {
                self.inflight.release(recv, scratch);
                continue;
            }
            self.applied += covered;
            self.apply_frame(disk, recv, scratch, &writes);
        }
    }

    /// Applies a staged frame: its zero blocks, then its writes.
    fn apply_frame(&mut self, disk: u32, recv: Slot, scratch: Option<Slot>, writes: &FrameWrites) {
        for &(offset, len) in &writes.zeros {
            self.inflight
                .settle(&mut self.engine, disk, offset, offset + len, self.failed);
            if self.inflight.error.is_some() {
                break;
            }
            if let Err(source) = self.disks.disks[disk as usize].zero_range(offset, len) {
                let disk = self.name(disk);
                self.fail(|| ApplyError::Zero { disk, source });
            }
        }
        self.submit_frame(disk, recv, scratch, writes);
    }

    /// Logs the old bytes under every write and zero block of the frames of logged
    /// disks and syncs the log; false (with the failure recorded) if that failed.
    fn stage_frames(&mut self, batch: &[Frame], plans: &[(FrameWrites, u64)]) -> bool {
        let Some(stager) = self.stager.as_mut() else {
            return true;
        };
        let undo = &mut *self.undo;
        let mut at = 0u32;
        let mut logged = Ok(());
        for ((disk, _, _), (writes, _)) in batch.iter().zip(plans) {
            if logged.is_err() {
                break;
            }
            if !undo.logs(*disk) {
                continue;
            }
            at = *disk;
            let file = &self.disks.buffered[*disk as usize];
            logged = writes
                .iter()
                .map(|&(_, o, l)| (o, l as u64))
                .chain(writes.zeros.iter().copied())
                .try_for_each(|range| stager.log_range(undo, file, *disk, range, true));
        }
        match logged.and_then(|_| stager.sync(undo)) {
            Ok(()) => true,
            Err(source) => {
                let disk = self.name(at);
                self.fail(|| ApplyError::Stage { disk, source });
                false
            }
        }
    }

    /// Enters the frame in the table, submits its writes, then drops the submission's
    /// reference; the frame's buffers go back when its last write completed.
    fn submit_frame(&mut self, disk: u32, recv: Slot, scratch: Option<Slot>, writes: &FrameWrites) {
        let tag = recv.index() as usize;
        // The frame enters the table before its first write, holding one extra
        // reference for the submission itself, so a completion reaped while the queue
        // is full can never release the buffers under us.
        let (start, end) = writes.span();
        self.inflight.frames[tag] = Some(InFlightFrame {
            recv,
            scratch,
            pending: 1,
            disk,
            start,
            end,
        });
        for &(place, offset, len) in writes.iter() {
            self.submit_write(tag, disk, place, offset, len);
        }
        self.inflight.finish_one(tag);
    }

    /// Submits one write of the frame in slot `tag`, reaping first while the queue is
    /// full. The partial sector at the end of an odd-sized disk is written at once
    /// through the buffered handle instead.
    fn submit_write(&mut self, tag: usize, disk: u32, place: Place, offset: u64, len: usize) {
        let scratch_base = self.scratch_base;
        let entry = self.inflight.frames[tag].as_mut().expect("entered above");
        let (slot, at, base) = match place {
            Place::Recv(at) => (
                &mut entry.recv,
                at,
                crate::buffers::IovecTable::first_base(),
            ),
            Place::Scratch(at) => (
                entry
                    .scratch
                    .as_mut()
                    .expect("scratch placement without a scratch slot"),
                at,
                scratch_base,
            ),
            Place::Zero => unreachable!("zero blocks are not written"),
        };
        if self.disks.disks[disk as usize].is_direct() && !len.is_multiple_of(512) {
            let bytes = &slot.as_slice()[at..at + len];
            if let Err(source) = self.disks.buffered[disk as usize].write_all_at(bytes, offset) {
                let disk = self.name(disk);
                self.fail(|| ApplyError::PartialSector {
                    disk,
                    offset,
                    source,
                });
            }
            return;
        }
        // SAFETY: the slot stays in `inflight.frames[tag]` until `pending` reaches zero,
        // which happens only after the last write using this view was reaped (and the
        // submission reference, dropped by `submit_frame`, was dropped).
        let mut view = Some(unsafe { SlotView::new(slot, at, len, base) });
        loop {
            if self.engine.in_flight() >= self.engine.queue_depth() {
                self.inflight.reap(&mut self.engine, 1, self.failed);
            }
            let v = view.take().expect("view present");
            match self
                .engine
                .submit_write(DiskId(disk), v, offset, len as u32, tag as u64)
            {
                Ok(()) => {
                    self.inflight.frames[tag]
                        .as_mut()
                        .expect("held by the submission reference")
                        .pending += 1;
                    return;
                }
                Err((IoError::QueueFull { .. }, v)) => view = Some(v),
                Err((source, _v)) => {
                    let disk = self.name(disk);
                    self.fail(|| ApplyError::Submit { disk, source });
                    return;
                }
            }
        }
    }

    /// A zero range: its old bytes into the undo log, every overlapping write reaped,
    /// then the range zeroed.
    fn zero(&mut self, disk: u32, offset: u64, len: u64) {
        if let Some(stager) = self
            .stager
            .as_mut()
            .filter(|_| self.inflight.error.is_none() && self.undo.logs(disk))
        {
            let file = &self.disks.buffered[disk as usize];
            if let Err(source) = stager
                .log_range(self.undo, file, disk, (offset, len), true)
                .and_then(|_| stager.sync(self.undo))
            {
                let disk = self.name(disk);
                self.fail(|| ApplyError::Stage { disk, source });
            }
        }
        if self.inflight.error.is_none() {
            self.inflight
                .settle(&mut self.engine, disk, offset, offset + len, self.failed);
        }
        if self.inflight.error.is_none() {
            match self.disks.disks[disk as usize].zero_range(offset, len) {
                Ok(()) => self.applied += len,
                Err(source) => {
                    let disk = self.name(disk);
                    self.fail(|| ApplyError::Zero { disk, source });
                }
            }
        }
    }

    /// Drains every write, fsyncs every disk, and answers with the bytes applied or the
    /// first failure.
    fn barrier(&mut self, reply: mpsc::SyncSender<Result<u64, Arc<ApplyError>>>) {
        while self.engine.in_flight() > 0 && !self.failed.load(Ordering::Acquire) {
            self.inflight.reap(&mut self.engine, 1, self.failed);
        }
        if self.inflight.error.is_none() {
            if let Err(e) = sync_replicas(self.disks.disks, self.disks.names) {
                self.inflight.fail(|| *e);
                self.failed.store(true, Ordering::Release);
            }
        }
        let _ = reply.send(match &self.inflight.error {
            None => Ok(self.applied),
            Some(e) => Err(Arc::clone(e)),
        });
    }

    /// Reaps everything before the buffers can go away.
    fn drain(mut self) {
        while self.engine.in_flight() > 0 {
            let before = self.engine.in_flight();
            self.inflight.reap(&mut self.engine, 1, self.failed);
            if self.engine.in_flight() == before && self.inflight.error.is_some() {
                // The engine itself failed; waiting again would not help. Leak the slots
                // rather than free memory the kernel may still write.
                std::mem::forget(std::mem::take(&mut self.inflight.frames));
                return;
            }
        }
    }
}

/// Makes what was written to every replica durable, in order, stopping at the first
/// that fails: the Commit's barrier, with or without writes before it.
pub(super) fn sync_replicas(disks: &[Disk], names: &[String]) -> Result<(), Box<ApplyError>> {
    for (d, name) in disks.iter().zip(names) {
        d.sync_data().map_err(|source| {
            Box::new(ApplyError::Sync {
                disk: name.clone(),
                source,
            })
        })?;
    }
    Ok(())
}

/// Writes in flight and what their completions give back. One owner, so reaping can
/// release buffers and record the first error without threading each piece through.
struct InFlight {
    /// Frames in flight, indexed by their receive slot's index: unique while in flight,
    /// and bounded by the receive pool, so the table never grows.
    frames: Vec<Option<InFlightFrame>>,
    completions: Vec<Completion<SlotView>>,
    /// The first failure; once set, nothing more is written. Shared with every
    /// barrier that reports it.
    error: Option<Arc<ApplyError>>,
    recv_return: PoolReturn,
    scratch_return: PoolReturn,
}

impl InFlight {
    /// Returns a frame's buffers to their pools.
    fn release(&mut self, recv: Slot, scratch: Option<Slot>) {
        release(
            &mut self.recv_return,
            &mut self.scratch_return,
            recv,
            scratch,
        );
    }

    /// Drops one reference of the frame in slot `tag`; the last one releases it.
    fn finish_one(&mut self, tag: usize) {
        finish(
            &mut self.frames,
            &mut self.recv_return,
            &mut self.scratch_return,
            tag,
        );
    }

    /// Records the first failure; later ones are consequences of it.
    fn fail(&mut self, error: impl FnOnce() -> ApplyError) {
        if self.error.is_none() {
            self.error = Some(Arc::new(error()));
        }
    }

    /// Reaps until no write in flight overlaps `[start, end)` of `disk`, so that zeros
    /// applied there afterwards cannot be overtaken by an older write.
    fn settle(
        &mut self,
        engine: &mut io::Engine<SlotView>,
        disk: u32,
        start: u64,
        end: u64,
        failed: &AtomicBool,
    ) {
        let overlapping = |frames: &[Option<InFlightFrame>]| {
            frames
                .iter()
                .flatten()
                .any(|f| f.disk == disk && f.start < end && start < f.end)
        };
        while overlapping(&self.frames) {
            let before = engine.in_flight();
            // A frame stays in the table only while its writes are in flight.
            debug_assert!(before > 0, "a frame without writes in flight");
            if before == 0 {
                break;
            }
            self.reap(engine, 1, failed);
            if self.error.is_some() && engine.in_flight() == before {
                // The engine itself failed; the error stops every later write.
                break;
            }
        }
    }

    /// Collects at least `min` completions and releases the frames they finish.
    fn reap(&mut self, engine: &mut io::Engine<SlotView>, min: usize, failed: &AtomicBool) {
        self.completions.clear();
        if let Err(e) = engine.wait(min, &mut self.completions) {
            self.fail(|| ApplyError::Engine(e));
            failed.store(true, Ordering::Release);
            return;
        }
        for c in self.completions.drain(..) {
            if let Err(e) = c.result {
                // Not `fail`: `completions` is borrowed.
                if self.error.is_none() {
                    self.error = Some(Arc::new(ApplyError::Write(e)));
                }
                failed.store(true, Ordering::Release);
            }
            let _view_done = c.buf;
            // Not `finish_one`: `completions` is borrowed.
            finish(
                &mut self.frames,
                &mut self.recv_return,
                &mut self.scratch_return,
                c.tag as usize,
            );
        }
    }
}

/// Drops one reference of the frame in slot `tag` (a completed write, or the
/// submission's own); the last one returns its buffers to their pools.
fn finish(
    frames: &mut [Option<InFlightFrame>],
    recv_return: &mut PoolReturn,
    scratch_return: &mut PoolReturn,
    tag: usize,
) {
    let entry = frames[tag]
        .as_mut()
        .expect("a frame in flight holds a reference");
    entry.pending -= 1;
    if entry.pending == 0 {
        let f = frames[tag].take().expect("checked above");
        release(recv_return, scratch_return, f.recv, f.scratch);
    }
}

/// Returns a frame's buffers to their pools.
fn release(
    recv_return: &mut PoolReturn,
    scratch_return: &mut PoolReturn,
    recv: Slot,
    scratch: Option<Slot>,
) {
    recv_return.release(recv);
    if let Some(s) = scratch {
        scratch_return.release(s);
    }
}

fn fail_everything(
    rx: &mut spsc::Consumer<ApplyMsg>,
    recv_return: &mut PoolReturn,
    scratch_return: &mut PoolReturn,
    why: Arc<ApplyError>,
) {
    while let Some(msg) = rx.pop_wait() {
        match msg {
            ApplyMsg::Data { recv, scratch, .. } => {
                release(recv_return, scratch_return, recv, scratch);
            }
            ApplyMsg::Zero { .. } => {}
            ApplyMsg::Barrier { reply } => {
                let _ = reply.send(Err(Arc::clone(&why)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{block_hash, BlockRecord, Codec, DataHeader, PAYLOAD_ALIGN};
    use crate::writer::undo::UndoDisk;
    use ferry_ringbuf::pool::BufferPool;
    use zerocopy::IntoBytes;

    const DISK_BYTES: u64 = 1 << 20;
    const FRAME_BLOCKS: usize = 16;
    const BLOCK: usize = 4096;

    /// Writes a data frame of `FRAME_BLOCKS` raw blocks of `fill` at offset 0 into `slot`,
    /// laid out as the source sends it (payloads aligned for O_DIRECT).
    fn data_frame(slot: &mut Slot, fill: u8) {
        let hlen = core::mem::size_of::<DataHeader>();
        let table = (hlen + FRAME_BLOCKS * core::mem::size_of::<BlockRecord>())
            .next_multiple_of(PAYLOAD_ALIGN);
        let bytes = slot.as_mut_slice();
        bytes[..hlen].copy_from_slice(
            DataHeader {
                disk: 0.into(),
                record_count: (FRAME_BLOCKS as u32).into(),
            }
            .as_bytes(),
        );
        for i in 0..FRAME_BLOCKS {
            let at = table + i * BLOCK;
            bytes[at..at + BLOCK].fill(fill);
            let rec = BlockRecord {
                offset: ((i * BLOCK) as u64).into(),
                length: (BLOCK as u32).into(),
                stored_len: (BLOCK as u32).into(),
                payload_offset: (at as u32).into(),
                codec: Codec::Raw as u8,
                stream: 0,
                stream_flags: 0,
                reserved: 0,
                hash: block_hash(&[fill; BLOCK]),
                reserved2: 0.into(),
            };
            let r = hlen + i * core::mem::size_of::<BlockRecord>();
            bytes[r..r + rec.as_bytes().len()].copy_from_slice(rec.as_bytes());
        }
    }

    /// A Zero range sent after a Data frame over the same bytes must win, even while the
    /// frame's writes are still in flight: the io_uring engine hands requests to the
    /// kernel only when it is next entered, so without reaping first the hole would be
    /// punched before the older write lands.
    #[test]
    fn zero_after_in_flight_data_on_the_same_range_leaves_zeros() {
        if let Err(why) = io_uring::IoUring::new(4) {
            eprintln!("SKIP: io_uring is unavailable here: {why}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let (disk, _) = Disk::open_replica(&path, DISK_BYTES).unwrap();
        let buffered = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let slots = 4;
        let (mut recv_alloc, recv_return) = BufferPool::new(256 << 10, slots).unwrap();
        let (scratch_alloc, scratch_return) = BufferPool::new(256 << 10, slots).unwrap();
        let mut iovecs = crate::buffers::IovecTable::with_first_pool(recv_alloc.region());
        let scratch_base = iovecs.push_pool(scratch_alloc.region());
        let mut undo = UndoLog::create(
            dir.path(),
            1,
            vec![UndoDisk {
                name: "r".into(),
                generation: filter_driver_shim_contract::GenerationId::from_bytes([1; 16]),
                disk_size: DISK_BYTES,
                logged: false,
                prev_epoch: None,
            }],
        )
        .unwrap();
        let (mut tx, rx) = spsc::channel::<ApplyMsg>(8);
        let mut recv = recv_alloc.alloc().unwrap();
        data_frame(&mut recv, 0xAB);
        let len = (FRAME_BLOCKS * BLOCK) as u64;
        let (reply, answer) = mpsc::sync_channel(1);
        // Everything is queued before the applier starts, so it takes the Zero while
        // the frame's writes are still unsubmitted.
        for msg in [
            ApplyMsg::Data {
                disk: 0,
                recv,
                scratch: None,
            },
            ApplyMsg::Zero {
                disk: 0,
                offset: 0,
                len,
            },
            ApplyMsg::Barrier { reply },
        ] {
            assert!(tx.push(msg).is_ok());
        }
        drop(tx);
        let failed = AtomicBool::new(false);
        let names = ["r".to_string()];
        let disks = [disk];
        let buffered = [buffered];
        applier_loop(
            EngineKind::Uring,
            8,
            ApplyDisks {
                disks: &disks,
                buffered: &buffered,
                names: &names,
            },
            ApplyBuffers {
                iovecs: &iovecs,
                recv_slots: slots,
                scratch_base,
                recv_return,
                scratch_return,
            },
            rx,
            &failed,
            &mut undo,
        );
        answer.recv().unwrap().unwrap();
        let mut back = vec![0xFFu8; len as usize];
        buffered[0].read_exact_at(&mut back, 0).unwrap();
        let stale = back.iter().filter(|&&b| b != 0).count();
        assert_eq!(
            stale, 0,
            "{stale} bytes of the older Data frame survived the later Zero"
        );
        drop(scratch_alloc);
    }
}
