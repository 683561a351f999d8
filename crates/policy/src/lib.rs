//! One place decides every accept and refuse (SPEC §3; DESIGN "Decisions as data"): who may
//! connect, who may send credentials without TLS, who may send as which address (over SMTP and
//! the local socket), which recipients are accepted, local or relayed, who may start ETRN, and
//! whether new mail is taken while storage is low. Every decision carries the rule that made it,
//! so the SMTP and POP3 replies, the journal entry and `postroom explain` tell the same story,
//! and a security review reads this one file. Pure functions over facts gathered by the caller:
//! no I/O here.
#![forbid(unsafe_code)]

pub mod greylist;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use directory::Resolution;
use directory::access::AccessLists;
use directory::penalty::Reason;
use mail_proto::{Address, Reply};

/// Relay mode (SPEC R1, i5/OS ALWRLY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayMode {
    All,
    None,
    Near,
    List,
    Both,
}

/// HELO/EHLO name verification (R10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeloVerify {
    Off,
    Log,
    Reject,
}

/// What a listener demands of clients (A2): `none` leaves relay to the rules of §3, `relay`
/// needs AUTH to relay, `local-and-relay` needs AUTH for anything (submission listeners).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerAuth {
    None,
    Relay,
    LocalAndRelay,
}

/// Sender verification (A3, i5/OS VFYFROMUSR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyFrom {
    Off,
    All,
    /// Everyone but clients on the relay (accept) list.
    NotOnAcceptList,
}

/// The administrator's relay settings.
#[derive(Clone, Debug)]
pub struct RelayPolicy {
    pub mode: RelayMode,
    /// POP-before-SMTP window in minutes; 0 = off.
    pub pop_minutes: u32,
    pub override_reject_connect: bool,
    pub percent_routing: bool,
    pub helo_verify: HeloVerify,
    /// The first local domain: `user@[our address]` is read as `user@primary_domain`.
    pub primary_domain: String,
    pub verify_from_user: VerifyFrom,
    /// C7: ETRN only from clients that may relay (`[delivery] etrn_clients = "relay"`).
    pub etrn_only_relay_clients: bool,
}

/// What is known about the client when a decision is made.
#[derive(Clone, Debug)]
pub struct ClientFacts {
    /// Normalised (an IPv4-mapped IPv6 address is IPv4).
    pub ip: IpAddr,
    /// The server address the client connected to: an IP literal naming it is ours.
    pub local_ip: IpAddr,
    pub lists: Arc<AccessLists>,
    /// The client's last POP3 login, unix seconds.
    pub pop_login_at: Option<i64>,
    /// Unix seconds at the moment of the decision.
    pub now: i64,
    /// The blackhole list zone and answer that listed the client, if any.
    pub rbl_listed: Option<(String, Ipv4Addr)>,
    /// In the penalty box (R9, A5), and why.
    pub penalised: Option<Reason>,
    /// The authenticated user.
    pub authenticated: Option<String>,
    /// What the listener the client reached demands (A2).
    pub listener_auth: ListenerAuth,
}

