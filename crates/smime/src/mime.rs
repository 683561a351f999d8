//! S/MIME 4.0 message formats (RFC 8551) around a composed message: the Content-* fields and
//! the body form the MIME entity that is signed or encrypted; From, To, Subject, Date,
//! Message-ID and the other header fields stay outside, where servers and mail programs read
//! them (SPEC F8, issue 18).

use openssl::cms::{CMSOptions, CmsContentInfo};
use openssl::stack::Stack;
use openssl::symm::Cipher;
use openssl::x509::X509;

use crate::SmimeError;
use crate::cert::{Certificate, Identity};

/// Sign with `signer`, then encrypt for `encrypt_for` (every recipient and the sender, so the
/// sent copy stays readable): the message with its entity replaced by the protected one.
/// Neither: the message unchanged.
pub fn protect(message: &[u8], signer: Option<&Identity>, encrypt_for: Option<&[Certificate]>) -> Result<Vec<u8>, SmimeError> {
    if signer.is_none() && encrypt_for.is_none() {
        return Ok(message.to_vec());
    }
    let (outer, mut entity) = split_entity(message);
    if let Some(id) = signer {
        entity = sign(&entity, id)?;
    }
    if let Some(certs) = encrypt_for {
        entity = encrypt(&entity, certs)?;
    }
    let mut out = outer;
    out.extend_from_slice(&entity);
    Ok(out)
}

/// multipart/signed (RFC 8551 §3.5.3, RFC 1847): the entity as it is, and a detached CMS
/// SignedData over its canonical form (CRLF lines), SHA-256, the signer's certificate and
/// chain included so a receiver needs only the root it trusts.
pub fn sign(entity: &[u8], signer: &Identity) -> Result<Vec<u8>, SmimeError> {
    let entity = canonical(entity);
    let chain = stack(&signer.cert.chain)?;
    // BINARY: the entity is canonical already; OpenSSL must not translate it again. The digest
    // is the key's default, SHA-256 for RSA (OpenSSL 1.1 and later; the tests check it, since
    // micalg below must name it).
    let flags = CMSOptions::DETACHED | CMSOptions::BINARY;
    let cms = CmsContentInfo::sign(Some(&signer.cert.x509), Some(&signer.key), Some(&chain), Some(&entity), flags)?;
    let boundary = boundary(&entity)?;
    let mut out = format!(
        "Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=sha-256;\r\n\
         \tboundary=\"{boundary}\"\r\n\r\nThis is an S/MIME signed message.\r\n--{boundary}\r\n"
    )
    .into_bytes();
    // The CRLF before a delimiter belongs to the delimiter (RFC 2046 §5.1.1): the signed entity
    // ends with its own CRLF, and one more follows.
    out.extend_from_slice(&entity);
    out.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Type: application/pkcs7-signature; name=\"smime.p7s\"\r\n\
             Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"smime.p7s\"\r\n\r\n{}\r\n--{boundary}--\r\n",
            base64_lines(&cms.to_der()?)
        )
        .as_bytes(),
    );
    Ok(out)
}

/// application/pkcs7-mime enveloped-data (RFC 8551 §3.3): the entity encrypted with AES-256-CBC
/// under a random key, which is encrypted to each certificate (RSA key transport).
pub fn encrypt(entity: &[u8], recipients: &[Certificate]) -> Result<Vec<u8>, SmimeError> {
    if recipients.is_empty() {
        return Err(SmimeError::Unusable("nobody to encrypt for".into()));
    }
    let mut certs = Stack::new()?;
    let mut seen = Vec::new();
    for c in recipients {
        // The sender is often a recipient too: one RecipientInfo each.
        let der = c.x509.to_der()?;
        if !seen.contains(&der) {
            certs.push(c.x509.clone())?;
            seen.push(der);
        }
    }
    let cms = CmsContentInfo::encrypt(&certs, &canonical(entity), Cipher::aes_256_cbc(), CMSOptions::BINARY)?;
    Ok(format!(
        "Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=\"smime.p7m\"\r\n\
         Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"smime.p7m\"\r\n\r\n{}\r\n",
        base64_lines(&cms.to_der()?)
    )
    .into_bytes())
}

