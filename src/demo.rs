//! `ferry demo`: the main job on sample disks, with no arguments and no set-up.
//!
//! In a temp folder it builds two source disks (an ext4 image of real OS files and a
//! data disk), starts a target writer on loopback in this process, and runs the
//! replication workflow: initial full sync, a seeded re-sync after changes made behind
//! ferry's back (checksum compare), and a changed-block sync driven by a tracking
//! bitmap; then the shim serves both disks while a guest stand-in writes through it
//! and the engine replicates continuously (`demo_live`). After every step each
//! replica is compared with its source byte for byte.
//!
//! The loopback rig (an in-process target plus a [`SyncJob`] with the product
//! defaults) is shared with `ferry bench`.

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::config::{
    DEFAULT_BLOCK_SIZE_KIB, DEFAULT_COMPRESSION_LEVEL, DEFAULT_CONNECT_TIMEOUT_MS,
    DEFAULT_IO_SIZE_KIB, DEFAULT_IO_TIMEOUT_MS, DEFAULT_MAX_SESSIONS, DEFAULT_QUEUE_DEPTH,
    DEFAULT_WORKERS,
};
use dataplane::io::EngineKind;
use dataplane::psk::Psk;
use dataplane::source::{self, JobDisk, ModeRequest, SourceDiskState, SyncJob, SyncReport};
use dataplane::writer::{Target, TargetDisk, TargetJob};
use filter_driver_shim_contract::bitmap::{ChangedBlockBitmap, GenerationId};

