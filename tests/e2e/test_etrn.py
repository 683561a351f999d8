"""ETRN and the send scheduler (SPEC §6 C7; RFC 1985).

`[delivery] etrn_domains = ["dial.example"]`: mail for a dial-up domain is held in the queue
until a client that may relay (relay-listed address, or authenticated) sends `ETRN dial.example`;
then delivery starts. `send_interval_secs` makes a scheduler deliver held mail on an interval,
and `etrn_upstream` / `etrn_upstream_domains` make it ask an upstream host for our own mail with
ETRN.

dial.example's MX is mx.dial.example (127.0.0.63), a scripted peer on the Net's port.
"""

from __future__ import annotations

import time

import pytest

from conftest_tls import plain_token
from dnsstub import mx_dns_stub  # noqa: F401  (fixture)
from helpers import expect, fetch_all, make_message, smtp_from
from smtppeer import (  # noqa: F401  (net is a fixture)
    OUT_TIMEOUT,
    SAM_ADDR,
    SAM_PW,
    SAM_USER,
    ExtPeer,
    net,
    queue_row,
    relay,
    wait_queue_empty,
    wait_queue_row,
)

DIAL = "dial.example"
DIAL_MX, DIAL_IP = "mx.dial.example", "127.0.0.63"
ETRN_OK = (250, 251, 252, 253)
OUTSIDER = "127.0.0.7"   # not relay-listed in the tests that need one


def dial_world(net):
    peer = net.extra_peer(DIAL_IP, name=DIAL_MX)
    net.stub.mx(DIAL, (10, DIAL_MX))
    net.stub.a(DIAL_MX, DIAL_IP)
    net.stub.mx("sub.dial.example", (10, DIAL_MX))
    return peer


def etrn_server(net, delivery: dict | None = None, relay_only_localhost: bool = False, **kw):
    d = {"etrn_domains": [DIAL], **(delivery or {})}
    srv = net.server(d, start=False, **kw)
    if relay_only_localhost:
        srv.cli_ok("list", "remove", "relay", "127.0.0.0/8")
        srv.cli_ok("list", "add", "relay", "127.0.0.1")
    srv.start()
    return srv


def send(srv, to, subject: str) -> bytes:
    if isinstance(to, str):
        to = [to]
    m = make_message(subject, b"For the dial-up site.\r\n", sender=SAM_ADDR, to=to[0])
    relay(srv, SAM_ADDR, to, m)
    return m


def untouched_for(seconds: float, peer) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not peer.connections, f"{peer.name} was contacted: {peer.summary()}"
        time.sleep(0.2)


def etrn(srv, arg: str | None, source_ip: str = "127.0.0.1", auth: tuple[str, str] | None = None):
    """One session: EHLO, optional AUTH PLAIN, `ETRN arg`; returns (EHLO reply, ETRN reply)."""
    c = smtp_from(srv, source_ip)
    try:
        expect(c.greeting, 220)
        ehlo = c.ehlo()
        if auth:
            expect(c.cmd(f"AUTH PLAIN {plain_token(*auth)}"), 235)
        r = c.cmd("ETRN" if arg is None else f"ETRN {arg}")
        return ehlo, r
    finally:
        c.quit()


def held(srv, peer, recipient: str, seconds: float = 4.0) -> None:
    """recipient stays in `queue list` and the dial-up host hears nothing for `seconds`."""
    wait_queue_row(srv, recipient, timeout=10)
    untouched_for(seconds, peer)
    assert queue_row(srv, recipient) is not None, srv.cli("queue", "list").stdout


# ------------------------------------------------------------------------------------------
# Holding and ETRN
# ------------------------------------------------------------------------------------------

def test_ehlo_lists_etrn(net):
    """RFC 1985 §3: a server that takes ETRN says so in its EHLO reply."""
    srv = etrn_server(net)
    ehlo, _ = etrn(srv, DIAL)
    keywords = [line.split()[0].upper() for line in ehlo.lines[1:] if line.split()]
    assert "ETRN" in keywords, ehlo.lines


@pytest.mark.parametrize("arg", [DIAL, "@" + DIAL, DIAL.upper()], ids=["domain", "at-domain", "upper-case"])
def test_mail_for_dialup_domain_is_held_until_etrn(net, arg):
    """C7: mail for dial.example waits in the queue (its host hears nothing, nothing bounces)
    while mail for other domains leaves at once; `ETRN dial.example` (or `ETRN @dial.example`,
    the domain and its subdomains) from a relay-listed client gets 250-253 and the mail is
    delivered. Domain names match whatever their case."""
    peer = dial_world(net)
    srv = etrn_server(net)
    m = send(srv, ["x@dial.example", "a@remote.example"], "held for dialup")
    net.mx1.wait_delivered("a@remote.example")
    held(srv, peer, "x@dial.example")
    _, r = etrn(srv, arg)
    assert r.code in ETRN_OK, f"ETRN {arg} -> {r!r}"
    (tx,) = peer.wait_delivered("x@dial.example", timeout=OUT_TIMEOUT)
    assert tx.message.endswith(m)
    wait_queue_empty(srv)
    assert fetch_all(srv, SAM_USER, SAM_PW) == [], "Sam got a report for held mail"


