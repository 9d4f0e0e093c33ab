//! Whether io_uring can run here, and what to do when it cannot.
//!
//! Both ferry processes that use io_uring — the shim's NBD engine and the data plane's
//! block engine — probe the same way: create a ring (which fails when
//! `kernel.io_uring_disabled`, a seccomp filter or a container runtime forbids it, or
//! the locked-memory limit is too low), ask the kernel which opcodes it has
//! ([`check_ops`]) and, for a start-up check, run one request ([`usable`]), since a
//! filter may allow `io_uring_setup` and still refuse `io_uring_enter`. Every failure
//! names the errno symbolically and the likely fix.

use std::io;

use io_uring::{opcode, IoUring, Probe, Submitter};

use crate::Errno;

/// An io_uring operation an engine issues, with the kernel that introduced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub code: u8,
    /// The kernel's name for it, e.g. `IORING_OP_READ`.
    pub name: &'static str,
    /// The first Linux version with it, e.g. `5.6`.
    pub kernel: &'static str,
}

impl Op {
    pub const NOP: Op = Op::new(opcode::Nop::CODE, "IORING_OP_NOP", "5.1");
    pub const READ: Op = Op::new(opcode::Read::CODE, "IORING_OP_READ", "5.6");
    pub const WRITE: Op = Op::new(opcode::Write::CODE, "IORING_OP_WRITE", "5.6");
    pub const READ_FIXED: Op = Op::new(opcode::ReadFixed::CODE, "IORING_OP_READ_FIXED", "5.1");
    pub const WRITE_FIXED: Op = Op::new(opcode::WriteFixed::CODE, "IORING_OP_WRITE_FIXED", "5.1");
    pub const FSYNC: Op = Op::new(opcode::Fsync::CODE, "IORING_OP_FSYNC", "5.1");
    pub const FALLOCATE: Op = Op::new(opcode::Fallocate::CODE, "IORING_OP_FALLOCATE", "5.6");

    pub const fn new(code: u8, name: &'static str, kernel: &'static str) -> Op {
        Op { code, name, kernel }
    }
}

/// Why io_uring cannot serve an engine here.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// `io_uring_setup` failed.
    #[error("io_uring setup failed: {}; {hint}", Errno(.source))]
    Setup {
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    /// Registering files, buffers or the opcode probe with the ring failed.
    #[error("io_uring {what} failed: {}; {hint}", Errno(.source))]
    Register {
        what: &'static str,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    /// The running kernel's io_uring lacks an operation the engine needs.
    #[error(
        "io_uring on this kernel lacks {opcode}, which needs Linux {kernel} or newer; \
         upgrade the kernel or use the sync engine"
    )]
    Unsupported {
        opcode: &'static str,
        kernel: &'static str,
    },
    /// The ring was created but running a request on it failed (`io_uring_enter` is
    /// filtered, or the test request itself failed).
    #[error("io_uring cannot run a request: {}; {}", Errno(.source), ENTER_HINT)]
    Enter {
        #[source]
        source: io::Error,
    },
}

const ENTER_HINT: &str = "a seccomp filter or container runtime may allow io_uring_setup \
    but refuse io_uring_enter; allow it, or use the sync engine";

impl UringError {
    /// The raw errno behind this error, if a system call produced it.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            UringError::Setup { source, .. }
            | UringError::Register { source, .. }
            | UringError::Enter { source } => source.raw_os_error(),
            UringError::Unsupported { .. } => None,
        }
    }

    /// `io_uring_setup` failed with `source`.
    pub fn setup(source: io::Error) -> UringError {
        UringError::Setup {
            hint: setup_hint(&source),
            source,
        }
    }

    /// Registering `what` with a ring failed with `source`.
    pub fn register(what: &'static str, source: io::Error) -> UringError {
        UringError::Register {
            what,
            hint: register_hint(&source),
            source,
        }
    }
}

/// Checks that the ring's kernel has every operation in `ops` (the opcode probe needs
/// Linux 5.6; an older kernel answers `EINVAL` and is reported as lacking the probe).
pub fn check_ops(submitter: &Submitter<'_>, ops: &[Op]) -> Result<(), UringError> {
    let mut probe = Probe::new();
    match submitter.register_probe(&mut probe) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            return Err(UringError::Unsupported {
                opcode: "IORING_REGISTER_PROBE",
                kernel: "5.6",
            })
        }
        Err(source) => return Err(UringError::register("opcode probe", source)),
    }
    match ops.iter().find(|op| !probe.is_supported(op.code)) {
        Some(op) => Err(UringError::Unsupported {
            opcode: op.name,
            kernel: op.kernel,
        }),
        None => Ok(()),
    }
}

