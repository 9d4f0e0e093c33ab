//! The demo's last step: a guest writing through the shim while continuous
//! replication runs, as on a protected hypervisor host.
//!
//! The shim serves both sample disks over NBD (in this process, on Unix sockets), a
//! guest stand-in writes random blocks to them through an NBD client, and the
//! continuous-replication loop of `ferry source` takes an epoch every
//! [`EPOCH_INTERVAL`]. When the guest stops, one more epoch carries its last writes;
//! then the replicas must equal the sources byte for byte.
//!
//! Then a planned failover hands the disks over: the guest writes a little more with
//! no replication running, `ferry failover planned` demotes the shim and sends a final
//! epoch that promotes the target; the promoted replicas must equal the sources byte
//! for byte, and a write after the cut must be refused.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dataplane::source::{self, ModeRequest, SyncJob, SyncReport};
use filter_driver_shim::nbd::client::NbdClient;
use filter_driver_shim::{Shim, ShimDisk};

use super::rig::{compare_files, mib, DemoError};
use dataplane::chain;

/// How often the replication loop takes an epoch.
const EPOCH_INTERVAL: Duration = Duration::from_millis(300);
/// How long the guest writes.
const GUEST_SECONDS: u64 = 4;
/// Pause between guest writes, so the demo shows a steady trickle, not a flood.
const GUEST_PACE: Duration = Duration::from_millis(2);
/// Largest guest write.
const MAX_WRITE_BYTES: u64 = 256 << 10;

/// What the live step saw.
pub struct LiveOutcome {
    pub guest_writes: u64,
    pub guest_bytes: u64,
    pub epochs: Vec<SyncReport>,
    pub failed_epochs: Vec<String>,
    /// Longest time between two acknowledged epochs while the guest wrote.
    pub worst_gap: Duration,
    pub problems: Vec<String>,
    pub handover: Handover,
}

/// What the planned failover saw.
#[derive(Default)]
pub struct Handover {
    /// Guest writes after the last live epoch, carried only by the final one.
    pub writes_before: u64,
    pub final_epoch: Option<u64>,
    pub bytes_sent: u64,
    pub problems: Vec<String>,
}

/// One round of the replication loop as the demo keeps it.
enum Round {
    Acknowledged(SyncReport),
    /// The failure's chain of messages, to be listed (the error itself is not `Clone`).
    Failed(String),
}

/// Every round the replication loop reported, with when.
type Rounds = Vec<(Instant, Round)>;

/// Runs the step over `disks` (name, image) whose replicas are `pairs`.
pub fn run(
    work: &Path,
    job: &SyncJob,
    disks: &[(String, PathBuf)],
    pairs: &[(PathBuf, PathBuf)],
) -> Result<LiveOutcome, DemoError> {
    let ctl = job.state_dir.join(source::SHIM_CONTROL_SOCKET);
    let shim_disks: Vec<ShimDisk> = disks
        .iter()
        .map(|(name, image)| {
            ShimDisk::in_state_dir(
                name,
                image,
                work.join(format!("{name}.nbd.sock")),
                &job.state_dir,
                job.block_size as u32,
            )
        })
        .collect();
    let sockets: Vec<(PathBuf, String)> = shim_disks
        .iter()
        .map(|d| (d.nbd_socket.clone(), d.name.clone()))
        .collect();
    let shim = Shim::start(
        shim_disks,
        Some(filter_driver_shim::control::ControlConfig::new(ctl.clone())),
    )
    .map_err(DemoError::ShimStart)?;

    let mut live_job = job.clone();
    live_job.mode = ModeRequest::Auto;
    live_job.shim_control = Some(ctl);
    for d in &mut live_job.disks {
        d.bitmap = None;
    }

    let (guest, rounds) = replicate_while_guest_writes(&live_job, &sockets);
    let (guest_writes, guest_bytes, guest_started) = guest?;
    let mut outcome = judge(rounds, guest_writes, guest_bytes, guest_started, pairs);
    outcome.handover = hand_over(&live_job, &sockets, pairs)?;
    shim.shutdown().map_err(DemoError::ShimShutdown)?;
    Ok(outcome)
}

