//! SMTP load: C tasks send N messages in total, one connection per message or one per task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::msggen::MessageFactory;
use crate::stats::{J, Stats, json_line, rate};
use crate::wire::WireReader;

pub struct SmtpOpts {
    pub addr: SocketAddr,
    pub messages: u64,
    pub size: usize,
    pub concurrency: usize,
    pub reuse: bool,
    pub from: String,
    pub to: Vec<String>,
    pub max_seconds: f64,
    pub helo: String,
}

struct Shared {
    opts: SmtpOpts,
    factory: MessageFactory,
    /// Envelope commands, sent in one write when the server offers PIPELINING (RFC 2920).
    envelope: Vec<u8>,
    next: AtomicU64,
    stats: Stats,
    deadline: Instant,
}

struct Conn {
    r: WireReader<TcpStream>,
    pipelining: bool,
}

/// Why a message was not accepted; the connection is dropped afterwards.
enum Fail {
    /// The server answered something other than what success needs.
    Reply(String),
    /// Network or protocol failure.
    Io(String),
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Io(e.to_string())
    }
}

pub async fn run(opts: SmtpOpts) -> Result<()> {
    let factory = MessageFactory::new(opts.size, &opts.from, &opts.to);
    let mut envelope = format!("MAIL FROM:<{}>\r\n", opts.from);
    for t in &opts.to {
        envelope.push_str(&format!("RCPT TO:<{t}>\r\n"));
    }
    envelope.push_str("DATA\r\n");
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(opts.max_seconds);
    let concurrency = opts.concurrency.max(1);
    let shared = Arc::new(Shared { opts, factory, envelope: envelope.into_bytes(), next: AtomicU64::new(0), stats: Stats::default(), deadline });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let s = shared.clone();
        tasks.spawn(async move { worker(s).await });
    }
    crate::stats::join_workers(tasks, deadline, &shared.stats).await;
    let secs = start.elapsed().as_secs_f64();
    let st = &shared.stats;
    st.report_unsampled();
    let accepted = st.get(&st.ok);
    let (p50, p99) = st.percentiles_ms();
    println!(
        "{}",
        json_line(&[
            ("accepted", J::U(accepted)),
            ("errors", J::U(st.get(&st.errors))),
            ("seconds", J::F(secs, 3)),
            ("msgs_per_sec", J::F(rate(accepted as f64, secs), 1)),
            ("mb_per_sec", J::F(rate(st.get(&st.bytes) as f64 / 1e6, secs), 3)),
            ("p50_ms", J::F(p50, 3)),
            ("p99_ms", J::F(p99, 3)),
            ("unfinished", J::U(st.unfinished())),
            ("bytes", J::U(st.get(&st.bytes))),
            ("size", J::U(shared.opts.size as u64)),
            ("concurrency", J::U(concurrency as u64)),
            ("reuse", J::U(shared.opts.reuse as u64)),
        ])
    );
    Ok(())
}

async fn worker(s: Arc<Shared>) {
    let mut conn: Option<Conn> = None;
    let mut wire = Vec::with_capacity(s.opts.size + 1024);
    loop {
        if s.stats.past(s.deadline) {
            break;
        }
        let seq = s.next.fetch_add(1, Ordering::Relaxed);
        if seq >= s.opts.messages {
            break;
        }
        s.stats.start();
        let raw_len = s.factory.write_wire(seq, &mut wire);
        let t0 = Instant::now();
        let result = async {
            if conn.is_none() {
                conn = Some(connect(&s).await?);
            }
            let c = conn.as_mut().expect("connected");
            transaction(&s, c, &wire).await
        }
        .await;
        match result {
            Ok(()) => {
                s.stats.add_latency(t0.elapsed());
                s.stats.add_ok(raw_len as u64);
                if !s.opts.reuse
                    && let Some(c) = conn.take()
                {
                    quit(c).await;
                }
            }
            Err(f) => {
                s.stats.add_error(|| match f {
                    Fail::Reply(m) => m,
                    Fail::Io(m) => format!("connection error: {m}"),
                });
                // Start afresh: the session state is unknown after a failure.
                if let Some(c) = conn.take() {
                    quit(c).await;
                }
            }
        }
    }
    if let Some(c) = conn.take() {
        quit(c).await;
    }
}

