//! With a real guest (issue 10, point 9): a Linux VM under QEMU on an ext4 disk.
//!
//! One way: the VM writes files through the shim while `ferry source` replicates;
//! after `ferry failover planned` a second VM boots the promoted replica file directly,
//! reads exactly those files and writes more.
//!
//! The round trip between two sites (`common::sites`), the disk always attached over
//! NBD to the site's shim: VM 1 writes files at site A; after a planned failover VM 2
//! boots at B on the promoted replica, reads exactly those files and writes more; A
//! becomes the replica and B reprotects; after the failback (planned failover B → A,
//! reprotect A → B) VM 1 boots again on A's original disk and finds both sets. No full
//! or seeded sync runs after the first one.
//!
//! See `common::vm` for the guest.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::rig::{Rig, RigSpec};
use crate::common::sites::{self, assert_same, modes_of, Site};
use crate::common::vm::{self, Boot};
use crate::common::*;

/// The guest's disk: small, so that mkfs, the first full copy and e2fsck are quick.
const DISK_BYTES: u64 = 64 << 20;

/// How long one boot may take on a shared 2-core machine under TCG (a few seconds
/// when the machine is idle).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The primary's guest: three files of random content and odd sizes, their sums.
const WRITE_FILES: &str = r#"
for n in 1 2 3; do head -c $((n * 300000 + 7)) /dev/urandom > f$n; done
sha256sum f1 f2 f3 | sed 's/^/ferry-vm: wrote /'
"#;

/// The sums of every regular file on the disk (a file too many shows too).
const READ_ALL: &str = r#"
find . -type f | sort | xargs sha256sum | sed 's/^/ferry-vm: read /'
"#;

/// The promoted site's guest: what it finds, then two more files in a directory.
const READ_AND_WRITE: &str = r#"
find . -type f | sort | xargs sha256sum | sed 's/^/ferry-vm: read /'
mkdir b
head -c 500000 /dev/urandom > b/g1
head -c 123457 /dev/urandom > b/g2
sha256sum b/g1 b/g2 | sed 's/^/ferry-vm: wrote /'
"#;

/// `file -> sha256` from the guest's `ferry-vm: <verb> <hex>  <file>` lines (`wrote`
/// or `read`), the file relative to the disk's root.
fn sums(boot: &Boot, verb: &str) -> BTreeMap<String, String> {
    let prefix = format!("ferry-vm: {verb} ");
    boot.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, file)| {
            let file = file.strip_prefix("./").unwrap_or(file);
            (file.to_string(), sum.to_string())
        })
        .collect()
}

