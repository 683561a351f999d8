//! Parsing SMTP replies received by Postroom's client (RFC 5321 §4.2, enhanced codes RFC 3463).
//!
//! [`parse_reply`] finds one complete reply, single- or multi-line, at the start of a buffer and
//! says how many bytes it used, or that more bytes are needed. Lines end in CRLF; a bare LF is
//! accepted too (some servers send them). The text is for logs, journals and DSNs, so control
//! characters in it (a stray CR, NUL, ESC …) are replaced by spaces: nothing a remote server says
//! can add a line to a notification we write.

use crate::reply::Reply;

/// Longest reply line accepted, without its line ending (RFC 5321 §4.5.3.1.5 says 512 with CRLF;
/// real servers are sometimes longer, garbage is much longer).
pub const MAX_REPLY_LINE: usize = 4096;
/// Most bytes one (multi-line) reply may use.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line does not start with a three-digit code 2xx-5xx")]
    BadCode,
    #[error("reply code not followed by space, '-' or end of line")]
    BadSeparator,
    #[error("multi-line reply changes its code from {first} to {then}")]
    MixedCodes { first: u16, then: u16 },
    #[error("reply line longer than {MAX_REPLY_LINE} bytes")]
    LineTooLong,
    #[error("reply longer than {MAX_REPLY_BYTES} bytes")]
    ReplyTooLong,
}

/// One complete reply at the start of `buf` and the number of bytes it used; `Ok(None)` when the
/// reply is not complete yet. Never panics, whatever the bytes.
///
/// `status` is set when the first line's text begins with an enhanced code whose class equals the
/// reply code's first digit (`550 5.1.1 text`); that code is then removed from every line that
/// starts with it, so `lines` hold only the text.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code: Option<u16> = None;
    let mut texts: Vec<&[u8]> = Vec::new();
    loop {
        let rest = &buf[pos..];
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            // Incomplete line: check what we can now, so garbage is refused without waiting.
            check_partial(rest, code)?;
            if rest.len() > MAX_REPLY_LINE + 1 {
                return Err(ReplyError::LineTooLong);
            }
            if pos + rest.len() > MAX_REPLY_BYTES {
                return Err(ReplyError::ReplyTooLong);
            }
            return Ok(None);
        };
        let mut line = &rest[..lf];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        if line.len() > MAX_REPLY_LINE {
            return Err(ReplyError::LineTooLong);
        }
        pos += lf + 1;
        if pos > MAX_REPLY_BYTES {
            return Err(ReplyError::ReplyTooLong);
        }
        let this = line_code(line)?;
        if let Some(first) = code
            && first != this
        {
            return Err(ReplyError::MixedCodes { first, then: this });
        }
        code = Some(this);
        let last = match line.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return Err(ReplyError::BadSeparator),
        };
        texts.push(line.get(4..).unwrap_or(b""));
        if last {
            return Ok(Some((build(this, &texts), pos)));
        }
    }
}

/// The code of a complete line.
fn line_code(line: &[u8]) -> Result<u16, ReplyError> {
    if line.len() < 3 {
        return Err(ReplyError::BadCode);
    }
    let d = &line[..3];
    if !(b'2'..=b'5').contains(&d[0]) || !d[1].is_ascii_digit() || !d[2].is_ascii_digit() {
        return Err(ReplyError::BadCode);
    }
    Ok(u16::from(d[0] - b'0') * 100 + u16::from(d[1] - b'0') * 10 + u16::from(d[2] - b'0'))
}

/// Refuse an unfinished line early when what has arrived is already wrong.
fn check_partial(partial: &[u8], code: Option<u16>) -> Result<(), ReplyError> {
    for (i, &b) in partial.iter().take(3).enumerate() {
        let ok = if i == 0 { (b'2'..=b'5').contains(&b) } else { b.is_ascii_digit() };
        if !ok {
            // This includes a CR: a line that ends before its code is bad.
            return Err(ReplyError::BadCode);
        }
    }
    if partial.len() >= 3 {
        let this = line_code(partial)?;
        if let Some(first) = code
            && first != this
        {
            return Err(ReplyError::MixedCodes { first, then: this });
        }
    }
    if let Some(&sep) = partial.get(3)
        && !matches!(sep, b' ' | b'-' | b'\r')
    {
        return Err(ReplyError::BadSeparator);
    }
    Ok(())
}

