"""TLS (SPEC S2 STARTTLS, S6 listeners, P1/P2 STLS and pop3s, A1 plaintext-password policy, O6
certificate reload): what a mail client, curl, openssl s_client and swaks see.

Every server here has five listeners on 127.0.0.1 port 0 (smtp, submission, smtps, pop3, pop3s)
and users sam, kim, admin (conftest_tls.make_tls_server). Clients accept any certificate.
"""

from __future__ import annotations

import os
import poplib
import re
import ssl
import stat
import subprocess
import time

import pytest

from conftest_tls import (  # noqa: F401  (make_tls_server is a fixture)
    CURL,
    KIM_ADDR,
    KIM_NAME,
    KIM_PW,
    OPENSSL,
    SAM_ADDR,
    SAM_NAME,
    SAM_PW,
    SWAKS,
    client_ctx,
    capa_has,
    capa_sasl,
    ehlo_keywords,
    fingerprint,
    make_cert_pair,
    make_tls_server,
    needs_curl,
    needs_openssl,
    needs_swaks,
    nothing_arrives,
    partial_client_hello,
    peer_cert,
    plain_token,
    pop3_ssl,
    pop_capa,
    pop_plain,
    pop_stls,
    pops_client,
    smtp_plain,
    smtplib_submit,
    smtps_client,
    starttls,
)
from helpers import (
    CLIENT_NAME,
    HOSTNAME,
    LineSocket,
    expect,
    make_message,
    retr,
    subject_of,
    wait_for_subjects,
    wait_queued,
)

NEVER = {"tls": {"allow_plaintext_auth": "never"}}


# ------------------------------------------------------------------------------------------
# SMTP STARTTLS and the AUTH advertisement
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_starttls_advertised_in_plaintext_not_after(make_tls_server, listener):
    """S2 (RFC 3207): plaintext EHLO lists STARTTLS; after the handshake EHLO no longer does."""
    srv = make_tls_server()
    c = smtp_plain(getattr(srv, listener))
    try:
        expect(c.greeting, 220)
        assert "STARTTLS" in ehlo_keywords(c.ehlo()), "plaintext EHLO does not offer STARTTLS"
        tls = starttls(c)
        assert tls.version() in ("TLSv1.2", "TLSv1.3"), tls.version()
        kw = ehlo_keywords(c.ehlo())
        assert "STARTTLS" not in kw, f"STARTTLS still offered over TLS: {kw}"
        assert {"PLAIN", "LOGIN"} <= set(kw.get("AUTH", [])), f"no AUTH PLAIN LOGIN over TLS: {kw}"
        # A second STARTTLS inside TLS is refused.
        assert c.cmd("STARTTLS").code in (454, 500, 502, 503), "STARTTLS accepted twice"
    finally:
        c.quit()


@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_no_auth_in_plaintext_when_never(make_tls_server, listener):
    """A1: allow_plaintext_auth = "never": plaintext EHLO lists no AUTH and AUTH is refused with
    538 5.7.11 (RFC 4954 "encryption required"); over TLS the same credentials work."""
    srv = make_tls_server(**NEVER)
    c = smtp_plain(getattr(srv, listener))
    try:
        expect(c.greeting, 220)
        kw = ehlo_keywords(c.ehlo())
        assert "AUTH" not in kw, f"AUTH offered in plaintext with allow_plaintext_auth=never: {kw}"
        expect(c.cmd(f"AUTH PLAIN {plain_token(SAM_NAME, SAM_PW)}"), 538, "5.7.11")
        r = c.cmd("AUTH LOGIN")
        expect(r, 538, "5.7.11")
        starttls(c)
        assert "AUTH" in ehlo_keywords(c.ehlo())
        expect(c.cmd(f"AUTH PLAIN {plain_token(SAM_NAME, SAM_PW)}"), 235, "2.7.0")
    finally:
        c.quit()


def test_plaintext_auth_from_loopback_when_allowed(make_tls_server):
    """A1: allow_plaintext_auth = "loopback" (the default) and a client on 127.0.0.0/8: AUTH PLAIN
    LOGIN is offered and works without TLS."""
    srv = make_tls_server(tls={"allow_plaintext_auth": "loopback"})
    c = smtp_plain(srv.submission)
    try:
        expect(c.greeting, 220)
        kw = ehlo_keywords(c.ehlo())
        assert {"PLAIN", "LOGIN"} <= set(kw.get("AUTH", [])), kw
        assert "STARTTLS" in kw, kw
        expect(c.cmd(f"AUTH PLAIN {plain_token(SAM_NAME, SAM_PW)}"), 235, "2.7.0")
    finally:
        c.quit()


