//! A bounded MIME walker (SPEC F3): the decoded values filter rules are matched against —
//! originator and subject of the message, the `type/subtype` and file names of every part at
//! every depth, inside nested multiparts and message/rfc822 (or message/global) parts too.
//!
//! What it trusts: nothing. Its input is whatever a client sent. mail-parser's full message
//! parser keeps a stack per nested part and has been reported to use unbounded memory on
//! deeply nested or cyclic MIME, so it is never handed a whole message: this module finds the
//! structure itself — header block, boundary lines (RFC 2046 §5.1.1), encapsulated messages
//! (RFC 2046 §5.2.1) — and lets mail-parser parse one header block at a time, which is where
//! the decoding lives (RFC 2047 encoded-words, RFC 2231 parameter continuations and charsets).
//!
//! Bounds ([`Limits`]): at most `max_bytes` of input are looked at (the caller reads no more
//! from the store), and no more again are produced by decoding base64 or quoted-printable
//! encapsulated messages; parts deeper than `max_depth` and parts past `max_parts` are not
//! entered. What lies beyond a bound is not walked: the MIME headers seen up to there are.
//! The walk is iterative (an explicit stack), so nesting never grows the call stack, and each
//! level scans its bytes once: the cost is at most `max_depth` passes over `max_bytes`.
//!
//! How it fails: it does not. A malformed message yields whatever could be read; the
//! [`Scan`] says whether a bound cut the walk short.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use mail_parser::decoders::DecodeFnc;
use mail_parser::parsers::MessageStream;
use mail_parser::{Address, GetHeader, Header, HeaderName, HeaderValue, MessageParser};

/// Octets of a message looked at, at most (`[storage] filter_max_bytes`).
pub const DEFAULT_MAX_BYTES: usize = 10 * 1024 * 1024;
/// Nesting levels entered, at most (the message itself is level 0, its parts level 1...).
pub const DEFAULT_MAX_DEPTH: usize = 20;
/// Parts examined per message, at most.
pub const DEFAULT_MAX_PARTS: usize = 10_000;

/// The bounds of one walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
    pub max_parts: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bytes: DEFAULT_MAX_BYTES, max_depth: DEFAULT_MAX_DEPTH, max_parts: DEFAULT_MAX_PARTS }
    }
}

/// What the walk found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Addresses of the From header(s) of the message (not of encapsulated messages).
    pub from: Vec<String>,
    /// Subject header(s) of the message, decoded (not of encapsulated messages).
    pub subjects: Vec<String>,
    /// File names of every part, decoded: `filename` of Content-Disposition and `name` of
    /// Content-Type, each once per part.
    pub attachments: Vec<String>,
    /// `type/subtype` of every part, lower case, in document order (multipart containers too).
    pub mime_types: Vec<String>,
    /// The input was longer than `max_bytes`, or decoding would have produced more.
    pub truncated: bool,
    /// Some part lies deeper than `max_depth`.
    pub too_deep: bool,
    /// The message has more than `max_parts` parts.
    pub too_many_parts: bool,
}

/// Where an entity's bytes are: in the input, or in a buffer decoding produced.
#[derive(Clone, Copy)]
enum Source {
    Input,
    Decoded(usize),
}

/// One entity waiting to be walked: a message (top level or encapsulated) or a body part.
struct Entity {
    source: Source,
    start: usize,
    end: usize,
    depth: usize,
    /// A message's header block is the message's own (From, Subject) only at the top.
    top: bool,
    /// Parts of a multipart/digest default to message/rfc822 (RFC 2046 §5.1.5).
    in_digest: bool,
}

