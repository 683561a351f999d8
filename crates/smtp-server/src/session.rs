//! The inbound SMTP session (RFC 5321, RFC 2920 pipelining, RFC 1870 SIZE), sans-IO:
//! [`Session::handle`] takes an [`Event`] and returns [`Action`]s; the driver does the I/O.
//!
//! Input is buffered inside the session. While an action waits for its answer (a recipient
//! check, the enqueue commit) the session processes nothing more, so pipelined commands are
//! answered in order. The 250 after DATA is produced only by `EnqueueDone(Ok)`.

use mail_framework::Envelope;
use mail_proto::data::ReceivedCounter;
use mail_proto::smtp_command::{self, Command, CommandError, Param};
use mail_proto::{Address, AddressError, DataDecoder, DataEvent, LineEndings, Reply};

/// What the session needs to know of the server's configuration.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub vrfy: bool,
    pub line_endings: LineEndings,
    pub max_hops: usize,
    pub max_errors: u32,
    /// Ask the driver about HELO/EHLO names (R10) before answering them.
    pub verify_helo: bool,
}

/// Verdict on one RCPT, from the directory and the policy module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptVerdict {
    Accept,
    /// Accepted, recorded in the envelope as this address (a percent-routed or own-IP-literal
    /// recipient after rewriting).
    AcceptAs(Address),
    Refuse(Reply),
}

#[derive(Debug)]
pub enum Event<'a> {
    Connected,
    Bytes(&'a [u8]),
    RcptChecked(RcptVerdict),
    /// Answer to `CheckHelo`: `None` accepts, `Some(reply)` refuses.
    HeloChecked(Option<Reply>),

    /// The queue id on success.
    EnqueueDone(Result<String, String>),
    Timeout,
}

#[derive(Debug, PartialEq)]
pub enum Action {
    Reply(Reply),
    /// Ask the directory and policy about a recipient; answer with `RcptChecked`.
    CheckRcpt(Address),
    /// Verify a HELO/EHLO name (R10); answer with `HeloChecked`.
    CheckHelo(String),
    /// The client sent a command line beyond the limits (R9): the driver may deny its address.
    Penalize,
    /// A message body starts: the driver opens an incoming message and writes Received.
    BeginData { helo: String, esmtp: bool, single_rcpt: Option<String> },
    /// Decoded message bytes (CRLF line ends, dots unstuffed).
    BodyChunk(Vec<u8>),
    /// DATA ended well: commit the message; answer with `EnqueueDone`.
    Enqueue(Envelope),
    /// DATA ended badly (too big, too many hops, cut off): drop what was stored.
    AbortData,
    Close,
}

/// Which deadline applies to the next read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Command,
    Data,
}

#[derive(Debug)]
struct Transaction {
    from: Option<Address>,
    rcpts: Vec<Address>,
}

#[derive(Debug)]
enum Waiting {
    Nothing,
    Helo { name: String, esmtp: bool },
    Rcpt(Address),
    Enqueue,
}

#[derive(Debug)]
struct DataState {
    decoder: DataDecoder,
    received: ReceivedCounter,
    size: u64,
    too_big: bool,
}

/// A synchronous policy check of MAIL FROM (R8): `Some(reply)` refuses. No I/O: the lists it
/// consults were loaded when the connection was accepted.
pub type SenderCheck = Box<dyn Fn(Option<&Address>) -> Option<Reply> + Send + Sync>;

pub struct Session {
    config: SessionConfig,
    sender_check: Option<SenderCheck>,
    client_ip: String,
    helo: Option<(String, bool)>,
    tx: Option<Transaction>,
    data: Option<DataState>,
    waiting: Waiting,
    input: Vec<u8>,
    /// Discarding the rest of an over-long command line.
    skipping_line: bool,
    errors: u32,
    commands: u64,
    closed: bool,
}

impl Session {
    pub fn new(config: SessionConfig, client_ip: String) -> Self {
        Session {
            config,
            sender_check: None,
            client_ip,
            helo: None,
            tx: None,
            data: None,
            waiting: Waiting::Nothing,
            input: Vec::new(),
            skipping_line: false,
            errors: 0,
            commands: 0,
            closed: false,
        }
    }

    /// Check every MAIL FROM with `check`.
    pub fn with_sender_check(mut self, check: SenderCheck) -> Self {
        self.sender_check = Some(check);
        self
    }

    pub fn phase(&self) -> Phase {
        if self.data.is_some() { Phase::Data } else { Phase::Command }
    }

    /// Completed commands so far: the driver restarts the command deadline when it changes.
    pub fn progress(&self) -> u64 {
        self.commands
    }

