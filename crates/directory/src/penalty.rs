//! The penalty box (SPEC R9, A5): client addresses denied for a while after abuse — command
//! lines beyond the limits, or a burst of failed logins. A denied client is not told why. It
//! lives in memory; `serve` mirrors the denied entries to the database ([`deny_list`]) so the
//! administrator can see and lift them, and reloads them at start. `[penalty] deny_minutes = 0`
//! switches the hack auto-deny (R9) off; failed logins then cool down for the login window.
//!
//! Failed logins count per client address (an IPv6 client by its /64, an IPv4-mapped IPv6
//! address as the IPv4 address). Clients on relay-listed (office) networks count per user
//! instead, because a whole office may share one NAT address: one user typing a wrong password
//! must not lock out everyone else.
//!
//! A login is *reserved* before its password is checked ([`PenaltyBox::reserve_login`]): the
//! check "may this key try now?" and the count of the attempt are one step, and at most one
//! verification per key is in flight, so a burst of simultaneous attempts gets exactly the
//! configured number of verifications before the cool-down. A second attempt for a key waits
//! for the one in flight. When the table is full the box fails closed: keys it does not know
//! yet are refused rather than tried without being counted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;

/// Bound on remembered keys, so a flood of sources cannot grow the box without limit.
const MAX_ENTRIES: usize = 100_000;
/// Bytes of a user name kept in a key (user names are at most 64 long, D1).
pub const MAX_USER_KEY: usize = 64;
/// How long a login waits for another login of the same key to be checked before it is refused
/// as throttled.
const RESERVE_WAIT: Duration = Duration::from_secs(10);
/// A full table is pruned at most this often (pruning walks the whole table).
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// A full table is reported at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Who a failed login is counted against: a client address (an IPv6 /64), or a user on a
/// relay-listed network (lowercase, at most [`MAX_USER_KEY`] bytes). Built only by
/// [`PenaltyBox::offender`] and [`Offender::address`], which normalise.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Offender(Key);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    User(String),
}

impl Offender {
    /// The key of a client address: IPv4-mapped IPv6 as IPv4, other IPv6 addresses by /64.
    pub fn address(ip: IpAddr) -> Self {
        Offender(Key::Address(address_key(ip)))
    }

    /// The key of a user on a relay-listed network: ASCII-lowercase, cut to [`MAX_USER_KEY`] bytes.
    pub fn user(name: &str) -> Self {
        let mut end = name.len().min(MAX_USER_KEY);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        Offender(Key::User(name[..end].to_ascii_lowercase()))
    }

    /// The key as the deny list stores it: the address (an IPv6 /64 as `net/64`) or `user NAME`.
    pub fn key_text(&self) -> String {
        match &self.0 {
            Key::Address(IpAddr::V6(v6)) => format!("{v6}/64"),
            Key::Address(v4) => v4.to_string(),
            Key::User(u) => format!("user {u}"),
        }
    }

    /// Read a key as [`Offender::key_text`] writes it, or as an administrator types it: an
    /// address (normalised: IPv4-mapped IPv6 is IPv4, IPv6 is keyed by its /64), with or without
    /// `/64`, or `user NAME`.
    pub fn parse(text: &str) -> Option<Offender> {
        let t = text.trim();
        if let Some(user) = t.strip_prefix("user ") {
            let user = user.trim();
            return (!user.is_empty()).then(|| Offender::user(user));
        }
        let ip: IpAddr = t.strip_suffix("/64").unwrap_or(t).parse().ok()?;
        Some(Offender::address(ip))
    }

    /// The address this key stands for, if it is one (the network address for IPv6).
    pub fn ip(&self) -> Option<IpAddr> {
        match &self.0 {
            Key::Address(ip) => Some(*ip),
            Key::User(_) => None,
        }
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 clients; an IPv6 client owns at least a /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
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
    capacity: usize,
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
    /// The word the deny list stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CommandLine => "command-line",
            Reason::FailedLogins => "failed-logins",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        match s {
            "command-line" => Some(Reason::CommandLine),
            "failed-logins" => Some(Reason::FailedLogins),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Reason::CommandLine => "hack auto-deny: command line beyond the limits (R9)",
            Reason::FailedLogins => "too many failed logins (A5)",
        }
    }
}

