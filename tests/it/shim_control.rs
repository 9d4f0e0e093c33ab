//! The shim's control socket as a local security boundary, against a real `ferry shim`:
//! a request line is bounded however it arrives, the socket and `state_dir` are the
//! shim user's alone whatever the umask, and an epoch frozen by a connection that then
//! goes silent is aborted after `freeze_idle_timeout_ms`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::shim::{ShimOptions, ShimProc};
use crate::common::*;

/// How long a test waits for something that should happen in well under a second.
const PATIENCE: Duration = Duration::from_secs(30);

/// A running shim and the scratch directory it works in (dropped after the process).
struct Shim {
    proc: ShimProc,
    dir: tempfile::TempDir,
    state: PathBuf,
}

/// A source config for one 4 MiB disk, with `extra` in `[source]`, its key made if
/// missing; the target is `127.0.0.1:9` (the shim does not use it).
fn config(dir: &Path, state: &Path, extra: &str) -> PathBuf {
    config_to(dir, state, "127.0.0.1:9", extra)
}

fn config_to(dir: &Path, state: &Path, target: &str, extra: &str) -> PathBuf {
    let key = dir.join("ferry.key");
    if !key.exists() {
        keygen(&key);
    }
    let image = dir.join("vm1.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let toml = format!(
        "[source]\ntarget = \"{target}\"\npsk_file = {}\nstate_dir = {}\n{extra}\n\n[[disk]]\nname = \"vm1\"\npath = {}\nnbd_socket = {}\n",
        toml_path(&key),
        toml_path(state),
        toml_path(&image),
        toml_path(&dir.join("vm1.sock")),
    );
    let path = dir.join("source.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// `ferry shim --config` under `umask`; `Err((status, log))` if it exits before it serves.
fn try_start(
    config: &Path,
    state: &Path,
    umask: libc::mode_t,
) -> Result<ShimProc, (std::process::ExitStatus, String)> {
    let options = ShimOptions {
        umask: Some(umask),
        ..ShimOptions::default()
    };
    ShimProc::start_with(config, state, &options)
}

/// Starts a shim whose state_dir is `<dir>/state` and waits for its control socket.
fn start(extra: &str, umask: libc::mode_t) -> Shim {
    let dir = scratch_dir();
    let state = dir.path().join("state");
    start_in(dir, state, extra, umask)
}

fn start_in(dir: tempfile::TempDir, state: PathBuf, extra: &str, umask: libc::mode_t) -> Shim {
    let config = config(dir.path(), &state, extra);
    start_with(dir, state, &config, umask)
}

fn start_with(dir: tempfile::TempDir, state: PathBuf, config: &Path, umask: libc::mode_t) -> Shim {
    let proc = try_start(config, &state, umask)
        .unwrap_or_else(|(status, log)| panic!("shim exited with {status}: {log}"));
    Shim { proc, dir, state }
}

impl Shim {
    fn connect(&self) -> (UnixStream, BufReader<UnixStream>) {
        let s = UnixStream::connect(self.state.join("shim.ctl")).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        (s, r)
    }

    fn request(&self, line: &str) -> serde_json::Value {
        let (mut s, mut r) = self.connect();
        ask(&mut s, &mut r, line)
    }

    fn log(&self) -> String {
        self.proc.log()
    }
}

fn ask(s: &mut UnixStream, r: &mut BufReader<UnixStream>, line: &str) -> serde_json::Value {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Reads until the shim closes the connection; panics if it does not within PATIENCE.
fn assert_closed(r: &mut BufReader<UnixStream>) {
    let mut rest = Vec::new();
    match r.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "unexpected data: {rest:?}"),
        Err(e) => panic!("the shim did not close the connection: {e}"),
    }
}

/// The shim's bound on a request line, in bytes (newline included).
const MAX_LINE_BYTES: usize = 64 << 10;

/// A line over the limit sent in pieces, each arriving after the shim's read timed out,
/// is refused as too long (not answered as one huge request), and the connection is
/// closed. A line at the limit is still served.
#[test]
fn a_request_line_is_bounded_across_reads() {
    let shim = start("", 0o022);

    let (mut s, mut r) = shim.connect();
    // The shim's reads time out every 200 ms: a longer pause ends a read, and the old
    // bound (4,096 bytes) applied per read. Pieces of 1,000 bytes stay under that even
    // when a loaded machine delivers four at once; three pieces and a pause per second
    // keep the test short.
    let piece = vec![b'x'; 1000];
    let mut sent = 0;
    while sent < MAX_LINE_BYTES + 4000 {
        if s.write_all(&piece).is_err() {
            break; // closed early: also a refusal, checked below
        }
        sent += piece.len();
        std::thread::sleep(Duration::from_millis(if sent % 3000 == 0 {
            300
        } else {
            5
        }));
    }
    let _ = s.write_all(b"\n");
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["ok"], false, "{reply}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("too long") && error.contains(&MAX_LINE_BYTES.to_string()),
        "the error names the limit: {error}"
    );
    assert_closed(&mut r);
    // The shim still serves others, a line at the limit included.
    let padded = format!("status{}", " ".repeat(MAX_LINE_BYTES - "status\n".len()));
    assert_eq!(shim.request(&padded)["ok"], true);
}

