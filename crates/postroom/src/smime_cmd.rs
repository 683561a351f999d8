//! `postroom smime`: the S/MIME certificate store (SPEC F8, issue 18) — users' own certificates
//! and keys, their correspondents' certificates — and what `postroom send --sign/--encrypt`
//! takes from it. `postroom cert` is the server's TLS certificate; S/MIME keeps its own word.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use smime::{Certificate, Identity, Purpose, table};
use store::Durability;

use postroom::config::Config;

use crate::commands::open;
use crate::out::outln;

#[derive(Subcommand)]
pub enum SmimeCommand {
    /// Keep USER's own certificate and private key (PEM or DER; an unprotected key), with which
    /// `send --sign` signs and which decrypts the sent copy. The certificate must be valid now,
    /// name one of USER's addresses (subjectAltName email) and belong to the key; a certificate
    /// file may carry the issuing CAs after it, which signatures then include.
    Import {
        user: String,
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Keep the certificate of ADDRESS (which it must name), to which `send --encrypt` encrypts.
    /// Local users' own certificates (`import`) serve without this.
    AddRecipient {
        address: String,
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
    },
    /// List the certificates: owner (user or address), subject, e-mail, valid until.
    List,
    /// Remove USER's own certificate and key, or the certificate of ADDRESS (with an @).
    Remove {
        #[arg(value_name = "USER|ADDRESS")]
        user_or_address: String,
    },
}

pub fn smime(cmd: SmimeCommand, config: &Config) -> anyhow::Result<()> {
    let (store, _) = open(config)?;
    let now = store::now();
    match cmd {
        SmimeCommand::Import { user, cert, key } => {
            let identity = Identity::parse(&read(&cert, "--cert")?, &read(&key, "--key")?, now)
                .map_err(|e| anyhow::anyhow!("{}: refused: {e}", cert.display()))?;
            let (u, id) = (user.clone(), identity.clone());
            let replaced = store.write_blocking(Durability::Full, move |c| table::import_identity(c, &u, &id, now).map_err(invalid))?;
            outln!(
                "{} S/MIME certificate of {user}: {} ({}), valid until {}",
                if replaced { "replaced the" } else { "imported the" },
                identity.cert.subject,
                identity.cert.emails.join(", "),
                smime::cert::date(identity.cert.not_after)
            );
        }
        SmimeCommand::AddRecipient { address, cert: path } => {
            let cert = Certificate::parse(&read(&path, "--cert")?)
                .and_then(|c| c.check(Purpose::Encrypt, now).map(|()| c))
                .map_err(|e| anyhow::anyhow!("{}: refused: {e}", path.display()))?;
            let (a, c2) = (address.clone(), cert.clone());
            let replaced = store.write_blocking(Durability::Full, move |c| table::add_recipient(c, &a, &c2, now).map_err(invalid))?;
            outln!(
                "{} S/MIME certificate of {}: {}, valid until {}",
                if replaced { "replaced the" } else { "added the" },
                address.trim().to_ascii_lowercase(),
                cert.subject,
                smime::cert::date(cert.not_after)
            );
        }
        SmimeCommand::List => {
            let rows = store.read_blocking(|c| table::list(c).map_err(invalid))?;
            if rows.is_empty() {
                outln!("no S/MIME certificates (add them with `postroom smime import` and `postroom smime add-recipient`)");
                return Ok(());
            }
            outln!("{:<28} {:<10} {:<32} {:<32} subject", "owner", "kind", "email", "valid until");
            for r in rows {
                let expired = if r.not_after < now { " (expired)" } else { "" };
                outln!(
                    "{:<28} {:<10} {:<32} {:<32} {}",
                    r.owner,
                    if r.has_key { "own+key" } else { "recipient" },
                    r.emails.join(","),
                    format!("{}{expired}", smime::cert::date(r.not_after)),
                    r.subject
                );
            }
        }
        SmimeCommand::Remove { user_or_address } => {
            let key = user_or_address.clone();
            let n = store.write_blocking(Durability::Full, move |c| table::remove(c, &key).map_err(invalid))?;
            if n == 0 {
                bail!("{user_or_address} has no S/MIME certificate (see `postroom smime list`)");
            }
            outln!("removed the S/MIME certificate of {user_or_address}");
        }
    }
    Ok(())
}

/// The send API's S/MIME step (SPEC F8, issue 18): sign with the From address's certificate,
/// then encrypt for every recipient and the sender. Any missing or unusable certificate is an
/// error naming whose it is — never a silent plaintext send.
pub fn protect(config: &Config, from: &str, recipients: &[String], message: &[u8], sign: bool, encrypt: bool) -> anyhow::Result<Vec<u8>> {
    if !sign && !encrypt {
        return Ok(message.to_vec());
    }
    crate::commands::require_database(config, "the configuration")?;
    let (store, _) = open(config)?;
    let now = store::now();
    let (from_, rcpts) = (from.to_string(), recipients.to_vec());
    let (signer, certs) = store.read_blocking(move |c| {
        let signer = if sign { Some(table::signer(c, &from_, now).map_err(invalid)?) } else { None };
        let certs = if encrypt {
            let mut certs = Vec::new();
            for address in rcpts.iter().chain([&from_]) {
                certs.push(table::recipient(c, address, now).map_err(invalid)?);
            }
            Some(certs)
        } else {
            None
        };
        Ok((signer, certs))
    })?;
    smime::protect(message, signer.as_ref(), certs.as_deref()).context("S/MIME")
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

fn invalid(e: smime::SmimeError) -> store::StoreError {
    match e {
        smime::SmimeError::Sqlite(e) => e.into(),
        other => store::StoreError::Invalid(other.to_string()),
    }
}
