//! The seam between an NBD connection and its backing store: one trait, [`Engine`],
//! with a thread-pool implementation ([`pool::PoolEngine`]) and an io_uring one
//! ([`uring::UringEngine`]) beside it. Each connection starts one when its
//! transmission phase begins (which one: [`crate::backing::IoEngine`], resolved per
//! disk at start).
//!
//! ```text
//!  reader ──submit(Job)──► engine (pool workers, or io thread + ring) ──Reply──► writer
//! ```
//!
//! # Contract
//!
//! * The reader hands the engine every valid request as a [`Job`]; the engine sends
//!   exactly one [`Reply`] per job to the connection's reply queue, in any order (NBD
//!   allows replies out of order).
//! * A job's buffer (the payload of a write, or the space the reader reserved for a
//!   read or block-status reply) belongs to the engine from `submit` until its reply
//!   carries it to the writer or drops it. An engine that has stopped hands the job,
//!   buffer and all, back from `submit`.
//! * Write-intent order, in both: enter the write gate, copy-before-write if an epoch
//!   is frozen, mark the tracker (returns once the bits are durable), then write the
//!   backing store, leave the gate once the write completed, then (FUA) sync, then
//!   reply. So a reply the client sees implies a durable bit, and a crash between the
//!   mark and the write costs at most a resync of a block that did not change.
//! * Backing-store and tracker failures become the same NBD errors in both
//!   ([`io_refusal`], [`tracker_refusal`]), and BLOCK_STATUS is answered the same way
//!   ([`block_status`]).
//!
//! The thread pool is the reference: `uring/tests.rs` drives the same requests through
//! both and compares the replies and the bytes left on disk.

pub mod pool;
pub mod uring;

use std::io;

use super::export::Export;
use super::proto::{Command, NbdErrno, Refusal, BASE_ALLOCATION_ID};
use crate::backing::Backing;
use crate::pool::PooledBuf;
use crate::tracker::TrackerError;

/// Requests decoded but not yet picked up by the engine. 64 covers QEMU's and fio's
/// usual depths (≤ 32) with room; beyond it the reader stops reading the socket.
pub const JOB_QUEUE_DEPTH: usize = 64;
/// Most extents in one BLOCK_STATUS reply: 32 KiB of descriptors. The spec allows
/// fewer than the range needs; clients ask again from where the reply stopped.
pub const MAX_EXTENTS_PER_REPLY: usize = 4096;

/// Runs one connection's requests against its export's backing store; see the module
/// documentation for the contract. Started by the connection (`PoolEngine::start`,
/// `UringEngine::start`), fed by its reader, finished when the reader stops.
pub(crate) trait Engine {
    /// Queues `job`, waiting while [`JOB_QUEUE_DEPTH`] jobs are queued already. An
    /// engine that has stopped (its reply queue closed, its ring failed) hands the job
    /// back.
    fn submit(&self, job: Job) -> Result<(), Job>;

    /// No more jobs: returns once every job submitted has been answered and the
    /// engine's threads have ended.
    fn finish(self);
}

/// One decoded request, with the buffer it needs.
pub(crate) struct Job {
    pub(crate) cookie: u64,
    pub(crate) command: Command,
    /// A write's payload, or the space reserved for a read's data or a block-status
    /// reply ([`block_status_bytes`]); `None` for every other command.
    pub(crate) payload: Option<PooledBuf>,
}

/// The answer to one request, for the writer to serialise.
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

/// The NBD error for a failed backing-store operation, logged with the disk, the
/// operation and the offset.
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

/// The NBD error for a change refused because the disk's site was demoted by a planned
/// failover (its gate is sealed): the VMs run from the replicas now.
pub(crate) fn sealed_refusal(export: &Export, op: &'static str) -> Refusal {
    tracing::debug!(disk = %export.info.name, op, "write refused: this site was demoted by a planned failover");
    Refusal {
        errno: NbdErrno::Perm,
        reason: "the disk's site was demoted by a planned failover; writes are refused",
    }
}

/// The NBD error for a change that could not be tracked: the change is not made.
pub(crate) fn tracker_refusal(export: &Export, err: &TrackerError) -> Refusal {
    let why = ferry_io::chain(err);
    tracing::error!(disk = %export.info.name, %why, "change tracking failed; write refused");
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

/// Bytes the reader reserves for a BLOCK_STATUS reply: the context id, then 8 bytes
/// per extent.
pub(crate) fn block_status_bytes(one_extent: bool) -> usize {
    let extents = if one_extent { 1 } else { MAX_EXTENTS_PER_REPLY };
    4 + 8 * extents
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
