//! The typed states of the message model, their SQL form, and the one function that moves a
//! recipient from one state to another. The migration's CHECK constraints list the same words,
//! so a state the code does not know can never be stored.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

macro_rules! sql_words {
    ($ty:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            /// The word stored in the database (and shown by `postroom queue`).
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $word),+ }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($word => Some($ty::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let s = value.as_str()?;
                $ty::parse(s).ok_or_else(|| FromSqlError::Other(format!("unknown {} {s:?}", stringify!($ty)).into()))
            }
        }
    };
}

/// Where a recipient stands. Unfinished: `Queued`, `Forward`, `InAttempt`, `Bounce`,
/// `Quarantined`; the rest are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecipientState {
    /// Waiting for the framework's snap-ins.
    Queued,
    /// Waiting for the SMTP client (due at `next_attempt`).
    Forward,
    /// Claimed by one outbound attempt (attempt id and lease on the row).
    InAttempt,
    /// Accepted by the next hop.
    Sent,
    /// In a local mailbox.
    Delivered,
    /// Failed after acceptance; waiting for the non-delivery snap-in to report it.
    Bounce,
    /// Failed and reported (or not, as NOTIFY asked).
    Failed,
    /// An alias or forwarding address: its targets were queued in its place.
    Expanded,
    /// Kept aside by a filter until released.
    Quarantined,
    /// Thrown away by a filter or the administrator's quarantine delete.
    Discarded,
    /// Removed by `postroom queue delete`.
    Deleted,
    /// Another recipient of the same message reaches the same mailbox or address.
    Duplicate,
}

sql_words!(RecipientState {
    Queued => "queued",
    Forward => "forward",
    InAttempt => "attempt",
    Sent => "sent",
    Delivered => "delivered",
    Bounce => "bounce",
    Failed => "failed",
    Expanded => "expanded",
    Quarantined => "quarantined",
    Discarded => "discarded",
    Deleted => "deleted",
    Duplicate => "duplicate",
});

impl RecipientState {
    /// Does the message's body still have to be kept for this recipient?
    pub fn needs_body(self) -> bool {
        matches!(self, Self::Queued | Self::Forward | Self::InAttempt | Self::Bounce | Self::Quarantined)
    }

    /// May a recipient go from `self` to `to`? Final states never change; everything else
    /// follows the message flow (DESIGN "How a message flows").
    pub fn may_become(self, to: RecipientState) -> bool {
        use RecipientState::*;
        match (self, to) {
            (Queued, Delivered | Forward | Failed | Expanded | Quarantined | Discarded | Duplicate | Queued | Deleted) => true,
            (Forward, InAttempt | Deleted | Bounce) => true,
            // A lapsed claim goes back; an outcome moves on.
            (InAttempt, Forward | Sent | Bounce | Deleted) => true,
            (Bounce, Failed | Deleted) => true,
            (Quarantined, Queued | Discarded) => true,
            _ => false,
        }
    }
}

/// Why a recipient waits instead of being attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hold {
    None,
    /// `postroom queue hold`.
    Admin,
    /// Mail for a dial-up domain, waiting for ETRN (C7).
    Etrn,
    /// The framework failed on it too often (a poison message); the reason is in `last_reply`.
    Failing,
}

impl Hold {
    pub fn as_i64(self) -> i64 {
        match self {
            Hold::None => 0,
            Hold::Admin => 1,
            Hold::Etrn => 2,
            Hold::Failing => 3,
        }
    }

    pub fn from_i64(n: i64) -> Option<Hold> {
        Some(match n {
            0 => Hold::None,
            1 => Hold::Admin,
            2 => Hold::Etrn,
            3 => Hold::Failing,
            _ => return None,
        })
    }

    /// As `postroom queue list` shows it.
    pub fn describe(self) -> &'static str {
        match self {
            Hold::None => "-",
            Hold::Admin => "held",
            Hold::Etrn => "held for ETRN",
            Hold::Failing => "held after failures",
        }
    }
}

impl ToSql for Hold {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_i64()))
    }
}

impl FromSql for Hold {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let n = value.as_i64()?;
        Hold::from_i64(n).ok_or(FromSqlError::OutOfRange(n))
    }
}

/// Which door a message came in by, or which report it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Origin {
    /// SMTP, submission or the local socket.
    #[default]
    Smtp,
    /// A delivery status report of ours, to a sender.
    Bounce,
    /// A report about a report that failed, to the postmaster.
    DoubleBounce,
}

sql_words!(Origin {
    Smtp => "smtp",
    Bounce => "bounce",
    DoubleBounce => "double-bounce",
});

impl Origin {
    /// Reports are ours: never filtered, and never reported to a sender again.
    pub fn is_report(self) -> bool {
        matches!(self, Origin::Bounce | Origin::DoubleBounce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RecipientState::*;

    const ALL: [RecipientState; 12] =
        [Queued, Forward, InAttempt, Sent, Delivered, Bounce, Failed, Expanded, Quarantined, Discarded, Deleted, Duplicate];

    #[test]
    fn words_round_trip() {
        for s in ALL {
            assert_eq!(RecipientState::parse(s.as_str()), Some(s));
        }
        for h in [Hold::None, Hold::Admin, Hold::Etrn, Hold::Failing] {
            assert_eq!(Hold::from_i64(h.as_i64()), Some(h));
        }
        assert_eq!(Origin::parse("double-bounce"), Some(Origin::DoubleBounce));
        assert_eq!(RecipientState::parse("held"), None);
    }

    #[test]
    fn final_states_never_change() {
        for from in [Sent, Delivered, Failed, Expanded, Discarded, Deleted, Duplicate] {
            for to in ALL {
                assert!(!from.may_become(to), "{from} -> {to}");
            }
        }
        assert!(!Forward.may_become(Sent), "only a claimed recipient can be recorded sent");
        assert!(!Forward.may_become(Forward));
        assert!(InAttempt.may_become(Sent));
    }
}
