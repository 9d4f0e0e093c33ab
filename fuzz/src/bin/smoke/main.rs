//! Stable-Rust fuzz driver: every target for N seconds each, no libFuzzer needed.
//!
//! ```text
//! smoke [SECONDS_PER_TARGET] [--target NAME]... [--seed N] [--timeout-ms MS]
//!       [--write-seeds] [--no-minimize]
//! ```
//!
//! For each target it runs the seeds (the target's own, plus `fuzz/corpus/<target>/` if
//! present), then mutated inputs until the time is up. There is no coverage feedback;
//! what stands in for it is the harness's outcome label (an error kind, how far a valid
//! input got): the first few inputs with each label join the corpus. Half the mutants
//! go through the target's repair, which fixes checksums so they get past the integrity
//! checks. Inputs run in a child process; a panic, an abort or a hang is a finding,
//! deduplicated by its panic location, minimised, saved under `fuzz/artifacts/<target>/`
//! and printed in hex. The exit status is 1 when anything was found.
//!
//! `--write-seeds` also writes the seeds to `fuzz/corpus/<target>/` and the dictionary
//! to `fuzz/corpus/<target>.dict`, for `cargo fuzz run` to start from.
//!
//! The run is deterministic for a given seed up to how many inputs fit in the time.

#![forbid(unsafe_code)]

mod mutate;
mod worker;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_fuzz::Target;
use mutate::Rng;
use worker::{Verdict, Worker};

/// Most inputs kept per target: enough for every label plus splice material, few
/// enough that picking one stays uniform over interesting inputs.
const CORPUS_MAX: usize = 4096;
/// Inputs kept per distinct outcome: the first is the new behaviour, a few more give
/// the mutator variants of it to work from.
const KEEP_PER_OUTCOME: u64 = 4;
/// Budget for shrinking one finding.
const MINIMIZE_ATTEMPTS: usize = 4000;
const MINIMIZE_TIME: Duration = Duration::from_secs(20);
/// Characters of a finding's hex printed (the artifact file has all of it).
const HEX_PRINT_MAX: usize = 4096;

struct Options {
    seconds: u64,
    only: Vec<String>,
    seed: u64,
    timeout: Duration,
    write_seeds: bool,
    minimize: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: smoke [SECONDS_PER_TARGET] [--target NAME]... [--seed N] [--timeout-ms MS] \
         [--write-seeds] [--no-minimize]"
    );
    std::process::exit(2)
}

fn parse_options(args: &[String]) -> Options {
    let mut o = Options {
        seconds: 10,
        only: Vec::new(),
        seed: 0x00f3_4447,
        timeout: Duration::from_secs(10),
        write_seeds: false,
        minimize: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--target" => o.only.push(value()),
            "--seed" => o.seed = value().parse().unwrap_or_else(|_| usage()),
            "--timeout-ms" => {
                o.timeout = Duration::from_millis(value().parse().unwrap_or_else(|_| usage()))
            }
            "--write-seeds" => o.write_seeds = true,
            "--no-minimize" => o.minimize = false,
            "-h" | "--help" => usage(),
            n => o.seconds = n.parse().unwrap_or_else(|_| usage()),
        }
    }
    o
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worker") {
        worker::serve(args.get(1).map_or("", String::as_str));
    }
    let opts = parse_options(&args);
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let targets: Vec<Target> = ferry_fuzz::all()
        .into_iter()
        .filter(|t| opts.only.is_empty() || opts.only.iter().any(|n| n == t.name))
        .collect();
    for name in &opts.only {
        if !targets.iter().any(|t| t.name == name) {
            eprintln!("smoke: no target {name:?} in this build");
            return ExitCode::from(2);
        }
    }
    println!(
        "smoke: {} target(s), {} s each, seed {}, per-input timeout {:?}",
        targets.len(),
        opts.seconds,
        opts.seed,
        opts.timeout
    );
    let mut findings = 0;
    for target in &targets {
        match fuzz_one(target, &opts, fuzz_dir) {
            Ok(n) => findings += n,
            Err(e) => {
                eprintln!("smoke: {}: driver error: {e}", target.name);
                return ExitCode::from(2);
            }
        }
    }
    println!("smoke: done, {findings} finding(s)");
    if findings > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// What identifies a finding: the panic location (or how the child died), so one bug
