//! `ferry`: the one binary. A thin layer: parse the command line, load the config,
//! call into the crates, report.

mod bench;
mod check;
mod demo;
mod dr;
mod error;
mod imagegen;
mod io_failure;
mod logging;
mod reporting;
mod signals;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use dataplane::config::Config;
use dataplane::source::{self, ModeRequest};

use crate::error::{CliError, UsageError};

#[derive(Parser)]
#[command(name = "ferry", version, about = "Disaster-recovery block replication")]
struct Cli {
    /// How log lines are written to stderr (the level comes from FERRY_LOG or RUST_LOG).
    #[arg(long, value_enum, global = true, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a fresh pre-shared key (`ferry keygen > ferry.key`), or write it to a new
    /// owner-only file with `--out`.
    Keygen {
        /// Create this file (mode 0600; refuses to overwrite) instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the target writer in the foreground.
    Target {
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// Bring every configured disk's replica up to date, once; exit 0 only after the
    /// target acknowledged it as durable.
    Sync {
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long)]
        config: PathBuf,
        /// Print one JSON object summarising the run.
        #[arg(long)]
        json: bool,
        /// How to sync: auto picks changed-block (bitmap present), full (new replica)
        /// or seeded (existing replica).
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// A changed-block bitmap for a disk: NAME=FILE (repeatable).
        #[arg(long = "bitmap", value_name = "NAME=FILE")]
        bitmaps: Vec<String>,
        /// Sync only these disks (repeatable; default: all).
        #[arg(long = "disk", value_name = "NAME")]
        disks: Vec<String>,
        /// The target refused a replica because something other than ferry wrote to
        /// it (split brain): discard those writes, resyncing the replicas from this
        /// site with a seeded sync that compares every block. What was written to the
        /// replicas is lost.
        #[arg(long)]
        discard_replica_changes: bool,
    },
    /// Replicate continuously: one epoch of the running shim every
    /// `epoch_interval_ms`, until SIGTERM or SIGINT (the epoch in progress completes).
    Source {
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long)]
        config: PathBuf,
        /// The target refused a replica because something other than ferry wrote to
        /// it (split brain): discard those writes, resyncing the replicas from this
        /// site with a seeded sync that compares every block. What was written to the
        /// replicas is lost.
        #[arg(long)]
        discard_replica_changes: bool,
    },
    /// Run the filter shim: serve every `[[disk]]` over NBD on its `nbd_socket` and
    /// track every write persistently (foreground; SIGTERM or SIGINT stops it cleanly).
    Shim {
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// How replication stands at this site: role, RPO, the epoch in flight, pending
    /// changes, recent throughput, the last error; the target's replicas and points.
    /// Reads only.
    Status {
        /// This site's config (either side, or both).
        #[arg(long)]
        config: PathBuf,
        /// Print one JSON object (documented in the operator guide; fields are only
        /// ever added).
        #[arg(long)]
        json: bool,
        /// Print again every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Validate a config without using it: the file, the key (format and mode), the
    /// state directories, every disk; with --connect, reach the target and
    /// authenticate (nothing is opened). Exit 0 when usable.
    Check {
        /// The config to check (either side, or both).
        #[arg(long)]
        config: PathBuf,
        /// Also reach the target named in [source] and authenticate.
        #[arg(long)]
        connect: bool,
    },
    /// List the recovery points of the target's replicas (`ferry points [list]`), or
    /// keep one from retention by tagging it (`tag`, `untag`).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Points {
        #[command(subcommand)]
        action: Option<PointsAction>,
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long, required = true)]
        config: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Failover: test a recovery point on copies, hand the disks over (planned), promote
    /// the replicas when the primary is lost (unplanned), make a failover final.
    Failover {
        #[command(subcommand)]
        action: FailoverAction,
    },
    /// At the new primary after a failover (committed): replicate back to the old
    /// primary, sending only the blocks that can differ (written here since the
    /// promotion, rolled back by the failover, written there after its last
    /// acknowledged epoch). The old primary runs `ferry become-replica` and
    /// `ferry target` first; the shim must be running here.
    Reprotect {
        /// This site's config: `[source]` (target = the old primary's `[target]
        /// listen`, the shim's state_dir) and `[target]` (the promoted site's state).
        #[arg(long)]
        config: PathBuf,
        /// Print one JSON object summarising the run.
        #[arg(long)]
        json: bool,
        /// The old primary's disks were written by something other than ferry after
        /// `become-replica` (the target refuses them as changed): discard those writes;
        /// their blocks are found by comparing every block of those disks.
        #[arg(long)]
        discard_replica_changes: bool,
    },
    /// At the old primary after a failover (VMs, shim and engine stopped): make this
    /// site's disks the replicas of the other site's. Its target records what each disk
    /// holds and the blocks written here since the last epoch the other site has, which
    /// `ferry reprotect` there sends back.
    BecomeReplica {
        /// This site's config, with both `[source]` (its shim's state) and `[target]`.
        #[arg(long)]
        config: PathBuf,
        /// This site was not demoted by a planned failover (the other site failed over
        /// while it was down): proceed; writes made here after the last epoch the other
        /// site holds are overwritten by reverse replication.
        #[arg(long)]
        force: bool,
    },
    /// Print a shell completion script: `ferry completions bash >
    /// /etc/bash_completion.d/ferry`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (ferry.1 and one per subcommand) into a directory.
    Manpages {
        /// Where to write them (created if missing).
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Show replication working end to end on sample disks, on loopback.
    Demo,
    /// Measure full-sync throughput on this machine.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum PointsAction {
    /// List the recovery points (the default).
    List {
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long)]
        config: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Name a recovery point: retention keeps it until it is untagged.
    Tag {
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long)]
        config: PathBuf,
        /// The point, as `ferry points` lists it (any epoch of its run).
        id: u64,
        /// 1 to 64 characters from [A-Za-z0-9._-], not only digits.
        #[arg(value_parser = tag_name)]
        name: String,
    },
    /// Remove a tag: retention may merge the point away again.
    Untag {
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long)]
        config: PathBuf,
        /// The tag's name, or the tagged point's id.
        which: String,
    },
}

