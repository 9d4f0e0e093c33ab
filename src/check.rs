//! `ferry check --config FILE [--connect]`: validates a config before it is used, as
//! `nginx -t` does — the file itself, the key (format and mode), the state
//! directories, every disk — and with `--connect` reaches the target and
//! authenticates, without opening any disk. Changes nothing.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use dataplane::config::Config;
use dataplane::psk::{KeyFileAccess, Psk};
use dataplane::source::{self, ModeRequest};

use crate::error::{Category, CliError};

/// One finding.
struct Finding {
    ok: bool,
    /// A warning: usable, but not as it should be.
    warn: bool,
    what: String,
    /// The failure's category, for the exit code.
    category: Category,
}

#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn ok(&mut self, what: impl Into<String>) {
        self.0.push(Finding {
            ok: true,
            warn: false,
            what: what.into(),
            category: Category::Internal,
        });
    }

    fn warn(&mut self, what: impl Into<String>) {
        self.0.push(Finding {
            ok: true,
            warn: true,
            what: what.into(),
            category: Category::Internal,
        });
    }

    fn fail(&mut self, category: Category, what: impl Into<String>) {
        self.0.push(Finding {
            ok: false,
            warn: false,
            what: what.into(),
            category,
        });
    }
}

/// Why `ferry check` failed: the first failure's category decides the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{failed} check(s) failed (first: {first})")]
pub struct CheckFailed {
    pub failed: usize,
    pub first: String,
    pub category: Category,
}

fn key(f: &mut Findings, path: &Path) {
    match Psk::load_with_access(path) {
        Ok((psk, KeyFileAccess::OwnerOnly)) => f.ok(format!(
            "key {}: valid, owner-only (fingerprint {psk:?})",
            path.display()
        )),
        Ok((_, KeyFileAccess::GroupOrOthers { mode })) => f.warn(format!(
            "key {}: valid, but mode {mode:03o} lets others read it; chmod 600",
            path.display()
        )),
        Err(e) => f.fail(Category::Config, format!("key: {}", dataplane::chain(&e))),
    }
}

/// A state directory: exists (or its parent does, to create it) and is writable.
fn state_dir(f: &mut Findings, role: &str, dir: &Path) {
    let probe = if dir.exists() {
        dir
    } else {
        match dir.parent() {
            Some(p) if p.exists() => p,
            _ => {
                f.fail(
                    Category::Io,
                    format!(
                        "{role} state_dir {}: neither it nor its parent exists",
                        dir.display()
                    ),
                );
                return;
            }
        }
    };
    let test = probe.join(format!(".ferry-check-{}", std::process::id()));
    match std::fs::write(&test, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&test);
            f.ok(format!("{role} state_dir {}: writable", dir.display()));
        }
        Err(e) => f.fail(
            Category::Io,
            format!("{role} state_dir {}: not writable: {e}", dir.display()),
        ),
    }
}

/// A disk the source reads: exists, a file or block device, readable, not empty.
fn source_disk(f: &mut Findings, name: &str, path: &Path) {
    let what = format!("disk {name} ({})", path.display());
    match std::fs::metadata(path) {
        Err(e) => f.fail(Category::Io, format!("{what}: {e}")),
        Ok(m) if !(m.is_file() || m.file_type().is_block_device()) => f.fail(
            Category::Config,
            format!("{what}: not a regular file or block device"),
        ),
        Ok(m) => match std::fs::File::open(path) {
            Err(e) => f.fail(
                Category::Io,
                format!("{what}: cannot open it for reading: {e}"),
            ),
            Ok(_) if m.is_file() && m.len() == 0 => {
                f.fail(Category::Config, format!("{what}: empty"))
            }
            Ok(_) if m.is_file() => f.ok(format!("{what}: {} bytes, readable", m.len())),
            Ok(_) => f.ok(format!("{what}: block device, readable")),
        },
    }
}

/// A replica the target writes: exists and writable, or its directory is (it is
/// created at the first sync).
fn replica(f: &mut Findings, name: &str, path: &Path) {
    let what = format!("replica {name} ({})", path.display());
    if path.exists() {
        match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(_) => f.ok(format!("{what}: exists, writable")),
            Err(e) => f.fail(Category::Io, format!("{what}: not writable: {e}")),
        }
        return;
    }
    match path.parent().map(std::fs::metadata) {
        Some(Ok(m)) if m.is_dir() && m.permissions().mode() & 0o200 != 0 => {
            f.ok(format!("{what}: created at the first sync"))
        }
        _ => f.fail(
            Category::Io,
            format!("{what}: missing, and its directory cannot hold it"),
        ),
    }
}

fn gather(cfg: &Config, connect: bool) -> Findings {
    let mut f = Findings::default();
    f.ok(format!(
        "config {}: parsed, {} disk(s)",
        cfg.path().display(),
        cfg.disks.len()
    ));
    if let Some(s) = &cfg.source {
        key(&mut f, &s.psk_file);
        state_dir(&mut f, "[source]", &s.state_dir);
        for d in &cfg.disks {
            if cfg.target.is_none() {
                source_disk(&mut f, &d.name, &d.path);
            }
            if let Some(sock) = &d.nbd_socket {
                if !sock.parent().is_some_and(Path::exists) {
                    f.fail(
                        Category::Config,
                        format!(
                            "disk {}: the directory of nbd_socket {} does not exist",
                            d.name,
                            sock.display()
                        ),
                    );
                }
            }
        }
    }
    if let Some(t) = &cfg.target {
        key(&mut f, &t.psk_file);
        state_dir(&mut f, "[target]", &t.state_dir);
        for d in &cfg.disks {
            if cfg.source.is_some() && d.path.exists() {
                // A site with both roles: the disk is read as a source now.
                source_disk(&mut f, &d.name, &d.path);
            } else {
                replica(&mut f, &d.name, &d.path);
            }
        }
    }
    if connect {
        match &cfg.source {
            None => f.fail(
                Category::Usage,
                "--connect needs a [source] section (the target it names is reached)",
            ),
            Some(s) => match source::SyncJob::from_config(cfg, ModeRequest::Auto)
                .and_then(|job| source::probe_target(&job))
            {
                Ok(version) => f.ok(format!(
                    "target {}: reached and authenticated (protocol version {version}); nothing was opened",
                    s.target
                )),
                Err(e) => {
                    let words = dataplane::chain(&e);
                    let category = CliError::from(e).category();
                    f.fail(category, format!("target {}: {words}", s.target));
                }
            },
        }
    }
    f
}

/// `ferry check`.
pub fn run(config: &Path, connect: bool) -> Result<(), CliError> {
    let cfg = Config::load(config)?;
    let findings = gather(&cfg, connect);
    for x in &findings.0 {
        let tag = match (x.ok, x.warn) {
            (true, false) => "ok  ",
            (true, true) => "warn",
            (false, _) => "FAIL",
        };
        println!("{tag} {}", x.what);
    }
    let failed: Vec<&Finding> = findings.0.iter().filter(|x| !x.ok).collect();
    match failed.first() {
        None => {
            println!("{}: the config is usable", config.display());
            Ok(())
        }
        Some(first) => Err(CliError::Check(CheckFailed {
            failed: failed.len(),
            first: first.what.clone(),
            category: first.category,
        })),
    }
}
