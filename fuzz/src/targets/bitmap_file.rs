//! Changed-block bitmap files: what the engine reads back after a crash, possibly torn.
//!
//! Both decoders must agree: whatever the strict one accepts, the recovering one
//! accepts identically with no torn page, and anything only the recovering one accepts
//! is a live file with torn pages, every block of which reads dirty. A decoded bitmap
//! re-encodes to exactly the input bytes (the format has no slack), and its `count`
//! and runs agree with each other.

use filter_driver_shim_contract::bitmap::{
    ChangedBlockBitmap, FileState, BLOCKS_PER_PAGE, HEADER_LEN, MAGIC, PAGE_SIZE,
};
use filter_driver_shim_contract::generation::GenerationId;
use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

use crate::Target;

pub fn target() -> Target {
    Target {
        name: "bitmap_file",
        run,
        seeds,
        repair: Some(repair),
        dictionary: &[
            &MAGIC,
            &[1, 0, 0, 0],
            &[128, 0, 0, 0],
            &[0, 16, 0, 0],
            &[0, 2, 0, 0],
            &[0, 0, 0, 64],
            &[1],
            &[0xff; 8],
        ],
        max_len: 64 << 10,
    }
}

pub fn run(data: &[u8]) -> String {
    let strict = ChangedBlockBitmap::from_bytes(data);
    let recovering = ChangedBlockBitmap::from_bytes_recovering(data);
    match (strict, recovering) {
        (Ok(bitmap), Ok((again, recovery))) => {
            assert!(bitmap == again, "the two decoders disagree on a valid file");
            assert!(
                recovery.torn_pages.is_empty(),
                "a valid file reported torn pages"
            );
            let bytes = bitmap.to_bytes(recovery.state);
            assert!(
                bytes == data,
                "a valid file does not re-encode to its own bytes"
            );
            check_bitmap(&bitmap);
            format!(
                "ok:{:?}:pages={}",
                recovery.state,
                crate::bucket(bitmap.page_count() as usize)
            )
        }
        (Ok(_), Err(e)) => panic!("from_bytes accepted what from_bytes_recovering refuses: {e}"),
        (Err(e), Ok((bitmap, recovery))) => {
            assert_eq!(
                recovery.state,
                FileState::Live,
                "recovered a sealed file: {e}"
            );
            assert!(
                !recovery.torn_pages.is_empty(),
                "recovered with no torn page: {e}"
            );
            for &page in &recovery.torn_pages {
                assert!(page < bitmap.page_count(), "torn page {page} past the end");
                let first = page * BLOCKS_PER_PAGE;
                let end = (first + BLOCKS_PER_PAGE).min(bitmap.block_count());
                for block in first..end {
                    assert!(
                        bitmap.test(block).unwrap(),
                        "block {block} of torn page {page} is clean"
                    );
                }
            }
            check_bitmap(&bitmap);
            // What was recovered saves and loads like any other bitmap.
            let back = ChangedBlockBitmap::from_bytes(&bitmap.to_bytes(FileState::Sealed))
                .expect("a recovered bitmap re-encodes to a valid file");
            assert!(back == bitmap, "a recovered bitmap does not roundtrip");
            format!(
                "recovered:torn={}",
                crate::bucket(recovery.torn_pages.len())
            )
        }
        (Err(e), Err(_)) => crate::label("err", &e),
    }
}

/// Invariants of any decoded bitmap, checked through its public interface.
fn check_bitmap(bitmap: &ChangedBlockBitmap) {
    let blocks = bitmap.block_count();
    assert!(blocks > 0);
    assert_eq!(
        blocks,
        bitmap.disk_size().div_ceil(u64::from(bitmap.block_size()))
    );
    let mut counted = 0u64;
    let mut prev_end = None;
    for (first, count) in bitmap.iter_runs() {
        assert!(count > 0, "empty run at {first}");
        assert!(
            first + count <= blocks,
            "run {first}+{count} past {blocks} blocks"
        );
        if let Some(end) = prev_end {
            assert!(first > end, "runs out of order or touching at {first}");
        }
        assert!(bitmap.test(first).unwrap() && bitmap.test(first + count - 1).unwrap());
        prev_end = Some(first + count);
        counted += count;
    }
    assert_eq!(counted, bitmap.count(), "count disagrees with the runs");
    assert!(
        bitmap.test(blocks).is_err(),
        "block past the end is testable"
    );
    // Every page encodes, and the file image is the header plus those pages.
    let mut page = [0u8; PAGE_SIZE];
    for p in 0..bitmap.page_count() {
        bitmap
            .encode_page(p, &mut page)
            .expect("every page below page_count encodes");
    }
    assert!(bitmap.encode_page(bitmap.page_count(), &mut page).is_err());
    let from_bytes = ChangedBlockBitmap::from_bytes(&bitmap.to_bytes(FileState::Live))
        .expect("a live image of a valid bitmap decodes");
    assert!(from_bytes == *bitmap, "live image does not roundtrip");
}

