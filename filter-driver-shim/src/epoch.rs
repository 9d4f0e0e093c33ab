//! Frozen epochs: a point-in-time view of a disk while the guest keeps writing.
//!
//! When the engine freezes an epoch, the shim swaps the disk's bitmap (the frozen bits
//! name the blocks the epoch must carry) and from then on preserves, before the first
//! write to a covered block, the frozen content of the part it overwrites in a
//! scratch file (copy-before-write). Preservation works in [`GRANULE`]s of 4 KiB, not
//! whole tracking blocks, so a 4 KiB guest write into a frozen 64 KiB block copies
//! 4 KiB, not 64. The engine reads the blocks straight from the image and *settles*
//! each read against a per-granule state map the two processes share through a
//! memory-mapped file (one byte per granule; pages exist only where touched):
//!
//! | state       | set by | meaning |
//! |-------------|--------|---------|
//! | `UNTOUCHED` | —      | nobody has written the granule since the freeze, the engine has not finished with it |
//! | `COPYING`   | shim   | a writer is copying the frozen granule to scratch; its write waits |
//! | `PRESERVED` | shim   | scratch holds the frozen granule; the image may hold newer bytes |
//! | `PASSED`    | engine | the engine has read the granule for the last time; writes need no copy |
//!
//! The argument for "no write after the freeze leaks into the epoch": a writer moves
//! a granule `UNTOUCHED → COPYING`, copies it, stores `PRESERVED` and only then writes
//! the image. The engine reads the image *first* and loads the state *after*. If its read
//! saw any byte of a post-freeze write, that write began after `PRESERVED` was stored,
//! so the load sees `PRESERVED` and the engine takes the scratch copy instead (which
//! was complete before the store). If the load sees `UNTOUCHED` or `COPYING`, no write
//! to the block had begun when the read ended, so the read is the frozen content.
//! `PASSED` is an optimisation: once the engine is done with a block, writers skip the
//! copy, so scratch holds only blocks written *ahead of* the engine.
//!
//! Holes need one more rule: while an epoch is frozen the shim never deallocates
//! (TRIM is a no-op, zeroing writes zeros), so a range the engine finds to be a hole
//! was a hole at the freeze.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};

use crate::backing::Backing;
use crate::bitmap::ChangedBlockBitmap;

pub const UNTOUCHED: u8 = 0;
pub const COPYING: u8 = 1;
pub const PRESERVED: u8 = 2;
pub const PASSED: u8 = 3;

/// Unit of copy-before-write and of the state map: 4 KiB, the guest's usual write.
pub const GRANULE: u64 = 4096;

/// State-map cells of a disk of `disk_size` bytes.
pub fn granules(disk_size: u64) -> u64 {
    disk_size.div_ceil(GRANULE)
}

/// The per-block state map, one byte per tracking block, shared between the shim and
/// the engine through a `MAP_SHARED` mapping of a sparse file.
pub struct EpochMap {
    base: NonNull<AtomicU8>,
    blocks: u64,
    mapped_len: usize,
}

// SAFETY: the mapping is only accessed through `&AtomicU8`, which is Sync; the pointer
// stays valid until Drop unmaps it, and nothing else unmaps it.
unsafe impl Send for EpochMap {}
// SAFETY: as above: every access is an atomic operation on the shared bytes.
unsafe impl Sync for EpochMap {}

impl std::fmt::Debug for EpochMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochMap")
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

impl EpochMap {
    /// Creates a new, all-`UNTOUCHED` map file for `blocks` blocks (fails if it exists).
    pub fn create(path: &Path, blocks: u64) -> io::Result<EpochMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(blocks.max(1))?;
        Self::map(&file, blocks)
    }

    /// Maps an existing map file created by the shim for `blocks` blocks.
    pub fn open(path: &Path, blocks: u64) -> io::Result<EpochMap> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len < blocks.max(1) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "epoch map {} holds {len} blocks, the disk has {blocks}",
                    path.display()
                ),
            ));
        }
        Self::map(&file, blocks)
    }

    fn map(file: &File, blocks: u64) -> io::Result<EpochMap> {
        let mapped_len = usize::try_from(blocks.max(1))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "epoch map too large"))?;
        // SAFETY: a fresh shared read-write mapping of `mapped_len` bytes of a file we
        // hold open and that is at least that long; the kernel picks the address. The
        // descriptor may be closed afterwards: the mapping keeps the file alive.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(EpochMap {
            base: NonNull::new(ptr.cast::<AtomicU8>()).expect("mmap never returns null"),
            blocks,
            mapped_len,
        })
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The state cell of `block`.
    ///
    /// # Panics
    /// If `block` is past the end of the disk.
    pub fn cell(&self, block: u64) -> &AtomicU8 {
        assert!(block < self.blocks, "block {block} past {}", self.blocks);
        // SAFETY: `block < blocks <= mapped_len`, so the byte is inside the live
        // mapping; AtomicU8 has the size and alignment of u8, and every process
        // touches these bytes only atomically.
        unsafe { &*self.base.as_ptr().add(block as usize) }
    }
}

