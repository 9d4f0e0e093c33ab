//! The manifest of an epoch: per disk, what the session carried to the replica.
//!
//! The source builds one [`ManifestBuilder`] per disk from the frames it put on the
//! wire and sends the result in its Commit frame; the target builds its own from the
//! frames it verified and handed to its applier, and commits only if the two are equal.
//! Frame checksums catch a damaged frame and sequence numbers a lost one, but neither
//! can tell an epoch whose source stopped early — a stage that died and looked like the
//! end of the plan — from a complete one. The manifest can: it is computed from the
//! sender's side of the stream, so anything that never reached the target, or reached
//! it altered, shows up as a difference.
//!
//! The digest is order-defined: ranges of a disk travel in increasing offset order
//! (docs/protocol.md, "Order"), and both sides feed them in that order.

use xxhash_rust::xxh3::Xxh3;
use zerocopy::little_endian::U64;
use zerocopy::{Immutable, IntoBytes, KnownLayout};

use super::{BlockRecord, Codec, DiskManifest};

/// What one manifest entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum EntryKind {
    /// A Data record with a payload (raw or compressed).
    DataBlock = 1,
    /// A Data record of a block that reads as zeros.
    ZeroBlock = 2,
    /// A Zero frame.
    ZeroRun = 3,
}

/// The bytes one record or zero run contributes to the digest.
#[derive(IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct Entry {
    kind: u8,
    reserved: [u8; 7],
    offset: U64,
    length: U64,
    /// The block's xxh3-128 as its record carries it; zeros for a zero run.
    hash: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Entry>() == 40);

/// Accumulates the manifest of one disk.
#[derive(Clone)]
pub struct ManifestBuilder {
    data_blocks: u64,
    zero_blocks: u64,
    zero_runs: u64,
    bytes_logical: u64,
    digest: Xxh3,
}

impl Default for ManifestBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ManifestBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestBuilder")
            .field("data_blocks", &self.data_blocks)
            .field("zero_blocks", &self.zero_blocks)
            .field("zero_runs", &self.zero_runs)
            .field("bytes_logical", &self.bytes_logical)
            .finish_non_exhaustive()
    }
}

impl ManifestBuilder {
    pub fn new() -> Self {
        Self {
            data_blocks: 0,
            zero_blocks: 0,
            zero_runs: 0,
            bytes_logical: 0,
            digest: Xxh3::new(),
        }
    }

    /// Adds one Data record. The codec only says how the block travelled, so raw and
    /// compressed records of the same block contribute the same entry.
    pub fn record(&mut self, rec: &BlockRecord) {
        let kind = if Codec::from_u8(rec.codec) == Some(Codec::Zero) {
            self.zero_blocks += 1;
            EntryKind::ZeroBlock
        } else {
            self.data_blocks += 1;
            EntryKind::DataBlock
        };
        let length = u64::from(rec.length.get());
        self.add(kind, rec.offset.get(), length, rec.hash);
    }

    /// Adds one Zero frame covering `len` bytes at `offset`.
    pub fn zero_run(&mut self, offset: u64, len: u64) {
        self.zero_runs += 1;
        self.add(EntryKind::ZeroRun, offset, len, [0; 16]);
    }

    fn add(&mut self, kind: EntryKind, offset: u64, length: u64, hash: [u8; 16]) {
        self.bytes_logical = self.bytes_logical.wrapping_add(length);
        let entry = Entry {
            kind: kind as u8,
            reserved: [0; 7],
            offset: offset.into(),
            length: length.into(),
            hash,
        };
        self.digest.update(entry.as_bytes());
    }

    /// The manifest of everything added so far.
    pub fn finish(&self) -> DiskManifest {
        DiskManifest {
            data_blocks: self.data_blocks.into(),
            zero_blocks: self.zero_blocks.into(),
            zero_runs: self.zero_runs.into(),
            bytes_logical: self.bytes_logical.into(),
            digest: self.digest.digest128().to_le_bytes(),
        }
    }
}

/// A manifest in words, for error messages.
pub fn describe(m: &DiskManifest) -> String {
    format!(
        "{} data blocks, {} zero blocks, {} zero runs, {} bytes, digest {}",
        m.data_blocks.get(),
        m.zero_blocks.get(),
        m.zero_runs.get(),
        m.bytes_logical.get(),
        hex(&m.digest)
    )
}

/// A digest as lowercase hex digits, for messages. (Generation ids, the other 16-byte
/// field of the wire, print through `GenerationId`'s `Display`.)
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::block_hash;

    fn record(offset: u64, codec: Codec, fill: u8) -> BlockRecord {
        let hash = if codec == Codec::Zero {
            crate::protocol::ZERO_BLOCK_HASH
        } else {
            block_hash(&[fill; 4096])
        };
        BlockRecord {
            offset: offset.into(),
            length: 4096.into(),
            stored_len: 0.into(),
            payload_offset: 0.into(),
            codec: codec as u8,
            stream: 0,
            stream_flags: 0,
            reserved: 0,
            hash,
            reserved2: 0.into(),
        }
    }

    fn build(records: &[BlockRecord], runs: &[(u64, u64)]) -> DiskManifest {
        let mut b = ManifestBuilder::new();
        records.iter().for_each(|r| b.record(r));
        runs.iter().for_each(|&(o, l)| b.zero_run(o, l));
        b.finish()
    }

    #[test]
    fn equal_streams_give_equal_manifests_and_the_codec_does_not_matter() {
        let raw = [record(0, Codec::Raw, 1), record(4096, Codec::Zero, 0)];
        let mut zstd = raw;
        zstd[0].codec = Codec::Zstd as u8;
        assert_eq!(build(&raw, &[(8192, 4096)]), build(&zstd, &[(8192, 4096)]));
    }

    #[test]
    fn a_lost_reordered_or_altered_entry_changes_the_manifest() {
        let recs = [
            record(0, Codec::Raw, 1),
            record(4096, Codec::Raw, 2),
            record(8192, Codec::Zero, 0),
        ];
        let whole = build(&recs, &[(1 << 20, 4096)]);
        assert_ne!(whole, build(&recs[..2], &[(1 << 20, 4096)]), "lost record");
        assert_ne!(whole, build(&recs, &[]), "lost zero run");
        assert_ne!(whole, build(&recs, &[(1 << 20, 8192)]), "longer zero run");
        let swapped = [recs[1], recs[0], recs[2]];
        assert_ne!(whole, build(&swapped, &[(1 << 20, 4096)]), "reordered");
        let mut other = recs;
        other[1] = record(4096, Codec::Raw, 3);
        let altered = build(&other, &[(1 << 20, 4096)]);
        assert_eq!(whole.data_blocks, altered.data_blocks);
        assert_ne!(whole.digest, altered.digest, "other content");
    }
}
