//! The filtering snap-in in the pipeline against a real SQLite file (F3): keep quarantines,
//! discard deletes, release delivers; reports are not filtered; the size bound holds.

use directory::filters::{self, Action, Field};
use mail_builder::MessageBuilder;
use mail_framework::message::{mailbox, quarantine};
use mail_framework::reports::ReportSettings;
use mail_framework::snapins::{self, AddressResolution, Filtering, Forwarding, LocalDelivery, NonDelivery};
use mail_framework::{Framework, Origin, SnapIn};
use store::Durability;

mod common;
use common::{Setup, enqueue, setup};

impl Setup {
    fn framework(&self) -> Framework {
        Framework::with_snapins(
            self.queue.clone(),
            self.domains.clone(),
            snapins::builtin(&snapins::Settings::new("admin@example.test", "mail.example.test")),
        )
    }

    fn rule(&self, field: Field, pattern: &str, action: Action) {
        let pattern = pattern.to_string();
        self.store.write_blocking(Durability::Full, move |c| Ok(filters::add(c, field, &pattern, action)?)).unwrap();
    }

    fn count(&self, sql: &'static str) -> i64 {
        self.store.read_blocking(move |c| Ok(c.query_row(sql, [], |r| r.get(0))?)).unwrap()
    }

    fn journal(&self, code: &'static str) -> Vec<(String, String)> {
        self.store
            .read_blocking(move |c| {
                let mut s = c.prepare("SELECT qid, detail FROM journal WHERE code = ?1 ORDER BY id")?;
                Ok(s.query_map([code], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?)
            })
            .unwrap()
    }
}

/// A message with 20 KB of text before a `€invoice.VBS` attachment (RFC 2231 encoded name).
fn virus() -> Vec<u8> {
    MessageBuilder::new()
        .from(("Jane", "jane@remote.example"))
        .to("samjones@example.test")
        .subject("Your invoice")
        .text_body("Please see the attached invoice.\n".repeat(600))
        .attachment("application/octet-stream", "€invoice.VBS", b"MsgBox \"hi\"".as_slice())
        .write_to_vec()
        .unwrap()
}

fn clean() -> Vec<u8> {
    MessageBuilder::new().from("jane@remote.example").to("samjones@example.test").subject("lunch?").text_body("at noon").write_to_vec().unwrap()
}

const RCPTS: [&str; 2] = ["samjones@example.test", "someone@remote.example"];

#[tokio::test]
async fn keep_quarantines_and_release_delivers() {
    let s = setup(4096);
    s.rule(Field::Attachment, "*.vbs", Action::Keep);
    let qid = enqueue(&s.queue, &virus(), &RCPTS, Origin::Smtp).await;
    let fw = s.framework();
    assert_eq!(fw.run_once().await.unwrap(), 2);
    assert_eq!(s.states(), [(RCPTS[0].to_string(), "quarantined".to_string()), (RCPTS[1].into(), "quarantined".into())]);
    assert!(mailbox::snapshot(&s.store, s.sam).await.unwrap().is_empty(), "no mailbox row");
    let kept = s.store.read_blocking(|c| Ok(quarantine::list(c)?)).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].qid, qid);
    assert_eq!(kept[0].recipients, RCPTS);
    assert!(kept[0].rule.starts_with("filter 1 (attachment *.vbs) matched \"€invoice.VBS\""), "{}", kept[0].rule);
    let ow = s.journal("OW");
    assert_eq!(ow.len(), 1, "one OW row per message: {ow:?}");
    assert_eq!(ow[0].0, qid);
    assert!(ow[0].1.starts_with("keep: filter 1 (attachment *.vbs) matched \"€invoice.VBS\""), "{}", ow[0].1);
    assert!(s.count("SELECT count(*) FROM body_chunks") > 0, "the body is kept for review");
    assert_eq!(s.count("SELECT count(*) FROM messages WHERE origin = 'bounce'"), 0, "filtered mail never bounces");
    assert_eq!(fw.run_once().await.unwrap(), 0, "nothing left to do");

    // Release: the recipients are queued again and the filter lets the message through.
    let (q, n) = s.store.write_blocking(Durability::Full, |c| Ok(quarantine::release(c, "1")?)).unwrap();
    assert_eq!((q.qid.as_str(), n), (qid.as_str(), 2));
    assert!(s.store.write_blocking(Durability::Full, |c| Ok(quarantine::release(c, "1")?)).is_err(), "only once");
    assert_eq!(fw.run_once().await.unwrap(), 2);
    assert_eq!(s.states(), [(RCPTS[0].to_string(), "delivered".to_string()), (RCPTS[1].into(), "forward".into())]);
    assert_eq!(mailbox::snapshot(&s.store, s.sam).await.unwrap().len(), 1);
    let ow = s.journal("OW");
    assert_eq!(ow.len(), 2, "{ow:?}");
    assert!(ow[1].1.starts_with("released from quarantine 1"), "{}", ow[1].1);
    assert!(s.store.read_blocking(|c| Ok(quarantine::list(c)?)).unwrap().is_empty());
}

