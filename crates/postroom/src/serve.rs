//! `postroom serve`: wire configuration, store, framework and servers together.

use std::time::Duration;

use anyhow::Context;
use directory::penalty::{LoginLimits, PenaltyBox};
use directory::{LocalDomains, PasswordPool};
use ldap_server::{LdapServer, LdapSettings};
use mail_framework::heartbeat::Heartbeat;
use mail_framework::outbound::Schedule;
use mail_framework::storage::StorageGuard;
use mail_framework::{Framework, Queue};
use pop3_server::{Pop3Server, Pop3Settings};
use smtp_client::conversation::ClientSettings;
use smtp_client::queue_manager::{OutboundQueue, OutboundSettings};
use smtp_client::route::RouteSettings;
use smtp_server::policy::{self, ListenerAuth, RelayPolicy, VerifyFrom};
use smtp_server::{ListenerKind, Services, SmtpServer, SmtpSettings};
use std::net::SocketAddr;
use store::{Durability, Store, StoreOptions};
use tls::{CertSource, ServerTls};
use tokio::net::{TcpListener, TcpSocket};

use postroom::config::{AuthMode, Config, HeloVerify, LogFormat, PlaintextAuth, RelayMode, SocketLayer, VerifyFromUser};

/// The file `serve` writes once it listens: one `name address` line per listener.
pub const LISTENING_FILE: &str = "listening";

/// `source` says where `config` came from, for SIGHUP to read it again (O6).
pub fn serve(config: Config, source: crate::reload::Source) -> anyhow::Result<()> {
    init_logging(&config);
    raise_descriptor_limit(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(config, source))
}

/// Connections the kernel completes before `accept` takes them. The usual 128 loses clients in a
/// burst: once the queue is full the kernel drops the client's final ACK, and the client, which
/// waits for the greeting, hangs instead of reading a 220 or a 421. Linux caps it at somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket with SO_REUSEADDR (a restart does not wait out TIME_WAIT) and a backlog
/// that holds a burst of connections.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Every session, pending TLS handshake and outbound connection holds a descriptor. Past the
/// open-file limit `accept` fails, and a flood's extra clients wait unanswered instead of reading
/// a 421; so the soft limit is raised to the hard one (as nginx and Go's runtime do), and a limit
/// too low for the configured sessions is reported.
fn raise_descriptor_limit(config: &Config) {
    // Listeners, the database and its WAL, the sendmail socket, log files: a generous reserve.
    const RESERVE: u64 = 256;
    let wanted = session_capacity(config).saturating_add(config.delivery.max_connections as u64).saturating_add(RESERVE);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the open-file limit is below smtp.max_sessions + pop3.max_sessions + smtp.submission_max_sessions + \
             smtp.local_max_sessions (each counted when its listeners run) + delivery.max_connections + {RESERVE}: \
             clients past it wait unanswered; raise it (ulimit -n, systemd LimitNOFILE=) or lower the max_sessions"
        ),
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

/// S4: the sessions the running listeners may hold at once. Every session pool is its own (MX;
/// submission and implicit TLS together; the local socket; POP3 and POP3S together), so the
/// worst case is their sum; a pool whose listeners are all off holds nothing.
fn session_capacity(config: &Config) -> u64 {
    let (smtp, pop3) = (&config.smtp, &config.pop3);
    let pop3_runs = (!pop3.listen.is_empty() && pop3.socket_layer != SocketLayer::Secure)
        || (!pop3.tls_listen.is_empty() && pop3.socket_layer != SocketLayer::Nonsecure);
    let pools = [
        (!smtp.listen.is_empty(), smtp.max_sessions),
        (!smtp.submission_listen.is_empty() || !smtp.tls_listen.is_empty(), smtp.submission_max_sessions),
        (true, smtp.local_max_sessions),
        (pop3_runs, pop3.max_sessions),
        (!config.ldap.listen.is_empty() || !config.ldap.tls_listen.is_empty(), config.ldap.max_sessions),
    ];
    pools.into_iter().filter(|(runs, _)| *runs).fold(0u64, |sum, (_, n)| sum.saturating_add(n as u64))
}

/// Once the server has gone quiet (under 100 ms of CPU in 10 s), the heap's free pages go back
/// to the OS (see the heap-trim crate): a server that has served a burst returns to its idle
/// size instead of keeping its peak.
fn spawn_heap_trim() {
    std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(|| {
            let mut trimmer = heap_trim::QuietTrimmer::default();
            loop {
                std::thread::sleep(Duration::from_secs(10));
                trimmer.tick(Duration::from_millis(100));
            }
        })
        .expect("spawn heap-trim thread");
}

