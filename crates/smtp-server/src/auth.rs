//! The SASL exchange of SMTP AUTH (RFC 4954) for PLAIN (RFC 4616) and LOGIN, sans-IO: it turns
//! the AUTH command and the client's response lines into challenges, credentials, or errors.

use mail_proto::Reply;
use mail_proto::sasl::{self, SaslError};

/// Where an exchange stands after a step.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this 334 challenge and wait for a response line.
    Challenge(Reply),
    /// The client gave these; verify them.
    Credentials { user: String, password: String },
    /// The exchange ended without credentials.
    Failed(Reply),
}

/// An exchange waiting for the client's next response line.
#[derive(Debug)]
pub enum Exchange {
    Plain,
    LoginUser,
    LoginPassword { user: String },
}

/// Start an exchange from the AUTH command's argument (`PLAIN [initial]` or `LOGIN [initial]`).
pub fn start(argument: &str) -> (Step, Option<Exchange>) {
    let mut words = argument.split_whitespace();
    let mechanism = words.next().unwrap_or_default().to_ascii_uppercase();
    let initial = words.next();
    if words.next().is_some() {
        return (Step::Failed(Reply::new(501, (5, 4), "Syntax: AUTH mechanism [initial-response]")), None);
    }
    match (mechanism.as_str(), initial) {
        ("PLAIN", None) => (Step::Challenge(Reply::plain(334, "")), Some(Exchange::Plain)),
        ("LOGIN", None) => (Step::Challenge(Reply::plain(334, sasl::encode(b"Username:"))), Some(Exchange::LoginUser)),
        ("PLAIN" | "LOGIN", Some(initial)) => {
            let exchange = if mechanism == "PLAIN" { Exchange::Plain } else { Exchange::LoginUser };
            respond(exchange, initial.as_bytes())
        }
        ("", _) => (Step::Failed(Reply::new(501, (5, 4), "Syntax: AUTH mechanism [initial-response]")), None),
        _ => (Step::Failed(Reply::new(504, (5, 4), "Unrecognized authentication type")), None),
    }
}

/// Feed one response line (without CRLF).
pub fn respond(exchange: Exchange, line: &[u8]) -> (Step, Option<Exchange>) {
    if line.trim_ascii() == b"*" {
        return (Step::Failed(Reply::new(501, (0, 0), "Authentication cancelled")), None);
    }
    let decoded = match sasl::decode(line) {
        Ok(d) => d,
        Err(_) => return (Step::Failed(Reply::new(501, (5, 2), "Cannot decode the response")), None),
    };
    match exchange {
        Exchange::Plain => match sasl::parse_plain(&decoded) {
            Ok((user, password)) => (Step::Credentials { user, password }, None),
            Err(SaslError::AuthzidNotAllowed) => (Step::Failed(Reply::new(535, (7, 8), "Authentication credentials invalid")), None),
            Err(_) => (Step::Failed(Reply::new(501, (5, 2), "Malformed PLAIN response")), None),
        },
        Exchange::LoginUser => match String::from_utf8(decoded) {
            Ok(user) if !user.is_empty() => (Step::Challenge(Reply::plain(334, sasl::encode(b"Password:"))), Some(Exchange::LoginPassword { user })),
            _ => (Step::Failed(Reply::new(501, (5, 2), "Malformed user name")), None),
        },
        Exchange::LoginPassword { user } => match String::from_utf8(decoded) {
            Ok(password) => (Step::Credentials { user, password }, None),
            Err(_) => (Step::Failed(Reply::new(535, (7, 8), "Authentication credentials invalid")), None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, pw: &str) -> Step {
        Step::Credentials { user: user.into(), password: pw.into() }
    }

    #[test]
    fn plain_with_and_without_initial_response() {
        let initial = sasl::encode(b"\0sam\0pw");
        assert_eq!(start(&format!("PLAIN {initial}")).0, creds("sam", "pw"));
        let (step, ex) = start("plain");
        assert_eq!(step, Step::Challenge(Reply::plain(334, "")));
        assert_eq!(respond(ex.unwrap(), initial.as_bytes()).0, creds("sam", "pw"));
    }

    #[test]
    fn login_two_steps() {
        let (step, ex) = start("LOGIN");
        assert_eq!(step.clone_reply().unwrap().to_string(), "334 VXNlcm5hbWU6\r\n");
        let (step, ex) = respond(ex.unwrap(), sasl::encode(b"sam").as_bytes());
        assert_eq!(step.clone_reply().unwrap().to_string(), "334 UGFzc3dvcmQ6\r\n");
        assert_eq!(respond(ex.unwrap(), sasl::encode(b"pw").as_bytes()).0, creds("sam", "pw"));
    }

    #[test]
    fn errors_have_rfc_4954_codes() {
        let code = |s: Step| match s {
            Step::Failed(r) => r.code,
            other => panic!("{other:?}"),
        };
        assert_eq!(code(start("CRAM-MD5").0), 504);
        assert_eq!(code(start("").0), 501);
        assert_eq!(code(respond(Exchange::Plain, b"*").0), 501);
        assert_eq!(code(respond(Exchange::Plain, b"%%%").0), 501);
        assert_eq!(code(respond(Exchange::Plain, sasl::encode(b"boss\0sam\0pw").as_bytes()).0), 535);
    }

    impl Step {
        fn clone_reply(&self) -> Option<Reply> {
            match self {
                Step::Challenge(r) | Step::Failed(r) => Some(r.clone()),
                Step::Credentials { .. } => None,
            }
        }
    }
}
