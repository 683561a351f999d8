//! Non-delivery (journal A): each recipient that failed after acceptance is journaled, and the
//! sender gets one RFC 3464 report per message listing them. Never a report to the null sender;
//! a report that itself fails goes to the postmaster once; one that fails too is dropped.

use rusqlite::{params, Connection, OptionalExtension};
use store::journal::{self, code};
use store::StoreError;

use crate::bounce::{self, Failure, Original};
use crate::pipeline::{SnapIn, Tag, WorkItem};

/// Header bytes of the original message attached to a report.
const MAX_ATTACHED_HEADERS: usize = 64 * 1024;

pub struct NonDelivery {
    pub hostname: String,
    /// Where reports about failed reports go.
    pub postmaster: String,
}

impl SnapIn for NonDelivery {
    fn name(&self) -> &'static str {
        "non-delivery"
    }

    fn apply(&self, tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        let failed: Vec<&WorkItem> = items.iter().filter(|i| matches!(i.tag, Tag::NonDelivery { .. })).collect();
        for group in failed.chunk_by(|a, b| a.message.id == b.message.id) {
            let message = &group[0].message;
            let failures: Vec<Failure> = group
                .iter()
                .map(|i| {
                    let Tag::NonDelivery { status, reason } = &i.tag else { unreachable!("filtered above") };
                    Failure { recipient: i.address.clone(), status: status.clone(), diagnostic: reason.clone() }
                })
                .collect();
            for f in &failures {
                let detail = format!("{} {}", f.status, f.diagnostic);
                let entry = journal::Entry {
                    code: code::NON_DELIVERY,
                    qid: &message.qid,
                    originator: &message.mail_from,
                    recipient: &f.recipient,
                    size: Some(message.size),
                    detail: &detail,
                    ..Default::default()
                };
                journal::append(tx, &entry)?;
            }
            let (to, origin) = match (message.origin.as_str(), message.mail_from.as_str()) {
                ("bounce", _) => (self.postmaster.as_str(), "double-bounce"),
                ("double-bounce", _) | (_, "") => {
                    let why = if message.origin == "double-bounce" {
                        "report to the postmaster could not be delivered either: dropped"
                    } else {
                        "no report: the sender is the null address <>"
                    };
                    journal::append(tx, &journal::Entry { code: code::NON_DELIVERY_DROPPED, qid: &message.qid, detail: why, ..Default::default() })?;
                    continue;
                }
                (_, sender) => (sender, "bounce"),
            };
            let first_chunk: Option<Vec<u8>> = tx
                .prepare_cached("SELECT data FROM body_chunks WHERE message_id = ?1 ORDER BY seq LIMIT 1")?
                .query_row([message.id], |r| r.get(0))
                .optional()?;
            let first_chunk = first_chunk.unwrap_or_default();
            let original = Original {
                qid: &message.qid,
                sender: &message.mail_from,
                arrived: message.received_at,
                headers: bounce::header_section(&first_chunk, MAX_ATTACHED_HEADERS),
            };
            let report = bounce::report(&self.hostname, to, &original, &failures, store::now());
            let qid = crate::queue::new_qid();
            tx.prepare_cached("INSERT INTO messages (qid, complete, mail_from, size, received_at, origin) VALUES (?1, 1, '', ?2, ?3, ?4)")?
                .execute(params![qid, report.len() as i64, store::now(), origin])?;
            let id = tx.last_insert_rowid();
            tx.prepare_cached("INSERT INTO body_chunks (message_id, seq, data) VALUES (?1, 0, ?2)")?.execute(params![id, report])?;
            tx.prepare_cached("INSERT INTO recipients (message_id, address, state) VALUES (?1, ?2, 'queued')")?.execute(params![id, to])?;
            let detail = format!("report {qid} to {to} for {} failed recipient(s)", failures.len());
            journal::append(tx, &journal::Entry { code: code::NON_DELIVERY_REPORT, qid: &message.qid, recipient: to, detail: &detail, ..Default::default() })?;
        }
        Ok(())
    }
}
