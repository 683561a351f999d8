//! The running server's counters, served as `/metrics` (`[metrics] listen`, SPEC issue 15).
//!
//! One process-wide set ([`global`]): the SMTP and POP3 servers and the outbound queue count with
//! one-line calls (`let _session = metrics::session("smtp")`, `metrics::decision(..)`), and the
//! HTTP endpoint of the `postroom` binary sets the values read at scrape time (queue depths, free
//! storage, the argon2 queue) and renders everything with [`Metrics::encode`]. A count is an
//! atomic add, so counting is always on, whether or not anything scrapes.
//!
//! Labels are bounded: listener names, decision stages, SPEC ids, outcomes and queue states —
//! never a client address, user, domain or anything else a client chooses.
#![forbid(unsafe_code)]

use std::fmt::Display;
use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Metrics::encode`]'s text: OpenMetrics 1.0, what Prometheus asks for.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`Metrics::encode_prometheus`]'s text: the classic text format 0.0.4, for
/// clients that do not ask for OpenMetrics (curl, promtool, older scrapers).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Delivery latency buckets, in seconds: from a next hop that answers at once to the queue
/// lifetime (5 days by default).
const LATENCY_BUCKETS: [f64; 12] = [0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, 12.0 * 3600.0, 86400.0, 5.0 * 86400.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Listener {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByRule {
    stage: &'static str,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByOutcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByState {
    state: &'static str,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    sessions: Family<Listener, Counter>,
    sessions_active: Family<Listener, Gauge>,
    accepts: Family<ByRule, Counter>,
    refusals: Family<ByRule, Counter>,
    messages_received: Counter,
    delivery_attempts: Family<ByOutcome, Counter>,
    delivery_latency: Histogram,
    pop3_logins: Family<ByOutcome, Counter>,
    pop3_retrieved: Counter,
    greylist: Family<ByOutcome, Counter>,
    queue_depth: Family<ByState, Gauge>,
    queue_oldest_age: Gauge,
    argon2_waiting: Gauge,
    argon2_capacity: Gauge,
    storage_free: Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("postroom");
        let m = Metrics {
            sessions: Family::default(),
            sessions_active: Family::default(),
            accepts: Family::default(),
            refusals: Family::default(),
            messages_received: Counter::default(),
            delivery_attempts: Family::default(),
            delivery_latency: Histogram::new(LATENCY_BUCKETS),
            pop3_logins: Family::default(),
            pop3_retrieved: Counter::default(),
            greylist: Family::default(),
            queue_depth: Family::default(),
            queue_oldest_age: Gauge::default(),
            argon2_waiting: Gauge::default(),
            argon2_capacity: Gauge::default(),
            storage_free: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("sessions", "Sessions accepted, by listener (smtp, submission, smtps, local, pop3, pop3s)", m.sessions.clone());
        r.register("sessions_active", "Sessions open now, by listener", m.sessions_active.clone());
        r.register("accepts", "Policy decisions that accepted, by stage and the SPEC id of the rule that decided", m.accepts.clone());
        r.register("refusals", "Policy decisions that refused, by stage and the SPEC id of the rule that decided", m.refusals.clone());
        r.register("messages_received", "Messages answered 250 by the SMTP server (committed to the queue)", m.messages_received.clone());
        r.register(
            "delivery_attempts",
            "Outbound delivery results per recipient, by outcome (delivered, retry, failed)",
            m.delivery_attempts.clone(),
        );
        r.register_with_unit(
            "delivery_latency",
            "Outbound: from a message's arrival to its acceptance by the next hop",
            Unit::Seconds,
            m.delivery_latency.clone(),
        );
        r.register("pop3_logins", "POP3 logins, by outcome (ok, failed)", m.pop3_logins.clone());
        r.register("pop3_retrieved", "Messages sent by POP3 RETR", m.pop3_retrieved.clone());
        r.register(
            "greylist",
            "Greylisting decisions at RCPT on the MX listener, by outcome (new, early, passed, known, auto-allowed, exempt; issue 21)",
            m.greylist.clone(),
        );
        r.register(
            "queue_depth",
            "Recipients in the queue, by state (framework, delivery, attempt, held, bounce), read at scrape time",
            m.queue_depth.clone(),
        );
        r.register_with_unit(
            "queue_oldest_age",
            "Age of the oldest message with an unfinished recipient; 0 when none",
            Unit::Seconds,
            m.queue_oldest_age.clone(),
        );
        r.register("argon2_queue_waiting", "Password verifications waiting for an argon2 thread", m.argon2_waiting.clone());
        r.register("argon2_queue_capacity", "Password verifications the argon2 queue holds before it refuses", m.argon2_capacity.clone());
        r.register_with_unit("storage_free", "Free space in the data directory's file system", Unit::Bytes, m.storage_free.clone());
        Metrics { registry, ..m }
    }

    /// The text exposition of every metric, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// The same metrics in the classic Prometheus text format 0.0.4: a counter's `# HELP` and
    /// `# TYPE` lines name its sample (`postroom_sessions_total`), and there is no `# UNIT` or
    /// `# EOF` line. Everything else is the same in both formats.
    pub fn encode_prometheus(&self) -> String {
        let open = self.encode();
        let mut out = String::with_capacity(open.len());
        let mut help: Option<&str> = None;
        for line in open.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                help = Some(rest);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
                let name = if kind == "counter" { format!("{name}_total") } else { name.to_string() };
                if let Some(text) = help.take().and_then(|h| h.split_once(' ')).map(|(_, text)| text) {
                    out.push_str(&format!("# HELP {name} {text}\n"));
                }
                out.push_str(&format!("# TYPE {name} {}\n", if kind == "unknown" { "untyped" } else { kind }));
            } else if !(line.starts_with("# UNIT ") || line == "# EOF") {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Scrape time: recipients in the queue in `state`.
    pub fn set_queue_depth(&self, state: &'static str, recipients: i64) {
        self.queue_depth.get_or_create(&ByState { state }).set(recipients);
    }

    /// Scrape time: the oldest unfinished message's age (0 when none).
    pub fn set_queue_oldest_age(&self, secs: i64) {
        self.queue_oldest_age.set(secs.max(0));
    }

    /// Scrape time: the argon2 queue.
    pub fn set_argon2_queue(&self, waiting: usize, capacity: usize) {
        self.argon2_waiting.set(waiting as i64);
        self.argon2_capacity.set(capacity as i64);
    }

    /// Scrape time: free bytes where the data directory is.
    pub fn set_storage_free(&self, bytes: u64) {
        self.storage_free.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// An open session: counted when made, and in `sessions_active` until dropped.
#[must_use = "the session counts as active only while this is held"]
pub struct Session {
    listener: &'static str,
}

impl Drop for Session {
    fn drop(&mut self) {
        global().sessions_active.get_or_create(&Listener { listener: self.listener }).dec();
    }
}

/// A session accepted on `listener` ("smtp", "submission", "smtps", "local", "pop3", "pop3s");
/// hold the result for the session's life.
pub fn session(listener: &'static str) -> Session {
    let m = global();
    m.sessions.get_or_create(&Listener { listener }).inc();
    m.sessions_active.get_or_create(&Listener { listener }).inc();
    Session { listener }
}

/// A policy decision at `stage` ("connect", "helo", "sender", "rcpt", "etrn", ...), labelled by
/// the SPEC id that ends the rule's text (see [`spec_id`]).
pub fn decision(stage: &'static str, allow: bool, rule: &impl Display) {
    let labels = ByRule { stage, rule: spec_id(&rule.to_string()) };
    let m = global();
    if allow {
        m.accepts.get_or_create(&labels).inc()
    } else {
        m.refusals.get_or_create(&labels).inc()
    };
}

/// A refusal made outside the policy functions, e.g. a full session pool (`"S4"`).
pub fn refusal(stage: &'static str, spec: &'static str) {
    global().refusals.get_or_create(&ByRule { stage, rule: spec_id(&format!("({spec})")) }).inc();
}

/// Issue 21: one greylisting decision: "new", "early", "passed", "known", "auto-allowed" or
/// "exempt".
pub fn greylist(outcome: &'static str) {
    global().greylist.get_or_create(&ByOutcome { outcome }).inc();
}

/// A message answered 250.
pub fn message_received() {
    global().messages_received.inc();
}

/// One recipient's outbound result: "delivered" (with the seconds since the message arrived),
/// "retry" or "failed".
pub fn delivery(outcome: &'static str, latency_secs: Option<i64>) {
    let m = global();
    m.delivery_attempts.get_or_create(&ByOutcome { outcome }).inc();
    if let Some(secs) = latency_secs {
        m.delivery_latency.observe(secs.max(0) as f64);
    }
}

/// A POP3 login that succeeded or failed (bad credentials, throttled, mailbox in use).
pub fn pop3_login(ok: bool) {
    global().pop3_logins.get_or_create(&ByOutcome { outcome: if ok { "ok" } else { "failed" } }).inc();
}

/// A message sent by RETR.
pub fn pop3_retr() {
    global().pop3_retrieved.inc();
}

/// The SPEC id a rule's text ends with, as the policy crate writes them: "reject list entry
/// 192.0.2.1 (R4)" → "R4", "POP3 login at … (R1 pop)" → "R1", "… ([tls] allow_plaintext_auth,
/// A1)" → "A1". Only the last parenthesised group is read, and only a letter and one or two
/// digits are taken from it, so what a client sent (a HELO name, an address) can never become a
/// label; anything else is "other".
pub fn spec_id(text: &str) -> String {
    let is_id = |t: &&str| {
        let b = t.as_bytes();
        (2..=3).contains(&b.len()) && b[0].is_ascii_uppercase() && b[1..].iter().all(u8::is_ascii_digit)
    };
    let group = text.trim_end().strip_suffix(')').and_then(|t| t.rfind('(').map(|i| &t[i + 1..]));
    group.and_then(|g| g.split(|c: char| !c.is_ascii_alphanumeric()).rev().find(is_id)).unwrap_or("other").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_ids_come_from_the_last_group_only() {
        for (text, id) in [
            ("reject list entry 192.0.2.0/24 (R4)", "R4"),
            ("listed by zen.example (127.0.0.2) (R4)", "R4"),
            ("reject list entry 1.2.3.4 (R4), overridden by a POP3 login at Mon, 1 Jan 2026 (R5)", "R5"),
            ("POP3 login at Mon, 02 Mar 2026 10:00:00 +0000 within 30 minutes (R1 pop)", "R1"),
            ("credentials without TLS from a loopback client ([tls] allow_plaintext_auth, A1)", "A1"),
            ("HELO name X1.example does not resolve to the client address (R10)", "R10"),
            ("temporary deny list: too many failed logins (A5)", "A5"),
            ("postmaster is always accepted (RFC 5321 4.5.1)", "other"),
            ("kill list entry (A1) spam@x.test", "other"),
            ("no parentheses", "other"),
            ("(S4)", "S4"),
            ("(R100)", "other"),
            ("(r4)", "other"),
        ] {
            assert_eq!(spec_id(text), id, "{text}");
        }
    }

    #[test]
    fn counts_show_in_the_text() {
        {
            let _s = session("smtp");
            decision("rcpt", false, &"relay mode none (R1)");
            decision("rcpt", true, &"local recipient (R2)");
            refusal("connect", "S4");
            message_received();
            delivery("delivered", Some(3));
            pop3_login(true);
            pop3_retr();
            greylist("new");
            global().set_queue_depth("delivery", 7);
            global().set_storage_free(1 << 40);
            let text = global().encode();
            assert!(text.contains("postroom_sessions_active{listener=\"smtp\"} 1"), "{text}");
            assert!(text.ends_with("# EOF\n"), "{text}");
        }
        let classic = global().encode_prometheus();
        for line in [
            "# TYPE postroom_sessions_total counter",
            "# HELP postroom_sessions_total Sessions accepted, by listener (smtp, submission, smtps, local, pop3, pop3s).",
            "postroom_sessions_total{listener=\"smtp\"} 1",
            "# TYPE postroom_delivery_latency_seconds histogram",
            "# TYPE postroom_sessions_active gauge",
        ] {
            assert!(classic.lines().any(|l| l == line), "no {line:?} in\n{classic}");
        }
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT") && !classic.contains("# TYPE postroom_sessions counter"), "{classic}");
        let text = global().encode();
        for line in [
            "postroom_sessions_total{listener=\"smtp\"} 1",
            "postroom_sessions_active{listener=\"smtp\"} 0",
            "postroom_refusals_total{stage=\"rcpt\",rule=\"R1\"} 1",
            "postroom_accepts_total{stage=\"rcpt\",rule=\"R2\"} 1",
            "postroom_refusals_total{stage=\"connect\",rule=\"S4\"} 1",
            "postroom_messages_received_total 1",
            "postroom_delivery_attempts_total{outcome=\"delivered\"} 1",
            "postroom_delivery_latency_seconds_bucket{le=\"5.0\"} 1",
            "postroom_pop3_logins_total{outcome=\"ok\"} 1",
            "postroom_pop3_retrieved_total 1",
            "postroom_greylist_total{outcome=\"new\"} 1",
            "postroom_queue_depth{state=\"delivery\"} 7",
            "postroom_storage_free_bytes 1099511627776",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
