//! The writer thread with group commit, and the reader pool.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, OpenFlags};

use crate::{Result, StoreError, StoreOptions, migrate, prepare_files};

/// How durable a write must be when its answer arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: on disk before the caller hears back (the enqueue before 250).
    Full,
    /// `synchronous=NORMAL`: in the WAL; survives a process crash, and reaches the disk with the
    /// next FULL commit or checkpoint (pipeline steps, POP login records).
    Normal,
}

/// One caller's request, as the writer thread sees it.
trait Job: Send {
    /// Runs the caller's closure inside the request's savepoint; false when its work must be
    /// rolled back.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the fate of its work is known: `outcome` is `Ok` only if the work
    /// is committed.
    fn answer(self: Box<Self>, outcome: Result<()>);
}

/// A request's closure, its result once it ran, and where the answer goes.
struct Request<F, T, R> {
    f: Option<F>,
    result: Option<Result<T>>,
    reply: R,
}

impl<F, T, R> Job for Request<F, T, R>
where
    F: FnOnce(&Connection) -> Result<T> + Send,
    T: Send,
    R: FnOnce(Result<T>) + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else { return false };
        let result = f(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, outcome: Result<()>) {
        let Request { result, reply, .. } = *self;
        reply(match (result, outcome) {
            // The request's own error says more than the batch's; its work is undone either way.
            (Some(Err(e)), _) | (_, Err(e)) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, Ok(())) => Err(StoreError::NotCommitted("the request never ran".into())),
        })
    }
}

struct WriteRequest {
    durability: Durability,
    job: Box<dyn Job>,
}

type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// Handle to the database: cheap to clone, usable from async code and from plain threads.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Sender<WriteRequest>,
    writer_alive: Arc<AtomicBool>,
    readers: Sender<ReadJob>,
    path: PathBuf,
}

impl Store {
    /// Open (creating if needed) the database in `data_dir`, apply migrations, start the threads.
    pub fn open(data_dir: &Path, options: StoreOptions) -> Result<Store> {
        Store::open_with(data_dir, options, NoFaults)
    }

    fn open_with(data_dir: &Path, options: StoreOptions, faults: impl Faults) -> Result<Store> {
        let path = prepare_files(data_dir)?;
        let mut conn = open_connection(&path, options.busy_timeout)?;
        migrate::migrate(&mut conn)?;
        if !options.journal {
            conn.execute_batch("CREATE TEMP TRIGGER journal_off BEFORE INSERT ON main.journal BEGIN SELECT RAISE(IGNORE); END;")?;
        }

        let (wtx, wrx) = crossbeam_channel::unbounded::<WriteRequest>();
        let max_batch = options.max_batch.max(1);
        let writer_alive = Arc::new(AtomicBool::new(true));
        let alive = WriterAlive(writer_alive.clone());
        // `open_connection` left the connection at synchronous=FULL.
        let writer = Writer { conn, synchronous: Some(Durability::Full), faults };
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(writer, wrx, max_batch, alive))
            .map_err(|source| StoreError::Io { path: path.clone(), source })?;

