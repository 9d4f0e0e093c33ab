//! Helpers for the I/O layer's tests: kernel-feature probes that skip cleanly, loop
//! devices, a seeded generator, and the contract every [`BlockEngine`] must meet.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{AlignedBuf, IoBuffer};

/// Why a test cannot run here.
#[derive(Debug)]
pub struct Skip(pub String);

/// `Some(reason)` if this process cannot create an io_uring at all.
pub fn uring_unavailable() -> Option<String> {
    match io_uring::IoUring::new(4) {
        Ok(_) => None,
        Err(err) => {
            let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .map(|value| value.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned());
            Some(format!(
                "io_uring_setup failed ({err}); kernel.io_uring_disabled = {sysctl}"
            ))
        }
    }
}

/// The seed of a randomized test: `FERRY_TEST_SEED` if set, else fresh; printed with
/// the test's name (the test harness names each test's thread after it).
pub fn seed() -> u64 {
    ferry_io::rng::test_seed(std::thread::current().name().unwrap_or("test"))
}

/// The seeded generator of all of ferry's tests.
pub use ferry_io::rng::Rng;

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> Result<LoopDevice, Skip> {
        let output = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|err| Skip(format!("cannot run losetup: {err}")))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(Skip(format!("losetup -f --show failed: {}", stderr.trim())));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Ok(LoopDevice { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let detached = Command::new("losetup").arg("-d").arg(&self.path).status();
        if !matches!(detached, Ok(status) if status.success()) {
            eprintln!(
                "warning: could not detach {}: {detached:?}",
                self.path.display()
            );
        }
    }
}

/// A buffer whose address is one byte past an aligned one: what O_DIRECT must refuse.
pub struct Misaligned(AlignedBuf);

impl Misaligned {
    pub fn new(len: usize) -> Misaligned {
        Misaligned(AlignedBuf::zeroed(len + 1))
    }
}

// SAFETY: delegates to `AlignedBuf` (heap memory, stable address, valid until drop),
// offset by one byte and shortened by one, so the range stays inside the allocation.
unsafe impl IoBuffer for Misaligned {
    fn as_ptr(&self) -> *const u8 {
        self.0.as_ptr().wrapping_add(1)
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        IoBuffer::as_mut_ptr(&mut self.0).wrapping_add(1)
    }

    fn capacity(&self) -> usize {
        self.0.len() - 1
    }

    fn fixed_index(&self) -> Option<u16> {
        None
    }
}

/// The behaviour both engines must share, written once and run against each. Every
/// function takes a constructor that returns `None` when the engine cannot run here
/// (after printing why).
pub mod contract {
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::fs::OpenOptionsExt;

    use super::super::{
        AlignedBuf, BlockEngine, Completion, Disk, DiskId, IoBuffer, IoError, IoOp,
    };
    use super::{Misaligned, Rng};

    const BLOCK: usize = 4096;

    fn wait_all<B: IoBuffer, E: BlockEngine<B>>(engine: &mut E) -> Vec<Completion<B>> {
        let mut out = Vec::with_capacity(engine.queue_depth());
        while engine.in_flight() > 0 {
            let in_flight = engine.in_flight();
            engine.wait(in_flight, &mut out).unwrap();
        }
        out.sort_by_key(|completion| completion.tag);
        out
    }

    /// Writes a batch of patterned blocks with the queue full, syncs, reads them back.
    pub fn round_trip_and_fsync<E: BlockEngine<AlignedBuf>>(
        make: impl Fn(usize, &[RawFd]) -> Option<E>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open_replica(dir.path().join("r.img"), 1 << 20).unwrap();
        let Some(mut engine) = make(8, &[disk.fd()]) else {
            return;
        };
        let mut rng = Rng::new(7);
        let mut written = Vec::new();
        for tag in 0..8u64 {
            let len = BLOCK * (1 + tag as usize % 3);
            let mut buf = AlignedBuf::zeroed(3 * BLOCK);
            rng.fill(&mut buf[..len]);
            written.push(buf[..len].to_vec());
            let offset = tag * 3 * BLOCK as u64;
            engine
                .submit_write(DiskId(0), buf, offset, len as u32, tag)
                .map_err(|(err, _)| err)
                .unwrap();
        }
        assert_eq!(engine.in_flight(), 8);
        for completion in wait_all(&mut engine) {
            let len = written[completion.tag as usize].len();
            assert_eq!(completion.result.unwrap(), len as u32);
            assert_eq!(completion.buf.unwrap().len(), 3 * BLOCK);
        }
        engine.submit_fsync(DiskId(0), 100).unwrap();
        let synced = wait_all(&mut engine);
        assert_eq!(synced.len(), 1);
        assert_eq!(
            (synced[0].tag, synced[0].result.as_ref().ok()),
            (100, Some(&0))
        );
        assert!(synced[0].buf.is_none());

        for tag in 0..8u64 {
            let len = written[tag as usize].len();
            let buf = AlignedBuf::zeroed(3 * BLOCK);
            let offset = tag * 3 * BLOCK as u64;
            engine
                .submit_read(DiskId(0), buf, offset, len as u32, tag)
                .map_err(|(err, _)| err)
                .unwrap();
        }
        for completion in wait_all(&mut engine) {
            let expected = &written[completion.tag as usize];
            assert_eq!(completion.result.unwrap(), expected.len() as u32);
            assert_eq!(&completion.buf.unwrap()[..expected.len()], &expected[..]);
        }
    }