/// A tag name: a file-name-safe word that cannot be mistaken for a point id.
fn tag_name(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !s.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(s.to_string())
    } else {
        Err("expected 1 to 64 characters from [A-Za-z0-9._-], not only digits".into())
    }
}

#[derive(Subcommand)]
enum FailoverAction {
    /// Write every replica as it was at a recovery point into
    /// `<state_dir>/failover/`, as image files a test VM can boot from and write to.
    /// Replication goes on; it waits only while the images are being made.
    Test {
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long)]
        config: PathBuf,
        /// Recovery point id (an epoch, see `ferry points`); default: the latest.
        #[arg(long)]
        point: Option<u64>,
    },
    /// Discard the test-failover images and everything written to them.
    Cleanup {
        /// The config file (TOML; every key is in docs/config.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// On the primary site: hand the disks over to the secondary with no data loss.
    /// Stop `ferry source` and shut the VMs down first. The shim then refuses every
    /// write, a final epoch carries everything acknowledged, the target promotes its
    /// site and this site is demoted (`ferry source` and `ferry sync` refuse to run,
    /// `ferry shim` serves the disks read-only).
    Planned {
        /// The primary's config (the same as `ferry source` and `ferry shim` use).
        #[arg(long)]
        config: PathBuf,
    },
    /// On the secondary site, with the primary lost: take the replicas back in place
    /// to a recovery point (default: the latest), promote them and fence this site's
    /// target, which then refuses every source. Rerun after a crash to finish; rerun
    /// with an older --point, before commit and while no VM wrote to the disks, to go
    /// further back.
    Unplanned {
        /// The target's config (the replicas and `[target] state_dir`).
        #[arg(long)]
        config: PathBuf,
        /// Recovery point id (an epoch, see `ferry points`); default: the latest.
        #[arg(long)]
        point: Option<u64>,
    },
    /// Make a failover final: discard the recovery points of the old lineage (they no
    /// longer describe disks the VMs write) and end the replica records.
    Commit {
        /// The target's config.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Full,
    Seeded,
    Changed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo narrates on stdout; its in-process target and shim log only problems.
    let default_level = if matches!(cli.command, Command::Demo) {
        tracing::Level::WARN
    } else {
        tracing::Level::INFO
    };
    if let Err(e) = logging::init(default_level, cli.log_format) {
        eprintln!("ferry: error: {e}");
        return error::Category::Usage.exit_code();
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry: error: {}", chain(&error));
            error.category().exit_code()
        }
    }
}

