//! The `dkim_keys` table (migrations/0010_dkim_keys.sql): the keys `postroom dkim` manages, and
//! the cache the outbound client signs from, reloaded only when the table changed.

use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use store::Store;

use crate::keys::{Algorithm, KeyPair};
use crate::sign::{KeyRing, SigningKey};

/// One row, private key included.
#[derive(Clone, Debug)]
pub struct StoredKey {
    pub id: i64,
    pub domain: String,
    pub selector: String,
    pub pair: KeyPair,
    /// Unix seconds.
    pub created: i64,
    /// When `postroom dkim check` last found the published record matching (unix seconds).
    pub checked: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error(
        "{domain} already has a key with selector {selector}: give --force to replace it (mail signed with the old key \
         then fails verification until the new record is published), or choose another --selector"
    )]
    SelectorTaken { domain: String, selector: String },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// Store `pair` as `domain`'s key under `selector`. An existing key under the same selector is
/// replaced only when `replace`; a key under another selector stays (key rotation, RFC 6376
/// §3.6.2.1: the new selector is published beside the old one). True when one was replaced.
pub fn insert(c: &Connection, domain: &str, selector: &str, pair: &KeyPair, now: i64, replace: bool) -> Result<bool, KeyStoreError> {
    let existing: Option<i64> =
        c.query_row("SELECT id FROM dkim_keys WHERE domain = ?1 AND selector = ?2", params![domain, selector], |r| r.get(0)).optional()?;
    if existing.is_some() && !replace {
        return Err(KeyStoreError::SelectorTaken { domain: domain.to_string(), selector: selector.to_string() });
    }
    c.execute("DELETE FROM dkim_keys WHERE domain = ?1 AND selector = ?2", params![domain, selector])?;
    c.execute(
        "INSERT INTO dkim_keys (domain, selector, algorithm, private_key, created) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![domain, selector, pair.algorithm.name(), pair.pkcs8(), now],
    )?;
    Ok(existing.is_some())
}

/// Every key, by domain, then newest first. A row whose key cannot be loaded is returned as an
/// error text naming it, so one bad row does not hide the others.
pub fn list(c: &Connection) -> rusqlite::Result<Vec<Result<StoredKey, String>>> {
    let mut stmt = c.prepare_cached(
        "SELECT id, domain, selector, algorithm, private_key, created, checked FROM dkim_keys ORDER BY domain, created DESC, id DESC",
    )?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?, r.get::<_, String>(3)?, r.get::<_, Vec<u8>>(4)?, r.get(5)?, r.get(6)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, domain, selector, algorithm, der, created, checked): (i64, String, String, String, Vec<u8>, i64, Option<i64>) = row?;
        let pair = Algorithm::from_name(&algorithm)
            .ok_or_else(|| format!("unknown algorithm {algorithm:?}"))
            .and_then(|a| KeyPair::from_pkcs8(a, der).map_err(|e| e.to_string()));
        out.push(match pair {
            Ok(pair) => Ok(StoredKey { id, domain, selector, pair, created, checked }),
            Err(e) => Err(format!("key {selector} of {domain}: {e}")),
        });
    }
    Ok(out)
}

/// Remove `domain`'s key under `selector`, or all its keys; how many went.
pub fn remove(c: &Connection, domain: &str, selector: Option<&str>) -> rusqlite::Result<usize> {
    match selector {
        Some(s) => c.execute("DELETE FROM dkim_keys WHERE domain = ?1 AND selector = ?2", params![domain, s]),
        None => c.execute("DELETE FROM dkim_keys WHERE domain = ?1", [domain]),
    }
}

/// `postroom dkim check` found the key's record published: from now on it is preferred over
/// newer keys that were not (a rotation switches once the new record is seen).
pub fn mark_checked(c: &Connection, id: i64, now: i64) -> rusqlite::Result<()> {
    c.execute("UPDATE dkim_keys SET checked = ?2 WHERE id = ?1", params![id, now])?;
    Ok(())
}

/// Keys, the largest id and the keys checked: changes with every insert and delete (ids are
/// AUTOINCREMENT, never reused) and every first check of a key.
type Version = (i64, i64, i64);

fn version(c: &Connection) -> rusqlite::Result<Version> {
    c.prepare_cached("SELECT count(*), coalesce(max(id), 0), coalesce(sum(checked IS NOT NULL), 0) FROM dkim_keys")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
}

/// The keys the outbound client signs with, loaded once and again only when the table changed
/// (one small indexed query per delivery to find out).
pub struct KeyCache {
    store: Store,
    /// Local domains, the preferred fallback first (see [`KeyRing::choose`]).
    fallback: Mutex<Vec<String>>,
    current: Mutex<Option<(Version, Arc<KeyRing>)>>,
}

impl KeyCache {
    pub fn new(store: Store, fallback: Vec<String>) -> Self {
        KeyCache { store, fallback: Mutex::new(fallback), current: Mutex::new(None) }
    }

