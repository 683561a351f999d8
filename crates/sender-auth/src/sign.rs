//! DKIM signing of outbound mail (RFC 6376 §5, RFC 8463), without I/O.
//!
//! The outbound client feeds [`MessageHasher`] the message exactly as it will go to the next hop
//! (after any 8BITMIME downconversion: a signature made before it would break, RFC 6376 §5.3);
//! the header section is kept (at most [`HEADER_MAX`]), the body only hashed. [`signatures`]
//! then picks the keys ([`KeyRing::choose`]) and returns the DKIM-Signature fields to put in
//! front. [`sign`] does both for a message in memory.
//!
//! What a signature covers (RFC 6376 §5.4): relaxed/relaxed canonicalisation (§3.4.2, §3.4.4),
//! which survives the re-folding and whitespace changes of relays; the header fields of
//! [`SIGNED_FIELDS`] and every `List-*` field that are present, each instance (bottom-up, §5.4.2),
//! and From once more than it occurs (§8.15 "oversigning"), so a From added later breaks the
//! signature instead of being shown to the reader. `t=` is set, no `x=` and no `l=` (§8.2: a
//! length limit lets anyone append text).

use std::sync::Arc;

use mail_auth::common::crypto::{DkimKey, HashContext, HashImpl, Sha256, SigningKey as _};
use mail_auth::dkim::canonicalize::BodyHasher;
use mail_auth::dkim::{Canonicalization, Signature};

use crate::keys::Algorithm;

/// The header fields signed when present (RFC 6376 §5.4.1's list, with MIME's and Sender),
/// plus every `List-*` field (RFC 2369, RFC 2919, RFC 8058).
pub const SIGNED_FIELDS: &[&str] = &[
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

/// The largest header section kept for signing; a message with a larger one goes unsigned.
pub const HEADER_MAX: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the header section is larger than {HEADER_MAX} octets")]
    HeaderTooLarge,
    #[error("the message has no From header field (RFC 5322 §3.6 requires one)")]
    NoFrom,
    #[error("signing with {selector}._domainkey.{domain} failed: {why}")]
    Crypto { domain: String, selector: String, why: String },
}

/// One key that signs: its domain (`d=`), selector (`s=`) and algorithm.
pub struct SigningKey {
    pub domain: String,
    pub selector: String,
    pub algorithm: Algorithm,
    key: DkimKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}._domainkey.{} ({})", self.selector, self.domain, self.algorithm.name())
    }
}

impl SigningKey {
    pub fn new(domain: &str, selector: &str, algorithm: Algorithm, key: DkimKey) -> Self {
        SigningKey { domain: domain.to_ascii_lowercase(), selector: selector.to_ascii_lowercase(), algorithm, key }
    }
}

/// The keys that sign, at most one per domain and algorithm, and the local domains in the order
/// in which one signs mail that none of its own domains can (see [`KeyRing::choose`]).
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: Vec<SigningKey>,
    fallback: Vec<String>,
}

