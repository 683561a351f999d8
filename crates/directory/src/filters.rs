//! Filter rules (SPEC F3; the i5/OS SMTP properties "Filters" page, IMail's filters): what
//! the filtering snap-in matches a message against, and how rules are stored.
//!
//! A rule has one selector — a field and a pattern — and an action. Patterns use `*` for any
//! run of characters (`*.vbs`, `*@example.com`, `image/*`, `*invoice*`); every other character
//! stands for itself. Matching is case-insensitive (Unicode lower case) and runs on decoded
//! values, which the caller supplies in [`MessageFacts`]. When several rules match, the lowest
//! id decides. Matching is linear in the value's length whatever the pattern, so a hostile
//! value of megabytes costs no more than reading it.
//!
//! The quarantine (messages a *keep* rule held back) is kept here too: listing, release —
//! the held recipients are queued again and the message is marked released, which the
//! filtering snap-in honours — and deletion. Each change writes a journal row (OW).

use std::fmt;
use std::str::FromStr;

use rusqlite::{Connection, OptionalExtension, params};

/// The longest pattern accepted.
pub const MAX_PATTERN: usize = 998;

/// What a rule looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The originator: the envelope sender and every address of the From header.
    From,
    /// The Subject header of the message (RFC 2047 decoded).
    Subject,
    /// The file name of any part at any depth: `Content-Disposition: …; filename=` and
    /// `Content-Type: …; name=`, RFC 2047 and RFC 2231 decoded.
    Attachment,
    /// The `type/subtype` of any part at any depth (multipart containers included).
    MimeType,
}

impl Field {
    pub const ALL: [Field; 4] = [Field::From, Field::Subject, Field::Attachment, Field::MimeType];

    pub fn as_str(self) -> &'static str {
        match self {
            Field::From => "from",
            Field::Subject => "subject",
            Field::Attachment => "attachment",
            Field::MimeType => "mime-type",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Field {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, FilterError> {
        Field::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| FilterError::Bad(format!("unknown filter field {s:?}: expected from, subject, attachment or mime-type")))
    }
}

/// What happens to a message a rule matches. Either way it is delivered to nobody.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep the message aside in the quarantine, for `postroom quarantine release` or `delete`.
    Keep,
    /// Throw the message away.
    Discard,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Keep => "keep",
            Action::Discard => "discard",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Action {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, FilterError> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(Action::Keep),
            "discard" => Ok(Action::Discard),
            _ => Err(FilterError::Bad(format!("unknown filter action {s:?}: expected keep or discard"))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("{0}")]
    Bad(String),
    #[error("no filter with id {0} (see `postroom filter list`)")]
    NoSuchRule(i64),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

impl From<FilterError> for store::StoreError {
    fn from(e: FilterError) -> Self {
        match e {
            FilterError::Sqlite(e) => store::StoreError::Sqlite(e),
            other => store::StoreError::Invalid(other.to_string()),
        }
    }
}

/// One stored rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub id: i64,
    pub field: Field,
    pub pattern: String,
    pub action: Action,
    pub added_at: i64,
}

impl Rule {
    /// `filter 3 (attachment *.vbs)`: how journal rows and the quarantine name the rule.
    pub fn describe(&self) -> String {
        format!("filter {} ({} {})", self.id, self.field, self.pattern)
    }

    /// The first value of `facts` this rule matches, if any.
    pub fn first_match<'a>(&self, facts: &'a MessageFacts) -> Option<&'a str> {
        let matches = |v: &&'a String| wildcard_match(&self.pattern, v);
        match self.field {
            Field::From => facts.originators.iter().filter(|v| !v.is_empty()).find(matches),
            Field::Subject => facts.subjects.iter().find(matches),
            // Windows drops trailing dots and blanks: "x.vbs." and "x.vbs " open as x.vbs.
            Field::Attachment => facts
                .attachments
                .iter()
                .find(|v| wildcard_match(&self.pattern, v) || wildcard_match(&self.pattern, v.trim_end_matches(['.', ' ', '\t']))),
            Field::MimeType => facts.mime_types.iter().find(matches),
        }
        .map(String::as_str)
    }
}

/// The decoded values of one message that rules are matched against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageFacts {
    /// The envelope sender and the From header's addresses.
    pub originators: Vec<String>,
    /// Every Subject header of the message (a message without one has an empty subject).
    pub subjects: Vec<String>,
    /// Every file name of every part, at any depth.
    pub attachments: Vec<String>,
    /// Every part's `type/subtype`, lower case.
    pub mime_types: Vec<String>,
}

/// The first rule (lowest id first) that matches, with the value it matched.
pub fn evaluate<'r>(rules: &'r [Rule], facts: &MessageFacts) -> Option<(&'r Rule, String)> {
    rules.iter().find_map(|r| r.first_match(facts).map(|v| (r, v.to_string())))
}

