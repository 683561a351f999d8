//! One SMTP conversation with one remote host (SPEC §6 C1, C5, C8; RFC 5321, RFC 2920 pipelining,
//! RFC 3207 STARTTLS, RFC 1870 SIZE, RFC 6152 8BITMIME).
//!
//! [`deliver`] makes one delivery attempt of one message to one address: connect (from
//! `bind_address` when set), greeting, EHLO (HELO when EHLO is refused), STARTTLS, EHLO again,
//! AUTH for a host with credentials, MAIL FROM, RCPT TO for every recipient (pipelined with MAIL
//! and DATA when the server offers PIPELINING), DATA with the body streamed from a
//! [`BodySource`], QUIT. It reports one [`RcptOutcome`] per recipient, or a [`SessionError`] when
//! the attempt ended before per-recipient results. Choosing hosts, retrying and bouncing are the
//! caller's job.
//!
//! TLS (C5, see [`crate::trust`]): a host without credentials gets opportunistic STARTTLS that
//! accepts any certificate; after [`SessionError::Tls`] the caller may retry it with
//! [`deliver_plaintext`]. A host with credentials gets them only over STARTTLS whose certificate
//! was verified: no STARTTLS, a refused one, a failed handshake or an unverified certificate
//! ends the attempt ([`SessionError::TlsRequired`], [`SessionError::Tls`]) before anything secret
//! is sent, and so does a failed AUTH ([`SessionError::Auth`]); none of them is permanent.
//!
//! Nothing leaves us with a bare CR or LF: the stored body is CRLF text, but any bare CR or LF in
//! it is turned into CRLF while streaming, before dot-stuffing, so a message cannot smuggle a
//! second one to the next hop through us. Addresses and the HELO name with control characters
//! are refused before connecting.
//!
//! What goes out fits the server (RFC 6152, [`crate::encode`]): the body is read once before
//! connecting to plan its conversion; a server without 8BITMIME gets 7-bit MIME, and no server
//! gets a line over 998 octets. A message whose 8-bit octets cannot be converted (in header
//! fields) is not sent to a server without 8BITMIME: [`SessionError::Unconvertible`], before
//! MAIL FROM. `BODY=8BITMIME` goes only to a server that offers 8BITMIME.
//!
//! A server that offers CHUNKING (RFC 3030) gets the body in BDAT chunks of up to
//! [`BDAT_CHUNK`] octets instead of DATA: the same octets (DKIM fields, CRLF-normalised,
//! converted), without dot-stuffing, the last chunk marked LAST. Each chunk's reply is read
//! before the next is sent, so a refused chunk ends the transaction at once (RFC 3030 §2).

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mail_proto::reply_parser::parse_reply;
use mail_proto::{DotStuffer, Reply};
use rustls::ClientConfig;
use rustls_pki_types::{DnsName, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long QUIT may take at most (its reply is ignored anyway).
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Body bytes gathered before one write.
const WRITE_BLOCK: usize = 64 * 1024;
/// The largest BDAT chunk sent: a few round trips for a large message, a bounded buffer.
pub const BDAT_CHUNK: usize = 1024 * 1024;

/// How the client behaves; the same for every attempt.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Our host name, sent in EHLO/HELO.
    pub helo_name: String,
    /// `[delivery] bind_address` (C8): the local address connections come from. A destination of
    /// the other address family fails with [`SessionError::Connect`].
    pub bind_address: Option<IpAddr>,
    /// Opportunistic STARTTLS when the server offers it (C5).
    pub starttls: bool,
    /// For the TCP connect, and separately for the TLS handshake after STARTTLS.
    pub connect_timeout: Duration,
    pub timeouts: Timeouts,
    /// For a host on the host-authentication list (C5): user and password, sent with AUTH PLAIN
    /// or LOGIN — and only over STARTTLS whose certificate was verified as `trust` says. Such a
    /// host always gets STARTTLS, whatever `starttls` says.
    pub credentials: Option<Credentials>,
    /// DKIM keys (RFC 6376): each message is signed as it goes to this host ([`crate::dkim`]).
    pub dkim: Option<Arc<sender_auth::sign::KeyRing>>,
}

/// What a host on the host-authentication list gets, and how its certificate is checked first.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub trust: crate::trust::Trust,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"(hidden)").field("trust", &self.trust).finish()
    }
}

impl ClientSettings {
    /// Defaults: no bind address, STARTTLS on, 30 s connect timeout, the RFC 5321 timeouts.
    pub fn new(helo_name: impl Into<String>) -> Self {
        ClientSettings {
            helo_name: helo_name.into(),
            bind_address: None,
            starttls: true,
            connect_timeout: Duration::from_secs(30),
            timeouts: Timeouts::default(),
            credentials: None,
            dkim: None,
        }
    }
}

/// Waiting times for the server's replies, RFC 5321 §4.5.3.2. `mail` also covers EHLO, HELO and
/// STARTTLS; `data_block` covers writing each block of the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub greeting: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    pub data_init: Duration,
    pub data_block: Duration,
    pub data_term: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        Timeouts { greeting: min(5), mail: min(5), rcpt: min(5), data_init: min(2), data_block: min(3), data_term: min(10) }
    }
}

/// Where the message body comes from: the store's chunks, streamed, never the whole message in
/// memory. The caller makes a fresh one for every attempt. Implementations may simply write
/// `async fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>>`; the future must be
/// `Send` so that deliveries can run on any runtime thread.
///
/// An attempt reads the body twice: once before connecting, to plan its conversion
/// ([`crate::encode::scan`]), then [`BodySource::rewind`], then again to send it.
pub trait BodySource {
    /// The next piece of the stored message (CRLF text), `None` at the end.
    fn next_chunk(&mut self) -> impl Future<Output = io::Result<Option<Vec<u8>>>> + Send;

    /// Start again from the first piece; the same pieces follow.
    fn rewind(&mut self);
}

/// The envelope of one message on its way to one host.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    /// The reverse path without angle brackets; `""` sends `MAIL FROM:<>`.
    pub mail_from: &'a str,
    /// Forward paths without angle brackets.
    pub recipients: &'a [String],
    /// Message size for `SIZE=` (RFC 1870), sent when the server offers SIZE.
    pub size: u64,
    /// The body has 8-bit content: `BODY=8BITMIME` when the server offers 8BITMIME.
    pub eight_bit: bool,
    /// RFC 3461 parameters to pass on when the server offers DSN.
    pub dsn: Option<&'a Dsn>,
    /// RFC 4954 §5: the message's submitter, sent as `AUTH=` to a server that offers AUTH and that
    /// we authenticated to; `None` (unknown or not trusted) sends `AUTH=<>` there.
    pub auth_sender: Option<&'a str>,
}

/// RFC 3461 parameters of a message: RET and ENVID, and each recipient's NOTIFY and ORCPT (in
/// the order of `Envelope::recipients`). After an attempt, `peer_offers` tells whether the
/// server offered DSN — if not, a success is "relayed" and the sender may be told so.
#[derive(Debug, Default)]
pub struct Dsn {
    pub ret: Option<String>,
    pub envid: Option<String>,
    pub recipients: Vec<(Option<String>, Option<String>)>,
    pub peer_offers: std::sync::atomic::AtomicBool,
}

/// What became of one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The server took responsibility for the message (2xx after the final dot).
    Accepted,
    /// Temporary failure (4xx to RCPT or to the final dot); try again later.
    Deferred(Reply),
    /// Permanent failure (5xx to RCPT or to the final dot).
    Failed(Reply),
}

