//! TLS for Postroom's servers (SPEC S2, S6, P2), rustls with the ring provider only.
//!
//! * [`ServerTls`] holds the current rustls server configuration: the PEM certificate and key of
//!   `[tls] cert`/`key`, or a self-signed certificate generated into the data directory on first
//!   start for the names [`CertNames`] derives from `hostname` and the listen addresses (subject
//!   CN = hostname, so a client that trusts the file can connect by name or by address); a
//!   generated pair whose names no longer match the configuration is replaced by a new one.
//!   [`ServerTls::reload`] re-reads changed files, so certificates are replaced without a restart;
//!   new handshakes use the new ones. [`ServerTls::present_managed`] presents a pair another part
//!   of the server keeps up to date itself (ACME, SPEC O6); neither the file watcher nor a
//!   reloaded `[tls] cert`/`key` replaces it.
//! * [`describe`] reads what a client is shown — subject, names, validity — and the SHA-256 and
//!   MD5 [`Fingerprints`] a client can pin (msmtp, mpop `tls_fingerprint`; fetchmail
//!   `sslfingerprint`), for the log, `postroom status` and `postroom cert show`.
//! * [`Stream`] is a connection that starts plain or TLS and can be upgraded once (STARTTLS, STLS)
//!   within a handshake deadline.
#![forbid(unsafe_code)]

use private_files::{effective_uid, own_regular_file, write_private_atomic};
use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// Names of the generated certificate files inside the data directory.
pub const GENERATED_CERT: &str = "tls-cert.pem";
pub const GENERATED_KEY: &str = "tls-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: no certificate found in the PEM file")]
    NoCertificate(PathBuf),
    #[error("{path}: no usable private key: {why}")]
    BadKey { path: PathBuf, why: String },
    #[error("certificate and key do not fit together: {0}")]
    Mismatch(String),
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// A key other users may read, or a generated file that is not ours (SPEC D4).
    #[error("{0}")]
    Untrusted(String),
}

/// Where the certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSource {
    /// `[tls] cert` and `key`.
    Files,
    /// Self-signed for the host name, made now in the data directory.
    Generated,
    /// Self-signed, made at an earlier start.
    GeneratedEarlier,
    /// Self-signed, made now because the one made earlier named something else (`previous`):
    /// the host name or the listen addresses changed. Clients must be given the new one.
    Regenerated { previous: String },
}

/// The names a generated certificate carries: subject CN = the host name; subjectAltName = the
/// host name, and the IP addresses of the listeners (with `localhost` when one is a loopback
/// address). Clients check the name they connected to against these.
#[derive(Clone, Debug)]
pub struct CertNames {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
}

impl CertNames {
    /// The names for `hostname` and the addresses the listeners are configured on. An unspecified
    /// address (0.0.0.0, ::) is no address a client can connect to, and which interfaces the
    /// machine has is not known here: the loopback address stands in for it (`::` takes IPv4
    /// too on Linux, so both loopbacks), so programs on the machine itself can connect by
    /// address; others connect by the host name or pin the fingerprint.
    pub fn new(hostname: &str, listen: impl IntoIterator<Item = IpAddr>) -> CertNames {
        let (v4, v6) = (IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST));
        let mut ips = BTreeSet::new();
        for ip in listen {
            match ip {
                IpAddr::V4(a) if a.is_unspecified() => ips.extend([v4]),
                IpAddr::V6(a) if a.is_unspecified() => ips.extend([v4, v6]),
                ip => ips.extend([ip]),
            }
        }
        let mut dns_names = vec![hostname.to_string()];
        if ips.iter().any(IpAddr::is_loopback) && !hostname.eq_ignore_ascii_case("localhost") {
            dns_names.push("localhost".to_string());
        }
        CertNames { common_name: hostname.to_string(), dns_names, ip_addresses: ips.into_iter().collect() }
    }

    /// The names `info`'s certificate carries.
    pub fn of(info: &CertInfo) -> CertNames {
        CertNames {
            common_name: info.common_name.clone().unwrap_or_default(),
            dns_names: info.dns_names.clone(),
            ip_addresses: info.ip_addresses.clone(),
        }
    }

    fn key(&self) -> (&str, BTreeSet<String>, BTreeSet<IpAddr>) {
        let dns = self.dns_names.iter().map(|n| n.to_ascii_lowercase()).collect();
        (&self.common_name, dns, self.ip_addresses.iter().copied().collect())
    }
}

/// The same names, in any order.
impl PartialEq for CertNames {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for CertNames {}

/// `CN=mail.example.test; DNS:mail.example.test, DNS:localhost, IP:127.0.0.1`.
impl fmt::Display for CertNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CN={}; {}", self.common_name, alt_names(&self.dns_names, &self.ip_addresses))
    }
}

