//! POP3 session state machine (RFC 1939, RFC 2449, RFC 3206, RFC 2595 STLS,
//! RFC 5034 SASL AUTH with the PLAIN mechanism of RFC 4616), sans-IO.
//!
//! The [`Session`] consumes [`Event`]s (socket bytes, results of work the
//! driver did on its behalf, timeouts) and returns [`Action`]s (bytes to
//! write, a login to check, a message to stream, deletions to commit, close).
//! It performs no I/O of its own.
//!
//! States follow RFC 1939: AUTHORIZATION, TRANSACTION (over a snapshot of the
//! maildrop taken at login), UPDATE (entered only by QUIT in TRANSACTION).
//! A dropped connection or a timeout never produces [`Action::Update`], so
//! nothing is deleted.
//!
//! Input may arrive split anywhere; complete lines (CRLF, or a bare LF) are
//! processed in order. While a login or an update is pending
//! ([`Session::is_waiting`]) further input is buffered and processed once the
//! result event arrives, so replies to pipelined commands (RFC 2449) keep
//! their order.
//!
//! STLS (AUTHORIZATION state only) answers `+OK`, emits [`Action::StartTls`]
//! and then waits for [`Event::TlsUp`]; every byte the client sent after the
//! STLS line in plaintext is discarded, never executed, and the upgrade
//! resets the AUTHORIZATION state (a pending USER is forgotten). Credentials
//! (USER/PASS, AUTH PLAIN) are accepted only over TLS or when
//! [`SessionConfig::allow_plaintext_auth`] says so.
//!
//! `AUTH PLAIN` takes an optional initial response; otherwise the server
//! sends `+ ` and the next line (up to [`MAX_SASL_LINE`] octets) is the
//! base64 response, or `*` to cancel. A decoded response becomes the same
//! [`Action::Login`] as USER/PASS.
//!
//! Error accounting: protocol errors (unknown command, command not valid in
//! the current state, syntax errors, over-long lines, refused plaintext
//! authentication, unavailable STLS, unsupported SASL mechanism, invalid
//! base64, malformed PLAIN response) count towards
//! [`SessionConfig::max_errors`]; reaching it sends the error's reply, then
//! `-ERR too many errors`, then closes. "No such message", "already deleted"
//! and a cancelled AUTH are not counted. Failed logins (including an AUTH
//! PLAIN authorization identity other than the authentication identity)
//! count towards [`SessionConfig::max_failed_logins`] instead. Neither count
//! is reset by STLS. A limit of 0 behaves like 1.

use std::fmt;

use mail_proto::sasl::{self, SaslError};

/// Longest accepted command line in octets, line terminator included
/// (RFC 2449 section 4).
pub const MAX_LINE: usize = 255;

/// Longest accepted SASL response line (the client's answer to `+ `) in
/// octets, line terminator included (RFC 4954's figure, also used here).
pub const MAX_SASL_LINE: usize = mail_proto::sasl::MAX_SASL_LINE;

/// Most unprocessed input kept while a login result is pending. A client that
/// pipelines more than this behind a PASS is disconnected.
pub const MAX_PENDING_INPUT: usize = 256 * 1024;

/// Per-connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub hostname: String,
    /// USER/PASS and AUTH PLAIN allowed while the connection is NOT encrypted
    /// (the driver decides from `[tls] allow_plaintext_auth` and the client address).
    pub allow_plaintext_auth: bool,
    /// STLS can be offered on this connection (TLS configured and the connection is plain).
    pub stls_available: bool,
    /// The connection is already encrypted (implicit-TLS listener, pop3s).
    pub tls_active: bool,
    /// Max failed logins before the session is closed.
    pub max_failed_logins: u32,
    /// Max unknown/invalid commands before close.
    pub max_errors: u32,
}

/// One message of the maildrop snapshot taken at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaildropMessage {
    /// Store row id.
    pub id: i64,
    /// Exact size in octets as it will be sent (CRLF line endings, before byte-stuffing).
    pub size: u64,
    /// Unique id (RFC 1939: 1 to 70 characters in 0x21..=0x7E).
    pub uidl: String,
}

/// Result of an [`Action::Login`], fed back as [`Event::LoginDone`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Credentials good, mailbox locked, snapshot loaded.
    Ok { messages: Vec<MaildropMessage> },
    /// Wrong user or password (indistinguishable), or disabled.
    BadCredentials,
    /// Another session holds the lock.
    InUse,
    /// Store error.
    TempFail,
}

/// Something that happened to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// Connection established: produces the greeting.
    Connected,
    /// Raw bytes from the socket, any split (partial lines, many lines).
    Bytes(&'a [u8]),
    /// Answer to [`Action::Login`].
    LoginDone(LoginOutcome),
    /// Answer to [`Action::Update`]: true = deletions committed.
    UpdateDone(bool),
    /// The TLS handshake requested by [`Action::StartTls`] succeeded (on
    /// failure the driver closes the connection instead).
    TlsUp,
    /// Inactivity deadline passed.
    Timeout,
    /// Peer closed.
    Eof,
}

/// Something the driver must do, in order.
#[derive(Clone, PartialEq, Eq)]
pub enum Action {
    /// Bytes to write, CRLF included.
    Reply(Vec<u8>),
    /// Check credentials, lock the mailbox and load the snapshot; answer with
    /// [`Event::LoginDone`].
    Login { user: String, password: String },
    /// Stream message `id` byte-stuffed, then ".\r\n". top_lines: None = whole (RETR),
    /// Some(n) = headers, the blank line, then n body lines (TOP).
    SendMessage { id: i64, top_lines: Option<u64> },
    /// Enter UPDATE: delete these store ids; the driver answers with UpdateDone.
    Update { deleted: Vec<i64> },
    /// Write the replies produced so far, then perform the server side of the
    /// TLS handshake and answer with [`Event::TlsUp`] (or close on failure).
    /// Plaintext input already received is discarded by the session; bytes
    /// fed before TlsUp are ignored.
    StartTls,
    /// Close the connection (and release the mailbox lock, if held).
    Close,
}

/// Never prints the password.
impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Reply(bytes) => f.debug_tuple("Reply").field(&String::from_utf8_lossy(bytes)).finish(),
            Action::Login { user, .. } => f.debug_struct("Login").field("user", user).field("password", &"<redacted>").finish(),
            Action::SendMessage { id, top_lines } => f.debug_struct("SendMessage").field("id", id).field("top_lines", top_lines).finish(),
            Action::Update { deleted } => f.debug_struct("Update").field("deleted", deleted).finish(),
            Action::StartTls => f.write_str("StartTls"),
            Action::Close => f.write_str("Close"),
        }
    }
}

/// The maildrop snapshot and its deletion marks.
#[derive(Debug)]
struct Maildrop {
    messages: Vec<MaildropMessage>,
    deleted: Vec<bool>,
}

#[derive(Debug)]
enum State {
    /// Waiting for USER/PASS; `user` is set right after a successful USER.
    Authorization {
        user: Option<Vec<u8>>,
    },
    /// `AUTH PLAIN` answered with `+ `: the next line is the SASL response.
    SaslPlain,
    /// Action::StartTls issued, waiting for TlsUp.
    StartTls,
    /// Action::Login issued, waiting for LoginDone.
    LoginPending {
        user: String,
    },
    Transaction(Maildrop),
    /// Action::Update issued, waiting for UpdateDone; `remaining` is the
    /// number of messages left if the deletions succeed.
    Update {
        remaining: usize,
    },
    Closed,
}

/// A command that failed; [`CmdError::counts`] tells whether it counts
/// towards `max_errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmdError {
    Unknown,
    WrongState,
    Syntax,
    LineTooLong,
    PassWithoutUser,
    PlaintextDisallowed,
    /// Credentials refused on a plain connection that offers STLS.
    UseStls,
    StlsUnavailable,
    TlsActive,
    UnsupportedMechanism,
    InvalidBase64,
    MalformedPlain,
    AuthCancelled,
    NoSuchMessage,
    AlreadyDeleted(u64),
}

impl CmdError {
    fn counts(self) -> bool {
        !matches!(self, CmdError::NoSuchMessage | CmdError::AlreadyDeleted(_) | CmdError::AuthCancelled)
    }

    fn line(self) -> String {
        match self {
            CmdError::Unknown => "-ERR unknown command".into(),
            CmdError::WrongState => "-ERR command not valid in this state".into(),
            CmdError::Syntax => "-ERR syntax error".into(),
            CmdError::LineTooLong => "-ERR line too long".into(),
            CmdError::PassWithoutUser => "-ERR PASS must directly follow USER".into(),
            CmdError::PlaintextDisallowed => "-ERR [AUTH] Plaintext authentication disallowed without TLS".into(),
            CmdError::UseStls => "-ERR [AUTH] Authentication requires TLS: use STLS".into(),
            CmdError::StlsUnavailable => "-ERR STLS not available".into(),
            CmdError::TlsActive => "-ERR Command not permitted when TLS active".into(),
            CmdError::UnsupportedMechanism => "-ERR [AUTH] Unsupported authentication mechanism".into(),
            CmdError::InvalidBase64 => "-ERR [AUTH] Invalid base64".into(),
            CmdError::MalformedPlain => "-ERR [AUTH] Malformed PLAIN response".into(),
            CmdError::AuthCancelled => "-ERR Authentication cancelled".into(),
            CmdError::NoSuchMessage => "-ERR no such message".into(),
            CmdError::AlreadyDeleted(n) => format!("-ERR message {n} already deleted"),
        }
    }
}

const AUTH_FAILED: &str = "-ERR [AUTH] Invalid user name or password";
const AUTHZ_NOT_ALLOWED: &str = "-ERR [AUTH] Authorization identity not allowed";
const IN_USE: &str = "-ERR [IN-USE] Mailbox is locked by another session";
const TEMP_FAIL: &str = "-ERR [SYS/TEMP] Temporary failure, try again later";
const UPDATE_FAILED: &str = "-ERR [SYS/TEMP] some deleted messages not removed";
const TOO_MANY_ERRORS: &str = "-ERR too many errors";
const TIMEOUT: &str = "-ERR Inactivity timeout, closing";

/// Verbs valid only in TRANSACTION.
const TRANSACTION_VERBS: &[&[u8]] = &[b"STAT", b"LIST", b"RETR", b"DELE", b"RSET", b"TOP", b"UIDL", b"NOOP"];

