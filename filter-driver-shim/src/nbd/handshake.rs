//! Fixed newstyle negotiation, from `NBDMAGIC` to the transmission phase.
//!
//! Generic over `Read + Write` so it runs unchanged over Unix sockets, TCP and the
//! in-memory streams of the tests.

use std::io::{self, Read, Write};

use super::proto::*;
use super::ProtocolError;

/// Option data beyond this is drained and refused with `NBD_REP_ERR_TOO_BIG`. 64 KiB
/// holds any export name (4 KiB max by spec) with thousands of meta-context queries.
pub const MAX_OPTION_BYTES: u32 = 64 << 10;

/// The export a connection negotiates for.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// Canonical name; the empty name (the default export) also selects it.
    pub name: String,
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

impl ExportInfo {
    fn matches(&self, requested: &[u8]) -> bool {
        requested.is_empty() || requested == self.name.as_bytes()
    }
}

/// What the client and the server agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub structured: bool,
    pub base_allocation: bool,
}

fn send_reply<W: Write>(w: &mut W, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut h = [0u8; 20];
    h[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&option.to_be_bytes());
    h[12..16].copy_from_slice(&kind.to_be_bytes());
    h[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&h)?;
    w.write_all(data)
}

fn send_error<W: Write>(w: &mut W, option: u32, kind: u32, message: &str) -> io::Result<()> {
    send_reply(w, option, kind, message.as_bytes())
}

fn send_info_replies<W: Write>(
    w: &mut W,
    option: u32,
    export: &ExportInfo,
    requests: &[u16],
) -> io::Result<()> {
    let mut info = [0u8; 12];
    info[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    info[2..10].copy_from_slice(&export.size_bytes.to_be_bytes());
    info[10..12].copy_from_slice(&export.transmission_flags.to_be_bytes());
    send_reply(w, option, REP_INFO, &info)?;
    // Block sizes are sent whether asked or not: they are the defaults the spec
    // describes, so a client that did not ask loses nothing by ignoring them.
    let mut sizes = [0u8; 14];
    sizes[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    sizes[2..6].copy_from_slice(&MIN_BLOCK_BYTES.to_be_bytes());
    sizes[6..10].copy_from_slice(&PREFERRED_BLOCK_BYTES.to_be_bytes());
    sizes[10..14].copy_from_slice(&MAX_PAYLOAD_BYTES.to_be_bytes());
    send_reply(w, option, REP_INFO, &sizes)?;
    if requests.contains(&INFO_NAME) {
        let mut name = Vec::with_capacity(2 + export.name.len());
        name.extend_from_slice(&INFO_NAME.to_be_bytes());
        name.extend_from_slice(export.name.as_bytes());
        send_reply(w, option, REP_INFO, &name)?;
    }
    send_reply(w, option, REP_ACK, &[])
}

fn send_meta_context<W: Write>(w: &mut W, option: u32) -> io::Result<()> {
    let mut data = Vec::with_capacity(4 + BASE_ALLOCATION.len());
    data.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    data.extend_from_slice(BASE_ALLOCATION.as_bytes());
    send_reply(w, option, REP_META_CONTEXT, &data)
}

/// Runs the handshake. `Ok(None)`: the client aborted or went away cleanly.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &ExportInfo,
) -> Result<Option<Negotiated>, ProtocolError> {
    let no_zeroes = greet(s)?;
    let mut haggle = Haggle {
        s,
        export,
        no_zeroes,
        structured: false,
        meta_selected: false,
    };
    haggle.options()
}

/// S: `NBDMAGIC`, `IHAVEOPT` and the handshake flags; C: the client flags. Returns
/// whether the client asked for `NO_ZEROES`; unknown client flags end the handshake.
fn greet<S: Read + Write>(s: &mut S) -> Result<bool, ProtocolError> {
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    s.flush()?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ProtocolError::ClientFlags(client_flags));
    }
    Ok(client_flags & FLAG_C_NO_ZEROES != 0)
}

/// Where the negotiation stands after one option.
enum Next {
    /// Read the next option.
    Options,
    /// The handshake is over: `Some` enters transmission, `None` the client aborted.
    Done(Option<Negotiated>),
}

/// The option haggling of one handshake: what the client has asked for so far, and
/// one method per option kind.
struct Haggle<'a, S> {
    s: &'a mut S,
    export: &'a ExportInfo,
    no_zeroes: bool,
    structured: bool,
    /// Whether `base:allocation` is selected (by the last `SET_META_CONTEXT`).
    meta_selected: bool,
}

