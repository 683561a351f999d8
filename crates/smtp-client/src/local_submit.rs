//! Submitting a message to the running server over its local socket (SPEC F6): the client
//! side of `postroom sendmail` and `postroom send`. It speaks SMTP; the server knows the caller
//! from the socket's peer credentials (A4). A message is submitted only when the final 250
//! arrives, so a caller that sees an error has handed nothing over.

use std::path::Path;

use mail_proto::Reply;
use mail_proto::reply_parser::parse_reply;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Why a submission did not go through.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The server is not running or not reachable: try again later (sysexits 75).
    #[error("the Postroom server is not running ({0})")]
    Unavailable(String),
    /// The socket is there, but this user may not reach it (EACCES/EPERM): the socket's
    /// directory or the socket does not let them in (sysexits 77, EX_NOPERM).
    #[error("no permission to use the Postroom server's socket {0}")]
    NoPermission(String),
    /// A refusal for security or policy (5.7.x), e.g. a sender address that is not the local
    /// user's own (A4) (sysexits 77, EX_NOPERM).
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// A temporary refusal (4xx): try again later (sysexits 75).
    #[error("temporary failure: {0}")]
    Temporary(String),
    /// A permanent refusal of the message or sender (5xx).
    #[error("refused: {0}")]
    Refused(String),
    /// Every recipient was refused: each with the server's reply.
    #[error("no recipient was accepted: {}", .0.iter().map(|(r, why)| format!("{r}: {why}")).collect::<Vec<_>>().join("; "))]
    NoRecipient(Vec<(String, String)>),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the server said about the recipients of a submitted message.
#[derive(Debug, Default)]
pub struct Submitted {
    /// Recipients refused with a permanent error, and the reply.
    pub refused: Vec<(String, String)>,
    pub queue_reply: String,
}

/// Send `message` (any line endings; it is converted to CRLF and dot-stuffed) from `from` to
/// `recipients` through the socket at `socket`.
pub async fn submit<R: AsyncRead + Unpin>(socket: &Path, from: &str, recipients: &[String], mut message: R) -> Result<Submitted, SubmitError> {
    let stream = UnixStream::connect(socket).await.map_err(|e| connect_error(socket, &e))?;
    let mut c = Conversation { stream, buf: Vec::new() };
    c.expect_ok(None).await?;
    c.expect_ok(Some("EHLO localhost")).await?;
    c.expect_ok(Some(&format!("MAIL FROM:<{from}>"))).await?;
    let mut report = Submitted::default();
    let mut accepted = 0;
    for r in recipients {
        let reply = c.command(&format!("RCPT TO:<{r}>")).await?;
        match reply.code {
            200..=299 => accepted += 1,
            400..=499 => return Err(SubmitError::Temporary(text(&reply))),
            _ => report.refused.push((r.clone(), text(&reply))),
        }
    }
    if accepted == 0 {
        return Err(SubmitError::NoRecipient(report.refused));
    }
    let reply = c.command("DATA").await?;
    if reply.code != 354 {
        return Err(classify(&reply));
    }
    let mut stuffer = Stuffer::default();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = message.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        let mut out = Vec::with_capacity(n + n / 16);
        stuffer.feed(&chunk[..n], &mut out);
        c.stream.write_all(&out).await?;
    }
    let mut end = Vec::new();
    stuffer.finish(&mut end);
    c.stream.write_all(&end).await?;
    let reply = c.read_reply().await?;
    if !reply.is_positive() {
        return Err(classify(&reply));
    }
    report.queue_reply = text(&reply);
    let _ = c.command("QUIT").await;
    Ok(report)
}

/// No permission is not "not running": retrying will not help, the administrator must (77).
/// A missing socket or a refused connection (left behind by a killed server) is (75).
fn connect_error(socket: &Path, e: &std::io::Error) -> SubmitError {
    let place = format!("{}: {e}", socket.display());
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => SubmitError::NoPermission(format!(
            "{place}; its directory {} or the socket does not let this user in (ask the administrator: `[smtp] local_socket`)",
            socket.parent().map(|d| d.display().to_string()).unwrap_or_default()
        )),
        _ => SubmitError::Unavailable(place),
    }
}

