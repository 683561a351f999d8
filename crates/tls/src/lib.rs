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
    /// (generating it for `hostname` first if there is none yet). `data_dir` must be a directory
    /// only this user can write (the store checks it). A key file group or others may read is
    /// refused, as OpenSSH refuses one.
    pub fn load(cert: &Path, key: &Path, data_dir: &Path, hostname: &str) -> Result<(ServerTls, CertSource), TlsError> {
        let (cert, key, source) = if cert.as_os_str().is_empty() && key.as_os_str().is_empty() {
            let (c, k) = (data_dir.join(GENERATED_CERT), data_dir.join(GENERATED_KEY));
            let (have_cert, have_key) = (generated_file_present(&c)?, generated_file_present(&k)?);
            let source = if have_cert && have_key {
                CertSource::GeneratedEarlier
            } else {
                // None yet, or half a pair (a crash between the two files): a new pair.
                generate(data_dir, hostname)?;
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
    use std::io::Read;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    let stamp = stamps(cert, key);
    let cert_pem = std::fs::read(cert).map_err(io(cert))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    // The permissions of the file actually opened, not of whatever the name pointed to before.
    let mut key_file = std::fs::File::open(key).map_err(io(key))?;
    judge_key(key, &key_file.metadata().map_err(io(key))?)?;
    let mut key_pem = Vec::new();
    key_file.read_to_end(&mut key_pem).map_err(io(key))?;
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

/// The user id that owns the files this process creates (its effective uid), read as the owner
/// of a new pipe, because this crate makes no foreign calls (`geteuid` would need `unsafe`).
fn effective_uid() -> io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let (reader, _writer) = io::pipe()?;
    Ok(std::fs::File::from(std::os::fd::OwnedFd::from(reader)).metadata()?.uid())
}

/// Whether a generated certificate file is there. It must be a regular file we own: a link or
/// another user's file (planted before the data directory was ours) is refused, never read
/// (its key would be known to someone else) nor written through.
fn generated_file_present(path: &Path) -> Result<bool, TlsError> {
    use std::os::unix::fs::MetadataExt;
    let io = |source| TlsError::Io { path: path.to_path_buf(), source };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(e)),
    };
    let euid = effective_uid().map_err(io)?;
    let what = if meta.file_type().is_symlink() {
        "a symbolic link".to_string()
    } else if !meta.is_file() {
        "not a regular file".to_string()
    } else if meta.uid() != euid {
        format!("owned by uid {}, not by uid {euid} that runs postroom", meta.uid())
    } else {
        return Ok(true);
    };
    Err(TlsError::Untrusted(format!(
        "{} is {what}: the generated certificate and key must be regular files of the user that runs postroom; \
         remove it (a new self-signed pair is generated) or set [tls] cert and key",
        path.display()
    )))
}

/// A self-signed certificate for `hostname` into `dir`, both files 0600: each written to a new
/// temporary file (O_EXCL, O_NOFOLLOW: never through a link someone left there), fsynced and
/// renamed into place.
fn generate(dir: &Path, hostname: &str) -> Result<(), TlsError> {
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let write =
        |name: &str, text: String| write_private_atomic(dir, name, text.as_bytes()).map_err(|source| TlsError::Io { path: dir.join(name), source });
    write(GENERATED_KEY, made.signing_key.serialize_pem())?;
    write(GENERATED_CERT, made.cert.pem())
}

/// `dir/name` as a new 0600 file, atomically (temp file with a unique name, created with O_EXCL
/// and O_NOFOLLOW, fsynced, renamed over `name`).
fn write_private_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut attempts = 0;
    let (tmp, mut file) = loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp) {
            Ok(f) => break (tmp, f),
            // Left by an earlier process with the same pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => attempts += 1,
            Err(e) => return Err(e),
        }
    };
    let written = file.write_all(bytes).and_then(|()| file.sync_all()).and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
        generate(dir.path(), "other.example.test").unwrap();
        assert!(tls.reload().unwrap());
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
        generate(dir.path(), "mail.example.test").unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::rename(dir.path().join(GENERATED_CERT), &c).unwrap();
        std::fs::rename(dir.path().join(GENERATED_KEY), &k).unwrap();
        let chmod = |mode| std::fs::set_permissions(&k, std::fs::Permissions::from_mode(mode)).unwrap();
        chmod(0o644);
        let err = ServerTls::load(&c, &k, dir.path(), "h").err().unwrap().to_string();
        let shown = k.display();
        assert_eq!(
            err,
            format!("permissions 0644 for {shown} are too open: a private key must not be accessible by group or others; chmod 600 {shown}")
        );
        chmod(0o600);
        let (tls, _) = ServerTls::load(&c, &k, dir.path(), "h").unwrap();
        // A key loosened later is not loaded; the one loaded stays in use.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&k, std::fs::read(&k).unwrap()).unwrap();
        chmod(0o604);
        assert!(tls.reload().unwrap_err().to_string().contains("too open"));
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
        let err = ServerTls::load(empty, empty, &data, "h").err().unwrap().to_string();
        assert!(err.contains("tls-key.pem is a symbolic link") && err.contains("remove it"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_file(data.join(GENERATED_KEY)).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nothing"), data.join(GENERATED_KEY)).unwrap();
        assert!(ServerTls::load(empty, empty, &data, "h").is_err());
        assert!(!dir.path().join("nothing").exists(), "no file created through a dangling link");
        // A whole pair planted as links to someone else's certificate and key: not used.
        std::fs::remove_file(data.join(GENERATED_KEY)).unwrap();
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        generate(&theirs, "h").unwrap();
        std::os::unix::fs::symlink(theirs.join(GENERATED_CERT), data.join(GENERATED_CERT)).unwrap();
        std::os::unix::fs::symlink(theirs.join(GENERATED_KEY), data.join(GENERATED_KEY)).unwrap();
        let err = ServerTls::load(empty, empty, &data, "h").err().unwrap().to_string();
        assert!(err.contains("tls-cert.pem is a symbolic link"), "{err}");
    }

    #[test]
    fn half_a_generated_pair_is_replaced_by_a_new_pair() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let empty = Path::new("");
        std::fs::write(dir.path().join(GENERATED_KEY), "left by a crash").unwrap();
        let (_, source) = ServerTls::load(empty, empty, dir.path(), "h").unwrap();
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
        let err = ServerTls::load(&c, &k, dir.path(), "h").err().unwrap().to_string();
        assert!(err.contains("c.pem"), "{err}");
    }
}
