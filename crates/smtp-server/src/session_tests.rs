//! Unit tests for the sans-IO SMTP session (SPEC §2, S1–S7).
//!
//! The [`Harness`] wraps a [`Session`] in memory, in the style of Stalwart's session tests
//! (`h.cmd("RCPT TO:<jane@example.test>", "503 5.5.1")`): it feeds byte strings, answers every
//! `CheckRcpt` from a table of local addresses, collects `BodyChunk` bytes and returns the reply
//! text. It never answers `Enqueue` by itself, so a test can check that no 250 appears before
//! `EnqueueDone`.

use mail_framework::Envelope;
use mail_proto::{Address, LineEndings, Reply};

use crate::received::submission_headers;
use crate::session::{Action, AuthOutcome, Event, Phase, RcptVerdict, Session, SessionConfig};

const HOST: &str = "mx.postroom.test";
const IP: &str = "192.0.2.7";
const HELO: &str = "client.example";

fn config() -> SessionConfig {
    SessionConfig {
        hostname: HOST.into(),
        max_message_size: 10_000,
        max_recipients: 100,
        vrfy: true,
        line_endings: LineEndings::Strict,
        max_hops: 100,
        max_errors: 20,
        verify_helo: false,
        starttls: false,
        tls_active: false,
        allow_plaintext_auth: false,
        require_auth: false,
        dsn: true,
        etrn: false,
    }
}

fn config_with(f: impl FnOnce(&mut SessionConfig)) -> SessionConfig {
    let mut c = config();
    f(&mut c);
    c
}

/// What the harness saw, in order, for checks on the order of actions.
#[derive(Clone, Debug, PartialEq)]
enum Seen {
    Reply(u16),
    Check(String),
    Begin,
    Body,
    Enqueue,
    Abort,
    Close,
}

struct Harness {
    session: Session,
    /// Recipients that `CheckRcpt` accepts (compared with `Address::key`).
    local: Vec<String>,
    /// Answer `CheckRcpt` at once; off for the tests that feed `RcptChecked` by hand.
    auto_rcpt: bool,
    trace: Vec<Seen>,
    replies: Vec<Reply>,
    checks: Vec<Address>,
    begins: Vec<(String, bool, Option<String>)>,
    body: Vec<u8>,
    enqueues: Vec<Envelope>,
    aborts: usize,
    closes: usize,
    penalties: usize,
    tls_starts: usize,
    added_headers: Vec<(bool, bool)>,
    /// The message as the driver stores it: `body` with the added header fields in place.
    message: Vec<u8>,
    /// E1: the senders `CheckSpf` was asked about, and the answer it gives.
    spf_checks: Vec<Option<Address>>,
    spf_verdict: Option<Reply>,
}

impl Harness {
    fn new(config: SessionConfig) -> Self {
        Harness {
            session: Session::new(config, IP.into()),
            local: vec!["jane@example.test".into(), "sam@example.test".into(), "postmaster".into()],
            auto_rcpt: true,
            trace: Vec::new(),
            replies: Vec::new(),
            checks: Vec::new(),
            begins: Vec::new(),
            body: Vec::new(),
            enqueues: Vec::new(),
            aborts: 0,
            closes: 0,
            penalties: 0,
            tls_starts: 0,
            added_headers: Vec::new(),
            message: Vec::new(),
            spf_checks: Vec::new(),
            spf_verdict: None,
        }
    }

    /// Connected: the 220 greeting has been read.
    fn connected(config: SessionConfig) -> Self {
        let mut h = Harness::new(config);
        let greeting = h.event(Event::Connected);
        assert!(greeting.starts_with("220 "), "{greeting:?}");
        h
    }

    /// Connected and greeted with EHLO.
    fn ready(config: SessionConfig) -> Self {
        let mut h = Harness::connected(config);
        h.cmd(&format!("EHLO {HELO}"), "250-");
        h
    }

    fn event(&mut self, event: Event<'_>) -> String {
        let actions = self.session.handle(event);
        let mut text = String::new();
        self.absorb(actions, &mut text);
        text
    }

    /// Record actions; answer `CheckRcpt` (when `auto_rcpt`) and record what that produces.
    fn absorb(&mut self, actions: Vec<Action>, text: &mut String) {
        for action in actions {
            match action {
                Action::Reply(r) => {
                    self.trace.push(Seen::Reply(r.code));
                    text.push_str(&r.to_string());
                    self.replies.push(r);
                }
                Action::CheckRcpt(addr) => {
                    self.trace.push(Seen::Check(addr.to_string()));
                    let verdict = self.verdict(&addr);
                    self.checks.push(addr);
                    if self.auto_rcpt {
                        let more = self.session.handle(Event::RcptChecked(verdict));
                        self.absorb(more, text);
                    }
                }
                Action::BeginData { helo, esmtp, single_rcpt, .. } => {
                    self.trace.push(Seen::Begin);
                    self.begins.push((helo, esmtp, single_rcpt));
                }
                Action::BodyChunk(bytes) => {
                    self.trace.push(Seen::Body);
                    self.body.extend_from_slice(&bytes);
                    self.message.extend_from_slice(&bytes);
                }
                Action::Enqueue(envelope) => {
                    self.trace.push(Seen::Enqueue);
                    self.enqueues.push(envelope);
                }
                Action::AbortData => {
                    self.trace.push(Seen::Abort);
                    self.aborts += 1;
                }
                Action::Close => {
                    self.trace.push(Seen::Close);
                    self.closes += 1;
                }
                Action::CheckHelo(_) => {
                    let more = self.session.handle(Event::HeloChecked(None));
                    self.absorb(more, text);
                }
                Action::Penalize => self.penalties += 1,
                Action::StartTls => {
                    self.tls_starts += 1;
                    let more = self.session.handle(Event::TlsUp);
                    self.absorb(more, text);
                }
                Action::VerifyPassword { user, password } => {
                    let outcome = if password == "good" { AuthOutcome::Ok(user) } else { AuthOutcome::Failed };
                    let more = self.session.handle(Event::AuthDone(outcome));
                    self.absorb(more, text);
                }
                Action::AddHeaders { message_id, date } => {
                    self.added_headers.push((message_id, date));
                    self.message.extend_from_slice(submission_headers(message_id, date, "Q", HOST, 0).as_bytes());
                }
                Action::Etrn(node) => {
                    let more = self.session.handle(Event::EtrnDone(Reply::plain(251, format!("OK, no messages waiting for node {node}"))));
                    self.absorb(more, text);
                }
                Action::CheckSpf(from) => {
                    self.spf_checks.push(from);
                    let more = self.session.handle(Event::SpfChecked(self.spf_verdict.clone()));
                    self.absorb(more, text);
                }
            }
        }
    }

    fn verdict(&self, addr: &Address) -> RcptVerdict {
        if self.local.iter().any(|l| *l == addr.key()) {
            RcptVerdict::Accept
        } else {
            RcptVerdict::Refuse(Reply::new(550, (7, 1), "Relay access denied"))
        }
    }

    fn send(&mut self, bytes: impl AsRef<[u8]>) -> String {
        self.event(Event::Bytes(bytes.as_ref()))
    }

    /// Feed in chunks of `size` bytes (1 = byte by byte); the reply text of all of them.
    fn send_chunks(&mut self, bytes: impl AsRef<[u8]>, size: usize) -> String {
        let mut text = String::new();
        for chunk in bytes.as_ref().chunks(size) {
            text.push_str(&self.send(chunk));
        }
        text
    }

    /// Send one command line (CRLF added); the reply text must start with `expect`.
    fn cmd(&mut self, line: &str, expect: &str) -> String {
        let text = self.send(format!("{line}\r\n"));
        assert!(text.starts_with(expect), "{line:?}: expected {expect:?}, got {text:?}");
        text
    }

    fn rcpt_checked(&mut self, verdict: RcptVerdict) -> String {
        self.event(Event::RcptChecked(verdict))
    }

    fn enqueue_done(&mut self, result: Result<String, String>) -> String {
        self.event(Event::EnqueueDone(result))
    }

    /// MAIL, RCPTs (each must be accepted) and DATA up to the 354.
    fn start_data(&mut self, from: &str, rcpts: &[&str]) {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0");
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"), "250 2.1.5");
        }
        self.cmd("DATA", "354 ");
    }

    fn count(&self, seen: &Seen) -> usize {
        self.trace.iter().filter(|s| *s == seen).count()
    }

    /// Trace entries after the last `Begin`.
    fn since_begin(&self) -> &[Seen] {
        let at = self.trace.iter().rposition(|s| *s == Seen::Begin).expect("BeginData seen");
        &self.trace[at + 1..]
    }
}

/// Reply lines (without CRLF) of a reply text.
fn lines(text: &str) -> Vec<&str> {
    text.split("\r\n").filter(|l| !l.is_empty()).collect()
}

fn is_reply(a: &Action, code: u16) -> bool {
    matches!(a, Action::Reply(r) if r.code == code)
}

// ----------------------------------------------------------------------------------------------
// Greeting, EHLO, HELO (S1, S2)
// ----------------------------------------------------------------------------------------------

#[test]
fn greeting_is_220_with_hostname() {
    let mut h = Harness::new(config());
    assert_eq!(h.event(Event::Connected), format!("220 {HOST} ESMTP Postroom\r\n"));
    assert!(!h.session.is_closed());
    assert_eq!(h.session.phase(), Phase::Command);
}

#[test]
fn ehlo_advertises_pipelining_size_8bitmime_enhancedstatuscodes() {
    // S2
    let mut h = Harness::connected(config_with(|c| c.max_message_size = 12_345));
    let text = h.cmd("EHLO client.example", "250-");
    let l = lines(&text);
    assert_eq!(l[0], format!("250-{HOST}"));
    let (last, rest) = l.split_last().unwrap();
    assert!(last.starts_with("250 "), "{text:?}");
    assert!(rest.iter().all(|x| x.starts_with("250-")), "{text:?}");
    let keywords: Vec<&str> = l.iter().map(|x| &x[4..]).collect();
    for k in ["PIPELINING", "SIZE 12345", "8BITMIME", "ENHANCEDSTATUSCODES"] {
        assert!(keywords.contains(&k), "{k} missing in {text:?}");
    }
    assert_eq!(h.session.helo(), Some(("client.example", true)));
}

#[test]
fn helo_works_and_begins_non_esmtp_data() {
    // S1
    let mut h = Harness::connected(config());
    assert_eq!(h.cmd("HELO client.example", "250 "), format!("250 {HOST}\r\n"));
    assert_eq!(h.session.helo(), Some(("client.example", false)));
    h.start_data("a@b.example", &["jane@example.test"]);
    assert_eq!(h.begins, vec![("client.example".to_string(), false, Some("jane@example.test".to_string()))]);
}

#[test]
fn helo_client_may_not_use_esmtp_parameters() {
    let mut h = Harness::connected(config());
    h.cmd("HELO client.example", "250 ");
    h.cmd("MAIL FROM:<a@b.example> SIZE=100", "555 5.5.4");
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
}

#[test]
fn helo_and_ehlo_need_a_domain() {
    let mut h = Harness::connected(config());
    h.cmd("EHLO", "501 5.5.4");
    h.cmd("HELO", "501 5.5.4");
    assert_eq!(h.session.helo(), None);
    h.cmd("MAIL FROM:<a@b.example>", "503 5.5.1");
}