def test_at_domain_also_releases_subdomains(net):
    """RFC 1985 §5.3: `ETRN @dial.example` covers sub.dial.example too."""
    peer = dial_world(net)
    srv = etrn_server(net, {"etrn_domains": [DIAL, "sub.dial.example"]})
    send(srv, ["x@dial.example", "y@sub.dial.example"], "subdomains too")
    held(srv, peer, "y@sub.dial.example", 3.0)
    _, r = etrn(srv, "@" + DIAL)
    assert r.code in ETRN_OK, r
    peer.wait_delivered("x@dial.example", timeout=OUT_TIMEOUT)
    peer.wait_delivered("y@sub.dial.example", timeout=OUT_TIMEOUT)
    wait_queue_empty(srv)


def test_etrn_hash_queue_name(net):
    """RFC 1985 §5.2: `ETRN #queue` names a queue; unsupported -> 458 or 459, never a crash
    or a generic syntax error; the session goes on."""
    dial_world(net)
    srv = etrn_server(net)
    c = smtp_from(srv, "127.0.0.1")
    try:
        expect(c.greeting, 220)
        c.ehlo()
        r = c.cmd("ETRN #dialqueue")
        assert r.code in (458, 459) + ETRN_OK, r
        expect(c.cmd("NOOP"), 250)
    finally:
        c.quit()


def test_etrn_from_any_client_by_default(net):
    """C7 (issue 14 item 5): a dial-up branch connects from a changing address, and ETRN only
    releases mail to the domain's own MX, so by default any client may ETRN a domain of
    etrn_domains, as Postfix allows: the stranger's ETRN releases the mail."""
    peer = dial_world(net)
    srv = etrn_server(net, relay_only_localhost=True)
    send(srv, "x@dial.example", "from a changing address")
    held(srv, peer, "x@dial.example", 2.0)
    _, r = etrn(srv, DIAL, source_ip=OUTSIDER)
    assert r.code in ETRN_OK, f"ETRN from {OUTSIDER} -> {r!r}"
    peer.wait_delivered("x@dial.example", timeout=OUT_TIMEOUT)
    _, r = etrn(srv, "not-dial.example", source_ip=OUTSIDER)
    assert r.code == 459 and r.enhanced in (None, "4.7.1"), r


def test_etrn_from_client_not_allowed_to_relay_is_refused_when_restricted(net):
    """C7: with `[delivery] etrn_clients = "relay"` a client that may not relay gets 459 4.7.1
    and nothing is delivered; the same ETRN from a relay-listed client then releases the mail."""
    peer = dial_world(net)
    srv = etrn_server(net, delivery={"etrn_clients": "relay"}, relay_only_localhost=True)
    send(srv, "x@dial.example", "not for strangers")
    wait_queue_row(srv, "x@dial.example", timeout=10)
    _, r = etrn(srv, DIAL, source_ip=OUTSIDER)
    assert r.code in (458, 459), f"ETRN from {OUTSIDER} -> {r!r}"
    if r.code == 459:
        assert r.enhanced in (None, "4.7.1"), r
    held(srv, peer, "x@dial.example", 3.0)
    _, r = etrn(srv, DIAL, source_ip="127.0.0.1")
    assert r.code in ETRN_OK, r
    peer.wait_delivered("x@dial.example", timeout=OUT_TIMEOUT)


def test_etrn_after_authentication_is_allowed(net):
    """C7: a client outside the relay list that has authenticated (AUTH PLAIN, plaintext
    allowed on loopback) may send ETRN; the held mail is delivered."""
    peer = dial_world(net)
    srv = etrn_server(net, relay_only_localhost=True)
    send(srv, "x@dial.example", "authenticated etrn")
    held(srv, peer, "x@dial.example", 3.0)
    _, r = etrn(srv, DIAL, source_ip=OUTSIDER, auth=(SAM_USER, SAM_PW))
    assert r.code in ETRN_OK, r
    peer.wait_delivered("x@dial.example", timeout=OUT_TIMEOUT)


def test_etrn_without_argument_is_501(net):
    """RFC 1985 §5: ETRN needs a node name: 501, and the session goes on."""
    srv = etrn_server(net)
    c = smtp_from(srv, "127.0.0.1")
    try:
        expect(c.greeting, 220)
        c.ehlo()
        r = c.cmd("ETRN")
        assert r.code == 501, r
        expect(c.cmd("NOOP"), 250)
    finally:
        c.quit()


