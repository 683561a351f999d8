//! argon2 on a small bounded pool, with a cache of recently verified credentials.
//!
//! A flood of bad passwords is refused ([`DirectoryError::Busy`]) rather than starving sessions:
//! each client may have only a few verifications queued, the threads serve the clients in turn,
//! and the queue as a whole is bounded. Unknown users are verified against a dummy hash, so the
//! answer takes as long as for a real user. The cache keeps, per stored hash, a keyed BLAKE2b
//! digest of the last password that verified, so a POP client that polls every few minutes
//! does not pay argon2 each time; changing the password changes the hash and voids the entry.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::PasswordHasher;
use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Block, Params, Version};
use blake2::{Blake2b512, Digest};

use crate::penalty::Offender;
use crate::{DirectoryError, Result};

/// Hash a password with argon2id and a fresh salt (blocking; for the CLI and the pool).
pub fn hash_password(password: &str) -> Result<String> {
    if password.is_empty() {
        return Err(DirectoryError::EmptyPassword);
    }
    Argon2::default().hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|e| DirectoryError::Hash(e.to_string()))
}

thread_local! {
    static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Gives this thread's argon2 working memory back to the operating system: a server that has
/// gone quiet after a burst of logins should not keep 19 MiB per pool thread resident. A block
/// this large is mmapped by the allocator, so dropping it unmaps it.
fn release_memory() {
    MEMORY.with(|memory| *memory.borrow_mut() = Vec::new());
}

/// Verify against a PHC string (blocking).
///
/// The argon2 working memory (19 MiB with the default parameters) is kept per thread and reused:
/// allocating it afresh for every verification makes glibc's heap grow by that much per login.
pub fn verify_password(hash: &str, password: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else { return false };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm.as_str()) else { return false };
    let Ok(version) = parsed.version.map(Version::try_from).transpose() else { return false };
    let Ok(params) = Params::try_from(&parsed) else { return false };
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version.unwrap_or_default(), params);
    let mut out = vec![0u8; expected.as_bytes().len()];
    let computed = MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        memory.resize(blocks, Block::new());
        argon2.hash_password_into_with_memory(password.as_bytes(), salt.as_ref(), &mut out, &mut memory[..blocks])
    });
    // Constant-time comparison: the time taken does not depend on where the bytes differ.
    computed.is_ok() && out.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

type Job = Box<dyn FnOnce() + Send>;
/// Digest of the password that last verified against a hash, and when.
type CacheEntry = ([u8; 64], Instant);

const CACHE_TTL: Duration = Duration::from_secs(3600);
const CACHE_MAX: usize = 10_000;
/// A pool thread with no verification for this long frees its argon2 memory.
const RELEASE_AFTER_IDLE: Duration = Duration::from_secs(10);
/// Verifications one client (one penalty-box key: an address, an IPv6 /64, or a user on a
/// relay-listed network) may have queued or running at once (A5).
pub const PER_CLIENT: usize = 2;

/// Bounded pool of argon2 threads, shared fairly between clients: each client ([`Offender`])
/// may have at most [`PER_CLIENT`] verifications waiting or running, and the threads take the
/// clients in turn, so a flood from a few addresses neither fills the queue for everyone nor
/// makes a login from elsewhere wait behind it.
#[derive(Clone)]
pub struct PasswordPool {
    queue: Arc<Handle>,
    /// Whose verifications these are (`None`: not attributed to a client, e.g. hashing).
    client: Option<Offender>,
    dummy_hash: Arc<String>,
    cache: Arc<Mutex<HashMap<String, CacheEntry>>>,
    cache_key: Arc<[u8; 32]>,
}

/// The jobs, one lane per client, served round-robin.
struct Queue {
    state: Mutex<Lanes>,
    ready: Condvar,
    /// Jobs waiting (not running), all clients together.
    capacity: usize,
}

#[derive(Default)]
struct Lanes {
    lanes: HashMap<Option<Offender>, Lane>,
    /// Clients with waiting jobs, in the order they are served.
    turn: VecDeque<Option<Offender>>,
    waiting: usize,
    closed: bool,
}

#[derive(Default)]
struct Lane {
    jobs: VecDeque<Job>,
    /// Jobs waiting or running.
    outstanding: usize,
}

/// The pool handles' share of the queue: when the last handle goes, the threads end.
struct Handle(Arc<Queue>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.state.lock().expect("argon2 queue").closed = true;
        self.0.ready.notify_all();
    }
}

