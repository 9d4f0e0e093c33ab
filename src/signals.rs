//! Signals, for the long-running commands (`ferry source`, `ferry shim`, `ferry
//! target`): SIGTERM and SIGINT ask to stop — what is in flight finishes, and the log
//! says what; a second SIGINT to `ferry source` aborts the epoch in flight safely (the
//! target rolls it back, the shim keeps its bits); SIGHUP never stops anything — there
//! is nothing to reload without a restart, and the log says so.
//!
//! The handlers only touch atomics (and shutdown(2) for the abort): async-signal-safe.
//! A thread watches them and logs.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::time::Duration;

/// Set by the first SIGTERM or SIGINT: the commands poll it.
pub static STOP: AtomicBool = AtomicBool::new(false);
/// The signal that asked to stop first.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static INTERRUPTS: AtomicU32 = AtomicU32::new(0);
static HANGUPS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    match signal {
        libc::SIGHUP => {
            HANGUPS.fetch_add(1, Ordering::SeqCst);
        }
        _ => {
            let _ = STOP_SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
            STOP.store(true, Ordering::SeqCst);
            if signal == libc::SIGINT && INTERRUPTS.fetch_add(1, Ordering::SeqCst) >= 1 {
                dataplane::source::abort::abort_session_in_flight();
            }
        }
    }
}

fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

/// Installs the handlers, and a thread that logs each signal with `finishing()`: what
/// the process finishes before it stops (read when the first stop signal arrives).
/// With `exit_on_stop`, that thread ends the process once it has logged (for the
/// target, whose state is safe at any instant).
pub fn install(finishing: impl Fn() -> String + Send + 'static, exit_on_stop: bool) {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only touches static atomics and calls shutdown(2), all
        // async-signal-safe; `on_signal` has the signature signal(2) expects.
        unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    // Without the thread, signals still work; they are only not logged.
    let _ = std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || watch(finishing, exit_on_stop));
}

fn watch(finishing: impl Fn() -> String, exit_on_stop: bool) {
    let (mut stops, mut interrupts, mut hangups) = (false, 0, 0);
    loop {
        let h = HANGUPS.load(Ordering::SeqCst);
        if h != hangups {
            hangups = h;
            tracing::warn!("SIGHUP received and ignored: nothing is reloaded while running; restart to apply a changed config");
        }
        if !stops && STOP.load(Ordering::SeqCst) {
            stops = true;
            let signal = name(STOP_SIGNAL.load(Ordering::SeqCst));
            tracing::warn!("{signal} received: {}", finishing());
            if exit_on_stop {
                std::process::exit(0);
            }
        }
        let i = INTERRUPTS.load(Ordering::SeqCst);
        if i >= 2 && interrupts < 2 {
            tracing::warn!("second SIGINT: the epoch in flight is aborted; the target rolls it back and the shim keeps its blocks for the next run");
        }
        interrupts = i;
        std::thread::sleep(Duration::from_millis(50));
    }
}
