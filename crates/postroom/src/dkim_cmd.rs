//! `postroom dkim`: the DKIM signing keys of the local domains (RFC 6376, RFC 8463; issue 16).
//! `keygen` makes and stores one and prints the TXT record to publish, `list` and `remove`
//! manage them, `check` compares the published record (through `[dns]`) with the key. The
//! running server picks up every change at its next delivery.

use anyhow::{Context, bail};
use clap::Subcommand;
use sender_auth::dkim_check::{self, Verdict};
use sender_auth::key_store::{self, StoredKey};
use sender_auth::keys::{self, Algorithm, KeyPair};
use store::{Durability, Store};

use postroom::config::Config;

use crate::commands::open;
use crate::out::outln;

#[derive(Subcommand)]
pub enum DkimCommand {
    /// Make a signing key for DOMAIN (a local domain), store it in the database and print the
    /// TXT record to publish. Another selector of the same domain is added beside the keys
    /// there (key rotation): it signs once `dkim check` has seen it published, or at once when
    /// no key of its algorithm was ever seen published.
    Keygen {
        /// The local domain whose mail the key signs (the d= of the signatures).
        domain: String,
        /// The record is published at SELECTOR._domainkey.DOMAIN; default prYYYYMM-ALGORITHM
        /// (this month, e.g. pr202607-rsa).
        #[arg(long, value_name = "S")]
        selector: Option<String>,
        /// rsa (2048-bit rsa-sha256: every receiver verifies it) or ed25519 (RFC 8463: smaller
        /// and faster, but not yet verified everywhere — add it beside an RSA key, not instead).
        #[arg(long, value_name = "ALG", default_value = "rsa", value_parser = ["rsa", "ed25519"])]
        algorithm: String,
        /// Replace the key that SELECTOR already has (its published record no longer fits).
        #[arg(long)]
        force: bool,
    },
    /// List the keys: domain, selector, algorithm, when made and last seen published, and
    /// which of them sign.
    List,
    /// Remove DOMAIN's key with --selector, or all of DOMAIN's keys; its mail is then signed by
    /// its other keys, or by the office's first domain with a key, or not at all.
    Remove {
        /// The domain whose key or keys go.
        domain: String,
        /// Only the key with this selector.
        #[arg(long, value_name = "S")]
        selector: Option<String>,
    },
    /// Look up DOMAIN's published records through the `[dns]` servers and compare them with its
    /// keys (with --selector, that key only): matches, missing, different key or DNS error.
    /// Exit status 0 only when every key checked matches.
    Check {
        /// The domain whose records are looked up.
        domain: String,
        /// Only the key with this selector.
        #[arg(long, value_name = "S")]
        selector: Option<String>,
    },
}

pub fn dkim(cmd: DkimCommand, config: &Config) -> anyhow::Result<()> {
    match cmd {
        DkimCommand::Keygen { domain, selector, algorithm, force } => keygen(config, &domain, selector.as_deref(), &algorithm, force),
        DkimCommand::List => list(config),
        DkimCommand::Remove { domain, selector } => remove(config, &domain, selector.as_deref()),
        DkimCommand::Check { domain, selector } => check(config, &domain, selector.as_deref()),
    }
}

fn normalise_domain(domain: &str) -> String {
    directory::resolve::normalise_domain(domain)
}

fn keygen(config: &Config, domain: &str, selector: Option<&str>, algorithm: &str, force: bool) -> anyhow::Result<()> {
    let (store, domains) = open(config)?;
    let domain = normalise_domain(domain);
    let d = domain.clone();
    let local = store.read_blocking(move |c| domains.contains(c, &d).map_err(directory::into_store))?;
    if !local {
        bail!("{domain} is not a local domain: only the office's own domains get DKIM keys (see `postroom domain list`)");
    }
    let algorithm = Algorithm::parse(algorithm)?;
    let now = store::now();
    let selector = match selector {
        Some(s) => keys::normalise_selector(s)?,
        None => keys::default_selector(algorithm, now),
    };
    let pair = KeyPair::generate(algorithm)?;
    let (d, s, p) = (domain.clone(), selector.clone(), pair.clone());
    let replaced = store
        .write_blocking(Durability::Full, move |c| {
            key_store::insert(c, &d, &s, &p, now, force).map_err(|e| match e {
                key_store::KeyStoreError::Sqlite(e) => e.into(),
                other => store::StoreError::Invalid(other.to_string()),
            })
        })
        .with_context(|| format!("storing the key for {domain}"))?;
    let name = keys::record_name(&selector, &domain);
    let value = pair.txt_record();
    outln!(
        "{} {} key for {domain}, selector {selector}. Publish this TXT record in the DNS of {domain}, then run \
         `postroom dkim check {domain}`:",
        if replaced { "Replaced the" } else { "Made a new" },
        algorithm.name()
    );
    outln!();
    outln!("name:  {name}");
    outln!("value: {value}");
    outln!();
    outln!("In a zone file (strings of at most 255 octets, which resolvers join):");
    outln!("{name}. IN TXT ( {} )", keys::zone_file_strings(&value, 250).replace("\" \"", "\"\n        \""));
    Ok(())
}

