//! One source connection: handshake, open, then frames until commit or close.

use std::io::BufReader;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use ferry_ringbuf::pool::{BufferPool, PoolAlloc, PoolReturn};
use ferry_ringbuf::spsc;
use filter_driver_shim_contract::bitmap::{ChangedBlockBitmap, GenerationId};
use zerocopy::{FromBytes, IntoBytes};

use super::apply::{applier_loop, ApplyBuffers, ApplyDisks, ApplyMsg};
use super::received::Received;
use super::rejection::{Held, Rejection, SeedFrame};
use super::stamp::{ReplicaStamp, StampChange};
use super::state::ReplicaRecord;
use super::undo::{CommitFailure, Recovery, UndoDisk, UndoLog};
use super::verify::{self, Geometry};
use super::{Shared, TargetError};
use crate::io::{Disk, ReplicaState};
use crate::protocol::{
    auth, block_hash, is_zero, Commit, Committed, DiskManifest, DiskRun, FrameDeadline, FrameKind,
    FrameReader, FrameWriter, HashesHeader, Incoming, OpenDisk, OpenDiskReply, OpenHeader,
    SyncMode, TimedStream, GRANULE_RECORDS_VERSION, MAX_DIFF_RUNS_PER_FRAME, MAX_DISKS_PER_SESSION,
    MAX_FRAME_PAYLOAD, MAX_NAME_LEN, MULTI_EPOCH_VERSION, OPEN_DISCARD_REPLICA_CHANGES,
    OPEN_PROMOTE, REPLICA_COMPARE, REPLICA_CREATED, REPLICA_EXISTING, ZERO_BLOCK_HASH,
};

/// Receive buffers per session: frames in flight between the socket and the disks.
/// Eight 4 MiB frames keep a fast disk busy while bounding a session to ~66 MiB.
pub(super) const RECV_SLOTS: usize = 8;
/// Scratch buffers (decompression, realignment), one per receive buffer at most.
pub(super) const SCRATCH_SLOTS: usize = RECV_SLOTS;
/// Depth of the session → applier ring; every message but barriers holds a receive
/// slot, so the pool bounds it anyway.
const APPLY_RING_DEPTH: usize = 16;

struct SessionDisk {
    name: String,
    geometry: Geometry,
    mode: SyncMode,
    generation: GenerationId,
    /// Blocks whose replica content differs from the source's hashes (seeded).
    diff: Option<ChangedBlockBitmap>,
}

/// Releases the session's claim on its disks when the session ends, however it ends.
struct BusyGuard<'a> {
    shared: &'a Shared,
    names: Vec<String>,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.shared.busy.lock().unwrap_or_else(|p| p.into_inner());
        for n in &self.names {
            busy.remove(n);
        }
    }
}

/// Decrements a counter of [`Shared`] when dropped, however the session ends.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one connection, accepted at `accepted` and already counted in
/// `shared.pending`: the handshake (bounded by [`super::HANDSHAKE_DEADLINE`]), then,
/// once authenticated, a session slot under `max_sessions`, then the session.
pub fn run(
    shared: &Shared,
    stream: TcpStream,
    accepted: std::time::Instant,
) -> Result<String, TargetError> {
    let job = &shared.job;
    let pending = Counted(&shared.pending);
    let setup = TargetError::Socket;
    crate::protocol::tune_socket(&stream, job.io_timeout).map_err(setup)?;
    let read_half = stream.try_clone().map_err(setup)?;
    let (read_deadline, write_deadline) = (
        FrameDeadline::new(job.io_timeout),
        FrameDeadline::new(job.io_timeout),
    );
    let handshake_cap = Some((
        accepted + super::HANDSHAKE_DEADLINE,
        super::HANDSHAKE_DEADLINE,
    ));
    read_deadline.cap(handshake_cap);
    write_deadline.cap(handshake_cap);
    let mut reader = FrameReader::with_deadline(
        BufReader::with_capacity(
            64 << 10,
            TimedStream::new(read_half, read_deadline.clone()).map_err(setup)?,
        ),
        read_deadline.clone(),
    );
    let mut writer = FrameWriter::with_deadline(
        TimedStream::new(stream, write_deadline.clone()).map_err(setup)?,
        write_deadline.clone(),
    );
    let version = auth::server_handshake(&mut reader, &mut writer, &job.psk)
        .map_err(TargetError::Handshake)?;
    read_deadline.cap(None);
    write_deadline.cap(None);
    drop(pending);

    let active = shared.sessions.fetch_add(1, Ordering::AcqRel);
    let _slot = Counted(&shared.sessions);
    let _active = crate::metrics::target().session();
    let result = if active >= job.max_sessions {
        Err(Rejection::SessionLimit {
            max: job.max_sessions,
        }
        .into())
    } else {
        let peer = writer.get_ref().get_ref().peer_addr();
        let peer = peer.map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        // Not "{peer}: …", which is how the line that ends a session begins.
        tracing::info!("session of {peer} authenticated (protocol version {version})");
        serve_epochs(shared, &mut reader, &mut writer, version, &peer)
    };
    if let Err(e) = &result {
        // Tell the source why, unless it was the source that went away.
        if !matches!(
            e,
            TargetError::Protocol(crate::protocol::ProtocolError::Remote { .. })
        ) {
            writer.send_error(e.code(), &crate::chain(e));
            linger(writer.get_ref().get_ref());
        }
    }
    result
}

