//! The outbound queue manager: one actor that takes due recipients off the queue, groups them
//! into one delivery per message and destination domain, runs the deliveries within the
//! connection limits (C6), and records each recipient's outcome with the retry schedule (C3).
//! It sleeps until the next recipient falls due or the framework wakes it.
//!
//! Deliveries to the same next hop share connections (issue 17, as Postfix's connection cache):
//! a worker sends one message after another over one connection, RSET between them, taking
//! them from [`crate::next_hop::Lanes`]. Each message's outcome is recorded after its final
//! reply, before the next message starts.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dns::Dns;
use mail_framework::journal::{self, code};
use mail_framework::message;
use mail_framework::outbound::{self, Due, Outcome, Schedule};
use mail_framework::reports::ReportSettings;
use store::{Durability, Store};
use tokio::sync::{Notify, Semaphore};

use crate::conversation::{self, BodySource, ClientSettings, Connection, Credentials, Dsn, Envelope, RcptOutcome, SessionError};
use crate::next_hop::{Lanes, NextHop};
use crate::route::{self, Route, RouteSettings};

/// Everything the outbound side is configured with.
#[derive(Clone, Debug)]
pub struct OutboundSettings {
    pub client: ClientSettings,
    pub route: RouteSettings,
    pub schedule: Schedule,
    pub max_connections: usize,
    pub max_connections_per_domain: usize,
    /// Signs relayed and delayed reports.
    pub reports: ReportSettings,
    /// Local domains, in the order in which their DKIM keys sign mail whose From and envelope
    /// domains have none: forwarded mail, bounces (sender_auth::sign::KeyRing::choose).
    pub dkim_domains: Vec<String>,
    /// Issue 17: how long a connection waits, after a message, for another one to its next hop
    /// (`[delivery] connection_reuse_secs`), and how many messages it carries at most
    /// (`connection_reuse_limit`; 1: a new connection per message).
    pub connection_reuse_idle: Duration,
    pub connection_reuse_limit: usize,
}

/// Most recipients one scan takes; the rest wait for the next scan.
const SCAN: usize = 1000;
/// Longest sleep between scans: `postroom queue retry|release` change rows from another
/// process, and a scan (one indexed query) is cheap.
const MAX_IDLE: Duration = Duration::from_secs(1);
/// How long a claim lasts: longer than any attempt can take (every step of a conversation has
/// its own timeout). A claim of a process that died is released at the next start anyway.
const LEASE_SECS: i64 = 2 * 3600;
/// A claim about to run out within this margin is renewed before its message is sent: it must
/// outlast the attempt (issue 17: messages may wait for a worker's connection).
const LEASE_MARGIN_SECS: i64 = 3600;
/// A reused connection is closed after this long, whatever the message count (Postfix's
/// smtp_connection_reuse_time_limit).
const CONNECTION_TIME_LIMIT: Duration = Duration::from_secs(300);
/// How often mail held for ETRN is checked against the queue lifetime.
const EXPIRY_EVERY_SECS: i64 = 60;

#[derive(Clone)]
pub struct OutboundQueue {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced by [`OutboundQueue::update_settings`] (O6: SIGHUP); each attempt takes the
    /// settings current when it starts.
    settings: std::sync::RwLock<Arc<OutboundSettings>>,
    store: Store,
    dns: Option<Dns>,
    /// Woken by the framework when it forwards recipients, and by finished deliveries.
    wake: Arc<Notify>,
    /// Woken when recipients wait for the non-delivery snap-in.
    framework: Arc<Notify>,
    /// Deliveries running now; shutdown waits for them (a reply after the dot is recorded).
    active: tokio::sync::watch::Sender<usize>,
    stopping: std::sync::atomic::AtomicBool,
    last_expiry: std::sync::atomic::AtomicI64,
    heartbeat: mail_framework::heartbeat::Heartbeat,
    total: Arc<Semaphore>,
    per_domain: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// DKIM signing keys, reloaded when `postroom dkim` changed them.
    dkim: sender_auth::key_store::KeyCache,
    /// Messages waiting for a worker's connection to their next hop.
    lanes: Lanes<Job>,
    /// Tasks waiting for a slot in `total`; while any does, no worker idles on its slot.
    slot_waiters: std::sync::atomic::AtomicUsize,
    /// Ends idle workers' waiting: shutdown, or someone waits for a connection slot.
    idle_interrupt: Notify,
    /// Counts settings updates: connections made under other settings are not shared.
    generation: std::sync::atomic::AtomicU64,
}

