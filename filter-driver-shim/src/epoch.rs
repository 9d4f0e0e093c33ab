//! The shim's side of a frozen epoch: copy-before-write.
//!
//! The state map it shares with the engine, the cell states and the argument for why
//! no write after the freeze leaks into the epoch are in
//! [`filter_driver_shim_contract::epoch`]. Here the shim moves a granule
//! `UNTOUCHED → COPYING`, copies it from the backing store to scratch, stores
//! `PRESERVED` and only then lets the guest's write reach the image.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

use filter_driver_shim_contract::bitmap::ChangedBlockBitmap;
use filter_driver_shim_contract::epoch::{
    granules, EpochFiles, EpochMap, COPYING, GRANULE, PRESERVED, UNTOUCHED,
};
use filter_driver_shim_contract::granules::GranuleMasks;

use crate::backing::Backing;

/// The shim's side of one disk's frozen epoch.
#[derive(Debug)]
pub struct FrozenDisk {
    /// Blocks the epoch carries.
    pub bits: ChangedBlockBitmap,
    /// Which granules of `bits`' blocks the epoch carries (0: the whole block).
    pub masks: GranuleMasks,
    /// Every block is preserved on first write (a seeded or full sync reads the whole
    /// disk), not only those in `bits`.
    pub whole_disk: bool,
    /// The engine reads only the granules in `masks`, so only those are preserved.
    pub granular: bool,
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
        granular: bool,
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
            masks: GranuleMasks::like(bits_template),
            whole_disk,
            granular,
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

    /// Whether the engine may read `granule` of the image in this epoch.
    fn covers(&self, granule: u64) -> bool {
        if self.whole_disk {
            return true;
        }
        let block = granule * GRANULE / self.block_size;
        if !self.bits.test(block).unwrap_or(false) {
            return false;
        }
        if !self.granular {
            return true;
        }
        // The engine reads the mask's granules, or the whole block when it is 0.
        let unit = u64::from(self.masks.granule());
        let bit = (granule * GRANULE - block * self.block_size) / unit;
        let mask = self.masks.get(block);
        mask == 0 || mask & (1 << bit) != 0
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
            if !self.covers(granule) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use filter_driver_shim_contract::bitmap::GenerationId;
    use filter_driver_shim_contract::epoch::{EpochView, PASSED};
    use std::path::Path;

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
        let frozen = FrozenDisk::prepare(files.clone(), &bits, whole, false).unwrap();
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
        assert_eq!(view.map().cell(2).load(Ordering::Relaxed), PASSED);
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

    /// Two 64 KiB blocks, each granule filled with its number; the frozen bits of
    /// `blocks`.
    fn two_large_blocks(dir: &Path, blocks: &[u64]) -> (Backing, Vec<u8>, ChangedBlockBitmap) {
        let bs = 64 << 10;
        let image = dir.join("img");
        let content: Vec<u8> = (0..2 * bs).map(|i| (i / GRANULE) as u8).collect();
        std::fs::write(&image, &content).unwrap();
        let mut bits =
            ChangedBlockBitmap::new(2 * bs, bs as u32, GenerationId::from_bytes([1; 16]), 0)
                .unwrap();
        for &b in blocks {
            bits.set(b).unwrap();
        }
        (Backing::open(&image).unwrap(), content, bits)
    }

    #[test]
    fn a_small_write_into_a_large_block_copies_one_granule() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 64 << 10;
        let (backing, content, bits) = two_large_blocks(dir.path(), &[1]);
        let files = EpochFiles::new(dir.path(), "d", 1);
        let frozen = FrozenDisk::prepare(files.clone(), &bits, false, false).unwrap();
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

    #[test]
    fn a_granular_epoch_preserves_only_the_granules_it_carries() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 64 << 10;
        let (backing, _, bits) = two_large_blocks(dir.path(), &[0, 1]);
        let files = EpochFiles::new(dir.path(), "d", 1);
        let mut frozen = FrozenDisk::prepare(files.clone(), &bits, false, true).unwrap();
        frozen.masks.mark(2 * GRANULE, GRANULE); // block 0 carries granule 2 only
                                                 // Block 1 has no mask: the engine reads it whole, so it is preserved whole.
        for granule in [0, 2, 5, 16 + 3] {
            frozen.preserve(&backing, granule * GRANULE, GRANULE);
            backing
                .write_at(&[0xee; GRANULE as usize], granule * GRANULE)
                .unwrap();
        }
        assert_eq!(
            frozen.copies(),
            2,
            "granule 2 of block 0 and granule 3 of block 1"
        );
        let cell = |g: u64| frozen.map.cell(g).load(Ordering::Relaxed);
        assert_eq!(
            (cell(0), cell(2), cell(5), cell(19)),
            (UNTOUCHED, PRESERVED, UNTOUCHED, PRESERVED)
        );
        // What the engine reads of the carried granules is the frozen content.
        let mut buf = vec![0u8; GRANULE as usize];
        backing.read_at(&mut buf, 2 * GRANULE).unwrap();
        view_settle(&files, 2 * bs, 2 * GRANULE, &mut buf);
        assert!(buf.iter().all(|&b| b == 2));
    }

    fn view_settle(files: &EpochFiles, size: u64, offset: u64, buf: &mut [u8]) {
        let view = EpochView::open(&files.map, &files.scratch, size).unwrap();
        view.settle(offset, buf, true).unwrap();
    }
}
