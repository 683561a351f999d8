//! Access lists (SPEC R4, R6, R8, R11): who may relay, who may not connect, near domains,
//! refused senders and DNS blackhole list zones. Entries are parsed once into matchers; the
//! servers hold an immutable snapshot and reload it when the lists' version number changes.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use mail_proto::Address;
use rusqlite::{Connection, OptionalExtension, params};
use store::Store;

use crate::Result;
use crate::resolve::normalise_domain;

/// Which list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListKind {
    /// Clients that may relay (i5/OS ACCEPTRLY, ADDSMTPLE *ACCEPT).
    Relay,
    /// Clients that may not connect (REJECTCNN, ADDSMTPLE *REJECT).
    Reject,
    /// Recipient domains relayed in *near* / *both* mode.
    Near,
    /// Refused senders (IMail kill.lst).
    Kill,
    /// DNS blackhole list zones.
    Rbl,
}

impl ListKind {
    pub const ALL: [ListKind; 5] = [ListKind::Relay, ListKind::Reject, ListKind::Near, ListKind::Kill, ListKind::Rbl];

    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Relay => "relay",
            ListKind::Reject => "reject",
            ListKind::Near => "near",
            ListKind::Kill => "kill",
            ListKind::Rbl => "rbl",
        }
    }

    /// Check an entry and return its canonical text.
    pub fn canonical(self, text: &str) -> Result<String, String> {
        let text = text.trim();
        match self {
            ListKind::Relay | ListKind::Reject => IpEntry::from_str(text).map(|e| e.to_string()),
            ListKind::Near => domain_entry(text.trim_start_matches("*.").trim_start_matches('.')),
            ListKind::Rbl => domain_entry(text),
            ListKind::Kill => KillPattern::from_str(text).map(|k| k.to_string()),
        }
    }
}

impl FromStr for ListKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ListKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown list {s:?}: expected relay, reject, near, kill or rbl"))
    }
}

fn domain_entry(text: &str) -> Result<String, String> {
    let d = normalise_domain(text);
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-') && !l.ends_with('-')
        });
    if ok { Ok(d) } else { Err(format!("{text:?} is not a domain name")) }
}

/// An "address mask" entry (mask optional: one host) or CIDR, IPv4 or IPv6 (R6). Matching is
/// `(ip & mask) == (entry & mask)`, so the non-contiguous masks of old i5/OS lists work.
/// An entry written as IPv4-mapped IPv6 (`::ffff:192.0.2.7`, `::ffff:192.0.2.0/120`) is its
/// IPv4 entry, as a client's address is its IPv4 address (R4, `mail_proto::net::normalise_ip`):
/// kept in the mapped form it would never match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpEntry {
    addr: IpAddr,
    mask: IpAddr,
    cidr: Option<u8>,
}

impl IpEntry {
    pub fn matches(&self, ip: IpAddr) -> bool {
        match (self.addr, self.mask, ip) {
            (IpAddr::V4(a), IpAddr::V4(m), IpAddr::V4(c)) => (u32::from(a) & u32::from(m)) == (u32::from(c) & u32::from(m)),
            (IpAddr::V6(a), IpAddr::V6(m), IpAddr::V6(c)) => (u128::from(a) & u128::from(m)) == (u128::from(c) & u128::from(m)),
            _ => false,
        }
    }
}