/// After an Error frame: stop sending, then read and discard what the source still has
/// in flight for a short while, so closing does not reset the connection before the
/// source has read why (a reset can discard the Error frame in its receive queue).
fn linger(stream: &TcpStream) {
    use std::io::Read;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // The session's halves ran non-blocking under frame deadlines; here a plain
    // read timeout bounds each wait.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(250)));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut sink = [0u8; 64 << 10];
    let mut s = stream;
    while std::time::Instant::now() < deadline {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Serves the epochs of an authenticated session. A version-2 session carries one; from
/// [`MULTI_EPOCH_VERSION`] on, the source may open the next epoch on the same
/// connection once the previous one was acknowledged, and ends the session by closing
/// it between epochs. Every epoch is claimed, staged, committed or rolled back and
/// released on its own exactly as if it had a connection to itself: between epochs
/// the session holds its socket, its thread and its place under `max_sessions`, and
/// nothing else (no disk, no claim, no lock, no buffer pool). An epoch that fails ends
/// the session; the epochs acknowledged before it stay committed.
///
/// Between epochs, every frame is still due within `io_timeout`: a source that waits
/// longer than that for its next epoch sends Keepalive frames (see
/// [`crate::source`]), so a session whose source is gone (or hung) is closed after
/// `io_timeout` of silence.
fn serve_epochs<R: std::io::Read, W: std::io::Write>(
    shared: &Shared,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    version: u16,
    peer: &str,
) -> Result<String, TargetError> {
    let mut epochs: u64 = 0;
    loop {
        match serve(shared, reader, writer, version) {
            Ok(summary) if version < MULTI_EPOCH_VERSION => return Ok(summary),
            Ok(summary) => {
                epochs += 1;
                tracing::info!("{summary} (session of {peer})");
            }
            // The source ended the session between epochs: its normal end.
            Err(TargetError::ClosedBeforeOpen) if epochs > 0 => {
                return Ok(format!(
                    "session ended by the source after {epochs} epoch(s)"
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Serves one epoch of an authenticated session: Open, then the epoch's frames until
/// Commit, then the epoch committed (and acknowledged) or rolled back.
///
/// The receive pipeline (buffer pools, the applier thread and its io_uring) starts with
/// the epoch's first frame, and only if that frame is not its Commit: an epoch in which
/// nothing changed (an idle guest, every epoch interval) is committed without it. They
/// cost about 2 ms per epoch to set up, most of an idle epoch's cost at this end.
fn serve<R: std::io::Read, W: std::io::Write>(
    shared: &Shared,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    version: u16,
) -> Result<String, TargetError> {
    let job = &shared.job;
    let mut control = vec![0u8; 64 << 10];
    let opening = handshake(shared, reader, writer, &mut control)?;
    let epoch = opening.epoch;
    let not_a_point = opening.not_a_point();
    let DiskSet {
        handles,
        buffered,
        disks,
        undo: undo_disks,
    } = opening.disks;
    let (max_logical, slot_size) = batch_shape(opening.announced, &disks)?;
    let names: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
    let mut undo = undo_log(job, epoch, undo_disks, not_a_point)?;
    let outcome = match reader.next_header() {
        Ok(Some(first)) if first.kind == FrameKind::Commit => {
            let received = Received::new(disks.len());
            let frame = (&mut *reader, &mut control[..]);
            commit_unchanged(frame, &first, epoch, &received, &names, &handles)
        }
        Ok(Some(first)) => {
            let epoch_io = EpochIo {
                reader,
                control,
                first,
            };
            let changes = Changes {
                disks,
                handles: &handles,
                buffered: &buffered,
                names: &names,
                epoch,
                version,
                max_logical,
                slot_size,
            };
            receive_changes(job, epoch_io, changes, &mut undo, writer)
        }
        Ok(None) => Err(Rejection::ClosedBeforeCommit.into()),
        Err(e) => Err(e.into()),
    };
    let staged = Staged {
        replicas: (handles, buffered),
        shared,
        epoch,
        names,
        busy: opening.busy,
        apply_lock: opening.apply_lock,
        undo,
        promote: opening.promote,
        reprotected: opening.reprotected,
    };
    staged.settle(writer, outcome)
}

/// The session's reader as an epoch's receiving starts: its first frame's header,
/// already read, and the buffer for frames that do not go to the applier.
struct EpochIo<'r, R> {
    reader: &'r mut FrameReader<R>,
    control: Vec<u8>,
    first: Incoming,
}

/// An epoch that carries changes, as its pipeline needs it.
struct Changes<'a> {
    disks: Vec<SessionDisk>,
    handles: &'a [Disk],
    buffered: &'a [std::fs::File],
    names: &'a [String],
    epoch: u64,
    version: u16,
    /// Largest logical payload of a frame, and the slot size that holds one.
    max_logical: usize,
    slot_size: usize,
}

/// Receives an epoch that carries changes: starts the pipeline (pools, applier) and
/// takes the frames from `io.first` on until Commit; the bytes applied.
fn receive_changes<R: std::io::Read, W: std::io::Write>(
    job: &super::TargetJob,
    io: EpochIo<'_, R>,
    changes: Changes<'_>,
    undo: &mut UndoLog,
    writer: &mut FrameWriter<W>,
) -> Result<u64, TargetError> {
    let Changes {
        disks,
        handles,
        buffered,
        names,
        epoch,
        version,
        max_logical,
        slot_size,
    } = changes;
    let mut pools = Pools::new(slot_size)?;
    let (tx, rx) = spsc::channel::<ApplyMsg>(APPLY_RING_DEPTH);
    let failed = AtomicBool::new(false);
    let receiver = Receiver {
        geometries: record_geometries(&disks, version),
        decoders: verify::Decoders::new(version)?,
        received: Received::new(disks.len()),
        reader: io.reader,
        pending: Some(io.first),
        control: io.control,
        recv_alloc: &mut pools.recv,
        scratch_alloc: &mut pools.scratch,
        tx,
        failed: &failed,
        disks,
        buffered,
        names,
        max_logical,
        epoch,
    };
    let applier = Applier {
        disks: ApplyDisks {
            disks: handles,
            buffered,
            names,
        },
        buffers: ApplyBuffers {
            iovecs: &pools.iovecs,
            recv_slots: RECV_SLOTS,
            scratch_base: pools.scratch_base,
            recv_return: pools.recv_return,
            scratch_return: pools.scratch_return,
        },
        rx,
        failed: &failed,
        undo,
    };
    receive_epoch(job, receiver, applier, writer)
}

/// Commits an epoch whose first frame is its Commit: the Commit is checked exactly as
/// after frames (its epoch, and manifests that must say nothing was sent), and the
/// replicas are made durable as the applier's barrier would; nothing was written.
fn commit_unchanged<R: std::io::Read>(
    (reader, control): (&mut FrameReader<R>, &mut [u8]),
    incoming: &Incoming,
    epoch: u64,
    received: &Received,
    names: &[String],
    replicas: &[Disk],
) -> Result<u64, TargetError> {
    check_commit(reader, control, incoming, epoch, received, names)?;
    super::apply::sync_replicas(replicas, names)
        .map_err(|e| TargetError::Apply(std::sync::Arc::new(*e)))?;
    Ok(0)
}

/// Reads and checks a Commit frame: its length, its epoch, and its manifests against
/// what arrived. Before anything may call the epoch committed, it must be exactly what
/// the source sent.
fn check_commit<R: std::io::Read>(
    reader: &mut FrameReader<R>,
    control: &mut [u8],
    incoming: &Incoming,
    epoch: u64,
    received: &Received,
    names: &[String],
) -> Result<(), TargetError> {
    let payload = reader.read_payload(incoming, control)?;
    let (commit, sent) = Commit::ref_from_prefix(payload)
        .ok()
        .and_then(|(c, rest)| {
            let sent = <[DiskManifest]>::ref_from_bytes(rest).ok()?;
            (sent.len() == c.disk_count.get() as usize).then_some((c, sent))
        })
        .ok_or(Rejection::CommitLength)?;
    if commit.epoch.get() != epoch {
        return Err(Rejection::CommitEpoch {
            got: commit.epoch.get(),
            session: epoch,
        }
        .into());
    }
    received.check_commit(names, sent)
}

/// Each disk's geometry as this session's records may cover it: whole blocks, or from
/// [`GRANULE_RECORDS_VERSION`] on runs of granules inside a block.
fn record_geometries(disks: &[SessionDisk], version: u16) -> Vec<Geometry> {
    disks
        .iter()
        .map(|d| Geometry {
            granular: version >= GRANULE_RECORDS_VERSION,
            ..d.geometry
        })
        .collect()
}

/// The epoch's undo log, durable; marked never to become a recovery point when the
/// session discards changes made to a replica outside ferry.
fn undo_log(
    job: &super::TargetJob,
    epoch: u64,
    disks: Vec<UndoDisk>,
    not_a_point: Option<NotAPoint>,
) -> Result<UndoLog, TargetError> {
    let undo = UndoLog::create(&job.state_dir, epoch, disks)?;
    if let Some(why) = not_a_point {
        if let Err(e) = undo.not_a_point(why == NotAPoint::Discards) {
            // Nothing was written under this log yet: it goes, rather than outlive the
            // session unmarked.
            if let Err(r) = undo.roll_back(&job.replicas()) {
                tracing::error!(
                    "an unused undo log could not be removed: {}",
                    crate::chain(&r)
                );
            }
            return Err(e);
        }
    }
    Ok(undo)
}

/// What the session's Open frame opened.
struct Opening<'s> {
    /// The apply lock, shared with other sessions (a failover takes it alone), held
    /// from before the replicas are opened until the epoch is settled.
    apply_lock: std::fs::File,
    epoch: u64,
    /// The batch size the source announced.
    announced: usize,
    disks: DiskSet,
    busy: BusyGuard<'s>,
    /// The final epoch of a planned failover (see [`promotion`]).
    promote: bool,
    /// Disks whose changes made outside ferry this epoch discards.
    discarded: Vec<String>,
    /// Disks this epoch reverse-replicates onto (see [`super::reprotect`]).
    reprotected: Vec<String>,
}

/// Why an epoch's log is no recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotAPoint {
    /// It discards changes made outside ferry: its old bytes hold them.
    Discards,
    /// Reverse replication: its old bytes are the old primary's, no acknowledged epoch.
    Reprotects,
}

impl Opening<'_> {
    /// Neither discarding a replica's own changes nor reverse replication leaves a log
    /// whose old bytes are an epoch anyone acknowledged: it is no recovery point.
    fn not_a_point(&self) -> Option<NotAPoint> {
        if !self.discarded.is_empty() {
            Some(NotAPoint::Discards)
        } else if !self.reprotected.is_empty() {
            Some(NotAPoint::Reprotects)
        } else {
            None
        }
    }
}

/// Handles the session's Open frame (read into `control`): claims and opens the disks
/// and tells the source what each replica holds.
fn handshake<'s, R: std::io::Read, W: std::io::Write>(
    shared: &'s Shared,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    control: &mut [u8],
) -> Result<Opening<'s>, TargetError> {
    // A promoted site takes no epoch from anyone: refused at once, and checked again
    // under the apply lock, which a failover holds while it promotes the site.
    super::role::fence(&shared.job.state_dir)?;
    let len = next_open(reader, control)?;
    let payload = &control[..len];
    let apply_lock = super::apply_lock(&shared.job.state_dir, false)?;
    super::role::fence(&shared.job.state_dir)?;
    let announced = announced_batch(payload);
    let (epoch, opened, busy) = open(shared, payload)?;
    let promote = promotion(&shared.job, payload)?;
    let discarded = opened
        .iter()
        .filter(|o| o.discarded)
        .map(|o| o.session.name.clone())
        .collect();
    let reprotected = opened
        .iter()
        .filter(|o| o.session.mode == SyncMode::Reprotect)
        .map(|o| o.session.name.clone())
        .collect();
    let replies: Vec<OpenDiskReply> = opened.iter().map(OpenedDisk::reply).collect();
    writer.send(FrameKind::OpenOk, &[replies.as_bytes()])?;
    Ok(Opening {
        apply_lock,
        epoch,
        announced,
        disks: DiskSet::from(opened),
        busy,
        promote,
        discarded,
        reprotected,
    })
}

/// Reads the next epoch's Open frame into `control`, skipping the Keepalive frames a
/// source sends while it waits for the epoch (see [`serve_epochs`]); the payload's
/// length.
fn next_open<R: std::io::Read>(
    reader: &mut FrameReader<R>,
    control: &mut [u8],
) -> Result<usize, TargetError> {
    loop {
        match reader.read_frame(control)? {
            Some((FrameKind::Keepalive, _)) => continue,
            Some((FrameKind::Open, payload)) => return Ok(payload.len()),
            Some((found, _)) => {
                return Err(crate::protocol::ProtocolError::Unexpected {
                    expected: FrameKind::Open,
                    found,
                }
                .into())
            }
            // Authenticated, then closed (a probe, `ferry check --connect`), or a
            // session ended between epochs: not a failure.
            None => return Err(TargetError::ClosedBeforeOpen),
        }
    }
}

/// The batch size the Open frame announces; 0 (none announced) if it is too short,
/// which [`open`] then refuses.
fn announced_batch(payload: &[u8]) -> usize {
    OpenHeader::ref_from_prefix(payload)
        .map(|(h, _)| h.max_batch_bytes.get() as usize)
        .unwrap_or(0)
}

/// The opened disks, regrouped by who uses what. The replica handles are shared with
/// the applier (which writes) and the hash compare (which reads through the buffered
/// handles); the rest is session state.
struct DiskSet {
    handles: Vec<Disk>,
    buffered: Vec<std::fs::File>,
    disks: Vec<SessionDisk>,
    /// The disks as the epoch's undo log records them.
    undo: Vec<UndoDisk>,
}

impl From<Vec<OpenedDisk>> for DiskSet {
    fn from(opened: Vec<OpenedDisk>) -> Self {
        let mut set = DiskSet {
            handles: Vec::with_capacity(opened.len()),
            buffered: Vec::with_capacity(opened.len()),
            disks: Vec::with_capacity(opened.len()),
            undo: opened.iter().map(OpenedDisk::undo_disk).collect(),
        };
        for o in opened {
            set.handles.push(o.disk);
            set.buffered.push(o.buffered);
            set.disks.push(o.session);
        }
        set
    }
}

/// The largest logical batch a frame may carry and the receive slot size for it.
///
/// Buffers are sized to what the source announced: with the default 256 KiB batches a
/// session holds ~5 MiB instead of ~66 MiB, and sets up (and pins for io_uring)
/// correspondingly faster. A frame larger than announced is refused as oversized.
fn batch_shape(announced: usize, disks: &[SessionDisk]) -> Result<(usize, usize), TargetError> {
    let max_logical = match announced {
        0 => verify::MAX_FRAME_LOGICAL,
        n => n.min(verify::MAX_FRAME_LOGICAL),
    };
    let min_block = disks
        .iter()
        .map(|d| d.geometry.block_size as usize)
        .min()
        .unwrap_or(4096);
    if max_logical % 4096 != 0 || max_logical < min_block {
        return Err(Rejection::BadBatch {
            announced: max_logical,
            min_block,
        }
        .into());
    }
    let slot_size = verify::frame_bound(max_logical, min_block).min(MAX_FRAME_PAYLOAD);
    Ok((max_logical, slot_size))
}

/// A session's buffer pools: receive slots for frames, scratch slots for blocks that
/// are decompressed or realigned, and the iovec table that registers both.
struct Pools {
    recv: PoolAlloc,
    recv_return: PoolReturn,
    scratch: PoolAlloc,
    scratch_return: PoolReturn,
    iovecs: crate::buffers::IovecTable,
    scratch_base: crate::buffers::FixedBase,
}

impl Pools {
    fn new(slot_size: usize) -> Result<Self, TargetError> {
        let (recv, recv_return) =
            BufferPool::new(slot_size, RECV_SLOTS).map_err(TargetError::Pool)?;
        let (scratch, scratch_return) =
            BufferPool::new(slot_size, SCRATCH_SLOTS).map_err(TargetError::Pool)?;
        let mut iovecs = crate::buffers::IovecTable::with_first_pool(recv.region());
        let scratch_base = iovecs.push_pool(scratch.region());
        Ok(Self {
            recv,
            recv_return,
            scratch,
            scratch_return,
            iovecs,
            scratch_base,
        })
    }
}

/// What the applier thread is started with (see [`applier_loop`]).
struct Applier<'a> {
    disks: ApplyDisks<'a>,
    buffers: ApplyBuffers<'a>,
    rx: spsc::Consumer<ApplyMsg>,
    failed: &'a AtomicBool,
    undo: &'a mut UndoLog,
}