@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_starttls_command_injection_is_discarded(make_tls_server, listener):
    """S2 (RFC 3207 §4.2): a command pipelined after STARTTLS in the same packet is never answered;
    after the handshake the session starts afresh (MAIL before EHLO: 503)."""
    srv = make_tls_server()
    c = smtp_plain(getattr(srv, listener))
    try:
        expect(c.greeting, 220)
        c.ehlo()
        c.send(b"STARTTLS\r\nMAIL FROM:<a@b.example>\r\n")
        expect(c.read_reply(), 220)
        # Give a vulnerable server time to answer the injected line in plaintext.
        time.sleep(0.3)
        assert nothing_arrives(c.sock, 0.3) == b"" and c.buf == b"", \
            "the server answered the line injected after STARTTLS in plaintext"
        c.sock = client_ctx().wrap_socket(c.sock, server_hostname=HOSTNAME)
        early = nothing_arrives(c.sock, 0.7)
        assert early == b"", f"the server answered the injected MAIL over TLS: {early!r}"
        r = c.cmd("MAIL FROM:<a@b.example>")
        expect(r, 503)
        c.ehlo()
        # After EHLO the session works (submission still wants AUTH first).
        expect(c.cmd("MAIL FROM:<a@b.example>"), 250 if listener == "smtp" else 530)
    finally:
        c.quit()


# ------------------------------------------------------------------------------------------
# Implicit TLS and the handshake deadline
# ------------------------------------------------------------------------------------------

def test_implicit_tls_submission_with_smtplib(make_tls_server):
    """S6 (RFC 8314): smtplib.SMTP_SSL on tls_listen: login and send; kim receives it."""
    srv = make_tls_server()
    msg = make_message("over smtps", sender=SAM_ADDR, to=KIM_ADDR)
    refused = smtplib_submit(srv, "smtps", SAM_NAME, SAM_PW, SAM_ADDR, KIM_ADDR, msg)
    assert not refused, refused
    wait_for_subjects(srv, KIM_NAME, KIM_PW, ["over smtps"])


def test_smtps_greets_only_after_handshake(make_tls_server):
    """S6: on tls_listen a plaintext client never gets a 220 greeting in clear text."""
    srv = make_tls_server(tls={"handshake_timeout_secs": 2})
    s = LineSocket(srv.smtps)
    try:
        closed, got = s.wait_closed(3.0)
        assert not got.startswith(b"220"), f"plaintext greeting on the implicit-TLS port: {got!r}"
        assert b"220" not in got, got
    finally:
        s.close()
    # ... while a TLS client is greeted, and offered AUTH but not STARTTLS.
    c = smtps_client(srv.smtps)
    try:
        expect(c.greeting, 220)
        kw = ehlo_keywords(c.ehlo())
        assert {"PLAIN", "LOGIN"} <= set(kw.get("AUTH", [])), kw
        assert "STARTTLS" not in kw, kw
    finally:
        c.quit()


def test_pop3s_greets_only_after_handshake(make_tls_server):
    """P2: on the pop3s listener a plaintext client never gets +OK in clear text."""
    srv = make_tls_server(tls={"handshake_timeout_secs": 2})
    s = LineSocket(srv.pop3s)
    try:
        closed, got = s.wait_closed(3.0)
        assert b"+OK" not in got, f"plaintext greeting on the implicit-TLS POP3 port: {got!r}"
    finally:
        s.close()


