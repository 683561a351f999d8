//! The tokio driver: accepts connections, gathers the facts the policy needs (access lists,
//! POP login, blackhole lists, penalty box), enforces session limits and deadlines, performs
//! the session's actions (lookups, body chunks, the enqueue commit) and writes replies.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use directory::access::{AccessLists, ListCache};
use directory::mailbox;
use directory::penalty::PenaltyBox;
use directory::{LocalDomains, PasswordPool};
use dns::{Dns, RblAnswer};
use mail_framework::journal::{self, code};
use mail_framework::{Incoming, Queue};
use mail_proto::limits::SessionLimits;
use mail_proto::net::normalise_ip;
use mail_proto::{Address, LineEndings, Reply};
use store::{Durability, Store};
use tls::{ServerTls, Stream};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::policy::{ClientFacts, Decision, HeloVerify, ListenerAuth, RelayPolicy};
use crate::received::{Trace, received_header, submission_headers};
use crate::session::{Action, AuthOutcome, Event, Phase, RcptVerdict, Session, SessionConfig};

/// Settings of the SMTP server, from `[smtp]`, `[relay]` and the top level of the configuration.
#[derive(Clone, Debug)]
pub struct SmtpSettings {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// S4: concurrent sessions on the MX listener, in total and per client address.
    pub max_sessions: usize,
    pub max_sessions_per_ip: usize,
    /// S4: concurrent sessions on the submission and implicit-TLS listeners together.
    pub submission_max_sessions: usize,
    pub submission_max_sessions_per_ip: usize,
    /// S4: concurrent sessions on the local socket of `postroom sendmail` (F6).
    pub local_max_sessions: usize,
    /// A4: a local user may send as `user@local_sender_domain` (`sendmail`'s default sender).
    pub local_sender_domain: String,
    /// S4: from the greeting to HELO/EHLO; a client that never speaks is closed with 421 after it.
    pub greeting_timeout: Duration,
    /// S4: a session's whole life; past it the session gets 421 at the next command boundary.
    pub max_session: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub vrfy: bool,
    pub allow_bare_lf: bool,
    pub max_hops: usize,
    pub max_errors: u32,
    pub policy: RelayPolicy,
    /// `[smtp] auth` for the MX listener (A2); submission listeners always need AUTH.
    pub mx_auth: ListenerAuth,
    /// Credentials without TLS from loopback clients (`[tls] allow_plaintext_auth`).
    pub plaintext_auth_from_loopback: bool,
    pub tls_handshake_timeout: Duration,
    /// Offer DSN (RFC 3461, SPEC C4).
    pub dsn: bool,
    /// Dial-up domains whose mail waits for ETRN (C7).
    pub etrn_domains: mail_framework::outbound::EtrnDomains,
    /// E1: SPF, DKIM and DMARC on the MX listener (`[auth]`).
    pub sender_auth: policy::SenderAuthPolicy,
    /// Issue 21: greylisting at RCPT (`[greylist]`).
    pub greylist: policy::greylist::GreylistPolicy,
    /// Issue 21: the milters of each kind of listener (`[milter]`).
    pub milters: crate::milters::Milters,
}

/// Which kind of SMTP listener a connection came in on (S6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// MX-style: STARTTLS offered, AUTH as `[smtp] auth` says.
    Mx,
    /// Submission (RFC 6409): STARTTLS offered, AUTH required.
    Submission,
    /// Submission over implicit TLS (RFC 8314): AUTH required.
    Smtps,
    /// The local submission socket of `postroom sendmail` (F6).
    Local,
}

impl ListenerKind {
    /// The listener's name, as in `data_dir/listening` and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Mx => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Smtps => "smtps",
            ListenerKind::Local => "local",
        }
    }
}

/// What the SMTP server works with besides its settings.
#[derive(Clone)]
pub struct Services {
    pub queue: Queue,
    pub domains: LocalDomains,
    /// Needed only for blackhole lists and HELO checks; without it they fail open.
    pub dns: Option<Dns>,
    pub penalty: PenaltyBox,
    /// Without it no STARTTLS is offered and the implicit-TLS listener cannot run.
    pub tls: Option<ServerTls>,
    pub passwords: PasswordPool,
    /// Becomes true on SIGTERM (O3): sessions waiting for a command are closed with 421.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Below the storage threshold new mail is refused with 452 4.3.1 (F5).
    pub storage: mail_framework::storage::StorageGuard,
    /// E1: the SPF, DKIM and DMARC checks, their resolver and caches, shared by every session;
    /// without it nothing is checked.
    pub verifier: Option<sender_auth::verify::Verifier>,
}

/// Shared by every connection of every SMTP listener.
#[derive(Clone)]
pub struct SmtpServer {
    /// The settings of this session: taken from `live` when the connection is accepted, so a
    /// session keeps the settings it started with.
    settings: Arc<SmtpSettings>,
    /// The current settings, replaced by [`SmtpServer::update_settings`] (O6: SIGHUP).
    live: Arc<tokio::sync::watch::Sender<Arc<SmtpSettings>>>,
    services: Services,
    pools: SessionPools,
    lists: ListCache,
}

/// S4: one session pool per SMTP service, so that idle or hostile connections to one cannot
/// lock out another: the MX port (anonymous Internet traffic), submission (the submission and
/// implicit-TLS listeners together: one service for the same authenticated users over two
/// transports, as POP3 and POP3S share the POP3 pool) and the local socket. The listeners of
/// one kind (e.g. "0.0.0.0:25" and "[::1]:25") share their kind's pool.
#[derive(Clone)]
struct SessionPools {
    mx: SessionLimits,
    submission: SessionLimits,
    local: SessionLimits,
}

impl SessionPools {
    fn set_limits(&self, s: &SmtpSettings) {
        self.mx.set_limits(s.max_sessions, s.max_sessions_per_ip);
        self.submission.set_limits(s.submission_max_sessions, s.submission_max_sessions_per_ip);
        self.local.set_limits(s.local_max_sessions, s.local_max_sessions);
    }

    fn new(s: &SmtpSettings) -> Self {
        SessionPools {
            mx: SessionLimits::new(s.max_sessions, s.max_sessions_per_ip),
            submission: SessionLimits::new(s.submission_max_sessions, s.submission_max_sessions_per_ip),
            // Every local client is "127.0.0.1": the per-address limit is the total.
            local: SessionLimits::new(s.local_max_sessions, s.local_max_sessions),
        }
    }

