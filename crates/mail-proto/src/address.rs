//! Mailbox addresses and RFC 5321 §4.1.2 paths (`<local@domain>`, `<>`, source routes).

use std::fmt;

/// A mailbox: local part and domain as the client wrote them (case preserved; compare with
/// [`Address::eq_ignore_case`] or the lowercased [`Address::key`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    /// The local part, unquoted (`"john doe"` is stored as `john doe`).
    pub local: String,
    /// The domain or address literal (`[192.0.2.1]`); empty only for RCPT TO:<postmaster>.
    pub domain: String,
    /// The local part was a quoted string on the wire.
    pub quoted: bool,
    /// The path carried an RFC 5321 source route (`@relay:user@domain`), which was dropped.
    pub source_route: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address must be enclosed in <>")]
    NoBrackets,
    #[error("bad address syntax")]
    Syntax,
    #[error("address too long")]
    TooLong,
}

impl Address {
    /// Parse `local@domain` (no brackets).
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        let (addr, rest) = parse_mailbox(s.as_bytes(), false)?;
        if !rest.is_empty() {
            return Err(AddressError::Syntax);
        }
        Ok(addr)
    }

    /// `local@domain` lowercased: the key used for directory lookups.
    pub fn key(&self) -> String {
        if self.domain.is_empty() {
            self.local.to_ascii_lowercase()
        } else {
            format!("{}@{}", self.local.to_ascii_lowercase(), self.domain.to_ascii_lowercase())
        }
    }

    pub fn domain_lower(&self) -> String {
        self.domain.to_ascii_lowercase()
    }

    /// RFC 5321 §4.5.1: `postmaster` is recognised in any case.
    pub fn is_postmaster(&self) -> bool {
        !self.quoted && self.local.eq_ignore_ascii_case("postmaster")
    }

    pub fn eq_ignore_case(&self, other: &Address) -> bool {
        self.key() == other.key()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let needs_quotes = self.quoted || !is_dot_string(self.local.as_bytes());
        if needs_quotes {
            write!(f, "\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    write!(f, "\\")?;
                }
                write!(f, "{c}")?;
            }
            write!(f, "\"")?;
        } else {
            write!(f, "{}", self.local)?;
        }
        if !self.domain.is_empty() {
            write!(f, "@{}", self.domain)?;
        }
        Ok(())
    }
}

/// Which side of the envelope a path is on; only RCPT accepts the bare `<postmaster>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    ReversePath,
    ForwardPath,
}

/// Parse a path at the start of `s` (after `MAIL FROM:` / `RCPT TO:`). Returns the address
/// (`None` for the null reverse-path `<>`) and the rest of the line (the ESMTP parameters).
pub fn parse_path(s: &[u8], kind: PathKind) -> Result<(Option<Address>, &[u8]), AddressError> {
    let s = trim_start(s);
    if s.first() != Some(&b'<') {
        return Err(AddressError::NoBrackets);
    }
    let inner = &s[1..];
    if inner.first() == Some(&b'>') {
        return if kind == PathKind::ReversePath { Ok((None, &inner[1..])) } else { Err(AddressError::Syntax) };
    }
    // RFC 5321 §4.1.2 A-d-l: "@one,@two:" — accepted and ignored (§C), remembered for policy.
    let mut rest = inner;
    let mut source_route = false;
    if rest.first() == Some(&b'@') {
        let colon = rest.iter().position(|&b| b == b':').ok_or(AddressError::Syntax)?;
        for hop in rest[..colon].split(|&b| b == b',') {
            let hop = hop.strip_prefix(b"@").ok_or(AddressError::Syntax)?;
            parse_domain(hop)?;
        }
        rest = &rest[colon + 1..];
        source_route = true;
    }
    let (mut addr, after) = if kind == PathKind::ForwardPath && starts_with_ci(rest, b"postmaster>") {
        let local = String::from_utf8_lossy(&rest[..10]).into_owned();
        (Address { local, domain: String::new(), quoted: false, source_route: false }, &rest[10..])
    } else {
        parse_mailbox(rest, true)?
    };
    addr.source_route = source_route;
    let after = after.strip_prefix(b">").ok_or(AddressError::Syntax)?;
    if addr.local.len() + addr.domain.len() + 1 > 254 {
        return Err(AddressError::TooLong);
    }
    Ok((Some(addr), after))
}

fn parse_mailbox(s: &[u8], in_path: bool) -> Result<(Address, &[u8]), AddressError> {
    let (local, quoted, rest) = if s.first() == Some(&b'"') {
        let (l, r) = parse_quoted(&s[1..])?;
        (l, true, r)
    } else {
        let end = s.iter().position(|&b| !is_atext(b) && b != b'.').unwrap_or(s.len());
        let local = &s[..end];
        if !is_dot_string(local) {
            return Err(AddressError::Syntax);
        }
        (String::from_utf8_lossy(local).into_owned(), false, &s[end..])
    };
    if local.len() > 64 {
        return Err(AddressError::TooLong);
    }
    let rest = rest.strip_prefix(b"@").ok_or(AddressError::Syntax)?;
    let end = if in_path { rest.iter().position(|&b| b == b'>').ok_or(AddressError::Syntax)? } else { rest.len() };
    let domain = parse_domain(&rest[..end])?;
    Ok((Address { local, domain, quoted, source_route: false }, &rest[end..]))
}

