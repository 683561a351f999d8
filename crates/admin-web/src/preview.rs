//! A quarantined message as the console shows it: its header section and its text, both as
//! plain text. HTML is never rendered: an HTML-only message is shown as the text the parser
//! extracts from it, and the template escapes everything, so no script, image, link or style
//! of the message reaches the browser (and the page's policy forbids them besides).

/// What the preview page shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preview {
    pub headers: String,
    pub text: String,
    /// Names of the attachments, not their contents.
    pub attachments: Vec<String>,
}

/// Characters of text shown at most.
const MAX_TEXT: usize = 64 * 1024;

impl Preview {
    pub fn of(raw: &[u8]) -> Preview {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| raw.windows(2).position(|w| w == b"\n\n")).unwrap_or(raw.len());
        let headers = shown(&String::from_utf8_lossy(&raw[..end]));
        let Some(message) = mail_parser::MessageParser::default().parse(raw) else {
            return Preview { headers, text: "(the body could not be parsed)".into(), attachments: Vec::new() };
        };
        let text = message.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
        let text: String = shown(&text).chars().take(MAX_TEXT).collect();
        use mail_parser::MimeHeaders;
        let attachments = message.attachments().map(|a| a.attachment_name().unwrap_or("(unnamed)").to_string()).collect();
        Preview { headers, text, attachments }
    }
}

/// Control characters (but line ends and tabs) become visible escapes: nothing in a message can
/// reorder or hide the text around it (bidi overrides, terminal escapes).
fn shown(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\t' => c.to_string(),
            '\r' => String::new(),
            c if c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c) || ('\u{2066}'..='\u{2069}').contains(&c) => {
                format!("\\u{{{:04x}}}", c as u32)
            }
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_shown_as_text_never_as_markup() {
        let raw = b"From: a@b.example\r\nSubject: Hi\r\nContent-Type: text/html\r\n\r\n<p>Hello <script>alert(1)</script><img src=http://x/></p>";
        let p = Preview::of(raw);
        assert!(p.headers.contains("Subject: Hi"));
        assert!(p.text.contains("Hello"), "{:?}", p.text);
        assert!(!p.text.contains("<img"), "the extracted text has no tags: {:?}", p.text);
    }

    #[test]
    fn control_characters_are_made_visible() {
        let p = Preview::of(b"Subject: a\x1b[31mred\r\n\r\nx\xe2\x80\xaey\r\n");
        assert!(p.headers.contains("a\\u{001b}[31mred"), "{}", p.headers);
        assert!(p.text.contains("x\\u{202e}y"), "{}", p.text);
    }
}
