//! The milter wire format (issue 21): packets, the MTA's commands and the milter's replies.
//!
//! A packet is a 32-bit big-endian length, then that many bytes: a command byte and its data.
//! Strings are NUL-terminated; numbers are 32-bit big-endian (the port in CONNECT is 16-bit).
//! The values are those of sendmail's libmilter `mfdef.h`, which Postfix's `milter8.c` speaks.

use crate::ProtocolError;

/// The protocol version we speak and offer.
pub const VERSION: u32 = 6;
/// The oldest milter protocol version we accept in a milter's answer (as Postfix).
pub const MIN_VERSION: u32 = 2;
/// The largest body chunk one SMFIC_BODY may carry.
pub const CHUNK_SIZE: usize = 65535;
/// The largest packet we accept from a milter: a replaced body comes in chunks of at most 1 MB
/// (SMFIP_MDS_1M), with room to spare.
pub const MAX_PACKET: usize = 2 * 1024 * 1024;

/// MTA → milter commands (SMFIC_*).
pub mod cmd {
    pub const ABORT: u8 = b'A';
    pub const BODY: u8 = b'B';
    pub const CONNECT: u8 = b'C';
    pub const MACRO: u8 = b'D';
    pub const BODYEOB: u8 = b'E';
    pub const HELO: u8 = b'H';
    pub const HEADER: u8 = b'L';
    pub const MAIL: u8 = b'M';
    pub const EOH: u8 = b'N';
    pub const OPTNEG: u8 = b'O';
    pub const QUIT: u8 = b'Q';
    pub const RCPT: u8 = b'R';
    pub const DATA: u8 = b'T';
}

/// Milter → MTA replies (SMFIR_*).
pub mod rep {
    pub const ADDRCPT: u8 = b'+';
    pub const DELRCPT: u8 = b'-';
    pub const ADDRCPT_PAR: u8 = b'2';
    pub const SHUTDOWN: u8 = b'4';
    pub const ACCEPT: u8 = b'a';
    pub const REPLBODY: u8 = b'b';
    pub const CONTINUE: u8 = b'c';
    pub const DISCARD: u8 = b'd';
    pub const CHGFROM: u8 = b'e';
    pub const CONN_FAIL: u8 = b'f';
    pub const ADDHEADER: u8 = b'h';
    pub const INSHEADER: u8 = b'i';
    pub const SETSYMLIST: u8 = b'l';
    pub const CHGHEADER: u8 = b'm';
    pub const PROGRESS: u8 = b'p';
    pub const QUARANTINE: u8 = b'q';
    pub const REJECT: u8 = b'r';
    pub const SKIP: u8 = b's';
    pub const TEMPFAIL: u8 = b't';
    pub const REPLYCODE: u8 = b'y';
}

/// Actions a milter may take at end of body (SMFIF_*), offered in and chosen by negotiation.
pub mod action {
    pub const ADDHDRS: u32 = 0x01;
    pub const CHGBODY: u32 = 0x02;
    pub const ADDRCPT: u32 = 0x04;
    pub const DELRCPT: u32 = 0x08;
    pub const CHGHDRS: u32 = 0x10;
    pub const QUARANTINE: u32 = 0x20;
    pub const CHGFROM: u32 = 0x40;
    pub const ADDRCPT_PAR: u32 = 0x80;
    pub const SETSYMLIST: u32 = 0x100;
    /// What we honour (not CHGFROM yet).
    pub const OFFERED: u32 = ADDHDRS | CHGBODY | ADDRCPT | DELRCPT | CHGHDRS | QUARANTINE | ADDRCPT_PAR | SETSYMLIST;
}

