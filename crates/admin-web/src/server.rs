//! The console's listener: TLS with the running server's certificate (so a certificate that
//! ACME renews or SIGHUP reloads is the one the console shows at once), a bounded number of
//! connections, timeouts for slow clients, and hyper's HTTP/1.1 under the routes.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use directory::PasswordPool;
use directory::access::ListCache;
use directory::penalty::PenaltyBox;
use hyper_util::rt::{TokioIo, TokioTimer};
use mail_framework::heartbeat::Heartbeat;
use mail_framework::storage::StorageGuard;
use mail_proto::net::normalise_ip;
use store::Store;
use tls::ServerTls;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::security::Sessions;

/// Connections at once: an office has a handful of administrators, each browser opens a few.
const MAX_CONNECTIONS: usize = 32;
/// Time for the TLS handshake and for each request head to arrive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings of the console (`[admin]`).
#[derive(Clone, Debug)]
pub struct ConsoleSettings {
    /// Idle minutes before a session ends (`session_minutes`).
    pub session_idle: Duration,
    /// TLS on the listeners; false only on loopback (the configuration check enforces it).
    pub https: bool,
    pub hostname: String,
    /// The configured local domains and postmaster: the directory checks addresses against them.
    pub domains: Vec<String>,
    pub postmaster: String,
    pub data_dir: PathBuf,
    pub tls_handshake_timeout: Duration,
}

/// What the dashboard reports: the running server's own view of itself.
#[derive(Clone, Default)]
pub struct Health {
    /// `name address` of every listener, as `data_dir/listening` has them.
    pub listeners: Vec<String>,
    pub framework: Heartbeat,
    pub outbound: Heartbeat,
    pub storage: StorageGuard,
}

/// Everything a request handler reaches.
pub(crate) struct State {
    pub settings: ConsoleSettings,
    pub store: Store,
    pub passwords: PasswordPool,
    pub penalty: PenaltyBox,
    pub lists: ListCache,
    pub tls: Option<ServerTls>,
    pub sessions: Sessions,
    pub health: std::sync::RwLock<Health>,
}

/// The web console; clone it for each listener.
#[derive(Clone)]
pub struct Console {
    pub(crate) state: Arc<State>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// The client's address, put into every request's extensions (login throttling, the journal).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientIp(pub IpAddr);

impl Console {
    pub fn new(
        settings: ConsoleSettings,
        store: Store,
        passwords: PasswordPool,
        tls: Option<ServerTls>,
        penalty: PenaltyBox,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Console {
        let sessions = Sessions::new(settings.session_idle);
        let state = State { settings, store, passwords, penalty, lists: ListCache::default(), tls, sessions, health: Default::default() };
        Console { state: Arc::new(state), shutdown }
    }

    /// What the dashboard shows about the server; set once every listener is bound.
    pub fn set_health(&self, health: Health) {
        *self.state.health.write().expect("health") = health;
    }

    /// Accept connections until shutdown.
    pub async fn serve(self, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let router = crate::routes::router(self.state.clone());
        accept::until_shutdown_accept(&listener, &self.shutdown, "admin console", |tcp, peer| {
            // Past the limit the connection is closed: the browser retries.
            let Ok(slot) = slots.clone().try_acquire_owned() else { return };
            let (me, router) = (self.clone(), router.clone());
            tokio::spawn(async move {
                let _slot = slot;
                me.connection(tcp, peer, router).await;
            });
        })
        .await
    }

    async fn connection(self, tcp: TcpStream, peer: SocketAddr, router: axum::Router) {
        let ip = normalise_ip(peer.ip());
        let _ = tcp.set_nodelay(true);
        let settings = &self.state.settings;
        if settings.https {
            let Some(tls) = &self.state.tls else { return };
            let deadline = settings.tls_handshake_timeout.min(REQUEST_TIMEOUT);
            match tokio::time::timeout(deadline, tls.acceptor().accept(tcp)).await {
                Ok(Ok(stream)) => self.http(TokioIo::new(stream), ip, router).await,
                Ok(Err(e)) => tracing::debug!(client = %ip, error = %e, "admin console: TLS handshake failed"),
                Err(_) => tracing::debug!(client = %ip, "admin console: TLS handshake timed out"),
            }
        } else {
            self.http(TokioIo::new(tcp), ip, router).await;
        }
    }

    async fn http<S>(&self, io: TokioIo<S>, ip: IpAddr, router: axum::Router)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ClientIp(ip));
            let mut router = router.clone();
            async move { tower_service::Service::call(&mut router, request.map(axum::body::Body::new)).await }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(REQUEST_TIMEOUT).max_buf_size(64 * 1024);
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            r = connection.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(client = %ip, error = %e, "admin console connection ended with an error");
                }
            }
            _ = accept::until_shutdown(&mut shutdown) => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
            }
        }
    }
}
