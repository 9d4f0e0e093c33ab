//! Test-only fault injection points, named where state becomes durable or a stage can
//! fail, so tests can make exactly that step fail in a real process.
//!
//! Armed through the environment of the process under test:
//! `FERRY_FAILPOINTS=name[@N][,name[@N]...]`. A bare `name` fires on every hit;
//! `name@N` fires on the N-th hit only (1-based), counted per process. What "fires"
//! means is up to the call site: return an error, panic, or skip a step.
//!
//! Compiled in only with debug assertions (the builds `cargo test` uses); in a release
//! build [`hit`] is a constant `false` and the variable is ignored, so the product
//! never carries a way to make itself fail. It lives in `ferry-io`, the one crate every
//! process of ferry links.

/// Whether the failpoint `name` fires at this hit.
#[cfg(debug_assertions)]
pub fn hit(name: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    /// Armed points: name → `None` (always) or `Some(n)` (the n-th hit only).
    static ARMED: OnceLock<Vec<(String, Option<u64>)>> = OnceLock::new();
    static COUNTS: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();

    let armed = ARMED.get_or_init(|| {
        std::env::var("FERRY_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('@') {
                Some((n, at)) => (n.to_string(), at.parse().ok()),
                None => (s.to_string(), None),
            })
            .collect()
    });
    let Some((_, at)) = armed.iter().find(|(n, _)| n == name) else {
        return false;
    };
    let Some(at) = at else { return true };
    let mut counts = COUNTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let c = counts.entry(name.to_string()).or_insert(0);
    *c += 1;
    *c == *at
}

/// Whether the failpoint `name` fires at this hit: never, in a release build.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) -> bool {
    false
}
