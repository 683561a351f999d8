//! The penalty box (SPEC R9, A5): client addresses denied for a while after abuse — command
//! lines beyond the limits, or a burst of failed logins. It lives in memory: a restart forgives,
//! a crash never locks the office out. A denied client is not told why.
//!
//! Failed logins count per client address. Clients on relay-listed (office) networks count per
//! user instead, because a whole office may share one NAT address: one user typing a wrong
//! password must not lock out everyone else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bound on remembered keys, so a flood of sources cannot grow the box without limit.
const MAX_ENTRIES: usize = 100_000;

/// Who a failed login is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Offender {
    Address(IpAddr),
    /// A user on a relay-listed network.
    User(String),
}

/// Login throttling settings (A5).
#[derive(Clone, Copy, Debug)]
pub struct LoginLimits {
    /// Failures within `window` that trigger the cool-down.
    pub failures: u32,
    pub window: Duration,
}

#[derive(Clone)]
pub struct PenaltyBox {
    deny_for: Duration,
    limits: LoginLimits,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// Denied until.
    denied: HashMap<Offender, Instant>,
    /// Recent failed logins.
    failures: HashMap<Offender, Vec<Instant>>,
}

impl PenaltyBox {
    pub fn new(deny_for: Duration, limits: LoginLimits) -> Self {
        PenaltyBox { deny_for, limits, inner: Arc::default() }
    }

    /// Deny `ip` for the configured time from now (R9).
    pub fn deny(&self, ip: IpAddr) {
        let mut inner = self.inner.lock().expect("penalty box");
        inner.deny(Offender::Address(ip), self.deny_for);
    }

    /// Is this client address denied now?
    pub fn is_denied(&self, ip: IpAddr) -> bool {
        self.inner.lock().expect("penalty box").is_denied(&Offender::Address(ip))
    }

    /// Whom a login by `user` from `ip` is counted against.
    pub fn offender(ip: IpAddr, user: &str, relay_listed: bool) -> Offender {
        if relay_listed { Offender::User(user.to_ascii_lowercase()) } else { Offender::Address(ip) }
    }

    /// May this login be tried now? (False during a cool-down.)
    pub fn login_allowed(&self, offender: &Offender) -> bool {
        let inner = &mut *self.inner.lock().expect("penalty box");
        !inner.is_denied(offender)
    }

    /// Count a failed login; returns true when it started a cool-down.
    pub fn login_failed(&self, offender: Offender) -> bool {
        let now = Instant::now();
        let inner = &mut *self.inner.lock().expect("penalty box");
        if inner.failures.len() >= MAX_ENTRIES {
            let window = self.limits.window;
            inner.failures.retain(|_, times| times.last().is_some_and(|t| now.duration_since(*t) < window));
            if inner.failures.len() >= MAX_ENTRIES {
                return false;
            }
        }
        let times = inner.failures.entry(offender.clone()).or_default();
        times.retain(|t| now.duration_since(*t) < self.limits.window);
        times.push(now);
        if times.len() as u32 >= self.limits.failures.max(1) {
            inner.failures.remove(&offender);
            inner.deny(offender, self.deny_for);
            return true;
        }
        false
    }
}

impl Inner {
    fn deny(&mut self, who: Offender, deny_for: Duration) {
        let now = Instant::now();
        if self.denied.len() >= MAX_ENTRIES {
            self.denied.retain(|_, until| *until > now);
        }
        if self.denied.len() < MAX_ENTRIES {
            self.denied.insert(who, now + deny_for);
        }
    }

    fn is_denied(&mut self, who: &Offender) -> bool {
        match self.denied.get(who) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                self.denied.remove(who);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LoginLimits {
        LoginLimits { failures: 3, window: Duration::from_secs(60) }
    }

    #[test]
    fn denies_until_expiry() {
        let pb = PenaltyBox::new(Duration::from_millis(50), limits());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(!pb.is_denied(ip));
        pb.deny(ip);
        assert!(pb.is_denied(ip));
        assert!(!pb.is_denied("192.0.2.2".parse().unwrap()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!pb.is_denied(ip));
    }

    #[test]
    fn failed_logins_lock_the_address_not_others() {
        let pb = PenaltyBox::new(Duration::from_secs(60), limits());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let who = PenaltyBox::offender(a, "sam", false);
        assert!(!pb.login_failed(who.clone()));
        assert!(!pb.login_failed(who.clone()));
        assert!(pb.login_failed(who.clone()), "the third failure starts the cool-down");
        assert!(!pb.login_allowed(&who));
        assert!(pb.is_denied(a), "an address ban refuses connections too");
        assert!(pb.login_allowed(&PenaltyBox::offender("192.0.2.2".parse().unwrap(), "sam", false)));
    }

    #[test]
    fn office_networks_count_per_user() {
        let pb = PenaltyBox::new(Duration::from_secs(60), limits());
        let office: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            pb.login_failed(PenaltyBox::offender(office, "Sam", true));
        }
        assert!(!pb.login_allowed(&PenaltyBox::offender(office, "sam", true)));
        assert!(pb.login_allowed(&PenaltyBox::offender(office, "admin", true)), "colleagues behind the same NAT");
        assert!(!pb.is_denied(office));
    }
}