/// Runs the applier on its own thread while `receiver` takes the epoch's frames;
/// the bytes applied once the Commit's barrier found every replica durable.
fn receive_epoch<R: std::io::Read, W: std::io::Write>(
    job: &super::TargetJob,
    mut receiver: Receiver<'_, R>,
    applier: Applier<'_>,
    writer: &mut FrameWriter<W>,
) -> Result<u64, TargetError> {
    std::thread::scope(|scope| {
        let Applier {
            disks,
            buffers,
            rx,
            failed,
            undo,
        } = applier;
        let thread = std::thread::Builder::new()
            .name("ferry-applier".into())
            .spawn_scoped(scope, move || {
                applier_loop(
                    job.engine,
                    job.queue_depth,
                    disks,
                    buffers,
                    rx,
                    failed,
                    undo,
                )
            })
            .map_err(TargetError::ApplierThread)?;
        let result = receiver.receive(writer);
        // Dropping the ring's sending end stops the applier once it drained.
        drop(receiver);
        if thread.join().is_err() {
            return Err(TargetError::ApplierPanicked);
        }
        result
    })
}

/// The receiving side of a session: reads frames, verifies them and hands them, in
/// order, to the applier.
struct Receiver<'a, R> {
    reader: &'a mut FrameReader<R>,
    /// The epoch's first frame header, read before the pipeline started.
    pending: Option<Incoming>,
    /// Buffer for frames that do not go to the applier.
    control: Vec<u8>,
    /// Borrowed: the pools outlive the applier, which registered their memory.
    recv_alloc: &'a mut PoolAlloc,
    scratch_alloc: &'a mut PoolAlloc,
    tx: spsc::Producer<ApplyMsg>,
    /// Set by the applier when it failed.
    failed: &'a AtomicBool,
    disks: Vec<SessionDisk>,
    buffered: &'a [std::fs::File],
    geometries: Vec<Geometry>,
    names: &'a [String],
    decoders: verify::Decoders,
    received: Received,
    max_logical: usize,
    epoch: u64,
}

