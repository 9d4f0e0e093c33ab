//! `ferry bench`: full-sync throughput on this machine, on a realistic disk image.
//!
//! It builds (once, then caches) an ext4 image of real OS files with
//! [`crate::imagegen`], starts a target writer on loopback in this process, and runs
//! full syncs into a fresh replica for each compression setting — replica and state on
//! both sides are deleted before every run, so every run is a full sync. Each replica
//! is verified byte for byte after its run. Timing covers connect to durable
//! acknowledgement; CPU time covers both sides, since both run in this process.
//!
//! Two hidden flags serve `benches/peers.sh`, so the peers are measured on the very
//! image ferry is: `--make-image PATH` and `--mutate-image PATH`.

use std::fs;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use dataplane::config::{
    default_workers, Compression, BLOCK_SIZE_KIB_RANGE, COMPRESSION_LEVEL_RANGE,
    DEFAULT_BLOCK_SIZE_KIB, DEFAULT_COMPRESSION_LEVEL, DEFAULT_IO_SIZE_KIB, DEFAULT_QUEUE_DEPTH,
    IO_SIZE_KIB_MAX, QUEUE_DEPTH_RANGE, WORKERS_RANGE,
};
use dataplane::io::EngineKind;
use dataplane::source::{self, JobDisk, ModeRequest, SyncReport};
use dataplane::writer::TargetDisk;
use serde_json::json;

use crate::demo::rig::{compare_files, mib, DemoError, Rig};
use crate::error::{CliError, UsageError};
use crate::imagegen::{self, ImageInfo, ImageKind, MIB};
use crate::io_failure::IoFailure;

/// The disk name used on both sides.
const DISK_NAME: &str = "bench-os";
/// Default share of the image filled with files: about what an OS disk holds, and
/// what the peer figures in the project's notes were measured on.
const DEFAULT_FILL_PERCENT: u32 = 60;

/// Arguments of `ferry bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Size of the generated disk image, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub size_mib: u64,
    /// How full of OS files the image is, percent.
    #[arg(long, value_name = "PERCENT", default_value_t = DEFAULT_FILL_PERCENT)]
    pub fill_percent: u32,
    /// Compression settings to measure.
    #[arg(long, value_enum, default_value_t = CompressionChoice::All)]
    pub compression: CompressionChoice,
    /// zstd level for the zstd runs (negative: zstd's fast levels).
    #[arg(long, default_value_t = DEFAULT_COMPRESSION_LEVEL, allow_negative_numbers = true)]
    pub level: i32,
    /// Hash/compress worker threads (default: the config default).
    #[arg(long)]
    pub workers: Option<usize>,
    /// I/O requests in flight on each side (default: the config default).
    #[arg(long)]
    pub queue_depth: Option<usize>,
    /// Read request size, KiB (default: the config default).
    #[arg(long, value_name = "KIB")]
    pub io_size_kib: Option<usize>,
    /// Replication block size, KiB (default: the config default).
    #[arg(long, value_name = "KIB")]
    pub block_size_kib: Option<usize>,
    /// How disks are read and written.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    pub engine: EngineArg,
    /// Full syncs per compression setting (interleaved; median and best reported).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Where the image (kept for the next run) and the replica go
    /// [default: /dev/shm if present, else the temp dir].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only build the image at PATH (with --size-mib, --fill-percent) and exit.
    #[arg(long, hide = true, value_name = "PATH")]
    pub make_image: Option<PathBuf>,
    /// Only overwrite --mutate-percent of the blocks of the image at PATH and exit.
    #[arg(long, hide = true, value_name = "PATH")]
    pub mutate_image: Option<PathBuf>,
    /// Share of blocks --mutate-image changes, percent.
    #[arg(long, hide = true, default_value_t = 1.0)]
    pub mutate_percent: f64,
    /// Seed of --mutate-image.
    #[arg(long, hide = true, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompressionChoice {
    None,
    Zstd,
    /// `compression = "auto"`, the default.
    Auto,
    /// none and zstd.
    Both,
    /// none, zstd and auto.
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    Auto,
    Uring,
    Sync,
}

