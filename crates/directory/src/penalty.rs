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

/// Why an offender is in the box (for the journal and `explain`, never for the client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A command line beyond the limits (R9).
    CommandLine,
    /// Too many failed logins (A5).
    FailedLogins,
}

impl Reason {
    pub fn describe(self) -> &'static str {
        match self {
            Reason::CommandLine => "hack auto-deny: command line beyond the limits (R9)",
            Reason::FailedLogins => "too many failed logins (A5)",
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Denied until, and why.
    denied: HashMap<Offender, (Instant, Reason)>,
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
        inner.deny(Offender::Address(ip), self.deny_for, Reason::CommandLine);
    }

    /// Is this client address denied now? Why?
    pub fn denied(&self, ip: IpAddr) -> Option<Reason> {
        self.inner.lock().expect("penalty box").denied(&Offender::Address(ip))
    }

    pub fn is_denied(&self, ip: IpAddr) -> bool {
        self.denied(ip).is_some()
    }

    /// Whom a login by `user` from `ip` is counted against.
    pub fn offender(ip: IpAddr, user: &str, relay_listed: bool) -> Offender {
        if relay_listed { Offender::User(user.to_ascii_lowercase()) } else { Offender::Address(ip) }
    }

    /// May this login be tried now? (False during a cool-down.)
    pub fn login_allowed(&self, offender: &Offender) -> bool {
        let inner = &mut *self.inner.lock().expect("penalty box");
        inner.denied(offender).is_none()
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
            inner.deny(offender, self.deny_for, Reason::FailedLogins);
            return true;
        }
        false
    }
}

impl Inner {
    fn deny(&mut self, who: Offender, deny_for: Duration, reason: Reason) {
        let now = Instant::now();
        if self.denied.len() >= MAX_ENTRIES {
            self.denied.retain(|_, (until, _)| *until > now);
        }
        if self.denied.len() < MAX_ENTRIES {
            self.denied.insert(who, (now + deny_for, reason));
        }
    }

    fn denied(&mut self, who: &Offender) -> Option<Reason> {
        match self.denied.get(who) {
            Some((until, reason)) if *until > Instant::now() => Some(*reason),
            Some(_) => {
                self.denied.remove(who);
                None
            }
            None => None,
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
        assert_eq!(pb.denied(a), Some(Reason::FailedLogins), "an address ban refuses connections too");
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