/// The connection slots one worker holds (C6): its destination domain's and one in total.
type Slots = (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit);

/// One message for one destination domain, claimed, waiting for a connection to its next hop.
struct Job {
    attempt: i64,
    group: Vec<Due>,
    /// When the claim was made (its lease runs LEASE_SECS from then).
    claimed_at: i64,
    /// The settings at the scan; the next hop's generation says which.
    settings: Arc<OutboundSettings>,
    /// Sent when the outcome is recorded; dropped unsent when it never will be (shutdown).
    done: tokio::sync::oneshot::Sender<()>,
}

impl OutboundQueue {
    pub fn new(settings: OutboundSettings, store: Store, dns: Option<Dns>, wake: Arc<Notify>, framework: Arc<Notify>) -> Self {
        let total = Arc::new(Semaphore::new(settings.max_connections.max(1)));
        let dkim = sender_auth::key_store::KeyCache::new(store.clone(), settings.dkim_domains.clone());
        OutboundQueue {
            inner: Arc::new(Inner {
                settings: std::sync::RwLock::new(Arc::new(settings)),
                store,
                dns,
                wake,
                framework,
                active: tokio::sync::watch::Sender::new(0),
                stopping: Default::default(),
                last_expiry: Default::default(),
                heartbeat: Default::default(),
                total,
                per_domain: Mutex::default(),
                dkim,
                lanes: Lanes::default(),
                slot_waiters: Default::default(),
                idle_interrupt: Notify::new(),
                generation: Default::default(),
            }),
        }
    }

    /// The settings current now.
    fn settings(&self) -> Arc<OutboundSettings> {
        self.inner.settings.read().expect("outbound settings").clone()
    }

    /// The settings current now, and which update of them they are.
    fn settings_and_generation(&self) -> (Arc<OutboundSettings>, u64) {
        let settings = self.inner.settings.read().expect("outbound settings");
        (settings.clone(), self.inner.generation.load(Ordering::SeqCst))
    }

