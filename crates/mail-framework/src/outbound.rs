//! The outbound queue's schedule (SPEC C3, C4, C7): what becomes of a recipient after an
//! attempt — sent, tried again later, or failed — and the reports that go with it. The rows
//! live in [`crate::message::outbound`]; the SMTP client delivers. Time is an argument, so the
//! schedule is tested without waiting.

use std::collections::BTreeMap;

use crate::journal::{self, code};
use rusqlite::Connection;
use store::StoreError;

use crate::bounce::{Action, ReportEntry};
use crate::message::{self, Hold, RecipientState};
use crate::reports::ReportSettings;

pub use crate::message::outbound::Due;

/// What one attempt did for one recipient. `remote_mta` names the host whose reply it was (the
/// Remote-MTA of a report, RFC 3464 §2.3.5); `None` when no remote host answered (DNS trouble, no
/// connection, a loop found here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the next hop; `relayed` = that hop does not offer DSN, so no report will come
    /// from further on (RFC 3461 §6.2.2: "relayed").
    Delivered { reply: String, relayed: bool, remote_mta: Option<String> },
    /// Temporary: try again later (4xx, no answer, DNS trouble).
    Retry { reply: String, remote_mta: Option<String> },
    /// Permanent: report to the sender (5xx, no such domain, null MX, a loop).
    Failed { reply: String, remote_mta: Option<String> },
}

impl Outcome {
    /// Temporary, and no remote host said so.
    pub fn retry(reply: impl Into<String>) -> Self {
        Outcome::Retry { reply: reply.into(), remote_mta: None }
    }

    /// Permanent, and no remote host said so.
    pub fn failed(reply: impl Into<String>) -> Self {
        Outcome::Failed { reply: reply.into(), remote_mta: None }
    }

    /// The same outcome, as `host`'s reply.
    pub fn from_host(self, host: &str) -> Self {
        let remote_mta = Some(host.to_string());
        match self {
            Outcome::Delivered { reply, relayed, .. } => Outcome::Delivered { reply, relayed, remote_mta },
            Outcome::Retry { reply, .. } => Outcome::Retry { reply, remote_mta },
            Outcome::Failed { reply, .. } => Outcome::Failed { reply, remote_mta },
        }
    }

    pub fn reply(&self) -> &str {
        match self {
            Outcome::Delivered { reply, .. } | Outcome::Retry { reply, .. } | Outcome::Failed { reply, .. } => reply,
        }
    }

    /// The host whose reply this was.
    pub fn remote_mta(&self) -> Option<&str> {
        match self {
            Outcome::Delivered { remote_mta, .. } | Outcome::Retry { remote_mta, .. } | Outcome::Failed { remote_mta, .. } => remote_mta.as_deref(),
        }
    }
}

/// The retry schedule (C3): a first level, a second level, and the queue lifetime.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub first_count: u32,
    pub first_interval_secs: i64,
    pub second_count: u32,
    pub second_interval_secs: i64,
    pub lifetime_secs: i64,
    /// After this long a waiting recipient's sender gets one "delayed" report (C4).
    pub delay_warning_secs: i64,
}

/// What the schedule makes of one outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub state: RecipientState,
    pub next_attempt: Option<i64>,
    pub reply: String,
    pub code: &'static str,
    /// Tell the sender once that delivery is delayed (C4).
    pub warn_delay: bool,
}

/// The schedule's verdict on `outcome` for `due`, at `now`.
pub fn decide(due: &Due, outcome: &Outcome, schedule: &Schedule, now: i64) -> Decision {
    let attempts = due.attempts + 1;
    let done = |state, reply: String, code| Decision { state, next_attempt: None, reply, code, warn_delay: false };
    match outcome {
        Outcome::Delivered { reply, .. } => done(RecipientState::Sent, reply.clone(), code::CLIENT_DELIVERED),
        Outcome::Failed { reply, .. } => done(RecipientState::Bounce, reply.clone(), code::CLIENT_UNDELIVERABLE),
        Outcome::Retry { reply, .. } => {
            let first = i64::from(schedule.first_count);
            let total = first + i64::from(schedule.second_count);
            // The report keeps the last error's status, so the sender sees why.
            if now - due.received_at >= schedule.lifetime_secs {
                done(RecipientState::Bounce, format!("{reply} (delivery time expired after {attempts} attempts)"), code::CLIENT_UNDELIVERABLE)
            } else if attempts > total {
                done(RecipientState::Bounce, format!("{reply} (retries exhausted after {attempts} attempts)"), code::CLIENT_UNDELIVERABLE)
            } else {
                let (interval, code) = if attempts <= first {
                    (schedule.first_interval_secs, code::CLIENT_RETRY_1)
                } else {
                    (schedule.second_interval_secs, code::CLIENT_RETRY_2)
                };
                Decision {
                    state: RecipientState::Forward,
                    next_attempt: Some(now + interval),
                    reply: reply.clone(),
                    code,
                    warn_delay: !due.delay_notified && now - due.received_at >= schedule.delay_warning_secs,
                }
            }
        }
    }
}

