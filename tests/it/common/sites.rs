//! Two DR sites on loopback, each with one config holding both a `[source]` and a
//! `[target]` over its own disks (the layout `ferry become-replica` and `ferry reprotect`
//! expect): the config, the images, and the site's target and shim as processes.
//!
//! [`pair`] makes sites `a` (the primary, its images made by the caller) and `b` (no
//! images yet: its target creates them on the first sync), each pointing its source at
//! the other's target.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use super::nbd::connect_retry;
use super::shim::ShimProc;
use super::{file_hash, free_port, keygen, run_ferry, toml_path, Rng, Run, TargetProc, BLOCK};

/// How long one `ferry` command of a site may take before the test gives up on it.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// One disk of a site: the same name at both sites, an image and a shim socket of each
/// site's own.
#[derive(Debug, Clone)]
pub struct SiteDisk {
    pub name: &'static str,
    pub image: PathBuf,
    /// Where the site's shim serves the disk over NBD (export name [`SiteDisk::name`]).
    pub socket: PathBuf,
    pub size: u64,
}

/// One site: its config (both roles), its disks, its processes.
pub struct Site {
    pub name: &'static str,
    pub config: PathBuf,
    pub source_state: PathBuf,
    pub target_state: PathBuf,
    port: u16,
    pub disks: Vec<SiteDisk>,
    target: Option<TargetProc>,
    shim: Option<ShimProc>,
}