/// One POP3 connection's protocol state.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    greeted: bool,
    /// Unprocessed input (at most one partial line unless waiting).
    input: Vec<u8>,
    /// Skipping the rest of an over-long line up to the next LF.
    discarding: bool,
    errors: u32,
    failed_logins: u32,
    user: Option<String>,
    /// The connection is encrypted (implicit TLS, or STLS completed).
    tls: bool,
    /// Complete lines read, well-formed or not: the inactivity timer restarts on these only.
    lines: u64,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        Session {
            tls: config.tls_active,
            config,
            state: State::Authorization { user: None },
            greeted: false,
            input: Vec::new(),
            discarding: false,
            errors: 0,
            failed_logins: 0,
            user: None,
            lines: 0,
        }
    }

    /// Feed one event; returns the actions to perform, in order.
    pub fn handle(&mut self, event: Event<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_closed() {
            return out;
        }
        match event {
            Event::Connected => self.connected(&mut out),
            Event::Bytes(bytes) => self.bytes(bytes, &mut out),
            Event::LoginDone(outcome) => self.login_done(outcome, &mut out),
            Event::UpdateDone(committed) => self.update_done(committed, &mut out),
            Event::TlsUp => self.tls_up(),
            Event::Timeout => {
                reply(&mut out, TIMEOUT);
                self.close(&mut out);
            }
            Event::Eof => self.close(&mut out),
        }
        out
    }

    /// True while waiting for LoginDone/UpdateDone/TlsUp (driver must not
    /// expect more replies until it feeds it).
    pub fn is_waiting(&self) -> bool {
        matches!(self.state, State::LoginPending { .. } | State::Update { .. } | State::StartTls)
    }

    /// True once the connection is encrypted (implicit TLS or after TlsUp).
    pub fn tls_active(&self) -> bool {
        self.tls
    }

    /// Authenticated user name, for logs (kept after close).
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Complete lines read so far. P6: the driver restarts its inactivity timer when this
    /// moves, so a client trickling one byte at a time cannot hold the session open.
    pub fn progress(&self) -> u64 {
        self.lines
    }

    /// True once [`Action::Close`] has been produced.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    // ----- events -----

    fn connected(&mut self, out: &mut Vec<Action>) {
        if self.greeted {
            return;
        }
        self.greeted = true;
        reply(out, &format!("+OK {} POP3 server ready", self.config.hostname));
        // Input that (wrongly) arrived before Connected is answered after the greeting.
        self.process_input(out);
    }

    fn bytes(&mut self, bytes: &[u8], out: &mut Vec<Action>) {
        if matches!(self.state, State::Update { .. } | State::StartTls) {
            // After QUIT only UpdateDone matters; the session ends either way.
            // Before TlsUp, plaintext bytes must never reach the TLS session.
            return;
        }
        self.input.extend_from_slice(bytes);
        self.process_input(out);
        if self.input.len() > MAX_PENDING_INPUT {
            self.close(out);
        }
    }

    fn login_done(&mut self, outcome: LoginOutcome, out: &mut Vec<Action>) {
        let State::LoginPending { user } = &mut self.state else {
            return; // not asked for: ignore
        };
        let user = std::mem::take(user);
        self.state = State::Authorization { user: None };
        match outcome {
            LoginOutcome::Ok { messages } => {
                let deleted = vec![false; messages.len()];
                let maildrop = Maildrop { messages, deleted };
                let (count, octets) = maildrop.totals();
                reply(out, &format!("+OK Logged in, {count} messages ({octets} octets)"));
                self.user = Some(user);
                self.state = State::Transaction(maildrop);
            }
            LoginOutcome::BadCredentials => self.login_failed(out),
            LoginOutcome::InUse => reply(out, IN_USE),
            LoginOutcome::TempFail => reply(out, TEMP_FAIL),
        }
        self.process_input(out);
    }

    fn tls_up(&mut self) {
        if !matches!(self.state, State::StartTls) {
            return; // not asked for: ignore
        }
        // RFC 2595 section 4: forget everything learnt before the upgrade.
        // No new greeting; the client talks first (usually CAPA).
        self.tls = true;
        self.state = State::Authorization { user: None };
        self.input.clear();
        self.discarding = false;
    }

    fn update_done(&mut self, committed: bool, out: &mut Vec<Action>) {
        let State::Update { remaining } = self.state else {
            return; // not asked for: ignore
        };
        if committed {
            let host = &self.config.hostname;
            reply(out, &format!("+OK {host} signing off ({remaining} messages left)"));
        } else {
            reply(out, UPDATE_FAILED);
        }
        self.close(out);
    }

    // ----- input -----

    /// Process complete lines while the session can answer them.
    fn process_input(&mut self, out: &mut Vec<Action>) {
        let mut pos = 0;
        while self.greeted && matches!(self.state, State::Authorization { .. } | State::Transaction(_) | State::SaslPlain) {
            let limit = self.line_limit();
            let rest = &self.input[pos..];
            let newline = rest.iter().position(|&b| b == b'\n');
            if self.discarding {
                match newline {
                    Some(i) => {
                        pos += i + 1;
                        self.discarding = false;
                        continue;
                    }
                    None => {
                        pos = self.input.len();
                        break;
                    }
                }
            }
            match newline {
                Some(i) if i + 1 > limit => {
                    pos += i + 1;
                    self.lines += 1;
                    self.line_too_long(out);
                }
                Some(i) => {
                    let line = rest[..i].to_vec();
                    pos += i + 1;
                    self.lines += 1;
                    self.command(&line, out);
                }
                // Whatever follows, the line cannot fit any more.
                None if rest.len() >= limit => {
                    pos = self.input.len();
                    self.discarding = true;
                    self.lines += 1;
                    self.line_too_long(out);
                }
                None => break,
            }
        }
        // The session ends from UPDATE or CLOSED: nothing left will be answered.
        // After STLS, whatever the client pipelined in plaintext is dropped
        // (RFC 2595 section 4: no command injection across the upgrade).
        if matches!(self.state, State::Update { .. } | State::Closed | State::StartTls) {
            self.input.clear();
        } else {
            self.input.drain(..pos);
        }
    }

    /// Longest line accepted in the current state, terminator included.
    fn line_limit(&self) -> usize {
        if matches!(self.state, State::SaslPlain) { MAX_SASL_LINE } else { MAX_LINE }
    }

    /// An over-long line; one in place of a SASL response aborts the exchange.
    fn line_too_long(&mut self, out: &mut Vec<Action>) {
        if matches!(self.state, State::SaslPlain) {
            self.state = State::Authorization { user: None };
        }
        self.fail(CmdError::LineTooLong, out);
    }

    /// One command line, terminator removed except possibly a CR.
    fn command(&mut self, line: &[u8], out: &mut Vec<Action>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if matches!(self.state, State::SaslPlain) {
            return self.sasl_response(line, out);
        }
        let line = trim_start(line);
        let (verb, rest) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], &line[i..]),
            None => (line, &b""[..]),
        };
        let verb = verb.to_ascii_uppercase();
        if matches!(self.state, State::Authorization { .. }) {
            self.authorization_command(&verb, rest, out);
        } else {
            let args: Vec<&[u8]> = rest.split(|&b| b == b' ').filter(|a| !a.is_empty()).collect();
            self.transaction_command(&verb, &args, out);
        }
    }

    // ----- AUTHORIZATION -----

    fn authorization_command(&mut self, verb: &[u8], rest: &[u8], out: &mut Vec<Action>) {
        // PASS is only valid directly after USER: any command consumes the name.
        let pending_user = match &mut self.state {
            State::Authorization { user } => user.take(),
            _ => None,
        };
        match verb {
            b"USER" => self.cmd_user(rest, out),
            // Everything after "PASS " is the password, spaces included.
            b"PASS" => self.cmd_pass(pending_user, rest.get(1..), out),
            b"AUTH" => self.cmd_auth(rest, out),
            b"STLS" => self.cmd_stls(rest, out),
            b"QUIT" => {
                reply(out, &format!("+OK {} signing off", self.config.hostname));
                self.close(out);
            }
            b"CAPA" => self.cmd_capa(out),
            b"UTF8" => self.cmd_utf8(rest, out),
            v if TRANSACTION_VERBS.contains(&v) => self.fail(CmdError::WrongState, out),
            _ => self.fail(CmdError::Unknown, out),
        }
    }

    /// RFC 6856 §2: the client will take UTF-8 in messages and replies. Postroom hands out
    /// messages as they were received either way (it never downgrades), and passwords were
    /// UTF-8 already; user names are ASCII in the directory, so the capability has no `USER`
    /// tag and a UTF-8 name simply fails to log in like any unknown one. Names are compared
    /// as given, without SASLprep/PRECIS normalisation: an ASCII name needs none.
    fn cmd_utf8(&mut self, rest: &[u8], out: &mut Vec<Action>) {
        if !trim_start(rest).is_empty() {
            return self.fail(CmdError::Syntax, out);
        }
        reply(out, "+OK UTF8 enabled");
    }

    /// Credentials may be sent now: over TLS, or plaintext is allowed.
    fn credentials_usable(&self) -> bool {
        self.tls || self.config.allow_plaintext_auth
    }

    /// STLS is offered: configured, and not encrypted yet.
    fn stls_offered(&self) -> bool {
        self.config.stls_available && !self.tls
    }

    /// USER, PASS or AUTH while credentials are not usable.
    fn refuse_credentials(&mut self, out: &mut Vec<Action>) {
        let error = if self.stls_offered() { CmdError::UseStls } else { CmdError::PlaintextDisallowed };
        self.fail(error, out);
    }

    fn cmd_stls(&mut self, rest: &[u8], out: &mut Vec<Action>) {
        if self.tls {
            return self.fail(CmdError::TlsActive, out);
        }
        if !self.config.stls_available {
            return self.fail(CmdError::StlsUnavailable, out);
        }
        if !trim_start(rest).is_empty() {
            return self.fail(CmdError::Syntax, out);
        }
        reply(out, "+OK Begin TLS negotiation");
        out.push(Action::StartTls);
        // process_input drops the rest of the buffered input, bytes() ignores
        // anything else until TlsUp.
        self.state = State::StartTls;
        self.discarding = false;
    }

    /// `AUTH`, `AUTH PLAIN` or `AUTH PLAIN <initial-response>` (RFC 5034).
    fn cmd_auth(&mut self, rest: &[u8], out: &mut Vec<Action>) {
        if !self.credentials_usable() {
            return self.refuse_credentials(out);
        }
        let args: Vec<&[u8]> = rest.split(|&b| b == b' ').filter(|a| !a.is_empty()).collect();
        match args.as_slice() {
            // Not in RFC 5034, but widely used by clients to probe.
            [] => out.push(multiline("+OK", ["PLAIN"])),
            [mechanism, ..] if !mechanism.eq_ignore_ascii_case(b"PLAIN") => self.fail(CmdError::UnsupportedMechanism, out),
            [_] => {
                reply(out, "+ ");
                self.state = State::SaslPlain;
            }
            [_, initial] => self.sasl_plain(initial, out),
            _ => self.fail(CmdError::Syntax, out),
        }
    }

    /// The client's line after `+ `: base64 PLAIN message, or `*` to cancel.
    fn sasl_response(&mut self, line: &[u8], out: &mut Vec<Action>) {
        self.state = State::Authorization { user: None };
        let line = trim_end(trim_start(line));
        if line == b"*" {
            return self.fail(CmdError::AuthCancelled, out);
        }
        self.sasl_plain(line, out);
    }

    /// Decode and check a PLAIN response (RFC 4616, shared with SMTP AUTH in
    /// `mail_proto::sasl`), then log in as authcid. `=` stands for an empty response.
    fn sasl_plain(&mut self, encoded: &[u8], out: &mut Vec<Action>) {
        let Ok(message) = sasl::decode(encoded) else {
            return self.fail(CmdError::InvalidBase64, out);
        };
        match sasl::parse_plain(&message) {
            Ok((_, password)) if password.is_empty() => self.fail(CmdError::MalformedPlain, out),
            Ok((user, password)) => self.start_login(user, password, out),
            // No proxy or master-user logins: acting as someone else is refused.
            Err(SaslError::AuthzidNotAllowed) => self.login_failed_with(AUTHZ_NOT_ALLOWED, out),
            Err(_) => self.fail(CmdError::MalformedPlain, out),
        }
    }

    fn cmd_user(&mut self, rest: &[u8], out: &mut Vec<Action>) {
        if !self.credentials_usable() {
            return self.refuse_credentials(out);
        }
        let name = trim_end(trim_start(rest));
        if name.is_empty() {
            return self.fail(CmdError::Syntax, out);
        }
        self.state = State::Authorization { user: Some(name.to_vec()) };
        reply(out, "+OK");
    }

    fn cmd_pass(&mut self, user: Option<Vec<u8>>, password: Option<&[u8]>, out: &mut Vec<Action>) {
        if !self.credentials_usable() {
            return self.refuse_credentials(out);
        }
        let Some(user) = user else {
            return self.fail(CmdError::PassWithoutUser, out);
        };
        let password = match password {
            Some(p) if !p.is_empty() => p,
            _ => return self.fail(CmdError::Syntax, out),
        };
        match (String::from_utf8(user), std::str::from_utf8(password)) {
            (Ok(user), Ok(password)) => self.start_login(user, password.to_owned(), out),
            // Non-UTF-8 credentials cannot match anything: same answer as a bad password.
            _ => self.login_failed(out),
        }
    }

    /// Ask the driver to check the credentials; LoginDone answers.
    fn start_login(&mut self, user: String, password: String, out: &mut Vec<Action>) {
        out.push(Action::Login { user: user.clone(), password });
        self.state = State::LoginPending { user };
    }

    fn login_failed(&mut self, out: &mut Vec<Action>) {
        self.login_failed_with(AUTH_FAILED, out);
    }

    fn login_failed_with(&mut self, text: &str, out: &mut Vec<Action>) {
        self.failed_logins = self.failed_logins.saturating_add(1);
        reply(out, text);
        if self.failed_logins >= self.config.max_failed_logins {
            self.close(out);
        }
    }

    fn cmd_capa(&mut self, out: &mut Vec<Action>) {
        let mut lines = vec!["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"];
        if matches!(self.state, State::Authorization { .. }) {
            if self.stls_offered() {
                lines.push("STLS");
            }
            if self.credentials_usable() {
                lines.push("USER");
                lines.push("SASL PLAIN");
            }
        }
        // RFC 6856: the extension exists in every state, its command works before login.
        lines.push("UTF8");
        lines.push("IMPLEMENTATION Postroom");
        out.push(multiline("+OK Capability list follows", lines));
    }

    // ----- TRANSACTION -----

    fn transaction_command(&mut self, verb: &[u8], args: &[&[u8]], out: &mut Vec<Action>) {
        match verb {
            b"QUIT" => return self.cmd_quit(out),
            b"CAPA" => return self.cmd_capa(out),
            _ => {}
        }
        let State::Transaction(maildrop) = &mut self.state else {
            return;
        };
        let result = match verb {
            b"STAT" => cmd_stat(maildrop),
            b"LIST" => cmd_list(maildrop, args),
            b"UIDL" => cmd_uidl(maildrop, args),
            b"RETR" => cmd_retr(maildrop, args),
            b"TOP" => cmd_top(maildrop, args),
            b"DELE" => cmd_dele(maildrop, args),
            b"RSET" => cmd_rset(maildrop),
            b"NOOP" => Ok(vec![ok_line("+OK")]),
            b"USER" | b"PASS" | b"AUTH" | b"STLS" | b"UTF8" => Err(CmdError::WrongState),
            _ => Err(CmdError::Unknown),
        };
        match result {
            Ok(actions) => out.extend(actions),
            Err(e) => self.fail(e, out),
        }
    }

    fn cmd_quit(&mut self, out: &mut Vec<Action>) {
        let State::Transaction(maildrop) = &self.state else {
            return;
        };
        let deleted: Vec<i64> = maildrop.messages.iter().zip(&maildrop.deleted).filter(|&(_, &d)| d).map(|(m, _)| m.id).collect();
        let remaining = maildrop.messages.len() - deleted.len();
        // Pipelined input after QUIT is dropped by process_input.
        self.state = State::Update { remaining };
        out.push(Action::Update { deleted });
    }

    // ----- shared -----

    /// Reply with a failed command's error line and apply the error limit.
    fn fail(&mut self, error: CmdError, out: &mut Vec<Action>) {
        reply(out, &error.line());
        if error.counts() {
            self.errors = self.errors.saturating_add(1);
            if self.errors >= self.config.max_errors {
                reply(out, TOO_MANY_ERRORS);
                self.close(out);
            }
        }
    }

    fn close(&mut self, out: &mut Vec<Action>) {
        self.state = State::Closed;
        self.input.clear();
        out.push(Action::Close);
    }
}

