//! `FERRY_REQUIRE`: the switch that turns a test's skip into a failure.
//!
//! Tests that need something the machine may lack — io_uring, loop devices, FUSE,
//! network namespaces, root, an external client tool — skip with a printed reason when
//! it is missing, so the suite stays usable on a laptop or in a container. A green run
//! then proves nothing about the skipped path. Where the machine is known to provide a
//! feature (CI), `FERRY_REQUIRE=uring,loop,...` makes every skip for that feature fail
//! the test instead; `.ci/run` sets it.
//!
//! Every skip in the test suites goes through [`skip`], which is why this lives in
//! `ferry-io`: every crate's tests depend on it.

use std::fmt;

/// Something a test may need from the machine; the names are `FERRY_REQUIRE`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `uring`: this process can set up an io_uring (not disabled by sysctl or seccomp).
    Uring,
    /// `loop`: loop devices can be attached (`losetup`).
    Loop,
    /// `fuse`: `/dev/fuse` works and FUSE file systems can be mounted.
    Fuse,
    /// `netns`: network namespaces and veth pairs can be made (`ip netns`).
    Netns,
    /// `root`: the tests run as root (mounts, loop devices, namespaces).
    Root,
    /// `tools`: every external tool the tests drive is installed (`tools/test.sh`
    /// installs them: qemu-utils, libnbd-bin, python3-libnbd, nbdkit, fio, ...).
    Tools,
    /// `direct`: O_DIRECT in the test's temporary directory enforces alignment (not
    /// tmpfs), so misaligned direct I/O can be shown to fail cleanly.
    Direct,
}

impl Feature {
    /// Every feature, in the order the docs list them.
    pub const ALL: [Feature; 7] = [
        Feature::Uring,
        Feature::Loop,
        Feature::Fuse,
        Feature::Netns,
        Feature::Root,
        Feature::Tools,
        Feature::Direct,
    ];

    /// The name `FERRY_REQUIRE` uses.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Uring => "uring",
            Feature::Loop => "loop",
            Feature::Fuse => "fuse",
            Feature::Netns => "netns",
            Feature::Root => "root",
            Feature::Tools => "tools",
            Feature::Direct => "direct",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The features a `FERRY_REQUIRE` value names. An unknown name is an error: a typo
/// must not quietly require nothing.
pub fn parse(value: &str) -> Result<Vec<Feature>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| {
            Feature::ALL
                .into_iter()
                .find(|f| f.name() == w)
                .ok_or_else(|| {
                    let known: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
                    format!(
                        "FERRY_REQUIRE names `{w}`, which is not a feature; known: {}",
                        known.join(",")
                    )
                })
        })
        .collect()
}

/// Whether `FERRY_REQUIRE` in the environment names `feature`. Panics on a malformed
/// value, so a typo fails the first test that consults it.
pub fn required(feature: Feature) -> bool {
    match std::env::var("FERRY_REQUIRE") {
        Ok(value) => parse(&value)
            .unwrap_or_else(|e| panic!("{e}"))
            .contains(&feature),
        Err(_) => false,
    }
}

/// A test found `feature` missing (`why` says how). Panics — failing the test — when
/// `FERRY_REQUIRE` names the feature; otherwise prints `SKIP` with the reason, and the
/// caller returns.
#[track_caller]
pub fn skip(feature: Feature, why: impl fmt::Display) {
    if required(feature) {
        panic!("FERRY_REQUIRE includes `{feature}`, but it is unavailable here: {why}");
    }
    eprintln!("SKIP ({feature} unavailable; FERRY_REQUIRE={feature} would fail): {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_refuses_unknown_names() {
        assert_eq!(
            parse("uring, loop,,root").unwrap(),
            [Feature::Uring, Feature::Loop, Feature::Root]
        );
        assert_eq!(parse("").unwrap(), []);
        let err = parse("uring,lopo").unwrap_err();
        assert!(
            err.contains("`lopo`") && err.contains("uring,loop,fuse"),
            "{err}"
        );
        for f in Feature::ALL {
            assert_eq!(parse(f.name()).unwrap(), [f]);
        }
    }
}