impl<R: std::io::Read> Receiver<'_, R> {
    /// Takes frames until Commit; the bytes applied once the epoch is durable.
    fn receive<W: std::io::Write>(
        &mut self,
        writer: &mut FrameWriter<W>,
    ) -> Result<u64, TargetError> {
        loop {
            if self.failed.load(Ordering::Acquire) {
                return Err(self.applier_failure());
            }
            let next = match self.pending.take() {
                Some(first) => Some(first),
                None => self.reader.next_header()?,
            };
            let Some(incoming) = next else {
                return Err(Rejection::ClosedBeforeCommit.into());
            };
            match incoming.kind {
                FrameKind::Data => self.data(&incoming)?,
                FrameKind::Zero => self.zero(&incoming)?,
                FrameKind::Hashes => {
                    let buf = control_big(&mut self.control);
                    let payload = self.reader.read_payload(&incoming, buf)?;
                    compare_hashes(&mut self.disks, self.buffered, payload)?;
                }
                FrameKind::HashZeroRun => {
                    let payload = self.reader.read_payload(&incoming, &mut self.control)?;
                    let run = DiskRun::read_from_bytes(payload)
                        .map_err(|_| Rejection::HashZeroRunLength)?;
                    compare_zero_run(&mut self.disks, self.buffered, &run)?;
                }
                FrameKind::HashesDone => {
                    self.reader.read_payload(&incoming, &mut self.control)?;
                    send_diff(&self.disks, writer)?;
                }
                FrameKind::Commit => return self.commit(&incoming),
                other => return Err(Rejection::UnexpectedFrame { kind: other }.into()),
            }
        }
    }

    /// Why the applier failed, as its barrier reports it.
    fn applier_failure(&mut self) -> TargetError {
        let (reply, answer) = mpsc::sync_channel(1);
        let _ = self.tx.push_wait(ApplyMsg::Barrier { reply });
        match answer.recv() {
            Ok(Err(why)) => TargetError::Apply(why),
            _ => TargetError::ApplierGone,
        }
    }

    fn push(&mut self, msg: ApplyMsg) -> Result<(), TargetError> {
        self.tx.push_wait(msg).map_err(|_| TargetError::ApplierGone)
    }

    /// A Data frame: received into a slot, verified whole, checked for order, then
    /// handed to the applier with its slots.
    fn data(&mut self, incoming: &Incoming) -> Result<(), TargetError> {
        let mut recv = self
            .recv_alloc
            .alloc_wait()
            .ok_or(TargetError::ApplierGone)?;
        let payload_len = incoming.payload_len;
        self.reader.read_payload(incoming, recv.as_mut_slice())?;
        let payload = &recv.as_slice()[..payload_len];
        let mut scratch = if verify::needs_scratch(payload)? {
            Some(
                self.scratch_alloc
                    .alloc_wait()
                    .ok_or(TargetError::ApplierGone)?,
            )
        } else {
            None
        };
        let (disk, _) = verify::verify_data_within(
            payload,
            &self.geometries,
            self.names,
            scratch.as_mut().map(|s| s.as_mut_slice()),
            &mut self.decoders,
            self.max_logical,
        )?;
        let (_, records) = verify::records(payload)?;
        self.received
            .data(disk, &self.names[disk as usize], records)?;
        self.push(ApplyMsg::Data {
            disk,
            recv,
            scratch,
        })
    }

    /// A Zero frame: a range inside its disk, in order, handed to the applier.
    fn zero(&mut self, incoming: &Incoming) -> Result<(), TargetError> {
        let payload = self.reader.read_payload(incoming, &mut self.control)?;
        let run = DiskRun::read_from_bytes(payload).map_err(|_| Rejection::ZeroLength)?;
        let disk = run.disk.get();
        let g = self
            .geometries
            .get(disk as usize)
            .ok_or(Rejection::ZeroUnknownDisk {
                disk,
                opened: self.geometries.len(),
            })?;
        let (offset, len) = (run.start.get(), run.count.get());
        if offset % g.block_size != 0 || offset.checked_add(len).is_none_or(|end| end > g.disk_size)
        {
            return Err(Rejection::ZeroOutside {
                disk: self.names[disk as usize].clone(),
                offset,
                len,
                disk_size: g.disk_size,
            }
            .into());
        }
        self.received
            .zero(disk, &self.names[disk as usize], offset, len)?;
        self.push(ApplyMsg::Zero { disk, offset, len })
    }

    /// The Commit frame: checked against what arrived, then the applier's barrier makes
    /// every replica durable.
    fn commit(&mut self, incoming: &Incoming) -> Result<u64, TargetError> {
        // Everything received was verified and handed to the applier in order.
        check_commit(
            self.reader,
            &mut self.control,
            incoming,
            self.epoch,
            &self.received,
            self.names,
        )?;
        let (reply, answer) = mpsc::sync_channel(1);
        self.push(ApplyMsg::Barrier { reply })?;
        answer
            .recv()
            .map_err(|_| TargetError::ApplierGone)?
            .map_err(TargetError::Apply)
    }
}