impl From<EngineArg> for EngineKind {
    fn from(e: EngineArg) -> Self {
        match e {
            EngineArg::Auto => EngineKind::Auto,
            EngineArg::Uring => EngineKind::Uring,
            EngineArg::Sync => EngineKind::Sync,
        }
    }
}

/// The engine settings every run uses, validated against the config's ranges.
#[derive(Debug)]
struct Settings {
    block_size: usize,
    io_size: usize,
    queue_depth: usize,
    workers: usize,
    engine: EngineArg,
}

impl Settings {
    fn from_args(args: &BenchArgs) -> Result<Settings, UsageError> {
        let block_kib = args
            .block_size_kib
            .unwrap_or(DEFAULT_BLOCK_SIZE_KIB as usize);
        let io_kib = args.io_size_kib.unwrap_or(DEFAULT_IO_SIZE_KIB as usize);
        let queue_depth = args.queue_depth.unwrap_or(DEFAULT_QUEUE_DEPTH as usize);
        let workers = args.workers.unwrap_or(default_workers() as usize);
        let in_range = |v: usize, r: &std::ops::RangeInclusive<u32>| {
            u32::try_from(v).is_ok_and(|v| r.contains(&v))
        };
        let out_of_range = |flag, value: &dyn ToString, expected| UsageError::OutOfRange {
            flag,
            value: value.to_string(),
            expected,
        };
        if !block_kib.is_power_of_two() || !in_range(block_kib, &BLOCK_SIZE_KIB_RANGE) {
            let expected = format!(
                "a power of two in {}..={}",
                BLOCK_SIZE_KIB_RANGE.start(),
                BLOCK_SIZE_KIB_RANGE.end()
            );
            return Err(out_of_range("block-size-kib", &block_kib, expected));
        }
        if !io_kib.is_power_of_two() || io_kib < block_kib || io_kib > IO_SIZE_KIB_MAX as usize {
            let expected =
                format!("a power of two from the block size ({block_kib}) to {IO_SIZE_KIB_MAX}");
            return Err(out_of_range("io-size-kib", &io_kib, expected));
        }
        if !in_range(queue_depth, &QUEUE_DEPTH_RANGE) {
            let expected = format!("{QUEUE_DEPTH_RANGE:?}");
            return Err(out_of_range("queue-depth", &queue_depth, expected));
        }
        if !in_range(workers, &WORKERS_RANGE) {
            return Err(out_of_range(
                "workers",
                &workers,
                format!("{WORKERS_RANGE:?}"),
            ));
        }
        if !COMPRESSION_LEVEL_RANGE.contains(&args.level) {
            let expected = format!("{COMPRESSION_LEVEL_RANGE:?}");
            return Err(out_of_range("level", &args.level, expected));
        }
        if args.runs == 0 {
            return Err(UsageError::NoRuns);
        }
        Ok(Settings {
            block_size: block_kib * 1024,
            io_size: io_kib * 1024,
            queue_depth,
            workers,
            engine: args.engine,
        })
    }
}

/// One full sync and what it cost.
struct Run {
    compression: Compression,
    number: u32,
    report: SyncReport,
    cpu: CpuTime,
}

impl Run {
    fn compression(&self) -> String {
        compression_name(self.compression)
    }

    /// Disk bytes covered per byte on the wire.
    fn disk_to_wire(&self) -> f64 {
        self.report.bytes_logical as f64 / self.report.bytes_sent.max(1) as f64
    }

    /// Data bytes read (holes and zero blocks never travel) per byte on the wire: what
    /// compression bought.
    fn data_to_wire(&self) -> f64 {
        self.report.bytes_read as f64 / self.report.bytes_sent.max(1) as f64
    }
}

