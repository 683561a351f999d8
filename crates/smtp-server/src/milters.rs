//! Issue 21: the milters of a listener, run at the end of DATA/BDAT on the held message, each
//! seeing it as the previous one changed it (see the design note of the `milter` crate).

use mail_proto::Reply;
use milter::client::{self, Milter};
use milter::wire::proto;
use milter::{Message, Recipient, SmtpReply, Verdict};

/// `[milter]`: the milters of each kind of listener, in the order they run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Milters {
    /// The MX listener.
    pub mx: Vec<Milter>,
    /// Submission, implicit TLS and the local socket of `postroom sendmail`.
    pub submission: Vec<Milter>,
}

/// How a run of milters ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Every milter let the message through (perhaps changed).
    Pass,
    /// Into the quarantine for this reason; the changes so far apply.
    Quarantine(String),
    /// Say 250, store nothing.
    Discard,
    /// The reply that takes the place of 250; nothing is stored.
    Refuse(Reply),
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Run {
    pub end: End,
    /// The message as the milters left it (headers, body, recipients).
    pub message: Message,
    /// A header field or the body was changed: the stored bytes are rebuilt from `message`.
    pub content_changed: bool,
    /// One journal detail per milter that ran: its name, verdict, reply and changes.
    pub journal: Vec<String>,
}

/// Runs `message` past each of `milters` in turn; the first that does not pass ends the run.
pub async fn run(milters: &[Milter], mut message: Message, limit: usize) -> Run {
    let mut journal = Vec::new();
    let mut content_changed = false;
    for m in milters {
        let checked = client::check(m, message.clone(), limit).await;
        let mut notes = Vec::new();
        if let Some(outcome) = &checked.outcome {
            let leadspc = outcome.negotiated.as_ref().is_some_and(|n| n.protocol & proto::HDR_LEADSPC != 0);
            let mods = &outcome.modifications;
            let keeps = matches!(checked.verdict, Verdict::Accept | Verdict::Continue | Verdict::Quarantine(_));
            if keeps {
                if !mods.headers.is_empty() {
                    mods.apply_headers(&mut message.headers, leadspc);
                    content_changed = true;
                    notes.push(format!("{} header change(s)", mods.headers.len()));
                }
                if let Some(body) = &mods.body {
                    message.body = body.clone();
                    content_changed = true;
                    notes.push("body replaced".to_string());
                }
                for (address, _) in &outcome.rejected_recipients {
                    message.recipients.retain(|r| !r.address.eq_ignore_ascii_case(address));
                }
                for (address, reply) in &outcome.rejected_recipients {
                    notes.push(format!("recipient {address} refused ({})", reply.text));
                }
                for address in &mods.delete_recipients {
                    message.recipients.retain(|r| !r.address.eq_ignore_ascii_case(address));
                    notes.push(format!("recipient {address} removed"));
                }
                for (address, params) in &mods.add_recipients {
                    if !message.recipients.iter().any(|r| r.address.eq_ignore_ascii_case(address)) {
                        let params = params.iter().flat_map(|p| p.split_whitespace().map(str::to_string)).collect();
                        message.recipients.push(Recipient { address: address.clone(), params });
                    }
                    notes.push(format!("recipient {address} added"));
                }
            }
        }
        let what = match (&checked.verdict, &checked.outcome) {
            (v, Some(o)) => format!("{} at {:?}", describe(v), o.stage),
            (v, None) => format!("{} (default action: {})", describe(v), checked.failure.as_deref().unwrap_or("failed")),
        };
        let notes = if notes.is_empty() { String::new() } else { format!("; {}", notes.join(", ")) };
        journal.push(format!("milter {}: {what}{notes}", m.name));
        let end = match checked.verdict {
            Verdict::Accept | Verdict::Continue if message.recipients.is_empty() => {
                Some(End::Refuse(Reply::new(554, (5, 0), "No recipients left after content filtering")))
            }
            Verdict::Accept | Verdict::Continue => None,
            Verdict::Quarantine(reason) => Some(End::Quarantine(format!("milter {}: {reason}", m.name))),
            Verdict::Discard => Some(End::Discard),
            Verdict::Reject(r) | Verdict::Tempfail(r) => Some(End::Refuse(reply(&r))),
        };
        if let Some(end) = end {
            return Run { end, message, content_changed, journal };
        }
    }
    Run { end: End::Pass, message, content_changed, journal }
}