/// An epoch whose frames were received (or that failed): what committing it or rolling
/// it back needs.
struct Staged<'s> {
    /// The replicas' handles; the buffered ones hold the replicas' locks (see
    /// [`super::stamp::hold`]) until they are dropped.
    replicas: (Vec<Disk>, Vec<std::fs::File>),
    shared: &'s Shared,
    epoch: u64,
    names: Vec<String>,
    /// The session's claim on its disks, held until the epoch is committed or rolled
    /// back; released before the source hears "Committed", so its next sync never
    /// finds the disks still claimed.
    busy: BusyGuard<'s>,
    /// Held until the epoch is committed or rolled back.
    apply_lock: std::fs::File,
    undo: UndoLog,
    /// The final epoch of a planned failover: promote the site once it commits.
    promote: bool,
    /// Disks whose change sets (`.owed`) this epoch consumes once it commits.
    reprotected: Vec<String>,
}

impl Staged<'_> {
    /// Commits an epoch whose replicas are durable and tells the source; rolls back one
    /// that failed (or whose commit mark did not become durable).
    fn settle<W: std::io::Write>(
        self,
        writer: &mut FrameWriter<W>,
        outcome: Result<u64, TargetError>,
    ) -> Result<String, TargetError> {
        let Staged {
            replicas,
            shared,
            epoch,
            names,
            busy,
            apply_lock,
            undo,
            promote,
            reprotected,
        } = self;
        let applied = match outcome {
            Ok(applied) => applied,
            Err(e) => return Err(abandon(shared, busy, undo, epoch, e)),
        };
        // The replicas are durable; the commit mark is the commit point of the epoch.
        match undo
            .commit(&shared.job.retention, &shared.job.replicas())
            .map_err(|f| *f)
        {
            Ok(()) => {
                after_commit(shared, epoch, promote, &reprotected)?;
                // Released only once a write after this instant gets a later time
                // than the replicas' stamps.
                if !clock_past_replicas(&replicas.1) {
                    super::stamp::wait_for_clock_tick();
                }
                drop(replicas);
                drop(apply_lock);
                drop(busy);
                acknowledge(writer, epoch, applied, &names)
            }
            Err(CommitFailure::NotCommitted { log, error }) => {
                Err(abandon(shared, busy, log, epoch, error))
            }
            Err(CommitFailure::Undecided { log, disks, error }) => {
                tracing::error!(
                    "epoch {epoch}: {}; whether it committed is settled by the next session for disk(s) {} (they stay out of service until then)",
                    crate::chain(&error),
                    disks.join(", ")
                );
                quarantine(shared, busy, log, disks);
                Err(error)
            }
            Err(CommitFailure::Unfinished { log, disks, error }) => {
                // Committed: say so. The records and the kept log are completed before
                // these disks serve anything again (next session or next start).
                tracing::error!(
                    "epoch {epoch} committed, but completing its records failed: {}; disk(s) {} stay out of service until a later session completes them",
                    crate::chain(&error),
                    disks.join(", ")
                );
                quarantine(shared, busy, log, disks);
                drop(apply_lock);
                acknowledge(writer, epoch, applied, &names)
            }
        }
    }
}

/// Whether the file system's clock (the coarse real-time clock) is already past every
/// time `stat` reports for `replicas`: then a write from now on gets a later time than
/// their stamps without waiting for a tick. So it is after an epoch that wrote nothing
/// (an idle guest), whose replicas still carry the times of an earlier epoch; after one
/// that wrote, their times are of this very tick, and the release waits for the next.
fn clock_past_replicas(replicas: &[std::fs::File]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own, for the call's duration.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    let now = (ts.tv_sec, ts.tv_nsec);
    replicas.iter().all(|f| {
        f.metadata()
            .is_ok_and(|m| now > (m.mtime(), m.mtime_nsec()) && now > (m.ctime(), m.ctime_nsec()))
    })
}

/// What a committed epoch asked for besides its data: a planned failover's final epoch
/// promotes the site (durably, before the source hears the epoch committed).
fn after_commit(
    shared: &Shared,
    epoch: u64,
    promote: bool,
    reprotected: &[String],
) -> Result<(), TargetError> {
    if promote {
        super::failover::promote_planned(&shared.job, epoch)?;
    }
    // The replicas now hold the source's lineage: what was owed is delivered. (Left
    // behind by a crash, a set names the old lineage and is ignored.)
    let state_dir = &shared.job.state_dir;
    if !reprotected.is_empty() && ferry_io::failpoint::hit("target.reprotect.owed.crash") {
        // A crash with the reverse epoch committed, its change sets still there and
        // the source not told.
        std::process::abort();
    }
    for name in reprotected {
        super::reprotect::remove_set(state_dir, &super::reprotect::owed_path(state_dir, name))?;
    }
    Ok(())
}

/// Puts every replica of an abandoned epoch back at its previous epoch before the
/// disks are released to another session; `error` is why it was abandoned.
fn abandon(
    shared: &Shared,
    busy: BusyGuard<'_>,
    undo: UndoLog,
    epoch: u64,
    error: TargetError,
) -> TargetError {
    let (log, log_disks) = (undo.path().to_path_buf(), undo.disk_names());
    match undo.roll_back(&shared.job.replicas()) {
        Ok(r @ Recovery::Distrusted { .. }) => tracing::error!(
            "epoch {epoch} abandoned, and its undo log cannot be trusted: {r}; the disks need a checksum-compare resync, which the next sync does"
        ),
        Ok(r) => tracing::warn!("epoch {epoch} abandoned: {r}"),
        Err(re) => {
            tracing::error!(
                "epoch {epoch} abandoned and its rollback failed: {}; its disks stay out of service until a later session completes the rollback",
                crate::chain(&re)
            );
            // The replicas are between epochs: keep their disks claimed and remember
            // the log.
            quarantine(shared, busy, log, log_disks);
        }
    }
    error
}

/// Tells the source its epoch is durable.
fn acknowledge<W: std::io::Write>(
    writer: &mut FrameWriter<W>,
    epoch: u64,
    applied: u64,
    names: &[String],
) -> Result<String, TargetError> {
    crate::metrics::target().committed(applied);
    writer.send(
        FrameKind::Committed,
        &[Committed {
            epoch: epoch.into(),
            bytes_applied: applied.into(),
        }
        .as_bytes()],
    )?;
    writer.flush()?;
    Ok(format!(
        "epoch {epoch} durable on {} disk(s) ({}), {applied} bytes applied",
        names.len(),
        names.join(", ")
    ))
}

/// Keeps `disks` claimed (the guard no longer releases them) until a later session
/// settles `log` (see [`finish_quarantined`]).
fn quarantine(
    shared: &Shared,
    mut busy: BusyGuard<'_>,
    log: std::path::PathBuf,
    disks: Vec<String>,
) {
    shared
        .quarantine
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((log, disks));
    busy.names.clear();
}

/// The control buffer, grown to the frame limit for hash frames (once per session).
fn control_big(control: &mut Vec<u8>) -> &mut Vec<u8> {
    if control.len() < MAX_FRAME_PAYLOAD {
        control.resize(MAX_FRAME_PAYLOAD, 0);
    }
    control
}

/// A disk the session opened: its handles, what the session knows of it, and what the
/// target knew of its replica before.
struct OpenedDisk {
    disk: Disk,
    /// A buffered handle, for the hash compare and odd-sized writes.
    buffered: std::fs::File,
    session: SessionDisk,
    /// The replica was created by this session.
    created: bool,
    /// The replica's last acknowledged epoch, if it has one.
    record: Option<ReplicaRecord>,
    /// Changes made to the replica outside ferry are being discarded by this session.
    discarded: bool,
    /// Reverse replication, and the target cannot say what was written to the replica
    /// since its lineage point: the source must compare every block.
    compare: bool,
}