/// Whether io_uring can serve an engine that issues `ops` in this process: a small ring
/// can be created, has every operation, and runs a request.
pub fn usable(ops: &[Op]) -> Result<(), UringError> {
    const TOKEN: u64 = 7;
    let mut ring = IoUring::new(4).map_err(UringError::setup)?;
    check_ops(&ring.submitter(), ops)?;
    let nop = opcode::Nop::new().build().user_data(TOKEN);
    // SAFETY: a NOP refers to no memory; the ring is new, so its queue has room.
    unsafe { ring.submission().push(&nop) }.map_err(|_| UringError::Enter {
        source: io::Error::other("a new ring's submission queue is full"),
    })?;
    ring.submit_and_wait(1)
        .map_err(|source| UringError::Enter { source })?;
    let completed = ring
        .completion()
        .next()
        .map(|c| (c.user_data(), c.result()));
    match completed {
        Some((TOKEN, res)) if res >= 0 => Ok(()),
        Some((_, res)) => Err(UringError::Enter {
            source: io::Error::from_raw_os_error(-res),
        }),
        None => Err(UringError::Enter {
            source: io::Error::other("the test request did not complete"),
        }),
    }
}

/// The likely fix for an `io_uring_setup` failure.
pub fn setup_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EPERM) => {
            "io_uring is disabled or filtered for this process: run \
             `sysctl kernel.io_uring_disabled=0` (or add the user to kernel.io_uring_group), \
             allow io_uring in the container's seccomp profile, or use the sync engine"
        }
        Some(libc::ENOSYS) => {
            "this kernel is built without io_uring (CONFIG_IO_URING); use the sync engine"
        }
        Some(libc::ENOMEM) => {
            "the locked-memory limit is too low for the rings: raise `ulimit -l` \
             (RLIMIT_MEMLOCK) or lower the queue depth"
        }
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out of file descriptors: raise `ulimit -n`",
        Some(libc::EINVAL) => {
            "the kernel rejected the ring parameters; Linux 5.6 or newer is needed"
        }
        _ => "use the sync engine if io_uring cannot be made to work here",
    }
}

/// The likely fix for a failed `io_uring_register` call.
pub fn register_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::ENOMEM) => {
            "registered buffers count against RLIMIT_MEMLOCK: raise `ulimit -l` (systemd: \
             `LimitMEMLOCK=`) or shrink the buffer pool"
        }
        Some(libc::EFAULT) => "a buffer address is not mapped memory",
        Some(libc::EOPNOTSUPP) => {
            "registered buffers must be anonymous or huge-page memory, not file-backed"
        }
        Some(libc::EINVAL) => {
            "too many entries (16384 buffers at most, each up to 1 GiB) or an empty buffer"
        }
        Some(libc::EMFILE) | Some(libc::ENFILE) => {
            "each registered file counts against RLIMIT_NOFILE: raise `ulimit -n`"
        }
        Some(libc::EBADF) => "a disk's file descriptor is closed",
        _ => "use the sync engine if io_uring cannot be made to work here",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_errno_and_the_fix() {
        let e = UringError::setup(io::Error::from_raw_os_error(libc::EPERM));
        let text = e.to_string();
        assert!(text.contains("EPERM (errno 1)"), "{text}");
        assert!(text.contains("sysctl kernel.io_uring_disabled=0"), "{text}");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let e = UringError::register("buffers", io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(e.to_string().contains("RLIMIT_MEMLOCK"), "{e}");
    }

    #[test]
    fn usable_agrees_with_creating_a_ring() {
        let ops = [Op::NOP, Op::READ, Op::WRITE, Op::FSYNC];
        match IoUring::new(4) {
            // The ring exists: whatever `usable` says, it must name a real reason.
            Ok(_) => {
                if let Err(e) = usable(&ops) {
                    assert!(!e.to_string().is_empty());
                }
            }
            Err(_) => assert!(matches!(usable(&ops), Err(UringError::Setup { .. }))),
        }
    }
}