impl FromStr for IpEntry {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not an address, \"address mask\" or CIDR entry");
        let mixed = || {
            format!(
                "{text:?} covers IPv4-mapped and other IPv6 addresses; clients are matched by their IPv4 address: \
                 write the IPv4 range (and any IPv6 range) as entries of their own"
            )
        };
        let mut tokens = text.split_whitespace();
        let first = tokens.next().ok_or_else(bad)?;
        let second = tokens.next();
        if tokens.next().is_some() {
            return Err(bad());
        }
        if let Some((addr, len)) = first.split_once('/') {
            if second.is_some() {
                return Err(bad());
            }
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let len: u8 = len.parse().map_err(|_| bad())?;
            // `::ffff:a.b.c.d/N` is `a.b.c.d/(N - 96)`.
            let (addr, len) = match mapped(addr) {
                Some(v4) if (96..=128).contains(&len) => (IpAddr::V4(v4), len - 96),
                Some(_) => return Err(mixed()),
                None => (addr, len),
            };
            let mask = match addr {
                IpAddr::V4(_) if len <= 32 => IpAddr::V4((u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)).into()),
                IpAddr::V6(_) if len <= 128 => IpAddr::V6((u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)).into()),
                _ => return Err(bad()),
            };
            return Ok(IpEntry { addr, mask, cidr: Some(len) });
        }
        let addr: IpAddr = first.parse().map_err(|_| bad())?;
        if let Some(v4) = mapped(addr) {
            // The mask of a mapped address: IPv4, or IPv6 whose first 96 bits are all set.
            let mask = match second.map(str::parse::<IpAddr>) {
                None => u32::MAX.into(),
                Some(Ok(IpAddr::V4(m))) => m,
                Some(Ok(IpAddr::V6(m))) if u128::from(m) >> 32 == u128::MAX >> 32 => (u128::from(m) as u32).into(),
                Some(Ok(IpAddr::V6(_))) => return Err(mixed()),
                Some(Err(_)) => return Err(bad()),
            };
            return Ok(IpEntry { addr: IpAddr::V4(v4), mask: IpAddr::V4(mask), cidr: None });
        }
        let mask = match (addr, second) {
            (IpAddr::V4(_), None) => IpAddr::V4(u32::MAX.into()),
            (IpAddr::V6(_), None) => IpAddr::V6(u128::MAX.into()),
            (IpAddr::V4(_), Some(m)) => IpAddr::V4(m.parse().map_err(|_| bad())?),
            (IpAddr::V6(_), Some(m)) => IpAddr::V6(m.parse().map_err(|_| bad())?),
        };
        Ok(IpEntry { addr, mask, cidr: None })
    }
}

/// The IPv4 address an IPv4-mapped IPv6 address stands for.
fn mapped(addr: IpAddr) -> Option<std::net::Ipv4Addr> {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    }
}

impl fmt::Display for IpEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match self.mask {
            IpAddr::V4(m) => u32::from(m) == u32::MAX,
            IpAddr::V6(m) => u128::from(m) == u128::MAX,
        };
        match (self.cidr, host) {
            (Some(len), _) => write!(f, "{}/{}", self.addr, len),
            (None, true) => write!(f, "{}", self.addr),
            (None, false) => write!(f, "{} {}", self.addr, self.mask),
        }
    }
}

/// A kill-list entry (R8): `user@host`, `@host` (anyone there) or `@*suffix` (hosts ending so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KillPattern {
    Address(String),
    Host(String),
    Suffix(String),
}

impl KillPattern {
    pub fn matches(&self, sender: &Address) -> bool {
        let domain = sender.domain_lower();
        match self {
            KillPattern::Address(a) => sender.key() == *a,
            KillPattern::Host(h) => domain == *h,
            KillPattern::Suffix(s) => domain.ends_with(s.as_str()),
        }
    }
}

impl FromStr for KillPattern {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase();
        let bad = || format!("{text:?} is not a kill entry: expected user@host, @host or @*suffix");
        if let Some(suffix) = t.strip_prefix("@*") {
            if suffix.is_empty() || suffix.contains(['@', ' ']) {
                return Err(bad());
            }
            return Ok(KillPattern::Suffix(suffix.to_string()));
        }
        if let Some(host) = t.strip_prefix('@') {
            return domain_entry(host).map(KillPattern::Host).map_err(|_| bad());
        }
        match Address::parse(&t) {
            Ok(a) => Ok(KillPattern::Address(a.key())),
            Err(_) => Err(bad()),
        }
    }
}

impl fmt::Display for KillPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KillPattern::Address(a) => write!(f, "{a}"),
            KillPattern::Host(h) => write!(f, "@{h}"),
            KillPattern::Suffix(s) => write!(f, "@*{s}"),
        }
    }
}

/// A snapshot of every list, parsed.
#[derive(Clone, Debug, Default)]
pub struct AccessLists {
    pub version: i64,
    pub relay: Vec<IpEntry>,
    pub reject: Vec<IpEntry>,
    pub near: Vec<String>,
    pub kill: Vec<KillPattern>,
    pub rbl: Vec<String>,
}

