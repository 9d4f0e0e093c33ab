//! The mount itself, through real system calls: what ferry uses works, and a cut keeps
//! exactly what was synced.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

use ferry_powerfail::{CutMode, PowerFailFs};

/// Serialises the tests of this binary. A remount gets its old device number back only
/// if that is the lowest free one: when another test's mount, made after this one, goes
/// away first, a lower number is free and every remount takes that one instead.
fn one_mount_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static MOUNTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    MOUNTS.lock().unwrap_or_else(|e| e.into_inner())
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-powerfail-")
        .tempdir()
        .expect("temporary directory")
}

#[test]
fn system_calls_ferry_uses_work_and_a_cut_keeps_only_what_was_synced() {
    let _mounts = one_mount_at_a_time();
    let dir = scratch();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let Some(mut pfs) = PowerFailFs::mount_or_skip("powerfail_mount", &mnt) else {
        return;
    };
    let state = mnt.join("state");
    fs::create_dir(&state).unwrap();
    File::open(&mnt).unwrap().sync_all().unwrap();

    // Durable: written, fdatasync'ed, its name synced with its directory.
    let kept = state.join("kept");
    let f = File::create(&kept).unwrap();
    f.write_all_at(b"durable", 0).unwrap();
    f.sync_data().unwrap();
    File::open(&state).unwrap().sync_all().unwrap();
    // Then changed without a sync.
    f.write_all_at(b"VOLATILE", 0).unwrap();
    f.set_len(4096).unwrap();
    drop(f);

    // tmp + fsync + rename + directory fsync: durable under the new name.
    let tmp = state.join("rec.tmp");
    fs::write(&tmp, b"record").unwrap();
    File::open(&tmp).unwrap().sync_all().unwrap();
    fs::rename(&tmp, state.join("rec")).unwrap();
    File::open(&state).unwrap().sync_all().unwrap();

    // Synced data under a name that never was.
    let orphan = state.join("orphan");
    let mut o = File::create(&orphan).unwrap();
    o.write_all(b"lost name").unwrap();
    o.sync_all().unwrap();
    drop(o);

    // O_DIRECT opens and moves aligned data.
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(state.join("rec"))
        .expect("O_DIRECT open on the power-fail mount");
    drop(direct);

    // flock: exclusive between two descriptors (the kernel's own locks).
    let a = File::open(&kept).unwrap();
    let b = File::open(&kept).unwrap();
    // SAFETY: plain flock on descriptors owned by `a` and `b`, alive for the calls.
    unsafe {
        assert_eq!(libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB), 0);
        assert_eq!(
            libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1
        );
    }
    drop((a, b));

    // Punch hole with KEEP_SIZE.
    let p = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&kept)
        .unwrap();
    // SAFETY: fallocate on a descriptor owned by `p`, alive for the call.
    let rc = unsafe {
        libc::fallocate(
            p.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4,
        )
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
    assert_eq!(&fs::read(&kept).unwrap()[..8], b"\0\0\0\0TILE");
    drop(p);

    // Shared mmap: a store through one mapping is seen through another descriptor.
    let m = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(state.join("map"))
        .unwrap();
    m.set_len(4096).unwrap();
    // SAFETY: a fresh shared mapping of 4096 bytes of a file at least that long; it is
    // unmapped below before `m` is dropped, and nothing else refers to it.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            m.as_raw_fd(),
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        *ptr.cast::<u8>().add(10) = 42;
        let mut seen = [0u8; 1];
        File::open(state.join("map"))
            .unwrap()
            .read_exact_at(&mut seen, 10)
            .unwrap();
        assert_eq!(seen[0], 42);
        libc::munmap(ptr, 4096);
    }
    drop(m);

    // A Unix socket bound inside the mount.
    let sock = state.join("ctl");
    let listener = UnixListener::bind(&sock).expect("bind a Unix socket on the mount");
    let mut client = UnixStream::connect(&sock).unwrap();
    client.write_all(b"hi").unwrap();
    let mut got = [0u8; 2];
    listener.accept().unwrap().0.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
    drop((client, listener));

    let mut names: Vec<String> = fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ctl", "kept", "map", "orphan", "rec"]);

    let report = pfs.cut(CutMode::DropUnsynced);
    assert!(report.pending_data_ops > 0, "{report:?}");
    assert!(
        fs::read(&kept).is_err() || fs::metadata(&kept).is_err(),
        "no power, no answer"
    );
    pfs.restore().unwrap();

    assert_eq!(fs::read(&kept).unwrap(), b"durable");
    assert_eq!(fs::read(state.join("rec")).unwrap(), b"record");
    assert!(!orphan.exists(), "its name was never synced");
    assert!(!state.join("rec.tmp").exists());
    let mut names: Vec<String> = fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["kept", "rec"]);
}

#[test]
fn a_restored_mount_keeps_its_device_number() {
    use std::os::unix::fs::MetadataExt;
    let _mounts = one_mount_at_a_time();
    let dir = scratch();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let Some(mut pfs) = PowerFailFs::mount_or_skip("powerfail_dev", &mnt) else {
        return;
    };
    let before = fs::metadata(&mnt).unwrap().dev();
    pfs.cut(CutMode::WritebackSome { seed: 1 });
    pfs.restore().unwrap();
    assert_eq!(fs::metadata(&mnt).unwrap().dev(), before);
}
