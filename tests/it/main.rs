//! ferry's integration tests, one binary: real `ferry` processes (target, source, shim)
//! over loopback TCP and Unix sockets, one module per area. Shared helpers live in
//! `common/`; every test builds its own scratch directory, key, ports and processes, so
//! the tests of all modules run in parallel threads of this one process.
//!
//! Run one module with `cargo test --test it e2e::`, one test by its name.

mod common;

mod atomic_epochs;
mod auto_compression;
mod bad_input;
mod bandwidth;
mod commit_integrity;
mod config_cli;
mod differential;
mod disk_eio;
mod disk_full;
mod e2e;
mod engine_lock;
mod failover;
mod io_engine_probe;
mod link_faults;
mod live_epochs;
mod metrics;
mod pipeline_failures;
mod power_loss;
mod recovery_points;
mod reprotect;
mod session_limits;
mod session_reuse;
mod shim_control;
mod shim_reconnect;
mod signals;
mod split_brain;
mod status;
mod uring_forced;
mod vm_boot;
