//! Compression streams ([`Codec::ZstdStream`](super::Codec::ZstdStream), protocol 4):
//! both ends of one.
//!
//! A block compressed on its own starts from an empty history: the 64 KiB blocks of an
//! OS image compress to 207 MB at zstd 1 that way, against 176 MB for the same blocks
//! as one stream with an 8 MiB window. So each source worker keeps one zstd stream for
//! its run and compresses every block as the next chunk of it, flushing at the chunk's
//! end: the chunk then decodes whole, given the chunks before it. The target decodes a
//! stream's chunks in the order they arrive, which is the order the worker made them
//! (a worker takes its reads in plan order and the sender sends in plan order).
//!
//! A stream restarts (a new zstd frame, the chunk flagged [`STREAM_START`]) whenever its
//! level changes, since a level holds for a whole frame. Blocks that go raw or as zeros
//! do not touch the stream: the decoder never needs them.

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

use super::wire::{MAX_STREAMS, STREAM_START, STREAM_WINDOW_LOG_MAX};

/// Largest zstd block: a chunk takes one block header per this many bytes.
const ZSTD_BLOCK_MAX: usize = 128 << 10;
/// Largest zstd frame header.
const ZSTD_FRAME_HEADER_MAX: usize = 18;
/// A zstd block header.
const ZSTD_BLOCK_HEADER: usize = 3;

/// A zstd call failed; zstd's own words.
#[derive(Debug, thiserror::Error)]
#[error("zstd: {0}")]
pub struct ZstdFailure(pub &'static str);

fn failure(code: usize) -> ZstdFailure {
    ZstdFailure(zstd_safe::get_error_name(code))
}

/// The source's end of one compression stream.
pub struct StreamEncoder {
    id: u8,
    cctx: CCtx<'static>,
    /// The level of the zstd frame under way; `None`: the next chunk starts one.
    level: Option<i32>,
}

impl StreamEncoder {
    /// Stream `id` (below [`MAX_STREAMS`]).
    pub fn new(id: u8) -> Result<Self, ZstdFailure> {
        debug_assert!((id as usize) < MAX_STREAMS);
        let mut cctx = CCtx::try_create().ok_or(ZstdFailure("cannot create a context"))?;
        cctx.set_parameter(CParameter::WindowLog(STREAM_WINDOW_LOG_MAX))
            .map_err(failure)?;
        Ok(Self {
            id,
            cctx,
            level: None,
        })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// The most bytes a chunk of `len` bytes can take: zstd stores a block that does
    /// not shrink as it is, behind a block header; the first chunk of a frame also
    /// carries the frame header.
    pub fn chunk_bound(len: usize) -> usize {
        len + ZSTD_BLOCK_HEADER * (len.div_ceil(ZSTD_BLOCK_MAX) + 1) + ZSTD_FRAME_HEADER_MAX
    }

    /// Compresses `block` at `level` as the stream's next chunk into the front of
    /// `out`, which must hold [`Self::chunk_bound`] bytes; returns the chunk's length
    /// and its [`BlockRecord::stream_flags`](super::BlockRecord::stream_flags).
    pub fn chunk(
        &mut self,
        level: i32,
        block: &[u8],
        out: &mut [u8],
    ) -> Result<(usize, u8), ZstdFailure> {
        let mut flags = 0;
        if self.level != Some(level) {
            self.cctx
                .reset(zstd_safe::ResetDirective::SessionOnly)
                .map_err(failure)?;
            self.cctx
                .set_parameter(CParameter::CompressionLevel(level))
                .map_err(failure)?;
            flags = STREAM_START;
        }
        // Until the chunk is whole the stream is in no state to continue.
        self.level = None;
        let mut input = InBuffer::around(block);
        let mut output = OutBuffer::around(out);
        loop {
            let left = self
                .cctx
                .compress_stream2(
                    &mut output,
                    &mut input,
                    zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush,
                )
                .map_err(failure)?;
            if left == 0 && input.pos() == block.len() {
                break;
            }
            if output.pos() == output.capacity() {
                return Err(ZstdFailure("chunk larger than its bound"));
            }
        }
        self.level = Some(level);
        Ok((output.pos(), flags))
    }
}

/// Why a stream chunk cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkFault {
    /// The stream number is not below [`MAX_STREAMS`].
    UnknownStream,
    /// Flags other than [`STREAM_START`].
    UnknownFlags,
    /// The chunk continues a stream that was never started on this connection.
    NotStarted,
    /// zstd refused the chunk, or it decoded to another length.
    Corrupt,
}

/// The target's ends of a session's compression streams, made on first use.
#[derive(Default)]
pub struct StreamDecoders {
    streams: Vec<Option<DCtx<'static>>>,
    /// Per stream: a frame was started and every chunk since decoded.
    live: [bool; MAX_STREAMS],
}

impl StreamDecoders {
    /// Decodes `chunk` of stream `id` into exactly `dst`.
    pub fn decode(
        &mut self,
        (id, flags): (u8, u8),
        chunk: &[u8],
        dst: &mut [u8],
    ) -> Result<(), ChunkFault> {
        let id = id as usize;
        if id >= MAX_STREAMS {
            return Err(ChunkFault::UnknownStream);
        }
        if flags & !STREAM_START != 0 {
            return Err(ChunkFault::UnknownFlags);
        }
        if self.streams.len() <= id {
            self.streams.resize_with(id + 1, || None);
        }
        if flags & STREAM_START != 0 {
            let dctx = match &mut self.streams[id] {
                Some(d) => d,
                slot => slot.insert(new_decoder().ok_or(ChunkFault::Corrupt)?),
            };
            dctx.reset(zstd_safe::ResetDirective::SessionOnly)
                .map_err(|_| ChunkFault::Corrupt)?;
        } else if !self.live[id] {
            return Err(ChunkFault::NotStarted);
        }
        let Some(dctx) = self.streams[id].as_mut() else {
            return Err(ChunkFault::NotStarted);
        };
        // Until the chunk decoded whole the stream cannot continue.
        self.live[id] = false;
        decode_into(dctx, chunk, dst)?;
        self.live[id] = true;
        Ok(())
    }
}

/// A decoder whose window is at most what a stream may use.
fn new_decoder() -> Option<DCtx<'static>> {
    let mut dctx = DCtx::try_create()?;
    dctx.set_parameter(DParameter::WindowLogMax(STREAM_WINDOW_LOG_MAX))
        .ok()?;
    Some(dctx)
}

