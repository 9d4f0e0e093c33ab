//! The shim's NBD request decoder: the first code on the guest's data path that
//! touches what a client sends, once the handshake is over.
//!
//! The input is a negotiated session followed by the request stream a client sends:
//!
//! ```text
//! byte 0       bit 0: structured replies negotiated, bit 1: base:allocation selected
//! bytes 1..9   export size, u64 big-endian
//! bytes 9..    requests (28-byte headers, each WRITE followed by its payload)
//! ```
//!
//! The harness walks the stream as the connection's reader does: `decode_request` at
//! the head, then past the header and the payload it says to consume, until the input
//! ends or a bad magic (a hard disconnect). Every decision is checked against an oracle
//! written from `docs/shim.md` ("Requests are validated before they touch anything")
//! and the NBD specification, not from the product's code:
//!
//! * fewer than 28 bytes is `NeedMore`; a header with another magic is refused with
//!   that magic, whatever follows;
//! * the cookie is echoed, and the payload to consume is the length for a WRITE
//!   (accepted or refused) and nothing for any other command;
//! * an accepted command carries the header's offset, length and flags, lies inside
//!   the export (no overflow), and a READ or WRITE is at most 32 MiB;
//! * a refused one breaks at least one documented rule, with an error value that rule
//!   calls for: `ENOSPC` for a WRITE or WRITE_ZEROES past the end, `EINVAL` otherwise;
//! * validity does not depend on the cookie.

use filter_driver_shim::nbd::proto::{
    decode_request, parse_request_header, validate_request, Command, Decoded, Durability, NbdErrno,
    Refusal, RequestHeader, Session, ZeroMode, CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ,
    CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, MAX_PAYLOAD_BYTES, REQUEST_HEADER_BYTES, REQUEST_MAGIC,
};

use crate::Target;

/// Bytes before the request stream: session flags and export size.
pub const PREFIX: usize = 9;

/// The largest READ or WRITE the shim serves, from `docs/shim.md` ("Bounds"): 32 MiB.
const MAX_PAYLOAD: u32 = 32 << 20;

pub fn target() -> Target {
    Target {
        name: "nbd_request",
        run,
        seeds,
        repair: Some(|buf, entropy| repair(buf, entropy)),
        dictionary: DICTIONARY,
        max_len: 64 << 10,
    }
}

const DICTIONARY: &[&[u8]] = &[
    &REQUEST_MAGIC.to_be_bytes(),
    &CMD_READ.to_be_bytes(),
    &CMD_WRITE.to_be_bytes(),
    &CMD_DISC.to_be_bytes(),
    &CMD_FLUSH.to_be_bytes(),
    &CMD_TRIM.to_be_bytes(),
    &CMD_CACHE.to_be_bytes(),
    &CMD_WRITE_ZEROES.to_be_bytes(),
    &CMD_BLOCK_STATUS.to_be_bytes(),
    &CMD_FLAG_FUA.to_be_bytes(),
    &CMD_FLAG_NO_HOLE.to_be_bytes(),
    &CMD_FLAG_DF.to_be_bytes(),
    &CMD_FLAG_REQ_ONE.to_be_bytes(),
    &CMD_FLAG_FAST_ZERO.to_be_bytes(),
    &MAX_PAYLOAD.to_be_bytes(),
    &(MAX_PAYLOAD + 1).to_be_bytes(),
    &4096u32.to_be_bytes(),
    &(1u64 << 20).to_be_bytes(),
    &u64::MAX.to_be_bytes(),
    &u32::MAX.to_be_bytes(),
];

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// The session the input describes.
pub fn session(data: &[u8]) -> Option<Session> {
    if data.len() < PREFIX {
        return None;
    }
    Some(Session {
        structured: data[0] & 1 != 0,
        base_allocation: data[0] & 2 != 0,
        export_size: be_u64(&data[1..]),
    })
}

