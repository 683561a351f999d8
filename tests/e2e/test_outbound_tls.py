"""Outbound TLS and the hosts that get credentials (SPEC §6 C5; issue 13 items 9 and 10).

A host on the host-authentication list (`postroom list add hostauth HOST USER --password-stdin`)
gets its password only over STARTTLS whose certificate was verified: by the system's roots, plus
the CA certificates of `--ca FILE`, or by the certificate pinned with `--fingerprint SHA256HEX`;
the certificate must name the host the client connected to (its IP address, for an address
literal), unless a pin is used. When that cannot be had (no STARTTLS, a failed handshake, an
unverified certificate, AUTH refused) the recipients wait (4.7.x) - never a plaintext retry with
or without the credentials, never a bounce. Hosts without credentials keep opportunistic TLS that
accepts any certificate.

Also: a first MX that greets with 5xx is skipped for the next one (Postfix's
smtp_skip_5xx_greeting), and an ORCPT whose address type is not an atom (RFC 3461 §4.2) is
refused at RCPT and never relayed.

The peers are smtppeer.ExtPeer instances (STARTTLS with a certificate from `certfile`, AUTH that
records the decoded credentials) on further 127.0.0.x addresses at the Net's port; the
certificates come from a private CA made with openssl for this module.
"""

from __future__ import annotations

import base64
import hashlib
import random
import sqlite3
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from dnsstub import mx_dns_stub  # noqa: F401  (fixture)
from helpers import expect, make_message, smtp_from
from smtppeer import (  # noqa: F401  (net is a fixture)
    DEFAULT_CAPS,
    OUT_TIMEOUT,
    SAM_ADDR,
    SAM_PW,
    SAM_USER,
    commands_of,
    ext_peer,
    mailbox_stays,
    net,
    relay,
    wait_not_queued,
    wait_queue_row,
)

USER = "relayuser"
PASSWORD = "Smart-host-pw-93!"

# Many quick retries: mail that waits must still be waiting (not bounced) after a few attempts.
PATIENT = {"first_retry_count": 30, "first_retry_interval_secs": 1}


# ------------------------------------------------------------------------------------------
# Certificates
# ------------------------------------------------------------------------------------------

def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class Pki:
    """Two private CAs ("good" and "rogue") and server certificates they issue, as PEM files."""

    def __init__(self, d: Path):
        self.d = d
        self.cas = {name: self._ca(name) for name in ("good", "rogue")}

    def _ca(self, name: str) -> tuple[Path, Path]:
        cert, key = self.d / f"ca-{name}.pem", self.d / f"ca-{name}.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=Postroom test CA {name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return cert, key

    def ca(self, name: str = "good") -> str:
        return str(self.cas[name][0])

    def leaf(self, ca: str, *names: str) -> str:
        """A server certificate (and its key, in the same file) for names (DNS names or IP
        addresses), issued by CA `ca`; made once."""
        label = "-".join([ca, *names]).replace(":", "_")
        out = self.d / f"leaf-{label}.pem"
        if out.exists():
            return str(out)
        ca_cert, ca_key = self.cas[ca]
        key, csr, crt, ext = (self.d / f"leaf-{label}.{x}" for x in ("key", "csr", "crt", "ext"))
        sans = ",".join(("IP:" if n.replace(".", "").isdigit() else "DNS:") + n for n in names)
        ext.write_text(f"subjectAltName={sans}\nbasicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                 "-set_serial", str(random.randrange(1, 2**62)), "-days", "2", "-extfile", str(ext),
                 "-out", str(crt))
        out.write_text(crt.read_text() + key.read_text())
        return str(out)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def fingerprint(pem_file: str) -> str:
    """SHA-256 of the (first) certificate in a PEM file, as `openssl x509 -fingerprint` prints it."""
    der = ssl.PEM_cert_to_DER_cert(Path(pem_file).read_text().split("-----END CERTIFICATE-----")[0]
                                   + "-----END CERTIFICATE-----\n")
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, 64, 2))


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

def add_hostauth(srv, host: str, *options: str, password: str = PASSWORD):
    r = srv.cli("list", "add", "hostauth", host, USER, "--password-stdin", *options, input=password + "\n")
    assert r.returncode == 0, f"list add hostauth exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert password not in r.stdout + r.stderr
    return r


def smarthost(net, ip: str, name: str, **kw):
    """An ExtPeer that requires AUTH (PLAIN, LOGIN), STARTTLS on unless told otherwise."""
    kw.setdefault("starttls", True)
    return ext_peer(net, ip, name, auth=["PLAIN", "LOGIN"], require_auth=True, **kw)


