//! The transmission phase of one NBD connection.
//!
//! ```text
//!  socket ──► reader ──jobs (bounded)──► I/O engine ──replies (bounded)──► writer ──► socket
//!               └────────── refusals (bad range, bad flags) ──────────────────┘
//! ```
//!
//! The I/O engine is one of two ([`IoEngine`], chosen per disk at start):
//!
//! * **io_uring** ([`super::uring`], the default where the kernel allows it): one
//!   thread owns a ring of up to [`JOB_QUEUE_DEPTH`] requests in flight, a second
//!   waits for bitmap syncs so that the ring never does; the reader wakes the first
//!   through an eventfd when it sleeps.
//! * **thread pool** (here): [`IO_WORKERS`] threads run `execute` with positional
//!   `pread`/`pwrite`. The fallback when io_uring is unavailable, and the reference.
//!
//! Write-intent order in both: enter the write gate, copy-before-write if an epoch is
//! frozen, mark the tracker (returns once the bits are durable), then write the backing
//! store, leave the gate once the write completed, then (FUA) sync, then reply. So a
//! reply the client sees implies a durable bit, and a crash between the mark and the
//! write costs at most a resync of a block that did not change.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, Once};
use std::thread;

use super::gate::WriteGate;
use super::handshake::{self, ExportInfo};
use super::proto::*;
use super::uring;
use super::ProtocolError;
use crate::backing::{Backing, IoEngine};
use crate::pool::{BufferPool, PooledBuf};
use crate::tracker::{Tracker, TrackerError};

/// Worker threads per connection. Page-cache I/O is short, so a few workers keep a
/// QD32 client busy on 2 cores; more only add context switches. A bitmap sync or a
/// FUA write parks one worker while the others continue.
pub const IO_WORKERS: usize = 4;
/// Requests decoded but not yet picked up by a worker. 64 covers QEMU's and fio's
/// usual depths (≤ 32) with room; beyond it the reader stops reading the socket.
pub const JOB_QUEUE_DEPTH: usize = 64;
/// Replies waiting for the writer: every job plus the reader's refusals can be queued
/// without a worker blocking on a slow client first.
pub const REPLY_QUEUE_DEPTH: usize = JOB_QUEUE_DEPTH + IO_WORKERS;
/// Socket read buffer: many small requests per `read` call, and large payloads bypass
/// it (BufReader reads directly into the destination when its buffer is empty).
pub const SOCKET_READ_BUFFER_BYTES: usize = 256 << 10;
/// Socket write buffer: replies are coalesced until the reply queue runs dry.
pub const SOCKET_WRITE_BUFFER_BYTES: usize = 256 << 10;
/// Most extents in one BLOCK_STATUS reply: 32 KiB of descriptors. The spec allows
/// fewer than the range needs; clients ask again from where the reply stopped.
pub const MAX_EXTENTS_PER_REPLY: usize = 4096;

const _: () = assert!(REPLY_QUEUE_DEPTH > JOB_QUEUE_DEPTH);

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One served disk: what every connection to it shares.
#[derive(Debug)]
pub struct Export {
    pub info: ExportInfo,
    pub backing: Backing,
    pub tracker: Tracker,
    /// The write gate and the frozen epoch, if any. Every command that changes the
    /// image is inside it from copy-before-write to the completion of its write; a
    /// freeze drains it, which waits for the writes in flight.
    pub gate: WriteGate,
    /// The engine connections use: [`IoEngine::Uring`] or [`IoEngine::Sync`], resolved
    /// at start (never `Auto`).
    pub engine: IoEngine,
}

impl Export {
    pub fn new(info: ExportInfo, backing: Backing, tracker: Tracker, engine: IoEngine) -> Export {
        Export {
            info,
            backing,
            tracker,
            gate: WriteGate::new(),
            engine,
        }
    }
}

pub(crate) struct Job {
    pub(crate) cookie: u64,
    pub(crate) command: Command,
    pub(crate) payload: Option<PooledBuf>,
}

pub(crate) enum Reply {
    Done {
        cookie: u64,
        result: Result<(), Refusal>,
    },
    Read {
        cookie: u64,
        offset: u64,
        data: PooledBuf,
    },
    BlockStatus {
        cookie: u64,
        payload: PooledBuf,
    },
}

