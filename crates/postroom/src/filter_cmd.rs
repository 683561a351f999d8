//! `postroom filter add|list|remove` and `postroom quarantine list|show|release|delete`
//! (SPEC F3; the i5/OS SMTP properties "Filters" page, IMail's filters).
//!
//! A rule has exactly one selector (`--from`, `--subject`, `--attachment` or `--mime-type`)
//! and an action; to stop a message on either of two things, add two rules. Rules are tried
//! lowest id first and the first match decides. Changes apply to the next message the
//! framework takes, without a restart.

use clap::{ArgGroup, Args, Subcommand};
use directory::filters::{self, Action, Field};
use mail_framework::message::{
    body,
    quarantine::{self, Quarantined},
};
use mail_framework::{bounce, mime_scan};
use mail_proto::date::rfc5322;
use store::Durability;

use crate::commands::open;
use crate::out::{out, outln};
use postroom::config::Config;

/// Header octets `quarantine show` prints, at most.
const MAX_HEADERS: usize = 64 * 1024;

#[derive(Subcommand)]
pub enum FilterCommand {
    /// Add a rule: one selector and an action. `*` matches any run of characters; matching is
    /// case-insensitive, on decoded values (RFC 2047 / RFC 2231), at any MIME depth.
    Add(AddArgs),
    /// Every rule in the order they are tried: id, rule, action, when added.
    List,
    /// Remove a rule by the id `filter list` shows.
    Remove { id: i64 },
}

#[derive(Args)]
#[command(group(ArgGroup::new("selector").required(true).multiple(false).args(["from", "subject", "attachment", "mime_type"])))]
pub struct AddArgs {
    /// The originator: envelope sender or a From header address (e.g. "*@example.com").
    #[arg(long, value_name = "PATTERN")]
    from: Option<String>,
    /// The Subject (e.g. "*invoice*").
    #[arg(long, value_name = "PATTERN")]
    subject: Option<String>,
    /// A file name of any part, from `filename=` or `name=` (e.g. "*.vbs").
    #[arg(long, value_name = "PATTERN")]
    attachment: Option<String>,
    /// The MIME type of any part (e.g. "image/*").
    #[arg(long = "mime-type", value_name = "PATTERN")]
    mime_type: Option<String>,
    /// keep: hold the message in the quarantine, deliver nothing; discard: delete it.
    #[arg(long, value_parser = ["keep", "discard"])]
    action: String,
}

#[derive(Subcommand)]
pub enum QuarantineCommand {
    /// Messages a *keep* rule holds: id, queue id, from, subject, rule, when.
    List,
    /// A held message's headers, the rule that matched and the recipients held back.
    Show {
        /// The quarantine id (`quarantine list`) or the message's queue id.
        id: String,
    },
    /// Deliver a held message after all: its recipients are queued again and the filters let
    /// it through.
    Release { id: String },
    /// Delete a held message; no report is sent.
    Delete { id: String },
}

pub fn filter(cmd: FilterCommand, config: &Config) -> anyhow::Result<()> {
    let (store, _) = open(config)?;
    match cmd {
        FilterCommand::Add(a) => {
            let (field, pattern) = match (a.from, a.subject, a.attachment, a.mime_type) {
                (Some(p), ..) => (Field::From, p),
                (_, Some(p), ..) => (Field::Subject, p),
                (_, _, Some(p), _) => (Field::Attachment, p),
                (_, _, _, Some(p)) => (Field::MimeType, p),
                _ => anyhow::bail!("give one of --from, --subject, --attachment or --mime-type"),
            };
            let action: Action = a.action.parse()?;
            let (rule, added) = store.write_blocking(Durability::Full, move |c| Ok(filters::add(c, field, &pattern, action)?))?;
            if added {
                outln!("filter {} added: {} {} -> {}", rule.id, rule.field, rule.pattern, rule.action);
            } else {
                outln!("filter {} already matches {} {} (action {}); remove it first to change it", rule.id, rule.field, rule.pattern, rule.action);
            }
        }
        FilterCommand::List => {
            let rules = store.read_blocking(|c| Ok(filters::list(c)?))?;
            if rules.is_empty() {
                outln!("no filters");
                return Ok(());
            }
            outln!("{:>5}  {:<50} {:<8} added", "id", "rule", "action");
            for r in rules {
                outln!("{:>5}  {:<50} {:<8} {}", r.id, format!("{} {}", r.field, r.pattern), r.action, rfc5322(r.added_at));
            }
        }
        FilterCommand::Remove { id } => {
            let rule = store.write_blocking(Durability::Full, move |c| Ok(filters::remove(c, id)?))?;
            outln!("filter {id} removed ({} {})", rule.field, rule.pattern);
        }
    }
    Ok(())
}