    fn of(&self, kind: ListenerKind) -> &SessionLimits {
        match kind {
            ListenerKind::Mx => &self.mx,
            ListenerKind::Submission | ListenerKind::Smtps => &self.submission,
            ListenerKind::Local => &self.local,
        }
    }
}

impl SmtpServer {
    pub fn new(settings: SmtpSettings, services: Services) -> Self {
        let pools = SessionPools::new(&settings);
        let settings = Arc::new(settings);
        let live = Arc::new(tokio::sync::watch::Sender::new(settings.clone()));
        SmtpServer { settings, live, services, pools, lists: ListCache::default() }
    }

    /// New settings (O6: the configuration was reloaded): sessions accepted from now on use
    /// them, the open ones keep theirs; the session pools take the new sizes at once.
    pub fn update_settings(&self, settings: SmtpSettings) {
        self.pools.set_limits(&settings);
        self.live.send_replace(Arc::new(settings));
    }

    /// A handle for one new session, with the settings current now.
    fn for_session(&self) -> Self {
        SmtpServer { settings: self.live.borrow().clone(), ..self.clone() }
    }

    /// Issue 21: the greylisting settings in force now (the background expiry follows a reload).
    pub fn greylist_policy(&self) -> policy::greylist::GreylistPolicy {
        self.live.borrow().greylist
    }

    /// Sessions open now, on every SMTP listener and the local socket.
    pub fn active_sessions(&self) -> usize {
        self.pools.mx.active() + self.pools.submission.active() + self.pools.local.active()
    }

    /// Accept connections on `listener` until shutdown.
    pub async fn serve(self, listener: TcpListener, kind: ListenerKind) {
        accept::until_shutdown_accept(&listener, &self.services.shutdown, "smtp", |stream, peer| {
            let me = self.for_session();
            tokio::spawn(async move { me.connection(stream, peer, kind).await });
        })
        .await
    }

    fn store(&self) -> &Store {
        self.services.queue.store()
    }