    /// New settings (O6: the configuration was reloaded), for the attempts that start from now
    /// on. The connection limits stay as they were made: `max_connections` and
    /// `max_connections_per_domain` need a restart.
    pub fn update_settings(&self, settings: OutboundSettings) {
        self.inner.dkim.set_fallback(settings.dkim_domains.clone());
        let mut current = self.inner.settings.write().expect("outbound settings");
        *current = Arc::new(settings);
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Stamped on every scan (`postroom status`).
    pub fn heartbeat(&self) -> mail_framework::heartbeat::Heartbeat {
        self.inner.heartbeat.clone()
    }

    /// Run until [`OutboundQueue::stop`].
    pub async fn run(self) {
        while !self.inner.stopping.load(Ordering::Relaxed) {
            self.inner.heartbeat.beat();
            let sleep = match self.scan().await {
                Ok(sleep) => sleep,
                Err(e) => {
                    tracing::error!(error = %e, "outbound queue scan failed");
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Shutdown (O3): start no new attempt, and wait until the running ones have recorded
    /// their outcomes — an attempt that has sent its final dot waits for the reply, so a clean
    /// shutdown never makes the next hop receive the message twice. Returns the number still
    /// running when `grace` ran out (their claims are released at the next start).
    pub async fn stop(&self, grace: Duration) -> usize {
        self.inner.stopping.store(true, Ordering::Relaxed);
        self.inner.wake.notify_one();
        // Idle connections say QUIT now rather than at the end of their wait.
        self.inner.idle_interrupt.notify_waiters();
        let mut active = self.inner.active.subscribe();
        let _ = tokio::time::timeout(grace, active.wait_for(|n| *n == 0)).await;
        *active.borrow()
    }

    /// Claim everything due and start its deliveries; returns how long to sleep before the
    /// next scan. Expired mail held for ETRN is failed here too, once a minute.
    async fn scan(&self) -> Result<Duration, store::StoreError> {
        let now = store::now();
        let next = self.inner.store.read(message::outbound::next_due).await?;
        let expire = self.inner.last_expiry.load(Ordering::Relaxed) + EXPIRY_EVERY_SECS <= now;
        if next.is_some_and(|at| at <= now) || expire {
            if expire {
                self.inner.last_expiry.store(now, Ordering::Relaxed);
            }
            let schedule = self.settings().schedule;
            let (attempt, claimed, expired) = self
                .inner
                .store
                .write(Durability::Normal, move |c| {
                    let expired = if expire { outbound::expire_etrn_held(c, &schedule, now)? } else { 0 };
                    let (attempt, claimed) = message::outbound::claim(c, now, SCAN, LEASE_SECS)?;
                    Ok((attempt, claimed, expired))
                })
                .await?;
            if expired > 0 {
                self.inner.framework.notify_one();
            }
            self.start(attempt, claimed);
        }
        let next = self.inner.store.read(message::outbound::next_due).await?;
        let sleep = match next {
            Some(at) if at > now => Duration::from_secs((at - now) as u64).min(MAX_IDLE),
            _ => MAX_IDLE,
        };
        Ok(sleep)
    }

    /// One delivery per message and destination domain, carrying all its recipients.
    fn start(&self, attempt: i64, claimed: Vec<Due>) {
        let mut groups: Vec<Vec<Due>> = Vec::new();
        for d in claimed {
            // Recipients expanded from different aliases carry different Delivered-To lines.
            let same = |g: &Vec<Due>| g[0].message_id == d.message_id && g[0].domain() == d.domain() && g[0].expanded_from == d.expanded_from;
            match groups.iter_mut().find(|g| same(g)) {
                Some(g) => g.push(d),
                None => groups.push(vec![d]),
            }
        }
        for group in groups {
            self.inner.active.send_modify(|n| *n += 1);
            let me = self.clone();
            tokio::spawn(async move {
                me.deliver_group(attempt, group).await;
                me.inner.active.send_modify(|n| *n -= 1);
            });
        }
    }

    /// C6: one of the `max_connections` outbound connection slots, for a connection made beside
    /// the deliveries (the send scheduler's ETRN to its upstream host, C7); waits while all are
    /// busy, like a delivery.
    pub async fn connection_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.total_slot().await
    }

    fn domain_limit(&self, domain: &str) -> Arc<Semaphore> {
        let mut map = self.inner.per_domain.lock().expect("per-domain limits");
        map.entry(domain.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.settings().max_connections_per_domain.max(1)))).clone()
    }

    /// C6: a slot for `domain`, then one in total; waits while they are busy, nothing is
    /// dropped. A worker idling on a connection gives its slots up when someone waits for one.
    async fn slots(&self, domain: &str) -> Slots {
        let domain_slot = self.domain_limit(domain).acquire_owned().await.expect("the connection limit is never closed");
        (domain_slot, self.total_slot().await)
    }

    async fn total_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        if let Ok(slot) = self.inner.total.clone().try_acquire_owned() {
            return slot;
        }
        self.inner.slot_waiters.fetch_add(1, Ordering::SeqCst);
        self.inner.idle_interrupt.notify_waiters();
        let slot = self.inner.total.clone().acquire_owned().await.expect("the connection limit is never closed");
        self.inner.slot_waiters.fetch_sub(1, Ordering::SeqCst);
        slot
    }

    /// One message for one destination domain: route it, then queue it for its next hop, where
    /// a worker with a connection to that hop sends it (issue 17). When no idle worker will
    /// surely take it, this task becomes a worker itself as soon as it has connection slots
    /// (C6) — or ends when another worker has delivered it meanwhile.
    async fn deliver_group(&self, attempt: i64, group: Vec<Due>) {
        let (settings, generation) = self.settings_and_generation();
        let domain = group[0].domain();
        let hosts = match route::route(&settings.route, self.inner.dns.as_ref(), &domain).await {
            Route::Hosts(h) => h,
            Route::Defer(why) => {
                self.journal(code::CLIENT_DEQUEUED, &group[0], &format!("{} recipient(s) for {domain}", group.len())).await;
                self.journal(code::CLIENT_DNS, &group[0], &why).await;
                let outcomes = vec![Outcome::retry(why); group.len()];
                return self.record(&settings, attempt, group, outcomes).await;
            }
            Route::Fail(why) => {
                self.journal(code::CLIENT_DEQUEUED, &group[0], &format!("{} recipient(s) for {domain}", group.len())).await;
                let outcomes = vec![Outcome::failed(why); group.len()];
                return self.record(&settings, attempt, group, outcomes).await;
            }
        };
        let hop = NextHop { domain, hosts, generation };
        let (done_tx, mut done) = tokio::sync::oneshot::channel();
        let job = Job { attempt, group, claimed_at: store::now(), settings, done: done_tx };
        if self.inner.lanes.push(&hop, job) {
            let _ = done.await;
            return;
        }
        loop {
            let slots = tokio::select! {
                _ = &mut done => return,
                slots = self.slots(&hop.domain) => slots,
            };
            if self.inner.stopping.load(Ordering::Relaxed) {
                return; // never started: the claim is released at the next start
            }
            match self.inner.lanes.pop(&hop) {
                Some(first) => self.work(&hop, slots, first).await,
                None => {
                    // Another worker took this message.
                    drop(slots);
                    let _ = done.await;
                    return;
                }
            }
            // That worker stopped (reuse limits, a broken connection); this task's message may
            // still wait, and needs a worker.
            if !matches!(done.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)) {
                return;
            }
        }
    }

