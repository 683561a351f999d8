//! The async driver (issue 21): one [`Conversation`] over TCP (loopback) or a Unix socket,
//! each reply within the milter's timeout (a PROGRESS, as any packet, restarts it). A connect
//! failure, a timeout, a closed connection or a protocol error ends the milter with its
//! [`DefaultAction`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Conversation, Decoder, DefaultAction, Message, Outcome, Step, Verdict};

/// Where a milter listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Address {
    /// `"127.0.0.1:8891"`, `"[::1]:8891"` or `"unix:/run/opendkim/opendkim.sock"`.
    pub fn parse(text: &str) -> Option<Address> {
        match text.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => Some(Address::Unix(PathBuf::from(path))),
            Some(_) => None,
            None => text.parse().ok().map(Address::Tcp),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One configured milter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Milter {
    pub name: String,
    pub address: Address,
    /// For the connect, each write and each reply.
    pub timeout: Duration,
    pub default_action: DefaultAction,
}

/// What one milter decided on a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub verdict: Verdict,
    /// The conversation's end; `None` when the milter failed.
    pub outcome: Option<Outcome>,
    /// Why the default action was taken: connect failure, timeout, EOF, protocol error.
    pub failure: Option<String>,
}

/// Run `message` past `milter`; `limit` bounds the modifications taken (the message size limit).
pub async fn check(milter: &Milter, message: Message, limit: usize) -> Checked {
    let result = match &milter.address {
        Address::Tcp(addr) => match tokio::time::timeout(milter.timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                converse(stream, milter.timeout, message, limit).await
            }
            Ok(Err(e)) => Err(format!("cannot connect to {}: {e}", milter.address)),
            Err(_) => Err(format!("cannot connect to {}: timed out", milter.address)),
        },
        Address::Unix(path) => match tokio::time::timeout(milter.timeout, tokio::net::UnixStream::connect(path)).await {
            Ok(Ok(stream)) => converse(stream, milter.timeout, message, limit).await,
            Ok(Err(e)) => Err(format!("cannot connect to {}: {e}", milter.address)),
            Err(_) => Err(format!("cannot connect to {}: timed out", milter.address)),
        },
    };
    match result {
        Ok(outcome) => Checked { verdict: outcome.verdict.clone(), outcome: Some(outcome), failure: None },
        Err(failure) => Checked { verdict: milter.default_action.verdict(&milter.name), outcome: None, failure: Some(failure) },
    }
}

async fn converse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, timeout: Duration, message: Message, limit: usize) -> Result<Outcome, String> {
    let mut conversation = Conversation::new(message).limit(limit);
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conversation.step() {
            Step::Send(bytes) => match tokio::time::timeout(timeout, stream.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => return Err("write timed out".into()),
            },
            Step::Receive(stage) => {
                // Every packet (PROGRESS included) restarts the timer.
                let packet = loop {
                    if let Some(packet) = decoder.next_packet().map_err(|e| format!("at {stage:?}: {e}"))? {
                        break packet;
                    }
                    match tokio::time::timeout(timeout, stream.read(&mut buf)).await {
                        Ok(Ok(0)) => return Err(format!("connection closed at {stage:?}")),
                        Ok(Ok(n)) => decoder.push(&buf[..n]),
                        Ok(Err(e)) => return Err(format!("read failed at {stage:?}: {e}")),
                        Err(_) => return Err(format!("timed out at {stage:?} after {}s", timeout.as_secs())),
                    }
                };
                conversation.receive(&packet).map_err(|e| format!("at {stage:?}: {e}"))?;
            }
            Step::Done(outcome) => {
                // QUIT went out; a failed close changes nothing.
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                return Ok(outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Packet;

    fn milter(address: Address, default_action: DefaultAction) -> Milter {
        Milter { name: "test".into(), address, timeout: Duration::from_millis(500), default_action }
    }

    fn message() -> Message {
        Message {
            mail_from: "jane@remote.example".into(),
            recipients: vec![crate::Recipient { address: "sam@example.test".into(), params: vec![] }],
            headers: vec![("Subject".into(), " hi".into())],
            body: b"Hello.\r\n".to_vec(),
            ..Message::default()
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(Address::parse("127.0.0.1:8891"), Some(Address::Tcp("127.0.0.1:8891".parse().unwrap())));
        assert_eq!(Address::parse("unix:/run/m.sock"), Some(Address::Unix("/run/m.sock".into())));
        assert_eq!(Address::parse("unix:relative"), None);
        assert_eq!(Address::parse("localhost:8891"), None);
        assert_eq!(Address::parse("unix:/run/m.sock").unwrap().to_string(), "unix:/run/m.sock");
    }

    #[tokio::test]
    async fn nothing_listening_is_the_default_action() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let c = check(&milter(Address::Tcp(free), DefaultAction::Tempfail), message(), 1 << 20).await;
        assert!(matches!(c.verdict, Verdict::Tempfail(_)), "{c:?}");
        assert!(c.failure.unwrap().contains("cannot connect"));
        let c = check(&milter(Address::Unix("/nonexistent/m.sock".into()), DefaultAction::Accept), message(), 1 << 20).await;
        assert_eq!(c.verdict, Verdict::Accept);
    }

    /// A fake milter on `stream`: it answers every packet with what `answer` says (nothing for
    /// None) until the MTA hangs up.
    async fn fake_milter<S>(mut s: S, answer: fn(u8) -> Vec<Packet>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut d = Decoder::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            d.push(&buf[..n]);
            while let Ok(Some(p)) = d.next_packet() {
                for reply in answer(p.code) {
                    s.write_all(&reply.encode()).await.unwrap();
                }
            }
        }
    }

    /// Version 6, no actions, every step and every reply.
    fn negotiated() -> Packet {
        Packet::new(b'O', [6u32, 0, 0].iter().flat_map(|n| n.to_be_bytes()).collect())
    }

    /// A milter that answers negotiation and then says nothing: the timeout applies.
    #[tokio::test]
    async fn a_silent_milter_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            fake_milter(s, |code| if code == b'O' { vec![negotiated()] } else { vec![] }).await;
        });
        let c = check(&milter(Address::Tcp(addr), DefaultAction::Tempfail), message(), 1 << 20).await;
        assert!(matches!(c.verdict, Verdict::Tempfail(_)), "{c:?}");
        assert!(c.failure.unwrap().contains("timed out at Connect"));
    }

    /// A milter that accepts at CONNECT, over a Unix socket.
    #[tokio::test]
    async fn an_accepting_milter_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            fake_milter(s, |code| match code {
                b'O' => vec![negotiated()],
                // PROGRESS, then ACCEPT.
                b'C' => vec![Packet::new(b'p', vec![]), Packet::new(b'a', vec![])],
                _ => vec![],
            })
            .await;
        });
        let c = check(&milter(Address::Unix(path.clone()), DefaultAction::Tempfail), message(), 1 << 20).await;
        assert_eq!(c.verdict, Verdict::Accept, "{c:?}");
        // The PROGRESS restarted the timer; the ACCEPT at CONNECT ends the conversation there.
        assert_eq!(c.outcome.unwrap().stage, crate::Stage::Connect);
    }
}