/// Runs one subcommand.
fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Keygen { out } => keygen(out.as_deref()),
        Command::Target { config } => target(&config),
        Command::Sync {
            config,
            json,
            mode,
            bitmaps,
            disks,
            discard_replica_changes,
        } => sync(
            &config,
            json,
            mode,
            &bitmaps,
            &disks,
            discard_replica_changes,
        ),
        Command::Shim { config } => shim(&config),
        Command::Source {
            config,
            discard_replica_changes,
        } => source_loop(&config, discard_replica_changes),
        Command::Points {
            action,
            config,
            json,
        } => match (action, config) {
            (Some(PointsAction::List { config, json }), _) => points(&config, json),
            (None, Some(config)) => points(&config, json),
            (Some(PointsAction::Tag { config, id, name }), _) => points_tag(&config, id, &name),
            (Some(PointsAction::Untag { config, which }), _) => points_untag(&config, &which),
            // clap requires --config without a subcommand.
            (None, None) => Err(CliError::NoRecoveryPoints),
        },
        Command::Check { config, connect } => check::run(&config, connect),
        Command::Status {
            config,
            json,
            watch,
        } => status::run(&config, json, watch),
        Command::Failover { action } => failover(action),
        Command::Reprotect {
            config,
            json,
            discard_replica_changes,
        } => dr::reprotect(&config, json, discard_replica_changes),
        Command::BecomeReplica { config, force } => dr::become_replica(&config, force),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut std::io::stdout());
            Ok(())
        }
        Command::Manpages { out_dir } => manpages(&out_dir),
        Command::Demo => demo::run().map_err(CliError::from),
        Command::Bench(args) => bench::run(&args),
    }
}

use dataplane::chain;

fn keygen(out: Option<&std::path::Path>) -> Result<(), CliError> {
    let psk = dataplane::psk::Psk::generate()?;
    match out {
        Some(path) => Ok(psk.save_new(path)?),
        None => {
            print!("{}", psk.to_file_string());
            Ok(())
        }
    }
}