/// The io_uring engine for one connection, when the export uses it and a ring can be
/// set up now; `None` means the thread pool. A ring that cannot be set up (memory
/// locked for rings exhausted, say) costs this connection the faster engine, not its
/// service: it is logged once per process.
fn uring_for(export: &Export) -> Option<(uring::Ring, Arc<uring::Wake>)> {
    if export.engine != IoEngine::Uring {
        return None;
    }
    static WARNED: Once = Once::new();
    let made = uring::Wake::new().and_then(|wake| {
        let wake = Arc::new(wake);
        uring::Ring::new(&export.backing, &wake).map(|ring| (ring, wake))
    });
    match made {
        Ok(m) => Some(m),
        Err(e) => {
            WARNED.call_once(|| {
                tracing::warn!(disk = %export.info.name, error = %e, "cannot set up an io_uring for an NBD connection: it uses the thread pool (logged once)");
            });
            None
        }
    }
}

/// Serves one client from handshake to disconnect. To end it gracefully from outside,
/// shut down the read side of a clone of `stream`: the reader sees end-of-stream,
/// outstanding requests complete and their replies are sent.
pub fn serve_connection(mut stream: Stream, export: Arc<Export>) -> Result<(), ProtocolError> {
    let Some(negotiated) = handshake::negotiate(&mut stream, &export.info)? else {
        return Ok(());
    };
    let session = Session {
        export_size: export.info.size_bytes,
        structured: negotiated.structured,
        base_allocation: negotiated.base_allocation,
    };
    let pool = BufferPool::new(JOB_QUEUE_DEPTH, PREFERRED_BLOCK_BYTES as usize);
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(JOB_QUEUE_DEPTH);
    let (reply_tx, reply_rx) = mpsc::sync_channel::<Reply>(REPLY_QUEUE_DEPTH);

    let writer_stream = stream.try_clone()?;
    let writer = thread::Builder::new()
        .name(format!("nbd-w-{}", export.info.name))
        .spawn(move || write_replies(writer_stream, reply_rx, session.structured))?;
    let mut workers = Vec::with_capacity(IO_WORKERS);
    let mut wake = None;
    if let Some((ring, w)) = uring_for(&export) {
        let reply_tx = reply_tx.clone();
        let export = Arc::clone(&export);
        let control = stream.try_clone()?;
        wake = Some(Arc::clone(&w));
        workers.push(
            thread::Builder::new()
                .name(format!("nbd-uring-{}", export.info.name))
                .spawn(move || {
                    if let Err(e) = uring::run(ring, &export, job_rx, reply_tx, &w) {
                        tracing::error!(disk = %export.info.name, error = %e, "io_uring engine failed: closing the connection");
                        let _ = control.shutdown(Shutdown::Both);
                    }
                })?,
        );
    } else {
        let job_rx = Arc::new(Mutex::new(job_rx));
        for i in 0..IO_WORKERS {
            let job_rx = Arc::clone(&job_rx);
            let reply_tx = reply_tx.clone();
            let export = Arc::clone(&export);
            workers.push(
                thread::Builder::new()
                    .name(format!("nbd-io{i}-{}", export.info.name))
                    .spawn(move || run_worker(&export, &job_rx, &reply_tx))?,
            );
        }
    }

    let control = stream.try_clone()?;
    let result = read_requests(stream, &session, &pool, &job_tx, &reply_tx, wake.as_deref());
    if matches!(result, Err(ProtocolError::BadRequest(_))) {
        // Out of step with the client: hard disconnect, nothing more is sent.
        let _ = control.shutdown(Shutdown::Both);
    }
    // Let the engine finish what was accepted (a DISC waits for outstanding
    // requests), then the writer drains their replies and exits.
    drop(job_tx);
    if let Some(w) = &wake {
        // The io_uring thread may be asleep in its ring: it notices the end only when
        // woken.
        w.ring();
    }
    drop(reply_tx);
    for w in workers {
        let _ = w.join();
    }
    let written = writer.join();
    let _ = control.shutdown(Shutdown::Both);
    result?;
    match written {
        Ok(r) => r.map_err(ProtocolError::Io),
        Err(_) => Err(ProtocolError::Io(io::Error::other("reply writer panicked"))),
    }
}

