//! The durable queue: messages stream in chunk by chunk while DATA arrives, and become queued
//! with one `synchronous=FULL` commit — only then may the SMTP server answer 250 (F1).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::journal::{self, code};
use store::{Durability, Store};
use tokio::sync::Notify;

use crate::Result;
use crate::message;
pub use crate::message::envelope::{Dsn, Envelope, RcptDsn};

/// The framework queue: enqueue from the doors, wake-ups for the pipeline.
#[derive(Clone)]
pub struct Queue {
    store: Store,
    wake: Arc<Notify>,
    chunk_size: usize,
}

/// A message being received. Full chunks are written as they fill; the last one is written
/// with the envelope in the durable commit. Drop without [`Incoming::commit`] leaves an
/// incomplete row that [`Queue::recover`] or [`Incoming::abort`] removes.
pub struct Incoming {
    queue: Queue,
    qid: String,
    message_id: Option<i64>,
    seq: i64,
    buf: Vec<u8>,
    size: u64,
    /// Kept in the quarantine from the start, for this reason (E1: DMARC p=quarantine).
    quarantine: Option<String>,
}

impl Queue {
    pub fn new(store: Store, chunk_size: usize) -> Self {
        Queue { store, wake: Arc::new(Notify::new()), chunk_size: chunk_size.max(4096) }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn wake_handle(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Start receiving a message under a new queue id.
    pub fn incoming(&self) -> Incoming {
        Incoming { queue: self.clone(), qid: new_qid(), message_id: None, seq: 0, buf: Vec::new(), size: 0, quarantine: None }
    }

    /// At start-up: drop messages whose DATA never finished (their sender got no 250), and
    /// release the claims of outbound attempts the previous process did not finish.
    pub async fn recover(&self) -> Result<usize> {
        Ok(self
            .store
            .write(Durability::Normal, |c| {
                let released = message::outbound::release_all_claims(c)?;
                if released > 0 {
                    tracing::info!(released, "recipients whose delivery attempt was interrupted are due again");
                }
                message::receive::drop_incomplete(c)
            })
            .await?)
    }
}

impl Incoming {
    pub fn qid(&self) -> &str {
        &self.qid
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Commit the message into the quarantine (F3 *keep*) with `reason`: it is queued and
    /// journaled as any other, and the filtering snap-in keeps it from every recipient until the
    /// administrator releases it.
    pub fn quarantine(&mut self, reason: String) {
        self.quarantine = Some(reason);
    }

    /// Append message bytes; writes a chunk to the store whenever one fills up.
    pub async fn push(&mut self, bytes: &[u8]) -> Result<()> {
        self.size += bytes.len() as u64;
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = self.queue.chunk_size - self.buf.len();
            let take = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == self.queue.chunk_size {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let data = std::mem::take(&mut self.buf);
        let (qid, message_id, seq) = (self.qid.clone(), self.message_id, self.seq);
        let id = self
            .queue
            .store
            .write(Durability::Normal, move |c| {
                let id = match message_id {
                    Some(id) => id,
                    None => message::receive::start(c, &qid)?,
                };
                message::receive::chunk(c, id, seq, &data)?;
                Ok(id)
            })
            .await?;
        self.message_id = Some(id);
        self.seq += 1;
        Ok(())
    }

    /// Make the message durable and queued for `envelope`'s recipients; returns the queue id.
    /// This is the commit the SMTP server's 250 waits for.
    pub async fn commit(self, envelope: Envelope) -> Result<String> {
        let Incoming { queue, qid, message_id, seq, buf, size, quarantine } = self;
        let q = qid.clone();
        queue
            .store
            .write(Durability::Full, move |c| {
                let id = match message_id {
                    Some(id) => id,
                    None => message::receive::start(c, &q)?,
                };
                if !buf.is_empty() {
                    message::receive::chunk(c, id, seq, &buf)?;
                }
                let queued = message::receive::complete(c, id, size, &envelope)?;
                if let Some(reason) = &quarantine {
                    message::quarantine::keep(c, id, reason)?;
                }
                journal::append(
                    c,
                    &journal::Entry {
                        code: code::SMTP_RECEIVED_LOCAL,
                        qid: &q,
                        originator: &envelope.mail_from,
                        recipient: &queued.join(","),
                        size: Some(size as i64),
                        ip: &envelope.client_ip,
                        detail: envelope.origin.as_str(),
                    },
                )?;
                Ok(())
            })
            .await?;
        queue.wake.notify_one();
        Ok(qid)
    }

    /// Forget a message whose DATA was refused or cut off.
    pub async fn abort(self) {
        if let Some(id) = self.message_id {
            let r = self.queue.store.write(Durability::Normal, move |c| message::receive::abort(c, id)).await;
            if let Err(e) = r {
                tracing::warn!(qid = %self.qid, error = %e, "could not remove an aborted message; it goes at the next start");
            }
        }
    }
}

/// A queue id: time-ordered, unique across restarts (microseconds + a counter + random bits).
pub fn new_qid() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let micros = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xFFF;
    format!("{micros:X}{n:03X}{:04X}", u16::from_le_bytes(r))
}
