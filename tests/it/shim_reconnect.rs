//! `ferry shim --config` as a separate process, driven by a controlled guest workload:
//!
//! * an independent NBD client (`tests/it/common/nbd.rs`, written from the protocol
//!   specification) exercising every request type, checked against the backing file
//!   and the shim's changed-block bitmap;
//! * QEMU's NBD client (`qemu-io` with `reconnect-delay`) riding out a restart of the
//!   shim — a clean stop (SIGTERM) or a crash (kill -9) — with the guest idle during the
//!   outage or with a write issued while the shim is down. The restarted shim must
//!   continue the same tracking generation, and every acknowledged write must be in the
//!   backing file and in the bitmap;
//! * the independent client as a sequential (QD1) writer cut by kill -9: exactly the
//!   acknowledged writes are tracked;
//! * a second start on the same config while a shim runs: refused by the disk's lock
//!   before it touches the running shim's files.
//!
//! `qemu-io` is driven interactively through its stdin: it prints each command's result
//! (and flushes) before it reads the next command, so the test knows exactly which
//! writes were acknowledged when it stops the shim, without relying on sleeps.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::nbd::{self, connect_retry, nbd_errno, NbdClient};
use crate::common::shim::{wait_timeout, ShimProc};
use crate::common::{
    create_sparse, drain, keygen, scratch_dir, source_toml, test_seed, toml_path, Rng, BLOCK,
};
use filter_driver_shim_contract::bitmap::ChangedBlockBitmap;

const MIB: u64 = 1 << 20;
const DISK: &str = "vm1";
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// How long one `qemu-io` command may take (a reconnect included).
const QEMU_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------
// The shim process.

/// A scratch directory with a backing image and a source config for one disk.
struct Setup {
    config: PathBuf,
    state_dir: PathBuf,
    image: PathBuf,
    socket: PathBuf,
    // Last: removed after every process that uses it has been killed.
    _dir: tempfile::TempDir,
}

fn setup(size: u64) -> Setup {
    let dir = scratch_dir();
    let key = dir.path().join("ferry.key");
    keygen(&key);
    let state_dir = dir.path().join("state");
    let image = dir.path().join(format!("{DISK}.img"));
    let socket = dir.path().join("run").join(format!("{DISK}.sock"));
    create_sparse(&image, size);
    // `target` must be present for the file to load; the shim never connects to it.
    let mut toml = source_toml(9, &key, &state_dir, &[], "block_size_kib = 64\n");
    toml.push_str(&format!(
        "\n[[disk]]\nname = \"{DISK}\"\npath = {}\nnbd_socket = {}\n",
        toml_path(&image),
        toml_path(&socket)
    ));
    let config = dir.path().join("source.toml");
    std::fs::write(&config, toml).unwrap();
    Setup {
        config,
        state_dir,
        image,
        socket,
        _dir: dir,
    }
}

fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

/// The `status` object of the one disk, `vm1`.
fn disk_status(shim: &ShimProc) -> serde_json::Value {
    let d = shim.disk_status();
    assert_eq!(d["name"], DISK, "{d}");
    d
}

/// The dirty blocks of a bitmap file (no torn pages allowed: nothing here tears one),
/// and its generation id.
fn bitmap_blocks(state_dir: &Path) -> (BTreeSet<u64>, String) {
    let path = state_dir.join(format!("{DISK}.cbt"));
    let (bitmap, recovery) = ChangedBlockBitmap::load_recovering(&path)
        .unwrap_or_else(|e| panic!("load {}: {e}", path.display()));
    assert!(
        recovery.torn_pages.is_empty(),
        "torn bitmap pages {:?}",
        recovery.torn_pages
    );
    let blocks = bitmap
        .iter_runs()
        .flat_map(|(first, n)| first..first + n)
        .collect();
    (blocks, bitmap.generation_id().to_string())
}

fn blocks_of(offset: u64, len: u64) -> std::ops::Range<u64> {
    offset / BLOCK..(offset + len).div_ceil(BLOCK)
}

