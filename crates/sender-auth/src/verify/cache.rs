//! The answers the checks have seen, kept for their DNS TTL and shared by every session (one
//! [`Caches`] per server, behind the verifier's `Arc`). mail-auth asks a cache before each
//! lookup and fills it with the parsed record and the expiry its resolver computed from the TTL;
//! it brings the trait, not a cache.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Instant;

use mail_auth::{MX, Parameters, RecordSet, ResolverCache, Txt};

/// Entries per record type. A busy MX sees a few thousand sending domains a day; past this the
/// expired entries go, and if none had expired, all of them (the next lookups refill it).
const CAPACITY: usize = 10_000;

/// One record type's answers, each until its TTL runs out.
pub struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K, V> Default for TtlCache<K, V> {
    fn default() -> Self {
        TtlCache { entries: Mutex::new(HashMap::new()) }
    }
}

impl<K, V> TtlCache<K, V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, Instant)>> {
        // A panic elsewhere cannot leave a map half-written: every update is one call.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut entries = self.lock();
        match entries.get(name) {
            Some((value, until)) if *until > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.remove(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().remove(name).map(|(value, _)| value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let mut entries = self.lock();
        if entries.len() >= CAPACITY {
            let now = Instant::now();
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, (value, valid_until));
    }
}

/// A cache per record type the checks look up: TXT (SPF, DKIM keys, DMARC), and the A, AAAA,
/// MX and PTR lookups of SPF mechanisms.
#[derive(Default)]
pub struct Caches {
    pub txt: TtlCache<Box<str>, Txt>,
    pub mx: TtlCache<Box<str>, RecordSet<MX>>,
    pub ipv4: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    pub ipv6: TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    pub ptr: TtlCache<IpAddr, RecordSet<Box<str>>>,
}

/// mail-auth's parameters for one check, with every cache.
pub type Cached<'x, P> = Parameters<
    'x,
    P,
    TtlCache<Box<str>, Txt>,
    TtlCache<Box<str>, RecordSet<MX>>,
    TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    TtlCache<IpAddr, RecordSet<Box<str>>>,
>;

impl Caches {
    pub fn parameters<P>(&self, params: P) -> Cached<'_, P> {
        Parameters::new(params)
            .with_txt_cache(&self.txt)
            .with_mx_cache(&self.mx)
            .with_ipv4_cache(&self.ipv4)
            .with_ipv6_cache(&self.ipv6)
            .with_ptr_cache(&self.ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn answers_live_for_their_ttl() {
        let cache: TtlCache<Box<str>, u32> = TtlCache::default();
        cache.insert("fresh.test.".into(), 1, Instant::now() + Duration::from_secs(60));
        cache.insert("stale.test.".into(), 2, Instant::now() - Duration::from_secs(1));
        assert_eq!(cache.get("fresh.test."), Some(1));
        assert_eq!(cache.get("stale.test."), None, "expired: asked again");
        assert_eq!(cache.len(), 1, "an expired entry goes when it is asked for");
    }

    #[test]
    fn a_full_cache_drops_the_expired_first() {
        let cache: TtlCache<Box<str>, usize> = TtlCache::default();
        let later = Instant::now() + Duration::from_secs(60);
        for i in 0..CAPACITY - 1 {
            cache.insert(format!("{i}.test.").into(), i, later);
        }
        cache.insert("old.test.".into(), 0, Instant::now() - Duration::from_secs(1));
        cache.insert("new.test.".into(), 1, later);
        assert_eq!(cache.len(), CAPACITY, "the expired entry made room");
        cache.insert("one-more.test.".into(), 2, later);
        assert_eq!(cache.len(), 1, "nothing expired: start again");
    }
}
