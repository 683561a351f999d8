//! The POP3 side of the directory: logins, maildrop snapshots, message bytes, deletions.

use rusqlite::{Connection, OptionalExtension, params};
use store::journal::{self, code};
use store::{Durability, Store};

use crate::{PasswordPool, Result};

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

/// A successful login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginUser {
    pub id: i64,
    pub name: String,
}

/// Check a user name and password. Disabled and unknown users fail exactly like a wrong
/// password, after the same argon2 work.
pub async fn authenticate(store: &Store, pool: &PasswordPool, name: &str, password: &str) -> Result<Option<LoginUser>> {
    let n = name.to_string();
    let row: Option<(i64, String, Option<String>, bool)> = store
        .read(move |c| {
            Ok(c.prepare_cached("SELECT id, name, password_hash, enabled FROM users WHERE name = ?1")?
                .query_row([n], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()?)
        })
        .await?;
    let (hash, user) = match row {
        Some((id, name, hash, enabled)) => (hash, enabled.then_some(LoginUser { id, name })),
        None => (None, None),
    };
    let ok = pool.verify(hash, password.to_string()).await?;
    Ok(if ok { user } else { None })
}

/// A user's addresses (sender verification, A3).
pub async fn addresses(store: &Store, user_id: i64) -> Result<Vec<String>> {
    Ok(store
        .read(move |c| {
            let mut stmt = c.prepare_cached("SELECT address FROM addresses WHERE user_id = ?1")?;
            let rows = stmt.query_map([user_id], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .await?)
}

/// Remember that `user_id` logged in from `ip` (P5), for POP-before-SMTP. No fsync of its own:
/// it rides on the next durable commit.
pub async fn record_login(store: &Store, user: &LoginUser, ip: &str) -> Result<()> {
    let (id, name, ip) = (user.id, user.name.clone(), ip.to_string());
    store
        .write(Durability::Normal, move |c| {
            c.prepare_cached("INSERT INTO pop_logins (ip, user_id, at) VALUES (?1, ?2, ?3) ON CONFLICT(ip) DO UPDATE SET user_id = ?2, at = ?3")?
                .execute(params![ip, id, store::now()])?;
            journal::append(c, &journal::Entry { code: code::POP_LOGIN, recipient: &name, ip: &ip, ..Default::default() })?;
            Ok(())
        })
        .await?;
    Ok(())
}

/// The maildrop as it is now, oldest first.
pub async fn snapshot(store: &Store, user_id: i64) -> Result<Vec<MailboxEntry>> {
    Ok(store
        .read(move |c| {
            let epoch: String = c.query_row("SELECT value FROM meta WHERE key = 'uidl_epoch'", [], |r| r.get(0))?;
            let mut stmt = c.prepare_cached("SELECT id, size FROM mailbox WHERE user_id = ?1 ORDER BY id")?;
            let rows = stmt.query_map([user_id], |r| {
                let id: i64 = r.get(0)?;
                Ok(MailboxEntry { id, size: r.get::<_, i64>(1)? as u64, uidl: format!("{epoch}.{id}") })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?)
}

pub async fn layout(store: &Store, mailbox_id: i64) -> Result<Option<MessageLayout>> {
    Ok(store
        .read(move |c| {
            let row: Option<(Vec<u8>, i64)> = c
                .prepare_cached("SELECT prefix, message_id FROM mailbox WHERE id = ?1")?
                .query_row([mailbox_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((prefix, message_id)) = row else { return Ok(None) };
            let mut stmt = c.prepare_cached("SELECT id FROM body_chunks WHERE message_id = ?1 ORDER BY seq")?;
            let chunks = stmt.query_map([message_id], |r| r.get(0))?.collect::<rusqlite::Result<Vec<i64>>>()?;
            Ok(Some(MessageLayout { prefix, message_id, chunks }))
        })
        .await?)
}

/// One body chunk by its row id.
pub async fn chunk(store: &Store, chunk_id: i64) -> Result<Vec<u8>> {
    Ok(store.read(move |c| Ok(c.prepare_cached("SELECT data FROM body_chunks WHERE id = ?1")?.query_row([chunk_id], |r| r.get(0))?)).await?)
}

/// POP3 UPDATE state: delete these mailbox rows of `user_id`, free bodies nobody needs any more,
/// and finish removing a removed user whose box is now empty.
pub async fn delete(store: &Store, user_id: i64, ids: Vec<i64>) -> Result<()> {
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
                    collect_message(c, message_id)?;
                }
            }
            c.prepare_cached("UPDATE users SET used_bytes = max(0, used_bytes - ?2) WHERE id = ?1")?.execute(params![user_id, freed])?;
            c.prepare_cached("DELETE FROM users WHERE id = ?1 AND removed = 1 AND NOT EXISTS (SELECT 1 FROM mailbox WHERE user_id = ?1)")?
                .execute([user_id])?;
            Ok(())
        })
        .await?;
    Ok(())
}

/// Delete a message and its body once no mailbox row and no unfinished recipient needs it.
pub fn collect_message(c: &Connection, message_id: i64) -> rusqlite::Result<bool> {
    let n = c
        .prepare_cached(
            "DELETE FROM messages WHERE id = ?1
               AND NOT EXISTS (SELECT 1 FROM mailbox WHERE message_id = ?1)
               AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1 AND state IN ('queued', 'forward', 'bounce'))
               AND NOT EXISTS (SELECT 1 FROM quarantine WHERE message_id = ?1 AND released = 0)",
        )?
        .execute([message_id])?;
    Ok(n > 0)
}
