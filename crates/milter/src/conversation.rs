//! One message's conversation with one milter, without I/O (issue 21).
//!
//! The driver asks [`Conversation::step`] what to do: write a packet, read a reply (for the
//! stage named, which chooses the timeout) and hand it to [`Conversation::receive`], or stop
//! with the [`Outcome`]. Negotiation decides which steps are sent and which are answered.

use std::collections::VecDeque;

use crate::ProtocolError;
use crate::wire::{self, ClientAddress, MacroStage, Packet, Reply, SmtpReply, action, cmd, proto};

/// The client as CONNECT describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The verified reverse name, or the address in brackets (`[192.0.2.7]`) when there is none.
    pub hostname: String,
    pub address: ClientAddress,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// Without angle brackets.
    pub address: String,
    /// ESMTP parameters, each `KEY=VALUE`.
    pub params: Vec<String>,
}

/// What a milter is shown: one message, as the client sent it (after earlier milters' changes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub client: Option<Client>,
    pub helo: String,
    /// Without angle brackets; empty for the null sender.
    pub mail_from: String,
    pub mail_params: Vec<String>,
    pub recipients: Vec<Recipient>,
    /// Header fields in order: the name, and the value as it follows the colon (leading space
    /// and CRLF folding included).
    pub headers: Vec<(String, String)>,
    /// The body, CRLF line ends, without the terminating dot.
    pub body: Vec<u8>,
    /// Macro values by name without braces (`j`, `daemon_name`, `i`, `auth_authen`, ...).
    /// `mail_addr` and `rcpt_addr` are filled in from the envelope.
    pub macros: Vec<(String, String)>,
}

/// The macros sent at each stage unless the milter asks for others: Postfix's defaults.
pub fn default_macros(stage: MacroStage) -> &'static [&'static str] {
    match stage {
        MacroStage::Connect => &["j", "daemon_name", "daemon_addr", "v", "_"],
        MacroStage::Helo => &["tls_version", "cipher", "cipher_bits", "cert_subject", "cert_issuer"],
        MacroStage::Mail => &["i", "auth_type", "auth_authen", "auth_author", "mail_addr", "mail_host", "mail_mailer"],
        MacroStage::Rcpt => &["rcpt_addr", "rcpt_host", "rcpt_mailer"],
        MacroStage::Data | MacroStage::Eoh | MacroStage::Eom => &["i"],
    }
}

/// Where the conversation is waiting for a reply; the driver picks the timeout from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Negotiate,
    Connect,
    Helo,
    Mail,
    /// The recipient at this index of [`Message::recipients`].
    Rcpt(usize),
    Data,
    Header,
    Eoh,
    Body,
    EndOfBody,
}

/// A change to the header, in the order the milter asked for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderChange {
    Add {
        name: String,
        value: String,
    },
    /// Insert at position `index` among all fields (0: first).
    Insert {
        index: u32,
        name: String,
        value: String,
    },
    /// Change the `index`th (from 1) field called `name`; an empty value deletes it.
    Change {
        index: u32,
        name: String,
        value: String,
    },
}

/// Everything a milter asked to change at end of body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Modifications {
    pub headers: Vec<HeaderChange>,
    /// The new body, the REPLBODY chunks joined.
    pub body: Option<Vec<u8>>,
    /// Recipients to add (without angle brackets) and their ESMTP parameters, if any.
    pub add_recipients: Vec<(String, Option<String>)>,
    /// Recipients to remove, without angle brackets.
    pub delete_recipients: Vec<String>,
    pub quarantine: Option<String>,
    /// How many PROGRESS packets came (each restarts the driver's timeout).
    pub progress: u32,
}

impl Modifications {
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
            && self.body.is_none()
            && self.add_recipients.is_empty()
            && self.delete_recipients.is_empty()
            && self.quarantine.is_none()
    }

    /// Applies the header changes to `headers` (name, value after the colon). Values the milter
    /// gave get a leading space unless the milter negotiated SMFIP_HDR_LEADSPC (`leadspc`), and
    /// CRLF line ends where they are folded (milters fold with LF, as sendmail gives them).
    /// Changing a field that is not there adds it, as sendmail does.
    pub fn apply_headers(&self, headers: &mut Vec<(String, String)>, leadspc: bool) {
        let value = |v: &str| {
            let v = v.replace("\r\n", "\n").replace('\n', "\r\n");
            if leadspc { v } else { format!(" {v}") }
        };
        for change in &self.headers {
            match change {
                HeaderChange::Add { name, value: v } => headers.push((name.clone(), value(v))),
                HeaderChange::Insert { index, name, value: v } => {
                    let at = (*index as usize).min(headers.len());
                    headers.insert(at, (name.clone(), value(v)));
                }
                HeaderChange::Change { index, name, value: v } => {
                    let found = headers
                        .iter()
                        .enumerate()
                        .filter(|(_, (n, _))| n.eq_ignore_ascii_case(name))
                        .nth((*index as usize).max(1) - 1)
                        .map(|(i, _)| i);
                    match (found, v.is_empty()) {
                        (Some(i), true) => {
                            headers.remove(i);
                        }
                        (Some(i), false) => headers[i].1 = value(v),
                        (None, true) => {}
                        (None, false) => headers.push((name.clone(), value(v))),
                    }
                }
            }
        }
    }
}

/// The milter's decision on the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// ACCEPT: take the message; the milter wants to see no more of it.
    Accept,
    /// CONTINUE at end of body: take the message.
    Continue,
    Reject(SmtpReply),
    Tempfail(SmtpReply),
    /// Say 250, then drop the message.
    Discard,
    /// Take the message into quarantine, for the reason given.
    Quarantine(String),
}

impl Verdict {
    /// Whether the message goes on (to the next milter and to the queue).
    pub fn passes(&self) -> bool {
        matches!(self, Verdict::Accept | Verdict::Continue)
    }
}

/// What to do when a milter cannot be reached, times out or breaks the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultAction {
    Accept,
    Reject,
    /// Postfix's default.
    #[default]
    Tempfail,
    Quarantine,
}

