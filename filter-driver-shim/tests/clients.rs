//! The shim against real NBD clients over a real Unix socket, the shim running as a
//! separate process. Each test skips (with a printed reason) when its tool is missing.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{make_image, run, scratch, ShimProcess};
use filter_driver_shim_contract::bitmap::ChangedBlockBitmap;

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
    let mut rng = ferry_io::rng::Rng::new(0x9e37_79b9_7f4a_7c15);
    for chunk in [0u64, 3, 4, 17, 31] {
        let mut buf = vec![0u8; MIB as usize];
        rng.fill(&mut buf);
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
        ferry_io::require::skip(ferry_io::require::Feature::Tools, "fio has no nbd engine");
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

/// `nbdsh` runs `python3 -m nbd` from `PATH`; where another `python3` comes first
/// (pyenv, a virtualenv) without the `nbd` module, the system one is put in front. `None`
/// when no `nbdsh` works.
fn nbdsh() -> Option<Command> {
    let works = |cmd: &mut Command| {
        cmd.args(["-c", "pass"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if works(&mut Command::new("nbdsh")) {
        return Some(Command::new("nbdsh"));
    }
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    if works(Command::new("nbdsh").env("PATH", &path)) {
        let mut cmd = Command::new("nbdsh");
        cmd.env("PATH", path);
        return Some(cmd);
    }
    None
}

/// Run by `nbdsh` on a 64 MiB export with 64 KiB tracking blocks (`SIZE`, `URI` and
/// `MODEL`, where it saves what the disk must hold, come from the environment). It
/// keeps a model of the disk, checks every read against it, prints one `RANGE offset
/// length` line per successful write, zero or trim (the blocks the bitmap must hold),
/// and leaves the last block alone so a refused write past the end would show there.
const NBDSH_SCRIPT: &str = r#"
import os
size = int(os.environ["SIZE"])
uri = os.environ["URI"]
KiB, MiB = 1 << 10, 1 << 20
HOLE, ZERO = nbd.STATE_HOLE, nbd.STATE_ZERO
model = bytearray(size)

# What the handshake advertised (docs/shim.md, "NBD support").
assert h.get_size() == size
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
assert h.can_multi_conn()
assert not h.is_read_only()
assert not h.can_df() and not h.can_fast_zero() and not h.can_cache()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB

def changed(off, n):
    print("RANGE", off, n)

def write(off, data, flags=0, handle=h):
    handle.pwrite(data, off, flags)
    model[off:off + len(data)] = data
    changed(off, len(data))

def zero(off, n, flags=0):
    h.zero(n, off, flags)
    model[off:off + n] = bytes(n)
    changed(off, n)

def trim(off, n):
    h.trim(n, off)
    model[off:off + n] = bytes(n)
    changed(off, n)

def check(off, n, handle=h):
    """Reads [off, off + n) in requests of at most 32 MiB and compares with the model."""
    for at in range(off, off + n, 32 * MiB):
        k = min(32 * MiB, off + n - at)
        got = handle.pread(k, at)
        if got != model[at:at + k]:
            bad = next(i for i in range(k) if got[i] != model[at + i])
            raise AssertionError("read at %d: byte %d differs" % (at, at + bad))

def extents(off, n, flags=0):
    out = []
    def cb(meta, offset, entries, err):
        assert meta == nbd.CONTEXT_BASE_ALLOCATION, meta
        assert len(entries) % 2 == 0 and entries, entries
        for i in range(0, len(entries), 2):
            out.append((entries[i], entries[i + 1]))
    h.block_status(n, off, cb, flags)
    return out

def allocation():
    """(offset, length, flags) covering the whole disk, asking again where a reply stops."""
    m, pos = [], 0
    while pos < size:
        for n, fl in extents(pos, min(size - pos, 1 << 31)):
            assert n > 0, "empty extent"
            assert fl & ~(HOLE | ZERO) == 0, fl
            # The shim reports holes as HOLE | ZERO and data with no flag.
            assert fl in (0, HOLE | ZERO), fl
            n = min(n, size - pos)
            m.append((pos, n, fl))
            pos += n
            if pos >= size:
                break
    return m

def flags_of(m, off, n):
    """The set of flags the extents over [off, off + n) carry."""
    return {fl for (o, l, fl) in m if o < off + n and off < o + l}

# Writes: aligned, unaligned, straddling a block boundary, FUA, the largest payload.
write(0, os.urandom(4096))
write(3 * 64 * KiB - 256, os.urandom(512))
write(MiB + 5, os.urandom(200 * KiB + 3), nbd.CMD_FLAG_FUA)
write(2 * MiB, os.urandom(256 * KiB))
zero(2 * MiB + 64 * KiB, 128 * KiB)                       # may punch
write(3 * MiB, os.urandom(256 * KiB))
zero(3 * MiB + 64 * KiB, 64 * KiB, nbd.CMD_FLAG_NO_HOLE)  # stays allocated
write(4 * MiB, os.urandom(256 * KiB))
trim(4 * MiB, 256 * KiB)
zero(5 * MiB, MiB, nbd.CMD_FLAG_FUA)                      # never written: still tracked
write(16 * MiB, os.urandom(32 * MiB))
h.flush()

check(0, 16 * MiB)
check(16 * MiB, 32 * MiB)
check(48 * MiB, 16 * MiB)

# A second connection sees the same disk, and its writes are tracked too.
h2 = nbd.NBD()
h2.connect_uri(uri)
check(MiB, MiB, h2)
write(8 * MiB + 4096, os.urandom(64 * KiB), handle=h2)
h2.flush()
check(8 * MiB, MiB)
h2.shutdown()

# base:allocation from SEEK_DATA / SEEK_HOLE.
m = allocation()
assert flags_of(m, 0, 4096) == {0}, m
assert flags_of(m, MiB + 5, 200 * KiB + 3) == {0}
assert flags_of(m, 2 * MiB, 64 * KiB) == {0}
assert flags_of(m, 2 * MiB + 64 * KiB, 128 * KiB) == {HOLE | ZERO}, m
assert flags_of(m, 3 * MiB + 64 * KiB, 64 * KiB) == {0}, m
assert flags_of(m, 4 * MiB, 256 * KiB) == {HOLE | ZERO}, m
assert flags_of(m, 5 * MiB, 3 * MiB) == {HOLE | ZERO}, m
assert flags_of(m, 16 * MiB, 32 * MiB) == {0}
assert flags_of(m, 48 * MiB, 16 * MiB) == {HOLE | ZERO}, m
one = extents(0, size, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and 0 < one[0][0] <= size and one[0][1] == 0, one
one = extents(6 * MiB, 4096, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and one[0][1] == HOLE | ZERO, one

# Refusals come from the server (libnbd's own checks off), with the errors the spec
# asks for, and the connection stays in step after each, a refused write's payload
# included.
h.set_strict_mode(0)
def refused(want, fn):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno == want, (want, e.errno, e.string)
    else:
        raise AssertionError("not refused, expected " + want)
    check(0, 4096)
refused("ENOSPC", lambda: h.pwrite(b"x" * 1024, size - 512))
refused("ENOSPC", lambda: h.zero(4096, size - 2048))
refused("EINVAL", lambda: h.pread(1024, size - 512))
refused("EINVAL", lambda: h.trim(2, size - 1))
refused("EINVAL", lambda: h.pwrite(b"y" * (32 * MiB + 1), 0))
refused("EINVAL", lambda: h.pread(512, 0, nbd.CMD_FLAG_DF))
refused("EINVAL", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
refused("EINVAL", lambda: extents(size, 1))
refused("EINVAL", lambda: extents(0, 0))
h.cache(4096, 0)  # accepted and ignored though not advertised
check(0, size)
h.flush()
with open(os.environ["MODEL"], "wb") as f:
    f.write(model)
"#;

#[test]
fn nbdsh_commands_content_allocation_and_tracking() {
    require_tool!("nbdsh");
    let Some(mut nbdsh) = nbdsh() else {
        ferry_io::require::skip(
            ferry_io::require::Feature::Tools,
            "nbdsh cannot import the nbd module",
        );
        return;
    };
    let dir = scratch();
    let image = dir.path().join("disk.img");
    let size = 64 * MIB;
    let block = 64 * 1024;
    make_image(&image, size);
    let shim = ShimProcess::start(dir.path(), &image, block as u32);
    let model = dir.path().join("model.img");
    let out = run(nbdsh
        .arg("--base-allocation")
        .args(["-u", &shim.uri()])
        .args(["-c", NBDSH_SCRIPT])
        .env("SIZE", size.to_string())
        .env("URI", shim.uri())
        .env("MODEL", &model));
    let mut expected = BTreeSet::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let ["RANGE", off, len] = f[..] {
            expected.extend(blocks_of(off.parse().unwrap(), len.parse().unwrap(), block));
        }
    }
    assert!(expected.len() > 500, "{out}");
    assert!(!expected.contains(&(size / block - 1)));
    let status = shim.status();
    assert_eq!(
        status["disks"][0]["dirty_blocks"],
        expected.len(),
        "{status}"
    );
    let bitmap_path = shim.bitmap_path();
    shim.stop();
    // Exactly the blocks written, zeroed or trimmed: refused requests marked nothing.
    assert_eq!(dirty_blocks(&bitmap_path), expected);
    let disk = std::fs::read(&image).unwrap();
    assert!(
        disk == std::fs::read(&model).unwrap(),
        "backing file differs from what the client wrote"
    );
}

/// Random data with holes: `chunks` lists which MiB of `size` hold data.
fn random_image(path: &std::path::Path, size: u64, chunks: &[u64], seed: u64) {
    make_image(path, size);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut x = seed | 1;
    for &chunk in chunks {
        let mut buf = vec![0u8; MIB as usize];
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&buf, chunk * MIB).unwrap();
    }
}

#[test]
fn qemu_img_convert_compare_and_info() {
    require_tool!("qemu-img");
    let dir = scratch();
    let size = 24 * MIB;
    let block = 64 * 1024;
    // The export starts full of 0xff, so the zero runs of the source must really be
    // written (WRITE_ZEROES) for the copy to compare equal.
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0xffu8; size as usize]).unwrap();
    let src = dir.path().join("src.img");
    random_image(&src, size, &[0, 1, 5, 6, 7, 13, 23], 0x2545_f491_4f6c_dd1d);
    let shim = ShimProcess::start(dir.path(), &image, block as u32);
    let uri = shim.uri();

    let info = run(Command::new("qemu-img").args(["info", "-f", "raw", "--output=json", &uri]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], size, "{info}");
    assert_eq!(info["format"], "raw", "{info}");

    // Out-of-order writes from 8 coroutines, as `qemu-img convert -W` issues them.
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    let compare = |src: &std::path::Path| {
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(src)
            .arg(&uri)
            .output()
            .unwrap()
    };
    let same = compare(&src);
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&same.stdout),
        String::from_utf8_lossy(&same.stderr)
    );
    // The comparison reads through the shim: one byte changed in the source shows.
    let changed = dir.path().join("changed.img");
    std::fs::copy(&src, &changed).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&changed)
        .unwrap();
    let at = 17 * MIB + 12345;
    f.write_all_at(&[0x42], at).unwrap();
    let differs = compare(&changed);
    assert_eq!(
        differs.status.code(),
        Some(1),
        "a changed byte was not seen"
    );
    // "Content mismatch at offset N!", N the start of the sector holding the byte.
    let text = String::from_utf8_lossy(&differs.stdout);
    let reported: u64 = text
        .split("offset ")
        .nth(1)
        .and_then(|t| t.trim_end().trim_end_matches('!').parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(reported <= at && at - reported < 512, "{text}");

    // Every block was written with data or zeros, so every block is dirty.
    let status = shim.status();
    assert_eq!(status["disks"][0]["dirty_blocks"], size / block, "{status}");
    let bitmap_path = shim.bitmap_path();
    shim.stop();
    assert_eq!(
        dirty_blocks(&bitmap_path),
        (0..size / block).collect::<BTreeSet<u64>>()
    );
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&image).unwrap(),
        "backing file differs from the source"
    );
}

#[test]
fn ext4_through_nbdfuse_and_a_loop_device_fscks_clean() {
    require_tool!("nbdfuse");
    require_tool!("mkfs.ext4");
    require_tool!("losetup");
    if !std::path::Path::new("/dev/fuse").exists() {
        ferry_io::require::skip(ferry_io::require::Feature::Fuse, "/dev/fuse is missing");
        return;
    }
    if !std::path::Path::new("/dev/loop-control").exists() {
        ferry_io::require::skip(
            ferry_io::require::Feature::Loop,
            "/dev/loop-control is missing",
        );
        return;
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        ferry_io::require::skip(
            ferry_io::require::Feature::Root,
            "loop devices and mount need root",
        );
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
        ferry_io::require::skip(ferry_io::require::Feature::Fuse, "nbdfuse did not come up");
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
            .arg(env!("CARGO_BIN_EXE_filter-driver-shim-test"))
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
            std::fs::read(env!("CARGO_BIN_EXE_filter-driver-shim-test")).unwrap()
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
