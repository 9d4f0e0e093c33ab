//! The target writer's data-frame verifier: the last check between a peer's bytes and
//! a replica disk.
//!
//! `dataplane::writer::verify` is public (hidden from the docs) for this harness alone.
//! The harness drives it as the session does: the geometry
//! of the opened disks, `needs_scratch` to decide whether a scratch slot is handed in,
//! a scratch buffer of `MAX_FRAME_PAYLOAD` bytes reused without zeroing, and fresh
//! decoders per input (compression streams keep state from chunk to chunk, and an
//! input must replay alike whatever ran before it).
//!
//! When the verifier accepts a frame, every block must sit where [`Placer`] says
//! (inside the frame after its table, or inside the scratch buffer), aligned for
//! O_DIRECT when it is read from the receive buffer, and hash to its record's hash
//! there: those are the bytes the applier writes to the replica.
//!
//! Input layout, so one byte string fixes both the session and the frame:
//! `control u8` (bit 0: replace every record's hash with the right one before
//! verifying, so mutations get past the hash check; bits 1-2: disks - 1), then per
//! disk `block_shift u8` (block size 4096 << shift % 9; bit 7: a protocol-3 session,
//! whose records may be granule runs inside a block) and `disk_size u64` (0 means 1),
//! then the Data frame payload.

use std::cell::RefCell;

use dataplane::protocol::{
    block_hash, BlockRecord, Codec, DataHeader, ErrorCode, BLOCK_RECORD_LEN, MAX_FRAME_PAYLOAD,
    PAYLOAD_ALIGN, PROTOCOL_VERSION_MAX, ZERO_BLOCK_HASH,
};
use dataplane::protocol::zstream::{StreamDecoders, StreamEncoder};
use dataplane::writer::verify::{self, Geometry, Place, Placer, MAX_FRAME_LOGICAL};
use dataplane::writer::TargetError;
use zerocopy::{FromBytes, IntoBytes};

use crate::Target;

pub fn target() -> Target {
    Target {
        name: "data_frame_verify",
        run,
        seeds,
        repair: Some(repair),
        dictionary: &[
            &[0, 0, 0, 0],
            &[0, 16, 0, 0],
            &[0, 0, 1, 0],
            &[0, 0, 0x10, 0],
            &[0, 0x10, 0, 0, 0, 0, 0, 0],
            &[1],
            &[2],
            &[3],
            &[0x28, 0xb5, 0x2f, 0xfd],
            &[0xff, 0xff, 0xff, 0xff],
        ],
        max_len: 128 << 10,
    }
}

const DISK_BYTES: usize = 9;

struct Session {
    scratch: Vec<u8>,
    frame: Vec<u8>,
}

thread_local! {
    static SESSION: RefCell<Session> = RefCell::new(Session {
        scratch: vec![0u8; MAX_FRAME_PAYLOAD],
        frame: Vec::with_capacity(MAX_FRAME_PAYLOAD),
    });
}

/// Splits an input into its session geometry, the repair flag and the frame payload.
fn parse(data: &[u8]) -> Option<(Vec<Geometry>, bool, &[u8])> {
    let (&control, rest) = data.split_first()?;
    let disks = 1 + usize::from(control >> 1 & 3);
    if rest.len() < disks * DISK_BYTES {
        return None;
    }
    let (table, payload) = rest.split_at(disks * DISK_BYTES);
    let geometries = table
        .chunks_exact(DISK_BYTES)
        .map(|d| Geometry {
            block_size: 4096 << (d[0] % 9),
            disk_size: u64::from_le_bytes(d[1..9].try_into().unwrap()).max(1),
            granular: d[0] & 0x80 != 0,
        })
        .collect();
    Some((geometries, control & 1 != 0, payload))
}