/// `*` matches any run of characters (none included); everything else matches itself, case
/// folded. Linear time: the literal pieces between stars are found left to right, and the
/// leftmost place for each is always a right choice.
pub fn wildcard_match(pattern: &str, value: &str) -> bool {
    let (pattern, value) = (pattern.to_lowercase(), value.to_lowercase());
    let pieces: Vec<&str> = pattern.split('*').collect();
    if pieces.len() == 1 {
        return pattern == value;
    }
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if value.len() < first.len() + last.len() || !value.starts_with(first) || !value.ends_with(last) {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Check a pattern: not empty, one line, not overlong. Returns it trimmed.
pub fn canonical_pattern(text: &str) -> Result<String, FilterError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(FilterError::Bad("a filter pattern must not be empty (\"*\" matches anything)".into()));
    }
    if t.chars().any(char::is_control) {
        return Err(FilterError::Bad(format!("filter pattern {t:?} contains control characters")));
    }
    if t.len() > MAX_PATTERN {
        return Err(FilterError::Bad(format!("filter pattern is longer than {MAX_PATTERN} octets")));
    }
    Ok(t.to_string())
}

/// Add a rule. Returns it and whether it is new (false: the same field and pattern were
/// already there, maybe with another action — that rule is returned unchanged).
pub fn add(conn: &Connection, field: Field, pattern: &str, action: Action) -> Result<(Rule, bool), FilterError> {
    let pattern = canonical_pattern(pattern)?;
    let n = conn.execute(
        "INSERT OR IGNORE INTO filters (field, pattern, action, added_at) VALUES (?1, ?2, ?3, ?4)",
        params![field.as_str(), pattern, action.as_str(), store::now()],
    )?;
    let rule = conn
        .query_row(
            "SELECT id, field, pattern, action, added_at FROM filters WHERE field = ?1 AND pattern = ?2",
            params![field.as_str(), pattern],
            row,
        )?
        .map_err(FilterError::Bad)?;
    Ok((rule, n > 0))
}

/// Remove a rule by id; returns it.
pub fn remove(conn: &Connection, id: i64) -> Result<Rule, FilterError> {
    let rule = conn
        .query_row("DELETE FROM filters WHERE id = ?1 RETURNING id, field, pattern, action, added_at", [id], row)
        .optional()?
        .ok_or(FilterError::NoSuchRule(id))?;
    // A row we could not read is removed all the same.
    Ok(rule.unwrap_or_else(|_| Rule { id, field: Field::Subject, pattern: String::new(), action: Action::Keep, added_at: 0 }))
}

