//! The data plane's vocabulary for state files, over the shared durable primitives.
//!
//! The primitives themselves — atomic replacement, directory fsync, owner-only
//! directories, advisory locks — are [`ferry_io::durable`], the one implementation the
//! shim uses too; they are re-exported here so the engine and the writer name one
//! module for everything durable. [`StateOp`] is what the data plane's errors say was
//! being done to a state file when a system call failed.

pub use ferry_io::durable::{
    ensure_dir, lock, sync_dir, temp_path, write_atomic, AtomicStep, AtomicWriteError, LockMode,
};

/// What was being done to a state file or directory (source or target) when a
/// system call failed; the error that carries it holds the path and the `io::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateOp {
    Create,
    Open,
    Read,
    Write,
    WriteHeader,
    Append,
    Stat,
    Size,
    Remove,
    Rename,
    Fsync,
    FsyncDir,
    Fdatasync,
    Lock,
    DrawLogName,
    WriteCommitMark,
    OpenReplicaForRollback,
    RollBack,
    FsyncReplicaAfterRollback,
    SetAside,
    Retire,
    MergeAway,
    KeepAsPoint,
    WriteRecords,
    Copy,
    ApplyToCopy,
}

impl std::fmt::Display for StateOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Create => "create",
            Self::Open => "open",
            Self::Read => "read",
            Self::Write => "write",
            Self::WriteHeader => "write header",
            Self::Append => "append",
            Self::Stat => "stat",
            Self::Size => "size",
            Self::Remove => "remove",
            Self::Rename => "rename",
            Self::Fsync => "fsync",
            Self::FsyncDir => "fsync directory",
            Self::Fdatasync => "fdatasync",
            Self::Lock => "flock",
            Self::DrawLogName => "draw a log name",
            Self::WriteCommitMark => "write commit mark",
            Self::OpenReplicaForRollback => "open replica for rollback",
            Self::RollBack => "roll back",
            Self::FsyncReplicaAfterRollback => "fsync replica after rollback",
            Self::SetAside => "set aside",
            Self::Retire => "retire",
            Self::MergeAway => "merge away",
            Self::KeepAsPoint => "keep as recovery point",
            Self::WriteRecords => "write replica records",
            Self::Copy => "copy",
            Self::ApplyToCopy => "apply to the copy",
        })
    }
}
