//! Which parts of each changed block changed: a refinement of a [`ChangedBlockBitmap`].
//!
//! The bitmap says *which* blocks a guest wrote; it is the durable, write-intent record
//! (`docs/bitmap-format.md`) and its granularity is the tracking block (64 KiB by
//! default). A 4 KiB guest write marks a whole block, and shipping the whole block
//! makes that write cost 16 times its size through read, wire, staging and apply. So
//! the shim also keeps, in memory only, one 16-bit mask per block naming the
//! *granules* written: [`granule_size`] bytes each (4 KiB for 64 KiB blocks; a
//! sixteenth of larger blocks; the whole block for blocks of 4 KiB or less).
//!
//! The masks never weaken the bitmap's guarantee, because they only ever narrow a set
//! bit and are never trusted without one: a block whose bit is set and whose mask is
//! unknown — recovered after a crash, carried back by an aborted epoch from before the
//! masks, or simply not listed — is read whole. The crash rule stays the bitmap's.
//!
//! At each freeze the shim writes the frozen blocks' masks next to the frozen bitmap
//! (`<disk>.epoch-<id>.gran`), listing only blocks not written whole, and the engine
//! reads just those granules. The file is little-endian:
//!
//! | bytes | field |
//! |-------|-------|
//! | 8     | magic `FRYGRAN1` |
//! | 4     | block size |
//! | 4     | granule size |
//! | 8     | block count |
//! | 8     | entry count *n* |
//! | 8 × n | entries: `block << 16 \| mask`, blocks strictly increasing |
//! | 8     | xxh3-64 of everything before |
//!
//! It lives only as long as its epoch, so it is written plainly, not durably: a shim
//! that dies takes the epoch with it.

use std::io;
use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use crate::bitmap::ChangedBlockBitmap;

/// First bytes of a granule file.
pub const MAGIC: [u8; 8] = *b"FRYGRAN1";
/// Granules per block at most: the width of a mask.
pub const MAX_GRANULES_PER_BLOCK: u32 = 16;
/// Smallest granule: the guest's usual write and the epoch map's unit.
pub const MIN_GRANULE: u32 = 4096;
const HEADER_LEN: usize = 32;

/// The granule size for blocks of `block_size` bytes: 4 KiB, or a sixteenth of blocks
/// larger than 64 KiB, or the block itself when it is 4 KiB or less.
pub const fn granule_size(block_size: u32) -> u32 {
    let sixteenth = block_size / MAX_GRANULES_PER_BLOCK;
    if block_size <= MIN_GRANULE {
        block_size
    } else if sixteenth > MIN_GRANULE {
        sixteenth
    } else {
        MIN_GRANULE
    }
}

/// Why a granule file cannot be used. The engine then reads the blocks whole.
#[derive(Debug, thiserror::Error)]
pub enum GranuleFileError {
    #[error("cannot read {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a granule file of this epoch: {why}")]
    Invalid { path: String, why: &'static str },
}

/// One mask per block; a bit per granule written since the masks were cleared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GranuleMasks {
    block_size: u32,
    granule: u32,
    disk_size: u64,
    masks: Vec<u16>,
}

impl GranuleMasks {
    /// Empty masks for a disk of `disk_size` bytes tracked in `block_size` blocks.
    pub fn new(disk_size: u64, block_size: u32) -> GranuleMasks {
        let block_count = disk_size.div_ceil(u64::from(block_size));
        GranuleMasks {
            block_size,
            granule: granule_size(block_size),
            disk_size,
            masks: vec![0; block_count as usize],
        }
    }

    /// Empty masks of `bitmap`'s geometry.
    pub fn like(bitmap: &ChangedBlockBitmap) -> GranuleMasks {
        GranuleMasks::new(bitmap.disk_size(), bitmap.block_size())
    }

    /// Bytes per granule.
    pub fn granule(&self) -> u32 {
        self.granule
    }

    /// The mask of a block written whole.
    pub fn full(&self) -> u16 {
        let per_block = self.block_size / self.granule;
        (((1u32 << per_block) - 1) & 0xffff) as u16
    }

