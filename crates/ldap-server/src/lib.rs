//! Postroom's address book over LDAP (SPEC O5, issue 18): a read-only LDAPv3 directory of the
//! enabled users and the alias table's groups, for mail programs' address books.
//!
//! The pure parts — DNs ([`dn`]), the entries built from the directory ([`entries`]), filter
//! evaluation ([`filter`]), who may bind and search ([`access`]) and the connection's state
//! machine ([`session`]) — do no I/O; [`server`] is the tokio driver at the edge. LDAPv3's BER
//! comes from the ldap3_proto crate.
#![forbid(unsafe_code)]

pub mod access;
pub mod dn;
pub mod entries;
pub mod filter;
pub mod server;
pub mod session;

pub use server::{LdapServer, LdapSettings};