def mx_world(net, domain: str, host: str, ip: str, **kw):
    """domain's only MX is `host` at `ip`: a smarthost-like ExtPeer."""
    peer = smarthost(net, ip, host, **kw)
    net.stub.mx(domain, (10, host))
    net.stub.a(host, ip)
    return peer


def send(srv, to: str, subject: str) -> bytes:
    m = make_message(subject, b"For the next hop.\r\n", sender=SAM_ADDR, to=to)
    relay(srv, SAM_ADDR, [to], m)
    return m


def password_seen(peer) -> list[str]:
    """Every form of the password found in the bytes the peer received (plain or base64, as
    AUTH PLAIN or LOGIN would carry it)."""
    pw = PASSWORD.encode()
    needles = {"plain": pw, "login": base64.b64encode(pw),
               "PLAIN token": base64.b64encode(b"\0" + USER.encode() + b"\0" + pw)}
    with peer.lock:
        raws = [bytes(c.raw) for c in peer.connections]
    return [what for what, n in needles.items() if any(n in r for r in raws)]


def wait_connections(peer, n: int, timeout: float = OUT_TIMEOUT) -> None:
    """Wait until the peer has had n connections and all of them are over."""
    deadline = time.monotonic() + timeout
    while True:
        with peer.lock:
            done = [c for c in peer.connections if c.closed is not None]
        if len(done) >= n:
            return
        assert time.monotonic() < deadline, f"{peer.name}: {len(done)} finished connection(s), expected {n}: " \
                                            f"{[c.commands for c in peer.connections]!r}"
        time.sleep(0.1)


def assert_waiting(srv, peer, recipient: str, status: str, attempts: int = 3) -> None:
    """The recipient was tried `attempts` times and waits with `status` in its last reply; the
    peer never got MAIL, AUTH or the password, and Sam got no bounce."""
    wait_connections(peer, attempts)
    row = wait_queue_row(srv, recipient, lambda r: status in r["line"], timeout=10)
    assert row["state"].lower() in ("forward", "attempt"), row["line"]
    cmds = [c.upper() for c in commands_of(peer)]
    assert not [c for c in cmds if c.startswith("AUTH")], f"AUTH sent: {commands_of(peer)!r}"
    assert not [c for c in cmds if c.startswith("MAIL")], f"went on without the credentials: {commands_of(peer)!r}"
    assert peer.auths == [], peer.auths
    assert password_seen(peer) == [], f"the peer saw the password ({password_seen(peer)})"
    assert not peer.delivered(), peer.summary()
    mailbox_stays(srv, SAM_USER, SAM_PW, 0, 1.5)   # no bounce
    assert wait_queue_row(srv, recipient, timeout=1)


def assert_authenticated(peer, tx) -> None:
    ok = [a for a in peer.auths if 200 <= a.reply < 300]
    assert ok, f"no successful AUTH: {peer.auths!r} {commands_of(peer)!r}"
    assert ok[-1].tls and ok[-1].user == USER and ok[-1].password == PASSWORD, ok[-1]
    assert ok[-1].connection == tx.connection and tx.tls


# ------------------------------------------------------------------------------------------
# Verified TLS for hosts with credentials
# ------------------------------------------------------------------------------------------

def test_auth_over_tls_verified_by_the_entrys_private_ca(net, pki):
    """C5: the mail router (a host_table name) has a certificate from a private CA; its entry
    names that CA with --ca -> the certificate is verified for the router's name, then AUTH,
    then the message. `list show hostauth` tells how the certificate is checked."""
    router = smarthost(net, "127.0.0.71", "smart.example", certfile=pki.leaf("good", "smart.example"))
    srv = net.server({"mail_router": "smart.example", "host_table": {"smart.example": "127.0.0.71"}},
                     start=False)
    add_hostauth(srv, "smart.example", "--ca", pki.ca())
    show = srv.cli_ok("list", "show", "hostauth").stdout
    assert "smart.example" in show and "CA" in show and PASSWORD not in show, show
    srv.start()
    m = send(srv, "a@remote.example", "verified by the private CA")
    (tx,) = router.wait_delivered("a@remote.example", timeout=OUT_TIMEOUT)
    assert tx.message.endswith(m)
    assert_authenticated(router, tx)
    wait_not_queued(srv, "a@remote.example")


