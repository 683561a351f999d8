//! The pages: one askama template each (templates/), and the rows they show, made from the
//! library types here so the templates only print text. askama escapes every value.

use askama::Template;
use mail_framework::journal;
use mail_framework::message::Hold;
use mail_framework::message::admin::{Depths, QueuedRecipient};
use mail_framework::message::quarantine::Quarantined;
use mail_proto::date::rfc5322;

use crate::counters::Totals;
use crate::preview::Preview;

/// The frame of every page after login: who is logged in, the token of its forms, where we are,
/// and what the last change did.
pub struct Nav {
    pub user: String,
    pub csrf: String,
    pub section: &'static str,
    pub note: Option<String>,
}

/// 1536 → "1.5 KiB".
pub fn bytes(n: u64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let (mut value, mut unit) = (n as f64, 0);
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} bytes") } else { format!("{value:.1} {}", units[unit]) }
}

#[derive(Template)]
#[template(path = "login.html")]
pub struct Login {
    pub message: Option<String>,
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub title: String,
    pub text: String,
}

pub struct ListenerRow {
    pub name: String,
    pub address: String,
    pub up: bool,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
pub struct Dashboard {
    pub nav: Nav,
    pub hostname: String,
    pub listeners: Vec<ListenerRow>,
    pub framework: String,
    pub outbound: String,
    pub storage_low: bool,
    pub depths: Depths,
    pub counters: Totals,
    /// Per minute over the last minutes (how many), once there is history.
    pub rates: Option<(Totals, f64)>,
    pub free: String,
    pub certificate: String,
}

pub struct QueueRow {
    pub qid: String,
    pub from: String,
    pub to: String,
    pub state: String,
    pub held: String,
    pub size: i64,
    pub received: String,
    pub attempts: i64,
    pub next_attempt: String,
    pub last_reply: String,
}

impl From<QueuedRecipient> for QueueRow {
    fn from(r: QueuedRecipient) -> Self {
        QueueRow {
            from: if r.mail_from.is_empty() { "<>".into() } else { r.mail_from },
            to: r.address,
            state: r.state.to_string(),
            held: if r.held == Hold::None { String::new() } else { r.held.describe().to_string() },
            size: r.size,
            received: rfc5322(r.received_at),
            attempts: r.attempts,
            next_attempt: r.next_attempt.map(rfc5322).unwrap_or_else(|| "now".into()),
            last_reply: r.last_reply.unwrap_or_default(),
            qid: r.qid,
        }
    }
}

#[derive(Template)]
#[template(path = "queue.html")]
pub struct Queue {
    pub nav: Nav,
    pub rows: Vec<QueueRow>,
    pub state: String,
    pub q: String,
}

#[derive(Template)]
#[template(path = "queue_message.html")]
pub struct QueueMessage {
    pub nav: Nav,
    pub qid: String,
    pub rows: Vec<QueueRow>,
}

pub struct JournalRow {
    pub at: String,
    pub code: String,
    pub what: &'static str,
    pub qid: String,
    pub from: String,
    pub to: String,
    pub ip: String,
    pub detail: String,
}

/// What a journal code means, for people who do not know the i5/OS codes by heart.
fn meaning(code: &str) -> &'static str {
    use journal::code as c;
    match code {
        c::SMTP_RECEIVED_LOCAL => "received for local delivery",
        c::SMTP_RECEIVED_RELAY => "received for relay",
        c::SMTP_CONNECTION_REFUSED => "connection refused",
        c::SMTP_RELAY_REFUSED => "relay refused",
        c::SMTP_REJECTED => "rejected",
        c::SMTP_SENDER_AUTH => "SPF/DKIM/DMARC",
        c::SMTP_AUTH_FAILED => "AUTH failed",
        c::RESOLVED => "address resolved",
        c::DELIVERED_LOCAL => "delivered to mailbox",
        c::NON_DELIVERY => "undeliverable",
        c::NON_DELIVERY_REPORT => "bounce sent",
        c::FORWARD_ENQUEUED => "queued for delivery",
        c::CLIENT_DEQUEUED => "delivery attempt",
        c::CLIENT_DELIVERED => "delivered to remote host",
        c::CLIENT_UNDELIVERABLE => "remote host refused",
        c::CLIENT_RETRY_1 | c::CLIENT_RETRY_2 => "will retry",
        c::CLIENT_DNS => "DNS lookup failed",
        c::FILTERED => "filter / quarantine",
        c::QUEUE_DELETED => "deleted by administrator",
        c::FRAMEWORK_HELD => "held after failures",
        c::POP_LOGIN => "POP3 login",
        c::POP_LOGIN_FAILED => "POP3 login failed",
        c::POP_RETRIEVE => "POP3 retrieval",
        c::POP_DELETE => "POP3 deletion",
        c::CONSOLE_LOGIN => "console login",
        c::CONSOLE_LOGIN_FAILED => "console login failed",
        c::CONSOLE_CHANGE => "console change",
        _ => "",
    }
}

