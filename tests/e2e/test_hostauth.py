"""Host authentication for outbound delivery (SPEC §6 C5; i5/OS ADDSMTPLE *HOSTAUTH).

`postroom list add hostauth HOST USER --password-stdin` stores credentials for one remote host;
the SMTP client uses them (AUTH PLAIN or LOGIN) when it delivers to that host - the host name as
routed: an MX name, a host_table name or the mail_router host - and only over TLS whose
certificate was verified (the system's roots plus `--ca FILE`, or `--fingerprint SHA256HEX`;
tests/e2e/test_outbound_tls.py tests that in depth). The password is never printed and never
sent in the clear.

The peers here present their self-signed certificate, so the entries of the tests that expect
AUTH pin it with `--fingerprint` (before C5 required verification, any certificate was taken).

The remote hosts are smtppeer.ExtPeer instances (scripted peers that can advertise and require
AUTH, and record the decoded credentials and whether they came under TLS), on further 127.0.0.x
addresses at the Net's port (`[delivery] remote_port`); the DNS stub knows their names.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import time
from pathlib import Path

import pytest

from dnsstub import mx_dns_stub  # noqa: F401  (fixture)
from helpers import make_message
from smtppeer import (  # noqa: F401  (net is a fixture)
    OUT_TIMEOUT,
    SAM_ADDR,
    commands_of,
    ext_peer,
    net,
    relay,
    self_signed_cert,
)

HOST = "mx.auth.example"
HOST_IP = "127.0.0.61"
USER = "relayuser"
PASSWORD = "Pw-hostauth-7q!x"


def add_hostauth(srv, host: str = HOST, user: str = USER, password: str = PASSWORD, *options: str):
    r = srv.cli("list", "add", "hostauth", host, user, "--password-stdin", *options, input=password + "\n")
    assert r.returncode == 0, f"list add hostauth exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def pin_of(peer) -> list[str]:
    """`--fingerprint` options pinning the peer's self-signed STARTTLS certificate (C5: credentials
    go only over TLS whose certificate was verified)."""
    cert, _ = self_signed_cert(peer.name if "." in peer.name else "mx.remote.example")
    der = ssl.PEM_cert_to_DER_cert(Path(cert).read_text())
    return ["--fingerprint", hashlib.sha256(der).hexdigest()]


def auth_world(net, ip: str = HOST_IP, host: str = HOST, domain: str = "auth.example", **peer_kw):
    """domain's MX is `host` at `ip`, served by an ExtPeer."""
    peer = ext_peer(net, ip, host, **peer_kw)
    net.stub.mx(domain, (10, host))
    net.stub.a(host, ip)
    return peer


def secrets_in(peer) -> list[str]:
    """Every command line the peer got that carries the password, plain or in base64."""
    pw = PASSWORD.encode()
    needles = [PASSWORD, base64.b64encode(pw).decode(),
               base64.b64encode(b"\0" + USER.encode() + b"\0" + pw).decode(),
               base64.b64encode(USER.encode() + b"\0" + USER.encode() + b"\0" + pw).decode()]
    return [c for c in commands_of(peer) if any(n in c for n in needles)]


def auth_commands(peer) -> list[str]:
    return [c for c in commands_of(peer) if c.upper().startswith("AUTH")]


def send(srv, to: str, subject: str) -> bytes:
    m = make_message(subject, b"Via an authenticated hop.\r\n", sender=SAM_ADDR, to=to)
    relay(srv, SAM_ADDR, [to], m)
    return m


# ------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------

def test_hostauth_list_add_show_remove_never_prints_the_password(net):
    """C5, R11: add, show and remove a host-authentication entry; `list show hostauth` prints the
    host and the user, never the password (nor does any other output of these commands)."""
    srv = net.server(start=False)
    outputs = []
    outputs.append(add_hostauth(srv, "mx.remote.example", "relayuser"))
    outputs.append(add_hostauth(srv, "smart.other.example", "otheruser", "Another-Secret-55"))
    show = srv.cli_ok("list", "show", "hostauth")
    outputs.append(show)
    lines = show.stdout.splitlines()
    assert any("mx.remote.example" in ln and "relayuser" in ln for ln in lines), show.stdout
    assert any("smart.other.example" in ln and "otheruser" in ln for ln in lines), show.stdout
    outputs.append(srv.cli_ok("list", "remove", "hostauth", "mx.remote.example"))
    show = srv.cli_ok("list", "show", "hostauth")
    outputs.append(show)
    assert "mx.remote.example" not in show.stdout, show.stdout
    assert "smart.other.example" in show.stdout, show.stdout
    for r in outputs:
        for secret in (PASSWORD, "Another-Secret-55"):
            assert secret not in r.stdout and secret not in r.stderr, \
                f"password printed by `{' '.join(map(str, r.args[3:]))}`: {r.stdout!r} {r.stderr!r}"


