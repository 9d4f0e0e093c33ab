//! The demo's last steps, after the planned failover: the VM runs at the secondary
//! site, which replicates back to the primary (reverse replication, delta only), and
//! then the VM goes home (failback), each step verified byte for byte.
//!
//! Site A is the demo's primary (its disks, the shim's and engine's state in
//! `source-state`); site B is the secondary (the replicas, the target's state in
//! `target-state`). For the way back A gets a target of its own (`a-target-state`, over
//! A's disks) and B a shim and engine (`b-source-state`, over B's disks), as a site with
//! both sections in its config has.
//!
//! 6. **Reprotect.** B's failover is committed; A hands its disks to its target as
//!    replicas (`ferry become-replica`: nothing was written at A after the cut, so
//!    nothing is owed); B's shim serves the promoted replicas and a guest writes
//!    through it; `ferry reprotect` at B sends only what the guest wrote there.
//! 7. **Failback.** The guest writes more at B, `ferry failover planned` at B hands the
//!    disks back to A; A commits, B becomes the replica, A's shim serves the original
//!    disks again, a guest writes at A, and `ferry reprotect` at A sends only that.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::source::{self, JobDisk, ModeRequest, SyncJob, SyncReport};
use dataplane::writer::TargetDisk;
use filter_driver_shim::{Shim, ShimDisk};

use super::live::guest_writes;
use super::rig::{compare_files, mib, DemoError, Rig};
use crate::dr::DrError;
use dataplane::chain;

/// How long the guest writes at each site.
const GUEST_WRITES: Duration = Duration::from_millis(250);

/// One site's view of the demo's disks.
struct SiteDisks {
    /// (name, path) of each disk at this site.
    disks: Vec<(String, PathBuf)>,
    /// Where this site's shim and engine keep their state.
    source_state: PathBuf,
}

impl SiteDisks {
    fn job_disks(&self) -> Vec<JobDisk> {
        self.disks
            .iter()
            .map(|(name, path)| JobDisk {
                name: name.clone(),
                path: path.clone(),
                bitmap: None,
            })
            .collect()
    }

    fn target_disks(&self) -> Vec<TargetDisk> {
        self.disks
            .iter()
            .map(|(name, path)| TargetDisk {
                name: name.clone(),
                path: path.clone(),
            })
            .collect()
    }

    /// Starts a shim over this site's disks (sockets in `work`, named after `site`);
    /// the sockets for the guest.
    fn start_shim(
        &self,
        work: &Path,
        site: &str,
        block_size: usize,
    ) -> Result<(Shim, Vec<(PathBuf, String)>), DemoError> {
        let shim_disks: Vec<ShimDisk> = self
            .disks
            .iter()
            .map(|(name, path)| {
                ShimDisk::in_state_dir(
                    name,
                    path,
                    work.join(format!("{site}-{name}.nbd.sock")),
                    &self.source_state,
                    block_size as u32,
                )
            })
            .collect();
        let sockets = shim_disks
            .iter()
            .map(|d| (d.nbd_socket.clone(), d.name.clone()))
            .collect();
        let control = filter_driver_shim::control::ControlConfig::new(
            self.source_state.join(source::SHIM_CONTROL_SOCKET),
        );
        let shim = Shim::start(shim_disks, Some(control)).map_err(DemoError::ShimStart)?;
        Ok((shim, sockets))
    }

    /// `job` (the engine's settings) over this site's disks, with its shim, to `rig`.
    fn live_job(&self, job: &SyncJob, rig: &Rig) -> SyncJob {
        let mut live = rig.sync_job(
            &self.source_state,
            self.job_disks(),
            ModeRequest::Auto,
            job.compression,
        );
        live.shim_control = Some(self.source_state.join(source::SHIM_CONTROL_SOCKET));
        live.require_shim = true;
        live
    }
}

/// What steps 6 and 7 saw.
#[derive(Default)]
pub struct Failback {
    /// Guest writes (count, bytes) at B before the reverse replication, and its
    /// report.
    pub writes_b: (u64, u64),
    pub reprotect: Option<SyncReport>,
    /// Guest writes at B before the failback, and its final epoch.
    pub writes_b_more: u64,
    pub failback_epoch: Option<u64>,
    /// Guest writes (count, bytes) at A after it, and the forward reverse
    /// replication's report.
    pub writes_a: (u64, u64),
    pub forward: Option<SyncReport>,
    /// (step, problem) for every check that failed.
    pub problems: Vec<(usize, String)>,
}

