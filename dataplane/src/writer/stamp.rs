//! What a replica looked like when the writer last left it, to catch writes by anything
//! else (split brain) before an epoch builds on them.
//!
//! After every epoch the writer commits, and after every rollback it performs, the
//! replica's record gets a [`ReplicaStamp`]: what `stat` says of it once its bytes are
//! durable. A session that opens the replica compares the stamp with what `stat` says
//! now; a difference means something other than this writer changed the replica (a VM
//! booted from it, `qemu-io`, `dd`, a restored backup), so the bytes are no longer the
//! acknowledged epoch the record names. Applying another epoch on top would leave the
//! replica different from every epoch for good, so the session is refused, naming what
//! changed, until the operator chooses: discard the replica's changes (a seeded sync
//! compares every block and repairs them) or fail over to the replica as it is.
//!
//! A stamp cannot tell the writer's own writes from another program's while a session
//! is applying an epoch, so during a session the writer also **holds** the replica: an
//! exclusive open-file-description lock over the whole file ([`hold`]). Programs that
//! lock images before writing them — QEMU and its tools (`qemu-io`, `qemu-img`, a VM
//! booted from the replica) — then cannot open it for the session's duration; one that
//! holds such a lock already makes the session fail (retried: the program may be a
//! passing reader). Programs that ignore locks (`dd`) are caught by the stamp between
//! sessions only. Before the lock is released the writer waits for the file system's
//! clock to tick past the stamp ([`wait_for_clock_tick`]), so a write right after the
//! session cannot carry the stamp's time.
//!
//! What can be known:
//! * **Image files:** size, inode (a file replaced by another), the modification time
//!   (`st_mtime`: content writes) and the change time (`st_ctime`: writes, truncation,
//!   permission and owner changes, renames onto it); a time counts as changed only when
//!   it moved forward (a power loss may bring an older one back). The device number is
//!   not compared: device-mapper minors can change across a reboot. The times have the
//!   file system's granularity, which the clock-tick wait above accounts for; a
//!   program that ignores locks and writes while an epoch is being applied is absorbed
//!   by the stamp taken after it. A file system snapshot rolled back under the replica
//!   (ZFS, btrfs, LVM) restores the same inode with older times and goes unseen.
//! * **Block devices:** only the size. Writes to a block device do not change the
//!   times of its device node, so a foreign write cannot be seen from `stat`; the
//!   operator guide says so, and a seeded sync (`--discard-replica-changes`) is the way
//!   to make sure. The lock still keeps QEMU out during sessions.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::{DiskKind, IoError};
use crate::utc::Utc;

/// What backs a replica, as its stamp records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StampKind {
    File,
    BlockDevice,
}

/// `stat` of a replica after the writer left it: see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaStamp {
    pub kind: StampKind,
    pub size: u64,
    /// `st_dev` and `st_ino` for a file; `st_rdev` and 0 for a block device. Only the
    /// inode is compared (see [`ReplicaStamp::changes`]); the device is kept for the
    /// operator reading the record.
    pub dev: u64,
    pub ino: u64,
    /// Nanoseconds since the epoch; 0 for a block device (not meaningful).
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

/// One way a replica differs from its stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StampChange {
    /// The replica's path no longer names anything.
    Missing,
    Kind {
        was: StampKind,
        now: StampKind,
    },
    Size {
        was: u64,
        now: u64,
    },
    /// Another file (or device) now has the replica's path.
    Replaced,
    Modified {
        was_ns: i128,
        now_ns: i128,
    },
    /// Only the change time moved: permissions, owner, or a write whose modification
    /// time was restored.
    Changed {
        was_ns: i128,
        now_ns: i128,
    },
}

impl std::fmt::Display for StampChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => f.write_str("the replica is gone"),
            Self::Kind { was, now } => {
                write!(f, "it was a {} and is now a {}", kind(*was), kind(*now))
            }
            Self::Size { was, now } => write!(f, "its size went from {was} to {now} bytes"),
            Self::Replaced => f.write_str("another file now has its path (device or inode differ)"),
            Self::Modified { was_ns, now_ns } => write!(
                f,
                "it was modified at {} (the writer left it at {})",
                Utc(*now_ns),
                Utc(*was_ns)
            ),
            Self::Changed { was_ns, now_ns } => write!(
                f,
                "its inode was changed at {} (the writer left it at {})",
                Utc(*now_ns),
                Utc(*was_ns)
            ),
        }
    }
}

fn kind(k: StampKind) -> &'static str {
    match k {
        StampKind::File => "file",
        StampKind::BlockDevice => "block device",
    }
}