pub fn run(args: &BenchArgs) -> Result<(), CliError> {
    if let Some(path) = &args.make_image {
        let info = imagegen::make_os_image(path, args.size_mib, args.fill_percent)?;
        println!("{}: {}", path.display(), info.describe());
        return Ok(());
    }
    if let Some(path) = &args.mutate_image {
        return mutate_image(args, path);
    }
    let settings = Settings::from_args(args)?;
    let base = args.dir.clone().unwrap_or_else(default_dir);
    let work = base.join("ferry-bench");
    fs::create_dir_all(&work).map_err(IoFailure::on("cannot create bench dir", &work))?;
    let image = cached_image(&work, args.size_mib, args.fill_percent, args.json)?;
    let zstd = Compression::Zstd { level: args.level };
    let levels: Vec<Compression> = match args.compression {
        CompressionChoice::None => vec![Compression::None],
        CompressionChoice::Zstd => vec![zstd],
        CompressionChoice::Auto => vec![Compression::Auto],
        CompressionChoice::Both => vec![Compression::None, zstd],
        CompressionChoice::All => vec![Compression::None, zstd, Compression::Auto],
    };
    let bench = Bench {
        replica: work.join("replica.img"),
        source_state: work.join("source-state"),
        target_state: work.join("target-state"),
        image,
        settings,
    };
    let runs = bench.measure(args, &levels)?;
    if args.json {
        println!(
            "{}",
            json_summary(&bench.image, &bench.settings, &levels, &runs)
        );
    } else {
        print_results(&work, &levels, &runs);
    }
    Ok(())
}

/// `--mutate-image`: changes a share of the blocks of the image at `path`.
fn mutate_image(args: &BenchArgs, path: &Path) -> Result<(), CliError> {
    let block_size = args
        .block_size_kib
        .unwrap_or(DEFAULT_BLOCK_SIZE_KIB as usize)
        * 1024;
    let blocks = imagegen::mutate_blocks(path, block_size, args.mutate_percent / 100.0, args.seed)?;
    println!(
        "{}: {} blocks of {} KiB changed (seed {})",
        path.display(),
        blocks.len(),
        block_size / 1024,
        args.seed
    );
    Ok(())
}

/// One benchmark: the image, where its replica and both sides' state go, and the
/// engine settings.
struct Bench {
    image: ImageInfo,
    replica: PathBuf,
    source_state: PathBuf,
    target_state: PathBuf,
    settings: Settings,
}

impl Bench {
    /// Starts the target and runs every full sync, `args.runs` rounds of every level
    /// in `levels`; the replica and state are deleted afterwards, whatever happened.
    fn measure(&self, args: &BenchArgs, levels: &[Compression]) -> Result<Vec<Run>, CliError> {
        let rig = Rig::start(
            &self.target_state,
            vec![TargetDisk {
                name: DISK_NAME.into(),
                path: self.replica.clone(),
            }],
            self.settings.queue_depth,
        )?;
        if !args.json {
            print_header(&self.image, &self.settings);
        }
        let mut runs = Vec::new();
        let outcome = (|| {
            for number in 1..=args.runs {
                for &compression in levels {
                    let run = self.run_once(&rig, compression, number)?;
                    if !args.json {
                        print_run(&run);
                    }
                    runs.push(run);
                }
            }
            Ok::<(), CliError>(())
        })();
        let cleaned = reset(&self.replica, &self.source_state, &self.target_state);
        outcome?;
        cleaned?;
        Ok(runs)
    }

    /// One full sync into a fresh replica, verified byte for byte.
    fn run_once(&self, rig: &Rig, compression: Compression, number: u32) -> Result<Run, CliError> {
        reset(&self.replica, &self.source_state, &self.target_state)?;
        let mut job = rig.sync_job(
            &self.source_state,
            vec![JobDisk {
                name: DISK_NAME.into(),
                path: self.image.path.clone(),
                bitmap: None,
            }],
            ModeRequest::Full,
            compression,
        );
        let settings = &self.settings;
        job.block_size = settings.block_size;
        job.io_size = settings.io_size;
        job.queue_depth = settings.queue_depth;
        job.workers = settings.workers;
        job.engine = settings.engine.into();
        let before = CpuTime::now();
        let report = source::sync(&job).map_err(|e| DemoError::FullSync(Box::new(e)))?;
        let cpu = CpuTime::now().since(&before);
        compare_files(&self.image.path, &self.replica).map_err(DemoError::from)?;
        Ok(Run {
            compression,
            number,
            report,
            cpu,
        })
    }
}

