//! The penalty box (SPEC R9, A5): client addresses denied for a while after abuse — command
//! lines beyond the limits now, failed logins with the TLS/AUTH work. It lives in memory: a
//! restart forgives, a crash never locks the office out. A denied client is not told why.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bound on remembered addresses, so a flood of sources cannot grow it without limit.
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone)]
pub struct PenaltyBox {
    deny_for: Duration,
    denied: Arc<Mutex<HashMap<IpAddr, Instant>>>,
}

impl PenaltyBox {
    pub fn new(deny_for: Duration) -> Self {
        PenaltyBox { deny_for, denied: Arc::default() }
    }

    /// Deny `ip` for the configured time from now.
    pub fn deny(&self, ip: IpAddr) {
        let mut denied = self.denied.lock().expect("penalty box");
        let now = Instant::now();
        if denied.len() >= MAX_ENTRIES {
            denied.retain(|_, until| *until > now);
        }
        if denied.len() < MAX_ENTRIES {
            denied.insert(ip, now + self.deny_for);
        }
    }

    /// Is `ip` denied now? Expired entries are forgotten.
    pub fn is_denied(&self, ip: IpAddr) -> bool {
        let mut denied = self.denied.lock().expect("penalty box");
        match denied.get(&ip) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                denied.remove(&ip);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denies_until_expiry() {
        let pb = PenaltyBox::new(Duration::from_millis(50));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(!pb.is_denied(ip));
        pb.deny(ip);
        assert!(pb.is_denied(ip));
        assert!(!pb.is_denied("192.0.2.2".parse().unwrap()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!pb.is_denied(ip));
    }
}
