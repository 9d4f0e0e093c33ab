//! `ferry demo`: the main job on sample disks, with no arguments and no set-up.
//!
//! In a temp folder it builds two source disks (an ext4 image of real OS files and a
//! data disk), starts a target writer on loopback in this process, and runs the
//! replication workflow: initial full sync, a seeded re-sync after changes made behind
//! ferry's back (checksum compare), and a changed-block sync driven by a tracking
//! bitmap; then the shim serves both disks while a guest stand-in writes through it
//! and the engine replicates continuously ([`live`]), and a planned failover hands the
//! disks over; then the secondary replicates back to the demoted primary and the VM
//! goes home ([`failback`]). After every step each replica is compared with its source
//! byte for byte.
//!
//! The loopback rig (an in-process target plus a [`SyncJob`] with the product
//! defaults) is in [`rig`], shared with the live step and with `ferry bench`; this
//! module uses both, and neither uses this one.

mod failback;
mod live;
pub mod rig;

use std::path::{Path, PathBuf};

use dataplane::config::{DEFAULT_COMPRESSION_LEVEL, DEFAULT_QUEUE_DEPTH};
use dataplane::source::{self, JobDisk, ModeRequest, SourceDiskState, SyncJob, SyncReport};
use dataplane::writer::TargetDisk;
use filter_driver_shim_contract::bitmap::ChangedBlockBitmap;

pub use rig::DemoError;
use rig::{compare_files, mib, Rig};

use dataplane::chain;

use crate::imagegen::{self, ImageInfo, TempDir};
use crate::io_failure::IoFailure;

/// The OS disk: big enough to hold a real tree of files, small enough to build and
/// replicate in seconds.
const OS_DISK_MIB: u64 = 256;
const OS_DISK_FILL_PERCENT: u32 = 60;
/// The second disk of the machine, a data volume; synthetic so it differs in kind.
const DATA_DISK_MIB: u64 = 64;
const DATA_DISK_FILL_PERCENT: u32 = 40;
/// Share of blocks changed behind ferry's back before the seeded re-sync.
const SEEDED_CHANGE_FRACTION: f64 = 0.01;
/// Share of blocks written "by the guest" and tracked in a bitmap before the
/// changed-block sync.
const TRACKED_CHANGE_FRACTION: f64 = 0.03;

/// Runs the demo; `Err` if any replication or verification step fails.
pub fn run() -> Result<(), DemoError> {
    let work = TempDir::new("ferry-demo")?;
    println!(
        "ferry demo: two sample disks replicated over loopback, in {}",
        work.path().display()
    );
    let source_state = work.path().join("source-state");
    let machine = Machine::build(work.path())?;
    let rig = machine.start_target(&work.path().join("target-state"))?;
    let mut job = rig.sync_job(
        &source_state,
        machine.job_disks(),
        ModeRequest::Auto,
        Some(DEFAULT_COMPRESSION_LEVEL).into(),
    );
    let pairs = &machine.pairs;
    let mut outcome = Outcome::default();

    // 1. Initial replication: the replicas do not exist yet, so auto picks full.
    outcome.record(1, Step::run("initial replication", &job, 0, "full", pairs)?);

    // 2. Changes made behind ferry's back (no tracking): auto picks seeded, the two
    //    sides compare block hashes and only differing blocks travel.
    let changed = machine.change_untracked(job.block_size)?;
    let label = format!("{:.0}% changed, untracked", SEEDED_CHANGE_FRACTION * 100.0);
    outcome.record(2, Step::run(&label, &job, changed, "seeded", pairs)?);

    // 3. Changes tracked by a changed-block bitmap of the replica's generation and epoch,
    //    as the filter shim keeps them: only the marked blocks are read and sent.
    let changed = machine.change_tracked(work.path(), &mut job)?;
    job.mode = ModeRequest::Changed;
    let label = format!("{:.0}% changed, tracked", TRACKED_CHANGE_FRACTION * 100.0);
    outcome.record(3, Step::run(&label, &job, changed, "changed", pairs)?);

    // 4. The protected machine runs: a guest writes through the shim while the
    //    engine replicates continuously, one epoch every few hundred milliseconds.
    let live = live::run(work.path(), &job, &machine.names(), pairs)?;
    live::print(4, &live);

    // 6, 7. The VM runs at the secondary site, which replicates back to the primary
    //    (delta only); then it goes home (failback), delta only again.
    let back = failback::run(
        work.path(),
        &job,
        &rig,
        machine.names(),
        machine
            .replicas
            .iter()
            .map(|r| (r.name.clone(), r.path.clone()))
            .collect(),
    )?;
    failback::print(&back);
    outcome.finish(live, back, pairs)
}