/// The whole attempt failed before per-recipient results; every recipient is still pending.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// No reply (or no progress writing) within the stage's time limit. Stages: "connect",
    /// "greeting", "EHLO", "HELO", "STARTTLS", "MAIL", "RCPT", "DATA", "DATA block" (writing the
    /// body), "DATA end" (the reply to the final dot; the message may have been taken).
    #[error("timed out at {0}")]
    Timeout(&'static str),
    /// The connection broke, or reading the body from the store failed.
    #[error("connection failed: {0}")]
    Io(#[source] io::Error),
    /// TLS handshake failed after STARTTLS, or, for a host with credentials, its certificate was
    /// not verified (C5). Without credentials the caller may retry this host without STARTTLS;
    /// with them, never.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// A host with credentials cannot be given them over TLS: it offers no STARTTLS, or refuses
    /// it (C5). Nothing secret was sent.
    #[error("TLS required for the host's credentials: {0}")]
    TlsRequired(String),
    /// AUTH to a host with credentials failed: the server's reply, or why it was not tried (C5).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A reply that ends the attempt: 4xx/5xx to the greeting, EHLO+HELO, MAIL FROM, or DATA.
    /// The reply tells temporary from permanent. Stages: "greeting", "EHLO" (only 421, which
    /// skips the HELO fallback), "HELO", "MAIL", "DATA".
    #[error("{stage} refused: {}", show(.reply))]
    Rejected { stage: &'static str, reply: Reply },
    /// The server said something that is not SMTP, or the envelope cannot be sent.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server does not offer 8BITMIME and the message has 8-bit octets that cannot be made
    /// 7-bit ([`crate::encode::Plan::unconvertible`]); nothing was sent (RFC 6152 §3). Permanent:
    /// 5.6.3.
    #[error("{0}")]
    Unconvertible(String),
}

impl SessionError {
    /// Only a 5xx reply ends an attempt permanently; everything else is worth another try. A 5xx
    /// greeting is not permanent either: that host will not talk to us, the next MX may
    /// (Postfix's smtp_skip_5xx_greeting).
    pub fn is_permanent(&self) -> bool {
        matches!(self, SessionError::Rejected { reply, stage } if (500..600).contains(&reply.code) && *stage != "greeting")
            || matches!(self, SessionError::Unconvertible(_))
    }

    /// The server's reply, for a rejection.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            SessionError::Rejected { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

fn show(reply: &Reply) -> String {
    match reply.enhanced() {
        Some(e) => format!("{} {} {}", reply.code, e, reply.lines.join(" / ")),
        None => format!("{} {}", reply.code, reply.lines.join(" / ")),
    }
}

/// One delivery attempt to one host, with STARTTLS when `settings.starttls` and the server
/// offers it — and always with credentials. `host` is the name for logs, SNI and, with
/// credentials, the certificate check; `addr` is where to connect. The outcomes are in the order
/// of `envelope.recipients`.
pub async fn deliver<B: BodySource>(
    settings: &ClientSettings,
    host: &str,
    addr: SocketAddr,
    envelope: &Envelope<'_>,
    body: &mut B,
) -> Result<Vec<RcptOutcome>, SessionError> {
    attempt(settings, host, addr, envelope, body, settings.starttls || settings.credentials.is_some()).await
}

/// Like [`deliver`], but never STARTTLS: the retry after [`SessionError::Tls`] for a host without
/// credentials. With credentials it fails with [`SessionError::TlsRequired`] without connecting.
pub async fn deliver_plaintext<B: BodySource>(
    settings: &ClientSettings,
    host: &str,
    addr: SocketAddr,
    envelope: &Envelope<'_>,
    body: &mut B,
) -> Result<Vec<RcptOutcome>, SessionError> {
    attempt(settings, host, addr, envelope, body, false).await
}

/// One message over a connection of its own: [`prepare`], [`Connection::open`],
/// [`Connection::send`], [`Connection::close`].
async fn attempt<B: BodySource>(
    settings: &ClientSettings,
    host: &str,
    addr: SocketAddr,
    envelope: &Envelope<'_>,
    body: &mut B,
    starttls: bool,
) -> Result<Vec<RcptOutcome>, SessionError> {
    check_envelope(settings, envelope)?;
    if envelope.recipients.is_empty() {
        return Ok(Vec::new());
    }
    if settings.credentials.is_some() && !starttls {
        return Err(SessionError::TlsRequired("credentials are sent only over verified TLS, never in plaintext".into()));
    }
    let prepared = prepare(body, settings.dkim.clone()).await?;
    let mut connection = Connection::open(settings, host, addr, starttls).await?;
    let result = connection.send(envelope, body, &prepared).await;
    connection.close().await;
    result
}

/// Refuse an envelope (or HELO name) with text that would break the command line it goes into,
/// before anything is sent.
pub fn check_envelope(settings: &ClientSettings, envelope: &Envelope<'_>) -> Result<(), SessionError> {
    check_line("HELO name", &settings.helo_name)?;
    check_line("sender", envelope.mail_from)?;
    for r in envelope.recipients {
        check_line("recipient", r)?;
    }
    Ok(())
}

/// One message made ready to send: read once before it goes anywhere, to plan its conversion
/// for a server with or without 8BITMIME ([`crate::encode`]) and to hash it for its DKIM
/// signature ([`crate::dkim`]). The body is rewound afterwards.
pub struct Prepared {
    plan: crate::encode::Plan,
    dkim: Option<crate::dkim::Prepared>,
}

/// Read the body to make it [`Prepared`]; `dkim`: the keys that sign it, if any.
pub async fn prepare<B: BodySource>(body: &mut B, dkim: Option<Arc<sender_auth::sign::KeyRing>>) -> Result<Prepared, SessionError> {
    let reading = |e: io::Error| SessionError::Io(io::Error::new(e.kind(), format!("reading the message body: {e}")));
    let plan = crate::encode::scan(body).await.map_err(reading)?;
    // Hashed as it will be sent, before connecting; signed when DATA starts (crate::dkim).
    let dkim = match dkim {
        Some(ring) => crate::dkim::prepare(body, &plan, ring).await.map_err(reading)?,
        None => None,
    };
    Ok(Prepared { plan, dkim })
}

/// An open SMTP connection to one host, past EHLO, STARTTLS and AUTH, ready for mail
/// transactions — one message after another with RSET between them (issue 17: outbound
/// connection reuse, as Postfix's connection cache does). A connection whose last exchange
/// broke at the protocol level (421, a timeout, a broken pipe, a reply out of step) is not
/// [`Connection::reusable`].
pub struct Connection {
    session: Session,
    /// Transactions started on it.
    messages: usize,
    opened: std::time::Instant,
}

impl Connection {
    /// Connect to `addr`, read the greeting, EHLO (HELO when EHLO is refused), STARTTLS when
    /// `starttls` and offered (always for a host with credentials, C5), AUTH for a host with
    /// credentials.
    pub async fn open(settings: &ClientSettings, host: &str, addr: SocketAddr, starttls: bool) -> Result<Connection, SessionError> {
        check_line("HELO name", &settings.helo_name)?;
        if settings.credentials.is_some() && !starttls {
            return Err(SessionError::TlsRequired("credentials are sent only over verified TLS, never in plaintext".into()));
        }
        let tcp = connect(settings, addr).await?;
        tracing::debug!(host, %addr, "connected");
        let mut session = Session {
            settings: settings.clone(),
            host: host.into(),
            addr,
            transport: Transport::Plain(tcp),
            buf: Vec::new(),
            caps: Capabilities::default(),
            broken: false,
            dot_sent: false,
        };
        match session.open(starttls).await {
            Ok(()) => Ok(Connection { session, messages: 0, opened: std::time::Instant::now() }),
            Err(e) => {
                tracing::debug!(host, %addr, error = %e, "connection failed before mail");
                // The server is waiting for a command: say goodbye. After a broken connection, a
                // timeout or a protocol error, just close.
                if matches!(e, SessionError::Rejected { .. } | SessionError::TlsRequired(_) | SessionError::Auth(_)) {
                    session.quit().await;
                }
                Err(e)
            }
        }
    }

    /// One mail transaction: MAIL FROM, RCPT TO for every recipient (pipelined with MAIL and
    /// DATA when the server offers PIPELINING), DATA with the body streamed from `body` as
    /// `prepared` says. The outcomes are in the order of `envelope.recipients`. The caller sends
    /// [`Connection::reset`] before a second one.
    pub async fn send<B: BodySource>(
        &mut self,
        envelope: &Envelope<'_>,
        body: &mut B,
        prepared: &Prepared,
    ) -> Result<Vec<RcptOutcome>, SessionError> {
        check_envelope(&self.session.settings, envelope)?;
        if envelope.recipients.is_empty() {
            return Ok(Vec::new());
        }
        self.messages += 1;
        self.session.dot_sent = false;
        let result = self.session.message(envelope, body, prepared).await;
        if matches!(result, Err(SessionError::Io(_) | SessionError::Timeout(_) | SessionError::Protocol(_))) {
            // Whatever state the server is in now, it is not one to start a transaction from.
            self.session.broken = true;
        }
        let (host, addr) = (&self.session.host, self.session.addr);
        match &result {
            Ok(outcomes) => tracing::debug!(host = %host, %addr, ?outcomes, "transaction finished"),
            Err(e) => tracing::debug!(host = %host, %addr, error = %e, "transaction failed"),
        }
        result
    }

    /// RSET before the next transaction on this connection: true when the server said 250 to
    /// it. A server that closed the idle connection meanwhile fails here, before anything of
    /// the next message was sent.
    pub async fn reset(&mut self) -> bool {
        if self.session.broken {
            return false;
        }
        let t = self.session.settings.timeouts.mail;
        match self.session.command("RSET", t, "RSET\r\n").await {
            Ok(reply) if reply.code / 100 == 2 => true,
            _ => {
                self.session.broken = true;
                false
            }
        }
    }

    /// Another transaction may follow the last one.
    pub fn reusable(&self) -> bool {
        !self.session.broken
    }

    /// The last [`Connection::send`] got as far as the final dot: when it failed after that, the
    /// server may have taken the message (RFC 1047), so it must not go again at once.
    pub fn dot_sent(&self) -> bool {
        self.session.dot_sent
    }

    /// Transactions started on this connection.
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// How long it has been open.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    pub fn host(&self) -> &str {
        &self.session.host
    }

    pub fn addr(&self) -> SocketAddr {
        self.session.addr
    }

    /// QUIT (its reply ignored) and close; a broken connection is just closed.
    pub async fn close(mut self) {
        if !self.session.broken {
            self.session.quit().await;
        }
    }
}

/// Refuse text that would break the command line it goes into.
fn check_line(what: &str, text: &str) -> Result<(), SessionError> {
    if text.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(SessionError::Protocol(format!("{what} {text:?} contains control characters")));
    }
    Ok(())
}

async fn connect(settings: &ClientSettings, addr: SocketAddr) -> Result<TcpStream, SessionError> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(SessionError::Connect)?;
    if let Some(ip) = settings.bind_address {
        if ip.is_ipv4() != addr.is_ipv4() {
            let why = format!("bind_address {ip} cannot reach {addr} (other address family)");
            return Err(SessionError::Connect(io::Error::new(io::ErrorKind::AddrNotAvailable, why)));
        }
        socket.bind(SocketAddr::new(ip, 0)).map_err(SessionError::Connect)?;
    }
    let tcp = timeout(settings.connect_timeout, socket.connect(addr))
        .await
        .map_err(|_| SessionError::Timeout("connect"))?
        .map_err(SessionError::Connect)?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// What the server offered in its EHLO reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Capabilities {
    pipelining: bool,
    size: bool,
    eight_bit_mime: bool,
    starttls: bool,
    dsn: bool,
    /// RFC 3030: the body may go in BDAT chunks.
    chunking: bool,
    /// AUTH is offered (whatever the mechanisms).
    auth: bool,
    auth_plain: bool,
    auth_login: bool,
}

impl Capabilities {
    fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Capabilities::default();
        // The first line is the server's name and greeting, the rest are keywords.
        for line in reply.lines.iter().skip(1) {
            let keyword = line.split_ascii_whitespace().next().unwrap_or("");
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "STARTTLS" => caps.starttls = true,
                "DSN" => caps.dsn = true,
                "CHUNKING" => caps.chunking = true,
                "AUTH" => {
                    caps.auth = true;
                    let mechanisms = line.to_ascii_uppercase();
                    caps.auth_plain = mechanisms.split_ascii_whitespace().any(|m| m == "PLAIN");
                    caps.auth_login = mechanisms.split_ascii_whitespace().any(|m| m == "LOGIN");
                }
                _ => {}
            }
        }
        caps
    }
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Between taking the TCP stream for the handshake and getting the TLS stream back.
    Closed,
}

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection already closed")
}

impl Transport {
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.write_all(data).await,
            Transport::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Transport::Closed => Err(not_connected()),
        }
    }

    async fn read_into(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        buf.reserve(4096);
        match self {
            Transport::Plain(s) => s.read_buf(buf).await,
            Transport::Tls(s) => s.read_buf(buf).await,
            Transport::Closed => Err(not_connected()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Transport::Plain(s) => s.shutdown().await,
            Transport::Tls(s) => s.shutdown().await,
            Transport::Closed => Ok(()),
        };
    }
}

struct Session {
    settings: ClientSettings,
    host: String,
    addr: SocketAddr,
    transport: Transport,
    /// Received bytes not yet parsed into replies.
    buf: Vec<u8>,
    /// What the server offered in its last EHLO reply.
    caps: Capabilities,
    /// A write or read failed or timed out, or the server said 421: no further command.
    broken: bool,
    /// The current transaction's final dot was sent.
    dot_sent: bool,
}

impl Session {
    /// Greeting, EHLO, STARTTLS, AUTH: ready for MAIL FROM.
    async fn open(&mut self, starttls: bool) -> Result<(), SessionError> {
        let t = self.settings.timeouts;
        let greeting = self.read_reply("greeting", t.greeting).await?;
        if greeting.code / 100 != 2 {
            return Err(SessionError::Rejected { stage: "greeting", reply: greeting });
        }
        let mut caps = self.hello().await?;
        let credentials = self.settings.credentials.clone();
        let credentials = credentials.as_ref();
        if credentials.is_some() && !caps.starttls {
            // C5: the password goes over verified TLS or not at all; mail waits.
            return Err(SessionError::TlsRequired(format!("{} offers no STARTTLS", self.host)));
        }
        if starttls && caps.starttls {
            let reply = self.command("STARTTLS", t.mail, "STARTTLS\r\n").await?;
            if reply.code == 220 {
                self.start_tls().await?;
                // RFC 3207 §4.2: forget everything learnt before TLS and ask again.
                caps = self.hello().await?;
            } else if credentials.is_some() {
                return Err(SessionError::TlsRequired(format!("STARTTLS refused: {}", show(&reply))));
            } else {
                // 454 and friends: carry on in plaintext (opportunistic TLS).
                tracing::debug!(host = %self.host, reply = %show(&reply), "STARTTLS refused; continuing without TLS");
            }
        }
        if let Some(c) = credentials {
            self.authenticate(&caps, &c.user, &c.password).await?;
        }
        self.caps = caps;
        Ok(())
    }

    /// One message's transaction on the open session.
    async fn message<B: BodySource>(&mut self, envelope: &Envelope<'_>, body: &mut B, prepared: &Prepared) -> Result<Vec<RcptOutcome>, SessionError> {
        // RFC 6152 §3: 8-bit octets that cannot be converted do not go to a server that did not
        // ask for them; the attempt ends before MAIL FROM.
        if !self.caps.eight_bit_mime
            && let Some(why) = prepared.plan.unconvertible()
        {
            return Err(SessionError::Unconvertible(format!("8BITMIME not offered, and the message cannot be made 7-bit: {why}")));
        }
        self.transaction(envelope, body, prepared).await
    }