#[tokio::test]
async fn discard_deletes_the_message() {
    let s = setup(4096);
    s.rule(Field::Subject, "*INVOICE*", Action::Discard);
    let qid = enqueue(&s.queue, &virus(), &RCPTS, Origin::Smtp).await;
    let fw = s.framework();
    assert_eq!(fw.run_once().await.unwrap(), 2);
    assert!(mailbox::snapshot(&s.store, s.sam).await.unwrap().is_empty());
    assert_eq!(s.count("SELECT count(*) FROM quarantine"), 0);
    let ow = s.journal("OW");
    assert_eq!(ow.len(), 1);
    assert_eq!(ow[0].0, qid);
    assert!(ow[0].1.starts_with("discard: filter 1 (subject *INVOICE*) matched \"Your invoice\""), "{}", ow[0].1);
    // Nobody needs the message any more: it goes with its recipients and body, no report sent.
    assert_eq!(s.count("SELECT count(*) FROM messages"), 0);
    assert_eq!(s.count("SELECT count(*) FROM body_chunks"), 0);
    assert!(s.states().is_empty());
    assert_eq!(fw.run_once().await.unwrap(), 0);
}

#[tokio::test]
async fn quarantine_delete_frees_the_message() {
    let s = setup(4096);
    s.rule(Field::MimeType, "application/*", Action::Keep);
    let qid = enqueue(&s.queue, &virus(), &RCPTS[..1], Origin::Smtp).await;
    s.framework().run_once().await.unwrap();
    let (q, n) = s.store.write_blocking(Durability::Full, move |c| Ok(quarantine::delete(c, &qid)?)).unwrap();
    assert_eq!((q.id, n), (1, 1));
    assert!(s.states().is_empty(), "recipients go with the message");
    assert_eq!(s.count("SELECT count(*) FROM messages"), 0);
    assert_eq!(s.count("SELECT count(*) FROM quarantine"), 0);
    assert_eq!(s.journal("OW").len(), 2);
}

#[tokio::test]
async fn clean_mail_reports_and_originators() {
    let s = setup(4096);
    s.rule(Field::Attachment, "*.vbs", Action::Keep);
    s.rule(Field::From, "*@BAD.example", Action::Discard);
    let fw = s.framework();

    // No rule matches: delivered as resolved.
    enqueue(&s.queue, &clean(), &RCPTS[..1], Origin::Smtp).await;
    fw.run_once().await.unwrap();
    assert_eq!(s.states()[0].1, "delivered");

    // A report of ours is not filtered, whatever it carries.
    enqueue(&s.queue, &virus(), &RCPTS[..1], Origin::Bounce).await;
    fw.run_once().await.unwrap();
    assert_eq!(s.states()[1].1, "delivered");

    // The From header's address is an originator as much as the envelope sender.
    let forged = MessageBuilder::new().from("boss@bad.EXAMPLE").to("samjones@example.test").subject("hi").text_body("x").write_to_vec().unwrap();
    let qid = enqueue(&s.queue, &forged, &RCPTS[..1], Origin::Smtp).await;
    fw.run_once().await.unwrap();
    assert_eq!(s.states().len(), 2, "the discarded message is gone");
    let ow = s.journal("OW");
    assert_eq!(ow.len(), 1);
    assert_eq!(ow[0].0, qid);
    assert!(ow[0].1.contains("filter 2 (from *@BAD.example) matched \"boss@bad.EXAMPLE\""), "{}", ow[0].1);
    assert_eq!(mailbox::snapshot(&s.store, s.sam).await.unwrap().len(), 2);
}