fn init_logging(config: &Config) {
    let mut filter = tracing_subscriber::EnvFilter::try_new(&config.log.level).unwrap_or_else(|_| "info".into());
    // S2: rustls warns about every client that sends an IP address as SNI; that is the client's
    // business, shown only when the log is at debug level (or names rustls itself).
    let debugging = filter.max_level_hint().is_some_and(|l| l >= tracing_subscriber::filter::LevelFilter::DEBUG);
    if !debugging && !config.log.level.contains("rustls") {
        filter = filter.add_directive(format!("{}=error", tls::CLIENT_HELLO_LOG_TARGET).parse().expect("a valid directive"));
    }
    // Colours only on a terminal: a log file or the journal would keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

async fn run(config: Config, source: crate::reload::Source) -> anyhow::Result<()> {
    // Held while the server runs: `postroom restore` refuses this data directory meanwhile.
    let _lock = store::backup::lock_data_dir(&config.data_dir)
        .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?
        .with_context(|| format!("another postroom process is using {} (a server runs on it, or a restore)", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir, StoreOptions { journal: config.journal.enabled, ..Default::default() })
        .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;
    let queue = Queue::new(store.clone(), config.storage.body_chunk_kib as usize * 1024);
    let dropped = queue.recover().await?;
    if dropped > 0 {
        tracing::info!(dropped, "removed messages whose DATA never finished (no 250 was given)");
    }
    spawn_journal_retention(store.clone(), config.journal.retention_days);
    spawn_heap_trim();
    let domains = LocalDomains::new(&config.domains, &config.postmaster);
    let reports = report_settings(&config);
    let storage = StorageGuard::default();
    let storage_state = storage.clone();
    let chain = snapin_chain(&config);
    let framework = Framework::with_snapins(queue.clone(), domains.clone(), chain).with_storage_guard(storage.clone());
    storage.monitor(store.clone(), config.data_dir.clone(), config.storage.min_free_mb, framework.pipeline_wake()).await;
    let (outbound_wake, pipeline_wake, framework_beat) = (framework.outbound_wake(), framework.pipeline_wake(), framework.heartbeat());
    tokio::spawn(framework.clone().run());

    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // Reads the resolver configuration only; queries happen when a configured feature needs one.
    let dns = match dns::Dns::new(&config.dns.servers) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "no DNS resolver: blackhole lists and HELO checks will fail open");
            None
        }
    };
    // E1: one verifier, so every session shares its resolver and its cache of answers. Built even
    // with `[auth] checks = false`, which a reload may turn on.
    let verifier = match sender_auth::verify::Verifier::new(&config.dns.servers) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "no DNS resolver: inbound mail is not checked for SPF, DKIM and DMARC");
            None
        }
    };
    let penalty = PenaltyBox::new(
        Duration::from_secs(config.penalty.deny_minutes * 60),
        LoginLimits { failures: config.penalty.login_failures, window: Duration::from_secs(config.penalty.login_window_minutes * 60) },
    );
    spawn_deny_list_mirror(store.clone(), penalty.clone()).await;
    let tls = load_tls(&config)?;
    let passwords = PasswordPool::new(2, 256);
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let services = Services {
        queue: queue.clone(),
        domains,
        dns: dns.clone(),
        penalty: penalty.clone(),
        tls: tls.clone(),
        passwords: passwords.clone(),
        shutdown: shutdown.clone(),
        storage,
        verifier,
    };
    let smtp = SmtpServer::new(smtp_settings(&config), services);
    spawn_greylist_expiry(store.clone(), smtp.clone());
    let pop3 = Pop3Server::new(pop3_settings(&config), store.clone(), passwords.clone(), tls.clone(), penalty.clone(), shutdown.clone());
    let ldap = LdapServer::new(ldap_settings(&config), store.clone(), passwords.clone(), tls.clone(), penalty.clone(), shutdown.clone());
    let console = admin_web::Console::new(console_settings(&config), store.clone(), passwords.clone(), tls.clone(), penalty, shutdown.clone());
    console.set_explainer(crate::lists::explainer(config.clone(), store.clone()));

    let mut bound = Vec::new();
    let smtp_listeners = [
        ("smtp", "smtp.listen", &config.smtp.listen, ListenerKind::Mx),
        ("submission", "smtp.submission_listen", &config.smtp.submission_listen, ListenerKind::Submission),
        ("smtps", "smtp.tls_listen", &config.smtp.tls_listen, ListenerKind::Smtps),
    ];
    for (name, key, addrs, kind) in smtp_listeners {
        for addr in addrs {
            let listener = listen(*addr).with_context(|| format!("{key}: cannot listen on {addr}"))?;
            bound.push(format!("{name} {}", listener.local_addr()?));
            tokio::spawn(smtp.clone().serve(listener, kind));
        }
    }
    // P2: the socket layer option picks plain (STLS), implicit TLS, or both.
    let layer = config.pop3.socket_layer;
    let pop3_listeners = [
        ("pop3", "pop3.listen", &config.pop3.listen, false, layer != SocketLayer::Secure),
        ("pop3s", "pop3.tls_listen", &config.pop3.tls_listen, true, layer != SocketLayer::Nonsecure),
    ];
    for (name, key, addrs, implicit_tls, wanted) in pop3_listeners {
        for addr in addrs.iter().filter(|_| wanted) {
            let listener = listen(*addr).with_context(|| format!("{key}: cannot listen on {addr}"))?;
            bound.push(format!("{name} {}", listener.local_addr()?));
            tokio::spawn(pop3.clone().serve(listener, implicit_tls));
        }
    }
    // O5: the address book, LDAP with StartTLS and LDAPS; one session pool for both.
    for (name, key, addrs, implicit_tls) in
        [("ldap", "ldap.listen", &config.ldap.listen, false), ("ldaps", "ldap.tls_listen", &config.ldap.tls_listen, true)]
    {
        for addr in addrs {
            let listener = listen(*addr).with_context(|| format!("{key}: cannot listen on {addr}"))?;
            bound.push(format!("{name} {}", listener.local_addr()?));
            tokio::spawn(ldap.clone().serve(listener, implicit_tls));
        }
    }
    // E6: the web console, HTTPS with the certificate above (plain HTTP on loopback only).
    for addr in &config.admin.listen {
        let listener = listen(*addr).with_context(|| format!("admin.listen: cannot listen on {addr}"))?;
        bound.push(format!("admin {}", listener.local_addr()?));
        tokio::spawn(console.clone().serve(listener));
    }
    // `[metrics] listen`: GET /metrics for Prometheus.
    if !config.metrics.listen.is_empty() {
        let addr: SocketAddr = config.metrics.listen.parse().context("metrics.listen")?;
        let listener = listen(addr).with_context(|| format!("metrics.listen: cannot listen on {addr}"))?;
        bound.push(format!("metrics {}", listener.local_addr()?));
        let scrape = crate::metrics::Scrape { store: store.clone(), passwords, data_dir: config.data_dir.clone() };
        tokio::spawn(crate::metrics::serve(listener, scrape, shutdown));
    }
    // O6: [tls.acme]: a trusted certificate from an ACME server, HTTP-01 answered on http_listen.
    // The ACME server is asked in the background: one that is down never delays the start.
    if let Some(tls) = tls.as_ref().filter(|_| config.tls.acme.enabled()) {
        let mut http = Vec::new();
        for addr in &config.tls.acme.http_listen {
            let listener = listen(*addr).with_context(|| format!("tls.acme.http_listen: cannot listen on {addr}"))?;
            bound.push(format!("acme-http {}", listener.local_addr()?));
            http.push(listener);
        }
        acme::start(acme_settings(&config), tls.clone(), http)?;
    }
    // F6, A4: the local submission socket of `postroom sendmail` / `send`, where every local
    // user reaches it; the kernel tells the session who connected.
    let local = bind_local_socket(&crate::sendmail::socket_path(&config))?;
    tokio::spawn(smtp.clone().serve_local(local));
    // The SMTP client: an MX that resolves to one of our own SMTP listeners is a loop.
    let own: Vec<SocketAddr> = bound.iter().filter(|l| l.starts_with("smtp ")).filter_map(|l| l[5..].parse().ok()).collect();
    let outbound = OutboundQueue::new(outbound_settings(&config, own.clone(), reports), store.clone(), dns, outbound_wake, pipeline_wake);
    // Both workers are alive from here on; `status` must not see a gap before their first round.
    framework_beat.beat();
    outbound.heartbeat().beat();
    console.set_health(admin_web::Health {
        listeners: bound.clone(),
        framework: framework_beat.clone(),
        outbound: outbound.heartbeat(),
        storage: storage_state.clone(),
    });
    spawn_status_writer(config.data_dir.clone(), store.clone(), framework_beat, outbound.heartbeat(), storage_state);
    tokio::spawn(outbound.clone().run());
    spawn_send_scheduler(&config, store.clone(), outbound.clone());
    write_listening(&config, &bound)?;
    let mut signals = Signals::new()?;
    tracing::info!(listeners = ?bound, data_dir = %config.data_dir.display(), "postroom is ready");
    // O6: every listener is bound; a service manager waiting for us (Type=notify) may go on.
    crate::reload::notify("READY=1\nSTATUS=ready");

    let mut live = Live {
        source,
        running: config.clone(),
        smtp: smtp.clone(),
        pop3: pop3.clone(),
        ldap: ldap.clone(),
        framework,
        outbound: outbound.clone(),
        tls,
        own,
    };
    while signals.next().await == Signal::Reload {
        live.reload().await;
    }
    crate::reload::notify("STOPPING=1");
    // O3: stop accepting; sessions between commands are told 421 / -ERR; a message in DATA may
    // finish within the grace time. Everything acknowledged is already committed.
    tracing::info!("shutting down: no new connections; waiting for open sessions");
    let _ = std::fs::remove_file(config.data_dir.join(LISTENING_FILE));
    let _ = std::fs::remove_file(crate::sendmail::socket_path(&config));
    let _ = std::fs::remove_file(config.data_dir.join(crate::status::STATUS_FILE));
    let _ = shutdown_tx.send(true);
    let grace = tokio::time::sleep(SHUTDOWN_GRACE);
    tokio::pin!(grace);
    let mut at_once = false;
    loop {
        let open = smtp.active_sessions() + pop3.active_sessions() + ldap.active_sessions();
        if open == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = &mut grace => {
                tracing::warn!(open, "grace time over: closing the remaining sessions");
                break;
            }
            _ = signals.stop() => {
                tracing::warn!(open, "second signal: exiting at once");
                at_once = true;
                break;
            }
        }
    }
    // O3: an outbound attempt that has sent its dot waits for the reply and records it, so the
    // next hop never gets the message twice because we stopped (RFC 1047's duplicate is left
    // only to a connection that really breaks).
    let left = if at_once { Duration::ZERO } else { grace.deadline().saturating_duration_since(tokio::time::Instant::now()) };
    let still = outbound.stop(left).await;
    if still > 0 {
        tracing::warn!(deliveries = still, "grace time over: outbound deliveries still running are retried after the restart");
    }
    // Let commits already handed to the store writer finish.
    let _ = store.write(store::Durability::Full, |_| Ok(())).await;
    tracing::info!("stopped");
    Ok(())
}

