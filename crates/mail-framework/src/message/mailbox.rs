//! Mailboxes: one row per delivered copy, sharing the message's stored body, with the
//! per-delivery prefix (Return-Path, S3). The row id is the UIDL basis and is never reused (P4).

use rusqlite::{Connection, OptionalExtension, params};
use store::{Durability, Store, StoreError};

/// One message of a maildrop snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxEntry {
    /// Mailbox row id (never reused).
    pub id: i64,
    /// Octets as POP3 reports them: the delivery prefix plus the stored body (CRLF line ends).
    pub size: u64,
    pub uidl: String,
}

/// How to read one mailbox message: the per-delivery prefix, then the body chunks in order.
#[derive(Clone, Debug)]
pub struct MessageLayout {
    pub prefix: Vec<u8>,
    pub message_id: i64,
    pub chunks: Vec<i64>,
}

/// Does `user_id` already hold a copy of the message? (One copy per mailbox per message.)
pub fn has_copy(c: &Connection, message_id: i64, user_id: i64) -> Result<bool, StoreError> {
    Ok(c.prepare_cached("SELECT 1 FROM mailbox WHERE message_id = ?1 AND user_id = ?2")?.exists(params![message_id, user_id])?)
}

/// Put a copy in the user's mailbox for `recipient_id`; false when that recipient's copy is
/// already there (a replay after a crash).
pub fn deliver(c: &Connection, user_id: i64, message_id: i64, recipient_id: i64, prefix: &[u8], size: i64) -> Result<bool, StoreError> {
    let n = c
        .prepare_cached(
            "INSERT OR IGNORE INTO mailbox (user_id, message_id, recipient_id, prefix, size, delivered_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![user_id, message_id, recipient_id, prefix, size, store::now()])?;
    Ok(n == 1)
}

/// The maildrop as it is now, oldest first.
pub async fn snapshot(store: &Store, user_id: i64) -> Result<Vec<MailboxEntry>, StoreError> {
    store
        .read(move |c| {
            let epoch: String = c.query_row("SELECT value FROM meta WHERE key = 'uidl_epoch'", [], |r| r.get(0))?;
            let mut stmt = c.prepare_cached("SELECT id, size FROM mailbox WHERE user_id = ?1 ORDER BY id")?;
            let rows = stmt.query_map([user_id], |r| {
                let id: i64 = r.get(0)?;
                Ok(MailboxEntry { id, size: r.get::<_, i64>(1)? as u64, uidl: format!("{epoch}.{id}") })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
}

/// Where a mailbox copy's bytes are.
pub async fn layout(store: &Store, mailbox_id: i64) -> Result<Option<MessageLayout>, StoreError> {
    store
        .read(move |c| {
            let row: Option<(Vec<u8>, i64)> = c
                .prepare_cached("SELECT prefix, message_id FROM mailbox WHERE id = ?1")?
                .query_row([mailbox_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((prefix, message_id)) = row else { return Ok(None) };
            Ok(Some(MessageLayout { prefix, message_id, chunks: super::body::chunk_ids(c, message_id)? }))
        })
        .await
}

/// One body chunk by its row id (an error when the message was freed meanwhile).
pub async fn chunk(store: &Store, chunk_id: i64) -> Result<Vec<u8>, StoreError> {
    store.read(move |c| super::body::chunk(c, chunk_id)?.ok_or_else(|| StoreError::Invalid(format!("body chunk {chunk_id} is gone")))).await
}

/// POP3 UPDATE state: delete these mailbox rows of `user_id`, free bodies nobody needs any more,
/// and let the directory finish removing a removed user whose box is now empty.
pub async fn delete(store: &Store, user_id: i64, ids: Vec<i64>) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    store
        .write(Durability::Full, move |c| {
            let mut freed = 0i64;
            for id in &ids {
                let row: Option<(i64, i64)> = c
                    .prepare_cached("DELETE FROM mailbox WHERE id = ?1 AND user_id = ?2 RETURNING message_id, size")?
                    .query_row(params![id, user_id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if let Some((message_id, size)) = row {
                    freed += size;
                    super::collect(c, message_id)?;
                }
            }
            directory::mailbox::released(c, user_id, freed)?;
            Ok(())
        })
        .await
}
