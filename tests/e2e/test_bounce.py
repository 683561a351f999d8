"""Non-delivery after acceptance (SPEC §6 C3, C4; F2 non-delivery snap-in): RFC 3464 bounces.

Same world as test_outbound.py (smtppeer.Net): remote.example has MX hosts mx1/mx2 (127.0.0.51/52),
other.example one MX (127.0.0.53), all scripted peers on `[delivery] remote_port`. Sam
(sam@example.test) and the postmaster admin (admin@example.test) are local POP users.
"""

import email
import re
import time

from dnsstub import mx_dns_stub  # noqa: F401  (fixture)
from helpers import JANE, fetch_all, make_message
from smtppeer import (  # noqa: F401  (net is a fixture)
    ADMIN_PW,
    ADMIN_USER,
    OUT_TIMEOUT,
    SAM_ADDR,
    SAM_PW,
    SAM_USER,
    assert_bounce,
    bounce_for,
    is_bounce,
    journal_entries,
    mailbox_stays,
    net,
    parse_bounce,
    relay,
    wait_bounces,
    wait_queue_empty,
)

REFUSAL = "550 5.1.1 <x@other.example>: no such user here (xyzzy-42)"


def test_one_refused_recipient_bounces_the_other_is_delivered(net):
    """C3/C4: 550 for one of two recipients -> the other is delivered; Sam gets one RFC 3464
    bounce for the refused one only, with the peer's text, and the original headers; the bounce
    travelled with an empty envelope sender (Return-Path: <>)."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = net.server()
    m = make_message("half of it", b"Hello.\r\n", sender=SAM_ADDR, to="x@other.example")
    relay(srv, SAM_ADDR, ["x@other.example", "y@other.example"], m)
    (tx,) = net.other.wait_delivered("y@other.example")
    assert [a.lower() for a in tx.accepted] == ["y@other.example"]
    assert tx.message.endswith(m)

    (b,) = wait_bounces(srv, SAM_USER, SAM_PW, 1)
    assert b.startswith(b"Return-Path: <>\r\n"), b[:200]
    f = assert_bounce(b, "x@other.example", diagnostic="no such user here (xyzzy-42)",
                      original_subject="half of it")
    assert f["status"].startswith("5.1.1"), f
    parsed = parse_bounce(b)
    assert "reporting-mta" in parsed["per_message"], parsed["per_message"]
    assert bounce_for(parsed, "y@other.example") is None, "the delivered recipient is in the bounce"
    msg = email.message_from_bytes(b)
    assert SAM_ADDR in (msg.get("To") or "").lower(), msg.get("To")
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 2.0)


def test_5xx_after_data_bounces_every_recipient_of_the_transaction(net):
    """C4: 554 after DATA fails both recipients of the transaction; each is reported once."""
    net.other.data_reply = "554 5.6.0 content refused (plugh)"
    srv = net.server()
    m = make_message("refused content", b"Hello.\r\n", sender=SAM_ADDR, to="x@other.example")
    relay(srv, SAM_ADDR, ["x@other.example", "y@other.example"], m)
    bounces = wait_bounces(srv, SAM_USER, SAM_PW, 1)
    deadline = time.monotonic() + OUT_TIMEOUT
    while True:
        parsed = [parse_bounce(x) for x in bounces]
        reported = [bounce_for(p, r) for p in parsed for r in ("x@other.example", "y@other.example")]
        if len([f for f in reported if f]) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
        bounces = wait_bounces(srv, SAM_USER, SAM_PW, 1)
    for r in ("x@other.example", "y@other.example"):
        hits = [x for x in bounces if bounce_for(parse_bounce(x), r)]
        assert len(hits) == 1, f"{r} reported in {len(hits)} bounces"
        assert_bounce(hits[0], r, status_re=r"5\.6\.0", diagnostic="content refused (plugh)")
    assert net.other.rcpt_count("x@other.example") == 1
    wait_queue_empty(srv)


def test_temporary_failure_to_the_end_bounces_with_last_reply(net):
    """C3: 4xx at every attempt -> after the last retry, one bounce quoting the last reply."""
    net.other.rcpt["x@other.example"] = "452 4.2.2 mailbox over quota (zork)"
    srv = net.server()
    relay(srv, SAM_ADDR, ["x@other.example"],
          make_message("always later", b"Hi.\r\n", sender=SAM_ADDR, to="x@other.example"))
    (b,) = wait_bounces(srv, SAM_USER, SAM_PW, 1)
    # The last reply's status (4.2.2) or "delivery time expired" (4.4.7), not a bare class.
    assert_bounce(b, "x@other.example", status_re=r"[45]\.(2\.2|4\.7)", diagnostic="mailbox over quota (zork)")
    # initial attempt, one first-level and one second-level retry (FAST_RETRY)
    assert net.other.rcpt_count("x@other.example") == 3
    wait_queue_empty(srv)


def test_bounce_to_a_remote_sender_has_a_null_envelope(net):
    """C4: Jane (remote) relays to a refused address; her bounce goes out to her MX with
    MAIL FROM:<>, From MAILER-DAEMON, as a multipart/report."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = net.server()
    relay(srv, JANE, ["x@other.example"],
          make_message("from jane", b"Hi.\r\n", sender=JANE, to="x@other.example"))
    (tx,) = net.mx1.wait_delivered(JANE)
    assert tx.mail_from == "", f"bounce envelope sender is <{tx.mail_from}>"
    assert_bounce(tx.message, "x@other.example", diagnostic="no such user here (xyzzy-42)",
                  original_subject="from jane")
    wait_queue_empty(srv)