fn describe(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Continue => "continue".into(),
        Verdict::Reject(r) => format!("reject \"{}\"", r.text),
        Verdict::Tempfail(r) => format!("tempfail \"{}\"", r.text),
        Verdict::Discard => "discard".into(),
        Verdict::Quarantine(reason) => format!("quarantine \"{reason}\""),
    }
}

/// A milter's reply text (`550 5.7.1 Blocked`, perhaps several lines, each with its code) as
/// the SMTP reply to send.
pub fn reply(r: &SmtpReply) -> Reply {
    let lines = r.text.split('\n').map(|l| l.trim_end_matches('\r')).map(|l| l.get(4..).unwrap_or("").to_string()).collect();
    Reply::multiline(r.code, lines)
}

/// The message split into header fields (name, the value after the colon with its CRLF
/// folding) and body. Lines before the blank line that are neither fields nor continuations
/// are kept as fields with an empty name, so nothing is lost when the header is rebuilt.
pub fn split(message: &[u8]) -> (Vec<(String, String)>, Vec<u8>) {
    let (head, body) = match find(message, b"\r\n\r\n") {
        Some(i) => (&message[..i], message[i + 4..].to_vec()),
        None if message.starts_with(b"\r\n") => (&message[..0], message[2..].to_vec()),
        None => (message, Vec::new()),
    };
    let head = String::from_utf8_lossy(head);
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        match (line.starts_with([' ', '\t']), headers.last_mut(), line.split_once(':')) {
            (true, Some((_, value)), _) => {
                value.push_str("\r\n");
                value.push_str(line);
            }
            (false, _, Some((name, value))) if !name.is_empty() && !name.contains([' ', '\t']) => headers.push((name.to_string(), value.to_string())),
            _ => headers.push((String::new(), line.to_string())),
        }
    }
    (headers, body)
}

/// Header fields and body back into a message, CRLF line ends; `extra` (a whole field with its
/// CRLF, e.g. our Received) goes before the field at index `at`.
pub fn join(headers: &[(String, String)], body: &[u8], extra: &str, at: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (name, value)) in headers.iter().enumerate() {
        if i == at {
            out.extend_from_slice(extra.as_bytes());
        }
        if !name.is_empty() {
            out.extend_from_slice(name.as_bytes());
            out.push(b':');
        }
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if at >= headers.len() {
        out.extend_from_slice(extra.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join_round_trip() {
        let m = b"From: a@b\r\nSubject: one\r\n two\r\n\r\nBody\r\n\r\nmore\r\n";
        let (h, b) = split(m);
        assert_eq!(h, [("From".to_string(), " a@b".to_string()), ("Subject".to_string(), " one\r\n two".to_string())]);
        assert_eq!(b, b"Body\r\n\r\nmore\r\n");
        assert_eq!(join(&h, &b, "", 0), m);
        assert_eq!(join(&h, &b, "Received: x\r\n", 1), b"From: a@b\r\nReceived: x\r\nSubject: one\r\n two\r\n\r\nBody\r\n\r\nmore\r\n");
        assert_eq!(join(&h, &b, "R: x\r\n", 9), b"From: a@b\r\nSubject: one\r\n two\r\nR: x\r\n\r\nBody\r\n\r\nmore\r\n");
        let (h, b) = split(b"\r\nno header\r\n");
        assert!(h.is_empty());
        assert_eq!(b, b"no header\r\n");
    }

    #[test]
    fn replies() {
        let r = reply(&SmtpReply { code: 550, text: "550 5.7.1 Blocked by SpamAssassin".into() });
        assert_eq!(r.to_string(), "550 5.7.1 Blocked by SpamAssassin\r\n");
        let r = reply(&SmtpReply { code: 451, text: "451-4.7.1 one\r\n451 4.7.1 two".into() });
        assert_eq!(r.to_string(), "451-4.7.1 one\r\n451 4.7.1 two\r\n");
    }
}
