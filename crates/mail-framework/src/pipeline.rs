//! The snap-in pipeline: a worker takes a batch of queued recipients, lets every snap-in
//! examine them (read-only), then applies all their decisions in one write transaction.

use std::sync::Arc;
use std::time::Duration;

use directory::LocalDomains;
use rusqlite::{Connection, params};
use store::journal::{self, code};
use store::{Durability, Store, StoreError};

use crate::Result;
use crate::queue::Queue;

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
    /// An alias or forwarding address: new recipients were queued in its place.
    Expanded,
    /// A filter kept the message aside (F3 *keep*): delivered to nobody, kept for review.
    Quarantined { rule: String },
    /// A filter threw the message away (F3 *discard*).
    Discarded { rule: String },
}

impl Tag {
    fn journal_text(&self) -> &'static str {
        match self {
            Tag::Unresolved | Tag::PutBack => "PutBk",
            Tag::LocalDelivery { .. } => "POP LclDel",
            Tag::Forward => "SMTP MsgFwd",
            Tag::NonDelivery { .. } => "SMTP NonDel",
            Tag::Expanded => "Expanded",
            Tag::Quarantined { .. } => "Filtered: kept",
            Tag::Discarded { .. } => "Filtered: discarded",
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
    pub received_at: i64,
    /// `smtp`, `bounce` (a non-delivery report), `double-bounce` (one to the postmaster).
    pub origin: String,
}

/// One queued recipient travelling through the pipeline.
#[derive(Clone, Debug)]
pub struct WorkItem {
    pub recipient_id: i64,
    pub address: String,
    pub message: Arc<MessageInfo>,
    pub tag: Tag,
    /// How many alias or forwarding expansions led to this recipient (F7: at most 10).
    pub depth: i64,
    /// Addresses that replace or accompany this one (an alias, a forwarding address).
    pub expand_to: Vec<String>,
    /// RFC 3461 NOTIFY and ORCPT given for this recipient.
    pub notify: Option<String>,
    pub orcpt: Option<String>,
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
    /// Woken when recipients are put on the outbound queue.
    outbound: Arc<tokio::sync::Notify>,
    heartbeat: crate::heartbeat::Heartbeat,
    storage: crate::storage::StorageGuard,
}

impl Framework {
    /// The built-in snap-ins in i5/OS exit-point order; `hostname` signs delivery reports
    /// (unless `reports::configure` was called first, with more settings).
    pub fn new(queue: Queue, domains: LocalDomains, hostname: &str) -> Self {
        crate::reports::configure(crate::reports::ReportSettings { hostname: hostname.to_string(), responsible_person: None });
        let snapins = crate::snapins::builtin(domains.postmaster(), crate::snapins::DEFAULT_FILTER_MAX_BYTES);
        Self::with_snapins(queue, domains, snapins)
    }

    pub fn with_snapins(queue: Queue, domains: LocalDomains, snapins: Vec<Box<dyn SnapIn>>) -> Self {
        Framework {
            queue,
            domains,
            snapins: Arc::new(snapins),
            outbound: Arc::new(tokio::sync::Notify::new()),
            heartbeat: Default::default(),
            storage: Default::default(),
        }
    }

    /// Replace the snap-ins (e.g. to set the filters' parse limit).
    pub fn with_snapin_chain(mut self, snapins: Vec<Box<dyn SnapIn>>) -> Self {
        self.snapins = Arc::new(snapins);
        self
    }

    /// Pause while the storage guard says space is low (F5).
    pub fn with_storage_guard(mut self, storage: crate::storage::StorageGuard) -> Self {
        self.storage = storage;
        self
    }

    /// Stamped on every round of the worker (`postroom status`).
    pub fn heartbeat(&self) -> crate::heartbeat::Heartbeat {
        self.heartbeat.clone()
    }

    /// Wakes the pipeline: recipients wait for a snap-in (the SMTP client's failures do).
    pub fn pipeline_wake(&self) -> Arc<tokio::sync::Notify> {
        self.queue.wake_handle()
    }

