//! The config file parser and validator on arbitrary text.
//!
//! Beyond "never panics", a config it accepts must keep the promises the rest of the
//! program relies on without re-checking: derived sizes in range, every path
//! absolute, names unique and file-name safe, every disk in exactly one group.

use std::collections::HashSet;

use dataplane::config::{Config, ConfigError, NAME_LEN_MAX};

use crate::Target;

pub fn target() -> Target {
    Target {
        name: "config_toml",
        run,
        seeds,
        repair: None,
        dictionary: DICTIONARY,
        max_len: 16 << 10,
    }
}

const DICTIONARY: &[&[u8]] = &[
    b"[source]\n",
    b"[target]\n",
    b"[[disk]]\n",
    b"[disk]\n",
    b"source.",
    b"target = ",
    b"listen = ",
    b"psk_file = ",
    b"state_dir = ",
    b"block_size_kib = ",
    b"io_size_kib = ",
    b"queue_depth = ",
    b"workers = ",
    b"compression = ",
    b"compression_level = ",
    b"io_engine = ",
    b"connect_timeout_ms = ",
    b"io_timeout_ms = ",
    b"epoch_interval_ms = ",
    b"max_sessions = ",
    b"name = ",
    b"path = ",
    b"nbd_socket = ",
    b"group = ",
    b"\"127.0.0.1:7410\"",
    b"\"[::1]:0\"",
    b"\"host:65536\"",
    b"\"zstd\"",
    b"\"none\"",
    b"\"uring\"",
    b"\"auto\"",
    b"\"sync\"",
    b"\"..\"",
    b"\"\"",
    b"''' '''",
    b"\"\\u00e9\"",
    b"4294967295",
    b"4294967296",
    b"18446744073709551615",
    b"-9223372036854775808",
    b"0x7fffffff",
    b"-1",
    b"4096",
    b"1e400",
    b"inf",
    b"nan",
    b"1979-05-27T07:32:00Z",
    b"true",
    b"[[[[[[[[[[[[[[[[",
    b"{ a = { b = { c = 1 } } }",
    b"\n",
    b" = ",
    b"#",
];

pub fn run(data: &[u8]) -> String {
    // Arbitrary UTF-8: invalid sequences become U+FFFD rather than wasting the input.
    let text = String::from_utf8_lossy(data);
    match Config::from_str(&text, "/tmp") {
        Err(e) => {
            // Operators read this; building it must not panic either.
            let _ = (e.to_string(), format!("{e:?}"));
            match e {
                ConfigError::Parse { message, .. } => crate::label("parse", &message),
                ConfigError::Invalid { key, .. } => crate::label("invalid", &key),
                ConfigError::Missing { problem, .. } => crate::label("missing", &problem),
                ConfigError::Read { source, .. } => crate::label("read", &source),
            }
        }
        Ok(config) => {
            check(&config);
            format!(
                "ok:source={}:target={}:disks={}",
                config.source.is_some(),
                config.target.is_some(),
                crate::bucket(config.disks.len())
            )
        }
    }
}

fn check(config: &Config) {
    assert!(config.source.is_some() || config.target.is_some());
    assert!(!config.disks.is_empty(), "accepted a config with no disks");
    if let Some(source) = &config.source {
        let block = source.block_size_bytes();
        let io = source.io_size_bytes();
        assert!(
            block.is_power_of_two() && (4096..=1 << 20).contains(&block),
            "block size {block}"
        );
        assert!(
            io.is_power_of_two() && io >= block && io <= 4 << 20,
            "io size {io}"
        );
        assert!(source.psk_file.is_absolute() && source.state_dir.is_absolute());
        let _ = (
            source.compression(),
            source.connect_timeout(),
            source.io_timeout(),
        );
        assert!(!source.epoch_interval().is_zero());
        assert!(config.require_source("fuzz").is_ok());
    }
    if let Some(target) = &config.target {
        assert!(target.psk_file.is_absolute() && target.state_dir.is_absolute());
        assert!(!target.io_timeout().is_zero());
        assert!(config.require_target("fuzz").is_ok());
    }
    if let (Some(s), Some(t)) = (&config.source, &config.target) {
        assert_ne!(
            s.state_dir, t.state_dir,
            "source and target share a state_dir"
        );
    }
    let mut names = HashSet::new();
    let mut paths = HashSet::new();
    for disk in &config.disks {
        for name in [Some(disk.name.as_str()), disk.group.as_deref()]
            .into_iter()
            .flatten()
        {
            assert!(
                !name.is_empty()
                    && name.len() <= NAME_LEN_MAX
                    && name != "."
                    && name != ".."
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                "accepted an unsafe name {name:?}"
            );
        }
        assert!(
            names.insert(&disk.name),
            "duplicate disk name {:?}",
            disk.name
        );
        assert!(
            paths.insert(&disk.path),
            "duplicate disk path {:?}",
            disk.path
        );
        assert!(
            disk.path.is_absolute(),
            "relative disk path {:?}",
            disk.path
        );
        if let Some(socket) = &disk.nbd_socket {
            assert!(socket.is_absolute() && socket.as_os_str().len() <= 107);
        }
        assert!(std::ptr::eq(config.disk(&disk.name).unwrap(), disk));
    }
    let grouped: usize = config.groups().values().map(Vec::len).sum();
    assert_eq!(grouped, config.disks.len(), "groups lose or repeat disks");
}

fn seeds() -> Vec<Vec<u8>> {
    const BOTH: &str = r#"
[source]
target = "backup.example.net:7410"
psk_file = "keys/ferry.key"
state_dir = "state"
block_size_kib = 128
io_size_kib = 1024
queue_depth = 32
workers = 2
compression = "none"
compression_level = -7
io_engine = "sync"
connect_timeout_ms = 1000
io_timeout_ms = 2000
epoch_interval_ms = 100

[target]
listen = "[::1]:0"
psk_file = "/etc/ferry/ferry.key"
state_dir = "/var/lib/ferry-target"
queue_depth = 8
workers = 3
io_engine = "uring"
io_timeout_ms = 45000
max_sessions = 64

[[disk]]
name = "vm1-os"
path = "vm1-os.img"
nbd_socket = "/run/ferry/vm1-os.sock"
group = "vm1"

[[disk]]
name = "vm1_data.2"
path = "/dev/vg0/vm1-data"
group = "vm1"
"#;
    vec![
        include_str!("../../../docs/examples/source.toml").into(),
        include_str!("../../../docs/examples/target.toml").into(),
        BOTH.into(),
        "[target]\nlisten='0.0.0.0:1'\npsk_file='k'\nstate_dir='s'\n[[disk]]\nname='a'\npath='p'\n"
            .into(),
    ]
}