impl Drop for EpochMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it
        // outlives `self` (cells borrow `self`).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.mapped_len);
        }
    }
}

/// Paths of one disk's epoch files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochFiles {
    /// The frozen bits, in the bitmap file format.
    pub bitmap: PathBuf,
    /// The shared state map.
    pub map: PathBuf,
    /// Frozen copies of blocks written after the freeze, at their own offsets.
    pub scratch: PathBuf,
}

impl EpochFiles {
    /// `<dir>/<disk>.epoch-<id>.{cbt,map,scratch}`.
    pub fn new(dir: &Path, disk: &str, id: u64) -> EpochFiles {
        let stem = format!("{disk}.epoch-{id:016x}");
        EpochFiles {
            bitmap: dir.join(format!("{stem}.cbt")),
            map: dir.join(format!("{stem}.map")),
            scratch: dir.join(format!("{stem}.scratch")),
        }
    }

    /// Whether `file_name` is one of `disk`'s epoch files (of any epoch).
    pub fn is_epoch_file(disk: &str, file_name: &str) -> bool {
        file_name
            .strip_prefix(disk)
            .and_then(|rest| rest.strip_prefix(".epoch-"))
            .is_some_and(|rest| {
                rest.ends_with(".cbt") || rest.ends_with(".map") || rest.ends_with(".scratch")
            })
    }

    pub fn remove(&self) {
        for p in [&self.bitmap, &self.map, &self.scratch] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The shim's side of one disk's frozen epoch.
#[derive(Debug)]
pub struct FrozenDisk {
    /// Blocks the epoch carries.
    pub bits: ChangedBlockBitmap,
    /// Every block is preserved on first write (a seeded or full sync reads the whole
    /// disk), not only those in `bits`.
    pub whole_disk: bool,
    pub files: EpochFiles,
    map: EpochMap,
    scratch: File,
    block_size: u64,
    disk_size: u64,
    /// A copy failed: the epoch can no longer be read consistently. Writes go on
    /// without copying and the engine's `check` refuses the epoch.
    broken: AtomicBool,
    copies: AtomicU64,
}

thread_local! {
    /// One block's worth of copy buffer per writer thread, grown once.
    static COPY_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl FrozenDisk {
    /// Creates the map and scratch files (not the bitmap file, written once the
    /// guest runs again). Called before the freeze pause.
    pub fn prepare(
        files: EpochFiles,
        bits_template: &ChangedBlockBitmap,
        whole_disk: bool,
    ) -> io::Result<FrozenDisk> {
        let map = EpochMap::create(&files.map, granules(bits_template.disk_size()))?;
        let scratch = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&files.scratch)?;
        scratch.set_len(bits_template.disk_size())?;
        Ok(FrozenDisk {
            bits: bits_template.clone(),
            whole_disk,
            files,
            map,
            scratch,
            block_size: u64::from(bits_template.block_size()),
            disk_size: bits_template.disk_size(),
            broken: AtomicBool::new(false),
            copies: AtomicU64::new(0),
        })
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Granules copied to scratch so far.
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::Relaxed)
    }

    fn covers(&self, block: u64) -> bool {
        self.whole_disk || self.bits.test(block).unwrap_or(false)
    }

    /// Call before writing (or zeroing) `offset..offset + len` of the image: preserves
    /// the frozen content of every covered block in that range the engine may still
    /// read. Never fails the guest's write: a copy that fails breaks the epoch instead.
    pub fn preserve(&self, backing: &Backing, offset: u64, len: u64) {
        if len == 0 || self.is_broken() {
            return;
        }
        let first = offset / GRANULE;
        let last = (offset + len - 1) / GRANULE;
        for granule in first..=last.min(self.map.blocks().saturating_sub(1)) {
            if !self.covers(granule * GRANULE / self.block_size) {
                continue;
            }
            let cell = self.map.cell(granule);
            let mut spins = 0u32;
            loop {
                match cell.load(Ordering::Acquire) {
                    UNTOUCHED => {
                        if cell
                            .compare_exchange(
                                UNTOUCHED,
                                COPYING,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            )
                            .is_err()
                        {
                            continue;
                        }
                        match self.copy_granule(backing, granule) {
                            Ok(()) => {
                                self.copies.fetch_add(1, Ordering::Relaxed);
                                cell.store(PRESERVED, Ordering::Release);
                                // Order the store before the image write that follows
                                // (a system call the engine observes only through the
                                // file's bytes).
                                fence(Ordering::SeqCst);
                            }
                            Err(e) => {
                                tracing::error!(
                                    offset = granule * GRANULE, error = %e,
                                    "copy-before-write failed: the frozen epoch is broken and will be refused"
                                );
                                self.broken.store(true, Ordering::Release);
                                cell.store(UNTOUCHED, Ordering::Release);
                                return;
                            }
                        }
                        break;
                    }
                    COPYING => {
                        // Another writer is copying this block; our write must wait
                        // until the frozen bytes are safe. Copies take microseconds.
                        spins += 1;
                        if spins < 64 {
                            std::hint::spin_loop();
                        } else {
                            std::thread::sleep(std::time::Duration::from_micros(20));
                        }
                        if self.is_broken() {
                            return;
                        }
                    }
                    _ => break,
                }
            }
        }
    }

    fn copy_granule(&self, backing: &Backing, granule: u64) -> io::Result<()> {
        let at = granule * GRANULE;
        let len = GRANULE.min(self.disk_size - at) as usize;
        COPY_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < len {
                buf.resize(GRANULE as usize, 0);
            }
            backing.read_at(&mut buf[..len], at)?;
            self.scratch.write_all_at(&buf[..len], at)
        })
    }
}