/// Why a login was refused before its password was checked (the client is told only "try
/// again later": SMTP 454 4.7.0, POP3 -ERR [SYS/TEMP]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Throttled {
    /// In the cool-down after failed logins, or denied (R9).
    CoolDown,
    /// The table of offenders is full: keys not in it are refused (fail closed).
    TableFull,
    /// Another login of the same key was still being checked after [`RESERVE_WAIT`].
    Busy,
}

impl Throttled {
    /// For the journal.
    pub fn describe(self) -> &'static str {
        match self {
            Throttled::CoolDown => "refused during a cool-down after failed logins (A5)",
            Throttled::TableFull => "refused: too many clients with failed logins to keep track of, failing closed (A5)",
            Throttled::Busy => "refused: another login from this client was still being checked (A5)",
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Denied until, and why.
    denied: HashMap<Offender, (Instant, Reason)>,
    /// Recent failed logins.
    failures: HashMap<Offender, Vec<Instant>>,
    /// One gate per key with a login being checked or waiting: holding its lock is the one
    /// verification in flight for the key.
    gates: HashMap<Offender, Arc<tokio::sync::Mutex<()>>>,
    last_prune: Option<Instant>,
    last_warning: Option<Instant>,
}

impl PenaltyBox {
    pub fn new(deny_for: Duration, limits: LoginLimits) -> Self {
        Self::with_capacity(deny_for, limits, MAX_ENTRIES)
    }

    /// As [`PenaltyBox::new`], remembering at most `capacity` keys per table.
    pub fn with_capacity(deny_for: Duration, limits: LoginLimits, capacity: usize) -> Self {
        PenaltyBox { deny_for, limits, capacity: capacity.max(1), inner: Arc::default() }
    }

    /// Is the hack auto-deny (R9) on? (`[penalty] deny_minutes = 0` switches it off.)
    pub fn auto_deny(&self) -> bool {
        !self.deny_for.is_zero()
    }

    /// Deny `ip` (its /64 for IPv6) for the configured time from now (R9); false when auto-deny
    /// is off or the table is full.
    pub fn deny(&self, ip: IpAddr) -> bool {
        if !self.auto_deny() {
            return false;
        }
        let mut inner = self.inner.lock().expect("penalty box");
        inner.deny(Offender::address(ip), self.deny_for, Reason::CommandLine, self.capacity)
    }

    /// How long a cool-down after failed logins lasts: the deny time, or the login window when
    /// auto-deny is off (A5 stays on whatever R9 says).
    fn cool_down(&self) -> Duration {
        if self.auto_deny() { self.deny_for } else { self.limits.window }
    }

    /// The entries denied now: key text, unix seconds until, reason (for the deny list).
    pub fn denied_entries(&self) -> Vec<(String, i64, Reason)> {
        let now = Instant::now();
        let unix = store::now();
        let inner = self.inner.lock().expect("penalty box");
        let mut out: Vec<(String, i64, Reason)> = inner
            .denied
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(who, (until, reason))| (who.key_text(), unix + until.duration_since(now).as_secs() as i64 + 1, *reason))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Put an entry back (at start, from the deny list); ignored when it has expired.
    pub fn restore(&self, who: Offender, until_unix: i64, reason: Reason) {
        let left = until_unix - store::now();
        if left > 0 {
            let mut inner = self.inner.lock().expect("penalty box");
            inner.deny(who, Duration::from_secs(left as u64), reason, self.capacity);
        }
    }

    /// Lift an entry (`postroom list remove deny`), with its failed-login count; true if it was
    /// denied.
    pub fn lift(&self, who: &Offender) -> bool {
        let mut inner = self.inner.lock().expect("penalty box");
        inner.failures.remove(who);
        inner.denied.remove(who).is_some()
    }

    /// Is this client address (its /64 for IPv6) denied now? Why?
    pub fn denied(&self, ip: IpAddr) -> Option<Reason> {
        self.inner.lock().expect("penalty box").denied(&Offender::address(ip))
    }

    pub fn is_denied(&self, ip: IpAddr) -> bool {
        self.denied(ip).is_some()
    }

    /// Whom a login by `user` from `ip` is counted against.
    pub fn offender(ip: IpAddr, user: &str, relay_listed: bool) -> Offender {
        if relay_listed { Offender::user(user) } else { Offender::address(ip) }
    }

    /// May this login be tried now? (False during a cool-down.) A hint only: use
    /// [`PenaltyBox::reserve_login`] before checking a password.
    pub fn login_allowed(&self, offender: &Offender) -> bool {
        let now = Instant::now();
        let inner = &mut *self.inner.lock().expect("penalty box");
        inner.denied(offender).is_none() && inner.recent_failures(offender, now, self.limits.window) < self.limits.failures.max(1)
    }

