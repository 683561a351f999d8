//! Queueing delivery status reports (SPEC C4): each report is a new message from `<>`, queued
//! in the same transaction as the event it reports, so it is sent exactly when the event
//! commits. Who asked for what follows RFC 3461 NOTIFY; without NOTIFY, failures and delays
//! are reported and successes are not.

use std::sync::OnceLock;

use rusqlite::{Connection, OptionalExtension, params};
use store::StoreError;
use store::journal::{self, code};

use crate::bounce::{self, Action, Attachment, Original, ReportEntry};

/// A report returns the whole message only up to this size; beyond it, the headers.
const MAX_RETURNED: i64 = 10 * 1024 * 1024;
/// Header bytes of the original message attached to a report.
const MAX_HEADERS: usize = 64 * 1024;

/// Report settings, fixed at start-up.
#[derive(Clone, Debug, Default)]
pub struct ReportSettings {
    pub hostname: String,
    /// Reply-To of every report (the DSN responsible person of i5/OS).
    pub responsible_person: Option<String>,
}

static SETTINGS: OnceLock<ReportSettings> = OnceLock::new();

/// Set once by `serve` (later calls are ignored).
pub fn configure(settings: ReportSettings) {
    let _ = SETTINGS.set(settings);
}

fn settings() -> ReportSettings {
    SETTINGS.get().cloned().unwrap_or_else(|| ReportSettings { hostname: "localhost".into(), responsible_person: None })
}

/// Does this NOTIFY value ask for reports of `action`?
pub fn wanted(notify: Option<&str>, action: Action) -> bool {
    let word = match action {
        Action::Failed => "FAILURE",
        Action::Delayed => "DELAY",
        Action::Delivered | Action::Relayed => "SUCCESS",
    };
    match notify {
        None => matches!(action, Action::Failed | Action::Delayed),
        Some(n) => n.split(',').any(|w| w == word),
    }
}

/// The original message a report is about.
#[derive(Clone, Debug)]
pub struct Subject {
    pub message_id: i64,
    pub qid: String,
    pub sender: String,
    pub received_at: i64,
    pub origin: String,
    pub ret: Option<String>,
    pub envid: Option<String>,
}

impl Subject {
    /// Load by message row id.
    pub fn load(conn: &Connection, message_id: i64) -> Result<Option<Subject>, StoreError> {
        Ok(conn
            .prepare_cached("SELECT qid, mail_from, received_at, origin, dsn_ret, dsn_envid FROM messages WHERE id = ?1")?
            .query_row([message_id], |r| {
                Ok(Subject {
                    message_id,
                    qid: r.get(0)?,
                    sender: r.get(1)?,
                    received_at: r.get(2)?,
                    origin: r.get(3)?,
                    ret: r.get(4)?,
                    envid: r.get(5)?,
                })
            })
            .optional()?)
    }
}

/// Queue a report to `to` about `subject`; `copies` are further recipients of the same report.
/// Returns the report's queue id.
pub fn queue(conn: &Connection, subject: &Subject, to: &str, copies: &[String], origin: &str, entries: &[ReportEntry]) -> Result<String, StoreError> {
    let s = settings();
    // RFC 3461 §4.3: RET=FULL returns the whole message in "failed" reports; other reports
    // carry the headers.
    let full_wanted = subject.ret.as_deref() == Some("FULL") && entries.iter().any(|e| e.action == Action::Failed);
    let size: i64 =
        conn.query_row("SELECT coalesce(sum(length(data)), 0) FROM body_chunks WHERE message_id = ?1", [subject.message_id], |r| r.get(0))?;
    let mut stmt = conn.prepare_cached("SELECT data FROM body_chunks WHERE message_id = ?1 ORDER BY seq")?;
    let mut chunks = stmt.query_map([subject.message_id], |r| r.get::<_, Vec<u8>>(0))?;
    let body: Vec<u8> = if full_wanted && size <= MAX_RETURNED {
        let mut all = Vec::with_capacity(size as usize);
        for c in chunks.by_ref() {
            all.extend_from_slice(&c?);
        }
        all
    } else {
        chunks.next().transpose()?.unwrap_or_default()
    };
    let attachment =
        if full_wanted && size <= MAX_RETURNED { Attachment::Full(&body) } else { Attachment::Headers(bounce::header_section(&body, MAX_HEADERS)) };
    let original = Original { qid: &subject.qid, sender: &subject.sender, arrived: subject.received_at, envid: subject.envid.as_deref(), attachment };
    let qid = crate::queue::new_qid();
    let report = bounce::report(&s.hostname, to, s.responsible_person.as_deref(), &qid, &original, entries, store::now());
    conn.prepare_cached("INSERT INTO messages (qid, complete, mail_from, size, received_at, origin) VALUES (?1, 1, '', ?2, ?3, ?4)")?
        .execute(params![qid, report.len() as i64, store::now(), origin])?;
    let id = conn.last_insert_rowid();
    conn.prepare_cached("INSERT INTO body_chunks (message_id, seq, data) VALUES (?1, 0, ?2)")?.execute(params![id, report])?;
    let mut rcpt = conn.prepare_cached("INSERT INTO recipients (message_id, address, state) VALUES (?1, ?2, 'queued')")?;
    rcpt.execute(params![id, to])?;
    for c in copies.iter().filter(|c| !c.eq_ignore_ascii_case(to)) {
        rcpt.execute(params![id, c])?;
    }
    let detail = format!("report {qid} ({}) to {to} for {} recipient(s)", entries[0].action.as_str(), entries.len());
    journal::append(
        conn,
        &journal::Entry { code: code::NON_DELIVERY_REPORT, qid: &subject.qid, recipient: to, detail: &detail, ..Default::default() },
    )?;
    Ok(qid)
}

/// The NONDELIVERY user of i5/OS: a local address `nondelivery@…` gets a copy of every
/// non-delivery report.
pub fn nondelivery_copy(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT address FROM addresses WHERE address LIKE 'nondelivery@%' ORDER BY address LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?)
}
