//! `postroom-loadgen`: load generator for the Postroom benchmarks.
//!
//! Drives SMTP (submission of generated messages) and POP3 (retrieval) against a server on the
//! loopback interface and prints one line of JSON with the results. It refuses any address that
//! is not loopback (127.0.0.0/8 or ::1), does no DNS, and every run is bounded by a message or
//! session count and by `--max-seconds`. It never deletes mail over POP3.
#![forbid(unsafe_code)]

mod idle;
mod maildir;
mod msggen;
mod pop3;
mod smtp;
mod stats;
mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "postroom-loadgen", version, about = "Load generator for Postroom benchmarks (loopback only)")]
struct Cli {
    /// Tokio worker threads (0 = one per CPU).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send N generated messages over SMTP with C concurrent clients.
    Smtp {
        /// Server address, IP:PORT on loopback (127.0.0.0/8 or [::1]).
        #[arg(long, value_parser = parse_loopback_addr)]
        addr: SocketAddr,
        /// Messages to send in total.
        #[arg(long, default_value_t = 1000)]
        messages: u64,
        /// Approximate message size in octets (headers included).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Concurrent client tasks.
        #[arg(long, default_value_t = 10)]
        concurrency: usize,
        /// Keep one connection per task (next MAIL right after the 250 for DATA) instead of one
        /// connection per message.
        #[arg(long)]
        reuse: bool,
        /// Envelope sender.
        #[arg(long, default_value = "loadgen@example.test")]
        from: String,
        /// Envelope recipient (repeatable).
        #[arg(long = "to", required = true)]
        to: Vec<String>,
        /// Stop starting new messages after this many seconds.
        #[arg(long, default_value_t = 120.0)]
        max_seconds: f64,
        /// Name sent with EHLO.
        #[arg(long, default_value = "loadgen.example.test")]
        helo: String,
    },
    /// Retrieve mail over POP3 (never deletes).
    Pop3 {
        /// Server address, IP:PORT on loopback (127.0.0.0/8 or [::1]).
        #[arg(long, value_parser = parse_loopback_addr)]
        addr: SocketAddr,
        /// USER:PASSWORD (repeatable).
        #[arg(long = "user", required = true, value_parser = pop3::parse_user)]
        users: Vec<(String, String)>,
        /// Concurrent client tasks.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, value_enum, default_value_t = pop3::Mode::RetrAll)]
        mode: pop3::Mode,
        /// Sessions in total (login-one).
        #[arg(long, default_value_t = 1000)]
        sessions: u64,
        /// Stop starting new sessions after this many seconds.
        #[arg(long, default_value_t = 120.0)]
        max_seconds: f64,
        /// RETR commands in flight per connection (retr-all).
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// Passes over the user list (retr-all, stat): each user's mailbox is read this many
        /// times, so that a small mailbox set still makes a measurable run.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Open N connections, read each greeting, hold them idle, then QUIT them all.
    Idle {
        /// Server address, IP:PORT on loopback (127.0.0.0/8 or [::1]).
        #[arg(long, value_parser = parse_loopback_addr)]
        addr: SocketAddr,
        #[arg(long, value_enum)]
        proto: idle::Proto,
        /// Connections to open and hold.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Connects in flight at once while opening.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
        /// How long to hold them once all are open.
        #[arg(long, default_value_t = 5.0)]
        hold_seconds: f64,
        /// File written (one JSON line: opened, failed) once all are open, before the hold.
        #[arg(long)]
        ready_file: Option<std::path::PathBuf>,
        /// Stop opening new connections after this many seconds.
        #[arg(long, default_value_t = 60.0)]
        max_seconds: f64,
    },
    /// Write N generated messages into a Maildir (DIR/new), e.g. to fill a peer's mailboxes.
    Maildir {
        /// The Maildir (cur/, new/ and tmp/ are created).
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 100)]
        messages: u64,
        /// Approximate message size in octets (headers included).
        #[arg(long, default_value_t = 10240)]
        size: usize,
        #[arg(long, default_value = "loadgen@example.test")]
        from: String,
        #[arg(long = "to", default_value = "user@example.test")]
        to: Vec<String>,
    },
}

