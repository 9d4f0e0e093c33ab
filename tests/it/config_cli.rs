//! The CLI contract around the config file: unknown keys, missing files and bad values
//! are refused with an error that names them; the examples in `docs/examples/` work on
//! loopback.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

/// How long `ferry target` may take to refuse a bad config. A target that accepted it
/// would run forever; the helper kills it and fails the test after this long.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(20);

fn ferry(args: &[&OsStr]) -> Run {
    run_ferry(args, REFUSE_TIMEOUT)
}

fn sync_cmd(config: &Path) -> Run {
    ferry(&["sync".as_ref(), "--config".as_ref(), config.as_os_str()])
}

fn target_cmd(config: &Path) -> Run {
    ferry(&["target".as_ref(), "--config".as_ref(), config.as_os_str()])
}

/// A directory with a key, a source image, and valid source and target config texts.
struct Setup {
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = scratch_dir();
        let key = dir.path().join("ferry.key");
        keygen(&key);
        create_sparse(&dir.path().join("a.img"), 1 << 20);
        Setup { dir, key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn source_text(&self, port: u16, disk_extra: &str, source_extra: &str) -> String {
        format!(
            "[source]\ntarget = \"127.0.0.1:{port}\"\npsk_file = {}\nstate_dir = {}\n{source_extra}\n[[disk]]\nname = \"a\"\npath = {}\n{disk_extra}\n",
            toml_path(&self.key),
            toml_path(&self.path("source-state")),
            toml_path(&self.path("a.img")),
        )
    }

    fn target_text(&self, port: u16, disk_extra: &str, target_extra: &str) -> String {
        format!(
            "[target]\nlisten = \"127.0.0.1:{port}\"\npsk_file = {}\nstate_dir = {}\n{target_extra}\n[[disk]]\nname = \"a\"\npath = {}\n{disk_extra}\n",
            toml_path(&self.key),
            toml_path(&self.path("target-state")),
            toml_path(&self.path("a.replica")),
        )
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// 1-based line of the first line of `text` that starts with `key`.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .expect("key in text")
        + 1
}

fn assert_refused(what: &str, run: &Run, config: &Path, must_mention: &[&str]) {
    assert!(!run.success(), "{what}: accepted ({}): {run:?}", run.status);
    for m in must_mention {
        assert!(
            run.stderr.contains(m),
            "{what}: stderr should mention {m:?}:\n{}",
            run.stderr
        );
    }
    assert!(
        run.stderr.contains(config.to_str().unwrap()),
        "{what}: stderr should name the config file {}:\n{}",
        config.display(),
        run.stderr
    );
}

#[test]
fn unknown_keys_are_rejected_with_their_name_and_line() {
    let s = Setup::new();
    let port = free_port();
    // (where, key line, which commands to try)
    let cases: [(&str, &str); 4] = [
        ("top level", "bogus_top_level = 1"),
        ("[source]", "compresion = \"zstd\""),
        ("[target]", "listen_adress = \"127.0.0.1:1\""),
        ("[[disk]]", "sise_bytes = 5"),
    ];
    for (place, line) in cases {
        let key = line.split_whitespace().next().unwrap();
        let (source, target) = match place {
            "top level" => (
                format!("{line}\n{}", s.source_text(port, "", "")),
                Some(format!("{line}\n{}", s.target_text(port, "", ""))),
            ),
            "[source]" => (s.source_text(port, "", line), None),
            "[target]" => (
                s.source_text(port, "", ""),
                Some(s.target_text(port, "", line)),
            ),
            _ => (
                s.source_text(port, line, ""),
                Some(s.target_text(port, line, "")),
            ),
        };
        if place != "[target]" {
            let config = s.write("source.toml", &source);
            let run = sync_cmd(&config);
            let at = format!(":{}:", line_of(&source, key));
            assert_refused(
                &format!("ferry sync, unknown key {key} in {place}"),
                &run,
                &config,
                &[key, &at],
            );
        }
        if let Some(target) = target {
            let config = s.write("target.toml", &target);
            let run = target_cmd(&config);
            let at = format!(":{}:", line_of(&target, key));
            assert_refused(
                &format!("ferry target, unknown key {key} in {place}"),
                &run,
                &config,
                &[key, &at],
            );
        }
    }

    // A file with both roles: an unknown key in [source] also stops `ferry target`.
    let both = format!(
        "{}\n[target]\nlisten = \"127.0.0.1:{port}\"\npsk_file = {}\nstate_dir = {}\n",
        s.source_text(port, "", "compresion = \"zstd\""),
        toml_path(&s.key),
        toml_path(&s.path("target-state")),
    );
    let config = s.write("both.toml", &both);
    assert_refused(
        "ferry target, unknown key in [source] of a two-role file",
        &target_cmd(&config),
        &config,
        &["compresion"],
    );
}

#[test]
fn missing_files_are_named() {
    let s = Setup::new();
    let port = free_port();

    let missing = s.path("no-such-config.toml");
    for (cmd, run) in [
        ("sync", sync_cmd(&missing)),
        ("target", target_cmd(&missing)),
    ] {
        assert_refused(
            &format!("ferry {cmd} with a missing config"),
            &run,
            &missing,
            &[],
        );
    }

    let missing_key = s.path("no-such.key");
    let source = s
        .source_text(port, "", "")
        .replace(&toml_path(&s.key), &toml_path(&missing_key));
    let target = s
        .target_text(port, "", "")
        .replace(&toml_path(&s.key), &toml_path(&missing_key));
    let sc = s.write("source.toml", &source);
    let tc = s.write("target.toml", &target);
    for (cmd, run) in [("sync", sync_cmd(&sc)), ("target", target_cmd(&tc))] {
        assert!(
            !run.success(),
            "ferry {cmd} with a missing psk_file: {run:?}"
        );
        assert!(
            run.stderr.contains(missing_key.to_str().unwrap()),
            "ferry {cmd}: the error should name the missing key file:\n{}",
            run.stderr
        );
    }

    // A key file that is not a key: named too, and its content never printed.
    let bad_key = s.write("bad.key", "ferry-psk-v1:0123456789abcdefXYZ\n");
    let source = s
        .source_text(port, "", "")
        .replace(&toml_path(&s.key), &toml_path(&bad_key));
    let sc = s.write("source-bad-key.toml", &source);
    let run = sync_cmd(&sc);
    assert!(!run.success(), "{run:?}");
    assert!(
        run.stderr.contains(bad_key.to_str().unwrap()),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("0123456789abcdef"),
        "key material printed: {}",
        run.stderr
    );

    // A source disk that does not exist: named by `ferry sync`.
    let source = s.source_text(port, "", "").replace(
        &toml_path(&s.path("a.img")),
        &toml_path(&s.path("gone.img")),
    );
    let sc = s.write("source-gone.toml", &source);
    let run = sync_cmd(&sc);
    assert!(!run.success(), "{run:?}");
    assert!(run.stderr.contains("gone.img"), "{}", run.stderr);
}

#[test]
fn invalid_values_name_the_key_and_the_value() {
    let s = Setup::new();
    let port = free_port();
    let source_cases = [
        ("block_size_kib = 48", "source.block_size_kib", "48"),
        ("io_size_kib = 32", "source.io_size_kib", "32"),
        ("queue_depth = 0", "source.queue_depth", "0"),
        ("compression_level = 99", "source.compression_level", "99"),
        ("compression = \"lz4\"", "lz4", "compression"),
    ];
    for (line, key, value) in source_cases {
        let text = s.source_text(port, "", line);
        let config = s.write("source.toml", &text);
        assert_refused(
            &format!("ferry sync with {line}"),
            &sync_cmd(&config),
            &config,
            &[key, value],
        );
    }
    let target_cases = [
        ("max_sessions = 0", "target.max_sessions", "0"),
        ("workers = 1000", "target.workers", "1000"),
    ];
    for (line, key, value) in target_cases {
        let text = s.target_text(port, "", line);
        let config = s.write("target.toml", &text);
        assert_refused(
            &format!("ferry target with {line}"),
            &target_cmd(&config),
            &config,
            &[key, value],
        );
    }
    // A bad source.target address and a bad disk name.
    let text = s
        .source_text(port, "", "")
        .replace(&format!("127.0.0.1:{port}"), "127.0.0.1");
    let config = s.write("source.toml", &text);
    assert_refused(
        "target without a port",
        &sync_cmd(&config),
        &config,
        &["source.target"],
    );
    let text = s
        .source_text(port, "", "")
        .replace("name = \"a\"", "name = \"../a\"");
    let config = s.write("source.toml", &text);
    assert_refused(
        "disk name with a slash",
        &sync_cmd(&config),
        &config,
        &["disk[0].name"],
    );
    // The command needs its section.
    let config = s.write("target-only.toml", &s.target_text(port, "", ""));
    assert_refused(
        "ferry sync on a target-only file",
        &sync_cmd(&config),
        &config,
        &["[source]"],
    );
    let config = s.write("source-only.toml", &s.source_text(port, "", ""));
    assert_refused(
        "ferry target on a source-only file",
        &target_cmd(&config),
        &config,
        &["[target]"],
    );
}

#[test]
fn sync_flags_and_an_unreachable_target_give_clear_errors() {
    let s = Setup::new();
    let port = free_port(); // nothing listens there
    let config = s.write(
        "source.toml",
        &s.source_text(port, "", "connect_timeout_ms = 2000"),
    );
    let run = sync_cmd(&config);
    assert!(!run.success(), "{run:?}");
    assert!(
        run.stderr.contains(&format!("127.0.0.1:{port}")),
        "the error should name the target address: {}",
        run.stderr
    );
    assert!(run.stdout.trim().is_empty(), "{}", run.stdout);

    let c = config.as_os_str();
    for (args, mention) in [
        (vec!["--bitmap", "nosuch=/tmp/x.cbt"], "nosuch"),
        (vec!["--bitmap", "no-equals-sign"], "NAME=FILE"),
        (vec!["--disk", "nosuch"], "nosuch"),
    ] {
        let mut full: Vec<&OsStr> = vec!["sync".as_ref(), "--config".as_ref(), c];
        full.extend(args.iter().map(OsStr::new));
        let run = ferry(&full);
        assert!(!run.success(), "{args:?}: {run:?}");
        assert!(run.stderr.contains(mention), "{args:?}: {}", run.stderr);
    }
    // A bitmap file that does not exist is named.
    let cbt = s.path("missing.cbt");
    let spec = format!("a={}", cbt.display());
    let run = ferry(&[
        "sync".as_ref(),
        "--config".as_ref(),
        c,
        "--mode".as_ref(),
        "changed".as_ref(),
        "--bitmap".as_ref(),
        spec.as_ref(),
    ]);
    assert!(!run.success(), "{run:?}");
    assert!(run.stderr.contains("missing.cbt"), "{}", run.stderr);
}

/// A command run on a config without the section it needs says which, names the file,
/// and exits 1 (every failure exits 1 until the CLI's error categories get codes).
#[test]
fn commands_name_the_section_their_config_lacks() {
    let s = Setup::new();
    let port = free_port();
    let source_only = s.write("source.toml", &s.source_text(port, "", ""));
    let target_only = s.write("target.toml", &s.target_text(port, "", ""));
    for (command, config, section) in [
        (&["points"][..], &source_only, "target"),
        (&["failover", "cleanup"][..], &source_only, "target"),
        (&["shim"][..], &target_only, "source"),
    ] {
        let mut args: Vec<&OsStr> = command.iter().map(OsStr::new).collect();
        args.extend(["--config".as_ref(), config.as_os_str()]);
        let run = ferry(&args);
        let needs = format!("`{}` needs a [{section}] section", command.join(" "));
        assert_refused(&command.join(" "), &run, config, &[&needs]);
        assert_eq!(
            run.status.code(),
            Some(3),
            "a configuration error: {command:?}: {run:?}"
        );
    }
}

#[test]
fn keygen_prints_a_fresh_key_in_the_documented_format() {
    let dir = scratch_dir();
    let a = keygen(&dir.path().join("a.key"));
    let b = keygen(&dir.path().join("b.key"));
    assert_ne!(a, b, "two keys are the same");
    let text = std::fs::read_to_string(dir.path().join("a.key")).unwrap();
    let hex = text
        .strip_prefix("ferry-psk-v1:")
        .expect("prefix")
        .strip_suffix('\n')
        .expect("one line");
    assert!(
        hex.len() == 64
            && hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "{text:?}"
    );
}

// ---------------------------------------------------------------------------------
// docs/examples.

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples")
}

/// The example files parse with the product's own loader, and they pair up: same
/// disk names, the source's target is the target's listen address, same key file.
#[test]
fn docs_examples_parse_and_pair_up() {
    use dataplane::config::Config;
    let dir = examples_dir();
    let source = Config::load(dir.join("source.toml"))
        .unwrap_or_else(|e| panic!("docs/examples/source.toml: {e}"));
    let target = Config::load(dir.join("target.toml"))
        .unwrap_or_else(|e| panic!("docs/examples/target.toml: {e}"));
    let s = source.source.as_ref().expect("[source] in source.toml");
    let t = target.target.as_ref().expect("[target] in target.toml");
    assert_eq!(
        s.target,
        t.listen.to_string(),
        "source.target and target.listen differ"
    );
    assert_eq!(
        s.psk_file, t.psk_file,
        "the two files name different key files"
    );
    assert_eq!(
        s.psk_file,
        dir.join("ferry.key"),
        "the README generates docs/examples/ferry.key"
    );
    let names = |c: &Config| c.disks.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&source),
        names(&target),
        "disk names differ between the examples"
    );
    assert_ne!(s.state_dir, t.state_dir);

    // The README's final `cmp` compares exactly the configured source and replica.
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let cmp = readme
        .split('`')
        .find(|chunk| chunk.starts_with("cmp "))
        .expect("README.md has a `cmp A B` check");
    let parts: Vec<&str> = cmp.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "{cmp}");
    assert_eq!(
        Path::new(parts[1]),
        source.disks[0].path,
        "README cmp vs source.toml"
    );
    assert_eq!(
        Path::new(parts[2]),
        target.disks[0].path,
        "README cmp vs target.toml"
    );
}

