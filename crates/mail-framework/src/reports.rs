//! Queueing delivery status reports (SPEC C4): each report is a new message from `<>`, queued
//! in the same transaction as the event it reports, so it is sent exactly when the event
//! commits. Who asked for what follows RFC 3461 NOTIFY; without NOTIFY, failures and delays
//! are reported and successes are not.

use crate::journal::{self, code};
use rusqlite::{Connection, OptionalExtension};
use store::StoreError;

use crate::bounce::{self, Action, Attachment, Original, ReportEntry};
use crate::message::{MessageInfo, Origin, body, receive};

/// A report returns the whole message only up to this size; beyond it, the headers.
const MAX_RETURNED: i64 = 10 * 1024 * 1024;
/// Header bytes of the original message attached to a report.
const MAX_HEADERS: usize = 64 * 1024;

/// Report settings, given by `serve` (no process globals: tests in one process vary them).
#[derive(Clone, Debug)]
pub struct ReportSettings {
    /// Signs the reports (Reporting-MTA, From: MAILER-DAEMON@…).
    pub hostname: String,
    /// Reply-To of every report (the DSN responsible person of i5/OS).
    pub responsible_person: Option<String>,
}

impl ReportSettings {
    pub fn new(hostname: &str) -> Self {
        ReportSettings { hostname: hostname.to_string(), responsible_person: None }
    }
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

/// Queue a report to `to` about `subject`; `copies` are further recipients of the same report.
/// Returns the report's queue id.
pub fn queue(
    conn: &Connection,
    settings: &ReportSettings,
    subject: &MessageInfo,
    to: &str,
    copies: &[String],
    origin: Origin,
    entries: &[ReportEntry],
) -> Result<String, StoreError> {
    // RFC 3461 §4.3: RET=FULL returns the whole message in "failed" reports; other reports
    // carry the headers.
    let full_wanted = subject.ret.as_deref() == Some("FULL") && entries.iter().any(|e| e.action == Action::Failed);
    let size = body::stored_size(conn, subject.id)?;
    let full = full_wanted && size <= MAX_RETURNED;
    let head = body::head(conn, subject.id, if full { size as usize } else { MAX_HEADERS + 4 })?;
    let attachment = if full { Attachment::Full(&head) } else { Attachment::Headers(bounce::header_section(&head, MAX_HEADERS)) };
    let original =
        Original { qid: &subject.qid, sender: &subject.mail_from, arrived: subject.received_at, envid: subject.envid.as_deref(), attachment };
    let qid = crate::queue::new_qid();
    let report = bounce::report(&settings.hostname, to, settings.responsible_person.as_deref(), &qid, &original, entries, store::now());
    let mut recipients: Vec<&str> = vec![to];
    recipients.extend(copies.iter().map(String::as_str));
    receive::report(conn, &qid, origin, &report, &recipients)?;
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
