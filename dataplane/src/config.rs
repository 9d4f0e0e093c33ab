//! The one TOML config file that every `ferry` subcommand reads.
//!
//! One file describes one host's role: a `[source]` section on the primary host, a
//! `[target]` section on the secondary site (or both, for a host that plays both
//! roles), and the `[[disk]]` list. Every key is documented in `docs/config.md`; a
//! test checks that page against the structs below, and another loads the examples in
//! `docs/examples/` so they cannot rot.
//!
//! Unknown keys are rejected everywhere (`deny_unknown_fields`): a misspelt tuning
//! knob that is silently ignored is worse than a refusal to start. Every error names
//! the file and, where there is one, the key.
//!
//! [`Config::load`] validates every range and resolves every relative path against
//! the config file's directory, so the fields of a loaded [`Config`] can be used as
//! they are.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default `source.block_size_kib`: 64 KiB balances bitmap size (2 MiB per TiB)
/// against bytes resent per dirty byte.
pub const DEFAULT_BLOCK_SIZE_KIB: u32 = 64;
/// Default `source.io_size_kib`: 256 KiB is where O_DIRECT reads peak here and what
/// nbdcopy settled on.
pub const DEFAULT_IO_SIZE_KIB: u32 = 256;
/// Default `queue_depth` on both sides: ~16 requests in flight saturate one device
/// queue without hoarding buffers (queue_depth × io_size of buffer memory).
pub const DEFAULT_QUEUE_DEPTH: u32 = 16;
/// `workers` when the number of cores cannot be read; the default is
/// [`default_workers`], one per core.
pub const DEFAULT_WORKERS: u32 = 1;
/// Default `source.compression_level` (used with `compression = "zstd"`): zstd -1 is
/// the cheapest level that still compresses well.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;
/// Default `source.connect_timeout_ms`.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default `io_timeout_ms` on both sides.
pub const DEFAULT_IO_TIMEOUT_MS: u64 = 30_000;
/// Default `source.epoch_interval_ms`.
pub const DEFAULT_EPOCH_INTERVAL_MS: u64 = 5_000;
/// Default `target.max_sessions`.
pub const DEFAULT_MAX_SESSIONS: u32 = 4;
/// The consistency group of every disk that names none.
pub const DEFAULT_GROUP: &str = "default";

/// Allowed `block_size_kib`: power of two in this range.
pub const BLOCK_SIZE_KIB_RANGE: std::ops::RangeInclusive<u32> = 4..=1024;
/// Largest `io_size_kib`: 4 MiB per request is beyond where reads stop getting faster.
pub const IO_SIZE_KIB_MAX: u32 = 4096;
/// Allowed `queue_depth`: io_uring rings are sized from it.
pub const QUEUE_DEPTH_RANGE: std::ops::RangeInclusive<u32> = 1..=256;
/// Allowed `workers`.
pub const WORKERS_RANGE: std::ops::RangeInclusive<u32> = 1..=64;
/// Allowed zstd `compression_level`; negative levels are zstd's fast levels.
pub const COMPRESSION_LEVEL_RANGE: std::ops::RangeInclusive<i32> = -7..=19;
/// Allowed `connect_timeout_ms` (up to 10 minutes).
pub const CONNECT_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=600_000;
/// Allowed `io_timeout_ms` (up to 1 hour).
pub const IO_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=3_600_000;
/// Allowed `epoch_interval_ms` (100 ms to 1 hour).
pub const EPOCH_INTERVAL_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=3_600_000;
/// Allowed `freeze_idle_timeout_ms` (1 s to 1 day). The engine sends a request at least
/// every quarter of it, so a second leaves 250 ms between them; beyond a day an
/// abandoned epoch's copy-before-write could fill `state_dir` long before anyone notices.
pub const FREEZE_IDLE_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 1_000..=86_400_000;
/// `freeze_idle_timeout_ms` defaults to this many `io_timeout_ms`: an engine stalled on
/// its connection to the target has given up (and aborted the epoch itself) by then.
pub const FREEZE_IDLE_TIMEOUT_PER_IO_TIMEOUT: u64 = 4;
/// Default `target.retention_points`: a day of hourly points, or two minutes of
/// five-second epochs.
pub const DEFAULT_RETENTION_POINTS: u32 = 24;
/// Allowed `retention_points`.
pub const RETENTION_POINTS_RANGE: std::ops::RangeInclusive<u32> = 0..=100_000;
/// Allowed `retention_minutes` (up to ten years).
pub const RETENTION_MINUTES_RANGE: std::ops::RangeInclusive<u64> = 0..=5_256_000;
/// Most intervals in `target.keep`.
pub const KEEP_GRID_MAX: usize = 16;
/// Allowed count of one `target.keep` interval.
pub const KEEP_COUNT_RANGE: std::ops::RangeInclusive<u32> = 1..=100_000;
/// Longest span `target.keep` may cover, in seconds (ten years, as `retention_minutes`).
pub const KEEP_SPAN_MAX_S: u64 = 5_256_000 * 60;
/// Allowed `max_sessions`.
pub const MAX_SESSIONS_RANGE: std::ops::RangeInclusive<u32> = 1..=64;
/// Longest disk or group name. Names become file names in `state_dir`.
pub const NAME_LEN_MAX: usize = 64;
// A disk name travels in the Open frame's fixed name field, with its length in a `u8`,
// and the target records it in each undo log header's fixed name field. The undo log is
// an on-disk format: its field never changes with the other two, so all three agree.
const _: () = assert!(NAME_LEN_MAX == crate::protocol::MAX_NAME_LEN);
const _: () = assert!(crate::protocol::MAX_NAME_LEN == crate::writer::undo::NAME_LEN);
const _: () = assert!(crate::protocol::MAX_NAME_LEN <= u8::MAX as usize);
/// Longest `nbd_socket` path: `sun_path` holds 108 bytes including the NUL.
pub const UNIX_SOCKET_PATH_MAX: usize = 107;
/// A config file larger than this is not a config file.
const CONFIG_FILE_READ_LIMIT: u64 = 1 << 20;

const _: () = assert!(DEFAULT_BLOCK_SIZE_KIB.is_power_of_two());
const _: () = assert!(DEFAULT_IO_SIZE_KIB.is_power_of_two());
const _: () = assert!(DEFAULT_IO_SIZE_KIB >= DEFAULT_BLOCK_SIZE_KIB);
const _: () = assert!(DEFAULT_IO_SIZE_KIB <= IO_SIZE_KIB_MAX);

/// Everything that can be wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML, has an unknown key, lacks a required key or has a
    /// value of the wrong type. `message` comes from the TOML parser and names the
    /// key; `snippet` is the offending line.
    #[error("{}:{line}:{column}: {message} (at `{snippet}`)", path.display())]
    Parse {
        path: PathBuf,
        /// 1-based; 0 when the parser gave no position.
        line: usize,
        /// 1-based; 0 when the parser gave no position.
        column: usize,
        message: String,
        snippet: String,
    },
    /// A key has a value outside its allowed range or form.
    #[error("{}: invalid `{key}` = {value}: expected {expected}", path.display())]
    Invalid {
        path: PathBuf,
        /// Dotted path of the key, e.g. `source.block_size_kib` or `disk[1].name`.
        key: String,
        value: String,
        expected: Expected,
    },
    /// A section or entry the file needs is missing.
    #[error("{}: {problem}", path.display())]
    Missing { path: PathBuf, problem: MissingPart },
}