/// F6, A4: bind the local submission socket `path` so that any local user can submit: its
/// directory is created 0755 when missing (an existing one keeps its mode, so 0750 with a group
/// limits sendmail to that group) and must be a real directory owned by us that group and others
/// cannot write in: nobody else can plant a link or a socket of their own there. The socket is
/// 0666; who may send as whom is decided per connection from the peer's uid (SO_PEERCRED). A
/// socket left by a killed server is replaced; anything else at the path is refused, as is a
/// socket another running server still answers on.
fn bind_local_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::io::ErrorKind::NotFound;
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    let key = "smtp.local_socket";
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let (p, d) = (path.display(), dir.display());
    let euid = store::effective_uid()?;
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("{key}: cannot create the socket directory {d} (create it owned by uid {euid}, mode 0755, or set {key})"))?;
            // Whatever the umask: local users must be able to enter it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).with_context(|| format!("chmod 0755 {d}"))?;
        }
        Err(e) => return Err(e).with_context(|| format!("{key}: {d}")),
        Ok(_) => {}
    }
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("{key}: {d}"))?;
    let mode = meta.mode() & 0o7777;
    if meta.file_type().is_symlink() {
        anyhow::bail!("{key}: the socket directory {d} is a symbolic link: set {key} to a path in the real directory");
    }
    if !meta.is_dir() {
        anyhow::bail!("{key}: the socket directory {d} is not a directory: remove it or set {key}");
    }
    if meta.uid() != euid {
        anyhow::bail!(
            "{key}: the socket directory {d} is owned by uid {}, but postroom runs as uid {euid}: another user could replace \
             the socket. `chown {euid} {d}`, remove it (postroom creates it), or set {key}",
            meta.uid()
        );
    }
    if mode & 0o022 != 0 {
        anyhow::bail!(
            "{key}: the socket directory {d} is writable by group or others (mode {mode:04o}): another user could replace the \
             socket. `chmod 755 {d}`, or set {key} to a directory of its own"
        );
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("{key}: {p}")),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("{key}: another server is listening on {p}: stop it, or give this one its own {key}");
            }
            std::fs::remove_file(path).with_context(|| format!("{key}: removing the stale socket {p}"))?;
        }
        Ok(_) => anyhow::bail!("{key}: {p} exists and is not a socket: remove it, or set {key}"),
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("{key}: cannot listen on {p}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).with_context(|| format!("chmod 0666 {p}"))?;
    if mode & 0o005 != 0o005 {
        tracing::info!(dir = %d, mode = format_args!("{mode:04o}"), "the sendmail socket's directory admits only some local users");
    }
    Ok(listener)
}

