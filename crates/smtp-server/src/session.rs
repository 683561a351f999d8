//! The inbound SMTP session (RFC 5321, RFC 2920 pipelining, RFC 1870 SIZE), sans-IO:
//! [`Session::handle`] takes an [`Event`] and returns [`Action`]s; the driver does the I/O.
//!
//! Input is buffered inside the session. While an action waits for its answer (a recipient
//! check, the enqueue commit) the session processes nothing more, so pipelined commands are
//! answered in order. The 250 after DATA is produced only by `EnqueueDone(Ok)`.
//!
//! CHUNKING (RFC 3030): `BDAT <size> [LAST]` is followed by exactly `size` octets, read raw
//! (no dot-stuffing, no end-of-data line) under the command deadline ([`Phase::Chunk`]). The
//! first chunk of a transaction starts the message as DATA does (`BeginData`), each chunk's
//! content goes out as `BodyChunk`s through the same size, hop and header checks, and the LAST
//! chunk ends it as the end of DATA does (`Enqueue`, 250 only after `EnqueueDone(Ok)`). The
//! octets of a chunk that is refused (no transaction, after DATA-style failures) are still read
//! and dropped, so they are never taken for commands; the chunks a pipelining client sent after
//! a refused one get the same refusal until its LAST (§2). Bare CR or LF in chunk content
//! follows `line_endings` as in DATA (see [`mail_proto::chunk`]); since the chunk framing is
//! intact the session goes on after refusing such a message, where DATA must hang up.

use mail_framework::{Dsn, Envelope, RcptDsn};
use mail_proto::chunk::Bdat;
use mail_proto::data::ReceivedCounter;
use mail_proto::smtp_command::{self, Command, CommandError, Param};
use mail_proto::{Address, AddressError, ChunkDecoder, DataDecoder, DataEvent, LineEndings, Reply};

use crate::headers::{HeaderGate, Release};

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
    /// Offer STARTTLS (RFC 3207): TLS is configured and the connection is plain.
    pub starttls: bool,
    /// The connection is encrypted from the start (implicit TLS, RFC 8314).
    pub tls_active: bool,
    /// AUTH may be used without TLS (`[tls] allow_plaintext_auth` and the client address).
    pub allow_plaintext_auth: bool,
    /// MAIL needs AUTH first (`local-and-relay`, submission listeners: A2).
    pub require_auth: bool,
    /// Offer DSN (RFC 3461): RET/ENVID on MAIL, NOTIFY/ORCPT on RCPT.
    pub dsn: bool,
    /// There are dial-up domains whose mail waits for ETRN (C7): HELP lists ETRN.
    pub etrn: bool,
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
    /// The TLS handshake after `StartTls` succeeded.
    TlsUp,
    /// Answer to `VerifyPassword`.
    AuthDone(AuthOutcome),
    /// Answer to `Etrn`.
    EtrnDone(Reply),
    /// The queue id on success.
    EnqueueDone(Result<String, String>),
    /// Answer to `Enqueue` that refuses the message instead (E1: sender authentication, a
    /// 550 or 451 in place of the 250).
    DataRefused(Reply),
    /// Answer to `CheckSpf`: `None` accepts the sender, `Some(reply)` refuses it.
    SpfChecked(Option<Reply>),
    Timeout,
}

#[derive(Debug, PartialEq)]
pub enum Action {
    Reply(Reply),
    /// Ask the directory and policy about a recipient; answer with `RcptChecked`.
    CheckRcpt(Address),
    /// E1: check SPF for this sender (the HELO name is known) before MAIL FROM is answered;
    /// answer with `SpfChecked`. Only for unauthenticated clients of a session made
    /// [`Session::with_spf_at_mail`].
    CheckSpf(Option<Address>),
    /// Verify a HELO/EHLO name (R10); answer with `HeloChecked`.
    CheckHelo(String),
    /// The client sent a command line beyond the limits (R9): the driver may deny its address.
    Penalize,
    /// Write the replies so far, then do the TLS handshake; answer with `TlsUp` (or close).
    StartTls,
    /// RFC 1985: release mail held for this node; answer with `EtrnDone`.
    Etrn(String),
    /// Check credentials (A1); answer with `AuthDone`.
    VerifyPassword {
        user: String,
        password: String,
    },
    /// A message body starts: the driver opens an incoming message and writes Received.
    BeginData {
        helo: String,
        esmtp: bool,
        single_rcpt: Option<String>,
        auth: Option<String>,
    },
    /// Submitted (authenticated) mail lacks these header fields: write them into the message
    /// here, between the `BodyChunk`s before and after (S3). At most once per message, before
    /// the body: the header section is held back until it has been seen.
    AddHeaders {
        message_id: bool,
        date: bool,
    },
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
    /// Reading the octets of a BDAT chunk: the command deadline applies (RFC 3030 has no data
    /// phase), restarted when the chunk is complete; not between commands.
    Chunk,
}

