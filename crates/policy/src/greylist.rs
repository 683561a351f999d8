//! Greylisting (issue 21), postgrey's behaviour: the first attempt of a triplet (client network,
//! envelope sender, recipient) is answered 450 4.2.0, and a retry after the delay passes. Real
//! mail servers retry; much bulk software does not. Pure: the stored records and the time are
//! inputs, the records to write are outputs, so the behaviour over hours and days is tested
//! without waiting.
//!
//! * A triplet is keyed by the client's network, not its address: an IPv4 /24, an IPv6 /64, as
//!   postgrey's `--lookup-by-subnet` (a provider's outbound pool retries from a neighbour).
//! * A retry before the delay is still greylisted; the delay counts from the first attempt, which
//!   a retry never resets.
//! * A triplet that never passed within the retry window, or that has not been seen for the
//!   maximum age, starts again as new.
//! * A client network whose triplets passed `auto_allow_after` times (distinct triplets, each
//!   counted at its first pass) is trusted: a sender that retries properly is a real MTA.
//! * Never greylisted: the office's own clients (authenticated, relay-listed, a recent POP3
//!   login — as for the E1 checks), and mail to `postmaster` (RFC 5321 §4.5.1: it must be
//!   accepted; a delay is allowed, but a problem report from a sender that does not retry well
//!   should still reach the administrator). Postgrey does not exempt postmaster; we do.

use std::net::IpAddr;

use directory::greylist::{ClientSeen, Known, Seen, Triplet};
use mail_proto::{Address, Reply};

use crate::{ClientFacts, Decision, RelayPolicy, Rule};

/// The administrator's greylisting settings (`[greylist]`), in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GreylistPolicy {
    pub enabled: bool,
    /// How long after its first attempt a triplet's retry is accepted.
    pub delay_secs: i64,
    /// How long after its first attempt a retry is still taken as one; later it is new again.
    pub retry_window_secs: i64,
    /// How long a passed triplet or an auto-allowed client is remembered after it was last seen.
    pub max_age_secs: i64,
    /// Passed triplets after which a client network is no longer greylisted; 0 = never.
    pub auto_allow_after: u32,
}

impl GreylistPolicy {
    /// Off: what `[greylist]` says by default.
    pub const OFF: GreylistPolicy =
        GreylistPolicy { enabled: false, delay_secs: 300, retry_window_secs: 48 * 3600, max_age_secs: 35 * 86_400, auto_allow_after: 5 };
}

/// The triplet of a client, an envelope sender as the session saw it ("" for `<>`) and a
/// recipient.
pub fn triplet(ip: IpAddr, sender: &str, recipient: &Address) -> Triplet {
    Triplet { network: client_network(ip), sender: sender.to_lowercase(), recipient: recipient.key() }
}

/// The network a client is greylisted by: IPv4 /24 ("192.0.2.0/24"), IPv6 /64
/// ("2001:db8:1:2::/64"); an IPv4-mapped IPv6 address is its IPv4 address.
pub fn client_network(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let net = std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1));
            format!("{net}/64")
        }
    }
}

/// What greylisting decided for one recipient, and what to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GreylistOutcome {
    pub decision: Decision,
    /// The triplet's record to write; `None` leaves it as it is.
    pub triplet: Option<Seen>,
    /// The client network's record to write; `None` leaves it as it is.
    pub client: Option<ClientSeen>,
}

impl GreylistOutcome {
    fn only(decision: Decision) -> Self {
        GreylistOutcome { decision, triplet: None, client: None }
    }

    /// One word for `/metrics` and `explain`: new, early, passed, known, auto-allowed, exempt, off.
    pub fn state(&self) -> &'static str {
        match self.decision.rule {
            Rule::GreylistOff => "off",
            Rule::GreylistNew { .. } => "new",
            Rule::GreylistEarly { .. } => "early",
            Rule::GreylistPassed { .. } => "passed",
            Rule::GreylistKnown { .. } => "known",
            Rule::GreylistAutoAllowed { .. } => "auto-allowed",
            _ => "exempt",
        }
    }
}

impl Decision {
    /// Issue 21: the reply to a greylisted recipient, as postgrey's (450 4.2.0, one line).
    pub fn greylist_reply(&self) -> Option<Reply> {
        match self.rule {
            Rule::GreylistNew { delay: wait } | Rule::GreylistEarly { wait, .. } if !self.allow => {
                Some(Reply::new(450, (2, 0), format!("Greylisted: try again in {wait} seconds")))
            }
            _ => None,
        }
    }
}