    /// Reads over the end of a disk whose size is not block-aligned complete short with
    /// the bytes that exist, and reads past the end complete with 0.
    pub fn short_reads_at_end_of_disk<E: BlockEngine<AlignedBuf>>(
        make: impl Fn(usize, &[RawFd]) -> Option<E>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        // 10000 ends mid-sector; 8704 ends on a sector but not on a 4 KiB block.
        let sizes = [10_000usize, 8704];
        let mut disks = Vec::new();
        let mut contents = Vec::new();
        for (index, &size) in sizes.iter().enumerate() {
            let path = dir.path().join(format!("d{index}.img"));
            let mut bytes = vec![0u8; size];
            Rng::new(index as u64).fill(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            disks.push(Disk::open_source(&path).unwrap());
            contents.push(bytes);
        }
        let fds: Vec<RawFd> = disks.iter().map(|disk| disk.fd()).collect();
        let Some(mut engine) = make(8, &fds) else {
            return;
        };
        let cases = [
            // (disk, offset, len, expected bytes)
            (0, 8192, 4096, 10_000 - 8192),
            (0, 4096, 8192, 10_000 - 4096),
            (0, 12_288, 4096, 0),
            (1, 8192, 4096, 8704 - 8192),
            (1, 0, 12_288, 8704),
            (1, 16_384, 4096, 0),
        ];
        for (tag, &(disk, offset, len, _)) in cases.iter().enumerate() {
            let buf = AlignedBuf::zeroed(len);
            engine
                .submit_read(DiskId(disk), buf, offset, len as u32, tag as u64)
                .map_err(|(err, _)| err)
                .unwrap();
        }
        for completion in wait_all(&mut engine) {
            let (disk, offset, _, expected) = cases[completion.tag as usize];
            let bytes = completion.result.unwrap() as usize;
            assert_eq!(bytes, expected, "case {}", completion.tag);
            let buf = completion.buf.unwrap();
            let content = &contents[disk as usize];
            let offset = (offset as usize).min(content.len());
            assert_eq!(&buf[..bytes], &content[offset..offset + bytes]);
        }
    }

    /// Every refused request hands its buffer back, and a full queue is back-pressure.
    pub fn refusals_hand_the_buffer_back<E: BlockEngine<AlignedBuf>>(
        make: impl Fn(usize, &[RawFd]) -> Option<E>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open_replica(dir.path().join("r.img"), 1 << 20).unwrap();
        let Some(mut engine) = make(4, &[disk.fd()]) else {
            return;
        };
        assert_eq!(engine.queue_depth(), 4);

        let refused = [
            (DiskId(1), 0, BLOCK as u32, "no such disk"),
            (DiskId(0), 0, 0, "zero-length"),
            (DiskId(0), 0, 2 * BLOCK as u32, "exceeds the buffer"),
        ];
        for (disk, offset, len, reason) in refused {
            let buf = AlignedBuf::zeroed(BLOCK);
            let address = buf.as_ptr();
            let (err, back) = engine.submit_read(disk, buf, offset, len, 0).unwrap_err();
            assert_eq!(back.as_ptr(), address);
            assert!(err.to_string().contains(reason), "{err}");
        }
        let err = engine.submit_fsync(DiskId(9), 0).unwrap_err();
        assert!(matches!(
            err,
            IoError::InvalidRequest {
                op: IoOp::Fsync,
                ..
            }
        ));
        assert_eq!(engine.in_flight(), 0);

        for tag in 0..4 {
            let buf = AlignedBuf::zeroed(BLOCK);
            engine
                .submit_read(DiskId(0), buf, tag * BLOCK as u64, BLOCK as u32, tag)
                .map_err(|(err, _)| err)
                .unwrap();
        }
        let buf = AlignedBuf::zeroed(BLOCK);
        let address = buf.as_ptr();
        let (err, back) = engine
            .submit_write(DiskId(0), buf, 0, BLOCK as u32, 9)
            .unwrap_err();
        assert!(
            matches!(err, IoError::QueueFull { queue_depth: 4 }),
            "{err}"
        );
        assert_eq!(back.as_ptr(), address);
        assert!(matches!(
            engine.submit_fsync(DiskId(0), 9),
            Err(IoError::QueueFull { .. })
        ));

        // Reaping one frees one slot.
        let mut out = Vec::with_capacity(4);
        engine.wait(1, &mut out).unwrap();
        assert!(!out.is_empty());
        engine
            .submit_write(DiskId(0), back, 0, BLOCK as u32, 9)
            .map_err(|(err, _)| err)
            .unwrap();
        let rest = wait_all(&mut engine);
        assert_eq!(out.len() + rest.len(), 5);
        assert!(out
            .iter()
            .chain(&rest)
            .all(|c| c.result.is_ok() && c.buf.is_some()));
    }

    /// A request the kernel fails completes with the operation and errno, and with its
    /// buffer.
    pub fn kernel_errors_complete_with_the_buffer<E: BlockEngine<AlignedBuf>>(
        make: impl Fn(usize, &[RawFd]) -> Option<E>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src.img");
        std::fs::write(&path, vec![3u8; 4 * BLOCK]).unwrap();
        let source = Disk::open_source(&path).unwrap();
        let Some(mut engine) = make(4, &[source.fd()]) else {
            return;
        };
        let buf = AlignedBuf::zeroed(BLOCK);
        let address = buf.as_ptr();
        engine
            .submit_write(DiskId(0), buf, BLOCK as u64, BLOCK as u32, 42)
            .map_err(|(err, _)| err)
            .unwrap();
        let mut done = wait_all(&mut engine);
        let completion = done.pop().unwrap();
        assert_eq!(completion.tag, 42);
        assert_eq!(completion.buf.unwrap().as_ptr(), address);
        let err = completion.result.unwrap_err();
        assert!(
            matches!(
                err,
                IoError::Request {
                    op: IoOp::Write,
                    offset: 4096,
                    len: 4096,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert!(err.to_string().contains("EBADF"), "{err}");
        // The source was not modified.
        assert_eq!(std::fs::read(&path).unwrap(), vec![3u8; 4 * BLOCK]);
    }

    /// Whether the file system holding `path` refuses a misaligned O_DIRECT read (tmpfs,
    /// for one, does not, and then there is nothing to test).
    fn enforces_direct_alignment(path: &std::path::Path) -> bool {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap();
        let mut probe = Misaligned::new(BLOCK);
        // SAFETY: `probe` owns BLOCK writable bytes at its (misaligned) address for the
        // duration of this call.
        let probed = unsafe {
            libc::pread(
                file.as_raw_fd(),
                IoBuffer::as_mut_ptr(&mut probe).cast(),
                BLOCK,
                0,
            )
        };
        probed < 0
    }

    /// On a file system that enforces O_DIRECT alignment, a misaligned buffer fails with
    /// EINVAL (and a hint), while the same request with an aligned buffer succeeds.
    pub fn misaligned_direct_io_fails_cleanly<E, M>(
        make_misaligned: impl Fn(usize, &[RawFd]) -> Option<M>,
        make_aligned: impl Fn(usize, &[RawFd]) -> Option<E>,
    ) where
        E: BlockEngine<AlignedBuf>,
        M: BlockEngine<Misaligned>,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src.img");
        std::fs::write(&path, vec![9u8; 4 * BLOCK]).unwrap();
        let disk = Disk::open_source(&path).unwrap();
        if !disk.is_direct() {
            ferry_io::require::skip(
                ferry_io::require::Feature::Direct,
                format!("{} does not support O_DIRECT", dir.path().display()),
            );
            return;
        }
        if !enforces_direct_alignment(&path) {
            ferry_io::require::skip(
                ferry_io::require::Feature::Direct,
                format!(
                    "{} does not enforce O_DIRECT alignment",
                    dir.path().display()
                ),
            );
            return;
        }

        let Some(mut engine) = make_misaligned(2, &[disk.fd()]) else {
            return;
        };
        engine
            .submit_read(DiskId(0), Misaligned::new(BLOCK), 0, BLOCK as u32, 1)
            .map_err(|(err, _)| err)
            .unwrap();
        let mut out = Vec::new();
        engine.wait(1, &mut out).unwrap();
        let err = out.pop().unwrap().result.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        assert!(err.to_string().contains("O_DIRECT"), "{err}");

        let Some(mut engine) = make_aligned(2, &[disk.fd()]) else {
            return;
        };
        engine
            .submit_read(DiskId(0), AlignedBuf::zeroed(BLOCK), 0, BLOCK as u32, 1)
            .map_err(|(err, _)| err)
            .unwrap();
        let mut out = Vec::new();
        engine.wait(1, &mut out).unwrap();
        let completion = out.pop().unwrap();
        assert_eq!(completion.result.unwrap(), BLOCK as u32);
        assert!(completion.buf.unwrap().iter().all(|&b| b == 9));
    }
}
