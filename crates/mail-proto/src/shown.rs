//! Text from the network made safe to store and show: what a client sent (a user name, a HELO
//! name, an ETRN argument) ends up in the journal and on an operator's terminal, where a line
//! feed would forge a second journal line and an escape sequence would drive the terminal.

use std::borrow::Cow;

/// `s` with every control character escaped (`\n`, `\r`, `\t`, `\u{1b}`, ...) and cut to at
/// most `max` characters, marked as cut. Borrowed when nothing needed changing.
pub fn escaped(s: &str, max: usize) -> Cow<'_, str> {
    let clean = !s.chars().any(char::is_control);
    let count = s.chars().count();
    if clean && count <= max {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(max * 2) + 16);
    for c in s.chars().take(max) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if count > max {
        out.push_str(&format!("…[cut: {count} characters]"));
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_is_marked_cut() {
        assert!(matches!(escaped("sam@example.test", 64), Cow::Borrowed(_)));
        assert_eq!(escaped("bob\n2026 94 forged\u{1b}[2J", 64), "bob\\n2026 94 forged\\u{1b}[2J");
        assert_eq!(escaped("a\r\tb", 64), "a\\r\\tb");
        let long = "x".repeat(3000);
        let e = escaped(&long, 100);
        assert!(e.starts_with(&"x".repeat(100)) && e.ends_with("…[cut: 3000 characters]"), "{e}");
        assert_eq!(escaped("é€", 1), "é…[cut: 2 characters]");
    }
}
