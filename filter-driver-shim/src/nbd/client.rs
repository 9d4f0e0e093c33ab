//! A small synchronous NBD client, written from the NBD protocol specification
//! (NetworkBlockDevice/nbd `doc/proto.md`) and sharing no code with this crate's
//! server, so that tests driving the server through it check it independently.
//! `ferry demo` uses it as its guest stand-in; the integration tests use it as a
//! sequential writer (`tests/it/common/nbd.rs` re-exports it).
//!
//! Scope: a Unix socket, the fixed newstyle handshake, `NBD_OPT_GO` with an export
//! name, simple replies only (structured replies are never negotiated, so a structured
//! reply from the server is a protocol error), one request in flight at a time (QD1).
//! A test driving it is a sequential writer: once a call returns, the server has
//! answered that request and no other request is outstanding, so the cut points of a
//! crash or restart are well defined.
//!
//! Every call fails rather than hangs: reads and writes on the socket time out after
//! [`IO_TIMEOUT`]. An error reply from the server becomes an `io::Error` whose message
//! names the command, the range and the errno, and whose inner error is an
//! [`NbdError`] (see [`nbd_errno`]).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long one socket read or write may block before the call fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

// Magic numbers (all big-endian on the wire).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253; // oldstyle negotiation
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options, option replies, info types.
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (`NBD_FLAG_*`), as returned by [`NbdClient::transmission_flags`].
pub mod flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

// Commands and command flags.
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1 << 0;

/// The longest option reply this client accepts (the spec bounds strings at 4096 bytes;
/// no reply to `NBD_OPT_GO` needs more).
const MAX_OPTION_REPLY: u32 = 64 << 10;

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        _ => "NBD_CMD_?",
    }
}

/// The name of an NBD error value (the spec's subset of errno values).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown errno",
    }
}

/// A nonzero error in a simple reply: the command, its range and the errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdError {
    pub command: &'static str,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    pub errno: u32,
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (flags {:#x}) of {} bytes at offset {}: server replied {} ({})",
            self.command,
            self.flags,
            self.length,
            self.offset,
            errno_name(self.errno),
            self.errno
        )
    }
}

impl std::error::Error for NbdError {}

/// The errno of an error reply, or `None` when `e` is not an NBD error reply (a
/// transport failure, a protocol violation, a local check).
pub fn nbd_errno(e: &io::Error) -> Option<u32> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<NbdError>())
        .map(|n| n.errno)
}

/// An `NBD_REP_ERR_*` answer to an option: the server is up and said no. Not retried
/// by [`connect_retry`].
#[derive(Debug)]
struct OptionRefused {
    reply: u32,
    message: String,
}

impl fmt::Display for OptionRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.reply & !REP_FLAG_ERROR {
            1 => "NBD_REP_ERR_UNSUP",
            2 => "NBD_REP_ERR_POLICY",
            3 => "NBD_REP_ERR_INVALID",
            4 => "NBD_REP_ERR_PLATFORM",
            5 => "NBD_REP_ERR_TLS_REQD",
            6 => "NBD_REP_ERR_UNKNOWN",
            7 => "NBD_REP_ERR_SHUTDOWN",
            8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
            9 => "NBD_REP_ERR_TOO_BIG",
            10 => "NBD_REP_ERR_EXT_HEADER_REQD",
            _ => "NBD_REP_ERR_?",
        };
        write!(
            f,
            "NBD_OPT_GO refused: {name} ({:#x}) {:?}",
            self.reply, self.message
        )
    }
}

impl std::error::Error for OptionRefused {}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("NBD protocol violation: {}", msg.into()),
    )
}