/// Record attempt `attempt_id`'s outcomes in one transaction. An outcome counts only while the
/// attempt still holds its claim: a recipient deleted during the attempt gets no state change
/// and no report, and a held one no delay report. Reports of one message go out as one report
/// per kind (RFC 3464 allows many recipients per report). Returns how many recipients now wait
/// for the non-delivery snap-in.
pub fn record(
    conn: &Connection,
    attempt_id: i64,
    results: &[(Due, Outcome)],
    schedule: &Schedule,
    reports: &ReportSettings,
    now: i64,
) -> Result<usize, StoreError> {
    let mut bounced = 0;
    let mut to_report: BTreeMap<(i64, Action), (Due, Vec<ReportEntry>)> = BTreeMap::new();
    let mut finished_messages = Vec::new();
    for (due, outcome) in results {
        let decision = decide(due, outcome, schedule, now);
        let attempts = due.attempts + 1;
        let finished = message::outbound::finish(
            conn,
            attempt_id,
            due.recipient_id,
            decision.state,
            attempts,
            decision.next_attempt,
            &decision.reply,
            outcome.remote_mta(),
        )?;
        let Some(hold) = finished else {
            continue; // deleted meanwhile: this attempt no longer speaks for it
        };
        bounced += usize::from(decision.state == RecipientState::Bounce);
        let report = match outcome {
            Outcome::Delivered { reply, relayed: true, .. } => {
                Some((Action::Relayed, "2.0.0".to_string(), format!("{reply} (relayed to a host that does not offer DSN)")))
            }
            Outcome::Retry { reply, .. } if decision.warn_delay && hold == Hold::None => {
                message::outbound::mark_delay_notified(conn, due.recipient_id)?;
                Some((Action::Delayed, crate::bounce::status_of(reply), reply.clone()))
            }
            _ => None,
        };
        if let Some((action, status, diagnostic)) = report
            && !due.mail_from.is_empty()
            && crate::reports::wanted(due.notify.as_deref(), action)
        {
            let entry = ReportEntry {
                recipient: due.address.clone(),
                orcpt: due.orcpt.clone(),
                action,
                status,
                diagnostic,
                remote_mta: outcome.remote_mta().map(str::to_string),
            };
            to_report.entry((due.message_id, action)).or_insert_with(|| (due.clone(), Vec::new())).1.push(entry);
        }
        let detail = match decision.next_attempt {
            Some(at) => format!("attempt {attempts}: {}; next attempt {}", decision.reply, mail_proto::date::rfc5322(at)),
            None => format!("attempt {attempts}: {}", decision.reply),
        };
        let entry = journal::Entry {
            code: decision.code,
            qid: &due.qid,
            originator: &due.mail_from,
            recipient: &due.address,
            size: Some(due.size),
            detail: &detail,
            ..Default::default()
        };
        journal::append(conn, &entry)?;
        if decision.state == RecipientState::Sent {
            finished_messages.push(due.message_id);
        }
    }
    for ((message_id, _), (due, entries)) in to_report {
        if let Some(subject) = message::message(conn, message_id)? {
            crate::reports::queue(conn, reports, &subject, &due.mail_from, &[], message::Origin::Bounce, &entries)?;
        }
    }
    finished_messages.dedup();
    for id in finished_messages {
        message::collect(conn, id)?;
    }
    Ok(bounced)
}

/// Mail held for a dial-up domain (C7) that outlived the queue lifetime fails like any other:
/// the non-delivery snap-in reports it. Returns how many expired.
pub fn expire_etrn_held(conn: &Connection, schedule: &Schedule, now: i64) -> Result<usize, StoreError> {
    let mut n = 0;
    for due in message::outbound::etrn_held_since(conn, now - schedule.lifetime_secs)? {
        let reply = format!("4.4.7 held for ETRN by {}; nobody asked for it within the queue lifetime", due.domain());
        if !message::outbound::expire_held(conn, due.recipient_id, &reply)? {
            continue;
        }
        n += 1;
        let entry = journal::Entry {
            code: code::CLIENT_UNDELIVERABLE,
            qid: &due.qid,
            originator: &due.mail_from,
            recipient: &due.address,
            size: Some(due.size),
            detail: &reply,
            ..Default::default()
        };
        journal::append(conn, &entry)?;
    }
    Ok(n)
}

