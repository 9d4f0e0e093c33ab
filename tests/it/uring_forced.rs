//! End to end with `io_engine = "uring"` forced everywhere it can be: the shim serves a
//! guest's writes through its io_uring engine, the source reads epochs with io_uring,
//! the target writes replicas with io_uring. A forced engine never falls back — it
//! fails instead — so a pass proves the io_uring data path ran on all three. Without
//! io_uring the test skips, and fails when `FERRY_REQUIRE` includes `uring`.

use std::time::Duration;

use crate::common::nbd::{connect_retry, NbdClient};
use crate::common::shim::{ShimOptions, ShimProc};
use crate::common::*;
use ferry_io::require::{self, Feature};

const DISK_BYTES: u64 = 8 << 20;
const PATIENCE: Duration = Duration::from_secs(30);

fn write_random(nbd: &mut NbdClient, rng: &mut Rng, writes: usize) {
    for _ in 0..writes {
        let len = 4096 * (1 + rng.below(32)) as usize;
        let offset = rng.below((DISK_BYTES - len as u64) / 4096) * 4096;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        nbd.write(offset, &data).unwrap();
    }
    nbd.flush().unwrap();
}

#[test]
fn shim_source_and_target_replicate_with_io_uring_forced() {
    if let Err(why) = filter_driver_shim::nbd::engine::uring::available() {
        require::skip(Feature::Uring, why);
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let key = d.join("ferry.key");
    keygen(&key);
    let image = d.join("vm1.img");
    let mut rng = Rng::new(test_seed("uring_forced"));
    make_mixed_image(&image, DISK_BYTES, &mut rng);
    let replica = d.join("vm1.replica");
    let target = TargetProc::start(d, &key, &[("vm1", &replica)], "io_engine = \"uring\"");
    let state = d.join("source-state");
    let config = d.join("source.toml");
    let socket = d.join("vm1.sock");
    std::fs::write(
        &config,
        format!(
            "[source]\ntarget = \"127.0.0.1:{}\"\npsk_file = {}\nstate_dir = {}\nio_engine = \"uring\"\n\n[[disk]]\nname = \"vm1\"\npath = {}\nnbd_socket = {}\n",
            target.port,
            toml_path(&key),
            toml_path(&state),
            toml_path(&image),
            toml_path(&socket),
        ),
    )
    .unwrap();
    let options = ShimOptions {
        // The environment would override the config; this test is about the config.
        env_remove: vec!["FERRY_SHIM_IO_ENGINE"],
        ..ShimOptions::default()
    };
    let shim = ShimProc::start_with(&config, &state, &options)
        .unwrap_or_else(|(status, log)| panic!("shim exited with {status}: {log}"));
    let log = || shim.log();
    assert!(
        log().contains("io_engine=uring"),
        "the shim serves with io_uring: {}",
        log()
    );

    let mut nbd = connect_retry(&socket, "vm1", PATIENCE).expect("NBD connection");
    write_random(&mut nbd, &mut rng, 50);
    let first = sync_ok(&config, &[]);
    assert_eq!(mode_of(&first, "vm1"), "full", "{first}");
    for round in 0..3 {
        write_random(&mut nbd, &mut rng, 40);
        let r = sync_ok(&config, &[]);
        assert_eq!(mode_of(&r, "vm1"), "changed", "round {round}: {r}");
        assert!(r["shim_epoch"].is_string(), "a live epoch of the shim: {r}");
    }
    nbd.disconnect().unwrap();
    drop(shim);
    assert_same_file(&image, &replica);
    let target_log = target.stderr();
    assert!(
        !target_log.contains("falling back") && !target_log.contains("synchronous engine"),
        "{target_log}"
    );
}
