//! The tokio driver around [`crate::session::Session`].

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use directory::PasswordPool;
use directory::access::ListCache;
use directory::mailbox::{self as login, LoginUser};
use directory::penalty::PenaltyBox;
use mail_framework::journal::{self, code};
use mail_framework::message::mailbox;
use mail_proto::DotStuffer;
use mail_proto::dot::TopFilter;
use mail_proto::limits::SessionLimits;
use mail_proto::net::normalise_ip;
use store::{Durability, Store};
use tls::{ServerTls, Stream};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::session::{Action, Event, LoginOutcome, MaildropMessage, Session, SessionConfig};

/// Settings of the POP3 server.
#[derive(Clone, Debug)]
pub struct Pop3Settings {
    pub hostname: String,
    pub inactivity_timeout: Duration,
    pub max_sessions: usize,
    pub max_sessions_per_ip: usize,
    /// USER/PASS without TLS only from loopback (`[tls] allow_plaintext_auth = "loopback"`).
    pub plaintext_from_loopback: bool,
    pub tls_handshake_timeout: Duration,
}

/// Shared by every POP3 connection.
#[derive(Clone)]
pub struct Pop3Server {
    /// The settings of this session: taken from `live` when the connection is accepted, so a
    /// session keeps the settings it started with.
    settings: Arc<Pop3Settings>,
    /// The current settings, replaced by [`Pop3Server::update_settings`] (O6: SIGHUP).
    live: Arc<tokio::sync::watch::Sender<Arc<Pop3Settings>>>,
    store: Store,
    passwords: PasswordPool,
    /// Without it no STLS is offered and the implicit-TLS listener cannot run.
    tls: Option<ServerTls>,
    /// Failed-login throttling, shared with the SMTP server (A5).
    penalty: PenaltyBox,
    /// The relay list decides whether failed logins count per user or per address.
    lists: ListCache,
    /// S4, P6: one session pool for the pop3 and pop3s listeners (one service over two
    /// transports, as SMTP submission and implicit TLS share theirs), apart from the SMTP pools.
    limits: SessionLimits,
    /// Becomes true on SIGTERM (O3).
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// P3: the maildrop locks live in memory, so a crash never leaves a mailbox locked.
    locks: Arc<Mutex<HashSet<i64>>>,
}

/// Holds a maildrop lock until dropped (QUIT, disconnect, timeout, error).
struct MaildropLock {
    locks: Arc<Mutex<HashSet<i64>>>,
    user_id: i64,
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        self.locks.lock().expect("maildrop locks").remove(&self.user_id);
    }
}

impl Pop3Server {
    pub fn new(
        settings: Pop3Settings,
        store: Store,
        passwords: PasswordPool,
        tls: Option<ServerTls>,
        penalty: PenaltyBox,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let limits = SessionLimits::new(settings.max_sessions, settings.max_sessions_per_ip);
        let settings = Arc::new(settings);
        Pop3Server {
            live: Arc::new(tokio::sync::watch::Sender::new(settings.clone())),
            settings,
            store,
            passwords,
            tls,
            penalty,
            lists: ListCache::default(),
            limits,
            shutdown,
            locks: Arc::default(),
        }
    }

    /// Sessions open now.
    pub fn active_sessions(&self) -> usize {
        self.limits.active()
    }

    /// New settings (O6: the configuration was reloaded): sessions accepted from now on use
    /// them, the open ones keep theirs; the session pool takes the new size at once.
    pub fn update_settings(&self, settings: Pop3Settings) {
        self.limits.set_limits(settings.max_sessions, settings.max_sessions_per_ip);
        self.live.send_replace(Arc::new(settings));
    }

    /// Accept connections forever; `implicit_tls` for the pop3s listener (P2).
    pub async fn serve(self, listener: TcpListener, implicit_tls: bool) {
        accept::until_shutdown_accept(&listener, &self.shutdown, "pop3", |stream, peer| {
            // The settings current now, for this session's whole life.
            let me = Pop3Server { settings: self.live.borrow().clone(), ..self.clone() };
            tokio::spawn(async move { me.connection(stream, peer, implicit_tls).await });
        })
        .await
    }

    fn lock(&self, user_id: i64) -> Option<MaildropLock> {
        self.locks.lock().expect("maildrop locks").insert(user_id).then(|| MaildropLock { locks: self.locks.clone(), user_id })
    }