/// hit from many inputs is reported once.
fn finding_key(verdict: &Verdict) -> Option<String> {
    match verdict {
        Verdict::Returned(_) => None,
        Verdict::Panicked(message) => Some(message.lines().next().unwrap_or("").to_string()),
        Verdict::Died(message) => {
            let status = message.split(':').next().unwrap_or("");
            Some(format!("died ({status})"))
        }
        Verdict::Hung => Some("hang".to_string()),
    }
}

fn fuzz_one(target: &Target, opts: &Options, fuzz_dir: &Path) -> std::io::Result<usize> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.seconds);
    let mut rng = Rng::new(opts.seed ^ mutate::splitmix(fnv1a(target.name.as_bytes())));
    let seeds = (target.seeds)();
    let corpus_dir = fuzz_dir.join("corpus").join(target.name);
    if opts.write_seeds {
        std::fs::create_dir_all(&corpus_dir)?;
        for seed in &seeds {
            std::fs::write(corpus_dir.join(format!("seed-{:016x}", xxh3(seed))), seed)?;
        }
        let dict = fuzz_dir
            .join("corpus")
            .join(format!("{}.dict", target.name));
        std::fs::write(dict, ferry_fuzz::libfuzzer_dict(target.dictionary))?;
    }
    let mut corpus = seeds;
    let mut known: HashSet<u64> = corpus.iter().map(|s| xxh3(s)).collect();
    corpus.extend(
        read_dir_files(&corpus_dir, target.max_len)
            .into_iter()
            .filter(|input| known.insert(xxh3(input))),
    );
    let mut pending: Vec<Vec<u8>> = corpus.iter().rev().cloned().collect();

    let mut worker = Worker::spawn(target.name)?;
    let mut labels: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen_findings = HashSet::new();
    let (mut execs, mut repaired) = (0u64, 0u64);
    while Instant::now() < deadline || !pending.is_empty() {
        let input = match pending.pop() {
            Some(input) => input,
            None => {
                let mut input = corpus[rng.below(corpus.len())].clone();
                mutate::mutate(
                    &mut input,
                    &corpus,
                    target.dictionary,
                    target.max_len,
                    &mut rng,
                );
                if let (Some(repair), true) = (target.repair, rng.coin()) {
                    repair(&mut input, rng.next());
                    repaired += 1;
                }
                input
            }
        };
        let verdict = worker.run(&input, opts.timeout)?;
        execs += 1;
        let Some(key) = finding_key(&verdict) else {
            let Verdict::Returned(label) = verdict else {
                unreachable!()
            };
            let count = labels.entry(label).or_insert(0);
            *count += 1;
            if *count <= KEEP_PER_OUTCOME {
                if corpus.len() < CORPUS_MAX {
                    corpus.push(input);
                } else {
                    let slot = rng.below(corpus.len());
                    corpus[slot] = input;
                }
            }
            continue;
        };
        if !seen_findings.insert(key.clone()) {
            continue;
        }
        let small = if opts.minimize {
            minimize(target, &mut worker, input.clone(), &key, opts.timeout)?
        } else {
            input.clone()
        };
        report(target, fuzz_dir, &verdict, &input, &small)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = labels
        .iter()
        .filter(|(l, _)| l.starts_with("ok") || l.starts_with("eof") || l.starts_with("recovered"))
        .map(|(_, n)| n)
        .sum::<u64>();
    println!(
        "smoke: {}: {execs} inputs in {elapsed:.1} s ({:.0}/s), {repaired} repaired, \
         {} accepted, {} distinct outcomes, corpus {}, {} finding(s)",
        target.name,
        execs as f64 / elapsed,
        ok,
        labels.len(),
        corpus.len(),
        seen_findings.len()
    );
    if std::env::var_os("SMOKE_LABELS").is_some() {
        for (label, n) in &labels {
            println!("    {n:>9}  {label}");
        }
    }
    Ok(seen_findings.len())
}

