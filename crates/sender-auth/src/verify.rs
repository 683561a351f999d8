//! SPF, DKIM and DMARC checks of inbound mail (RFC 7208, 6376, 7489) and the one
//! Authentication-Results header (RFC 8601) that records them (SPEC E1).
//!
//! [`Verifier::spf`] judges the client at MAIL FROM (the MAIL FROM identity, and the HELO
//! identity as RFC 7208 §2.3 recommends); [`Verifier::check`] takes the whole message at the end
//! of DATA and adds DKIM and DMARC. The verdicts are plain data ([`Verdict`]): what to do with
//! them is the policy crate's decision, and the header is [`Verdict::header`].
//!
//! What it trusts: nothing in the message. How it fails: every lookup goes to the `[dns]`
//! servers with a deadline per query and one for the whole check; a DNS failure is a
//! `temperror` verdict, never a refusal of its own. Answers are cached for their TTL in caches
//! all sessions share.

mod cache;
pub mod header;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::dkim::DkimError;
use mail_auth::dmarc::{Dmarc, Policy};
use mail_auth::spf::Spf as SpfRecord;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, DmarcResult, DnsError, Error, MessageAuthenticator, ResolverCache, SpfOutput, SpfResult, Txt,
};
pub use policy::{AuthResult, DmarcPolicy, SenderAuthFacts};

use crate::resolver::{self, ResolverError};
use header::Statement;

/// The most one check may take, all lookups together (SPF alone may make ten in a row, RFC
/// 7208 §4.6.4). Past it the results not in are `temperror`.
pub const CHECK_DEADLINE: Duration = Duration::from_secs(20);

/// The checks, with their resolver and caches; cheap to clone, one per server.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    dns: MessageAuthenticator,
    caches: cache::Caches,
}

/// Who sent the message, as the SMTP session saw it.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub ip: IpAddr,
    /// The HELO/EHLO name.
    pub helo: &'a str,
    /// The MAIL FROM address; empty for the null sender `<>`.
    pub mail_from: &'a str,
    /// This server's name: the authserv-id, and `%{r}` in SPF macros.
    pub hostname: &'a str,
}

/// One SPF verdict and the domain it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpfVerdict {
    pub result: AuthResult,
    pub domain: String,
}

/// SPF for both identities (RFC 7208 §2.3, §2.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spf {
    /// The MAIL FROM identity; for the null sender, `postmaster@` the HELO name.
    pub mail_from: SpfVerdict,
    /// The HELO identity; `None` when the HELO name is an address literal or no domain name.
    pub helo: Option<SpfVerdict>,
}

/// One DKIM signature's verdict (RFC 6376 §6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkimVerdict {
    pub result: AuthResult,
    /// `d=` and `s=`; empty for a signature too broken to read them from.
    pub domain: String,
    pub selector: String,
    /// The first 8 characters of `b=` in base64 (RFC 6008), to tell signatures apart.
    pub b: String,
    /// Why it did not pass.
    pub reason: Option<String>,
}

/// The DMARC verdict for the RFC 5322 From domain (RFC 7489 §6.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmarcVerdict {
    pub result: AuthResult,
    /// The From domain; empty when the message has none to judge (no From, or several domains).
    pub domain: String,
    /// The policy that applies (`p=`, `sp=` for a subdomain); `None` without a usable record.
    pub policy: Option<DmarcPolicy>,
}

/// Every verdict on one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub spf: Spf,
    pub dkim: Vec<DkimVerdict>,
    pub dmarc: DmarcVerdict,
    /// The identities the checks were made for, for the header.
    pub mail_from: String,
    pub helo: String,
}

impl Verifier {
    /// A verifier that asks `servers` (the system's resolvers when empty). Reads configuration
    /// only: nothing is sent until a check is made.
    pub fn new(servers: &[SocketAddr]) -> Result<Self, ResolverError> {
        Ok(Verifier::with_authenticator(resolver::authenticator(servers)?))
    }