#[test]
fn commands_are_case_insensitive() {
    let mut h = Harness::connected(config());
    h.cmd("ehlo client.example", "250-");
    h.cmd("mail from:<a@b.example>", "250 2.1.0");
    h.cmd("rcpt to:<jane@example.test>", "250 2.1.5");
    h.cmd("data", "354 ");
}

// ----------------------------------------------------------------------------------------------
// The 250 after DATA only after the commit (F1, module doc of session.rs)
// ----------------------------------------------------------------------------------------------

#[test]
fn data_250_comes_only_after_enqueue_done_ok() {
    let mut h = Harness::ready(config());
    h.start_data("a@b.example", &["jane@example.test"]);
    let actions = h.session.handle(Event::Bytes(b"Subject: hi\r\n\r\nHello\r\n.\r\n"));
    assert!(actions.iter().any(|a| matches!(a, Action::Enqueue(_))), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::Reply(_))), "no reply before the commit: {actions:?}");
    assert!(matches!(actions.last(), Some(Action::Enqueue(_))));
    let mut text = String::new();
    h.absorb(actions, &mut text);
    assert_eq!(text, "");
    assert_eq!(h.body, b"Subject: hi\r\n\r\nHello\r\n");
    // Anything pipelined behind the message waits for the commit too.
    assert_eq!(h.send("NOOP\r\n"), "");
    let text = h.enqueue_done(Ok("Q7F3A".into()));
    let l = lines(&text);
    assert_eq!(l.len(), 2, "{text:?}");
    assert!(l[0].starts_with("250 2.0.0 ") && l[0].contains("Q7F3A"), "{text:?}");
    assert!(l[1].starts_with("250 2.0.0"), "NOOP answered after the commit: {text:?}");
    assert_eq!(h.session.phase(), Phase::Command);
}

#[test]
fn enqueue_failure_is_451_and_never_250() {
    let mut h = Harness::ready(config());
    h.start_data("a@b.example", &["jane@example.test"]);
    assert_eq!(h.send("Subject: hi\r\n\r\nHello\r\n.\r\n"), "");
    assert_eq!(h.enqueues.len(), 1);
    let text = h.enqueue_done(Err("disk full".into()));
    assert!(text.starts_with("451 4.3.0"), "{text:?}");
    assert!(!text.contains("250"), "{text:?}");
    // The transaction is over: RCPT needs a new MAIL.
    h.cmd("RCPT TO:<jane@example.test>", "503 5.5.1");
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
}

#[test]
fn enqueue_done_without_pending_enqueue_is_ignored() {
    let mut h = Harness::ready(config());
    assert!(h.session.handle(Event::EnqueueDone(Ok("Q1".into()))).is_empty());
    h.start_data("a@b.example", &["jane@example.test"]);
    // During DATA, before the end: still ignored, and no 250.
    h.send("Subject: x\r\n\r\nbody\r\n");
    assert!(h.session.handle(Event::EnqueueDone(Ok("Q2".into()))).is_empty());
    h.send(".\r\n");
    assert!(h.enqueue_done(Ok("Q3".into())).starts_with("250 2.0.0"));
    // A second answer for the same message does nothing.
    assert!(h.session.handle(Event::EnqueueDone(Ok("Q3".into()))).is_empty());
}

#[test]
fn rcpt_checked_without_pending_check_is_ignored() {
    let mut h = Harness::ready(config());
    assert!(h.session.handle(Event::RcptChecked(RcptVerdict::Accept)).is_empty());
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    assert!(h.session.handle(Event::RcptChecked(RcptVerdict::Accept)).is_empty());
    // No recipient was added by the stray verdicts.
    h.cmd("DATA", "503 5.5.1");
}

#[test]
fn two_messages_on_one_connection() {
    let mut h = Harness::ready(config());
    h.start_data("one@b.example", &["jane@example.test"]);
    h.send("Subject: 1\r\n\r\none\r\n.\r\n");
    assert!(h.enqueue_done(Ok("Q1".into())).starts_with("250 2.0.0"));
    h.start_data("two@b.example", &["sam@example.test"]);
    h.send("Subject: 2\r\n\r\ntwo\r\n.\r\n");
    assert!(h.enqueue_done(Ok("Q2".into())).starts_with("250 2.0.0"));
    assert_eq!(h.enqueues.len(), 2);
    assert_eq!(h.enqueues[1].mail_from, "two@b.example");
    assert_eq!(h.enqueues[1].recipients, vec!["sam@example.test".to_string()]);
    assert_eq!(h.body, b"Subject: 1\r\n\r\none\r\nSubject: 2\r\n\r\ntwo\r\n");
}

// ----------------------------------------------------------------------------------------------
// Pipelining (S2, RFC 2920)
// ----------------------------------------------------------------------------------------------

#[test]
fn pipelined_group_waits_for_each_rcpt_check() {
    let mut h = Harness::connected(config());
    h.auto_rcpt = false;
    let actions = h.session.handle(Event::Bytes(
        b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<jane@example.test>\r\n\
          RCPT TO:<sam@example.test>\r\nDATA\r\n",
    ));
    // EHLO and MAIL are answered, then the first check; nothing behind it yet.
    assert_eq!(actions.len(), 3, "{actions:?}");
    assert!(is_reply(&actions[0], 250));
    assert!(matches!(&actions[1], Action::Reply(r) if r.code == 250 && r.enhanced().as_deref() == Some("2.1.0")));
    assert!(matches!(&actions[2], Action::CheckRcpt(a) if a.key() == "jane@example.test"));
    let mut sink = String::new();
    h.absorb(actions, &mut sink);

    // The message arrives while the check is pending: buffered, not processed.
    let actions = h.session.handle(Event::Bytes(b"Subject: p\r\n\r\npipelined\r\n.\r\n"));
    assert!(actions.is_empty(), "{actions:?}");

    let actions = h.session.handle(Event::RcptChecked(RcptVerdict::Accept));
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(matches!(&actions[0], Action::Reply(r) if r.code == 250 && r.enhanced().as_deref() == Some("2.1.5")));
    assert!(matches!(&actions[1], Action::CheckRcpt(a) if a.key() == "sam@example.test"));
    h.absorb(actions, &mut sink);

    let actions = h.session.handle(Event::RcptChecked(RcptVerdict::Accept));
    assert!(is_reply(&actions[0], 250));
    assert!(is_reply(&actions[1], 354));
    assert!(matches!(&actions[2], Action::BeginData { single_rcpt: None, .. }));
    assert!(matches!(actions.last(), Some(Action::Enqueue(_))), "{actions:?}");
    assert!(!actions[2..].iter().any(|a| matches!(a, Action::Reply(_))), "{actions:?}");
    h.absorb(actions, &mut sink);
    assert_eq!(h.body, b"Subject: p\r\n\r\npipelined\r\n");
    assert_eq!(h.enqueues[0].recipients, vec!["jane@example.test".to_string(), "sam@example.test".to_string()]);
}

#[test]
fn pipelined_replies_come_in_order_with_a_refusal_in_the_middle() {
    let mut h = Harness::connected(config());
    let text = h.send(
        "EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<jane@example.test>\r\n\
         RCPT TO:<stranger@elsewhere.example>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n",
    );
    let finals: Vec<&str> = lines(&text).into_iter().filter(|l| l.as_bytes()[3] == b' ').collect();
    assert_eq!(finals.len(), 6, "{text:?}");
    assert!(finals[0].starts_with("250 "));
    assert!(finals[1].starts_with("250 2.1.0"));
    assert!(finals[2].starts_with("250 2.1.5"));
    assert!(finals[3].starts_with("550 5.7.1"));
    assert!(finals[4].starts_with("250 2.1.5"));
    assert!(finals[5].starts_with("354 "));
    assert_eq!(
        h.trace[h.trace.len() - 9..],
        [
            Seen::Reply(250),
            Seen::Check("jane@example.test".into()),
            Seen::Reply(250),
            Seen::Check("stranger@elsewhere.example".into()),
            Seen::Reply(550),
            Seen::Check("sam@example.test".into()),
            Seen::Reply(250),
            Seen::Reply(354),
            Seen::Begin,
        ]
    );
}

#[test]
fn commands_after_data_end_wait_for_commit_then_run_in_order() {
    let mut h = Harness::ready(config());
    let text = h.send(
        "MAIL FROM:<a@b.example>\r\nRCPT TO:<jane@example.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n\
         MAIL FROM:<c@d.example>\r\nQUIT\r\n",
    );
    assert_eq!(lines(&text).len(), 3, "{text:?}");
    assert_eq!(h.enqueues.len(), 1);
    assert!(!h.session.is_closed());
    let text = h.enqueue_done(Ok("Q9".into()));
    let l = lines(&text);
    assert_eq!(l.len(), 3, "{text:?}");
    assert!(l[0].starts_with("250 2.0.0") && l[0].contains("Q9"));
    assert!(l[1].starts_with("250 2.1.0"));
    assert!(l[2].starts_with("221 "));
    assert!(h.session.is_closed());
    assert_eq!(h.trace.last(), Some(&Seen::Close));
}

// ----------------------------------------------------------------------------------------------
// Message body: dot-unstuffing, 8-bit, any chunking (RFC 5321 §4.5.2, S2 8BITMIME)
// ----------------------------------------------------------------------------------------------

const WIRE_BODY: &[u8] = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\n..leading dot\r\n...two dots\r\n.x\r\n\
    plain \xff\xfe\x80 bytes\r\n..\r\nend.\r\n.\r\n";
const DECODED_BODY: &[u8] = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\n.leading dot\r\n..two dots\r\nx\r\n\
    plain \xff\xfe\x80 bytes\r\n.\r\nend.\r\n";

#[test]
fn body_is_unstuffed_and_8bit_clean_in_any_chunking() {
    for size in [WIRE_BODY.len(), 1, 2, 3, 7, 13] {
        let mut h = Harness::ready(config());
        h.start_data("a@b.example", &["jane@example.test"]);
        assert_eq!(h.session.phase(), Phase::Data);
        assert_eq!(h.send_chunks(WIRE_BODY, size), "", "chunk size {size}");
        assert_eq!(h.body, DECODED_BODY, "chunk size {size}");
        assert_eq!(h.enqueues.len(), 1, "chunk size {size}");
        assert_eq!(h.aborts, 0);
        assert_eq!(h.session.phase(), Phase::Command);
        assert!(h.enqueue_done(Ok("Q".into())).starts_with("250 2.0.0"));
    }
}

#[test]
fn body_byte_by_byte_including_the_commands() {
    let mut h = Harness::connected(config());
    let mut wire = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<jane@example.test>\r\nDATA\r\n".to_vec();
    wire.extend_from_slice(WIRE_BODY);
    let text = h.send_chunks(&wire, 1);
    assert!(lines(&text).last().unwrap().starts_with("354 "), "{text:?}");
    assert_eq!(h.body, DECODED_BODY);
    assert_eq!(h.enqueues.len(), 1);
}

#[test]
fn empty_message() {
    let mut h = Harness::ready(config());
    h.start_data("a@b.example", &["jane@example.test"]);
    assert_eq!(h.send(".\r\n"), "");
    assert_eq!(h.enqueues.len(), 1);
    assert!(h.body.is_empty());
}

