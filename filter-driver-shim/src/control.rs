//! The shim's control socket: a line protocol the engine (and operators, with
//! `socat - UNIX-CONNECT:<state_dir>/shim.ctl`) use to drive epochs and ask for status.
//!
//! Each request is one line of ASCII; each reply is one line of JSON with `"ok"`.
//! A client may send several requests on one connection.
//!
//! | request | reply |
//! |---------|-------|
//! | `status` | `{"ok":true,"epoch":null or {"id","owned","disks"},"pauses":{"count","last_us","max_us","total_us"},"disks":[{"name","path","generation_id","block_size","block_count","dirty_blocks","frozen_blocks","resync_required","resync_reason","bitmap_syncs","marks_waited","tracking_failed","connections","writes_refused"}]}` |
//! | `freeze [disks=NAME,…] [whole=NAME,…]` | `{"ok":true,"epoch":"<16 hex>","pause_us":N,"idle_timeout_ms":N,"disks":[{"name","path","generation_id","resync_required","resync_reason","block_size","disk_size","frozen_blocks","whole_disk","bitmap","map","scratch"}]}` |
//! | `check <epoch>` | `{"ok":true}` if the epoch is still frozen and intact on every disk |
//! | `commit <epoch>` | `{"ok":true}` once the committed bits are cleared durably |
//! | `abort <epoch>` | `{"ok":true}`; the epoch's bits join the active bits again |
//! | `resync-done <disk> <generation>` | `{"ok":true}`; `resync_required` clears if the generation is current |
//! | `demote` | `{"ok":true}`; every disk refuses writes from now on (planned failover; see `nbd::gate`) |
//! | anything else | `{"ok":false,"error":"…"}` |
//!
//! An epoch belongs to the connection that froze it: `check`, `commit` and `abort`
//! are accepted only there, and when that connection closes (the engine exited or was
//! killed) the epoch is aborted, so its bits are never lost and copy-before-write
//! never outlives its reader. One epoch is frozen at a time. `disks=` limits it to
//! some disks (all by default); `whole=` names those whose every block must be
//! preserved because their sync reads the whole disk (seeded or full).
//!
//! The socket is created mode 0600 whatever the umask. A request line is bounded by
//! [`MAX_LINE_BYTES`] however it arrives (in one piece or trickled): a longer one gets
//! an error naming the limit and the connection is closed. An epoch whose connection
//! sends no request for [`ControlConfig::freeze_idle_timeout`] is aborted; the freeze
//! reply tells the engine the bound (`idle_timeout_ms`) so it can send `check` well
//! within it.
//!
//! Requests and replies are the types of [`filter_driver_shim_contract::control`]
//! ([`Request`], [`StatusReply`], [`FreezeReply`], [`Done`], [`Refusal`]), which the
//! engine deserializes too; this module only decides the answers.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use filter_driver_shim_contract::control::MAX_LINE_BYTES;
use filter_driver_shim_contract::control::{
    Done, EpochId, EpochStatus, FreezeDisk, FreezeReply, ImageAtBirth, Pauses, Refusal, Request,
    StatusDisk, StatusReply,
};
use filter_driver_shim_contract::engine_status::EngineStatus;
use filter_driver_shim_contract::GenerationId;
use serde::Serialize;

use crate::disk::{DiskStatus, ServedDisk};
use crate::group::{self, FrozenEpoch};
use ferry_io::chain;

/// How often a waiting connection looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// Concurrent control connections; more are refused with an error line.
const MAX_CLIENTS: usize = 16;
/// Default [`ControlConfig::freeze_idle_timeout`]: four default `io_timeout_ms`.
pub const DEFAULT_FREEZE_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Mode of the control socket: only the shim's user may connect (`freeze` holds the
/// guest's writes to copy-before-write; `resync-done` vouches for a replica).
pub const SOCKET_MODE: u32 = 0o600;

/// The control socket of a shim: where it listens and how long an epoch may sit idle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlConfig {
    /// Path of the Unix socket (`<state_dir>/shim.ctl` for `ferry shim`).
    pub path: PathBuf,
    /// An epoch whose owning connection sends no complete request for this long is
    /// aborted (its bits go back, copy-before-write stops) and the connection closed.
    pub freeze_idle_timeout: Duration,
}

