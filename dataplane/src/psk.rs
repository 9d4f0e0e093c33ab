//! The pre-shared key that authenticates a source to a target.
//!
//! Both sides hold the same 32 random bytes in a one-line text file:
//!
//! ```text
//! ferry-psk-v1:<64 lowercase hex characters>
//! ```
//!
//! `ferry keygen` prints such a line. The key never appears in `Debug` output or in an
//! error message; what can be logged is its [`fingerprint`](Psk::fingerprint), which
//! lets an operator check that both sides hold the same key without revealing it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Bytes of key material.
pub const PSK_LEN: usize = 32;

/// What every key file line starts with; the version lets the format change later.
pub const PSK_FILE_PREFIX: &str = "ferry-psk-v1:";

/// Length of a well-formed key file: prefix, 64 hex characters, newline.
pub const PSK_FILE_LEN: usize = PSK_FILE_PREFIX.len() + 2 * PSK_LEN + 1;

/// A key file larger than this is certainly not one; reading stops here so that
/// pointing `psk_file` at a disk image or `/dev/zero` fails fast.
const PSK_FILE_READ_LIMIT: u64 = 4096;

/// Context for the fingerprint derivation (BLAKE3 `derive_key`), so the fingerprint is
/// unrelated to any MAC computed with the key.
const FINGERPRINT_CONTEXT: &str = "ferry 2024 psk fingerprint v1";

/// Errors from reading, writing or generating a key.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    /// The key file could not be opened or read.
    #[error("cannot read key file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The key file exists but is not a ferry key. `reason` never contains key material.
    #[error(
        "key file {} is not a ferry key: {reason}; expected one line `{PSK_FILE_PREFIX}` \
         followed by 64 lowercase hex characters (generate one with `ferry keygen`)",
        path.display()
    )]
    Format {
        path: PathBuf,
        reason: KeyFormatProblem,
    },
    /// The key file could not be created or written.
    #[error("cannot write key file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel's random number generator failed.
    #[error("cannot draw random bytes for a new key")]
    Random {
        #[source]
        source: io::Error,
    },
}

/// Why a key file is not a ferry key. The texts never quote the content: a file with a
/// typo in it is still mostly key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatProblem {
    #[error("it is not a regular file")]
    NotRegularFile,
    #[error("it is more than {PSK_FILE_READ_LIMIT} bytes long; a key file is {PSK_FILE_LEN}")]
    TooLong,
    #[error("it has more than one line")]
    MultipleLines,
    #[error("the line ends with a carriage return (CRLF line ending)")]
    CarriageReturn,
    #[error("it does not start with `{PSK_FILE_PREFIX}`")]
    BadPrefix,
    #[error("the key has {found} characters, expected {}", 2 * PSK_LEN)]
    WrongLength { found: usize },
    /// `position` is 1-based.
    #[error("character {position} of the key is not a lowercase hex digit")]
    NotHex { position: usize },
}

/// Who besides the owner may access the key file, as found by [`Psk::load_with_access`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFileAccess {
    /// No permission bits for group or others.
    OwnerOnly,
    /// Group or others have some access (read lets them impersonate a source; write
    /// lets them swap the key). `mode` holds the permission bits, e.g. `0o644`.
    GroupOrOthers { mode: u32 },
}

/// A 32-byte pre-shared key. Zeroed when dropped; never printed.
#[derive(Clone)]
pub struct Psk([u8; PSK_LEN]);

impl Psk {
    /// Draws a new key from the kernel's CSPRNG.
    pub fn generate() -> Result<Psk, PskError> {
        let mut bytes = [0u8; PSK_LEN];
        getrandom::fill(&mut bytes).map_err(|e| PskError::Random {
            source: match e.raw_os_error() {
                Some(errno) => io::Error::from_raw_os_error(errno),
                None => io::Error::other(e.to_string()),
            },
        })?;
        Ok(Psk(bytes))
    }

    /// Wraps key material obtained elsewhere.
    pub fn from_bytes(bytes: [u8; PSK_LEN]) -> Psk {
        Psk(bytes)
    }

    /// The key material, for the MAC that authenticates a connection.
    pub fn as_bytes(&self) -> &[u8; PSK_LEN] {
        &self.0
    }

    /// The key file's content: `ferry-psk-v1:<hex>\n`.
    pub fn to_file_string(&self) -> String {
        let mut s = String::with_capacity(PSK_FILE_LEN);
        s.push_str(PSK_FILE_PREFIX);
        for b in self.0 {
            s.push(hex_digit(b >> 4));
            s.push(hex_digit(b & 0x0f));
        }
        s.push('\n');
        s
    }

    /// Compares two keys in time independent of where they differ.
    pub fn ct_eq(&self, other: &Psk) -> bool {
        ct_eq_bytes(&self.0, &other.0)
    }

