//! The CLI's one error type. Every subcommand returns [`CliError`]; `main` prints its
//! chain (`ferry: error: a: b: c`) and exits with [`Category::exit_code`].
//!
//! Variants wrap the library errors whole (`#[source]` chains, `transparent` where the
//! library's text is already what the operator should read), so the printed words are
//! the library's and [`CliError::category`] can look inside them.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use dataplane::config::ConfigError;
use dataplane::protocol::{ErrorCode, ProtocolError};
use dataplane::psk::PskError;
use dataplane::source::SourceError;
use dataplane::writer::TargetError;
use filter_driver_shim::backing::IoEngineEnvError;
use filter_driver_shim::ShimError;

use crate::demo::rig::CompareError;
use crate::demo::DemoError;
use crate::imagegen::ImageError;
use crate::io_failure::IoFailure;

/// What kind of failure ended the command: what an operator or a supervising script
/// does next depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// The command line is wrong.
    Usage,
    /// The config file or key file is wrong or does not fit this command.
    Config,
    /// The peer refused our key, or we refused its.
    Auth,
    /// The peer or the shim could not be reached or went away; trying again may work.
    Retryable,
    /// Data, a record or a frame failed a check: a person should look before retrying.
    DataIntegrity,
    /// A local file or disk could not be read or written.
    Io,
    /// This site's role forbids the command: it was promoted or demoted by a failover
    /// (fencing). Retrying cannot help; the DR runbook says what to run.
    Role,
    /// A bug or resource exhaustion inside ferry.
    Internal,
}

impl Category {
    /// The process exit status for a failure of this category, so that a script or a
    /// service manager can tell what to do next (retry, or stop and call a person).
    /// The table is documented in docs/operator-guide.md, "Exit codes"; 2 is also what
    /// the argument parser uses for a malformed command line.
    pub fn code(self) -> u8 {
        match self {
            Category::Internal => 1,
            Category::Usage => 2,
            Category::Config => 3,
            Category::Auth => 4,
            Category::Retryable => 5,
            Category::DataIntegrity => 6,
            Category::Io => 7,
            Category::Role => 8,
        }
    }

    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(self.code())
    }
}

/// Everything a `ferry` subcommand can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] PskError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Shim(#[from] ShimError),
    /// `FERRY_SHIM_IO_ENGINE` holds a value the shim does not know (`IoEngine::from_env`).
    #[error(transparent)]
    ShimEngineEnv(#[from] IoEngineEnvError),
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("{}: disk {disk:?} has no nbd_socket; the shim needs one per disk", config.display())]
    NoNbdSocket { config: PathBuf, disk: String },
    #[error("no recovery points: no epoch has been acknowledged yet")]
    NoRecoveryPoints,
    /// A promoted site offers no point (see `ferry points`).
    #[error("no recovery point is offered: this site was promoted to recovery point {point} by a failover{}", if *committed { ", which was committed" } else { ", and the disks were written since (or the promotion is unfinished)" })]
    SitePromoted { point: u64, committed: bool },
    /// Split brain: no recovery point describes a replica changed outside ferry.
    #[error("disk {disk}: the replica was changed outside ferry ({how}); no recovery point describes it any more (see `ferry points`)")]
    ChangedOutside { disk: String, how: String },
    #[error("a test failover is already open in {}; run `ferry failover cleanup` first", dir.display())]
    FailoverOpen { dir: PathBuf },
    /// Removing the test-failover images failed.
    #[error("{}", dir.display())]
    FailoverCleanup {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Io(#[from] IoFailure),
    /// Boxed: the demo's errors carry whole source errors and would make every
    /// `Result` of the CLI as large as they are.
    #[error(transparent)]
    Demo(Box<DemoError>),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Check(crate::check::CheckFailed),
    /// Boxed: it can carry a whole source or target error.
    #[error(transparent)]
    Dr(Box<crate::dr::DrError>),
}

/// A command line that cannot be acted on.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("--bitmap {spec:?}: expected NAME=FILE")]
    BitmapSpec { spec: String },
    #[error("--bitmap {spec:?}: no disk named {name:?} in {}", config.display())]
    BitmapDisk {
        spec: String,
        name: String,
        config: PathBuf,
    },
    #[error("--disk {name:?}: no such disk in {}", config.display())]
    NoSuchDisk { name: String, config: PathBuf },
    /// A numeric flag outside what the engine accepts; `expected` says what it does.
    #[error("--{flag} {value}: expected {expected}")]
    OutOfRange {
        flag: &'static str,
        value: String,
        expected: String,
    },
    #[error("--runs must be at least 1")]
    NoRuns,
    #[error("--discard-replica-changes needs a sync that compares every block: use --mode seeded (the default with it) or full, not changed")]
    DiscardNeedsResync,
}