    /// Reserve one login attempt for `offender` before its password is checked. Refused during
    /// a cool-down, and (fail closed) for a key the full table cannot record. While another
    /// attempt of the same key is being checked this waits for it (up to 10 s), then decides
    /// again, so at most one verification per key is in flight and a burst gets no more
    /// verifications than the limit. Report the outcome on the returned [`LoginAttempt`]; one
    /// dropped without an outcome counts as a failure.
    pub async fn reserve_login(&self, offender: Offender) -> Result<LoginAttempt, Throttled> {
        let gate = {
            let inner = &mut *self.inner.lock().expect("penalty box");
            self.admissible(inner, &offender)?;
            inner.gates.entry(offender.clone()).or_default().clone()
        };
        let guard = match tokio::time::timeout(RESERVE_WAIT, gate.lock_owned()).await {
            Ok(guard) => guard,
            Err(_) => {
                self.inner.lock().expect("penalty box").forget_gate(&offender);
                return Err(Throttled::Busy);
            }
        };
        // The failures of the attempt we waited for are counted now: decide again.
        let inner = &mut *self.inner.lock().expect("penalty box");
        if let Err(refused) = self.admissible(inner, &offender) {
            drop(guard);
            inner.forget_gate(&offender);
            return Err(refused);
        }
        Ok(LoginAttempt { pb: self.clone(), offender, gate: Some(guard), outcome: None })
    }

    /// May `offender` start a login now? (Under the lock.)
    fn admissible(&self, inner: &mut Inner, offender: &Offender) -> Result<(), Throttled> {
        let now = Instant::now();
        if inner.denied(offender).is_some() {
            return Err(Throttled::CoolDown);
        }
        if inner.recent_failures(offender, now, self.limits.window) >= self.limits.failures.max(1) {
            // At the limit but not in `denied` (its table was full): still refused.
            return Err(Throttled::CoolDown);
        }
        let known = inner.failures.contains_key(offender) || inner.gates.contains_key(offender);
        if !known && inner.failures.len() >= self.capacity {
            if inner.last_prune.is_none_or(|t| now.duration_since(t) >= PRUNE_EVERY) {
                inner.last_prune = Some(now);
                let window = self.limits.window;
                inner.failures.retain(|_, times| times.last().is_some_and(|t| now.duration_since(*t) < window));
            }
            if inner.failures.len() >= self.capacity {
                if inner.last_warning.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                    inner.last_warning = Some(now);
                    tracing::warn!(
                        entries = inner.failures.len(),
                        "the failed-login table is full: logins from clients not in it are refused until entries expire (A5)"
                    );
                }
                return Err(Throttled::TableFull);
            }
        }
        Ok(())
    }

    /// Count a failed login (under the lock); returns true when it started a cool-down.
    fn count_failure(&self, inner: &mut Inner, offender: &Offender) -> bool {
        let now = Instant::now();
        let window = self.limits.window;
        let times = inner.failures.entry(offender.clone()).or_default();
        times.retain(|t| now.duration_since(*t) < window);
        times.push(now);
        if times.len() as u32 >= self.limits.failures.max(1) {
            if inner.deny(offender.clone(), self.cool_down(), Reason::FailedLogins, self.capacity) {
                inner.failures.remove(offender);
            }
            // Else the denied table is full: the failures at the limit keep refusing the key
            // for the rest of the window (fail closed).
            return true;
        }
        false
    }
}

/// One reserved login attempt (A5): the key's one verification in flight. Report the outcome
/// with [`LoginAttempt::succeeded`], [`LoginAttempt::failed`] or, when no password was checked
/// (the password service was busy, the store failed), [`LoginAttempt::not_checked`]. Dropped
/// without an outcome (the session went away mid-check) it counts as a failure.
#[must_use = "report the outcome of the login attempt"]
pub struct LoginAttempt {
    pb: PenaltyBox,
    offender: Offender,
    gate: Option<OwnedMutexGuard<()>>,
    outcome: Option<Outcome>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    NotChecked,
}

impl LoginAttempt {
    /// Whom this attempt counts against.
    pub fn offender(&self) -> &Offender {
        &self.offender
    }

    /// The password was right.
    pub fn succeeded(mut self) {
        self.settle(Outcome::Succeeded);
    }

    /// The password (or the user) was wrong; true when this started a cool-down.
    pub fn failed(mut self) -> bool {
        self.settle(Outcome::Failed)
    }