impl AccessLists {
    pub fn load(conn: &Connection) -> Result<AccessLists> {
        let mut lists = AccessLists { version: lists_version(conn)?, ..Default::default() };
        let mut stmt = conn.prepare("SELECT kind, entry FROM access_lists ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (kind, entry) = row?;
            // Entries were checked when added; one that no longer parses is skipped, not fatal.
            let parsed = match ListKind::from_str(&kind) {
                Ok(ListKind::Relay) => entry.parse().map(|e| lists.relay.push(e)),
                Ok(ListKind::Reject) => entry.parse().map(|e| lists.reject.push(e)),
                Ok(ListKind::Near) => {
                    lists.near.push(entry.clone());
                    Ok(())
                }
                Ok(ListKind::Kill) => entry.parse().map(|k| lists.kill.push(k)),
                Ok(ListKind::Rbl) => {
                    lists.rbl.push(entry.clone());
                    Ok(())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = parsed {
                tracing::warn!(kind, entry, error = %e, "skipping an unreadable access list entry");
            }
        }
        Ok(lists)
    }

    pub fn relay_match(&self, ip: IpAddr) -> Option<&IpEntry> {
        self.relay.iter().find(|e| e.matches(ip))
    }

    pub fn reject_match(&self, ip: IpAddr) -> Option<&IpEntry> {
        self.reject.iter().find(|e| e.matches(ip))
    }

    /// The near-domain entry covering `domain` (the domain itself or a parent of it).
    pub fn near_match(&self, domain: &str) -> Option<&str> {
        let d = normalise_domain(domain);
        self.near.iter().map(String::as_str).find(|n| d == *n || d.ends_with(&format!(".{n}")))
    }

    pub fn kill_match(&self, sender: &Address) -> Option<&KillPattern> {
        self.kill.iter().find(|k| k.matches(sender))
    }
}

fn lists_version(conn: &Connection) -> Result<i64> {
    let v: Option<String> = conn.prepare_cached("SELECT value FROM meta WHERE key = 'lists_version'")?.query_row([], |r| r.get(0)).optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// What a server needs to know about a new client before deciding anything.
#[derive(Clone, Debug)]
pub struct ClientRecord {
    pub lists: Arc<AccessLists>,
    /// Last POP3 login from this address (unix seconds), for POP-before-SMTP (R1, R5).
    pub pop_login_at: Option<i64>,
}

/// The current lists, reloaded only when their version changed (R11: no restart needed).
#[derive(Clone, Default)]
pub struct ListCache {
    current: Arc<Mutex<Arc<AccessLists>>>,
}

impl ListCache {
    /// One short read per session: the lists' version and the client's POP login time.
    pub async fn client(&self, store: &Store, ip: IpAddr) -> Result<ClientRecord> {
        let cached = self.current.lock().expect("list cache").clone();
        let known = cached.version;
        let ip = ip.to_string();
        let (lists, pop_login_at) = store
            .read(move |c| {
                let at = pop_login_at(c, &ip).map_err(crate::resolve::into_store)?;
                let version = lists_version(c).map_err(crate::resolve::into_store)?;
                let fresh = if version != known { Some(Arc::new(AccessLists::load(c).map_err(crate::resolve::into_store)?)) } else { None };
                Ok((fresh, at))
            })
            .await?;
        let lists = match lists {
            Some(fresh) => {
                *self.current.lock().expect("list cache") = fresh.clone();
                fresh
            }
            None => cached,
        };
        Ok(ClientRecord { lists, pop_login_at })
    }
}

/// The last POP3 login from `ip` (P5, for POP-before-SMTP), unix seconds.
pub fn pop_login_at(c: &Connection, ip: &str) -> Result<Option<i64>> {
    Ok(c.prepare_cached("SELECT at FROM pop_logins WHERE ip = ?1")?.query_row([ip], |r| r.get(0)).optional()?)
}

/// Add an entry (canonicalised); false when it was already there.
pub fn add(conn: &Connection, kind: ListKind, text: &str) -> Result<(String, bool)> {
    let entry = kind.canonical(text).map_err(crate::DirectoryError::BadListEntry)?;
    let n =
        conn.execute("INSERT OR IGNORE INTO access_lists (kind, entry, added_at) VALUES (?1, ?2, ?3)", params![kind.as_str(), entry, store::now()])?;
    Ok((entry, n > 0))
}

pub fn remove(conn: &Connection, kind: ListKind, text: &str) -> Result<String> {
    let written = text.trim().to_string();
    let entry = kind.canonical(text).unwrap_or_else(|_| written.clone());
    // Also the text as written: an entry stored before canonical forms changed (a mapped
    // IPv6 entry kept as such) is removed by the words it was added with.
    let n = conn.execute("DELETE FROM access_lists WHERE kind = ?1 AND entry IN (?2, ?3)", params![kind.as_str(), entry, written])?;
    if n == 0 {
        return Err(crate::DirectoryError::NoSuchListEntry(kind.as_str().into(), entry));
    }
    Ok(entry)
}

/// Every entry of a list with when it was added.
pub fn show(conn: &Connection, kind: ListKind) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare("SELECT entry, added_at FROM access_lists WHERE kind = ?1 ORDER BY id")?;
    let rows = stmt.query_map([kind.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Read an i5/OS V4R ACCEPTRLY or REJECTCNN member: one "address [mask]" a line, with or
/// without the 12-character sequence/date prefix a source-member dump carries. Returns the
/// entries read and, for each line that could not be read, its number and text. A line is
/// read only when, past that prefix, it is one whole entry: the seeds' own example
/// `7 .8.9.3 255.255.255.255` (a blank inside the address) is unreadable, not the entry
/// 255.255.255.255.
pub fn parse_legacy(text: &str) -> (Vec<String>, Vec<(usize, String)>) {
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        match legacy_entry(line) {
            Some(e) => entries.push(e.to_string()),
            None => bad.push((i + 1, raw.to_string())),
        }
    }
    (entries, bad)
}

/// One record of a member: the entry alone, or after the sequence number and change date
/// (12 characters, "000100000000" or as SEU shows them "0001.00 0000", followed directly by the
/// entry or by a blank), or after them as blank-separated tokens ("0001.00 000000 1.2.3.4").
fn legacy_entry(line: &str) -> Option<IpEntry> {
    if let Ok(e) = IpEntry::from_str(line) {
        return Some(e);
    }
    if let Some((prefix, rest)) = line.split_at_checked(12)
        && is_sequence_and_date(prefix)
        && let Ok(e) = IpEntry::from_str(rest)
    {
        return Some(e);
    }
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let skip = tokens.iter().take(2).take_while(|t| is_sequence_or_date(t)).count();
    (skip > 0).then(|| IpEntry::from_str(&tokens[skip..].join(" ")).ok()).flatten()
}

/// "000100000000", or "0001.00 0000" (sequence number with its decimals, a blank, the date).
fn is_sequence_and_date(p: &str) -> bool {
    let p = p.as_bytes();
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    digits(p) || (p.len() == 12 && digits(&p[..4]) && p[4] == b'.' && digits(&p[5..7]) && p[7] == b' ' && digits(&p[8..]))
}

/// A sequence number ("000100", "0001.00") or a change date ("000000") as a token of its own,
/// or both run together ("000100000000").
fn is_sequence_or_date(t: &str) -> bool {
    let t = t.as_bytes();
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    ((t.len() == 6 || t.len() == 12) && digits(t)) || (t.len() == 7 && digits(&t[..4]) && t[4] == b'.' && digits(&t[5..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn address_mask_and_cidr_entries() {
        let e: IpEntry = "1.2.3.4 255.255.0.0".parse().unwrap();
        assert!(e.matches(ip("1.2.5.6")) && !e.matches(ip("1.3.0.1")));
        assert_eq!(e.to_string(), "1.2.3.4 255.255.0.0");
        let host: IpEntry = "7.8.9.3 255.255.255.255".parse().unwrap();
        assert_eq!(host.to_string(), "7.8.9.3");
        assert!(host.matches(ip("7.8.9.3")) && !host.matches(ip("7.8.9.4")));
        let cidr: IpEntry = "10.0.0.0/8".parse().unwrap();
        assert!(cidr.matches(ip("10.200.1.1")) && !cidr.matches(ip("11.0.0.1")));
        let all: IpEntry = "0.0.0.0/0".parse().unwrap();
        assert!(all.matches(ip("192.0.2.1")));
        let v6: IpEntry = "2001:db8::/32".parse().unwrap();
        assert!(v6.matches(ip("2001:db8:1::5")) && !v6.matches(ip("2001:db9::1")) && !v6.matches(ip("10.0.0.1")));
        for bad in ["", "1.2.3", "1.2.3.4/33", "1.2.3.4 255.255.0.0 x", "::1 255.0.0.0", "1.2.3.4/8 255.0.0.0", "7 .8.9.3"] {
            assert!(bad.parse::<IpEntry>().is_err(), "{bad}");
        }
    }

    #[test]
    fn non_contiguous_mask_matches_bitwise() {
        // Every client whose first and third octets are 10 and 5, whatever the second.
        let e: IpEntry = "10.0.5.0 255.0.255.0".parse().unwrap();
        assert!(e.matches(ip("10.77.5.9")));
        assert!(!e.matches(ip("10.77.6.9")));
    }

    #[test]
    fn kill_patterns() {
        let sender = Address::parse("Spammer@Mail.Bad.Example").unwrap();
        assert!(KillPattern::from_str("spammer@mail.bad.example").unwrap().matches(&sender));
        assert!(KillPattern::from_str("@mail.bad.example").unwrap().matches(&sender));
        assert!(!KillPattern::from_str("@bad.example").unwrap().matches(&sender));
        assert!(KillPattern::from_str("@*bad.example").unwrap().matches(&sender));
        assert!(!KillPattern::from_str("@*good.example").unwrap().matches(&sender));
        assert!(KillPattern::from_str("nobody").is_err());
    }

    #[test]
    fn near_domains_cover_subdomains() {
        let lists = AccessLists { near: vec!["partner.example".into()], ..Default::default() };
        assert_eq!(lists.near_match("Partner.Example"), Some("partner.example"));
        assert_eq!(lists.near_match("mail.partner.example"), Some("partner.example"));
        assert_eq!(lists.near_match("notpartner.example"), None);
        assert_eq!(ListKind::Near.canonical("*.Partner.Example.").unwrap(), "partner.example");
    }

    #[test]
    fn legacy_members_with_and_without_prefix() {
        let member = "1.2.3.4 255.255.0.0\n0001000000007.8.9.3\n0002.00 000000 10.0.0.0 255.0.0.0\n\n7 .8.9.3\n000300000000 192.168.1.0 255.255.255.0\ngarbage\n";
        let (entries, bad) = parse_legacy(member);
        assert_eq!(entries, ["1.2.3.4 255.255.0.0", "7.8.9.3", "10.0.0.0 255.0.0.0", "192.168.1.0 255.255.255.0"]);
        assert_eq!(bad, [(5, "7 .8.9.3".to_string()), (7, "garbage".to_string())]);
    }

    #[test]
    fn legacy_lines_must_be_whole_entries() {
        // The seeds' example, a blank inside the address: not the entry 255.255.255.255.
        let member = "7 .8.9.3 255.255.255.255\n10.0.0.1 10 10.0.0.2\n7 255.255.255.255\nx 1.2.3.4\n0007.00 0000127.0.0.83\n\
                      00010000000010.0.0.1\n0001.00 000000 10.0.0.3\n000100 000000 10.0.0.4 255.255.0.0\n\t10.0.0.5   \r\n\
                      0001\u{e9}00 0001.2.3.4\n";
        let (entries, bad) = parse_legacy(member);
        assert_eq!(entries, ["127.0.0.83", "10.0.0.1", "10.0.0.3", "10.0.0.4 255.255.0.0", "10.0.0.5"]);
        assert_eq!(bad.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3, 4, 10]);
        assert_eq!(bad[0].1, "7 .8.9.3 255.255.255.255");
    }

    #[test]
    fn ipv4_mapped_entries_are_ipv4() {
        for (written, stored) in [
            ("::ffff:127.0.0.95", "127.0.0.95"),
            ("::FFFF:7f00:5f", "127.0.0.95"),
            ("::ffff:127.0.0.0/104", "127.0.0.0/8"),
            ("::ffff:10.1.0.0/112", "10.1.0.0/16"),
            ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
            ("::ffff:10.0.5.0 255.0.255.0", "10.0.5.0 255.0.255.0"),
            ("::ffff:10.0.5.0 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00", "10.0.5.0 255.255.255.0"),
        ] {
            let e: IpEntry = written.parse().unwrap_or_else(|e| panic!("{written}: {e}"));
            assert_eq!(e.to_string(), stored, "{written}");
            assert_eq!(ListKind::Relay.canonical(written).unwrap(), stored);
        }
        let e: IpEntry = "::ffff:127.0.0.95".parse().unwrap();
        assert!(e.matches(ip("127.0.0.95")) && !e.matches(ip("127.0.0.96")));
        let e: IpEntry = "::ffff:127.0.0.0/104".parse().unwrap();
        assert!(e.matches(ip("127.200.0.1")) && !e.matches(ip("128.0.0.1")));
        // A range reaching beyond the mapped block mixes IPv4 and IPv6: refused, not kept unmatched.
        for mixed in ["::ffff:127.0.0.1/95", "::ffff:1.2.3.4 ffff::", "::ffff:1.2.3.4 ::", "::ffff:1.2.3.4 ::ffff:255.255.255.255"] {
            assert!(mixed.parse::<IpEntry>().is_err(), "{mixed}");
        }
        // Plain IPv6 stays IPv6.
        assert_eq!("2001:db8::/32".parse::<IpEntry>().unwrap().to_string(), "2001:db8::/32");
        assert_eq!("::1".parse::<IpEntry>().unwrap().to_string(), "::1");
    }

    #[test]
    fn a_mapped_entry_stored_before_is_removed_by_either_form() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), store::StoreOptions::default()).unwrap();
        store
            .write_blocking(store::Durability::Full, |c| {
                c.execute("INSERT INTO access_lists (kind, entry, added_at) VALUES ('relay', '::ffff:127.0.0.95', 0)", [])?;
                let lists = AccessLists::load(c).map_err(crate::resolve::into_store)?;
                assert!(lists.relay_match(ip("127.0.0.95")).is_some());
                assert_eq!(remove(c, ListKind::Relay, "::ffff:127.0.0.95").map_err(crate::resolve::into_store)?, "127.0.0.95");
                assert!(show(c, ListKind::Relay).map_err(crate::resolve::into_store)?.is_empty());
                assert_eq!(add(c, ListKind::Relay, "::ffff:127.0.0.95").map_err(crate::resolve::into_store)?, ("127.0.0.95".to_string(), true));
                assert!(!add(c, ListKind::Relay, "127.0.0.95").map_err(crate::resolve::into_store)?.1);
                Ok(())
            })
            .unwrap();
    }
}

/// Host authentication entries (SPEC C5, i5/OS ADDSMTPLE *HOSTAUTH): the user and password the
/// SMTP client gives a remote host that requires AUTH, and how that host's certificate is checked
/// first: the credentials only go over TLS whose certificate was verified, by the system's roots
/// plus the entry's own CA certificates, or by the SHA-256 fingerprint pinned for the host. The
/// password is never shown.
pub mod hostauth {
    use rusqlite::{Connection, OptionalExtension, params};

    use crate::Result;

    /// How the host's certificate is checked before the credentials go to it.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Trust {
        /// PEM certificates trusted for this host besides the system's roots (a private CA).
        pub ca_pem: Option<String>,
        /// SHA-256 of the host's certificate, 64 lowercase hex digits (see [`normalise_fingerprint`]).
        pub fingerprint: Option<String>,
    }

    /// One entry as the SMTP client needs it.
    #[derive(Clone, PartialEq, Eq)]
    pub struct Entry {
        pub user: String,
        pub password: String,
        pub trust: Trust,
    }

    impl std::fmt::Debug for Entry {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Entry").field("user", &self.user).field("password", &"(hidden)").field("trust", &self.trust).finish()
        }
    }

    /// A SHA-256 fingerprint as 64 lowercase hex digits, from hex with or without colons (as
    /// `openssl x509 -fingerprint -sha256` prints it) and an optional `sha256:` prefix.
    pub fn normalise_fingerprint(text: &str) -> Option<String> {
        let text = text.trim();
        let text = text.get(..7).filter(|p| p.eq_ignore_ascii_case("sha256:")).map_or(text, |_| &text[7..]);
        let hex: String = text.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
    }

    /// The key of a host's entry: its name lowercased, without a trailing dot, an address
    /// literal without its brackets (`[192.0.2.1]` and `192.0.2.1` are one host).
    fn key(host: &str) -> String {
        let host = crate::resolve::normalise_domain(host);
        host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).map_or_else(|| host.clone(), str::to_string)
    }

