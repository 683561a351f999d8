"""Trusted certificates with ACME (SPEC O6, issue 15; RFC 8555 with HTTP-01).

Against pebble, Let's Encrypt's ACME test server (Debian package `pebble`), on loopback only:
pebble listens on 127.0.0.1, its certificate comes from a CA this file makes (Postroom trusts it
through `[tls.acme] ca_file`), its validation authority resolves mail.example.test through the
DNS stub to 127.0.0.1 and fetches the HTTP-01 token from Postroom's own responder
(`http_listen`). A client that trusts only pebble's root (from its management interface) then
verifies the certificate Postroom serves on SMTPS, POP3S, STARTTLS and STLS for
mail.example.test. Nothing here leaves 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest_tls import SAM_ADDR, make_tls_server, peer_cert, pop_plain  # noqa: F401  (make_tls_server is a fixture)
from dnsstub import dns_stub  # noqa: F401  (a fixture)
from helpers import HOSTNAME, IO_TIMEOUT, JANE, SmtpClient, expect, make_message, render_toml, server_pid

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"

# Issuance against pebble takes about a second; the bound leaves room for a slow machine.
ISSUE_TIMEOUT = 45.0

# pebble's certificates last 90 days, as Let's Encrypt's do.
VALIDITY_SECS = 90 * 86400

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------
# pebble
# ------------------------------------------------------------------------------------------

def make_https_pair(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signs for pebble's HTTPS on 127.0.0.1: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Postroom test CA for pebble's HTTPS")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "https-ca.pem", directory / "https-cert.pem", directory / "https-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class Pebble:
    """pebble on 127.0.0.1: the ACME directory at `directory`, its validation authority asking
    `dns` (host:port) for names and fetching HTTP-01 tokens from port `http_port`."""

    def __init__(self, tmp: Path, http_port: int, dns: str):
        if not (os.path.isfile(PEBBLE) and os.access(PEBBLE, os.X_OK)):
            pytest.fail("pebble is not installed (Debian package `pebble`; .ci/run installs it)", pytrace=False)
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.https_ca, cert, key = make_https_pair(tmp)
        self.port, self.management = free_port(), free_port()
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": VALIDITY_SECS,
        }}
        self.config = tmp / "pebble.json"
        self.config.write_text(json.dumps(config))
        self.dns = dns
        self.log_path = tmp / "pebble.log"
        self.proc = None

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.https_ca))

    def start(self) -> "Pebble":
        # No random sleeps before validation, no refused nonces, a new authorization per order.
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PEBBLE, "-config", str(self.config), "-dnsserver", self.dns],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(self.directory, context=self._context(), timeout=2).read()
                return self
            except OSError:
                assert self.proc.poll() is None, f"pebble exited:\n{self.log_text()}"
                assert time.monotonic() < deadline, f"pebble did not answer within 15 s:\n{self.log_text()}"
                time.sleep(0.1)

    def root_pem(self) -> str:
        """The root pebble issues under (it makes a new one at every start)."""
        url = f"https://127.0.0.1:{self.management}/roots/0"
        return urllib.request.urlopen(url, context=self._context(), timeout=5).read().decode()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return "(no pebble log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def acme_setup(tmp_path, dns_stub, make_tls_server):  # noqa: F811
    """Factory: (server, pebble) with Postroom's [tls.acme] pointing at a pebble that is not
    started yet (call pebble.start()), so the certificate before the first issuance is seen."""
    dns_stub.a(HOSTNAME, "127.0.0.1")
    made = []

    def _make(**acme) -> tuple:
        http_port = free_port()
        pebble = Pebble(tmp_path / f"pebble{len(made)}", http_port, dns_stub.address)
        made.append(pebble)
        settings = {
            "directory": pebble.directory,
            "ca_file": str(pebble.https_ca),
            "names": [HOSTNAME],
            "contact": ["mailto:admin@example.test"],
            "http_listen": [f"127.0.0.1:{http_port}"],
            "check_secs": 2,
            **acme,
        }
        srv = make_tls_server(tls={"acme": settings})
        return srv, pebble

    yield _make
    for pebble in made:
        pebble.stop()


# ------------------------------------------------------------------------------------------
# Clients that trust pebble's root only
# ------------------------------------------------------------------------------------------

def trusting(root_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=root_pem)
    ctx.check_hostname = True
    return ctx


def verified_smtps(srv, ctx) -> SmtpClient:
    raw = socket.create_connection(srv.smtps, timeout=IO_TIMEOUT)
    c = SmtpClient.__new__(SmtpClient)
    c.buf = b""
    c.sock = ctx.wrap_socket(raw, server_hostname=HOSTNAME)
    c.greeting = c.read_reply()
    return c


def verified_starttls(srv, ctx) -> SmtpClient:
    c = SmtpClient(srv.smtp)
    expect(c.greeting, 220)
    c.ehlo()
    expect(c.cmd("STARTTLS"), 220)
    c.sock = ctx.wrap_socket(c.sock, server_hostname=HOSTNAME)
    c.ehlo()
    return c


def verified_pop3s(srv, ctx) -> bytes:
    with socket.create_connection(srv.pop3s, timeout=IO_TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=HOSTNAME) as tls:
            return tls.recv(512)


def verified_stls(srv, ctx) -> bytes:
    p = pop_plain(srv.pop3)
    try:
        r = p.cmd("STLS")
        assert r.startswith(b"+OK"), r
        p.sock = ctx.wrap_socket(p.sock, server_hostname=HOSTNAME)
        return p.cmd("CAPA")
    finally:
        p.close()


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def issuer_of(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).issuer.rfc4514_string()


def self_signed(srv) -> bytes:
    pem = (srv.data_dir / "tls-cert.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def wait_for_acme_cert(srv, pebble, previous: set[bytes], timeout: float = ISSUE_TIMEOUT) -> bytes:
    """The DER served on smtps once it is none of `previous`."""
    deadline = time.monotonic() + timeout
    while True:
        der = peer_cert(srv, "smtps")
        if der not in previous:
            return der
        assert srv.proc.poll() is None, "the server died"
        assert time.monotonic() < deadline, (
            f"no new certificate within {timeout}s\n--- postroom ---\n{srv.stderr_text()[-6000:]}\n"
            f"--- pebble ---\n{pebble.log_text()}"
        )
        time.sleep(0.2)


def wait_log(srv, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in srv.stderr_text():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{srv.stderr_text()[-6000:]}"
        time.sleep(0.1)
    return srv.stderr_text()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------

def test_issued_certificate_is_trusted_on_every_tls_listener(acme_setup):
    """O6: before the first issuance the self-signed certificate serves; once pebble is up,
    Postroom obtains a certificate (HTTP-01 answered on its own responder) and presents it,
    without a restart, on SMTPS, STARTTLS, POP3S and STLS, where a client that trusts only
    pebble's root verifies it for mail.example.test and a mail is accepted over it."""
    srv, pebble = acme_setup()
    pid = server_pid(srv)
    own = self_signed(srv)
    assert peer_cert(srv, "smtps") == own, "the self-signed certificate serves until the first issuance"
    wait_log(srv, "ACME: no certificate obtained")
    assert peer_cert(srv, "pop3s") == own

    pebble.start()
    der = wait_for_acme_cert(srv, pebble, {own})
    ctx = trusting(pebble.root_pem())
    assert server_pid(srv) == pid, "swapped in without a restart"

    c = verified_smtps(srv, ctx)
    expect(c.greeting, 220)
    assert c.sock.getpeercert(binary_form=True) == der
    c.quit()
    assert verified_pop3s(srv, ctx).startswith(b"+OK")
    assert verified_stls(srv, ctx).startswith(b"+OK")
    # A mail over STARTTLS that verified the certificate against pebble's root.
    c = verified_starttls(srv, ctx)
    try:
        assert c.sock.getpeercert()["subjectAltName"] == (("DNS", HOSTNAME),)
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        expect(c.cmd(f"RCPT TO:<{SAM_ADDR}>"), 250)
        expect(c.data(make_message("over a trusted certificate", to=SAM_ADDR)), 250)
    finally:
        c.quit()
    # The client really checks the name: another one is refused.
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(srv.smtps, timeout=IO_TIMEOUT) as raw:
            ctx.wrap_socket(raw, server_hostname="not-" + HOSTNAME)

    log = srv.stderr_text()
    assert "ACME: new TLS certificate issued and in use" in log and "sha256=" in log and "expires=" in log, log[-4000:]
    # D4: the state in data_dir/acme is private; the key never leaves it.
    state = srv.data_dir / "acme"
    assert mode(state) == 0o700
    for name in ("account.json", "cert.pem", "key.pem"):
        assert (state / name).is_file() and mode(state / name) == 0o600, name
    out = srv.cli_ok("cert", "show").stdout
    assert "issued by the ACME server" in out and str(state / "cert.pem") in out, out
    assert "ACME, valid until" in srv.cli("status").stdout

    # SIGHUP with a changed [tls.acme]: it waits for a restart, and the ACME certificate stays.
    text = srv.config_path.read_text().replace("check_secs = 2", "check_secs = 3")
    srv.config_path.write_text(text)
    offset = srv.stderr_path.stat().st_size
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in (after := srv.stderr_path.read_bytes()[offset:].decode(errors="replace")):
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert "need a restart" in after and "tls.acme" in after, after
    assert peer_cert(srv, "smtps") == der, "a reload does not bring the self-signed certificate back"

    # A restart serves the stored certificate at once (not due: 90 days left, renew_days 30),
    # before asking the ACME server anything.
    pebble.stop()
    srv.restart()
    assert peer_cert(srv, "smtps") == der
    assert "ACME: TLS certificate issued earlier" in srv.stderr_text()