@pytest.mark.parametrize("arg", ["remote.example", "unknown.example", "@nowhere.example"])
def test_etrn_for_domain_not_held_is_458_or_459(net, arg):
    """RFC 1985: a node we hold nothing for (not an ETRN domain) -> 458 or 459; and it does not
    release the dial-up mail either."""
    peer = dial_world(net)
    srv = etrn_server(net)
    send(srv, "x@dial.example", "not released by others")
    wait_queue_row(srv, "x@dial.example", timeout=10)
    _, r = etrn(srv, arg)
    assert r.code in (458, 459), f"ETRN {arg} -> {r!r}"
    held(srv, peer, "x@dial.example", 3.0)


def test_held_mail_survives_a_restart(net):
    """C7: held mail is still held after a restart and is released by ETRN afterwards."""
    peer = dial_world(net)
    srv = etrn_server(net)
    m = send(srv, "x@dial.example", "held across restart")
    wait_queue_row(srv, "x@dial.example", timeout=10)
    srv.restart()
    held(srv, peer, "x@dial.example", 3.0)
    _, r = etrn(srv, DIAL)
    assert r.code in ETRN_OK, r
    (tx,) = peer.wait_delivered("x@dial.example", timeout=OUT_TIMEOUT)
    assert tx.message.endswith(m)


# ------------------------------------------------------------------------------------------
# The scheduler
# ------------------------------------------------------------------------------------------

def test_scheduler_delivers_held_mail_on_its_interval(net):
    """C7: with `send_interval_secs` the scheduler sends held dial-up mail by itself, no ETRN
    needed."""
    peer = dial_world(net)
    srv = etrn_server(net, {"send_interval_secs": 2})
    m = send(srv, "x@dial.example", "scheduled run")
    (tx,) = peer.wait_delivered("x@dial.example", timeout=OUT_TIMEOUT)
    assert tx.message.endswith(m)
    wait_queue_empty(srv)


def test_scheduler_issues_etrn_to_the_upstream_host(net):
    """C7: `etrn_upstream` + `etrn_upstream_domains` -> each scheduler run connects to the
    upstream host, says EHLO, and sends `ETRN example.test`."""
    upstream = ExtPeer("127.0.0.64", 0, name="upstream.example", etrn=True).start()
    net.peers.append(upstream)
    srv = etrn_server(net, {"send_interval_secs": 2,
                            "etrn_upstream": f"127.0.0.64:{upstream.port}",
                            "etrn_upstream_domains": ["example.test"]})
    got = upstream.wait_etrn(2, timeout=OUT_TIMEOUT)
    assert srv.proc is not None and srv.proc.poll() is None
    for e in got:
        assert e.argument.lower() == "example.test", got
        cmds = upstream.connections[e.connection].commands
        i = next(i for i, c in enumerate(cmds) if c.upper().startswith("ETRN"))
        assert any(c.upper().startswith(("EHLO", "HELO")) for c in cmds[:i]), cmds
    assert upstream.transactions == [], "ETRN run sent mail to the upstream host"


def test_mail_arriving_after_an_etrn_run_is_held_again(net):
    """C7: ETRN starts one delivery run; a message that arrives afterwards waits for the next
    ETRN."""
    peer = dial_world(net)
    srv = etrn_server(net)
    send(srv, "x@dial.example", "first batch")
    wait_queue_row(srv, "x@dial.example", timeout=10)
    _, r = etrn(srv, DIAL)
    assert r.code in ETRN_OK, r
    peer.wait_delivered("x@dial.example", timeout=OUT_TIMEOUT)
    wait_queue_empty(srv)
    n_conn = len(peer.connections)
    send(srv, "y@dial.example", "second batch")
    wait_queue_row(srv, "y@dial.example", timeout=10)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert len(peer.connections) == n_conn, f"delivered without ETRN: {peer.summary()}"
        time.sleep(0.2)
    _, r = etrn(srv, DIAL)
    assert r.code in ETRN_OK, r
    peer.wait_delivered("y@dial.example", timeout=OUT_TIMEOUT)


def test_etrn_for_held_domain_with_nothing_queued_is_fine(net):
    """RFC 1985 §5: ETRN for a domain we serve that has nothing waiting -> 250 (or 251 "no
    messages waiting"), not an error."""
    dial_world(net)
    srv = etrn_server(net)
    _, r = etrn(srv, DIAL)
    assert r.code in ETRN_OK, r


def test_upstream_down_then_up(net):
    """C7: the upstream host refuses connections for a while -> the server keeps running and
    its scheduler keeps trying; once the host is up it gets `ETRN example.test`."""
    from smtppeer import free_port
    port = free_port("127.0.0.65")
    srv = etrn_server(net, {"send_interval_secs": 2, "etrn_upstream": f"127.0.0.65:{port}",
                            "etrn_upstream_domains": ["example.test"]})
    time.sleep(5.0)   # two or three scheduler runs against a closed port
    assert srv.proc.poll() is None, "the server died"
    upstream = ExtPeer("127.0.0.65", port, name="upstream.example", etrn=True).start()
    net.peers.append(upstream)
    (e, *_) = upstream.wait_etrn(1, timeout=OUT_TIMEOUT)
    assert e.argument.lower() == "example.test", e
