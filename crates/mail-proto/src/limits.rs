//! Concurrent-session accounting per server and per client address (SPEC S4, i5/OS prestart
//! job limits). Shared by the SMTP and POP3 listeners; no I/O.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts live sessions; [`SessionLimits::take`] hands out a slot that frees itself on drop.
/// The limits can be changed while sessions run ([`SessionLimits::set_limits`], O6 reload).
#[derive(Clone, Debug)]
pub struct SessionLimits {
    counts: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    max_total: usize,
    max_per_ip: usize,
}

/// A held session slot.
#[derive(Debug)]
pub struct SessionSlot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl SessionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        SessionLimits { counts: Arc::new(Mutex::new(Counts { max_total, max_per_ip, ..Counts::default() })) }
    }

    /// New limits for the sessions that come from now on; the open ones keep their slots (a
    /// lower limit takes effect as they end).
    pub fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        let mut c = self.counts.lock().expect("session counts");
        (c.max_total, c.max_per_ip) = (max_total, max_per_ip);
    }

    /// A slot for a session from `ip`, or `None` when either limit is reached.
    pub fn take(&self, ip: IpAddr) -> Option<SessionSlot> {
        let mut c = self.counts.lock().expect("session counts");
        let per_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= c.max_total || per_ip >= c.max_per_ip {
            return None;
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_default() += 1;
        Some(SessionSlot { counts: self.counts.clone(), ip })
    }

    /// Sessions open now.
    pub fn active(&self) -> usize {
        self.counts.lock().expect("session counts").total
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("session counts");
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_limits_free_on_drop() {
        let limits = SessionLimits::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = limits.take(a).unwrap();
        let _s2 = limits.take(a).unwrap();
        assert!(limits.take(a).is_none());
        let _s3 = limits.take(b).unwrap();
        assert!(limits.take(b).is_none(), "total reached");
        drop(s1);
        assert!(limits.take(a).is_some());
    }

    #[test]
    fn new_limits_apply_to_new_sessions_only() {
        let limits = SessionLimits::new(2, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let (s1, s2) = (limits.take(a).unwrap(), limits.take(a).unwrap());
        limits.set_limits(1, 1);
        assert_eq!(limits.active(), 2, "open sessions keep their slots");
        drop(s1);
        assert!(limits.take(a).is_none(), "one still open: the new limit of 1 is reached");
        drop(s2);
        let _s3 = limits.take(a).unwrap();
        limits.set_limits(3, 3);
        assert!(limits.take(a).is_some());
    }
}