@pytest.mark.parametrize("how", ["ca-with-ip", "pin", "ca-without-ip"])
def test_ip_literal_mail_router(net, pki, how):
    """C5: a mail router given as an IP address: its certificate must carry that address (with
    --ca), or be the pinned one (--fingerprint, whatever it names). A certificate of the right
    CA that names only a host name does not do: the mail waits, the password stays home."""
    ip = "127.0.0.72"
    if how == "pin":
        certfile = pki.leaf("rogue", "somewhere.else.example")
        options = ["--fingerprint", fingerprint(certfile)]
    else:
        certfile = pki.leaf("good", ip) if how == "ca-with-ip" else pki.leaf("good", "smart.example")
        options = ["--ca", pki.ca()]
    router = smarthost(net, ip, "smart.example", certfile=certfile)
    srv = net.server({"mail_router": ip, **PATIENT}, start=False)
    add_hostauth(srv, f"[{ip}]", *options)
    srv.start()
    send(srv, "a@remote.example", f"ip literal router {how}")
    if how == "ca-without-ip":
        assert_waiting(srv, router, "a@remote.example", "4.7.5")
    else:
        (tx,) = router.wait_delivered("a@remote.example", timeout=OUT_TIMEOUT)
        assert_authenticated(router, tx)


UNVERIFIED = {
    # The man in the middle: any certificate would do, so the password went to it.
    "self-signed": lambda pki: (None, []),
    "rogue-ca": lambda pki: (pki.leaf("rogue", "smart.example"), ["--ca", pki.ca("good")]),
    "other-name": lambda pki: (pki.leaf("good", "other.example"), ["--ca", pki.ca("good")]),
    "wrong-pin": lambda pki: (pki.leaf("good", "smart.example"),
                              ["--fingerprint", fingerprint(pki.leaf("rogue", "smart.example"))]),
}


@pytest.mark.parametrize("case", list(UNVERIFIED))
def test_unverified_certificate_gets_no_password_and_the_mail_waits(net, pki, case):
    """C5: the router's certificate cannot be verified (self-signed while only the system's
    roots count; another CA; the right CA but another name; not the pinned one) -> no AUTH, no
    plaintext retry, nothing that could carry the password reaches the peer; the recipient
    waits with 4.7.5 and is not bounced."""
    certfile, options = UNVERIFIED[case](pki)
    router = smarthost(net, "127.0.0.73", "smart.example", certfile=certfile)
    srv = net.server({"mail_router": "smart.example", "host_table": {"smart.example": "127.0.0.73"}, **PATIENT},
                     start=False)
    add_hostauth(srv, "smart.example", *options)
    srv.start()
    send(srv, "a@remote.example", f"unverified {case}")
    assert_waiting(srv, router, "a@remote.example", "4.7.5")
    with router.lock:
        assert all(c.tls_failed for c in router.connections), [c.commands for c in router.connections]


@pytest.mark.parametrize("trouble", ["broken-handshake", "no-starttls"])
def test_tls_trouble_with_credentials_defers_instead_of_plaintext_and_bounce(net, pki, trouble):
    """C5: the smarthost's TLS handshake fails, or it offers no STARTTLS -> no plaintext retry
    without AUTH (which the smarthost would answer 530, bouncing every recipient): the
    recipient waits (4.7.5, 4.7.4) and nothing is bounced."""
    kw = {"tls_broken": True} if trouble == "broken-handshake" else {"starttls": False}
    router = smarthost(net, "127.0.0.74", "smart.example", **kw)
    srv = net.server({"mail_router": "smart.example", "host_table": {"smart.example": "127.0.0.74"}, **PATIENT},
                     start=False)
    add_hostauth(srv, "smart.example")
    srv.start()
    send(srv, "a@remote.example", f"tls trouble {trouble}")
    assert_waiting(srv, router, "a@remote.example", "4.7.5" if trouble == "broken-handshake" else "4.7.4")


def test_auth_refused_defers_instead_of_bouncing(net, pki, monkeypatch):
    """C5: the certificate is verified (by the system's roots: SSL_CERT_FILE names the test CA)
    but the smarthost refuses the credentials (535 5.7.8) -> the recipient waits (4.7.0) for the
    operator to fix the entry; it is not bounced."""
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca("good"))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    router = smarthost(net, "127.0.0.75", "smart.example", certfile=pki.leaf("good", "smart.example"),
                       auth_reply="535 5.7.8 authentication credentials invalid")
    srv = net.server({"mail_router": "smart.example", "host_table": {"smart.example": "127.0.0.75"}, **PATIENT},
                     start=False)
    add_hostauth(srv, "smart.example")
    srv.start()
    send(srv, "a@remote.example", "auth refused")
    wait_connections(router, 3)
    row = wait_queue_row(srv, "a@remote.example", lambda r: "4.7.0" in r["line"], timeout=10)
    assert "535" in row["line"], row["line"]
    assert router.auths and all(a.tls for a in router.auths), router.auths
    assert not [c for c in commands_of(router) if c.upper().startswith("MAIL")], commands_of(router)
    mailbox_stays(srv, SAM_USER, SAM_PW, 0, 1.5)