#[derive(Debug)]
struct Transaction {
    from: Option<Address>,
    rcpts: Vec<Address>,
    /// RFC 3461 parameters: RET, ENVID and each recipient's NOTIFY/ORCPT.
    dsn: Dsn,
    /// RFC 4954 §5: the trusted submitter, passed on as `AUTH=`; `None` = unknown (`AUTH=<>`).
    auth_sender: Option<String>,
}

/// The result of a password check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Ok(String),
    /// Wrong user or password (the same answer for both).
    Failed,
    /// Too many failures: throttled (A5), or the password service is busy.
    TempFail,
}

#[derive(Debug)]
enum Waiting {
    Nothing,
    Tls,
    Password,
    Etrn,
    Helo {
        name: String,
        esmtp: bool,
    },
    Rcpt(Address, RcptDsn),
    /// The transaction MAIL FROM opens once SPF accepts its sender.
    Spf(Transaction),
    Enqueue,
}

/// How the message's octets are framed on the wire.
#[derive(Debug)]
enum Framing {
    /// After DATA: dot-stuffed, ended by `CRLF.CRLF`.
    Dot(DataDecoder),
    /// BDAT chunks: counted octets; the message ends with the LAST chunk.
    Chunks(ChunkDecoder),
}

/// The BDAT chunk whose octets are being read.
#[derive(Debug)]
struct ChunkRead {
    remaining: u64,
    size: u64,
    last: bool,
    /// The chunk is read and dropped, and answered with this (RFC 3030 §2: the server reads
    /// the octets of a chunk it refuses).
    discard: Option<Reply>,
}

#[derive(Debug)]
struct DataState {
    framing: Framing,
    received: ReceivedCounter,
    size: u64,
    too_big: bool,
    /// Submitted mail: the header section held back until its end shows what is missing (S3).
    gate: Option<HeaderGate>,
}

/// A synchronous policy check of MAIL FROM (R8 kill list, A3 sender verification) given the
/// authenticated user: `Some(reply)` refuses. No I/O: what it consults was loaded when the
/// connection was accepted or the user authenticated.
pub type SenderCheck = Box<dyn Fn(Option<&Address>, Option<&str>) -> Option<Reply> + Send + Sync>;

/// RFC 4954 §5 for an authenticated client: given the user, the `AUTH=` parameter of MAIL
/// (`None`: not given; `Some(None)`: `AUTH=<>`) and the reverse-path, the submitter to pass on,
/// or `None` when it is unknown or the user may not name it. Unauthenticated clients are never
/// asked: their submitter is unknown, whatever they say.
pub type SubmitterCheck = Box<dyn Fn(&str, Option<Option<&Address>>, Option<&Address>) -> Option<String> + Send + Sync>;

pub struct Session {
    config: SessionConfig,
    sender_check: Option<SenderCheck>,
    submitter_check: Option<SubmitterCheck>,
    /// E1: MAIL FROM of an unauthenticated client waits for `CheckSpf`.
    spf_at_mail: bool,
    client_ip: String,
    helo: Option<(String, bool)>,
    tx: Option<Transaction>,
    data: Option<DataState>,
    /// A BDAT chunk being read.
    chunk: Option<ChunkRead>,
    /// A BDAT transaction failed: its remaining pipelined chunks get this answer until the LAST
    /// one, or until any other command.
    bdat_refusal: Option<Reply>,
    waiting: Waiting,
    input: Vec<u8>,
    /// Discarding the rest of an over-long command line.
    skipping_line: bool,
    tls: bool,
    /// The authenticated user (A1).
    auth: Option<String>,
    /// An AUTH exchange waiting for the client's next line.
    sasl: Option<crate::auth::Exchange>,
    errors: u32,
    commands: u64,
    closed: bool,
}

