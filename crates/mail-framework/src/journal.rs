//! Journal rows (SPEC F4) with the i5/OS function codes of the seeds' "Mail server journal
//! entries": the first character names the function, the second the action. Every writer of a
//! journal row uses these constants, so the vocabulary lives in this one module.

use rusqlite::{Connection, params};

/// The journal codes Postroom writes.
pub mod code {
    /// SMTP server: mail received for local delivery (i5/OS 94).
    pub const SMTP_RECEIVED_LOCAL: &str = "94";
    /// SMTP server: mail received for relay (i5/OS 95).
    pub const SMTP_RECEIVED_RELAY: &str = "95";
    /// SMTP server: connection refused (9S).
    pub const SMTP_CONNECTION_REFUSED: &str = "9S";
    /// SMTP server: relay refused (9V).
    pub const SMTP_RELAY_REFUSED: &str = "9V";
    /// SMTP server: message, sender or recipient rejected (9W).
    pub const SMTP_REJECTED: &str = "9W";
    /// SMTP server: a blackhole list could not be queried; the client was let in (fail open).
    pub const SMTP_RBL_ERROR: &str = "9B";
    /// SMTP server: HELO/EHLO name did not match the client address (logged or refused).
    pub const SMTP_HELO_MISMATCH: &str = "9H";
    /// SMTP server: a failed or refused AUTH (A5).
    pub const SMTP_AUTH_FAILED: &str = "9F";
    /// SMTP server: client put on the temporary deny list (hack auto-deny, R9).
    pub const SMTP_HACK_DENY: &str = "9D";
    /// SMTP server: the SPF, DKIM and DMARC verdicts on a message and what was done (E1).
    pub const SMTP_SENDER_AUTH: &str = "9A";
    /// SMTP server: a recipient greylisted, 450 4.2.0 (9G), and a triplet's retry that passed
    /// greylisting (9P) (issue 21).
    pub const SMTP_GREYLISTED: &str = "9G";
    pub const SMTP_GREYLIST_PASSED: &str = "9P";
    /// SMTP server: a milter's verdict on a message, with the milter's name, its reply and
    /// what it changed (issue 21).
    pub const SMTP_MILTER: &str = "9M";
    /// Address resolution tagged a recipient (P2).
    pub const RESOLVED: &str = "P2";
    /// Local delivery into a POP mailbox (B8).
    pub const DELIVERED_LOCAL: &str = "B8";
    /// Recipient failed after acceptance (A1).
    pub const NON_DELIVERY: &str = "A1";
    /// Non-delivery report created and queued to the sender or postmaster (AP).
    pub const NON_DELIVERY_REPORT: &str = "AP";
    /// No report sent: null sender, or a report to the postmaster failed too (A2).
    pub const NON_DELIVERY_DROPPED: &str = "A2";
    /// Forwarding: recipient put on the outbound queue (C6).
    pub const FORWARD_ENQUEUED: &str = "C6";
    /// SMTP client: recipients taken off the outbound queue for an attempt (8B).
    pub const CLIENT_DEQUEUED: &str = "8B";
    /// SMTP client: delivered to the remote host (82).
    pub const CLIENT_DELIVERED: &str = "82";
    /// SMTP client: undeliverable (83).
    pub const CLIENT_UNDELIVERABLE: &str = "83";
    /// SMTP client: put on the first-level retry queue (8C).
    pub const CLIENT_RETRY_1: &str = "8C";
    /// SMTP client: put on the second-level retry queue (8D).
    pub const CLIENT_RETRY_2: &str = "8D";
    /// Storage threshold crossed: mail waits on the busy queue (7L).
    pub const STORAGE_LOW: &str = "7L";
    /// Space returned: the busy queue drains (7M).
    pub const STORAGE_OK: &str = "7M";
    /// Framework: a message the snap-ins failed on too often is held for the administrator.
    pub const FRAMEWORK_HELD: &str = "8H";
    /// Queue: recipients deleted by the administrator (`postroom queue delete`).
    pub const QUEUE_DELETED: &str = "8X";
    /// SMTP client: MX or host lookup failed (8K).
    pub const CLIENT_DNS: &str = "8K";
    /// Filtering: a filter rule matched a message (kept in quarantine or discarded), or the
    /// administrator released or deleted a quarantined message (OW).
    pub const FILTERED: &str = "OW";
    /// POP3 login (DL) and retrieval (DR), deletion at QUIT (DD).
    pub const POP_LOGIN: &str = "DL";
    pub const POP_LOGIN_FAILED: &str = "DF";
    pub const POP_RETRIEVE: &str = "DR";
    pub const POP_DELETE: &str = "DD";
    /// LDAP address book (O5): a failed or throttled bind (A5), as POP3's DF.
    pub const LDAP_BIND_FAILED: &str = "LF";
    /// Web console (E6, issue 19): an administrator logged in (WL), a login failed or was
    /// throttled (WF), and a change an administrator made there (WC: `originator` is who,
    /// `detail` what).
    pub const CONSOLE_LOGIN: &str = "WL";
    pub const CONSOLE_LOGIN_FAILED: &str = "WF";
    pub const CONSOLE_CHANGE: &str = "WC";
}