impl KeyRing {
    pub fn new(keys: Vec<SigningKey>, fallback: Vec<String>) -> Self {
        KeyRing { keys, fallback: fallback.into_iter().map(|d| d.to_ascii_lowercase()).collect() }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// For the log: `sel._domainkey.dom (rsa-sha256), ...`.
    pub fn describe(&self) -> String {
        if self.keys.is_empty() {
            return "none".into();
        }
        self.keys.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
    }

    fn of(&self, domain: &str) -> Vec<&SigningKey> {
        self.keys.iter().filter(|k| k.domain.eq_ignore_ascii_case(domain)).collect()
    }

    /// The keys that sign a message: those of the RFC 5322 From domain (what DMARC aligns with,
    /// RFC 7489 §3.1); else of the envelope sender's domain; else of the first local domain in
    /// the fallback order that has any, else of any domain with a key — so mail an alias
    /// forwards for an outside sender, and bounces from `<>`, still carry the office's
    /// signature, which receivers' reputation systems use even when it does not align. Each of
    /// the domain's algorithms signs (several signatures, RFC 6376 §4.2): Ed25519 where it is
    /// verified (RFC 8463), RSA everywhere.
    pub fn choose(&self, from_domain: Option<&str>, envelope_domain: Option<&str>) -> Vec<&SigningKey> {
        for domain in [from_domain, envelope_domain].into_iter().flatten() {
            let keys = self.of(domain.trim_end_matches('.'));
            if !keys.is_empty() {
                return keys;
            }
        }
        for domain in &self.fallback {
            let keys = self.of(domain);
            if !keys.is_empty() {
                return keys;
            }
        }
        self.keys.first().map(|k| self.of(&k.domain)).unwrap_or_default()
    }
}

/// Takes a message in chunks of any size: keeps the header section, hashes the body (relaxed,
/// SHA-256 — the same for both algorithms, so one pass serves every key).
pub struct MessageHasher {
    header: Vec<u8>,
    body: Option<BodyHasher<<Sha256 as HashImpl>::Context>>,
    too_large: bool,
}

impl Default for MessageHasher {
    fn default() -> Self {
        MessageHasher { header: Vec::with_capacity(4096), body: None, too_large: false }
    }
}

impl MessageHasher {
    pub fn write(&mut self, mut chunk: &[u8]) {
        if let Some(body) = &mut self.body {
            body.write(chunk);
            return;
        }
        if self.too_large {
            return;
        }
        // The header section ends at the first empty line (RFC 5322 §2.1); a message starting
        // with one has no header fields at all.
        let search_from = self.header.len().saturating_sub(3);
        self.header.extend_from_slice(chunk);
        let end = if self.header.starts_with(b"\r\n") {
            Some((0, 2))
        } else {
            find(&self.header[search_from..], b"\r\n\r\n").map(|at| (search_from + at + 2, search_from + at + 4))
        };
        match end {
            Some((header_end, body_start)) => {
                let mut body = BodyHasher::new(Sha256::hasher(), Canonicalization::Relaxed, 0);
                body.write(&self.header[body_start..]);
                self.header.truncate(header_end);
                self.body = Some(body);
                chunk = &[];
            }
            None if self.header.len() > HEADER_MAX => {
                self.too_large = true;
                self.header = Vec::new();
            }
            None => {}
        }
        debug_assert!(chunk.is_empty() || self.body.is_none());
    }

