//! `ferry status --config FILE [--json] [--watch]`: how replication stands, on either
//! side, read from what the running processes keep — the engine's status file, the
//! shim's control socket, the source's and the target's records — without changing
//! anything.
//!
//! The JSON form (`--json`) is documented in docs/operator-guide.md ("Status") and
//! only ever gains fields.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::config::{Config, DEFAULT_GROUP};
use dataplane::source::failover::Demotion;
use dataplane::source::{self, SourceDiskState};
use dataplane::writer::role::{Role, SiteRecord};
use dataplane::writer::state::ReplicaRecord;
use filter_driver_shim_contract::control::StatusDisk;
use filter_driver_shim_contract::engine_status::{EngineStatus, EpochSummary, InFlight};
use serde::Serialize;

use crate::error::CliError;

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub generated_unix_ms: u64,
    /// This site's role: `primary`, `replica`, `demoted`, `promoting`, or `unknown`
    /// (nothing replicated yet).
    pub role: &'static str,
    /// The role in words: since when, how.
    pub role_detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceSide>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetSide>,
}

/// The primary's side: engine, shim, disks.
#[derive(Debug, Serialize)]
pub struct SourceSide {
    /// Where replication goes.
    pub target: String,
    /// The bandwidth limit in force now (`max_rate`, `max_rate_schedule`), bytes per
    /// second; `null`: none.
    pub max_rate_bytes_per_s: Option<f64>,
    pub engine: EngineView,
    /// The shim answers on its control socket.
    pub shim_running: bool,
    pub groups: Vec<Group>,
}

/// `ferry source` as its status file tells.
#[derive(Debug, Serialize)]
pub struct EngineView {
    /// Its process is alive and wrote its status recently.
    pub running: bool,
    pub pid: Option<u32>,
    /// Why it stopped, if it did.
    pub stopped: Option<String>,
    pub epoch_interval_ms: Option<u64>,
    pub in_flight: Option<InFlight>,
    pub last_acknowledged: Option<EpochSummary>,
    /// Age of the newest durable point: how much would be lost now.
    pub rpo_s: Option<f64>,
    /// Over the recent acknowledged epochs: disk bytes read per second of epoch time,
    /// and uncompressed bytes per byte on the wire.
    pub recent_mb_per_s: Option<f64>,
    pub compression_ratio: Option<f64>,
    pub freeze_pause_max_us: Option<u64>,
    pub last_error: Option<ErrorView>,
    pub failures_since_success: u32,
}

#[derive(Debug, Serialize)]
pub struct ErrorView {
    pub message: String,
    pub ago_s: f64,
    pub needs_operator: bool,
}

#[derive(Debug, Serialize)]
pub struct Group {
    pub name: String,
    pub disks: Vec<SourceDisk>,
}

#[derive(Debug, Serialize)]
pub struct SourceDisk {
    pub name: String,
    pub path: PathBuf,
    /// The last epoch the target acknowledged for this disk, and of which generation.
    pub acknowledged_epoch: Option<u64>,
    pub generation: Option<String>,
    /// Changed bytes waiting for the next epoch (the shim's bits, frozen ones
    /// included; `None` when the shim is not running).
    pub pending_bytes: Option<u64>,
    /// Why the next epoch must compare every block, if it must.
    pub resync_needed: Option<String>,
    pub tracking_failed: bool,
    pub writes_refused: bool,
}

