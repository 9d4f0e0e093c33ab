//! Framing: every message is a 32-byte [`FrameHeader`] and a checksummed payload.
//!
//! The reader validates in the order that lets nothing unverified through: magic,
//! header checksum, kind, length bound, sequence number — all before a payload byte is
//! read — then the payload checksum before the payload is handed to the caller.
//!
//! The payload checksum covers the whole payload, except that of a Data frame once
//! the handshake agreed on [`TABLE_HASH_VERSION`] or later: it covers the record table
//! ([`data_table_extent`]), and the block payloads are left to their records' block
//! hashes, which the target verifies before it writes anything.

use std::io::{self, IoSlice, Read, Write};

use xxhash_rust::xxh3::{xxh3_64, Xxh3};
use zerocopy::{FromBytes, IntoBytes};

use super::deadline::FrameDeadline;
use super::wire::{
    DataHeader, ErrorCode, ErrorHeader, FrameHeader, FrameKind, BLOCK_RECORD_LEN, FRAME_HEADER_LEN,
    FRAME_MAGIC, MAX_ERROR_MESSAGE, MAX_FRAME_PAYLOAD, PAYLOAD_ALIGN, TABLE_HASH_VERSION,
};
use super::ProtocolError;

/// How many leading bytes of a Data payload of `payload_len` bytes that starts with
/// `prefix` its frame's payload hash covers from [`TABLE_HASH_VERSION`] on: the
/// [`DataHeader`], its `record_count` records and the padding after them up to the
/// next [`PAYLOAD_ALIGN`] boundary (where the sender places the first block payload) —
/// or the whole payload, when it is shorter than that or than a `DataHeader`.
///
/// A damaged `record_count` moves the end of the covered range, so the hash of the
/// range the receiver computes does not match the sender's either.
pub fn data_table_extent(payload_len: usize, prefix: &[u8]) -> usize {
    let Ok((header, _)) = DataHeader::ref_from_prefix(prefix) else {
        return payload_len;
    };
    (header.record_count.get() as usize)
        .checked_mul(BLOCK_RECORD_LEN)
        .and_then(|n| n.checked_add(DATA_HEADER_LEN))
        .and_then(|n| n.checked_next_multiple_of(PAYLOAD_ALIGN))
        .map_or(payload_len, |n| n.min(payload_len))
}

const DATA_HEADER_LEN: usize = core::mem::size_of::<DataHeader>();

/// True when a frame of `kind` hashes only its record table under `version`.
fn hashes_table_only(kind: FrameKind, version: u16) -> bool {
    kind == FrameKind::Data && version >= TABLE_HASH_VERSION
}

/// The version a framer speaks until a handshake agreed on one: every payload is
/// hashed whole, as in versions 2 and 3.
const VERSION_BEFORE_HANDSHAKE: u16 = 0;

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
    /// Sequence number the next frame must carry.
    next_seq: u32,
    /// Started for every header and every payload read (see [`FrameDeadline`]).
    deadline: Option<FrameDeadline>,
    /// The protocol version the handshake agreed (see [`FrameReader::set_version`]).
    version: u16,
}