/// The rule behind a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    NoConnectRestriction,
    RejectList(String),
    RblListed {
        zone: String,
        answer: String,
    },
    /// R5: a rejected client that logged in to POP3 within the window.
    RejectOverriddenByPop {
        refused_by: Box<Rule>,
        login_at: i64,
    },
    Penalised(Reason),
    SenderAccepted,
    KillList(String),
    /// A3: the authenticated user may send as this address.
    SenderOwned(String),
    /// A3: the address is not one of the authenticated user's.
    SenderNotOwned(String),
    /// A2: this listener relays only for authenticated clients.
    AuthRequiredToRelay,
    HeloNotChecked,
    HeloMatches,
    HeloMismatch {
        name: String,
        logged_only: bool,
    },
    HeloLookupFailed(String),
    /// R10: the HELO name is an address literal, and it is the client's address.
    HeloLiteralMatches,
    /// R10: an address literal that is not the client's address (or not an address at all).
    HeloLiteralMismatch {
        name: String,
        logged_only: bool,
    },
    LocalRecipient,
    Postmaster,
    UnknownLocalUser,
    /// D2: the user's mailbox is at its quota.
    OverQuota(String),
    Authenticated(String),
    RelayModeAll,
    RelayList(String),
    NearDomain(String),
    PopBeforeSmtp {
        login_at: i64,
        minutes: u32,
    },
    RelayModeNone,
    NotInRelayList,
    NotNearDomain,
    NeitherNearNorListed,
    RelayTrick(&'static str),
    /// A1: credentials without TLS from a loopback client (`[tls] allow_plaintext_auth`).
    PlaintextAuthFromLoopback,
    /// A1: credentials only over TLS.
    TlsRequiredForAuth,
    /// C7: ETRN for a dial-up domain of ours.
    EtrnDialUp(String),
    /// C7: not one of `etrn_domains`.
    EtrnNotDialUp(String),
    /// C7: `[delivery] etrn_clients = "relay"` and the client may not relay.
    EtrnClientMayNotRelay,
    /// F5: free space below `[storage] min_free_mb`: new mail waits.
    StorageLow,
    StorageOk,
    /// A4: root on the local socket may send as anyone.
    LocalRoot,
    /// A4: a local user sends as one of their own identities.
    LocalIdentity(String),
    /// A4: the address is not one of the local user's identities.
    LocalNotOwnIdentity(String),
    /// E1: `[auth] checks = false`: no SPF, DKIM or DMARC check.
    SenderAuthOff,
    /// E1: SPF fail for the MAIL FROM domain, refused at MAIL FROM (`[auth] spf_refuse_fail`).
    SpfFailRefused(String),
    /// E1: the SPF result at MAIL FROM, not a reason to refuse.
    SpfChecked(String),
    /// E1: the checks found nothing the domain's DMARC policy asks to act on.
    SenderAuthAccepted(String),
    /// E1: DMARC fail with p=reject.
    DmarcReject(String),
    /// E1: DMARC fail with p=quarantine.
    DmarcQuarantine(String),
    /// E1: DMARC could not be evaluated (a DNS error) and the outcome matters.
    DmarcTempError(String),
    /// E1: `[auth] dmarc = "record"`: verdicts go into the header only.
    DmarcRecordOnly(String),
    /// Issue 21: `[greylist] enabled = false`.
    GreylistOff,
    /// Issue 21: a triplet not seen before (or forgotten): try again after `delay` seconds.
    GreylistNew {
        delay: i64,
    },
    /// Issue 21: a retry `waited` seconds after the first attempt, `wait` seconds too early.
    GreylistEarly {
        waited: i64,
        wait: i64,
    },
    /// Issue 21: a retry after the delay; the client network may have become auto-allowed.
    GreylistPassed {
        waited: i64,
        now_auto_allowed: bool,
    },
    /// Issue 21: a triplet that passed before (`passed` times).
    GreylistKnown {
        passed: u32,
    },
    /// Issue 21: a client network whose triplets passed `passed` times.
    GreylistAutoAllowed {
        network: String,
        passed: u32,
    },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::NoConnectRestriction => write!(f, "no connection restriction matched (R4)"),
            Rule::RejectList(e) => write!(f, "reject list entry {e} (R4)"),
            Rule::RblListed { zone, answer } => write!(f, "listed by {zone} ({answer}) (R4)"),
            Rule::RejectOverriddenByPop { refused_by, login_at } => {
                write!(f, "{refused_by}, overridden by a POP3 login at {} (R5)", mail_proto::date::rfc5322(*login_at))
            }
            Rule::Penalised(reason) => write!(f, "temporary deny list: {}", reason.describe()),
            Rule::SenderAccepted => write!(f, "no kill list entry matched (R8)"),
            Rule::KillList(e) => write!(f, "kill list entry {e} (R8)"),
            Rule::SenderOwned(u) => write!(f, "sender address belongs to {u} (A3)"),
            Rule::SenderNotOwned(u) => write!(f, "sender address is not one of {u}'s addresses (A3)"),
            Rule::AuthRequiredToRelay => write!(f, "this listener relays only after AUTH (A2)"),
            Rule::HeloNotChecked => write!(f, "HELO verification off (R10)"),
            Rule::HeloMatches => write!(f, "HELO name resolves to the client address (R10)"),
            Rule::HeloMismatch { name, logged_only: true } => write!(f, "HELO name {name} does not resolve to the client address, logged only (R10)"),
            Rule::HeloMismatch { name, logged_only: false } => write!(f, "HELO name {name} does not resolve to the client address (R10)"),
            Rule::HeloLookupFailed(e) => write!(f, "HELO name could not be checked ({e}), accepted (R10)"),
            Rule::HeloLiteralMatches => write!(f, "HELO address literal is the client address (R10)"),
            Rule::HeloLiteralMismatch { name, logged_only: true } => {
                write!(f, "HELO address literal {name} is not the client address, logged only (R10)")
            }
            Rule::HeloLiteralMismatch { name, logged_only: false } => write!(f, "HELO address literal {name} is not the client address (R10)"),
            Rule::LocalRecipient => write!(f, "local recipient (R2)"),
            Rule::Postmaster => write!(f, "postmaster is always accepted (RFC 5321 4.5.1)"),
            Rule::UnknownLocalUser => write!(f, "no such user in a local domain (D2)"),
            Rule::OverQuota(u) => write!(f, "mailbox of {u} is at its quota (D2)"),
            Rule::Authenticated(u) => write!(f, "authenticated as {u} (A2)"),
            Rule::RelayModeAll => write!(f, "relay mode all: open relay (R1)"),
            Rule::RelayList(e) => write!(f, "relay list entry {e} (R1)"),
            Rule::NearDomain(d) => write!(f, "near domain {d} (R1)"),
            Rule::PopBeforeSmtp { login_at, minutes } => {
                write!(f, "POP3 login at {} within {minutes} minutes (R1 pop)", mail_proto::date::rfc5322(*login_at))
            }
            Rule::RelayModeNone => write!(f, "relay mode none (R1)"),
            Rule::NotInRelayList => write!(f, "relay mode list: client not in the relay list (R1)"),
            Rule::NotNearDomain => write!(f, "relay mode near: recipient domain not a near domain (R1)"),
            Rule::NeitherNearNorListed => write!(f, "relay mode both: client not listed and domain not near (R1)"),
            Rule::PlaintextAuthFromLoopback => write!(f, "credentials without TLS from a loopback client ([tls] allow_plaintext_auth, A1)"),
            Rule::TlsRequiredForAuth => write!(f, "credentials only over TLS (A1)"),
            Rule::EtrnDialUp(d) => write!(f, "{d} is a dial-up domain of ours (C7)"),
            Rule::EtrnNotDialUp(d) => write!(f, "{d} is not one of [delivery] etrn_domains (C7)"),
            Rule::EtrnClientMayNotRelay => write!(f, "ETRN only from clients that may relay ([delivery] etrn_clients, C7)"),
            Rule::StorageLow => write!(f, "free space below [storage] min_free_mb (F5)"),
            Rule::StorageOk => write!(f, "free space above the threshold (F5)"),
            Rule::LocalRoot => write!(f, "root may send as anyone on the local socket (A4)"),
            Rule::LocalIdentity(u) => write!(f, "sender address is one of local user {u}'s (A4)"),
            Rule::LocalNotOwnIdentity(u) => write!(f, "sender address is not one of local user {u}'s (A4)"),
            Rule::RelayTrick(t) => write!(f, "relay trick: {t} (R7)"),
            Rule::SenderAuthOff => write!(f, "[auth] checks off (E1)"),
            Rule::SpfFailRefused(v) => write!(f, "{v}: refused at MAIL FROM ([auth] spf_refuse_fail, RFC 7208 §8.4, E1)"),
            Rule::SpfChecked(v) => write!(f, "{v} (E1)"),
            Rule::SenderAuthAccepted(v) => write!(f, "{v} (E1)"),
            Rule::DmarcReject(v) => write!(f, "DMARC p=reject: {v} (RFC 7489 §6.3, E1)"),
            Rule::DmarcQuarantine(v) => write!(f, "DMARC p=quarantine: {v} (RFC 7489 §6.3, E1)"),
            Rule::DmarcTempError(v) => write!(f, "DMARC not evaluated, DNS failed: {v} (RFC 7489 §6.6.3, E1)"),
            Rule::DmarcRecordOnly(v) => write!(f, "{v}; recorded only ([auth] dmarc = record, E1)"),
            Rule::GreylistOff => write!(f, "greylisting off ([greylist] enabled, issue 21)"),
            Rule::GreylistNew { delay } => write!(f, "new triplet: greylisted for {delay} s (issue 21)"),
            Rule::GreylistEarly { waited, wait } => write!(f, "retried after {waited} s, {wait} s early: still greylisted (issue 21)"),
            Rule::GreylistPassed { waited, now_auto_allowed: false } => write!(f, "retried after {waited} s: greylisting passed (issue 21)"),
            Rule::GreylistPassed { waited, now_auto_allowed: true } => {
                write!(f, "retried after {waited} s: greylisting passed; the client network is auto-allowed from now on (issue 21)")
            }
            Rule::GreylistKnown { passed } => write!(f, "triplet passed greylisting before ({passed} times) (issue 21)"),
            Rule::GreylistAutoAllowed { network, passed } => {
                write!(f, "client network {network} auto-allowed after {passed} passed triplets (issue 21)")
            }
        }
    }
}

/// A policy outcome and the rule that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub rule: Rule,
}

impl Decision {
    fn allow(rule: Rule) -> Self {
        Decision { allow: true, rule }
    }

    fn refuse(rule: Rule) -> Self {
        Decision { allow: false, rule }
    }

    /// A refused recipient that was a relay attempt (journal 9V), rather than a local refusal.
    pub fn is_relay_refusal(&self) -> bool {
        !self.allow && !matches!(self.rule, Rule::UnknownLocalUser | Rule::OverQuota(_) | Rule::GreylistNew { .. } | Rule::GreylistEarly { .. })
    }

    /// The greeting for a refused connection (R4: 554; R9: the client is not told why).
    pub fn connect_reply(&self, hostname: &str) -> Option<Reply> {
        if self.allow {
            return None;
        }
        Some(match &self.rule {
            Rule::Penalised(_) => Reply::new(421, (7, 0), format!("{hostname} Service temporarily unavailable, try again later")),
            Rule::RblListed { zone, .. } => Reply::new(554, (7, 1), format!("{hostname} Service unavailable; client blocked using {zone}")),
            _ => Reply::new(554, (7, 1), format!("{hostname} Service unavailable; client blocked by local policy")),
        })
    }

    /// The refusal reply for MAIL FROM.
    pub fn sender_reply(&self) -> Option<Reply> {
        if self.allow {
            return None;
        }
        Some(match &self.rule {
            Rule::SenderNotOwned(_) => Reply::new(553, (7, 1), "Sender address rejected: not owned by the authenticated user"),
            _ => Reply::new(501, (7, 1), "Unacceptable mail address"),
        })
    }

    /// The refusal reply for ETRN (RFC 1985: 459 node not allowed).
    pub fn etrn_reply(&self, node: &str) -> Option<Reply> {
        (!self.allow).then(|| match &self.rule {
            Rule::EtrnNotDialUp(_) => Reply::new(459, (7, 1), format!("Node {node} not allowed: not a dial-up domain of this server")),
            _ => Reply::new(459, (7, 1), format!("Node {node} not allowed: this client may not issue ETRN")),
        })
    }

