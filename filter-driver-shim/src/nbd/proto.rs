//! NBD wire constants and the pure functions that decode what a client sends.
//!
//! Everything here works on byte slices and returns values or errors: no I/O, no
//! allocation on the request path, no panics on any input. The request decoder is the
//! trust boundary of the shim's data path, so it is fuzzed (`fuzz/`) and property
//! tested below. Numbers and names follow `doc/proto.md` of NetworkBlockDevice/nbd.

/// `NBDMAGIC`, first thing the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply in fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Client flags this server understands; any other bit closes the connection.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Transmission flags.
pub const TX_HAS_FLAGS: u16 = 1 << 0;
pub const TX_READ_ONLY: u16 = 1 << 1;
pub const TX_SEND_FLUSH: u16 = 1 << 2;
pub const TX_SEND_FUA: u16 = 1 << 3;
pub const TX_SEND_TRIM: u16 = 1 << 5;
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TX_CAN_MULTI_CONN: u16 = 1 << 8;
/// What every export of the shim offers. `CAN_MULTI_CONN` is honest: there is no
/// server-side cache, every connection writes through the same file descriptor, and a
/// FLUSH syncs that descriptor, so it covers writes acknowledged on any connection.
pub const TRANSMISSION_FLAGS: u16 = TX_HAS_FLAGS
    | TX_SEND_FLUSH
    | TX_SEND_FUA
    | TX_SEND_TRIM
    | TX_SEND_WRITE_ZEROES
    | TX_CAN_MULTI_CONN;

/// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context the shim offers, and the id it is given.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Advertised size constraints. Minimum 1: the backing store is accessed through the
/// page cache, so any byte range works. Preferred 4096: the page size, below which a
/// write is a read-modify-write in the page cache.
pub const MIN_BLOCK_BYTES: u32 = 1;
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Largest READ or WRITE payload: 32 MiB, the size the spec says no client may be
/// refused for. Larger requests get `NBD_EINVAL` and never touch the disk.
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;

const _: () = assert!(PREFERRED_BLOCK_BYTES.is_power_of_two() && PREFERRED_BLOCK_BYTES >= 512);
const _: () = assert!(MAX_PAYLOAD_BYTES >= PREFERRED_BLOCK_BYTES);

/// Bytes of a request header on the wire.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_BYTES: usize = 20;

/// NBD error values (not errno values, although they coincide on Linux).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdErrno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdErrno {
    /// Maps an OS error from the backing store to the NBD value the spec asks for.
    pub fn from_io(err: &std::io::Error) -> NbdErrno {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NbdErrno::NoSpc,
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NbdErrno::Perm,
            Some(libc::ENOMEM) => NbdErrno::NoMem,
            Some(libc::EINVAL) => NbdErrno::Inval,
            _ => NbdErrno::Io,
        }
    }
}

/// A request header as it came off the wire, magic already checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Bytes of data that follow this header on the wire and must be consumed to stay
    /// in step with the client, whether or not the request is valid.
    pub fn payload_bytes(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// The first four bytes of a request were not [`REQUEST_MAGIC`]. The stream is out of
/// step or hostile; the only safe reaction is a hard disconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {found:#010x} (expected {REQUEST_MAGIC:#010x})")]
pub struct BadRequestMagic {
    pub found: u32,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Decodes a request header.
pub fn parse_request_header(
    bytes: &[u8; REQUEST_HEADER_BYTES],
) -> Result<RequestHeader, BadRequestMagic> {
    let magic = be_u32(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(BadRequestMagic { found: magic });
    }
    Ok(RequestHeader {
        flags: be_u16(bytes, 4),
        kind: be_u16(bytes, 6),
        cookie: be_u64(bytes, 8),
        offset: be_u64(bytes, 16),
        length: be_u32(bytes, 24),
    })
}

/// What was negotiated for a connection, as far as request validation cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// Export size in bytes.
    pub export_size: u64,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` was negotiated.
    pub structured: bool,
    /// Whether `base:allocation` was selected for the export in use.
    pub base_allocation: bool,
}

/// How a WRITE_ZEROES may be carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroMode {
    /// The range may be deallocated (punched) as long as it reads back as zeros.
    MayPunch,
    /// `NBD_CMD_FLAG_NO_HOLE`: the range must stay allocated.
    Allocate,
}

/// Whether a write must be durable before its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Page cache is enough; a later FLUSH makes it durable.
    Cached,
    /// `NBD_CMD_FLAG_FUA`: durable before the reply.
    ForceUnitAccess,
}

/// A validated command: every range lies inside the export and every payload is at
/// most [`MAX_PAYLOAD_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        durability: Durability,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        durability: Durability,
    },
    /// `NBD_CMD_CACHE`: a hint the shim accepts and ignores.
    Cache,
    WriteZeroes {
        offset: u64,
        length: u32,
        mode: ZeroMode,
        durability: Durability,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        /// `NBD_CMD_FLAG_REQ_ONE`: exactly one extent, no longer than `length`.
        one_extent: bool,
    },
}

