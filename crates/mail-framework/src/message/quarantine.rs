//! The quarantine (F3 *keep*): a message kept aside by a filter, delivered to nobody until the
//! administrator releases it. Its body stays while an unreleased entry references it.

use crate::journal::{self, code};
use rusqlite::{Connection, OptionalExtension, params};
use store::StoreError;

use super::RecipientState;

/// A message in the quarantine, as `postroom quarantine list|show` prints it.
#[derive(Clone, Debug)]
pub struct Quarantined {
    pub id: i64,
    pub message_id: i64,
    pub qid: String,
    /// The envelope sender ('' = <>).
    pub mail_from: String,
    pub size: i64,
    /// Which rule matched, on what value.
    pub rule: String,
    pub at: i64,
    pub released: bool,
    /// The recipients kept back (state `quarantined`).
    pub recipients: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("no quarantined message {0} (see `postroom quarantine list`)")]
    NotFound(String),
    #[error("quarantined message {0} was already released")]
    AlreadyReleased(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<QuarantineError> for StoreError {
    fn from(e: QuarantineError) -> Self {
        match e {
            QuarantineError::Store(e) => e,
            other => StoreError::Invalid(other.to_string()),
        }
    }
}

impl From<rusqlite::Error> for QuarantineError {
    fn from(e: rusqlite::Error) -> Self {
        QuarantineError::Store(e.into())
    }
}

/// The filter's earlier verdict on a message: Some((rule, released)) when it was kept.
pub fn verdict(c: &Connection, message_id: i64) -> Result<Option<(String, bool)>, StoreError> {
    Ok(c.prepare_cached("SELECT rule, released FROM quarantine WHERE message_id = ?1")?
        .query_row([message_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Keep a message aside; false when it already was (one entry per message).
pub fn keep(c: &Connection, message_id: i64, rule: &str) -> Result<bool, StoreError> {
    Ok(c.prepare_cached("INSERT OR IGNORE INTO quarantine (message_id, rule, at) VALUES (?1, ?2, ?3)")?.execute(params![
        message_id,
        rule,
        store::now()
    ])? == 1)
}

const SELECT: &str = "SELECT q.id, q.message_id, m.qid, m.mail_from, m.size, q.rule, q.at, q.released
     FROM quarantine q JOIN messages m ON m.id = q.message_id";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Quarantined> {
    Ok(Quarantined {
        id: r.get(0)?,
        message_id: r.get(1)?,
        qid: r.get(2)?,
        mail_from: r.get(3)?,
        size: r.get(4)?,
        rule: r.get(5)?,
        at: r.get(6)?,
        released: r.get(7)?,
        recipients: Vec::new(),
    })
}

fn with_recipients(c: &Connection, mut q: Quarantined) -> Result<Quarantined, QuarantineError> {
    let mut stmt = c.prepare_cached("SELECT address FROM recipients WHERE message_id = ?1 AND state = ?2 ORDER BY id")?;
    q.recipients = stmt.query_map(params![q.message_id, RecipientState::Quarantined], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(q)
}

/// Messages waiting in the quarantine (not released), oldest first.
pub fn list(c: &Connection) -> Result<Vec<Quarantined>, QuarantineError> {
    let mut stmt = c.prepare(&format!("{SELECT} WHERE q.released = 0 ORDER BY q.id"))?;
    let rows = stmt.query_map([], row)?.collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(|q| with_recipients(c, q)).collect()
}

/// One quarantined message by its quarantine number or its queue id.
pub fn find(c: &Connection, key: &str) -> Result<Quarantined, QuarantineError> {
    let key = key.trim();
    let found = match key.parse::<i64>() {
        Ok(id) => c.query_row(&format!("{SELECT} WHERE q.id = ?1"), [id], row).optional()?,
        Err(_) => c.query_row(&format!("{SELECT} WHERE m.qid = ?1"), [key], row).optional()?,
    };
    with_recipients(c, found.ok_or_else(|| QuarantineError::NotFound(key.to_string()))?)
}

/// `quarantine release`: queue the kept recipients again and mark the message released, so
/// the filter lets it through. Returns the message and how many recipients were queued.
pub fn release(c: &Connection, key: &str) -> Result<(Quarantined, usize), QuarantineError> {
    let q = find(c, key)?;
    if q.released {
        return Err(QuarantineError::AlreadyReleased(q.id));
    }
    let n = c.execute(
        "UPDATE recipients SET state = 'queued', next_attempt = NULL, last_reply = NULL WHERE message_id = ?1 AND state = 'quarantined'",
        [q.message_id],
    )?;
    c.execute("UPDATE quarantine SET released = 1, released_at = ?2 WHERE id = ?1", params![q.id, store::now()])?;
    let detail = format!("released from quarantine {} by the administrator ({}): {n} recipient(s) queued", q.id, q.rule);
    journal_row(c, &q, &detail)?;
    Ok((q, n))
}

/// `quarantine delete`: drop a quarantined message; its kept recipients end `discarded` and
/// the body is freed once nothing else needs it.
pub fn delete(c: &Connection, key: &str) -> Result<(Quarantined, usize), QuarantineError> {
    let q = find(c, key)?;
    if q.released {
        return Err(QuarantineError::AlreadyReleased(q.id));
    }
    let n = c.execute(
        "UPDATE recipients SET state = 'discarded', last_reply = 'deleted from the quarantine by the administrator'
          WHERE message_id = ?1 AND state = 'quarantined'",
        [q.message_id],
    )?;
    c.execute("DELETE FROM quarantine WHERE id = ?1", [q.id])?;
    let detail = format!("deleted from quarantine {} by the administrator ({})", q.id, q.rule);
    journal_row(c, &q, &detail)?;
    super::collect(c, q.message_id)?;
    Ok((q, n))
}

fn journal_row(c: &Connection, q: &Quarantined, detail: &str) -> Result<(), StoreError> {
    journal::append(
        c,
        &journal::Entry {
            code: code::FILTERED,
            qid: &q.qid,
            originator: &q.mail_from,
            recipient: &q.recipients.join(", "),
            size: Some(q.size),
            detail,
            ..Default::default()
        },
    )?;
    Ok(())
}
