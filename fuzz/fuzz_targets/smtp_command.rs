//! SMTP command lines: `smtp_command::parse`, `line_limit`, and the DSN helpers that parse
//! parameter values (`xtext_decode`, `parse_notify`). None may panic on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_proto::sasl::MAX_SASL_LINE;
use mail_proto::smtp_command::{self, Command, MAX_COMMAND_LINE, MAX_MAIL_RCPT_LINE};

fuzz_target!(|data: &[u8]| {
    let limit = smtp_command::line_limit(data);
    assert!(
        [MAX_COMMAND_LINE, MAX_MAIL_RCPT_LINE, MAX_SASL_LINE].contains(&limit),
        "line_limit returned {limit}"
    );
    if let Ok(cmd) = smtp_command::parse(data) {
        match cmd {
            Command::Mail { params, .. } | Command::Rcpt { params, .. } => {
                for p in params {
                    assert!(!p.keyword.is_empty());
                    if let Some(v) = p.value {
                        let _ = smtp_command::xtext_decode(&v);
                        let _ = smtp_command::parse_notify(&v);
                    }
                }
            }
            Command::Helo(d) | Command::Ehlo(d) => assert!(!d.is_empty() && !d.contains(' ')),
            _ => {}
        }
    }
    // The helpers on their own, on arbitrary text too.
    let text = String::from_utf8_lossy(data);
    if let Some(decoded) = smtp_command::xtext_decode(&text) {
        // What xtext_encode writes, xtext_decode reads back.
        assert_eq!(smtp_command::xtext_decode(&smtp_command::xtext_encode(&decoded)).as_deref(), Some(decoded.as_str()));
    }
    let _ = smtp_command::parse_notify(&text);
});