/// The header fields that stay outside (everything but Content-*, with a MIME-Version) and the
/// MIME entity (the Content-* fields, a blank line, the body). A message without a
/// Content-Type is text/plain in US-ASCII (RFC 2045 §5.2), which the entity then says.
pub fn split_entity(message: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let message = canonical(message);
    let (header, body) = match find(&message, b"\r\n\r\n") {
        Some(i) => (&message[..i + 2], &message[i + 4..]),
        None => (&message[..], &b""[..]),
    };
    let (mut outer, mut entity) = (Vec::new(), Vec::new());
    let mut has_version = false;
    for field in fields(header) {
        let name = field.split(|&b| b == b':').next().unwrap_or_default().trim_ascii().to_ascii_lowercase();
        if name.starts_with(b"content-") {
            entity.extend_from_slice(field);
        } else {
            has_version |= name == b"mime-version";
            outer.extend_from_slice(field);
        }
    }
    if !has_version {
        outer.extend_from_slice(b"MIME-Version: 1.0\r\n");
    }
    if !fields(&entity).iter().any(|f| f.to_ascii_lowercase().starts_with(b"content-type:")) {
        entity.splice(0..0, b"Content-Type: text/plain; charset=us-ascii\r\n".iter().copied());
    }
    entity.extend_from_slice(b"\r\n");
    entity.extend_from_slice(body);
    (outer, entity)
}

/// Header fields with their continuation lines, each ending in CRLF.
fn fields(header: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < header.len() {
        let end = find(&header[i..], b"\r\n").map(|p| i + p + 2).unwrap_or(header.len());
        let continues = end < header.len() && matches!(header[end], b' ' | b'\t');
        if !continues {
            out.push(&header[start..end]);
            start = end;
        }
        i = end;
    }
    out
}