/// Walk `raw` (a whole message, or its first bytes) within `limits`.
pub fn scan(raw: &[u8], limits: &Limits) -> Scan {
    let mut out = Scan::default();
    let raw = if raw.len() > limits.max_bytes {
        out.truncated = true;
        &raw[..limits.max_bytes]
    } else {
        raw
    };
    let parser = MessageParser::new();
    let mut decoded: Vec<Vec<u8>> = Vec::new();
    let mut decode_budget = limits.max_bytes;
    let mut parts = 1usize;
    let mut stack = vec![Entity { source: Source::Input, start: 0, end: raw.len(), depth: 0, top: true, in_digest: false }];
    while let Some(e) = stack.pop() {
        let buf: &[u8] = match e.source {
            Source::Input => raw,
            Source::Decoded(i) => &decoded[i],
        };
        let data = &buf[e.start..e.end];
        let (block_end, body_from) = header_block(data);
        let tamed: Vec<u8>;
        let mut headers: Vec<Header<'_>> = Vec::new();
        let body_at = if data[..block_end].iter().filter(|&&b| b == b'*').count() > MAX_STARS {
            tamed = tame(&data[..block_end]);
            MessageStream::new(&tamed).parse_headers(&parser, &mut headers);
            body_from
        } else {
            let mut stream = MessageStream::new(data);
            // false: the header block never ended (a cut message); what was read still counts.
            if stream.parse_headers(&parser, &mut headers) { stream.offset() } else { data.len() }
        };
        let body = &data[body_at.min(data.len())..];

        if e.top {
            for h in &headers {
                match (&h.name, &h.value) {
                    (HeaderName::From, HeaderValue::Address(a)) => out.from.extend(addresses(a)),
                    (HeaderName::Subject, v) => out.subjects.push(v.as_text().unwrap_or_default().to_string()),
                    _ => {}
                }
            }
        }

        // Every Content-Type and Content-Disposition header counts for names and types (a
        // hostile part may carry two); the first Content-Type decides the structure.
        let mut boundary: Option<String> = None;
        let (mut types, mut names) = (Distinct::default(), Distinct::default());
        for h in &headers {
            let Some(ct) = h.value.as_content_type() else { continue };
            let name = match h.name {
                HeaderName::ContentType => {
                    if types.list.is_empty() {
                        boundary = ct.attribute("boundary").map(str::to_string);
                    }
                    types.push(format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or_default()).to_lowercase());
                    ct.attribute("name")
                }
                HeaderName::ContentDisposition => ct.attribute("filename"),
                _ => None,
            };
            if let Some(name) = name {
                names.push(name.to_string());
            }
        }
        if types.list.is_empty() {
            types.push(if e.in_digest { "message/rfc822" } else { "text/plain" }.to_string());
        }
        let mime = types.list[0].clone();
        out.mime_types.extend(types.list);
        out.attachments.extend(names.list);

        let children_depth = e.depth + 1;
        let enters = mime.starts_with("multipart/") && boundary.is_some() || mime == "message/rfc822" || mime == "message/global";
        if !enters {
            continue;
        }
        if children_depth > limits.max_depth {
            out.too_deep = true;
            continue;
        }
        let body_start = e.start + body_at.min(data.len());
        if let Some(boundary) = boundary.filter(|_| mime.starts_with("multipart/")) {
            let found = split_parts(body, boundary.as_bytes());
            let room = limits.max_parts.saturating_sub(parts);
            if found.len() > room {
                out.too_many_parts = true;
            }
            let digest = mime == "multipart/digest";
            // Reversed onto the stack, so parts are walked in document order.
            for &(s, t) in found.iter().take(room).rev() {
                stack.push(Entity {
                    source: e.source,
                    start: body_start + s,
                    end: body_start + t,
                    depth: children_depth,
                    top: false,
                    in_digest: digest,
                });
            }
            parts += found.len().min(room);
            continue;
        }
        // An encapsulated message: walk its header block and body as a message of its own.
        if parts >= limits.max_parts {
            out.too_many_parts = true;
            continue;
        }
        parts += 1;
        let encoding =
            headers.header_value(&HeaderName::ContentTransferEncoding).and_then(|v| v.as_text()).unwrap_or_default().trim().to_ascii_lowercase();
        let inner: Option<Cow<'_, [u8]>> = match encoding.as_str() {
            "base64" => decode(body, MessageStream::decode_base64_mime),
            "quoted-printable" => decode(body, MessageStream::decode_quoted_printable_mime),
            _ => None,
        };
        match inner {
            Some(mut bytes) => {
                if bytes.len() > decode_budget {
                    out.truncated = true;
                    bytes = Cow::Owned(bytes[..decode_budget].to_vec());
                }
                decode_budget -= bytes.len();
                let len = bytes.len();
                decoded.push(bytes.into_owned());
                stack.push(Entity {
                    source: Source::Decoded(decoded.len() - 1),
                    start: 0,
                    end: len,
                    depth: children_depth,
                    top: false,
                    in_digest: false,
                });
            }
            None => stack.push(Entity { source: e.source, start: body_start, end: e.end, depth: children_depth, top: false, in_digest: false }),
        }
    }
    out
}