fn alt_names(dns: &[String], ips: &[IpAddr]) -> String {
    let dns = dns.iter().map(|n| format!("DNS:{n}"));
    let ips = ips.iter().map(|ip| format!("IP:{ip}"));
    dns.chain(ips).collect::<Vec<_>>().join(", ")
}

/// A certificate's fingerprints over its DER encoding, as `openssl x509 -noout -fingerprint
/// -sha256` (and `-md5`) print them: upper-case hex pairs joined by colons. SHA-256 is what
/// msmtp and mpop (`tls_fingerprint`) want; fetchmail 6.4 compares MD5 (`sslfingerprint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprints {
    pub sha256: String,
    pub md5: String,
}

impl Fingerprints {
    pub fn of(der: &[u8]) -> Fingerprints {
        use md5::Digest;
        let sha256 = ring::digest::digest(&ring::digest::SHA256, der);
        Fingerprints { sha256: colon_hex(sha256.as_ref()), md5: colon_hex(&md5::Md5::digest(der)) }
    }
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// What a certificate shows a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, e.g. `CN=mail.example.test`.
    pub subject: String,
    /// The subject's common name, when it has one.
    pub common_name: Option<String>,
    /// subjectAltName DNS names and IP addresses, in certificate order.
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    /// Validity, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub fingerprints: Fingerprints,
}

impl CertInfo {
    /// `DNS:mail.example.test, DNS:localhost, IP:127.0.0.1` (`none` without subjectAltName).
    pub fn alt_names(&self) -> String {
        let names = alt_names(&self.dns_names, &self.ip_addresses);
        if names.is_empty() { "none".to_string() } else { names }
    }
}

/// What the DER certificate `der` shows a client.
pub fn describe(der: &[u8]) -> Result<CertInfo, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a readable X.509 certificate: {e}"))?;
    let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
    let (mut dns_names, mut ip_addresses) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns_names.push(n.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ip_addresses.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes"))),
                    16 => ip_addresses.push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes"))),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let validity = cert.validity();
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        common_name,
        dns_names,
        ip_addresses,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        fingerprints: Fingerprints::of(der),
    })
}

/// The first certificate of the PEM file `path` (the server's own; a chain follows it).
pub fn read_certificate(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Io { path: path.to_path_buf(), source })?;
    CertificateDer::pem_slice_iter(&pem).find_map(Result::ok).ok_or_else(|| TlsError::NoCertificate(path.to_path_buf()))
}

/// The PEM file whose certificate the listeners present: `cert` when set, else the one generated
/// in `data_dir`, or None when none is generated yet. A generated file that is a link or another
/// user's is refused, as [`ServerTls::load`] refuses it.
pub fn certificate_file(cert: &Path, data_dir: &Path) -> Result<Option<PathBuf>, TlsError> {
    if !cert.as_os_str().is_empty() {
        return Ok(Some(cert.to_path_buf()));
    }
    let generated = data_dir.join(GENERATED_CERT);
    Ok(generated_file_present(&generated)?.then_some(generated))
}

/// The server side of TLS, shared by every listener.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<RwLock<Loaded>>,
}

#[derive(Clone)]
struct Loaded {
    /// The files it was read from ([`ServerTls::replace_with`] may point them elsewhere).
    cert: PathBuf,
    key: PathBuf,
    config: Arc<ServerConfig>,
    stamp: (Option<SystemTime>, Option<SystemTime>),
    /// The DER of the certificate presented (the first of the chain).
    leaf: CertificateDer<'static>,
    /// Presented by [`ServerTls::present_managed`]: its owner replaces it, nobody else does.
    managed: bool,
}

impl ServerTls {
    /// Load `cert`/`key`, or when both are empty, the certificate generated in `data_dir`
    /// (generating it for `names` first if there is none yet, or if the one there names something
    /// else). `data_dir` must be a directory only this user can write (the store checks it). A
    /// key file group or others may read is refused, as OpenSSH refuses one.
    pub fn load(cert: &Path, key: &Path, data_dir: &Path, names: &CertNames) -> Result<(ServerTls, CertSource), TlsError> {
        let (cert, key, source) = if cert.as_os_str().is_empty() && key.as_os_str().is_empty() {
            let (c, k) = (data_dir.join(GENERATED_CERT), data_dir.join(GENERATED_KEY));
            let (have_cert, have_key) = (generated_file_present(&c)?, generated_file_present(&k)?);
            let source = if have_cert && have_key {
                // A host name or listen address changed since (or a certificate made before the
                // names were the host's): a client that connects by the new name would refuse it.
                match read_certificate(&c).map_err(|e| e.to_string()).and_then(|der| describe(&der)) {
                    Ok(info) if CertNames::of(&info) == *names => CertSource::GeneratedEarlier,
                    found => {
                        let previous = found.map_or_else(|e| format!("(unreadable: {e})"), |info| CertNames::of(&info).to_string());
                        generate(data_dir, names)?;
                        CertSource::Regenerated { previous }
                    }
                }
            } else {
                // None yet, or half a pair (a crash between the two files): a new pair.
                generate(data_dir, names)?;
                CertSource::Generated
            };
            (c, k, source)
        } else {
            (cert.to_path_buf(), key.to_path_buf(), CertSource::Files)
        };
        let loaded = read(&cert, &key)?;
        Ok((ServerTls { current: Arc::new(RwLock::new(loaded)) }, source))
    }