#[test]
fn crlf_dot_crlf_split_at_every_position() {
    let wire = b"Subject: s\r\n\r\nbody\r\n.\r\nNOOP\r\n";
    for cut in 0..=wire.len() {
        let mut h = Harness::ready(config());
        h.start_data("a@b.example", &["jane@example.test"]);
        h.send(&wire[..cut]);
        h.send(&wire[cut..]);
        assert_eq!(h.body, b"Subject: s\r\n\r\nbody\r\n", "cut {cut}");
        assert_eq!(h.enqueues.len(), 1, "cut {cut}");
        let text = h.enqueue_done(Ok("Q".into()));
        assert_eq!(lines(&text).len(), 2, "cut {cut}: {text:?}");
    }
}

// ----------------------------------------------------------------------------------------------
// SMTP smuggling (S5)
// ----------------------------------------------------------------------------------------------

const SMUGGLE_SEQUENCES: [&[u8]; 5] = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"];
const SMUGGLED: &[u8] = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsmuggled\r\n";

fn smuggling_wire(seq: &[u8]) -> Vec<u8> {
    let mut wire = b"Subject: smuggle\r\n\r\nhello".to_vec();
    wire.extend_from_slice(seq);
    wire.extend_from_slice(SMUGGLED);
    wire.extend_from_slice(b".\r\n");
    wire
}

#[test]
fn smuggling_strict_mode_refuses_and_closes() {
    for seq in SMUGGLE_SEQUENCES {
        for size in [usize::MAX, 1] {
            let mut h = Harness::ready(config_with(|c| c.line_endings = LineEndings::Strict));
            h.start_data("a@b.example", &["jane@example.test"]);
            let checks = h.checks.len();
            let wire = smuggling_wire(seq);
            let text = h.send_chunks(&wire, size.min(wire.len()));
            let ctx = format!("{seq:?} chunk {size}: {text:?}");
            assert_eq!(lines(&text).len(), 1, "{ctx}");
            assert!(text.starts_with('5'), "{ctx}");
            assert!(h.session.is_closed(), "{ctx}");
            assert_eq!(h.closes, 1, "{ctx}");
            assert!(h.enqueues.is_empty(), "{ctx}");
            assert_eq!(h.aborts, 1, "{ctx}");
            assert_eq!(h.checks.len(), checks, "smuggled RCPT must not be checked: {ctx}");
            assert!(!h.since_begin().contains(&Seen::Reply(250)), "{ctx}");
            assert!(h.session.handle(Event::Bytes(b"NOOP\r\n")).is_empty());
        }
    }
}

#[test]
fn smuggling_normalise_mode_keeps_it_all_in_one_message() {
    for seq in SMUGGLE_SEQUENCES {
        for size in [usize::MAX, 1, 3] {
            let mut h = Harness::ready(config_with(|c| c.line_endings = LineEndings::NormaliseBareLf));
            h.start_data("a@b.example", &["jane@example.test"]);
            let checks = h.checks.len();
            let wire = smuggling_wire(seq);
            let text = h.send_chunks(&wire[..wire.len() - 3], size.min(wire.len()));
            let ctx = format!("{seq:?} chunk {size}");
            assert_eq!(text, "", "{ctx}");
            assert!(h.enqueues.is_empty(), "DATA must not end before CRLF.CRLF: {ctx}");
            assert_eq!(h.session.phase(), Phase::Data, "{ctx}");
            assert_eq!(h.send(b".\r\n"), "", "{ctx}");
            assert_eq!(h.enqueues.len(), 1, "{ctx}");
            assert_eq!(h.checks.len(), checks, "{ctx}");
            let mut expected = b"Subject: smuggle\r\n\r\nhello\r\n.\r\n".to_vec();
            expected.extend_from_slice(SMUGGLED);
            assert_eq!(String::from_utf8_lossy(&h.body), String::from_utf8_lossy(&expected), "{ctx}");
            assert_eq!(h.enqueues[0].mail_from, "a@b.example", "{ctx}");
            assert_eq!(h.enqueues[0].recipients, vec!["jane@example.test".to_string()], "{ctx}");
            assert!(h.enqueue_done(Ok("Q".into())).starts_with("250 2.0.0"), "{ctx}");
            // Nothing smuggled is left over as commands.
            assert_eq!(h.count(&Seen::Enqueue), 1);
            h.cmd("QUIT", "221 ");
        }
    }
}

#[test]
fn normalise_mode_rewrites_bare_lf_to_crlf() {
    let mut h = Harness::ready(config_with(|c| c.line_endings = LineEndings::NormaliseBareLf));
    h.start_data("a@b.example", &["jane@example.test"]);
    h.send("Subject: lf\nX: 1\n\nline\r\n.\r\n");
    assert_eq!(h.body, b"Subject: lf\r\nX: 1\r\n\r\nline\r\n");
    assert_eq!(h.enqueues.len(), 1);
}

#[test]
fn strict_mode_refuses_bare_lf_in_body() {
    let mut h = Harness::ready(config());
    h.start_data("a@b.example", &["jane@example.test"]);
    let text = h.send("Subject: lf\nbody\r\n.\r\n");
    assert!(text.starts_with('5'), "{text:?}");
    assert!(h.enqueues.is_empty());
    assert_eq!(h.aborts, 1);
    assert!(h.session.is_closed());
}

// ----------------------------------------------------------------------------------------------
// Reply codes for sequence and syntax errors (S1, RFC 5321 §4.3.2)
// ----------------------------------------------------------------------------------------------

#[test]
fn mail_before_helo_is_503() {
    let mut h = Harness::connected(config());
    h.cmd("MAIL FROM:<a@b.example>", "503 5.5.1");
}

#[test]
fn rcpt_before_mail_is_503() {
    let mut h = Harness::ready(config());
    h.cmd("RCPT TO:<jane@example.test>", "503 5.5.1");
    assert!(h.checks.is_empty());
}

#[test]
fn data_before_mail_or_rcpt_is_503() {
    let mut h = Harness::ready(config());
    h.cmd("DATA", "503 5.5.1");
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    h.cmd("DATA", "503 5.5.1");
    // A refused recipient does not count either.
    h.cmd("RCPT TO:<stranger@elsewhere.example>", "550 5.7.1");
    h.cmd("DATA", "503 5.5.1");
    assert!(h.begins.is_empty());
    assert_eq!(h.session.phase(), Phase::Command);
}

#[test]
fn nested_mail_is_503() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    h.cmd("MAIL FROM:<c@d.example>", "503 5.5.1");
    h.cmd("RCPT TO:<jane@example.test>", "250 2.1.5");
    h.cmd("DATA", "354 ");
    h.send(".\r\n");
    assert_eq!(h.enqueues[0].mail_from, "a@b.example");
}

#[test]
fn mail_from_without_angle_brackets_is_501_517() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:a@b.example", "501 5.1.7");
    h.cmd("mail from:a@b.example", "501 5.1.7");
    h.cmd("MAIL FROM:<a@@b>", "501 5.1.7");
    // The failed MAIL did not open a transaction.
    h.cmd("RCPT TO:<jane@example.test>", "503 5.5.1");
}

#[test]
fn bad_rcpt_address_is_501_513() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    h.cmd("RCPT TO:jane@example.test", "501 5.1.3");
    h.cmd("RCPT TO:<>", "501 5.1.3");
    assert!(h.checks.is_empty());
}

#[test]
fn unknown_mail_parameter_is_555() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:<a@b.example> FOO=BAR", "555 5.5.4");
    h.cmd("MAIL FROM:<a@b.example> XYZZY", "555 5.5.4");
    h.cmd("MAIL FROM:<a@b.example> BODY=8BITMIME SIZE=100", "250 2.1.0");
}

#[test]
fn unknown_rcpt_parameters_are_555_and_dsn_ones_checked() {
    let mut h = Harness::ready(config_with(|c| c.dsn = false));
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    h.cmd("RCPT TO:<jane@example.test> NOTIFY=NEVER", "555 5.5.4");
    h.cmd("RCPT TO:<jane@example.test> FOO", "555 5.5.4");
    assert!(h.checks.is_empty());
    h.cmd("RCPT TO:<jane@example.test>", "250 2.1.5");
    // With DSN on (RFC 3461), NOTIFY and ORCPT are taken and checked.
    let mut h = Harness::ready(config());
    h.local = vec!["jane@example.test".into()];
    h.cmd("MAIL FROM:<a@b.example> RET=HDRS ENVID=job+2B7", "250 2.1.0");
    h.cmd("RCPT TO:<jane@example.test> NOTIFY=SOMETIMES", "501 5.5.4");
    h.cmd("RCPT TO:<jane@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Jane+2Bx@example.test", "250 2.1.5");
    h.cmd("DATA", "354");
    h.send("Subject: dsn\r\n\r\nbody\r\n.\r\n");
    let dsn = &h.enqueues.last().expect("enqueued").dsn;
    assert_eq!((dsn.ret.as_deref(), dsn.envid.as_deref()), (Some("HDRS"), Some("job+7")));
    assert_eq!(dsn.recipients[0].notify.as_deref(), Some("SUCCESS,DELAY"));
    assert_eq!(dsn.recipients[0].orcpt.as_deref(), Some("rfc822;Jane+x@example.test"));
}

#[test]
fn size_parameter_above_limit_is_552() {
    // S4, RFC 1870
    let mut h = Harness::ready(config_with(|c| c.max_message_size = 5000));
    h.cmd("MAIL FROM:<a@b.example> SIZE=5001", "552 5.3.4");
    h.cmd("MAIL FROM:<a@b.example> SIZE=99999999999999999999", "552 5.3.4");
    h.cmd("MAIL FROM:<a@b.example> SIZE=5000", "250 2.1.0");
}

#[test]
fn empty_size_value_is_a_syntax_error_not_552() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:<a@b.example> SIZE=", "501 5.5.4");
}

#[test]
fn bad_size_or_body_value_is_501() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:<a@b.example> SIZE=abc", "501 5.5.4");
    h.cmd("MAIL FROM:<a@b.example> BODY=BINARYMIME", "501 5.5.4");
}

#[test]
fn too_many_recipients_is_452() {
    // S4, RFC 5321 §4.5.3.1.10
    let mut h = Harness::ready(config_with(|c| c.max_recipients = 3));
    h.local = (0..5).map(|i| format!("u{i}@example.test")).collect();
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    for i in 0..3 {
        h.cmd(&format!("RCPT TO:<u{i}@example.test>"), "250 2.1.5");
    }
    h.cmd("RCPT TO:<u3@example.test>", "452 4.5.3");
    h.cmd("RCPT TO:<u4@example.test>", "452 4.5.3");
    assert_eq!(h.checks.len(), 3, "no check for recipients over the limit");
    h.cmd("DATA", "354 ");
    h.send(".\r\n");
    assert_eq!(h.enqueues[0].recipients, vec!["u0@example.test", "u1@example.test", "u2@example.test"]);
}

