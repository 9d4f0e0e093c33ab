//! The shim against real NBD clients over a real Unix socket, the shim running as a
//! separate process. Each test skips (with a printed reason) when its tool is missing.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{make_image, run, scratch, ShimProcess};
use filter_driver_shim::ChangedBlockBitmap;

const MIB: u64 = 1 << 20;

/// The set of dirty blocks in a bitmap file.
fn dirty_blocks(path: &std::path::Path) -> BTreeSet<u64> {
    let (bitmap, _) = ChangedBlockBitmap::load_recovering(path).unwrap();
    bitmap
        .iter_runs()
        .flat_map(|(first, n)| first..first + n)
        .collect()
}

fn blocks_of(offset: u64, len: u64, block: u64) -> impl Iterator<Item = u64> {
    offset / block..(offset + len).div_ceil(block)
}

#[test]
fn qemu_io_patterns_reach_the_backing_file_and_the_bitmap() {
    require_tool!("qemu-io");
    let dir = scratch();
    let image = dir.path().join("disk.img");
    make_image(&image, 64 * MIB);
    let block = 64 * 1024;
    let shim = ShimProcess::start(dir.path(), &image, block as u32);
    // (pattern, offset, length): unaligned, straddling blocks, at the very end.
    let writes = [
        (0x11u8, 0u64, 4096u64),
        (0x22, 3 * block - 512, 1024),
        (0x33, 10 * MIB + 7, 300_000),
        (0x44, 64 * MIB - 4096, 4096),
    ];
    let mut args = vec![];
    for (p, off, len) in writes {
        args.push(format!("write -P {p:#x} {off} {len}"));
    }
    args.push("write -z 20971520 131072".into());
    args.push("write -z -u 33554432 65536".into());
    args.push("flush".into());
    for (p, off, len) in writes {
        args.push(format!("read -P {p:#x} {off} {len}"));
    }
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for a in &args {
        cmd.args(["-c", a]);
    }
    cmd.arg(shim.uri());
    let out = run(&mut cmd);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // Out-of-range write: refused by the client library or by the server, never done.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 67108864 4096"])
        .arg(shim.uri())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("wrote"), "{text}");

    let status = shim.status();
    assert_eq!(status["ok"], true);
    assert_eq!(status["disks"][0]["resync_required"], true);
    assert_eq!(status["disks"][0]["resync_reason"], "first-start");
    let bitmap_path = shim.bitmap_path();
    shim.stop();

    let file = std::fs::File::open(&image).unwrap();
    for (p, off, len) in writes {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, off).unwrap();
        assert!(buf.iter().all(|&b| b == p), "pattern {p:#x} at {off}");
    }
    let mut z = vec![1u8; 131072];
    file.read_exact_at(&mut z, 20 * MIB).unwrap();
    assert!(z.iter().all(|&b| b == 0));

    // Tracking: exactly the written blocks, nothing else.
    let mut expected = BTreeSet::new();
    for (_, off, len) in writes {
        expected.extend(blocks_of(off, len, block));
    }
    expected.extend(blocks_of(20 * MIB, 131072, block));
    expected.extend(blocks_of(32 * MIB, 65536, block));
    assert_eq!(dirty_blocks(&bitmap_path), expected);
}

#[test]
fn nbdinfo_reports_size_and_allocation() {
    require_tool!("nbdinfo");
    require_tool!("qemu-io");
    let dir = scratch();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB);
    let shim = ShimProcess::start(dir.path(), &image, 65536);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 4194304 1048576"])
        .arg(shim.uri()));
    let size = run(Command::new("nbdinfo").arg("--size").arg(shim.uri()));
    assert_eq!(size.trim(), (16 * MIB).to_string());
    let map = run(Command::new("nbdinfo").arg("--map").arg(shim.uri()));
    let extents: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        extents,
        vec![(0, 4 * MIB, 3), (4 * MIB, MIB, 0), (5 * MIB, 11 * MIB, 3)],
        "{map}"
    );
    let info = run(Command::new("nbdinfo").arg(shim.uri()));
    assert!(info.contains("base:allocation"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    shim.stop();
}

#[test]
fn nbdcopy_in_and_out_is_byte_identical() {
    require_tool!("nbdcopy");
    let dir = scratch();
    let image = dir.path().join("disk.img");
    make_image(&image, 32 * MIB);
    // Source: pseudo-random data with holes.
    let src = dir.path().join("src.img");
    make_image(&src, 32 * MIB);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in [0u64, 3, 4, 17, 31] {
        let mut buf = vec![0u8; MIB as usize];
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&buf, chunk * MIB).unwrap();
    }
    let shim = ShimProcess::start(dir.path(), &image, 65536);
    run(Command::new("nbdcopy").arg(&src).arg(shim.uri()));
    let out = dir.path().join("out.img");
    run(Command::new("nbdcopy").arg(shim.uri()).arg(&out));
    shim.stop();
    let a = std::fs::read(&src).unwrap();
    assert_eq!(a, std::fs::read(&image).unwrap(), "backing file differs");
    assert_eq!(a, std::fs::read(&out).unwrap(), "copy out differs");
}

