"""Outbound delivery (SPEC §6 C1-C3, C5, C6, C8; F2 forwarding; O2 queue commands).

Postroom's SMTP client delivers to scripted SMTP peers (smtppeer.Peer) on 127.0.0.51-53, all on
one port that the server knows as `[delivery] remote_port`. Every DNS query goes to the loopback
stub (dnsstub.MxDnsStub), which answers:

    remote.example  MX 20 mx2.remote.example, MX 10 mx1.remote.example  (127.0.0.52, 127.0.0.51)
    other.example   MX 10 mx.other.example                                (127.0.0.53)

Mail is submitted by Sam (sam@example.test, a local user) over SMTP from 127.0.0.1, which is in
the relay list. Retries are fast (smtppeer.FAST_RETRY: one first-level and one second-level retry,
1 s apart) unless a test sets its own schedule.
"""

import re
import time

import pytest

from dnsstub import mx_dns_stub  # noqa: F401  (fixture)
from helpers import HOSTNAME, fetch_all, make_message, subject_of
from smtppeer import (  # noqa: F401  (net is a fixture)
    MX1_IP,
    MX2_IP,
    OUT_TIMEOUT,
    SAM_ADDR,
    SAM_PW,
    SAM_USER,
    Peer,
    assert_bounce,
    bare_line_endings,
    free_port,
    journal_entries,
    mailbox_stays,
    max_overlap,
    net,
    outbound_server,
    queue_row,
    relay,
    start_peers,
    wait_bounces,
    wait_journal_code,
    wait_not_queued,
    wait_queue_empty,
    wait_queue_row,
)

SUCCESS = ["82", "88"]


def msg(subject: str, to: str = "a@remote.example", body: bytes = b"Hello there.\r\n",
        sender: str = SAM_ADDR) -> bytes:
    return make_message(subject, body, sender=sender, to=to)


def sent_by_sam(srv, recipients, subject: str, body: bytes = b"Hello there.\r\n") -> bytes:
    if isinstance(recipients, str):
        recipients = [recipients]
    m = msg(subject, recipients[0], body)
    relay(srv, SAM_ADDR, recipients, m)
    return m


def nothing_for(seconds: float, *peers: Peer) -> None:
    """Assert none of the peers gets a connection for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in peers:
            assert not p.connections, f"{p.name} was contacted: {p.summary()}"
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------
# C1: MX, preference, fallback, A records, host table; one transaction per destination
# ------------------------------------------------------------------------------------------

def test_delivers_to_lowest_preference_mx_in_one_transaction(net):
    """C1, F2: two recipients of one domain travel in one transaction (two RCPTs) to the MX with
    the lowest preference (listed second in the DNS answer); the server says EHLO with its
    hostname, keeps the envelope sender; the recipients leave the queue and the journal records a
    successful delivery (82/88) for each."""
    srv = net.server()
    m = sent_by_sam(srv, ["a@remote.example", "b@remote.example"], "two rcpts one trip")
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert sorted(a.lower() for a in tx.accepted) == ["a@remote.example", "b@remote.example"], tx.rcpts
    assert tx.mail_from.lower() == SAM_ADDR
    assert (tx.helo or "").lower() == HOSTNAME
    assert tx.message.endswith(m)
    assert not net.mx2.connections, net.mx2.summary()
    for r in ("a@remote.example", "b@remote.example"):
        wait_not_queued(srv, r)
        wait_journal_code(srv, SUCCESS, lambda line, r=r: r in line.lower())
    time.sleep(1.0)
    assert len(net.mx1.delivered()) == 1, net.mx1.summary()


def test_falls_back_to_next_mx_when_first_refuses_connection(net):
    """C1 (RFC 5321 §5.1): mx1 is down (connection refused) -> mx2 gets the message."""
    net.mx1.stop()
    srv = net.server()
    m = sent_by_sam(srv, "a@remote.example", "mx1 down")
    (tx,) = net.mx2.wait_delivered("a@remote.example")
    assert tx.message.endswith(m)
    wait_not_queued(srv, "a@remote.example")


@pytest.mark.parametrize("greeting", ["421 4.3.2 mx1 too busy", "451 4.3.0 mx1 not now"])
def test_falls_back_to_next_mx_when_first_greets_4xx(net, greeting):
    """C1: mx1 answers the connection with a 4xx greeting -> the message goes to mx2 at once."""
    net.mx1.greeting = greeting
    srv = net.server()
    sent_by_sam(srv, "a@remote.example", "mx1 greets 4xx")
    net.mx2.wait_delivered("a@remote.example")
    assert net.mx1.connections, "mx1 (lowest preference) was never tried"
    assert not net.mx1.delivered()
    wait_not_queued(srv, "a@remote.example")


def test_domain_without_mx_uses_its_a_record(net):
    """C1 (RFC 5321 §5.1): no MX records -> the domain's own A record is the host."""
    net.stub.a("plain.example", MX2_IP)
    srv = net.server()
    sent_by_sam(srv, "p@plain.example", "implicit mx")
    net.mx2.wait_delivered("p@plain.example")
    assert net.stub.asked("plain.example", "MX")
    wait_not_queued(srv, "p@plain.example")