/// How long open sessions may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// How often the penalty box is mirrored to the deny list and lift requests are applied.
const DENY_LIST_EVERY: Duration = Duration::from_secs(2);

/// R9, A5: the deny list survives a restart (reloaded here before any listener opens), is
/// mirrored to the database for `postroom list show deny` and `explain`, and lifts requested by
/// `postroom list remove deny` apply within seconds. Writes only when something changed.
async fn spawn_deny_list_mirror(store: Store, penalty: PenaltyBox) {
    use directory::deny_list;
    use directory::penalty::Offender;
    match store.read(|c| Ok(deny_list::list(c, store::now())?)).await {
        Ok(rows) => {
            for row in rows {
                if let Some(who) = Offender::parse(&row.key) {
                    penalty.restore(who, row.until, row.reason);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the deny list; starting with an empty one"),
    }
    tokio::spawn(async move {
        let mut mirrored: Option<Vec<(String, i64, directory::penalty::Reason)>> = None;
        loop {
            tokio::time::sleep(DENY_LIST_EVERY).await;
            if store.read(|c| Ok(deny_list::lifts_waiting(c)?)).await.unwrap_or(false) {
                match store.write(Durability::Normal, |c| Ok(deny_list::take_lifts(c)?)).await {
                    Ok(keys) => {
                        for key in keys {
                            let lifted = Offender::parse(&key).is_some_and(|who| penalty.lift(&who));
                            tracing::info!(%key, lifted, "deny list: entry lifted by the administrator");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read deny list lift requests"),
                }
                mirrored = None;
            }
            let now = penalty.denied_entries();
            // The expiry times move by a second between reads: compare keys and reasons.
            let same = mirrored.as_ref().is_some_and(|m| m.len() == now.len() && m.iter().zip(&now).all(|(a, b)| a.0 == b.0 && a.2 == b.2));
            if !same {
                let entries = now.clone();
                match store.write(Durability::Normal, move |c| Ok(deny_list::mirror(c, &entries)?)).await {
                    Ok(()) => mirrored = Some(now),
                    Err(e) => tracing::warn!(error = %e, "cannot mirror the deny list"),
                }
            }
        }
    });
}

/// O2: every 2 s, the workers' last beats into data_dir/status for `postroom status`.
/// The storage threshold's state goes with them (`storage low` or `storage ok`, F5): `status`
/// says when new mail is refused and the framework paused for lack of space.
/// A dead store writer cannot be brought back in this process (every write would fail while
/// the listeners still answer): the server exits with an error so its supervisor restarts it.
fn spawn_status_writer(data_dir: std::path::PathBuf, store: Store, framework: Heartbeat, outbound: Heartbeat, storage: StorageGuard) {
    let write = move || {
        if !store.writer_alive() {
            tracing::error!("the store writer has stopped; exiting so the service manager restarts postroom");
            std::process::exit(70); // EX_SOFTWARE
        }
        let text = format!(
            "pid {}\nupdated {}\nframework {}\noutbound {}\nstorage {}\n",
            std::process::id(),
            store::now(),
            framework.last(),
            outbound.last(),
            if storage.is_low() { "low" } else { "ok" }
        );
        if let Err(e) = store::write_private_atomic(&data_dir, crate::status::STATUS_FILE, text.as_bytes()) {
            tracing::warn!(path = %data_dir.join(crate::status::STATUS_FILE).display(), error = %e, "cannot write the status file");
        }
    };
    // Written once before `listening` appears, so `status` never sees a gap.
    write();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            write();
        }
    });
}

/// C7: every `send_interval_secs`, release the mail held for dial-up domains and ask the
/// upstream server, if one is set, to send what it holds for us (ETRN). The ETRN connection is
/// outbound like a delivery: it comes from `[delivery] bind_address` (C8) and takes one of the
/// `max_connections` slots the deliveries share (C6), waiting while they are all busy; runs
/// never overlap, so the scheduler holds at most one connection.
fn spawn_send_scheduler(config: &Config, store: Store, outbound: OutboundQueue) {
    let d = &config.delivery;
    if d.send_interval_secs == 0 {
        return;
    }
    let every = Duration::from_secs(d.send_interval_secs);
    let upstream: Option<SocketAddr> = d.etrn_upstream.parse().ok();
    let bind: Option<std::net::IpAddr> = d.bind_address.parse().ok();
    let (domains, helo) = (d.etrn_upstream_domains.clone(), config.hostname.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match store.write(store::Durability::Full, mail_framework::message::outbound::release_all_etrn).await {
                Ok(n) if n > 0 => tracing::info!(released = n, "send scheduler: held mail released"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "send scheduler could not release held mail"),
            }
            if let (Some(addr), false) = (upstream, domains.is_empty()) {
                let _slot = outbound.connection_slot().await;
                match smtp_client::etrn::request(addr, bind, &helo, &domains).await {
                    Ok(replies) => tracing::info!(upstream = %addr, replies = ?replies.iter().map(|r| r.code).collect::<Vec<_>>(), "ETRN sent"),
                    Err(e) => tracing::warn!(upstream = %addr, error = %e, "ETRN to the upstream server failed"),
                }
            }
        }
    });
}

