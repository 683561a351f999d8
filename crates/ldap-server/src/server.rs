//! The tokio driver around [`crate::session::Session`] (SPEC O5, issue 18): accepts connections
//! on the `[ldap]` listeners, checks passwords with the shared argon2 pool and penalty box (A5,
//! as POP3 and SMTP AUTH do), and reads the address book from the store for every search.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use directory::PasswordPool;
use directory::access::ListCache;
use directory::address_book;
use directory::mailbox::{self as login, LoginFor};
use directory::penalty::PenaltyBox;
use ipnet::IpNet;
use mail_framework::journal::{self, code};
use mail_proto::limits::SessionLimits;
use mail_proto::net::normalise_ip;
use store::{Durability, Store};
use tls::{ServerTls, Stream};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::access::BindName;
use crate::entries::Tree;
use crate::session::{self, Action, BindOutcome, Session, SessionConfig};

/// Settings of the LDAP server (`[ldap]`).
#[derive(Clone, Debug)]
pub struct LdapSettings {
    /// The first local domain: the base DN is made from it.
    pub domain: String,
    /// Clients that may search without binding.
    pub anonymous_networks: Vec<IpNet>,
    /// Entries per search at most.
    pub size_limit: usize,
    pub max_sessions: usize,
    /// Seconds of silence before the connection is closed.
    pub inactivity_timeout: Duration,
    pub tls_handshake_timeout: Duration,
}