use crate::chain;
use crate::imagegen::{self, TempDir, MIB};

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
pub fn run() -> Result<(), String> {
    let work = TempDir::new("ferry-demo")?;
    println!(
        "ferry demo: two sample disks replicated over loopback, in {}",
        work.path().display()
    );

    let source_dir = work.path().join("source");
    let replica_dir = work.path().join("replica");
    let source_state = work.path().join("source-state");
    let target_state = work.path().join("target-state");
    for dir in [&source_dir, &replica_dir] {
        std::fs::create_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
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
    let disks = [("vm1-os", &os_image), ("vm1-data", &data_image)];
    for (name, image) in &disks {
        println!("  source disk {name}: {}", image.describe());
    }

    let target_disks = disks
        .iter()
        .map(|(name, _)| TargetDisk {
            name: name.to_string(),
            path: replica_dir.join(format!("{name}.img")),
        })
        .collect::<Vec<_>>();
    let rig = Rig::start(
        &target_state,
        target_disks.clone(),
        DEFAULT_QUEUE_DEPTH as usize,
    )?;
    println!(
        "  target writer listening on {} (in this process), replicas in {}",
        rig.addr,
        replica_dir.display()
    );
    println!();

    let job_disks: Vec<JobDisk> = disks
        .iter()
        .map(|(name, image)| JobDisk {
            name: name.to_string(),
            path: image.path.clone(),
            bitmap: None,
        })
        .collect();
    let pairs: Vec<(PathBuf, PathBuf)> = disks
        .iter()
        .zip(&target_disks)
        .map(|((_, image), replica)| (image.path.clone(), replica.path.clone()))
        .collect();
    let mut job = rig.sync_job(
        &source_state,
        job_disks,
        ModeRequest::Auto,
        Some(DEFAULT_COMPRESSION_LEVEL),
    );
    let block_size = job.block_size;

    let mut steps = Vec::new();
    let mut failures = Vec::new();

    // 1. Initial replication: the replicas do not exist yet, so auto picks full.
    let step = Step::run("initial replication", &job, 0, "full", &pairs)?;
    step.print(1);
    failures.extend(step.problems.iter().map(|p| format!("step 1: {p}")));
    steps.push(step);

    // 2. Changes made behind ferry's back (no tracking): auto picks seeded, the two
    //    sides compare block hashes and only differing blocks travel.
    let mut changed = 0;
    for (seed, (_, image)) in disks.iter().enumerate() {
        changed += imagegen::mutate_blocks(
            &image.path,
            block_size,
            SEEDED_CHANGE_FRACTION,
            100 + seed as u64,
        )?
        .len();
    }
    let label = format!("{:.0}% changed, untracked", SEEDED_CHANGE_FRACTION * 100.0);
    let step = Step::run(&label, &job, changed, "seeded", &pairs)?;
    step.print(2);
    failures.extend(step.problems.iter().map(|p| format!("step 2: {p}")));
    steps.push(step);

    // 3. Changes tracked by a changed-block bitmap of the replica's generation and epoch,
    //    as the filter shim keeps them: only the marked blocks are read and sent.
    let mut changed = 0;
    for (seed, (disk, (name, image))) in job.disks.iter_mut().zip(&disks).enumerate() {
        let blocks = imagegen::mutate_blocks(
            &image.path,
            block_size,
            TRACKED_CHANGE_FRACTION,
            200 + seed as u64,
        )?;
        changed += blocks.len();
        let bitmap_path = work.path().join(format!("{name}.cbt"));
        write_bitmap(
            &source_state,
            name,
            image.size_bytes,
            block_size,
            &blocks,
            &bitmap_path,
        )?;
        disk.bitmap = Some(bitmap_path);
    }
    job.mode = ModeRequest::Changed;
    let label = format!("{:.0}% changed, tracked", TRACKED_CHANGE_FRACTION * 100.0);
    let step = Step::run(&label, &job, changed, "changed", &pairs)?;
    step.print(3);
    failures.extend(step.problems.iter().map(|p| format!("step 3: {p}")));
    steps.push(step);

    // 4. The protected machine runs: a guest writes through the shim while the
    //    engine replicates continuously, one epoch every few hundred milliseconds.
    let names: Vec<(String, PathBuf)> = disks
        .iter()
        .map(|(name, image)| (name.to_string(), image.path.clone()))
        .collect();
    let live = crate::demo_live::run(work.path(), &job, &names, &pairs)?;
    crate::demo_live::print(4, &live);
    failures.extend(live.problems.iter().map(|p| format!("step 4: {p}")));

    print_summary(&steps, &pairs);
    if live.problems.is_empty() {
        println!(
            "  step 4: replicas byte-for-byte identical to the sources after {} live epochs",
            live.epochs.len()
        );
    }
    if failures.is_empty() {
        println!("demo passed: every replica equals its source after every step.");
        Ok(())
    } else {
        Err(format!("demo failed:\n  {}", failures.join("\n  ")))
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
    ) -> Result<Step, String> {
        let report =
            source::sync(job).map_err(|e| format!("{label}: sync failed: {}", chain(&e)))?;
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
                    problems.push(problem);
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
    println!("  (MB/s = disk bytes covered per second, 10^6 bytes; blocks are 64 KiB)");
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
) -> Result<(), String> {
    let state = SourceDiskState::load(state_dir, disk)
        .map_err(|e| format!("disk {disk}: {}", chain(&e)))?
        .ok_or_else(|| {
            format!(
                "disk {disk}: no state file {} after a successful sync",
                SourceDiskState::path(state_dir, disk).display()
            )
        })?;
    let generation = state
        .generation_bytes()
        .map_err(|problem| format!("disk {disk}: state file: {problem}"))?;
    let block_size = u32::try_from(block_size)
        .map_err(|_| format!("block size {block_size} does not fit a bitmap"))?;
    let mut bitmap = ChangedBlockBitmap::new(
        disk_size,
        block_size,
        GenerationId::from_bytes(generation),
        state.epoch,
    )
    .map_err(|e| format!("disk {disk}: cannot make a bitmap: {}", chain(&e)))?;
    for &block in blocks {
        bitmap
            .set(block)
            .map_err(|e| format!("disk {disk}: cannot mark block {block}: {}", chain(&e)))?;
    }
    bitmap.save(out).map_err(|e| {
        format!(
            "disk {disk}: cannot save bitmap {}: {}",
            out.display(),
            chain(&e)
        )
    })
}

/// A target writer serving on loopback from a thread of this process.
pub(crate) struct Rig {
    pub addr: SocketAddr,
    pub psk: [u8; 32],
}

impl Rig {
    /// Binds a target on `127.0.0.1:0` for `disks` and serves it on a background
    /// thread that lives as long as the process.
    pub fn start(
        state_dir: &Path,
        disks: Vec<TargetDisk>,
        queue_depth: usize,
    ) -> Result<Rig, String> {
        let psk = Psk::generate()
            .map_err(|e| format!("cannot generate a pre-shared key: {}", chain(&e)))?;
        let psk = *psk.as_bytes();
        let job = TargetJob {
            listen: "127.0.0.1:0".into(),
            psk,
            state_dir: state_dir.to_path_buf(),
            disks,
            queue_depth,
            engine: EngineKind::Auto,
            io_timeout: Duration::from_millis(DEFAULT_IO_TIMEOUT_MS),
            max_sessions: DEFAULT_MAX_SESSIONS as usize,
            retention: dataplane::writer::points::Retention {
                points: 4,
                minutes: 0,
            },
        };
        let target =
            Target::bind(job).map_err(|e| format!("cannot start the target: {}", chain(&e)))?;
        let addr = target
            .local_addr()
            .map_err(|e| format!("cannot learn the target's address: {e}"))?;
        std::thread::Builder::new()
            .name("ferry-target".into())
            .spawn(move || {
                if let Err(e) = target.serve() {
                    tracing::error!("target stopped: {}", chain(&e));
                }
            })
            .map_err(|e| format!("cannot start the target thread: {e}"))?;
        Ok(Rig { addr, psk })
    }

    /// A sync job against this target with the product's defaults.
    pub fn sync_job(
        &self,
        state_dir: &Path,
        disks: Vec<JobDisk>,
        mode: ModeRequest,
        zstd_level: Option<i32>,
    ) -> SyncJob {
        SyncJob {
            target: self.addr.to_string(),
            psk: self.psk,
            state_dir: state_dir.to_path_buf(),
            disks,
            block_size: DEFAULT_BLOCK_SIZE_KIB as usize * 1024,
            io_size: DEFAULT_IO_SIZE_KIB as usize * 1024,
            queue_depth: DEFAULT_QUEUE_DEPTH as usize,
            workers: DEFAULT_WORKERS as usize,
            zstd_level,
            engine: EngineKind::Auto,
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS),
            io_timeout: Duration::from_millis(DEFAULT_IO_TIMEOUT_MS),
            mode,
            shim_control: None,
            require_shim: false,
        }
    }
}

/// Compares two files byte for byte; `Ok(bytes compared)` when they are identical,
/// `Err` naming the first difference (or the failed read) otherwise.
pub(crate) fn compare_files(source: &Path, replica: &Path) -> Result<u64, String> {
    /// Large enough that the comparison runs at memory speed, small enough to stay off
    /// the heap's large-allocation path twice over.
    const CHUNK_BYTES: usize = 4 << 20;
    let open = |p: &Path| {
        File::open(p).map_err(|e| format!("cannot open {} to verify it: {e}", p.display()))
    };
    let (mut a, mut b) = (open(source)?, open(replica)?);
    let len = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| format!("cannot stat {}: {e}", p.display()))
    };
    let (len_a, len_b) = (len(&a, source)?, len(&b, replica)?);
    if len_a != len_b {
        return Err(format!(
            "replica {} is {len_b} bytes, its source {} is {len_a} bytes",
            replica.display(),
            source.display()
        ));
    }
    let mut buf_a = vec![0u8; CHUNK_BYTES];
    let mut buf_b = vec![0u8; CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < len_a {
        let n = (len_a - offset).min(CHUNK_BYTES as u64) as usize;
        a.read_exact(&mut buf_a[..n])
            .map_err(|e| format!("cannot read {} at offset {offset}: {e}", source.display()))?;
        b.read_exact(&mut buf_b[..n])
            .map_err(|e| format!("cannot read {} at offset {offset}: {e}", replica.display()))?;
        if buf_a[..n] != buf_b[..n] {
            let at = buf_a[..n]
                .iter()
                .zip(&buf_b[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Err(format!(
                "replica {} differs from its source {} at byte {}",
                replica.display(),
                source.display(),
                offset + at as u64
            ));
        }
        offset += n as u64;
    }
    Ok(len_a)
}

/// The last two components of `path` (`replica/vm1-os.img`): the work dir was printed once.
fn short(path: &Path) -> String {
    let parts: Vec<_> = path.iter().collect();
    let tail = &parts[parts.len().saturating_sub(2)..];
    tail.iter().collect::<PathBuf>().display().to_string()
}

/// `bytes` in MiB for humans.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_files_finds_the_first_difference() {
        let dir = TempDir::new("ferry-demo-test").expect("temp dir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let mut bytes = vec![7u8; 5 << 20];
        std::fs::write(&a, &bytes).expect("write a");
        std::fs::write(&b, &bytes).expect("write b");
        assert_eq!(compare_files(&a, &b), Ok(5 << 20));
        bytes[(4 << 20) + 3] = 8;
        std::fs::write(&b, &bytes).expect("rewrite b");
        let err = compare_files(&a, &b).expect_err("differs");
        assert!(err.contains(&format!("at byte {}", (4 << 20) + 3)), "{err}");
        std::fs::write(&b, &bytes[..10]).expect("shorten b");
        assert!(compare_files(&a, &b)
            .expect_err("sizes")
            .contains("is 10 bytes"));
    }
}
