//! The shim's control socket: a line protocol the engine (and operators, with
//! `socat - UNIX-CONNECT:<state_dir>/shim.ctl`) use to drive epochs and ask for status.
//!
//! Each request is one line of ASCII; each reply is one line of JSON with `"ok"`.
//! A client may send several requests on one connection.
//!
//! | request | reply |
//! |---------|-------|
//! | `status` | `{"ok":true,"epoch":null or {"id","owned","disks"},"pauses":{"count","last_us","max_us","total_us"},"disks":[{"name","path","generation_id","block_size","block_count","dirty_blocks","frozen_blocks","resync_required","resync_reason","bitmap_syncs","marks_waited","tracking_failed","connections"}]}` |
//! | `freeze [disks=NAME,…] [whole=NAME,…]` | `{"ok":true,"epoch":"<16 hex>","pause_us":N,"disks":[{"name","path","generation_id","resync_required","resync_reason","block_size","disk_size","frozen_blocks","whole_disk","bitmap","map","scratch"}]}` |
//! | `check <epoch>` | `{"ok":true}` if the epoch is still frozen and intact on every disk |
//! | `commit <epoch>` | `{"ok":true}` once the committed bits are cleared durably |
//! | `abort <epoch>` | `{"ok":true}`; the epoch's bits join the active bits again |
//! | `resync-done <disk> <generation>` | `{"ok":true}`; `resync_required` clears if the generation is current |
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

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bitmap::GenerationId;
use crate::disk::{DiskStatus, ServedDisk};
use crate::group::{self, FrozenEpoch};
use ferry_io::chain;

/// How often a waiting connection looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// Concurrent control connections; more are refused with an error line.
const MAX_CLIENTS: usize = 16;
/// Longest request line accepted, newline included, however it arrives. The longest
/// request the engine sends, a `freeze` naming each of a session's 256 disks (64-byte
/// names) in `disks=` and `whole=`, is about 33 KB (the engine checks that at compile
/// time); the bound keeps a client from growing a connection's buffer at will.
pub const MAX_LINE_BYTES: u64 = 64 << 10;
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

/// Freeze pause statistics since the shim started.
#[derive(Default, Debug, Clone, Copy)]
struct Pauses {
    count: u64,
    last_us: u64,
    max_us: u64,
    total_us: u64,
}

/// What a `freeze` request asks for.
struct FreezeRequest {
    /// The disks to freeze, in the shim's order.
    chosen: Vec<Arc<ServedDisk>>,
    /// Names of those of them to go whole.
    whole: Vec<String>,
}

/// Who holds the frozen epoch.
struct Owner {
    epoch: u64,
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
}

impl ControlState {
    pub(crate) fn new(
        disks: Arc<Vec<Arc<ServedDisk>>>,
        freeze_idle_timeout: Duration,
    ) -> ControlState {
        // Epoch ids differ across shim restarts, so an engine holding an id from a
        // previous shim can never have it confirmed by this one.
        let base = crate::bitmap::GenerationId::random()
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
        }
    }
}

/// JSON of one disk's status.
pub fn disk_status_json(s: &DiskStatus) -> Value {
    let t = &s.tracker;
    json!({
        "name": s.name,
        "path": s.path,
        "generation_id": t.generation_id.to_string(),
        "block_size": t.block_size,
        "block_count": t.block_count,
        "dirty_blocks": t.dirty_blocks,
        "frozen_blocks": t.frozen_blocks,
        "resync_required": t.resync_required.is_some(),
        "resync_reason": t.resync_required.map(|r| r.as_str()),
        "bitmap_syncs": t.bitmap_syncs,
        "marks_waited": t.marks_waited,
        "tracking_failed": t.failed,
        "connections": s.connections,
    })
}

fn frozen_json(e: &FrozenEpoch, idle_timeout: Duration) -> Value {
    json!({
        "ok": true,
        "epoch": format!("{:016x}", e.id),
        "pause_us": e.pause.as_micros() as u64,
        "idle_timeout_ms": idle_timeout.as_millis() as u64,
        "disks": e.disks.iter().map(|d| json!({
            "name": d.name,
            "path": d.path,
            "generation_id": d.generation_id.to_string(),
            "resync_required": d.resync_required.is_some(),
            "resync_reason": d.resync_required.map(|r| r.as_str()),
            "block_size": d.block_size,
            "disk_size": d.disk_size,
            "frozen_blocks": d.frozen_blocks,
            "whole_disk": d.whole_disk,
            "bitmap": d.files.bitmap,
            "map": d.files.map,
            "scratch": d.files.scratch,
        })).collect::<Vec<_>>(),
    })
}

