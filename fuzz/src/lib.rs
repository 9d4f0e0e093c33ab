//! Fuzz harnesses for ferry's trust boundaries.
//!
//! Each module under [`targets`] holds one harness: a `run` function that feeds one
//! input to the product and panics when the product misbehaves (a panic inside the
//! product, or a broken invariant that the harness checks as an independent oracle),
//! plus the structured seeds and repairs that let a mutation fuzzer without coverage
//! feedback get past checksums. Two drivers call them:
//!
//! * `cargo fuzz` (nightly, libFuzzer): the thin binaries in `fuzz_targets/`.
//! * the stable smoke driver, `src/bin/smoke`, which mutates the seeds for a fixed
//!   time per target in a child process, so an abort or a hang is caught too.
//!
//! Without `--cfg fuzzing` the `fuzz_targets/` binaries replay files instead
//! ([`replay_main`]), which is how a crash found by either driver is reproduced on
//! stable.

#![forbid(unsafe_code)]

pub mod frames;
pub mod targets;

use std::path::Path;

/// One fuzz target as both drivers see it.
pub struct Target {
    /// The name of its `fuzz_targets/` binary and of its corpus directory.
    pub name: &'static str,
    /// Runs one input. Panics on a finding; otherwise returns a short label of what
    /// happened (an error kind, or how far a valid input got), which the smoke
    /// driver uses as its only feedback: an input with a new label joins the corpus.
    pub run: fn(&[u8]) -> String,
    /// Well-formed inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Repairs the checksums and derived fields of a mutated input so that it gets
    /// past the integrity checks, using `entropy` to decide what to leave broken (0
    /// repairs everything, which is what minimisation uses). The
    /// smoke driver applies it to half of its inputs; the repaired bytes are what it
    /// runs and saves, so a reproducer never depends on the repair.
    pub repair: Option<fn(&mut Vec<u8>, u64)>,
    /// Tokens worth splicing into inputs. `smoke --write-seeds` also writes them as
    /// `corpus/<name>.dict` for libFuzzer's `-dict=`.
    pub dictionary: &'static [&'static [u8]],
    /// Longest input the smoke driver builds for this target.
    pub max_len: usize,
}

/// Every target this build has, in a fixed order.
pub fn all() -> Vec<Target> {
    vec![
        targets::frame_decoder::target(),
        targets::data_frame_verify::target(),
        targets::bitmap_file::target(),
        targets::config_toml::target(),
        targets::handshake_server::target(),
        targets::nbd_request::target(),
        targets::nbd_option::target(),
    ]
}

/// A short, stable label for an error: its Display text up to the first quoted or
/// bracketed part (which echoes input), with every word that holds a digit replaced,
/// so that "record 3" and "record 7" count as the same behaviour.
pub fn label(prefix: &str, error: &dyn std::fmt::Display) -> String {
    let text = error.to_string();
    let end = text
        .find(['`', '"', '\'', '[', '(', '{', '<'])
        .unwrap_or(text.len());
    let mut out = String::with_capacity(prefix.len() + 64);
    out.push_str(prefix);
    out.push(':');
    for word in text[..end].split_whitespace().take(12) {
        if word.bytes().any(|b| b.is_ascii_digit()) {
            out.push('#');
        } else {
            out.push_str(word);
        }
        out.push(' ');
    }
    out.truncate(out.trim_end().len());
    out
}

/// [`label`] for protocol errors; a peer's Error frame is labelled by its code only,
/// since its message is whatever the input says.
pub fn protocol_label(prefix: &str, error: &dataplane::protocol::ProtocolError) -> String {
    match error {
        dataplane::protocol::ProtocolError::Remote { code, .. } => {
            format!("{prefix}:remote {code:?}")
        }
        other => label(prefix, other),
    }
}

/// `tokens` in libFuzzer's dictionary format: one quoted token a line, `\xNN` escapes.
pub fn libfuzzer_dict(tokens: &[&[u8]]) -> String {
    let mut out = String::new();
    for token in tokens {
        out.push('"');
        for &b in *token {
            if (b.is_ascii_graphic() && b != b'"' && b != b'\\') || b == b' ' {
                out.push(b as char);
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        out.push_str("\"\n");
    }
    out
}

/// Rounds a count to a power of two so labels stay few.
pub fn bucket(n: usize) -> usize {
    n.checked_next_power_of_two().unwrap_or(usize::MAX)
}

/// `main` of a `fuzz_targets/` binary built without `cargo fuzz`: runs every file
/// named on the command line (directories are walked one level deep) through `run`,
/// so a crash artifact from either driver reproduces on stable with a backtrace.
pub fn replay_main(name: &str, run: fn(&[u8]) -> String) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!(
            "usage: {name} FILE_OR_DIR...\n\n\
             Replays inputs through the `{name}` harness (this binary was built without \
             `cargo fuzz`).\nTo fuzz on stable use the `smoke` binary; see fuzz/README.md."
        );
        std::process::exit(2);
    }
    let mut files = Vec::new();
    for arg in &args {
        let path = Path::new(arg);
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .unwrap_or_else(|e| panic!("cannot list {arg}: {e}"))
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.to_path_buf());
        }
    }
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        eprintln!("{name}: {} ({} bytes)", file.display(), data.len());
        let outcome = run(&data);
        eprintln!("  -> {outcome}");
    }
    eprintln!(
        "{name}: {} input(s) replayed without a finding",
        files.len()
    );
}