/// Feeds `chunk` to `dctx` until it is consumed; it must fill `dst` exactly.
fn decode_into(dctx: &mut DCtx<'static>, chunk: &[u8], dst: &mut [u8]) -> Result<(), ChunkFault> {
    let mut input = InBuffer::around(chunk);
    let mut output = OutBuffer::around(dst);
    while input.pos() < chunk.len() {
        let before = (input.pos(), output.pos());
        dctx.decompress_stream(&mut output, &mut input)
            .map_err(|_| ChunkFault::Corrupt)?;
        if (input.pos(), output.pos()) == before {
            // Output full and input left: the chunk holds more than its block.
            return Err(ChunkFault::Corrupt);
        }
    }
    if output.pos() != output.capacity() {
        return Err(ChunkFault::Corrupt);
    }
    // The decoder may hold bytes it could not place: then the chunk decodes to more
    // than its block.
    let mut spare = [0u8; 1];
    let mut more = OutBuffer::around(&mut spare[..]);
    dctx.decompress_stream(&mut more, &mut InBuffer::around(&[]))
        .map_err(|_| ChunkFault::Corrupt)?;
    if more.pos() != 0 {
        return Err(ChunkFault::Corrupt);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks that compress well only with the ones before them as context.
    fn blocks() -> Vec<Vec<u8>> {
        let mut seed = 7u64;
        let base: Vec<u8> = (0..65536)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                (seed >> 56) as u8
            })
            .collect();
        (0..6u8)
            .map(|i| {
                let mut b = base.clone();
                b[usize::from(i) * 100] ^= 0xff;
                b
            })
            .collect()
    }

    fn encode_all(
        enc: &mut StreamEncoder,
        levels: &[i32],
        blocks: &[Vec<u8>],
    ) -> Vec<(Vec<u8>, u8)> {
        blocks
            .iter()
            .zip(levels)
            .map(|(b, &level)| {
                let mut out = vec![0u8; StreamEncoder::chunk_bound(b.len())];
                let (n, flags) = enc.chunk(level, b, &mut out).unwrap();
                out.truncate(n);
                (out, flags)
            })
            .collect()
    }

    #[test]
    fn chunks_decode_in_order_and_later_ones_use_the_earlier_as_context() {
        let blocks = blocks();
        let mut enc = StreamEncoder::new(3).unwrap();
        let chunks = encode_all(&mut enc, &[1, 1, 1, 3, 3, 3], &blocks);
        // Random bytes: the first chunk of each frame cannot shrink, the rest repeat it.
        assert_eq!(chunks[0].1, STREAM_START);
        assert!(chunks[0].0.len() > 65536);
        assert_eq!(chunks[1].1, 0);
        assert!(chunks[1].0.len() < 1024, "{}", chunks[1].0.len());
        assert_eq!(chunks[3].1, STREAM_START, "a new level starts a new frame");
        let mut dec = StreamDecoders::default();
        for ((chunk, flags), block) in chunks.iter().zip(&blocks) {
            let mut dst = vec![0u8; block.len()];
            dec.decode((3, *flags), chunk, &mut dst).unwrap();
            assert_eq!(&dst, block);
        }
    }

    #[test]
    fn a_chunk_out_of_its_stream_is_refused() {
        let blocks = blocks();
        let mut enc = StreamEncoder::new(0).unwrap();
        let chunks = encode_all(&mut enc, &[1, 1], &blocks[..2]);
        let mut dst = vec![0u8; 65536];
        let mut dec = StreamDecoders::default();
        // A continuation on a stream never started.
        assert_eq!(
            dec.decode((0, chunks[1].1), &chunks[1].0, &mut dst),
            Err(ChunkFault::NotStarted)
        );
        assert_eq!(
            dec.decode((MAX_STREAMS as u8, STREAM_START), &chunks[0].0, &mut dst),
            Err(ChunkFault::UnknownStream)
        );
        assert_eq!(
            dec.decode((0, 2), &chunks[0].0, &mut dst),
            Err(ChunkFault::UnknownFlags)
        );
        // A chunk decoding to another length, then the stream stays dead.
        let mut short = vec![0u8; 4096];
        assert_eq!(
            dec.decode((0, STREAM_START), &chunks[0].0, &mut short),
            Err(ChunkFault::Corrupt)
        );
        assert_eq!(
            dec.decode((0, 0), &chunks[1].0, &mut dst),
            Err(ChunkFault::NotStarted)
        );
        // A damaged chunk.
        let mut bad = chunks[0].0.clone();
        bad[0] ^= 0xff;
        assert_eq!(
            dec.decode((0, STREAM_START), &bad, &mut dst),
            Err(ChunkFault::Corrupt)
        );
    }
}