    /// Memory the masks take (for the status and the docs' sizing).
    pub fn heap_bytes(&self) -> usize {
        self.masks.len() * 2
    }

    /// The mask of `block`; 0 when nothing is known written.
    pub fn get(&self, block: u64) -> u16 {
        self.masks.get(block as usize).copied().unwrap_or(0)
    }

    /// Adds the granules that `offset..offset + len` touches. The caller has checked
    /// the range against the disk.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let bs = u64::from(self.block_size);
        let g = u64::from(self.granule);
        let end = (offset + len).min(self.disk_size);
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let block_end = ((block + 1) * bs).min(end);
            let first = (at - block * bs) / g;
            let last = (block_end - 1 - block * bs) / g;
            let bits = ((1u32 << (last + 1)) - (1u32 << first)) as u16;
            if let Some(m) = self.masks.get_mut(block as usize) {
                *m |= bits;
            }
            at = block_end;
        }
    }

    /// Marks every block set in `bitmap` as written whole (bits whose masks are not
    /// known: recovered after a crash).
    pub fn fill_from(&mut self, bitmap: &ChangedBlockBitmap) {
        let full = self.full();
        for (first, count) in bitmap.iter_runs() {
            for m in &mut self.masks[first as usize..(first + count) as usize] {
                *m = full;
            }
        }
    }

    /// Adds `other`'s granules (an aborted epoch's masks joining the active ones).
    pub fn or_with(&mut self, other: &GranuleMasks) {
        for (m, o) in self.masks.iter_mut().zip(&other.masks) {
            *m |= *o;
        }
    }

    /// Clears every mask, keeping the allocation.
    pub fn clear(&mut self) {
        self.masks.fill(0);
    }

    /// The mask to ship for `block` of a set bit: what is known, or the whole block.
    fn shipped(&self, block: u64) -> u16 {
        match self.get(block) {
            0 => self.full(),
            m => m & self.full(),
        }
    }

    /// The granule file of the blocks set in `bitmap`: blocks not written whole only.
    pub fn encode(&self, bitmap: &ChangedBlockBitmap) -> Vec<u8> {
        let full = self.full();
        let mut out = Vec::with_capacity(HEADER_LEN + 8);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.granule.to_le_bytes());
        out.extend_from_slice(&(self.masks.len() as u64).to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        let mut entries = 0u64;
        for (first, count) in bitmap.iter_runs() {
            for block in first..first + count {
                let mask = self.shipped(block);
                if mask != full {
                    out.extend_from_slice(&((block << 16) | u64::from(mask)).to_le_bytes());
                    entries += 1;
                }
            }
        }
        out[24..32].copy_from_slice(&entries.to_le_bytes());
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Writes [`encode`](Self::encode) to `path`.
    pub fn save(&self, bitmap: &ChangedBlockBitmap, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.encode(bitmap))
    }

    /// Reads the masks of `bitmap`'s blocks from `path`: every set bit gets the whole
    /// block unless the file lists it. The file must describe exactly this geometry,
    /// list only set blocks in increasing order and pass its checksum.
    pub fn load(
        path: &Path,
        bitmap: &ChangedBlockBitmap,
    ) -> Result<GranuleMasks, GranuleFileError> {
        let bytes = std::fs::read(path).map_err(|source| GranuleFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::decode(&bytes, bitmap).map_err(|why| GranuleFileError::Invalid {
            path: path.display().to_string(),
            why,
        })
    }

    /// The parsing half of [`load`](Self::load).
    pub fn decode(bytes: &[u8], bitmap: &ChangedBlockBitmap) -> Result<GranuleMasks, &'static str> {
        let mut masks = GranuleMasks::like(bitmap);
        masks.fill_from(bitmap);
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if bytes.len() < HEADER_LEN + 8 || bytes[..8] != MAGIC {
            return Err("bad magic or too short");
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if xxh3_64(body).to_le_bytes() != sum {
            return Err("checksum mismatch");
        }
        let block_size = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let granule = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if block_size != masks.block_size || granule != masks.granule {
            return Err("block or granule size differs from the frozen bitmap's");
        }
        if word(16) != masks.masks.len() as u64 {
            return Err("block count differs from the frozen bitmap's");
        }
        let entries = word(24);
        if entries.checked_mul(8) != Some((body.len() - HEADER_LEN) as u64) {
            return Err("entry count does not match the length");
        }
        let mut previous = None;
        for i in 0..entries as usize {
            let e = word(HEADER_LEN + 8 * i);
            let (block, mask) = (e >> 16, (e & 0xffff) as u16);
            if previous.is_some_and(|p| block <= p) || !bitmap.test(block).unwrap_or(false) {
                return Err("an entry is out of order or names a block the epoch does not carry");
            }
            if mask == 0 || mask & !masks.full() != 0 {
                return Err("an entry's mask is empty or names granules past its block");
            }
            masks.masks[block as usize] = mask;
            previous = Some(block);
        }
        Ok(masks)
    }

    /// The byte ranges the blocks set in `bitmap` carry, in order, adjacent granules
    /// (within a block and across block ends) merged into one range.
    pub fn ranges<'a>(
        &'a self,
        bitmap: &'a ChangedBlockBitmap,
    ) -> impl Iterator<Item = (u64, u64)> + 'a {
        let bs = u64::from(self.block_size);
        let g = u64::from(self.granule);
        let disk_size = self.disk_size;
        let pieces = bitmap.iter_runs().flat_map(move |(first, count)| {
            (first..first + count).flat_map(move |block| {
                let mask = self.shipped(block);
                MaskRuns { mask, at: 0 }.map(move |(lo, n)| {
                    let start = block * bs + u64::from(lo) * g;
                    let end = (start + u64::from(n) * g).min(disk_size);
                    (start, end - start)
                })
            })
        });
        Coalesce {
            inner: pieces,
            pending: None,
        }
    }
}