/// F4: journal rows older than `retention_days` are removed, hourly, in small batches.
fn spawn_journal_retention(store: Store, retention_days: u32) {
    tokio::spawn(async move {
        loop {
            let before = store::now() - i64::from(retention_days) * 86_400;
            loop {
                let removed = store.write(store::Durability::Normal, move |c| Ok(mail_framework::journal::expire(c, before, 10_000)?)).await;
                match removed {
                    Ok(10_000) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "journal retention failed");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

/// Issue 21: greylisting records past their retry window or maximum age are removed, hourly,
/// with the settings in force then (a reload may change them). They would count as new anyway:
/// this only keeps the tables small.
fn spawn_greylist_expiry(store: Store, smtp: SmtpServer) {
    tokio::spawn(async move {
        loop {
            let grey = smtp.greylist_policy();
            let removed = store
                .write(store::Durability::Normal, move |c| {
                    Ok(directory::greylist::expire(c, store::now(), grey.retry_window_secs, grey.max_age_secs)?)
                })
                .await;
            if let Err(e) = removed {
                tracing::warn!(error = %e, "greylist expiry failed");
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

/// The certificate of `[tls]`, or the self-signed one in data_dir (made on first start, and
/// again when hostname or a listen address changes); reloaded when its files change (O6). Its
/// fingerprints are logged: what a mail program pins (`postroom cert show` prints them too).
fn load_tls(config: &Config) -> anyhow::Result<Option<ServerTls>> {
    let names = crate::cert_cmd::generated_names(config);
    let (tls, source) =
        ServerTls::load(&config.tls.cert, &config.tls.key, &config.data_dir, &names).context("[tls] cert/key: cannot load the certificate")?;
    let cert = tls.cert_path();
    let cert = cert.display();
    match &source {
        CertSource::Generated => tracing::warn!(%cert, "no [tls] cert configured: generated a self-signed certificate"),
        CertSource::Regenerated { previous } => tracing::warn!(
            %cert, %previous, now = %names,
            "the self-signed certificate named another host name or other addresses: generated a new one; \
             mail programs that trust the old certificate or its fingerprint must be given the new one"
        ),
        CertSource::GeneratedEarlier => tracing::info!(%cert, "using the self-signed certificate generated earlier"),
        CertSource::Files => {}
    }
    let der = tls.certificate();
    let fp = tls::Fingerprints::of(&der);
    let (subject, alt_names) = tls::describe(&der).map_or_else(|e| (e, String::new()), |info| (info.subject.clone(), info.alt_names()));
    tracing::info!(%cert, %subject, names = %alt_names, sha256 = %fp.sha256, md5 = %fp.md5, "TLS certificate");
    tls.spawn_reloader(Duration::from_secs(5));
    Ok(Some(tls))
}

/// O6: the certificate of a reloaded configuration — its `[tls]` files, or the generated one
/// (made anew when the host name changed) — loaded beside the one in use, which it replaces only
/// when the whole reload succeeds.
fn load_tls_files(config: &Config) -> anyhow::Result<Option<ServerTls>> {
    let names = crate::cert_cmd::generated_names(config);
    let (tls, source) =
        ServerTls::load(&config.tls.cert, &config.tls.key, &config.data_dir, &names).context("[tls] cert/key: cannot load the certificate")?;
    if let CertSource::Generated | CertSource::Regenerated { .. } = source {
        tracing::warn!(cert = %tls.cert_path().display(), names = %names, "generated a new self-signed certificate");
    }
    Ok(Some(tls))
}

fn acme_settings(c: &Config) -> acme::Settings {
    let a = &c.tls.acme;
    acme::Settings {
        directory: a.directory.clone(),
        contact: a.contact.clone(),
        names: c.acme_names(),
        renew_days: a.renew_days,
        ca_file: (!a.ca_file.as_os_str().is_empty()).then(|| a.ca_file.clone()),
        check_every: Duration::from_secs(a.check_secs),
        data_dir: c.data_dir.clone(),
    }
}

fn outbound_settings(c: &Config, own_addresses: Vec<SocketAddr>, reports: mail_framework::reports::ReportSettings) -> OutboundSettings {
    let d = &c.delivery;
    let mut client = ClientSettings::new(c.hostname.clone());
    client.bind_address = d.bind_address.parse().ok();
    client.starttls = d.starttls;
    let mail_router = (!d.mail_router.is_empty()).then(|| match d.mail_router.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.contains(':') => (host.to_string(), port.parse().unwrap_or(25)),
        _ => (d.mail_router.clone(), d.remote_port),
    });
    OutboundSettings {
        client,
        route: RouteSettings {
            mail_router,
            remote_port: d.remote_port,
            host_table: d.host_table.iter().filter_map(|(h, ip)| Some((h.clone(), ip.parse().ok()?))).collect(),
            own_addresses,
            own_hostname: c.hostname.clone(),
        },
        schedule: Schedule {
            first_count: d.first_retry_count,
            first_interval_secs: d.first_retry_interval_secs as i64,
            second_count: d.second_retry_count,
            second_interval_secs: d.second_retry_interval_secs as i64,
            lifetime_secs: d.queue_lifetime_hours as i64 * 3600,
            delay_warning_secs: d.delay_warning_secs as i64,
        },
        max_connections: d.max_connections,
        max_connections_per_domain: d.max_connections_per_domain,
        connection_reuse_idle: std::time::Duration::from_secs(d.connection_reuse_secs),
        connection_reuse_limit: d.connection_reuse_limit,
        reports,
        // Bounces and forwarded mail are signed by the domain local senders use, else the first.
        dkim_domains: std::iter::once(c.local_sender_domain()).chain(c.domains.iter().cloned()).collect(),
    }
}

/// How delivery reports are signed (C4).
fn report_settings(c: &Config) -> mail_framework::reports::ReportSettings {
    let responsible = (!c.delivery.dsn_responsible_person.is_empty()).then(|| c.delivery.dsn_responsible_person.clone());
    mail_framework::reports::ReportSettings { hostname: c.hostname.clone(), responsible_person: responsible }
}

/// The framework's snap-ins with their settings from `c`.
fn snapin_chain(c: &Config) -> Vec<Box<dyn mail_framework::pipeline::SnapIn>> {
    mail_framework::snapins::builtin(&mail_framework::snapins::Settings {
        postmaster: c.postmaster.to_ascii_lowercase(),
        filter_max_bytes: c.storage.filter_max_bytes,
        keep_unscannable: c.storage.filter_unscannable == postroom::config::Unscannable::Keep,
        reports: report_settings(c),
        etrn: mail_framework::outbound::EtrnDomains::new(&c.delivery.etrn_domains),
    })
}

fn smtp_settings(c: &Config) -> SmtpSettings {
    SmtpSettings {
        hostname: c.hostname.clone(),
        max_message_size: c.smtp.max_message_size,
        max_recipients: c.smtp.max_recipients,
        max_sessions: c.smtp.max_sessions,
        max_sessions_per_ip: c.smtp.max_sessions_per_ip,
        submission_max_sessions: c.smtp.submission_max_sessions,
        submission_max_sessions_per_ip: c.smtp.submission_max_sessions_per_ip,
        local_max_sessions: c.smtp.local_max_sessions,
        local_sender_domain: c.local_sender_domain(),
        greeting_timeout: Duration::from_secs(c.smtp.greeting_timeout_secs),
        max_session: Duration::from_secs(c.smtp.max_session_secs),
        command_timeout: Duration::from_secs(c.smtp.command_timeout_secs),
        data_timeout: Duration::from_secs(c.smtp.data_timeout_secs),
        vrfy: c.smtp.vrfy,
        allow_bare_lf: c.smtp.allow_bare_lf,
        max_hops: c.smtp.max_hops,
        max_errors: c.smtp.max_errors as u32,
        policy: relay_policy(c),
        mx_auth: mx_auth(c),
        plaintext_auth_from_loopback: c.tls.allow_plaintext_auth == PlaintextAuth::Loopback,
        tls_handshake_timeout: Duration::from_secs(c.tls.handshake_timeout_secs),
        dsn: c.smtp.dsn,
        etrn_domains: mail_framework::outbound::EtrnDomains::new(&c.delivery.etrn_domains),
        sender_auth: sender_auth_policy(c),
        greylist: greylist_policy(c),
        milters: milters(c),
    }
}

/// Issue 21: `[milter]`, each listener's milters in order (names validated).
fn milters(c: &Config) -> smtp_server::milters::Milters {
    let m = &c.milter;
    let pick = |names: &[String]| -> Vec<milter::client::Milter> {
        names
            .iter()
            .filter_map(|n| m.servers.iter().find(|s| s.name == *n))
            .filter_map(|s| {
                Some(milter::client::Milter {
                    name: s.name.clone(),
                    address: milter::client::Address::parse(&s.address)?,
                    timeout: Duration::from_secs(s.timeout_secs),
                    default_action: match s.default_action {
                        postroom::config::MilterDefault::Tempfail => milter::DefaultAction::Tempfail,
                        postroom::config::MilterDefault::Accept => milter::DefaultAction::Accept,
                    },
                })
            })
            .collect()
    };
    smtp_server::milters::Milters { mx: pick(&m.mx), submission: pick(&m.submission) }
}

/// Issue 21: the greylisting settings (`[greylist]`; also used by `explain`).
pub fn greylist_policy(c: &Config) -> policy::greylist::GreylistPolicy {
    let g = &c.greylist;
    // Validated: small enough for seconds in an i64.
    policy::greylist::GreylistPolicy {
        enabled: g.enabled,
        delay_secs: g.delay_secs as i64,
        retry_window_secs: g.retry_window_hours as i64 * 3600,
        max_age_secs: g.max_age_days as i64 * 86_400,
        auto_allow_after: g.auto_allow_after,
    }
}

/// The inbound sender-authentication settings (`[auth]`, E1; also used by `explain`).
pub fn sender_auth_policy(c: &Config) -> policy::SenderAuthPolicy {
    policy::SenderAuthPolicy {
        checks: c.auth.checks,
        dmarc: match c.auth.dmarc {
            postroom::config::DmarcAction::Enforce => policy::DmarcMode::Enforce,
            postroom::config::DmarcAction::Record => policy::DmarcMode::Record,
        },
        spf_refuse_fail: c.auth.spf_refuse_fail,
    }
}

/// What the MX listener demands (`[smtp] auth`, A2).
pub fn mx_auth(c: &Config) -> ListenerAuth {
    match c.smtp.auth {
        AuthMode::None => ListenerAuth::None,
        AuthMode::Relay => ListenerAuth::Relay,
        AuthMode::LocalAndRelay => ListenerAuth::LocalAndRelay,
    }
}

/// The relay and connection settings the policy module decides with (also used by `explain`).
pub fn relay_policy(c: &Config) -> RelayPolicy {
    RelayPolicy {
        mode: match c.relay.mode {
            RelayMode::All => policy::RelayMode::All,
            RelayMode::None => policy::RelayMode::None,
            RelayMode::Near => policy::RelayMode::Near,
            RelayMode::List => policy::RelayMode::List,
            RelayMode::Both => policy::RelayMode::Both,
        },
        pop_minutes: c.relay.pop_minutes,
        override_reject_connect: c.relay.override_reject_connect,
        percent_routing: c.smtp.percent_routing,
        helo_verify: match c.smtp.helo_verify {
            HeloVerify::Off => policy::HeloVerify::Off,
            HeloVerify::Log => policy::HeloVerify::Log,
            HeloVerify::Reject => policy::HeloVerify::Reject,
        },
        primary_domain: c.domains.first().cloned().unwrap_or_default(),
        verify_from_user: match c.smtp.verify_from_user {
            VerifyFromUser::Off => VerifyFrom::Off,
            VerifyFromUser::All => VerifyFrom::All,
            VerifyFromUser::NotOnAcceptList => VerifyFrom::NotOnAcceptList,
        },
        etrn_only_relay_clients: c.delivery.etrn_clients == postroom::config::EtrnClients::Relay,
    }
}

fn pop3_settings(c: &Config) -> Pop3Settings {
    Pop3Settings {
        hostname: c.hostname.clone(),
        inactivity_timeout: Duration::from_secs(c.pop3.inactivity_timeout_secs),
        max_sessions: c.pop3.max_sessions,
        max_sessions_per_ip: c.pop3.max_sessions_per_ip,
        plaintext_from_loopback: c.tls.allow_plaintext_auth == PlaintextAuth::Loopback,
        tls_handshake_timeout: Duration::from_secs(c.tls.handshake_timeout_secs),
    }
}

/// `[ldap]` (O5). Networks were checked by `validate`; the base DN comes from the first domain.
fn ldap_settings(c: &Config) -> LdapSettings {
    let l = &c.ldap;
    LdapSettings {
        domain: c.domains.first().cloned().unwrap_or_else(|| c.hostname.clone()),
        anonymous_networks: l.anonymous_networks.iter().filter_map(|n| postroom::config::parse_network(n)).collect(),
        size_limit: l.size_limit,
        max_sessions: l.max_sessions,
        inactivity_timeout: Duration::from_secs(l.inactivity_timeout_secs),
        tls_handshake_timeout: Duration::from_secs(c.tls.handshake_timeout_secs),
    }
}

/// `[admin]` (E6): read at start only; every key of the section waits for a restart (reload.rs).
fn console_settings(c: &Config) -> admin_web::ConsoleSettings {
    admin_web::ConsoleSettings {
        session_idle: Duration::from_secs(c.admin.session_minutes.max(1) * 60),
        https: c.admin.https,
        hostname: c.hostname.clone(),
        domains: c.domains.clone(),
        postmaster: c.postmaster.clone(),
        data_dir: c.data_dir.clone(),
        tls_handshake_timeout: Duration::from_secs(c.tls.handshake_timeout_secs),
    }
}

/// Written atomically (a new temp file, never through a link, then rename), 0600, so a reader
/// never sees half of it (D4).
fn write_listening(config: &Config, lines: &[String]) -> anyhow::Result<()> {
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    store::write_private_atomic(&config.data_dir, LISTENING_FILE, text.as_bytes())
        .with_context(|| format!("writing {}", config.data_dir.join(LISTENING_FILE).display()))
}

/// SIGTERM and SIGINT, as a stream: the first starts a graceful shutdown, the second ends it.
/// SIGHUP reloads the configuration (O6).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())?, hup: signal(SignalKind::hangup())? })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }

    /// The next SIGTERM or SIGINT; a SIGHUP meanwhile (a reload while stopping) is ignored.
    async fn stop(&mut self) {
        while self.next().await == Signal::Reload {}
    }
}

/// What a reload (O6) replaces the settings of: the servers, the framework's snap-ins, the
/// outbound queue and the certificate. See reload.rs for which keys it applies.
struct Live {
    source: crate::reload::Source,
    running: Config,
    smtp: SmtpServer,
    pop3: Pop3Server,
    ldap: LdapServer,
    framework: Framework,
    outbound: OutboundQueue,
    tls: Option<ServerTls>,
    /// The SMTP listeners' addresses (an MX that leads back to them is a loop).
    own: Vec<SocketAddr>,
}

impl Live {
    /// SIGHUP: read the file again; apply it, or keep everything as it is and say why.
    async fn reload(&mut self) {
        crate::reload::notify(&crate::reload::reloading());
        let (source, running) = (self.source.clone(), self.running.clone());
        // File reads and perhaps a certificate to generate: off the async workers.
        let prepared = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let file = source.load().map_err(|e| e.to_string())?;
            let reload = crate::reload::prepare(&running, file)?;
            let tls = load_tls_files(&reload.effective).map_err(|e| format!("{e:#}"))?;
            Ok((reload, tls))
        })
        .await
        .unwrap_or_else(|e| Err(format!("the reload failed: {e}")));
        let (reload, tls) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("configuration not reloaded; the running configuration stays in use: {e}");
                crate::reload::notify("READY=1\nSTATUS=ready; the last reload was refused (see the log)");
                return;
            }
        };
        let c = &reload.effective;
        self.smtp.update_settings(smtp_settings(c));
        self.pop3.update_settings(pop3_settings(c));
        self.ldap.update_settings(ldap_settings(c));
        self.framework.replace_snapins(snapin_chain(c));
        self.outbound.update_settings(outbound_settings(c, self.own.clone(), report_settings(c)));
        if let (Some(running), Some(new)) = (&self.tls, &tls) {
            // O6: once ACME has issued a certificate it stays; [tls] cert/key served until then.
            let changed = running.certificate() != new.certificate();
            if running.replace_with(new) && changed {
                let fp = tls::Fingerprints::of(&new.certificate());
                tracing::info!(cert = %new.cert_path().display(), sha256 = %fp.sha256, "TLS certificate replaced");
            }
        }
        for warning in c.warnings() {
            tracing::warn!("{warning}");
        }
        if !reload.waiting.is_empty() {
            tracing::warn!("configuration reload: these settings need a restart and keep their running values until then: {}", reload.waiting_text());
        }
        let changed = if reload.applied.is_empty() { "nothing to apply".to_string() } else { reload.applied.join(", ") };
        tracing::info!(file = %c.origin, "configuration reloaded: {changed}");
        self.running = reload.effective;
        crate::reload::notify("READY=1\nSTATUS=ready; configuration reloaded");
    }
}