/// An accepted record is a whole block, or in a protocol-3 session a run of 4 KiB
/// granules inside one block (ending at the disk's end when not whole granules).
fn check_shape(geometry: &Geometry, i: usize, offset: u64, len: u64) {
    let bs = geometry.block_size;
    if !geometry.granular {
        assert_eq!(offset % bs, 0, "record {i}: unaligned offset {offset}");
        assert_eq!(
            len,
            bs.min(geometry.disk_size - offset),
            "record {i}: wrong length"
        );
        return;
    }
    let block_end = ((offset / bs + 1) * bs).min(geometry.disk_size);
    assert_eq!(
        offset % 4096,
        0,
        "record {i}: offset {offset} not on a granule"
    );
    assert!(
        len > 0 && offset + len <= block_end,
        "record {i}: {len} bytes at {offset} leave the block"
    );
    assert!(
        len % 4096 == 0 || offset + len == geometry.disk_size,
        "record {i}: {len} bytes are not whole granules"
    );
}

/// The record table of `frame`, if it has one that fits.
fn table_mut(frame: &mut [u8]) -> Option<&mut [BlockRecord]> {
    let (header, rest) = DataHeader::ref_from_prefix(frame).ok()?;
    let count = header.record_count.get() as usize;
    let bytes = count
        .checked_mul(BLOCK_RECORD_LEN)
        .filter(|&n| n <= rest.len())?;
    <[BlockRecord]>::mut_from_bytes(&mut frame[8..8 + bytes]).ok()
}

/// The hash a correct sender would have put in `rec`, when its payload can be read;
/// stream chunks are decoded in record order, as the verifier does.
fn right_hash(frame: &[u8], rec: &BlockRecord, streams: &mut StreamDecoders) -> Option<[u8; 16]> {
    let len = rec.length.get() as usize;
    let at = rec.payload_offset.get() as usize;
    let stored = frame.get(at..at.checked_add(rec.stored_len.get() as usize)?)?;
    match Codec::from_u8(rec.codec)? {
        Codec::Zero => Some(ZERO_BLOCK_HASH),
        Codec::Raw => Some(block_hash(stored)),
        Codec::Zstd if len <= 1 << 20 => {
            let plain = zstd::bulk::decompress(stored, len).ok()?;
            Some(block_hash(&plain))
        }
        Codec::ZstdStream if len <= 1 << 20 => {
            let mut plain = vec![0u8; len];
            streams
                .decode((rec.stream, rec.stream_flags), stored, &mut plain)
                .ok()?;
            Some(block_hash(&plain))
        }
        Codec::Zstd | Codec::ZstdStream => None,
    }
}

fn repair_hashes(frame: &mut [u8]) {
    let Some(table) = table_mut(frame) else {
        return;
    };
    let records: Vec<BlockRecord> = table.to_vec();
    let mut streams = StreamDecoders::default();
    let hashes: Vec<Option<[u8; 16]>> = records
        .iter()
        .map(|r| right_hash(frame, r, &mut streams))
        .collect();
    let table = table_mut(frame).expect("parsed above");
    for (rec, hash) in table.iter_mut().zip(hashes) {
        if let Some(hash) = hash {
            rec.hash = hash;
        }
    }
}

pub fn run(data: &[u8]) -> String {
    let Some((geometries, fix_hashes, payload)) = parse(data) else {
        return "short".into();
    };
    SESSION.with(|session| {
        let session = &mut *session.borrow_mut();
        let payload = if fix_hashes {
            session.frame.clear();
            session.frame.extend_from_slice(payload);
            repair_hashes(&mut session.frame);
            &session.frame[..]
        } else {
            payload
        };
        verify_one(
            payload,
            &geometries,
            &mut session.scratch,
            &mut verify::Decoders::new(PROTOCOL_VERSION_MAX).expect("zstd decoders"),
        )
    })
}

