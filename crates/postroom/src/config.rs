//! Postroom's configuration: typed sections read from TOML, with the documented defaults embedded
//! from `etc/postroom.toml`.
//!
//! The file comes from the administrator, but a typo must never start a server that quietly does
//! something else: every struct refuses unknown keys (toml's message names the key and its line),
//! and `validate` reports every problem at once, each naming its key. `warnings` says what is legal
//! but risky, for `postroom config check`.

use std::collections::BTreeMap;
use std::fmt::{self, Debug};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The documented default configuration, embedded: it parses to exactly `Config::default()`.
pub const DEFAULT_TOML: &str = include_str!("../../../etc/postroom.toml");

/// The origin named in messages when no configuration file was given.
pub const DEFAULT_ORIGIN: &str = "(built-in default)";

/// Keys whose feature is not built yet: `warnings` notes each one set to a non-default value.
/// `section.*` covers a whole section. Delete an entry when its feature lands.
pub const NOT_YET: &[&str] = &[];

/// The whole configuration. Field names are the TOML keys; `etc/postroom.toml` documents each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Database, certificate and quarantine directory (0700, SPEC D4).
    pub data_dir: PathBuf,
    /// This server's name in the greeting and Received headers.
    pub hostname: String,
    /// Local domains, lowercase without a trailing dot (more live in the directory).
    pub domains: Vec<String>,
    /// Where postmaster@ and double bounces go.
    pub postmaster: String,
    /// `[smtp]`: the SMTP server.
    pub smtp: SmtpConfig,
    /// `[tls]`: certificates and plaintext-password policy.
    pub tls: TlsConfig,
    /// `[pop3]`: the POP3 server.
    pub pop3: Pop3Config,
    /// `[relay]`: who may relay.
    pub relay: RelayConfig,
    /// `[delivery]`: the SMTP client.
    pub delivery: DeliveryConfig,
    /// `[dns]`: resolvers.
    pub dns: DnsConfig,
    /// `[journal]`: the i5/OS-style journal.
    pub journal: JournalConfig,
    /// `[storage]`: disk use.
    pub storage: StorageConfig,
    /// `[log]`: tracing output.
    pub log: LogConfig,
    /// `[penalty]`: the temporary deny list (R9, A5).
    pub penalty: PenaltyConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[auth]`: SPF, DKIM and DMARC checks of inbound mail (E1).
    pub auth: SenderAuthConfig,
    /// `[greylist]`: greylisting on the MX listener (issue 21).
    pub greylist: GreylistConfig,
    /// `[milter]`: content filters speaking the milter protocol (issue 21).
    pub milter: MilterConfig,
    /// `[ldap]`: the address book (O5).
    pub ldap: LdapConfig,
    /// `[admin]`: the web console (E6, issue 19).
    pub admin: AdminConfig,
    /// Where these values came from (a file name or `DEFAULT_ORIGIN`); not a key.
    #[serde(skip)]
    pub origin: String,
}

/// `[smtp]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// MX-style listeners (STARTTLS offered).
    pub listen: Vec<SocketAddr>,
    /// Submission listeners (AUTH required).
    pub submission_listen: Vec<SocketAddr>,
    /// Implicit-TLS submission listeners (AUTH required).
    pub tls_listen: Vec<SocketAddr>,
    /// Bytes.
    pub max_message_size: u64,
    /// Recipients per message.
    pub max_recipients: usize,
    /// Concurrent sessions on `listen` (the MX listener) in total.
    pub max_sessions: usize,
    /// Concurrent sessions on `listen` per client IP.
    pub max_sessions_per_ip: usize,
    /// Concurrent sessions on `submission_listen` and `tls_listen` together, in total.
    pub submission_max_sessions: usize,
    /// The same per client IP.
    pub submission_max_sessions_per_ip: usize,
    /// Concurrent sessions on the local socket of `postroom sendmail`.
    pub local_max_sessions: usize,
    /// The local submission socket of `postroom sendmail` / `send` (F6, A4), in a directory
    /// every local user may enter; empty = `<data_dir>-sock/sendmail.sock` (see `local_socket()`).
    pub local_socket: PathBuf,
    /// The domain of a local user's envelope sender without -f, and of a bare recipient name;
    /// empty = the first of `domains` (see `local_sender_domain()`).
    pub local_sender_domain: String,
    /// Deadline from the greeting to HELO/EHLO.
    pub greeting_timeout_secs: u64,
    /// Deadline for one command line.
    pub command_timeout_secs: u64,
    /// Total deadline for DATA.
    pub data_timeout_secs: u64,
    /// A session's lifetime; past it, 421 at the next command boundary.
    pub max_session_secs: u64,
    /// Errors before 421 and close.
    pub max_errors: usize,
    /// VRFY answered (252) or refused (502).
    pub vrfy: bool,
    /// Bare LF accepted as a line ending inside DATA.
    pub allow_bare_lf: bool,
    /// user%remote@local relayed.
    pub percent_routing: bool,
    /// Received headers allowed before 554 5.4.6.
    pub max_hops: usize,
    /// HELO/EHLO name check.
    pub helo_verify: HeloVerify,
    /// AUTH requirement on `listen`.
    pub auth: AuthMode,
    /// MAIL FROM must belong to the authenticated user.
    pub verify_from_user: VerifyFromUser,
    /// Offer delivery status notifications (RFC 3461).
    pub dsn: bool,
}

/// `[tls]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; empty = self-signed, generated into data_dir.
    pub cert: PathBuf,
    /// PEM private key; set together with `cert`.
    pub key: PathBuf,
    /// Passwords without TLS.
    pub allow_plaintext_auth: PlaintextAuth,
    /// Deadline for a TLS handshake.
    pub handshake_timeout_secs: u64,
    /// `[tls.acme]`: a trusted certificate from an ACME server.
    pub acme: AcmeConfig,
}

/// `[tls.acme]`: certificates from an ACME server (RFC 8555, SPEC O6), proved with HTTP-01.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME server's directory URL; empty = ACME off.
    pub directory: String,
    /// `mailto:` addresses the ACME server may write to about the account.
    pub contact: Vec<String>,
    /// DNS names for the certificate; empty = `[hostname]` (see `Config::acme_names`).
    pub names: Vec<String>,
    /// Where the HTTP-01 responder listens (port 80 as the ACME server sees it).
    pub http_listen: Vec<SocketAddr>,
    /// Renew when fewer than this many days of validity are left.
    pub renew_days: u32,
    /// PEM CA certificate for the ACME server's own HTTPS; empty = the system's trusted ones.
    pub ca_file: PathBuf,
    /// Seconds between checks (and the longest wait between retries).
    pub check_secs: u64,
}

impl AcmeConfig {
    pub fn enabled(&self) -> bool {
        !self.directory.is_empty()
    }
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            directory: String::new(),
            contact: Vec::new(),
            names: Vec::new(),
            http_listen: Vec::new(),
            renew_days: 30,
            ca_file: PathBuf::new(),
            check_secs: 43_200,
        }
    }
}

/// `[pop3]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pop3Config {
    /// Plain listeners (STLS offered).
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listeners.
    pub tls_listen: Vec<SocketAddr>,
    /// Which of the two run.
    pub socket_layer: SocketLayer,
    /// Seconds of silence before the session is closed.
    pub inactivity_timeout_secs: u64,
    /// Concurrent sessions in total.
    pub max_sessions: usize,
    /// Concurrent sessions per client IP.
    pub max_sessions_per_ip: usize,
}

/// `[relay]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Relay mode (i5/OS ALWRLY).
    pub mode: RelayMode,
    /// POP-before-SMTP window in minutes; 0 = off.
    pub pop_minutes: u32,
    /// POP-logged-in clients pass the reject list and RBLs (OVERRJTCNN).
    pub override_reject_connect: bool,
}