#[test]
fn recipients_over_the_limit_do_not_trip_the_error_limit() {
    // S4: max_recipients default >= 100 and 421 after 20 errors. RFC 5321 §4.5.3.1.10: the
    // client retries the over-limit recipients later, so the first 100 must still be taken
    // (Postfix does not count this overshoot as errors: smtpd_recipient_overshoot_limit).
    let mut h = Harness::ready(config_with(|c| {
        c.max_recipients = 100;
        c.max_errors = 20;
    }));
    h.local = (0..130).map(|i| format!("u{i}@example.test")).collect();
    let mut wire = "MAIL FROM:<a@b.example>\r\n".to_string();
    for i in 0..130 {
        wire.push_str(&format!("RCPT TO:<u{i}@example.test>\r\n"));
    }
    wire.push_str("DATA\r\nSubject: many\r\n\r\nhi\r\n.\r\n");
    let text = h.send(wire);
    let l = lines(&text);
    assert_eq!(l.iter().filter(|x| x.starts_with("250 2.1.5")).count(), 100, "{text:?}");
    assert_eq!(l.iter().filter(|x| x.starts_with("452 4.5.3")).count(), 30, "{text:?}");
    assert!(!h.session.is_closed(), "{text:?}");
    assert_eq!(l.last().map(|x| &x[..4]), Some("354 "));
    assert_eq!(h.enqueues.len(), 1);
    assert_eq!(h.enqueues[0].recipients.len(), 100);
}

#[test]
fn refused_recipients_do_not_count_towards_the_limit() {
    let mut h = Harness::ready(config_with(|c| c.max_recipients = 1));
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    h.cmd("RCPT TO:<stranger@elsewhere.example>", "550 5.7.1");
    h.cmd("RCPT TO:<jane@example.test>", "250 2.1.5");
    h.cmd("RCPT TO:<sam@example.test>", "452 4.5.3");
}

#[test]
fn command_line_over_512_octets_is_500() {
    // S4: 512 octets for commands, CRLF included.
    let mut h = Harness::ready(config());
    let ok = format!("NOOP {}", "x".repeat(512 - 2 - 5));
    assert_eq!(ok.len() + 2, 512);
    h.cmd(&ok, "250 ");
    let long = format!("NOOP {}", "x".repeat(512 - 2 - 5 + 1));
    h.cmd(&long, "500 5.5.2");
    h.cmd(&format!("HELO {}", "a".repeat(600)), "500 5.5.2");
    assert_eq!(h.session.helo(), Some((HELO, true)));
    h.cmd("NOOP", "250 ");
}

#[test]
fn mail_line_may_be_longer_with_extension_parameters() {
    // S4: "longer for MAIL/RCPT with extension parameters"
    let mut h = Harness::ready(config());
    let line = format!("MAIL FROM:<a@b.example> BODY=8BITMIME{}SIZE=10", " ".repeat(700));
    assert!(line.len() > 512);
    h.cmd(&line, "250 2.1.0");
}

#[test]
fn endless_line_is_answered_once_and_discarded() {
    let mut h = Harness::ready(config());
    let mut text = h.send_chunks(format!("NOOP {}", "x".repeat(10_000)), 100);
    text.push_str(&h.send("xxxx\r\nNOOP\r\n"));
    let l = lines(&text);
    assert_eq!(l.len(), 2, "{text:?}");
    assert!(l[0].starts_with("500 5.5.2"));
    assert!(l[1].starts_with("250 "));
}

#[test]
fn unknown_command_is_500() {
    let mut h = Harness::ready(config());
    h.cmd("FOO bar", "500 5.5.2");
    h.cmd("XBDAT 10 LAST", "500 5.5.2");
    h.cmd("\u{00ff}\u{00fe}", "500 5.5.2");
    h.cmd("", "500 5.5.2");
}

#[test]
fn unsupported_rfc_commands_are_502() {
    // S1
    let mut h = Harness::ready(config());
    for line in ["EXPN staff", "SEND FROM:<a@b.example>", "SOML FROM:<a@b.example>", "SAML FROM:<a@b.example>", "TURN"] {
        h.cmd(line, "502 ");
    }
}

#[test]
fn vrfy_is_252_when_enabled_and_does_not_harvest() {
    // S1: "must not become an address-harvesting tool (252 is acceptable)"
    let mut h = Harness::ready(config_with(|c| c.vrfy = true));
    let local = h.cmd("VRFY jane@example.test", "252 ");
    let stranger = h.cmd("VRFY nobody@example.test", "252 ");
    assert_eq!(local, stranger);
    assert!(h.checks.is_empty());
}

#[test]
fn vrfy_is_502_when_disabled() {
    // S1
    let mut h = Harness::ready(config_with(|c| c.vrfy = false));
    h.cmd("VRFY jane@example.test", "502 ");
}

#[test]
fn help_noop_rset_quit() {
    let mut h = Harness::ready(config());
    h.cmd("HELP", "214 ");
    h.cmd("NOOP", "250 ");
    h.cmd("NOOP anything", "250 ");
    h.cmd("RSET", "250 ");
    h.cmd("RSET now", "501 ");
    assert_eq!(h.closes, 0);
    h.cmd("QUIT", "221 ");
    assert!(h.session.is_closed());
    assert_eq!(h.trace.last(), Some(&Seen::Close));
    assert_eq!(h.closes, 1);
    // Nothing after QUIT, not even pipelined leftovers.
    assert!(h.session.handle(Event::Bytes(b"NOOP\r\n")).is_empty());
    assert!(h.session.handle(Event::Timeout).is_empty());
}

#[test]
fn quit_drops_pipelined_commands_behind_it() {
    let mut h = Harness::ready(config());
    let text = h.send("NOOP\r\nQUIT\r\nNOOP\r\nMAIL FROM:<a@b.example>\r\n");
    let l = lines(&text);
    assert_eq!(l.len(), 2, "{text:?}");
    assert!(l[1].starts_with("221 "));
    assert_eq!(h.closes, 1);
}

#[test]
fn starttls_and_auth_refused_where_not_available() {
    // No TLS configured and no plaintext AUTH allowed: STARTTLS is not implemented here and
    // AUTH needs encryption (RFC 4954 §6: 538).
    let mut h = Harness::ready(config());
    h.cmd("STARTTLS", "502 ");
    h.cmd("AUTH PLAIN AGphbmUAc2VjcmV0", "538 5.7.11");
}

// ----------------------------------------------------------------------------------------------
// Oversized DATA (S4)
// ----------------------------------------------------------------------------------------------

fn lines_of(n: usize, prefix: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..n {
        v.extend_from_slice(format!("{prefix} line {i:04} 0123456789abcdefghijklmnopqrstuvwxyz\r\n").as_bytes());
    }
    v
}

#[test]
fn oversized_data_is_read_to_its_end_then_552() {
    let mut h = Harness::ready(config_with(|c| c.max_message_size = 1000));
    h.start_data("a@b.example", &["jane@example.test"]);
    let mut wire = b"Subject: big\r\n\r\n".to_vec();
    wire.extend_from_slice(&lines_of(100, "body"));
    // Command-looking lines inside the body are data, not commands.
    wire.extend_from_slice(b"RSET\r\nQUIT\r\n");
    wire.extend_from_slice(&lines_of(20, "tail"));
    for chunk in wire.chunks(64) {
        assert_eq!(h.send(chunk), "", "no reply before the end of DATA");
        assert_eq!(h.session.phase(), Phase::Data);
        assert!(!h.session.is_closed());
    }
    assert!(h.enqueues.is_empty());
    let text = h.send(".\r\n");
    assert!(text.starts_with("552 5.3.4"), "{text:?}");
    assert_eq!(lines(&text).len(), 1);
    assert!(h.enqueues.is_empty());
    assert_eq!(h.aborts, 1);
    let tail = h.since_begin();
    assert_eq!(tail[tail.len() - 2..], [Seen::Abort, Seen::Reply(552)]);
    assert!(h.body.len() <= 1000, "stored {} bytes beyond the limit", h.body.len());
    // The session goes on.
    assert!(!h.session.is_closed());
    assert_eq!(h.session.phase(), Phase::Command);
    h.cmd("RSET", "250 ");
    h.cmd("RCPT TO:<jane@example.test>", "503 5.5.1");
    h.start_data("a@b.example", &["jane@example.test"]);
    h.send("Subject: small\r\n\r\nok\r\n.\r\n");
    assert_eq!(h.enqueues.len(), 1);
}

#[test]
fn message_size_limit_boundary() {
    // Exactly max_message_size decoded bytes are accepted, one more is refused.
    let body = |n: usize| {
        let mut v = vec![b'a'; n - 2];
        v.extend_from_slice(b"\r\n");
        v
    };
    let mut h = Harness::ready(config_with(|c| c.max_message_size = 300));
    h.start_data("a@b.example", &["jane@example.test"]);
    let mut wire = body(300);
    wire.extend_from_slice(b".\r\n");
    assert_eq!(h.send(&wire), "");
    assert_eq!(h.enqueues.len(), 1);
    assert_eq!(h.body.len(), 300);
    h.enqueue_done(Ok("Q".into()));

    h.start_data("a@b.example", &["jane@example.test"]);
    let mut wire = body(301);
    wire.extend_from_slice(b".\r\n");
    assert!(h.send_chunks(&wire, 1).starts_with("552 5.3.4"));
    assert_eq!(h.enqueues.len(), 1);
    assert_eq!(h.aborts, 1);
}

// ----------------------------------------------------------------------------------------------
// Loop protection (S7)
// ----------------------------------------------------------------------------------------------

fn with_received(n: usize, extra_body: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..n {
        v.extend_from_slice(format!("Received: from hop{i}.example by relay; Mon, 1 Jan 2024 00:00:00 +0000\r\n").as_bytes());
    }
    v.extend_from_slice(b"Subject: loop\r\n\r\nbody\r\n");
    v.extend_from_slice(extra_body.as_bytes());
    v.extend_from_slice(b".\r\n");
    v
}

#[test]
fn more_than_max_hops_received_headers_is_554() {
    for size in [usize::MAX, 1] {
        let mut h = Harness::ready(config_with(|c| c.max_hops = 5));
        h.start_data("a@b.example", &["jane@example.test"]);
        let wire = with_received(6, "");
        let text = h.send_chunks(&wire, size.min(wire.len()));
        assert!(text.starts_with("554 5.4.6"), "{text:?}");
        assert!(h.enqueues.is_empty());
        assert_eq!(h.aborts, 1);
        assert!(!h.session.is_closed());
        h.cmd("RCPT TO:<jane@example.test>", "503 5.5.1");
    }
}

#[test]
fn exactly_max_hops_received_headers_is_accepted() {
    let mut h = Harness::ready(config_with(|c| c.max_hops = 5));
    h.start_data("a@b.example", &["jane@example.test"]);
    assert_eq!(h.send(with_received(5, "")), "");
    assert_eq!(h.enqueues.len(), 1);
    assert_eq!(h.aborts, 0);
}

#[test]
fn received_lines_in_the_body_do_not_count() {
    let mut h = Harness::ready(config_with(|c| c.max_hops = 2));
    h.start_data("a@b.example", &["jane@example.test"]);
    let body = "Received: quoted 1\r\nReceived: quoted 2\r\nReceived: quoted 3\r\n";
    assert_eq!(h.send(with_received(2, body)), "");
    assert_eq!(h.enqueues.len(), 1);
}

