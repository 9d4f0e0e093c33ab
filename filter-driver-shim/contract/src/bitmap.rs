//! The persistent changed-block bitmap: one bit per block of a protected disk.
//!
//! The shim sets a bit for every block the guest writes; the engine reads exactly the
//! set blocks of a frozen epoch and ships them. A bit that is lost is a block that
//! silently diverges on the replica, so this module never ignores an out-of-range
//! block and never accepts a file whose checksums do not match.
//!
//! The on-disk format is specified byte by byte in `docs/bitmap-format.md`. In short:
//! a 4 KiB header page followed by 4 KiB bit pages, each of which carries its own
//! xxh3-64 checksum so that the shim can later rewrite single pages in place. A file
//! written whole by [`ChangedBlockBitmap::save`] is *sealed*: any bad checksum in it is
//! corruption and is an error. A file marked *live* is one whose pages were being
//! rewritten in place; after a crash one of its pages may be torn, and
//! [`ChangedBlockBitmap::from_bytes_recovering`] turns such a page into "every block
//! it covers is dirty" — a bounded superset, never a gap — and reports it.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

pub use crate::generation::GenerationId;

/// First eight bytes of every bitmap file.
pub const MAGIC: [u8; 8] = *b"FERRYCBT";
/// The format version this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the header that carry meaning (the rest of the header page is zero).
pub const HEADER_LEN: usize = 128;
/// Size of the header page and of every bit page. 4 KiB is the unit that storage
/// writes most nearly atomically and the unit the shim will rewrite in place.
pub const PAGE_SIZE: usize = 4096;
/// Each bit page starts with its xxh3-64 checksum.
pub const PAGE_CHECKSUM_BYTES: usize = 8;
/// Bytes of bits in one page.
pub const PAGE_PAYLOAD_BYTES: usize = PAGE_SIZE - PAGE_CHECKSUM_BYTES;
/// Little-endian 64-bit words of bits in one page.
pub const WORDS_PER_PAGE: usize = PAGE_PAYLOAD_BYTES / WORD_BYTES;
/// Blocks tracked by one page: 32 704, i.e. about 2 GiB of disk at 64 KiB blocks.
/// This is also the most a torn page can add to a resync.
pub const BLOCKS_PER_PAGE: u64 = (WORDS_PER_PAGE * WORD_BITS as usize) as u64;
/// Smallest block size: one sector.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size. Beyond this a single dirty byte would resend a gigabyte.
pub const MAX_BLOCK_SIZE: u32 = 1 << 30;

/// Header flag: the file is open for in-place page updates. After a crash one page
/// may be torn; such a page is recoverable (as all-dirty) only when this flag is set.
pub const FLAG_LIVE: u32 = 1 << 0;
/// Every flag this version understands. A file with any other bit set was written by
/// a newer ferry whose semantics we cannot honour, so it is rejected.
pub const KNOWN_FLAGS: u32 = FLAG_LIVE;

const WORD_BYTES: usize = 8;
const WORD_BITS: u64 = 64;

// Header field offsets; see docs/bitmap-format.md.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_PAGE_SIZE: usize = 16;
const OFF_BLOCK_SIZE: usize = 20;
const OFF_DISK_SIZE: usize = 24;
const OFF_BLOCK_COUNT: usize = 32;
const OFF_PAGE_COUNT: usize = 40;
const OFF_GENERATION: usize = 48;
const OFF_EPOCH: usize = 64;
const OFF_FLAGS: usize = 72;
const OFF_RESERVED: usize = 76;
const OFF_HEADER_CHECKSUM: usize = 120;

const _: () = assert!(WORDS_PER_PAGE * WORD_BYTES == PAGE_PAYLOAD_BYTES);
const _: () = assert!(OFF_HEADER_CHECKSUM + 8 == HEADER_LEN);
const _: () = assert!(HEADER_LEN <= PAGE_SIZE);
const _: () = assert!(OFF_RESERVED == OFF_FLAGS + 4);
const _: () = assert!(MIN_BLOCK_SIZE.is_power_of_two() && MAX_BLOCK_SIZE.is_power_of_two());

/// How a bitmap file was written, recorded in the header's [`FLAG_LIVE`] bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileState {
    /// Written whole and renamed into place; every page must verify.
    Sealed,
    /// Open for in-place page updates; after a crash a page may be torn.
    Live,
}

/// What [`ChangedBlockBitmap::from_bytes_recovering`] found and repaired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The state recorded in the file's header.
    pub state: FileState,
    /// Pages whose checksum failed in a live file. Every block they cover has been
    /// marked dirty. Non-empty means a crash tore a page; report it.
    pub torn_pages: Vec<u64>,
}

/// Everything that can go wrong with a bitmap or its file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// The block size is not one this format supports.
    #[error(
        "block size {block_size} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE} bytes"
    )]
    InvalidBlockSize { block_size: u32 },
    /// A zero-byte disk has nothing to track; it is a configuration mistake.
    #[error("disk size is 0 bytes; a tracked disk needs at least one block")]
    EmptyDisk,
    /// The generation id is [`GenerationId::NIL`].
    #[error("generation id is all zeros; draw one with GenerationId::random()")]
    NilGenerationId,
    /// The bit array could not be allocated.
    #[error("cannot allocate {bytes} bytes for a bitmap of {block_count} blocks")]
    OutOfMemory { block_count: u64, bytes: u64 },
    /// A block index at or past the end of the disk.
    #[error("block {block} is out of range: the disk has {block_count} blocks")]
    BlockOutOfRange { block: u64, block_count: u64 },
    /// A page index at or past the end of the bitmap's file.
    #[error("page {page} is out of range: the bitmap has {page_count} pages")]
    PageOutOfRange { page: u64, page_count: u64 },
    /// A byte range that reaches past the end of the disk.
    #[error(
        "byte range at {offset_bytes} of {len_bytes} bytes ends past the disk's {disk_size} bytes"
    )]
    RangeOutOfBounds {
        offset_bytes: u64,
        len_bytes: u64,
        disk_size: u64,
    },
    /// Two bitmaps of different disk or block size cannot be combined.
    #[error(
        "geometry differs: {disk_size} bytes in {block_size}-byte blocks vs \
         {other_disk_size} bytes in {other_block_size}-byte blocks"
    )]
    GeometryMismatch {
        disk_size: u64,
        block_size: u32,
        other_disk_size: u64,
        other_block_size: u32,
    },
    /// Two bitmaps of different tracking generations cannot be combined.
    #[error("generation differs: {ours} vs {theirs}")]
    GenerationMismatch {
        ours: GenerationId,
        theirs: GenerationId,
    },
    /// The file is not the length its header implies (or too short for a header).
    #[error("file is {found} bytes, expected {expected}")]
    FileLength { expected: u64, found: u64 },
    /// The file does not start with [`MAGIC`].
    #[error(
        "bad magic: expected {:02x?} (\"FERRYCBT\"), found {found:02x?}",
        MAGIC
    )]
    BadMagic { found: [u8; 8] },
    /// A header field holds a value this version cannot accept.
    #[error("header field `{field}`: expected {expected}, found {found}")]
    HeaderField {
        field: &'static str,
        expected: String,
        found: String,
    },
    /// The header's checksum does not match its contents.
    #[error("header checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    HeaderChecksum { stored: u64, computed: u64 },
    /// A bit page's checksum does not match its contents.
    #[error(
        "page {page} (file offset {}) checksum mismatch: stored {stored:#018x}, computed {computed:#018x}",
        page_file_offset(*page)
    )]
    PageChecksum {
        page: u64,
        stored: u64,
        computed: u64,
    },
    /// A page verifies but has bits set for blocks past the end of the disk: the
    /// writer was wrong about the geometry, so none of its bits can be trusted.
    #[error("page {page} has bits set past the last block (block count {block_count})")]
    PaddingBitsSet { page: u64, block_count: u64 },
    /// A system call on a bitmap file failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A bitmap file failed validation; the source says which check.
    #[error("invalid bitmap file {}", path.display())]
    InvalidFile {
        path: PathBuf,
        #[source]
        source: Box<BitmapError>,
    },
}

