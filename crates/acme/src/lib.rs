//! Trusted certificates from an ACME server (RFC 8555; SPEC O6, issue 15) for the TLS listeners.
//!
//! With `[tls.acme] directory` set, `serve` calls [`start`]: Postroom registers an account, orders
//! a certificate for its names, proves control of each with HTTP-01 answered by its own responder
//! on `http_listen` ([`http01`]), and presents the certificate on every TLS listener without a
//! restart — the self-signed (or `[tls] cert`) one serves only until the first issuance. A
//! background task checks every `check_secs` and orders again when fewer than `renew_days` days
//! are left or the names changed ([`renewal`]); a failure is logged with its reason and retried
//! with a backoff while the certificate in use stays. State lives in `data_dir/acme` ([`files`]).
#![forbid(unsafe_code)]

pub mod files;
pub mod http01;
mod keeper;
mod order;
pub mod renewal;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tls::ServerTls;
use tokio::net::TcpListener;

pub use files::certificate_file;

/// `tls.acme.ca_file` must hold a PEM certificate (for `start` and `config check`).
pub fn check_ca_file(ca: &Path) -> anyhow::Result<()> {
    CertificateDer::from_pem_file(ca).with_context(|| format!("tls.acme.ca_file: no CA certificate read from {}", ca.display()))?;
    Ok(())
}

/// What `[tls.acme]` asks for, checked by the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The ACME server's directory URL (https).
    pub directory: String,
    /// `mailto:` addresses the ACME server may write to about the account.
    pub contact: Vec<String>,
    /// The DNS names the certificate carries.
    pub names: Vec<String>,
    /// Renew when fewer than this many days of validity are left.
    pub renew_days: u32,
    /// A CA to trust for the ACME server's own HTTPS (a private server such as pebble); None:
    /// the system's trusted certificates.
    pub ca_file: Option<PathBuf>,
    /// How often to check the certificate, and the longest wait between retries.
    pub check_every: Duration,
    /// The data directory; the state goes in its `acme` directory.
    pub data_dir: PathBuf,
}

/// Serve the certificate issued at an earlier start when it still names `settings.names` and
/// has not expired, answer HTTP-01 on `http`, and keep a certificate in `tls` from now on (a
/// background task of the current tokio runtime). Fails only on local trouble — an unreadable
/// `ca_file`, a data directory that is not ours —; the ACME server is first asked in the
/// background, so a server that is down never delays or stops the start.
pub fn start(settings: Settings, tls: ServerTls, http: Vec<TcpListener>) -> anyhow::Result<()> {
    // instant-acme's HTTPS client takes the process's provider: the ring one, as everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(ca) = &settings.ca_file {
        check_ca_file(ca)?;
    }
    let dir = files::AcmeDir::open(&settings.data_dir).context("tls.acme: the ACME state directory")?;
    let challenges = http01::Challenges::default();
    for listener in http {
        tokio::spawn(http01::serve(listener, challenges.clone()));
    }
    let keeper = keeper::Keeper::new(settings, dir, tls, challenges);
    tokio::spawn(keeper.run());
    Ok(())
}