@pytest.mark.parametrize("first_handshakes", [True, False], ids=["session", "handshake-pending"])
@pytest.mark.parametrize("listener", ["smtps", "pop3s"])
def test_refusal_at_the_session_limit_is_sent_inside_tls(make_tls_server, listener, first_handshakes):
    """S4, S6, P2: at max_sessions_per_ip an implicit-TLS client completes the handshake and reads
    the refusal (421 / -ERR [SYS/TEMP]) over TLS, not bytes in clear text that break its TLS. A
    client still in (or never starting) its handshake holds its slot like any other, so the
    per-address limit also bounds connections that never handshake."""
    proto = "smtp" if listener == "smtps" else "pop3"
    # S4: smtps counts against the submission pool, POP3S against the POP3 pool.
    key = "submission_max_sessions_per_ip" if listener == "smtps" else "max_sessions_per_ip"
    srv = make_tls_server(**{proto: {key: 1}})
    connect = smtps_client if listener == "smtps" else pops_client
    if first_handshakes:
        first = connect(getattr(srv, listener))
    else:
        first = LineSocket(getattr(srv, listener))
        time.sleep(0.3)  # nothing to read yet: give the server a moment to accept it first
    try:
        second = connect(getattr(srv, listener))
        try:
            if listener == "smtps":
                expect(second.greeting, 421)
                assert "too many connections" in second.greeting.text.lower(), second.greeting
            else:
                assert second.greeting.startswith(b"-ERR [SYS/TEMP]"), second.greeting
        finally:
            second.close()
    finally:
        first.close()


@pytest.mark.parametrize("listener", ["smtps", "submission", "smtp", "pop3s", "pop3"])
def test_unfinished_handshake_is_dropped(make_tls_server, listener):
    """S4: a client that starts a TLS handshake and never finishes it is dropped after
    handshake_timeout_secs (2 here), not after the 5-minute command timeout."""
    srv = make_tls_server(tls={"handshake_timeout_secs": 2})
    s = LineSocket(getattr(srv, listener))
    try:
        if listener in ("smtp", "submission"):
            s.read_line()
            s.send(b"EHLO " + CLIENT_NAME.encode() + b"\r\n")
            while not s.read_line()[3:4] == b" ":
                pass
            s.send(b"STARTTLS\r\n")
            assert s.read_line().startswith(b"220")
        elif listener == "pop3":
            assert s.read_line().startswith(b"+OK")
            s.send(b"STLS\r\n")
            assert s.read_line().startswith(b"+OK")
        t0 = time.monotonic()
        s.send(partial_client_hello())
        closed, _ = s.wait_closed(12.0)
        elapsed = time.monotonic() - t0
        assert closed, "a half-finished TLS handshake was still open after 12 s"
        assert elapsed < 8.0, f"dropped only after {elapsed:.1f}s (handshake_timeout_secs = 2)"
        # Not an instant refusal of the half hello: the deadline is what dropped it.
        assert elapsed > 1.0, f"dropped after {elapsed:.2f}s, before handshake_timeout_secs = 2"
    finally:
        s.close()
    # The server still serves others.
    assert peer_cert(srv, listener)


# ------------------------------------------------------------------------------------------
# Certificates
# ------------------------------------------------------------------------------------------

ALL_TLS = ["smtp", "submission", "smtps", "pop3", "pop3s"]


def _pems_in(data_dir):
    certs, keys = [], []
    for p in data_dir.rglob("*"):
        if not p.is_file() or p.stat().st_size > 65536:
            continue
        data = p.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" in data:
            certs.append(p)
        if b"PRIVATE KEY-----" in data:
            keys.append(p)
    return certs, keys


def test_self_signed_certificate_generated_on_first_start(make_tls_server):
    """O1/S2: no cert/key configured: a self-signed certificate for the hostname is generated into
    data_dir (key 0600), every TLS listener presents it, and it survives a restart."""
    srv = make_tls_server()
    certs, keys = _pems_in(srv.data_dir)
    assert certs and keys, f"no PEM certificate/key in {srv.data_dir}: {list(srv.data_dir.iterdir())}"
    for k in keys:
        mode = stat.S_IMODE(k.stat().st_mode)
        assert mode & 0o077 == 0, f"{k} has mode {oct(mode)}, expected 0600"
    on_disk = {ssl.PEM_cert_to_DER_cert(c.read_text()) for c in certs}
    seen = {name: peer_cert(srv, name) for name in ALL_TLS}
    for name, der in seen.items():
        assert der in on_disk, f"{name} presents a certificate that is not the one in data_dir"
    assert HOSTNAME.encode() in seen["smtps"], "the self-signed certificate does not name the hostname"
    srv.restart()
    assert fingerprint(peer_cert(srv, "smtps")) == fingerprint(seen["smtps"]), \
        "a restart generated a new certificate instead of keeping the first one"


