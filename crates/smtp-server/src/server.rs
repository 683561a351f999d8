//! The tokio driver: accepts connections, enforces session limits and deadlines, performs the
//! session's actions (directory lookups, body chunks, the enqueue commit) and writes replies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use directory::LocalDomains;
use mail_framework::{Incoming, Queue};
use mail_proto::limits::SessionLimits;
use mail_proto::net::normalise_ip;
use mail_proto::{LineEndings, Reply};
use store::journal::{self, code};
use store::Durability;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::policy;
use crate::received::received_header;
use crate::session::{Action, Event, Phase, RcptVerdict, Session, SessionConfig};

/// Settings of the SMTP server, from `[smtp]` and the top level of the configuration.
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
}

/// Shared by every connection of every SMTP listener.
#[derive(Clone)]
pub struct SmtpServer {
    settings: Arc<SmtpSettings>,
    queue: Queue,
    domains: LocalDomains,
    limits: SessionLimits,
}

impl SmtpServer {
    pub fn new(settings: SmtpSettings, queue: Queue, domains: LocalDomains) -> Self {
        let limits = SessionLimits::new(settings.max_sessions, settings.max_sessions_per_ip);
        SmtpServer { settings: Arc::new(settings), queue, domains, limits }
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

    async fn connection(self, mut stream: TcpStream, peer: SocketAddr) {
        let ip = normalise_ip(peer.ip());
        let _ = stream.set_nodelay(true);
        // S4: sessions in total and per client address.
        let Some(_slot) = self.limits.take(ip) else {
            let r = Reply::new(421, (7, 0), format!("{} Error: too many connections, try again later", self.settings.hostname));
            let _ = stream.write_all(&r.to_bytes()).await;
            return;
        };
        let decision = policy::connect(ip);
        if !decision.allow {
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
        };
        let mut driver = Driver { server: &self, ip: ip.to_string(), session: Session::new(config, ip.to_string()), incoming: None, out: Vec::new() };
        if let Err(e) = driver.run(&mut stream).await {
            tracing::debug!(client = %ip, error = %e, "smtp session ended with an error");
        }
        if let Some(incoming) = driver.incoming.take() {
            incoming.abort().await;
        }
    }
}

struct Driver<'a> {
    server: &'a SmtpServer,
    ip: String,
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
            let mut pending: std::collections::VecDeque<Action> = actions.into();
            while let Some(action) = pending.pop_front() {
                match action {
                    Action::Reply(r) => self.out.extend_from_slice(&r.to_bytes()),
                    Action::CheckRcpt(addr) => {
                        let verdict = self.check_rcpt(&addr).await;
                        pending.extend(self.session.handle(Event::RcptChecked(verdict)));
                    }
                    Action::BeginData { helo, esmtp, single_rcpt } => {
                        let s = &self.server.settings;
                        let mut incoming = self.server.queue.incoming();
                        let header = received_header(&helo, &self.ip, &s.hostname, esmtp, incoming.qid(), single_rcpt.as_deref(), store::now());
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
                            tracing::error!(client = %self.ip, error = %e, "enqueue failed; answered 451");
                        }
                        pending.extend(self.session.handle(Event::EnqueueDone(result)));
                    }
                    Action::AbortData => {
                        if let Some(incoming) = self.incoming.take() {
                            incoming.abort().await;
                        }
                        store_failed = false;
                    }
                    Action::Close => {
                        stream.write_all(&self.out).await?;
                        self.out.clear();
                        let _ = stream.shutdown().await;
                        return Ok(());
                    }
                }
            }
            if !self.out.is_empty() {
                stream.write_all(&self.out).await?;
                self.out.clear();
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

    /// Directory lookup, then the policy module's decision; refusals are journaled.
    async fn check_rcpt(&self, addr: &mail_proto::Address) -> RcptVerdict {
        let resolution = match self.server.domains.resolve_async(self.server.queue.store(), addr).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "recipient lookup failed");
                return RcptVerdict::Refuse(Reply::new(451, (3, 0), "Temporary lookup failure, try again later"));
            }
        };
        let decision = policy::recipient(addr, &resolution);
        match decision.rcpt_reply() {
            None => RcptVerdict::Accept,
            Some(reply) => {
                let code = if decision.is_relay_refusal() { code::SMTP_RELAY_REFUSED } else { code::SMTP_REJECTED };
                let (ip, rcpt, rule) = (self.ip.clone(), addr.to_string(), decision.rule.to_string());
                let store = self.server.queue.store().clone();
                // Journaled without holding up the reply; no fsync of its own.
                tokio::spawn(async move {
                    let _ = store
                        .write(Durability::Normal, move |c| {
                            Ok(journal::append(c, &journal::Entry { code, recipient: &rcpt, ip: &ip, detail: &rule, ..Default::default() })?)
                        })
                        .await;
                });
                RcptVerdict::Refuse(reply)
            }
        }
    }
}