impl From<journal::Row> for JournalRow {
    fn from(r: journal::Row) -> Self {
        JournalRow {
            at: rfc5322(r.at),
            what: meaning(&r.code),
            code: r.code,
            qid: r.qid,
            from: r.originator,
            to: r.recipient,
            ip: r.ip,
            detail: r.detail,
        }
    }
}

#[derive(Template)]
#[template(path = "trace.html")]
pub struct Trace {
    pub nav: Nav,
    pub q: String,
    pub from: String,
    pub until: String,
    pub searched: bool,
    pub rows: Vec<JournalRow>,
}

#[derive(Template)]
#[template(path = "trace_message.html")]
pub struct TraceMessage {
    pub nav: Nav,
    pub qid: String,
    pub rows: Vec<JournalRow>,
    pub recipients: Vec<QueueRow>,
}

pub struct QuarantineRow {
    pub id: i64,
    pub qid: String,
    pub from: String,
    pub to: String,
    pub size: i64,
    pub rule: String,
    pub at: String,
}

impl From<Quarantined> for QuarantineRow {
    fn from(q: Quarantined) -> Self {
        QuarantineRow {
            id: q.id,
            from: if q.mail_from.is_empty() { "<>".into() } else { q.mail_from },
            to: q.recipients.join(", "),
            size: q.size,
            rule: q.rule,
            at: rfc5322(q.at),
            qid: q.qid,
        }
    }
}

#[derive(Template)]
#[template(path = "quarantine.html")]
pub struct Quarantine {
    pub nav: Nav,
    pub rows: Vec<QuarantineRow>,
}

#[derive(Template)]
#[template(path = "quarantine_message.html")]
pub struct QuarantineMessage {
    pub nav: Nav,
    pub q: QuarantineRow,
    pub preview: Preview,
}

pub struct UserRow {
    pub name: String,
    pub full_name: String,
    pub state: &'static str,
    pub admin: bool,
    pub addresses: Vec<String>,
    pub preferred: String,
    pub messages: i64,
    pub bytes: String,
    pub quota: String,
    pub has_password: bool,
    /// Where the user's mail is forwarded, "" when it is not; whether a copy stays.
    pub forward: String,
    pub keep_copy: bool,
}

impl From<directory::admin::UserInfo> for UserRow {
    fn from(u: directory::admin::UserInfo) -> Self {
        UserRow {
            state: match (u.removed, u.enabled) {
                (true, _) => "removed",
                (false, true) => "enabled",
                (false, false) => "disabled",
            },
            full_name: u.display_name.unwrap_or_default(),
            admin: u.admin,
            preferred: u.preferred.unwrap_or_default(),
            addresses: u.addresses,
            messages: u.messages,
            bytes: bytes(u.bytes.max(0) as u64),
            quota: u.quota_bytes.map(|q| bytes(q.max(0) as u64)).unwrap_or_else(|| "none".into()),
            has_password: u.has_password,
            forward: u.forward_to.unwrap_or_default(),
            keep_copy: u.keep_copy,
            name: u.name,
        }
    }
}

#[derive(Template)]
#[template(path = "users.html")]
pub struct Users {
    pub nav: Nav,
    pub users: Vec<UserRow>,
}

#[derive(Template)]
#[template(path = "user.html")]
pub struct User {
    pub nav: Nav,
    pub user: UserRow,
}

pub struct DomainRow {
    pub name: String,
    pub origin: &'static str,
    /// Domains of the configuration file are changed there, not here.
    pub removable: bool,
}

#[derive(Template)]
#[template(path = "domains.html")]
pub struct Domains {
    pub nav: Nav,
    pub domains: Vec<DomainRow>,
}

pub struct AliasRow {
    pub alias: String,
    pub targets: Vec<String>,
    pub catch_all: bool,
}

#[derive(Template)]
#[template(path = "aliases.html")]
pub struct Aliases {
    pub nav: Nav,
    pub aliases: Vec<AliasRow>,
}

pub struct ListEntry {
    pub entry: String,
    pub detail: String,
}

pub struct AccessList {
    pub kind: &'static str,
    pub title: &'static str,
    pub hint: &'static str,
    pub rows: Vec<ListEntry>,
}

#[derive(Template)]
#[template(path = "lists.html")]
pub struct Lists {
    pub nav: Nav,
    pub lists: Vec<AccessList>,
    pub hostauth: Vec<ListEntry>,
    pub denied: Vec<ListEntry>,
}

