//! Exactly once (issue 12): one copy per mailbox, claims that hand a recipient to one attempt
//! only, outcomes recorded only for the claim that holds it, and held dial-up mail that expires.
//! Time is an argument: nothing here sleeps.

use directory::admin::Admin;
use mail_framework::message::{Hold, admin, mailbox, outbound as rows};
use mail_framework::outbound::{self, Outcome, Schedule};
use mail_framework::reports::ReportSettings;
use mail_framework::{Dsn, Envelope, Framework, Origin, RcptDsn, snapins};
use store::Durability;

mod common;
use common::{Setup, enqueue, setup};

fn framework(s: &Setup, etrn: &[&str]) -> Framework {
    let mut settings = snapins::Settings::new("admin@example.test", "mail.example.test");
    settings.etrn = outbound::EtrnDomains::new(&etrn.iter().map(|d| d.to_string()).collect::<Vec<_>>());
    Framework::with_snapins(s.queue.clone(), s.domains.clone(), snapins::builtin(&settings))
}

fn add_user(s: &Setup, name: &str, addresses: &[&str]) -> i64 {
    let admin = Admin { store: &s.store, domains: &s.domains };
    admin.add_user(name, &addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(), None).unwrap();
    admin.show_user(name).unwrap().id
}

async fn copies(s: &Setup, user: i64) -> usize {
    mailbox::snapshot(&s.store, user).await.unwrap().len()
}

/// Reports queued to jane@remote.example (the sender of `common::enqueue`).
fn reports_to_jane(s: &Setup) -> Vec<String> {
    s.states().into_iter().filter(|(a, _)| a == "jane@remote.example").map(|(_, st)| st).collect()
}

async fn drain(fw: &Framework) {
    for _ in 0..10 {
        if fw.run_once().await.unwrap() == 0 {
            return;
        }
    }
    panic!("the framework did not settle");
}

#[tokio::test]
async fn a_recipient_named_twice_gets_one_copy() {
    let s = setup(4096);
    add_user(&s, "admin", &["admin@example.test"]);
    let admin_id = Admin { store: &s.store, domains: &s.domains }.show_user("admin").unwrap().id;
    let fw = framework(&s, &[]);
    // The same address in three spellings: one recipient row, one copy.
    enqueue(&s.queue, b"Subject: a\r\n\r\nhi\r\n", &["SamJones@example.test", "samjones@EXAMPLE.TEST", "SamJones@example.test."], Origin::Smtp).await;
    // postmaster three ways: three rows (resolution decides), one copy.
    enqueue(&s.queue, b"Subject: b\r\n\r\nhi\r\n", &["postmaster", "PostMaster", "POSTMASTER@EXAMPLE.TEST"], Origin::Smtp).await;
    drain(&fw).await;
    assert_eq!(copies(&s, s.sam).await, 1);
    assert_eq!(copies(&s, admin_id).await, 1);
    let states: Vec<String> = s.states().into_iter().map(|(_, st)| st).collect();
    assert_eq!(states, ["delivered", "delivered", "duplicate"], "the 2nd postmaster spelling is the same mailbox");
    assert!(reports_to_jane(&s).is_empty(), "a duplicate is not a failure: no report");
}

#[tokio::test]
async fn an_alias_and_its_member_named_together_give_one_copy() {
    let s = setup(4096);
    let admin = Admin { store: &s.store, domains: &s.domains };
    admin.add_alias("team@example.test", &["samjones@example.test".into()]).unwrap();
    admin.add_alias("loop-a@example.test", &["loop-b@example.test".into()]).unwrap();
    admin.add_alias("loop-b@example.test", &["loop-a@example.test".into()]).unwrap();
    let fw = framework(&s, &[]);
    enqueue(&s.queue, b"Subject: a\r\n\r\nhi\r\n", &["team@example.test", "SamJones@example.test"], Origin::Smtp).await;
    drain(&fw).await;
    assert_eq!(copies(&s, s.sam).await, 1);
    assert!(reports_to_jane(&s).is_empty(), "the alias is served, not a loop: {:?}", s.states());
    // A real loop still fails (5.4.6) and is reported.
    enqueue(&s.queue, b"Subject: b\r\n\r\nhi\r\n", &["loop-a@example.test"], Origin::Smtp).await;
    drain(&fw).await;
    assert_eq!(reports_to_jane(&s).len(), 1);
}

#[tokio::test]
async fn a_hundred_identical_rcpts_with_notify_success_give_one_copy_and_one_report() {
    let s = setup(4096);
    let pat = add_user(&s, "pat", &["pat@example.test", "patricia@example.test"]);
    let fw = framework(&s, &[]);
    let mut rcpts: Vec<String> = vec!["pat@example.test".into(); 100];
    rcpts.push("patricia@example.test".into());
    let mut incoming = s.queue.incoming();
    incoming.push(b"Subject: x\r\n\r\nhi\r\n").await.unwrap();
    let dsn = Dsn { recipients: vec![RcptDsn { notify: Some("SUCCESS".into()), orcpt: None }; rcpts.len()], ..Default::default() };
    let env = Envelope { mail_from: "jane@remote.example".into(), recipients: rcpts, dsn, ..Default::default() };
    incoming.commit(env).await.unwrap();
    drain(&fw).await;
    assert_eq!(copies(&s, pat).await, 1);
    assert_eq!(s.states().iter().filter(|(a, _)| a.starts_with("pat")).count(), 2, "100 identical RCPTs are one recipient");
    assert_eq!(reports_to_jane(&s).len(), 1, "one delivery report per message");
}

