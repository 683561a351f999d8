//! What leaves us over SMTP fits the next hop (RFC 6152 §3, RFC 5321 §4.5.3.1.6, RFC 5322
//! §2.1.1, RFC 2045, RFC 2046), the way Postfix does it with its MIME downgrade
//! (`disable_mime_output_conversion = no`) and `smtp_line_length_limit = 998`: a message with
//! 8-bit octets goes as 7-bit MIME to a host that does not offer 8BITMIME, and no line longer
//! than 998 octets goes to any host. The server stores what it received unchanged (long lines
//! and 8-bit octets included) and local delivery gives it back as it came; only relaying
//! converts, and only what has to change.
//!
//! Two streaming passes over the stored message, neither of which holds a part's body:
//!
//! 1. [`scan`] reads the message once, before connecting, into a [`Plan`]: for every MIME entity
//!    (header block) in document order, its kind (from Content-Type and
//!    Content-Transfer-Encoding) and whether its body has 8-bit octets, a line over 998 octets
//!    or a NUL; for the message, whether it has 8-bit octets at all, whether anything must
//!    change for every host, and whether 8-bit octets sit where no encoding can reach them.
//! 2. [`Converter`] rewrites the message while it is sent. At each header block the plan says
//!    what becomes of that entity, so its Content-Transfer-Encoding field is rewritten as it
//!    streams past and its body is encoded line by line.
//!
//! Memory: the plan (a few octets per entity, at most [`MAX_ENTITIES`] entities tracked), the
//! MIME nesting (at most [`MAX_DEPTH`] levels, each with its boundary), the first 1 KiB of the
//! current line (to recognise a boundary or a header field name), 4 KiB of each entity's
//! Content-Type and Content-Transfer-Encoding fields, and one output line of a long header
//! being folded. Lines of any length stream through.
//!
//! What changes, when a message must be converted for a host (8-bit octets and no 8BITMIME, or
//! anything over the line limit):
//!
//! - A leaf part whose Content-Transfer-Encoding is 7bit, 8bit, binary or absent, and whose body
//!   has 8-bit octets (for a host without 8BITMIME) or a line over 998 octets or a NUL (for any
//!   host): text/* becomes quoted-printable, anything else base64. Its Content-Transfer-Encoding
//!   field is replaced where it stood (added at the end of its header block when it had none,
//!   with `MIME-Version: 1.0` for a message without one). The message itself is such a leaf when
//!   it is not multipart.
//! - multipart/* keep their structure: boundaries, preamble, epilogue. message/rfc822 parts are
//!   recursed into — the encapsulated message's header and parts are treated like the
//!   message's — since RFC 2046 §5.2.1 allows them no encoding. Other message/* types
//!   (message/global, delivery-status...) are leaves, base64 when they must change.
//! - A container or a part left as it is that is labelled 8bit or binary is relabelled 7bit for a
//!   host without 8BITMIME, and a binary one 8bit for a host with it.
//! - Header lines over 998 octets are folded: CRLF inserted before the last space or tab that
//!   fits; without one, split with CRLF SP (Postfix's way, which changes the value by a space).
//! - Lines over 998 octets that cannot be re-encoded — in a part already quoted-printable (a
//!   soft line break `=` CRLF is inserted, which decoders remove), base64 (CRLF, which decoders
//!   ignore), of an unknown encoding, in a preamble or epilogue — are broken with CRLF.
//!
//! What cannot be made 7-bit: 8-bit octets in a header field (RFC 6152 provides no conversion
//! for them, and RFC 6532 needs SMTPUTF8, which we do not offer), in a multipart's preamble or
//! epilogue, in a part already labelled quoted-printable, base64 or an encoding we do not know,
//! or beyond the nesting and entity limits. [`Plan::unconvertible`] says which; such a message
//! is not sent to a host without 8BITMIME at all (RFC 6152 §3: convert, or treat it as a
//! permanent failure): the conversation ends the attempt before MAIL FROM and the sender gets a
//! 5.6.3 report ("conversion required but not supported", RFC 3463). Postfix sends such headers
//! unchanged; we do not send 8-bit octets to a host that did not ask for them.
//!
//! The parser follows RFC 2046 as Python's `email` package reads it: a boundary line is `--`,
//! the boundary, optionally `--`, then only spaces and tabs; the CRLF before a boundary line
//! belongs to the boundary; the first line of a header block that is not a header field ends
//! it; a boundary of an enclosing multipart ends every part inside it.

use std::io;

use crate::conversation::BodySource;

/// The longest line, CRLF not counted, that goes to a next hop (RFC 5321 §4.5.3.1.6: 1000 octets
/// with CRLF; the dot doubled for transparency is not counted).
pub const LINE_LIMIT: usize = 998;
/// MIME nesting levels parsed (Postfix's `mime_nesting_limit`); deeper containers are opaque.
pub const MAX_DEPTH: usize = 100;
/// Entities whose fate the plan records; later ones are passed on as they are.
pub const MAX_ENTITIES: usize = 100_000;
/// The start of a line kept until it is known whether it is a boundary or a header field.
const HEAD_MAX: usize = 1024;
/// Of a Content-Type or Content-Transfer-Encoding field, kept for parsing.
const FIELD_KEEP: usize = 4096;
/// Longer boundary parameters are not believed (RFC 2046 allows 70).
const BOUNDARY_MAX: usize = 900;
/// Quoted-printable and base64 lines, RFC 2045 §6.7, §6.8.
const ENCODED_LINE: usize = 76;

// ---- the plan ----------------------------------------------------------------------------

/// What an entity is, as far as conversion goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Its header block has not ended yet.
    Pending,
    /// text/* with an identity encoding: quoted-printable when it must change.
    Text,
    /// Any other leaf with an identity encoding: base64 when it must change.
    Other,
    Multipart,
    /// message/rfc822 with an identity encoding: the encapsulated message is parsed.
    Message,
    /// Already quoted-printable.
    QuotedPrintable,
    /// Already base64.
    Base64,
    /// An encoding we do not know, a container that cannot be parsed (no boundary, an encoded
    /// multipart, too deep): passed on as it is.
    Opaque,
}

/// Its Content-Transfer-Encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Label {
    Absent,
    SevenBit,
    EightBit,
    Binary,
    QuotedPrintable,
    Base64,
    Unknown,
}

impl Label {
    fn identity(self) -> bool {
        matches!(self, Label::Absent | Label::SevenBit | Label::EightBit | Label::Binary)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    class: Class,
    label: Label,
    /// The body has 8-bit octets.
    eight_bit: bool,
    /// The body has a line over [`LINE_LIMIT`] octets, or a NUL: it must change for any host.
    long: bool,
}

/// What [`scan`] found in a message: enough for [`Converter`] to rewrite it in one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    entities: Vec<Record>,
    eight_bit: bool,
    long: bool,
    unconvertible: Option<&'static str>,
}

impl Plan {
    /// The message has 8-bit octets somewhere.
    pub fn eight_bit(&self) -> bool {
        self.eight_bit
    }

    /// Something must change for every host: a line over [`LINE_LIMIT`] octets (header or body),
    /// or a NUL in a part that can be encoded.
    pub fn long_lines(&self) -> bool {
        self.long
    }

    /// Whether the message is rewritten for a host with (`seven_bit` false) or without 8BITMIME.
    pub fn needs_conversion(&self, seven_bit: bool) -> bool {
        self.long || (seven_bit && self.eight_bit)
    }