def test_config_check_mentions_self_signed(make_tls_server):
    """O1: `config check` says that a self-signed certificate is (or will be) used."""
    srv = make_tls_server(start=False, users=False)
    r = srv.cli("config", "check")
    assert r.returncode == 0, r.stderr
    assert re.search(r"(?i)self-signed", r.stdout + r.stderr), r.stdout + r.stderr


@needs_openssl
def test_certificate_from_files_and_reload(make_tls_server, tmp_path):
    """S2, O6: [tls] cert/key from files are presented on every TLS listener; replacing the files
    makes new connections see the new certificate within ~10 s, without a restart."""
    d = tmp_path / "certs"
    cert_a, key_a, der_a = make_cert_pair(d, HOSTNAME, "a")
    srv = make_tls_server(tls={"cert": str(cert_a), "key": str(key_a)})
    for name in ALL_TLS:
        assert peer_cert(srv, name) == der_a, f"{name} does not present the configured certificate"
    pid = srv.proc.pid
    cert_b, key_b, der_b = make_cert_pair(d, HOSTNAME, "b")
    assert der_b != der_a
    # Replace each file atomically (as `install` or an ACME client does).
    os.replace(key_b, key_a)
    os.replace(cert_b, cert_a)
    deadline = time.monotonic() + 15
    while peer_cert(srv, "smtps") != der_b:
        assert time.monotonic() < deadline, "the replaced certificate was not picked up within 15 s"
        time.sleep(0.5)
    for name in ALL_TLS:
        assert peer_cert(srv, name) == der_b, f"{name} still presents the old certificate"
    assert srv.proc is not None and srv.proc.pid == pid and srv.proc.poll() is None, \
        "the server restarted (or died) to reload the certificate"


@needs_openssl
def test_broken_replacement_keeps_the_old_certificate(make_tls_server, tmp_path):
    """O6: a renewal gone wrong (new certificate, old key: they do not fit) does not take TLS
    down: the server keeps presenting the old certificate; once the matching key arrives, the new
    one is used."""
    d = tmp_path / "certs"
    cert_a, key_a, der_a = make_cert_pair(d, HOSTNAME, "a")
    srv = make_tls_server(tls={"cert": str(cert_a), "key": str(key_a)})
    assert peer_cert(srv, "smtps") == der_a
    cert_b, key_b, der_b = make_cert_pair(d, HOSTNAME, "b")
    os.replace(cert_b, cert_a)  # the key still is key A: mismatch
    end = time.monotonic() + 4
    while time.monotonic() < end:
        for name in ("smtps", "submission", "pop3s"):
            assert peer_cert(srv, name) == der_a, f"{name}: not the old certificate during the mismatch"
        time.sleep(0.5)
    assert srv.proc.poll() is None, "the server died on a mismatched certificate/key pair"
    os.replace(key_b, key_a)
    deadline = time.monotonic() + 15
    while peer_cert(srv, "smtps") != der_b:
        assert time.monotonic() < deadline, "the completed renewal was not picked up within 15 s"
        time.sleep(0.5)


@needs_openssl
def test_missing_certificate_file_is_a_clear_error(make_tls_server, tmp_path):
    """S2: a configured certificate file that does not exist stops `serve` with a message naming
    it (never a silent fallback to a self-signed certificate)."""
    missing = tmp_path / "nope" / "cert.pem"
    srv = make_tls_server(start=False, users=False,
                          tls={"cert": str(missing), "key": str(tmp_path / "nope" / "key.pem")})
    with pytest.raises(Exception) as e:
        srv.start(ready_timeout=10)
    msg = str(e.value)
    assert str(missing) in msg or "tls.cert" in msg, f"the error does not name the file:\n{msg[-2000:]}"


# ------------------------------------------------------------------------------------------
# POP3: CAPA, STLS, pop3s, AUTH PLAIN, socket_layer
# ------------------------------------------------------------------------------------------