// ---------------------------------------------------------------------------------
// The independent client against the shim.

/// Writes through the client and into the model, recording the blocks touched.
struct Model {
    bytes: Vec<u8>,
    dirty: BTreeSet<u64>,
}

impl Model {
    fn write(&mut self, c: &mut NbdClient, offset: u64, data: &[u8], fua: bool) {
        if fua {
            c.write_fua(offset, data)
        } else {
            c.write(offset, data)
        }
        .unwrap_or_else(|e| panic!("write {offset}+{}: {e}", data.len()));
        self.bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        self.dirty.extend(blocks_of(offset, data.len() as u64));
    }

    fn zero(&mut self, offset: u64, len: u32) {
        self.bytes[offset as usize..(offset + len as u64) as usize].fill(0);
        self.dirty.extend(blocks_of(offset, len as u64));
    }

    /// Reads `offset..offset + len` through the client and compares with the model.
    fn check(&self, c: &mut NbdClient, offset: u64, len: usize) {
        let mut buf = vec![0xa5u8; len];
        c.read(offset, &mut buf)
            .unwrap_or_else(|e| panic!("read {offset}+{len}: {e}"));
        let want = &self.bytes[offset as usize..offset as usize + len];
        if buf != want {
            let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "read {offset}+{len} differs from what was written at byte {}: {:#04x} vs {:#04x}",
                offset + i as u64,
                buf[i],
                want[i]
            );
        }
    }

    fn check_all(&self, c: &mut NbdClient) {
        let size = self.bytes.len() as u64;
        let mut off = 0;
        while off < size {
            let n = MIB.min(size - off);
            self.check(c, off, n as usize);
            off += n;
        }
    }
}