/// Values in first-seen order, each once (a part may repeat a header many times over).
#[derive(Default)]
struct Distinct {
    list: Vec<String>,
    seen: HashSet<String>,
}

impl Distinct {
    fn push(&mut self, value: String) {
        if self.seen.insert(value.clone()) {
            self.list.push(value);
        }
    }
}

/// Where an entity's header block ends and its body begins: the first line that is empty or
/// blank (as mail-parser reads it), or the end of the input.
fn header_block(data: &[u8]) -> (usize, usize) {
    let mut pos = 0;
    while pos < data.len() {
        let end = data[pos..].iter().position(|&b| b == b'\n').map_or(data.len(), |i| pos + i);
        if data[pos..end].iter().all(u8::is_ascii_whitespace) && end < data.len() {
            return (pos, end + 1);
        }
        pos = end + 1;
    }
    (data.len(), data.len())
}

/// More `*` than this in one header block: its parameters are tamed before parsing.
const MAX_STARS: usize = 1000;
/// RFC 2231 continuation sections kept per parameter when taming.
const MAX_SECTIONS: usize = 256;

/// A header block with its Content-Type and Content-Disposition parameters cut down to what
/// the walk needs. mail-parser merges RFC 2231 continuations (`name*1=`, `name*2*=`...) in
/// time that grows with sections × parameters, so a header of a few megabytes of them would
/// take minutes. Taming keeps every ordinary parameter and, of the numbered continuation
/// sections (index 1 and up), at most [`MAX_SECTIONS`] for each of `name`, `filename` and
/// `boundary` — none for other parameters, which nothing here reads. Only a block with more
/// than [`MAX_STARS`] `*` is tamed: real mail never comes near.
fn tame(block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len());
    let mut start = 0;
    while start < block.len() {
        // One field: its first line and the folded lines after it (RFC 5322 §2.2.3).
        let mut end = start;
        loop {
            end = block[end..].iter().position(|&b| b == b'\n').map_or(block.len(), |i| end + i + 1);
            if end >= block.len() || !matches!(block[end], b' ' | b'\t') {
                break;
            }
        }
        let field = &block[start..end];
        let colon = field.iter().position(|&b| b == b':');
        let is_mime = colon.is_some_and(|c| {
            let name = field[..c].trim_ascii();
            name.eq_ignore_ascii_case(b"content-type") || name.eq_ignore_ascii_case(b"content-disposition")
        });
        match colon {
            Some(c) if is_mime => {
                out.extend_from_slice(&field[..=c]);
                let mut kept: HashMap<Vec<u8>, usize> = HashMap::new();
                for (i, piece) in parameters(&field[c + 1..]).into_iter().enumerate() {
                    if i > 0 {
                        let name = piece.split(|&b| b == b'=').next().unwrap_or_default().trim_ascii().to_ascii_lowercase();
                        if let Some(base) = continuation_of(&name) {
                            let n = kept.entry(base.to_vec()).or_default();
                            if !matches!(base, b"name" | b"filename" | b"boundary") || *n >= MAX_SECTIONS {
                                continue;
                            }
                            *n += 1;
                        }
                        out.push(b';');
                    }
                    out.extend_from_slice(piece);
                }
                if !out.ends_with(b"\n") {
                    out.extend_from_slice(b"\r\n");
                }
            }
            _ => out.extend_from_slice(field),
        }
        start = end;
    }
    out
}

