//! `[metrics] listen`: `GET /metrics` for Prometheus (issue 15, "Metrics").
//!
//! The counters live in the `metrics` crate, where the SMTP and POP3 servers and the outbound
//! queue count; what is a state rather than an event is read here, at scrape time: the queue
//! depths (one store read), the oldest message's age, the argon2 queue and free storage.
//!
//! A deliberately small HTTP/1.x server: one request per connection, `GET` (or `HEAD`) of
//! `/metrics` only (404 for any other path, 405 for any other method), a request head of at most
//! 8 KiB read within 5 s, at most 4 scrapes at a time. A scraper that asks for OpenMetrics (as
//! Prometheus does) gets it; anyone else gets the classic text format 0.0.4.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use directory::PasswordPool;
use store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The longest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// Time for the request head to arrive, and for the answer to be taken.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; a connection past them is closed.
const MAX_SCRAPES: usize = 4;

/// What a scrape reads besides the counters.
#[derive(Clone)]
pub struct Scrape {
    pub store: Store,
    pub passwords: PasswordPool,
    pub data_dir: PathBuf,
}

/// Serve `/metrics` on `listener` until shutdown.
pub async fn serve(listener: TcpListener, scrape: Scrape, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|down| *down) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                let scrape = scrape.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = answer(stream, &scrape).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, scrape: &Scrape) -> std::io::Result<()> {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", b"request too large\n", true).await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let request = Request::parse(&head);
    let (status, content_type, body) = match &request {
        None => ("400 Bad Request", "text/plain", b"bad request\n".to_vec()),
        Some(r) if r.method != "GET" && r.method != "HEAD" => ("405 Method Not Allowed", "text/plain", b"only GET\n".to_vec()),
        Some(r) if r.path != "/metrics" => ("404 Not Found", "text/plain", b"not found: try /metrics\n".to_vec()),
        Some(r) => {
            refresh(scrape).await;
            let m = ::metrics::global();
            if r.openmetrics {
                ("200 OK", ::metrics::OPENMETRICS_CONTENT_TYPE, m.encode().into_bytes())
            } else {
                ("200 OK", ::metrics::PROMETHEUS_CONTENT_TYPE, m.encode_prometheus().into_bytes())
            }
        }
    };
    let with_body = request.is_none_or(|r| r.method != "HEAD");
    respond(&mut stream, status, content_type, &body, with_body).await
}

/// The values that are states, read now.
async fn refresh(scrape: &Scrape) {
    let m = ::metrics::global();
    match scrape.store.read(mail_framework::message::admin::depths).await {
        Ok(d) => {
            for (state, n) in
                [("framework", d.for_framework), ("delivery", d.for_delivery), ("attempt", d.in_attempt), ("held", d.held), ("bounce", d.bounces)]
            {
                m.set_queue_depth(state, n);
            }
            m.set_queue_oldest_age(d.oldest.map_or(0, |at| store::now() - at));
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot read the queue depths"),
    }
    let (waiting, capacity) = scrape.passwords.queued();
    m.set_argon2_queue(waiting, capacity);
    match fs2::available_space(&scrape.data_dir) {
        Ok(free) => m.set_storage_free(free),
        Err(e) => tracing::warn!(error = %e, "metrics: cannot measure free space"),
    }
}

/// The request head up to its blank line; `None` when it is longer than [`MAX_REQUEST`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(Some(head));
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    /// The client's Accept names OpenMetrics.
    openmetrics: bool,
}

impl Request {
    fn parse(head: &[u8]) -> Option<Request> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.lines();
        let mut first = lines.next()?.split(' ');
        let (method, target, version) = (first.next()?, first.next()?, first.next()?);
        if !version.starts_with("HTTP/1.") || first.next().is_some() {
            return None;
        }
        let path = target.split('?').next().unwrap_or(target).to_string();
        let openmetrics = lines
            .filter_map(|l| l.split_once(':'))
            .any(|(name, value)| name.trim().eq_ignore_ascii_case("accept") && value.to_ascii_lowercase().contains("application/openmetrics-text"));
        Some(Request { method: method.to_string(), path, openmetrics })
    }
}

async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &[u8], with_body: bool) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if with_body {
        bytes.extend_from_slice(body);
    }
    match tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_strictly() {
        let r =
            Request::parse(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n")
                .unwrap();
        assert_eq!(r, Request { method: "GET".into(), path: "/metrics".into(), openmetrics: true });
        let r = Request::parse(b"HEAD / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str(), r.openmetrics), ("HEAD", "/", false));
        for bad in [&b"GET /metrics\r\n\r\n"[..], b"GET /metrics SMTP/1.0\r\n\r\n", b"\xff\xfe\r\n\r\n", b"", b"GET / HTTP/1.1 x\r\n\r\n"] {
            assert_eq!(Request::parse(bad), None, "{bad:?}");
        }
    }
}
