//! The administrator's commands (INTERFACE.md). They open the same SQLite file as a running
//! server; SQLite's WAL locking lets both write.

use std::io::BufRead;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use directory::LocalDomains;
use directory::admin::{Admin, Unlinked, UserInfo};
use store::{Store, StoreOptions};

use postroom::config::{Config, ConfigError};

use crate::out::{errln, out, outln};

#[derive(Subcommand)]
pub enum UserCommand {
    /// Enrol a POP user with one or more addresses in local domains.
    Add {
        name: String,
        /// An SMTP address (repeatable); the first is the preferred one.
        #[arg(long = "address", required = true, value_name = "ADDR")]
        addresses: Vec<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// The full name the address book shows ("Sam Jones"; O5).
        #[arg(long = "name", value_name = "FULL NAME")]
        display_name: Option<String>,
        /// May log in to the web console (`[admin] listen`, E6).
        #[arg(long)]
        admin: bool,
    },
    /// Let the user log in to the web console, or no longer (E6): on or off.
    Admin {
        name: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Change what the address book shows of a user: --name "Full Name" ("" removes it).
    Set {
        name: String,
        #[arg(long = "name", value_name = "FULL NAME", required = true)]
        display_name: Option<String>,
    },
    /// Change a password (read from the first line of standard input).
    Passwd {
        name: String,
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List users.
    List,
    /// Show one user.
    Show { name: String },
    /// Refuse the user's logins; mail is still delivered.
    Disable { name: String },
    /// Allow logins again.
    Enable { name: String },
    /// Stop receiving mail for the user now; the account goes once the mailbox is empty.
    /// Refused while aliases or other users' forwards point to the user's addresses (they
    /// would bounce later); --force removes those references too.
    Remove {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Add, remove or prefer one of the user's addresses (D1).
    #[command(subcommand)]
    Address(AddressCommand),
    /// Limit the user's mailbox to BYTES (D2): beyond it RCPT gets 452 4.2.2; "none" lifts it.
    Quota { name: String, bytes: String },
    /// Forward the user's mail to ADDRESS (D1); --keep also keeps a copy in the mailbox;
    /// --off stops forwarding.
    Forward {
        name: String,
        #[arg(required_unless_present = "off")]
        address: Option<String>,
        #[arg(long)]
        keep: bool,
        #[arg(long, conflicts_with_all = ["address", "keep"])]
        off: bool,
    },
}

#[derive(Subcommand)]
pub enum AddressCommand {
    /// Give the user another address: in a local domain, no other user's, not an alias. A
    /// user without a preferred address gets this one as preferred.
    Add { name: String, address: String },
    /// Take an address from the user. The last one stays (remove the user instead); when the
    /// preferred one goes, another becomes preferred. Refused while aliases or forwards point to
    /// it; --force removes those references too.
    Remove {
        name: String,
        address: String,
        #[arg(long)]
        force: bool,
    },
    /// Make one of the user's addresses the preferred one (the SMTP name).
    Prefer { name: String, address: String },
}

#[derive(Subcommand)]
pub enum AliasCommand {
    /// Make ALIAS (an address in a local domain) stand for the TARGET addresses (F7).
    /// '*@DOMAIN' is the domain's catch-all: it takes mail to every address of DOMAIN that no
    /// user and no alias has (warned against: it accepts spam to any guessed address).
    Add {
        alias: String,
        #[arg(required = true, num_args = 1..)]
        targets: Vec<String>,
    },
    /// Remove one target of an alias, or the whole alias. When the alias goes while other
    /// aliases or users' forwards point to it, refused; --force removes those references too.
    Remove {
        alias: String,
        target: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// List aliases and their targets.
    List,
}

#[derive(Subcommand)]
pub enum DomainCommand {
    /// Make a domain local.
    Add { domain: String },
    /// Stop treating a domain as local.
    Remove { domain: String },
    /// List local domains.
    List,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and print the effective values.
    Check,
}

#[derive(Args)]
pub struct JournalArgs {
    /// Only entries with this code (e.g. 94, P2, B8, DL) or code prefix (e.g. 9).
    #[arg(long)]
    code: Option<String>,
    /// Only entries of this queue id.
    #[arg(long = "message", value_name = "ID")]
    message: Option<String>,
    /// Only entries newer than this: seconds since the epoch, or an age like 30s, 10m, 2h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// Keep printing new entries as they arrive.
    #[arg(long)]
    follow: bool,
}

pub fn open(config: &Config) -> anyhow::Result<(Store, LocalDomains)> {
    let store = Store::open(&config.data_dir, StoreOptions { readers: 1, journal: config.journal.enabled, ..Default::default() })
        .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;
    Ok((store, LocalDomains::new(&config.domains, &config.postmaster)))
}

/// Commands that need what a server or an earlier command stored (everything but `serve` and
/// the commands that add) refuse a data directory without a database, rather than make an empty
/// one there and answer "queue is empty" (no --config, a mistyped --data-dir). `from` says where
/// the directory came from, e.g. "--data-dir".
pub fn require_database(config: &Config, from: &str) -> anyhow::Result<()> {
    let db = config.data_dir.join(store::DB_FILE);
    match std::fs::symlink_metadata(&db) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no database in {dir} (from {from}; {db} does not exist): is it mistyped, or not the server's? Give the \
             server's configuration with --config FILE (or POSTROOM_CONFIG), or its data directory with --data-dir DIR. \
             `postroom serve`, or a command that adds (user add, domain add, list add), creates the database",
            dir = config.data_dir.display(),
            db = db.display(),
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot check {}", db.display()))),
    }
}

/// Passwords never appear on a command line (INTERFACE.md): one line from standard input.
pub fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() {
        bail!("empty password on standard input");
    }
    Ok(pw)
}

pub fn user(cmd: UserCommand, config: &Config) -> anyhow::Result<()> {
    let (store, domains) = open(config)?;
    let admin = Admin { store: &store, domains: &domains };
    match cmd {
        UserCommand::Add { name, addresses, password_stdin, display_name, admin: administrator } => {
            let hash = if password_stdin { Some(directory::passwords::hash_password(&read_password()?)?) } else { None };
            let has_password = hash.is_some();
            admin.add_named_user(&name, display_name.as_deref(), &addresses, hash)?;
            if administrator {
                admin.set_admin(&name, true)?;
            }
            outln!("user {name} added with {}{}", addresses.join(", "), if administrator { " (administrator)" } else { "" });
            if !has_password {
                outln!("no password set: {name} cannot log in until `postroom user passwd {name} --password-stdin`");
            }
        }
        UserCommand::Set { name, display_name } => match admin.set_display_name(&name, display_name.as_deref().unwrap_or_default())? {
            Some(full) => outln!("user {name}: name {full:?}"),
            None => outln!("user {name}: no name (the address book shows {name})"),
        },
        UserCommand::Passwd { name, .. } => {
            let hash = directory::passwords::hash_password(&read_password()?)?;
            admin.set_password(&name, hash)?;
            outln!("password of {name} changed");
        }
        UserCommand::List => {
            outln!("{:<20} {:<9} {:>8} {:>12}  addresses", "user", "state", "messages", "bytes");
            for u in admin.list_users()? {
                // The full name after the addresses: the columns before it stay as scripts read them.
                let full = u.display_name.as_ref().map(|n| format!("  ({n})")).unwrap_or_default();
                let full = if u.admin { format!("{full}  [admin]") } else { full };
                outln!("{:<20} {:<9} {:>8} {:>12}  {}{full}", u.name, state(&u), u.messages, u.bytes, u.addresses.join(", "));
            }
        }
        UserCommand::Show { name } => {
            let u = admin.show_user(&name)?;
            outln!("user:      {}", u.name);
            if let Some(full) = &u.display_name {
                outln!("name:      {full}");
            }
            outln!("state:     {}", state(&u));
            outln!("admin:     {}", if u.admin { "yes (web console)" } else { "no" });
            outln!("password:  {}", if u.has_password { "set" } else { "not set (no login)" });
            let shown: Vec<String> =
                u.addresses.iter().map(|a| if u.preferred.as_ref() == Some(a) { format!("{a} (preferred)") } else { a.clone() }).collect();
            outln!("addresses: {}", shown.join(", "));
            outln!("mailbox:   {} messages, {} bytes", u.messages, u.bytes);
            if let Some(q) = u.quota_bytes {
                outln!("quota:     {q} bytes");
            }
            if let Some(f) = &u.forward_to {
                outln!("forward:   {f}{}", if u.keep_copy { " (keeps a copy)" } else { "" });
            }
        }
        UserCommand::Admin { name, state } => {
            let on = state == "on";
            admin.set_admin(&name, on)?;
            outln!("user {name}: {}", if on { "administrator: may log in to the web console" } else { "no longer an administrator" });
        }
        UserCommand::Disable { name } => {
            admin.set_enabled(&name, false)?;
            outln!("user {name} disabled: logins refused, mail still delivered");
        }
        UserCommand::Enable { name } => {
            admin.set_enabled(&name, true)?;
            outln!("user {name} enabled");
        }
        UserCommand::Quota { name, bytes } => {
            let quota = match bytes.as_str() {
                "none" => None,
                b => Some(b.parse::<i64>().ok().filter(|n| *n > 0).with_context(|| format!("quota {b:?}: expected a number of bytes or \"none\""))?),
            };
            admin.set_quota(&name, quota)?;
            match quota {
                Some(q) => outln!("user {name}: quota {q} bytes"),
                None => outln!("user {name}: no quota"),
            }
        }
        UserCommand::Forward { name, address, keep, off } => {
            if off {
                admin.set_forward(&name, None)?;
                outln!("user {name}: forwarding off");
            } else {
                let to = address.expect("clap requires it without --off");
                admin.set_forward(&name, Some((to.clone(), keep)))?;
                outln!("user {name}: mail forwarded to {to}{}", if keep { ", a copy kept in the mailbox" } else { "" });
            }
        }
        UserCommand::Remove { name, force } => {
            let (gone, unlinked) = admin.remove_user(&name, force)?;
            if gone {
                outln!("user {name} removed");
            } else {
                outln!("user {name} removed: no more mail is accepted; POP3 login stays possible until the mailbox is empty");
            }
            print_unlinked(&unlinked);
        }
        UserCommand::Address(AddressCommand::Add { name, address }) => {
            let key = admin.add_user_address(&name, &address)?;
            outln!("user {name}: address {key} added");
        }
        UserCommand::Address(AddressCommand::Remove { name, address, force }) => {
            let removal = admin.remove_user_address(&name, &address, force)?;
            outln!("user {name}: address {} removed", removal.address);
            if let Some(p) = &removal.new_preferred {
                outln!("user {name}: {p} is the preferred address now");
            }
            print_unlinked(&removal.unlinked);
        }
        UserCommand::Address(AddressCommand::Prefer { name, address }) => {
            let key = admin.prefer_user_address(&name, &address)?;
            outln!("user {name}: {key} is the preferred address");
        }
    }
    Ok(())
}

/// What `--force` removed along with an address, a user or an alias.
fn print_unlinked(u: &Unlinked) {
    for (alias, target) in &u.alias_targets {
        outln!("alias {alias}: target {target} removed");
    }
    for alias in &u.aliases_gone {
        outln!("alias {alias} removed: it had no other target");
    }
    for (user, to) in &u.forwards_off {
        outln!("user {user}: forwarding to {to} turned off; their mail stays in their own mailbox");
    }
}

/// F7: the seeds' warning against an *ANY *ANY entry, for a catch-all.
const CATCH_ALL_WARNING: &str = "a catch-all accepts mail to every address of its domain that no user and no alias has: \
spam to guessed and made-up addresses (dictionary attacks) is accepted too and fills the target mailboxes and the disk, \
and a sender who mistypes an address no longer gets a bounce. Prefer aliases for the addresses you need (the seeds \
advise against an *ANY *ANY entry for the same reason)";

fn state(u: &UserInfo) -> &'static str {
    match (u.removed, u.enabled) {
        (true, _) => "removed",
        (false, true) => "enabled",
        (false, false) => "disabled",
    }
}

pub fn alias(cmd: AliasCommand, config: &Config) -> anyhow::Result<()> {
    let (store, domains) = open(config)?;
    let admin = Admin { store: &store, domains: &domains };
    match cmd {
        AliasCommand::Add { alias, targets } => {
            let key = admin.add_alias(&alias, &targets)?;
            let catch_all = directory::resolve::is_catch_all(&key);
            outln!("{} {key} -> {}", if catch_all { "catch-all" } else { "alias" }, targets.join(", "));
            if catch_all {
                errln!("warning: {CATCH_ALL_WARNING}");
            }
        }
        AliasCommand::Remove { alias, target, force } => {
            let (n, unlinked) = admin.remove_alias(&alias, target.as_deref(), force)?;
            outln!("alias {alias}: {n} target(s) removed");
            print_unlinked(&unlinked);
        }
        AliasCommand::List => {
            for (alias, targets) in admin.list_aliases()? {
                let note = if directory::resolve::is_catch_all(&alias) { "\t(catch-all)" } else { "" };
                outln!("{alias}\t{}{note}", targets.join(", "));
            }
        }
    }
    Ok(())
}

pub fn domain(cmd: DomainCommand, config: &Config) -> anyhow::Result<()> {
    let (store, domains) = open(config)?;
    let admin = Admin { store: &store, domains: &domains };
    match cmd {
        DomainCommand::Add { domain } => {
            if admin.add_domain(&domain)? {
                outln!("domain {domain} added");
            } else {
                outln!("domain {domain} is already local");
            }
        }
        DomainCommand::Remove { domain } => {
            admin.remove_domain(&domain)?;
            outln!("domain {domain} removed");
        }
        DomainCommand::List => {
            for (d, origin) in admin.list_domains()? {
                outln!("{d}\t{origin}");
            }
        }
    }
    Ok(())
}

pub fn journal(args: JournalArgs, config: &Config) -> anyhow::Result<()> {
    let (store, _) = open(config)?;
    let since = match &args.since {
        Some(s) => parse_since(s).with_context(|| format!("--since {s}: expected seconds since the epoch or an age like 10m, 2h, 7d"))?,
        None => 0,
    };
    let mut after_id = 0i64;
    loop {
        let (code, message) = (args.code.clone(), args.message.clone());
        let rows = store.read_blocking(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, at, code, qid, originator, recipient, size, ip, detail FROM journal
                  WHERE id > ?1 AND at >= ?2 AND (?3 IS NULL OR code LIKE ?3 || '%') AND (?4 IS NULL OR qid = ?4)
                  ORDER BY id LIMIT 10000",
            )?;
            // Rows written before the journal escaped what clients sent are escaped here too:
            // nothing in a row may drive the operator's terminal.
            let text = |r: &store::rusqlite::Row<'_>, i| -> store::rusqlite::Result<String> {
                Ok(mail_proto::shown::escaped(&r.get::<_, String>(i)?, usize::MAX).into_owned())
            };
            let rows = stmt.query_map(rusqlite_params(after_id, since, code, message), |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    format!(
                        "{}  {:<3} {:<20} from={} to={} size={} ip={} {}",
                        mail_proto::date::rfc5322(r.get(1)?),
                        text(r, 2)?,
                        text(r, 3)?,
                        text(r, 4)?,
                        text(r, 5)?,
                        r.get::<_, Option<i64>>(6)?.map(|s| s.to_string()).unwrap_or_default(),
                        text(r, 7)?,
                        text(r, 8)?,
                    ),
                ))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })?;
        for (id, line) in &rows {
            outln!("{line}");
            after_id = *id;
        }
        if !args.follow {
            return Ok(());
        }
        if rows.is_empty() {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

fn rusqlite_params(after: i64, since: i64, code: Option<String>, qid: Option<String>) -> impl store::rusqlite::Params {
    store::rusqlite::params_from_iter([
        store::rusqlite::types::Value::Integer(after),
        store::rusqlite::types::Value::Integer(since),
        code.map_or(store::rusqlite::types::Value::Null, store::rusqlite::types::Value::Text),
        qid.map_or(store::rusqlite::types::Value::Null, store::rusqlite::types::Value::Text),
    ])
}

/// `1700000000` (epoch seconds) or an age: `30s`, `10m`, `2h`, `7d`.
fn parse_since(s: &str) -> Option<i64> {
    if let Ok(n) = s.parse::<i64>() {
        return Some(n);
    }
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: i64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return None,
    };
    Some(store::now() - secs)
}

