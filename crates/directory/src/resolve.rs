//! Is an address ours, and whose is it? Used at RCPT (smtp-server) and by the framework's
//! address resolution snap-in, so both decide from the same rows.

use std::sync::Arc;

use mail_proto::Address;
use rusqlite::{Connection, OptionalExtension};
use store::Store;

use crate::Result;

/// The local domains: those of the configuration file plus those added with `domain add`.
#[derive(Clone, Debug)]
pub struct LocalDomains {
    configured: Arc<Vec<String>>,
    /// The configured postmaster address (SPEC S3: postmaster is delivered there).
    postmaster: Arc<String>,
}

/// What an envelope recipient is to us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// A user's mailbox, where the user forwards mail to (D1), and whether the mailbox is at
    /// its quota (D2).
    Local { user_id: i64, user: String, forward: Option<Forward>, full: bool },
    /// An alias or group of the system alias table (F7): these addresses instead; `full` when
    /// every mailbox it leads to is at its quota (D2: refused at RCPT like the user's own address).
    Alias { targets: Vec<String>, full: bool },
    /// A local domain, but no user has this address (550 5.1.1 at RCPT).
    Unknown,
    /// Not one of our domains.
    Remote,
}

/// A user's forwarding address (D1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub to: String,
    /// Also deliver into the user's own mailbox.
    pub keep_copy: bool,
}

impl LocalDomains {
    pub fn new(configured: &[String], postmaster: &str) -> Self {
        let configured = configured.iter().map(|d| normalise_domain(d)).collect();
        LocalDomains { configured: Arc::new(configured), postmaster: Arc::new(postmaster.to_ascii_lowercase()) }
    }

    pub fn configured(&self) -> &[String] {
        &self.configured
    }

    pub fn postmaster(&self) -> &str {
        &self.postmaster
    }

    /// Is `domain` local (configured or in the `domains` table)?
    pub fn contains(&self, conn: &Connection, domain: &str) -> Result<bool> {
        let d = normalise_domain(domain);
        if self.configured.contains(&d) {
            return Ok(true);
        }
        let mut stmt = conn.prepare_cached("SELECT 1 FROM domains WHERE name = ?1")?;
        Ok(stmt.exists([&d])?)
    }

    /// Resolve an envelope recipient. `postmaster` in any case, with no domain or a local one,
    /// is the configured postmaster address (RFC 5321 §4.5.1).
    pub fn resolve(&self, conn: &Connection, address: &Address) -> Result<Resolution> {
        let is_local_domain = address.domain.is_empty() || self.contains(conn, &address.domain)?;
        if !is_local_domain {
            return Ok(Resolution::Remote);
        }
        if address.is_postmaster() {
            let pm = self.postmaster.as_str();
            return match Address::parse(pm) {
                Ok(a) if a.is_postmaster() && a.domain.is_empty() => Ok(Resolution::Unknown),
                Ok(a) if !self.contains(conn, &a.domain)? => Ok(Resolution::Remote),
                Ok(_) => lookup(conn, pm),
                Err(_) => Ok(Resolution::Unknown),
            };
        }
        lookup(conn, &address.key())
    }

    /// [`LocalDomains::resolve`] on a reader connection.
    pub async fn resolve_async(&self, store: &Store, address: &Address) -> Result<Resolution> {
        let me = self.clone();
        let address = address.clone();
        store.read(move |conn| me.resolve(conn, &address).map_err(into_store)).await.map_err(Into::into)
    }
}