fn verify_one(
    payload: &[u8],
    geometries: &[Geometry],
    scratch: &mut [u8],
    decoders: &mut verify::Decoders,
) -> String {
    let names: Vec<String> = (0..geometries.len()).map(|i| format!("disk{i}")).collect();
    // As the session does: a scratch slot only for frames that need one.
    let needs = match verify::needs_scratch(payload) {
        Ok(needs) => needs,
        Err(e) => return rejected("table", e),
    };
    let result = verify::verify_data(
        payload,
        geometries,
        &names,
        needs.then_some(&mut *scratch),
        decoders,
    );
    match result {
        Err(e) => rejected("verify", e),
        Ok((disk, scratch_used)) => {
            check_accepted(
                payload,
                geometries,
                disk,
                scratch_used,
                needs.then_some(&*scratch),
            );
            let records = u32::from_le_bytes(payload[4..8].try_into().unwrap()) as usize;
            format!(
                "ok:disk={disk}:scratch={needs}:records={}",
                crate::bucket(records)
            )
        }
    }
}

fn rejected(stage: &str, e: TargetError) -> String {
    match &e {
        TargetError::Rejected(r) => assert!(
            matches!(
                r.code(),
                ErrorCode::Protocol
                    | ErrorCode::UnknownDisk
                    | ErrorCode::OutOfRange
                    | ErrorCode::Integrity
            ),
            "a frame was rejected with code {:?}: {e}",
            r.code()
        ),
        other => panic!("verifying a data frame failed other than by rejecting it: {other:?}"),
    }
    crate::label(stage, &e)
}

/// What the applier relies on for a frame that passed.
fn check_accepted(
    payload: &[u8],
    geometries: &[Geometry],
    disk: u32,
    scratch_used: usize,
    scratch: Option<&[u8]>,
) {
    let geometry = geometries
        .get(disk as usize)
        .expect("accepted a frame for an unknown disk");
    let (header, rest) = DataHeader::ref_from_prefix(payload).expect("accepted without a header");
    assert_eq!(header.disk.get(), disk);
    let count = header.record_count.get() as usize;
    assert!(count > 0, "accepted a frame without records");
    let recs = <[BlockRecord]>::ref_from_bytes(&rest[..count * BLOCK_RECORD_LEN]).unwrap();
    let table_end = 8 + count * BLOCK_RECORD_LEN;
    let mut placer = Placer::new();
    let mut logical = 0u64;
    for (i, rec) in recs.iter().enumerate() {
        let offset = rec.offset.get();
        let len = rec.length.get() as usize;
        assert!(
            offset < geometry.disk_size,
            "record {i}: offset {offset} past the disk"
        );
        check_shape(geometry, i, offset, len as u64);
        logical += len as u64;
        let codec = Codec::from_u8(rec.codec).expect("accepted an unknown codec");
        let bytes = match placer.place(rec) {
            Place::Zero => {
                assert_eq!(codec, Codec::Zero);
                assert_eq!(
                    rec.stored_len.get(),
                    0,
                    "record {i}: zero block with a payload"
                );
                continue;
            }
            Place::Recv(at) => {
                assert_eq!(codec, Codec::Raw);
                assert_eq!(
                    at % PAYLOAD_ALIGN,
                    0,
                    "record {i}: O_DIRECT source unaligned"
                );
                assert_eq!(len % 4096, 0, "record {i}: O_DIRECT length unaligned");
                assert!(
                    at >= table_end,
                    "record {i}: payload inside the record table"
                );
                payload.get(at..at + len).expect("placed outside the frame")
            }
            Place::Scratch(at) => {
                let scratch = scratch.expect("placed in scratch, but none was handed in");
                scratch
                    .get(at..at + len)
                    .expect("placed outside the scratch buffer")
            }
        };
        assert!(
            block_hash(bytes) == rec.hash,
            "record {i} ({codec:?}, offset {offset}): the bytes the applier would write fail the hash"
        );
    }
    assert!(
        logical <= MAX_FRAME_LOGICAL as u64,
        "accepted {logical} bytes of blocks"
    );
    assert_eq!(
        placer.scratch_used(),
        scratch_used,
        "placer and verifier disagree"
    );
}

