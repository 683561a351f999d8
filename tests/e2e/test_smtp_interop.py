"""SMTP interoperability (issue 14, SMTP items 1, 4, 6, 7, 8), as real clients and peers see it:

  * RFC 4954 §5: `MAIL FROM:<…> AUTH=<>` / `AUTH=mailbox` is accepted (it was 555); the submitter
    is trusted only from an authenticated client, stored with the message, and passed on as
    `AUTH=` only to a next hop that offers AUTH and that we authenticated to (a hostauth host);
    an unauthenticated client's claim goes on as `AUTH=<>`;
  * R10: `helo_verify = "reject"` compares an address literal with the client's address (never a
    DNS lookup): a foreign literal is refused and journaled;
  * S1: HELP lists the commands the session accepts now;
  * S2: a client that sends an IP address as TLS SNI (openssl s_client -servername 127.0.0.1)
    leaves no WARN in the server's log;
  * C4: a report about a remote host's reply names it in `Remote-MTA: dns; HOST` (RFC 3464
    §2.3.5); a failure no remote host reported has none.

The outbound world is smtppeer.Net (DNS stub with MX records, scripted peers on one port).
"""

from __future__ import annotations

import hashlib
import re
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest_tls import (  # noqa: F401  (make_tls_server is a fixture)
    OPENSSL,
    SAM_NAME,
    SAM_PW,
    SWAKS,
    client_ctx,
    ehlo_keywords,
    make_tls_server,
    needs_openssl,
    needs_swaks,
    plain_token,
    starttls,
)
from dnsstub import dns_stub, mx_dns_stub  # noqa: F401  (fixtures)
from helpers import (
    CLIENT_NAME,
    dot_stuff,
    expect,
    make_message,
    smtp_from,
    smtp_session,
    wait_journal,
)
from smtppeer import (  # noqa: F401  (net is a fixture)
    OUT_TIMEOUT,
    SAM_ADDR,
    SAM_PW as OUT_SAM_PW,
    SAM_USER as OUT_SAM_USER,
    bounce_for,
    esmtp_params,
    ext_peer,
    net,
    parse_bounce,
    relay,
    self_signed_cert,
    wait_bounces,
)


# ------------------------------------------------------------------------------------------
# 1. RFC 4954 §5: the AUTH parameter of MAIL FROM
# ------------------------------------------------------------------------------------------

def swaks_mail(srv, mail_from: str) -> subprocess.CompletedProcess:
    """swaks over STARTTLS on the submission listener, AUTH PLAIN as sam, up to MAIL FROM.
    swaks has no option for MAIL parameters: they ride in --from after a closing bracket."""
    host, port = srv.submission
    return subprocess.run(
        [SWAKS, "--server", f"{host}:{port}", "--tls", "--auth", "PLAIN", "--auth-user", SAM_NAME,
         "--auth-password", SAM_PW, "--helo", CLIENT_NAME, "--from", mail_from,
         "--to", "kim@example.test", "--quit-after", "MAIL", "--timeout", "30"],
        capture_output=True, text=True, timeout=60)


@needs_swaks
def test_swaks_mail_auth_empty_after_auth_is_250(make_tls_server):
    """RFC 4954 §5 (issue 14 item 1): swaks --tls --auth PLAIN, then MAIL FROM with AUTH=<>:
    250, not 555 5.5.4 Unsupported parameter AUTH."""
    srv = make_tls_server()
    # swaks has no option for MAIL parameters: `--from 'sam@example.test> AUTH=<'` makes
    # `MAIL FROM:<sam@example.test> AUTH=<>`.
    r = swaks_mail(srv, "sam@example.test> AUTH=<")
    out = r.stdout + r.stderr
    mail = [line for line in out.splitlines() if "MAIL FROM:" in line]
    assert mail and mail[-1].endswith("MAIL FROM:<sam@example.test> AUTH=<>"), out
    assert r.returncode == 0, f"swaks exited {r.returncode}:\n{out}"
    assert re.search(r"(?m)^<~ +250 2\.1\.0", out), out


