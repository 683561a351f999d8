//! Search filters (RFC 4511 §4.5.1.7) over the address book's entries (SPEC O5, issue 18):
//! equality, substrings, presence and and/or/not, with the three-valued logic of the RFC —
//! `None` is Undefined, which a `not` keeps undefined, so `(!(shoeSize=9))` matches nothing.
//! Every attribute here matches case-insensitively (caseIgnoreMatch, and mail's
//! caseIgnoreIA5Match); the ordering, approximate and extensible forms are Undefined, except
//! approximate, which is taken as equality (RFC 4511 lets the server choose its approximation).

use ldap3_proto::proto::{LdapFilter, LdapSubstringFilter};

use crate::entries::Entry;

/// The attribute types this tree knows; others are Undefined in a filter.
const KNOWN: &[&str] =
    &["objectclass", "uid", "cn", "sn", "givenname", "displayname", "mail", "member", "dc", "o", "ou", "commonname", "surname", "gn"];

/// RFC 4519's short names for the long ones clients may send.
fn canonical(attr: &str) -> String {
    let lower = attr.to_ascii_lowercase();
    match lower.as_str() {
        "commonname" => "cn".into(),
        "surname" => "sn".into(),
        "gn" => "givenname".into(),
        _ => lower,
    }
}

/// Does `filter` match `entry`? `Some(true)` is TRUE, `Some(false)` FALSE, `None` Undefined.
pub fn matches(filter: &LdapFilter, entry: &Entry) -> Option<bool> {
    match filter {
        LdapFilter::And(parts) => parts
            .iter()
            .try_fold(true, |all, f| match matches(f, entry) {
                Some(false) => Err(()),
                Some(true) => Ok(all),
                None => Ok(false),
            })
            .map_or(Some(false), |all| all.then_some(true)),
        LdapFilter::Or(parts) => {
            let results: Vec<Option<bool>> = parts.iter().map(|f| matches(f, entry)).collect();
            if results.contains(&Some(true)) {
                Some(true)
            } else if results.contains(&None) {
                None
            } else {
                Some(false)
            }
        }
        LdapFilter::Not(inner) => matches(inner, entry).map(|b| !b),
        LdapFilter::Equality(attr, value) | LdapFilter::Approx(attr, value) => {
            let wanted = fold(value);
            known(attr).map(|a| entry.values(&a).iter().any(|v| fold(v) == wanted))
        }
        LdapFilter::Substring(attr, pattern) => known(attr).map(|a| entry.values(&a).iter().any(|v| substring(&fold(v), pattern))),
        LdapFilter::Present(attr) => Some(entry.values(&canonical(attr)).len() + usize::from(is_objectclass(attr)) > 0),
        LdapFilter::GreaterOrEqual(..) | LdapFilter::LessOrEqual(..) | LdapFilter::Extensible(_) => None,
    }
}

/// Every entry has an objectClass: `(objectClass=*)` is how clients ask for "anything".
fn is_objectclass(attr: &str) -> bool {
    attr.eq_ignore_ascii_case("objectclass")
}

fn known(attr: &str) -> Option<String> {
    let a = canonical(attr);
    KNOWN.contains(&a.as_str()).then_some(a)
}

/// Case folding for caseIgnore matching (RFC 4518's full preparation is more than a small
/// office's names need: lowercase, and runs of spaces as one).
fn fold(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// `initial*any*...*final` in order, without overlap (RFC 4511 §4.5.1.7.2).
fn substring(value: &str, pattern: &LdapSubstringFilter) -> bool {
    let mut rest = value;
    if let Some(initial) = &pattern.initial {
        let initial = fold(initial);
        let Some(after) = rest.strip_prefix(initial.as_str()) else { return false };
        rest = after;
    }
    for any in &pattern.any {
        let any = fold(any);
        match rest.find(any.as_str()) {
            Some(at) => rest = &rest[at + any.len()..],
            None => return false,
        }
    }
    match &pattern.final_ {
        Some(last) => rest.ends_with(fold(last).as_str()),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldap3_proto::parse_ldap_filter_str;

    fn sam() -> Entry {
        Entry {
            dn: "uid=sam,ou=people,dc=example,dc=test".into(),
            attrs: vec![
                ("objectClass", vec!["top".into(), "inetOrgPerson".into()]),
                ("uid", vec!["sam".into()]),
                ("cn", vec!["Sam  Smith".into()]),
                ("sn", vec!["Smith".into()]),
                ("givenName", vec!["Sam".into()]),
                ("mail", vec!["sam@example.test".into(), "s.smith@second.test".into()]),
            ],
        }
    }

    fn check(filter: &str) -> Option<bool> {
        let parsed = parse_ldap_filter_str(filter).unwrap_or_else(|e| panic!("{filter}: {e:?}"));
        matches(&parsed, &sam())
    }

    #[test]
    fn thunderbird_style_substring_search() {
        // What Thunderbird sends for "smi" typed in the address book.
        assert_eq!(check("(|(cn=*smi*)(mail=*smi*)(sn=*smi*)(givenName=*smi*))"), Some(true));
        assert_eq!(check("(|(cn=*jones*)(mail=*jones*)(sn=*jones*)(givenName=*jones*))"), Some(false));
        assert_eq!(check("(&(objectClass=*)(|(cn=SAM*)(mail=sam*)))"), Some(true));
    }

    #[test]
    fn equality_is_case_insensitive_on_every_value() {
        assert_eq!(check("(mail=S.Smith@Second.Test)"), Some(true));
        // (The filter-string parser of the tests takes no spaces; clients send them in BER.)
        let spaced = LdapFilter::Equality("cn".into(), "sam smith".into());
        assert_eq!(matches(&spaced, &sam()), Some(true), "runs of spaces compare as one");
        assert_eq!(check("(objectclass=INETORGPERSON)"), Some(true));
        assert_eq!(check("(uid=bob)"), Some(false));
        assert_eq!(check("(displayName=x)"), Some(false), "a known attribute the entry lacks is FALSE");
        assert_eq!(matches(&LdapFilter::Equality("commonName".into(), "Sam Smith".into()), &sam()), Some(true));
    }

    #[test]
    fn substrings_keep_their_order() {
        assert_eq!(check("(cn=S*m*th)"), Some(true));
        assert_eq!(check("(cn=*th*Sam)"), Some(false));
        assert_eq!(check("(sn=Smi*ith)"), Some(false), "initial and final may not overlap");
        assert_eq!(check("(mail=*@second.test)"), Some(true));
    }

    #[test]
    fn presence_and_logic() {
        assert_eq!(check("(objectClass=*)"), Some(true));
        assert_eq!(check("(displayName=*)"), Some(false));
        assert_eq!(check("(!(uid=bob))"), Some(true));
        assert_eq!(check("(&(uid=sam)(!(mail=*@example.test)))"), Some(false));
    }

    #[test]
    fn unknown_attributes_are_undefined_and_not_keeps_them_so() {
        assert_eq!(check("(shoeSize=9)"), None);
        assert_eq!(check("(!(shoeSize=9))"), None);
        assert_eq!(check("(|(shoeSize=9)(uid=sam))"), Some(true));
        assert_eq!(check("(&(shoeSize=9)(uid=sam))"), None);
        assert_eq!(check("(&(shoeSize=9)(uid=bob))"), Some(false));
        assert_eq!(check("(cn>=a)"), None);
    }
}
