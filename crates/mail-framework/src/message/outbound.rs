//! The outbound queue's rows: recipients in state `forward`, claimed by one attempt at a time
//! (state `attempt`, an attempt id and a lease), and the outcome of each claim.

use rusqlite::{Connection, OptionalExtension, params};
use store::StoreError;

use super::{Hold, RecipientState};

/// A recipient claimed for an attempt.
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
    /// RFC 4954 §5: the submitter to pass on with `AUTH=` to a next hop we authenticate to;
    /// `None` sends `AUTH=<>`.
    pub auth_sender: Option<String>,
}

impl Due {
    /// The recipient's domain, lowercase (the destination a connection is made for).
    pub fn domain(&self) -> String {
        self.address.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase()).unwrap_or_default()
    }
}

const DUE_COLUMNS: &str = "r.id, r.message_id, m.qid, m.mail_from, r.address, r.attempts, m.size, m.received_at, r.expanded_from,
                r.notify, r.orcpt, m.dsn_ret, m.dsn_envid, r.delay_notified, m.auth_sender";

fn due_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Due> {
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
        auth_sender: r.get(14)?,
    })
}

/// Claim up to `limit` recipients due at `now` for one attempt, in this transaction: they
/// change to state `attempt` with a new attempt id and a lease until `now + lease_secs`, so no
/// other scan can hand them out again. A claim whose lease ran out (its process died) is
/// released first. Returns the attempt id and the claimed recipients, oldest first.
pub fn claim(c: &Connection, now: i64, limit: usize, lease_secs: i64) -> Result<(i64, Vec<Due>), StoreError> {
    c.prepare_cached("UPDATE recipients SET state = 'forward', attempt_id = NULL, lease_until = NULL WHERE state = 'attempt' AND lease_until <= ?1")?
        .execute([now])?;
    let attempt: i64 = c
        .prepare_cached("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'attempt_seq' RETURNING CAST(value AS INTEGER)")?
        .query_row([], |r| r.get(0))?;
    // Only the due rows are read (the partial index of migration 0011), however many wait for
    // later: a deep queue of deferred mail costs nothing here.
    let due: Vec<Due> = {
        let mut stmt = c.prepare_cached(&format!(
            "SELECT {DUE_COLUMNS} FROM recipients r INDEXED BY recipients_forward_due JOIN messages m ON m.id = r.message_id
              WHERE r.state = 'forward' AND r.held = 0 AND coalesce(r.next_attempt, 0) <= ?1
              ORDER BY r.message_id, r.id LIMIT ?2"
        ))?;
        stmt.query_map(params![now, limit as i64], due_row)?.collect::<rusqlite::Result<_>>()?
    };
    let mut take = c.prepare_cached(
        "UPDATE recipients SET state = 'attempt', attempt_id = ?2, lease_until = ?3 WHERE id = ?1 AND state = 'forward' AND held = 0",
    )?;
    let mut claimed = Vec::with_capacity(due.len());
    for d in due {
        if take.execute(params![d.recipient_id, attempt, now + lease_secs])? == 1 {
            claimed.push(d);
        }
    }
    Ok((attempt, claimed))
}

/// Extend the claim of attempt `attempt_id` on these recipients to `until` (issue 17: a message
/// that waited for a reused connection is about to be sent). Returns the ids the attempt still
/// holds; a recipient deleted meanwhile, or whose claim ran out and went to another attempt, is
/// not among them and must not be sent.
pub fn renew_claim(c: &Connection, attempt_id: i64, recipient_ids: &[i64], until: i64) -> Result<Vec<i64>, StoreError> {
    let mut renew =
        c.prepare_cached("UPDATE recipients SET lease_until = ?3 WHERE id = ?1 AND state = 'attempt' AND attempt_id = ?2 RETURNING id")?;
    let mut held = Vec::with_capacity(recipient_ids.len());
    for id in recipient_ids {
        if let Some(id) = renew.query_row(params![id, attempt_id, until], |r| r.get(0)).optional()? {
            held.push(id);
        }
    }
    Ok(held)
}

/// At start-up no attempt runs: every claim left by the previous process is released.
pub fn release_all_claims(c: &Connection) -> Result<usize, StoreError> {
    Ok(c.execute("UPDATE recipients SET state = 'forward', attempt_id = NULL, lease_until = NULL WHERE state = 'attempt'", [])?)
}

/// The partial index (migration 0011) makes this one index seek however deep the queue is.
const NEXT_DUE: &str = "SELECT min(coalesce(next_attempt, 0)) FROM recipients INDEXED BY recipients_forward_due WHERE state = 'forward' AND held = 0";