impl ControlConfig {
    /// A control socket at `path` with the default idle bound.
    pub fn new(path: impl Into<PathBuf>) -> ControlConfig {
        ControlConfig {
            path: path.into(),
            freeze_idle_timeout: DEFAULT_FREEZE_IDLE_TIMEOUT,
        }
    }
}

/// What a `freeze` request asks for.
struct FreezeRequest {
    /// The disks to freeze, in the shim's order.
    chosen: Vec<Arc<ServedDisk>>,
    /// Names of those of them to go whole.
    whole: Vec<String>,
}

/// How `check`, `commit` and `abort` end (or not) the epoch they name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Finish {
    Check,
    Commit,
    Abort,
}

/// Who holds the frozen epoch.
struct Owner {
    epoch: EpochId,
    client: u64,
    disks: Vec<Arc<ServedDisk>>,
}

/// What every control connection shares.
pub(crate) struct ControlState {
    disks: Arc<Vec<Arc<ServedDisk>>>,
    /// The frozen epoch, the connection that owns it and its disks.
    owner: Mutex<Option<Owner>>,
    next_epoch: AtomicU64,
    next_client: AtomicU64,
    clients: AtomicUsize,
    pauses: Mutex<Pauses>,
    freeze_idle_timeout: Duration,
    /// The directory of the control socket: the engine reports itself there (see
    /// [`EngineStatus`]), and `status` passes it on.
    state_dir: Option<PathBuf>,
}

impl ControlState {
    pub(crate) fn new(
        disks: Arc<Vec<Arc<ServedDisk>>>,
        freeze_idle_timeout: Duration,
        state_dir: Option<PathBuf>,
    ) -> ControlState {
        // Epoch ids differ across shim restarts, so an engine holding an id from a
        // previous shim can never have it confirmed by this one.
        let base = GenerationId::random()
            .map(|g| u64::from_le_bytes(g.as_bytes()[..8].try_into().expect("8 bytes")))
            .unwrap_or(0x5eed);
        ControlState {
            disks,
            owner: Mutex::new(None),
            next_epoch: AtomicU64::new(base & !0xffff_ffff),
            next_client: AtomicU64::new(1),
            clients: AtomicUsize::new(0),
            pauses: Mutex::new(Pauses::default()),
            freeze_idle_timeout,
            state_dir,
        }
    }
}

/// One disk's line of the `status` reply.
fn status_disk(s: &DiskStatus) -> StatusDisk {
    let t = &s.tracker;
    StatusDisk {
        name: s.name.clone(),
        path: s.path.clone(),
        generation_id: t.generation_id,
        block_size: t.block_size,
        block_count: t.block_count,
        dirty_blocks: t.dirty_blocks,
        frozen_blocks: t.frozen_blocks,
        resync_required: t.resync_required.is_some(),
        resync_reason: t.resync_required.map(|r| r.as_str().to_string()),
        bitmap_syncs: t.bitmap_syncs,
        marks_waited: t.marks_waited,
        tracking_failed: t.failed,
        connections: s.connections as u64,
        writes_refused: s.writes_refused,
        generation_born: t.born.map(|b| ImageAtBirth {
            size_bytes: b.size_bytes,
            ino: b.ino,
            mtime_ns: b.mtime_ns,
        }),
    }
}

/// The `freeze` reply for `e`.
fn freeze_reply(e: &FrozenEpoch, idle_timeout: Duration) -> FreezeReply {
    FreezeReply {
        ok: Default::default(),
        epoch: EpochId::new(e.id),
        pause_us: e.pause.as_micros() as u64,
        idle_timeout_ms: Some(idle_timeout.as_millis() as u64),
        disks: e
            .disks
            .iter()
            .map(|d| FreezeDisk {
                name: d.name.clone(),
                path: d.path.clone(),
                generation_id: d.generation_id,
                resync_required: d.resync_required.is_some(),
                resync_reason: d.resync_required.map(|r| r.as_str().to_string()),
                block_size: d.block_size,
                disk_size: d.disk_size,
                frozen_blocks: d.frozen_blocks,
                whole_disk: d.whole_disk,
                bitmap: d.files.bitmap.clone(),
                map: d.files.map.clone(),
                scratch: d.files.scratch.clone(),
                granules: d.granular.then(|| d.files.granules.clone()),
            })
            .collect(),
    }
}