/// Protocol steps a milter may leave out or not answer (SMFIP_*).
pub mod proto {
    pub const NOCONNECT: u32 = 0x01;
    pub const NOHELO: u32 = 0x02;
    pub const NOMAIL: u32 = 0x04;
    pub const NORCPT: u32 = 0x08;
    pub const NOBODY: u32 = 0x10;
    pub const NOHDRS: u32 = 0x20;
    pub const NOEOH: u32 = 0x40;
    pub const NR_HDR: u32 = 0x80;
    pub const NOUNKNOWN: u32 = 0x100;
    pub const NODATA: u32 = 0x200;
    pub const SKIP: u32 = 0x400;
    pub const RCPT_REJ: u32 = 0x800;
    pub const NR_CONN: u32 = 0x1000;
    pub const NR_HELO: u32 = 0x2000;
    pub const NR_MAIL: u32 = 0x4000;
    pub const NR_RCPT: u32 = 0x8000;
    pub const NR_DATA: u32 = 0x10000;
    pub const NR_UNKN: u32 = 0x20000;
    pub const NR_EOH: u32 = 0x40000;
    pub const NR_BODY: u32 = 0x80000;
    pub const HDR_LEADSPC: u32 = 0x100000;
    /// What we implement (not RCPT_REJ: rejected recipients are not shown to milters).
    pub const OFFERED: u32 = NOCONNECT
        | NOHELO
        | NOMAIL
        | NORCPT
        | NOBODY
        | NOHDRS
        | NOEOH
        | NR_HDR
        | NOUNKNOWN
        | NODATA
        | SKIP
        | NR_CONN
        | NR_HELO
        | NR_MAIL
        | NR_RCPT
        | NR_DATA
        | NR_UNKN
        | NR_EOH
        | NR_BODY
        | HDR_LEADSPC;
}

/// The protocol stages macros are sent for (SMFIM_*), also the index in SETSYMLIST.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MacroStage {
    Connect = 0,
    Helo = 1,
    Mail = 2,
    Rcpt = 3,
    Data = 4,
    Eom = 5,
    Eoh = 6,
}

impl MacroStage {
    pub const ALL: [MacroStage; 7] = [Self::Connect, Self::Helo, Self::Mail, Self::Rcpt, Self::Data, Self::Eom, Self::Eoh];

    fn from_u32(n: u32) -> Option<Self> {
        Self::ALL.get(n as usize).copied()
    }
}

/// One packet: the command (or reply) byte and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub code: u8,
    pub data: Vec<u8>,
}

impl Packet {
    pub fn new(code: u8, data: Vec<u8>) -> Self {
        Packet { code, data }
    }

    /// The packet on the wire: length, code, data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.data.len());
        let len = u32::try_from(self.data.len() + 1).expect("packet below 4 GB");
        out.extend_from_slice(&len.to_be_bytes());
        out.push(self.code);
        out.extend_from_slice(&self.data);
        out
    }
}