    /// Why the message cannot be made 7-bit, when it cannot: it must not go to a host without
    /// 8BITMIME.
    pub fn unconvertible(&self) -> Option<&'static str> {
        self.unconvertible
    }

    /// The plan for a message in memory (what [`scan`] does for a [`BodySource`]).
    pub fn of(message: &[u8]) -> Plan {
        let mut parser = Parser::default();
        let mut recorder = Recorder::default();
        parser.feed(message, &mut recorder);
        parser.finish(&mut recorder);
        recorder.plan
    }
}

/// Read the whole body once and plan its conversion; the body is rewound afterwards, ready to
/// be sent.
pub async fn scan<B: BodySource>(body: &mut B) -> io::Result<Plan> {
    let mut parser = Parser::default();
    let mut recorder = Recorder::default();
    while let Some(chunk) = body.next_chunk().await? {
        parser.feed(&chunk, &mut recorder);
    }
    parser.finish(&mut recorder);
    body.rewind();
    Ok(recorder.plan)
}

// ---- the converter -----------------------------------------------------------------------

/// Rewrites a message as its [`Plan`] says, for a host with or without 8BITMIME; a message
/// that needs nothing for that host passes through byte for byte. Input: the same bytes the
/// plan was made from (CRLF text), in chunks of any size; output: CRLF text.
pub struct Converter {
    inner: Option<Box<(Parser, Writer)>>,
}

impl Converter {
    /// `seven_bit`: the host does not offer 8BITMIME. A plan with [`Plan::unconvertible`] set must
    /// not be sent to such a host; its unconvertible octets would pass through unchanged.
    pub fn new(plan: &Plan, seven_bit: bool) -> Self {
        if !plan.needs_conversion(seven_bit) {
            return Converter { inner: None };
        }
        let writer = Writer { records: plan.entities.clone(), seven_bit, ..Writer::default() };
        Converter { inner: Some(Box::new((Parser::default(), writer))) }
    }

    /// Whether anything is rewritten at all.
    pub fn converts(&self) -> bool {
        self.inner.is_some()
    }

    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        match self.inner.as_deref_mut() {
            None => out.extend_from_slice(input),
            Some((parser, writer)) => {
                parser.feed(input, writer);
                out.append(&mut writer.out);
            }
        }
    }

    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some((parser, writer)) = self.inner.as_deref_mut() {
            parser.finish(writer);
            out.append(&mut writer.out);
        }
    }
}

// ---- the parser --------------------------------------------------------------------------

/// The header fields that matter here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    ContentType,
    TransferEncoding,
    MimeVersion,
    Other,
}

impl Field {
    fn of(name: &[u8]) -> Field {
        if name.eq_ignore_ascii_case(b"content-type") {
            Field::ContentType
        } else if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
            Field::TransferEncoding
        } else if name.eq_ignore_ascii_case(b"mime-version") {
            Field::MimeVersion
        } else {
            Field::Other
        }
    }
}

/// A header line: the first line of a field, or a continuation line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeaderLine {
    Field(Field),
    Continuation,
}

/// One entity being parsed: the message, a part, an encapsulated message.
#[derive(Debug)]
struct Level {
    /// Its record in the plan; `None` past [`MAX_ENTITIES`].
    index: Option<usize>,
    /// The top of a message (the message or an encapsulated one): where MIME-Version belongs.
    message: bool,
    /// A part of multipart/digest: message/rfc822 unless it says otherwise (RFC 2046 §5.1.5).
    digest_part: bool,
    class: Class,
    label: Label,
    /// multipart: its boundary, whether it is multipart/digest, and whether its closing
    /// boundary was seen (what follows is epilogue).
    boundary: Vec<u8>,
    digest: bool,
    closed: bool,
    /// The first Content-Type and Content-Transfer-Encoding fields, as far as kept.
    content_type: Option<Vec<u8>>,
    transfer_encoding: Option<Vec<u8>>,
}

impl Level {
    fn new(index: Option<usize>, message: bool, digest_part: bool) -> Self {
        Level {
            index,
            message,
            digest_part,
            class: Class::Pending,
            label: Label::Absent,
            boundary: Vec::new(),
            digest: false,
            closed: false,
            content_type: None,
            transfer_encoding: None,
        }
    }

    /// At the end of its header block: what it is.
    fn settle(&mut self, depth: usize) {
        self.label = match &self.transfer_encoding {
            None => Label::Absent,
            Some(v) => match first_token(v).to_ascii_lowercase().as_slice() {
                b"" => Label::Absent,
                b"7bit" => Label::SevenBit,
                b"8bit" => Label::EightBit,
                b"binary" => Label::Binary,
                b"quoted-printable" => Label::QuotedPrintable,
                b"base64" => Label::Base64,
                _ => Label::Unknown,
            },
        };
        let ct = self.content_type.as_deref().and_then(parse_content_type);
        let (main, sub) = match &ct {
            Some(ct) => (ct.main.as_slice(), ct.sub.as_slice()),
            None if self.content_type.is_some() => (&b"text"[..], &b"plain"[..]),
            None if self.digest_part => (&b"message"[..], &b"rfc822"[..]),
            None => (&b"text"[..], &b"plain"[..]),
        };
        let deeper = depth < MAX_DEPTH;
        self.class = match self.label {
            Label::QuotedPrintable => Class::QuotedPrintable,
            Label::Base64 => Class::Base64,
            Label::Unknown => Class::Opaque,
            _ if main == b"multipart" => match ct.as_ref().and_then(|c| c.boundary.clone()) {
                Some(b) if deeper && !b.is_empty() && b.len() <= BOUNDARY_MAX => {
                    self.boundary = b;
                    self.digest = sub == b"digest";
                    Class::Multipart
                }
                _ => Class::Opaque,
            },
            _ if main == b"message" && sub == b"rfc822" => {
                if deeper {
                    Class::Message
                } else {
                    Class::Opaque
                }
            }
            _ if main == b"text" => Class::Text,
            _ => Class::Other,
        };
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Body,
}

/// What the current line turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// Not known yet: its bytes are in `head`.
    Unknown,
    Header,
    Body,
    /// A blank line ending a header block, or a boundary line: dealt with.
    Done,
}

/// What the parser tells a pass: the plan's recorder, or the converter's writer. Body events
/// concern the innermost entity (a sink keeps its own stack, pushed by `entity_start`, popped
/// by `entity_end`).
trait Sink {
    fn entity_start(&mut self, level: &Level);
    fn header_line(&mut self, kind: HeaderLine);
    fn header_bytes(&mut self, bytes: &[u8]);
    fn header_line_end(&mut self);
    /// `blank`: the block ended with a blank line (not passed on: the sink writes it);
    /// otherwise with a line that is not a header field, a boundary or the end of the message.
    fn headers_end(&mut self, level: &Level, blank: bool);
    /// The CRLF that ended the previous body line is content, not a boundary's.
    fn body_eol(&mut self);
    fn body_bytes(&mut self, bytes: &[u8]);
    /// A boundary line; `eol`: the CRLF before it (which belongs to it, RFC 2046 §5.1.1).
    fn boundary(&mut self, eol: bool, line: &[u8]);
    fn entity_end(&mut self, level: &Level);
}

