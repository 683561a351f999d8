//! The DATA phase decoder (RFC 5321 §4.1.1.4, §4.5.2): removes dot-stuffing and finds the end.
//!
//! Only `CRLF . CRLF` ends a message, and only when the CRLF before the dot really ended the
//! previous line. Bare CR or LF is either an error ([`LineEndings::Strict`], the default) or
//! rewritten to CRLF ([`LineEndings::NormaliseBareLf`]); in both modes a dot line that follows a
//! bare line ending never ends the message, so `<LF>.<LF>`, `<LF>.<CR><LF>` and `<CR>.<CR><LF>`
//! cannot smuggle a second message past us or past the next hop.

/// What to do with a CR or LF that is not part of a CRLF pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEndings {
    Strict,
    NormaliseBareLf,
}

/// Outcome of one [`DataDecoder::feed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataEvent {
    /// All of the input was consumed; the message goes on.
    NeedMore,
    /// `CRLF.CRLF` seen; `consumed` bytes of the input belonged to DATA, the rest are commands.
    End { consumed: usize },
    /// A bare CR or LF in strict mode; the message must be refused.
    BareLineEnding { consumed: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line; `after_crlf` = the previous line ended in a real CRLF.
    LineStart { after_crlf: bool },
    /// A dot at the start of a line.
    Dot { after_crlf: bool },
    /// `.` CR at the start of a line.
    DotCr { after_crlf: bool },
    /// Inside a line.
    Mid,
    /// A CR inside a line.
    Cr,
}

/// Streaming decoder for the bytes after `354`.
#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    endings: LineEndings,
}

impl DataDecoder {
    pub fn new(endings: LineEndings) -> Self {
        DataDecoder { state: State::LineStart { after_crlf: true }, endings }
    }

    /// Decode `input`, appending message bytes (CRLF line endings, dots unstuffed) to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> DataEvent {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Mid => {
                    // Fast path: copy the run up to the next CR or LF.
                    let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                    out.extend_from_slice(&input[i..i + run]);
                    i += run;
                    match input.get(i) {
                        Some(b'\r') => self.state = State::Cr,
                        Some(_) => {
                            if !self.bare(out) {
                                return DataEvent::BareLineEnding { consumed: i + 1 };
                            }
                        }
                        None => return DataEvent::NeedMore,
                    }
                    i += 1;
                }
                State::Cr => {
                    if b == b'\n' {
                        out.extend_from_slice(b"\r\n");
                        self.state = State::LineStart { after_crlf: true };
                        i += 1;
                    } else if !self.bare(out) {
                        return DataEvent::BareLineEnding { consumed: i };
                    }
                    // In normalise mode `b` is looked at again at the start of the new line.
                }
                State::LineStart { after_crlf } => {
                    if b == b'.' {
                        self.state = State::Dot { after_crlf };
                        i += 1;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot { after_crlf } => match b {
                    b'\r' => {
                        self.state = State::DotCr { after_crlf };
                        i += 1;
                    }
                    b'\n' => {
                        if !self.dot_line_not_end(out) {
                            return DataEvent::BareLineEnding { consumed: i + 1 };
                        }
                        i += 1;
                    }
                    // RFC 5321 §4.5.2: a leading dot is removed; the rest of the line is content.
                    _ => self.state = State::Mid,
                },
                State::DotCr { after_crlf } => {
                    if b == b'\n' && after_crlf {
                        self.state = State::LineStart { after_crlf: true };
                        return DataEvent::End { consumed: i + 1 };
                    }
                    if b == b'\n' {
                        out.extend_from_slice(b".\r\n");
                        self.state = State::LineStart { after_crlf: true };
                        i += 1;
                    } else if !self.dot_line_not_end(out) {
                        return DataEvent::BareLineEnding { consumed: i };
                    }
                }
            }
        }
        DataEvent::NeedMore
    }

    /// A bare CR or LF inside a line: false in strict mode, else a line break.
    fn bare(&mut self, out: &mut Vec<u8>) -> bool {
        if self.endings == LineEndings::Strict {
            return false;
        }
        out.extend_from_slice(b"\r\n");
        self.state = State::LineStart { after_crlf: false };
        true
    }

    /// A lone dot ended by a bare CR or LF: content, never the end of the message.
    fn dot_line_not_end(&mut self, out: &mut Vec<u8>) -> bool {
        if self.endings == LineEndings::Strict {
            return false;
        }
        out.extend_from_slice(b".\r\n");
        self.state = State::LineStart { after_crlf: false };
        true
    }
}

/// Watches the header section of a message as it streams past: counts `Received:` fields
/// (RFC 5321 §6.3 loop detection) and notes whether `Message-ID:` and `Date:` are present
/// (S3: submitted mail without them gets them). Stops looking at the first empty line.
#[derive(Debug, Default)]
pub struct ReceivedCounter {
    count: usize,
    message_id: bool,
    date: bool,
    prefix: Vec<u8>,
    mid_line: bool,
    body: bool,
}