impl DefaultAction {
    pub fn verdict(self, milter: &str) -> Verdict {
        match self {
            DefaultAction::Accept => Verdict::Accept,
            DefaultAction::Reject => Verdict::Reject(SmtpReply { code: 550, text: "550 5.5.0 Service unavailable".into() }),
            DefaultAction::Tempfail => Verdict::Tempfail(SmtpReply::default_tempfail()),
            DefaultAction::Quarantine => Verdict::Quarantine(format!("milter {milter} unavailable")),
        }
    }
}

/// The end of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The stage whose reply decided (for the journal).
    pub stage: Stage,
    /// Empty unless the verdict came at end of body.
    pub modifications: Modifications,
    /// Recipients the milter refused at RCPT, with its reply; the message goes on to the rest.
    /// When it refuses them all, the verdict is the last refusal.
    pub rejected_recipients: Vec<(String, SmtpReply)>,
    /// The milter's answer to negotiation.
    pub negotiated: Option<Negotiated>,
}

/// What negotiation settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: u32,
    pub actions: u32,
    pub protocol: u32,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes to the milter.
    Send(Vec<u8>),
    /// Read one packet and give it to [`Conversation::receive`], within this stage's timeout.
    Receive(Stage),
    /// The conversation is over; close the connection.
    Done(Outcome),
}

struct Item {
    packet: Packet,
    /// The stage, if the milter answers this packet.
    answer: Option<Stage>,
}

pub struct Conversation {
    message: Message,
    queue: VecDeque<Item>,
    awaiting: Option<Stage>,
    negotiated: Option<Negotiated>,
    /// Macro names per stage, by `MacroStage as usize`.
    symlists: [Vec<String>; 7],
    modifications: Modifications,
    rejected: Vec<(String, SmtpReply)>,
    /// A MAIL-or-later packet went out, so an early end sends ABORT first.
    in_message: bool,
    verdict: Option<(Verdict, Stage)>,
    closing: VecDeque<Packet>,
    /// The most modification data (header fields, body, recipients) we take from the milter.
    limit: usize,
    taken: usize,
}

/// The default for [`Conversation::limit`].
pub const DEFAULT_LIMIT: usize = 64 * 1024 * 1024;

impl Conversation {
    pub fn new(message: Message) -> Self {
        let symlists = MacroStage::ALL.map(|s| default_macros(s).iter().map(|n| n.to_string()).collect());
        let optneg = wire::optneg(wire::VERSION, action::OFFERED, proto::OFFERED);
        Conversation {
            message,
            queue: VecDeque::from([Item { packet: optneg, answer: Some(Stage::Negotiate) }]),
            awaiting: None,
            negotiated: None,
            symlists,
            modifications: Modifications::default(),
            rejected: Vec::new(),
            in_message: false,
            verdict: None,
            closing: VecDeque::new(),
            limit: DEFAULT_LIMIT,
            taken: 0,
        }
    }

    /// The most bytes of modifications (header fields, replaced body, recipients) the milter
    /// may ask for, so that a broken milter cannot fill the memory; the server sets it from its
    /// message size limit. More is a protocol error.
    pub fn limit(mut self, bytes: usize) -> Self {
        self.limit = bytes;
        self
    }

    /// What to do next. Call again after each `Send` and each `receive`.
    pub fn step(&mut self) -> Step {
        if let Some(stage) = self.awaiting {
            return Step::Receive(stage);
        }
        if self.verdict.is_none() {
            if let Some(item) = self.queue.pop_front() {
                if matches!(item.packet.code, cmd::MAIL | cmd::RCPT | cmd::DATA | cmd::HEADER | cmd::EOH | cmd::BODY | cmd::BODYEOB) {
                    self.in_message = true;
                }
                self.awaiting = item.answer;
                return Step::Send(item.packet.encode());
            }
            // Unreachable: the plan ends with BODYEOB, whose answer finishes the conversation.
            self.finish(Verdict::Continue, Stage::EndOfBody);
        }
        if let Some(packet) = self.closing.pop_front() {
            return Step::Send(packet.encode());
        }
        let (verdict, stage) = self.verdict.clone().expect("finished");
        Step::Done(Outcome {
            verdict,
            stage,
            modifications: self.modifications.clone(),
            rejected_recipients: self.rejected.clone(),
            negotiated: self.negotiated.clone(),
        })
    }