    /// EHLO, or HELO when EHLO is refused (RFC 5321 §3.2).
    async fn hello(&mut self) -> Result<Capabilities, SessionError> {
        let t = self.settings.timeouts;
        let ehlo = self.command("EHLO", t.mail, &format!("EHLO {}\r\n", self.settings.helo_name)).await?;
        if ehlo.code / 100 == 2 {
            return Ok(Capabilities::from_ehlo(&ehlo));
        }
        if ehlo.code == 421 {
            // The server is closing the connection; HELO would meet a closed socket.
            return Err(SessionError::Rejected { stage: "EHLO", reply: ehlo });
        }
        let helo = self.command("HELO", t.mail, &format!("HELO {}\r\n", self.settings.helo_name)).await?;
        if helo.code / 100 == 2 { Ok(Capabilities::default()) } else { Err(SessionError::Rejected { stage: "HELO", reply: helo }) }
    }

    /// C5: AUTH to a host on the host-authentication list, only under TLS whose certificate was
    /// verified (the caller made sure), never in plaintext. A host that offers neither PLAIN nor
    /// LOGIN, or refuses the credentials, ends the attempt: mail waits rather than going on
    /// unauthenticated to be refused for it.
    async fn authenticate(&mut self, caps: &Capabilities, user: &str, password: &str) -> Result<(), SessionError> {
        if !matches!(self.transport, Transport::Tls(_)) {
            return Err(SessionError::TlsRequired("credentials are sent only over verified TLS, never in plaintext".into()));
        }
        let auth_failed = |reply: Reply| SessionError::Auth(show(&reply));
        let t = self.settings.timeouts;
        let reply = if caps.auth_plain {
            let token = mail_proto::sasl::encode(format!("\0{user}\0{password}").as_bytes());
            self.command("AUTH", t.mail, &format!("AUTH PLAIN {token}\r\n")).await?
        } else if caps.auth_login {
            let r = self.command("AUTH", t.mail, "AUTH LOGIN\r\n").await?;
            if r.code != 334 {
                return Err(auth_failed(r));
            }
            let r = self.command("AUTH", t.mail, &format!("{}\r\n", mail_proto::sasl::encode(user.as_bytes()))).await?;
            if r.code != 334 {
                return Err(auth_failed(r));
            }
            self.command("AUTH", t.mail, &format!("{}\r\n", mail_proto::sasl::encode(password.as_bytes()))).await?
        } else {
            return Err(SessionError::Auth(format!("{} offers no AUTH PLAIN or LOGIN", self.host)));
        };
        if reply.code / 100 == 2 { Ok(()) } else { Err(auth_failed(reply)) }
    }

    async fn start_tls(&mut self) -> Result<(), SessionError> {
        if !self.buf.is_empty() {
            // Bytes sent before the handshake could be injected by anyone on the path
            // (CVE-2011-0411 pattern); they must not be read as replies after it.
            tracing::warn!(host = %self.host, bytes = self.buf.len(), "discarding data received after 220 to STARTTLS");
            self.buf.clear();
        }
        let Transport::Plain(tcp) = std::mem::replace(&mut self.transport, Transport::Closed) else {
            return Err(SessionError::Protocol("STARTTLS on a connection that is not plaintext".into()));
        };
        // C5: verified for a host that gets credentials, opportunistic for any other.
        let config = match &self.settings.credentials {
            Some(c) => crate::trust::verified_config(&c.trust).map_err(SessionError::Tls)?,
            None => insecure_client_config(),
        };
        let connector = TlsConnector::from(config);
        let name = server_name(&self.host, self.addr.ip());
        match timeout(self.settings.connect_timeout, connector.connect(name, tcp)).await {
            Err(_) => {
                self.broken = true;
                Err(SessionError::Tls("handshake timed out".into()))
            }
            Ok(Err(e)) => {
                self.broken = true;
                if self.settings.credentials.is_some() {
                    tracing::warn!(host = %self.host, addr = %self.addr, error = %e, "TLS to a host with credentials failed; credentials not sent");
                }
                Err(SessionError::Tls(e.to_string()))
            }
            Ok(Ok(tls)) => {
                let (_, conn) = tls.get_ref();
                tracing::debug!(host = %self.host, version = ?conn.protocol_version(), suite = ?conn.negotiated_cipher_suite().map(|s| s.suite()), "TLS established");
                self.transport = Transport::Tls(Box::new(tls));
                Ok(())
            }
        }
    }

    async fn transaction<B: BodySource>(
        &mut self,
        envelope: &Envelope<'_>,
        body: &mut B,
        prepared: &Prepared,
    ) -> Result<Vec<RcptOutcome>, SessionError> {
        let (t, caps) = (self.settings.timeouts, self.caps);
        let mut mail = format!("MAIL FROM:<{}>", envelope.mail_from);
        if caps.size {
            let _ = write!(mail, " SIZE={}", envelope.size);
        }
        if envelope.eight_bit && caps.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        let dsn = envelope.dsn.filter(|_| caps.dsn);
        if let Some(d) = envelope.dsn {
            d.peer_offers.store(caps.dsn, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(d) = dsn {
            // RFC 3461 §4.3, §4.4: passed on unchanged (what is not a valid value is dropped).
            if let Some(ret) = d.ret.as_deref().filter(|r| r.eq_ignore_ascii_case("FULL") || r.eq_ignore_ascii_case("HDRS")) {
                let _ = write!(mail, " RET={ret}");
            }
            if let Some(envid) = &d.envid {
                let _ = write!(mail, " ENVID={}", mail_proto::smtp_command::xtext_encode(envid));
            }
        }
        // RFC 4954 §5: the submitter goes to a server that offers AUTH and that we authenticated
        // to (a session with credentials has, or it would not be here); `<>` when not known.
        if caps.auth && self.settings.credentials.is_some() {
            use mail_proto::smtp_command::{auth_param_value, parse_auth_param, xtext_encode};
            // What is not a mailbox cannot be passed on: the submitter is then unknown.
            let submitter = envelope.auth_sender.filter(|a| parse_auth_param(&xtext_encode(a)).is_some_and(|m| m.is_some()));
            let _ = write!(mail, " AUTH={}", auth_param_value(submitter));
        }
        mail.push_str("\r\n");
        let host = self.host.clone();
        let rcpt_params = |i: usize| -> String {
            let Some((notify, orcpt)) = dsn.and_then(|d| d.recipients.get(i)) else { return String::new() };
            let mut p = String::new();
            if let Some(n) = notify.as_deref().and_then(mail_proto::smtp_command::parse_notify) {
                let _ = write!(p, " NOTIFY={n}");
            }
            // RFC 3461 §4.2: the address type must be an atom, the address goes as xtext; an ORCPT
            // that cannot be sent that way is dropped, never relayed as it came.
            if let Some(o) = orcpt.as_deref() {
                match mail_proto::smtp_command::orcpt_value(o) {
                    Some(value) => {
                        let _ = write!(p, " ORCPT={value}");
                    }
                    None => tracing::warn!(host, orcpt = ?o, "dropping an ORCPT that is not addr-type;address"),
                }
            }
            p
        };
        let rcpt = |i: usize, r: &String| format!("RCPT TO:<{r}>{}\r\n", rcpt_params(i));
        let mut outcomes = Vec::with_capacity(envelope.recipients.len());

        let data_reply = if caps.pipelining {
            // RFC 2920: MAIL, every RCPT and DATA in one write, then the replies in order.
            // With CHUNKING the BDAT chunks follow the replies: nothing to take back if all fail.
            let mut batch = mail;
            envelope.recipients.iter().enumerate().for_each(|(i, r)| batch.push_str(&rcpt(i, r)));
            if !caps.chunking {
                batch.push_str("DATA\r\n");
            }
            tracing::debug!(host = %self.host, commands = envelope.recipients.len() + 2, "sending pipelined MAIL, RCPT, DATA");
            self.send("MAIL", t.mail, batch.as_bytes()).await?;
            let mail_reply = self.read_reply("MAIL", t.mail).await?;
            if mail_reply.code / 100 != 2 {
                // Read the other replies so that QUIT is not taken for message text by a server
                // that accepted DATA anyway; the rejection stands whatever happens there.
                if let Ok(Some(data)) = self.pipelined_replies(envelope.recipients.len(), &mut Vec::new(), !caps.chunking).await {
                    self.end_empty_data(&data).await;
                }
                return Err(SessionError::Rejected { stage: "MAIL", reply: mail_reply });
            }
            let data = self.pipelined_replies(envelope.recipients.len(), &mut outcomes, !caps.chunking).await?;
            if !outcomes.contains(&RcptOutcome::Accepted) {
                if let Some(data) = &data {
                    self.end_empty_data(data).await;
                }
                return Ok(outcomes);
            }
            data
        } else {
            let reply = self.command("MAIL", t.mail, &mail).await?;
            if reply.code / 100 != 2 {
                return Err(SessionError::Rejected { stage: "MAIL", reply });
            }
            for (i, r) in envelope.recipients.iter().enumerate() {
                let reply = self.command("RCPT", t.rcpt, &rcpt(i, r)).await?;
                outcomes.push(rcpt_outcome(reply));
            }
            if !outcomes.contains(&RcptOutcome::Accepted) {
                return Ok(outcomes);
            }
            if caps.chunking { None } else { Some(self.command("DATA", t.data_init, "DATA\r\n").await?) }
        };

        let framing = match data_reply {
            None => Framing::Chunks,
            Some(r) if r.code == 354 => Framing::Dot,
            Some(r) if (400..=599).contains(&r.code) => return Err(SessionError::Rejected { stage: "DATA", reply: r }),
            Some(r) => return Err(SessionError::Protocol(format!("unexpected reply to DATA: {}", show(&r)))),
        };
        let end = self.send_body(body, prepared, !caps.eight_bit_mime, envelope.mail_from, framing).await?;
        tracing::debug!(host = %self.host, reply = %show(&end), "reply to end of data");
        for outcome in outcomes.iter_mut().filter(|o| **o == RcptOutcome::Accepted) {
            *outcome = match end.code / 100 {
                2 => RcptOutcome::Accepted,
                5 => RcptOutcome::Failed(end.clone()),
                _ => RcptOutcome::Deferred(end.clone()),
            };
        }
        Ok(outcomes)
    }

    /// The RCPT replies of a pipelined batch (into `outcomes`), then the DATA reply when DATA
    /// was sent.
    async fn pipelined_replies(&mut self, count: usize, outcomes: &mut Vec<RcptOutcome>, data: bool) -> Result<Option<Reply>, SessionError> {
        let t = self.settings.timeouts;
        for _ in 0..count {
            let reply = self.read_reply("RCPT", t.rcpt).await?;
            outcomes.push(rcpt_outcome(reply));
        }
        if !data {
            return Ok(None);
        }
        self.read_reply("DATA", t.data_init).await.map(Some)
    }

    /// After a pipelined DATA that should have failed: when the server said 354 anyway (RFC 2920
    /// §3.1 says it should not), send the empty message's dot, which it has to refuse.
    async fn end_empty_data(&mut self, data_reply: &Reply) {
        let t = self.settings.timeouts;
        if data_reply.code == 354 && self.send("DATA block", t.data_block, b".\r\n").await.is_ok() {
            let _ = self.read_reply("DATA end", t.data_term).await;
        }
    }

    /// The DKIM-Signature fields, if any, then the body, CRLF-normalised, converted as the plan
    /// says for a server with or without 8BITMIME (`seven_bit`); after DATA dot-stuffed and
    /// ended by the `.` line, with CHUNKING in BDAT chunks, the last one LAST. Returns the reply
    /// to the end of the message (or to a refused chunk, which ends it early).
    async fn send_body<B: BodySource>(
        &mut self,
        body: &mut B,
        prepared: &Prepared,
        seven_bit: bool,
        envelope_sender: &str,
        framing: Framing,
    ) -> Result<Reply, SessionError> {
        let block_timeout = self.settings.timeouts.data_block;
        // The DATA path's dot-stuffer ends the last line; BDAT content must do that itself.
        let mut at_line_start = true;
        let mut pass_on = |stuffer: &mut DotStuffer, converted: &[u8], out: &mut Vec<u8>| match framing {
            Framing::Dot => stuffer.stuff(converted, out),
            Framing::Chunks => {
                out.extend_from_slice(converted);
                if let Some(&last) = converted.last() {
                    at_line_start = last == b'\n';
                }
            }
        };
        let mut endings = BareEndings::default();
        let mut converter = crate::encode::Converter::new(&prepared.plan, seven_bit);
        if converter.converts() {
            tracing::debug!(host = %self.host, seven_bit, "converting the message for this server");
        }
        let mut stuffer = DotStuffer::default();
        let mut normalised = Vec::new();
        let mut converted = Vec::new();
        let mut out = Vec::new();
        if let Some(dkim) = &prepared.dkim {
            // Signed after every change we make (conversion included), put in front of it all.
            pass_on(&mut stuffer, &dkim.fields(seven_bit, envelope_sender, &self.host), &mut out);
        }
        loop {
            let chunk = body.next_chunk().await.map_err(|e| {
                // Dropping the connection without the final dot makes the server discard the
                // partial message.
                SessionError::Io(io::Error::new(e.kind(), format!("reading the message body: {e}")))
            });
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            };
            let Some(chunk) = chunk else { break };
            normalised.clear();
            endings.feed(&chunk, &mut normalised);
            converted.clear();
            converter.feed(&normalised, &mut converted);
            pass_on(&mut stuffer, &converted, &mut out);
            match framing {
                Framing::Dot if out.len() >= WRITE_BLOCK => {
                    self.send("DATA block", block_timeout, &out).await?;
                    out.clear();
                }
                Framing::Chunks if out.len() >= BDAT_CHUNK => {
                    let reply = self.bdat(&out, false).await?;
                    out.clear();
                    if reply.code / 100 != 2 {
                        // RFC 3030 §2: no further chunk after a refused one.
                        return Ok(reply);
                    }
                }
                _ => {}
            }
        }
        normalised.clear();
        endings.finish(&mut normalised);
        converted.clear();
        converter.feed(&normalised, &mut converted);
        converter.finish(&mut converted);
        pass_on(&mut stuffer, &converted, &mut out);
        match framing {
            Framing::Dot => {
                stuffer.finish(&mut out);
                self.send("DATA block", block_timeout, &out).await?;
                self.dot_sent = true;
                self.read_reply("DATA end", self.settings.timeouts.data_term).await
            }
            Framing::Chunks => {
                if !at_line_start {
                    out.extend_from_slice(b"\r\n");
                }
                self.bdat(&out, true).await
            }
        }
    }

    /// One BDAT chunk (RFC 3030) and its reply. After the LAST chunk is written the server may
    /// take the message whatever happens next, as after the final dot.
    async fn bdat(&mut self, chunk: &[u8], last: bool) -> Result<Reply, SessionError> {
        let t = self.settings.timeouts;
        let mut wire = format!("BDAT {}{}\r\n", chunk.len(), if last { " LAST" } else { "" }).into_bytes();
        wire.extend_from_slice(chunk);
        self.send("DATA block", t.data_block, &wire).await?;
        if last {
            self.dot_sent = true;
            return self.read_reply("DATA end", t.data_term).await;
        }
        let reply = self.read_reply("BDAT", t.data_block).await?;
        tracing::debug!(host = %self.host, reply = %show(&reply), size = chunk.len(), "reply to a BDAT chunk");
        Ok(reply)
    }

    /// Send one command line and read its reply.
    async fn command(&mut self, stage: &'static str, limit: Duration, line: &str) -> Result<Reply, SessionError> {
        tracing::debug!(host = %self.host, command = line.trim_end(), "sending");
        self.send(stage, limit, line.as_bytes()).await?;
        let reply = self.read_reply(stage, limit).await?;
        tracing::debug!(host = %self.host, reply = %show(&reply), "received");
        Ok(reply)
    }

    async fn send(&mut self, stage: &'static str, limit: Duration, data: &[u8]) -> Result<(), SessionError> {
        let result = match timeout(limit, self.transport.write_all(data)).await {
            Err(_) => Err(SessionError::Timeout(stage)),
            Ok(Err(e)) => Err(SessionError::Io(e)),
            Ok(Ok(())) => Ok(()),
        };
        self.broken |= result.is_err();
        result
    }

    /// One complete reply within `limit`. A 421 (the server is closing, RFC 5321 §3.8) or no
    /// complete reply leaves the session broken.
    async fn read_reply(&mut self, stage: &'static str, limit: Duration) -> Result<Reply, SessionError> {
        let result = self.read_reply_within(stage, limit).await;
        self.broken |= !matches!(&result, Ok(reply) if reply.code != 421);
        result
    }

    async fn read_reply_within(&mut self, stage: &'static str, limit: Duration) -> Result<Reply, SessionError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => return Err(SessionError::Protocol(format!("bad reply from {} at {stage}: {e}", self.host))),
            }
            let n = tokio::time::timeout_at(deadline, self.transport.read_into(&mut self.buf))
                .await
                .map_err(|_| SessionError::Timeout(stage))?
                .map_err(SessionError::Io)?;
            if n == 0 {
                let why = format!("{} closed the connection at {stage}", self.host);
                return Err(SessionError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, why)));
            }
        }
    }

    /// QUIT, its reply ignored, then close (with close_notify under TLS).
    async fn quit(&mut self) {
        let limit = self.settings.timeouts.mail.min(QUIT_TIMEOUT);
        if self.send("QUIT", limit, b"QUIT\r\n").await.is_ok() {
            let _ = self.read_reply("QUIT", limit).await;
        }
        let _ = timeout(limit, self.transport.shutdown()).await;
    }
}

