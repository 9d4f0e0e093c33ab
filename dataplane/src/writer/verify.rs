//! Checks a data frame completely before any of it may be written: table shape, every
//! record's disk range and encoding, and every block's hash (after decompression).

use zerocopy::FromBytes;

use crate::protocol::zstream::{ChunkFault, StreamDecoders};
use crate::protocol::{
    block_hash, BlockRecord, Codec, DataHeader, BLOCK_RECORD_LEN, PAYLOAD_ALIGN, RECORD_GRANULE,
    STREAM_RECORDS_VERSION, ZERO_BLOCK_HASH,
};

use super::rejection::{MalformedData, RecordRange, Rejection};
use super::TargetError;

/// The shape of one disk of the session, as opened.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub disk_size: u64,
    pub block_size: u64,
    /// The session speaks [`GRANULE_RECORDS_VERSION`]: a record may be any run of
    /// 4 KiB granules inside one block, not only the whole block.
    pub granular: bool,
}

impl Geometry {
    /// Why a record of `len` bytes at `offset` (below the disk's end) is not one this
    /// session may send: a whole block, or from version 3 a run of granules inside one.
    fn misfit(&self, offset: u64, len: u64) -> Option<RecordRange> {
        let block_len = self.block_size.min(self.disk_size - offset);
        if !self.granular {
            return if !offset.is_multiple_of(self.block_size) {
                Some(RecordRange::Unaligned {
                    offset,
                    block_size: self.block_size,
                })
            } else if len != block_len {
                Some(RecordRange::Length {
                    offset,
                    len,
                    expected: block_len,
                })
            } else {
                None
            };
        }
        let block_end = ((offset / self.block_size + 1) * self.block_size).min(self.disk_size);
        let end = offset.saturating_add(len);
        if !offset.is_multiple_of(RECORD_GRANULE) {
            Some(RecordRange::Unaligned {
                offset,
                block_size: RECORD_GRANULE,
            })
        } else if len == 0
            || end > block_end
            || (!len.is_multiple_of(RECORD_GRANULE) && end != self.disk_size)
        {
            Some(RecordRange::Granules {
                offset,
                len,
                block_end,
            })
        } else {
            None
        }
    }
}

/// What decompresses a session's records: one context for blocks compressed on their
/// own, and from [`STREAM_RECORDS_VERSION`] on the session's compression streams.
pub struct Decoders {
    bulk: zstd::bulk::Decompressor<'static>,
    /// `None` before version 4: a stream chunk is then an unknown codec.
    streams: Option<StreamDecoders>,
}

impl Decoders {
    /// The decoders of a session that speaks protocol `version`.
    pub fn new(version: u16) -> Result<Self, TargetError> {
        Ok(Self {
            bulk: zstd::bulk::Decompressor::new().map_err(TargetError::Zstd)?,
            streams: (version >= STREAM_RECORDS_VERSION).then(StreamDecoders::default),
        })
    }
}

/// Most uncompressed bytes one data frame may describe (the largest I/O size). Bounds
/// what a frame can make the target decompress and write.
pub const MAX_FRAME_LOGICAL: usize = 4 << 20;

/// Where the bytes of a verified block are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// In the receive buffer at this payload offset, aligned for O_DIRECT.
    Recv(usize),
    /// In the scratch buffer at this offset (decompressed, or copied to align).
    Scratch(usize),
    /// The block reads as zeros.
    Zero,
}

/// Decides where each record's bytes live; the verifier and the applier walk records
/// in the same order and so agree on every placement.
#[derive(Default)]
pub struct Placer {
    scratch_cursor: usize,
}

impl Placer {
    pub fn new() -> Self {
        Self { scratch_cursor: 0 }
    }

    pub fn place(&mut self, rec: &BlockRecord) -> Place {
        let len = rec.length.get() as usize;
        match Codec::from_u8(rec.codec) {
            Some(Codec::Raw)
                if (rec.payload_offset.get() as usize).is_multiple_of(PAYLOAD_ALIGN)
                    && len.is_multiple_of(4096) =>
            {
                Place::Recv(rec.payload_offset.get() as usize)
            }
            Some(Codec::Zero) => Place::Zero,
            _ => {
                let at = self.scratch_cursor;
                self.scratch_cursor += len.next_multiple_of(PAYLOAD_ALIGN);
                Place::Scratch(at)
            }
        }
    }

    /// Scratch bytes used so far.
    pub fn scratch_used(&self) -> usize {
        self.scratch_cursor
    }
}

