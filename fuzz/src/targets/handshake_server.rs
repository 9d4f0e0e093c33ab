//! The target's side of the handshake against a client that does not hold the key:
//! the first thing an unauthenticated peer on the network reaches.
//!
//! The input is everything the client sends. The server must never panic and never
//! authenticate it; and what the server writes back must be well-formed frames whose
//! Challenge carries a correct proof for the client's nonce (checked here from the
//! specification with `blake3`, not with the product's code).

use std::cell::RefCell;

use dataplane::protocol::auth::server_handshake;
use dataplane::protocol::{
    FrameKind, FrameReader, FrameWriter, ProtocolError, FRAME_HEADER_LEN, NONCE_LEN,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

use crate::frames;
use crate::Target;

/// The server's pre-shared key. Fixed: no input can contain a proof made with it
/// except by breaking keyed BLAKE3.
pub const KEY: [u8; 32] = *b"ferry-fuzz fixed server key 0001";

pub fn target() -> Target {
    Target {
        name: "handshake_server",
        run,
        seeds,
        repair: Some(|buf, entropy| frames::repair_stream(buf, entropy)),
        dictionary: &[b"FRY1", &[1, 0], &[0xff, 0xff], &[1], &[3], &[50]],
        max_len: 4 << 10,
    }
}

fn proof(label: &[u8], first: &[u8], second: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&KEY);
    h.update(label);
    h.update(first);
    h.update(second);
    *h.finalize().as_bytes()
}

thread_local! {
    static REPLY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub fn run(data: &[u8]) -> String {
    REPLY.with(|reply| {
        let mut reply = reply.borrow_mut();
        reply.clear();
        let result = server_handshake(
            &mut FrameReader::new(data),
            &mut FrameWriter::new(&mut *reply),
            &KEY,
        );
        if let Ok(version) = result {
            panic!("server_handshake authenticated a client without the key (version {version})");
        }
        let (challenged, told) = check_reply(data, &reply);
        let e = result.expect_err("checked above");
        // `server_handshake` documents that an Error frame was sent on every failure,
        // and the protocol asks for one "when the peer can still be told". Where none
        // was, the label says so rather than failing the run: see fuzz/README.md.
        let stage = match (challenged, told) {
            (false, true) => "refused",
            (false, false) => "refused-silently",
            (true, true) => "challenged-refused",
            (true, false) => "challenged-closed-silently",
        };
        crate::protocol_label(stage, &e)
    })
}

/// What the server wrote: a Challenge (only after a Hello it accepted) and/or an
/// Error frame, all decodable, nothing after an Error. Returns whether the server
/// sent a Challenge and whether it sent an Error frame.
fn check_reply(input: &[u8], reply: &[u8]) -> (bool, bool) {
    let mut reader = FrameReader::new(reply);
    let mut buf = [0u8; 8192];
    let mut frames = 0;
    let mut challenged = false;
    let mut told = false;
    loop {
        match reader.read_frame(&mut buf) {
            Ok(None) => break,
            Ok(Some((FrameKind::Challenge, payload))) => {
                assert_eq!(frames, 0, "Challenge sent after another frame");
                assert_eq!(payload.len(), 72, "Challenge of the wrong length");
                let version = u16::from_le_bytes([payload[0], payload[1]]);
                assert!(
                    (PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version),
                    "Challenge offers version {version}"
                );
                // The server answered a Hello, so the input starts with a valid one.
                let client_nonce = &input[FRAME_HEADER_LEN + 8..FRAME_HEADER_LEN + 8 + NONCE_LEN];
                let server_nonce = &payload[8..8 + NONCE_LEN];
                assert_eq!(
                    &payload[8 + NONCE_LEN..],
                    &proof(b"ferry-v1 server", client_nonce, server_nonce),
                    "Challenge proof does not follow the specification"
                );
                challenged = true;
            }
            Ok(Some((kind, _))) => panic!("server sent {kind:?} to an unauthenticated client"),
            Err(ProtocolError::Remote { .. }) => {
                assert!(
                    reader.get_ref().is_empty(),
                    "the server wrote on after its Error frame"
                );
                told = true;
                break;
            }
            Err(e) => panic!("the server wrote a frame its own reader rejects: {e}"),
        }
        frames += 1;
    }
    (challenged, told)
}

fn seeds() -> Vec<Vec<u8>> {
    let hello = |min: u16, max: u16, flags: u32| {
        [
            min.to_le_bytes().as_slice(),
            &max.to_le_bytes(),
            &flags.to_le_bytes(),
            &[0x5c; NONCE_LEN],
        ]
        .concat()
    };
    let auth = [0xa7u8; 32];
    vec![
        frames::stream(&[
            (FrameKind::Hello, &hello(1, 1, 0)),
            (FrameKind::Auth, &auth),
        ]),
        frames::stream(&[
            (FrameKind::Hello, &hello(1, 9, 0)),
            (FrameKind::Auth, &auth[..31]),
        ]),
        frames::stream(&[(FrameKind::Hello, &hello(2, 3, 0))]),
        frames::stream(&[
            (FrameKind::Hello, &hello(1, 1, 0)),
            (FrameKind::Error, &[2, 0, 0, 0, 1, 0, 0, 0, b'x']),
        ]),
        frames::stream(&[(FrameKind::Auth, &auth)]),
        frames::stream(&[(FrameKind::Hello, &hello(0, 0, 0)[..39])]),
    ]
}