// Field offsets from docs/bitmap-format.md.
const OFF_BLOCK_SIZE: usize = 20;
const OFF_DISK_SIZE: usize = 24;
const OFF_BLOCK_COUNT: usize = 32;
const OFF_PAGE_COUNT: usize = 40;
const OFF_GENERATION: usize = 48;
const OFF_FLAGS: usize = 72;
const OFF_HEADER_CHECKSUM: usize = 120;

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn page_checksum(generation: &[u8], page: u64, payload: &[u8]) -> u64 {
    let mut h = Xxh3Default::new();
    h.update(generation);
    h.update(&page.to_le_bytes());
    h.update(payload);
    h.digest()
}

/// Re-derives what a writer would have: block and page counts from the geometry, the
/// file length they imply (when small enough), and every checksum, leaving a page's
/// checksum broken now and then (one page in eight for random entropy, none for 0) so
/// torn-page recovery is exercised.
fn repair(buf: &mut Vec<u8>, entropy: u64) {
    if buf.len() < PAGE_SIZE {
        return;
    }
    if entropy & 1 == 0 {
        buf[..8].copy_from_slice(&MAGIC);
    }
    if entropy & 2 == 0 {
        buf[8..16].copy_from_slice(&[1, 0, 0, 0, HEADER_LEN as u8, 0, 0, 0]);
        buf[16..20].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    }
    if entropy & 4 == 0 {
        // Only the live flag is defined; keep the mutation's choice of it.
        let live = buf[OFF_FLAGS] & 1;
        buf[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&[live, 0, 0, 0]);
        buf[OFF_FLAGS + 4..OFF_HEADER_CHECKSUM].fill(0);
        buf[HEADER_LEN..PAGE_SIZE].fill(0);
    }
    let block_size =
        u32::from_le_bytes(buf[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].try_into().unwrap());
    let disk_size = le_u64(buf, OFF_DISK_SIZE);
    if entropy & 8 == 0 && block_size != 0 {
        let blocks = disk_size.div_ceil(u64::from(block_size));
        let pages = blocks.div_ceil(BLOCKS_PER_PAGE);
        buf[OFF_BLOCK_COUNT..OFF_BLOCK_COUNT + 8].copy_from_slice(&blocks.to_le_bytes());
        buf[OFF_PAGE_COUNT..OFF_PAGE_COUNT + 8].copy_from_slice(&pages.to_le_bytes());
        let file_len = (pages + 1).saturating_mul(PAGE_SIZE as u64);
        if file_len <= 128 << 10 && entropy & 16 == 0 {
            buf.resize(file_len as usize, 0);
        }
    }
    let checksum = xxh3_64(&buf[..OFF_HEADER_CHECKSUM]);
    buf[OFF_HEADER_CHECKSUM..HEADER_LEN].copy_from_slice(&checksum.to_le_bytes());
    let generation: [u8; 16] = buf[OFF_GENERATION..OFF_GENERATION + 16].try_into().unwrap();
    let mut bits = entropy >> 5;
    for (page, chunk) in buf[PAGE_SIZE..].chunks_exact_mut(PAGE_SIZE).enumerate() {
        if bits & 7 != 7 {
            let sum = page_checksum(&generation, page as u64, &chunk[8..]);
            chunk[..8].copy_from_slice(&sum.to_le_bytes());
        }
        bits = bits.rotate_right(3);
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let generation = GenerationId::from_bytes(*b"fuzz-generation!");
    let mut seeds = Vec::new();
    // (disk bytes, block size, blocks set): one block, a partial last word, a partial
    // last page, and three pages.
    let shapes: [(u64, u32, &[u64]); 5] = [
        (1, 512, &[0]),
        (100 * 4096 + 1, 4096, &[0, 63, 64, 100]),
        (65536 * 7, 65536, &[]),
        (
            3 * BLOCKS_PER_PAGE * 512 - 700,
            512,
            &[
                0,
                BLOCKS_PER_PAGE - 1,
                BLOCKS_PER_PAGE,
                2 * BLOCKS_PER_PAGE + 5,
            ],
        ),
        (u64::from(u32::MAX) + 1, 1 << 30, &[3]),
    ];
    for (disk_size, block_size, set) in shapes {
        let mut bitmap = ChangedBlockBitmap::new(disk_size, block_size, generation, 42).unwrap();
        for &b in set {
            bitmap.set(b).unwrap();
        }
        if bitmap.block_count() > 200 {
            bitmap.set_range(4096 * 3, 4096 * 20).unwrap();
        }
        seeds.push(bitmap.to_bytes(FileState::Sealed));
        let mut live = bitmap.to_bytes(FileState::Live);
        seeds.push(live.clone());
        // A page torn by a crash: the checksum of the old content, new bits.
        if live.len() > PAGE_SIZE {
            live[PAGE_SIZE + 100] ^= 0x10;
            seeds.push(live);
        }
    }
    seeds
}
