//! Forwarding (journal C6): recipients tagged *forward* go on the outbound queue — state
//! `forward`, due now — in the same transaction; the SMTP client takes them from there.

use rusqlite::Connection;
use store::journal::{self, code};
use store::StoreError;

use crate::pipeline::{SnapIn, Tag, WorkItem};

pub struct Forwarding;

impl SnapIn for Forwarding {
    fn name(&self) -> &'static str {
        "forwarding"
    }

    fn apply(&self, tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        for item in items.iter().filter(|i| i.tag == Tag::Forward) {
            let entry = journal::Entry {
                code: code::FORWARD_ENQUEUED,
                qid: &item.message.qid,
                originator: &item.message.mail_from,
                recipient: &item.address,
                size: Some(item.message.size),
                ..Default::default()
            };
            journal::append(tx, &entry)?;
        }
        Ok(())
    }
}