    async fn connection(self, tcp: TcpStream, peer: SocketAddr, kind: ListenerKind) {
        let ip = normalise_ip(peer.ip());
        let local_ip = tcp.local_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let _ = tcp.set_nodelay(true);
        let hostname = self.settings.hostname.clone();
        let mut stream = Stream::Plain(tcp);
        // RFC 8314: on smtps, TLS first, within the handshake deadline.
        let implicit_tls = match (kind, &self.services.tls) {
            (ListenerKind::Smtps, Some(tls)) => Some((tls.acceptor(), self.settings.tls_handshake_timeout)),
            (ListenerKind::Smtps, None) => return,
            _ => None,
        };
        // S4: sessions in total and per client address on this listener's pool, counted from
        // the connect (a client still in its TLS handshake holds a slot, as one still to send
        // EHLO does).
        let Some(_slot) = self.pools.of(kind).take(ip) else {
            metrics::refusal("connect", "S4");
            let r = Reply::new(421, (7, 0), format!("{hostname} Error: too many connections, try again later"));
            stream.refuse(implicit_tls, &r.to_bytes(), self.settings.command_timeout).await;
            return;
        };
        let _session = metrics::session(kind.name());
        if let Some((acceptor, deadline)) = implicit_tls {
            stream = match stream.upgrade(acceptor, deadline).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(client = %ip, error = %e, "implicit TLS handshake failed");
                    return;
                }
            };
        }
        let record = match self.lists.client(self.store(), ip).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the access lists");
                let _ = stream
                    .write_all_within(
                        &Reply::new(421, (3, 0), format!("{hostname} Local error, try again later")).to_bytes(),
                        self.settings.command_timeout,
                    )
                    .await;
                return;
            }
        };
        let rbl_listed = self.rbl_check(ip, &record.lists).await;
        let facts = ClientFacts {
            ip,
            local_ip,
            lists: record.lists,
            pop_login_at: record.pop_login_at,
            now: store::now(),
            rbl_listed,
            penalised: self.services.penalty.denied(ip),
            authenticated: None,
            listener_auth: match kind {
                ListenerKind::Mx => self.settings.mx_auth,
                ListenerKind::Submission | ListenerKind::Smtps | ListenerKind::Local => ListenerAuth::LocalAndRelay,
            },
        };
        let decision = self.settings.policy.connect(&facts);
        metrics::decision("connect", decision.allow, &decision.rule);
        if let Some(reply) = decision.connect_reply(&hostname) {
            self.journal(code::SMTP_CONNECTION_REFUSED, ip, "", &decision.rule.to_string());
            let _ = stream.write_all_within(&reply.to_bytes(), self.settings.command_timeout).await;
            stream.shutdown_within(self.settings.command_timeout).await;
            return;
        }
        let config = self.session_config(kind, &facts, &stream);
        let owned = Arc::new(Mutex::new(Vec::new()));
        let sender = SenderSeen::default();
        let mut session = Session::new(config, ip.to_string())
            .with_sender_check(remember_sender(&sender, self.sender_check(&facts, owned.clone())))
            .with_submitter_check(submitter_check(owned.clone()));
        // E1: only the MX listener judges senders by what their domains publish.
        let checks = kind == ListenerKind::Mx && self.services.verifier.is_some();
        if checks && self.settings.sender_auth.spf_refuse_fail && self.settings.sender_auth.exemption(&self.settings.policy, &facts).is_none() {
            session = session.with_spf_at_mail();
        }
        self.drive(stream, facts, session, owned, sender, kind).await;
    }

    fn session_config(&self, kind: ListenerKind, facts: &ClientFacts, stream: &Stream) -> SessionConfig {
        let s = &self.settings;
        SessionConfig {
            hostname: s.hostname.clone(),
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            vrfy: s.vrfy,
            line_endings: if s.allow_bare_lf { LineEndings::NormaliseBareLf } else { LineEndings::Strict },
            max_hops: s.max_hops,
            max_errors: s.max_errors,
            verify_helo: s.policy.helo_verify != HeloVerify::Off && kind != ListenerKind::Local,
            starttls: self.services.tls.is_some() && matches!(kind, ListenerKind::Mx | ListenerKind::Submission),
            tls_active: stream.is_tls(),
            allow_plaintext_auth: policy::plaintext_auth(s.plaintext_auth_from_loopback, facts.ip).allow,
            require_auth: facts.listener_auth == ListenerAuth::LocalAndRelay,
            dsn: s.dsn,
            etrn: !s.etrn_domains.is_empty(),
        }
    }

    async fn drive(
        &self,
        mut stream: Stream,
        facts: ClientFacts,
        session: Session,
        owned: Arc<Mutex<Vec<String>>>,
        sender: SenderSeen,
        kind: ListenerKind,
    ) {
        // E1: as `connection` decided (only the MX listener checks senders).
        let checks = kind == ListenerKind::Mx && self.services.verifier.is_some();
        let ip = facts.ip;
        let milters = match kind {
            ListenerKind::Mx => self.settings.milters.mx.clone(),
            ListenerKind::Submission | ListenerKind::Smtps | ListenerKind::Local => self.settings.milters.submission.clone(),
        };
        let mut driver =
            Driver { server: self, facts, session, incoming: None, owned, sender, out: Vec::new(), checks, spf: None, held: None, kind, milters };
        if let Err(e) = driver.run(&mut stream).await {
            tracing::debug!(client = %ip, error = %e, "smtp session ended with an error");
        }
        if let Some(incoming) = driver.incoming.take() {
            incoming.abort().await;
        }
    }

    /// The local submission socket (F6, A4): `postroom sendmail` and `postroom send` talk SMTP
    /// here. The peer's uid identifies the submitting user, who counts as authenticated; a
    /// user other than root may send only as themself.
    pub async fn serve_local(self, listener: tokio::net::UnixListener) {
        let mut shutdown = self.services.shutdown.clone();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = accept::until_shutdown(&mut shutdown) => return,
            };
            let (stream, _) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "local submission accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = self.for_session();
            tokio::spawn(async move { me.local_connection(stream).await });
        }
    }

    async fn local_connection(self, unix: tokio::net::UnixStream) {
        let Ok(cred) = unix.peer_cred() else { return };
        let uid = cred.uid();
        let loopback = IpAddr::from([127, 0, 0, 1]);
        // S4: the local socket's own pool, taken before any work is done for the client.
        let Some(_slot) = self.pools.local.take(loopback) else {
            metrics::refusal("connect", "S4");
            let r = Reply::new(421, (7, 0), format!("{} Error: too many connections, try again later", self.settings.hostname));
            let mut stream = Stream::Unix(unix);
            let _ = stream.write_all_within(&r.to_bytes(), self.settings.command_timeout).await;
            stream.shutdown_within(self.settings.command_timeout).await;
            return;
        };
        let _session = metrics::session(ListenerKind::Local.name());
        // /etc/passwd is a file read: off the async workers.
        let user = tokio::task::spawn_blocking(move || crate::local::user_name(uid)).await.ok().flatten().unwrap_or_else(|| format!("uid{uid}"));
        let record = match self.lists.client(self.store(), loopback).await {
            Ok(r) => r,
            Err(_) => return,
        };
        let facts = ClientFacts {
            ip: loopback,
            local_ip: loopback,
            lists: record.lists,
            pop_login_at: None,
            now: store::now(),
            rbl_listed: None,
            penalised: None,
            authenticated: Some(user.clone()),
            listener_auth: ListenerAuth::LocalAndRelay,
        };
        // A4: the originator is the calling user: their own addresses, user@hostname,
        // user@local_sender_domain, or anything for root.
        let owned = crate::local::identities(self.store(), &user, &self.settings.hostname, &self.settings.local_sender_domain).await;
        let stream = Stream::Unix(unix);
        let config = self.session_config(ListenerKind::Local, &facts, &stream);
        let (storage, identities, local_user) = (self.services.storage.clone(), owned.clone(), user.clone());
        let check: crate::session::SenderCheck = Box::new(move |from, _| {
            policy::storage(storage.is_low())
                .storage_reply()
                .or_else(|| policy::local_sender(&local_user, uid == 0, &identities, from).local_sender_reply())
        });
        let sender = SenderSeen::default();
        let owned = Arc::new(Mutex::new(owned));
        let session = Session::new(config, format!("local uid {uid}"))
            .with_sender_check(remember_sender(&sender, check))
            .with_submitter_check(submitter_check(owned.clone()))
            .authenticated_as(&user);
        self.drive(stream, facts, session, owned, sender, ListenerKind::Local).await;
    }

    /// Query every blackhole list zone at once (R4); errors fail open and are journaled.
    async fn rbl_check(&self, ip: IpAddr, lists: &AccessLists) -> Option<(String, Ipv4Addr)> {
        if lists.rbl.is_empty() {
            return None;
        }
        let Some(dns) = &self.services.dns else {
            self.journal(code::SMTP_RBL_ERROR, ip, "", "no DNS resolver could be set up; blackhole lists skipped");
            return None;
        };
        let mut queries = tokio::task::JoinSet::new();
        for zone in &lists.rbl {
            let (dns, zone) = (dns.clone(), zone.clone());
            queries.spawn(async move { (dns.rbl(ip, &zone).await, zone) });
        }
        let mut listed = None;
        while let Some(done) = queries.join_next().await {
            match done {
                Ok((RblAnswer::Listed(answer), zone)) => {
                    listed.get_or_insert((zone, answer));
                }
                Ok((RblAnswer::NotListed, _)) => {}
                Ok((RblAnswer::Error(e), _)) => self.journal(code::SMTP_RBL_ERROR, ip, "", &format!("{e}; client let in (fail open)")),
                Err(e) => tracing::warn!(error = %e, "blackhole list query task failed"),
            }
        }
        listed
    }

    /// MAIL FROM against the kill list (R8) and the authenticated user's addresses (A3, in
    /// `owned`, filled in when AUTH succeeds); journaled when it refuses.
    fn sender_check(&self, facts: &ClientFacts, owned: Arc<Mutex<Vec<String>>>) -> crate::session::SenderCheck {
        let (facts, me) = (facts.clone(), self.clone());
        Box::new(move |from: Option<&Address>, user: Option<&str>| {
            if let Some(reply) = policy::storage(me.services.storage.is_low()).storage_reply() {
                metrics::refusal("sender", "F5");
                return Some(reply);
            }
            let facts = ClientFacts { authenticated: user.map(str::to_string), ..facts.clone() };
            let decision = me.settings.policy.sender(&facts, from, &owned.lock().expect("owned addresses"));
            metrics::decision("sender", decision.allow, &decision.rule);
            let reply = decision.sender_reply()?;
            me.journal_sender(facts.ip, &from.map(Address::to_string).unwrap_or_default(), &decision);
            Some(reply)
        })
    }

    fn journal_sender(&self, ip: IpAddr, sender: &str, decision: &Decision) {
        let (store, ip, sender, rule) = (self.store().clone(), ip.to_string(), sender.to_string(), decision.rule.to_string());
        tokio::spawn(async move {
            let _ = store
                .write(Durability::Normal, move |c| {
                    Ok(journal::append(
                        c,
                        &journal::Entry { code: code::SMTP_REJECTED, originator: &sender, ip: &ip, detail: &rule, ..Default::default() },
                    )?)
                })
                .await;
        });
    }

    /// A journal row without holding up the session; no fsync of its own.
    fn journal(&self, code: &'static str, ip: IpAddr, recipient: &str, detail: &str) {
        self.journal_from(code, ip, "", recipient, detail);
    }

    /// A journal row with its envelope sender (`from=`).
    fn journal_from(&self, code: &'static str, ip: IpAddr, originator: &str, recipient: &str, detail: &str) {
        let (store, ip, originator, recipient, detail) =
            (self.store().clone(), ip.to_string(), originator.to_string(), recipient.to_string(), detail.to_string());
        tokio::spawn(async move {
            let r = store
                .write(Durability::Normal, move |c| {
                    let entry =
                        journal::Entry { code, originator: &originator, recipient: &recipient, ip: &ip, detail: &detail, ..Default::default() };
                    Ok(journal::append(c, &entry)?)
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "journal write failed");
            }
        });
    }
}