    /// The packet read while `step` said `Receive`. An error means the milter broke the
    /// protocol: the driver closes the connection and applies the default action.
    pub fn receive(&mut self, packet: &Packet) -> Result<(), ProtocolError> {
        let Some(stage) = self.awaiting else { return Err(ProtocolError::Unexpected(packet.code)) };
        let reply = Reply::decode(packet)?;
        if stage == Stage::Negotiate {
            let Reply::Negotiate { version, actions, protocol, symlists } = reply else {
                return Err(ProtocolError::NotNegotiation(packet.code));
            };
            self.awaiting = None;
            return self.negotiate(version, actions, protocol, symlists);
        }
        let at_eob = stage == Stage::EndOfBody;
        let actions = self.negotiated.as_ref().map_or(0, |n| n.actions);
        let need = |flag: u32| if actions & flag != 0 { Ok(()) } else { Err(ProtocolError::NotNegotiated(packet.code)) };
        let modification = || if at_eob { Ok(()) } else { Err(ProtocolError::ModificationTooEarly(packet.code)) };
        if !matches!(reply, Reply::Accept | Reply::Continue | Reply::Discard | Reply::Reject | Reply::Tempfail | Reply::Progress | Reply::Skip) {
            self.taken += packet.data.len();
            if self.taken > self.limit {
                return Err(ProtocolError::TooMuch(self.limit));
            }
        }
        match reply {
            Reply::Continue if at_eob => self.finish(Verdict::Continue, stage),
            Reply::Continue => self.awaiting = None,
            Reply::Progress => {
                self.modifications.progress += 1;
            }
            Reply::Accept => self.finish(Verdict::Accept, stage),
            // Not allowed for the connection (libmilter's documentation); Postfix ignores it.
            Reply::Discard if matches!(stage, Stage::Connect | Stage::Helo) => self.awaiting = None,
            Reply::Discard => self.finish(Verdict::Discard, stage),
            Reply::Reject => self.refuse(SmtpReply::default_reject(), stage),
            Reply::Tempfail => self.refuse(SmtpReply::default_tempfail(), stage),
            Reply::ReplyCode(reply) => self.refuse(reply, stage),
            Reply::Shutdown | Reply::ConnFail => {
                let reply = SmtpReply { code: 421, text: "421 4.7.0 Server closing connection".into() };
                self.finish(Verdict::Tempfail(reply), stage);
            }
            Reply::Skip => {
                let protocol = self.negotiated.as_ref().map_or(0, |n| n.protocol);
                if stage != Stage::Body || protocol & proto::SKIP == 0 {
                    return Err(ProtocolError::UnexpectedSkip);
                }
                // The remaining chunks, and the macros that go ahead of them.
                self.queue.retain(|item| {
                    let p = &item.packet;
                    p.code != cmd::BODY && !(p.code == cmd::MACRO && p.data.first() == Some(&cmd::BODY))
                });
                self.awaiting = None;
            }
            Reply::AddHeader { name, value } => {
                modification()?;
                need(action::ADDHDRS)?;
                self.modifications.headers.push(HeaderChange::Add { name, value });
            }
            Reply::InsertHeader { index, name, value } => {
                modification()?;
                need(action::ADDHDRS)?;
                self.modifications.headers.push(HeaderChange::Insert { index, name, value });
            }
            Reply::ChangeHeader { index, name, value } => {
                modification()?;
                need(action::CHGHDRS)?;
                self.modifications.headers.push(HeaderChange::Change { index, name, value });
            }
            Reply::ReplaceBody(chunk) => {
                modification()?;
                need(action::CHGBODY)?;
                self.modifications.body.get_or_insert_with(Vec::new).extend_from_slice(&chunk);
            }
            Reply::AddRcpt { address, params } => {
                modification()?;
                need(if params.is_some() { action::ADDRCPT_PAR } else { action::ADDRCPT | action::ADDRCPT_PAR })?;
                self.modifications.add_recipients.push((unbracket(&address), params));
            }
            Reply::DelRcpt(address) => {
                modification()?;
                need(action::DELRCPT)?;
                self.modifications.delete_recipients.push(unbracket(&address));
            }
            // libmilter sends it only at end of body, but it is no modification of the content
            // and Postfix takes it at any stage; the stage's decision still follows.
            Reply::Quarantine(reason) => {
                need(action::QUARANTINE)?;
                self.modifications.quarantine = Some(reason);
            }
            Reply::ChangeFrom { .. } => return Err(ProtocolError::NotNegotiated(packet.code)),
            Reply::Negotiate { .. } | Reply::SetSymList { .. } => return Err(ProtocolError::Unexpected(packet.code)),
        }
        Ok(())
    }

    /// REJECT, TEMPFAIL or a reply code: at RCPT, for that recipient only (until none is left).
    fn refuse(&mut self, reply: SmtpReply, stage: Stage) {
        if let Stage::Rcpt(i) = stage {
            self.rejected.push((self.message.recipients[i].address.clone(), reply.clone()));
            if self.rejected.len() < self.message.recipients.len() {
                self.awaiting = None;
                return;
            }
        }
        let verdict = if reply.is_temporary() { Verdict::Tempfail(reply) } else { Verdict::Reject(reply) };
        self.finish(verdict, stage);
    }

    fn finish(&mut self, verdict: Verdict, stage: Stage) {
        let verdict = match (verdict, stage) {
            (Verdict::Accept | Verdict::Continue, _) if self.modifications.quarantine.is_some() => {
                Verdict::Quarantine(self.modifications.quarantine.clone().expect("quarantine"))
            }
            (verdict, _) => verdict,
        };
        if stage != Stage::EndOfBody {
            let quarantine = self.modifications.quarantine.take();
            self.modifications = Modifications { quarantine, ..Modifications::default() };
        }
        self.awaiting = None;
        self.queue.clear();
        if self.in_message && stage != Stage::EndOfBody {
            self.closing.push_back(wire::bare(cmd::ABORT));
        }
        self.closing.push_back(wire::bare(cmd::QUIT));
        self.verdict = Some((verdict, stage));
    }

    fn negotiate(&mut self, version: u32, actions: u32, protocol: u32, symlists: Vec<(MacroStage, String)>) -> Result<(), ProtocolError> {
        if !(wire::MIN_VERSION..=wire::VERSION).contains(&version) {
            return Err(ProtocolError::Version(version));
        }
        if actions & !action::OFFERED != 0 {
            return Err(ProtocolError::Actions(actions & !action::OFFERED));
        }
        // Steps we did not offer (SMFIP_RCPT_REJ, the buffer sizes SMFIP_MDS_*, ...) are left
        // out, as Postfix does: none of them changes what the milter answers.
        let mut protocol = protocol & proto::OFFERED;
        if version < 4 {
            // DATA came with version 4.
            protocol |= proto::NODATA;
        }
        for (stage, names) in symlists {
            self.symlists[stage as usize] = names.split_whitespace().map(|n| n.trim_start_matches('{').trim_end_matches('}').to_string()).collect();
        }
        self.negotiated = Some(Negotiated { version, actions, protocol });
        self.plan(protocol);
        Ok(())
    }