impl Maildrop {
    /// Non-deleted messages with their 1-based numbers.
    fn visible(&self) -> impl Iterator<Item = (usize, &MaildropMessage)> {
        self.messages.iter().zip(&self.deleted).enumerate().filter(|&(_, (_, &deleted))| !deleted).map(|(i, (m, _))| (i + 1, m))
    }

    /// Count and total octets of the non-deleted messages.
    fn totals(&self) -> (usize, u64) {
        self.visible().fold((0, 0), |(n, octets), (_, m)| (n + 1, octets.saturating_add(m.size)))
    }

    /// Index of the visible message named by a message-number argument.
    fn lookup(&self, arg: &[u8]) -> Result<usize, CmdError> {
        let number = parse_number(arg)?;
        let index =
            usize::try_from(number).ok().and_then(|n| n.checked_sub(1)).filter(|&i| i < self.messages.len()).ok_or(CmdError::NoSuchMessage)?;
        if self.deleted[index] {
            return Err(CmdError::AlreadyDeleted(number));
        }
        Ok(index)
    }
}

type CmdResult = Result<Vec<Action>, CmdError>;

fn cmd_stat(maildrop: &Maildrop) -> CmdResult {
    let (count, octets) = maildrop.totals();
    Ok(vec![ok_line(&format!("+OK {count} {octets}"))])
}

fn cmd_list(maildrop: &Maildrop, args: &[&[u8]]) -> CmdResult {
    match args {
        [] => {
            let (count, octets) = maildrop.totals();
            let lines = maildrop.visible().map(|(n, m)| format!("{n} {}", m.size));
            Ok(vec![multiline(&format!("+OK {count} messages ({octets} octets)"), lines)])
        }
        [arg] => {
            let i = maildrop.lookup(arg)?;
            Ok(vec![ok_line(&format!("+OK {} {}", i + 1, maildrop.messages[i].size))])
        }
        _ => Err(CmdError::Syntax),
    }
}

fn cmd_uidl(maildrop: &Maildrop, args: &[&[u8]]) -> CmdResult {
    match args {
        [] => {
            let lines = maildrop.visible().map(|(n, m)| format!("{n} {}", clean_uidl(m)));
            Ok(vec![multiline("+OK unique-id listing follows", lines)])
        }
        [arg] => {
            let i = maildrop.lookup(arg)?;
            Ok(vec![ok_line(&format!("+OK {} {}", i + 1, clean_uidl(&maildrop.messages[i])))])
        }
        _ => Err(CmdError::Syntax),
    }
}

fn cmd_retr(maildrop: &Maildrop, args: &[&[u8]]) -> CmdResult {
    let [arg] = args else {
        return Err(CmdError::Syntax);
    };
    let message = &maildrop.messages[maildrop.lookup(arg)?];
    Ok(vec![ok_line(&format!("+OK {} octets", message.size)), Action::SendMessage { id: message.id, top_lines: None }])
}

fn cmd_top(maildrop: &Maildrop, args: &[&[u8]]) -> CmdResult {
    let [msg, lines] = args else {
        return Err(CmdError::Syntax);
    };
    let lines = parse_number(lines)?;
    let message = &maildrop.messages[maildrop.lookup(msg)?];
    Ok(vec![ok_line("+OK"), Action::SendMessage { id: message.id, top_lines: Some(lines) }])
}

fn cmd_dele(maildrop: &mut Maildrop, args: &[&[u8]]) -> CmdResult {
    let [arg] = args else {
        return Err(CmdError::Syntax);
    };
    let i = maildrop.lookup(arg)?;
    maildrop.deleted[i] = true;
    Ok(vec![ok_line(&format!("+OK message {} deleted", i + 1))])
}

fn cmd_rset(maildrop: &mut Maildrop) -> CmdResult {
    maildrop.deleted.fill(false);
    Ok(vec![ok_line("+OK")])
}

// ----- helpers -----

/// Decimal digits only; values beyond u64 saturate (no such message / whole body).
fn parse_number(arg: &[u8]) -> Result<u64, CmdError> {
    if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
        return Err(CmdError::Syntax);
    }
    Ok(arg.iter().fold(0u64, |n, &d| n.saturating_mul(10).saturating_add(u64::from(d - b'0'))))
}