/// The engine's side of one disk's frozen epoch: settles reads of the image.
#[derive(Debug)]
pub struct EpochView {
    map: EpochMap,
    scratch: File,
    disk_size: u64,
}

impl EpochView {
    /// Opens the map and scratch files the shim named in its freeze reply.
    pub fn open(map: &Path, scratch: &Path, disk_size: u64) -> io::Result<EpochView> {
        Ok(EpochView {
            map: EpochMap::open(map, granules(disk_size))?,
            scratch: File::open(scratch)?,
            disk_size,
        })
    }

    /// Call after reading `buf` from the image at `offset`: replaces each granule
    /// written since the freeze with its frozen copy. With `last_read`, the granules
    /// read cleanly are marked `PASSED` so writers stop copying them — only for the
    /// final read in this epoch (a seeded sync reads blocks twice) and only when the
    /// read covered the whole granule. Returns how many granules came from scratch.
    pub fn settle(&self, offset: u64, buf: &mut [u8], last_read: bool) -> io::Result<u64> {
        // The read has completed; every state load below must come after it.
        fence(Ordering::SeqCst);
        let mut replaced = 0;
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            if pos >= self.disk_size {
                break;
            }
            let granule = pos / GRANULE;
            let granule_end = ((granule + 1) * GRANULE).min(self.disk_size);
            let n = ((granule_end - pos) as usize).min(buf.len() - at);
            let whole = pos == granule * GRANULE && pos + n as u64 == granule_end;
            let cell = self.map.cell(granule);
            match cell.load(Ordering::Acquire) {
                PRESERVED => {
                    self.scratch.read_exact_at(&mut buf[at..at + n], pos)?;
                    replaced += 1;
                }
                UNTOUCHED if last_read && whole => {
                    // Losing the race to a writer is fine: the read above was clean.
                    let _ = cell.compare_exchange(
                        UNTOUCHED,
                        PASSED,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                }
                _ => {}
            }
            at += n;
        }
        Ok(replaced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::GenerationId;

    const BS: u64 = 4096;

    fn setup(dir: &Path, blocks: u64, whole: bool) -> (Backing, FrozenDisk, EpochView) {
        let image = dir.join("img");
        let content: Vec<u8> = (0..blocks * BS).map(|i| (i / BS) as u8).collect();
        std::fs::write(&image, &content).unwrap();
        let backing = Backing::open(&image).unwrap();
        let mut bits =
            ChangedBlockBitmap::new(blocks * BS, BS as u32, GenerationId::from_bytes([1; 16]), 0)
                .unwrap();
        bits.set(1).unwrap();
        bits.set(2).unwrap();
        let files = EpochFiles::new(dir, "d", 7);
        let frozen = FrozenDisk::prepare(files.clone(), &bits, whole).unwrap();
        let view = EpochView::open(&files.map, &files.scratch, blocks * BS).unwrap();
        (backing, frozen, view)
    }

    #[test]
    fn writes_after_the_freeze_do_not_leak() {
        let dir = tempfile::tempdir().unwrap();
        let (backing, frozen, view) = setup(dir.path(), 4, false);
        // The guest overwrites blocks 1 (covered) and 3 (not covered).
        frozen.preserve(&backing, BS, 10);
        backing.write_at(&[0xee; 10], BS).unwrap();
        frozen.preserve(&backing, 3 * BS, 1);
        backing.write_at(&[0xee], 3 * BS).unwrap();
        assert_eq!(frozen.copies(), 1, "only the covered block is copied");

        let mut buf = vec![0u8; (3 * BS) as usize];
        backing.read_at(&mut buf, BS).unwrap();
        assert_eq!(view.settle(BS, &mut buf, true).unwrap(), 1);
        assert!(buf[..BS as usize].iter().all(|&b| b == 1), "frozen block 1");
        assert!(buf[BS as usize..2 * BS as usize].iter().all(|&b| b == 2));
        // Block 2 was passed: a later write copies nothing.
        frozen.preserve(&backing, 2 * BS, BS);
        assert_eq!(frozen.copies(), 1);
        assert_eq!(view.map.cell(2).load(Ordering::Relaxed), PASSED);
    }

    #[test]
    fn whole_disk_epochs_cover_every_block_and_a_first_pass_does_not_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (backing, frozen, view) = setup(dir.path(), 4, true);
        let mut buf = vec![0u8; (4 * BS) as usize];
        backing.read_at(&mut buf, 0).unwrap();
        view.settle(0, &mut buf, false).unwrap();
        frozen.preserve(&backing, 3 * BS, 1);
        backing.write_at(&[0xee], 3 * BS).unwrap();
        backing.read_at(&mut buf, 0).unwrap();
        assert_eq!(view.settle(0, &mut buf, true).unwrap(), 1);
        assert_eq!(buf[3 * BS as usize], 3, "second read sees the frozen block");
    }

    #[test]
    fn concurrent_writers_and_reader_never_see_new_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = 64;
        let (backing, frozen, view) = setup(dir.path(), blocks, true);
        let backing = std::sync::Arc::new(backing);
        let frozen = std::sync::Arc::new(frozen);
        let writers: Vec<_> = (0..3)
            .map(|t| {
                let backing = backing.clone();
                let frozen = frozen.clone();
                std::thread::spawn(move || {
                    for i in 0..400u64 {
                        let block = (i * 7 + t * 13) % blocks;
                        let off = block * BS + (i % 8) * 512;
                        frozen.preserve(&backing, off, 512);
                        backing.write_at(&[0xee; 512], off).unwrap();
                    }
                })
            })
            .collect();
        let mut buf = vec![0u8; BS as usize];
        for round in 0..3 {
            for block in 0..blocks {
                backing.read_at(&mut buf, block * BS).unwrap();
                view.settle(block * BS, &mut buf, round == 2).unwrap();
                assert!(
                    buf.iter().all(|&b| b == block as u8),
                    "block {block} leaked a post-freeze write"
                );
            }
        }
        for w in writers {
            w.join().unwrap();
        }
    }