    pub fn with_authenticator(dns: MessageAuthenticator) -> Self {
        Verifier { inner: Arc::new(Inner { dns, caches: cache::Caches::default() }) }
    }

    /// SPF for the client at MAIL FROM.
    pub async fn spf(&self, client: &Client<'_>) -> Spf {
        let domain = mail_from_domain(client);
        match tokio::time::timeout(CHECK_DEADLINE, self.spf_now(client)).await {
            Ok(spf) => spf,
            Err(_) => Spf { mail_from: SpfVerdict { result: AuthResult::TempError, domain }, helo: None },
        }
    }

    async fn spf_now(&self, client: &Client<'_>) -> Spf {
        let (dns, caches) = (&self.inner.dns, &self.inner.caches);
        let helo = async {
            if !checkable_domain(client.helo) {
                return None;
            }
            let params = SpfParameters::verify_ehlo(client.ip, client.helo, client.hostname);
            Some(dns.check_host(caches.parameters(params)).await)
        };
        let mail_from = async {
            if client.mail_from.is_empty() {
                return None;
            }
            let params = SpfParameters::verify_mail_from(client.ip, client.helo, client.hostname, client.mail_from);
            Some(dns.check_host(caches.parameters(params)).await)
        };
        let (helo, mail_from) = tokio::join!(helo, mail_from);
        let helo = helo.map(|o| SpfVerdict { result: spf_result(o.result()), domain: o.domain().to_string() });
        // RFC 7208 §2.4: for the null sender the MAIL FROM identity is postmaster@HELO.
        let mail_from = match (mail_from, &helo) {
            (Some(o), _) => SpfVerdict { result: spf_result(o.result()), domain: o.domain().to_string() },
            (None, Some(h)) => h.clone(),
            (None, None) => SpfVerdict { result: AuthResult::None, domain: client.helo.to_string() },
        };
        Spf { mail_from, helo }
    }

    /// Every check on a complete message (as the client sent it, before any header of ours).
    /// `spf` is the verdict from MAIL FROM when it was made there, else SPF is checked now.
    pub async fn check(&self, client: &Client<'_>, spf: Option<Spf>, message: &[u8]) -> Verdict {
        let unfinished = |spf: Option<Spf>| Verdict {
            spf: spf.unwrap_or_else(|| Spf { mail_from: SpfVerdict { result: AuthResult::TempError, domain: mail_from_domain(client) }, helo: None }),
            dkim: Vec::new(),
            dmarc: DmarcVerdict { result: AuthResult::TempError, domain: String::new(), policy: None },
            mail_from: client.mail_from.to_string(),
            helo: client.helo.to_string(),
        };
        match tokio::time::timeout(CHECK_DEADLINE, self.check_now(client, spf.clone(), message)).await {
            Ok(verdict) => verdict,
            Err(_) => unfinished(spf),
        }
    }

    async fn check_now(&self, client: &Client<'_>, spf: Option<Spf>, message: &[u8]) -> Verdict {
        let (dns, caches) = (&self.inner.dns, &self.inner.caches);
        // Unparseable: no signatures, no From, nothing for DKIM and DMARC to judge.
        let parsed = AuthenticatedMessage::parse(message).unwrap_or_default();
        let spf_now = async {
            match spf {
                Some(spf) => spf,
                None => self.spf_now(client).await,
            }
        };
        let (spf, dkim) = tokio::join!(spf_now, dns.verify_dkim(caches.parameters(&parsed)));
        // RFC 7489 §4.1: DMARC takes SPF for the MAIL FROM domain (the HELO for the null sender).
        let spf_output = SpfOutput::new(spf.mail_from.domain.clone()).with_result(match spf.mail_from.result {
            AuthResult::Pass => SpfResult::Pass,
            AuthResult::Fail => SpfResult::Fail,
            AuthResult::SoftFail => SpfResult::SoftFail,
            AuthResult::Neutral => SpfResult::Neutral,
            AuthResult::None => SpfResult::None,
            AuthResult::TempError => SpfResult::TempError,
            AuthResult::PermError => SpfResult::PermError,
        });
        let dmarc = dns
            .verify_dmarc(caches.parameters(mail_auth::dmarc::verify::DmarcParameters::new(&parsed, &dkim, &spf.mail_from.domain, &spf_output)))
            .await;
        let dmarc = DmarcVerdict {
            result: match dmarc.result() {
                DmarcResult::Pass => AuthResult::Pass,
                DmarcResult::Fail(_) => AuthResult::Fail,
                DmarcResult::TempError(_) => AuthResult::TempError,
                DmarcResult::PermError(_) => AuthResult::PermError,
                DmarcResult::None => AuthResult::None,
            },
            domain: dmarc.domain().to_string(),
            policy: dmarc.dmarc_record().map(|_| match dmarc.policy() {
                Policy::Reject => DmarcPolicy::Reject,
                Policy::Quarantine => DmarcPolicy::Quarantine,
                Policy::None | Policy::Unspecified => DmarcPolicy::None,
            }),
        };
        Verdict { spf, dkim: dkim.iter().map(dkim_verdict).collect(), dmarc, mail_from: client.mail_from.to_string(), helo: client.helo.to_string() }
    }