/// Adds what the client was doing to an I/O error, keeping its kind.
fn context(e: io::Error, what: &str) -> io::Error {
    let msg = match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("{what}: no answer from the NBD server within {IO_TIMEOUT:?} ({e})")
        }
        io::ErrorKind::UnexpectedEof => {
            format!("{what}: the NBD server closed the connection ({e})")
        }
        _ => format!("{what}: {e}"),
    };
    io::Error::new(e.kind(), msg)
}

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// One connection to one export, in the transmission phase.
pub struct NbdClient {
    sock: UnixStream,
    size: u64,
    flags: u16,
    block_sizes: Option<BlockSizes>,
    name: Option<String>,
    next_cookie: u64,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("size", &self.size)
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("block_sizes", &self.block_sizes)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Connects to `socket` and negotiates `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> io::Result<NbdClient> {
        let sock = UnixStream::connect(socket)
            .map_err(|e| context(e, &format!("connect to {}", socket.display())))?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))?;
        Self::handshake(sock, export).map_err(|e| {
            if e.get_ref().is_some_and(|i| i.is::<OptionRefused>()) {
                e
            } else {
                context(e, &format!("NBD handshake on {}", socket.display()))
            }
        })
    }

    /// The whole fixed-newstyle handshake: the server's greeting, one `NBD_OPT_GO`,
    /// its replies, then the checks on what the replies said.
    fn handshake(mut sock: UnixStream, export: &str) -> io::Result<NbdClient> {
        let hs_flags = read_greeting(&mut sock)?;
        send_opt_go(&mut sock, hs_flags, export)?;
        let info = GoInfo::read_replies(&mut sock)?;
        let (size, flags, block_sizes) = info.checked()?;
        Ok(NbdClient {
            sock,
            size,
            flags,
            block_sizes,
            name: info.name,
            next_cookie: 1,
        })
    }

    /// Export size in bytes (from `NBD_INFO_EXPORT`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags (from `NBD_INFO_EXPORT`); see [`flags`].
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// `NBD_INFO_BLOCK_SIZE`, if the server sent it (this client asks for it).
    pub fn block_sizes(&self) -> Option<BlockSizes> {
        self.block_sizes
    }

    /// `NBD_INFO_NAME`, if the server sent it (this client asks for it).
    pub fn export_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_flags(offset, data, 0)
    }

    /// A write with `NBD_CMD_FLAG_FUA`: durable when it returns.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_flags(offset, data, CMD_FLAG_FUA)
    }

    fn write_flags(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<()> {
        if self.flags & flags::READ_ONLY != 0 {
            return Err(local_refusal("NBD_CMD_WRITE on a read-only export"));
        }
        let len = request_len(data.len())?;
        self.request(CMD_WRITE, flags, offset, len, data, &mut [])
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = request_len(buf.len())?;
        self.request(CMD_READ, 0, offset, len, &[], buf)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.require(flags::SEND_FLUSH, "NBD_CMD_FLUSH")?;
        self.request(CMD_FLUSH, 0, 0, 0, &[], &mut [])
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.require(flags::SEND_TRIM, "NBD_CMD_TRIM")?;
        nonzero(len)?;
        self.request(CMD_TRIM, 0, offset, len, &[], &mut [])
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.require(flags::SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES")?;
        nonzero(len)?;
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[], &mut [])
    }

    /// Sends `NBD_CMD_DISC` and waits for the server to close the connection.
    pub fn disconnect(mut self) -> io::Result<()> {
        let header = self.header(CMD_DISC, 0, 0, 0);
        self.sock
            .write_all(&header)
            .map_err(|e| context(e, "send NBD_CMD_DISC"))?;
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        // The server sends nothing in reply to DISC; it closes once outstanding
        // requests (none: QD1) are done.
        let mut rest = Vec::new();
        self.sock
            .read_to_end(&mut rest)
            .map_err(|e| context(e, "wait for the server to close after NBD_CMD_DISC"))?;
        if !rest.is_empty() {
            return Err(protocol_error(format!(
                "{} bytes from the server after NBD_CMD_DISC",
                rest.len()
            )));
        }
        Ok(())
    }

    fn require(&self, flag: u16, what: &str) -> io::Result<()> {
        if self.flags & flag == 0 {
            return Err(local_refusal(&format!(
                "{what}: the server did not advertise it (transmission flags {:#x})",
                self.flags
            )));
        }
        Ok(())
    }

    fn header(&mut self, cmd: u16, flags: u16, offset: u64, len: u32) -> [u8; 28] {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        h
    }

    /// One request, then its simple reply. `payload` is sent after the header (writes);
    /// `out` receives the reply's data when the request succeeds (reads).
    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        out: &mut [u8],
    ) -> io::Result<()> {
        let what = format!(
            "{} (flags {flags:#x}) of {len} bytes at offset {offset}",
            command_name(cmd)
        );
        let header = self.header(cmd, flags, offset, len);
        let cookie = self.next_cookie - 1;
        self.sock
            .write_all(&header)
            .and_then(|()| self.sock.write_all(payload))
            .map_err(|e| context(e, &format!("send {what}")))?;
        let mut reply = [0u8; 16];
        self.sock
            .read_exact(&mut reply)
            .map_err(|e| context(e, &format!("reply to {what}")))?;
        let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap());
        if magic == STRUCTURED_REPLY_MAGIC {
            return Err(protocol_error(format!(
                "structured reply to {what}, but structured replies were not negotiated"
            )));
        }
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(protocol_error(format!(
                "reply magic {magic:#010x} to {what}"
            )));
        }
        let errno = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let got = u64::from_be_bytes(reply[8..16].try_into().unwrap());
        if got != cookie {
            return Err(protocol_error(format!(
                "reply cookie {got} to {what}, expected {cookie} (only one request was in flight)"
            )));
        }
        if errno != 0 {
            // A simple error reply carries no data, even for a read.
            return Err(io::Error::other(NbdError {
                command: command_name(cmd),
                flags,
                offset,
                length: len,
                errno,
            }));
        }
        if cmd == CMD_READ {
            self.sock
                .read_exact(out)
                .map_err(|e| context(e, &format!("data of the reply to {what}")))?;
        }
        Ok(())
    }
}

fn local_refusal(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, msg.to_string())
}

fn request_len(len: usize) -> io::Result<u32> {
    let len = u32::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes do not fit one NBD request"),
        )
    })?;
    nonzero(len)?;
    Ok(len)
}

/// The spec leaves zero-length requests unspecified; the tests never mean to send one.
fn nonzero(len: u32) -> io::Result<()> {
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "zero-length NBD request (behaviour unspecified by the protocol)",
        ));
    }
    Ok(())
}

/// S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. Returns the handshake flags once
/// they are known to offer fixed newstyle.
fn read_greeting(sock: &mut UnixStream) -> io::Result<u16> {
    let magic = read_u64(sock)?;
    if magic != NBDMAGIC {
        return Err(protocol_error(format!(
            "greeting magic {magic:#018x}, expected NBDMAGIC"
        )));
    }
    let magic = read_u64(sock)?;
    if magic == CLISERV_MAGIC {
        return Err(protocol_error("oldstyle negotiation; expected newstyle"));
    }
    if magic != IHAVEOPT {
        return Err(protocol_error(format!(
            "second greeting magic {magic:#018x}, expected IHAVEOPT"
        )));
    }
    let hs_flags = read_u16(sock)?;
    if hs_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol_error(format!(
            "handshake flags {hs_flags:#x} lack NBD_FLAG_FIXED_NEWSTYLE"
        )));
    }
    Ok(hs_flags)
}

/// C: the client flags, then `NBD_OPT_GO` (name length, name, number of info
/// requests, the requests), in one write.
fn send_opt_go(sock: &mut UnixStream, hs_flags: u16, export: &str) -> io::Result<()> {
    // NO_ZEROES only when offered (the spec forbids it otherwise); after NBD_OPT_GO no
    // zero padding is sent either way.
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if hs_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    let name = export.as_bytes();
    let mut data = Vec::with_capacity(4 + name.len() + 2 + 4);
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&INFO_NAME.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    let mut msg = Vec::with_capacity(4 + 16 + data.len());
    msg.extend_from_slice(&client_flags.to_be_bytes());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(&data);
    sock.write_all(&msg)
}

/// S: one option reply's header and payload. Checks the magic, that it answers
/// `NBD_OPT_GO` and that its length is bounded, in that order, before reading the
/// payload. Returns the reply type and the payload.
fn read_option_reply(sock: &mut UnixStream) -> io::Result<(u32, Vec<u8>)> {
    let magic = read_u64(sock)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(protocol_error(format!(
            "option reply magic {magic:#018x}, expected {OPT_REPLY_MAGIC:#x}"
        )));
    }
    let option = read_u32(sock)?;
    let reply = read_u32(sock)?;
    let len = read_u32(sock)?;
    if option != OPT_GO {
        return Err(protocol_error(format!(
            "reply for option {option}, but NBD_OPT_GO ({OPT_GO}) was sent"
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(protocol_error(format!(
            "option reply of {len} bytes (type {reply:#x})"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    sock.read_exact(&mut payload)?;
    Ok((reply, payload))
}

/// An `NBD_REP_ERR_*` reply as the error `connect` returns: `NotFound` for
/// `NBD_REP_ERR_UNKNOWN` (no such export), `Other` for the rest.
fn option_refused(reply: u32, payload: &[u8]) -> io::Error {
    let refused = OptionRefused {
        reply,
        message: String::from_utf8_lossy(payload).into_owned(),
    };
    let kind = if reply == REP_FLAG_ERROR | 6 {
        io::ErrorKind::NotFound
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, refused)
}

/// What the `NBD_REP_INFO` replies to `NBD_OPT_GO` said, gathered until `NBD_REP_ACK`.
#[derive(Default)]
struct GoInfo {
    export: Option<(u64, u16)>,
    block_sizes: Option<BlockSizes>,
    name: Option<String>,
}

impl GoInfo {
    /// S: option replies until `NBD_REP_ACK` (returns what was gathered) or an error
    /// reply (returns it as an error).
    fn read_replies(sock: &mut UnixStream) -> io::Result<GoInfo> {
        let mut info = GoInfo::default();
        loop {
            let (reply, payload) = read_option_reply(sock)?;
            match reply {
                REP_ACK => {
                    if !payload.is_empty() {
                        return Err(protocol_error(format!(
                            "NBD_REP_ACK with {} bytes",
                            payload.len()
                        )));
                    }
                    return Ok(info);
                }
                REP_INFO => info.record(&payload)?,
                r if r & REP_FLAG_ERROR != 0 => return Err(option_refused(r, &payload)),
                r => {
                    return Err(protocol_error(format!(
                        "unexpected reply type {r:#x} to NBD_OPT_GO"
                    )))
                }
            }
        }
    }

    /// One `NBD_REP_INFO` payload: its 16-bit type, then a body of that type's length.
    fn record(&mut self, payload: &[u8]) -> io::Result<()> {
        if payload.len() < 2 {
            return Err(protocol_error("NBD_REP_INFO shorter than its type"));
        }
        let kind = u16::from_be_bytes([payload[0], payload[1]]);
        let body = &payload[2..];
        match kind {
            INFO_EXPORT => {
                if body.len() != 10 {
                    return Err(protocol_error(format!(
                        "NBD_INFO_EXPORT of {} bytes, expected 12",
                        payload.len()
                    )));
                }
                let size = u64::from_be_bytes(body[..8].try_into().unwrap());
                let flags = u16::from_be_bytes([body[8], body[9]]);
                self.export = Some((size, flags));
            }
            INFO_NAME => {
                self.name = Some(String::from_utf8_lossy(body).into_owned());
            }
            INFO_BLOCK_SIZE => {
                if body.len() != 12 {
                    return Err(protocol_error(format!(
                        "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                        payload.len()
                    )));
                }
                let word =
                    |i: usize| u32::from_be_bytes(body[4 * i..4 * i + 4].try_into().unwrap());
                self.block_sizes = Some(BlockSizes {
                    minimum: word(0),
                    preferred: word(1),
                    maximum: word(2),
                });
            }
            // The spec: a client MUST ignore information types it does not recognise.
            _ => {}
        }
        Ok(())
    }

    /// After `NBD_REP_ACK`: the export's size and transmission flags (required, with
    /// `NBD_FLAG_HAS_FLAGS`) and the block sizes, if sent, within the spec's bounds.
    fn checked(&self) -> io::Result<(u64, u16, Option<BlockSizes>)> {
        let (size, flags) = self
            .export
            .ok_or_else(|| protocol_error("NBD_REP_ACK to NBD_OPT_GO without NBD_INFO_EXPORT"))?;
        if flags & flags::HAS_FLAGS == 0 {
            return Err(protocol_error(format!(
                "transmission flags {flags:#x} lack NBD_FLAG_HAS_FLAGS"
            )));
        }
        if let Some(b) = self.block_sizes {
            // Minimum: a power of two, at most 64 KiB. Preferred: a power of two, at
            // least the minimum. Maximum: a multiple of the minimum, or 0xffffffff.
            if !b.minimum.is_power_of_two()
                || b.minimum > 64 << 10
                || !b.preferred.is_power_of_two()
                || b.preferred < b.minimum
                || (b.maximum != u32::MAX && b.maximum % b.minimum != 0)
            {
                return Err(protocol_error(format!(
                    "NBD_INFO_BLOCK_SIZE {b:?} breaks the spec's constraints"
                )));
            }
        }
        Ok((size, flags, self.block_sizes))
    }
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// Connects, retrying until `timeout` has passed (the shim may be restarting: its
/// socket missing, refusing, or closing connections while it shuts down). A refusal of
/// the export by a live server (`NBD_REP_ERR_*`) is not retried.
pub fn connect_retry(socket: &Path, export: &str, timeout: Duration) -> io::Result<NbdClient> {
    let deadline = Instant::now() + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match NbdClient::connect(socket, export) {
            Ok(c) => return Ok(c),
            Err(e) if e.get_ref().is_some_and(|i| i.is::<OptionRefused>()) => return Err(e),
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "no NBD connection to {} (export {export:?}) within {timeout:?} \
                         after {attempts} attempts; last error: {e}",
                        socket.display()
                    ),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
