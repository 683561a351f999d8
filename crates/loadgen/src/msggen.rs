//! Message generator: RFC 5322 messages of about a requested size, in wire form.
//!
//! Bodies are printable ASCII lines of at most 78 characters, CRLF-terminated, and deliberately
//! include lines that begin with `.` (and lines that are a lone `.`) so that the server's
//! dot-stuffing handling is exercised. Bodies are generated once per factory (a few variants) and
//! kept dot-stuffed, so producing a message costs one header format plus one copy.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest body line, without its CRLF (RFC 5322 §2.1.1 recommends 78).
pub const MAX_LINE: usize = 78;

/// Number of distinct body variants a factory cycles through.
const VARIANTS: u64 = 8;

/// Small, fast, deterministic PRNG (xorshift64*); good enough for filler text.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-ish value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

const WORDS: &[&str] = &[
    "postroom",
    "mail",
    "queue",
    "relay",
    "domain",
    "mailbox",
    "message",
    "header",
    "body",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "delivery",
    "sender",
    "recipient",
    "envelope",
    "journal",
    "storage",
    "benchmark",
    "load",
    "Lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet,",
    "consectetur",
    "adipiscing",
    "elit.",
    "42",
    "1970-01-01",
    "x=y;",
    "(parenthesis)",
    "[bracket]",
    "{brace}",
    "<angle>",
    "quote\"d",
    "semi;colon",
    "tab-free",
    "ASCII~only",
    "100%",
    "#hash",
    "@at",
    "$dollar",
    "^caret",
];