/// File offset of bit page `page`: the header page comes first.
pub const fn page_file_offset(page: u64) -> u64 {
    (page + 1) * PAGE_SIZE as u64
}

/// The bit page that holds `block`'s bit.
pub const fn page_of_block(block: u64) -> u64 {
    block / BLOCKS_PER_PAGE
}

/// One bit per block of a disk: set means "this block may differ from the replica".
///
/// Memory is `ceil(block_count / 64)` words, allocated once in [`new`](Self::new);
/// nothing here allocates afterwards except [`to_bytes`](Self::to_bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct ChangedBlockBitmap {
    disk_size: u64,
    block_size: u32,
    block_count: u64,
    generation_id: GenerationId,
    epoch: u64,
    /// Bit `b % 64` of word `b / 64` is block `b`. Bits past `block_count` are always
    /// zero; `iter_runs` and the file format rely on it.
    words: Box<[u64]>,
    /// Number of set bits, kept in step with `words`.
    count: u64,
}

impl fmt::Debug for ChangedBlockBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangedBlockBitmap")
            .field("disk_size", &self.disk_size)
            .field("block_size", &self.block_size)
            .field("block_count", &self.block_count)
            .field("generation_id", &self.generation_id)
            .field("epoch", &self.epoch)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

/// Checks the geometry and returns the block count. The last block may be partial.
fn block_count_for(disk_size: u64, block_size: u32) -> Result<u64, BitmapError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(BitmapError::InvalidBlockSize { block_size });
    }
    if disk_size == 0 {
        return Err(BitmapError::EmptyDisk);
    }
    Ok(disk_size.div_ceil(u64::from(block_size)))
}

fn page_count_for(block_count: u64) -> u64 {
    block_count.div_ceil(BLOCKS_PER_PAGE)
}

/// The mask of bits that may be set in the last word.
fn last_word_mask(block_count: u64) -> u64 {
    match block_count % WORD_BITS {
        0 => u64::MAX,
        rem => (1u64 << rem) - 1,
    }
}

/// Mask of bits `lo..=hi` of a word.
fn bits_mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo <= hi && hi < WORD_BITS);
    (u64::MAX >> (WORD_BITS - 1 - hi)) & (u64::MAX << lo)
}

fn page_checksum(generation_id: &GenerationId, page: u64, payload: &[u8]) -> u64 {
    debug_assert_eq!(payload.len(), PAGE_PAYLOAD_BYTES);
    // The generation and the page index are hashed in so that a page of another
    // generation, or a page written to the wrong offset, fails verification.
    let mut hasher = Xxh3Default::new();
    hasher.update(generation_id.as_bytes());
    hasher.update(&page.to_le_bytes());
    hasher.update(payload);
    hasher.digest()
}

fn read_u32(bytes: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[off..off + 4]);
    u32::from_le_bytes(b)
}

fn read_u64(bytes: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[off..off + 8]);
    u64::from_le_bytes(b)
}

fn field_error(
    field: &'static str,
    expected: impl fmt::Display,
    found: impl fmt::Display,
) -> BitmapError {
    BitmapError::HeaderField {
        field,
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

/// A header that passed every check.
struct Header {
    disk_size: u64,
    block_size: u32,
    block_count: u64,
    page_count: u64,
    generation_id: GenerationId,
    epoch: u64,
    state: FileState,
}

impl Header {
    /// Total file length the header implies.
    fn file_len(&self) -> u64 {
        page_file_offset(self.page_count)
    }

    /// Validates the header page (`page.len() == PAGE_SIZE`). The checks run in the
    /// order the format lists the fields, so a file wrong in several ways always names
    /// the same one.
    fn parse(page: &[u8]) -> Result<Header, BitmapError> {
        assert_eq!(page.len(), PAGE_SIZE);
        Self::check_identity(page)?;
        let (disk_size, block_size, block_count, page_count) = Self::parse_geometry(page)?;
        let generation_id = Self::parse_generation(page)?;
        let epoch = read_u64(page, OFF_EPOCH);
        let state = Self::parse_flags(page)?;
        Self::check_zeros(page)?;
        Ok(Header {
            disk_size,
            block_size,
            block_count,
            page_count,
            generation_id,
            epoch,
            state,
        })
    }

    /// Magic, format version, header length, then the header checksum. Version and
    /// length come before the checksum so that a newer format is reported as such
    /// rather than as corruption.
    fn check_identity(page: &[u8]) -> Result<(), BitmapError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&page[OFF_MAGIC..OFF_MAGIC + 8]);
        if magic != MAGIC {
            return Err(BitmapError::BadMagic { found: magic });
        }
        let version = read_u32(page, OFF_VERSION);
        if version != FORMAT_VERSION {
            return Err(field_error("format_version", FORMAT_VERSION, version));
        }
        let header_len = read_u32(page, OFF_HEADER_LEN);
        if header_len as usize != HEADER_LEN {
            return Err(field_error("header_len", HEADER_LEN, header_len));
        }
        let stored = read_u64(page, OFF_HEADER_CHECKSUM);
        let computed = xxh3_64(&page[..OFF_HEADER_CHECKSUM]);
        if stored != computed {
            return Err(BitmapError::HeaderChecksum { stored, computed });
        }
        Ok(())
    }

    /// Page size, block size, disk size, and the block and page counts they imply:
    /// `(disk_size, block_size, block_count, page_count)`.
    fn parse_geometry(page: &[u8]) -> Result<(u64, u32, u64, u64), BitmapError> {
        let page_size = read_u32(page, OFF_PAGE_SIZE);
        if page_size as usize != PAGE_SIZE {
            return Err(field_error("page_size", PAGE_SIZE, page_size));
        }
        let block_size = read_u32(page, OFF_BLOCK_SIZE);
        let disk_size = read_u64(page, OFF_DISK_SIZE);
        let block_count_expected = match block_count_for(disk_size, block_size) {
            Ok(n) => n,
            Err(BitmapError::InvalidBlockSize { .. }) => {
                return Err(field_error(
                    "block_size",
                    format_args!("a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"),
                    block_size,
                ))
            }
            Err(_) => return Err(field_error("disk_size", "at least 1", disk_size)),
        };
        let block_count = read_u64(page, OFF_BLOCK_COUNT);
        if block_count != block_count_expected {
            return Err(field_error(
                "block_count",
                format_args!("{block_count_expected} (disk_size / block_size, rounded up)"),
                block_count,
            ));
        }
        let page_count = read_u64(page, OFF_PAGE_COUNT);
        let page_count_expected = page_count_for(block_count);
        if page_count != page_count_expected {
            return Err(field_error(
                "page_count",
                format_args!("{page_count_expected} (block_count / {BLOCKS_PER_PAGE}, rounded up)"),
                page_count,
            ));
        }
        Ok((disk_size, block_size, block_count, page_count))
    }

    fn parse_generation(page: &[u8]) -> Result<GenerationId, BitmapError> {
        let mut generation = [0u8; 16];
        generation.copy_from_slice(&page[OFF_GENERATION..OFF_GENERATION + 16]);
        let generation_id = GenerationId::from_bytes(generation);
        if generation_id.is_nil() {
            return Err(field_error("generation_id", "a non-zero id", "all zeros"));
        }
        Ok(generation_id)
    }

    /// The flags: known bits only; [`FLAG_LIVE`] is the file's state.
    fn parse_flags(page: &[u8]) -> Result<FileState, BitmapError> {
        let flags = read_u32(page, OFF_FLAGS);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(field_error(
                "flags",
                format_args!("only bits {KNOWN_FLAGS:#x}"),
                format_args!("{flags:#x}"),
            ));
        }
        Ok(if flags & FLAG_LIVE != 0 {
            FileState::Live
        } else {
            FileState::Sealed
        })
    }

    /// The reserved bytes and the rest of the header page are zero.
    fn check_zeros(page: &[u8]) -> Result<(), BitmapError> {
        if let Some(i) = page[OFF_RESERVED..OFF_HEADER_CHECKSUM]
            .iter()
            .position(|&b| b != 0)
        {
            return Err(field_error(
                "reserved",
                "zero bytes",
                format_args!(
                    "byte {:#04x} at offset {}",
                    page[OFF_RESERVED + i],
                    OFF_RESERVED + i
                ),
            ));
        }
        if let Some(i) = page[HEADER_LEN..].iter().position(|&b| b != 0) {
            return Err(field_error(
                "header padding",
                "zero bytes",
                format_args!(
                    "byte {:#04x} at offset {}",
                    page[HEADER_LEN + i],
                    HEADER_LEN + i
                ),
            ));
        }
        Ok(())
    }
}

