//! `postroom status` (SPEC O2; i5/OS WRKACTJOB and "checking e-mail servers"): is each listener
//! answering, are the framework worker and the outbound client alive, how deep are the queues.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::commands::open;
use postroom::config::Config;

/// Written by `serve` every 2 s: the workers' last beats.
pub const STATUS_FILE: &str = "status";
/// A worker silent for longer than this is reported down.
const STALE_SECS: i64 = 15;

/// Print the report; the exit code is 1 when anything is down.
pub fn status(config: &Config) -> anyhow::Result<u8> {
    let listening = std::fs::read_to_string(config.data_dir.join(crate::serve::LISTENING_FILE)).unwrap_or_default();
    if listening.trim().is_empty() {
        println!("server: down (not running: no {}/listening)", config.data_dir.display());
        return Ok(1);
    }
    let mut down = 0;
    for line in listening.lines() {
        let Some((name, addr)) = line.split_once(' ') else { continue };
        let ok = addr.parse::<SocketAddr>().ok().is_some_and(|a| answers(name, a));
        down += usize::from(!ok);
        println!("listener {name:<11} {addr:<24} {}", if ok { "up" } else { "DOWN" });
    }
    let beats = std::fs::read_to_string(config.data_dir.join(STATUS_FILE)).unwrap_or_default();
    let beat = |key: &str| beats.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse::<i64>().ok())).unwrap_or(0);
    let now = store::now();
    for (name, key) in [("framework worker", "framework "), ("outbound client", "outbound ")] {
        let age = now - beat(key);
        let ok = age <= STALE_SECS;
        down += usize::from(!ok);
        println!("{name:<20} {}", if ok { format!("up (last active {age} s ago)") } else { "DOWN (no sign of life)".to_string() });
    }
    let (store, _) = open(config)?;
    let depths = store.read_blocking(mail_framework::message::admin::depths)?;
    println!(
        "queue: {} for the framework, {} for delivery ({} in an attempt now), {} held, {} bounces pending",
        depths.for_framework, depths.for_delivery, depths.in_attempt, depths.held, depths.bounces
    );
    match depths.oldest {
        Some(at) => println!("oldest queued message: {} s old ({})", now - at, mail_proto::date::rfc5322(at)),
        None => println!("oldest queued message: none"),
    }
    Ok(u8::from(down > 0))
}

/// Does the listener answer? Plain ones must greet (220 / +OK); TLS ones must accept.
fn answers(name: &str, addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    if matches!(name, "smtps" | "pop3s") {
        return true;
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && (buf.starts_with(b"220") || buf.starts_with(b"+OK"))
}