fn err(msg: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": msg.to_string()})
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

    /// The disks of the epoch this client owns, if it is `token`.
    fn owned(&self, token: Option<&str>) -> Result<Vec<Arc<ServedDisk>>, Value> {
        let Some(token) = token else {
            return Err(err("missing epoch id"));
        };
        let id = u64::from_str_radix(token, 16)
            .map_err(|_| err(format!("`{token}` is not an epoch id (16 hex digits)")))?;
        match &*self.owner() {
            Some(o) if o.epoch == id && o.client == self.id => Ok(o.disks.clone()),
            Some(o) if o.epoch == id => Err(err(format!(
                "epoch {token} belongs to another control connection"
            ))),
            _ => Err(err(format!(
                "epoch {token} is not frozen (aborted, finished, or frozen by a previous shim)"
            ))),
        }
    }

    fn answer(&self, line: &str) -> Value {
        let mut words = line.split_ascii_whitespace();
        match words.next().unwrap_or("") {
            "status" => self.status(),
            "freeze" => self.freeze(words),
            cmd @ ("check" | "commit" | "abort") => self.finish(cmd, words.next()),
            "resync-done" => self.resync_done(words.next(), words.next()),
            "" => err("empty request"),
            other => err(format!("unknown command `{other}`")),
        }
    }

    /// `status`: the epoch frozen now, the freeze pauses so far and every disk.
    fn status(&self) -> Value {
        let disks = &self.state.disks[..];
        let p = *self.state.pauses.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = self.owner().as_ref().map(|o| {
            json!({
                "id": format!("{:016x}", o.epoch),
                "owned": o.client == self.id,
                "disks": o.disks.iter().map(|d| d.disk.name.clone()).collect::<Vec<_>>(),
            })
        });
        json!({
            "ok": true,
            "epoch": epoch,
            "pauses": {"count": p.count, "last_us": p.last_us, "max_us": p.max_us, "total_us": p.total_us},
            "disks": disks.iter().map(|d| disk_status_json(&d.status())).collect::<Vec<_>>(),
        })
    }

    /// `freeze [disks=a,b] [whole=a]`: freezes an epoch of the named disks (all by
    /// default), owned by this connection.
    fn freeze(&self, words: std::str::SplitAsciiWhitespace<'_>) -> Value {
        let FreezeRequest { chosen, whole } = match self.freeze_arguments(words) {
            Ok(parsed) => parsed,
            Err(reply) => return reply,
        };
        let id = self.state.next_epoch.fetch_add(1, Ordering::Relaxed);
        if let Err(reply) = self.take_epoch(id, &chosen) {
            return reply;
        }
        match group::freeze(&chosen, id, &whole) {
            Ok(frozen) => {
                let us = frozen.pause.as_micros() as u64;
                let mut p = self.state.pauses.lock().unwrap_or_else(|e| e.into_inner());
                p.count += 1;
                p.last_us = us;
                p.max_us = p.max_us.max(us);
                p.total_us += us;
                frozen_json(&frozen, self.state.freeze_idle_timeout)
            }
            Err(e) => {
                *self.owner() = None;
                err(chain(&e))
            }
        }
    }

    /// The disks `freeze` names (all served disks without `disks=`) and those of them
    /// to go whole, or the error reply.
    fn freeze_arguments(
        &self,
        words: std::str::SplitAsciiWhitespace<'_>,
    ) -> Result<FreezeRequest, Value> {
        let disks = &self.state.disks[..];
        let mut whole = Vec::new();
        let mut only: Option<Vec<String>> = None;
        for w in words {
            let list = |l: &str| {
                l.split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            };
            if let Some(l) = w.strip_prefix("whole=") {
                whole.extend(list(l));
            } else if let Some(l) = w.strip_prefix("disks=") {
                only.get_or_insert_with(Vec::new).extend(list(l));
            } else {
                return Err(err(format!("unknown freeze argument `{w}`")));
            }
        }
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
    fn take_epoch(&self, id: u64, chosen: &[Arc<ServedDisk>]) -> Result<(), Value> {
        let mut owner = self.owner();
        if let Some(o) = &*owner {
            return Err(err(format!(
                "epoch {:016x} is already frozen{}; commit or abort it first",
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
    fn finish(&self, cmd: &str, token: Option<&str>) -> Value {
        let frozen = match self.owned(token) {
            Ok(d) => d,
            Err(reply) => return reply,
        };
        let result = match cmd {
            "check" => group::check(&frozen),
            // A broken epoch is never committed: its bits go back and the
            // engine hears why.
            "commit" => group::check(&frozen)
                .and_then(|()| group::finish(&frozen, true))
                .or_else(|e| group::finish(&frozen, false).and(Err(e))),
            _ => group::finish(&frozen, false),
        };
        if cmd != "check" {
            *self.owner() = None;
            tracing::debug!(epoch = token.unwrap_or(""), cmd, "epoch finished");
        }
        match result {
            Ok(()) => json!({"ok": true}),
            Err(e) => err(chain(&e)),
        }
    }

    /// `resync-done <disk> <generation>`: the engine holds a replica of the disk at
    /// that generation.
    fn resync_done(&self, name: Option<&str>, gen: Option<&str>) -> Value {
        let disks = &self.state.disks[..];
        let (Some(name), Some(gen)) = (name, gen) else {
            return err("usage: resync-done <disk> <generation>");
        };
        let Some(d) = disks.iter().find(|d| d.disk.name == name) else {
            return err(format!("no disk `{name}`"));
        };
        let Ok(generation) = gen.parse::<GenerationId>() else {
            return err(format!("`{gen}` is not a generation id (32 hex digits)"));
        };
        match d.export.tracker.resync_done(generation) {
            Ok(true) => json!({"ok": true}),
            Ok(false) => err(format!(
                "disk `{name}`: generation {gen} is not the current one; resync again"
            )),
            Err(e) => err(chain(&e)),
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
            "epoch {:016x} aborted: its control connection sent no request for {} ms (freeze_idle_timeout_ms = {}); its blocks go in the next epoch",
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
            tracing::warn!(epoch = %format_args!("{:016x}", o.epoch), "control connection closed with an epoch frozen: aborting it (its blocks go in the next epoch)");
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
            let reply = err(format!(
                "request line too long: the limit is {MAX_LINE_BYTES} bytes; closing the connection"
            ));
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
                    writer.write_all(format!("{}\n", err(why)).as_bytes())?;
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        last_request = Instant::now();
        let answer = match std::str::from_utf8(&line) {
            Ok(text) => client.answer(text),
            Err(_) => err("request is not text (the protocol is ASCII lines)"),
        };
        let mut reply = answer.to_string();
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
                    let _ = stream.write_all(
                        format!("{{\"ok\":false,\"error\":\"{MAX_CLIENTS} control connections already open\"}}\n").as_bytes(),
                    );
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