/// A validated frame header: the payload has not been read yet.
#[derive(Debug, Clone, Copy)]
pub struct Incoming {
    pub kind: FrameKind,
    pub payload_len: usize,
    payload_hash: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            next_seq: 0,
            deadline: None,
            version: VERSION_BEFORE_HANDSHAKE,
        }
    }

    /// A reader whose every header and every payload must arrive within `deadline`'s
    /// per-frame timeout of the moment it is asked for; `inner` must enforce it (a
    /// [`TimedStream`](super::deadline::TimedStream) under the same deadline). The
    /// payload gets its own budget because the receiver may wait for a buffer between
    /// the two — local back-pressure, not the network.
    pub fn with_deadline(inner: R, deadline: FrameDeadline) -> Self {
        Self {
            inner,
            next_seq: 0,
            deadline: Some(deadline),
            version: VERSION_BEFORE_HANDSHAKE,
        }
    }

    /// Reads the frames that follow under protocol `version`, which decides what a Data
    /// frame's payload hash covers; the handshake sets it once the version is agreed.
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    fn start_deadline(&self) {
        if let Some(d) = &self.deadline {
            d.start_frame();
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads and validates the next header. `Ok(None)` means the peer closed the
    /// connection cleanly at a frame boundary.
    pub fn next_header(&mut self) -> Result<Option<Incoming>, ProtocolError> {
        self.start_deadline();
        let mut raw = [0u8; FRAME_HEADER_LEN];
        let mut got = 0;
        while got < raw.len() {
            match self.inner.read(&mut raw[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(ProtocolError::Truncated {
                        what: "frame header",
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtocolError::io("reading frame header", e)),
            }
        }
        let header = FrameHeader::read_from_bytes(&raw).expect("32 bytes match the header");
        if header.magic.get() != FRAME_MAGIC {
            return Err(ProtocolError::BadMagic {
                found: header.magic.get(),
            });
        }
        if xxh3_64(&raw[..24]) != header.header_hash.get() {
            return Err(ProtocolError::HeaderChecksum);
        }
        let kind = FrameKind::from_u8(header.kind)
            .ok_or(ProtocolError::UnknownKind { kind: header.kind })?;
        let payload_len = header.payload_len.get() as usize;
        if payload_len > MAX_FRAME_PAYLOAD {
            return Err(ProtocolError::Oversized {
                kind,
                len: payload_len,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        if header.seq.get() != self.next_seq {
            return Err(ProtocolError::Sequence {
                expected: self.next_seq,
                found: header.seq.get(),
            });
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(Some(Incoming {
            kind,
            payload_len,
            payload_hash: header.payload_hash.get(),
        }))
    }

    /// Reads the payload of `incoming` into `buf[..payload_len]` and verifies its
    /// checksum: over the whole payload, or only the record table of a Data frame from
    /// [`TABLE_HASH_VERSION`] on (its blocks are the caller's to verify).
    pub fn read_payload<'b>(
        &mut self,
        incoming: &Incoming,
        buf: &'b mut [u8],
    ) -> Result<&'b mut [u8], ProtocolError> {
        let len = incoming.payload_len;
        if buf.len() < len {
            return Err(ProtocolError::Oversized {
                kind: incoming.kind,
                len,
                max: buf.len(),
            });
        }
        let payload = &mut buf[..len];
        self.start_deadline();
        self.inner.read_exact(payload).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtocolError::Truncated {
                    what: "frame payload",
                }
            } else {
                ProtocolError::io("reading frame payload", e)
            }
        })?;
        if hashes_table_only(incoming.kind, self.version) {
            let covered = data_table_extent(len, payload);
            if xxh3_64(&payload[..covered]) != incoming.payload_hash {
                return Err(ProtocolError::TableChecksum);
            }
        } else if xxh3_64(payload) != incoming.payload_hash {
            return Err(ProtocolError::PayloadChecksum {
                kind: incoming.kind,
            });
        }
        Ok(payload)
    }

    /// Reads a whole frame into `buf`; an Error frame from the peer becomes
    /// [`ProtocolError::Remote`]. `Ok(None)` on a clean close.
    pub fn read_frame<'b>(
        &mut self,
        buf: &'b mut [u8],
    ) -> Result<Option<(FrameKind, &'b mut [u8])>, ProtocolError> {
        let Some(incoming) = self.next_header()? else {
            return Ok(None);
        };
        let payload = self.read_payload(&incoming, buf)?;
        if incoming.kind == FrameKind::Error {
            return Err(decode_error(payload));
        }
        Ok(Some((incoming.kind, payload)))
    }

    /// Like [`read_frame`](Self::read_frame) but insists on `expected`.
    pub fn expect<'b>(
        &mut self,
        expected: FrameKind,
        buf: &'b mut [u8],
    ) -> Result<&'b mut [u8], ProtocolError> {
        match self.read_frame(buf)? {
            Some((kind, payload)) if kind == expected => Ok(payload),
            Some((kind, _)) => Err(ProtocolError::Unexpected {
                expected,
                found: kind,
            }),
            None => Err(ProtocolError::Truncated {
                what: "connection closed by peer",
            }),
        }
    }
}

/// Turns an Error frame payload into [`ProtocolError::Remote`].
pub fn decode_error(payload: &[u8]) -> ProtocolError {
    let Ok((header, rest)) = ErrorHeader::ref_from_prefix(payload) else {
        return ProtocolError::Malformed {
            what: "error frame shorter than its header",
        };
    };
    let len = (header.message_len.get() as usize).min(rest.len());
    ProtocolError::Remote {
        code: ErrorCode::from_u32(header.code.get()),
        message: String::from_utf8_lossy(&rest[..len]).into_owned(),
    }
}