/// Parses `IP:PORT` (or `localhost:PORT`, taken as 127.0.0.1 without any lookup) and refuses
/// anything that is not a loopback address.
fn parse_loopback_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = match s.strip_prefix("localhost:") {
        Some(port) => {
            let port = port.parse::<u16>().map_err(|_| format!("bad port in {s:?}"))?;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
        }
        None => s.parse().map_err(|_| format!("{s:?} is not IP:PORT (use 127.0.0.1:PORT or [::1]:PORT; no name lookups)"))?,
    };
    let loopback = match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    };
    if !loopback {
        return Err(format!("refusing {addr}: postroom-loadgen only connects to loopback addresses (127.0.0.0/8 or [::1])"));
    }
    if addr.port() == 0 {
        return Err("port 0 is not a server port".into());
    }
    Ok(addr)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if cli.threads > 0 {
        rt.worker_threads(cli.threads);
    }
    let rt = rt.build()?;
    match cli.cmd {
        Cmd::Smtp { addr, messages, size, concurrency, reuse, from, to, max_seconds, helo } => {
            if !(max_seconds > 0.0 && max_seconds.is_finite()) {
                bail!("--max-seconds must be positive");
            }
            rt.block_on(smtp::run(smtp::SmtpOpts { addr, messages, size, concurrency, reuse, from, to, max_seconds, helo }))
        }
        Cmd::Pop3 { addr, users, concurrency, mode, sessions, max_seconds, window, repeat } => {
            if !(max_seconds > 0.0 && max_seconds.is_finite()) {
                bail!("--max-seconds must be positive");
            }
            rt.block_on(pop3::run(pop3::PopOpts { addr, users, concurrency, mode, sessions, max_seconds, window, repeat: repeat.max(1) }))
        }
        Cmd::Idle { addr, proto, connections, parallel, hold_seconds, ready_file, max_seconds } => {
            if !(max_seconds > 0.0 && max_seconds.is_finite()) {
                bail!("--max-seconds must be positive");
            }
            if !(hold_seconds >= 0.0 && hold_seconds.is_finite() && hold_seconds <= 3600.0) {
                bail!("--hold-seconds must be between 0 and 3600");
            }
            rt.block_on(idle::run(idle::IdleOpts { addr, proto, connections, parallel, hold_seconds, ready_file, max_seconds }))
        }
        Cmd::Maildir { dir, messages, size, from, to } => maildir::run(maildir::MaildirOpts { dir, messages, size, from, to }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert_eq!(parse_loopback_addr("127.0.0.1:2525").unwrap().port(), 2525);
        assert!(parse_loopback_addr("127.8.9.10:25").is_ok());
        assert!(parse_loopback_addr("[::1]:110").is_ok());
        assert!(parse_loopback_addr("[::ffff:127.0.0.1]:110").is_ok());
        assert_eq!(parse_loopback_addr("localhost:25").unwrap(), "127.0.0.1:25".parse::<SocketAddr>().unwrap());
        for bad in ["10.0.0.1:25", "192.168.1.1:25", "8.8.8.8:25", "[::2]:25", "0.0.0.0:25"] {
            let e = parse_loopback_addr(bad).unwrap_err();
            assert!(e.contains("loopback"), "{bad}: {e}");
        }
        assert!(parse_loopback_addr("example.com:25").is_err());
        assert!(parse_loopback_addr("127.0.0.1").is_err());
        assert!(parse_loopback_addr("127.0.0.1:0").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "postroom-loadgen",
            "smtp",
            "--addr",
            "127.0.0.1:25",
            "--to",
            "a@example.test",
            "--to",
            "b@example.test",
            "--reuse",
        ])
        .unwrap();
        assert!(matches!(c.cmd, Cmd::Smtp { reuse: true, ref to, .. } if to.len() == 2));
        assert!(Cli::try_parse_from(["postroom-loadgen", "smtp", "--addr", "10.1.1.1:25", "--to", "a@b"]).is_err());
        let c = Cli::try_parse_from([
            "postroom-loadgen",
            "pop3",
            "--addr",
            "127.0.0.1:110",
            "--user",
            "u1:pw1",
            "--mode",
            "login-one",
            "--sessions",
            "5",
        ])
        .unwrap();
        assert!(matches!(c.cmd, Cmd::Pop3 { mode: pop3::Mode::LoginOne, sessions: 5, .. }));
    }
}