/// A header value split at the semicolons outside quoted strings (RFC 2045 §5.1).
fn parameters(value: &[u8]) -> Vec<&[u8]> {
    let (mut pieces, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, &b) in value.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b';' if !quoted => {
                pieces.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(&value[start..]);
    pieces
}

/// `name*3` or `name*3*` (RFC 2231 §3 section 1 and up): `name`. Section 0 and `name*` are
/// not continuations.
fn continuation_of(name: &[u8]) -> Option<&[u8]> {
    let star = name.iter().position(|&b| b == b'*')?;
    let index = name[star + 1..].strip_suffix(b"*").unwrap_or(&name[star + 1..]);
    let numbered = !index.is_empty() && index.iter().all(u8::is_ascii_digit) && index.iter().any(|&b| b != b'0');
    numbered.then_some(&name[..star])
}

/// Decode a whole encoded body with one of mail-parser's MIME decoders; None when it is not
/// valid in that encoding (the raw bytes are walked instead, as a mail reader would show them).
fn decode<'x>(body: &'x [u8], f: DecodeFnc<'x>) -> Option<Cow<'x, [u8]>> {
    let mut stream = MessageStream::new(body);
    let (end, bytes) = f(&mut stream, b"");
    (end != usize::MAX).then_some(bytes)
}

/// The addresses of an address header, group members included.
fn addresses(a: &Address<'_>) -> Vec<String> {
    a.iter().filter_map(|addr| addr.address().map(str::to_string)).collect()
}

/// The body parts of a multipart body (RFC 2046 §5.1.1), as ranges of `body`: the content
/// between one delimiter line and the next, without the line break that belongs to the next
/// delimiter. The preamble and the epilogue are not parts. A body whose close delimiter is
/// missing (a message cut at `max_bytes`) ends its last part at the end of the input.
pub fn split_parts(body: &[u8], boundary: &[u8]) -> Vec<(usize, usize)> {
    let mut parts = Vec::new();
    let mut open: Option<usize> = None;
    let mut pos = 0;
    while pos < body.len() {
        let line_end = body[pos..].iter().position(|&b| b == b'\n').map_or(body.len(), |i| pos + i);
        let next = (line_end + 1).min(body.len());
        let line = &body[pos..line_end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"--").and_then(|l| l.strip_prefix(boundary)) {
            let (close, rest) = match rest.strip_prefix(b"--") {
                Some(r) => (true, r),
                None => (false, rest),
            };
            // Transport padding: a delimiter line may end in blanks.
            if rest.iter().all(|&b| b == b' ' || b == b'\t') {
                if let Some(start) = open {
                    let mut end = pos;
                    if end > start && body[end - 1] == b'\n' {
                        end -= 1;
                        if end > start && body[end - 1] == b'\r' {
                            end -= 1;
                        }
                    }
                    parts.push((start, end));
                }
                if close {
                    return parts;
                }
                open = Some(next);
            }
        }
        pos = next;
    }
    if let Some(start) = open {
        parts.push((start, body.len()));
    }
    parts
}

/// From and Subject of a stored message's header section, decoded, for listings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub from: String,
    pub subject: String,
}

