//! The message model (DESIGN "Messages have one owner"): the only code that reads or writes the
//! `messages`, `recipients`, `body_chunks`, `quarantine` and `mailbox` tables. Everything else —
//! the doors, the snap-ins, the SMTP client, POP3, the CLI — calls this typed API, as only
//! Postfix's cleanup writes a queue file and only its qmgr moves one.
//!
//! * States are types ([`RecipientState`], [`Hold`], [`Origin`]); the schema's CHECK
//!   constraints hold the same words, and [`set_state`] refuses illegal transitions.
//! * An outbound attempt *claims* its recipients ([`outbound::claim`]) in the transaction that
//!   hands them out, and records outcomes only for its own claim: nothing is handed out twice.
//! * A body is deleted only when no recipient, mailbox copy or quarantine entry needs it
//!   ([`collect`]).
//!
//! Every function takes the caller's connection, so a state change and its effects (journal
//! rows, reports, mailbox copies) commit in one transaction. The functions are the seam a second
//! storage backend would implement (claims as `FOR UPDATE SKIP LOCKED` in PostgreSQL).

pub mod admin;
pub mod body;
pub mod envelope;
pub mod mailbox;
pub mod outbound;
pub mod quarantine;
pub mod receive;
pub mod resolve;
mod state;

use rusqlite::{Connection, OptionalExtension, params};
use store::StoreError;

pub use state::{Hold, Origin, RecipientState};

/// A transition the message flow does not allow (a bug, never user input).
#[derive(Debug, thiserror::Error)]
#[error("recipient {id}: illegal state change {from} -> {to}")]
pub struct IllegalTransition {
    pub id: i64,
    pub from: RecipientState,
    pub to: RecipientState,
}

/// Move recipient `id` to `to`, refusing transitions the flow does not allow. Returns false
/// when the recipient no longer exists. `reply` and `next_attempt` are written with the state.
pub fn set_state(c: &Connection, id: i64, to: RecipientState, reply: Option<&str>, next_attempt: Option<i64>) -> Result<bool, StoreError> {
    let Some(from) = state_of(c, id)? else { return Ok(false) };
    if !from.may_become(to) {
        return Err(StoreError::Invalid(IllegalTransition { id, from, to }.to_string()));
    }
    c.prepare_cached(
        "UPDATE recipients SET state = ?2, last_reply = coalesce(?3, last_reply), next_attempt = ?4, attempt_id = NULL, lease_until = NULL
          WHERE id = ?1",
    )?
    .execute(params![id, to, reply, next_attempt])?;
    Ok(true)
}

/// The state of one recipient, if it exists.
pub fn state_of(c: &Connection, id: i64) -> Result<Option<RecipientState>, StoreError> {
    Ok(c.prepare_cached("SELECT state FROM recipients WHERE id = ?1")?.query_row([id], |r| r.get(0)).optional()?)
}

/// Delete a message and its body once no mailbox copy, no unfinished recipient and no
/// unreleased quarantine entry needs it. Returns whether it went.
pub fn collect(c: &Connection, message_id: i64) -> Result<bool, StoreError> {
    let n = c
        .prepare_cached(
            "DELETE FROM messages WHERE id = ?1
               AND NOT EXISTS (SELECT 1 FROM mailbox WHERE message_id = ?1)
               AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1
                                AND state IN ('queued', 'forward', 'attempt', 'bounce', 'quarantined'))
               AND NOT EXISTS (SELECT 1 FROM quarantine WHERE message_id = ?1 AND released = 0)",
        )?
        .execute([message_id])?;
    Ok(n > 0)
}

/// The facts about a message that reports, snap-ins and the SMTP client need.
#[derive(Clone, Debug)]
pub struct MessageInfo {
    pub id: i64,
    pub qid: String,
    pub mail_from: String,
    pub size: i64,
    pub received_at: i64,
    pub origin: Origin,
    /// RFC 3461 RET (`FULL` or `HDRS`) and ENVID.
    pub ret: Option<String>,
    pub envid: Option<String>,
}

/// Load a message by row id.
pub fn message(c: &Connection, message_id: i64) -> Result<Option<MessageInfo>, StoreError> {
    Ok(c.prepare_cached("SELECT qid, mail_from, size, received_at, origin, dsn_ret, dsn_envid FROM messages WHERE id = ?1")?
        .query_row([message_id], |r| {
            Ok(MessageInfo {
                id: message_id,
                qid: r.get(0)?,
                mail_from: r.get(1)?,
                size: r.get(2)?,
                received_at: r.get(3)?,
                origin: r.get(4)?,
                ret: r.get(5)?,
                envid: r.get(6)?,
            })
        })
        .optional()?)
}
