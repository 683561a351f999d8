//! Delivery status reports (RFC 3464, RFC 3462 multipart/report): failure reports from the
//! non-delivery snap-in, and — when a client asked with RFC 3461 NOTIFY — delay and success
//! reports. This module only builds the text; `reports` queues it.

use mail_proto::date::rfc5322;

/// What happened to a recipient (RFC 3464 §2.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    /// Handed to a host that does not offer DSN: no further reports will come.
    Relayed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }
}

/// One recipient's block of a report.
#[derive(Clone, Debug)]
pub struct ReportEntry {
    pub recipient: String,
    /// ORCPT of RFC 3461 (`rfc822;addr`), reported as Original-Recipient.
    pub orcpt: Option<String>,
    pub action: Action,
    /// Enhanced status code, e.g. "5.1.1".
    pub status: String,
    /// What happened, e.g. the remote server's reply.
    pub diagnostic: String,
    /// The host whose reply this was, reported as `Remote-MTA: dns; HOST` (RFC 3464 §2.3.5);
    /// `None` when no remote host was involved.
    pub remote_mta: Option<String>,
}

/// The part of the original message a report returns (RFC 3461 RET).
pub enum Attachment<'a> {
    /// text/rfc822-headers.
    Headers(&'a [u8]),
    /// message/rfc822: the whole message.
    Full(&'a [u8]),
}

/// What the report says about the original message.
pub struct Original<'a> {
    pub qid: &'a str,
    pub sender: &'a str,
    pub arrived: i64,
    /// ENVID of RFC 3461, reported as Original-Envelope-Id.
    pub envid: Option<&'a str>,
    pub attachment: Attachment<'a>,
}