pub fn quarantine(cmd: QuarantineCommand, config: &Config) -> anyhow::Result<()> {
    let (store, _) = open(config)?;
    match cmd {
        QuarantineCommand::List => {
            let held = store.read_blocking(|c| {
                let held = quarantine::list(c)?;
                let mut out = Vec::with_capacity(held.len());
                for q in held {
                    let head = body::head(c, q.message_id, MAX_HEADERS)?;
                    out.push((mime_scan::summary(bounce::header_section(&head, MAX_HEADERS)), q));
                }
                Ok(out)
            })?;
            if held.is_empty() {
                outln!("quarantine is empty");
                return Ok(());
            }
            outln!("{:>5}  {:<22} {:<30} {:<30} {:<31} rule", "id", "queue id", "from", "subject", "when");
            for (summary, q) in held {
                let from = if summary.from.is_empty() { envelope(&q) } else { summary.from };
                outln!(
                    "{:>5}  {:<22} {:<30} {:<30} {:<31} {}",
                    q.id,
                    q.qid,
                    clip(&printable(&from), 30),
                    clip(&printable(&summary.subject), 30),
                    rfc5322(q.at),
                    printable(&q.rule)
                );
            }
        }
        QuarantineCommand::Show { id } => {
            let (q, head) = store.read_blocking(move |c| {
                let q = quarantine::find(c, &id)?;
                let head = body::head(c, q.message_id, MAX_HEADERS)?;
                Ok((q, head))
            })?;
            outln!("id:        {}", q.id);
            outln!("queue id:  {}", q.qid);
            outln!("envelope:  {}", envelope(&q));
            outln!("size:      {} octets", q.size);
            outln!("kept:      {}{}", rfc5322(q.at), if q.released { " (released)" } else { "" });
            outln!("rule:      {}", printable(&q.rule));
            for r in &q.recipients {
                outln!("recipient: <{r}>");
            }
            outln!();
            out!("{}", printable_block(&String::from_utf8_lossy(bounce::header_section(&head, MAX_HEADERS))));
        }
        QuarantineCommand::Release { id } => {
            let (q, n) = store.write_blocking(Durability::Full, move |c| Ok(quarantine::release(c, &id)?))?;
            outln!("quarantine {} ({}): released, {n} recipient(s) queued for delivery", q.id, q.qid);
        }
        QuarantineCommand::Delete { id } => {
            let (q, n) = store.write_blocking(Durability::Full, move |c| Ok(quarantine::delete(c, &id)?))?;
            outln!("quarantine {} ({}): deleted, {n} recipient(s) will receive nothing", q.id, q.qid);
        }
    }
    Ok(())
}

fn envelope(q: &Quarantined) -> String {
    format!("<{}>", q.mail_from)
}

/// Text from a message, made safe for a terminal: tabs become blanks, other control
/// characters (escape sequences, line breaks) '?'.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '\t' {
                ' '
            } else if c.is_control() {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// A header section for a terminal: line breaks kept, other control characters made '?'.
fn printable_block(s: &str) -> String {
    s.split_inclusive('\n').map(|line| format!("{}\n", printable(line.trim_end_matches(['\r', '\n'])))).collect()
}

fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width - 1).collect();
    out.push('…');
    out
}
