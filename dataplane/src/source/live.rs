//! The engine's side of the shim's control socket: epochs of a running shim.
//!
//! With a shim serving the disks (its control socket at `<state_dir>/shim.ctl`), a
//! sync is one *live epoch*: the engine asks the shim to freeze (the guest's writes
//! drain, the bits swap, writes resume with copy-before-write), reads the frozen
//! blocks through an [`EpochView`] that settles each read against the shim's state
//! map, checks before committing that the epoch stayed intact, and after the
//! target's acknowledgement tells the shim to clear the bits. If the engine dies at
//! any point the control connection closes and the shim puts the bits back.
//!
//! The protocol is described in `filter_driver_shim::control` and docs/shim.md.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use filter_driver_shim::epoch::EpochView;
use serde_json::Value;

use super::SourceError;

/// How long the engine waits for a control reply (a commit syncs the bitmap file).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest request the engine sends: `freeze disks=… whole=…` naming every disk of
/// a session in both lists, comma-separated, with the newline.
const FREEZE_LINE_BYTES_MAX: usize = "freeze disks= whole=\n".len()
    + 2 * (crate::protocol::MAX_DISKS_PER_SESSION * (crate::protocol::MAX_NAME_LEN + 1));
const _: () =
    assert!(FREEZE_LINE_BYTES_MAX <= filter_driver_shim::control::MAX_LINE_BYTES as usize);

/// A connection to a running shim's control socket.
#[derive(Debug)]
pub struct ShimControl {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// One disk as the shim reports it.
#[derive(Debug, Clone)]
pub struct ShimDisk {
    pub name: String,
    pub path: PathBuf,
    pub generation: [u8; 16],
    pub resync_required: Option<String>,
    pub block_size: u64,
}

/// One disk of a frozen epoch.
#[derive(Debug, Clone)]
pub struct LiveDisk {
    pub shim: ShimDisk,
    pub disk_size: u64,
    pub frozen_blocks: u64,
    pub whole_disk: bool,
    pub bitmap: PathBuf,
    pub map: PathBuf,
    pub scratch: PathBuf,
}

impl LiveDisk {
    /// Maps the epoch's state map and opens its scratch file.
    pub fn view(&self) -> Result<EpochView, SourceError> {
        EpochView::open(&self.map, &self.scratch, self.disk_size).map_err(|e| {
            SourceError::Shim(format!(
                "disk {}: cannot open the epoch's files: {e}",
                self.shim.name
            ))
        })
    }
}

/// An epoch frozen by this connection.
#[derive(Debug, Clone)]
pub struct LiveEpoch {
    /// The shim's id for it (16 hex digits).
    pub id: String,
    /// How long guest writes were held for the freeze.
    pub pause_us: u64,
    /// The shim aborts the epoch when its connection is silent this long (`None`: a
    /// shim without the bound).
    pub idle_timeout: Option<Duration>,
    pub disks: Vec<LiveDisk>,
}

/// Keepalives per idle bound: a `check` every quarter of it leaves three missed beats
/// of slack to a loaded machine before the shim gives the epoch up.
const KEEPALIVES_PER_IDLE_TIMEOUT: u32 = 4;

/// Runs `work` — the epoch's reads, streaming and commit — while a thread sends
/// `check` on `control` often enough that the shim never takes the epoch for
/// abandoned, however long the work takes. `work` gets the connection behind a mutex
/// for its own requests; the thread is stopped and joined before this returns.
pub fn keep_alive<T>(
    control: &mut ShimControl,
    epoch: &LiveEpoch,
    work: impl FnOnce(&Mutex<&mut ShimControl>) -> T,
) -> T {
    let shared = Mutex::new(control);
    let Some(bound) = epoch.idle_timeout else {
        return work(&shared);
    };
    let interval = bound / KEEPALIVES_PER_IDLE_TIMEOUT;
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let shared = &shared;
        scope.spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                let mut control = shared.lock().unwrap_or_else(|e| e.into_inner());
                // A broken epoch is reported by the check before Commit; beats stop.
                if let Err(e) = control.check(epoch) {
                    tracing::debug!("epoch keepalive: {e}");
                    break;
                }
            }
        });
        let out = work(shared);
        drop(stop);
        out
    })
}

fn field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a Value, SourceError> {
    v.get(key)
        .ok_or_else(|| SourceError::Shim(format!("{what} lacks `{key}`")))
}

fn string(v: &Value, key: &str, what: &str) -> Result<String, SourceError> {
    field(v, key, what)?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| SourceError::Shim(format!("{what}: `{key}` is not a string")))
}

fn number(v: &Value, key: &str, what: &str) -> Result<u64, SourceError> {
    field(v, key, what)?
        .as_u64()
        .ok_or_else(|| SourceError::Shim(format!("{what}: `{key}` is not a number")))
}