/// `[delivery]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// "host[:port]" all non-local mail goes through; empty = unset.
    pub mail_router: String,
    /// Port used to reach MX hosts.
    pub remote_port: u16,
    /// Host name (lowercase) → IP address, consulted before DNS.
    pub host_table: BTreeMap<String, String>,
    /// Source IP address for outbound connections; empty = unset.
    pub bind_address: String,
    /// Hours before undelivered mail bounces.
    pub queue_lifetime_hours: u64,
    /// Domains held until their server issues ETRN (lowercase).
    pub etrn_domains: Vec<String>,
    /// Who may issue ETRN for them (C7).
    pub etrn_clients: EtrnClients,
    /// First-level retries (C3, i5/OS QTMSRTQ1): how many, and seconds between them.
    pub first_retry_count: u32,
    pub first_retry_interval_secs: u64,
    /// Second-level retries (QTMSRTQ2) after the first level is used up.
    pub second_retry_count: u32,
    pub second_retry_interval_secs: u64,
    /// Outbound connections in total and per destination domain (C6).
    pub max_connections: usize,
    pub max_connections_per_domain: usize,
    /// Issue 17: seconds a connection waits after a message for another one to the same next
    /// hop (0: only what already waits), and messages one connection carries at most.
    pub connection_reuse_secs: u64,
    pub connection_reuse_limit: usize,
    /// Opportunistic STARTTLS to remote hosts (C5).
    pub starttls: bool,
    /// Reply-To of delivery reports: the DSN responsible person (C4); empty = none.
    pub dsn_responsible_person: String,
    /// Seconds a recipient may wait before a "delayed" report goes to the sender (C4).
    pub delay_warning_secs: u64,
    /// The send scheduler (C7): every this many seconds, held ETRN mail is sent; 0 = off.
    pub send_interval_secs: u64,
    /// "host:port" to send ETRN to when the scheduler runs; empty = none.
    pub etrn_upstream: String,
    /// Domains named in that ETRN.
    pub etrn_upstream_domains: Vec<String>,
}

/// `[dns]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Resolvers; empty = the system's.
    pub servers: Vec<SocketAddr>,
}

/// `[journal]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// Journal written at all.
    pub enabled: bool,
    /// Days entries are kept.
    pub retention_days: u32,
}

/// `[penalty]`: one penalty box for hack auto-deny (R9) and, later, failed logins (A5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PenaltyConfig {
    /// Minutes a client address (or, on relay-listed networks, a user) stays denied; 0
    /// switches the hack auto-deny (R9) off (failed logins then cool down for the login window).
    pub deny_minutes: u64,
    /// Failed logins (SMTP AUTH and POP3) within the window that start the cool-down (A5).
    pub login_failures: u32,
    /// Minutes over which failed logins are counted.
    pub login_window_minutes: u64,
}

impl Default for PenaltyConfig {
    fn default() -> Self {
        PenaltyConfig { deny_minutes: 10, login_failures: 5, login_window_minutes: 15 }
    }
}

/// `[auth]`: sender authentication of mail arriving on the MX listener (SPEC E1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SenderAuthConfig {
    /// SPF, DKIM and DMARC on the MX listener, for clients that are not the office's own.
    pub checks: bool,
    /// What a DMARC fail leads to.
    pub dmarc: DmarcAction,
    /// Refuse an SPF `fail` at MAIL FROM (550 5.7.23).
    pub spf_refuse_fail: bool,
}

impl Default for SenderAuthConfig {
    fn default() -> Self {
        SenderAuthConfig { checks: true, dmarc: DmarcAction::Enforce, spf_refuse_fail: false }
    }
}

/// `auth.dmarc` (E1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DmarcAction {
    /// p=reject: 550 5.7.1; p=quarantine: into the quarantine.
    Enforce,
    /// Only the Authentication-Results header.
    Record,
}

/// `[greylist]`: greylisting of mail arriving on the MX listener (issue 21, postgrey's behaviour).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GreylistConfig {
    /// Greylisting on.
    pub enabled: bool,
    /// Seconds after its first attempt a triplet's retry is accepted.
    pub delay_secs: u64,
    /// Hours after its first attempt a retry still counts as one.
    pub retry_window_hours: u64,
    /// Days a passed triplet or auto-allowed client is remembered since it was last seen.
    pub max_age_days: u64,
    /// Passed triplets after which a client network is no longer greylisted; 0 = never.
    pub auto_allow_after: u32,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        GreylistConfig { enabled: false, delay_secs: 300, retry_window_hours: 48, max_age_days: 35, auto_allow_after: 5 }
    }
}

/// `[milter]`: milters (Postfix's smtpd_milters), run in order at the end of DATA (issue 21).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MilterConfig {
    /// The milters that may be used.
    pub servers: Vec<MilterServer>,
    /// Names of the milters the MX listener runs, in order.
    pub mx: Vec<String>,
    /// Names of the milters the submission listeners (and the local socket) run, in order.
    pub submission: Vec<String>,
}

/// One entry of `milter.servers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MilterServer {
    pub name: String,
    /// "127.0.0.1:8891" (loopback only) or "unix:/absolute/path".
    pub address: String,
    /// Seconds for the connect and for each reply (a PROGRESS restarts it).
    #[serde(default = "milter_timeout")]
    pub timeout_secs: u64,
    /// What an unreachable, silent or broken milter means.
    #[serde(default)]
    pub default_action: MilterDefault,
}

fn milter_timeout() -> u64 {
    30
}

/// `milter.servers[].default_action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MilterDefault {
    /// 451 4.7.1, as Postfix.
    #[default]
    Tempfail,
    /// Take the message as if the milter had accepted it.
    Accept,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// "address:port" where `GET /metrics` is served in the Prometheus text format; empty = off.
    pub listen: String,
}

/// `[ldap]`: the read-only address book of the users (SPEC O5, issue 18); off while both
/// listen lists are empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LdapConfig {
    /// LDAP listeners; StartTLS offered (a bind needs it).
    pub listen: Vec<SocketAddr>,
    /// LDAPS (implicit TLS) listeners.
    pub tls_listen: Vec<SocketAddr>,
    /// Networks (CIDR, or one address) whose clients may search without binding.
    pub anonymous_networks: Vec<String>,
    /// Entries per search at most.
    pub size_limit: usize,
    /// Concurrent LDAP sessions in total.
    pub max_sessions: usize,
    /// Seconds of silence before a session is closed.
    pub inactivity_timeout_secs: u64,
}

/// `[admin]`: the administrator's web console (SPEC E6, issue 19); off while `listen` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Console listeners.
    pub listen: Vec<SocketAddr>,
    /// HTTPS with the `[tls]` certificate; false (plain HTTP) is allowed on loopback only.
    pub https: bool,
    /// Minutes a console session may stay idle before its administrator logs in again.
    pub session_minutes: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: Vec::new(), https: true, session_minutes: 30 }
    }
}

/// `[storage]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// MiB of free disk below which new mail waits (452); 0 = no threshold.
    pub min_free_mb: u64,
    /// KiB per stored body chunk.
    pub body_chunk_kib: u32,
    /// Bytes of a message the filters parse (F3); beyond them only MIME headers are walked.
    pub filter_max_bytes: usize,
    /// A message the filters could not inspect completely while an attachment or MIME-type
    /// filter is active (F3: filters fail closed by default).
    pub filter_unscannable: Unscannable,
}

/// `delivery.etrn_clients` (C7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EtrnClients {
    /// Any client (ETRN only releases mail to the domain's own MX).
    Any,
    /// Only clients that may relay (relay-listed or authenticated).
    Relay,
}

/// `storage.filter_unscannable` (F3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unscannable {
    /// Quarantine it (the journal says why).
    Keep,
    /// Deliver it as if no filter matched.
    Deliver,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Tracing filter: a level, optionally with `target=level` directives.
    pub level: String,
}

/// `smtp.helo_verify` (SPEC R10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeloVerify {
    Off,
    Log,
    Reject,
}

/// `smtp.auth` (SPEC A2, i5/OS ALWAUTH).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    None,
    LocalAndRelay,
    Relay,
}

/// `smtp.verify_from_user` (SPEC A3, i5/OS VFYFROMUSR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyFromUser {
    Off,
    All,
    NotOnAcceptList,
}

/// `tls.allow_plaintext_auth` (SPEC A1, P2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlaintextAuth {
    Never,
    Loopback,
}

/// `pop3.socket_layer` (SPEC P2, i5/OS ALWSSL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SocketLayer {
    Secure,
    Nonsecure,
    Both,
}

/// `relay.mode` (SPEC R1, i5/OS ALWRLY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayMode {
    All,
    None,
    Near,
    List,
    Both,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Human,
    Json,
}

/// One listening address, named as in `data_dir/listening` and by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// "smtp", "submission", "smtps", "pop3", "pop3s", "ldap", "ldaps" or "admin".
    pub name: &'static str,
    /// The key it came from, e.g. "smtp.listen".
    pub key: &'static str,
    /// The address to bind.
    pub addr: SocketAddr,
}

