//! Non-delivery (journal A): each recipient that failed after acceptance is journaled, and the
//! sender gets one RFC 3464 report per message listing those whose NOTIFY asks for it. Never a
//! report to the null sender; a report that itself fails goes to the postmaster once; one that
//! fails too is dropped. A local `nondelivery@…` address gets a copy of every report (C4).

use crate::journal::{self, code};
use rusqlite::Connection;
use store::StoreError;

use crate::bounce::{Action, ReportEntry};
use crate::message::Origin;
use crate::pipeline::{SnapIn, Tag, WorkItem};
use crate::reports::{self, ReportSettings};

pub struct NonDelivery {
    /// Where reports about failed reports go.
    pub postmaster: String,
    pub reports: ReportSettings,
}

impl SnapIn for NonDelivery {
    fn name(&self) -> &'static str {
        "non-delivery"
    }

    fn apply(&self, tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        let failed: Vec<&WorkItem> = items.iter().filter(|i| matches!(i.tag, Tag::NonDelivery { .. })).collect();
        for group in failed.chunk_by(|a, b| a.message.id == b.message.id) {
            let message = &group[0].message;
            let mut entries = Vec::new();
            for i in group {
                let Tag::NonDelivery { status, reason } = &i.tag else { unreachable!("filtered above") };
                let detail = format!("{status} {reason}");
                let entry = journal::Entry {
                    code: code::NON_DELIVERY,
                    qid: &message.qid,
                    originator: &message.mail_from,
                    recipient: &i.address,
                    size: Some(message.size),
                    detail: &detail,
                    ..Default::default()
                };
                journal::append(tx, &entry)?;
                if reports::wanted(i.notify.as_deref(), Action::Failed) {
                    entries.push(ReportEntry {
                        recipient: i.address.clone(),
                        orcpt: i.orcpt.clone(),
                        action: Action::Failed,
                        status: status.clone(),
                        diagnostic: reason.clone(),
                        remote_mta: i.remote_mta.clone(),
                    });
                }
            }
            if entries.is_empty() {
                continue; // NOTIFY=NEVER
            }
            let (to, origin) = match (message.origin, message.mail_from.as_str()) {
                (Origin::Bounce, _) => (self.postmaster.as_str(), Origin::DoubleBounce),
                (Origin::DoubleBounce, _) | (_, "") => {
                    let why = if message.origin == Origin::DoubleBounce {
                        "report to the postmaster could not be delivered either: dropped"
                    } else {
                        "no report: the sender is the null address <>"
                    };
                    journal::append(tx, &journal::Entry { code: code::NON_DELIVERY_DROPPED, qid: &message.qid, detail: why, ..Default::default() })?;
                    continue;
                }
                (_, sender) => (sender, Origin::Bounce),
            };
            let copies: Vec<String> = reports::nondelivery_copy(tx)?.into_iter().collect();
            reports::queue(tx, &self.reports, message, to, &copies, origin, &entries)?;
        }
        Ok(())
    }
}