    async fn connection(self, tcp: TcpStream, peer: SocketAddr, implicit_tls: bool) {
        let ip = normalise_ip(peer.ip());
        let _ = tcp.set_nodelay(true);
        let mut stream = Stream::Plain(tcp);
        // P2: on pop3s, TLS first, within the handshake deadline.
        let handshake = match (implicit_tls, &self.tls) {
            (true, Some(tls)) => Some((tls.acceptor(), self.settings.tls_handshake_timeout)),
            (true, None) => return,
            (false, _) => None,
        };
        // Sessions in total and per client address, counted from the connect.
        let Some(_slot) = self.limits.take(ip) else {
            metrics::refusal("pop3_connect", "S4");
            let refusal = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n";
            stream.refuse(handshake, refusal, self.settings.inactivity_timeout).await;
            return;
        };
        let _session = metrics::session(if implicit_tls { "pop3s" } else { "pop3" });
        if let Some((acceptor, deadline)) = handshake {
            stream = match stream.upgrade(acceptor, deadline).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(client = %ip, error = %e, "implicit TLS handshake failed");
                    return;
                }
            };
        }
        let config = SessionConfig {
            hostname: self.settings.hostname.clone(),
            allow_plaintext_auth: policy::plaintext_auth(self.settings.plaintext_from_loopback, ip).allow,
            stls_available: self.tls.is_some() && !implicit_tls,
            tls_active: implicit_tls,
            max_failed_logins: 3,
            max_errors: 20,
        };
        let mut driver = Driver { server: &self, ip, session: Session::new(config), login: None, retrieved: 0 };
        if let Err(e) = driver.run(&mut stream).await {
            tracing::debug!(client = %ip, error = %e, "pop3 session ended with an error");
        }
        driver.journal_retrievals().await;
    }
}

struct Driver<'a> {
    server: &'a Pop3Server,
    ip: IpAddr,
    session: Session,
    login: Option<(LoginUser, MaildropLock)>,
    retrieved: usize,
}

