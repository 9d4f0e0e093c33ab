//! One engine per state directory: `<state_dir>/engine.lock`.
//!
//! Two engines on one set of disks would interleave epochs, each recording its own
//! epoch numbers and committing the shim's bits the other one shipped. `ferry source`
//! takes the lock when it starts and keeps it until it exits; `ferry sync` takes it for
//! its one epoch. Whoever comes second is refused at once, with the holder's command
//! and pid, which the holder writes into the lock file. The lock is an `flock`, so the
//! kernel releases it when its holder dies, kill -9 included; the file's content is
//! only a note for the refusal message and for operators (`cat engine.lock`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::SourceError;
use crate::durable::{self, LockMode, StateOp};

/// The lock file's name in the engine's `state_dir`.
pub const ENGINE_LOCK_FILE: &str = "engine.lock";

/// Which command holds the lock; named in the refusal another engine gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineRole {
    /// `ferry sync`: one epoch.
    Sync,
    /// `ferry source`: for the life of the process.
    Source,
}

impl EngineRole {
    fn command(self) -> &'static str {
        match self {
            EngineRole::Sync => "ferry sync",
            EngineRole::Source => "ferry source",
        }
    }
}

/// The engine's lock, held until dropped.
#[derive(Debug)]
pub struct EngineLock {
    _held: File,
}

/// How long a lock held under this process's own pid is waited for. That happens
/// only when a process forked by this one (a thread of a test, or of an embedding
/// program, spawning a command) still holds a copy of the descriptor between fork and
/// exec, which must not fail a sync; another process is refused at once.
const OWN_PID_PATIENCE: Duration = Duration::from_secs(2);
/// How long a held lock with no readable holder is waited for: the holder writes its
/// pid right after taking the lock, so this covers only that moment.
const UNNAMED_HOLDER_PATIENCE: Duration = Duration::from_millis(200);
/// Pause between attempts while waiting.
const RETRY: Duration = Duration::from_millis(10);

/// The holder as its lock file describes it.
#[derive(Debug, PartialEq, Eq)]
struct Holder {
    pid: u32,
    command: String,
}

impl Holder {
    fn encode(&self) -> String {
        format!("pid {}\ncommand {}\n", self.pid, self.command)
    }

    fn parse(text: &str) -> Option<Holder> {
        let mut pid = None;
        let mut command = None;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("command", v)) => command = Some(v.trim().to_string()),
                _ => {}
            }
        }
        Some(Holder {
            pid: pid?,
            command: command.unwrap_or_else(|| "an engine".into()),
        })
    }
}

impl EngineLock {
    /// Takes the lock of `state_dir` (created mode 0700 if missing) for `role`, or
    /// refuses with [`SourceError::Busy`] naming the engine that holds it.
    pub fn acquire(state_dir: &Path, role: EngineRole) -> Result<EngineLock, SourceError> {
        durable::ensure_dir(state_dir).map_err(|source| SourceError::State {
            path: state_dir.to_path_buf(),
            op: StateOp::Create,
            source,
        })?;
        let path = state_dir.join(ENGINE_LOCK_FILE);
        let flock_error = |source: io::Error| SourceError::State {
            path: path.clone(),
            op: StateOp::Lock,
            source,
        };
        let started = Instant::now();
        loop {
            match durable::lock(&path, LockMode::ExclusiveTry).map_err(flock_error)? {
                Some(file) => {
                    // The note only names the holder in refusals; without it (a full
                    // state_dir) the lock still holds, and refusals say "pid not recorded".
                    if let Err(e) = record_holder(&file, role) {
                        tracing::warn!(lock = %path.display(), "cannot record this engine's pid in its lock file: {e}");
                    }
                    return Ok(EngineLock { _held: file });
                }
                None => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| Holder::parse(&t));
                    let patience = match &holder {
                        Some(h) if h.pid == std::process::id() => OWN_PID_PATIENCE,
                        Some(_) => Duration::ZERO,
                        None => UNNAMED_HOLDER_PATIENCE,
                    };
                    if started.elapsed() >= patience {
                        return Err(busy(state_dir, &path, holder.as_ref()));
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
    }
}

/// Replaces the lock file's note with this process.
fn record_holder(file: &File, role: EngineRole) -> io::Result<()> {
    let note = Holder {
        pid: std::process::id(),
        command: role.command().to_string(),
    }
    .encode();
    file.set_len(0)?;
    file.write_all_at(note.as_bytes(), 0)
}

fn busy(state_dir: &Path, path: &Path, holder: Option<&Holder>) -> SourceError {
    SourceError::Busy {
        state_dir: state_dir.to_path_buf(),
        lock: path.to_path_buf(),
        holder: holder.map(|h| format!("{} (pid {})", h.command, h.pid)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_note_round_trips_and_tolerates_garbage() {
        let h = Holder {
            pid: 4242,
            command: "ferry source".into(),
        };
        assert_eq!(Holder::parse(&h.encode()), Some(h));
        assert_eq!(Holder::parse(""), None);
        assert_eq!(Holder::parse("garbage"), None);
        assert_eq!(
            Holder::parse("pid 7\n"),
            Some(Holder {
                pid: 7,
                command: "an engine".into()
            })
        );
    }

    #[test]
    fn second_holder_is_refused_with_the_first_ones_name() {
        let dir = tempfile::tempdir().unwrap();
        let held = EngineLock::acquire(dir.path(), EngineRole::Source).unwrap();
        let note = std::fs::read_to_string(dir.path().join(ENGINE_LOCK_FILE)).unwrap();
        assert_eq!(
            note,
            format!("pid {}\ncommand ferry source\n", std::process::id())
        );
        // The same process: waited for (a forked child's copy), then refused.
        let err = EngineLock::acquire(dir.path(), EngineRole::Sync).unwrap_err();
        let SourceError::Busy { holder, lock, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(
            holder.as_deref(),
            Some(format!("ferry source (pid {})", std::process::id()).as_str())
        );
        assert_eq!(lock, &dir.path().join(ENGINE_LOCK_FILE));
        drop(held);
        let again = EngineLock::acquire(dir.path(), EngineRole::Sync).unwrap();
        let note = std::fs::read_to_string(dir.path().join(ENGINE_LOCK_FILE)).unwrap();
        assert!(note.contains("command ferry sync"), "{note}");
        drop(again);
    }
}