fn read_requests(
    stream: Stream,
    session: &Session,
    pool: &Arc<BufferPool>,
    job_tx: &SyncSender<Job>,
    reply_tx: &SyncSender<Reply>,
    wake: Option<&uring::Wake>,
) -> Result<(), ProtocolError> {
    let mut reader = BufReader::with_capacity(SOCKET_READ_BUFFER_BYTES, stream);
    let mut header = [0u8; REQUEST_HEADER_BYTES];
    loop {
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            // Hung up between requests (or we shut the socket to stop): a clean end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let Decoded::Request {
            cookie,
            payload_bytes,
            command,
        } = decode_request(&header, session)?
        else {
            unreachable!("a whole header was read");
        };
        let sent = match command {
            Err(refusal) => {
                // The payload of a refused write is read and dropped, through a small
                // stack buffer, so the stream stays in step and nothing is written.
                let drained = io::copy(
                    &mut (&mut reader).take(u64::from(payload_bytes)),
                    &mut io::sink(),
                )?;
                if drained != u64::from(payload_bytes) {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
                reply_tx
                    .send(Reply::Done {
                        cookie,
                        result: Err(refusal),
                    })
                    .is_ok()
            }
            Ok(Command::Disconnect) => return Ok(()),
            Ok(command @ Command::Write { length, .. }) => {
                let mut payload = pool.get(length as usize);
                reader.read_exact(&mut payload)?;
                job_tx
                    .send(Job {
                        cookie,
                        command,
                        payload: Some(payload),
                    })
                    .is_ok()
            }
            Ok(command) => {
                // Buffers for replies are reserved here too, so only this thread ever
                // waits for the in-flight budget; a worker waiting for it while
                // holding queued writes back could deadlock the connection.
                let payload = match command {
                    Command::Read { length, .. } => Some(pool.get(length as usize)),
                    Command::BlockStatus { one_extent, .. } => {
                        Some(pool.get(block_status_bytes(one_extent)))
                    }
                    _ => None,
                };
                job_tx
                    .send(Job {
                        cookie,
                        command,
                        payload,
                    })
                    .is_ok()
            }
        };
        if !sent {
            // The writer or the workers are gone (socket error); stop reading.
            return Ok(());
        }
        if let Some(w) = wake {
            w.notify();
        }
    }
}

fn run_worker(export: &Export, jobs: &Mutex<Receiver<Job>>, replies: &SyncSender<Reply>) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        let reply = execute(export, job);
        if replies.send(reply).is_err() {
            return;
        }
    }
}

pub(crate) fn io_refusal(
    export: &Export,
    op: &'static str,
    offset: u64,
    err: &io::Error,
) -> Refusal {
    tracing::warn!(disk = %export.info.name, op, offset, error = %err, "backing store I/O failed");
    Refusal {
        errno: NbdErrno::from_io(err),
        reason: "I/O error on the backing store",
    }
}

pub(crate) fn tracker_refusal(export: &Export, err: &TrackerError) -> Refusal {
    tracing::error!(disk = %export.info.name, error = %err, source = ?std::error::Error::source(err), "change tracking failed; write refused");
    match err {
        TrackerError::OutOfRange { .. } => Refusal {
            errno: NbdErrno::Inval,
            reason: "range outside the export",
        },
        _ => Refusal {
            errno: NbdErrno::Io,
            reason: "change tracking failed; write not performed",
        },
    }
}

fn block_status_bytes(one_extent: bool) -> usize {
    let extents = if one_extent { 1 } else { MAX_EXTENTS_PER_REPLY };
    4 + 8 * extents
}

pub(crate) fn execute(export: &Export, job: Job) -> Reply {
    let cookie = job.cookie;
    let backing = &export.backing;
    let done = |result| Reply::Done { cookie, result };
    let sync_if = |fua: Durability, op, offset| -> Result<(), Refusal> {
        if fua == Durability::ForceUnitAccess {
            backing
                .sync_data()
                .map_err(|e| io_refusal(export, op, offset, &e))?;
        }
        Ok(())
    };
    match job.command {
        Command::Read { offset, length } => {
            let Some(mut data) = job.payload else {
                unreachable!("the reader reserves a buffer for every read")
            };
            debug_assert_eq!(data.len(), length as usize);
            match backing.read_at(&mut data, offset) {
                Ok(()) => Reply::Read {
                    cookie,
                    offset,
                    data,
                },
                Err(e) => done(Err(io_refusal(export, "read", offset, &e))),
            }
        }
        Command::Write {
            offset,
            length,
            durability,
        } => done((|| {
            {
                let gate = export.gate.enter();
                if let Some(frozen) = gate.frozen() {
                    frozen.preserve(backing, offset, u64::from(length));
                }
                export
                    .tracker
                    .mark(offset, u64::from(length))
                    .map_err(|e| tracker_refusal(export, &e))?;
                let payload = job.payload.as_deref().unwrap_or(&[]);
                backing
                    .write_at(payload, offset)
                    .map_err(|e| io_refusal(export, "write", offset, &e))?;
            }
            sync_if(durability, "write", offset)
        })()),
        Command::Flush => done(
            backing
                .sync_data()
                .map_err(|e| io_refusal(export, "flush", 0, &e)),
        ),
        Command::Trim {
            offset,
            length,
            durability,
        } => done((|| {
            {
                let gate = export.gate.enter();
                // TRIM is advisory: while an epoch is frozen it is dropped, so no
                // range turns into a hole under the engine (and nothing changes).
                if gate.frozen().is_none() {
                    export
                        .tracker
                        .mark(offset, u64::from(length))
                        .map_err(|e| tracker_refusal(export, &e))?;
                    backing
                        .trim(offset, u64::from(length))
                        .map_err(|e| io_refusal(export, "trim", offset, &e))?;
                }
            }
            sync_if(durability, "trim", offset)
        })()),
        Command::WriteZeroes {
            offset,
            length,
            mode,
            durability,
        } => done((|| {
            {
                let gate = export.gate.enter();
                if let Some(frozen) = gate.frozen() {
                    frozen.preserve(backing, offset, u64::from(length));
                }
                export
                    .tracker
                    .mark(offset, u64::from(length))
                    .map_err(|e| tracker_refusal(export, &e))?;
                match gate.frozen() {
                    // Frozen: zeros are written, never punched (see `epoch`).
                    Some(_) => backing.write_zero_bytes(offset, u64::from(length)),
                    None => backing.write_zeroes(offset, u64::from(length), mode),
                }
                .map_err(|e| io_refusal(export, "write zeroes", offset, &e))?;
            }
            sync_if(durability, "write zeroes", offset)
        })()),
        Command::Cache | Command::Disconnect => done(Ok(())),
        Command::BlockStatus { offset, length, .. } => {
            block_status(backing, cookie, offset, length, job.payload)
        }
    }
}