/// The demo's protected machine: its sample disks and where their replicas go.
struct Machine {
    disks: Vec<(&'static str, ImageInfo)>,
    replica_dir: PathBuf,
    replicas: Vec<TargetDisk>,
    /// (source image, replica) of every disk, for the comparisons.
    pairs: Vec<(PathBuf, PathBuf)>,
}

impl Machine {
    /// Builds the two sample disks under `work/source`, printing what they hold;
    /// their replicas will be in `work/replica`.
    fn build(work: &Path) -> Result<Machine, DemoError> {
        let source_dir = work.join("source");
        let replica_dir = work.join("replica");
        for dir in [&source_dir, &replica_dir] {
            std::fs::create_dir(dir).map_err(IoFailure::on("cannot create", dir))?;
        }
        let os_image = imagegen::make_os_image(
            &source_dir.join("vm1-os.img"),
            OS_DISK_MIB,
            OS_DISK_FILL_PERCENT,
        )?;
        let data_image = imagegen::make_synthetic_image(
            &source_dir.join("vm1-data.img"),
            DATA_DISK_MIB,
            DATA_DISK_FILL_PERCENT,
            0xda7a,
            "the data disk is synthetic by design".into(),
        )?;
        let disks = vec![("vm1-os", os_image), ("vm1-data", data_image)];
        for (name, image) in &disks {
            println!("  source disk {name}: {}", image.describe());
        }
        let replicas: Vec<TargetDisk> = disks
            .iter()
            .map(|(name, _)| TargetDisk {
                name: name.to_string(),
                path: replica_dir.join(format!("{name}.img")),
            })
            .collect();
        let pairs = disks
            .iter()
            .zip(&replicas)
            .map(|((_, image), replica)| (image.path.clone(), replica.path.clone()))
            .collect();
        Ok(Machine {
            disks,
            replica_dir,
            replicas,
            pairs,
        })
    }

    /// Starts the target writer for this machine's replicas and says where it is.
    fn start_target(&self, state_dir: &Path) -> Result<Rig, DemoError> {
        let rig = Rig::start(
            state_dir,
            self.replicas.clone(),
            DEFAULT_QUEUE_DEPTH as usize,
        )?;
        println!(
            "  target writer listening on {} (in this process), replicas in {}",
            rig.addr,
            self.replica_dir.display()
        );
        println!();
        Ok(rig)
    }

    fn job_disks(&self) -> Vec<JobDisk> {
        self.disks
            .iter()
            .map(|(name, image)| JobDisk {
                name: name.to_string(),
                path: image.path.clone(),
                bitmap: None,
            })
            .collect()
    }

    fn names(&self) -> Vec<(String, PathBuf)> {
        self.disks
            .iter()
            .map(|(name, image)| (name.to_string(), image.path.clone()))
            .collect()
    }

    /// Changes [`SEEDED_CHANGE_FRACTION`] of every disk's blocks with no tracking;
    /// returns how many blocks changed.
    fn change_untracked(&self, block_size: usize) -> Result<usize, DemoError> {
        let mut changed = 0;
        for (seed, (_, image)) in self.disks.iter().enumerate() {
            changed += imagegen::mutate_blocks(
                &image.path,
                block_size,
                SEEDED_CHANGE_FRACTION,
                100 + seed as u64,
            )?
            .len();
        }
        Ok(changed)
    }

