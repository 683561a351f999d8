//! Postroom's POP3 server (SPEC §7): a sans-IO session ([`session`], RFC 1939/2449/3206) and a
//! thin tokio driver ([`server`]) that checks passwords, holds the in-memory maildrop locks,
//! streams messages from the store and applies deletions in the UPDATE state.
#![forbid(unsafe_code)]

pub mod server;
pub mod session;

pub use server::{Pop3Server, Pop3Settings};