/// docs/examples/README.md followed step by step, in a temporary copy: the config
/// files are copied verbatim except for the example directory (`/tmp/ferry-example`,
/// shared with anyone following the README on this machine) and the port (7410,
/// likewise), which become a private temp directory and a free port.
#[test]
fn docs_examples_work_on_loopback_in_a_temp_copy() {
    let examples = examples_dir();
    let work = scratch_dir();
    let copy = work.path().join("examples");
    std::fs::create_dir(&copy).unwrap();
    let data = work.path().join("ferry-example");
    let copy_examples = |port: u16| {
        for name in ["source.toml", "target.toml"] {
            let original = std::fs::read_to_string(examples.join(name)).unwrap();
            assert!(
                original.contains("/tmp/ferry-example") && original.contains("127.0.0.1:7410"),
                "{name} changed shape"
            );
            let text = original
                .replace("/tmp/ferry-example", data.to_str().unwrap())
                .replace("127.0.0.1:7410", &format!("127.0.0.1:{port}"));
            // Only those two substitutions: everything else is as written.
            let back = text
                .replace(data.to_str().unwrap(), "/tmp/ferry-example")
                .replace(&format!("127.0.0.1:{port}"), "127.0.0.1:7410");
            assert_eq!(back, original);
            std::fs::write(copy.join(name), text).unwrap();
        }
    };

    // 1. A key, readable by the owner only, beside the configs.
    keygen(&copy.join("ferry.key"));
    // 2. A 256 MiB sample disk, the first 32 MiB random.
    std::fs::create_dir_all(&data).unwrap();
    let image = data.join("vm1-os.img");
    let f = create_sparse(&image, 256 << 20);
    let mut rng = Rng::new(test_seed("docs_examples_work_on_loopback_in_a_temp_copy"));
    let mut mib = vec![0u8; 1 << 20];
    for i in 0..32u64 {
        rng.fill(&mut mib);
        std::os::unix::fs::FileExt::write_all_at(&f, &mib, i << 20).unwrap();
    }
    drop(f);
    // 3. The target, in the foreground (here: a child process).
    // A free port, retried if someone takes it between the choice and the bind.
    let mut attempts = 0;
    let mut target = loop {
        let port = free_port();
        copy_examples(port);
        match TargetProc::spawn(&copy.join("target.toml"), port) {
            Ok(t) => break t,
            Err(e) if e.contains("in use") && attempts < 5 => attempts += 1,
            Err(e) => panic!("ferry target --config docs/examples/target.toml (copy): {e}"),
        }
    };
    // 4. The sync, without --json, as the README runs it.
    let run = run_ferry(
        &[
            "sync".as_ref(),
            "--config".as_ref(),
            copy.join("source.toml").as_os_str(),
        ],
        SYNC_TIMEOUT,
    );
    assert!(
        run.success(),
        "ferry sync --config docs/examples/source.toml (copy): {run:?}"
    );
    assert!(!run.stdout.is_empty(), "the human summary is missing");
    // "Afterwards cmp finds no difference."
    assert_same_file(&image, &data.join("replica-vm1-os.img"));
    target.assert_alive();
}