impl Driver<'_> {
    async fn run(&mut self, stream: &mut Stream) -> std::io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        let mut out = Vec::new();
        let mut actions = self.session.handle(Event::Connected);
        let mut progress = self.session.progress();
        let mut deadline = Instant::now() + self.server.settings.inactivity_timeout;
        loop {
            let mut pending: std::collections::VecDeque<Action> = actions.into();
            while let Some(action) = pending.pop_front() {
                match action {
                    Action::Reply(bytes) => out.extend_from_slice(&bytes),
                    Action::StartTls => {
                        stream.write_all_within(&out, self.server.settings.inactivity_timeout).await?;
                        out.clear();
                        let Some(tls) = &self.server.tls else { return Ok(()) };
                        let plain = std::mem::replace(stream, Stream::Broken);
                        *stream = plain.upgrade(tls.acceptor(), self.server.settings.tls_handshake_timeout).await?;
                        pending.extend(self.session.handle(Event::TlsUp));
                    }
                    Action::Login { user, password } => {
                        let outcome = self.login(&user, &password).await;
                        metrics::pop3_login(matches!(outcome, LoginOutcome::Ok { .. }));
                        pending.extend(self.session.handle(Event::LoginDone(outcome)));
                    }
                    Action::SendMessage { id, top_lines } => {
                        self.send_message(stream, &mut out, id, top_lines).await?;
                        if top_lines.is_none() {
                            self.retrieved += 1;
                            metrics::pop3_retr();
                        }
                    }
                    Action::Update { deleted } => {
                        let ok = match &self.login {
                            Some((user, _)) => self.delete(user.id, deleted).await,
                            None => true,
                        };
                        // Unlock before the goodbye is written: a client that reconnects as
                        // soon as it reads +OK must not find its own mailbox locked.
                        self.login = None;
                        pending.extend(self.session.handle(Event::UpdateDone(ok)));
                    }
                    Action::Close => {
                        stream.write_all_within(&out, self.server.settings.inactivity_timeout).await?;
                        stream.shutdown_within(self.server.settings.inactivity_timeout).await;
                        return Ok(());
                    }
                }
            }
            if !out.is_empty() {
                stream.write_all_within(&out, self.server.settings.inactivity_timeout).await?;
                out.clear();
            }
            // P6: a command restarts the inactivity timer (RFC 1939 §3); bytes without a line end
            // do not, so a trickle cannot hold the session (and its slot) open.
            if self.session.progress() != progress {
                progress = self.session.progress();
                deadline = Instant::now() + self.server.settings.inactivity_timeout;
            }
            // O3: on shutdown the session ends without UPDATE: nothing is deleted.
            let mut shutdown = self.server.shutdown.clone();
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, stream.read(&mut buf)) => r,
                _ = accept::until_shutdown(&mut shutdown) => {
                    stream.write_all_within(b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n", self.server.settings.inactivity_timeout).await?;
                    stream.shutdown_within(self.server.settings.inactivity_timeout).await;
                    return Ok(());
                }
            };
            actions = match read {
                Err(_) => self.session.handle(Event::Timeout),
                Ok(Ok(0)) => self.session.handle(Event::Eof),
                Ok(Ok(n)) => self.session.handle(Event::Bytes(&buf[..n])),
                Ok(Err(e)) => return Err(e),
            };
        }
    }

    /// Credentials (throttled, A5), then the lock, then the snapshot (P3).
    async fn login(&mut self, name: &str, password: &str) -> LoginOutcome {
        let s = self.server;
        // Office networks (relay-listed) are throttled per user, everyone else per address.
        let relay_listed = match s.lists.client(&s.store, self.ip).await {
            Ok(record) => record.lists.relay_match(self.ip).is_some(),
            Err(_) => false,
        };
        let offender = PenaltyBox::offender(self.ip, name, relay_listed);
        // A5: the attempt is reserved (and counted) before the password is checked: one check
        // per key at a time, none during a cool-down; argon2 runs within the client's share.
        let attempt = match s.penalty.reserve_login(offender).await {
            Ok(attempt) => attempt,
            Err(throttled) => {
                self.journal(code::POP_LOGIN_FAILED, name, throttled.describe()).await;
                return LoginOutcome::TempFail;
            }
        };
        let passwords = s.passwords.for_client(attempt.offender().clone());
        let user = match login::authenticate(&s.store, &passwords, name, password, directory::mailbox::LoginFor::Collect).await {
            Ok(Some(u)) => {
                attempt.succeeded();
                u
            }
            Ok(None) => {
                let locked = attempt.failed();
                let note = if locked { "failed login; cool-down started (A5)" } else { "failed login (A5)" };
                self.journal(code::POP_LOGIN_FAILED, name, note).await;
                return LoginOutcome::BadCredentials;
            }
            Err(e) => {
                attempt.not_checked();
                tracing::warn!(error = %e, "pop3 login could not be checked");
                return LoginOutcome::TempFail;
            }
        };
        let Some(lock) = s.lock(user.id) else { return LoginOutcome::InUse };
        let messages = match mailbox::snapshot(&s.store, user.id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "maildrop snapshot failed");
                return LoginOutcome::TempFail;
            }
        };
        // P5: the login record rides on a later commit; the session does not wait for it. The
        // DL row names the user as from= and to=, as the other POP rows (see `journal`).
        let (store, u, ip) = (s.store.clone(), user.clone(), self.ip.to_string());
        tokio::spawn(async move {
            let recorded = store
                .write(Durability::Normal, move |c| {
                    login::record_login(c, u.id, &ip)?;
                    let entry = journal::Entry { code: code::POP_LOGIN, originator: &u.name, recipient: &u.name, ip: &ip, ..Default::default() };
                    journal::append(c, &entry)?;
                    Ok(())
                })
                .await;
            if let Err(e) = recorded {
                tracing::warn!(error = %e, "could not record the POP3 login");
            }
        });
        self.login = Some((user, lock));
        LoginOutcome::Ok { messages: messages.into_iter().map(|m| MaildropMessage { id: m.id, size: m.size, uidl: m.uidl }).collect() }
    }

    /// Stream one message: the delivery prefix, then each stored chunk, dot-stuffed (P4).
    async fn send_message(&self, stream: &mut Stream, out: &mut Vec<u8>, id: i64, top: Option<u64>) -> std::io::Result<()> {
        let store = &self.server.store;
        let mut stuffer = DotStuffer::default();
        let mut top = top.map(TopFilter::new);
        let layout = mailbox::layout(store, id).await.map_err(std::io::Error::other)?;
        // The row cannot vanish while we hold the lock; treat a missing one as empty.
        if let Some(layout) = layout {
            let mut piece = layout.prefix;
            let mut chunks = layout.chunks.into_iter();
            loop {
                let part = match top.as_mut() {
                    Some(t) => t.filter(&piece),
                    None => &piece[..],
                };
                stuffer.stuff(part, out);
                if top.as_ref().is_some_and(TopFilter::is_done) {
                    break;
                }
                if out.len() >= 64 * 1024 {
                    stream.write_all_within(out, self.server.settings.inactivity_timeout).await?;
                    out.clear();
                }
                let Some(chunk_id) = chunks.next() else { break };
                piece = mailbox::chunk(store, chunk_id).await.map_err(std::io::Error::other)?;
            }
        }
        stuffer.finish(out);
        Ok(())
    }

    async fn delete(&self, user_id: i64, ids: Vec<i64>) -> bool {
        let n = ids.len();
        match mailbox::delete(&self.server.store, user_id, ids).await {
            Ok(()) => {
                if n > 0 {
                    let name = self.session.user().unwrap_or_default().to_string();
                    self.journal(code::POP_DELETE, &name, &format!("{n} deleted")).await;
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "pop3 deletions failed");
                false
            }
        }
    }

    /// One DR journal row per session rather than per RETR.
    async fn journal_retrievals(&self) {
        if self.retrieved > 0 {
            let name = self.session.user().unwrap_or_default().to_string();
            self.journal(code::POP_RETRIEVE, &name, &format!("{} retrieved", self.retrieved)).await;
        }
    }

    /// A journal row about `user`; no fsync of its own. The user is both `from=` (who acted: the
    /// name the client logged in, or tried to log in, with) and `to=` (whose maildrop), so a
    /// search by either field finds a user's POP rows as it finds their mail.
    async fn journal(&self, code: &'static str, user: &str, detail: &str) {
        let (ip, user, detail) = (self.ip.to_string(), user.to_string(), detail.to_string());
        let _ = self
            .server
            .store
            .write(Durability::Normal, move |c| {
                let entry = journal::Entry { code, originator: &user, recipient: &user, ip: &ip, detail: &detail, ..Default::default() };
                Ok(journal::append(c, &entry)?)
            })
            .await;
    }
}
