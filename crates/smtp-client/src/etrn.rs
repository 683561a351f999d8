//! The send scheduler's ETRN to an upstream server (SPEC C7, RFC 1985): ask it to start
//! delivering the mail it holds for our domains.

use std::net::SocketAddr;
use std::time::Duration;

use mail_proto::Reply;
use mail_proto::reply_parser::parse_reply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(60);

/// EHLO, then `ETRN domain` for each domain, then QUIT. Returns the ETRN replies.
pub async fn request(addr: SocketAddr, helo: &str, domains: &[String]) -> std::io::Result<Vec<Reply>> {
    let mut stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await.map_err(|_| std::io::Error::other("connect timed out"))??;
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