fn build(code: u16, texts: &[&[u8]]) -> Reply {
    let class = code / 100;
    let status = texts.first().and_then(|t| enhanced(t, class));
    let lines = texts
        .iter()
        .map(|t| {
            let t = match (status, enhanced(t, class)) {
                (Some(s), Some(here)) if s.0 == here.0 => &t[here.1..],
                _ => t,
            };
            clean(t)
        })
        .collect();
    Reply { code, status: status.map(|(s, _)| s), lines }
}

/// An enhanced code `class.subject.detail` at the start of `text` (followed by a space or the end
/// of the line): its subject and detail, and how many bytes to skip to reach the text after it.
fn enhanced(text: &[u8], class: u16) -> Option<((u16, u16), usize)> {
    let (c, i) = number(text, 0, 1)?;
    if c != class || text.get(i) != Some(&b'.') {
        return None;
    }
    let (subject, i) = number(text, i + 1, 3)?;
    if text.get(i) != Some(&b'.') {
        return None;
    }
    let (detail, i) = number(text, i + 1, 3)?;
    match text.get(i) {
        None => Some(((subject, detail), i)),
        Some(b' ') => Some(((subject, detail), i + 1)),
        Some(_) => None,
    }
}

/// 1..=`max` ASCII digits at `start`: their value and the index after them.
fn number(text: &[u8], start: usize, max: usize) -> Option<(u16, usize)> {
    let digits = text.get(start..)?.iter().take(max + 1).take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > max {
        return None;
    }
    let value = text[start..start + digits].iter().fold(0u16, |v, &b| v * 10 + u16::from(b - b'0'));
    Some((value, start + digits))
}

