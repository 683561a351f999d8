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
//! 0700 directory owned by the user that runs Postroom; a data directory another user owns or
//! may write in is refused (SPEC D4).
#![forbid(unsafe_code)]

pub mod backup;
mod migrate;
mod pool;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use pool::{Durability, Store};
pub use private_files::{effective_uid, write_private_atomic};
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
    /// The data directory or a file in it could be controlled by another user (SPEC D4).
    #[error("{0}")]
    Untrusted(String),
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

/// Create `dir` as 0700, or check an existing one (see [`check_data_dir`]) and tighten it to
/// 0700; then open the database file as 0600, never through a symbolic link.
pub(crate) fn prepare_files(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let euid = effective_uid().map_err(io(dir))?;
    if let Err(e) = std::fs::symlink_metadata(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(io(dir)(e));
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    }
    // Whether we made it or found it: someone may have put their own directory or a link there.
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if judge_dir(dir, &DirFacts::of(&meta), euid)? == DirVerdict::Tighten {
        tracing::info!(data_dir = %dir.display(), mode = format_args!("{:04o}", meta.mode() & 0o7777), "tightening the data directory to 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    check_entries(dir, euid)?;
    let db = dir.join(DB_FILE);
    // SQLite gives the -wal and -shm files the permissions of the database file.
    let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&db).map_err(io(&db))?;
    let meta = file.metadata().map_err(io(&db))?;
    if !meta.is_file() || meta.uid() != euid {
        return Err(StoreError::Untrusted(format!(
            "{} is not a regular file owned by uid {euid}: remove it or choose another data_dir",
            db.display()
        )));
    }
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io(&db))?;
    Ok(db)
}

/// Check, without changing anything, that `dir` may be used as the data directory (SPEC D4):
/// a real directory (not a symbolic link) owned by the effective user, not writable by group or
/// others, whose database files, if present, are regular files owned by that user. A directory
/// that does not exist yet is fine (`serve` creates it 0700); one merely readable by group or
/// others is fine too (it is tightened to 0700 when opened).
pub fn check_data_dir(dir: &Path) -> Result<()> {
    let io = |source| StoreError::Io { path: dir.to_path_buf(), source };
    let euid = effective_uid().map_err(io)?;
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
        Ok(meta) => {
            judge_dir(dir, &DirFacts::of(&meta), euid)?;
            check_entries(dir, euid)
        }
    }
}

/// What [`judge_dir`] looks at.
#[derive(Clone, Copy, Debug)]
struct DirFacts {
    symlink: bool,
    dir: bool,
    uid: u32,
    mode: u32,
}