/// Configuration problems, each naming its key; reported all at once.
#[derive(Debug)]
pub struct ConfigError {
    /// The file (or `DEFAULT_ORIGIN`) the problems are in.
    pub origin: String,
    /// One entry per problem, e.g. `relay.pop_minutes = 5: must be 0 (off) or 15..65535`.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            let sep = if i == 0 { "" } else { "\n" };
            write!(f, "{sep}{}: {problem}", self.origin)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(origin: &str, problem: String) -> Self {
        ConfigError { origin: origin.to_owned(), problems: vec![problem] }
    }
}

// The defaults below must equal etc/postroom.toml; the tests hold the two together.
impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: "postroom-data".into(),
            hostname: "mail.example.test".into(),
            domains: vec!["example.test".into()],
            postmaster: "admin@example.test".into(),
            smtp: SmtpConfig::default(),
            tls: TlsConfig::default(),
            pop3: Pop3Config::default(),
            relay: RelayConfig::default(),
            delivery: DeliveryConfig::default(),
            dns: DnsConfig::default(),
            journal: JournalConfig::default(),
            storage: StorageConfig::default(),
            log: LogConfig::default(),
            penalty: PenaltyConfig::default(),
            metrics: MetricsConfig::default(),
            auth: SenderAuthConfig::default(),
            greylist: GreylistConfig::default(),
            milter: MilterConfig::default(),
            ldap: LdapConfig::default(),
            admin: AdminConfig::default(),
            origin: DEFAULT_ORIGIN.into(),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![loopback(2525)],
            submission_listen: vec![loopback(2587)],
            tls_listen: vec![loopback(2465)],
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 100,
            // S4: one pool per service (etc/postroom.toml explains). A session costs a task, a
            // socket and tens of KiB (about 16 KiB resident when idle, up to its 64 KiB read buffer
            // when busy), so these sizes are cheap; the MX pool is the largest because it serves
            // the whole Internet, submission only our own users in short sessions, the local
            // socket only scripts on this host.
            max_sessions: 200,
            max_sessions_per_ip: 20,
            submission_max_sessions: 100,
            submission_max_sessions_per_ip: 10,
            local_max_sessions: 50,
            local_socket: PathBuf::new(),
            local_sender_domain: String::new(),
            greeting_timeout_secs: 30,
            command_timeout_secs: 300,
            data_timeout_secs: 600,
            max_session_secs: 1800,
            max_errors: 20,
            vrfy: true,
            allow_bare_lf: false,
            percent_routing: false,
            max_hops: 100,
            helo_verify: HeloVerify::Off,
            auth: AuthMode::None,
            verify_from_user: VerifyFromUser::Off,
            dsn: true,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            allow_plaintext_auth: PlaintextAuth::Loopback,
            handshake_timeout_secs: 30,
            acme: AcmeConfig::default(),
        }
    }
}

impl Default for Pop3Config {
    fn default() -> Self {
        Pop3Config {
            listen: vec![loopback(1110)],
            tls_listen: vec![loopback(1995)],
            socket_layer: SocketLayer::Both,
            inactivity_timeout_secs: 600,
            max_sessions: 200,
            max_sessions_per_ip: 20,
        }
    }
}

impl Default for LdapConfig {
    fn default() -> Self {
        LdapConfig {
            listen: Vec::new(),
            tls_listen: Vec::new(),
            anonymous_networks: Vec::new(),
            size_limit: 500,
            max_sessions: 50,
            inactivity_timeout_secs: 300,
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig { mode: RelayMode::None, pop_minutes: 0, override_reject_connect: false }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            mail_router: String::new(),
            remote_port: 25,
            host_table: BTreeMap::new(),
            bind_address: String::new(),
            queue_lifetime_hours: 120,
            etrn_domains: Vec::new(),
            etrn_clients: EtrnClients::Any,
            first_retry_count: 3,
            first_retry_interval_secs: 300,
            second_retry_count: 6,
            second_retry_interval_secs: 3600,
            max_connections: 20,
            max_connections_per_domain: 5,
            connection_reuse_secs: 2,
            connection_reuse_limit: 100,
            starttls: true,
            dsn_responsible_person: String::new(),
            delay_warning_secs: 14_400,
            send_interval_secs: 0,
            etrn_upstream: String::new(),
            etrn_upstream_domains: Vec::new(),
        }
    }
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig { enabled: true, retention_days: 30 }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { min_free_mb: 512, body_chunk_kib: 256, filter_max_bytes: 10 * 1024 * 1024, filter_unscannable: Unscannable::Keep }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Human, level: "info".into() }
    }
}