/// What the oracle expects of one request: `Ok` if no rule is broken, otherwise every
/// error value a broken rule calls for (the order in which the rules are checked is
/// the server's choice).
fn expected(h: &RequestHeader, s: &Session) -> Result<(), Vec<NbdErrno>> {
    use NbdErrno::{Inval, NoSpc};
    // Flags valid per command (spec, "Command flags"; the shim advertises FUA but
    // neither DF nor FAST_ZERO). FUA is valid for every command.
    let allowed = match h.kind {
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err(vec![Inval]),
    };
    let mut broken = Vec::new();
    if h.flags & !allowed != 0 {
        broken.push(Inval);
    }
    let end = u128::from(h.offset) + u128::from(h.length);
    let past_end = end > u128::from(s.export_size);
    match h.kind {
        CMD_READ | CMD_WRITE => {
            if h.length > MAX_PAYLOAD {
                broken.push(Inval);
            }
            if past_end {
                broken.push(if h.kind == CMD_WRITE { NoSpc } else { Inval });
            }
        }
        CMD_WRITE_ZEROES if past_end => broken.push(NoSpc),
        CMD_TRIM | CMD_CACHE if past_end => broken.push(Inval),
        CMD_BLOCK_STATUS if !s.structured || !s.base_allocation || h.length == 0 || past_end => {
            broken.push(Inval)
        }
        _ => {}
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(broken)
    }
}

/// Checks one decoded request against its header and the oracle; returns a label.
fn check(h: &RequestHeader, s: &Session, command: &Result<Command, Refusal>) -> String {
    let fua = if h.flags & CMD_FLAG_FUA != 0 {
        Durability::ForceUnitAccess
    } else {
        Durability::Cached
    };
    match (expected(h, s), command) {
        (Ok(()), Ok(cmd)) => {
            let range = |offset: u64, length: u32| {
                assert_eq!(
                    (offset, length),
                    (h.offset, h.length),
                    "range differs from the header's"
                );
                let end = offset.checked_add(u64::from(length));
                assert!(
                    end.is_some_and(|end| end <= s.export_size),
                    "accepted a range outside the export: {h:?} {s:?}"
                );
            };
            let (name, kind) = match *cmd {
                Command::Read { offset, length } => {
                    range(offset, length);
                    assert!(length <= MAX_PAYLOAD && length <= MAX_PAYLOAD_BYTES);
                    ("read", CMD_READ)
                }
                Command::Write {
                    offset,
                    length,
                    durability,
                } => {
                    range(offset, length);
                    assert!(length <= MAX_PAYLOAD && length <= MAX_PAYLOAD_BYTES);
                    assert_eq!(durability, fua, "FUA not carried");
                    ("write", CMD_WRITE)
                }
                Command::Disconnect => ("disc", CMD_DISC),
                Command::Flush => ("flush", CMD_FLUSH),
                Command::Trim {
                    offset,
                    length,
                    durability,
                } => {
                    range(offset, length);
                    assert_eq!(durability, fua, "FUA not carried");
                    ("trim", CMD_TRIM)
                }
                Command::Cache => ("cache", CMD_CACHE),
                Command::WriteZeroes {
                    offset,
                    length,
                    mode,
                    durability,
                } => {
                    range(offset, length);
                    assert_eq!(durability, fua, "FUA not carried");
                    let no_hole = h.flags & CMD_FLAG_NO_HOLE != 0;
                    assert_eq!(
                        mode,
                        if no_hole {
                            ZeroMode::Allocate
                        } else {
                            ZeroMode::MayPunch
                        },
                        "NO_HOLE not carried"
                    );
                    ("write-zeroes", CMD_WRITE_ZEROES)
                }
                Command::BlockStatus {
                    offset,
                    length,
                    one_extent,
                } => {
                    range(offset, length);
                    assert!(length > 0, "block status of zero bytes accepted");
                    assert!(s.structured && s.base_allocation);
                    assert_eq!(
                        one_extent,
                        h.flags & CMD_FLAG_REQ_ONE != 0,
                        "REQ_ONE not carried"
                    );
                    ("block-status", CMD_BLOCK_STATUS)
                }
            };
            assert_eq!(kind, h.kind, "decoded as another command: {h:?}");
            name.to_string()
        }
        (Ok(()), Err(refusal)) => {
            panic!("refused a valid request ({}): {h:?} {s:?}", refusal.reason)
        }
        (Err(_), Ok(cmd)) => panic!("accepted an invalid request as {cmd:?}: {h:?} {s:?}"),
        (Err(allowed), Err(refusal)) => {
            assert!(
                allowed.contains(&refusal.errno),
                "refused with {:?} ({}), the spec asks for one of {allowed:?}: {h:?} {s:?}",
                refusal.errno,
                refusal.reason
            );
            assert!(!refusal.reason.is_empty());
            format!("refused:{}", refusal.reason)
        }
    }
}

