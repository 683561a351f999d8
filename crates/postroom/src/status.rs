//! `postroom status` (SPEC O2; i5/OS WRKACTJOB and "checking e-mail servers"): is each listener
//! answering, are the framework worker and the outbound client alive, how deep are the queues.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::commands::open;
use crate::out::outln;
use postroom::config::Config;

/// Written by `serve` every 2 s: the workers' last beats.
pub const STATUS_FILE: &str = "status";
/// A worker silent for longer than this is reported down.
const STALE_SECS: i64 = 15;

/// Print the report; the exit code is 1 when anything is down, or when new mail is refused for
/// lack of space (the storage threshold, F5).
pub fn status(config: &Config) -> anyhow::Result<u8> {
    let listening = std::fs::read_to_string(config.data_dir.join(crate::serve::LISTENING_FILE)).unwrap_or_default();
    if listening.trim().is_empty() {
        outln!("server: down (not running: no {}/listening)", config.data_dir.display());
        return Ok(1);
    }
    let mut down = 0;
    for line in listening.lines() {
        let Some((name, addr)) = line.split_once(' ') else { continue };
        let ok = addr.parse::<SocketAddr>().ok().is_some_and(|a| answers(name, a));
        down += usize::from(!ok);
        outln!("listener {name:<11} {addr:<24} {}", if ok { "up" } else { "DOWN" });
    }
    outln!("{}", crate::cert_cmd::status_line(config));
    let beats = std::fs::read_to_string(config.data_dir.join(STATUS_FILE)).unwrap_or_default();
    let beat = |key: &str| beats.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse::<i64>().ok())).unwrap_or(0);
    let now = store::now();
    for (name, key) in [("framework worker", "framework "), ("outbound client", "outbound ")] {
        let age = now - beat(key);
        let ok = age <= STALE_SECS;
        down += usize::from(!ok);
        outln!("{name:<20} {}", if ok { format!("up (last active {age} s ago)") } else { "DOWN (no sign of life)".to_string() });
    }
    // F5: below `[storage] min_free_mb` the server refuses new mail and the framework waits;
    // nothing is down, but no mail flows: exit status 1 as well.
    match beats.lines().find_map(|l| l.strip_prefix("storage ")).map(str::trim) {
        Some("low") => {
            down += 1;
            outln!(
                "storage: LOW, new mail refused (452) and the framework paused: free space in {} is below [storage] min_free_mb",
                config.data_dir.display()
            );
        }
        Some(_) => outln!("storage: ok"),
        None => outln!("storage: unknown (the server does not report it)"),
    }
    let (store, _) = open(config)?;
    let depths = store.read_blocking(mail_framework::message::admin::depths)?;
    outln!(
        "queue: {} for the framework, {} for delivery ({} in an attempt now), {} held, {} bounces pending",
        depths.for_framework,
        depths.for_delivery,
        depths.in_attempt,
        depths.held,
        depths.bounces
    );
    match depths.oldest {
        Some(at) => outln!("oldest queued message: {} s old ({})", now - at, mail_proto::date::rfc5322(at)),
        None => outln!("oldest queued message: none"),
    }
    Ok(u8::from(down > 0))
}

/// `postroom status --json`: the same facts as one JSON object, for scripts; the same exit code.
/// The queue depths are read even when no server runs.
pub fn status_json(config: &Config) -> anyhow::Result<u8> {
    let listening = std::fs::read_to_string(config.data_dir.join(crate::serve::LISTENING_FILE)).unwrap_or_default();
    let running = !listening.trim().is_empty();
    let listeners: Vec<serde_json::Value> = listening
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, addr)| {
            let up = addr.parse::<SocketAddr>().ok().is_some_and(|a| answers(name, a));
            serde_json::json!({ "name": name, "address": addr, "up": up })
        })
        .collect();
    let beats = if running { std::fs::read_to_string(config.data_dir.join(STATUS_FILE)).unwrap_or_default() } else { String::new() };
    let beat = |key: &str| beats.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse::<i64>().ok()));
    let now = store::now();
    let worker = |key: &str| {
        let age = beat(key).map(|at| now - at);
        serde_json::json!({ "up": age.is_some_and(|a| a <= STALE_SECS), "last_active_secs_ago": age })
    };
    let workers = serde_json::json!({ "framework": worker("framework "), "outbound": worker("outbound ") });
    let storage = beats.lines().find_map(|l| l.strip_prefix("storage ")).map(str::trim);
    let (store, _) = open(config)?;
    let d = store.read_blocking(mail_framework::message::admin::depths)?;
    let ok = running
        && listeners.iter().all(|l| l["up"] == true)
        && ["framework", "outbound"].iter().all(|w| workers[w]["up"] == true)
        && storage != Some("low");
    let report = serde_json::json!({
        "ok": ok,
        "running": running,
        "data_dir": config.data_dir.display().to_string(),
        "listeners": listeners,
        "workers": workers,
        "storage": storage,
        "queue": {
            "for_framework": d.for_framework,
            "for_delivery": d.for_delivery,
            "in_attempt": d.in_attempt,
            "held": d.held,
            "bounces": d.bounces,
            "oldest_age_secs": d.oldest.map(|at| now - at),
        },
    });
    outln!("{report}");
    Ok(u8::from(!ok))
}

/// Does the listener answer? Plain ones must greet (220 / +OK); TLS ones and the metrics
/// endpoint must accept.
fn answers(name: &str, addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    if matches!(name, "smtps" | "pop3s" | "metrics" | "admin") {
        return true;
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && (buf.starts_with(b"220") || buf.starts_with(b"+OK"))
}
