//! What the inbound checks cost (SPEC E1, issue 16): microseconds per message for SPF (MAIL
//! FROM and HELO), DKIM and DMARC with every DNS answer already in the verifier's cache, so
//! only the work of the checks themselves is measured (the cost of a lookup is the DNS
//! server's round trip, paid once per TTL).
//!
//!     cargo run --release -p sender-auth --example verify_cost
//!
//! Runs on one thread; nothing else runs, so the time taken is the CPU time used.

use std::time::{Duration, Instant};

use base64::Engine as _;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePublicKey;
use sender_auth::verify::{AuthResult, Client, Record, Verifier};

const HOUR: Duration = Duration::from_secs(3600);
const ROUNDS: u32 = 2000;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // Nothing answers here: a lookup the cache could not serve would show as a 3 s outlier.
    let verifier = Verifier::new(&["127.0.0.1:9".parse().unwrap()]).expect("verifier");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);

    let ed_pkcs8 = Ed25519Key::generate_pkcs8().expect("ed25519 key");
    let ed_public = b64(&Ed25519Key::from_pkcs8_der(&ed_pkcs8).unwrap().public_key());
    let rsa_key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa key");
    let rsa_der = rsa_key.to_pkcs1_der().expect("pkcs1");
    let rsa_public = b64(rsa_key.to_public_key().to_public_key_der().expect("spki").as_bytes());

    for (name, record) in [
        ("office.test", Some(Record::Spf("v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 -all"))),
        ("client.remote.test", None),
        ("_dmarc.office.test", Some(Record::Dmarc("v=DMARC1; p=reject; rua=mailto:d@office.test"))),
        ("_dmarc.test", None),
        ("ed._domainkey.office.test", Some(Record::DkimKey(&format!("v=DKIM1; k=ed25519; p={ed_public}")))),
        ("rsa._domainkey.office.test", Some(Record::DkimKey(&format!("v=DKIM1; k=rsa; p={rsa_public}")))),
    ] {
        verifier.preload(name, record, HOUR).expect("record");
    }

    // An address the SPF record does not list: SPF fails, so DMARC rests on the signature.
    let client =
        Client { ip: "203.0.113.5".parse().unwrap(), helo: "client.remote.test", mail_from: "news@office.test", hostname: "mail.example.test" };
    let message = |body_kib: usize| {
        let line = "The quarterly figures are attached; the meeting is on Thursday at ten.\r\n";
        let body = line.repeat(body_kib * 1024 / line.len() + 1);
        format!("From: News <news@office.test>\r\nTo: sam@example.test\r\nSubject: Figures\r\nDate: Mon, 2 Mar 2026 10:00:00 +0000\r\nMessage-ID: <1@office.test>\r\n\r\n{body}").into_bytes()
    };
    let signed = |m: &[u8], signer: &dyn Fn(&[u8]) -> String| [signer(m).as_bytes(), m].concat();
    let ed = |m: &[u8]| {
        let key = Ed25519Key::from_pkcs8_der(&ed_pkcs8).unwrap();
        DkimSigner::from_key(key)
            .domain("office.test")
            .selector("ed")
            .headers(["From", "To", "Subject", "Date", "Message-ID"])
            .sign(m)
            .unwrap()
            .to_header()
    };
    let rsa = |m: &[u8]| {
        let der = rustls_pki_types::PrivatePkcs1KeyDer::from(rsa_der.as_bytes().to_vec());
        let key = RsaKey::<Sha256>::from_key_der(der.into()).unwrap();
        DkimSigner::from_key(key)
            .domain("office.test")
            .selector("rsa")
            .headers(["From", "To", "Subject", "Date", "Message-ID"])
            .sign(m)
            .unwrap()
            .to_header()
    };

    println!("{:<44} {:>12} {:>12}", "message", "µs/message", "messages/s");
    for body_kib in [2, 100] {
        let plain = message(body_kib);
        for (what, m, dkim) in [
            ("unsigned: SPF fail, DMARC fail", plain.clone(), AuthResult::None),
            ("DKIM ed25519-sha256 pass, DMARC pass", signed(&plain, &ed), AuthResult::Pass),
            ("DKIM rsa-sha256 2048 pass, DMARC pass", signed(&plain, &rsa), AuthResult::Pass),
        ] {
            let verdict = runtime.block_on(verifier.check(&client, None, &m));
            assert_eq!(verdict.dkim.first().map_or(AuthResult::None, |d| d.result), dkim, "{what}: {verdict:?}");
            let dmarc = if dkim == AuthResult::Pass { AuthResult::Pass } else { AuthResult::Fail };
            assert_eq!((verdict.spf.mail_from.result, verdict.dmarc.result), (AuthResult::Fail, dmarc), "{what}: a lookup missed the cache?");
            let started = Instant::now();
            for _ in 0..ROUNDS {
                let verdict = runtime.block_on(verifier.check(&client, None, &m));
                std::hint::black_box(verdict.header("mail.example.test"));
            }
            let per = started.elapsed() / ROUNDS;
            println!("{:<44} {:>12.1} {:>12.0}", format!("{what}, {body_kib} KiB"), per.as_secs_f64() * 1e6, 1.0 / per.as_secs_f64());
        }
    }
}
