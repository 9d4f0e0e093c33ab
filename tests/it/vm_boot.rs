//! With a real guest (issue 10, point 9): a Linux VM under QEMU writes files to its
//! ext4 disk through the shim while `ferry source` replicates; after
//! `ferry failover planned` a second VM boots the promoted replica file directly,
//! reads exactly those files and writes more. See `common::vm` for the guest.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::rig::{Rig, RigSpec};
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
sha256sum f1 f2 f3 | sed 's/^/ferry-vm: sum /'
"#;

/// The promoted site's guest: the sums of the same files, then one more file.
const READ_AND_WRITE: &str = r#"
sha256sum f1 f2 f3 | sed 's/^/ferry-vm: sum /'
head -c 500000 /dev/urandom > f4
sha256sum f4 | sed 's/^/ferry-vm: sum /'
"#;

/// `file -> sha256` from the guest's `ferry-vm: sum <hex>  <file>` lines.
fn sums(boot: &Boot) -> BTreeMap<String, String> {
    boot.lines()
        .filter_map(|l| l.strip_prefix("ferry-vm: sum "))
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, file)| (file.to_string(), sum.to_string()))
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

    let through_shim = format!(
        "file.driver=nbd,file.server.type=unix,file.server.path={},file.export={},format=raw",
        disk.socket.display(),
        disk.name
    );
    let first = vm::boot(kernel, &through_shim, WRITE_FILES, BOOT_TIMEOUT);
    eprintln!("VM 1 (through the shim) ran in {:?}", first.took);
    let written = sums(&first);
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
    let mut read = sums(&second);
    assert!(read.remove("f4").is_some(), "{}", second.serial);
    assert_eq!(read, written, "{}", second.serial);
    vm::fsck_ext4(&disk.replica).unwrap_or_else(|e| panic!("{e}"));
}
