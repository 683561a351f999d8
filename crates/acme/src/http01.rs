//! The HTTP-01 responder (RFC 8555 §8.3, SPEC O6): the ACME server fetches
//! `http://NAME/.well-known/acme-challenge/TOKEN` on port 80 and must read the key authorization.
//! Postroom answers it itself on `[tls.acme] http_listen`: a tiny HTTP/1.1 server that knows only
//! the tokens of the order in progress. Everything else is 404; a request is read within a
//! deadline and a size bound, and the connection closes after one response.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

const PREFIX: &str = "/.well-known/acme-challenge/";

/// A request head larger than this is refused (the ACME server's is a few hundred bytes).
const MAX_REQUEST: usize = 8 * 1024;

/// A client must send its request head within this time.
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// Connections served at once; past it a new one is closed at once. ACME servers validate from a
/// handful of vantage points, so this is plenty, and a flood on port 80 holds little.
const AT_ONCE: usize = 32;

/// The tokens of the challenges in progress and their key authorizations.
#[derive(Clone, Default)]
pub struct Challenges {
    tokens: Arc<Mutex<HashMap<String, String>>>,
}

impl Challenges {
    /// Answer `token` with `key_authorization` until the returned guard is dropped (the order
    /// finished, well or not).
    pub fn offer(&self, token: &str, key_authorization: &str) -> Offered {
        self.tokens.lock().expect("challenges lock").insert(token.to_string(), key_authorization.to_string());
        Offered { challenges: self.clone(), token: token.to_string() }
    }

    fn answer(&self, token: &str) -> Option<String> {
        self.tokens.lock().expect("challenges lock").get(token).cloned()
    }
}

/// A token offered by [`Challenges::offer`]; withdrawn when dropped.
pub struct Offered {
    challenges: Challenges,
    token: String,
}

impl Drop for Offered {
    fn drop(&mut self) {
        self.challenges.tokens.lock().expect("challenges lock").remove(&self.token);
    }
}

/// The response to the request head `head` (request line and headers).
pub fn respond(head: &[u8], challenges: &Challenges) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (method, target, version) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return response("400 Bad Request", "");
    }
    if method != "GET" && method != "HEAD" {
        return response("405 Method Not Allowed", "");
    }
    // The origin form, or the absolute form a proxy would send ("http://host/path").
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let token = path.strip_prefix(PREFIX).filter(|t| is_token(t));
    match token.and_then(|t| challenges.answer(t)) {
        Some(key_authorization) if method == "GET" => response("200 OK", &key_authorization),
        Some(_) => response("200 OK", ""),
        None => response("404 Not Found", ""),
    }
}

/// RFC 8555 §8.3: a token is base64url, with no padding.
fn is_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn response(status: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
}

/// Answer HTTP-01 requests on `listener` for as long as the server runs.
pub async fn serve(listener: TcpListener, challenges: Challenges) {
    let at_once = Arc::new(Semaphore::new(AT_ONCE));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, mostly: wait instead of spinning.
                tracing::warn!(error = %e, "ACME HTTP-01 listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = at_once.clone().try_acquire_owned() else { continue };
        let challenges = challenges.clone();
        tokio::spawn(async move {
            let _permit = permit;
            answer(stream, &challenges).await;
        });
    }
}

async fn answer(mut stream: TcpStream, challenges: &Challenges) {
    let reply = match tokio::time::timeout(READ_DEADLINE, read_head(&mut stream)).await {
        Ok(Some(head)) => respond(&head, challenges),
        Ok(None) => response("431 Request Header Fields Too Large", ""),
        Err(_) => return,
    };
    let _ = tokio::time::timeout(READ_DEADLINE, async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    })
    .await;
}

/// The request head up to its blank line; None when it is longer than [`MAX_REQUEST`] or the
/// client closed first.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Some(head);
        }
        if head.len() > MAX_REQUEST {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(reply: &[u8]) -> String {
        let text = String::from_utf8_lossy(reply);
        text.lines().next().unwrap().to_string()
    }

    fn body(reply: &[u8]) -> String {
        let text = String::from_utf8_lossy(reply);
        text.split_once("\r\n\r\n").unwrap().1.to_string()
    }

    #[test]
    fn answers_only_offered_tokens() {
        let challenges = Challenges::default();
        let get = |target: &str| respond(format!("GET {target} HTTP/1.1\r\nHost: mail.example.test\r\n\r\n").as_bytes(), &challenges);
        assert_eq!(status(&get("/.well-known/acme-challenge/tok_en-1")), "HTTP/1.1 404 Not Found");
        let offered = challenges.offer("tok_en-1", "tok_en-1.thumbprint");
        let reply = get("/.well-known/acme-challenge/tok_en-1");
        assert_eq!(status(&reply), "HTTP/1.1 200 OK");
        assert_eq!(body(&reply), "tok_en-1.thumbprint");
        assert!(String::from_utf8_lossy(&reply).contains("Content-Length: 19\r\n"));
        assert_eq!(body(&get("http://mail.example.test/.well-known/acme-challenge/tok_en-1")), "tok_en-1.thumbprint");
        for other in ["/", "/.well-known/acme-challenge/", "/.well-known/acme-challenge/other", "/.well-known/acme-challenge/tok_en-1/x"] {
            assert_eq!(status(&get(other)), "HTTP/1.1 404 Not Found", "{other}");
        }
        drop(offered);
        assert_eq!(status(&get("/.well-known/acme-challenge/tok_en-1")), "HTTP/1.1 404 Not Found", "withdrawn after the order");
    }

    #[test]
    fn refuses_what_is_not_a_plain_get() {
        let challenges = Challenges::default();
        let _offered = challenges.offer("t", "t.k");
        assert_eq!(status(&respond(b"POST /.well-known/acme-challenge/t HTTP/1.1\r\n\r\n", &challenges)), "HTTP/1.1 405 Method Not Allowed");
        assert_eq!(body(&respond(b"HEAD /.well-known/acme-challenge/t HTTP/1.1\r\n\r\n", &challenges)), "");
        assert_eq!(status(&respond(b"GET /\r\n\r\n", &challenges)), "HTTP/1.1 400 Bad Request");
        assert_eq!(status(&respond(b"\xff\xfe\r\n\r\n", &challenges)), "HTTP/1.1 400 Bad Request");
    }

    #[tokio::test]
    async fn serves_over_tcp_and_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let challenges = Challenges::default();
        let _offered = challenges.offer("abc", "abc.xyz");
        tokio::spawn(serve(listener, challenges));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET /.well-known/acme-challenge/abc HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(body(&reply), "abc.xyz");
        // An endless head is cut off.
        let mut client = TcpStream::connect(addr).await.unwrap();
        // Exactly one byte too many: all of it is read, so the close is a FIN, not a reset.
        let _ = client.write_all(&[b'a'; MAX_REQUEST + 1]).await;
        let mut reply = Vec::new();
        let _ = client.read_to_end(&mut reply).await;
        assert_eq!(status(&reply), "HTTP/1.1 431 Request Header Fields Too Large");
    }
}