struct Driver<'a> {
    server: &'a SmtpServer,
    facts: ClientFacts,
    session: Session,
    incoming: Option<Incoming>,
    /// The authenticated user's addresses, for sender verification (A3).
    owned: Arc<Mutex<Vec<String>>>,
    /// The MAIL FROM of the open transaction, for the journal rows of its refused recipients.
    sender: SenderSeen,
    out: Vec<u8>,
    /// E1: this session's messages are checked (the MX listener with a verifier), unless the
    /// client is exempt when DATA starts.
    checks: bool,
    /// E1: the SPF verdict from MAIL FROM, and the sender it is for.
    spf: Option<(String, sender_auth::verify::Spf)>,
    /// E1: the message being checked, held until its verdict is known (the header of the
    /// verdict goes first, and a refused message is never stored).
    held: Option<Held>,
    kind: ListenerKind,
    /// Issue 21: the milters of this session's listener, in order.
    milters: Vec<milter::client::Milter>,
}

/// A message held back for the checks: the Received field to write, and the message as the
/// client sent it.
struct Held {
    received: String,
    helo: String,
    message: Vec<u8>,
    /// E1: the sender-authentication checks apply (else only the milters hold it).
    auth: bool,
    /// E1: the Authentication-Results field, which goes on top.
    results: String,
}

/// Why a held message is not stored.
enum Stop {
    /// This reply takes the place of 250.
    Refused(Reply),
    /// A milter discarded it: 250 all the same.
    Discarded,
}

/// The sender of the last MAIL FROM the session checked. The session refuses a nested MAIL
/// before the check, and a RCPT without a transaction, so when a RCPT is checked this is the
/// transaction's sender (empty for the null sender `<>`, as in the 94 rows).
type SenderSeen = Arc<Mutex<String>>;

/// `check`, also noting the sender it is asked about in `seen`.
fn remember_sender(seen: &SenderSeen, check: crate::session::SenderCheck) -> crate::session::SenderCheck {
    let seen = seen.clone();
    Box::new(move |from: Option<&Address>, user: Option<&str>| {
        *seen.lock().expect("sender seen") = from.map(Address::to_string).unwrap_or_default();
        check(from, user)
    })
}

/// An incoming message whose chunk write failed: DATA is still read to its end, then 451.
const STORE_FAILED: &str = "store write failed";

