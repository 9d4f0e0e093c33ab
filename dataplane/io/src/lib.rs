//! ferry's I/O layer: what every ferry process needs from the operating system, written
//! once. The shim (`filter-driver-shim`) and the data plane (`dataplane`) both depend on
//! this crate; it depends on neither, so the shim never links the data plane.
//!
//! * [`durable`] — atomic file replacement, directory fsync, owner-only directories,
//!   advisory locks.
//! * [`uring`] — can io_uring run here: the opcode probe, a test request, and the likely
//!   fix for each way ring setup and registration fail.
//! * [`chain`] — an error with its sources on one line, for logs and peers.
//! * [`failpoint`] — test-only fault injection at the points where state becomes
//!   durable (debug builds only).
//! * [`require`] — `FERRY_REQUIRE`: the tests' skips for missing features, made failures.
//! * [`rng`] — the tests' and tools' one seeded generator.

pub mod durable;
pub mod failpoint;
pub mod require;
pub mod rng;
pub mod uring;

/// Formats an error with its sources, one after another, for logs and for the peer.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Formats an errno symbolically, e.g. `EIO (errno 5)`; an error without an errno by
/// its kind.
pub struct Errno<'a>(pub &'a std::io::Error);

impl std::fmt::Display for Errno<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.raw_os_error() {
            Some(code) => write!(f, "{:?} (errno {code})", nix::errno::Errno::from_raw(code)),
            None => write!(f, "{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_joins_every_source() {
        let inner = std::io::Error::other("disk on fire");
        let outer = std::io::Error::other(Wrapped(inner));
        assert_eq!(super::chain(&outer), "saving: disk on fire");
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("saving")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