    /// A delivery worker: one connection to `hop` at a time, holding `slots` (C6). After each
    /// message it takes the next one waiting for the same hop (or arriving within
    /// `connection_reuse_secs`) and sends it over the same connection, RSET between them; it
    /// stops after `connection_reuse_limit` messages, after CONNECTION_TIME_LIMIT, after a
    /// failure at the protocol level (421, timeout, broken pipe), when the queue manager stops,
    /// or when another destination waits for a connection slot.
    async fn work(&self, hop: &NextHop, slots: Slots, first: Job) {
        let settings = first.settings.clone();
        let mut connection: Option<Connection> = None;
        let mut job = first;
        loop {
            self.deliver_job(hop, &mut connection, job).await;
            let reusable = connection
                .as_ref()
                .is_some_and(|c| c.reusable() && c.messages() < settings.connection_reuse_limit && c.age() < CONNECTION_TIME_LIMIT);
            if !reusable || self.inner.stopping.load(Ordering::Relaxed) {
                break;
            }
            let next = match self.inner.lanes.pop(hop) {
                Some(next) => Some(next),
                // Slots are wanted elsewhere: no idling on them.
                None if self.inner.slot_waiters.load(Ordering::SeqCst) > 0 => None,
                None => self.inner.lanes.wait(hop, settings.connection_reuse_idle, &self.inner.idle_interrupt).await,
            };
            match next {
                Some(next) => job = next,
                None => break,
            }
        }
        if let Some(c) = connection {
            c.close().await;
        }
        drop(slots);
    }