    pub fn add(conn: &Connection, host: &str, user: &str, password: &str) -> Result<()> {
        add_with_trust(conn, host, user, password, &Trust::default())
    }

    /// Add or replace the entry for `host`, with how its certificate is checked.
    pub fn add_with_trust(conn: &Connection, host: &str, user: &str, password: &str, trust: &Trust) -> Result<()> {
        let host = key(host);
        conn.execute(
            "INSERT INTO hostauth (host, user, password, added_at, tls_ca, tls_fingerprint) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(host) DO UPDATE SET user = ?2, password = ?3, added_at = ?4, tls_ca = ?5, tls_fingerprint = ?6",
            params![host, user, password, store::now(), trust.ca_pem, trust.fingerprint],
        )?;
        Ok(())
    }

    pub fn remove(conn: &Connection, host: &str) -> Result<bool> {
        Ok(conn.execute("DELETE FROM hostauth WHERE host = ?1", [key(host)])? > 0)
    }

    /// (host, user, added) for every entry: no passwords.
    pub fn show(conn: &Connection) -> Result<Vec<(String, String, i64)>> {
        Ok(show_with_trust(conn)?.into_iter().map(|(h, u, a, _)| (h, u, a)).collect())
    }

    /// (host, user, added, trust) for every entry: no passwords.
    pub fn show_with_trust(conn: &Connection) -> Result<Vec<(String, String, i64, Trust)>> {
        let mut stmt = conn.prepare("SELECT host, user, added_at, tls_ca, tls_fingerprint FROM hostauth ORDER BY host")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, Trust { ca_pem: r.get(3)?, fingerprint: r.get(4)? })))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The credentials for `host`, if any.
    pub fn lookup(conn: &Connection, host: &str) -> Result<Option<(String, String)>> {
        Ok(entry(conn, host)?.map(|e| (e.user, e.password)))
    }

    /// The whole entry for `host`, if any.
    pub fn entry(conn: &Connection, host: &str) -> Result<Option<Entry>> {
        Ok(conn
            .prepare_cached("SELECT user, password, tls_ca, tls_fingerprint FROM hostauth WHERE host = ?1")?
            .query_row([key(host)], |r| {
                Ok(Entry { user: r.get(0)?, password: r.get(1)?, trust: Trust { ca_pem: r.get(2)?, fingerprint: r.get(3)? } })
            })
            .optional()?)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn address_literals_are_one_host_with_or_without_brackets() {
            assert_eq!(key("[192.0.2.1]"), "192.0.2.1");
            assert_eq!(key("192.0.2.1"), "192.0.2.1");
            assert_eq!(key("Smart.Example."), "smart.example");
        }

        #[test]
        fn fingerprints_are_normalised() {
            let hex = "ab".repeat(32);
            assert_eq!(normalise_fingerprint(&hex).as_deref(), Some(hex.as_str()));
            let colons = vec!["AB"; 32].join(":");
            assert_eq!(normalise_fingerprint(&colons).as_deref(), Some(hex.as_str()));
            assert_eq!(normalise_fingerprint(&format!("SHA256:{colons}")).as_deref(), Some(hex.as_str()));
            assert_eq!(normalise_fingerprint(&hex[..62]), None);
            assert_eq!(normalise_fingerprint(&format!("{}zz", &hex[..62])), None);
            assert_eq!(normalise_fingerprint(""), None);
        }
    }
}