/// Runs steps 6 and 7. `job` is the demo's engine at A (state `source-state`, to B's
/// target `rig_b`); `a_disks` and `b_disks` are the disks (name, path) at A and B.
pub fn run(
    work: &Path,
    job: &SyncJob,
    rig_b: &Rig,
    a_disks: Vec<(String, PathBuf)>,
    b_disks: Vec<(String, PathBuf)>,
) -> Result<Failback, DemoError> {
    let a = SiteDisks {
        disks: a_disks,
        source_state: job.state_dir.clone(),
    };
    let b = SiteDisks {
        disks: b_disks,
        source_state: work.join("b-source-state"),
    };
    let mut out = Failback::default();
    let bs = job.block_size as u32;

    // 6. Reprotect: B's failover is final, A becomes B's replica, B's VM writes, and
    //    only that travels back.
    dataplane::writer::failover::commit(&rig_b.job).map_err(|e| failed("commit at B")(e.into()))?;
    let rig_a = Rig::start_with_key(
        &work.join("a-target-state"),
        a.target_disks(),
        rig_b.job.queue_depth,
        rig_b.psk,
    )?;
    let handed = crate::dr::hand_site_over(&a.source_state, &rig_a.job, bs, false)
        .map_err(failed("become-replica at A"))?;
    if let Some(d) = handed
        .now
        .iter()
        .find(|d| d.owed.as_ref().map_or(true, |s| s.count() > 0))
    {
        let owes = format!("disk {} of the demoted site owes blocks", d.name);
        out.problems.push((6, owes));
    }
    let (shim_b, sockets_b) = b.start_shim(work, "b", job.block_size)?;
    let (writes, bytes, _) = guest_writes(&sockets_b, GUEST_WRITES, 61)?;
    out.writes_b = (writes, bytes);
    let report = reprotect(&b, job, &rig_a, &rig_b.job.state_dir, "reprotect at B")?;
    check(&mut out.problems, 6, &report, &a, &b);
    out.reprotect = Some(report);

    // 7. Failback: more writes at B, planned failover B → A, B becomes A's replica,
    //    A's VM writes, and only that travels forward.
    out.writes_b_more = guest_writes(&sockets_b, GUEST_WRITES, 62)?.0;
    let handover = source::failover::planned(&b.live_job(job, &rig_a))
        .map_err(|e| failed("failback (planned failover at B)")(e.into()))?;
    out.failback_epoch = handover.demotion.epoch;
    shim_b.shutdown().map_err(DemoError::ShimShutdown)?;
    for ((_, pa), (_, pb)) in a.disks.iter().zip(&b.disks) {
        if let Err(p) = compare_files(pb, pa) {
            let differs = format!("after the failback: {}", chain(&p));
            out.problems.push((7, differs));
        }
    }
    dataplane::writer::failover::commit(&rig_a.job).map_err(|e| failed("commit at A")(e.into()))?;
    crate::dr::hand_site_over(&b.source_state, &rig_b.job, bs, false)
        .map_err(failed("become-replica at B"))?;
    let (shim_a, sockets_a) = a.start_shim(work, "a", job.block_size)?;
    let (writes, bytes, _) = guest_writes(&sockets_a, GUEST_WRITES, 71)?;
    out.writes_a = (writes, bytes);
    let report = reprotect(&a, job, rig_b, &rig_a.job.state_dir, "reprotect at A")?;
    shim_a.shutdown().map_err(DemoError::ShimShutdown)?;
    check(&mut out.problems, 7, &report, &a, &b);
    out.forward = Some(report);
    Ok(out)
}

/// A failed DR step of the demo, named.
fn failed(step: &'static str) -> impl FnOnce(DrError) -> DemoError {
    move |e| DemoError::Failback {
        step,
        source: Box::new(e),
    }
}

/// `ferry reprotect` at `site` (its shim running) to the target `to`, as the site
/// whose target state `promoted` records its promotion.
fn reprotect(
    site: &SiteDisks,
    job: &SyncJob,
    to: &Rig,
    promoted: &Path,
    step: &'static str,
) -> Result<SyncReport, DemoError> {
    let mut live = site.live_job(job, to);
    let plan = source::reprotect::plan(&live, promoted).map_err(|e| failed(step)(e.into()))?;
    live.reprotect = Some(plan);
    source::reprotect::run(&live, promoted).map_err(|e| failed(step)(e.into()))
}

/// After a reverse replication: every disk went as one (no full or seeded resync), and
/// the two sites' disks are identical.
fn check(
    problems: &mut Vec<(usize, String)>,
    step: usize,
    report: &SyncReport,
    a: &SiteDisks,
    b: &SiteDisks,
) {
    for d in &report.disks {
        if d.mode != "reprotect" {
            problems.push((
                step,
                format!(
                    "disk {} went as a {} sync, expected reprotect",
                    d.name, d.mode
                ),
            ));
        }
    }
    for ((_, pa), (_, pb)) in a.disks.iter().zip(&b.disks) {
        if let Err(p) = compare_files(pa, pb) {
            problems.push((step, chain(&p)));
        }
    }
}

/// Prints steps 6 and 7.
pub fn print(f: &Failback) {
    let line = |r: &SyncReport| {
        format!(
            "{} blocks, {} on the wire ({:.2}% of {}), {} read",
            r.blocks_sent,
            mib(r.bytes_sent),
            100.0 * r.bytes_sent as f64 / r.bytes_logical.max(1) as f64,
            mib(r.bytes_logical),
            mib(r.bytes_read)
        )
    };
    if let Some(r) = &f.reprotect {
        println!(
            "step 6 (reprotect): the old primary became the replica (nothing owed); {} guest writes ({}) at the new primary; reverse replication epoch {}: {}",
            f.writes_b.0,
            mib(f.writes_b.1),
            r.epoch,
            line(r)
        );
    }
    if let Some(r) = &f.forward {
        println!(
            "step 7 (failback): {} more writes at the secondary, planned failover back (final epoch {}); {} guest writes ({}) at home, reprotect forward: {}",
            f.writes_b_more,
            f.failback_epoch.map_or("unknown".into(), |e| e.to_string()),
            f.writes_a.0,
            mib(f.writes_a.1),
            line(r)
        );
    }
    for (step, p) in &f.problems {
        println!("  FAILED (step {step}): {p}");
    }
}