impl From<crate::dr::DrError> for CliError {
    fn from(e: crate::dr::DrError) -> Self {
        CliError::Dr(Box::new(e))
    }
}

impl From<DemoError> for CliError {
    fn from(e: DemoError) -> Self {
        CliError::Demo(Box::new(e))
    }
}

impl CliError {
    /// The kind of failure, for the exit status.
    pub fn category(&self) -> Category {
        match self {
            CliError::Config(_) | CliError::NoNbdSocket { .. } => Category::Config,
            CliError::Key(e) => key_category(e),
            CliError::Source(e) => source_category(e),
            CliError::Target(e) => target_category(e),
            CliError::Shim(_) | CliError::Io(_) | CliError::FailoverCleanup { .. } => Category::Io,
            CliError::ShimEngineEnv(_) | CliError::Usage(_) => Category::Usage,
            CliError::NoRecoveryPoints | CliError::FailoverOpen { .. } => Category::Usage,
            CliError::SitePromoted { .. } => Category::Role,
            CliError::ChangedOutside { .. } => Category::DataIntegrity,
            CliError::Demo(e) => demo_category(e),
            CliError::Image(e) => image_category(e),
            CliError::Dr(e) => dr_category(e),
            CliError::Check(c) => c.category,
        }
    }
}

fn demo_category(e: &DemoError) -> Category {
    use DemoError as E;
    match e {
        E::Key(k) => key_category(k),
        E::TargetStart(t) => target_category(t),
        E::Sync { source, .. } | E::FullSync(source) | E::DiskState { source, .. } => {
            source_category(source)
        }
        E::Compare(CompareError::Length { .. } | CompareError::Differs { .. })
        | E::NoState { .. }
        | E::Failed { .. } => Category::DataIntegrity,
        E::Compare(_)
        | E::BitmapSave { .. }
        | E::ShimStart(_)
        | E::Failback { .. }
        | E::ShimShutdown(_)
        | E::GuestAttach { .. }
        | E::GuestWrite { .. }
        | E::GuestFlush(_)
        | E::Io(_) => Category::Io,
        E::Image(i) => image_category(i),
        E::TargetAddr(_)
        | E::TargetThread(_)
        | E::BlockSize { .. }
        | E::BitmapNew { .. }
        | E::BitmapMark { .. } => Category::Internal,
    }
}

fn dr_category(e: &crate::dr::DrError) -> Category {
    use crate::dr::DrError as E;
    match e {
        E::ReplicaSite { .. } | E::NotDemoted | E::NeverReplicated { .. } => Category::Role,
        E::ShimRunning { .. } => Category::Usage,
        E::Image { .. } | E::Tracking { .. } | E::Remove { .. } => Category::Io,
        E::Source(s) => source_category(s),
        E::Target(t) => target_category(t),
    }
}

fn image_category(e: &ImageError) -> Category {
    match e {
        ImageError::Size { .. }
        | ImageError::Fill { .. }
        | ImageError::ZeroBlockSize
        | ImageError::Fraction { .. } => Category::Usage,
        ImageError::Spawn { .. } | ImageError::Io(_) => Category::Io,
        ImageError::Mke2fs { .. } | ImageError::TempName(_) => Category::Internal,
    }
}

fn key_category(e: &PskError) -> Category {
    match e {
        PskError::Format { .. } => Category::Config,
        PskError::Read { .. } | PskError::Write { .. } => Category::Io,
        PskError::Random { .. } => Category::Internal,
    }
}

fn source_category(e: &SourceError) -> Category {
    use SourceError as E;
    match e {
        E::Connect { .. } | E::PeerInterrupted | E::Shim(_) | E::Aborted => Category::Retryable,
        E::Protocol(p) => protocol_category(p),
        E::Config(_) | E::NameTooLong { .. } | E::BlockSizeMismatch { .. } | E::Engine(_) => {
            Category::Config
        }
        E::Key(k) => key_category(k),
        E::Open { .. } | E::Io { .. } | E::State { .. } => Category::Io,
        E::ShortRead { .. } | E::Bitmap { .. } | E::StateContent { .. } | E::EpochBehind { .. } => {
            Category::DataIntegrity
        }
        E::Busy { .. } => Category::Usage,
        E::Demoted { .. }
        | E::NotPromoted { .. }
        | E::NotDemoted { .. }
        | E::PromotedElsewhere { .. } => Category::Role,
        E::SiteRecord { .. } => Category::DataIntegrity,
        E::Stage { .. } => Category::Retryable,
        E::Reprotect(dataplane::source::reprotect::ReprotectError::UnrelatedLineage { .. }) => {
            Category::DataIntegrity
        }
        E::Reprotect(_) => Category::Role,
        E::Target(t) => target_category(t),
        _ => Category::Internal,
    }
}