impl<S: Read + Write> Haggle<'_, S> {
    /// Options until one ends the handshake. Every option that does not end it is
    /// answered and flushed before the next is read.
    fn options(&mut self) -> Result<Option<Negotiated>, ProtocolError> {
        let mut data = Vec::new();
        loop {
            let (option, len) = self.read_option_header()?;
            if len > MAX_OPTION_BYTES {
                self.refuse_oversized(option, len)?;
                continue;
            }
            data.clear();
            data.resize(len as usize, 0);
            self.s.read_exact(&mut data)?;
            if let Next::Done(outcome) = self.answer(option, &data)? {
                return Ok(outcome);
            }
            self.s.flush()?;
        }
    }

    /// C: `IHAVEOPT`, the option and its data length.
    fn read_option_header(&mut self) -> Result<(u32, u32), ProtocolError> {
        let mut oh = [0u8; 16];
        self.s.read_exact(&mut oh)?;
        let magic = u64::from_be_bytes(oh[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(ProtocolError::OptionMagic(magic));
        }
        let option = u32::from_be_bytes(oh[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(oh[12..16].try_into().expect("4 bytes"));
        Ok((option, len))
    }

    /// An option longer than [`MAX_OPTION_BYTES`]: its data is drained, never held,
    /// and it is refused with `NBD_REP_ERR_TOO_BIG` (flushed here).
    fn refuse_oversized(&mut self, option: u32, len: u32) -> Result<(), ProtocolError> {
        if option == OPT_EXPORT_NAME {
            // EXPORT_NAME has no option replies: hanging up is the only refusal.
            return Err(ProtocolError::UnknownExport);
        }
        let drained = io::copy(&mut (&mut *self.s).take(u64::from(len)), &mut io::sink())?;
        if drained < u64::from(len) {
            return Err(ProtocolError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client hung up inside an oversized option",
            )));
        }
        send_error(self.s, option, REP_ERR_TOO_BIG, "option data too long")?;
        self.s.flush()?;
        Ok(())
    }

    /// One option with its data, by kind.
    fn answer(&mut self, option: u32, data: &[u8]) -> Result<Next, ProtocolError> {
        match option {
            OPT_EXPORT_NAME => return self.export_name(data),
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let s = &mut *self.s;
                let _ = send_reply(s, option, REP_ACK, &[]).and_then(|()| s.flush());
                return Ok(Next::Done(None));
            }
            OPT_LIST => self.list(data)?,
            OPT_INFO | OPT_GO => return self.info_or_go(option, data),
            OPT_STRUCTURED_REPLY => self.structured_reply(data)?,
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data)?,
            OPT_STARTTLS => send_error(self.s, option, REP_ERR_POLICY, "TLS is not offered here")?,
            _ => send_error(self.s, option, REP_ERR_UNSUP, "unknown option")?,
        }
        Ok(Next::Options)
    }

    /// What was agreed, for the options that enter transmission.
    fn negotiated(&self) -> Negotiated {
        Negotiated {
            structured: self.structured,
            base_allocation: self.structured && self.meta_selected,
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: the old way in. Answered with size and flags (and the
    /// zero padding unless `NO_ZEROES`), and transmission begins.
    fn export_name(&mut self, data: &[u8]) -> Result<Next, ProtocolError> {
        if !self.export.matches(data) {
            // The spec leaves no way to say "no" here but hanging up.
            return Err(ProtocolError::UnknownExport);
        }
        let mut reply = [0u8; 10 + 124];
        reply[0..8].copy_from_slice(&self.export.size_bytes.to_be_bytes());
        reply[8..10].copy_from_slice(&self.export.transmission_flags.to_be_bytes());
        let n = if self.no_zeroes { 10 } else { reply.len() };
        self.s.write_all(&reply[..n])?;
        self.s.flush()?;
        Ok(Next::Done(Some(self.negotiated())))
    }

    /// `NBD_OPT_LIST`: the one export.
    fn list(&mut self, data: &[u8]) -> io::Result<()> {
        let option = OPT_LIST;
        if !data.is_empty() {
            return send_error(self.s, option, REP_ERR_INVALID, "LIST takes no data");
        }
        let name = &self.export.name;
        let mut server = Vec::with_capacity(4 + name.len());
        server.extend_from_slice(&(name.len() as u32).to_be_bytes());
        server.extend_from_slice(name.as_bytes());
        send_reply(self.s, option, REP_SERVER, &server)?;
        send_reply(self.s, option, REP_ACK, &[])
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's information; a `GO` that
    /// succeeds enters transmission (flushed here), anything else goes on.
    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Next, ProtocolError> {
        match parse_info_request(data) {
            Err(e) => send_error(self.s, option, REP_ERR_INVALID, e.0)?,
            Ok(req) if !self.export.matches(req.export_name) => {
                send_error(self.s, option, REP_ERR_UNKNOWN, "no such export")?
            }
            Ok(req) => {
                send_info_replies(self.s, option, self.export, &req.requests)?;
                if option == OPT_GO {
                    self.s.flush()?;
                    return Ok(Next::Done(Some(self.negotiated())));
                }
            }
        }
        Ok(Next::Options)
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: always granted when sent without data.
    fn structured_reply(&mut self, data: &[u8]) -> io::Result<()> {
        let option = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return send_error(
                self.s,
                option,
                REP_ERR_INVALID,
                "STRUCTURED_REPLY takes no data",
            );
        }
        self.structured = true;
        send_reply(self.s, option, REP_ACK, &[])
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: only
    /// `base:allocation` exists, and only after structured replies.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_selected = false;
        }
        if !self.structured {
            return send_error(
                self.s,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
        }
        match parse_meta_context_request(data) {
            Err(e) => send_error(self.s, option, REP_ERR_INVALID, e.0),
            Ok(req) if !self.export.matches(req.export_name) => {
                send_error(self.s, option, REP_ERR_UNKNOWN, "no such export")
            }
            Ok(req) => {
                let wanted =
                    |q: &&[u8]| *q == BASE_ALLOCATION.as_bytes() || (!set && *q == b"base:");
                let hit = if set {
                    req.queries.iter().any(wanted)
                } else {
                    req.queries.is_empty() || req.queries.iter().any(wanted)
                };
                if hit {
                    send_meta_context(self.s, option)?;
                    self.meta_selected |= set;
                }
                send_reply(self.s, option, REP_ACK, &[])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted client: reads come from `input`, writes collect in `output`.
    struct Duplex {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    fn replies(bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 20 <= bytes.len() {
            assert_eq!(&bytes[at..at + 8], &OPTION_REPLY_MAGIC.to_be_bytes());
            let opt = u32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            let kind = u32::from_be_bytes(bytes[at + 12..at + 16].try_into().unwrap());
            let len = u32::from_be_bytes(bytes[at + 16..at + 20].try_into().unwrap()) as usize;
            out.push((opt, kind, bytes[at + 20..at + 20 + len].to_vec()));
            at += 20 + len;
        }
        out
    }

    fn export() -> ExportInfo {
        ExportInfo {
            name: "vm1".into(),
            size_bytes: 1 << 30,
            transmission_flags: TRANSMISSION_FLAGS,
        }
    }

    #[test]
    fn go_with_structured_replies_and_meta_context() {
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        option(&mut input, 99, b"whatever");
        option(&mut input, OPT_LIST, &[]);
        option(&mut input, OPT_STRUCTURED_REPLY, &[]);
        let mut meta = Vec::new();
        meta.extend_from_slice(&3u32.to_be_bytes());
        meta.extend_from_slice(b"vm1");
        meta.extend_from_slice(&2u32.to_be_bytes());
        meta.extend_from_slice(&8u32.to_be_bytes());
        meta.extend_from_slice(b"qemu:foo");
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        option(&mut input, OPT_SET_META_CONTEXT, &meta);
        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"vm1");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        option(&mut input, OPT_GO, &go);
        let mut d = Duplex {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let n = negotiate(&mut d, &export()).unwrap().unwrap();
        assert_eq!(
            n,
            Negotiated {
                structured: true,
                base_allocation: true
            }
        );
        let r = replies(&d.output[18..]);
        let kinds: Vec<(u32, u32)> = r.iter().map(|(o, k, _)| (*o, *k)).collect();
        assert_eq!(
            kinds,
            vec![
                (99, REP_ERR_UNSUP),
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (OPT_SET_META_CONTEXT, REP_META_CONTEXT),
                (OPT_SET_META_CONTEXT, REP_ACK),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
        assert_eq!(&r[6].2[2..10], &(1u64 << 30).to_be_bytes());
    }

    #[test]
    fn unknown_export_and_bad_flags() {
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        let mut go = Vec::new();
        go.extend_from_slice(&2u32.to_be_bytes());
        go.extend_from_slice(b"no");
        go.extend_from_slice(&0u16.to_be_bytes());
        option(&mut input, OPT_GO, &go);
        option(&mut input, OPT_ABORT, &[]);
        let mut d = Duplex {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        assert_eq!(negotiate(&mut d, &export()).unwrap(), None);
        let r = replies(&d.output[18..]);
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        assert_eq!(r[1].1, REP_ACK);

        let mut d = Duplex {
            input: io::Cursor::new(0x80u32.to_be_bytes().to_vec()),
            output: Vec::new(),
        };
        assert!(matches!(
            negotiate(&mut d, &export()),
            Err(ProtocolError::ClientFlags(0x80))
        ));
    }
}