/// When the next recipient waiting for the SMTP client falls due (unix seconds), if any.
pub fn next_due(c: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(c.prepare_cached(NEXT_DUE)?.query_row([], |r| r.get(0))?)
}

/// Record the outcome of attempt `attempt_id` for one recipient — only if that attempt still
/// holds the claim (a recipient deleted meanwhile is left alone): its reply, and the host that
/// gave it (`remote_mta`, for the Remote-MTA of a report; `None` when no host answered). Returns
/// the recipient's hold when recorded, None when the claim was gone.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    c: &Connection,
    attempt_id: i64,
    recipient_id: i64,
    to: RecipientState,
    attempts: i64,
    next_attempt: Option<i64>,
    reply: &str,
    remote_mta: Option<&str>,
) -> Result<Option<Hold>, StoreError> {
    debug_assert!(RecipientState::InAttempt.may_become(to));
    Ok(c.prepare_cached(
        "UPDATE recipients SET state = ?3, attempts = ?4, next_attempt = ?5, last_reply = ?6, remote_mta = ?7, attempt_id = NULL,
                lease_until = NULL
          WHERE id = ?1 AND state = 'attempt' AND attempt_id = ?2 RETURNING held",
    )?
    .query_row(params![recipient_id, attempt_id, to, attempts, next_attempt, reply, remote_mta], |r| r.get(0))
    .optional()?)
}

/// The sender was told once that this recipient is delayed (C4).
pub fn mark_delay_notified(c: &Connection, recipient_id: i64) -> Result<(), StoreError> {
    c.prepare_cached("UPDATE recipients SET delay_notified = 1 WHERE id = ?1")?.execute([recipient_id])?;
    Ok(())
}

/// Mail for a dial-up domain (C7) waits until its server asks with ETRN.
pub fn hold_for_etrn(c: &Connection, recipient_id: i64) -> Result<(), StoreError> {
    c.prepare_cached("UPDATE recipients SET held = ?2 WHERE id = ?1")?.execute(params![recipient_id, Hold::Etrn])?;
    Ok(())
}

/// Recipients held for ETRN whose message arrived at or before `before`: past the queue lifetime.
pub fn etrn_held_since(c: &Connection, before: i64) -> Result<Vec<Due>, StoreError> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {DUE_COLUMNS} FROM recipients r JOIN messages m ON m.id = r.message_id
          WHERE r.state = 'forward' AND r.held = ?2 AND m.received_at <= ?1 ORDER BY r.id"
    ))?;
    Ok(stmt.query_map(params![before, Hold::Etrn], due_row)?.collect::<rusqlite::Result<_>>()?)
}

/// A recipient held for ETRN that expired: it fails, and the non-delivery snap-in reports it.
pub fn expire_held(c: &Connection, recipient_id: i64, reply: &str) -> Result<bool, StoreError> {
    Ok(c.prepare_cached(
        "UPDATE recipients SET state = 'bounce', held = 0, next_attempt = NULL, last_reply = ?2
          WHERE id = ?1 AND state = 'forward' AND held = ?3",
    )?
    .execute(params![recipient_id, reply, Hold::Etrn])?
        == 1)
}

/// Release mail held for `domain` (and its subdomains when asked): due now. Returns how many.
pub fn release_etrn(c: &Connection, domain: &str, subdomains: bool) -> Result<usize, StoreError> {
    let d = domain.to_ascii_lowercase();
    Ok(c.execute(
        "UPDATE recipients SET held = 0, next_attempt = NULL
          WHERE held = ?3 AND state = 'forward'
            AND (lower(address) LIKE '%@' || ?1 OR (?2 AND lower(address) LIKE '%.' || ?1))",
        params![d, subdomains, Hold::Etrn],
    )?)
}

/// The send scheduler (C7): release everything held for ETRN.
pub fn release_all_etrn(c: &Connection) -> Result<usize, StoreError> {
    Ok(c.execute("UPDATE recipients SET held = 0, next_attempt = NULL WHERE held = ?1 AND state = 'forward'", [Hold::Etrn])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17, a deep queue: the "next due" read is one index seek, whatever the planner's
    /// statistics say, so 100,000 deferred recipients do not cost a scan every second.
    #[test]
    fn next_due_reads_the_forward_due_index_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = store::Store::open(dir.path(), store::StoreOptions::default()).unwrap();
        let plan: Vec<String> = store
            .read_blocking(|c| {
                let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {NEXT_DUE}"))?;
                Ok(stmt.query_map([], |r| r.get::<_, String>(3))?.collect::<rusqlite::Result<_>>()?)
            })
            .unwrap();
        assert_eq!(plan, ["SEARCH recipients USING INDEX recipients_forward_due"], "{plan:?}");
        assert_eq!(store.read_blocking(next_due).unwrap(), None);
    }
}
