//! The shim's control socket: a line protocol the engine (and operators, with
//! `socat - UNIX-CONNECT:<state_dir>/shim.ctl`) use to ask the shim things.
//!
//! Each request is one line of ASCII; each reply is one line of JSON with `"ok"`.
//! A client may send several requests on one connection.
//!
//! | request  | reply |
//! |----------|-------|
//! | `status` | `{"ok":true,"disks":[{"name","generation_id","block_size","block_count","dirty_blocks","resync_required","resync_reason","bitmap_syncs","marks_waited","tracking_failed","connections"}]}` |
//! | other    | `{"ok":false,"error":"unknown command `…`"}` |
//!
//! `resync_required` true means tracking could not be trusted (see
//! `tracker::ResyncReason`): the consumer must run a checksum-compare (seeded) sync of
//! that disk. Epoch commands (freeze / commit / abort) come with the epoch work.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::shim::{DiskStatus, ServedDisk};

/// A control client that sends nothing for this long is dropped, so a stuck client
/// cannot hold the (single) control thread.
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line accepted.
const MAX_LINE_BYTES: u64 = 4096;
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// JSON of one disk's status.
pub fn disk_status_json(s: &DiskStatus) -> Value {
    let t = &s.tracker;
    json!({
        "name": s.name,
        "generation_id": t.generation_id.to_string(),
        "block_size": t.block_size,
        "block_count": t.block_count,
        "dirty_blocks": t.dirty_blocks,
        "resync_required": t.resync_required.is_some(),
        "resync_reason": t.resync_required.map(|r| r.as_str()),
        "bitmap_syncs": t.bitmap_syncs,
        "marks_waited": t.marks_waited,
        "tracking_failed": t.failed,
        "connections": s.connections,
    })
}

/// Answers one request line.
pub(crate) fn answer(line: &str, disks: &[Arc<ServedDisk>]) -> Value {
    match line.trim() {
        "status" => json!({
            "ok": true,
            "disks": disks.iter().map(|d| disk_status_json(&d.status())).collect::<Vec<_>>(),
        }),
        other => json!({"ok": false, "error": format!("unknown command `{other}`")}),
    }
}

fn handle(stream: UnixStream, disks: &[Arc<ServedDisk>]) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_LINE_BYTES).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let mut reply = answer(&line, disks).to_string();
        reply.push('\n');
        writer.write_all(reply.as_bytes())?;
    }
}

pub(crate) fn serve(
    listener: UnixListener,
    disks: Arc<Vec<Arc<ServedDisk>>>,
    stop: Arc<AtomicBool>,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(error = %e, "control socket unusable");
        return;
    }
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if let Err(e) = handle(stream, &disks) {
                    tracing::debug!(error = %e, "control client ended with an error");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}