@pytest.mark.parametrize("param", ["AUTH=<>", "AUTH=sam@example.test", "AUTH=e+3Dmc2@example.test"])
def test_mail_auth_parameter_after_auth_is_250(make_tls_server, param):
    """RFC 4954 §5 (issue 14 item 1): smtplib over STARTTLS, login as sam, then MAIL FROM with
    AUTH=<> or AUTH=mailbox (xtext) and a recipient: 250 each."""
    srv = make_tls_server()
    host, port = srv.submission
    with smtplib.SMTP(host, port, local_hostname=CLIENT_NAME, timeout=30) as s:
        s.starttls(context=client_ctx())
        s.ehlo()
        s.login(SAM_NAME, SAM_PW)
        code, text = s.mail("sam@example.test", [param])
        assert code == 250, (code, text)
        code, text = s.rcpt("kim@example.test")
        assert code == 250, (code, text)


def test_mail_auth_parameter_bad_values_and_unauthenticated(make_tls_server):
    """RFC 4954 §5: a value that is neither an xtext addr-spec nor <> is 501 5.5.4; an
    unauthenticated client's AUTH= is accepted (250) but not believed (see the relay test)."""
    srv = make_tls_server()
    c = smtp_session(srv)
    try:
        for bad in ("AUTH=sam", "AUTH=<sam@example.test>", "AUTH=a+ZZ@example.test", "AUTH"):
            r = c.cmd(f"MAIL FROM:<x@remote.example> {bad}")
            expect(r, 501, "5.5.4")
        expect(c.cmd("MAIL FROM:<x@remote.example> AUTH=x@remote.example"), 250)
    finally:
        c.quit()


AUTH_HOST, AUTH_IP, AUTH_DOMAIN = "mx.auth.example", "127.0.0.61", "auth.example"
NOAUTH_HOST, NOAUTH_IP, NOAUTH_DOMAIN = "mx.noauth.example", "127.0.0.62", "noauth.example"
HOSTAUTH_USER, HOSTAUTH_PW = "relayuser", "Pw-interop-9z!"


def pin_of(peer) -> list[str]:
    """`--fingerprint` pinning the peer's self-signed STARTTLS certificate (C5)."""
    cert, _ = self_signed_cert(peer.name)
    der = ssl.PEM_cert_to_DER_cert(Path(cert).read_text())
    return ["--fingerprint", hashlib.sha256(der).hexdigest()]


def submit(srv, rcpt: str, mail_params: str = "", user: tuple[str, str] | None = None,
           sender: str = SAM_ADDR) -> None:
    """One message from 127.0.0.1 (relay-listed), after AUTH PLAIN as `user` when given
    (credentials without TLS are allowed from loopback)."""
    c = smtp_from(srv, "127.0.0.1")
    try:
        expect(c.greeting, 220)
        c.ehlo()
        if user is not None:
            expect(c.cmd(f"AUTH PLAIN {plain_token(*user)}"), 235)
        expect(c.cmd(f"MAIL FROM:<{sender}> {mail_params}".rstrip()), 250)
        expect(c.cmd(f"RCPT TO:<{rcpt}>"), 250)
        expect(c.cmd("DATA"), 354)
        c.send(dot_stuff(make_message(f"to {rcpt}", sender=sender, to=rcpt)) + b".\r\n")
        expect(c.read_reply(), 250)
    finally:
        c.quit()


def auth_of(peer, rcpt: str) -> str | None:
    """The AUTH= value on the MAIL FROM of the transaction that delivered to rcpt (None: none)."""
    (tx,) = peer.wait_delivered(rcpt, timeout=OUT_TIMEOUT)
    return esmtp_params(tx.mail_params).get("AUTH")


