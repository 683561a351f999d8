//! The snap-in pipeline: a worker takes a batch of queued recipients, lets every snap-in
//! examine them (read-only), then applies all their decisions in one write transaction.

use std::sync::Arc;
use std::time::Duration;

use directory::LocalDomains;
use rusqlite::{params, Connection};
use store::journal::{self, code};
use store::{Durability, Store, StoreError};

use crate::queue::Queue;
use crate::Result;

/// Recipients one pipeline transaction takes at most.
const BATCH: usize = 500;
/// A recipient no snap-in could place is looked at again after this long.
const PUT_BACK_SECS: i64 = 60;

/// The disposition a snap-in gives a recipient (the seeds' "tags", journal P2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tag {
    /// Nobody has decided yet.
    Unresolved,
    /// Deliver into this user's mailbox.
    LocalDelivery { user_id: i64, user: String },
    /// Hand to the SMTP client.
    Forward,
    /// Fail this recipient; the non-delivery snap-in reports it.
    NonDelivery { status: String, reason: String },
    /// For another snap-in, later.
    PutBack,
}

impl Tag {
    fn journal_text(&self) -> &'static str {
        match self {
            Tag::Unresolved | Tag::PutBack => "PutBk",
            Tag::LocalDelivery { .. } => "POP LclDel",
            Tag::Forward => "SMTP MsgFwd",
            Tag::NonDelivery { .. } => "SMTP NonDel",
        }
    }
}

/// The message a work item belongs to.
#[derive(Clone, Debug)]
pub struct MessageInfo {
    pub id: i64,
    pub qid: String,
    pub mail_from: String,
    pub size: i64,
}

/// One queued recipient travelling through the pipeline.
#[derive(Clone, Debug)]
pub struct WorkItem {
    pub recipient_id: i64,
    pub address: String,
    pub message: Arc<MessageInfo>,
    pub tag: Tag,
}

/// What a snap-in may read while it examines a batch.
pub struct Context<'a> {
    pub conn: &'a Connection,
    pub domains: &'a LocalDomains,
}

/// A snap-in: examines recipients and tags them, then makes its own tags happen inside the
/// batch transaction. Both steps see the whole batch; a snap-in ignores tags it does not own.
pub trait SnapIn: Send + Sync {
    fn name(&self) -> &'static str;

    /// Tag items (read-only connection). Runs on a store reader thread.
    fn examine(&self, _ctx: &Context<'_>, _items: &mut [WorkItem]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Carry out the tags this snap-in owns, in the write transaction that also records the
    /// recipients' new states. Runs on the store writer thread.
    fn apply(&self, _tx: &Connection, _items: &[WorkItem]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The framework: the queue plus the pipeline worker.
#[derive(Clone)]
pub struct Framework {
    queue: Queue,
    domains: LocalDomains,
    snapins: Arc<Vec<Box<dyn SnapIn>>>,
}

impl Framework {
    /// The built-in snap-ins in i5/OS exit-point order.
    pub fn new(queue: Queue, domains: LocalDomains) -> Self {
        Self::with_snapins(queue, domains, crate::snapins::builtin())
    }

    pub fn with_snapins(queue: Queue, domains: LocalDomains, snapins: Vec<Box<dyn SnapIn>>) -> Self {
        Framework { queue, domains, snapins: Arc::new(snapins) }
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Run the pipeline until the store closes: wake on enqueue, and every few seconds for
    /// put-back recipients and work left by a crash.
    pub async fn run(self) {
        let wake = self.queue.wake_handle();
        loop {
            match self.run_once().await {
                Ok(n) if n >= BATCH => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "framework batch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Process one batch; returns how many recipients it took.
    pub async fn run_once(&self) -> Result<usize> {
        let store: &Store = self.queue.store();
        let (domains, snapins) = (self.domains.clone(), self.snapins.clone());
        let items = store
            .read(move |conn| {
                let mut items = load_batch(conn)?;
                let ctx = Context { conn, domains: &domains };
                for s in snapins.iter() {
                    s.examine(&ctx, &mut items)?;
                }
                Ok(items)
            })
            .await?;
        let n = items.len();
        if n == 0 {
            return Ok(0);
        }
        let snapins = self.snapins.clone();
        store.write(Durability::Normal, move |tx| apply_batch(tx, &snapins, items)).await?;
        Ok(n)
    }
}

fn load_batch(conn: &Connection) -> Result<Vec<WorkItem>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT r.id, r.address, m.id, m.qid, m.mail_from, m.size
           FROM recipients r JOIN messages m ON m.id = r.message_id
          WHERE r.state = 'queued' AND (r.next_attempt IS NULL OR r.next_attempt <= ?1)
          ORDER BY r.id LIMIT ?2",
    )?;
    let mut items: Vec<WorkItem> = Vec::new();
    let mut rows = stmt.query(params![store::now(), BATCH as i64])?;
    while let Some(r) = rows.next()? {
        let message_id: i64 = r.get(2)?;
        let message = match items.last() {
            Some(prev) if prev.message.id == message_id => prev.message.clone(),
            _ => Arc::new(MessageInfo { id: message_id, qid: r.get(3)?, mail_from: r.get(4)?, size: r.get(5)? }),
        };
        items.push(WorkItem { recipient_id: r.get(0)?, address: r.get(1)?, message, tag: Tag::Unresolved });
    }
    Ok(items)
}

/// One transaction: keep only items still queued (a replay after a crash finds them done),
/// let each snap-in apply, record states and P2 journal rows, free finished messages.
fn apply_batch(tx: &Connection, snapins: &[Box<dyn SnapIn>], items: Vec<WorkItem>) -> Result<(), StoreError> {
    let mut live = Vec::with_capacity(items.len());
    {
        let mut still = tx.prepare_cached("SELECT 1 FROM recipients WHERE id = ?1 AND state = 'queued'")?;
        for item in items {
            if still.exists([item.recipient_id])? {
                live.push(item);
            }
        }
    }
    for s in snapins {
        s.apply(tx, &live)?;
    }
    let mut set_state = tx.prepare_cached("UPDATE recipients SET state = ?2, user_id = ?3, next_attempt = ?4, last_reply = ?5 WHERE id = ?1")?;
    for item in &live {
        let (state, user_id, next, reply) = match &item.tag {
            Tag::LocalDelivery { user_id, .. } => ("delivered", Some(*user_id), None, None),
            Tag::Forward => ("forward", None, None, None),
            Tag::NonDelivery { status, reason } => ("failed", None, None, Some(format!("{status} {reason}"))),
            Tag::Unresolved | Tag::PutBack => ("queued", None, Some(store::now() + PUT_BACK_SECS), None),
        };
        set_state.execute(params![item.recipient_id, state, user_id, next, reply])?;
        journal::append(
            tx,
            &journal::Entry {
                code: code::RESOLVED,
                qid: &item.message.qid,
                originator: &item.message.mail_from,
                recipient: &item.address,
                size: Some(item.message.size),
                detail: item.tag.journal_text(),
                ..Default::default()
            },
        )?;
    }
    let mut last = None;
    for item in &live {
        if last != Some(item.message.id) {
            directory::mailbox::collect_message(tx, item.message.id)?;
            last = Some(item.message.id);
        }
    }
    Ok(())
}