    /// A short, stable, non-secret identifier of the key (16 hex characters), for logs
    /// and for telling an operator that the two sides hold different keys.
    pub fn fingerprint(&self) -> String {
        let derived = blake3::derive_key(FINGERPRINT_CONTEXT, &self.0);
        derived[..8]
            .iter()
            .flat_map(|b| [hex_digit(b >> 4), hex_digit(b & 0x0f)])
            .collect()
    }

    /// Reads a key file. Logs a warning if group or others have access to it; use
    /// [`load_with_access`](Self::load_with_access) to act on that instead.
    pub fn load(path: impl AsRef<Path>) -> Result<Psk, PskError> {
        let path = path.as_ref();
        let (psk, access) = Self::load_with_access(path)?;
        if let KeyFileAccess::GroupOrOthers { mode } = access {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:03o}"),
                "key file is accessible to group or others; restrict it with `chmod 600`"
            );
        }
        Ok(psk)
    }

    /// Reads a key file and reports who besides the owner may access it. The check is
    /// made on the opened file, so it describes the file that was actually read.
    pub fn load_with_access(path: impl AsRef<Path>) -> Result<(Psk, KeyFileAccess), PskError> {
        let path = path.as_ref();
        let read_error = |source| PskError::Read {
            path: path.to_path_buf(),
            source,
        };
        let format_error = |reason: KeyFormatProblem| PskError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(read_error)?;
        let metadata = file.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(format_error(KeyFormatProblem::NotRegularFile));
        }
        let mode = metadata.permissions().mode() & 0o777;
        let access = if mode & 0o077 == 0 {
            KeyFileAccess::OwnerOnly
        } else {
            KeyFileAccess::GroupOrOthers { mode }
        };
        let mut content = Vec::with_capacity(PSK_FILE_LEN);
        file.take(PSK_FILE_READ_LIMIT + 1)
            .read_to_end(&mut content)
            .map_err(read_error)?;
        let psk = parse_file_bytes(&content).map_err(format_error)?;
        Ok((psk, access))
    }

    /// Creates `path` with mode 0600 and writes the key to it. Refuses to overwrite an
    /// existing file: replacing a key locks out the other side until it is copied over.
    pub fn save_new(&self, path: impl AsRef<Path>) -> Result<(), PskError> {
        let path = path.as_ref();
        let write_error = |source| PskError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_error)?;
        file.write_all(self.to_file_string().as_bytes())
            .map_err(write_error)?;
        file.sync_all().map_err(write_error)
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Psk")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keeps the compiler from eliding the zeroing as a dead store.
        std::hint::black_box(&mut self.0);
    }
}

