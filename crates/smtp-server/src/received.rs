//! The Received header field the server prepends (RFC 5321 §4.4, SPEC S3).

/// `Received: from HELO ([IP]) by HOST (Postroom) with ESMTP id QID for <RCPT>; DATE`.
/// `for` is given only for a single recipient, so a Bcc list is not disclosed.
pub fn received_header(helo: &str, ip: &str, hostname: &str, esmtp: bool, qid: &str, single_rcpt: Option<&str>, now: i64) -> String {
    let helo: String = helo.chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    let with = if esmtp { "ESMTP" } else { "SMTP" };
    let rcpt = single_rcpt.map(|r| format!("\r\n\tfor <{r}>")).unwrap_or_default();
    format!(
        "Received: from {helo} ([{ip}])\r\n\tby {hostname} (Postroom) with {with} id {qid}{rcpt};\r\n\t{}\r\n",
        mail_proto::date::rfc5322(now)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn folded_and_complete() {
        let h = super::received_header("client.example", "192.0.2.1", "mail.example.test", true, "ABC", Some("sam@example.test"), 0);
        assert_eq!(
            h,
            "Received: from client.example ([192.0.2.1])\r\n\tby mail.example.test (Postroom) with ESMTP id ABC\r\n\tfor <sam@example.test>;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
    }
}
