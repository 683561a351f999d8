//! Set-up shared by the framework's integration tests: a real SQLite file in a temporary
//! directory, the local domain example.test and the user sam (SamJones@example.test).

use directory::LocalDomains;
use directory::admin::Admin;
use mail_framework::{Envelope, Origin, Queue};
use store::{Store, StoreOptions};

pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub store: Store,
    pub queue: Queue,
    pub domains: LocalDomains,
    pub sam: i64,
}

/// `chunk`: the body chunk size; small ones make a message span several body_chunks rows.
pub fn setup(chunk: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let domains = LocalDomains::new(&["example.test".to_string()], "admin@example.test");
    let admin = Admin { store: &store, domains: &domains };
    admin.add_user("sam", &["SamJones@example.test".into()], None).unwrap();
    let sam = admin.show_user("sam").unwrap().id;
    let queue = Queue::new(store.clone(), chunk);
    Setup { _dir: dir, store, queue, domains, sam }
}

impl Setup {
    /// (address, state) of every recipient row, oldest first.
    pub fn states(&self) -> Vec<(String, String)> {
        self.store
            .read_blocking(|c| {
                let mut s = c.prepare("SELECT address, state FROM recipients ORDER BY id")?;
                Ok(s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?)
            })
            .unwrap()
    }
}

/// Enqueue `body` from jane@remote.example as a client would, in 1000-byte pieces; the queue id.
pub async fn enqueue(queue: &Queue, body: &[u8], rcpts: &[&str], origin: Origin) -> String {
    let mut incoming = queue.incoming();
    for piece in body.chunks(1000) {
        incoming.push(piece).await.unwrap();
    }
    let env = Envelope {
        mail_from: "jane@remote.example".into(),
        recipients: rcpts.iter().map(|s| s.to_string()).collect(),
        client_ip: "127.0.0.1".into(),
        helo: "client".into(),
        origin,
        ..Default::default()
    };
    incoming.commit(env).await.unwrap()
}