/// The first line `ferry target` logs with `extra` arguments and environment (stderr is
/// a pipe, not a terminal, and `NO_COLOR` is unset).
fn first_target_log_line(args: &[&str], env: &[(&str, &str)]) -> String {
    use std::io::BufRead;
    let dir = scratch_dir();
    let key = dir.path().join("ferry.key");
    keygen(&key);
    let image = dir.path().join("a.img");
    let config = dir.path().join("target.toml");
    std::fs::write(
        &config,
        target_toml(0, &key, &dir.path().join("state"), &[("a", &image)], ""),
    )
    .unwrap();
    let mut child = std::process::Command::new(ferry_bin())
        .args(args)
        .args(["target", "--config"])
        .arg(&config)
        .envs(env.iter().copied())
        .env_remove("NO_COLOR")
        .env_remove("FERRY_LOG")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    line
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal_and_can_be_json() {
    let text = first_target_log_line(&[], &[]);
    assert!(text.contains("listening on"), "{text:?}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI codes in a piped log: {text:?}"
    );
    let json = first_target_log_line(&["--log-format", "json"], &[]);
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {json:?}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert!(
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("listening on")),
        "{v}"
    );
    // A filter in the other variable's syntax is accepted too.
    let filtered = first_target_log_line(&[], &[("RUST_LOG", "info,dataplane=debug")]);
    assert!(filtered.contains("listening on"), "{filtered:?}");
}