    /// Changes [`TRACKED_CHANGE_FRACTION`] of every disk's blocks and gives each of
    /// `job`'s disks a bitmap of them, as the shim would; returns how many changed.
    fn change_tracked(&self, work: &Path, job: &mut SyncJob) -> Result<usize, DemoError> {
        let mut changed = 0;
        for (seed, (disk, (name, image))) in job.disks.iter_mut().zip(&self.disks).enumerate() {
            let blocks = imagegen::mutate_blocks(
                &image.path,
                job.block_size,
                TRACKED_CHANGE_FRACTION,
                200 + seed as u64,
            )?;
            changed += blocks.len();
            let bitmap_path = work.join(format!("{name}.cbt"));
            write_bitmap(
                &job.state_dir,
                name,
                image.size_bytes,
                job.block_size,
                &blocks,
                &bitmap_path,
            )?;
            disk.bitmap = Some(bitmap_path);
        }
        Ok(changed)
    }
}

/// The steps run so far and every check that failed.
#[derive(Default)]
struct Outcome {
    steps: Vec<Step>,
    failures: Vec<String>,
}

impl Outcome {
    fn record(&mut self, number: usize, step: Step) {
        step.print(number);
        self.failures
            .extend(step.problems.iter().map(|p| format!("step {number}: {p}")));
        self.steps.push(step);
    }

    /// Adds the live step, prints the summary and gives the verdict.
    fn finish(
        mut self,
        live: live::LiveOutcome,
        back: failback::Failback,
        pairs: &[(PathBuf, PathBuf)],
    ) -> Result<(), DemoError> {
        self.failures
            .extend(live.problems.iter().map(|p| format!("step 4: {p}")));
        self.failures.extend(
            live.handover
                .problems
                .iter()
                .map(|p| format!("step 5: {p}")),
        );
        self.failures.extend(
            back.problems
                .iter()
                .map(|(step, p)| format!("step {step}: {p}")),
        );
        print_summary(&self.steps, pairs);
        if live.problems.is_empty() {
            println!(
                "  step 4: replicas byte-for-byte identical to the sources after {} live epochs",
                live.epochs.len()
            );
        }
        if live.handover.problems.is_empty() {
            println!(
                "  step 5: promoted replicas byte-for-byte identical to the primary's disks at the cut; a write after it was refused"
            );
        }
        if back.problems.is_empty() {
            let pct = |r: &Option<SyncReport>| {
                r.as_ref().map_or(0.0, |r| {
                    100.0 * r.bytes_sent as f64 / r.bytes_logical.max(1) as f64
                })
            };
            println!(
                "  step 6: the primary's disks byte-for-byte identical to the promoted ones after reverse replication ({:.2}% of the disks sent)",
                pct(&back.reprotect)
            );
            println!(
                "  step 7: after failback and reprotect forward, both sites byte-for-byte identical ({:.2}% sent); no full or seeded resync in the round trip",
                pct(&back.forward)
            );
        }
        if self.failures.is_empty() {
            println!("demo passed: every replica equals its source after every step.");
            Ok(())
        } else {
            Err(DemoError::Failed {
                failures: self.failures,
            })
        }
    }
}

/// One replication step and what was checked after it.
struct Step {
    label: String,
    report: SyncReport,
    /// Blocks the demo changed before this step (0 for the initial sync).
    blocks_changed: usize,
    /// Bytes compared per disk, when the replica matched.
    verified_bytes: Vec<Option<u64>>,
    problems: Vec<String>,
}

impl Step {
    /// Syncs, then checks the mode the engine picked, that no change was left behind
    /// and that every replica equals its source.
    fn run(
        label: &str,
        job: &SyncJob,
        blocks_changed: usize,
        expected_mode: &str,
        pairs: &[(PathBuf, PathBuf)],
    ) -> Result<Step, DemoError> {
        let report = source::sync(job).map_err(|source| DemoError::Sync {
            label: label.to_string(),
            source: Box::new(source),
        })?;
        let mut problems = Vec::new();
        for d in &report.disks {
            if d.mode != expected_mode {
                problems.push(format!(
                    "disk {} was synced in {} mode, expected {expected_mode}",
                    d.name, d.mode
                ));
            }
        }
        if (report.blocks_sent as usize) < blocks_changed {
            problems.push(format!(
                "{blocks_changed} blocks were changed but only {} were sent",
                report.blocks_sent
            ));
        }
        let mut verified_bytes = Vec::new();
        for (source, replica) in pairs {
            match compare_files(source, replica) {
                Ok(bytes) => verified_bytes.push(Some(bytes)),
                Err(problem) => {
                    verified_bytes.push(None);
                    problems.push(chain(&problem));
                }
            }
        }
        Ok(Step {
            label: label.to_string(),
            report,
            blocks_changed,
            verified_bytes,
            problems,
        })
    }