#[test]
fn received_header_names_are_case_insensitive() {
    let mut h = Harness::ready(config_with(|c| c.max_hops = 1));
    h.start_data("a@b.example", &["jane@example.test"]);
    let text = h.send("received: a\r\nRECEIVED: b\r\n\r\nbody\r\n.\r\n");
    assert!(text.starts_with("554 5.4.6"), "{text:?}");
}

// ----------------------------------------------------------------------------------------------
// Error limit (S4: "After 20 errors in a session: 421 and close")
// ----------------------------------------------------------------------------------------------

#[test]
fn twenty_errors_give_421_and_close() {
    let mut h = Harness::ready(config());
    for i in 0..19 {
        h.cmd("FOO", "500 5.5.2");
        assert!(!h.session.is_closed(), "closed after {} errors", i + 1);
    }
    let text = h.cmd("FOO", "500 5.5.2");
    let l = lines(&text);
    assert_eq!(l.len(), 2, "{text:?}");
    assert!(l[1].starts_with("421 "), "{text:?}");
    assert!(h.session.is_closed());
    assert_eq!(h.trace.last(), Some(&Seen::Close));
    assert!(h.session.handle(Event::Bytes(b"NOOP\r\n")).is_empty());
}

#[test]
fn error_limit_in_one_pipelined_burst() {
    let mut h = Harness::ready(config());
    let text = h.send("FOO\r\n".repeat(30));
    let l = lines(&text);
    assert_eq!(l.iter().filter(|x| x.starts_with("500 ")).count(), 20, "{text:?}");
    assert_eq!(l.last().map(|x| &x[..4]), Some("421 "));
    assert_eq!(h.closes, 1);
}

#[test]
fn all_kinds_of_errors_count() {
    let mut h = Harness::connected(config_with(|c| c.max_errors = 4));
    h.cmd("MAIL FROM:<a@b.example>", "503 5.5.1"); // 1
    h.cmd("EHLO client.example", "250-");
    h.cmd("MAIL FROM:a@b.example", "501 5.1.7"); // 2
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    h.cmd("RCPT TO:<stranger@elsewhere.example>", "550 5.7.1"); // 3
    assert!(!h.session.is_closed());
    let text = h.cmd("DATA", "503 5.5.1"); // 4
    assert!(lines(&text)[1].starts_with("421 "), "{text:?}");
    assert!(h.session.is_closed());
}

#[test]
fn successful_commands_do_not_count() {
    let mut h = Harness::ready(config_with(|c| c.max_errors = 2));
    for _ in 0..50 {
        h.cmd("NOOP", "250 ");
        h.cmd("VRFY jane@example.test", "252 ");
    }
    h.cmd("FOO", "500 ");
    assert!(!h.session.is_closed());
}

// ----------------------------------------------------------------------------------------------
// Timeouts (S4)
// ----------------------------------------------------------------------------------------------

#[test]
fn timeout_in_command_phase_is_421_and_close() {
    let mut h = Harness::ready(config());
    let text = h.event(Event::Timeout);
    assert!(text.starts_with("421 4.4.2"), "{text:?}");
    assert_eq!(lines(&text).len(), 1);
    assert_eq!(h.trace[h.trace.len() - 2..], [Seen::Reply(421), Seen::Close]);
    assert_eq!(h.aborts, 0);
    assert!(h.session.is_closed());
}

#[test]
fn timeout_in_data_aborts_the_message() {
    let mut h = Harness::ready(config());
    h.start_data("a@b.example", &["jane@example.test"]);
    h.send("Subject: slow\r\n\r\nhalf a mess");
    let text = h.event(Event::Timeout);
    assert!(text.starts_with("421 4.4.2"), "{text:?}");
    assert_eq!(h.aborts, 1);
    assert_eq!(h.closes, 1);
    assert!(h.enqueues.is_empty());
    assert!(h.session.is_closed());
    assert!(h.session.handle(Event::Bytes(b"age\r\n.\r\n")).is_empty());
}

#[test]
fn timeout_while_rcpt_check_pending() {
    let mut h = Harness::ready(config());
    h.auto_rcpt = false;
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    assert_eq!(h.send("RCPT TO:<jane@example.test>\r\n"), "");
    assert!(h.event(Event::Timeout).starts_with("421 4.4.2"));
    assert_eq!(h.rcpt_checked(RcptVerdict::Accept), "");
    assert_eq!(h.closes, 1);
}

#[test]
fn partial_command_does_not_count_as_progress() {
    // S4: a trickle of bytes cannot extend the per-command deadline.
    let mut h = Harness::ready(config());
    let start = h.session.progress();
    for b in b"NOO".chunks(1) {
        h.send(b);
        assert_eq!(h.session.progress(), start);
    }
    h.send("P\r\n");
    assert!(h.session.progress() > start);
    let after_noop = h.session.progress();
    h.start_data("a@b.example", &["jane@example.test"]);
    let in_data = h.session.progress();
    assert!(in_data > after_noop);
    h.send_chunks("Subject: t\r\n\r\nslow body\r\n", 1);
    assert_eq!(h.session.progress(), in_data, "body bytes are not commands");
    assert_eq!(h.session.phase(), Phase::Data);
    h.send(".\r\n");
    assert!(h.session.progress() > in_data);
}

// ----------------------------------------------------------------------------------------------
// RSET / HELO / EHLO reset the transaction (RFC 5321 §4.1.1.5, §4.1.4)
// ----------------------------------------------------------------------------------------------

#[test]
fn rset_resets_the_transaction() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    h.cmd("RCPT TO:<jane@example.test>", "250 2.1.5");
    h.cmd("RSET", "250 ");
    h.cmd("RCPT TO:<jane@example.test>", "503 5.5.1");
    h.cmd("DATA", "503 5.5.1");
    h.cmd("MAIL FROM:<c@d.example>", "250 2.1.0");
    h.cmd("RCPT TO:<sam@example.test>", "250 2.1.5");
    h.cmd("DATA", "354 ");
    h.send(".\r\n");
    assert_eq!(h.enqueues[0].mail_from, "c@d.example");
    assert_eq!(h.enqueues[0].recipients, vec!["sam@example.test".to_string()]);
}

#[test]
fn ehlo_and_helo_reset_the_transaction() {
    for greet in ["EHLO again.example", "HELO again.example"] {
        let mut h = Harness::ready(config());
        h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
        h.cmd("RCPT TO:<jane@example.test>", "250 2.1.5");
        h.cmd(greet, "250");
        h.cmd("RCPT TO:<jane@example.test>", "503 5.5.1");
        h.cmd("DATA", "503 5.5.1");
        h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
        assert_eq!(h.session.helo().map(|(n, _)| n), Some("again.example"));
    }
}

// ----------------------------------------------------------------------------------------------
// Envelope and BeginData
// ----------------------------------------------------------------------------------------------

#[test]
fn envelope_records_sender_and_recipients_in_order() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:<Sender@Example.ORG> BODY=8BITMIME", "250 2.1.0");
    h.cmd("RCPT TO:<sam@example.test>", "250 2.1.5");
    h.cmd("RCPT TO:<stranger@elsewhere.example>", "550 5.7.1");
    h.cmd("RCPT TO:<jane@example.test>", "250 2.1.5");
    h.cmd("RCPT TO:<PostMaster>", "250 2.1.5"); // S3: postmaster without a domain
    h.cmd("DATA", "354 ");
    assert_eq!(h.begins, vec![(HELO.to_string(), true, None)]);
    h.send("Subject: env\r\n\r\nx\r\n.\r\n");
    let env = &h.enqueues[0];
    assert_eq!(env.mail_from, "Sender@Example.ORG");
    assert_eq!(env.recipients, vec!["sam@example.test", "jane@example.test", "PostMaster"]);
    assert_eq!(env.client_ip, IP);
    assert_eq!(env.helo, HELO);
    assert_eq!(env.origin, mail_framework::Origin::Smtp);
}

#[test]
fn null_sender_is_empty_string() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:<>", "250 2.1.0");
    h.cmd("RCPT TO:<jane@example.test>", "250 2.1.5");
    h.cmd("DATA", "354 ");
    h.send(".\r\n");
    assert_eq!(h.enqueues[0].mail_from, "");
}

#[test]
fn begin_data_single_rcpt() {
    let mut h = Harness::ready(config());
    h.start_data("a@b.example", &["jane@example.test"]);
    assert_eq!(h.begins[0], (HELO.to_string(), true, Some("jane@example.test".to_string())));
    h.send(".\r\n");
    h.enqueue_done(Ok("Q".into()));
    h.start_data("a@b.example", &["jane@example.test", "sam@example.test"]);
    assert_eq!(h.begins[1], (HELO.to_string(), true, None));
    assert_eq!(h.trace.last(), Some(&Seen::Begin));
}

#[test]
fn begin_data_single_rcpt_ignores_refused_recipients() {
    let mut h = Harness::ready(config());
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    h.cmd("RCPT TO:<stranger@elsewhere.example>", "550 5.7.1");
    h.cmd("RCPT TO:<jane@example.test>", "250 2.1.5");
    h.cmd("DATA", "354 ");
    assert_eq!(h.begins[0].2.as_deref(), Some("jane@example.test"));
}

// ----------------------------------------------------------------------------------------------
// No panic on random input
// ----------------------------------------------------------------------------------------------

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const FUZZ_PIECES: &[&[u8]] = &[
    b"EHLO x.example\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<a@b.example> SIZE=100\r\n",
    b"RCPT TO:<jane@example.test>\r\n",
    b"RCPT TO:<c@d.example>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY x\r\n",
    b"\r\n.\r\n",
    b"Received: x\r\n",
    b"..",
    b"\r\n",
    b"\n.\n",
    b"\r.\r\n",
    b"MAIL",
    b"RCPT TO:<",
    b"<>",
    b"@",
];

#[derive(Default)]
struct FuzzState {
    closed: bool,
    in_data: bool,
    body: u64,
    enqueue_pending: bool,
    rcpt_pending: bool,
}

