//! The thread-pool engine of one NBD connection: [`IO_WORKERS`] threads take jobs from
//! one queue and run each to its reply with positional `pread`/`pwrite` ([`execute`]).
//! The fallback when io_uring is unavailable, and the reference the io_uring engine is
//! tested against. Replies go out in the order the workers finish, not in the order
//! the requests came.

use std::io;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use super::{
    block_status, io_refusal, sealed_refusal, tracker_refusal, Engine, Job, Reply, JOB_QUEUE_DEPTH,
};
use crate::nbd::export::Export;
use crate::nbd::proto::{Command, Durability, Refusal, ZeroMode};
use crate::pool::PooledBuf;

/// Worker threads per connection. Page-cache I/O is short, so a few workers keep a
/// QD32 client busy on 2 cores; more only add context switches. A bitmap sync or a
/// FUA write parks one worker while the others continue.
pub const IO_WORKERS: usize = 4;

/// The workers of one connection and the queue that feeds them.
pub(crate) struct PoolEngine {
    jobs: SyncSender<Job>,
    workers: Vec<JoinHandle<()>>,
}

impl PoolEngine {
    /// Starts [`IO_WORKERS`] workers for a connection to `export`; each sends its
    /// replies to `replies`.
    pub(crate) fn start(
        export: &Arc<Export>,
        replies: &SyncSender<Reply>,
    ) -> io::Result<PoolEngine> {
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(JOB_QUEUE_DEPTH);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::with_capacity(IO_WORKERS);
        for i in 0..IO_WORKERS {
            let job_rx = Arc::clone(&job_rx);
            let reply_tx = replies.clone();
            let export = Arc::clone(export);
            workers.push(
                thread::Builder::new()
                    .name(format!("nbd-io{i}-{}", export.info.name))
                    .spawn(move || run_worker(&export, &job_rx, &reply_tx))?,
            );
        }
        Ok(PoolEngine {
            jobs: job_tx,
            workers,
        })
    }
}

impl Engine for PoolEngine {
    fn submit(&self, job: Job) -> Result<(), Job> {
        self.jobs.send(job).map_err(|refused| refused.0)
    }

    fn finish(self) {
        // The closed queue ends each worker once it is empty.
        drop(self.jobs);
        for w in self.workers {
            let _ = w.join();
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

/// Runs one request to its reply, on the calling thread.
pub(crate) fn execute(export: &Export, job: Job) -> Reply {
    let cookie = job.cookie;
    let done = |result| Reply::Done { cookie, result };
    match job.command {
        Command::Read { offset, length } => read(export, cookie, offset, length, job.payload),
        Command::Write {
            offset,
            length,
            durability,
        } => {
            let payload = job.payload.as_deref().unwrap_or(&[]);
            done(write(export, offset, length, payload, durability))
        }
        Command::Flush => done(
            export
                .backing
                .sync_data()
                .map_err(|e| io_refusal(export, "flush", 0, &e)),
        ),
        Command::Trim {
            offset,
            length,
            durability,
        } => done(trim(export, offset, length, durability)),
        Command::WriteZeroes {
            offset,
            length,
            mode,
            durability,
        } => done(write_zeroes(export, offset, length, mode, durability)),
        Command::Cache | Command::Disconnect => done(Ok(())),
        Command::BlockStatus { offset, length, .. } => {
            block_status(&export.backing, cookie, offset, length, job.payload)
        }
    }
}

/// A READ into the buffer the reader reserved for it.
fn read(
    export: &Export,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: Option<PooledBuf>,
) -> Reply {
    let Some(mut data) = payload else {
        unreachable!("the reader reserves a buffer for every read")
    };
    debug_assert_eq!(data.len(), length as usize);
    match export.backing.read_at(&mut data, offset) {
        Ok(()) => Reply::Read {
            cookie,
            offset,
            data,
        },
        Err(e) => Reply::Done {
            cookie,
            result: Err(io_refusal(export, "read", offset, &e)),
        },
    }
}

/// A WRITE, under the gate: the frozen epoch's copy of the old data first, then the
/// write-intent mark, then the data. The gate is left once the write has completed
/// (see `nbd::gate`), before a FUA sync.
fn write(
    export: &Export,
    offset: u64,
    length: u32,
    payload: &[u8],
    durability: Durability,
) -> Result<(), Refusal> {
    {
        let gate = export
            .gate
            .enter()
            .map_err(|_| sealed_refusal(export, "write"))?;
        if let Some(frozen) = gate.frozen() {
            frozen.preserve(&export.backing, offset, u64::from(length));
        }
        mark(export, offset, length)?;
        export
            .backing
            .write_at(payload, offset)
            .map_err(|e| io_refusal(export, "write", offset, &e))?;
    }
    sync_if(export, durability, "write", offset)
}

/// A TRIM, under the gate: the mark, then the hole. TRIM is advisory: while an epoch is
/// frozen it is dropped, so no range turns into a hole under the engine (and nothing
/// changes).
fn trim(export: &Export, offset: u64, length: u32, durability: Durability) -> Result<(), Refusal> {
    {
        let gate = export
            .gate
            .enter()
            .map_err(|_| sealed_refusal(export, "trim"))?;
        if gate.frozen().is_none() {
            mark(export, offset, length)?;
            export
                .backing
                .trim(offset, u64::from(length))
                .map_err(|e| io_refusal(export, "trim", offset, &e))?;
        }
    }
    sync_if(export, durability, "trim", offset)
}

/// A WRITE_ZEROES, under the gate, in a write's order: the frozen epoch's copy, the
/// mark, then the zeros.
fn write_zeroes(
    export: &Export,
    offset: u64,
    length: u32,
    mode: ZeroMode,
    durability: Durability,
) -> Result<(), Refusal> {
    let backing = &export.backing;
    {
        let gate = export
            .gate
            .enter()
            .map_err(|_| sealed_refusal(export, "write zeroes"))?;
        if let Some(frozen) = gate.frozen() {
            frozen.preserve(backing, offset, u64::from(length));
        }
        mark(export, offset, length)?;
        match gate.frozen() {
            // Frozen: zeros are written, never punched (see `epoch`).
            Some(_) => backing.write_zero_bytes(offset, u64::from(length)),
            None => backing.write_zeroes(offset, u64::from(length), mode),
        }
        .map_err(|e| io_refusal(export, "write zeroes", offset, &e))?;
    }
    sync_if(export, durability, "write zeroes", offset)
}

/// The write-intent mark of a range, durable before the data it covers is written.
fn mark(export: &Export, offset: u64, length: u32) -> Result<(), Refusal> {
    export
        .tracker
        .mark(offset, u64::from(length))
        .map_err(|e| tracker_refusal(export, &e))
}

/// The `fdatasync` a FUA request owes before its reply; nothing for the rest.
fn sync_if(
    export: &Export,
    durability: Durability,
    op: &'static str,
    offset: u64,
) -> Result<(), Refusal> {
    if durability == Durability::ForceUnitAccess {
        export
            .backing
            .sync_data()
            .map_err(|e| io_refusal(export, op, offset, &e))?;
    }
    Ok(())
}