impl OpenedDisk {
    /// What the source is told of this replica.
    fn reply(&self) -> OpenDiskReply {
        OpenDiskReply {
            state: if self.created {
                REPLICA_CREATED
            } else if self.compare {
                REPLICA_COMPARE
            } else {
                REPLICA_EXISTING
            },
            reserved: [0; 7],
            generation: self
                .record
                .as_ref()
                .map_or([0; 16], |r| *r.generation.as_bytes()),
            epoch: self.record.as_ref().map_or(0, |r| r.epoch).into(),
        }
    }

    /// The disk as the epoch's undo log records it. Replicas that hold an acknowledged
    /// epoch get their overwritten bytes logged, so the epoch applies atomically; a
    /// replica without one has no epoch to protect.
    fn undo_disk(&self) -> UndoDisk {
        UndoDisk {
            name: self.session.name.clone(),
            generation: self.session.generation,
            disk_size: self.session.geometry.disk_size,
            logged: !self.created && self.record.is_some(),
            prev_epoch: self.record.as_ref().map(|r| r.epoch),
        }
    }
}

/// Handles an Open frame: claims the named disks and opens their replicas; the
/// session's epoch, the disks in Open order, and the claim.
fn open<'s>(
    shared: &'s Shared,
    payload: &[u8],
) -> Result<(u64, Vec<OpenedDisk>, BusyGuard<'s>), TargetError> {
    let job = &shared.job;
    let (epoch, entries) = parse_open(payload)?;
    // Claim the disks first so two sources never write one replica.
    let names = entry_names(job, entries)?;
    finish_quarantined(shared, &names)?;
    let guard = claim(shared, &names)?;
    let opened = entries
        .iter()
        .zip(&names)
        .map(|(e, name)| open_disk(job, e, name))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((epoch, opened, guard))
}

/// Whether the Open frame asks for the planned failover's promotion: every entry or
/// none carries [`OPEN_PROMOTE`], and with it every configured disk is named.
fn promotion(job: &super::TargetJob, payload: &[u8]) -> Result<bool, TargetError> {
    let (_, entries) = parse_open(payload)?;
    let flagged = entries
        .iter()
        .filter(|e| e.flags & OPEN_PROMOTE != 0)
        .count();
    if flagged == 0 {
        return Ok(false);
    }
    let named = entry_names(job, entries)?;
    let missing: Vec<String> = job
        .disks
        .iter()
        .map(|d| d.name.clone())
        .filter(|n| !named.contains(n))
        .chain(
            entries
                .iter()
                .zip(&named)
                .filter(|(e, _)| e.flags & OPEN_PROMOTE == 0)
                .map(|(_, n)| n.clone()),
        )
        .collect();
    if missing.is_empty() {
        Ok(true)
    } else {
        Err(Rejection::PromoteNeedsAllDisks { missing }.into())
    }
}

/// The Open frame's epoch and disk entries, their count checked.
fn parse_open(payload: &[u8]) -> Result<(u64, &[OpenDisk]), TargetError> {
    let (header, rest) = OpenHeader::ref_from_prefix(payload).map_err(|_| Rejection::OpenShort)?;
    let count = header.disk_count.get() as usize;
    if count == 0 || count > MAX_DISKS_PER_SESSION {
        return Err(Rejection::DiskCount { count }.into());
    }
    let entries = <[OpenDisk]>::ref_from_bytes(rest)
        .ok()
        .filter(|e| e.len() == count)
        .ok_or(Rejection::OpenLength)?;
    Ok((header.epoch.get(), entries))
}

/// The entries' disk names: valid, configured here, and each named once.
fn entry_names(job: &super::TargetJob, entries: &[OpenDisk]) -> Result<Vec<String>, TargetError> {
    let mut names = Vec::with_capacity(entries.len());
    for e in entries {
        let len = e.name_len as usize;
        let name = (len <= MAX_NAME_LEN)
            .then(|| std::str::from_utf8(&e.name[..len]).ok())
            .flatten()
            .ok_or(Rejection::BadDiskName)?;
        if !job.disks.iter().any(|d| d.name == name) {
            return Err(Rejection::UnknownDisk {
                name: name.to_string(),
                configured: job.disks.iter().map(|d| d.name.clone()).collect(),
            }
            .into());
        }
        if names.iter().any(|n| n == name) {
            return Err(Rejection::OpenedTwice {
                name: name.to_string(),
            }
            .into());
        }
        names.push(name.to_string());
    }
    Ok(names)
}

/// Claims `names` for this session, unless another session holds one of them.
fn claim<'s>(shared: &'s Shared, names: &[String]) -> Result<BusyGuard<'s>, TargetError> {
    let mut busy = shared.busy.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = names.iter().find(|n| busy.contains(*n)) {
        return Err(Rejection::DiskBusy { name: n.clone() }.into());
    }
    busy.extend(names.iter().cloned());
    Ok(BusyGuard {
        shared,
        names: names.to_vec(),
    })
}

/// Opens one claimed disk: its announced shape checked, its base checked against the
/// replica's record, its replica opened (or created).
fn open_disk(job: &super::TargetJob, e: &OpenDisk, name: &str) -> Result<OpenedDisk, TargetError> {
    let (geometry, mode) = entry_shape(e, name)?;
    refuse_own_primary(job, name)?;
    let record = ReplicaRecord::load(&job.state_dir, name)?;
    let path = &job
        .disks
        .iter()
        .find(|d| d.name == name)
        .expect("checked by entry_names")
        .path;
    // Held before anything is checked or changed: a program that locks images cannot
    // slip a write in between the check and the session's own writes.
    let existing = open_held(name, path)?;
    let discarded = check_untouched(e, name, mode, path, record.as_ref())?;
    if discarded {
        // Before anything is written: these points would bring the changes made
        // outside ferry back under an epoch's name.
        super::points::retire(
            &job.state_dir,
            &[name.to_string()],
            "the replica was changed outside ferry, and a later epoch discards those changes",
        )?;
    }
    check_base(e, name, mode, geometry.disk_size, record.as_ref())?;
    if mode == SyncMode::Reprotect && existing.is_none() {
        // Created now it would be all zeros, and a delta would leave it so.
        return Err(Rejection::ReprotectMissing {
            disk: name.to_string(),
            path: path.clone(),
        }
        .into());
    }
    let (disk, state) =
        Disk::open_replica(path, geometry.disk_size).map_err(|source| Rejection::OpenReplica {
            disk: name.to_string(),
            source,
        })?;
    let buffered = match existing {
        Some(f) => f,
        None => open_held(name, path)?.ok_or_else(|| Rejection::OpenBuffered {
            disk: name.to_string(),
            path: path.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        })?,
    };
    let (diff, compare) = session_diff(job, e, name, mode, geometry, record.as_ref(), discarded)?;
    Ok(OpenedDisk {
        disk,
        buffered,
        session: SessionDisk {
            name: name.to_string(),
            geometry,
            mode,
            generation: GenerationId::from_bytes(e.generation),
            diff,
        },
        created: state == ReplicaState::Created,
        record,
        discarded,
        compare,
    })
}

