//! The POP3 session state machine fed arbitrary client bytes.
//!
//! Input layout: byte 0 picks the configuration (plaintext auth, STLS offered, implicit TLS,
//! error limits), byte 1 where the rest is split; the rest is fed as `Connected`, then
//! `Bytes` in two pieces. Every `Login` is answered `LoginOutcome::Ok` with two messages,
//! every `Update` with `UpdateDone(true)`, every `StartTls` with `TlsUp`, as the driver would.
//!
//! Checked besides "no panic": nothing follows `Close`; at most one action that waits for an
//! answer per step (the session must not ask twice before it is answered); every reply is
//! whole CRLF lines with no bare CR or LF (a client must not be able to inject a line).
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use pop3_server::session::{Action, Event, LoginOutcome, MaildropMessage, Session, SessionConfig};

fn messages() -> Vec<MaildropMessage> {
    vec![
        MaildropMessage { id: 11, size: 120, uidl: "uid-one".into() },
        MaildropMessage { id: 12, size: 4096, uidl: "uid two\r\n.".into() },
    ]
}

enum Answer {
    Login,
    Update,
    Tls,
}

fn check_reply(bytes: &[u8]) {
    assert!(bytes.ends_with(b"\r\n"), "reply without CRLF: {:?}", String::from_utf8_lossy(bytes));
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR in reply {:?}", String::from_utf8_lossy(bytes)),
            b'\n' => assert!(i > 0 && bytes[i - 1] == b'\r', "bare LF in reply {:?}", String::from_utf8_lossy(bytes)),
            _ => {}
        }
    }
}

/// Check one step's actions; queue the answers the driver would give.
fn step(actions: Vec<Action>, answers: &mut VecDeque<Answer>, closed: &mut bool) {
    let mut waiting = 0;
    for action in actions {
        assert!(!*closed, "action {action:?} after Close");
        match action {
            Action::Reply(bytes) => check_reply(&bytes),
            Action::Login { .. } => {
                waiting += 1;
                answers.push_back(Answer::Login);
            }
            Action::Update { .. } => {
                waiting += 1;
                answers.push_back(Answer::Update);
            }
            Action::StartTls => {
                waiting += 1;
                answers.push_back(Answer::Tls);
            }
            Action::SendMessage { id, .. } => assert!(id == 11 || id == 12, "unknown message {id}"),
            Action::Close => *closed = true,
        }
    }
    assert!(waiting <= 1, "{waiting} actions waiting for an answer in one step");
}

fn feed(session: &mut Session, event: Event<'_>, closed: &mut bool) {
    let mut answers = VecDeque::new();
    step(session.handle(event), &mut answers, closed);
    while let Some(answer) = answers.pop_front() {
        let event = match answer {
            Answer::Login => Event::LoginDone(LoginOutcome::Ok { messages: messages() }),
            Answer::Update => Event::UpdateDone(true),
            Answer::Tls => Event::TlsUp,
        };
        step(session.handle(event), &mut answers, closed);
    }
    if *closed {
        assert!(session.is_closed());
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, split, rest @ ..] = data else { return };
    let config = SessionConfig {
        hostname: "pop.example.test".into(),
        allow_plaintext_auth: flags & 1 != 0,
        stls_available: flags & 2 != 0,
        tls_active: flags & 4 != 0,
        max_failed_logins: u32::from(flags >> 3 & 3),
        max_errors: if flags & 0x20 != 0 { 3 } else { 100 },
    };
    let mut session = Session::new(config);
    let mut closed = false;
    let split = *split as usize % (rest.len() + 1);
    let (a, b) = rest.split_at(split);
    if flags & 0x40 != 0 {
        // Input that arrives before Connected is answered after the greeting.
        feed(&mut session, Event::Bytes(a), &mut closed);
        feed(&mut session, Event::Connected, &mut closed);
    } else {
        feed(&mut session, Event::Connected, &mut closed);
        feed(&mut session, Event::Bytes(a), &mut closed);
    }
    feed(&mut session, Event::Bytes(b), &mut closed);
    let end = if flags & 0x80 != 0 { Event::Timeout } else { Event::Eof };
    feed(&mut session, end, &mut closed);
    assert!(session.is_closed());
});
