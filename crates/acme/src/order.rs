//! One certificate order (RFC 8555 §7.4, SPEC O6): the account (registered once, kept in the
//! data directory), a new order for the names, their HTTP-01 challenges offered on the responder,
//! validation, finalization with a new key, and the certificate chain.

use std::time::Duration;

use anyhow::{Context, bail};
use instant_acme::{Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy};

use crate::Settings;
use crate::files::AcmeDir;
use crate::http01::Challenges;

/// A new certificate chain (PEM, the server's certificate first) and its private key (PEM).
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// RFC 8555 §6.7: the server does not know the account (its database was reset, as a test
/// server's is at every start).
const ACCOUNT_GONE: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

/// Validation and issuance take seconds; the whole order is bounded by the caller.
const POLL: RetryPolicy = RetryPolicy::new().initial_delay(Duration::from_millis(500)).backoff(1.5).timeout(Duration::from_secs(120));

/// Order a certificate for `settings.names`.
pub async fn order(settings: &Settings, dir: &AcmeDir, challenges: &Challenges) -> anyhow::Result<Issued> {
    let account = account(settings, dir).await?;
    let identifiers: Vec<Identifier> = settings.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
        Err(instant_acme::Error::Api(problem)) if problem.r#type.as_deref() == Some(ACCOUNT_GONE) => {
            dir.forget_account()?;
            bail!("the ACME server no longer knows our account ({problem}); a new one is registered at the next attempt");
        }
        other => other.context("placing the order")?,
    };
    // Each token is answered until the order is decided (the guards withdraw them).
    let mut offered = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.context("reading an authorization")?;
        let name = authorization.identifier().to_string();
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => bail!("the authorization for {name} is {other:?}"),
        }
        let mut challenge =
            authorization.challenge(ChallengeType::Http01).with_context(|| format!("the ACME server offers no HTTP-01 challenge for {name}"))?;
        offered.push(challenges.offer(&challenge.token, challenge.key_authorization().as_str()));
        challenge.set_ready().await.with_context(|| format!("the HTTP-01 challenge for {name}"))?;
    }
    let status = order.poll_ready(&POLL).await.context("waiting for the ACME server to validate the names")?;
    if status != OrderStatus::Ready {
        bail!("the ACME server did not validate the names: {}", why_invalid(&mut order).await);
    }
    drop(offered);
    // A new key for every certificate: a key that leaked with an old certificate dies with it.
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let mut params = rcgen::CertificateParams::new(settings.names.clone()).context("the names")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).context("making the certificate request")?;
    order.finalize_csr(csr.der()).await.context("finalizing the order")?;
    let chain_pem = order.poll_certificate(&POLL).await.context("downloading the certificate")?;
    Ok(Issued { chain_pem, key_pem: key.serialize_pem() })
}

/// The account of `settings.directory`: the stored one, or a new one registered now (agreeing to
/// the server's terms of service, which setting `directory` stands for) and stored.
async fn account(settings: &Settings, dir: &AcmeDir) -> anyhow::Result<Account> {
    let builder = || match &settings.ca_file {
        Some(ca) => Account::builder_with_root(ca).with_context(|| format!("tls.acme.ca_file {}", ca.display())),
        None => Account::builder().context("the system's trusted certificates"),
    };
    let directory = &settings.directory;
    if let Some(credentials) = dir.account(directory)? {
        return builder()?.from_credentials(credentials).await.with_context(|| format!("reading the ACME directory {directory}"));
    }
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) =
        builder()?.create(&new, directory.clone(), None).await.with_context(|| format!("registering an account at {directory}"))?;
    dir.save_account(directory, credentials)?;
    tracing::info!(account = account.id(), %directory, "ACME: registered an account");
    Ok(account)
}

/// What the server says went wrong with each name's challenge.
async fn why_invalid(order: &mut Order) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let name = authorization.identifier().to_string();
        if let Ok(state) = authorization.refresh().await {
            reasons.extend(state.challenges.iter().filter_map(|c| c.error.as_ref()).map(|p| format!("{name}: {p}")));
        }
    }
    if reasons.is_empty() { "the order is invalid (no reason given)".to_string() } else { reasons.join("; ") }
}
