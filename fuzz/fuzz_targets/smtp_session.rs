//! The inbound SMTP session state machine fed arbitrary client bytes.
//!
//! Input layout: byte 0 picks the configuration (line endings, HELO verification, STARTTLS,
//! implicit TLS, plaintext AUTH, AUTH required, DSN, error limit), byte 1 where the rest is
//! split; the rest is fed as `Connected`, then `Bytes` in two pieces. The driver's answers:
//! CheckRcpt -> Accept, CheckHelo -> None, VerifyPassword -> AuthDone(Ok), StartTls -> TlsUp,
//! Enqueue -> EnqueueDone(Ok), Etrn -> EtrnDone(Reply::plain(251, "ok")).
//!
//! Checked besides "no panic": nothing follows `Close`; at most one action that waits for an
//! answer per step; every reply renders as whole CRLF lines with no bare CR or LF; message
//! bytes (`BodyChunk`) come only between `BeginData` and `Enqueue`/`AbortData`, hold no bare
//! CR or LF and end in CRLF when enqueued; `Enqueue` has at least one recipient.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use mail_proto::{LineEndings, Reply};
use smtp_server::session::{Action, AuthOutcome, Event, RcptVerdict, Session, SessionConfig};

enum Answer {
    Rcpt,
    Helo,
    Password,
    Tls,
    Enqueue,
    Etrn,
    Spf,
}

#[derive(Default)]
struct Seen {
    closed: bool,
    in_data: bool,
    /// The last byte of message data seen, to check CRLF pairs across chunks.
    last_body_byte: Option<u8>,
}

fn check_crlf(bytes: &[u8], before: Option<u8>, what: &str) {
    for (i, &b) in bytes.iter().enumerate() {
        let prev = if i == 0 { before } else { Some(bytes[i - 1]) };
        match b {
            b'\n' => assert_eq!(prev, Some(b'\r'), "bare LF in {what}: {:?}", String::from_utf8_lossy(bytes)),
            _ => assert_ne!(prev, Some(b'\r'), "bare CR in {what}: {:?}", String::from_utf8_lossy(bytes)),
        }
    }
}

fn step(actions: Vec<Action>, answers: &mut VecDeque<Answer>, seen: &mut Seen) {
    let mut waiting = 0;
    for action in actions {
        assert!(!seen.closed, "action {action:?} after Close");
        let answer = match action {
            Action::Reply(reply) => {
                assert!((200..600).contains(&reply.code), "reply code {}", reply.code);
                let bytes = reply.to_bytes();
                assert!(bytes.ends_with(b"\r\n"));
                check_crlf(&bytes, None, "a reply");
                None
            }
            Action::CheckRcpt(_) => Some(Answer::Rcpt),
            Action::CheckHelo(_) => Some(Answer::Helo),
            Action::VerifyPassword { .. } => Some(Answer::Password),
            Action::StartTls => Some(Answer::Tls),
            Action::Etrn(_) => Some(Answer::Etrn),
            Action::CheckSpf(_) => Some(Answer::Spf),
            Action::Penalize => None,
            Action::BeginData { .. } => {
                assert!(!seen.in_data, "BeginData twice");
                seen.in_data = true;
                seen.last_body_byte = Some(b'\n');
                None
            }
            Action::AddHeaders { .. } => {
                assert!(seen.in_data, "AddHeaders outside DATA");
                None
            }
            Action::BodyChunk(bytes) => {
                assert!(seen.in_data, "BodyChunk outside DATA");
                assert!(!bytes.is_empty());
                check_crlf(&bytes, seen.last_body_byte, "message data");
                seen.last_body_byte = bytes.last().copied();
                None
            }
            Action::Enqueue(envelope) => {
                assert!(seen.in_data, "Enqueue outside DATA");
                assert!(!envelope.recipients.is_empty(), "Enqueue without recipients");
                assert_eq!(seen.last_body_byte, Some(b'\n'), "message enqueued without a final CRLF");
                seen.in_data = false;
                Some(Answer::Enqueue)
            }
            Action::AbortData => {
                assert!(seen.in_data, "AbortData outside DATA");
                seen.in_data = false;
                None
            }
            Action::Close => {
                seen.closed = true;
                None
            }
        };
        if let Some(answer) = answer {
            waiting += 1;
            answers.push_back(answer);
        }
    }
    assert!(waiting <= 1, "{waiting} actions waiting for an answer in one step");
}

fn feed(session: &mut Session, event: Event<'_>, seen: &mut Seen) {
    let mut answers = VecDeque::new();
    step(session.handle(event), &mut answers, seen);
    while let Some(answer) = answers.pop_front() {
        let event = match answer {
            Answer::Rcpt => Event::RcptChecked(RcptVerdict::Accept),
            Answer::Helo => Event::HeloChecked(None),
            Answer::Password => Event::AuthDone(AuthOutcome::Ok("sam@example.test".into())),
            Answer::Tls => Event::TlsUp,
            Answer::Enqueue => Event::EnqueueDone(Ok("Q1".into())),
            Answer::Etrn => Event::EtrnDone(Reply::plain(251, "ok")),
            Answer::Spf => Event::SpfChecked(None),
        };
        step(session.handle(event), &mut answers, seen);
    }
    if seen.closed {
        assert!(session.is_closed());
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, split, rest @ ..] = data else { return };
    let config = SessionConfig {
        hostname: "mx.example.test".into(),
        max_message_size: 2000,
        max_recipients: 3,
        vrfy: flags & 1 != 0,
        line_endings: if flags & 2 != 0 { LineEndings::NormaliseBareLf } else { LineEndings::Strict },
        max_hops: 2,
        max_errors: if flags & 0x80 != 0 { 3 } else { 50 },
        verify_helo: flags & 4 != 0,
        starttls: flags & 8 != 0,
        tls_active: flags & 0x10 != 0,
        allow_plaintext_auth: flags & 0x20 != 0,
        require_auth: flags & 0x40 != 0,
        dsn: flags & 1 != 0,
        etrn: flags & 2 != 0,
    };
    let mut session = Session::new(config, "192.0.2.7".into());
    let mut seen = Seen::default();
    let split = *split as usize % (rest.len() + 1);
    let (a, b) = rest.split_at(split);
    feed(&mut session, Event::Connected, &mut seen);
    feed(&mut session, Event::Bytes(a), &mut seen);
    feed(&mut session, Event::Bytes(b), &mut seen);
    feed(&mut session, Event::Timeout, &mut seen);
    assert!(session.is_closed());
});
