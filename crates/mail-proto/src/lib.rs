//! Wire-level pieces shared by Postroom's SMTP server, SMTP client and POP3 server.
//!
//! Everything here is sans-IO: parsers take byte slices and return values or errors, encoders
//! return bytes. Nothing here touches a socket, a clock or the database, so every function can
//! be tested (and fuzzed) with byte strings. Input is untrusted: no parser panics on any bytes.
#![forbid(unsafe_code)]

pub mod address;
pub mod chunk;
pub mod data;
pub mod date;
pub mod dot;
pub mod limits;
pub mod net;
pub mod reply;
pub mod reply_parser;
pub mod sasl;
pub mod shown;
pub mod smtp_command;

pub use address::{Address, AddressError};
pub use chunk::{Bdat, ChunkDecoder};
pub use data::{DataDecoder, DataEvent, LineEndings, ReceivedCounter};
pub use dot::DotStuffer;
pub use reply::Reply;
