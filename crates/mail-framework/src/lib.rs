//! The mail framework (SPEC F1, F2, F4), modelled on i5/OS's Mail Server Framework.
//!
//! Every message, whichever door it came in by, is put on one durable queue ([`queue`]) and
//! walked through snap-ins ([`pipeline`]): address resolution tags each recipient, then local
//! delivery, forwarding and non-delivery make the tags happen. A recipient's state change and
//! its effect (mailbox row, journal rows) commit in one transaction, so a replay after a crash
//! is a no-op, never a duplicate. The framework knows no door: it never talks SMTP or POP3.
#![forbid(unsafe_code)]

pub mod bounce;
pub mod heartbeat;
pub mod journal;
pub mod message;
pub mod mime_scan;
pub mod outbound;
pub mod pipeline;
pub mod queue;
pub mod reports;
pub mod snapins;
pub mod storage;

pub use message::{Hold, Origin, RecipientState};
pub use pipeline::{Framework, SnapIn, Tag, WorkItem};
pub use queue::{Dsn, Envelope, Incoming, Queue, RcptDsn};

#[derive(Debug, thiserror::Error)]
pub enum FrameworkError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Directory(#[from] directory::DirectoryError),
}

impl From<rusqlite::Error> for FrameworkError {
    fn from(e: rusqlite::Error) -> Self {
        FrameworkError::Store(e.into())
    }
}

pub type Result<T, E = FrameworkError> = std::result::Result<T, E>;