#[test]
fn an_invalid_log_filter_is_refused_with_a_usage_error() {
    for (var, value) in [("FERRY_LOG", "bogus"), ("RUST_LOG", "dataplane=loud")] {
        let out = std::process::Command::new(ferry_bin())
            .args(["keygen"])
            .env_remove("FERRY_LOG")
            .env_remove("RUST_LOG")
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {err}");
        assert!(
            err.contains(var) && err.contains("is not a log level"),
            "{var}={value}: {err}"
        );
        assert!(out.stdout.is_empty(), "nothing done: {:?}", out.stdout);
    }
}

#[test]
fn check_validates_a_config_and_connect_authenticates_without_opening_anything() {
    let s = Setup::new();
    let target = TargetProc::start(s.dir.path(), &s.key, &[("a", &s.path("a.replica"))], "");
    let source = s.write("source.toml", &s.source_text(target.port, "", ""));
    let check = |config: &Path, connect: bool| {
        let mut args: Vec<&OsStr> = vec!["check".as_ref(), "--config".as_ref(), config.as_os_str()];
        if connect {
            args.push("--connect".as_ref());
        }
        ferry(&args)
    };
    let run = check(&source, true);
    assert!(run.success(), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("reached and authenticated"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("the config is usable"),
        "{}",
        run.stdout
    );
    // Nothing was opened: no replica, no record.
    assert!(!s.path("a.replica").exists());
    assert!(
        target.stderr().contains("a connection check"),
        "{}",
        target.stderr()
    );
    // The target's own config checks too.
    let run = check(&target.config, false);
    assert!(run.success(), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("created at the first sync"),
        "{}",
        run.stdout
    );

    // A key others can read: usable, with a warning.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&s.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = check(&source, false);
    assert!(
        run.success() && run.stdout.contains("warn key"),
        "{}",
        run.stdout
    );
    std::fs::set_permissions(&s.key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A missing disk: a failure naming it (local I/O, exit 7).
    let missing = s.write(
        "missing.toml",
        &s.source_text(target.port, "", "")
            .replace("a.img", "nope.img"),
    );
    let run = check(&missing, false);
    assert_eq!(run.status.code(), Some(7), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("FAIL disk a"), "{}", run.stdout);

    // Another key: authentication fails (exit 4).
    let other = s.path("other.key");
    keygen(&other);
    let wrong = s.write(
        "wrong.toml",
        &s.source_text(target.port, "", "")
            .replace(&toml_path(&s.key), &toml_path(&other)),
    );
    let run = check(&wrong, true);
    assert_eq!(run.status.code(), Some(4), "{}{}", run.stdout, run.stderr);
    // Nobody listening: retryable (exit 5).
    let nobody = s.write("nobody.toml", &s.source_text(free_port(), "", ""));
    let run = check(&nobody, true);
    assert_eq!(run.status.code(), Some(5), "{}{}", run.stdout, run.stderr);
}

#[test]
fn completions_and_man_pages_are_generated() {
    let run = ferry(&["completions".as_ref(), "bash".as_ref()]);
    assert!(
        run.success() && run.stdout.contains("_ferry()"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.contains("reprotect") && run.stdout.contains("status"));
    let dir = scratch_dir();
    let out = dir.path().join("man");
    let run = ferry(&["manpages".as_ref(), "--out-dir".as_ref(), out.as_os_str()]);
    assert!(run.success(), "{}", run.stderr);
    let page = std::fs::read_to_string(out.join("ferry-status.1")).unwrap();
    assert!(page.contains(".TH") && page.contains("RPO"), "{page}");
    assert!(out.join("ferry.1").exists());
}

/// The systemd units shipped in `packaging/systemd/` are the ones the operator guide
/// shows, byte for byte: a fix to one is a fix to both.
#[test]
fn shipped_unit_files_are_the_operator_guides() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/operator-guide.md")).unwrap();
    let dir = root.join("packaging/systemd");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let unit = std::fs::read_to_string(&path).unwrap();
        assert!(
            guide.contains(&format!("```ini\n{unit}```")),
            "{} differs from its block in docs/operator-guide.md",
            path.display()
        );
        assert!(unit.starts_with("[Unit]"), "{}", path.display());
        seen += 1;
    }
    assert_eq!(seen, 5, "target, shim, source, sync service and timer");
}