/// How the message's octets go to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// After DATA, dot-stuffed, ended by the `.` line.
    Dot,
    /// In BDAT chunks (RFC 3030 CHUNKING).
    Chunks,
}

fn rcpt_outcome(reply: Reply) -> RcptOutcome {
    match reply.code {
        200..=299 => RcptOutcome::Accepted,
        // RFC 5321 §4.5.3.1.10: some servers say 552 for "too many recipients"; treat it as
        // temporary so the rest go in a later transaction.
        552 => RcptOutcome::Deferred(reply),
        500..=599 => RcptOutcome::Failed(reply),
        _ => RcptOutcome::Deferred(reply),
    }
}

/// Turns every bare CR and bare LF into CRLF, across chunk boundaries.
#[derive(Debug, Default)]
pub(crate) struct BareEndings {
    /// The previous chunk ended in a CR.
    pending_cr: bool,
}

impl BareEndings {
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + 2);
        for &b in input {
            if self.pending_cr {
                self.pending_cr = false;
                out.extend_from_slice(b"\r\n");
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => out.extend_from_slice(b"\r\n"),
                _ => out.push(b),
            }
        }
    }

    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_cr) {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// SNI: `host` when it is a DNS name (a trailing dot dropped), otherwise the IP address, for
/// which rustls sends no SNI.
fn server_name(host: &str, ip: IpAddr) -> ServerName<'static> {
    match DnsName::try_from(host.strip_suffix('.').unwrap_or(host)) {
        Ok(name) => ServerName::DnsName(name.to_owned()),
        Err(_) => ServerName::IpAddress(ip.into()),
    }
}