/// Whether a page with a bad checksum is an error or a torn page to repair.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DecodeMode {
    Strict,
    Recover,
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BitmapError + 'a {
    move |source| BitmapError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn invalid_file(path: &Path, source: BitmapError) -> BitmapError {
    BitmapError::InvalidFile {
        path: path.to_path_buf(),
        source: Box::new(source),
    }
}

/// Replaces `path` with `bytes` so that after a crash it holds either the old or the
/// new content, whole ([`ferry_io::durable::write_atomic`]).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BitmapError> {
    ferry_io::durable::write_atomic(path, bytes).map_err(io_error("save bitmap to", path))
}

/// Reads a bitmap file, checking its header before reading the rest so that a huge
/// unrelated file is rejected without being read whole.
fn read_bitmap_file(path: &Path) -> Result<Vec<u8>, BitmapError> {
    let mut file = File::open(path).map_err(io_error("open", path))?;
    let len = file.metadata().map_err(io_error("stat", path))?.len();
    if len >= PAGE_SIZE as u64 {
        let mut head = vec![0u8; PAGE_SIZE];
        file.read_exact(&mut head).map_err(io_error("read", path))?;
        let header = Header::parse(&head).map_err(|e| invalid_file(path, e))?;
        if header.file_len() != len {
            return Err(invalid_file(
                path,
                BitmapError::FileLength {
                    expected: header.file_len(),
                    found: len,
                },
            ));
        }
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(len as usize)
            .map_err(|_| BitmapError::OutOfMemory {
                block_count: header.block_count,
                bytes: len,
            })?;
        bytes.extend_from_slice(&head);
        file.read_to_end(&mut bytes)
            .map_err(io_error("read", path))?;
        Ok(bytes)
    } else {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_error("read", path))?;
        Ok(bytes)
    }
}

impl ChangedBlockBitmap {
    /// An all-clear bitmap for a disk of `disk_size` bytes in `block_size`-byte blocks.
    /// The last block may be partial; it is tracked like any other.
    pub fn new(
        disk_size: u64,
        block_size: u32,
        generation_id: GenerationId,
        epoch: u64,
    ) -> Result<ChangedBlockBitmap, BitmapError> {
        let block_count = block_count_for(disk_size, block_size)?;
        if generation_id.is_nil() {
            return Err(BitmapError::NilGenerationId);
        }
        let word_count = block_count.div_ceil(WORD_BITS);
        let out_of_memory = BitmapError::OutOfMemory {
            block_count,
            bytes: word_count.saturating_mul(WORD_BYTES as u64),
        };
        let word_count = usize::try_from(word_count).map_err(|_| BitmapError::OutOfMemory {
            block_count,
            bytes: word_count.saturating_mul(WORD_BYTES as u64),
        })?;
        let mut words = Vec::new();
        words
            .try_reserve_exact(word_count)
            .map_err(|_| out_of_memory)?;
        words.resize(word_count, 0u64);
        Ok(ChangedBlockBitmap {
            disk_size,
            block_size,
            block_count,
            generation_id,
            epoch,
            words: words.into_boxed_slice(),
            count: 0,
        })
    }

    /// Disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of blocks, the last possibly partial.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// The tracking generation these bits belong to.
    pub fn generation_id(&self) -> GenerationId {
        self.generation_id
    }

    /// The epoch these bits belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Relabels the bits as belonging to `epoch` (e.g. when a new epoch is cut).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Number of bit pages in this bitmap's file.
    pub fn page_count(&self) -> u64 {
        page_count_for(self.block_count)
    }

