//! The outbound queue (SPEC C3): recipients in state `forward`, due at `next_attempt`, and what
//! becomes of them after an attempt. The SMTP client delivers; the queue rows and the retry
//! schedule live here, so a restart resumes exactly where the rows say.

use rusqlite::{Connection, params};
use store::StoreError;
use store::journal::{self, code};

use crate::bounce::{Action, ReportEntry};

/// A recipient due for an attempt.
#[derive(Clone, Debug)]
pub struct Due {
    pub recipient_id: i64,
    pub message_id: i64,
    pub qid: String,
    pub mail_from: String,
    pub address: String,
    pub attempts: i64,
    pub size: i64,
    pub received_at: i64,
    /// The alias or forwarding address this recipient came from: sent as `Delivered-To`.
    pub expanded_from: Option<String>,
    /// RFC 3461 parameters, passed on to a next hop that offers DSN.
    pub notify: Option<String>,
    pub orcpt: Option<String>,
    pub ret: Option<String>,
    pub envid: Option<String>,
    pub delay_notified: bool,
}

impl Due {
    /// The recipient's domain, lowercase (the destination a connection is made for).
    pub fn domain(&self) -> String {
        self.address.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase()).unwrap_or_default()
    }
}

/// What one attempt did for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the next hop; `relayed` = that hop does not offer DSN, so no report will come
    /// from further on (RFC 3461 §6.2.2: "relayed").
    Delivered { reply: String, relayed: bool },
    /// Temporary: try again later (4xx, no answer, DNS trouble).
    Retry(String),
    /// Permanent: report to the sender (5xx, no such domain, null MX, a loop).
    Failed(String),
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