    /// The refusal reply while storage is low (F5).
    pub fn storage_reply(&self) -> Option<Reply> {
        (!self.allow).then(|| Reply::new(452, (3, 1), "Insufficient system storage, try again later"))
    }

    /// The refusal reply for the local socket's MAIL FROM (A4).
    pub fn local_sender_reply(&self) -> Option<Reply> {
        (!self.allow).then(|| Reply::new(553, (7, 1), "Sender address rejected: a local user sends only as themself"))
    }

    /// The refusal reply for HELO/EHLO.
    pub fn helo_reply(&self) -> Option<Reply> {
        (!self.allow).then(|| match self.rule {
            Rule::HeloLiteralMismatch { .. } => Reply::new(550, (7, 1), "Helo command rejected: address literal is not your address"),
            _ => Reply::new(550, (7, 1), "Helo command rejected: host name does not match your address"),
        })
    }

    /// E1: the refusal reply for MAIL FROM after the SPF check (RFC 7372 §3.2: X.7.23).
    pub fn spf_reply(&self) -> Option<Reply> {
        (!self.allow).then(|| Reply::new(550, (7, 23), "SPF validation failed: the sender's domain does not authorise this client"))
    }

    /// E1: the reply that takes the place of 250 at the end of DATA when the checks refuse the
    /// message: 550 5.7.1 for DMARC p=reject, 451 4.7.1 when DNS failed and the outcome
    /// matters (a DNS failure is never a permanent refusal).
    pub fn data_reply(&self) -> Option<Reply> {
        if self.allow {
            return None;
        }
        Some(match self.rule {
            Rule::DmarcTempError(_) => Reply::new(451, (7, 1), "Sender authentication could not be completed (DNS), try again later"),
            _ => Reply::new(550, (7, 1), "Message rejected: the sender's domain publishes a DMARC reject policy and the message failed it"),
        })
    }

    /// E1: the quarantine reason when the message is accepted into the quarantine.
    pub fn quarantine_reason(&self) -> Option<String> {
        matches!(self.rule, Rule::DmarcQuarantine(_)).then(|| self.rule.to_string())
    }

    /// The refusal reply for a recipient.
    pub fn rcpt_reply(&self) -> Option<Reply> {
        if self.allow {
            return None;
        }
        Some(match self.rule {
            Rule::UnknownLocalUser => Reply::new(550, (1, 1), "Recipient address rejected: user unknown"),
            Rule::OverQuota(_) => Reply::new(452, (2, 2), "Mailbox full, try again later"),
            Rule::GreylistNew { .. } | Rule::GreylistEarly { .. } => return self.greylist_reply(),
            Rule::RelayTrick(_) => Reply::new(550, (7, 1), "Relay access denied: routed addresses are not accepted"),
            // R3: IMail's wording.
            _ => Reply::new(550, (7, 1), "Relay access denied: unknown local host, not a gateway"),
        })
    }
}

/// A RCPT decision, and the address to record when the screen rewrote the recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptOutcome {
    pub decision: Decision,
    pub record_as: Option<Address>,
}

/// What a recipient address asks for, after the relay-trick screen (R7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Screened {
    /// Decide on this address (source route dropped, own IP literal mapped to a local domain).
    Address(Address),
    /// `user%remote@…` with percent routing on: if the domain is local, the mail is for
    /// `user@remote` and is relay.
    PercentRouted {
        original: Address,
        routed: Address,
    },
    Refused(Decision),
}

/// A1: may credentials be sent without TLS? Only from loopback, and only when
/// `[tls] allow_plaintext_auth = "loopback"` (SMTP AUTH and POP3 USER/PASS alike).
pub fn plaintext_auth(loopback_allowed: bool, ip: IpAddr) -> Decision {
    if loopback_allowed && ip.to_canonical().is_loopback() {
        Decision::allow(Rule::PlaintextAuthFromLoopback)
    } else {
        Decision::refuse(Rule::TlsRequiredForAuth)
    }
}

/// A HELO/EHLO name that is an address literal (RFC 5321 §4.1.3: `[192.0.2.1]`,
/// `[IPv6:2001:db8::1]`): `Some(Some(ip))`; `Some(None)` for brackets around anything else;
/// `None` for a domain name. A literal is compared with the client's address, never looked up.
pub fn helo_address_literal(name: &str) -> Option<Option<IpAddr>> {
    let inner = name.strip_prefix('[')?.strip_suffix(']')?;
    let ip = match inner.get(..5).filter(|tag| tag.eq_ignore_ascii_case("IPv6:")) {
        Some(_) => inner[5..].parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6),
        None => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    };
    Some(ip)
}

/// RFC 4954 §5: the submitter of a message from an authenticated user who owns the addresses
/// `owned`, to pass on with `AUTH=`. `claimed` is the client's AUTH parameter (`None`: not given,
/// `Some(None)`: `AUTH=<>`): a mailbox of the user's own is trusted, `<>` or anyone else's
/// leaves the submitter unknown (`None`, passed on as `AUTH=<>`). Without the parameter the
/// submission is the user's own: the reverse-path when it is theirs, else their first address.
pub fn auth_sender(owned: &[String], claimed: Option<Option<&Address>>, from: Option<&Address>) -> Option<String> {
    let own = |a: &Address| owned.iter().any(|o| o.eq_ignore_ascii_case(&a.key()));
    match claimed {
        Some(Some(mailbox)) => own(mailbox).then(|| mailbox.to_string()),
        Some(None) => None,
        None => match from.filter(|f| own(f)) {
            Some(f) => Some(f.to_string()),
            None => owned.first().cloned(),
        },
    }
}

/// F5: is new mail taken now? Below the storage threshold it waits (452 4.3.1).
pub fn storage(low: bool) -> Decision {
    if low { Decision::refuse(Rule::StorageLow) } else { Decision::allow(Rule::StorageOk) }
}

/// A4: may the local user `user` (uid 0 = `root`) send as `from` on the local socket? `owned`
/// are the user's identities (user@hostname and the addresses of the Postroom user of that
/// name). The null sender is allowed.
pub fn local_sender(user: &str, root: bool, owned: &[String], from: Option<&Address>) -> Decision {
    let Some(from) = from else { return Decision::allow(Rule::SenderAccepted) };
    if root {
        Decision::allow(Rule::LocalRoot)
    } else if owned.iter().any(|o| o.eq_ignore_ascii_case(&from.key())) {
        Decision::allow(Rule::LocalIdentity(user.to_string()))
    } else {
        Decision::refuse(Rule::LocalNotOwnIdentity(user.to_string()))
    }
}

/// E1: one SPF, DKIM or DMARC result, with the names of RFC 8601 §2.7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    /// No record, or no signature.
    None,
    /// A DNS failure: the answer may be different later.
    TempError,
    /// A record that cannot be used (syntax, too many lookups).
    PermError,
}

impl AuthResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Pass => "pass",
            AuthResult::Fail => "fail",
            AuthResult::SoftFail => "softfail",
            AuthResult::Neutral => "neutral",
            AuthResult::None => "none",
            AuthResult::TempError => "temperror",
            AuthResult::PermError => "permerror",
        }
    }
}

impl fmt::Display for AuthResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// E1: what a domain's DMARC record asks receivers to do with mail that fails (RFC 7489 §6.3:
/// `p=`, or `sp=` for a subdomain; `t=y` lowers it one step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

impl DmarcPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }
}

