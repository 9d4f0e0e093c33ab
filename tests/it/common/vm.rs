//! A real Linux guest for the tests that boot one: QEMU in TCG (`-accel tcg`; KVM opens
//! on the test machines but cannot run a guest), Debian's kernel, and an initramfs made
//! here from `busybox-static` and the kernel's virtio and ext4 modules. The guest mounts
//! `/dev/vda` (ext4), runs one shell step the test hands it, unmounts, prints a marker
//! and powers off; the test reads what it printed on the serial console.
//!
//! The kernel is fetched once with `apt-get download` and cached (only the bzImage and
//! the modules the guest loads) under `$FERRY_VM_CACHE`, else
//! `/var/cache/ferry-test-vm` when it can be written, else `target/ferry-test-vm`.
//! Without QEMU, busybox-static or a kernel the tests skip through `FERRY_REQUIRE`'s
//! `tools` switch.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_io::require::{skip, Feature};

use super::{scratch_dir, tool_or_skip};

/// The QEMU binary; `tools/test.sh` installs it (`qemu-system-x86`).
const QEMU: &str = "qemu-system-x86_64";

/// Where `busybox-static` installs its binary.
const BUSYBOX: &str = "/bin/busybox";

/// The modules the guest loads, in dependency order, by their path under
/// `lib/modules/<version>/kernel/` (Debian builds virtio and ext4 as modules; the
/// guest has no `modprobe` data, so `crc32c`, which ext4 asks the crypto API for, is
/// loaded by name too).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
    "lib/crc16",
    "fs/mbcache",
    "fs/jbd2/jbd2",
    "crypto/crc32c_generic",
    "fs/ext4/ext4",
];

/// The marker the guest prints when its step succeeded and the disk is unmounted.
pub const DONE: &str = "ferry-vm: step ok";

/// The guest's `/init`: mounts, loads the modules, mounts `/dev/vda` on `/mnt`, runs
/// `/step.sh` there with `sh -e`, unmounts and powers off. Every failure prints a
/// `ferry-vm:` line and powers off too, so a broken guest ends the boot quickly.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "ferry-vm: FAILED: $*"; poweroff -f; }
for m in $(cat /modules); do insmod "/lib/modules/$m.ko" || fail "insmod $m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"
echo "ferry-vm: mounted"
(cd /mnt && sh -e /step.sh) || fail "step exited with $?"
sync
umount /mnt || fail "umount /mnt"
echo "ferry-vm: step ok"
poweroff -f
"#;

/// The kernel and the modules of one cached Debian kernel package.
#[derive(Debug)]
pub struct Kernel {
    pub bzimage: PathBuf,
    /// `(name, path)` in load order.
    pub modules: Vec<(String, PathBuf)>,
}

/// What a boot printed on its serial console and how long it took.
#[derive(Debug)]
pub struct Boot {
    pub serial: String,
    pub took: Duration,
}

impl Boot {
    /// The serial console's lines without carriage returns.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.serial.lines().map(|l| l.trim_end_matches('\r'))
    }
}

/// The cached kernel, fetched on first use; `None` (after a skip) when QEMU,
/// busybox-static or the kernel cannot be had.
pub fn kernel_or_skip() -> Option<&'static Kernel> {
    if !tool_or_skip(QEMU) {
        return None;
    }
    if !static_busybox() {
        skip(
            Feature::Tools,
            format!("{BUSYBOX} is missing or not static (install busybox-static)"),
        );
        return None;
    }
    static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();
    match KERNEL.get_or_init(|| cached_kernel(&cache_dir())) {
        Ok(k) => Some(k),
        Err(why) => {
            skip(Feature::Tools, format!("no kernel for the guest: {why}"));
            None
        }
    }
}