pub fn run(data: &[u8]) -> String {
    let Some(session) = session(data) else {
        return "short".to_string();
    };
    let mut at = PREFIX;
    let mut requests = 0usize;
    let mut last = String::from("none");
    loop {
        let rest = &data[at..];
        let decoded = decode_request(rest, &session);
        if rest.len() < REQUEST_HEADER_BYTES {
            assert_eq!(decoded, Ok(Decoded::NeedMore), "a partial header decoded");
            let end = if rest.is_empty() { "eof" } else { "partial" };
            return format!("{end}:n={}:last={last}", crate::bucket(requests));
        }
        let magic = be_u32(rest);
        let (cookie, payload_bytes, command) = match decoded {
            Err(bad) => {
                assert_ne!(magic, REQUEST_MAGIC, "the request magic refused");
                assert_eq!(bad.found, magic, "bad magic reported wrongly");
                return format!("bad-magic:n={}:last={last}", crate::bucket(requests));
            }
            Ok(Decoded::NeedMore) => panic!("NeedMore with a whole header"),
            Ok(Decoded::Request {
                cookie,
                payload_bytes,
                command,
            }) => (cookie, payload_bytes, command),
        };
        assert_eq!(magic, REQUEST_MAGIC, "a bad magic accepted");
        let h = RequestHeader {
            flags: be_u16(&rest[4..]),
            kind: be_u16(&rest[6..]),
            cookie: be_u64(&rest[8..]),
            offset: be_u64(&rest[16..]),
            length: be_u32(&rest[24..]),
        };
        assert_eq!(cookie, h.cookie, "cookie not echoed");
        let payload = if h.kind == CMD_WRITE { h.length } else { 0 };
        assert_eq!(payload_bytes, payload, "payload to consume: {h:?}");
        // The header parser and the validator are what `decode_request` composes.
        let head: &[u8; REQUEST_HEADER_BYTES] =
            rest[..REQUEST_HEADER_BYTES].try_into().expect("28 bytes");
        assert_eq!(parse_request_header(head), Ok(h));
        // Validity never depends on the cookie.
        let other = RequestHeader {
            cookie: !h.cookie,
            ..h
        };
        assert_eq!(validate_request(&other, &session), command);
        last = check(&h, &session, &command);
        requests += 1;
        let next = at + REQUEST_HEADER_BYTES + payload as usize;
        if next > data.len() {
            return format!("mid-payload:n={}:last={last}", crate::bucket(requests));
        }
        at = next;
    }
}

/// Appends one request (and, for a WRITE, a payload of `length` bytes) to `out`.
pub fn push(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    if kind == CMD_WRITE {
        out.extend((0..length).map(|i| (i as u8) ^ 0x5a));
    }
}

fn prefix(structured: bool, base_allocation: bool, export_size: u64) -> Vec<u8> {
    let mut out = vec![u8::from(structured) | u8::from(base_allocation) << 1];
    out.extend_from_slice(&export_size.to_be_bytes());
    out
}