/// E1: the verdicts of the inbound checks on one message, as the decision needs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SenderAuthFacts {
    /// SPF for the MAIL FROM identity (the HELO identity for the null sender), and its domain.
    pub spf: AuthResult,
    pub spf_domain: String,
    /// Each DKIM signature's result and signing domain (`d=`); empty when unsigned.
    pub dkim: Vec<(AuthResult, String)>,
    /// DMARC for the RFC 5322 From domain.
    pub dmarc: AuthResult,
    pub dmarc_domain: String,
    /// The policy that applies to the From domain; `None` when no record was found or the
    /// lookup failed.
    pub dmarc_policy: Option<DmarcPolicy>,
}

impl SenderAuthFacts {
    /// One line for replies, the journal and the quarantine: "SPF fail (x.test), DKIM none,
    /// DMARC fail (x.test, p=reject)".
    pub fn summary(&self) -> String {
        let dkim = match self.dkim.as_slice() {
            [] => "none".to_string(),
            sigs => sigs.iter().map(|(r, d)| format!("{r} ({d})")).collect::<Vec<_>>().join(", "),
        };
        let policy = self.dmarc_policy.map(|p| format!(", p={}", p.as_str())).unwrap_or_default();
        let dmarc = if self.dmarc_domain.is_empty() { String::new() } else { format!(" ({}{policy})", self.dmarc_domain) };
        let spf = if self.spf_domain.is_empty() { String::new() } else { format!(" ({})", self.spf_domain) };
        format!("SPF {}{spf}, DKIM {dkim}, DMARC {}{dmarc}", self.spf, self.dmarc)
    }
}

/// E1: what is done with the DMARC verdict (`[auth] dmarc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarcMode {
    /// p=reject refused (550 5.7.1), p=quarantine into the quarantine, as large receivers do.
    Enforce,
    /// Only the Authentication-Results header.
    Record,
}

/// E1: the administrator's inbound sender-authentication settings (`[auth]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderAuthPolicy {
    pub checks: bool,
    pub dmarc: DmarcMode,
    /// Refuse an SPF fail at MAIL FROM (RFC 7208 §8.4).
    pub spf_refuse_fail: bool,
}

impl SenderAuthPolicy {
    /// Is this client's mail checked? `None` = it is; otherwise the rule that exempts it: the
    /// checks are off, or the client is one of ours (authenticated, relay-listed, or a recent
    /// POP3 login): its mail is not judged by what a remote domain publishes.
    pub fn exemption(&self, relay: &RelayPolicy, c: &ClientFacts) -> Option<Rule> {
        if !self.checks {
            return Some(Rule::SenderAuthOff);
        }
        relay.own_client(c)
    }

    /// At MAIL FROM, with the SPF result for its domain: refused only for `fail`, and only when
    /// `spf_refuse_fail` is set (RFC 7208 §8.4). `softfail`, `neutral`, errors: never.
    pub fn at_mail_from(&self, spf: AuthResult, domain: &str) -> Decision {
        let verdict = format!("SPF {spf} for {domain}");
        if self.spf_refuse_fail && spf == AuthResult::Fail {
            Decision::refuse(Rule::SpfFailRefused(verdict))
        } else {
            Decision::allow(Rule::SpfChecked(verdict))
        }
    }

    /// At the end of DATA, with every verdict (RFC 7489 §6.6.2, §6.6.3): a DMARC fail is
    /// refused under p=reject and kept in the quarantine under p=quarantine; a DNS failure
    /// defers (451) only where it could change that outcome; `dmarc = "record"` accepts all.
    pub fn at_end_of_data(&self, facts: &SenderAuthFacts) -> Decision {
        let summary = facts.summary();
        if self.dmarc == DmarcMode::Record {
            return Decision::allow(Rule::DmarcRecordOnly(summary));
        }
        match (facts.dmarc, facts.dmarc_policy) {
            (AuthResult::Fail, Some(DmarcPolicy::Reject)) => Decision::refuse(Rule::DmarcReject(summary)),
            (AuthResult::Fail, Some(DmarcPolicy::Quarantine)) => Decision::allow(Rule::DmarcQuarantine(summary)),
            // The policy is unknown, or a check that could have passed failed on DNS: the same
            // message may pass or fail later.
            (AuthResult::TempError, None | Some(DmarcPolicy::Reject | DmarcPolicy::Quarantine)) => Decision::refuse(Rule::DmarcTempError(summary)),
            _ => Decision::allow(Rule::SenderAuthAccepted(summary)),
        }
    }
}

impl RelayPolicy {
    /// C7: may this client start delivery of the mail held for `domain` (RFC 1985 ETRN)? ETRN
    /// only releases mail to the domain's own MX, so by default anyone may ask for a dial-up
    /// domain, as Postfix allows (a dial-up server connects from changing addresses);
    /// `[delivery] etrn_clients = "relay"` restricts it to clients that may relay.
    pub fn etrn(&self, c: &ClientFacts, domain: &str, dial_up: bool) -> Decision {
        if self.etrn_only_relay_clients && c.authenticated.is_none() && c.lists.relay_match(c.ip).is_none() {
            return Decision::refuse(Rule::EtrnClientMayNotRelay);
        }
        if !dial_up {
            return Decision::refuse(Rule::EtrnNotDialUp(domain.to_string()));
        }
        Decision::allow(Rule::EtrnDialUp(domain.to_string()))
    }

    /// Is this one of the office's own clients, and by which rule: authenticated, on the relay
    /// list, or a POP3 login within the window? Their mail is not judged as a stranger's (E1
    /// checks, greylisting of issue 21).
    pub fn own_client(&self, c: &ClientFacts) -> Option<Rule> {
        if let Some(user) = &c.authenticated {
            return Some(Rule::Authenticated(user.clone()));
        }
        if let Some(e) = c.lists.relay_match(c.ip) {
            return Some(Rule::RelayList(e.to_string()));
        }
        self.pop_window(c).map(|login_at| Rule::PopBeforeSmtp { login_at, minutes: self.pop_minutes })
    }

    /// Is the client's POP3 login recent enough (R1 pop, R5)? Returns the login time.
    fn pop_window(&self, c: &ClientFacts) -> Option<i64> {
        let at = c.pop_login_at?;
        (self.pop_minutes > 0 && c.now - at <= i64::from(self.pop_minutes) * 60 && at <= c.now + 60).then_some(at)
    }

    /// May this client connect? (R4, R5, R9.)
    pub fn connect(&self, c: &ClientFacts) -> Decision {
        if let Some(reason) = c.penalised {
            return Decision::refuse(Rule::Penalised(reason));
        }
        let refused_by = if let Some(e) = c.lists.reject_match(c.ip) {
            Rule::RejectList(e.to_string())
        } else if let Some((zone, answer)) = &c.rbl_listed {
            Rule::RblListed { zone: zone.to_string(), answer: answer.to_string() }
        } else {
            return Decision::allow(Rule::NoConnectRestriction);
        };
        match self.pop_window(c) {
            Some(login_at) if self.override_reject_connect => {
                Decision::allow(Rule::RejectOverriddenByPop { refused_by: Box::new(refused_by), login_at })
            }
            _ => Decision::refuse(refused_by),
        }
    }

    /// Is this client exempt from the hack auto-deny (R9)? Relay-listed and authenticated
    /// clients are: a whole office behind one NAT address must not lock itself out.
    pub fn exempt_from_penalty(&self, c: &ClientFacts) -> bool {
        c.authenticated.is_some() || c.lists.relay_match(c.ip).is_some()
    }