    fn modes(&self) -> String {
        let mut modes: Vec<&str> = self.report.disks.iter().map(|d| d.mode).collect();
        modes.sort_unstable();
        modes.dedup();
        modes.join("+")
    }

    fn print(&self, number: usize) {
        let r = &self.report;
        let changed = if self.blocks_changed > 0 {
            format!("{} blocks changed, ", self.blocks_changed)
        } else {
            String::new()
        };
        println!(
            "step {number} ({}): {} sync, {changed}{} blocks sent, {} on the wire for {} of disk, {:.2} s, {:.0} MB/s",
            self.label,
            self.modes(),
            r.blocks_sent,
            mib(r.bytes_sent),
            mib(r.bytes_logical),
            r.seconds,
            r.mb_per_s
        );
        for problem in &self.problems {
            println!("  FAILED: {problem}");
        }
    }
}

fn print_summary(steps: &[Step], pairs: &[(PathBuf, PathBuf)]) {
    println!();
    println!("summary (epochs acknowledged as durable by the target):");
    println!(
        "  {:<4} {:<24} {:<8} {:>13} {:>13} {:>9} {:>8} {:>7}  replicas",
        "step", "what", "mode", "disk covered", "on the wire", "blocks", "seconds", "MB/s"
    );
    for (i, s) in steps.iter().enumerate() {
        let r = &s.report;
        let verdict = if s.verified_bytes.iter().all(Option::is_some) {
            "identical"
        } else {
            "DIFFER"
        };
        println!(
            "  {:<4} {:<24} {:<8} {:>13} {:>13} {:>9} {:>8.2} {:>7.0}  {verdict}",
            i + 1,
            s.label,
            s.modes(),
            mib(r.bytes_logical),
            mib(r.bytes_sent),
            r.blocks_sent,
            r.seconds,
            r.mb_per_s
        );
    }
    println!("  (MB/s: 10^6 bytes per second of disk covered for full and seeded steps, of blocks read for changed-block steps; blocks are 64 KiB)");
    for (i, (source, replica)) in pairs.iter().enumerate() {
        let all = steps.iter().all(|s| s.verified_bytes[i].is_some());
        let bytes = steps.last().and_then(|s| s.verified_bytes[i]).unwrap_or(0);
        println!(
            "  verification: {} vs {}: {}",
            short(replica),
            short(source),
            if all {
                format!("byte-for-byte identical after every step ({bytes} bytes compared)")
            } else {
                "DIFFERENT after at least one step".to_string()
            }
        );
    }
    println!();
}

/// Writes a changed-block bitmap marking `blocks`, labelled with the generation and epoch
/// the source recorded for `disk` at its last acknowledged sync, as the shim would.
fn write_bitmap(
    state_dir: &Path,
    disk: &str,
    disk_size: u64,
    block_size: usize,
    blocks: &[u64],
    out: &Path,
) -> Result<(), DemoError> {
    let state = SourceDiskState::load(state_dir, disk)
        .map_err(|source| DemoError::DiskState {
            disk: disk.to_string(),
            source: Box::new(source),
        })?
        .ok_or_else(|| DemoError::NoState {
            disk: disk.to_string(),
            path: SourceDiskState::path(state_dir, disk),
        })?;
    let generation = state.generation;
    let block_size = u32::try_from(block_size).map_err(|_| DemoError::BlockSize { block_size })?;
    let mut bitmap = ChangedBlockBitmap::new(disk_size, block_size, generation, state.epoch)
        .map_err(|source| DemoError::BitmapNew {
            disk: disk.to_string(),
            source,
        })?;
    for &block in blocks {
        bitmap.set(block).map_err(|source| DemoError::BitmapMark {
            disk: disk.to_string(),
            block,
            source,
        })?;
    }
    bitmap.save(out).map_err(|source| DemoError::BitmapSave {
        disk: disk.to_string(),
        out: out.to_path_buf(),
        source,
    })
}

/// The last two components of `path` (`replica/vm1-os.img`): the work dir was printed once.
fn short(path: &Path) -> String {
    let parts: Vec<_> = path.iter().collect();
    let tail = &parts[parts.len().saturating_sub(2)..];
    tail.iter().collect::<PathBuf>().display().to_string()
}