impl DirFacts {
    fn of(meta: &std::fs::Metadata) -> DirFacts {
        use std::os::unix::fs::MetadataExt;
        let t = meta.file_type();
        DirFacts { symlink: t.is_symlink(), dir: t.is_dir(), uid: meta.uid(), mode: meta.mode() & 0o7777 }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum DirVerdict {
    /// Owned by us, mode 0700.
    Trusted,
    /// Owned by us, readable (not writable) by group or others: set to 0700.
    Tighten,
}

/// Whether a data directory with these facts can be trusted by a process running as `euid`.
/// Another user who owns the directory, or may write in it, could have planted links or files
/// (a `tls-key.pem` link that makes us write the key into their file), so it is refused.
fn judge_dir(dir: &Path, f: &DirFacts, euid: u32) -> Result<DirVerdict> {
    let d = dir.display();
    let refuse = |why: String| Err(StoreError::Untrusted(why));
    if f.symlink {
        return refuse(format!("data directory {d} is a symbolic link (owned by uid {}): set data_dir to the real directory it points to", f.uid));
    }
    if !f.dir {
        return refuse(format!("data directory {d} exists and is not a directory: remove it or choose another data_dir"));
    }
    if f.uid != euid {
        return refuse(format!(
            "data directory {d} is owned by uid {}, but postroom runs as uid {euid}: another user could plant \
             files or links in it. Run postroom as uid {}, or check its contents and then `chown -R {euid} {d} && chmod 700 {d}`, \
             or choose another data_dir",
            f.uid, f.uid
        ));
    }
    if f.mode & 0o022 != 0 {
        return refuse(format!(
            "data directory {d} is writable by group or others (mode {:04o}): another user could have planted files \
             or links in it. Check its contents, then `chmod 700 {d}`",
            f.mode
        ));
    }
    Ok(if f.mode & 0o7777 == 0o700 { DirVerdict::Trusted } else { DirVerdict::Tighten })
}

/// The database and SQLite's side files, where they exist, must be regular files we own: SQLite
/// opens them by name, and would follow a link or share a file another user can rewrite.
fn check_entries(dir: &Path, euid: u32) -> Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let path = dir.join(format!("{DB_FILE}{suffix}"));
        let what = match private_files::own_regular_file(&path, euid) {
            Ok(Ok(_)) => continue,
            Ok(Err(what)) => what,
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        return Err(StoreError::Untrusted(format!(
            "{} is {what}: the database files must be regular files owned by the user that runs postroom; \
             restore the real file (or `chown {euid}` it if you trust it)",
            path.display()
        )));
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn facts(uid: u32, mode: u32) -> DirFacts {
        DirFacts { symlink: false, dir: true, uid, mode }
    }

    fn refusal(f: DirFacts, euid: u32) -> String {
        match judge_dir(Path::new("/srv/pr"), &f, euid) {
            Err(StoreError::Untrusted(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn own_private_directory_is_trusted_and_a_readable_one_tightened() {
        assert_eq!(judge_dir(Path::new("d"), &facts(1000, 0o700), 1000).unwrap(), DirVerdict::Trusted);
        assert_eq!(judge_dir(Path::new("d"), &facts(0, 0o700), 0).unwrap(), DirVerdict::Trusted);
        for mode in [0o755, 0o750, 0o705, 0o500, 0o2700] {
            assert_eq!(judge_dir(Path::new("d"), &facts(1000, mode), 1000).unwrap(), DirVerdict::Tighten, "{mode:o}");
        }
    }

    #[test]
    fn directory_of_another_user_is_refused_with_the_fix() {
        let why = refusal(facts(65534, 0o700), 0);
        assert!(why.contains("/srv/pr") && why.contains("owned by uid 65534") && why.contains("runs as uid 0"), "{why}");
        assert!(why.contains("chown -R 0 /srv/pr && chmod 700 /srv/pr"), "{why}");
        // Root's directory is no more ours than anyone else's when we are not root.
        assert!(refusal(facts(0, 0o700), 1000).contains("owned by uid 0"));
    }

    #[test]
    fn directory_writable_by_group_or_others_is_refused() {
        for mode in [0o777, 0o770, 0o720, 0o702, 0o1777] {
            let why = refusal(facts(1000, mode), 1000);
            assert!(why.contains("writable by group or others") && why.contains("chmod 700 /srv/pr"), "{mode:o}: {why}");
            assert!(why.contains(&format!("{mode:04o}")), "{why}");
        }
    }

    #[test]
    fn symbolic_link_or_file_is_refused() {
        let link = DirFacts { symlink: true, dir: false, uid: 1000, mode: 0o777 };
        assert!(refusal(link, 1000).contains("is a symbolic link"));
        let file = DirFacts { symlink: false, dir: false, uid: 1000, mode: 0o600 };
        assert!(refusal(file, 1000).contains("not a directory"));
    }

    #[test]
    fn effective_uid_owns_what_we_create() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert_eq!(effective_uid().unwrap(), std::fs::metadata(&f).unwrap().uid());
    }

    #[test]
    fn loose_existing_directory_is_refused_and_readable_one_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_files(&data).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(check_data_dir(&data).is_err());
        assert!(!data.join(DB_FILE).exists(), "nothing is created in a refused directory");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_data_dir(&data).unwrap();
        prepare_files(&data).unwrap();
        assert_eq!(std::fs::metadata(&data).unwrap().mode() & 0o7777, 0o700);
    }

    #[test]
    fn links_to_the_data_directory_or_database_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(prepare_files(&link).unwrap_err().to_string().contains("is a symbolic link"));

        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&victim, data.join(format!("{DB_FILE}-wal"))).unwrap();
        let err = prepare_files(&data).unwrap_err().to_string();
        assert!(err.contains("postroom.db-wal is a symbolic link"), "{err}");
        std::fs::remove_file(data.join(format!("{DB_FILE}-wal"))).unwrap();
        std::os::unix::fs::symlink(&victim, data.join(DB_FILE)).unwrap();
        assert!(prepare_files(&data).unwrap_err().to_string().contains("postroom.db is a symbolic link"));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o644, "not chmodded through the link");
    }

    #[test]
    fn private_files_are_written_atomically_and_replace_links() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&victim, data.join("status")).unwrap();
        write_private_atomic(&data, "status", b"pid 1\n").unwrap();
        write_private_atomic(&data, "status", b"pid 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let meta = std::fs::symlink_metadata(data.join("status")).unwrap();
        assert!(meta.is_file() && meta.mode() & 0o777 == 0o600, "{meta:?}");
        assert_eq!(std::fs::read_to_string(data.join("status")).unwrap(), "pid 2\n");
        let names: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["status"], "no temporary file is left behind");
    }
}