/// `ferry manpages`: ferry.1 and ferry-<subcommand>.1.
fn manpages(out_dir: &std::path::Path) -> Result<(), CliError> {
    use clap::CommandFactory;
    std::fs::create_dir_all(out_dir)
        .map_err(io_failure::IoFailure::on("cannot create", out_dir))?;
    let cmd = Cli::command();
    let mut pages = vec![("ferry".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        pages.push((format!("ferry-{}", sub.get_name()), sub.clone()));
    }
    for (name, page) in pages {
        let path = out_dir.join(format!("{name}.1"));
        let mut bytes = Vec::new();
        clap_mangen::Man::new(page)
            .title(name.clone())
            .render(&mut bytes)
            .and_then(|()| std::fs::write(&path, bytes))
            .map_err(io_failure::IoFailure::on("cannot write", &path))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn load(config: &std::path::Path) -> Result<Config, CliError> {
    Ok(Config::load(config)?)
}

fn target(config: &std::path::Path) -> Result<(), CliError> {
    let cfg = load(config)?;
    let job = dataplane::writer::TargetJob::from_config(&cfg)?;
    let _metrics = dataplane::metrics::serve_target(&cfg);
    signals::install(
        || {
            "stopping now: an epoch being applied is rolled back at the next start (nothing acknowledged is lost)".to_string()
        },
        true,
    );
    Ok(dataplane::writer::run(job)?)
}

fn sync(
    config: &std::path::Path,
    json: bool,
    mode: Mode,
    bitmaps: &[String],
    only: &[String],
    discard_replica_changes: bool,
) -> Result<(), CliError> {
    let cfg = load(config)?;
    dr::refuse_if_replica(&cfg, "sync")?;
    let mode = match (mode, discard_replica_changes) {
        (Mode::Changed, true) => return Err(UsageError::DiscardNeedsResync.into()),
        (Mode::Auto, true) => ModeRequest::Seeded,
        (Mode::Auto, false) => ModeRequest::Auto,
        (Mode::Full, _) => ModeRequest::Full,
        (Mode::Seeded, _) => ModeRequest::Seeded,
        (Mode::Changed, false) => ModeRequest::Changed,
    };
    let mut job = source::SyncJob::from_config(&cfg, mode)?;
    job.discard_replica_changes = discard_replica_changes;
    for spec in bitmaps {
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| UsageError::BitmapSpec { spec: spec.clone() })?;
        let disk = job
            .disks
            .iter_mut()
            .find(|d| d.name == name)
            .ok_or_else(|| UsageError::BitmapDisk {
                spec: spec.clone(),
                name: name.to_string(),
                config: config.to_path_buf(),
            })?;
        disk.bitmap = Some(PathBuf::from(path));
    }
    if !only.is_empty() {
        for name in only {
            if !job.disks.iter().any(|d| &d.name == name) {
                return Err(UsageError::NoSuchDisk {
                    name: name.clone(),
                    config: config.to_path_buf(),
                }
                .into());
            }
        }
        job.disks.retain(|d| only.contains(&d.name));
    }
    let progress = source::progress::Progress::new();
    job.progress = Some(progress.clone());
    let watcher = reporting::Watcher::for_sync(progress);
    let report = source::sync(&job);
    drop(watcher);
    print_sync_report(&report?, json);
    Ok(())
}

/// What `ferry sync` prints on success: the report as one JSON line, or in words.
pub(crate) fn print_sync_report(report: &source::SyncReport, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serialises")
        );
    } else {
        for d in &report.disks {
            println!(
                "{}: {} sync, {} bytes covered{}",
                d.name,
                d.mode,
                d.bytes_logical,
                if d.replica_created {
                    " (replica created)"
                } else {
                    ""
                }
            );
        }
        println!(
            "epoch {} durable on the target: {} blocks sent, {} bytes on the wire, {:.2} s, {:.0} MB/s of disk covered",
            report.epoch, report.blocks_sent, report.bytes_sent, report.seconds, report.mb_per_s
        );
    }
}