    /// Queues the steps the milter asked for, each after its macros.
    fn plan(&mut self, p: u32) {
        let on = |flag: u32| p & flag == 0;
        let answer = |nr: u32, stage: Stage| if p & nr == 0 { Some(stage) } else { None };
        let m = &self.message;
        let mut items = Vec::new();
        // Each command goes after the macros of its stage, if any has a value.
        let mut push = |macros: Vec<(String, String)>, packet: Packet, answer: Option<Stage>| {
            if !macros.is_empty() {
                items.push(Item { packet: wire::macros(packet.code, &macros), answer: None });
            }
            items.push(Item { packet, answer });
        };
        if on(proto::NOCONNECT) {
            let client = m.client.clone().unwrap_or(Client { hostname: "unknown".into(), address: ClientAddress::Unknown });
            push(self.macros(MacroStage::Connect, None), wire::connect(&client.hostname, &client.address), answer(proto::NR_CONN, Stage::Connect));
        }
        if on(proto::NOHELO) {
            push(self.macros(MacroStage::Helo, None), wire::helo(&m.helo), answer(proto::NR_HELO, Stage::Helo));
        }
        if on(proto::NOMAIL) {
            push(self.macros(MacroStage::Mail, None), wire::mail(&m.mail_from, &m.mail_params), answer(proto::NR_MAIL, Stage::Mail));
        }
        if on(proto::NORCPT) {
            for (i, r) in m.recipients.iter().enumerate() {
                push(self.macros(MacroStage::Rcpt, Some(&r.address)), wire::rcpt(&r.address, &r.params), answer(proto::NR_RCPT, Stage::Rcpt(i)));
            }
        }
        if on(proto::NODATA) {
            push(self.macros(MacroStage::Data, None), wire::bare(cmd::DATA), answer(proto::NR_DATA, Stage::Data));
        }
        if on(proto::NOHDRS) {
            for (name, value) in &m.headers {
                // As sendmail: one space (not a tab) after the colon is eaten unless the milter
                // asked for it, and folded lines are separated by LF alone.
                let value = if p & proto::HDR_LEADSPC != 0 { value } else { value.strip_prefix(' ').unwrap_or(value) };
                let value = value.replace("\r\n", "\n");
                push(self.macros(MacroStage::Eoh, None), wire::header(name, &value), answer(proto::NR_HDR, Stage::Header));
            }
        }
        if on(proto::NOEOH) {
            push(self.macros(MacroStage::Eoh, None), wire::bare(cmd::EOH), answer(proto::NR_EOH, Stage::Eoh));
        }
        if on(proto::NOBODY) {
            for chunk in wire::body(&m.body) {
                push(self.macros(MacroStage::Eom, None), chunk, answer(proto::NR_BODY, Stage::Body));
            }
        }
        push(self.macros(MacroStage::Eom, None), wire::bare(cmd::BODYEOB), Some(Stage::EndOfBody));
        self.queue.extend(items);
    }

    /// The macros for `stage`: the names the milter wants that have a value.
    fn macros(&self, stage: MacroStage, rcpt: Option<&str>) -> Vec<(String, String)> {
        let mail_addr = self.message.mail_from.as_str();
        let value = |name: &str| -> Option<String> {
            match name {
                "rcpt_addr" => rcpt.map(str::to_string),
                "mail_addr" => Some(mail_addr.to_string()),
                _ => self.message.macros.iter().find(|(n, _)| n.trim_start_matches('{').trim_end_matches('}') == name).map(|(_, v)| v.clone()),
            }
        };
        self.symlists[stage as usize].iter().filter_map(|n| Some((n.clone(), value(n)?))).collect()
    }
}