    /// No password was checked: the attempt is not counted.
    pub fn not_checked(mut self) {
        self.settle(Outcome::NotChecked);
    }

    fn settle(&mut self, outcome: Outcome) -> bool {
        if self.outcome.is_some() {
            return false;
        }
        self.outcome = Some(outcome);
        let pb = &self.pb;
        let inner = &mut *pb.inner.lock().expect("penalty box");
        let locked = outcome == Outcome::Failed && pb.count_failure(inner, &self.offender);
        // Counted before the gate opens: the next attempt of the key sees this one.
        drop(self.gate.take());
        inner.forget_gate(&self.offender);
        locked
    }
}

impl Drop for LoginAttempt {
    fn drop(&mut self) {
        self.settle(Outcome::Failed);
    }
}

impl Inner {
    /// Deny `who` until `deny_for` from now; false if the full table could not take it.
    fn deny(&mut self, who: Offender, deny_for: Duration, reason: Reason, capacity: usize) -> bool {
        let now = Instant::now();
        if self.denied.len() >= capacity && !self.denied.contains_key(&who) {
            self.denied.retain(|_, (until, _)| *until > now);
            if self.denied.len() >= capacity {
                return false;
            }
        }
        self.denied.insert(who, (now + deny_for, reason));
        true
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

    fn recent_failures(&self, who: &Offender, now: Instant, window: Duration) -> u32 {
        self.failures.get(who).map_or(0, |times| times.iter().filter(|t| now.duration_since(**t) < window).count() as u32)
    }

    /// Drop the gate of `who` when no attempt holds or waits for it any more.
    fn forget_gate(&mut self, who: &Offender) {
        if self.gates.get(who).is_some_and(|gate| Arc::strong_count(gate) == 1) {
            self.gates.remove(who);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn limits() -> LoginLimits {
        LoginLimits { failures: 3, window: Duration::from_secs(60) }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Reserve and fail one attempt; true when it started the cool-down.
    async fn fail(pb: &PenaltyBox, who: &Offender) -> bool {
        pb.reserve_login(who.clone()).await.expect("login allowed").failed()
    }

    #[test]
    fn denies_until_expiry() {
        let pb = PenaltyBox::new(Duration::from_millis(50), limits());
        let ip = ip("192.0.2.1");
        assert!(!pb.is_denied(ip));
        pb.deny(ip);
        assert!(pb.is_denied(ip));
        assert!(!pb.is_denied("192.0.2.2".parse().unwrap()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!pb.is_denied(ip));
    }

    #[tokio::test]
    async fn deny_minutes_zero_switches_auto_deny_off_but_not_login_throttling() {
        let pb = PenaltyBox::new(Duration::ZERO, limits());
        let a = ip("192.0.2.9");
        assert!(!pb.auto_deny() && !pb.deny(a) && !pb.is_denied(a));
        let who = PenaltyBox::offender(a, "sam", false);
        for _ in 0..3 {
            fail(&pb, &who).await;
        }
        assert_eq!(pb.reserve_login(who.clone()).await.err(), Some(Throttled::CoolDown), "A5 still holds");
        let entries = pb.denied_entries();
        assert_eq!(entries.len(), 1);
        assert!(entries[0].1 - store::now() > 50, "cooling down for the login window");
        assert!(pb.lift(&who));
        assert!(pb.reserve_login(who).await.is_ok(), "lifted");
    }

    #[tokio::test]
    async fn failed_logins_lock_the_address_not_others() {
        let pb = PenaltyBox::new(Duration::from_secs(60), limits());
        let a = ip("192.0.2.1");
        let who = PenaltyBox::offender(a, "sam", false);
        assert!(!fail(&pb, &who).await);
        assert!(!fail(&pb, &who).await);
        assert!(fail(&pb, &who).await, "the third failure starts the cool-down");
        assert!(!pb.login_allowed(&who));
        assert_eq!(pb.reserve_login(who.clone()).await.err(), Some(Throttled::CoolDown));
        assert_eq!(pb.denied(a), Some(Reason::FailedLogins), "an address ban refuses connections too");
        let other = PenaltyBox::offender(ip("192.0.2.2"), "sam", false);
        assert!(pb.login_allowed(&other));
        pb.reserve_login(other).await.expect("another address").succeeded();
    }

    #[tokio::test]
    async fn office_networks_count_per_user() {
        let pb = PenaltyBox::new(Duration::from_secs(60), limits());
        let office = ip("10.0.0.1");
        for _ in 0..3 {
            fail(&pb, &PenaltyBox::offender(office, "Sam", true)).await;
        }
        assert!(!pb.login_allowed(&PenaltyBox::offender(office, "sam", true)));
        assert!(pb.login_allowed(&PenaltyBox::offender(office, "admin", true)), "colleagues behind the same NAT");
        assert!(!pb.is_denied(office));
    }

    #[tokio::test]
    async fn successes_and_unchecked_attempts_are_not_counted_a_dropped_one_is() {
        let pb = PenaltyBox::new(Duration::from_secs(60), limits());
        let who = Offender::address(ip("192.0.2.9"));
        for _ in 0..5 {
            pb.reserve_login(who.clone()).await.unwrap().succeeded();
            pb.reserve_login(who.clone()).await.unwrap().not_checked();
        }
        assert!(pb.login_allowed(&who));
        for _ in 0..3 {
            drop(pb.reserve_login(who.clone()).await.unwrap());
        }
        assert!(!pb.login_allowed(&who), "a session that went away mid-check gets no free attempt");
        assert!(pb.inner.lock().unwrap().gates.is_empty(), "gates are forgotten");
    }

    /// A5: 100 simultaneous wrong passwords for one key get exactly `failures` verifications,
    /// never two at once; the rest are refused as throttled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn a_burst_of_attempts_gets_exactly_the_limit_of_verifications() {
        for limit in [1, 3, 5] {
            let pb = PenaltyBox::new(Duration::from_secs(60), LoginLimits { failures: limit, window: Duration::from_secs(60) });
            let who = PenaltyBox::offender(ip("192.0.2.7"), "sam", false);
            let verified = Arc::new(AtomicUsize::new(0));
            let in_flight = Arc::new(AtomicUsize::new(0));
            let max_in_flight = Arc::new(AtomicUsize::new(0));
            let start = Arc::new(tokio::sync::Barrier::new(100));
            let tasks: Vec<_> = (0..100)
                .map(|_| {
                    let (pb, who, start) = (pb.clone(), who.clone(), start.clone());
                    let (verified, in_flight, max_in_flight) = (verified.clone(), in_flight.clone(), max_in_flight.clone());
                    tokio::spawn(async move {
                        start.wait().await;
                        let attempt = pb.reserve_login(who).await?;
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max_in_flight.fetch_max(now, Ordering::SeqCst);
                        verified.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await; // the argon2 check
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        Ok::<bool, Throttled>(attempt.failed())
                    })
                })
                .collect();
            let mut refused = 0;
            let mut cool_downs_started = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(locked) => cool_downs_started += locked as usize,
                    Err(why) => {
                        assert_eq!(why, Throttled::CoolDown);
                        refused += 1;
                    }
                }
            }
            assert_eq!(verified.load(Ordering::SeqCst), limit as usize, "verifications with limit {limit}");
            assert_eq!(refused, 100 - limit as usize);
            assert_eq!(cool_downs_started, 1);
            assert_eq!(max_in_flight.load(Ordering::SeqCst), 1, "one verification in flight per key");
        }
    }

    #[tokio::test]
    async fn a_second_attempt_waits_for_the_first_and_proceeds_after_a_success() {
        let pb = PenaltyBox::new(Duration::from_secs(60), limits());
        let who = Offender::address(ip("192.0.2.8"));
        let first = pb.reserve_login(who.clone()).await.unwrap();
        let second = tokio::spawn({
            let (pb, who) = (pb.clone(), who.clone());
            async move { pb.reserve_login(who).await.map(LoginAttempt::succeeded) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the second attempt waits while the first is checked");
        first.succeeded();
        tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap().expect("then it proceeds");
    }

    #[tokio::test]
    async fn ipv6_clients_are_keyed_by_their_64() {
        let pb = PenaltyBox::new(Duration::from_secs(60), limits());
        let a = ip("2001:db8:1:2::1");
        let same_64 = ip("2001:db8:1:2:ffff:eeee:dddd:cccc");
        let next_64 = ip("2001:db8:1:3::1");
        assert_eq!(Offender::address(a), Offender::address(same_64));
        assert_ne!(Offender::address(a), Offender::address(next_64));
        assert_eq!(Offender::address(a).ip(), Some(ip("2001:db8:1:2::")));
        // IPv4-mapped IPv6 is the IPv4 client, not a /64 of the mapped range.
        assert_eq!(Offender::address(ip("::ffff:192.0.2.1")), Offender::address(ip("192.0.2.1")));
        assert_ne!(Offender::address(ip("::ffff:192.0.2.1")), Offender::address(ip("::ffff:192.0.2.2")));
        for host in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2::3"] {
            fail(&pb, &PenaltyBox::offender(ip(host), "sam", false)).await;
        }
        assert!(pb.is_denied(ip("2001:db8:1:2::99")), "rotating within the /64 does not evade the count");
        assert!(!pb.is_denied(next_64));
        pb.deny(ip("::ffff:198.51.100.1"));
        assert!(pb.is_denied(ip("198.51.100.1")));
    }

    #[tokio::test]
    async fn a_full_table_fails_closed() {
        let pb = PenaltyBox::with_capacity(Duration::from_secs(60), limits(), 10);
        for i in 0..10 {
            fail(&pb, &Offender::address(ip(&format!("192.0.2.{i}")))).await;
        }
        // A new key is refused, not tried uncounted; known keys still try (and are counted).
        let stranger = Offender::address(ip("198.51.100.1"));
        assert_eq!(pb.reserve_login(stranger.clone()).await.err(), Some(Throttled::TableFull));
        assert_eq!(pb.reserve_login(stranger.clone()).await.err(), Some(Throttled::TableFull), "and stays refused");
        let known = Offender::address(ip("192.0.2.3"));
        assert!(pb.login_allowed(&known));
        assert!(!fail(&pb, &known).await);
        assert!(fail(&pb, &known).await, "counting continues for known keys");
        assert_eq!(pb.reserve_login(known).await.err(), Some(Throttled::CoolDown));
        // The ban moved that key to the denied table: one place free again.
        pb.reserve_login(stranger).await.expect("room for one more").failed();
        let another = Offender::address(ip("198.51.100.2"));
        assert_eq!(pb.reserve_login(another).await.err(), Some(Throttled::TableFull));

        // A full denied table keeps the failures at the limit: still refused.
        let pb = PenaltyBox::with_capacity(Duration::from_secs(60), limits(), 2);
        pb.deny(ip("203.0.113.1"));
        pb.deny(ip("203.0.113.2"));
        let who = Offender::address(ip("203.0.113.3"));
        for _ in 0..3 {
            fail(&pb, &who).await;
        }
        assert!(!pb.is_denied(ip("203.0.113.3")), "no room in the denied table");
        assert_eq!(pb.reserve_login(who).await.err(), Some(Throttled::CoolDown));
    }

    #[tokio::test]
    async fn a_full_table_makes_room_once_entries_expire() {
        let pb = PenaltyBox::with_capacity(Duration::from_secs(60), LoginLimits { failures: 3, window: Duration::from_millis(30) }, 4);
        for i in 0..4 {
            fail(&pb, &Offender::address(ip(&format!("192.0.2.{i}")))).await;
        }
        let stranger = Offender::address(ip("198.51.100.1"));
        assert_eq!(pb.reserve_login(stranger.clone()).await.err(), Some(Throttled::TableFull));
        tokio::time::sleep(PRUNE_EVERY + Duration::from_millis(50)).await;
        pb.reserve_login(stranger).await.expect("room after the window").failed();
    }

    #[tokio::test]
    async fn user_keys_are_capped_and_lowercase() {
        let office = ip("10.0.0.1");
        let huge = "A".repeat(100_000);
        let Offender(Key::User(key)) = PenaltyBox::offender(office, &huge, true) else { panic!("a user key") };
        assert_eq!(key, "a".repeat(MAX_USER_KEY));
        assert_eq!(PenaltyBox::offender(office, &huge, true), PenaltyBox::offender(office, &format!("{huge}B"), true));
        assert_eq!(PenaltyBox::offender(office, "Sam", true), PenaltyBox::offender(office, "sAM", true));
        // Multi-byte characters are cut on a character boundary.
        let Offender(Key::User(key)) = Offender::user(&"é".repeat(100)) else { panic!() };
        assert!(key.len() <= MAX_USER_KEY && key.chars().all(|c| c == 'é'));
        // Many huge names are counted together: they cannot flood the table either.
        let pb = PenaltyBox::new(Duration::from_secs(60), limits());
        for i in 0..3 {
            fail(&pb, &PenaltyBox::offender(office, &format!("{huge}{i}"), true)).await;
        }
        assert!(!pb.login_allowed(&PenaltyBox::offender(office, &huge, true)));
    }
}