/// Splits the bytes read from a milter into packets. Feed it what arrives; take packets out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole packet, `None` until one has arrived; an error for a length of zero or
    /// beyond [`MAX_PACKET`] (the stream cannot be trusted after that).
    pub fn next_packet(&mut self) -> Result<Option<Packet>, ProtocolError> {
        let Some(len) = self.buf.get(..4) else { return Ok(None) };
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        if len == 0 {
            return Err(ProtocolError::EmptyPacket);
        }
        if len > MAX_PACKET {
            return Err(ProtocolError::TooLong(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let code = self.buf[4];
        let data = self.buf[5..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(Packet { code, data }))
    }

    /// Bytes received but not yet a whole packet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Appends `s` and its terminating NUL. Strings with a NUL inside cannot be sent; the caller's
/// values come from SMTP, which has none, and a NUL is cut there rather than corrupt the packet.
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    out.extend_from_slice(&s[..end]);
    out.push(0);
}

/// The client's address as CONNECT carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAddress {
    Inet { ip: std::net::IpAddr, port: u16 },
    Unix(String),
    Unknown,
}

/// SMFIC_OPTNEG: our version, the actions and the protocol steps we offer.
pub fn optneg(version: u32, actions: u32, protocol: u32) -> Packet {
    let mut data = Vec::with_capacity(12);
    for n in [version, actions, protocol] {
        data.extend_from_slice(&n.to_be_bytes());
    }
    Packet::new(cmd::OPTNEG, data)
}

/// SMFIC_MACRO: the macros for the command `command` that follows. Single-letter names go as
/// they are, longer ones in braces (`{auth_authen}`), as sendmail and Postfix send them.
pub fn macros(command: u8, pairs: &[(String, String)]) -> Packet {
    let mut data = vec![command];
    for (name, value) in pairs {
        let braced;
        let name = if name.len() > 1 && !name.starts_with('{') {
            braced = format!("{{{name}}}");
            &braced
        } else {
            name
        };
        put_str(&mut data, name.as_bytes());
        put_str(&mut data, value.as_bytes());
    }
    Packet::new(cmd::MACRO, data)
}

/// SMFIC_CONNECT: the client's host name, then family ('4', '6', 'L' or 'U'), port and address.
pub fn connect(hostname: &str, address: &ClientAddress) -> Packet {
    let mut data = Vec::new();
    put_str(&mut data, hostname.as_bytes());
    match address {
        ClientAddress::Inet { ip, port } => {
            data.push(if ip.is_ipv4() { b'4' } else { b'6' });
            data.extend_from_slice(&port.to_be_bytes());
            put_str(&mut data, ip.to_string().as_bytes());
        }
        ClientAddress::Unix(path) => {
            data.push(b'L');
            data.extend_from_slice(&0u16.to_be_bytes());
            put_str(&mut data, path.as_bytes());
        }
        ClientAddress::Unknown => data.push(b'U'),
    }
    Packet::new(cmd::CONNECT, data)
}

pub fn helo(name: &str) -> Packet {
    let mut data = Vec::new();
    put_str(&mut data, name.as_bytes());
    Packet::new(cmd::HELO, data)
}

/// SMFIC_MAIL or SMFIC_RCPT: the address in angle brackets, then each ESMTP parameter.
fn address_command(code: u8, address: &str, params: &[String]) -> Packet {
    let mut data = Vec::new();
    put_str(&mut data, format!("<{address}>").as_bytes());
    for p in params {
        put_str(&mut data, p.as_bytes());
    }
    Packet::new(code, data)
}

pub fn mail(address: &str, params: &[String]) -> Packet {
    address_command(cmd::MAIL, address, params)
}

pub fn rcpt(address: &str, params: &[String]) -> Packet {
    address_command(cmd::RCPT, address, params)
}

pub fn header(name: &str, value: &str) -> Packet {
    let mut data = Vec::new();
    put_str(&mut data, name.as_bytes());
    put_str(&mut data, value.as_bytes());
    Packet::new(cmd::HEADER, data)
}

/// SMFIC_BODY packets for `body`, each at most [`CHUNK_SIZE`]; none for an empty body.
pub fn body(body: &[u8]) -> Vec<Packet> {
    body.chunks(CHUNK_SIZE).map(|c| Packet::new(cmd::BODY, c.to_vec())).collect()
}

/// A command without data: DATA, EOH, BODYEOB, ABORT, QUIT.
pub fn bare(code: u8) -> Packet {
    Packet::new(code, Vec::new())
}

/// An SMTP reply a milter chose (SMFIR_REPLYCODE): a 4xx or 5xx code and the whole text as
/// sent, which may be several lines joined by CRLF, each starting with the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    pub code: u16,
    pub text: String,
}

impl SmtpReply {
    /// What a milter's REJECT means: Postfix's and sendmail's 550 5.7.1.
    pub fn default_reject() -> Self {
        SmtpReply { code: 550, text: "550 5.7.1 Command rejected".into() }
    }

    /// What a milter's TEMPFAIL means.
    pub fn default_tempfail() -> Self {
        SmtpReply { code: 451, text: "451 4.7.1 Service unavailable - try again later".into() }
    }

    /// Parses REPLYCODE's text as Postfix checks it: every line starts with the same `[45]dd`,
    /// then a space or a hyphen; an enhanced status code, if any, has the same class. Sendmail
    /// treats the text as a format string, so milters double `%`: `%%` becomes `%` and a lone
    /// `%` is dropped.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::BadReplyCode(text.to_string());
        let b = text.as_bytes();
        if b.len() < 4 || !matches!(b[0], b'4' | b'5') || !b[1].is_ascii_digit() || !b[2].is_ascii_digit() {
            return Err(bad());
        }
        for line in text.split("\r\n") {
            let l = line.as_bytes();
            if l.len() < 4 || l[..3] != b[..3] || !matches!(l[3], b' ' | b'-') {
                return Err(bad());
            }
            if l.get(4).is_some_and(u8::is_ascii_digit) && l[4] != b[0] {
                return Err(bad());
            }
        }
        let code = text[..3].parse().map_err(|_| bad())?;
        let mut unescaped = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match c {
                '%' => unescaped.extend(chars.next()),
                c => unescaped.push(c),
            }
        }
        Ok(SmtpReply { code, text: unescaped })
    }

    pub fn is_temporary(&self) -> bool {
        self.code / 100 == 4
    }
}

