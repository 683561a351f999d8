//! Non-delivery (journal A1): records each failed recipient. Bounce messages (RFC 3464) come
//! with the outbound issue, together with the client that can deliver them.

use rusqlite::Connection;
use store::journal::{self, code};
use store::StoreError;

use crate::pipeline::{SnapIn, Tag, WorkItem};

pub struct NonDelivery;

impl SnapIn for NonDelivery {
    fn name(&self) -> &'static str {
        "non-delivery"
    }

    fn apply(&self, tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        for item in items {
            let Tag::NonDelivery { status, reason } = &item.tag else { continue };
            journal::append(
                tx,
                &journal::Entry {
                    code: code::NON_DELIVERY,
                    qid: &item.message.qid,
                    originator: &item.message.mail_from,
                    recipient: &item.address,
                    size: Some(item.message.size),
                    detail: &format!("{status} {reason}"),
                    ..Default::default()
                },
            )?;
        }
        Ok(())
    }
}