def test_mx_host_without_address_is_skipped(net):
    """C1: the best MX host has no address (NXDOMAIN for its name) -> the next MX is used."""
    net.stub.mx("remote.example", (5, "mx0.remote.example"), (10, "mx1.remote.example"),
                (20, "mx2.remote.example"))
    net.stub.nxdomain("mx0.remote.example")
    srv = net.server()
    sent_by_sam(srv, "a@remote.example", "mx0 has no address")
    net.mx1.wait_delivered("a@remote.example")
    assert net.stub.asked("mx0.remote.example")
    wait_not_queued(srv, "a@remote.example")


def test_host_table_overrides_dns(net):
    """C1: a host-table entry for the MX host wins over its DNS A record."""
    net.mx1.rcpt_default = "550 5.7.1 wrong host: DNS was used instead of the host table"
    srv = net.server({"host_table": {"mx1.remote.example": MX2_IP}})
    sent_by_sam(srv, "a@remote.example", "host table")
    net.mx2.wait_delivered("a@remote.example")
    assert not net.mx1.connections, net.mx1.summary()


def test_each_domain_goes_to_its_own_mx(net):
    """F2/C1: one message for two domains -> one transaction per destination, each with only its
    own recipients; a local recipient of the same message is delivered locally."""
    srv = net.server()
    sent_by_sam(srv, ["a@remote.example", "o@other.example", SAM_ADDR], "split by domain")
    (t1,) = net.mx1.wait_delivered("a@remote.example")
    (t2,) = net.other.wait_delivered("o@other.example")
    assert [a.lower() for a in t1.accepted] == ["a@remote.example"], t1.rcpts
    assert [a.lower() for a in t2.accepted] == ["o@other.example"], t2.rcpts
    msgs = fetch_all(srv, SAM_USER, SAM_PW)
    deadline = time.monotonic() + OUT_TIMEOUT
    while not msgs and time.monotonic() < deadline:
        time.sleep(0.3)
        msgs = fetch_all(srv, SAM_USER, SAM_PW)
    assert [subject_of(x) for x in msgs] == ["split by domain"]
    wait_queue_empty(srv)


# ------------------------------------------------------------------------------------------
# What goes over the wire
# ------------------------------------------------------------------------------------------

BODY_DOTS = (
    b"First line.\r\n"
    b".\r\n"
    b".x starts with a dot\r\n"
    b"..y two dots\r\n"
    b"...\r\n"
    b"Caf\xc3\xa9 8-bit \xe9\xff\x80\r\n"
    b" .not at the start\r\n"
    b"\r\n"
    b"last line\r\n"
)


