//! The framework against a real SQLite file: enqueue, snap-ins, exactly-once delivery (F1, F2).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mail_framework::message::mailbox;
use mail_framework::pipeline::Context;
use mail_framework::snapins;
use mail_framework::{Framework, Origin, SnapIn, WorkItem};
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
    enqueue(&s.queue, &body, &["samjones@EXAMPLE.test", "someone@remote.example", "postmaster"], Origin::Smtp).await;
    let fw = Framework::with_snapins(
        s.queue.clone(),
        s.domains.clone(),
        snapins::builtin(&snapins::Settings::new("admin@example.test", "mail.example.test")),
    );
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

/// A snap-in whose apply step fails, while `fail` is set, for batches holding mail to a
/// "poison" address.
struct Flaky(Arc<AtomicBool>);

impl SnapIn for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn examine(&self, _ctx: &Context<'_>, _items: &mut [WorkItem]) -> Result<(), StoreError> {
        Ok(())
    }
    fn apply(&self, _tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        if self.0.load(Ordering::SeqCst) && items.iter().any(|i| i.address.starts_with("poison")) {
            Err(StoreError::Invalid("injected failure".into()))
        } else {
            Ok(())
        }
    }
}

/// Issue 12, defect 4: one message whose snap-in fails made its whole batch fail and retry every
/// second, forever. Now the others are delivered, the failing one backs off, and after
/// MAX_FAILURES it is held with its reason until the administrator releases it.
#[tokio::test]
async fn a_poison_message_does_not_stall_the_others_and_is_held() {
    use mail_framework::message::{Hold, admin, resolve::MAX_FAILURES};
    let s = setup(4096);
    directory::admin::Admin { store: &s.store, domains: &s.domains }.add_user("poison", &["poison@example.test".into()], None).unwrap();
    let poison = enqueue(&s.queue, b"Subject: bad\r\n\r\nhi\r\n", &["poison@example.test"], Origin::Smtp).await;
    enqueue(&s.queue, b"Subject: good\r\n\r\nhi\r\n", &["samjones@example.test"], Origin::Smtp).await;
    let fail = Arc::new(AtomicBool::new(true));
    let mut chain = snapins::builtin(&snapins::Settings::new("admin@example.test", "mail.example.test"));
    chain.push(Box::new(Flaky(fail.clone())));
    let fw = Framework::with_snapins(s.queue.clone(), s.domains.clone(), chain);
    let mut now = store::now();
    assert_eq!(fw.run_once_at(now).await.unwrap(), 2, "the batch is taken; its failure is contained");
    assert_eq!(mailbox::snapshot(&s.store, s.sam).await.unwrap().len(), 1, "the good message is delivered");
    assert_eq!(s.states()[0].1, "queued", "the poison message's state change rolled back");
    assert_eq!(fw.run_once_at(now).await.unwrap(), 0, "it backs off instead of retrying at once");
    for _ in 1..MAX_FAILURES {
        now += 3700;
        assert_eq!(fw.run_once_at(now).await.unwrap(), 1);
    }
    let rows = s.store.read_blocking(admin::pending).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].held, Hold::Failing);
    assert!(rows[0].last_reply.as_deref().unwrap_or_default().contains("injected failure"), "{:?}", rows[0].last_reply);
    assert_eq!(fw.run_once_at(now + 100_000).await.unwrap(), 0, "held: the framework leaves it to the administrator");
    fail.store(false, Ordering::SeqCst);
    assert_eq!(s.store.write_blocking(Durability::Full, move |c| admin::command(c, &poison, admin::QueueCommand::Release)).unwrap(), 1);
    fw.run_once_at(now).await.unwrap();
    assert_eq!(s.states()[0].1, "delivered");
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
