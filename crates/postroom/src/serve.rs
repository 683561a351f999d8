//! `postroom serve`: wire configuration, store, framework and servers together.

use std::time::Duration;

use anyhow::Context;
use directory::penalty::{LoginLimits, PenaltyBox};
use directory::{LocalDomains, PasswordPool};
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

pub fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(&config);
    raise_descriptor_limit(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(config))
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
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level).unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: a log file or the journal would keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
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
    let responsible = (!config.delivery.dsn_responsible_person.is_empty()).then(|| config.delivery.dsn_responsible_person.clone());
    let reports = mail_framework::reports::ReportSettings { hostname: config.hostname.clone(), responsible_person: responsible };
    spawn_send_scheduler(&config, store.clone());
    let storage = StorageGuard::default();
    let chain = mail_framework::snapins::builtin(&mail_framework::snapins::Settings {
        postmaster: domains.postmaster().to_string(),
        filter_max_bytes: config.storage.filter_max_bytes,
        keep_unscannable: config.storage.filter_unscannable == postroom::config::Unscannable::Keep,
        reports: reports.clone(),
        etrn: mail_framework::outbound::EtrnDomains::new(&config.delivery.etrn_domains),
    });
    let framework = Framework::with_snapins(queue.clone(), domains.clone(), chain).with_storage_guard(storage.clone());
    storage.monitor(store.clone(), config.data_dir.clone(), config.storage.min_free_mb, framework.pipeline_wake()).await;
    let (outbound_wake, pipeline_wake, framework_beat) = (framework.outbound_wake(), framework.pipeline_wake(), framework.heartbeat());
    tokio::spawn(framework.run());

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
    };
    let smtp = SmtpServer::new(smtp_settings(&config), services);
    let pop3 = Pop3Server::new(pop3_settings(&config), store.clone(), passwords, tls, penalty, shutdown);

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
    // F6: the local submission socket of `postroom sendmail` / `send`, inside the 0700 data dir.
    let socket = crate::sendmail::socket_path(&config);
    let _ = std::fs::remove_file(&socket);
    let local = tokio::net::UnixListener::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    }
    tokio::spawn(smtp.clone().serve_local(local));
    // The SMTP client: an MX that resolves to one of our own SMTP listeners is a loop.
    let own: Vec<SocketAddr> = bound.iter().filter(|l| l.starts_with("smtp ")).filter_map(|l| l[5..].parse().ok()).collect();
    let outbound = OutboundQueue::new(outbound_settings(&config, own, reports), store.clone(), dns, outbound_wake, pipeline_wake);
    // Both workers are alive from here on; `status` must not see a gap before their first round.
    framework_beat.beat();
    outbound.heartbeat().beat();
    spawn_status_writer(config.data_dir.clone(), store.clone(), framework_beat, outbound.heartbeat());
    tokio::spawn(outbound.clone().run());
    write_listening(&config, &bound)?;
    tracing::info!(listeners = ?bound, data_dir = %config.data_dir.display(), "postroom is ready");

    let mut signals = Signals::new()?;
    signals.next().await;
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
        let open = smtp.active_sessions() + pop3.active_sessions();
        if open == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = &mut grace => {
                tracing::warn!(open, "grace time over: closing the remaining sessions");
                break;
            }
            _ = signals.next() => {
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

/// How long open sessions may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// O2: every 2 s, the workers' last beats into data_dir/status for `postroom status`.
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

/// A dead store writer cannot be brought back in this process (every write would fail while
/// the listeners still answer): the server exits with an error so its supervisor restarts it.
fn spawn_status_writer(data_dir: std::path::PathBuf, store: Store, framework: Heartbeat, outbound: Heartbeat) {
    let write = move || {
        if !store.writer_alive() {
            tracing::error!("the store writer has stopped; exiting so the service manager restarts postroom");
            std::process::exit(70); // EX_SOFTWARE
        }
        let text = format!("pid {}\nupdated {}\nframework {}\noutbound {}\n", std::process::id(), store::now(), framework.last(), outbound.last());
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
/// upstream server, if one is set, to send what it holds for us (ETRN).
fn spawn_send_scheduler(config: &Config, store: Store) {
    let d = &config.delivery;
    if d.send_interval_secs == 0 {
        return;
    }
    let every = Duration::from_secs(d.send_interval_secs);
    let upstream: Option<SocketAddr> = d.etrn_upstream.parse().ok();
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
                match smtp_client::etrn::request(addr, &helo, &domains).await {
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

/// The certificate of `[tls]`, or the self-signed one in data_dir (made on first start);
/// reloaded when its files change (O6).
fn load_tls(config: &Config) -> anyhow::Result<Option<ServerTls>> {
    let (tls, source) = ServerTls::load(&config.tls.cert, &config.tls.key, &config.data_dir, &config.hostname)
        .context("[tls] cert/key: cannot load the certificate")?;
    match source {
        CertSource::Generated => tracing::warn!(cert = %tls.cert_path().display(), "no [tls] cert configured: generated a self-signed certificate"),
        CertSource::GeneratedEarlier => tracing::info!(cert = %tls.cert_path().display(), "using the self-signed certificate generated earlier"),
        CertSource::Files => {}
    }
    tls.spawn_reloader(Duration::from_secs(5));
    Ok(Some(tls))
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
        reports,
    }
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

/// Written atomically (a new temp file, never through a link, then rename), 0600, so a reader
/// never sees half of it (D4).
fn write_listening(config: &Config, lines: &[String]) -> anyhow::Result<()> {
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    store::write_private_atomic(&config.data_dir, LISTENING_FILE, text.as_bytes())
        .with_context(|| format!("writing {}", config.data_dir.join(LISTENING_FILE).display()))
}

/// SIGTERM and SIGINT, as a stream: the first starts a graceful shutdown, the second ends it.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
