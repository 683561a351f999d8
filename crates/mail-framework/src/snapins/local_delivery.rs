//! Local delivery (journal B8): one mailbox row per recipient, sharing the stored body, with a
//! Return-Path prefix (S3). `UNIQUE(message_id, recipient_id)` makes a replay a no-op.

use rusqlite::{params, Connection};
use store::journal::{self, code};
use store::StoreError;

use crate::pipeline::{SnapIn, Tag, WorkItem};

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