fn print_header(image: &ImageInfo, settings: &Settings) {
    println!("ferry bench: full sync over loopback TCP to a target writer in this process");
    println!("  image   {} ({})", image.describe(), image.path.display());
    println!(
        "  engine  block {} KiB, io {} KiB, queue depth {}, {} worker(s), io engine {:?}",
        settings.block_size / 1024,
        settings.io_size / 1024,
        settings.queue_depth,
        settings.workers,
        settings.engine
    );
    println!();
    println!(
        "  {:<10} {:>3} {:>8} {:>8} {:>13} {:>10} {:>10} {:>7} {:>7}  replica",
        "compress",
        "run",
        "seconds",
        "MB/s",
        "on the wire",
        "disk/wire",
        "data/wire",
        "user s",
        "sys s"
    );
}

fn print_results(work: &Path, levels: &[Compression], runs: &[Run]) {
    println!();
    for &level in levels {
        let rates = rates(runs, level);
        let name = compression_name(level);
        println!(
            "  {name:<10} median {:.0} MB/s, best {:.0} MB/s of disk covered over {} run(s)",
            median(&rates),
            rates.iter().cloned().fold(0.0, f64::max),
            rates.len()
        );
    }
    println!("  (MB/s = 10^6 disk bytes covered per second, connect to durable acknowledgement;");
    println!("   user/sys = CPU seconds of source and target together; every replica verified byte for byte)");
    println!(
        "  the image stays in {} for the next run; delete it when done",
        work.display()
    );
}

fn compression_name(compression: Compression) -> String {
    match compression {
        Compression::None => "none".into(),
        Compression::Zstd { level } => format!("zstd {level}"),
        Compression::Auto => "auto".into(),
    }
}

/// The key of a compression setting in the JSON summary.
fn compression_key(compression: Compression) -> &'static str {
    match compression {
        Compression::None => "none",
        Compression::Zstd { .. } => "zstd",
        Compression::Auto => "auto",
    }
}

/// What the frames of a run were encoded with (what `auto` chose): frames raw and per zstd level.
fn frames_chosen(report: &SyncReport) -> String {
    let mut out = format!("raw {}", report.frames_raw);
    for (level, n) in &report.frames_zstd {
        out.push_str(&format!(", zstd {level}: {n}"));
    }
    out
}

fn print_run(run: &Run) {
    let r = &run.report;
    println!(
        "  {:<10} {:>3} {:>8.2} {:>8.0} {:>13} {:>10.2} {:>10.2} {:>7.2} {:>7.2}  identical  frames {}",
        run.compression(),
        run.number,
        r.seconds,
        r.mb_per_s,
        mib(r.bytes_sent),
        run.disk_to_wire(),
        run.data_to_wire(),
        run.cpu.user_s,
        run.cpu.system_s,
        frames_chosen(r)
    );
}

fn rates(runs: &[Run], compression: Compression) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.compression == compression)
        .map(|r| r.report.mb_per_s)
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn json_summary(
    image: &ImageInfo,
    settings: &Settings,
    levels: &[Compression],
    runs: &[Run],
) -> serde_json::Value {
    let runs_json: Vec<serde_json::Value> = runs
        .iter()
        .map(|run| {
            let r = &run.report;
            json!({
                "compression": compression_key(run.compression),
                "level": match run.compression {
                    Compression::Zstd { level } => Some(level),
                    _ => None,
                },
                "frames_raw": r.frames_raw,
                "frames_zstd": r.frames_zstd,
                "run": run.number,
                "seconds": r.seconds,
                "mb_per_s": r.mb_per_s,
                "bytes_logical": r.bytes_logical,
                "bytes_sent": r.bytes_sent,
                "bytes_read": r.bytes_read,
                "blocks_sent": r.blocks_sent,
                "zero_blocks_sent": r.zero_blocks_sent,
                "ratio_disk_to_wire": run.disk_to_wire(),
                "ratio_data_to_wire": run.data_to_wire(),
                "cpu_user_s": run.cpu.user_s,
                "cpu_system_s": run.cpu.system_s,
                "verified": true,
            })
        })
        .collect();
    let summary: serde_json::Map<String, serde_json::Value> = levels
        .iter()
        .map(|&level| {
            let rates = rates(runs, level);
            let key = compression_key(level);
            (
                key.to_string(),
                json!({
                    "mb_per_s_median": median(&rates),
                    "mb_per_s_best": rates.iter().cloned().fold(0.0, f64::max),
                }),
            )
        })
        .collect();
    json!({
        "image": {
            "path": image.path,
            "size_bytes": image.size_bytes,
            "data_bytes": image.data_bytes,
            "synthetic": matches!(image.kind, ImageKind::Synthetic { .. }),
            "description": image.describe(),
        },
        "block_size": settings.block_size,
        "io_size": settings.io_size,
        "queue_depth": settings.queue_depth,
        "workers": settings.workers,
        "engine": format!("{:?}", settings.engine).to_lowercase(),
        "runs": runs_json,
        "summary": summary,
    })
}

