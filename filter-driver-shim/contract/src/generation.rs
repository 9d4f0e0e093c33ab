//! [`GenerationId`]: which tracking generation a bitmap, a shim disk or a replica
//! belongs to.
//!
//! It is 16 bytes in bitmap headers and on the replication wire (convert there with
//! [`GenerationId::from_bytes`] and [`GenerationId::as_bytes`]) and 32 lowercase hex
//! digits everywhere text is: the control protocol's JSON, state files, logs. Serde
//! uses the text form, so a JSON field holding a generation is always that string.

use std::fmt;
use std::io;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Identifies a tracking generation. A new one is drawn whenever tracking cannot be
/// trusted (the image changed behind the shim's back, a resize, a lost bitmap), so a
/// consumer holding bits of another generation knows its base is gone and must fall
/// back to a checksum-compare resync.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenerationId([u8; 16]);

impl GenerationId {
    /// The all-zero id. It never names a generation; it is what an uninitialised id looks
    /// like, so bitmaps refuse it.
    pub const NIL: GenerationId = GenerationId([0; 16]);

    /// Draws 16 bytes from the kernel's CSPRNG.
    pub fn random() -> io::Result<GenerationId> {
        let mut bytes = [0u8; 16];
        let mut filled = 0;
        while filled < bytes.len() {
            let rest = &mut bytes[filled..];
            // SAFETY: `rest` is an exclusive borrow of `rest.len()` initialised bytes that
            // outlives the call; getrandom(2) writes at most that many bytes into it and
            // keeps no reference after it returns.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                // A signal before any byte was produced: retry on purpose.
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            filled += n as usize;
        }
        let id = GenerationId(bytes);
        if id == GenerationId::NIL {
            // 2^-128: a kernel that returns zeros is broken, not unlucky.
            return Err(io::Error::other("getrandom returned all zeros"));
        }
        Ok(id)
    }

    /// Wraps raw bytes, e.g. read from the wire.
    pub const fn from_bytes(bytes: [u8; 16]) -> GenerationId {
        GenerationId(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Whether this is [`GenerationId::NIL`].
    pub fn is_nil(&self) -> bool {
        *self == GenerationId::NIL
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Text that is not a generation id (32 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not 32 hex digits")]
pub struct NotAGeneration {
    /// The text as given.
    pub text: String,
}

impl std::str::FromStr for GenerationId {
    type Err = NotAGeneration;

    /// Parses the 32 lowercase or uppercase hex digits [`Display`](fmt::Display) prints.
    fn from_str(s: &str) -> Result<GenerationId, NotAGeneration> {
        let bad = || NotAGeneration {
            text: s.to_string(),
        };
        // Hex digits only: `u8::from_str_radix` alone would take a `+` sign.
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(GenerationId(bytes))
    }
}

impl Serialize for GenerationId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GenerationId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<GenerationId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GenerationId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_are_the_32_hex_digits() {
        let g = GenerationId::from_bytes([0xab; 16]);
        let text = "ab".repeat(16);
        assert_eq!(g.to_string(), text);
        assert_eq!(text.parse::<GenerationId>(), Ok(g));
        assert_eq!(text.to_uppercase().parse::<GenerationId>(), Ok(g));
        let json = serde_json::to_string(&g).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<GenerationId>(&json).unwrap(), g);
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "ab",
            &"ab".repeat(17),
            &format!("+a{}", "ab".repeat(15)),
            &"zz".repeat(16),
        ] {
            let e = bad.parse::<GenerationId>().unwrap_err();
            assert_eq!(e.to_string(), format!("`{bad}` is not 32 hex digits"));
            assert!(serde_json::from_str::<GenerationId>(&format!("\"{bad}\"")).is_err());
        }
    }
}
