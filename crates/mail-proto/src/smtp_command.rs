//! SMTP command lines (RFC 5321 §4.1.1), parsed without I/O.

use crate::address::{Address, AddressError, PathKind, parse_path};

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// MAIL and RCPT may be longer by their ESMTP parameters (RFC 5321 §4.5.3.1.4, RFC 1869 §4.1.2).
pub const MAX_MAIL_RCPT_LINE: usize = 2048;

/// An ESMTP parameter `KEYWORD[=value]`, keyword uppercased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub keyword: String,
    pub value: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    /// `from` is `None` for the null reverse-path `<>`.
    Mail {
        from: Option<Address>,
        params: Vec<Param>,
    },
    Rcpt {
        to: Address,
        params: Vec<Param>,
    },
    Data,
    /// RFC 3030 CHUNKING: `BDAT <size> [LAST]`; exactly `size` octets of message follow.
    Bdat(crate::chunk::Bdat),
    Rset,
    Noop,
    Quit,
    Help,
    Vrfy(String),
    StartTls,
    Auth(String),
    /// RFC 1985: start delivery of mail held for a node (`domain`, `@domain`, `#queue`).
    Etrn(String),
    /// A command RFC 5321 knows that Postroom does not offer (EXPN, SEND, SOML, SAML, TURN).
    NotImplemented(String),
    Unknown(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("syntax error in parameters")]
    Syntax(&'static str),
    #[error("bad address: {0}")]
    Address(#[from] AddressError),
}

/// Parse one command line without its CRLF.
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let (verb, args) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let verb = String::from_utf8_lossy(verb).to_ascii_uppercase();
    let text = || String::from_utf8_lossy(args).trim().to_string();
    Ok(match verb.as_str() {
        "HELO" | "EHLO" => {
            let domain = text();
            if domain.is_empty() || domain.contains(' ') {
                return Err(CommandError::Syntax("domain name required"));
            }
            if verb == "HELO" { Command::Helo(domain) } else { Command::Ehlo(domain) }
        }
        "MAIL" => {
            let rest = strip_prefix_ci(args, b"FROM:").ok_or(CommandError::Syntax("MAIL FROM:<address> expected"))?;
            let (from, rest) = parse_path(rest, PathKind::ReversePath)?;
            Command::Mail { from, params: parse_params(rest)? }
        }
        "RCPT" => {
            let rest = strip_prefix_ci(args, b"TO:").ok_or(CommandError::Syntax("RCPT TO:<address> expected"))?;
            let (to, rest) = parse_path(rest, PathKind::ForwardPath)?;
            Command::Rcpt { to: to.ok_or(CommandError::Syntax("recipient required"))?, params: parse_params(rest)? }
        }
        "DATA" | "RSET" | "QUIT" | "STARTTLS" if !args.iter().all(|&b| b == b' ') => {
            return Err(CommandError::Syntax("no parameters allowed"));
        }
        "DATA" => Command::Data,
        "BDAT" => Command::Bdat(crate::chunk::parse_bdat(args).ok_or(CommandError::Syntax("BDAT chunk-size [LAST] expected"))?),
        "RSET" => Command::Rset,
        "QUIT" => Command::Quit,
        "STARTTLS" => Command::StartTls,
        "NOOP" => Command::Noop,
        "HELP" => Command::Help,
        "VRFY" => Command::Vrfy(text()),
        "AUTH" => Command::Auth(text()),
        "ETRN" => Command::Etrn(text()),
        "EXPN" | "SEND" | "SOML" | "SAML" | "TURN" => Command::NotImplemented(verb),
        _ => Command::Unknown(verb),
    })
}

/// RFC 5321 §4.1.2: parameters after the path, separated by spaces.
fn parse_params(rest: &[u8]) -> Result<Vec<Param>, CommandError> {
    if !rest.is_empty() && rest[0] != b' ' {
        return Err(CommandError::Syntax("space expected after address"));
    }
    let text = std::str::from_utf8(rest).map_err(|_| CommandError::Syntax("parameters must be ASCII"))?;
    text.split(' ')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (p, None),
            };
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(CommandError::Syntax("bad parameter keyword"));
            }
            // RFC 3461 §4.2: whatever comes in is relayed, so a malformed ORCPT (a bare CR in its
            // address type, say) is refused here rather than stored.
            if k.eq_ignore_ascii_case("ORCPT") && v.as_deref().is_some_and(|v| parse_orcpt(v).is_none()) {
                return Err(CommandError::Syntax("bad ORCPT parameter: addr-type;xtext expected"));
            }
            Ok(Param { keyword: k.to_ascii_uppercase(), value: v })
        })
        .collect()
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) { Some(&s[prefix.len()..]) } else { None }
}

