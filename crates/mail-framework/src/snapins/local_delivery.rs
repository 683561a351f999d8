//! Local delivery (journal B8): one mailbox row per recipient, sharing the stored body, with a
//! Return-Path prefix (S3). `UNIQUE(message_id, recipient_id)` makes a replay a no-op.

use rusqlite::{Connection, params};
use store::StoreError;
use store::journal::{self, code};

use crate::bounce::{Action, ReportEntry};
use crate::pipeline::{SnapIn, Tag, WorkItem};
use crate::reports::Subject;

pub struct LocalDelivery;

impl SnapIn for LocalDelivery {
    fn name(&self) -> &'static str {
        "local-delivery"
    }

    fn apply(&self, tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO mailbox (user_id, message_id, recipient_id, prefix, size, delivered_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut usage = tx.prepare_cached("UPDATE users SET used_bytes = used_bytes + ?2 WHERE id = ?1")?;
        for item in items {
            let Tag::LocalDelivery { user_id, user } = &item.tag else { continue };
            let prefix = format!("Return-Path: <{}>\r\n", item.message.mail_from);
            let size = prefix.len() as i64 + item.message.size;
            let n = insert.execute(params![user_id, item.message.id, item.recipient_id, prefix.as_bytes(), size, store::now()])?;
            if n == 1 {
                usage.execute(params![user_id, size])?;
            }
            // RFC 3461: NOTIFY=SUCCESS asks for a "delivered" report.
            if n == 1
                && crate::reports::wanted(item.notify.as_deref(), Action::Delivered)
                && !item.message.mail_from.is_empty()
                && let Some(subject) = Subject::load(tx, item.message.id)?
            {
                let entry = ReportEntry {
                    recipient: item.address.clone(),
                    orcpt: item.orcpt.clone(),
                    action: Action::Delivered,
                    status: "2.0.0".into(),
                    diagnostic: "250 2.0.0 delivered to the mailbox".into(),
                };
                crate::reports::queue(tx, &subject, &item.message.mail_from, &[], "bounce", &[entry])?;
            }
            journal::append(
                tx,
                &journal::Entry {
                    code: code::DELIVERED_LOCAL,
                    qid: &item.message.qid,
                    originator: &item.message.mail_from,
                    recipient: &item.address,
                    size: Some(size),
                    detail: user,
                    ..Default::default()
                },
            )?;
        }
        Ok(())
    }
}
