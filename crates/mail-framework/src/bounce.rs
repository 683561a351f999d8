//! Non-delivery reports (RFC 3464, RFC 3462 multipart/report): what the non-delivery snap-in
//! sends back to the sender of a message some recipients of which failed after acceptance.

use mail_proto::date::rfc5322;

/// One failed recipient.
#[derive(Clone, Debug)]
pub struct Failure {
    pub recipient: String,
    /// Enhanced status code, e.g. "5.1.1".
    pub status: String,
    /// What went wrong, e.g. the remote server's reply.
    pub diagnostic: String,
}

/// What the report says about the original message.
pub struct Original<'a> {
    pub qid: &'a str,
    pub sender: &'a str,
    pub arrived: i64,
    /// The original header section (CRLF lines), attached as text/rfc822-headers.
    pub headers: &'a [u8],
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
        _ => "5.0.0".into(),
    }
}

/// The whole report message, CRLF line ends. `to` is the original sender.
pub fn report(hostname: &str, to: &str, original: &Original<'_>, failures: &[Failure], now: i64) -> Vec<u8> {
    let boundary = format!("{}/{}", original.qid, hostname);
    let mut m = String::new();
    let mut line = |s: &str| {
        m.push_str(s);
        m.push_str("\r\n");
    };
    line(&format!("From: Mail Delivery System <MAILER-DAEMON@{hostname}>"));
    line(&format!("To: <{to}>"));
    line("Subject: Undelivered Mail Returned to Sender");
    line(&format!("Date: {}", rfc5322(now)));
    line(&format!("Message-ID: <{}.bounce@{hostname}>", original.qid));
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
    line("Your message could not be delivered to one or more recipients.");
    line("The details are below; the headers of your message are attached.");
    line("");
    for f in failures {
        line(&format!("<{}>: {}", f.recipient, one_line(&f.diagnostic)));
    }
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: message/delivery-status");
    line("");
    line(&format!("Reporting-MTA: dns; {hostname}"));
    line(&format!("X-Postroom-Queue-ID: {}", original.qid));
    line(&format!("Arrival-Date: {}", rfc5322(original.arrived)));
    for f in failures {
        line("");
        line(&format!("Final-Recipient: rfc822; {}", f.recipient));
        line("Action: failed");
        line(&format!("Status: {}", f.status));
        line(&format!("Diagnostic-Code: smtp; {}", one_line(&f.diagnostic)));
    }
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: text/rfc822-headers");
    line("");
    let mut out = m.into_bytes();
    out.extend_from_slice(original.headers);
    if !original.headers.ends_with(b"\r\n") {
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

    #[test]
    fn report_is_multipart_report_with_one_block_per_recipient() {
        let headers = b"From: sam@example.test\r\nSubject: hi\r\n";
        let failures = vec![
            Failure { recipient: "x@remote.example".into(), status: "5.1.1".into(), diagnostic: "550 5.1.1 no\r\nsuch".into() },
            Failure { recipient: "y@remote.example".into(), status: "5.4.7".into(), diagnostic: "retries exhausted".into() },
        ];
        let original = Original { qid: "Q1", sender: "sam@example.test", arrived: 0, headers };
        let r = String::from_utf8(report("mail.example.test", "sam@example.test", &original, &failures, 0)).unwrap();
        assert!(r.contains("report-type=delivery-status"));
        assert!(r.contains("Auto-Submitted: auto-replied"));
        assert!(r.contains("Final-Recipient: rfc822; x@remote.example\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 no  such"));
        assert!(r.contains("Status: 5.4.7"));
        assert!(r.contains("Subject: hi"));
        let bytes = r.as_bytes();
        assert!(bytes.iter().enumerate().all(|(i, &b)| b != b'\n' || (i > 0 && bytes[i - 1] == b'\r')), "CRLF only");
        assert!(r.ends_with("--Q1/mail.example.test--\r\n"));
    }

    #[test]
    fn header_section_stops_at_the_empty_line() {
        assert_eq!(header_section(b"A: 1\r\nB: 2\r\n\r\nbody", 1000), b"A: 1\r\nB: 2\r\n");
        assert_eq!(header_section(b"A: 1\r\nB: 2\r\n\r\nbody", 5), b"A: 1\r");
    }
}