#[derive(Debug)]
struct Parser {
    started: bool,
    state: State,
    levels: Vec<Level>,
    /// Entities started so far.
    entities: usize,
    /// The current line: its first bytes, until it is classified.
    head: Vec<u8>,
    line: Line,
    /// The previous byte was a CR (a following LF belongs to the same line end).
    after_cr: bool,
    /// The previous body line's CRLF, not yet given to anyone.
    pending_eol: bool,
    /// The header field being kept for parsing, when the current field is one.
    keeping: Option<Field>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            started: false,
            state: State::Header,
            levels: Vec::new(),
            entities: 0,
            head: Vec::with_capacity(HEAD_MAX),
            line: Line::Unknown,
            after_cr: false,
            pending_eol: false,
            keeping: None,
        }
    }
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

impl Parser {
    fn start(&mut self, sink: &mut impl Sink) {
        if !self.started {
            self.started = true;
            self.push_entity(true, false, sink);
        }
    }

    fn push_entity(&mut self, message: bool, digest_part: bool, sink: &mut impl Sink) {
        let index = (self.entities < MAX_ENTITIES).then_some(self.entities);
        self.entities += 1;
        let level = Level::new(index, message, digest_part);
        sink.entity_start(&level);
        self.levels.push(level);
        self.state = State::Header;
        self.keeping = None;
    }

    /// Input: CRLF text; a bare CR or LF also ends a line (and comes out as CRLF).
    fn feed(&mut self, input: &[u8], sink: &mut impl Sink) {
        self.start(sink);
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                i += 1;
                continue;
            }
            if b == b'\r' || b == b'\n' {
                self.after_cr = b == b'\r';
                self.end_line(sink);
                i += 1;
                continue;
            }
            if self.line == Line::Unknown {
                self.head.push(b);
                i += 1;
                self.classify(false, sink);
            } else {
                let rest = &input[i..];
                let n = rest.iter().position(|&c| c == b'\r' || c == b'\n').unwrap_or(rest.len());
                self.stream(&rest[..n], sink);
                i += n;
            }
        }
    }

    fn finish(&mut self, sink: &mut impl Sink) {
        self.start(sink);
        self.after_cr = false;
        if self.line == Line::Unknown && !self.head.is_empty() {
            self.classify(true, sink);
        }
        if self.line == Line::Header {
            sink.header_line_end();
        }
        self.line = Line::Unknown;
        self.head.clear();
        if std::mem::take(&mut self.pending_eol) {
            sink.body_eol();
        }
        self.close_down_to(0, sink);
    }

    fn end_line(&mut self, sink: &mut impl Sink) {
        if self.line == Line::Unknown {
            self.classify(true, sink);
        }
        match self.line {
            Line::Header => sink.header_line_end(),
            Line::Body => self.pending_eol = true,
            Line::Done | Line::Unknown => {}
        }
        self.line = Line::Unknown;
        self.head.clear();
    }

    fn stream(&mut self, bytes: &[u8], sink: &mut impl Sink) {
        match self.line {
            Line::Header => {
                self.keep(bytes);
                sink.header_bytes(bytes);
            }
            _ => sink.body_bytes(bytes),
        }
    }

    /// Could the current line still be a boundary line of an open multipart?
    fn boundary_candidate(&self) -> bool {
        let dashes = &b"--"[..self.head.len().min(2)];
        self.head.starts_with(dashes) && self.levels.iter().any(|l| l.class == Class::Multipart && !l.closed)
    }

    /// The multipart (its depth) whose boundary line the current line is, and whether it is
    /// the closing one. A closed multipart's own boundaries are epilogue text.
    fn boundary_match(&self) -> Option<(usize, bool)> {
        let rest = self.head.strip_prefix(b"--")?;
        for (k, level) in self.levels.iter().enumerate().rev() {
            if level.class != Class::Multipart || level.closed {
                continue;
            }
            let Some(after) = rest.strip_prefix(level.boundary.as_slice()) else { continue };
            let (close, tail) = match after.strip_prefix(b"--") {
                Some(t) => (true, t),
                None => (false, after),
            };
            if tail.iter().all(|&b| is_wsp(b)) {
                return Some((k, close));
            }
        }
        None
    }

    /// Decide what the current line is once enough of it is known (`complete`: all of it).
    fn classify(&mut self, complete: bool, sink: &mut impl Sink) {
        // While a header line streams in byte by byte, everything before its newest byte was
        // already looked at (and was part of a field name); after a header block ends, the line
        // is looked at again from its start.
        let mut whole = complete;
        loop {
            let undecided = !complete && self.head.len() < HEAD_MAX;
            if self.boundary_candidate() {
                if undecided {
                    return;
                }
                if complete && let Some((k, close)) = self.boundary_match() {
                    self.on_boundary(k, close, sink);
                    self.line = Line::Done;
                    return;
                }
            }
            if self.state == State::Body {
                self.line = Line::Body;
                if std::mem::take(&mut self.pending_eol) {
                    sink.body_eol();
                }
                sink.body_bytes(&self.head);
                return;
            }
            // A header block.
            if complete && self.head.is_empty() {
                self.end_headers(true, sink);
                self.line = Line::Done;
                return;
            }
            if is_wsp(self.head[0]) {
                return self.header_line(HeaderLine::Continuation, 0, sink);
            }
            let from = if undecided && !whole { self.head.len() - 1 } else { 0 };
            match self.head[from..].iter().position(|&b| b == b':' || !(33..=126).contains(&b)).map(|p| p + from) {
                Some(p) if p > 0 && self.head[p] == b':' => {
                    let field = Field::of(&self.head[..p]);
                    return self.header_line(HeaderLine::Field(field), p + 1, sink);
                }
                None if undecided => return,
                // Not a header field: the header block ends without a blank line, and this
                // line is the first of what follows (RFC 5322 §2.1 as Python reads it).
                _ => {
                    self.end_headers(false, sink);
                    whole = true;
                }
            }
        }
    }

    fn header_line(&mut self, kind: HeaderLine, value_at: usize, sink: &mut impl Sink) {
        self.line = Line::Header;
        match kind {
            HeaderLine::Field(field @ (Field::ContentType | Field::TransferEncoding)) => {
                let level = self.levels.last_mut().expect("an entity is open");
                let slot = if field == Field::ContentType { &mut level.content_type } else { &mut level.transfer_encoding };
                // The first such field counts (as `email.message.Message.get` does).
                if slot.is_none() {
                    *slot = Some(Vec::new());
                    self.keeping = Some(field);
                } else {
                    self.keeping = None;
                }
                let value = self.head[value_at..].to_vec();
                self.keep(&value);
            }
            HeaderLine::Field(_) => self.keeping = None,
            HeaderLine::Continuation if self.keeping.is_some() => {
                let line = self.head.clone();
                self.keep(&line);
            }
            HeaderLine::Continuation => {}
        }
        sink.header_line(kind);
        sink.header_bytes(&self.head);
    }

    fn keep(&mut self, bytes: &[u8]) {
        let Some(field) = self.keeping else { return };
        let level = self.levels.last_mut().expect("an entity is open");
        let slot = if field == Field::ContentType { &mut level.content_type } else { &mut level.transfer_encoding };
        if let Some(v) = slot {
            let room = FIELD_KEEP.saturating_sub(v.len());
            v.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }

    fn end_headers(&mut self, blank: bool, sink: &mut impl Sink) {
        let depth = self.levels.len();
        let level = self.levels.last_mut().expect("an entity is open");
        level.settle(depth);
        sink.headers_end(level, blank);
        self.keeping = None;
        self.state = State::Body;
        if level.class == Class::Message {
            self.push_entity(true, false, sink);
        }
    }

    fn on_boundary(&mut self, k: usize, close: bool, sink: &mut impl Sink) {
        self.close_down_to(k + 1, sink);
        sink.boundary(std::mem::take(&mut self.pending_eol), &self.head);
        self.state = State::Body;
        if close {
            self.levels[k].closed = true;
        } else {
            let digest = self.levels[k].digest;
            self.push_entity(false, digest, sink);
        }
    }

    /// End every entity deeper than `depth`.
    fn close_down_to(&mut self, depth: usize, sink: &mut impl Sink) {
        while self.levels.len() > depth {
            if self.state == State::Header {
                self.end_headers_only(sink);
            }
            let level = self.levels.pop().expect("an entity is open");
            sink.entity_end(&level);
            self.state = State::Body;
        }
    }

    /// A header block cut short by a boundary or the end of the message: its entity ends here.
    fn end_headers_only(&mut self, sink: &mut impl Sink) {
        let depth = self.levels.len();
        let level = self.levels.last_mut().expect("an entity is open");
        level.settle(depth);
        // Nothing inside it gets parsed: an encapsulated message or a multipart without a body.
        if matches!(level.class, Class::Message | Class::Multipart) {
            level.class = Class::Opaque;
        }
        sink.headers_end(level, false);
        self.state = State::Body;
    }
}

