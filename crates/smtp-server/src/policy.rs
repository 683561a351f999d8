//! One place decides who may connect and which recipients are accepted (DESIGN "Decisions as
//! data"). Every decision carries the rule that made it, so the SMTP reply, the journal entry
//! and later `postroom explain` tell the same story.

use std::fmt;
use std::net::IpAddr;

use directory::Resolution;
use mail_proto::{Address, Reply};

/// The rule behind a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// No connection restriction applies (R4 lists come with the relay issue).
    NoConnectRestriction,
    /// R2: mail to a local user is never relay.
    LocalRecipient,
    /// RFC 5321 §4.5.1: postmaster is always accepted, even before an owner is configured.
    Postmaster,
    /// A local domain, but nobody has this address (D2: 550 at RCPT, never a bounce later).
    UnknownLocalUser,
    /// R1 relay mode *none*: recipients in other domains are refused.
    RelayModeNone,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::NoConnectRestriction => "no connection restriction matched",
            Rule::LocalRecipient => "local recipient (R2)",
            Rule::Postmaster => "postmaster is always accepted (RFC 5321 4.5.1)",
            Rule::UnknownLocalUser => "no such user in a local domain (D2)",
            Rule::RelayModeNone => "relay mode none (R1)",
        })
    }
}

/// A policy outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub rule: Rule,
}

impl Decision {
    /// The refusal reply for a recipient decision.
    pub fn rcpt_reply(&self) -> Option<Reply> {
        if self.allow {
            return None;
        }
        Some(match self.rule {
            Rule::UnknownLocalUser => Reply::new(550, (1, 1), "Recipient address rejected: user unknown"),
            // R3: IMail's wording.
            _ => Reply::new(550, (7, 1), "Relay access denied: unknown local host, not a gateway"),
        })
    }

    /// Journal code for a refusal (9V relay refused).
    pub fn is_relay_refusal(&self) -> bool {
        !self.allow && self.rule == Rule::RelayModeNone
    }
}

/// May this client connect?
pub fn connect(_ip: IpAddr) -> Decision {
    Decision { allow: true, rule: Rule::NoConnectRestriction }
}

/// Is this recipient accepted from this client?
pub fn recipient(address: &Address, resolution: &Resolution) -> Decision {
    match resolution {
        Resolution::Unknown if address.is_postmaster() => Decision { allow: true, rule: Rule::Postmaster },
        Resolution::Local { .. } => Decision { allow: true, rule: Rule::LocalRecipient },
        Resolution::Unknown => Decision { allow: false, rule: Rule::UnknownLocalUser },
        Resolution::Remote => Decision { allow: false, rule: Rule::RelayModeNone },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_accepted_remote_refused_with_rule() {
        let sam = Address::parse("sam@example.test").unwrap();
        let local = recipient(&sam, &Resolution::Local { user_id: 1, user: "sam".into() });
        assert!(local.allow);
        let remote = recipient(&sam, &Resolution::Remote);
        assert_eq!(remote.rule, Rule::RelayModeNone);
        assert_eq!(remote.rcpt_reply().unwrap().enhanced().as_deref(), Some("5.7.1"));
        assert_eq!(recipient(&sam, &Resolution::Unknown).rcpt_reply().unwrap().enhanced().as_deref(), Some("5.1.1"));
        let pm = Address::parse("PostMaster@example.test").unwrap();
        assert_eq!(recipient(&pm, &Resolution::Unknown).rule, Rule::Postmaster);
    }
}
