//! The checks against records put in the cache (no query leaves the process: anything not
//! preloaded would go to a loopback port where nothing answers, and show as `temperror`).

use super::*;
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;

const HOUR: Duration = Duration::from_secs(3600);
const HOST: &str = "mail.example.test";

fn verifier() -> Verifier {
    Verifier::new(&["127.0.0.1:9".parse().unwrap()]).unwrap()
}

fn client<'a>(mail_from: &'a str) -> Client<'a> {
    Client { ip: "192.0.2.10".parse().unwrap(), helo: "client.remote.test", mail_from, hostname: HOST }
}

/// Records of a domain: SPF and DMARC, and "absent" for the names the DMARC walk and the HELO
/// check ask about.
fn publish(v: &Verifier, domain: &str, spf: Option<&str>, dmarc: Option<&str>) {
    v.preload(domain, spf.map(Record::Spf), HOUR).unwrap();
    v.preload(&format!("_dmarc.{domain}"), dmarc.map(Record::Dmarc), HOUR).unwrap();
    v.preload("_dmarc.test", None, HOUR).unwrap();
    v.preload("client.remote.test", None, HOUR).unwrap();
}

#[tokio::test]
async fn spf_results_for_both_identities() {
    let v = verifier();
    for (domain, record, want) in [
        ("pass.test", "v=spf1 ip4:192.0.2.0/24 -all", AuthResult::Pass),
        ("fail.test", "v=spf1 ip4:198.51.100.1 -all", AuthResult::Fail),
        ("soft.test", "v=spf1 ~all", AuthResult::SoftFail),
        ("neutral.test", "v=spf1 ?all", AuthResult::Neutral),
    ] {
        publish(&v, domain, Some(record), None);
        let spf = v.spf(&client(&format!("jane@{domain}"))).await;
        assert_eq!(spf.mail_from, SpfVerdict { result: want, domain: domain.into() }, "{record}");
        assert_eq!(spf.helo, Some(SpfVerdict { result: AuthResult::None, domain: "client.remote.test".into() }));
    }
    publish(&v, "none.test", None, None);
    assert_eq!(v.spf(&client("jane@none.test")).await.mail_from.result, AuthResult::None);
    // RFC 7208 §2.4: the null sender is judged by its HELO name.
    v.preload("client.remote.test", Some(Record::Spf("v=spf1 ip4:192.0.2.10 -all")), HOUR).unwrap();
    let bounce = v.spf(&client("")).await;
    assert_eq!(bounce.mail_from, SpfVerdict { result: AuthResult::Pass, domain: "client.remote.test".into() });
    // An address literal is not a domain: no HELO check.
    let literal = Client { helo: "[192.0.2.10]", ..client("jane@pass.test") };
    assert_eq!(v.spf(&literal).await.helo, None);
}

/// RFC 7489: forged mail claiming a p=reject domain fails DMARC; the same domain's own mail
/// passes through SPF alignment; a domain without a record has no DMARC verdict.
#[tokio::test]
async fn dmarc_with_spf_alignment() {
    let v = verifier();
    publish(&v, "office.test", Some("v=spf1 ip4:198.51.100.0/24 -all"), Some("v=DMARC1; p=reject"));
    let forged = b"From: Boss <boss@office.test>\r\nSubject: wire money\r\n\r\nnow\r\n";
    let verdict = v.check(&client("boss@office.test"), None, forged).await;
    assert_eq!(verdict.spf.mail_from.result, AuthResult::Fail);
    assert_eq!(verdict.dmarc, DmarcVerdict { result: AuthResult::Fail, domain: "office.test".into(), policy: Some(DmarcPolicy::Reject) });
    assert_eq!(
        verdict.header(HOST),
        "Authentication-Results: mail.example.test;\r\n\
\tspf=fail (office.test does not designate the client as a permitted sender) smtp.mailfrom=boss@office.test;\r\n\
\tspf=none (no SPF record for client.remote.test) smtp.helo=client.remote.test;\r\n\
\tdkim=none (no signature);\r\n\
\tdmarc=fail (p=reject) header.from=office.test\r\n"
    );

    publish(&v, "partner.test", Some("v=spf1 ip4:192.0.2.10 -all"), Some("v=DMARC1; p=quarantine; aspf=s"));
    let own = v.check(&client("news@partner.test"), None, b"From: news@partner.test\r\n\r\nhi\r\n").await;
    assert_eq!((own.spf.mail_from.result, own.dmarc.result), (AuthResult::Pass, AuthResult::Pass));
    // Strict SPF alignment: a subdomain in MAIL FROM does not align (RFC 7489 §3.1.2).
    publish(&v, "bounces.partner.test", Some("v=spf1 ip4:192.0.2.10 -all"), None);
    let sub = v.check(&client("b@bounces.partner.test"), None, b"From: news@partner.test\r\n\r\nhi\r\n").await;
    assert_eq!(sub.dmarc, DmarcVerdict { result: AuthResult::Fail, domain: "partner.test".into(), policy: Some(DmarcPolicy::Quarantine) });

    publish(&v, "plain.test", None, None);
    let plain = v.check(&client("a@plain.test"), None, b"From: a@plain.test\r\n\r\nhi\r\n").await;
    assert_eq!(plain.dmarc, DmarcVerdict { result: AuthResult::None, domain: "plain.test".into(), policy: None });
    assert_eq!(plain.facts().summary(), "SPF none (plain.test), DKIM none, DMARC none (plain.test)");
}