/// The uidl restricted to 0x21..=0x7E so it can never break the protocol;
/// falls back to the store id if nothing printable is left.
fn clean_uidl(message: &MaildropMessage) -> String {
    let clean: String = message.uidl.chars().filter(|c| ('!'..='~').contains(c)).collect();
    if clean.is_empty() { message.id.to_string() } else { clean }
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != b' ').unwrap_or(bytes.len());
    &bytes[start..]
}

fn trim_end(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    &bytes[..end]
}

fn ok_line(text: &str) -> Action {
    let mut bytes = Vec::with_capacity(text.len() + 2);
    bytes.extend_from_slice(text.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    Action::Reply(bytes)
}

fn reply(out: &mut Vec<Action>, text: &str) {
    out.push(ok_line(text));
}

/// A multi-line response: first line, the lines, then ".". No line starts
/// with '.', so no byte-stuffing is needed.
fn multiline<S: AsRef<str>>(first: &str, lines: impl IntoIterator<Item = S>) -> Action {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(first.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    for line in lines {
        bytes.extend_from_slice(line.as_ref().as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b".\r\n");
    Action::Reply(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "mail.example.test";

    fn config() -> SessionConfig {
        SessionConfig {
            hostname: HOST.into(),
            allow_plaintext_auth: true,
            stls_available: false,
            tls_active: false,
            max_failed_logins: 3,
            max_errors: 20,
        }
    }

    fn messages() -> Vec<MaildropMessage> {
        vec![
            MaildropMessage { id: 10, size: 120, uidl: "uid-a".into() },
            MaildropMessage { id: 11, size: 200, uidl: "uid-b".into() },
            MaildropMessage { id: 12, size: 300, uidl: "uid-c".into() },
        ]
    }

    fn r(text: &str) -> Action {
        Action::Reply(text.as_bytes().to_vec())
    }

    fn login_action(user: &str, password: &str) -> Action {
        Action::Login { user: user.into(), password: password.into() }
    }

    /// Connected session with the greeting checked.
    fn connected(config: SessionConfig) -> Session {
        let mut s = Session::new(config);
        assert_eq!(s.handle(Event::Connected), vec![r("+OK mail.example.test POP3 server ready\r\n")]);
        s
    }

    fn feed(s: &mut Session, bytes: &[u8]) -> Vec<Action> {
        s.handle(Event::Bytes(bytes))
    }

    /// `cmd` is answered with `want` alone; a failure names the command.
    fn answers(s: &mut Session, cmd: &[u8], want: &Action) {
        assert_eq!(feed(s, cmd), vec![want.clone()], "{}", String::from_utf8_lossy(cmd));
    }

    /// Session in TRANSACTION over `messages()`.
    fn logged_in() -> Session {
        let mut s = connected(config());
        assert_eq!(feed(&mut s, b"USER alice\r\n"), vec![r("+OK\r\n")]);
        assert_eq!(feed(&mut s, b"PASS secret\r\n"), vec![login_action("alice", "secret")]);
        assert!(s.is_waiting());
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() })), vec![r("+OK Logged in, 3 messages (620 octets)\r\n")]);
        assert!(!s.is_waiting());
        assert_eq!(s.user(), Some("alice"));
        s
    }

    #[test]
    fn progress_counts_complete_lines_only() {
        // P6: the driver's inactivity timer follows this; a trickle must not move it.
        let mut s = logged_in();
        let before = s.progress();
        for b in b"NOO" {
            assert!(feed(&mut s, &[*b]).is_empty());
        }
        assert_eq!(s.progress(), before);
        assert_eq!(feed(&mut s, b"P\r\n"), vec![r("+OK\r\n")]);
        assert_eq!(s.progress(), before + 1);
        feed(&mut s, &[b'x'; 300]);
        assert_eq!(s.progress(), before + 2, "an over-long line counts once, when refused");
        feed(&mut s, b"xx\r\nNOOP\r\n");
        assert_eq!(s.progress(), before + 3);
    }

    /// Concatenated Reply bytes as text; panics on other actions.
    fn text(actions: &[Action]) -> String {
        actions
            .iter()
            .map(|a| match a {
                Action::Reply(b) => String::from_utf8_lossy(b).into_owned(),
                other => panic!("unexpected action {other:?}"),
            })
            .collect()
    }

    #[test]
    fn greeting_only_once() {
        let mut s = connected(config());
        assert!(s.handle(Event::Connected).is_empty());
        assert_eq!(s.user(), None);
        assert!(!s.is_waiting());
    }

    #[test]
    fn full_session() {
        let mut s = logged_in();
        assert_eq!(feed(&mut s, b"STAT\r\n"), vec![r("+OK 3 620\r\n")]);
        assert_eq!(feed(&mut s, b"LIST\r\n"), vec![r("+OK 3 messages (620 octets)\r\n1 120\r\n2 200\r\n3 300\r\n.\r\n")]);
        assert_eq!(feed(&mut s, b"LIST 2\r\n"), vec![r("+OK 2 200\r\n")]);
        assert_eq!(feed(&mut s, b"UIDL\r\n"), vec![r("+OK unique-id listing follows\r\n1 uid-a\r\n2 uid-b\r\n3 uid-c\r\n.\r\n")]);
        assert_eq!(feed(&mut s, b"UIDL 3\r\n"), vec![r("+OK 3 uid-c\r\n")]);
        assert_eq!(feed(&mut s, b"RETR 1\r\n"), vec![r("+OK 120 octets\r\n"), Action::SendMessage { id: 10, top_lines: None }]);
        assert_eq!(feed(&mut s, b"TOP 2 5\r\n"), vec![r("+OK\r\n"), Action::SendMessage { id: 11, top_lines: Some(5) }]);
        assert_eq!(feed(&mut s, b"TOP 3 0\r\n"), vec![r("+OK\r\n"), Action::SendMessage { id: 12, top_lines: Some(0) }]);
        assert_eq!(feed(&mut s, b"DELE 1\r\n"), vec![r("+OK message 1 deleted\r\n")]);
        assert_eq!(feed(&mut s, b"STAT\r\n"), vec![r("+OK 2 500\r\n")]);
        assert_eq!(feed(&mut s, b"RSET\r\n"), vec![r("+OK\r\n")]);
        assert_eq!(feed(&mut s, b"STAT\r\n"), vec![r("+OK 3 620\r\n")]);
        assert_eq!(feed(&mut s, b"NOOP\r\n"), vec![r("+OK\r\n")]);
        assert_eq!(feed(&mut s, b"DELE 3\r\n"), vec![r("+OK message 3 deleted\r\n")]);
        assert_eq!(feed(&mut s, b"DELE 1\r\n"), vec![r("+OK message 1 deleted\r\n")]);
        assert_eq!(feed(&mut s, b"QUIT\r\n"), vec![Action::Update { deleted: vec![10, 12] }]);
        assert!(s.is_waiting());
        assert_eq!(s.handle(Event::UpdateDone(true)), vec![r("+OK mail.example.test signing off (1 messages left)\r\n"), Action::Close]);
        assert!(s.is_closed());
        assert!(!s.is_waiting());
        assert_eq!(s.user(), Some("alice"));
    }

    #[test]
    fn quit_without_deletions_still_enters_update() {
        let mut s = logged_in();
        assert_eq!(feed(&mut s, b"QUIT\r\n"), vec![Action::Update { deleted: vec![] }]);
        assert_eq!(s.handle(Event::UpdateDone(true)), vec![r("+OK mail.example.test signing off (3 messages left)\r\n"), Action::Close]);
    }

    #[test]
    fn update_failure() {
        let mut s = logged_in();
        feed(&mut s, b"DELE 2\r\n");
        assert_eq!(feed(&mut s, b"QUIT\r\n"), vec![Action::Update { deleted: vec![11] }]);
        assert_eq!(s.handle(Event::UpdateDone(false)), vec![r("-ERR [SYS/TEMP] some deleted messages not removed\r\n"), Action::Close]);
        assert!(s.handle(Event::UpdateDone(true)).is_empty());
    }

    #[test]
    fn input_during_update_is_ignored() {
        let mut s = logged_in();
        assert_eq!(feed(&mut s, b"QUIT\r\nNOOP\r\n"), vec![Action::Update { deleted: vec![] }]);
        assert!(feed(&mut s, b"STAT\r\n").is_empty());
        assert!(s.handle(Event::Timeout).len() == 2, "timeout still closes");
        assert!(s.handle(Event::UpdateDone(true)).is_empty());
    }

    #[test]
    fn pipelined_commands_wait_for_login_result() {
        let mut s = connected(config());
        let out = feed(&mut s, b"CAPA\r\nUSER bob\r\nPASS pw\r\nSTAT\r\nLIST 1\r\nQUIT\r\nNOOP");
        assert_eq!(out.len(), 3);
        assert!(text(&out[..2]).starts_with("+OK Capability list follows\r\n"));
        assert_eq!(out[1], r("+OK\r\n"));
        assert_eq!(out[2], login_action("bob", "pw"));
        assert!(s.is_waiting());
        // More input while waiting is only buffered.
        assert!(feed(&mut s, b"\r\n").is_empty());
        assert_eq!(
            s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() })),
            vec![r("+OK Logged in, 3 messages (620 octets)\r\n"), r("+OK 3 620\r\n"), r("+OK 1 120\r\n"), Action::Update { deleted: vec![] },]
        );
        // NOOP after QUIT is never answered.
        assert_eq!(s.handle(Event::UpdateDone(true)), vec![r("+OK mail.example.test signing off (3 messages left)\r\n"), Action::Close]);
    }

    #[test]
    fn pipelined_after_failed_login_continues_in_authorization() {
        let mut s = connected(config());
        let out = feed(&mut s, b"USER bob\r\nPASS bad\r\nSTAT\r\nUSER bob\r\nPASS good\r\n");
        assert_eq!(out, vec![r("+OK\r\n"), login_action("bob", "bad")]);
        assert_eq!(
            s.handle(Event::LoginDone(LoginOutcome::BadCredentials)),
            vec![
                r("-ERR [AUTH] Invalid user name or password\r\n"),
                r("-ERR command not valid in this state\r\n"),
                r("+OK\r\n"),
                login_action("bob", "good"),
            ]
        );
        assert_eq!(s.user(), None);
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::Ok { messages: vec![] })), vec![r("+OK Logged in, 0 messages (0 octets)\r\n")]);
        assert_eq!(s.user(), Some("bob"));
    }

    #[test]
    fn byte_by_byte_feeding_matches_whole_feeding() {
        let script: &[u8] = b"USER alice\r\nPASS secret\r\nSTAT\nLIST\r\nUIDL 2\r\nRETR 2\r\n\
            TOP 1 3\r\nDELE 2\r\nLIST 2\r\nRSET\r\nXYZZY\r\nQUIT\r\n";
        let run = |chunk: usize| {
            let mut s = connected(config());
            let mut all = Vec::new();
            for piece in script.chunks(chunk) {
                all.extend(feed(&mut s, piece));
                if let State::LoginPending { .. } = s.state {
                    let outcome = LoginOutcome::Ok { messages: messages() };
                    all.extend(s.handle(Event::LoginDone(outcome)));
                }
            }
            all.extend(s.handle(Event::UpdateDone(true)));
            all
        };
        let whole = run(script.len());
        assert_eq!(run(1), whole);
        assert_eq!(run(7), whole);
        assert_eq!(whole.first(), Some(&r("+OK\r\n")));
        assert_eq!(whole.last(), Some(&Action::Close));
        assert!(whole.contains(&Action::Update { deleted: vec![] }));
        assert!(whole.contains(&r("-ERR unknown command\r\n")));
        assert!(whole.contains(&r("-ERR message 2 already deleted\r\n")));
    }

    #[test]
    fn dropped_connection_deletes_nothing() {
        let mut s = logged_in();
        feed(&mut s, b"DELE 1\r\nDELE 2\r\n");
        let out = s.handle(Event::Eof);
        assert_eq!(out, vec![Action::Close]);
        assert!(s.handle(Event::UpdateDone(true)).is_empty());
        assert!(feed(&mut s, b"QUIT\r\n").is_empty());
        assert!(s.handle(Event::Timeout).is_empty());
        assert!(s.handle(Event::Eof).is_empty());
        assert!(s.handle(Event::Connected).is_empty());
    }

    #[test]
    fn timeout_deletes_nothing() {
        let mut s = logged_in();
        feed(&mut s, b"DELE 1\r\n");
        assert_eq!(s.handle(Event::Timeout), vec![r("-ERR Inactivity timeout, closing\r\n"), Action::Close]);
        assert!(feed(&mut s, b"QUIT\r\n").is_empty());
    }

    #[test]
    fn timeout_and_eof_while_login_pending() {
        let mut s = connected(config());
        feed(&mut s, b"USER a\r\nPASS b\r\nQUIT\r\n");
        assert_eq!(s.handle(Event::Eof), vec![Action::Close]);
        assert!(s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() })).is_empty());
        assert_eq!(s.user(), None);
    }

    #[test]
    fn deleted_messages_are_invisible() {
        let mut s = logged_in();
        assert_eq!(feed(&mut s, b"DELE 2\r\n"), vec![r("+OK message 2 deleted\r\n")]);
        assert_eq!(feed(&mut s, b"STAT\r\n"), vec![r("+OK 2 420\r\n")]);
        assert_eq!(feed(&mut s, b"LIST\r\n"), vec![r("+OK 2 messages (420 octets)\r\n1 120\r\n3 300\r\n.\r\n")]);
        assert_eq!(feed(&mut s, b"UIDL\r\n"), vec![r("+OK unique-id listing follows\r\n1 uid-a\r\n3 uid-c\r\n.\r\n")]);
        let gone = r("-ERR message 2 already deleted\r\n");
        for cmd in [&b"LIST 2\r\n"[..], b"UIDL 2\r\n", b"RETR 2\r\n", b"TOP 2 1\r\n", b"DELE 2\r\n"] {
            answers(&mut s, cmd, &gone);
        }
        assert_eq!(feed(&mut s, b"RSET\r\n"), vec![r("+OK\r\n")]);
        assert_eq!(feed(&mut s, b"LIST 2\r\n"), vec![r("+OK 2 200\r\n")]);
        // Not counted as protocol errors: plenty of them do not close the session.
        let mut s = logged_in();
        feed(&mut s, b"DELE 1\r\n");
        for _ in 0..50 {
            assert_eq!(feed(&mut s, b"RETR 1\r\n"), vec![r("-ERR message 1 already deleted\r\n")]);
            assert_eq!(feed(&mut s, b"RETR 9\r\n"), vec![r("-ERR no such message\r\n")]);
        }
    }

    #[test]
    fn message_numbers_and_syntax() {
        let mut s = logged_in();
        let none = r("-ERR no such message\r\n");
        let syntax = r("-ERR syntax error\r\n");
        let cases: &[(&[u8], &Action)] = &[
            (b"LIST 0\r\n", &none),
            (b"LIST 4\r\n", &none),
            (b"LIST 99999999999999999999999999\r\n", &none),
            (b"RETR 18446744073709551616\r\n", &none),
            (b"LIST abc\r\n", &syntax),
            (b"LIST -1\r\n", &syntax),
            (b"LIST +1\r\n", &syntax),
            (b"LIST 1 2\r\n", &syntax),
            (b"RETR\r\n", &syntax),
            (b"RETR 1 2\r\n", &syntax),
            (b"DELE\r\n", &syntax),
            (b"TOP 1\r\n", &syntax),
            (b"TOP\r\n", &syntax),
            (b"TOP 1 -1\r\n", &syntax),
            (b"TOP x 1\r\n", &syntax),
            (b"TOP 1 1 1\r\n", &syntax),
            (b"TOP 9 1\r\n", &none),
            (b"UIDL x\r\n", &syntax),
        ];
        for (cmd, want) in cases {
            answers(&mut s, cmd, want);
        }
        // Huge line counts saturate rather than fail.
        assert_eq!(feed(&mut s, b"TOP 1 99999999999999999999999\r\n"), vec![r("+OK\r\n"), Action::SendMessage { id: 10, top_lines: Some(u64::MAX) }]);
        // Nothing was deleted along the way.
        assert_eq!(feed(&mut s, b"STAT\r\n"), vec![r("+OK 3 620\r\n")]);
    }

    #[test]
    fn case_insensitive_lenient_spaces_and_bare_lf() {
        let mut s = connected(config());
        assert_eq!(feed(&mut s, b"  user   alice  \n"), vec![r("+OK\r\n")]);
        assert_eq!(feed(&mut s, b"pAsS secret\n"), vec![login_action("alice", "secret")]);
        s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() }));
        assert_eq!(feed(&mut s, b"list   2  \r\n"), vec![r("+OK 2 200\r\n")]);
        assert_eq!(feed(&mut s, b"top  1   2\n"), vec![r("+OK\r\n"), Action::SendMessage { id: 10, top_lines: Some(2) }]);
        assert_eq!(feed(&mut s, b"Stat\r\nnoop\n"), vec![r("+OK 3 620\r\n"), r("+OK\r\n")]);
    }

    #[test]
    fn password_keeps_spaces() {
        let mut s = connected(config());
        feed(&mut s, b"USER carol\r\n");
        assert_eq!(feed(&mut s, b"PASS  correct horse battery staple \r\n"), vec![login_action("carol", " correct horse battery staple ")]);
    }

    #[test]
    fn pass_rules() {
        let mut s = connected(config());
        let order = r("-ERR PASS must directly follow USER\r\n");
        assert_eq!(feed(&mut s, b"PASS x\r\n"), vec![order.clone()]);
        // Any command between USER and PASS consumes the name.
        feed(&mut s, b"USER dave\r\n");
        assert!(text(&feed(&mut s, b"CAPA\r\n")).starts_with("+OK Capability"));
        assert_eq!(feed(&mut s, b"PASS x\r\n"), vec![order.clone()]);
        // A second USER replaces the first.
        feed(&mut s, b"USER dave\r\nUSER erin\r\n");
        assert_eq!(feed(&mut s, b"PASS x\r\n"), vec![login_action("erin", "x")]);
        s.handle(Event::LoginDone(LoginOutcome::TempFail));
        // Missing name or password.
        assert_eq!(feed(&mut s, b"USER\r\n"), vec![r("-ERR syntax error\r\n")]);
        assert_eq!(feed(&mut s, b"USER   \r\n"), vec![r("-ERR syntax error\r\n")]);
        feed(&mut s, b"USER dave\r\n");
        assert_eq!(feed(&mut s, b"PASS\r\n"), vec![r("-ERR syntax error\r\n")]);
        feed(&mut s, b"USER dave\r\n");
        assert_eq!(feed(&mut s, b"PASS \r\n"), vec![r("-ERR syntax error\r\n")]);
    }

    #[test]
    fn bad_credentials_same_text_then_close() {
        let mut s = connected(config());
        let bad = r("-ERR [AUTH] Invalid user name or password\r\n");
        feed(&mut s, b"USER nobody\r\nPASS x\r\n");
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::BadCredentials)), vec![bad.clone()]);
        // Non-UTF-8 credentials: no Login action, same answer, counted.
        assert_eq!(feed(&mut s, b"USER alice\r\nPASS \xff\xfe\r\n"), vec![r("+OK\r\n"), bad.clone()]);
        feed(&mut s, b"USER alice\r\nPASS wrong\r\n");
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::BadCredentials)), vec![bad.clone(), Action::Close]);
        assert!(s.is_closed());
        assert!(feed(&mut s, b"USER alice\r\n").is_empty());
    }

    #[test]
    fn in_use_and_temp_fail_keep_session() {
        let mut s = connected(config());
        feed(&mut s, b"USER alice\r\nPASS secret\r\n");
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::InUse)), vec![r("-ERR [IN-USE] Mailbox is locked by another session\r\n")]);
        feed(&mut s, b"USER alice\r\nPASS secret\r\n");
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::TempFail)), vec![r("-ERR [SYS/TEMP] Temporary failure, try again later\r\n")]);
        // Neither counts as a failed login.
        for _ in 0..5 {
            feed(&mut s, b"USER alice\r\nPASS secret\r\n");
            assert_eq!(s.handle(Event::LoginDone(LoginOutcome::InUse)).len(), 1);
        }
        assert_eq!(s.user(), None);
        feed(&mut s, b"USER alice\r\nPASS secret\r\n");
        s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() }));
        assert_eq!(s.user(), Some("alice"));
    }

    #[test]
    fn unexpected_results_are_ignored() {
        let mut s = connected(config());
        assert!(s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() })).is_empty());
        assert!(s.handle(Event::UpdateDone(true)).is_empty());
        assert_eq!(s.user(), None);
        assert_eq!(feed(&mut s, b"STAT\r\n"), vec![r("-ERR command not valid in this state\r\n")]);
    }

    #[test]
    fn over_long_line() {
        let mut s = logged_in();
        let mut long = vec![b'A'; 300];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(feed(&mut s, &long), vec![r("-ERR line too long\r\n"), r("+OK\r\n")]);

        // Split over several events: error reported once, rest of the line skipped.
        assert_eq!(feed(&mut s, &[b'N'; 200]), vec![]);
        assert_eq!(feed(&mut s, &[b'O'; 200]), vec![r("-ERR line too long\r\n")]);
        assert_eq!(feed(&mut s, b"STAT STAT STAT"), vec![]);
        assert_eq!(feed(&mut s, b"\r\nSTAT\r\n"), vec![r("+OK 3 620\r\n")]);

        // 255 octets including CRLF is accepted, 256 is not.
        let mut ok = b"NOOP ".to_vec();
        ok.resize(253, b'x');
        ok.extend_from_slice(b"\r\n");
        assert_eq!(feed(&mut s, &ok), vec![r("+OK\r\n")]);
        let mut too_long = b"NOOP ".to_vec();
        too_long.resize(254, b'x');
        too_long.extend_from_slice(b"\r\n");
        assert_eq!(feed(&mut s, &too_long), vec![r("-ERR line too long\r\n")]);
        assert_eq!(feed(&mut s, b"NOOP\r\n"), vec![r("+OK\r\n")]);
    }

    #[test]
    fn error_limit_closes() {
        let mut s = connected(SessionConfig { max_errors: 3, ..config() });
        assert_eq!(feed(&mut s, b"FOO\r\n"), vec![r("-ERR unknown command\r\n")]);
        assert_eq!(feed(&mut s, b"\r\n"), vec![r("-ERR unknown command\r\n")]);
        assert_eq!(
            feed(&mut s, b"RETR 1\r\nNOOP\r\n"),
            vec![r("-ERR command not valid in this state\r\n"), r("-ERR too many errors\r\n"), Action::Close]
        );
        assert!(feed(&mut s, b"QUIT\r\n").is_empty());

        // Default limit of 20, reached in TRANSACTION; long lines count too.
        let mut s = logged_in();
        for _ in 0..18 {
            assert_eq!(feed(&mut s, b"bogus\r\n"), vec![r("-ERR unknown command\r\n")]);
        }
        assert_eq!(feed(&mut s, b"USER x\r\n"), vec![r("-ERR command not valid in this state\r\n")]);
        let mut long = vec![b'x'; 400];
        long.extend_from_slice(b"\r\nQUIT\r\n");
        assert_eq!(feed(&mut s, &long), vec![r("-ERR line too long\r\n"), r("-ERR too many errors\r\n"), Action::Close]);
    }

    #[test]
    fn capa() {
        let mut s = connected(config());
        let with_user = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n\
            AUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\nSASL PLAIN\r\nUTF8\r\nIMPLEMENTATION Postroom\r\n.\r\n";
        let without_user = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n\
            AUTH-RESP-CODE\r\nPIPELINING\r\nUTF8\r\nIMPLEMENTATION Postroom\r\n.\r\n";
        assert_eq!(feed(&mut s, b"capa\r\n"), vec![r(with_user)]);

        let mut s = logged_in();
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(without_user)]);

        let mut s = connected(SessionConfig { allow_plaintext_auth: false, ..config() });
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(without_user)]);
    }

    #[test]
    fn utf8_command_before_login_only() {
        let mut s = connected(config());
        assert_eq!(feed(&mut s, b"UTF8\r\n"), vec![r("+OK UTF8 enabled\r\n")]);
        assert_eq!(feed(&mut s, b"utf8 now\r\n"), vec![r("-ERR syntax error\r\n")]);
        // A UTF-8 user name is passed to the login check like any other (and fails there).
        assert_eq!(feed(&mut s, "USER jörg\r\n".as_bytes()), vec![r("+OK\r\n")]);
        let out = feed(&mut s, "PASS pässwörd\r\n".as_bytes());
        assert_eq!(out, vec![Action::Login { user: "jörg".into(), password: "pässwörd".into() }]);
        let mut s = logged_in();
        assert_eq!(feed(&mut s, b"UTF8\r\n"), vec![r("-ERR command not valid in this state\r\n")]);
    }

    #[test]
    fn plaintext_disallowed() {
        let mut s = connected(SessionConfig { allow_plaintext_auth: false, ..config() });
        let refused = r("-ERR [AUTH] Plaintext authentication disallowed without TLS\r\n");
        assert_eq!(feed(&mut s, b"USER alice\r\n"), vec![refused.clone()]);
        assert_eq!(feed(&mut s, b"PASS secret\r\n"), vec![refused]);
        assert_eq!(feed(&mut s, b"QUIT\r\n"), vec![r("+OK mail.example.test signing off\r\n"), Action::Close]);
    }

    #[test]
    fn quit_in_authorization_has_no_update() {
        let mut s = connected(config());
        assert_eq!(feed(&mut s, b"USER a\r\nQUIT\r\nNOOP\r\n"), vec![r("+OK\r\n"), r("+OK mail.example.test signing off\r\n"), Action::Close]);
        assert!(s.is_closed());
    }

    #[test]
    fn wrong_state_commands() {
        let mut s = connected(config());
        for cmd in ["STAT", "LIST", "RETR 1", "DELE 1", "RSET", "TOP 1 1", "UIDL", "NOOP"] {
            let line = format!("{cmd}\r\n");
            assert_eq!(feed(&mut s, line.as_bytes()), vec![r("-ERR command not valid in this state\r\n")], "{cmd}");
        }
        assert_eq!(feed(&mut s, b"APOP a b\r\n"), vec![r("-ERR unknown command\r\n")]);
        let mut s = logged_in();
        assert_eq!(feed(&mut s, b"USER bob\r\n"), vec![r("-ERR command not valid in this state\r\n")]);
        assert_eq!(feed(&mut s, b"PASS pw\r\n"), vec![r("-ERR command not valid in this state\r\n")]);
        assert_eq!(s.user(), Some("alice"));
    }

    #[test]
    fn input_before_connected_is_answered_after_greeting() {
        let mut s = Session::new(config());
        assert!(feed(&mut s, b"CAPA\r\n").is_empty());
        let out = s.handle(Event::Connected);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], r("+OK mail.example.test POP3 server ready\r\n"));
        assert!(text(&out[1..]).starts_with("+OK Capability list follows\r\n"));
    }

    #[test]
    fn pending_input_is_bounded() {
        let mut s = connected(config());
        feed(&mut s, b"USER a\r\nPASS b\r\n");
        let chunk = b"NOOP\r\n".repeat(1024);
        let mut closed = false;
        for _ in 0..100 {
            let out = feed(&mut s, &chunk);
            if out == vec![Action::Close] {
                closed = true;
                break;
            }
            assert!(out.is_empty());
        }
        assert!(closed);
        assert!(s.is_closed());
        assert!(s.handle(Event::LoginDone(LoginOutcome::BadCredentials)).is_empty());
    }

    #[test]
    fn uidl_is_sanitized() {
        let mut s = connected(config());
        feed(&mut s, b"USER a\r\nPASS b\r\n");
        let messages =
            vec![MaildropMessage { id: 7, size: 1, uidl: "ab c\r\n.d".into() }, MaildropMessage { id: 8, size: 2, uidl: " \u{e9}".into() }];
        s.handle(Event::LoginDone(LoginOutcome::Ok { messages }));
        assert_eq!(feed(&mut s, b"UIDL\r\n"), vec![r("+OK unique-id listing follows\r\n1 abc.d\r\n2 8\r\n.\r\n")]);
    }

    #[test]
    fn debug_redacts_password() {
        let shown = format!("{:?}", login_action("alice", "hunter2"));
        assert!(shown.contains("alice"));
        assert!(!shown.contains("hunter2"));
    }

    // ----- STLS and AUTH PLAIN -----

    fn stls_config() -> SessionConfig {
        SessionConfig { allow_plaintext_auth: false, stls_available: true, ..config() }
    }

    fn capa_text(extra: &[&str]) -> String {
        let mut t = String::from("+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n");
        for line in extra {
            t.push_str(line);
            t.push_str("\r\n");
        }
        t.push_str("UTF8\r\nIMPLEMENTATION Postroom\r\n.\r\n");
        t
    }

    /// Test-side base64 encoder (standard alphabet, padded).
    fn b64(data: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Runs STLS to completion and checks the session is fresh and encrypted.
    fn upgrade(s: &mut Session) {
        assert_eq!(feed(s, b"STLS\r\n"), vec![r("+OK Begin TLS negotiation\r\n"), Action::StartTls]);
        assert!(s.is_waiting());
        assert!(s.handle(Event::TlsUp).is_empty());
        assert!(!s.is_waiting());
        assert!(s.tls_active());
    }

    #[test]
    fn stls_flow_and_capa() {
        let mut s = connected(stls_config());
        assert!(!s.tls_active());
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(&capa_text(&["STLS"]))]);
        assert_eq!(feed(&mut s, b"stls\r\n"), vec![r("+OK Begin TLS negotiation\r\n"), Action::StartTls]);
        assert!(s.is_waiting());
        // Nothing is answered (or kept) before the handshake completes.
        assert!(feed(&mut s, b"CAPA\r\n").is_empty());
        assert!(s.handle(Event::Timeout).len() == 2, "timeout still closes");

        let mut s = connected(stls_config());
        upgrade(&mut s);
        // No second greeting; the CAPA sent during the handshake was dropped.
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(&capa_text(&["USER", "SASL PLAIN"]))]);
        let not_again = r("-ERR Command not permitted when TLS active\r\n");
        assert_eq!(feed(&mut s, b"STLS\r\n"), vec![not_again]);
        // A second TlsUp is not asked for: ignored.
        assert!(s.handle(Event::TlsUp).is_empty());
        feed(&mut s, b"USER alice\r\n");
        assert_eq!(feed(&mut s, b"PASS secret\r\n"), vec![login_action("alice", "secret")]);
        s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() }));
        // TRANSACTION: neither STLS nor USER/SASL advertised, both refused.
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(&capa_text(&[]))]);
        let wrong = r("-ERR command not valid in this state\r\n");
        assert_eq!(feed(&mut s, b"STLS\r\n"), vec![wrong.clone()]);
        assert_eq!(feed(&mut s, b"AUTH PLAIN\r\n"), vec![wrong]);
    }

    #[test]
    fn stls_in_transaction_is_wrong_state() {
        let mut s = connected(SessionConfig { allow_plaintext_auth: true, ..stls_config() });
        feed(&mut s, b"USER alice\r\nPASS secret\r\n");
        s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() }));
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(&capa_text(&[]))]);
        assert_eq!(feed(&mut s, b"STLS\r\n"), vec![r("-ERR command not valid in this state\r\n")]);
        assert!(!s.tls_active());
        assert_eq!(feed(&mut s, b"STAT\r\n"), vec![r("+OK 3 620\r\n")]);
    }

    #[test]
    fn stls_discards_pipelined_plaintext() {
        // Plaintext auth allowed, so the smuggled lines would succeed if run.
        let cfg = SessionConfig { allow_plaintext_auth: true, ..stls_config() };
        let mut s = connected(cfg.clone());
        assert_eq!(feed(&mut s, b"STLS\r\nUSER evil\r\nPASS x\r\n"), vec![r("+OK Begin TLS negotiation\r\n"), Action::StartTls]);
        assert!(s.input.is_empty());
        assert!(feed(&mut s, b"PASS y\r\n").is_empty());
        assert!(s.handle(Event::TlsUp).is_empty());
        assert!(s.input.is_empty());
        assert_eq!(feed(&mut s, b"PASS x\r\n"), vec![r("-ERR PASS must directly follow USER\r\n")]);

        // The same, byte by byte and in odd splits: no Login ever appears.
        let script: &[u8] = b"STLS\r\nUSER evil\r\nPASS x\r\nAUTH PLAIN AGV2aWwAeA==\r\n";
        for chunk in [1, 3, 7, script.len()] {
            let mut s = connected(cfg.clone());
            let mut all = Vec::new();
            for piece in script.chunks(chunk) {
                all.extend(feed(&mut s, piece));
            }
            assert_eq!(all, vec![r("+OK Begin TLS negotiation\r\n"), Action::StartTls], "chunk {chunk}");
            assert!(s.handle(Event::TlsUp).is_empty());
            assert!(feed(&mut s, b"\r\n").len() == 1, "only the empty line is answered");
            assert_eq!(s.user(), None);
        }

        // A USER accepted before STLS is forgotten.
        let mut s = connected(cfg);
        assert_eq!(feed(&mut s, b"USER alice\r\nSTLS\r\n"), vec![r("+OK\r\n"), r("+OK Begin TLS negotiation\r\n"), Action::StartTls]);
        s.handle(Event::TlsUp);
        assert_eq!(feed(&mut s, b"PASS secret\r\n"), vec![r("-ERR PASS must directly follow USER\r\n")]);
    }

    #[test]
    fn stls_after_over_long_line_fragment() {
        // A discarded over-long line must not swallow the first line after TLS.
        let mut s = connected(stls_config());
        let mut bytes = b"STLS\r\n".to_vec();
        bytes.extend_from_slice(&[b'x'; 400]);
        assert_eq!(feed(&mut s, &bytes), vec![r("+OK Begin TLS negotiation\r\n"), Action::StartTls]);
        s.handle(Event::TlsUp);
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(&capa_text(&["USER", "SASL PLAIN"]))]);
    }

    #[test]
    fn stls_not_available() {
        let mut s = connected(SessionConfig { max_errors: 2, ..config() });
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(&capa_text(&["USER", "SASL PLAIN"]))]);
        assert_eq!(feed(&mut s, b"STLS\r\n"), vec![r("-ERR STLS not available\r\n")]);
        assert!(s.handle(Event::TlsUp).is_empty(), "not asked for");
        assert!(!s.tls_active());
        // Counted as an error.
        assert_eq!(feed(&mut s, b"STLS\r\n"), vec![r("-ERR STLS not available\r\n"), r("-ERR too many errors\r\n"), Action::Close]);

        // Arguments are a syntax error and do not start TLS.
        let mut s = connected(stls_config());
        assert_eq!(feed(&mut s, b"STLS now\r\n"), vec![r("-ERR syntax error\r\n")]);
        assert!(!s.is_waiting());
        // Trailing spaces are tolerated.
        assert_eq!(feed(&mut s, b"STLS  \r\n"), vec![r("+OK Begin TLS negotiation\r\n"), Action::StartTls]);
    }

    #[test]
    fn plaintext_refused_until_tls() {
        let mut s = connected(stls_config());
        let use_stls = r("-ERR [AUTH] Authentication requires TLS: use STLS\r\n");
        for cmd in
            [&b"USER alice\r\n"[..], b"PASS secret\r\n", b"AUTH\r\n", b"AUTH PLAIN\r\n", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", b"AUTH LOGIN\r\n"]
        {
            answers(&mut s, cmd, &use_stls);
        }
        upgrade(&mut s);
        assert_eq!(feed(&mut s, b"USER alice\r\n"), vec![r("+OK\r\n")]);
        assert_eq!(feed(&mut s, b"PASS secret\r\n"), vec![login_action("alice", "secret")]);
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::Ok { messages: vec![] })), vec![r("+OK Logged in, 0 messages (0 octets)\r\n")]);
        assert_eq!(s.user(), Some("alice"));

        // Refusals count as errors, not failed logins; STLS does not reset them.
        let mut s = connected(SessionConfig { max_errors: 3, max_failed_logins: 1, ..stls_config() });
        assert_eq!(feed(&mut s, b"USER a\r\nPASS b\r\n").len(), 2);
        upgrade(&mut s);
        assert_eq!(feed(&mut s, b"BOGUS\r\n"), vec![r("-ERR unknown command\r\n"), r("-ERR too many errors\r\n"), Action::Close]);

        // Without STLS on offer, the RFC 2595 wording.
        let mut s = connected(SessionConfig { stls_available: false, ..stls_config() });
        let refused = r("-ERR [AUTH] Plaintext authentication disallowed without TLS\r\n");
        assert_eq!(feed(&mut s, b"AUTH PLAIN\r\n"), vec![refused.clone()]);
        assert_eq!(feed(&mut s, b"AUTH\r\n"), vec![refused]);
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(&capa_text(&[]))]);
    }

    #[test]
    fn tls_active_from_start() {
        let mut s = connected(SessionConfig { allow_plaintext_auth: false, stls_available: false, tls_active: true, ..config() });
        assert!(s.tls_active());
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(&capa_text(&["USER", "SASL PLAIN"]))]);
        assert_eq!(feed(&mut s, b"STLS\r\n"), vec![r("-ERR Command not permitted when TLS active\r\n")]);
        assert!(s.handle(Event::TlsUp).is_empty());
        assert_eq!(feed(&mut s, b"USER alice\r\nPASS secret\r\n"), vec![r("+OK\r\n"), login_action("alice", "secret")]);
        // Even a misconfigured stls_available is not offered once encrypted.
        let mut s = connected(SessionConfig { tls_active: true, ..stls_config() });
        assert_eq!(feed(&mut s, b"CAPA\r\n"), vec![r(&capa_text(&["USER", "SASL PLAIN"]))]);
        assert_eq!(feed(&mut s, b"STLS\r\n"), vec![r("-ERR Command not permitted when TLS active\r\n")]);
    }

    #[test]
    fn auth_plain_initial_response() {
        let mut s = connected(config());
        let ir = b64(b"\0alice\0secret");
        assert_eq!(ir, "AGFsaWNlAHNlY3JldA==");
        assert_eq!(feed(&mut s, format!("auth plain {ir}\r\n").as_bytes()), vec![login_action("alice", "secret")]);
        assert!(s.is_waiting());
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() })), vec![r("+OK Logged in, 3 messages (620 octets)\r\n")]);
        assert_eq!(s.user(), Some("alice"));
        assert_eq!(feed(&mut s, b"STAT\r\n"), vec![r("+OK 3 620\r\n")]);

        // authzid equal to authcid; password with spaces and UTF-8.
        let mut s = connected(config());
        let ir = b64("bob\0bob\0p \u{e4}ss word".as_bytes());
        assert_eq!(feed(&mut s, format!("AUTH PLAIN {ir}\r\n").as_bytes()), vec![login_action("bob", "p \u{e4}ss word")]);
        // Results are answered as for PASS.
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::InUse)), vec![r("-ERR [IN-USE] Mailbox is locked by another session\r\n")]);
        feed(&mut s, format!("AUTH PLAIN {ir}\r\n").as_bytes());
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::TempFail)), vec![r("-ERR [SYS/TEMP] Temporary failure, try again later\r\n")]);
        feed(&mut s, format!("AUTH PLAIN {ir}\r\n").as_bytes());
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::BadCredentials)), vec![r("-ERR [AUTH] Invalid user name or password\r\n")]);
        assert_eq!(s.user(), None);
    }

    #[test]
    fn auth_plain_continuation_and_pipelining() {
        let mut s = connected(config());
        assert_eq!(feed(&mut s, b"AUTH PLAIN\r\n"), vec![r("+ \r\n")]);
        assert!(!s.is_waiting());
        assert_eq!(feed(&mut s, b"AGFsaWNlAHNlY3JldA==\r\n"), vec![login_action("alice", "secret")]);
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::BadCredentials)), vec![r("-ERR [AUTH] Invalid user name or password\r\n")]);

        // Pipelined: AUTH, its response, then TRANSACTION commands.
        let out = feed(&mut s, b"AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nSTAT\r\nQUIT\r\n");
        assert_eq!(out, vec![r("+ \r\n"), login_action("alice", "secret")]);
        assert_eq!(
            s.handle(Event::LoginDone(LoginOutcome::Ok { messages: messages() })),
            vec![r("+OK Logged in, 3 messages (620 octets)\r\n"), r("+OK 3 620\r\n"), Action::Update { deleted: vec![] },]
        );

        // Failed AUTH logins count towards the failed-login limit.
        let mut s = connected(SessionConfig { max_failed_logins: 2, ..config() });
        feed(&mut s, b"AUTH PLAIN AGEAYg==\r\n");
        s.handle(Event::LoginDone(LoginOutcome::BadCredentials));
        feed(&mut s, b"AUTH PLAIN\r\nAGEAYg==\r\n");
        assert_eq!(s.handle(Event::LoginDone(LoginOutcome::BadCredentials)), vec![r("-ERR [AUTH] Invalid user name or password\r\n"), Action::Close]);
    }

    #[test]
    fn auth_cancel() {
        let mut s = connected(SessionConfig { max_errors: 1, ..config() });
        for _ in 0..5 {
            assert_eq!(feed(&mut s, b"AUTH PLAIN\r\n*\r\n"), vec![r("+ \r\n"), r("-ERR Authentication cancelled\r\n")]);
        }
        // Back in AUTHORIZATION; "*" as a command is just unknown.
        assert!(text(&feed(&mut s, b"CAPA\r\n")).starts_with("+OK Capability"));
        assert_eq!(feed(&mut s, b"AUTH PLAIN\r\n"), vec![r("+ \r\n")]);
        assert_eq!(feed(&mut s, b" * \r\n"), vec![r("-ERR Authentication cancelled\r\n")]);
        assert!(!s.is_closed());
        // A pending USER is consumed by AUTH.
        feed(&mut s, b"USER alice\r\nAUTH PLAIN\r\n*\r\n");
        assert_eq!(feed(&mut s, b"PASS x\r\n"), vec![r("-ERR PASS must directly follow USER\r\n"), r("-ERR too many errors\r\n"), Action::Close]);
    }

    #[test]
    fn auth_bad_base64_and_malformed() {
        let mut s = connected(config());
        let bad = r("-ERR [AUTH] Invalid base64\r\n");
        let malformed = r("-ERR [AUTH] Malformed PLAIN response\r\n");
        let cases: &[(&[u8], &Action)] = &[
            (b"AUTH PLAIN !!!!\r\n", &bad),
            (b"AUTH PLAIN AGFsaWNlAHNlY3JldA\r\n", &bad), // unpadded
            (b"AUTH PLAIN AGFsaWNlAHNlY3JldA=\r\n", &bad),
            (b"AUTH PLAIN AG==AHNlY3JldA==\r\n", &bad), // padding inside
            (b"AUTH PLAIN AGF=\r\n", &bad),             // non-zero unused bits
            (b"AUTH PLAIN ====\r\n", &bad),
            (b"AUTH PLAIN *\r\n", &bad),
            (b"AUTH PLAIN =\r\n", &malformed),                // empty
            (b"AUTH PLAIN YWxpY2UAc2VjcmV0\r\n", &malformed), // one NUL
            (b"AUTH PLAIN AABwdw==\r\n", &malformed),         // empty authcid
            (b"AUTH PLAIN AGFsaWNlAA==\r\n", &malformed),     // empty password
            (b"AUTH PLAIN AGEAYgBj\r\n", &malformed),         // three NULs
        ];
        for (cmd, want) in cases {
            answers(&mut s, cmd, want);
        }
        assert_eq!(feed(&mut s, b"AUTH PLAIN\r\n"), vec![r("+ \r\n")]);
        assert_eq!(feed(&mut s, b"AGFsa WNlAHNlY3JldA==\r\n"), vec![bad.clone()]);
        assert_eq!(feed(&mut s, b"AUTH PLAIN\r\n"), vec![r("+ \r\n")]);
        assert_eq!(feed(&mut s, b"\r\n"), vec![malformed.clone()]);
        // Non-UTF-8 credentials are malformed (RFC 4616 names are UTF-8): no Login.
        let ir = b64(b"\0\xff\0pw");
        assert_eq!(feed(&mut s, format!("AUTH PLAIN {ir}\r\n").as_bytes()), vec![malformed.clone()]);
        // Those errors count towards max_errors.
        let mut s = connected(SessionConfig { max_errors: 2, ..config() });
        feed(&mut s, b"AUTH PLAIN !!!!\r\n");
        assert_eq!(feed(&mut s, b"AUTH PLAIN =\r\n"), vec![malformed, r("-ERR too many errors\r\n"), Action::Close]);
    }

    #[test]
    fn auth_authzid_mismatch_is_failed_login() {
        let mut s = connected(config());
        let denied = r("-ERR [AUTH] Authorization identity not allowed\r\n");
        let ir = b64(b"bob\0alice\0secret");
        let cmd = format!("AUTH PLAIN {ir}\r\n");
        assert_eq!(feed(&mut s, cmd.as_bytes()), vec![denied.clone()]);
        assert_eq!(feed(&mut s, b"AUTH PLAIN\r\n"), vec![r("+ \r\n")]);
        assert_eq!(feed(&mut s, format!("{ir}\r\n").as_bytes()), vec![denied.clone()]);
        // Third failed login (max 3) closes.
        assert_eq!(feed(&mut s, cmd.as_bytes()), vec![denied, Action::Close]);
        assert_eq!(s.user(), None);
    }

    #[test]
    fn auth_mechanisms_and_syntax() {
        let mut s = connected(config());
        assert_eq!(feed(&mut s, b"AUTH\r\n"), vec![r("+OK\r\nPLAIN\r\n.\r\n")]);
        let unsupported = r("-ERR [AUTH] Unsupported authentication mechanism\r\n");
        assert_eq!(feed(&mut s, b"AUTH LOGIN\r\n"), vec![unsupported.clone()]);
        assert_eq!(feed(&mut s, b"AUTH CRAM-MD5 abc\r\n"), vec![unsupported]);
        assert_eq!(feed(&mut s, b"AUTH PLAIN AGEAYg== extra\r\n"), vec![r("-ERR syntax error\r\n")]);
        assert_eq!(feed(&mut s, b"AUTH  Plain  \r\n"), vec![r("+ \r\n")]);
    }

    #[test]
    fn long_sasl_line() {
        // 12,288 octets with the CRLF: accepted as a SASL response.
        let prefix = b"\0alice\0";
        let mut password = vec![b'p'; 9213 - prefix.len()];
        let mut message = prefix.to_vec();
        message.append(&mut password.clone());
        let encoded = b64(&message);
        assert_eq!(encoded.len(), 12_284);
        let mut line = encoded.into_bytes();
        line.extend_from_slice(b"  \r\n");
        assert_eq!(line.len(), MAX_SASL_LINE);

        let mut s = connected(config());
        feed(&mut s, b"AUTH PLAIN\r\n");
        // Split across events too.
        let (a, b) = line.split_at(7000);
        assert!(feed(&mut s, a).is_empty());
        let out = feed(&mut s, b);
        password.truncate(9213 - prefix.len());
        assert_eq!(out, vec![login_action("alice", std::str::from_utf8(&password).unwrap())]);

        // One octet more: line too long, the exchange is aborted.
        let mut s = connected(config());
        feed(&mut s, b"AUTH PLAIN\r\n");
        let mut longer = line.clone();
        longer.insert(0, b' ');
        longer.extend_from_slice(b"CAPA\r\n");
        let out = feed(&mut s, &longer);
        assert_eq!(out[0], r("-ERR line too long\r\n"));
        assert!(text(&out[1..]).starts_with("+OK Capability"));
        // Without a line end: reported once the limit is reached, rest skipped.
        let mut s = connected(config());
        feed(&mut s, b"AUTH PLAIN\r\n");
        assert!(feed(&mut s, &[b'A'; 12_000]).is_empty());
        assert_eq!(feed(&mut s, &[b'A'; 1_000]), vec![r("-ERR line too long\r\n")]);
        assert!(feed(&mut s, &[b'A'; 20_000]).is_empty());
        assert!(s.input.is_empty());
        assert_eq!(feed(&mut s, b"\r\nAUTH PLAIN AGEAYg==\r\n"), vec![login_action("a", "b")]);

        // Outside a SASL exchange the limit is still 255, AUTH line included.
        let mut s = connected(config());
        let mut cmd = b"AUTH PLAIN ".to_vec();
        cmd.extend_from_slice(&[b'A'; 300]);
        cmd.extend_from_slice(b"\r\n");
        assert_eq!(feed(&mut s, &cmd), vec![r("-ERR line too long\r\n")]);
    }

    #[test]
    fn start_tls_debug() {
        assert_eq!(format!("{:?}", Action::StartTls), "StartTls");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Deterministic xorshift; mixes random bytes with command fragments.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let fragments: &[&[u8]] = &[
            b"USER a\r\n",
            b"PASS b\r\n",
            b"LIST ",
            b"TOP 1 ",
            b"RETR 2\r\n",
            b"DELE 1\n",
            b"\r\n",
            b"\n",
            b"\r",
            b"\xff\xfe\x00",
            b" ",
            b"QUIT\r\n",
            b"UIDL",
            b"CAPA\r\n",
            b"STLS\r\n",
            b"AUTH PLAIN\r\n",
            b"AUTH PLAIN AGEAYg==\r\n",
            b"AUTH ",
            b"AGEAYg==\r\n",
            b"*\r\n",
            b"=\r\n",
        ];
        for round in 0..300 {
            let cfg = SessionConfig {
                max_failed_logins: (round % 4) as u32,
                max_errors: (round % 25) as u32,
                allow_plaintext_auth: round % 3 != 0,
                stls_available: round % 5 < 3,
                tls_active: round % 7 == 0,
                ..config()
            };
            let mut s = Session::new(cfg);
            s.handle(Event::Connected);
            for _ in 0..60 {
                let mut bytes = Vec::new();
                for _ in 0..(next() % 6) {
                    if next() % 2 == 0 {
                        bytes.extend_from_slice(fragments[(next() as usize) % fragments.len()]);
                    } else {
                        let n = (next() % 300) as usize;
                        bytes.extend((0..n).map(|_| next() as u8));
                    }
                }
                let out = s.handle(Event::Bytes(&bytes));
                if out.contains(&Action::Close) {
                    assert_eq!(out.last(), Some(&Action::Close));
                    assert!(s.is_closed());
                }
                if out.contains(&Action::StartTls) {
                    // Nothing is executed after STLS until TlsUp.
                    assert_eq!(out.last(), Some(&Action::StartTls));
                    assert!(s.is_waiting());
                    assert!(s.input.is_empty());
                }
                match next() % 12 {
                    10 => {
                        s.handle(Event::TlsUp);
                    }
                    0 => {
                        let outcome = match next() % 4 {
                            0 => LoginOutcome::Ok { messages: messages() },
                            1 => LoginOutcome::BadCredentials,
                            2 => LoginOutcome::InUse,
                            _ => LoginOutcome::TempFail,
                        };
                        s.handle(Event::LoginDone(outcome));
                    }
                    1 => {
                        s.handle(Event::UpdateDone(next() % 2 == 0));
                    }
                    _ => {}
                }
                if s.is_closed() {
                    assert!(s.handle(Event::Bytes(b"NOOP\r\n")).is_empty());
                    break;
                }
                assert!(s.input.len() <= MAX_PENDING_INPUT);
                if !s.is_waiting() {
                    assert!(s.input.len() < s.line_limit());
                }
            }
        }
    }
}
