"""S/MIME on the send API (SPEC F8, issue 18): `postroom smime` keeps certificates, `postroom send
--sign/--encrypt` protects the message, and independent tools judge the result: OpenSSL's
`smime -verify` with the test CA, `smime -decrypt` with each recipient's key and the sender's.
The CA and certificates are made here with the `openssl` command; everything stays on loopback.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from conftest import SAM
from helpers import mailbox_count, wait_for_subjects

NAME, ADDR, PW = SAM
BOB = ("bob", "bob@example.test", "bob-secret-1")
CAROL = ("carol", "carol@example.test", "carol-secret-1")
DAVE = ("dave", "dave@example.test", "dave-secret-1")
BODY = "The quarterly numbers are attached in spirit.\nGr\u00fc\u00dfe, Sam\n"


def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], input=input, capture_output=True, timeout=60)


class Pki:
    """A test CA and certificates it issues (subjectAltName email, emailProtection)."""

    def __init__(self, dir: Path):
        self.dir = dir
        self.ca = dir / "ca.pem"
        r = openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(dir / "ca.key"),
                    "-out", str(self.ca), "-subj", "/CN=Postroom Test CA", "-days", "30",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        assert r.returncode == 0, r.stderr

    def issue(self, name: str, email: str | None, days: int = 30) -> tuple[Path, Path]:
        """(certificate, key) for `email`; days=-1 makes one that has already expired."""
        cert, key, csr = self.dir / f"{name}.pem", self.dir / f"{name}.key", self.dir / f"{name}.csr"
        r = openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", f"/CN={name}")
        assert r.returncode == 0, r.stderr
        ext = self.dir / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
                 "extendedKeyUsage=emailProtection"]
        if email:
            lines.append(f"subjectAltName=email:{email}")
        ext.write_text("\n".join(lines) + "\n")
        r = openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.dir / "ca.key"),
                    "-CAcreateserial", "-days", str(days), "-extfile", str(ext), "-out", str(cert))
        assert r.returncode == 0, r.stderr
        return cert, key


@pytest.fixture
def office(sam, tmp_path):
    """Sam, Bob, Carol and Dave enrolled; Sam and Bob imported their own certificates, Carol's is
    a recipient certificate only, Dave has none."""
    for user in (BOB, CAROL, DAVE):
        sam.add_user(*user)
    pki = Pki(tmp_path)
    certs = {}
    for user, addr in ((NAME, ADDR), (BOB[0], BOB[1]), (CAROL[0], CAROL[1])):
        certs[user] = pki.issue(user, addr)
    for user in (NAME, BOB[0]):
        cert, key = certs[user]
        sam.cli_ok("smime", "import", user, "--cert", str(cert), "--key", str(key))
    sam.cli_ok("smime", "add-recipient", CAROL[1], "--cert", str(certs[CAROL[0]][0]))
    return sam, pki, certs


def send(srv, subject: str, to: list[str], *flags: str):
    args = ["send", "--from", ADDR, "--subject", subject, *flags]
    for t in to:
        args += ["--to", t]
    return srv.cli(*args, input=BODY)


def delivered(srv, user, subject: str, tmp_path: Path) -> Path:
    """The message as `user` collects it over POP3, in a file for openssl."""
    msgs = [m for m in wait_for_subjects(srv, user[0], user[2], [subject]) if f"Subject: {subject}".encode() in m]
    path = tmp_path / f"{user[0]}-{subject.replace(' ', '_')}.eml"
    path.write_bytes(msgs[0])
    return path


def verify(pki: Pki, path: Path) -> subprocess.CompletedProcess:
    return openssl("smime", "-verify", "-CAfile", str(pki.ca), "-in", str(path))


def test_signed_message_verifies_with_the_ca_and_fails_when_altered(office, tmp_path):
    """F8, issue 18: `send --sign` is multipart/signed (pkcs7-signature, SHA-256); `openssl smime
    -verify` and `openssl cms -verify` accept it with the CA; an altered message fails."""
    srv, pki, _ = office
    r = send(srv, "signed report", [BOB[1]], "--sign")
    assert r.returncode == 0, (r.stdout, r.stderr)
    path = delivered(srv, BOB, "signed report", tmp_path)
    raw = path.read_bytes()
    assert b'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256' in raw, raw[:800]
    assert b"From: " in raw.split(b"\r\n\r\n")[0] and b"Message-ID: " in raw.split(b"\r\n\r\n")[0]
    v = verify(pki, path)
    assert v.returncode == 0, v.stderr
    assert b"Verification successful" in v.stderr, v.stderr
    assert b"quarterly numbers" in v.stdout or b"quarterly=20numbers" in v.stdout, v.stdout
    v = openssl("cms", "-verify", "-CAfile", str(pki.ca), "-in", str(path), "-out", str(tmp_path / "content"))
    assert v.returncode == 0, v.stderr
    # The signer's certificate travels in the signature: it names Sam.
    signers = tmp_path / "signers.pem"
    v = openssl("smime", "-verify", "-CAfile", str(pki.ca), "-in", str(path), "-signer", str(signers))
    assert v.returncode == 0 and "samjones@example.test" in openssl("x509", "-in", str(signers), "-noout", "-ext",
                                                                   "subjectAltName").stdout.decode().lower()

    altered = tmp_path / "altered.eml"
    altered.write_bytes(raw.replace(b"quarterly", b"QUARTERLY", 1) if b"quarterly" in raw
                        else raw.replace(b"attached", b"ATTACHED", 1))
    assert altered.read_bytes() != raw
    v = verify(pki, altered)
    assert v.returncode != 0, "an altered message passed verification"
    assert b"digest failure" in v.stderr.lower() or b"verification failure" in v.stderr.lower(), v.stderr


def test_encrypted_for_every_recipient_and_the_sender(office, tmp_path):
    """F8, issue 18: `send --encrypt` is pkcs7-mime enveloped-data (AES) that each recipient
    decrypts with their key, and the sender with theirs (the sent copy stays readable)."""
    srv, pki, certs = office
    r = send(srv, "sealed", [BOB[1], CAROL[1]], "--encrypt")
    assert r.returncode == 0, (r.stdout, r.stderr)
    bob_copy = delivered(srv, BOB, "sealed", tmp_path)
    carol_copy = delivered(srv, CAROL, "sealed", tmp_path)
    raw = bob_copy.read_bytes()
    assert b"application/pkcs7-mime; smime-type=enveloped-data" in raw, raw[:800]
    assert b"quarterly" not in raw, "plain text in an encrypted message"
    cms = openssl("cms", "-cmsout", "-print", "-in", str(bob_copy))
    assert cms.returncode == 0 and b"aes-256-cbc" in cms.stdout, cms.stderr
    for who, copy in ((NAME, bob_copy), (BOB[0], bob_copy), (CAROL[0], carol_copy), (NAME, carol_copy)):
        cert, key = certs[who]
        d = openssl("smime", "-decrypt", "-recip", str(cert), "-inkey", str(key), "-in", str(copy))
        assert d.returncode == 0, (who, d.stderr)
        assert b"quarterly numbers" in d.stdout or b"quarterly=20numbers" in d.stdout, (who, d.stdout)
    # A key the message was not encrypted for cannot open it.
    stranger_cert, stranger_key = pki.issue("stranger", "stranger@example.test")
    d = openssl("smime", "-decrypt", "-recip", str(stranger_cert), "-inkey", str(stranger_key), "-in", str(bob_copy))
    assert d.returncode != 0


def test_signed_then_encrypted(office, tmp_path):
    """F8, issue 18: --sign --encrypt signs, then encrypts: decrypting yields a signed message
    that verifies with the CA."""
    srv, pki, certs = office
    r = send(srv, "both", [BOB[1]], "--sign", "--encrypt")
    assert r.returncode == 0, (r.stdout, r.stderr)
    copy = delivered(srv, BOB, "both", tmp_path)
    assert b"smime-type=enveloped-data" in copy.read_bytes()
    for who in (BOB[0], NAME):
        cert, key = certs[who]
        inner = tmp_path / f"inner-{who}.eml"
        d = openssl("smime", "-decrypt", "-recip", str(cert), "-inkey", str(key), "-in", str(copy), "-out", str(inner))
        assert d.returncode == 0, d.stderr
        assert b"multipart/signed" in inner.read_bytes()
        v = verify(pki, inner)
        assert v.returncode == 0, v.stderr


def test_recipient_without_certificate_is_refused_naming_it(office):
    """Issue 18: a recipient without a certificate is an error naming the recipient, never a
    silent plaintext send: nothing is queued, not even for the recipients that have one."""
    srv, _, _ = office
    r = send(srv, "not for dave", [BOB[1], DAVE[1]], "--encrypt")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert DAVE[1] in r.stderr and "no S/MIME certificate" in r.stderr, r.stderr
    assert BOB[1] not in r.stderr, r.stderr
    time.sleep(1)
    assert mailbox_count(srv, BOB[0], BOB[2]) == 0
    assert mailbox_count(srv, DAVE[0], DAVE[2]) == 0
    # Signing needs the sender's own certificate and key: Dave has none.
    r = srv.cli("send", "--from", DAVE[1], "--to", BOB[1], "--subject", "x", "--sign", input="x\n")
    assert r.returncode == 1 and DAVE[1] in r.stderr and "smime import" in r.stderr, r.stderr


def test_import_refuses_unusable_certificates_saying_why(office, tmp_path):
    """Issue 18: expired or unusable certificates are refused with a message that says why."""
    srv, pki, certs = office
    old_cert, old_key = pki.issue("old", DAVE[1], days=-1)
    r = srv.cli("smime", "import", DAVE[0], "--cert", str(old_cert), "--key", str(old_key))
    assert r.returncode == 1 and "expired" in r.stderr, r.stderr
    r = srv.cli("smime", "add-recipient", DAVE[1], "--cert", str(old_cert))
    assert r.returncode == 1 and "expired" in r.stderr, r.stderr
    nomail_cert, nomail_key = pki.issue("nomail", None)
    r = srv.cli("smime", "import", DAVE[0], "--cert", str(nomail_cert), "--key", str(nomail_key))
    assert r.returncode == 1 and "no e-mail address" in r.stderr, r.stderr
    r = srv.cli("smime", "import", DAVE[0], "--cert", str(certs[BOB[0]][0]), "--key", str(certs[NAME][1]))
    assert r.returncode == 1 and "does not belong" in r.stderr, r.stderr
    # Bob's certificate is for Bob's address, not Dave's.
    r = srv.cli("smime", "import", DAVE[0], "--cert", str(certs[BOB[0]][0]), "--key", str(certs[BOB[0]][1]))
    assert r.returncode == 1 and "no address of user dave" in r.stderr, r.stderr
    assert "dave" not in srv.cli_ok("smime", "list").stdout


def test_list_and_remove(office):
    """Issue 18: `smime list` shows owner, e-mail and expiry; `smime remove` takes a user's or an
    address's certificate away, after which --encrypt to it is refused."""
    srv, _, _ = office
    out = srv.cli_ok("smime", "list").stdout
    for owner in (NAME, BOB[0], CAROL[1]):
        assert owner in out, out
    assert "samjones@example.test" in out and "CN=carol" in out, out
    srv.cli_ok("smime", "remove", CAROL[1])
    srv.cli_ok("smime", "remove", BOB[0])
    out = srv.cli_ok("smime", "list").stdout
    assert CAROL[1] not in out and "bob" not in out, out
    r = srv.cli("smime", "remove", BOB[0])
    assert r.returncode == 1 and "no S/MIME certificate" in r.stderr, r.stderr
    r = send(srv, "after remove", [BOB[1]], "--encrypt")
    assert r.returncode == 1 and BOB[1] in r.stderr, r.stderr
