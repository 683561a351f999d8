//! TLS for Postroom's servers (SPEC S2, S6, P2), rustls with the ring provider only.
//!
//! * [`ServerTls`] holds the current rustls server configuration: the PEM certificate and key of
//!   `[tls] cert`/`key`, or a self-signed certificate for `hostname` generated into the data
//!   directory on first start. [`ServerTls::reload`] re-reads changed files, so certificates are
//!   replaced without a restart; new handshakes use the new ones.
//! * [`Stream`] is a connection that starts plain or TLS and can be upgraded once (STARTTLS, STLS)
//!   within a handshake deadline.
#![forbid(unsafe_code)]

use std::io;
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
}

/// The server side of TLS, shared by every listener.
#[derive(Clone)]
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<RwLock<Loaded>>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    stamp: (Option<SystemTime>, Option<SystemTime>),
}

impl ServerTls {
    /// Load `cert`/`key`, or when both are empty, the certificate generated in `data_dir`
    /// (generating it for `hostname` first if there is none yet).
    pub fn load(cert: &Path, key: &Path, data_dir: &Path, hostname: &str) -> Result<(ServerTls, CertSource), TlsError> {
        let (cert, key, source) = if cert.as_os_str().is_empty() && key.as_os_str().is_empty() {
            let (c, k) = (data_dir.join(GENERATED_CERT), data_dir.join(GENERATED_KEY));
            let source = if c.exists() && k.exists() {
                CertSource::GeneratedEarlier
            } else {
                generate(&c, &k, hostname)?;
                CertSource::Generated
            };
            (c, k, source)
        } else {
            (cert.to_path_buf(), key.to_path_buf(), CertSource::Files)
        };
        let loaded = read(&cert, &key)?;
        Ok((ServerTls { cert, key, current: Arc::new(RwLock::new(loaded)) }, source))
    }

    /// The acceptor for a new handshake, with the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("tls config lock").config.clone())
    }

    /// Re-read the files if they changed since the last load. A broken new pair is reported and
    /// the old one stays in use. Returns true when a new certificate was loaded.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let stamp = stamps(&self.cert, &self.key);
        if self.current.read().expect("tls config lock").stamp == stamp {
            return Ok(false);
        }
        let loaded = read(&self.cert, &self.key)?;
        *self.current.write().expect("tls config lock") = loaded;
        Ok(true)
    }

    /// Check the files every `every` and reload them when they change (O6).
    pub fn spawn_reloader(&self, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match me.reload() {
                    Ok(true) => tracing::info!(cert = %me.cert.display(), "TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "new TLS certificate not loaded; the previous one stays in use"),
                }
            }
        });
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

fn stamps(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

fn read(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    let stamp = stamps(cert, key);
    let cert_pem = std::fs::read(cert).map_err(io(cert))?;
    let key_pem = std::fs::read(key).map_err(io(key))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey { path: key.to_path_buf(), why: e.to_string() })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(Loaded { config: Arc::new(config), stamp })
}

/// The one crypto provider (TOOLCHAIN: never let aws-lc-rs and ring race).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate for `hostname`; key file 0600.
fn generate(cert: &Path, key: &Path, hostname: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let write = |path: &Path, text: String| -> Result<(), TlsError> {
        let io = |source| TlsError::Io { path: path.to_path_buf(), source };
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    };
    write(key, made.signing_key.serialize_pem())?;
    write(cert, made.cert.pem())
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

    #[test]
    fn generates_once_then_reuses_and_reloads_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Path::new("");
        let (tls, source) = ServerTls::load(empty, empty, dir.path(), "mail.example.test").unwrap();
        assert_eq!(source, CertSource::Generated);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(GENERATED_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "private key readable by its owner only");
        let (_, source) = ServerTls::load(empty, empty, dir.path(), "mail.example.test").unwrap();
        assert_eq!(source, CertSource::GeneratedEarlier);
        assert!(!tls.reload().unwrap(), "unchanged files are not reloaded");
        // Replace the pair: the next reload picks it up.
        std::thread::sleep(Duration::from_millis(20));
        generate(&dir.path().join(GENERATED_CERT), &dir.path().join(GENERATED_KEY), "other.example.test").unwrap();
        assert!(tls.reload().unwrap());
    }

    #[test]
    fn broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, "not a certificate").unwrap();
        std::fs::write(&k, "not a key").unwrap();
        let err = ServerTls::load(&c, &k, dir.path(), "h").err().unwrap().to_string();
        assert!(err.contains("c.pem"), "{err}");
    }
}
