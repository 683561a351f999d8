//! POP3 load: retrieve whole mailboxes (`retr-all`) or many short sessions (`login-one`).
//! Never sends DELE: mailboxes are left as they were.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::stats::{J, Stats, json_line, rate};
use crate::wire::WireReader;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Each user once: log in, STAT, RETR every message (pipelined), QUIT.
    RetrAll,
    /// N sessions: log in, RETR 1, QUIT.
    LoginOne,
    /// Each user once: log in, STAT, QUIT; reports mailbox counts (for waiting on delivery).
    Stat,
}

pub struct PopOpts {
    pub addr: SocketAddr,
    pub users: Vec<(String, String)>,
    pub concurrency: usize,
    pub mode: Mode,
    pub sessions: u64,
    pub max_seconds: f64,
    /// RETR commands kept in flight.
    pub window: usize,
    /// Passes over the user list (retr-all, stat).
    pub repeat: usize,
}

struct Shared {
    opts: PopOpts,
    next: AtomicU64,
    next_user: AtomicUsize,
    stats: Stats,
    /// Successful RETRs (retr-all).
    retrieved: AtomicU64,
    /// Messages seen by STAT (stat mode), and the smallest and largest mailbox.
    stat_total: AtomicU64,
    stat_min: AtomicU64,
    stat_max: AtomicU64,
    deadline: Instant,
}

type R = WireReader<TcpStream>;

/// Splits `user:password` at the first colon.
pub fn parse_user(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok((u.to_string(), p.to_string())),
        _ => Err(format!("expected USER:PASSWORD, got {s:?}")),
    }
}

pub async fn run(opts: PopOpts) -> Result<()> {
    anyhow::ensure!(!opts.users.is_empty(), "at least one --user is needed");
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(opts.max_seconds);
    let concurrency = opts.concurrency.max(1);
    let shared = Arc::new(Shared {
        opts,
        next: AtomicU64::new(0),
        next_user: AtomicUsize::new(0),
        stats: Stats::default(),
        retrieved: AtomicU64::new(0),
        stat_total: AtomicU64::new(0),
        stat_min: AtomicU64::new(u64::MAX),
        stat_max: AtomicU64::new(0),
        deadline,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let s = shared.clone();
        match s.opts.mode {
            Mode::RetrAll | Mode::Stat => tasks.spawn(async move { per_user_worker(s).await }),
            Mode::LoginOne => tasks.spawn(async move { login_one_worker(s, t, concurrency).await }),
        };
    }
    crate::stats::join_workers(tasks, deadline, &shared.stats).await;
    let secs = start.elapsed().as_secs_f64();
    let st = &shared.stats;
    st.report_unsampled();
    let line = match shared.opts.mode {
        Mode::RetrAll => {
            let n = st.get(&shared.retrieved);
            let bytes = st.get(&st.bytes);
            json_line(&[
                ("retrieved", J::U(n)),
                ("bytes", J::U(bytes)),
                ("seconds", J::F(secs, 3)),
                ("retr_per_sec", J::F(rate(n as f64, secs), 1)),
                ("mb_per_sec", J::F(rate(bytes as f64 / 1e6, secs), 3)),
                ("users", J::U(st.get(&st.ok))),
                ("errors", J::U(st.get(&st.errors))),
                ("unfinished", J::U(st.unfinished())),
            ])
        }
        Mode::Stat => {
            let users = st.get(&st.ok);
            let min = st.get(&shared.stat_min);
            json_line(&[
                ("users", J::U(users)),
                ("messages", J::U(st.get(&shared.stat_total))),
                ("octets", J::U(st.get(&st.bytes))),
                ("min_messages", J::U(if users == 0 { 0 } else { min })),
                ("max_messages", J::U(st.get(&shared.stat_max))),
                ("errors", J::U(st.get(&st.errors))),
            ])
        }
        Mode::LoginOne => {
            let n = st.get(&st.ok);
            let (p50, p99) = st.percentiles_ms();
            json_line(&[
                ("sessions", J::U(n)),
                ("seconds", J::F(secs, 3)),
                ("sessions_per_sec", J::F(rate(n as f64, secs), 1)),
                ("p50_ms", J::F(p50, 3)),
                ("p99_ms", J::F(p99, 3)),
                ("errors", J::U(st.get(&st.errors))),
                ("unfinished", J::U(st.unfinished())),
            ])
        }
    };
    println!("{line}");
    Ok(())
}

/// Connects, reads the greeting and logs in with USER/PASS (RFC 1939 §7).
async fn login(addr: SocketAddr, user: &str, pass: &str) -> Result<R, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut r = WireReader::new(stream);
    let io = |e: std::io::Error| format!("{user}: {e}");
    if !r.read_pop_status().await.map_err(io)? {
        return Err(format!("greeting: {}", r.text()));
    }
    let cmd = format!("USER {user}\r\n");
    r.get_mut().write_all(cmd.as_bytes()).await.map_err(io)?;
    if !r.read_pop_status().await.map_err(io)? {
        return Err(format!("USER {user}: {}", r.text()));
    }
    let cmd = format!("PASS {pass}\r\n");
    r.get_mut().write_all(cmd.as_bytes()).await.map_err(io)?;
    if !r.read_pop_status().await.map_err(io)? {
        return Err(format!("PASS for {user}: {}", r.text()));
    }
    Ok(r)
}