#[test]
fn fio_nbd_randwrite_verifies() {
    require_tool!("fio");
    let help = Command::new("fio").arg("--enghelp=nbd").output().unwrap();
    if !String::from_utf8_lossy(&help.stdout).contains("uri") {
        eprintln!("SKIP: fio has no nbd engine");
        return;
    }
    let dir = scratch();
    let image = dir.path().join("disk.img");
    make_image(&image, 64 * MIB);
    let shim = ShimProcess::start(dir.path(), &image, 65536);
    let out = run(Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .arg(format!("--uri={}", shim.uri())));
    assert!(!out.contains("verify: bad"), "{out}");
    shim.stop();
}

#[test]
fn ext4_through_nbdfuse_and_a_loop_device_fscks_clean() {
    require_tool!("nbdfuse");
    require_tool!("mkfs.ext4");
    require_tool!("losetup");
    if !std::path::Path::new("/dev/fuse").exists()
        || !std::path::Path::new("/dev/loop-control").exists()
    {
        eprintln!("SKIP: /dev/fuse or /dev/loop-control missing");
        return;
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root for loop devices and mount");
        return;
    }
    let dir = scratch();
    let image = dir.path().join("disk.img");
    make_image(&image, 256 * MIB);
    let shim = ShimProcess::start(dir.path(), &image, 65536);
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let mut fuse = Command::new("nbdfuse")
        .arg(&fuse_dir)
        .arg(shim.uri())
        .spawn()
        .unwrap();
    let node = fuse_dir.join("nbd");
    for _ in 0..100 {
        if node.exists() {
            break;
        }
        common::settle();
    }
    if !node.exists() {
        let _ = fuse.kill();
        let _ = fuse.wait();
        eprintln!("SKIP: nbdfuse did not come up");
        return;
    }
    let loopdev = run(Command::new("losetup").args(["-f", "--show"]).arg(&node))
        .trim()
        .to_string();
    let cleanup = |loopdev: &str| {
        let _ = Command::new("umount").arg(&mnt).status();
        let _ = Command::new("losetup").args(["-d", loopdev]).status();
    };
    let result = std::panic::catch_unwind(|| {
        run(Command::new("mkfs.ext4").args(["-q", "-F", &loopdev]));
        run(Command::new("mount").arg(&loopdev).arg(&mnt));
        // Real files: the test binaries and sources of this crate.
        run(Command::new("cp")
            .arg("-r")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .arg(mnt.join("src-copy")));
        run(Command::new("cp")
            .arg(env!("CARGO_BIN_EXE_ferry-shim-test"))
            .arg(mnt.join("bin")));
        run(&mut Command::new("sync"));
        run(Command::new("umount").arg(&mnt));
        let fsck = Command::new("fsck.ext4")
            .args(["-n", "-f", &loopdev])
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        run(Command::new("mount")
            .args(["-o", "ro"])
            .arg(&loopdev)
            .arg(&mnt));
        let copied = std::fs::read(mnt.join("bin")).unwrap();
        assert_eq!(
            copied,
            std::fs::read(env!("CARGO_BIN_EXE_ferry-shim-test")).unwrap()
        );
    });
    cleanup(&loopdev);
    // As root libfuse mounts without fusermount, so plain umount undoes it.
    if Command::new("fusermount3")
        .arg("-u")
        .arg(&fuse_dir)
        .status()
        .is_err()
    {
        let _ = Command::new("umount").arg(&fuse_dir).status();
    }
    let _ = fuse.wait();
    shim.stop();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