/// The dial-up domains of C7: their mail waits until ETRN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtrnDomains(Vec<String>);

impl EtrnDomains {
    pub fn new(domains: &[String]) -> Self {
        EtrnDomains(domains.iter().map(|d| d.trim_end_matches('.').to_ascii_lowercase()).collect())
    }

    /// Is `domain` (or a parent of it) a dial-up domain of ours?
    pub fn contains(&self, domain: &str) -> bool {
        let d = domain.trim_end_matches('.').to_ascii_lowercase();
        self.0.iter().any(|e| d == *e || d.ends_with(&format!(".{e}")))
    }

    /// No dial-up domains: nobody has a reason to send ETRN.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Does mail to `address` wait for ETRN?
    pub fn holds(&self, address: &str) -> bool {
        address.rsplit_once('@').is_some_and(|(_, d)| self.contains(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn schedule() -> Schedule {
        Schedule {
            first_count: 2,
            first_interval_secs: 60,
            second_count: 2,
            second_interval_secs: 3600,
            lifetime_secs: 86_400,
            delay_warning_secs: 4 * 3600,
        }
    }

    fn due(attempts: i64, age: i64, delay_notified: bool) -> Due {
        Due {
            recipient_id: 1,
            message_id: 1,
            qid: "Q".into(),
            mail_from: "jane@remote.example".into(),
            address: "far@remote.example".into(),
            attempts,
            size: 10,
            received_at: NOW - age,
            expanded_from: None,
            notify: None,
            orcpt: None,
            ret: None,
            envid: None,
            delay_notified,
            auth_sender: None,
        }
    }

    fn retry() -> Outcome {
        Outcome::retry("451 4.3.0 later")
    }

    #[test]
    fn two_level_retry_intervals() {
        let s = schedule();
        let d = decide(&due(0, 0, false), &retry(), &s, NOW);
        assert_eq!((d.state, d.next_attempt, d.code), (RecipientState::Forward, Some(NOW + 60), code::CLIENT_RETRY_1));
        let d = decide(&due(1, 60, false), &retry(), &s, NOW);
        assert_eq!(d.next_attempt, Some(NOW + 60));
        let d = decide(&due(2, 120, false), &retry(), &s, NOW);
        assert_eq!((d.next_attempt, d.code), (Some(NOW + 3600), code::CLIENT_RETRY_2));
        let d = decide(&due(4, 7300, false), &retry(), &s, NOW);
        assert_eq!(d.state, RecipientState::Bounce);
        assert!(d.reply.contains("retries exhausted after 5 attempts"), "{}", d.reply);
    }

    #[test]
    fn queue_lifetime_ends_retries() {
        let d = decide(&due(1, 86_400, false), &retry(), &schedule(), NOW);
        assert_eq!(d.state, RecipientState::Bounce);
        assert!(d.reply.starts_with("451 4.3.0 later (delivery time expired"), "{}", d.reply);
    }

    #[test]
    fn one_delay_warning() {
        let s = schedule();
        assert!(!decide(&due(1, 3600, false), &retry(), &s, NOW).warn_delay, "too early");
        assert!(decide(&due(1, 4 * 3600, false), &retry(), &s, NOW).warn_delay);
        assert!(!decide(&due(1, 5 * 3600, true), &retry(), &s, NOW).warn_delay, "only once");
    }

    #[test]
    fn outcomes_are_final_or_scheduled() {
        let s = schedule();
        let d = decide(&due(0, 0, false), &Outcome::Delivered { reply: "250 ok".into(), relayed: false, remote_mta: None }, &s, NOW);
        assert_eq!((d.state, d.next_attempt), (RecipientState::Sent, None));
        let failed = Outcome::failed("550 5.1.1 no").from_host("mx.remote.example");
        assert_eq!((failed.reply(), failed.remote_mta()), ("550 5.1.1 no", Some("mx.remote.example")));
        let d = decide(&due(0, 0, false), &failed, &s, NOW);
        assert_eq!((d.state, d.code), (RecipientState::Bounce, code::CLIENT_UNDELIVERABLE));
    }

    #[test]
    fn etrn_domains_and_subdomains() {
        let e = EtrnDomains::new(&["Branch.Example.".into()]);
        assert!(e.holds("a@branch.example") && e.holds("a@x.BRANCH.example"));
        assert!(!e.holds("a@notbranch.example") && !e.contains("example"));
    }
}
