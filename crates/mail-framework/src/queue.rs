//! The durable queue: messages stream in chunk by chunk while DATA arrives, and become queued
//! with one `synchronous=FULL` commit — only then may the SMTP server answer 250 (F1).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rusqlite::{Connection, params};
use store::journal::{self, code};
use store::{Durability, Store, StoreError};
use tokio::sync::Notify;

use crate::Result;

/// A message's envelope, as the receiving door saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    /// Reverse-path; empty for the null sender `<>`.
    pub mail_from: String,
    /// Forward-paths, as the client wrote them (bare `postmaster` allowed).
    pub recipients: Vec<String>,
    pub client_ip: String,
    pub helo: String,
    /// `smtp`, later `sendmail`, `api`, `bounce`.
    pub origin: &'static str,
    /// Delivery status notification requests (RFC 3461), when the client made any.
    pub dsn: Dsn,
}

/// RFC 3461 parameters: RET and ENVID of MAIL, NOTIFY and ORCPT of each RCPT (in the order of
/// `Envelope::recipients`; empty when no recipient had any).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dsn {
    /// `FULL` or `HDRS`.
    pub ret: Option<String>,
    pub envid: Option<String>,
    pub recipients: Vec<RcptDsn>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptDsn {
    /// `NEVER`, or a comma list of `SUCCESS`, `FAILURE`, `DELAY`; `None` = not given.
    pub notify: Option<String>,
    /// `addr-type;address` as given.
    pub orcpt: Option<String>,
}

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
        Incoming { queue: self.clone(), qid: new_qid(), message_id: None, seq: 0, buf: Vec::new(), size: 0 }
    }

    /// At start-up: drop messages whose DATA never finished (their sender got no 250).
    pub async fn recover(&self) -> Result<usize> {
        Ok(self.store.write(Durability::Normal, |c| Ok(c.execute("DELETE FROM messages WHERE complete = 0", [])?)).await?)
    }
}

impl Incoming {
    pub fn qid(&self) -> &str {
        &self.qid
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Insert bytes at `pos` of the message, which is possible while nothing has been written
    /// to the store yet (the first chunk is still in memory): used to add header fields to
    /// submitted mail once its header section has been seen. False when it was too late.
    pub fn insert_at(&mut self, pos: usize, bytes: &[u8]) -> bool {
        if self.message_id.is_some() || pos > self.buf.len() {
            return false;
        }
        self.buf.splice(pos..pos, bytes.iter().copied());
        self.size += bytes.len() as u64;
        true
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
                    None => insert_message(c, &qid)?,
                };
                insert_chunk(c, id, seq, &data)?;
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
        let Incoming { queue, qid, message_id, seq, buf, size } = self;
        let q = qid.clone();
        queue
            .store
            .write(Durability::Full, move |c| {
                let id = match message_id {
                    Some(id) => id,
                    None => insert_message(c, &q)?,
                };
                if !buf.is_empty() {
                    insert_chunk(c, id, seq, &buf)?;
                }
                c.prepare_cached(
                    "UPDATE messages SET complete = 1, mail_from = ?2, size = ?3, client_ip = ?4, helo = ?5, origin = ?6, dsn_ret = ?7, dsn_envid = ?8
                      WHERE id = ?1",
                )?
                .execute(params![
                    id,
                    envelope.mail_from,
                    size as i64,
                    envelope.client_ip,
                    envelope.helo,
                    envelope.origin,
                    envelope.dsn.ret,
                    envelope.dsn.envid
                ])?;
                let mut stmt =
                    c.prepare_cached("INSERT INTO recipients (message_id, address, state, notify, orcpt) VALUES (?1, ?2, 'queued', ?3, ?4)")?;
                for (i, r) in envelope.recipients.iter().enumerate() {
                    let dsn = envelope.dsn.recipients.get(i).cloned().unwrap_or_default();
                    stmt.execute(params![id, r, dsn.notify, dsn.orcpt])?;
                }
                journal::append(
                    c,
                    &journal::Entry {
                        code: code::SMTP_RECEIVED_LOCAL,
                        qid: &q,
                        originator: &envelope.mail_from,
                        recipient: &envelope.recipients.join(","),
                        size: Some(size as i64),
                        ip: &envelope.client_ip,
                        detail: envelope.origin,
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
            let r = self.queue.store.write(Durability::Normal, move |c| Ok(c.execute("DELETE FROM messages WHERE id = ?1", [id])?)).await;
            if let Err(e) = r {
                tracing::warn!(qid = %self.qid, error = %e, "could not remove an aborted message; it goes at the next start");
            }
        }
    }
}

fn insert_message(c: &Connection, qid: &str) -> Result<i64, StoreError> {
    c.prepare_cached("INSERT INTO messages (qid, received_at) VALUES (?1, ?2)")?.execute(params![qid, store::now()])?;
    Ok(c.last_insert_rowid())
}

fn insert_chunk(c: &Connection, message_id: i64, seq: i64, data: &[u8]) -> Result<(), StoreError> {
    c.prepare_cached("INSERT INTO body_chunks (message_id, seq, data) VALUES (?1, ?2, ?3)")?.execute(params![message_id, seq, data])?;
    Ok(())
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

/// One recipient row as `postroom queue list|show` prints it.
#[derive(Clone, Debug)]
pub struct QueuedRecipient {
    pub qid: String,
    pub mail_from: String,
    pub address: String,
    pub state: String,
    pub size: i64,
    pub received_at: i64,
    pub attempts: i64,
    pub next_attempt: Option<i64>,
    pub held: bool,
    pub last_reply: Option<String>,
}

const RECIPIENT_COLUMNS: &str = "m.qid, m.mail_from, r.address, r.state, m.size, m.received_at, r.attempts, r.next_attempt, r.held, r.last_reply";

fn recipient_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueuedRecipient> {
    Ok(QueuedRecipient {
        qid: r.get(0)?,
        mail_from: r.get(1)?,
        address: r.get(2)?,
        state: r.get(3)?,
        size: r.get(4)?,
        received_at: r.get(5)?,
        attempts: r.get(6)?,
        next_attempt: r.get(7)?,
        held: r.get(8)?,
        last_reply: r.get(9)?,
    })
}

/// Recipients not yet finished: waiting for the framework, the SMTP client or a report.
pub fn pending(c: &Connection) -> rusqlite::Result<Vec<QueuedRecipient>> {
    let mut stmt = c.prepare(&format!(
        "SELECT {RECIPIENT_COLUMNS} FROM recipients r JOIN messages m ON m.id = r.message_id
          WHERE r.state IN ('queued', 'forward', 'bounce') ORDER BY r.id"
    ))?;
    let rows = stmt.query_map([], recipient_row)?;
    rows.collect()
}

/// Every recipient of one message, whatever its state (`postroom queue show`).
pub fn message_recipients(c: &Connection, qid: &str) -> rusqlite::Result<Vec<QueuedRecipient>> {
    let mut stmt =
        c.prepare(&format!("SELECT {RECIPIENT_COLUMNS} FROM recipients r JOIN messages m ON m.id = r.message_id WHERE m.qid = ?1 ORDER BY r.id"))?;
    let rows = stmt.query_map([qid], recipient_row)?;
    rows.collect()
}
