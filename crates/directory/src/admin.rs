//! User and domain management for the CLI (`postroom user ...`, `postroom domain ...`).
//! Blocking: these run in the CLI process, which has no async runtime.

use mail_proto::Address;
use rusqlite::{Connection, OptionalExtension, params};
use store::{Durability, Store};

use crate::resolve::{LocalDomains, into_store, is_catch_all, normalise_domain};
use crate::{DirectoryError, Result};

/// What `user list` and `user show` print.
#[derive(Clone, Debug)]
pub struct UserInfo {
    pub id: i64,
    pub name: String,
    /// The full name the address book shows (`--name`, O5); None when not set.
    pub display_name: Option<String>,
    /// The preferred address first.
    pub addresses: Vec<String>,
    /// The preferred address (the SMTP name, D1).
    pub preferred: Option<String>,
    pub enabled: bool,
    pub removed: bool,
    pub has_password: bool,
    pub messages: i64,
    pub bytes: i64,
    pub quota_bytes: Option<i64>,
    pub forward_to: Option<String>,
    /// The forward also keeps a copy in the mailbox (D1).
    pub keep_copy: bool,
    /// May log in to the web console (E6, issue 19).
    pub admin: bool,
}

/// What removing an address, a user or an alias took with it (`--force`): alias targets and
/// forwarding addresses that pointed to it and would have bounced later.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unlinked {
    /// (alias, target) pairs removed.
    pub alias_targets: Vec<(String, String)>,
    /// Aliases left without targets, hence gone (their own references are removed too).
    pub aliases_gone: Vec<String>,
    /// (user, address) forwards turned off: that user's mail stays in their own mailbox.
    pub forwards_off: Vec<(String, String)>,
}

impl Unlinked {
    pub fn is_empty(&self) -> bool {
        self.alias_targets.is_empty() && self.forwards_off.is_empty()
    }
}