/// The replica's side: role, replicas, points.
#[derive(Debug, Serialize)]
pub struct TargetSide {
    pub state_dir: PathBuf,
    pub replicas: Vec<ReplicaView>,
    /// Recovery points offered now, and the age of the newest.
    pub points: usize,
    pub newest_point_age_s: Option<f64>,
    /// A replica changed outside ferry: which, and how.
    pub changed_outside: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ReplicaView {
    pub name: String,
    pub path: PathBuf,
    pub epoch: Option<u64>,
    pub generation: Option<String>,
    pub committed_age_s: Option<f64>,
    pub suspect: Option<String>,
}

use dataplane::source::progress::now_ms;
use dataplane::utc::Bytes;

fn age_s(unix_ms: u64) -> f64 {
    now_ms().saturating_sub(unix_ms) as f64 / 1e3
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists; it has no
    // memory effects.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The engine as its status file in `state_dir` tells.
fn engine_view(state_dir: &Path) -> EngineView {
    let Some(s) = EngineStatus::load(state_dir) else {
        return EngineView {
            running: false,
            pid: None,
            stopped: None,
            epoch_interval_ms: None,
            in_flight: None,
            last_acknowledged: None,
            rpo_s: None,
            recent_mb_per_s: None,
            compression_ratio: None,
            freeze_pause_max_us: None,
            last_error: None,
            failures_since_success: 0,
        };
    };
    // A running engine rewrites the file every round and every second of an epoch.
    let fresh = age_s(s.updated_unix_ms) < (3.0 * s.epoch_interval_ms as f64 / 1e3).max(10.0);
    let running = s.stopped.is_none() && alive(s.pid) && (fresh || s.in_flight.is_some());
    let (secs, read, sent, payload) = s.recent.iter().fold((0.0, 0, 0, 0), |a, e| {
        (
            a.0 + e.seconds,
            a.1 + e.bytes_read,
            a.2 + e.bytes_sent,
            a.3 + e.bytes_payload,
        )
    });
    EngineView {
        running,
        pid: Some(s.pid),
        stopped: s.stopped.clone(),
        epoch_interval_ms: Some(s.epoch_interval_ms),
        in_flight: s.in_flight.clone().filter(|_| running),
        last_acknowledged: s.last_success().cloned(),
        rpo_s: s.last_success().map(|e| age_s(e.started_unix_ms)),
        recent_mb_per_s: (secs > 0.0).then(|| read as f64 / secs / 1e6),
        compression_ratio: (sent > 0 && payload > 0).then(|| payload as f64 / sent as f64),
        freeze_pause_max_us: s.recent.iter().filter_map(|e| e.freeze_pause_us).max(),
        last_error: s.last_error.as_ref().map(|e| ErrorView {
            message: e.message.clone(),
            ago_s: age_s(e.unix_ms),
            needs_operator: e.needs_operator,
        }),
        failures_since_success: s.failures_since_success,
    }
}

fn source_side(cfg: &Config) -> Result<Option<SourceSide>, CliError> {
    let Some(src) = &cfg.source else {
        return Ok(None);
    };
    let shim: Option<Vec<StatusDisk>> = match source::live::ShimControl::connect(
        &src.state_dir.join(source::SHIM_CONTROL_SOCKET),
    ) {
        Ok(Some(mut c)) => c.status().ok(),
        _ => None,
    };
    let mut groups: Vec<Group> = Vec::new();
    for d in &cfg.disks {
        let state = SourceDiskState::load(&src.state_dir, &d.name)
            .ok()
            .flatten();
        let served = shim.iter().flatten().find(|s| s.name == d.name);
        let disk = SourceDisk {
            name: d.name.clone(),
            path: d.path.clone(),
            acknowledged_epoch: state.as_ref().map(|s| s.epoch),
            generation: state.as_ref().map(|s| s.generation.to_string()),
            pending_bytes: served
                .map(|s| (s.dirty_blocks + s.frozen_blocks.unwrap_or(0)) * u64::from(s.block_size)),
            resync_needed: served
                .and_then(|s| s.resync_reason.clone())
                .or_else(|| state.is_none().then(|| "never synced".to_string())),
            tracking_failed: served.is_some_and(|s| s.tracking_failed),
            writes_refused: served.is_some_and(|s| s.writes_refused),
        };
        let group = d.group.clone().unwrap_or_else(|| DEFAULT_GROUP.to_string());
        match groups.iter_mut().find(|g| g.name == group) {
            Some(g) => g.disks.push(disk),
            None => groups.push(Group {
                name: group,
                disks: vec![disk],
            }),
        }
    }
    Ok(Some(SourceSide {
        target: src.target.clone(),
        max_rate_bytes_per_s: src.limit().now().map(|r| r.0),
        engine: engine_view(&src.state_dir),
        shim_running: shim.is_some(),
        groups,
    }))
}

fn target_side(cfg: &Config) -> Result<Option<TargetSide>, CliError> {
    let Some(t) = &cfg.target else {
        return Ok(None);
    };
    let replicas: Vec<(String, PathBuf)> = cfg
        .disks
        .iter()
        .map(|d| (d.name.clone(), d.path.clone()))
        .collect();
    let mut views = Vec::new();
    for (name, path) in &replicas {
        let r = ReplicaRecord::load(&t.state_dir, name)?;
        views.push(ReplicaView {
            name: name.clone(),
            path: path.clone(),
            epoch: r.as_ref().map(|r| r.epoch),
            generation: r.as_ref().map(|r| r.generation.to_string()),
            committed_age_s: r.as_ref().map(|r| age_s(r.committed_unix_s * 1000)),
            suspect: r.and_then(|r| r.suspect),
        });
    }
    let offered = dataplane::writer::failover::offered_points(&t.state_dir, &replicas)?;
    Ok(Some(TargetSide {
        state_dir: t.state_dir.clone(),
        replicas: views,
        points: offered.points.len(),
        newest_point_age_s: offered
            .points
            .first()
            .and_then(|p| p.committed_unix_s)
            .map(|s| age_s(s * 1000)),
        changed_outside: offered.changed.map(|(d, how)| format!("disk {d}: {how}")),
    }))
}

/// This site's role, from its records.
fn role(cfg: &Config) -> Result<(&'static str, String), CliError> {
    if let Some(t) = &cfg.target {
        if let Some(site) = SiteRecord::load(&t.state_dir)? {
            let since = dataplane::utc::Utc::from_unix_s(site.since_unix_s);
            return Ok(match site.role {
                Role::Promoting => (
                    "promoting",
                    format!("being promoted to recovery point {} since {since}: rerun `ferry failover unplanned` to finish", site.point),
                ),
                Role::Primary => (
                    "primary",
                    format!(
                        "promoted by {} at {since} to recovery point {}{}",
                        site.how,
                        site.point,
                        if site.committed { ", committed" } else { ", not committed" }
                    ),
                ),
            });
        }
    }
    if let Some(s) = &cfg.source {
        if let Some(d) = Demotion::load(&s.state_dir)? {
            return Ok((
                "demoted",
                format!(
                    "demoted by a planned failover at {} to {}{}",
                    dataplane::utc::Utc::from_unix_s(d.since_unix_s),
                    d.target,
                    if d.complete { "" } else { " (unfinished)" }
                ),
            ));
        }
    }
    if let Some(t) = &cfg.target {
        let held = cfg
            .disks
            .iter()
            .filter(|d| matches!(ReplicaRecord::load(&t.state_dir, &d.name), Ok(Some(_))))
            .count();
        if held > 0 {
            return Ok(("replica", format!("its target holds {held} replica(s)")));
        }
    }
    if cfg.source.is_some() {
        return Ok(("primary", "replicating from here".to_string()));
    }
    Ok(("unknown", "nothing replicated here yet".to_string()))
}

/// Gathers the report for `cfg`.
pub fn gather(cfg: &Config) -> Result<StatusReport, CliError> {
    let (role, role_detail) = role(cfg)?;
    Ok(StatusReport {
        generated_unix_ms: now_ms(),
        role,
        role_detail,
        source: source_side(cfg)?,
        target: target_side(cfg)?,
    })
}

fn human_age(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} d", s / 86400.0),
    }
}

