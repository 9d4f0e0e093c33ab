//! Prometheus metrics (`metrics_listen`): a real target, shim and `ferry source`, a
//! guest writing through the shim; both endpoints scraped over HTTP while epochs run.
//! The counters move the way replication does, the RPO stays small, the text is the
//! exposition format, and without the key nothing listens.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::rig::{Guest, Rig, RigSpec};
use crate::common::*;

const DISK_BYTES: u64 = 8 << 20;

/// Samples of one scrape: `name{labels}` → value.
type Samples = BTreeMap<String, f64>;

/// `GET /metrics` on `port`: the status line, the headers and the body.
fn get(port: u16, path: &str) -> (String, String, String) {
    // A process just started may not listen yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect to the metrics port {port}: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// Scrapes `port` and checks the body is the OpenMetrics text exposition format: every
/// sample belongs to a family declared by a `# TYPE` line before it (with the suffixes
/// its type allows), every value is a number, and `# EOF` ends it.
fn scrape(port: u16) -> Samples {
    let (status, headers, body) = get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Samples::new();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{body}");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap(), words.next().unwrap_or(""));
            assert!(name.starts_with("ferry_"), "{line}");
            match kind {
                "TYPE" => {
                    let t = words.next().unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram"].contains(&t),
                        "unexpected type: {line}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "{name} declared twice"
                    );
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let name = series.split('{').next().unwrap();
        let family = types
            .iter()
            .find(|(f, t)| {
                let suffixes: &[&str] = match t.as_str() {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    _ => &[""],
                };
                suffixes
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            })
            .map(|(f, _)| f.clone());
        assert!(family.is_some(), "{name} has no # TYPE before it:\n{body}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "labels of {line}"
                );
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (key, value) = pair.split_once('=').expect("key=value");
                    assert!(
                        !key.is_empty()
                            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    );
                    assert!(value.starts_with('"') && value.ends_with('"'), "{line}");
                }
            }
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        samples.insert(series.to_string(), v);
    }
    samples
}

