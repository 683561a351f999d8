//! Forwarding (journal C6): recipients tagged *forward* go on the outbound queue — state
//! `forward`, due now — in the same transaction; the SMTP client takes them from there. Mail
//! for a dial-up domain (C7) is held until ETRN.

use crate::journal::{self, code};
use rusqlite::Connection;
use store::StoreError;

use crate::outbound::EtrnDomains;
use crate::pipeline::{SnapIn, Tag, WorkItem};

pub struct Forwarding {
    pub etrn: EtrnDomains,
}

impl SnapIn for Forwarding {
    fn name(&self) -> &'static str {
        "forwarding"
    }

    fn apply(&self, tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        for item in items.iter().filter(|i| i.tag == Tag::Forward) {
            // C7: mail for a dial-up domain waits until its server asks with ETRN.
            if self.etrn.holds(&item.address) {
                crate::message::outbound::hold_for_etrn(tx, item.recipient_id)?;
            }
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
