//! The snap-in pipeline: a worker takes a batch of queued recipients, lets every snap-in
//! examine them (read-only), then applies all their decisions in one write transaction.

use std::sync::Arc;
use std::time::Duration;

use crate::journal::{self, code};
use directory::LocalDomains;
use rusqlite::Connection;
use store::{Durability, Store, StoreError};

use crate::Result;
use crate::message::{self, RecipientState};
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
    /// Another recipient of the message already reaches the same mailbox (one copy each).
    Duplicate,
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
            Tag::Duplicate => "Duplicate",
        }
    }
}

pub use crate::message::MessageInfo;

/// One queued recipient travelling through the pipeline.
#[derive(Clone, Debug)]
pub struct WorkItem {
    pub recipient_id: i64,
    pub address: String,
    pub message: Arc<MessageInfo>,
    pub tag: Tag,
    /// How many alias or forwarding expansions led to this recipient (F7: at most 10).
    pub depth: i64,
    /// The alias or forwarding address this recipient was expanded from.
    pub expanded_from: Option<String>,
    /// Addresses that replace or accompany this one (an alias, a forwarding address).
    pub expand_to: Vec<String>,
    /// RFC 3461 NOTIFY and ORCPT given for this recipient.
    pub notify: Option<String>,
    pub orcpt: Option<String>,
    /// Failed in the SMTP client: the host whose reply failed it (RFC 3464 Remote-MTA).
    pub remote_mta: Option<String>,
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

/// The snap-ins in exit-point order.
type Chain = Arc<Vec<Box<dyn SnapIn>>>;

/// The framework: the queue plus the pipeline worker.
#[derive(Clone)]
pub struct Framework {
    queue: Queue,
    domains: LocalDomains,
    /// The chain; [`Framework::replace_snapins`] swaps it (O6: SIGHUP) for the next batch.
    snapins: Arc<std::sync::RwLock<Chain>>,
    /// Woken when recipients are put on the outbound queue.
    outbound: Arc<tokio::sync::Notify>,
    heartbeat: crate::heartbeat::Heartbeat,
    storage: crate::storage::StorageGuard,
}

impl Framework {
    /// A framework running these snap-ins (`snapins::builtin` gives the built-in chain in
    /// i5/OS exit-point order).
    pub fn with_snapins(queue: Queue, domains: LocalDomains, snapins: Vec<Box<dyn SnapIn>>) -> Self {
        Framework {
            queue,
            domains,
            snapins: Arc::new(std::sync::RwLock::new(Arc::new(snapins))),
            outbound: Arc::new(tokio::sync::Notify::new()),
            heartbeat: Default::default(),
            storage: Default::default(),
        }
    }

    /// Replace the snap-ins (e.g. to set the filters' parse limit).
    pub fn with_snapin_chain(mut self, snapins: Vec<Box<dyn SnapIn>>) -> Self {
        self.snapins = Arc::new(std::sync::RwLock::new(Arc::new(snapins)));
        self
    }

