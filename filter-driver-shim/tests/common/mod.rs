//! Shared helpers: run the shim as a separate process, probe for client tools.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Skips the calling test (returns) with a printed reason when `tool` is missing.
#[macro_export]
macro_rules! require_tool {
    ($tool:expr) => {
        if !$crate::common::have_tool($tool) {
            ferry_io::require::skip(
                ferry_io::require::Feature::Tools,
                format!("`{}` is not installed", $tool),
            );
            return;
        }
    };
}

pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A shim process serving one disk named `vm1`.
pub struct ShimProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub state_dir: PathBuf,
    pub image: PathBuf,
}

impl ShimProcess {
    pub fn start(dir: &Path, image: &Path, block_size: u32) -> ShimProcess {
        let socket = dir.join("vm1.sock");
        let control = dir.join("ctl.sock");
        let state_dir = dir.join("state");
        let mut child = Command::new(env!("CARGO_BIN_EXE_filter-driver-shim-test"))
            .arg("--control")
            .arg(&control)
            .arg("--disk")
            .arg(format!(
                "name=vm1,path={},socket={},state_dir={},block_size={block_size}",
                image.display(),
                socket.display(),
                state_dir.display()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn filter-driver-shim-test");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "READY", "shim did not start");
        ShimProcess {
            child,
            socket,
            control,
            state_dir,
            image: image.to_path_buf(),
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///vm1?socket={}", self.socket.display())
    }

    pub fn bitmap_path(&self) -> PathBuf {
        self.state_dir.join("vm1.cbt")
    }

    /// Asks the control socket for status.
    pub fn status(&self) -> serde_json::Value {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        s.write_all(b"status\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// Clean stop (SIGTERM) and wait.
    pub fn stop(mut self) {
        // SAFETY: kill(2) with the pid of our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "shim exited with {status}");
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for ShimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn make_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn client");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Scratch directory on tmpfs when available (fast, and what the benchmarks use).
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

pub fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}