/// Shrinks `input` while it still produces the finding `key`: drops chunks (halving
/// their size down to one byte), then zeroes bytes. With a repair, each candidate is
/// also tried repaired, so checksummed formats shrink too. Stops after
/// `MINIMIZE_ATTEMPTS` runs or `MINIMIZE_TIME`.
fn minimize(
    target: &Target,
    worker: &mut Worker,
    mut input: Vec<u8>,
    key: &str,
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let started = Instant::now();
    let attempts = std::cell::Cell::new(0usize);
    let still_fails = |candidate: &[u8], worker: &mut Worker| -> std::io::Result<bool> {
        attempts.set(attempts.get() + 1);
        let verdict = worker.run(candidate, timeout)?;
        Ok(finding_key(&verdict).as_deref() == Some(key))
    };
    let budget_left = || attempts.get() < MINIMIZE_ATTEMPTS && started.elapsed() < MINIMIZE_TIME;
    let mut chunk = input.len().next_power_of_two() / 2;
    while chunk > 0 {
        let mut at = 0;
        while at < input.len() {
            let mut candidate = input.clone();
            candidate.drain(at..(at + chunk).min(input.len()));
            let mut accepted = still_fails(&candidate, worker)?;
            if !accepted {
                if let Some(repair) = target.repair {
                    repair(&mut candidate, 0);
                    accepted = candidate.len() < input.len() && still_fails(&candidate, worker)?;
                }
            }
            if accepted {
                input = candidate;
            } else {
                at += chunk;
            }
            if !budget_left() {
                return Ok(input);
            }
        }
        chunk /= 2;
    }
    for at in 0..input.len() {
        if input[at] == 0 {
            continue;
        }
        let mut candidate = input.clone();
        candidate[at] = 0;
        if still_fails(&candidate, worker)? {
            input = candidate;
        }
        if !budget_left() {
            break;
        }
    }
    Ok(input)
}

fn report(
    target: &Target,
    fuzz_dir: &Path,
    verdict: &Verdict,
    original: &[u8],
    small: &[u8],
) -> std::io::Result<()> {
    let dir = fuzz_dir.join("artifacts").join(target.name);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("crash-{:016x}", xxh3(small)));
    std::fs::write(&path, small)?;
    if original != small {
        std::fs::write(
            dir.join(format!("crash-{:016x}.orig", xxh3(small))),
            original,
        )?;
    }
    let message = match verdict {
        Verdict::Panicked(m) | Verdict::Died(m) => m.clone(),
        Verdict::Hung => "no answer within the per-input timeout".into(),
        Verdict::Returned(_) => unreachable!(),
    };
    let mut text = String::new();
    let _ = writeln!(text, "\n=== FINDING in {} ===", target.name);
    let _ = writeln!(text, "{}", message.trim());
    let _ = writeln!(
        text,
        "input: {} bytes (minimised from {}), saved as {}",
        small.len(),
        original.len(),
        path.display()
    );
    let _ = writeln!(
        text,
        "reproduce: cargo run --release --manifest-path fuzz/Cargo.toml --bin {} -- {}",
        target.name,
        path.display()
    );
    let mut shown = hex(small);
    if shown.len() > HEX_PRINT_MAX {
        shown.truncate(HEX_PRINT_MAX);
        shown.push_str(" ... (the rest is in the file)");
    }
    let _ = writeln!(text, "hex (runs of 16+ equal bytes as [bb x N]): {shown}");
    println!("{text}");
    Ok(())
}

fn read_dir_files(dir: &Path, max_len: usize) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter(|d| d.len() <= max_len.max(1 << 20))
        .collect()
}

/// Hex for a reader: a run of 16 or more equal bytes is shown as `[bb x N]` (the
/// artifact file is the exact reproducer).
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    let mut at = 0;
    while at < bytes.len() {
        let run = bytes[at..].iter().take_while(|&&b| b == bytes[at]).count();
        if run >= 16 {
            let _ = write!(s, "[{:02x} x {run}]", bytes[at]);
            at += run;
        } else {
            let _ = write!(s, "{:02x}", bytes[at]);
            at += 1;
        }
    }
    s
}

fn xxh3(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