def test_hostauth_password_is_not_taken_from_the_command_line(net):
    """Passwords never appear on a command line (INTERFACE): the password comes from stdin; a
    third positional argument is refused rather than stored as a password."""
    srv = net.server(start=False)
    r = srv.cli("list", "add", "hostauth", HOST, USER, PASSWORD)
    assert r.returncode != 0, f"password accepted on the command line: {r.stdout!r}"
    show = srv.cli_ok("list", "show", "hostauth")
    assert PASSWORD not in show.stdout


# ------------------------------------------------------------------------------------------
# The SMTP client
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("auth_before_tls", [True, False], ids=["auth-offered-always", "auth-offered-under-tls"])
def test_authenticates_to_mx_host_after_starttls(net, auth_before_tls):
    """C5: the MX host (listed by name in hostauth) requires AUTH and offers STARTTLS -> the
    client starts TLS first, then authenticates with the stored user and password, then the
    message is delivered; the credentials never cross the wire in the clear."""
    peer = auth_world(net, starttls=True, auth=["PLAIN", "LOGIN"], require_auth=True,
                      auth_before_tls=auth_before_tls)
    srv = net.server(start=False)
    add_hostauth(srv, HOST, USER, PASSWORD, *pin_of(peer))
    srv.start()
    m = send(srv, "a@auth.example", "hostauth over tls")
    (tx,) = peer.wait_delivered("a@auth.example", timeout=OUT_TIMEOUT)
    assert tx.tls, peer.summary()
    assert tx.message.endswith(m)
    assert peer.auths, f"no AUTH seen; commands: {commands_of(peer)!r}"
    for a in peer.auths:
        assert a.tls, f"AUTH {a.mechanism} sent without TLS: {a!r}"
    ok = [a for a in peer.auths if 200 <= a.reply < 300]
    assert ok and ok[-1].user == USER and ok[-1].password == PASSWORD, peer.auths
    assert ok[-1].connection == tx.connection


def test_authenticates_to_mail_router_named_in_host_table(net):
    """C5 with C2: the mail router (a host_table name) is the host as routed -> its hostauth
    entry is used; the MX of the recipient's domain is never contacted."""
    router = ext_peer(net, "127.0.0.62", "smart.example", starttls=True, auth=["LOGIN", "PLAIN"],
                      require_auth=True)
    srv = net.server({"mail_router": "smart.example",
                      "host_table": {"smart.example": "127.0.0.62"}}, start=False)
    add_hostauth(srv, "smart.example", USER, PASSWORD, *pin_of(router))
    srv.start()
    m = send(srv, "a@remote.example", "hostauth via router")
    (tx,) = router.wait_delivered("a@remote.example", timeout=OUT_TIMEOUT)
    assert tx.tls and tx.message.endswith(m)
    ok = [a for a in router.auths if 200 <= a.reply < 300]
    assert ok and ok[-1].tls and ok[-1].user == USER and ok[-1].password == PASSWORD, router.auths
    assert not net.mx1.connections and not net.mx2.connections


def test_no_tls_means_no_password(net):
    """C5: the host offers AUTH (and requires it) but no STARTTLS -> the client never sends the
    credentials; the message is not delivered (it waits, or is refused by the peer)."""
    peer = auth_world(net, starttls=False, auth=["PLAIN", "LOGIN"], require_auth=True)
    srv = net.server(start=False)
    add_hostauth(srv)
    srv.start()
    send(srv, "a@auth.example", "hostauth no tls")
    deadline = time.monotonic() + OUT_TIMEOUT
    while not peer.connections:
        assert time.monotonic() < deadline, "the host was never contacted"
        time.sleep(0.1)
    time.sleep(4.0)   # retries (FAST_RETRY) happen meanwhile
    assert auth_commands(peer) == [], f"AUTH without TLS: {auth_commands(peer)!r}"
    assert peer.auths == [] and secrets_in(peer) == [], peer.auths
    assert not peer.delivered(), peer.summary()


def test_no_entry_for_the_host_means_no_auth(net):
    """C5: credentials go only to the host they are for: the MX offers AUTH and STARTTLS but has
    no hostauth entry (another host has) -> delivered without AUTH; the password never shows."""
    peer = auth_world(net, starttls=True, auth=["PLAIN", "LOGIN"], require_auth=False)
    srv = net.server(start=False)
    add_hostauth(srv, "mx.elsewhere.example")
    srv.start()
    m = send(srv, "a@auth.example", "hostauth not for you")
    (tx,) = peer.wait_delivered("a@auth.example", timeout=OUT_TIMEOUT)
    assert tx.message.endswith(m)
    assert auth_commands(peer) == [] and peer.auths == [], peer.auths
    assert secrets_in(peer) == []


