//! Checks a data frame completely before any of it may be written: table shape, every
//! record's disk range and encoding, and every block's hash (after decompression).

use zerocopy::FromBytes;

use crate::protocol::{
    block_hash, BlockRecord, Codec, DataHeader, ErrorCode, BLOCK_RECORD_LEN, PAYLOAD_ALIGN,
    ZERO_BLOCK_HASH,
};

use super::TargetError;

/// The shape of one disk of the session, as opened.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub disk_size: u64,
    pub block_size: u64,
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
    let bad =
        |m: &str| TargetError::reject(ErrorCode::Protocol, format!("malformed data frame: {m}"));
    let (header, rest) =
        DataHeader::ref_from_prefix(payload).map_err(|_| bad("shorter than its header"))?;
    let count = header.record_count.get() as usize;
    if count == 0 {
        return Err(bad("no records"));
    }
    let table_bytes = count
        .checked_mul(BLOCK_RECORD_LEN)
        .filter(|&n| n <= rest.len())
        .ok_or_else(|| bad("record table longer than the frame"))?;
    let records = <[BlockRecord]>::ref_from_bytes(&rest[..table_bytes])
        .map_err(|_| bad("record table misaligned"))?;
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
    decompressor: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(u32, usize), TargetError> {
    verify_data_within(
        payload,
        disks,
        disk_names,
        scratch,
        decompressor,
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
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    max_logical: usize,
) -> Result<(u32, usize), TargetError> {
    let (disk, recs) = records(payload)?;
    let geometry = disks.get(disk as usize).ok_or_else(|| {
        TargetError::reject(
            ErrorCode::UnknownDisk,
            format!(
                "data frame names disk #{disk}, but the session opened {} disk(s)",
                disks.len()
            ),
        )
    })?;
    let name = &disk_names[disk as usize];
    let table_end = core::mem::size_of::<DataHeader>() + recs.len() * BLOCK_RECORD_LEN;
    let mut logical = 0usize;
    let mut scratch = scratch;
    let mut placer = Placer::new();
    let mut previous_end = 0u64;
    for (i, rec) in recs.iter().enumerate() {
        let offset = rec.offset.get();
        // Blocks travel in disk order, each once: a repeated or out-of-order block would
        // make the replica's content depend on write completion order.
        if i > 0 && offset < previous_end {
            return Err(TargetError::reject(
                ErrorCode::Protocol,
                format!("disk {name}: record {i}: block at {offset} repeats or goes back (previous block ended at {previous_end})"),
            ));
        }
        previous_end = offset.saturating_add(rec.length.get() as u64);
        let len = rec.length.get() as u64;
        let stored = rec.stored_len.get() as usize;
        let at = rec.payload_offset.get() as usize;
        let out_of_range = |what: String| {
            TargetError::reject(
                ErrorCode::OutOfRange,
                format!("disk {name}: record {i}: {what}"),
            )
        };
        if offset >= geometry.disk_size {
            return Err(out_of_range(format!(
                "offset {offset} is past the end of the disk ({} bytes)",
                geometry.disk_size
            )));
        }
        if offset % geometry.block_size != 0 {
            return Err(out_of_range(format!(
                "offset {offset} is not a multiple of the block size {}",
                geometry.block_size
            )));
        }
        let expected_len = geometry.block_size.min(geometry.disk_size - offset);
        if len != expected_len {
            return Err(out_of_range(format!(
                "block at {offset} claims {len} bytes, the block there has {expected_len}"
            )));
        }
        logical += len as usize;
        if logical > max_logical {
            return Err(out_of_range(format!(
                "frame describes more than the {max_logical} bytes of blocks the session announced"
            )));
        }
        let codec = Codec::from_u8(rec.codec).ok_or_else(|| {
            TargetError::reject(
                ErrorCode::Protocol,
                format!("disk {name}: record {i}: unknown codec {}", rec.codec),
            )
        })?;
        let payload_of = || -> Result<&[u8], TargetError> {
            if at < table_end || at.checked_add(stored).is_none_or(|end| end > payload.len()) {
                return Err(TargetError::reject(
                    ErrorCode::Protocol,
                    format!(
                        "disk {name}: record {i}: payload [{at}, +{stored}) lies outside the frame"
                    ),
                ));
            }
            Ok(&payload[at..at + stored])
        };
        let integrity = || {
            TargetError::reject(
                ErrorCode::Integrity,
                format!("disk {name}: block at offset {offset} fails its hash check: corrupted in transit"),
            )
        };
        let place = placer.place(rec);
        match codec {
            Codec::Zero => {
                if rec.hash != ZERO_BLOCK_HASH {
                    return Err(integrity());
                }
                if stored != 0 {
                    return Err(TargetError::reject(
                        ErrorCode::Protocol,
                        format!(
                            "disk {name}: record {i}: zero block carries {stored} payload bytes"
                        ),
                    ));
                }
            }
            Codec::Raw => {
                if stored as u64 != len {
                    return Err(TargetError::reject(
                        ErrorCode::Protocol,
                        format!(
                            "disk {name}: record {i}: raw block of {len} bytes stores {stored}"
                        ),
                    ));
                }
                let data = payload_of()?;
                if block_hash(data) != rec.hash {
                    return Err(integrity());
                }
                if let Place::Scratch(s) = place {
                    let scratch = scratch.as_deref_mut().ok_or(TargetError::ScratchMissing)?;
                    bounds(scratch.len(), s, len as usize)?;
                    scratch[s..s + len as usize].copy_from_slice(data);
                }
            }
            Codec::Zstd => {
                let data = payload_of()?;
                let Place::Scratch(s) = place else {
                    unreachable!("compressed blocks always decompress into scratch")
                };
                let scratch = scratch.as_deref_mut().ok_or(TargetError::ScratchMissing)?;
                bounds(scratch.len(), s, len as usize)?;
                let dst = &mut scratch[s..s + len as usize];
                // The destination is exactly the block: a frame cannot make us inflate
                // more than the block size.
                match decompressor.decompress_to_buffer(data, dst) {
                    Ok(n) if n as u64 == len => {}
                    _ => return Err(integrity()),
                }
                if block_hash(dst) != rec.hash {
                    return Err(integrity());
                }
            }
        }
    }
    Ok((disk, placer.scratch_used()))
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

fn bounds(cap: usize, at: usize, len: usize) -> Result<(), TargetError> {
    if at + len > cap {
        return Err(TargetError::reject(
            ErrorCode::OutOfRange,
            format!("frame needs more than the {cap}-byte staging buffer"),
        ));
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
                reserved: [0; 3],
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
        }];
        let names = ["d".to_string()];
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        verify_data(payload, &geometry, &names, None, &mut d)
    }

    #[test]
    fn zero_records_must_carry_the_zero_hash() {
        assert!(check(&frame(&[(0, Codec::Zero, ZERO_BLOCK_HASH)])).is_ok());
        let e = check(&frame(&[(0, Codec::Zero, [7; 16])])).unwrap_err();
        assert!(e.to_string().contains("hash"), "{e}");
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
            assert!(e.to_string().contains("repeats or goes back"), "{e}");
        }
    }
}