/// Compares two byte strings without an early exit, so the time taken does not reveal
/// how long a matching prefix is (e.g. of a MAC tag). Lengths are not secret.
pub fn ct_eq_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hex_digit(nibble: u8) -> char {
    debug_assert!(nibble < 16);
    char::from(b"0123456789abcdef"[usize::from(nibble)])
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Parses a key file's bytes. The error text never quotes the content: a file with a
/// typo in it is still mostly key.
fn parse_file_bytes(content: &[u8]) -> Result<Psk, KeyFormatProblem> {
    if content.len() as u64 > PSK_FILE_READ_LIMIT {
        return Err(KeyFormatProblem::TooLong);
    }
    // The final newline is optional so that `echo -n` and editors that strip it work.
    let line = content.strip_suffix(b"\n").unwrap_or(content);
    if line.contains(&b'\n') {
        return Err(KeyFormatProblem::MultipleLines);
    }
    if line.ends_with(b"\r") {
        return Err(KeyFormatProblem::CarriageReturn);
    }
    let hex = line
        .strip_prefix(PSK_FILE_PREFIX.as_bytes())
        .ok_or(KeyFormatProblem::BadPrefix)?;
    if hex.len() != 2 * PSK_LEN {
        return Err(KeyFormatProblem::WrongLength { found: hex.len() });
    }
    let mut bytes = [0u8; PSK_LEN];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let digit = |k: usize| {
            hex_value(pair[k]).ok_or(KeyFormatProblem::NotHex {
                position: 2 * i + k + 1,
            })
        };
        bytes[i] = digit(0)? << 4 | digit(1)?;
    }
    Ok(Psk(bytes))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn sample() -> Psk {
        Psk::from_bytes(std::array::from_fn(|i| i as u8))
    }

    fn write_key_file(dir: &Path, content: &[u8], mode: u32) -> PathBuf {
        let path = dir.join("ferry.key");
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn file_string_format() {
        let s = sample().to_file_string();
        assert_eq!(s, format!("ferry-psk-v1:{KEY_HEX}\n"));
        assert_eq!(s.len(), PSK_FILE_LEN);
    }

    #[test]
    fn generated_keys_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let psk = Psk::generate().unwrap();
        let other = Psk::generate().unwrap();
        assert!(!psk.ct_eq(&other));
        let path = dir.path().join("ferry.key");
        psk.save_new(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (loaded, access) = Psk::load_with_access(&path).unwrap();
        assert!(loaded.ct_eq(&psk));
        assert_eq!(loaded.as_bytes(), psk.as_bytes());
        assert_eq!(access, KeyFileAccess::OwnerOnly);
        assert!(
            matches!(psk.save_new(&path), Err(PskError::Write { .. })),
            "an existing key is never overwritten"
        );
    }

    #[test]
    fn final_newline_is_optional() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_key_file(
            dir.path(),
            format!("ferry-psk-v1:{KEY_HEX}").as_bytes(),
            0o600,
        );
        assert!(Psk::load(&path).unwrap().ct_eq(&sample()));
    }

    #[test]
    fn group_or_world_access_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let content = sample().to_file_string();
        for mode in [0o640, 0o604, 0o620, 0o644] {
            let path = write_key_file(dir.path(), content.as_bytes(), mode);
            let (_, access) = Psk::load_with_access(&path).unwrap();
            assert_eq!(access, KeyFileAccess::GroupOrOthers { mode }, "{mode:o}");
            // `load` still succeeds; it only warns.
            assert!(Psk::load(&path).is_ok());
        }
    }

    #[test]
    fn malformed_files_are_rejected_with_the_path_and_without_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let upper = format!("ferry-psk-v1:{}\n", KEY_HEX.to_uppercase());
        let short = format!("ferry-psk-v1:{}\n", &KEY_HEX[..62]);
        let long = format!("ferry-psk-v1:{KEY_HEX}0\n");
        let crlf = format!("ferry-psk-v1:{KEY_HEX}\r\n");
        let two_lines = format!("ferry-psk-v1:{KEY_HEX}\n\n");
        let no_prefix = format!("{KEY_HEX}\n");
        let old_version = format!("ferry-psk-v0:{KEY_HEX}\n");
        let space = format!("ferry-psk-v1: {}\n", &KEY_HEX[1..]);
        let huge = vec![b'a'; 10_000];
        let cases: [(&[u8], &str); 10] = [
            (b"", "does not start with"),
            (upper.as_bytes(), "character 22 of the key"),
            (short.as_bytes(), "has 62 characters"),
            (long.as_bytes(), "has 65 characters"),
            (crlf.as_bytes(), "carriage return"),
            (two_lines.as_bytes(), "more than one line"),
            (no_prefix.as_bytes(), "does not start with"),
            (old_version.as_bytes(), "does not start with"),
            (space.as_bytes(), "character 1 of the key"),
            (&huge, "more than 4096 bytes"),
        ];
        for (content, expected) in cases {
            let path = write_key_file(dir.path(), content, 0o600);
            let err = Psk::load(&path).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, PskError::Format { .. }), "{text}");
            assert!(
                text.contains(expected),
                "{text:?} should contain {expected:?}"
            );
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(
                !text.contains(&KEY_HEX[2..20]),
                "key material leaked: {text}"
            );
        }
    }

    #[test]
    fn missing_file_and_directory_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.key");
        let err = Psk::load(&missing).unwrap_err();
        assert!(matches!(err, PskError::Read { .. }));
        assert!(err.to_string().contains("absent.key"));
        let err = Psk::load(dir.path()).unwrap_err();
        assert!(matches!(err, PskError::Format { .. }), "{err}");
    }

    #[test]
    fn debug_never_prints_the_key() {
        let psk = sample();
        let debug = format!("{psk:?}");
        assert!(!debug.contains(&KEY_HEX[..16]), "{debug}");
        assert!(!debug.contains("[0, 1, 2"), "{debug}");
        assert!(debug.contains(&psk.fingerprint()));
        assert_eq!(psk.fingerprint().len(), 16);
        assert_eq!(psk.fingerprint(), sample().fingerprint(), "stable");
        assert_ne!(psk.fingerprint(), Psk::generate().unwrap().fingerprint());
    }

    #[test]
    fn constant_time_comparison() {
        let a = sample();
        let mut bytes = *a.as_bytes();
        assert!(a.ct_eq(&Psk::from_bytes(bytes)));
        for i in [0, 15, 31] {
            bytes[i] ^= 0x80;
            assert!(!a.ct_eq(&Psk::from_bytes(bytes)));
            bytes[i] ^= 0x80;
        }
        assert!(ct_eq_bytes(b"", b""));
        assert!(!ct_eq_bytes(b"abc", b"ab"));
        assert!(!ct_eq_bytes(b"abc", b"abd"));
    }
}