    /// New fallback order (the configuration was reloaded); applies at the next [`KeyCache::keys`].
    pub fn set_fallback(&self, fallback: Vec<String>) {
        *self.fallback.lock().expect("dkim fallback") = fallback;
        *self.current.lock().expect("dkim keys") = None;
    }

    /// The keys now. A store error keeps the keys loaded before (signing goes on with them).
    pub async fn keys(&self) -> Arc<KeyRing> {
        let cached = self.current.lock().expect("dkim keys").clone();
        let seen = match self.store.read(|c| Ok(version(c)?)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the DKIM key table; signing with the keys loaded before");
                return cached.map(|(_, ring)| ring).unwrap_or_default();
            }
        };
        if let Some((v, ring)) = &cached
            && *v == seen
        {
            return ring.clone();
        }
        let rows = match self.store.read(|c| Ok(list(c)?)).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the DKIM keys; signing with the keys loaded before");
                return cached.map(|(_, ring)| ring).unwrap_or_default();
            }
        };
        let mut keys = Vec::new();
        for row in rows {
            match row {
                Ok(k) => keys.push(k),
                Err(e) => tracing::error!(error = %e, "DKIM key not usable; mail is signed without it"),
            }
        }
        let ring = Arc::new(ring_of(keys, self.fallback.lock().expect("dkim fallback").clone()));
        tracing::info!(keys = %ring.describe(), "DKIM signing keys loaded");
        *self.current.lock().expect("dkim keys") = Some((seen, ring.clone()));
        ring
    }
}

/// The signing keys among `keys`: per domain and algorithm, the newest key `dkim check` has seen
/// published, else the newest (a first key signs before anyone checked it; a rotation's new key
/// waits until its record is seen, while the old one goes on signing).
pub fn ring_of(mut keys: Vec<StoredKey>, fallback: Vec<String>) -> KeyRing {
    keys.sort_by_key(|k| (k.domain.clone(), k.pair.algorithm, k.checked.is_none(), -k.created, -k.id));
    let mut chosen: Vec<SigningKey> = Vec::new();
    for k in keys {
        if chosen.iter().any(|c| c.domain == k.domain && c.algorithm == k.pair.algorithm) {
            continue;
        }
        match k.pair.signing_key() {
            Ok(key) => chosen.push(SigningKey::new(&k.domain, &k.selector, k.pair.algorithm, key)),
            Err(e) => tracing::error!(domain = %k.domain, selector = %k.selector, error = %e, "DKIM key not usable"),
        }
    }
    KeyRing::new(chosen, fallback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::{Durability, StoreOptions};

    fn stored(id: i64, domain: &str, selector: &str, algorithm: Algorithm, created: i64, checked: Option<i64>) -> StoredKey {
        StoredKey { id, domain: domain.into(), selector: selector.into(), pair: crate::sign::tests::pair(algorithm), created, checked }
    }

    #[test]
    fn newest_checked_key_of_each_algorithm_signs() {
        use Algorithm::*;
        let ring = ring_of(
            vec![
                stored(1, "a.test", "old", RsaSha256, 100, Some(150)),
                stored(2, "a.test", "new", RsaSha256, 200, None),
                stored(3, "a.test", "ed", Ed25519Sha256, 50, None),
                stored(4, "b.test", "b1", RsaSha256, 100, None),
                stored(5, "b.test", "b2", RsaSha256, 200, None),
            ],
            vec![],
        );
        let pick = |d: &str| ring.choose(Some(d), None).iter().map(|k| k.selector.clone()).collect::<Vec<_>>();
        assert_eq!(pick("a.test"), ["old", "ed"], "the published old key until the new one is checked");
        assert_eq!(pick("b.test"), ["b2"], "none checked: the newest");
    }

    #[test]
    fn insert_refuses_a_taken_selector_unless_replacing_and_cache_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let pair = crate::sign::tests::pair(Algorithm::Ed25519Sha256);
        let p = pair.clone();
        store.write_blocking(Durability::Normal, move |c| Ok(insert(c, "a.test", "s1", &p, 1, false).unwrap())).unwrap();
        let p = pair.clone();
        let err = store.write_blocking(Durability::Normal, move |c| Ok(insert(c, "a.test", "s1", &p, 2, false).unwrap_err())).unwrap();
        assert!(err.to_string().contains("--force"), "{err}");
        let p = pair.clone();
        assert!(store.write_blocking(Durability::Normal, move |c| Ok(insert(c, "a.test", "s1", &p, 3, true).unwrap())).unwrap());

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let cache = KeyCache::new(store.clone(), vec!["a.test".into()]);
        let first = rt.block_on(cache.keys());
        assert_eq!(first.choose(None, None).len(), 1);
        assert!(Arc::ptr_eq(&first, &rt.block_on(cache.keys())), "unchanged table: no reload");
        assert_eq!(store.write_blocking(Durability::Normal, |c| Ok(remove(c, "a.test", None)?)).unwrap(), 1);
        assert!(rt.block_on(cache.keys()).choose(None, None).is_empty());
    }
}
