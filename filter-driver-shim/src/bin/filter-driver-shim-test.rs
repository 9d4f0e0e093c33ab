//! Test harness binary: runs the shim from command-line arguments.
//!
//! ```text
//! filter-driver-shim-test [--control PATH [--freeze-idle-timeout-ms MS]] [--io-engine auto|uring|sync]
//!                 --disk name=N,path=P,socket=S,state_dir=D[,block_size=B] ...
//! ```
//!
//! The engine is `auto` unless `--io-engine` names one; the `FERRY_SHIM_IO_ENGINE`
//! environment variable overrides both (the test suites run once per engine with it).
//!
//! Prints `READY` on stdout once every socket listens; SIGTERM or SIGINT shut it down
//! cleanly. `ferry shim --config FILE` is the product entry point; this exists so that
//! tests can run the shim as a separate process and kill it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use filter_driver_shim::backing::{IoEngine, IoEngineEnvError, UnknownIoEngine};
use filter_driver_shim::control::ControlConfig;
use filter_driver_shim::{Shim, ShimDisk, DEFAULT_BLOCK_SIZE};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Release);
}

/// A command line (or environment) this harness cannot run with; printed with its
/// chain, exit status 2.
#[derive(Debug, thiserror::Error)]
enum ArgError {
    #[error("`{0}` is not key=value")]
    NotKeyValue(String),
    #[error("bad block_size `{0}`")]
    BlockSize(String),
    #[error("unknown key `{0}`")]
    UnknownKey(String),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("--freeze-idle-timeout-ms needs --control first and milliseconds")]
    FreezeIdleTimeout,
    #[error("unexpected argument `{0}`")]
    Unexpected(String),
    #[error(transparent)]
    Engine(#[from] UnknownIoEngine),
    #[error(transparent)]
    EngineEnv(#[from] IoEngineEnvError),
}

/// `e` and its sources, joined by `: `.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        text.push_str(&format!(": {c}"));
        cur = c.source();
    }
    text
}

fn parse_disk(spec: &str) -> Result<ShimDisk, ArgError> {
    let (mut name, mut path, mut socket, mut state_dir) = (None, None, None, None);
    let mut block_size = DEFAULT_BLOCK_SIZE;
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ArgError::NotKeyValue(kv.to_string()))?;
        match k {
            "name" => name = Some(v.to_string()),
            "path" => path = Some(PathBuf::from(v)),
            "socket" => socket = Some(PathBuf::from(v)),
            "state_dir" => state_dir = Some(PathBuf::from(v)),
            "block_size" => {
                block_size = v.parse().map_err(|_| ArgError::BlockSize(v.to_string()))?
            }
            _ => return Err(ArgError::UnknownKey(k.to_string())),
        }
    }
    let name = name.ok_or(ArgError::Missing("name"))?;
    Ok(ShimDisk::in_state_dir(
        &name,
        path.ok_or(ArgError::Missing("path"))?,
        socket.ok_or(ArgError::Missing("socket"))?,
        &state_dir.ok_or(ArgError::Missing("state_dir"))?,
        block_size,
    ))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut disks = Vec::new();
    let mut control = None;
    let mut engine = IoEngine::Auto;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next();
        let parsed = match (a.as_str(), value) {
            ("--disk", Some(v)) => parse_disk(&v).map(|d| disks.push(d)),
            ("--control", Some(v)) => {
                control = Some(ControlConfig::new(PathBuf::from(v)));
                Ok(())
            }
            ("--freeze-idle-timeout-ms", Some(v)) => match (control.as_mut(), v.parse()) {
                (Some(c), Ok(ms)) => {
                    c.freeze_idle_timeout = Duration::from_millis(ms);
                    Ok(())
                }
                _ => Err(ArgError::FreezeIdleTimeout),
            },
            ("--io-engine", Some(v)) => v.parse().map(|e| engine = e).map_err(ArgError::from),
            (other, _) => Err(ArgError::Unexpected(other.to_string())),
        };
        if let Err(e) = parsed {
            eprintln!("filter-driver-shim-test: {}", chain(&e));
            return ExitCode::from(2);
        }
    }
    match IoEngine::from_env() {
        Ok(Some(e)) => engine = e,
        Ok(None) => {}
        Err(e) => {
            eprintln!("filter-driver-shim-test: {}", chain(&ArgError::from(e)));
            return ExitCode::from(2);
        }
    }
    for d in &mut disks {
        d.io_engine = engine;
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_signal` is an `extern "C" fn(c_int)` that only stores to an
        // atomic, which is async-signal-safe; it lives for the whole program.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let shim = match Shim::start(disks, control) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "filter-driver-shim-test: {e}: {:?}",
                std::error::Error::source(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    println!("READY");
    while !STOP.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    match shim.shutdown() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("filter-driver-shim-test: {e}");
            ExitCode::FAILURE
        }
    }
}