/// A network of `ldap.anonymous_networks`: CIDR, or one address (a /32 or /128).
pub fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    let t = text.trim();
    t.parse::<ipnet::IpNet>().ok().or_else(|| t.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Config {
    /// Parses TOML text; `origin` names the file in messages. Missing keys take the defaults.
    /// A wrong type or an unknown key is refused with toml's message, which shows the key's line.
    /// Domain names are lowercased and lose a trailing dot. Does not validate.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::one(origin, e.to_string().trim_end().to_owned()))?;
        config.origin = origin.to_owned();
        for d in config.domains.iter_mut().chain(&mut config.delivery.etrn_domains).chain(&mut config.tls.acme.names) {
            *d = normalize_domain(d);
        }
        config.smtp.local_sender_domain = normalize_domain(&config.smtp.local_sender_domain);
        let table = std::mem::take(&mut config.delivery.host_table);
        config.delivery.host_table = table.into_iter().map(|(h, ip)| (normalize_domain(&h), ip)).collect();
        Ok(config)
    }

    /// Reads `path` (the caller resolves `--config` / `POSTROOM_CONFIG`) or, without one, the
    /// embedded default; then `data_dir_override` (`--data-dir` / `POSTROOM_DATA`) wins; then
    /// validates. Environment variables are left to the caller (clap's `env`) so this stays pure.
    pub fn load(path: Option<&Path>, data_dir_override: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let origin = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::one(&origin, format!("cannot read: {e}")))?;
                Config::parse(&text, &origin)?
            }
            None => Config::parse(DEFAULT_TOML, DEFAULT_ORIGIN)?,
        };
        if let Some(dir) = data_dir_override {
            config.data_dir = dir.to_owned();
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule and reports all problems at once, each as `key = value: rule`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut need = |ok: bool, key: &str, value: &dyn Debug, rule: &str| {
            if !ok {
                problems.push(format!("{key} = {value:?}: {rule}"));
            }
        };
        let (smtp, pop3, delivery, tls) = (&self.smtp, &self.pop3, &self.delivery, &self.tls);

        let dir = &self.data_dir;
        need(!dir.as_os_str().is_empty(), "data_dir", dir, "must not be empty");
        // effective_toml must be able to write it back.
        need(dir.to_str().is_some(), "data_dir", dir, "must be valid UTF-8");
        let names = [("hostname", &self.hostname)]
            .into_iter()
            .chain(Some(("smtp.local_sender_domain", &smtp.local_sender_domain)).filter(|(_, d)| !d.is_empty()))
            .chain(self.domains.iter().map(|d| ("domains", d)))
            .chain(delivery.etrn_domains.iter().map(|d| ("delivery.etrn_domains", d)))
            .chain(delivery.host_table.keys().map(|h| ("delivery.host_table", h)));
        for (key, name) in names {
            let rule = "not a domain name (letters, digits, hyphens; labels of 1..63 between dots)";
            need(is_domain_name(name), key, name, rule);
        }
        let ips = [("delivery.bind_address", &delivery.bind_address)]
            .into_iter()
            .filter(|(_, ip)| !ip.is_empty())
            .chain(delivery.host_table.values().map(|ip| ("delivery.host_table", ip)));
        for (key, ip) in ips {
            need(ip.parse::<IpAddr>().is_ok(), key, ip, "must be an IP address");
        }
        let postmaster = &self.postmaster;
        need(is_address(postmaster), "postmaster", postmaster, "must be local@domain");
        let socket = &smtp.local_socket;
        need(socket.to_str().is_some(), "smtp.local_socket", socket, "must be valid UTF-8");
        let derivable = !socket.as_os_str().is_empty() || dir.as_os_str().is_empty() || default_socket_dir(dir).is_some();
        need(derivable, "smtp.local_socket", socket, "must be set: data_dir has no name to put the socket directory beside");
        let socket = self.local_socket();
        need(socket.file_name().is_some(), "smtp.local_socket", &socket, "must name a socket file (a path such as /run/postroom/sendmail.sock)");
        // The kernel keeps a socket's path in 108 bytes (sun_path), ending NUL included.
        let len = socket.as_os_str().len();
        need(len < 108, "smtp.local_socket", &socket, "is too long for a Unix socket (at most 107 bytes): set a shorter path");

        let at_least_one = [
            ("smtp.max_recipients", smtp.max_recipients as u64),
            ("smtp.max_sessions", smtp.max_sessions as u64),
            ("smtp.submission_max_sessions", smtp.submission_max_sessions as u64),
            ("smtp.local_max_sessions", smtp.local_max_sessions as u64),
            ("smtp.greeting_timeout_secs", smtp.greeting_timeout_secs),
            ("smtp.command_timeout_secs", smtp.command_timeout_secs),
            ("smtp.data_timeout_secs", smtp.data_timeout_secs),
            ("smtp.max_session_secs", smtp.max_session_secs),
            ("smtp.max_errors", smtp.max_errors as u64),
            ("smtp.max_hops", smtp.max_hops as u64),
            ("tls.handshake_timeout_secs", tls.handshake_timeout_secs),
            ("pop3.inactivity_timeout_secs", pop3.inactivity_timeout_secs),
            ("pop3.max_sessions", pop3.max_sessions as u64),
            ("delivery.remote_port", delivery.remote_port.into()),
            ("delivery.queue_lifetime_hours", delivery.queue_lifetime_hours),
            ("delivery.first_retry_interval_secs", delivery.first_retry_interval_secs),
            ("delivery.second_retry_interval_secs", delivery.second_retry_interval_secs),
            ("delivery.max_connections", delivery.max_connections as u64),
            ("delivery.max_connections_per_domain", delivery.max_connections_per_domain as u64),
            ("delivery.connection_reuse_limit", delivery.connection_reuse_limit as u64),
            ("journal.retention_days", self.journal.retention_days.into()),
            ("storage.body_chunk_kib", self.storage.body_chunk_kib.into()),
            ("penalty.login_failures", self.penalty.login_failures.into()),
            ("penalty.login_window_minutes", self.penalty.login_window_minutes),
            ("ldap.size_limit", self.ldap.size_limit as u64),
            ("ldap.max_sessions", self.ldap.max_sessions as u64),
            ("ldap.inactivity_timeout_secs", self.ldap.inactivity_timeout_secs),
            ("admin.session_minutes", self.admin.session_minutes),
        ];
        for (key, value) in at_least_one {
            need(value >= 1, key, &value, "must be at least 1");
        }
        let per_ip_limits = [
            ("smtp.max_sessions", smtp.max_sessions, smtp.max_sessions_per_ip),
            ("smtp.submission_max_sessions", smtp.submission_max_sessions, smtp.submission_max_sessions_per_ip),
            ("pop3.max_sessions", pop3.max_sessions, pop3.max_sessions_per_ip),
        ];
        for (total_key, max, per_ip) in per_ip_limits {
            let (key, rule) = (format!("{total_key}_per_ip"), format!("must be 1..{total_key} ({max})"));
            need((1..=max.max(1)).contains(&per_ip), &key, &per_ip, &rule);
        }
        let reuse = delivery.connection_reuse_secs;
        need(reuse <= 60, "delivery.connection_reuse_secs", &reuse, "must be at most 60 (an idle connection holds a connection slot)");
        let size = smtp.max_message_size;
        need(size >= 1024, "smtp.max_message_size", &size, "must be at least 1024 (bytes)");
        let chunk = self.storage.body_chunk_kib;
        need(chunk <= 65536, "storage.body_chunk_kib", &chunk, "must be at most 65536 (64 MiB)");
        // i5/OS accepts 15..65535 minutes for the POP relay window.
        let pop = self.relay.pop_minutes;
        let pop_ok = pop == 0 || (15..=65535).contains(&pop);
        need(pop_ok, "relay.pop_minutes", &pop, "must be 0 (off) or 15..65535");
        // Issue 21: small delays are allowed (tests wait 2 s); a retry window shorter than the
        // delay would greylist every retry for ever.
        let grey = &self.greylist;
        need((1..=86_400).contains(&grey.delay_secs), "greylist.delay_secs", &grey.delay_secs, "must be 1..86400 (a day)");
        let window_ok = (1..=720).contains(&grey.retry_window_hours) && grey.retry_window_hours * 3600 > grey.delay_secs;
        let rule = "must be 1..720 (30 days) and longer than greylist.delay_secs";
        need(window_ok, "greylist.retry_window_hours", &grey.retry_window_hours, rule);
        let max_age_ok = (1..=3650).contains(&grey.max_age_days) && grey.max_age_days * 24 >= grey.retry_window_hours;
        let rule = "must be 1..3650 and at least greylist.retry_window_hours";
        need(max_age_ok, "greylist.max_age_days", &grey.max_age_days, rule);
        let pair_ok = tls.cert.as_os_str().is_empty() == tls.key.as_os_str().is_empty();
        need(pair_ok, "tls.cert", &tls.cert, "tls.cert and tls.key must both be set or both be empty");
        let router = &delivery.mail_router;
        let router_ok = router.is_empty() || is_host_port(router);
        need(router_ok, "delivery.mail_router", router, "must be host[:port]");
        for server in &self.dns.servers {
            need(server.port() != 0, "dns.servers", server, "needs a port, e.g. 53");
        }
        for net in &self.ldap.anonymous_networks {
            need(parse_network(net).is_some(), "ldap.anonymous_networks", net, "must be a network such as \"192.168.1.0/24\" or one address");
        }
        let ldap_on = !self.ldap.listen.is_empty() || !self.ldap.tls_listen.is_empty();
        let rule = "the address book's base DN is made from the first local domain: list one in `domains`";
        need(!ldap_on || !self.domains.is_empty(), "domains", &self.domains, rule);
        // E6: an administrator's password and session cookie never cross a network in clear text.
        for addr in self.admin.listen.iter().filter(|a| !self.admin.https && !a.ip().is_loopback()) {
            let rule = "admin.https = false serves plain HTTP, allowed on a loopback address only: set https = true";
            need(false, "admin.listen", addr, rule);
        }
        let minutes = self.admin.session_minutes;
        need(minutes <= 24 * 60, "admin.session_minutes", &minutes, "must be at most 1440 (a day)");
        let level = &self.log.level;
        let rule = "must be off, error, warn, info, debug or trace, optionally with target=level directives";
        need(is_log_filter(level), "log.level", level, rule);

        let listeners = self.listeners();
        let metrics = &self.metrics.listen;
        match metrics.parse::<SocketAddr>() {
            Ok(m) => {
                if let Some(b) = listeners.iter().find(|b| overlaps(m, b.addr)) {
                    problems.push(format!("metrics.listen = {m}: already taken by {} = {}", b.key, b.addr));
                }
            }
            Err(_) if metrics.is_empty() => {}
            Err(_) => problems.push(format!("metrics.listen = {metrics:?}: must be empty (off) or address:port, e.g. \"127.0.0.1:9425\"")),
        }
        problems.extend(self.acme_problems(&listeners));
        problems.extend(self.milter_problems());
        if listeners.is_empty() {
            problems.push(
                "no listener at all: smtp.listen, smtp.submission_listen, smtp.tls_listen, \
                 pop3.listen and pop3.tls_listen are all empty"
                    .into(),
            );
        }
        for (i, a) in listeners.iter().enumerate() {
            if let Some(b) = listeners[..i].iter().find(|b| overlaps(a.addr, b.addr)) {
                let (a_key, a_addr, b_key, b_addr) = (a.key, a.addr, b.key, b.addr);
                problems.push(format!("{a_key} = {a_addr}: already taken by {b_key} = {b_addr}"));
            }
        }

        if problems.is_empty() {
            return Ok(());
        }
        Err(ConfigError { origin: self.origin.clone(), problems })
    }

    /// `[milter]` (issue 21): names unique and known, addresses on loopback or a Unix socket.
    fn milter_problems(&self) -> Vec<String> {
        let m = &self.milter;
        let mut problems = Vec::new();
        for (i, server) in m.servers.iter().enumerate() {
            let name = &server.name;
            let name_ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !name_ok {
                problems.push(format!("milter.servers.name = {name:?}: must be letters, digits, '-' or '_'"));
            }
            if m.servers[..i].iter().any(|o| o.name == *name) {
                problems.push(format!("milter.servers.name = {name:?}: more than one milter has this name"));
            }
            let address = &server.address;
            match milter::client::Address::parse(address) {
                Some(milter::client::Address::Tcp(a)) if !a.ip().is_loopback() => problems.push(format!(
                    "milter.servers.address = {address:?}: must be on a loopback address (the protocol has no encryption nor authentication)"
                )),
                Some(_) => {}
                None => problems
                    .push(format!("milter.servers.address = {address:?}: must be \"127.0.0.1:PORT\", \"[::1]:PORT\" or \"unix:/absolute/path\"")),
            }
            let t = server.timeout_secs;
            if !(1..=3600).contains(&t) {
                problems.push(format!("milter.servers.timeout_secs = {t:?}: must be 1..3600 (milter {name})"));
            }
        }
        for (key, names) in [("milter.mx", &m.mx), ("milter.submission", &m.submission)] {
            for (i, name) in names.iter().enumerate() {
                if !m.servers.iter().any(|s| s.name == *name) {
                    problems.push(format!("{key} = {names:?}: no milter named {name:?} in milter.servers"));
                }
                if names[..i].contains(name) {
                    problems.push(format!("{key} = {names:?}: {name:?} is listed twice"));
                }
            }
        }
        problems
    }

    /// `[tls.acme]` (O6): checked only when `directory` turns it on.
    fn acme_problems(&self, listeners: &[Listener]) -> Vec<String> {
        let acme = &self.tls.acme;
        if !acme.enabled() {
            return Vec::new();
        }
        let mut problems = Vec::new();
        let mut need = |ok: bool, key: &str, value: &dyn Debug, rule: &str| {
            if !ok {
                problems.push(format!("tls.acme.{key} = {value:?}: {rule}"));
            }
        };
        // RFC 8555 §6.1: ACME runs over HTTPS only.
        let host = acme.directory.strip_prefix("https://").map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
        let rule = "must be the https:// URL of the ACME server's directory, e.g. \"https://acme-v02.api.letsencrypt.org/directory\"";
        need(host.is_some_and(|h| !h.is_empty() && !h.contains(char::is_whitespace)), "directory", &acme.directory, rule);
        for contact in &acme.contact {
            let ok = contact.strip_prefix("mailto:").is_some_and(is_address);
            need(ok, "contact", contact, "must be mailto:local@domain");
        }
        for name in &self.acme_names() {
            // HTTP-01 proves one host name at a time: no wildcards, no addresses.
            need(is_domain_name(name), "names", name, "not a domain name (HTTP-01 cannot prove wildcards or addresses)");
        }
        let http = &acme.http_listen;
        need(
            !http.is_empty(),
            "http_listen",
            http,
            "must name at least one address:port: the ACME server checks port 80 of each name (e.g. \"[::]:80\")",
        );
        let metrics = self.metrics.listen.parse::<SocketAddr>().ok();
        for (i, &addr) in http.iter().enumerate() {
            let taken = listeners
                .iter()
                .map(|l| (l.key, l.addr))
                .chain(metrics.map(|m| ("metrics.listen", m)))
                .chain(http[..i].iter().map(|&h| ("tls.acme.http_listen", h)));
            if let Some((key, other)) = taken.into_iter().find(|&(_, other)| overlaps(addr, other)) {
                need(false, "http_listen", &addr, &format!("already taken by {key} = {other}"));
            }
        }
        let (renew, check, ca) = (acme.renew_days, acme.check_secs, &acme.ca_file);
        need(renew >= 1, "renew_days", &renew, "must be at least 1");
        need(check >= 1, "check_secs", &check, "must be at least 1");
        need(ca.to_str().is_some(), "ca_file", ca, "must be valid UTF-8");
        problems
    }

    /// The names the ACME certificate carries: `tls.acme.names`, or the host name.
    pub fn acme_names(&self) -> Vec<String> {
        if self.tls.acme.names.is_empty() { vec![self.hostname.to_ascii_lowercase()] } else { self.tls.acme.names.clone() }
    }

    /// Legal but risky settings, and keys (see `NOT_YET`) that have no effect yet, for `config check`.
    pub fn warnings(&self) -> Vec<String> {
        let (smtp, pop3, relay) = (&self.smtp, &self.pop3, &self.relay);
        let (rcpts, command, idle) = (smtp.max_recipients, smtp.command_timeout_secs, pop3.inactivity_timeout_secs);
        let metrics_exposed = self.metrics.listen.parse::<SocketAddr>().is_ok_and(|a| !a.ip().is_loopback());
        let risky = [
            (
                metrics_exposed,
                format!(
                    "metrics.listen = {:?} is not a loopback address: /metrics has no authentication, so anyone who \
                     reaches it reads the server's counters; prefer 127.0.0.1 (or a firewall)",
                    self.metrics.listen
                ),
            ),
            (
                relay.mode == RelayMode::All,
                "OPEN RELAY: relay.mode = \"all\" lets anyone on the Internet send mail anywhere \
                 through this server; it will be abused and blocklisted within hours. Use \"none\" or \
                 \"list\", and AUTH on submission for your own users (SPEC R1)"
                    .to_owned(),
            ),
            (
                smtp.auth == AuthMode::LocalAndRelay && !smtp.listen.is_empty(),
                "smtp.auth = \"local-and-relay\" demands AUTH on smtp.listen, the MX port: mail from the \
                 Internet to local users will be refused. Submission always requires AUTH (SPEC A2)"
                    .to_owned(),
            ),
            (rcpts < 100, format!("smtp.max_recipients = {rcpts}: RFC 5321 §4.5.3.1.8 asks for 100 or more")),
            (command < 300, format!("smtp.command_timeout_secs = {command}: RFC 5321 §4.5.3.2.7 asks for at least 300")),
            (idle < 600, format!("pop3.inactivity_timeout_secs = {idle}: RFC 1939 §3 asks for at least 600")),
            (smtp.percent_routing, "smtp.percent_routing = true relays user%remote@local, a classic relay trick (SPEC R7)".into()),
            (
                relay.override_reject_connect && relay.pop_minutes == 0,
                "relay.override_reject_connect = true does nothing while relay.pop_minutes = 0".into(),
            ),
            (!self.hostname.contains('.'), format!("hostname = {:?} is not fully qualified; servers may refuse its EHLO", self.hostname)),
            (
                pop3.socket_layer == SocketLayer::Secure && !pop3.listen.is_empty(),
                "pop3.listen is unused: pop3.socket_layer = \"secure\" runs only pop3.tls_listen".into(),
            ),
            (
                pop3.socket_layer == SocketLayer::Nonsecure && !pop3.tls_listen.is_empty(),
                "pop3.tls_listen is unused: pop3.socket_layer = \"nonsecure\" runs only pop3.listen".into(),
            ),
        ];
        let mut warnings: Vec<String> = risky.into_iter().filter_map(|(bad, text)| bad.then_some(text)).collect();

        let defaults = Config::default().key_values();
        for (key, value) in self.key_values() {
            let not_yet = NOT_YET.iter().any(|p| p.strip_suffix('*').map_or(*p == key, |s| key.starts_with(s)));
            if not_yet && defaults.get(&key) != Some(&value) {
                warnings.push(format!("{key} = {value} has no effect yet: this version does not implement it"));
            }
        }
        warnings
    }

    /// The local submission socket (F6, A4): `smtp.local_socket`, or by default `sendmail.sock`
    /// in `<data_dir>-sock`, a directory beside the data directory (which is 0700: no other user
    /// could reach a socket inside it) that `serve` creates 0755, so every local user can reach
    /// the socket; the kernel tells the server who connected. `serve` and `sendmail` both read it
    /// from here, so `--data-dir` moves both alike.
    pub fn local_socket(&self) -> PathBuf {
        if !self.smtp.local_socket.as_os_str().is_empty() {
            return self.smtp.local_socket.clone();
        }
        default_socket_dir(&self.data_dir).unwrap_or_else(|| self.data_dir.clone()).join(SENDMAIL_SOCKET)
    }

    /// The domain of a local user's own address (A4): the envelope sender `user@DOMAIN` of
    /// `postroom sendmail` without -f, and the domain a bare recipient name is completed with:
    /// `smtp.local_sender_domain`, else the first of `domains`, else `hostname`. Local, so a
    /// bounce to cron mail comes back here instead of leaving the machine.
    pub fn local_sender_domain(&self) -> String {
        let configured = Some(&self.smtp.local_sender_domain).filter(|d| !d.is_empty());
        configured.or(self.domains.first()).unwrap_or(&self.hostname).to_ascii_lowercase()
    }

    /// The effective configuration as TOML text; it parses back to the same values.
    pub fn effective_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot be shown as TOML: {e}\n"))
    }

    /// Every configured listening address, SMTP first. `pop3.socket_layer` is not applied here.
    pub fn listeners(&self) -> Vec<Listener> {
        let lists = [
            ("smtp", "smtp.listen", &self.smtp.listen),
            ("submission", "smtp.submission_listen", &self.smtp.submission_listen),
            ("smtps", "smtp.tls_listen", &self.smtp.tls_listen),
            ("pop3", "pop3.listen", &self.pop3.listen),
            ("pop3s", "pop3.tls_listen", &self.pop3.tls_listen),
            ("ldap", "ldap.listen", &self.ldap.listen),
            ("ldaps", "ldap.tls_listen", &self.ldap.tls_listen),
            ("admin", "admin.listen", &self.admin.listen),
        ];
        lists.into_iter().flat_map(|(name, key, addrs)| addrs.iter().map(move |&addr| Listener { name, key, addr })).collect()
    }

    /// "section.key" → value, for comparing against the defaults.
    fn key_values(&self) -> BTreeMap<String, toml::Value> {
        let mut out = BTreeMap::new();
        let Ok(toml::Value::Table(top)) = toml::Value::try_from(self) else {
            return out;
        };
        for (key, value) in top {
            match value {
                toml::Value::Table(section) => out.extend(section.into_iter().map(|(k, v)| (format!("{key}.{k}"), v))),
                value => {
                    out.insert(key, value);
                }
            }
        }
        out
    }
}

