//! `postroom list ...` (SPEC R11: add, remove and — unlike i5/OS — show) and
//! `postroom explain` (which rule would accept or refuse a message, and why).

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use directory::access::{self, AccessLists, ListKind};
use directory::into_store;
use mail_proto::Address;
use mail_proto::address::{PathKind, parse_path};
use mail_proto::net::normalise_ip;
use policy::ClientFacts;
use store::Durability;

use crate::commands::open;
use crate::out::{errln, outln};
use postroom::config::Config;

#[derive(Subcommand)]
pub enum ListCommand {
    /// Add an entry: relay/reject "ADDRESS [MASK]" or CIDR; near DOMAIN; kill user@host, @host
    /// or @*suffix; rbl ZONE (i5/OS ADDSMTPLE).
    Add {
        /// relay, reject, near, kill, rbl or hostauth.
        kind: String,
        /// The entry; "192.168.1.0 255.255.255.0" may be given as one or two arguments;
        /// for hostauth: HOST USER (the password is read from standard input).
        #[arg(required = true, num_args = 1..)]
        entry: Vec<String>,
        /// hostauth: read the password from the first line of standard input (always so).
        #[arg(long)]
        password_stdin: bool,
        /// hostauth: PEM file of CA certificates that may issue the host's certificate, besides
        /// the system's roots (a private smarthost). Its contents are stored.
        #[arg(long, value_name = "FILE", conflicts_with = "fingerprint")]
        ca: Option<PathBuf>,
        /// hostauth: SHA-256 fingerprint of the host's certificate (hex, colons allowed): that
        /// certificate is accepted and no other, whatever its issuer and names.
        #[arg(long, value_name = "SHA256HEX")]
        fingerprint: Option<String>,
    },
    /// Remove an entry (i5/OS RMVSMTPLE); `deny ADDRESS` lets a client on the temporary deny
    /// list in again (the running server applies it within seconds).
    Remove {
        kind: String,
        #[arg(required = true, num_args = 1..)]
        entry: Vec<String>,
    },
    /// Print every entry of a list with when it was added (the WRKSMTPLE i5/OS lacks); `deny`
    /// shows the temporary deny list of the running server (R9, A5).
    Show { kind: String },
    /// Read i5/OS V4R ACCEPTRLY / REJECTCNN source members (one "address [mask]" a line).
    ImportLegacy {
        /// An ACCEPTRLY member: addresses that may relay.
        #[arg(long, value_name = "FILE")]
        accept: Option<PathBuf>,
        /// A REJECTCNN member: addresses that may not connect.
        #[arg(long, value_name = "FILE")]
        reject: Option<PathBuf>,
    },
}

fn kind(text: &str) -> anyhow::Result<ListKind> {
    ListKind::from_str(text).map_err(|_| anyhow::anyhow!("unknown list {text:?}: expected relay, reject, near, kill, rbl, hostauth or deny"))
}

/// C5: `list add|remove|show hostauth`; the password comes from standard input, never shown.
/// The credentials go only over TLS whose certificate is verified: by the system's roots, plus
/// the CA certificates of `--ca`, or by the pinned `--fingerprint`.
fn hostauth(cmd: ListCommand, store: &store::Store) -> anyhow::Result<()> {
    use directory::access::hostauth;
    match cmd {
        ListCommand::Add { entry, ca, fingerprint, .. } => {
            let [host, user] = entry.as_slice() else {
                bail!("usage: postroom list add hostauth HOST USER --password-stdin [--ca FILE | --fingerprint SHA256HEX]")
            };
            let mut trust = hostauth::Trust::default();
            if let Some(path) = &ca {
                let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let certs = smtp_client::trust::certificates_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                trust.ca_pem = Some(certs);
            }
            if let Some(text) = &fingerprint {
                trust.fingerprint = Some(
                    hostauth::normalise_fingerprint(text)
                        .with_context(|| format!("--fingerprint {text:?}: 64 hex digits of a SHA-256 expected (colons allowed)"))?,
                );
            }
            let password = crate::commands::read_password()?;
            let (h, u, t) = (host.clone(), user.clone(), trust.clone());
            store.write_blocking(Durability::Full, move |c| hostauth::add_with_trust(c, &h, &u, &password, &t).map_err(into_store))?;
            outln!("hostauth list: {host} as {user} (password stored, never shown); certificate check: {}", describe_trust(&trust));
        }
        ListCommand::Remove { entry, .. } => {
            let host = entry.join(" ");
            let h = host.clone();
            if !store.write_blocking(Durability::Full, move |c| hostauth::remove(c, &h).map_err(into_store))? {
                bail!("no hostauth entry for {host}");
            }
            outln!("hostauth list: removed {host}");
        }
        ListCommand::Show { .. } => {
            let rows = store.read_blocking(|c| hostauth::show_with_trust(c).map_err(into_store))?;
            if rows.is_empty() {
                outln!("hostauth list is empty");
            }
            for (host, user, added, trust) in rows {
                outln!("{host:<30} {user:<20} added {}  certificate: {}", mail_proto::date::rfc5322(added), describe_trust(&trust));
            }
        }
        ListCommand::ImportLegacy { .. } => unreachable!("not a hostauth command"),
    }
    Ok(())
}

