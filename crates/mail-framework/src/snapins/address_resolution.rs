//! Address resolution (the seeds' "MSF SMTP exit for Address Resolution", journal P):
//! local users → local delivery, other domains → forward, unknown local → non-delivery;
//! aliases and users' forwarding addresses (F7, D1) are expanded into new recipients of the
//! same message — resubmission, bounded in depth and breadth so a loop ends (5.2.4).

use directory::{Forward, Resolution};
use mail_proto::Address;
use rusqlite::Connection;
use store::StoreError;

use crate::message;
use crate::pipeline::{Context, SnapIn, Tag, WorkItem};

/// Expansions of expansions, at most (then 5.2.4).
pub const MAX_DEPTH: i64 = 10;
/// Addresses one alias may expand to, at most (then 5.2.4).
pub const MAX_TARGETS: usize = 100;

pub struct AddressResolution;

impl SnapIn for AddressResolution {
    fn name(&self) -> &'static str {
        "address-resolution"
    }

    fn examine(&self, ctx: &Context<'_>, items: &mut [WorkItem]) -> Result<(), StoreError> {
        for item in items.iter_mut().filter(|i| i.tag == Tag::Unresolved) {
            let resolution = match parse_recipient(&item.address) {
                None => {
                    item.tag = Tag::NonDelivery { status: "5.1.3".into(), reason: "5.1.3 bad recipient address syntax".into() };
                    continue;
                }
                Some(addr) => ctx.domains.resolve(ctx.conn, &addr).map_err(|e| StoreError::Invalid(e.to_string()))?,
            };
            let (tag, targets) = match resolution {
                // D2: a mailbox at its quota is refused at RCPT, and again here, where mail that
                // came through an alias or was accepted before the box filled arrives (a
                // permanent failure, as Dovecot answers by default).
                Resolution::Local { forward: None, full: true, user, .. } => {
                    (Tag::NonDelivery { status: "5.2.2".into(), reason: format!("5.2.2 mailbox of {user} is full") }, Vec::new())
                }
                // Forwarded with a copy kept: the forward still goes; the full box gets no copy.
                Resolution::Local { forward: Some(Forward { to, keep_copy: true }), full: true, .. } => (Tag::Expanded, vec![to]),
                Resolution::Local { user_id, user, forward: None, .. } => (Tag::LocalDelivery { user_id, user }, Vec::new()),
                Resolution::Local { user_id, user, forward: Some(Forward { to, keep_copy: true }), .. } => {
                    (Tag::LocalDelivery { user_id, user }, vec![to])
                }
                Resolution::Local { forward: Some(Forward { to, keep_copy: false }), .. } => (Tag::Expanded, vec![to]),
                Resolution::Alias { targets, .. } => (Tag::Expanded, targets),
                Resolution::Remote => (Tag::Forward, Vec::new()),
                // The user went away between RCPT and now (RCPT refuses unknown users).
                Resolution::Unknown => (Tag::NonDelivery { status: "5.1.1".into(), reason: "5.1.1 user unknown".into() }, Vec::new()),
            };
            item.tag = tag;
            if targets.is_empty() {
                continue;
            }
            if delivered_to(ctx.conn, item.message.id, &item.address)? {
                item.tag = Tag::NonDelivery {
                    status: "5.4.6".into(),
                    reason: format!("5.4.6 mail forwarding loop for {}: the message already carries Delivered-To for it", item.address),
                };
                continue;
            }
            // Each address receives a message once: targets that already are recipients of it are
            // dropped. An expansion left with nothing new is a loop when it leads back to where
            // it came from (a -> b -> a); otherwise everyone it stands for is served already.
            let ancestors = message::resolve::ancestors(ctx.conn, item.message.id, item.expanded_from.as_deref(), MAX_DEPTH as usize + 1)?;
            let loops = targets.iter().any(|t| t.eq_ignore_ascii_case(&item.address) || ancestors.iter().any(|a| a.eq_ignore_ascii_case(t)));
            let targets = new_recipients(ctx.conn, item.message.id, targets)?;
            if targets.is_empty() && item.tag == Tag::Expanded {
                item.tag = if loops {
                    Tag::NonDelivery {
                        status: "5.4.6".into(),
                        reason: format!("5.4.6 alias loop: {} expands only to addresses already served", item.address),
                    }
                } else {
                    Tag::Duplicate
                };
                continue;
            }
            if item.depth >= MAX_DEPTH || targets.len() > MAX_TARGETS {
                let why = if item.depth >= MAX_DEPTH { "alias or forwarding loop" } else { "alias expands to too many addresses" };
                item.tag =
                    Tag::NonDelivery { status: "5.2.4".into(), reason: format!("5.2.4 {why} (at most {MAX_DEPTH} levels, {MAX_TARGETS} addresses)") };
                continue;
            }
            item.expand_to = targets;
        }
        Ok(())
    }

    /// Queue the expansion targets as new recipients of the same message, one level deeper.
    fn apply(&self, tx: &Connection, items: &[WorkItem]) -> Result<(), StoreError> {
        for item in items.iter().filter(|i| !i.expand_to.is_empty() && !matches!(i.tag, Tag::NonDelivery { .. })) {
            for target in &item.expand_to {
                message::resolve::add_expansion(tx, item.message.id, target, item.depth + 1, &item.address)?;
            }
        }
        Ok(())
    }
}

/// The targets that are not yet recipients of the message (nor repeated in the list).
fn new_recipients(conn: &Connection, message_id: i64, targets: Vec<String>) -> Result<Vec<String>, StoreError> {
    let mut fresh: Vec<String> = Vec::new();
    for t in targets {
        if !fresh.iter().any(|f| f.eq_ignore_ascii_case(&t)) && !message::resolve::is_recipient(conn, message_id, &t)? {
            fresh.push(t);
        }
    }
    Ok(fresh)
}

/// Does the message's header section carry `Delivered-To: address` (a loop through us)?
fn delivered_to(conn: &Connection, message_id: i64, address: &str) -> Result<bool, StoreError> {
    let head = message::body::head(conn, message_id, 64 * 1024)?;
    let headers = crate::bounce::header_section(&head, 64 * 1024);
    Ok(headers.split(|&b| b == b'\n').any(|line| {
        let line = String::from_utf8_lossy(line);
        let Some((name, value)) = line.split_once(':') else { return false };
        name.trim().eq_ignore_ascii_case("delivered-to") && value.trim().trim_start_matches('<').trim_end_matches('>').eq_ignore_ascii_case(address)
    }))
}

/// A stored recipient: `local@domain`, or the bare `postmaster` RCPT allows.
fn parse_recipient(s: &str) -> Option<Address> {
    if !s.contains('@') && s.eq_ignore_ascii_case("postmaster") {
        return Some(Address { local: s.to_string(), domain: String::new(), quoted: false, source_route: false });
    }
    Address::parse(s).ok()
}