/// The enhanced status of a reply text ("550 5.1.1 unknown" → "5.1.1", "5.1.2 no such domain"
/// → "5.1.2"), or the generic one its class implies.
pub fn status_of(reply: &str) -> String {
    let is_status = |w: &&str| w.split('.').count() == 3 && w.split('.').all(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    let words: Vec<&str> = reply.split_whitespace().take(2).collect();
    if let Some(status) = words.iter().find(|w| is_status(w)) {
        return status.to_string();
    }
    match reply.trim_start().as_bytes().first() {
        Some(b'4') => "4.0.0".into(),
        Some(b'2') => "2.0.0".into(),
        _ => "5.0.0".into(),
    }
}

/// The whole report message, CRLF line ends. `to` is the original sender; `reply_to` the DSN
/// responsible person, if one is configured.
/// `report_id` (the report's own queue id) makes its Message-ID unique.
pub fn report(
    hostname: &str,
    to: &str,
    reply_to: Option<&str>,
    report_id: &str,
    original: &Original<'_>,
    entries: &[ReportEntry],
    now: i64,
) -> Vec<u8> {
    let boundary = format!("{}/{}", original.qid, hostname);
    let failed = entries.iter().any(|e| e.action == Action::Failed);
    let delayed = entries.iter().any(|e| e.action == Action::Delayed);
    let subject = match (failed, delayed) {
        (true, _) => "Undelivered Mail Returned to Sender",
        (false, true) => "Delayed Mail (still being retried)",
        _ => "Successful Mail Delivery Report",
    };
    let mut m = String::new();
    let mut line = |s: &str| {
        m.push_str(s);
        m.push_str("\r\n");
    };
    line(&format!("From: Mail Delivery System <MAILER-DAEMON@{hostname}>"));
    line(&format!("To: <{to}>"));
    if let Some(r) = reply_to {
        line(&format!("Reply-To: <{r}>"));
    }
    line(&format!("Subject: {subject}"));
    line(&format!("Date: {}", rfc5322(now)));
    line(&format!("Message-ID: <{report_id}.report@{hostname}>"));
    line("Auto-Submitted: auto-replied");
    line("MIME-Version: 1.0");
    line(&format!("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""));
    line("");
    line("This is a MIME-encapsulated message.");
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: text/plain; charset=us-ascii");
    line("");
    line(&format!("This is the mail system at host {hostname}."));
    line("");
    line(match (failed, delayed) {
        (true, _) => "Your message could not be delivered to one or more recipients.",
        (false, true) => "Your message has not been delivered yet; it will be tried again. Nothing needs doing.",
        _ => "Your message was delivered as you asked to be told.",
    });
    line("The details are below; your message, or its headers, is attached.");
    line("");
    for e in entries {
        line(&format!("<{}>: {}", e.recipient, one_line(&e.diagnostic)));
    }
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: message/delivery-status");
    line("");
    line(&format!("Reporting-MTA: dns; {hostname}"));
    if let Some(envid) = original.envid {
        line(&format!("Original-Envelope-Id: {}", one_line(envid)));
    }
    line(&format!("X-Postroom-Queue-ID: {}", original.qid));
    line(&format!("Arrival-Date: {}", rfc5322(original.arrived)));
    for e in entries {
        line("");
        if let Some(orcpt) = &e.orcpt {
            line(&format!("Original-Recipient: {}", one_line(orcpt)));
        }
        line(&format!("Final-Recipient: rfc822; {}", e.recipient));
        line(&format!("Action: {}", e.action.as_str()));
        line(&format!("Status: {}", e.status));
        if let Some(host) = e.remote_mta.as_deref().filter(|h| !h.is_empty()) {
            line(&format!("Remote-MTA: dns; {}", one_line(host)));
        }
        line(&format!("Diagnostic-Code: smtp; {}", one_line(&e.diagnostic)));
    }
    line("");
    line(&format!("--{boundary}"));
    let (kind, bytes) = match original.attachment {
        Attachment::Headers(h) => ("text/rfc822-headers", h),
        Attachment::Full(b) => ("message/rfc822", b),
    };
    line(&format!("Content-Type: {kind}"));
    line("");
    let mut out = m.into_bytes();
    out.extend_from_slice(bytes);
    if !bytes.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// Header text must not carry line breaks of its own.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect()
}

/// The header section at the start of `body` (up to the empty line), at most `max` bytes.
pub fn header_section(body: &[u8], max: usize) -> &[u8] {
    let end = body.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 2).unwrap_or(body.len());
    &body[..end.min(max)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_reply() {
        assert_eq!(status_of("550 5.1.1 User unknown"), "5.1.1");
        assert_eq!(status_of("554 no such thing"), "5.0.0");
        assert_eq!(status_of("5.1.2 domain does not exist"), "5.1.2");
        assert_eq!(status_of("452 4.2.2 mailbox full (retries exhausted)"), "4.2.2");
        assert_eq!(status_of("421 try later"), "4.0.0");
    }

    fn failure(rcpt: &str, status: &str, diagnostic: &str) -> ReportEntry {
        ReportEntry {
            recipient: rcpt.into(),
            orcpt: None,
            action: Action::Failed,
            status: status.into(),
            diagnostic: diagnostic.into(),
            remote_mta: None,
        }
    }

    #[test]
    fn report_is_multipart_report_with_one_block_per_recipient() {
        let headers = b"From: sam@example.test\r\nSubject: hi\r\n";
        let mut second = failure("y@remote.example", "5.4.7", "retries exhausted");
        second.orcpt = Some("rfc822;Y@Remote.Example".into());
        second.remote_mta = Some("mx1.remote.example".into());
        let entries = vec![failure("x@remote.example", "5.1.1", "550 5.1.1 no\r\nsuch"), second];
        let original = Original { qid: "Q1", sender: "sam@example.test", arrived: 0, envid: Some("job-7"), attachment: Attachment::Headers(headers) };
        let r = String::from_utf8(report("mail.example.test", "sam@example.test", Some("admin@example.test"), "R1", &original, &entries, 0)).unwrap();
        assert!(r.contains("report-type=delivery-status"));
        assert!(r.contains("Auto-Submitted: auto-replied") && r.contains("Reply-To: <admin@example.test>"));
        assert!(r.contains("Original-Envelope-Id: job-7") && r.contains("Message-ID: <R1.report@mail.example.test>"));
        assert!(
            r.contains("Final-Recipient: rfc822; x@remote.example\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 no  such")
        );
        assert!(r.contains("Original-Recipient: rfc822;Y@Remote.Example\r\nFinal-Recipient: rfc822; y@remote.example"));
        // RFC 3464 §2.3.5: the host that answered, between Status and Diagnostic-Code; none where
        // no remote host was involved.
        assert!(r.contains("Status: 5.4.7\r\nRemote-MTA: dns; mx1.remote.example\r\nDiagnostic-Code: smtp; retries exhausted\r\n"));
        assert_eq!(r.matches("Remote-MTA:").count(), 1);
        assert!(r.contains("Content-Type: text/rfc822-headers\r\n\r\nFrom: sam@example.test"));
        let bytes = r.as_bytes();
        assert!(bytes.iter().enumerate().all(|(i, &b)| b != b'\n' || (i > 0 && bytes[i - 1] == b'\r')), "CRLF only");
        assert!(r.ends_with("--Q1/mail.example.test--\r\n"));
    }

    #[test]
    fn success_report_with_the_full_message() {
        let original =
            Original { qid: "Q2", sender: "s@x.test", arrived: 0, envid: None, attachment: Attachment::Full(b"Subject: s\r\n\r\nbody\r\n") };
        let entry = ReportEntry { action: Action::Relayed, ..failure("r@x.test", "2.0.0", "relayed to a host without DSN") };
        let r = String::from_utf8(report("h.test", "s@x.test", None, "R2", &original, &[entry], 0)).unwrap();
        assert!(r.contains("Subject: Successful Mail Delivery Report") && r.contains("Action: relayed"));
        assert!(r.contains("Content-Type: message/rfc822\r\n\r\nSubject: s\r\n\r\nbody\r\n"));
        assert!(!r.contains("Reply-To"));
    }

    #[test]
    fn header_section_stops_at_the_empty_line() {
        assert_eq!(header_section(b"A: 1\r\nB: 2\r\n\r\nbody", 1000), b"A: 1\r\nB: 2\r\n");
        assert_eq!(header_section(b"A: 1\r\nB: 2\r\n\r\nbody", 5), b"A: 1\r");
    }
}
