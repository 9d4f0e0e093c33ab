//! Frozen epochs as both sides see them: a point-in-time view of a disk while the guest
//! keeps writing.
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
//!
//! This module holds what the shim and the engine share: the state map ([`EpochMap`],
//! the cell states, [`GRANULE`]), the names of an epoch's files ([`EpochFiles`]) and
//! the engine's reader ([`EpochView`]). The shim's copy-before-write (`FrozenDisk`)
//! needs the backing store and stays in the shim.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU8, Ordering};

/// Nobody has written the granule since the freeze, the engine has not finished with it.
pub const UNTOUCHED: u8 = 0;
/// A writer (the shim) is copying the frozen granule to scratch; its write waits.
pub const COPYING: u8 = 1;
/// Scratch holds the frozen granule; the image may hold newer bytes.
pub const PRESERVED: u8 = 2;
/// The engine has read the granule for the last time; writes need no copy.
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
    /// Which granules of the frozen blocks were written ([`crate::granules`]).
    pub granules: PathBuf,
}

impl EpochFiles {
    /// `<dir>/<disk>.epoch-<id>.{cbt,map,scratch,gran}`.
    pub fn new(dir: &Path, disk: &str, id: u64) -> EpochFiles {
        let stem = format!("{disk}.epoch-{id:016x}");
        EpochFiles {
            bitmap: dir.join(format!("{stem}.cbt")),
            map: dir.join(format!("{stem}.map")),
            scratch: dir.join(format!("{stem}.scratch")),
            granules: dir.join(format!("{stem}.gran")),
        }
    }

    /// Whether `file_name` is one of `disk`'s epoch files (of any epoch).
    pub fn is_epoch_file(disk: &str, file_name: &str) -> bool {
        file_name
            .strip_prefix(disk)
            .and_then(|rest| rest.strip_prefix(".epoch-"))
            .is_some_and(|rest| {
                [".cbt", ".map", ".scratch", ".gran"]
                    .iter()
                    .any(|suffix| rest.ends_with(suffix))
            })
    }

    pub fn remove(&self) {
        for p in [&self.bitmap, &self.map, &self.scratch, &self.granules] {
            let _ = std::fs::remove_file(p);
        }
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
    /// The shared state map (tests look at single cells).
    pub fn map(&self) -> &EpochMap {
        &self.map
    }

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