async fn quit(r: &mut R) -> std::io::Result<bool> {
    r.get_mut().write_all(b"QUIT\r\n").await?;
    r.read_pop_status().await
}

async fn per_user_worker(s: Arc<Shared>) {
    loop {
        if s.stats.past(s.deadline) {
            break;
        }
        let i = s.next_user.fetch_add(1, Ordering::Relaxed);
        if i >= s.opts.users.len() * s.opts.repeat {
            break;
        }
        let (user, pass) = &s.opts.users[i % s.opts.users.len()];
        let r = match s.opts.mode {
            Mode::Stat => stat_only(&s, user, pass).await,
            _ => retr_all(&s, user, pass).await,
        };
        match r {
            Ok(()) => s.stats.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                s.stats.add_error(|| e);
                0
            }
        };
    }
}

/// STAT on the maildrop: (messages, octets) from `+OK nn mm` (RFC 1939 §5).
async fn stat(r: &mut R, user: &str) -> Result<(u64, u64), String> {
    let io = |e: std::io::Error| format!("{user}: {e}");
    r.get_mut().write_all(b"STAT\r\n").await.map_err(io)?;
    if !r.read_pop_status().await.map_err(io)? {
        return Err(format!("STAT for {user}: {}", r.text()));
    }
    let mut f = r.text().split_whitespace().skip(1).map(|n| n.parse::<u64>().ok());
    match (f.next().flatten(), f.next().flatten()) {
        (Some(n), Some(o)) => Ok((n, o)),
        _ => Err(format!("STAT for {user}: unparsable {:?}", r.text())),
    }
}

async fn stat_only(s: &Shared, user: &str, pass: &str) -> Result<(), String> {
    let mut r = login(s.opts.addr, user, pass).await?;
    let (n, octets) = stat(&mut r, user).await?;
    s.stat_total.fetch_add(n, Ordering::Relaxed);
    s.stat_min.fetch_min(n, Ordering::Relaxed);
    s.stat_max.fetch_max(n, Ordering::Relaxed);
    s.stats.bytes.fetch_add(octets, Ordering::Relaxed);
    let io = |e: std::io::Error| format!("{user}: {e}");
    if !quit(&mut r).await.map_err(io)? {
        return Err(format!("QUIT for {user}: {}", r.text()));
    }
    Ok(())
}

