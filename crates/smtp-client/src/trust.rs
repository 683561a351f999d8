//! Which server certificates the SMTP client accepts (SPEC C5).
//!
//! * A host without credentials gets opportunistic STARTTLS: any certificate is accepted
//!   ([`opportunistic_config`]). That protects against passive eavesdropping only, and nothing
//!   secret depends on it.
//! * A host on the host-authentication list gets its credentials only over TLS whose certificate
//!   was verified ([`verified_config`]): with a pinned SHA-256 fingerprint, exactly that
//!   certificate, whatever names it carries; otherwise a chain to the system's roots or to the
//!   entry's own CA certificates, issued for the host name the client connected to (the IP
//!   address, for an address literal). A man in the middle never gets the password.
//!
//! Either way the server must prove that it holds the key of the certificate it sent.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// How one host's certificate is checked before its credentials go to it: the entry's CA
/// certificates (PEM) and pinned SHA-256 fingerprint, as the host-authentication list keeps them.
pub use directory::access::hostauth::Trust;

/// The system's trusted roots (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the platform's usual
/// bundle), read once.
pub fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's trusted certificates");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system trust roots loaded");
            Arc::new(roots)
        })
        .clone()
}

/// The certificates of a PEM text, each usable as a trust anchor; at least one.
pub fn parse_ca_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        certs.push(cert.map_err(|e| format!("bad PEM: {e}"))?);
    }
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        store.add(cert.clone()).map_err(|e| format!("certificate {} cannot be a trust anchor: {e}", i + 1))?;
    }
    Ok(certs)
}

/// The certificates of a PEM text (see [`parse_ca_pem`]) as PEM again, nothing else: what a
/// host's entry stores of a `--ca` file, which might also hold a key.
pub fn certificates_pem(pem: &str) -> Result<String, String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    for cert in parse_ca_pem(pem)? {
        let b64 = mail_proto::sasl::encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            let _ = writeln!(out, "{}", std::str::from_utf8(line).expect("base64 is ASCII"));
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    Ok(out)
}

/// SHA-256 of a DER certificate, 64 lowercase hex digits.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The client configuration for a host that gets credentials: the certificate must be verified
/// as `trust` says. An error says why no such configuration can be made (an unusable pin or CA
/// text, no trusted roots at all); the credentials must not be sent then.
pub fn verified_config(trust: &Trust) -> Result<Arc<ClientConfig>, String> {
    let provider = tls::provider();
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| format!("TLS configuration: {e}"))?;
    if let Some(pin) = &trust.fingerprint {
        let sha256 = directory::access::hostauth::normalise_fingerprint(pin)
            .ok_or_else(|| format!("the pinned fingerprint {pin:?} is not a SHA-256 in hex"))?;
        let verifier = Arc::new(ChainlessVerifier { pin: Some(sha256), algorithms: provider.signature_verification_algorithms });
        return Ok(Arc::new(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()));
    }
    let mut roots = (*system_roots()).clone();
    if let Some(pem) = &trust.ca_pem {
        for cert in parse_ca_pem(pem).map_err(|e| format!("the host's CA certificates: {e}"))? {
            roots.add(cert).map_err(|e| format!("the host's CA certificates: {e}"))?;
        }
    }
    if roots.is_empty() {
        return Err("no trusted CA certificates: the system has none and the host's entry names none".into());
    }
    Ok(Arc::new(builder.with_root_certificates(roots).with_no_client_auth()))
}

/// The client configuration for opportunistic STARTTLS: any certificate accepted, handshake
/// signatures still verified. Built once and shared.
pub fn opportunistic_config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = tls::provider();
            let verifier = Arc::new(ChainlessVerifier { pin: None, algorithms: provider.signature_verification_algorithms });
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default TLS versions")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// A verifier that skips the certificate chain: `pin: None` accepts every certificate
/// (opportunistic TLS protects against passive eavesdropping only); `pin: Some(sha256)` accepts
/// the one certificate with that fingerprint (Postfix's "fingerprint" level: no chain, no names,
/// no dates — the pin says it all). Either way the server must prove it holds the certificate's
/// key: handshake signatures are verified.
#[derive(Debug)]
struct ChainlessVerifier {
    pin: Option<String>,
    algorithms: WebPkiSupportedAlgorithms,
}

#[derive(Debug)]
struct PinMismatch(String);

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "certificate sha256:{} is not the pinned one", self.0)
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for ChainlessVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = &self.pin else { return Ok(ServerCertVerified::assertion()) };
        let seen = fingerprint(end_entity);
        if seen == *pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch(seen))))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        assert_eq!(fingerprint(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn ca_pem_must_hold_a_usable_certificate() {
        assert!(parse_ca_pem("").is_err());
        assert!(parse_ca_pem("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").is_err());
        let made = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        assert_eq!(parse_ca_pem(&made.cert.pem()).unwrap().len(), 1);
        // Only the certificates are kept of a file that also holds a key.
        let both = format!("{}{}", made.signing_key.serialize_pem(), made.cert.pem());
        let kept = certificates_pem(&both).unwrap();
        assert!(!kept.contains("PRIVATE KEY"), "{kept}");
        assert_eq!(parse_ca_pem(&kept).unwrap(), parse_ca_pem(&made.cert.pem()).unwrap());
        let bad = verified_config(&Trust { ca_pem: Some("junk".into()), fingerprint: None });
        assert!(bad.is_err());
        let bad = verified_config(&Trust { ca_pem: None, fingerprint: Some("12:34".into()) });
        assert!(bad.is_err());
        assert!(verified_config(&Trust { ca_pem: Some(made.cert.pem()), fingerprint: None }).is_ok());
    }
}
