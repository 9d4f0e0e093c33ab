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

/// Runs until the session drops its end of the ring. Slots are released to their
/// pools here, and only here.
#[allow(clippy::too_many_arguments)]
pub fn applier_loop(
    kind: EngineKind,
    queue_depth: usize,
    disks: ApplyDisks<'_>,
    iovecs: &crate::buffers::IovecTable,
    recv_slots: usize,
    scratch_base: crate::buffers::FixedBase,
    mut rx: spsc::Consumer<ApplyMsg>,
    mut recv_return: PoolReturn,
    mut scratch_return: PoolReturn,
    failed: &AtomicBool,
    undo: &mut UndoLog,
) {
    // Old bytes on their way into the undo log; one frame's worth at most.
    let mut undo_buf: Vec<u8> = vec![0u8; UNDO_CHUNK];
    let fds: Vec<RawFd> = disks.disks.iter().map(|d| d.fd()).collect();
    // SAFETY: the session owns both pools for longer than this function runs, and the
    // engine is dropped before this function returns; slot memory is reached only
    // through slots and views of slots held in `frames` while in flight.
    let fixed = unsafe { iovecs.fixed() };
    let mut engine = match io::open_engine::<SlotView>(kind, queue_depth, &fds, Some(fixed)) {
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
    let mut inflight = InFlight {
        frames: (0..recv_slots).map(|_| None).collect(),
        completions: Vec::with_capacity(queue_depth),
        error: None,
        recv_return,
        scratch_return,
    };
    let mut applied: u64 = 0;

    loop {
        // With writes in flight, inflight.completions must be reaped even when no new work
        // arrives: they return the receive buffers the session is waiting for.
        let msg = if engine.in_flight() > 0 {
            match rx.pop() {
                Some(m) => m,
                None if rx.is_abandoned() && rx.is_empty() => break,
                None => {
                    inflight.reap(&mut engine, 1, failed);
                    continue;
                }
            }
        } else {
            match rx.pop_wait() {
                Some(m) => m,
                None => break,
            }
        };
        match msg {
            ApplyMsg::Data {
                disk,
                recv,
                scratch,
            } => {
                if inflight.error.is_some() {
                    release(
                        &mut inflight.recv_return,
                        &mut inflight.scratch_return,
                        recv,
                        scratch,
                    );
                    continue;
                }
                let tag = recv.index() as usize;
                // Collect the writes first (coalescing neighbours), then submit.
                let mut writes: [(Place, u64, usize); 64] = [(Place::Zero, 0, 0); 64];
                let mut nwrites = 0usize;
                let mut spill: Vec<(Place, u64, usize)> = Vec::new();
                let mut zeros: Vec<(u64, u64)> = Vec::new();
                {
                    let payload = recv.as_slice();
                    let (_, recs) = records(payload).expect("the session verified this frame");
                    let mut placer = Placer::new();
                    let mut last: Option<(Place, u64, usize)> = None;
                    for rec in recs {
                        let place = placer.place(rec);
                        let offset = rec.offset.get();
                        let len = rec.length.get() as usize;
                        applied += len as u64;
                        if place == Place::Zero {
                            zeros.push((offset, len as u64));
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
                            let w = (*p, *o, *l);
                            if nwrites < writes.len() {
                                writes[nwrites] = w;
                                nwrites += 1;
                            } else {
                                spill.push(w);
                            }
                        }
                        last = Some((place, offset, len));
                    }
                    if let Some(w) = last {
                        if nwrites < writes.len() {
                            writes[nwrites] = w;
                            nwrites += 1;
                        } else {
                            spill.push(w);
                        }
                    }
                }
                // Atomic epochs: the bytes about to be overwritten are durable in the
                // undo log before any write of this frame is issued.
                if undo.logs(disk) {
                    let file = &disks.buffered[disk as usize];
                    let logged = writes[..nwrites]
                        .iter()
                        .chain(spill.iter())
                        .map(|&(_, o, l)| (o, l as u64))
                        .chain(zeros.iter().copied())
                        .try_for_each(|(o, l)| {
                            log_old(undo, file, disk, o, l, &mut undo_buf, false)
                        })
                        .and_then(|_| undo.sync());
                    if let Err(source) = logged {
                        inflight.fail(|| ApplyError::Stage {
                            disk: disks.names[disk as usize].clone(),
                            source,
                        });
                        failed.store(true, Ordering::Release);
                        release(
                            &mut inflight.recv_return,
                            &mut inflight.scratch_return,
                            recv,
                            scratch,
                        );
                        continue;
                    }
                }
                for (offset, len) in zeros {
                    inflight.settle(&mut engine, disk, offset, offset + len, failed);
                    if inflight.error.is_some() {
                        break;
                    }
                    if let Err(source) = disks.disks[disk as usize].zero_range(offset, len) {
                        inflight.fail(|| ApplyError::Zero {
                            disk: disks.names[disk as usize].clone(),
                            source,
                        });
                        failed.store(true, Ordering::Release);
                    }
                }
                // The frame enters the table before its first write, holding one extra
                // reference for the submission itself, so a completion reaped while
                // the queue is full can never release the buffers under us.
                let (start, end) = writes[..nwrites]
                    .iter()
                    .chain(spill.iter())
                    .fold((u64::MAX, 0), |(s, e), &(_, o, l)| {
                        (s.min(o), e.max(o + l as u64))
                    });
                inflight.frames[tag] = Some(InFlightFrame {
                    recv,
                    scratch,
                    pending: 1,
                    disk,
                    start,
                    end,
                });
                let all = writes[..nwrites].iter().chain(spill.iter());
                for &(place, offset, len) in all {
                    let entry = inflight.frames[tag].as_mut().expect("entered above");
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
                    let d = &disks.disks[disk as usize];
                    if d.is_direct() && len % 512 != 0 {
                        // The partial sector at the end of an odd-sized disk.
                        let bytes = &slot.as_slice()[at..at + len];
                        if let Err(source) =
                            disks.buffered[disk as usize].write_all_at(bytes, offset)
                        {
                            inflight.fail(|| ApplyError::PartialSector {
                                disk: disks.names[disk as usize].clone(),
                                offset,
                                source,
                            });
                            failed.store(true, Ordering::Release);
                        }
                        continue;
                    }
                    // SAFETY: the slot stays in `inflight.frames[tag]` until `pending` reaches
                    // zero, which happens only after the last write using this view was
                    // reaped (and the submission reference below was dropped).
                    let view = unsafe { SlotView::new(slot, at, len, base) };
                    let mut view = Some(view);
                    loop {
                        if engine.in_flight() >= engine.queue_depth() {
                            inflight.reap(&mut engine, 1, failed);
                        }
                        match engine.submit_write(
                            DiskId(disk),
                            view.take().expect("view present"),
                            offset,
                            len as u32,
                            tag as u64,
                        ) {
                            Ok(()) => {
                                inflight.frames[tag]
                                    .as_mut()
                                    .expect("held by the submission reference")
                                    .pending += 1;
                                break;
                            }
                            Err((IoError::QueueFull { .. }, v)) => view = Some(v),
                            Err((source, _v)) => {
                                inflight.fail(|| ApplyError::Submit {
                                    disk: disks.names[disk as usize].clone(),
                                    source,
                                });
                                failed.store(true, Ordering::Release);
                                break;
                            }
                        }
                    }
                }
                let entry = inflight.frames[tag]
                    .as_mut()
                    .expect("held by the submission reference");
                entry.pending -= 1;
                if entry.pending == 0 {
                    let f = inflight.frames[tag].take().expect("checked above");
                    release(
                        &mut inflight.recv_return,
                        &mut inflight.scratch_return,
                        f.recv,
                        f.scratch,
                    );
                }
            }
            ApplyMsg::Zero { disk, offset, len } => {
                if inflight.error.is_none() && undo.logs(disk) {
                    let file = &disks.buffered[disk as usize];
                    if let Err(source) = log_old(undo, file, disk, offset, len, &mut undo_buf, true)
                        .and_then(|_| undo.sync())
                    {
                        inflight.fail(|| ApplyError::Stage {
                            disk: disks.names[disk as usize].clone(),
                            source,
                        });
                        failed.store(true, Ordering::Release);
                    }
                }
                if inflight.error.is_none() {
                    inflight.settle(&mut engine, disk, offset, offset + len, failed);
                }
                if inflight.error.is_none() {
                    match disks.disks[disk as usize].zero_range(offset, len) {
                        Ok(()) => applied += len,
                        Err(source) => {
                            inflight.fail(|| ApplyError::Zero {
                                disk: disks.names[disk as usize].clone(),
                                source,
                            });
                            failed.store(true, Ordering::Release);
                        }
                    }
                }
            }
            ApplyMsg::Barrier { reply } => {
                while engine.in_flight() > 0 && !failed.load(Ordering::Acquire) {
                    inflight.reap(&mut engine, 1, failed);
                }
                if inflight.error.is_none() {
                    for (d, name) in disks.disks.iter().zip(disks.names) {
                        if let Err(source) = d.sync_data() {
                            inflight.fail(|| ApplyError::Sync {
                                disk: name.clone(),
                                source,
                            });
                            failed.store(true, Ordering::Release);
                            break;
                        }
                    }
                }
                let _ = reply.send(match &inflight.error {
                    None => Ok(applied),
                    Some(e) => Err(Arc::clone(e)),
                });
            }
        }
    }
    // Reap everything before the buffers can go away.
    while engine.in_flight() > 0 {
        let before = engine.in_flight();
        inflight.reap(&mut engine, 1, failed);
        if engine.in_flight() == before && inflight.error.is_some() {
            // The engine itself failed; waiting again would not help. Leak the slots
            // rather than free memory the kernel may still write.
            std::mem::forget(inflight.frames);
            return;
        }
    }
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
            let entry = self.frames[c.tag as usize]
                .as_mut()
                .expect("completion for a frame in flight");
            entry.pending -= 1;
            if entry.pending == 0 {
                let f = self.frames[c.tag as usize].take().expect("checked above");
                release(
                    &mut self.recv_return,
                    &mut self.scratch_return,
                    f.recv,
                    f.scratch,
                );
            }
        }
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

/// Bytes of old data read and logged at a time.
const UNDO_CHUNK: usize = 4 << 20;

/// Appends the old content of `[offset, offset + len)` of a replica to the undo log.
/// All-zero pieces are logged as zero ranges without data, so a rollback still puts the
/// zeros back. With `skip_holes`, the replica's holes are found with SEEK_DATA and
/// logged without reading them: a large zero range on a mostly empty replica costs a few
/// bytes of log. (SEEK_HOLE is not used: on some file systems it scans the page cache up
/// to the next hole, which is quadratic over a dense file.)
fn log_old(
    undo: &mut UndoLog,
    file: &std::fs::File,
    disk: u32,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    skip_holes: bool,
) -> Result<(), super::TargetError> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        if skip_holes {
            // SAFETY: lseek on an open descriptor has no memory effects.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            let next = if data < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    // A hole to the end of the file.
                    Some(libc::ENXIO) => end,
                    // No SEEK_DATA here (a block device): read everything.
                    _ => pos,
                }
            } else {
                (data as u64).min(end)
            };
            if next > pos {
                undo.append_zero(disk, pos, next - pos)?;
                pos = next;
                continue;
            }
        }
        let n = ((end - pos) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], pos).map_err(|source| {
            super::TargetError::ReadOldBytes {
                disk,
                offset: pos,
                source,
            }
        })?;
        if crate::protocol::is_zero(&buf[..n]) {
            undo.append_zero(disk, pos, n as u64)?;
        } else {
            undo.append(disk, pos, &buf[..n])?;
        }
        pos += n as u64;
    }
    Ok(())
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
                reserved: [0; 3],
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
                generation: [1; 16],
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
            &iovecs,
            slots,
            scratch_base,
            rx,
            recv_return,
            scratch_return,
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
