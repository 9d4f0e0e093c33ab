//! [`IoFailure`]: a failed local file operation, with the path and what was being
//! done. Its own module so that the CLI's error type, the demo and the image generator
//! can all use it without importing one another.

use std::io;
use std::path::{Path, PathBuf};

/// A local file operation that failed: what was being done, to which path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}{at}", path.display())]
pub struct IoFailure {
    /// What was being done, worded to precede the path: "cannot create".
    pub action: &'static str,
    pub path: PathBuf,
    pub at: Where,
    #[source]
    pub source: io::Error,
}

impl IoFailure {
    /// A closure for `map_err`: `action` on `path`.
    pub fn on<'p>(
        action: &'static str,
        path: &'p Path,
    ) -> impl FnOnce(io::Error) -> IoFailure + 'p {
        Self::at(action, path, Where::Whole)
    }

    /// A closure for `map_err`: `action` on `path`, at `at`.
    pub fn at<'p>(
        action: &'static str,
        path: &'p Path,
        at: Where,
    ) -> impl FnOnce(io::Error) -> IoFailure + 'p {
        move |source| IoFailure {
            action,
            path: path.to_path_buf(),
            at,
            source,
        }
    }
}

/// Which part of a file an [`IoFailure`] concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    Whole,
    Offset(u64),
    /// Setting the file's length.
    Size(u64),
    /// Renaming it to this path.
    To(PathBuf),
}

impl std::fmt::Display for Where {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Where::Whole => Ok(()),
            Where::Offset(offset) => write!(f, " at offset {offset}"),
            Where::Size(bytes) => write!(f, " to {bytes} bytes"),
            Where::To(path) => write!(f, " to {}", path.display()),
        }
    }
}
