"""DKIM signing of outbound mail (issue 16; RFC 6376, RFC 8463) and `postroom dkim`.

`postroom dkim keygen` makes a key for example.test and prints its TXT record; the test publishes
that record on the loopback DNS stub (dnsstub.DnsStub.txt), which is also the server's `[dns]`.
Mail leaves for scripted peers (smtppeer.Net: remote.example's MX hosts, other.example's), and
what a peer received is verified by dkimpy (the code of Debian's python3-dkim) looking the key up
on the same stub (dnsstub.query_txt) — never the system's resolvers.

Cases: a plain message with each algorithm and with both; 8-bit content converted for a host
without 8BITMIME (the signature covers the converted octets); long folded header fields (and one
over 998 octets, which the client folds before signing); submission with AUTH; `postroom
sendmail`; an alias forwarding an outsider's mail (signed by the office); a bounce from <>; a
changed message fails. `dkim check`: matches, missing record, another key.
"""

from __future__ import annotations

import re
import smtplib

import dkim
import pytest

from dnsstub import mx_dns_stub, query_txt  # noqa: F401  (fixture)
from helpers import JANE, make_message
from smtppeer import (  # noqa: F401  (net is a fixture)
    SAM_ADDR,
    SAM_PW,
    SAM_USER,
    net,
    relay,
    wait_queue_empty,
)

DOMAIN = "example.test"
OUTSIDER = "127.0.0.20"   # in no relay list: mail to an alias is local mail from there
CAPS_WITHOUT_8BITMIME = ["PIPELINING", "SIZE 52428800", "ENHANCEDSTATUSCODES"]


def keygen(srv, algorithm: str = "rsa", *extra: str) -> tuple[str, str]:
    """`postroom dkim keygen`: the record's name and value as printed."""
    out = srv.cli_ok("dkim", "keygen", DOMAIN, "--algorithm", algorithm, *extra).stdout
    name = re.search(r"^name:\s+(\S+)$", out, re.M)
    value = re.search(r"^value:\s+(v=DKIM1;.*)$", out, re.M)
    assert name and value, out
    return name.group(1), value.group(1)


def publish(net, srv, *algorithms: str) -> None:
    for a in algorithms:
        name, value = keygen(srv, a)
        net.stub.txt(name, value)


def signed_server(net, *algorithms: str, **kw):
    srv = net.server(start=False, **kw)
    publish(net, srv, *algorithms)
    return srv.start()


def signatures(net, message: bytes) -> list[dict]:
    """Each DKIM-Signature of `message`: its tags and whether dkimpy verifies it (with the keys
    on the stub)."""
    def dnsfunc(name, timeout=5):
        return b"".join(query_txt(net.stub.address, name.decode().rstrip(".")))

    d = dkim.DKIM(message)
    found = []
    headers = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    for i, value in enumerate(headers):
        tags = dict(t.strip().split("=", 1) for t in re.sub(rb"\s+", b"", value).decode().split(";") if "=" in t)
        try:
            tags["ok"] = d.verify(idx=i, dnsfunc=dnsfunc)
        except dkim.DKIMException as e:  # what dkim.verify() turns into False
            tags["ok"], tags["why"] = False, str(e)
        found.append(tags)
    return found


def assert_signed(net, message: bytes, algorithms=("rsa-sha256",), domain: str = DOMAIN) -> None:
    assert message.startswith(b"DKIM-Signature:"), message[:300]
    sigs = signatures(net, message)
    assert sorted(s["a"] for s in sigs) == sorted(algorithms), sigs
    for s in sigs:
        assert s["d"] == domain and s["c"] == "relaxed/relaxed", s
        assert s["h"].lower().count("from") == 2, f"From oversigned: {s['h']}"
        assert s["ok"], f"dkimpy does not verify {s}\n{message[:1500]!r}"


def changed(message: bytes) -> bytes:
    """The message with one more word in its last body line."""
    return message[:-2] + b" (changed)\r\n"


