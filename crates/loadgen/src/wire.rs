//! Buffered reply readers for SMTP and POP3 over any `AsyncRead`.
//!
//! One reusable buffer per connection; lines are found with `memchr`, POP3 multi-line responses
//! are skipped with a `memmem` search for `CRLF.CRLF`, so no allocation happens per byte or per
//! line. The inner stream is reachable through [`WireReader::get_mut`] for writing.

use std::io;
use std::ops::Range;

use memchr::memmem;
use tokio::io::{AsyncRead, AsyncReadExt};

const INITIAL_CAPACITY: usize = 64 * 1024;
/// A single reply line longer than this is a protocol error (RFC 5321 allows 512).
const MAX_LINE: usize = 64 * 1024;
/// Reply text kept for error reports.
const MAX_TEXT: usize = 2048;

pub struct WireReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    text: String,
    finder: memmem::Finder<'static>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: AsyncRead + Unpin> WireReader<R> {
    pub fn new(inner: R) -> Self {
        WireReader { inner, buf: Vec::with_capacity(INITIAL_CAPACITY), pos: 0, text: String::new(), finder: memmem::Finder::new(b"\r\n.\r\n") }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Text of the last reply or status line read (multi-line SMTP replies joined with `\n`).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Reads more data, compacting the buffer first. EOF is an error: every caller expects more.
    async fn fill(&mut self) -> io::Result<()> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 && self.buf.capacity() - self.buf.len() < INITIAL_CAPACITY / 4 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(INITIAL_CAPACITY);
        }
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed by server"));
        }
        Ok(())
    }

    /// Next line, without its line ending, as a range into the buffer (valid until the next call).
    async fn next_line(&mut self) -> io::Result<Range<usize>> {
        let mut scanned = self.pos;
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[scanned..]) {
                let nl = scanned + i;
                let start = self.pos;
                let end = if nl > start && self.buf[nl - 1] == b'\r' { nl - 1 } else { nl };
                self.pos = nl + 1;
                return Ok(start..end);
            }
            if self.buf.len() - self.pos > MAX_LINE {
                return Err(invalid("reply line too long".into()));
            }
            // Everything available has been scanned; fill() may move it to the front.
            let unscanned_start = self.buf.len() - self.pos;
            self.fill().await?;
            scanned = self.pos + unscanned_start;
        }
    }

    fn set_text(&mut self, r: Range<usize>, append: bool) {
        if !append {
            self.text.clear();
        } else if self.text.len() < MAX_TEXT {
            self.text.push('\n');
        }
        if self.text.len() < MAX_TEXT {
            let line = &self.buf[r];
            let line = &line[..line.len().min(MAX_TEXT - self.text.len())];
            self.text.push_str(&String::from_utf8_lossy(line));
        }
    }

    /// Reads one SMTP reply (RFC 5321 §4.2, multi-line with `-` continuation) and returns its
    /// code; the text is available from [`Self::text`].
    pub async fn read_smtp_reply(&mut self) -> io::Result<u16> {
        let mut first = true;
        loop {
            let r = self.next_line().await?;
            let line = &self.buf[r.clone()];
            if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                let l = String::from_utf8_lossy(line).into_owned();
                return Err(invalid(format!("malformed SMTP reply line: {l:?}")));
            }
            let code = line[..3].iter().fold(0u16, |a, &d| a * 10 + u16::from(d - b'0'));
            let last = match line.get(3) {
                None | Some(b' ') => true,
                Some(b'-') => false,
                Some(_) => {
                    let l = String::from_utf8_lossy(line).into_owned();
                    return Err(invalid(format!("malformed SMTP reply line: {l:?}")));
                }
            };
            self.set_text(r, !first);
            first = false;
            if last {
                return Ok(code);
            }
        }
    }

    /// Reads a POP3 status line; `Ok(true)` for `+OK`, `Ok(false)` for `-ERR` (RFC 1939 §3).
    pub async fn read_pop_status(&mut self) -> io::Result<bool> {
        let r = self.next_line().await?;
        let line = &self.buf[r.clone()];
        let ok = if line.starts_with(b"+OK") {
            true
        } else if line.starts_with(b"-ERR") {
            false
        } else {
            let l = String::from_utf8_lossy(line).into_owned();
            return Err(invalid(format!("malformed POP3 status line: {l:?}")));
        };
        self.set_text(r, false);
        Ok(ok)
    }

    /// Skips the body of a POP3 multi-line response, up to and including the terminating
    /// `CRLF.CRLF`, and returns the number of body octets as sent (still dot-stuffed, including
    /// the last line's CRLF, excluding the `.CRLF` terminator). Call right after the `+OK` line.
    pub async fn skip_pop_multiline(&mut self) -> io::Result<u64> {
        // The first line is the terminator when the body is empty.
        loop {
            let avail = &self.buf[self.pos..];
            if avail.starts_with(b".\r\n") {
                self.pos += 3;
                return Ok(0);
            }
            if avail.len() >= 3 || !b".\r\n".starts_with(avail) {
                break;
            }
            self.fill().await?;
        }
        let mut count: u64 = 0;
        loop {
            let avail = &self.buf[self.pos..];
            if let Some(i) = self.finder.find(avail) {
                count += (i + 2) as u64;
                self.pos += i + 5;
                return Ok(count);
            }
            // Keep the last 4 octets: they may hold the start of the terminator.
            if avail.len() > 4 {
                let skip = avail.len() - 4;
                count += skip as u64;
                self.pos += skip;
            }
            self.fill().await?;
        }
    }

    /// Reads a POP3 multi-line body into `out` (still dot-stuffed, terminator excluded).
    /// Slower than [`Self::skip_pop_multiline`]; meant for tests and verification.
    #[allow(dead_code)]
    pub async fn read_pop_multiline(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let r = self.next_line().await?;
            let line = &self.buf[r];
            if line == b"." {
                return Ok(());
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    /// Reader that hands out its data in fixed-size chunks, to exercise boundaries.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let n = self.chunk.min(self.data.len() - self.pos).min(buf.remaining());
            let p = self.pos;
            buf.put_slice(&self.data[p..p + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    fn reader(data: &[u8], chunk: usize) -> WireReader<Chunked> {
        WireReader::new(Chunked { data: data.to_vec(), pos: 0, chunk })
    }

    const CHUNKS: &[usize] = &[1, 2, 3, 4, 5, 7, 64, 100_000];

    #[tokio::test]
    async fn smtp_single_and_multiline_replies() {
        let data = b"220 bench.example.test ESMTP\r\n250-bench.example.test\r\n250-PIPELINING\r\n\
                     250 SIZE 1000\r\n354 go ahead\r\n550 5.1.1 no\r\n250\r\n";
        for &c in CHUNKS {
            let mut r = reader(data, c);
            assert_eq!(r.read_smtp_reply().await.unwrap(), 220);
            assert_eq!(r.text(), "220 bench.example.test ESMTP");
            assert_eq!(r.read_smtp_reply().await.unwrap(), 250);
            assert_eq!(r.text(), "250-bench.example.test\n250-PIPELINING\n250 SIZE 1000");
            assert_eq!(r.read_smtp_reply().await.unwrap(), 354);
            assert_eq!(r.read_smtp_reply().await.unwrap(), 550);
            assert_eq!(r.text(), "550 5.1.1 no");
            assert_eq!(r.read_smtp_reply().await.unwrap(), 250);
            let e = r.read_smtp_reply().await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    #[tokio::test]
    async fn smtp_malformed() {
        let mut r = reader(b"hello\r\n", 3);
        assert_eq!(r.read_smtp_reply().await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let mut r = reader(b"250xok\r\n", 3);
        assert_eq!(r.read_smtp_reply().await.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn pop_status_and_multiline() {
        let data = b"+OK POP3 ready\r\n+OK 2 messages\r\n\
                     +OK 20 octets\r\nSubject: x\r\n\r\n..dot\r\nend\r\n.\r\n\
                     -ERR no such message\r\n\
                     +OK empty\r\n.\r\n\
                     +OK\r\n.\r\n.\r\n\
                     +OK tricky\r\nline.\r\n.x\r\n\r\n.\r\n+OK bye\r\n";
        for &c in CHUNKS {
            let mut r = reader(data, c);
            assert!(r.read_pop_status().await.unwrap());
            assert!(r.read_pop_status().await.unwrap());
            assert_eq!(r.text(), "+OK 2 messages");
            assert!(r.read_pop_status().await.unwrap());
            assert_eq!(r.skip_pop_multiline().await.unwrap(), 26, "chunk {c}");
            assert!(!r.read_pop_status().await.unwrap());
            assert_eq!(r.text(), "-ERR no such message");
            assert!(r.read_pop_status().await.unwrap());
            assert_eq!(r.skip_pop_multiline().await.unwrap(), 0);
            // "+OK\r\n.\r\n" then a stray ".\r\n" read as another (empty) multi-line body.
            assert!(r.read_pop_status().await.unwrap());
            assert_eq!(r.skip_pop_multiline().await.unwrap(), 0);
            assert_eq!(r.skip_pop_multiline().await.unwrap(), 0);
            assert!(r.read_pop_status().await.unwrap());
            assert_eq!(r.skip_pop_multiline().await.unwrap(), 13, "chunk {c}");
            assert!(r.read_pop_status().await.unwrap());
            assert_eq!(r.text(), "+OK bye");
        }
    }

    #[tokio::test]
    async fn pop_multiline_large_bodies_match_collected_length() {
        let raw = crate::msggen::make_body(300_000, 9);
        let mut stuffed = Vec::new();
        crate::msggen::dot_stuff_into(&raw, &mut stuffed);
        let mut data = b"+OK\r\n".to_vec();
        data.extend_from_slice(&stuffed);
        data.extend_from_slice(b"+OK\r\n");
        data.extend_from_slice(&stuffed);
        for &c in &[1usize, 3, 4, 5, 1000, 65_536, 1 << 20] {
            let mut r = reader(&data, c);
            assert!(r.read_pop_status().await.unwrap());
            let n = r.skip_pop_multiline().await.unwrap();
            assert_eq!(n as usize, stuffed.len() - 3);
            assert!(r.read_pop_status().await.unwrap());
            let mut body = Vec::new();
            r.read_pop_multiline(&mut body).await.unwrap();
            assert_eq!(body, stuffed[..stuffed.len() - 3].to_vec());
        }
    }

    #[tokio::test]
    async fn pop_multiline_truncated_is_eof() {
        let mut r = reader(b"+OK\r\nabc\r\n.", 2);
        assert!(r.read_pop_status().await.unwrap());
        let e = r.skip_pop_multiline().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