/// Shared by every LDAP connection.
#[derive(Clone)]
pub struct LdapServer {
    /// The settings of this session, taken from `live` when it is accepted.
    settings: Arc<LdapSettings>,
    /// The current settings (O6: SIGHUP replaces them).
    live: Arc<tokio::sync::watch::Sender<Arc<LdapSettings>>>,
    store: Store,
    passwords: PasswordPool,
    /// Without it neither StartTLS nor LDAPS runs, and so no bind with a password.
    tls: Option<ServerTls>,
    /// Failed-login throttling, shared with POP3 and SMTP (A5).
    penalty: PenaltyBox,
    /// The relay list decides whether failed logins count per user or per address.
    lists: ListCache,
    /// S4: one pool for the ldap and ldaps listeners, apart from the mail services' pools.
    limits: SessionLimits,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl LdapServer {
    pub fn new(
        settings: LdapSettings,
        store: Store,
        passwords: PasswordPool,
        tls: Option<ServerTls>,
        penalty: PenaltyBox,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        // A small office shares one NAT address: the per-address share is the whole pool.
        let limits = SessionLimits::new(settings.max_sessions, settings.max_sessions);
        let settings = Arc::new(settings);
        LdapServer {
            live: Arc::new(tokio::sync::watch::Sender::new(settings.clone())),
            settings,
            store,
            passwords,
            tls,
            penalty,
            lists: ListCache::default(),
            limits,
            shutdown,
        }
    }

    /// Sessions open now.
    pub fn active_sessions(&self) -> usize {
        self.limits.active()
    }

    /// New settings (O6): sessions accepted from now on use them.
    pub fn update_settings(&self, settings: LdapSettings) {
        self.limits.set_limits(settings.max_sessions, settings.max_sessions);
        self.live.send_replace(Arc::new(settings));
    }

    /// Accept connections until shutdown; `implicit_tls` for the ldaps listener.
    pub async fn serve(self, listener: TcpListener, implicit_tls: bool) {
        accept::until_shutdown_accept(&listener, &self.shutdown, "ldap", |stream, peer| {
            let me = LdapServer { settings: self.live.borrow().clone(), ..self.clone() };
            tokio::spawn(async move { me.connection(stream, peer, implicit_tls).await });
        })
        .await
    }

    async fn connection(self, tcp: TcpStream, peer: SocketAddr, implicit_tls: bool) {
        let ip = normalise_ip(peer.ip());
        let _ = tcp.set_nodelay(true);
        let mut stream = Stream::Plain(tcp);
        let handshake = match (implicit_tls, &self.tls) {
            (true, Some(tls)) => Some((tls.acceptor(), self.settings.tls_handshake_timeout)),
            (true, None) => return,
            (false, _) => None,
        };
        let Some(_slot) = self.limits.take(ip) else {
            metrics::refusal("ldap_connect", "S4");
            let notice = session::notice_of_disconnection("too many connections, try again later");
            stream.refuse(handshake, &notice, self.settings.inactivity_timeout).await;
            return;
        };
        let _session = metrics::session(if implicit_tls { "ldaps" } else { "ldap" });
        if let Some((acceptor, deadline)) = handshake {
            stream = match stream.upgrade(acceptor, deadline).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(client = %ip, error = %e, "implicit TLS handshake failed");
                    return;
                }
            };
        }
        let s = &self.settings;
        let config = SessionConfig {
            tree: Tree::new(&s.domain),
            tls_active: implicit_tls,
            starttls_available: self.tls.is_some() && !implicit_tls,
            anonymous_search: crate::access::anonymous_may_search(ip, &s.anonymous_networks),
            size_limit: s.size_limit,
        };
        if let Err(e) = self.run(&mut stream, ip, Session::new(config)).await {
            tracing::debug!(client = %ip, error = %e, "ldap session ended with an error");
        }
    }

    async fn run(&self, stream: &mut Stream, ip: IpAddr, mut session: Session) -> std::io::Result<()> {
        let timeout = self.settings.inactivity_timeout;
        let mut buf = vec![0u8; 16 * 1024];
        let mut out = Vec::new();
        let mut actions = Vec::new();
        loop {
            let mut pending: std::collections::VecDeque<Action> = std::mem::take(&mut actions).into();
            while let Some(action) = pending.pop_front() {
                match action {
                    Action::Send(bytes) => {
                        out.extend_from_slice(&bytes);
                        if out.len() >= 64 * 1024 {
                            stream.write_all_within(&out, timeout).await?;
                            out.clear();
                        }
                    }
                    Action::StartTls => {
                        stream.write_all_within(&out, timeout).await?;
                        out.clear();
                        let Some(tls) = &self.tls else { return Ok(()) };
                        let plain = std::mem::replace(stream, Stream::Broken);
                        *stream = plain.upgrade(tls.acceptor(), self.settings.tls_handshake_timeout).await?;
                        pending.extend(session.tls_up());
                    }
                    Action::CheckBind { name, password } => {
                        let outcome = self.bind(ip, name, password).await;
                        pending.extend(session.bind_done(outcome));
                    }
                    Action::ReadBook => {
                        let book = self.store.read(|c| Ok(address_book::read(c)?)).await;
                        if let Err(e) = &book {
                            tracing::warn!(error = %e, "ldap: cannot read the address book");
                        }
                        pending.extend(session.search_done(book.as_ref().ok()));
                    }
                    Action::Close => {
                        stream.write_all_within(&out, timeout).await?;
                        stream.shutdown_within(timeout).await;
                        return Ok(());
                    }
                }
            }
            if !out.is_empty() {
                stream.write_all_within(&out, timeout).await?;
                out.clear();
            }
            let mut shutdown = self.shutdown.clone();
            let read = tokio::select! {
                r = tokio::time::timeout(timeout, stream.read(&mut buf)) => r,
                _ = accept::until_shutdown(&mut shutdown) => {
                    let notice = session::notice_of_disconnection("the server is shutting down, try again later");
                    stream.write_all_within(&notice, timeout).await?;
                    stream.shutdown_within(timeout).await;
                    return Ok(());
                }
            };
            match read {
                // Idle too long (RFC 4511 §4.4.1 lets a server close with a notice).
                Err(_) => {
                    let notice = session::notice_of_disconnection("idle too long");
                    stream.write_all_within(&notice, timeout).await?;
                    stream.shutdown_within(timeout).await;
                    return Ok(());
                }
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => actions = session.received(&buf[..n]),
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// A bind's password check, throttled and journaled as the POP3 login (A5).
    async fn bind(&self, ip: IpAddr, name: BindName, password: String) -> BindOutcome {
        let (user, shown) = match name {
            BindName::User(user) => (Some(user.clone()), user),
            BindName::Address(address) => {
                let a = address.clone();
                match self.store.read(move |c| Ok(address_book::user_of_address(c, &a)?)).await {
                    Ok(user) => (user, address),
                    Err(e) => {
                        tracing::warn!(error = %e, "ldap bind could not be checked");
                        return BindOutcome::Unavailable;
                    }
                }
            }
            BindName::Unknown(text) => (None, text),
        };
        // Counted against the user the name leads to, or what was typed when it leads nowhere.
        let key = user.clone().unwrap_or_else(|| shown.clone());
        let relay_listed = match self.lists.client(&self.store, ip).await {
            Ok(record) => record.lists.relay_match(ip).is_some(),
            Err(_) => false,
        };
        let attempt = match self.penalty.reserve_login(PenaltyBox::offender(ip, &key, relay_listed)).await {
            Ok(attempt) => attempt,
            Err(throttled) => {
                self.journal(ip, &shown, throttled.describe()).await;
                return BindOutcome::Throttled;
            }
        };
        let passwords = self.passwords.for_client(attempt.offender().clone());
        // A name that leads to no user still costs one argon2 check (A5: no user enumeration);
        // user names never contain '=' or ',', so this one exists nowhere.
        let lookup = user.unwrap_or_else(|| "=no such user,".to_string());
        // `Send`: a removed user, still collecting their last mail, is out of the book too.
        match login::authenticate(&self.store, &passwords, &lookup, &password, LoginFor::Send).await {
            Ok(Some(u)) => {
                attempt.succeeded();
                BindOutcome::Ok(u.name)
            }
            Ok(None) => {
                let locked = attempt.failed();
                let note = if locked { "failed LDAP bind; cool-down started (A5)" } else { "failed LDAP bind (A5)" };
                self.journal(ip, &shown, note).await;
                BindOutcome::Invalid
            }
            Err(e) => {
                attempt.not_checked();
                tracing::warn!(error = %e, "ldap bind could not be checked");
                BindOutcome::Unavailable
            }
        }
    }

    /// A journal row about a failed bind (LF), as POP3's DF: the name tried is `from=` and `to=`.
    async fn journal(&self, ip: IpAddr, user: &str, detail: &str) {
        let (ip, user, detail) = (ip.to_string(), user.to_string(), detail.to_string());
        let _ = self
            .store
            .write(Durability::Normal, move |c| {
                let entry = journal::Entry {
                    code: code::LDAP_BIND_FAILED,
                    originator: &user,
                    recipient: &user,
                    ip: &ip,
                    detail: &detail,
                    ..Default::default()
                };
                Ok(journal::append(c, &entry)?)
            })
            .await;
    }
}