    #[test]
    fn a_small_write_into_a_large_block_copies_one_granule() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 64 << 10;
        let image = dir.path().join("img");
        let content: Vec<u8> = (0..2 * bs).map(|i| (i / GRANULE) as u8).collect();
        std::fs::write(&image, &content).unwrap();
        let backing = Backing::open(&image).unwrap();
        let mut bits =
            ChangedBlockBitmap::new(2 * bs, bs as u32, GenerationId::from_bytes([1; 16]), 0)
                .unwrap();
        bits.set(1).unwrap();
        let files = EpochFiles::new(dir.path(), "d", 1);
        let frozen = FrozenDisk::prepare(files.clone(), &bits, false).unwrap();
        let view = EpochView::open(&files.map, &files.scratch, 2 * bs).unwrap();
        // 4 KiB straddling granules 17 and 18 of block 1, then one inside block 0.
        frozen.preserve(&backing, bs + GRANULE + 100, GRANULE);
        backing
            .write_at(&[0xee; GRANULE as usize], bs + GRANULE + 100)
            .unwrap();
        frozen.preserve(&backing, 0, 10);
        backing.write_at(&[0xee; 10], 0).unwrap();
        assert_eq!(frozen.copies(), 2, "two granules of the covered block");
        let mut buf = vec![0u8; bs as usize];
        backing.read_at(&mut buf, bs).unwrap();
        assert_eq!(view.settle(bs, &mut buf, true).unwrap(), 2);
        assert_eq!(buf, content[bs as usize..], "the frozen block, whole");
    }
}