    /// The header section (each field with its CRLF) and the body hash.
    pub fn finish(self) -> Result<Hashed, SignError> {
        if self.too_large {
            return Err(SignError::HeaderTooLarge);
        }
        let (mut header, body) = match self.body {
            Some(body) => (self.header, body),
            // No empty line: all header, no body (RFC 6376 §3.4.4: the empty body hashes as CRLF).
            None => (self.header, BodyHasher::new(Sha256::hasher(), Canonicalization::Relaxed, 0)),
        };
        if !header.is_empty() && !header.ends_with(b"\r\n") {
            header.extend_from_slice(b"\r\n");
        }
        let (hash, _) = body.finish();
        Ok(Hashed { header, body_hash: hash.complete().as_ref().to_vec() })
    }
}

/// A message ready to be signed by any key.
pub struct Hashed {
    header: Vec<u8>,
    body_hash: Vec<u8>,
}

impl Hashed {
    /// The domain of the first address of the From field (RFC 5322 §3.6.2), lower case.
    pub fn from_domain(&self) -> Option<String> {
        let parsed = mail_parser::MessageParser::new().parse_headers(&self.header[..])?;
        let address = parsed.from()?.first()?.address()?;
        let domain = address.rsplit_once('@')?.1.trim().trim_end_matches('.');
        (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
    }

    /// One DKIM-Signature field by `key`, CRLF-terminated, made at `now` (unix seconds).
    pub fn signature(&self, key: &SigningKey, now: u64) -> Result<Vec<u8>, SignError> {
        let fields = header_fields(&self.header);
        // RFC 6376 §5.4.2: instances are taken from the bottom up; h= lists them in that order.
        let signed: Vec<(&[u8], &[u8])> = fields.iter().rev().filter(|(name, _)| is_signed(name)).copied().collect();
        if !signed.iter().any(|(name, _)| name.eq_ignore_ascii_case(b"from")) {
            return Err(SignError::NoFrom);
        }
        let mut h: Vec<String> = signed.iter().map(|(name, _)| String::from_utf8_lossy(name).trim().to_string()).collect();
        h.push("From".into()); // RFC 6376 §8.15: one more From than there is.
        let mut signature = Signature {
            v: 1,
            a: key.key.algorithm(),
            d: key.domain.clone(),
            s: key.selector.clone(),
            h,
            bh: self.body_hash.clone(),
            t: now,
            ch: Canonicalization::Relaxed,
            cb: Canonicalization::Relaxed,
            ..Default::default()
        };
        // RFC 6376 §3.7: the signed fields, then this field with b= empty and no final CRLF.
        let mut input = Vec::with_capacity(1024);
        Canonicalization::Relaxed.canonicalize_headers(signed.into_iter(), &mut input);
        signature.write(&mut input, false);
        let crypto = |why: String| SignError::Crypto { domain: key.domain.clone(), selector: key.selector.clone(), why };
        signature.b = key.key.sign(&input[..]).map_err(|e| crypto(e.to_string()))?;
        let mut field = Vec::with_capacity(600);
        signature.write(&mut field, true);
        Ok(field)
    }
}

/// The DKIM-Signature fields for a hashed message: one per key [`KeyRing::choose`] picks for
/// its From domain and `envelope_sender` (`""` for the null sender); empty when none has a key.
pub fn signatures(hashed: &Hashed, ring: &KeyRing, envelope_sender: &str, now: u64) -> Result<Vec<u8>, SignError> {
    if ring.is_empty() {
        return Ok(Vec::new());
    }
    let from = hashed.from_domain();
    let envelope = envelope_sender.rsplit_once('@').map(|(_, d)| d);
    let mut out = Vec::new();
    for key in ring.choose(from.as_deref(), envelope) {
        out.extend_from_slice(&hashed.signature(key, now)?);
    }
    Ok(out)
}

/// [`signatures`] for a whole message in memory (CRLF line endings, as sent).
pub fn sign(message: &[u8], ring: &KeyRing, envelope_sender: &str, now: u64) -> Result<Vec<u8>, SignError> {
    let mut hasher = MessageHasher::default();
    hasher.write(message);
    signatures(&hasher.finish()?, ring, envelope_sender, now)
}

/// Cheap to clone for each delivery.
pub type SharedKeyRing = Arc<KeyRing>;

fn is_signed(name: &[u8]) -> bool {
    let name = String::from_utf8_lossy(name);
    let name = name.trim();
    SIGNED_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(name)) || name.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("list-"))
}