/// Both files of the self-signed certificate an earlier `serve` generated are there.
fn generated_pair_present(config: &Config) -> bool {
    [tls::GENERATED_CERT, tls::GENERATED_KEY].iter().all(|name| std::fs::symlink_metadata(config.data_dir.join(name)).is_ok())
}

pub fn config(cmd: ConfigCommand, loaded: Result<Config, ConfigError>) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Check => {
            let config = loaded.map_err(|e| anyhow::anyhow!("{e}"))?;
            for w in config.warnings() {
                errln!("warning: {w}");
            }
            if config.tls.cert.as_os_str().is_empty() {
                let cert = config.data_dir.join(tls::GENERATED_CERT);
                if cert.exists() {
                    errln!("note: no [tls] cert configured: using the self-signed certificate {}", cert.display());
                } else {
                    errln!(
                        "note: no [tls] cert configured: a self-signed certificate for {} will be generated into {} on first start",
                        config.hostname,
                        cert.display()
                    );
                }
            }
            // D4: what `serve` would refuse at start: a data directory another user owns or may
            // write in, a private key others may read; and a certificate and key it cannot load
            // (missing, unreadable, not PEM, not a pair).
            let mut refused = Vec::new();
            if let Err(e) = store::check_data_dir(&config.data_dir) {
                refused.push(format!("data_dir: {e}"));
            }
            let (cert, key) = (&config.tls.cert, &config.tls.key);
            let configured = !cert.as_os_str().is_empty() || !key.as_os_str().is_empty();
            if !key.as_os_str().is_empty()
                && let Err(e) = tls::check_key_permissions(key)
            {
                refused.push(format!("[tls] key: {e}"));
            } else if configured || generated_pair_present(&config) {
                // Files only: with both paths empty and both generated files present nothing is
                // generated; a missing pair is made by `serve`, never here.
                if let Err(e) = tls::ServerTls::open(cert, key, &config.data_dir) {
                    refused.push(format!("[tls] cert/key: {e}"));
                }
            }
            // O6: the CA `serve` trusts for a private ACME server must be readable.
            let ca = &config.tls.acme.ca_file;
            if config.tls.acme.enabled()
                && !ca.as_os_str().is_empty()
                && let Err(e) = acme::check_ca_file(ca)
            {
                refused.push(format!("{e:#}"));
            }
            if !refused.is_empty() {
                for r in &refused {
                    errln!("error: {r}");
                }
                anyhow::bail!("`serve` would refuse to start: fix the problem(s) above");
            }
            out!("{}", config.effective_toml());
            errln!("configuration OK ({})", config.origin);
            Ok(())
        }
    }
}