/// The file name of the local submission socket.
pub const SENDMAIL_SOCKET: &str = "sendmail.sock";

/// `<data_dir>-sock`: beside the data directory, named after it. None when data_dir has no last
/// name ("/", "..").
fn default_socket_dir(data_dir: &Path) -> Option<PathBuf> {
    let name = data_dir.file_name()?;
    let mut dir = name.to_os_string();
    dir.push("-sock");
    Some(data_dir.with_file_name(dir))
}

fn normalize_domain(domain: &str) -> String {
    domain.strip_suffix('.').unwrap_or(domain).to_ascii_lowercase()
}

/// RFC 1035 §2.3.1 / RFC 1123 §2.1 host names, ASCII only (IDNs are written as xn-- labels).
fn is_domain_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-') && !l.ends_with('-')
    };
    (1..=253).contains(&name.len()) && name.split('.').all(label_ok)
}

/// local@domain with a plain local part (no spaces, controls or second @).
fn is_address(address: &str) -> bool {
    address
        .split_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && local.bytes().all(|b| b.is_ascii_graphic() && b != b'@') && is_domain_name(domain))
}

/// "host", "host:port", "ip", "ip:port" or "[ipv6]:port", with a port of 1..65535.
fn is_host_port(s: &str) -> bool {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return addr.port() != 0;
    }
    if s.parse::<IpAddr>().is_ok() {
        return true;
    }
    let (host, port) = s.rsplit_once(':').map_or((s, None), |(h, p)| (h, Some(p)));
    is_domain_name(host) && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
}