/// The client TLS configuration for opportunistic STARTTLS: any certificate accepted (C5),
/// handshake signatures still verified; see [`crate::trust::opportunistic_config`].
pub fn insecure_client_config() -> Arc<ClientConfig> {
    crate::trust::opportunistic_config()
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::Ipv4Addr;

    use mail_proto::{DataDecoder, DataEvent, LineEndings};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    // ---- the scripted server ----

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum StartTls {
        /// Reply 220 and do the handshake with a self-signed certificate.
        Upgrade,
        /// Reply 220, then send bytes that are not TLS and hang up.
        Break,
        /// Reply 454.
        Refuse,
    }

    /// What the server answers. Replies are complete wire text (CRLF included); an empty reply
    /// means "say nothing".
    #[derive(Clone, Debug)]
    struct Script {
        /// Accept the connection and never say anything.
        silent: bool,
        greeting: &'static str,
        ehlo: &'static str,
        ehlo_tls: &'static str,
        helo: &'static str,
        starttls: StartTls,
        mail: &'static str,
        /// Replies to the RCPTs in order; "250 2.1.5 ok" for the rest.
        rcpt: Vec<&'static str>,
        data: &'static str,
        end: &'static str,
        /// Answer MAIL and RCPT only once DATA has arrived: a client that waits for the MAIL
        /// reply before sending RCPT times out.
        hold_until_data: bool,
        /// The certificate (chain and PKCS#8 key) for STARTTLS; `None`: self-signed for mx.test.
        identity: Option<Identity>,
        /// The reply to AUTH (the whole exchange is one command: PLAIN with initial response).
        auth: &'static str,
    }

    #[derive(Clone, Debug)]
    struct Identity {
        chain: Vec<CertificateDer<'static>>,
        key: Vec<u8>,
    }

    impl Default for Script {
        fn default() -> Self {
            Script {
                silent: false,
                greeting: "220 mx.test ESMTP\r\n",
                ehlo: "250-mx.test\r\n250-SIZE 10000000\r\n250 8BITMIME\r\n",
                ehlo_tls: "250-mx.test\r\n250 8BITMIME\r\n",
                helo: "250 mx.test\r\n",
                starttls: StartTls::Upgrade,
                mail: "250 2.1.0 ok\r\n",
                rcpt: Vec::new(),
                data: "354 go ahead\r\n",
                end: "250 2.0.0 queued as 1\r\n",
                hold_until_data: false,
                identity: None,
                auth: "235 2.7.0 authenticated\r\n",
            }
        }
    }

    #[derive(Debug)]
    struct Cmd {
        line: String,
        /// Received over TLS.
        tls: bool,
        /// More bytes were already waiting behind this command when it was read.
        followed: bool,
    }

    #[derive(Debug, Default)]
    struct Log {
        peer: Option<SocketAddr>,
        commands: Vec<Cmd>,
        /// The DATA bytes exactly as they arrived, terminator included, when the message ended.
        wire_body: Option<Vec<u8>>,
        /// The same, decoded strictly (no bare CR/LF allowed, dots unstuffed).
        body: Option<Vec<u8>>,
        bare_line_ending: bool,
    }

    impl Log {
        fn lines(&self) -> Vec<&str> {
            self.commands.iter().map(|c| c.line.as_str()).collect()
        }
    }

    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

    async fn server(script: Script) -> (SocketAddr, JoinHandle<Log>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let (tcp, peer) = listener.accept().await.unwrap();
            let mut log = Log { peer: Some(peer), ..Log::default() };
            serve(Box::new(tcp), &script, &mut log).await;
            log
        });
        (addr, handle)
    }

    fn acceptor(identity: Option<&Identity>) -> tokio_rustls::TlsAcceptor {
        let (chain, key) = match identity {
            Some(id) => (id.chain.clone(), id.key.clone()),
            None => {
                let made = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).unwrap();
                (vec![made.cert.der().clone()], made.signing_key.serialize_der())
            }
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// Serve one connection; returns when the client quits or hangs up.
    async fn serve(mut io: Box<dyn Io>, s: &Script, log: &mut Log) {
        if s.silent {
            let mut sink = [0u8; 512];
            while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        io.write_all(s.greeting.as_bytes()).await.unwrap();
        let mut buf: Vec<u8> = Vec::new();
        let mut tls = false;
        let mut rcpts = 0;
        let mut held = String::new();
        loop {
            let line = loop {
                if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                    let line: Vec<u8> = buf.drain(..p + 2).collect();
                    break String::from_utf8_lossy(&line[..p]).into_owned();
                }
                if !matches!(io.read_buf(&mut buf).await, Ok(n) if n > 0) {
                    return;
                }
            };
            log.commands.push(Cmd { line: line.clone(), tls, followed: !buf.is_empty() });
            let verb = line.split([' ', ':']).next().unwrap_or("").to_ascii_uppercase();
            let reply: String = match verb.as_str() {
                "EHLO" => (if tls { s.ehlo_tls } else { s.ehlo }).into(),
                "HELO" => s.helo.into(),
                "MAIL" => s.mail.into(),
                "RCPT" => {
                    rcpts += 1;
                    s.rcpt.get(rcpts - 1).copied().unwrap_or("250 2.1.5 ok\r\n").into()
                }
                "DATA" => s.data.into(),
                "RSET" => "250 2.0.0 ok\r\n".into(),
                "AUTH" => s.auth.into(),
                "QUIT" => {
                    let _ = io.write_all(b"221 2.0.0 bye\r\n").await;
                    return;
                }
                "STARTTLS" => match s.starttls {
                    StartTls::Refuse => "454 4.7.0 TLS not available\r\n".into(),
                    StartTls::Break => {
                        let _ = io.write_all(b"220 2.0.0 go ahead\r\n").await;
                        let _ = io.write_all(b"this is not TLS at all\r\n\r\n").await;
                        return;
                    }
                    StartTls::Upgrade => {
                        io.write_all(b"220 2.0.0 go ahead\r\n").await.unwrap();
                        buf.clear();
                        match acceptor(s.identity.as_ref()).accept(io).await {
                            Ok(stream) => io = Box::new(stream),
                            Err(_) => return,
                        }
                        tls = true;
                        continue;
                    }
                },
                _ => "502 5.5.2 unknown command\r\n".into(),
            };
            if s.hold_until_data && matches!(verb.as_str(), "MAIL" | "RCPT") {
                held.push_str(&reply);
                continue;
            }
            held.push_str(&reply);
            if !held.is_empty() {
                io.write_all(held.as_bytes()).await.unwrap();
                held.clear();
            }
            if verb == "DATA" && reply.starts_with("354") {
                let mut decoder = DataDecoder::new(LineEndings::Strict);
                let mut wire = Vec::new();
                let mut body = Vec::new();
                loop {
                    match decoder.feed(&buf, &mut body) {
                        DataEvent::NeedMore => {
                            wire.append(&mut buf);
                            if !matches!(io.read_buf(&mut buf).await, Ok(n) if n > 0) {
                                return;
                            }
                        }
                        DataEvent::End { consumed } => {
                            wire.extend(buf.drain(..consumed));
                            break;
                        }
                        DataEvent::BareLineEnding { .. } => {
                            log.bare_line_ending = true;
                            return;
                        }
                    }
                }
                log.wire_body = Some(wire);
                log.body = Some(body);
                if !s.end.is_empty() {
                    io.write_all(s.end.as_bytes()).await.unwrap();
                }
            }
        }
    }

    // ---- the client side ----

    /// The pieces not yet read, and all of them (for rewind).
    struct Chunks(VecDeque<Vec<u8>>, Vec<Vec<u8>>);

    impl Chunks {
        fn new(parts: &[&[u8]]) -> Self {
            let all: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
            Chunks(all.iter().cloned().collect(), all)
        }
    }

    impl BodySource for Chunks {
        async fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
            Ok(self.0.pop_front())
        }

        fn rewind(&mut self) {
            self.0 = self.1.iter().cloned().collect();
        }
    }

    /// One chunk, then a read error; `at_scan`: already while the conversion is planned,
    /// otherwise only while the body is sent.
    struct Broken {
        at_scan: bool,
        sent_one: bool,
        rewound: bool,
    }

    impl Broken {
        fn new(at_scan: bool) -> Self {
            Broken { at_scan, sent_one: false, rewound: false }
        }
    }

    impl BodySource for Broken {
        async fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
            if !std::mem::replace(&mut self.sent_one, true) {
                Ok(Some(b"Subject: half\r\n\r\nfirst half\r\n".to_vec()))
            } else if self.at_scan || self.rewound {
                Err(io::Error::other("disk on fire"))
            } else {
                Ok(None)
            }
        }

        fn rewind(&mut self) {
            self.sent_one = false;
            self.rewound = true;
        }
    }

    fn settings() -> ClientSettings {
        let t = Duration::from_secs(2);
        ClientSettings {
            helo_name: "client.test".into(),
            bind_address: None,
            starttls: true,
            connect_timeout: t,
            timeouts: Timeouts { greeting: t, mail: t, rcpt: t, data_init: t, data_block: t, data_term: t },
            credentials: None,
            dkim: None,
        }
    }

    fn rcpts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn simple_body() -> Chunks {
        Chunks::new(&[b"Subject: t\r\n\r\nhello\r\n"])
    }

    /// Run one attempt against `script` and return the result and what the server saw.
    async fn run(
        script: Script,
        settings: &ClientSettings,
        to: &[&str],
        body: &mut impl BodySource,
    ) -> (Result<Vec<RcptOutcome>, SessionError>, Log) {
        let (addr, server) = server(script).await;
        let recipients = rcpts(to);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1234, eight_bit: false, dsn: None, auth_sender: None };
        let result = deliver(settings, "mx.test", addr, &envelope, body).await;
        let log = tokio::time::timeout(Duration::from_secs(3), server).await.expect("server finished").unwrap();
        (result, log)
    }

    fn reply(code: u16, status: (u16, u16), text: &str) -> Reply {
        Reply::new(code, status, text)
    }

    // ---- tests ----

    #[tokio::test]
    async fn happy_path_streams_a_clean_dot_stuffed_body() {
        let mut body = Chunks::new(&[
            b"Subject: hi\r\n\r\n.leading dot\r\nbare lf\nbare cr\rsplit crlf\r",
            b"\n.dot after split\r\n",
            b".",
            b"dot alone in a chunk\r\n..two dots\r\nlast line without newline",
        ]);
        let (addr, server) = server(Script::default()).await;
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1234, eight_bit: true, dsn: None, auth_sender: None };
        let result = deliver(&settings(), "mx.test", addr, &envelope, &mut body).await.unwrap();
        let log = server.await.unwrap();
        assert_eq!(result, vec![RcptOutcome::Accepted]);
        assert_eq!(
            log.lines(),
            vec!["EHLO client.test", "MAIL FROM:<a@example.org> SIZE=1234 BODY=8BITMIME", "RCPT TO:<b@example.net>", "DATA", "QUIT"]
        );
        assert!(log.commands.iter().all(|c| !c.followed && !c.tls), "{log:?}");
        assert!(!log.bare_line_ending);
        let wire = String::from_utf8(log.wire_body.unwrap()).unwrap();
        assert_eq!(
            wire,
            "Subject: hi\r\n\r\n..leading dot\r\nbare lf\r\nbare cr\r\nsplit crlf\r\n..dot after split\r\n\
             ..dot alone in a chunk\r\n...two dots\r\nlast line without newline\r\n.\r\n"
        );
        assert!(wire.ends_with("\r\n.\r\n"));
        let decoded = String::from_utf8(log.body.unwrap()).unwrap();
        assert!(decoded.starts_with("Subject: hi\r\n\r\n.leading dot\r\nbare lf\r\n"), "{decoded}");
    }

    #[tokio::test]
    async fn null_sender_and_no_size_when_not_offered() {
        let script = Script { ehlo: "250-mx.test\r\n250 PIPELINING\r\n", ..Script::default() };
        let (addr, server) = server(script).await;
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "", recipients: &recipients, size: 99, eight_bit: true, dsn: None, auth_sender: None };
        let result = deliver(&settings(), "mx.test", addr, &envelope, &mut simple_body()).await.unwrap();
        assert_eq!(result, vec![RcptOutcome::Accepted]);
        let log = server.await.unwrap();
        assert_eq!(log.commands[1].line, "MAIL FROM:<>");
    }

    #[tokio::test]
    async fn empty_body_is_just_the_dot() {
        let (result, log) = run(Script::default(), &settings(), &["b@example.net"], &mut Chunks::new(&[])).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        assert_eq!(log.wire_body.unwrap(), b".\r\n");
    }

    #[tokio::test]
    async fn pipelining_sends_mail_rcpt_data_without_waiting() {
        // The server answers nothing before DATA: only a pipelining client gets through.
        let script = Script { ehlo: "250-mx.test\r\n250-PIPELINING\r\n250 SIZE\r\n", hold_until_data: true, ..Script::default() };
        let (result, log) = run(script, &settings(), &["b@example.net", "c@example.net"], &mut simple_body()).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted, RcptOutcome::Accepted]);
        assert_eq!(
            log.lines(),
            vec!["EHLO client.test", "MAIL FROM:<a@example.org> SIZE=1234", "RCPT TO:<b@example.net>", "RCPT TO:<c@example.net>", "DATA", "QUIT"]
        );
        assert!(log.body.is_some());
    }

    #[tokio::test]
    async fn no_pipelining_unless_offered() {
        // Same holding server without PIPELINING in EHLO: the client waits for the MAIL reply.
        let script = Script { hold_until_data: true, ..Script::default() };
        let mut s = settings();
        s.timeouts.mail = Duration::from_millis(300);
        let (result, log) = run(script, &s, &["b@example.net"], &mut simple_body()).await;
        assert!(matches!(result, Err(SessionError::Timeout("MAIL"))), "{result:?}");
        assert_eq!(log.lines(), vec!["EHLO client.test", "MAIL FROM:<a@example.org> SIZE=1234"]);
        assert!(!log.commands[1].followed);
    }

    #[tokio::test]
    async fn one_recipient_refused_one_accepted_both_modes() {
        for ehlo in ["250-mx.test\r\n250 PIPELINING\r\n", "250 mx.test\r\n"] {
            let script = Script { ehlo, rcpt: vec!["550 5.1.1 no such user\r\n", "250 2.1.5 ok\r\n"], ..Script::default() };
            let (result, log) = run(script, &settings(), &["x@example.net", "b@example.net"], &mut simple_body()).await;
            assert_eq!(result.unwrap(), vec![RcptOutcome::Failed(reply(550, (1, 1), "no such user")), RcptOutcome::Accepted]);
            assert!(log.lines().contains(&"DATA"));
            assert_eq!(log.body.as_deref(), Some(&b"Subject: t\r\n\r\nhello\r\n"[..]));
            assert_eq!(log.lines().last(), Some(&"QUIT"));
            assert!(log.commands.iter().all(|c| !c.followed || ehlo.contains("PIPELINING")));
        }
    }

    #[tokio::test]
    async fn all_recipients_refused_no_data() {
        let script = Script { rcpt: vec!["550 5.1.1 no\r\n", "450 4.2.1 later\r\n", "552 5.5.3 too many\r\n"], ..Script::default() };
        let (result, log) = run(script, &settings(), &["x@example.net", "y@example.net", "z@example.net"], &mut simple_body()).await;
        assert_eq!(
            result.unwrap(),
            vec![
                RcptOutcome::Failed(reply(550, (1, 1), "no")),
                RcptOutcome::Deferred(reply(450, (2, 1), "later")),
                // 552 to RCPT counts as temporary (RFC 5321 §4.5.3.1.10).
                RcptOutcome::Deferred(reply(552, (5, 3), "too many")),
            ]
        );
        assert!(!log.lines().contains(&"DATA"), "{log:?}");
        assert_eq!(log.lines().last(), Some(&"QUIT"));
        assert!(log.body.is_none());
    }

    #[tokio::test]
    async fn all_recipients_refused_pipelined() {
        // The usual server: 554 to the pipelined DATA.
        let script = Script {
            ehlo: "250-mx.test\r\n250 PIPELINING\r\n",
            rcpt: vec!["550 5.1.1 no\r\n"],
            data: "554 5.5.1 no valid recipients\r\n",
            ..Script::default()
        };
        let (result, log) = run(script, &settings(), &["x@example.net"], &mut simple_body()).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Failed(reply(550, (1, 1), "no"))]);
        assert!(log.body.is_none());
        assert_eq!(log.lines().last(), Some(&"QUIT"));

        // A server that says 354 anyway gets an empty message (just the dot), which it refuses.
        let script = Script {
            ehlo: "250-mx.test\r\n250 PIPELINING\r\n",
            rcpt: vec!["550 5.1.1 no\r\n"],
            end: "554 5.5.1 no valid recipients\r\n",
            ..Script::default()
        };
        let (result, log) = run(script, &settings(), &["x@example.net"], &mut simple_body()).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Failed(reply(550, (1, 1), "no"))]);
        assert_eq!(log.wire_body.as_deref(), Some(&b".\r\n"[..]));
        assert_eq!(log.lines().last(), Some(&"QUIT"));
    }

    #[tokio::test]
    async fn final_reply_applies_to_accepted_recipients() {
        for (end, expect) in [
            ("451 4.3.0 try later\r\n", RcptOutcome::Deferred(reply(451, (3, 0), "try later"))),
            ("554 5.6.0 content refused\r\n", RcptOutcome::Failed(reply(554, (6, 0), "content refused"))),
        ] {
            let script = Script { end, rcpt: vec!["250 ok\r\n", "550 5.1.1 no\r\n", "250 ok\r\n"], ..Script::default() };
            let (result, log) = run(script, &settings(), &["a@x.test", "b@x.test", "c@x.test"], &mut simple_body()).await;
            assert_eq!(result.unwrap(), vec![expect.clone(), RcptOutcome::Failed(reply(550, (1, 1), "no")), expect]);
            assert_eq!(log.lines().last(), Some(&"QUIT"));
        }
    }

    #[tokio::test]
    async fn mail_from_4xx_is_a_temporary_rejection() {
        let pipelining = "250-mx.test\r\n250 PIPELINING\r\n";
        // Without pipelining; pipelined with a server that refuses the DATA that follows; and
        // pipelined with one that accepts it anyway (it gets the empty message's dot).
        for (ehlo, data, empty_message) in
            [("250 mx.test\r\n", "354 go\r\n", false), (pipelining, "503 5.5.1 no\r\n", false), (pipelining, "354 go\r\n", true)]
        {
            let script = Script { ehlo, data, mail: "451 4.3.0 busy\r\n", rcpt: vec!["503 5.5.1 need MAIL\r\n"], ..Script::default() };
            let (result, log) = run(script, &settings(), &["b@example.net"], &mut simple_body()).await;
            match result {
                Err(e @ SessionError::Rejected { stage: "MAIL", .. }) => {
                    assert!(!e.is_permanent());
                    assert_eq!(e.reply(), Some(&reply(451, (3, 0), "busy")));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(log.wire_body.as_deref(), empty_message.then_some(&b".\r\n"[..]));
            assert_eq!(log.lines().last(), Some(&"QUIT"));
        }
    }

    #[tokio::test]
    async fn data_refused_is_a_rejection() {
        let script = Script { data: "451 4.3.0 no\r\n", ..Script::default() };
        let (result, log) = run(script, &settings(), &["b@example.net"], &mut simple_body()).await;
        assert!(matches!(result, Err(SessionError::Rejected { stage: "DATA", ref reply }) if reply.code == 451), "{result:?}");
        assert!(log.body.is_none());
    }

    #[tokio::test]
    async fn greeting_5xx_is_not_permanent() {
        // Postfix's smtp_skip_5xx_greeting: that host will not talk to us, the next MX may; the
        // recipients must not bounce for it.
        let script = Script { greeting: "554 5.7.1 go away\r\n", ..Script::default() };
        let (result, log) = run(script, &settings(), &["b@example.net"], &mut simple_body()).await;
        let e = result.unwrap_err();
        assert!(matches!(e, SessionError::Rejected { stage: "greeting", .. }), "{e:?}");
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "greeting refused: 554 5.7.1 go away");
        // RFC 5321 §3.1: the client sends QUIT after a 554 greeting.
        assert_eq!(log.lines(), vec!["QUIT"]);
    }

    #[tokio::test]
    async fn ehlo_refused_falls_back_to_helo() {
        let script = Script { ehlo: "502 5.5.2 what?\r\n", ..Script::default() };
        let (result, log) = run(script, &settings(), &["b@example.net"], &mut simple_body()).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        // No extensions after HELO: no SIZE, no STARTTLS.
        assert_eq!(log.lines(), vec!["EHLO client.test", "HELO client.test", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA", "QUIT"]);

        let script = Script { ehlo: "502 5.5.2 what?\r\n", helo: "550 5.7.1 not you\r\n", ..Script::default() };
        let (result, _) = run(script, &settings(), &["b@example.net"], &mut simple_body()).await;
        let e = result.unwrap_err();
        assert!(matches!(e, SessionError::Rejected { stage: "HELO", .. }) && e.is_permanent(), "{e:?}");

        let script = Script { ehlo: "421 4.3.2 shutting down\r\n", ..Script::default() };
        let (result, log) = run(script, &settings(), &["b@example.net"], &mut simple_body()).await;
        let e = result.unwrap_err();
        assert!(matches!(e, SessionError::Rejected { stage: "EHLO", .. }) && !e.is_permanent(), "{e:?}");
        assert!(!log.lines().contains(&"HELO client.test"));
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let mut s = settings();
        s.timeouts.greeting = Duration::from_millis(200);
        let started = std::time::Instant::now();
        let (result, _) = run(Script { silent: true, ..Script::default() }, &s, &["b@example.net"], &mut simple_body()).await;
        assert!(matches!(result, Err(SessionError::Timeout("greeting"))), "{result:?}");
        assert!(!result.unwrap_err().is_permanent());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn no_reply_after_the_dot_times_out() {
        let mut s = settings();
        s.timeouts.data_term = Duration::from_millis(200);
        let (result, log) = run(Script { end: "", ..Script::default() }, &s, &["b@example.net"], &mut simple_body()).await;
        assert!(matches!(result, Err(SessionError::Timeout("DATA end"))), "{result:?}");
        assert!(log.body.is_some());
    }

    #[tokio::test]
    async fn broken_body_source_never_ends_the_message() {
        let (result, log) = run(Script::default(), &settings(), &["b@example.net"], &mut Broken::new(false)).await;
        match result {
            Err(SessionError::Io(e)) => assert!(e.to_string().contains("disk on fire"), "{e}"),
            other => panic!("{other:?}"),
        }
        // The connection closed mid-DATA: no end of message, no QUIT read as message text.
        assert!(log.wire_body.is_none());
        assert_eq!(log.lines().last(), Some(&"DATA"));
        // A body that cannot be read while the conversion is planned: no connection at all.
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: false, dsn: None, auth_sender: None };
        let result = deliver(&settings(), "mx.test", addr, &envelope, &mut Broken::new(true)).await;
        assert!(matches!(&result, Err(SessionError::Io(e)) if e.to_string().contains("disk on fire")), "{result:?}");
    }

    #[tokio::test]
    async fn garbage_reply_is_a_protocol_error() {
        let script = Script { greeting: "SSH-2.0-OpenSSH_9.6\r\n", ..Script::default() };
        let (result, _) = run(script, &settings(), &["b@example.net"], &mut simple_body()).await;
        assert!(matches!(result, Err(SessionError::Protocol(_))), "{result:?}");
    }

    #[tokio::test]
    async fn starttls_upgrades_and_asks_ehlo_again() {
        let script = Script {
            ehlo: "250-mx.test\r\n250-STARTTLS\r\n250 SIZE\r\n",
            ehlo_tls: "250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            hold_until_data: true,
            ..Script::default()
        };
        let (addr, server) = server(script).await;
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1234, eight_bit: true, dsn: None, auth_sender: None };
        let mut body = Chunks::new(&[b"Subject: secret\r\n\r\n.x\r\n"]);
        let result = deliver(&settings(), "mx.test", addr, &envelope, &mut body).await.unwrap();
        let log = server.await.unwrap();
        assert_eq!(result, vec![RcptOutcome::Accepted]);
        let seen: Vec<(&str, bool)> = log.commands.iter().map(|c| (c.line.as_str(), c.tls)).collect();
        assert_eq!(
            seen,
            vec![
                ("EHLO client.test", false),
                ("STARTTLS", false),
                ("EHLO client.test", true),
                // Capabilities from the second EHLO: 8BITMIME and PIPELINING, no SIZE.
                ("MAIL FROM:<a@example.org> BODY=8BITMIME", true),
                ("RCPT TO:<b@example.net>", true),
                ("DATA", true),
                ("QUIT", true),
            ]
        );
        assert_eq!(log.wire_body.as_deref(), Some(&b"Subject: secret\r\n\r\n..x\r\n.\r\n"[..]));
    }

    #[tokio::test]
    async fn starttls_refused_continues_in_plaintext() {
        let script = Script { ehlo: "250-mx.test\r\n250 STARTTLS\r\n", starttls: StartTls::Refuse, ..Script::default() };
        let (result, log) = run(script, &settings(), &["b@example.net"], &mut simple_body()).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        assert_eq!(log.lines()[..3], ["EHLO client.test", "STARTTLS", "MAIL FROM:<a@example.org>"]);
        assert!(log.commands.iter().all(|c| !c.tls));
    }

    #[tokio::test]
    async fn broken_handshake_is_tls_error_and_plaintext_retry_works() {
        let script = Script { ehlo: "250-mx.test\r\n250 STARTTLS\r\n", starttls: StartTls::Break, ..Script::default() };
        let (result, _) = run(script.clone(), &settings(), &["b@example.net"], &mut simple_body()).await;
        let e = result.unwrap_err();
        assert!(matches!(e, SessionError::Tls(_)), "{e:?}");
        assert!(!e.is_permanent());

        // The caller's retry (C5): same host, no STARTTLS.
        let (addr, server) = server(script).await;
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: false, dsn: None, auth_sender: None };
        let result = deliver_plaintext(&settings(), "mx.test", addr, &envelope, &mut simple_body()).await.unwrap();
        assert_eq!(result, vec![RcptOutcome::Accepted]);
        let log = server.await.unwrap();
        assert!(!log.lines().contains(&"STARTTLS"));
    }

    #[tokio::test]
    async fn starttls_off_in_settings() {
        let script = Script { ehlo: "250-mx.test\r\n250 STARTTLS\r\n", starttls: StartTls::Break, ..Script::default() };
        let mut s = settings();
        s.starttls = false;
        let (result, log) = run(script, &s, &["b@example.net"], &mut simple_body()).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        assert!(!log.lines().contains(&"STARTTLS"));
    }

    #[tokio::test]
    async fn binds_to_the_configured_address() {
        let mut s = settings();
        s.bind_address = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        let (result, log) = run(Script::default(), &s, &["b@example.net"], &mut simple_body()).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        assert_eq!(log.peer.unwrap().ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));

        // An IPv6 bind address cannot reach an IPv4 destination.
        s.bind_address = Some("::1".parse().unwrap());
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: false, dsn: None, auth_sender: None };
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let result = deliver(&s, "mx.test", addr, &envelope, &mut simple_body()).await;
        assert!(matches!(result, Err(SessionError::Connect(_))), "{result:?}");
    }

    #[tokio::test]
    async fn connection_refused_is_connect_error() {
        // A port that was just free.
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: false, dsn: None, auth_sender: None };
        let result = deliver(&settings(), "mx.test", addr, &envelope, &mut simple_body()).await;
        assert!(matches!(result, Err(SessionError::Connect(_))), "{result:?}");
    }

    #[tokio::test]
    async fn control_characters_never_reach_the_wire() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for (from, to) in [("a@x.test\r\nRCPT TO:<evil@x.test>", "b@x.test"), ("a@x.test", "b@x.test>\r\nDATA")] {
            let recipients = rcpts(&[to]);
            let envelope = Envelope { mail_from: from, recipients: &recipients, size: 1, eight_bit: false, dsn: None, auth_sender: None };
            let result = deliver(&settings(), "mx.test", addr, &envelope, &mut simple_body()).await;
            assert!(matches!(result, Err(SessionError::Protocol(_))), "{result:?}");
        }
        // No recipients: nothing to do, no connection.
        let envelope = Envelope { mail_from: "a@x.test", recipients: &[], size: 1, eight_bit: false, dsn: None, auth_sender: None };
        assert_eq!(deliver(&settings(), "mx.test", addr, &envelope, &mut simple_body()).await.unwrap(), vec![]);
    }

    // ---- C5: credentials only over verified TLS ----

    const USER: &str = "relayuser";
    const PASSWORD: &str = "s3cret-Pw";

    /// A private CA and a server certificate it issued for `names` (DNS names or IP addresses).
    struct Pki {
        ca_pem: String,
        server: Identity,
        fingerprint: String,
    }

    fn pki(names: &[&str]) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "Postroom test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            fingerprint: crate::trust::fingerprint(cert.der()),
            server: Identity { chain: vec![cert.der().clone()], key: key.serialize_der() },
        }
    }

    fn with_credentials(trust: crate::trust::Trust) -> ClientSettings {
        ClientSettings { credentials: Some(Credentials { user: USER.into(), password: PASSWORD.into(), trust }), ..settings() }
    }

    fn by_ca(p: &Pki) -> crate::trust::Trust {
        crate::trust::Trust { ca_pem: Some(p.ca_pem.clone()), fingerprint: None }
    }

    fn by_pin(pin: &str) -> crate::trust::Trust {
        crate::trust::Trust { ca_pem: None, fingerprint: Some(pin.into()) }
    }

    /// A smarthost: STARTTLS with `identity`, AUTH PLAIN/LOGIN offered before and after TLS.
    fn smarthost(identity: Option<Identity>) -> Script {
        Script {
            ehlo: "250-mx.test\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n",
            ehlo_tls: "250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n",
            identity,
            ..Script::default()
        }
    }

    /// Did the password reach the server in any form?
    fn password_seen(log: &Log) -> bool {
        let plain = mail_proto::sasl::encode(format!("\0{USER}\0{PASSWORD}").as_bytes());
        let login = mail_proto::sasl::encode(PASSWORD.as_bytes());
        log.commands.iter().any(|c| c.line.contains(PASSWORD) || c.line.contains(&plain) || c.line.contains(&login))
    }

    async fn run_at(script: Script, settings: &ClientSettings, host: &str) -> (Result<Vec<RcptOutcome>, SessionError>, Log) {
        let (addr, server) = server(script).await;
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: false, dsn: None, auth_sender: None };
        let result = deliver(settings, host, addr, &envelope, &mut simple_body()).await;
        let log = tokio::time::timeout(Duration::from_secs(3), server).await.expect("server finished").unwrap();
        (result, log)
    }

    #[tokio::test]
    async fn credentials_go_over_tls_verified_by_the_hosts_ca_or_pin() {
        let p = pki(&["mx.test"]);
        let token = mail_proto::sasl::encode(format!("\0{USER}\0{PASSWORD}").as_bytes());
        for trust in [by_ca(&p), by_pin(&p.fingerprint), by_pin(&p.fingerprint.to_uppercase())] {
            let (result, log) = run(smarthost(Some(p.server.clone())), &with_credentials(trust), &["b@example.net"], &mut simple_body()).await;
            assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
            let seen: Vec<(&str, bool)> = log.commands.iter().map(|c| (c.line.as_str(), c.tls)).collect();
            let auth = format!("AUTH PLAIN {token}");
            assert_eq!(seen[..4], [("EHLO client.test", false), ("STARTTLS", false), ("EHLO client.test", true), (auth.as_str(), true)]);
        }
        // A pin accepts its certificate whatever names it carries.
        let elsewhere = pki(&["elsewhere.test"]);
        let (result, log) =
            run(smarthost(Some(elsewhere.server.clone())), &with_credentials(by_pin(&elsewhere.fingerprint)), &["b@example.net"], &mut simple_body())
                .await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        assert!(log.commands.iter().any(|c| c.line.starts_with("AUTH PLAIN") && c.tls));
    }

    #[tokio::test]
    async fn starttls_off_in_settings_still_applies_to_a_host_with_credentials() {
        let p = pki(&["mx.test"]);
        let mut s = with_credentials(by_ca(&p));
        s.starttls = false;
        let (result, log) = run(smarthost(Some(p.server.clone())), &s, &["b@example.net"], &mut simple_body()).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        assert!(log.commands.iter().any(|c| c.line.starts_with("AUTH PLAIN") && c.tls), "{log:?}");
    }

    #[tokio::test]
    async fn unverified_certificate_gets_no_credentials() {
        let p = pki(&["mx.test"]);
        let other = pki(&["mx.test"]);
        let wrong_name = pki(&["elsewhere.test"]);
        let cases = [
            ("self-signed, system roots only", None, crate::trust::Trust::default()),
            ("another CA", Some(p.server.clone()), by_ca(&other)),
            ("the CA's certificate for another name", Some(wrong_name.server.clone()), by_ca(&wrong_name)),
            ("another certificate's pin", Some(p.server.clone()), by_pin(&other.fingerprint)),
        ];
        for (what, identity, trust) in cases {
            let (result, log) = run(smarthost(identity), &with_credentials(trust), &["b@example.net"], &mut simple_body()).await;
            let e = result.unwrap_err();
            assert!(matches!(e, SessionError::Tls(_)), "{what}: {e:?}");
            assert!(!e.is_permanent(), "{what}");
            assert_eq!(log.lines(), vec!["EHLO client.test", "STARTTLS"], "{what}");
            assert!(!password_seen(&log), "{what}");
        }
    }

    #[tokio::test]
    async fn an_ip_literal_host_needs_the_ip_in_the_certificate() {
        let by_ip = pki(&["127.0.0.1"]);
        let (result, log) = run_at(smarthost(Some(by_ip.server.clone())), &with_credentials(by_ca(&by_ip)), "127.0.0.1").await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        assert!(log.commands.iter().any(|c| c.line.starts_with("AUTH PLAIN") && c.tls));
        let by_name = pki(&["mx.test"]);
        let (result, log) = run_at(smarthost(Some(by_name.server.clone())), &with_credentials(by_ca(&by_name)), "[127.0.0.1]").await;
        assert!(matches!(result, Err(SessionError::Tls(_))), "{result:?}");
        assert!(!password_seen(&log));
    }

    #[tokio::test]
    async fn no_or_refused_or_broken_starttls_means_no_credentials_and_no_plaintext() {
        let p = pki(&["mx.test"]);
        let cases = [
            ("not offered", Script { ehlo: "250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n", ..smarthost(None) }, false),
            ("refused", Script { starttls: StartTls::Refuse, ..smarthost(None) }, false),
            ("broken handshake", Script { starttls: StartTls::Break, ..smarthost(None) }, true),
        ];
        for (what, script, tls_error) in cases {
            let (result, log) = run(script, &with_credentials(by_ca(&p)), &["b@example.net"], &mut simple_body()).await;
            let e = result.unwrap_err();
            if tls_error {
                assert!(matches!(e, SessionError::Tls(_)), "{what}: {e:?}");
            } else {
                assert!(matches!(e, SessionError::TlsRequired(_)), "{what}: {e:?}");
                assert_eq!(log.lines().last(), Some(&"QUIT"), "{what}");
            }
            assert!(!e.is_permanent(), "{what}");
            assert!(!log.lines().iter().any(|l| l.starts_with("AUTH") || l.starts_with("MAIL")), "{what}: {log:?}");
            assert!(!password_seen(&log), "{what}");
        }
        // The caller's plaintext retry cannot carry credentials: it does not even connect.
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: false, dsn: None, auth_sender: None };
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let result = deliver_plaintext(&with_credentials(by_ca(&p)), "mx.test", addr, &envelope, &mut simple_body()).await;
        assert!(matches!(result, Err(SessionError::TlsRequired(_))), "{result:?}");
    }

    #[tokio::test]
    async fn auth_trouble_is_temporary_and_ends_the_attempt() {
        let p = pki(&["mx.test"]);
        let refused = Script { auth: "535 5.7.8 authentication credentials invalid\r\n", ..smarthost(Some(p.server.clone())) };
        let (result, log) = run(refused, &with_credentials(by_ca(&p)), &["b@example.net"], &mut simple_body()).await;
        let e = result.unwrap_err();
        assert!(matches!(&e, SessionError::Auth(why) if why.contains("535")), "{e:?}");
        assert!(!e.is_permanent());
        assert!(!log.lines().iter().any(|l| l.starts_with("MAIL")), "{log:?}");

        let no_auth = Script { ehlo_tls: "250-mx.test\r\n250 8BITMIME\r\n", ..smarthost(Some(p.server.clone())) };
        let (result, log) = run(no_auth, &with_credentials(by_ca(&p)), &["b@example.net"], &mut simple_body()).await;
        assert!(matches!(result, Err(SessionError::Auth(_))), "{result:?}");
        assert!(!log.lines().iter().any(|l| l.starts_with("MAIL")), "{log:?}");
        assert!(!password_seen(&log));
    }

    /// RFC 4954 §5: AUTH= goes only to a server that offers AUTH and that we authenticated to:
    /// the submitter as xtext, `<>` when it is unknown (or not a mailbox).
    #[tokio::test]
    async fn auth_parameter_only_to_a_server_we_authenticated_to() {
        let p = pki(&["mx.test"]);
        let mail_line = |log: &Log| log.lines().into_iter().find(|l| l.starts_with("MAIL")).map(str::to_string);
        let recipients = rcpts(&["b@example.net"]);
        for (submitter, want) in [
            (Some("sam@example.test"), " AUTH=sam@example.test"),
            (Some("e=mc2@example.test"), " AUTH=e+3Dmc2@example.test"),
            (None, " AUTH=<>"),
            (Some("not a mailbox"), " AUTH=<>"),
        ] {
            let (addr, server) = server(smarthost(Some(p.server.clone()))).await;
            let envelope =
                Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: false, dsn: None, auth_sender: submitter };
            let result = deliver(&with_credentials(by_ca(&p)), "mx.test", addr, &envelope, &mut simple_body()).await;
            assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
            let log = server.await.unwrap();
            assert_eq!(mail_line(&log).unwrap(), format!("MAIL FROM:<a@example.org>{want}"), "{submitter:?}");
        }
        // Offered, but no credentials for this host: we did not authenticate, so no AUTH=.
        let (addr, server) = server(smarthost(None)).await;
        let envelope = Envelope {
            mail_from: "a@example.org",
            recipients: &recipients,
            size: 1,
            eight_bit: false,
            dsn: None,
            auth_sender: Some("sam@example.test"),
        };
        deliver(&settings(), "mx.test", addr, &envelope, &mut simple_body()).await.unwrap();
        let log = server.await.unwrap();
        assert_eq!(mail_line(&log).unwrap(), "MAIL FROM:<a@example.org>");
    }

    #[tokio::test]
    async fn dsn_parameters_that_cannot_be_relayed_are_dropped() {
        let script = Script { ehlo: "250-mx.test\r\n250 DSN\r\n", ..Script::default() };
        let (addr, server) = server(script).await;
        let recipients = rcpts(&["b@example.net", "c@example.net", "d@example.net"]);
        let dsn = Dsn {
            ret: Some("FULL\r\nRSET".into()),
            envid: Some("env\r1".into()),
            recipients: vec![
                (Some("SUCCESS".into()), Some("rfc\r822;b@example.net".into())),
                (Some("SUCCESS\rX".into()), Some("rfc822;c+x\r@example.net".into())),
                (None, Some("rfc822".into())),
            ],
            ..Default::default()
        };
        let envelope =
            Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: false, dsn: Some(&dsn), auth_sender: None };
        let result = deliver(&settings(), "mx.test", addr, &envelope, &mut simple_body()).await.unwrap();
        assert_eq!(result.len(), 3);
        let log = server.await.unwrap();
        assert!(log.commands.iter().all(|c| !c.line.contains('\r')), "{log:?}");
        assert_eq!(
            log.lines()[1..5],
            [
                "MAIL FROM:<a@example.org> ENVID=env+0D1",
                "RCPT TO:<b@example.net> NOTIFY=SUCCESS",
                "RCPT TO:<c@example.net> ORCPT=rfc822;c+2Bx+0D@example.net",
                "RCPT TO:<d@example.net>",
            ]
        );
    }

    // ---- RFC 6376: DKIM signatures over what the server receives (crate::dkim) ----

    /// The `bh=` tag of the first DKIM-Signature field in `fields`, whitespace removed.
    fn body_hash(fields: &[u8]) -> String {
        let text = String::from_utf8_lossy(fields).replace(['\r', '\n', '\t', ' '], "");
        text.split(';').find_map(|t| t.strip_prefix("bh=")).expect("a bh= tag").to_string()
    }

    #[tokio::test]
    async fn dkim_signature_covers_the_converted_message_each_host_receives() {
        use sender_auth::keys::{Algorithm, KeyPair};
        use sender_auth::sign::{KeyRing, SigningKey};
        let pair = KeyPair::generate(Algorithm::Ed25519Sha256).unwrap();
        let key = SigningKey::new("example.org", "s1", pair.algorithm, pair.signing_key().unwrap());
        let ring = Arc::new(KeyRing::new(vec![key], vec![]));
        let body: &[u8] = b"From: a@example.org\r\nSubject: t\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n.Gr\xc3\xbc\xc3\x9fe\r\n";
        for (ehlo, seven_bit) in [(NO_8BITMIME, true), ("250-mx.test\r\n250 8BITMIME\r\n", false)] {
            let (addr, server) = server(Script { ehlo, ..Script::default() }).await;
            let recipients = rcpts(&["b@example.net"]);
            let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: true, dsn: None, auth_sender: None };
            let s = ClientSettings { starttls: false, dkim: Some(ring.clone()), ..settings() };
            assert_eq!(deliver(&s, "mx.test", addr, &envelope, &mut Chunks::new(&[body])).await.unwrap(), vec![RcptOutcome::Accepted]);
            let received = server.await.unwrap().body.unwrap();
            assert!(received.starts_with(b"DKIM-Signature: v=1; a=ed25519-sha256; s=s1; d=example.org; c=relaxed/relaxed;"));
            let at = received.windows(7).position(|w| w == b"\r\nFrom:").expect("the message after the signature") + 2;
            let (fields, message) = received.split_at(at);
            assert_eq!(message.iter().all(|&b| b < 128), seven_bit, "{}", String::from_utf8_lossy(message));
            // Signing what arrived gives the same body hash: the signature covers the octets sent.
            let again = sender_auth::sign::sign(message, &ring, "a@example.org", 1).unwrap();
            assert_eq!(body_hash(fields), body_hash(&again), "8BITMIME offered: {}", !seven_bit);
        }
    }

    // ---- RFC 6152: 7-bit for a server without 8BITMIME; no line over 998 octets (encode) ----

    const NO_8BITMIME: &str = "250-mx.test\r\n250 PIPELINING\r\n";

    #[tokio::test]
    async fn eight_bit_body_goes_quoted_printable_to_a_server_without_8bitmime() {
        let body: &[u8] = b"Subject: t\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n.Gr\xc3\xbc\xc3\x9fe\r\n";
        let script = Script { ehlo: NO_8BITMIME, ..Script::default() };
        let (addr, server) = server(script).await;
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "a@example.org", recipients: &recipients, size: 1, eight_bit: true, dsn: None, auth_sender: None };
        let result = deliver(&settings(), "mx.test", addr, &envelope, &mut Chunks::new(&[&body[..20], &body[20..]])).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        let log = server.await.unwrap();
        assert_eq!(log.lines()[1], "MAIL FROM:<a@example.org>", "no BODY=8BITMIME to a server that does not offer it");
        let wire = log.wire_body.unwrap();
        assert!(wire.iter().all(|&b| b < 128), "{}", String::from_utf8_lossy(&wire));
        assert_eq!(
            String::from_utf8(log.body.unwrap()).unwrap(),
            "Subject: t\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\n\
             .Gr=C3=BC=C3=9Fe\r\n"
        );
        assert!(wire.windows(6).any(|w| w == b"\r\n..Gr"), "converted text is still dot-stuffed");
    }

    #[tokio::test]
    async fn eight_bit_body_unchanged_for_a_server_with_8bitmime() {
        let body: &[u8] = b"Subject: t\r\n\r\ncaf\xc3\xa9 \xff\r\n";
        let (result, log) = run(Script::default(), &settings(), &["b@example.net"], &mut Chunks::new(&[body])).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        assert_eq!(log.body.as_deref(), Some(body));
    }

    #[tokio::test]
    async fn long_lines_are_encoded_for_every_server() {
        let long = "x".repeat(5000);
        let body = format!("Subject: t\r\n\r\n{long}\r\n");
        for ehlo in [NO_8BITMIME, "250-mx.test\r\n250 8BITMIME\r\n"] {
            let script = Script { ehlo, ..Script::default() };
            let (result, log) = run(script, &settings(), &["b@example.net"], &mut Chunks::new(&[body.as_bytes()])).await;
            assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
            let got = String::from_utf8(log.body.unwrap()).unwrap();
            assert!(got.starts_with("Subject: t\r\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\n"), "{got}");
            assert!(got.lines().all(|l| l.len() <= 76), "{ehlo:?}");
            assert_eq!(got.split("\r\n\r\n").nth(1).unwrap().replace("=\r\n", ""), format!("{long}\r\n"));
        }
    }

    #[tokio::test]
    async fn unconvertible_message_ends_the_attempt_before_mail_from() {
        let body: &[u8] = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nhello\r\n";
        let script = Script { ehlo: NO_8BITMIME, ..Script::default() };
        let (result, log) = run(script, &settings(), &["b@example.net"], &mut Chunks::new(&[body])).await;
        let e = result.unwrap_err();
        assert!(matches!(&e, SessionError::Unconvertible(why) if why.contains("header")), "{e:?}");
        assert!(e.is_permanent());
        assert_eq!(log.lines(), vec!["EHLO client.test", "QUIT"]);
        // HELO only: no extensions, so no 8BITMIME either.
        let script = Script { ehlo: "502 5.5.2 what?\r\n", ..Script::default() };
        let (result, _) = run(script, &settings(), &["b@example.net"], &mut Chunks::new(&[body])).await;
        assert!(matches!(result, Err(SessionError::Unconvertible(_))), "{result:?}");
        // A server with 8BITMIME takes it as it is.
        let (result, log) = run(Script::default(), &settings(), &["b@example.net"], &mut Chunks::new(&[body])).await;
        assert_eq!(result.unwrap(), vec![RcptOutcome::Accepted]);
        assert_eq!(log.body.as_deref(), Some(body));
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let s = with_credentials(crate::trust::Trust::default());
        assert!(!format!("{s:?}").contains(PASSWORD));
    }

    #[test]
    fn bare_endings_across_chunks() {
        let mut n = BareEndings::default();
        let mut out = Vec::new();
        for chunk in [&b"a\r"[..], b"\nb\n", b"c\r", b"d\r", b"\r\n", b"\n\r"] {
            n.feed(chunk, &mut out);
        }
        n.finish(&mut out);
        assert_eq!(out, b"a\r\nb\r\nc\r\nd\r\n\r\n\r\n\r\n");
        // A bare LF dot line cannot end the message early: it becomes a stuffed dot line.
        let mut out = Vec::new();
        let mut n = BareEndings::default();
        n.feed(b"x\n.\nmore", &mut out);
        let mut stuffed = Vec::new();
        DotStuffer::default().stuff(&out, &mut stuffed);
        assert_eq!(stuffed, b"x\r\n..\r\nmore");
    }

    #[test]
    fn capabilities_from_ehlo() {
        let r = Reply::multiline(250, vec!["mx.test hello".into(), "pipelining".into(), "SIZE 1000".into(), "8BITMIME".into(), "STARTTLS".into()]);
        assert_eq!(
            Capabilities::from_ehlo(&r),
            Capabilities { pipelining: true, size: true, eight_bit_mime: true, starttls: true, ..Default::default() }
        );
        // The greeting line is not a keyword.
        let r = Reply::multiline(250, vec!["PIPELINING".into()]);
        assert_eq!(Capabilities::from_ehlo(&r), Capabilities::default());
    }

    #[test]
    fn sni_only_for_dns_names() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(matches!(server_name("mx.example.com.", ip), ServerName::DnsName(n) if n.as_ref() == "mx.example.com"));
        assert!(matches!(server_name("192.0.2.7", ip), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[192.0.2.7]", ip), ServerName::IpAddress(a) if IpAddr::from(a) == ip));
        assert!(matches!(server_name("", ip), ServerName::IpAddress(_)));
    }

    #[test]
    fn timeouts_default_to_rfc_5321() {
        let t = Timeouts::default();
        let m = |n: u64| Duration::from_secs(n * 60);
        assert_eq!((t.greeting, t.mail, t.rcpt, t.data_init, t.data_block, t.data_term), (m(5), m(5), m(5), m(2), m(3), m(10)));
        assert_eq!(ClientSettings::new("h").connect_timeout, Duration::from_secs(30));
    }

    #[test]
    fn deliver_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let s = settings();
        let recipients = rcpts(&["b@example.net"]);
        let envelope = Envelope { mail_from: "", recipients: &recipients, size: 0, eight_bit: false, dsn: None, auth_sender: None };
        let mut body = simple_body();
        let fut = deliver(&s, "h", "127.0.0.1:9".parse().unwrap(), &envelope, &mut body);
        assert_send(&fut);
        let _ = insecure_client_config();
    }
}
