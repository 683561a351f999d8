//! The tokio driver: accepts connections, gathers the facts the policy needs (access lists,
//! POP login, blackhole lists, penalty box), enforces session limits and deadlines, performs
//! the session's actions (lookups, body chunks, the enqueue commit) and writes replies.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use directory::access::{AccessLists, ListCache};
use directory::penalty::PenaltyBox;
use directory::LocalDomains;
use dns::{Dns, RblAnswer};
use mail_framework::{Incoming, Queue};
use mail_proto::limits::SessionLimits;
use mail_proto::net::normalise_ip;
use mail_proto::{Address, LineEndings, Reply};
use store::journal::{self, code};
use store::{Durability, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::policy::{ClientFacts, Decision, HeloVerify, RelayPolicy};
use crate::received::received_header;
use crate::session::{Action, Event, Phase, RcptVerdict, Session, SessionConfig};

/// Settings of the SMTP server, from `[smtp]`, `[relay]` and the top level of the configuration.
#[derive(Clone, Debug)]
pub struct SmtpSettings {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_sessions: usize,
    pub max_sessions_per_ip: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub vrfy: bool,
    pub allow_bare_lf: bool,
    pub max_hops: usize,
    pub max_errors: u32,
    pub policy: RelayPolicy,
}

/// Shared by every connection of every SMTP listener.
#[derive(Clone)]
pub struct SmtpServer {
    settings: Arc<SmtpSettings>,
    queue: Queue,
    domains: LocalDomains,
    limits: SessionLimits,
    lists: ListCache,
    dns: Option<Dns>,
    penalty: PenaltyBox,
}

impl SmtpServer {
    /// `dns` is needed only for blackhole lists and HELO checks; without it they fail open.
    pub fn new(settings: SmtpSettings, queue: Queue, domains: LocalDomains, dns: Option<Dns>, penalty: PenaltyBox) -> Self {
        let limits = SessionLimits::new(settings.max_sessions, settings.max_sessions_per_ip);
        SmtpServer { settings: Arc::new(settings), queue, domains, limits, lists: ListCache::default(), dns, penalty }
    }

    /// Accept connections on `listener` forever.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.connection(stream, peer).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "smtp accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn store(&self) -> &Store {
        self.queue.store()
    }

    async fn connection(self, mut stream: TcpStream, peer: SocketAddr) {
        let ip = normalise_ip(peer.ip());
        let local_ip = stream.local_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let _ = stream.set_nodelay(true);
        let hostname = self.settings.hostname.clone();
        // S4: sessions in total and per client address.
        let Some(_slot) = self.limits.take(ip) else {
            let r = Reply::new(421, (7, 0), format!("{hostname} Error: too many connections, try again later"));
            let _ = stream.write_all(&r.to_bytes()).await;
            return;
        };
        let record = match self.lists.client(self.store(), ip).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the access lists");
                let _ = stream.write_all(&Reply::new(421, (3, 0), format!("{hostname} Local error, try again later")).to_bytes()).await;
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
            penalised: self.penalty.is_denied(ip),
            authenticated: None,
        };
        let decision = self.settings.policy.connect(&facts);
        if let Some(reply) = decision.connect_reply(&hostname) {
            self.journal(code::SMTP_CONNECTION_REFUSED, ip, "", &decision.rule.to_string());
            let _ = stream.write_all(&reply.to_bytes()).await;
            let _ = stream.shutdown().await;
            return;
        }
        let s = &self.settings;
        let config = SessionConfig {
            hostname: s.hostname.clone(),
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            vrfy: s.vrfy,
            line_endings: if s.allow_bare_lf { LineEndings::NormaliseBareLf } else { LineEndings::Strict },
            max_hops: s.max_hops,
            max_errors: s.max_errors,
            verify_helo: s.policy.helo_verify != HeloVerify::Off,
        };
        let session = Session::new(config, ip.to_string()).with_sender_check(self.sender_check(&facts));
        let mut driver = Driver { server: &self, facts, session, incoming: None, out: Vec::new() };
        if let Err(e) = driver.run(&mut stream).await {
            tracing::debug!(client = %ip, error = %e, "smtp session ended with an error");
        }
        if let Some(incoming) = driver.incoming.take() {
            incoming.abort().await;
        }
    }

    /// Query every blackhole list zone at once (R4); errors fail open and are journaled.
    async fn rbl_check(&self, ip: IpAddr, lists: &AccessLists) -> Option<(String, Ipv4Addr)> {
        if lists.rbl.is_empty() {
            return None;
        }
        let Some(dns) = &self.dns else {
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

    /// MAIL FROM against the kill list (R8), journaled when it refuses.
    fn sender_check(&self, facts: &ClientFacts) -> crate::session::SenderCheck {
        let (facts, me) = (facts.clone(), self.clone());
        Box::new(move |from: Option<&Address>| {
            let decision = me.settings.policy.sender(&facts, from);
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
                    Ok(journal::append(c, &journal::Entry { code: code::SMTP_REJECTED, originator: &sender, ip: &ip, detail: &rule, ..Default::default() })?)
                })
                .await;
        });
    }

    /// A journal row without holding up the session; no fsync of its own.
    fn journal(&self, code: &'static str, ip: IpAddr, recipient: &str, detail: &str) {
        let (store, ip, recipient, detail) = (self.store().clone(), ip.to_string(), recipient.to_string(), detail.to_string());
        tokio::spawn(async move {
            let r = store
                .write(Durability::Normal, move |c| {
                    Ok(journal::append(c, &journal::Entry { code, recipient: &recipient, ip: &ip, detail: &detail, ..Default::default() })?)
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
    out: Vec<u8>,
}

/// An incoming message whose chunk write failed: DATA is still read to its end, then 451.
const STORE_FAILED: &str = "store write failed";

impl Driver<'_> {
    async fn run(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut actions = self.session.handle(Event::Connected);
        let mut progress = u64::MAX;
        let mut phase = Phase::Command;
        let mut deadline = Instant::now();
        let mut store_failed = false;
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
                    Action::Penalize => hang_up |= self.penalize(),
                    Action::BeginData { helo, esmtp, single_rcpt } => {
                        let s = &self.server.settings;
                        let mut incoming = self.server.queue.incoming();
                        let ip = self.facts.ip.to_string();
                        let header = received_header(&helo, &ip, &s.hostname, esmtp, incoming.qid(), single_rcpt.as_deref(), store::now());
                        store_failed = incoming.push(header.as_bytes()).await.is_err();
                        self.incoming = Some(incoming);
                    }
                    Action::BodyChunk(bytes) => {
                        if let (Some(incoming), false) = (self.incoming.as_mut(), store_failed) {
                            store_failed = incoming.push(&bytes).await.is_err();
                        }
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
                        pending.extend(self.session.handle(Event::EnqueueDone(result)));
                    }
                    Action::AbortData => {
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
                stream.write_all(&self.out).await?;
                self.out.clear();
            }
            if hang_up {
                let _ = stream.shutdown().await;
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
            actions = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => self.session.handle(Event::Timeout),
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => self.session.handle(Event::Bytes(&buf[..n])),
                Ok(Err(e)) => return Err(e),
            };
        }
    }

    /// R9: deny the client's address for a while, unless it is exempt; true = hang up now.
    fn penalize(&self) -> bool {
        let s = self.server;
        if s.settings.policy.exempt_from_penalty(&self.facts) {
            return false;
        }
        s.penalty.deny(self.facts.ip);
        s.journal(code::SMTP_HACK_DENY, self.facts.ip, "", "command line beyond the limits: put on the temporary deny list (R9)");
        true
    }

    /// R10: resolve the HELO name and let the policy judge it.
    async fn check_helo(&self, name: &str) -> Option<Reply> {
        let answer = match &self.server.dns {
            Some(dns) => dns.addresses(name).await,
            None => dns::AddressAnswer::Error("no DNS resolver".into()),
        };
        let decision = self.server.settings.policy.helo(&self.facts, name, &answer);
        if matches!(decision.rule, crate::policy::Rule::HeloMismatch { .. } | crate::policy::Rule::HeloLookupFailed(_)) {
            self.server.journal(code::SMTP_HELO_MISMATCH, self.facts.ip, "", &decision.rule.to_string());
        }
        decision.helo_reply()
    }

    /// The policy's RCPT decision (relay-trick screen, directory lookup, relay rules), on a
    /// store reader; refusals are journaled with the rule (R3).
    async fn check_rcpt(&self, addr: &Address) -> RcptVerdict {
        let s = self.server;
        let mut facts = self.facts.clone();
        facts.now = store::now();
        let (settings, domains, a) = (s.settings.clone(), s.domains.clone(), addr.clone());
        let outcome = s
            .store()
            .read(move |conn| settings.policy.rcpt(&facts, &a, |target| domains.resolve(conn, target)).map_err(|e| store::StoreError::Invalid(e.to_string())))
            .await;
        match outcome {
            Err(e) => {
                tracing::error!(error = %e, "recipient lookup failed");
                RcptVerdict::Refuse(Reply::new(451, (3, 0), "Temporary lookup failure, try again later"))
            }
            Ok(o) if !o.decision.allow => self.refuse(addr, &o.decision),
            Ok(o) => o.record_as.map_or(RcptVerdict::Accept, RcptVerdict::AcceptAs),
        }
    }

    fn refuse(&self, addr: &Address, decision: &Decision) -> RcptVerdict {
        let code = if decision.is_relay_refusal() { code::SMTP_RELAY_REFUSED } else { code::SMTP_REJECTED };
        self.server.journal(code, self.facts.ip, &addr.to_string(), &decision.rule.to_string());
        RcptVerdict::Refuse(decision.rcpt_reply().expect("a refusal has a reply"))
    }
}