def test_auth_parameter_is_passed_on_only_to_hosts_we_authenticate_to(net):
    """RFC 4954 §5 (issue 14 item 1): a hostauth host that offers AUTH gets AUTH= on MAIL FROM:
    the authenticated user's own mailbox (given, or by default), AUTH=<> when the client said <>,
    named someone else, or did not authenticate at all (its claim is never believed). A host that
    does not offer AUTH, or that we do not authenticate to, gets no AUTH parameter."""
    authed = ext_peer(net, AUTH_IP, AUTH_HOST, starttls=True, auth=["PLAIN", "LOGIN"])
    net.stub.mx(AUTH_DOMAIN, (10, AUTH_HOST))
    net.stub.a(AUTH_HOST, AUTH_IP)
    not_ours = ext_peer(net, NOAUTH_IP, NOAUTH_HOST, starttls=True, auth=["PLAIN", "LOGIN"])
    net.stub.mx(NOAUTH_DOMAIN, (10, NOAUTH_HOST))
    net.stub.a(NOAUTH_HOST, NOAUTH_IP)
    srv = net.server(start=False)
    r = srv.cli("list", "add", "hostauth", AUTH_HOST, HOSTAUTH_USER, "--password-stdin", *pin_of(authed),
                input=HOSTAUTH_PW + "\n")
    assert r.returncode == 0, r.stderr
    srv.start()
    sam = (OUT_SAM_USER, OUT_SAM_PW)

    submit(srv, f"given@{AUTH_DOMAIN}", "AUTH=sam@example.test", user=sam)
    submit(srv, f"implied@{AUTH_DOMAIN}", "", user=sam)
    submit(srv, f"unknown@{AUTH_DOMAIN}", "AUTH=<>", user=sam)
    submit(srv, f"other@{AUTH_DOMAIN}", "AUTH=admin@example.test", user=sam)
    submit(srv, f"stranger@{AUTH_DOMAIN}", "AUTH=sam@example.test", user=None)
    submit(srv, f"anon@{AUTH_DOMAIN}", "", user=None)
    assert auth_of(authed, f"given@{AUTH_DOMAIN}") == "sam@example.test"
    assert auth_of(authed, f"implied@{AUTH_DOMAIN}") == "sam@example.test"
    assert auth_of(authed, f"unknown@{AUTH_DOMAIN}") == "<>"
    assert auth_of(authed, f"other@{AUTH_DOMAIN}") == "<>", "a user named someone else's mailbox"
    assert auth_of(authed, f"stranger@{AUTH_DOMAIN}") == "<>", "an unauthenticated claim was believed"
    assert auth_of(authed, f"anon@{AUTH_DOMAIN}") == "<>"
    assert [a for a in authed.auths if 200 <= a.reply < 300 and a.tls], authed.auths

    # No AUTH offered (a plain peer), or offered but no credentials of ours: no parameter.
    submit(srv, "x@other.example", "AUTH=sam@example.test", user=sam)
    submit(srv, f"x@{NOAUTH_DOMAIN}", "AUTH=sam@example.test", user=sam)
    assert auth_of(net.other, "x@other.example") is None
    assert auth_of(not_ours, f"x@{NOAUTH_DOMAIN}") is None
    assert not_ours.auths == []


# ------------------------------------------------------------------------------------------
# 4. R10: address literals as HELO names
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
def test_helo_verify_reject_compares_address_literals(make_server, dns_stub, verb):
    """R10 (issue 14 item 4): helo_verify = reject. From 127.0.0.70, `[127.0.0.5]` (and an IPv6
    literal) is refused with 550 5.7.1 and journaled; `[127.0.0.70]` is accepted. Literals are
    never looked up in DNS."""
    srv = make_server(smtp={"helo_verify": "reject"}, dns={"servers": [dns_stub.address]})
    for literal in ("[127.0.0.5]", "[IPv6:::1]", "[127.0.0.70.9]"):
        c = smtp_from(srv, "127.0.0.70")
        try:
            expect(c.greeting, 220)
            expect(c.cmd(f"{verb} {literal}"), 550, "5.7.1")
        finally:
            c.quit()
    wait_journal(srv, lambda line: "[127.0.0.5]" in line and "127.0.0.70" in line)
    c = smtp_from(srv, "127.0.0.70")
    try:
        expect(c.greeting, 220)
        expect(c.cmd(f"{verb} [127.0.0.70]"), 250)
        expect(c.cmd("MAIL FROM:<jane@remote.example>"), 250)
    finally:
        c.quit()
    time.sleep(0.3)
    assert not [q for q in dns_stub.queries if "[" in str(q) or "127.0.0" in str(q)], dns_stub.queries


# ------------------------------------------------------------------------------------------
# 6. S1: HELP
# ------------------------------------------------------------------------------------------

def help_commands(c) -> list[str]:
    r = expect(c.cmd("HELP"), 214)
    return r.text.split("Commands:", 1)[1].split()