/// The report as a few lines for a terminal.
pub fn render(r: &StatusReport) -> String {
    let mut out = format!("role: {} ({})\n", r.role, r.role_detail);
    if let Some(s) = &r.source {
        render_source(&mut out, s);
    }
    if let Some(t) = &r.target {
        out.push_str(&format!("target state {}:\n", t.state_dir.display()));
        for v in &t.replicas {
            let held = match (v.epoch, &v.generation) {
                (Some(e), Some(g)) => format!(
                    "epoch {e} (generation {}…), committed {} ago",
                    &g[..8.min(g.len())],
                    human_age(v.committed_age_s.unwrap_or(0.0))
                ),
                _ => "no epoch applied".to_string(),
            };
            let suspect = v
                .suspect
                .as_ref()
                .map_or(String::new(), |s| format!("; SUSPECT: {s}"));
            out.push_str(&format!("  {:<16} {held}{suspect}\n", v.name));
        }
        out.push_str(&format!(
            "  recovery points: {}{}\n",
            t.points,
            t.newest_point_age_s
                .map_or(String::new(), |a| format!(", newest {} old", human_age(a)))
        ));
        if let Some(c) = &t.changed_outside {
            out.push_str(&format!(
                "  SPLIT BRAIN: replica changed outside ferry: {c}\n"
            ));
        }
    }
    out
}

fn render_source(out: &mut String, s: &SourceSide) {
    render_engine(out, s);
    let shim = if s.shim_running {
        "running"
    } else {
        "not running"
    };
    out.push_str(&format!("  shim: {shim}\n"));
    render_groups(out, &s.groups);
}

