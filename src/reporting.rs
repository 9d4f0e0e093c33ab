//! How a running `ferry sync` or `ferry source` shows its progress: a progress bar on a
//! terminal (`indicatif`), a progress log line every few seconds otherwise, and for
//! `ferry source` its status file ([`EngineStatus`]) for `ferry status`, the shim and
//! metrics.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::source::progress::{Phase, Progress, ProgressSnapshot};
use dataplane::source::{SourceError, SyncReport};
use filter_driver_shim_contract::engine_status::{
    EngineStatus, EpochSummary, InFlight, LastError, RECENT_EPOCHS,
};

/// A sync's progress shows in a log line once it has run this long, and again every
/// this long.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// How often the watcher looks.
const TICK: Duration = Duration::from_millis(200);

use dataplane::source::progress::now_ms;

/// One line about a sync in flight: `epoch 12 sending: 41% of 1.0 GiB, 812 MB/s, 1 s
/// left`.
pub fn describe(s: &ProgressSnapshot) -> String {
    let pct = if s.total_bytes > 0 {
        100.0 * s.done_bytes as f64 / s.total_bytes as f64
    } else {
        0.0
    };
    let eta = s
        .eta_s
        .map_or(String::new(), |e| format!(", {e:.0} s left"));
    format!(
        "epoch {} {}: {pct:.0}% of {}, {:.0} MB/s{eta}",
        s.epoch,
        s.phase.as_str(),
        dataplane::utc::Bytes(s.total_bytes),
        s.rate_bytes_per_s / 1e6
    )
}

/// A thread that shows `progress` until dropped.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// For `ferry sync`: a bar when stderr is a terminal, log lines otherwise.
    pub fn for_sync(progress: Arc<Progress>) -> Watcher {
        let terminal = std::io::stderr().is_terminal();
        Watcher::spawn(move |stop| {
            if terminal {
                bar(&progress, stop)
            } else {
                log_lines(&progress, stop, &mut |_| {})
            }
        })
    }

    /// For `ferry source`: log lines for long epochs, and `reporter`'s file kept
    /// current while an epoch runs.
    pub fn for_source(progress: Arc<Progress>, reporter: Arc<Reporter>) -> Watcher {
        Watcher::spawn(move |stop| {
            log_lines(&progress, stop, &mut |snapshot| {
                reporter.in_flight(snapshot);
            })
        })
    }

    fn spawn(run: impl FnOnce(&AtomicBool) + Send + 'static) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // Showing progress is not worth failing a sync over: without a thread there
        // is no progress shown, and the sync goes on.
        let thread = std::thread::Builder::new()
            .name("ferry-progress".into())
            .spawn(move || run(&flag))
            .ok();
        Watcher { stop, thread }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // The thread waits between looks in `park_timeout`: wake it, so a sync
            // does not end up to a tick late.
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// A progress bar of the current phase, redrawn until `stop`.
fn bar(progress: &Progress, stop: &AtomicBool) {
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>22} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta} left",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    let pb = indicatif::ProgressBar::new(0).with_style(style);
    let mut phase = Phase::Idle;
    while !stop.load(Ordering::Acquire) {
        let s = progress.snapshot();
        if s.phase != phase {
            phase = s.phase;
            pb.reset();
            pb.set_prefix(format!("epoch {} {}", s.epoch, s.phase.as_str()));
        }
        pb.set_length(s.total_bytes);
        pb.set_position(s.done_bytes);
        std::thread::park_timeout(TICK);
    }
    pb.finish_and_clear();
}