fn source_loop(config: &std::path::Path, discard_replica_changes: bool) -> Result<(), CliError> {
    let cfg = load(config)?;
    dr::refuse_if_replica(&cfg, "source")?;
    let interval = cfg.require_source("source")?.epoch_interval();
    let mut job = source::SyncJob::from_config(&cfg, ModeRequest::Auto)?;
    job.discard_replica_changes = discard_replica_changes;
    tracing::info!(
        target = %job.target,
        disks = job.disks.len(),
        interval_ms = interval.as_millis() as u64,
        "continuous replication starting"
    );
    let progress = source::progress::Progress::new();
    job.progress = Some(progress.clone());
    let _metrics = dataplane::metrics::serve_source(&cfg, Some(progress.clone()));
    let in_flight = progress.clone();
    signals::install(
        move || {
            let s = in_flight.snapshot();
            if s.phase == source::progress::Phase::Idle {
                "no epoch in flight; stopping".to_string()
            } else {
                format!(
                    "finishing {} before stopping (a second SIGINT aborts it safely)",
                    reporting::describe(&s)
                )
            }
        },
        false,
    );
    let reporter = reporting::Reporter::new(job.state_dir.clone(), interval);
    let watcher = reporting::Watcher::for_source(progress, reporter.clone());
    let result = source::continuous::run(&job, interval, &signals::STOP, &mut |round| {
        let behind = reporter.since_last_success_s();
        reporter.round(
            round,
            round
                .as_ref()
                .err()
                .is_some_and(source::continuous::needs_operator),
        );
        log_round(round, behind)
    });
    drop(watcher);
    match &result {
        Ok(()) => reporter.stopped("stopped by a signal"),
        Err(e) => reporter.stopped(&chain(e)),
    }
    result?;
    tracing::info!("continuous replication stopped");
    Ok(())
}

/// Logs one round of `ferry source`; `behind`: seconds since the last acknowledged
/// epoch before it, if there was one (this run or an earlier one).
fn log_round(round: source::continuous::Round<'_>, behind: Option<f64>) {
    match round {
        Ok(r) => {
            let modes: Vec<String> = r
                .disks
                .iter()
                .map(|d| format!("{}={}", d.name, d.mode))
                .collect();
            tracing::info!(
                epoch = r.epoch,
                disks = %modes.join(","),
                blocks = r.blocks_sent,
                bytes_sent = r.bytes_sent,
                pause_us = r.freeze_pause_us.unwrap_or(0),
                seconds = format_args!("{:.3}", r.seconds),
                "epoch durable on the target"
            );
        }
        Err(e) if source::continuous::needs_operator(e) => {
            tracing::error!(
                "replication stopped: the target refuses for a reason only an operator can resolve: {}",
                chain(e)
            );
        }
        Err(e) => match behind {
            Some(s) => tracing::error!(
                since_last_epoch_s = format_args!("{s:.1}"),
                "epoch failed (nothing is lost; the next one carries its blocks): {}",
                chain(e)
            ),
            None => tracing::error!(
                "epoch failed (nothing is lost; the next one carries its blocks; no epoch was acknowledged yet): {}",
                chain(e)
            ),
        },
    }
}

fn shim(config: &std::path::Path) -> Result<(), CliError> {
    let cfg = load(config)?;
    dr::refuse_if_replica(&cfg, "shim")?;
    let source = cfg.require_source("shim")?;
    // `[source] io_engine` drives the shim's backing stores too; the environment
    // variable FERRY_SHIM_IO_ENGINE overrides it (forcing the fallback without editing
    // the config, and running the test suites once per engine).
    use filter_driver_shim::backing::IoEngine;
    let engine = match IoEngine::from_env()? {
        Some(e) => e,
        None => match source.io_engine {
            dataplane::config::IoEngineKind::Auto => IoEngine::Auto,
            dataplane::config::IoEngineKind::Uring => IoEngine::Uring,
            dataplane::config::IoEngineKind::Sync => IoEngine::Sync,
        },
    };
    // A site demoted by a planned failover serves its disks read-only.
    let demoted = source::failover::Demotion::load(&source.state_dir)?.is_some();
    let mut disks = Vec::with_capacity(cfg.disks.len());
    for d in &cfg.disks {
        let socket = d.nbd_socket.as_ref().ok_or_else(|| CliError::NoNbdSocket {
            config: config.to_path_buf(),
            disk: d.name.clone(),
        })?;
        let mut disk = filter_driver_shim::ShimDisk::in_state_dir(
            &d.name,
            &d.path,
            socket,
            &source.state_dir,
            source.block_size_bytes(),
        );
        disk.io_engine = engine;
        disk.writes_refused = demoted;
        disks.push(disk);
    }
    signals::install(
        || {
            "closing the NBD connections, syncing the disks and the bitmaps, then stopping"
                .to_string()
        },
        false,
    );
    let control = filter_driver_shim::control::ControlConfig {
        path: source.state_dir.join(source::SHIM_CONTROL_SOCKET),
        freeze_idle_timeout: source.freeze_idle_timeout(),
    };
    Ok(filter_driver_shim::serve(
        disks,
        Some(control),
        &signals::STOP,
    )?)
}