/// The parsed table of a data frame.
pub fn records(payload: &[u8]) -> Result<(u32, &[BlockRecord]), TargetError> {
    let bad = |why: MalformedData| TargetError::from(Rejection::MalformedData(why));
    let (header, rest) =
        DataHeader::ref_from_prefix(payload).map_err(|_| bad(MalformedData::Short))?;
    let count = header.record_count.get() as usize;
    if count == 0 {
        return Err(bad(MalformedData::NoRecords));
    }
    let table_bytes = count
        .checked_mul(BLOCK_RECORD_LEN)
        .filter(|&n| n <= rest.len())
        .ok_or_else(|| bad(MalformedData::TableTooLong))?;
    let records = <[BlockRecord]>::ref_from_bytes(&rest[..table_bytes])
        .map_err(|_| bad(MalformedData::TableMisaligned))?;
    Ok((header.disk.get(), records))
}

/// Verifies a data frame. On success every non-zero block's bytes sit where
/// [`Placer`] says, verified against its hash; `needs_scratch` tells whether
/// `scratch` was used. Nothing is written anywhere.
pub fn verify_data(
    payload: &[u8],
    disks: &[Geometry],
    disk_names: &[String],
    scratch: Option<&mut [u8]>,
    decoders: &mut Decoders,
) -> Result<(u32, usize), TargetError> {
    verify_data_within(
        payload,
        disks,
        disk_names,
        scratch,
        decoders,
        MAX_FRAME_LOGICAL,
    )
}

/// [`verify_data`] for a session that announced at most `max_logical` bytes of disk
/// per frame.
pub fn verify_data_within(
    payload: &[u8],
    disks: &[Geometry],
    disk_names: &[String],
    scratch: Option<&mut [u8]>,
    decoders: &mut Decoders,
    max_logical: usize,
) -> Result<(u32, usize), TargetError> {
    let (disk, recs) = records(payload)?;
    let geometry = *disks.get(disk as usize).ok_or(Rejection::DataUnknownDisk {
        disk,
        opened: disks.len(),
    })?;
    let mut frame = FrameCheck {
        payload,
        table_end: core::mem::size_of::<DataHeader>() + recs.len() * BLOCK_RECORD_LEN,
        geometry,
        name: &disk_names[disk as usize],
        max_logical,
        logical: 0,
        previous_end: 0,
        placer: Placer::new(),
        scratch,
        decoders,
    };
    for (i, rec) in recs.iter().enumerate() {
        frame.check_range(i, rec)?;
        frame.check_block(i, rec)?;
    }
    Ok((disk, frame.placer.scratch_used()))
}

/// One data frame being verified, record by record, in order.
struct FrameCheck<'a> {
    payload: &'a [u8],
    /// Where the record table ends: no payload may start before it.
    table_end: usize,
    geometry: Geometry,
    name: &'a str,
    max_logical: usize,
    /// Bytes of disk the records checked so far describe.
    logical: usize,
    /// Where the previous record's block ended.
    previous_end: u64,
    placer: Placer,
    scratch: Option<&'a mut [u8]>,
    decoders: &'a mut Decoders,
}

impl<'a> FrameCheck<'a> {
    /// Checks where record `i` lies: after the previous block, on a block of the disk,
    /// and within what the session announced per frame.
    fn check_range(&mut self, i: usize, rec: &BlockRecord) -> Result<(), TargetError> {
        let offset = rec.offset.get();
        let len = rec.length.get() as u64;
        // Blocks travel in disk order, each once: a repeated or out-of-order block would
        // make the replica's content depend on write completion order.
        if i > 0 && offset < self.previous_end {
            return Err(Rejection::GoesBack {
                disk: self.name.to_string(),
                record: i,
                offset,
                previous_end: self.previous_end,
            }
            .into());
        }
        self.previous_end = offset.saturating_add(len);
        let g = self.geometry;
        let why = if offset >= g.disk_size {
            Some(RecordRange::PastEnd {
                offset,
                disk_size: g.disk_size,
            })
        } else if let Some(why) = g.misfit(offset, len) {
            Some(why)
        } else {
            self.logical += len as usize;
            (self.logical > self.max_logical).then_some(RecordRange::OverAnnounced {
                max_logical: self.max_logical,
            })
        };
        match why {
            Some(why) => Err(Rejection::RecordOutside {
                disk: self.name.to_string(),
                record: i,
                why,
            }
            .into()),
            None => Ok(()),
        }
    }

