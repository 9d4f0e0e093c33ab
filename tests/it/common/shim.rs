//! `ferry shim --config` as a child process, the one way the tests start a shim: it is
//! ready once its control socket answers `status`, which it does only after every NBD
//! socket is bound; its log (stderr) goes to a file of its own next to the config; it
//! is killed when dropped.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ferry_bin;

/// How long the shim may take to start serving, or to exit after SIGTERM. Generous:
/// the machines are shared; it only turns a hang into a failure.
pub const SHIM_TIMEOUT: Duration = Duration::from_secs(30);

/// How the shim process is started, beyond its config.
#[derive(Debug, Clone, Default)]
pub struct ShimOptions {
    /// The child's umask (the test process's own when `None`).
    pub umask: Option<libc::mode_t>,
    /// Variables removed from the child's environment (one would override the config).
    pub env_remove: Vec<&'static str>,
}

/// A running `ferry shim --config`; killed when dropped.
pub struct ShimProc {
    child: Child,
    control: PathBuf,
    /// This process's stderr. A file, not a pipe: what the shim logged before it
    /// answered a request is there when the answer arrives (a pipe's reader thread
    /// may not have caught up yet).
    log: PathBuf,
}

/// Sends one control request line and returns the JSON reply.
pub fn control(path: &Path, request: &str) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control reply {line:?}: {e}"),
        )
    })
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl ShimProc {
    /// Starts the shim of `config`, whose `state_dir` is `state_dir`, and waits until
    /// it serves. Panics with its log if it does not.
    pub fn start(config: &Path, state_dir: &Path) -> ShimProc {
        ShimProc::start_with(config, state_dir, &ShimOptions::default())
            .unwrap_or_else(|(status, log)| panic!("ferry shim exited with {status}: {log}"))
    }

    /// As [`ShimProc::start`]; `Err((status, log))` if the shim exits before it serves.
    pub fn start_with(
        config: &Path,
        state_dir: &Path,
        options: &ShimOptions,
    ) -> Result<ShimProc, (ExitStatus, String)> {
        // One log file per process, so that a restarted shim's log is its own.
        static STARTS: AtomicU64 = AtomicU64::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = config.with_file_name(format!("shim-{n}.log"));
        let mut cmd = Command::new(ferry_bin());
        cmd.args(["shim", "--config"])
            .arg(config)
            .env("FERRY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create the shim's log file"));
        for var in &options.env_remove {
            cmd.env_remove(var);
        }
        if let Some(umask) = options.umask {
            // SAFETY: umask(2) is async-signal-safe and touches only the child's own state.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(umask);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn ferry shim");
        let mut shim = ShimProc {
            child,
            control: state_dir.join("shim.ctl"),
            log,
        };
        let deadline = Instant::now() + SHIM_TIMEOUT;
        loop {
            if let Some(status) = shim.child.try_wait().unwrap() {
                return Err((status, shim.log()));
            }
            // A stale control socket from a killed shim refuses until the new one binds.
            if let Ok(v) = control(&shim.control, "status") {
                if v["ok"] == true {
                    return Ok(shim);
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "ferry shim did not answer on {} within {SHIM_TIMEOUT:?}: {}",
                    shim.control.display(),
                    shim.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the shim logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The control socket.
    pub fn control_path(&self) -> &Path {
        &self.control
    }

    /// One control request on a connection of its own; panics (with the log) if the
    /// shim does not answer.
    pub fn request(&self, line: &str) -> serde_json::Value {
        control(&self.control, line)
            .unwrap_or_else(|e| panic!("control request {line:?}: {e}; shim log: {}", self.log()))
    }

    /// The `status` reply.
    pub fn status(&self) -> serde_json::Value {
        self.request("status")
    }

    /// The `status` object of the shim's one disk.
    pub fn disk_status(&self) -> serde_json::Value {
        let v = self.status();
        assert_eq!(v["ok"], true, "{v}");
        let disks = v["disks"].as_array().unwrap_or_else(|| panic!("{v}"));
        assert_eq!(disks.len(), 1, "{v}");
        disks[0].clone()
    }

    /// SIGTERM; the shim must exit 0 within [`SHIM_TIMEOUT`]. Returns its log.
    pub fn stop(mut self) -> String {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let status = wait_timeout(&mut self.child, SHIM_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "ferry shim did not exit within {SHIM_TIMEOUT:?} of SIGTERM: {}",
                self.log()
            )
        });
        assert!(
            status.success(),
            "ferry shim exited with {status} after SIGTERM: {}",
            self.log()
        );
        self.log()
    }

    /// kill -9 and reap. Returns its log.
    pub fn kill9(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.log()
    }
}

impl Drop for ShimProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
