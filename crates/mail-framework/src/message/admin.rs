//! What the administrator sees and does: `postroom queue list|show|retry|hold|release|delete`
//! and the queue depths of `postroom status` (SPEC O2).

use crate::journal::{self, code};
use rusqlite::Connection;
use store::StoreError;

use super::{Hold, RecipientState};

/// One recipient row as `postroom queue list|show` prints it.
#[derive(Clone, Debug)]
pub struct QueuedRecipient {
    pub qid: String,
    pub mail_from: String,
    pub address: String,
    pub state: RecipientState,
    pub size: i64,
    pub received_at: i64,
    pub attempts: i64,
    pub next_attempt: Option<i64>,
    pub held: Hold,
    pub last_reply: Option<String>,
}

const COLUMNS: &str = "m.qid, m.mail_from, r.address, r.state, m.size, m.received_at, r.attempts, r.next_attempt, r.held, r.last_reply";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueuedRecipient> {
    Ok(QueuedRecipient {
        qid: r.get(0)?,
        mail_from: r.get(1)?,
        address: r.get(2)?,
        state: r.get(3)?,
        size: r.get(4)?,
        received_at: r.get(5)?,
        attempts: r.get(6)?,
        next_attempt: r.get(7)?,
        held: r.get(8)?,
        last_reply: r.get(9)?,
    })
}

/// Recipients not yet finished: waiting for the framework, the SMTP client or a report.
pub fn pending(c: &Connection) -> Result<Vec<QueuedRecipient>, StoreError> {
    let mut stmt = c.prepare(&format!(
        "SELECT {COLUMNS} FROM recipients r JOIN messages m ON m.id = r.message_id
          WHERE r.state IN ('queued', 'forward', 'attempt', 'bounce') ORDER BY r.id"
    ))?;
    let rows = stmt.query_map([], row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Every recipient of one message, whatever its state (`postroom queue show`).
pub fn message_recipients(c: &Connection, qid: &str) -> Result<Vec<QueuedRecipient>, StoreError> {
    let mut stmt = c.prepare(&format!("SELECT {COLUMNS} FROM recipients r JOIN messages m ON m.id = r.message_id WHERE m.qid = ?1 ORDER BY r.id"))?;
    let rows = stmt.query_map([qid], row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueCommand {
    Retry,
    Hold,
    Release,
    Delete,
}

/// `postroom queue retry|hold|release|delete ID`: ID is a queue id (all its waiting recipients).
/// A recipient in an attempt is deleted at once (the attempt's outcome is then not recorded);
/// a hold stops attempts after the running one.
pub fn command(c: &Connection, qid: &str, what: QueueCommand) -> Result<usize, StoreError> {
    let sql = match what {
        QueueCommand::Retry => {
            "UPDATE recipients SET next_attempt = NULL WHERE state IN ('forward', 'queued') AND message_id = (SELECT id FROM messages WHERE qid = ?1)"
        }
        QueueCommand::Hold => {
            "UPDATE recipients SET held = 1 WHERE state IN ('forward', 'attempt') AND message_id = (SELECT id FROM messages WHERE qid = ?1)"
        }
        // Releasing a recipient the framework held after failures gives it a fresh start.
        QueueCommand::Release => {
            "UPDATE recipients SET held = 0, failures = 0, next_attempt = NULL
              WHERE held <> 0 AND state IN ('queued', 'forward', 'attempt', 'bounce') AND message_id = (SELECT id FROM messages WHERE qid = ?1)"
        }
        QueueCommand::Delete => {
            "UPDATE recipients SET state = 'deleted', attempt_id = NULL, lease_until = NULL
              WHERE state IN ('forward', 'attempt', 'queued', 'bounce') AND message_id = (SELECT id FROM messages WHERE qid = ?1)"
        }
    };
    let n = c.execute(sql, [qid])?;
    if what == QueueCommand::Delete && n > 0 {
        let id: i64 = c.query_row("SELECT id FROM messages WHERE qid = ?1", [qid], |r| r.get(0))?;
        journal::append(
            c,
            &journal::Entry {
                code: code::QUEUE_DELETED,
                qid,
                detail: &format!("{n} recipient(s) deleted by the administrator"),
                ..Default::default()
            },
        )?;
        super::collect(c, id)?;
    }
    Ok(n)
}

/// Queue depths for `postroom status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Depths {
    pub for_framework: i64,
    pub for_delivery: i64,
    pub in_attempt: i64,
    pub held: i64,
    pub bounces: i64,
    /// Arrival of the oldest message with an unfinished recipient (unix seconds).
    pub oldest: Option<i64>,
}

pub fn depths(c: &Connection) -> Result<Depths, StoreError> {
    let mut d = Depths::default();
    let mut stmt =
        c.prepare("SELECT state, held <> 0, count(*) FROM recipients WHERE state IN ('queued', 'forward', 'attempt', 'bounce') GROUP BY 1, 2")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (state, held, n): (RecipientState, bool, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        match (state, held) {
            (_, true) => d.held += n,
            (RecipientState::Queued, _) => d.for_framework += n,
            (RecipientState::Forward, _) => d.for_delivery += n,
            (RecipientState::InAttempt, _) => d.in_attempt += n,
            _ => d.bounces += n,
        }
    }
    d.oldest = c.query_row(
        "SELECT min(m.received_at) FROM messages m JOIN recipients r ON r.message_id = m.id
          WHERE r.state IN ('queued', 'forward', 'attempt', 'bounce')",
        [],
        |r| r.get(0),
    )?;
    Ok(d)
}