fn points(config: &std::path::Path, json: bool) -> Result<(), CliError> {
    let cfg = load(config)?;
    let target = cfg.require_target("points")?;
    let replicas: Vec<(String, PathBuf)> = cfg
        .disks
        .iter()
        .map(|d| (d.name.clone(), d.path.clone()))
        .collect();
    let offered = dataplane::writer::failover::offered_points(&target.state_dir, &replicas)?;
    let (site, points) = (&offered.site, &offered.points);
    let half_applied = dataplane::writer::points::interrupted(&target.state_dir)?;
    if json {
        let changed = offered
            .changed
            .as_ref()
            .map(|(d, how)| serde_json::json!({"disk": d, "how": how}));
        println!(
            "{}",
            serde_json::json!({
                "site": site,
                "points": points,
                "changed_outside": changed,
                "half_applied": half_applied,
            })
        );
        return Ok(());
    }
    if let Some(site) = site {
        println!("{}", describe_site(site));
    }
    if let Some((disk, how)) = &offered.changed {
        println!("disk {disk}: the replica was changed outside ferry ({how}); no recovery point describes it any more");
    }
    for log in &half_applied {
        println!(
            "warning: an epoch is half-applied: undo log {} (being applied now, or left by a target that stopped; `ferry target` rolls it back or forward when it starts)",
            log.display()
        );
    }
    if points.is_empty() {
        if site.is_none() && offered.changed.is_none() {
            println!("no recovery points: no epoch has been acknowledged yet");
        }
        return Ok(());
    }
    print_points(points);
    Ok(())
}

/// The table of `ferry points`.
fn print_points(points: &[dataplane::writer::points::RecoveryPoint]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!(
        "{:>8}  {:>13}  {:<30}  {:>9}  {:>10}  {:>12}  disks",
        "point", "epochs", "acknowledged (local time)", "age", "size", "restore reads"
    );
    for p in points {
        let epochs = if p.first_epoch == p.last_epoch {
            p.first_epoch.to_string()
        } else {
            format!("{}-{}", p.first_epoch, p.last_epoch)
        };
        let (at, age) = match p.committed_unix_s {
            Some(t) => (
                dataplane::utc::Local(t).to_string(),
                dataplane::utc::Age(now.saturating_sub(t)).to_string(),
            ),
            None => ("?".to_string(), "?".to_string()),
        };
        println!(
            "{:>8}  {:>13}  {:<30}  {:>9}  {:>10}  {:>12}  {}{}{}",
            p.id,
            epochs,
            at,
            age,
            dataplane::utc::Bytes(p.log_bytes).to_string(),
            dataplane::utc::Bytes(p.bytes).to_string(),
            p.disks.join(","),
            if p.latest { "  (latest)" } else { "" },
            p.tag
                .as_ref()
                .map_or(String::new(), |t| format!("  tag {t}")),
        );
        if let Some(why) = &p.suspect {
            println!("          not a known epoch: {why}");
            println!("          (a seeded sync verifies and repairs the replicas; older points were retired)");
        }
    }
}

/// The configured disks of `config`'s target: its state dir and disk names.
fn target_disks(
    config: &std::path::Path,
    command: &str,
) -> Result<(PathBuf, Vec<String>), CliError> {
    let cfg = load(config)?;
    let target = cfg.require_target(command)?;
    Ok((
        target.state_dir.clone(),
        cfg.disks.iter().map(|d| d.name.clone()).collect(),
    ))
}