fn parse_quoted(s: &[u8]) -> Result<(String, &[u8]), AddressError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'"' => return Ok((String::from_utf8_lossy(&out).into_owned(), &s[i + 1..])),
            b'\\' => {
                let c = *s.get(i + 1).ok_or(AddressError::Syntax)?;
                if !(32..=126).contains(&c) {
                    return Err(AddressError::Syntax);
                }
                out.push(c);
                i += 2;
            }
            c if c == 32 || c == 33 || (35..=126).contains(&c) || c >= 0x80 => {
                out.push(c);
                i += 1;
            }
            _ => return Err(AddressError::Syntax),
        }
    }
    Err(AddressError::Syntax)
}

/// A domain name or an address literal (RFC 5321 §4.1.3), returned as written.
fn parse_domain(d: &[u8]) -> Result<String, AddressError> {
    if d.is_empty() || d.len() > 255 {
        return Err(if d.is_empty() { AddressError::Syntax } else { AddressError::TooLong });
    }
    if d[0] == b'[' {
        if d.last() != Some(&b']') || d.len() < 3 {
            return Err(AddressError::Syntax);
        }
        let lit = std::str::from_utf8(&d[1..d.len() - 1]).map_err(|_| AddressError::Syntax)?;
        let ok = match lit.strip_prefix("IPv6:").or_else(|| lit.strip_prefix("ipv6:")) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => lit.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        return if ok { Ok(String::from_utf8_lossy(d).into_owned()) } else { Err(AddressError::Syntax) };
    }
    // A trailing dot names the same domain (an absolute name): `user@example.test.`.
    let d = match d.strip_suffix(b".") {
        Some(rest) if !rest.is_empty() && !rest.ends_with(b".") => rest,
        _ => d,
    };
    for label in d.split(|&b| b == b'.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
            && label[0] != b'-'
            && label[label.len() - 1] != b'-';
        if !ok {
            return Err(AddressError::Syntax);
        }
    }
    Ok(String::from_utf8_lossy(d).into_owned())
}

/// RFC 5322 atext, plus 8-bit bytes (RFC 6531 local parts).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

fn is_dot_string(s: &[u8]) -> bool {
    !s.is_empty() && s.split(|&b| b == b'.').all(|atom| !atom.is_empty() && atom.iter().all(|&b| is_atext(b)))
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ').count();
    &s[n..]
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(s: &str) -> Result<(Option<Address>, &[u8]), AddressError> {
        parse_path(s.as_bytes(), PathKind::ForwardPath)
    }

    #[test]
    fn plain_path_and_params() {
        let (a, rest) = parse_path(b"<Jane@Example.TEST> SIZE=100", PathKind::ReversePath).unwrap();
        let a = a.unwrap();
        assert_eq!((a.local.as_str(), a.domain.as_str()), ("Jane", "Example.TEST"));
        assert_eq!(a.key(), "jane@example.test");
        assert_eq!(rest, b" SIZE=100");
    }

    #[test]
    fn null_reverse_path_only_for_mail() {
        assert_eq!(parse_path(b"<>", PathKind::ReversePath).unwrap().0, None);
        assert!(fwd("<>").is_err());
    }

    #[test]
    fn bare_postmaster_only_as_recipient() {
        let a = fwd("<PostMaster>").unwrap().0.unwrap();
        assert!(a.is_postmaster());
        assert_eq!(a.domain, "");
        assert!(parse_path(b"<postmaster>", PathKind::ReversePath).is_err());
    }

    #[test]
    fn brackets_required() {
        assert_eq!(parse_path(b"jane@example.test", PathKind::ReversePath), Err(AddressError::NoBrackets));
    }

    #[test]
    fn quoted_local_part_and_source_route() {
        let a = fwd("<\"john doe\"@example.test>").unwrap().0.unwrap();
        assert!(a.quoted);
        assert_eq!(a.local, "john doe");
        assert_eq!(a.to_string(), "\"john doe\"@example.test");
        let a = fwd("<@relay.example,@b.example:sam@example.test>").unwrap().0.unwrap();
        assert!(a.source_route);
        assert_eq!(a.key(), "sam@example.test");
    }

    #[test]
    fn bad_syntax_refused() {
        for bad in ["<a@>", "<@b>", "<a..b@c>", "<a@b..c>", "<a@-b>", "<a@b", "<a b@c>", "<a@[1.2.3]>", "<a@b..>", "<a@.>"] {
            assert!(fwd(bad).is_err(), "{bad}");
        }
        assert!(fwd("<a@[192.0.2.1]>").is_ok());
        assert_eq!(fwd("<a@Example.Test.>").unwrap().0.unwrap().domain, "Example.Test", "trailing dot dropped");
        assert!(fwd("<a@[IPv6:::1]>").is_ok());
    }

    #[test]
    fn overlong_local_part_refused() {
        let s = format!("<{}@example.test>", "a".repeat(65));
        assert_eq!(fwd(&s), Err(AddressError::TooLong));
    }
}