    /// Number of set blocks.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether no block is set.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn check_block(&self, block: u64) -> Result<(usize, u64), BitmapError> {
        if block >= self.block_count {
            return Err(BitmapError::BlockOutOfRange {
                block,
                block_count: self.block_count,
            });
        }
        Ok(((block / WORD_BITS) as usize, 1u64 << (block % WORD_BITS)))
    }

    /// Marks `block` dirty. A block past the end is an error, never ignored.
    pub fn set(&mut self, block: u64) -> Result<(), BitmapError> {
        let (word, bit) = self.check_block(block)?;
        if self.words[word] & bit == 0 {
            self.words[word] |= bit;
            self.count += 1;
        }
        Ok(())
    }

    /// Marks `block` clean. Only for blocks the target has acknowledged as durable.
    pub fn clear(&mut self, block: u64) -> Result<(), BitmapError> {
        let (word, bit) = self.check_block(block)?;
        if self.words[word] & bit != 0 {
            self.words[word] &= !bit;
            self.count -= 1;
        }
        Ok(())
    }

    /// Whether `block` is dirty.
    pub fn test(&self, block: u64) -> Result<bool, BitmapError> {
        let (word, bit) = self.check_block(block)?;
        Ok(self.words[word] & bit != 0)
    }

    /// Marks dirty every block that the byte range `offset_bytes..offset_bytes +
    /// len_bytes` touches, including partial blocks at either end. An empty range
    /// inside the disk marks nothing; a range reaching past the end is an error and
    /// marks nothing.
    pub fn set_range(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), BitmapError> {
        let end = offset_bytes
            .checked_add(len_bytes)
            .filter(|&end| end <= self.disk_size)
            .ok_or(BitmapError::RangeOutOfBounds {
                offset_bytes,
                len_bytes,
                disk_size: self.disk_size,
            })?;
        if len_bytes == 0 {
            return Ok(());
        }
        let block_size = u64::from(self.block_size);
        let first = offset_bytes / block_size;
        let last = (end - 1) / block_size;
        self.fill_blocks(first, last + 1);
        Ok(())
    }

    /// Marks dirty `block_count` blocks starting at `first_block`.
    pub fn set_blocks(&mut self, first_block: u64, block_count: u64) -> Result<(), BitmapError> {
        let end = first_block
            .checked_add(block_count)
            .filter(|&end| end <= self.block_count)
            .ok_or(BitmapError::BlockOutOfRange {
                block: first_block.saturating_add(block_count).saturating_sub(1),
                block_count: self.block_count,
            })?;
        self.fill_blocks(first_block, end);
        Ok(())
    }

    /// Sets blocks `first..end`; the caller has checked `end <= block_count`.
    fn fill_blocks(&mut self, first: u64, end: u64) {
        debug_assert!(end <= self.block_count);
        if first >= end {
            return;
        }
        let first_word = (first / WORD_BITS) as usize;
        let last_word = ((end - 1) / WORD_BITS) as usize;
        for w in first_word..=last_word {
            let lo = if w == first_word {
                first % WORD_BITS
            } else {
                0
            };
            let hi = if w == last_word {
                (end - 1) % WORD_BITS
            } else {
                WORD_BITS - 1
            };
            let old = self.words[w];
            let new = old | bits_mask(lo, hi);
            self.count += u64::from(new.count_ones() - old.count_ones());
            self.words[w] = new;
        }
    }

    /// Marks every block clean.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
        self.count = 0;
    }

    fn check_compatible(&self, other: &ChangedBlockBitmap) -> Result<(), BitmapError> {
        if self.disk_size != other.disk_size || self.block_size != other.block_size {
            return Err(BitmapError::GeometryMismatch {
                disk_size: self.disk_size,
                block_size: self.block_size,
                other_disk_size: other.disk_size,
                other_block_size: other.block_size,
            });
        }
        if self.generation_id != other.generation_id {
            return Err(BitmapError::GenerationMismatch {
                ours: self.generation_id,
                theirs: other.generation_id,
            });
        }
        Ok(())
    }

    /// Adds `other`'s dirty blocks to this one (e.g. an aborted epoch OR-ed back).
    /// Both must have the same geometry and generation; epochs may differ and this
    /// bitmap keeps its own. On error nothing changes.
    pub fn or_with(&mut self, other: &ChangedBlockBitmap) -> Result<(), BitmapError> {
        self.check_compatible(other)?;
        let mut count = 0u64;
        for (ours, theirs) in self.words.iter_mut().zip(other.words.iter()) {
            *ours |= *theirs;
            count += u64::from(ours.count_ones());
        }
        self.count = count;
        Ok(())
    }

    /// Clears the blocks that are set in `other` (e.g. blocks the target acknowledged
    /// as durable). Same compatibility rules as [`or_with`](Self::or_with).
    pub fn and_not(&mut self, other: &ChangedBlockBitmap) -> Result<(), BitmapError> {
        self.check_compatible(other)?;
        let mut count = 0u64;
        for (ours, theirs) in self.words.iter_mut().zip(other.words.iter()) {
            *ours &= !*theirs;
            count += u64::from(ours.count_ones());
        }
        self.count = count;
        Ok(())
    }

    /// Runs of consecutive dirty blocks as `(first_block, block_count)`, in order.
    /// Zero words are skipped 64 blocks at a time.
    pub fn iter_runs(&self) -> Runs<'_> {
        Runs {
            words: &self.words,
            block_count: self.block_count,
            next_block: 0,
        }
    }

    /// Writes bit page `page` (payload and checksum) into `out`, exactly as
    /// [`to_bytes`](Self::to_bytes) lays it out at [`page_file_offset`]`(page)`.
    /// This is the unit the shim rewrites in place in a live file.
    pub fn encode_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), BitmapError> {
        if page >= self.page_count() {
            return Err(BitmapError::PageOutOfRange {
                page,
                page_count: self.page_count(),
            });
        }
        let first_word = page as usize * WORDS_PER_PAGE;
        let payload = &mut out[PAGE_CHECKSUM_BYTES..];
        for (i, chunk) in payload.chunks_exact_mut(WORD_BYTES).enumerate() {
            let word = self.words.get(first_word + i).copied().unwrap_or(0);
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        let checksum = page_checksum(&self.generation_id, page, &out[PAGE_CHECKSUM_BYTES..]);
        out[..PAGE_CHECKSUM_BYTES].copy_from_slice(&checksum.to_le_bytes());
        Ok(())
    }

    fn encode_header(&self, state: FileState, out: &mut [u8]) {
        let header = &mut out[..PAGE_SIZE];
        header.fill(0);
        header[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        header[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[OFF_HEADER_LEN..OFF_HEADER_LEN + 4]
            .copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        header[OFF_PAGE_SIZE..OFF_PAGE_SIZE + 4].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        header[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&self.block_size.to_le_bytes());
        header[OFF_DISK_SIZE..OFF_DISK_SIZE + 8].copy_from_slice(&self.disk_size.to_le_bytes());
        header[OFF_BLOCK_COUNT..OFF_BLOCK_COUNT + 8]
            .copy_from_slice(&self.block_count.to_le_bytes());
        header[OFF_PAGE_COUNT..OFF_PAGE_COUNT + 8]
            .copy_from_slice(&self.page_count().to_le_bytes());
        header[OFF_GENERATION..OFF_GENERATION + 16].copy_from_slice(self.generation_id.as_bytes());
        header[OFF_EPOCH..OFF_EPOCH + 8].copy_from_slice(&self.epoch.to_le_bytes());
        let flags = match state {
            FileState::Sealed => 0,
            FileState::Live => FLAG_LIVE,
        };
        header[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
        let checksum = xxh3_64(&header[..OFF_HEADER_CHECKSUM]);
        header[OFF_HEADER_CHECKSUM..OFF_HEADER_CHECKSUM + 8]
            .copy_from_slice(&checksum.to_le_bytes());
    }

    /// The whole file image: header page, then every bit page.
    pub fn to_bytes(&self, state: FileState) -> Vec<u8> {
        let mut bytes = vec![0u8; page_file_offset(self.page_count()) as usize];
        self.encode_header(state, &mut bytes);
        for (page, chunk) in bytes[PAGE_SIZE..].chunks_exact_mut(PAGE_SIZE).enumerate() {
            let chunk: &mut [u8; PAGE_SIZE] =
                chunk.try_into().expect("chunks_exact yields whole pages");
            self.encode_page(page as u64, chunk)
                .expect("page index is below page_count by construction");
        }
        bytes
    }

    /// Parses and verifies a whole file image. Any checksum failure, in any state, is
    /// an error: this is what [`load`](Self::load) uses and what the fuzz target calls.
    pub fn from_bytes(bytes: &[u8]) -> Result<ChangedBlockBitmap, BitmapError> {
        Self::decode(bytes, DecodeMode::Strict).map(|(bitmap, _)| bitmap)
    }

    /// Like [`from_bytes`](Self::from_bytes), but a page whose checksum fails in a
    /// [`FileState::Live`] file is taken as torn by a crash: every block it covers is
    /// marked dirty and the page is listed in [`Recovery::torn_pages`]. A bad header,
    /// or a bad page in a sealed file, is still an error.
    pub fn from_bytes_recovering(
        bytes: &[u8],
    ) -> Result<(ChangedBlockBitmap, Recovery), BitmapError> {
        Self::decode(bytes, DecodeMode::Recover)
    }

    /// Checks the header and the file's length, then reads every bit page: a bad
    /// checksum is an error, or in `Recover` mode on a live file a torn page whose
    /// blocks all become dirty.
    fn decode(
        bytes: &[u8],
        mode: DecodeMode,
    ) -> Result<(ChangedBlockBitmap, Recovery), BitmapError> {
        if bytes.len() < PAGE_SIZE {
            return Err(BitmapError::FileLength {
                expected: PAGE_SIZE as u64,
                found: bytes.len() as u64,
            });
        }
        let header = Header::parse(&bytes[..PAGE_SIZE])?;
        if header.file_len() != bytes.len() as u64 {
            return Err(BitmapError::FileLength {
                expected: header.file_len(),
                found: bytes.len() as u64,
            });
        }
        // The length check bounds this allocation by the input's size.
        let mut bitmap = ChangedBlockBitmap::new(
            header.disk_size,
            header.block_size,
            header.generation_id,
            header.epoch,
        )?;
        let mut torn_pages = Vec::new();
        for (page, chunk) in bytes[PAGE_SIZE..].chunks_exact(PAGE_SIZE).enumerate() {
            let page = page as u64;
            let payload = &chunk[PAGE_CHECKSUM_BYTES..];
            let stored = read_u64(chunk, 0);
            let computed = page_checksum(&header.generation_id, page, payload);
            if stored != computed {
                if mode == DecodeMode::Recover && header.state == FileState::Live {
                    torn_pages.push(page);
                    continue;
                }
                return Err(BitmapError::PageChecksum {
                    page,
                    stored,
                    computed,
                });
            }
            bitmap.load_page(page, payload)?;
        }
        for &page in &torn_pages {
            let first = page * BLOCKS_PER_PAGE;
            let end = (first + BLOCKS_PER_PAGE).min(bitmap.block_count);
            bitmap.fill_blocks(first, end);
        }
        bitmap.count = bitmap.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok((
            bitmap,
            Recovery {
                state: header.state,
                torn_pages,
            },
        ))
    }

    /// Takes the words of verified bit page `page` from its `payload`, refusing bits
    /// set past the last block (the writer was wrong about the geometry).
    fn load_page(&mut self, page: u64, payload: &[u8]) -> Result<(), BitmapError> {
        let word_count = self.words.len();
        let last_mask = last_word_mask(self.block_count);
        let first_word = page as usize * WORDS_PER_PAGE;
        for (i, raw) in payload.chunks_exact(WORD_BYTES).enumerate() {
            let word = read_u64(raw, 0);
            let index = first_word + i;
            let allowed = match index.cmp(&(word_count - 1)) {
                std::cmp::Ordering::Less => u64::MAX,
                std::cmp::Ordering::Equal => last_mask,
                std::cmp::Ordering::Greater => 0,
            };
            if word & !allowed != 0 {
                return Err(BitmapError::PaddingBitsSet {
                    page,
                    block_count: self.block_count,
                });
            }
            if index < word_count {
                self.words[index] = word;
            }
        }
        Ok(())
    }

    /// Atomically replaces `path` with this bitmap as a sealed file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), BitmapError> {
        self.save_with_state(path, FileState::Sealed)
    }

    /// Atomically replaces `path` with this bitmap, recording `state` in the header.
    /// The shim writes [`FileState::Live`] before it starts rewriting pages in place.
    pub fn save_with_state(
        &self,
        path: impl AsRef<Path>,
        state: FileState,
    ) -> Result<(), BitmapError> {
        write_atomically(path.as_ref(), &self.to_bytes(state))
    }

    /// Loads and strictly verifies a bitmap file (see [`from_bytes`](Self::from_bytes)).
    /// Validation failures come back as [`BitmapError::InvalidFile`] naming the path,
    /// with the failed check as its source.
    pub fn load(path: impl AsRef<Path>) -> Result<ChangedBlockBitmap, BitmapError> {
        let path = path.as_ref();
        let bytes = read_bitmap_file(path)?;
        Self::from_bytes(&bytes).map_err(|e| invalid_file(path, e))
    }

    /// Loads a bitmap file, repairing torn pages of a live file
    /// (see [`from_bytes_recovering`](Self::from_bytes_recovering)).
    pub fn load_recovering(
        path: impl AsRef<Path>,
    ) -> Result<(ChangedBlockBitmap, Recovery), BitmapError> {
        let path = path.as_ref();
        let bytes = read_bitmap_file(path)?;
        Self::from_bytes_recovering(&bytes).map_err(|e| invalid_file(path, e))
    }
}

/// Iterator over runs of dirty blocks; see [`ChangedBlockBitmap::iter_runs`].
#[derive(Clone, Debug)]
pub struct Runs<'a> {
    words: &'a [u64],
    block_count: u64,
    /// Blocks before this one have been reported or are clean.
    next_block: u64,
}

impl Iterator for Runs<'_> {
    /// `(first_block, block_count)`.
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.next_block >= self.block_count {
            return None;
        }
        // Find the first set bit at or after `next_block`.
        let mut w = (self.next_block / WORD_BITS) as usize;
        let mut word = self.words[w] & (u64::MAX << (self.next_block % WORD_BITS));
        while word == 0 {
            w += 1;
            if w == self.words.len() {
                self.next_block = self.block_count;
                return None;
            }
            word = self.words[w];
        }
        let start = w as u64 * WORD_BITS + u64::from(word.trailing_zeros());
        // Find the first clear bit after `start`. Padding bits are zero, so the run
        // cannot extend past `block_count` except when the last word is full.
        let mut clear = !self.words[w] & (u64::MAX << (start % WORD_BITS));
        while clear == 0 {
            w += 1;
            if w == self.words.len() {
                break;
            }
            clear = !self.words[w];
        }
        let end = if clear == 0 {
            self.block_count
        } else {
            (w as u64 * WORD_BITS + u64::from(clear.trailing_zeros())).min(self.block_count)
        };
        self.next_block = end;
        Some((start, end - start))
    }
}

