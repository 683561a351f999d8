//! Users, addresses, local domains and mailboxes (SPEC D1-D4), a typed API over the store.
//!
//! Passwords are argon2 PHC strings, hashed and verified on a small bounded thread pool
//! ([`passwords::PasswordPool`]), never on async workers. Management functions (`admin`) are
//! blocking and meant for the CLI; the lookups the servers use per session are async.
#![forbid(unsafe_code)]

pub mod access;
pub mod address_book;
pub mod admin;
pub mod deny_list;
pub mod filters;
pub mod greylist;
pub mod mailbox;
pub mod passwords;
pub mod penalty;
pub mod resolve;

pub use passwords::PasswordPool;
pub use resolve::{Forward, LocalDomains, Resolution, into_store};

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error("address {0} already belongs to user {1}")]
    AddressTaken(String, String),
    #[error("bad address {0}: expected local@domain")]
    BadAddress(String),
    #[error("domain {0} is not a local domain (add it with `postroom domain add {0}`)")]
    NotLocalDomain(String),
    #[error("bad user name {0}: use letters, digits, '.', '_' or '-' (at most 64)")]
    BadUserName(String),
    #[error("bad full name {0:?}: one line of printable text, at most 200 characters")]
    BadDisplayName(String),
    #[error("bad domain name {0}")]
    BadDomain(String),
    #[error("domain {0} is set in the configuration file; remove it there")]
    ConfiguredDomain(String),
    #[error("domain {0} still has addresses: {1}")]
    DomainInUse(String, String),
    #[error("no such alias: {0}")]
    NoSuchAlias(String),
    #[error("address {0} is an alias (see `postroom alias list`)")]
    AddressIsAlias(String),
    #[error("{0} is the catch-all form, not a mailbox: a catch-all is an alias (`postroom alias add '*@DOMAIN' TARGET`)")]
    CatchAllAddress(String),
    #[error("bad alias {0}: only `*@domain`, a `*` as the whole local part, is a catch-all")]
    BadCatchAll(String),
    #[error("user {0} has no address {1}")]
    NotUsersAddress(String, String),
    #[error("{1} is the last address of user {0}: a user keeps at least one (to remove the user: `postroom user remove {0}`)")]
    LastAddress(String, String),
    #[error("user {0} is removed")]
    UserRemoved(String),
    #[error("{0} is still used by {1}: remove those references first, or give --force to remove them too")]
    Referenced(String, String),
    #[error("no such domain: {0}")]
    NoSuchDomain(String),
    #[error("bad list entry: {0}")]
    BadListEntry(String),
    #[error("no {0} list entry {1}")]
    NoSuchListEntry(String, String),
    #[error("password must not be empty")]
    EmptyPassword,
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("the password service is busy")]
    Busy,
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

impl From<rusqlite::Error> for DirectoryError {
    fn from(e: rusqlite::Error) -> Self {
        DirectoryError::Store(e.into())
    }
}

pub type Result<T, E = DirectoryError> = std::result::Result<T, E>;
