//! User and domain management for the CLI (`postroom user ...`, `postroom domain ...`).
//! Blocking: these run in the CLI process, which has no async runtime.

use mail_proto::Address;
use rusqlite::{Connection, OptionalExtension, params};
use store::{Durability, Store};

use crate::resolve::{LocalDomains, into_store, normalise_domain};
use crate::{DirectoryError, Result};

/// What `user list` and `user show` print.
#[derive(Clone, Debug)]
pub struct UserInfo {
    pub id: i64,
    pub name: String,
    pub addresses: Vec<String>,
    pub enabled: bool,
    pub removed: bool,
    pub has_password: bool,
    pub messages: i64,
    pub bytes: i64,
    pub quota_bytes: Option<i64>,
    pub forward_to: Option<String>,
}

/// Directory administration over a store.
pub struct Admin<'a> {
    pub store: &'a Store,
    pub domains: &'a LocalDomains,
}

impl Admin<'_> {
    fn write<T: Send + 'static>(&self, f: impl FnOnce(&Connection, &LocalDomains) -> Result<T> + Send + 'static) -> Result<T> {
        let domains = self.domains.clone();
        Ok(self.store.write_blocking(Durability::Full, move |c| f(c, &domains).map_err(into_store))?)
    }

    fn read<T: Send + 'static>(&self, f: impl FnOnce(&Connection) -> Result<T> + Send + 'static) -> Result<T> {
        Ok(self.store.read_blocking(move |c| f(c).map_err(into_store))?)
    }

    /// Enrol a user with addresses in local domains; the first address is the preferred one.
    pub fn add_user(&self, name: &str, addresses: &[String], password_hash: Option<String>) -> Result<()> {
        check_user_name(name)?;
        let name = name.to_string();
        let addresses = addresses.to_vec();
        self.write(move |c, domains| {
            if user_id(c, &name)?.is_some() {
                return Err(DirectoryError::UserExists(name));
            }
            c.execute("INSERT INTO users (name, password_hash, created_at) VALUES (?1, ?2, ?3)", params![name, password_hash, store::now()])?;
            let id = c.last_insert_rowid();
            for (i, a) in addresses.iter().enumerate() {
                add_address(c, domains, id, a, i == 0)?;
            }
            Ok(())
        })
    }

    pub fn set_password(&self, name: &str, password_hash: String) -> Result<()> {
        let name = name.to_string();
        self.write(move |c, _| {
            let n = c.execute("UPDATE users SET password_hash = ?2 WHERE name = ?1", params![name, password_hash])?;
            if n == 0 { Err(DirectoryError::NoSuchUser(name)) } else { Ok(()) }
        })
    }

    /// Disabled users cannot log in; their mail is still delivered (D2). A removed user whose
    /// mailbox still holds mail can be disabled too (then not even POP3 lets them in).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let name = name.to_string();
        self.write(move |c, _| {
            let n = c.execute("UPDATE users SET enabled = ?2 WHERE name = ?1", params![name, enabled])?;
            if n == 0 { Err(DirectoryError::NoSuchUser(name)) } else { Ok(()) }
        })
    }

    /// Remove a user: their addresses stop receiving at once (550 5.1.1 at RCPT); the account
    /// lives on, for POP3 only, until the mailbox is empty (D2). Returns true when it is gone now.
    pub fn remove_user(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.write(move |c, _| {
            let id = user_id(c, &name)?.ok_or_else(|| DirectoryError::NoSuchUser(name.clone()))?;
            c.execute("DELETE FROM addresses WHERE user_id = ?1", [id])?;
            let held: i64 = c.query_row("SELECT count(*) FROM mailbox WHERE user_id = ?1", [id], |r| r.get(0))?;
            if held == 0 {
                c.execute("DELETE FROM users WHERE id = ?1", [id])?;
            } else {
                c.execute("UPDATE users SET removed = 1 WHERE id = ?1", [id])?;
            }
            Ok(held == 0)
        })
    }

    pub fn list_users(&self) -> Result<Vec<UserInfo>> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT name FROM users ORDER BY name")?;
            let names = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
            names.iter().map(|n| user_info(c, n)).collect()
        })
    }

    pub fn show_user(&self, name: &str) -> Result<UserInfo> {
        let name = name.to_string();
        self.read(move |c| user_info(c, &name))
    }

    pub fn add_domain(&self, domain: &str) -> Result<bool> {
        let d = normalise_domain(domain);
        check_domain(&d)?;
        self.write(move |c, domains| {
            if domains.configured().contains(&d) {
                return Ok(false);
            }
            Ok(c.execute("INSERT OR IGNORE INTO domains (name) VALUES (?1)", [&d])? > 0)
        })
    }

    pub fn remove_domain(&self, domain: &str) -> Result<()> {
        let d = normalise_domain(domain);
        self.write(move |c, domains| {
            if domains.configured().contains(&d) {
                return Err(DirectoryError::ConfiguredDomain(d));
            }
            let mut stmt = c.prepare("SELECT address FROM addresses WHERE address LIKE '%@' || ?1 ORDER BY address LIMIT 5")?;
            let used = stmt.query_map([&d], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
            if !used.is_empty() {
                return Err(DirectoryError::DomainInUse(d, used.join(", ")));
            }
            if c.execute("DELETE FROM domains WHERE name = ?1", [&d])? == 0 {
                return Err(DirectoryError::NoSuchDomain(d));
            }
            Ok(())
        })
    }

    /// Add targets to an alias in a local domain (F7); an alias may not shadow a user's address.
    pub fn add_alias(&self, alias: &str, targets: &[String]) -> Result<()> {
        let alias = alias.to_string();
        let targets = targets.to_vec();
        self.write(move |c, domains| {
            let a = Address::parse(&alias).map_err(|_| DirectoryError::BadAddress(alias.clone()))?;
            if !domains.contains(c, &a.domain)? {
                return Err(DirectoryError::NotLocalDomain(a.domain_lower()));
            }
            let owner: Option<String> = c
                .query_row("SELECT u.name FROM addresses x JOIN users u ON u.id = x.user_id WHERE x.address = ?1", [a.key()], |r| r.get(0))
                .optional()?;
            if let Some(owner) = owner {
                return Err(DirectoryError::AddressTaken(a.key(), owner));
            }
            for t in &targets {
                let target = Address::parse(t).map_err(|_| DirectoryError::BadAddress(t.clone()))?;
                c.execute(
                    "INSERT OR IGNORE INTO aliases (address, target, added_at) VALUES (?1, ?2, ?3)",
                    params![a.key(), target.to_string(), store::now()],
                )?;
            }
            Ok(())
        })
    }

    /// Remove one target of an alias, or the whole alias.
    pub fn remove_alias(&self, alias: &str, target: Option<&str>) -> Result<usize> {
        let (alias, target) = (alias.to_ascii_lowercase(), target.map(str::to_string));
        self.write(move |c, _| {
            let n = match &target {
                Some(t) => c.execute("DELETE FROM aliases WHERE address = ?1 AND lower(target) = lower(?2)", params![alias, t])?,
                None => c.execute("DELETE FROM aliases WHERE address = ?1", [&alias])?,
            };
            if n == 0 {
                return Err(DirectoryError::NoSuchAlias(alias));
            }
            Ok(n)
        })
    }

    /// Every alias with its targets.
    pub fn list_aliases(&self) -> Result<Vec<(String, Vec<String>)>> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT address, target FROM aliases ORDER BY address, target")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out: Vec<(String, Vec<String>)> = Vec::new();
            for row in rows {
                let (a, t) = row?;
                match out.last_mut() {
                    Some((last, targets)) if *last == a => targets.push(t),
                    _ => out.push((a, vec![t])),
                }
            }
            Ok(out)
        })
    }

    /// Set or clear a user's mailbox quota in bytes (D2).
    pub fn set_quota(&self, name: &str, bytes: Option<i64>) -> Result<()> {
        let name = name.to_string();
        self.write(move |c, _| {
            let n = c.execute("UPDATE users SET quota_bytes = ?2 WHERE name = ?1", params![name, bytes])?;
            if n == 0 { Err(DirectoryError::NoSuchUser(name)) } else { Ok(()) }
        })
    }

    /// Set or clear a user's forwarding address (D1); `keep_copy` also delivers locally.
    pub fn set_forward(&self, name: &str, forward: Option<(String, bool)>) -> Result<()> {
        let name = name.to_string();
        self.write(move |c, _| {
            let (to, keep) = match &forward {
                Some((to, keep)) => {
                    let a = Address::parse(to).map_err(|_| DirectoryError::BadAddress(to.clone()))?;
                    (Some(a.to_string()), *keep)
                }
                None => (None, false),
            };
            let n = c.execute("UPDATE users SET forward_to = ?2, keep_copy = ?3 WHERE name = ?1", params![name, to, keep])?;
            if n == 0 { Err(DirectoryError::NoSuchUser(name)) } else { Ok(()) }
        })
    }

    /// Every local domain and where it comes from (`config` or `added`).
    pub fn list_domains(&self) -> Result<Vec<(String, &'static str)>> {
        let configured = self.domains.configured().to_vec();
        self.read(move |c| {
            let mut out: Vec<(String, &'static str)> = configured.into_iter().map(|d| (d, "config")).collect();
            let mut stmt = c.prepare("SELECT name FROM domains ORDER BY name")?;
            for d in stmt.query_map([], |r| r.get::<_, String>(0))? {
                let d = d?;
                if !out.iter().any(|(o, _)| *o == d) {
                    out.push((d, "added"));
                }
            }
            Ok(out)
        })
    }
}