fn schedule() -> Schedule {
    Schedule { first_count: 2, first_interval_secs: 60, second_count: 2, second_interval_secs: 600, lifetime_secs: 3600, delay_warning_secs: 0 }
}

async fn forwarded(s: &Setup, rcpts: &[&str]) -> String {
    let qid = enqueue(&s.queue, b"Subject: far\r\n\r\nhi\r\n", rcpts, Origin::Smtp).await;
    framework(s, &["dialup.example"]).run_once().await.unwrap();
    qid
}

#[tokio::test]
async fn a_claimed_recipient_is_handed_out_once() {
    let s = setup(4096);
    forwarded(&s, &["far@remote.example"]).await;
    let now = store::now();
    let (a1, first) = s.store.write_blocking(Durability::Normal, move |c| rows::claim(c, now, 100, 600)).unwrap();
    let (_, second) = s.store.write_blocking(Durability::Normal, move |c| rows::claim(c, now, 100, 600)).unwrap();
    assert_eq!((first.len(), second.len()), (1, 0), "a recipient in an attempt is not due again");
    // Its outcome recorded, the message is finished: a later claim finds nothing, and the
    // outcome cannot be recorded twice.
    let results = vec![(first[0].clone(), Outcome::Delivered { reply: "250 ok".into(), relayed: false, remote_mta: None })];
    let r2 = results.clone();
    let rs = ReportSettings::new("mail.example.test");
    let rs2 = rs.clone();
    s.store.write_blocking(Durability::Full, move |c| outbound::record(c, a1, &results, &schedule(), &rs, now)).unwrap();
    s.store.write_blocking(Durability::Full, move |c| outbound::record(c, a1, &r2, &schedule(), &rs2, now)).unwrap();
    let (_, third) = s.store.write_blocking(Durability::Normal, move |c| rows::claim(c, now + 10_000, 100, 600)).unwrap();
    assert!(third.is_empty());
    assert!(s.states().is_empty(), "sent: the message is finished and freed");
    // A lapsed lease (its process died) makes the recipient due again; so does a restart.
    forwarded(&s, &["other@remote.example"]).await;
    let (_, c1) = s.store.write_blocking(Durability::Normal, move |c| rows::claim(c, now, 100, 600)).unwrap();
    assert_eq!(c1.len(), 1);
    let (_, c2) = s.store.write_blocking(Durability::Normal, move |c| rows::claim(c, now + 601, 100, 600)).unwrap();
    assert_eq!(c2.len(), 1, "lease expired");
    assert_eq!(s.store.write_blocking(Durability::Normal, rows::release_all_claims).unwrap(), 1);
}

#[tokio::test]
async fn a_recipient_deleted_or_held_during_its_attempt_gets_no_report() {
    let s = setup(4096);
    let qid = forwarded(&s, &["far@remote.example"]).await;
    let now = store::now();
    let (attempt, claimed) = s.store.write_blocking(Durability::Normal, move |c| rows::claim(c, now, 100, 600)).unwrap();
    let q = qid.clone();
    s.store.write_blocking(Durability::Full, move |c| admin::command(c, &q, admin::QueueCommand::Delete)).unwrap();
    // The next hop accepted it with a relayed report wanted; and a delay would be reported now.
    let results = vec![(claimed[0].clone(), Outcome::Delivered { reply: "250 ok".into(), relayed: true, remote_mta: None })];
    let rs = ReportSettings::new("mail.example.test");
    let bounced = s.store.write_blocking(Durability::Full, move |c| outbound::record(c, attempt, &results, &schedule(), &rs, now)).unwrap();
    assert_eq!(bounced, 0);
    assert!(s.states().is_empty(), "deleted and freed; no report message was queued");

    // Held during the attempt, then a temporary failure past the delay warning: no delay report.
    let qid = forwarded(&s, &["held@remote.example"]).await;
    let (attempt, claimed) = s.store.write_blocking(Durability::Normal, move |c| rows::claim(c, now, 100, 600)).unwrap();
    s.store.write_blocking(Durability::Full, move |c| admin::command(c, &qid, admin::QueueCommand::Hold)).unwrap();
    let results = vec![(claimed[0].clone(), Outcome::retry("451 4.3.0 later"))];
    let rs = ReportSettings::new("mail.example.test");
    s.store.write_blocking(Durability::Full, move |c| outbound::record(c, attempt, &results, &schedule(), &rs, now)).unwrap();
    let pending = s.store.read_blocking(admin::pending).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].address.as_str(), pending[0].held), ("held@remote.example", Hold::Admin));
}

#[tokio::test]
async fn mail_held_for_etrn_expires_with_a_report() {
    let s = setup(4096);
    forwarded(&s, &["branch@dialup.example"]).await;
    let pending = s.store.read_blocking(admin::pending).unwrap();
    assert_eq!(pending[0].held, Hold::Etrn);
    let now = store::now();
    let n = s.store.write_blocking(Durability::Normal, move |c| outbound::expire_etrn_held(c, &schedule(), now + 60)).unwrap();
    assert_eq!(n, 0, "within the queue lifetime it waits");
    let n = s.store.write_blocking(Durability::Normal, move |c| outbound::expire_etrn_held(c, &schedule(), now + 3600)).unwrap();
    assert_eq!(n, 1);
    drain(&framework(&s, &["dialup.example"])).await;
    assert!(s.states().iter().all(|(a, _)| a != "branch@dialup.example"), "failed, reported and freed: {:?}", s.states());
    assert_eq!(reports_to_jane(&s).len(), 1, "the sender is told");
}
