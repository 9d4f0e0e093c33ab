//! Frame streams written from the specification (`docs/protocol.md`, "Frames"), not
//! with the product's `FrameWriter`, so seeds and repairs are an independent reading
//! of the format.

use dataplane::protocol::{FrameKind, FRAME_HEADER_LEN, FRAME_MAGIC, MAX_FRAME_PAYLOAD};
use xxhash_rust::xxh3::xxh3_64;

const OFF_KIND: usize = 4;
const OFF_PAYLOAD_LEN: usize = 8;
const OFF_SEQ: usize = 12;
const OFF_PAYLOAD_HASH: usize = 16;
const OFF_HEADER_HASH: usize = 24;

/// How many leading bytes of a frame's payload its `payload_hash` covers: all of them,
/// but with `table_hashes` (protocol version 4 on) only a Data payload's header,
/// `record_count` records of 48 bytes and the padding after them to the next 4096-byte
/// boundary, at most the whole payload, which is also hashed whole when shorter than
/// the 8-byte header.
pub fn hashed_len(kind: u8, payload: &[u8], table_hashes: bool) -> usize {
    if !table_hashes || kind != FrameKind::Data as u8 || payload.len() < 8 {
        return payload.len();
    }
    let records = u64::from(get_u32(payload, 4));
    let table = (8 + 48 * records).next_multiple_of(4096);
    usize::try_from(table).map_or(payload.len(), |t| t.min(payload.len()))
}

/// Appends one well-formed frame to `out`.
pub fn push(out: &mut Vec<u8>, kind: FrameKind, seq: u32, payload: &[u8]) {
    push_at(out, kind, seq, payload, false);
}

/// Appends one well-formed frame to `out`, its payload hashed as [`hashed_len`] says.
pub fn push_at(out: &mut Vec<u8>, kind: FrameKind, seq: u32, payload: &[u8], table_hashes: bool) {
    let start = out.len();
    let hashed = &payload[..hashed_len(kind as u8, payload, table_hashes)];
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&[kind as u8, 0, 0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&xxh3_64(hashed).to_le_bytes());
    let header_hash = xxh3_64(&out[start..start + OFF_HEADER_HASH]);
    out.extend_from_slice(&header_hash.to_le_bytes());
    out.extend_from_slice(payload);
}

/// A stream of well-formed frames with sequence numbers from 0.
pub fn stream(frames: &[(FrameKind, &[u8])]) -> Vec<u8> {
    stream_at(frames, false)
}

/// [`stream`], payloads hashed as [`hashed_len`] says.
pub fn stream_at(frames: &[(FrameKind, &[u8])], table_hashes: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (seq, (kind, payload)) in frames.iter().enumerate() {
        push_at(&mut out, *kind, seq as u32, payload, table_hashes);
    }
    out
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Walks `buf` as a frame stream and makes each header valid for the bytes that
/// follow it: magic, sequence number, payload hash and header hash, and a payload
/// length cut to what the input holds. Each entropy bit pair may leave one frame's
/// length or kind as the mutation left it, so the later checks stay reachable too.
pub fn repair_stream(buf: &mut [u8], entropy: u64) {
    repair_stream_at(buf, entropy, false);
}

/// [`repair_stream`], payload hashes as [`hashed_len`] says.
pub fn repair_stream_at(buf: &mut [u8], entropy: u64, table_hashes: bool) {
    let mut at = 0usize;
    let mut seq = 0u32;
    let mut bits = entropy;
    while at + FRAME_HEADER_LEN <= buf.len() {
        let header = at;
        put_u32(buf, header, FRAME_MAGIC);
        if FrameKind::from_u8(buf[header + OFF_KIND]).is_none() && bits & 1 == 0 {
            // Map an unknown kind onto a known one, keeping the mutation's choice
            // deterministic.
            const KINDS: [u8; 16] = [1, 2, 3, 4, 10, 11, 20, 21, 22, 23, 24, 30, 31, 40, 41, 50];
            buf[header + OFF_KIND] = KINDS[buf[header + OFF_KIND] as usize % KINDS.len()];
        }
        let room = buf.len() - header - FRAME_HEADER_LEN;
        let mut len = get_u32(buf, header + OFF_PAYLOAD_LEN) as usize;
        if len > room && bits & 2 == 0 {
            len = room;
            put_u32(buf, header + OFF_PAYLOAD_LEN, len as u32);
        }
        bits = bits.rotate_right(2);
        put_u32(buf, header + OFF_SEQ, seq);
        let payload_start = header + FRAME_HEADER_LEN;
        let payload = &buf[payload_start..payload_start + len.min(room)];
        let hashed = hashed_len(buf[header + OFF_KIND], payload, table_hashes);
        let payload_hash = xxh3_64(&payload[..hashed]);
        put_u64(buf, header + OFF_PAYLOAD_HASH, payload_hash);
        let header_hash = xxh3_64(&buf[header..header + OFF_HEADER_HASH]);
        put_u64(buf, header + OFF_HEADER_HASH, header_hash);
        if len > room || len > MAX_FRAME_PAYLOAD {
            break;
        }
        at = payload_start + len;
        seq = seq.wrapping_add(1);
    }
}