# ------------------------------------------------------------------------------------------
# What is signed, and that it verifies
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_plain_message_verifies_and_a_changed_one_does_not(net, algorithm):
    """RFC 6376 §5, RFC 8463: mail relayed for Sam leaves with one signature by example.test's
    key; dkimpy verifies it against the published record; a changed body fails."""
    srv = signed_server(net, algorithm)
    relay(srv, SAM_ADDR, ["a@remote.example"], make_message("plain dkim", b"Hello there.\r\n", sender=SAM_ADDR,
                                                           to="a@remote.example"))
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert_signed(net, tx.message, [{"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}[algorithm]])
    assert not signatures(net, changed(tx.message))[0]["ok"], "a changed message must fail"
    wait_queue_empty(srv)


def test_domain_with_both_keys_signs_twice(net):
    """RFC 6376 §4.2, RFC 8463: an RSA and an Ed25519 key: two signatures, both verify."""
    srv = signed_server(net, "rsa", "ed25519")
    relay(srv, SAM_ADDR, ["a@remote.example"], make_message("dual", b"Hi.\r\n", sender=SAM_ADDR, to="a@remote.example"))
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert_signed(net, tx.message, ["rsa-sha256", "ed25519-sha256"])


def test_eight_bit_message_converted_for_a_7bit_host_verifies(net):
    """RFC 6152 §3 with RFC 6376 §5.3: a UTF-8 body sent with BODY=8BITMIME to a host without
    8BITMIME arrives quoted-printable, and the signature covers those converted octets."""
    net.mx1.caps = list(CAPS_WITHOUT_8BITMIME)
    net.mx2.caps = list(CAPS_WITHOUT_8BITMIME)
    srv = signed_server(net, "rsa")
    body = "Grüße aus dem Büro — café\r\n".encode()
    m = (f"From: {SAM_ADDR}\r\nTo: a@remote.example\r\nSubject: eight bit\r\nMIME-Version: 1.0\r\n"
         "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode() + body
    relay(srv, SAM_ADDR, ["a@remote.example"], m)
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert all(b < 128 for b in tx.message), "converted to 7-bit"
    assert b"quoted-printable" in tx.message.lower()
    assert_signed(net, tx.message)


def test_long_folded_header_fields_verify(net):
    """RFC 6376 §3.4.2: folded Subject and To, and a header line over 998 octets that the
    client folds (RFC 5322 §2.1.1) before it signs."""
    srv = signed_server(net, "ed25519")
    to = ",\r\n ".join(f"person{i}@remote.example" for i in range(12))
    subject = "A subject long enough to be folded " * 4
    long_ref = " ".join(f"<ref{i}.{'x' * 40}@example.test>" for i in range(30))  # ~1500 octets on one line
    m = (f"From: Sam Jones\r\n <{SAM_ADDR}>\r\nTo: {to}\r\nSubject: {subject[:70]}\r\n\t{subject[70:]}\r\n"
         f"References: {long_ref}\r\nDate: Mon, 6 Jul 2026 12:00:00 +0000\r\n\r\nBody.\r\n").encode()
    relay(srv, SAM_ADDR, ["person0@remote.example"], m)
    (tx,) = net.mx1.wait_delivered("person0@remote.example")
    assert max(len(line) for line in tx.message.split(b"\r\n")) <= 998
    assert_signed(net, tx.message, ["ed25519-sha256"])


def test_submission_with_auth_is_signed_after_the_added_headers(net):
    """A4 with RFC 6376: Sam submits with AUTH (smtplib, plaintext from loopback); the server
    adds Message-ID and Date, and signs after its own changes."""
    srv = signed_server(net, "rsa", smtp={"submission_listen": ["127.0.0.1:0"]})
    host, port = srv.submission
    s = smtplib.SMTP(host, port, timeout=30)
    try:
        s.ehlo()
        s.login(SAM_USER, SAM_PW)
        s.sendmail(SAM_ADDR, ["a@remote.example"], f"From: {SAM_ADDR}\r\nTo: a@remote.example\r\n"
                   "Subject: submitted\r\n\r\nFrom Thunderbird.\r\n")
    finally:
        s.quit()
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert b"\r\nMessage-ID:" in tx.message or b"\r\nMessage-Id:" in tx.message
    assert_signed(net, tx.message)
    sig = signatures(net, tx.message)[0]
    assert "message-id" in sig["h"].lower() and "date" in sig["h"].lower(), sig


def test_sendmail_is_signed(net):
    """F6: a message from `postroom sendmail` (root, sending as sam) to a remote address."""
    srv = signed_server(net, "rsa")
    r = srv.cli("sendmail", "-f", SAM_ADDR, "a@remote.example",
                input=f"From: {SAM_ADDR}\nTo: a@remote.example\nSubject: from cron\n\nNightly backup done.\n")
    assert r.returncode == 0, r.stderr
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert_signed(net, tx.message)


def test_mail_an_alias_forwards_is_signed_by_the_office(net):
    """F7: Jane (outside) writes to an alias that forwards to another outside address: her From
    domain has no key, so example.test signs (the key of the first local domain)."""
    srv = net.server(start=False)
    srv.cli_ok("alias", "add", "ext@example.test", "far@remote.example")
    publish(net, srv, "rsa")
    srv.start()
    relay(srv, JANE, ["ext@example.test"], make_message("via alias", b"Hi.\r\n", sender=JANE, to="ext@example.test"),
          source_ip=OUTSIDER)
    (tx,) = net.mx1.wait_delivered("far@remote.example")
    assert tx.message.startswith(b"DKIM-Signature:") and b"Delivered-To: ext@example.test" in tx.message
    assert_signed(net, tx.message)


def test_bounce_from_null_sender_is_signed(net):
    """C4: the bounce Postroom makes (MAIL FROM:<>, From MAILER-DAEMON) is signed too."""
    net.other.rcpt["x@other.example"] = "550 5.1.1 <x@other.example>: no such user here"
    srv = signed_server(net, "ed25519")
    relay(srv, JANE, ["x@other.example"], make_message("will bounce", b"Hi.\r\n", sender=JANE, to="x@other.example"))
    (tx,) = net.mx1.wait_delivered(JANE)
    assert tx.mail_from == ""
    assert_signed(net, tx.message, ["ed25519-sha256"])
    wait_queue_empty(srv)


def test_without_keys_mail_leaves_unsigned(net):
    """No key: nothing changes (no DKIM-Signature)."""
    srv = net.server()
    relay(srv, SAM_ADDR, ["a@remote.example"], make_message("unsigned", b"Hi.\r\n", sender=SAM_ADDR, to="a@remote.example"))
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert b"DKIM-Signature" not in tx.message


# ------------------------------------------------------------------------------------------
# postroom dkim keygen | list | remove | check
# ------------------------------------------------------------------------------------------

def test_dkim_check_matches_missing_and_different_key(net):
    """`dkim check` through [dns]: exit 0 only when the record holds the key."""
    srv = net.server(start=False)
    name, value = keygen(srv, "rsa", "--selector", "s1")
    assert name == "s1._domainkey.example.test"
    r = srv.cli("dkim", "check", DOMAIN)
    assert r.returncode == 1 and "missing" in r.stdout, (r.stdout, r.stderr)
    net.stub.txt(name, value.replace("v=DKIM1; ", "v=DKIM1;  "))  # spacing does not matter
    r = srv.cli("dkim", "check", DOMAIN)
    assert r.returncode == 0 and "matches" in r.stdout, (r.stdout, r.stderr)
    _, other = keygen(srv, "rsa", "--selector", "s1", "--force")
    r = srv.cli("dkim", "check", DOMAIN)
    assert r.returncode == 1 and "different key" in r.stdout and other in r.stdout, (r.stdout, r.stderr)


def test_keygen_list_remove(net):
    """Only local domains get keys; a taken selector needs --force; list shows what signs."""
    srv = net.server(start=False)
    r = srv.cli("dkim", "keygen", "elsewhere.example")
    assert r.returncode == 1 and "not a local domain" in r.stderr, r.stderr
    keygen(srv, "ed25519", "--selector", "e1")
    r = srv.cli("dkim", "keygen", DOMAIN, "--algorithm", "ed25519", "--selector", "e1")
    assert r.returncode == 1 and "--force" in r.stderr, r.stderr
    out = srv.cli_ok("dkim", "list").stdout
    assert re.search(r"^example\.test\s+e1\s+ed25519-sha256\s.*\syes$", out, re.M), out
    srv.cli_ok("dkim", "remove", DOMAIN, "--selector", "e1")
    assert "no DKIM keys" in srv.cli_ok("dkim", "list").stdout
    r = srv.cli("dkim", "remove", DOMAIN)
    assert r.returncode == 1 and "no DKIM keys" in r.stderr
