//! Mutual challenge–response authentication with the pre-shared key.
//!
//! Each side sends a fresh random nonce and proves knowledge of the key by returning a
//! keyed BLAKE3 MAC over both nonces under a role label. The key itself never crosses
//! the wire; the role labels stop a proof from one direction being reflected back as a
//! proof for the other; fresh nonces on both sides stop replay.

use std::io::{Read, Write};

use zerocopy::{FromBytes, IntoBytes};

use super::frame::{FrameReader, FrameWriter};
use super::wire::{
    Auth, Challenge, ErrorCode, FrameKind, Hello, NONCE_LEN, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};
use super::ProtocolError;

const SERVER_LABEL: &[u8] = b"ferry-v1 server";
const CLIENT_LABEL: &[u8] = b"ferry-v1 client";

fn proof(
    key: &[u8; 32],
    label: &[u8],
    first: &[u8; NONCE_LEN],
    second: &[u8; NONCE_LEN],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(label);
    h.update(first);
    h.update(second);
    *h.finalize().as_bytes()
}

/// Constant-time comparison (blake3's `Hash` equality is constant time).
fn proofs_match(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from_bytes(*a) == blake3::Hash::from_bytes(*b)
}

fn nonce() -> Result<[u8; NONCE_LEN], ProtocolError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| {
        ProtocolError::io(
            "drawing a random nonce",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(n)
}

/// Client side of the handshake. Returns the negotiated protocol version, which
/// `reader` and `writer` then speak.
pub fn client_handshake<R: Read, W: Write>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    key: &[u8; 32],
) -> Result<u16, ProtocolError> {
    client_handshake_up_to(reader, writer, key, PROTOCOL_VERSION_MAX)
}

/// [`client_handshake`] offering versions only up to `version_max`, as a client of an
/// older build would (tests of how a target serves one).
pub fn client_handshake_up_to<R: Read, W: Write>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    key: &[u8; 32],
    version_max: u16,
) -> Result<u16, ProtocolError> {
    let client_nonce = nonce()?;
    let hello = Hello {
        version_min: PROTOCOL_VERSION_MIN.into(),
        version_max: version_max.into(),
        flags: 0.into(),
        nonce: client_nonce,
    };
    writer.send(FrameKind::Hello, &[hello.as_bytes()])?;
    let mut buf = [0u8; 256];
    let payload = reader.expect(FrameKind::Challenge, &mut buf)?;
    let challenge = Challenge::read_from_bytes(payload).map_err(|_| ProtocolError::Malformed {
        what: "challenge frame has the wrong length",
    })?;
    let version = challenge.version.get();
    if !(PROTOCOL_VERSION_MIN..=version_max).contains(&version) {
        return Err(ProtocolError::Version {
            offered_min: PROTOCOL_VERSION_MIN,
            offered_max: version_max,
            peer: version,
        });
    }
    let expected = proof(key, SERVER_LABEL, &client_nonce, &challenge.nonce);
    if !proofs_match(&expected, &challenge.proof) {
        // The target logs this: it says what the source found, in the target's terms.
        writer.send_error(
            ErrorCode::Auth,
            "the source refused this target: it does not hold the source's pre-shared key (check psk_file on both sides)",
        );
        return Err(ProtocolError::AuthFailed {
            detail:
                "the target does not hold the same pre-shared key (check psk_file on both sides)",
        });
    }
    let auth = Auth {
        proof: proof(key, CLIENT_LABEL, &challenge.nonce, &client_nonce),
    };
    writer.send(FrameKind::Auth, &[auth.as_bytes()])?;
    match reader.expect(FrameKind::AuthOk, &mut buf) {
        Ok(_) => Ok(agreed(reader, writer, version)),
        Err(ProtocolError::Remote {
            code: ErrorCode::Auth,
            ..
        }) => Err(ProtocolError::AuthFailed {
            detail: "the target rejected our proof: the pre-shared keys differ",
        }),
        Err(e) => Err(e),
    }
}

