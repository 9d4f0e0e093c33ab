//! A forced engine that cannot work fails at start, with the likely fix; `auto` falls
//! back. The failure is real, not injected: `ferry target` runs with a 64 KiB
//! RLIMIT_MEMLOCK, and without CAP_IPC_LOCK (dropped from the bounding set before
//! exec when the test runs as root, where the limit would not bind), so the kernel
//! refuses to pin a session's registered buffers with ENOMEM.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const PATIENCE: Duration = Duration::from_secs(30);
/// Far below one session's registered buffers (about 4 MiB at the default batch).
const MEMLOCK_BYTES: libc::rlim_t = 64 << 10;
/// CAP_IPC_LOCK in linux/capability.h: exempts a process from RLIMIT_MEMLOCK.
const CAP_IPC_LOCK: libc::c_ulong = 14;

/// `ferry target --config CONFIG` with locked memory limited and CAP_IPC_LOCK gone.
fn spawn_limited_target(config: &Path) -> Child {
    spawn_limited("target", config)
}

/// `ferry COMMAND --config CONFIG` with locked memory limited and CAP_IPC_LOCK gone.
fn spawn_limited(command: &str, config: &Path) -> Child {
    let mut cmd = Command::new(ferry_bin());
    cmd.args([command, "--config"])
        .arg(config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe system calls (setrlimit, geteuid, prctl) run
    // between fork and exec, on the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: MEMLOCK_BYTES,
                rlim_max: MEMLOCK_BYTES,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Root keeps every capability in the bounding set across exec; dropping
            // CAP_IPC_LOCK there makes the limit bind. Unprivileged, there is none to drop.
            if libc::geteuid() == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawn ferry target")
}

fn config(dir: &Path, key: &Path, port: u16, engine: &str, replica: &Path) -> std::path::PathBuf {
    let path = dir.join(format!("target-{engine}.toml"));
    std::fs::write(
        &path,
        target_toml(
            port,
            key,
            &dir.join(format!("target-state-{engine}")),
            &[("vm1", replica)],
            &format!("io_engine = \"{engine}\""),
        ),
    )
    .unwrap();
    path
}

#[test]
fn forced_uring_that_cannot_register_buffers_fails_at_start_and_auto_falls_back() {
    let dir = scratch_dir();
    let d = dir.path();
    let key = d.join("ferry.key");
    keygen(&key);
    let replica = d.join("vm1.replica");

    // io_engine = "uring": refused before listening, naming the limit to raise.
    let port = free_port();
    let child = spawn_limited_target(&config(d, &key, port, "uring", &replica));
    let (status, stderr) = exit_of(child, "ferry target");
    assert!(!status.success(), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(
        stderr.contains("io_engine = \"uring\" cannot work here")
            && stderr.contains("ENOMEM")
            && stderr.contains("ulimit -l"),
        "the error names the engine, the errno and the fix: {stderr}"
    );

    // io_engine = "auto" under the same limit: starts, warns, and sessions work on the
    // synchronous engine.
    let port = free_port();
    let mut child = spawn_limited_target(&config(d, &key, port, "auto", &replica));
    let stderr = drain(child.stderr.take().unwrap());
    let _guard = KillOnDrop(child);
    let log = || String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "auto did not start: {}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(log().contains("synchronous engine"), "{}", log());
    let image = d.join("vm1.img");
    make_mixed_image(&image, 2 << 20, &mut Rng::new(test_seed("probe_auto")));
    let source = d.join("source.toml");
    std::fs::write(
        &source,
        source_toml(port, &key, &d.join("source-state"), &[("vm1", &image)], ""),
    )
    .unwrap();
    sync_ok(&source, &[]);
    assert_same_file(&image, &replica);
}

/// Waits for `child` to exit (failing the test if it keeps running) and returns its
/// status and stderr.
fn exit_of(mut child: Child, what: &str) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} with an unusable io_uring engine kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

/// `ferry source` with `io_engine = "uring"` that cannot register its read buffers
/// exits at once with the fix, instead of failing the same way every round.
#[test]
fn forced_uring_source_that_cannot_register_buffers_fails_at_start() {
    let dir = scratch_dir();
    let d = dir.path();
    let key = d.join("ferry.key");
    keygen(&key);
    let image = d.join("vm1.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let config = d.join("source.toml");
    std::fs::write(
        &config,
        source_toml(
            free_port(),
            &key,
            &d.join("source-state"),
            &[("vm1", &image)],
            "io_engine = \"uring\"",
        ),
    )
    .unwrap();
    let (status, stderr) = exit_of(spawn_limited("source", &config), "ferry source");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("io_engine = \"uring\" cannot work here")
            && stderr.contains("ENOMEM")
            && stderr.contains("ulimit -l"),
        "{stderr}"
    );
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