/// One reply from a milter, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The answer to OPTNEG, with the macro lists the milter wants per stage (libmilter puts
    /// them after the three numbers).
    Negotiate {
        version: u32,
        actions: u32,
        protocol: u32,
        symlists: Vec<(MacroStage, String)>,
    },
    Accept,
    Continue,
    Discard,
    Reject,
    Tempfail,
    ReplyCode(SmtpReply),
    AddHeader {
        name: String,
        value: String,
    },
    InsertHeader {
        index: u32,
        name: String,
        value: String,
    },
    /// Change the `index`th (from 1) field called `name`; an empty value deletes it.
    ChangeHeader {
        index: u32,
        name: String,
        value: String,
    },
    ReplaceBody(Vec<u8>),
    AddRcpt {
        address: String,
        params: Option<String>,
    },
    DelRcpt(String),
    ChangeFrom {
        address: String,
        params: Option<String>,
    },
    Quarantine(String),
    Progress,
    Skip,
    SetSymList {
        stage: MacroStage,
        macros: String,
    },
    Shutdown,
    ConnFail,
}

/// Reads the data of a reply: NUL-terminated strings and 32-bit numbers, then nothing more.
struct Reader<'a> {
    code: u8,
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn malformed(&self, what: &'static str) -> ProtocolError {
        ProtocolError::Malformed { code: self.code, what }
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let Some((n, rest)) = self.data.split_first_chunk::<4>() else { return Err(self.malformed("a 32-bit number")) };
        self.data = rest;
        Ok(u32::from_be_bytes(*n))
    }

    fn string(&mut self) -> Result<String, ProtocolError> {
        let Some(end) = self.data.iter().position(|&b| b == 0) else {
            return Err(self.malformed("a NUL-terminated string"));
        };
        let s = String::from_utf8_lossy(&self.data[..end]).into_owned();
        self.data = &self.data[end + 1..];
        Ok(s)
    }

    fn optional_string(&mut self) -> Result<Option<String>, ProtocolError> {
        if self.data.is_empty() { Ok(None) } else { self.string().map(Some) }
    }

    fn end(&self) -> Result<(), ProtocolError> {
        if self.data.is_empty() { Ok(()) } else { Err(self.malformed("nothing after the last field")) }
    }
}

