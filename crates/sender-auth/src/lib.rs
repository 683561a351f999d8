//! Sender authentication. Outbound: DKIM signatures with a key per local domain ([`sign`], the
//! keys in [`keys`] and [`key_store`], the published record checked by [`dkim_check`]).
//! Inbound: SPF, DKIM and DMARC verdicts and the one Authentication-Results header ([`verify`]).
//! mail-auth (Stalwart's) does the cryptography and the record parsing; this crate decides
//! which key signs what and what a verdict means for a message.

pub mod dkim_check;
pub mod key_store;
pub mod keys;
pub mod resolver;
pub mod sign;
pub mod verify;