fn points_tag(config: &std::path::Path, id: u64, name: &str) -> Result<(), CliError> {
    let (state_dir, names) = target_disks(config, "points tag")?;
    // No epoch commits (and merges points away) between the check and the tag.
    let _lock = dataplane::writer::apply_lock(&state_dir, true)?;
    let t = dataplane::writer::points::tag(&state_dir, &names, id, name)?;
    if let Some(from) = t.moved_from {
        println!("tag {} moved from point {from}", t.name);
    }
    println!(
        "recovery point {} tagged {}: retention keeps it until `ferry points untag`",
        t.point, t.name
    );
    Ok(())
}

fn points_untag(config: &std::path::Path, which: &str) -> Result<(), CliError> {
    let (state_dir, names) = target_disks(config, "points untag")?;
    let _lock = dataplane::writer::apply_lock(&state_dir, true)?;
    match dataplane::writer::points::untag(&state_dir, &names, which)? {
        Some(t) => println!(
            "recovery point {} untagged ({}): retention may merge it away",
            t.point, t.name
        ),
        None => println!("no recovery point is tagged {which}"),
    }
    Ok(())
}

fn failover(action: FailoverAction) -> Result<(), CliError> {
    match action {
        FailoverAction::Test { config, point } => {
            let cfg = load(&config)?;
            let target = cfg.require_target("failover test")?;
            let replicas: Vec<(String, PathBuf)> = cfg
                .disks
                .iter()
                .map(|d| (d.name.clone(), d.path.clone()))
                .collect();
            let offered =
                dataplane::writer::failover::offered_points(&target.state_dir, &replicas)?;
            if let (Some(site), true) = (&offered.site, offered.points.is_empty()) {
                return Err(CliError::SitePromoted {
                    point: site.point,
                    committed: site.committed,
                });
            }
            if let Some((disk, how)) = offered.changed {
                return Err(CliError::ChangedOutside { disk, how });
            }
            let point = match point {
                Some(p) => p,
                None => offered
                    .points
                    .first()
                    .map(|p| p.id)
                    .ok_or(CliError::NoRecoveryPoints)?,
            };
            let out_dir = target.state_dir.join("failover");
            if out_dir.exists() {
                return Err(CliError::FailoverOpen { dir: out_dir });
            }
            let _lock = dataplane::writer::apply_lock(&target.state_dir, true)?;
            let images = dataplane::writer::points::materialize(
                &target.state_dir,
                point,
                &replicas,
                &out_dir,
            )?;
            println!("test failover of recovery point {point}: boot the test VM from these images");
            for (name, path) in images {
                println!("  {name}: {}", path.display());
            }
            Ok(())
        }
        FailoverAction::Planned { config } => failover_planned(&config),
        FailoverAction::Unplanned { config, point } => failover_unplanned(&config, point),
        FailoverAction::Commit { config } => failover_commit(&config),
        FailoverAction::Cleanup { config } => {
            let cfg = load(&config)?;
            let target = cfg.require_target("failover cleanup")?;
            let out_dir = target.state_dir.join("failover");
            match std::fs::remove_dir_all(&out_dir) {
                Ok(()) => {
                    println!("test failover discarded ({} removed)", out_dir.display());
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("no test failover is open");
                    Ok(())
                }
                Err(source) => Err(CliError::FailoverCleanup {
                    dir: out_dir,
                    source,
                }),
            }
        }
    }
}