impl Site {
    /// Writes the config of site `name` under `dir/name`: its target listens on `port`,
    /// its source sends to `peer_port`; `disks` are `(name, size)`, all of one group.
    pub fn new(
        dir: &Path,
        name: &'static str,
        key: &Path,
        port: u16,
        peer_port: u16,
        disks: &[(&'static str, u64)],
    ) -> Site {
        let root = dir.join(name);
        std::fs::create_dir_all(&root).unwrap();
        let disks: Vec<SiteDisk> = disks
            .iter()
            .map(|&(n, size)| SiteDisk {
                name: n,
                image: root.join(format!("{n}.img")),
                socket: root.join(format!("{n}.sock")),
                size,
            })
            .collect();
        let source_state = root.join("source-state");
        let target_state = root.join("target-state");
        let mut toml = format!(
            "[source]\ntarget = \"127.0.0.1:{peer_port}\"\npsk_file = {key}\nstate_dir = {}\nio_timeout_ms = 20000\nepoch_interval_ms = 200\n\n\
             [target]\nlisten = \"127.0.0.1:{port}\"\npsk_file = {key}\nstate_dir = {}\nio_timeout_ms = 20000\n",
            toml_path(&source_state),
            toml_path(&target_state),
            key = toml_path(key),
        );
        for d in &disks {
            toml.push_str(&format!(
                "\n[[disk]]\nname = \"{}\"\npath = {}\nnbd_socket = {}\ngroup = \"vm1\"\n",
                d.name,
                toml_path(&d.image),
                toml_path(&d.socket)
            ));
        }
        let config = root.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        Site {
            name,
            config,
            source_state,
            target_state,
            port,
            disks,
            target: None,
            shim: None,
        }
    }

    pub fn start_target(&mut self) {
        self.start_target_env(&[]);
    }

    /// Starts the site's target with extra environment (`FERRY_FAILPOINTS`, say).
    pub fn start_target_env(&mut self, env: &[(&str, &str)]) {
        self.target = Some(
            TargetProc::spawn_env(&self.config, self.port, env)
                .unwrap_or_else(|e| panic!("site {}: target: {e}", self.name)),
        );
    }

    /// Waits for the site's target to exit by itself (a failpoint aborted it).
    pub fn wait_target_gone(&mut self) {
        if let Some(mut t) = self.target.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while t.is_running() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "site {}: the target did not stop",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// `ferry <args> --config <this site's config>` with extra environment: (exit
    /// status, stdout, stderr).
    pub fn ferry_env(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (std::process::ExitStatus, String, String) {
        super::ferry_status(&self.args(args), env)
    }

    /// `args` followed by `--config <this site's config>`.
    fn args<'a>(&'a self, args: &'a [&'a str]) -> Vec<&'a OsStr> {
        let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        all.extend(["--config".as_ref(), self.config.as_os_str()]);
        all
    }

    pub fn kill_target(&mut self) {
        if let Some(mut t) = self.target.take() {
            t.kill();
        }
    }

    pub fn start_shim(&mut self) {
        self.shim = Some(ShimProc::start(&self.config, &self.source_state));
    }

    pub fn stop_shim(&mut self) {
        if let Some(s) = self.shim.take() {
            s.stop();
        }
    }

    pub fn kill_shim(&mut self) {
        if let Some(s) = self.shim.take() {
            s.kill9();
        }
    }

    /// `ferry <args> --config <this site's config>`.
    pub fn ferry(&self, args: &[&str]) -> Run {
        run_ferry(&self.args(args), TIMEOUT)
    }

    /// As [`Site::ferry`]; panics with its output unless it succeeds.
    pub fn ferry_ok(&self, args: &[&str]) -> Run {
        let run = self.ferry(args);
        assert!(
            run.success(),
            "site {}: ferry {args:?} failed ({}):\n{}\n{}",
            self.name,
            run.status,
            run.stdout,
            run.stderr
        );
        run
    }

    /// Starts `ferry <args> --config …` `times` times, each killed with SIGKILL after a
    /// random wait of up to `max_wait`.
    pub fn kill_at_random(&self, args: &[&str], times: usize, max_wait: Duration, rng: &mut Rng) {
        super::kill_at_random(&self.args(args), times, max_wait, rng, || {});
    }

    /// The guest writes `fraction` of each disk's blocks ([`BLOCK`]), random content
    /// each, through the shim with a real NBD client; the blocks written.
    pub fn write(&self, rng: &mut Rng, fraction: f64) -> u64 {
        let mut written = 0;
        for d in &self.disks {
            let mut nbd = connect_retry(&d.socket, d.name, Duration::from_secs(30))
                .expect("connect the guest");
            let blocks = d.size / BLOCK;
            let n = ((blocks as f64 * fraction).ceil() as u64).max(1);
            let mut buf = vec![0u8; BLOCK as usize];
            for _ in 0..n {
                rng.fill(&mut buf);
                nbd.write(rng.below(blocks) * BLOCK, &buf)
                    .expect("guest write");
            }
            nbd.flush().expect("guest flush");
            nbd.disconnect().ok();
            written += n;
        }
        written
    }

    /// The hash of each disk's image, in config order.
    pub fn hashes(&self) -> Vec<u128> {
        self.disks.iter().map(|d| file_hash(&d.image)).collect()
    }
}

/// Fresh sites `a` (the primary) and `b` (the replica, no images yet) under `dir` with
/// one key, each with `disks` (`(name, size)`); `make(image, size)` creates each of
/// `a`'s images with its content.
pub fn pair(
    dir: &Path,
    disks: &[(&'static str, u64)],
    mut make: impl FnMut(&Path, u64),
) -> (Site, Site) {
    let key = dir.join("ferry.key");
    keygen(&key);
    let (pa, pb) = (free_port(), free_port());
    let a = Site::new(dir, "a", &key, pa, pb, disks);
    let b = Site::new(dir, "b", &key, pb, pa, disks);
    for d in &a.disks {
        make(&d.image, d.size);
    }
    (a, b)
}

/// Every disk of `x` equals the same disk of `y`, byte for byte.
pub fn assert_same(x: &Site, y: &Site, when: &str) {
    for (dx, dy) in x.disks.iter().zip(&y.disks) {
        assert_eq!(
            file_hash(&dx.image),
            file_hash(&dy.image),
            "{when}: disk {} differs between site {} and site {}",
            dx.name,
            x.name,
            y.name
        );
    }
}

/// The sync mode of every disk of a `--json` report (`ferry sync` or `ferry reprotect`).
pub fn modes_of(report: &serde_json::Value) -> Vec<String> {
    report["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("no disks[] in {report}"))
        .iter()
        .map(|d| {
            d["mode"]
                .as_str()
                .unwrap_or_else(|| panic!("a disk without a mode in {report}"))
                .to_string()
        })
        .collect()
}