fn value(samples: &Samples, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

/// The TCP ports `pid` listens on: its socket inodes matched against the kernel's
/// tables of listening sockets.
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(link) = std::fs::read_link(fd.path()) {
            let link = link.to_string_lossy().into_owned();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; field 9 the inode.
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// Adds `line` at the top of the `[section]` table of the config at `path`.
fn add_line(path: &Path, section: &str, line: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "{text}");
    std::fs::write(
        path,
        text.replacen(&header, &format!("{header}{line}\n"), 1),
    )
    .unwrap();
}

/// Waits until `source.log` reports `n` durable epochs.
fn wait_epochs(rig: &Rig, n: usize, source: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while rig.log("source.log").matches("epoch durable").count() < n {
        assert!(
            source.try_wait().unwrap().is_none(),
            "source exited: {}",
            rig.log("source.log")
        );
        assert!(
            Instant::now() < deadline,
            "no epoch: {}",
            rig.log("source.log")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn metrics_are_served_and_move_with_replication() {
    let seed = test_seed("metrics");
    let source_port = free_port();
    let mut spec = RigSpec::two_disk_group(DISK_BYTES);
    spec.source_extra
        .push_str(&format!("metrics_listen = \"127.0.0.1:{source_port}\"\n"));
    let mut rig = Rig::new(seed, &spec);

    // Without metrics_listen the target listens on its own port only.
    assert_eq!(listening_ports(rig.target.pid()), [rig.target.port]);
    assert!(
        !rig.target.stderr().contains("metrics"),
        "{}",
        rig.target.stderr()
    );

    let target_port = free_port();
    let config = rig.target.config.clone();
    add_line(
        &config,
        "target",
        &format!("metrics_listen = \"127.0.0.1:{target_port}\""),
    );
    rig.restart_target().unwrap();
    let mut ports = vec![rig.target.port, target_port];
    ports.sort_unstable();
    assert_eq!(listening_ports(rig.target.pid()), ports);
    // Anything but /metrics is not found.
    assert!(get(target_port, "/").0.starts_with("HTTP/1.1 404"));

    let mut guest = Guest::start(&rig, seed ^ 1, 16, Duration::from_millis(2));
    guest.wait_for(20);
    let mut source = rig.start_source();
    wait_epochs(&rig, 1, &mut source);
    assert_eq!(listening_ports(source.id()), [source_port]);
    assert!(
        rig.log("source.log").contains(&format!(
            "source metrics served on http://127.0.0.1:{source_port}/metrics"
        )),
        "{}",
        rig.log("source.log")
    );

    let group = "{group=\"vm1\"}";
    let mut scrapes: Vec<(Samples, Samples)> = Vec::new();
    for _ in 0..3 {
        // A few epochs (one every 200 ms) between scrapes.
        let seen = rig.log("source.log").matches("epoch durable").count();
        wait_epochs(&rig, seen + 3, &mut source);
        scrapes.push((scrape(source_port), scrape(target_port)));
    }
    for (s, t) in &scrapes {
        let rpo = value(s, &format!("ferry_source_rpo_seconds{group}"));
        assert!(rpo.is_finite() && (0.0..10.0).contains(&rpo), "rpo {rpo}");
        assert_eq!(value(s, "ferry_source_shim_up"), 1.0);
        assert_eq!(
            value(s, "ferry_source_epoch_failures_total{reason=\"fenced\"}"),
            0.0
        );
        assert!(value(s, "ferry_source_compression_ratio") > 0.0);
        assert!(value(s, "ferry_source_epoch_remaining_bytes") >= 0.0);
        for d in ["os", "data"] {
            value(s, &format!("ferry_source_pending_bytes{{disk=\"{d}\"}}"));
            value(s, &format!("ferry_source_inflight_bytes{{disk=\"{d}\"}}"));
        }
        // The rig's target config names no group.
        let tgroup = "{group=\"default\"}";
        assert!(value(t, &format!("ferry_target_recovery_points{tgroup}")) >= 1.0);
        value(t, &format!("ferry_target_recovery_points_bytes{tgroup}"));
        assert_eq!(
            value(t, "ferry_target_sessions_refused_total{reason=\"fenced\"}"),
            0.0
        );
        assert!(value(t, "ferry_target_sessions_active") <= 1.0);
        // Sessions are counted once they authenticate; one carries many epochs
        // (protocol version 3), so there may be far fewer sessions than epochs.
        let (sessions, committed) = (
            value(t, "ferry_target_sessions_total"),
            value(t, "ferry_target_epochs_committed_total"),
        );
        assert!(
            sessions >= 1.0 && committed >= 1.0,
            "{sessions} {committed}"
        );
        // The target saw at least the epochs the source counted when it was scraped
        // (scraped just after).
        assert!(committed >= value(s, "ferry_source_epochs_total"));
    }
    for pair in scrapes.windows(2) {
        let ((s0, t0), (s1, t1)) = (&pair[0], &pair[1]);
        for series in [
            "ferry_source_epochs_total",
            "ferry_source_sent_bytes_total",
            "ferry_source_read_bytes_total",
            "ferry_source_epoch_duration_seconds_count",
            "ferry_source_freeze_pause_seconds_count",
        ] {
            assert!(
                value(s1, series) > value(s0, series),
                "{series} did not grow"
            );
        }
        let last = format!("ferry_source_last_success_timestamp_seconds{group}");
        assert!(
            value(s1, &last) > value(s0, &last),
            "the last success did not advance"
        );
        // Not `ferry_target_sessions_total`: the epochs go on one session.
        for series in [
            "ferry_target_applied_bytes_total",
            "ferry_target_epochs_committed_total",
        ] {
            assert!(
                value(t1, series) > value(t0, series),
                "{series} did not grow"
            );
        }
    }
    let (s, _) = scrapes.last().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = value(
        s,
        &format!("ferry_source_last_success_timestamp_seconds{group}"),
    );
    assert!(
        (now - 30.0..=now + 1.0).contains(&last),
        "last success {last}, now {now}"
    );

    // Without metrics_listen, `ferry source` listens on nothing.
    stop(source);
    let text = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        text.replace(
            &format!("metrics_listen = \"127.0.0.1:{source_port}\"\n"),
            "",
        ),
    )
    .unwrap();
    let seen = rig.log("source.log").matches("epoch durable").count();
    let mut source = rig.start_source();
    wait_epochs(&rig, seen + 1, &mut source);
    assert_eq!(listening_ports(source.id()), Vec::<u16>::new());
    assert!(TcpStream::connect(("127.0.0.1", source_port)).is_err());
    stop(source);
    guest.stop();
}

/// Polls the scrape of `port` until `series` reaches `at_least`.
fn wait_value(port: u16, series: &str, at_least: f64, what: &dyn Fn() -> String) -> Samples {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let samples = scrape(port);
        if samples.get(series).is_some_and(|v| *v >= at_least) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stays below {at_least}: {}",
            what()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_count_refusals_and_failures_by_reason() {
    let seed = test_seed("metrics_refusals");
    let source_port = free_port();
    let mut spec = RigSpec::two_disk_group(DISK_BYTES);
    spec.source_extra
        .push_str(&format!("metrics_listen = \"127.0.0.1:{source_port}\"\n"));
    let mut rig = Rig::new(seed, &spec);
    let target_port = free_port();
    let config = rig.target.config.clone();
    add_line(
        &config,
        "target",
        &format!("metrics_listen = \"127.0.0.1:{target_port}\""),
    );
    rig.restart_target().unwrap();

    // A source with another key: refused at the handshake, and it keeps retrying.
    let (key, other) = (
        rig.dir.path().join("ferry.key"),
        rig.dir.path().join("other.key"),
    );
    keygen(&other);
    let text = std::fs::read_to_string(&rig.config).unwrap();
    assert!(text.contains(&toml_path(&key)));
    std::fs::write(
        &rig.config,
        text.replace(&toml_path(&key), &toml_path(&other)),
    )
    .unwrap();
    let mut source = rig.start_source();
    let log_path = rig.dir.path().join("source.log");
    let log = move || std::fs::read_to_string(&log_path).unwrap_or_default();
    let s = wait_value(
        source_port,
        "ferry_source_epoch_failures_total{reason=\"auth\"}",
        1.0,
        &log,
    );
    let t = wait_value(
        target_port,
        "ferry_target_sessions_refused_total{reason=\"auth\"}",
        1.0,
        &log,
    );
    assert_eq!(value(&s, "ferry_source_epochs_total"), 0.0);
    assert_eq!(
        value(
            &s,
            "ferry_source_last_success_timestamp_seconds{group=\"vm1\"}"
        ),
        0.0
    );
    assert!(value(&s, "ferry_source_rpo_seconds{group=\"vm1\"}") > 0.0);
    assert_eq!(value(&s, "ferry_source_halts_total{reason=\"auth\"}"), 0.0);
    // Unauthenticated: not a session.
    assert_eq!(value(&t, "ferry_target_sessions_total"), 0.0);
    assert_eq!(value(&t, "ferry_target_epochs_committed_total"), 0.0);
    assert!(
        source.try_wait().unwrap().is_none(),
        "the source gave up: {}",
        log()
    );
    stop(source);

    // The right key but no shim: the source's failures say so, and the shim is down.
    let text = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        text.replace(&toml_path(&other), &toml_path(&key)),
    )
    .unwrap();
    rig.kill_shim();
    let source = rig.start_source();
    let s = wait_value(
        source_port,
        "ferry_source_epoch_failures_total{reason=\"shim\"}",
        1.0,
        &log,
    );
    assert_eq!(value(&s, "ferry_source_shim_up"), 0.0);
    assert_eq!(value(&s, "ferry_source_epochs_total"), 0.0);
    stop(source);
}