/// Takes an exclusive open-file-description lock (`F_OFD_SETLK`, `F_WRLCK`) over all
/// of `file`, held until the file is closed. `Ok(false)` if another open file holds a
/// conflicting lock (a QEMU process has the image open).
pub fn hold(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` is plain data; all-zero is a valid value of it.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    // Zero length: to the end of the file, however it grows.
    lock.l_len = 0;
    // SAFETY: fcntl(F_OFD_SETLK) reads the `flock` we pass for the duration of the call;
    // the descriptor is open (borrowed from `file`).
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Waits until the coarse real-time clock — the one file timestamps are taken from —
/// has moved past the time this is called, so that any later change to a file gets a
/// later timestamp than a stamp taken before the call. A few milliseconds at most (one
/// clock tick); usually none.
pub fn wait_for_clock_tick() {
    let now = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own, for the call's duration.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        (ts.tv_sec, ts.tv_nsec)
    };
    let start = now();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(50);
    while now() <= start && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
}

impl ReplicaStamp {
    /// Stamps the replica at `path` now. `Ok(None)` if nothing is there.
    pub fn take(path: &Path) -> Result<Option<ReplicaStamp>, IoError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(IoError::Disk {
                    op: crate::io::DiskOp::Stat,
                    path: path.to_path_buf(),
                    offset: None,
                    source,
                })
            }
        };
        let (kind, size) = crate::io::identify_path(path)?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(Some(match kind {
            DiskKind::File => ReplicaStamp {
                kind: StampKind::File,
                size,
                dev: meta.dev(),
                ino: meta.ino(),
                mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
                ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            },
            DiskKind::BlockDevice => ReplicaStamp {
                kind: StampKind::BlockDevice,
                size,
                dev: meta.rdev(),
                ino: 0,
                mtime_ns: 0,
                ctime_ns: 0,
            },
        }))
    }

    /// How `now` (what `stat` says of the replica now, `None` if it is gone) differs
    /// from this stamp; empty if it does not.
    pub fn changes(&self, now: Option<&ReplicaStamp>) -> Vec<StampChange> {
        let Some(now) = now else {
            return vec![StampChange::Missing];
        };
        if now.kind != self.kind {
            return vec![StampChange::Kind {
                was: self.kind,
                now: now.kind,
            }];
        }
        let mut changes = Vec::new();
        // The inode, not the device number: device-mapper (LVM) minors, and with them
        // `st_dev`/`st_rdev`, may change across a reboot. A file renamed onto the path
        // has another inode (and a new change time).
        if now.ino != self.ino {
            changes.push(StampChange::Replaced);
        }
        if now.size != self.size {
            changes.push(StampChange::Size {
                was: self.size,
                now: now.size,
            });
        }
        // Only a later time is a change: a power loss may bring back an older one (the
        // replicas are synced with fdatasync, which need not persist the times), and no
        // write makes a file's times go back.
        if now.mtime_ns > self.mtime_ns {
            changes.push(StampChange::Modified {
                was_ns: self.mtime_ns,
                now_ns: now.mtime_ns,
            });
        } else if now.ctime_ns > self.ctime_ns {
            changes.push(StampChange::Changed {
                was_ns: self.ctime_ns,
                now_ns: now.ctime_ns,
            });
        }
        changes
    }
}

/// The changes, joined for a message: "a; b; c".
pub fn describe(changes: &[StampChange]) -> String {
    changes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_held_replica_cannot_be_held_again_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        let (first, second) = (open(), open());
        assert!(hold(&first).unwrap());
        assert!(
            !hold(&second).unwrap(),
            "the lock is exclusive, even in one process"
        );
        drop(first);
        assert!(hold(&second).unwrap(), "closing the file released it");
        wait_for_clock_tick();
    }

    #[test]
    fn a_write_a_replacement_a_truncation_and_a_removal_are_each_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
        let stamp = ReplicaStamp::take(&path).unwrap().unwrap();
        assert!(stamp.changes(Some(&stamp)).is_empty());
        assert!(stamp
            .changes(ReplicaStamp::take(&path).unwrap().as_ref())
            .is_empty());

        // A write: the modification time moves (set explicitly: the test must not
        // depend on the clock ticking between two writes).
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"foreign", 4096).unwrap();
        // 2100-01-01: later than any stamp this test takes.
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(4_102_444_800))
            .unwrap();
        let now = ReplicaStamp::take(&path).unwrap();
        let changes = stamp.changes(now.as_ref());
        assert!(
            matches!(changes.as_slice(), [StampChange::Modified { .. }]),
            "{changes:?}"
        );
        assert!(
            describe(&changes).contains("modified at 2100-01-01 00:00:00 UTC"),
            "{}",
            describe(&changes)
        );
        // A time that went back (a power loss undoing an unsynced time update) is
        // not a change; a time moved forward is.
        let later = ReplicaStamp::take(&path).unwrap().unwrap();
        let mut earlier = later;
        earlier.mtime_ns += 1;
        earlier.ctime_ns += 1;
        assert!(earlier.changes(Some(&later)).is_empty());

        f.set_len(1 << 17).unwrap();
        let changes = stamp.changes(ReplicaStamp::take(&path).unwrap().as_ref());
        assert!(changes.contains(&StampChange::Size {
            was: 1 << 16,
            now: 1 << 17
        }));

        let other = dir.path().join("other.img");
        std::fs::write(&other, vec![0u8; 1 << 16]).unwrap();
        std::fs::rename(&other, &path).unwrap();
        let changes = stamp.changes(ReplicaStamp::take(&path).unwrap().as_ref());
        assert!(changes.contains(&StampChange::Replaced), "{changes:?}");

        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            stamp.changes(ReplicaStamp::take(&path).unwrap().as_ref()),
            vec![StampChange::Missing]
        );
    }
}