/// A site with both roles: a disk its own engine replicates (it has a lineage there) or
/// its own shim tracks is the primary's disk, never a replica to write.
fn refuse_own_primary(job: &super::TargetJob, name: &str) -> Result<(), TargetError> {
    let Some(sa) = &job.own_source_state else {
        return Ok(());
    };
    let lineage = [
        crate::source::SourceDiskState::path(sa, name),
        sa.join(format!("{name}.shim-state")),
    ]
    .into_iter()
    .find(|p| p.exists());
    match lineage {
        Some(lineage) => Err(Rejection::PrimaryHere {
            disk: name.to_string(),
            lineage,
        }
        .into()),
        None => Ok(()),
    }
}

/// The bitmap of blocks the session reports back to the source (seeded: differences
/// found by the hash compare; reverse replication: also the blocks owed, see [`owe`]),
/// and whether the source must compare every block.
fn session_diff(
    job: &super::TargetJob,
    e: &OpenDisk,
    name: &str,
    mode: SyncMode,
    geometry: Geometry,
    record: Option<&ReplicaRecord>,
    discarded: bool,
) -> Result<(Option<ChangedBlockBitmap>, bool), TargetError> {
    let diff_and_compare = match mode {
        SyncMode::Seeded | SyncMode::Reprotect => {
            let gen = GenerationId::from_bytes(e.generation);
            let mut bitmap =
                ChangedBlockBitmap::new(geometry.disk_size, geometry.block_size as u32, gen, 0)
                    .map_err(|source| Rejection::DiffShape {
                        disk: name.to_string(),
                        source,
                    })?;
            let compare = if mode == SyncMode::Reprotect {
                let record = record.expect("check_base: reprotect needs a record");
                // Changes made outside ferry are in no set: only a compare finds them.
                discarded || !owe(&job.state_dir, name, record, gen, &mut bitmap)?
            } else {
                false
            };
            (Some(bitmap), compare)
        }
        SyncMode::Full | SyncMode::Changed => (None, false),
    };
    Ok(diff_and_compare)
}

/// Reverse replication: marks in `diff` the blocks written to the replica since its
/// lineage point (its `.owed` set, see [`super::reprotect`]), which the source must
/// send back. `false` when they are not known.
fn owe(
    state_dir: &std::path::Path,
    name: &str,
    record: &ReplicaRecord,
    source_generation: GenerationId,
    diff: &mut ChangedBlockBitmap,
) -> Result<bool, TargetError> {
    if record.suspect.is_some() {
        return Ok(false);
    }
    if record.generation == source_generation {
        // An earlier reverse epoch committed here and its answer was lost: the replica
        // holds the source's own generation, whose bits cover every change since.
        return Ok(true);
    }
    let path = super::reprotect::owed_path(state_dir, name);
    let owed = match super::reprotect::load_change_set(&path, Some(record.generation)) {
        Ok(Some(owed)) => owed,
        Ok(None) => return Ok(false),
        Err(e) => {
            tracing::warn!(
                disk = name,
                "{}: comparing every block instead",
                crate::chain(&e)
            );
            return Ok(false);
        }
    };
    let bs = u64::from(owed.block_size());
    for (first, count) in owed.iter_runs() {
        let start = first * bs;
        let len = (count * bs).min(owed.disk_size() - start);
        diff.set_range(start, len)
            .map_err(TargetError::DiffBitmap)?;
    }
    tracing::info!(
        disk = name,
        blocks = owed.count(),
        "reverse replication: the source sends back the blocks written here since epoch {}",
        record.epoch
    );
    Ok(true)
}

/// The replica at `path` opened for reading and writing and held (see
/// [`super::stamp::hold`]); `None` if there is none yet.
fn open_held(name: &str, path: &std::path::Path) -> Result<Option<std::fs::File>, TargetError> {
    let failed = |source| Rejection::OpenBuffered {
        disk: name.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(e).into()),
    };
    if !super::stamp::hold(&file).map_err(failed)? {
        return Err(Rejection::ReplicaInUse {
            disk: name.to_string(),
            path: path.to_path_buf(),
        }
        .into());
    }
    Ok(Some(file))
}

/// The disk's announced geometry and sync mode, checked.
fn entry_shape(e: &OpenDisk, name: &str) -> Result<(Geometry, SyncMode), TargetError> {
    let block_size = e.block_size.get() as u64;
    if !block_size.is_power_of_two() || !(4096..=(1 << 20)).contains(&block_size) {
        return Err(Rejection::BlockSize {
            disk: name.to_string(),
            block_size,
        }
        .into());
    }
    let disk_size = e.disk_size.get();
    if disk_size == 0 {
        return Err(Rejection::ZeroSize {
            disk: name.to_string(),
        }
        .into());
    }
    let mode = SyncMode::from_u8(e.mode).ok_or_else(|| Rejection::UnknownMode {
        disk: name.to_string(),
        mode: e.mode,
    })?;
    let geometry = Geometry {
        disk_size,
        block_size,
        granular: false,
    };
    Ok((geometry, mode))
}

/// Refuses a replica written by anything but this target since its last epoch (split
/// brain, see [`super::stamp`]), unless the source says to discard those changes with a
/// sync that compares every block; then `true` (changes were found and are being
/// discarded).
fn check_untouched(
    e: &OpenDisk,
    name: &str,
    mode: SyncMode,
    path: &std::path::Path,
    record: Option<&ReplicaRecord>,
) -> Result<bool, TargetError> {
    let discard = e.flags & OPEN_DISCARD_REPLICA_CHANGES != 0;
    if discard && mode == SyncMode::Changed {
        return Err(Rejection::DiscardNeedsResync {
            disk: name.to_string(),
        }
        .into());
    }
    let Some(record) = record else {
        return Ok(false);
    };
    if record.suspect.is_some() {
        // The writer itself left the replica between epochs (an undo log it could not
        // trust); `check_base` admits only a sync that compares every block.
        return Ok(false);
    }
    let now = ReplicaStamp::take(path).map_err(|source| TargetError::Io {
        disk: name.to_string(),
        source,
    })?;
    let changes = match (&record.stamp, &now) {
        (Some(stamp), _) => stamp.changes(now.as_ref()),
        // A record from an older ferry has no stamp; a replica gone missing is still
        // seen.
        (None, None) => vec![StampChange::Missing],
        (None, Some(_)) => Vec::new(),
    };
    if changes.is_empty() {
        return Ok(false);
    }
    if discard {
        tracing::warn!(
            disk = name,
            "discarding changes made to the replica outside ferry ({}): this sync compares every block and repairs them",
            super::stamp::describe(&changes)
        );
        return Ok(true);
    }
    Err(Rejection::ReplicaChanged {
        disk: name.to_string(),
        path: path.to_path_buf(),
        epoch: record.epoch,
        changes,
    }
    .into())
}