impl Queue {
    fn push(&self, client: Option<Offender>, job: Job) -> Result<()> {
        let mut state = self.state.lock().expect("argon2 queue");
        if state.waiting >= self.capacity {
            return Err(DirectoryError::Busy);
        }
        let lane = state.lanes.entry(client.clone()).or_default();
        // Unattributed work (hashing for the CLI) is bounded by the queue alone.
        if client.is_some() && lane.outstanding >= PER_CLIENT {
            return Err(DirectoryError::Busy);
        }
        lane.outstanding += 1;
        lane.jobs.push_back(job);
        if lane.jobs.len() == 1 {
            state.turn.push_back(client);
        }
        state.waiting += 1;
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, taking the clients in turn; `None` when the pool is closed.
    fn next(&self) -> Option<(Option<Offender>, Job)> {
        let mut state = self.state.lock().expect("argon2 queue");
        loop {
            if let Some(client) = state.turn.pop_front() {
                let lane = state.lanes.get_mut(&client).expect("a lane for each turn");
                let job = lane.jobs.pop_front().expect("a turn means a waiting job");
                if !lane.jobs.is_empty() {
                    state.turn.push_back(client.clone());
                }
                state.waiting -= 1;
                return Some((client, job));
            }
            if state.closed {
                return None;
            }
            let (s, timeout) = self.ready.wait_timeout(state, RELEASE_AFTER_IDLE).expect("argon2 queue");
            state = s;
            if timeout.timed_out() && state.turn.is_empty() {
                drop(state);
                release_memory();
                state = self.state.lock().expect("argon2 queue");
            }
        }
    }

    fn done(&self, client: &Option<Offender>) {
        let mut state = self.state.lock().expect("argon2 queue");
        if let Some(lane) = state.lanes.get_mut(client) {
            lane.outstanding -= 1;
            if lane.outstanding == 0 {
                state.lanes.remove(client);
            }
        }
    }
}

impl PasswordPool {
    /// `threads` workers and at most `queue` waiting verifications.
    pub fn new(threads: usize, queue: usize) -> Self {
        let shared = Arc::new(Queue { state: Mutex::default(), ready: Condvar::new(), capacity: queue.max(1) });
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    while let Some((client, job)) = shared.next() {
                        // A panicking job must not take the thread or the client's share with it.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        shared.done(&client);
                    }
                })
                .expect("spawn argon2 thread");
        }
        let mut key = [0u8; 32];
        let _ = getrandom::fill(&mut key);
        let dummy = hash_password("postroom-dummy-password").unwrap_or_default();
        PasswordPool { queue: Arc::new(Handle(shared)), client: None, dummy_hash: Arc::new(dummy), cache: Arc::default(), cache_key: Arc::new(key) }
    }

    /// Verifications waiting for a thread now, and how many the queue holds (`/metrics`).
    pub fn queued(&self) -> (usize, usize) {
        let queue = &self.queue.0;
        (queue.state.lock().expect("argon2 queue").waiting, queue.capacity)
    }

    /// This pool, with verifications counted against `client`'s share (A5): the key the
    /// penalty box counts the login against.
    pub fn for_client(&self, client: Offender) -> Self {
        PasswordPool { client: Some(client), ..self.clone() }
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.queue.0.push(self.client.clone(), job)?;
        rx.await.map_err(|_| DirectoryError::Busy)
    }

    pub async fn hash(&self, password: String) -> Result<String> {
        self.run(move || hash_password(&password)).await?
    }

    /// Verify `password` against `hash`; `None` (unknown user) costs the same and fails.
    pub async fn verify(&self, hash: Option<String>, password: String) -> Result<bool> {
        let Some(hash) = hash else {
            let dummy = self.dummy_hash.clone();
            self.run(move || verify_password(&dummy, &password)).await?;
            return Ok(false);
        };
        let digest = self.digest(&hash, &password);
        if let Some((d, at)) = self.cache.lock().expect("cache lock").get(&hash)
            && *d == digest
            && at.elapsed() < CACHE_TTL
        {
            return Ok(true);
        }
        let h = hash.clone();
        let ok = self.run(move || verify_password(&h, &password)).await?;
        if ok {
            let mut cache = self.cache.lock().expect("cache lock");
            if cache.len() >= CACHE_MAX {
                cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(hash, (digest, Instant::now()));
        }
        Ok(ok)
    }

    fn digest(&self, hash: &str, password: &str) -> [u8; 64] {
        let mut h = Blake2b512::new();
        h.update(self.cache_key.as_slice());
        h.update(hash.as_bytes());
        h.update([0u8]);
        h.update(password.as_bytes());
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verify_and_cache() {
        let pool = PasswordPool::new(1, 4);
        let hash = pool.hash("secret".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(pool.verify(Some(hash.clone()), "secret".into()).await.unwrap());
        // Second time comes from the cache; a wrong password still fails.
        assert!(pool.verify(Some(hash.clone()), "secret".into()).await.unwrap());
        assert!(!pool.verify(Some(hash.clone()), "Secret".into()).await.unwrap());
        assert!(!pool.verify(None, "secret".into()).await.unwrap());
    }

    #[test]
    fn verifies_hashes_with_reused_memory() {
        let h = hash_password("correct horse").unwrap();
        for _ in 0..3 {
            assert!(verify_password(&h, "correct horse"));
            assert!(!verify_password(&h, "correct horsE"));
        }
        assert!(!verify_password("not a phc string", "x"));
        assert!(MEMORY.with(|m| m.borrow().capacity()) >= 19 * 1024, "19 MiB of 1 KiB blocks kept");
        release_memory();
        assert_eq!(MEMORY.with(|m| m.borrow().capacity()), 0);
        assert!(verify_password(&h, "correct horse"), "verifies again after the release");
    }

    fn client(ip: &str) -> Offender {
        Offender::address(ip.parse().unwrap())
    }

    /// Occupy every thread of `pool` until the returned sender is dropped.
    async fn block_threads(pool: &PasswordPool, threads: usize) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..threads {
            let (rx, started_tx) = (rx.clone(), started_tx.clone());
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = started_tx.send(());
                    let _ = rx.lock().unwrap().recv();
                })
                .await
            });
        }
        for _ in 0..threads {
            started.recv().await.unwrap();
        }
        tx
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// A5: one client may have at most PER_CLIENT verifications queued or running; beyond that
    /// it is refused (Busy), and other clients are still taken.
    #[tokio::test]
    async fn each_client_gets_at_most_its_share_of_the_queue() {
        let pool = PasswordPool::new(1, 64);
        let unblock = block_threads(&pool, 1).await;
        let attacker = pool.for_client(client("192.0.2.66"));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let attacker = attacker.clone();
            tasks.push(tokio::spawn(async move { attacker.run(|| ()).await }));
        }
        settle().await;
        let legit = tokio::spawn({
            let legit = pool.for_client(client("198.51.100.7"));
            async move { legit.run(|| ()).await }
        });
        settle().await;
        let busy = tasks.iter().filter(|t| t.is_finished()).count();
        assert_eq!(busy, 50 - PER_CLIENT, "all but the attacker's share refused at once");
        assert!(!legit.is_finished(), "the legitimate client is queued, not refused");
        drop(unblock);
        legit.await.unwrap().expect("the legitimate client is verified");
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => ok += 1,
                Err(e) => assert!(matches!(e, DirectoryError::Busy)),
            }
        }
        assert_eq!(ok, PER_CLIENT);
        // Once its verifications are done the client has its share again.
        attacker.run(|| ()).await.expect("share given back");
        assert!(pool.queue.0.state.lock().unwrap().lanes.is_empty(), "lanes are forgotten when idle");
    }

    /// A5: the threads take the clients in turn: a login from elsewhere waits for at most one
    /// job per other client, not for everything an attacker queued.
    #[tokio::test]
    async fn clients_are_served_in_turn() {
        let pool = PasswordPool::new(1, 64);
        let unblock = block_threads(&pool, 1).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (who, label) in [("192.0.2.1", "a1"), ("192.0.2.1", "a2"), ("192.0.2.2", "b1"), ("192.0.2.2", "b2"), ("192.0.2.3", "c1")] {
            let (p, order) = (pool.for_client(client(who)), order.clone());
            tasks.push(tokio::spawn(async move { p.run(move || order.lock().unwrap().push(label)).await }));
            settle().await;
        }
        drop(unblock);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a1", "b1", "c1", "a2", "b2"]);
    }

    /// The queue as a whole stays bounded.
    #[tokio::test]
    async fn the_queue_is_bounded() {
        let pool = PasswordPool::new(1, 3);
        let unblock = block_threads(&pool, 1).await;
        let mut tasks = Vec::new();
        for i in 0..3 {
            let p = pool.for_client(client(&format!("192.0.2.{i}")));
            tasks.push(tokio::spawn(async move { p.run(|| ()).await }));
        }
        settle().await;
        let late = pool.for_client(client("192.0.2.9"));
        assert!(matches!(late.run(|| ()).await, Err(DirectoryError::Busy)));
        drop(unblock);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        late.run(|| ()).await.expect("room again");
    }

    /// A5: while attackers keep their shares full with wrong passwords, a login from another
    /// address is still verified (and an unknown user still costs an argon2 verification).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_flood_from_a_few_addresses_does_not_starve_a_login() {
        let pool = PasswordPool::new(2, 256);
        let hash = hash_password("right").unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut attackers = Vec::new();
        for a in 0..9 {
            for _ in 0..20 {
                let (p, hash, stop) = (pool.for_client(client(&format!("192.0.2.{a}"))), hash.clone(), stop.clone());
                attackers.push(tokio::spawn(async move {
                    let mut busy = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match p.verify(Some(hash.clone()), "wrong".into()).await {
                            Ok(ok) => assert!(!ok),
                            Err(_) => {
                                busy += 1;
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                    busy
                }));
            }
        }
        settle().await;
        let legit = pool.for_client(client("198.51.100.7"));
        let t0 = Instant::now();
        assert!(legit.verify(Some(hash.clone()), "right".into()).await.expect("not refused as busy"));
        assert!(!legit.verify(None, "right".into()).await.expect("unknown user: not refused either"));
        let took = t0.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let busy: usize = futures_join(attackers).await;
        assert!(busy > 0, "the attackers were held to their share");
        eprintln!("legitimate login (right password, then an unknown user) took {took:?} under the flood");
    }

    async fn futures_join(tasks: Vec<tokio::task::JoinHandle<usize>>) -> usize {
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        n
    }

    #[test]
    fn empty_password_refused() {
        assert!(matches!(hash_password(""), Err(DirectoryError::EmptyPassword)));
    }
}