def test_dot_stuffing_and_crlf_on_the_wire(net):
    """What leaves is dot-stuffed (RFC 5321 §4.5.2): "." arrives as "..", ".x" as "..x"; the
    peer's un-stuffed message ends with the original bytes (8-bit intact), only header lines
    (trace) are added in front; no bare CR or LF anywhere in what the client sent."""
    srv = net.server()
    m = sent_by_sam(srv, "a@remote.example", "dots on the wire", BODY_DOTS)
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    raw = tx.raw_data
    assert b"\r\n..\r\n" in raw
    assert b"\r\n..x starts with a dot\r\n" in raw
    assert b"\r\n...y two dots\r\n" in raw
    assert b"\r\n....\r\n" in raw
    assert b"\r\n .not at the start\r\n" in raw
    assert tx.message.endswith(m), tx.message[-400:]
    added = tx.message[: len(tx.message) - len(m)]
    for line in added.split(b"\r\n")[:-1]:
        assert re.match(rb"[A-Za-z0-9-]+:|[ \t]", line), f"not a header line before the message: {line!r}"
    conn = net.mx1.connections[tx.connection]
    assert bare_line_endings(bytes(conn.raw)) == [], bytes(conn.raw)[:2000]


def test_bare_lf_accepted_inbound_leaves_as_crlf(net):
    """S5 + what leaves: with allow_bare_lf on, a message written with bare LFs is accepted;
    on the way out every line ends in CRLF and dots are stuffed."""
    from helpers import expect, smtp_from
    srv = net.server(smtp={"allow_bare_lf": True})
    c = smtp_from(srv, "127.0.0.1")
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
        expect(c.cmd("RCPT TO:<a@remote.example>"), 250)
        expect(c.cmd("DATA"), 354)
        c.send(b"From: <sam@example.test>\nTo: <a@remote.example>\nSubject: bare lf\n\n"
               b"one\n..dot line\ntwo\r\nthree\r\n.\r\n")
        expect(c.read_reply(), 250)
    finally:
        c.quit()
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    conn = net.mx1.connections[tx.connection]
    assert bare_line_endings(bytes(conn.raw)) == [], tx.raw_data
    assert tx.message.endswith(b"\r\n\r\none\r\n.dot line\r\ntwo\r\nthree\r\n"), tx.message


def test_message_without_final_crlf_and_long_body_arrives_intact(net):
    """A 300 kB body with many dot lines survives the trip byte for byte."""
    body = b"".join((b"." if i % 7 == 0 else b"") + f"line {i} ".encode() + b"x" * 60 + b"\r\n"
                    for i in range(4500))
    srv = net.server()
    m = sent_by_sam(srv, "a@remote.example", "big body", body)
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert tx.message.endswith(m)


def test_opportunistic_starttls(net):
    """C5: the peer offers STARTTLS -> the transaction runs over TLS (self-signed cert accepted)."""
    net.mx1.stop()
    net.mx1.starttls = True
    net.mx1.start()
    srv = net.server()
    m = sent_by_sam(srv, "a@remote.example", "over tls")
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert tx.tls, net.mx1.summary()
    assert tx.message.endswith(m)


def test_failed_tls_handshake_retries_plaintext_same_host(net):
    """C5: the TLS handshake fails -> a plaintext retry to the same host delivers the message."""
    net.mx1.tls_broken = True
    srv = net.server()
    m = sent_by_sam(srv, "a@remote.example", "tls broken")
    (tx,) = net.mx1.wait_delivered("a@remote.example", timeout=OUT_TIMEOUT)
    assert not tx.tls
    assert any(c.tls_failed for c in net.mx1.connections), "STARTTLS was never tried"
    assert tx.message.endswith(m)
    assert not net.mx2.delivered(), "the plaintext retry went to another host"


def test_starttls_off_stays_plaintext(net):
    """C5: `starttls = false` -> no STARTTLS even when offered."""
    net.mx1.stop()
    net.mx1.starttls = True
    net.mx1.start()
    srv = net.server({"starttls": False})
    sent_by_sam(srv, "a@remote.example", "no tls please")
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert not tx.tls
    assert not any(c.upper().startswith("STARTTLS") for conn in net.mx1.connections for c in conn.commands)


