//! Filtering (SPEC F3, journal OW; the i5/OS SMTP "Filters" page, IMail's filters): after
//! address resolution, each message is matched once against the filter rules — originator,
//! subject, attachment file names, MIME types — and a match takes every recipient of it in the
//! batch away from delivery: *keep* puts the message in the quarantine (a `quarantine` row; the
//! body stays), *discard* throws it away. Filtered mail never bounces: the sender of a virus is
//! usually forged, and a report would be backscatter.
//!
//! What it trusts: nothing in the message. Only the first `max_bytes` of a message are read
//! from the store and walked, to at most `max_depth` levels ([`crate::mime_scan`]). Reports
//! (`bounce`, `double-bounce`) are ours and are not filtered. A message the administrator
//! released from the quarantine is not filtered again.
//!
//! How it fails: a store error fails the batch (it is retried); the walk itself cannot fail.

use crate::journal::{self, code};
use directory::filters::{self, Action, Field, MessageFacts, Rule};
use rusqlite::Connection;
use store::StoreError;

use crate::message;
use crate::mime_scan::{self, Limits};
use crate::pipeline::{Context, MessageInfo, SnapIn, Tag, WorkItem};

/// The longest matched value quoted in a journal row or the quarantine.
const MAX_SHOWN: usize = 200;
/// Recipients named in one journal row, at most.
const MAX_NAMED: usize = 10;

pub struct Filtering {
    /// Octets of a message read and walked, at most (`[storage] filter_max_bytes`).
    pub max_bytes: usize,
    /// MIME nesting levels walked, at most.
    pub max_depth: usize,
    /// A message the walk could not finish is kept while an attachment or MIME-type rule is
    /// active: what lies beyond the limits may be exactly what a rule is there to catch.
    pub keep_unscannable: bool,
}

impl Default for Filtering {
    fn default() -> Self {
        Filtering { max_bytes: mime_scan::DEFAULT_MAX_BYTES, max_depth: mime_scan::DEFAULT_MAX_DEPTH, keep_unscannable: true }
    }
}

impl Filtering {
    /// Filtering that reads at most `max_bytes` of a message.
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Filtering { max_bytes, ..Default::default() }
    }

    fn limits(&self) -> Limits {
        Limits { max_bytes: self.max_bytes, max_depth: self.max_depth, ..Default::default() }
    }

    /// The tag every deliverable recipient of `message` gets, or None: deliver as resolved.
    /// `rules` is read once per batch, on the first message that needs it.
    fn verdict(&self, conn: &Connection, message: &MessageInfo, rules: &mut Option<Vec<Rule>>) -> Result<Option<Tag>, StoreError> {
        // Already decided in an earlier batch (a message's recipients may span batches, and
        // alias expansion queues new ones later): the same verdict, without another walk.
        match message::quarantine::verdict(conn, message.id)? {
            Some((_, true)) => return Ok(None),
            Some((rule, false)) => return Ok(Some(Tag::Quarantined { rule })),
            None => {}
        }
        if let Some(rule) = message::resolve::discarded_by(conn, message.id)? {
            return Ok(Some(Tag::Discarded { rule }));
        }

        let rules = match rules {
            Some(r) => r,
            None => rules.insert(filters::list(conn)?),
        };
        if rules.is_empty() {
            return Ok(None);
        }
        let raw = read_head(conn, message.id, self.max_bytes)?;
        let scan = mime_scan::scan(&raw, &self.limits());
        drop(raw);
        let mut originators = Vec::with_capacity(scan.from.len() + 1);
        originators.push(message.mail_from.clone());
        originators.extend(scan.from);
        let facts = MessageFacts {
            originators,
            subjects: if scan.subjects.is_empty() { vec![String::new()] } else { scan.subjects },
            attachments: scan.attachments,
            mime_types: scan.mime_types,
        };
        let Some((rule, value)) = filters::evaluate(rules, &facts) else {
            let content_rule = rules.iter().any(|r| matches!(r.field, Field::Attachment | Field::MimeType));
            if self.keep_unscannable && content_rule && (scan.truncated || scan.too_deep || scan.too_many_parts) {
                let why = if scan.truncated {
                    format!("larger than [storage] filter_max_bytes ({} octets)", self.max_bytes)
                } else if scan.too_deep {
                    format!("MIME nested deeper than {} levels", self.max_depth)
                } else {
                    "more MIME parts than the filters walk".to_string()
                };
                let what = format!("could not be inspected completely: {why} (attachment and MIME-type filters are active)");
                tracing::info!(qid = %message.qid, reason = %what, "message kept: the filters could not see all of it");
                return Ok(Some(Tag::Quarantined { rule: what }));
            }
            return Ok(None);
        };
        let what = format!("{} matched {}", rule.describe(), shown(&value));
        tracing::info!(qid = %message.qid, rule = %what, action = %rule.action, "message filtered");
        Ok(Some(match rule.action {
            Action::Keep => Tag::Quarantined { rule: what },
            Action::Discard => Tag::Discarded { rule: what },
        }))
    }
}