/// Read From and Subject from the start of a message (its header section at most).
pub fn summary(head: &[u8]) -> Summary {
    let parser = MessageParser::new();
    let mut stream = MessageStream::new(head);
    let mut headers: Vec<Header<'_>> = Vec::new();
    stream.parse_headers(&parser, &mut headers);
    let from = headers
        .header_value(&HeaderName::From)
        .and_then(|v| match v {
            HeaderValue::Address(a) => Some(addresses(a).join(", ")),
            _ => None,
        })
        .unwrap_or_default();
    let subject = headers.header_value(&HeaderName::Subject).and_then(|v| v.as_text()).unwrap_or_default().to_string();
    Summary { from, subject }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use mail_builder::MessageBuilder;
    use mail_builder::mime::MimePart;

    use super::*;

    fn crlf(s: &str) -> Vec<u8> {
        s.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes()
    }

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn subject_from_and_attachments_built_with_mail_builder() {
        let raw = MessageBuilder::new()
            .from(("Jane Doe", "Jane@Remote.Example"))
            .to("sam@example.test")
            .subject("Rechnung für Sie — €100")
            .text_body("see attached")
            .attachment("application/octet-stream", "€invoice.VBS", b"MsgBox 1".as_slice())
            .attachment("image/png", "cat.PNG", [0x89u8, b'P', b'N', b'G'].as_slice())
            .write_to_vec()
            .unwrap();
        let s = scan(&raw, &limits());
        assert_eq!(s.from, ["Jane@Remote.Example"]);
        assert_eq!(s.subjects, ["Rechnung für Sie — €100"], "RFC 2047 decoded");
        assert_eq!(s.attachments, ["€invoice.VBS", "cat.PNG"], "RFC 2231 decoded");
        assert_eq!(s.mime_types, ["multipart/mixed", "text/plain", "application/octet-stream", "image/png"]);
        assert!(!s.truncated && !s.too_deep && !s.too_many_parts);
    }

    #[test]
    fn rfc2047_subject_by_hand() {
        let raw = crlf("From: a@b.example\nSubject: =?UTF-8?B?8J+SsCBJbnZvaWNl?= =?ISO-8859-1?Q?_f=FCr_dich?=\n\nhi\n");
        let s = scan(&raw, &limits());
        assert_eq!(s.subjects, ["💰 Invoice für dich"]);
        assert_eq!(s.mime_types, ["text/plain"], "no Content-Type: text/plain (RFC 2045 §5.2)");
        assert!(s.attachments.is_empty());
    }

    #[test]
    fn rfc2231_filename_name_only_and_encoded_words_in_names() {
        let raw = crlf(
            "From: a@b.example\nSubject: x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\npreamble\n\
             --b1\nContent-Type: application/x-vbscript\nContent-Disposition: attachment; filename*=UTF-8''%E2%82%ACinvoice.VBS\n\nMsgBox 1\n\
             --b1\nContent-Type: application/octet-stream; name=\"ONLY-NAME.EXE\"\n\nMZ\n\
             --b1\nContent-Type: application/octet-stream;\n name*0*=iso-8859-1''caf%E9-;\n name*1=\"part.js\"\n\nx\n\
             --b1\nContent-Type: application/pdf\nContent-Disposition: attachment;\n filename=\"=?UTF-8?Q?Rechnung_=E2=82=AC.pdf?=\"\n\n%PDF\n\
             --b1\nContent-Type: text/plain; name=\"decoy.txt\"\nContent-Disposition: attachment; filename=\"real.vbs\"\n\ntext\n\
             --b1--\nepilogue\n",
        );
        let s = scan(&raw, &limits());
        assert_eq!(s.attachments, ["€invoice.VBS", "ONLY-NAME.EXE", "café-part.js", "Rechnung €.pdf", "decoy.txt", "real.vbs"]);
        assert_eq!(
            s.mime_types,
            ["multipart/mixed", "application/x-vbscript", "application/octet-stream", "application/octet-stream", "application/pdf", "text/plain"]
        );
    }

    #[test]
    fn nested_multipart_and_encapsulated_messages() {
        // A forwarded message (message/rfc822, 7bit) whose own multipart carries the payload,
        // inside multipart/alternative inside multipart/mixed; upper-case type names.
        let inner = "From: evil@bad.example\nSubject: inner subject\nContent-Type: MULTIPART/MIXED; boundary=in\n\n\
                     --in\nContent-Type: text/plain\n\nhello\n--in\nContent-Type: IMAGE/GIF\nContent-Disposition: ATTACHMENT; FILENAME=\"Inner.SCR\"\n\nGIF89a\n--in--\n";
        let raw = crlf(&format!(
            "From: fwd@remote.example\nSubject: Fwd\nContent-Type: multipart/mixed; boundary=\"outer\"\n\n\
             --outer\nContent-Type: multipart/alternative; boundary=\"alt\"\n\n--alt\nContent-Type: text/plain\n\nplain\n--alt\nContent-Type: text/html\n\n<p>html</p>\n--alt--\n\
             --outer\nContent-Type: message/rfc822\n\n{inner}\
             --outer--\n"
        ));
        let s = scan(&raw, &limits());
        assert_eq!(s.subjects, ["Fwd"], "an encapsulated message's Subject is not the message's");
        assert_eq!(s.from, ["fwd@remote.example"]);
        assert_eq!(s.attachments, ["Inner.SCR"]);
        assert_eq!(
            s.mime_types,
            ["multipart/mixed", "multipart/alternative", "text/plain", "text/html", "message/rfc822", "multipart/mixed", "text/plain", "image/gif"]
        );
    }

    #[test]
    fn base64_encapsulated_message_from_mail_builder() {
        let inner = MessageBuilder::new()
            .from("x@y.example")
            .subject("inner")
            .text_body("hi")
            .attachment("application/zip", "payload.zip", b"PK\x03\x04".as_slice())
            .write_to_vec()
            .unwrap();
        let raw = MessageBuilder::new()
            .from("outer@remote.example")
            .subject("outer")
            .body(MimePart::new(
                "multipart/mixed",
                vec![MimePart::new("text/plain", "see below"), MimePart::new("message/rfc822", inner).attachment("fwd.eml")],
            ))
            .write_to_vec()
            .unwrap();
        let s = scan(&raw, &limits());
        assert_eq!(s.attachments, ["fwd.eml", "payload.zip"]);
        assert!(s.mime_types.contains(&"application/zip".to_string()), "{:?}", s.mime_types);
    }

    #[test]
    fn digest_parts_default_to_messages() {
        let raw = crlf(
            "Subject: digest\nContent-Type: multipart/digest; boundary=d\n\n--d\n\nFrom: a@b.example\nSubject: one\nContent-Type: application/x-msdownload; name=one.exe\n\nMZ\n--d--\n",
        );
        let s = scan(&raw, &limits());
        assert_eq!(s.mime_types, ["multipart/digest", "message/rfc822", "application/x-msdownload"]);
        assert_eq!(s.attachments, ["one.exe"]);
    }

    #[test]
    fn boundaries_need_their_own_line() {
        let body = b"pre\r\n--b\r\nA: 1\r\n\r\nx --b y\r\n--bb\r\n--b \t\r\n\r\nsecond\r\n--b--  \r\nepilogue\r\n--b\r\n";
        let parts = split_parts(body, b"b");
        let texts: Vec<&[u8]> = parts.iter().map(|&(s, e)| &body[s..e]).collect();
        assert_eq!(texts, [b"A: 1\r\n\r\nx --b y\r\n--bb".as_slice(), b"\r\nsecond".as_slice()]);
        // Unterminated: the last part runs to the end; bare LF line ends work too.
        let body = b"--b\nA: 1\n\nrest";
        assert_eq!(split_parts(body, b"b"), [(4, body.len())]);
    }

    /// `levels` multiparts, each holding the next.
    fn deep_multipart(levels: usize) -> Vec<u8> {
        let mut raw = b"From: a@b.example\r\nSubject: deep\r\n".to_vec();
        for i in 0..levels {
            raw.extend(format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n").as_bytes());
        }
        raw.extend(b"Content-Type: application/octet-stream; name=\"deep.vbs\"\r\n\r\nx\r\n");
        for i in (0..levels).rev() {
            raw.extend(format!("--b{i}--\r\n").as_bytes());
        }
        raw
    }

    #[test]
    fn deep_nesting_stops_at_the_depth_bound_quickly() {
        let shallow = scan(&deep_multipart(5), &limits());
        assert_eq!(shallow.attachments, ["deep.vbs"]);
        assert!(!shallow.too_deep);

        let raw = deep_multipart(1000);
        let start = Instant::now();
        let s = scan(&raw, &limits());
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        assert!(s.too_deep);
        assert_eq!(s.mime_types.len(), DEFAULT_MAX_DEPTH + 1, "levels 0..=max_depth are walked");
        assert!(s.attachments.is_empty());
        assert_eq!(s.subjects, ["deep"]);

        // The same boundary at every level (a "cyclic" structure) and message/rfc822 nesting.
        let mut cyclic = Vec::new();
        for _ in 0..1000 {
            cyclic.extend(b"Content-Type: multipart/mixed; boundary=same\r\n\r\n--same\r\n");
        }
        let mut encapsulated = Vec::new();
        for _ in 0..1000 {
            encapsulated.extend(b"Content-Type: message/rfc822\r\n\r\n");
        }
        // With one boundary for all, every delimiter line closes the part before it: the
        // structure is wide, not deep (as a mail reader sees it too).
        for (raw, deep) in [(cyclic, false), (encapsulated, true)] {
            let start = Instant::now();
            let s = scan(&raw, &limits());
            assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
            assert_eq!(s.too_deep, deep);
            assert!(s.mime_types.len() <= 1001);
        }
    }

    #[test]
    fn huge_messages_are_cut_at_max_bytes_and_many_parts_at_max_parts() {
        // 30 MiB: a header, then parts of 1 MiB each; the cut falls inside the tenth part.
        let mut raw = b"Subject: big\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n".to_vec();
        for i in 0..30 {
            raw.extend(format!("--z\r\nContent-Type: application/octet-stream; name=\"f{i}.bin\"\r\n\r\n").as_bytes());
            raw.extend(std::iter::repeat_n(b'A', 1 << 20));
            raw.extend(b"\r\n");
        }
        raw.extend(b"--z--\r\n");
        let start = Instant::now();
        let s = scan(&raw, &limits());
        assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
        assert!(s.truncated);
        assert_eq!(s.attachments.len(), 10, "only the parts whose headers lie within the first 10 MiB");

        // 200,000 empty parts: only max_parts are looked at.
        let mut many = b"Content-Type: multipart/mixed; boundary=m\r\n\r\n".to_vec();
        for _ in 0..200_000 {
            many.extend(b"--m\r\nContent-Type: image/x\r\n\r\n\r\n");
        }
        let start = Instant::now();
        let s = scan(&many, &limits());
        assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
        assert!(s.too_many_parts);
        assert_eq!(s.mime_types.len(), DEFAULT_MAX_PARTS);
    }

    fn timed(raw: &[u8]) -> Scan {
        let start = Instant::now();
        let s = scan(raw, &limits());
        assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
        s
    }

    #[test]
    fn hostile_header_shapes_finish_quickly() {
        // Megabytes of RFC 2231 continuation sections, of one parameter and of many, with the
        // real file name behind them.
        for distinct in [false, true] {
            let mut raw = b"Content-Type: application/octet-stream".to_vec();
            for i in 1..150_000 {
                let name = if distinct { format!("x{i}") } else { "junk".to_string() };
                raw.extend(format!(";\r\n {name}*{i}=a").as_bytes());
            }
            raw.extend(b";\r\n name*0=\"ev\"; name*1*=%69l.VBS\r\n\r\nbody");
            let s = timed(&raw);
            assert_eq!(s.attachments, ["evil.VBS"], "distinct: {distinct}");
        }
        // The same header a hundred thousand times over, each different.
        let mut raw = Vec::new();
        for i in 0..100_000 {
            raw.extend(format!("Content-Type: a/b{i}; name=n{i}\r\n").as_bytes());
        }
        raw.extend(b"\r\nx");
        let s = timed(&raw);
        assert_eq!((s.mime_types.len(), s.attachments.len()), (100_000, 100_000));
        // Many encoded-words, addresses and parameters.
        let mut raw = b"From: ".to_vec();
        for i in 0..100_000 {
            raw.extend(format!("a{i}@b.example,\r\n ").as_bytes());
        }
        raw.extend(b"x@y.example\r\nSubject: ");
        for _ in 0..100_000 {
            raw.extend(b"=?UTF-8?Q?a?=\r\n ");
        }
        raw.extend(b"b\r\nContent-Type: text/plain");
        for i in 0..100_000 {
            raw.extend(format!(";\r\n a{i}=b").as_bytes());
        }
        raw.extend(b"\r\n\r\nx");
        let s = timed(&raw);
        assert_eq!(s.from.len(), 100_001);
        assert_eq!(s.subjects[0], format!("{} b", "a".repeat(100_000)), "adjacent encoded-words join without their blanks");
    }

    #[test]
    fn taming_keeps_what_the_walk_reads() {
        let block = b"Subject: a*b\r\nContent-Type: application/x; a=\"q;*1\"; foo*1=x;\r\n name*0*=utf-8''%41; name*1=B; boundary=\"z\"\r\n";
        let tamed = tame(block);
        assert_eq!(
            String::from_utf8(tamed).unwrap(),
            "Subject: a*b\r\nContent-Type: application/x; a=\"q;*1\";\r\n name*0*=utf-8''%41; name*1=B; boundary=\"z\"\r\n"
        );
        assert_eq!(continuation_of(b"name*1*"), Some(b"name".as_slice()));
        assert_eq!(continuation_of(b"name*0"), None);
        assert_eq!(continuation_of(b"name*"), None);
        assert_eq!(header_block(b"A: 1\r\n \r\nbody"), (6, 9));
        assert_eq!(header_block(b"A: 1\r\n"), (6, 6));
    }

    #[test]
    fn cut_headers_still_count() {
        let raw = crlf(
            "Subject: cut\nContent-Type: multipart/mixed; boundary=q\n\n--q\nContent-Type: application/x-sh; name=\"run.sh\"\nContent-Transfer-Enc",
        );
        let s = scan(&raw, &limits());
        assert_eq!(s.attachments, ["run.sh"]);
        assert_eq!(s.mime_types, ["multipart/mixed", "application/x-sh"]);
        let s = scan(b"", &limits());
        assert_eq!(s.mime_types, ["text/plain"]);
    }

    #[test]
    fn summary_reads_from_and_subject() {
        let head = crlf("From: \"Jane\" <jane@remote.example>\nSubject: =?UTF-8?Q?caf=C3=A9?=\n\nbody");
        assert_eq!(summary(&head), Summary { from: "jane@remote.example".into(), subject: "café".into() });
        assert_eq!(summary(b"garbage"), Summary::default());
    }
}