/// A reply, ready to be sent: a success of its request's reply type or a refusal.
type Reply = Result<String, Refusal>;

/// The JSON line of a success reply.
fn ok(reply: &impl Serialize) -> Reply {
    // Reply types are plain structs of strings, numbers and paths: serializing them
    // fails only for a path that is not UTF-8, which is refused with the reason.
    serde_json::to_string(reply).map_err(|e| Refusal::new(format_args!("reply: {e}")))
}

fn err(msg: impl std::fmt::Display) -> Refusal {
    Refusal::new(msg)
}

/// The JSON line of `refusal`.
fn refusal_line(refusal: &Refusal) -> String {
    serde_json::to_string(refusal).unwrap_or_else(|_| r#"{"ok":false,"error":"?"}"#.to_string())
}

/// One control connection's view: which client it is and the epoch it owns.
struct Client<'a> {
    state: &'a ControlState,
    id: u64,
}

impl Client<'_> {
    fn owner(&self) -> std::sync::MutexGuard<'_, Option<Owner>> {
        self.state.owner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disks of the epoch this client owns, if it is `id`.
    fn owned(&self, id: EpochId) -> Result<Vec<Arc<ServedDisk>>, Refusal> {
        match &*self.owner() {
            Some(o) if o.epoch == id && o.client == self.id => Ok(o.disks.clone()),
            Some(o) if o.epoch == id => Err(err(format!(
                "epoch {id} belongs to another control connection"
            ))),
            _ => Err(err(format!(
                "epoch {id} is not frozen (aborted, finished, or frozen by a previous shim)"
            ))),
        }
    }

    /// The reply line to one request line.
    fn answer(&self, line: &str) -> String {
        let reply = match line.parse::<Request>() {
            Ok(request) => self.dispatch(request),
            Err(e) => Err(err(e)),
        };
        reply.unwrap_or_else(|refusal| refusal_line(&refusal))
    }

    fn dispatch(&self, request: Request) -> Reply {
        match request {
            Request::Status => ok(&self.status()),
            Request::Freeze {
                disks,
                whole,
                granules,
            } => ok(&self.freeze(disks, whole, granules)?),
            Request::Check(id) => self.finish(Finish::Check, id),
            Request::Commit(id) => self.finish(Finish::Commit, id),
            Request::Abort(id) => self.finish(Finish::Abort, id),
            Request::ResyncDone { disk, generation } => self.resync_done(&disk, generation),
            Request::Demote => self.demote(),
        }
    }

    /// `demote`: every disk refuses writes from now on (see `nbd::gate`).
    fn demote(&self) -> Reply {
        for d in self.state.disks.iter() {
            d.export.gate.seal();
        }
        tracing::warn!(
            disks = self.state.disks.len(),
            "demoted by a planned failover: every write is refused from now on"
        );
        ok(&Done::default())
    }

    /// `status`: the epoch frozen now, the freeze pauses so far and every disk.
    fn status(&self) -> StatusReply {
        let disks = &self.state.disks[..];
        let pauses = *self.state.pauses.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = self.owner().as_ref().map(|o| EpochStatus {
            id: o.epoch,
            owned: o.client == self.id,
            disks: o.disks.iter().map(|d| d.disk.name.clone()).collect(),
        });
        StatusReply {
            ok: Default::default(),
            epoch,
            pauses,
            disks: disks.iter().map(|d| status_disk(&d.status())).collect(),
            engine: self.state.state_dir.as_deref().and_then(EngineStatus::load),
            granules: true,
        }
    }

    /// `freeze [disks=a,b] [whole=a]`: freezes an epoch of the named disks (all by
    /// default), owned by this connection.
    fn freeze(
        &self,
        disks: Option<Vec<String>>,
        whole: Vec<String>,
        granules: bool,
    ) -> Result<FreezeReply, Refusal> {
        let FreezeRequest { chosen, whole } = self.freeze_arguments(disks, whole)?;
        let id = EpochId::new(self.state.next_epoch.fetch_add(1, Ordering::Relaxed));
        self.take_epoch(id, &chosen)?;
        match group::freeze(&chosen, id.get(), &whole, granules) {
            Ok(frozen) => {
                let us = frozen.pause.as_micros() as u64;
                let mut p = self.state.pauses.lock().unwrap_or_else(|e| e.into_inner());
                p.add(us);
                Ok(freeze_reply(&frozen, self.state.freeze_idle_timeout))
            }
            Err(e) => {
                *self.owner() = None;
                Err(err(chain(&e)))
            }
        }
    }

    /// The disks `freeze` names (all served disks without `disks=`) and those of them
    /// to go whole, or the error reply.
    fn freeze_arguments(
        &self,
        only: Option<Vec<String>>,
        whole: Vec<String>,
    ) -> Result<FreezeRequest, Refusal> {
        let disks = &self.state.disks[..];
        let chosen: Vec<Arc<ServedDisk>> = match &only {
            None => disks.to_vec(),
            Some(names) => {
                if let Some(n) = names
                    .iter()
                    .find(|n| !disks.iter().any(|d| &d.disk.name == *n))
                {
                    return Err(err(format!(
                        "`disks=` names `{n}`, which this shim does not serve"
                    )));
                }
                disks
                    .iter()
                    .filter(|d| names.contains(&d.disk.name))
                    .cloned()
                    .collect()
            }
        };
        if chosen.is_empty() {
            return Err(err("no disk to freeze"));
        }
        if let Some(w) = whole
            .iter()
            .find(|w| !chosen.iter().any(|d| &d.disk.name == *w))
        {
            return Err(err(format!(
                "`whole=` names `{w}`, which is not among the disks to freeze"
            )));
        }
        Ok(FreezeRequest { chosen, whole })
    }

    /// Makes this connection the owner of epoch `id` of `chosen`, unless an epoch is
    /// frozen already; then the error reply.
    fn take_epoch(&self, id: EpochId, chosen: &[Arc<ServedDisk>]) -> Result<(), Refusal> {
        let mut owner = self.owner();
        if let Some(o) = &*owner {
            return Err(err(format!(
                "epoch {} is already frozen{}; commit or abort it first",
                o.epoch,
                if o.client == self.id {
                    " by this connection"
                } else {
                    " by another control connection"
                }
            )));
        }
        *owner = Some(Owner {
            epoch: id,
            client: self.id,
            disks: chosen.to_vec(),
        });
        Ok(())
    }

    /// `check|commit|abort <epoch>`: checks or ends the epoch this connection owns.
    fn finish(&self, how: Finish, id: EpochId) -> Reply {
        let frozen = self.owned(id)?;
        let result = match how {
            Finish::Check => group::check(&frozen),
            // A broken epoch is never committed: its bits go back and the
            // engine hears why.
            Finish::Commit => group::check(&frozen)
                .and_then(|()| group::finish(&frozen, true))
                .or_else(|e| group::finish(&frozen, false).and(Err(e))),
            Finish::Abort => group::finish(&frozen, false),
        };
        if how != Finish::Check {
            *self.owner() = None;
            let how = if how == Finish::Commit {
                "committed"
            } else {
                "aborted"
            };
            tracing::debug!(epoch = %id, "epoch {how}");
        }
        match result {
            Ok(()) => ok(&Done::default()),
            Err(e) => Err(err(chain(&e))),
        }
    }

    /// `resync-done <disk> <generation>`: the engine holds a replica of the disk at
    /// that generation.
    fn resync_done(&self, name: &str, generation: GenerationId) -> Reply {
        let disks = &self.state.disks[..];
        let Some(d) = disks.iter().find(|d| d.disk.name == name) else {
            return Err(err(format!("no disk `{name}`")));
        };
        match d.export.tracker.resync_done(generation) {
            Ok(true) => ok(&Done::default()),
            Ok(false) => Err(err(format!(
                "disk `{name}`: generation {generation} is not the current one; resync again"
            ))),
            Err(e) => Err(err(chain(&e))),
        }
    }

    /// Aborts the epoch this connection owns if its last request was `idle` ago or
    /// longer than the bound; returns the reason to send before closing.
    fn abort_if_idle(&self, idle: Duration) -> Option<String> {
        let bound = self.state.freeze_idle_timeout;
        if idle < bound {
            return None;
        }
        let mut owner = self.owner();
        // Only an epoch of this connection; another's idles on its own clock.
        let o = owner.take_if(|o| o.client == self.id)?;
        let why = format!(
            "epoch {} aborted: its control connection sent no request for {} ms (freeze_idle_timeout_ms = {}); its blocks go in the next epoch",
            o.epoch,
            idle.as_millis(),
            bound.as_millis()
        );
        tracing::warn!("{why}");
        if let Err(e) = group::finish(&o.disks, false) {
            tracing::error!(error = %chain(&e), "aborting an idle epoch");
        }
        Some(why)
    }

    /// The connection ended: an epoch it still owns is aborted.
    fn release(&self) {
        let mut owner = self.owner();
        if owner.as_ref().is_some_and(|o| o.client == self.id) {
            let o = owner.take().expect("checked");
            tracing::warn!(epoch = %o.epoch, "control connection closed with an epoch frozen: aborting it (its blocks go in the next epoch)");
            if let Err(e) = group::finish(&o.disks, false) {
                tracing::error!(error = %chain(&e), "aborting an abandoned epoch");
            }
        }
    }
}