    /// Send one message (over `connection` when there is one, else a new one, kept in
    /// `connection` when it may carry another), record its recipients' outcomes, and tell the
    /// message's task.
    async fn deliver_job(&self, hop: &NextHop, connection: &mut Option<Connection>, job: Job) {
        let Job { attempt, mut group, claimed_at, settings, done } = job;
        if self.inner.stopping.load(Ordering::Relaxed) {
            return; // never started: the claim is released at the next start
        }
        let now = store::now();
        if claimed_at + LEASE_SECS - LEASE_MARGIN_SECS <= now {
            // Waited long for a connection: the claim must outlast this attempt, or another
            // attempt could send the same recipients at the same time.
            let ids: Vec<i64> = group.iter().map(|d| d.recipient_id).collect();
            let until = now + LEASE_SECS;
            match self.inner.store.write(Durability::Normal, move |c| message::outbound::renew_claim(c, attempt, &ids, until)).await {
                Ok(held) => group.retain(|d| held.contains(&d.recipient_id)),
                Err(e) => {
                    tracing::error!(error = %e, "could not renew a claim; the message waits for the next scan");
                    return;
                }
            }
            if group.is_empty() {
                let _ = done.send(());
                return;
            }
        }
        let outcomes = self.attempt(&settings, hop, connection, &group).await;
        self.record(&settings, attempt, group, outcomes).await;
        let _ = done.send(());
    }

    /// Record the outcome of each recipient of one message (C3).
    async fn record(&self, settings: &OutboundSettings, attempt: i64, group: Vec<Due>, outcomes: Vec<Outcome>) {
        let (schedule, reports) = (settings.schedule, settings.reports.clone());
        let results: Vec<(Due, Outcome)> = group.into_iter().zip(outcomes).collect();
        count_outcomes(&results);
        let recorded =
            self.inner.store.write(Durability::Full, move |c| outbound::record(c, attempt, &results, &schedule, &reports, store::now())).await;
        match recorded {
            // Bounces and reports wait for the pipeline.
            Ok(_) => self.inner.framework.notify_one(),
            Err(e) => tracing::error!(error = %e, "could not record delivery results; the claim is released at the next start"),
        }
        self.inner.wake.notify_one();
    }

