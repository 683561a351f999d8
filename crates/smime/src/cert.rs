//! Certificates and keys as `postroom smime import` / `add-recipient` take them, and the checks
//! that refuse one that cannot serve: expired or not yet valid, no e-mail address, a key that is
//! not the certificate's, a key usage that forbids what it would do (issue 18).

use openssl::asn1::Asn1Time;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use openssl::x509::{X509, X509ExtendedKeyUsage, X509KeyUsage, X509Ref};

use crate::SmimeError;

/// Below this an RSA key is refused: 1024-bit keys are breakable, and mail programs refuse them.
pub const MIN_RSA_BITS: u32 = 2048;

/// What a certificate is to do: sign the user's mail, or receive mail encrypted to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Sign,
    Encrypt,
}

/// A certificate with what `smime list` shows of it.
#[derive(Clone)]
pub struct Certificate {
    pub x509: X509,
    /// Further certificates of the file (the issuing CAs): sent along in signatures so a receiver
    /// can build the chain to the root it trusts.
    pub chain: Vec<X509>,
    pub subject: String,
    /// The subjectAltName rfc822Names, lower case.
    pub emails: Vec<String>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate").field("subject", &self.subject).field("emails", &self.emails).finish_non_exhaustive()
    }
}

/// A user's certificate and the private key that belongs to it.
#[derive(Clone)]
pub struct Identity {
    pub cert: Certificate,
    pub key: PKey<Private>,
}

impl Certificate {
    /// The first certificate of a PEM file (the rest is its chain), or one DER certificate.
    pub fn parse(bytes: &[u8]) -> Result<Certificate, SmimeError> {
        let mut all = if looks_like_pem(bytes) {
            X509::stack_from_pem(bytes).map_err(|e| SmimeError::Unusable(format!("not a PEM certificate: {e}")))?
        } else {
            vec![X509::from_der(bytes).map_err(|e| SmimeError::Unusable(format!("neither a PEM nor a DER certificate: {e}")))?]
        };
        if all.is_empty() {
            return Err(SmimeError::Unusable("no certificate in it (expected -----BEGIN CERTIFICATE-----)".into()));
        }
        let x509 = all.remove(0);
        Ok(Certificate {
            subject: subject_line(&x509),
            emails: emails(&x509),
            not_before: unix(x509.not_before())?,
            not_after: unix(x509.not_after())?,
            x509,
            chain: all,
        })
    }

    /// The certificate and its chain as PEM, how the database keeps them.
    pub fn to_pem(&self) -> Result<Vec<u8>, SmimeError> {
        let mut pem = self.x509.to_pem()?;
        for c in &self.chain {
            pem.extend(c.to_pem()?);
        }
        Ok(pem)
    }

    /// Refuse a certificate that cannot serve `purpose` at `now` (unix seconds), saying why.
    pub fn check(&self, purpose: Purpose, now: i64) -> Result<(), SmimeError> {
        if now > self.not_after {
            return Err(SmimeError::Unusable(format!("the certificate expired on {} ({})", date(self.not_after), self.subject)));
        }
        if now < self.not_before {
            return Err(SmimeError::Unusable(format!("the certificate is not valid before {} ({})", date(self.not_before), self.subject)));
        }
        if self.emails.is_empty() {
            return Err(SmimeError::Unusable(format!(
                "the certificate has no e-mail address (subjectAltName rfc822Name), by which mail programs match it to \
                 the sender ({})",
                self.subject
            )));
        }
        let key = self.x509.public_key()?;
        match key.id() {
            Id::RSA if key.bits() < MIN_RSA_BITS => {
                return Err(SmimeError::Unusable(format!("its RSA key has {} bits: at least {MIN_RSA_BITS} are needed", key.bits())));
            }
            Id::RSA => {}
            // CMS key transport is RSA's; ECDH key agreement is not offered (yet).
            other => return Err(SmimeError::Unusable(format!("its key is not RSA ({other:?}): only RSA certificates are supported"))),
        }
        // Absent extensions allow everything (RFC 5280 §4.2.1.3, §4.2.1.12).
        if let Some(eku) = self.x509.extended_key_usage()
            && !eku.intersects(X509ExtendedKeyUsage::SMIME | X509ExtendedKeyUsage::ANYEKU)
        {
            return Err(SmimeError::Unusable("its extendedKeyUsage does not include emailProtection".into()));
        }
        if let Some(ku) = self.x509.key_usage() {
            let (needed, what) = match purpose {
                Purpose::Sign => (X509KeyUsage::DIGITAL_SIGNATURE | X509KeyUsage::NON_REPUDIATION, "digitalSignature (to sign)"),
                Purpose::Encrypt => (X509KeyUsage::KEY_ENCIPHERMENT, "keyEncipherment (to receive encrypted mail)"),
            };
            if !ku.intersects(needed) {
                return Err(SmimeError::Unusable(format!("its keyUsage does not allow {what}")));
            }
        }
        Ok(())
    }