/// `level` or `target=level` directives, comma-separated (a subset of tracing's EnvFilter syntax).
fn is_log_filter(filter: &str) -> bool {
    let level = |l: &str| ["off", "error", "warn", "info", "debug", "trace"].iter().any(|v| v.eq_ignore_ascii_case(l));
    let target = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_:-".contains(&b));
    filter.split(',').map(str::trim).all(|d| match d.split_once('=') {
        Some((t, l)) => target(t) && level(l),
        None => level(d),
    })
}

/// Would binding `a` fail because `b` is bound? Port 0 never clashes; on Linux "[::]" is dual-stack
/// by default, so it covers IPv4 addresses too.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: IpAddr, other: IpAddr| wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4());
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "test.toml").unwrap()
    }

    /// The problems `validate` reports for `text`.
    fn problems(text: &str) -> Vec<String> {
        parse(text).validate().err().map(|e| e.problems).unwrap_or_default()
    }

    /// `text` must be refused with a problem that starts with `key = ` and mentions `rule`.
    fn refused(text: &str, key: &str, rule: &str) {
        let problems = problems(text);
        let found = problems.iter().any(|p| p.starts_with(&format!("{key} = ")) && p.contains(rule));
        assert!(found, "{text}: expected {key} ({rule}), got {problems:?}");
    }

    #[test]
    fn embedded_default_is_the_default_and_valid() {
        let config = Config::parse(DEFAULT_TOML, DEFAULT_ORIGIN).unwrap();
        assert_eq!(config, Config::default());
        config.validate().unwrap();
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        assert_eq!(Config::load(None, None).unwrap(), Config::default());
        assert_eq!(parse(""), Config { origin: "test.toml".into(), ..Config::default() });
    }

    #[test]
    fn embedded_default_documents_every_key() {
        let written: toml::Table = toml::from_str(DEFAULT_TOML).unwrap();
        assert_eq!(toml::Value::Table(written), toml::Value::try_from(Config::default()).unwrap());
    }

    #[test]
    fn unknown_keys_are_refused_naming_key_and_line() {
        for (text, key, line) in [
            ("hostname = \"a.test\"\nbogus = 1\n", "bogus", 2),
            ("[smtp]\nvrfy = true\n\nbogus = 1\n", "bogus", 4),
            ("[smpt]\nlisten = []\n", "smpt", 1),
        ] {
            let e = Config::parse(text, "my.toml").unwrap_err().to_string();
            assert!(e.starts_with("my.toml: "), "{e}");
            assert!(e.contains(&format!("unknown field `{key}`")) && e.contains(&format!("line {line}")), "{e}");
        }
    }

    #[test]
    fn wrong_types_are_refused_naming_the_key() {
        for (text, key) in [
            (r#"smtp = { max_recipients = "many" }"#, "max_recipients"),
            (r#"relay = { mode = "sometimes" }"#, "mode"),
            (r#"pop3 = { listen = ["localhost"] }"#, "listen"),
            ("delivery = { remote_port = 70000 }", "remote_port"),
            (r#"domains = "example.test""#, "domains"),
        ] {
            let e = Config::parse(text, "my.toml").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("line 1"), "{text}: {e}");
        }
    }

    #[test]
    fn domains_are_normalised_and_matched() {
        let c = parse(
            r#"domains = ["Example.TEST.", "b.test"]
               delivery = { etrn_domains = ["Dial.Test"], host_table = { "MX.Test" = "127.0.0.1" } }"#,
        );
        assert_eq!(c.domains, ["example.test", "b.test"]);
        assert_eq!(c.delivery.etrn_domains, ["dial.test"]);
        assert!(c.delivery.host_table.contains_key("mx.test"));
    }

    #[test]
    fn acme_is_off_by_default_and_checked_when_on() {
        // O6: an empty directory turns ACME off; nothing else is judged then.
        assert!(!Config::default().tls.acme.enabled());
        assert_eq!(problems(r#"tls.acme = { contact = ["nobody"], renew_days = 0 }"#), Vec::<String>::new());
        let on = r#"hostname = "Mail.Example.TEST"
                    [tls.acme]
                    directory = "https://acme.test/dir"
                    http_listen = ["127.0.0.1:8080"]"#;
        let c = parse(on);
        assert_eq!(problems(on), Vec::<String>::new());
        assert_eq!(c.acme_names(), ["mail.example.test"], "the host name by default");
        let named = parse(&format!("{on}\nnames = [\"MX.Example.Test.\", \"pop.example.test\"]"));
        assert_eq!(named.acme_names(), ["mx.example.test", "pop.example.test"], "normalised");
        let with = |extra: &str| format!("{on}\n{extra}");
        refused(&on.replace("https://acme.test/dir", "http://acme.test/dir"), "tls.acme.directory", "https://");
        refused(&on.replace("https://acme.test/dir", "https:///dir"), "tls.acme.directory", "https://");
        refused(&with(r#"contact = ["admin@example.test"]"#), "tls.acme.contact", "mailto:");
        assert_eq!(problems(&with(r#"contact = ["mailto:admin@example.test"]"#)), Vec::<String>::new());
        refused(&with(r#"names = ["*.example.test"]"#), "tls.acme.names", "wildcards");
        refused(&with(r#"names = ["mail_1.example.test"]"#), "tls.acme.names", "domain name");
        refused(&on.replace(r#"http_listen = ["127.0.0.1:8080"]"#, ""), "tls.acme.http_listen", "at least one");
        refused(&on.replace("127.0.0.1:8080", "127.0.0.1:2525"), "tls.acme.http_listen", "already taken by smtp.listen");
        refused(
            &on.replace(r#"["127.0.0.1:8080"]"#, r#"["[::]:80", "127.0.0.1:80"]"#),
            "tls.acme.http_listen",
            "already taken by tls.acme.http_listen",
        );
        refused(&format!("metrics = {{ listen = \"127.0.0.1:8080\" }}\n{on}"), "tls.acme.http_listen", "metrics.listen");
        refused(&with("renew_days = 0"), "tls.acme.renew_days", "at least 1");
        refused(&with("check_secs = 0"), "tls.acme.check_secs", "at least 1");
        let e = Config::parse(&with("bogus = 1"), "my.toml").unwrap_err().to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn every_rule_names_its_key() {
        refused(r#"data_dir = """#, "data_dir", "empty");
        for bad in ["", "mail..test", "-mail.test", "mail_1.test", "mail.test."] {
            refused(&format!("hostname = {bad:?}"), "hostname", "domain name");
        }
        refused(r#"domains = ["ok.test", "bad_domain.test"]"#, "domains", "domain name");
        refused(r#"domains = ["a..test"]"#, "domains", "domain name");
        // Found by fuzzing (fuzz/regressions/config): one trailing dot is the root and goes; with
        // two, the name keeps an empty label and is refused rather than shown differently.
        refused(r#"domains = ["a.test.."]"#, "domains", "domain name");
        refused(r#"postmaster = "admin""#, "postmaster", "local@domain");
        refused(r#"postmaster = "@example.test""#, "postmaster", "local@domain");
        refused("smtp = { max_message_size = 1023 }", "smtp.max_message_size", "1024");
        for key in [
            "smtp.max_recipients",
            "smtp.max_sessions",
            "smtp.submission_max_sessions",
            "smtp.local_max_sessions",
            "smtp.greeting_timeout_secs",
            "smtp.command_timeout_secs",
            "smtp.data_timeout_secs",
            "smtp.max_session_secs",
            "smtp.max_errors",
            "smtp.max_hops",
            "tls.handshake_timeout_secs",
            "pop3.inactivity_timeout_secs",
            "pop3.max_sessions",
            "delivery.remote_port",
            "delivery.queue_lifetime_hours",
            "delivery.first_retry_interval_secs",
            "delivery.second_retry_interval_secs",
            "delivery.max_connections",
            "delivery.max_connections_per_domain",
            "delivery.connection_reuse_limit",
            "journal.retention_days",
            "storage.body_chunk_kib",
            "penalty.login_failures",
            "penalty.login_window_minutes",
        ] {
            let (section, name) = key.split_once('.').unwrap();
            refused(&format!("{section} = {{ {name} = 0 }}"), key, "at least 1");
        }
        refused("smtp = { max_sessions_per_ip = 0 }", "smtp.max_sessions_per_ip", "1..smtp.max_sessions (200)");
        refused("smtp = { max_sessions = 10, max_sessions_per_ip = 11 }", "smtp.max_sessions_per_ip", "(10)");
        refused("smtp = { submission_max_sessions_per_ip = 0 }", "smtp.submission_max_sessions_per_ip", "1..smtp.submission_max_sessions (100)");
        refused("smtp = { submission_max_sessions = 5 }", "smtp.submission_max_sessions_per_ip", "(5)");
        // The MX listener's limits do not bound submission's (S4: each pool on its own).
        assert_eq!(problems("smtp = { max_sessions = 5, max_sessions_per_ip = 5 }"), Vec::<String>::new());
        refused("pop3 = { max_sessions_per_ip = 201 }", "pop3.max_sessions_per_ip", "1..pop3.max_sessions");
        refused("storage = { body_chunk_kib = 65537 }", "storage.body_chunk_kib", "65536");
        refused("relay = { pop_minutes = 5 }", "relay.pop_minutes", "must be 0 (off) or 15..65535");
        refused("relay = { pop_minutes = 65536 }", "relay.pop_minutes", "15..65535");
        // Issue 21.
        refused("greylist = { delay_secs = 0 }", "greylist.delay_secs", "1..86400");
        refused("greylist = { delay_secs = 86401 }", "greylist.delay_secs", "1..86400");
        refused("greylist = { retry_window_hours = 0 }", "greylist.retry_window_hours", "1..720");
        refused("greylist = { delay_secs = 7200, retry_window_hours = 2 }", "greylist.retry_window_hours", "longer than greylist.delay_secs");
        refused("greylist = { max_age_days = 0 }", "greylist.max_age_days", "1..3650");
        refused("milter = { mx = [\"x\"] }", "milter.mx", "no milter named \"x\"");
        let server = |address: &str| format!("milter = {{ servers = [{{ name = \"m\", address = \"{address}\" }}], submission = [\"m\", \"m\"] }}");
        refused(&server("127.0.0.1:8891"), "milter.submission", "listed twice");
        refused(&server("192.0.2.1:8891"), "milter.servers.address", "loopback");
        refused(&server("localhost:8891"), "milter.servers.address", "unix:/absolute/path");
        refused(&server("unix:run/m.sock"), "milter.servers.address", "unix:/absolute/path");
        refused("milter = { servers = [{ name = \"a b\", address = \"unix:/m\" }] }", "milter.servers.name", "letters");
        refused(
            "milter = { servers = [{ name = \"m\", address = \"unix:/m\" }, { name = \"m\", address = \"unix:/n\" }] }",
            "milter.servers.name",
            "more than one",
        );
        refused("milter = { servers = [{ name = \"m\", address = \"unix:/m\", timeout_secs = 0 }] }", "milter.servers.timeout_secs", "1..3600");
        let ok = "milter = { servers = [{ name = \"m\", address = \"[::1]:1\", default_action = \"accept\" }], mx = [\"m\"] }";
        assert_eq!(problems(ok), Vec::<String>::new());
        assert_eq!(parse(ok).milter.servers[0].timeout_secs, 30);
        refused("greylist = { max_age_days = 1, retry_window_hours = 48 }", "greylist.max_age_days", "at least greylist.retry_window_hours");
        assert_eq!(problems("greylist = { enabled = true, delay_secs = 1, auto_allow_after = 0 }"), Vec::<String>::new());
        refused(r#"tls = { cert = "cert.pem" }"#, "tls.cert", "both");
        refused(r#"tls = { key = "key.pem" }"#, "tls.cert", "both");
        refused(r#"delivery = { mail_router = "relay.test:0" }"#, "delivery.mail_router", "host[:port]");
        refused(r#"delivery = { mail_router = "bad host" }"#, "delivery.mail_router", "host[:port]");
        refused(r#"delivery = { bind_address = "eth0" }"#, "delivery.bind_address", "IP address");
        refused(r#"delivery = { host_table = { "mx.test" = "nowhere" } }"#, "delivery.host_table", "IP address");
        refused(r#"delivery = { host_table = { "mx test" = "::1" } }"#, "delivery.host_table", "domain name");
        refused(r#"delivery = { etrn_domains = ["a b"] }"#, "delivery.etrn_domains", "domain name");
        refused(r#"dns = { servers = ["127.0.0.1:0"] }"#, "dns.servers", "port");
        refused(r#"log = { level = "loud" }"#, "log.level", "error, warn");
        refused(r#"log = { level = "info,=debug" }"#, "log.level", "error, warn");
        refused(r#"metrics = { listen = "localhost" }"#, "metrics.listen", "address:port");
        refused(r#"metrics = { listen = "127.0.0.1:2525" }"#, "metrics.listen", "taken by smtp.listen = 127.0.0.1:2525");
        assert_eq!(problems(r#"metrics = { listen = "127.0.0.1:0" }"#), Vec::<String>::new());
        refused(r#"pop3 = { listen = ["127.0.0.1:2525"] }"#, "pop3.listen", "taken by smtp.listen = 127.0.0.1:2525");
        refused(r#"smtp = { listen = ["[::]:2587"] }"#, "smtp.submission_listen", "taken by smtp.listen = [::]:2587");

        let silent = "smtp = { listen = [], submission_listen = [], tls_listen = [] }
                      pop3 = { listen = [], tls_listen = [] }";
        assert!(problems(silent).iter().any(|p| p.starts_with("no listener at all")));

        // All problems come together; Display puts the file before each.
        let e = parse("hostname = ''\nrelay = { pop_minutes = 5 }").validate().unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert_eq!(e.to_string().lines().filter(|l| l.starts_with("test.toml: ")).count(), 2);
    }

    #[test]
    fn local_socket_and_sender_domain() {
        let c = parse("");
        assert_eq!(c.local_socket(), Path::new("postroom-data-sock/sendmail.sock"));
        assert_eq!(c.local_sender_domain(), "example.test");
        let c = parse(r#"data_dir = "/var/lib/postroom/""#);
        assert_eq!(c.local_socket(), Path::new("/var/lib/postroom-sock/sendmail.sock"));
        let c = parse(r#"smtp = { local_socket = "/run/postroom/sendmail.sock", local_sender_domain = "Office.Test." }"#);
        assert_eq!(c.local_socket(), Path::new("/run/postroom/sendmail.sock"));
        assert_eq!(c.local_sender_domain(), "office.test");
        assert_eq!(parse(r#"domains = []"#).local_sender_domain(), "mail.example.test");
        refused(r#"smtp = { local_sender_domain = "not a domain" }"#, "smtp.local_sender_domain", "domain name");
        refused(r#"data_dir = "/""#, "smtp.local_socket", "must be set");
        refused(&format!("smtp = {{ local_socket = \"/{}/s.sock\" }}", "d".repeat(110)), "smtp.local_socket", "too long");
    }

    #[test]
    fn edge_values_are_accepted() {
        let ok = r#"
            hostname = "localhost"
            domains = []
            smtp = { listen = ["127.0.0.1:0"], submission_listen = ["127.0.0.1:0"], max_message_size = 1024 }
            tls = { cert = "c.pem", key = "k.pem" }
            relay = { pop_minutes = 65535 }
            delivery = { mail_router = "[::1]:2525", bind_address = "::1" }
            log = { level = "info,smtp_server=debug" }
        "#;
        assert_eq!(problems(ok), Vec::<String>::new());
        for router in ["relay.test", "relay.test:587", "192.0.2.1", "192.0.2.1:25", "::1"] {
            assert!(is_host_port(router), "{router}");
        }
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(!overlaps(addr("0.0.0.0:25"), addr("[::1]:25")));
        assert!(overlaps(addr("0.0.0.0:25"), addr("127.0.0.1:25")));
    }

    #[test]
    fn warnings() {
        let warned = |text: &str, needle: &str| {
            let w = parse(text).warnings();
            assert!(w.iter().any(|w| w.contains(needle)), "{text}: no {needle:?} in {w:?}");
        };
        warned(r#"relay = { mode = "all" }"#, "OPEN RELAY");
        warned(r#"smtp = { auth = "local-and-relay" }"#, "MX port");
        warned("smtp = { max_recipients = 50 }", "§4.5.3.1.8");
        warned("smtp = { command_timeout_secs = 60 }", "§4.5.3.2");
        warned("pop3 = { inactivity_timeout_secs = 60 }", "RFC 1939");
        warned("smtp = { percent_routing = true }", "relay trick");
        warned("relay = { override_reject_connect = true }", "pop_minutes = 0");
        warned(r#"hostname = "localhost""#, "fully qualified");
        warned(r#"metrics = { listen = "0.0.0.0:9425" }"#, "no authentication");
        assert_eq!(parse(r#"metrics = { listen = "[::1]:9425" }"#).warnings(), Vec::<String>::new());
        warned(r#"pop3 = { socket_layer = "secure" }"#, "pop3.listen is unused");
        warned(r#"pop3 = { socket_layer = "nonsecure" }"#, "pop3.tls_listen is unused");
        // A not-yet key set to its default says nothing; a built one says nothing either.
        assert_eq!(parse("tls = { handshake_timeout_secs = 5 }").warnings(), Vec::<String>::new());
        assert_eq!(parse(r#"relay = { mode = "list" }"#).warnings(), Vec::<String>::new());
    }

    #[test]
    fn load_reads_a_file_and_the_override_wins() {
        let dir = std::env::temp_dir().join(format!("postroom-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("postroom.toml");
        std::fs::write(&file, "data_dir = \"/var/lib/postroom\"\n").unwrap();

        let c = Config::load(Some(&file), None).unwrap();
        assert_eq!((c.data_dir.to_str(), c.origin.as_str()), (Some("/var/lib/postroom"), file.to_str().unwrap()));
        let c = Config::load(Some(&file), Some(Path::new("/srv/mail"))).unwrap();
        assert_eq!(c.data_dir, Path::new("/srv/mail"));
        assert_eq!(Config::load(None, Some(Path::new("here"))).unwrap().data_dir, Path::new("here"));
        let e = Config::load(None, Some(Path::new(""))).unwrap_err().to_string();
        assert_eq!(e, format!("{DEFAULT_ORIGIN}: data_dir = \"\": must not be empty"));

        std::fs::write(&file, "relay = { pop_minutes = 5 }\n").unwrap();
        let e = Config::load(Some(&file), None).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: relay.pop_minutes = 5", file.display())), "{e}");
        let e = Config::load(Some(&dir.join("missing.toml")), None).unwrap_err().to_string();
        assert!(e.contains("missing.toml: cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn admin_keys_are_checked() {
        refused(r#"admin = { listen = ["0.0.0.0:8443"], https = false }"#, "admin.listen", "loopback address only");
        refused("admin = { session_minutes = 0 }", "admin.session_minutes", "at least 1");
        refused("admin = { session_minutes = 1441 }", "admin.session_minutes", "at most 1440");
        refused(r#"admin = { listen = ["127.0.0.1:1110"] }"#, "admin.listen", "taken by pop3.listen");
        assert_eq!(problems(r#"admin = { listen = ["127.0.0.1:8080"], https = false }"#), Vec::<String>::new());
        let ok = parse(r#"admin = { listen = ["[::]:8443"] }"#);
        assert!(ok.listeners().iter().any(|l| l.name == "admin" && l.addr.port() == 8443));
    }

    #[test]
    fn ldap_keys_are_checked() {
        // SPEC O5, issue 18: the address book.
        refused(r#"ldap = { anonymous_networks = ["10.0.0.0/33"] }"#, "ldap.anonymous_networks", "must be a network");
        refused("ldap = { size_limit = 0 }", "ldap.size_limit", "at least 1");
        refused("ldap = { max_sessions = 0 }", "ldap.max_sessions", "at least 1");
        refused(
            r#"domains = []
                   ldap = { tls_listen = ["127.0.0.1:1636"] }"#,
            "domains",
            "base DN",
        );
        refused(r#"ldap = { listen = ["127.0.0.1:1110"] }"#, "ldap.listen", "taken by pop3.listen");
        let ok = parse(r#"ldap = { listen = ["127.0.0.1:1389"], anonymous_networks = ["192.168.1.0/24", "10.1.2.3", "2001:db8::/32"] }"#);
        assert_eq!(ok.ldap.anonymous_networks.iter().filter_map(|n| parse_network(n)).count(), 3);
        assert!(ok.listeners().iter().any(|l| l.name == "ldap" && l.addr.port() == 1389));
    }

    #[test]
    fn effective_toml_round_trips() {
        let changed = parse(
            r#"domains = ["a.test", "b.test"]
               relay = { mode = "both", pop_minutes = 30 }
               smtp = { submission_max_sessions = 7, local_max_sessions = 3, greeting_timeout_secs = 2, max_session_secs = 60 }
               delivery = { host_table = { "mx.b.test" = "127.0.0.1" } }
               dns = { servers = ["[::1]:53"] }
               tls = { cert = "c.pem", key = "k.pem" }
               log = { format = "json" }"#,
        );
        assert!(changed.effective_toml().contains("mode = \"both\""));
        assert!(changed.effective_toml().contains("submission_max_sessions = 7"));
        for config in [Config::default(), changed] {
            let text = config.effective_toml();
            assert_eq!(Config::parse(&text, &config.origin).unwrap(), config, "{text}");
        }
    }
}
