//! The shim's NBD handshake: option haggling with a client that sends anything, the
//! first code a process reaching the shim's socket talks to.
//!
//! The input is everything the client sends after the server's greeting (client
//! flags, then options). `handshake::negotiate` runs over an in-memory stream that
//! reads the input and collects the server's output, with a fixed export `vm1` of
//! 1 GiB. A model of the handshake written from `docs/shim.md` ("NBD support",
//! "Handshake" and the option table) and the NBD specification, not from the product's
//! code, reads the same input and says what the server must answer to every complete
//! option: the replies echo the option, carry the documented types and data, end with
//! exactly one final reply (an ACK or an error), and the outcome — transmission with
//! what was negotiated, an abort, or which error — is the model's.
//!
//! Each option's data also goes through the pure decoders `parse_info_request` and
//! `parse_meta_context_request`, which must agree with the model's decoding and, when
//! they accept, re-encode to exactly the option's bytes (the formats have no slack).

use std::cell::RefCell;
use std::io::{self, Read, Write};

use filter_driver_shim::nbd::handshake::{negotiate, MAX_OPTION_BYTES};
use filter_driver_shim::nbd::proto::{
    parse_info_request, parse_meta_context_request, BASE_ALLOCATION, BASE_ALLOCATION_ID,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, INFO_NAME, NBD_MAGIC, OPTION_REPLY_MAGIC, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
    OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER, TRANSMISSION_FLAGS,
};
use filter_driver_shim::nbd::{ExportInfo, Negotiated, ProtocolError};

use crate::Target;

const EXPORT_NAME: &str = "vm1";
const EXPORT_SIZE: u64 = 1 << 30;
/// Advertised block sizes, from `docs/shim.md`: minimum 1, preferred 4096, maximum
/// 32 MiB.
const BLOCK_SIZES: (u32, u32, u32) = (1, 4096, 32 << 20);
/// Option data the server reads, from `docs/shim.md`: beyond it, drained and refused.
const MAX_OPTION: u32 = 64 << 10;
const GREETING_BYTES: usize = 18;

pub fn target() -> Target {
    Target {
        name: "nbd_option",
        run,
        seeds,
        repair: Some(|buf, entropy| repair(buf, entropy)),
        dictionary: DICTIONARY,
        max_len: 80 << 10,
    }
}

const DICTIONARY: &[&[u8]] = &[
    &IHAVEOPT.to_be_bytes(),
    &OPT_EXPORT_NAME.to_be_bytes(),
    &OPT_ABORT.to_be_bytes(),
    &OPT_LIST.to_be_bytes(),
    &OPT_STARTTLS.to_be_bytes(),
    &OPT_INFO.to_be_bytes(),
    &OPT_GO.to_be_bytes(),
    &OPT_STRUCTURED_REPLY.to_be_bytes(),
    &OPT_LIST_META_CONTEXT.to_be_bytes(),
    &OPT_SET_META_CONTEXT.to_be_bytes(),
    &INFO_NAME.to_be_bytes(),
    &INFO_BLOCK_SIZE.to_be_bytes(),
    b"vm1",
    b"base:allocation",
    b"base:",
    b"qemu:dirty-bitmap:x",
    &3u32.to_be_bytes(),
    &15u32.to_be_bytes(),
    &(MAX_OPTION + 1).to_be_bytes(),
];

/// A scripted client: reads come from the input, writes collect in `output`.
struct Duplex<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

thread_local! {
    static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// How the model expects `negotiate` to end.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The input ran out (or a drained option was cut short): an I/O error.
    Io,
    ClientFlags(u32),
    OptionMagic(u64),
    UnknownExport,
    Abort,
    /// Transmission; `no_zeroes` decides the shape of an `EXPORT_NAME` reply.
    Go(Negotiated, bool),
}

/// One option reply: option, type, data.
type Reply = (u32, u32, Vec<u8>);

