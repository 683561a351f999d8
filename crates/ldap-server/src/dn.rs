//! Distinguished names (RFC 4514) of the address book's tree (SPEC O5, issue 18):
//!
//! ```text
//! dc=example,dc=test                       the base, from the first local domain
//!   ou=people   uid=NAME,ou=people,<base>  one inetOrgPerson per enabled user
//!   ou=groups   cn=GROUP,ou=groups,<base>  one groupOfNames per alias
//! ```
//!
//! DNs are compared in a normal form: attribute types and values lowercased, values unescaped,
//! spaces around `=` and `,` dropped. Every attribute in this tree matches case-insensitively,
//! so `UID=Sam, OU=People, DC=Example, DC=Test` names the same entry as the form we send.

/// A parsed DN: its RDNs from the entry itself up to the root, each `(type, value)`, normalised.
/// A multi-valued RDN (`a=1+b=2`) is kept as one value with its `+`: this tree has none.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dn(pub Vec<(String, String)>);

impl Dn {
    /// Parse a DN string. The empty string is the root DSE (no RDNs). None when it is not a DN.
    pub fn parse(text: &str) -> Option<Dn> {
        let text = text.trim();
        if text.is_empty() {
            return Some(Dn(Vec::new()));
        }
        let mut rdns = Vec::new();
        for rdn in split_unescaped(text, ',') {
            let mut parts = split_unescaped(rdn, '=').into_iter();
            let (attr, value) = (parts.next()?.trim(), parts.collect::<Vec<_>>().join("="));
            let valid_type = !attr.is_empty() && attr.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !valid_type || !rdn.contains('=') {
                return None;
            }
            rdns.push((attr.to_ascii_lowercase(), unescape(value.trim())?.to_lowercase()));
        }
        Some(Dn(rdns))
    }

    /// True for the root DSE's empty name.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The DN one level up; the root has none.
    pub fn parent(&self) -> Option<Dn> {
        (!self.0.is_empty()).then(|| Dn(self.0[1..].to_vec()))
    }

    /// `self` is `other` or below it.
    pub fn is_within(&self, other: &Dn) -> bool {
        self.0.len() >= other.0.len() && self.0[self.0.len() - other.0.len()..] == other.0[..]
    }

    /// The value of the first RDN when its type is `attr`, and the rest is `under`.
    pub fn leaf_under(&self, attr: &str, under: &Dn) -> Option<&str> {
        let (first, rest) = self.0.split_first()?;
        (first.0 == attr && rest == under.0.as_slice()).then_some(first.1.as_str())
    }
}

/// The base DN of a domain: `example.test` → `dc=example,dc=test`.
pub fn base_of_domain(domain: &str) -> String {
    domain.trim_end_matches('.').split('.').map(|label| format!("dc={}", escape(label))).collect::<Vec<_>>().join(",")
}

/// One RDN value escaped for a DN string (RFC 4514 §2.4).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, ch) in value.chars().enumerate() {
        let special =
            matches!(ch, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') || (i == 0 && (ch == '#' || ch == ' ')) || (i == last && ch == ' ');
        if ch == '\0' {
            out.push_str("\\00");
            continue;
        }
        if special {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// Undo RFC 4514 escapes: `\,` and `\2C` alike. None for a dangling or bad escape.
fn unescape(value: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(value.len());
    let raw = value.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            bytes.push(raw[i]);
            i += 1;
            continue;
        }
        let hex = raw
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (hex, raw.get(i + 1)) {
            (Some(b), _) => {
                bytes.push(b);
                i += 3;
            }
            (None, Some(&c)) => {
                bytes.push(c);
                i += 2;
            }
            (None, None) => return None,
        }
    }
    String::from_utf8(bytes).ok()
}

/// Split on `sep` where it is not escaped by a backslash.
fn split_unescaped(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, ch) in text.char_indices() {
        match ch {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            c if c == sep => {
                parts.push(&text[start..i]);
                start = i + ch.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_dn_comes_from_the_domain() {
        assert_eq!(base_of_domain("example.test"), "dc=example,dc=test");
        assert_eq!(base_of_domain("Mail.Example.Test."), "dc=Mail,dc=Example,dc=Test");
    }

    #[test]
    fn dns_compare_in_normal_form() {
        let sent = Dn::parse("uid=sam,ou=people,dc=example,dc=test").unwrap();
        assert_eq!(Dn::parse(" UID = Sam , OU=People,DC=Example, dc=TEST ").unwrap(), sent);
        let base = Dn::parse("dc=example,dc=test").unwrap();
        let people = Dn::parse("ou=people,dc=example,dc=test").unwrap();
        assert!(sent.is_within(&base) && sent.is_within(&people) && sent.is_within(&sent));
        assert!(!base.is_within(&people));
        assert_eq!(sent.parent(), Some(people.clone()));
        assert_eq!(sent.leaf_under("uid", &people), Some("sam"));
        assert_eq!(sent.leaf_under("cn", &people), None);
        assert!(Dn::parse("").unwrap().is_root());
    }

    #[test]
    fn escapes_round_trip() {
        let value = "sales, north+east=\"x\"";
        let dn = format!("cn={},ou=groups,dc=example,dc=test", escape(value));
        assert_eq!(dn, "cn=sales\\, north\\+east\\=\\\"x\\\",ou=groups,dc=example,dc=test");
        let parsed = Dn::parse(&dn).unwrap();
        assert_eq!(parsed.0[0], ("cn".to_string(), value.to_lowercase()));
        assert_eq!(Dn::parse("cn=a\\2Cb,dc=test").unwrap().0[0].1, "a,b");
        assert_eq!(escape(" lead#"), "\\ lead#");
    }

    #[test]
    fn non_dns_are_refused() {
        for bad in ["sam@example.test", "uid=sam,people", "=x", "uid=sam\\", "u id=x"] {
            assert_eq!(Dn::parse(bad), None, "{bad}");
        }
    }
}
