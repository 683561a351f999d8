//! A consistent copy of the database while the server runs: SQLite's online backup API, for
//! `postroom backup` and `postroom restore`.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use crate::{DB_FILE, Result, StoreError, check_data_dir};

/// What a database copy holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// `PRAGMA user_version`: the migrations applied.
    pub schema_version: i64,
    /// The file's size.
    pub bytes: u64,
}

/// How long the copy waits for a lock another connection holds before it gives up.
const BUSY_FOR: Duration = Duration::from_secs(30);

/// Copy the database of `data_dir` into `dest`, a new file (created 0600, never through a
/// link; an existing `dest` is an error), while the server keeps running.
///
/// The copy is one backup step over every page, inside one read transaction: it holds exactly
/// the transactions committed before the step began — every message answered 250 by then — and
/// nothing of one that commits during it. Writers are not held up (in WAL mode a reader blocks
/// no writer; only the WAL checkpoint waits until the copy is done). The copy is then made a
/// standalone file (rollback journal, no `-wal` beside it) and checked (`PRAGMA quick_check`).
pub fn snapshot(data_dir: &Path, dest: &Path) -> Result<Snapshot> {
    check_data_dir(data_dir)?;
    let db = data_dir.join(DB_FILE);
    match std::fs::symlink_metadata(&db) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(StoreError::Untrusted(format!("{} is not a regular file", db.display()))),
        Err(source) => return Err(StoreError::Io { path: db, source }),
    }
    // Never CREATE: a missing database is an error above, not an empty copy.
    let source = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    source.busy_timeout(BUSY_FOR)?;
    source.execute_batch("PRAGMA query_only = ON;")?;
    create_private(dest)?;
    let copied = copy(&source, dest);
    drop(source);
    match copied.and_then(|()| check(dest)) {
        Ok(snapshot) => Ok(snapshot),
        Err(e) => {
            let _ = std::fs::remove_file(dest);
            Err(e)
        }
    }
}

/// Check a database copy (a backup's, or one just restored): SQLite's quick check, and the
/// schema version it carries. The file must be standalone (no `-wal` of its own).
pub fn check(path: &Path) -> Result<Snapshot> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    let verdict: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(StoreError::Invalid(format!("{} is damaged: {verdict}", path.display())));
    }
    let schema_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if schema_version < 1 {
        return Err(StoreError::Invalid(format!("{} is not a Postroom database (no schema)", path.display())));
    }
    drop(conn);
    let bytes = std::fs::metadata(path).map_err(|source| StoreError::Io { path: path.to_path_buf(), source })?.len();
    Ok(Snapshot { schema_version, bytes })
}

/// The file in the data directory that `postroom serve` and `postroom restore` hold locked
/// (flock) while they use the directory; the kernel drops the lock when the process ends, however
/// it ends, so a crashed server never leaves it held.
pub const LOCK_FILE: &str = "serve.lock";

/// The data directory's lock, held until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Take the data directory's lock without waiting: `Ok(None)` when another process holds it (a
/// server runs on the directory, or a restore writes it). The directory is checked first as
/// [`check_data_dir`] does — nothing is created in one that would be refused — and created 0700
/// when missing; the lock file is opened 0600, never through a link.
pub fn lock_data_dir(dir: &Path) -> Result<Option<DataDirLock>> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    check_data_dir(dir)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    }
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(DataDirLock { _file: file })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

/// Create `path` as a new empty 0600 file (O_EXCL, O_NOFOLLOW), for SQLite to open.
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map(drop)
        .map_err(|source| StoreError::Io { path: path.to_path_buf(), source })
}

fn copy(source: &Connection, dest: &Path) -> Result<()> {
    let mut target = Connection::open_with_flags(dest, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    {
        let backup = Backup::new(source, &mut target)?;
        let started = Instant::now();
        loop {
            // -1: every page in one step, so the copy is one snapshot. A step of some pages at a
            // time would start over whenever the server commits, and never end under load.
            match backup.step(-1)? {
                StepResult::Done => break,
                StepResult::More => {}
                StepResult::Busy | StepResult::Locked if started.elapsed() < BUSY_FOR => std::thread::sleep(Duration::from_millis(50)),
                StepResult::Busy | StepResult::Locked => {
                    return Err(StoreError::NotCommitted(format!("the database stayed locked for {} s", BUSY_FOR.as_secs())));
                }
                // StepResult is non-exhaustive.
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    // The copy carries the source's WAL mode; a backup is one standalone file.
    let mode: String = target.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(StoreError::Invalid(format!("the copy stayed in journal mode {mode}")));
    }
    target.close().map_err(|(_, e)| e)?;
    std::fs::File::open(dest).and_then(|f| f.sync_all()).map_err(|source| StoreError::Io { path: dest.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Durability, Store, StoreOptions};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_snapshot_taken_under_writes_holds_every_commit_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = Store::open(&data, StoreOptions::default()).unwrap();
        store.write_blocking(Durability::Full, |c| Ok(c.execute_batch("CREATE TABLE t (n INTEGER NOT NULL)")?)).unwrap();
        for n in 0..100 {
            store.write_blocking(Durability::Full, move |c| Ok(c.execute("INSERT INTO t VALUES (?1)", [n])?)).unwrap();
        }
        // Writes go on from another thread while the copy is taken.
        let writer = store.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let busy = std::thread::spawn(move || {
            let mut n = 1000;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                writer.write_blocking(Durability::Normal, move |c| Ok(c.execute("INSERT INTO t VALUES (?1)", [n])?)).unwrap();
                n += 1;
            }
        });
        let dest = dir.path().join("copy.db");
        let snap = snapshot(&data, &dest).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        busy.join().unwrap();
        assert!(snap.schema_version >= 1 && snap.bytes > 0, "{snap:?}");
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join("copy.db-wal").exists(), "the copy is one standalone file");
        let copy = Connection::open(&dest).unwrap();
        let below: i64 = copy.query_row("SELECT count(*) FROM t WHERE n < 100", [], |r| r.get(0)).unwrap();
        assert_eq!(below, 100, "every row committed before the copy is in it");
        assert_eq!(check(&dest).unwrap().schema_version, snap.schema_version);
    }

    #[test]
    fn the_data_directory_lock_is_held_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let held = lock_data_dir(&data).unwrap().expect("a fresh directory is free");
        assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(lock_data_dir(&data).unwrap().is_none(), "held by the first");
        drop(held);
        assert!(lock_data_dir(&data).unwrap().is_some(), "free again once dropped");
        let loose = dir.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(lock_data_dir(&loose).is_err());
        assert!(!loose.join(LOCK_FILE).exists(), "nothing is created in a refused directory");
    }

    #[test]
    fn an_existing_destination_or_link_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        drop(Store::open(&data, StoreOptions::default()).unwrap());
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(snapshot(&data, &link).is_err());
        assert!(snapshot(&data, &victim).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let empty = dir.path().join("empty");
        let e = snapshot(&empty, &dir.path().join("x.db")).unwrap_err().to_string();
        assert!(e.contains("postroom.db"), "{e}");
        assert!(!dir.path().join("x.db").exists());
    }
}