def test_peer_without_extensions(net):
    """A peer that offers no ESMTP extensions still gets a correct transaction; it did not offer
    8BITMIME, so the 8-bit body arrives as 7-bit quoted-printable (RFC 6152) that decodes to the
    original."""
    import email
    import email.policy
    net.mx1.caps = []
    srv = net.server()
    sent_by_sam(srv, ["a@remote.example", "b@remote.example"], "plain peer", BODY_DOTS)
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert len(tx.accepted) == 2
    assert all(b < 128 for b in tx.raw_data), "8-bit octets went to a host without 8BITMIME"
    parsed = email.message_from_bytes(tx.message, policy=email.policy.compat32)
    assert parsed["Content-Transfer-Encoding"].strip().lower() == "quoted-printable"
    assert parsed.get_payload(decode=True).replace(b"\r\n", b"\n") == BODY_DOTS.replace(b"\r\n", b"\n")


def test_bind_address(net):
    """C8: outbound connections come from `[delivery] bind_address`."""
    srv = net.server({"bind_address": "127.0.0.9"})
    sent_by_sam(srv, "a@remote.example", "bound")
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert tx.client_ip == "127.0.0.9"


# ------------------------------------------------------------------------------------------
# C3: temporary failures and the two retry levels
# ------------------------------------------------------------------------------------------

def test_451_twice_then_250_delivers_on_third_attempt(net):
    """C3: 451, 451, 250 -> delivered once, on the third attempt; the journal shows a first-level
    (8C) and a second-level (8D) retry entry."""
    net.other.rcpt["o@other.example"] = ["451 4.3.0 first no", "451 4.3.0 second no", "250 2.1.5 ok"]
    srv = net.server({"first_retry_count": 1, "first_retry_interval_secs": 1,
                      "second_retry_count": 3, "second_retry_interval_secs": 1})
    sent_by_sam(srv, "o@other.example", "third time lucky")
    net.other.wait_delivered("o@other.example")
    assert net.other.rcpt_count("o@other.example") == 3
    wait_not_queued(srv, "o@other.example")
    wait_journal_code(srv, "8C", lambda line: "o@other.example" in line.lower(), timeout=5)
    wait_journal_code(srv, "8D", lambda line: "o@other.example" in line.lower(), timeout=5)
    wait_journal_code(srv, SUCCESS, lambda line: "o@other.example" in line.lower(), timeout=5)
    time.sleep(1.5)
    assert len(net.other.delivered()) == 1
    assert wait_no_bounce(srv)


def wait_no_bounce(srv, seconds: float = 1.0) -> bool:
    msgs = mailbox_stays(srv, SAM_USER, SAM_PW, 0, seconds)
    return msgs == []


def test_4xx_at_data_then_success(net):
    """C3: a 451 after DATA defers the whole transaction; the retry delivers it exactly once."""
    net.other.data_reply = ["451 4.3.0 disk full, later", "250 2.0.0 ok"]
    srv = net.server()
    m = sent_by_sam(srv, ["o@other.example", "p@other.example"], "data 451")
    (tx,) = net.other.wait_delivered("o@other.example")
    assert sorted(a.lower() for a in tx.accepted) == ["o@other.example", "p@other.example"]
    assert tx.message.endswith(m)
    wait_queue_empty(srv)
    time.sleep(1.5)
    assert len(net.other.delivered()) == 1
    assert wait_no_bounce(srv)


def test_per_recipient_4xx_only_that_recipient_waits(net):
    """C3: in one transaction o gets 250 and p gets 451: o is delivered now, p alone later; each
    exactly once."""
    net.other.rcpt["p@other.example"] = ["451 4.2.1 p is busy", "250 2.1.5 ok"]
    srv = net.server()
    m = sent_by_sam(srv, ["o@other.example", "p@other.example"], "per recipient")
    (first,) = net.other.wait_delivered("o@other.example")
    assert [a.lower() for a in first.accepted] == ["o@other.example"], first.rcpts
    (second,) = net.other.wait_delivered("p@other.example")
    assert [a.lower() for a in second.accepted] == ["p@other.example"], second.rcpts
    assert [r.lower() for r, _ in second.rcpts] == ["p@other.example"], "o was sent again"
    assert second.message.endswith(m)
    wait_queue_empty(srv)
    time.sleep(1.5)
    assert len(net.other.delivered()) == 2
    assert wait_no_bounce(srv)


