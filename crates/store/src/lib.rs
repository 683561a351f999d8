//! The one SQLite file (DESIGN "Storage: one file, one writer").
//!
//! * One writer thread owns the only write connection. Callers send it closures; it runs the
//!   requests waiting at that moment in one `BEGIN IMMEDIATE` transaction, each inside its own
//!   SAVEPOINT so a failing or panicking request does not sink the others, and commits them with
//!   one fsync (group commit). A request's answer is sent only after COMMIT returned, and is `Ok`
//!   only if its work was committed (a `Full` request's at synchronous=FULL). A request never
//!   runs outside the batch transaction: if BEGIN fails none runs, and if the transaction's state
//!   becomes unknown (a savepoint cannot be ended, a request ends the transaction) the whole
//!   batch is rolled back and every caller in it gets an error. [`Store::writer_alive`] tells
//!   whether the thread still runs.
//! * A small fixed pool of reader threads, each with its own connection, for short reads.
//! * rusqlite is blocking, so it only ever runs on these threads, never on a tokio worker.
//!
//! The store knows tables (via `migrations/`), not mail semantics. Files are created 0600 in a
//! 0700 directory (SPEC D4).
#![forbid(unsafe_code)]

mod migrate;
mod pool;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use pool::{Durability, Store};
pub use rusqlite;

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "postroom.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the store has shut down")]
    Closed,
    #[error("{0}")]
    Invalid(String),
    /// The request's work was rolled back, or it never ran, because the writer's transaction
    /// failed around it (BEGIN, SAVEPOINT, synchronous=FULL, COMMIT); a later retry may succeed.
    #[error("not committed: {0}")]
    NotCommitted(String),
    /// The request panicked on the writer thread; its work was rolled back.
    #[error("the write request panicked: {0}")]
    Panicked(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Options for [`Store::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Reader connections (DESIGN: at most 4).
    pub readers: usize,
    /// Most requests one group commit takes.
    pub max_batch: usize,
    /// How long a statement waits for a lock another process holds (the CLI and the server
    /// share the file) before it fails with SQLITE_BUSY.
    pub busy_timeout: Duration,
    /// `[journal] enabled`: when false, rows inserted into the journal table are dropped (a
    /// temporary trigger on the writer's connection, so no caller needs to know).
    pub journal: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { readers: 3, max_batch: 512, busy_timeout: Duration::from_secs(10), journal: true }
    }
}

/// Create `dir` as 0700 (tightening it if it exists) and the database file as 0600.
pub(crate) fn prepare_files(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let db = dir.join(DB_FILE);
    // SQLite gives the -wal and -shm files the permissions of the database file.
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&db).map_err(io(&db))?;
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).map_err(io(&db))?;
    Ok(db)
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