fn chain(filtering: Filtering) -> Vec<Box<dyn SnapIn>> {
    vec![
        Box::new(AddressResolution),
        Box::new(filtering),
        Box::new(LocalDelivery { reports: ReportSettings::new("mail.example.test") }),
        Box::new(Forwarding { etrn: Default::default() }),
        Box::new(NonDelivery { postmaster: "admin@example.test".into(), reports: ReportSettings::new("mail.example.test") }),
    ]
}

/// Issue 13 item 7 (F3): a message the filters could not inspect completely — here its
/// attachment's headers lie past the first 4 KiB a filter bounded to 4 KiB reads — is kept while
/// an attachment filter is active, with the reason; `filter_unscannable = "deliver"` lets it pass.
#[tokio::test]
async fn only_the_first_max_bytes_are_walked_and_the_rest_fails_closed() {
    let s = setup(4096);
    s.rule(Field::Attachment, "*.vbs", Action::Keep);
    let fw = Framework::with_snapins(s.queue.clone(), s.domains.clone(), chain(Filtering { max_bytes: 4096, ..Filtering::default() }));
    enqueue(&s.queue, &virus(), &RCPTS[..1], Origin::Smtp).await;
    fw.run_once().await.unwrap();
    assert_eq!(s.states()[0].1, "quarantined");
    let kept = s.store.read_blocking(|c| Ok(quarantine::list(c)?)).unwrap();
    assert!(kept[0].rule.contains("could not be inspected completely: larger than [storage] filter_max_bytes (4096 octets)"), "{}", kept[0].rule);

    let open = Filtering { max_bytes: 4096, keep_unscannable: false, ..Filtering::default() };
    let fw = Framework::with_snapins(s.queue.clone(), s.domains.clone(), chain(open));
    enqueue(&s.queue, &virus(), &RCPTS[..1], Origin::Smtp).await;
    fw.run_once().await.unwrap();
    assert_eq!(s.states()[1].1, "delivered", "deliver: the cut walk misses the attachment");
    // The built-in chain reads 10 MiB and finds it.
    assert_eq!(
        snapins::builtin(&snapins::Settings::new("p", "mail.example.test")).iter().map(|s| s.name()).collect::<Vec<_>>()[..2],
        ["address-resolution", "filtering"]
    );
    enqueue(&s.queue, &virus(), &RCPTS[..1], Origin::Smtp).await;
    s.framework().run_once().await.unwrap();
    assert_eq!(s.states()[2].1, "quarantined");
    assert!(s.store.read_blocking(|c| Ok(quarantine::list(c)?)).unwrap()[1].rule.contains("*.vbs"));
}

/// A subject-only filter does not need the whole message: a cut walk is not a reason to keep.
#[tokio::test]
async fn a_cut_walk_is_no_reason_to_keep_without_content_filters() {
    let s = setup(4096);
    s.rule(Field::Subject, "*lottery*", Action::Keep);
    let fw = Framework::with_snapins(s.queue.clone(), s.domains.clone(), chain(Filtering { max_bytes: 4096, ..Filtering::default() }));
    enqueue(&s.queue, &virus(), &RCPTS[..1], Origin::Smtp).await;
    fw.run_once().await.unwrap();
    assert_eq!(s.states()[0].1, "delivered");
}
