//! argon2 on a small bounded pool, with a cache of recently verified credentials.
//!
//! A flood of bad passwords fills the pool's queue and is refused ([`DirectoryError::Busy`])
//! rather than starving sessions. Unknown users are verified against a dummy hash, so the
//! answer takes as long as for a real user. The cache keeps, per stored hash, a keyed BLAKE2b
//! digest of the last password that verified, so a POP client that polls every few minutes
//! does not pay argon2 each time; changing the password changes the hash and voids the entry.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::PasswordHasher;
use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Block, Params, Version};
use blake2::{Blake2b512, Digest};
use crossbeam_channel::{RecvTimeoutError, Sender, TrySendError};

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

/// Bounded pool of argon2 threads.
#[derive(Clone)]
pub struct PasswordPool {
    jobs: Sender<Job>,
    dummy_hash: Arc<String>,
    cache: Arc<Mutex<HashMap<String, CacheEntry>>>,
    cache_key: Arc<[u8; 32]>,
}

impl PasswordPool {
    /// `threads` workers and at most `queue` waiting verifications.
    pub fn new(threads: usize, queue: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue.max(1));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        match rx.recv_timeout(RELEASE_AFTER_IDLE) {
                            Ok(job) => job(),
                            Err(RecvTimeoutError::Timeout) => release_memory(),
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                })
                .expect("spawn argon2 thread");
        }
        let mut key = [0u8; 32];
        let _ = getrandom::fill(&mut key);
        let dummy = hash_password("postroom-dummy-password").unwrap_or_default();
        PasswordPool { jobs: tx, dummy_hash: Arc::new(dummy), cache: Arc::default(), cache_key: Arc::new(key) }
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.jobs.try_send(job) {
            Ok(()) => rx.await.map_err(|_| DirectoryError::Busy),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(DirectoryError::Busy),
        }
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

    #[test]
    fn empty_password_refused() {
        assert!(matches!(hash_password(""), Err(DirectoryError::EmptyPassword)));
    }
}