impl ReceivedCounter {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.body {
                return;
            }
            if b == b'\n' {
                if !self.mid_line || self.prefix == b"\r" {
                    self.body = true;
                }
                self.prefix.clear();
                self.mid_line = false;
                continue;
            }
            self.mid_line = true;
            if self.prefix.len() < 11 {
                self.prefix.push(b);
                let p = self.prefix.as_slice();
                if p.eq_ignore_ascii_case(b"received:") {
                    self.count += 1;
                } else if p.eq_ignore_ascii_case(b"date:") {
                    self.date = true;
                } else if p.eq_ignore_ascii_case(b"message-id:") {
                    self.message_id = true;
                }
            }
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn has_message_id(&self) -> bool {
        self.message_id
    }

    pub fn has_date(&self) -> bool {
        self.date
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(endings: LineEndings, input: &[u8]) -> (DataEvent, Vec<u8>) {
        let mut d = DataDecoder::new(endings);
        let mut out = Vec::new();
        (d.feed(input, &mut out), out)
    }

    /// Feeds one byte at a time, to prove chunk boundaries do not matter.
    fn decode_bytewise(endings: LineEndings, input: &[u8]) -> (DataEvent, Vec<u8>) {
        let mut d = DataDecoder::new(endings);
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            match d.feed(std::slice::from_ref(b), &mut out) {
                DataEvent::NeedMore => {}
                DataEvent::End { consumed } => return (DataEvent::End { consumed: i + consumed }, out),
                DataEvent::BareLineEnding { consumed } => {
                    return (DataEvent::BareLineEnding { consumed: i + consumed }, out);
                }
            }
        }
        (DataEvent::NeedMore, out)
    }

    #[test]
    fn ends_at_crlf_dot_crlf_and_unstuffs() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.x\r\nbody\r\n.\r\nQUIT\r\n";
        for f in [decode, decode_bytewise] {
            let (ev, out) = f(LineEndings::Strict, input);
            assert_eq!(ev, DataEvent::End { consumed: input.len() - 6 });
            assert_eq!(out, b"Subject: x\r\n\r\n.leading dot\r\nx\r\nbody\r\n");
        }
    }

    #[test]
    fn empty_message() {
        assert_eq!(decode(LineEndings::Strict, b".\r\n"), (DataEvent::End { consumed: 3 }, vec![]));
    }

    #[test]
    fn smuggling_sequences_never_end_data_in_normalise_mode() {
        let smuggled: [&[u8]; 5] = [
            b"a\n.\nMAIL FROM:<x@y>\r\n",
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
        ];
        for s in smuggled {
            for f in [decode, decode_bytewise] {
                let (ev, out) = f(LineEndings::NormaliseBareLf, s);
                assert_eq!(ev, DataEvent::NeedMore, "{:?}", String::from_utf8_lossy(s));
                assert!(out.windows(2).all(|w| w != b"\r\r"), "{out:?}");
                assert!(!out.contains(&b'\n') || out.windows(2).filter(|w| w[1] == b'\n').all(|w| w[0] == b'\r'));
            }
        }
    }

    #[test]
    fn smuggling_sequences_are_errors_in_strict_mode() {
        let smuggled: [&[u8]; 5] = [b"a\n.\n", b"a\n.\r\n", b"a\r\n.\nMAIL", b"a\r.\r\n", b"a\r\n.\rMAIL"];
        for s in smuggled {
            for f in [decode, decode_bytewise] {
                let (ev, _) = f(LineEndings::Strict, s);
                assert!(matches!(ev, DataEvent::BareLineEnding { .. }), "{:?}", String::from_utf8_lossy(s));
            }
        }
    }

    #[test]
    fn normalised_message_still_needs_a_real_terminator() {
        let input = b"line one\nline two\n.\nstill data\r\n.\r\n";
        let (ev, out) = decode_bytewise(LineEndings::NormaliseBareLf, input);
        assert_eq!(ev, DataEvent::End { consumed: input.len() });
        assert_eq!(out, b"line one\r\nline two\r\n.\r\nstill data\r\n");
    }

    #[test]
    fn eight_bit_bytes_pass_through() {
        let input = "Grüße\r\n\u{00ff}\r\n.\r\n".as_bytes();
        let (_, out) = decode(LineEndings::Strict, input);
        assert_eq!(out, "Grüße\r\n\u{00ff}\r\n".as_bytes());
    }

    #[test]
    fn counts_received_headers_only_in_header_section() {
        let mut c = ReceivedCounter::default();
        for chunk in [&b"Received: a\r\nreceived: b\r\n\tcont\r\nSubj"[..], b"ect: x\r\nRECEIVED: c\r\n\r\nReceived: body\r\n"] {
            c.feed(chunk);
        }
        assert_eq!(c.count(), 3);
        assert!(!c.has_date() && !c.has_message_id());
        let mut c = ReceivedCounter::default();
        c.feed(b"DATE: x\r\nMessage-Id: <a@b>\r\n\r\nDate: body\r\n");
        assert!(c.has_date() && c.has_message_id());
    }
}