/// Raw (not dot-stuffed) body of exactly `target` octets when `target >= 2`, made of CRLF lines of
/// at most [`MAX_LINE`] printable characters. About one line in twelve begins with `.`, and some
/// lines are a lone `.` or `..`, to exercise transparency (RFC 5321 §4.5.2).
pub fn make_body(target: usize, seed: u64) -> Vec<u8> {
    let target = target.max(2);
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(target);
    let mut line = String::with_capacity(MAX_LINE + 8);
    while out.len() < target {
        let remaining = target - out.len();
        line.clear();
        let kind = rng.below(24);
        match kind {
            0 => line.push('.'),
            1 => line.push_str(".."),
            2 => line.push_str(". a line starting with a dot"),
            3 => {} // empty line
            _ => {
                let want = 20 + rng.below((MAX_LINE - 20) as u64 + 1) as usize;
                while line.len() < want {
                    if !line.is_empty() {
                        line.push(' ');
                    }
                    line.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
                }
                line.truncate(want.min(MAX_LINE));
                // No trailing whitespace: some servers/clients trim it.
                while line.ends_with(' ') {
                    line.pop();
                    line.push('x');
                }
            }
        }
        // Never leave exactly one octet to fill: a line needs at least its CRLF.
        if line.len() + 2 < remaining && remaining - (line.len() + 2) == 1 && line.pop().is_none() {
            line.push('x');
        }
        if line.len() + 2 > remaining {
            // Last line: fill exactly up to target with plain characters.
            line.clear();
            for _ in 0..remaining - 2 {
                line.push((b'a' + rng.below(26) as u8) as char);
            }
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Appends `raw` dot-stuffed (RFC 5321 §4.5.2) to `out`, followed by the end-of-data line
/// `.\r\n`. `raw` must consist of CRLF-terminated lines; a missing final CRLF is added.
pub fn dot_stuff_into(raw: &[u8], out: &mut Vec<u8>) {
    out.reserve(raw.len() + raw.len() / 64 + 5);
    let mut at_line_start = true;
    let mut rest = raw;
    while !rest.is_empty() {
        if at_line_start && rest[0] == b'.' {
            out.push(b'.');
        }
        match memchr::memchr(b'\n', rest) {
            Some(i) => {
                out.extend_from_slice(&rest[..=i]);
                rest = &rest[i + 1..];
                at_line_start = true;
            }
            None => {
                out.extend_from_slice(rest);
                rest = &[];
                at_line_start = false;
            }
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// Inverse of [`dot_stuff_into`] (tests, verification and Maildir filling): strips the
/// terminator and one leading dot from each line. Returns `None` if the terminator is missing.
pub fn dot_unstuff(wire: &[u8]) -> Option<Vec<u8>> {
    let body = if wire == b".\r\n" { &wire[..0] } else { wire.strip_suffix(b"\r\n.\r\n").map(|b| &wire[..b.len() + 2])? };
    let mut out = Vec::with_capacity(body.len());
    for line in body.split_inclusive(|&b| b == b'\n') {
        let line = if line.first() == Some(&b'.') { &line[1..] } else { line };
        out.extend_from_slice(line);
    }
    Some(out)
}

/// RFC 5322 date-time for a Unix timestamp (UTC).
pub fn rfc5322_date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WD[days.rem_euclid(7) as usize],
        d,
        MON[(m - 1) as usize],
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Builds messages of about `size` octets: fixed headers plus one of a few pre-stuffed bodies.
pub struct MessageFactory {
    from: String,
    to_header: String,
    date: String,
    run_id: String,
    /// Dot-stuffed bodies, each ending with the `.\r\n` terminator.
    bodies: Vec<Vec<u8>>,
    /// Raw (unstuffed) length of each body.
    body_raw_len: Vec<usize>,
}

impl MessageFactory {
    pub fn new(size: usize, from: &str, to: &[String]) -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let run_id = format!("{:x}.{:x}", now.as_nanos() as u64, std::process::id());
        let mut f = MessageFactory {
            from: from.to_string(),
            to_header: to.join(", "),
            date: rfc5322_date(now.as_secs()),
            run_id,
            bodies: Vec::new(),
            body_raw_len: Vec::new(),
        };
        // Measure the header size with a representative sequence number.
        let mut probe = Vec::new();
        f.write_headers(1_000_000, &mut probe);
        let body_target = size.saturating_sub(probe.len()).max(2);
        for v in 0..VARIANTS {
            let raw = make_body(body_target, 0xB0D1 + v);
            let mut stuffed = Vec::new();
            dot_stuff_into(&raw, &mut stuffed);
            f.body_raw_len.push(raw.len());
            f.bodies.push(stuffed);
        }
        f
    }

    fn write_headers(&self, seq: u64, out: &mut Vec<u8>) {
        let mut h = String::with_capacity(384);
        let _ = write!(
            h,
            "From: <{}>\r\nTo: {}\r\nSubject: postroom-loadgen message {seq}\r\nDate: {}\r\n\
             Message-ID: <{seq}.{}@loadgen.example.test>\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\r\n",
            self.from, self.to_header, self.date, self.run_id
        );
        out.extend_from_slice(h.as_bytes());
    }

    /// Clears `out` and writes message `seq` in wire form (dot-stuffed, ending with `.\r\n`).
    /// Returns the message's size before stuffing (what the server stores).
    pub fn write_wire(&self, seq: u64, out: &mut Vec<u8>) -> usize {
        out.clear();
        self.write_headers(seq, out);
        let header_len = out.len();
        let v = (seq % self.bodies.len() as u64) as usize;
        out.extend_from_slice(&self.bodies[v]);
        header_len + self.body_raw_len[v]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(b: &[u8]) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = b.split(|&c| c == b'\n').collect();
        assert_eq!(v.pop(), Some(&b""[..]), "must end with a newline");
        v
    }

    fn assert_crlf_only(b: &[u8]) {
        for (i, &c) in b.iter().enumerate() {
            if c == b'\n' {
                assert!(i > 0 && b[i - 1] == b'\r', "bare LF at {i}");
            }
            if c == b'\r' {
                assert!(b.get(i + 1) == Some(&b'\n'), "bare CR at {i}");
            }
        }
    }

    #[test]
    fn body_has_exact_size_printable_short_lines() {
        for &n in &[2usize, 3, 10, 80, 81, 1000, 1024, 10_240, 102_400] {
            let b = make_body(n, 7);
            assert_eq!(b.len(), n, "size {n}");
            assert_crlf_only(&b);
            for l in lines(&b) {
                let l = l.strip_suffix(b"\r").unwrap();
                assert!(l.len() <= MAX_LINE, "line too long: {}", l.len());
                assert!(l.iter().all(|&c| (0x20..0x7f).contains(&c)), "non-printable");
            }
        }
    }

    #[test]
    fn body_contains_dot_lines() {
        let b = make_body(20_000, 1);
        let ls = lines(&b);
        assert!(ls.iter().any(|l| *l == b".\r"), "lone dot line");
        assert!(ls.iter().any(|l| l.starts_with(b".") && l.len() > 2));
    }

    #[test]
    fn stuffing_doubles_leading_dots_and_terminates() {
        let raw = b"hello\r\n.\r\n..\r\n.x\r\nmid.dle\r\n";
        let mut w = Vec::new();
        dot_stuff_into(raw, &mut w);
        assert_eq!(&w[..], &b"hello\r\n..\r\n...\r\n..x\r\nmid.dle\r\n.\r\n"[..]);
        assert_eq!(dot_unstuff(&w).unwrap(), raw.to_vec());
        // Missing final CRLF is added; empty body is just the terminator.
        let mut w = Vec::new();
        dot_stuff_into(b".abc", &mut w);
        assert_eq!(&w[..], b"..abc\r\n.\r\n");
        let mut w = Vec::new();
        dot_stuff_into(b"", &mut w);
        assert_eq!(&w[..], b".\r\n");
    }

    #[test]
    fn wire_message_is_well_formed() {
        let to = vec!["u1@example.test".to_string(), "u2@example.test".to_string()];
        for &size in &[100usize, 1024, 10_240, 102_400] {
            let f = MessageFactory::new(size, "a@b", &to);
            let mut w = Vec::new();
            let raw_len = f.write_wire(42, &mut w);
            // Approximately the requested size (exact unless the headers alone exceed it).
            if size >= 1024 {
                assert!(raw_len.abs_diff(size) <= 16, "size {size} got {raw_len}");
            }
            assert_crlf_only(&w);
            assert!(w.ends_with(b"\r\n.\r\n"));
            let raw = dot_unstuff(&w).unwrap();
            assert_eq!(raw.len(), raw_len);
            // Only the terminator is a lone dot on the wire; every other dot line is stuffed.
            let wl = lines(&w);
            for (i, l) in wl.iter().enumerate() {
                if l.starts_with(b".") && i + 1 != wl.len() {
                    assert!(l.starts_with(b".."), "unstuffed dot line {i}");
                }
            }
            let text = String::from_utf8(raw).unwrap();
            let (head, _) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.contains("\r\nSubject: postroom-loadgen message 42"));
            assert!(head.contains("\r\nMessage-ID: <42."));
            assert!(head.contains("To: u1@example.test, u2@example.test"));
        }
    }

    #[test]
    fn message_ids_differ() {
        let f = MessageFactory::new(1024, "a@b", &["x@example.test".to_string()]);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        f.write_wire(1, &mut a);
        f.write_wire(2, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn date_format() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }
}
