//! The transmission phase of one NBD connection.
//!
//! ```text
//!  socket ──► reader ──jobs (bounded)──► I/O engine ──replies (bounded)──► writer ──► socket
//!               └────────── refusals (bad range, bad flags) ──────────────────┘
//! ```
//!
//! The reader decodes requests and hands each valid one to the connection's I/O
//! engine ([`super::engine`]: the io_uring engine where the export uses it and a ring
//! can be set up, else the thread pool); the writer serialises the replies. Queues
//! between them are bounded, and so are the payload bytes in flight, so a fast client
//! meets back-pressure on its socket, never unbounded buffering in the shim.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread;

use super::engine::pool::{PoolEngine, IO_WORKERS};
use super::engine::uring::{StartError, UringEngine};
use super::engine::{block_status_bytes, Engine, Job, Reply, JOB_QUEUE_DEPTH};
use super::export::Export;
use super::handshake;
use super::proto::*;
use super::ProtocolError;
use crate::backing::IoEngine;
use crate::pool::BufferPool;

/// Replies waiting for the writer: every job plus the reader's refusals can be queued
/// without a worker blocking on a slow client first.
pub const REPLY_QUEUE_DEPTH: usize = JOB_QUEUE_DEPTH + IO_WORKERS;
/// Socket read buffer: many small requests per `read` call, and large payloads bypass
/// it (BufReader reads directly into the destination when its buffer is empty).
pub const SOCKET_READ_BUFFER_BYTES: usize = 256 << 10;
/// Socket write buffer: replies are coalesced until the reply queue runs dry.
pub const SOCKET_WRITE_BUFFER_BYTES: usize = 256 << 10;

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
    let (reply_tx, reply_rx) = mpsc::sync_channel::<Reply>(REPLY_QUEUE_DEPTH);

    let writer_stream = stream.try_clone()?;
    let writer = thread::Builder::new()
        .name(format!("nbd-w-{}", export.info.name))
        .spawn(move || write_replies(writer_stream, reply_rx, session.structured))?;
    let control = stream.try_clone()?;
    let result = match start_uring(&export, &stream, &reply_tx)? {
        Some(engine) => transmit(stream, &control, &session, &pool, engine, reply_tx),
        None => {
            let engine = PoolEngine::start(&export, &reply_tx)?;
            transmit(stream, &control, &session, &pool, engine, reply_tx)
        }
    };
    let written = writer.join();
    let _ = control.shutdown(Shutdown::Both);
    result?;
    match written {
        Ok(r) => r.map_err(ProtocolError::Io),
        Err(_) => Err(ProtocolError::Io(io::Error::other("reply writer panicked"))),
    }
}

/// The io_uring engine for one connection, when the export uses it and a ring can be
/// set up now; `None` means the thread pool. A ring that cannot be set up (memory
/// locked for rings exhausted, say) costs this connection the faster engine, not its
/// service: it is logged once per process.
fn start_uring(
    export: &Arc<Export>,
    stream: &Stream,
    replies: &SyncSender<Reply>,
) -> io::Result<Option<UringEngine>> {
    if export.engine != IoEngine::Uring {
        return Ok(None);
    }
    static WARNED: Once = Once::new();
    let control = stream.try_clone()?;
    let close = move || {
        let _ = control.shutdown(Shutdown::Both);
    };
    match UringEngine::start(export, replies.clone(), close) {
        Ok(engine) => Ok(Some(engine)),
        Err(StartError::Ring(e)) => {
            WARNED.call_once(|| {
                tracing::warn!(disk = %export.info.name, error = %e, "cannot set up an io_uring for an NBD connection: it uses the thread pool (logged once)");
            });
            Ok(None)
        }
        Err(StartError::Spawn(e)) => Err(e),
    }
}

/// Reads requests into `engine` until the client is done (or out of step, or gone),
/// then lets the engine answer what it accepted. `replies` is the reader's own sender,
/// for refusals.
fn transmit(
    stream: Stream,
    control: &Stream,
    session: &Session,
    pool: &Arc<BufferPool>,
    engine: impl Engine,
    replies: SyncSender<Reply>,
) -> Result<(), ProtocolError> {
    let result = read_requests(stream, session, pool, &engine, &replies);
    if matches!(result, Err(ProtocolError::BadRequest(_))) {
        // Out of step with the client: hard disconnect, nothing more is sent.
        let _ = control.shutdown(Shutdown::Both);
    }
    // Let the engine finish what was accepted (a DISC waits for outstanding
    // requests), then the writer drains their replies and exits.
    drop(replies);
    engine.finish();
    result
}

/// The reader's loop: one request at a time, each refused (with its payload drained)
/// or handed to `engine` as a job, until a DISC, a clean hang-up, or a writer or engine
/// that is gone.
fn read_requests(
    stream: Stream,
    session: &Session,
    pool: &Arc<BufferPool>,
    engine: &impl Engine,
    reply_tx: &SyncSender<Reply>,
) -> Result<(), ProtocolError> {
    let mut reader = BufReader::with_capacity(SOCKET_READ_BUFFER_BYTES, stream);
    let mut header = [0u8; REQUEST_HEADER_BYTES];
    loop {
        if !read_header(&mut reader, &mut header)? {
            return Ok(());
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
            Err(refusal) => refuse(&mut reader, reply_tx, cookie, payload_bytes, refusal)?,
            Ok(Command::Disconnect) => return Ok(()),
            Ok(command) => {
                let job = job(&mut reader, pool, cookie, command)?;
                engine.submit(job).is_ok()
            }
        };
        if !sent {
            // The writer or the engine is gone (socket error); stop reading.
            return Ok(());
        }
    }
}

/// One whole request header into `header`: `Ok(false)` when the client hung up between
/// requests (or we shut the socket to stop), a clean end.
fn read_header(reader: &mut impl Read, header: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(header) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// A refused request: its payload (a refused write's) is read and dropped, through a
/// small stack buffer, so the stream stays in step and nothing is written; then the
/// refusal goes to the writer. Returns whether the writer took it.
fn refuse(
    reader: &mut impl Read,
    reply_tx: &SyncSender<Reply>,
    cookie: u64,
    payload_bytes: u32,
    refusal: Refusal,
) -> Result<bool, ProtocolError> {
    let drained = io::copy(&mut reader.take(u64::from(payload_bytes)), &mut io::sink())?;
    if drained != u64::from(payload_bytes) {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(reply_tx
        .send(Reply::Done {
            cookie,
            result: Err(refusal),
        })
        .is_ok())
}

/// The job for an accepted command: a write with its payload read from the stream, a
/// read or block status with the buffer for its reply.
///
/// Buffers for replies are reserved here too, so only the reader ever waits for the
/// in-flight budget; a worker waiting for it while holding queued writes back could
/// deadlock the connection.
fn job(
    reader: &mut impl Read,
    pool: &Arc<BufferPool>,
    cookie: u64,
    command: Command,
) -> io::Result<Job> {
    let payload = match command {
        Command::Write { length, .. } => {
            let mut payload = pool.get(length as usize);
            reader.read_exact(&mut payload)?;
            Some(payload)
        }
        Command::Read { length, .. } => Some(pool.get(length as usize)),
        Command::BlockStatus { one_extent, .. } => Some(pool.get(block_status_bytes(one_extent))),
        _ => None,
    };
    Ok(Job {
        cookie,
        command,
        payload,
    })
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