/// The line limit that applies to a command line starting with these bytes: AUTH may carry an
/// initial response as long as any SASL response (RFC 4954 §4).
pub fn line_limit(line_start: &[u8]) -> usize {
    let verb = &line_start[..line_start.len().min(5)];
    if verb.eq_ignore_ascii_case(b"AUTH ") {
        crate::sasl::MAX_SASL_LINE
    } else if verb[..verb.len().min(4)].eq_ignore_ascii_case(b"MAIL") || verb[..verb.len().min(4)].eq_ignore_ascii_case(b"RCPT") {
        MAX_MAIL_RCPT_LINE
    } else {
        MAX_COMMAND_LINE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_with_params() {
        let c = parse(b"mail from:<jane@example.test> SIZE=1000 BODY=8BITMIME").unwrap();
        let Command::Mail { from, params } = c else { panic!() };
        assert_eq!(from.unwrap().key(), "jane@example.test");
        assert_eq!(params[0], Param { keyword: "SIZE".into(), value: Some("1000".into()) });
        assert_eq!(params[1].keyword, "BODY");
    }

    #[test]
    fn mail_without_brackets_is_an_address_error() {
        assert_eq!(parse(b"MAIL FROM:jane@example.test"), Err(CommandError::Address(AddressError::NoBrackets)));
        assert!(parse(b"MAIL jane").is_err());
    }

    #[test]
    fn space_after_colon_is_tolerated() {
        assert!(matches!(parse(b"RCPT TO: <sam@example.test>"), Ok(Command::Rcpt { .. })));
    }

    #[test]
    fn verbs() {
        assert_eq!(parse(b"EHLO client.example").unwrap(), Command::Ehlo("client.example".into()));
        assert!(parse(b"EHLO").is_err());
        assert_eq!(parse(b"data").unwrap(), Command::Data);
        assert!(parse(b"DATA now").is_err());
        assert_eq!(parse(b"bdat 12 last").unwrap(), Command::Bdat(crate::chunk::Bdat { size: 12, last: true }));
        assert!(parse(b"BDAT twelve").is_err());
        assert_eq!(parse(b"EXPN staff").unwrap(), Command::NotImplemented("EXPN".into()));
        assert_eq!(parse(b"FOO").unwrap(), Command::Unknown("FOO".into()));
        assert_eq!(parse(b"\xff\xfe").unwrap(), Command::Unknown("\u{fffd}\u{fffd}".into()));
    }

    #[test]
    fn limits() {
        assert_eq!(line_limit(b"MAIL FROM"), MAX_MAIL_RCPT_LINE);
        assert_eq!(line_limit(b"NOOP"), MAX_COMMAND_LINE);
        assert_eq!(line_limit(b"NO"), MAX_COMMAND_LINE);
        assert_eq!(line_limit(b"auth PLAIN AAAA"), crate::sasl::MAX_SASL_LINE);
    }
}

/// RFC 3461 §4: xtext, `+XX` hex escapes for `+`, `=` and bytes outside 33..126.
pub fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c if (33..=126).contains(&c) && c != b'=' => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

pub fn xtext_encode(s: &str) -> String {
    s.bytes().map(|b| if (33..=126).contains(&b) && b != b'+' && b != b'=' { (b as char).to_string() } else { format!("+{b:02X}") }).collect()
}

/// RFC 3461 §4.2 ORCPT: `addr-type ";" xtext`. The address type is an atom (RFC 5322 atext,
/// without `=`, which no ESMTP value may carry); the address is xtext. Returns the type and the
/// decoded address.
pub fn parse_orcpt(value: &str) -> Option<(&str, String)> {
    let (kind, addr) = value.split_once(';')?;
    if !is_addr_type(kind) {
        return None;
    }
    Some((kind, xtext_decode(addr)?))
}

/// An ORCPT address type: one atom (RFC 5322 atext), `=` excluded.
pub fn is_addr_type(kind: &str) -> bool {
    !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/?^_`{|}~".contains(&b))
}

/// The ORCPT value to relay for one stored as `addr-type;decoded address`: the address xtext
/// encoded. `None` when the type is not an atom: such an ORCPT is dropped, never passed on.
pub fn orcpt_value(stored: &str) -> Option<String> {
    let (kind, addr) = stored.split_once(';')?;
    is_addr_type(kind).then(|| format!("{kind};{}", xtext_encode(addr)))
}

/// RFC 4954 §5 `AUTH=` on MAIL FROM: xtext that decodes to an addr-spec, or to `<>` (the
/// submitter is not known). `Some(None)` for `<>`, `Some(Some(mailbox))`, `None` when the value
/// is neither.
pub fn parse_auth_param(value: &str) -> Option<Option<Address>> {
    let decoded = xtext_decode(value)?;
    if decoded == "<>" {
        return Some(None);
    }
    // An addr-spec: no brackets, no source route, not a bare local part.
    let addr = Address::parse(&decoded).ok()?;
    (!addr.domain.is_empty()).then_some(Some(addr))
}

/// The `AUTH=` value to relay for a submitter (RFC 4954 §5): the mailbox as xtext, or `<>`
/// when the submitter is unknown or not trusted.
pub fn auth_param_value(submitter: Option<&str>) -> String {
    match submitter.filter(|s| !s.is_empty()) {
        Some(mailbox) => xtext_encode(mailbox),
        None => "<>".into(),
    }
}

/// RFC 3461 NOTIFY: `NEVER`, or a list of SUCCESS, FAILURE, DELAY (uppercased, checked).
pub fn parse_notify(value: &str) -> Option<String> {
    let items: Vec<String> = value.split(',').map(|v| v.trim().to_ascii_uppercase()).collect();
    let ok = if items.len() == 1 && items[0] == "NEVER" {
        true
    } else {
        items.iter().all(|i| matches!(i.as_str(), "SUCCESS" | "FAILURE" | "DELAY")) && items.iter().enumerate().all(|(n, i)| !items[..n].contains(i))
    };
    ok.then(|| items.join(","))
}

#[cfg(test)]
mod dsn_tests {
    use super::*;

    #[test]
    fn orcpt_is_an_atom_and_xtext() {
        assert_eq!(parse_orcpt("rfc822;bob+2Bx@example.test"), Some(("rfc822", "bob+x@example.test".to_string())));
        assert_eq!(parse_orcpt("X-Local;bob"), Some(("X-Local", "bob".to_string())));
        for bad in ["rfc\r822;bob@example.test", "rfc 822;bob", ";bob", "rfc822", "rf=c;bob", "rf(c);bob", "rfc822;bad+ZZ", "rfc822;a\rb"] {
            assert_eq!(parse_orcpt(bad), None, "{bad:?}");
        }
        // The whole RCPT command is refused by the parser.
        assert!(parse(b"RCPT TO:<bob@example.test> ORCPT=rfc\r822;bob@example.test").is_err());
        assert!(parse(b"RCPT TO:<bob@example.test> ORCPT=rfc822;bob@example.test").is_ok());
        // Relaying: the decoded address is encoded again; a bad type is dropped.
        assert_eq!(orcpt_value("rfc822;bob+x@example.test").as_deref(), Some("rfc822;bob+2Bx@example.test"));
        assert_eq!(orcpt_value("rfc822;a\r\nDATA").as_deref(), Some("rfc822;a+0D+0ADATA"));
        assert_eq!(orcpt_value("rfc\r822;bob@example.test"), None);
        assert_eq!(orcpt_value("rfc822"), None);
    }

    #[test]
    fn xtext_round_trip() {
        assert_eq!(xtext_decode("bob+2Bx@example.test").as_deref(), Some("bob+x@example.test"));
        assert_eq!(xtext_encode("bob+x=y@example.test"), "bob+2Bx+3Dy@example.test");
        assert_eq!(xtext_decode("bad+Z1"), None);
        assert_eq!(xtext_decode("a=b"), None);
    }

    #[test]
    fn auth_parameter() {
        assert_eq!(parse_auth_param("<>"), Some(None));
        assert_eq!(parse_auth_param("sam@example.test").unwrap().unwrap().key(), "sam@example.test");
        assert_eq!(parse_auth_param("e+3Dmc2@example.test").unwrap().unwrap().local, "e=mc2");
        for bad in ["", "sam", "<sam@example.test>", "sam@", "a+ZZ@b.test", "a b@c.test", "@relay:sam@example.test"] {
            assert_eq!(parse_auth_param(bad), None, "{bad:?}");
        }
        assert_eq!(auth_param_value(Some("e=mc2@example.test")), "e+3Dmc2@example.test");
        assert_eq!(auth_param_value(None), "<>");
        assert_eq!(auth_param_value(Some("")), "<>");
        let Command::Mail { params, .. } = parse(b"MAIL FROM:<sam@example.test> AUTH=<>").unwrap() else { panic!() };
        assert_eq!(params, vec![Param { keyword: "AUTH".into(), value: Some("<>".into()) }]);
    }

    #[test]
    fn notify_values() {
        assert_eq!(parse_notify("success,delay").as_deref(), Some("SUCCESS,DELAY"));
        assert_eq!(parse_notify("NEVER").as_deref(), Some("NEVER"));
        assert_eq!(parse_notify("NEVER,SUCCESS"), None);
        assert_eq!(parse_notify("SUCCESS,SUCCESS"), None);
        assert_eq!(parse_notify("SOMETIMES"), None);
    }
}