def test_system_roots_decide_for_an_entry_without_ca_or_pin(net, pki, monkeypatch):
    """C5: an entry without --ca or --fingerprint trusts the system's roots (here SSL_CERT_FILE
    names the test CA): the MX whose certificate they vouch for gets the password; another
    listed MX, whose certificate comes from a CA they do not know, does not - its mail waits."""
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca("good"))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    good = mx_world(net, "good.example", "mx.good.example", "127.0.0.76",
                    certfile=pki.leaf("good", "mx.good.example"))
    mitm = mx_world(net, "mitm.example", "mx.mitm.example", "127.0.0.77",
                    certfile=pki.leaf("rogue", "mx.mitm.example"))
    srv = net.server(PATIENT, start=False)
    add_hostauth(srv, "mx.good.example")
    add_hostauth(srv, "mx.mitm.example")
    srv.start()
    send(srv, "a@good.example", "system roots vouch")
    send(srv, "a@mitm.example", "system roots do not vouch")
    (tx,) = good.wait_delivered("a@good.example", timeout=OUT_TIMEOUT)
    assert_authenticated(good, tx)
    assert_waiting(srv, mitm, "a@mitm.example", "4.7.5")


def test_hosts_without_credentials_keep_opportunistic_tls(net, pki):
    """C5: certificates are checked only where credentials go. other.example's MX (no entry)
    presents a self-signed certificate and still gets the message over TLS; auth.example's MX
    (listed) presents one just like it and gets nothing - its mail waits."""
    net.other.stop()
    net.other.starttls = True
    net.other.start()
    listed = mx_world(net, "auth.example", "mx.auth.example", "127.0.0.78")
    srv = net.server(PATIENT, start=False)
    add_hostauth(srv, "mx.auth.example")
    srv.start()
    m = send(srv, "o@other.example", "opportunistic still")
    send(srv, "a@auth.example", "listed host, unverified")
    (tx,) = net.other.wait_delivered("o@other.example", timeout=OUT_TIMEOUT)
    assert tx.tls and tx.message.endswith(m), net.other.summary()
    assert password_seen(net.other) == []
    assert_waiting(srv, listed, "a@auth.example", "4.7.5")


def test_hostauth_tls_options_are_checked(net, pki, tmp_path):
    """C5: --ca must name a PEM file with a certificate, --fingerprint must be a SHA-256 in hex,
    and they do not go together; a refused entry is not stored. A --ca file that also holds a key
    is stored without the key."""
    srv = net.server(start=False)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for options in (["--ca", str(junk)], ["--ca", str(tmp_path / "missing.pem")], ["--fingerprint", "12:34"],
                    ["--ca", pki.ca(), "--fingerprint", fingerprint(pki.ca())]):
        r = srv.cli("list", "add", "hostauth", "smart.example", USER, "--password-stdin", *options,
                    input=PASSWORD + "\n")
        assert r.returncode != 0, (options, r.stdout)
        assert r.stderr.strip()
    assert "smart.example" not in srv.cli_ok("list", "show", "hostauth").stdout
    add_hostauth(srv, "smart.example", "--ca", pki.leaf("good", "smart.example"))   # cert + key in one file
    con = sqlite3.connect(str(srv.data_dir / "postroom.db"), timeout=10)
    try:
        (stored,) = con.execute("SELECT tls_ca FROM hostauth WHERE host = 'smart.example'").fetchone()
    finally:
        con.close()
    assert "BEGIN CERTIFICATE" in stored and "PRIVATE KEY" not in stored, stored
    add_hostauth(srv, "pinned.example", "--fingerprint", fingerprint(pki.ca()))
    show = srv.cli_ok("list", "show", "hostauth").stdout
    assert fingerprint(pki.ca()).replace(":", "").lower() in show, show


# ------------------------------------------------------------------------------------------
# A 5xx greeting moves on to the next MX
# ------------------------------------------------------------------------------------------