    /// Over the open connection to the next hop when there is one; else (or when it fails
    /// before the message's final dot) try each host and address in order until one gives
    /// per-recipient results. The connection that gave them stays in `connection` when it may
    /// carry the next message.
    async fn attempt(&self, settings: &OutboundSettings, hop: &NextHop, connection: &mut Option<Connection>, group: &[Due]) -> Vec<Outcome> {
        let first = &group[0];
        let domain = &hop.domain;
        self.journal(code::CLIENT_DEQUEUED, first, &format!("{} recipient(s) for {domain}", group.len())).await;
        let recipients: Vec<String> = group.iter().map(|d| d.address.clone()).collect();
        // RFC 3461 parameters go on only when some recipient or the message has any.
        let wants_dsn = group.iter().any(|d| d.notify.is_some() || d.orcpt.is_some()) || first.ret.is_some() || first.envid.is_some();
        let dsn = Dsn {
            ret: first.ret.clone(),
            envid: first.envid.clone(),
            recipients: group.iter().map(|d| (d.notify.clone(), d.orcpt.clone())).collect(),
            ..Default::default()
        };
        let envelope = Envelope {
            mail_from: &first.mail_from,
            recipients: &recipients,
            size: first.size as u64,
            eight_bit: true,
            dsn: wants_dsn.then_some(&dsn),
            auth_sender: first.auth_sender.as_deref(),
        };
        if let Err(e) = conversation::check_envelope(&settings.client, &envelope) {
            return vec![Outcome::retry(describe(&hop.hosts[0].name, &e)); group.len()];
        }
        // RFC 6376: every message that leaves is signed, with the keys as they are now.
        let keys = self.inner.dkim.keys().await;
        let dkim = (!keys.is_empty()).then_some(keys);
        let mut body = StoreBody::new(self.inner.store.clone(), first.message_id, first.expanded_from.as_deref());
        let prepared = match conversation::prepare(&mut body, dkim).await {
            Ok(p) => p,
            Err(e) => return vec![Outcome::retry(describe(&hop.hosts[0].name, &e)); group.len()],
        };
        let relayed = || !dsn.peer_offers.load(Ordering::Relaxed);
        let mut last_error = String::from("no host could be reached");
        let mut last_host: Option<String> = None;

        if let Some(mut c) = connection.take() {
            // RSET first: a connection the server closed meanwhile fails there, before anything
            // of this message was sent, and a new one is made below.
            if c.reset().await {
                body.rewind();
                let result = c.send(&envelope, &mut body, &prepared).await;
                let host = c.host().to_string();
                match result {
                    Ok(results) => {
                        *connection = Some(c);
                        return results.into_iter().map(|r| outcome(r, relayed()).from_host(&host)).collect();
                    }
                    Err(e) if e.is_permanent() => {
                        *connection = Some(c);
                        return vec![Outcome::failed(describe(&host, &e)).from_host(&host); group.len()];
                    }
                    // The message may have been taken (RFC 1047): never sent again at once.
                    Err(e) if c.dot_sent() => {
                        c.close().await;
                        let retry = Outcome::retry(describe(&host, &e));
                        return vec![if e.reply().is_some() { retry.from_host(&host) } else { retry }; group.len()];
                    }
                    // A 4xx to MAIL or DATA: this message waits, the connection carries the next.
                    Err(e @ SessionError::Rejected { .. }) if c.reusable() => {
                        *connection = Some(c);
                        return vec![Outcome::retry(describe(&host, &e)).from_host(&host); group.len()];
                    }
                    Err(e) => {
                        tracing::info!(host = %host, error = %e, "reused connection failed before the message's end; trying a new one");
                        c.close().await;
                    }
                }
            } else {
                c.close().await;
            }
        }

        for host in &hop.hosts {
            // C5: credentials for hosts on the host-authentication list.
            let name = host.name.clone();
            let credentials = match self.inner.store.read(move |c| directory::access::hostauth::entry(c, &name).map_err(directory::into_store)).await
            {
                Ok(entry) => entry.map(|e| Credentials { user: e.user, password: e.password, trust: e.trust }),
                Err(e) => {
                    // Without knowing whether the host gets credentials, do not talk to it.
                    last_error = format!("4.3.0 host {}: cannot read the host-authentication list: {e}", host.name);
                    last_host = None;
                    continue;
                }
            };
            for addr in &host.addrs {
                let mut tls = settings.client.starttls;
                loop {
                    let client = ClientSettings { starttls: tls, credentials: credentials.clone(), dkim: None, ..settings.client.clone() };
                    body.rewind();
                    let opened = Connection::open(&client, &host.name, *addr, tls || credentials.is_some()).await;
                    let result = match opened {
                        Ok(mut c) => {
                            let result = c.send(&envelope, &mut body, &prepared).await;
                            let keep = match &result {
                                Ok(_) => true,
                                Err(e) => e.is_permanent(),
                            };
                            if keep {
                                *connection = Some(c);
                            } else {
                                c.close().await;
                            }
                            result
                        }
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(results) => return results.into_iter().map(|r| outcome(r, relayed()).from_host(&host.name)).collect(),
                        // C5: a failed opportunistic handshake is retried in plaintext on the same
                        // host — never for a host that gets credentials: they go over verified TLS
                        // or not at all, and the mail waits (4.7.x) rather than bouncing.
                        Err(SessionError::Tls(e)) if tls && credentials.is_none() => {
                            tracing::info!(host = %host.name, error = %e, "STARTTLS failed; retrying in plaintext");
                            tls = false;
                        }
                        Err(e) if e.is_permanent() => {
                            return vec![Outcome::failed(describe(&host.name, &e)).from_host(&host.name); group.len()];
                        }
                        Err(e) => {
                            last_error = describe(&host.name, &e);
                            // RFC 3464 §2.3.5: only a host that replied is a Remote-MTA.
                            last_host = e.reply().map(|_| host.name.clone());
                            tracing::info!(host = %host.name, %addr, error = %last_error, "delivery attempt failed; trying the next host");
                            break;
                        }
                    }
                }
            }
        }
        let retry = match last_host {
            Some(host) => Outcome::retry(last_error).from_host(&host),
            None => Outcome::retry(last_error),
        };
        vec![retry; group.len()]
    }

    async fn journal(&self, code: &'static str, due: &Due, detail: &str) {
        let (qid, from, rcpt, detail) = (due.qid.clone(), due.mail_from.clone(), due.address.clone(), detail.to_string());
        let _ = self
            .inner
            .store
            .write(Durability::Normal, move |c| {
                Ok(journal::append(
                    c,
                    &journal::Entry { code, qid: &qid, originator: &from, recipient: &rcpt, detail: &detail, ..Default::default() },
                )?)
            })
            .await;
    }
}