    /// The certificate names `address` (case-insensitive).
    pub fn names(&self, address: &str) -> bool {
        self.emails.iter().any(|e| e.eq_ignore_ascii_case(address))
    }
}

impl Identity {
    /// A certificate file and a key file (PEM, or DER; PKCS#8 or PKCS#1), checked to belong
    /// together and to sign at `now`.
    pub fn parse(cert: &[u8], key: &[u8], now: i64) -> Result<Identity, SmimeError> {
        let cert = Certificate::parse(cert)?;
        let key = parse_key(key)?;
        let identity = Identity { cert, key };
        identity.check(now)?;
        Ok(identity)
    }

    /// From the database: the PEM chain and the PKCS#8 DER key.
    pub fn from_stored(cert_pem: &[u8], pkcs8: &[u8]) -> Result<Identity, SmimeError> {
        let key = PKey::private_key_from_pkcs8(pkcs8).map_err(|e| SmimeError::Unusable(format!("the stored key cannot be read: {e}")))?;
        Ok(Identity { cert: Certificate::parse(cert_pem)?, key })
    }

    pub fn check(&self, now: i64) -> Result<(), SmimeError> {
        self.cert.check(Purpose::Sign, now)?;
        if !self.key.public_eq(&*self.cert.x509.public_key()?) {
            return Err(SmimeError::Unusable(format!("the private key does not belong to the certificate ({})", self.cert.subject)));
        }
        Ok(())
    }

    pub fn pkcs8(&self) -> Result<Vec<u8>, SmimeError> {
        Ok(self.key.private_key_to_pkcs8()?)
    }
}