fn unbracket(address: &str) -> String {
    let a = address.trim();
    a.strip_prefix('<').and_then(|a| a.strip_suffix('>')).unwrap_or(a).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Decoder, rep};

    fn p(code: u8, data: &[u8]) -> Packet {
        Packet::new(code, data.to_vec())
    }

    fn neg(version: u32, actions: u32, protocol: u32) -> Packet {
        p(b'O', &[version, actions, protocol].iter().flat_map(|n| n.to_be_bytes()).collect::<Vec<u8>>())
    }

    fn message() -> Message {
        Message {
            client: Some(Client {
                hostname: "mail.remote.example".into(),
                address: ClientAddress::Inet { ip: "192.0.2.7".parse().unwrap(), port: 40000 },
            }),
            helo: "mail.remote.example".into(),
            mail_from: "jane@remote.example".into(),
            mail_params: vec!["SIZE=60".into()],
            recipients: vec![
                Recipient { address: "sam@example.test".into(), params: vec![] },
                Recipient { address: "kim@example.test".into(), params: vec!["NOTIFY=NEVER".into()] },
            ],
            headers: vec![("From".into(), " Jane <jane@remote.example>".into()), ("Subject".into(), " Lunch?".into())],
            body: b"Tomorrow at noon.\r\n".to_vec(),
            macros: vec![("j".into(), "mx.example.test".into()), ("i".into(), "Q42".into()), ("daemon_name".into(), "mx".into())],
        }
    }

    /// Runs a conversation; `answer` gives the packets the milter sends when a reply is due.
    fn run(message: Message, mut answer: impl FnMut(Stage) -> Vec<Packet>) -> (Vec<Packet>, Result<Outcome, ProtocolError>) {
        let mut conv = Conversation::new(message);
        let mut sent = Vec::new();
        let mut pending = VecDeque::new();
        for _ in 0..10_000 {
            match conv.step() {
                Step::Send(bytes) => {
                    let mut d = Decoder::new();
                    d.push(&bytes);
                    sent.push(d.next_packet().unwrap().unwrap());
                    assert_eq!(d.pending(), 0, "one packet per Send");
                }
                Step::Receive(stage) => {
                    if pending.is_empty() {
                        pending.extend(answer(stage));
                    }
                    let packet = pending.pop_front().expect("a reply");
                    if let Err(e) = conv.receive(&packet) {
                        return (sent, Err(e));
                    }
                }
                Step::Done(outcome) => return (sent, Ok(outcome)),
            }
        }
        panic!("the conversation did not end");
    }

    fn codes(sent: &[Packet]) -> String {
        sent.iter().map(|p| char::from(p.code)).collect()
    }

    /// A milter that negotiates `protocol` and `actions` and continues everywhere else.
    fn continuing(actions: u32, protocol: u32) -> impl FnMut(Stage) -> Vec<Packet> {
        move |stage| if stage == Stage::Negotiate { vec![neg(6, actions, protocol)] } else { vec![p(b'c', b"")] }
    }

    #[test]
    fn every_step_in_order_with_its_macros() {
        let mut m = message();
        m.headers.push(("X-Folded".into(), "\tone\r\n two".into()));
        let (sent, outcome) = run(m, continuing(0, 0));
        assert_eq!(codes(&sent), "ODCHDMDRDRDTDLDLDLDNDBDEQ");
        assert_eq!(sent[0].data, [6u32, action::OFFERED, proto::OFFERED].iter().flat_map(|n| n.to_be_bytes()).collect::<Vec<u8>>());
        assert_eq!(sent[1].data, b"Cj\0mx.example.test\0{daemon_name}\0mx\0");
        assert_eq!(sent[2].data, b"mail.remote.example\x004\x9c\x40192.0.2.7\0");
        assert_eq!(sent[3].data, b"mail.remote.example\0");
        assert_eq!(sent[4].data, b"Mi\0Q42\0{mail_addr}\0jane@remote.example\0");
        assert_eq!(sent[5].data, b"<jane@remote.example>\0SIZE=60\0");
        assert_eq!(sent[6].data, b"R{rcpt_addr}\0sam@example.test\0");
        assert_eq!(sent[8].data, b"R{rcpt_addr}\0kim@example.test\0");
        assert_eq!(sent[9].data, b"<kim@example.test>\0NOTIFY=NEVER\0");
        assert_eq!(sent[10].data, b"Ti\0Q42\0");
        // The end-of-header macros go ahead of each header, the end-of-message ones ahead of
        // each body chunk, each tagged with the command it precedes.
        assert_eq!(sent[12].data, b"Li\0Q42\0");
        // Without SMFIP_HDR_LEADSPC one space after the colon is eaten (a tab is not), and
        // folded lines are joined by LF, as sendmail sends them.
        assert_eq!(sent[13].data, b"From\0Jane <jane@remote.example>\0");
        assert_eq!(sent[15].data, b"Subject\0Lunch?\0");
        assert_eq!(sent[17].data, b"X-Folded\0\tone\n two\0");
        assert_eq!(sent[18].data, b"Ni\0Q42\0");
        assert_eq!(sent[20].data, b"Bi\0Q42\0");
        assert_eq!(sent[21].data, b"Tomorrow at noon.\r\n");
        assert_eq!(sent[22].data, b"Ei\0Q42\0");
        let outcome = outcome.unwrap();
        assert_eq!(outcome.verdict, Verdict::Continue);
        assert_eq!(outcome.stage, Stage::EndOfBody);
        assert!(outcome.modifications.is_empty());
        assert!(outcome.rejected_recipients.is_empty());
        assert_eq!(outcome.negotiated, Some(Negotiated { version: 6, actions: 0, protocol: 0 }));
    }

    #[test]
    fn a_milter_without_connect_and_helo_and_its_own_macro_lists() {
        let mut reply = neg(6, action::SETSYMLIST, proto::NOCONNECT | proto::NOHELO);
        reply.data.extend(2u32.to_be_bytes());
        reply.data.extend(b"{auth_authen} j\0");
        reply.data.extend(5u32.to_be_bytes());
        reply.data.extend(b"{i}\0");
        let mut m = message();
        m.macros.push(("auth_authen".into(), "sam".into()));
        let (sent, outcome) = run(m, |stage| if stage == Stage::Negotiate { vec![reply.clone()] } else { vec![p(b'c', b"")] });
        assert_eq!(codes(&sent), "ODMDRDRDTDLDLDNDBDEQ");
        assert_eq!(sent[1].data, b"M{auth_authen}\0sam\0j\0mx.example.test\0");
        assert_eq!(sent[sent.len() - 3].data, b"Ei\0Q42\0");
        assert_eq!(outcome.unwrap().verdict, Verdict::Continue);
    }

    #[test]
    fn steps_left_out_and_steps_not_answered() {
        let protocol = proto::NOHDRS | proto::NOEOH | proto::NOBODY | proto::NODATA | proto::NR_CONN | proto::NR_HELO | proto::NR_RCPT;
        let mut asked = Vec::new();
        let (sent, outcome) = run(message(), |stage| {
            asked.push(stage);
            if stage == Stage::Negotiate { vec![neg(6, 0, protocol)] } else { vec![p(b'c', b"")] }
        });
        assert_eq!(codes(&sent), "ODCHDMDRDRDEQ");
        assert_eq!(asked, [Stage::Negotiate, Stage::Mail, Stage::EndOfBody]);
        assert_eq!(outcome.unwrap().verdict, Verdict::Continue);
    }

    #[test]
    fn header_values_keep_their_leading_space_when_negotiated() {
        let (sent, _) =
            run(message(), continuing(0, proto::HDR_LEADSPC | proto::NOCONNECT | proto::NOHELO | proto::NOMAIL | proto::NORCPT | proto::NODATA));
        assert_eq!(codes(&sent), "ODLDLDNDBDEQ");
        assert_eq!(sent[2].data, b"From\0 Jane <jane@remote.example>\0");
    }

    #[test]
    fn an_old_milter_gets_no_data_command() {
        let (sent, outcome) = run(message(), |stage| if stage == Stage::Negotiate { vec![neg(2, 0, 0)] } else { vec![p(b'c', b"")] });
        assert_eq!(codes(&sent), "ODCHDMDRDRDLDLDNDBDEQ");
        assert_eq!(outcome.unwrap().negotiated.unwrap().protocol, proto::NODATA);
    }

    #[test]
    fn the_body_goes_in_chunks_and_skip_ends_it() {
        let mut m = message();
        m.body = vec![b'x'; wire::CHUNK_SIZE * 3];
        let (sent, _) = run(
            m.clone(),
            continuing(0, proto::NOCONNECT | proto::NOHELO | proto::NOMAIL | proto::NORCPT | proto::NODATA | proto::NOHDRS | proto::NOEOH),
        );
        assert_eq!(codes(&sent), "ODBDBDBDEQ");
        let (sent, outcome) = run(m, |stage| match stage {
            Stage::Negotiate => {
                vec![neg(6, 0, proto::SKIP | proto::NOCONNECT | proto::NOHELO | proto::NOMAIL | proto::NORCPT | proto::NODATA | proto::NOHDRS)]
            }
            Stage::Body => vec![p(b's', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODNDBDEQ");
        assert_eq!(outcome.unwrap().verdict, Verdict::Continue);
    }

    #[test]
    fn skip_without_negotiating_it_or_outside_the_body_is_an_error() {
        let (_, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            Stage::Body => vec![p(b's', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(outcome, Err(ProtocolError::UnexpectedSkip));
        let (_, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, proto::SKIP)],
            Stage::Mail => vec![p(b's', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(outcome, Err(ProtocolError::UnexpectedSkip));
    }

    #[test]
    fn a_reject_at_rcpt_refuses_that_recipient_only() {
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            Stage::Rcpt(0) => vec![p(b'y', b"550 5.1.1 <sam@example.test>: no such user\0")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODCHDMDRDRDTDLDLDNDBDEQ");
        let outcome = outcome.unwrap();
        assert_eq!(outcome.verdict, Verdict::Continue);
        assert_eq!(
            outcome.rejected_recipients,
            [("sam@example.test".to_string(), SmtpReply { code: 550, text: "550 5.1.1 <sam@example.test>: no such user".into() })]
        );
    }

    #[test]
    fn refusing_every_recipient_refuses_the_message() {
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            Stage::Rcpt(0) => vec![p(b'r', b"")],
            Stage::Rcpt(_) => vec![p(b't', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODCHDMDRDRAQ");
        let outcome = outcome.unwrap();
        assert_eq!(outcome.verdict, Verdict::Tempfail(SmtpReply::default_tempfail()));
        assert_eq!(outcome.stage, Stage::Rcpt(1));
        assert_eq!(outcome.rejected_recipients[0].1, SmtpReply::default_reject());
    }

    #[test]
    fn tempfail_and_reject_end_the_conversation_where_they_come() {
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            Stage::Mail => vec![p(b't', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODCHDMAQ");
        let outcome = outcome.unwrap();
        assert_eq!(outcome.verdict, Verdict::Tempfail(SmtpReply { code: 451, text: "451 4.7.1 Service unavailable - try again later".into() }));
        assert_eq!(outcome.stage, Stage::Mail);
        // Before the message starts there is nothing to abort.
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            _ => vec![p(b'r', b"")],
        });
        assert_eq!(codes(&sent), "ODCQ");
        assert_eq!(outcome.unwrap().verdict, Verdict::Reject(SmtpReply { code: 550, text: "550 5.7.1 Command rejected".into() }));
        // A 4xx reply code is a tempfail; a 5xx at end of body a reject with the milter's text.
        let (_, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            Stage::Header => vec![p(b'y', b"452 4.3.1 Busy\0")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(outcome.unwrap().verdict, Verdict::Tempfail(SmtpReply { code: 452, text: "452 4.3.1 Busy".into() }));
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            Stage::EndOfBody => vec![p(b'y', b"554 5.7.1 Spam detected\0")],
            _ => vec![p(b'c', b"")],
        });
        assert!(codes(&sent).ends_with("EQ"), "no ABORT after end of body");
        assert_eq!(outcome.unwrap().verdict, Verdict::Reject(SmtpReply { code: 554, text: "554 5.7.1 Spam detected".into() }));
    }

    #[test]
    fn accept_and_discard_end_early() {
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            Stage::Helo => vec![p(b'a', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODCHQ");
        let outcome = outcome.unwrap();
        assert_eq!((outcome.verdict, outcome.stage), (Verdict::Accept, Stage::Helo));
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            Stage::Rcpt(1) => vec![p(b'd', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODCHDMDRDRAQ");
        assert_eq!(outcome.unwrap().verdict, Verdict::Discard);
    }

    #[test]
    fn modifications_at_end_of_body() {
        let actions = action::ADDHDRS | action::CHGHDRS | action::CHGBODY | action::ADDRCPT | action::ADDRCPT_PAR | action::DELRCPT;
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, actions, proto::SKIP)],
            Stage::EndOfBody => vec![
                p(b'p', b""),
                p(b'h', b"X-Spam-Flag\0NO\0"),
                p(b'i', b"\0\0\0\0DKIM-Signature\0v=1; a=rsa-sha256\0"),
                p(b'm', b"\0\0\0\x01Subject\0[ok] Lunch?\0"),
                p(b'b', b"New body,\r\n"),
                p(b'b', b"in two chunks.\r\n"),
                p(b'+', b"<audit@example.test>\0"),
                p(b'2', b"<copy@example.test>\0NOTIFY=NEVER\0"),
                p(b'-', b"<kim@example.test>\0"),
                p(b'p', b""),
                p(b'a', b""),
            ],
            _ => vec![p(b'c', b"")],
        });
        assert!(codes(&sent).ends_with("EQ"));
        let outcome = outcome.unwrap();
        assert_eq!(outcome.verdict, Verdict::Accept);
        let m = &outcome.modifications;
        assert_eq!(m.progress, 2);
        assert_eq!(m.body.as_deref(), Some(&b"New body,\r\nin two chunks.\r\n"[..]));
        assert_eq!(m.add_recipients, [("audit@example.test".to_string(), None), ("copy@example.test".to_string(), Some("NOTIFY=NEVER".to_string()))]);
        assert_eq!(m.delete_recipients, ["kim@example.test"]);
        assert_eq!(m.quarantine, None);
        let mut headers = message().headers;
        m.apply_headers(&mut headers, false);
        assert_eq!(
            headers,
            [
                ("DKIM-Signature".to_string(), " v=1; a=rsa-sha256".to_string()),
                ("From".to_string(), " Jane <jane@remote.example>".to_string()),
                ("Subject".to_string(), " [ok] Lunch?".to_string()),
                ("X-Spam-Flag".to_string(), " NO".to_string()),
            ]
        );
    }

    /// The exchange as Debian's opendkim (signing) had it with the `milter-check` example: it
    /// asks for ADDHDRS, CHGHDRS and SETSYMLIST, leaves out HELO, DATA and UNKNOWN, takes SKIP
    /// and leading spaces, and inserts its signature on top, folded with LF, at end of body.
    #[test]
    fn a_conversation_as_opendkim_has_it() {
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0x111, 0x0010_0702)],
            Stage::EndOfBody => vec![p(b'i', b"\0\0\0\0DKIM-Signature\0 v=1; a=rsa-sha256; d=example.test;\n\tb=abc\0"), p(b'a', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODCDMDRDRDLDLDNDBDEQ");
        assert_eq!(sent[10].data, b"From\0 Jane <jane@remote.example>\0");
        let outcome = outcome.unwrap();
        assert_eq!(outcome.verdict, Verdict::Accept);
        let mut headers = message().headers;
        outcome.modifications.apply_headers(&mut headers, true);
        assert_eq!(headers[0], ("DKIM-Signature".to_string(), " v=1; a=rsa-sha256; d=example.test;\r\n\tb=abc".to_string()));
        assert_eq!(headers.len(), 3);
    }

    /// The exchange as Debian's spamass-milter (with spamd, `-r 5`) had it for GTUBE: it asks
    /// for ADDHDRS, CHGBODY and CHGHDRS, leaves out DATA and UNKNOWN, adds its headers at end
    /// of body and then refuses with its own reply.
    #[test]
    fn a_conversation_as_spamass_milter_has_it() {
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0x13, 0x300)],
            Stage::EndOfBody => vec![
                p(b'h', b"X-Spam-Flag\0YES\0"),
                p(b'h', b"X-Spam-Status\0Yes, score=1000.8 required=5.0 tests=GTUBE,\n\tUNPARSEABLE_RELAY\0"),
                p(b'y', b"550 5.7.1 Blocked by SpamAssassin\0"),
            ],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODCHDMDRDRDLDLDNDBDEQ");
        let outcome = outcome.unwrap();
        assert_eq!(outcome.verdict, Verdict::Reject(SmtpReply { code: 550, text: "550 5.7.1 Blocked by SpamAssassin".into() }));
        assert_eq!(outcome.stage, Stage::EndOfBody);
        // The refused message is never stored, but the journal may say what the milter found.
        assert_eq!(outcome.modifications.headers.len(), 2);
    }

    #[test]
    fn quarantine_at_end_of_body() {
        let (_, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, action::QUARANTINE, 0)],
            Stage::EndOfBody => vec![p(b'q', b"spam score 12.5\0"), p(b'c', b"")],
            _ => vec![p(b'c', b"")],
        });
        let outcome = outcome.unwrap();
        assert_eq!(outcome.verdict, Verdict::Quarantine("spam score 12.5".into()));
        assert!(!outcome.verdict.passes());
        // A later reject wins over the quarantine.
        let (_, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, action::QUARANTINE, 0)],
            Stage::EndOfBody => vec![p(b'q', b"spam\0"), p(b'r', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(outcome.unwrap().verdict, Verdict::Reject(SmtpReply::default_reject()));
    }

    #[test]
    fn discard_for_the_connection_is_ignored() {
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, proto::NOHDRS | proto::NOBODY)],
            Stage::Connect | Stage::Helo => vec![p(b'd', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODCHDMDRDRDTDNDEQ");
        assert_eq!(outcome.unwrap().verdict, Verdict::Continue);
    }

    #[test]
    fn quarantine_before_end_of_body_holds() {
        // Postfix takes QUARANTINE at any stage; the stage's decision still follows.
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, action::QUARANTINE, 0)],
            Stage::Mail => vec![p(b'q', b"held at MAIL\0"), p(b'c', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert!(codes(&sent).ends_with("DEQ"));
        assert_eq!(outcome.unwrap().verdict, Verdict::Quarantine("held at MAIL".into()));
        let (sent, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, action::QUARANTINE, 0)],
            Stage::Rcpt(0) => vec![p(b'q', b"held\0"), p(b'a', b"")],
            _ => vec![p(b'c', b"")],
        });
        assert_eq!(codes(&sent), "ODCHDMDRAQ");
        let outcome = outcome.unwrap();
        assert_eq!((outcome.verdict, outcome.stage), (Verdict::Quarantine("held".into()), Stage::Rcpt(0)));
        assert_eq!(outcome.modifications, Modifications { quarantine: Some("held".into()), ..Modifications::default() });
    }

    #[test]
    fn modifications_beyond_the_limit_are_an_error() {
        let mut conv = Conversation::new(message()).limit(10);
        let mut replies = VecDeque::from([
            neg(
                6,
                action::CHGBODY,
                proto::NOCONNECT | proto::NOHELO | proto::NOMAIL | proto::NORCPT | proto::NODATA | proto::NOHDRS | proto::NOEOH | proto::NOBODY,
            ),
            p(b'b', b"12345"),
            p(b'b', b"67890"),
            p(b'b', b"x"),
        ]);
        let error = loop {
            match conv.step() {
                Step::Send(_) => {}
                Step::Receive(_) => {
                    if let Err(e) = conv.receive(&replies.pop_front().unwrap()) {
                        break e;
                    }
                }
                Step::Done(o) => panic!("ended with {o:?}"),
            }
        };
        assert_eq!(error, ProtocolError::TooMuch(10));
        assert!(replies.is_empty());
    }

    #[test]
    fn shutdown_is_a_tempfail() {
        let (_, outcome) = run(message(), |stage| match stage {
            Stage::Negotiate => vec![neg(6, 0, 0)],
            _ => vec![p(rep::SHUTDOWN, b"")],
        });
        assert_eq!(outcome.unwrap().verdict, Verdict::Tempfail(SmtpReply { code: 421, text: "421 4.7.0 Server closing connection".into() }));
    }

    #[test]
    fn negotiation_errors() {
        let answer = |reply: Packet| move |_: Stage| vec![reply.clone()];
        assert_eq!(run(message(), answer(neg(7, 0, 0))).1, Err(ProtocolError::Version(7)));
        assert_eq!(run(message(), answer(neg(1, 0, 0))).1, Err(ProtocolError::Version(1)));
        assert_eq!(run(message(), answer(neg(6, action::CHGFROM, 0))).1, Err(ProtocolError::Actions(action::CHGFROM)));
        assert_eq!(run(message(), answer(p(b'c', b""))).1, Err(ProtocolError::NotNegotiation(b'c')));
        assert!(matches!(run(message(), answer(p(b'O', b"\0\0\0\x06"))).1, Err(ProtocolError::Malformed { code: b'O', .. })));
        // The buffer-size bits are only information.
        // Steps we did not offer, and the buffer-size bits, are left out.
        let (_, outcome) = run(message(), |stage| {
            if stage == Stage::Negotiate { vec![neg(6, 0, 0x1000_0000 | proto::RCPT_REJ | proto::NOHELO)] } else { vec![p(b'c', b"")] }
        });
        assert_eq!(outcome.unwrap().negotiated.unwrap().protocol, proto::NOHELO);
    }

    #[test]
    fn protocol_errors_during_the_message() {
        let at = |bad_stage: Stage, reply: Packet, actions: u32| {
            run(message(), move |stage| match stage {
                Stage::Negotiate => vec![neg(6, actions, 0)],
                s if s == bad_stage => vec![reply.clone()],
                _ => vec![p(b'c', b"")],
            })
            .1
        };
        assert_eq!(at(Stage::Mail, p(b'h', b"X\0y\0"), action::ADDHDRS), Err(ProtocolError::ModificationTooEarly(b'h')));
        assert_eq!(at(Stage::EndOfBody, p(b'h', b"X\0y\0"), 0), Err(ProtocolError::NotNegotiated(b'h')));
        assert_eq!(at(Stage::EndOfBody, p(b'b', b"x"), action::ADDHDRS), Err(ProtocolError::NotNegotiated(b'b')));
        assert_eq!(at(Stage::EndOfBody, p(b'2', b"<a@b>\0X=1\0"), action::ADDRCPT), Err(ProtocolError::NotNegotiated(b'2')));
        assert_eq!(at(Stage::EndOfBody, p(b'q', b"why\0"), 0), Err(ProtocolError::NotNegotiated(b'q')));
        assert_eq!(at(Stage::EndOfBody, p(b'e', b"<a@b>\0"), action::OFFERED), Err(ProtocolError::NotNegotiated(b'e')));
        assert_eq!(at(Stage::Connect, p(b'O', &[0; 12]), 0), Err(ProtocolError::Unexpected(b'O')));
        assert_eq!(at(Stage::Connect, p(b'l', b"\0\0\0\0j\0"), 0), Err(ProtocolError::Unexpected(b'l')));
        assert_eq!(at(Stage::Helo, p(b'Z', b""), 0), Err(ProtocolError::UnknownReply(b'Z')));
        assert!(matches!(at(Stage::EndOfBody, p(b'm', b"\0\0"), action::CHGHDRS), Err(ProtocolError::Malformed { code: b'm', .. })));
        assert!(matches!(at(Stage::Rcpt(0), p(b'y', b"250 fine\0"), 0), Err(ProtocolError::BadReplyCode(_))));
    }

    #[test]
    fn a_reply_when_none_is_due_is_an_error() {
        let mut conv = Conversation::new(message());
        assert_eq!(conv.receive(&p(b'c', b"")), Err(ProtocolError::Unexpected(b'c')));
    }

    #[test]
    fn a_message_without_client_facts() {
        let mut m = message();
        m.client = None;
        m.macros.clear();
        m.body.clear();
        let (sent, _) = run(m, continuing(0, 0));
        assert_eq!(codes(&sent), "OCHDMDRDRTLLNEQ");
        assert_eq!(sent[1].data, b"unknown\0U");
    }

    #[test]
    fn applying_header_changes() {
        let mut headers: Vec<(String, String)> =
            vec![("Received".into(), " a".into()), ("Received".into(), " b".into()), ("Subject".into(), " s".into())];
        let m = Modifications {
            headers: vec![
                HeaderChange::Change { index: 2, name: "received".into(), value: "".into() },
                HeaderChange::Change { index: 1, name: "X-Missing".into(), value: "".into() },
                HeaderChange::Change { index: 1, name: "X-New".into(), value: "added".into() },
                HeaderChange::Insert { index: 99, name: "X-Last".into(), value: "z".into() },
                HeaderChange::Insert { index: 1, name: "X-Second".into(), value: " y\n\tfolded\r\n\tagain".into() },
            ],
            ..Modifications::default()
        };
        m.apply_headers(&mut headers, true);
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["Received", "X-Second", "Subject", "X-New", "X-Last"]);
        assert_eq!(headers[0].1, " a");
        assert_eq!(headers[1].1, " y\r\n\tfolded\r\n\tagain");
        assert_eq!(headers[3].1, "added");
    }

    #[test]
    fn default_actions() {
        assert_eq!(DefaultAction::default(), DefaultAction::Tempfail);
        assert_eq!(DefaultAction::Tempfail.verdict("opendkim"), Verdict::Tempfail(SmtpReply::default_tempfail()));
        assert_eq!(DefaultAction::Accept.verdict("opendkim"), Verdict::Accept);
        assert!(matches!(DefaultAction::Reject.verdict("opendkim"), Verdict::Reject(r) if r.code == 550));
        assert_eq!(DefaultAction::Quarantine.verdict("opendkim"), Verdict::Quarantine("milter opendkim unavailable".into()));
    }
}
