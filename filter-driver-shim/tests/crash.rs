//! kill -9 the shim at random moments while a client writes; after each crash the
//! bitmap on disk must cover every write the client saw acknowledged, and the
//! restarted shim must continue the same tracking generation (no resync).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{make_image, scratch, ShimProcess};
use ferry_io::rng::{test_seed, Rng};
use filter_driver_shim_contract::bitmap::ChangedBlockBitmap;

#[test]
fn kill9_under_writes_never_loses_an_acknowledged_block() {
    require_tool!("qemu-io");
    let seed = test_seed("kill9_under_writes_never_loses_an_acknowledged_block");
    let mut rng = Rng::new(seed);
    let dir = scratch();
    let image = dir.path().join("disk.img");
    let size: u64 = 256 << 20;
    let block: u64 = 64 << 10;
    make_image(&image, size);
    let mut generation = None;
    let mut acked_total = 0;
    for round in 0..6 {
        let shim = ShimProcess::start(dir.path(), &image, block as u32);
        let status = shim.status();
        let gen = status["disks"][0]["generation_id"]
            .as_str()
            .unwrap()
            .to_string();
        match &generation {
            None => generation = Some(gen),
            Some(g) => assert_eq!(g, &gen, "round {round}: generation changed after a crash"),
        }
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for _ in 0..3000 {
            let len = 512 * (1 + rng.below(256));
            let off = rng.below((size - len) / 512) * 512;
            cmd.args([
                "-c",
                &format!("aio_write -P 0x{:x} {off} {len}", 1 + rng.below(250)),
            ]);
        }
        cmd.args(["-c", "aio_flush"]);
        cmd.arg(shim.uri());
        let mut client = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
        let bitmap_path = shim.bitmap_path();
        shim.kill9();
        let out = BufReader::new(client.stdout.take().unwrap());
        let mut acked = Vec::new();
        for line in out.lines().map_while(Result::ok) {
            // "wrote 4096/4096 bytes at offset 12288"
            if let Some(rest) = line.strip_prefix("wrote ") {
                let len: u64 = rest.split('/').next().unwrap().parse().unwrap();
                let off: u64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
                acked.push((off, len));
            }
        }
        let _ = client.wait();
        let (bitmap, recovery) = ChangedBlockBitmap::load_recovering(&bitmap_path).unwrap();
        for &(off, len) in &acked {
            for b in off / block..(off + len).div_ceil(block) {
                assert!(
                    bitmap.test(b).unwrap(),
                    "seed {seed} round {round}: acknowledged write at {off}+{len} lost block {b}"
                );
            }
        }
        eprintln!(
            "round {round}: {} writes acknowledged before kill -9, {} blocks dirty, torn pages {:?}",
            acked.len(),
            bitmap.count(),
            recovery.torn_pages
        );
        acked_total += acked.len();
    }
    // Guard against a test that never exercised anything.
    assert!(acked_total > 0, "no write was acknowledged in any round");
    let shim = ShimProcess::start(dir.path(), &image, block as u32);
    let status = shim.status();
    assert_eq!(
        status["disks"][0]["generation_id"].as_str(),
        generation.as_deref()
    );
    shim.stop();
}