fn default_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The image for this size and fill, built on first use and kept in `work`. It is
/// written under a temporary name and renamed, so an image that exists is complete;
/// its description is kept beside it.
fn cached_image(
    work: &Path,
    size_mib: u64,
    fill_percent: u32,
    quiet: bool,
) -> Result<ImageInfo, CliError> {
    let path = work.join(format!("os-{size_mib}MiB-{fill_percent}pct.img"));
    let info_path = work.join(format!("os-{size_mib}MiB-{fill_percent}pct.info"));
    let cached = fs::metadata(&path)
        .ok()
        .filter(|m| m.len() == size_mib * MIB);
    if let (Some(meta), Ok(text)) = (cached, fs::read_to_string(&info_path)) {
        // Four lines: kind, comma-separated sources, synthetic reason, data bytes.
        let lines: Vec<&str> = text.lines().collect();
        if let [kind, sources, reason, data_bytes] = lines[..] {
            let kind = if kind == "ext4" {
                ImageKind::Ext4 {
                    sources: sources
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                        .collect(),
                }
            } else {
                ImageKind::Synthetic {
                    reason: reason.to_string(),
                }
            };
            return Ok(ImageInfo {
                path,
                size_bytes: meta.len(),
                data_bytes: data_bytes.parse().unwrap_or(0),
                kind,
            });
        }
    }
    if !quiet {
        println!(
            "building a {size_mib} MiB disk image of OS files in {} (kept for later runs)...",
            work.display()
        );
    }
    let info = imagegen::make_os_image(&path, size_mib, fill_percent)?;
    let text = match &info.kind {
        ImageKind::Ext4 { sources } => {
            let sources: Vec<String> = sources.iter().map(|p| p.display().to_string()).collect();
            format!("ext4\n{}\n\n{}\n", sources.join(","), info.data_bytes)
        }
        ImageKind::Synthetic { reason } => format!("synthetic\n\n{reason}\n{}\n", info.data_bytes),
    };
    fs::write(&info_path, text).map_err(IoFailure::on("cannot write", &info_path))?;
    Ok(info)
}

/// Deletes the replica and both sides' state so that the next sync is a full one.
fn reset(replica: &Path, source_state: &Path, target_state: &Path) -> Result<(), IoFailure> {
    remove_if_present(replica)?;
    remove_if_present(&source_state.join(format!("{DISK_NAME}.state")))?;
    remove_if_present(&target_state.join(format!("{DISK_NAME}.replica")))?;
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), IoFailure> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(IoFailure::on("cannot remove", path)(e)),
    }
}

/// CPU time of this whole process (every thread of source and target), seconds.
#[derive(Debug, Default, Clone, Copy)]
struct CpuTime {
    user_s: f64,
    system_s: f64,
}

impl CpuTime {
    fn now() -> CpuTime {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `usage` is a zeroed rusage on this stack frame, writable for the
        // duration of the call; getrusage(2) fills it and keeps no pointer to it.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
        if rc != 0 {
            // RUSAGE_SELF with a valid pointer cannot fail; report no CPU time rather
            // than abort a measurement over it.
            return CpuTime::default();
        }
        // SAFETY: zero is a valid bit pattern for every field of rusage (plain integers),
        // and getrusage returned success, so the struct holds its answer.
        let usage = unsafe { usage.assume_init() };
        let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        CpuTime {
            user_s: secs(usage.ru_utime),
            system_s: secs(usage.ru_stime),
        }
    }

    fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime {
            user_s: self.user_s - earlier.user_s,
            system_s: self.system_s - earlier.system_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn cpu_time_moves_forward() {
        let a = CpuTime::now();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let d = CpuTime::now().since(&a);
        assert!(d.user_s >= 0.0 && d.system_s >= 0.0);
    }
}
