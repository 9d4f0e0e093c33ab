//! Prometheus metrics of `ferry source` and `ferry target`, served over HTTP at
//! `GET /metrics` on `metrics_listen` (off when the key is unset).
//!
//! Each process has one set of metrics ([`source()`], [`target()`]): the data path
//! updates them with a call per event (an epoch ended, a session started or was
//! refused, an epoch committed), each a few atomic operations, never per block. What
//! is cheap to read only when asked — the RPO, the shim's pending and frozen blocks,
//! the recovery points — is computed when Prometheus scrapes. Every metric, its
//! labels and its meaning are listed in `docs/metrics.md`.
//!
//! The text is the OpenMetrics exposition format (`prometheus-client`'s encoder),
//! which Prometheus negotiates by default: counters end in `_total`, units (seconds,
//! bytes) end the name, and the body ends with `# EOF`.

mod http;
pub mod source;
pub mod target;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::source::progress::Progress;
pub use http::MetricsServer;
pub use source::SourceMetrics;
pub use target::TargetMetrics;

/// Every metric's name starts with this (`ferry_source_…`, `ferry_target_…`).
pub const PREFIX: &str = "ferry";

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why metrics cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr} (metrics_listen)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

static SOURCE: OnceLock<SourceMetrics> = OnceLock::new();
static TARGET: OnceLock<TargetMetrics> = OnceLock::new();

/// This process's source metrics (`ferry source`'s continuous loop updates them).
pub fn source() -> &'static SourceMetrics {
    SOURCE.get_or_init(SourceMetrics::new)
}

/// This process's target metrics (the target writer's sessions update them).
pub fn target() -> &'static TargetMetrics {
    TARGET.get_or_init(TargetMetrics::new)
}

/// Serves the source metrics on `[source] metrics_listen`, if set; `progress` is the
/// continuous loop's (read at scrape time). A failure to listen is logged and
/// replication goes on without metrics: monitoring must not be what stops a DR copy
/// (the scrape target being down is what an alert sees).
pub fn serve_source(config: &Config, progress: Option<Arc<Progress>>) -> Option<MetricsServer> {
    let source = config.source.as_ref()?;
    let addr = source.metrics_listen?;
    let scrape = source::Scrape::new(config, source, progress);
    let mut registry = Registry::with_prefix(PREFIX);
    let metrics = self::source();
    metrics.register(registry.sub_registry_with_prefix("source"));
    started(
        "source",
        addr,
        MetricsServer::start(addr, registry, Box::new(move || metrics.refresh(&scrape))),
    )
}

/// Serves the target metrics on `[target] metrics_listen`, if set. A failure to listen
/// is logged and the target serves sources without metrics (see [`serve_source`]).
pub fn serve_target(config: &Config) -> Option<MetricsServer> {
    let target = config.target.as_ref()?;
    let addr = target.metrics_listen?;
    let scrape = target::Scrape::new(config, target);
    let mut registry = Registry::with_prefix(PREFIX);
    let metrics = self::target();
    metrics.register(registry.sub_registry_with_prefix("target"));
    started(
        "target",
        addr,
        MetricsServer::start(addr, registry, Box::new(move || metrics.refresh(&scrape))),
    )
}

/// Logs how starting the server of `side` went.
fn started(
    side: &str,
    addr: SocketAddr,
    server: Result<MetricsServer, MetricsError>,
) -> Option<MetricsServer> {
    match server {
        Ok(server) => {
            tracing::info!(
                "{side} metrics served on http://{}/metrics",
                server.local_addr()
            );
            Some(server)
        }
        Err(e) => {
            tracing::error!(
                "{side} metrics are not served: {}; replication goes on without them (fix or unset metrics_listen = \"{addr}\")",
                crate::chain(&e)
            );
            None
        }
    }
}

/// Label sets: one fixed key, and a value fixed at compile time or taken from the
/// config (groups and disks, bounded by it). Arrays, so that an update allocates
/// nothing once the series exists.
pub(crate) type Reason = [(&'static str, &'static str); 1];
pub(crate) type Named = [(&'static str, String); 1];

/// `{reason="…"}`.
pub(crate) fn reason(r: &'static str) -> Reason {
    [("reason", r)]
}

/// `{group="…"}`.
pub(crate) fn group(name: &str) -> Named {
    [("group", name.to_string())]
}

/// `{disk="…"}`.
pub(crate) fn disk(name: &str) -> Named {
    [("disk", name.to_string())]
}

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names Prometheus sees, as docs/metrics.md writes them (counters with
    /// `_total`, histograms by their family name).
    fn exposed() -> Vec<String> {
        let mut registry = Registry::with_prefix(PREFIX);
        let (source, target) = (SourceMetrics::new(), TargetMetrics::new());
        source.touch_all();
        target.touch_all();
        source.register(registry.sub_registry_with_prefix("source"));
        target.register(registry.sub_registry_with_prefix("target"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| match l.split_once(' ') {
                Some((name, "counter")) => format!("{name}_total"),
                Some((name, _)) => name.to_string(),
                None => panic!("{l}"),
            })
            .collect()
    }

    #[test]
    fn docs_list_every_metric_and_no_other() {
        let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"));
        let mut documented: Vec<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `ferry_"))
            .filter_map(|l| l.split_once('`'))
            .map(|(name, _)| format!("ferry_{name}"))
            .collect();
        let mut exposed = exposed();
        documented.sort();
        exposed.sort();
        assert_eq!(documented, exposed);
        for name in &exposed {
            assert!(
                name.starts_with("ferry_source_") || name.starts_with("ferry_target_"),
                "{name}"
            );
        }
    }
}
