//! CHUNKING (RFC 3030): the `BDAT` command's arguments and the decoder for chunk octets.
//!
//! A BDAT chunk is framed by its size alone: exactly that many octets follow the command line,
//! with no dot-stuffing and no end-of-data line, so nothing inside a chunk can end the message
//! or start a command. The octets are still message content, and a stored message is kept to
//! the rules every other part of Postroom relies on (CRLF line endings, SPEC S5): what the
//! message goes on to (the mailbox, a POP3 client, the next hop by DATA) would otherwise see
//! bare CR or LF that DATA never lets in. So [`ChunkDecoder`] applies the same
//! [`LineEndings`] rule as the DATA decoder: [`LineEndings::Strict`] notes a bare CR or LF (the
//! message is refused), [`LineEndings::NormaliseBareLf`] rewrites it to CRLF. A CRLF split
//! across two chunks is one line ending.

use crate::data::LineEndings;

/// The longest chunk size accepted in `BDAT <size>`: 20 digits fit in a u64 only up to here.
const MAX_SIZE_DIGITS: usize = 20;

/// `BDAT <chunk-size> [LAST]` (RFC 3030 §2), the arguments after the verb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdat {
    pub size: u64,
    pub last: bool,
}

/// Parse the arguments of BDAT: a decimal size, then optionally `LAST` (any case), separated by
/// single or repeated spaces; nothing else. `None` for anything else — the chunk's length is
/// then unknown.
pub fn parse_bdat(args: &[u8]) -> Option<Bdat> {
    let text = std::str::from_utf8(args).ok()?;
    let mut words = text.split(' ').filter(|w| !w.is_empty());
    let size = words.next()?;
    if size.len() > MAX_SIZE_DIGITS || !size.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let size = size.parse::<u64>().ok()?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    words.next().is_none().then_some(Bdat { size, last })
}

/// Streaming line-ending check of chunk octets, fed in any pieces across any number of chunks,
/// then [`ChunkDecoder::finish`] at the `LAST` chunk.
#[derive(Debug)]
pub struct ChunkDecoder {
    endings: LineEndings,
    /// The previous piece ended in CR: a CRLF if the next octet is LF.
    cr_pending: bool,
    /// The last octet passed on ended a line (or nothing has been passed on).
    at_line_start: bool,
    bare_line_ending: bool,
}

impl ChunkDecoder {
    pub fn new(endings: LineEndings) -> Self {
        ChunkDecoder { endings, cr_pending: false, at_line_start: true, bare_line_ending: false }
    }

    /// Append the content of `input` to `out`: unchanged but for bare CR or LF, which in
    /// normalise mode become CRLF and in strict mode are passed on and noted.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        if self.cr_pending && !input.is_empty() {
            self.cr_pending = false;
            if input[0] == b'\n' {
                out.extend_from_slice(b"\r\n");
                self.at_line_start = true;
                i = 1;
            } else {
                self.bare(b"\r", out);
            }
        }
        while i < input.len() {
            let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
            if run > 0 {
                out.extend_from_slice(&input[i..i + run]);
                self.at_line_start = false;
                i += run;
            }
            match input.get(i) {
                None => break,
                Some(b'\r') => match input.get(i + 1) {
                    Some(b'\n') => {
                        out.extend_from_slice(b"\r\n");
                        self.at_line_start = true;
                        i += 2;
                    }
                    Some(_) => {
                        self.bare(b"\r", out);
                        i += 1;
                    }
                    None => {
                        self.cr_pending = true;
                        i += 1;
                    }
                },
                Some(_) => {
                    self.bare(b"\n", out);
                    i += 1;
                }
            }
        }
    }

    /// The end of the message: a CR left at the end is bare, and a last line without a line
    /// ending gets CRLF (a stored message is lines, as after DATA).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.cr_pending) {
            self.bare(b"\r", out);
        }
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
            self.at_line_start = true;
        }
    }

    /// A bare CR or LF was seen (strict mode: the message must be refused).
    pub fn saw_bare_line_ending(&self) -> bool {
        self.bare_line_ending
    }

    fn bare(&mut self, octet: &[u8], out: &mut Vec<u8>) {
        match self.endings {
            LineEndings::Strict => {
                self.bare_line_ending = true;
                out.extend_from_slice(octet);
                self.at_line_start = false;
            }
            LineEndings::NormaliseBareLf => {
                out.extend_from_slice(b"\r\n");
                self.at_line_start = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(endings: LineEndings, pieces: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut d = ChunkDecoder::new(endings);
        let mut out = Vec::new();
        for p in pieces {
            d.feed(p, &mut out);
        }
        d.finish(&mut out);
        (out, d.saw_bare_line_ending())
    }

    #[test]
    fn bdat_arguments() {
        assert_eq!(parse_bdat(b"100"), Some(Bdat { size: 100, last: false }));
        assert_eq!(parse_bdat(b"0 LAST"), Some(Bdat { size: 0, last: true }));
        assert_eq!(parse_bdat(b"  7   last "), Some(Bdat { size: 7, last: true }));
        assert_eq!(parse_bdat(b"18446744073709551615 LAST"), Some(Bdat { size: u64::MAX, last: true }));
        for bad in [&b""[..], b"LAST", b"-1", b"+5", b"1e3", b"10 LAST x", b"10 FIRST", b"18446744073709551616", b"000000000000000000001", b"\xff"] {
            assert_eq!(parse_bdat(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn content_with_crlf_passes_unchanged_in_any_split() {
        let msg = b"Subject: x\r\n\r\n.leading dot\r\n..two\r\n.\r\n\x00\xff binary-ish\r\n";
        for endings in [LineEndings::Strict, LineEndings::NormaliseBareLf] {
            for cut in 0..msg.len() {
                for cut2 in cut..msg.len() {
                    let (out, bare) = decode(endings, &[&msg[..cut], &msg[cut..cut2], &msg[cut2..]]);
                    assert_eq!(out, msg, "cut at {cut}/{cut2}");
                    assert!(!bare);
                }
            }
        }
    }

    #[test]
    fn bare_line_endings_are_noted_in_strict_mode() {
        for bad in [&b"a\nb\r\n"[..], b"a\rb\r\n", b"a\r", b"a\n.\nMAIL FROM:<x@y>\r\n"] {
            let (_, bare) = decode(LineEndings::Strict, &[bad]);
            assert!(bare, "{bad:?}");
        }
        // A CRLF split between two chunks is not bare.
        assert_eq!(decode(LineEndings::Strict, &[b"a\r", b"\nb\r\n"]), (b"a\r\nb\r\n".to_vec(), false));
    }

    #[test]
    fn bare_line_endings_become_crlf_in_normalise_mode() {
        assert_eq!(decode(LineEndings::NormaliseBareLf, &[b"a\nb\rc\r", b"d\n"]).0, b"a\r\nb\r\nc\r\nd\r\n");
        assert_eq!(decode(LineEndings::NormaliseBareLf, &[b"a\r"]).0, b"a\r\n");
    }

    #[test]
    fn a_last_line_without_crlf_gets_one_and_empty_stays_empty() {
        assert_eq!(decode(LineEndings::Strict, &[b"Subject: x\r\n\r\nno end"]), (b"Subject: x\r\n\r\nno end\r\n".to_vec(), false));
        assert_eq!(decode(LineEndings::Strict, &[b"", b""]), (Vec::new(), false));
    }
}