// ---- header values -----------------------------------------------------------------------

/// The value with (nested) comments made spaces, outside quoted strings (RFC 5322 §3.2.2).
fn uncomment(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for &b in v {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(b);
            }
            continue;
        }
        match b {
            b'\\' if quoted || depth > 0 => {
                escaped = true;
                if depth == 0 {
                    out.push(b);
                }
            }
            b'"' if depth == 0 => {
                quoted = !quoted;
                out.push(b);
            }
            b'(' if !quoted => depth += 1,
            b')' if !quoted && depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    out.push(b' ');
                }
            }
            _ if depth == 0 => out.push(b),
            _ => {}
        }
    }
    out
}

fn trim(v: &[u8]) -> &[u8] {
    let is_space = |b: &u8| b.is_ascii_whitespace();
    let start = v.iter().position(|b| !is_space(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !is_space(b)).map_or(start, |e| e + 1);
    &v[start..end]
}

/// The first token of a Content-Transfer-Encoding value.
fn first_token(v: &[u8]) -> Vec<u8> {
    let v = uncomment(v);
    let v = trim(&v);
    v.iter().take_while(|b| !b.is_ascii_whitespace() && **b != b';').copied().collect()
}

#[derive(Debug, PartialEq, Eq)]
struct ContentType {
    main: Vec<u8>,
    sub: Vec<u8>,
    boundary: Option<Vec<u8>>,
}

/// type/subtype (lower case) and the boundary parameter (RFC 2045 §5.1); `None` when there is
/// no type/subtype (the entity is then text/plain, as for Python's `email`).
fn parse_content_type(v: &[u8]) -> Option<ContentType> {
    let v = uncomment(v);
    let mut pieces = split_params(&v).into_iter();
    let kind = trim(pieces.next()?);
    let slash = kind.iter().position(|&b| b == b'/')?;
    let token = |s: &[u8]| !s.is_empty() && s.iter().all(|&b| b > 32 && b < 127 && !b"()<>@,;:\\\"/[]?=".contains(&b));
    let (main, sub) = (trim(&kind[..slash]), trim(&kind[slash + 1..]));
    if !token(main) || !token(sub) {
        return None;
    }
    let mut boundary = None;
    for p in pieces {
        let Some(eq) = p.iter().position(|&b| b == b'=') else { continue };
        if !trim(&p[..eq]).eq_ignore_ascii_case(b"boundary") || boundary.is_some() {
            continue;
        }
        let value = trim(&p[eq + 1..]);
        boundary = Some(match value.strip_prefix(b"\"") {
            Some(q) => {
                let mut out = Vec::new();
                let mut escaped = false;
                for &b in q {
                    match b {
                        _ if escaped => {
                            out.push(b);
                            escaped = false;
                        }
                        b'\\' => escaped = true,
                        b'"' => break,
                        _ => out.push(b),
                    }
                }
                out
            }
            None => value.iter().take_while(|b| !b.is_ascii_whitespace()).copied().collect(),
        });
    }
    Some(ContentType { main: main.to_ascii_lowercase(), sub: sub.to_ascii_lowercase(), boundary })
}

/// Split at `;` outside quoted strings.
fn split_params(v: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in v.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b';' if !quoted => {
                out.push(&v[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&v[start..]);
    out
}

// ---- pass 1: the recorder ----------------------------------------------------------------

const IN_HEADER: &str = "it has 8-bit octets in a header field, which cannot be converted (RFC 6152)";
const IN_CONTAINER: &str = "it has 8-bit octets in a multipart preamble or epilogue, which cannot be converted";
const IN_ENCODED: &str = "it has 8-bit octets in a part already encoded, or of an unknown encoding, which cannot be converted";
const OPAQUE: &str = "it has 8-bit octets in a part that cannot be parsed (a multipart without a boundary, nested too deep, past the part limit)";

#[derive(Debug, Default)]
struct Recorder {
    plan: Plan,
    /// Per open entity: its index, class and label.
    stack: Vec<(Option<usize>, Class, Label)>,
    /// Octets of the current line so far.
    col: usize,
}

impl Recorder {
    fn unconvertible(&mut self, why: &'static str) {
        self.plan.eight_bit = true;
        self.plan.unconvertible.get_or_insert(why);
    }
}

impl Sink for Recorder {
    fn entity_start(&mut self, level: &Level) {
        if level.index.is_some() {
            self.plan.entities.push(Record { class: Class::Pending, label: Label::Absent, eight_bit: false, long: false });
        }
        self.stack.push((level.index, Class::Pending, Label::Absent));
    }

    fn header_line(&mut self, _: HeaderLine) {
        self.col = 0;
    }

    fn header_bytes(&mut self, bytes: &[u8]) {
        self.col += bytes.len();
        self.plan.long |= self.col > LINE_LIMIT;
        if bytes.iter().any(|&b| b >= 0x80) {
            self.unconvertible(IN_HEADER);
        }
    }

    fn header_line_end(&mut self) {
        self.col = 0;
    }

    fn headers_end(&mut self, level: &Level, _: bool) {
        if let Some(r) = level.index.and_then(|i| self.plan.entities.get_mut(i)) {
            r.class = level.class;
            r.label = level.label;
        }
        if let Some(top) = self.stack.last_mut() {
            (top.1, top.2) = (level.class, level.label);
        }
        self.col = 0;
    }

    fn body_eol(&mut self) {
        self.col = 0;
    }

    fn body_bytes(&mut self, bytes: &[u8]) {
        self.col += bytes.len();
        let long = self.col > LINE_LIMIT;
        let eight = bytes.iter().any(|&b| b >= 0x80);
        let &(index, class, label) = self.stack.last().expect("an entity is open");
        match (index.and_then(|i| self.plan.entities.get_mut(i)), class) {
            (Some(r), Class::Text | Class::Other) => {
                let nul = bytes.contains(&0);
                r.eight_bit |= eight;
                r.long |= long || nul;
                self.plan.eight_bit |= eight;
                self.plan.long |= long || nul;
            }
            (tracked, class) => {
                let why = match class {
                    _ if tracked.is_none() => OPAQUE,
                    Class::Multipart | Class::Message => IN_CONTAINER,
                    Class::QuotedPrintable | Class::Base64 => IN_ENCODED,
                    _ if label == Label::Unknown => IN_ENCODED,
                    _ => OPAQUE,
                };
                self.plan.long |= long;
                if eight {
                    self.unconvertible(why);
                }
            }
        }
    }

    fn boundary(&mut self, _: bool, line: &[u8]) {
        self.plan.long |= line.len() > LINE_LIMIT;
        self.col = 0;
    }

    fn entity_end(&mut self, _: &Level) {
        self.stack.pop();
    }
}

// ---- pass 2: the writer ------------------------------------------------------------------

#[derive(Debug)]
enum Body {
    /// Passed on, lines over the limit broken with CRLF (`soft`: `=` CRLF, for
    /// quoted-printable).
    Pass {
        soft: bool,
    },
    Qp(QpEncoder),
    Base64(Base64Encoder),
}

#[derive(Debug)]
struct Out {
    message: bool,
    body: Body,
    /// The Content-Transfer-Encoding it gets, when that changes.
    label: Option<&'static str>,
    label_written: bool,
    mime_version: bool,
}

#[derive(Debug, Default)]
struct Writer {
    records: Vec<Record>,
    seven_bit: bool,
    out: Vec<u8>,
    stack: Vec<Out>,
    /// The output line of a header line being written, folded when it would pass the limit.
    fold: Vec<u8>,
    /// The current header field is an old Content-Transfer-Encoding, left out.
    dropping: bool,
    /// Octets of the current body output line (for [`Body::Pass`]), and whether it began with a
    /// dot (dot-stuffing adds one).
    col: usize,
    dot: bool,
}

impl Writer {
    fn top(&mut self) -> &mut Out {
        self.stack.last_mut().expect("an entity is open")
    }

    fn fold_push(&mut self, b: u8) {
        let limit = if self.fold.first() == Some(&b'.') { LINE_LIMIT - 1 } else { LINE_LIMIT };
        if self.fold.len() >= limit {
            // RFC 5322 §2.2.3: CRLF before whitespace, where something other than whitespace
            // comes before it; else (Postfix's smtp_line_length_limit) CRLF SP anywhere.
            let first = self.fold.iter().position(|&c| !is_wsp(c));
            let at = first.and_then(|f| (f + 1..self.fold.len()).rev().find(|&p| is_wsp(self.fold[p])));
            match at {
                Some(p) => {
                    self.out.extend_from_slice(&self.fold[..p]);
                    self.out.extend_from_slice(b"\r\n");
                    self.fold.drain(..p);
                }
                None => {
                    self.out.extend_from_slice(&self.fold);
                    self.out.extend_from_slice(b"\r\n");
                    self.fold.clear();
                    self.fold.push(b' ');
                }
            }
        }
        self.fold.push(b);
    }

    fn eol(&mut self) {
        self.out.extend_from_slice(b"\r\n");
        self.col = 0;
    }

    /// Body octets passed on, with a line break where a line would pass the limit.
    fn pass(&mut self, bytes: &[u8], soft: bool) {
        for &b in bytes {
            if self.col == 0 {
                self.dot = b == b'.';
            }
            let limit = LINE_LIMIT - usize::from(soft) - usize::from(self.dot);
            // Quoted-printable: an `=XX` escape is never cut.
            let need = if soft && b == b'=' { 3 } else { 1 };
            if self.col + need > limit {
                if soft {
                    self.out.push(b'=');
                }
                self.eol();
                self.dot = b == b'.';
            }
            self.out.push(b);
            self.col += 1;
        }
    }
}

impl Sink for Writer {
    fn entity_start(&mut self, level: &Level) {
        let record = level.index.and_then(|i| self.records.get(i));
        let seven = self.seven_bit;
        let relabel = |label: Label| match label {
            Label::EightBit | Label::Binary if seven => Some("7bit"),
            Label::Binary => Some("8bit"),
            _ => None,
        };
        let (body, label) = match record {
            Some(r) if r.label.identity() && (r.long || (seven && r.eight_bit)) && r.class == Class::Text => {
                (Body::Qp(QpEncoder::default()), Some("quoted-printable"))
            }
            Some(r) if r.label.identity() && (r.long || (seven && r.eight_bit)) && r.class == Class::Other => {
                (Body::Base64(Base64Encoder::default()), Some("base64"))
            }
            Some(r) if matches!(r.class, Class::Text | Class::Other | Class::Multipart | Class::Message) => {
                (Body::Pass { soft: false }, relabel(r.label))
            }
            Some(r) => (Body::Pass { soft: r.class == Class::QuotedPrintable }, None),
            None => (Body::Pass { soft: false }, None),
        };
        self.stack.push(Out { message: level.message, body, label, label_written: false, mime_version: false });
    }

    fn header_line(&mut self, kind: HeaderLine) {
        match kind {
            HeaderLine::Continuation => {}
            HeaderLine::Field(Field::TransferEncoding) if self.top().label.is_some() => {
                self.dropping = true;
                let top = self.top();
                if !std::mem::replace(&mut top.label_written, true) {
                    let label = top.label.expect("checked");
                    self.out.extend_from_slice(format!("Content-Transfer-Encoding: {label}\r\n").as_bytes());
                }
            }
            HeaderLine::Field(field) => {
                self.dropping = false;
                if field == Field::MimeVersion {
                    self.top().mime_version = true;
                }
            }
        }
    }

    fn header_bytes(&mut self, bytes: &[u8]) {
        if !self.dropping {
            for &b in bytes {
                self.fold_push(b);
            }
        }
    }

    fn header_line_end(&mut self) {
        if !self.dropping {
            self.out.append(&mut self.fold);
            self.out.extend_from_slice(b"\r\n");
        }
    }

    fn headers_end(&mut self, _: &Level, blank: bool) {
        self.dropping = false;
        let top = self.stack.last_mut().expect("an entity is open");
        let encoded = !matches!(top.body, Body::Pass { .. });
        if encoded && !top.label_written {
            let label = top.label.expect("an encoded body has a label");
            self.out.extend_from_slice(format!("Content-Transfer-Encoding: {label}\r\n").as_bytes());
            top.label_written = true;
        }
        if encoded && top.message && !top.mime_version {
            // RFC 2045 §4: what says how the body is encoded is MIME.
            self.out.extend_from_slice(b"MIME-Version: 1.0\r\n");
        }
        // A header block that ended without a blank line gets one when its body is encoded,
        // so that the encoded text cannot be read as header fields.
        if blank || encoded {
            self.eol();
        }
        self.col = 0;
    }

    fn body_eol(&mut self) {
        let Writer { stack, out, .. } = self;
        match &mut stack.last_mut().expect("an entity is open").body {
            Body::Qp(q) => q.eol(out),
            Body::Base64(e) => e.feed(b"\r\n", out),
            Body::Pass { .. } => self.eol(),
        }
    }

    fn body_bytes(&mut self, bytes: &[u8]) {
        let Writer { stack, out, .. } = self;
        match &mut stack.last_mut().expect("an entity is open").body {
            Body::Qp(q) => q.feed(bytes, out),
            Body::Base64(e) => e.feed(bytes, out),
            Body::Pass { soft } => {
                let soft = *soft;
                self.pass(bytes, soft);
            }
        }
    }

    fn boundary(&mut self, eol: bool, line: &[u8]) {
        if eol {
            self.out.extend_from_slice(b"\r\n");
        }
        // Whitespace after a boundary is transport padding (RFC 2046 §5.1.1).
        let line = if line.len() > LINE_LIMIT { &line[..line.iter().rposition(|&b| !is_wsp(b)).map_or(0, |e| e + 1)] } else { line };
        self.out.extend_from_slice(line);
        self.eol();
    }

    fn entity_end(&mut self, _: &Level) {
        let mut top = self.stack.pop().expect("an entity is open");
        match &mut top.body {
            Body::Qp(q) => q.finish(&mut self.out),
            Body::Base64(e) => e.finish(&mut self.out),
            Body::Pass { .. } => {}
        }
    }
}

// ---- encoders ----------------------------------------------------------------------------

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Quoted-printable (RFC 2045 §6.7) of text, line by line: every CRLF of the content is a hard
/// line break; lines are at most 76 characters, soft line breaks included.
#[derive(Debug, Default)]
struct QpEncoder {
    col: usize,
    /// A space or tab not yet written: encoded if the line ends after it (rule 3).
    space: Option<u8>,
}

impl QpEncoder {
    fn token(&mut self, t: &[u8], out: &mut Vec<u8>) {
        if self.col + t.len() > ENCODED_LINE - 1 {
            out.extend_from_slice(b"=\r\n");
            self.col = 0;
        }
        out.extend_from_slice(t);
        self.col += t.len();
    }

    fn escaped(&mut self, b: u8, out: &mut Vec<u8>) {
        self.token(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]], out);
    }

    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        for &b in bytes {
            if let Some(s) = self.space.take() {
                self.token(&[s], out);
            }
            match b {
                b' ' | b'\t' => self.space = Some(b),
                // A line that a soft break leaves starting with `-` could read as a boundary.
                b'-' if self.col + 1 > ENCODED_LINE - 1 => self.escaped(b, out),
                33..=60 | 62..=126 => self.token(&[b], out),
                _ => self.escaped(b, out),
            }
        }
    }

    fn flush_space(&mut self, out: &mut Vec<u8>) {
        if let Some(s) = self.space.take() {
            self.escaped(s, out);
        }
    }

    fn eol(&mut self, out: &mut Vec<u8>) {
        self.flush_space(out);
        out.extend_from_slice(b"\r\n");
        self.col = 0;
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        self.flush_space(out);
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 (RFC 2045 §6.8) in lines of 76 characters.
#[derive(Debug, Default)]
struct Base64Encoder {
    group: [u8; 3],
    n: usize,
    col: usize,
}

impl Base64Encoder {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        for &b in bytes {
            self.group[self.n] = b;
            self.n += 1;
            if self.n == 3 {
                self.quad(3, out);
            }
        }
    }

    fn quad(&mut self, n: usize, out: &mut Vec<u8>) {
        if self.col >= ENCODED_LINE {
            out.extend_from_slice(b"\r\n");
            self.col = 0;
        }
        let [a, b, c] = self.group;
        let v = (u32::from(a) << 16) | (u32::from(b) << 8) | u32::from(c);
        for i in 0..4 {
            out.push(if i <= n { BASE64[((v >> (18 - 6 * i)) & 63) as usize] } else { b'=' });
        }
        self.col += 4;
        self.group = [0; 3];
        self.n = 0;
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.n > 0 {
            self.quad(self.n, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Convert `message` for a host with or without 8BITMIME, fed in chunks of `chunk` octets;
    /// `Err` when it cannot go to a host without 8BITMIME.
    fn convert_in(message: &[u8], seven_bit: bool, chunk: usize) -> Result<Vec<u8>, &'static str> {
        let plan = Plan::of(message);
        if seven_bit && let Some(why) = plan.unconvertible() {
            return Err(why);
        }
        let mut c = Converter::new(&plan, seven_bit);
        let mut out = Vec::new();
        for piece in message.chunks(chunk.max(1)) {
            c.feed(piece, &mut out);
        }
        c.finish(&mut out);
        Ok(out)
    }

    /// The same in every chunking.
    fn convert(message: &[u8], seven_bit: bool) -> Result<Vec<u8>, &'static str> {
        let whole = convert_in(message, seven_bit, message.len());
        for chunk in [1, 2, 3, 7, 64, 1000] {
            assert_eq!(convert_in(message, seven_bit, chunk), whole, "chunks of {chunk}");
        }
        whole
    }

    fn seven(message: &[u8]) -> Vec<u8> {
        let out = convert(message, true).expect("convertible");
        assert_wire_clean(&out, true);
        out
    }

    /// 7-bit when asked, and no line over the limit.
    fn assert_wire_clean(out: &[u8], seven_bit: bool) {
        if seven_bit {
            assert!(out.iter().all(|&b| b < 128), "8-bit octets left: {}", String::from_utf8_lossy(out));
        }
        for line in out.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(line.len() <= LINE_LIMIT, "a line of {} octets", line.len());
        }
    }

    fn qp_decode(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut lines = text.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let mut end = line.len();
            while end > 0 && is_wsp(line[end - 1]) {
                end -= 1;
            }
            let line = &line[..end];
            let (line, soft) = match line.strip_suffix(b"=") {
                Some(l) => (l, true),
                None => (line, false),
            };
            let mut i = 0;
            while i < line.len() {
                if line[i] == b'=' && i + 3 <= line.len() {
                    let hex = std::str::from_utf8(&line[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                } else {
                    out.push(line[i]);
                    i += 1;
                }
            }
            if !soft && lines.peek().is_some() {
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    fn b64_decode(text: &[u8]) -> Vec<u8> {
        let clean: Vec<u8> = text.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
        mail_proto::sasl::decode(&clean).expect("base64")
    }

    /// The header block and the body of an entity.
    fn split(entity: &[u8]) -> (&[u8], &[u8]) {
        let at = entity.windows(4).position(|w| w == b"\r\n\r\n").expect("a blank line");
        (&entity[..at + 2], &entity[at + 4..])
    }

    #[test]
    fn seven_bit_message_goes_unchanged() {
        let m = b"From: a@x.test\r\nSubject: plain\r\n\r\nHello.\r\n.dot\r\n";
        let plan = Plan::of(m);
        assert!(!plan.eight_bit() && !plan.long_lines() && plan.unconvertible().is_none());
        assert!(!Converter::new(&plan, true).converts());
        assert_eq!(convert(m, true).unwrap(), m);
        assert_eq!(convert(m, false).unwrap(), m);
    }

    #[test]
    fn eight_bit_message_unchanged_for_8bitmime_host() {
        let m = "Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n".as_bytes();
        let plan = Plan::of(m);
        assert!(plan.eight_bit() && !plan.long_lines());
        assert!(!Converter::new(&plan, false).converts());
        assert_eq!(convert(m, false).unwrap(), m);
    }

    #[test]
    fn eight_bit_text_becomes_quoted_printable() {
        let m = "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nX-After: y\r\n\r\nGrüße, a=b \r\nend\t\r\n"
            .as_bytes();
        let out = seven(m);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\
             X-After: y\r\n\r\nGr=C3=BC=C3=9Fe, a=3Db=20\r\nend=09\r\n"
        );
    }

    #[test]
    fn message_without_mime_headers_gets_them() {
        let m = b"Subject: x\r\n\r\ncaf\xe9\r\n";
        let out = seven(m);
        assert_eq!(out, b"Subject: x\r\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\ncaf=E9\r\n");
        assert_eq!(qp_decode(split(&out).1), b"caf\xe9\r\n");
    }

    #[test]
    fn eight_bit_octet_stream_becomes_base64() {
        let data: Vec<u8> = (0u8..=255).filter(|&b| b != b'\r' && b != b'\n').cycle().take(300).collect();
        let mut m = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n".to_vec();
        m.extend_from_slice(&data);
        let out = seven(&m);
        let (head, body) = split(&out);
        assert_eq!(head, b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\nMIME-Version: 1.0\r\n");
        assert!(body.split(|&b| b == b'\n').all(|l| l.len() <= 77), "76 characters a line");
        assert_eq!(b64_decode(body), data);
    }

    #[test]
    fn nested_multipart_converts_only_what_must_change() {
        let m = b"From: a@x.test\r\n\
            MIME-Version: 1.0\r\n\
            Content-Type: multipart/mixed; boundary=\"outer\"\r\n\
            Content-Transfer-Encoding: 8bit\r\n\
            \r\n\
            preamble\r\n\
            --outer\r\n\
            Content-Type: multipart/alternative; boundary=inner\r\n\
            \r\n\
            --inner\r\n\
            Content-Type: text/plain; charset=iso-8859-1\r\n\
            Content-Transfer-Encoding: 8bit\r\n\
            \r\n\
            caf\xe9\r\n\
            --inner\r\n\
            Content-Type: text/html\r\n\
            Content-Transfer-Encoding: 8bit\r\n\
            \r\n\
            <p>plain ascii</p>\r\n\
            --inner--\r\n\
            --outer\r\n\
            Content-Type: application/octet-stream\r\n\
            \r\n\
            \x80\x81\xff\r\n\
            --outer\r\n\
            Content-Type: message/rfc822\r\n\
            \r\n\
            Subject: inner message\r\n\
            \r\n\
            na\xefve\r\n\
            --outer--\r\n\
            epilogue\r\n";
        let out = seven(m);
        let want: &[u8] = b"From: a@x.test\r\n\
            MIME-Version: 1.0\r\n\
            Content-Type: multipart/mixed; boundary=\"outer\"\r\n\
            Content-Transfer-Encoding: 7bit\r\n\
            \r\n\
            preamble\r\n\
            --outer\r\n\
            Content-Type: multipart/alternative; boundary=inner\r\n\
            \r\n\
            --inner\r\n\
            Content-Type: text/plain; charset=iso-8859-1\r\n\
            Content-Transfer-Encoding: quoted-printable\r\n\
            \r\n\
            caf=E9\r\n\
            --inner\r\n\
            Content-Type: text/html\r\n\
            Content-Transfer-Encoding: 7bit\r\n\
            \r\n\
            <p>plain ascii</p>\r\n\
            --inner--\r\n\
            --outer\r\n\
            Content-Type: application/octet-stream\r\n\
            Content-Transfer-Encoding: base64\r\n\
            \r\n\
            gIH/\r\n\
            --outer\r\n\
            Content-Type: message/rfc822\r\n\
            \r\n\
            Subject: inner message\r\n\
            Content-Transfer-Encoding: quoted-printable\r\n\
            MIME-Version: 1.0\r\n\
            \r\n\
            na=EFve\r\n\
            --outer--\r\n\
            epilogue\r\n";
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(want));
        // For a host with 8BITMIME nothing changes: no long lines.
        assert_eq!(convert(m, false).unwrap(), m);
    }

    #[test]
    fn digest_parts_are_messages_and_outer_boundaries_close_inner_parts() {
        // The inner multipart never closes: the outer boundary ends it.
        let m = b"Content-Type: multipart/mixed; boundary=o\r\n\r\n\
            --o\r\n\
            Content-Type: multipart/digest; boundary=d\r\n\r\n\
            --d\r\n\
            \r\n\
            Subject: digested\r\n\
            \r\n\
            \xe9t\xe9\r\n\
            --o\r\n\
            Content-Type: text/plain\r\n\
            \r\n\
            fin\xe9\r\n\
            --o--\r\n";
        let out = String::from_utf8(seven(m)).unwrap();
        assert!(
            out.contains("\r\nSubject: digested\r\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\n=E9t=E9\r\n--o\r\n"),
            "{out}"
        );
        assert!(out.contains("Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nfin=E9\r\n--o--"), "{out}");
    }

    #[test]
    fn five_thousand_octet_line_goes_quoted_printable_to_any_host() {
        let line: Vec<u8> = (0..5000).map(|i| b"abcdefghij =\t"[i % 13]).collect();
        let mut m = b"Subject: long\r\n\r\nfirst\r\n".to_vec();
        m.extend_from_slice(&line);
        m.extend_from_slice(b"\r\nlast\r\n");
        let plan = Plan::of(&m);
        assert!(plan.long_lines() && !plan.eight_bit());
        for seven_bit in [false, true] {
            let out = convert(&m, seven_bit).unwrap();
            assert_wire_clean(&out, seven_bit);
            let (head, body) = split(&out);
            assert_eq!(head, b"Subject: long\r\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n");
            assert!(body.split(|&b| b == b'\n').all(|l| l.len() <= 77), "QP lines are at most 76");
            assert_eq!(qp_decode(body), split(&m).1);
        }
    }

    #[test]
    fn long_line_in_an_attachment_goes_base64_and_the_rest_stays() {
        let mut m = "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n--b\r\nContent-Type: application/json\r\n\r\n".as_bytes().to_vec();
        let json: Vec<u8> = std::iter::repeat_n(&b"{\"k\":1},"[..], 700).flatten().copied().collect();
        m.extend_from_slice(&json);
        m.extend_from_slice(b"\r\n--b--\r\n");
        // An 8BITMIME host keeps the 8-bit text as it is; the JSON line is too long for anyone.
        let out = convert(&m, false).unwrap();
        assert_wire_clean(&out, false);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.contains("Content-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n--b\r\n"), "{text}");
        let at = text.find("Content-Type: application/json\r\nContent-Transfer-Encoding: base64\r\n\r\n").expect("base64 attachment");
        let body = &text[at..].split_once("\r\n\r\n").unwrap().1;
        let body = body.strip_suffix("\r\n--b--\r\n").unwrap();
        assert_eq!(b64_decode(body.as_bytes()), json);
    }

    #[test]
    fn long_header_lines_are_folded_at_whitespace_or_split() {
        let words = "word ".repeat(400);
        let token = "x".repeat(2500);
        let m = format!("Subject: {words}\r\nX-Token: {token}\r\n\r\nbody\r\n");
        let out = String::from_utf8(convert(m.as_bytes(), false).unwrap()).unwrap();
        assert_wire_clean(out.as_bytes(), true);
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "body\r\n");
        // Unfolding (RFC 5322 §2.2.3) gives the Subject back; the token has spaces inserted.
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t");
        assert!(unfolded.starts_with(&format!("Subject: {}", words.trim_end())), "{unfolded}");
        let token_back: String = unfolded.split("X-Token: ").nth(1).unwrap().chars().filter(|c| *c != ' ').collect();
        assert_eq!(token_back, token);
        assert!(head.lines().skip(1).all(|l| l.starts_with(' ') || l.starts_with("Subject") || l.starts_with("X-Token")), "{head}");
    }

    #[test]
    fn already_encoded_parts_get_line_breaks_only() {
        let b64 = "QUJD".repeat(400);
        let qp = "a=3D".repeat(400);
        let m = format!(
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Transfer-Encoding: base64\r\nContent-Type: image/png\r\n\r\n{b64}\r\n\
             --b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{qp}\r\n--b--\r\n"
        );
        let out = String::from_utf8(convert(m.as_bytes(), false).unwrap()).unwrap();
        assert_wire_clean(out.as_bytes(), true);
        let parts: Vec<&str> = out.split("--b").collect();
        let b64_body = parts[1].split_once("\r\n\r\n").unwrap().1;
        assert_eq!(b64_decode(b64_body.as_bytes()), b"ABC".repeat(400));
        let qp_body = parts[2].split_once("\r\n\r\n").unwrap().1.strip_suffix("\r\n").unwrap();
        assert_eq!(qp_decode(qp_body.as_bytes()), b"a=".repeat(400));
        assert!(!qp_body.contains("=\r\n3D") && !qp_body.contains("=3\r\n"), "an escape was cut");
    }

    #[test]
    fn what_cannot_be_converted() {
        let cases: [(&[u8], &str); 4] = [
            (b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n", IN_HEADER),
            (b"Content-Type: multipart/mixed; boundary=b\r\n\r\npre\xe9\r\n--b\r\n\r\nx\r\n--b--\r\n", IN_CONTAINER),
            (b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf\xe9\r\n", IN_ENCODED),
            (b"Content-Transfer-Encoding: x-uuencode\r\n\r\ncaf\xe9\r\n", IN_ENCODED),
        ];
        for (m, why) in cases {
            assert_eq!(convert(m, true), Err(why), "{}", String::from_utf8_lossy(m));
            // A host with 8BITMIME takes them as they are.
            assert_eq!(convert(m, false).unwrap(), m);
        }
    }

    #[test]
    fn nul_means_encoding_even_for_8bitmime() {
        let m = b"Content-Type: application/x-thing\r\n\r\na\0b\r\n";
        let out = String::from_utf8(convert(m, false).unwrap()).unwrap();
        assert!(out.ends_with("Content-Transfer-Encoding: base64\r\nMIME-Version: 1.0\r\n\r\nYQBiDQo="), "{out}");
    }

    #[test]
    fn part_without_header_or_blank_line() {
        // A part with no header fields; and one whose first line is not a header field.
        let m = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n\xe9\r\n--b\r\nnot a header \xe9\r\n--b--\r\n";
        let out = String::from_utf8(seven(m)).unwrap();
        assert_eq!(
            out,
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n\
             --b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nnot a header =E9\r\n--b--\r\n"
        );
    }

    #[test]
    fn bare_line_endings_and_a_last_line_without_crlf() {
        let m = b"Subject: x\n\ncaf\xe9\rend";
        let out = seven(m);
        assert_eq!(out, b"Subject: x\r\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\ncaf=E9\r\nend");
    }

    #[test]
    fn field_names_and_empty_encodings() {
        // A line of name characters longer than the line head is not a header field.
        let name = "N".repeat(HEAD_MAX + 10);
        let m = format!("Subject: x\r\n{name}: y\r\n\r\ncaf\u{e9}\r\n");
        let out = String::from_utf8(seven(m.as_bytes())).unwrap();
        assert!(
            out.starts_with(&format!("Subject: x\r\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\n{}", &name[..75])),
            "{out}"
        );
        // An empty Content-Transfer-Encoding is none at all; the field is replaced.
        let m = b"Content-Transfer-Encoding: \r\nSubject: x\r\n\r\ncaf\xe9\r\n";
        assert_eq!(seven(m), b"Content-Transfer-Encoding: quoted-printable\r\nSubject: x\r\nMIME-Version: 1.0\r\n\r\ncaf=E9\r\n");
    }

    #[test]
    fn boundary_look_alikes_are_content() {
        let m = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n--bx \xe9\r\n--b \t\r\n\r\nz\r\n--b-- \r\n--b\r\nepilogue\r\n";
        let out = String::from_utf8(seven(m)).unwrap();
        assert_eq!(
            out,
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n--bx =E9\r\n\
             --b \t\r\n\r\nz\r\n--b-- \r\n--b\r\nepilogue\r\n"
        );
    }

    #[test]
    fn content_type_parsing() {
        let ct = |v: &str| parse_content_type(v.as_bytes());
        assert_eq!(
            ct(" Multipart/Mixed (comment; boundary=no) ;\r\n\tcharset=x; BOUNDARY = \"a b;\\\"c\""),
            Some(ContentType { main: b"multipart".to_vec(), sub: b"mixed".to_vec(), boundary: Some(b"a b;\"c".to_vec()) })
        );
        assert_eq!(ct("text/plain").unwrap().boundary, None);
        assert_eq!(ct("multipart/mixed; boundary=abc def").unwrap().boundary, Some(b"abc".to_vec()));
        assert_eq!(ct("garbage"), None);
        assert_eq!(ct("/plain"), None);
        assert_eq!(first_token(b" (c) Base64 ; x"), b"Base64");
    }

    #[test]
    fn nesting_past_the_limit_is_opaque() {
        let mut m = Vec::new();
        for i in 0..MAX_DEPTH + 5 {
            m.extend_from_slice(format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n").as_bytes());
        }
        m.extend_from_slice(b"\r\n\xe9\r\n");
        let plan = Plan::of(&m);
        assert_eq!(plan.unconvertible(), Some(OPAQUE));
        // A plain deep message with 7-bit content still goes.
        let mut ok = m[..m.len() - 5].to_vec();
        ok.extend_from_slice(b"e\r\n");
        assert!(!Plan::of(&ok).eight_bit());
    }

    /// Deterministic pseudo-random messages: whatever is convertible comes out 7-bit (or keeps its
    /// 8-bit octets for an 8BITMIME host), with no line over the limit, the same in any chunking.
    #[test]
    fn random_messages_come_out_clean() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pieces: [&[u8]; 14] = [
            b"Content-Type: multipart/mixed; boundary=b\r\n",
            b"Content-Type: text/plain\r\n",
            b"Content-Type: application/pdf\r\n",
            b"Content-Type: message/rfc822\r\n",
            b"Content-Transfer-Encoding: 8bit\r\n",
            b"Content-Transfer-Encoding: base64\r\n",
            b"\r\n",
            b"--b\r\n",
            b"--b--\r\n",
            b"caf\xc3\xa9 text \r\n",
            b"x",
            b".dot\r\n",
            b"\t= \r\n",
            b"\xff",
        ];
        let (mut converted, mut refused) = (0, 0);
        for _ in 0..400 {
            let mut m = Vec::new();
            for _ in 0..(next() % 40) {
                let p = pieces[(next() % pieces.len() as u64) as usize];
                let times = if p == b"x" { (next() % 1500) as usize } else { 1 };
                for _ in 0..times {
                    m.extend_from_slice(p);
                }
            }
            for seven_bit in [false, true] {
                match convert_in(&m, seven_bit, 1 + (next() % 50) as usize) {
                    Ok(out) => {
                        assert_wire_clean(&out, seven_bit);
                        assert_eq!(Ok(&out), convert_in(&m, seven_bit, m.len()).as_ref());
                        converted += usize::from(out != m);
                    }
                    Err(_) => {
                        assert!(seven_bit);
                        refused += 1;
                    }
                }
            }
        }
        assert!(converted > 50 && refused > 50, "converted {converted}, refused {refused}");
    }

    #[test]
    fn encoders() {
        let mut out = Vec::new();
        let mut e = Base64Encoder::default();
        e.feed(b"Ma", &mut out);
        e.feed(b"n", &mut out);
        e.feed(b"Ma", &mut out);
        e.finish(&mut out);
        assert_eq!(out, b"TWFuTWE=");
        let mut out = Vec::new();
        let mut q = QpEncoder::default();
        q.feed(&[b'a'; 80], &mut out);
        q.eol(&mut out);
        assert_eq!(out, [&[b'a'; 75][..], b"=\r\n", &[b'a'; 5], b"\r\n"].concat());
    }
}
