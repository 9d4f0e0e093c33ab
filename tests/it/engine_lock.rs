//! One engine per `state_dir`, with real processes: while `ferry source` runs, a second
//! `ferry source` and a `ferry sync` on the same config are refused at once, naming the
//! running one by pid — between its epochs too, not only during one. Once it stops,
//! both work again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::shim::ShimProc;
use crate::common::*;

/// Bound on anything the test waits for; only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(60);

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(ferry_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .env("FERRY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn ferry")
}

/// Runs `ferry ARGS --config CONFIG` to completion, failing the test if it takes
/// longer than PATIENCE (a second engine that runs instead of being refused).
fn run(args: &[&str], config: &Path) -> Output {
    let mut child = Command::new(ferry_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "`ferry {}` was not refused: it ran for {} s: {}",
                args.join(" "),
                PATIENCE.as_secs(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: {}", context());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_engine_on_one_state_dir_is_refused_naming_the_running_one() {
    let dir = scratch_dir();
    let d = dir.path();
    let key = d.join("ferry.key");
    keygen(&key);
    let image = d.join("vm1.img");
    let mut rng = Rng::new(test_seed("engine_lock"));
    make_mixed_image(&image, 4 << 20, &mut rng);
    let replica = d.join("vm1.replica");
    let target = TargetProc::start(d, &key, &[("vm1", &replica)], "");
    let state: PathBuf = d.join("source-state");
    // One epoch a minute: the second engines below arrive between epochs, when the
    // old per-epoch lock was free.
    let config = d.join("source.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\ntarget = \"127.0.0.1:{}\"\npsk_file = {}\nstate_dir = {}\nepoch_interval_ms = 60000\n\n[[disk]]\nname = \"vm1\"\npath = {}\nnbd_socket = {}\n",
            target.port,
            toml_path(&key),
            toml_path(&state),
            toml_path(&image),
            toml_path(&d.join("vm1.sock")),
        ),
    )
    .unwrap();
    let _shim = ShimProc::start(&config, &state);

    let source_log = d.join("source.log");
    let mut first = Kill(spawn(&["source"], &config, &source_log));
    let pid = first.0.id();
    let log = || std::fs::read_to_string(&source_log).unwrap_or_default();
    wait_for(
        "first epoch of the running source",
        || log().contains("epoch durable"),
        log,
    );

    let second = run(&["source"], &config);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("ferry source (pid {pid})")),
        "the refusal names the running engine: {stderr}"
    );

    let sync = run(&["sync"], &config);
    let stderr = String::from_utf8_lossy(&sync.stderr);
    assert!(
        !sync.status.success(),
        "a ferry sync ran beside ferry source: {stderr}"
    );
    assert!(
        stderr.contains(&format!("ferry source (pid {pid})")),
        "{stderr}"
    );
    assert!(first.0.try_wait().unwrap().is_none(), "{}", log());
    assert_eq!(
        log().matches("epoch durable").count(),
        1,
        "no other epoch ran: {}",
        log()
    );

    // Stopped, it lets others in.
    // SAFETY: kill(2) with the pid of our own child, which has not been reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = first.0.wait().unwrap();
    assert!(status.success(), "{}", log());
    let sync = run(&["sync"], &config);
    assert!(
        sync.status.success(),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );
    assert_same_file(&image, &replica);
}