/// Walks the stream and restores each header's magic; with entropy bits set it also
/// cuts a WRITE's length to the bytes that follow (so the stream stays in step) or
/// pulls an offset inside the export, so accepted requests are common too. Entropy 0
/// restores magics and nothing else.
fn repair(buf: &mut [u8], entropy: u64) {
    let Some(s) = session(buf) else { return };
    let mut at = PREFIX;
    let mut bits = entropy;
    while at + REQUEST_HEADER_BYTES <= buf.len() {
        if bits & 1 == 0 {
            buf[at..at + 4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        let kind = be_u16(&buf[at + 6..]);
        let room = buf.len() - at - REQUEST_HEADER_BYTES;
        let mut length = be_u32(&buf[at + 24..]);
        if bits & 2 != 0 && kind == CMD_WRITE && length as usize > room {
            length = room as u32;
            buf[at + 24..at + 28].copy_from_slice(&length.to_be_bytes());
        }
        if bits & 4 != 0 && s.export_size > 0 {
            let offset = be_u64(&buf[at + 16..]) % s.export_size;
            buf[at + 16..at + 24].copy_from_slice(&offset.to_be_bytes());
        }
        bits = bits.rotate_right(3);
        let payload = if kind == CMD_WRITE {
            length as usize
        } else {
            0
        };
        at += REQUEST_HEADER_BYTES + payload;
    }
}

fn seeds() -> Vec<Vec<u8>> {
    const MIB: u64 = 1 << 20;
    let mut seeds = Vec::new();

    // Everything a client does on a structured session with base:allocation.
    let mut s = prefix(true, true, MIB);
    push(&mut s, 0, CMD_READ, 1, 0, 4096);
    push(&mut s, CMD_FLAG_FUA, CMD_WRITE, 2, 4096, 512);
    push(&mut s, 0, CMD_FLUSH, 3, 0, 0);
    push(&mut s, 0, CMD_TRIM, 4, 8192, 65536);
    push(
        &mut s,
        CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        5,
        MIB - 4096,
        4096,
    );
    push(&mut s, CMD_FLAG_FUA, CMD_WRITE_ZEROES, 6, 0, MIB as u32);
    push(&mut s, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 7, 0, MIB as u32);
    push(&mut s, 0, CMD_CACHE, 8, 0, 4096);
    push(&mut s, 0, CMD_WRITE, 9, MIB - 1, 1);
    push(&mut s, 0, CMD_DISC, 10, 0, 0);
    seeds.push(s);

    // Refusals a stream survives: each gets an error reply, the next request follows
    // (a refused WRITE's payload still on the wire).
    let mut s = prefix(false, false, MIB);
    push(&mut s, 0, CMD_WRITE, 1, MIB - 8, 16);
    push(&mut s, 0, CMD_READ, 2, MIB, 1);
    push(&mut s, 0, CMD_READ, 3, 0, MAX_PAYLOAD + 1);
    push(&mut s, CMD_FLAG_DF, CMD_READ, 4, 0, 1);
    push(&mut s, CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 5, 0, 1);
    push(&mut s, CMD_FLAG_NO_HOLE, CMD_WRITE, 6, 0, 8);
    push(&mut s, 0, CMD_BLOCK_STATUS, 7, 0, 4096);
    push(&mut s, 0, CMD_TRIM, 8, u64::MAX, 2);
    push(&mut s, 0, CMD_WRITE_ZEROES, 9, u64::MAX - 1, 1);
    push(&mut s, 0, 99, 10, 0, 0);
    push(&mut s, 0, CMD_READ, 11, 0, 512);
    seeds.push(s);

    // Structured without base:allocation; a zero-length block status.
    let mut s = prefix(true, false, MIB);
    push(&mut s, 0, CMD_BLOCK_STATUS, 1, 0, 4096);
    push(&mut s, 0, CMD_READ, 2, 0, 0);
    seeds.push(s);
    let mut s = prefix(true, true, MIB);
    push(&mut s, 0, CMD_BLOCK_STATUS, 1, 0, 0);
    seeds.push(s);

    // Edge sizes: an empty export, the largest one, a 32 MiB read at the very end.
    let mut s = prefix(false, false, 0);
    push(&mut s, 0, CMD_READ, 1, 0, 0);
    push(&mut s, 0, CMD_WRITE, 2, 0, 1);
    seeds.push(s);
    let mut s = prefix(true, true, u64::MAX);
    push(
        &mut s,
        0,
        CMD_READ,
        1,
        u64::MAX - u64::from(MAX_PAYLOAD),
        MAX_PAYLOAD,
    );
    push(&mut s, 0, CMD_TRIM, 2, u64::MAX, 0);
    push(&mut s, 0, CMD_TRIM, 3, u64::MAX, 1);
    seeds.push(s);

    // Ends: mid-header, mid-payload, and a bad magic (hard disconnect).
    let mut s = prefix(false, false, MIB);
    push(&mut s, 0, CMD_FLUSH, 1, 0, 0);
    push(&mut s, 0, CMD_READ, 2, 0, 4096);
    s.truncate(s.len() - 5);
    seeds.push(s);
    let mut s = prefix(false, false, MIB);
    push(&mut s, 0, CMD_WRITE, 1, 0, 4096);
    s.truncate(s.len() - 100);
    seeds.push(s);
    let mut s = prefix(false, false, MIB);
    push(&mut s, 0, CMD_READ, 1, 0, 4096);
    push(&mut s, 0, CMD_READ, 2, 0, 4096);
    let second = s.len() - REQUEST_HEADER_BYTES;
    s[second] ^= 0x80;
    seeds.push(s);
    seeds
}