def test_connection_lost_after_data_is_retried(net):
    """C3: the peer receives the message but the connection dies before the final reply: no
    250 was seen, so the message is tried again and delivered."""
    net.other.data_reply = ["DROP", "250 2.0.0 ok"]
    srv = net.server()
    m = sent_by_sam(srv, "o@other.example", "lost reply")
    (tx,) = net.other.wait_delivered("o@other.example")
    assert tx.message.endswith(m)
    assert len(net.other.transactions) == 2
    wait_queue_empty(srv)
    assert wait_no_bounce(srv)


def test_temporary_reply_shows_in_queue_list(net):
    """O2: while a recipient waits, `queue list` shows it with the last reply and a next attempt."""
    net.other.rcpt["o@other.example"] = "451 4.7.1 greylisted, come back later"
    srv = net.server({"first_retry_count": 5, "first_retry_interval_secs": 3600})
    sent_by_sam(srv, "o@other.example", "greylisted")
    net.other.wait_rcpt("o@other.example")
    row = wait_queue_row(srv, "o@other.example", lambda r: "greylisted" in r["line"])
    header = srv.cli_ok("queue", "list").stdout.splitlines()[0].lower()
    assert "next" in header, f"`queue list` has no next-attempt column: {header!r}"
    assert "451" in row["line"]


def test_peer_down_for_whole_schedule_bounces_after_last_retry(net):
    """C3/C4: other.example's only MX refuses connections through every retry -> one bounce to
    Sam after the last retry; nothing left in the queue."""
    net.other.stop()
    srv = net.server()
    t0 = time.monotonic()
    sent_by_sam(srv, "o@other.example", "nobody home")
    (b,) = wait_bounces(srv, SAM_USER, SAM_PW, 1)
    # initial attempt + 1 s + 1 s: the bounce cannot come before both retries were due.
    assert time.monotonic() - t0 >= 1.5
    assert_bounce(b, "o@other.example", status_re=r"[45]\.\d{1,3}\.\d{1,3}",
                  original_subject="nobody home")
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 2.0)
    retries = [line for c, line in journal_entries(srv, "8") if c in ("8C", "8D")]
    assert retries, "no retry journal entries"


def test_sigkill_mid_schedule_then_delivered_exactly_once(net):
    """F1/C3: the server is killed (SIGKILL) while a recipient waits for its retry; after a
    restart the message is still delivered, exactly once."""
    net.other.stop()
    srv = net.server({"first_retry_count": 3, "first_retry_interval_secs": 2,
                      "second_retry_count": 3, "second_retry_interval_secs": 2})
    sent_by_sam(srv, "o@other.example", "survives kill")
    wait_journal_code(srv, ["8C", "8D"], lambda line: "o@other.example" in line.lower())
    srv.kill()
    net.other.start()
    srv.start()
    net.other.wait_delivered("o@other.example")
    wait_not_queued(srv, "o@other.example")
    time.sleep(2.5)
    assert len(net.other.delivered()) == 1, net.other.summary()
    assert wait_no_bounce(srv)


def test_sigterm_mid_schedule_then_bounced_exactly_once(net):
    """F1/C3/O3: SIGTERM while waiting for a retry; the peer stays down; after the restart the
    schedule ends in exactly one bounce."""
    net.other.stop()
    srv = net.server({"first_retry_count": 2, "first_retry_interval_secs": 1,
                      "second_retry_count": 2, "second_retry_interval_secs": 1})
    sent_by_sam(srv, "o@other.example", "bounce after restart")
    wait_journal_code(srv, ["8C", "8D"], lambda line: "o@other.example" in line.lower())
    srv.stop()
    srv.start()
    (b,) = wait_bounces(srv, SAM_USER, SAM_PW, 1)
    assert_bounce(b, "o@other.example", status_re=r"[45]\.\d{1,3}\.\d{1,3}")
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 3.0)