/// With umask 0 the shim still creates `state_dir` 0700 and its control socket 0600.
#[test]
fn state_dir_and_control_socket_are_private_whatever_the_umask() {
    let shim = start("", 0);
    assert_eq!(mode(&shim.state), 0o700, "state_dir");
    assert_eq!(mode(&shim.state.join("shim.ctl")), 0o600, "control socket");
}

/// An existing state_dir others can read is tightened to 0700 (logged); one others can
/// write is refused, naming it.
#[test]
fn an_open_existing_state_dir_is_tightened_and_a_writable_one_refused() {
    let dir = scratch_dir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let shim = start_in(dir, state, "", 0o022);
    assert_eq!(mode(&shim.state), 0o700);
    assert!(shim.log().contains("mode is now 0700"), "{}", shim.log());
    drop(shim);

    let dir = scratch_dir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let config = config(dir.path(), &state, "");
    let Err((status, log)) = try_start(&config, &state, 0o022) else {
        panic!("a shim with a world-writable state_dir ran");
    };
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&state.display().to_string()) && log.contains("other users can write it"),
        "{log}"
    );
    assert!(!state.join("shim.ctl").exists());
}

/// An epoch whose connection goes silent is aborted after `freeze_idle_timeout_ms`:
/// the connection hears why and is closed, the epoch's blocks are dirty again, and the
/// shim logs it. A connection that keeps asking keeps its epoch.
#[test]
fn an_idle_frozen_epoch_is_aborted_after_the_configured_bound() {
    let shim = start("freeze_idle_timeout_ms = 1500", 0o022);
    let mut nbd = common::nbd::connect_retry(&shim.dir.path().join("vm1.sock"), "vm1", PATIENCE)
        .expect("NBD connection to the shim");
    nbd.write(0, &[7u8; 65536]).unwrap();
    let dirty = shim.request("status")["disks"][0]["dirty_blocks"]
        .as_u64()
        .unwrap();
    assert!(dirty > 0);

    // Kept alive: `check` every 300 ms for 3 s, twice the bound.
    let (mut s, mut r) = shim.connect();
    let frozen = ask(&mut s, &mut r, "freeze");
    assert_eq!(frozen["ok"], true, "{frozen}");
    assert_eq!(frozen["idle_timeout_ms"], 1500, "{frozen}");
    let id = frozen["epoch"].as_str().unwrap().to_string();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(300));
        let v = ask(&mut s, &mut r, &format!("check {id}"));
        assert_eq!(v["ok"], true, "a busy connection lost its epoch: {v}");
    }
    assert_eq!(ask(&mut s, &mut r, &format!("abort {id}"))["ok"], true);

    // Silent: aborted once the bound passes, counted from the freeze at the earliest.
    let asked = Instant::now();
    let frozen = ask(&mut s, &mut r, "freeze");
    assert_eq!(frozen["ok"], true, "{frozen}");
    let id = frozen["epoch"].as_str().unwrap().to_string();
    let status = shim.request("status");
    assert_eq!(status["epoch"]["id"], id.as_str());
    assert_eq!(status["disks"][0]["dirty_blocks"], 0);
    let mut reply = String::new();
    r.read_line(&mut reply)
        .unwrap_or_else(|e| panic!("no word from the shim about the idle epoch: {e}"));
    assert!(asked.elapsed() >= Duration::from_millis(1500));
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["ok"], false, "{reply}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains(&id) && error.contains("aborted") && error.contains("1500"),
        "{error}"
    );
    assert_closed(&mut r);
    let status = shim.request("status");
    assert!(status["epoch"].is_null(), "{status}");
    assert_eq!(status["disks"][0]["dirty_blocks"].as_u64().unwrap(), dirty);
    assert!(shim.log().contains("sent no request for"), "{}", shim.log());
}

/// A real engine whose epoch outlasts the idle bound keeps it: `ferry sync`, stalled
/// (failpoint) for twice `freeze_idle_timeout_ms` after its last block, still commits,
/// because it sends `check` every quarter of the bound (500 ms, leaving 1.5 s of
/// slack to a loaded machine).
#[test]
fn an_engine_slower_than_the_idle_bound_keeps_its_epoch() {
    let dir = scratch_dir();
    let d = dir.path().to_path_buf();
    let state = d.join("state");
    let image = d.join("vm1.img");
    let replica = d.join("vm1.replica");
    let key = d.join("ferry.key");
    keygen(&key);
    let target = TargetProc::start(&d, &key, &[("vm1", &replica)], "");
    let config = config_to(
        &d,
        &state,
        &format!("127.0.0.1:{}", target.port),
        "freeze_idle_timeout_ms = 2000",
    );
    let shim = start_with(dir, state, &config, 0o022);
    let mut nbd = common::nbd::connect_retry(&shim.dir.path().join("vm1.sock"), "vm1", PATIENCE)
        .expect("NBD connection to the shim");
    nbd.write(4096, &[9u8; 8192]).unwrap();
    nbd.flush().unwrap();

    let mut cmd = Command::new(ferry_bin());
    cmd.args(["sync", "--json", "--config"])
        .arg(&config)
        .env("FERRY_FAILPOINTS", "engine-stall-before-check")
        .env("NO_COLOR", "1");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\nshim: {}", shim.log());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["seconds"].as_f64().unwrap() >= 4.0, "{report}");
    assert!(!shim.log().contains("sent no request"), "{}", shim.log());
    drop(nbd);
    assert_same_file(&image, &replica);
}