/// CRLF line ends (RFC 8551 §3.1.1), the last line included: a signature covers these bytes,
/// and whatever carries the message may turn a bare LF into CRLF.
pub fn canonical(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 32 + 2);
    for (i, &b) in data.iter().enumerate() {
        if b == b'\n' && (i == 0 || data[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Base64 in lines of 76 (RFC 2045 §6.8), CRLF between them.
fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    text.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect::<Vec<_>>().join("\r\n")
}

/// A random boundary that the entity does not contain.
fn boundary(entity: &[u8]) -> Result<String, SmimeError> {
    loop {
        let mut random = [0u8; 12];
        openssl::rand::rand_bytes(&mut random)?;
        let b = format!("----=_smime_{}", random.iter().map(|x| format!("{x:02x}")).collect::<String>());
        if find(entity, b.as_bytes()).is_none() {
            return Ok(b);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn stack(certs: &[X509]) -> Result<Stack<X509>, SmimeError> {
    let mut s = Stack::new()?;
    for c in certs {
        s.push(c.clone())?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, now};
    use base64::Engine;
    use openssl::x509::store::X509StoreBuilder;

    const MESSAGE: &[u8] = b"From: sam@example.test\nTo: bob@example.test\nSubject: Quarterly\nMessage-ID: <1@x>\n\
        MIME-Version: 1.0\nContent-Type: text/plain;\n charset=utf-8\nContent-Transfer-Encoding: 7bit\n\nThe numbers.\n";

    fn identity(ca: &testkit::Issued, email: &str) -> Identity {
        let u = testkit::user(ca, Some(email), (-60, 86_400), None);
        Identity::parse(&u.cert_pem, &u.key_pem, now()).unwrap()
    }

    /// The signed entity and the signature's DER, as a receiver separates them.
    fn parts(signed_entity: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let text = String::from_utf8(signed_entity.to_vec()).unwrap();
        let boundary = text.split("boundary=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
        let delimiter = format!("\r\n--{boundary}");
        let first = text.find(&format!("--{boundary}\r\n")).unwrap() + boundary.len() + 4;
        let end = first + text[first..].find(&delimiter).unwrap();
        let signed = text.as_bytes()[first..end].to_vec();
        let sig_part = &text[end + delimiter.len()..];
        let b64: String = sig_part.split("\r\n\r\n").nth(1).unwrap().split("\r\n--").next().unwrap().replace("\r\n", "");
        (signed, base64::engine::general_purpose::STANDARD.decode(b64).unwrap())
    }

    fn verify(ca: &testkit::Issued, signed: &[u8], der: &[u8]) -> Result<(), openssl::error::ErrorStack> {
        let mut store = X509StoreBuilder::new().unwrap();
        store.add_cert(ca.x509.clone()).unwrap();
        let store = store.build();
        let mut cms = CmsContentInfo::from_der(der).unwrap();
        cms.verify(None, Some(&store), Some(signed), None, CMSOptions::BINARY)
    }

    fn body_der(entity: &[u8]) -> Vec<u8> {
        let text = String::from_utf8(entity.to_vec()).unwrap();
        let b64 = text.split_once("\r\n\r\n").unwrap().1.replace("\r\n", "");
        base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
    }

    #[test]
    fn outer_headers_stay_outside_and_the_entity_is_canonical() {
        let (outer, entity) = split_entity(MESSAGE);
        let outer = String::from_utf8(outer).unwrap();
        assert!(outer.starts_with("From: sam@example.test\r\nTo: bob@example.test\r\nSubject: Quarterly\r\n"), "{outer}");
        assert!(outer.contains("MIME-Version: 1.0\r\n") && !outer.contains("Content-"), "{outer}");
        assert_eq!(entity, b"Content-Type: text/plain;\r\n charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\nThe numbers.\r\n");
        let (outer, entity) = split_entity(b"Subject: bare\r\n\r\nhi");
        assert_eq!(outer, b"Subject: bare\r\nMIME-Version: 1.0\r\n");
        assert_eq!(entity, b"Content-Type: text/plain; charset=us-ascii\r\n\r\nhi\r\n");
    }

    #[test]
    fn signature_is_detached_sha256_and_verifies_only_unaltered() {
        // SPEC F8, issue 18: multipart/signed, application/pkcs7-signature, SHA-256.
        let ca = testkit::ca();
        let sam = identity(&ca, "sam@example.test");
        let message = protect(MESSAGE, Some(&sam), None).unwrap();
        let text = String::from_utf8(message.clone()).unwrap();
        assert!(text.contains("Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=sha-256;"), "{text}");
        assert!(text.starts_with("From: sam@example.test\r\n"));
        let (_, entity) = split_entity(&message);
        let (signed, der) = parts(&entity);
        assert_eq!(signed, split_entity(MESSAGE).1, "the entity is signed as composed");
        let sha256_oid = [0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
        assert!(der.windows(sha256_oid.len()).any(|w| w == sha256_oid), "micalg says sha-256: the signature must use it");
        verify(&ca, &signed, &der).unwrap();
        let altered = String::from_utf8(signed).unwrap().replace("numbers", "Numbers");
        assert!(verify(&ca, altered.as_bytes(), &der).is_err(), "an altered message must fail verification");
        assert!(verify(&testkit::ca(), split_entity(MESSAGE).1.as_slice(), &der).is_err(), "another CA must not vouch");
    }

    #[test]
    fn every_recipient_and_the_sender_can_decrypt() {
        // Issue 18: AES for every recipient plus the sender, so the sent copy stays readable.
        let ca = testkit::ca();
        let sam = identity(&ca, "sam@example.test");
        let bob = identity(&ca, "bob@example.test");
        let eve = identity(&ca, "eve@example.test");
        let for_whom = [bob.cert.clone(), sam.cert.clone(), sam.cert.clone()];
        let message = protect(MESSAGE, Some(&sam), Some(&for_whom)).unwrap();
        let text = String::from_utf8_lossy(&message);
        assert!(!text.contains("The numbers"), "plain text leaked: {text}");
        assert!(text.contains("Subject: Quarterly\r\n"), "{text}");
        let (_, entity) = split_entity(&message);
        assert!(entity.starts_with(b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=\"smime.p7m\"\r\n"));
        let cms = CmsContentInfo::from_der(&body_der(&entity)).unwrap();
        for who in [&sam, &bob] {
            let inner = cms.decrypt(&who.key, &who.cert.x509).unwrap();
            assert!(inner.starts_with(b"Content-Type: multipart/signed;"), "signed, then encrypted");
            let (signed, der) = parts(&inner);
            verify(&ca, &signed, &der).unwrap();
        }
        assert!(cms.decrypt(&eve.key, &eve.cert.x509).is_err(), "eve was not a recipient");
        let der = cms.to_der().unwrap();
        let aes256_cbc_oid = [0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x2a];
        assert!(der.windows(aes256_cbc_oid.len()).any(|w| w == aes256_cbc_oid), "AES-256-CBC");
        assert!(encrypt(b"x", &[]).is_err());
    }
}