    /// Checks record `i`'s encoding and its block's hash, leaving the block's bytes
    /// where [`Placer`] says.
    fn check_block(&mut self, i: usize, rec: &BlockRecord) -> Result<(), TargetError> {
        let codec = Codec::from_u8(rec.codec).ok_or_else(|| Rejection::UnknownCodec {
            disk: self.name.to_string(),
            record: i,
            codec: rec.codec,
        })?;
        let place = self.placer.place(rec);
        let stored = rec.stored_len.get() as usize;
        match codec {
            Codec::Zero => {
                if rec.hash != ZERO_BLOCK_HASH {
                    return Err(self.integrity(rec));
                }
                if stored != 0 {
                    return Err(Rejection::ZeroCarriesPayload {
                        disk: self.name.to_string(),
                        record: i,
                        stored,
                    }
                    .into());
                }
                Ok(())
            }
            Codec::Raw => self.check_raw(i, rec, place),
            Codec::Zstd => self.check_zstd(i, rec, place),
            Codec::ZstdStream => self.check_stream(i, rec, place),
        }
    }

    fn check_raw(&mut self, i: usize, rec: &BlockRecord, place: Place) -> Result<(), TargetError> {
        let len = rec.length.get() as usize;
        let stored = rec.stored_len.get() as usize;
        if stored != len {
            return Err(Rejection::RawLength {
                disk: self.name.to_string(),
                record: i,
                len: len as u64,
                stored,
            }
            .into());
        }
        let data = self.payload_of(i, rec)?;
        if block_hash(data) != rec.hash {
            return Err(self.integrity(rec));
        }
        if let Place::Scratch(s) = place {
            let scratch = self.scratch_at(s, len)?;
            scratch.copy_from_slice(data);
        }
        Ok(())
    }

    fn check_zstd(&mut self, i: usize, rec: &BlockRecord, place: Place) -> Result<(), TargetError> {
        let data = self.payload_of(i, rec)?;
        let integrity = self.integrity(rec);
        let dst = scratch_dst(&mut self.scratch, place, rec)?;
        // The destination is exactly the block: a frame cannot make us inflate more
        // than the block size.
        match self.decoders.bulk.decompress_to_buffer(data, dst) {
            Ok(n) if n == dst.len() && block_hash(dst) == rec.hash => Ok(()),
            _ => Err(integrity),
        }
    }

    /// A chunk of a compression stream: decoded after the stream's earlier chunks.
    fn check_stream(
        &mut self,
        i: usize,
        rec: &BlockRecord,
        place: Place,
    ) -> Result<(), TargetError> {
        let data = self.payload_of(i, rec)?;
        let integrity = self.integrity(rec);
        let rejected = |why: &'static str| Rejection::StreamChunk {
            disk: self.name.to_string(),
            record: i,
            stream: rec.stream,
            why,
        };
        let Some(streams) = self.decoders.streams.as_mut() else {
            return Err(Rejection::UnknownCodec {
                disk: self.name.to_string(),
                record: i,
                codec: rec.codec,
            }
            .into());
        };
        let dst = scratch_dst(&mut self.scratch, place, rec)?;
        let why = match streams.decode((rec.stream, rec.stream_flags), data, dst) {
            Ok(()) if block_hash(dst) == rec.hash => return Ok(()),
            Ok(()) | Err(ChunkFault::Corrupt) => return Err(integrity),
            Err(ChunkFault::UnknownStream) => "no such stream",
            Err(ChunkFault::UnknownFlags) => "unknown flags",
            Err(ChunkFault::NotStarted) => "continues a stream not started on this connection",
        };
        Err(rejected(why).into())
    }

    /// Record `i`'s stored bytes, which must lie in the frame after the record table.
    fn payload_of(&self, i: usize, rec: &BlockRecord) -> Result<&'a [u8], TargetError> {
        let stored = rec.stored_len.get() as usize;
        let at = rec.payload_offset.get() as usize;
        let payload = self.payload;
        if at < self.table_end || at.checked_add(stored).is_none_or(|end| end > payload.len()) {
            return Err(Rejection::PayloadOutside {
                disk: self.name.to_string(),
                record: i,
                at,
                stored,
            }
            .into());
        }
        Ok(&payload[at..at + stored])
    }

    /// `len` bytes of scratch at `at`.
    fn scratch_at(&mut self, at: usize, len: usize) -> Result<&mut [u8], TargetError> {
        let scratch = self
            .scratch
            .as_deref_mut()
            .ok_or(TargetError::ScratchMissing)?;
        bounds(scratch.len(), at, len)?;
        Ok(&mut scratch[at..at + len])
    }

    fn integrity(&self, rec: &BlockRecord) -> TargetError {
        Rejection::HashMismatch {
            disk: self.name.to_string(),
            offset: rec.offset.get(),
        }
        .into()
    }
}

/// The largest Data frame payload a session announcing `max_logical` bytes per frame
/// in blocks of at least `min_block` bytes can send: the padded record table, the
/// blocks, and alignment slack for a short last block.
pub fn frame_bound(max_logical: usize, min_block: usize) -> usize {
    let records = max_logical.div_ceil(min_block);
    let table = (core::mem::size_of::<DataHeader>() + records * BLOCK_RECORD_LEN)
        .next_multiple_of(PAYLOAD_ALIGN);
    (table + max_logical + PAYLOAD_ALIGN).next_multiple_of(PAYLOAD_ALIGN)
}