/// RFC 6376: a signature verifies against the key in DNS; an altered body is a failed
/// signature, and an aligned passing signature satisfies DMARC whatever SPF says.
#[tokio::test]
async fn dkim_signature_and_alignment() {
    let v = verifier();
    let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
    let key = Ed25519Key::from_pkcs8_der(&pkcs8).unwrap();
    use base64::Engine as _;
    let public = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    v.preload("sel._domainkey.office.test", Some(Record::DkimKey(&format!("v=DKIM1; k=ed25519; p={public}"))), HOUR).unwrap();
    publish(&v, "office.test", Some("v=spf1 -all"), Some("v=DMARC1; p=reject"));
    let message = b"From: boss@office.test\r\nTo: sam@example.test\r\nSubject: signed\r\n\r\nThe real boss.\r\n".to_vec();
    let signature = DkimSigner::from_key(key).domain("office.test").selector("sel").headers(["From", "To", "Subject"]).sign(&message).unwrap();
    let signed = [signature.to_header().as_bytes(), &message].concat();

    let verdict = v.check(&client("boss@office.test"), None, &signed).await;
    assert_eq!(verdict.dkim.len(), 1);
    assert_eq!(
        (verdict.dkim[0].result, verdict.dkim[0].domain.as_str(), verdict.dkim[0].selector.as_str()),
        (AuthResult::Pass, "office.test", "sel")
    );
    assert_eq!(verdict.dkim[0].b.len(), 8);
    assert_eq!((verdict.spf.mail_from.result, verdict.dmarc.result), (AuthResult::Fail, AuthResult::Pass));

    let altered = [signature.to_header().as_bytes(), &message[..message.len() - 7], b"fake.\r\n"].concat();
    let verdict = v.check(&client("boss@office.test"), None, &altered).await;
    assert_eq!(verdict.dkim[0].result, AuthResult::Fail);
    assert_eq!(verdict.dkim[0].reason.as_deref(), Some("body hash did not verify"));
    assert_eq!(verdict.dmarc.result, AuthResult::Fail);
}

/// A DNS failure is a temperror verdict (here: nothing answers for the DMARC name).
#[tokio::test]
async fn dns_failure_is_temperror() {
    let v = verifier();
    v.preload("down.test", Some(Record::Spf("v=spf1 ip4:192.0.2.10 -all")), HOUR).unwrap();
    v.preload("client.remote.test", None, HOUR).unwrap();
    // _dmarc.down.test is not preloaded: the query goes to a port where nothing listens.
    let verdict = v.check(&client("a@down.test"), None, b"From: a@down.test\r\n\r\nhi\r\n").await;
    assert_eq!(verdict.spf.mail_from.result, AuthResult::Pass);
    assert_eq!(verdict.dmarc.result, AuthResult::TempError);
    assert_eq!(verdict.dmarc.policy, None);
}

#[test]
fn header_b_is_the_first_eight_base64_characters() {
    assert_eq!(base64_prefix(&[0xff; 64]), "////////");
    assert_eq!(base64_prefix(b"ab"), "YWI=");
}
