//! The send scheduler's ETRN to an upstream server (SPEC C7, RFC 1985): ask it to start
//! delivering the mail it holds for our domains. The connection is an outbound one like a
//! delivery's: it comes from `[delivery] bind_address` (C8) and the caller holds one of the
//! `max_connections` slots for it (C6).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mail_proto::Reply;
use mail_proto::reply_parser::parse_reply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(60);

/// EHLO, then `ETRN domain` for each domain, then QUIT, from `bind` when set. Returns the ETRN
/// replies.
pub async fn request(addr: SocketAddr, bind: Option<IpAddr>, helo: &str, domains: &[String]) -> std::io::Result<Vec<Reply>> {
    let mut stream = tokio::time::timeout(TIMEOUT, connect(addr, bind)).await.map_err(|_| std::io::Error::other("connect timed out"))??;
    let mut buf = Vec::new();
    read_reply(&mut stream, &mut buf).await?;
    send(&mut stream, &mut buf, &format!("EHLO {helo}")).await?;
    let mut replies = Vec::new();
    for d in domains {
        replies.push(send(&mut stream, &mut buf, &format!("ETRN {d}")).await?);
    }
    let _ = send(&mut stream, &mut buf, "QUIT").await;
    Ok(replies)
}

async fn connect(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = bind {
        if ip.is_ipv4() != addr.is_ipv4() {
            let why = format!("bind_address {ip} cannot reach {addr} (other address family)");
            return Err(std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, why));
        }
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

async fn send(stream: &mut TcpStream, buf: &mut Vec<u8>, line: &str) -> std::io::Result<Reply> {
    stream.write_all(format!("{line}\r\n").as_bytes()).await?;
    read_reply(stream, buf).await
}

async fn read_reply(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Reply> {
    loop {
        match parse_reply(buf) {
            Ok(Some((reply, used))) => {
                buf.drain(..used);
                return Ok(reply);
            }
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::other(format!("bad reply: {e:?}"))),
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(TIMEOUT, stream.read(&mut chunk)).await.map_err(|_| std::io::Error::other("reply timed out"))??;
        if n == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The upstream host sees the connection come from bind_address (127.0.0.2 is loopback on
    /// Linux); another address family is refused before any packet is sent.
    #[tokio::test]
    async fn etrn_comes_from_bind_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, peer) = listener.accept().await.unwrap();
            s.write_all(b"220 up\r\n").await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 512];
            for reply in [&b"250 hi\r\n"[..], b"250 queuing started\r\n", b"221 bye\r\n"] {
                while !buf.ends_with(b"\r\n") {
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                buf.clear();
                s.write_all(reply).await.unwrap();
            }
            peer.ip()
        });
        let bind: IpAddr = "127.0.0.2".parse().unwrap();
        let replies = request(addr, Some(bind), "mail.example.test", &["example.test".into()]).await.unwrap();
        assert_eq!(replies.iter().map(|r| r.code).collect::<Vec<_>>(), [250]);
        assert_eq!(server.await.unwrap(), bind);
        let e = request(addr, Some("::1".parse().unwrap()), "h", &[]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrNotAvailable);
    }
}