fn shim_disk(v: &Value) -> Result<ShimDisk, SourceError> {
    let what = "shim disk entry";
    let generation = string(v, "generation_id", what)?;
    Ok(ShimDisk {
        name: string(v, "name", what)?,
        path: PathBuf::from(string(v, "path", what)?),
        generation: crate::protocol::parse_hex16(&generation)
            .map_err(|e| SourceError::Shim(format!("{what}: generation_id: {e}")))?,
        resync_required: v
            .get("resync_reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        block_size: number(v, "block_size", what)?,
    })
}

impl ShimControl {
    /// Connects to the shim's control socket; `None` when no shim is listening there.
    pub fn connect(path: &Path) -> Result<Option<ShimControl>, SourceError> {
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => {
                return Err(SourceError::Shim(format!(
                    "cannot connect to the shim's control socket {}: {e}",
                    path.display()
                )))
            }
        };
        let io = |e: std::io::Error| SourceError::Shim(format!("control socket: {e}"));
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Some(ShimControl {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        }))
    }

    /// Sends one request line and returns the reply if it says `"ok": true`.
    fn request(&mut self, line: &str) -> Result<Value, SourceError> {
        let lost = |e: std::io::Error| {
            SourceError::Shim(format!(
                "the shim's control socket {} failed during `{line}` (did the shim stop?): {e}",
                self.path.display()
            ))
        };
        if let Err(e) = self.writer.write_all(format!("{line}\n").as_bytes()) {
            // A shim that hung up may have said why first (an idle epoch aborted).
            let mut last_words = String::new();
            if self.reader.read_line(&mut last_words).is_ok() {
                if let Ok(v) = serde_json::from_str::<Value>(&last_words) {
                    if let Some(why) = v.get("error").and_then(Value::as_str) {
                        return Err(SourceError::Shim(format!(
                            "`{line}` refused: the shim closed the connection: {why}"
                        )));
                    }
                }
            }
            return Err(lost(e));
        }
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply).map_err(lost)?;
        if n == 0 {
            return Err(lost(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            )));
        }
        let v: Value = serde_json::from_str(&reply)
            .map_err(|e| SourceError::Shim(format!("unreadable reply to `{line}`: {e}")))?;
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(v)
        } else {
            Err(SourceError::Shim(format!(
                "`{line}` refused: {}",
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            )))
        }
    }

    /// The disks the shim serves.
    pub fn status(&mut self) -> Result<Vec<ShimDisk>, SourceError> {
        let v = self.request("status")?;
        field(&v, "disks", "status reply")?
            .as_array()
            .ok_or_else(|| SourceError::Shim("status reply: `disks` is not a list".into()))?
            .iter()
            .map(shim_disk)
            .collect()
    }

    /// Freezes an epoch across `disks` (one consistency cut); `whole` names the disks
    /// whose every block must be preserved (their sync reads the whole disk).
    pub fn freeze(&mut self, disks: &[&str], whole: &[&str]) -> Result<LiveEpoch, SourceError> {
        let mut line = format!("freeze disks={}", disks.join(","));
        if !whole.is_empty() {
            line.push_str(&format!(" whole={}", whole.join(",")));
        }
        let v = self.request(&line)?;
        let what = "freeze reply";
        let disks = field(&v, "disks", what)?
            .as_array()
            .ok_or_else(|| SourceError::Shim("freeze reply: `disks` is not a list".into()))?
            .iter()
            .map(|d| {
                Ok(LiveDisk {
                    shim: shim_disk(d)?,
                    disk_size: number(d, "disk_size", what)?,
                    frozen_blocks: number(d, "frozen_blocks", what)?,
                    whole_disk: field(d, "whole_disk", what)?.as_bool().unwrap_or(false),
                    bitmap: PathBuf::from(string(d, "bitmap", what)?),
                    map: PathBuf::from(string(d, "map", what)?),
                    scratch: PathBuf::from(string(d, "scratch", what)?),
                })
            })
            .collect::<Result<Vec<_>, SourceError>>()?;
        Ok(LiveEpoch {
            id: string(&v, "epoch", what)?,
            pause_us: number(&v, "pause_us", what)?,
            idle_timeout: v
                .get("idle_timeout_ms")
                .and_then(Value::as_u64)
                .map(Duration::from_millis),
            disks,
        })
    }

    /// Confirms the epoch is still frozen and intact (call after the last read).
    pub fn check(&mut self, epoch: &LiveEpoch) -> Result<(), SourceError> {
        self.request(&format!("check {}", epoch.id)).map(drop)
    }

    /// The target acknowledged the epoch: the shim clears its bits.
    pub fn commit(&mut self, epoch: &LiveEpoch) -> Result<(), SourceError> {
        self.request(&format!("commit {}", epoch.id)).map(drop)
    }

    /// Gives the epoch up: its bits go in the next one.
    pub fn abort(&mut self, epoch: &LiveEpoch) -> Result<(), SourceError> {
        self.request(&format!("abort {}", epoch.id)).map(drop)
    }

    /// A checksum-compare resync of `disk` at `generation` is done.
    pub fn resync_done(&mut self, disk: &str, generation: &[u8; 16]) -> Result<(), SourceError> {
        self.request(&format!(
            "resync-done {disk} {}",
            crate::protocol::hex16(generation)
        ))
        .map(drop)
    }
}
