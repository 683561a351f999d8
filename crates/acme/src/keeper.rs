//! The background task that keeps an ACME certificate in the listeners (SPEC O6): check, order
//! when due, install, and on failure log why and retry later while the certificate in use stays.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tls::{CertInfo, ServerTls};

use crate::Settings;
use crate::files::AcmeDir;
use crate::http01::Challenges;
use crate::order::{self, Issued};
use crate::renewal;

/// A whole order, from the account to the chain, must finish within this (the HTTP client has
/// no deadline of its own, and an ACME server that stops answering must not stall renewals).
const ORDER_DEADLINE: Duration = Duration::from_secs(300);

pub struct Keeper {
    settings: Settings,
    dir: AcmeDir,
    tls: ServerTls,
    challenges: Challenges,
    /// The ACME certificate the listeners present; None while the self-signed or configured
    /// one serves.
    served: Option<CertInfo>,
}

impl Keeper {
    /// Present the pair an earlier start obtained, when it is still good for the names.
    pub fn new(settings: Settings, dir: AcmeDir, tls: ServerTls, challenges: Challenges) -> Keeper {
        let mut keeper = Keeper { settings, dir, tls, challenges, served: None };
        keeper.served = keeper.earlier_pair();
        keeper
    }

    fn earlier_pair(&self) -> Option<CertInfo> {
        let (cert, key) = (self.dir.cert_path(), self.dir.key_path());
        let keep_current = "the current certificate serves until a new one is issued";
        match self.dir.has_pair() {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!("ACME: no certificate issued yet; {keep_current}");
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "ACME: the certificate issued earlier is not used; {keep_current}");
                return None;
            }
        }
        let info = match tls::read_certificate(&cert).map_err(|e| e.to_string()).and_then(|der| tls::describe(&der)) {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(cert = %cert.display(), error = %e, "ACME: the certificate issued earlier is unreadable; {keep_current}");
                return None;
            }
        };
        let missing = renewal::missing_names(&info, &self.settings.names);
        if !missing.is_empty() {
            tracing::info!(cert = %cert.display(), missing = %missing.join(", "), "ACME: the certificate issued earlier lacks names; {keep_current}");
            return None;
        }
        if info.not_after <= unix_now() {
            tracing::info!(cert = %cert.display(), expired = %http_date(info.not_after), "ACME: the certificate issued earlier has expired; {keep_current}");
            return None;
        }
        // A crash between writing the key and the certificate leaves a pair that does not fit.
        if let Err(e) = self.tls.present_managed(&cert, &key) {
            tracing::warn!(error = %e, "ACME: the certificate issued earlier does not load; {keep_current}");
            return None;
        }
        log_in_use("ACME: TLS certificate issued earlier", &info);
        Some(info)
    }

    pub async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let check_every = self.settings.check_every;
            let wait = match renewal::due(self.served.as_ref(), &self.settings.names, unix_now(), self.settings.renew_days) {
                None => check_every,
                Some(why) => {
                    tracing::info!(%why, directory = %self.settings.directory, names = %self.settings.names.join(", "), "ACME: ordering a certificate");
                    match self.renew().await {
                        Ok(()) => {
                            failures = 0;
                            check_every
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            let retry = renewal::retry_delay(failures, check_every);
                            let keeps = if self.served.is_some() {
                                "the ACME certificate in use stays"
                            } else {
                                "the self-signed or [tls] certificate stays in use"
                            };
                            tracing::error!(
                                directory = %self.settings.directory, failures, retry_in_secs = retry.as_secs(),
                                "ACME: no certificate obtained: {e:#}; {keeps}"
                            );
                            retry
                        }
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn renew(&mut self) -> anyhow::Result<()> {
        let ordered = tokio::time::timeout(ORDER_DEADLINE, order::order(&self.settings, &self.dir, &self.challenges)).await;
        let issued =
            ordered.unwrap_or_else(|_| Err(anyhow::anyhow!("the ACME server did not finish the order within {}s", ORDER_DEADLINE.as_secs())))?;
        let (dir, tls, names) = (self.dir.clone(), self.tls.clone(), self.settings.names.clone());
        // Files are written and fsynced: off the async workers.
        let info = tokio::task::spawn_blocking(move || install(&dir, &tls, &names, &issued)).await.context("installing the certificate")??;
        log_in_use("ACME: new TLS certificate issued and in use", &info);
        self.served = Some(info);
        Ok(())
    }
}

/// Check the new pair, write it to data_dir/acme and present it: new handshakes get it, open
/// sessions keep theirs. A pair that would not serve is never written.
fn install(dir: &AcmeDir, tls: &ServerTls, names: &[String], issued: &Issued) -> anyhow::Result<CertInfo> {
    let leaf = tls::check_pair(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes()).context("the certificate from the ACME server")?;
    let info = tls::describe(&leaf).map_err(|e| anyhow::anyhow!("the certificate from the ACME server: {e}"))?;
    let missing = renewal::missing_names(&info, names);
    anyhow::ensure!(missing.is_empty(), "the certificate from the ACME server does not name {}", missing.join(", "));
    dir.write_pair(&issued.chain_pem, &issued.key_pem).with_context(|| format!("writing {}", dir.cert_path().display()))?;
    tls.present_managed(&dir.cert_path(), &dir.key_path())?;
    Ok(info)
}

fn log_in_use(what: &str, info: &CertInfo) {
    tracing::info!(
        subject = %info.subject, names = %info.alt_names(), expires = %http_date(info.not_after),
        sha256 = %info.fingerprints.sha256, md5 = %info.fingerprints.md5, "{what}"
    );
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// `Tue, 01 Sep 2026 12:00:00 GMT`.
fn http_date(unix: i64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64))
}
