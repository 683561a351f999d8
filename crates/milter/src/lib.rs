//! Milter client (issue 21): the milter protocol, version 6 as Postfix speaks it, without I/O.
//!
//! - [`wire`]: packets (32-bit length, command byte, data), the MTA's commands, the milter's
//!   replies, and a [`wire::Decoder`] that splits a byte stream into packets.
//! - [`conversation`]: one message's [`Conversation`] with one milter: negotiation, the steps
//!   the milter asked for (each after its macros), its replies, the [`Modifications`] it asks
//!   for at end of body and its [`Verdict`].
//!
//! What is here follows Postfix's `milter8.c` where sendmail and Postfix differ: REJECT means
//! `550 5.7.1 Command rejected`, TEMPFAIL `451 4.7.1 Service unavailable - try again later`;
//! protocol steps we did not offer are left out rather than refused; a DISCARD for the
//! connection is ignored; QUARANTINE is taken at any stage; one space after a header's colon is
//! eaten unless SMFIP_HDR_LEADSPC, and folded header lines go joined by LF; the end-of-header
//! macros go ahead of each header, the end-of-message ones ahead of each body chunk. Not offered
//! yet: SMFIF_CHGFROM (change the sender) and SMFIP_RCPT_REJ (show refused recipients).
//!
//! # Design: how this hooks into Postroom (for the session that completes issue 21)
//!
//! **Where.** At the end of DATA/BDAT, in the same place as the sender-authentication checks:
//! `Driver` in `smtp-server/src/server.rs` holds the message (`held: Option<Held>`) while
//! `Action::BodyChunk`s arrive, and on `Action::Enqueue` runs `sender_auth(held, &envelope)`
//! before anything is stored. BDAT and DATA share that path, so both are covered. The milters
//! run there too, after sender-auth (so they see its Authentication-Results field) and before
//! `incoming.push`: hold the message whenever the listener has milters (not only when
//! `checks`), build a [`Message`] from the session facts (client name — `[ip]` without a
//! verified reverse name, as Postfix — and address, HELO, the envelope, the header fields split
//! from the held bytes, the body, macros `j`, `daemon_name`, `daemon_addr`, `v`, `_`, `i` = the
//! queue id, `auth_type`/`auth_authen`, `tls_version`/`cipher`/`cipher_bits`, ...), and run
//! each milter in turn, each seeing the message as the previous one changed it
//! ([`Modifications::apply_headers`], the replaced body, the recipients added and removed). As
//! Postfix, our own Received field is not shown to milters but stays on top of the header the
//! changes apply to (so an insertion at index 0 lands above it).
//!
//! The first verdict that does not [`Verdict::passes`] ends the run: Reject/Tempfail →
//! `Event::DataRefused(reply)` with the milter's reply (a refused message is never stored);
//! Discard → answer 250 and drop it (abort the `Incoming`); Quarantine →
//! `Incoming::quarantine(reason)` before the commit. Only then is the changed message pushed
//! and committed, so the 250 follows the milters' acceptance and the enqueue with their
//! changes. A recipient refused at RCPT (`Outcome::rejected_recipients`) is removed from the
//! envelope and journaled (its RCPT was already answered 250); all refused → the refusal.
//! Replaying the conversation at end of DATA keeps one hold path; running MAIL/RCPT live for
//! per-recipient SMTP replies can come later (a `Conversation` per transaction).
//!
//! **I/O.** A small async driver (a `client` module here behind tokio, or in smtp-server):
//! connect (TCP on loopback, or a Unix socket), loop on [`Conversation::step`]: `Send` → write;
//! `Receive(stage)` → read into a [`wire::Decoder`] within that stage's timeout (Postfix: a
//! connect timeout for `Negotiate`, a command timeout for the envelope, a content timeout for
//! headers, body and end of body; each PROGRESS restarts it) and `receive` each packet; `Done`
//! → close. A connect failure, a timeout, EOF or a [`ProtocolError`] ends that milter with its
//! [`DefaultAction::verdict`] (tempfail unless configured, as Postfix). Set
//! [`Conversation::limit`] from the message size limit.
//!
//! **Config.** `[milter] servers = [{ name = "opendkim", address = "127.0.0.1:8891" |
//! "unix:/run/opendkim/opendkim.sock", timeout_secs = 30, default_action = "tempfail" |
//! "accept" }]`, and the listeners' lists `mx = [...]`, `submission = [...]` (the submission
//! list also serves implicit TLS and the local socket; names must exist; TCP only on loopback),
//! validated in `postroom/src/config.rs` with clear errors, reloadable through `reload.rs`,
//! documented in `etc/postroom.toml`.
//!
//! **Done** (issue 21): [`client`] is the async driver (one timeout per milter for the connect,
//! each write and each reply); `smtp-server/src/milters.rs` runs a listener's milters and
//! `Driver::milters` in `server.rs` applies them (journal code 9M). Not yet: MAIL/RCPT
//! parameters and TLS macros are not passed, the client's port is sent as 0, and a milter's
//! header changes rebuild the header from text (8-bit header bytes are replaced lossily).
//!
//! **Journal.** One entry per milter that did not simply pass: its name, the stage and its
//! reply (or the default action and why); for a passing milter that changed something, a
//! summary (header fields added/changed, body replaced, recipients added/removed).
//!
//! **Tests.** e2e in `tests/e2e` (`conftest.py`, `helpers.py`) with Debian's `opendkim`
//! (signing mode: the stored message has a DKIM-Signature inserted, verifiable against the
//! key) and `spamass-milter` with `spamd` (GTUBE → 5xx refusal journaled with the milter's
//! reply; a clean message gets its X-Spam headers); a stopped milter → 451 (default tempfail)
//! and `default_action = "accept"` → 250. A tiny Python milter speaking the wire format in
//! `helpers.py` can cover discard, quarantine, recipients and a replaced body.

pub mod client;
pub mod conversation;
pub mod wire;

pub use conversation::{
    Client, Conversation, DefaultAction, HeaderChange, Message, Modifications, Negotiated, Outcome, Recipient, Stage, Step, Verdict,
};
pub use wire::{ClientAddress, Decoder, MacroStage, Packet, Reply, SmtpReply};

/// A milter broke the protocol; the conversation cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("milter sent a packet of length 0")]
    EmptyPacket,
    #[error("milter sent a packet of {0} bytes, more than we accept")]
    TooLong(usize),
    #[error("milter sent an unknown reply {:?}", char::from(*.0))]
    UnknownReply(u8),
    #[error("milter sent a malformed {:?} reply: expected {what}", char::from(*code))]
    Malformed { code: u8, what: &'static str },
    #[error("milter sent an invalid reply code {0:?} (not 4xx or 5xx)")]
    BadReplyCode(String),
    #[error("milter answered negotiation with {:?} instead of 'O'", char::from(*.0))]
    NotNegotiation(u8),
    #[error("milter speaks protocol version {0}; we speak 2 to 6")]
    Version(u32),
    #[error("milter asks for actions {0:#x} we do not offer")]
    Actions(u32),
    #[error("milter sent {:?} when no reply was due", char::from(*.0))]
    Unexpected(u8),
    #[error("milter sent modification {:?} before end of body", char::from(*.0))]
    ModificationTooEarly(u8),
    #[error("milter sent {:?}, an action it did not negotiate", char::from(*.0))]
    NotNegotiated(u8),
    #[error("milter asked for more than {0} bytes of changes")]
    TooMuch(usize),
    #[error("milter sent SKIP outside the body or without negotiating it")]
    UnexpectedSkip,
}