def test_5xx_greeting_from_the_first_mx_moves_on_to_the_next(net):
    """C1 (Postfix's smtp_skip_5xx_greeting): mx1 greets with 554 -> mx2 gets the message at
    once; nothing bounces."""
    net.mx1.greeting = "554 5.7.1 mx1 will not talk to you"
    srv = net.server()
    m = send(srv, "a@remote.example", "skip the 5xx greeting")
    (tx,) = net.mx2.wait_delivered("a@remote.example", timeout=OUT_TIMEOUT)
    assert tx.message.endswith(m)
    assert net.mx1.connections and not net.mx1.delivered()
    wait_not_queued(srv, "a@remote.example")
    mailbox_stays(srv, SAM_USER, SAM_PW, 0, 1.5)


def test_5xx_greeting_from_the_only_mx_defers(net):
    """A 5xx greeting is not a verdict on the recipients: with no other MX the mail waits (it
    bounces only when the retries run out), and goes once the host talks again."""
    net.other.greeting = ["554 5.3.2 not now", "554 5.3.2 not now", "220 {name} ESMTP back"]
    srv = net.server(PATIENT)
    send(srv, "o@other.example", "only mx greets 5xx")
    row = wait_queue_row(srv, "o@other.example", lambda r: "554" in r["line"])
    assert "4.4.1 host mx.other.example refused to talk to me: 554 5.3.2" in row["line"], row["line"]
    net.other.wait_delivered("o@other.example", timeout=OUT_TIMEOUT)
    wait_not_queued(srv, "o@other.example")
    mailbox_stays(srv, SAM_USER, SAM_PW, 0, 1.5)


# ------------------------------------------------------------------------------------------
# ORCPT: the address type is an atom (RFC 3461 §4.2)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orcpt", [b"rfc\r822;a@remote.example", b"rf(c);a@remote.example", b";a@remote.example"],
                         ids=["bare-cr", "not-an-atom", "empty-type"])
def test_orcpt_with_a_bad_address_type_is_refused_at_rcpt(net, orcpt):
    """RFC 3461 §4.2: ORCPT's address type must be an atom -> 501, and the same RCPT without it
    is then accepted in the same session."""
    srv = net.server()
    c = smtp_from(srv, "127.0.0.1")
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
        r = c.cmd(b"RCPT TO:<a@remote.example> ORCPT=" + orcpt)
        assert r.code == 501, f"ORCPT={orcpt!r} -> {r!r}"
        expect(c.cmd("RCPT TO:<a@remote.example> ORCPT=rfc822;a@remote.example"), 250)
    finally:
        c.quit()


def test_stored_orcpt_with_a_bad_address_type_is_not_relayed(net):
    """RFC 3461 §4.2, issue 13 item 10: an ORCPT whose address type is not an atom (here one
    that reached the queue with a bare CR in it) is dropped when relaying to a DSN peer, never
    sent as it is: the RCPT line carries no CR and no ORCPT; NOTIFY still goes."""
    for p in (net.mx1, net.mx2):
        p.stop()
        p.caps = DEFAULT_CAPS + ["DSN"]
    srv = net.server(PATIENT)
    c = smtp_from(srv, "127.0.0.1")
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
        expect(c.cmd("RCPT TO:<a@remote.example> NOTIFY=FAILURE ORCPT=rfc822;a@remote.example"), 250)
        expect(c.data(make_message("bad stored orcpt", sender=SAM_ADDR, to="a@remote.example")), 250)
    finally:
        c.quit()
    qid = wait_queue_row(srv, "a@remote.example", lambda r: r["line"].split()[4] != "0")["id"]
    srv.cli_ok("queue", "hold", qid)
    time.sleep(0.5)
    con = sqlite3.connect(str(srv.data_dir / "postroom.db"), timeout=10)
    try:
        with con:
            n = con.execute("UPDATE recipients SET orcpt = ? WHERE lower(address) = 'a@remote.example'",
                            ("rfc\r822;a@remote.example",)).rowcount
    finally:
        con.close()
    assert n == 1
    for p in (net.mx1, net.mx2):
        p.start()
    srv.cli_ok("queue", "release", qid)
    (tx,) = net.mx1.wait_delivered("a@remote.example", timeout=OUT_TIMEOUT)
    (params,) = [p for a, p in net.mx1.rcpt_params if a.lower() == "a@remote.example"]
    assert "\r" not in params and "ORCPT" not in params.upper(), repr(params)
    assert "NOTIFY=FAILURE" in params.upper(), repr(params)