@pytest.mark.parametrize("how", ["kill", "term"])
def test_server_stopped_during_a_delivery_loses_nothing(net, how):
    """F1/O3: the server dies (SIGKILL) or is stopped (SIGTERM) while the peer holds the message
    before its final reply; after a restart the message is delivered (again: SMTP cannot know the
    first copy arrived), nothing is lost, and no bounce is made."""
    net.other.data_delay = 4.0
    srv = net.server()
    m = sent_by_sam(srv, "o@other.example", f"in flight {how}")
    deadline = time.monotonic() + OUT_TIMEOUT
    while not any(t.raw_data is not None for t in net.other.transactions):
        assert time.monotonic() < deadline, net.other.summary()
        time.sleep(0.05)
    net.other.data_delay = 0.0
    if how == "kill":
        srv.kill()
    else:
        srv.stop()
    srv.start()
    # A copy counts as delivered only if the server was still there to read the 250 (the peer
    # does not count a reply nobody heard); a graceful stop may finish the delivery first.
    deadline = time.monotonic() + OUT_TIMEOUT
    while queue_row(srv, "o@other.example") is not None or not net.other.delivered():
        assert time.monotonic() < deadline, (net.other.summary(), srv.cli("queue", "list").stdout)
        time.sleep(0.2)
    assert net.other.delivered()[-1].message.endswith(m)
    if how == "kill":
        assert len(net.other.transactions) >= 2, net.other.summary()
    assert wait_no_bounce(srv)


# ------------------------------------------------------------------------------------------
# C1: DNS outcomes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["servfail", "timeout"])
def test_dns_temporary_failure_defers(net, failure):
    """C1: SERVFAIL or no answer for the domain -> the recipient stays queued (deferred), its
    last reply mentions DNS; no bounce, no connection anywhere."""
    if failure == "servfail":
        net.stub.servfail("flaky.example")
    else:
        net.stub.drop("flaky.example")
    srv = net.server({"first_retry_count": 5, "first_retry_interval_secs": 3600})
    sent_by_sam(srv, "f@flaky.example", "dns trouble")
    row = wait_queue_row(srv, "f@flaky.example",
                         lambda r: re.search(r"(?i)dns|servfail|resolv|timed? ?out", r["line"].split("@flaky.example", 1)[1]),
                         timeout=45)
    assert re.search(r"(?i)dns|lookup", row["line"]), f"last reply does not mention DNS: {row['line']!r}"
    assert net.stub.asked("flaky.example")
    for p in net.peers:
        assert not p.connections
    assert wait_no_bounce(srv)
    assert queue_row(srv, "f@flaky.example") is not None


def test_nxdomain_bounces_5_1_2(net):
    """C1: NXDOMAIN for the recipient's domain -> bounce with Status 5.1.2, no retries."""
    net.stub.nxdomain("nowhere.example")
    srv = net.server({"first_retry_count": 5, "first_retry_interval_secs": 3600})
    sent_by_sam(srv, "n@nowhere.example", "no such domain")
    (b,) = wait_bounces(srv, SAM_USER, SAM_PW, 1)
    assert_bounce(b, "n@nowhere.example", status_re=r"5\.1\.2", original_subject="no such domain")
    wait_queue_empty(srv)


def test_null_mx_bounces_5_1_10(net):
    """C1 (RFC 7505): a null MX ("MX 0 .") -> bounce with Status 5.1.10, nothing contacted."""
    net.stub.null_mx("nomail.example")
    net.stub.a("nomail.example", MX1_IP)  # must not be used as an implicit MX
    srv = net.server({"first_retry_count": 5, "first_retry_interval_secs": 3600})
    sent_by_sam(srv, "n@nomail.example", "null mx")
    (b,) = wait_bounces(srv, SAM_USER, SAM_PW, 1)
    assert_bounce(b, "n@nomail.example", status_re=r"5\.1\.10")
    assert not net.mx1.connections
    wait_queue_empty(srv)


def test_mx_pointing_at_this_server_bounces_5_4_6(make_server, mx_dns_stub):
    """C1: the MX of the domain is this server itself (its own SMTP listen address and port) ->
    bounce with Status 5.4.6 (mail loops back to myself)."""
    stub = mx_dns_stub
    stub.mx("loop.example", (10, "mx.loop.example"))
    stub.a("mx.loop.example", "127.0.0.1")
    for _ in range(5):
        port = free_port()
        srv = outbound_server(make_server, stub, port, {"first_retry_count": 5,
                                                        "first_retry_interval_secs": 3600},
                              start=False, smtp={"listen": [f"127.0.0.1:{port}"]})
        try:
            srv.start()
            break
        except AssertionError:
            continue
    else:
        pytest.fail("could not start a server on a chosen port")
    assert srv.smtp == ("127.0.0.1", port)
    sent_by_sam(srv, "l@loop.example", "loops back")
    bounces = wait_bounces(srv, SAM_USER, SAM_PW, 1, timeout=60)
    assert_bounce(bounces[0], "l@loop.example", status_re=r"5\.4\.6")
    wait_queue_empty(srv, timeout=30)