    /// Notified whenever a batch put recipients on the outbound queue (the SMTP client waits on it).
    pub fn outbound_wake(&self) -> Arc<tokio::sync::Notify> {
        self.outbound.clone()
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Run the pipeline until the store closes: wake on enqueue, and every few seconds for
    /// put-back recipients and work left by a crash.
    pub async fn run(self) {
        let wake = self.queue.wake_handle();
        loop {
            self.heartbeat.beat();
            // F5: below the storage threshold the work waits on the (busy) queue.
            let round = if self.storage.is_low() { Ok(0) } else { self.run_once().await };
            match round {
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
        let outbound = store.write(Durability::Normal, move |tx| apply_batch(tx, &snapins, items)).await?;
        if outbound > 0 {
            self.outbound.notify_one();
        }
        // A bounce is a new queued message: take it in the next round.
        self.queue.wake_handle().notify_one();
        Ok(n)
    }
}

fn load_batch(conn: &Connection) -> Result<Vec<WorkItem>, StoreError> {
    // `bounce` rows failed after acceptance (in the SMTP client): they come pre-tagged for the
    // non-delivery snap-in, with the reason in last_reply.
    let mut stmt = conn.prepare_cached(
        "SELECT r.id, r.address, m.id, m.qid, m.mail_from, m.size, m.received_at, m.origin, r.state, r.last_reply, r.depth, r.notify, r.orcpt
           FROM recipients r JOIN messages m ON m.id = r.message_id
          WHERE r.state IN ('queued', 'bounce') AND (r.next_attempt IS NULL OR r.next_attempt <= ?1)
          ORDER BY r.message_id, r.id LIMIT ?2",
    )?;
    let mut items: Vec<WorkItem> = Vec::new();
    let mut rows = stmt.query(params![store::now(), BATCH as i64])?;
    while let Some(r) = rows.next()? {
        let message_id: i64 = r.get(2)?;
        let message = match items.last() {
            Some(prev) if prev.message.id == message_id => prev.message.clone(),
            _ => Arc::new(MessageInfo {
                id: message_id,
                qid: r.get(3)?,
                mail_from: r.get(4)?,
                size: r.get(5)?,
                received_at: r.get(6)?,
                origin: r.get(7)?,
            }),
        };
        let tag = match r.get::<_, String>(8)?.as_str() {
            "bounce" => {
                let reason: String = r.get::<_, Option<String>>(9)?.unwrap_or_default();
                Tag::NonDelivery { status: crate::bounce::status_of(&reason), reason }
            }
            _ => Tag::Unresolved,
        };
        items.push(WorkItem {
            recipient_id: r.get(0)?,
            address: r.get(1)?,
            message,
            tag,
            depth: r.get(10)?,
            expand_to: Vec::new(),
            notify: r.get(11)?,
            orcpt: r.get(12)?,
        });
    }
    Ok(items)
}

/// One transaction: keep only items still waiting (a replay after a crash finds them done),
/// let each snap-in apply, record states and P2 journal rows, free finished messages.
/// Returns how many recipients went to the outbound queue.
fn apply_batch(tx: &Connection, snapins: &[Box<dyn SnapIn>], items: Vec<WorkItem>) -> Result<usize, StoreError> {
    let mut live = Vec::with_capacity(items.len());
    {
        let mut still = tx.prepare_cached("SELECT 1 FROM recipients WHERE id = ?1 AND state IN ('queued', 'bounce')")?;
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
            Tag::Expanded => ("expanded", None, None, None),
            Tag::Quarantined { rule } => ("quarantined", None, None, Some(rule.clone())),
            Tag::Discarded { rule } => ("discarded", None, None, Some(rule.clone())),
            Tag::NonDelivery { reason, .. } => ("failed", None, None, Some(reason.clone())),
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
    Ok(live.iter().filter(|i| i.tag == Tag::Forward).count())
}