    /// Put a record in the cache as if DNS had answered it (`None`: the name does not exist),
    /// for `ttl`. For measurements and tests that must not send a query.
    #[doc(hidden)]
    pub fn preload(&self, name: &str, record: Option<Record<'_>>, ttl: Duration) -> Result<(), Error> {
        let txt = match record {
            None => Txt::Error(Error::Dns(DnsError::RecordNotFound(mail_auth::hickory_resolver::proto::op::ResponseCode::NXDomain))),
            Some(Record::Spf(text)) => Txt::from(SpfRecord::parse(text.as_bytes())?),
            Some(Record::DkimKey(text)) => Txt::from(mail_auth::common::verify::DomainKey::parse(text.as_bytes())?),
            Some(Record::Dmarc(text)) => Txt::from(Dmarc::parse(text.as_bytes())?),
        };
        let mut key = name.to_ascii_lowercase();
        if !key.ends_with('.') {
            key.push('.');
        }
        self.inner.caches.txt.insert(key.into_boxed_str(), txt, std::time::Instant::now() + ttl);
        Ok(())
    }
}

/// A TXT record for [`Verifier::preload`].
#[doc(hidden)]
pub enum Record<'a> {
    Spf(&'a str),
    DkimKey(&'a str),
    Dmarc(&'a str),
}

impl Verdict {
    /// The facts the policy decides on.
    pub fn facts(&self) -> SenderAuthFacts {
        SenderAuthFacts {
            spf: self.spf.mail_from.result,
            spf_domain: self.spf.mail_from.domain.clone(),
            dkim: self.dkim.iter().map(|d| (d.result, d.domain.clone())).collect(),
            dmarc: self.dmarc.result,
            dmarc_domain: self.dmarc.domain.clone(),
            dmarc_policy: self.dmarc.policy,
        }
    }

    /// The one Authentication-Results header field, `authserv_id` naming this server (RFC 8601
    /// §2.5): SPF for MAIL FROM and HELO, each DKIM signature (or `dkim=none`), DMARC with the
    /// policy that applied.
    pub fn header(&self, authserv_id: &str) -> String {
        let mut statements = Vec::with_capacity(3 + self.dkim.len());
        let mail_from = if self.mail_from.is_empty() { "<>".to_string() } else { self.mail_from.clone() };
        statements.push(Statement {
            method: "spf",
            result: self.spf.mail_from.result.as_str(),
            reason: spf_reason(&self.spf.mail_from),
            properties: vec![("smtp.mailfrom", mail_from)],
        });
        if let Some(helo) = &self.spf.helo {
            statements.push(Statement {
                method: "spf",
                result: helo.result.as_str(),
                reason: spf_reason(helo),
                properties: vec![("smtp.helo", self.helo.clone())],
            });
        }
        if self.dkim.is_empty() {
            statements.push(Statement { method: "dkim", result: "none", reason: Some("no signature".into()), properties: vec![] });
        }
        for d in &self.dkim {
            let mut properties = Vec::new();
            if !d.domain.is_empty() {
                properties.push(("header.d", d.domain.clone()));
                properties.push(("header.s", d.selector.clone()));
            }
            if !d.b.is_empty() {
                properties.push(("header.b", d.b.clone()));
            }
            statements.push(Statement { method: "dkim", result: d.result.as_str(), reason: d.reason.clone(), properties });
        }
        let dmarc = &self.dmarc;
        statements.push(Statement {
            method: "dmarc",
            result: dmarc.result.as_str(),
            reason: dmarc.policy.map(|p| format!("p={}", p.as_str())),
            properties: if dmarc.domain.is_empty() { vec![] } else { vec![("header.from", dmarc.domain.clone())] },
        });
        header::render(authserv_id, &statements)
    }
}

/// A comment for an SPF result that says what it means.
fn spf_reason(v: &SpfVerdict) -> Option<String> {
    let d = &v.domain;
    Some(match v.result {
        AuthResult::Pass => format!("{d} designates the client as a permitted sender"),
        AuthResult::Fail => format!("{d} does not designate the client as a permitted sender"),
        AuthResult::SoftFail => format!("{d} does not designate the client, softly"),
        AuthResult::Neutral => format!("{d} makes no assertion about the client"),
        AuthResult::None => format!("no SPF record for {d}"),
        AuthResult::TempError => format!("DNS error looking up the SPF record of {d}"),
        AuthResult::PermError => format!("the SPF record of {d} cannot be used"),
    })
}

/// The MAIL FROM domain SPF judges (the HELO name for the null sender).
fn mail_from_domain(client: &Client<'_>) -> String {
    client.mail_from.rsplit_once('@').map_or(client.helo, |(_, d)| d).to_string()
}

/// A HELO name SPF can check: a domain name, not an address literal (RFC 7208 §2.3).
fn checkable_domain(name: &str) -> bool {
    !name.starts_with('[') && name.contains('.') && name.parse::<IpAddr>().is_err()
}

fn spf_result(r: SpfResult) -> AuthResult {
    match r {
        SpfResult::Pass => AuthResult::Pass,
        SpfResult::Fail => AuthResult::Fail,
        SpfResult::SoftFail => AuthResult::SoftFail,
        SpfResult::Neutral => AuthResult::Neutral,
        SpfResult::TempError => AuthResult::TempError,
        SpfResult::PermError => AuthResult::PermError,
        SpfResult::None => AuthResult::None,
    }
}

fn dkim_verdict(o: &DkimOutput<'_>) -> DkimVerdict {
    let (result, reason) = match o.result() {
        DkimResult::Pass => (AuthResult::Pass, None),
        // RFC 6376 §6.1.3: a body hash that does not verify is a failed signature (mail-auth
        // reports it as neutral).
        DkimResult::Neutral(Error::Dkim(DkimError::FailedBodyHashMatch)) => (AuthResult::Fail, Some("body hash did not verify".to_string())),
        DkimResult::Neutral(e) => (AuthResult::Neutral, Some(e.to_string())),
        DkimResult::Fail(e) => (AuthResult::Fail, Some(e.to_string())),
        DkimResult::PermError(e) => (AuthResult::PermError, Some(e.to_string())),
        DkimResult::TempError(e) => (AuthResult::TempError, Some(e.to_string())),
        DkimResult::None => (AuthResult::None, None),
    };
    let (domain, selector, b) = match o.signature() {
        Some(s) => (s.d.to_ascii_lowercase(), s.s.clone(), base64_prefix(&s.b)),
        None => Default::default(),
    };
    DkimVerdict { result, domain, selector, b, reason }
}

/// The first 8 base64 characters of a signature (RFC 6008 §4: `header.b`).
fn base64_prefix(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(&b[..b.len().min(6)])
}

#[cfg(test)]
mod tests;
