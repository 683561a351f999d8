//! The greylisting tables (issue 21): one row per triplet (client network, envelope sender,
//! recipient) and one per client network that has proven it retries. The decision over these
//! rows is `policy::greylist`; this module only reads and writes them, inside the caller's
//! transaction (the SMTP server does the lookup, the decision and the write in one request to
//! the store's writer, so two sessions of one client cannot both see a triplet as new).

use rusqlite::{Connection, OptionalExtension, params};

/// What greylisting is keyed by: the client's network (an IPv4 /24 as "192.0.2.0/24", an IPv6
/// /64 as "2001:db8:1:2::/64"), the envelope sender (lowercase, "" for the null sender) and the
/// recipient (lowercase). Built by `policy::greylist::triplet`, which normalises.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Triplet {
    pub network: String,
    pub sender: String,
    pub recipient: String,
}

/// A triplet's record, unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The first attempt of the current round (a triplet seen again after its retry window or
    /// its maximum age starts a new round).
    pub first_seen: i64,
    pub last_seen: i64,
    /// Attempts accepted; 0 while it is still greylisted.
    pub passed: u32,
}

/// A client network's record: how many of its triplets passed greylisting, and when it last
/// delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientSeen {
    pub passed_triplets: u32,
    pub last_seen: i64,
}

/// Everything stored about one triplet and its client network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Known {
    pub triplet: Option<Seen>,
    pub client: Option<ClientSeen>,
}

pub fn load(c: &Connection, t: &Triplet) -> rusqlite::Result<Known> {
    let triplet = c
        .prepare_cached("SELECT first_seen, last_seen, passed FROM greylist_triplets WHERE network = ?1 AND sender = ?2 AND recipient = ?3")?
        .query_row(params![t.network, t.sender, t.recipient], |r| Ok(Seen { first_seen: r.get(0)?, last_seen: r.get(1)?, passed: r.get(2)? }))
        .optional()?;
    let client = c
        .prepare_cached("SELECT passed_triplets, last_seen FROM greylist_clients WHERE network = ?1")?
        .query_row([&t.network], |r| Ok(ClientSeen { passed_triplets: r.get(0)?, last_seen: r.get(1)? }))
        .optional()?;
    Ok(Known { triplet, client })
}

/// Write the records a decision produced; `None` leaves a row as it is.
pub fn save(c: &Connection, t: &Triplet, triplet: Option<Seen>, client: Option<ClientSeen>) -> rusqlite::Result<()> {
    if let Some(s) = triplet {
        c.prepare_cached(
            "INSERT OR REPLACE INTO greylist_triplets (network, sender, recipient, first_seen, last_seen, passed) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![t.network, t.sender, t.recipient, s.first_seen, s.last_seen, s.passed])?;
    }
    if let Some(s) = client {
        let mut insert = c.prepare_cached("INSERT OR REPLACE INTO greylist_clients (network, passed_triplets, last_seen) VALUES (?1, ?2, ?3)")?;
        insert.execute(params![t.network, s.passed_triplets, s.last_seen])?;
    }
    Ok(())
}

/// Remove what greylisting would treat as new anyway: triplets that never passed and whose
/// retry window is over, triplets and clients not seen for `max_age_secs`. Returns the rows
/// removed.
pub fn expire(c: &Connection, now: i64, retry_window_secs: i64, max_age_secs: i64) -> rusqlite::Result<usize> {
    let triplets = c.execute(
        "DELETE FROM greylist_triplets WHERE (passed = 0 AND first_seen < ?1) OR last_seen < ?2",
        params![now - retry_window_secs, now - max_age_secs],
    )?;
    let clients = c.execute("DELETE FROM greylist_clients WHERE last_seen < ?1", [now - max_age_secs])?;
    Ok(triplets + clients)
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::{Durability, Store, StoreOptions};

    #[test]
    fn save_load_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let t = Triplet { network: "192.0.2.0/24".into(), sender: "".into(), recipient: "sam@example.test".into() };
        let other = Triplet { recipient: "kim@example.test".into(), ..t.clone() };
        let (a, b) = (t.clone(), other.clone());
        store
            .write_blocking(Durability::Normal, move |c| {
                save(c, &a, Some(Seen { first_seen: 1000, last_seen: 1000, passed: 0 }), None)?;
                save(c, &b, Some(Seen { first_seen: 100, last_seen: 5000, passed: 2 }), Some(ClientSeen { passed_triplets: 1, last_seen: 5000 }))?;
                Ok(())
            })
            .unwrap();
        let a = t.clone();
        let known = store.read_blocking(move |c| Ok(load(c, &a)?)).unwrap();
        assert_eq!(known.triplet, Some(Seen { first_seen: 1000, last_seen: 1000, passed: 0 }));
        assert_eq!(known.client, Some(ClientSeen { passed_triplets: 1, last_seen: 5000 }), "the client is the network's");
        // The unpassed triplet is past its window of 3000 s at 4001; the passed one stays.
        assert_eq!(store.write_blocking(Durability::Normal, |c| Ok(expire(c, 4001, 3000, 10_000)?)).unwrap(), 1);
        let (a, b) = (t.clone(), other.clone());
        let (gone, kept) = store.read_blocking(move |c| Ok((load(c, &a)?, load(c, &b)?))).unwrap();
        assert_eq!(gone.triplet, None);
        assert_eq!(kept.triplet.map(|s| s.passed), Some(2));
        // Past the maximum age both the triplet and the client go.
        assert_eq!(store.write_blocking(Durability::Normal, |c| Ok(expire(c, 20_000, 3000, 10_000)?)).unwrap(), 2);
        assert_eq!(store.read_blocking(move |c| Ok(load(c, &other)?)).unwrap(), Known::default());
    }
}