/// A changed-block epoch builds on the replica's bytes: they must be the acknowledged
/// epoch the change set starts from (or a later one) of the same generation and size.
fn check_base(
    e: &OpenDisk,
    name: &str,
    mode: SyncMode,
    disk_size: u64,
    record: Option<&ReplicaRecord>,
) -> Result<(), TargetError> {
    if mode == SyncMode::Reprotect {
        return match record {
            None => Err(Rejection::NotPrepared {
                disk: name.to_string(),
            }
            .into()),
            Some(r) if r.disk_size != disk_size => Err(Rejection::ReprotectSize {
                disk: name.to_string(),
                source_bytes: disk_size,
                replica_bytes: r.disk_size,
            }
            .into()),
            Some(_) => Ok(()),
        };
    }
    if mode != SyncMode::Changed {
        return Ok(());
    }
    if let Some(why) = record.and_then(|r| r.suspect.as_ref()) {
        return Err(Rejection::Suspect {
            disk: name.to_string(),
            why: why.clone(),
        }
        .into());
    }
    let ok = record.is_some_and(|r| {
        r.generation == GenerationId::from_bytes(e.generation)
            // A change set since an older epoch covers every change since the
            // replica's newer one (a source that died before recording an
            // acknowledgement resends from its last recorded epoch).
            && r.epoch >= e.base_epoch.get()
            && r.disk_size == disk_size
    });
    if ok {
        return Ok(());
    }
    Err(Rejection::BaseMismatch {
        disk: name.to_string(),
        base_epoch: e.base_epoch.get(),
        generation: GenerationId::from_bytes(e.generation),
        held: record.map(|r| Held {
            epoch: r.epoch,
            generation: r.generation,
        }),
    }
    .into())
}

/// Completes the rollback of every quarantined epoch that holds one of `names` (its
/// disks are reserved for it, so writing them is safe); on success they return to
/// service. If a rollback still fails, the session is refused, saying why.
fn finish_quarantined(shared: &Shared, names: &[String]) -> Result<(), TargetError> {
    let job = &shared.job;
    let replicas = job.replicas();
    let mut quarantine = shared.quarantine.lock().unwrap_or_else(|p| p.into_inner());
    let mut i = 0;
    while i < quarantine.len() {
        if !quarantine[i].1.iter().any(|d| names.contains(d)) {
            i += 1;
            continue;
        }
        // Settling writes replicas: under the apply lock, like an epoch (a failover
        // takes it alone).
        let settled = super::apply_lock(&job.state_dir, false).and_then(|_lock| {
            super::undo::recover_one(&job.state_dir, &quarantine[i].0, &replicas)
        });
        match settled {
            Ok(r) => {
                tracing::warn!("settled an interrupted epoch: {r}");
                let (_, disks) = quarantine.remove(i);
                let mut busy = shared.busy.lock().unwrap_or_else(|p| p.into_inner());
                for d in &disks {
                    busy.remove(d);
                }
            }
            Err(e) => {
                return Err(Rejection::Unsettled {
                    disks: quarantine[i].1.clone(),
                    error: Box::new(e),
                }
                .into())
            }
        }
    }
    Ok(())
}

fn seeded(
    disks: &mut [SessionDisk],
    disk: u32,
    frame: SeedFrame,
) -> Result<&mut SessionDisk, TargetError> {
    disks
        .get_mut(disk as usize)
        .filter(|d| d.diff.is_some())
        .ok_or(TargetError::Rejected(Rejection::NotSeeded { frame, disk }))
}

fn compare_hashes(
    disks: &mut [SessionDisk],
    files: &[std::fs::File],
    payload: &[u8],
) -> Result<(), TargetError> {
    let (header, hashes) =
        HashesHeader::ref_from_prefix(payload).map_err(|_| Rejection::HashesShort)?;
    let file = files.get(header.disk.get() as usize);
    let d = seeded(disks, header.disk.get(), SeedFrame::Hashes)?;
    let file = file.expect("seeded() checked the index");
    let bs = d.geometry.block_size;
    let count = header.block_count.get() as u64;
    let first = header.first_block.get();
    let blocks = d.geometry.disk_size.div_ceil(bs);
    if hashes.len() as u64 != count * 16
        || first.checked_add(count).is_none_or(|end| end > blocks)
        || count * bs > verify::MAX_FRAME_LOGICAL as u64
    {
        return Err(Rejection::HashesOutside {
            disk: d.name.clone(),
            first,
            count,
            blocks,
        }
        .into());
    }
    let start = first * bs;
    let len = ((first + count) * bs).min(d.geometry.disk_size) - start;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start)
        .map_err(|source| Rejection::ReadReplica {
            disk: d.name.clone(),
            offset: start,
            source,
        })?;
    let diff = d.diff.as_mut().expect("seeded disks have a diff bitmap");
    for (i, block) in buf.chunks(bs as usize).enumerate() {
        let theirs = &hashes[i * 16..i * 16 + 16];
        let ours = if is_zero(block) {
            ZERO_BLOCK_HASH
        } else {
            block_hash(block)
        };
        if ours != theirs {
            diff.set(first + i as u64)
                .map_err(TargetError::DiffBitmap)?;
        }
    }
    Ok(())
}

fn compare_zero_run(
    disks: &mut [SessionDisk],
    files: &[std::fs::File],
    run: &DiskRun,
) -> Result<(), TargetError> {
    let file = files.get(run.disk.get() as usize);
    let d = seeded(disks, run.disk.get(), SeedFrame::HashZeroRun)?;
    let file = file.expect("seeded() checked the index");
    let bs = d.geometry.block_size;
    let blocks = d.geometry.disk_size.div_ceil(bs);
    let (first, count) = (run.start.get(), run.count.get());
    if first.checked_add(count).is_none_or(|end| end > blocks) {
        return Err(Rejection::ZeroRunOutside {
            disk: d.name.clone(),
            first,
            count,
            blocks,
        }
        .into());
    }
    let end_byte = ((first + count) * bs).min(d.geometry.disk_size);
    let mut pos = first * bs;
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    let mut buf = vec![0u8; bs as usize];
    while pos < end_byte {
        // Skip what the replica itself holds as holes; read only its data.
        // SAFETY: lseek on an fd we own has no memory effects.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        let data = if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // nothing but hole up to the end of the file
            }
            pos // SEEK_DATA unsupported (block device): read everything
        } else {
            data as u64
        };
        if data >= end_byte {
            break;
        }
        let block = data / bs;
        let start = block * bs;
        let len = bs.min(d.geometry.disk_size - start) as usize;
        file.read_exact_at(&mut buf[..len], start)
            .map_err(|source| Rejection::ReadReplica {
                disk: d.name.clone(),
                offset: start,
                source,
            })?;
        if !is_zero(&buf[..len]) {
            d.diff
                .as_mut()
                .expect("seeded disks have a diff bitmap")
                .set(block)
                .map_err(TargetError::DiffBitmap)?;
        }
        pos = start + bs;
    }
    Ok(())
}

fn send_diff<W: std::io::Write>(
    disks: &[SessionDisk],
    writer: &mut FrameWriter<W>,
) -> Result<(), TargetError> {
    let mut batch: Vec<DiskRun> = Vec::with_capacity(MAX_DIFF_RUNS_PER_FRAME);
    for (i, d) in disks.iter().enumerate() {
        let Some(diff) = &d.diff else { continue };
        for (start, count) in diff.iter_runs() {
            batch.push(DiskRun {
                disk: (i as u32).into(),
                reserved: 0.into(),
                start: start.into(),
                count: count.into(),
            });
            if batch.len() == MAX_DIFF_RUNS_PER_FRAME {
                writer.send(FrameKind::DiffRuns, &[batch.as_bytes()])?;
                batch.clear();
            }
        }
    }
    if !batch.is_empty() {
        writer.send(FrameKind::DiffRuns, &[batch.as_bytes()])?;
    }
    writer.send(FrameKind::DiffDone, &[])?;
    writer.flush()?;
    Ok(())
}
