//! Idle connections: open N connections, read each greeting, hold them all for a while (so
//! the server's memory per idle connection can be measured), then QUIT them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::stats::{J, json_line};
use crate::wire::WireReader;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// Expect a `220` greeting; QUIT with `QUIT` (RFC 5321).
    Smtp,
    /// Expect a `+OK` greeting; QUIT with `QUIT` (RFC 1939).
    Pop3,
}

pub struct IdleOpts {
    pub addr: SocketAddr,
    pub proto: Proto,
    pub connections: usize,
    /// Connects in flight at once while opening.
    pub parallel: usize,
    pub hold_seconds: f64,
    /// Written (JSON line) once every connection is open or has failed, before the hold.
    pub ready_file: Option<PathBuf>,
    pub max_seconds: f64,
}

type R = WireReader<TcpStream>;

async fn open_one(addr: SocketAddr, proto: Proto) -> Result<R, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut r = WireReader::new(stream);
    let ok = match proto {
        Proto::Smtp => r.read_smtp_reply().await.map(|c| c == 220),
        Proto::Pop3 => r.read_pop_status().await,
    }
    .map_err(|e| format!("greeting: {e}"))?;
    if ok { Ok(r) } else { Err(format!("greeting: {}", r.text())) }
}

pub async fn run(opts: IdleOpts) -> Result<()> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(opts.max_seconds);
    let mut conns: Vec<R> = Vec::with_capacity(opts.connections);
    let mut failed = 0u64;
    let mut first_error: Option<String> = None;
    let mut pending = tokio::task::JoinSet::new();
    let mut launched = 0usize;
    let parallel = opts.parallel.max(1);
    loop {
        while launched < opts.connections && pending.len() < parallel && Instant::now() < deadline {
            let (addr, proto) = (opts.addr, opts.proto);
            pending.spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), open_one(addr, proto)).await.unwrap_or_else(|_| Err("no greeting within 10 s".into()))
            });
            launched += 1;
        }
        match pending.join_next().await {
            None => break,
            Some(Ok(Ok(r))) => conns.push(r),
            Some(Ok(Err(e))) => {
                failed += 1;
                if first_error.is_none() {
                    eprintln!("postroom-loadgen: unexpected: {e}");
                    first_error = Some(e);
                }
            }
            Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Some(Err(_)) => failed += 1,
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    let ready = json_line(&[("opened", J::U(conns.len() as u64)), ("failed", J::U(failed)), ("open_seconds", J::F(open_secs, 3))]);
    if let Some(p) = &opts.ready_file {
        // Write then rename, so a watcher never sees a partial file.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{ready}\n")).with_context(|| format!("{tmp:?}"))?;
        std::fs::rename(&tmp, p).with_context(|| format!("{p:?}"))?;
    }
    tokio::time::sleep(Duration::from_secs_f64(opts.hold_seconds)).await;
    // Connections the server closed during the hold show up as failed QUITs.
    let mut quits = tokio::task::JoinSet::new();
    for mut r in conns.drain(..) {
        let proto = opts.proto;
        quits.spawn(async move {
            tokio::time::timeout(Duration::from_secs(5), async move {
                r.get_mut().write_all(b"QUIT\r\n").await.ok()?;
                match proto {
                    Proto::Smtp => r.read_smtp_reply().await.ok().map(|c| c == 221),
                    Proto::Pop3 => r.read_pop_status().await.ok(),
                }
            })
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
        });
    }
    let mut quit_ok = 0u64;
    let mut quit_failed = 0u64;
    while let Some(r) = quits.join_next().await {
        if matches!(r, Ok(true)) {
            quit_ok += 1;
        } else {
            quit_failed += 1;
        }
    }
    println!(
        "{}",
        json_line(&[
            ("opened", J::U(quit_ok + quit_failed)),
            ("failed", J::U(failed)),
            ("open_seconds", J::F(open_secs, 3)),
            ("held_seconds", J::F(opts.hold_seconds, 3)),
            ("quit_ok", J::U(quit_ok)),
            ("closed_during_hold", J::U(quit_failed)),
        ])
    );
    Ok(())
}
