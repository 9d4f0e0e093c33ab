//! `FrameReader` over arbitrary bytes: the first code that touches what a peer sends.
//!
//! Beyond "never panics", every frame the reader hands out is checked against the
//! input bytes it came from: right kind, length and sequence number, both checksums
//! valid, the payload exactly the bytes after the header. A clean close is only
//! reported at the end of the input.
//!
//! Every input is read twice: by a reader of a version-3 session, where every payload
//! hash covers the whole payload, and by one of a version-4 session, where a Data
//! frame's covers its record table only (`docs/protocol.md`, "Data"). The label is the
//! first outcome, then the second after `|v4:`. The repair hashes Data payloads for
//! the one or the other as entropy bit 0 says.

use std::cell::RefCell;

use dataplane::protocol::{
    FrameKind, FrameReader, FRAME_HEADER_LEN, FRAME_MAGIC, MAX_FRAME_PAYLOAD, TABLE_HASH_VERSION,
};
use xxhash_rust::xxh3::xxh3_64;

use crate::frames;
use crate::Target;

pub fn target() -> Target {
    Target {
        name: "frame_decoder",
        run,
        seeds,
        repair: Some(|buf, entropy| frames::repair_stream_at(buf, entropy >> 1, entropy & 1 == 1)),
        dictionary: DICTIONARY,
        max_len: 64 << 10,
    }
}

const DICTIONARY: &[&[u8]] = &[
    b"FRY1",
    &[1],
    &[2],
    &[3],
    &[4],
    &[10],
    &[11],
    &[20],
    &[23],
    &[30],
    &[31],
    &[40],
    &[50],
    &(MAX_FRAME_PAYLOAD as u32).to_le_bytes(),
    &(MAX_FRAME_PAYLOAD as u32 + 1).to_le_bytes(),
    &u32::MAX.to_le_bytes(),
];

thread_local! {
    /// One receive buffer of the protocol's largest payload, reused across inputs as
    /// the session reuses its pool slots (and so never zeroed between frames).
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_FRAME_PAYLOAD]);
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

pub fn run(data: &[u8]) -> String {
    BUF.with(|buf| run_with(data, &mut buf.borrow_mut()))
}

fn run_with(data: &[u8], buf: &mut [u8]) -> String {
    let whole = read_all(data, buf, TABLE_HASH_VERSION - 1);
    let table = read_all(data, buf, TABLE_HASH_VERSION);
    format!("{whole}|v4:{table}")
}

/// Reads `data` to its end or first error as a session of protocol `version` does.
fn read_all(data: &[u8], buf: &mut [u8], version: u16) -> String {
    let table_hashes = version >= TABLE_HASH_VERSION;
    let mut reader = FrameReader::new(data);
    reader.set_version(version);
    let mut frames = 0usize;
    let mut first_kind = None;
    loop {
        let start = data.len() - reader.get_ref().len();
        match reader.read_frame(buf) {
            Ok(Some((kind, payload))) => {
                let header = &data[start..start + FRAME_HEADER_LEN];
                let len = payload.len();
                assert!(len <= MAX_FRAME_PAYLOAD, "payload of {len} bytes accepted");
                assert_eq!(
                    le_u32(header),
                    FRAME_MAGIC,
                    "frame with a bad magic accepted"
                );
                assert_eq!(header[4], kind as u8, "kind differs from the header's");
                assert_eq!(le_u32(&header[8..]) as usize, len, "payload length differs");
                assert_eq!(
                    le_u32(&header[12..]) as usize,
                    frames,
                    "sequence gap accepted"
                );
                assert_eq!(
                    xxh3_64(&header[..24]),
                    le_u64(&header[24..]),
                    "header with a bad checksum accepted"
                );
                let hashed = frames::hashed_len(kind as u8, payload, table_hashes);
                assert_eq!(
                    xxh3_64(&payload[..hashed]),
                    le_u64(&header[16..]),
                    "payload with a bad checksum accepted"
                );
                let body = &data[start + FRAME_HEADER_LEN..start + FRAME_HEADER_LEN + len];
                assert!(
                    payload == body,
                    "payload differs from the bytes on the wire"
                );
                assert_eq!(
                    reader.get_ref().len(),
                    data.len() - start - FRAME_HEADER_LEN - len,
                    "reader consumed more or less than one frame"
                );
                assert_ne!(
                    kind,
                    FrameKind::Error,
                    "Error frames must surface as errors"
                );
                frames += 1;
                first_kind.get_or_insert(kind);
            }
            Ok(None) => {
                assert_eq!(start, data.len(), "clean close reported with bytes left");
                return format!("eof:frames={}:first={first_kind:?}", crate::bucket(frames));
            }
            Err(e) => {
                // Both are shown to operators and peers; they must not panic either.
                let _ = e.code();
                return crate::protocol_label(&format!("err@{}", crate::bucket(frames)), &e);
            }
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    use dataplane::protocol::{FrameKind::*, MAX_ERROR_MESSAGE};
    let hello = [[1u8, 0, 1, 0, 0, 0, 0, 0].as_slice(), &[0x11; 32]].concat();
    let challenge = [[1u8, 0, 0, 0, 0, 0, 0, 0].as_slice(), &[0x22; 64]].concat();
    let error = [5u32.to_le_bytes(), 11u32.to_le_bytes()].concat();
    let error = [error.as_slice(), b"bad block\xff"].concat();
    let long_error = [
        1u32.to_le_bytes().as_slice(),
        &(MAX_ERROR_MESSAGE as u32 * 2).to_le_bytes(),
        &[b'x'; 64],
    ]
    .concat();
    let mut oversized = Vec::new();
    frames::push(&mut oversized, Data, 0, &[]);
    oversized[8..12].copy_from_slice(&(MAX_FRAME_PAYLOAD as u32 + 1).to_le_bytes());
    let fix = xxh3_64(&oversized[..24]);
    oversized[24..32].copy_from_slice(&fix.to_le_bytes());
    // A Data frame of one record whose block follows the padded table: its hash is
    // either the table's (version 4) or the whole payload's, and only one reader
    // accepts each.
    let mut data = vec![0u8; 4096 + 64];
    data[4] = 1;
    data[4096..].fill(0x5a);
    vec![
        frames::stream_at(&[(Data, &data), (Commit, &[0; 16])], true),
        frames::stream_at(&[(Data, &data), (Commit, &[0; 16])], false),
        Vec::new(),
        frames::stream(&[(Hello, &hello)]),
        frames::stream(&[
            (Hello, &hello),
            (Auth, &[0x33; 32]),
            (Commit, &7u64.to_le_bytes()),
        ]),
        frames::stream(&[(Challenge, &challenge), (AuthOk, &[]), (OpenOk, &[0; 32])]),
        frames::stream(&[
            (Zero, &[0; 24]),
            (HashesDone, &[]),
            (DiffRuns, &[0; 48]),
            (DiffDone, &[]),
        ]),
        frames::stream(&[(Data, &[0; 56]), (Committed, &[0; 16]), (Error, &error)]),
        frames::stream(&[(Error, &long_error)]),
        frames::stream(&[(Error, &[])]),
        oversized,
    ]
}