/// Every rule, lowest id first. A row that no longer parses is skipped with a warning.
pub fn list(conn: &Connection) -> Result<Vec<Rule>, FilterError> {
    let mut stmt = conn.prepare_cached("SELECT id, field, pattern, action, added_at FROM filters ORDER BY id")?;
    let rows = stmt.query_map([], row)?;
    let mut rules = Vec::new();
    for r in rows {
        match r? {
            Ok(rule) => rules.push(rule),
            Err(e) => tracing::warn!(error = %e, "skipping an unreadable filter rule"),
        }
    }
    Ok(rules)
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Rule, String>> {
    let (id, field, pattern, action, added_at): (i64, String, String, String, i64) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
    Ok(match (field.parse::<Field>(), action.parse::<Action>()) {
        (Ok(field), Ok(action)) => Ok(Rule { id, field, pattern, action, added_at }),
        (Err(e), _) | (_, Err(e)) => Err(format!("filter {id}: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let yes = [
            ("*.vbs", "LOVE-LETTER-FOR-YOU.TXT.VBS"),
            ("*.vbs", ".vbs"),
            ("*@example.com", "Jane@Example.COM"),
            ("image/*", "image/png"),
            ("image/*", "image/"),
            ("*invoice*", "Your INVOICE no. 7"),
            ("*invoice*", "invoice"),
            ("a*b*c", "aXbYc"),
            ("a*b*c", "abc"),
            ("a*b*c", "abbbc"),
            ("*", ""),
            ("**", "anything"),
            ("exact", "EXACT"),
            ("€*", "€INVOICE.VBS"),
            ("*ß*", "STRAßE"),
        ];
        for (p, v) in yes {
            assert!(wildcard_match(p, v), "{p:?} should match {v:?}");
        }
        let no = [
            ("*.vbs", "x.vbs.txt"),
            ("*@example.com", "jane@example.com.evil"),
            ("*@example.com", "jane@sub.example.co"),
            ("image/*", "application/image"),
            ("a*b*c", "acb"),
            ("ab*ba", "aba"),
            ("exact", "exactly"),
            ("exact", "inexact"),
            ("*invoice*", "in voice"),
        ];
        for (p, v) in no {
            assert!(!wildcard_match(p, v), "{p:?} should not match {v:?}");
        }
    }

    #[test]
    fn matching_is_linear_on_hostile_values() {
        let value = "a".repeat(4_000_000);
        let start = std::time::Instant::now();
        assert!(!wildcard_match("*a*a*a*a*a*a*a*a*b*", &value));
        assert!(wildcard_match("*a*a*a*a*a*a*a*a*", &value));
        assert!(start.elapsed() < std::time::Duration::from_secs(2), "took {:?}", start.elapsed());
    }

    fn rule(id: i64, field: Field, pattern: &str, action: Action) -> Rule {
        Rule { id, field, pattern: pattern.into(), action, added_at: 0 }
    }

    #[test]
    fn rules_match_their_field_and_the_lowest_id_decides() {
        let facts = MessageFacts {
            originators: vec!["".into(), "jane@remote.example".into(), "Boss@Example.COM".into()],
            subjects: vec!["Your Invoice".into()],
            attachments: vec!["notes.txt".into(), "€invoice.VBS".into(), "trailing.exe. ".into()],
            mime_types: vec!["multipart/mixed".into(), "text/plain".into(), "image/png".into()],
        };
        assert_eq!(rule(1, Field::From, "*@example.com", Action::Keep).first_match(&facts), Some("Boss@Example.COM"));
        assert_eq!(rule(1, Field::From, "*", Action::Keep).first_match(&facts), Some("jane@remote.example"), "the null sender is no originator");
        assert_eq!(rule(1, Field::Subject, "*invoice*", Action::Keep).first_match(&facts), Some("Your Invoice"));
        assert_eq!(rule(1, Field::Attachment, "*.vbs", Action::Keep).first_match(&facts), Some("€invoice.VBS"));
        assert_eq!(rule(1, Field::Attachment, "*.exe", Action::Keep).first_match(&facts), Some("trailing.exe. "));
        assert_eq!(rule(1, Field::Attachment, "*invoice*", Action::Keep).first_match(&facts), Some("€invoice.VBS"));
        assert_eq!(rule(1, Field::MimeType, "image/*", Action::Keep).first_match(&facts), Some("image/png"));
        assert_eq!(rule(1, Field::Subject, "*.vbs", Action::Keep).first_match(&facts), None, "a rule looks at its own field only");
        assert_eq!(rule(1, Field::MimeType, "application/*", Action::Keep).first_match(&facts), None);

        let rules = [
            rule(1, Field::MimeType, "video/*", Action::Keep),
            rule(2, Field::Attachment, "*.vbs", Action::Discard),
            rule(3, Field::Subject, "*", Action::Keep),
        ];
        let (r, v) = evaluate(&rules, &facts).unwrap();
        assert_eq!((r.id, r.action, v.as_str()), (2, Action::Discard, "€invoice.VBS"));
        assert!(evaluate(&rules[..1], &facts).is_none());
    }

    #[test]
    fn names_parse_both_ways() {
        for f in Field::ALL {
            assert_eq!(f.as_str().parse::<Field>().unwrap(), f);
        }
        assert_eq!("MIME-TYPE".parse::<Field>().unwrap(), Field::MimeType);
        assert!("body".parse::<Field>().is_err());
        assert_eq!("Keep".parse::<Action>().unwrap(), Action::Keep);
        assert!("bounce".parse::<Action>().is_err());
        assert!(canonical_pattern("  ").is_err());
        assert!(canonical_pattern("a\nb").is_err());
        assert_eq!(canonical_pattern(" *.vbs ").unwrap(), "*.vbs");
    }

    #[test]
    fn rules_are_stored_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store::Store::open(dir.path(), store::StoreOptions::default()).unwrap();
        store
            .write_blocking(store::Durability::Full, |c| {
                let (a, new) = add(c, Field::Attachment, "*.vbs", Action::Discard)?;
                assert!(new);
                let (b, new) = add(c, Field::MimeType, "image/*", Action::Keep)?;
                assert!(new);
                let (again, new) = add(c, Field::Attachment, "*.VBS", Action::Keep)?;
                assert!(!new, "same field and pattern (case-insensitively)");
                assert_eq!(again, a);
                assert_eq!(list(c)?, vec![a.clone(), b.clone()]);
                assert_eq!(a.describe(), format!("filter {} (attachment *.vbs)", a.id));
                assert_eq!(remove(c, a.id)?.id, a.id);
                assert!(matches!(remove(c, a.id), Err(FilterError::NoSuchRule(_))));
                assert_eq!(list(c)?, vec![b]);
                Ok(())
            })
            .unwrap();
    }
}