    /// Load as [`ServerTls::load`] would, but never generate: the configured pair, or the pair
    /// generated earlier in `data_dir` as it is (none there is an error). For `config check`,
    /// which must not write.
    pub fn open(cert: &Path, key: &Path, data_dir: &Path) -> Result<ServerTls, TlsError> {
        let (cert, key) = if cert.as_os_str().is_empty() && key.as_os_str().is_empty() {
            let (c, k) = (data_dir.join(GENERATED_CERT), data_dir.join(GENERATED_KEY));
            for f in [&c, &k] {
                if !generated_file_present(f)? {
                    return Err(TlsError::Io { path: f.clone(), source: io::ErrorKind::NotFound.into() });
                }
            }
            (c, k)
        } else {
            (cert.to_path_buf(), key.to_path_buf())
        };
        let loaded = read(&cert, &key)?;
        Ok(ServerTls { current: Arc::new(RwLock::new(loaded)) })
    }

    /// The acceptor for a new handshake, with the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("tls config lock").config.clone())
    }

    /// Re-read the files if they changed since the last load. A broken new pair is reported and
    /// the old one stays in use. Returns true when a new certificate was loaded.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert, key, before) = {
            let current = self.current.read().expect("tls config lock");
            (current.cert.clone(), current.key.clone(), current.stamp)
        };
        if self.is_managed() || stamps(&cert, &key) == before {
            return Ok(false);
        }
        let loaded = read(&cert, &key)?;
        let mut current = self.current.write().expect("tls config lock");
        // Files replaced meanwhile by `replace_with` or `present_managed` win over what was read
        // from the old ones.
        if current.cert != cert || current.key != key || current.managed {
            return Ok(false);
        }
        *current = loaded;
        Ok(true)
    }

    /// Present `other`'s certificate from now on, here and in every clone, and watch its files
    /// (O6: the configuration was reloaded, `[tls] cert`/`key` may name other files). Open
    /// sessions keep the TLS they have; new handshakes use the new certificate. A managed pair
    /// (see [`ServerTls::present_managed`]) stays: `[tls] cert`/`key` serve only until the first
    /// ACME issuance. Returns whether the certificate was replaced.
    pub fn replace_with(&self, other: &ServerTls) -> bool {
        let loaded = other.current.read().expect("tls config lock").clone();
        let mut current = self.current.write().expect("tls config lock");
        if current.managed {
            return false;
        }
        *current = loaded;
        true
    }

    /// Present the pair `cert`/`key` from now on, here and in every clone, as a managed pair: its
    /// owner (the ACME task, SPEC O6) writes new files and calls this again; the file watcher
    /// and [`ServerTls::replace_with`] leave it alone, so a half-written pair is never read and a
    /// configuration reload does not bring the self-signed certificate back. Open sessions keep
    /// the TLS they have. A pair that does not load changes nothing. Returns the new leaf.
    pub fn present_managed(&self, cert: &Path, key: &Path) -> Result<CertificateDer<'static>, TlsError> {
        let mut loaded = read(cert, key)?;
        loaded.managed = true;
        let leaf = loaded.leaf.clone();
        *self.current.write().expect("tls config lock") = loaded;
        Ok(leaf)
    }

    /// Whether a managed pair (see [`ServerTls::present_managed`]) is presented.
    pub fn is_managed(&self) -> bool {
        self.current.read().expect("tls config lock").managed
    }

    /// Check the files every `every` and reload them when they change (O6).
    pub fn spawn_reloader(&self, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match me.reload() {
                    Ok(true) => {
                        let fp = Fingerprints::of(&me.certificate());
                        tracing::info!(cert = %me.cert_path().display(), sha256 = %fp.sha256, md5 = %fp.md5, "TLS certificate reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "new TLS certificate not loaded; the previous one stays in use"),
                }
            }
        });
    }

    pub fn cert_path(&self) -> PathBuf {
        self.current.read().expect("tls config lock").cert.clone()
    }

    /// The DER of the certificate new handshakes present.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.current.read().expect("tls config lock").leaf.clone()
    }
}