fn clean(text: &[u8]) -> String {
    String::from_utf8_lossy(text).chars().map(|c| if c.is_control() && c != '\t' { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8]) -> (Reply, usize) {
        parse_reply(input).expect("valid").expect("complete")
    }

    #[test]
    fn single_line_with_enhanced_code() {
        let (r, n) = one(b"550 5.1.1 User unknown\r\nrest");
        assert_eq!(n, 24);
        assert_eq!(r, Reply::new(550, (1, 1), "User unknown"));
        assert_eq!(r.enhanced().as_deref(), Some("5.1.1"));
    }

    #[test]
    fn single_line_plain() {
        let (r, n) = one(b"220 mx.example ESMTP ready\r\n");
        assert_eq!(n, 28);
        assert_eq!(r, Reply::plain(220, "mx.example ESMTP ready"));
    }

    #[test]
    fn code_only_and_trailing_space() {
        assert_eq!(one(b"250\r\n").0, Reply { code: 250, status: None, lines: vec![String::new()] });
        assert_eq!(one(b"250 \r\n").0, Reply::plain(250, ""));
        // Enhanced code with no text after it.
        assert_eq!(one(b"250 2.0.0\r\n").0, Reply::new(250, (0, 0), ""));
    }

    #[test]
    fn multiline_ehlo() {
        let input = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n";
        let (r, n) = one(input);
        assert_eq!(n, input.len());
        assert_eq!(r, Reply::multiline(250, vec!["mx.example".into(), "PIPELINING".into(), "SIZE 1000".into(), "8BITMIME".into()]));
    }

    #[test]
    fn multiline_with_enhanced_code_on_each_line() {
        let (r, _) = one(b"550-5.7.1 Go away\r\n550-5.7.1 really\r\n550 5.7.1 now\r\n");
        assert_eq!(r.code, 550);
        assert_eq!(r.status, Some((7, 1)));
        assert_eq!(r.lines, vec!["Go away", "really", "now"]);
        // Round trip through the encoder.
        assert_eq!(one(&r.to_bytes()).0, r);
    }

    #[test]
    fn enhanced_code_of_another_class_stays_text() {
        let (r, _) = one(b"450 5.1.1 odd\r\n");
        assert_eq!(r.status, None);
        assert_eq!(r.lines, vec!["5.1.1 odd"]);
        // Not followed by a space: not an enhanced code.
        let (r, _) = one(b"250 2.0.0x ok\r\n");
        assert_eq!(r.status, None);
        // Too many digits.
        let (r, _) = one(b"250 2.0000.0 ok\r\n");
        assert_eq!(r.status, None);
        // Three-digit subject and detail are fine.
        assert_eq!(one(b"550 5.123.456 x\r\n").0.status, Some((123, 456)));
    }

    #[test]
    fn bare_lf_accepted() {
        let (r, n) = one(b"250-a\n250 b\nNEXT");
        assert_eq!(n, 12);
        assert_eq!(r.lines, vec!["a", "b"]);
    }

    #[test]
    fn incomplete_needs_more() {
        for input in [&b""[..], b"2", b"25", b"250", b"250 ok", b"250 ok\r", b"250-a\r\n", b"250-a\r\n250", b"250-a\r\n250 b"] {
            assert_eq!(parse_reply(input), Ok(None), "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn every_prefix_of_a_reply_is_incomplete_or_the_reply() {
        let input = b"250-mx.example\r\n250-SIZE 10\r\n250 2.0.0 ok\r\n";
        for cut in 0..input.len() {
            assert_eq!(parse_reply(&input[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(parse_reply(input).unwrap().unwrap().1, input.len());
    }

    #[test]
    fn garbage_refused() {
        assert_eq!(parse_reply(b"hello\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply(b"HTTP/1.1 400"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply(b"2x0 ok\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply(b"650 ok\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply(b"150 ok\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply(b"25\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply(b"\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply(b"250x ok\r\n"), Err(ReplyError::BadSeparator));
        assert_eq!(parse_reply(b"250x"), Err(ReplyError::BadSeparator));
        assert_eq!(parse_reply(b"250-a\r\n251 b\r\n"), Err(ReplyError::MixedCodes { first: 250, then: 251 }));
        assert_eq!(parse_reply(b"250-a\r\n550"), Err(ReplyError::MixedCodes { first: 250, then: 550 }));
        assert_eq!(parse_reply(b"250-a\r\nxyz"), Err(ReplyError::BadCode));
    }

    #[test]
    fn long_lines_refused() {
        let mut line = b"250 ".to_vec();
        line.extend(std::iter::repeat_n(b'a', MAX_REPLY_LINE));
        assert_eq!(parse_reply(&line), Err(ReplyError::LineTooLong));
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse_reply(&line), Err(ReplyError::LineTooLong));
        // Exactly the limit is fine.
        let mut ok = b"250 ".to_vec();
        ok.extend(std::iter::repeat_n(b'a', MAX_REPLY_LINE - 4));
        ok.extend_from_slice(b"\r\n");
        assert!(parse_reply(&ok).unwrap().is_some());
    }

    #[test]
    fn endless_multiline_refused() {
        let mut input = Vec::new();
        while input.len() <= MAX_REPLY_BYTES {
            input.extend_from_slice(b"250-more and more\r\n");
        }
        assert_eq!(parse_reply(&input), Err(ReplyError::ReplyTooLong));
    }

    #[test]
    fn control_characters_in_text_are_blanked() {
        let (r, _) = one(b"550 5.1.1 bad\rSubject: x\x00\x1b[0m\tok\r\n");
        assert_eq!(r.lines, vec!["bad Subject: x  [0m\tok"]);
        let (r, _) = one(b"250 caf\xc3\xa9 \xff\r\n");
        assert_eq!(r.lines, vec!["café \u{fffd}"]);
    }

    #[test]
    fn consecutive_replies() {
        let input = b"250 2.1.0 ok\r\n550 5.1.1 no\r\n354 go\r\n";
        let (a, n) = one(input);
        let (b, m) = one(&input[n..]);
        let (c, k) = one(&input[n + m..]);
        assert_eq!((a.code, b.code, c.code), (250, 550, 354));
        assert_eq!(n + m + k, input.len());
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: every byte value at every position of a short reply.
        let base = b"250-2.1.0 a\r\n250 b\r\n".to_vec();
        for i in 0..base.len() {
            for v in 0..=255u8 {
                let mut input = base.clone();
                input[i] = v;
                let _ = parse_reply(&input);
                let _ = parse_reply(&input[..i]);
            }
        }
    }
}
