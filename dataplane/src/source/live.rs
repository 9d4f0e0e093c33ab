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
//! The requests and replies are the types of [`filter_driver_shim_contract::control`]
//! (described there, in the shim's `control` module and in docs/shim.md): this module
//! writes [`Request`]s and deserializes the shim's JSON into the reply types, so a
//! field the shim renames fails to compile, and a reply that lacks one is an
//! [`ShimControlError::Unreadable`] naming it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use filter_driver_shim_contract::control::{
    Done, EpochId, FreezeDisk, FreezeReply, Outcome, Request, StatusDisk, StatusReply,
    MAX_LINE_BYTES,
};
use filter_driver_shim_contract::epoch::EpochView;
use filter_driver_shim_contract::GenerationId;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::SourceError;

/// How a conversation with the shim's control socket failed, or what the shim's
/// answers contradict.
#[derive(Debug, thiserror::Error)]
pub enum ShimControlError {
    /// Continuous replication needs the shim's epochs.
    #[error("no shim is listening on {}; start `ferry shim --config` with the same config first", socket.as_deref().unwrap_or(Path::new("(no control socket configured)")).display())]
    NotListening { socket: Option<PathBuf> },
    #[error("cannot connect to the shim's control socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Setting the connection up (timeouts, a second handle) failed.
    #[error("control socket")]
    Socket(#[source] std::io::Error),
    #[error("the shim's control socket {} failed during `{request}` (did the shim stop?)", path.display())]
    Lost {
        path: PathBuf,
        request: String,
        #[source]
        source: std::io::Error,
    },
    /// The shim hung up, saying why first (an idle epoch aborted).
    #[error("`{request}` refused: the shim closed the connection: {reason}")]
    Closed { request: String, reason: String },
    /// The reply is not JSON, or not the request's reply type (the source names the
    /// missing or mistyped field).
    #[error("unreadable reply to `{request}`")]
    Unreadable {
        request: String,
        #[source]
        source: serde_json::Error,
    },
    /// The shim answered `"ok": false`; `reason` is its `error`.
    #[error("`{request}` refused: {}", reason.as_deref().unwrap_or("no reason given"))]
    Refused {
        request: String,
        reason: Option<String>,
    },
    #[error("disk {disk}: cannot open the epoch's files")]
    EpochFiles {
        disk: String,
        #[source]
        source: std::io::Error,
    },
    #[error("disk #{disk}: cannot read the frozen copy at offset {offset}")]
    FrozenRead {
        disk: u32,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {disk} is not served by the running shim; the shim and the engine must run from the same config")]
    NotServed { disk: String },
    #[error("disk {disk}: the shim serves {}, the config names {}", shim_path.display(), config_path.display())]
    PathMismatch {
        disk: String,
        shim_path: PathBuf,
        config_path: PathBuf,
    },
    #[error("freeze reply lacks disk {disk}")]
    FreezeLacksDisk { disk: String },
    #[error("disk {disk}: the shim serves {shim_bytes} bytes, the image has {image_bytes}")]
    SizeMismatch {
        disk: String,
        shim_bytes: u64,
        image_bytes: u64,
    },
}

/// How long the engine waits for a control reply (a commit syncs the bitmap file).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest request the engine sends: `freeze disks=… whole=…` naming every disk of
/// a session in both lists, comma-separated, with the newline.
const FREEZE_LINE_BYTES_MAX: usize = "freeze disks= whole=\n".len()
    + 2 * (crate::protocol::MAX_DISKS_PER_SESSION * (crate::protocol::MAX_NAME_LEN + 1));
const _: () = assert!(FREEZE_LINE_BYTES_MAX <= MAX_LINE_BYTES as usize);

/// A connection to a running shim's control socket.
#[derive(Debug)]
pub struct ShimControl {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// See [`ShimControl::offers_granules`].
    granules: bool,
}

/// Maps the state map and opens the scratch file of `disk`, one disk of a frozen epoch.
pub fn view(disk: &FreezeDisk) -> Result<EpochView, SourceError> {
    EpochView::open(&disk.map, &disk.scratch, disk.disk_size).map_err(|source| {
        ShimControlError::EpochFiles {
            disk: disk.name.clone(),
            source,
        }
        .into()
    })
}

/// An epoch frozen by this connection: the shim's `freeze` reply.
#[derive(Debug, Clone)]
pub struct LiveEpoch {
    pub id: EpochId,
    /// How long guest writes were held for the freeze.
    pub pause_us: u64,
    /// The shim aborts the epoch when its connection is silent this long (`None`: a
    /// shim without the bound).
    pub idle_timeout: Option<Duration>,
    pub disks: Vec<FreezeDisk>,
}

impl From<FreezeReply> for LiveEpoch {
    fn from(r: FreezeReply) -> LiveEpoch {
        LiveEpoch {
            id: r.epoch,
            pause_us: r.pause_us,
            idle_timeout: r.idle_timeout_ms.map(Duration::from_millis),
            disks: r.disks,
        }
    }
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
                    tracing::debug!("epoch keepalive: {}", crate::chain(&e));
                    break;
                }
            }
        });
        let out = work(shared);
        drop(stop);
        out
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
            Err(source) => {
                return Err(ShimControlError::Connect {
                    path: path.to_path_buf(),
                    source,
                }
                .into())
            }
        };
        let io = ShimControlError::Socket;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Some(ShimControl {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            granules: false,
        }))
    }

    /// Sends `request` and reads the reply into `T` if it says `"ok": true`.
    fn request<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ShimControlError> {
        let line = &request.to_string();
        let lost = |source: std::io::Error| ShimControlError::Lost {
            path: self.path.clone(),
            request: line.to_string(),
            source,
        };
        if let Err(e) = self.writer.write_all(format!("{line}\n").as_bytes()) {
            // A shim that hung up may have said why first (an idle epoch aborted).
            let mut last_words = String::new();
            if self.reader.read_line(&mut last_words).is_ok() {
                if let Ok(Outcome {
                    error: Some(reason),
                    ..
                }) = serde_json::from_str(&last_words)
                {
                    return Err(ShimControlError::Closed {
                        request: line.to_string(),
                        reason,
                    });
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
        let unreadable = |source| ShimControlError::Unreadable {
            request: line.to_string(),
            source,
        };
        // Whether it was done first: a refusal is not the request's reply type.
        let v: Value = serde_json::from_str(&reply).map_err(unreadable)?;
        let outcome = Outcome::deserialize(&v).map_err(unreadable)?;
        if !outcome.ok {
            return Err(ShimControlError::Refused {
                request: line.to_string(),
                reason: outcome.error,
            });
        }
        T::deserialize(v).map_err(unreadable)
    }

    /// The disks the shim serves.
    pub fn status(&mut self) -> Result<Vec<StatusDisk>, SourceError> {
        Ok(self.status_reply()?.disks)
    }

    /// The shim's whole status reply.
    pub fn status_reply(&mut self) -> Result<StatusReply, SourceError> {
        let reply: StatusReply = self.request(&Request::Status)?;
        self.granules = reply.granules;
        Ok(reply)
    }

    /// Whether the shim's last `status` said it keeps granule masks (`freeze …
    /// granules=on`).
    pub fn offers_granules(&self) -> bool {
        self.granules
    }

    /// Freezes an epoch across `disks` (one consistency cut); `whole` names the disks
    /// whose every block must be preserved (their sync reads the whole disk). With
    /// `granules`, the others carry only their written granules: the engine must then
    /// read exactly what each disk's granule file names.
    pub fn freeze(
        &mut self,
        disks: &[&str],
        whole: &[&str],
        granules: bool,
    ) -> Result<LiveEpoch, SourceError> {
        let request = Request::Freeze {
            disks: Some(disks.iter().map(|d| d.to_string()).collect()),
            whole: whole.iter().map(|d| d.to_string()).collect(),
            granules,
        };
        let reply: FreezeReply = self.request(&request)?;
        Ok(reply.into())
    }

    /// Confirms the epoch is still frozen and intact (call after the last read).
    pub fn check(&mut self, epoch: &LiveEpoch) -> Result<(), SourceError> {
        self.request::<Done>(&Request::Check(epoch.id))?;
        Ok(())
    }

    /// The target acknowledged the epoch: the shim clears its bits.
    pub fn commit(&mut self, epoch: &LiveEpoch) -> Result<(), SourceError> {
        self.request::<Done>(&Request::Commit(epoch.id))?;
        Ok(())
    }

    /// Gives the epoch up: its bits go in the next one.
    pub fn abort(&mut self, epoch: &LiveEpoch) -> Result<(), SourceError> {
        self.request::<Done>(&Request::Abort(epoch.id))?;
        Ok(())
    }

    /// Demotes the shim (planned failover): every write is refused from now on.
    pub fn demote(&mut self) -> Result<(), SourceError> {
        self.request::<Done>(&Request::Demote)?;
        Ok(())
    }

    /// A checksum-compare resync of `disk` at `generation` is done.
    pub fn resync_done(&mut self, disk: &str, generation: GenerationId) -> Result<(), SourceError> {
        self.request::<Done>(&Request::ResyncDone {
            disk: disk.to_string(),
            generation,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};

    use super::*;

    /// A control connection to a fake shim that answers each request line with the
    /// next of `replies`; returns the lines it received once the connection closes.
    fn fake_shim(replies: &[&str]) -> (ShimControl, std::thread::JoinHandle<Vec<String>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let replies: Vec<String> = replies.iter().map(|r| format!("{r}\n")).collect();
        let shim = std::thread::spawn(move || {
            let mut writer = theirs.try_clone().unwrap();
            let mut seen = Vec::new();
            let mut lines = BufReader::new(theirs).lines();
            for reply in replies {
                let Some(Ok(line)) = lines.next() else { break };
                seen.push(line);
                writer.write_all(reply.as_bytes()).unwrap();
            }
            seen
        });
        let control = ShimControl {
            path: PathBuf::from("fake.ctl"),
            reader: BufReader::new(ours.try_clone().unwrap()),
            writer: ours,
            granules: false,
        };
        (control, shim)
    }

    #[test]
    fn a_reply_lacking_a_field_is_unreadable_and_names_it() {
        let (mut control, shim) = fake_shim(&[r#"{"ok":true,"epoch":null,"disks":[]}"#]);
        let err = control
            .request::<StatusReply>(&Request::Status)
            .unwrap_err();
        let ShimControlError::Unreadable { request, source } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(request, "status");
        assert!(source.to_string().contains("`pauses`"), "{source}");
        drop(control);
        assert_eq!(shim.join().unwrap(), ["status"]);
    }

    #[test]
    fn a_refusal_keeps_the_shims_reason() {
        let (mut control, _shim) =
            fake_shim(&[r#"{"ok":false,"error":"epoch 0000000000000001 is not frozen"}"#]);
        let err = control
            .request::<Done>(&Request::Check(EpochId::new(1)))
            .unwrap_err();
        assert!(
            matches!(&err, ShimControlError::Refused { request, reason: Some(r) }
                if request == "check 0000000000000001" && r.contains("is not frozen")),
            "{err:?}"
        );
    }

    #[test]
    fn freeze_sends_the_line_and_reads_the_typed_reply() {
        let reply = r#"{"ok":true,"epoch":"00000000000000ab","pause_us":5,"idle_timeout_ms":4000,"disks":[{"name":"vda","path":"/i","generation_id":"07070707070707070707070707070707","resync_required":true,"resync_reason":"image-modified","block_size":4096,"disk_size":8192,"frozen_blocks":1,"whole_disk":true,"bitmap":"/b","map":"/m","scratch":"/s","added_later":1}]}"#;
        let (mut control, shim) = fake_shim(&[reply]);
        let epoch = control.freeze(&["vda"], &["vda"], false).unwrap();
        assert_eq!(epoch.id, EpochId::new(0xab));
        assert_eq!(epoch.idle_timeout, Some(Duration::from_millis(4000)));
        assert_eq!(
            epoch.disks[0].generation_id,
            GenerationId::from_bytes([7; 16])
        );
        assert_eq!(
            epoch.disks[0].resync_reason.as_deref(),
            Some("image-modified")
        );
        drop(control);
        assert_eq!(shim.join().unwrap(), ["freeze disks=vda whole=vda"]);
    }
}