/// Aligns records with the session's disks so more of them get past the range checks;
/// the entropy decides which records are left as mutated.
#[allow(clippy::ptr_arg)] // The type every `Target::repair` has; others resize.
fn repair(buf: &mut Vec<u8>, entropy: u64) {
    let Some((geometries, _, _)) = parse(buf) else {
        return;
    };
    if entropy & 7 != 7 {
        buf[0] |= 1;
    }
    let start = 1 + geometries.len() * DISK_BYTES;
    let frame = &mut buf[start..];
    let frame_len = frame.len();
    if let Ok((header, _)) = DataHeader::mut_from_prefix(frame) {
        if entropy & 8 == 0 {
            header.disk = (header.disk.get() % geometries.len() as u32).into();
        }
    }
    let disk = DataHeader::ref_from_prefix(frame).map_or(0, |(h, _)| h.disk.get() as usize);
    let Some(geometry) = geometries.get(disk) else {
        return;
    };
    let Some(table) = table_mut(frame) else {
        return;
    };
    let table_end = 8 + table.len() * BLOCK_RECORD_LEN;
    let mut bits = entropy >> 4;
    for rec in table.iter_mut() {
        if bits & 3 != 3 {
            rec.codec %= 4;
            let (bs, size) = (geometry.block_size, geometry.disk_size);
            let offset = rec.offset.get() % size / bs * bs;
            let len = bs.min(size - offset);
            rec.offset = offset.into();
            rec.length = (len as u32).into();
            match Codec::from_u8(rec.codec) {
                Some(Codec::Zero) => rec.stored_len = 0.into(),
                Some(Codec::Raw) => rec.stored_len = (len as u32).into(),
                _ => {}
            }
            let (at, stored) = (
                rec.payload_offset.get() as usize,
                rec.stored_len.get() as usize,
            );
            if at < table_end || at + stored > frame_len {
                let aligned = table_end.next_multiple_of(PAYLOAD_ALIGN);
                let at = if aligned + stored <= frame_len {
                    aligned
                } else {
                    table_end
                };
                rec.payload_offset = (at as u32).into();
            }
        }
        bits = bits.rotate_right(2);
    }
}

/// Encodes a session (`geometries`) and one Data frame as a sender would: records,
/// then raw payloads aligned to 4096 and compressed ones packed.
struct FrameBuilder {
    records: Vec<BlockRecord>,
    blobs: Vec<(Vec<u8>, bool)>,
    /// Stream 1, for `ZstdStream` blocks.
    stream: StreamEncoder,
}

impl FrameBuilder {
    fn block(mut self, offset: u64, data: &[u8], codec: Codec, aligned: bool) -> Self {
        let mut stream_flags = 0;
        let stored = match codec {
            Codec::Raw => data.to_vec(),
            Codec::Zstd => zstd::bulk::compress(data, 1).expect("zstd"),
            Codec::Zero => Vec::new(),
            Codec::ZstdStream => {
                let mut out = vec![0; StreamEncoder::chunk_bound(data.len())];
                let (n, flags) = self.stream.chunk(1, data, &mut out).expect("zstd");
                out.truncate(n);
                stream_flags = flags;
                out
            }
        };
        let hash = if codec == Codec::Zero {
            ZERO_BLOCK_HASH
        } else {
            block_hash(data)
        };
        self.records.push(BlockRecord {
            offset: offset.into(),
            length: (data.len() as u32).into(),
            stored_len: (stored.len() as u32).into(),
            payload_offset: 0.into(),
            codec: codec as u8,
            stream: if codec == Codec::ZstdStream { 1 } else { 0 },
            stream_flags,
            reserved: 0,
            hash,
            reserved2: 0.into(),
        });
        self.blobs.push((stored, aligned));
        self
    }