def test_removed_entry_is_no_longer_used(net):
    """C5, R11: after `list remove hostauth HOST` the next delivery to that host carries no AUTH."""
    peer = auth_world(net, starttls=True, auth=["PLAIN", "LOGIN"], require_auth=False)
    srv = net.server(start=False)
    add_hostauth(srv, HOST, USER, PASSWORD, *pin_of(peer))
    srv.start()
    send(srv, "a@auth.example", "hostauth first")
    peer.wait_delivered("a@auth.example", timeout=OUT_TIMEOUT)
    assert [a for a in peer.auths if a.user == USER and a.tls], peer.auths
    srv.cli_ok("list", "remove", "hostauth", HOST)
    time.sleep(2.5)   # list changes apply within 2 s
    n_auth = len(peer.auths)
    n_conn = len(peer.connections)
    send(srv, "b@auth.example", "hostauth second")
    (tx,) = peer.wait_delivered("b@auth.example", timeout=OUT_TIMEOUT)
    assert tx.connection >= n_conn, "the second message reused the first connection"
    assert len(peer.auths) == n_auth, f"AUTH after the entry was removed: {peer.auths[n_auth:]!r}"


def test_login_only_peer_and_a_password_with_spaces_and_umlauts(net):
    """C5: a host offering only AUTH LOGIN gets LOGIN; the password is the whole stdin line, as
    typed (inner spaces, non-ASCII), and the host name matches whatever its case in the list.
    Neither the journal nor the server log shows the password afterwards."""
    password = "pässwörd mit Leerzeichen 9"
    peer = auth_world(net, starttls=True, auth=["LOGIN"], require_auth=True)
    srv = net.server(start=False)
    add_hostauth(srv, "MX.Auth.Example", USER, password, *pin_of(peer))
    srv.start()
    m = send(srv, "a@auth.example", "login only")
    (tx,) = peer.wait_delivered("a@auth.example", timeout=OUT_TIMEOUT)
    assert tx.message.endswith(m)
    ok = [a for a in peer.auths if 200 <= a.reply < 300]
    assert ok and ok[-1].mechanism == "LOGIN" and ok[-1].tls, peer.auths
    assert ok[-1].user == USER and ok[-1].password == password, peer.auths
    journal = srv.cli_ok("journal").stdout
    assert password not in journal and PASSWORD not in journal
    assert password not in srv.stderr_text()


def test_hostauth_add_without_user_is_refused(net):
    """C5: `list add hostauth HOST` without a user is a user error (exit 1), nothing is stored."""
    srv = net.server(start=False)
    r = srv.cli("list", "add", "hostauth", HOST, "--password-stdin", input=PASSWORD + "\n")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip(), "no message says what was wrong"
    assert HOST not in srv.cli_ok("list", "show", "hostauth").stdout


def test_failed_tls_handshake_then_plaintext_retry_sends_no_password(net):
    """C5: STARTTLS is offered but the handshake fails; a host with credentials gets no
    plaintext retry at all (that retry is for hosts without credentials), so the host, which
    requires AUTH, never sees them and the message is not delivered (it waits: see
    test_outbound_tls.py)."""
    peer = auth_world(net, tls_broken=True, auth=["PLAIN", "LOGIN"], require_auth=True)
    srv = net.server(start=False)
    add_hostauth(srv)
    srv.start()
    send(srv, "a@auth.example", "broken tls, no password")
    deadline = time.monotonic() + OUT_TIMEOUT
    while not any(c.tls_failed for c in peer.connections):
        assert time.monotonic() < deadline, f"STARTTLS never tried: {peer.summary()}"
        time.sleep(0.1)
    # later attempts (FAST_RETRY): each one tries STARTTLS again, none goes on in plaintext
    while len(peer.connections) < 2:
        assert time.monotonic() < deadline, f"no second attempt: {peer.summary()}"
        time.sleep(0.1)
    time.sleep(3.0)
    with peer.lock:
        finished = [c for c in peer.connections if c.closed is not None]
    assert all(c.tls_failed for c in finished), \
        f"a connection without STARTTLS: {[c.commands for c in finished if not c.tls_failed]!r}"
    assert auth_commands(peer) == [] and peer.auths == [], auth_commands(peer)
    assert secrets_in(peer) == []
    assert not peer.delivered(), peer.summary()
