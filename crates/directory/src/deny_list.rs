//! The temporary deny list in the database (SPEC R9, A5): the running server mirrors its
//! penalty box here every few seconds, so `postroom list show deny` and `postroom explain` see
//! it and a restart keeps it; `postroom list remove deny` leaves a lift request the server
//! applies within seconds.

use rusqlite::{Connection, OptionalExtension, params};

use crate::penalty::{Offender, Reason};

/// One denied key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub key: String,
    /// Unix seconds.
    pub until: i64,
    pub reason: Reason,
}

/// Replace the mirror with `entries` (key text, until, reason).
pub fn mirror(c: &Connection, entries: &[(String, i64, Reason)]) -> rusqlite::Result<()> {
    c.execute("DELETE FROM denied", [])?;
    let mut insert = c.prepare_cached("INSERT OR REPLACE INTO denied (key, until, reason) VALUES (?1, ?2, ?3)")?;
    for (key, until, reason) in entries {
        insert.execute(params![key, until, reason.as_str()])?;
    }
    Ok(())
}

/// Entries denied at `now`, by key.
pub fn list(c: &Connection, now: i64) -> rusqlite::Result<Vec<Denied>> {
    let mut stmt = c.prepare_cached("SELECT key, until, reason FROM denied WHERE until > ?1 ORDER BY key")?;
    let rows = stmt.query_map([now], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)))?;
    Ok(rows.filter_map(Result::ok).filter_map(|(key, until, reason)| Some(Denied { key, until, reason: Reason::parse(&reason)? })).collect())
}

/// Is this client (its key) on the list at `now`, and why?
pub fn lookup(c: &Connection, who: &Offender, now: i64) -> rusqlite::Result<Option<Reason>> {
    let reason: Option<String> = c
        .prepare_cached("SELECT reason FROM denied WHERE key = ?1 AND until > ?2")?
        .query_row(params![who.key_text(), now], |r| r.get(0))
        .optional()?;
    Ok(reason.as_deref().and_then(Reason::parse))
}

/// `postroom list remove deny`: drop the entry from the mirror and ask the server to lift it.
/// True when it was on the list.
pub fn request_lift(c: &Connection, who: &Offender) -> rusqlite::Result<bool> {
    let key = who.key_text();
    let was = c.execute("DELETE FROM denied WHERE key = ?1", [&key])? > 0;
    c.execute("INSERT OR REPLACE INTO deny_lifts (key, at) VALUES (?1, ?2)", params![key, store::now()])?;
    Ok(was)
}

/// The lift requests waiting, taken (the server applies them).
pub fn take_lifts(c: &Connection) -> rusqlite::Result<Vec<String>> {
    let keys = c.prepare_cached("DELETE FROM deny_lifts RETURNING key")?.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(keys)
}

/// Are lift requests waiting? (Cheap: the server asks every few seconds.)
pub fn lifts_waiting(c: &Connection) -> rusqlite::Result<bool> {
    c.prepare_cached("SELECT 1 FROM deny_lifts LIMIT 1")?.exists([])
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::{Durability, Store, StoreOptions};

    #[test]
    fn mirror_list_lookup_and_lift() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let now = store::now();
        let v6 = Offender::address("2001:db8:1:2:3::9".parse().unwrap());
        let entries = vec![(v6.key_text(), now + 600, Reason::CommandLine), ("user sam".to_string(), now + 60, Reason::FailedLogins)];
        store.write_blocking(Durability::Normal, move |c| Ok(mirror(c, &entries)?)).unwrap();
        let rows = store.read_blocking(move |c| Ok(list(c, now)?)).unwrap();
        assert_eq!(rows.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["2001:db8:1:2::/64", "user sam"]);
        let other_in_net = Offender::parse("2001:db8:1:2::77").unwrap();
        assert_eq!(store.read_blocking(move |c| Ok(lookup(c, &other_in_net, now)?)).unwrap(), Some(Reason::CommandLine));
        let lifted = Offender::parse("2001:db8:1:2::/64").unwrap();
        assert!(store.write_blocking(Durability::Normal, move |c| Ok(request_lift(c, &lifted)?)).unwrap());
        assert!(store.read_blocking(|c| Ok(lifts_waiting(c)?)).unwrap());
        assert_eq!(store.write_blocking(Durability::Normal, |c| Ok(take_lifts(c)?)).unwrap(), ["2001:db8:1:2::/64"]);
        assert_eq!(store.read_blocking(move |c| Ok(list(c, now)?)).unwrap().len(), 1);
        assert_eq!(Offender::parse("::ffff:127.0.0.5").unwrap().key_text(), "127.0.0.5");
        assert!(Offender::parse("nonsense").is_none());
    }
}