/// What a key's value should have been, for [`ConfigError::Invalid`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Expected {
    /// Every range of this file is a constant well inside `i64`.
    #[error("a value in {start}..={end}")]
    InRange { start: i64, end: i64 },
    #[error("a power of two in {}..={}", BLOCK_SIZE_KIB_RANGE.start(), BLOCK_SIZE_KIB_RANGE.end())]
    BlockSize,
    /// Both are powers of two, so "a multiple of the block size" is "at least it".
    #[error("a power of two from block_size_kib ({block_size_kib}) to {IO_SIZE_KIB_MAX}")]
    IoSize { block_size_kib: u32 },
    #[error("1 to {NAME_LEN_MAX} characters from [A-Za-z0-9._-], not \".\" or \"..\"")]
    Name,
    #[error("a non-empty path")]
    NonEmptyPath,
    #[error("host:port with a port in 1..=65535 (e.g. \"127.0.0.1:7410\" or \"[::1]:7410\")")]
    HostPort,
    /// A rate or a schedule rule; the error says what form.
    #[error("{0}")]
    Rate(crate::source::throttle::RateError),
    #[error("a name not used by another [[disk]]")]
    UniqueName,
    #[error("a path not used by another [[disk]]")]
    UniquePath,
    #[error("a path of at most {UNIX_SOCKET_PATH_MAX} bytes (the Unix socket address limit)")]
    SocketPathLength,
    #[error("a socket not used by another [[disk]]")]
    UniqueSocket,
    #[error("a directory different from source.state_dir")]
    DistinctStateDirs,
    /// A metrics address is scraped, so it must be known in advance.
    #[error("ip:port with a port in 1..=65535 (e.g. \"127.0.0.1:9410\"): Prometheus scrapes a fixed address")]
    MetricsPort,
    /// Two listeners of one host cannot share an address.
    #[error("an address different from {other}")]
    DistinctAddress { other: &'static str },
    /// `target.keep`; `problem` says what is wrong with the part shown.
    #[error("comma-separated INTERVAL:COUNT like \"1m:60, 1h:24, 1d:14\" (INTERVAL a whole number with s, m, h, d or w, not shorter than the one before; COUNT in {}..={}; at most {KEEP_GRID_MAX} of them, ten years in all), but this part has {problem}", KEEP_COUNT_RANGE.start(), KEEP_COUNT_RANGE.end())]
    KeepGrid { problem: &'static str },
}

/// What a config file lacks, for [`ConfigError::Missing`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissingPart {
    #[error("no [[disk]] entries; at least one disk must be configured")]
    Disks,
    #[error("neither [source] nor [target] is present; a config needs at least one")]
    SourceAndTarget,
    /// `command` needs a section the file does not have.
    #[error("`{command}` needs a [{section}] section")]
    Section {
        command: String,
        section: &'static str,
    },
}

/// Whether and how the source compresses blocks, as read from `compression` and
/// `compression_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Blocks travel as they are. Best on loopback and fast links.
    None,
    /// zstd at `level` (negative: fast levels; 0: zstd's default).
    Zstd { level: i32 },
    /// The source picks, frame by frame, between no compression and a zstd level from
    /// what it observes (link or CPU the bottleneck, the ratio recent frames got); see
    /// `source::pipeline` for the policy.
    Auto,
}

impl From<Option<i32>> for Compression {
    /// A fixed zstd level, or none.
    fn from(level: Option<i32>) -> Self {
        level.map_or(Compression::None, |level| Compression::Zstd { level })
    }
}

/// The `compression` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionKind {
    /// `"none"`.
    None,
    /// `"zstd"`.
    Zstd,
    /// `"auto"`, the default.
    Auto,
}

/// The `io_engine` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoEngineKind {
    /// io_uring when the kernel allows it, else synchronous I/O (with a warning).
    #[default]
    Auto,
    /// io_uring or fail at start-up.
    Uring,
    /// Plain `pread`/`pwrite`; the reference path.
    Sync,
}

/// A whole config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[source]`: present on the primary host.
    #[serde(default)]
    pub source: Option<SourceConfig>,
    /// `[target]`: present on the secondary site.
    #[serde(default)]
    pub target: Option<TargetConfig>,
    /// `[[disk]]`: the protected disks, at least one, unique names.
    #[serde(rename = "disk", default)]
    pub disks: Vec<DiskConfig>,
    /// The file this was loaded from, for error messages (`<inline>` under the base
    /// directory for [`Config::from_str`]).
    #[serde(skip)]
    pub origin: PathBuf,
}

/// `[source]`: the primary host's engine.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `host:port` of the target writer.
    pub target: String,
    /// The pre-shared key file, same key on both sides. Resolved to an absolute path.
    pub psk_file: PathBuf,
    /// Where bitmaps, epochs and shim sockets live. Resolved to an absolute path.
    pub state_dir: PathBuf,
    /// Replication block in KiB: the unit of change tracking, hashing and shipping.
    #[serde(default = "default_block_size_kib")]
    pub block_size_kib: u32,
    /// Bytes per read request in KiB: a power of two, a multiple of the block size.
    #[serde(default = "default_io_size_kib")]
    pub io_size_kib: u32,
    /// io_uring reads in flight.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
    /// Hash/compress worker threads.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// `"auto"`, `"none"` or `"zstd"`; see [`SourceConfig::compression`].
    #[serde(default = "default_compression")]
    pub compression: CompressionKind,
    /// zstd level of `compression = "zstd"`; checked even when it is not used.
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,
    /// How disks are read.
    #[serde(default)]
    pub io_engine: IoEngineKind,
    /// How long to wait for the TCP connection to the target.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Every frame to or from the target must be sent (or received) within this time
    /// of its start, however the bytes trickle; otherwise the epoch fails ("timed out
    /// after N ms") and the shim's epoch is aborted. Also sets `TCP_USER_TIMEOUT` and
    /// keepalive.
    #[serde(default = "default_io_timeout_ms")]
    pub io_timeout_ms: u64,
    /// Time between epochs in continuous replication.
    #[serde(default = "default_epoch_interval_ms")]
    pub epoch_interval_ms: u64,
    /// Most bytes per second on the wire, e.g. `"200Mbit"`; unset: no limit. See
    /// [`crate::source::throttle`].
    #[serde(default)]
    pub max_rate: Option<String>,
    /// Rules `"DAYS HH:MM-HH:MM = RATE"` (local time) that override `max_rate` while
    /// they apply; the first matching rule wins.
    #[serde(default)]
    pub max_rate_schedule: Vec<String>,
    /// `ferry shim`: an epoch whose control connection sends no request for this long
    /// is aborted. Default: [`FREEZE_IDLE_TIMEOUT_PER_IO_TIMEOUT`] × `io_timeout_ms`;
    /// see [`SourceConfig::freeze_idle_timeout`].
    #[serde(default)]
    pub freeze_idle_timeout_ms: Option<u64>,
    /// `ferry source`: serve Prometheus metrics over HTTP (`GET /metrics`) on this
    /// `ip:port`; none when unset (see `docs/metrics.md`).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

