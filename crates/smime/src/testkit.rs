//! Certificates for the unit tests: a CA and user certificates it issues, made with OpenSSL.

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509, X509NameBuilder};

pub struct Issued {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub x509: X509,
    pub key: PKey<Private>,
}

pub fn key(bits: u32) -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(bits).unwrap()).unwrap()
}

/// A self-signed CA, valid from yesterday for a year.
pub fn ca() -> Issued {
    let key = key(2048);
    let x509 = build("Test CA", None, &key, None, (-86_400, 365 * 86_400), true, None);
    issued(x509, key)
}

/// A certificate for `email` (none: no subjectAltName) issued by `ca`, valid for `window`
/// (seconds from now: start, end), with the one `key_usage` when given.
pub fn user(ca: &Issued, email: Option<&str>, window: (i64, i64), key_usage: Option<&str>) -> Issued {
    let key = key(2048);
    let x509 = build("Test User", email, &key, Some(ca), window, false, key_usage);
    issued(x509, key)
}

pub fn with_key(ca: &Issued, email: &str, key: PKey<Private>) -> Issued {
    let x509 = build("Test User", Some(email), &key, Some(ca), (-60, 86_400), false, None);
    issued(x509, key)
}

fn issued(x509: X509, key: PKey<Private>) -> Issued {
    Issued { cert_pem: x509.to_pem().unwrap(), key_pem: key.private_key_to_pem_pkcs8().unwrap(), x509, key }
}

fn build(cn: &str, email: Option<&str>, key: &PKey<Private>, ca: Option<&Issued>, window: (i64, i64), is_ca: bool, key_usage: Option<&str>) -> X509 {
    let now = crate::testkit::now();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap()).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(ca.map_or(&*name, |ca| ca.x509.subject_name())).unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::from_unix(now + window.0).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::from_unix(now + window.1).unwrap()).unwrap();
    if is_ca {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
    } else {
        b.append_extension(ExtendedKeyUsage::new().email_protection().build().unwrap()).unwrap();
    }
    if let Some(usage) = key_usage {
        let mut ku = KeyUsage::new();
        match usage {
            "digitalSignature" => ku.digital_signature(),
            "keyEncipherment" => ku.key_encipherment(),
            other => panic!("no key usage {other}"),
        };
        b.append_extension(ku.build().unwrap()).unwrap();
    }
    if let Some(email) = email {
        let san = SubjectAlternativeName::new().email(email).build(&b.x509v3_context(ca.map(|c| &*c.x509), None)).unwrap();
        b.append_extension(san).unwrap();
    }
    b.sign(ca.map_or(key, |c| &c.key), MessageDigest::sha256()).unwrap();
    b.build()
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}