/// Recipients due now, oldest first.
pub fn due(conn: &Connection, now: i64, limit: usize) -> Result<Vec<Due>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT r.id, r.message_id, m.qid, m.mail_from, r.address, r.attempts, m.size, m.received_at, r.expanded_from,
                r.notify, r.orcpt, m.dsn_ret, m.dsn_envid, r.delay_notified
           FROM recipients r JOIN messages m ON m.id = r.message_id
          WHERE r.state = 'forward' AND r.held = 0 AND (r.next_attempt IS NULL OR r.next_attempt <= ?1)
          ORDER BY r.message_id, r.id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now, limit as i64], |r| {
        Ok(Due {
            recipient_id: r.get(0)?,
            message_id: r.get(1)?,
            qid: r.get(2)?,
            mail_from: r.get(3)?,
            address: r.get(4)?,
            attempts: r.get(5)?,
            size: r.get(6)?,
            received_at: r.get(7)?,
            expanded_from: r.get(8)?,
            notify: r.get(9)?,
            orcpt: r.get(10)?,
            ret: r.get(11)?,
            envid: r.get(12)?,
            delay_notified: r.get(13)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// When the next waiting recipient falls due (unix seconds), if any.
pub fn next_due(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT min(coalesce(next_attempt, 0)) FROM recipients WHERE state = 'forward' AND held = 0")?
        .query_row([], |r| r.get(0))?)
}

/// The body chunk ids of a message, in order.
pub fn chunk_ids(conn: &Connection, message_id: i64) -> Result<Vec<i64>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT id FROM body_chunks WHERE message_id = ?1 ORDER BY seq")?;
    let rows = stmt.query_map([message_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Record an attempt's outcomes in one transaction. Returns how many recipients now wait for
/// the non-delivery snap-in (state `bounce`).
pub fn record(conn: &Connection, results: &[(Due, Outcome)], schedule: &Schedule, now: i64) -> Result<usize, StoreError> {
    let mut bounced = 0;
    let mut set = conn
        .prepare_cached("UPDATE recipients SET state = ?2, attempts = ?3, next_attempt = ?4, last_reply = ?5 WHERE id = ?1 AND state = 'forward'")?;
    for (due, outcome) in results {
        let attempts = due.attempts + 1;
        let (state, next, reply, code) = match outcome {
            Outcome::Delivered { reply, relayed } => {
                if *relayed {
                    report(conn, due, Action::Relayed, "2.0.0", &format!("{reply} (relayed to a host that does not offer DSN)"))?;
                }
                ("sent", None, reply.clone(), code::CLIENT_DELIVERED)
            }
            Outcome::Failed(reply) => ("bounce", None, reply.clone(), code::CLIENT_UNDELIVERABLE),
            Outcome::Retry(reply) => {
                let first = i64::from(schedule.first_count);
                let total = first + i64::from(schedule.second_count);
                // The report keeps the last error's status, so the sender sees why.
                if now - due.received_at >= schedule.lifetime_secs {
                    ("bounce", None, format!("{reply} (delivery time expired after {attempts} attempts)"), code::CLIENT_UNDELIVERABLE)
                } else if attempts > total {
                    ("bounce", None, format!("{reply} (retries exhausted after {attempts} attempts)"), code::CLIENT_UNDELIVERABLE)
                } else {
                    if !due.delay_notified && now - due.received_at >= schedule.delay_warning_secs {
                        report(conn, due, Action::Delayed, &crate::bounce::status_of(reply), reply)?;
                        conn.prepare_cached("UPDATE recipients SET delay_notified = 1 WHERE id = ?1")?.execute([due.recipient_id])?;
                    }
                    if attempts <= first {
                        ("forward", Some(now + schedule.first_interval_secs), reply.clone(), code::CLIENT_RETRY_1)
                    } else {
                        ("forward", Some(now + schedule.second_interval_secs), reply.clone(), code::CLIENT_RETRY_2)
                    }
                }
            }
        };
        if set.execute(params![due.recipient_id, state, attempts, next, reply])? == 0 {
            continue; // deleted or held meanwhile
        }
        bounced += usize::from(state == "bounce");
        let detail = match next {
            Some(at) => format!("attempt {attempts}: {reply}; next attempt {}", mail_proto::date::rfc5322(at)),
            None => format!("attempt {attempts}: {reply}"),
        };
        let entry = journal::Entry {
            code,
            qid: &due.qid,
            originator: &due.mail_from,
            recipient: &due.address,
            size: Some(due.size),
            detail: &detail,
            ..Default::default()
        };
        journal::append(conn, &entry)?;
        if state == "sent" {
            directory::mailbox::collect_message(conn, due.message_id)?;
        }
    }
    Ok(bounced)
}

/// A success or delay report (C4) for one recipient, when its NOTIFY asks for one.
fn report(conn: &Connection, due: &Due, action: Action, status: &str, diagnostic: &str) -> Result<(), StoreError> {
    if due.mail_from.is_empty() || !crate::reports::wanted(due.notify.as_deref(), action) {
        return Ok(());
    }
    let Some(subject) = crate::reports::Subject::load(conn, due.message_id)? else { return Ok(()) };
    let entry =
        ReportEntry { recipient: due.address.clone(), orcpt: due.orcpt.clone(), action, status: status.into(), diagnostic: diagnostic.into() };
    crate::reports::queue(conn, &subject, &due.mail_from, &[], "bounce", &[entry])?;
    Ok(())
}

/// `postroom queue retry|hold|release|delete ID`: ID is a queue id (all its waiting recipients).
pub fn command(conn: &Connection, qid: &str, what: QueueCommand) -> Result<usize, StoreError> {
    let sql = match what {
        QueueCommand::Retry => {
            "UPDATE recipients SET next_attempt = NULL WHERE state = 'forward' AND message_id = (SELECT id FROM messages WHERE qid = ?1)"
        }
        QueueCommand::Hold => "UPDATE recipients SET held = 1 WHERE state = 'forward' AND message_id = (SELECT id FROM messages WHERE qid = ?1)",
        QueueCommand::Release => "UPDATE recipients SET held = 0 WHERE message_id = (SELECT id FROM messages WHERE qid = ?1)",
        QueueCommand::Delete => {
            "UPDATE recipients SET state = 'deleted' WHERE state IN ('forward', 'queued', 'bounce') AND message_id = (SELECT id FROM messages WHERE qid = ?1)"
        }
    };
    let n = conn.execute(sql, [qid])?;
    if what == QueueCommand::Delete && n > 0 {
        let id: i64 = conn.query_row("SELECT id FROM messages WHERE qid = ?1", [qid], |r| r.get(0))?;
        journal::append(
            conn,
            &journal::Entry {
                code: code::QUEUE_DELETED,
                qid,
                detail: &format!("{n} recipient(s) deleted by the administrator"),
                ..Default::default()
            },
        )?;
        directory::mailbox::collect_message(conn, id)?;
    }
    Ok(n)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueCommand {
    Retry,
    Hold,
    Release,
    Delete,
}

/// The dial-up domains of C7, set once at start-up: their mail waits (held = 2) until ETRN.
static ETRN_DOMAINS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

pub fn set_etrn_domains(domains: Vec<String>) {
    let _ = ETRN_DOMAINS.set(domains.into_iter().map(|d| d.to_ascii_lowercase()).collect());
}

/// The ETRN domain an address belongs to (the domain itself or a parent), if any.
pub fn etrn_domain(address: &str) -> Option<String> {
    let domain = address.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())?;
    ETRN_DOMAINS.get()?.iter().find(|e| domain == **e || domain.ends_with(&format!(".{e}"))).cloned()
}

/// Is `domain` (with `subdomains` for `ETRN @domain`) a dial-up domain of ours?
pub fn is_etrn_domain(domain: &str) -> bool {
    let d = domain.to_ascii_lowercase();
    ETRN_DOMAINS.get().is_some_and(|list| list.iter().any(|e| d == *e || d.ends_with(&format!(".{e}"))))
}

/// Release mail held for `domain` (and its subdomains when asked): due now. Returns how many.
pub fn release_etrn(conn: &Connection, domain: &str, subdomains: bool) -> Result<usize, StoreError> {
    let d = domain.to_ascii_lowercase();
    Ok(conn.execute(
        "UPDATE recipients SET held = 0, next_attempt = NULL
          WHERE held = 2 AND state = 'forward'
            AND (lower(address) LIKE '%@' || ?1 OR (?2 AND lower(address) LIKE '%.' || ?1))",
        params![d, subdomains],
    )?)
}

/// The send scheduler (C7): release everything held for ETRN.
pub fn release_all_etrn(conn: &Connection) -> Result<usize, StoreError> {
    Ok(conn.execute("UPDATE recipients SET held = 0, next_attempt = NULL WHERE held = 2 AND state = 'forward'", [])?)
}