def test_pop3_capa_plaintext_loopback_allowed(make_tls_server):
    """P1/P2: plaintext CAPA lists STLS; with allow_plaintext_auth = "loopback" (client on
    loopback) USER and SASL PLAIN too."""
    srv = make_tls_server(tls={"allow_plaintext_auth": "loopback"})
    p = pop_plain(srv.pop3)
    try:
        caps = pop_capa(p)
        assert capa_has(caps, "STLS"), caps
        assert capa_has(caps, "USER"), caps
        assert "PLAIN" in capa_sasl(caps), caps
    finally:
        p.close()


def test_pop3_capa_never_offers_credentials_only_after_stls(make_tls_server):
    """P2 (RFC 2595): allow_plaintext_auth = "never": plaintext CAPA lists STLS but neither USER
    nor SASL PLAIN, and USER/PASS does not log in; after STLS, CAPA lists USER and SASL PLAIN
    and no longer STLS, and the login works."""
    srv = make_tls_server(**NEVER)
    p = pop_plain(srv.pop3)
    try:
        assert p.greeting.startswith(b"+OK"), p.greeting
        caps = pop_capa(p)
        assert capa_has(caps, "STLS"), caps
        assert not capa_has(caps, "USER"), f"USER offered in plaintext: {caps}"
        assert "PLAIN" not in capa_sasl(caps), f"SASL PLAIN offered in plaintext: {caps}"
        r = p.cmd("USER sam")
        if r.startswith(b"+OK"):
            r = p.cmd(f"PASS {SAM_PW}")
        assert not r.startswith(b"+OK"), "a plaintext password logged in with allow_plaintext_auth=never"
        r = p.cmd(f"AUTH PLAIN {plain_token(SAM_NAME, SAM_PW)}")
        assert not r.startswith(b"+OK"), "plaintext AUTH PLAIN logged in with allow_plaintext_auth=never"
    finally:
        p.close()
    p = pop_plain(srv.pop3)
    try:
        pop_stls(p)
        caps = pop_capa(p)
        assert not capa_has(caps, "STLS"), f"STLS still offered over TLS: {caps}"
        assert capa_has(caps, "USER"), caps
        assert "PLAIN" in capa_sasl(caps), caps
        p.login(SAM_NAME, SAM_PW)
        assert p.cmd("STAT").startswith(b"+OK")
        p.cmd("QUIT")
    finally:
        p.close()


def test_pop3_stls_with_poplib(make_tls_server):
    """P2: poplib stls(), then USER/PASS, retrieves the message sam was sent."""
    srv = make_tls_server(**NEVER)
    msg = make_message("for sam over stls", to=SAM_ADDR)
    assert not smtplib_submit(srv, "submission", KIM_NAME, KIM_PW, KIM_ADDR, SAM_ADDR, msg)
    deadline = time.monotonic() + 20
    while True:
        p = poplib.POP3(srv.pop3[0], srv.pop3[1], timeout=15)
        p.stls(context=client_ctx())
        p.user(SAM_NAME)
        p.pass_(SAM_PW)
        n, _ = p.stat()
        if n >= 1 or time.monotonic() > deadline:
            break
        p.quit()
        time.sleep(0.25)
    try:
        assert n == 1, "message not delivered"
        assert subject_of(retr(p, 1)) == "for sam over stls"
    finally:
        p.quit()


def test_pop3s_with_poplib(make_tls_server):
    """P2: POP3_SSL on the pop3s listener logs in and lists; CAPA there offers no STLS."""
    srv = make_tls_server(**NEVER)
    p = pop3_ssl(srv)
    try:
        caps = p.capa()
        assert "STLS" not in caps, caps
        assert "USER" in caps, caps
        p.user(SAM_NAME)
        p.pass_(SAM_PW)
        assert p.stat() == (0, 0)
    finally:
        p.quit()


def test_pop3_auth_plain_initial_response(make_tls_server):
    """P1 (RFC 5034): AUTH PLAIN <base64> over TLS logs in; a wrong password gets -ERR."""
    srv = make_tls_server()
    p = pops_client(srv.pop3s)
    try:
        assert p.cmd(f"AUTH PLAIN {plain_token(SAM_NAME, 'wrong-password')}").startswith(b"-ERR")
    finally:
        p.close()
    p = pops_client(srv.pop3s)
    try:
        r = p.cmd(f"AUTH PLAIN {plain_token(SAM_NAME, SAM_PW)}")
        assert r.startswith(b"+OK"), r
        assert p.cmd("STAT").startswith(b"+OK 0 ")
        p.cmd("QUIT")
    finally:
        p.close()