fn stamps(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

fn read(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    use std::io::Read;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    let stamp = stamps(cert, key);
    let cert_pem = std::fs::read(cert).map_err(io(cert))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem).filter_map(Result::ok).collect();
    let Some(leaf) = certs.first().cloned() else {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    };
    // The permissions of the file actually opened, not of whatever the name pointed to before.
    let mut key_file = std::fs::File::open(key).map_err(io(key))?;
    judge_key(key, &key_file.metadata().map_err(io(key))?)?;
    let mut key_pem = Vec::new();
    key_file.read_to_end(&mut key_pem).map_err(io(key))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey { path: key.to_path_buf(), why: e.to_string() })?;
    let config = server_config(certs, private)?;
    Ok(Loaded { cert: cert.to_path_buf(), key: key.to_path_buf(), config: Arc::new(config), stamp, leaf, managed: false })
}

fn server_config(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<ServerConfig, TlsError> {
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Mismatch(e.to_string()))
}

/// Whether the PEM chain `chain` (the server's certificate first) and the PEM key `key` make a
/// pair the listeners could present, before they are written anywhere (a new ACME certificate).
/// Returns the server's certificate.
pub fn check_pair(chain: &[u8], key: &[u8]) -> Result<CertificateDer<'static>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain).filter_map(Result::ok).collect();
    let Some(leaf) = certs.first().cloned() else {
        return Err(TlsError::Mismatch("no certificate in the chain".to_string()));
    };
    let private = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Mismatch(format!("no usable private key: {e}")))?;
    server_config(certs, private)?;
    Ok(leaf)
}

/// Where rustls logs (through the `log` crate) what it finds wrong in a client's ClientHello:
/// above all "Illegal SNI extension: ignoring IP address presented as hostname", which every
/// client that connects by address and sends that address as SNI causes. It is about the client,
/// not about us, so the log shows it only at debug level (`serve` filters this target below that).
pub const CLIENT_HELLO_LOG_TARGET: &str = "rustls::msgs::handshake";

/// The one crypto provider (TOOLCHAIN: never let aws-lc-rs and ring race).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The check `serve` makes on a key file, for `config check`: refused when group or others may
/// access it (see [`key_too_open`]). A file that cannot be read is not judged here.
pub fn check_key_permissions(key: &Path) -> Result<(), TlsError> {
    match std::fs::metadata(key) {
        Ok(meta) => judge_key(key, &meta),
        Err(_) => Ok(()),
    }
}

fn judge_key(key: &Path, meta: &std::fs::Metadata) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let euid = effective_uid().map_err(|source| TlsError::Io { path: key.to_path_buf(), source })?;
    if key_too_open(meta.mode(), meta.uid(), euid) {
        return Err(TlsError::Untrusted(format!(
            "permissions {:04o} for {k} are too open: a private key must not be accessible by group or others; chmod 600 {k}",
            meta.mode() & 0o7777,
            k = key.display()
        )));
    }
    Ok(())
}

/// Whether a key file with this mode and owner is too open for a process running as `euid`:
/// any permission for group or others, as OpenSSH judges a private key. One exception, as
/// PostgreSQL makes it: a key root owns may be readable by its group when we are not root
/// (the `ssl-cert` group of Debian and its kin, which is how such a server reads it).
fn key_too_open(mode: u32, owner: u32, euid: u32) -> bool {
    let loose = mode & 0o077;
    loose != 0 && !(owner == 0 && euid != 0 && loose == 0o040)
}

/// Whether a generated certificate file is there. It must be a regular file we own: a link or
/// another user's file (planted before the data directory was ours) is refused, never read
/// (its key would be known to someone else) nor written through.
fn generated_file_present(path: &Path) -> Result<bool, TlsError> {
    let io = |source| TlsError::Io { path: path.to_path_buf(), source };
    let euid = effective_uid().map_err(io)?;
    let what = match own_regular_file(path, euid).map_err(io)? {
        Ok(present) => return Ok(present),
        Err(what) => what,
    };
    Err(TlsError::Untrusted(format!(
        "{} is {what}: the generated certificate and key must be regular files of the user that runs postroom; \
         remove it (a new self-signed pair is generated) or set [tls] cert and key",
        path.display()
    )))
}

/// A self-signed certificate (a new ECDSA P-256 key) carrying `names` into `dir`, both files
/// 0600: each written to a new temporary file (O_EXCL, O_NOFOLLOW: never through a link someone
/// left there), fsynced and renamed into place. The key goes first: a crash between the two
/// leaves a certificate that no longer fits, which the next start replaces (half a pair, or the
/// old names).
fn generate(dir: &Path, names: &CertNames) -> Result<(), TlsError> {
    let fail = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, names.common_name.as_str());
    for name in &names.dns_names {
        params.subject_alt_names.push(rcgen::SanType::DnsName(name.clone().try_into().map_err(fail)?));
    }
    params.subject_alt_names.extend(names.ip_addresses.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    let write =
        |name: &str, text: String| write_private_atomic(dir, name, text.as_bytes()).map_err(|source| TlsError::Io { path: dir.join(name), source });
    write(GENERATED_KEY, key.serialize_pem())?;
    write(GENERATED_CERT, cert.pem())
}

