//! Local delivery (journal B8): one mailbox copy per user per message, sharing the stored
//! body, with a Return-Path prefix (S3). A user reached through several recipients of one
//! message — two of their addresses, `postmaster` in three spellings, an alias and the address
//! itself — gets one copy, as Postfix's local delivery does; the others end `duplicate`.
//! `UNIQUE(message_id, recipient_id)` makes a replay a no-op.

use std::collections::{BTreeMap, HashSet};

use crate::journal::{self, code};
use rusqlite::Connection;
use store::StoreError;

use crate::bounce::{Action, ReportEntry};
use crate::message::{self, Origin};
use crate::pipeline::{Context, SnapIn, Tag, WorkItem};
use crate::reports::{self, ReportSettings};

pub struct LocalDelivery {
    pub reports: ReportSettings,
}

impl SnapIn for LocalDelivery {
    fn name(&self) -> &'static str {
        "local-delivery"
    }

    /// One copy per mailbox: a user who already holds the message, or gets it from an earlier
    /// item of this batch, is a duplicate.
    fn examine(&self, ctx: &Context<'_>, items: &mut [WorkItem]) -> Result<(), StoreError> {
        let mut seen: HashSet<(i64, i64)> = HashSet::new();
        for item in items.iter_mut() {
            let Tag::LocalDelivery { user_id, .. } = &item.tag else { continue };
            let key = (item.message.id, *user_id);
            if !seen.insert(key) || message::mailbox::has_copy(ctx.conn, key.0, key.1)? {
                item.tag = Tag::Duplicate;
            }
        }
        Ok(())
    }

    fn apply(&self, tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        // RFC 3461: NOTIFY=SUCCESS asks for a "delivered" report; one per message (RFC 3464
        // allows many recipients in one report).
        let mut delivered: BTreeMap<i64, (&WorkItem, Vec<ReportEntry>)> = BTreeMap::new();
        for item in items {
            let Tag::LocalDelivery { user_id, user } = &item.tag else { continue };
            let prefix = format!("Return-Path: <{}>\r\n", item.message.mail_from);
            let size = prefix.len() as i64 + item.message.size;
            let new = message::mailbox::deliver(tx, *user_id, item.message.id, item.recipient_id, prefix.as_bytes(), size)?;
            if new {
                directory::mailbox::add_usage(tx, *user_id, size)?;
            }
            if new && reports::wanted(item.notify.as_deref(), Action::Delivered) && !item.message.mail_from.is_empty() {
                let entry = ReportEntry {
                    recipient: item.address.clone(),
                    orcpt: item.orcpt.clone(),
                    action: Action::Delivered,
                    status: "2.0.0".into(),
                    diagnostic: "250 2.0.0 delivered to the mailbox".into(),
                    remote_mta: None,
                };
                delivered.entry(item.message.id).or_insert_with(|| (item, Vec::new())).1.push(entry);
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
        for (item, entries) in delivered.into_values() {
            reports::queue(tx, &self.reports, &item.message, &item.message.mail_from, &[], Origin::Bounce, &entries)?;
        }
        Ok(())
    }
}