fn fuzz_pump(s: &mut Session, cfg: &SessionConfig, event: Event<'_>, rng: &mut XorShift, st: &mut FuzzState) {
    let from_commit = matches!(event, Event::EnqueueDone(_));
    let mut actions = s.handle(event);
    loop {
        if st.closed {
            assert!(actions.is_empty(), "actions after Close: {actions:?}");
            return;
        }
        let mut next = None;
        for a in actions {
            assert!(!st.closed, "action after Close: {a:?}");
            match a {
                Action::Reply(r) => {
                    assert!((200..600).contains(&r.code), "{r:?}");
                    let text = r.to_string();
                    assert!(text.ends_with("\r\n"));
                    assert!(!(r.code == 250 && text.contains("queued")) || from_commit, "250 before commit");
                }
                Action::CheckHelo(_) => {
                    assert!(!st.rcpt_pending && !st.enqueue_pending && !st.in_data);
                    let verdict = rng.chance(80).then_some(()).map_or(Some(Reply::new(550, (7, 1), "No")), |_| None);
                    next = Some(Event::HeloChecked(verdict));
                }
                Action::Penalize | Action::AddHeaders { .. } => {}
                Action::Etrn(_) => next = Some(Event::EtrnDone(Reply::plain(251, "OK"))),
                Action::CheckSpf(_) => {
                    assert!(!st.rcpt_pending && !st.enqueue_pending && !st.in_data);
                    next = Some(Event::SpfChecked(rng.chance(20).then(|| Reply::new(550, (7, 23), "SPF validation failed"))));
                }
                Action::StartTls => next = Some(Event::TlsUp),
                Action::VerifyPassword { .. } => {
                    let outcome = if rng.chance(50) { AuthOutcome::Ok("sam".into()) } else { AuthOutcome::Failed };
                    next = Some(Event::AuthDone(outcome));
                }
                Action::CheckRcpt(_) => {
                    assert!(!st.rcpt_pending && !st.enqueue_pending && !st.in_data);
                    let verdict = if rng.chance(85) { RcptVerdict::Accept } else { RcptVerdict::Refuse(Reply::new(550, (1, 1), "No such user")) };
                    next = Some(Event::RcptChecked(verdict));
                }
                Action::BeginData { .. } => {
                    assert!(!st.in_data && !st.enqueue_pending);
                    st.in_data = true;
                    st.body = 0;
                }
                Action::BodyChunk(b) => {
                    assert!(st.in_data);
                    st.body += b.len() as u64;
                    assert!(st.body <= cfg.max_message_size, "stored beyond the size limit");
                }
                Action::Enqueue(env) => {
                    assert!(st.in_data);
                    assert!(!env.recipients.is_empty() && env.recipients.len() <= cfg.max_recipients);
                    st.in_data = false;
                    st.enqueue_pending = true;
                }
                Action::AbortData => {
                    assert!(st.in_data);
                    st.in_data = false;
                }
                Action::Close => st.closed = true,
            }
        }
        st.rcpt_pending = next.is_some();
        match next {
            Some(ev) => {
                st.rcpt_pending = false;
                actions = s.handle(ev);
            }
            None => break,
        }
    }
    assert_eq!(s.is_closed(), st.closed);
}

#[test]
fn random_input_never_panics() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..4000 {
        let cfg = SessionConfig {
            hostname: HOST.into(),
            max_message_size: 20 + rng.below(400) as u64,
            max_recipients: 1 + rng.below(4),
            vrfy: rng.chance(50),
            line_endings: if rng.chance(50) { LineEndings::Strict } else { LineEndings::NormaliseBareLf },
            max_hops: rng.below(3),
            max_errors: 1 + rng.below(40) as u32,
            verify_helo: rng.chance(30),
            starttls: rng.chance(50),
            tls_active: false,
            allow_plaintext_auth: rng.chance(50),
            require_auth: rng.chance(20),
            dsn: rng.chance(50),
            etrn: rng.chance(50),
        };
        let mut s = Session::new(cfg.clone(), IP.into());
        if rng.chance(30) {
            s = s.with_spf_at_mail();
        }
        let mut st = FuzzState::default();
        fuzz_pump(&mut s, &cfg, Event::Connected, &mut rng, &mut st);

        let mut input = Vec::new();
        if rng.chance(80) {
            input.extend_from_slice(b"EHLO fuzz.example\r\n");
        }
        // Most runs open a transaction, so the random part lands in DATA as often as not.
        if rng.chance(70) {
            input.extend_from_slice(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<jane@example.test>\r\nDATA\r\n");
        }
        let len = rng.below(600);
        while input.len() < len {
            match rng.below(10) {
                0..=3 => input.extend_from_slice(FUZZ_PIECES[rng.below(FUZZ_PIECES.len())]),
                4 => input.push(b'\r'),
                5 => input.push(b'\n'),
                6 => input.push(b'.'),
                7 => input.push(rng.below(256) as u8),
                _ => input.push(b' ' + rng.below(95) as u8),
            }
        }
        let mut at = 0;
        while at < input.len() {
            let n = 1 + rng.below(64).min(input.len() - at - 1);
            fuzz_pump(&mut s, &cfg, Event::Bytes(&input[at..at + n]), &mut rng, &mut st);
            at += n;
            if st.enqueue_pending && rng.chance(60) {
                st.enqueue_pending = false;
                let event = match rng.below(10) {
                    0 => Event::EnqueueDone(Err("fail".to_string())),
                    1 => Event::DataRefused(Reply::new(550, (7, 1), "DMARC")),
                    _ => Event::EnqueueDone(Ok("QFUZZ".to_string())),
                };
                fuzz_pump(&mut s, &cfg, event, &mut rng, &mut st);
            }
        }
        if st.enqueue_pending {
            st.enqueue_pending = false;
            fuzz_pump(&mut s, &cfg, Event::EnqueueDone(Ok("QEND".into())), &mut rng, &mut st);
        }
        if rng.chance(30) {
            fuzz_pump(&mut s, &cfg, Event::Timeout, &mut rng, &mut st);
            assert!(s.is_closed());
        }
    }
}

// ---- policy hooks: R8 kill list, R9 hack auto-deny, R10 HELO verification ----------------

#[test]
fn over_long_command_line_asks_for_a_penalty() {
    // R9: the driver decides whether the client is exempt; the session only reports it.
    let mut h = Harness::connected(config());
    h.send(format!("NOOP {}\r\n", "x".repeat(600)));
    assert_eq!(h.penalties, 1);
    h.send(format!("MAIL FROM:<{}@example.test>\r\n", "y".repeat(3000)));
    assert_eq!(h.penalties, 2);
}

#[test]
fn helo_waits_for_verification_when_enabled() {
    let mut s = Session::new(config_with(|c| c.verify_helo = true), IP.into());
    s.handle(Event::Connected);
    let actions = s.handle(Event::Bytes(b"EHLO liar.example\r\nNOOP\r\n"));
    assert_eq!(actions, vec![Action::CheckHelo("liar.example".into())], "nothing answered before the check");
    let actions = s.handle(Event::HeloChecked(Some(Reply::new(550, (7, 1), "Helo command rejected"))));
    assert!(is_reply(&actions[0], 550) && is_reply(&actions[1], 250), "{actions:?}");
    // Refused: no HELO recorded, so MAIL needs one first.
    let actions = s.handle(Event::Bytes(b"MAIL FROM:<a@b.example>\r\n"));
    assert!(is_reply(&actions[0], 503), "{actions:?}");
}

#[test]
fn sender_check_refuses_mail_from() {
    let check: crate::session::SenderCheck =
        Box::new(|from, _user| from.filter(|a| a.domain_lower() == "spam.example").map(|_| Reply::new(501, (7, 1), "Unacceptable mail address")));
    let mut s = Session::new(config(), IP.into()).with_sender_check(check);
    s.handle(Event::Connected);
    let text: String = s
        .handle(Event::Bytes(b"EHLO c.example\r\nMAIL FROM:<x@spam.example>\r\nRCPT TO:<sam@example.test>\r\nMAIL FROM:<>\r\n"))
        .iter()
        .filter_map(|a| if let Action::Reply(r) = a { Some(r.to_string()) } else { None })
        .collect();
    assert!(text.contains("501 5.7.1 Unacceptable mail address"), "{text}");
    assert!(text.contains("503 5.5.1 Error: need MAIL command"), "no transaction after a refused sender: {text}");
    assert!(text.ends_with("250 2.1.0 Ok\r\n"), "the null sender passes: {text}");
}

// ---- STARTTLS and AUTH (RFC 3207, RFC 4954; SPEC S2, A1, A2, S3) ------------------------

fn b64(s: &str) -> String {
    mail_proto::sasl::encode(s.as_bytes())
}

#[test]
fn starttls_discards_pipelined_plaintext_and_resets_state() {
    let mut h = Harness::connected(config_with(|c| c.starttls = true));
    let text = h.send("EHLO c.example\r\n");
    assert!(text.contains("250-STARTTLS") || text.contains("250 STARTTLS"), "{text}");
    // RFC 3207 §4.2: a command injected behind STARTTLS in the same packet is never run.
    let text = h.send("STARTTLS\r\nMAIL FROM:<evil@example.test>\r\n");
    assert_eq!(text, "220 2.0.0 Ready to start TLS\r\n");
    assert_eq!(h.tls_starts, 1);
    let text = h.send("MAIL FROM:<a@b.example>\r\n");
    assert!(text.starts_with("503"), "HELO forgotten after the handshake: {text}");
    let text = h.send("EHLO c.example\r\n");
    assert!(!text.contains("STARTTLS"), "not offered twice: {text}");
    assert!(h.send("STARTTLS\r\n").starts_with("503"));
}

#[test]
fn auth_is_offered_and_usable_only_where_credentials_may_be_sent() {
    let mut h = Harness::connected(config_with(|c| c.starttls = true));
    let text = h.send("EHLO c.example\r\n");
    assert!(!text.contains("AUTH"), "{text}");
    assert!(h.send(format!("AUTH PLAIN {}\r\n", b64("\0sam\0good"))).starts_with("538 5.7.11"));
    h.send("STARTTLS\r\n");
    assert!(h.send("EHLO c.example\r\n").contains("AUTH PLAIN LOGIN"));
    assert!(h.send(format!("AUTH PLAIN {}\r\n", b64("\0sam\0good"))).starts_with("235 2.7.0"));
    assert!(h.send("AUTH PLAIN\r\n").starts_with("503"), "AUTH twice");
}