# ------------------------------------------------------------------------------------------
# C2: the mail router
# ------------------------------------------------------------------------------------------

def test_mail_router_takes_everything(net):
    """C2: with a mail router every non-local message goes to it, whatever the MX says; local
    mail is still delivered locally."""
    router = net.extra_peer("127.0.0.54", name="router.example")
    net.stub.a("router.example", "127.0.0.54")
    srv = net.server({"mail_router": "router.example"})
    sent_by_sam(srv, ["a@remote.example", "o@other.example", SAM_ADDR], "via the router")
    router.wait_delivered("a@remote.example")
    router.wait_delivered("o@other.example")
    wait_queue_empty(srv)
    for p in (net.mx1, net.mx2, net.other):
        assert not p.connections, p.summary()
    assert [subject_of(x) for x in fetch_all(srv, SAM_USER, SAM_PW)] == ["via the router"]


def test_mail_router_with_port_and_host_table(net):
    """C2: "host:port" - the router's own port, not remote_port; the host table resolves it."""
    (router,) = start_peers(["127.0.0.55"], name="router.example")
    net.peers.append(router)
    assert router.port != net.port
    srv = net.server({"mail_router": f"router.example:{router.port}",
                      "host_table": {"router.example": "127.0.0.55"}})
    sent_by_sam(srv, "a@remote.example", "router port")
    router.wait_delivered("a@remote.example")
    assert not net.mx1.connections


def test_unresolvable_mail_router_defers_never_direct(net):
    """C2: the router cannot be resolved -> mail waits in the queue; it never goes direct to
    the MX."""
    net.stub.nxdomain("router.example")
    srv = net.server({"mail_router": "router.example",
                      "first_retry_count": 20, "first_retry_interval_secs": 1})
    sent_by_sam(srv, "a@remote.example", "router missing")
    deadline = time.monotonic() + OUT_TIMEOUT
    while not net.stub.asked("router.example"):
        assert time.monotonic() < deadline, f"router never looked up: {net.stub.queries}"
        time.sleep(0.1)
    nothing_for(4.0, net.mx1, net.mx2, net.other)
    assert queue_row(srv, "a@remote.example") is not None, srv.cli("queue", "list").stdout
    assert wait_no_bounce(srv)


# ------------------------------------------------------------------------------------------
# C6: connection limits
# ------------------------------------------------------------------------------------------

def test_per_domain_connection_limit(net):
    """C6: max_connections_per_domain = 1 and five messages for one domain with a slow peer ->
    never more than one connection at a time; all five delivered, nothing dropped."""
    net.other.data_delay = 0.5
    srv = net.server({"max_connections_per_domain": 1})
    for i in range(5):
        sent_by_sam(srv, f"o{i}@other.example", f"limited {i}")
    for i in range(5):
        net.other.wait_delivered(f"o{i}@other.example", timeout=40)
    assert net.other.max_active <= 1, f"{net.other.max_active} concurrent connections"
    assert max_overlap(net.other.connections) <= 1
    wait_queue_empty(srv)


def test_total_connection_limit(net):
    """C6: max_connections = 1 across two domains -> never two connections at once in total."""
    net.mx1.data_delay = 0.4
    net.other.data_delay = 0.4
    srv = net.server({"max_connections": 1})
    for i in range(3):
        sent_by_sam(srv, [f"a{i}@remote.example", f"o{i}@other.example"], f"total {i}")
    for i in range(3):
        net.mx1.wait_delivered(f"a{i}@remote.example", timeout=40)
        net.other.wait_delivered(f"o{i}@other.example", timeout=40)
    assert max_overlap(net.mx1.connections + net.mx2.connections + net.other.connections) <= 1
    wait_queue_empty(srv)


