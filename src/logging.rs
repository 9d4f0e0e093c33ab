//! How `ferry` logs: to stderr, at the level `FERRY_LOG` (or `RUST_LOG`) names, as
//! text (with colours only when stderr is a terminal and `NO_COLOR` is unset) or as
//! one JSON object per line (`--log-format json`, for a log collector).

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per event (timestamp, level, message and fields).
    Json,
}

/// A log filter that is not one.
#[derive(Debug, thiserror::Error)]
#[error("{var}={value:?}: {why}; expected a level (error, warn, info, debug, trace, off) or comma-separated target=level directives, e.g. \"info\" or \"warn,dataplane=debug\"")]
pub struct LogFilterError {
    var: &'static str,
    value: String,
    why: String,
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The filter from `FERRY_LOG`, else `RUST_LOG`, else `default`. Stricter than
/// `EnvFilter` itself, which takes a bare word for a target name: here a bare word
/// must be a level, so a mistyped level is an error and not a silent "log nothing".
fn filter(default: tracing::Level) -> Result<EnvFilter, LogFilterError> {
    let found = ["FERRY_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|var| std::env::var(var).ok().map(|v| (var, v)));
    let Some((var, value)) = found else {
        return Ok(EnvFilter::new(default.as_str().to_ascii_lowercase()));
    };
    let bad = |why: String| LogFilterError {
        var,
        value: value.clone(),
        why,
    };
    for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad(format!("{level:?} is not a log level")));
        }
    }
    EnvFilter::try_new(&value).map_err(|e| bad(e.to_string()))
}

/// Installs the logger; an invalid filter is an error (nothing is logged then).
pub fn init(default: tracing::Level, format: LogFormat) -> Result<(), LogFilterError> {
    let filter = filter(default)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).init()
        }
    }
    Ok(())
}