/// Recipients address resolution gave somewhere to go: the ones a filter may take away.
/// (Failed recipients still fail: their report carries only the original's headers.)
fn deliverable(tag: &Tag) -> bool {
    matches!(tag, Tag::LocalDelivery { .. } | Tag::Forward | Tag::Expanded)
}

impl SnapIn for Filtering {
    fn name(&self) -> &'static str {
        "filtering"
    }

    fn examine(&self, ctx: &Context<'_>, items: &mut [WorkItem]) -> Result<(), StoreError> {
        let mut rules = None;
        for group in items.chunk_by_mut(|a, b| a.message.id == b.message.id) {
            let message = group[0].message.clone();
            if message.origin.is_report() || !group.iter().any(|i| deliverable(&i.tag)) {
                continue;
            }
            let Some(tag) = self.verdict(ctx.conn, &message, &mut rules)? else { continue };
            for item in group.iter_mut().filter(|i| deliverable(&i.tag)) {
                item.tag = tag.clone();
                // An alias of a filtered message is not expanded; a release re-resolves it.
                item.expand_to.clear();
            }
        }
        Ok(())
    }

    /// Keep: one quarantine row per message. Journal OW once per message, when first decided.
    fn apply(&self, tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        let filtered: Vec<&WorkItem> = items.iter().filter(|i| matches!(i.tag, Tag::Quarantined { .. } | Tag::Discarded { .. })).collect();
        for group in filtered.chunk_by(|a, b| a.message.id == b.message.id) {
            let message = &group[0].message;
            let (first, action, rule) = match &group[0].tag {
                Tag::Quarantined { rule } => (message::quarantine::keep(tx, message.id, rule)?, Action::Keep, rule),
                Tag::Discarded { rule } => {
                    // States are written after every apply: 'discarded' rows are earlier batches'.
                    (message::resolve::discarded_by(tx, message.id)?.is_none(), Action::Discard, rule)
                }
                _ => unreachable!("filtered above"),
            };
            if !first {
                continue;
            }
            let mut named: Vec<&str> = group.iter().take(MAX_NAMED).map(|i| i.address.as_str()).collect();
            let more = group.len().saturating_sub(MAX_NAMED);
            let more = format!("and {more} more");
            if group.len() > MAX_NAMED {
                named.push(&more);
            }
            let detail = format!("{action}: {rule}");
            journal::append(
                tx,
                &journal::Entry {
                    code: code::FILTERED,
                    qid: &message.qid,
                    originator: &message.mail_from,
                    recipient: &named.join(", "),
                    size: Some(message.size),
                    detail: &detail,
                    ..Default::default()
                },
            )?;
        }
        Ok(())
    }
}

/// The first `max` octets of a stored message and one more when there are more (so the walk
/// knows it was cut).
fn read_head(conn: &Connection, message_id: i64, max: usize) -> Result<Vec<u8>, StoreError> {
    message::body::head(conn, message_id, max.saturating_add(1))
}

/// A matched value as journal rows and listings show it: quoted, escaped, not overlong.
fn shown(value: &str) -> String {
    let mut s: String = value.chars().take(MAX_SHOWN).collect();
    if s.len() < value.len() {
        s.push('…');
    }
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matched_values_are_quoted_and_short() {
        assert_eq!(shown("€invoice.VBS"), "\"€invoice.VBS\"");
        assert_eq!(shown("a\r\nb"), "\"a\\r\\nb\"");
        let long = "x".repeat(1000);
        assert_eq!(shown(&long).chars().count(), MAX_SHOWN + 3);
    }
}