impl Session {
    pub fn new(config: SessionConfig, client_ip: String) -> Self {
        Session {
            sender_check: None,
            submitter_check: None,
            spf_at_mail: false,
            client_ip,
            helo: None,
            tx: None,
            data: None,
            chunk: None,
            bdat_refusal: None,
            waiting: Waiting::Nothing,
            input: Vec::new(),
            skipping_line: false,
            tls: config.tls_active,
            auth: None,
            sasl: None,
            errors: 0,
            commands: 0,
            closed: false,
            config,
        }
    }

    /// Start authenticated (the local submission socket knows its peer from the kernel).
    pub fn authenticated_as(mut self, user: &str) -> Self {
        self.auth = Some(user.to_string());
        self
    }

    /// Check every MAIL FROM with `check`.
    pub fn with_sender_check(mut self, check: SenderCheck) -> Self {
        self.sender_check = Some(check);
        self
    }

    /// Decide the submitter of each message with `check` (RFC 4954 §5). Without one, an
    /// authenticated client's `AUTH=mailbox` is taken as it is, and no parameter means unknown.
    pub fn with_submitter_check(mut self, check: SubmitterCheck) -> Self {
        self.submitter_check = Some(check);
        self
    }

    /// E1: ask the driver about SPF (`CheckSpf`) before answering an unauthenticated client's
    /// MAIL FROM, so an SPF fail can be refused there (RFC 7208 §8.4).
    pub fn with_spf_at_mail(mut self) -> Self {
        self.spf_at_mail = true;
        self
    }

    pub fn phase(&self) -> Phase {
        match (&self.chunk, &self.data) {
            (Some(_), _) => Phase::Chunk,
            (None, Some(DataState { framing: Framing::Dot(_), .. })) => Phase::Data,
            _ => Phase::Command,
        }
    }

    /// The next octets are message content (DATA, or a BDAT chunk), not command lines.
    fn reading_content(&self) -> bool {
        self.phase() != Phase::Command
    }