def test_certificate_is_renewed_without_a_restart(acme_setup):
    """O6: with fewer than renew_days left (here always: 365 > 90 days of validity) every check
    orders a new certificate; it is swapped in by the same process and still verifies."""
    srv, pebble = acme_setup(renew_days=365)
    pebble.start()
    pid = server_pid(srv)
    first = wait_for_acme_cert(srv, pebble, {self_signed(srv)})
    ctx = trusting(pebble.root_pem())
    second = wait_for_acme_cert(srv, pebble, {self_signed(srv), first})
    assert serial_of(second) != serial_of(first)
    assert issuer_of(second) == issuer_of(first)
    assert server_pid(srv) == pid, "renewed without a restart"
    c = verified_smtps(srv, ctx)
    try:
        expect(c.greeting, 220)
        assert c.sock.getpeercert(binary_form=True) != first
    finally:
        c.quit()
    assert srv.stderr_text().count("ACME: new TLS certificate issued and in use") >= 2


def test_unreachable_acme_server_keeps_the_self_signed_certificate(make_tls_server):  # noqa: F811
    """O6: an ACME server nobody answers for: the server starts and works, the self-signed
    certificate stays, and the log says why and when it tries again."""
    closed = free_port()
    srv = make_tls_server(tls={"acme": {
        "directory": f"https://127.0.0.1:{closed}/dir",
        "http_listen": ["127.0.0.1:0"],
        "check_secs": 2,
    }})
    log = wait_log(srv, "ACME: no certificate obtained")
    assert f"https://127.0.0.1:{closed}/dir" in log and "Connection refused" in log, log[-3000:]
    assert "self-signed or [tls] certificate stays in use" in log
    assert peer_cert(srv, "smtps") == self_signed(srv)
    c = SmtpClient(srv.smtp)
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        expect(c.cmd(f"RCPT TO:<{SAM_ADDR}>"), 250)
        expect(c.data(make_message("while ACME is down", to=SAM_ADDR)), 250)
    finally:
        c.quit()
    # The responder answers, with 404 for a token no order offered.
    port = int([line.split()[1].rsplit(":", 1)[1] for line in (srv.data_dir / "listening").read_text().splitlines()
                if line.startswith("acme-http ")][0])
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(b"GET /.well-known/acme-challenge/nothing HTTP/1.1\r\nHost: mail.example.test\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 404")
    assert not (srv.data_dir / "acme" / "cert.pem").exists()


def test_config_check_names_bad_acme_keys(make_tls_server):  # noqa: F811
    """O6: a wrong [tls.acme] key is named by `config check` and refused by `serve`."""
    srv = make_tls_server(start=False, users=False, tls={"acme": {"directory": "http://acme.example/dir"}})
    r = srv.cli("config", "check")
    assert r.returncode != 0
    assert 'tls.acme.directory = "http://acme.example/dir": must be the https:// URL' in r.stderr, r.stderr
    assert "tls.acme.http_listen = []: must name at least one address:port" in r.stderr, r.stderr
    # A CA file `serve` could not read is found before it refuses to start.
    missing = srv.tmp / "no-such-ca.pem"
    srv.config_path.write_text(render_toml({
        "data_dir": str(srv.data_dir),
        "tls": {"acme": {"directory": "https://127.0.0.1:9/dir", "http_listen": ["127.0.0.1:0"], "ca_file": str(missing)}},
    }))
    r = srv.cli("config", "check")
    assert r.returncode != 0
    assert f"tls.acme.ca_file: no CA certificate read from {missing}" in r.stderr, r.stderr