/// `[target]`: the secondary site's writer.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Address to listen on, `ip:port` (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The pre-shared key file, same key on both sides. Resolved to an absolute path.
    pub psk_file: PathBuf,
    /// Where staged epochs and recovery points live. Resolved to an absolute path.
    pub state_dir: PathBuf,
    /// io_uring writes in flight.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
    /// Reserved for verify/decompress workers; sessions verify on their own thread today.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// How replica disks are written.
    #[serde(default)]
    pub io_engine: IoEngineKind,
    /// Every frame of an authenticated session must be received (or sent) within this
    /// time of its start; otherwise the session ends and its epoch is rolled back. The
    /// handshake has its own deadline (`writer::HANDSHAKE_DEADLINE`).
    #[serde(default = "default_io_timeout_ms")]
    pub io_timeout_ms: u64,
    /// Concurrent authenticated sessions; connections still in their handshake are
    /// bounded apart (`writer::MAX_PENDING_HANDSHAKES`).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: u32,
    /// Recovery points kept: the newest this many acknowledged epochs before the
    /// latest can be restored; older ones are merged away.
    #[serde(default = "default_retention_points")]
    pub retention_points: u32,
    /// Recovery points older than this are merged away too; 0 keeps them by count only.
    #[serde(default)]
    pub retention_minutes: u64,
    /// `ferry target`: serve Prometheus metrics over HTTP (`GET /metrics`) on this
    /// `ip:port`; none when unset (see `docs/metrics.md`).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// A time grid of recovery points, e.g. `"1m:60, 1h:24, 1d:14"`: every minute for
    /// an hour, then hourly for a day, then daily for two weeks; points off the grid
    /// are merged away. Parsed into [`TargetConfig::keep_grid`]. With it,
    /// `retention_points` caps the grid only when set in the file.
    #[serde(default)]
    pub keep: Option<String>,
    /// `keep` parsed: `(interval in seconds, how many)`, newest first; empty without
    /// `keep`.
    #[serde(skip)]
    pub keep_grid: Vec<(u64, u32)>,
}

/// `[[disk]]`: one protected disk.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Stable id, the same on both sides: `[A-Za-z0-9._-]{1,64}`, not `.` or `..`.
    pub name: String,
    /// Image file or block device: the protected disk on the source, the replica on
    /// the target. Resolved to an absolute path.
    pub path: PathBuf,
    /// Unix socket where the shim serves this disk over NBD (source side). Resolved to
    /// an absolute path.
    #[serde(default)]
    pub nbd_socket: Option<PathBuf>,
    /// Consistency group: its disks are cut and applied together. Disks without one
    /// form the group [`DEFAULT_GROUP`].
    #[serde(default)]
    pub group: Option<String>,
}

fn default_block_size_kib() -> u32 {
    DEFAULT_BLOCK_SIZE_KIB
}
fn default_io_size_kib() -> u32 {
    DEFAULT_IO_SIZE_KIB
}
fn default_queue_depth() -> u32 {
    DEFAULT_QUEUE_DEPTH
}
/// Default `workers` on both sides: one per core this process may run on
/// (`std::thread::available_parallelism`), within [`WORKERS_RANGE`];
/// [`DEFAULT_WORKERS`] when that cannot be read. The source pipeline's reader and
/// sender threads mostly wait on I/O, so every core can hash and compress.
pub fn default_workers() -> u32 {
    std::thread::available_parallelism()
        .map_or(DEFAULT_WORKERS, |n| {
            u32::try_from(n.get()).unwrap_or(u32::MAX)
        })
        .clamp(*WORKERS_RANGE.start(), *WORKERS_RANGE.end())
}
fn default_compression() -> CompressionKind {
    CompressionKind::Auto
}
fn default_compression_level() -> i32 {
    DEFAULT_COMPRESSION_LEVEL
}
fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}
fn default_io_timeout_ms() -> u64 {
    DEFAULT_IO_TIMEOUT_MS
}
fn default_epoch_interval_ms() -> u64 {
    DEFAULT_EPOCH_INTERVAL_MS
}
fn default_max_sessions() -> u32 {
    DEFAULT_MAX_SESSIONS
}

fn default_retention_points() -> u32 {
    DEFAULT_RETENTION_POINTS
}

impl SourceConfig {
    /// Replication block size in bytes.
    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_kib * 1024
    }

    /// Read request size in bytes.
    pub fn io_size_bytes(&self) -> u32 {
        self.io_size_kib * 1024
    }

    /// Compression mode with its level.
    pub fn compression(&self) -> Compression {
        match self.compression {
            CompressionKind::None => Compression::None,
            CompressionKind::Zstd => Compression::Zstd {
                level: self.compression_level,
            },
            CompressionKind::Auto => Compression::Auto,
        }
    }

    /// `connect_timeout_ms` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// `io_timeout_ms` as a duration.
    pub fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.io_timeout_ms)
    }

    /// The bandwidth limit of `max_rate` and `max_rate_schedule` (checked at load).
    pub fn limit(&self) -> crate::source::throttle::Limit {
        use crate::source::throttle::{Limit, Rate, Rule};
        Limit {
            default: self.max_rate.as_deref().and_then(|r| Rate::parse(r).ok()),
            rules: self
                .max_rate_schedule
                .iter()
                .filter_map(|r| Rule::parse(r).ok())
                .collect(),
        }
    }

    /// `epoch_interval_ms` as a duration.
    pub fn epoch_interval(&self) -> Duration {
        Duration::from_millis(self.epoch_interval_ms)
    }

    /// `freeze_idle_timeout_ms` as a duration: as configured, or
    /// [`FREEZE_IDLE_TIMEOUT_PER_IO_TIMEOUT`] × `io_timeout_ms` kept inside
    /// [`FREEZE_IDLE_TIMEOUT_MS_RANGE`].
    pub fn freeze_idle_timeout(&self) -> Duration {
        let ms = self.freeze_idle_timeout_ms.unwrap_or_else(|| {
            (self.io_timeout_ms * FREEZE_IDLE_TIMEOUT_PER_IO_TIMEOUT).clamp(
                *FREEZE_IDLE_TIMEOUT_MS_RANGE.start(),
                *FREEZE_IDLE_TIMEOUT_MS_RANGE.end(),
            )
        });
        Duration::from_millis(ms)
    }
}

impl TargetConfig {
    /// `io_timeout_ms` as a duration.
    pub fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.io_timeout_ms)
    }
}

impl DiskConfig {
    /// The consistency group this disk belongs to.
    pub fn group_name(&self) -> &str {
        self.group.as_deref().unwrap_or(DEFAULT_GROUP)
    }
}

/// Parses `target.keep` (`"1m:60, 1h:24"`) into `(interval seconds, count)`; on error
/// the offending part (the whole value if none) and what is wrong with it.
pub fn parse_keep(text: &str) -> Result<Vec<(u64, u32)>, (String, &'static str)> {
    let mut grid: Vec<(u64, u32)> = Vec::new();
    let mut span = 0u64;
    if text.trim().is_empty() {
        return Err((text.to_string(), "no interval"));
    }
    for part in text.split(',') {
        let item = part.trim();
        let bad = |problem| Err((item.to_string(), problem));
        let Some((interval, count)) = item.split_once(':') else {
            return bad("an interval without `:COUNT`");
        };
        let (interval, count) = (interval.trim(), count.trim());
        let digits = interval.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = match &interval[digits.len()..] {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 604_800,
            "" => return bad("an interval without a unit"),
            _ => return bad("an unknown unit"),
        };
        let every = match digits.parse::<u64>() {
            Ok(n) if n > 0 => n.saturating_mul(unit),
            Ok(_) => return bad("an interval of zero"),
            Err(_) => return bad("an interval that is not a whole number"),
        };
        let count = match count.parse::<u32>() {
            Ok(n) if KEEP_COUNT_RANGE.contains(&n) => n,
            _ => return bad("a count out of range"),
        };
        if grid.last().is_some_and(|&(prev, _)| every < prev) {
            return bad("an interval shorter than the one before it");
        }
        if grid.len() == KEEP_GRID_MAX {
            return bad("one interval too many");
        }
        span = span.saturating_add(every.saturating_mul(u64::from(count)));
        if span > KEEP_SPAN_MAX_S {
            return bad("the grid run past ten years");
        }
        grid.push((every, count));
    }
    Ok(grid)
}