/// Waits until the shim's `status` counts `n` open NBD connections.
fn wait_connections(shim: &ShimProc, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = disk_status(shim);
        if st["connections"].as_u64() == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "status still counts {} connections, expected {n}: {st}",
            st["connections"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

#[track_caller]
fn assert_errno(r: std::io::Result<()>, errno: u32, what: &str) {
    match r {
        Ok(()) => panic!("{what}: succeeded, expected {}", nbd::errno_name(errno)),
        Err(e) => assert_eq!(
            nbd_errno(&e),
            Some(errno),
            "{what}: expected {} from the server, got: {e}",
            nbd::errno_name(errno)
        ),
    }
}

#[test]
fn nbd_client_self_test_against_the_shim() {
    let mut rng = Rng::new(test_seed("nbd_client_self_test_against_the_shim"));
    // Not a multiple of the block size: the last tracked block is partial.
    let size = 16 * MIB + 12288;
    let s = setup(size);
    let mut model = Model {
        bytes: vec![0u8; size as usize],
        dirty: BTreeSet::new(),
    };
    // Content that was there before the shim: read through it, never marked.
    let before = random_bytes(&mut rng, MIB as usize + 333);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap()
        .write_all_at(&before, 4 * MIB)
        .unwrap();
    model.bytes[4 * MIB as usize..4 * MIB as usize + before.len()].copy_from_slice(&before);

    let shim = ShimProc::start(&s.config, &s.state_dir);
    let mut c = NbdClient::connect(&s.socket, DISK).unwrap();
    eprintln!("connected: {c:?}");

    // What the handshake told us.
    assert_eq!(c.size(), size);
    let f = c.transmission_flags();
    for (flag, name) in [
        (nbd::flags::HAS_FLAGS, "HAS_FLAGS"),
        (nbd::flags::SEND_FLUSH, "SEND_FLUSH"),
        (nbd::flags::SEND_FUA, "SEND_FUA"),
        (nbd::flags::SEND_TRIM, "SEND_TRIM"),
        (nbd::flags::SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
        (nbd::flags::CAN_MULTI_CONN, "CAN_MULTI_CONN"),
    ] {
        assert!(f & flag != 0, "transmission flags {f:#x} lack {name}");
    }
    assert_eq!(f & nbd::flags::READ_ONLY, 0, "read-only export: {f:#x}");
    let bs = c.block_sizes().expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(
        (bs.minimum, bs.preferred, bs.maximum),
        (1, 4096, 32 << 20),
        "{bs:?}"
    );
    assert_eq!(c.export_name(), Some(DISK));

    // Pre-existing data reads back untouched.
    model.check(&mut c, 4 * MIB - 100, before.len() + 200);

    // Writes: small, unaligned and straddling blocks, FUA, at the very end, large.
    model.write(&mut c, 0, &random_bytes(&mut rng, 4096), false);
    model.write(
        &mut c,
        3 * BLOCK - 512,
        &random_bytes(&mut rng, 1024),
        false,
    );
    model.write(&mut c, 5 * MIB + 7, &random_bytes(&mut rng, 300_000), true);
    model.write(&mut c, size - 4096, &random_bytes(&mut rng, 4096), false);
    model.write(
        &mut c,
        8 * MIB,
        &random_bytes(&mut rng, 2 * MIB as usize + 5),
        false,
    );
    // Over the pre-existing data.
    model.write(&mut c, 4 * MIB + 4096, &random_bytes(&mut rng, 512), true);
    model.check(&mut c, 0, 4096);
    model.check(&mut c, 3 * BLOCK - 1024, 2048);
    model.check(&mut c, 5 * MIB, 400_000);
    model.check(&mut c, size - 8192, 8192);
    model.check(&mut c, 8 * MIB - 1, 2 * MIB as usize + 7);
    c.flush().unwrap();

    // TRIM of written data: the shim punches a hole, which reads back as zeros (the
    // protocol leaves trimmed content unspecified; the shim documents the hole).
    model.write(&mut c, 12 * MIB, &random_bytes(&mut rng, 128 << 10), false);
    c.trim(12 * MIB, 128 << 10).unwrap();
    model.zero(12 * MIB, 128 << 10);
    model.check(&mut c, 12 * MIB - 4096, (128 << 10) + 8192);
    // A TRIM of part of a block and of never-written space still marks the blocks.
    c.trim(12 * MIB + (256 << 10) + 512, 1000).unwrap();
    model.zero(12 * MIB + (256 << 10) + 512, 1000);

    // WRITE_ZEROES: whole blocks over data, and a partial range inside a block.
    model.write(&mut c, 14 * MIB, &random_bytes(&mut rng, 192 << 10), false);
    c.write_zeroes(14 * MIB, 192 << 10).unwrap();
    model.zero(14 * MIB, 192 << 10);
    model.write(&mut c, 13 * MIB, &random_bytes(&mut rng, 64 << 10), false);
    c.write_zeroes(13 * MIB + 4096, 8192).unwrap();
    model.zero(13 * MIB + 4096, 8192);
    model.check(&mut c, 13 * MIB, 64 << 10);
    model.check(&mut c, 14 * MIB - 1, (192 << 10) + 2);

    // Refusals: past the end, or straddling it. None may write or mark anything, and
    // the connection stays in step afterwards.
    assert_errno(c.write(size, &[1u8; 4096]), ENOSPC, "write past the end");
    assert_errno(
        c.write(size - 512, &[2u8; 1024]),
        ENOSPC,
        "write straddling the end",
    );
    assert_errno(
        c.write_fua(size - 512, &[2u8; 1024]),
        ENOSPC,
        "FUA write straddling the end",
    );
    assert_errno(
        c.write_zeroes(size - 4096, 8192),
        ENOSPC,
        "write zeroes straddling the end",
    );
    let mut buf = vec![0u8; 1024];
    assert_errno(
        c.read(size - 512, &mut buf),
        EINVAL,
        "read straddling the end",
    );
    assert_errno(c.trim(size, 4096), EINVAL, "trim past the end");
    assert_errno(c.trim(0, u32::MAX), EINVAL, "trim of 4 GiB");
    // offset + length overflows 64 bits: refused, not wrapped around.
    assert_errno(
        c.read(u64::MAX - 100, &mut buf),
        EINVAL,
        "read at 2^64 - 101",
    );
    let r = c.write(u64::MAX - 100, &[3u8; 1024]);
    let errno = r.as_ref().err().and_then(nbd_errno);
    assert!(
        matches!(errno, Some(ENOSPC | EINVAL)),
        "write at 2^64 - 101: expected ENOSPC or EINVAL, got {r:?}"
    );
    assert_errno(
        c.write_zeroes(u64::MAX - 100, 1024),
        ENOSPC,
        "write zeroes at 2^64 - 101",
    );
    model.check(&mut c, size - 8192, 8192);

    // A second connection sees the first one's writes, and the other way round.
    let mut c2 = NbdClient::connect(&s.socket, DISK).unwrap();
    model.check(&mut c2, 5 * MIB, 400_000);
    model.write(&mut c2, 15 * MIB, &random_bytes(&mut rng, 10_000), false);
    c2.flush().unwrap();
    model.check(&mut c, 15 * MIB, 10_000);
    c2.disconnect().unwrap();

    // The default (empty) export name selects the disk; an unknown name is refused at
    // once (not retried), with NBD_REP_ERR_UNKNOWN.
    let c3 = NbdClient::connect(&s.socket, "").unwrap();
    assert_eq!(c3.size(), size);
    c3.disconnect().unwrap();
    let t = Instant::now();
    let e = connect_retry(&s.socket, "no-such-disk", Duration::from_secs(20)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "refusal was retried");

    // Closed connections are no longer counted.
    wait_connections(&shim, 1);

    // Everything reads back as the model says, through the shim.
    model.check_all(&mut c);

    // The control socket counts exactly the blocks written, trimmed or zeroed.
    let st = disk_status(&shim);
    assert_eq!(
        st["dirty_blocks"].as_u64(),
        Some(model.dirty.len() as u64),
        "{st}"
    );
    assert_eq!(st["block_size"].as_u64(), Some(BLOCK), "{st}");
    assert_eq!(
        st["block_count"].as_u64(),
        Some(size.div_ceil(BLOCK)),
        "{st}"
    );
    assert_eq!(st["tracking_failed"], false, "{st}");
    let generation = st["generation_id"].as_str().unwrap().to_string();
    c.disconnect().unwrap();
    wait_connections(&shim, 0);

    shim.stop();
    assert!(
        !s.socket.exists(),
        "the NBD socket is left behind after a clean stop"
    );

    // The backing file holds exactly the model.
    let on_disk = std::fs::read(&s.image).unwrap();
    assert_eq!(on_disk.len() as u64, size);
    if on_disk != model.bytes {
        let i = on_disk
            .iter()
            .zip(&model.bytes)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!("backing file differs from the model at byte {i}");
    }
    // The bitmap marks exactly the blocks written, trimmed or zeroed.
    let (dirty, bitmap_generation) = bitmap_blocks(&s.state_dir);
    assert_eq!(bitmap_generation, generation);
    assert_eq!(dirty, model.dirty);
}

#[test]
fn largest_requests_pass_and_oversized_ones_are_refused_in_step() {
    let mut rng = Rng::new(test_seed(
        "largest_requests_pass_and_oversized_ones_are_refused_in_step",
    ));
    let size = 40 * MIB;
    let s = setup(size);
    let shim = ShimProc::start(&s.config, &s.state_dir);
    let mut c = NbdClient::connect(&s.socket, DISK).unwrap();
    let max = c.block_sizes().expect("NBD_INFO_BLOCK_SIZE").maximum as usize;
    assert_eq!(max, 32 << 20);
    let mut model = Model {
        bytes: vec![0u8; size as usize],
        dirty: BTreeSet::new(),
    };
    // The advertised maximum, both ways, at an unaligned offset.
    model.write(&mut c, 4 * MIB + 1, &random_bytes(&mut rng, max), false);
    model.check(&mut c, 4 * MIB + 1, max);
    // Over the maximum: EINVAL; the refused write's payload is consumed, so the next
    // request is understood.
    let big = random_bytes(&mut rng, max + 4096);
    assert_errno(c.write(0, &big), EINVAL, "write over the maximum");
    let mut buf = vec![0u8; max + 1];
    assert_errno(c.read(0, &mut buf), EINVAL, "read over the maximum");
    model.check_all(&mut c);
    c.disconnect().unwrap();
    assert_eq!(
        disk_status(&shim)["dirty_blocks"].as_u64(),
        Some(model.dirty.len() as u64)
    );
    shim.stop();
    assert_eq!(bitmap_blocks(&s.state_dir).0, model.dirty);
    assert!(std::fs::read(&s.image).unwrap() == model.bytes);
}

// ---------------------------------------------------------------------------------
// QEMU's NBD client across a shim restart.

/// An interactive `qemu-io`; killed when dropped.
struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// How far [`QemuIo::expect`] has consumed stdout.
    seen: usize,
}

impl QemuIo {
    fn spawn(socket: &Path, export: &str) -> QemuIo {
        let path = socket.to_str().unwrap();
        assert!(!path.contains(','), "commas would need escaping: {path}");
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={path},export={export},reconnect-delay=30"
        );
        let mut child = Command::new("qemu-io")
            .arg("--image-opts")
            .arg(&opts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io");
        let stdout = drain(child.stdout.take().unwrap());
        let stderr = drain(child.stderr.take().unwrap());
        QemuIo {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            seen: 0,
        }
    }

    fn output(&self) -> String {
        format!(
            "qemu-io stdout:\n{}\nqemu-io stderr:\n{}",
            text(&self.stdout),
            text(&self.stderr)
        )
    }

    fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("send {cmd:?} to qemu-io: {e}\n{}", self.output()));
    }

    /// Output since the last [`QemuIo::expect`].
    fn unseen(&self) -> String {
        let out = text(&self.stdout);
        out.get(self.seen..).unwrap_or("").to_string()
    }

    /// Waits for `needle` in the output after what earlier calls consumed.
    fn expect(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = text(&self.stdout);
            let unseen = &out[self.seen..];
            let found = unseen.find(needle);
            // "write failed: …", "read failed: …", "Pattern verification failed …"
            let failed = unseen.find("failed");
            if let Some(f) = failed {
                let before_needle = match found {
                    Some(i) => f < i,
                    None => true,
                };
                if before_needle {
                    panic!(
                        "qemu-io reported a failure while {needle:?} was expected:\n{}",
                        self.output()
                    );
                }
            }
            if let Some(i) = found {
                self.seen += i + needle.len();
                return;
            }
            let exited = self.child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "no {needle:?} from qemu-io within {timeout:?} (exit: {exited:?}):\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `quit`, then the exit status.
    fn quit(mut self) -> (ExitStatus, String) {
        self.send("quit");
        drop(self.stdin.take());
        let status = wait_timeout(&mut self.child, QEMU_TIMEOUT)
            .unwrap_or_else(|| panic!("qemu-io did not quit:\n{}", self.output()));
        std::thread::sleep(Duration::from_millis(50));
        (status, self.output())
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have_qemu_io() -> bool {
    Command::new("qemu-io")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    /// SIGTERM: a clean shutdown.
    Term,
    /// kill -9: a crash.
    Kill,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Guest {
    /// The guest issues nothing while the shim is down; its next write finds the
    /// connection gone and reconnects.
    Idle,
    /// The guest issues a write while the shim is down; QEMU holds it
    /// (`reconnect-delay`) until the restarted shim accepts the new connection.
    Busy,
}

const WROTE_0: &str = "wrote 65536/65536 bytes at offset 0\n";
const WROTE_1: &str = "wrote 65536/65536 bytes at offset 65536\n";
const READ_0: &str = "read 65536/65536 bytes at offset 0\n";
const READ_1: &str = "read 65536/65536 bytes at offset 65536\n";

fn qemu_rides_out_restart(stop: Stop, guest: Guest) {
    if !have_qemu_io() {
        ferry_io::require::skip(
            ferry_io::require::Feature::Tools,
            "qemu-io is not installed",
        );
        return;
    }
    let s = setup(64 * MIB);
    let shim = ShimProc::start(&s.config, &s.state_dir);
    let st = disk_status(&shim);
    let generation = st["generation_id"].as_str().unwrap().to_string();
    let (required, reason) = (st["resync_required"].clone(), st["resync_reason"].clone());
    assert_eq!(st["dirty_blocks"].as_u64(), Some(0), "{st}");

    let mut q = QemuIo::spawn(&s.socket, DISK);
    q.send("write -P 0x11 0 64k");
    q.expect(WROTE_0, QEMU_TIMEOUT);
    // Acknowledged, so tracked.
    assert_eq!(disk_status(&shim)["dirty_blocks"].as_u64(), Some(1));

    let log = match stop {
        Stop::Term => shim.stop(),
        Stop::Kill => shim.kill9(),
    };
    eprintln!("--- first shim ({stop:?}):\n{log}");

    if guest == Guest::Busy {
        // Issued while nothing listens: QEMU must hold it, not fail it.
        q.send("write -P 0x22 64k 64k");
        std::thread::sleep(Duration::from_millis(1500));
        let early = q.unseen();
        assert!(
            !early.contains("wrote") && !early.contains("failed"),
            "the write issued during the outage finished before the shim restarted:\n{}",
            q.output()
        );
    }
    let shim = ShimProc::start(&s.config, &s.state_dir);
    if guest == Guest::Idle {
        q.send("write -P 0x22 64k 64k");
    }
    q.expect(WROTE_1, QEMU_TIMEOUT);
    q.send("read -P 0x11 0 64k");
    q.expect(READ_0, QEMU_TIMEOUT);
    q.send("read -P 0x22 64k 64k");
    q.expect(READ_1, QEMU_TIMEOUT);
    let (status, output) = q.quit();
    assert!(status.success(), "qemu-io exited with {status}:\n{output}");
    assert!(
        !output.contains("Pattern verification failed") && !output.contains("failed"),
        "{output}"
    );

    // The restarted shim continued the same generation: no new generation, no new reason.
    let st = disk_status(&shim);
    assert_eq!(
        st["generation_id"].as_str(),
        Some(generation.as_str()),
        "tracking generation changed across a {stop:?} restart: {st}\n{}",
        shim.log()
    );
    assert_eq!(st["resync_required"], required, "{st}");
    assert_eq!(st["resync_reason"], reason, "{st}");
    assert_eq!(st["tracking_failed"], false, "{st}");
    assert_eq!(st["dirty_blocks"].as_u64(), Some(2), "{st}");
    let log = shim.log();
    assert!(
        !log.contains("CHANGE TRACKING CANNOT BE TRUSTED"),
        "restart after {stop:?} drew a new generation:\n{log}"
    );
    if stop == Stop::Kill {
        assert!(
            log.contains("previous shim did not shut down cleanly"),
            "restart after kill -9 did not notice the crash:\n{log}"
        );
    }
    let log = shim.stop();
    eprintln!("--- second shim:\n{log}");

    // Both patterns are in the backing file, nothing else.
    let image = std::fs::read(&s.image).unwrap();
    assert!(image[..BLOCK as usize].iter().all(|&b| b == 0x11));
    assert!(image[BLOCK as usize..2 * BLOCK as usize]
        .iter()
        .all(|&b| b == 0x22));
    assert!(image[2 * BLOCK as usize..].iter().all(|&b| b == 0));
    // Both blocks are dirty in the bitmap of the same generation.
    let (dirty, bitmap_generation) = bitmap_blocks(&s.state_dir);
    assert_eq!(bitmap_generation, generation);
    assert_eq!(dirty, BTreeSet::from([0, 1]));
}

#[test]
fn qemu_rides_out_sigterm_restart_while_idle() {
    qemu_rides_out_restart(Stop::Term, Guest::Idle);
}

#[test]
fn qemu_rides_out_sigterm_restart_while_writing() {
    qemu_rides_out_restart(Stop::Term, Guest::Busy);
}

#[test]
fn qemu_rides_out_kill9_restart_while_idle() {
    qemu_rides_out_restart(Stop::Kill, Guest::Idle);
}

#[test]
fn qemu_rides_out_kill9_restart_while_writing() {
    qemu_rides_out_restart(Stop::Kill, Guest::Busy);
}

// ---------------------------------------------------------------------------------
// The independent client across a shim restart: the sequential writer's cut point.

#[test]
fn sequential_writer_survives_kill9_with_every_acknowledged_block_tracked() {
    let s = setup(32 * MIB);
    let shim = ShimProc::start(&s.config, &s.state_dir);
    let generation = disk_status(&shim)["generation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut c = NbdClient::connect(&s.socket, DISK).unwrap();
    // QD1: when write i returns, writes 0..=i are acknowledged and nothing else is in
    // flight, so after the kill exactly those blocks must be tracked.
    let acked = 37u64;
    for i in 0..acked {
        c.write(i * 3 * BLOCK + 100, &[i as u8 + 1; 1000]).unwrap();
    }
    shim.kill9();
    let e = c.write(0, &[0xff; 512]).unwrap_err();
    assert_eq!(nbd_errno(&e), None, "a dead server answered: {e}");

    let (dirty, bitmap_generation) = bitmap_blocks(&s.state_dir);
    assert_eq!(bitmap_generation, generation);
    let expected: BTreeSet<u64> = (0..acked).map(|i| i * 3).collect();
    assert_eq!(dirty, expected, "bitmap after kill -9");

    let shim = ShimProc::start(&s.config, &s.state_dir);
    let mut c = connect_retry(&s.socket, DISK, Duration::from_secs(20)).unwrap();
    for i in 0..acked {
        let mut buf = [0u8; 1000];
        c.read(i * 3 * BLOCK + 100, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == i as u8 + 1), "write {i} lost");
    }
    c.write(BLOCK, &[0x77; 10]).unwrap();
    c.disconnect().unwrap();
    let st = disk_status(&shim);
    assert_eq!(st["generation_id"].as_str(), Some(generation.as_str()));
    assert_eq!(st["dirty_blocks"].as_u64(), Some(acked + 1), "{st}");
    shim.stop();
}

// ---------------------------------------------------------------------------------
// A second start while a shim runs.

/// A second `ferry shim` on the same config (a double start, a unit restarted while the
/// old process lingers) must fail without disturbing the running shim: every write the
/// running shim acknowledges afterwards must still reach the bitmap file, so that a
/// crash of the running shim loses no tracked block.
#[test]
fn second_start_fails_without_disturbing_the_running_shim() {
    let s = setup(16 * MIB);
    let shim = ShimProc::start(&s.config, &s.state_dir);
    let generation = disk_status(&shim)["generation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut c = NbdClient::connect(&s.socket, DISK).unwrap();
    c.write(0, &[0x11; 4096]).unwrap();

    let out = Command::new(common::ferry_bin())
        .arg("shim")
        .arg("--config")
        .arg(&s.config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second shim started: {err}");
    assert!(err.contains("another shim running"), "{err}");

    // The running shim still serves and tracks.
    c.write(5 * BLOCK, &[0x55; 4096]).unwrap();
    let st = disk_status(&shim);
    assert_eq!(st["generation_id"].as_str(), Some(generation.as_str()));
    assert_eq!(st["dirty_blocks"].as_u64(), Some(2), "{st}");
    // Both acknowledged writes are tracked on disk, which is what a crash leaves.
    shim.kill9();
    let (dirty, bitmap_generation) = bitmap_blocks(&s.state_dir);
    assert_eq!(bitmap_generation, generation);
    assert_eq!(
        dirty,
        BTreeSet::from([0, 5]),
        "an acknowledged write is missing from the bitmap file after a failed second start"
    );
    let shim = ShimProc::start(&s.config, &s.state_dir);
    let st = disk_status(&shim);
    assert_eq!(st["generation_id"].as_str(), Some(generation.as_str()));
    assert_eq!(st["dirty_blocks"].as_u64(), Some(2), "{st}");
    shim.stop();
}