/// Why a request is refused, with the error value the spec requires. The request
/// still gets a reply and the connection stays up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub errno: NbdErrno,
    pub reason: &'static str,
}

const fn refuse(errno: NbdErrno, reason: &'static str) -> Refusal {
    Refusal { errno, reason }
}

/// Checks a request against the session: flags, payload size and range. Pure, total
/// and allocation-free; this is what decides that a request never touches the disk.
///
/// Every request gets the checks of [`Vetted::new`] (a known command, allowed flags)
/// exactly once, first; then its command's own checks, in the order each method keeps.
pub fn validate_request(header: &RequestHeader, session: &Session) -> Result<Command, Refusal> {
    let req = Vetted::new(header, session)?;
    match header.kind {
        CMD_READ => req.read(),
        CMD_WRITE => req.write(),
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => req.trim(),
        CMD_CACHE => req.cache(),
        CMD_WRITE_ZEROES => req.write_zeroes(),
        CMD_BLOCK_STATUS => req.block_status(session),
        _ => unreachable!("unknown kinds are refused by Vetted::new"),
    }
}

/// A request whose command is known and whose flags are allowed for that command,
/// with what every command's own checks share.
struct Vetted {
    flags: u16,
    offset: u64,
    length: u32,
    durability: Durability,
    /// `offset + length` neither overflows nor passes the end of the export.
    in_range: bool,
}

impl Vetted {
    /// The checks common to every request, in this order: the command is known
    /// (`EINVAL` "unknown command"), then its flags are allowed for it.
    fn new(header: &RequestHeader, session: &Session) -> Result<Vetted, Refusal> {
        let RequestHeader {
            flags,
            kind,
            offset,
            length,
            ..
        } = *header;
        let allowed = match kind {
            CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => return Err(refuse(NbdErrno::Inval, "unknown command")),
        };
        if flags & !allowed != 0 {
            // DF and FAST_ZERO are never advertised, so they land here too.
            return Err(refuse(NbdErrno::Inval, "command flag not valid here"));
        }
        let durability = if flags & CMD_FLAG_FUA != 0 {
            Durability::ForceUnitAccess
        } else {
            Durability::Cached
        };
        let in_range = offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= session.export_size);
        Ok(Vetted {
            flags,
            offset,
            length,
            durability,
            in_range,
        })
    }

    /// `NBD_CMD_READ`: payload size, then range.
    fn read(&self) -> Result<Command, Refusal> {
        if self.length > MAX_PAYLOAD_BYTES {
            return Err(refuse(
                NbdErrno::Inval,
                "read longer than the maximum payload",
            ));
        }
        if !self.in_range {
            return Err(refuse(NbdErrno::Inval, "read past the end of the export"));
        }
        Ok(Command::Read {
            offset: self.offset,
            length: self.length,
        })
    }

    /// `NBD_CMD_WRITE`: payload size, then range (`ENOSPC` past the end).
    fn write(&self) -> Result<Command, Refusal> {
        if self.length > MAX_PAYLOAD_BYTES {
            return Err(refuse(
                NbdErrno::Inval,
                "write longer than the maximum payload",
            ));
        }
        if !self.in_range {
            return Err(refuse(NbdErrno::NoSpc, "write past the end of the export"));
        }
        Ok(Command::Write {
            offset: self.offset,
            length: self.length,
            durability: self.durability,
        })
    }

    /// `NBD_CMD_TRIM`: range only (no payload).
    fn trim(&self) -> Result<Command, Refusal> {
        if !self.in_range {
            return Err(refuse(NbdErrno::Inval, "trim past the end of the export"));
        }
        Ok(Command::Trim {
            offset: self.offset,
            length: self.length,
            durability: self.durability,
        })
    }

    /// `NBD_CMD_CACHE`: range only; the hint itself is ignored.
    fn cache(&self) -> Result<Command, Refusal> {
        if !self.in_range {
            return Err(refuse(NbdErrno::Inval, "cache past the end of the export"));
        }
        Ok(Command::Cache)
    }

    /// `NBD_CMD_WRITE_ZEROES`: range only (`ENOSPC` past the end).
    fn write_zeroes(&self) -> Result<Command, Refusal> {
        if !self.in_range {
            return Err(refuse(
                NbdErrno::NoSpc,
                "write zeroes past the end of the export",
            ));
        }
        let mode = if self.flags & CMD_FLAG_NO_HOLE != 0 {
            ZeroMode::Allocate
        } else {
            ZeroMode::MayPunch
        };
        Ok(Command::WriteZeroes {
            offset: self.offset,
            length: self.length,
            mode,
            durability: self.durability,
        })
    }

    /// `NBD_CMD_BLOCK_STATUS`: a selected context, then a nonzero length, then range.
    fn block_status(&self, session: &Session) -> Result<Command, Refusal> {
        if !session.structured || !session.base_allocation {
            return Err(refuse(NbdErrno::Inval, "no metadata context was selected"));
        }
        if self.length == 0 {
            return Err(refuse(NbdErrno::Inval, "block status of zero bytes"));
        }
        if !self.in_range {
            return Err(refuse(
                NbdErrno::Inval,
                "block status past the end of the export",
            ));
        }
        Ok(Command::BlockStatus {
            offset: self.offset,
            length: self.length,
            one_extent: self.flags & CMD_FLAG_REQ_ONE != 0,
        })
    }
}

