//! Postroom's inbound SMTP server (SPEC §2): a sans-IO session ([`session`]), the policy module
//! that decides connect / relay ([`policy`]), and a thin tokio driver ([`server`]).
//! It only receives and enqueues; it never delivers (DESIGN "Who depends on whom").
#![forbid(unsafe_code)]

mod auth;
mod headers;
pub mod local;
pub mod milters;
pub mod received;
pub mod server;
pub mod session;

#[cfg(test)]
mod session_tests;

/// The decisions (connect, relay, AUTH, ETRN, ...) live in their own crate, shared with POP3
/// and `postroom explain`.
pub use policy;
pub use server::{ListenerKind, Services, SmtpServer, SmtpSettings};
