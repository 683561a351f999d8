//! DKIM signing keys (RFC 6376 §3.6, RFC 8463): making them, the PKCS#8 form they are stored in,
//! the selector they are published under and the TXT record that publishes their public half.
//! No I/O: the table is [`crate::key_store`]'s.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use rustls_pki_types::PrivatePkcs8KeyDer;

/// RSA modulus size of generated keys: what every receiver verifies (RFC 8301 §3.2 asks
/// verifiers to take 1024 to 4096 bits; 2048 keeps the TXT record small and signing cheap).
pub const RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unknown DKIM algorithm {0:?}: use rsa or ed25519")]
    UnknownAlgorithm(String),
    #[error("bad selector {0:?}: use DNS labels of letters, digits and '-' (e.g. pr202607-rsa)")]
    BadSelector(String),
    #[error("generating the {0} key failed: {1}")]
    Generate(&'static str, String),
    #[error("the stored {0} key is not usable PKCS#8: {1}")]
    Unusable(&'static str, String),
}

/// The signing algorithms (RFC 6376 §3.3, RFC 8463 §3); never rsa-sha1 (RFC 8301 §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    RsaSha256,
    Ed25519Sha256,
}

impl Algorithm {
    /// `rsa` or `ed25519`, as on the command line (`--algorithm`).
    pub fn parse(word: &str) -> Result<Algorithm, KeyError> {
        match word.to_ascii_lowercase().as_str() {
            "rsa" | "rsa-sha256" => Ok(Algorithm::RsaSha256),
            "ed25519" | "ed25519-sha256" => Ok(Algorithm::Ed25519Sha256),
            _ => Err(KeyError::UnknownAlgorithm(word.to_string())),
        }
    }

    /// The `a=` tag value, also what the table stores.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa-sha256",
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }

    /// The `k=` tag of the key record (RFC 6376 §3.6.1, RFC 8463 §4).
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa",
            Algorithm::Ed25519Sha256 => "ed25519",
        }
    }

    /// What the table stores back into an algorithm.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        [Algorithm::RsaSha256, Algorithm::Ed25519Sha256].into_iter().find(|a| a.name() == name)
    }
}

/// A private key as stored (PKCS#8 DER) with its public half as published.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub algorithm: Algorithm,
    pkcs8: Vec<u8>,
    /// The `p=` data: SubjectPublicKeyInfo DER for RSA (what `openssl rsa -pubout` gives and
    /// every verifier reads), the raw 32 octets for Ed25519 (RFC 8463 §4).
    public: Vec<u8>,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("algorithm", &self.algorithm).field("private", &"(hidden)").finish()
    }
}

impl KeyPair {
    /// A new key from the system's random source. RSA takes a second or so (prime search).
    pub fn generate(algorithm: Algorithm) -> Result<KeyPair, KeyError> {
        let pkcs8 = match algorithm {
            Algorithm::RsaSha256 => {
                let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS)
                    .map_err(|e| KeyError::Generate(algorithm.key_type(), e.to_string()))?;
                key.to_pkcs8_der().map_err(|e| KeyError::Generate(algorithm.key_type(), e.to_string()))?.as_bytes().to_vec()
            }
            Algorithm::Ed25519Sha256 => Ed25519Key::generate_pkcs8().map_err(|e| KeyError::Generate(algorithm.key_type(), e.to_string()))?,
        };
        KeyPair::from_pkcs8(algorithm, pkcs8)
    }

    /// A stored key, checked: it must load as a signing key of its algorithm.
    pub fn from_pkcs8(algorithm: Algorithm, pkcs8: Vec<u8>) -> Result<KeyPair, KeyError> {
        let unusable = |e: String| KeyError::Unusable(algorithm.key_type(), e);
        let public = match algorithm {
            Algorithm::RsaSha256 => {
                let key = rsa::RsaPrivateKey::from_pkcs8_der(&pkcs8).map_err(|e| unusable(e.to_string()))?;
                key.to_public_key().to_public_key_der().map_err(|e| unusable(e.to_string()))?.as_bytes().to_vec()
            }
            Algorithm::Ed25519Sha256 => Ed25519Key::from_pkcs8_der(&pkcs8).map_err(|e| unusable(e.to_string()))?.public_key(),
        };
        let pair = KeyPair { algorithm, pkcs8, public };
        pair.signing_key()?;
        Ok(pair)
    }

    /// The PKCS#8 DER to store.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as published in `p=`.
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    /// The key mail-auth signs with (ring underneath).
    pub fn signing_key(&self) -> Result<DkimKey, KeyError> {
        let unusable = |e: mail_auth::Error| KeyError::Unusable(self.algorithm.key_type(), e.to_string());
        Ok(match self.algorithm {
            Algorithm::RsaSha256 => DkimKey::Rsa(RsaKey::<Sha256>::from_key_der(PrivatePkcs8KeyDer::from(&self.pkcs8[..]).into()).map_err(unusable)?),
            Algorithm::Ed25519Sha256 => DkimKey::Ed25519(Ed25519Key::from_pkcs8_der(&self.pkcs8).map_err(unusable)?),
        })
    }

    /// The TXT record value (RFC 6376 §3.6.1): `v=DKIM1; k=rsa; p=BASE64`.
    pub fn txt_record(&self) -> String {
        format!("v=DKIM1; k={}; p={}", self.algorithm.key_type(), BASE64.encode(&self.public))
    }
}

