//! Dot-stuffing for sending a stored message (RFC 1939 §3 for POP3, RFC 5321 §4.5.2 for SMTP),
//! and the TOP filter (RFC 1939 §7). Stored messages use CRLF line endings.

/// Streaming dot-stuffer: feed stored bytes in any chunks, then [`DotStuffer::finish`].
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer { at_line_start: true }
    }
}

impl DotStuffer {
    pub fn stuff(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut start = 0;
        for (i, &b) in input.iter().enumerate() {
            if self.at_line_start && b == b'.' {
                out.extend_from_slice(&input[start..i]);
                out.push(b'.');
                start = i;
            }
            self.at_line_start = b == b'\n';
        }
        out.extend_from_slice(&input[start..]);
    }

    /// The terminating `.` line, with a CRLF first if the message did not end with one.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.at_line_start = true;
    }
}

/// Passes the header section, the blank line, then `n` body lines (POP3 TOP).
#[derive(Debug)]
pub struct TopFilter {
    in_header: bool,
    line_empty: bool,
    body_lines_left: u64,
    done: bool,
}

impl TopFilter {
    pub fn new(body_lines: u64) -> Self {
        TopFilter { in_header: true, line_empty: true, body_lines_left: body_lines, done: false }
    }

    /// The prefix of `input` that belongs in the TOP answer; after it returns a shorter slice
    /// than it was given, [`TopFilter::is_done`] is true.
    pub fn filter<'a>(&mut self, input: &'a [u8]) -> &'a [u8] {
        if self.done {
            return &input[..0];
        }
        for (i, &b) in input.iter().enumerate() {
            if self.in_header {
                if b == b'\n' {
                    if self.line_empty {
                        self.in_header = false;
                        if self.body_lines_left == 0 {
                            self.done = true;
                            return &input[..=i];
                        }
                    }
                    self.line_empty = true;
                } else if b != b'\r' {
                    self.line_empty = false;
                }
            } else if b == b'\n' {
                self.body_lines_left -= 1;
                if self.body_lines_left == 0 {
                    self.done = true;
                    return &input[..=i];
                }
            }
        }
        input
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffs_leading_dots_across_chunks() {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        s.stuff(b".a\r\nb.\r", &mut out);
        s.stuff(b"\n.", &mut out);
        s.stuff(b"\r\n", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"..a\r\nb.\r\n..\r\n.\r\n");
    }

    #[test]
    fn finish_adds_missing_crlf() {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        s.stuff(b"no newline", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"no newline\r\n.\r\n");
    }

    #[test]
    fn top_zero_and_two_lines() {
        let msg = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        let mut t = TopFilter::new(0);
        assert_eq!(t.filter(msg), b"A: 1\r\nB: 2\r\n\r\n");
        assert!(t.is_done());
        let mut t = TopFilter::new(2);
        let mut got = t.filter(&msg[..8]).to_vec();
        got.extend_from_slice(t.filter(&msg[8..]));
        assert_eq!(got, b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n");
    }
}