    /// The HELO/EHLO name and whether it was EHLO.
    pub fn helo(&self) -> Option<(&str, bool)> {
        self.helo.as_ref().map(|(h, e)| (h.as_str(), *e))
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn handle(&mut self, event: Event<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        if self.closed {
            return out;
        }
        match event {
            Event::Connected => out.push(Action::Reply(Reply::plain(220, format!("{} ESMTP Postroom", self.config.hostname)))),
            Event::Bytes(bytes) => {
                if self.data.is_some() && self.input.is_empty() && matches!(self.waiting, Waiting::Nothing) {
                    let used = self.feed_data(bytes, &mut out);
                    self.input.extend_from_slice(&bytes[used..]);
                } else {
                    self.input.extend_from_slice(bytes);
                }
            }
            Event::RcptChecked(verdict) => {
                let Waiting::Rcpt(addr) = std::mem::replace(&mut self.waiting, Waiting::Nothing) else { return out };
                let accepted = match verdict {
                    RcptVerdict::Accept => addr,
                    RcptVerdict::AcceptAs(rewritten) => rewritten,
                    RcptVerdict::Refuse(r) => {
                        self.reply(&mut out, r);
                        self.process_input(&mut out);
                        return out;
                    }
                };
                if let Some(tx) = self.tx.as_mut() {
                    tx.rcpts.push(accepted);
                }
                self.reply(&mut out, Reply::new(250, (1, 5), "Ok"));
            }
            Event::HeloChecked(verdict) => {
                let Waiting::Helo { name, esmtp } = std::mem::replace(&mut self.waiting, Waiting::Nothing) else { return out };
                match verdict {
                    None => self.greet(name, esmtp, &mut out),
                    Some(r) => self.reply(&mut out, r),
                }
            }
            Event::EnqueueDone(result) => {
                if !matches!(self.waiting, Waiting::Enqueue) {
                    return out;
                }
                self.waiting = Waiting::Nothing;
                self.tx = None;
                match result {
                    Ok(qid) => self.reply(&mut out, Reply::new(250, (0, 0), format!("Ok: queued as {qid}"))),
                    // Never 250 unless the commit returned (F1).
                    Err(_) => self.reply(&mut out, Reply::new(451, (3, 0), "Local error in processing, try again later")),
                }
            }
            Event::Timeout => {
                out.push(Action::Reply(Reply::new(421, (4, 2), format!("{} Error: timeout exceeded", self.config.hostname))));
                if self.data.take().is_some() {
                    out.push(Action::AbortData);
                }
                self.close(&mut out);
                return out;
            }
        }
        self.process_input(&mut out);
        out
    }

    fn process_input(&mut self, out: &mut Vec<Action>) {
        while !self.closed && matches!(self.waiting, Waiting::Nothing) && !self.input.is_empty() {
            if self.data.is_some() {
                let input = std::mem::take(&mut self.input);
                let used = self.feed_data(&input, out);
                self.input = input[used..].to_vec();
                if self.data.is_some() {
                    return;
                }
                continue;
            }
            let Some(lf) = self.input.iter().position(|&b| b == b'\n') else {
                if self.input.len() > smtp_command::MAX_MAIL_RCPT_LINE {
                    self.input.clear();
                    if !self.skipping_line {
                        self.skipping_line = true;
                        self.reply(out, Reply::new(500, (5, 2), "Error: line too long"));
                        out.push(Action::Penalize);
                    }
                }
                return;
            };
            let mut line: Vec<u8> = self.input.drain(..=lf).collect();
            if std::mem::take(&mut self.skipping_line) {
                continue;
            }
            if line.len() > smtp_command::line_limit(&line) {
                self.reply(out, Reply::new(500, (5, 2), "Error: line too long"));
                out.push(Action::Penalize);
                continue;
            }
            line.truncate(line.len() - 1);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.commands += 1;
            self.command(&line, out);
        }
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<Action>) {
        let cmd = match smtp_command::parse(line) {
            Ok(c) => c,
            Err(e) => return self.syntax_error(line, e, out),
        };
        match cmd {
            Command::Helo(name) => self.hello(name, false, out),
            Command::Ehlo(name) => self.hello(name, true, out),
            Command::Mail { from, params } => self.mail(from, params, out),
            Command::Rcpt { to, params } => self.rcpt(to, params, out),
            Command::Data => self.data_command(out),
            Command::Rset => {
                self.tx = None;
                self.reply(out, Reply::new(250, (0, 0), "Ok"));
            }
            Command::Noop => self.reply(out, Reply::new(250, (0, 0), "Ok")),
            Command::Quit => {
                self.reply(out, Reply::new(221, (0, 0), "Bye"));
                self.close(out);
            }
            Command::Help => self.reply(out, Reply::new(214, (0, 0), "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY")),
            Command::Vrfy(arg) => {
                let r = if !self.config.vrfy {
                    Reply::new(502, (5, 1), "VRFY command is disabled")
                } else if arg.is_empty() {
                    Reply::new(501, (5, 4), "Syntax: VRFY address")
                } else {
                    // S1: never an address-harvesting tool.
                    Reply::new(252, (5, 2), "Cannot VRFY user, but will accept message and attempt delivery")
                };
                self.reply(out, r);
            }
            Command::StartTls | Command::Auth(_) => self.reply(out, Reply::new(502, (5, 1), "Command not implemented")),
            Command::NotImplemented(_) => self.reply(out, Reply::new(502, (5, 1), "Command not implemented")),
            Command::Unknown(_) => self.reply(out, Reply::new(500, (5, 2), "Error: command not recognized")),
        }
    }

    fn hello(&mut self, name: String, esmtp: bool, out: &mut Vec<Action>) {
        self.tx = None;
        if self.config.verify_helo {
            out.push(Action::CheckHelo(name.clone()));
            self.waiting = Waiting::Helo { name, esmtp };
        } else {
            self.greet(name, esmtp, out);
        }
    }

    fn greet(&mut self, name: String, esmtp: bool, out: &mut Vec<Action>) {
        let reply = if esmtp {
            Reply::multiline(
                250,
                vec![
                    self.config.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.config.max_message_size),
                    "8BITMIME".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ],
            )
        } else {
            Reply::plain(250, self.config.hostname.clone())
        };
        self.reply(out, reply);
        self.helo = Some((name, esmtp));
    }