/// Whether verifying this frame will need a scratch buffer.
pub fn needs_scratch(payload: &[u8]) -> Result<bool, TargetError> {
    let (_, recs) = records(payload)?;
    let mut placer = Placer::new();
    for rec in recs {
        placer.place(rec);
    }
    Ok(placer.scratch_used() > 0)
}

/// Where a compressed record decompresses to: its block's bytes of scratch.
fn scratch_dst<'s>(
    scratch: &'s mut Option<&mut [u8]>,
    place: Place,
    rec: &BlockRecord,
) -> Result<&'s mut [u8], TargetError> {
    let Place::Scratch(at) = place else {
        unreachable!("compressed blocks always decompress into scratch")
    };
    let len = rec.length.get() as usize;
    let scratch = scratch.as_deref_mut().ok_or(TargetError::ScratchMissing)?;
    bounds(scratch.len(), at, len)?;
    Ok(&mut scratch[at..at + len])
}

fn bounds(cap: usize, at: usize, len: usize) -> Result<(), TargetError> {
    if at + len > cap {
        return Err(Rejection::StagingTooSmall { cap }.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn frame(records: &[(u64, Codec, [u8; 16])]) -> Vec<u8> {
        let mut out = DataHeader {
            disk: 0.into(),
            record_count: (records.len() as u32).into(),
        }
        .as_bytes()
        .to_vec();
        for &(offset, codec, hash) in records {
            let rec = BlockRecord {
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
            };
            out.extend_from_slice(rec.as_bytes());
        }
        out
    }

    fn check(payload: &[u8]) -> Result<(u32, usize), TargetError> {
        let geometry = [Geometry {
            disk_size: 1 << 20,
            block_size: 4096,
            granular: false,
        }];
        let names = ["d".to_string()];
        let mut d = Decoders::new(STREAM_RECORDS_VERSION).unwrap();
        verify_data(payload, &geometry, &names, None, &mut d)
    }

    #[test]
    fn zero_records_must_carry_the_zero_hash() {
        assert!(check(&frame(&[(0, Codec::Zero, ZERO_BLOCK_HASH)])).is_ok());
        let e = check(&frame(&[(0, Codec::Zero, [7; 16])])).unwrap_err();
        assert!(
            matches!(
                e,
                TargetError::Rejected(Rejection::HashMismatch { offset: 0, .. })
            ),
            "{e}"
        );
    }

    #[test]
    fn repeated_or_backward_blocks_are_rejected() {
        let z = ZERO_BLOCK_HASH;
        assert!(check(&frame(&[(0, Codec::Zero, z), (8192, Codec::Zero, z)])).is_ok());
        for recs in [
            [(4096, Codec::Zero, z), (4096, Codec::Zero, z)],
            [(8192, Codec::Zero, z), (0, Codec::Zero, z)],
        ] {
            let e = check(&frame(&recs)).unwrap_err();
            assert!(
                matches!(e, TargetError::Rejected(Rejection::GoesBack { .. })),
                "{e}"
            );
        }
    }

    #[test]
    fn granule_records_only_from_version_3_and_only_inside_one_block() {
        let bs = 64 << 10;
        let whole = Geometry {
            disk_size: 10 * bs + 6144,
            block_size: bs,
            granular: false,
        };
        let granular = Geometry {
            granular: true,
            ..whole
        };
        // A whole block fits both; a granule run only version 3.
        assert_eq!(whole.misfit(bs, bs), None);
        assert_eq!(granular.misfit(bs, bs), None);
        assert!(matches!(
            whole.misfit(bs + 4096, 8192),
            Some(RecordRange::Unaligned { .. })
        ));
        assert_eq!(granular.misfit(bs + 4096, 8192), None);
        assert!(matches!(
            whole.misfit(bs, 4096),
            Some(RecordRange::Length { .. })
        ));
        assert_eq!(granular.misfit(bs, 4096), None);
        // Not on a granule, not whole granules, across the block's end, empty.
        assert!(matches!(
            granular.misfit(bs + 512, 4096),
            Some(RecordRange::Unaligned { .. })
        ));
        for (offset, len) in [(bs, 5000), (2 * bs - 4096, 8192), (bs, 0)] {
            assert!(
                matches!(
                    granular.misfit(offset, len),
                    Some(RecordRange::Granules { .. })
                ),
                "{offset} {len}"
            );
        }
        // The disk's tail: a partial granule only where the disk ends.
        assert_eq!(granular.misfit(10 * bs + 4096, 2048), None);
        assert!(granular.misfit(10 * bs, 2048).is_some());
    }
}
