//! Helpers shared by the integration tests: real `ferry` processes on loopback TCP,
//! scratch disk images, byte comparison of replicas, seeded randomness (`rng`); the
//! shim as a process (`shim`), the live rig with its stamping guest (`rig`), the
//! fault-injecting proxy (`proxy`) and the independent NBD client (`nbd`).
//!
//! Every test builds its own key, configs, target process and images in its own
//! scratch directory (on /dev/shm when there is one), so tests run in parallel and
//! never share a port, a replica or a state directory. Tests that mount a file system
//! take [`exclusive_mounts`].

pub mod nbd;
pub mod proxy;
pub mod rig;
mod rng;
pub mod shim;
pub mod sites;
pub mod vm;

pub use rng::{test_seed, Rng};

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use filter_driver_shim_contract::bitmap::{ChangedBlockBitmap, GenerationId};

/// The replication block the tests assume unless they configure another.
pub const BLOCK: u64 = 64 << 10;

/// How long one `ferry sync` may take before the test gives up on it. Generous: the
/// machines are shared; it only turns a hang into a failure.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(180);

/// The `ferry` binary under test.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// `FERRY_SOAK=1` turns on the long variants.
pub fn soak() -> bool {
    std::env::var("FERRY_SOAK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Serialises the tests that mount a file system (tmpfs, FUSE, nbdfuse) within this
/// binary; each holds the guard for its whole run. A new mount takes the lowest free
/// anonymous device number, and the power-loss test must get its mount's number back
/// when it remounts after a cut (the shim keys an image on device and inode): a tmpfs
/// or FUSE mount of another test made in between would take it. Processes outside this
/// binary can still do that; `PowerFailFs::restore` retries for a while.
pub fn exclusive_mounts() -> std::sync::MutexGuard<'static, ()> {
    static MOUNTS: Mutex<()> = Mutex::new(());
    // A test that panicked while holding it left no mount behind (its guards unmount).
    MOUNTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A scratch directory on tmpfs when there is one (disk images are cheap there).
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("ferry-test-")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir()
        .expect("create a temporary directory")
}

// ---------------------------------------------------------------------------------
// Keys and configs.

/// Runs `ferry keygen` and stores the key at `path` with mode 0600. Returns the key
/// bytes (for hand-made protocol clients).
pub fn keygen(path: &Path) -> [u8; 32] {
    let out = Command::new(ferry_bin())
        .arg("keygen")
        .output()
        .expect("run ferry keygen");
    assert!(
        out.status.success(),
        "ferry keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create key file");
    f.write_all(&out.stdout).unwrap();
    parse_key(&out.stdout)
}

/// Parses `ferry-psk-v1:<64 hex>`.
pub fn parse_key(file: &[u8]) -> [u8; 32] {
    let text = std::str::from_utf8(file).expect("key file is text");
    let hex = text
        .trim_end()
        .strip_prefix("ferry-psk-v1:")
        .unwrap_or_else(|| panic!("unexpected key file format: {text:?}"));
    assert_eq!(hex.len(), 64, "key length");
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    key
}

/// A TOML basic string for a path (paths here are plain ASCII temp paths).
pub fn toml_path(p: &Path) -> String {
    let s = p.to_str().expect("utf-8 path");
    assert!(!s.contains(['"', '\\']), "path needs escaping: {s}");
    format!("\"{s}\"")
}

/// `[[disk]]` entries for `(name, path)` pairs.
pub fn disk_entries(disks: &[(&str, &Path)]) -> String {
    let mut s = String::new();
    for (name, path) in disks {
        s.push_str(&format!(
            "\n[[disk]]\nname = \"{name}\"\npath = {}\n",
            toml_path(path)
        ));
    }
    s
}

pub fn target_toml(
    port: u16,
    key: &Path,
    state: &Path,
    disks: &[(&str, &Path)],
    extra: &str,
) -> String {
    format!(
        "[target]\nlisten = \"127.0.0.1:{port}\"\npsk_file = {}\nstate_dir = {}\nio_timeout_ms = 20000\n{extra}\n{}",
        toml_path(key),
        toml_path(state),
        disk_entries(disks)
    )
}

pub fn source_toml(
    port: u16,
    key: &Path,
    state: &Path,
    disks: &[(&str, &Path)],
    extra: &str,
) -> String {
    format!(
        "[source]\ntarget = \"127.0.0.1:{port}\"\npsk_file = {}\nstate_dir = {}\nio_timeout_ms = 20000\n{extra}\n{}",
        toml_path(key),
        toml_path(state),
        disk_entries(disks)
    )
}

/// A port that was free a moment ago. The caller retries if it is taken by the time
/// the target binds it.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------
// Processes.

/// Collects a child's stream on a thread so the child never blocks on a full pipe.
pub fn drain(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    buf
}

/// A running `ferry target`; killed when dropped.
pub struct TargetProc {
    child: Child,
    pub port: u16,
    pub config: PathBuf,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl TargetProc {
    /// Spawns `ferry target --config <config>` and waits until `port` accepts.
    /// `Err(stderr)` if the process exits first.
    pub fn spawn(config: &Path, port: u16) -> Result<TargetProc, String> {
        TargetProc::spawn_env(config, port, &[])
    }

    /// As [`TargetProc::spawn`], with extra environment (e.g. `FERRY_FAILPOINTS`).
    pub fn spawn_env(config: &Path, port: u16, env: &[(&str, &str)]) -> Result<TargetProc, String> {
        let mut child = Command::new(ferry_bin())
            .arg("target")
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .env("FERRY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry target");
        let stderr = drain(child.stderr.take().unwrap());
        let mut t = TargetProc {
            child,
            port,
            config: config.to_path_buf(),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = t.child.try_wait().unwrap() {
                // Give the drain thread a moment to collect the last words.
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!("ferry target exited with {status}: {}", t.stderr()));
            }
            // Our own process says it listens (a connect could reach another test's
            // target that took the same free port first).
            if t.stderr()
                .contains(&format!("listening on 127.0.0.1:{port}"))
            {
                return Ok(t);
            }
            if Instant::now() > deadline {
                panic!(
                    "ferry target did not listen on port {port} within 20 s: {}",
                    t.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes a target config for `disks` into `dir` and starts a target on a free
    /// port, retrying with another port if the chosen one was taken meanwhile.
    pub fn start(dir: &Path, key: &Path, disks: &[(&str, &Path)], extra: &str) -> TargetProc {
        let state = dir.join("target-state");
        TargetProc::start_with(&dir.join("target.toml"), &[], |port| {
            target_toml(port, key, &state, disks, extra)
        })
    }

    /// Writes `config_for(port)` to `config` for a free port and starts a target on it
    /// with extra environment `env`, retrying with another port if the chosen one was
    /// taken meanwhile.
    pub fn start_with(
        config: &Path,
        env: &[(&str, &str)],
        config_for: impl Fn(u16) -> String,
    ) -> TargetProc {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            std::fs::write(config, config_for(port)).unwrap();
            match TargetProc::spawn_env(config, port, env) {
                Ok(t) => return t,
                Err(e) if e.contains("in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free port for the target after 5 attempts: {last}");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the target logged so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Panics unless the process is still running.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("ferry target died ({status}): {}", self.stderr());
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Peak resident memory of the target process so far (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        vm_hwm_kib(self.pid()).expect("VmHWM in /proc/<pid>/status of a running target")
    }

    /// Kills the process and waits for it (a crash, as far as the target can tell).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TargetProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The outcome of one `ferry` command.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Peak resident memory of the process, as its own `VmHWM` last read before it
    /// exited (see [`run_ferry`]).
    pub max_rss_kib: u64,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The `--json` object printed on stdout.
    pub fn json(&self) -> serde_json::Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON object on stdout: {self:?}"));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }
}

/// Runs `ferry <args>` to completion, killing it after `timeout`.
///
/// The peak memory is the child's `VmHWM`, read from /proc every few milliseconds
/// while it runs: `wait4`'s `ru_maxrss` would also count the memory of this test
/// process, which the child shares between fork and exec and which the kernel carries
/// over into the child's maximum at exec. With every test in one process that is
/// hundreds of MiB. A peak reached in the child's last milliseconds can be missed; the
/// data path allocates its buffers at start.
// The child is reaped by wait4 (which clippy does not see), or by `wait` on timeout.
#[allow(clippy::zombie_processes)]
pub fn run_ferry(args: &[&std::ffi::OsStr], timeout: Duration) -> Run {
    let mut child = Command::new(ferry_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let pid = child.id() as libc::pid_t;
    let mut max_rss_kib = 0;
    let status = loop {
        // Before the wait: once reaped, the pid may name another process.
        if let Some(kib) = vm_hwm_kib(child.id()) {
            max_rss_kib = max_rss_kib.max(kib);
        }
        let mut raw = 0;
        // SAFETY: `raw` is a live local for the duration of the call; no rusage wanted.
        let rc = unsafe { libc::wait4(pid, &mut raw, libc::WNOHANG, std::ptr::null_mut()) };
        if rc == pid {
            use std::os::unix::process::ExitStatusExt;
            break ExitStatus::from_raw(raw);
        }
        assert!(rc == 0, "wait4: {}", std::io::Error::last_os_error());
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`ferry {:?}` did not finish within {timeout:?}; stderr so far: {}",
                args,
                String::from_utf8_lossy(&err.lock().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The pipes close when the child exits; wait for the drain threads to see EOF.
    let settle = Instant::now() + Duration::from_secs(5);
    let take = |b: &Arc<Mutex<Vec<u8>>>| {
        while Arc::strong_count(b) > 1 && Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(2));
        }
        String::from_utf8_lossy(&b.lock().unwrap()).into_owned()
    };
    Run {
        stdout: take(&out),
        stderr: take(&err),
        status,
        max_rss_kib,
    }
}

/// `VmHWM` of a live process (`None` once it has exited: a zombie has no memory).
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `ferry <args>` with `env`, to completion: (exit status, stdout, stderr).
pub fn ferry_status(
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    let out = std::process::Command::new(ferry_bin())
        .args(args)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .output()
        .expect("run ferry");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `ferry <args>` `times` times, each killed with SIGKILL after a random wait
/// of up to `max_wait`; `after` runs after each kill.
pub fn kill_at_random(
    args: &[&std::ffi::OsStr],
    times: usize,
    max_wait: Duration,
    rng: &mut Rng,
    mut after: impl FnMut(),
) {
    for _ in 0..times {
        let mut child = std::process::Command::new(ferry_bin())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ferry");
        std::thread::sleep(Duration::from_micros(
            rng.below(max_wait.as_micros() as u64),
        ));
        let _ = child.kill();
        let _ = child.wait();
        after();
    }
}

/// `ferry sync --config <config> --json <extra...>`.
pub fn sync(config: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "sync".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--json".as_ref(),
    ];
    args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
    run_ferry(&args, SYNC_TIMEOUT)
}

/// Like [`sync`] but insists on success and returns the JSON report.
pub fn sync_ok(config: &Path, extra: &[&str]) -> serde_json::Value {
    let run = sync(config, extra);
    assert!(
        run.success(),
        "ferry sync {extra:?} failed ({}):\nstdout: {}\nstderr: {}",
        run.status,
        run.stdout,
        run.stderr
    );
    run.json()
}

/// The sync mode the report gives for `disk`.
pub fn mode_of<'a>(report: &'a serde_json::Value, disk: &str) -> &'a str {
    report["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("no disks[] in {report}"))
        .iter()
        .find(|d| d["name"] == disk)
        .unwrap_or_else(|| panic!("disk {disk} missing from {report}"))["mode"]
        .as_str()
        .unwrap_or_else(|| panic!("disk {disk} has no mode in {report}"))
}

pub fn u64_field(report: &serde_json::Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` missing or not an unsigned integer in {report}"))
}

// ---------------------------------------------------------------------------------
// A source host and a target process on loopback.

/// One disk of a [`Pair`]: its name, the source image and the replica path.
#[derive(Debug, Clone)]
pub struct PairDisk {
    pub name: String,
    pub source: PathBuf,
    pub replica: PathBuf,
}

impl PairDisk {
    pub fn new(dir: &Path, name: &str) -> PairDisk {
        PairDisk {
            name: name.to_string(),
            source: dir.join(format!("{name}.img")),
            replica: dir.join(format!("{name}.replica")),
        }
    }
}

/// A key, a running target and a source config, all in one scratch directory.
/// Field order matters: the target is killed before the directory is removed.
pub struct Pair {
    pub target: TargetProc,
    pub key: PathBuf,
    pub psk: [u8; 32],
    pub source_config: PathBuf,
    pub source_state: PathBuf,
    pub target_state: PathBuf,
    pub disks: Vec<PairDisk>,
    pub dir: tempfile::TempDir,
}

impl Pair {
    /// Starts a target for `disks` (their images need not exist yet).
    pub fn start(
        dir: tempfile::TempDir,
        disks: Vec<PairDisk>,
        source_extra: &str,
        target_extra: &str,
    ) -> Pair {
        let key = dir.path().join("ferry.key");
        let psk = keygen(&key);
        let target_disks: Vec<(&str, &Path)> = disks
            .iter()
            .map(|d| (d.name.as_str(), d.replica.as_path()))
            .collect();
        let target = TargetProc::start(dir.path(), &key, &target_disks, target_extra);
        let source_state = dir.path().join("source-state");
        let source_disks: Vec<(&str, &Path)> = disks
            .iter()
            .map(|d| (d.name.as_str(), d.source.as_path()))
            .collect();
        let source_config = dir.path().join("source.toml");
        std::fs::write(
            &source_config,
            source_toml(
                target.port,
                &key,
                &source_state,
                &source_disks,
                source_extra,
            ),
        )
        .unwrap();
        Pair {
            target_state: dir.path().join("target-state"),
            target,
            key,
            psk,
            source_config,
            source_state,
            disks,
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn sync(&self, extra: &[&str]) -> Run {
        sync(&self.source_config, extra)
    }

    pub fn sync_ok(&self, extra: &[&str]) -> serde_json::Value {
        sync_ok(&self.source_config, extra)
    }

    /// Every replica equals its source, byte for byte.
    pub fn assert_replicas_identical(&self) {
        for d in &self.disks {
            assert_same_file(&d.source, &d.replica);
        }
    }
}

// ---------------------------------------------------------------------------------
// Images.

/// Creates (or truncates) a file of `size` bytes that is one hole.
pub fn create_sparse(path: &Path, size: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    f
}

/// Deallocates a byte range: it reads back as zeros and is a hole for SEEK_DATA.
pub fn punch_hole(f: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on a descriptor owned by `f`, which outlives the call.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
}

pub fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// Text-like, compressible content.
pub fn fill_text(buf: &mut [u8], salt: u64) {
    const WORDS: &[u8] = b"ferry replicates the disks of virtual machines block by block ";
    for (i, b) in buf.iter_mut().enumerate() {
        *b = WORDS[(i + salt as usize) % WORDS.len()];
    }
}

/// A realistic mix per 64 KiB block: holes, random data, text, written zeros (an
/// allocated block of zeros), and blocks with a little data in a hole. The last bytes
/// of the disk always hold data.
pub fn make_mixed_image(path: &Path, size: u64, rng: &mut Rng) {
    let f = create_sparse(path, size);
    let mut block = vec![0u8; BLOCK as usize];
    let mut off = 0u64;
    while off < size {
        let len = BLOCK.min(size - off) as usize;
        let buf = &mut block[..len];
        match rng.below(10) {
            0..=2 => {} // hole
            3..=5 => {
                rng.fill(buf);
                f.write_all_at(buf, off).unwrap();
            }
            6 | 7 => {
                fill_text(buf, off);
                f.write_all_at(buf, off).unwrap();
            }
            8 => {
                buf.fill(0);
                f.write_all_at(buf, off).unwrap();
            }
            _ => {
                let at = rng.below(len as u64);
                let n = 1 + rng.below(len as u64 - at).min(999);
                let mut bytes = vec![0u8; n as usize];
                rng.fill(&mut bytes);
                bytes[0] = rng.nonzero_byte();
                f.write_all_at(&bytes, off + at).unwrap();
            }
        }
        off += len as u64;
    }
    let tail = b"the last bytes of the disk";
    let n = (tail.len() as u64).min(size) as usize;
    f.write_all_at(&tail[..n], size - n as u64).unwrap();
}

/// Reads `path` block by block and counts blocks holding a non-zero byte.
pub fn nonzero_blocks(path: &Path, block: u64) -> u64 {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut buf = vec![0u8; block as usize];
    let mut count = 0;
    let mut off = 0;
    while off < size {
        let len = block.min(size - off) as usize;
        f.read_exact_at(&mut buf[..len], off).unwrap();
        if buf[..len].iter().any(|&b| b != 0) {
            count += 1;
        }
        off += len as u64;
    }
    count
}

/// XORs `len` bytes at `offset` with non-zero random bytes: every byte changes, so
/// the blocks the range touches are guaranteed to differ from before.
pub fn flip_range(f: &File, offset: u64, len: usize, rng: &mut Rng) {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    for b in buf.iter_mut() {
        *b ^= rng.nonzero_byte();
    }
    f.write_all_at(&buf, offset).unwrap();
}

/// Size of a file or block device.
pub fn size_of(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).unwrap()
}

/// xxh3-128 of the first `len` bytes of a file or device.
pub fn hash_prefix(path: &Path, len: u64) -> u128 {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (buf.len() as u64).min(len - off) as usize;
        f.read_exact_at(&mut buf[..n], off).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.digest128()
}

/// Size and content hash of a file (or `None` if it does not exist).
pub fn fingerprint(path: &Path) -> Option<(u64, u128)> {
    if !path.exists() {
        return None;
    }
    let size = size_of(path);
    Some((size, hash_prefix(path, size)))
}

/// What the target's records say, file by file, for "nothing changed" checks: each
/// file's size and hash, except that a replica record (`<disk>.replica`) counts by
/// its content without the replica's stamp (a rollback restores the replica's bytes
/// but not its modification time, so the writer restamps the record) and checksum.
pub fn target_state_fingerprints(dir: &Path) -> Vec<(PathBuf, Option<(u64, u128)>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let f = if p.extension().is_some_and(|e| e == "replica") {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                let map = v.as_object_mut().expect("a record is a JSON object");
                map.remove("stamp");
                map.remove("xxh3");
                let text = v.to_string();
                Some((
                    text.len() as u64,
                    xxhash_rust::xxh3::xxh3_128(text.as_bytes()),
                ))
            } else {
                fingerprint(&p)
            };
            (p, f)
        })
        .collect()
}

/// Panics, naming the first differing block, unless the first `len` bytes of `a` and
/// `b` are identical.
pub fn assert_same_prefix(a: &Path, b: &Path, len: u64) {
    let fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (ba.len() as u64).min(len - off) as usize;
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap() as u64
                + off;
            panic!(
                "{} and {} differ at byte {i} (block {} of {} bytes): {:#04x} vs {:#04x}",
                a.display(),
                b.display(),
                i / BLOCK,
                BLOCK,
                ba[(i - off) as usize],
                bb[(i - off) as usize]
            );
        }
        off += n as u64;
    }
}

/// Panics unless the two files have the same size and bytes.
pub fn assert_same_file(a: &Path, b: &Path) {
    let (sa, sb) = (size_of(a), size_of(b));
    assert_eq!(
        sa,
        sb,
        "{} is {sa} bytes, {} is {sb} bytes",
        a.display(),
        b.display()
    );
    assert_same_prefix(a, b, sa);
}

/// The data extents of a file as SEEK_DATA/SEEK_HOLE report them.
pub fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a descriptor owned by `f`, which outlives the call.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::ENXIO),
                "SEEK_DATA on {}: {err}",
                path.display()
            );
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole >= data, "SEEK_HOLE on {}", path.display());
        out.push((data as u64, hole as u64 - data as u64));
        pos = hole as u64;
    }
    out
}

/// Compares a huge sparse source with its replica without reading the holes: every
/// source data extent must match, every replica data extent outside the source's data
/// must read as zeros, and random samples all over must agree.
pub fn assert_same_sparse(src: &Path, rep: &Path, rng: &mut Rng) {
    let size = size_of(src);
    assert_eq!(size, size_of(rep), "replica size");
    let fs = File::open(src).unwrap();
    let fr = File::open(rep).unwrap();
    let src_extents = data_extents(src);
    let mut buf_s = vec![0u8; 1 << 20];
    let mut buf_r = vec![0u8; 1 << 20];
    let compare = |off: u64, len: u64, buf_s: &mut [u8], buf_r: &mut [u8]| {
        let mut o = off;
        while o < off + len {
            let n = (buf_s.len() as u64).min(off + len - o) as usize;
            fs.read_exact_at(&mut buf_s[..n], o).unwrap();
            fr.read_exact_at(&mut buf_r[..n], o).unwrap();
            if buf_s[..n] != buf_r[..n] {
                let i = buf_s[..n]
                    .iter()
                    .zip(&buf_r[..n])
                    .position(|(x, y)| x != y)
                    .unwrap() as u64
                    + o;
                panic!("sparse replica differs from the source at byte {i}");
            }
            o += n as u64;
        }
    };
    for &(off, len) in &src_extents {
        compare(off, len, &mut buf_s, &mut buf_r);
    }
    // Whatever the replica holds outside the source's data must be zeros (the source
    // reads zeros there). Bounded, so a fully allocated replica does not take minutes.
    let mut budget: u64 = 512 << 20;
    for (off, len) in data_extents(rep) {
        let end = off + len;
        let mut o = off;
        while o < end && budget > 0 {
            let n = (buf_r.len() as u64).min(end - o).min(budget) as usize;
            fr.read_exact_at(&mut buf_r[..n], o).unwrap();
            fs.read_exact_at(&mut buf_s[..n], o).unwrap();
            if buf_s[..n] != buf_r[..n] {
                let i = buf_s[..n]
                    .iter()
                    .zip(&buf_r[..n])
                    .position(|(x, y)| x != y)
                    .unwrap() as u64
                    + o;
                panic!("sparse replica differs from the source at byte {i} (replica data outside the source's)");
            }
            budget -= n as u64;
            o += n as u64;
        }
    }
    for _ in 0..256 {
        let off = rng.below(size);
        let len = 4096.min(size - off);
        compare(off, len, &mut buf_s, &mut buf_r);
    }
}

// ---------------------------------------------------------------------------------
// Source state and changed-block bitmaps.

/// `(generation, epoch)` from the source's `<state_dir>/<disk>.state`.
pub fn read_source_state(state_dir: &Path, disk: &str) -> ([u8; 16], u64) {
    let path = state_dir.join(format!("{disk}.state"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()));
    let hex = v["generation"]
        .as_str()
        .unwrap_or_else(|| panic!("no generation in {text}"));
    assert_eq!(hex.len(), 32, "generation {hex:?} is not 32 hex digits");
    let mut gen = [0u8; 16];
    for (i, g) in gen.iter_mut().enumerate() {
        *g = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let epoch = v["epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("no epoch in {text}"));
    (gen, epoch)
}

/// Writes a sealed changed-block bitmap marking `blocks`.
pub fn write_bitmap(
    path: &Path,
    disk_size: u64,
    block_size: u32,
    generation: [u8; 16],
    epoch: u64,
    blocks: impl IntoIterator<Item = u64>,
) {
    let mut bm = ChangedBlockBitmap::new(
        disk_size,
        block_size,
        GenerationId::from_bytes(generation),
        epoch,
    )
    .unwrap();
    for b in blocks {
        bm.set(b).unwrap();
    }
    bm.save(path).unwrap();
}

// ---------------------------------------------------------------------------------
// Loop devices.

/// An attached loop device, detached when dropped.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    /// Attaches `file`; `Err(reason)` when loop devices are not usable here.
    pub fn attach(file: &Path) -> Result<LoopDev, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup --find --show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !dev.exists() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
            return Err(format!(
                "losetup attached {} but the device node does not exist",
                dev.display()
            ));
        }
        Ok(LoopDev { dev })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// xxh3-128 of a whole file, to compare replicas with sources and recorded epochs.
pub fn file_hash(p: &Path) -> u128 {
    xxhash_rust::xxh3::xxh3_128(&std::fs::read(p).unwrap())
}

/// Whether the external tool `name` runs here (`name --version` succeeds); when it
/// does not, the caller's test skips through `FERRY_REQUIRE`'s `tools` switch.
pub fn tool_or_skip(name: &str) -> bool {
    let ok = std::process::Command::new(name)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        ferry_io::require::skip(
            ferry_io::require::Feature::Tools,
            format!("{name} is not installed"),
        );
    }
    ok
}