/// Runs of set bits of a mask as `(first granule, granules)`.
struct MaskRuns {
    mask: u16,
    at: u32,
}

impl Iterator for MaskRuns {
    type Item = (u32, u32);

    fn next(&mut self) -> Option<(u32, u32)> {
        let rest = u32::from(self.mask) >> self.at;
        if rest == 0 {
            return None;
        }
        let lo = self.at + rest.trailing_zeros();
        let n = (u32::from(self.mask) >> lo).trailing_ones();
        self.at = lo + n;
        Some((lo, n))
    }
}

/// Merges ranges that touch.
struct Coalesce<I> {
    inner: I,
    pending: Option<(u64, u64)>,
}

impl<I: Iterator<Item = (u64, u64)>> Iterator for Coalesce<I> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        loop {
            match (self.inner.next(), self.pending) {
                (None, p) => return self.pending.take().or(p),
                (Some(r), None) => self.pending = Some(r),
                (Some((o, l)), Some((po, pl))) if po + pl == o => self.pending = Some((po, pl + l)),
                (Some(r), Some(p)) => {
                    self.pending = Some(r);
                    return Some(p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GenerationId;

    const KIB: u64 = 1024;

    fn bitmap(disk_size: u64, block_size: u32) -> ChangedBlockBitmap {
        ChangedBlockBitmap::new(disk_size, block_size, GenerationId::from_bytes([7; 16]), 0)
            .unwrap()
    }

    #[test]
    fn granule_sizes_follow_the_block() {
        assert_eq!(granule_size(512), 512);
        assert_eq!(granule_size(4096), 4096);
        assert_eq!(granule_size(16 << 10), 4096);
        assert_eq!(granule_size(64 << 10), 4096);
        assert_eq!(granule_size(1 << 20), 64 << 10);
        assert_eq!(GranuleMasks::new(1 << 20, 64 << 10).full(), 0xffff);
        assert_eq!(GranuleMasks::new(1 << 20, 16 << 10).full(), 0xf);
        assert_eq!(GranuleMasks::new(1 << 20, 4096).full(), 1);
    }

    #[test]
    fn marks_cover_exactly_the_touched_granules() {
        let mut m = GranuleMasks::new(1 << 20, 64 << 10);
        m.mark(4 * KIB, 4 * KIB);
        assert_eq!(m.get(0), 0b10);
        // 512 bytes inside granule 3 of block 1.
        m.mark(64 * KIB + 12 * KIB + 100, 512);
        assert_eq!(m.get(1), 0b1000);
        // Across the end of block 2 into block 3.
        m.mark(3 * 64 * KIB - 8 * KIB, 12 * KIB);
        assert_eq!((m.get(2), m.get(3)), (0xc000, 0b1));
        // A whole block and more.
        m.mark(4 * 64 * KIB, 70 * KIB);
        assert_eq!((m.get(4), m.get(5)), (0xffff, 0b11));
    }

    #[test]
    fn ranges_merge_granules_within_and_across_blocks() {
        let mut b = bitmap(1 << 20, 64 << 10);
        let mut m = GranuleMasks::like(&b);
        for (o, l) in [
            (4 * KIB, 8 * KIB),
            (60 * KIB, 8 * KIB),
            (200 * KIB, 4 * KIB),
        ] {
            b.set_range(o, l).unwrap();
            m.mark(o, l);
        }
        b.set(10).unwrap(); // set without a mask: whole block
        let got: Vec<_> = m.ranges(&b).collect();
        assert_eq!(
            got,
            vec![
                (4 * KIB, 8 * KIB),
                (60 * KIB, 8 * KIB),
                (200 * KIB, 4 * KIB),
                (640 * KIB, 64 * KIB)
            ]
        );
    }

    #[test]
    fn the_disk_tail_is_cut_at_the_disk_end() {
        let size = 64 * KIB + 6 * KIB;
        let mut b = bitmap(size, 64 << 10);
        let mut m = GranuleMasks::like(&b);
        b.set_range(64 * KIB + 5 * KIB, KIB).unwrap();
        m.mark(64 * KIB + 5 * KIB, KIB);
        assert_eq!(m.ranges(&b).collect::<Vec<_>>(), vec![(68 * KIB, 2 * KIB)]);
    }

    #[test]
    fn files_round_trip_and_list_only_partial_blocks() {
        let mut b = bitmap(4 << 20, 64 << 10);
        let mut m = GranuleMasks::like(&b);
        for (o, l) in [(0, 64 * KIB), (70 * KIB, 4 * KIB), (1 << 20, 8 * KIB)] {
            b.set_range(o, l).unwrap();
            m.mark(o, l);
        }
        b.set(40).unwrap();
        let bytes = m.encode(&b);
        assert_eq!(bytes.len(), HEADER_LEN + 2 * 8 + 8);
        let back = GranuleMasks::decode(&bytes, &b).unwrap();
        assert_eq!(back.get(0), 0xffff);
        assert_eq!(back.get(1), m.get(1));
        assert_eq!(back.get(16), 0b11);
        assert_eq!(back.get(40), 0xffff);
        assert_eq!(
            back.ranges(&b).collect::<Vec<_>>(),
            m.ranges(&b).collect::<Vec<_>>()
        );
    }

    #[test]
    fn damaged_or_foreign_files_are_refused() {
        let mut b = bitmap(4 << 20, 64 << 10);
        let mut m = GranuleMasks::like(&b);
        b.set_range(70 * KIB, 4 * KIB).unwrap();
        m.mark(70 * KIB, 4 * KIB);
        let good = m.encode(&b);
        let mut flipped = good.clone();
        flipped[HEADER_LEN] ^= 1;
        assert_eq!(GranuleMasks::decode(&flipped, &b), Err("checksum mismatch"));
        assert!(GranuleMasks::decode(&good[..20], &b).is_err());
        // The same file against an epoch that does not carry its block.
        let other = bitmap(4 << 20, 64 << 10);
        assert!(GranuleMasks::decode(&good, &other).is_err());
        // Another geometry.
        let small = bitmap(2 << 20, 64 << 10);
        assert!(GranuleMasks::decode(&good, &small).is_err());
    }
}