def test_pop3_auth_plain_continuation(make_tls_server):
    """P1 (RFC 5034 §4): AUTH PLAIN without an initial response gets "+ ", then the response."""
    srv = make_tls_server()
    p = pops_client(srv.pop3s)
    try:
        r = p.cmd("AUTH PLAIN")
        assert r.startswith(b"+"), r
        assert not r.startswith(b"+OK"), r
        r = p.cmd(plain_token(SAM_NAME, SAM_PW))
        assert r.startswith(b"+OK"), r
        p.cmd("QUIT")
    finally:
        p.close()


def test_pop3_stls_command_injection_is_discarded(make_tls_server):
    """P2 (RFC 2595 §4 / the STARTTLS-injection class): USER pipelined after STLS in one packet is
    never answered nor remembered: after the handshake PASS alone is refused."""
    srv = make_tls_server()
    p = pop_plain(srv.pop3)
    try:
        assert p.greeting.startswith(b"+OK")
        p.send(b"STLS\r\nUSER sam\r\n")
        r = p.read_line()
        assert r.startswith(b"+OK"), r
        time.sleep(0.3)
        assert nothing_arrives(p.sock, 0.3) == b"" and p.buf == b"", \
            "the server answered the line injected after STLS in plaintext"
        p.sock = client_ctx().wrap_socket(p.sock, server_hostname=HOSTNAME)
        early = nothing_arrives(p.sock, 0.7)
        assert early == b"", f"the server answered the injected USER over TLS: {early!r}"
        r = p.cmd(f"PASS {SAM_PW}")
        assert r.startswith(b"-ERR"), f"the injected USER was remembered: PASS answered {r!r}"
    finally:
        p.close()


@pytest.mark.parametrize("layer,present,absent", [
    ("secure", ["pop3s"], ["pop3"]),
    ("nonsecure", ["pop3"], ["pop3s"]),
    ("both", ["pop3", "pop3s"], []),
])
def test_pop3_socket_layer(make_tls_server, layer, present, absent):
    """P2 (i5/OS ALWSSL): socket_layer decides which POP3 listeners run; the one left works."""
    srv = make_tls_server(pop3={"socket_layer": layer})
    names = srv.listening_names()
    for n in present:
        assert n in names, f"socket_layer={layer}: no {n} in listening: {names}"
    for n in absent:
        assert n not in names, f"socket_layer={layer}: {n} listens anyway: {names}"
    if "pop3s" in present:
        p = pop3_ssl(srv)
        p.user(SAM_NAME)
        p.pass_(SAM_PW)
        p.quit()
    if "pop3" in present:
        p = pop_plain(srv.pop3)
        pop_stls(p)
        p.login(SAM_NAME, SAM_PW)
        p.cmd("QUIT")
        p.close()


# ------------------------------------------------------------------------------------------
# Real clients: curl, openssl s_client, swaks
# ------------------------------------------------------------------------------------------

def _run(args, input=None, timeout=60):
    return subprocess.run(args, input=input, capture_output=True, timeout=timeout)


def _deliver_to_sam(srv, subject):
    msg = make_message(subject, to=SAM_ADDR)
    assert not smtplib_submit(srv, "submission", KIM_NAME, KIM_PW, KIM_ADDR, SAM_ADDR, msg)
    wait_for_subjects(srv, SAM_NAME, SAM_PW, [subject])


@needs_curl
@pytest.mark.parametrize("how", ["stls", "pop3s"])
def test_curl_pop3_over_tls(make_tls_server, how):
    """P2: curl --ssl-reqd pop3:// (STLS) and curl pop3s:// list and retrieve sam's mail."""
    srv = make_tls_server()
    _deliver_to_sam(srv, "curl pop3 tls")
    if how == "stls":
        base, extra = f"pop3://{srv.pop3[0]}:{srv.pop3[1]}", ["--ssl-reqd"]
    else:
        base, extra = f"pop3s://{srv.pop3s[0]}:{srv.pop3s[1]}", []
    r = _run([CURL, "-s", "-S", "-k", "--max-time", "30", *extra, "-u", f"{SAM_NAME}:{SAM_PW}",
              base + "/1"])
    assert r.returncode == 0, r.stderr
    assert b"Subject: curl pop3 tls" in r.stdout, r.stdout[:2000]