fn add_address(c: &Connection, domains: &LocalDomains, user_id: i64, address: &str, preferred: bool) -> Result<()> {
    let parsed = Address::parse(address).map_err(|_| DirectoryError::BadAddress(address.to_string()))?;
    if parsed.domain.starts_with('[') {
        return Err(DirectoryError::BadAddress(address.to_string()));
    }
    if !domains.contains(c, &parsed.domain)? {
        return Err(DirectoryError::NotLocalDomain(parsed.domain_lower()));
    }
    let key = parsed.key();
    let owner: Option<String> =
        c.query_row("SELECT u.name FROM addresses a JOIN users u ON u.id = a.user_id WHERE a.address = ?1", [&key], |r| r.get(0)).optional()?;
    if let Some(owner) = owner {
        return Err(DirectoryError::AddressTaken(key, owner));
    }
    c.execute("INSERT INTO addresses (address, user_id, preferred) VALUES (?1, ?2, ?3)", params![key, user_id, preferred])?;
    Ok(())
}

fn user_id(c: &Connection, name: &str) -> Result<Option<i64>> {
    Ok(c.query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0)).optional()?)
}

fn user_info(c: &Connection, name: &str) -> Result<UserInfo> {
    let row = c
        .query_row("SELECT id, name, enabled, removed, password_hash IS NOT NULL, quota_bytes, forward_to FROM users WHERE name = ?1", [name], |r| {
            Ok(UserInfo {
                id: r.get(0)?,
                name: r.get(1)?,
                enabled: r.get(2)?,
                removed: r.get(3)?,
                has_password: r.get(4)?,
                quota_bytes: r.get(5)?,
                forward_to: r.get(6)?,
                addresses: Vec::new(),
                messages: 0,
                bytes: 0,
            })
        })
        .optional()?;
    let mut info = row.ok_or_else(|| DirectoryError::NoSuchUser(name.to_string()))?;
    let mut stmt = c.prepare_cached("SELECT address FROM addresses WHERE user_id = ?1 ORDER BY preferred DESC, address")?;
    info.addresses = stmt.query_map([info.id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    (info.messages, info.bytes) =
        c.query_row("SELECT count(*), coalesce(sum(size), 0) FROM mailbox WHERE user_id = ?1", [info.id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(info)
}

fn check_user_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !name.starts_with(['.', '-']);
    if ok { Ok(()) } else { Err(DirectoryError::BadUserName(name.to_string())) }
}

fn check_domain(d: &str) -> Result<()> {
    match Address::parse(&format!("x@{d}")) {
        Ok(a) if !a.domain.starts_with('[') && a.domain.contains('.') || a.domain == "localhost" => Ok(()),
        _ => Err(DirectoryError::BadDomain(d.to_string())),
    }
}
