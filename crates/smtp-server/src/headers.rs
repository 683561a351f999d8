//! The Message-ID and Date that submitted mail lacks (SPEC S3), sans-IO.
//!
//! [`HeaderGate`] holds the start of a submitted message back while its header section streams
//! in, however it is split across reads. When the section ends it tells which of the two fields
//! are missing and where they go, before a single byte of the message has been passed on. The
//! driver writes them in order with the rest, so they are added however large the message is
//! (the queue writes its first chunk long before the end of DATA, and could not insert then).

/// The most of a header section held back. A longer one is cut here: what was not seen by then
/// counts as absent, the missing fields go at the top of the message (where the position is
/// known) and everything streams on; a Message-ID or Date further down is then taken as body,
/// as Postfix does past its `header_size_limit`. One body chunk, so a session holds at most as
/// much again as the queue does.
pub const HEADER_HOLD_LIMIT: usize = 256 * 1024;

/// The header fields to add.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Missing {
    pub message_id: bool,
    pub date: bool,
}

impl Missing {
    pub fn any(self) -> bool {
        self.message_id || self.date
    }
}

/// The bytes held back, cut where the missing fields go: `head`, then the fields, then `tail`.
#[derive(Debug, PartialEq, Eq)]
pub struct Release {
    /// The header fields before the insertion point.
    pub head: Vec<u8>,
    pub missing: Missing,
    /// From the insertion point on: the empty line and whatever of the body came with it.
    pub tail: Vec<u8>,
}

/// Holds message bytes until the end of the header section is seen: the first empty line, or
/// the first line that is neither a header field nor a folded continuation (mail readers take
/// the body to start there, so the fields go before it). Lines end in LF, CRLF or not.
#[derive(Debug)]
pub struct HeaderGate {
    held: Vec<u8>,
    /// Where the line not yet complete starts in `held`.
    line_start: usize,
    /// How far that line has been searched for its end (each byte is looked at once).
    scanned: usize,
    seen: Missing,
    limit: usize,
}

impl Default for HeaderGate {
    fn default() -> Self {
        HeaderGate::with_limit(HEADER_HOLD_LIMIT)
    }
}

impl HeaderGate {
    pub fn with_limit(limit: usize) -> Self {
        HeaderGate { held: Vec::new(), line_start: 0, scanned: 0, seen: Missing::default(), limit }
    }

    /// Take the next message bytes. `None` while the header section goes on (all of it held);
    /// `Some` once it has ended, with everything held so far: the gate is then spent, and the
    /// bytes after these pass straight through.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Release> {
        self.held.extend_from_slice(bytes);
        while let Some(lf) = self.held[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + lf + 1;
            if end > self.limit {
                break;
            }
            let line = &self.held[self.line_start..end - 1];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match field_name(line) {
                Line::Field(name) => {
                    self.seen.message_id |= name.eq_ignore_ascii_case(b"message-id");
                    self.seen.date |= name.eq_ignore_ascii_case(b"date");
                }
                Line::Continuation => {}
                Line::End => return Some(self.release_at(self.line_start)),
            }
            self.line_start = end;
            self.scanned = end;
        }
        self.scanned = self.held.len();
        if self.held.len() > self.limit {
            // Too long to wait for its end (decided on the first `limit` bytes only, however they
            // were split): the fields go first, after the Received field.
            return Some(self.release_at(0));
        }
        None
    }

    /// DATA ended within the header section (a message without a body): the fields go last.
    pub fn finish(mut self) -> Release {
        // Decoded DATA ends in CRLF; if a line were left open the top is the safe place.
        let at = if self.line_start == self.held.len() { self.line_start } else { 0 };
        self.release_at(at)
    }

    fn release_at(&mut self, at: usize) -> Release {
        let tail = self.held.split_off(at);
        let missing = Missing { message_id: !self.seen.message_id, date: !self.seen.date };
        Release { head: std::mem::take(&mut self.held), missing, tail }
    }
}

enum Line<'a> {
    Field(&'a [u8]),
    Continuation,
    End,
}

