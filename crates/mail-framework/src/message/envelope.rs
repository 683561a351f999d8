//! A message's envelope as the receiving door saw it: the part of the message model the doors
//! fill in (SMTP, submission, the local socket) and [`super::receive`] stores.

use super::Origin;

/// A message's envelope, as the receiving door saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    /// Reverse-path; empty for the null sender `<>`.
    pub mail_from: String,
    /// Forward-paths, as the client wrote them (bare `postmaster` allowed).
    pub recipients: Vec<String>,
    pub client_ip: String,
    pub helo: String,
    pub origin: Origin,
    /// Delivery status notification requests (RFC 3461), when the client made any.
    pub dsn: Dsn,
    /// RFC 4954 §5: the submitter passed on with `AUTH=` to next hops we authenticate to — the
    /// authenticated user's mailbox; `None` when unknown or not trusted (passed on as `AUTH=<>`).
    pub auth_sender: Option<String>,
}

/// RFC 3461 parameters: RET and ENVID of MAIL, NOTIFY and ORCPT of each RCPT (in the order of
/// `Envelope::recipients`; empty when no recipient had any).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dsn {
    /// `FULL` or `HDRS`.
    pub ret: Option<String>,
    pub envid: Option<String>,
    pub recipients: Vec<RcptDsn>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptDsn {
    /// `NEVER`, or a comma list of `SUCCESS`, `FAILURE`, `DELAY`; `None` = not given.
    pub notify: Option<String>,
    /// `addr-type;address` as given.
    pub orcpt: Option<String>,
}