/// `/metrics`: each recipient's result, and for a delivered one the time since its arrival.
fn count_outcomes(results: &[(Due, Outcome)]) {
    for (due, result) in results {
        match result {
            Outcome::Delivered { .. } => metrics::delivery("delivered", Some(store::now() - due.received_at)),
            Outcome::Retry { .. } => metrics::delivery("retry", None),
            Outcome::Failed { .. } => metrics::delivery("failed", None),
        }
    }
}

fn outcome(r: RcptOutcome, relayed: bool) -> Outcome {
    match r {
        RcptOutcome::Accepted => Outcome::Delivered { reply: "250 accepted".into(), relayed, remote_mta: None },
        RcptOutcome::Deferred(reply) => Outcome::retry(reply.to_string().trim_end()),
        RcptOutcome::Failed(reply) => Outcome::failed(reply.to_string().trim_end()),
    }
}

/// The reason recorded for a failed attempt, starting with its enhanced status code.
fn describe(host: &str, e: &SessionError) -> String {
    match e {
        // A 5xx greeting is skipped like a 4xx one (next MX, else later), so it must not read
        // as a permanent failure.
        SessionError::Rejected { stage: "greeting", reply } if reply.code >= 500 => {
            format!("4.4.1 host {host} refused to talk to me: {}", reply.to_string().trim_end())
        }
        SessionError::Rejected { stage, reply } => format!("{} (host {host} said at {stage})", reply.to_string().trim_end()),
        // C5 (RFC 3463, as Postfix says them): TLS needed but not offered, TLS failed or the
        // certificate not verified, authentication failed. The mail waits.
        SessionError::TlsRequired(_) => format!("4.7.4 host {host}: {e}; credentials not sent"),
        SessionError::Tls(_) => format!("4.7.5 host {host}: {e}; credentials not sent"),
        SessionError::Auth(_) => format!("4.7.0 host {host}: {e}"),
        // RFC 6152 §3, RFC 3463: conversion required but not supported.
        SessionError::Unconvertible(_) => format!("5.6.3 host {host}: {e}"),
        other => format!("4.4.1 host {host}: {other}"),
    }
}

/// The stored body, chunk by chunk, for one attempt; mail expanded from an alias or a
/// forwarding address starts with `Delivered-To:` for loop detection (F7). Read twice per
/// attempt (the conversion is planned first, see crate::encode), one chunk at a time.
struct StoreBody {
    store: Store,
    message_id: i64,
    delivered_to: Option<String>,
    /// The Delivered-To line was given out in this pass.
    header_given: bool,
    /// The chunk ids, once read, and how many were given out in this pass.
    chunks: Option<Vec<i64>>,
    next: usize,
}

impl StoreBody {
    fn new(store: Store, message_id: i64, expanded_from: Option<&str>) -> Self {
        let delivered_to = expanded_from.map(|a| format!("Delivered-To: {a}\r\n"));
        StoreBody { store, message_id, delivered_to, header_given: false, chunks: None, next: 0 }
    }
}

impl BodySource for StoreBody {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(header) = self.delivered_to.as_ref().filter(|_| !self.header_given) {
            self.header_given = true;
            return Ok(Some(header.clone().into_bytes()));
        }
        if self.chunks.is_none() {
            let id = self.message_id;
            let ids = self.store.read(move |c| message::body::chunk_ids(c, id)).await.map_err(std::io::Error::other)?;
            self.chunks = Some(ids);
        }
        match self.chunks.as_ref().and_then(|ids| ids.get(self.next)).copied() {
            Some(chunk) => {
                self.next += 1;
                Ok(Some(message::mailbox::chunk(&self.store, chunk).await.map_err(std::io::Error::other)?))
            }
            None => Ok(None),
        }
    }

    fn rewind(&mut self) {
        self.header_given = false;
        self.next = 0;
    }
}