/// F7: a user's address first, then an alias, then the domain's catch-all (`*@domain`).
fn lookup(conn: &Connection, key: &str) -> Result<Resolution> {
    let row = user_row(conn, key)?;
    if let Some((user_id, user, forward, keep_copy, full)) = row {
        let forward = forward.filter(|f| !f.is_empty()).map(|to| Forward { to, keep_copy });
        return Ok(Resolution::Local { user_id, user, forward, full });
    }
    // `*@domain` names the catch-all; it is not a mailbox anyone can write to.
    if is_catch_all(key) {
        return Ok(Resolution::Unknown);
    }
    let mut seen = vec![key.to_string()];
    let mut targets = alias_targets(conn, key)?;
    if targets.is_empty() {
        let Some(catch_all) = catch_all_key(key) else { return Ok(Resolution::Unknown) };
        targets = alias_targets(conn, &catch_all)?;
        if targets.is_empty() {
            return Ok(Resolution::Unknown);
        }
        seen.push(catch_all);
    }
    let full = leads_only_to_full_mailboxes(conn, &targets, 0, &mut seen)?.unwrap_or(false);
    Ok(Resolution::Alias { targets, full })
}

/// Is this (lowercased) address the catch-all form `*@domain`?
pub fn is_catch_all(key: &str) -> bool {
    key.rsplit_once('@').is_some_and(|(local, _)| local == "*")
}

/// The key of the catch-all of this address's domain (F7).
pub fn catch_all_key(key: &str) -> Option<String> {
    let (_, domain) = key.rsplit_once('@')?;
    let domain = normalise_domain(domain);
    (!domain.is_empty()).then(|| format!("*@{domain}"))
}

fn alias_targets(conn: &Connection, key: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT target FROM aliases WHERE address = ?1 ORDER BY target")?;
    Ok(stmt.query_map([key], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// An alias's targets, or else those of its domain's catch-all, as the framework expands an
/// address that is no user's.
fn alias_or_catch_all_targets(conn: &Connection, key: &str) -> Result<Vec<String>> {
    let targets = alias_targets(conn, key)?;
    if !targets.is_empty() || is_catch_all(key) {
        return Ok(targets);
    }
    match catch_all_key(key) {
        Some(c) => alias_targets(conn, &c),
        None => Ok(targets),
    }
}

/// Some(true) when every mailbox these alias targets lead to (through nested aliases, at most
/// 10 levels, as the framework expands them) is at its quota; Some(false) when one has room or
/// a target is remote or a forward; None when they lead to no mailbox at all.
fn leads_only_to_full_mailboxes(conn: &Connection, targets: &[String], depth: usize, seen: &mut Vec<String>) -> Result<Option<bool>> {
    if depth >= 10 {
        return Ok(Some(false));
    }
    let mut any = None;
    for t in targets {
        let key = t.trim_end_matches('.').to_ascii_lowercase();
        if seen.contains(&key) || seen.len() > 100 {
            continue;
        }
        seen.push(key.clone());
        let full = match user_row(conn, &key)? {
            Some((_, _, forward, _, full)) => forward.is_none_or(|f| f.is_empty()) && full,
            None => {
                let nested = alias_or_catch_all_targets(conn, &key)?;
                if nested.is_empty() {
                    // Remote, or unknown (fails later): not a full mailbox.
                    false
                } else {
                    match leads_only_to_full_mailboxes(conn, &nested, depth + 1, seen)? {
                        Some(f) => f,
                        None => continue,
                    }
                }
            }
        };
        if !full {
            return Ok(Some(false));
        }
        any = Some(true);
    }
    Ok(any)
}

type UserRow = (i64, String, Option<String>, bool, bool);

fn user_row(conn: &Connection, key: &str) -> Result<Option<UserRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT u.id, u.name, u.forward_to, u.keep_copy, u.quota_bytes IS NOT NULL AND u.used_bytes >= u.quota_bytes
           FROM addresses a JOIN users u ON u.id = a.user_id
          WHERE a.address = ?1 AND u.removed = 0",
    )?;
    Ok(stmt.query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))).optional()?)
}

/// Lowercase, without a trailing dot.
pub fn normalise_domain(d: &str) -> String {
    d.trim_end_matches('.').to_ascii_lowercase()
}

/// A directory error carried through the store's thread boundary, message kept.
pub fn into_store(e: crate::DirectoryError) -> store::StoreError {
    match e {
        crate::DirectoryError::Store(s) => s,
        other => store::StoreError::Invalid(other.to_string()),
    }
}
