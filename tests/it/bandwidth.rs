//! Bandwidth control: with `max_rate`, a sync never puts more on the wire than the
//! rate allows (timed on loopback, no tc), reports the time the limit held it back,
//! and the guest writing through the shim is not slowed to the rate: epochs grow.

use std::time::{Duration, Instant};

use crate::common::nbd::connect_retry;
use crate::common::rig::{Rig, RigSpec};
use crate::common::*;

/// 16 Mbit/s, in bytes per second.
const RATE: f64 = 2e6;

#[test]
fn a_sync_stays_under_max_rate_and_the_guest_is_not_held_to_it() {
    let seed = test_seed("bandwidth");
    let mut spec = RigSpec::two_disk_group(16 << 20);
    spec.source_extra
        .push_str("max_rate = \"16Mbit\"\ncompression = \"none\"\n");
    let rig = Rig::new(seed, &spec);
    // The first sync: 2 × 8 MiB of random data at most at the rate, about 8 s.
    let run = sync(&rig.config, &[]);
    assert!(run.success(), "{}", run.stderr);
    let r = run.json();
    // Without a terminal, a sync longer than 5 s logs its progress.
    assert!(
        run.stderr.contains("sending: ") && run.stderr.contains("% of"),
        "no progress line: {}",
        run.stderr
    );
    let seconds = r["seconds"].as_f64().unwrap();
    let sent = u64_field(&r, "bytes_sent") as f64;
    // The bucket holds a quarter second of the rate; one frame (256 KiB and headers)
    // may go before the sender pays for it.
    let allowed = RATE * seconds + RATE / 4.0 + 300e3;
    assert!(
        sent <= allowed,
        "{sent} bytes in {seconds:.2} s: more than {RATE} B/s allows ({allowed:.0}): {r}"
    );
    assert!(r["throttled_s"].as_f64().unwrap() > 1.0, "{r}");
    assert_eq!(rig.replicas(), rig.images());

    // The guest writes 12 MiB flat out while `ferry source` replicates at the rate:
    // it finishes long before replication catches up.
    let mut source = rig.start_source();
    rig.wait_first_epoch(Duration::from_secs(60));
    let started = Instant::now();
    let mut rng = Rng::new(seed ^ 5);
    let mut buf = vec![0u8; 1 << 20];
    for (i, d) in rig.disks.iter().enumerate() {
        let mut nbd = connect_retry(&d.socket, &d.name, Duration::from_secs(30)).unwrap();
        for mb in 0..6 {
            rng.fill(&mut buf);
            nbd.write(((mb + i as u64) % 8) << 20, &buf).unwrap();
        }
        nbd.flush().unwrap();
    }
    let guest = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rig.replicas() != rig.images() {
        assert!(Instant::now() < deadline, "replication did not catch up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let caught_up = started.elapsed();
    let _ = source.kill();
    let _ = source.wait();
    assert!(
        guest * 2 < caught_up,
        "the guest took {guest:?}, replication {caught_up:?}: the guest was held to the rate"
    );
    // `ferry status` says the limit holds replication back.
    let run = run_ferry(
        &[
            "status".as_ref(),
            "--config".as_ref(),
            rig.config.as_os_str(),
        ],
        Duration::from_secs(30),
    );
    assert!(
        run.stdout.contains("bandwidth limit now 16.0 Mbit/s"),
        "{}",
        run.stdout
    );
}