impl GreylistPolicy {
    /// Is this recipient of this client exempt? `None` = it is greylisted; otherwise the rule
    /// that exempts it (greylisting off, one of the office's own clients, postmaster).
    pub fn exemption(&self, relay: &RelayPolicy, c: &ClientFacts, recipient: &Address) -> Option<Rule> {
        if !self.enabled {
            return Some(Rule::GreylistOff);
        }
        if let Some(rule) = relay.own_client(c) {
            return Some(rule);
        }
        recipient.is_postmaster().then_some(Rule::Postmaster)
    }

    /// The whole decision for a client that is not exempt: `known` is what the store holds for
    /// the triplet and its client network, `now` unix seconds.
    pub fn check(&self, network: &str, known: &Known, now: i64) -> GreylistOutcome {
        let alive = |last_seen: i64| now - last_seen <= self.max_age_secs;
        let client_passed = known.client.filter(|c| alive(c.last_seen)).map_or(0, |c| c.passed_triplets);
        if self.auto_allow_after > 0 && client_passed >= self.auto_allow_after {
            let client = ClientSeen { passed_triplets: client_passed, last_seen: now };
            let rule = Rule::GreylistAutoAllowed { network: network.to_string(), passed: client_passed };
            return GreylistOutcome { client: Some(client), ..GreylistOutcome::only(Decision::allow(rule)) };
        }
        // A known client's record is kept fresh while it delivers, so it outlives its triplets.
        let refreshed = known.client.map(|_| ClientSeen { passed_triplets: client_passed, last_seen: now });
        match known.triplet {
            // Passed before and seen within the maximum age: passes again.
            Some(s) if s.passed > 0 && alive(s.last_seen) => {
                let seen = Seen { last_seen: now, passed: s.passed.saturating_add(1), ..s };
                let rule = Rule::GreylistKnown { passed: s.passed };
                GreylistOutcome { triplet: Some(seen), client: refreshed, ..GreylistOutcome::only(Decision::allow(rule)) }
            }
            // Still greylisted, within its retry window.
            Some(s) if s.passed == 0 && (0..=self.retry_window_secs).contains(&(now - s.first_seen)) => {
                let waited = now - s.first_seen;
                if waited < self.delay_secs {
                    let rule = Rule::GreylistEarly { waited, wait: self.delay_secs - waited };
                    return GreylistOutcome { triplet: Some(Seen { last_seen: now, ..s }), ..GreylistOutcome::only(Decision::refuse(rule)) };
                }
                let passed_triplets = client_passed.saturating_add(1);
                let now_auto_allowed = self.auto_allow_after > 0 && passed_triplets == self.auto_allow_after;
                let rule = Rule::GreylistPassed { waited, now_auto_allowed };
                GreylistOutcome {
                    triplet: Some(Seen { last_seen: now, passed: 1, ..s }),
                    client: Some(ClientSeen { passed_triplets, last_seen: now }),
                    ..GreylistOutcome::only(Decision::allow(rule))
                }
            }
            // Never seen, past its window, or forgotten (or a clock that went back): new.
            _ => {
                let seen = Seen { first_seen: now, last_seen: now, passed: 0 };
                GreylistOutcome { triplet: Some(seen), ..GreylistOutcome::only(Decision::refuse(Rule::GreylistNew { delay: self.delay_secs })) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use directory::access::{AccessLists, ListKind};

    use super::*;
    use crate::{HeloVerify, ListenerAuth, RelayMode, VerifyFrom};

    const T0: i64 = 1_800_000_000;

    fn on() -> GreylistPolicy {
        GreylistPolicy { enabled: true, ..GreylistPolicy::OFF }
    }

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    /// A store in a HashMap: the decision's writes applied as the server applies them.
    #[derive(Default)]
    struct Db {
        triplets: std::collections::HashMap<Triplet, Seen>,
        clients: std::collections::HashMap<String, ClientSeen>,
    }

    impl Db {
        fn attempt(&mut self, p: &GreylistPolicy, ip: &str, sender: &str, rcpt: &str, now: i64) -> GreylistOutcome {
            let t = triplet(ip.parse().unwrap(), sender, &addr(rcpt));
            let known = Known { triplet: self.triplets.get(&t).copied(), client: self.clients.get(&t.network).copied() };
            let o = p.check(&t.network, &known, now);
            if let Some(s) = o.triplet {
                self.triplets.insert(t.clone(), s);
            }
            if let Some(c) = o.client {
                self.clients.insert(t.network.clone(), c);
            }
            o
        }
    }

    /// Issue 21, "done when": a new triplet is held, its retry after the delay passes.
    #[test]
    fn new_triplet_is_held_and_its_retry_after_the_delay_passes() {
        let (p, mut db) = (on(), Db::default());
        let first = db.attempt(&p, "192.0.2.7", "Jane@Remote.Example", "sam@example.test", T0);
        assert_eq!(first.decision, Decision { allow: false, rule: Rule::GreylistNew { delay: 300 } });
        assert_eq!(first.state(), "new");
        assert_eq!(first.decision.greylist_reply().unwrap().to_string(), "450 4.2.0 Greylisted: try again in 300 seconds\r\n");
        let early = db.attempt(&p, "192.0.2.7", "jane@remote.example", "SAM@example.test", T0 + 120);
        assert_eq!(early.decision.rule, Rule::GreylistEarly { waited: 120, wait: 180 });
        assert_eq!(early.decision.greylist_reply().unwrap().to_string(), "450 4.2.0 Greylisted: try again in 180 seconds\r\n");
        // The early retry did not move the start: 300 s after the first attempt it passes.
        let retry = db.attempt(&p, "192.0.2.7", "jane@remote.example", "sam@example.test", T0 + 300);
        assert!(retry.decision.allow);
        assert_eq!(retry.decision.rule, Rule::GreylistPassed { waited: 300, now_auto_allowed: false });
        assert_eq!(retry.decision.greylist_reply(), None);
        assert_eq!(retry.client, Some(ClientSeen { passed_triplets: 1, last_seen: T0 + 300 }));
        // From then on the triplet passes at once, for as long as it keeps coming.
        let later = db.attempt(&p, "192.0.2.7", "jane@remote.example", "sam@example.test", T0 + 30 * 86_400);
        assert_eq!(later.decision.rule, Rule::GreylistKnown { passed: 1 });
        let much_later = db.attempt(&p, "192.0.2.7", "jane@remote.example", "sam@example.test", T0 + 60 * 86_400);
        assert_eq!(much_later.decision.rule, Rule::GreylistKnown { passed: 2 }, "35 days since it was last seen, not since the first");
        // Another sender, or another recipient, is another triplet.
        assert_eq!(db.attempt(&p, "192.0.2.7", "bob@remote.example", "sam@example.test", T0 + 400).state(), "new");
        assert_eq!(db.attempt(&p, "192.0.2.7", "jane@remote.example", "kim@example.test", T0 + 400).state(), "new");
    }

    #[test]
    fn retry_window_and_maximum_age_make_a_triplet_new_again() {
        let (p, mut db) = (on(), Db::default());
        db.attempt(&p, "192.0.2.7", "", "sam@example.test", T0);
        // Retried only after the 48-hour window: new, and the delay starts again.
        let late = db.attempt(&p, "192.0.2.7", "", "sam@example.test", T0 + 48 * 3600 + 1);
        assert_eq!(late.decision.rule, Rule::GreylistNew { delay: 300 });
        assert_eq!(late.triplet.unwrap().first_seen, T0 + 48 * 3600 + 1);
        assert!(db.attempt(&p, "192.0.2.7", "", "sam@example.test", T0 + 48 * 3600 + 301).decision.allow);
        // Passed, then silent for longer than max_age: forgotten.
        let forgotten = db.attempt(&p, "192.0.2.7", "", "sam@example.test", T0 + 48 * 3600 + 301 + 35 * 86_400 + 1);
        assert_eq!(forgotten.state(), "new");
        // A clock that went back is no reason to let a triplet through.
        let mut db = Db::default();
        db.attempt(&p, "192.0.2.7", "", "sam@example.test", T0);
        assert_eq!(db.attempt(&p, "192.0.2.7", "", "sam@example.test", T0 - 3600).state(), "new");
    }

    #[test]
    fn ipv4_by_24_and_ipv6_by_64() {
        assert_eq!(client_network("192.0.2.77".parse().unwrap()), "192.0.2.0/24");
        assert_eq!(client_network("::ffff:192.0.2.77".parse().unwrap()), "192.0.2.0/24");
        assert_eq!(client_network("2001:db8:1:2:aaaa::9".parse().unwrap()), "2001:db8:1:2::/64");
        let (p, mut db) = (on(), Db::default());
        db.attempt(&p, "192.0.2.7", "jane@remote.example", "sam@example.test", T0);
        // A neighbour in the /24 retries for it (a provider's pool); another /24 is new.
        assert!(db.attempt(&p, "192.0.2.200", "jane@remote.example", "sam@example.test", T0 + 300).decision.allow);
        assert_eq!(db.attempt(&p, "192.0.3.7", "jane@remote.example", "sam@example.test", T0 + 300).state(), "new");
        db.attempt(&p, "2001:db8:1:2::1", "jane@remote.example", "sam@example.test", T0);
        assert!(db.attempt(&p, "2001:db8:1:2:ffff::2", "jane@remote.example", "sam@example.test", T0 + 300).decision.allow);
        assert_eq!(db.attempt(&p, "2001:db8:1:3::1", "jane@remote.example", "sam@example.test", T0 + 300).state(), "new");
    }

    #[test]
    fn a_client_that_retried_for_enough_triplets_is_auto_allowed() {
        let p = GreylistPolicy { auto_allow_after: 3, ..on() };
        let mut db = Db::default();
        for (i, rcpt) in ["a@example.test", "b@example.test", "c@example.test"].iter().enumerate() {
            db.attempt(&p, "192.0.2.7", "jane@remote.example", rcpt, T0);
            let passed = db.attempt(&p, "192.0.2.8", "jane@remote.example", rcpt, T0 + 300);
            assert_eq!(passed.decision.rule, Rule::GreylistPassed { waited: 300, now_auto_allowed: i == 2 });
            // A known triplet passing again does not count: each triplet counts once.
            db.attempt(&p, "192.0.2.7", "jane@remote.example", rcpt, T0 + 400);
        }
        let fresh = db.attempt(&p, "192.0.2.99", "someone@else.example", "d@example.test", T0 + 500);
        assert_eq!(fresh.decision, Decision { allow: true, rule: Rule::GreylistAutoAllowed { network: "192.0.2.0/24".into(), passed: 3 } });
        assert_eq!(fresh.state(), "auto-allowed");
        assert_eq!(fresh.triplet, None, "an auto-allowed client's triplets are not recorded");
        // Still auto-allowed while it keeps delivering; forgotten after max_age of silence.
        assert!(db.attempt(&p, "192.0.2.1", "x@else.example", "e@example.test", T0 + 30 * 86_400).decision.allow);
        assert_eq!(db.attempt(&p, "192.0.2.1", "x@else.example", "f@example.test", T0 + 66 * 86_400).state(), "new");
        // auto_allow_after = 0: never.
        let never = GreylistPolicy { auto_allow_after: 0, ..on() };
        let mut db = Db::default();
        for rcpt in ["a@example.test", "b@example.test", "c@example.test", "d@example.test", "e@example.test", "f@example.test"] {
            db.attempt(&never, "192.0.2.7", "", rcpt, T0);
            assert!(db.attempt(&never, "192.0.2.7", "", rcpt, T0 + 300).decision.allow);
        }
        assert_eq!(db.attempt(&never, "192.0.2.7", "", "g@example.test", T0 + 300).state(), "new");
    }

    #[test]
    fn own_clients_and_postmaster_are_exempt() {
        let mut l = AccessLists::default();
        l.relay.push(ListKind::Relay.canonical("127.0.0.16/30").unwrap().parse().unwrap());
        let relay = RelayPolicy {
            mode: RelayMode::None,
            pop_minutes: 15,
            override_reject_connect: false,
            percent_routing: false,
            helo_verify: HeloVerify::Off,
            primary_domain: "example.test".into(),
            verify_from_user: VerifyFrom::Off,
            etrn_only_relay_clients: false,
        };
        let client = |ip: &str| ClientFacts {
            ip: ip.parse().unwrap(),
            local_ip: "127.0.0.1".parse().unwrap(),
            lists: Arc::new(l.clone()),
            pop_login_at: None,
            now: T0,
            rbl_listed: None,
            penalised: None,
            authenticated: None,
            listener_auth: ListenerAuth::None,
        };
        let sam = addr("sam@example.test");
        let p = on();
        assert_eq!(p.exemption(&relay, &client("192.0.2.7"), &sam), None);
        assert_eq!(GreylistPolicy::OFF.exemption(&relay, &client("192.0.2.7"), &sam), Some(Rule::GreylistOff));
        let authed = ClientFacts { authenticated: Some("sam".into()), ..client("192.0.2.7") };
        assert_eq!(p.exemption(&relay, &authed, &sam), Some(Rule::Authenticated("sam".into())));
        assert_eq!(p.exemption(&relay, &client("127.0.0.17"), &sam), Some(Rule::RelayList("127.0.0.16/30".into())));
        let pop = ClientFacts { pop_login_at: Some(T0 - 60), ..client("192.0.2.7") };
        assert_eq!(p.exemption(&relay, &pop, &sam), Some(Rule::PopBeforeSmtp { login_at: T0 - 60, minutes: 15 }));
        let stale_pop = ClientFacts { pop_login_at: Some(T0 - 3600), ..client("192.0.2.7") };
        assert_eq!(p.exemption(&relay, &stale_pop, &sam), None);
        assert_eq!(p.exemption(&relay, &client("192.0.2.7"), &addr("PostMaster@example.test")), Some(Rule::Postmaster));
    }

    #[test]
    fn rules_read_as_the_journal_shows_them() {
        assert_eq!(Rule::GreylistNew { delay: 300 }.to_string(), "new triplet: greylisted for 300 s (issue 21)");
        assert_eq!(
            Rule::GreylistPassed { waited: 312, now_auto_allowed: true }.to_string(),
            "retried after 312 s: greylisting passed; the client network is auto-allowed from now on (issue 21)"
        );
    }
}
