//! The Received header field the server prepends (RFC 5321 §4.4, SPEC S3).

/// What the Received header says about the session.
pub struct Trace<'a> {
    pub helo: &'a str,
    pub ip: &'a str,
    pub hostname: &'a str,
    pub esmtp: bool,
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384" when the session is encrypted.
    pub tls: Option<&'a str>,
    /// The authenticated user.
    pub auth: Option<&'a str>,
    pub qid: &'a str,
    /// Given only for a single recipient, so a Bcc list is not disclosed.
    pub single_rcpt: Option<&'a str>,
    pub now: i64,
}

/// `Received: from HELO ([IP]) (using TLS…) (authenticated sender: USER) by HOST (Postroom)
/// with ESMTPSA id QID for <RCPT>; DATE` — the protocol name per RFC 3848.
pub fn received_header(t: &Trace<'_>) -> String {
    let helo: String = t.helo.chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    let with = match (t.esmtp, t.tls.is_some(), t.auth.is_some()) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    };
    let tls = t.tls.map(|d| format!("\r\n\t(using {d})")).unwrap_or_default();
    let auth = t.auth.map(|u| format!("\r\n\t(authenticated sender: {u})")).unwrap_or_default();
    let rcpt = t.single_rcpt.map(|r| format!("\r\n\tfor <{r}>")).unwrap_or_default();
    format!(
        "Received: from {helo} ([{}]){tls}{auth}\r\n\tby {} (Postroom) with {with} id {}{rcpt};\r\n\t{}\r\n",
        t.ip,
        t.hostname,
        t.qid,
        mail_proto::date::rfc5322(t.now)
    )
}

/// Header fields added to submitted mail that lacks them (S3).
pub fn submission_headers(message_id: bool, date: bool, qid: &str, hostname: &str, now: i64) -> String {
    let mut out = String::new();
    if message_id {
        out.push_str(&format!("Message-ID: <{qid}@{hostname}>\r\n"));
    }
    if date {
        out.push_str(&format!("Date: {}\r\n", mail_proto::date::rfc5322(now)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> Trace<'static> {
        Trace {
            helo: "client.example",
            ip: "192.0.2.1",
            hostname: "mail.example.test",
            esmtp: true,
            tls: None,
            auth: None,
            qid: "ABC",
            single_rcpt: Some("sam@example.test"),
            now: 0,
        }
    }

    #[test]
    fn folded_and_complete() {
        assert_eq!(
            received_header(&trace()),
            "Received: from client.example ([192.0.2.1])\r\n\tby mail.example.test (Postroom) with ESMTP id ABC\r\n\tfor <sam@example.test>;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
    }

    #[test]
    fn records_tls_and_authenticated_user() {
        let h = received_header(&Trace { tls: Some("TLSv1.3 TLS13_AES_128_GCM_SHA256"), auth: Some("sam"), ..trace() });
        assert!(h.contains("(using TLSv1.3 TLS13_AES_128_GCM_SHA256)") && h.contains("(authenticated sender: sam)"), "{h}");
        assert!(h.contains("with ESMTPSA id"), "{h}");
    }

    #[test]
    fn submission_headers_only_what_is_missing() {
        assert_eq!(submission_headers(true, false, "Q1", "mail.example.test", 0), "Message-ID: <Q1@mail.example.test>\r\n");
        assert_eq!(submission_headers(false, true, "Q1", "h", 0), "Date: Thu, 1 Jan 1970 00:00:00 +0000\r\n");
    }
}