/// The planned failover: a burst of guest writes with no replication running, then
/// `ferry failover planned`; checks the cut.
fn hand_over(
    job: &SyncJob,
    sockets: &[(PathBuf, String)],
    pairs: &[(PathBuf, PathBuf)],
) -> Result<Handover, DemoError> {
    let (writes_before, _, _) = guest_writes(sockets, Duration::from_millis(500), 7)?;
    let mut h = Handover {
        writes_before,
        ..Handover::default()
    };
    match source::failover::planned(job) {
        Ok(done) => {
            h.final_epoch = done.demotion.epoch;
            h.bytes_sent = done.report.map_or(0, |r| r.bytes_sent);
        }
        Err(e) => h.problems.push(format!("planned failover: {}", chain(&e))),
    }
    let (socket, name) = &sockets[0];
    let refused = NbdClient::connect(socket, name)
        .and_then(|mut c| c.write(0, &[0x5a; 4096]))
        .is_err();
    if !refused {
        h.problems
            .push("a guest write after the cut was accepted".to_string());
    }
    for (source, replica) in pairs {
        if let Err(p) = compare_files(source, replica) {
            h.problems.push(chain(&p));
        }
    }
    Ok(h)
}

/// Runs `ferry source`'s loop on `live_job` while the guest writes to `sockets`, until
/// an epoch frozen after the guest's last write is acknowledged (or two minutes pass).
/// Returns the guest's outcome and every round the loop reported.
fn replicate_while_guest_writes(
    live_job: &SyncJob,
    sockets: &[(PathBuf, String)],
) -> (Result<(u64, u64, Instant), DemoError>, Rounds) {
    let stop = AtomicBool::new(false);
    let rounds: Mutex<Rounds> = Mutex::new(Vec::new());
    let push = |entry| {
        rounds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((Instant::now(), entry))
    };
    let guest = std::thread::scope(|scope| {
        let replicator = scope.spawn(|| {
            source::continuous::run(live_job, EPOCH_INTERVAL, &stop, &mut |round| {
                push(match round {
                    Ok(r) => Round::Acknowledged(r.clone()),
                    Err(e) => Round::Failed(chain(e)),
                })
            })
        });
        let guest = guest_writes(sockets, Duration::from_secs(GUEST_SECONDS), 1);
        // One epoch frozen after the guest's last write carries everything.
        let stopped = Instant::now();
        let deadline = stopped + Duration::from_secs(120);
        loop {
            let caught_up =
                rounds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .any(|(at, r)| {
                        matches!(r, Round::Acknowledged(_)) && *at > stopped + EPOCH_INTERVAL
                    });
            if caught_up || Instant::now() > deadline || replicator.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Release);
        // A replicator that could not start (another engine holds the state directory)
        // is reported like a failed epoch.
        if let Ok(Err(e)) = replicator.join() {
            push(Round::Failed(chain(&e)));
        }
        guest
    });
    (
        guest,
        rounds.into_inner().unwrap_or_else(|e| e.into_inner()),
    )
}

/// Sorts the rounds into epochs and failures and checks the replicas.
fn judge(
    rounds: Rounds,
    guest_writes: u64,
    guest_bytes: u64,
    guest_started: Instant,
    pairs: &[(PathBuf, PathBuf)],
) -> LiveOutcome {
    let mut problems = Vec::new();
    let mut epochs = Vec::new();
    let mut failed_epochs = Vec::new();
    let mut worst_gap = Duration::ZERO;
    let mut last_ok = guest_started;
    for (at, r) in rounds {
        match r {
            Round::Acknowledged(report) => {
                worst_gap = worst_gap.max(at.saturating_duration_since(last_ok));
                last_ok = at;
                epochs.push(report);
            }
            Round::Failed(e) => failed_epochs.push(e),
        }
    }
    if epochs.len() < 2 {
        problems.push(format!(
            "only {} epoch(s) acknowledged while the guest wrote",
            epochs.len()
        ));
    }
    for (source, replica) in pairs {
        if let Err(p) = compare_files(source, replica) {
            problems.push(chain(&p));
        }
    }
    LiveOutcome {
        guest_writes,
        guest_bytes,
        epochs,
        failed_epochs,
        worst_gap,
        problems,
        handover: Handover::default(),
    }
}