fn target_category(e: &TargetError) -> Category {
    use TargetError as E;
    match e {
        E::Listen { .. } | E::Socket(_) => Category::Io,
        E::Protocol(p) | E::Handshake(p) => protocol_category(p),
        E::Rejected(r) => code_category(r.code()),
        E::Config(_) | E::UnconfiguredDisk { .. } | E::Engine { .. } => Category::Config,
        E::Key(k) => key_category(k),
        E::Io { .. } | E::State { .. } | E::ReadOldBytes { .. } => Category::Io,
        E::StateFile { .. }
        | E::UntrustedLog { .. }
        | E::Unsettled { .. }
        | E::NotAtKnownEpoch { .. }
        | E::PointRetired { .. }
        | E::ReplicaShort { .. } => Category::DataIntegrity,
        E::NoSuchPoint { .. } | E::NoRecord { .. } => Category::Usage,
        E::Failover(f) => failover_category(f),
        E::ChangeSet(_) => Category::DataIntegrity,
        _ => Category::Internal,
    }
}

fn failover_category(e: &dataplane::writer::failover::FailoverError) -> Category {
    use dataplane::writer::failover::FailoverError as E;
    match e {
        E::ChangedOutside { .. } | E::WrittenSincePromotion { .. } | E::ChainBroken { .. } => {
            Category::DataIntegrity
        }
        E::NotPromoted | E::StillPromoting { .. } | E::Committed { .. } => Category::Role,
        E::NoPoint | E::Newer { .. } => Category::Usage,
    }
}

fn protocol_category(e: &ProtocolError) -> Category {
    use ProtocolError as E;
    match e {
        E::Io { .. } | E::TimedOut { .. } | E::Truncated { .. } => Category::Retryable,
        E::AuthFailed { .. } => Category::Auth,
        E::Version { .. } => Category::Config,
        E::Remote { code, .. } => code_category(*code),
        _ => Category::DataIntegrity,
    }
}

fn code_category(code: ErrorCode) -> Category {
    match code {
        ErrorCode::Auth => Category::Auth,
        ErrorCode::UnknownDisk | ErrorCode::ReplicaTooSmall | ErrorCode::Version => {
            Category::Config
        }
        ErrorCode::Busy => Category::Retryable,
        ErrorCode::Io => Category::Io,
        ErrorCode::Protocol
        | ErrorCode::OutOfRange
        | ErrorCode::Integrity
        | ErrorCode::BaseMismatch
        | ErrorCode::ReplicaChanged => Category::DataIntegrity,
        ErrorCode::Fenced => Category::Role,
        ErrorCode::Internal => Category::Internal,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::io_failure::Where;

    #[test]
    fn every_category_has_its_own_exit_code() {
        let all = [
            Category::Internal,
            Category::Usage,
            Category::Config,
            Category::Auth,
            Category::Retryable,
            Category::DataIntegrity,
            Category::Io,
            Category::Role,
        ];
        let codes: std::collections::HashSet<u8> = all.iter().map(|c| c.code()).collect();
        assert_eq!(codes.len(), all.len());
        assert!(!codes.contains(&0));
    }

    #[test]
    fn library_errors_keep_their_words_and_get_a_category() {
        let e = CliError::from(UsageError::NoRuns);
        assert_eq!(dataplane::chain(&e), "--runs must be at least 1");
        assert_eq!(e.category(), Category::Usage);
        let e = CliError::from(SourceError::Connect {
            addr: "h:1".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        });
        assert!(dataplane::chain(&e).starts_with("cannot reach the target at h:1: "));
        assert_eq!(e.category(), Category::Retryable);
        let e = CliError::from(IoFailure::at(
            "cannot write",
            Path::new("/x"),
            Where::Offset(7),
        )(io::Error::from(io::ErrorKind::StorageFull)));
        assert!(dataplane::chain(&e).starts_with("cannot write /x at offset 7: "));
        assert_eq!(e.category(), Category::Io);
    }
}