fn ferry_ok(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(ferry_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run ferry");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "ferry {args:?}: {stdout}{stderr}");
    stdout.into_owned()
}

#[test]
fn a_guest_boots_the_promoted_replica_and_reads_what_it_wrote_at_the_primary() {
    let Some(kernel) = vm::kernel_or_skip() else {
        return;
    };
    let spec = RigSpec {
        names: vec!["os"],
        group: None,
        ..RigSpec::two_disk_group(DISK_BYTES)
    };
    let rig = Rig::with_images(&spec, vm::mkfs_ext4);
    let disk = &rig.disks[0];
    let mut source = rig.start_source();
    rig.wait_first_epoch(Duration::from_secs(60));

    let through_shim = vm::nbd_drive(&disk.socket, &disk.name);
    let first = vm::boot(kernel, &through_shim, WRITE_FILES, BOOT_TIMEOUT);
    eprintln!("VM 1 (through the shim) ran in {:?}", first.took);
    let written = sums(&first, "wrote");
    assert_eq!(written.len(), 3, "{}", first.serial);

    // SAFETY: signalling our own child process, which has not been reaped.
    unsafe { libc::kill(source.id() as libc::pid_t, libc::SIGTERM) };
    let status = shim::wait_timeout(&mut source, Duration::from_secs(60))
        .expect("ferry source stops on SIGTERM");
    assert!(status.success(), "{}", rig.log("source.log"));
    let out = ferry_ok(&[
        "failover".as_ref(),
        "planned".as_ref(),
        "--config".as_ref(),
        rig.config.as_os_str(),
    ]);
    assert!(out.contains("boot the VMs"), "{out}");
    assert_same_file(&disk.image, &disk.replica);

    let replica = format!("file={},format=raw", disk.replica.display());
    let second = vm::boot(kernel, &replica, READ_AND_WRITE, BOOT_TIMEOUT);
    eprintln!("VM 2 (on the promoted replica) ran in {:?}", second.took);
    assert_eq!(sums(&second, "read"), written, "{}", second.serial);
    assert_eq!(sums(&second, "wrote").len(), 2, "{}", second.serial);
    vm::fsck_ext4(&disk.replica).unwrap_or_else(|e| panic!("{e}"));
}

/// A reverse replication's report: every disk went as `reprotect` (no full or seeded
/// resync) and sent less than a sixteenth of the disk (the guest writes some 600 KiB
/// of files, and ext4 its metadata and journal).
fn check_reprotect(report: &serde_json::Value, when: &str) {
    assert!(
        modes_of(report).iter().all(|m| m == "reprotect"),
        "{when}: {report}"
    );
    let sent = u64_field(report, "bytes_sent");
    eprintln!(
        "{when}: sent {sent} bytes, {:.2}% of the disk",
        100.0 * sent as f64 / DISK_BYTES as f64
    );
    assert!(
        sent < DISK_BYTES / 16,
        "{when}: sent {sent} bytes of a {DISK_BYTES}-byte disk: {report}"
    );
}

/// The `-drive` options of a site's one disk, through its shim.
fn drive(site: &Site) -> String {
    let disk = &site.disks[0];
    vm::nbd_drive(&disk.socket, disk.name)
}

#[test]
fn a_guest_finds_its_files_after_failover_reprotect_and_failback() {
    let Some(kernel) = vm::kernel_or_skip() else {
        return;
    };
    let dir = scratch_dir();
    let (mut a, mut b) = sites::pair(dir.path(), &[("os", DISK_BYTES)], vm::mkfs_ext4);

    // A is the primary: the first sync copies the fresh file system whole.
    b.start_target();
    a.start_shim();
    let first = a.ferry_ok(&["sync", "--json"]).json();
    assert!(modes_of(&first).iter().all(|m| m == "full"), "{first}");
    let vm1 = vm::boot(kernel, &drive(&a), WRITE_FILES, BOOT_TIMEOUT);
    eprintln!("VM 1 at A ran in {:?}", vm1.took);
    let set1 = sums(&vm1, "wrote");
    assert_eq!(set1.len(), 3, "{}", vm1.serial);
    let out = a.ferry_ok(&["failover", "planned"]).stdout;
    assert!(out.contains("boot the VMs"), "{out}");
    a.stop_shim();
    b.kill_target();
    assert_same(&a, &b, "after the planned failover");

    // B is the primary: VM 2 boots on the promoted replica through B's shim.
    b.ferry_ok(&["failover", "commit"]);
    b.start_shim();
    let vm2 = vm::boot(kernel, &drive(&b), READ_AND_WRITE, BOOT_TIMEOUT);
    eprintln!("VM 2 at B ran in {:?}", vm2.took);
    assert_eq!(sums(&vm2, "read"), set1, "{}", vm2.serial);
    let set2 = sums(&vm2, "wrote");
    assert_eq!(set2.len(), 2, "{}", vm2.serial);

    // A becomes the replica; B replicates back what changed.
    a.ferry_ok(&["become-replica"]);
    a.start_target();
    let r = b.ferry_ok(&["reprotect", "--json"]).json();
    check_reprotect(&r, "reprotect B → A");

    // Failback: planned failover B → A, reprotect A → B.
    b.ferry_ok(&["failover", "planned"]);
    b.stop_shim();
    a.kill_target();
    assert_same(&a, &b, "after the planned failback");
    a.ferry_ok(&["failover", "commit"]);
    b.ferry_ok(&["become-replica"]);
    b.start_target();
    a.start_shim();
    let r = a.ferry_ok(&["reprotect", "--json"]).json();
    check_reprotect(&r, "reprotect A → B");

    // VM 1 boots again on the original disk and finds both sets; replication goes on
    // with changed-block epochs.
    let vm3 = vm::boot(kernel, &drive(&a), READ_ALL, BOOT_TIMEOUT);
    eprintln!("VM 1 at A again ran in {:?}", vm3.took);
    let mut both = set1;
    both.extend(set2);
    assert_eq!(sums(&vm3, "read"), both, "{}", vm3.serial);
    let r = a.ferry_ok(&["sync", "--json"]).json();
    assert!(modes_of(&r).iter().all(|m| m == "changed"), "{r}");
    a.stop_shim();
    b.kill_target();
    assert_same(&a, &b, "after the last epoch");
    vm::fsck_ext4(&a.disks[0].image).unwrap_or_else(|e| panic!("{e}"));
}