/// What [`decode_request`] made of the bytes at the head of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Fewer than [`REQUEST_HEADER_BYTES`] bytes available.
    NeedMore,
    /// A request; `payload_bytes` of data follow it and must be consumed even when the
    /// request is refused.
    Request {
        cookie: u64,
        payload_bytes: u32,
        command: Result<Command, Refusal>,
    },
}

/// Decodes and validates the request at the start of `bytes`. This is the whole
/// request parser the fuzz target and the property test drive.
pub fn decode_request(bytes: &[u8], session: &Session) -> Result<Decoded, BadRequestMagic> {
    let Some(head) = bytes.first_chunk::<REQUEST_HEADER_BYTES>() else {
        return Ok(Decoded::NeedMore);
    };
    let header = parse_request_header(head)?;
    Ok(Decoded::Request {
        cookie: header.cookie,
        payload_bytes: header.payload_bytes(),
        command: validate_request(&header, session),
    })
}

/// A malformed option payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed option data: {0}")]
pub struct BadOption(pub &'static str);

/// A cursor over option data; every read is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], BadOption> {
        if self.bytes.len() < n {
            return Err(BadOption(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, BadOption> {
        self.take(2, what).map(|b| be_u16(b, 0))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, BadOption> {
        self.take(4, what).map(|b| be_u32(b, 0))
    }

    fn string(&mut self, what: &'static str) -> Result<&'a [u8], BadOption> {
        let len = self.u32(what)?;
        self.take(len as usize, what)
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub export_name: &'a [u8],
    pub requests: Vec<u16>,
}

/// Decodes `NBD_OPT_INFO` / `NBD_OPT_GO` data.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, BadOption> {
    let mut c = Cursor { bytes: data };
    let export_name = c.string("export name")?;
    let count = c.u16("information request count")?;
    let mut requests = Vec::with_capacity(usize::from(count).min(16));
    for _ in 0..count {
        requests.push(c.u16("information request")?);
    }
    if !c.bytes.is_empty() {
        return Err(BadOption("trailing bytes"));
    }
    Ok(InfoRequest {
        export_name,
        requests,
    })
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub export_name: &'a [u8],
    pub queries: Vec<&'a [u8]>,
}

/// Decodes a meta-context option's data.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest<'_>, BadOption> {
    let mut c = Cursor { bytes: data };
    let export_name = c.string("export name")?;
    let count = c.u32("query count")?;
    // Each query takes at least 4 bytes, so a count the data cannot hold is malformed;
    // checking first bounds the allocation by the option's length.
    if (count as usize).saturating_mul(4) > c.bytes.len() {
        return Err(BadOption("query count exceeds the data"));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(c.string("query")?);
    }
    if !c.bytes.is_empty() {
        return Err(BadOption("trailing bytes"));
    }
    Ok(MetaContextRequest {
        export_name,
        queries,
    })
}

/// Encodes a structured reply chunk header.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_BYTES] {
    let mut h = [0u8; CHUNK_HEADER_BYTES];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&length.to_be_bytes());
    h
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut h = [0u8; SIMPLE_REPLY_BYTES];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(flags: u16, kind: u16, offset: u64, length: u32) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&0xdead_beef_u64.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&length.to_be_bytes());
        b
    }

    const SESSION: Session = Session {
        export_size: 1 << 20,
        structured: true,
        base_allocation: true,
    };

    fn decode(b: &[u8]) -> Result<Command, Refusal> {
        match decode_request(b, &SESSION).unwrap() {
            Decoded::Request { command, .. } => command,
            Decoded::NeedMore => panic!("need more"),
        }
    }

    #[test]
    fn errors_follow_the_spec() {
        let end = SESSION.export_size;
        let cases = [
            (header(0, CMD_READ, end - 1, 2), NbdErrno::Inval),
            (header(0, CMD_WRITE, end - 1, 2), NbdErrno::NoSpc),
            (header(0, CMD_WRITE_ZEROES, end, 1), NbdErrno::NoSpc),
            (header(0, CMD_TRIM, u64::MAX, 2), NbdErrno::Inval),
            (header(0, CMD_BLOCK_STATUS, end, 1), NbdErrno::Inval),
            (
                header(0, CMD_READ, 0, MAX_PAYLOAD_BYTES + 1),
                NbdErrno::Inval,
            ),
            (
                header(0, CMD_WRITE, 0, MAX_PAYLOAD_BYTES + 1),
                NbdErrno::Inval,
            ),
            (header(CMD_FLAG_DF, CMD_READ, 0, 1), NbdErrno::Inval),
            (
                header(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 1),
                NbdErrno::Inval,
            ),
            (header(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 1), NbdErrno::Inval),
            (header(0, 99, 0, 0), NbdErrno::Inval),
        ];
        for (bytes, errno) in cases {
            assert_eq!(decode(&bytes).unwrap_err().errno, errno, "{bytes:02x?}");
        }
        assert_eq!(
            decode(&header(CMD_FLAG_FUA, CMD_WRITE, end - 4096, 4096)),
            Ok(Command::Write {
                offset: end - 4096,
                length: 4096,
                durability: Durability::ForceUnitAccess
            })
        );
        // WRITE_ZEROES and TRIM may exceed the payload limit: they carry no payload.
        assert!(decode(&header(0, CMD_WRITE_ZEROES, 0, 1 << 20)).is_ok());
        let no_meta = Session {
            base_allocation: false,
            ..SESSION
        };
        let h = parse_request_header(&header(0, CMD_BLOCK_STATUS, 0, 1)).unwrap();
        assert!(validate_request(&h, &no_meta).is_err());
    }

    #[test]
    fn payload_of_a_refused_write_is_still_consumed() {
        let b = header(0, CMD_WRITE, u64::MAX - 3, 4096);
        match decode_request(&b, &SESSION).unwrap() {
            Decoded::Request {
                payload_bytes,
                command,
                ..
            } => {
                assert_eq!(payload_bytes, 4096);
                assert!(command.is_err());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_magic_and_short_input() {
        let mut b = header(0, CMD_READ, 0, 1);
        assert_eq!(decode_request(&b[..27], &SESSION), Ok(Decoded::NeedMore));
        b[0] ^= 1;
        assert!(decode_request(&b, &SESSION).is_err());
    }

    #[test]
    fn option_payloads() {
        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"vm1");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        let req = parse_info_request(&go).unwrap();
        assert_eq!(req.export_name, b"vm1");
        assert_eq!(req.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(parse_info_request(&go[..go.len() - 1]).is_err());

        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let req = parse_meta_context_request(&meta).unwrap();
        assert_eq!(req.queries, vec![BASE_ALLOCATION.as_bytes()]);
        meta[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&meta).is_err());
    }

    proptest! {
        /// The parser is total: any bytes, any session, no panic; and whatever it
        /// accepts is inside the export and within the payload limit.
        #[test]
        fn request_parser_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            force_magic in any::<bool>(),
            export_size in any::<u64>(),
            structured in any::<bool>(),
            base_allocation in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if force_magic && bytes.len() >= 4 {
                bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            let session = Session { export_size, structured, base_allocation };
            if let Ok(Decoded::Request { command: Ok(cmd), payload_bytes, .. }) =
                decode_request(&bytes, &session)
            {
                let range = match cmd {
                    Command::Read { offset, length }
                    | Command::Write { offset, length, .. } => {
                        prop_assert!(length <= MAX_PAYLOAD_BYTES);
                        Some((offset, length))
                    }
                    Command::Trim { offset, length, .. }
                    | Command::WriteZeroes { offset, length, .. }
                    | Command::BlockStatus { offset, length, .. } => Some((offset, length)),
                    _ => None,
                };
                if let Some((offset, length)) = range {
                    prop_assert!(offset.checked_add(u64::from(length)).unwrap() <= export_size);
                }
                if !matches!(cmd, Command::Write { .. }) {
                    prop_assert_eq!(payload_bytes, 0);
                }
            }
        }

        #[test]
        fn option_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_info_request(&bytes);
            let _ = parse_meta_context_request(&bytes);
        }
    }
}
