//! `postroom dkim check`: is a key's record published as it should be (RFC 6376 §3.6.1,
//! §3.6.2.2)? [`judge`] compares TXT records with the key without I/O; [`lookup`] fetches them
//! through the `[dns]` resolver.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hickory_resolver::proto::rr::{RData, RecordType};
use mail_auth::MessageAuthenticator;

use crate::keys::KeyPair;

/// What the DNS holds for a key's name, compared with the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A DKIM1 record with this key's public key (and key type).
    Matches,
    /// No record at the name (NXDOMAIN, or no TXT record).
    Missing,
    /// A record is there, but not with this key: the text says what it holds instead.
    Different(String),
    /// The lookup failed (SERVFAIL, timeout): nothing is known.
    DnsError(String),
}

/// The TXT records of `name` (each record's strings joined, RFC 6376 §3.6.2.2), or the verdict
/// that ends the check: [`Verdict::Missing`] or [`Verdict::DnsError`].
pub async fn lookup(resolver: &MessageAuthenticator, name: &str) -> Result<Vec<Vec<u8>>, Verdict> {
    let fqdn = format!("{}.", name.trim_end_matches('.'));
    let deadline = crate::resolver::QUERY_TIMEOUT + std::time::Duration::from_millis(500);
    match tokio::time::timeout(deadline, resolver.resolver().lookup(fqdn.as_str(), RecordType::TXT)).await {
        Err(_) => Err(Verdict::DnsError(format!("{name}: no answer within {} s", deadline.as_secs()))),
        Ok(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => Err(Verdict::Missing),
        Ok(Err(e)) => Err(Verdict::DnsError(format!("{name}: {e}"))),
        Ok(Ok(found)) => Ok(found
            .answers()
            .iter()
            .filter_map(|r| if let RData::TXT(txt) = &r.data { Some(txt.txt_data.iter().flat_map(|s| s.iter().copied()).collect()) } else { None })
            .collect()),
    }
}

/// Compare the records found at a key's name with the key. Exactly one DKIM record must be
/// there (RFC 6376 §3.6.2.2: several make the result undefined); it matches when its `p=` is
/// the key's public key and its `k=` (default rsa) the key's type.
pub fn judge(records: &[Vec<u8>], pair: &KeyPair) -> Verdict {
    let dkim: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .filter(|r| tag(r, "v").is_none_or(|v| v == "DKIM1") && tag(r, "p").is_some())
        .collect();
    let record = match dkim.as_slice() {
        [] if records.is_empty() => return Verdict::Missing,
        [] => return Verdict::Different(format!("no DKIM key record among the {} TXT record(s) there", records.len())),
        [one] => one,
        more => return Verdict::Different(format!("{} DKIM records where there must be one", more.len())),
    };
    let key_type = tag(record, "k").unwrap_or_else(|| "rsa".into()).to_ascii_lowercase();
    let p: String = tag(record, "p").unwrap_or_default().chars().filter(|c| !c.is_whitespace()).collect();
    if p.is_empty() {
        return Verdict::Different("the record has an empty p=: the key is revoked (RFC 6376 §3.6.1)".into());
    }
    if key_type != pair.algorithm.key_type() {
        return Verdict::Different(format!("k={key_type}, but this is an {} key", pair.algorithm.key_type()));
    }
    match BASE64.decode(p.as_bytes()) {
        Ok(published) if published == pair.public_key() => Verdict::Matches,
        Ok(_) => Verdict::Different("p= holds another public key".into()),
        Err(e) => Verdict::Different(format!("p= is not base64: {e}")),
    }
}

/// The value of `name=` in a tag-list (RFC 6376 §3.2), whitespace around it removed.
fn tag(record: &str, name: &str) -> Option<String> {
    record.split(';').find_map(|spec| {
        let (n, v) = spec.split_once('=')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Algorithm;

    #[test]
    fn verdicts() {
        let pair = crate::sign::tests::pair(Algorithm::Ed25519Sha256);
        let other = crate::sign::tests::pair(Algorithm::Ed25519Sha256);
        let rec = |s: &str| s.as_bytes().to_vec();
        assert_eq!(judge(&[rec(&pair.txt_record())], &pair), Verdict::Matches);
        // Split into strings and spaced differently by a DNS provider: still the same key.
        let spaced = pair.txt_record().replace("; ", " ;  ").replacen("p=", "p= ", 1);
        assert_eq!(judge(&[rec("v=spf1 -all"), rec(&spaced)], &pair), Verdict::Matches);
        assert_eq!(judge(&[], &pair), Verdict::Missing);
        assert!(matches!(judge(&[rec(&other.txt_record())], &pair), Verdict::Different(w) if w.contains("another public key")));
        assert!(matches!(judge(&[rec("v=DKIM1; k=ed25519; p=")], &pair), Verdict::Different(w) if w.contains("revoked")));
        assert!(matches!(judge(&[rec("v=spf1 -all")], &pair), Verdict::Different(w) if w.contains("no DKIM key record")));
        let rsa = crate::sign::tests::pair(Algorithm::RsaSha256);
        let without_k = rsa.txt_record().replace("k=rsa; ", "");
        assert_eq!(judge(&[rec(&without_k)], &rsa), Verdict::Matches, "k= defaults to rsa");
        assert!(matches!(judge(&[rec(&without_k)], &pair), Verdict::Different(w) if w.contains("k=rsa")));
        assert!(matches!(judge(&[rec(&pair.txt_record()), rec(&other.txt_record())], &pair), Verdict::Different(w) if w.contains("must be one")));
    }
}