    /// MAIL FROM against the kill list (R8), then, for an authenticated client, against the
    /// user's own addresses (A3; `owned` lists them). The null sender is never refused here.
    pub fn sender(&self, c: &ClientFacts, from: Option<&Address>, owned: &[String]) -> Decision {
        if let Some(k) = from.and_then(|f| c.lists.kill_match(f)) {
            return Decision::refuse(Rule::KillList(k.to_string()));
        }
        let (Some(user), Some(from)) = (&c.authenticated, from) else { return Decision::allow(Rule::SenderAccepted) };
        let verify = match self.verify_from_user {
            VerifyFrom::Off => false,
            VerifyFrom::All => true,
            VerifyFrom::NotOnAcceptList => c.lists.relay_match(c.ip).is_none(),
        };
        if !verify {
            return Decision::allow(Rule::SenderAccepted);
        }
        if owned.iter().any(|a| a.eq_ignore_ascii_case(&from.key())) {
            Decision::allow(Rule::SenderOwned(user.clone()))
        } else {
            Decision::refuse(Rule::SenderNotOwned(user.clone()))
        }
    }

    /// HELO verification (R10) from the addresses the name resolved to.
    pub fn helo(&self, c: &ClientFacts, name: &str, resolved: &dns::AddressAnswer) -> Decision {
        if self.helo_verify == HeloVerify::Off {
            return Decision::allow(Rule::HeloNotChecked);
        }
        // An address literal names an address, not a host: it must be the client's own.
        if let Some(literal) = helo_address_literal(name) {
            let matches = literal.is_some_and(|ip| mail_proto::net::normalise_ip(ip) == c.ip);
            return match (matches, self.helo_verify) {
                (true, _) => Decision::allow(Rule::HeloLiteralMatches),
                (false, HeloVerify::Log) => Decision::allow(Rule::HeloLiteralMismatch { name: name.to_string(), logged_only: true }),
                (false, _) => Decision::refuse(Rule::HeloLiteralMismatch { name: name.to_string(), logged_only: false }),
            };
        }
        let matches = match resolved {
            dns::AddressAnswer::Found(ips) => ips.iter().any(|ip| mail_proto::net::normalise_ip(*ip) == c.ip),
            dns::AddressAnswer::NotFound => false,
            dns::AddressAnswer::Error(e) => return Decision::allow(Rule::HeloLookupFailed(e.clone())),
        };
        match (matches, self.helo_verify) {
            (true, _) => Decision::allow(Rule::HeloMatches),
            (false, HeloVerify::Log) => Decision::allow(Rule::HeloMismatch { name: name.to_string(), logged_only: true }),
            (false, _) => Decision::refuse(Rule::HeloMismatch { name: name.to_string(), logged_only: false }),
        }
    }