/// Writes frames to a byte stream.
pub struct FrameWriter<W> {
    inner: W,
    next_seq: u32,
    /// Started for every frame sent (see [`FrameDeadline`]).
    deadline: Option<FrameDeadline>,
    /// The protocol version the handshake agreed (see [`FrameWriter::set_version`]).
    version: u16,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            next_seq: 0,
            deadline: None,
            version: VERSION_BEFORE_HANDSHAKE,
        }
    }

    /// A writer whose every frame must be on the socket within `deadline`'s per-frame
    /// timeout of the start of its send, however the bytes trickle; `inner` must
    /// enforce it (a [`TimedStream`](super::deadline::TimedStream) under the same
    /// deadline).
    pub fn with_deadline(inner: W, deadline: FrameDeadline) -> Self {
        Self {
            inner,
            next_seq: 0,
            deadline: Some(deadline),
            version: VERSION_BEFORE_HANDSHAKE,
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Sends the frames that follow under protocol `version`, which decides what a Data
    /// frame's payload hash covers; the handshake sets it once the version is agreed.
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// Sends one frame whose payload is the concatenation of `parts`, with one
    /// vectored write where the kernel allows (no copy of the payload).
    pub fn send(&mut self, kind: FrameKind, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(
            payload_len <= MAX_FRAME_PAYLOAD,
            "frame of {payload_len} bytes built past the protocol bound"
        );
        let covered = if hashes_table_only(kind, self.version) {
            let (prefix, got) = payload_prefix(parts);
            data_table_extent(payload_len, &prefix[..got])
        } else {
            payload_len
        };
        let mut hasher = Xxh3::new();
        let mut left = covered;
        for part in parts {
            let n = part.len().min(left);
            hasher.update(&part[..n]);
            left -= n;
        }
        let mut header = FrameHeader {
            magic: FRAME_MAGIC.into(),
            kind: kind as u8,
            flags: 0,
            reserved: 0.into(),
            payload_len: (payload_len as u32).into(),
            seq: self.next_seq.into(),
            payload_hash: hasher.digest().into(),
            header_hash: 0.into(),
        };
        header.header_hash = xxh3_64(&header.as_bytes()[..24]).into();
        self.next_seq = self.next_seq.wrapping_add(1);
        if let Some(d) = &self.deadline {
            d.start_frame();
        }

        // Data frames carry a header, a record table, padding and one piece per block:
        // a fixed array covers every configuration up to 64 KiB blocks in 4 MiB batches
        // without allocating; smaller blocks fall back to one Vec per frame.
        const INLINE_PARTS: usize = 96;
        let mut inline: [IoSlice<'_>; INLINE_PARTS] = [IoSlice::new(&[]); INLINE_PARTS];
        let mut spilled: Vec<IoSlice<'_>>;
        let all: &mut [IoSlice<'_>] = if parts.len() < INLINE_PARTS {
            inline[0] = IoSlice::new(header.as_bytes());
            for (slot, part) in inline[1..].iter_mut().zip(parts) {
                *slot = IoSlice::new(part);
            }
            &mut inline[..parts.len() + 1]
        } else {
            spilled = Vec::with_capacity(parts.len() + 1);
            spilled.push(IoSlice::new(header.as_bytes()));
            spilled.extend(parts.iter().map(|p| IoSlice::new(p)));
            &mut spilled[..]
        };
        write_all_vectored(&mut self.inner, all).map_err(|e| ProtocolError::io("sending frame", e))
    }

    /// Sends an Error frame; best effort, the connection is closing anyway.
    pub fn send_error(&mut self, code: ErrorCode, message: &str) {
        let mut end = message.len().min(MAX_ERROR_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &message.as_bytes()[..end];
        let header = ErrorHeader {
            code: (code as u32).into(),
            message_len: (msg.len() as u32).into(),
        };
        let _ = self.send(FrameKind::Error, &[header.as_bytes(), msg]);
        let _ = self.inner.flush();
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.inner
            .flush()
            .map_err(|e| ProtocolError::io("flushing", e))
    }
}

/// The first bytes of the payload made of `parts`, as many as a [`DataHeader`] has
/// (fewer when the payload is shorter): the array and how many of its bytes are set.
fn payload_prefix(parts: &[&[u8]]) -> ([u8; DATA_HEADER_LEN], usize) {
    let mut prefix = [0u8; DATA_HEADER_LEN];
    let mut got = 0;
    for part in parts {
        let n = part.len().min(DATA_HEADER_LEN - got);
        prefix[got..got + n].copy_from_slice(&part[..n]);
        got += n;
    }
    (prefix, got)
}

fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    // Skip leading empty slices so a zero-length write is not mistaken for EOF.
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "connection accepted no more bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(kind: FrameKind, parts: &[&[u8]]) -> Vec<u8> {
        let mut wire = Vec::new();
        FrameWriter::new(&mut wire).send(kind, parts).unwrap();
        wire
    }

    #[test]
    fn frame_roundtrip_and_sequence() {
        let mut wire = Vec::new();
        {
            let mut w = FrameWriter::new(&mut wire);
            w.send(FrameKind::Commit, &[b"abc", b"", b"defg"]).unwrap();
            w.send(FrameKind::HashesDone, &[]).unwrap();
        }
        let mut r = FrameReader::new(&wire[..]);
        let mut buf = vec![0u8; 64];
        let (k, p) = r.read_frame(&mut buf).unwrap().unwrap();
        assert_eq!(k, FrameKind::Commit);
        assert_eq!(p, b"abcdefg");
        let (k, p) = r.read_frame(&mut buf).unwrap().unwrap();
        assert_eq!(k, FrameKind::HashesDone);
        assert!(p.is_empty());
        assert!(r.read_frame(&mut buf).unwrap().is_none());
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let wire = roundtrip(FrameKind::Commit, &[&[7u8; 40]]);
        for i in 0..wire.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = wire.clone();
                bad[i] ^= bit;
                let mut r = FrameReader::new(&bad[..]);
                let mut buf = vec![0u8; 64];
                assert!(r.read_frame(&mut buf).is_err(), "flip at byte {i} accepted");
            }
        }
    }

    #[test]
    fn truncation_is_detected() {
        let wire = roundtrip(FrameKind::Commit, &[&[7u8; 40]]);
        for cut in 1..wire.len() {
            let mut r = FrameReader::new(&wire[..cut]);
            let mut buf = vec![0u8; 64];
            assert!(matches!(
                r.read_frame(&mut buf),
                Err(ProtocolError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn oversized_length_rejected_before_payload() {
        let mut header = FrameHeader {
            magic: FRAME_MAGIC.into(),
            kind: FrameKind::Data as u8,
            flags: 0,
            reserved: 0.into(),
            payload_len: ((MAX_FRAME_PAYLOAD + 1) as u32).into(),
            seq: 0.into(),
            payload_hash: 0.into(),
            header_hash: 0.into(),
        };
        header.header_hash = xxh3_64(&header.as_bytes()[..24]).into();
        let mut r = FrameReader::new(header.as_bytes());
        assert!(matches!(
            r.next_header(),
            Err(ProtocolError::Oversized { .. })
        ));
    }

    /// A Data payload as the source lays it out: header, `records` records, zero
    /// padding to PAYLOAD_ALIGN, then `blocks` bytes of block payload.
    fn data_payload(records: u32, blocks: usize) -> Vec<u8> {
        let mut p = DataHeader {
            disk: 0.into(),
            record_count: records.into(),
        }
        .as_bytes()
        .to_vec();
        p.extend((0..records as usize * BLOCK_RECORD_LEN).map(|i| i as u8 | 1));
        p.resize(p.len().next_multiple_of(PAYLOAD_ALIGN), 0);
        p.extend((0..blocks).map(|i| (i * 7) as u8));
        p
    }

    /// `payload` sent as a Data frame in `parts` by a writer at `version`, read by a
    /// reader at `version` after flipping `flip` (a payload byte index).
    fn data_at(version: u16, payload: &[u8], flip: Option<usize>) -> Result<(), ProtocolError> {
        let mut wire = Vec::new();
        let mut w = FrameWriter::new(&mut wire);
        w.set_version(version);
        let (a, b) = payload.split_at(3.min(payload.len()));
        w.send(FrameKind::Data, &[a, &[], b]).unwrap();
        if let Some(i) = flip {
            wire[FRAME_HEADER_LEN + i] ^= 0x20;
        }
        let mut r = FrameReader::new(&wire[..]);
        r.set_version(version);
        let mut buf = vec![0u8; payload.len()];
        let (kind, got) = r.read_frame(&mut buf)?.unwrap();
        assert_eq!(kind, FrameKind::Data);
        assert_eq!(got.len(), payload.len());
        Ok(())
    }

    #[test]
    fn the_table_extent_is_the_padded_table_or_the_whole_payload() {
        let header = |n: u32| {
            DataHeader {
                disk: 9.into(),
                record_count: n.into(),
            }
            .as_bytes()
            .to_vec()
        };
        assert_eq!(data_table_extent(1 << 20, &header(1)), PAYLOAD_ALIGN);
        assert_eq!(data_table_extent(1 << 20, &header(85)), PAYLOAD_ALIGN);
        assert_eq!(data_table_extent(1 << 20, &header(86)), 2 * PAYLOAD_ALIGN);
        assert_eq!(data_table_extent(1 << 20, &header(0)), PAYLOAD_ALIGN);
        // Shorter than its table, or than a header: the whole payload.
        assert_eq!(data_table_extent(100, &header(1)), 100);
        assert_eq!(data_table_extent(7, &header(1)[..7]), 7);
        assert_eq!(data_table_extent(1 << 20, &header(u32::MAX)), 1 << 20);
    }

    #[test]
    fn from_version_4_a_data_frame_hashes_its_table_only() {
        let payload = data_payload(3, 3 * 4096 + 100);
        let table = data_table_extent(payload.len(), &payload);
        assert_eq!(table, PAYLOAD_ALIGN);
        assert!(data_at(TABLE_HASH_VERSION, &payload, None).is_ok());
        // Every byte of the table and its padding is covered...
        for i in 0..table {
            assert!(
                matches!(
                    data_at(TABLE_HASH_VERSION, &payload, Some(i)),
                    Err(ProtocolError::TableChecksum)
                ),
                "flip at table byte {i} accepted"
            );
        }
        // ...the blocks are left to their records' hashes.
        for i in [table, table + 1, payload.len() / 2, payload.len() - 1] {
            assert!(
                data_at(TABLE_HASH_VERSION, &payload, Some(i)).is_ok(),
                "{i}"
            );
        }
    }

    #[test]
    fn before_version_4_a_data_frame_hashes_its_whole_payload() {
        let payload = data_payload(3, 3 * 4096 + 100);
        for version in [VERSION_BEFORE_HANDSHAKE, 2, TABLE_HASH_VERSION - 1] {
            assert!(data_at(version, &payload, None).is_ok());
            for i in [0, 8, 100, 4096, 4097, payload.len() / 2, payload.len() - 1] {
                assert!(
                    matches!(
                        data_at(version, &payload, Some(i)),
                        Err(ProtocolError::PayloadChecksum {
                            kind: FrameKind::Data
                        })
                    ),
                    "version {version}: flip at byte {i} accepted"
                );
            }
        }
    }

    #[test]
    fn short_data_frames_hash_whole_and_other_kinds_never_change() {
        // A payload that ends inside its table (or its header) is covered whole.
        for payload in [data_payload(2, 0)[..60].to_vec(), vec![1, 2, 3]] {
            for i in 0..payload.len() {
                assert!(data_at(TABLE_HASH_VERSION, &payload, Some(i)).is_err());
            }
        }
        // Every other kind is hashed whole at version 4 too.
        let payload = data_payload(1, 8192);
        let mut wire = Vec::new();
        let mut w = FrameWriter::new(&mut wire);
        w.set_version(TABLE_HASH_VERSION);
        w.send(FrameKind::Hashes, &[&payload]).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let mut r = FrameReader::new(&wire[..]);
        r.set_version(TABLE_HASH_VERSION);
        let mut buf = vec![0u8; payload.len()];
        assert!(matches!(
            r.read_frame(&mut buf),
            Err(ProtocolError::PayloadChecksum {
                kind: FrameKind::Hashes
            })
        ));
    }

    #[test]
    fn both_sides_must_agree_on_the_version() {
        let payload = data_payload(1, 4096);
        let mut wire = Vec::new();
        let mut w = FrameWriter::new(&mut wire);
        w.set_version(TABLE_HASH_VERSION);
        w.send(FrameKind::Data, &[&payload]).unwrap();
        let mut r = FrameReader::new(&wire[..]);
        r.set_version(TABLE_HASH_VERSION - 1);
        let mut buf = vec![0u8; payload.len()];
        assert!(matches!(
            r.read_frame(&mut buf),
            Err(ProtocolError::PayloadChecksum { .. })
        ));
    }

    #[test]
    fn error_frames_surface_as_remote() {
        let mut wire = Vec::new();
        FrameWriter::new(&mut wire).send_error(ErrorCode::UnknownDisk, "no disk \"x\"");
        let mut r = FrameReader::new(&wire[..]);
        let mut buf = vec![0u8; 128];
        match r.read_frame(&mut buf) {
            Err(ProtocolError::Remote { code, message }) => {
                assert_eq!(code, ErrorCode::UnknownDisk);
                assert_eq!(message, "no disk \"x\"");
            }
            other => panic!("{other:?}"),
        }
    }
}