fn text(reply: &Reply) -> String {
    reply.to_string().trim_end().to_string()
}

fn classify(reply: &Reply) -> SubmitError {
    match (reply.code, reply.status) {
        (..500, _) => SubmitError::Temporary(text(reply)),
        (_, Some((7, _))) => SubmitError::NotPermitted(text(reply)),
        _ => SubmitError::Refused(text(reply)),
    }
}

struct Conversation {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Conversation {
    async fn command(&mut self, line: &str) -> Result<Reply, SubmitError> {
        self.stream.write_all(format!("{line}\r\n").as_bytes()).await?;
        self.read_reply().await
    }

    async fn expect_ok(&mut self, line: Option<&str>) -> Result<Reply, SubmitError> {
        let reply = match line {
            Some(l) => self.command(l).await?,
            None => self.read_reply().await?,
        };
        if reply.is_positive() { Ok(reply) } else { Err(classify(&reply)) }
    }

    async fn read_reply(&mut self) -> Result<Reply, SubmitError> {
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => return Err(SubmitError::Temporary(format!("unreadable reply from the server: {e:?}"))),
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(SubmitError::Temporary("the server closed the connection".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Turns script output (LF or CRLF lines) into SMTP DATA: CRLF line ends, leading dots doubled.
#[derive(Default)]
struct Stuffer {
    mid_line: bool,
    last_cr: bool,
}

impl Stuffer {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            match b {
                b'\n' => {
                    if !self.last_cr {
                        out.push(b'\r');
                    }
                    out.push(b'\n');
                    self.mid_line = false;
                    self.last_cr = false;
                    continue;
                }
                _ if self.last_cr => {
                    // A bare CR ends a line too: never pass one on.
                    out.push(b'\n');
                    self.mid_line = false;
                }
                _ => {}
            }
            if b == b'\r' {
                out.push(b'\r');
                self.last_cr = true;
                continue;
            }
            if !self.mid_line && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            self.mid_line = true;
            self.last_cr = false;
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.last_cr {
            out.push(b'\n');
        } else if self.mid_line {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuff(input: &[u8]) -> Vec<u8> {
        let mut s = Stuffer::default();
        let mut out = Vec::new();
        for b in input.chunks(3) {
            s.feed(b, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn refusals_and_connect_errors_are_classified() {
        let io = |kind| std::io::Error::from(kind);
        let sock = Path::new("/run/postroom/sendmail.sock");
        let e = connect_error(sock, &io(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(&e, SubmitError::NoPermission(m) if m.contains("/run/postroom/sendmail.sock") && m.contains("/run/postroom ")), "{e}");
        assert!(matches!(connect_error(sock, &io(std::io::ErrorKind::NotFound)), SubmitError::Unavailable(_)));
        assert!(matches!(connect_error(sock, &io(std::io::ErrorKind::ConnectionRefused)), SubmitError::Unavailable(_)));
        assert!(matches!(classify(&Reply::new(553, (7, 1), "not yours")), SubmitError::NotPermitted(_)));
        assert!(matches!(classify(&Reply::new(554, (6, 0), "no")), SubmitError::Refused(_)));
        assert!(matches!(classify(&Reply::new(451, (3, 0), "later")), SubmitError::Temporary(_)));
    }

    #[test]
    fn script_output_becomes_smtp_data() {
        assert_eq!(stuff(b"Subject: x\n\n.hidden\nbody"), b"Subject: x\r\n\r\n..hidden\r\nbody\r\n.\r\n");
        assert_eq!(stuff(b"a\r\n.\r\nb\r\n"), b"a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(stuff(b"bare\rcr"), b"bare\r\ncr\r\n.\r\n");
        assert_eq!(stuff(b""), b".\r\n");
    }
}