/// One header line without its line ending (RFC 5322 §2.2, with the obsolete white space
/// before the colon of §4.5).
fn field_name(line: &[u8]) -> Line<'_> {
    match line.first() {
        None => return Line::End,
        Some(b' ' | b'\t') => return Line::Continuation,
        Some(_) => {}
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else { return Line::End };
    let name = line[..colon].trim_ascii_end();
    if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
        return Line::End;
    }
    Line::Field(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDED: &[u8] = b"<ADDED>";

    /// Feed `pieces` through a gate and put together what would be stored: the released bytes
    /// with `ADDED` where the fields go, then the rest. Also returns what was missing.
    fn run(pieces: &[&[u8]], limit: usize) -> (Vec<u8>, Missing) {
        let mut gate = Some(HeaderGate::with_limit(limit));
        let (mut out, mut missing) = (Vec::new(), None);
        let mut take = |r: Release, out: &mut Vec<u8>| {
            out.extend_from_slice(&r.head);
            if r.missing.any() {
                out.extend_from_slice(ADDED);
            }
            out.extend_from_slice(&r.tail);
            assert!(missing.replace(r.missing).is_none(), "released twice");
        };
        for piece in pieces {
            match gate.as_mut() {
                Some(g) => {
                    if let Some(r) = g.feed(piece) {
                        gate = None;
                        take(r, &mut out);
                    }
                }
                None => out.extend_from_slice(piece),
            }
        }
        if let Some(g) = gate {
            take(g.finish(), &mut out);
        }
        (out, missing.expect("released"))
    }

    /// The same result however the message is cut: whole, at every position into two pieces,
    /// and byte by byte.
    fn check(message: &[u8], want: &[u8], missing: Missing) {
        assert_eq!(run(&[message], HEADER_HOLD_LIMIT), (want.to_vec(), missing), "whole: {:?}", String::from_utf8_lossy(message));
        for cut in 0..=message.len() {
            let (a, b) = message.split_at(cut);
            assert_eq!(run(&[a, b], HEADER_HOLD_LIMIT), (want.to_vec(), missing), "cut at {cut}: {:?}", String::from_utf8_lossy(message));
        }
        let bytes: Vec<&[u8]> = message.chunks(1).collect();
        assert_eq!(run(&bytes, HEADER_HOLD_LIMIT), (want.to_vec(), missing), "byte by byte");
    }

    const BOTH: Missing = Missing { message_id: true, date: true };
    const NONE: Missing = Missing { message_id: false, date: false };

    #[test]
    fn fields_go_at_the_end_of_the_header_section() {
        check(b"From: a@b\r\nSubject: hi\r\n\r\nbody\r\n", b"From: a@b\r\nSubject: hi\r\n<ADDED>\r\nbody\r\n", BOTH);
        // The empty line comes first: no header fields at all.
        check(b"\r\nbody\r\n", b"<ADDED>\r\nbody\r\n", BOTH);
        // No body: at the end of the data.
        check(b"Subject: hi\r\n", b"Subject: hi\r\n<ADDED>", BOTH);
        check(b"", b"<ADDED>", BOTH);
        // Bare LF line ends count as line ends too.
        check(b"Subject: hi\n\nbody\n", b"Subject: hi\n<ADDED>\nbody\n", BOTH);
    }

    #[test]
    fn only_what_is_missing_and_names_are_case_insensitive() {
        let full = b"MESSAGE-id: <x@y>\r\ndate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n";
        check(full, full, NONE);
        check(b"Message-ID: <x@y>\r\n\r\nb\r\n", b"Message-ID: <x@y>\r\n<ADDED>\r\nb\r\n", Missing { message_id: false, date: true });
        check(b"DATE: Mon, 1 Jan 2024\r\n\r\nb\r\n", b"DATE: Mon, 1 Jan 2024\r\n<ADDED>\r\nb\r\n", Missing { message_id: true, date: false });
        // Obsolete syntax: white space before the colon.
        check(b"Message-ID : <x@y>\r\nDate\t: x\r\n\r\nb\r\n", b"Message-ID : <x@y>\r\nDate\t: x\r\n\r\nb\r\n", NONE);
    }

    #[test]
    fn lookalikes_do_not_count() {
        // Other fields, folded lines and the body may mention the names.
        let m =
            b"Resent-Date: x\r\nX-Message-ID: y\r\nDated: z\r\nSubject: a\r\n Date: b\r\n\tMessage-ID: <c@d>\r\n\r\nDate: e\r\nMessage-ID: <f@g>\r\n";
        let want = b"Resent-Date: x\r\nX-Message-ID: y\r\nDated: z\r\nSubject: a\r\n Date: b\r\n\tMessage-ID: <c@d>\r\n<ADDED>\r\nDate: e\r\nMessage-ID: <f@g>\r\n";
        check(m, want, BOTH);
    }

    #[test]
    fn a_line_that_is_no_header_field_ends_the_section() {
        check(b"Subject: a\r\nno colon here\r\nDate: x\r\n\r\n", b"Subject: a\r\n<ADDED>no colon here\r\nDate: x\r\n\r\n", BOTH);
        check(b"Subject: a\r\nbad name: x\r\n\r\n", b"Subject: a\r\n<ADDED>bad name: x\r\n\r\n", BOTH);
        check(b"Subject: a\r\n: no name\r\n\r\n", b"Subject: a\r\n<ADDED>: no name\r\n\r\n", BOTH);
        // A folded field keeps its continuation lines.
        check(b"Subject: a\r\n b\r\n\r\nc\r\n", b"Subject: a\r\n b\r\n<ADDED>\r\nc\r\n", BOTH);
    }

    #[test]
    fn a_header_section_beyond_the_limit_gets_the_fields_at_the_top() {
        let mut m = b"Date: early\r\n".to_vec();
        for i in 0..50 {
            m.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "f".repeat(40)).as_bytes());
        }
        let late = b"Message-ID: <late@x>\r\n\r\nbody\r\n";
        m.extend_from_slice(late);
        let limit = 1000;
        for size in [1, 7, 100, 999, 1001, m.len()] {
            let pieces: Vec<&[u8]> = m.chunks(size).collect();
            let (out, missing) = run(&pieces, limit);
            // The Date seen before the cut counts; the Message-ID after it does not.
            assert_eq!(missing, Missing { message_id: true, date: false }, "pieces of {size}");
            assert_eq!(out, [ADDED, &m].concat(), "pieces of {size}");
        }
        // Below the limit the same message is decided at its empty line.
        let (out, missing) = run(&[&m], m.len());
        assert_eq!(missing, NONE);
        assert_eq!(out, m);
    }

    #[test]
    fn held_bytes_are_bounded() {
        let mut gate = HeaderGate::with_limit(100);
        let r = (0..20).find_map(|_| gate.feed(b"no line end yet ")).expect("released at the limit");
        assert_eq!((r.head.len(), r.tail.len(), r.missing), (0, 112, BOTH));
        // Trickled a byte at a time, an endless line is looked at once, not once per byte.
        let mut gate = HeaderGate::default();
        let started = std::time::Instant::now();
        let n = (0..=HEADER_HOLD_LIMIT).position(|_| gate.feed(b"x").is_some()).expect("released at the limit");
        assert_eq!(n, HEADER_HOLD_LIMIT);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