fn list(config: &Config) -> anyhow::Result<()> {
    let (store, _) = open(config)?;
    let rows = store.read_blocking(|c| Ok(key_store::list(c)?))?;
    if rows.is_empty() {
        outln!("no DKIM keys: mail leaves unsigned (make one with `postroom dkim keygen DOMAIN`)");
        return Ok(());
    }
    let (good, bad): (Vec<_>, Vec<_>) = rows.into_iter().partition(Result::is_ok);
    let keys: Vec<StoredKey> = good.into_iter().filter_map(Result::ok).collect();
    let ring = key_store::ring_of(keys.clone(), Vec::new());
    outln!("{:<24} {:<20} {:<15} {:<32} {:<32} signs", "domain", "selector", "algorithm", "created", "last seen published");
    for k in &keys {
        let signs = ring.choose(Some(&k.domain), None).iter().any(|s| s.selector == k.selector);
        let checked = k.checked.map(mail_proto::date::rfc5322).unwrap_or_else(|| "never".into());
        outln!(
            "{:<24} {:<20} {:<15} {:<32} {:<32} {}",
            k.domain,
            k.selector,
            k.pair.algorithm.name(),
            mail_proto::date::rfc5322(k.created),
            checked,
            if signs { "yes" } else { "no" }
        );
    }
    for e in bad.into_iter().filter_map(Result::err) {
        outln!("unusable: {e}");
    }
    Ok(())
}

fn remove(config: &Config, domain: &str, selector: Option<&str>) -> anyhow::Result<()> {
    let (store, _) = open(config)?;
    let domain = normalise_domain(domain);
    let selector = selector.map(keys::normalise_selector).transpose()?;
    let (d, s) = (domain.clone(), selector.clone());
    let n = store.write_blocking(Durability::Full, move |c| Ok(key_store::remove(c, &d, s.as_deref())?))?;
    match (n, selector) {
        (0, Some(s)) => bail!("{domain} has no DKIM key with selector {s} (see `postroom dkim list`)"),
        (0, None) => bail!("{domain} has no DKIM keys (see `postroom dkim list`)"),
        (n, _) => outln!("removed {n} DKIM key(s) of {domain}; remove the record(s) from the DNS once mail signed with them has arrived (a week)"),
    }
    Ok(())
}

fn check(config: &Config, domain: &str, selector: Option<&str>) -> anyhow::Result<()> {
    let (store, _) = open(config)?;
    let domain = normalise_domain(domain);
    let selector = selector.map(keys::normalise_selector).transpose()?;
    let rows = store.read_blocking(|c| Ok(key_store::list(c)?))?;
    let mut keys = Vec::new();
    for row in rows {
        match row {
            Ok(k) if k.domain == domain && selector.as_ref().is_none_or(|s| *s == k.selector) => keys.push(k),
            Ok(_) => {}
            Err(e) => crate::out::errln!("postroom: {e}"),
        }
    }
    if keys.is_empty() {
        match selector {
            Some(s) => bail!("{domain} has no DKIM key with selector {s} (see `postroom dkim list`)"),
            None => bail!("{domain} has no DKIM keys: make one with `postroom dkim keygen {domain}`"),
        }
    }
    let resolver = sender_auth::resolver::authenticator(&config.dns.servers)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the DNS client")?;
    let mut all_match = true;
    for k in &keys {
        let name = keys::record_name(&k.selector, &k.domain);
        let verdict = match runtime.block_on(dkim_check::lookup(&resolver, &name)) {
            Ok(records) => dkim_check::judge(&records, &k.pair),
            Err(verdict) => verdict,
        };
        match &verdict {
            Verdict::Matches => {
                outln!("{name}: matches the {} key", k.pair.algorithm.name());
                mark_checked(&store, k.id)?;
            }
            Verdict::Missing => outln!("{name}: missing: no TXT record there; publish\n  {}", k.pair.txt_record()),
            Verdict::Different(why) => outln!("{name}: different key: {why}; the record should be\n  {}", k.pair.txt_record()),
            Verdict::DnsError(why) => outln!("{name}: DNS error: {why} (nothing known; try again later)"),
        }
        all_match &= verdict == Verdict::Matches;
    }
    if !all_match {
        bail!("the DNS does not publish every key of {domain} as it should");
    }
    Ok(())
}

fn mark_checked(store: &Store, id: i64) -> anyhow::Result<()> {
    store.write_blocking(Durability::Normal, move |c| Ok(key_store::mark_checked(c, id, store::now())?))?;
    Ok(())
}