    /// Replace the snap-ins of the running framework and of every clone of it (O6: new settings
    /// from a reloaded configuration): the batch in progress finishes with the old chain, the
    /// next one uses the new chain.
    pub fn replace_snapins(&self, snapins: Vec<Box<dyn SnapIn>>) {
        *self.snapins.write().expect("snap-in chain") = Arc::new(snapins);
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

    /// Process one batch; returns how many recipients it took. When the batch fails, each
    /// message in it is tried alone, so one poison message cannot stall the others: the one
    /// that fails is looked at again after a growing pause and, after
    /// [`message::resolve::MAX_FAILURES`] failures, held for the administrator (journaled,
    /// shown by `postroom queue list`).
    pub async fn run_once(&self) -> Result<usize> {
        self.run_once_at(store::now()).await
    }

    /// [`Framework::run_once`] as if the time were `now` (unix seconds): tests step the
    /// framework's back-off without waiting.
    pub async fn run_once_at(&self, now: i64) -> Result<usize> {
        let items = self.queue.store().read(move |c| load_batch(c, now)).await?;
        let n = items.len();
        if n == 0 {
            return Ok(0);
        }
        let outbound = match self.process(items.clone()).await {
            Ok(outbound) => outbound,
            Err(e) => {
                tracing::warn!(error = %e, recipients = n, "framework batch failed; trying its messages one by one");
                let mut outbound = 0;
                for group in items.chunk_by(|a, b| a.message.id == b.message.id) {
                    match self.process(group.to_vec()).await {
                        Ok(o) => outbound += o,
                        Err(e) => self.failed(group, &e.to_string(), now).await?,
                    }
                }
                outbound
            }
        };
        if outbound > 0 {
            self.outbound.notify_one();
        }
        // A bounce is a new queued message: take it in the next round.
        self.queue.wake_handle().notify_one();
        Ok(n)
    }

    /// Let every snap-in examine the items, then apply their decisions in one transaction.
    async fn process(&self, items: Vec<WorkItem>) -> Result<usize> {
        let store: &Store = self.queue.store();
        // One chain for both phases of the batch, even if it is replaced meanwhile.
        let chain: Chain = self.snapins.read().expect("snap-in chain").clone();
        let (domains, snapins) = (self.domains.clone(), chain.clone());
        let items = store
            .read(move |conn| {
                let mut items = items;
                let ctx = Context { conn, domains: &domains };
                for s in snapins.iter() {
                    s.examine(&ctx, &mut items)?;
                }
                Ok(items)
            })
            .await?;
        Ok(store.write(Durability::Normal, move |tx| apply_batch(tx, &chain, items)).await?)
    }

    /// The snap-ins failed on one message's recipients: count it, back off, hold at the limit.
    async fn failed(&self, group: &[WorkItem], error: &str, now: i64) -> Result<()> {
        let message = group[0].message.clone();
        let ids: Vec<i64> = group.iter().map(|i| i.recipient_id).collect();
        tracing::error!(qid = %message.qid, %error, "the framework failed on a message; it waits and is tried again");
        let error = error.to_string();
        self.queue
            .store()
            .write(Durability::Normal, move |c| {
                let held = message::resolve::failed(c, &ids, &error, now)?;
                if !held.is_empty() {
                    let detail = format!(
                        "{} recipient(s) held after {} framework failures: {error} (postroom queue release {})",
                        held.len(),
                        message::resolve::MAX_FAILURES,
                        message.qid
                    );
                    journal::append(c, &journal::Entry { code: code::FRAMEWORK_HELD, qid: &message.qid, detail: &detail, ..Default::default() })?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }
}

fn load_batch(conn: &Connection, now: i64) -> Result<Vec<WorkItem>, StoreError> {
    let waiting = message::resolve::waiting(conn, now, BATCH)?;
    Ok(waiting
        .into_iter()
        .map(|w| {
            // `bounce` rows failed after acceptance (in the SMTP client): they come pre-tagged for
            // the non-delivery snap-in, with the reason in last_reply.
            let tag = match w.state {
                RecipientState::Bounce => {
                    let reason = w.last_reply.unwrap_or_default();
                    Tag::NonDelivery { status: crate::bounce::status_of(&reason), reason }
                }
                _ => Tag::Unresolved,
            };
            WorkItem {
                recipient_id: w.recipient_id,
                address: w.address,
                message: w.message,
                tag,
                depth: w.depth,
                expanded_from: w.expanded_from,
                expand_to: Vec::new(),
                notify: w.notify,
                orcpt: w.orcpt,
                remote_mta: w.remote_mta,
            }
        })
        .collect())
}

/// One transaction: keep only items still waiting (a replay after a crash finds them done),
/// let each snap-in apply, record states and P2 journal rows, free finished messages.
/// Returns how many recipients went to the outbound queue.
fn apply_batch(tx: &Connection, snapins: &[Box<dyn SnapIn>], items: Vec<WorkItem>) -> Result<usize, StoreError> {
    let mut live = Vec::with_capacity(items.len());
    for item in items {
        if message::resolve::still_waiting(tx, item.recipient_id)? {
            live.push(item);
        }
    }
    for s in snapins {
        s.apply(tx, &live)?;
    }
    let now = store::now();
    for item in &live {
        let (state, user_id, next, reply) = match &item.tag {
            Tag::LocalDelivery { user_id, .. } => (RecipientState::Delivered, Some(*user_id), None, None),
            Tag::Duplicate => (RecipientState::Duplicate, None, None, Some("another recipient of this message reaches the same mailbox")),
            Tag::Forward => (RecipientState::Forward, None, None, None),
            Tag::Expanded => (RecipientState::Expanded, None, None, None),
            Tag::Quarantined { rule } => (RecipientState::Quarantined, None, None, Some(rule.as_str())),
            Tag::Discarded { rule } => (RecipientState::Discarded, None, None, Some(rule.as_str())),
            Tag::NonDelivery { reason, .. } => (RecipientState::Failed, None, None, Some(reason.as_str())),
            Tag::Unresolved | Tag::PutBack => (RecipientState::Queued, None, Some(now + PUT_BACK_SECS), None),
        };
        message::resolve::resolved(tx, item.recipient_id, state, user_id, next, reply)?;
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
            message::collect(tx, item.message.id)?;
            last = Some(item.message.id);
        }
    }
    Ok(live.iter().filter(|i| i.tag == Tag::Forward).count())
}