/// A statically linked busybox (an ELF64 file without a `PT_INTERP` program header):
/// the initramfs has no shared libraries.
fn static_busybox() -> bool {
    let Ok(elf) = std::fs::read(BUSYBOX) else {
        return false;
    };
    let field = |at: usize, len: usize| -> Option<u64> {
        let bytes = elf.get(at..at + len)?;
        Some(bytes.iter().rev().fold(0, |v, &b| v << 8 | u64::from(b)))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (field(0x20, 8), field(0x36, 2), field(0x38, 2))
    else {
        return false;
    };
    const PT_INTERP: u64 = 3;
    elf.starts_with(b"\x7fELF\x02")
        && (0..phnum)
            .all(|i| field((phoff + i * phentsize) as usize, 4).is_some_and(|t| t != PT_INTERP))
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_VM_CACHE") {
        return PathBuf::from(dir);
    }
    let system = Path::new("/var/cache/ferry-test-vm");
    if std::fs::create_dir_all(system).is_ok() && tempfile::tempdir_in(system).is_ok() {
        return system.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ferry-test-vm")
}

/// The kernel in `cache`, fetched into it first if it is not there. A fetch fills a
/// temporary directory and renames it into place, so concurrent test processes at
/// worst fetch twice.
fn cached_kernel(cache: &Path) -> Result<Kernel, String> {
    let ready = cache.join("kernel");
    if !ready.join("modules").is_file() {
        std::fs::create_dir_all(cache).map_err(|e| format!("create {}: {e}", cache.display()))?;
        let fresh = tempfile::tempdir_in(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
        fetch_kernel(fresh.path())?;
        // Another process may have won the race; its copy is as good as ours.
        let _ = std::fs::rename(fresh.keep(), &ready);
    }
    load_kernel(&ready)
}

/// Reads a cache entry: `bzImage`, `modules` (one name a line) and `<name>.ko`.
fn load_kernel(dir: &Path) -> Result<Kernel, String> {
    let list = std::fs::read_to_string(dir.join("modules"))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(Kernel {
        bzimage: dir.join("bzImage"),
        modules: list
            .lines()
            .map(|m| (m.to_string(), dir.join(format!("{m}.ko"))))
            .collect(),
    })
}

/// Downloads `linux-image-amd64` and the versioned image package it depends on into a
/// scratch directory, and copies the bzImage and [`MODULES`] into `into`.
fn fetch_kernel(into: &Path) -> Result<(), String> {
    let work = scratch_dir();
    let meta = apt_download(work.path(), "linux-image-amd64")?;
    let depends = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&meta)
        .arg("Depends"))?;
    let image = depends
        .split([',', ' ', '('])
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| format!("linux-image-amd64 depends on {depends:?}"))?
        .to_string();
    let deb = apt_download(work.path(), &image)?;
    let tree = work.path().join("x");
    std::fs::create_dir(&tree).map_err(|e| e.to_string())?;
    extract_kernel(&deb, &tree)?;
    let boot = single_entry(&tree.join("boot"), "vmlinuz-")?;
    copy(&boot, &into.join("bzImage"))?;
    let modules = single_entry(&tree.join("lib/modules"), "")?.join("kernel");
    let mut names = String::new();
    for m in MODULES {
        let name = m.rsplit('/').next().unwrap_or(m);
        copy(
            &modules.join(format!("{m}.ko")),
            &into.join(format!("{name}.ko")),
        )?;
        names.push_str(name);
        names.push('\n');
    }
    std::fs::write(into.join("modules"), names).map_err(|e| e.to_string())
}

/// `apt-get download <package>` in `dir`; the path of the `.deb` it fetched.
fn apt_download(dir: &Path, package: &str) -> Result<PathBuf, String> {
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(dir))?;
    let prefix = format!("{package}_");
    single_entry(dir, &prefix)
}

/// Extracts only the bzImage and the module tree from a kernel package (the whole
/// package unpacks to some 400 MB).
fn extract_kernel(deb: &Path, tree: &Path) -> Result<(), String> {
    let tar = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run dpkg-deb: {e}"))?;
    let stdout = tar.stdout.ok_or("no pipe from dpkg-deb")?;
    run(Command::new("tar")
        .args(["-x", "--wildcards", "-C"])
        .arg(tree)
        .args(["./boot/vmlinuz-*"])
        .args(
            MODULES
                .iter()
                .map(|m| format!("./lib/modules/*/kernel/{m}.ko")),
        )
        .stdin(stdout))
    .map(drop)
}