impl std::iter::FusedIterator for Runs<'_> {}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;

    use proptest::prelude::*;

    use super::*;

    const GEN: GenerationId = GenerationId::from_bytes(*b"0123456789abcdef");
    const OTHER_GEN: GenerationId = GenerationId::from_bytes(*b"fedcba9876543210");

    fn model_runs(model: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &b in model {
            match runs.last_mut() {
                Some((first, len)) if *first + *len == b => *len += 1,
                _ => runs.push((b, 1)),
            }
        }
        runs
    }

    fn assert_matches_model(bitmap: &ChangedBlockBitmap, model: &BTreeSet<u64>) {
        assert_eq!(bitmap.count(), model.len() as u64);
        assert_eq!(bitmap.iter_runs().collect::<Vec<_>>(), model_runs(model));
        for block in 0..bitmap.block_count() {
            assert_eq!(
                bitmap.test(block).unwrap(),
                model.contains(&block),
                "block {block}"
            );
        }
    }

    /// A position on the disk, in blocks or bytes depending on the operation. Drawn
    /// relative to the disk's size so that every geometry sees its boundaries hit.
    #[derive(Clone, Copy, Debug)]
    enum Pos {
        /// Parts per million of the total; up to 110% so some land out of range.
        Ppm(u64),
        /// `total - k`: the last few positions and the first one past the end.
        FromEnd(u64),
    }

    impl Pos {
        fn resolve(self, total: u64) -> u64 {
            match self {
                Pos::Ppm(ppm) => total * ppm / 1_000_000,
                Pos::FromEnd(k) => total.saturating_sub(k),
            }
        }
    }

    /// A length: either a handful of units (sub-block byte ranges, single blocks) or a
    /// fraction of the total.
    #[derive(Clone, Copy, Debug)]
    enum Len {
        Units(u64),
        Ppm(u64),
    }

    impl Len {
        fn resolve(self, total: u64) -> u64 {
            match self {
                Len::Units(n) => n,
                Len::Ppm(ppm) => total * ppm / 1_000_000,
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(Pos),
        Clear(Pos),
        SetRange(Pos, Len),
        SetBlocks(Pos, Len),
        ClearAll,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let pos = prop_oneof![
            9 => (0u64..1_100_000).prop_map(Pos::Ppm),
            1 => (0u64..3).prop_map(Pos::FromEnd),
        ];
        let len = prop_oneof![
            (0u64..2000).prop_map(Len::Units),
            (0u64..300_000).prop_map(Len::Ppm),
        ];
        let op = prop_oneof![
            8 => pos.clone().prop_map(Op::Set),
            2 => pos.clone().prop_map(Op::Clear),
            8 => (pos.clone(), len.clone()).prop_map(|(p, l)| Op::SetRange(p, l)),
            2 => (pos, len).prop_map(|(p, l)| Op::SetBlocks(p, l)),
            1 => Just(Op::ClearAll),
        ];
        prop::collection::vec(op, 0..64)
    }

    fn geometry() -> impl Strategy<Value = (u64, u32)> {
        // Small disks for many word and partial-block shapes, and disks spanning
        // several pages (512-byte blocks, up to ~3 pages) for page boundaries.
        prop_oneof![
            (
                1u64..20_000,
                prop::sample::select(vec![512u32, 4096, 65536])
            ),
            (1u64..(3 * BLOCKS_PER_PAGE + 100) * 512, Just(512u32)),
        ]
    }

    fn apply(bitmap: &mut ChangedBlockBitmap, model: &mut BTreeSet<u64>, op: &Op) {
        let blocks = bitmap.block_count();
        let block_size = u64::from(bitmap.block_size());
        let disk_size = bitmap.disk_size();
        match *op {
            Op::Set(pos) => {
                let b = pos.resolve(blocks);
                let r = bitmap.set(b);
                assert_eq!(r.is_ok(), b < blocks, "set({b}) of {blocks}");
                if b < blocks {
                    model.insert(b);
                }
            }
            Op::Clear(pos) => {
                let b = pos.resolve(blocks);
                let r = bitmap.clear(b);
                assert_eq!(r.is_ok(), b < blocks, "clear({b}) of {blocks}");
                model.remove(&b);
            }
            Op::SetRange(pos, len) => {
                let offset = pos.resolve(disk_size);
                let len = len.resolve(disk_size);
                let r = bitmap.set_range(offset, len);
                let in_range = offset + len <= disk_size;
                assert_eq!(
                    r.is_ok(),
                    in_range,
                    "set_range({offset}, {len}) of {disk_size}"
                );
                if in_range && len > 0 {
                    model.extend(offset / block_size..=(offset + len - 1) / block_size);
                }
            }
            Op::SetBlocks(pos, len) => {
                let first = pos.resolve(blocks);
                let n = len.resolve(blocks);
                let r = bitmap.set_blocks(first, n);
                let in_range = first + n <= blocks;
                assert_eq!(r.is_ok(), in_range, "set_blocks({first}, {n}) of {blocks}");
                if in_range {
                    model.extend(first..first + n);
                }
            }
            Op::ClearAll => {
                bitmap.clear_all();
                model.clear();
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 4 } else { 128 }))]

        #[test]
        fn matches_btreeset_model((disk_size, block_size) in geometry(), ops in ops()) {
            let mut bitmap = ChangedBlockBitmap::new(disk_size, block_size, GEN, 7).unwrap();
            let mut model = BTreeSet::new();
            for op in &ops {
                apply(&mut bitmap, &mut model, op);
            }
            assert_matches_model(&bitmap, &model);
            let bytes = bitmap.to_bytes(FileState::Sealed);
            prop_assert_eq!(ChangedBlockBitmap::from_bytes(&bytes).unwrap(), bitmap);
        }

        #[test]
        fn or_with_and_not_match_set_algebra(
            (disk_size, block_size) in geometry(),
            a in prop::collection::vec(any::<u64>(), 0..200),
            b in prop::collection::vec(any::<u64>(), 0..200),
        ) {
            let mut x = ChangedBlockBitmap::new(disk_size, block_size, GEN, 1).unwrap();
            let mut y = ChangedBlockBitmap::new(disk_size, block_size, GEN, 2).unwrap();
            let n = x.block_count();
            let ma: BTreeSet<u64> = a.iter().map(|v| v % n).collect();
            let mb: BTreeSet<u64> = b.iter().map(|v| v % n).collect();
            for &v in &ma { x.set(v).unwrap(); }
            for &v in &mb { y.set(v).unwrap(); }
            let mut union = x.clone();
            union.or_with(&y).unwrap();
            assert_matches_model(&union, &ma.union(&mb).copied().collect());
            prop_assert_eq!(union.epoch(), 1);
            let mut diff = x.clone();
            diff.and_not(&y).unwrap();
            assert_matches_model(&diff, &ma.difference(&mb).copied().collect());
        }
    }

    #[test]
    fn partial_last_block_counts() {
        let disk_size = 10 * 4096 + 1;
        let mut bitmap = ChangedBlockBitmap::new(disk_size, 4096, GEN, 0).unwrap();
        assert_eq!(bitmap.block_count(), 11);
        bitmap.set_range(disk_size - 1, 1).unwrap();
        assert!(bitmap.test(10).unwrap());
        assert_eq!(bitmap.iter_runs().collect::<Vec<_>>(), vec![(10, 1)]);
        assert!(matches!(
            bitmap.set(11),
            Err(BitmapError::BlockOutOfRange {
                block: 11,
                block_count: 11
            })
        ));
        assert!(matches!(
            bitmap.set_range(disk_size - 1, 2),
            Err(BitmapError::RangeOutOfBounds { .. })
        ));
        assert_eq!(bitmap.count(), 1, "a failed set_range marks nothing");
    }

    #[test]
    fn out_of_range_is_an_error_never_ignored() {
        let mut bitmap = ChangedBlockBitmap::new(64 * 512, 512, GEN, 0).unwrap();
        for block in [64, 65, 1 << 40, u64::MAX] {
            assert!(matches!(
                bitmap.set(block),
                Err(BitmapError::BlockOutOfRange { .. })
            ));
            assert!(matches!(
                bitmap.test(block),
                Err(BitmapError::BlockOutOfRange { .. })
            ));
            assert!(matches!(
                bitmap.clear(block),
                Err(BitmapError::BlockOutOfRange { .. })
            ));
        }
        assert!(
            bitmap.set_range(u64::MAX, 2).is_err(),
            "offset + len overflows"
        );
        assert!(
            bitmap.set_range(64 * 512 + 1, 0).is_err(),
            "empty range past the end"
        );
        assert!(bitmap.set_blocks(63, 2).is_err());
        assert!(bitmap.set_blocks(u64::MAX, 2).is_err());
        assert!(bitmap.is_empty());
        bitmap.set_range(64 * 512, 0).unwrap();
        bitmap.set_blocks(64, 0).unwrap();
        assert!(bitmap.is_empty());
    }

    #[test]
    fn geometry_is_validated() {
        for block_size in [0, 1, 256, 4095, 3 << 12, 1 << 31] {
            assert!(
                matches!(
                    ChangedBlockBitmap::new(1 << 20, block_size, GEN, 0),
                    Err(BitmapError::InvalidBlockSize { .. })
                ),
                "{block_size}"
            );
        }
        assert!(matches!(
            ChangedBlockBitmap::new(0, 4096, GEN, 0),
            Err(BitmapError::EmptyDisk)
        ));
        assert!(matches!(
            ChangedBlockBitmap::new(4096, 4096, GenerationId::NIL, 0),
            Err(BitmapError::NilGenerationId)
        ));
    }

    #[test]
    fn combining_requires_same_geometry_and_generation() {
        let mut a = ChangedBlockBitmap::new(1 << 20, 4096, GEN, 0).unwrap();
        a.set(3).unwrap();
        let other_size = ChangedBlockBitmap::new(1 << 21, 4096, GEN, 0).unwrap();
        let other_block = ChangedBlockBitmap::new(1 << 20, 8192, GEN, 0).unwrap();
        let mut other_gen = ChangedBlockBitmap::new(1 << 20, 4096, OTHER_GEN, 0).unwrap();
        other_gen.set(4).unwrap();
        assert!(matches!(
            a.or_with(&other_size),
            Err(BitmapError::GeometryMismatch { .. })
        ));
        assert!(matches!(
            a.or_with(&other_block),
            Err(BitmapError::GeometryMismatch { .. })
        ));
        assert!(matches!(
            a.or_with(&other_gen),
            Err(BitmapError::GenerationMismatch { .. })
        ));
        assert!(matches!(
            a.and_not(&other_gen),
            Err(BitmapError::GenerationMismatch { .. })
        ));
        assert_eq!(
            a.iter_runs().collect::<Vec<_>>(),
            vec![(3, 1)],
            "unchanged on error"
        );
    }

    #[test]
    fn runs_cross_words_and_reach_the_end() {
        let mut bitmap = ChangedBlockBitmap::new(256 * 512, 512, GEN, 0).unwrap();
        bitmap.set_blocks(60, 70).unwrap();
        bitmap.set_blocks(192, 64).unwrap();
        bitmap.set(0).unwrap();
        assert_eq!(
            bitmap.iter_runs().collect::<Vec<_>>(),
            vec![(0, 1), (60, 70), (192, 64)]
        );
        bitmap.set_blocks(0, 256).unwrap();
        assert_eq!(bitmap.iter_runs().collect::<Vec<_>>(), vec![(0, 256)]);
        assert_eq!(bitmap.count(), 256);
    }

    /// A bitmap whose file has two bit pages, the second partial, with bits on both.
    fn two_page_bitmap() -> ChangedBlockBitmap {
        let block_count = BLOCKS_PER_PAGE + 100;
        let mut bitmap = ChangedBlockBitmap::new(block_count * 512 - 7, 512, GEN, 42).unwrap();
        bitmap.set(0).unwrap();
        bitmap.set_blocks(BLOCKS_PER_PAGE - 3, 10).unwrap();
        bitmap.set(block_count - 1).unwrap();
        bitmap
    }

    #[test]
    fn file_image_layout() {
        let bitmap = two_page_bitmap();
        let bytes = bitmap.to_bytes(FileState::Sealed);
        assert_eq!(bytes.len(), 3 * PAGE_SIZE);
        assert_eq!(&bytes[..8], b"FERRYCBT");
        assert_eq!(read_u32(&bytes, OFF_VERSION), 1);
        assert_eq!(read_u32(&bytes, OFF_BLOCK_SIZE), 512);
        assert_eq!(read_u64(&bytes, OFF_BLOCK_COUNT), BLOCKS_PER_PAGE + 100);
        assert_eq!(read_u64(&bytes, OFF_PAGE_COUNT), 2);
        assert_eq!(read_u64(&bytes, OFF_EPOCH), 42);
        assert_eq!(read_u32(&bytes, OFF_FLAGS), 0);
        // Block 0 is bit 0 of the first payload byte of page 1 of the file.
        assert_eq!(bytes[PAGE_SIZE + PAGE_CHECKSUM_BYTES], 1);
        let live = bitmap.to_bytes(FileState::Live);
        assert_eq!(read_u32(&live, OFF_FLAGS), FLAG_LIVE);
        let mut page = [0u8; PAGE_SIZE];
        bitmap.encode_page(1, &mut page).unwrap();
        assert_eq!(&page[..], &bytes[2 * PAGE_SIZE..]);
        assert!(matches!(
            bitmap.encode_page(2, &mut page),
            Err(BitmapError::PageOutOfRange {
                page: 2,
                page_count: 2
            })
        ));
        assert_eq!(page_of_block(BLOCKS_PER_PAGE), 1);
        assert_eq!(page_file_offset(1), 2 * PAGE_SIZE as u64);
    }

    #[test]
    fn every_corrupted_byte_is_detected() {
        let bitmap = two_page_bitmap();
        for state in [FileState::Sealed, FileState::Live] {
            let good = bitmap.to_bytes(state);
            assert_eq!(ChangedBlockBitmap::from_bytes(&good).unwrap(), bitmap);
            for i in 0..good.len() {
                for flip in [0x01u8, 0x80] {
                    let mut bad = good.clone();
                    bad[i] ^= flip;
                    assert!(
                        ChangedBlockBitmap::from_bytes(&bad).is_err(),
                        "flip {flip:#x} at byte {i} ({state:?}) was accepted"
                    );
                    let recovered = ChangedBlockBitmap::from_bytes_recovering(&bad);
                    match (state, i >= PAGE_SIZE) {
                        (FileState::Live, true) => {
                            let (repaired, recovery) = recovered.unwrap();
                            let page = (i / PAGE_SIZE - 1) as u64;
                            assert_eq!(recovery.torn_pages, vec![page]);
                            // The torn page's blocks are all dirty: a superset.
                            for (first, n) in bitmap.iter_runs() {
                                for b in first..first + n {
                                    assert!(repaired.test(b).unwrap());
                                }
                            }
                            let first = page * BLOCKS_PER_PAGE;
                            let end = (first + BLOCKS_PER_PAGE).min(bitmap.block_count());
                            assert!((first..end).all(|b| repaired.test(b).unwrap()));
                        }
                        _ => assert!(recovered.is_err(), "byte {i} ({state:?}) recovered"),
                    }
                }
            }
        }
    }

    #[test]
    fn precise_errors_for_header_fields() {
        let good = two_page_bitmap().to_bytes(FileState::Sealed);
        let reseal = |bytes: &mut Vec<u8>| {
            let checksum = xxh3_64(&bytes[..OFF_HEADER_CHECKSUM]);
            bytes[OFF_HEADER_CHECKSUM..HEADER_LEN].copy_from_slice(&checksum.to_le_bytes());
        };

        let mut bad = good.clone();
        bad[..8].copy_from_slice(b"NOTFERRY");
        assert!(matches!(
            ChangedBlockBitmap::from_bytes(&bad),
            Err(BitmapError::BadMagic { .. })
        ));

        let mut bad = good.clone();
        bad[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&2u32.to_le_bytes());
        let err = ChangedBlockBitmap::from_bytes(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "header field `format_version`: expected 1, found 2"
        );

        // Fields that are consistent with the checksum but wrong are still caught.
        let mut bad = good.clone();
        bad[OFF_BLOCK_COUNT..OFF_BLOCK_COUNT + 8].copy_from_slice(&5u64.to_le_bytes());
        reseal(&mut bad);
        match ChangedBlockBitmap::from_bytes(&bad) {
            Err(BitmapError::HeaderField {
                field: "block_count",
                found,
                ..
            }) => assert_eq!(found, "5"),
            other => panic!("unexpected {other:?}"),
        }

        let mut bad = good.clone();
        bad[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&4u32.to_le_bytes());
        reseal(&mut bad);
        assert!(matches!(
            ChangedBlockBitmap::from_bytes(&bad),
            Err(BitmapError::HeaderField { field: "flags", .. })
        ));

        let mut bad = good.clone();
        bad[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&1000u32.to_le_bytes());
        reseal(&mut bad);
        assert!(matches!(
            ChangedBlockBitmap::from_bytes(&bad),
            Err(BitmapError::HeaderField {
                field: "block_size",
                ..
            })
        ));

        let mut bad = good.clone();
        bad[OFF_GENERATION..OFF_GENERATION + 16].fill(0);
        reseal(&mut bad);
        assert!(matches!(
            ChangedBlockBitmap::from_bytes(&bad),
            Err(BitmapError::HeaderField {
                field: "generation_id",
                ..
            })
        ));
    }

    #[test]
    fn padding_bits_with_a_valid_checksum_are_rejected() {
        let bitmap = two_page_bitmap();
        let mut bytes = bitmap.to_bytes(FileState::Live);
        // Set a bit for block `block_count`, one past the end, and re-checksum the page.
        let block = bitmap.block_count();
        let page = page_of_block(block);
        let in_page = block % BLOCKS_PER_PAGE;
        let start = page_file_offset(page) as usize;
        bytes[start + PAGE_CHECKSUM_BYTES + (in_page / 8) as usize] |= 1 << (in_page % 8);
        let checksum = page_checksum(
            &GEN,
            page,
            &bytes[start + PAGE_CHECKSUM_BYTES..start + PAGE_SIZE],
        );
        bytes[start..start + 8].copy_from_slice(&checksum.to_le_bytes());
        assert!(matches!(
            ChangedBlockBitmap::from_bytes(&bytes),
            Err(BitmapError::PaddingBitsSet { page: 1, .. })
        ));
        assert!(ChangedBlockBitmap::from_bytes_recovering(&bytes).is_err());
    }

    #[test]
    fn pages_of_another_generation_or_offset_are_rejected() {
        let bitmap = two_page_bitmap();
        let mut other = ChangedBlockBitmap::new(bitmap.disk_size(), 512, OTHER_GEN, 42).unwrap();
        other.set(0).unwrap();
        let mut mixed = bitmap.to_bytes(FileState::Sealed);
        mixed[PAGE_SIZE..2 * PAGE_SIZE]
            .copy_from_slice(&other.to_bytes(FileState::Sealed)[PAGE_SIZE..2 * PAGE_SIZE]);
        assert!(matches!(
            ChangedBlockBitmap::from_bytes(&mixed),
            Err(BitmapError::PageChecksum { page: 0, .. })
        ));

        // Two identical pages swapped are still caught because the index is hashed in.
        let empty = ChangedBlockBitmap::new(bitmap.disk_size(), 512, GEN, 0).unwrap();
        let mut swapped = empty.to_bytes(FileState::Sealed);
        let (first, second) = swapped[PAGE_SIZE..].split_at_mut(PAGE_SIZE);
        first.swap_with_slice(second);
        assert!(matches!(
            ChangedBlockBitmap::from_bytes(&swapped),
            Err(BitmapError::PageChecksum { page: 0, .. })
        ));
    }

    #[test]
    fn truncated_or_extended_files_are_rejected() {
        let good = two_page_bitmap().to_bytes(FileState::Sealed);
        for len in [
            0,
            1,
            100,
            PAGE_SIZE - 1,
            PAGE_SIZE,
            2 * PAGE_SIZE,
            good.len() - 1,
        ] {
            assert!(
                matches!(
                    ChangedBlockBitmap::from_bytes(&good[..len]),
                    Err(BitmapError::FileLength { .. })
                ),
                "length {len}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            ChangedBlockBitmap::from_bytes(&longer),
            Err(BitmapError::FileLength { .. })
        ));
    }

    #[test]
    fn save_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1-os.cbt");
        let mut bitmap = two_page_bitmap();
        bitmap.save(&path).unwrap();
        assert_eq!(ChangedBlockBitmap::load(&path).unwrap(), bitmap);

        // Saving again replaces the file whole and leaves no temp file behind.
        bitmap.set(5).unwrap();
        bitmap.set_epoch(43);
        bitmap.save_with_state(&path, FileState::Live).unwrap();
        let (loaded, recovery) = ChangedBlockBitmap::load_recovering(&path).unwrap();
        assert_eq!(loaded, bitmap);
        assert_eq!(loaded.epoch(), 43);
        assert_eq!(
            recovery,
            Recovery {
                state: FileState::Live,
                torn_pages: vec![]
            }
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vm1-os.cbt")]);
    }

    #[test]
    fn load_reports_the_path_and_the_failed_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.cbt");
        let missing = ChangedBlockBitmap::load(&path).unwrap_err();
        assert!(matches!(missing, BitmapError::Io { op: "open", .. }));
        assert!(missing.to_string().contains("disk.cbt"));

        let mut bytes = two_page_bitmap().to_bytes(FileState::Sealed);
        bytes[PAGE_SIZE + 100] ^= 4;
        fs::write(&path, &bytes).unwrap();
        match ChangedBlockBitmap::load(&path) {
            Err(BitmapError::InvalidFile { path: p, source }) => {
                assert_eq!(p, path);
                assert!(matches!(*source, BitmapError::PageChecksum { page: 0, .. }));
            }
            other => panic!("corrupt file accepted or misreported: {other:?}"),
        }

        fs::write(&path, &bytes[..PAGE_SIZE + 1]).unwrap();
        match ChangedBlockBitmap::load(&path) {
            Err(BitmapError::InvalidFile { source, .. }) => {
                assert!(matches!(*source, BitmapError::FileLength { .. }))
            }
            other => panic!("truncated file accepted: {other:?}"),
        }
    }

    #[test]
    fn generation_ids_are_random_and_print_as_hex() {
        let a = GenerationId::random().unwrap();
        let b = GenerationId::random().unwrap();
        assert_ne!(a, b);
        assert!(!a.is_nil());
        assert_eq!(GEN.to_string(), "30313233343536373839616263646566");
    }
}