fn failover_unplanned(config: &std::path::Path, point: Option<u64>) -> Result<(), CliError> {
    let job = dataplane::writer::TargetJob::from_config(&load(config)?)?;
    println!(
        "unplanned failover of {} disk(s) to recovery point {}: the site is fenced first (its target refuses every source from then on), then the replicas are taken back in place",
        job.disks.len(),
        point.map_or("latest".to_string(), |p| p.to_string())
    );
    let done = dataplane::writer::failover::unplanned(&job, point)?;
    if done.already {
        println!(
            "the site was already promoted to recovery point {}",
            done.point
        );
    } else if done.undone.is_empty() {
        println!(
            "the replicas hold recovery point {} (the latest): nothing to undo",
            done.point
        );
    } else {
        let undone: Vec<String> = done.undone.iter().map(u64::to_string).collect();
        println!(
            "undid epoch(s) {}: the replicas hold recovery point {}",
            undone.join(", "),
            done.point
        );
    }
    println!("promoted; boot the VMs here from these disks:");
    for (disk, path) in &done.disks {
        println!(
            "  {}: {} (epoch {} of generation {})",
            disk.name,
            path.display(),
            disk.epoch,
            disk.generation
        );
    }
    println!("this site's target refuses every source from now on; once the VMs run well, make it final with `ferry failover commit --config {}`", config.display());
    Ok(())
}

fn failover_commit(config: &std::path::Path) -> Result<(), CliError> {
    let job = dataplane::writer::TargetJob::from_config(&load(config)?)?;
    let done = dataplane::writer::failover::commit(&job)?;
    if done.already {
        println!(
            "the failover to recovery point {} was already committed",
            done.point
        );
    } else {
        println!(
            "failover to recovery point {} committed: {} recovery point(s) of the old lineage discarded; the disks are this site's primary disks now",
            done.point, done.discarded
        );
    }
    Ok(())
}

/// One line on a promoted site, for `points` and `failover test`.
fn describe_site(site: &dataplane::writer::role::SiteRecord) -> String {
    use dataplane::writer::role::Role;
    let since = dataplane::utc::Utc::from_unix_s(site.since_unix_s);
    match (site.role, site.committed) {
        (Role::Promoting, _) => format!(
            "this site is being promoted (since {since}) to recovery point {}: rerun `ferry failover unplanned` to finish; no point is offered",
            site.point
        ),
        (Role::Primary, true) => format!(
            "this site is the primary since {since} (failover to recovery point {} committed): the recovery points of the old lineage were discarded",
            site.point
        ),
        (Role::Primary, false) => format!(
            "this site was promoted at {since} to recovery point {} (not committed); points are offered only while no VM has written to the disks",
            site.point
        ),
    }
}

fn failover_planned(config: &std::path::Path) -> Result<(), CliError> {
    let cfg = load(config)?;
    dr::refuse_if_replica(&cfg, "failover planned")?;
    let job = source::SyncJob::from_config(&cfg, ModeRequest::Auto)?;
    println!(
        "planned failover to {}: the shim refuses every write from now on (shut the VMs down first), a final epoch carries everything acknowledged, then the target promotes its replicas",
        job.target
    );
    let done = source::failover::planned(&job)?;
    let d = &done.demotion;
    let epoch = d.epoch.map_or("unknown".to_string(), |e| e.to_string());
    match &done.report {
        None if done.already => println!(
            "this site was already demoted (begun at {}, final epoch {epoch})",
            dataplane::utc::Utc::from_unix_s(d.since_unix_s)
        ),
        None => println!(
            "the target at {} was found promoted already (an earlier run's answer was lost, or a failover there): this site's demotion is complete; its last acknowledged epoch is {epoch}",
            d.target
        ),
        Some(r) => println!(
            "final epoch {} acknowledged ({} bytes sent) and the target at {} promoted; no acknowledged write was left behind",
            r.epoch, r.bytes_sent, d.target
        ),
    }
    println!("boot the VMs at the secondary site from its replicas of:");
    for disk in &d.disks {
        println!(
            "  {} (generation {}, epoch {epoch})",
            disk.name, disk.generation
        );
    }
    println!("this site is demoted: `ferry source` and `ferry sync` refuse to run here, and `ferry shim` serves these disks read-only");
    Ok(())
}