def test_failed_message_from_null_sender_is_dropped_not_bounced(net):
    """C4: never a bounce to <>: a message with MAIL FROM:<> that fails permanently is dropped
    (and journaled); no new message appears anywhere."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = net.server()
    relay(srv, "", ["x@other.example"],
          make_message("null sender", b"Hi.\r\n", sender="mailer-daemon@remote.example",
                       to="x@other.example"))
    net.other.wait_rcpt("x@other.example")
    wait_queue_empty(srv)
    time.sleep(2.0)
    assert not queue_has_anything(srv)
    assert net.other.rcpt_count("x@other.example") == 1
    for p in (net.mx1, net.mx2):
        assert not p.connections, p.summary()
    assert fetch_all(srv, ADMIN_USER, ADMIN_PW) == []
    assert fetch_all(srv, SAM_USER, SAM_PW) == []
    entries = journal_entries(srv)
    assert [line for code, line in entries if "x@other.example" in line.lower()
            and code[:1] in ("8", "A") and code not in ("82", "88")], "the failure is not journaled"
    assert [line for code, line in entries if code.startswith("A") and
            re.search(r"(?i)drop|discard|no report|null", line)], "no journal entry says no bounce was sent"


def queue_has_anything(srv) -> bool:
    out = srv.cli_ok("queue", "list").stdout
    return "@" in out


def test_undeliverable_bounce_goes_to_postmaster_once(net):
    """C4: the bounce to a remote sender is itself refused (550 at her MX) -> the postmaster
    (admin, local) gets it once; Jane's MX is asked once, not in a loop."""
    net.other.rcpt["x@other.example"] = REFUSAL
    for p in (net.mx1, net.mx2):
        p.rcpt[JANE] = "550 5.1.1 jane does not take bounces (frobozz)"
    srv = net.server()
    relay(srv, JANE, ["x@other.example"],
          make_message("double trouble", b"Hi.\r\n", sender=JANE, to="x@other.example"))
    net.mx1.wait_rcpt(JANE)
    (b,) = wait_bounces(srv, ADMIN_USER, ADMIN_PW, 1)
    assert b.startswith(b"Return-Path: <>\r\n"), b[:200]
    assert b"x@other.example" in b or b"frobozz" in b, b[:3000]
    wait_queue_empty(srv)
    mailbox_stays(srv, ADMIN_USER, ADMIN_PW, 1, 3.0)
    assert net.mx1.rcpt_count(JANE) + net.mx2.rcpt_count(JANE) == 1
    assert fetch_all(srv, SAM_USER, SAM_PW) == []


def test_undeliverable_double_bounce_is_dropped_and_journaled(net):
    """C4: the postmaster copy cannot be delivered either (a remote postmaster whose MX refuses)
    -> it is dropped and journaled, once; nothing is left in the queue."""
    net.other.rcpt["x@other.example"] = REFUSAL
    pm = "pm@remote.example"
    for p in (net.mx1, net.mx2):
        p.rcpt[JANE] = "550 5.1.1 jane does not take bounces"
        p.rcpt[pm] = "550 5.1.1 postmaster does not either (gnusto)"
    srv = net.server(postmaster=pm)
    relay(srv, JANE, ["x@other.example"],
          make_message("triple trouble", b"Hi.\r\n", sender=JANE, to="x@other.example"))
    net.mx1.wait_rcpt(pm)
    wait_queue_empty(srv)
    time.sleep(3.0)
    assert not queue_has_anything(srv)
    assert net.mx1.rcpt_count(pm) + net.mx2.rcpt_count(pm) == 1
    assert net.mx1.rcpt_count(JANE) + net.mx2.rcpt_count(JANE) == 1
    entries = journal_entries(srv)
    lines = [line for _, line in entries]
    dropped = [line for code, line in entries
               if code.startswith("A") and any(w in line.lower() for w in ("drop", "discard"))]
    assert len(dropped) == 1, dropped
    assert dropped, "no journal entry for the dropped double bounce:\n" + "\n".join(lines[-40:])


def test_sender_refused_at_mail_from_bounces_every_recipient(net):
    """C3/C4: a 5xx to MAIL FROM fails every recipient of the transaction: one report each."""
    net.other.mail_reply = "553 5.7.1 we do not take mail from you (xyzzy)"
    srv = net.server()
    relay(srv, SAM_ADDR, ["x@other.example", "y@other.example"],
          make_message("sender refused", b"Hi.\r\n", sender=SAM_ADDR, to="x@other.example"))
    deadline = time.monotonic() + OUT_TIMEOUT
    while True:
        bounces = [parse_bounce(x) for x in fetch_all(srv, SAM_USER, SAM_PW) if is_bounce(x)]
        found = {r: [b for b in bounces if bounce_for(b, r)] for r in ("x@other.example", "y@other.example")}
        if all(found.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    for r, hits in found.items():
        assert len(hits) == 1, f"{r} reported {len(hits)} times"
        f = bounce_for(hits[0], r)
        assert f["action"].lower() == "failed" and f["status"].startswith("5."), f
        assert "xyzzy" in f.get("diagnostic-code", ""), f
    assert not net.other.delivered()
    wait_queue_empty(srv)