/// The fields of a header section: (name, value), the value running from after the colon to its
/// final CRLF, folding included (what mail-auth's canonicalisation takes). A line that is no
/// field (no colon) is skipped, as verifiers skip it.
fn header_fields(header: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut fields = Vec::new();
    let mut start = 0;
    while start < header.len() {
        // A field ends at a CRLF not followed by SP or HTAB (RFC 5322 §2.2.3).
        let mut end = start;
        loop {
            match find(&header[end..], b"\n") {
                Some(at) => {
                    end += at + 1;
                    if !matches!(header.get(end), Some(b' ' | b'\t')) {
                        break;
                    }
                }
                None => {
                    end = header.len();
                    break;
                }
            }
        }
        let field = &header[start..end];
        if let Some(colon) = field.iter().position(|&b| b == b':')
            && !field[..colon].contains(&b'\n')
        {
            fields.push((&field[..colon], &field[colon + 1..]));
        }
        start = end;
    }
    fields
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::KeyPair;
    use mail_auth::common::parse::TxtRecordParser;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::{AuthenticatedMessage, DkimResult, Parameters, ResolverCache, Txt};
    use std::borrow::Borrow;
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::sync::Mutex;

    /// A fixed 2048-bit RSA key (generating one takes seconds in a debug build).
    const RSA_PEM: &str = include_str!("testdata/rsa-2048.pem");

    pub(crate) fn pair(algorithm: Algorithm) -> KeyPair {
        match algorithm {
            Algorithm::RsaSha256 => {
                use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
                let der = rsa::RsaPrivateKey::from_pkcs8_pem(RSA_PEM).unwrap().to_pkcs8_der().unwrap().as_bytes().to_vec();
                KeyPair::from_pkcs8(algorithm, der).unwrap()
            }
            Algorithm::Ed25519Sha256 => KeyPair::generate(algorithm).unwrap(),
        }
    }

    fn key(domain: &str, selector: &str, pair: &KeyPair) -> SigningKey {
        SigningKey::new(domain, selector, pair.algorithm, pair.signing_key().unwrap())
    }

    /// The TXT records a verifier would find, served from memory.
    #[derive(Default)]
    struct Records(Mutex<HashMap<Box<str>, Txt>>);

    impl ResolverCache<Box<str>, Txt> for Records {
        fn get<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().get(name).cloned()
        }
        fn remove<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().remove(name)
        }
        fn insert(&self, key: Box<str>, value: Txt, _: std::time::Instant) {
            self.0.lock().unwrap().insert(key, value);
        }
    }

    /// mail-auth's verifier's verdict on each signature of `message`, with `published` as DNS.
    fn verify(message: &[u8], published: &[(&str, &KeyPair)]) -> Vec<DkimResult> {
        let records = Records::default();
        for (name, pair) in published {
            let dk = DomainKey::parse(pair.txt_record().as_bytes()).unwrap();
            records.0.lock().unwrap().insert(format!("{name}.").into(), Txt::DomainKey(Arc::new(dk)));
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // Every lookup is answered from `records`; the resolver's server is never asked.
        let auth = crate::resolver::authenticator(&["127.0.0.1:9".parse().unwrap()]).unwrap();
        let msg = AuthenticatedMessage::parse(message).unwrap();
        rt.block_on(auth.verify_dkim(Parameters::new(&msg).with_txt_cache(&records))).into_iter().map(|o| o.result().clone()).collect::<Vec<_>>()
    }

    const PLAIN: &[u8] = b"From: Sam Jones <sam@example.test>\r\nTo: friend@remote.example\r\nSubject: Lunch?\r\n\
Date: Mon, 6 Jul 2026 12:00:00 +0000\r\nMessage-ID: <1@example.test>\r\nReceived: from x by y\r\n\r\nTomorrow at noon.\r\n";

    #[test]
    fn rsa_and_ed25519_signatures_verify_and_a_change_breaks_them() {
        for algorithm in [Algorithm::RsaSha256, Algorithm::Ed25519Sha256] {
            let pair = pair(algorithm);
            let ring = KeyRing::new(vec![key("example.test", "s1", &pair)], vec![]);
            let field = sign(PLAIN, &ring, "sam@example.test", 1_784_116_800).unwrap();
            let text = String::from_utf8(field.clone()).unwrap();
            assert!(text.starts_with("DKIM-Signature: v=1; a=") && text.ends_with(";\r\n"), "{text}");
            assert!(text.contains("d=example.test") && text.contains("s=s1") && text.contains("c=relaxed/relaxed"), "{text}");
            let unfolded = text.replace("\r\n\t", " ").replace(' ', "");
            assert!(unfolded.contains("h=Message-ID:Date:Subject:To:From:From;"), "bottom-up, From oversigned, no Received: {text}");
            let signed = [field.as_slice(), PLAIN].concat();
            assert_eq!(verify(&signed, &[("s1._domainkey.example.test", &pair)]), [DkimResult::Pass], "{algorithm:?}");
            let tampered = [field.as_slice(), &PLAIN.replace_bytes(b"noon", b"ten")].concat();
            let verdict = verify(&tampered, &[("s1._domainkey.example.test", &pair)]);
            assert!(matches!(verdict[..], [DkimResult::Fail(_) | DkimResult::Neutral(_)]), "a changed body: {verdict:?}");
            let added_from = [field.as_slice(), b"From: ceo@example.test\r\n", PLAIN].concat();
            let verdict = verify(&added_from, &[("s1._domainkey.example.test", &pair)]);
            assert!(matches!(verdict[..], [DkimResult::Fail(_)]), "an added From (oversigned): {verdict:?}");
        }
    }

    #[test]
    fn relaxed_canonicalisation_survives_refolding_and_chunking() {
        let pair = pair(Algorithm::Ed25519Sha256);
        let ring = KeyRing::new(vec![key("example.test", "s1", &pair)], vec![]);
        let message = b"From: sam@example.test\r\nSubject: a very long subject that was folded\r\n  onto a second line\r\n\
To: a@remote.example,\r\n\tb@remote.example\r\n\r\nline one  \r\nline\ttwo\r\n\r\n\r\n";
        let mut hasher = MessageHasher::default();
        for chunk in message.chunks(3) {
            hasher.write(chunk);
        }
        let field = signatures(&hasher.finish().unwrap(), &ring, "", 1).unwrap();
        assert_eq!(field, sign(message, &ring, "", 1).unwrap(), "chunk boundaries change nothing");
        let refolded = message
            .replace_bytes(b"folded\r\n  onto", b"folded onto")
            .replace_bytes(b"line one  \r\n", b"line one\r\n")
            .replace_bytes(b"\r\n\r\n\r\n", b"\r\n");
        assert_eq!(verify(&[field.as_slice(), &refolded].concat(), &[("s1._domainkey.example.test", &pair)]), [DkimResult::Pass]);
    }

    #[test]
    fn key_choice_from_domain_then_envelope_then_office() {
        let (a, b) = (pair(Algorithm::Ed25519Sha256), pair(Algorithm::RsaSha256));
        let ring = KeyRing::new(
            vec![key("office.test", "o", &a), key("branch.test", "b", &a), key("branch.test", "b-rsa", &b)],
            vec!["nokey.test".into(), "branch.test".into()],
        );
        let pick = |from: Option<&str>, env: Option<&str>| ring.choose(from, env).iter().map(|k| k.selector.clone()).collect::<Vec<_>>();
        assert_eq!(pick(Some("Office.Test"), Some("branch.test")), ["o"], "the From domain first");
        assert_eq!(pick(Some("remote.example"), Some("office.test")), ["o"], "then the envelope sender's");
        assert_eq!(pick(Some("remote.example"), None), ["b", "b-rsa"], "then the first local domain with keys, both algorithms");
        assert_eq!(KeyRing::new(vec![key("office.test", "o", &a)], vec![]).choose(None, None).len(), 1, "any key at last");
        assert!(KeyRing::default().choose(Some("office.test"), None).is_empty());
    }

    #[test]
    fn forwarded_mail_and_bounces_are_signed_by_the_office() {
        let pair = pair(Algorithm::Ed25519Sha256);
        let ring = KeyRing::new(vec![key("example.test", "s1", &pair)], vec!["example.test".into()]);
        let forwarded = b"Delivered-To: ext@example.test\r\nFrom: Jane <jane@remote.example>\r\nSubject: hi\r\n\r\nbody\r\n";
        let field = sign(forwarded, &ring, "jane@remote.example", 5).unwrap();
        assert!(String::from_utf8_lossy(&field).contains("d=example.test"));
        assert_eq!(verify(&[field.as_slice(), forwarded].concat(), &[("s1._domainkey.example.test", &pair)]), [DkimResult::Pass]);
    }

    #[test]
    fn what_is_not_signed() {
        let ring = KeyRing::new(vec![key("example.test", "s1", &pair(Algorithm::Ed25519Sha256))], vec![]);
        assert!(sign(PLAIN, &KeyRing::default(), "sam@example.test", 1).unwrap().is_empty(), "no keys, no signature");
        assert!(matches!(sign(b"Subject: no from\r\n\r\nx\r\n", &ring, "", 1), Err(SignError::NoFrom)));
        let mut huge = b"From: a@example.test\r\nX-Big: ".to_vec();
        huge.resize(HEADER_MAX + 10, b'x');
        assert!(matches!(sign(&huge, &ring, "", 1), Err(SignError::HeaderTooLarge)));
        assert_eq!(header_fields(b"A: 1\r\nnot a field\r\nB:\r\n 2\r\n"), [(&b"A"[..], &b" 1\r\n"[..]), (&b"B"[..], &b"\r\n 2\r\n"[..])]);
    }

    trait ReplaceBytes {
        fn replace_bytes(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
    }

    impl ReplaceBytes for [u8] {
        fn replace_bytes(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
            let at = find(self, from).expect("text to replace");
            [&self[..at], to, &self[at + from.len()..]].concat()
        }
    }
}