/// The guest: random writes of 4 KiB to 256 KiB to every disk for `duration`, drawn
/// from `seed`. Returns (writes, bytes, start time).
pub(super) fn guest_writes(
    sockets: &[(PathBuf, String)],
    duration: Duration,
    seed: u64,
) -> Result<(u64, u64, Instant), DemoError> {
    let mut clients = Vec::with_capacity(sockets.len());
    for (socket, name) in sockets {
        clients.push(NbdClient::connect(socket, name).map_err(|source| {
            DemoError::GuestAttach {
                socket: socket.clone(),
                source,
            }
        })?);
    }
    let started = Instant::now();
    let mut rng = ferry_io::rng::Rng::new(seed);
    let mut buf = vec![0u8; MAX_WRITE_BYTES as usize];
    let (mut writes, mut bytes) = (0u64, 0u64);
    while started.elapsed() < duration {
        let c = &mut clients[(writes as usize) % sockets.len()];
        let sectors = c.size() / 4096;
        let len = 4096 * (1 + rng.below(MAX_WRITE_BYTES / 4096));
        let offset = 4096 * rng.below(sectors - len / 4096 + 1);
        rng.fill(&mut buf[..len as usize]);
        c.write(offset, &buf[..len as usize])
            .map_err(|source| DemoError::GuestWrite { offset, source })?;
        writes += 1;
        bytes += len;
        std::thread::sleep(GUEST_PACE);
    }
    for mut c in clients {
        c.flush()
            .and_then(|()| c.disconnect())
            .map_err(DemoError::GuestFlush)?;
    }
    Ok((writes, bytes, started))
}

/// Prints the step's result.
pub fn print(number: usize, o: &LiveOutcome) {
    let first = o.epochs.first();
    let first_modes = first
        .map(|r| {
            r.disks
                .iter()
                .map(|d| format!("{}={}", d.name, d.mode))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let pauses: Vec<u64> = o.epochs.iter().filter_map(|r| r.freeze_pause_us).collect();
    let max_pause = pauses.iter().copied().max().unwrap_or(0);
    let mean_pause = pauses.iter().sum::<u64>() / pauses.len().max(1) as u64;
    let sent: u64 = o.epochs.iter().map(|r| r.blocks_sent).sum();
    println!(
        "step {number} (guest writing through the shim, continuous replication): {} writes ({}) in {GUEST_SECONDS} s; \
         {} epochs acknowledged every ~{} ms, {} blocks sent; freeze pause mean {mean_pause} µs, max {max_pause} µs; \
         longest gap between epochs {:.2} s",
        o.guest_writes,
        mib(o.guest_bytes),
        o.epochs.len(),
        EPOCH_INTERVAL.as_millis(),
        sent,
        o.worst_gap.as_secs_f64()
    );
    println!(
        "  first live epoch: {first_modes} (the shim's tracking is new, so a checksum compare once; changed-block after)"
    );
    if !o.failed_epochs.is_empty() {
        println!(
            "  {} epoch(s) failed and were retried: {}",
            o.failed_epochs.len(),
            o.failed_epochs.join("; ")
        );
    }
    for p in &o.problems {
        println!("  FAILED: {p}");
    }
    let h = &o.handover;
    println!(
        "step {} (planned failover): {} more guest writes with replication stopped; the shim refused writes from the cut, final epoch {} carried them ({}) and the target promoted its replicas",
        number + 1,
        h.writes_before,
        h.final_epoch.map_or("?".to_string(), |e| e.to_string()),
        mib(h.bytes_sent)
    );
    for p in &h.problems {
        println!("  FAILED: {p}");
    }
}