/// One user's mailbox: STAT, then RETR 1..=n with up to `window` commands in flight.
async fn retr_all(s: &Shared, user: &str, pass: &str) -> Result<(), String> {
    let mut r = login(s.opts.addr, user, pass).await?;
    let io = |e: std::io::Error| format!("{user}: {e}");
    let (count, _) = stat(&mut r, user).await?;
    let window = s.opts.window.max(1) as u64;
    let (mut next, mut done, mut in_flight) = (1u64, 0u64, 0u64);
    let mut cmds = Vec::with_capacity(16 * window as usize);
    while done < count {
        // Top the window up once half of it has been answered (one write per refill).
        if in_flight <= window / 2 && next <= count {
            cmds.clear();
            while in_flight < window && next <= count {
                cmds.extend_from_slice(format!("RETR {next}\r\n").as_bytes());
                next += 1;
                in_flight += 1;
            }
            r.get_mut().write_all(&cmds).await.map_err(io)?;
        }
        if r.read_pop_status().await.map_err(io)? {
            let n = r.skip_pop_multiline().await.map_err(io)?;
            s.stats.bytes.fetch_add(n, Ordering::Relaxed);
            s.retrieved.fetch_add(1, Ordering::Relaxed);
        } else {
            let msg = done + 1;
            s.stats.add_error(|| format!("RETR {msg} for {user}: {}", r.text()));
        }
        done += 1;
        in_flight -= 1;
        if Instant::now() >= s.deadline + Duration::from_secs(1) {
            return Err(format!("{user}: --max-seconds reached after {done}/{count} messages"));
        }
    }
    if !quit(&mut r).await.map_err(io)? {
        return Err(format!("QUIT for {user}: {}", r.text()));
    }
    Ok(())
}

/// Task `t` of `c` cycles through its own share of the users (users j with j % c == t), so
/// concurrent sessions do not contend for one maildrop lock unless there are fewer users than
/// tasks.
async fn login_one_worker(s: Arc<Shared>, t: usize, c: usize) {
    let users = &s.opts.users;
    let mine: Vec<usize> = if users.len() >= c { (0..users.len()).filter(|j| j % c == t).collect() } else { vec![t % users.len()] };
    let mut k = 0usize;
    loop {
        if s.stats.past(s.deadline) {
            break;
        }
        if s.next.fetch_add(1, Ordering::Relaxed) >= s.opts.sessions {
            break;
        }
        let (user, pass) = &users[mine[k % mine.len()]];
        s.stats.start();
        k += 1;
        let t0 = Instant::now();
        match login_one(&s, user, pass).await {
            Ok(()) => {
                s.stats.add_latency(t0.elapsed());
                s.stats.add_ok(0);
            }
            Err(e) => s.stats.add_error(|| e),
        }
    }
}

async fn login_one(s: &Shared, user: &str, pass: &str) -> Result<(), String> {
    let mut r = login(s.opts.addr, user, pass).await?;
    let io = |e: std::io::Error| format!("{user}: {e}");
    r.get_mut().write_all(b"RETR 1\r\n").await.map_err(io)?;
    if r.read_pop_status().await.map_err(io)? {
        let n = r.skip_pop_multiline().await.map_err(io)?;
        s.stats.bytes.fetch_add(n, Ordering::Relaxed);
    } else {
        // An empty mailbox answers -ERR; the session still counts, but say so once.
        s.stats.sample(|| format!("RETR 1 for {user}: {}", r.text()));
    }
    if !quit(&mut r).await.map_err(io)? {
        return Err(format!("QUIT for {user}: {}", r.text()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_parsing() {
        assert_eq!(parse_user("u1:pw1").unwrap(), ("u1".into(), "pw1".into()));
        assert_eq!(parse_user("u1:p:w").unwrap(), ("u1".into(), "p:w".into()));
        assert!(parse_user("u1").is_err());
        assert!(parse_user(":pw").is_err());
    }
}