/// The model: every reply the server must send, and how it ends.
fn model(input: &[u8]) -> (Vec<Reply>, End, Option<u32>) {
    let mut replies = Vec::new();
    if input.len() < 4 {
        return (replies, End::Io, None);
    }
    let flags = be_u32(input);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return (replies, End::ClientFlags(flags), None);
    }
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    let mut at = 4;
    let mut structured = false;
    let mut meta = false;
    let mut last = None;
    let negotiated = |structured: bool, meta: bool| Negotiated {
        structured,
        base_allocation: structured && meta,
    };
    loop {
        if input.len() - at < 16 {
            return (replies, End::Io, last);
        }
        let magic = be_u64(&input[at..]);
        if magic != IHAVEOPT {
            return (replies, End::OptionMagic(magic), last);
        }
        let option = be_u32(&input[at + 8..]);
        let len = be_u32(&input[at + 12..]);
        at += 16;
        if len > MAX_OPTION {
            // EXPORT_NAME has no replies: the server hangs up. Anything else is
            // drained (a client hanging up inside it ends the handshake) and refused.
            if option == OPT_EXPORT_NAME {
                return (replies, End::UnknownExport, last);
            }
            if input.len() - at < len as usize {
                return (replies, End::Io, last);
            }
            replies.push((option, REP_ERR_TOO_BIG, Vec::new()));
            at += len as usize;
            last = Some(option);
            continue;
        }
        if (input.len() - at) < len as usize {
            return (replies, End::Io, last);
        }
        let data = &input[at..at + len as usize];
        at += len as usize;
        last = Some(option);
        let mut reply = |kind: u32, data: Vec<u8>| replies.push((option, kind, data));
        match option {
            OPT_EXPORT_NAME => {
                return if data.is_empty() || data == EXPORT_NAME.as_bytes() {
                    (
                        replies,
                        End::Go(negotiated(structured, meta), no_zeroes),
                        last,
                    )
                } else {
                    (replies, End::UnknownExport, last)
                };
            }
            OPT_ABORT => {
                reply(REP_ACK, Vec::new());
                return (replies, End::Abort, last);
            }
            OPT_LIST if !data.is_empty() => reply(REP_ERR_INVALID, Vec::new()),
            OPT_LIST => {
                let mut server = (EXPORT_NAME.len() as u32).to_be_bytes().to_vec();
                server.extend_from_slice(EXPORT_NAME.as_bytes());
                reply(REP_SERVER, server);
                reply(REP_ACK, Vec::new());
            }
            OPT_INFO | OPT_GO => match info_model(data) {
                None => reply(REP_ERR_INVALID, Vec::new()),
                Some((name, _)) if !name.is_empty() && name != EXPORT_NAME.as_bytes() => {
                    reply(REP_ERR_UNKNOWN, Vec::new())
                }
                Some((_, asked)) => {
                    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                    export.extend_from_slice(&EXPORT_SIZE.to_be_bytes());
                    export.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                    reply(REP_INFO, export);
                    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    sizes.extend_from_slice(&BLOCK_SIZES.0.to_be_bytes());
                    sizes.extend_from_slice(&BLOCK_SIZES.1.to_be_bytes());
                    sizes.extend_from_slice(&BLOCK_SIZES.2.to_be_bytes());
                    reply(REP_INFO, sizes);
                    if asked.contains(&INFO_NAME) {
                        let mut name = INFO_NAME.to_be_bytes().to_vec();
                        name.extend_from_slice(EXPORT_NAME.as_bytes());
                        reply(REP_INFO, name);
                    }
                    reply(REP_ACK, Vec::new());
                    if option == OPT_GO {
                        return (replies, End::Go(negotiated(structured, meta), true), last);
                    }
                }
            },
            OPT_STRUCTURED_REPLY if !data.is_empty() => reply(REP_ERR_INVALID, Vec::new()),
            OPT_STRUCTURED_REPLY => {
                structured = true;
                reply(REP_ACK, Vec::new());
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    meta = false;
                }
                match meta_model(data) {
                    _ if !structured => reply(REP_ERR_INVALID, Vec::new()),
                    None => reply(REP_ERR_INVALID, Vec::new()),
                    Some((name, _)) if !name.is_empty() && name != EXPORT_NAME.as_bytes() => {
                        reply(REP_ERR_UNKNOWN, Vec::new())
                    }
                    Some((_, queries)) => {
                        let full = |q: &&[u8]| *q == BASE_ALLOCATION.as_bytes();
                        let hit = if set {
                            queries.iter().any(full)
                        } else {
                            queries.is_empty() || queries.iter().any(|q| full(q) || *q == b"base:")
                        };
                        if hit {
                            let mut ctx = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                            ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
                            reply(REP_META_CONTEXT, ctx);
                            meta |= set;
                        }
                        reply(REP_ACK, Vec::new());
                    }
                }
            }
            OPT_STARTTLS => reply(REP_ERR_POLICY, Vec::new()),
            _ => reply(REP_ERR_UNSUP, Vec::new()),
        }
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data from the spec: name length, name, count of
/// information requests, the requests; nothing after.
fn info_model(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = be_u32(data.get(..4)?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = usize::from(be_u16(rest.get(..2)?));
    let items = &rest[2..];
    if items.len() != 2 * count {
        return None;
    }
    Some((name, items.chunks_exact(2).map(be_u16).collect()))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: name length, name, query count, then each
/// query as length and string; nothing after.
fn meta_model(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let name_len = be_u32(data.get(..4)?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let mut rest = &data[4 + name_len..];
    let count = be_u32(rest.get(..4)?);
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = be_u32(rest.get(..4)?) as usize;
        queries.push(rest.get(4..4usize.checked_add(len)?)?);
        rest = &rest[4 + len..];
    }
    rest.is_empty().then_some((name, queries))
}

/// The pure decoders on one option's data: agreement with the model, and exact
/// re-encoding of whatever they accept.
fn check_decoders(data: &[u8]) {
    match (parse_info_request(data), info_model(data)) {
        (Ok(req), Some((name, asked))) => {
            assert!(req.export_name == name && req.requests == asked);
            let mut again = (req.export_name.len() as u32).to_be_bytes().to_vec();
            again.extend_from_slice(req.export_name);
            again.extend_from_slice(&(req.requests.len() as u16).to_be_bytes());
            for r in &req.requests {
                again.extend_from_slice(&r.to_be_bytes());
            }
            assert!(again == data, "an info request does not re-encode");
        }
        (Err(_), None) => {}
        (ours, model) => panic!("info decoder {ours:?} disagrees with the spec: {model:?}"),
    }
    match (parse_meta_context_request(data), meta_model(data)) {
        (Ok(req), Some((name, queries))) => {
            assert!(req.export_name == name && req.queries == queries);
            let mut again = (req.export_name.len() as u32).to_be_bytes().to_vec();
            again.extend_from_slice(req.export_name);
            again.extend_from_slice(&(req.queries.len() as u32).to_be_bytes());
            for q in &req.queries {
                again.extend_from_slice(&(q.len() as u32).to_be_bytes());
                again.extend_from_slice(q);
            }
            assert!(again == data, "a meta-context request does not re-encode");
        }
        (Err(_), None) => {}
        (ours, model) => panic!("meta-context decoder {ours:?} disagrees with the spec: {model:?}"),
    }
}

/// Splits the server's option replies; panics on anything that is not one.
fn split_replies(mut out: &[u8]) -> Vec<Reply> {
    let mut replies = Vec::new();
    while !out.is_empty() {
        assert!(out.len() >= 20, "a truncated option reply: {out:02x?}");
        assert_eq!(
            be_u64(out),
            OPTION_REPLY_MAGIC,
            "an option reply without its magic"
        );
        let len = be_u32(&out[16..]) as usize;
        assert!(out.len() >= 20 + len, "option reply data cut short");
        replies.push((
            be_u32(&out[8..]),
            be_u32(&out[12..]),
            out[20..20 + len].to_vec(),
        ));
        out = &out[20 + len..];
    }
    replies
}

fn is_error(kind: u32) -> bool {
    kind & (1 << 31) != 0
}

pub fn run(data: &[u8]) -> String {
    OUTPUT.with(|out| {
        let mut out = out.borrow_mut();
        out.clear();
        let mut stream = Duplex {
            input: data,
            output: std::mem::take(&mut *out),
        };
        let export = ExportInfo {
            name: EXPORT_NAME.to_string(),
            size_bytes: EXPORT_SIZE,
            transmission_flags: TRANSMISSION_FLAGS,
        };
        let result = negotiate(&mut stream, &export);
        *out = stream.output;
        check(data, &out, result)
    })
}

fn check(input: &[u8], out: &[u8], result: Result<Option<Negotiated>, ProtocolError>) -> String {
    // The greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES.
    assert!(out.len() >= GREETING_BYTES, "no greeting");
    assert_eq!(be_u64(out), NBD_MAGIC);
    assert_eq!(be_u64(&out[8..]), IHAVEOPT);
    assert_eq!(be_u16(&out[16..]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let mut out = &out[GREETING_BYTES..];

    // Every option's data through the pure decoders.
    let mut at = 4;
    while at + 16 <= input.len() {
        let len = be_u32(&input[at + 12..]) as usize;
        let Some(data) = input.get(at + 16..at + 16 + len) else {
            break;
        };
        check_decoders(data);
        at += 16 + len;
    }

    let (want, end, last) = model(input);
    // An EXPORT_NAME that succeeds ends with the export's size and flags, not an
    // option reply.
    if let End::Go(_, no_zeroes) = end {
        if last == Some(OPT_EXPORT_NAME) {
            let n = if no_zeroes { 10 } else { 134 };
            assert!(out.len() >= n, "EXPORT_NAME reply cut short");
            let (replies, tail) = out.split_at(out.len() - n);
            assert_eq!(be_u64(tail), EXPORT_SIZE);
            assert_eq!(be_u16(&tail[8..]), TRANSMISSION_FLAGS);
            assert!(
                tail[10..].iter().all(|&b| b == 0),
                "reserved bytes not zero"
            );
            out = replies;
        }
    }
    let got = split_replies(out);
    // Replies come in groups, one per option, each ending with one final reply.
    let mut open = None;
    for (i, (option, kind, data)) in got.iter().enumerate() {
        if let Some(prev) = open {
            assert_eq!(*option, prev, "reply {i} answers another option");
        }
        let last_of_group = *kind == REP_ACK || is_error(*kind);
        open = (!last_of_group).then_some(*option);
        if is_error(*kind) {
            // Error data is a message for humans: UTF-8, no NUL, at most 4096 bytes.
            assert!(data.len() <= 4096 && !data.contains(&0));
            assert!(std::str::from_utf8(data).is_ok(), "error message not UTF-8");
        }
    }
    assert!(open.is_none(), "an option without a final reply");
    let strip = |r: &[Reply]| -> Vec<Reply> {
        r.iter()
            .map(|(o, k, d)| (*o, *k, if is_error(*k) { Vec::new() } else { d.clone() }))
            .collect()
    };
    let got = strip(&got);
    if got != want {
        let brief = |r: &[Reply]| -> Vec<(u32, u32, usize)> {
            r.iter().map(|(o, k, d)| (*o, *k, d.len())).collect()
        };
        panic!(
            "replies differ from the documented ones: got {:?}, want {:?}",
            brief(&got),
            brief(&want)
        );
    }
    let outcome = match (&end, result) {
        (End::Io, Err(ProtocolError::Io(_))) => "eof".to_string(),
        (End::ClientFlags(f), Err(ProtocolError::ClientFlags(g))) if *f == g => {
            "client-flags".to_string()
        }
        (End::OptionMagic(m), Err(ProtocolError::OptionMagic(n))) if *m == n => {
            "option-magic".to_string()
        }
        (End::UnknownExport, Err(ProtocolError::UnknownExport)) => "unknown-export".to_string(),
        (End::Abort, Ok(None)) => "abort".to_string(),
        (End::Go(want, _), Ok(Some(got))) => {
            assert_eq!(*want, got, "negotiated something else");
            format!(
                "ok:structured={}:meta={}",
                got.structured, got.base_allocation
            )
        }
        (end, result) => panic!("negotiate ended with {result:?}, the model with {end:?}"),
    };
    let last = match last {
        Some(o) if o <= OPT_SET_META_CONTEXT => o.to_string(),
        Some(_) => "other".to_string(),
        None => "none".to_string(),
    };
    format!(
        "{outcome}:last={last}:replies={}",
        crate::bucket(want.len())
    )
}

/// Appends one option to `out`.
pub fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn info(name: &[u8], asked: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(asked.len() as u16).to_be_bytes());
    for a in asked {
        d.extend_from_slice(&a.to_be_bytes());
    }
    d
}

fn meta(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

/// Restores the option magic of every option and, with entropy bits set, fixes the
/// client flags and cuts an option's length to the bytes that follow. Entropy 0
/// restores magics and nothing else.
fn repair(buf: &mut [u8], entropy: u64) {
    if buf.len() < 4 {
        return;
    }
    if entropy & 1 != 0 {
        let flags = be_u32(buf) & (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        buf[..4].copy_from_slice(&flags.to_be_bytes());
    }
    let mut bits = entropy >> 1;
    let mut at = 4;
    while at + 16 <= buf.len() {
        if bits & 1 == 0 {
            buf[at..at + 8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        }
        let room = buf.len() - at - 16;
        let mut len = be_u32(&buf[at + 12..]) as usize;
        if bits & 2 != 0 && len > room {
            len = room;
            buf[at + 12..at + 16].copy_from_slice(&(len as u32).to_be_bytes());
        }
        bits = bits.rotate_right(2);
        at += 16 + len;
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let both = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    let mut seeds = Vec::new();

    // What qemu and libnbd send: structured replies, base:allocation, GO.
    let mut s = both.to_vec();
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_LIST_META_CONTEXT, &meta(b"vm1", &[b"base:"]));
    option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta(
            b"vm1",
            &[b"qemu:dirty-bitmap:x", BASE_ALLOCATION.as_bytes()],
        ),
    );
    option(&mut s, OPT_GO, &info(b"vm1", &[INFO_BLOCK_SIZE, INFO_NAME]));
    seeds.push(s);

    // Every other option, then GO on the default export without structured replies.
    let mut s = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    option(&mut s, OPT_LIST, &[]);
    option(&mut s, OPT_LIST, b"x");
    option(&mut s, OPT_INFO, &info(b"", &[]));
    option(&mut s, OPT_INFO, &info(b"other", &[]));
    option(&mut s, OPT_INFO, &info(b"vm1", &[INFO_NAME])[..6]);
    option(&mut s, OPT_STARTTLS, &[]);
    option(&mut s, 99, b"whatever");
    option(&mut s, OPT_SET_META_CONTEXT, &meta(b"", &[]));
    option(&mut s, OPT_STRUCTURED_REPLY, b"x");
    option(&mut s, OPT_GO, &info(b"", &[]));
    seeds.push(s);

    // Meta contexts: listing all, a failed SET clearing an earlier one, a bad count.
    let mut s = both.to_vec();
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_LIST_META_CONTEXT, &meta(b"", &[]));
    option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta(b"", &[BASE_ALLOCATION.as_bytes()]),
    );
    option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta(b"nope", &[BASE_ALLOCATION.as_bytes()]),
    );
    let mut bad = meta(b"vm1", &[b"base:"]);
    bad[7..11].copy_from_slice(&u32::MAX.to_be_bytes());
    option(&mut s, OPT_LIST_META_CONTEXT, &bad);
    option(&mut s, OPT_EXPORT_NAME, b"vm1");
    seeds.push(s);

    // EXPORT_NAME with the zero padding, an unknown export, ABORT.
    let mut s = 0u32.to_be_bytes().to_vec();
    option(&mut s, OPT_EXPORT_NAME, b"");
    seeds.push(s);
    let mut s = both.to_vec();
    option(&mut s, OPT_EXPORT_NAME, b"vm2");
    seeds.push(s);
    let mut s = both.to_vec();
    option(&mut s, OPT_ABORT, &[]);
    seeds.push(s);

    // Hostile: unknown client flags, a bad option magic, option data over the limit
    // (drained), an option cut short.
    seeds.push(0x80u32.to_be_bytes().to_vec());
    let mut s = both.to_vec();
    option(&mut s, OPT_LIST, &[]);
    s.extend_from_slice(b"NOTHAVEOPT......");
    seeds.push(s);
    let mut s = both.to_vec();
    option(&mut s, 12345, &vec![b'x'; MAX_OPTION as usize + 1]);
    option(&mut s, OPT_GO, &info(b"vm1", &[]));
    seeds.push(s);
    let mut s = both.to_vec();
    option(&mut s, OPT_GO, &info(b"vm1", &[INFO_NAME]));
    s.truncate(s.len() - 3);
    seeds.push(s);
    seeds
}

/// The option limit the model uses is the one the server has.
const _: () = assert!(MAX_OPTION == MAX_OPTION_BYTES);