/// One journal row; empty strings for facts that do not apply.
#[derive(Clone, Debug, Default)]
pub struct Entry<'a> {
    pub code: &'a str,
    pub qid: &'a str,
    pub originator: &'a str,
    pub recipient: &'a str,
    pub size: Option<i64>,
    pub ip: &'a str,
    pub detail: &'a str,
}

/// Longest identity (address, user name, host name) a journal row keeps; RFC 5321 paths are
/// at most 256 octets, so anything longer is an attack or garbage.
const MAX_IDENTITY: usize = 320;
const MAX_DETAIL: usize = 2000;

/// Append `entry` inside the caller's transaction, so it commits with the fact it records.
/// Text that came from the network is stored with control characters escaped and cut to a
/// sane length (marked as cut): a journal line cannot be forged, nor a terminal driven, by a
/// user name. With `[journal] enabled = false` the store drops the row (`StoreOptions::journal`).
pub fn append(conn: &Connection, entry: &Entry<'_>) -> rusqlite::Result<()> {
    use mail_proto::shown::escaped;
    let mut stmt =
        conn.prepare_cached("INSERT INTO journal (at, code, qid, originator, recipient, size, ip, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")?;
    stmt.execute(params![
        store::now(),
        entry.code,
        escaped(entry.qid, 64),
        escaped(entry.originator, MAX_IDENTITY),
        escaped(entry.recipient, MAX_IDENTITY * 4),
        entry.size,
        escaped(entry.ip, 64),
        escaped(entry.detail, MAX_DETAIL)
    ])?;
    Ok(())
}

/// Remove up to `limit` rows older than `before` (unix seconds): the retention of F4.
pub fn expire(conn: &Connection, before: i64, limit: usize) -> rusqlite::Result<usize> {
    conn.execute("DELETE FROM journal WHERE id IN (SELECT id FROM journal WHERE at < ?1 ORDER BY id LIMIT ?2)", params![before, limit as i64])
}

/// One stored journal row, as the web console's message trace shows it (E6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub id: i64,
    pub at: i64,
    pub code: String,
    pub qid: String,
    pub originator: String,
    pub recipient: String,
    pub size: Option<i64>,
    pub ip: String,
    pub detail: String,
}

const ROW_COLUMNS: &str = "id, at, code, qid, originator, recipient, size, ip, detail";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        id: r.get(0)?,
        at: r.get(1)?,
        code: r.get(2)?,
        qid: r.get(3)?,
        originator: r.get(4)?,
        recipient: r.get(5)?,
        size: r.get(6)?,
        ip: r.get(7)?,
        detail: r.get(8)?,
    })
}

/// Rows between `from` and `until` (unix seconds) whose queue id is `text`, or whose sender or
/// recipient contains it (case-insensitively; empty = every row); the newest `limit` first.
pub fn search(conn: &Connection, text: &str, from: i64, until: i64, limit: usize) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {ROW_COLUMNS} FROM journal
          WHERE at BETWEEN ?2 AND ?3
            AND (?1 = '' OR qid = ?1 OR instr(lower(originator), lower(?1)) > 0 OR instr(lower(recipient), lower(?1)) > 0)
          ORDER BY id DESC LIMIT ?4"
    ))?;
    let rows = stmt.query_map(params![text, from, until, limit as i64], row)?;
    rows.collect()
}

/// Every row of one message (by queue id), oldest first: its whole story.
pub fn of_message(conn: &Connection, qid: &str) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM journal WHERE qid = ?1 ORDER BY id"))?;
    let rows = stmt.query_map([qid], row)?;
    rows.collect()
}

/// POP3 retrievals (DR) by `user` from `since` on: a retrieval names no message, so the trace
/// of a message delivered to a mailbox shows the collections that followed its delivery.
pub fn retrievals_by(conn: &Connection, user: &str, since: i64, limit: usize) -> rusqlite::Result<Vec<Row>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM journal WHERE code = ?1 AND recipient = ?2 AND at >= ?3 ORDER BY id LIMIT ?4"))?;
    let rows = stmt.query_map(params![code::POP_RETRIEVE, user, since, limit as i64], row)?;
    rows.collect()
}