# ------------------------------------------------------------------------------------------
# O2: queue show / retry / hold / release / delete
# ------------------------------------------------------------------------------------------

def _deferred(net, srv_delivery=None, reply="451 4.3.0 not yet, try again later"):
    """A server whose message to o@other.example got `reply` once and waits an hour for the
    next attempt; returns (srv, queue id)."""
    net.other.rcpt["o@other.example"] = [reply, "250 2.1.5 ok"]
    srv = net.server({"first_retry_count": 3, "first_retry_interval_secs": 3600,
                      **(srv_delivery or {})})
    sent_by_sam(srv, "o@other.example", "queue ops")
    net.other.wait_rcpt("o@other.example")
    row = wait_queue_row(srv, "o@other.example", lambda r: "not yet" in r["line"])
    return srv, row["id"]


def test_queue_show(net):
    """O2: `queue show ID` prints the envelope, the recipient, its attempts and last reply."""
    srv, qid = _deferred(net)
    out = srv.cli_ok("queue", "show", qid).stdout
    assert SAM_ADDR in out.lower()
    assert "o@other.example" in out.lower()
    assert "not yet, try again later" in out
    assert re.search(r"(?i)attempt", out), out


def test_queue_show_unknown_id_fails(net):
    srv = net.server()
    r = srv.cli("queue", "show", "no-such-id")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip()


def test_queue_retry_forces_an_attempt(net):
    """O2: `queue retry ID` tries again now, not in an hour."""
    srv, qid = _deferred(net)
    time.sleep(0.5)
    assert not net.other.delivered()
    srv.cli_ok("queue", "retry", qid)
    net.other.wait_delivered("o@other.example", timeout=10)
    wait_not_queued(srv, "o@other.example", timeout=10)


def test_queue_hold_and_release(net):
    """O2: `queue hold ID` stops attempts (even when retries are due every second) until
    `queue release ID`."""
    net.other.stop()
    srv = net.server({"first_retry_count": 30, "first_retry_interval_secs": 1})
    sent_by_sam(srv, "o@other.example", "hold me")
    row = wait_queue_row(srv, "o@other.example")
    wait_journal_code(srv, ["8C", "8D"], lambda line: "o@other.example" in line.lower())
    srv.cli_ok("queue", "hold", row["id"])
    time.sleep(0.5)  # an attempt already under way when hold came meets a closed port
    net.other.start()
    nothing_for(4.0, net.other)
    assert queue_row(srv, "o@other.example") is not None
    srv.cli_ok("queue", "release", row["id"])
    net.other.wait_delivered("o@other.example", timeout=15)
    wait_not_queued(srv, "o@other.example")


def test_hold_survives_a_restart(net):
    """O2/F1: a held message stays held across a restart; release then delivers it."""
    net.other.rcpt["o@other.example"] = ["451 4.3.0 not yet"] * 4 + ["250 2.1.5 ok"]
    srv = net.server({"first_retry_count": 30, "first_retry_interval_secs": 1})
    sent_by_sam(srv, "o@other.example", "held across restart")
    net.other.wait_rcpt("o@other.example")
    qid = wait_queue_row(srv, "o@other.example")["id"]
    srv.cli_ok("queue", "hold", qid)
    time.sleep(0.5)
    seen = len(net.other.transactions)
    srv.restart()
    time.sleep(3.0)
    assert len(net.other.transactions) == seen, net.other.summary()
    assert "held" in srv.cli_ok("queue", "show", qid).stdout
    srv.cli_ok("queue", "release", qid)
    net.other.wait_delivered("o@other.example", timeout=15)
    wait_not_queued(srv, "o@other.example")


def test_queue_delete_removes_without_bounce(net):
    """O2: `queue delete ID` removes the message; no bounce, never delivered."""
    srv, qid = _deferred(net)
    srv.cli_ok("queue", "delete", qid)
    wait_not_queued(srv, "o@other.example", timeout=5)
    r = srv.cli("queue", "retry", qid)
    assert r.returncode != 0
    time.sleep(2)
    assert not net.other.delivered()
    assert wait_no_bounce(srv)