#[derive(Template)]
#[template(path = "explain.html")]
pub struct Explain {
    pub nav: Nav,
    pub ip: String,
    pub helo: String,
    pub from: String,
    pub to: String,
    pub asked: bool,
    /// None: unanswered; Some(true): every decision accepts.
    pub accepted: Option<bool>,
    pub lines: Vec<String>,
    pub available: bool,
}

pub struct DkimRow {
    pub domain: String,
    pub selector: String,
    pub algorithm: &'static str,
    pub created: String,
    pub checked: String,
    pub signs: bool,
    /// selector._domainkey.domain
    pub name: String,
    /// The TXT record's value.
    pub value: String,
}

#[derive(Template)]
#[template(path = "dkim.html")]
pub struct Dkim {
    pub nav: Nav,
    pub keys: Vec<DkimRow>,
    pub unusable: Vec<String>,
}

pub struct FilterRow {
    pub id: i64,
    pub field: &'static str,
    pub pattern: String,
    pub action: &'static str,
    pub added: String,
}

#[derive(Template)]
#[template(path = "filters.html")]
pub struct Filters {
    pub nav: Nav,
    pub rules: Vec<FilterRow>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped() {
        let page = ErrorPage { title: "<b>".into(), text: "<script>alert('x')</script> & \"q\"".into() };
        let html = page.render().unwrap();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<b>"));
    }

    #[test]
    fn every_input_has_a_label() {
        let nav = || Nav { user: "admin".into(), csrf: "t".repeat(64), section: "users", note: None };
        let pages = [
            Login { message: None }.render().unwrap(),
            Users { nav: nav(), users: Vec::new() }.render().unwrap(),
            Trace { nav: nav(), q: String::new(), from: String::new(), until: String::new(), searched: false, rows: Vec::new() }.render().unwrap(),
            Queue { nav: nav(), rows: Vec::new(), state: String::new(), q: String::new() }.render().unwrap(),
            Domains { nav: nav(), domains: Vec::new() }.render().unwrap(),
            Aliases { nav: nav(), aliases: Vec::new() }.render().unwrap(),
            lists(nav()).render().unwrap(),
            Dkim { nav: nav(), keys: Vec::new(), unusable: Vec::new() }.render().unwrap(),
            Filters { nav: nav(), rules: Vec::new() }.render().unwrap(),
            Explain {
                nav: nav(),
                ip: String::new(),
                helo: String::new(),
                from: String::new(),
                to: String::new(),
                asked: true,
                accepted: Some(false),
                lines: vec!["connect: accept".into()],
                available: true,
            }
            .render()
            .unwrap(),
        ];
        for html in pages {
            for input in html.split("<input").skip(1).chain(html.split("<select").skip(1)) {
                let tag = &input[..input.find('>').unwrap()];
                if tag.contains("type=\"hidden\"") || tag.contains("type=\"submit\"") {
                    continue;
                }
                let id = tag.split("id=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or_else(|| panic!("no id: {tag}"));
                assert!(html.contains(&format!("for=\"{id}\"")), "no label for {id}");
            }
        }
    }

    fn lists(nav: Nav) -> Lists {
        let entry = || ListEntry { entry: "192.0.2.0/24".into(), detail: "added today".into() };
        let list = AccessList { kind: "relay", title: "t", hint: "h", rows: vec![entry()] };
        Lists { nav, lists: vec![list], hostauth: vec![entry()], denied: vec![entry()] }
    }

    #[test]
    fn every_form_of_the_new_pages_carries_the_token() {
        let nav = || Nav { user: "admin".into(), csrf: "c".repeat(64), section: "lists", note: None };
        let domains = Domains { nav: nav(), domains: vec![DomainRow { name: "b.test".into(), origin: "added", removable: true }] };
        let aliases =
            Aliases { nav: nav(), aliases: vec![AliasRow { alias: "a@b.test".into(), targets: vec!["x@b.test".into()], catch_all: false }] };
        for (html, least) in [(domains.render().unwrap(), 3), (aliases.render().unwrap(), 4), (lists(nav()).render().unwrap(), 5)] {
            let forms = html.matches("method=\"post\"").count();
            assert!(forms >= least, "{forms} forms:\n{html}");
            assert_eq!(html.matches(&format!("name=\"csrf\" value=\"{}\"", "c".repeat(64))).count(), forms);
        }
    }

    #[test]
    fn every_form_that_changes_carries_the_token() {
        let nav = Nav { user: "admin".into(), csrf: "c".repeat(64), section: "users", note: None };
        let html = Users { nav, users: Vec::new() }.render().unwrap();
        let forms = html.matches("method=\"post\"").count();
        assert!(forms >= 2, "logout and add user");
        assert_eq!(html.matches(&format!("name=\"csrf\" value=\"{}\"", "c".repeat(64))).count(), forms);
    }
}