/// How a hostauth entry's certificate is checked, in words.
fn describe_trust(trust: &directory::access::hostauth::Trust) -> String {
    match (&trust.fingerprint, &trust.ca_pem) {
        (Some(pin), _) => format!("pinned sha256:{pin}"),
        (None, Some(pem)) => {
            let n = smtp_client::trust::parse_ca_pem(pem).map_or(0, |c| c.len());
            format!("system roots + {n} CA certificate(s) of the entry")
        }
        (None, None) => "system roots".into(),
    }
}

fn is_hostauth(cmd: &ListCommand) -> bool {
    is_kind(cmd, "hostauth")
}

/// R9, A5: the temporary deny list of the running server (mirrored to the database every few
/// seconds): shown, and entries lifted; the server fills it, the administrator cannot add.
fn deny(cmd: ListCommand, store: &store::Store) -> anyhow::Result<()> {
    use directory::deny_list;
    use directory::penalty::Offender;
    match cmd {
        ListCommand::Show { .. } => {
            let now = store::now();
            let rows = store.read_blocking(move |c| Ok(deny_list::list(c, now)?))?;
            if rows.is_empty() {
                outln!("deny list is empty");
            }
            for d in rows {
                outln!("{:<30} until {}  ({})", d.key, mail_proto::date::rfc5322(d.until), d.reason.describe());
            }
        }
        ListCommand::Remove { entry, .. } => {
            let text = entry.join(" ");
            let who = Offender::parse(&text).with_context(|| format!("{text:?}: expected an IP address or \"user NAME\""))?;
            let key = who.key_text();
            let was = store.write_blocking(Durability::Full, move |c| Ok(deny_list::request_lift(c, &who)?))?;
            if !was {
                outln!("deny list: {key} is not on it (a running server forgets a request for it within seconds)");
            } else {
                outln!("deny list: {key} removed; the running server lets it in again within a few seconds");
            }
        }
        ListCommand::Add { .. } => {
            bail!("the deny list is filled by the server (R9, A5); to refuse an address for good use `postroom list add reject`")
        }
        ListCommand::ImportLegacy { .. } => unreachable!("not a deny list command"),
    }
    Ok(())
}

fn is_kind(cmd: &ListCommand, name: &str) -> bool {
    match cmd {
        ListCommand::Add { kind, .. } | ListCommand::Remove { kind, .. } | ListCommand::Show { kind } => kind.eq_ignore_ascii_case(name),
        ListCommand::ImportLegacy { .. } => false,
    }
}

