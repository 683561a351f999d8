//! The POP3 side of the directory: logins, login records, and the quota bookkeeping of
//! mailbox copies (the copies themselves belong to mail-framework's message model).

use rusqlite::{Connection, OptionalExtension, params};
use store::Store;

use crate::{PasswordPool, Result};

/// A successful login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginUser {
    pub id: i64,
    pub name: String,
}

/// What a login is for: a removed user (D2) may still collect what is left in their mailbox
/// over POP3, but never authenticate to send mail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginFor {
    /// POP3: collecting mail.
    Collect,
    /// SMTP AUTH: sending (and relaying) mail.
    Send,
    /// The web console (E6): only an administrator who is not removed.
    Administer,
}

/// Check a user name and password. Disabled, unknown, (for sending) removed and (for the console)
/// non-administrator users fail exactly like a wrong password, after the same argon2 work (A5:
/// no user enumeration).
pub async fn authenticate(store: &Store, pool: &PasswordPool, name: &str, password: &str, purpose: LoginFor) -> Result<Option<LoginUser>> {
    let n = name.to_string();
    let row: Option<(i64, String, Option<String>, bool, bool, bool)> = store
        .read(move |c| {
            Ok(c.prepare_cached("SELECT id, name, password_hash, enabled, removed, admin FROM users WHERE name = ?1")?
                .query_row([n], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
                .optional()?)
        })
        .await?;
    let (hash, user) = match row {
        Some((id, name, hash, enabled, removed, admin)) => {
            let may = enabled
                && match purpose {
                    LoginFor::Collect => true,
                    LoginFor::Send => !removed,
                    LoginFor::Administer => admin && !removed,
                };
            (hash, may.then_some(LoginUser { id, name }))
        }
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

/// The addresses of the user called `name`; None when there is no such user (or it is
/// removed: it may no longer send).
pub fn addresses_of(c: &Connection, name: &str) -> rusqlite::Result<Option<Vec<String>>> {
    let found: Option<i64> = c.prepare_cached("SELECT id FROM users WHERE name = ?1 AND removed = 0")?.query_row([name], |r| r.get(0)).optional()?;
    let Some(id) = found else { return Ok(None) };
    let mut stmt = c.prepare_cached("SELECT address FROM addresses WHERE user_id = ?1 ORDER BY address")?;
    let rows = stmt.query_map([id], |r| r.get(0))?;
    Ok(Some(rows.collect::<rusqlite::Result<Vec<String>>>()?))
}

/// Remember that `user_id` logged in from `ip` (P5), for POP-before-SMTP, inside the caller's
/// transaction (which also journals the login).
pub fn record_login(c: &Connection, user_id: i64, ip: &str) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT INTO pop_logins (ip, user_id, at) VALUES (?1, ?2, ?3) ON CONFLICT(ip) DO UPDATE SET user_id = ?2, at = ?3")?
        .execute(params![ip, user_id, store::now()])?;
    Ok(())
}

/// A mailbox copy of `size` octets was delivered to the user (D2's quota counts it).
pub fn add_usage(c: &Connection, user_id: i64, size: i64) -> rusqlite::Result<()> {
    c.prepare_cached("UPDATE users SET used_bytes = used_bytes + ?2 WHERE id = ?1")?.execute(params![user_id, size])?;
    Ok(())
}

/// Mailbox copies totalling `freed` octets were deleted (POP3 UPDATE): a removed user whose
/// box is now empty is gone for good.
pub fn released(c: &Connection, user_id: i64, freed: i64) -> rusqlite::Result<()> {
    c.prepare_cached("UPDATE users SET used_bytes = max(0, used_bytes - ?2) WHERE id = ?1")?.execute(params![user_id, freed])?;
    c.prepare_cached("DELETE FROM users WHERE id = ?1 AND removed = 1 AND NOT EXISTS (SELECT 1 FROM mailbox WHERE user_id = ?1)")?
        .execute([user_id])?;
    Ok(())
}