@needs_curl
@pytest.mark.parametrize("how", ["submission", "smtps"])
def test_curl_smtp_submission_over_tls(make_tls_server, tmp_path, how):
    """S2/S6: curl --ssl-reqd smtp:// (STARTTLS + AUTH on submission) and curl smtps:// send a
    message that kim receives."""
    srv = make_tls_server()
    subject = f"curl via {how}"
    f = tmp_path / "msg.eml"
    f.write_bytes(make_message(subject, sender=SAM_ADDR, to=KIM_ADDR))
    if how == "submission":
        url, extra = f"smtp://{srv.submission[0]}:{srv.submission[1]}/{CLIENT_NAME}", ["--ssl-reqd"]
    else:
        url, extra = f"smtps://{srv.smtps[0]}:{srv.smtps[1]}/{CLIENT_NAME}", []
    r = _run([CURL, "-s", "-S", "-k", "--max-time", "30", *extra, url,
              "--mail-from", SAM_ADDR, "--mail-rcpt", KIM_ADDR,
              "--user", f"{SAM_NAME}:{SAM_PW}", "-T", str(f)])
    assert r.returncode == 0, r.stderr
    wait_for_subjects(srv, KIM_NAME, KIM_PW, [subject])


@needs_curl
def test_curl_submission_without_tls_is_refused(make_tls_server, tmp_path):
    """A1/A2: on submission a client that neither authenticates nor uses TLS cannot send."""
    srv = make_tls_server(**NEVER)
    f = tmp_path / "msg.eml"
    f.write_bytes(make_message("no tls", sender=SAM_ADDR, to=KIM_ADDR))
    r = _run([CURL, "-s", "-S", "--max-time", "30",
              f"smtp://{srv.submission[0]}:{srv.submission[1]}/{CLIENT_NAME}",
              "--mail-from", SAM_ADDR, "--mail-rcpt", KIM_ADDR, "-T", str(f)])
    assert r.returncode != 0, "curl sent mail over submission without TLS or AUTH"


@needs_openssl
@pytest.mark.parametrize("proto", ["smtp", "pop3"])
def test_openssl_s_client_starttls(make_tls_server, proto):
    """S2/P2: openssl s_client -starttls smtp|pop3 completes a handshake, and the server answers
    commands over it (250 to EHLO, +OK to CAPA)."""
    srv = make_tls_server()
    host, port = srv.submission if proto == "smtp" else srv.pop3
    script = b"EHLO client.remote.example\nQUIT\n" if proto == "smtp" else b"CAPA\nQUIT\n"
    r = _run([OPENSSL, "s_client", "-starttls", proto, "-connect", f"{host}:{port}",
              "-servername", HOSTNAME, "-crlf", "-ign_eof"], input=script, timeout=30)
    out = r.stdout.decode(errors="replace")
    assert "Cipher" in out, f"no handshake in s_client output:\n{out}\n{r.stderr.decode(errors='replace')}"
    after = out[out.index("Cipher"):]
    if proto == "smtp":
        assert re.search(r"(?m)^250[ -]", after), f"no 250 after the handshake:\n{out}"
        assert re.search(r"(?m)^221", after), f"no 221 to QUIT:\n{out}"
    else:
        assert re.search(r"(?m)^\+OK", after), f"no +OK after the handshake:\n{out}"
        assert "STLS" not in after.split("+OK", 1)[1], f"STLS offered after STLS:\n{out}"


@needs_swaks
def test_swaks_submission_relays_for_authenticated_user(make_tls_server):
    """A1/A2: swaks --tls --auth PLAIN on submission: exit 0 and the remote message is queued."""
    srv = make_tls_server()
    host, port = srv.submission
    r = _run([
        SWAKS, "--tls", "--auth", "PLAIN", "--auth-user", SAM_NAME, "--auth-password", SAM_PW,
        "--server", f"{host}:{port}", "--helo", CLIENT_NAME,
        "--from", SAM_ADDR, "--to", "remote@else.example",
        "--header", "Subject: swaks test", "--timeout", "30"], timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")
    wait_queued(srv, "remote@else.example", "forward")