fn parse_key(bytes: &[u8]) -> Result<PKey<Private>, SmimeError> {
    if looks_like_pem(bytes) {
        if bytes.windows(9).any(|w| w == b"ENCRYPTED") {
            return Err(SmimeError::Unusable(
                "the private key is protected by a passphrase: give it unprotected (`openssl pkey -in KEY -out PLAIN`); \
                 it is kept in the private database"
                    .into(),
            ));
        }
        PKey::private_key_from_pem(bytes).map_err(|e| SmimeError::Unusable(format!("not a PEM private key: {e}")))
    } else {
        PKey::private_key_from_der(bytes).map_err(|e| SmimeError::Unusable(format!("neither a PEM nor a DER private key: {e}")))
    }
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

fn emails(x509: &X509Ref) -> Vec<String> {
    let mut out: Vec<String> =
        x509.subject_alt_names().map(|names| names.iter().filter_map(|n| n.email().map(str::to_ascii_lowercase)).collect()).unwrap_or_default();
    out.dedup();
    out
}

/// `CN=Sam Jones, O=Example` (most significant last, as the certificate lists them).
fn subject_line(x509: &X509Ref) -> String {
    let parts: Vec<String> = x509
        .subject_name()
        .entries()
        .map(|e| {
            let name = e.object().nid().short_name().unwrap_or("?");
            let name = if e.object().nid() == Nid::PKCS9_EMAILADDRESS { "emailAddress" } else { name };
            // Shown on the operator's terminal: no control characters.
            let value: String = e.data().to_string().unwrap_or_else(|_| "?".into()).chars().map(|c| if c.is_control() { '?' } else { c }).collect();
            format!("{name}={value}")
        })
        .collect();
    if parts.is_empty() { "(empty subject)".into() } else { parts.join(", ") }
}

fn unix(t: &openssl::asn1::Asn1TimeRef) -> Result<i64, SmimeError> {
    let diff = Asn1Time::from_unix(0)?.diff(t)?;
    Ok(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
}

/// When a certificate starts or stops being valid, as the other commands write dates.
pub fn date(unix: i64) -> String {
    mail_proto::date::rfc5322(unix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, now};

    const DAY: i64 = 86_400;

    fn refusal(r: Result<impl Sized, SmimeError>) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_good_identity_is_accepted_with_its_email() {
        let ca = testkit::ca();
        let sam = testkit::user(&ca, Some("SamJones@example.test"), (-60, DAY), None);
        let id = Identity::parse(&sam.cert_pem, &sam.key_pem, now()).unwrap();
        assert_eq!(id.cert.emails, ["samjones@example.test"]);
        assert!(id.cert.subject.contains("CN=Test User"), "{}", id.cert.subject);
        // The database's form reads back.
        let back = Identity::from_stored(&id.cert.to_pem().unwrap(), &id.pkcs8().unwrap()).unwrap();
        assert!(back.cert.names("samjones@EXAMPLE.test"));
    }

    #[test]
    fn unusable_certificates_are_refused_saying_why() {
        // Issue 18: expired or unusable certificates are refused with a message that says why.
        let ca = testkit::ca();
        let expired = testkit::user(&ca, Some("a@example.test"), (-10 * DAY, -DAY), None);
        assert!(refusal(Identity::parse(&expired.cert_pem, &expired.key_pem, now())).contains("expired on"));
        let future = testkit::user(&ca, Some("a@example.test"), (DAY, 10 * DAY), None);
        assert!(refusal(Identity::parse(&future.cert_pem, &future.key_pem, now())).contains("not valid before"));
        let anonymous = testkit::user(&ca, None, (-60, DAY), None);
        assert!(refusal(Identity::parse(&anonymous.cert_pem, &anonymous.key_pem, now())).contains("no e-mail address"));
        let other = testkit::key(2048);
        let e = refusal(Identity::parse(&ca.cert_pem, &other.private_key_to_pem_pkcs8().unwrap(), now()));
        assert!(e.contains("no e-mail address"), "the CA has none: {e}");
        let good = testkit::user(&ca, Some("a@example.test"), (-60, DAY), None);
        assert!(refusal(Identity::parse(&good.cert_pem, &other.private_key_to_pem_pkcs8().unwrap(), now())).contains("does not belong"));
        let weak = testkit::with_key(&ca, "a@example.test", testkit::key(1024));
        assert!(refusal(Identity::parse(&weak.cert_pem, &weak.key_pem, now())).contains("1024 bits"));
        let encrypt_only = testkit::user(&ca, Some("a@example.test"), (-60, DAY), Some("keyEncipherment"));
        assert!(refusal(Identity::parse(&encrypt_only.cert_pem, &encrypt_only.key_pem, now())).contains("digitalSignature"));
        let sign_only = testkit::user(&ca, Some("a@example.test"), (-60, DAY), Some("digitalSignature"));
        let cert = Certificate::parse(&sign_only.cert_pem).unwrap();
        assert!(cert.check(Purpose::Sign, now()).is_ok());
        assert!(refusal(cert.check(Purpose::Encrypt, now())).contains("keyEncipherment"));
        assert!(refusal(Certificate::parse(b"hello")).contains("neither a PEM nor a DER certificate"));
        let locked = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(refusal(Identity::parse(&good.cert_pem, locked, now())).contains("passphrase"));
    }

    #[test]
    fn der_files_and_chains_are_read() {
        let ca = testkit::ca();
        let sam = testkit::user(&ca, Some("sam@example.test"), (-60, DAY), None);
        let id = Identity::parse(&sam.x509.to_der().unwrap(), &sam.key.private_key_to_der().unwrap(), now()).unwrap();
        assert!(id.cert.chain.is_empty());
        let mut with_chain = sam.cert_pem.clone();
        with_chain.extend(&ca.cert_pem);
        let cert = Certificate::parse(&with_chain).unwrap();
        assert_eq!(cert.chain.len(), 1, "the CA travels along");
        assert_eq!(Certificate::parse(&cert.to_pem().unwrap()).unwrap().chain.len(), 1);
    }
}