/// Server side of the handshake: returns the negotiated protocol version, which
/// `reader` and `writer` then speak. On failure an Error frame has been sent to the
/// peer.
pub fn server_handshake<R: Read, W: Write>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    key: &[u8; 32],
) -> Result<u16, ProtocolError> {
    let mut buf = [0u8; 256];
    let payload = match reader.expect(FrameKind::Hello, &mut buf) {
        Ok(p) => p,
        Err(e) => {
            writer.send_error(ErrorCode::Protocol, &e.to_string());
            return Err(e);
        }
    };
    let hello = Hello::read_from_bytes(payload).map_err(|_| {
        writer.send_error(ErrorCode::Protocol, "hello frame has the wrong length");
        ProtocolError::Malformed {
            what: "hello frame has the wrong length",
        }
    })?;
    let (min, max) = (hello.version_min.get(), hello.version_max.get());
    let version = max.min(PROTOCOL_VERSION_MAX);
    if version < min || version < PROTOCOL_VERSION_MIN {
        let e = ProtocolError::Version {
            offered_min: PROTOCOL_VERSION_MIN,
            offered_max: PROTOCOL_VERSION_MAX,
            peer: max,
        };
        writer.send_error(ErrorCode::Version, &e.to_string());
        return Err(e);
    }
    let server_nonce = nonce()?;
    let challenge = Challenge {
        version: version.into(),
        reserved: 0.into(),
        flags: 0.into(),
        nonce: server_nonce,
        proof: proof(key, SERVER_LABEL, &hello.nonce, &server_nonce),
    };
    writer.send(FrameKind::Challenge, &[challenge.as_bytes()])?;
    let payload = match reader.expect(FrameKind::Auth, &mut buf) {
        Ok(p) => p,
        Err(e) => {
            writer.send_error(ErrorCode::Auth, &format!("authentication failed: {e}"));
            return Err(e);
        }
    };
    let auth = Auth::read_from_bytes(payload).map_err(|_| {
        writer.send_error(
            ErrorCode::Auth,
            "authentication failed: auth frame has the wrong length",
        );
        ProtocolError::Malformed {
            what: "auth frame has the wrong length",
        }
    })?;
    let expected = proof(key, CLIENT_LABEL, &server_nonce, &hello.nonce);
    if !proofs_match(&expected, &auth.proof) {
        writer.send_error(
            ErrorCode::Auth,
            "authentication failed: the source does not hold this target's pre-shared key",
        );
        return Err(ProtocolError::AuthFailed {
            detail: "a source presented a wrong pre-shared key",
        });
    }
    writer.send(FrameKind::AuthOk, &[])?;
    Ok(agreed(reader, writer, version))
}

/// The handshake agreed on `version`: from now on `reader` and `writer` speak it.
fn agreed<R: Read, W: Write>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    version: u16,
) -> u16 {
    reader.set_version(version);
    writer.set_version(version);
    version
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn run(
        client_key: [u8; 32],
        server_key: [u8; 32],
    ) -> (Result<u16, ProtocolError>, Result<u16, ProtocolError>) {
        run_up_to(client_key, server_key, PROTOCOL_VERSION_MAX)
    }

    /// A handshake whose client offers up to `version_max`; after it, each side sends
    /// a Data frame at the version it agreed, and each side's reader must accept the
    /// other's: both sides' framers speak the agreed version.
    fn run_up_to(
        client_key: [u8; 32],
        server_key: [u8; 32],
        version_max: u16,
    ) -> (Result<u16, ProtocolError>, Result<u16, ProtocolError>) {
        fn exchange(
            r: &mut FrameReader<UnixStream>,
            w: &mut FrameWriter<UnixStream>,
        ) -> Result<(), ProtocolError> {
            // A table (header, one record, padding) and a block after it: a version-4
            // frame hashes the first 4096 bytes only, an older one all of them.
            let mut data = vec![0u8; 8192];
            data[4] = 1;
            data[5000] = 1;
            w.send(FrameKind::Data, &[&data])?;
            let mut buf = vec![0u8; data.len()];
            r.expect(FrameKind::Data, &mut buf).map(|_| ())
        }
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut r = FrameReader::new(b.try_clone().unwrap());
            let mut w = FrameWriter::new(b);
            let v = server_handshake(&mut r, &mut w, &server_key)?;
            exchange(&mut r, &mut w)?;
            Ok(v)
        });
        let mut r = FrameReader::new(a.try_clone().unwrap());
        let mut w = FrameWriter::new(a);
        let c = client_handshake_up_to(&mut r, &mut w, &client_key, version_max);
        let c = c.and_then(|v| exchange(&mut r, &mut w).map(|()| v));
        drop((r, w));
        (c, server.join().unwrap())
    }

    #[test]
    fn same_key_authenticates_both_ways() {
        let (c, s) = run([7; 32], [7; 32]);
        assert_eq!(c.unwrap(), PROTOCOL_VERSION_MAX);
        assert_eq!(s.unwrap(), PROTOCOL_VERSION_MAX);
    }

    #[test]
    fn an_older_client_gets_its_version_on_both_sides() {
        for version in PROTOCOL_VERSION_MIN..PROTOCOL_VERSION_MAX {
            let (c, s) = run_up_to([7; 32], [7; 32], version);
            assert_eq!(c.unwrap(), version);
            assert_eq!(s.unwrap(), version);
        }
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (c, s) = run([7; 32], [8; 32]);
        assert!(matches!(c, Err(ProtocolError::AuthFailed { .. })), "{c:?}");
        assert!(s.is_err());
    }

    #[test]
    fn proofs_are_role_bound() {
        let (k, a, b) = ([1; 32], [2; NONCE_LEN], [3; NONCE_LEN]);
        assert_ne!(
            proof(&k, SERVER_LABEL, &a, &b),
            proof(&k, CLIENT_LABEL, &a, &b)
        );
        assert_ne!(
            proof(&k, SERVER_LABEL, &a, &b),
            proof(&k, SERVER_LABEL, &b, &a)
        );
    }
}