fn handle(stream: UnixStream, client: &Client<'_>, stop: &AtomicBool) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    // Bytes of the request being received, across reads and timeouts: the bound is on
    // the line, not on one read.
    // Grows only as bytes arrive, up to the bound.
    let mut line: Vec<u8> = Vec::new();
    let mut last_request = Instant::now();
    loop {
        if line.len() as u64 >= MAX_LINE_BYTES {
            let reply = refusal_line(&err(format!(
                "request line too long: the limit is {MAX_LINE_BYTES} bytes; closing the connection"
            )));
            writer.write_all(format!("{reply}\n").as_bytes())?;
            return Ok(());
        }
        let room = MAX_LINE_BYTES - line.len() as u64;
        match (&mut reader).take(room).read_until(b'\n', &mut line) {
            // `room` is at least 1, so nothing read means end of file.
            Ok(0) => return Ok(()),
            // Either the line is complete, or the bound is reached (checked above), or
            // the peer closed inside a line (the next read returns 0).
            Ok(_) if !line.ends_with(b"\n") => continue,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // `read_until` keeps what arrived in `line`; the rest comes later.
                if stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                if let Some(why) = client.abort_if_idle(last_request.elapsed()) {
                    writer.write_all(format!("{}\n", refusal_line(&err(why))).as_bytes())?;
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        last_request = Instant::now();
        let mut reply = match std::str::from_utf8(&line) {
            Ok(text) => client.answer(text),
            Err(_) => refusal_line(&err("request is not text (the protocol is ASCII lines)")),
        };
        reply.push('\n');
        line.clear();
        writer.write_all(reply.as_bytes())?;
    }
}

pub(crate) fn serve(listener: UnixListener, state: Arc<ControlState>, stop: Arc<AtomicBool>) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(error = %e, "control socket unusable");
        return;
    }
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        threads.retain(|t| !t.is_finished());
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if state.clients.load(Ordering::Acquire) >= MAX_CLIENTS {
                    let busy = err(format!("{MAX_CLIENTS} control connections already open"));
                    let _ = stream.write_all(format!("{}\n", refusal_line(&busy)).as_bytes());
                    continue;
                }
                state.clients.fetch_add(1, Ordering::AcqRel);
                let state_for_errors = &state;
                let state = Arc::clone(&state);
                let stop = Arc::clone(&stop);
                let spawned = std::thread::Builder::new()
                    .name("shim-control-client".into())
                    .spawn(move || {
                        let client = Client {
                            state: &state,
                            id: state.next_client.fetch_add(1, Ordering::Relaxed),
                        };
                        if let Err(e) = handle(stream, &client, &stop) {
                            tracing::debug!(error = %e, "control client ended with an error");
                        }
                        client.release();
                        state.clients.fetch_sub(1, Ordering::AcqRel);
                    });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        state_for_errors.clients.fetch_sub(1, Ordering::AcqRel);
                        tracing::error!(error = %e, "cannot spawn a control thread");
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL / 2),
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                std::thread::sleep(POLL / 2);
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
}