/// Refusal handshakes (see [`Stream::refuse`]) running at once, at most.
pub const REFUSALS_AT_ONCE: usize = 64;
static REFUSALS: Semaphore = Semaphore::const_new(REFUSALS_AT_ONCE);

/// A client connection: plain until upgraded, or TLS from the start.
pub enum Stream {
    Plain(TcpStream),
    /// The local submission socket (sendmail): never encrypted, the peer is a local process.
    Unix(tokio::net::UnixStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Left behind by a failed upgrade.
    Broken,
}

impl Stream {
    /// TLS handshake on this connection within `deadline` (S4: a TLS-handshake deadline).
    pub async fn upgrade(self, acceptor: TlsAcceptor, deadline: Duration) -> io::Result<Stream> {
        let Stream::Plain(tcp) = self else { return Err(io::Error::other("connection is not a plain one")) };
        match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake deadline passed")),
        }
    }

    /// Tells a client that came past the session limit `refusal`, then ends the connection. On an
    /// implicit-TLS listener (`tls`: the acceptor and the handshake deadline) the refusal follows
    /// a handshake so the client can read it. Such a client holds no session slot, so at most
    /// [`REFUSALS_AT_ONCE`] refusal handshakes run at a time; past that the connection is just
    /// closed, and a flood on a TLS port cannot pile up descriptors in handshakes.
    pub async fn refuse(self, tls: Option<(TlsAcceptor, Duration)>, refusal: &[u8], limit: Duration) {
        let mut stream = self;
        let mut _permit = None;
        if let Some((acceptor, deadline)) = tls {
            let Ok(permit) = REFUSALS.try_acquire() else { return };
            _permit = Some(permit);
            stream = match stream.upgrade(acceptor, deadline).await {
                Ok(s) => s,
                Err(_) => return,
            };
        }
        if stream.write_all_within(refusal, limit).await.is_ok() {
            stream.shutdown_within(limit).await;
        }
    }

    /// `write_all` that gives up after `limit`: a client that stops reading (a pipelining client
    /// that never collects its replies, a POP3 client that RETRs and stalls) must not hold its
    /// session, and its slot, forever.
    pub async fn write_all_within(&mut self, bytes: &[u8], limit: Duration) -> io::Result<()> {
        match tokio::time::timeout(limit, self.write_all(bytes)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")),
        }
    }

    /// Ends the connection (TLS close_notify, then FIN), giving up after `limit`.
    pub async fn shutdown_within(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.shutdown()).await;
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384", for Received headers and logs.
    pub fn tls_description(&self) -> Option<String> {
        let Stream::Tls(tls) = self else { return None };
        let (_, conn) = tls.get_ref();
        let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
        let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        Some(format!("{} {}", version.replace("TLSv1_", "TLSv1."), suite))
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Broken => Poll::Ready(Err(io::Error::from(io::ErrorKind::NotConnected))),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Broken => Poll::Ready(Err(io::Error::from(io::ErrorKind::NotConnected))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::Broken => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Broken => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(hostname: &str) -> CertNames {
        CertNames::new(hostname, [IpAddr::from([127, 0, 0, 1])])
    }

    #[test]
    fn generates_once_then_reuses_and_reloads_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Path::new("");
        let (tls, source) = ServerTls::load(empty, empty, dir.path(), &names("mail.example.test")).unwrap();
        assert_eq!(source, CertSource::Generated);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(GENERATED_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "private key readable by its owner only");
        let (_, source) = ServerTls::load(empty, empty, dir.path(), &names("mail.example.test")).unwrap();
        assert_eq!(source, CertSource::GeneratedEarlier);
        assert!(!tls.reload().unwrap(), "unchanged files are not reloaded");
        // Replace the pair: the next reload picks it up.
        std::thread::sleep(Duration::from_millis(20));
        generate(dir.path(), &names("other.example.test")).unwrap();
        assert!(tls.reload().unwrap());
    }

    #[test]
    fn names_are_the_host_and_the_listen_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let n = CertNames::new("mail.example.test", [ip("127.0.0.1"), ip("192.0.2.7"), ip("127.0.0.1")]);
        assert_eq!(n.common_name, "mail.example.test");
        assert_eq!(n.dns_names, ["mail.example.test", "localhost"]);
        assert_eq!(n.ip_addresses, [ip("127.0.0.1"), ip("192.0.2.7")], "each address once");
        assert_eq!(n.to_string(), "CN=mail.example.test; DNS:mail.example.test, DNS:localhost, IP:127.0.0.1, IP:192.0.2.7");
        // Unspecified addresses: the loopback of the family stands in (:: is dual-stack).
        assert_eq!(CertNames::new("h.test", [ip("0.0.0.0")]).ip_addresses, [ip("127.0.0.1")]);
        assert_eq!(CertNames::new("h.test", [ip("::")]).ip_addresses, [ip("127.0.0.1"), ip("::1")]);
        // No loopback listener: no localhost either.
        let public = CertNames::new("h.test", [ip("192.0.2.7"), ip("2001:db8::7")]);
        assert_eq!((public.dns_names.as_slice(), public.ip_addresses.len()), (["h.test".to_string()].as_slice(), 2));
        // Equal in any order, not with another host name or address.
        let mut shuffled = n.clone();
        shuffled.dns_names.reverse();
        shuffled.ip_addresses.reverse();
        assert_eq!(shuffled, n);
        assert_ne!(CertNames::new("other.example.test", [ip("127.0.0.1"), ip("192.0.2.7")]), n);
        assert_ne!(CertNames::new("mail.example.test", [ip("127.0.0.1")]), n);
    }

