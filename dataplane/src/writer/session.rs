//! One source connection: handshake, open, then frames until commit or close.

use std::io::BufReader;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use ferry_ringbuf::pool::BufferPool;
use ferry_ringbuf::spsc;
use filter_driver_shim_contract::bitmap::{ChangedBlockBitmap, GenerationId};
use zerocopy::{FromBytes, IntoBytes};

use super::apply::{applier_loop, ApplyDisks, ApplyMsg};
use super::received::Received;
use super::state::ReplicaRecord;
use super::undo::{CommitFailure, Recovery, UndoDisk, UndoLog};
use super::verify::{self, Geometry};
use super::{Shared, TargetError};
use crate::io::{Disk, ReplicaState};
use crate::protocol::{
    auth, block_hash, is_zero, Commit, Committed, DiskManifest, DiskRun, ErrorCode, FrameDeadline,
    FrameKind, FrameReader, FrameWriter, HashesHeader, OpenDisk, OpenDiskReply, OpenHeader,
    SyncMode, TimedStream, MAX_DIFF_RUNS_PER_FRAME, MAX_DISKS_PER_SESSION, MAX_FRAME_PAYLOAD,
    MAX_NAME_LEN, REPLICA_CREATED, REPLICA_EXISTING, ZERO_BLOCK_HASH,
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
    generation: [u8; 16],
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
    auth::server_handshake(&mut reader, &mut writer, &job.psk).map_err(TargetError::Handshake)?;
    read_deadline.cap(None);
    write_deadline.cap(None);
    drop(pending);

    let active = shared.sessions.fetch_add(1, Ordering::AcqRel);
    let _slot = Counted(&shared.sessions);
    let result = if active >= job.max_sessions {
        Err(TargetError::reject(
            ErrorCode::Busy,
            format!("target is at its limit of {} sessions", job.max_sessions),
        ))
    } else {
        serve(shared, &mut reader, &mut writer)
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

fn serve<R: std::io::Read, W: std::io::Write>(
    shared: &Shared,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<String, TargetError> {
    let job = &shared.job;
    let mut control = vec![0u8; 64 << 10];
    let payload = reader.expect(FrameKind::Open, &mut control)?;
    let announced = OpenHeader::ref_from_prefix(payload)
        .map(|(h, _)| h.max_batch_bytes.get() as usize)
        .unwrap_or(0);
    let (epoch, mut disks, guard) = open(shared, payload)?;
    // Held until the epoch is committed or rolled back; released before the source
    // hears "Committed", so its next sync never finds the disks still claimed.
    let busy = guard;
    let replies: Vec<OpenDiskReply> = disks
        .iter()
        .map(|(_, created, record)| OpenDiskReply {
            state: if *created {
                REPLICA_CREATED
            } else {
                REPLICA_EXISTING
            },
            reserved: [0; 7],
            generation: record
                .as_ref()
                .and_then(|r| crate::protocol::parse_hex16(&r.generation).ok())
                .unwrap_or([0; 16]),
            epoch: record.as_ref().map_or(0, |r| r.epoch).into(),
        })
        .collect();
    writer.send(FrameKind::OpenOk, &[replies.as_bytes()])?;
    // The replica handles are shared with the applier (which writes) and the hash
    // compare (which reads through the buffered handles); the rest is session state.
    // Replicas that hold an acknowledged epoch get their overwritten bytes logged, so the
    // epoch applies atomically; a replica without one has no epoch to protect.
    let prev_epochs: Vec<Option<u64>> = disks
        .iter()
        .map(|(_, _, record)| record.as_ref().map(|r| r.epoch))
        .collect();
    let logged: Vec<bool> = disks
        .iter()
        .map(|(_, created, record)| !created && record.is_some())
        .collect();
    let mut disk_handles = Vec::with_capacity(disks.len());
    let mut buffered = Vec::with_capacity(disks.len());
    let mut meta = Vec::with_capacity(disks.len());
    for (d, _, _) in disks.drain(..) {
        disk_handles.push(d.0);
        buffered.push(d.1);
        meta.push(d.2);
    }
    let mut disks: Vec<SessionDisk> = meta;

    // Buffers sized to what the source announced: with the default 256 KiB batches a
    // session holds ~5 MiB instead of ~66 MiB, and sets up (and pins for io_uring)
    // correspondingly faster. A frame larger than announced is refused as oversized.
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
        return Err(TargetError::reject(
            ErrorCode::Protocol,
            format!("announced batch of {max_logical} bytes is not a multiple of 4096 of at least one block ({min_block})"),
        ));
    }
    let slot_size = verify::frame_bound(max_logical, min_block).min(MAX_FRAME_PAYLOAD);
    let (mut recv_alloc, recv_return) =
        BufferPool::new(slot_size, RECV_SLOTS).map_err(TargetError::Pool)?;
    let (mut scratch_alloc, scratch_return) =
        BufferPool::new(slot_size, SCRATCH_SLOTS).map_err(TargetError::Pool)?;
    let mut iovecs = crate::buffers::IovecTable::with_first_pool(recv_alloc.region());
    let scratch_base = iovecs.push_pool(scratch_alloc.region());
    let (mut tx, rx) = spsc::channel::<ApplyMsg>(APPLY_RING_DEPTH);
    let failed = AtomicBool::new(false);
    let names: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
    let geometries: Vec<Geometry> = disks.iter().map(|d| d.geometry).collect();
    let mut decompressor = zstd::bulk::Decompressor::new().map_err(TargetError::Zstd)?;
    let mut received = Received::new(disks.len());

    let undo_disks = disks
        .iter()
        .zip(&logged)
        .zip(&prev_epochs)
        .map(|((d, &logged), &prev_epoch)| UndoDisk {
            name: d.name.clone(),
            generation: d.generation,
            disk_size: d.geometry.disk_size,
            logged,
            prev_epoch,
        })
        .collect();
    let apply_lock = super::apply_lock(&job.state_dir, false)?;
    let mut undo = UndoLog::create(&job.state_dir, epoch, undo_disks)?;
    let undo_ref = &mut undo;
    let outcome = std::thread::scope(|scope| -> Result<u64, TargetError> {
        let failed_ref = &failed;
        let apply_disks = ApplyDisks {
            disks: &disk_handles,
            buffered: &buffered,
            names: &names,
        };
        let iovecs_ref = &iovecs;
        let applier = std::thread::Builder::new()
            .name("ferry-applier".into())
            .spawn_scoped(scope, move || {
                applier_loop(
                    job.engine,
                    job.queue_depth,
                    apply_disks,
                    iovecs_ref,
                    RECV_SLOTS,
                    scratch_base,
                    rx,
                    recv_return,
                    scratch_return,
                    failed_ref,
                    undo_ref,
                )
            })
            .map_err(TargetError::ApplierThread)?;

        let result = (|| -> Result<u64, TargetError> {
            loop {
                if failed.load(Ordering::Acquire) {
                    // The applier failed; the barrier below reports why.
                    let (reply, answer) = mpsc::sync_channel(1);
                    let _ = tx.push_wait(ApplyMsg::Barrier { reply });
                    return Err(match answer.recv() {
                        Ok(Err(why)) => TargetError::Apply(why),
                        _ => TargetError::ApplierGone,
                    });
                }
                let Some(incoming) = reader.next_header()? else {
                    return Err(TargetError::reject(
                        ErrorCode::Protocol,
                        "source closed the connection before committing",
                    ));
                };
                match incoming.kind {
                    FrameKind::Data => {
                        let mut recv = recv_alloc.alloc_wait().ok_or(TargetError::ApplierGone)?;
                        let payload_len = incoming.payload_len;
                        reader.read_payload(&incoming, recv.as_mut_slice())?;
                        let payload = &recv.as_slice()[..payload_len];
                        let mut scratch = if verify::needs_scratch(payload)? {
                            Some(scratch_alloc.alloc_wait().ok_or(TargetError::ApplierGone)?)
                        } else {
                            None
                        };
                        let (disk, _) = verify::verify_data_within(
                            payload,
                            &geometries,
                            &names,
                            scratch.as_mut().map(|s| s.as_mut_slice()),
                            &mut decompressor,
                            max_logical,
                        )?;
                        let (_, records) = verify::records(payload)?;
                        received.data(disk, &names[disk as usize], records)?;
                        tx.push_wait(ApplyMsg::Data {
                            disk,
                            recv,
                            scratch,
                        })
                        .map_err(|_| TargetError::ApplierGone)?;
                    }
                    FrameKind::Zero => {
                        let payload = reader.read_payload(&incoming, &mut control)?;
                        let run = DiskRun::read_from_bytes(payload).map_err(|_| {
                            TargetError::reject(
                                ErrorCode::Protocol,
                                "zero frame has the wrong length",
                            )
                        })?;
                        let disk = run.disk.get();
                        let g = geometries.get(disk as usize).ok_or_else(|| {
                            TargetError::reject(
                                ErrorCode::UnknownDisk,
                                format!(
                                    "zero frame names disk #{disk}, the session opened {}",
                                    geometries.len()
                                ),
                            )
                        })?;
                        let (offset, len) = (run.start.get(), run.count.get());
                        if offset % g.block_size != 0
                            || offset.checked_add(len).is_none_or(|end| end > g.disk_size)
                        {
                            return Err(TargetError::reject(
                                ErrorCode::OutOfRange,
                                format!(
                                    "disk {}: zero range at {offset} of {len} bytes is outside the disk ({} bytes) or unaligned",
                                    names[disk as usize], g.disk_size
                                ),
                            ));
                        }
                        received.zero(disk, &names[disk as usize], offset, len)?;
                        tx.push_wait(ApplyMsg::Zero { disk, offset, len })
                            .map_err(|_| TargetError::ApplierGone)?;
                    }
                    FrameKind::Hashes => {
                        let payload = reader.read_payload(&incoming, control_big(&mut control))?;
                        compare_hashes(&mut disks, &buffered, payload)?;
                    }
                    FrameKind::HashZeroRun => {
                        let payload = reader.read_payload(&incoming, &mut control)?;
                        let run = DiskRun::read_from_bytes(payload).map_err(|_| {
                            TargetError::reject(
                                ErrorCode::Protocol,
                                "hash zero run frame has the wrong length",
                            )
                        })?;
                        compare_zero_run(&mut disks, &buffered, &run)?;
                    }
                    FrameKind::HashesDone => {
                        reader.read_payload(&incoming, &mut control)?;
                        send_diff(&disks, writer)?;
                    }
                    FrameKind::Commit => {
                        let payload = reader.read_payload(&incoming, &mut control)?;
                        let (commit, sent) = Commit::ref_from_prefix(payload)
                            .ok()
                            .and_then(|(c, rest)| {
                                let sent = <[DiskManifest]>::ref_from_bytes(rest).ok()?;
                                (sent.len() == c.disk_count.get() as usize).then_some((c, sent))
                            })
                            .ok_or_else(|| {
                                TargetError::reject(
                                    ErrorCode::Protocol,
                                    "commit frame has the wrong length for its disk count",
                                )
                            })?;
                        if commit.epoch.get() != epoch {
                            return Err(TargetError::reject(
                                ErrorCode::Protocol,
                                format!(
                                    "commit of epoch {} in a session opened for epoch {epoch}",
                                    commit.epoch.get()
                                ),
                            ));
                        }
                        // Everything received was verified and handed to the applier in
                        // order; before anything may call the epoch committed, it must
                        // be exactly what the source sent.
                        received.check_commit(&names, sent)?;
                        let (reply, answer) = mpsc::sync_channel(1);
                        tx.push_wait(ApplyMsg::Barrier { reply })
                            .map_err(|_| TargetError::ApplierGone)?;
                        let applied = answer
                            .recv()
                            .map_err(|_| TargetError::ApplierGone)?
                            .map_err(TargetError::Apply)?;
                        return Ok(applied);
                    }
                    other => {
                        return Err(TargetError::reject(
                            ErrorCode::Protocol,
                            format!("unexpected {other:?} frame during replication"),
                        ))
                    }
                }
            }
        })();
        drop(tx);
        if applier.join().is_err() {
            return Err(TargetError::ApplierPanicked);
        }
        result
    });
    let replicas = job.replicas();
    let (undo, error) = match outcome {
        // The replicas are durable; the commit mark is the commit point of the epoch.
        Ok(applied) => match undo.commit(&job.retention).map_err(|f| *f) {
            Ok(()) => {
                drop(apply_lock);
                drop(busy);
                return acknowledge(writer, epoch, applied, &names);
            }
            Err(CommitFailure::NotCommitted { log, error }) => (log, error),
            Err(CommitFailure::Undecided { log, disks, error }) => {
                tracing::error!(
                    "epoch {epoch}: {}; whether it committed is settled by the next session for disk(s) {} (they stay out of service until then)",
                    crate::chain(&error),
                    disks.join(", ")
                );
                quarantine(shared, busy, log, disks);
                return Err(error);
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
                return acknowledge(writer, epoch, applied, &names);
            }
        },
        Err(e) => (undo, e),
    };
    // Put every replica of the session back at its previous epoch before the disks are
    // released to another session.
    let (log, log_disks) = (undo.path().to_path_buf(), undo.disk_names());
    match undo.roll_back(&replicas) {
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
    Err(error)
}

/// Tells the source its epoch is durable.
fn acknowledge<W: std::io::Write>(
    writer: &mut FrameWriter<W>,
    epoch: u64,
    applied: u64,
    names: &[String],
) -> Result<String, TargetError> {
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

type Opened = (
    (Disk, std::fs::File, SessionDisk),
    bool,
    Option<ReplicaRecord>,
);

fn open<'s>(
    shared: &'s Shared,
    payload: &[u8],
) -> Result<(u64, Vec<Opened>, BusyGuard<'s>), TargetError> {
    let job = &shared.job;
    let proto = |m: String| TargetError::reject(ErrorCode::Protocol, m);
    let (header, rest) = OpenHeader::ref_from_prefix(payload)
        .map_err(|_| proto("open frame shorter than its header".into()))?;
    let count = header.disk_count.get() as usize;
    if count == 0 || count > MAX_DISKS_PER_SESSION {
        return Err(proto(format!(
            "open names {count} disks; 1..={MAX_DISKS_PER_SESSION} allowed"
        )));
    }
    let entries = <[OpenDisk]>::ref_from_bytes(rest)
        .ok()
        .filter(|e| e.len() == count)
        .ok_or_else(|| proto("open frame length does not match its disk count".into()))?;
    let epoch = header.epoch.get();

    // Claim the disks first so two sources never write one replica.
    let mut names = Vec::with_capacity(count);
    for e in entries {
        let len = e.name_len as usize;
        let name = (len <= MAX_NAME_LEN)
            .then(|| std::str::from_utf8(&e.name[..len]).ok())
            .flatten()
            .ok_or_else(|| proto("disk name is not valid UTF-8 or too long".into()))?;
        if !job.disks.iter().any(|d| d.name == name) {
            return Err(TargetError::reject(
                ErrorCode::UnknownDisk,
                format!(
                    "unknown disk {name:?}: this target is configured for {}",
                    job.disks
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if names.iter().any(|n| n == name) {
            return Err(proto(format!("disk {name:?} opened twice")));
        }
        names.push(name.to_string());
    }
    finish_quarantined(shared, &names)?;
    let guard = {
        let mut busy = shared.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = names.iter().find(|n| busy.contains(*n)) {
            return Err(TargetError::reject(
                ErrorCode::Busy,
                format!("disk {n:?} is being replicated by another session"),
            ));
        }
        busy.extend(names.iter().cloned());
        BusyGuard {
            shared,
            names: names.clone(),
        }
    };

    let mut opened = Vec::with_capacity(count);
    for (e, name) in entries.iter().zip(&names) {
        let block_size = e.block_size.get() as u64;
        if !block_size.is_power_of_two() || !(4096..=(1 << 20)).contains(&block_size) {
            return Err(proto(format!(
                "disk {name}: block size {block_size} is not a power of two in 4096..=1048576"
            )));
        }
        let disk_size = e.disk_size.get();
        if disk_size == 0 {
            return Err(proto(format!("disk {name}: size is zero")));
        }
        let mode = SyncMode::from_u8(e.mode)
            .ok_or_else(|| proto(format!("disk {name}: unknown sync mode {}", e.mode)))?;
        let record = ReplicaRecord::load(&job.state_dir, name)?;
        if let (SyncMode::Changed, Some(why)) =
            (mode, record.as_ref().and_then(|r| r.suspect.as_ref()))
        {
            return Err(TargetError::reject(
                ErrorCode::BaseMismatch,
                format!(
                    "disk {name}: the replica cannot be shown to hold an acknowledged epoch ({why}); a changed-block epoch would build on unknown bytes — run a seeded sync (--mode seeded), which compares checksums and repairs it"
                ),
            ));
        }
        if mode == SyncMode::Changed {
            let ok = record.as_ref().is_some_and(|r| {
                crate::protocol::parse_hex16(&r.generation).ok() == Some(e.generation)
                    // A change set since an older epoch covers every change since the
                    // replica's newer one (a source that died before recording an
                    // acknowledgement resends from its last recorded epoch).
                    && r.epoch >= e.base_epoch.get()
                    && r.disk_size == disk_size
            });
            if !ok {
                let held = record
                    .as_ref()
                    .map_or("no acknowledged epoch".to_string(), |r| {
                        format!("epoch {} of generation {}", r.epoch, r.generation)
                    });
                return Err(TargetError::reject(
                    ErrorCode::BaseMismatch,
                    format!(
                        "disk {name}: the change set is based on epoch {} of generation {}, but the replica holds {held}; run a seeded sync (--mode seeded)",
                        e.base_epoch.get(),
                        crate::protocol::hex16(&e.generation)
                    ),
                ));
            }
        }
        let path = &job
            .disks
            .iter()
            .find(|d| &d.name == name)
            .expect("checked above")
            .path;
        let (disk, state) = Disk::open_replica(path, disk_size).map_err(|source| {
            let code = match source {
                crate::io::IoError::ReplicaTooSmall { .. }
                | crate::io::IoError::ReplicaSizeMismatch { .. } => ErrorCode::ReplicaTooSmall,
                _ => ErrorCode::Io,
            };
            TargetError::reject(code, format!("disk {name}: {}", crate::chain(&source)))
        })?;
        let buffered = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                TargetError::reject(
                    ErrorCode::Io,
                    format!("disk {name}: open {}: {e}", path.display()),
                )
            })?;
        let diff = if mode == SyncMode::Seeded {
            let gen = GenerationId::from_bytes(e.generation);
            Some(
                ChangedBlockBitmap::new(disk_size, block_size as u32, gen, 0)
                    .map_err(|err| proto(format!("disk {name}: {err}")))?,
            )
        } else {
            None
        };
        opened.push((
            (
                disk,
                buffered,
                SessionDisk {
                    name: name.clone(),
                    geometry: Geometry {
                        disk_size,
                        block_size,
                    },
                    mode,
                    generation: e.generation,
                    diff,
                },
            ),
            state == ReplicaState::Created,
            record,
        ));
    }
    Ok((epoch, opened, guard))
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
        match super::undo::recover_one(&job.state_dir, &quarantine[i].0, &replicas) {
            Ok(r) => {
                tracing::warn!("settled an interrupted epoch: {r}");
                let (_, disks) = quarantine.remove(i);
                let mut busy = shared.busy.lock().unwrap_or_else(|p| p.into_inner());
                for d in &disks {
                    busy.remove(d);
                }
            }
            Err(e) => {
                return Err(TargetError::reject(
                    ErrorCode::Io,
                    format!(
                        "disk(s) {}: the replica is between epochs because settling an interrupted epoch failed: {}; the next session retries",
                        quarantine[i].1.join(", "),
                        crate::chain(&e)
                    ),
                ))
            }
        }
    }
    Ok(())
}

fn seeded<'a>(
    disks: &'a mut [SessionDisk],
    disk: u32,
    what: &str,
) -> Result<&'a mut SessionDisk, TargetError> {
    disks
        .get_mut(disk as usize)
        .filter(|d| d.mode == SyncMode::Seeded)
        .ok_or_else(|| {
            TargetError::reject(
                ErrorCode::Protocol,
                format!("{what} for disk #{disk}, which is not being seeded"),
            )
        })
}

fn compare_hashes(
    disks: &mut [SessionDisk],
    files: &[std::fs::File],
    payload: &[u8],
) -> Result<(), TargetError> {
    let (header, hashes) = HashesHeader::ref_from_prefix(payload).map_err(|_| {
        TargetError::reject(ErrorCode::Protocol, "hashes frame shorter than its header")
    })?;
    let file = files.get(header.disk.get() as usize);
    let d = seeded(disks, header.disk.get(), "hashes")?;
    let file = file.expect("seeded() checked the index");
    let bs = d.geometry.block_size;
    let count = header.block_count.get() as u64;
    let first = header.first_block.get();
    let blocks = d.geometry.disk_size.div_ceil(bs);
    if hashes.len() as u64 != count * 16
        || first.checked_add(count).is_none_or(|end| end > blocks)
        || count * bs > verify::MAX_FRAME_LOGICAL as u64
    {
        return Err(TargetError::reject(
            ErrorCode::OutOfRange,
            format!("disk {}: hashes for blocks {first}+{count} do not fit the frame or the disk ({blocks} blocks)", d.name),
        ));
    }
    let start = first * bs;
    let len = ((first + count) * bs).min(d.geometry.disk_size) - start;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start).map_err(|e| {
        TargetError::reject(
            ErrorCode::Io,
            format!("disk {}: read at {start}: {e}", d.name),
        )
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
    let d = seeded(disks, run.disk.get(), "hash zero run")?;
    let file = file.expect("seeded() checked the index");
    let bs = d.geometry.block_size;
    let blocks = d.geometry.disk_size.div_ceil(bs);
    let (first, count) = (run.start.get(), run.count.get());
    if first.checked_add(count).is_none_or(|end| end > blocks) {
        return Err(TargetError::reject(
            ErrorCode::OutOfRange,
            format!(
                "disk {}: zero run {first}+{count} is past the disk's {blocks} blocks",
                d.name
            ),
        ));
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
        file.read_exact_at(&mut buf[..len], start).map_err(|e| {
            TargetError::reject(
                ErrorCode::Io,
                format!("disk {}: read at {start}: {e}", d.name),
            )
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
