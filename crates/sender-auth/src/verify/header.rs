//! The Authentication-Results header field (RFC 8601), sans-IO: writing ours, and removing the
//! ones that arrive claiming to be ours.

use std::borrow::Cow;
use std::fmt::Write as _;

/// One `method=result` statement of the header (RFC 8601 §2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    pub method: &'static str,
    pub result: &'static str,
    /// A comment for people: why, in a few words. Written as an RFC 5322 comment.
    pub reason: Option<String>,
    /// `ptype.property=value` pairs, in order.
    pub properties: Vec<(&'static str, String)>,
}

/// `Authentication-Results: ID; s1;\r\n\ts2 ...\r\n`, or `ID; none` when nothing was checked
/// (RFC 8601 §2.2). Values that came from the network are quoted where they are not plain
/// tokens, and comments lose the characters that would end them, so a sender cannot add a
/// statement of its own.
pub fn render(authserv_id: &str, statements: &[Statement]) -> String {
    let mut out = format!("Authentication-Results: {}", pvalue(authserv_id));
    if statements.is_empty() {
        out.push_str("; none\r\n");
        return out;
    }
    for s in statements {
        let _ = write!(out, ";\r\n\t{}={}", s.method, s.result);
        if let Some(reason) = &s.reason {
            let reason: String = reason.chars().filter(|c| !matches!(c, '(' | ')' | '\\') && !c.is_control()).take(200).collect();
            let _ = write!(out, " ({reason})");
        }
        for (property, value) in &s.properties {
            let _ = write!(out, " {property}={}", pvalue(value));
        }
    }
    out.push_str("\r\n");
    out
}

/// A value as RFC 8601 §2.2 `pvalue` allows it: bare when it is made of atext, dots and `@`
/// (an address or a domain), else a quoted-string.
fn pvalue(value: &str) -> Cow<'_, str> {
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.@".contains(c);
    if !value.is_empty() && value.len() <= 256 && value.chars().all(atext) {
        return Cow::Borrowed(value);
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars().take(256) {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c if c.is_control() => quoted.push('?'),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    Cow::Owned(quoted)
}

/// The message without the Authentication-Results fields whose authserv-id is `authserv_id`
/// (compared without regard to case): RFC 8601 §5 says a receiver MUST remove those, since
/// they did not come from it. Borrowed when there are none. Only the header section is
/// looked at; every other byte is kept as it was.
pub fn strip_own<'m>(message: &'m [u8], authserv_id: &str) -> Cow<'m, [u8]> {
    let mut kept: Option<Vec<u8>> = None;
    let mut at = 0;
    while at < message.len() {
        let field_end = field_end(message, at);
        let field = &message[at..field_end];
        if field.starts_with(b"\r\n") || field.starts_with(b"\n") || !is_field(field) {
            break; // The body (or something that is not a header field) starts here.
        }
        let ours = results_id(field).is_some_and(|id| id.eq_ignore_ascii_case(authserv_id.as_bytes()));
        match (&mut kept, ours) {
            (None, true) => kept = Some(message[..at].to_vec()),
            (Some(out), false) => out.extend_from_slice(field),
            _ => {}
        }
        at = field_end;
    }
    match kept {
        None => Cow::Borrowed(message),
        Some(mut out) => {
            out.extend_from_slice(&message[at..]);
            Cow::Owned(out)
        }
    }
}

/// Where the header field starting at `start` ends: after its last line, continuation lines
/// (starting with a space or tab, RFC 5322 §2.2.3) included. An empty line is a field of its
/// own (the end of the header section).
fn field_end(message: &[u8], start: usize) -> usize {
    let mut at = start;
    loop {
        let Some(lf) = message[at..].iter().position(|&b| b == b'\n') else { return message.len() };
        at += lf + 1;
        let empty_line = matches!(&message[start..at], b"\r\n" | b"\n");
        if empty_line || !matches!(message.get(at), Some(b' ' | b'\t')) {
            return at;
        }
    }
}

/// A header field: a name of printable characters, then a colon (RFC 5322 §2.2, with the
/// obsolete white space before the colon of §4.5).
fn is_field(field: &[u8]) -> bool {
    field.iter().position(|&b| b == b':').is_some_and(|colon| {
        let name = field[..colon].trim_ascii_end();
        !name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b))
    })
}