/// The engine's lines: state, RPO, limit, the epoch in flight, recent epochs, the last
/// error.
fn render_engine(out: &mut String, s: &SourceSide) {
    let e = &s.engine;
    let engine = match (e.running, e.pid, &e.stopped) {
        (true, Some(pid), _) => format!(
            "running (pid {pid}), an epoch every {} ms",
            e.epoch_interval_ms.unwrap_or(0)
        ),
        (false, _, Some(why)) => format!("stopped: {why}"),
        (false, Some(_), None) => "not running (its last status is stale)".to_string(),
        _ => "never ran here".to_string(),
    };
    out.push_str(&format!("source → {}: engine {engine}\n", s.target));
    match (&e.last_acknowledged, e.rpo_s) {
        (Some(l), Some(rpo)) => out.push_str(&format!(
            "  RPO {}: epoch {} acknowledged {} ago ({}, {} sent)\n",
            human_age(rpo),
            l.epoch,
            human_age(age_s(l.acknowledged_unix_ms)),
            l.modes.join(" "),
            Bytes(l.bytes_sent)
        )),
        _ => out.push_str("  RPO unknown: no epoch acknowledged yet\n"),
    }
    if let Some(rate) = s.max_rate_bytes_per_s {
        let held = e.last_acknowledged.as_ref().map_or(0.0, |l| l.throttled_s);
        out.push_str(&format!(
            "  bandwidth limit now {:.1} Mbit/s{}\n",
            rate * 8.0 / 1e6,
            if held > 0.0 {
                format!(": it held the last epoch back {held:.1} s (epochs grow instead; the guest is not slowed)")
            } else {
                String::new()
            }
        ));
    }
    render_activity(out, e);
}

/// The epoch in flight, the recent epochs and the last error.
fn render_activity(out: &mut String, e: &EngineView) {
    if let Some(f) = &e.in_flight {
        let pct = if f.total_bytes > 0 {
            100.0 * f.done_bytes as f64 / f.total_bytes as f64
        } else {
            0.0
        };
        out.push_str(&format!(
            "  in flight: epoch {} {} {pct:.0}% of {}, {:.0} MB/s{}\n",
            f.epoch,
            f.phase,
            Bytes(f.total_bytes),
            f.rate_bytes_per_s / 1e6,
            f.eta_s
                .map_or(String::new(), |s| format!(", {} left", human_age(s)))
        ));
    }
    if let Some(rate) = e.recent_mb_per_s {
        out.push_str(&format!(
            "  recent epochs: {rate:.0} MB/s read, compression {}, freeze pause max {} µs\n",
            e.compression_ratio
                .map_or("n/a".to_string(), |c| format!("{c:.2}x")),
            e.freeze_pause_max_us.unwrap_or(0)
        ));
    }
    if let Some(err) = &e.last_error {
        out.push_str(&format!(
            "  last error {} ago{}{}: {}\n",
            human_age(err.ago_s),
            if e.failures_since_success > 0 {
                format!(
                    " ({} failure(s) since the last success)",
                    e.failures_since_success
                )
            } else {
                String::new()
            },
            if err.needs_operator {
                ", NEEDS THE OPERATOR"
            } else {
                ""
            },
            err.message
        ));
    }
}

/// Each group's disks: epoch, pending bytes, flags.
fn render_groups(out: &mut String, groups: &[Group]) {
    for g in groups {
        out.push_str(&format!("  group {}:\n", g.name));
        for d in &g.disks {
            let epoch = d
                .acknowledged_epoch
                .map_or("never synced".to_string(), |e| format!("epoch {e}"));
            let pending = d.pending_bytes.map_or("pending unknown".to_string(), |p| {
                format!("{} pending", Bytes(p))
            });
            let mut flags = Vec::new();
            if let Some(r) = &d.resync_needed {
                flags.push(format!("resync needed ({r})"));
            }
            if d.tracking_failed {
                flags.push("TRACKING FAILED".to_string());
            }
            if d.writes_refused {
                flags.push("writes refused".to_string());
            }
            out.push_str(&format!(
                "    {:<16} {epoch}, {pending}{}\n",
                d.name,
                if flags.is_empty() {
                    String::new()
                } else {
                    format!("; {}", flags.join("; "))
                }
            ));
        }
    }
}

/// `ferry status`.
pub fn run(config: &Path, json: bool, watch: bool) -> Result<(), CliError> {
    let cfg = Config::load(config)?;
    let terminal = std::io::stdout().is_terminal();
    loop {
        let report = gather(&cfg)?;
        if json {
            println!(
                "{}",
                serde_json::to_string(&report).expect("status serialises")
            );
        } else {
            if watch && terminal {
                // Clear the screen and go home: a terminal only.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&report));
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