/// The one entry of `dir` whose name starts with `prefix`.
fn single_entry(dir: &Path, prefix: &str) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!("{} holds {found:?} for {prefix:?}", dir.display())),
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

/// Runs a command to completion; its stdout, or why it failed.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Writes the guest's initramfs to `path`: busybox, the modules, `/init` and `step`
/// as `/step.sh`.
pub fn write_initramfs(path: &Path, kernel: &Kernel, step: &str) {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    // The console exists before devtmpfs is mounted: /init's output goes there.
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &read(Path::new(BUSYBOX)));
    let mut names = String::new();
    for (name, ko) in &kernel.modules {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &read(ko));
        names.push_str(name);
        names.push('\n');
    }
    cpio.file("modules", 0o644, names.as_bytes());
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("step.sh", 0o644, step.as_bytes());
    std::fs::write(path, cpio.finish()).unwrap();
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A `newc` cpio archive, the format the kernel unpacks as an initramfs (uncompressed
/// is fine). Written here so that device nodes need no privileges.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// The `-drive` options (without `if=`) of a disk served over NBD on the unix socket
/// `socket` under the export name `export`, as the shim serves it.
pub fn nbd_drive(socket: &Path, export: &str) -> String {
    format!(
        "file.driver=nbd,file.server.type=unix,file.server.path={},file.export={export},format=raw",
        socket.display()
    )
}

/// Boots a guest whose `/dev/vda` is `drive` (the `-drive` options without `if=`)
/// and whose step is the shell script `step`; panics with the serial output unless
/// the guest prints [`DONE`] and QEMU exits within `timeout`.
pub fn boot(kernel: &Kernel, drive: &str, step: &str, timeout: Duration) -> Boot {
    let dir = scratch_dir();
    let initrd = dir.path().join("initrd.cpio");
    write_initramfs(&initrd, kernel, step);
    let started = Instant::now();
    let mut child = qemu(kernel, &initrd, drive)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {QEMU}: {e}"));
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let status = super::shim::wait_timeout(&mut child, timeout);
    let took = started.elapsed();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    // QEMU has exited: both pipes are at their end.
    let text = |t: JoinHandle<Vec<u8>>| String::from_utf8_lossy(&t.join().unwrap()).into_owned();
    let (serial, errors) = (text(stdout), text(stderr));
    let boot = Boot { serial, took };
    let done = boot.lines().any(|l| l == DONE);
    assert!(
        done && status.is_some_and(|s| s.success()),
        "the guest did not finish its step within {timeout:?} (QEMU {status:?}):\n{}\n{errors}",
        boot.serial
    );
    boot
}

/// The QEMU command line: one CPU in TCG, the serial console on stdout, no other
/// devices but the virtio disk `drive`.
fn qemu(kernel: &Kernel, initrd: &Path, drive: &str) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "tcg", "-m", "256", "-smp", "1", "-nodefaults"])
        .args(["-no-reboot", "-display", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel.bzimage)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1: a kernel panic reboots, which -no-reboot turns into an exit.
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args(["-drive", &format!("{drive},if=virtio")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Reads a child's stream to its end on a thread (so the child never blocks on a full
/// pipe); joining the thread gives everything it wrote.
fn read_all(stream: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        if let Some(mut s) = stream {
            let _ = s.read_to_end(&mut all);
        }
        all
    })
}

/// Makes `path` a fresh ext4 file system of `size` bytes.
pub fn mkfs_ext4(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let out = Command::new(sbin("mkfs.ext4"))
        .args(["-q", "-F", "-E", "nodiscard"])
        .arg(path)
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `e2fsck -fn` of an image: `Err(output)` unless it finds the file system clean.
pub fn fsck_ext4(path: &Path) -> Result<(), String> {
    let out = Command::new(sbin("e2fsck"))
        .arg("-fn")
        .arg(path)
        .output()
        .expect("run e2fsck");
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "e2fsck -fn {} ({}): {}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// An e2fsprogs tool: on `PATH`, else in `/usr/sbin` or `/sbin` (not on every user's
/// `PATH`).
fn sbin(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}
