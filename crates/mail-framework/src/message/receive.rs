//! Messages coming in: a row while DATA streams, body chunks as they fill, and the durable
//! commit that queues the recipients; reports of ours are queued whole.

use rusqlite::{Connection, params};
use store::StoreError;

use super::envelope::Envelope;
use super::{Origin, RecipientState};

/// A message row that is not complete yet (its DATA is still arriving).
pub fn start(c: &Connection, qid: &str) -> Result<i64, StoreError> {
    c.prepare_cached("INSERT INTO messages (qid, received_at) VALUES (?1, ?2)")?.execute(params![qid, store::now()])?;
    Ok(c.last_insert_rowid())
}

/// Append body chunk number `seq`.
pub fn chunk(c: &Connection, message_id: i64, seq: i64, data: &[u8]) -> Result<(), StoreError> {
    c.prepare_cached("INSERT INTO body_chunks (message_id, seq, data) VALUES (?1, ?2, ?3)")?.execute(params![message_id, seq, data])?;
    Ok(())
}

/// Mark the message complete and queue one recipient per distinct address of `envelope`: a
/// recipient named twice (in any letter case) is queued once, with the first one's DSN
/// parameters, so it cannot receive two copies (Postfix's duplicate filter does the same).
/// Returns the addresses queued.
pub fn complete(c: &Connection, message_id: i64, size: u64, envelope: &Envelope) -> Result<Vec<String>, StoreError> {
    c.prepare_cached(
        "UPDATE messages SET complete = 1, mail_from = ?2, size = ?3, client_ip = ?4, helo = ?5, origin = ?6, dsn_ret = ?7, dsn_envid = ?8,
                auth_sender = ?9
          WHERE id = ?1",
    )?
    .execute(params![
        message_id,
        envelope.mail_from,
        size as i64,
        envelope.client_ip,
        envelope.helo,
        envelope.origin,
        envelope.dsn.ret,
        envelope.dsn.envid,
        envelope.auth_sender
    ])?;
    let mut stmt = c.prepare_cached("INSERT INTO recipients (message_id, address, state, notify, orcpt) VALUES (?1, ?2, ?3, ?4, ?5)")?;
    let mut queued: Vec<String> = Vec::with_capacity(envelope.recipients.len());
    for (i, r) in envelope.recipients.iter().enumerate() {
        if queued.iter().any(|q| same_address(q, r)) {
            continue;
        }
        let dsn = envelope.dsn.recipients.get(i).cloned().unwrap_or_default();
        stmt.execute(params![message_id, r, RecipientState::Queued, dsn.notify, dsn.orcpt])?;
        queued.push(r.clone());
    }
    Ok(queued)
}

/// Two envelope addresses for the same destination: equal ignoring case, and a bare
/// `postmaster` equal to any `postmaster@…` of ours is left to address resolution.
pub fn same_address(a: &str, b: &str) -> bool {
    a.trim_end_matches('.').eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// Forget a message whose DATA was refused or cut off.
pub fn abort(c: &Connection, message_id: i64) -> Result<(), StoreError> {
    c.prepare_cached("DELETE FROM messages WHERE id = ?1 AND complete = 0")?.execute([message_id])?;
    Ok(())
}

/// At start-up: drop messages whose DATA never finished (their sender got no 250).
pub fn drop_incomplete(c: &Connection) -> Result<usize, StoreError> {
    Ok(c.execute("DELETE FROM messages WHERE complete = 0", [])?)
}

/// Queue a report of ours (already built, one chunk) for `recipients`. Returns its row id.
pub fn report(c: &Connection, qid: &str, origin: Origin, body: &[u8], recipients: &[&str]) -> Result<i64, StoreError> {
    c.prepare_cached("INSERT INTO messages (qid, complete, mail_from, size, received_at, origin) VALUES (?1, 1, '', ?2, ?3, ?4)")?
        .execute(params![qid, body.len() as i64, store::now(), origin])?;
    let id = c.last_insert_rowid();
    chunk(c, id, 0, body)?;
    let mut rcpt = c.prepare_cached("INSERT INTO recipients (message_id, address, state) VALUES (?1, ?2, ?3)")?;
    let mut queued: Vec<&str> = Vec::new();
    for to in recipients {
        if !queued.iter().any(|q| same_address(q, to)) {
            rcpt.execute(params![id, to, RecipientState::Queued])?;
            queued.push(to);
        }
    }
    Ok(id)
}