pub fn list(cmd: ListCommand, config: &Config) -> anyhow::Result<()> {
    let (store, _) = open(config)?;
    if is_hostauth(&cmd) {
        return hostauth(cmd, &store);
    }
    if is_kind(&cmd, "deny") {
        return deny(cmd, &store);
    }
    match cmd {
        ListCommand::Add { kind: k, entry, ca, fingerprint, .. } => {
            if ca.is_some() || fingerprint.is_some() {
                bail!("--ca and --fingerprint are for the hostauth list only");
            }
            let (k, text) = (kind(&k)?, entry.join(" "));
            let (entry, added) = store.write_blocking(Durability::Full, move |c| access::add(c, k, &text).map_err(into_store))?;
            if added {
                outln!("{} list: added {entry}", k.as_str());
            } else {
                outln!("{} list: {entry} is already there", k.as_str());
            }
        }
        ListCommand::Remove { kind: k, entry } => {
            let (k, text) = (kind(&k)?, entry.join(" "));
            let entry = store.write_blocking(Durability::Full, move |c| access::remove(c, k, &text).map_err(into_store))?;
            outln!("{} list: removed {entry}", k.as_str());
        }
        ListCommand::Show { kind: k } => {
            let k = kind(&k)?;
            let rows = store.read_blocking(move |c| access::show(c, k).map_err(into_store))?;
            if rows.is_empty() {
                outln!("{} list is empty", k.as_str());
            }
            for (entry, added) in rows {
                outln!("{entry:<40} added {}", mail_proto::date::rfc5322(added));
            }
        }
        ListCommand::ImportLegacy { accept, reject } => {
            if accept.is_none() && reject.is_none() {
                bail!("give --accept FILE, --reject FILE, or both");
            }
            let mut unreadable = 0;
            for (k, path) in [(ListKind::Relay, accept), (ListKind::Reject, reject)] {
                let Some(path) = path else { continue };
                let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let (entries, bad) = access::parse_legacy(&String::from_utf8_lossy(&text));
                for (line, content) in &bad {
                    errln!("{}:{line}: cannot read {content:?}: expected \"address [mask]\"", path.display());
                }
                unreadable += bad.len();
                let n = entries.len();
                store.write_blocking(Durability::Full, move |c| {
                    for e in &entries {
                        access::add(c, k, e).map_err(into_store)?;
                    }
                    Ok(())
                })?;
                outln!("{}: {n} entries imported into the {} list, {} unreadable", path.display(), k.as_str(), bad.len());
            }
            if unreadable > 0 {
                bail!("{unreadable} line(s) could not be read (see above); the others were imported");
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The client address.
    #[arg(long)]
    ip: IpAddr,
    /// Pretend the client logged in to POP3 from this address just now.
    #[arg(long)]
    pop_login: bool,
    /// Pretend the client authenticated as this user (on the MX listener, `[smtp] auth`).
    #[arg(long)]
    user: Option<String>,
    /// The envelope sender (MAIL FROM); "<>" for the null sender.
    #[arg(long)]
    from: String,
    /// An envelope recipient (repeatable).
    #[arg(long = "to", required = true)]
    to: Vec<String>,
    /// Also ask whether this client may start delivery for a dial-up domain (ETRN, C7).
    #[arg(long, value_name = "DOMAIN")]
    etrn: Option<String>,
    /// The client's HELO name, for its SPF check (E1); without it only MAIL FROM is checked.
    #[arg(long, value_name = "NAME")]
    helo: Option<String>,
}

/// Walk one message through the policy module, exactly as the SMTP server would, and print
/// each decision. True when every decision accepts.
pub fn explain(args: ExplainArgs, config: &Config) -> anyhow::Result<bool> {
    let (store, domains) = open(config)?;
    let mut out = Vec::new();
    let accepted = explain_lines(&args, config, &store, &domains, &mut out);
    for line in &out {
        outln!("{line}");
    }
    accepted
}

/// The web console's `explain` form (issue 19): the same walk as `postroom explain`, on the
/// running server's store; the lines it prints, and whether every decision accepts. Blocks
/// (the store, DNS): the console calls it on a blocking thread.
pub fn explainer(config: Config, store: store::Store) -> admin_web::Explainer {
    Arc::new(move |q: admin_web::ExplainQuery| {
        let domains = directory::LocalDomains::new(&config.domains, &config.postmaster);
        let helo = Some(q.helo).filter(|h| !h.is_empty());
        let args = ExplainArgs { ip: q.ip, pop_login: false, user: None, from: q.from, to: q.to, etrn: None, helo };
        let mut out = Vec::new();
        match explain_lines(&args, &config, &store, &domains, &mut out) {
            Ok(accepted) => Ok((out, accepted)),
            Err(e) => {
                out.push(format!("cannot answer: {e:#}"));
                Err(out)
            }
        }
    })
}

/// [`explain`]'s walk, each decision a line of `out`.
fn explain_lines(
    args: &ExplainArgs,
    config: &Config,
    store: &store::Store,
    domains: &directory::LocalDomains,
    out: &mut Vec<String>,
) -> anyhow::Result<bool> {
    let policy = crate::serve::relay_policy(config);
    let ip = normalise_ip(args.ip);
    let ip_text = ip.to_string();
    let user = args.user.clone();
    let (lists, recorded_login, owned, denied) = store.read_blocking(move |c| {
        let lists = AccessLists::load(c).map_err(into_store)?;
        let owned = match &user {
            Some(name) => directory::mailbox::addresses_of(c, name)?,
            None => Some(Vec::new()),
        };
        let at = access::pop_login_at(c, &ip_text).map_err(into_store)?;
        let denied = directory::deny_list::lookup(c, &directory::penalty::Offender::address(ip), store::now())?;
        Ok((lists, at, owned, denied))
    })?;
    let Some(owned) = owned else {
        bail!("no such user: {} (see `postroom user list`)", args.user.as_deref().unwrap_or_default());
    };
    let now = store::now();
    let rbl_listed = rbl_listed(config, ip, &lists, out);
    let facts = ClientFacts {
        ip,
        // An IP literal is ours when it names the first SMTP listener.
        local_ip: config.smtp.listen.first().map(|a| a.ip()).unwrap_or(IpAddr::from([127, 0, 0, 1])),
        lists: Arc::new(lists),
        pop_login_at: if args.pop_login { Some(now) } else { recorded_login },
        now,
        rbl_listed,
        penalised: denied,
        authenticated: args.user.clone(),
        listener_auth: crate::serve::mx_auth(config),
    };
    let d = policy.connect(&facts);
    out.push(format!("connect: {} (rule: {})", verdict(d.allow), d.rule));
    let mut accepted = d.allow;
    let d = policy::plaintext_auth(config.tls.allow_plaintext_auth == postroom::config::PlaintextAuth::Loopback, ip);
    // Informational: a client without TLS is told to start it, not refused.
    out.push(format!("credentials without TLS: {} (rule: {})", if d.allow { "allowed" } else { "TLS first" }, d.rule));
    if let Some(node) = &args.etrn {
        let domain = node.trim_start_matches('@').to_ascii_lowercase();
        let dial_up = mail_framework::outbound::EtrnDomains::new(&config.delivery.etrn_domains).contains(&domain);
        let d = policy.etrn(&facts, &domain, dial_up);
        out.push(format!("ETRN {node}: {} (rule: {})", verdict(d.allow), d.rule));
        accepted &= d.allow;
    }
    let from = if args.from == "<>" { None } else { Some(parse_address(&args.from).context("--from")?) };
    let d = policy.sender(&facts, from.as_ref(), &owned);
    out.push(format!("sender {}: {} (rule: {})", args.from, verdict(d.allow), d.rule));
    accepted &= d.allow;
    accepted &= explain_sender_auth(config, &policy, &facts, from.as_ref(), args.helo.as_deref().unwrap_or_default(), out);
    for to in &args.to {
        let rcpt = parse_address(to).with_context(|| format!("--to {to}"))?;
        let (p, f, dom, r) = (policy.clone(), facts.clone(), domains.clone(), rcpt.clone());
        let outcome = store.read_blocking(move |c| p.rcpt(&f, &r, |a| dom.resolve(c, a)).map_err(into_store))?;
        let d = &outcome.decision;
        let what = match (&d.rule, d.allow) {
            (_, false) => "refuse".to_string(),
            (policy::Rule::LocalRecipient | policy::Rule::Postmaster, true) => "deliver locally".to_string(),
            (_, true) => "relay".to_string(),
        };
        let rewritten = outcome.record_as.as_ref().map(|a| format!(" as {a}")).unwrap_or_default();
        out.push(format!("recipient {to}: {what}{rewritten} (rule: {})", d.rule));
        accepted &= d.allow;
        if d.allow {
            let recipient = outcome.record_as.unwrap_or(rcpt);
            let sender = from.as_ref().map(Address::to_string).unwrap_or_default();
            accepted &= explain_greylist(config, store, &policy, &facts, &sender, &recipient, out)?;
        }
    }
    // Issue 21: the milters the message would meet at the end of DATA — the submission
    // listeners' for a user who logs in, the MX listener's otherwise. Only they can say then
    // what they decide.
    let (listener, milters) = if args.user.is_some() { ("submission", &config.milter.submission) } else { ("MX", &config.milter.mx) };
    out.push(if milters.is_empty() {
        format!("milters ({listener} listener): none")
    } else {
        format!("milters ({listener} listener): {}, in that order, at the end of DATA", milters.join(", "))
    });
    Ok(accepted)
}

/// Issue 21: the greylisting state of the triplet (client network, sender, recipient) as the
/// store holds it, decided as the server would decide now, without recording anything. False
/// when the recipient would be greylisted (450) now.
fn explain_greylist(
    config: &Config,
    store: &store::Store,
    relay: &policy::RelayPolicy,
    facts: &ClientFacts,
    sender: &str,
    to: &Address,
    out: &mut Vec<String>,
) -> anyhow::Result<bool> {
    let grey = crate::serve::greylist_policy(config);
    if let Some(rule) = grey.exemption(relay, facts, to) {
        let what = if grey.enabled { "not greylisted" } else { "off" };
        out.push(format!("greylist {to}: {what} (rule: {rule})"));
        return Ok(true);
    }
    let triplet = policy::greylist::triplet(facts.ip, sender, to);
    let t = triplet.clone();
    let known = store.read_blocking(move |c| Ok(directory::greylist::load(c, &t)?))?;
    let o = grey.check(&triplet.network, &known, facts.now);
    let what = match o.state() {
        "new" => "new triplet, the first attempt is greylisted",
        "early" => "waiting, a retry now is greylisted",
        "passed" => "waited long enough, a retry now passes",
        "known" => "passed before",
        "auto-allowed" => "client network auto-allowed",
        other => other,
    };
    let shown = if triplet.sender.is_empty() { "<>" } else { &triplet.sender };
    let reply = o.decision.greylist_reply().map(|r| format!("; the server answers {}", r.to_string().trim_end())).unwrap_or_default();
    out.push(format!("greylist {to}: {what} (triplet {} {shown} {}{reply}; rule: {})", triplet.network, triplet.recipient, o.decision.rule));
    Ok(o.decision.allow)
}

fn verdict(allow: bool) -> &'static str {
    if allow { "accept" } else { "refuse" }
}

/// An address as a client would write it in RCPT TO, with or without angle brackets.
fn parse_address(text: &str) -> anyhow::Result<Address> {
    let bracketed = if text.starts_with('<') { text.to_string() } else { format!("<{text}>") };
    match parse_path(bracketed.as_bytes(), PathKind::ForwardPath) {
        Ok((Some(a), b"")) => Ok(a),
        _ => bail!("{text:?} is not an address"),
    }
}

/// Query the blackhole lists the way the server does (only when some are configured).
/// E1: the SPF verdict for the sender and what the DMARC policy of its domain would do to an
/// unsigned message `From:` the same address, looked up through `[dns]` as the server would.
/// True unless one of them refuses.
fn explain_sender_auth(
    config: &Config,
    relay: &policy::RelayPolicy,
    facts: &ClientFacts,
    from: Option<&Address>,
    helo: &str,
    out: &mut Vec<String>,
) -> bool {
    let checks = crate::serve::sender_auth_policy(config);
    if let Some(rule) = checks.exemption(relay, facts) {
        out.push(format!("SPF, DKIM, DMARC: not checked (rule: {rule})"));
        return true;
    }
    let verifier = match sender_auth::verify::Verifier::new(&config.dns.servers) {
        Ok(v) => v,
        Err(e) => {
            out.push(format!("SPF, DKIM, DMARC: cannot be checked: {e}"));
            return true;
        }
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return true };
    let mail_from = from.map(Address::to_string).unwrap_or_default();
    let client = sender_auth::verify::Client { ip: facts.ip, helo, mail_from: &mail_from, hostname: &config.hostname };
    let author = if mail_from.is_empty() { format!("postmaster@{helo}") } else { mail_from.clone() };
    let message = format!("From: <{author}>\r\n\r\n");
    let verdict = runtime.block_on(async {
        let spf = verifier.spf(&client).await;
        verifier.check(&client, Some(spf), message.as_bytes()).await
    });
    let spf = &verdict.spf.mail_from;
    let at_mail = checks.at_mail_from(spf.result, &spf.domain);
    out.push(format!("SPF for {author} from {}: {} (rule: {})", facts.ip, verdict_word(&at_mail), at_mail.rule));
    if let Some(h) = &verdict.spf.helo {
        out.push(format!("SPF for HELO {helo}: {} (for the header only)", h.result));
    }
    let policy = verdict.dmarc.policy.map_or("none published", |p| p.as_str());
    let domain = if verdict.dmarc.domain.is_empty() { "(no domain)" } else { verdict.dmarc.domain.as_str() };
    let d = checks.at_end_of_data(&verdict.facts());
    out.push(format!("DMARC policy of {domain}: {policy}; an unsigned message From: {author}: {} (rule: {})", verdict_word(&d), d.rule));
    at_mail.allow && d.allow
}

/// accept / quarantine / refuse / try again later, for a sender-authentication decision.
fn verdict_word(d: &policy::Decision) -> &'static str {
    match (d.allow, d.quarantine_reason().is_some(), &d.rule) {
        (true, true, _) => "quarantine",
        (true, false, _) => "accept",
        (false, _, policy::Rule::DmarcTempError(_)) => "try again later",
        (false, _, _) => "refuse",
    }
}

fn rbl_listed(config: &Config, ip: IpAddr, lists: &AccessLists, out: &mut Vec<String>) -> Option<(String, std::net::Ipv4Addr)> {
    if lists.rbl.is_empty() {
        return None;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    runtime.block_on(async {
        let dns = dns::Dns::new(&config.dns.servers).ok()?;
        for zone in &lists.rbl {
            match dns.rbl(ip, zone).await {
                dns::RblAnswer::Listed(answer) => return Some((zone.clone(), answer)),
                dns::RblAnswer::NotListed => {}
                dns::RblAnswer::Error(e) => out.push(format!("note: {e}; the server would let the client in (fail open)")),
            }
        }
        None
    })
}