impl Driver<'_> {
    async fn run(&mut self, stream: &mut Stream) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut actions = self.session.handle(Event::Connected);
        let mut progress = u64::MAX;
        let mut phase = Phase::Command;
        let mut deadline = Instant::now();
        let mut store_failed = false;
        let mut shutdown = self.server.services.shutdown.clone();
        // S4: a client has greeting_timeout from the greeting to its first accepted HELO/EHLO
        // (commands before it do not extend it), and the session max_session in all; both end
        // the session only between commands, never in DATA.
        let started = Instant::now();
        // A configured number of seconds too large for the clock means "never".
        let after = |d: Duration| started.checked_add(d).unwrap_or_else(|| started + Duration::from_secs(1 << 30));
        let greeting_deadline = after(self.server.settings.greeting_timeout);
        let lifetime_end = after(self.server.settings.max_session);
        let mut greeted = false;
        loop {
            let mut hang_up = false;
            let mut pending: std::collections::VecDeque<Action> = actions.into();
            while let Some(action) = pending.pop_front() {
                match action {
                    Action::Reply(r) => self.out.extend_from_slice(&r.to_bytes()),
                    Action::CheckHelo(name) => {
                        let verdict = self.check_helo(&name).await;
                        pending.extend(self.session.handle(Event::HeloChecked(verdict)));
                    }
                    Action::CheckRcpt(addr) => {
                        let verdict = self.check_rcpt(&addr).await;
                        pending.extend(self.session.handle(Event::RcptChecked(verdict)));
                    }
                    Action::Penalize => {
                        if self.penalize() {
                            // R9: the client reads the refusal that comes with the penalty (the
                            // next action), then the connection ends; nothing else it sent runs.
                            if let Some(Action::Reply(r)) = pending.pop_front() {
                                self.out.extend_from_slice(&r.to_bytes());
                            }
                            hang_up = true;
                        }
                    }
                    Action::StartTls => {
                        stream.write_all_within(&self.out, self.server.settings.command_timeout).await?;
                        self.out.clear();
                        let Some(tls) = &self.server.services.tls else { return Ok(()) };
                        let plain = std::mem::replace(stream, Stream::Broken);
                        *stream = plain.upgrade(tls.acceptor(), self.server.settings.tls_handshake_timeout).await?;
                        pending.extend(self.session.handle(Event::TlsUp));
                    }
                    Action::Etrn(node) => {
                        let reply = self.etrn(&node).await;
                        pending.extend(self.session.handle(Event::EtrnDone(reply)));
                    }
                    Action::VerifyPassword { user, password } => {
                        let outcome = self.verify_password(&user, &password).await;
                        pending.extend(self.session.handle(Event::AuthDone(outcome)));
                    }
                    Action::BeginData { helo, esmtp, single_rcpt, auth } => {
                        let s = &self.server.settings;
                        let mut incoming = self.server.services.queue.incoming();
                        let (ip, tls) = (self.facts.ip.to_string(), stream.tls_description());
                        let header = received_header(&Trace {
                            helo: &helo,
                            ip: &ip,
                            hostname: &s.hostname,
                            esmtp,
                            tls: tls.as_deref(),
                            auth: auth.as_deref(),
                            qid: incoming.qid(),
                            single_rcpt: single_rcpt.as_deref(),
                            now: store::now(),
                        });
                        let auth = self.checks && s.sender_auth.exemption(&s.policy, &self.facts_now()).is_none();
                        if auth || !self.milters.is_empty() {
                            self.held = Some(Held { received: header, helo, message: Vec::new(), auth, results: String::new() });
                        } else {
                            self.held = None;
                            store_failed = incoming.push(header.as_bytes()).await.is_err();
                        }
                        self.incoming = Some(incoming);
                    }
                    Action::AddHeaders { message_id, date } => {
                        // S3: in order with the message bytes, as the session placed them.
                        if let (Some(incoming), false) = (self.incoming.as_mut(), store_failed) {
                            let headers = submission_headers(message_id, date, incoming.qid(), &self.server.settings.hostname, store::now());
                            match self.held.as_mut() {
                                Some(held) => held.message.extend_from_slice(headers.as_bytes()),
                                None => store_failed = incoming.push(headers.as_bytes()).await.is_err(),
                            }
                        }
                    }
                    Action::BodyChunk(bytes) if self.held.is_some() => {
                        self.held.as_mut().expect("held").message.extend_from_slice(&bytes);
                    }
                    Action::BodyChunk(bytes) => {
                        if let (Some(incoming), false) = (self.incoming.as_mut(), store_failed) {
                            store_failed = incoming.push(&bytes).await.is_err();
                        }
                    }
                    Action::Enqueue(mut envelope) if self.held.is_some() => {
                        let mut held = self.held.take().expect("held");
                        let mut checked = if held.auth { self.sender_auth(&mut held, &envelope).await.map_err(Stop::Refused) } else { Ok(()) };
                        if checked.is_ok() && !self.milters.is_empty() && !store_failed {
                            checked = self.milters(&mut held, &mut envelope).await;
                        }
                        match checked {
                            Ok(()) => {
                                store_failed |= self.store_held(held).await;
                                pending.push_front(Action::Enqueue(envelope));
                            }
                            Err(stop) => {
                                let qid = self.incoming.as_ref().map(|i| i.qid().to_string()).unwrap_or_default();
                                if let Some(incoming) = self.incoming.take() {
                                    incoming.abort().await;
                                }
                                store_failed = false;
                                let event = match stop {
                                    Stop::Refused(reply) => Event::DataRefused(reply),
                                    Stop::Discarded => Event::EnqueueDone(Ok(qid)),
                                };
                                pending.extend(self.session.handle(event));
                            }
                        }
                    }
                    Action::CheckSpf(from) => {
                        let verdict = self.check_spf(from.as_ref()).await;
                        pending.extend(self.session.handle(Event::SpfChecked(verdict)));
                    }
                    Action::Enqueue(envelope) => {
                        let result = match (self.incoming.take(), store_failed) {
                            (Some(incoming), false) => incoming.commit(envelope).await.map_err(|e| e.to_string()),
                            (Some(incoming), true) => {
                                incoming.abort().await;
                                Err(STORE_FAILED.to_string())
                            }
                            (None, _) => Err(STORE_FAILED.to_string()),
                        };
                        if let Err(e) = &result {
                            tracing::error!(client = %self.facts.ip, error = %e, "enqueue failed; answered 451");
                        }
                        if result.is_ok() {
                            metrics::message_received();
                        }
                        pending.extend(self.session.handle(Event::EnqueueDone(result)));
                    }
                    Action::AbortData => {
                        self.held = None;
                        if let Some(incoming) = self.incoming.take() {
                            incoming.abort().await;
                        }
                        store_failed = false;
                    }
                    Action::Close => hang_up = true,
                }
                if hang_up {
                    break;
                }
            }
            if !self.out.is_empty() {
                stream.write_all_within(&self.out, self.server.settings.command_timeout).await?;
                self.out.clear();
            }
            if hang_up {
                stream.shutdown_within(self.server.settings.command_timeout).await;
                return Ok(());
            }
            // S4: the command deadline restarts only when a command completes, so a trickle of
            // bytes cannot extend it; DATA has one deadline for the whole message.
            let now_phase = self.session.phase();
            if now_phase != phase || (phase == Phase::Command && self.session.progress() != progress) {
                let s = &self.server.settings;
                deadline = Instant::now() + if now_phase == Phase::Data { s.data_timeout } else { s.command_timeout };
                phase = now_phase;
                progress = self.session.progress();
            }
            // O3: on shutdown a session between commands is told so; one in DATA may finish.
            let between_commands = self.session.phase() == Phase::Command;
            greeted |= self.session.helo().is_some();
            let mut read_deadline = deadline;
            if between_commands {
                // S4: a session that outlived max_session (say, in a long DATA) ends here, at
                // the first command boundary, before anything more is read.
                if Instant::now() >= lifetime_end {
                    return self.time_up(stream, "session lifetime exceeded").await;
                }
                read_deadline = read_deadline.min(lifetime_end);
                if !greeted {
                    read_deadline = read_deadline.min(greeting_deadline);
                }
            }
            let read = tokio::select! {
                r = tokio::time::timeout_at(read_deadline, stream.read(&mut buf)) => r,
                _ = accept::until_shutdown(&mut shutdown), if between_commands => return self.last_command(stream, &mut buf).await,
            };
            actions = match read {
                Err(_) if between_commands && Instant::now() >= lifetime_end => {
                    return self.time_up(stream, "session lifetime exceeded").await;
                }
                Err(_) if between_commands && !greeted && Instant::now() >= greeting_deadline => {
                    return self.time_up(stream, "timeout exceeded waiting for HELO/EHLO").await;
                }
                Err(_) => self.session.handle(Event::Timeout),
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => self.session.handle(Event::Bytes(&buf[..n])),
                Ok(Err(e)) => return Err(e),
            };
        }
    }

    /// O3: the server is shutting down and the session is between commands. The client may have
    /// sent its next command already (say, QUIT right after the 250 of a message that finished
    /// during the shutdown), or send it within [`LAST_COMMAND`]: a QUIT is answered 221, as RFC
    /// 5321 §4.1.1.10 requires; any other command, or silence, gets 421 4.3.2 (§3.8) and the
    /// connection closes.
    async fn last_command(&self, stream: &mut Stream, buf: &mut [u8]) -> std::io::Result<()> {
        let s = &self.server.settings;
        let until = Instant::now() + LAST_COMMAND;
        let mut line = Vec::new();
        let quit = loop {
            if let Some(end) = line.iter().position(|&b| b == b'\n') {
                break is_quit(&line[..end]);
            }
            if line.len() > 512 {
                break false;
            }
            match tokio::time::timeout_at(until, stream.read(buf)).await {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => line.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return Err(e),
                Err(_) => break false,
            }
        };
        let bye = if quit {
            Reply::new(221, (0, 0), format!("{} Bye", s.hostname))
        } else {
            Reply::new(421, (3, 2), format!("{} Service shutting down, try again later", s.hostname))
        };
        stream.write_all_within(&bye.to_bytes(), s.command_timeout).await?;
        stream.shutdown_within(s.command_timeout).await;
        Ok(())
    }

    /// S4: the greeting deadline or the session lifetime is over: 421 4.4.2 and close. Only
    /// between commands, so no message in DATA is ever cut.
    async fn time_up(&self, stream: &mut Stream, why: &str) -> std::io::Result<()> {
        let command_timeout = self.server.settings.command_timeout;
        tracing::debug!(client = %self.facts.ip, "{why}: session closed");
        let bye = Reply::new(421, (4, 2), format!("{} Error: {why}, closing connection", self.server.settings.hostname));
        stream.write_all_within(&bye.to_bytes(), command_timeout).await?;
        stream.shutdown_within(command_timeout).await;
        Ok(())
    }

    /// The facts the policy decides on, as they are now: the facts gathered at connect, with
    /// the user this session authenticated as and the current time.
    fn facts_now(&self) -> ClientFacts {
        ClientFacts { authenticated: self.session.authenticated().map(str::to_string), now: store::now(), ..self.facts.clone() }
    }

    /// R9: deny the client's address for a while, unless it is exempt (relay-listed, or
    /// authenticated in this session) or auto-deny is off; true = hang up now.
    fn penalize(&self) -> bool {
        let s = self.server;
        if s.settings.policy.exempt_from_penalty(&self.facts_now()) || !s.services.penalty.deny(self.facts.ip) {
            return false;
        }
        s.journal(code::SMTP_HACK_DENY, self.facts.ip, "", "command line beyond the limits: put on the temporary deny list (R9)");
        true
    }

    /// A1 with A5: reserve the attempt in the penalty box (refused during a cool-down; one check
    /// per address, or per user on relay-listed networks, at a time), verify on the argon2 pool
    /// within the client's share, count failures and journal them.
    async fn verify_password(&self, user: &str, password: &str) -> AuthOutcome {
        let s = self.server;
        let relay_listed = self.facts.lists.relay_match(self.facts.ip).is_some();
        let offender = PenaltyBox::offender(self.facts.ip, user, relay_listed);
        let attempt = match s.services.penalty.reserve_login(offender).await {
            Ok(attempt) => attempt,
            Err(throttled) => {
                s.journal(code::SMTP_AUTH_FAILED, self.facts.ip, user, &format!("login {}", throttled.describe()));
                return AuthOutcome::TempFail;
            }
        };
        let passwords = s.services.passwords.for_client(attempt.offender().clone());
        match mailbox::authenticate(s.store(), &passwords, user, password, directory::mailbox::LoginFor::Send).await {
            Ok(Some(login)) => {
                attempt.succeeded();
                let addresses = mailbox::addresses(s.store(), login.id).await.unwrap_or_default();
                *self.owned.lock().expect("owned addresses") = addresses;
                AuthOutcome::Ok(login.name)
            }
            Ok(None) => {
                let locked = attempt.failed();
                let note = if locked { "failed login; cool-down started (A5)" } else { "failed login (A5)" };
                s.journal(code::SMTP_AUTH_FAILED, self.facts.ip, user, note);
                AuthOutcome::Failed
            }
            Err(e) => {
                attempt.not_checked();
                tracing::warn!(error = %e, "password check failed");
                AuthOutcome::TempFail
            }
        }
    }

    /// RFC 1985 ETRN (C7): a client that may relay (listed or authenticated) starts delivery of
    /// the mail held for one of our dial-up domains.
    async fn etrn(&self, node: &str) -> Reply {
        if let Some(queue) = node.strip_prefix('#') {
            return Reply::new(458, (0, 0), format!("Unable to queue messages for node #{queue}: queue names are not supported"));
        }
        let (domain, subdomains) = match node.strip_prefix('@') {
            Some(d) => (d.to_ascii_lowercase(), true),
            None => (node.to_ascii_lowercase(), false),
        };
        let decision = self.server.settings.policy.etrn(&self.facts_now(), &domain, self.server.settings.etrn_domains.contains(&domain));
        metrics::decision("etrn", decision.allow, &decision.rule);
        if let Some(reply) = decision.etrn_reply(node) {
            self.server.journal(code::SMTP_REJECTED, self.facts.ip, node, &format!("ETRN refused: {}", decision.rule));
            return reply;
        }
        let d = domain.clone();
        match self.server.store().write(Durability::Full, move |c| mail_framework::message::outbound::release_etrn(c, &d, subdomains)).await {
            Ok(0) => Reply::plain(251, format!("OK, no messages waiting for node {node}")),
            Ok(n) => Reply::plain(253, format!("OK, {n} pending messages for node {node} started")),
            Err(e) => {
                tracing::error!(error = %e, "ETRN release failed");
                Reply::new(458, (3, 0), format!("Unable to queue messages for node {node}"))
            }
        }
    }

    /// R10: resolve the HELO name and let the policy judge it. An address literal is compared
    /// with the client's address by the policy, never looked up.
    async fn check_helo(&self, name: &str) -> Option<Reply> {
        let answer = match &self.server.services.dns {
            _ if policy::helo_address_literal(name).is_some() => dns::AddressAnswer::NotFound,
            Some(dns) => dns.addresses(name).await,
            None => dns::AddressAnswer::Error("no DNS resolver".into()),
        };
        let decision = self.server.settings.policy.helo(&self.facts, name, &answer);
        metrics::decision("helo", decision.allow, &decision.rule);
        use crate::policy::Rule;
        if matches!(decision.rule, Rule::HeloMismatch { .. } | Rule::HeloLiteralMismatch { .. } | Rule::HeloLookupFailed(_)) {
            self.server.journal(code::SMTP_HELO_MISMATCH, self.facts.ip, "", &decision.rule.to_string());
        }
        decision.helo_reply()
    }

    /// E1, RFC 7208 §8.4: SPF at MAIL FROM; a fail is refused when `[auth] spf_refuse_fail`
    /// says so. The verdict is kept for the end of DATA.
    async fn check_spf(&mut self, from: Option<&Address>) -> Option<Reply> {
        let s = self.server;
        let verifier = s.services.verifier.as_ref()?;
        let mail_from = from.map(Address::to_string).unwrap_or_default();
        let helo = self.session.helo().map(|(h, _)| h.to_string()).unwrap_or_default();
        let client = sender_auth::verify::Client { ip: self.facts.ip, helo: &helo, mail_from: &mail_from, hostname: &s.settings.hostname };
        let spf = verifier.spf(&client).await;
        let decision = s.settings.sender_auth.at_mail_from(spf.mail_from.result, &spf.mail_from.domain);
        metrics::decision("spf", decision.allow, &decision.rule);
        self.spf = Some((mail_from.clone(), spf));
        let reply = decision.spf_reply()?;
        s.journal_from(code::SMTP_REJECTED, self.facts.ip, &mail_from, "", &decision.rule.to_string());
        Some(reply)
    }

    /// E1: SPF, DKIM and DMARC on the held message, and the policy's decision. Accepted: the
    /// Authentication-Results field is held for the top and the message loses the results
    /// fields that claim our name (RFC 8601 §5); into the quarantine when the decision says so.
    /// Refused: the reply that takes the place of 250; nothing was stored.
    async fn sender_auth(&mut self, held: &mut Held, envelope: &mail_framework::Envelope) -> Result<(), Reply> {
        let s = self.server;
        let verifier = s.services.verifier.as_ref().expect("checks need a verifier");
        let client =
            sender_auth::verify::Client { ip: self.facts.ip, helo: &held.helo, mail_from: &envelope.mail_from, hostname: &s.settings.hostname };
        let spf = self.spf.take().filter(|(from, _)| *from == envelope.mail_from).map(|(_, spf)| spf);
        let verdict = verifier.check(&client, spf, &held.message).await;
        let decision = s.settings.sender_auth.at_end_of_data(&verdict.facts());
        metrics::decision("sender-auth", decision.allow, &decision.rule);
        let recipients = envelope.recipients.join(",");
        if let Some(reply) = decision.data_reply() {
            s.journal_from(code::SMTP_REJECTED, self.facts.ip, &envelope.mail_from, &recipients, &decision.rule.to_string());
            return Err(reply);
        }
        let Some(incoming) = self.incoming.as_mut() else { return Ok(()) };
        s.journal_from(code::SMTP_SENDER_AUTH, self.facts.ip, &envelope.mail_from, &recipients, &format!("{}: {}", incoming.qid(), decision.rule));
        if let Some(reason) = decision.quarantine_reason() {
            incoming.quarantine(reason);
        }
        held.results = verdict.header(&s.settings.hostname);
        held.message = sender_auth::verify::header::strip_own(&held.message, &s.settings.hostname).into_owned();
        Ok(())
    }

    /// Issue 21: the listener's milters on the held message, in order, after the sender
    /// authentication (they see its Authentication-Results field, not our Received field).
    /// Their header and body changes are applied to the held bytes, their recipient changes
    /// to `envelope`; a quarantine marks the `Incoming`. Each milter's verdict is journaled.
    async fn milters(&mut self, held: &mut Held, envelope: &mut mail_framework::Envelope) -> Result<(), Stop> {
        let s = self.server;
        let Some(incoming) = self.incoming.as_mut() else { return Ok(()) };
        let ip = self.facts.ip;
        let view = [held.results.as_bytes(), &held.message].concat();
        let (headers, body) = crate::milters::split(&view);
        let mut macros = vec![
            ("j".to_string(), s.settings.hostname.clone()),
            ("daemon_name".to_string(), self.kind.name().to_string()),
            ("daemon_addr".to_string(), self.facts.local_ip.to_string()),
            ("v".to_string(), "Postroom".to_string()),
            ("_".to_string(), format!("[{ip}] [{ip}]")),
            ("i".to_string(), incoming.qid().to_string()),
        ];
        if let Some(user) = self.session.authenticated() {
            macros.push(("auth_authen".to_string(), user.to_string()));
        }
        let message = milter::Message {
            client: Some(milter::Client { hostname: format!("[{ip}]"), address: milter::ClientAddress::Inet { ip, port: 0 } }),
            helo: held.helo.clone(),
            mail_from: envelope.mail_from.clone(),
            mail_params: Vec::new(),
            recipients: envelope.recipients.iter().map(|r| milter::Recipient { address: r.clone(), params: Vec::new() }).collect(),
            headers,
            body,
            macros,
        };
        let limit = usize::try_from(s.settings.max_message_size).unwrap_or(usize::MAX);
        let run = crate::milters::run(&self.milters, message, limit).await;
        let recipients = envelope.recipients.join(",");
        for detail in &run.journal {
            s.journal_from(code::SMTP_MILTER, ip, &envelope.mail_from, &recipients, &format!("{}: {detail}", incoming.qid()));
        }
        match run.end {
            crate::milters::End::Refuse(reply) => {
                let detail = format!("{}: refused by a milter: {}", incoming.qid(), reply.to_string().trim_end());
                s.journal_from(code::SMTP_REJECTED, ip, &envelope.mail_from, &recipients, &detail);
                return Err(Stop::Refused(reply));
            }
            crate::milters::End::Discard => return Err(Stop::Discarded),
            crate::milters::End::Quarantine(reason) => incoming.quarantine(reason),
            crate::milters::End::Pass => {}
        }
        // Recipients added and removed; their DSN parameters follow them (new ones have none).
        let now: Vec<String> = run.message.recipients.iter().map(|r| r.address.clone()).collect();
        if now != envelope.recipients {
            if !envelope.dsn.recipients.is_empty() {
                let old: Vec<(String, mail_framework::RcptDsn)> =
                    envelope.recipients.iter().cloned().zip(envelope.dsn.recipients.iter().cloned()).collect();
                envelope.dsn.recipients =
                    now.iter().map(|r| old.iter().find(|(a, _)| a.eq_ignore_ascii_case(r)).map(|(_, d)| d.clone()).unwrap_or_default()).collect();
            }
            envelope.recipients = now;
        }
        if run.content_changed {
            // Our Received field stays right below our Authentication-Results field if that is
            // still there, else on top (a milter's insertion at 0 lands above it).
            let results = crate::milters::split(held.results.as_bytes()).0;
            let at = results.first().and_then(|f| run.message.headers.iter().position(|h| h == f)).map_or(0, |i| i + 1);
            held.message = crate::milters::join(&run.message.headers, &run.message.body, &held.received, at);
            held.results.clear();
            held.received.clear();
        }
        Ok(())
    }

    /// The held message into the store: the Authentication-Results field (if any), the Received
    /// field, the message. True when a store write failed.
    async fn store_held(&mut self, held: Held) -> bool {
        let Some(incoming) = self.incoming.as_mut() else { return true };
        for part in [held.results.as_bytes(), held.received.as_bytes(), &held.message] {
            if incoming.push(part).await.is_err() {
                return true;
            }
        }
        false
    }

    /// The policy's RCPT decision (relay-trick screen, directory lookup, relay rules), on a
    /// store reader; refusals are journaled with the rule (R3).
    async fn check_rcpt(&self, addr: &Address) -> RcptVerdict {
        let s = self.server;
        let facts = self.facts_now();
        let (settings, domains, a) = (s.settings.clone(), s.services.domains.clone(), addr.clone());
        let outcome = s
            .store()
            .read(move |conn| {
                settings.policy.rcpt(&facts, &a, |target| domains.resolve(conn, target)).map_err(|e| store::StoreError::Invalid(e.to_string()))
            })
            .await;
        if let Ok(o) = &outcome {
            metrics::decision("rcpt", o.decision.allow, &o.decision.rule);
        }
        match outcome {
            Err(e) => {
                tracing::error!(error = %e, "recipient lookup failed");
                RcptVerdict::Refuse(Reply::new(451, (3, 0), "Temporary lookup failure, try again later"))
            }
            Ok(o) if !o.decision.allow => self.refuse(addr, &o.decision),
            Ok(o) => {
                // Issue 21: only mail that would be accepted is greylisted (an unknown user
                // still gets 550, without a triplet recorded for it).
                if let Some(reply) = self.greylist(o.record_as.as_ref().unwrap_or(addr)).await {
                    return RcptVerdict::Refuse(reply);
                }
                o.record_as.map_or(RcptVerdict::Accept, RcptVerdict::AcceptAs)
            }
        }
    }

    /// Issue 21: greylisting of an accepted recipient. Submission listeners and the local socket
    /// authenticate every client, which exempts them, so in effect only MX clients that are not
    /// the office's own are greylisted. The triplet's records are read, decided on and written
    /// in one request to the store's writer (no two sessions both see a triplet as new), at
    /// synchronous=NORMAL: a record lost in a power cut only means one more delay. A store
    /// failure lets the recipient through: greylisting is a filter, not a reason to refuse.
    async fn greylist(&self, recipient: &Address) -> Option<Reply> {
        let s = self.server;
        let (grey, facts) = (s.settings.greylist, self.facts_now());
        if let Some(rule) = grey.exemption(&s.settings.policy, &facts, recipient) {
            if grey.enabled {
                metrics::greylist("exempt");
                tracing::trace!(client = %facts.ip, %rule, "not greylisted");
            }
            return None;
        }
        let sender = self.sender.lock().expect("sender seen").clone();
        let triplet = policy::greylist::triplet(facts.ip, &sender, recipient);
        let (ip, rcpt, now) = (facts.ip.to_string(), recipient.to_string(), facts.now);
        let outcome = s
            .store()
            .write(Durability::Normal, move |c| {
                let known = directory::greylist::load(c, &triplet)?;
                let outcome = grey.check(&triplet.network, &known, now);
                directory::greylist::save(c, &triplet, outcome.triplet, outcome.client)?;
                let code = match outcome.decision.rule {
                    _ if !outcome.decision.allow => Some(code::SMTP_GREYLISTED),
                    policy::Rule::GreylistPassed { .. } => Some(code::SMTP_GREYLIST_PASSED),
                    _ => None,
                };
                if let Some(code) = code {
                    let detail = format!("{} {}", triplet.network, outcome.decision.rule);
                    let entry = journal::Entry { code, originator: &sender, recipient: &rcpt, ip: &ip, detail: &detail, ..Default::default() };
                    journal::append(c, &entry)?;
                }
                Ok(outcome)
            })
            .await;
        match outcome {
            Ok(o) => {
                metrics::greylist(o.state());
                o.decision.greylist_reply()
            }
            Err(e) => {
                tracing::warn!(error = %e, "greylisting failed; recipient let through");
                None
            }
        }
    }

    fn refuse(&self, addr: &Address, decision: &Decision) -> RcptVerdict {
        let code = if decision.is_relay_refusal() { code::SMTP_RELAY_REFUSED } else { code::SMTP_REJECTED };
        let sender = self.sender.lock().expect("sender seen").clone();
        self.server.journal_from(code, self.facts.ip, &sender, &addr.to_string(), &decision.rule.to_string());
        RcptVerdict::Refuse(decision.rcpt_reply().expect("a refusal has a reply"))
    }
}

/// O3: how long a session between commands may still send its next command once the server
/// shuts down (a QUIT gets 221, anything else 421). Short: the server waits for it.
const LAST_COMMAND: Duration = Duration::from_secs(1);

/// A QUIT command line (without its line end): RFC 5321 QUIT takes no argument.
fn is_quit(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.trim_ascii_end().eq_ignore_ascii_case(b"QUIT")
}

/// RFC 4954 §5: an authenticated user's messages are passed on as submitted by one of their own
/// addresses (`owned`, filled in when they authenticate), never by anyone else.
fn submitter_check(owned: Arc<Mutex<Vec<String>>>) -> crate::session::SubmitterCheck {
    Box::new(move |_user, claimed, from| policy::auth_sender(&owned.lock().expect("owned addresses"), claimed, from))
}