/// Logs a sync in flight once it has run [`LOG_EVERY`], and every [`LOG_EVERY`] after;
/// `each` sees every snapshot of a sync in flight (about once a second).
fn log_lines(progress: &Progress, stop: &AtomicBool, each: &mut dyn FnMut(&ProgressSnapshot)) {
    let mut last_log: Option<(u64, Instant)> = None;
    let mut last_each = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let s = progress.snapshot();
        if s.phase != Phase::Idle {
            let running = Duration::from_millis(now_ms().saturating_sub(s.started_unix_ms));
            let due = match last_log {
                Some((epoch, at)) if epoch == s.started_unix_ms => at.elapsed() >= LOG_EVERY,
                _ => running >= LOG_EVERY,
            };
            if due {
                tracing::info!("{} (running {:.0} s)", describe(&s), running.as_secs_f64());
                last_log = Some((s.started_unix_ms, Instant::now()));
            }
            if last_each.elapsed() >= Duration::from_secs(1) {
                each(&s);
                last_each = Instant::now();
            }
        }
        std::thread::park_timeout(TICK);
    }
}

/// `ferry source`'s [`EngineStatus`] file, kept current.
pub struct Reporter {
    state_dir: PathBuf,
    status: Mutex<EngineStatus>,
}

impl Reporter {
    pub fn new(state_dir: PathBuf, interval: Duration) -> Arc<Reporter> {
        let now = now_ms();
        let status = EngineStatus {
            pid: std::process::id(),
            started_unix_ms: now,
            updated_unix_ms: now,
            epoch_interval_ms: interval.as_millis() as u64,
            // What an earlier run recorded is history worth keeping.
            recent: EngineStatus::load(&state_dir)
                .map(|s| s.recent)
                .unwrap_or_default(),
            ..EngineStatus::default()
        };
        let r = Arc::new(Reporter {
            state_dir,
            status: Mutex::new(status),
        });
        r.store(|_| {});
        r
    }

    fn store(&self, change: impl FnOnce(&mut EngineStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut s);
        s.updated_unix_ms = now_ms();
        if let Err(e) = s.store(&self.state_dir) {
            tracing::debug!(
                "cannot write {}: {e}",
                EngineStatus::path(&self.state_dir).display()
            );
        }
    }

    fn in_flight(&self, p: &ProgressSnapshot) {
        self.store(|s| {
            s.in_flight = Some(InFlight {
                epoch: p.epoch,
                phase: p.phase.as_str().to_string(),
                started_unix_ms: p.started_unix_ms,
                total_bytes: p.total_bytes,
                done_bytes: p.done_bytes,
                rate_bytes_per_s: p.rate_bytes_per_s,
                eta_s: p.eta_s,
            });
        });
    }

    /// A round ended.
    pub fn round(&self, result: &Result<SyncReport, SourceError>, needs_operator: bool) {
        let now = now_ms();
        self.store(|s| {
            s.in_flight = None;
            match result {
                Ok(r) => {
                    s.failures_since_success = 0;
                    s.recent.insert(
                        0,
                        EpochSummary {
                            epoch: r.epoch,
                            started_unix_ms: now.saturating_sub((r.seconds * 1e3) as u64),
                            acknowledged_unix_ms: now,
                            seconds: r.seconds,
                            bytes_read: r.bytes_read,
                            bytes_sent: r.bytes_sent,
                            bytes_payload: r.bytes_payload,
                            blocks_sent: r.blocks_sent,
                            freeze_pause_us: r.freeze_pause_us,
                            throttled_s: r.throttled_s,
                            modes: r
                                .disks
                                .iter()
                                .map(|d| format!("{}={}", d.name, d.mode))
                                .collect(),
                        },
                    );
                    s.recent.truncate(RECENT_EPOCHS);
                }
                Err(e) => {
                    s.failures_since_success = s.failures_since_success.saturating_add(1);
                    s.last_error = Some(LastError {
                        unix_ms: now,
                        message: dataplane::chain(e),
                        needs_operator,
                    });
                }
            }
        });
    }

    /// The engine stopped, for `why`.
    pub fn stopped(&self, why: &str) {
        self.store(|s| {
            s.in_flight = None;
            s.stopped = Some(why.to_string());
        });
    }

    /// Seconds since the newest acknowledged epoch began, or `None`.
    pub fn since_last_success_s(&self) -> Option<f64> {
        let s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.last_success()
            .map(|e| now_ms().saturating_sub(e.acknowledged_unix_ms) as f64 / 1e3)
    }
}