    fn syntax_error(&mut self, line: &[u8], e: CommandError, out: &mut Vec<Action>) {
        let verb = line.split(|&b| b == b' ').next().unwrap_or_default().to_ascii_uppercase();
        let r = match (verb.as_slice(), e) {
            (b"MAIL", CommandError::Address(AddressError::TooLong)) => Reply::new(501, (1, 7), "Sender address too long"),
            (b"MAIL", CommandError::Address(_)) => Reply::new(501, (1, 7), "Bad sender address syntax"),
            (b"RCPT", CommandError::Address(AddressError::TooLong)) => Reply::new(501, (1, 3), "Recipient address too long"),
            (b"RCPT", CommandError::Address(_)) => Reply::new(501, (1, 3), "Bad recipient address syntax"),
            (_, CommandError::Syntax(why)) => Reply::new(501, (5, 4), format!("Syntax error: {why}")),
            (_, CommandError::Address(_)) => Reply::new(501, (5, 4), "Syntax error in parameters"),
        };
        self.reply(out, r);
    }

    fn mail(&mut self, from: Option<Address>, params: Vec<Param>, out: &mut Vec<Action>) {
        let Some((_, ehlo)) = self.helo else {
            return self.reply(out, Reply::new(503, (5, 1), "Error: send HELO/EHLO first"));
        };
        if self.tx.is_some() {
            return self.reply(out, Reply::new(503, (5, 1), "Error: nested MAIL command"));
        }
        if !ehlo && !params.is_empty() {
            return self.reply(out, Reply::new(555, (5, 4), "Parameters not recognized (use EHLO)"));
        }
        for p in &params {
            match (p.keyword.as_str(), p.value.as_deref()) {
                // RFC 1870: refuse at once what we would refuse after DATA.
                ("SIZE", Some(v)) if (1..=20).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()) => {
                    if v.parse::<u64>().map_or(true, |n| n > self.config.max_message_size) {
                        return self.reply(out, Reply::new(552, (3, 4), "Message size exceeds fixed limit"));
                    }
                }
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
                ("SIZE" | "BODY", _) => return self.reply(out, Reply::new(501, (5, 4), format!("Bad {} parameter value", p.keyword))),
                _ => return self.reply(out, Reply::new(555, (5, 4), format!("Unsupported parameter {}", p.keyword))),
            }
        }
        if let Some(refusal) = self.sender_check.as_ref().and_then(|check| check(from.as_ref())) {
            return self.reply(out, refusal);
        }
        self.tx = Some(Transaction { from, rcpts: Vec::new() });
        self.reply(out, Reply::new(250, (1, 0), "Ok"));
    }

    fn rcpt(&mut self, to: Address, params: Vec<Param>, out: &mut Vec<Action>) {
        let Some(tx) = &self.tx else {
            return self.reply(out, Reply::new(503, (5, 1), "Error: need MAIL command"));
        };
        if let Some(p) = params.first() {
            return self.reply(out, Reply::new(555, (5, 4), format!("Unsupported parameter {}", p.keyword)));
        }
        if tx.rcpts.len() >= self.config.max_recipients {
            // RFC 5321 §4.5.3.1.10: 452, the client sends the rest in another transaction. Not a
            // client error, so it does not count towards the error limit.
            out.push(Action::Reply(Reply::new(452, (5, 3), "Error: too many recipients")));
            return;
        }
        out.push(Action::CheckRcpt(to.clone()));
        self.waiting = Waiting::Rcpt(to);
    }

    fn data_command(&mut self, out: &mut Vec<Action>) {
        match &self.tx {
            None => return self.reply(out, Reply::new(503, (5, 1), "Error: need MAIL command")),
            Some(tx) if tx.rcpts.is_empty() => return self.reply(out, Reply::new(503, (5, 1), "Error: need RCPT command")),
            Some(_) => {}
        }
        self.reply(out, Reply::plain(354, "End data with <CR><LF>.<CR><LF>"));
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        let single_rcpt = match self.tx.as_ref().map(|t| t.rcpts.as_slice()) {
            Some([only]) => Some(only.to_string()),
            _ => None,
        };
        out.push(Action::BeginData { helo, esmtp, single_rcpt });
        self.data = Some(DataState {
            decoder: DataDecoder::new(self.config.line_endings),
            received: ReceivedCounter::default(),
            size: 0,
            too_big: false,
        });
    }

    /// Feed DATA bytes; returns how many belonged to the message.
    fn feed_data(&mut self, bytes: &[u8], out: &mut Vec<Action>) -> usize {
        let Some(data) = self.data.as_mut() else { return 0 };
        let mut body = Vec::with_capacity(bytes.len());
        let event = data.decoder.feed(bytes, &mut body);
        data.size += body.len() as u64;
        data.received.feed(&body);
        if data.size > self.config.max_message_size {
            // S4: read to the end, store nothing more, answer 552 then.
            data.too_big = true;
        }
        if !data.too_big && !body.is_empty() {
            out.push(Action::BodyChunk(body));
        }
        match event {
            DataEvent::NeedMore => bytes.len(),
            DataEvent::End { consumed } => {
                self.commands += 1;
                self.end_data(out);
                consumed
            }
            DataEvent::BareLineEnding { consumed } => {
                self.data = None;
                self.tx = None;
                out.push(Action::AbortData);
                // S5, as Postfix does: refuse and hang up; what follows cannot be trusted.
                out.push(Action::Reply(Reply::new(521, (5, 2), format!("{} Error: bare <CR> or <LF> received", self.config.hostname))));
                self.close(out);
                consumed
            }
        }
    }

    fn end_data(&mut self, out: &mut Vec<Action>) {
        let data = self.data.take().expect("in DATA");
        if data.too_big {
            self.tx = None;
            out.push(Action::AbortData);
            return self.reply(out, Reply::new(552, (3, 4), "Message size exceeds fixed limit"));
        }
        if data.received.count() > self.config.max_hops {
            self.tx = None;
            out.push(Action::AbortData);
            // RFC 5321 §6.3: a mail loop.
            return self.reply(out, Reply::new(554, (4, 6), "Too many hops: mail loop detected"));
        }
        let tx = self.tx.as_ref().expect("DATA needs a transaction");
        let envelope = Envelope {
            mail_from: tx.from.as_ref().map(Address::to_string).unwrap_or_default(),
            recipients: tx.rcpts.iter().map(Address::to_string).collect(),
            client_ip: self.client_ip.clone(),
            helo: self.helo.as_ref().map(|(h, _)| h.clone()).unwrap_or_default(),
            origin: "smtp",
        };
        out.push(Action::Enqueue(envelope));
        self.waiting = Waiting::Enqueue;
    }

    /// Queue a reply; every 4xx/5xx counts towards the error limit (S4: 421 after 20).
    fn reply(&mut self, out: &mut Vec<Action>, reply: Reply) {
        let is_error = reply.code >= 400;
        out.push(Action::Reply(reply));
        if is_error {
            self.errors += 1;
            if self.errors >= self.config.max_errors && !self.closed {
                out.push(Action::Reply(Reply::new(421, (7, 0), format!("{} Error: too many errors", self.config.hostname))));
                self.close(out);
            }
        }
    }

    fn close(&mut self, out: &mut Vec<Action>) {
        self.closed = true;
        self.input.clear();
        out.push(Action::Close);
    }
}