impl Reply {
    pub fn decode(packet: &Packet) -> Result<Self, ProtocolError> {
        let mut r = Reader { code: packet.code, data: &packet.data };
        let reply = match packet.code {
            cmd::OPTNEG => {
                let (version, actions, protocol) = (r.u32()?, r.u32()?, r.u32()?);
                let mut symlists = Vec::new();
                while !r.data.is_empty() {
                    let stage = r.u32()?;
                    let list = r.string()?;
                    // An unknown stage is ignored, as Postfix does.
                    if let Some(stage) = MacroStage::from_u32(stage) {
                        symlists.push((stage, list));
                    }
                }
                Reply::Negotiate { version, actions, protocol, symlists }
            }
            rep::ACCEPT => Reply::Accept,
            rep::CONTINUE => Reply::Continue,
            rep::DISCARD => Reply::Discard,
            rep::REJECT => Reply::Reject,
            rep::TEMPFAIL => Reply::Tempfail,
            rep::PROGRESS => Reply::Progress,
            rep::SKIP => Reply::Skip,
            rep::SHUTDOWN => Reply::Shutdown,
            rep::CONN_FAIL => Reply::ConnFail,
            rep::REPLYCODE => Reply::ReplyCode(SmtpReply::parse(&r.string()?)?),
            rep::ADDHEADER => Reply::AddHeader { name: r.string()?, value: r.string()? },
            rep::INSHEADER => Reply::InsertHeader { index: r.u32()?, name: r.string()?, value: r.string()? },
            rep::CHGHEADER => {
                let (index, name, value) = (r.u32()?, r.string()?, r.string()?);
                if name.is_empty() {
                    return Err(r.malformed("a header name"));
                }
                Reply::ChangeHeader { index, name, value }
            }
            rep::REPLBODY => {
                let body = std::mem::take(&mut r.data).to_vec();
                Reply::ReplaceBody(body)
            }
            rep::ADDRCPT => Reply::AddRcpt { address: r.string()?, params: None },
            rep::ADDRCPT_PAR => Reply::AddRcpt { address: r.string()?, params: r.optional_string()? },
            rep::DELRCPT => Reply::DelRcpt(r.string()?),
            rep::CHGFROM => Reply::ChangeFrom { address: r.string()?, params: r.optional_string()? },
            rep::QUARANTINE => Reply::Quarantine(r.string()?),
            rep::SETSYMLIST => {
                let stage = r.u32()?;
                let stage = MacroStage::from_u32(stage).ok_or(r.malformed("a macro stage from 0 to 6"))?;
                Reply::SetSymList { stage, macros: r.string()? }
            }
            other => return Err(ProtocolError::UnknownReply(other)),
        };
        // SHUTDOWN and CONN_FAIL end the conversation whatever they carry; all else is exact.
        if !matches!(reply, Reply::Shutdown | Reply::ConnFail) {
            r.end()?;
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(code: u8, data: &[u8]) -> Vec<u8> {
        let mut v = ((data.len() + 1) as u32).to_be_bytes().to_vec();
        v.push(code);
        v.extend_from_slice(data);
        v
    }

    fn decode(code: u8, data: &[u8]) -> Result<Reply, ProtocolError> {
        Reply::decode(&Packet::new(code, data.to_vec()))
    }

    #[test]
    fn optneg_offers_version_actions_and_steps() {
        let p = optneg(6, 0x1ff, 0x1f_ffff).encode();
        assert_eq!(p, b"\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\x1f\xff\xff");
    }

    #[test]
    fn macros_brace_long_names() {
        let pairs =
            vec![("j".to_string(), "mx.example".to_string()), ("daemon_name".to_string(), "mx".to_string()), ("{i}".to_string(), "Q1".to_string())];
        assert_eq!(macros(cmd::CONNECT, &pairs).encode(), wire(b'D', b"Cj\0mx.example\0{daemon_name}\0mx\0{i}\0Q1\0"));
        assert_eq!(macros(cmd::BODYEOB, &[]).encode(), wire(b'D', b"E"));
    }

    #[test]
    fn connect_for_each_family() {
        let v4 = ClientAddress::Inet { ip: "192.0.2.7".parse().unwrap(), port: 40000 };
        assert_eq!(connect("mail.example", &v4).encode(), wire(b'C', b"mail.example\x004\x9c\x40192.0.2.7\0"));
        let v6 = ClientAddress::Inet { ip: "2001:db8::1".parse().unwrap(), port: 25 };
        assert_eq!(connect("[2001:db8::1]", &v6).encode(), wire(b'C', b"[2001:db8::1]\x006\0\x192001:db8::1\0"));
        let unix = ClientAddress::Unix("/run/postroom.sock".into());
        assert_eq!(connect("localhost", &unix).encode(), wire(b'C', b"localhost\0L\0\0/run/postroom.sock\0"));
        assert_eq!(connect("unknown", &ClientAddress::Unknown).encode(), wire(b'C', b"unknown\0U"));
    }

    #[test]
    fn envelope_commands() {
        assert_eq!(helo("client.example").encode(), wire(b'H', b"client.example\0"));
        assert_eq!(
            mail("jane@remote.example", &["SIZE=100".into(), "BODY=8BITMIME".into()]).encode(),
            wire(b'M', b"<jane@remote.example>\0SIZE=100\0BODY=8BITMIME\0")
        );
        assert_eq!(mail("", &[]).encode(), wire(b'M', b"<>\0"));
        assert_eq!(rcpt("sam@example.test", &[]).encode(), wire(b'R', b"<sam@example.test>\0"));
    }

    #[test]
    fn header_and_bare_commands() {
        assert_eq!(header("Subject", "Lunch?").encode(), wire(b'L', b"Subject\0Lunch?\0"));
        assert_eq!(bare(cmd::DATA).encode(), wire(b'T', b""));
        assert_eq!(bare(cmd::EOH).encode(), wire(b'N', b""));
        assert_eq!(bare(cmd::BODYEOB).encode(), wire(b'E', b""));
        assert_eq!(bare(cmd::ABORT).encode(), wire(b'A', b""));
        assert_eq!(bare(cmd::QUIT).encode(), b"\0\0\0\x01Q");
    }

    #[test]
    fn a_nul_inside_a_string_is_cut() {
        assert_eq!(helo("a\0b").encode(), wire(b'H', b"a\0"));
    }

    #[test]
    fn body_in_chunks_of_at_most_65535() {
        assert!(body(b"").is_empty());
        let big = vec![b'x'; CHUNK_SIZE * 2 + 10];
        let chunks = body(&big);
        assert_eq!(chunks.iter().map(|p| p.data.len()).collect::<Vec<_>>(), vec![CHUNK_SIZE, CHUNK_SIZE, 10]);
        assert!(chunks.iter().all(|p| p.code == b'B'));
        assert_eq!(&chunks[0].encode()[..5], &[0, 1, 0, 0, b'B']);
    }

    #[test]
    fn decoder_splits_and_waits_for_whole_packets() {
        let mut d = Decoder::new();
        let mut bytes = wire(b'c', b"");
        bytes.extend(wire(b'h', b"X-Spam\0no\0"));
        d.push(&bytes[..3]);
        assert_eq!(d.next_packet().unwrap(), None);
        d.push(&bytes[3..8]);
        assert_eq!(d.next_packet().unwrap(), Some(Packet::new(b'c', vec![])));
        assert_eq!(d.next_packet().unwrap(), None);
        d.push(&bytes[8..]);
        assert_eq!(d.next_packet().unwrap(), Some(Packet::new(b'h', b"X-Spam\0no\0".to_vec())));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn decoder_refuses_empty_and_huge_packets() {
        let mut d = Decoder::new();
        d.push(b"\0\0\0\0");
        assert_eq!(d.next_packet(), Err(ProtocolError::EmptyPacket));
        let mut d = Decoder::new();
        d.push(&((MAX_PACKET + 1) as u32).to_be_bytes());
        assert_eq!(d.next_packet(), Err(ProtocolError::TooLong(MAX_PACKET + 1)));
    }

    #[test]
    fn decodes_negotiation_with_and_without_macro_lists() {
        let mut data = [6u32, 0x3, 0x3].iter().flat_map(|n| n.to_be_bytes()).collect::<Vec<u8>>();
        assert_eq!(decode(b'O', &data), Ok(Reply::Negotiate { version: 6, actions: 3, protocol: 3, symlists: vec![] }));
        data.extend(2u32.to_be_bytes());
        data.extend(b"{auth_authen} i\0");
        data.extend(5u32.to_be_bytes());
        data.extend(b"i\0");
        assert_eq!(
            decode(b'O', &data),
            Ok(Reply::Negotiate {
                version: 6,
                actions: 3,
                protocol: 3,
                symlists: vec![(MacroStage::Mail, "{auth_authen} i".into()), (MacroStage::Eom, "i".into())]
            })
        );
        assert!(matches!(decode(b'O', &data[..8]), Err(ProtocolError::Malformed { code: b'O', .. })));
        // A list for an unknown stage is ignored; a list without its NUL is malformed.
        let mut unknown_stage = data[..12].to_vec();
        unknown_stage.extend(7u32.to_be_bytes());
        unknown_stage.extend(b"i\0");
        assert_eq!(decode(b'O', &unknown_stage), Ok(Reply::Negotiate { version: 6, actions: 3, protocol: 3, symlists: vec![] }));
        let mut unterminated = data[..12].to_vec();
        unterminated.extend(5u32.to_be_bytes());
        unterminated.extend(b"i");
        assert!(matches!(decode(b'O', &unterminated), Err(ProtocolError::Malformed { .. })));
    }

    #[test]
    fn decodes_verdicts() {
        assert_eq!(decode(b'a', b""), Ok(Reply::Accept));
        assert_eq!(decode(b'c', b""), Ok(Reply::Continue));
        assert_eq!(decode(b'd', b""), Ok(Reply::Discard));
        assert_eq!(decode(b'r', b""), Ok(Reply::Reject));
        assert_eq!(decode(b't', b""), Ok(Reply::Tempfail));
        assert_eq!(decode(b'p', b""), Ok(Reply::Progress));
        assert_eq!(decode(b's', b""), Ok(Reply::Skip));
        assert_eq!(decode(b'4', b""), Ok(Reply::Shutdown));
        assert_eq!(decode(b'f', b""), Ok(Reply::ConnFail));
        assert!(matches!(decode(b'c', b"x"), Err(ProtocolError::Malformed { code: b'c', .. })));
    }

    #[test]
    fn decodes_reply_codes() {
        assert_eq!(decode(b'y', b"554 5.7.1 Spam\0"), Ok(Reply::ReplyCode(SmtpReply { code: 554, text: "554 5.7.1 Spam".into() })));
        assert_eq!(decode(b'y', b"421 \0"), Ok(Reply::ReplyCode(SmtpReply { code: 421, text: "421 ".into() })));
        let multi = "550-5.7.1 first\r\n550 5.7.1 second";
        assert_eq!(decode(b'y', format!("{multi}\0").as_bytes()), Ok(Reply::ReplyCode(SmtpReply { code: 550, text: multi.into() })));
        // Sendmail's format-string escaping is undone.
        assert_eq!(
            decode(b'y', b"554 5.7.1 100%% spam, 5%d\0"),
            Ok(Reply::ReplyCode(SmtpReply { code: 554, text: "554 5.7.1 100% spam, 5d".into() }))
        );
        for bad in [&b"250 ok\0"[..], b"421\0", b"55\0", b"550x\0", b"550-a\r\n551 b\0", b"550-a\r\n550\0", b"550 4.7.1 mixed\0", b"550 no NUL"] {
            assert!(decode(b'y', bad).is_err(), "{bad:?}");
        }
        assert!(SmtpReply::parse("451 4.7.1 later").unwrap().is_temporary());
    }

    #[test]
    fn decodes_modifications() {
        assert_eq!(decode(b'h', b"X-Spam-Flag\0YES\0"), Ok(Reply::AddHeader { name: "X-Spam-Flag".into(), value: "YES".into() }));
        assert_eq!(
            decode(b'i', b"\0\0\0\0DKIM-Signature\0v=1\0"),
            Ok(Reply::InsertHeader { index: 0, name: "DKIM-Signature".into(), value: "v=1".into() })
        );
        assert_eq!(decode(b'm', b"\0\0\0\x02Subject\0\0"), Ok(Reply::ChangeHeader { index: 2, name: "Subject".into(), value: "".into() }));
        assert_eq!(decode(b'b', b"new\r\nbody\0bytes"), Ok(Reply::ReplaceBody(b"new\r\nbody\0bytes".to_vec())));
        assert_eq!(decode(b'+', b"<x@example.test>\0"), Ok(Reply::AddRcpt { address: "<x@example.test>".into(), params: None }));
        assert_eq!(
            decode(b'2', b"<x@example.test>\0NOTIFY=NEVER\0"),
            Ok(Reply::AddRcpt { address: "<x@example.test>".into(), params: Some("NOTIFY=NEVER".into()) })
        );
        assert_eq!(decode(b'2', b"<x@example.test>\0"), Ok(Reply::AddRcpt { address: "<x@example.test>".into(), params: None }));
        assert_eq!(decode(b'-', b"<y@example.test>\0"), Ok(Reply::DelRcpt("<y@example.test>".into())));
        assert_eq!(decode(b'e', b"<z@example.test>\0"), Ok(Reply::ChangeFrom { address: "<z@example.test>".into(), params: None }));
        assert_eq!(decode(b'q', b"looks like spam\0"), Ok(Reply::Quarantine("looks like spam".into())));
        assert_eq!(decode(b'l', b"\0\0\0\x03{rcpt_addr}\0"), Ok(Reply::SetSymList { stage: MacroStage::Rcpt, macros: "{rcpt_addr}".into() }));
    }

    #[test]
    fn malformed_modifications_are_errors() {
        assert!(matches!(decode(b'h', b"X-Spam-Flag\0YES"), Err(ProtocolError::Malformed { code: b'h', .. })));
        assert!(matches!(decode(b'h', b"X\0Y\0extra"), Err(ProtocolError::Malformed { .. })));
        assert!(matches!(decode(b'i', b"\0\0\0"), Err(ProtocolError::Malformed { code: b'i', .. })));
        assert!(matches!(decode(b'm', b"\0\0\0\x01Subject\0"), Err(ProtocolError::Malformed { .. })));
        assert!(matches!(decode(b'q', b""), Err(ProtocolError::Malformed { .. })));
        assert!(matches!(decode(b'm', b"\0\0\0\x01\0x\0"), Err(ProtocolError::Malformed { code: b'm', .. })));
        assert_eq!(decode(b'Z', b""), Err(ProtocolError::UnknownReply(b'Z')));
    }
}