#[test]
fn auth_plain_login_and_failures() {
    let mut h = Harness::connected(config_with(|c| c.allow_plaintext_auth = true));
    h.send("EHLO c.example\r\n");
    assert!(h.send("AUTH PLAIN\r\n").starts_with("334 "));
    assert!(h.send(format!("{}\r\n", b64("\0sam\0bad"))).starts_with("535 5.7.8"));
    assert_eq!(h.send("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(h.send(format!("{}\r\n", b64("sam"))), "334 UGFzc3dvcmQ6\r\n");
    assert!(h.send("*\r\n").starts_with("501"));
    assert!(h.send("AUTH CRAM-MD5\r\n").starts_with("504 5.5.4"));
    assert!(h.send("AUTH PLAIN !!notbase64\r\n").starts_with("501"));
    // A SASL response may be longer than a command line (12,288 octets).
    h.send("AUTH PLAIN\r\n");
    let long = b64(&format!("\0sam\0{}", "g".repeat(5000)));
    assert!(h.send(format!("{long}\r\n")).starts_with("535"), "long response read whole");
    assert_eq!(h.penalties, 0);
    assert!(h.send(format!("AUTH LOGIN {}\r\n", b64("sam"))).starts_with("334 UGFzc3dvcmQ6"));
    assert!(h.send(format!("{}\r\n", b64("good"))).starts_with("235"));
}

#[test]
fn submission_requires_auth_for_mail_and_adds_missing_headers() {
    let mut h = Harness::connected(config_with(|c| {
        c.allow_plaintext_auth = true;
        c.require_auth = true;
    }));
    h.local = vec!["sam@example.test".into()];
    h.send("EHLO c.example\r\n");
    assert!(h.send("MAIL FROM:<sam@example.test>\r\n").starts_with("530 5.7.0"));
    h.send(format!("AUTH PLAIN {}\r\n", b64("\0sam\0good")));
    h.send("MAIL FROM:<sam@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n");
    assert_eq!(h.begins.last().unwrap().0, "c.example");
    h.send("Subject: no id\r\n\r\nbody\r\n.\r\n");
    assert_eq!(h.added_headers, vec![(true, true)]);
    h.event(Event::EnqueueDone(Ok("Q".into())));
    h.send("MAIL FROM:<sam@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n");
    h.send("Message-ID: <x@y>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n.\r\n");
    assert_eq!(h.added_headers.len(), 1, "nothing added when both are present");
}

/// S3, issue 12 defect 8: the fields are decided when the header section ends, while DATA
/// streams, and come before the body, so they are added however large the message is (the
/// queue writes its first chunk long before the end); however the input is split.
#[test]
fn submitted_mail_gets_missing_headers_at_the_end_of_its_header_section_while_streaming() {
    let big_body: Vec<u8> = (0..12_000).flat_map(|i| format!("line {i:06} of the body, long enough to add up\r\n").into_bytes()).collect();
    // What is sent up to the body, the header fields before the insertion point, what is added.
    type Case = (&'static [u8], &'static [u8], Vec<(bool, bool)>);
    let cases: [Case; 4] = [
        (
            b"Subject: big\r\nX-Folded: a\r\n\tDate: not a field\r\n\r\n",
            b"Subject: big\r\nX-Folded: a\r\n\tDate: not a field\r\n",
            vec![(true, true)],
        ),
        (b"message-id: <m@c>\r\nSubject: big\r\n\r\n", b"message-id: <m@c>\r\nSubject: big\r\n", vec![(false, true)]),
        (
            b"Message-ID: <m@c>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n",
            b"Message-ID: <m@c>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n",
            vec![],
        ),
        // No body at all: at the end of the data.
        (b"Subject: only headers\r\n", b"Subject: only headers\r\n", vec![(true, true)]),
    ];
    for (head, fields, added) in cases {
        let body: &[u8] = if head.ends_with(b"\r\n\r\n") { &big_body } else { b"" };
        let sent = [head, body].concat();
        let mut want = fields.to_vec();
        if let Some(&(message_id, date)) = added.first() {
            want.extend_from_slice(submission_headers(message_id, date, "Q", HOST, 0).as_bytes());
        }
        want.extend_from_slice(&sent[fields.len()..]);
        for size in [1, 2, 3, 5, 16, 1000, 65_536, sent.len() + 5] {
            if size == 1 && body.len() > 1000 {
                continue; // byte by byte through the header section is covered by size 2 and 3
            }
            let mut h = Harness::connected(config_with(|c| {
                c.allow_plaintext_auth = true;
                c.max_message_size = 10_000_000;
            }));
            h.send("EHLO c.example\r\n");
            h.send(format!("AUTH PLAIN {}\r\n", b64("\0sam\0good")));
            h.send("MAIL FROM:<sam@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n");
            h.send_chunks(&sent, size);
            if !body.is_empty() {
                assert!(h.message.len() > want.len() / 2, "the message streams on after its header section (pieces of {size})");
            }
            assert!(h.enqueues.is_empty());
            h.send(".\r\n");
            assert_eq!(h.enqueues.len(), 1);
            assert_eq!(h.added_headers, added, "pieces of {size}");
            assert!(h.message == want, "pieces of {size}: {:?}", String::from_utf8_lossy(&h.message[..want.len().min(200)]));
            assert_eq!(h.body, sent, "the client's bytes are passed on unchanged");
        }
    }
}

#[test]
fn unauthenticated_mail_is_not_held_back_nor_given_headers() {
    let mut h = Harness::ready(config());
    h.send("MAIL FROM:<jane@remote.example>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n");
    h.send("Subject: x\r\n");
    assert_eq!(h.body, b"Subject: x\r\n", "streamed at once");
    h.send("\r\nbody\r\n.\r\n");
    assert!(h.added_headers.is_empty());
    assert_eq!(h.message, b"Subject: x\r\n\r\nbody\r\n");
}

/// Found by the smtp_session fuzz target: an over-long line that is also the last allowed
/// error must still ask for the penalty, before the session closes (R9).
#[test]
fn penalty_comes_before_close_on_the_last_error() {
    for input in [format!("x\r\nx\r\nNOOP {}\r\n", "a".repeat(600)), "x\r\nx\r\n".to_string() + &"a".repeat(2100)] {
        let mut s = Session::new(config_with(|c| c.max_errors = 3), IP.into());
        s.handle(Event::Connected);
        let actions = s.handle(Event::Bytes(input.as_bytes()));
        let penalize = actions.iter().position(|a| *a == Action::Penalize).expect("penalized");
        let close = actions.iter().position(|a| *a == Action::Close).expect("closed after 3 errors");
        assert!(penalize < close, "{actions:?}");
    }
}

// ----------------------------------------------------------------------------------------------
// HELP lists what this session accepts now (issue 14, S1)
// ----------------------------------------------------------------------------------------------

/// The commands HELP names.
fn help_commands(h: &mut Harness) -> Vec<String> {
    let text = h.cmd("HELP", "214 2.0.0 Commands: ");
    text.trim_end().trim_start_matches("214 2.0.0 Commands: ").split(' ').map(str::to_string).collect()
}

#[test]
fn help_lists_the_commands_this_session_accepts() {
    let basic = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "HELP"];
    // VRFY off, no ETRN domains, no TLS, no AUTH: the basic set only.
    let mut h = Harness::ready(config_with(|c| c.vrfy = false));
    assert_eq!(help_commands(&mut h), basic);
    // Everything offered: VRFY, ETRN, STARTTLS before TLS, AUTH where credentials may be sent.
    let mut h = Harness::ready(config_with(|c| {
        c.etrn = true;
        c.starttls = true;
        c.allow_plaintext_auth = true;
    }));
    let all = help_commands(&mut h);
    assert_eq!(all[..basic.len()], basic);
    assert_eq!(all[basic.len()..], ["VRFY", "ETRN", "STARTTLS", "AUTH"]);
    // HELP before EHLO says the same.
    let mut h = Harness::connected(config_with(|c| c.starttls = true));
    assert!(help_commands(&mut h).contains(&"STARTTLS".to_string()));
    // AUTH only under TLS here; STARTTLS gone once TLS is up; AUTH gone once authenticated.
    let mut h = Harness::ready(config_with(|c| c.starttls = true));
    assert!(!help_commands(&mut h).contains(&"AUTH".to_string()));
    h.cmd("STARTTLS", "220 ");
    let after_tls = help_commands(&mut h);
    assert!(!after_tls.contains(&"STARTTLS".to_string()) && after_tls.contains(&"AUTH".to_string()), "{after_tls:?}");
    h.cmd("EHLO c.example", "250-");
    h.cmd(&format!("AUTH PLAIN {}", b64("\0sam\0good")), "235 ");
    assert!(!help_commands(&mut h).contains(&"AUTH".to_string()));
    // STARTTLS is not offered on a connection that is TLS from the start.
    let mut h = Harness::ready(config_with(|c| {
        c.starttls = true;
        c.tls_active = true;
    }));
    assert_eq!(help_commands(&mut h)[basic.len()..], ["VRFY", "AUTH"]);
}

// ----------------------------------------------------------------------------------------------
// RFC 4954 §5: the AUTH parameter of MAIL FROM (issue 14)
// ----------------------------------------------------------------------------------------------

#[test]
fn auth_parameter_is_accepted_and_trusted_only_after_auth() {
    let authed = |h: &mut Harness| {
        h.cmd(&format!("AUTH PLAIN {}", b64("\0sam\0good")), "235 ");
    };
    let submitter_of = |h: &mut Harness, mail: &str| {
        h.cmd(mail, "250 2.1.0");
        h.cmd("RCPT TO:<jane@example.test>", "250 ");
        h.cmd("DATA", "354 ");
        h.send("Subject: s\r\n\r\nbody\r\n.\r\n");
        h.enqueue_done(Ok("Q".into()));
        h.enqueues.last().expect("enqueued").auth_sender.clone()
    };
    let cfg = || config_with(|c| c.allow_plaintext_auth = true);

    // After AUTH: AUTH=<> and AUTH=mailbox are accepted (issue 14: it was 555).
    let mut h = Harness::ready(cfg());
    authed(&mut h);
    assert_eq!(submitter_of(&mut h, "MAIL FROM:<sam@example.test> AUTH=<>"), None, "AUTH=<>: not known");
    assert_eq!(submitter_of(&mut h, "MAIL FROM:<sam@example.test> AUTH=sam@example.test").as_deref(), Some("sam@example.test"));
    assert_eq!(submitter_of(&mut h, "MAIL FROM:<x@example.test> auth=e+3Dmc2@example.test").as_deref(), Some("e=mc2@example.test"));
    // Bad values and a second AUTH= are syntax errors.
    for bad in ["AUTH=sam", "AUTH=<sam@example.test>", "AUTH=a+ZZ@b.test", "AUTH", "AUTH=<> AUTH=<>"] {
        h.cmd(&format!("MAIL FROM:<sam@example.test> {bad}"), "501 5.5.4");
    }

    // Unauthenticated: accepted, never trusted.
    let mut h = Harness::ready(cfg());
    assert_eq!(submitter_of(&mut h, "MAIL FROM:<x@y.test> AUTH=x@y.test"), None);
    assert_eq!(submitter_of(&mut h, "MAIL FROM:<x@y.test>"), None);

    // The server's check decides whom an authenticated user may name.
    let check: crate::session::SubmitterCheck = Box::new(|user, claimed, from| {
        assert_eq!(user, "sam");
        match claimed {
            Some(Some(a)) if a.key() == "sam@example.test" => Some(a.to_string()),
            Some(_) => None,
            None => from.map(|f| format!("own:{f}")),
        }
    });
    let mut h = Harness::new(cfg());
    h.session = Session::new(cfg(), IP.into()).with_submitter_check(check);
    h.event(Event::Connected);
    h.cmd("EHLO c.example", "250-");
    authed(&mut h);
    assert_eq!(submitter_of(&mut h, "MAIL FROM:<sam@example.test> AUTH=kim@example.test"), None);
    assert_eq!(submitter_of(&mut h, "MAIL FROM:<sam@example.test> AUTH=sam@example.test").as_deref(), Some("sam@example.test"));
    assert_eq!(submitter_of(&mut h, "MAIL FROM:<sam@example.test>").as_deref(), Some("own:sam@example.test"));

    // HELO sessions take no parameters at all.
    let mut h = Harness::connected(cfg());
    h.cmd("HELO c.example", "250 ");
    h.cmd("MAIL FROM:<x@y.test> AUTH=<>", "555 ");
}

/// E1: with SPF at MAIL FROM, an unauthenticated client's MAIL waits for `CheckSpf` (and is
/// refused with its reply); an authenticated client is not asked about.
#[test]
fn spf_at_mail_from_waits_for_its_verdict() {
    let mut h = Harness::ready(config());
    h.session = std::mem::replace(&mut h.session, Session::new(config(), IP.into())).with_spf_at_mail();
    h.spf_verdict = Some(Reply::new(550, (7, 23), "SPF validation failed"));
    h.cmd("MAIL FROM:<boss@office.test>", "550 5.7.23");
    assert_eq!(h.spf_checks, vec![Some(Address::parse("boss@office.test").unwrap())]);
    h.cmd("RCPT TO:<sam@example.test>", "503 5.5.1");
    h.spf_verdict = None;
    h.cmd("MAIL FROM:<>", "250 2.1.0");
    assert_eq!(h.spf_checks.last(), Some(&None));
    h.cmd("RCPT TO:<sam@example.test>", "250 2.1.5");
    // Pipelined: the RCPT waits behind the SPF check and is answered after it.
    let mut h = Harness::ready(config());
    h.session = std::mem::replace(&mut h.session, Session::new(config(), IP.into())).with_spf_at_mail();
    assert!(h.event(Event::Bytes(b"EHLO c.test\r\n")).starts_with("250"));
    let out = h.session.handle(Event::Bytes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<sam@example.test>\r\n"));
    assert!(matches!(out.as_slice(), [Action::CheckSpf(Some(_))]), "{out:?}");
    let out = h.session.handle(Event::SpfChecked(None));
    assert!(matches!(out.as_slice(), [Action::Reply(r), Action::CheckRcpt(_)] if r.code == 250), "{out:?}");
}

/// E1: a message the checks refuse gets their reply in place of the 250, and the transaction
/// ends as after any other answer to DATA.
#[test]
fn a_refused_message_gets_the_checks_reply() {
    let mut h = Harness::ready(config());
    h.start_data("boss@office.test", &["sam@example.test"]);
    h.send("Subject: x\r\n\r\nbody\r\n.\r\n");
    assert_eq!(h.enqueues.len(), 1);
    let text = h.event(Event::DataRefused(Reply::new(550, (7, 1), "Message rejected")));
    assert_eq!(text, "550 5.7.1 Message rejected\r\n");
    h.cmd("RCPT TO:<sam@example.test>", "503 5.5.1");
    h.cmd("MAIL FROM:<jane@example.test>", "250 2.1.0");
    // Not waiting for a commit: ignored.
    assert_eq!(h.event(Event::DataRefused(Reply::new(451, (7, 1), "later"))), "");
}

// ----------------------------------------------------------------------------------------------
// CHUNKING: BDAT (RFC 3030, issue 20)
// ----------------------------------------------------------------------------------------------

/// MAIL and RCPT accepted, ready for BDAT.
fn bdat_ready(config: SessionConfig) -> Harness {
    let mut h = Harness::ready(config);
    h.cmd("MAIL FROM:<a@b.example>", "250 2.1.0");
    h.cmd("RCPT TO:<jane@example.test>", "250 2.1.5");
    h
}

#[test]
fn ehlo_offers_chunking_but_not_binarymime() {
    let mut h = Harness::connected(config());
    let text = h.cmd("EHLO client.example", "250-");
    assert!(lines(&text).contains(&"250-CHUNKING"), "{text:?}");
    assert!(!text.contains("BINARYMIME"), "{text:?}");
}

#[test]
fn bdat_last_is_one_message_and_250_only_after_enqueue_done() {
    let msg = b"Subject: hi\r\n\r\n.leading dot\r\n.\r\nQUIT\r\n";
    let mut h = bdat_ready(config());
    let text = h.send([format!("BDAT {} LAST\r\n", msg.len()).as_bytes(), msg].concat());
    assert_eq!(text, "", "no reply before the commit");
    assert_eq!(h.body, msg, "the octets as sent: no unstuffing, no end-of-data line");
    assert_eq!(h.count(&Seen::Begin), 1);
    assert_eq!(h.enqueues.len(), 1);
    assert_eq!(h.enqueues[0].recipients, ["jane@example.test"]);
    assert_eq!(h.session.phase(), Phase::Command);
    assert!(h.enqueue_done(Ok("Q1".into())).starts_with("250 2.0.0 Ok: queued as Q1"));
    h.cmd("QUIT", "221");
}

#[test]
fn several_chunks_in_any_split_make_one_message() {
    let wire = b"BDAT 10\r\nSubject: xBDAT 10\r\n\r\n\r\nbody\r\nBDAT 0 LAST\r\nNOOP\r\n";
    for size in [1, 2, 3, 7, wire.len()] {
        let mut h = bdat_ready(config());
        let text = h.send_chunks(wire, size);
        assert_eq!(lines(&text), ["250 2.0.0 10 octets received", "250 2.0.0 10 octets received"], "split {size}");
        assert_eq!(h.body, b"Subject: x\r\n\r\nbody\r\n", "split {size}");
        assert_eq!(h.enqueues.len(), 1);
        let text = h.enqueue_done(Ok("Q2".into()));
        assert_eq!(lines(&text).len(), 2, "the pipelined NOOP answered after the commit: {text:?}");
    }
}

#[test]
fn chunk_phase_while_octets_are_owed() {
    let mut h = bdat_ready(config());
    assert_eq!(h.send("BDAT 5\r\nab"), "");
    assert_eq!(h.session.phase(), Phase::Chunk);
    assert_eq!(h.send("cde"), "250 2.0.0 5 octets received\r\n");
    assert_eq!(h.session.phase(), Phase::Command, "between chunks");
    // A client that stops mid-chunk: the driver's deadline sends Timeout.
    h.send("BDAT 5 LAST\r\nxy");
    let text = h.event(Event::Timeout);
    assert!(text.starts_with("421 4.4.2"), "{text:?}");
    assert_eq!((h.aborts, h.closes, h.enqueues.len()), (1, 1, 0));
}

#[test]
fn bdat_0_last_alone_is_an_empty_message() {
    let mut h = bdat_ready(config());
    assert_eq!(h.send("BDAT 0 LAST\r\n"), "");
    assert_eq!(h.enqueues.len(), 1);
    assert!(h.body.is_empty());
}

#[test]
fn bdat_without_transaction_is_503_and_its_octets_are_never_commands() {
    let mut h = Harness::ready(config());
    let text = h.send("BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(lines(&text), ["503 5.5.1 Error: need MAIL command", "250 2.0.0 Ok"]);
    assert_eq!(h.closes, 0);
    h.cmd("MAIL FROM:<a@b.example>", "250");
    h.cmd("BDAT 4 LAST\r\nRSET", "503 5.5.1 Error: need RCPT command");
    assert_eq!((h.count(&Seen::Begin), h.enqueues.len()), (0, 0));
}

#[test]
fn bad_bdat_size_is_501_and_hangs_up() {
    for bad in ["BDAT", "BDAT x", "BDAT -1", "BDAT 5 NOTLAST", "BDAT 99999999999999999999999"] {
        let mut h = bdat_ready(config());
        let text = h.send(format!("{bad}\r\nNOOP\r\n"));
        assert!(text.starts_with("501 5.5.4"), "{bad}: {text:?}");
        assert_eq!(lines(&text).len(), 1, "nothing after it runs: {text:?}");
        assert_eq!(h.closes, 1, "{bad}");
    }
}

#[test]
fn bdat_then_data_is_503_and_rset_drops_the_message() {
    let mut h = bdat_ready(config());
    h.cmd("BDAT 3\r\nabc", "250 2.0.0 3 octets received");
    h.cmd("DATA", "503 5.5.1");
    h.cmd("RSET", "250");
    assert_eq!((h.aborts, h.enqueues.len()), (1, 0));
    // A fresh transaction may use DATA.
    h.start_data("a@b.example", &["jane@example.test"]);
    h.send("x\r\n.\r\n");
    assert_eq!(h.enqueues.len(), 1);
}

#[test]
fn size_limit_counts_across_chunks_and_the_rest_is_read_and_refused() {
    let mut h = bdat_ready(config_with(|c| c.max_message_size = 100));
    let sixty = "x".repeat(58) + "\r\n";
    let wire = format!("BDAT 60\r\n{sixty}BDAT 60\r\n{sixty}BDAT 60 LAST\r\n{sixty}NOOP\r\n");
    let text = h.send(wire);
    assert_eq!(
        lines(&text),
        ["250 2.0.0 60 octets received", "552 5.3.4 Message size exceeds fixed limit", "552 5.3.4 Message size exceeds fixed limit", "250 2.0.0 Ok"]
    );
    assert_eq!((h.aborts, h.enqueues.len(), h.closes), (1, 0, 0));
    // The transaction is over: the next one starts afresh.
    h.cmd("MAIL FROM:<a@b.example>", "250");
}

#[test]
fn size_limit_on_the_last_chunk_is_552() {
    let mut h = bdat_ready(config_with(|c| c.max_message_size = 10));
    h.cmd("BDAT 20 LAST\r\n01234567890123456789", "552 5.3.4");
    assert_eq!((h.aborts, h.enqueues.len()), (1, 0));
}

#[test]
fn bdat_strict_mode_refuses_bare_line_endings_without_hanging_up() {
    for content in [&b"a\nb\r\n"[..], b"a\rb\r\n", b"a\r\n.\nMAIL FROM:<x@y>\r\n", b"ab\r"] {
        let mut h = bdat_ready(config());
        let wire = [format!("BDAT {} LAST\r\n", content.len()).as_bytes(), content, b"NOOP\r\n"].concat();
        let text = h.send(&wire);
        assert_eq!(lines(&text), ["550 5.6.0 Error: bare <CR> or <LF> in message content", "250 2.0.0 Ok"], "{content:?}");
        assert_eq!((h.aborts, h.enqueues.len(), h.closes), (1, 0, 0));
    }
    // Not the last chunk: the rest of the transaction's chunks are read and refused.
    let mut h = bdat_ready(config());
    let text = h.send("BDAT 2\r\na\nBDAT 3 LAST\r\nb\r\nNOOP\r\n");
    assert_eq!(lines(&text).iter().map(|l| &l[..3]).collect::<Vec<_>>(), ["550", "550", "250"]);
}

#[test]
fn bdat_normalise_mode_rewrites_bare_line_endings_and_crlf_may_span_chunks() {
    let mut h = bdat_ready(config_with(|c| c.line_endings = LineEndings::NormaliseBareLf));
    h.send("BDAT 6\r\na\nb\rc\rBDAT 3 LAST\r\n\nde");
    assert_eq!(h.body, b"a\r\nb\r\nc\r\nde\r\n");
    let mut h = bdat_ready(config());
    h.send("BDAT 2\r\na\rBDAT 1 LAST\r\n\n");
    assert_eq!((h.body.as_slice(), h.enqueues.len()), (&b"a\r\n"[..], 1));
}

#[test]
fn bdat_hop_limit_and_submission_headers_as_for_data() {
    let mut h = bdat_ready(config_with(|c| c.max_hops = 1));
    let text = h.send("BDAT 31 LAST\r\nReceived: a\r\nReceived: b\r\n\r\nx\r\n");
    assert_eq!(lines(&text), ["554 5.4.6 Too many hops: mail loop detected"]);
    let mut h = Harness::ready(config_with(|c| c.allow_plaintext_auth = true));
    h.cmd("AUTH PLAIN AHNhbQBnb29k", "235");
    h.cmd("MAIL FROM:<sam@example.test>", "250");
    h.cmd("RCPT TO:<jane@example.test>", "250");
    h.send("BDAT 11\r\nSubject: hiBDAT 8 LAST\r\n\r\n\r\nbody");
    assert_eq!(h.added_headers, [(true, true)]);
    assert!(h.message.starts_with(b"Subject: hi\r\nMessage-ID: <Q@"), "{:?}", String::from_utf8_lossy(&h.message));
    assert!(h.message.ends_with(b"\r\n\r\nbody\r\n"));
}
