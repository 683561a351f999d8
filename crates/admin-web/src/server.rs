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

/// A question for `explain` (issue 19): would the server take this message, and by which rule?
#[derive(Clone, Debug)]
pub struct ExplainQuery {
    pub ip: IpAddr,
    /// Empty: only MAIL FROM is checked for SPF.
    pub helo: String,
    /// "<>" for the null sender.
    pub from: String,
    pub to: Vec<String>,
}

/// The function behind `postroom explain`, given by the binary (this crate cannot reach it):
/// its lines and whether every decision accepts, or the lines so far and why it could not
/// answer. It blocks (store, DNS): the console calls it on a blocking thread.
pub type Explainer = Arc<dyn Fn(ExplainQuery) -> Result<(Vec<String>, bool), Vec<String>> + Send + Sync>;

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
    pub explainer: std::sync::RwLock<Option<Explainer>>,
    /// The traffic totals of the last minutes, for the dashboard's rates.
    pub history: std::sync::Mutex<crate::counters::History>,
    sampler_started: std::sync::atomic::AtomicBool,
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
        let state = State {
            settings,
            store,
            passwords,
            penalty,
            lists: ListCache::default(),
            tls,
            sessions,
            health: Default::default(),
            explainer: Default::default(),
            history: Default::default(),
            sampler_started: Default::default(),
        };
        Console { state: Arc::new(state), shutdown }
    }

    /// What the dashboard shows about the server; set once every listener is bound.
    pub fn set_health(&self, health: Health) {
        *self.state.health.write().expect("health") = health;
    }

    /// Give the console the function behind `postroom explain`; without it the Explain page
    /// says it is not available.
    pub fn set_explainer(&self, explainer: Explainer) {
        *self.state.explainer.write().expect("explainer") = Some(explainer);
    }

    /// Accept connections until shutdown.
    pub async fn serve(self, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let router = crate::routes::router(self.state.clone());
        if !self.state.sampler_started.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tokio::spawn(sample_traffic(self.state.clone(), self.shutdown.clone()));
        }
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

/// Sample the traffic totals every [`History::EVERY`](crate::counters::History::EVERY) until
/// shutdown, so the dashboard has rates from its first view.
async fn sample_traffic(state: Arc<State>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let totals = crate::counters::Totals::of(&metrics::global().encode());
        state.history.lock().expect("history").record(std::time::Instant::now(), totals);
        tokio::select! {
            _ = tokio::time::sleep(crate::counters::History::EVERY) => {}
            _ = accept::until_shutdown(&mut shutdown) => return,
        }
    }
}