    /// Feed content octets; returns how many belonged to the message or the chunk.
    fn feed_content(&mut self, bytes: &[u8], out: &mut Vec<Action>) -> usize {
        if self.chunk.is_some() { self.feed_chunk(bytes, out) } else { self.feed_data(bytes, out) }
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

    /// The authenticated user, if any.
    pub fn authenticated(&self) -> Option<&str> {
        self.auth.as_deref()
    }

    /// May credentials be sent now (TLS, or plaintext allowed)?
    fn credentials_usable(&self) -> bool {
        self.tls || self.config.allow_plaintext_auth
    }

    pub fn handle(&mut self, event: Event<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        if self.closed {
            return out;
        }
        match event {
            Event::Connected => out.push(Action::Reply(Reply::plain(220, format!("{} ESMTP Postroom", self.config.hostname)))),
            Event::Bytes(bytes) => {
                if self.reading_content() && self.input.is_empty() && matches!(self.waiting, Waiting::Nothing) {
                    let used = self.feed_content(bytes, &mut out);
                    self.input.extend_from_slice(&bytes[used..]);
                } else {
                    self.input.extend_from_slice(bytes);
                }
            }
            Event::RcptChecked(verdict) => {
                let Waiting::Rcpt(addr, dsn) = std::mem::replace(&mut self.waiting, Waiting::Nothing) else { return out };
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
                    tx.dsn.recipients.push(dsn);
                }
                self.reply(&mut out, Reply::new(250, (1, 5), "Ok"));
            }
            Event::SpfChecked(verdict) => {
                let Waiting::Spf(tx) = std::mem::replace(&mut self.waiting, Waiting::Nothing) else { return out };
                match verdict {
                    None => {
                        self.tx = Some(tx);
                        self.reply(&mut out, Reply::new(250, (1, 0), "Ok"));
                    }
                    Some(r) => self.reply(&mut out, r),
                }
            }
            Event::HeloChecked(verdict) => {
                let Waiting::Helo { name, esmtp } = std::mem::replace(&mut self.waiting, Waiting::Nothing) else { return out };
                match verdict {
                    None => self.greet(name, esmtp, &mut out),
                    Some(r) => self.reply(&mut out, r),
                }
            }
            Event::TlsUp => {
                if !matches!(self.waiting, Waiting::Tls) {
                    return out;
                }
                // RFC 3207 §4.2: forget everything learned before the handshake.
                self.waiting = Waiting::Nothing;
                self.tls = true;
                self.helo = None;
                self.drop_transaction(&mut out);
                self.auth = None;
                self.input.clear();
            }
            Event::AuthDone(outcome) => {
                if !matches!(self.waiting, Waiting::Password) {
                    return out;
                }
                self.waiting = Waiting::Nothing;
                match outcome {
                    AuthOutcome::Ok(user) => {
                        self.auth = Some(user);
                        self.reply(&mut out, Reply::new(235, (7, 0), "Authentication successful"));
                    }
                    AuthOutcome::Failed => self.reply(&mut out, Reply::new(535, (7, 8), "Authentication credentials invalid")),
                    AuthOutcome::TempFail => self.reply(&mut out, Reply::new(454, (7, 0), "Temporary authentication failure")),
                }
            }
            Event::EtrnDone(reply) => {
                if !matches!(self.waiting, Waiting::Etrn) {
                    return out;
                }
                self.waiting = Waiting::Nothing;
                self.reply(&mut out, reply);
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
            Event::DataRefused(reply) => {
                if !matches!(self.waiting, Waiting::Enqueue) {
                    return out;
                }
                self.waiting = Waiting::Nothing;
                self.tx = None;
                self.reply(&mut out, reply);
            }
            Event::Timeout => {
                out.push(Action::Reply(Reply::new(421, (4, 2), format!("{} Error: timeout exceeded", self.config.hostname))));
                self.chunk = None;
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
            if self.reading_content() {
                let input = std::mem::take(&mut self.input);
                let used = self.feed_content(&input, out);
                self.input = input[used..].to_vec();
                if self.reading_content() {
                    return;
                }
                continue;
            }
            let limit = if self.sasl.is_some() {
                mail_proto::sasl::MAX_SASL_LINE
            } else {
                smtp_command::line_limit(&self.input).max(smtp_command::MAX_MAIL_RCPT_LINE)
            };
            let Some(lf) = self.input.iter().position(|&b| b == b'\n') else {
                if self.input.len() > limit {
                    self.input.clear();
                    if !self.skipping_line {
                        self.skipping_line = true;
                        // Penalize before the reply: if the reply reaches the error limit it
                        // closes the session, and nothing after Close is carried out.
                        out.push(Action::Penalize);
                        self.reply(out, Reply::new(500, (5, 2), "Error: line too long"));
                    }
                }
                return;
            };
            let mut line: Vec<u8> = self.input.drain(..=lf).collect();
            if std::mem::take(&mut self.skipping_line) {
                continue;
            }
            let limit = if self.sasl.is_some() { limit } else { smtp_command::line_limit(&line) };
            if line.len() > limit {
                self.sasl = None;
                out.push(Action::Penalize);
                self.reply(out, Reply::new(500, (5, 2), "Error: line too long"));
                continue;
            }
            line.truncate(line.len() - 1);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.commands += 1;
            match self.sasl.take() {
                Some(exchange) => {
                    let step = crate::auth::respond(exchange, &line);
                    self.sasl_step(step, out);
                }
                None => self.command(&line, out),
            }
        }
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<Action>) {
        let cmd = match smtp_command::parse(line) {
            Ok(c) => c,
            Err(e) if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"BDAT") => {
                // The chunk's length is unknown, so its octets cannot be told from commands:
                // refuse and hang up rather than run message content as commands.
                self.drop_transaction(out);
                self.syntax_error(line, e, out);
                return self.close(out);
            }
            Err(e) => return self.syntax_error(line, e, out),
        };
        if !matches!(cmd, Command::Bdat(_)) {
            self.bdat_refusal = None;
        }
        match cmd {
            Command::Helo(name) => self.hello(name, false, out),
            Command::Ehlo(name) => self.hello(name, true, out),
            Command::Mail { from, params } => self.mail(from, params, out),
            Command::Rcpt { to, params } => self.rcpt(to, params, out),
            Command::Data => self.data_command(out),
            Command::Bdat(bdat) => self.bdat(bdat, out),
            Command::Rset => {
                self.drop_transaction(out);
                self.reply(out, Reply::new(250, (0, 0), "Ok"));
            }
            Command::Noop => self.reply(out, Reply::new(250, (0, 0), "Ok")),
            Command::Quit => {
                self.reply(out, Reply::new(221, (0, 0), "Bye"));
                self.close(out);
            }
            Command::Help => {
                let text = self.help();
                self.reply(out, Reply::new(214, (0, 0), text));
            }
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
            Command::StartTls => self.starttls(out),
            Command::Auth(arg) => self.auth(&arg, out),
            Command::Etrn(arg) => {
                // RFC 1985 §5: after HELO/EHLO, outside a mail transaction.
                if self.helo.is_none() || self.tx.is_some() {
                    return self.reply(out, Reply::new(503, (5, 1), "Error: ETRN needs EHLO and no mail transaction"));
                }
                if arg.is_empty() || arg.contains(' ') {
                    return self.reply(out, Reply::new(501, (5, 4), "Syntax: ETRN node"));
                }
                out.push(Action::Etrn(arg));
                self.waiting = Waiting::Etrn;
            }
            Command::NotImplemented(_) => self.reply(out, Reply::new(502, (5, 1), "Command not implemented")),
            Command::Unknown(_) => self.reply(out, Reply::new(500, (5, 2), "Error: command not recognized")),
        }
    }

    /// S1: the commands this session accepts now — STARTTLS and AUTH only where EHLO offers them,
    /// ETRN where there are dial-up domains, VRFY only when it is on.
    fn help(&self) -> String {
        let mut commands = vec!["HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "HELP"];
        if self.config.vrfy {
            commands.push("VRFY");
        }
        if self.config.etrn {
            commands.push("ETRN");
        }
        if self.config.starttls && !self.tls {
            commands.push("STARTTLS");
        }
        if self.credentials_usable() && self.auth.is_none() {
            commands.push("AUTH");
        }
        format!("Commands: {}", commands.join(" "))
    }

    fn hello(&mut self, name: String, esmtp: bool, out: &mut Vec<Action>) {
        self.drop_transaction(out);
        if self.config.verify_helo {
            out.push(Action::CheckHelo(name.clone()));
            self.waiting = Waiting::Helo { name, esmtp };
        } else {
            self.greet(name, esmtp, out);
        }
    }

    fn greet(&mut self, name: String, esmtp: bool, out: &mut Vec<Action>) {
        let reply = if esmtp {
            let mut lines = vec![
                self.config.hostname.clone(),
                "PIPELINING".into(),
                format!("SIZE {}", self.config.max_message_size),
                "8BITMIME".into(),
                // RFC 3030. Not BINARYMIME: stored messages are CRLF lines (S5) that go on by
                // DATA to hosts without CHUNKING, and DKIM signs them as such.
                "CHUNKING".into(),
                "ENHANCEDSTATUSCODES".into(),
                "ETRN".into(),
            ];
            if self.config.dsn {
                lines.push("DSN".into());
            }
            if self.config.starttls && !self.tls {
                lines.push("STARTTLS".into());
            }
            // A1: AUTH is offered only where credentials may be sent.
            if self.credentials_usable() && self.auth.is_none() {
                lines.push("AUTH PLAIN LOGIN".into());
            }
            Reply::multiline(250, lines)
        } else {
            Reply::plain(250, self.config.hostname.clone())
        };
        self.reply(out, reply);
        self.helo = Some((name, esmtp));
    }

    /// RFC 3207: answer 220, drop anything pipelined behind STARTTLS, and wait for the handshake.
    fn starttls(&mut self, out: &mut Vec<Action>) {
        if self.tls {
            return self.reply(out, Reply::new(503, (5, 1), "TLS already active"));
        }
        if !self.config.starttls {
            return self.reply(out, Reply::new(502, (5, 1), "Command not implemented"));
        }
        out.push(Action::Reply(Reply::new(220, (0, 0), "Ready to start TLS")));
        // No command injection across the upgrade: plaintext sent after STARTTLS is never run.
        self.input.clear();
        out.push(Action::StartTls);
        self.waiting = Waiting::Tls;
    }

    /// RFC 4954 §4.
    fn auth(&mut self, argument: &str, out: &mut Vec<Action>) {
        if self.helo.is_none() {
            return self.reply(out, Reply::new(503, (5, 1), "Error: send HELO/EHLO first"));
        }
        if self.auth.is_some() {
            return self.reply(out, Reply::new(503, (5, 1), "Already authenticated"));
        }
        if self.tx.is_some() {
            return self.reply(out, Reply::new(503, (5, 1), "AUTH not allowed during a mail transaction"));
        }
        if !self.credentials_usable() {
            return self.reply(out, Reply::new(538, (7, 11), "Encryption required for requested authentication mechanism"));
        }
        let step = crate::auth::start(argument);
        self.sasl_step(step, out);
    }

    fn sasl_step(&mut self, (step, next): (crate::auth::Step, Option<crate::auth::Exchange>), out: &mut Vec<Action>) {
        use crate::auth::Step;
        match step {
            Step::Challenge(reply) => {
                out.push(Action::Reply(reply));
                self.sasl = next;
            }
            Step::Credentials { user, password } => {
                out.push(Action::VerifyPassword { user, password });
                self.waiting = Waiting::Password;
            }
            Step::Failed(reply) => self.reply(out, reply),
        }
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
        if self.config.require_auth && self.auth.is_none() {
            return self.reply(out, Reply::new(530, (7, 0), "Authentication required"));
        }
        if !ehlo && !params.is_empty() {
            return self.reply(out, Reply::new(555, (5, 4), "Parameters not recognized (use EHLO)"));
        }
        let mut dsn = Dsn::default();
        let mut submitter: Option<Option<Address>> = None;
        for p in &params {
            match (p.keyword.as_str(), p.value.as_deref()) {
                // RFC 4954 §5: taken from anyone (it is part of the AUTH extension), trusted only
                // from an authenticated client (below).
                ("AUTH", Some(v)) if submitter.is_none() => match smtp_command::parse_auth_param(v) {
                    Some(a) => submitter = Some(a),
                    None => return self.reply(out, Reply::new(501, (5, 4), "Bad AUTH parameter: xtext addr-spec or <> expected")),
                },
                ("AUTH", _) => return self.reply(out, Reply::new(501, (5, 4), "Bad AUTH parameter")),
                // RFC 3461 §4.3, §4.4.
                ("RET", Some(v)) if self.config.dsn && dsn.ret.is_none() && (v.eq_ignore_ascii_case("FULL") || v.eq_ignore_ascii_case("HDRS")) => {
                    dsn.ret = Some(v.to_ascii_uppercase());
                }
                ("ENVID", Some(v)) if self.config.dsn && dsn.envid.is_none() => match smtp_command::xtext_decode(v).filter(|e| e.len() <= 100) {
                    Some(e) => dsn.envid = Some(e),
                    None => return self.reply(out, Reply::new(501, (5, 4), "Bad ENVID parameter")),
                },
                ("RET" | "ENVID", _) if self.config.dsn => return self.reply(out, Reply::new(501, (5, 4), format!("Bad {} parameter", p.keyword))),
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
        if let Some(refusal) = self.sender_check.as_ref().and_then(|check| check(from.as_ref(), self.auth.as_deref())) {
            return self.reply(out, refusal);
        }
        let auth_sender = self.auth.as_deref().and_then(|user| {
            let claimed = submitter.as_ref().map(Option::as_ref);
            match &self.submitter_check {
                Some(check) => check(user, claimed, from.as_ref()),
                None => claimed.flatten().map(Address::to_string),
            }
        });
        let tx = Transaction { from, rcpts: Vec::new(), dsn, auth_sender };
        if self.spf_at_mail && self.auth.is_none() {
            out.push(Action::CheckSpf(tx.from.clone()));
            self.waiting = Waiting::Spf(tx);
            return;
        }
        self.tx = Some(tx);
        self.reply(out, Reply::new(250, (1, 0), "Ok"));
    }

    fn rcpt(&mut self, to: Address, params: Vec<Param>, out: &mut Vec<Action>) {
        let Some(tx) = &self.tx else {
            return self.reply(out, Reply::new(503, (5, 1), "Error: need MAIL command"));
        };
        let mut dsn = RcptDsn::default();
        for p in &params {
            match (p.keyword.as_str(), p.value.as_deref()) {
                ("NOTIFY", Some(v)) if self.config.dsn && dsn.notify.is_none() => match smtp_command::parse_notify(v) {
                    Some(n) => dsn.notify = Some(n),
                    None => return self.reply(out, Reply::new(501, (5, 4), "Bad NOTIFY parameter")),
                },
                ("ORCPT", Some(v)) if self.config.dsn && dsn.orcpt.is_none() => {
                    let decoded = v.split_once(';').and_then(|(kind, addr)| Some(format!("{kind};{}", smtp_command::xtext_decode(addr)?)));
                    match decoded {
                        Some(o) => dsn.orcpt = Some(o),
                        None => return self.reply(out, Reply::new(501, (5, 4), "Bad ORCPT parameter")),
                    }
                }
                ("NOTIFY" | "ORCPT", _) if self.config.dsn => {
                    return self.reply(out, Reply::new(501, (5, 4), format!("Bad {} parameter", p.keyword)));
                }
                _ => return self.reply(out, Reply::new(555, (5, 4), format!("Unsupported parameter {}", p.keyword))),
            }
        }
        if tx.rcpts.len() >= self.config.max_recipients {
            // RFC 5321 §4.5.3.1.10: 452, the client sends the rest in another transaction. Not a
            // client error, so it does not count towards the error limit.
            out.push(Action::Reply(Reply::new(452, (5, 3), "Error: too many recipients")));
            return;
        }
        out.push(Action::CheckRcpt(to.clone()));
        self.waiting = Waiting::Rcpt(to, dsn);
    }

    fn data_command(&mut self, out: &mut Vec<Action>) {
        if let Some(refusal) = self.not_ready_for_content() {
            return self.reply(out, refusal);
        }
        if self.data.is_some() {
            // RFC 3030 §2: BDAT and DATA never in one transaction; the client must RSET.
            return self.reply(out, Reply::new(503, (5, 1), "Error: DATA not allowed after BDAT in one transaction, send RSET"));
        }
        self.reply(out, Reply::plain(354, "End data with <CR><LF>.<CR><LF>"));
        self.begin_message(Framing::Dot(DataDecoder::new(self.config.line_endings)), out);
    }

    /// Why message content cannot start now, if it cannot.
    fn not_ready_for_content(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(Reply::new(503, (5, 1), "Error: need MAIL command")),
            Some(tx) if tx.rcpts.is_empty() => Some(Reply::new(503, (5, 1), "Error: need RCPT command")),
            Some(_) => None,
        }
    }

    /// RFC 3030 `BDAT <size> [LAST]`: the chunk's octets are read next, whatever the answer.
    fn bdat(&mut self, Bdat { size, last }: Bdat, out: &mut Vec<Action>) {
        let discard = self.bdat_refusal.clone().or_else(|| self.not_ready_for_content());
        if discard.is_none() && self.data.is_none() {
            self.begin_message(Framing::Chunks(ChunkDecoder::new(self.config.line_endings)), out);
        }
        self.chunk = Some(ChunkRead { remaining: size, size, last, discard });
        if size == 0 {
            self.end_chunk(out);
        }
    }

    /// Feed the octets of the current chunk; returns how many belonged to it.
    fn feed_chunk(&mut self, bytes: &[u8], out: &mut Vec<Action>) -> usize {
        let Some(chunk) = self.chunk.as_mut() else { return 0 };
        let n = usize::try_from(chunk.remaining).unwrap_or(usize::MAX).min(bytes.len());
        chunk.remaining -= n as u64;
        let (done, storing) = (chunk.remaining == 0, chunk.discard.is_none());
        if let (true, Some(DataState { framing: Framing::Chunks(decoder), .. })) = (storing, self.data.as_mut()) {
            let mut body = Vec::with_capacity(n);
            decoder.feed(&bytes[..n], &mut body);
            // Strict mode: a message with a bare line ending is refused; store no more of it.
            if !decoder.saw_bare_line_ending() {
                self.take_body(body, out);
            }
        }
        if done {
            self.end_chunk(out);
        }
        n
    }

    /// All octets of the chunk are read: answer it, or end the message at LAST.
    fn end_chunk(&mut self, out: &mut Vec<Action>) {
        let Some(chunk) = self.chunk.take() else { return };
        self.commands += 1;
        if let Some(refusal) = chunk.discard {
            if chunk.last {
                self.bdat_refusal = None;
            }
            return self.reply(out, refusal);
        }
        let Some(DataState { framing: Framing::Chunks(decoder), .. }) = self.data.as_mut() else { return };
        let mut tail = Vec::new();
        if chunk.last {
            decoder.finish(&mut tail);
        }
        if decoder.saw_bare_line_ending() {
            let r = Reply::new(550, (6, 0), "Error: bare <CR> or <LF> in message content");
            return self.fail_bdat(r, chunk.last, out);
        }
        self.take_body(tail, out);
        if chunk.last {
            return self.end_data(out);
        }
        if self.data.as_ref().is_some_and(|d| d.too_big) {
            // S4: refused at the chunk that passes the limit; nothing more is stored.
            return self.fail_bdat(Reply::new(552, (3, 4), "Message size exceeds fixed limit"), false, out);
        }
        self.reply(out, Reply::new(250, (0, 0), format!("{} octets received", chunk.size)));
    }

    /// A BDAT transaction fails at this chunk: drop what was stored and refuse the rest of it.
    fn fail_bdat(&mut self, refusal: Reply, last: bool, out: &mut Vec<Action>) {
        self.drop_transaction(out);
        if !last {
            self.bdat_refusal = Some(refusal.clone());
        }
        self.reply(out, refusal);
    }

    /// The transaction ends unfinished (RSET, EHLO, TLS): a message being received is dropped.
    fn drop_transaction(&mut self, out: &mut Vec<Action>) {
        self.tx = None;
        if self.data.take().is_some() {
            out.push(Action::AbortData);
        }
    }

    /// DATA or the first BDAT: the driver opens the message; its octets follow in `framing`.
    fn begin_message(&mut self, framing: Framing, out: &mut Vec<Action>) {
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        let single_rcpt = match self.tx.as_ref().map(|t| t.rcpts.as_slice()) {
            Some([only]) => Some(only.to_string()),
            _ => None,
        };
        out.push(Action::BeginData { helo, esmtp, single_rcpt, auth: self.auth.clone() });
        self.data = Some(DataState {
            framing,
            received: ReceivedCounter::default(),
            size: 0,
            too_big: false,
            gate: self.auth.is_some().then(HeaderGate::default),
        });
    }

    /// Feed DATA bytes; returns how many belonged to the message.
    fn feed_data(&mut self, bytes: &[u8], out: &mut Vec<Action>) -> usize {
        let Some(DataState { framing: Framing::Dot(decoder), .. }) = self.data.as_mut() else { return 0 };
        let mut body = Vec::with_capacity(bytes.len());
        let event = decoder.feed(bytes, &mut body);
        self.take_body(body, out);
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

    /// Decoded message octets, from DATA or BDAT: counted for the size limit (S4) and the hop
    /// count, held at the header gate for submitted mail (S3), then passed on.
    fn take_body(&mut self, body: Vec<u8>, out: &mut Vec<Action>) {
        let Some(data) = self.data.as_mut() else { return };
        data.size += body.len() as u64;
        data.received.feed(&body);
        if data.size > self.config.max_message_size {
            // S4: read to the end, store nothing more, answer 552 then.
            data.too_big = true;
        }
        if !data.too_big && !body.is_empty() {
            match data.gate.as_mut() {
                None => out.push(Action::BodyChunk(body)),
                Some(gate) => {
                    if let Some(release) = gate.feed(&body) {
                        data.gate = None;
                        released(release, out);
                    }
                }
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
            origin: mail_framework::Origin::Smtp,
            dsn: if tx.dsn.ret.is_none() && tx.dsn.envid.is_none() && tx.dsn.recipients.iter().all(|r| *r == RcptDsn::default()) {
                Dsn::default()
            } else {
                tx.dsn.clone()
            },
            auth_sender: tx.auth_sender.clone(),
        };
        // S3: a submitted message that ended within its header section (no body).
        if let Some(gate) = data.gate {
            released(gate.finish(), out);
        }
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

/// S3: the held-back start of a submitted message, with the fields its client left out where
/// they belong.
fn released(release: Release, out: &mut Vec<Action>) {
    if !release.head.is_empty() {
        out.push(Action::BodyChunk(release.head));
    }
    if release.missing.any() {
        out.push(Action::AddHeaders { message_id: release.missing.message_id, date: release.missing.date });
    }
    if !release.tail.is_empty() {
        out.push(Action::BodyChunk(release.tail));
    }
}
