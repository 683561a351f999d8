//! What the framework's pipeline reads and writes: the recipients waiting for snap-ins, their
//! resolution, the recipients an expansion adds, and the failures of a poison message.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use store::StoreError;

use super::{Hold, MessageInfo, RecipientState};

/// A recipient waiting for the snap-ins.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub recipient_id: i64,
    pub address: String,
    pub message: Arc<MessageInfo>,
    /// `Bounce`: failed in the SMTP client, waiting for its report (reason in `last_reply`).
    pub state: RecipientState,
    pub last_reply: Option<String>,
    pub depth: i64,
    pub expanded_from: Option<String>,
    pub notify: Option<String>,
    pub orcpt: Option<String>,
    /// `Bounce`: the host whose reply failed it, if one did (RFC 3464 Remote-MTA).
    pub remote_mta: Option<String>,
}

/// Up to `limit` recipients due for the pipeline at `now`, grouped by message, oldest first.
/// Recipients held after repeated failures wait for the administrator.
pub fn waiting(c: &Connection, now: i64, limit: usize) -> Result<Vec<Waiting>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT r.id, r.address, m.id, m.qid, m.mail_from, m.size, m.received_at, m.origin, m.dsn_ret, m.dsn_envid,
                r.state, r.last_reply, r.depth, r.expanded_from, r.notify, r.orcpt, r.remote_mta
           FROM recipients r JOIN messages m ON m.id = r.message_id
          WHERE r.state IN ('queued', 'bounce') AND r.held = 0 AND (r.next_attempt IS NULL OR r.next_attempt <= ?1)
          ORDER BY r.message_id, r.id LIMIT ?2",
    )?;
    let mut out: Vec<Waiting> = Vec::new();
    let mut rows = stmt.query(params![now, limit as i64])?;
    while let Some(r) = rows.next()? {
        let message_id: i64 = r.get(2)?;
        let message = match out.last() {
            Some(prev) if prev.message.id == message_id => prev.message.clone(),
            _ => Arc::new(MessageInfo {
                id: message_id,
                qid: r.get(3)?,
                mail_from: r.get(4)?,
                size: r.get(5)?,
                received_at: r.get(6)?,
                origin: r.get(7)?,
                ret: r.get(8)?,
                envid: r.get(9)?,
            }),
        };
        out.push(Waiting {
            recipient_id: r.get(0)?,
            address: r.get(1)?,
            message,
            state: r.get(10)?,
            last_reply: r.get(11)?,
            depth: r.get(12)?,
            expanded_from: r.get(13)?,
            notify: r.get(14)?,
            orcpt: r.get(15)?,
            remote_mta: r.get(16)?,
        });
    }
    Ok(out)
}

/// Is the recipient still waiting for the pipeline? (A replay after a crash finds it done.)
pub fn still_waiting(c: &Connection, recipient_id: i64) -> Result<bool, StoreError> {
    Ok(c.prepare_cached("SELECT 1 FROM recipients WHERE id = ?1 AND state IN ('queued', 'bounce') AND held = 0")?.exists([recipient_id])?)
}

/// Record a snap-in decision: the recipient's new state, its user, when to look again.
pub fn resolved(
    c: &Connection,
    recipient_id: i64,
    to: RecipientState,
    user_id: Option<i64>,
    next_attempt: Option<i64>,
    reply: Option<&str>,
) -> Result<(), StoreError> {
    if !super::set_state(c, recipient_id, to, reply, next_attempt)? {
        return Ok(());
    }
    if user_id.is_some() {
        c.prepare_cached("UPDATE recipients SET user_id = ?2 WHERE id = ?1")?.execute(params![recipient_id, user_id])?;
    }
    Ok(())
}

/// Queue `address` as a new recipient of a message, one expansion level deeper than `from`.
pub fn add_expansion(c: &Connection, message_id: i64, address: &str, depth: i64, from: &str) -> Result<(), StoreError> {
    c.prepare_cached("INSERT INTO recipients (message_id, address, state, depth, expanded_from) VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![
        message_id,
        address,
        RecipientState::Queued,
        depth,
        from.to_ascii_lowercase()
    ])?;
    Ok(())
}

/// Is `address` already a recipient of the message (in any letter case)?
pub fn is_recipient(c: &Connection, message_id: i64, address: &str) -> Result<bool, StoreError> {
    Ok(c.prepare_cached("SELECT 1 FROM recipients WHERE message_id = ?1 AND lower(address) = lower(?2)")?.exists(params![message_id, address])?)
}

/// The addresses `address` was expanded from, nearest first (at most `max` levels).
pub fn ancestors(c: &Connection, message_id: i64, expanded_from: Option<&str>, max: usize) -> Result<Vec<String>, StoreError> {
    let mut out: Vec<String> = Vec::new();
    let mut next = expanded_from.map(str::to_string);
    let mut stmt = c.prepare_cached("SELECT expanded_from FROM recipients WHERE message_id = ?1 AND lower(address) = lower(?2) LIMIT 1")?;
    while let Some(a) = next.take() {
        if out.len() >= max || out.iter().any(|o| o.eq_ignore_ascii_case(&a)) {
            break;
        }
        next = stmt.query_row(params![message_id, a], |r| r.get::<_, Option<String>>(0)).optional()?.flatten();
        out.push(a);
    }
    Ok(out)
}

/// The rule of a discard that already took recipients of this message, if any.
pub fn discarded_by(c: &Connection, message_id: i64) -> Result<Option<String>, StoreError> {
    Ok(c.prepare_cached("SELECT coalesce(last_reply, '') FROM recipients WHERE message_id = ?1 AND state = 'discarded' LIMIT 1")?
        .query_row([message_id], |r| r.get(0))
        .optional()?)
}

/// Failures of the framework on one recipient before it is held for the administrator.
pub const MAX_FAILURES: i64 = 5;

/// The snap-ins failed on these recipients: look again after a growing pause, and after
/// [`MAX_FAILURES`] hold them with the reason (`postroom queue list` shows it). Returns the
/// recipients that are now held.
pub fn failed(c: &Connection, recipient_ids: &[i64], error: &str, now: i64) -> Result<Vec<i64>, StoreError> {
    let mut held = Vec::new();
    let mut stmt = c.prepare_cached(
        "UPDATE recipients SET failures = failures + 1, last_reply = ?2,
                next_attempt = ?3 + min(3600, 10 * (1 << min(failures, 10))),
                held = CASE WHEN failures + 1 >= ?4 THEN ?5 ELSE held END
          WHERE id = ?1 AND state IN ('queued', 'bounce') RETURNING held",
    )?;
    let reason = format!("framework error: {error}");
    for id in recipient_ids {
        let h: Option<Hold> = stmt.query_row(params![id, reason, now, MAX_FAILURES, Hold::Failing], |r| r.get(0)).optional()?;
        if h == Some(Hold::Failing) {
            held.push(*id);
        }
    }
    Ok(held)
}