def test_help_lists_what_the_session_accepts(make_tls_server):
    """S1 (issue 14 item 6): HELP names STARTTLS and AUTH exactly when EHLO offers them, ETRN
    when there are dial-up domains, and never VRFY when VRFY is off; after STARTTLS, STARTTLS is
    gone."""
    srv = make_tls_server(smtp={"vrfy": False}, delivery={"etrn_domains": ["dial.example"]})
    c = smtp_session(srv)
    try:
        keywords = ehlo_keywords(c.cmd(f"EHLO {CLIENT_NAME}"))
        commands = help_commands(c)
        assert "VRFY" not in commands, commands
        assert "ETRN" in commands, commands
        assert "STARTTLS" in keywords and "STARTTLS" in commands, (keywords, commands)
        assert ("AUTH" in keywords) == ("AUTH" in commands), (keywords, commands)
        for basic in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP"):
            assert basic in commands, commands
        starttls(c)
        keywords = ehlo_keywords(c.cmd(f"EHLO {CLIENT_NAME}"))
        commands = help_commands(c)
        assert "STARTTLS" not in commands and "AUTH" in keywords and "AUTH" in commands, (keywords, commands)
    finally:
        c.quit()


# ------------------------------------------------------------------------------------------
# 7. S2: an IP address as SNI is the client's business
# ------------------------------------------------------------------------------------------

@needs_openssl
def test_ip_address_as_sni_leaves_no_warning(make_tls_server):
    """S2 (issue 14 item 7): openssl s_client -servername 127.0.0.1 (STARTTLS on submission,
    implicit TLS on smtps) completes its handshake, and the server logs no WARN about the SNI
    (rustls's "Illegal SNI extension" is debug-level noise)."""
    srv = make_tls_server()
    for args in (["-starttls", "smtp", "-connect", "%s:%d" % srv.submission],
                 ["-connect", "%s:%d" % srv.smtps]):
        r = subprocess.run([OPENSSL, "s_client", *args, "-servername", "127.0.0.1", "-crlf", "-ign_eof"],
                           input=b"EHLO client.remote.example\nQUIT\n", capture_output=True, timeout=30)
        out = r.stdout.decode(errors="replace")
        assert "Cipher" in out and re.search(r"(?m)^221", out), out + r.stderr.decode(errors="replace")
    time.sleep(0.5)
    log = srv.stderr_text()
    warnings = [line for line in log.splitlines() if "WARN" in line and "SNI" in line]
    assert not warnings, "\n".join(warnings)


# ------------------------------------------------------------------------------------------
# 8. C4: Remote-MTA in reports
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("refused_at", ["RCPT", "MAIL"])
def test_failure_report_names_the_remote_mta(net, refused_at):
    """C4, RFC 3464 §2.3.5 (issue 14 item 8): the peer refuses (550 to RCPT, or 553 to MAIL
    FROM) -> the report's per-recipient block says `Remote-MTA: dns; mx.other.example` before
    the Diagnostic-Code quoting the peer."""
    if refused_at == "RCPT":
        net.other.rcpt["x@other.example"] = "550 5.1.1 <x@other.example>: no such user (rmta-1)"
    else:
        net.other.mail_reply = "553 5.7.1 not from you (rmta-1)"
    srv = net.server()
    relay(srv, SAM_ADDR, ["x@other.example"], make_message("remote mta", sender=SAM_ADDR, to="x@other.example"))
    (b,) = wait_bounces(srv, OUT_SAM_USER, OUT_SAM_PW, 1)
    f = bounce_for(parse_bounce(b), "x@other.example")
    assert f is not None, b[:3000]
    assert f.get("remote-mta") == "dns; mx.other.example", f
    assert "rmta-1" in f.get("diagnostic-code", ""), f
    block = b.decode(errors="replace").split("Final-Recipient: rfc822; x@other.example", 1)[1]
    assert block.index("Remote-MTA:") < block.index("Diagnostic-Code:"), block[:500]


def test_failure_no_remote_host_reported_has_no_remote_mta(net):
    """C4: a domain that does not exist (NXDOMAIN, 5.1.2) fails without any remote host: the
    report has no Remote-MTA."""
    net.stub.nxdomain("nowhere.example")
    srv = net.server()
    relay(srv, SAM_ADDR, ["x@nowhere.example"], make_message("no host", sender=SAM_ADDR, to="x@nowhere.example"))
    (b,) = wait_bounces(srv, OUT_SAM_USER, OUT_SAM_PW, 1)
    f = bounce_for(parse_bounce(b), "x@nowhere.example")
    assert f is not None and "remote-mta" not in f, f