    fn build(mut self, control: u8, disks: &[(u8, u64)], disk: u32) -> Vec<u8> {
        let mut out = vec![control | ((disks.len() as u8 - 1) << 1)];
        for &(shift, size) in disks {
            out.push(shift);
            out.extend_from_slice(&size.to_le_bytes());
        }
        let base = out.len();
        let mut frame = DataHeader {
            disk: disk.into(),
            record_count: (self.records.len() as u32).into(),
        }
        .as_bytes()
        .to_vec();
        frame.resize(8 + self.records.len() * BLOCK_RECORD_LEN, 0);
        for (rec, (blob, aligned)) in self.records.iter_mut().zip(&self.blobs) {
            if blob.is_empty() {
                continue;
            }
            if *aligned {
                frame.resize(frame.len().next_multiple_of(PAYLOAD_ALIGN), 0);
            }
            rec.payload_offset = (frame.len() as u32).into();
            frame.extend_from_slice(blob);
        }
        frame[8..8 + self.records.len() * BLOCK_RECORD_LEN]
            .copy_from_slice(self.records.as_bytes());
        out.extend_from_slice(&frame);
        debug_assert_eq!(out.len() - base, frame.len());
        out
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let new = || FrameBuilder {
        records: Vec::new(),
        blobs: Vec::new(),
        stream: StreamEncoder::new(1).expect("zstd"),
    };
    let pattern = |n: usize, seed: u8| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 9) as u8)
            .collect()
    };
    let text = b"ferry ".repeat(700)[..4096].to_vec();
    // disk 0: 4 KiB blocks, five whole blocks and a 1000-byte tail; disk 1: 8 KiB
    // blocks, three of them.
    let disks = [(0u8, 5 * 4096 + 1000), (1u8, 3 * 8192)];
    vec![
        new()
            .block(0, &pattern(4096, 1), Codec::Raw, true)
            .block(4096, &pattern(4096, 2), Codec::Raw, false)
            .block(8192, &text, Codec::Zstd, false)
            .block(12288, &[0; 4096], Codec::Zero, false)
            .block(20480, &pattern(1000, 3), Codec::Raw, true)
            .build(0, &disks, 0),
        new()
            .block(8192, &text.repeat(2), Codec::Zstd, false)
            .build(0, &disks, 1),
        // A compression stream: the second chunk needs the first as context.
        new()
            .block(0, &pattern(4096, 7), Codec::ZstdStream, false)
            .block(4096, &pattern(4096, 7), Codec::ZstdStream, false)
            .block(8192, &text, Codec::ZstdStream, false)
            .build(0, &disks, 0),
        new()
            .block(0, &pattern(8192, 4), Codec::Raw, true)
            .block(16384, &pattern(8192, 5), Codec::Raw, true)
            .build(0, &disks, 1),
        new()
            .block(20480, &pattern(1000, 6), Codec::Zstd, false)
            .block(20480, &pattern(1000, 6), Codec::Raw, false)
            .build(1, &disks, 0),
        new()
            .block(0, &[0; 4096], Codec::Zero, false)
            .build(0, &[(0, 4096)], 0),
        // Five 1 MiB zero blocks: one past the 4 MiB a frame may describe.
        (0..5u64)
            .fold(new(), |b, i| {
                b.block(i << 20, &vec![0; 1 << 20], Codec::Zero, false)
            })
            .build(0, &[(8, 8 << 20)], 0),
        // 1100 one-byte tail blocks sharing one payload: 1100 bytes of disk, but each
        // takes a 4 KiB scratch slot, more than the staging buffer holds.
        shared_payload(1100),
    ]
}

/// `count` raw records for the one-byte last block of a 4097-byte disk, all pointing
/// at the same payload byte.
fn shared_payload(count: usize) -> Vec<u8> {
    let mut input = vec![0u8, 0];
    input.extend_from_slice(&4097u64.to_le_bytes());
    let table_end = 8 + count * BLOCK_RECORD_LEN;
    let rec = BlockRecord {
        offset: 4096.into(),
        length: 1.into(),
        stored_len: 1.into(),
        payload_offset: (table_end as u32).into(),
        codec: Codec::Raw as u8,
        stream: 0,
        stream_flags: 0,
        reserved: 0,
        hash: block_hash(&[0x5a]),
        reserved2: 0.into(),
    };
    input.extend_from_slice(
        DataHeader {
            disk: 0.into(),
            record_count: (count as u32).into(),
        }
        .as_bytes(),
    );
    for _ in 0..count {
        input.extend_from_slice(rec.as_bytes());
    }
    input.push(0x5a);
    input
}