/// The authserv-id of an Authentication-Results field, or None for any other field. The id is
/// the first value after the colon, past white space and comments (RFC 8601 §2.2: CFWS).
fn results_id(field: &[u8]) -> Option<&[u8]> {
    let colon = field.iter().position(|&b| b == b':')?;
    if !field[..colon].trim_ascii_end().eq_ignore_ascii_case(b"Authentication-Results") {
        return None;
    }
    let mut at = colon + 1;
    let mut depth = 0usize;
    while let Some(&b) = field.get(at) {
        match (depth, b) {
            (0, b' ' | b'\t' | b'\r' | b'\n') => {}
            (_, b'(') => depth += 1,
            (0, _) => break,
            (_, b')') => depth -= 1,
            (_, b'\\') => at += 1, // a quoted-pair inside the comment
            _ => {}
        }
        at += 1;
    }
    let rest = field.get(at..).unwrap_or_default();
    if let Some(quoted) = rest.strip_prefix(b"\"") {
        return quoted.iter().position(|&b| b == b'"').map(|end| &quoted[..end]);
    }
    let end = rest.iter().position(|&b| matches!(b, b';' | b'(' | b' ' | b'\t' | b'\r' | b'\n')).unwrap_or(rest.len());
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "mail.example.test";

    fn stripped(message: &[u8]) -> Vec<u8> {
        strip_own(message, ID).into_owned()
    }

    /// RFC 8601 §5: fields claiming our authserv-id go, whatever the case, folding or comments;
    /// other receivers' fields and everything else stay byte for byte.
    #[test]
    fn forged_results_with_our_id_are_removed() {
        let message = b"Authentication-Results: MAIL.Example.Test; dmarc=pass\r\n\theader.from=office.test\r\n\
Received: from x\r\nAuthentication-Results: other.example; spf=pass smtp.mailfrom=a@b\r\n\
Authentication-Results: (a comment (nested)) mail.example.test 1; dkim=pass\r\n\
Authentication-Results : \"mail.example.test\"; none\r\n\
Subject: hi\r\n\r\nAuthentication-Results: mail.example.test; in the body stays\r\n";
        assert_eq!(
            stripped(message),
            b"Received: from x\r\nAuthentication-Results: other.example; spf=pass smtp.mailfrom=a@b\r\n\
Subject: hi\r\n\r\nAuthentication-Results: mail.example.test; in the body stays\r\n"
        );
    }

    #[test]
    fn lookalikes_and_clean_messages_are_untouched() {
        for message in [
            &b"Authentication-Results: mail.example.test.evil; dkim=pass\r\nSubject: x\r\n\r\nbody\r\n"[..],
            b"X-Authentication-Results: mail.example.test; dkim=pass\r\n\r\n",
            b"Subject: a\r\n Authentication-Results: mail.example.test; folded into Subject\r\n\r\n",
            b"From: a@b\n\nbare LF\n",
            b"",
        ] {
            assert!(matches!(strip_own(message, ID), Cow::Borrowed(_)), "{}", String::from_utf8_lossy(message));
        }
        // Bare LF line ends are read too.
        assert_eq!(stripped(b"Authentication-Results: mail.example.test; x\nSubject: y\n\nz\n"), b"Subject: y\n\nz\n");
        // A message that is all header, no body.
        assert_eq!(stripped(b"Subject: y\r\nAuthentication-Results: mail.example.test; x\r\n"), b"Subject: y\r\n");
    }

    #[test]
    fn header_is_one_field_with_a_statement_per_line() {
        let statements = vec![
            Statement {
                method: "spf",
                result: "pass",
                reason: Some("domain of jane@pass.example.test designates 127.0.0.1".into()),
                properties: vec![("smtp.mailfrom", "jane@pass.example.test".into())],
            },
            Statement { method: "dkim", result: "none", reason: None, properties: vec![] },
            Statement {
                method: "dmarc",
                result: "fail",
                reason: Some("p=reject) ; dmarc=pass (".into()),
                properties: vec![("header.from", "office.test".into())],
            },
        ];
        assert_eq!(
            render(ID, &statements),
            "Authentication-Results: mail.example.test;\r\n\tspf=pass (domain of jane@pass.example.test designates 127.0.0.1) \
smtp.mailfrom=jane@pass.example.test;\r\n\tdkim=none;\r\n\tdmarc=fail (p=reject ; dmarc=pass ) header.from=office.test\r\n"
        );
        assert_eq!(render(ID, &[]), "Authentication-Results: mail.example.test; none\r\n");
        // A MAIL FROM with a quoted local part, or a HELO with spaces, cannot break out.
        let odd = Statement { method: "spf", result: "none", reason: None, properties: vec![("smtp.mailfrom", "\"a;b\\\"c\"@x.test\r\n".into())] };
        assert_eq!(
            render(ID, &[odd]),
            "Authentication-Results: mail.example.test;\r\n\tspf=none smtp.mailfrom=\"\\\"a;b\\\\\\\"c\\\"@x.test??\"\r\n"
        );
    }
}