/// The DNS name a key is published under (RFC 6376 §3.6.2.1).
pub fn record_name(selector: &str, domain: &str) -> String {
    format!("{selector}._domainkey.{domain}")
}

/// `value` cut into quoted character-strings of at most `width` octets, as zone files and DNS
/// providers' forms take a TXT record longer than 255 octets (RFC 1035 §3.3.14): a 2048-bit
/// RSA record is about 410.
pub fn zone_file_strings(value: &str, width: usize) -> String {
    let bytes = value.as_bytes();
    bytes.chunks(width.max(1)).map(|c| format!("\"{}\"", String::from_utf8_lossy(c))).collect::<Vec<_>>().join(" ")
}

/// A selector as stored: lower case, one or more DNS labels of letters, digits and inner
/// hyphens (RFC 6376 §3.1: selectors are sub-domains).
pub fn normalise_selector(selector: &str) -> Result<String, KeyError> {
    let s = selector.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-') && !l.ends_with('-')
    };
    if s.is_empty() || s.len() > 200 || !s.split('.').all(label_ok) {
        return Err(KeyError::BadSelector(selector.to_string()));
    }
    Ok(s)
}

/// The selector `keygen` uses without `--selector`: `pr` and the year and month of `now` (unix
/// seconds), then the algorithm — `pr202607-rsa`. The date makes a rotation's new selector
/// differ from the old one, and the algorithm lets a domain publish an RSA and an Ed25519 key
/// made the same month side by side (RFC 8463 §4 expects signers to sign with both).
pub fn default_selector(algorithm: Algorithm, now: i64) -> String {
    let (year, month) = year_month(now);
    format!("pr{year:04}{month:02}-{}", algorithm.key_type())
}

/// The civil year and month (UTC) of unix seconds (Howard Hinnant's days-to-civil).
fn year_month(unix: i64) -> (i64, u32) {
    let days = unix.div_euclid(86_400) + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_selector_names_the_month_and_algorithm() {
        // 2026-07-15T12:00:00Z; 2024-02-29; 2000-01-01.
        assert_eq!(default_selector(Algorithm::RsaSha256, 1_784_116_800), "pr202607-rsa");
        assert_eq!(default_selector(Algorithm::Ed25519Sha256, 1_709_208_000), "pr202402-ed25519");
        assert_eq!(year_month(946_684_800), (2000, 1));
        assert_eq!(year_month(946_684_799), (1999, 12));
    }

    #[test]
    fn selectors_are_dns_labels() {
        assert_eq!(normalise_selector("PR2026.Mail").unwrap(), "pr2026.mail");
        for bad in ["", "a b", "-x", "x-", "a..b", "sel_1", "é"] {
            assert!(normalise_selector(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn algorithm_words() {
        assert_eq!(Algorithm::parse("RSA").unwrap(), Algorithm::RsaSha256);
        assert_eq!(Algorithm::parse("ed25519").unwrap(), Algorithm::Ed25519Sha256);
        assert!(Algorithm::parse("rsa-sha1").unwrap_err().to_string().contains("use rsa or ed25519"));
        assert_eq!(Algorithm::from_name("ed25519-sha256"), Some(Algorithm::Ed25519Sha256));
    }

    #[test]
    fn ed25519_key_round_trips_and_publishes_32_octets() {
        let pair = KeyPair::generate(Algorithm::Ed25519Sha256).unwrap();
        assert_eq!(pair.public_key().len(), 32);
        let again = KeyPair::from_pkcs8(Algorithm::Ed25519Sha256, pair.pkcs8().to_vec()).unwrap();
        assert_eq!(again, pair);
        assert!(pair.txt_record().starts_with("v=DKIM1; k=ed25519; p="), "{}", pair.txt_record());
        assert!(KeyPair::from_pkcs8(Algorithm::RsaSha256, pair.pkcs8().to_vec()).is_err(), "an Ed25519 key is no RSA key");
    }

    #[test]
    fn long_records_are_cut_for_zone_files() {
        assert_eq!(zone_file_strings("abcdef", 4), "\"abcd\" \"ef\"");
        assert_eq!(record_name("s1", "example.test"), "s1._domainkey.example.test");
    }
}