    /// The relay-trick screen (R7), before any lookup. An IP literal naming the address the
    /// client connected to is ours, and maps to the primary domain.
    pub fn screen(&self, address: &Address, local_ip: IpAddr) -> Screened {
        let trick = |t| Screened::Refused(Decision::refuse(Rule::RelayTrick(t)));
        let local = address.local.as_str();
        if address.quoted && local.contains(['@', '%', '!']) {
            return trick("quoted local part containing @, % or !");
        }
        if local.contains('!') {
            return trick("bang path");
        }
        if let Some(literal) = address.domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            let ip = literal.strip_prefix("IPv6:").or_else(|| literal.strip_prefix("ipv6:")).unwrap_or(literal).parse::<IpAddr>();
            return match ip {
                Ok(ip) if mail_proto::net::normalise_ip(ip) == mail_proto::net::normalise_ip(local_ip) => {
                    Screened::Address(Address { domain: self.primary_domain.clone(), ..address.clone() })
                }
                _ => trick("IP literal that is not this server"),
            };
        }
        if !address.quoted && local.contains('%') {
            if !self.percent_routing {
                return trick("percent hack (percent routing is off)");
            }
            let (user, remote) = local.rsplit_once('%').expect("contains %");
            return match Address::parse(&format!("{user}@{remote}")) {
                Ok(routed) => Screened::PercentRouted { original: address.clone(), routed },
                Err(_) => trick("percent-routed address that is not an address"),
            };
        }
        Screened::Address(address.clone())
    }

    /// Is this recipient accepted from this client? `resolution` is the directory's answer for
    /// the address the screen produced; `routed` is true for percent-routed mail.
    pub fn recipient(&self, c: &ClientFacts, address: &Address, resolution: &Resolution, routed: bool) -> Decision {
        match resolution {
            Resolution::Local { full: true, user, .. } => return Decision::refuse(Rule::OverQuota(user.clone())),
            Resolution::Alias { full: true, .. } => return Decision::refuse(Rule::OverQuota(address.to_string())),
            Resolution::Local { .. } | Resolution::Alias { .. } => return Decision::allow(Rule::LocalRecipient),
            Resolution::Unknown if address.is_postmaster() && !routed => return Decision::allow(Rule::Postmaster),
            Resolution::Unknown => return Decision::refuse(Rule::UnknownLocalUser),
            Resolution::Remote => {}
        }
        self.relay(c, &address.domain_lower())
    }

    /// The whole RCPT decision: screen, resolve, decide. `resolve` asks the directory; the
    /// outcome says which address to record when the screen rewrote it.
    pub fn rcpt<E>(&self, c: &ClientFacts, address: &Address, mut resolve: impl FnMut(&Address) -> Result<Resolution, E>) -> Result<RcptOutcome, E> {
        let (target, routed) = match self.screen(address, c.local_ip) {
            Screened::Refused(decision) => return Ok(RcptOutcome { decision, record_as: None }),
            Screened::Address(a) => (a, false),
            // `user%x@remote`: the % belongs to a remote address; decide on it as it is.
            Screened::PercentRouted { original, routed } => match resolve(&original)? {
                Resolution::Remote => (original, false),
                _ => (routed, true),
            },
        };
        let resolution = resolve(&target)?;
        let decision = self.recipient(c, &target, &resolution, routed);
        let record_as = (decision.allow && target != *address).then_some(target);
        Ok(RcptOutcome { decision, record_as })
    }

    /// May this client relay to `domain`? (R1.)
    pub fn relay(&self, c: &ClientFacts, domain: &str) -> Decision {
        if let Some(user) = &c.authenticated {
            return Decision::allow(Rule::Authenticated(user.clone()));
        }
        if c.listener_auth != ListenerAuth::None {
            return Decision::refuse(Rule::AuthRequiredToRelay);
        }
        let listed = || c.lists.relay_match(c.ip).map(|e| Rule::RelayList(e.to_string()));
        let near = || c.lists.near_match(domain).map(|d| Rule::NearDomain(d.to_string()));
        let (by_mode, refusal) = match self.mode {
            RelayMode::All => (Some(Rule::RelayModeAll), Rule::RelayModeNone),
            RelayMode::None => (None, Rule::RelayModeNone),
            RelayMode::List => (listed(), Rule::NotInRelayList),
            RelayMode::Near => (near(), Rule::NotNearDomain),
            RelayMode::Both => (listed().or_else(near), Rule::NeitherNearNorListed),
        };
        if let Some(rule) = by_mode {
            return Decision::allow(rule);
        }
        match self.pop_window(c) {
            Some(login_at) => Decision::allow(Rule::PopBeforeSmtp { login_at, minutes: self.pop_minutes }),
            None => Decision::refuse(refusal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use directory::access::ListKind;

    const NOW: i64 = 1_800_000_000;

    fn lists() -> Arc<AccessLists> {
        let mut l = AccessLists::default();
        l.relay.push(ListKind::Relay.canonical("127.0.0.16/30").unwrap().parse().unwrap());
        l.reject.push("127.0.0.66".parse().unwrap());
        l.near.push("partner.example".into());
        l.kill.push("@*spam.example".parse().unwrap());
        Arc::new(l)
    }

    fn policy(mode: RelayMode, pop_minutes: u32) -> RelayPolicy {
        RelayPolicy {
            mode,
            pop_minutes,
            override_reject_connect: true,
            percent_routing: false,
            helo_verify: HeloVerify::Reject,
            primary_domain: "example.test".into(),
            verify_from_user: VerifyFrom::All,
            etrn_only_relay_clients: false,
        }
    }

    fn client(lists: &Arc<AccessLists>, ip: &str, pop_ago: Option<i64>) -> ClientFacts {
        ClientFacts {
            ip: ip.parse().unwrap(),
            local_ip: "127.0.0.1".parse().unwrap(),
            lists: lists.clone(),
            pop_login_at: pop_ago.map(|a| NOW - a),
            now: NOW,
            rbl_listed: None,
            penalised: None,
            authenticated: None,
            listener_auth: ListenerAuth::None,
        }
    }

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    /// Every relay mode × client kind × recipient kind (R1, R2).
    #[test]
    fn relay_matrix() {
        let l = lists();
        let local = Resolution::Local { user_id: 1, user: "sam".into(), forward: None, full: false };
        // mode, pop window, client ip, POP login seconds ago, recipient, relayed?
        type Case = (RelayMode, u32, &'static str, Option<i64>, &'static str, bool);
        let cases: &[Case] = &[
            (RelayMode::None, 0, "127.0.0.17", None, "x@remote.example", false),
            (RelayMode::None, 0, "127.0.0.17", None, "x@partner.example", false),
            (RelayMode::All, 0, "127.0.0.9", None, "x@remote.example", true),
            (RelayMode::List, 0, "127.0.0.17", None, "x@remote.example", true),
            (RelayMode::List, 0, "127.0.0.20", None, "x@remote.example", false),
            (RelayMode::List, 0, "127.0.0.20", None, "x@partner.example", false),
            (RelayMode::Near, 0, "127.0.0.20", None, "x@partner.example", true),
            (RelayMode::Near, 0, "127.0.0.20", None, "x@mail.partner.example", true),
            (RelayMode::Near, 0, "127.0.0.17", None, "x@remote.example", false),
            (RelayMode::Both, 0, "127.0.0.17", None, "x@remote.example", true),
            (RelayMode::Both, 0, "127.0.0.20", None, "x@partner.example", true),
            (RelayMode::Both, 0, "127.0.0.20", None, "x@remote.example", false),
            (RelayMode::None, 15, "127.0.0.20", Some(60), "x@remote.example", true),
            (RelayMode::None, 15, "127.0.0.20", Some(16 * 60), "x@remote.example", false),
            (RelayMode::None, 0, "127.0.0.20", Some(60), "x@remote.example", false),
            (RelayMode::List, 15, "127.0.0.20", Some(14 * 60), "x@remote.example", true),
        ];
        for &(mode, pop, ip, ago, rcpt, relayed) in cases {
            let p = policy(mode, pop);
            let c = client(&l, ip, ago);
            let d = p.recipient(&c, &addr(rcpt), &Resolution::Remote, false);
            assert_eq!(d.allow, relayed, "{mode:?} pop={pop} {ip} {ago:?} {rcpt}: {}", d.rule);
            assert!(p.recipient(&c, &addr("sam@example.test"), &local, false).allow, "R2: local always accepted");
            if !relayed {
                assert_eq!(d.rcpt_reply().unwrap().enhanced().as_deref(), Some("5.7.1"));
                assert!(d.is_relay_refusal());
            }
        }
    }

    #[test]
    fn full_mailbox_is_a_temporary_refusal() {
        let l = lists();
        let full = Resolution::Local { user_id: 1, user: "sam".into(), forward: None, full: true };
        let d = policy(RelayMode::None, 0).recipient(&client(&l, "127.0.0.1", None), &addr("sam@example.test"), &full, false);
        assert_eq!(d.rcpt_reply().unwrap().to_string(), "452 4.2.2 Mailbox full, try again later\r\n");
        assert!(!d.is_relay_refusal());
    }

    #[test]
    fn rules_name_the_entry_that_decided() {
        let l = lists();
        let d = policy(RelayMode::List, 0).relay(&client(&l, "127.0.0.18", None), "remote.example");
        assert_eq!(d.rule.to_string(), "relay list entry 127.0.0.16/30 (R1)");
        let d = policy(RelayMode::Near, 0).relay(&client(&l, "127.0.0.1", None), "a.partner.example");
        assert_eq!(d.rule, Rule::NearDomain("partner.example".into()));
        let mut c = client(&l, "127.0.0.1", None);
        c.authenticated = Some("sam".into());
        assert_eq!(policy(RelayMode::None, 0).relay(&c, "remote.example").rule, Rule::Authenticated("sam".into()));
    }

    #[test]
    fn connect_reject_rbl_override_and_penalty() {
        let l = lists();
        let p = policy(RelayMode::None, 15);
        assert!(p.connect(&client(&l, "127.0.0.65", None)).allow);
        let d = p.connect(&client(&l, "127.0.0.66", None));
        assert_eq!((d.allow, d.connect_reply("h").unwrap().code), (false, 554));
        assert!(p.connect(&client(&l, "127.0.0.66", Some(60))).allow, "R5 override with a POP login");
        let no_override = RelayPolicy { override_reject_connect: false, ..p.clone() };
        assert!(!no_override.connect(&client(&l, "127.0.0.66", Some(60))).allow);
        let mut listed = client(&l, "127.0.0.5", None);
        let answer = "127.0.0.2".parse().unwrap();
        listed.rbl_listed = Some(("rbl.test".into(), answer));
        assert!(matches!(p.connect(&listed).rule, Rule::RblListed { .. }));
        let mut penalised = client(&l, "127.0.0.5", Some(60));
        penalised.penalised = Some(Reason::CommandLine);
        let d = p.connect(&penalised);
        assert_eq!((d.allow, d.connect_reply("h").unwrap().code), (false, 421));
        assert!(p.exempt_from_penalty(&client(&l, "127.0.0.17", None)));
        assert!(!p.exempt_from_penalty(&client(&l, "127.0.0.5", None)));
    }

    #[test]
    fn kill_list_and_null_sender() {
        let l = lists();
        let p = policy(RelayMode::None, 0);
        let c = client(&l, "127.0.0.1", None);
        assert!(!p.sender(&c, Some(&addr("a@mx.spam.example")), &[]).allow);
        assert_eq!(p.sender(&c, Some(&addr("a@mx.spam.example")), &[]).sender_reply().unwrap().code, 501);
        assert!(p.sender(&c, Some(&addr("a@ham.example")), &[]).allow);
        assert!(p.sender(&c, None, &[]).allow);
    }

    /// A3: an authenticated user sends only as one of their addresses.
    #[test]
    fn sender_verification() {
        let l = lists();
        let owned = ["sam@example.test".to_string()];
        let mut c = client(&l, "127.0.0.99", None);
        c.authenticated = Some("sam".into());
        let p = policy(RelayMode::None, 0);
        assert!(p.sender(&c, Some(&addr("Sam@Example.Test")), &owned).allow);
        let d = p.sender(&c, Some(&addr("boss@example.test")), &owned);
        assert_eq!(d.sender_reply().unwrap().enhanced().as_deref(), Some("5.7.1"));
        assert_eq!(d.sender_reply().unwrap().code, 553);
        let not_on_list = RelayPolicy { verify_from_user: VerifyFrom::NotOnAcceptList, ..p.clone() };
        assert!(!not_on_list.sender(&c, Some(&addr("boss@example.test")), &owned).allow);
        let mut office = client(&l, "127.0.0.17", None);
        office.authenticated = Some("sam".into());
        assert!(not_on_list.sender(&office, Some(&addr("boss@example.test")), &owned).allow, "accept-listed clients are not checked");
        let off = RelayPolicy { verify_from_user: VerifyFrom::Off, ..p };
        assert!(off.sender(&c, Some(&addr("boss@example.test")), &owned).allow);
    }

    /// A2: on an AUTH-for-relay listener only authenticated clients relay, whatever the lists say.
    #[test]
    fn listener_auth_mode_gates_relay() {
        let l = lists();
        let p = policy(RelayMode::List, 0);
        let mut c = client(&l, "127.0.0.17", None);
        c.listener_auth = ListenerAuth::Relay;
        assert_eq!(p.relay(&c, "remote.example").rule, Rule::AuthRequiredToRelay);
        c.authenticated = Some("sam".into());
        assert!(p.relay(&c, "remote.example").allow);
    }

    #[test]
    fn relay_tricks_are_screened() {
        let p = policy(RelayMode::All, 0);
        let ours: IpAddr = "127.0.0.1".parse().unwrap();
        let parse = |s: &str| mail_proto::address::parse_path(s.as_bytes(), mail_proto::address::PathKind::ForwardPath).unwrap().0.unwrap();
        for trick in [
            "<user%remote.example@example.test>",
            "<\"user@remote.example\"@example.test>",
            "<remote.example!user@example.test>",
            "<user@[192.0.2.1]>",
            "<\"a%b\"@example.test>",
        ] {
            assert!(matches!(p.screen(&parse(trick), ours), Screened::Refused(_)), "{trick}");
        }
        assert_eq!(p.screen(&parse("<sam@[127.0.0.1]>"), ours), Screened::Address(addr("sam@example.test")));
        let routed = parse("<@example.test:user@remote.example>");
        assert_eq!(p.screen(&routed, ours), Screened::Address(routed.clone()));
        let percent = RelayPolicy { percent_routing: true, ..p.clone() };
        match percent.screen(&parse("<user%remote.example@example.test>"), ours) {
            Screened::PercentRouted { routed, .. } => assert_eq!(routed.key(), "user@remote.example"),
            other => panic!("{other:?}"),
        }
    }

    /// The full RCPT pipeline: percent routing relays only for clients that may relay.
    #[test]
    fn percent_routing_relays_only_when_relay_is_allowed() {
        let l = lists();
        let resolve =
            |a: &Address| -> Result<Resolution, ()> { Ok(if a.domain_lower() == "example.test" { Resolution::Unknown } else { Resolution::Remote }) };
        let on = RelayPolicy { percent_routing: true, ..policy(RelayMode::List, 0) };
        let rcpt = addr("user%remote.example@example.test");
        let listed = on.rcpt(&client(&l, "127.0.0.17", None), &rcpt, resolve).unwrap();
        assert!(listed.decision.allow);
        assert_eq!(listed.record_as.unwrap().key(), "user@remote.example");
        let stranger = on.rcpt(&client(&l, "127.0.0.99", None), &rcpt, resolve).unwrap();
        assert_eq!((stranger.decision.allow, stranger.decision.rule), (false, Rule::NotInRelayList));
        let off = policy(RelayMode::All, 0).rcpt(&client(&l, "127.0.0.17", None), &rcpt, resolve).unwrap();
        assert!(matches!(off.decision.rule, Rule::RelayTrick(_)), "percent hack refused even in mode all");
    }

    #[test]
    fn helo_verification() {
        let l = lists();
        let c = client(&l, "127.0.0.5", None);
        let p = policy(RelayMode::None, 0);
        let found = |s: &str| dns::AddressAnswer::Found(vec![s.parse().unwrap()]);
        assert!(p.helo(&c, "client.test", &found("127.0.0.5")).allow);
        assert!(!p.helo(&c, "client.test", &found("127.0.0.6")).allow);
        assert!(!p.helo(&c, "client.test", &dns::AddressAnswer::NotFound).allow);
        assert!(p.helo(&c, "client.test", &dns::AddressAnswer::Error("timeout".into())).allow, "fail open");
        let log = RelayPolicy { helo_verify: HeloVerify::Log, ..p.clone() };
        assert!(log.helo(&c, "client.test", &dns::AddressAnswer::NotFound).allow);
    }

    /// R10 (issue 14): an address literal is compared with the client's address, whatever DNS
    /// said (the server does not ask); a foreign or malformed literal is a mismatch.
    #[test]
    fn helo_address_literals() {
        let l = lists();
        let p = policy(RelayMode::None, 0);
        let no_lookup = dns::AddressAnswer::Error("invalid characters".into());
        let c = client(&l, "127.0.0.70", None);
        let d = p.helo(&c, "[127.0.0.70]", &no_lookup);
        assert_eq!((d.allow, d.rule), (true, Rule::HeloLiteralMatches));
        for foreign in ["[127.0.0.5]", "[IPv6:::1]", "[127.0.0.70.1]", "[client.test]", "[]"] {
            let d = p.helo(&c, foreign, &no_lookup);
            assert!(!d.allow, "{foreign}");
            assert_eq!(d.rule, Rule::HeloLiteralMismatch { name: foreign.into(), logged_only: false });
            assert!(d.helo_reply().unwrap().to_string().starts_with("550 5.7.1"));
        }
        let log = RelayPolicy { helo_verify: HeloVerify::Log, ..p.clone() };
        let d = log.helo(&c, "[127.0.0.5]", &no_lookup);
        assert!(d.allow && matches!(d.rule, Rule::HeloLiteralMismatch { logged_only: true, .. }));
        let v6 = client(&l, "2001:db8::7", None);
        assert!(p.helo(&v6, "[IPv6:2001:DB8::7]", &no_lookup).allow);
        assert!(p.helo(&v6, "[ipv6:2001:db8:0::7]", &no_lookup).allow);
        assert!(!p.helo(&v6, "[2001:db8::7]", &no_lookup).allow, "IPv6 needs its tag");
        let mapped = client(&l, "127.0.0.70", None);
        assert!(p.helo(&mapped, "[IPv6:::ffff:127.0.0.70]", &no_lookup).allow);
        assert_eq!(helo_address_literal("client.test"), None);
        assert_eq!(helo_address_literal("[192.0.2.1]"), Some(Some("192.0.2.1".parse().unwrap())));
        assert_eq!(helo_address_literal("[x]"), Some(None));
    }

    /// RFC 4954 §5: whom an authenticated user's message is passed on as.
    #[test]
    fn auth_sender_is_trusted_only_for_the_users_own_mailboxes() {
        let owned = vec!["sam@example.test".to_string(), "SamJones@example.test".to_string()];
        let a = |s: &str| Address::parse(s).unwrap();
        assert_eq!(auth_sender(&owned, Some(Some(&a("SAM@example.test"))), None).as_deref(), Some("SAM@example.test"));
        assert_eq!(auth_sender(&owned, Some(Some(&a("kim@example.test"))), None), None, "someone else's: unknown");
        assert_eq!(auth_sender(&owned, Some(None), Some(&a("sam@example.test"))), None, "AUTH=<>");
        assert_eq!(auth_sender(&owned, None, Some(&a("samjones@example.test"))).as_deref(), Some("samjones@example.test"));
        assert_eq!(auth_sender(&owned, None, Some(&a("other@remote.example"))).as_deref(), Some("sam@example.test"));
        assert_eq!(auth_sender(&owned, None, None).as_deref(), Some("sam@example.test"));
        assert_eq!(auth_sender(&[], None, None), None, "no mailbox to name");
    }

    /// The decisions that lived outside this module (issue 13 item 11), each with its rule.
    #[test]
    fn plaintext_auth_storage_local_sender_and_etrn() {
        assert!(plaintext_auth(true, "127.0.0.9".parse().unwrap()).allow);
        assert!(plaintext_auth(true, "::ffff:127.0.0.1".parse().unwrap()).allow);
        assert_eq!(plaintext_auth(true, "192.0.2.1".parse().unwrap()).rule, Rule::TlsRequiredForAuth);
        assert!(!plaintext_auth(false, "127.0.0.1".parse().unwrap()).allow);

        assert_eq!(storage(true).storage_reply().unwrap().to_string(), "452 4.3.1 Insufficient system storage, try again later\r\n");
        assert!(storage(false).storage_reply().is_none());

        let owned = vec!["kim@host.example".to_string(), "kim@example.test".to_string()];
        let addr = |s: &str| Address::parse(s).unwrap();
        assert!(local_sender("kim", false, &owned, Some(&addr("KIM@example.test"))).allow);
        let d = local_sender("kim", false, &owned, Some(&addr("ceo@example.test")));
        assert_eq!(d.rule, Rule::LocalNotOwnIdentity("kim".into()));
        assert!(d.local_sender_reply().unwrap().to_string().starts_with("553 5.7.1"));
        assert_eq!(local_sender("root", true, &[], Some(&addr("ceo@example.test"))).rule, Rule::LocalRoot);
        assert!(local_sender("kim", false, &owned, None).allow, "the null sender");

        let l = lists();
        let stranger = client(&l, "192.0.2.77", None);
        let open = policy(RelayMode::None, 0);
        assert!(open.etrn(&stranger, "dial.test", true).allow, "any client may ETRN a dial-up domain by default");
        let d = open.etrn(&stranger, "other.test", false);
        assert_eq!(d.rule, Rule::EtrnNotDialUp("other.test".into()));
        assert!(d.etrn_reply("other.test").unwrap().to_string().starts_with("459 4.7.1"));
        let strict = RelayPolicy { etrn_only_relay_clients: true, ..open };
        assert_eq!(strict.etrn(&stranger, "dial.test", true).rule, Rule::EtrnClientMayNotRelay);
        assert!(strict.etrn(&client(&l, "127.0.0.17", None), "dial.test", true).allow, "relay-listed");
    }

    fn auth_facts(spf: AuthResult, dkim: &[(AuthResult, &str)], dmarc: AuthResult, policy: Option<DmarcPolicy>) -> SenderAuthFacts {
        SenderAuthFacts {
            spf,
            spf_domain: "office.test".into(),
            dkim: dkim.iter().map(|(r, d)| (*r, d.to_string())).collect(),
            dmarc,
            dmarc_domain: "office.test".into(),
            dmarc_policy: policy,
        }
    }

    const ENFORCE: SenderAuthPolicy = SenderAuthPolicy { checks: true, dmarc: DmarcMode::Enforce, spf_refuse_fail: false };

    /// E1 (RFC 7489 §6.6.2): p=reject refuses with 550 5.7.1, p=quarantine keeps the message
    /// with the verdict as the reason, p=none and pass accept; "record" accepts everything.
    #[test]
    fn dmarc_policy_decides_at_the_end_of_data() {
        use AuthResult::*;
        let forged = auth_facts(Fail, &[], Fail, Some(DmarcPolicy::Reject));
        let d = ENFORCE.at_end_of_data(&forged);
        assert!(!d.allow);
        assert_eq!(d.data_reply().unwrap().enhanced().as_deref(), Some("5.7.1"));
        assert_eq!(d.data_reply().unwrap().code, 550);
        assert_eq!(d.rule.to_string(), "DMARC p=reject: SPF fail (office.test), DKIM none, DMARC fail (office.test, p=reject) (RFC 7489 §6.3, E1)");
        assert_eq!(d.quarantine_reason(), Option::None);

        let q = ENFORCE.at_end_of_data(&auth_facts(SoftFail, &[(Fail, "office.test")], Fail, Some(DmarcPolicy::Quarantine)));
        assert!(q.allow && q.data_reply().is_none());
        assert_eq!(
            q.quarantine_reason().as_deref(),
            Some(
                "DMARC p=quarantine: SPF softfail (office.test), DKIM fail (office.test), DMARC fail (office.test, p=quarantine) (RFC 7489 §6.3, E1)"
            )
        );

        for accepted in [
            auth_facts(Fail, &[], Fail, Some(DmarcPolicy::None)),
            auth_facts(Fail, &[(Pass, "office.test")], Pass, Some(DmarcPolicy::Reject)),
            auth_facts(None, &[], None, Option::None),
            auth_facts(Pass, &[], PermError, Option::None),
        ] {
            let d = ENFORCE.at_end_of_data(&accepted);
            assert!(d.allow && d.quarantine_reason().is_none(), "{d:?}");
            assert!(matches!(d.rule, Rule::SenderAuthAccepted(_)));
        }
        let record = SenderAuthPolicy { dmarc: DmarcMode::Record, ..ENFORCE };
        let d = record.at_end_of_data(&forged);
        assert!(d.allow && d.quarantine_reason().is_none());
        assert!(d.rule.to_string().ends_with("recorded only ([auth] dmarc = record, E1)"), "{}", d.rule);
    }

    /// E1: a DNS failure is never a refusal: 451 4.7.1 when it could change the outcome (the
    /// policy is unknown, or is reject/quarantine), accepted when the domain asks for nothing.
    #[test]
    fn dmarc_temperror_defers_only_when_it_matters() {
        use AuthResult::*;
        for policy in [Option::None, Some(DmarcPolicy::Reject), Some(DmarcPolicy::Quarantine)] {
            let d = ENFORCE.at_end_of_data(&auth_facts(TempError, &[], TempError, policy));
            assert_eq!(d.data_reply().unwrap().to_string(), "451 4.7.1 Sender authentication could not be completed (DNS), try again later\r\n");
        }
        assert!(ENFORCE.at_end_of_data(&auth_facts(TempError, &[], TempError, Some(DmarcPolicy::None))).allow);
        let record = SenderAuthPolicy { dmarc: DmarcMode::Record, ..ENFORCE };
        assert!(record.at_end_of_data(&auth_facts(TempError, &[], TempError, Option::None)).allow);
    }

    /// E1, RFC 7208 §8.4: only `fail` is refused at MAIL FROM, and only when asked to.
    #[test]
    fn spf_fail_is_refused_at_mail_from_only_when_configured() {
        use AuthResult::*;
        let refuse = SenderAuthPolicy { spf_refuse_fail: true, ..ENFORCE };
        let d = refuse.at_mail_from(Fail, "office.test");
        assert_eq!(d.spf_reply().unwrap().to_string(), "550 5.7.23 SPF validation failed: the sender's domain does not authorise this client\r\n");
        assert_eq!(d.rule, Rule::SpfFailRefused("SPF fail for office.test".into()));
        for other in [Pass, SoftFail, Neutral, None, TempError, PermError] {
            assert!(refuse.at_mail_from(other, "office.test").allow, "{other}");
        }
        assert!(ENFORCE.at_mail_from(Fail, "office.test").allow);
    }

    /// E1: the office's own clients are not checked; the checks can be switched off.
    #[test]
    fn own_clients_are_exempt_from_sender_authentication() {
        let l = lists();
        let p = policy(RelayMode::None, 15);
        assert_eq!(ENFORCE.exemption(&p, &client(&l, "127.0.0.99", None)), None);
        let mut authed = client(&l, "127.0.0.99", None);
        authed.authenticated = Some("sam".into());
        assert_eq!(ENFORCE.exemption(&p, &authed), Some(Rule::Authenticated("sam".into())));
        assert_eq!(ENFORCE.exemption(&p, &client(&l, "127.0.0.17", None)), Some(Rule::RelayList("127.0.0.16/30".into())));
        assert!(matches!(ENFORCE.exemption(&p, &client(&l, "127.0.0.99", Some(60))), Some(Rule::PopBeforeSmtp { .. })));
        let off = SenderAuthPolicy { checks: false, ..ENFORCE };
        assert_eq!(off.exemption(&p, &client(&l, "127.0.0.99", None)), Some(Rule::SenderAuthOff));
    }
}
