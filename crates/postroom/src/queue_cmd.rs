//! `postroom queue list|show|retry|hold|release|delete` (SPEC O2; i5/OS WRKDSTQ, HLDDSTQ and
//! friends). Each command but `list` takes a queue id as `queue list` prints it.

use anyhow::bail;
use clap::Subcommand;
use mail_framework::message::admin::{self, QueueCommand as Op, QueuedRecipient};
use mail_framework::message::{Hold, RecipientState};
use mail_proto::date::rfc5322;
use store::Durability;

use crate::commands::open;
use crate::out::outln;
use postroom::config::Config;

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Recipients not yet delivered: waiting for the framework, the SMTP client or a report.
    List,
    /// A message's envelope and every recipient with its state, attempts and last reply.
    Show { id: String },
    /// Attempt delivery now instead of at the next scheduled time.
    Retry { id: String },
    /// Stop delivery attempts until `release`.
    Hold { id: String },
    /// Let a held message be delivered again.
    Release { id: String },
    /// Remove a message's waiting recipients (no report is sent to the sender).
    Delete { id: String },
}

pub fn queue(cmd: QueueCommand, config: &Config) -> anyhow::Result<()> {
    let (store, _) = open(config)?;
    let (op, id, done) = match cmd {
        QueueCommand::List => return list(&store.read_blocking(admin::pending)?),
        QueueCommand::Show { id } => {
            return show(
                &id,
                &store.read_blocking({
                    let id = id.clone();
                    move |c| admin::message_recipients(c, &id)
                })?,
            );
        }
        QueueCommand::Retry { id } => (Op::Retry, id, "will be attempted now"),
        QueueCommand::Hold { id } => (Op::Hold, id, "held"),
        QueueCommand::Release { id } => (Op::Release, id, "released"),
        QueueCommand::Delete { id } => (Op::Delete, id, "deleted"),
    };
    let qid = id.clone();
    let n = store.write_blocking(Durability::Full, move |c| admin::command(c, &qid, op))?;
    if n == 0 {
        bail!("no waiting recipients for queue id {id} (see `postroom queue list`)");
    }
    outln!("{id}: {n} recipient(s) {done}");
    Ok(())
}

fn when(at: Option<i64>) -> String {
    at.map(rfc5322).unwrap_or_else(|| "now".into())
}

fn list(rows: &[QueuedRecipient]) -> anyhow::Result<()> {
    if rows.is_empty() {
        outln!("queue is empty");
        return Ok(());
    }
    outln!("{:<22} {:<8} {:>9} {:<30} {:>8} {:<31} last reply", "id", "state", "size", "recipient", "attempts", "next attempt");
    for r in rows {
        let next = if r.held != Hold::None {
            r.held.describe().to_string()
        } else if matches!(r.state, RecipientState::Forward | RecipientState::Queued) {
            when(r.next_attempt)
        } else {
            "-".into()
        };
        outln!(
            "{:<22} {:<8} {:>9} {:<30} {:>8} {:<31} {}",
            r.qid,
            r.state,
            r.size,
            r.address,
            r.attempts,
            next,
            r.last_reply.as_deref().unwrap_or_default()
        );
    }
    Ok(())
}

fn show(id: &str, rows: &[QueuedRecipient]) -> anyhow::Result<()> {
    let Some(first) = rows.first() else { bail!("no message with queue id {id}") };
    outln!("id:       {}", first.qid);
    outln!("from:     <{}>", first.mail_from);
    outln!("received: {}", rfc5322(first.received_at));
    outln!("size:     {} octets", first.size);
    for r in rows {
        outln!("recipient <{}>", r.address);
        let held = if r.held == Hold::None { String::new() } else { format!(" ({})", r.held.describe()) };
        outln!("  state:        {}{held}", r.state);
        outln!("  attempts:     {}", r.attempts);
        if r.held == Hold::None && r.state == RecipientState::Forward {
            outln!("  next attempt: {}", when(r.next_attempt));
        }
        if let Some(reply) = &r.last_reply {
            outln!("  last reply:   {reply}");
        }
    }
    Ok(())
}