        let (rtx, rrx) = crossbeam_channel::unbounded::<ReadJob>();
        for i in 0..options.readers.clamp(1, 4) {
            let conn = open_connection(&path, options.busy_timeout)?;
            conn.execute_batch("PRAGMA query_only = ON;")?;
            let rrx = rrx.clone();
            thread::Builder::new()
                .name(format!("store-reader-{i}"))
                .spawn(move || {
                    // A panicking read (a snap-in's examine runs here) must not shrink the pool:
                    // its caller sees the store closed for that one request, the thread goes on.
                    while let Ok(job) = rrx.recv() {
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&conn))).is_err() {
                            tracing::error!("a read request panicked; the reader goes on");
                        }
                    }
                })
                .map_err(|source| StoreError::Io { path: path.clone(), source })?;
        }
        Ok(Store { inner: Arc::new(Inner { writer: wtx, writer_alive, readers: rtx, path }) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the writer thread still runs. It ends only with the last `Store` handle, so
    /// `false` while a handle exists means it died: every write fails until a restart.
    pub fn writer_alive(&self) -> bool {
        self.inner.writer_alive.load(Ordering::Acquire)
    }

    /// Run `f` in the next group commit; the answer arrives after COMMIT, `Ok` only if `f`'s work
    /// is committed. `f` must not end the transaction (COMMIT, ROLLBACK): the writer then fails
    /// every caller of the batch and rolls back what it still holds, but what such a COMMIT
    /// already made durable stays.
    pub async fn write<T, F>(&self, durability: Durability, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit_write(durability, f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// [`Store::write`] for callers outside an async runtime (the CLI).
    pub fn write_blocking<T, F>(&self, durability: Durability, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submit_write(durability, f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    fn submit_write<T, F>(&self, durability: Durability, f: F, reply: impl FnOnce(Result<T>) + Send + 'static) -> Result<()>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let job = Box::new(Request { f: Some(f), result: None, reply });
        self.inner.writer.send(WriteRequest { durability, job }).map_err(|_| StoreError::Closed)
    }

    /// Run `f` on a reader connection (a short read; long reads stall WAL checkpoints).
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit_read(f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// [`Store::read`] for callers outside an async runtime.
    pub fn read_blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submit_read(f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    fn submit_read<T, F>(&self, f: F, reply: impl FnOnce(Result<T>) + Send + 'static) -> Result<()>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let job: ReadJob = Box::new(move |conn| reply(f(conn)));
        self.inner.readers.send(job).map_err(|_| StoreError::Closed)
    }
}

/// WAL pages between automatic checkpoints: 8000 (32 MiB of WAL) instead of SQLite's 1000. Pages
/// written again and again (queue rows, b-tree interiors, the journal) are copied into the
/// database once per checkpoint rather than every 4 MiB: 10–15% less server CPU per 100 KiB
/// message, for a WAL file of up to ~32 MiB.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 8000;

fn open_connection(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(busy_timeout)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -4000;",
    )?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// The statements the writer issues around the requests, named so a test can make one fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Synchronous,
    Begin,
    Savepoint,
    Release,
    RollbackTo,
    Commit,
}

/// Fault injection into the writer's own statements. Production uses [`NoFaults`], which
/// compiles to nothing; the tests make a chosen step fail as SQLite would.
trait Faults: Send + 'static {
    fn inject(&self, step: Step) -> Option<rusqlite::Error>;
}

struct NoFaults;

impl Faults for NoFaults {
    #[inline(always)]
    fn inject(&self, _: Step) -> Option<rusqlite::Error> {
        None
    }
}

/// Clears the writer's liveness flag however the thread ends, unwinding included.
struct WriterAlive(Arc<AtomicBool>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
        // The loop returns only once every `Store` handle is gone; ending any other way leaves
        // the server running with no writer.
        if thread::panicking() {
            tracing::error!("the store writer thread died: every write fails until Postroom restarts");
        }
    }
}

/// Take the requests waiting now (up to `max_batch`), run them in one transaction, commit once.
fn writer_loop(mut writer: Writer<impl Faults>, rx: Receiver<WriteRequest>, max_batch: usize, _alive: WriterAlive) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        writer.run_batch(batch);
    }
}

struct Writer<X> {
    conn: Connection,
    /// The level the connection commits at; `None` once a failed PRAGMA (or a request that ended
    /// the transaction and could have changed it) left it unknown.
    synchronous: Option<Durability>,
    faults: X,
}

/// A request that ran (or was refused) inside the batch transaction.
struct Ran {
    job: Box<dyn Job>,
    /// Its answer whatever the batch's fate: it failed on its own and its work is undone.
    failed: Option<StoreError>,
}

impl<X: Faults> Writer<X> {
    fn exec(&self, step: Step, sql: &str) -> rusqlite::Result<()> {
        if let Some(e) = self.faults.inject(step) {
            return Err(e);
        }
        self.conn.execute_batch(sql)
    }

    /// Every caller hears back exactly once: `Ok` only for work that COMMIT made durable at the
    /// level it asked for, an error for work that was rolled back or never ran.
    fn run_batch(&mut self, mut batch: Vec<WriteRequest>) {
        if !self.conn.is_autocommit() {
            // Only a failed ROLLBACK leaves one; its callers were already told it failed.
            tracing::error!("store writer found a transaction still open; rolling it back");
            self.roll_back();
        }

        let full = batch.iter().any(|r| r.durability == Durability::Full);
        if let Err(e) = self.set_synchronous(if full { Durability::Full } else { Durability::Normal }) {
            // Only FULL and NORMAL are ever set, so a failed switch to NORMAL leaves a level enough
            // for Normal requests. A Full request committed at NORMAL would be acknowledged
            // without being on disk.
            if full {
                let why = format!("PRAGMA synchronous = FULL failed: {e}");
                tracing::error!(error = %e, "store cannot commit at synchronous=FULL; failing the durable requests");
                let (durable, normal): (Vec<_>, Vec<_>) = batch.into_iter().partition(|r| r.durability == Durability::Full);
                fail_all(durable.into_iter().map(|r| r.job), &why);
                batch = normal;
            }
        }
        if batch.is_empty() {
            return;
        }

        // A request may only run inside a transaction that began: outside one, its writes would
        // commit on their own while its caller is told it failed.
        if let Err(e) = self.exec(Step::Begin, "BEGIN IMMEDIATE") {
            tracing::error!(error = %e, requests = batch.len(), "store BEGIN failed");
            fail_all(batch.into_iter().map(|r| r.job), &format!("BEGIN IMMEDIATE failed: {e}"));
            return;
        }

        let mut ran = Vec::with_capacity(batch.len());
        let mut waiting = batch.into_iter();
        for request in waiting.by_ref() {
            let (done, lost) = self.run_request(request.job);
            ran.push(done);
            if let Some(why) = lost {
                // What the batch holds is unknown, so none of it may be acknowledged. Requests
                // still waiting never ran; they fail with the others rather than start a second
                // transaction on a connection in an unexpected state.
                tracing::error!(reason = %why, requests = ran.len() + waiting.len(), "store batch rolled back");
                self.roll_back();
                self.synchronous = None;
                let why = format!("the batch was rolled back: {why}");
                fail_all(ran.into_iter().map(|r| r.job).chain(waiting.map(|r| r.job)), &why);
                return;
            }
        }

        let commit = self.exec(Step::Commit, "COMMIT");
        if let Err(e) = &commit {
            tracing::error!(error = %e, requests = ran.len(), "store COMMIT failed; rolling back");
            self.roll_back();
        }
        let commit = commit.map_err(|e| format!("COMMIT failed: {e}"));
        for Ran { job, failed } in ran {
            let outcome = match (failed, &commit) {
                (Some(e), _) => Err(e),
                (None, Ok(())) => Ok(()),
                (None, Err(why)) => Err(StoreError::NotCommitted(why.clone())),
            };
            answer(job, outcome);
        }
    }

    /// Runs one request in its own savepoint. The second value, when set, says why the batch
    /// transaction can no longer be trusted.
    fn run_request(&mut self, mut job: Box<dyn Job>) -> (Ran, Option<String>) {
        if let Err(e) = self.exec(Step::Savepoint, "SAVEPOINT request") {
            let why = format!("SAVEPOINT failed: {e}");
            if self.conn.is_autocommit() {
                return (Ran { job, failed: None }, Some(why));
            }
            // The transaction is intact: only this request is refused, without running.
            return (Ran { job, failed: Some(StoreError::NotCommitted(why)) }, None);
        }

        // A panic must not end the only writer; it costs the panicking request its work only.
        let run = catch_unwind(AssertUnwindSafe(|| job.run(&self.conn)));
        let (keep, failed) = match run {
            Ok(keep) => (keep, None),
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                tracing::error!(panic = %msg, "a store write request panicked; its work is rolled back");
                (false, Some(StoreError::Panicked(msg)))
            }
        };
        let done = Ran { job, failed };

        // COMMIT, ROLLBACK, or an error SQLite answers by rolling back (disk full, I/O): the
        // earlier requests' work is committed or gone, and which one is unknown here.
        if self.conn.is_autocommit() {
            return (done, Some("a request ended the transaction (COMMIT, ROLLBACK or a failure that rolls back)".into()));
        }
        let (step, sql) = if keep { (Step::Release, "RELEASE request") } else { (Step::RollbackTo, "ROLLBACK TO request; RELEASE request") };
        if let Err(e) = self.exec(step, sql) {
            return (done, Some(format!("{sql} failed: {e}")));
        }
        (done, None)
    }

    fn set_synchronous(&mut self, level: Durability) -> rusqlite::Result<()> {
        if self.synchronous == Some(level) {
            return Ok(());
        }
        let sql = match level {
            Durability::Full => "PRAGMA synchronous = FULL",
            Durability::Normal => "PRAGMA synchronous = NORMAL",
        };
        let set = self.exec(Step::Synchronous, sql);
        self.synchronous = set.is_ok().then_some(level);
        set
    }

    fn roll_back(&self) {
        if self.conn.is_autocommit() {
            return;
        }
        if let Err(e) = self.conn.execute_batch("ROLLBACK") {
            // The next batch tries again before its BEGIN, which fails while this stays open.
            tracing::error!(error = %e, "store ROLLBACK failed");
        }
    }
}

fn fail_all(jobs: impl Iterator<Item = Box<dyn Job>>, why: &str) {
    for job in jobs {
        answer(job, Err(StoreError::NotCommitted(why.to_owned())));
    }
}

fn answer(job: Box<dyn Job>, outcome: Result<()>) {
    // The reply drops the caller's value if the caller went away: caller code, on the writer.
    if catch_unwind(AssertUnwindSafe(|| job.answer(outcome))).is_err() {
        tracing::error!("a store write reply panicked");
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_owned(),
        (_, Some(s)) => s.clone(),
        _ => "(no message)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("data"), StoreOptions::default()).unwrap();
        (dir, store)
    }

    type Plan = Box<dyn FnMut(Step) -> bool + Send>;

    /// Fails the writer's steps its plan picks, with an error naming the step.
    #[derive(Clone, Default)]
    struct Injector(Arc<Mutex<Option<Plan>>>);

    impl Injector {
        fn arm(&self, plan: impl FnMut(Step) -> bool + Send + 'static) {
            *self.0.lock().unwrap() = Some(Box::new(plan));
        }

        fn disarm(&self) {
            *self.0.lock().unwrap() = None;
        }
    }

    impl Faults for Injector {
        fn inject(&self, step: Step) -> Option<rusqlite::Error> {
            let fail = self.0.lock().unwrap().as_mut().is_some_and(|plan| plan(step));
            fail.then(|| {
                let code = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR);
                rusqlite::Error::SqliteFailure(code, Some(format!("injected {step:?} failure")))
            })
        }
    }

    fn open_injected() -> (tempfile::TempDir, Store, Injector) {
        let dir = tempfile::tempdir().unwrap();
        let faults = Injector::default();
        let store = Store::open_with(&dir.path().join("data"), StoreOptions::default(), faults.clone()).unwrap();
        (dir, store, faults)
    }

    type Work = Box<dyn FnOnce(&Connection) -> Result<()> + Send>;

    fn work(f: impl FnOnce(&Connection) -> Result<()> + Send + 'static) -> Work {
        Box::new(f)
    }

    fn insert(c: &Connection, key: &str) -> Result<()> {
        c.execute("INSERT INTO meta(key, value) VALUES (?1, 'x')", [key])?;
        Ok(())
    }

    /// Runs `requests` as one group commit, in order: a first request holds the writer until all
    /// are queued, and its answer (sent on the writer thread after its COMMIT, before the next
    /// batch starts) calls `between`, so a fault armed there hits only this batch.
    fn one_batch(store: &Store, between: impl FnOnce() + Send + 'static, requests: Vec<(Durability, Work)>) -> Vec<Result<()>> {
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
        let (gate_tx, gate_rx) = crossbeam_channel::bounded(1);
        store
            .submit_write(
                Durability::Normal,
                move |_| {
                    started_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    Ok(())
                },
                move |r: Result<()>| {
                    between();
                    gate_tx.send(r).unwrap();
                },
            )
            .unwrap();
        started_rx.recv().unwrap();
        let answers: Vec<_> = requests
            .into_iter()
            .map(|(durability, f)| {
                let (tx, rx) = crossbeam_channel::bounded(1);
                store
                    .submit_write(durability, f, move |r| {
                        let _ = tx.send(r);
                    })
                    .unwrap();
                rx
            })
            .collect();
        go_tx.send(()).unwrap();
        gate_rx.recv().unwrap().unwrap();
        answers.into_iter().map(|rx| rx.recv().unwrap_or(Err(StoreError::Closed))).collect()
    }

    fn keys(store: &Store) -> Vec<String> {
        store
            .read_blocking(|c| {
                let mut stmt = c.prepare("SELECT key FROM meta WHERE key LIKE 't-%' ORDER BY key")?;
                let keys = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
                Ok(keys)
            })
            .unwrap()
    }

    fn assert_not_committed(r: &Result<()>, cause: &str) {
        match r {
            Err(StoreError::NotCommitted(msg)) => assert!(msg.contains(cause), "{msg:?} should name {cause:?}"),
            other => panic!("expected NotCommitted naming {cause:?}, got {other:?}"),
        }
    }

    #[test]
    fn failed_begin_runs_no_request() {
        let (_dir, store, faults) = open_injected();
        let runs = Arc::new(AtomicUsize::new(0));
        let requests = (0..3)
            .map(|i| {
                let runs = runs.clone();
                (
                    Durability::Full,
                    work(move |c| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        insert(c, &format!("t-{i}"))
                    }),
                )
            })
            .collect();
        let arm = faults.clone();
        let answers = one_batch(&store, move || arm.arm(|s| s == Step::Begin), requests);
        for r in &answers {
            assert_not_committed(r, "injected Begin failure");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 0, "no request may run outside a transaction");
        assert!(keys(&store).is_empty());

        faults.disarm();
        store.write_blocking(Durability::Full, |c| insert(c, "t-after")).unwrap();
        assert_eq!(keys(&store), ["t-after"]);
    }

    #[test]
    fn busy_database_fails_begin_without_running_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions { busy_timeout: Duration::from_millis(50), ..Default::default() };
        let store = Store::open(dir.path(), options).unwrap();
        // Another process (the CLI, say) holding the write lock.
        let other = Connection::open(dir.path().join(crate::DB_FILE)).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();

        let ran = Arc::new(AtomicBool::new(false));
        let r = {
            let ran = ran.clone();
            store.write_blocking(Durability::Full, move |c| {
                ran.store(true, Ordering::SeqCst);
                insert(c, "t-busy")
            })
        };
        assert_not_committed(&r, "BEGIN IMMEDIATE failed");
        assert!(!ran.load(Ordering::SeqCst));

        other.execute_batch("ROLLBACK").unwrap();
        store.write_blocking(Durability::Full, |c| insert(c, "t-after")).unwrap();
        assert_eq!(keys(&store), ["t-after"]);
    }

    #[test]
    fn panicking_request_fails_alone_and_the_writer_survives() {
        let (_dir, store) = open();
        let answers = one_batch(
            &store,
            || {},
            vec![
                (Durability::Full, work(|c| insert(c, "t-a"))),
                (
                    Durability::Full,
                    work(|c| {
                        insert(c, "t-panic")?;
                        panic!("boom");
                    }),
                ),
                (Durability::Full, work(|c| insert(c, "t-b"))),
            ],
        );
        assert!(answers[0].is_ok(), "{:?}", answers[0]);
        assert!(matches!(&answers[1], Err(StoreError::Panicked(msg)) if msg.contains("boom")), "{:?}", answers[1]);
        assert!(answers[2].is_ok(), "{:?}", answers[2]);
        assert_eq!(keys(&store), ["t-a", "t-b"]);

        assert!(store.writer_alive());
        store.write_blocking(Durability::Full, |c| insert(c, "t-c")).unwrap();
        assert_eq!(keys(&store), ["t-a", "t-b", "t-c"]);
    }

    #[test]
    fn full_request_is_not_acknowledged_without_synchronous_full() {
        let (_dir, store, faults) = open_injected();
        // Leave the connection at NORMAL, so the next Full batch needs the pragma.
        store.write_blocking(Durability::Normal, |c| insert(c, "t-0")).unwrap();
        let arm = faults.clone();
        let answers = one_batch(
            &store,
            move || arm.arm(|s| s == Step::Synchronous),
            vec![(Durability::Full, work(|c| insert(c, "t-full"))), (Durability::Normal, work(|c| insert(c, "t-normal")))],
        );
        assert_not_committed(&answers[0], "synchronous = FULL");
        assert!(answers[1].is_ok(), "a Normal request does not need FULL: {:?}", answers[1]);
        assert_eq!(keys(&store), ["t-0", "t-normal"]);

        faults.disarm();
        let sync: i64 = store.write_blocking(Durability::Full, |c| Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?)).unwrap();
        assert_eq!(sync, 2);
    }

    /// A request that ends the transaction itself breaks the writer's contract. Every caller of
    /// its batch gets an error and nothing the writer still holds is committed; what the
    /// request's own COMMIT made durable (the earlier requests' work and its own) cannot be
    /// taken back, so that much of the batch stays although its callers were told it failed.
    #[test]
    fn request_ending_the_transaction_fails_its_whole_batch() {
        for (end, kept) in [("COMMIT", &["t-a", "t-r"][..]), ("ROLLBACK", &[][..])] {
            let (_dir, store) = open();
            let answers = one_batch(
                &store,
                || {},
                vec![
                    (Durability::Full, work(|c| insert(c, "t-a"))),
                    (
                        Durability::Full,
                        work(move |c| {
                            insert(c, "t-r")?;
                            c.execute_batch(end)?;
                            Ok(())
                        }),
                    ),
                    (Durability::Full, work(|c| insert(c, "t-b"))),
                ],
            );
            for r in &answers {
                assert_not_committed(r, "a request ended the transaction");
            }
            assert_eq!(keys(&store), kept, "after {end}");
            store.write_blocking(Durability::Full, |c| insert(c, "t-z")).unwrap();
        }
    }

    #[test]
    fn failed_savepoint_refuses_only_its_request() {
        let (_dir, store, faults) = open_injected();
        let ran = Arc::new(AtomicBool::new(false));
        let arm = faults.clone();
        let ran2 = ran.clone();
        let answers = one_batch(
            &store,
            move || {
                let mut savepoints = 0;
                arm.arm(move |s| {
                    savepoints += usize::from(s == Step::Savepoint);
                    s == Step::Savepoint && savepoints == 2
                })
            },
            vec![
                (Durability::Full, work(|c| insert(c, "t-a"))),
                (
                    Durability::Full,
                    work(move |c| {
                        ran2.store(true, Ordering::SeqCst);
                        insert(c, "t-x")
                    }),
                ),
                (Durability::Full, work(|c| insert(c, "t-b"))),
            ],
        );
        assert!(answers[0].is_ok(), "{:?}", answers[0]);
        assert_not_committed(&answers[1], "SAVEPOINT failed");
        assert!(answers[2].is_ok(), "{:?}", answers[2]);
        assert!(!ran.load(Ordering::SeqCst));
        assert_eq!(keys(&store), ["t-a", "t-b"]);
    }

    #[test]
    fn failed_savepoint_end_rolls_back_the_whole_batch() {
        for step in [Step::Release, Step::RollbackTo] {
            let (_dir, store, faults) = open_injected();
            let arm = faults.clone();
            let answers = one_batch(
                &store,
                move || arm.arm(move |s| s == step),
                vec![
                    (Durability::Full, work(|c| insert(c, "t-a"))),
                    (
                        Durability::Full,
                        work(|c| {
                            insert(c, "t-x")?;
                            Err(StoreError::Invalid("refused".into()))
                        }),
                    ),
                    (Durability::Full, work(|c| insert(c, "t-b"))),
                ],
            );
            assert!(answers.iter().all(|r| r.is_err()), "{step:?}: {answers:?}");
            assert!(keys(&store).is_empty(), "{step:?}");
            faults.disarm();
            store.write_blocking(Durability::Full, |c| insert(c, "t-after")).unwrap();
            assert_eq!(keys(&store), ["t-after"]);
        }
    }

    #[test]
    fn failed_commit_fails_every_caller_with_the_cause() {
        let (_dir, store, faults) = open_injected();
        let arm = faults.clone();
        let answers = one_batch(
            &store,
            move || arm.arm(|s| s == Step::Commit),
            vec![(Durability::Full, work(|c| insert(c, "t-a"))), (Durability::Normal, work(|c| insert(c, "t-b")))],
        );
        for r in &answers {
            assert_not_committed(r, "COMMIT failed: injected Commit failure");
        }
        faults.disarm();
        store.write_blocking(Durability::Full, |c| insert(c, "t-after")).unwrap();
        assert_eq!(keys(&store), ["t-after"]);
    }

    #[test]
    fn writer_death_is_observable() {
        let (_dir, store, faults) = open_injected();
        assert!(store.writer_alive());
        // A panic outside any request, in the writer's own code.
        faults.arm(|s| if s == Step::Begin { panic!("writer bug") } else { false });
        let r = store.write_blocking(Durability::Full, |c| insert(c, "t-a"));
        assert!(matches!(r, Err(StoreError::Closed)), "{r:?}");
        // The answer channel closes while the thread unwinds, a moment before it has ended.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.writer_alive() && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(!store.writer_alive());
        assert!(matches!(store.write_blocking(Durability::Full, |c| insert(c, "t-b")), Err(StoreError::Closed)));
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _store) = open();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("data")), 0o700);
        assert_eq!(mode(&dir.path().join("data").join(crate::DB_FILE)), 0o600);
    }

    #[test]
    fn failed_request_does_not_sink_its_batch() {
        let (_dir, store) = open();
        let s = store.clone();
        // Many concurrent writers so requests share batches; every odd one fails after writing.
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    s.write_blocking(Durability::Normal, move |c| {
                        c.execute("INSERT INTO meta(key, value) VALUES (?1, 'x')", [format!("k{i}")])?;
                        if i % 2 == 1 { Err(StoreError::Invalid("fail".into())) } else { Ok(()) }
                    })
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 20);
        let n: i64 = store.read_blocking(|c| Ok(c.query_row("SELECT count(*) FROM meta WHERE key LIKE 'k%'", [], |r| r.get(0))?)).unwrap();
        assert_eq!(n, 20);
    }

    #[test]
    fn wal_mode_and_full_sync_for_durable_writes() {
        let (_dir, store) = open();
        let (mode, sync): (String, i64) = store
            .write_blocking(Durability::Full, |c| {
                Ok((c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?, c.query_row("PRAGMA synchronous", [], |r| r.get(0))?))
            })
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "enqueue commits must run with synchronous=FULL");
        let sync: i64 = store.write_blocking(Durability::Normal, |c| Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?)).unwrap();
        assert_eq!(sync, 1);
    }

    #[test]
    fn reopen_keeps_data_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            s.write_blocking(Durability::Full, |c| Ok(c.execute("INSERT INTO domains(name) VALUES ('a.test')", [])?)).unwrap();
        }
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let n: i64 = s.read_blocking(|c| Ok(c.query_row("SELECT count(*) FROM domains", [], |r| r.get(0))?)).unwrap();
        assert_eq!(n, 1);
    }
}
