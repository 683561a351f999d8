//! SMTP replies: a code, an optional enhanced status code (RFC 3463) and text.
//!
//! The class digit of the enhanced code is derived from the reply code when the reply is built,
//! so a `450 5.x.x` cannot be constructed.

use std::fmt;

/// One SMTP reply, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Subject and detail of the enhanced status code (`x.SUBJECT.DETAIL`); the class comes from `code`.
    pub status: Option<(u16, u16)>,
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply with an enhanced status code, e.g. `Reply::new(550, (1, 1), "User unknown")`
    /// renders `550 5.1.1 User unknown`.
    pub fn new(code: u16, status: (u16, u16), text: impl Into<String>) -> Self {
        Reply { code, status: Some(status), lines: vec![text.into()] }
    }

    /// A reply without an enhanced status code (greeting, 354, EHLO lines).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Reply { code, status: None, lines: vec![text.into()] }
    }

    /// A multi-line reply without enhanced codes (EHLO, HELP).
    pub fn multiline(code: u16, lines: Vec<String>) -> Self {
        Reply { code, status: None, lines }
    }

    /// The enhanced status code as text (`5.1.1`), if any.
    pub fn enhanced(&self) -> Option<String> {
        self.status.map(|(s, d)| format!("{}.{}.{}", self.code / 100, s, d))
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// The reply as it goes on the wire, CRLF after every line (RFC 5321 §4.2.1).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }

    /// First line of text without code, for journals and logs.
    pub fn text(&self) -> &str {
        self.lines.first().map(String::as_str).unwrap_or("")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len().saturating_sub(1);
        let enhanced = self.enhanced();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            match &enhanced {
                Some(e) => write!(f, "{}{}{} {}\r\n", self.code, sep, e, line)?,
                None => write!(f, "{}{}{}\r\n", self.code, sep, line)?,
            }
        }
        if self.lines.is_empty() {
            write!(f, "{}\r\n", self.code)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_comes_from_code() {
        assert_eq!(Reply::new(550, (1, 1), "User unknown").to_string(), "550 5.1.1 User unknown\r\n");
        assert_eq!(Reply::new(452, (5, 3), "Too many").to_string(), "452 4.5.3 Too many\r\n");
        assert_eq!(Reply::new(250, (0, 0), "Ok").to_string(), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn multiline_uses_dashes_until_last() {
        let r = Reply::multiline(250, vec!["mail.example".into(), "PIPELINING".into(), "8BITMIME".into()]);
        assert_eq!(r.to_string(), "250-mail.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
    }
}
