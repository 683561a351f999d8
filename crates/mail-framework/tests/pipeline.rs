//! The framework against a real SQLite file: enqueue, snap-ins, exactly-once delivery (F1, F2).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use directory::mailbox;
use mail_framework::pipeline::Context;
use mail_framework::snapins;
use mail_framework::{Framework, SnapIn, WorkItem};
use store::rusqlite::Connection;
use store::{Durability, Store, StoreError};

mod common;
use common::{enqueue, setup};

async fn message_bytes(store: &Store, mailbox_id: i64) -> Vec<u8> {
    let layout = mailbox::layout(store, mailbox_id).await.unwrap().unwrap();
    let mut out = layout.prefix;
    for c in layout.chunks {
        out.extend(mailbox::chunk(store, c).await.unwrap());
    }
    out
}

#[tokio::test]
async fn tags_each_recipient_and_delivers_locally_once() {
    let s = setup(4096);
    let body: Vec<u8> = (0..10_000u32).map(|i| b"abcdefgh\r\n"[(i % 10) as usize]).collect();
    enqueue(&s.queue, &body, &["samjones@EXAMPLE.test", "someone@remote.example", "postmaster"], "smtp").await;
    let fw = Framework::new(s.queue.clone(), s.domains.clone(), "mail.example.test");
    assert_eq!(fw.run_once().await.unwrap(), 3);
    assert_eq!(
        s.states(),
        [
            ("samjones@EXAMPLE.test".to_string(), "delivered".to_string()),
            ("someone@remote.example".into(), "forward".into()),
            // postmaster resolves to admin@example.test, which nobody owns here.
            ("postmaster".into(), "failed".into()),
            // ... so the non-delivery snap-in queued a report to the sender.
            ("jane@remote.example".into(), "queued".into()),
        ]
    );
    let (origin, from): (String, String) = s
        .store
        .read_blocking(|c| Ok(c.query_row("SELECT origin, mail_from FROM messages ORDER BY id DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))?))
        .unwrap();
    assert_eq!((origin.as_str(), from.as_str()), ("bounce", ""), "the report is sent from <>");
    let drop = mailbox::snapshot(&s.store, s.sam).await.unwrap();
    assert_eq!(drop.len(), 1);
    let bytes = message_bytes(&s.store, drop[0].id).await;
    assert_eq!(drop[0].size as usize, bytes.len(), "LIST size is the exact octet count");
    assert_eq!(&bytes[..36], b"Return-Path: <jane@remote.example>\r\n");
    assert_eq!(&bytes[36..], &body[..], "body stored in 3 chunks comes back byte-exact");

    // A replay (as after a crash between steps) finds nothing queued and delivers nothing twice.
    s.store.write_blocking(Durability::Full, |c| Ok(c.execute("UPDATE recipients SET state = 'queued' WHERE state = 'delivered'", [])?)).unwrap();
    fw.run_once().await.unwrap();
    assert_eq!(mailbox::snapshot(&s.store, s.sam).await.unwrap().len(), 1, "UNIQUE(message, recipient) makes the replay a no-op");
}

/// A snap-in that fails its apply step while `fail` is set.
struct Flaky(Arc<AtomicBool>);

impl SnapIn for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn examine(&self, _ctx: &Context<'_>, _items: &mut [WorkItem]) -> Result<(), StoreError> {
        Ok(())
    }
    fn apply(&self, _tx: &Connection, _items: &[WorkItem]) -> Result<(), StoreError> {
        if self.0.load(Ordering::SeqCst) { Err(StoreError::Invalid("injected failure".into())) } else { Ok(()) }
    }
}

#[tokio::test]
async fn a_failing_step_rolls_back_the_whole_batch() {
    let s = setup(4096);
    enqueue(&s.queue, b"Subject: x\r\n\r\nhi\r\n", &["samjones@example.test"], "smtp").await;
    let fail = Arc::new(AtomicBool::new(true));
    let mut chain = snapins::builtin("admin@example.test", snapins::DEFAULT_FILTER_MAX_BYTES);
    chain.push(Box::new(Flaky(fail.clone())));
    let fw = Framework::with_snapins(s.queue.clone(), s.domains.clone(), chain);
    assert!(fw.run_once().await.is_err());
    assert_eq!(s.states()[0].1, "queued", "state change rolled back with the mailbox row");
    assert!(mailbox::snapshot(&s.store, s.sam).await.unwrap().is_empty());
    fail.store(false, Ordering::SeqCst);
    fw.run_once().await.unwrap();
    assert_eq!(mailbox::snapshot(&s.store, s.sam).await.unwrap().len(), 1);
}

#[tokio::test]
async fn unfinished_data_is_removed_at_recovery_and_abort() {
    let s = setup(4096);
    let mut cut_off = s.queue.incoming();
    cut_off.push(&[b'x'; 9000]).await.unwrap(); // two chunks reach the store
    drop(cut_off); // the connection died: no commit, no 250
    let mut refused = s.queue.incoming();
    refused.push(&[b'y'; 9000]).await.unwrap();
    refused.abort().await;
    let count = |store: &Store| store.read_blocking(|c| Ok(c.query_row("SELECT count(*) FROM body_chunks", [], |r| r.get::<_, i64>(0))?)).unwrap();
    assert_eq!(count(&s.store), 2);
    assert_eq!(s.queue.recover().await.unwrap(), 1);
    assert_eq!(count(&s.store), 0);
}