/// Answers a BLOCK_STATUS request into the buffer the reader reserved. Synchronous in
/// both engines: a few `lseek`s.
pub(crate) fn block_status(
    backing: &Backing,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: Option<PooledBuf>,
) -> Reply {
    let Some(mut payload) = payload else {
        unreachable!("the reader reserves a buffer for every block status")
    };
    let max = (payload.len() - 4) / 8;
    payload[0..4].copy_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    let mut at = 4;
    backing.extents(offset, length, max, |len, flags| {
        payload[at..at + 4].copy_from_slice(&len.to_be_bytes());
        payload[at + 4..at + 8].copy_from_slice(&flags.to_be_bytes());
        at += 8;
    });
    payload.truncate(at);
    Reply::BlockStatus { cookie, payload }
}

fn write_reply<W: Write>(w: &mut W, reply: Reply, structured: bool) -> io::Result<()> {
    match reply {
        Reply::Done {
            cookie,
            result: Ok(()),
        } => w.write_all(&simple_reply(0, cookie)),
        Reply::Done {
            cookie,
            result: Err(refusal),
        } => {
            if structured {
                let msg = refusal.reason.as_bytes();
                let header = chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    cookie,
                    (6 + msg.len()) as u32,
                );
                w.write_all(&header)?;
                w.write_all(&(refusal.errno as u32).to_be_bytes())?;
                w.write_all(&(msg.len() as u16).to_be_bytes())?;
                w.write_all(msg)
            } else {
                w.write_all(&simple_reply(refusal.errno as u32, cookie))
            }
        }
        Reply::Read {
            cookie,
            offset,
            data,
        } => {
            if !structured {
                w.write_all(&simple_reply(0, cookie))?;
                w.write_all(&data)
            } else if data.is_empty() {
                w.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))
            } else {
                let header = chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    (8 + data.len()) as u32,
                );
                w.write_all(&header)?;
                w.write_all(&offset.to_be_bytes())?;
                w.write_all(&data)
            }
        }
        Reply::BlockStatus { cookie, payload } => {
            let header = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                payload.len() as u32,
            );
            w.write_all(&header)?;
            w.write_all(&payload)
        }
    }
}

fn write_replies(stream: Stream, replies: Receiver<Reply>, structured: bool) -> io::Result<()> {
    let control = stream.try_clone();
    let mut w = BufWriter::with_capacity(SOCKET_WRITE_BUFFER_BYTES, stream);
    let result = (|| loop {
        let reply = match replies.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => {
                w.flush()?;
                match replies.recv() {
                    Ok(r) => r,
                    Err(_) => return Ok(()),
                }
            }
            Err(TryRecvError::Disconnected) => return w.flush(),
        };
        write_reply(&mut w, reply, structured)?;
    })();
    if result.is_err() {
        // The client is gone: stop the reader, and keep receiving so that workers
        // never block on a full reply queue.
        if let Ok(c) = control {
            let _ = c.shutdown(Shutdown::Both);
        }
        for _ in replies.iter() {}
    }
    result
}