/// Whether the TOML `text` (known to parse) sets `key` in table `table`.
fn sets_key(text: &str, table: &str, key: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|t| {
        t.get(table)
            .and_then(|v| v.as_table())
            .is_some_and(|t| t.contains_key(key))
    })
}

/// Converts a byte offset in `text` into a 1-based line and column and that line.
fn locate(text: &str, offset: usize) -> (usize, usize, &str) {
    let mut offset = offset.min(text.len());
    // Spans fall on token boundaries, but a slip must not turn an error into a panic.
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = before.matches('\n').count() + 1;
    let column = text[line_start..offset].chars().count() + 1;
    (line, column, text[line_start..line_end].trim())
}

/// serde speaks of struct fields; a TOML file has keys.
fn tomlish_message(message: &str) -> String {
    let message = message.trim_end();
    for (from, to) in [
        ("unknown field", "unknown key"),
        ("missing field", "missing key"),
    ] {
        if let Some(rest) = message.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    message.to_string()
}

/// Checks the forms and ranges that serde cannot express.
struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn invalid(
        &self,
        key: impl Into<String>,
        value: impl ToString,
        expected: Expected,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            value: value.to_string(),
            expected,
        }
    }

    fn range<T: PartialOrd + std::fmt::Display + Copy + TryInto<i64>>(
        &self,
        key: &str,
        value: T,
        range: &std::ops::RangeInclusive<T>,
    ) -> Result<(), ConfigError> {
        if range.contains(&value) {
            Ok(())
        } else {
            let bound = |b: T| b.try_into().unwrap_or(i64::MAX);
            let (start, end) = (bound(*range.start()), bound(*range.end()));
            Err(self.invalid(key, value, Expected::InRange { start, end }))
        }
    }

    /// Disk and group names become file names, so they are restricted to a portable
    /// set and may not be `.` or `..`.
    fn name(&self, key: &str, value: &str) -> Result<(), ConfigError> {
        let valid_chars = value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if value.is_empty()
            || value.len() > NAME_LEN_MAX
            || !valid_chars
            || value == "."
            || value == ".."
        {
            return Err(self.invalid(key, format!("{value:?}"), Expected::Name));
        }
        Ok(())
    }

    fn path(&self, key: &str, value: &mut PathBuf, base_dir: &Path) -> Result<(), ConfigError> {
        if value.as_os_str().is_empty() {
            return Err(self.invalid(key, "\"\"", Expected::NonEmptyPath));
        }
        *value = base_dir.join(&*value);
        Ok(())
    }

    /// `host:port` or `[v6]:port`, with a non-zero port. The host is resolved later,
    /// at connect time, so names are allowed.
    fn host_port(&self, key: &str, value: &str) -> Result<(), ConfigError> {
        let parsed = match value.strip_prefix('[') {
            Some(rest) => rest
                .split_once("]:")
                .filter(|(host, _)| !host.is_empty() && host.parse::<std::net::Ipv6Addr>().is_ok()),
            None => value
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty() && !host.contains(':')),
        };
        match parsed.map(|(_, port)| port.parse::<u16>()) {
            Some(Ok(port)) if port != 0 => Ok(()),
            _ => Err(self.invalid(key, format!("{value:?}"), Expected::HostPort)),
        }
    }

    fn source(&self, s: &mut SourceConfig, base_dir: &Path) -> Result<(), ConfigError> {
        self.host_port("source.target", &s.target)?;
        self.path("source.psk_file", &mut s.psk_file, base_dir)?;
        self.path("source.state_dir", &mut s.state_dir, base_dir)?;
        if !s.block_size_kib.is_power_of_two() || !BLOCK_SIZE_KIB_RANGE.contains(&s.block_size_kib)
        {
            return Err(self.invalid(
                "source.block_size_kib",
                s.block_size_kib,
                Expected::BlockSize,
            ));
        }
        // Both are powers of two, so "a multiple of the block size" is "at least it".
        if !s.io_size_kib.is_power_of_two()
            || s.io_size_kib < s.block_size_kib
            || s.io_size_kib > IO_SIZE_KIB_MAX
        {
            return Err(self.invalid(
                "source.io_size_kib",
                s.io_size_kib,
                Expected::IoSize {
                    block_size_kib: s.block_size_kib,
                },
            ));
        }
        self.range("source.queue_depth", s.queue_depth, &QUEUE_DEPTH_RANGE)?;
        self.range("source.workers", s.workers, &WORKERS_RANGE)?;
        self.range(
            "source.compression_level",
            s.compression_level,
            &COMPRESSION_LEVEL_RANGE,
        )?;
        self.range(
            "source.connect_timeout_ms",
            s.connect_timeout_ms,
            &CONNECT_TIMEOUT_MS_RANGE,
        )?;
        self.range(
            "source.io_timeout_ms",
            s.io_timeout_ms,
            &IO_TIMEOUT_MS_RANGE,
        )?;
        self.range(
            "source.epoch_interval_ms",
            s.epoch_interval_ms,
            &EPOCH_INTERVAL_MS_RANGE,
        )?;
        if let Some(ms) = s.freeze_idle_timeout_ms {
            self.range(
                "source.freeze_idle_timeout_ms",
                ms,
                &FREEZE_IDLE_TIMEOUT_MS_RANGE,
            )?;
        }
        self.rates(s)?;
        self.metrics_listen("source.metrics_listen", s.metrics_listen)?;
        Ok(())
    }

    /// `max_rate` and every `max_rate_schedule` rule parse.
    fn rates(&self, s: &SourceConfig) -> Result<(), ConfigError> {
        if let Some(rate) = &s.max_rate {
            crate::source::throttle::Rate::parse(rate).map_err(|e| {
                self.invalid("source.max_rate", format!("{rate:?}"), Expected::Rate(e))
            })?;
        }
        for (i, rule) in s.max_rate_schedule.iter().enumerate() {
            crate::source::throttle::Rule::parse(rule).map_err(|e| {
                self.invalid(
                    format!("source.max_rate_schedule[{i}]"),
                    format!("{rule:?}"),
                    Expected::Rate(e),
                )
            })?;
        }
        Ok(())
    }

    /// A metrics address needs a fixed port: port 0 would listen where no scraper
    /// looks.
    fn metrics_listen(&self, key: &str, value: Option<SocketAddr>) -> Result<(), ConfigError> {
        match value {
            Some(addr) if addr.port() == 0 => {
                Err(self.invalid(key, format!("\"{addr}\""), Expected::MetricsPort))
            }
            _ => Ok(()),
        }
    }

    fn target(&self, t: &mut TargetConfig, base_dir: &Path) -> Result<(), ConfigError> {
        self.path("target.psk_file", &mut t.psk_file, base_dir)?;
        self.path("target.state_dir", &mut t.state_dir, base_dir)?;
        self.range("target.queue_depth", t.queue_depth, &QUEUE_DEPTH_RANGE)?;
        self.range("target.workers", t.workers, &WORKERS_RANGE)?;
        self.range(
            "target.io_timeout_ms",
            t.io_timeout_ms,
            &IO_TIMEOUT_MS_RANGE,
        )?;
        self.range("target.max_sessions", t.max_sessions, &MAX_SESSIONS_RANGE)?;
        self.range(
            "target.retention_points",
            t.retention_points,
            &RETENTION_POINTS_RANGE,
        )?;
        self.range(
            "target.retention_minutes",
            t.retention_minutes,
            &RETENTION_MINUTES_RANGE,
        )?;
        self.metrics_listen("target.metrics_listen", t.metrics_listen)?;
        if let Some(addr) = t.metrics_listen.filter(|a| *a == t.listen) {
            return Err(self.invalid(
                "target.metrics_listen",
                format!("\"{addr}\""),
                Expected::DistinctAddress {
                    other: "target.listen",
                },
            ));
        }
        if let Some(keep) = &t.keep {
            t.keep_grid = parse_keep(keep).map_err(|(part, problem)| {
                self.invalid(
                    "target.keep",
                    format!("{part:?}"),
                    Expected::KeepGrid { problem },
                )
            })?;
        }
        Ok(())
    }

    fn disks(&self, disks: &mut [DiskConfig], base_dir: &Path) -> Result<(), ConfigError> {
        if disks.is_empty() {
            return Err(ConfigError::Missing {
                path: self.path.to_path_buf(),
                problem: MissingPart::Disks,
            });
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        let mut sockets = HashSet::new();
        for (i, disk) in disks.iter_mut().enumerate() {
            self.name(&format!("disk[{i}].name"), &disk.name)?;
            if !names.insert(disk.name.clone()) {
                return Err(self.invalid(
                    format!("disk[{i}].name"),
                    format!("{:?}", disk.name),
                    Expected::UniqueName,
                ));
            }
            self.path(&format!("disk[{i}].path"), &mut disk.path, base_dir)?;
            if !paths.insert(disk.path.clone()) {
                return Err(self.invalid(
                    format!("disk[{i}].path"),
                    disk.path.display(),
                    Expected::UniquePath,
                ));
            }
            if let Some(socket) = &mut disk.nbd_socket {
                let key = format!("disk[{i}].nbd_socket");
                self.path(&key, socket, base_dir)?;
                if socket.as_os_str().len() > UNIX_SOCKET_PATH_MAX {
                    return Err(self.invalid(key, socket.display(), Expected::SocketPathLength));
                }
                if !sockets.insert(socket.clone()) {
                    return Err(self.invalid(key, socket.display(), Expected::UniqueSocket));
                }
            }
            if let Some(group) = &disk.group {
                self.name(&format!("disk[{i}].group"), group)?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates the config file at `path`. Relative paths inside
    /// it resolve against the file's own directory.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let mut text = String::new();
        file.take(CONFIG_FILE_READ_LIMIT + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() as u64 > CONFIG_FILE_READ_LIMIT {
            return Err(read_error(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {CONFIG_FILE_READ_LIMIT} bytes; not a config file"),
            )));
        }
        let absolute = std::path::absolute(path).map_err(read_error)?;
        let base_dir = absolute.parent().unwrap_or(Path::new("/"));
        Self::parse(&text, path, base_dir)
    }

    /// Parses and validates `text` as if it were a file in `base_dir` (made absolute
    /// against the current directory if it is relative). For tests and embedded
    /// defaults such as `ferry demo`.
    pub fn from_str(text: &str, base_dir: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let base_dir = base_dir.as_ref();
        let base_dir = std::path::absolute(base_dir).map_err(|source| ConfigError::Read {
            path: base_dir.to_path_buf(),
            source,
        })?;
        Self::parse(text, &base_dir.join("<inline>"), &base_dir)
    }

    fn parse(text: &str, path: &Path, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (line, column, snippet) = match e.span() {
                Some(span) => locate(text, span.start),
                None => (0, 0, ""),
            };
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: tomlish_message(e.message()),
                snippet: snippet.to_string(),
            }
        })?;
        config.origin = path.to_path_buf();
        let v = Validator { path };
        if config.source.is_none() && config.target.is_none() {
            return Err(ConfigError::Missing {
                path: path.to_path_buf(),
                problem: MissingPart::SourceAndTarget,
            });
        }
        if let Some(source) = &mut config.source {
            v.source(source, base_dir)?;
        }
        if let Some(target) = &mut config.target {
            v.target(target, base_dir)?;
            if !target.keep_grid.is_empty() && !sets_key(text, "target", "retention_points") {
                // The grid alone decides; the default count would cut it short.
                target.retention_points = *RETENTION_POINTS_RANGE.end();
            }
        }
        if let (Some(source), Some(target)) = (&config.source, &config.target) {
            if source.state_dir == target.state_dir {
                return Err(v.invalid(
                    "target.state_dir",
                    target.state_dir.display(),
                    Expected::DistinctStateDirs,
                ));
            }
            if let Some(addr) = target
                .metrics_listen
                .filter(|a| source.metrics_listen == Some(*a))
            {
                return Err(v.invalid(
                    "target.metrics_listen",
                    format!("\"{addr}\""),
                    Expected::DistinctAddress {
                        other: "source.metrics_listen",
                    },
                ));
            }
        }
        v.disks(&mut config.disks, base_dir)?;
        Ok(config)
    }

    /// The file this config came from.
    pub fn path(&self) -> &Path {
        &self.origin
    }

    /// The `[source]` section, or an error telling the operator that `command` needs it.
    pub fn require_source(&self, command: &str) -> Result<&SourceConfig, ConfigError> {
        self.source.as_ref().ok_or_else(|| ConfigError::Missing {
            path: self.origin.clone(),
            problem: MissingPart::Section {
                command: command.to_string(),
                section: "source",
            },
        })
    }

    /// The `[target]` section, or an error telling the operator that `command` needs it.
    pub fn require_target(&self, command: &str) -> Result<&TargetConfig, ConfigError> {
        self.target.as_ref().ok_or_else(|| ConfigError::Missing {
            path: self.origin.clone(),
            problem: MissingPart::Section {
                command: command.to_string(),
                section: "target",
            },
        })
    }

    /// The disk called `name`.
    pub fn disk(&self, name: &str) -> Option<&DiskConfig> {
        self.disks.iter().find(|d| d.name == name)
    }

    /// Disks by consistency group, in name order of groups and file order of disks.
    pub fn groups(&self) -> BTreeMap<&str, Vec<&DiskConfig>> {
        let mut groups: BTreeMap<&str, Vec<&DiskConfig>> = BTreeMap::new();
        for disk in &self.disks {
            groups.entry(disk.group_name()).or_default().push(disk);
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "/etc/ferry";

    const MINIMAL_SOURCE: &str = r#"
[source]
target = "127.0.0.1:7410"
psk_file = "ferry.key"
state_dir = "/var/lib/ferry"

[[disk]]
name = "vm1-os"
path = "/var/lib/vms/vm1-os.img"
"#;

    const FULL: &str = r#"
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
metrics_listen = "127.0.0.1:9410"

[target]
listen = "[::1]:0"
psk_file = "/etc/ferry/ferry.key"
state_dir = "/var/lib/ferry-target"
queue_depth = 8
workers = 3
io_engine = "uring"
io_timeout_ms = 45000
max_sessions = 64
metrics_listen = "[::1]:9411"

[[disk]]
name = "vm1-os"
path = "vm1-os.img"
nbd_socket = "/run/ferry/vm1-os.sock"
group = "vm1"

[[disk]]
name = "vm1_data.2"
path = "/dev/vg0/vm1-data"
group = "vm1"

[[disk]]
name = "standalone"
path = "/dev/vg0/standalone"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_str(text, BASE)
    }

    const DISK: &str = "[[disk]]\nname = \"vm\"\npath = \"vm.img\"\n";

    #[test]
    fn keep_grids_parse_and_bad_parts_are_named() {
        assert_eq!(
            super::parse_keep("1m:60, 1h:24, 1d:14"),
            Ok(vec![(60, 60), (3_600, 24), (86_400, 14)])
        );
        assert_eq!(super::parse_keep("1s:3"), Ok(vec![(1, 3)]));
        for (text, part) in [
            ("1m:60, 1x:5", "1x:5"),
            ("1m", "1m"),
            ("m:5", "m:5"),
            ("0s:5", "0s:5"),
            ("1h:24, 1m:60", "1m:60"),
            ("1m:0", "1m:0"),
            ("", ""),
            ("1m:60,", ""),
        ] {
            let got = super::parse_keep(text);
            assert_eq!(
                got.as_ref().map_err(|e| e.0.as_str()),
                Err(part),
                "{text:?}"
            );
        }
        let err = parse(&format!(
            "[target]\nlisten = \"0.0.0.0:7410\"\npsk_file = \"k\"\nstate_dir = \"s\"\nkeep = \"1m:60, 1q:2\"\n{DISK}"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`target.keep` = \"1q:2\""), "{err}");
        assert!(err.contains("this part has an unknown unit"), "{err}");
    }

    #[test]
    fn keep_alone_lifts_the_count_and_an_explicit_count_caps_it() {
        let cfg = |extra: &str| {
            parse(&format!(
                "[target]\nlisten = \"0.0.0.0:7410\"\npsk_file = \"k\"\nstate_dir = \"s\"\n{extra}\n{DISK}"
            ))
            .unwrap()
            .target
            .unwrap()
        };
        let t = cfg("keep = \"1m:60\"");
        assert_eq!(t.keep_grid, vec![(60, 60)]);
        assert_eq!(t.retention_points, *RETENTION_POINTS_RANGE.end());
        let t = cfg("keep = \"1m:60\"\nretention_points = 24");
        assert_eq!(t.retention_points, 24);
        assert_eq!(cfg("").retention_points, DEFAULT_RETENTION_POINTS);
    }

    /// MINIMAL_SOURCE with `line` added to `[source]`.
    fn with_source_line(line: &str) -> String {
        MINIMAL_SOURCE.replace("[source]\n", &format!("[source]\n{line}\n"))
    }

    fn expect_invalid(text: &str, key: &str) -> String {
        match parse(text) {
            Err(e @ ConfigError::Invalid { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("`{key}`")), "{msg}");
                msg
            }
            other => panic!("expected an invalid `{key}`, got {other:?}"),
        }
    }

    #[test]
    fn workers_default_to_the_cores_within_range() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let expected = cores.clamp(1, *WORKERS_RANGE.end() as usize) as u32;
        assert_eq!(default_workers(), expected);
        assert!(WORKERS_RANGE.contains(&default_workers()));
        let both = format!(
            "[target]\nlisten = \"0.0.0.0:7410\"\npsk_file = \"k\"\nstate_dir = \"s\"\n{MINIMAL_SOURCE}"
        );
        let config = parse(&both).unwrap();
        assert_eq!(config.source.unwrap().workers, expected);
        assert_eq!(config.target.unwrap().workers, expected);
    }

    #[test]
    fn compression_keys() {
        let mode = |line: &str| {
            parse(&with_source_line(line))
                .unwrap()
                .source
                .unwrap()
                .compression()
        };
        assert_eq!(mode("compression = \"auto\""), Compression::Auto);
        assert_eq!(mode("compression = \"none\""), Compression::None);
        assert_eq!(
            mode("compression = \"zstd\""),
            Compression::Zstd { level: 1 }
        );
        assert_eq!(
            mode("compression = \"zstd\"\ncompression_level = 3"),
            Compression::Zstd { level: 3 }
        );
        // The level of "zstd" is checked whatever the mode.
        expect_invalid(
            &with_source_line("compression = \"auto\"\ncompression_level = 20"),
            "source.compression_level",
        );
        assert_eq!(Compression::from(None), Compression::None);
        assert_eq!(Compression::from(Some(-3)), Compression::Zstd { level: -3 });
    }

    #[test]
    fn minimal_source_gets_defaults() {
        let config = parse(MINIMAL_SOURCE).unwrap();
        let s = config.source.as_ref().unwrap();
        assert_eq!(s.psk_file, Path::new("/etc/ferry/ferry.key"));
        assert_eq!(s.state_dir, Path::new("/var/lib/ferry"));
        assert_eq!(s.block_size_bytes(), 64 * 1024);
        assert_eq!(s.io_size_bytes(), 256 * 1024);
        assert_eq!(s.queue_depth, 16);
        assert_eq!(s.workers, default_workers());
        assert_eq!(s.compression(), Compression::Auto);
        assert_eq!(s.compression_level, DEFAULT_COMPRESSION_LEVEL);
        assert_eq!(s.io_engine, IoEngineKind::Auto);
        assert_eq!(s.connect_timeout(), Duration::from_secs(5));
        assert_eq!(s.io_timeout(), Duration::from_secs(30));
        assert_eq!(s.epoch_interval(), Duration::from_secs(5));
        assert_eq!(s.metrics_listen, None);
        assert!(config.target.is_none());
        assert!(config.require_target("ferry target").is_err());
        assert_eq!(config.disks[0].group_name(), DEFAULT_GROUP);
        assert_eq!(config.disks[0].nbd_socket, None);
        assert_eq!(config.path(), Path::new("/etc/ferry/<inline>"));
    }

    #[test]
    fn every_key_parses() {
        let config = parse(FULL).unwrap();
        let s = config.require_source("ferry sync").unwrap();
        assert_eq!(s.target, "backup.example.net:7410");
        assert_eq!(s.psk_file, Path::new("/etc/ferry/keys/ferry.key"));
        assert_eq!(s.state_dir, Path::new("/etc/ferry/state"));
        assert_eq!(s.block_size_bytes(), 128 * 1024);
        assert_eq!(s.io_size_bytes(), 1024 * 1024);
        assert_eq!((s.queue_depth, s.workers), (32, 2));
        assert_eq!(s.compression(), Compression::None);
        assert_eq!(s.compression_level, -7);
        assert_eq!(s.io_engine, IoEngineKind::Sync);
        assert_eq!(s.connect_timeout_ms, 1000);
        assert_eq!(s.io_timeout_ms, 2000);
        assert_eq!(s.epoch_interval_ms, 100);
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9410".parse().unwrap()));
        let t = config.require_target("ferry target").unwrap();
        assert_eq!(t.listen, "[::1]:0".parse::<SocketAddr>().unwrap());
        assert_eq!(t.metrics_listen, Some("[::1]:9411".parse().unwrap()));
        assert_eq!((t.queue_depth, t.workers, t.max_sessions), (8, 3, 64));
        assert_eq!(t.io_engine, IoEngineKind::Uring);
        assert_eq!(t.io_timeout(), Duration::from_secs(45));
        assert_eq!(config.disks.len(), 3);
        assert_eq!(config.disks[0].path, Path::new("/etc/ferry/vm1-os.img"));
        assert_eq!(
            config.disks[0].nbd_socket.as_deref(),
            Some(Path::new("/run/ferry/vm1-os.sock"))
        );
        let groups = config.groups();
        let names = |g: &str| {
            groups[g]
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("vm1"), ["vm1-os", "vm1_data.2"]);
        assert_eq!(names(DEFAULT_GROUP), ["standalone"]);
        assert_eq!(
            config.disk("standalone").unwrap().path,
            Path::new("/dev/vg0/standalone")
        );
        assert!(config.disk("nope").is_none());
    }

    #[test]
    fn metrics_listen_needs_a_fixed_distinct_address() {
        let msg = expect_invalid(
            &with_source_line("metrics_listen = \"127.0.0.1:0\""),
            "source.metrics_listen",
        );
        assert!(msg.contains("Prometheus scrapes a fixed address"), "{msg}");
        let target_port_0 = FULL.replace(
            "metrics_listen = \"[::1]:9411\"",
            "metrics_listen = \"[::1]:0\"",
        );
        expect_invalid(&target_port_0, "target.metrics_listen");
        // The target's own listener and its metrics cannot share an address.
        let same_as_listen = FULL.replace("\nlisten = \"[::1]:0\"", "\nlisten = \"[::1]:9411\"");
        let msg = expect_invalid(&same_as_listen, "target.metrics_listen");
        assert!(msg.contains("different from target.listen"), "{msg}");
        // Nor can the source's and the target's metrics of one host.
        let shared = FULL.replace(
            "metrics_listen = \"[::1]:9411\"",
            "metrics_listen = \"127.0.0.1:9410\"",
        );
        let msg = expect_invalid(&shared, "target.metrics_listen");
        assert!(
            msg.contains("different from source.metrics_listen"),
            "{msg}"
        );
        // Not an ip:port: the parser names the key.
        let err = parse(&with_source_line("metrics_listen = \"localhost:9410\"")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse { .. }) && err.to_string().contains("metrics_listen"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        let cases = [
            format!("verbose = true\n{MINIMAL_SOURCE}"),
            with_source_line("compresion = \"zstd\""),
            MINIMAL_SOURCE.replace("name = \"vm1-os\"", "name = \"vm1-os\"\nsize_gib = 10"),
            FULL.replace("max_sessions = 64", "max_sessions = 64\nlisten_backlog = 5"),
            format!("{MINIMAL_SOURCE}\n[tls]\ncert = \"x\"\n"),
        ];
        let keys = ["verbose", "compresion", "size_gib", "listen_backlog", "tls"];
        for (text, key) in cases.iter().zip(keys) {
            let err = parse(text).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ConfigError::Parse { .. }), "{msg}");
            assert!(msg.contains(key), "{msg:?} does not name {key}");
            assert!(
                msg.contains("/etc/ferry/<inline>"),
                "{msg:?} does not name the file"
            );
        }
    }

    #[test]
    fn parse_errors_point_at_the_line() {
        let err = parse(&with_source_line("compresion = \"zstd\"")).unwrap_err();
        match err {
            ConfigError::Parse {
                line,
                column,
                snippet,
                ..
            } => {
                assert_eq!((line, column), (3, 1));
                assert_eq!(snippet, "compresion = \"zstd\"");
            }
            other => panic!("{other:?}"),
        }
        let msg = parse(&with_source_line("block_size_kib = -4"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("block_size_kib = -4"), "{msg}");
        let msg = parse(&with_source_line("compression = \"lz4\""))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("lz4") && msg.contains("zstd"), "{msg}");
        let msg = parse("[source]\ntarget = \"127.0.0.1:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("psk_file"), "missing key named: {msg}");
    }

    #[test]
    fn freeze_idle_timeout_defaults_to_a_few_io_timeouts() {
        let c = parse(MINIMAL_SOURCE).unwrap();
        let s = c.source.as_ref().unwrap();
        assert_eq!(s.freeze_idle_timeout(), Duration::from_secs(120));
        let c = parse(&with_source_line("io_timeout_ms = 100")).unwrap();
        let s = c.source.as_ref().unwrap();
        assert_eq!(
            s.freeze_idle_timeout(),
            Duration::from_secs(1),
            "kept in range"
        );
        let c = parse(&with_source_line("freeze_idle_timeout_ms = 2500")).unwrap();
        let s = c.source.as_ref().unwrap();
        assert_eq!(s.freeze_idle_timeout(), Duration::from_millis(2500));
        expect_invalid(
            &with_source_line("freeze_idle_timeout_ms = 999"),
            "source.freeze_idle_timeout_ms",
        );
        expect_invalid(
            &with_source_line("freeze_idle_timeout_ms = 86400001"),
            "source.freeze_idle_timeout_ms",
        );
    }

    #[test]
    fn out_of_range_values_name_key_value_and_range() {
        let msg = expect_invalid(
            &with_source_line("block_size_kib = 48"),
            "source.block_size_kib",
        );
        assert!(
            msg.contains("48") && msg.contains("power of two in 4..=1024"),
            "{msg}"
        );
        expect_invalid(
            &with_source_line("block_size_kib = 2"),
            "source.block_size_kib",
        );
        expect_invalid(
            &with_source_line("block_size_kib = 2048"),
            "source.block_size_kib",
        );
        let msg = expect_invalid(
            &with_source_line("block_size_kib = 128\nio_size_kib = 64"),
            "source.io_size_kib",
        );
        assert!(msg.contains("from block_size_kib (128) to 4096"), "{msg}");
        expect_invalid(
            &with_source_line("io_size_kib = 8192"),
            "source.io_size_kib",
        );
        expect_invalid(&with_source_line("io_size_kib = 384"), "source.io_size_kib");
        let msg = expect_invalid(&with_source_line("queue_depth = 0"), "source.queue_depth");
        assert!(msg.contains("= 0") && msg.contains("1..=256"), "{msg}");
        expect_invalid(&with_source_line("queue_depth = 257"), "source.queue_depth");
        expect_invalid(&with_source_line("workers = 65"), "source.workers");
        expect_invalid(
            &with_source_line("compression_level = 20"),
            "source.compression_level",
        );
        expect_invalid(
            &with_source_line("compression_level = -8"),
            "source.compression_level",
        );
        expect_invalid(
            &with_source_line("connect_timeout_ms = 0"),
            "source.connect_timeout_ms",
        );
        expect_invalid(
            &with_source_line("io_timeout_ms = 3600001"),
            "source.io_timeout_ms",
        );
        expect_invalid(
            &with_source_line("epoch_interval_ms = 99"),
            "source.epoch_interval_ms",
        );
        expect_invalid(
            &FULL.replace("max_sessions = 64", "max_sessions = 65"),
            "target.max_sessions",
        );
        expect_invalid(
            &FULL.replace("queue_depth = 8", "queue_depth = 0"),
            "target.queue_depth",
        );
        expect_invalid(
            &FULL.replace("workers = 3", "workers = 0"),
            "target.workers",
        );
        expect_invalid(
            &FULL.replace("io_timeout_ms = 45000", "io_timeout_ms = 0"),
            "target.io_timeout_ms",
        );
        // The bounds themselves are accepted.
        parse(&with_source_line(
            "block_size_kib = 4\nio_size_kib = 4096\nqueue_depth = 256\nworkers = 64",
        ))
        .unwrap();
        parse(&with_source_line(
            "block_size_kib = 1024\nio_size_kib = 1024\ncompression_level = 19",
        ))
        .unwrap();
    }

    #[test]
    fn addresses_are_checked() {
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            ":7410",
            "host:port",
            "::1:7410",
            "[::1]7410",
            "[nope]:1",
        ] {
            expect_invalid(
                &MINIMAL_SOURCE.replace("127.0.0.1:7410", bad),
                "source.target",
            );
        }
        for good in ["localhost:1", "[::1]:7410", "10.0.0.1:65535"] {
            parse(&MINIMAL_SOURCE.replace("127.0.0.1:7410", good)).unwrap();
        }
        let text = FULL.replace("[::1]:0", "localhost:7410");
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn disk_names_are_unique_and_portable() {
        let two_disks = |a: &str, b: &str| {
            format!("{MINIMAL_SOURCE}\n[[disk]]\nname = \"{b}\"\npath = \"/b.img\"\n")
                .replace("name = \"vm1-os\"", &format!("name = \"{a}\""))
        };
        let msg = expect_invalid(&two_disks("a", "a"), "disk[1].name");
        assert!(msg.contains("not used by another"), "{msg}");
        for bad in ["", ".", "..", "a/b", "vm 1", "ü", "x".repeat(65).as_str()] {
            expect_invalid(&two_disks(bad, "ok"), "disk[0].name");
        }
        parse(&two_disks(&"x".repeat(64), "A.b_c-9")).unwrap();
        let same_path = two_disks("a", "b").replace("/b.img", "/var/lib/vms/vm1-os.img");
        expect_invalid(&same_path, "disk[1].path");
        let bad_group =
            MINIMAL_SOURCE.replace("name = \"vm1-os\"", "name = \"vm1-os\"\ngroup = \"a b\"");
        expect_invalid(&bad_group, "disk[0].group");
        let long_socket = MINIMAL_SOURCE.replace(
            "name = \"vm1-os\"",
            &format!(
                "name = \"vm1-os\"\nnbd_socket = \"/run/{}.sock\"",
                "s".repeat(100)
            ),
        );
        expect_invalid(&long_socket, "disk[0].nbd_socket");
        let empty_path = MINIMAL_SOURCE.replace("\"/var/lib/vms/vm1-os.img\"", "\"\"");
        expect_invalid(&empty_path, "disk[0].path");
    }

    #[test]
    fn sections_and_disks_are_required() {
        let no_disk = MINIMAL_SOURCE.split("[[disk]]").next().unwrap();
        let msg = parse(no_disk).unwrap_err().to_string();
        assert!(msg.contains("[[disk]]"), "{msg}");
        let no_role = MINIMAL_SOURCE.split("[[disk]]").nth(1).unwrap();
        let msg = parse(&format!("[[disk]]{no_role}"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("[source]") && msg.contains("[target]"),
            "{msg}"
        );
        assert!(matches!(parse(""), Err(ConfigError::Missing { .. })));
        let shared_state = FULL.replace(
            "state_dir = \"state\"",
            "state_dir = \"/var/lib/ferry-target\"",
        );
        expect_invalid(&shared_state, "target.state_dir");
    }

    #[test]
    fn load_names_missing_files_and_resolves_paths() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let err = Config::load(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("absent.toml"), "{err}");

        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, MINIMAL_SOURCE).unwrap();
        let config = Config::load(&path).unwrap();
        let source = config.source.unwrap();
        assert_eq!(source.psk_file, dir.path().join("ferry.key"));
        assert!(source.psk_file.is_absolute());
        assert_eq!(config.origin, path);

        std::fs::write(&path, with_source_line("bogus = 1")).unwrap();
        let msg = Config::load(&path).unwrap_err().to_string();
        assert!(
            msg.contains("bogus") && msg.contains(&path.display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn examples_load() {
        let examples = [
            concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/source.toml"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/target.toml"),
        ];
        let source = Config::load(examples[0]).unwrap();
        let target = Config::load(examples[1]).unwrap();
        let s = source.require_source("ferry sync").unwrap();
        let t = target.require_target("ferry target").unwrap();
        // The pair works on loopback as written.
        assert_eq!(s.target.parse::<SocketAddr>().unwrap(), t.listen);
        assert_eq!(s.psk_file, t.psk_file);
        assert_ne!(s.state_dir, t.state_dir);
        let names = |c: &Config| c.disks.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&source), names(&target));
        for (a, b) in source.disks.iter().zip(&target.disks) {
            assert_ne!(a.path, b.path, "the replica must not be the source disk");
        }
    }

    /// Collects the key names serde accepts for a struct, so that the docs can be
    /// checked against the code rather than against a second hand-written list.
    mod field_names {
        use serde::de::{self, Visitor};

        #[derive(Default)]
        pub struct Collector(pub &'static [&'static str]);

        impl<'de> de::Deserializer<'de> for &mut Collector {
            type Error = de::value::Error;

            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("only structs are inspected"))
            }

            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _name: &'static str,
                fields: &'static [&'static str],
                _visitor: V,
            ) -> Result<V::Value, Self::Error> {
                self.0 = fields;
                Err(de::Error::custom("fields collected"))
            }

            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
                bytes byte_buf option unit unit_struct newtype_struct seq tuple
                tuple_struct map enum identifier ignored_any
            }
        }

        pub fn of<T: for<'de> serde::Deserialize<'de>>() -> Vec<&'static str> {
            let mut collector = Collector::default();
            let _ = T::deserialize(&mut collector);
            let mut fields = collector.0.to_vec();
            fields.sort_unstable();
            fields
        }
    }

    #[test]
    fn docs_cover_every_key() {
        let docs = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md"));
        // Keys are the first column of the table rows under each section's heading.
        let mut documented: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut section = "";
        for line in docs.lines() {
            if let Some(heading) = line.strip_prefix("## ") {
                section = ["[[disk]]", "[source]", "[target]"]
                    .into_iter()
                    .find(|s| heading.contains(s))
                    .unwrap_or("");
            } else if let Some(row) = line.strip_prefix("| `") {
                if let Some((key, _)) = row.split_once('`') {
                    if !section.is_empty() {
                        documented.entry(section).or_default().push(key);
                    }
                }
            }
        }
        for keys in documented.values_mut() {
            keys.sort_unstable();
        }
        assert_eq!(documented["[source]"], field_names::of::<SourceConfig>());
        assert_eq!(documented["[target]"], field_names::of::<TargetConfig>());
        assert_eq!(documented["[[disk]]"], field_names::of::<DiskConfig>());
        let top = field_names::of::<Config>();
        assert_eq!(top, ["disk", "source", "target"]);
    }
}