async fn connect(s: &Shared) -> Result<Conn, Fail> {
    let stream = TcpStream::connect(s.opts.addr).await?;
    stream.set_nodelay(true)?;
    let mut r = WireReader::new(stream);
    let code = r.read_smtp_reply().await?;
    if code != 220 {
        return Err(Fail::Reply(format!("greeting: {}", r.text())));
    }
    let ehlo = format!("EHLO {}\r\n", s.opts.helo);
    r.get_mut().write_all(ehlo.as_bytes()).await?;
    let code = r.read_smtp_reply().await?;
    if code != 250 {
        return Err(Fail::Reply(format!("EHLO: {}", r.text())));
    }
    // RFC 2920: PIPELINING is an EHLO keyword on a line of its own.
    let pipelining = r.text().lines().skip(1).any(|l| {
        let kw = l.get(4..).unwrap_or("").split_whitespace().next().unwrap_or("");
        kw.eq_ignore_ascii_case("PIPELINING")
    });
    Ok(Conn { r, pipelining })
}

async fn transaction(s: &Shared, c: &mut Conn, wire: &[u8]) -> Result<(), Fail> {
    let nrcpt = s.opts.to.len();
    let mut rcpt_ok = 0usize;
    if c.pipelining {
        // MAIL, every RCPT and DATA in one write; then read every reply in order.
        c.r.get_mut().write_all(&s.envelope).await?;
        let mail = c.r.read_smtp_reply().await?;
        let mail_text = (mail != 250).then(|| c.r.text().to_string());
        for t in &s.opts.to {
            let code = c.r.read_smtp_reply().await?;
            if (250..=252).contains(&code) {
                rcpt_ok += 1;
            } else if mail_text.is_none() {
                s.stats.sample(|| format!("RCPT TO:<{t}>: {}", c.r.text()));
            }
        }
        let data = c.r.read_smtp_reply().await?;
        if let Some(t) = mail_text {
            return Err(Fail::Reply(format!("MAIL FROM: {t}")));
        }
        if data != 354 {
            return Err(Fail::Reply(format!("DATA ({rcpt_ok}/{nrcpt} RCPT accepted): {}", c.r.text())));
        }
    } else {
        let mail = format!("MAIL FROM:<{}>\r\n", s.opts.from);
        c.r.get_mut().write_all(mail.as_bytes()).await?;
        if c.r.read_smtp_reply().await? != 250 {
            return Err(Fail::Reply(format!("MAIL FROM: {}", c.r.text())));
        }
        for t in &s.opts.to {
            let cmd = format!("RCPT TO:<{t}>\r\n");
            c.r.get_mut().write_all(cmd.as_bytes()).await?;
            let code = c.r.read_smtp_reply().await?;
            if (250..=252).contains(&code) {
                rcpt_ok += 1;
            } else {
                s.stats.sample(|| format!("RCPT TO:<{t}>: {}", c.r.text()));
            }
        }
        if rcpt_ok == 0 {
            return Err(Fail::Reply("no recipient accepted".into()));
        }
        c.r.get_mut().write_all(b"DATA\r\n").await?;
        if c.r.read_smtp_reply().await? != 354 {
            return Err(Fail::Reply(format!("DATA: {}", c.r.text())));
        }
    }
    c.r.get_mut().write_all(wire).await?;
    let code = c.r.read_smtp_reply().await?;
    if code != 250 {
        return Err(Fail::Reply(format!("end of DATA: {}", c.r.text())));
    }
    Ok(())
}

/// Polite goodbye, bounded so a silent server cannot stall the run.
async fn quit(mut c: Conn) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        if c.r.get_mut().write_all(b"QUIT\r\n").await.is_ok() {
            let _ = c.r.read_smtp_reply().await;
        }
    })
    .await;
}