/// What `user address remove` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressRemoval {
    /// The address removed, as stored.
    pub address: String,
    /// The address that became preferred because the preferred one was removed.
    pub new_preferred: Option<String>,
    pub unlinked: Unlinked,
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
        self.add_named_user(name, None, addresses, password_hash)
    }

    /// [`Admin::add_user`] with the full name the address book shows (O5, issue 18).
    pub fn add_named_user(&self, name: &str, display_name: Option<&str>, addresses: &[String], password_hash: Option<String>) -> Result<()> {
        check_user_name(name)?;
        let display_name = display_name.map(check_display_name).transpose()?.flatten();
        let name = name.to_string();
        let addresses = addresses.to_vec();
        self.write(move |c, domains| {
            if user_id(c, &name)?.is_some() {
                return Err(DirectoryError::UserExists(name));
            }
            c.execute(
                "INSERT INTO users (name, password_hash, display_name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, password_hash, display_name, store::now()],
            )?;
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

    /// May the user log in to the web console (E6, issue 19)? A removed user cannot be made one.
    pub fn set_admin(&self, name: &str, admin: bool) -> Result<()> {
        let name = name.to_string();
        self.write(move |c, _| {
            let id = live_user_id(c, &name)?;
            c.execute("UPDATE users SET admin = ?2 WHERE id = ?1", params![id, admin])?;
            Ok(())
        })
    }

    /// The full name the address book shows (O5); an empty one removes it. Returns it as stored.
    pub fn set_display_name(&self, name: &str, display_name: &str) -> Result<Option<String>> {
        let (name, display_name) = (name.to_string(), check_display_name(display_name)?);
        self.write(move |c, _| {
            let n = c.execute("UPDATE users SET display_name = ?2 WHERE name = ?1", params![name, display_name])?;
            if n == 0 { Err(DirectoryError::NoSuchUser(name)) } else { Ok(display_name) }
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
    /// Aliases or other users' forwards pointing to the user's addresses would bounce later: the
    /// removal is refused, naming them, unless `force`, which removes those references too.
    pub fn remove_user(&self, name: &str, force: bool) -> Result<(bool, Unlinked)> {
        let name = name.to_string();
        self.write(move |c, _| {
            let id = user_id(c, &name)?.ok_or_else(|| DirectoryError::NoSuchUser(name.clone()))?;
            let addresses = user_addresses(c, id)?;
            let unlinked = unlink(c, addresses, Some(id), force, &format!("user {name}"))?;
            c.execute("DELETE FROM addresses WHERE user_id = ?1", [id])?;
            let held: i64 = c.query_row("SELECT count(*) FROM mailbox WHERE user_id = ?1", [id], |r| r.get(0))?;
            if held == 0 {
                c.execute("DELETE FROM users WHERE id = ?1", [id])?;
            } else {
                c.execute("UPDATE users SET removed = 1 WHERE id = ?1", [id])?;
            }
            Ok((held == 0, unlinked))
        })
    }

    /// Give a user another address (D1): in a local domain, no other user's, not an alias. A
    /// user without a preferred address gets this one as preferred.
    pub fn add_user_address(&self, name: &str, address: &str) -> Result<String> {
        let (name, address) = (name.to_string(), address.to_string());
        self.write(move |c, domains| {
            let id = live_user_id(c, &name)?;
            let has_preferred: bool = c.query_row("SELECT EXISTS (SELECT 1 FROM addresses WHERE user_id = ?1 AND preferred)", [id], |r| r.get(0))?;
            add_address(c, domains, id, &address, !has_preferred)
        })
    }

    /// Take an address from a user (D1). The last one stays (a user keeps one: `user remove`
    /// removes the user); when the preferred one goes, the first remaining becomes preferred.
    /// References to it from aliases and forwards: refused unless `force`, as [`Admin::remove_user`].
    pub fn remove_user_address(&self, name: &str, address: &str, force: bool) -> Result<AddressRemoval> {
        let (name, address) = (name.to_string(), address.to_string());
        self.write(move |c, _| {
            let id = live_user_id(c, &name)?;
            let key = owned_address(c, id, &name, &address)?;
            let count: i64 = c.query_row("SELECT count(*) FROM addresses WHERE user_id = ?1", [id], |r| r.get(0))?;
            if count <= 1 {
                return Err(DirectoryError::LastAddress(name, key));
            }
            let unlinked = unlink(c, vec![key.clone()], Some(id), force, &format!("address {key}"))?;
            let was_preferred: bool = c.query_row("SELECT preferred FROM addresses WHERE address = ?1", [&key], |r| r.get(0))?;
            c.execute("DELETE FROM addresses WHERE address = ?1", [&key])?;
            let mut new_preferred = None;
            if was_preferred {
                let next: String = c.query_row("SELECT address FROM addresses WHERE user_id = ?1 ORDER BY address LIMIT 1", [id], |r| r.get(0))?;
                c.execute("UPDATE addresses SET preferred = 1 WHERE address = ?1", [&next])?;
                new_preferred = Some(next);
            }
            Ok(AddressRemoval { address: key, new_preferred, unlinked })
        })
    }

    /// Make one of a user's addresses the preferred one (D1: the SMTP name).
    pub fn prefer_user_address(&self, name: &str, address: &str) -> Result<String> {
        let (name, address) = (name.to_string(), address.to_string());
        self.write(move |c, _| {
            let id = live_user_id(c, &name)?;
            let key = owned_address(c, id, &name, &address)?;
            c.execute("UPDATE addresses SET preferred = (address = ?2) WHERE user_id = ?1", params![id, key])?;
            Ok(key)
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
    /// `*@domain` is the domain's catch-all: it takes what no user's address and no alias of
    /// the domain takes (see [`crate::resolve`]); the caller warns about it (F7). Returns the
    /// alias as stored.
    pub fn add_alias(&self, alias: &str, targets: &[String]) -> Result<String> {
        let alias = alias.to_string();
        let targets = targets.to_vec();
        self.write(move |c, domains| {
            let (a, key) = parse_local(&alias)?;
            if a.local.contains('*') && !is_catch_all(&key) {
                return Err(DirectoryError::BadCatchAll(alias.clone()));
            }
            if !domains.contains(c, &a.domain)? {
                return Err(DirectoryError::NotLocalDomain(a.domain_lower()));
            }
            let owner: Option<String> = c
                .query_row("SELECT u.name FROM addresses x JOIN users u ON u.id = x.user_id WHERE x.address = ?1", [&key], |r| r.get(0))
                .optional()?;
            if let Some(owner) = owner {
                return Err(DirectoryError::AddressTaken(key, owner));
            }
            for t in &targets {
                let target = Address::parse(t).map_err(|_| DirectoryError::BadAddress(t.clone()))?;
                if is_catch_all(&target.key()) {
                    return Err(DirectoryError::CatchAllAddress(t.clone()));
                }
                c.execute(
                    "INSERT OR IGNORE INTO aliases (address, target, added_at) VALUES (?1, ?2, ?3)",
                    params![key, target.to_string(), store::now()],
                )?;
            }
            Ok(key)
        })
    }

    /// Remove one target of an alias, or the whole alias. An alias that goes (removed, or its
    /// last target removed) while other aliases or users' forwards point to it: refused, naming
    /// them, unless `force`, which removes those references too. Returns the targets removed.
    pub fn remove_alias(&self, alias: &str, target: Option<&str>, force: bool) -> Result<(usize, Unlinked)> {
        let (alias, target) = (alias_key(alias), target.map(str::to_string));
        self.write(move |c, _| {
            let n = match &target {
                Some(t) => c.execute("DELETE FROM aliases WHERE address = ?1 AND lower(target) = lower(?2)", params![alias, t])?,
                None => c.execute("DELETE FROM aliases WHERE address = ?1", [&alias])?,
            };
            if n == 0 {
                return Err(DirectoryError::NoSuchAlias(alias));
            }
            let left: i64 = c.query_row("SELECT count(*) FROM aliases WHERE address = ?1", [&alias], |r| r.get(0))?;
            let unlinked = if left == 0 { unlink(c, vec![alias.clone()], None, force, &format!("alias {alias}"))? } else { Unlinked::default() };
            Ok((n, unlinked))
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

/// A user's address: in a local domain, no user's yet, not an alias, not the catch-all form.
/// Returns the key stored.
fn add_address(c: &Connection, domains: &LocalDomains, user_id: i64, address: &str, preferred: bool) -> Result<String> {
    let (parsed, key) = parse_local(address)?;
    if is_catch_all(&key) {
        return Err(DirectoryError::CatchAllAddress(address.to_string()));
    }
    if !domains.contains(c, &parsed.domain)? {
        return Err(DirectoryError::NotLocalDomain(parsed.domain_lower()));
    }
    let owner: Option<String> =
        c.query_row("SELECT u.name FROM addresses a JOIN users u ON u.id = a.user_id WHERE a.address = ?1", [&key], |r| r.get(0)).optional()?;
    if let Some(owner) = owner {
        return Err(DirectoryError::AddressTaken(key, owner));
    }
    if c.prepare_cached("SELECT 1 FROM aliases WHERE address = ?1")?.exists([&key])? {
        return Err(DirectoryError::AddressIsAlias(key));
    }
    c.execute("INSERT INTO addresses (address, user_id, preferred) VALUES (?1, ?2, ?3)", params![key, user_id, preferred])?;
    Ok(key)
}

/// An address of ours as the directory keys it: lowercased, the domain without a trailing dot;
/// an address literal is no user's or alias's address.
fn parse_local(address: &str) -> Result<(Address, String)> {
    let parsed = Address::parse(address).map_err(|_| DirectoryError::BadAddress(address.to_string()))?;
    if parsed.domain.is_empty() || parsed.domain.starts_with('[') {
        return Err(DirectoryError::BadAddress(address.to_string()));
    }
    let key = format!("{}@{}", parsed.local.to_ascii_lowercase(), normalise_domain(&parsed.domain));
    Ok((parsed, key))
}

/// The key of an alias the administrator names (its row, even when it no longer parses).
fn alias_key(alias: &str) -> String {
    parse_local(alias).map(|(_, k)| k).unwrap_or_else(|_| alias.trim().to_ascii_lowercase())
}

/// An alias target or forwarding address as a key to compare with addresses and aliases.
fn target_key(target: &str) -> String {
    alias_key(target)
}

/// The id of a user that is not removed.
fn live_user_id(c: &Connection, name: &str) -> Result<i64> {
    let row: Option<(i64, bool)> = c.query_row("SELECT id, removed FROM users WHERE name = ?1", [name], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
    match row {
        None => Err(DirectoryError::NoSuchUser(name.to_string())),
        Some((_, true)) => Err(DirectoryError::UserRemoved(name.to_string())),
        Some((id, false)) => Ok(id),
    }
}

/// The key of `address` when it is one of the user's addresses.
fn owned_address(c: &Connection, user_id: i64, name: &str, address: &str) -> Result<String> {
    let key = alias_key(address);
    let owner: Option<i64> = c.query_row("SELECT user_id FROM addresses WHERE address = ?1", [&key], |r| r.get(0)).optional()?;
    if owner == Some(user_id) { Ok(key) } else { Err(DirectoryError::NotUsersAddress(name.to_string(), key)) }
}

fn user_addresses(c: &Connection, user_id: i64) -> Result<Vec<String>> {
    let mut stmt = c.prepare_cached("SELECT address FROM addresses WHERE user_id = ?1 ORDER BY address")?;
    Ok(stmt.query_map([user_id], |r| r.get(0))?.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Who points to addresses that are going away: alias rows (alias, target) and forwards
/// (user id, user, address), except aliases that go themselves and the user `except_user`.
#[derive(Default)]
struct References {
    alias_rows: Vec<(String, String)>,
    forwards: Vec<(i64, String, String)>,
}

fn references(c: &Connection, gone: &[String], except_user: Option<i64>) -> Result<References> {
    let mut refs = References::default();
    let mut stmt = c.prepare("SELECT address, target FROM aliases ORDER BY address, target")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (alias, target) = row?;
        if gone.contains(&target_key(&target)) && !gone.contains(&alias.to_ascii_lowercase()) {
            refs.alias_rows.push((alias, target));
        }
    }
    let mut stmt =
        c.prepare("SELECT id, name, forward_to FROM users WHERE forward_to IS NOT NULL AND forward_to != '' AND removed = 0 ORDER BY name")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))? {
        let (id, name, to) = row?;
        if Some(id) != except_user && gone.contains(&target_key(&to)) {
            refs.forwards.push((id, name, to));
        }
    }
    Ok(refs)
}

/// Before `gone` (address keys) disappear: without `force`, refuse when aliases or forwards
/// point to them (they would bounce later), naming them; with `force`, remove those alias
/// targets (an alias left empty goes too, and so on down the chain) and turn those forwards off.
fn unlink(c: &Connection, mut gone: Vec<String>, except_user: Option<i64>, force: bool, what: &str) -> Result<Unlinked> {
    let mut out = Unlinked::default();
    loop {
        let refs = references(c, &gone, except_user)?;
        if refs.alias_rows.is_empty() && refs.forwards.is_empty() {
            return Ok(out);
        }
        if !force {
            let mut by: Vec<String> = Vec::new();
            for (alias, _) in &refs.alias_rows {
                let a = format!("alias {alias}");
                if !by.contains(&a) {
                    by.push(a);
                }
            }
            by.extend(refs.forwards.iter().map(|(_, name, to)| format!("the forwarding address of user {name} ({to})")));
            return Err(DirectoryError::Referenced(what.to_string(), by.join(", ")));
        }
        for (alias, target) in refs.alias_rows {
            c.execute("DELETE FROM aliases WHERE address = ?1 AND target = ?2", params![alias, target])?;
            let left: i64 = c.query_row("SELECT count(*) FROM aliases WHERE address = ?1", [&alias], |r| r.get(0))?;
            if left == 0 {
                out.aliases_gone.push(alias.clone());
                gone.push(alias.to_ascii_lowercase());
            }
            out.alias_targets.push((alias, target));
        }
        for (id, name, to) in refs.forwards {
            c.execute("UPDATE users SET forward_to = NULL, keep_copy = 0 WHERE id = ?1", [id])?;
            out.forwards_off.push((name, to));
        }
    }
}

fn user_id(c: &Connection, name: &str) -> Result<Option<i64>> {
    Ok(c.query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0)).optional()?)
}

fn user_info(c: &Connection, name: &str) -> Result<UserInfo> {
    let row = c
        .query_row(
            "SELECT id, name, enabled, removed, password_hash IS NOT NULL, quota_bytes, forward_to, keep_copy, display_name, admin FROM users WHERE name = ?1",
            [name],
            |r| {
                Ok(UserInfo {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    enabled: r.get(2)?,
                    removed: r.get(3)?,
                    has_password: r.get(4)?,
                    quota_bytes: r.get(5)?,
                    forward_to: r.get(6)?,
                    keep_copy: r.get(7)?,
                    display_name: r.get(8)?,
                    admin: r.get(9)?,
                    addresses: Vec::new(),
                    preferred: None,
                    messages: 0,
                    bytes: 0,
                })
            },
        )
        .optional()?;
    let mut info = row.ok_or_else(|| DirectoryError::NoSuchUser(name.to_string()))?;
    let mut stmt = c.prepare_cached("SELECT address, preferred FROM addresses WHERE user_id = ?1 ORDER BY preferred DESC, address")?;
    let rows = stmt.query_map([info.id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
    info.preferred = rows.iter().find(|(_, p)| *p).map(|(a, _)| a.clone());
    info.addresses = rows.into_iter().map(|(a, _)| a).collect();
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

/// Longest full name kept, in characters.
const MAX_DISPLAY_NAME: usize = 200;

/// A full name is shown by mail programs and travels in LDAP entries: printable text on one
/// line. Surrounding spaces go; an empty name is no name.
fn check_display_name(display_name: &str) -> Result<Option<String>> {
    let trimmed = display_name.trim();
    if trimmed.chars().count() > MAX_DISPLAY_NAME || trimmed.chars().any(char::is_control) {
        return Err(DirectoryError::BadDisplayName(display_name.to_string()));
    }
    Ok((!trimmed.is_empty()).then(|| trimmed.to_string()))
}

fn check_domain(d: &str) -> Result<()> {
    match Address::parse(&format!("x@{d}")) {
        Ok(a) if !a.domain.starts_with('[') && a.domain.contains('.') || a.domain == "localhost" => Ok(()),
        _ => Err(DirectoryError::BadDomain(d.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Resolution;

    struct World {
        _dir: tempfile::TempDir,
        store: Store,
        domains: LocalDomains,
    }

    impl World {
        fn new() -> World {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), store::StoreOptions::default()).unwrap();
            let domains = LocalDomains::new(&["example.test".into(), "second.test".into()], "admin@example.test");
            World { _dir: dir, store, domains }
        }

        fn admin(&self) -> Admin<'_> {
            Admin { store: &self.store, domains: &self.domains }
        }

        fn resolve(&self, address: &str) -> Resolution {
            let (domains, a) = (self.domains.clone(), Address::parse(address).unwrap());
            self.store.read_blocking(move |c| domains.resolve(c, &a).map_err(into_store)).unwrap()
        }

        fn user(&self, name: &str, addresses: &[&str]) {
            self.admin().add_user(name, &addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(), None).unwrap();
        }
    }

    /// The message of an error (typed errors become text crossing the store's thread).
    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("an error").to_string()
    }

    fn targets(r: Resolution) -> Vec<String> {
        match r {
            Resolution::Alias { targets, .. } => targets,
            other => panic!("not an alias: {other:?}"),
        }
    }

    #[test]
    fn addresses_are_added_preferred_and_removed() {
        let w = World::new();
        w.user("sam", &["sam@example.test"]);
        w.user("bob", &["bob@example.test"]);
        w.admin().add_alias("staff@example.test", &["sam@example.test".into()]).unwrap();
        let admin = w.admin();
        assert_eq!(admin.add_user_address("sam", "Sam.Jones@Example.Test.").unwrap(), "sam.jones@example.test");
        assert!(matches!(w.resolve("SAM.JONES@example.test"), Resolution::Local { ref user, .. } if user == "sam"));
        assert!(err(admin.add_user_address("sam", "bob@example.test")).contains("already belongs to user bob"));
        assert!(err(admin.add_user_address("sam", "staff@example.test")).contains("is an alias"));
        assert!(err(admin.add_user_address("sam", "sam@remote.example")).contains("not a local domain"));
        assert!(err(admin.add_user_address("sam", "*@example.test")).contains("catch-all"));
        assert!(err(admin.add_user_address("nobody", "n@example.test")).contains("no such user"));
        let u = admin.show_user("sam").unwrap();
        assert_eq!(u.preferred.as_deref(), Some("sam@example.test"));
        assert_eq!(u.addresses, ["sam@example.test", "sam.jones@example.test"]);

        assert_eq!(admin.prefer_user_address("sam", "sam.jones@example.test").unwrap(), "sam.jones@example.test");
        assert_eq!(admin.show_user("sam").unwrap().preferred.as_deref(), Some("sam.jones@example.test"));
        assert!(err(admin.prefer_user_address("sam", "bob@example.test")).contains("has no address bob@example.test"));

        // The preferred one goes: the other becomes preferred; the last one stays.
        let r = admin.remove_user_address("sam", "sam.jones@example.test", false).unwrap();
        assert_eq!(r.new_preferred.as_deref(), Some("sam@example.test"));
        assert!(matches!(w.resolve("sam.jones@example.test"), Resolution::Unknown));
        assert!(err(admin.remove_user_address("sam", "sam@example.test", true)).contains("last address"));
        assert_eq!(admin.show_user("sam").unwrap().addresses, ["sam@example.test"]);
    }

    #[test]
    fn catch_all_comes_after_users_and_aliases() {
        let w = World::new();
        w.user("bob", &["bob@example.test"]);
        w.user("sam", &["sam@second.test"]);
        w.admin().add_alias("sales@second.test", &["sam@second.test".into()]).unwrap();
        assert!(matches!(w.resolve("anyone@second.test"), Resolution::Unknown));
        assert_eq!(w.admin().add_alias("*@Second.Test", &["bob@example.test".into()]).unwrap(), "*@second.test");
        assert!(matches!(w.resolve("sam@second.test"), Resolution::Local { ref user, .. } if user == "sam"));
        assert_eq!(targets(w.resolve("sales@second.test")), ["sam@second.test"]);
        assert_eq!(targets(w.resolve("Anyone@SECOND.test")), ["bob@example.test"]);
        assert_eq!(targets(w.resolve("\"odd one\"@second.test")), ["bob@example.test"]);
        // The catch-all's own form is no mailbox, and other domains are untouched.
        assert!(matches!(w.resolve("*@second.test"), Resolution::Unknown));
        assert!(matches!(w.resolve("anyone@example.test"), Resolution::Unknown));
        assert!(matches!(w.resolve("anyone@remote.example"), Resolution::Remote));
        // Only the whole local part; only in a local domain; never as a target.
        assert!(err(w.admin().add_alias("sales-*@second.test", &["bob@example.test".into()])).contains("only `*@domain`"));
        assert!(err(w.admin().add_alias("*@remote.example", &["bob@example.test".into()])).contains("not a local domain"));
        assert!(err(w.admin().add_alias("all@example.test", &["*@second.test".into()])).contains("not a mailbox"));
    }

    #[test]
    fn catch_all_to_full_mailboxes_is_full() {
        let w = World::new();
        w.user("bob", &["bob@example.test"]);
        w.admin().add_alias("*@second.test", &["bob@example.test".into()]).unwrap();
        w.admin().add_alias("via@example.test", &["nobody@second.test".into()]).unwrap();
        w.admin().set_quota("bob", Some(10)).unwrap();
        w.store.write_blocking(store::Durability::Full, |c| Ok(c.execute("UPDATE users SET used_bytes = 10", [])?)).unwrap();
        assert!(matches!(w.resolve("x@second.test"), Resolution::Alias { full: true, .. }));
        // An alias whose target falls to the catch-all leads to the same full mailbox.
        assert!(matches!(w.resolve("via@example.test"), Resolution::Alias { full: true, .. }));
        w.admin().set_quota("bob", None).unwrap();
        assert!(matches!(w.resolve("x@second.test"), Resolution::Alias { full: false, .. }));
    }

    #[test]
    fn references_refuse_or_go_with_force() {
        let w = World::new();
        let admin = w.admin();
        w.user("sam", &["sam@example.test", "s@example.test"]);
        w.user("bob", &["bob@example.test"]);
        admin.add_alias("staff@example.test", &["Sam@Example.Test".into(), "bob@example.test".into()]).unwrap();
        admin.add_alias("inner@example.test", &["s@example.test".into()]).unwrap();
        admin.add_alias("outer@example.test", &["inner@example.test".into()]).unwrap();
        admin.set_forward("bob", Some(("sam@example.test".into(), true))).unwrap();

        let refused = err(admin.remove_user("sam", false));
        assert!(refused.starts_with("user sam is still used by "), "{refused}");
        for by in ["alias staff@example.test", "alias inner@example.test", "the forwarding address of user bob", "--force"] {
            assert!(refused.contains(by), "{refused}");
        }
        assert!(!refused.contains("outer"), "{refused}");
        assert!(matches!(w.resolve("sam@example.test"), Resolution::Local { .. }));
        assert!(err(admin.remove_alias("inner@example.test", None, false)).contains("still used by alias outer@example.test"));
        // Removing the last target is removing the alias.
        assert!(err(admin.remove_alias("inner@example.test", Some("s@example.test"), false)).contains("alias outer@example.test"));
        assert_eq!(targets(w.resolve("inner@example.test")), ["s@example.test"]);

        let (gone, unlinked) = admin.remove_user("sam", true).unwrap();
        assert!(gone);
        assert_eq!(
            unlinked.alias_targets,
            [
                ("inner@example.test".to_string(), "s@example.test".to_string()),
                ("staff@example.test".to_string(), "Sam@Example.Test".to_string()),
                ("outer@example.test".to_string(), "inner@example.test".to_string()),
            ]
        );
        assert_eq!(unlinked.aliases_gone, ["inner@example.test", "outer@example.test"]);
        assert_eq!(unlinked.forwards_off, [("bob".to_string(), "sam@example.test".to_string())]);
        assert_eq!(admin.list_aliases().unwrap(), [("staff@example.test".to_string(), vec!["bob@example.test".to_string()])]);
        let bob = admin.show_user("bob").unwrap();
        assert!(bob.forward_to.is_none() && !bob.keep_copy);
    }

    #[test]
    fn an_alias_pointing_to_itself_does_not_hold_its_own_removal() {
        let w = World::new();
        w.admin().add_alias("selfish@example.test", &["selfish@example.test".into(), "far@remote.example".into()]).unwrap();
        let (n, unlinked) = w.admin().remove_alias("selfish@example.test", None, false).unwrap();
        assert_eq!(n, 2);
        assert!(unlinked.is_empty());
    }
}