    #[test]
    fn generated_certificate_carries_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let want = CertNames::new("mail.example.test", ["127.0.0.1".parse().unwrap(), "2001:db8::25".parse().unwrap()]);
        generate(dir.path(), &want).unwrap();
        let der = read_certificate(&dir.path().join(GENERATED_CERT)).unwrap();
        let info = describe(&der).unwrap();
        assert_eq!(info.subject, "CN=mail.example.test");
        assert_eq!(info.common_name.as_deref(), Some("mail.example.test"));
        assert_eq!(info.alt_names(), "DNS:mail.example.test, DNS:localhost, IP:127.0.0.1, IP:2001:db8::25");
        assert_eq!(CertNames::of(&info), want);
        assert!(info.not_before < 1_000_000_000 && info.not_after > 4_000_000_000, "{} {}", info.not_before, info.not_after);
        assert_eq!(info.fingerprints, Fingerprints::of(&der));
    }

    #[test]
    fn fingerprints_as_openssl_prints_them() {
        // The digests of no bytes at all (RFC 1321 A.5, FIPS 180-2).
        let fp = Fingerprints::of(b"");
        assert_eq!(fp.md5, "D4:1D:8C:D9:8F:00:B2:04:E9:80:09:98:EC:F8:42:7E");
        assert_eq!(fp.sha256, "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55");
        assert_eq!(Fingerprints::of(b"abc").md5, "90:01:50:98:3C:D2:4F:B0:D6:96:3F:7D:28:E1:7F:72");
    }

    #[test]
    fn changed_names_regenerate_the_pair() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let empty = Path::new("");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let first = CertNames::new("mail.example.test", [ip("127.0.0.1")]);
        let (tls, source) = ServerTls::load(empty, empty, dir.path(), &first).unwrap();
        assert_eq!(source, CertSource::Generated);
        let der = tls.certificate();
        let (tls, source) = ServerTls::load(empty, empty, dir.path(), &first).unwrap();
        assert_eq!((source, tls.certificate()), (CertSource::GeneratedEarlier, der.clone()), "same names: kept");
        // Another listen address, then another host name: a new pair each time, saying what the
        // old one named.
        let moved = CertNames::new("mail.example.test", [ip("127.0.0.1"), ip("192.0.2.7")]);
        let (tls, source) = ServerTls::load(empty, empty, dir.path(), &moved).unwrap();
        assert_eq!(source, CertSource::Regenerated { previous: first.to_string() });
        assert_ne!(tls.certificate(), der);
        assert_eq!(CertNames::of(&describe(&tls.certificate()).unwrap()), moved);
        let renamed = CertNames::new("post.example.test", [ip("127.0.0.1"), ip("192.0.2.7")]);
        let (_, source) = ServerTls::load(empty, empty, dir.path(), &renamed).unwrap();
        assert_eq!(source, CertSource::Regenerated { previous: moved.to_string() });
        let (_, source) = ServerTls::load(empty, empty, dir.path(), &renamed).unwrap();
        assert_eq!(source, CertSource::GeneratedEarlier);
        // A pair from before the names were the host's (CN "rcgen self signed cert").
        let old = rcgen::generate_simple_self_signed(vec!["post.example.test".to_string(), "localhost".to_string()]).unwrap();
        std::fs::write(dir.path().join(GENERATED_KEY), old.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join(GENERATED_CERT), old.cert.pem()).unwrap();
        let (tls, source) = ServerTls::load(empty, empty, dir.path(), &renamed).unwrap();
        let CertSource::Regenerated { previous } = source else { panic!("{source:?}") };
        assert!(previous.starts_with("CN=rcgen self signed cert;"), "{previous}");
        assert_eq!(describe(&tls.certificate()).unwrap().subject, "CN=post.example.test");
        // Still two 0600 files and nothing else.
        let mut files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        files.sort();
        assert_eq!(files, [GENERATED_CERT, GENERATED_KEY]);
        for f in &files {
            let meta = std::fs::symlink_metadata(dir.path().join(f)).unwrap();
            assert!(meta.is_file() && meta.permissions().mode() & 0o777 == 0o600, "{f}");
        }
    }

    #[test]
    fn open_never_generates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Path::new("");
        assert!(ServerTls::open(empty, empty, dir.path()).err().unwrap().to_string().contains("tls-cert.pem"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
        let old = CertNames::new("old.example.test", [IpAddr::from([127, 0, 0, 1])]);
        let (tls, _) = ServerTls::load(empty, empty, dir.path(), &old).unwrap();
        let opened = ServerTls::open(empty, empty, dir.path()).unwrap();
        assert_eq!(opened.certificate(), tls.certificate(), "the pair as it is, names not judged");
    }

    #[test]
    fn certificate_file_is_the_configured_or_the_generated_one() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Path::new("");
        assert_eq!(certificate_file(empty, dir.path()).unwrap(), None, "none generated yet");
        assert_eq!(certificate_file(Path::new("/etc/c.pem"), dir.path()).unwrap(), Some(PathBuf::from("/etc/c.pem")));
        generate(dir.path(), &names("h.test")).unwrap();
        assert_eq!(certificate_file(empty, dir.path()).unwrap(), Some(dir.path().join(GENERATED_CERT)));
        // A planted link is refused here as `load` refuses it.
        let other = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path().join(GENERATED_CERT), other.path().join(GENERATED_CERT)).unwrap();
        assert!(certificate_file(empty, other.path()).unwrap_err().to_string().contains("symbolic link"));
    }

    #[test]
    fn key_permissions_as_openssh_and_postgresql_judge_them() {
        for mode in [0o100600, 0o100400, 0o600, 0o700] {
            assert!(!key_too_open(mode, 1000, 1000), "{mode:o}");
            assert!(!key_too_open(mode, 0, 0), "{mode:o}");
        }
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602, 0o620, 0o666, 0o100644] {
            assert!(key_too_open(mode, 1000, 1000), "{mode:o}");
            assert!(key_too_open(mode, 0, 0), "{mode:o}: root's own key");
        }
        // Root's key readable by a group (ssl-cert) the unprivileged server belongs to.
        assert!(!key_too_open(0o640, 0, 1000));
        assert!(key_too_open(0o640, 1000, 1000), "only a key root owns");
        assert!(key_too_open(0o644, 0, 1000) && key_too_open(0o660, 0, 1000));
    }

    #[test]
    fn loose_key_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &names("mail.example.test")).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::rename(dir.path().join(GENERATED_CERT), &c).unwrap();
        std::fs::rename(dir.path().join(GENERATED_KEY), &k).unwrap();
        let chmod = |mode| std::fs::set_permissions(&k, std::fs::Permissions::from_mode(mode)).unwrap();
        chmod(0o644);
        let err = ServerTls::load(&c, &k, dir.path(), &names("h")).err().unwrap().to_string();
        let shown = k.display();
        assert_eq!(
            err,
            format!("permissions 0644 for {shown} are too open: a private key must not be accessible by group or others; chmod 600 {shown}")
        );
        chmod(0o600);
        let (tls, _) = ServerTls::load(&c, &k, dir.path(), &names("h")).unwrap();
        // A key loosened later is not loaded; the one loaded stays in use.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&k, std::fs::read(&k).unwrap()).unwrap();
        chmod(0o604);
        assert!(tls.reload().unwrap_err().to_string().contains("too open"));
    }

    #[test]
    fn replace_with_moves_every_clone_to_the_new_files() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let empty = Path::new("");
        let (tls, _) = ServerTls::load(empty, empty, a.path(), &names("a.example.test")).unwrap();
        let clone = tls.clone();
        let (other, _) = ServerTls::load(empty, empty, b.path(), &names("b.example.test")).unwrap();
        tls.replace_with(&other);
        assert_eq!(clone.certificate(), other.certificate());
        assert_eq!(clone.cert_path(), b.path().join(GENERATED_CERT));
        // The old files changing later do not bring the old certificate back.
        std::thread::sleep(Duration::from_millis(20));
        generate(a.path(), &names("a.example.test")).unwrap();
        assert!(!clone.reload().unwrap());
        assert_eq!(clone.certificate(), other.certificate());
    }

    #[test]
    fn a_managed_pair_stays_until_its_owner_replaces_it() {
        // O6 (ACME): the pair presented as managed is neither reloaded from changed files nor
        // replaced by a reloaded configuration; only `present_managed` replaces it.
        let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let empty = Path::new("");
        let (tls, _) = ServerTls::load(empty, empty, a.path(), &names("a.example.test")).unwrap();
        assert!(!tls.is_managed());
        generate(b.path(), &names("b.example.test")).unwrap();
        let leaf = tls.present_managed(&b.path().join(GENERATED_CERT), &b.path().join(GENERATED_KEY)).unwrap();
        assert!(tls.is_managed());
        assert_eq!(tls.clone().certificate(), leaf);
        let (other, _) = ServerTls::load(empty, empty, c.path(), &names("c.example.test")).unwrap();
        assert!(!tls.replace_with(&other), "a reload keeps the managed pair");
        assert_eq!(tls.certificate(), leaf);
        std::thread::sleep(Duration::from_millis(20));
        generate(b.path(), &names("b.example.test")).unwrap();
        assert!(!tls.reload().unwrap(), "the watcher leaves a managed pair to its owner");
        assert_eq!(tls.certificate(), leaf);
        let renewed = tls.present_managed(&b.path().join(GENERATED_CERT), &b.path().join(GENERATED_KEY)).unwrap();
        assert_ne!(renewed, leaf);
        assert_eq!(tls.certificate(), renewed);
        // A pair that does not load changes nothing.
        let err = tls.present_managed(&b.path().join(GENERATED_CERT), &c.path().join(GENERATED_KEY)).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch(_)), "{err}");
        assert_eq!(tls.certificate(), renewed);
    }

    #[test]
    fn check_pair_judges_pem_before_it_is_written() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        generate(a.path(), &names("a.example.test")).unwrap();
        generate(b.path(), &names("b.example.test")).unwrap();
        let pem = |dir: &Path, name: &str| std::fs::read(dir.join(name)).unwrap();
        let leaf = check_pair(&pem(a.path(), GENERATED_CERT), &pem(a.path(), GENERATED_KEY)).unwrap();
        assert_eq!(leaf, read_certificate(&a.path().join(GENERATED_CERT)).unwrap());
        assert!(check_pair(&pem(a.path(), GENERATED_CERT), &pem(b.path(), GENERATED_KEY)).is_err(), "another key");
        assert!(check_pair(b"", &pem(a.path(), GENERATED_KEY)).is_err(), "no certificate");
        assert!(check_pair(&pem(a.path(), GENERATED_CERT), b"").is_err(), "no key");
    }

    #[test]
    fn planted_links_are_neither_followed_nor_read() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let empty = Path::new("");
        // Only the key planted (dangling or not): refused, nothing written through it.
        std::os::unix::fs::symlink(&victim, data.join(GENERATED_KEY)).unwrap();
        let err = ServerTls::load(empty, empty, &data, &names("h")).err().unwrap().to_string();
        assert!(err.contains("tls-key.pem is a symbolic link") && err.contains("remove it"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_file(data.join(GENERATED_KEY)).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nothing"), data.join(GENERATED_KEY)).unwrap();
        assert!(ServerTls::load(empty, empty, &data, &names("h")).is_err());
        assert!(!dir.path().join("nothing").exists(), "no file created through a dangling link");
        // A whole pair planted as links to someone else's certificate and key: not used.
        std::fs::remove_file(data.join(GENERATED_KEY)).unwrap();
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        generate(&theirs, &names("h")).unwrap();
        std::os::unix::fs::symlink(theirs.join(GENERATED_CERT), data.join(GENERATED_CERT)).unwrap();
        std::os::unix::fs::symlink(theirs.join(GENERATED_KEY), data.join(GENERATED_KEY)).unwrap();
        let err = ServerTls::load(empty, empty, &data, &names("h")).err().unwrap().to_string();
        assert!(err.contains("tls-cert.pem is a symbolic link"), "{err}");
    }

    #[test]
    fn half_a_generated_pair_is_replaced_by_a_new_pair() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let empty = Path::new("");
        std::fs::write(dir.path().join(GENERATED_KEY), "left by a crash").unwrap();
        let (_, source) = ServerTls::load(empty, empty, dir.path(), &names("h")).unwrap();
        assert_eq!(source, CertSource::Generated);
        let meta = std::fs::symlink_metadata(dir.path().join(GENERATED_KEY)).unwrap();
        assert!(meta.is_file() && meta.permissions().mode() & 0o777 == 0o600);
        let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, [GENERATED_CERT, GENERATED_KEY], "no temporary file is left behind");
    }

    #[test]
    fn broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, "not a certificate").unwrap();
        std::fs::write(&k, "not a key").unwrap();
        let err = ServerTls::load(&c, &k, dir.path(), &names("h")).err().unwrap().to_string();
        assert!(err.contains("c.pem"), "{err}");
    }
}
