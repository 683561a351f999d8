"""CHUNKING (RFC 3030, issue 20, SPEC S2): BDAT against the real binary with a raw socket client.

Every message sent here is checked through POP3: what arrives after the Return-Path and
Received lines is exactly the octets of the chunks.
"""

from __future__ import annotations

import time

import pytest

from conftest import SAM
from helpers import (
    JANE,
    Closed,
    expect,
    make_message,
    send_mail,
    smtp_session,
    strip_trace,
    subject_of,
    wait_for_subjects,
)

NAME, ADDR, PW = SAM

# Lines a dot-stuffing transfer would have to change, an end-of-DATA line, a command-looking
# line and 8-bit octets: BDAT carries all of them unchanged.
AWKWARD_BODY = (b".leading dot\r\n..two dots\r\n.\r\nMAIL FROM:<evil@remote.example>\r\n"
                + "Grüße, \u00ff\r\n".encode() + b"last line\r\n")


def bdat_session(srv):
    """EHLO (which must offer CHUNKING), MAIL and RCPT to Sam done."""
    c = smtp_session(srv, ehlo=False)
    r = expect(c.cmd("EHLO client.remote.example"), 250)
    assert "CHUNKING" in r.lines, r
    expect(c.cmd(f"MAIL FROM:<{JANE}> BODY=8BITMIME"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    return c


def chunk(data: bytes, last: bool = False) -> bytes:
    return f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode() + data


def delivered(srv, subject: str) -> bytes:
    msgs = wait_for_subjects(srv, NAME, PW, [subject])
    (m,) = [m for m in msgs if subject_of(m) == subject]
    return strip_trace(m)


def test_ehlo_offers_chunking_not_binarymime(server):
    """RFC 3030: CHUNKING offered; BINARYMIME not, since stored messages are CRLF lines."""
    c = smtp_session(server, ehlo=False)
    r = expect(c.cmd("EHLO client.remote.example"), 250)
    assert "CHUNKING" in r.lines and not any("BINARYMIME" in line for line in r.lines), r
    c.quit()


def test_single_bdat_last_is_delivered_byte_exact(sam):
    msg = make_message("bdat one", AWKWARD_BODY)
    c = bdat_session(sam)
    c.send(chunk(msg, last=True))
    r = expect(c.read_reply(), 250, "2.0.0")
    assert "queued as" in r.text, r
    c.quit()
    assert delivered(sam, "bdat one") == msg


def test_several_chunks_then_bdat_0_last(sam):
    """A message in chunks cut mid-line and mid-CRLF, ended by BDAT 0 LAST."""
    msg = make_message("bdat several", AWKWARD_BODY * 50)
    cuts = [0, 7, msg.index(b"\r\n") + 1, 300, 301, len(msg)]
    c = bdat_session(sam)
    for a, b in zip(cuts, cuts[1:]):
        c.send(chunk(msg[a:b]))
        r = expect(c.read_reply(), 250, "2.0.0")
        assert r.text == f"2.0.0 {b - a} octets received", r
    c.send(b"BDAT 0 LAST\r\n")
    expect(c.read_reply(), 250, "2.0.0")
    c.quit()
    assert delivered(sam, "bdat several") == msg


def test_chunks_pipelined_with_the_next_commands(sam):
    """PIPELINING: chunks, the next transaction and QUIT in one write; chunk octets that look
    like commands are content, and every command after them is answered in order."""
    first = make_message("bdat piped 1", b"QUIT\r\nRSET\r\n")
    second = make_message("bdat piped 2", b"second\r\n")
    c = bdat_session(sam)
    c.send(chunk(first[:40]) + chunk(first[40:], last=True)
           + f"MAIL FROM:<{JANE}>\r\nRCPT TO:<{ADDR}>\r\n".encode()
           + chunk(second, last=True) + b"QUIT\r\n")
    codes = [c.read_reply().code for _ in range(6)]
    assert codes == [250, 250, 250, 250, 250, 221], codes
    c.close()
    assert delivered(sam, "bdat piped 1") == first
    assert delivered(sam, "bdat piped 2") == second


def test_bdat_and_data_in_one_transaction_is_503(sam):
    c = bdat_session(sam)
    c.send(chunk(b"Subject: mixed\r\n"))
    expect(c.read_reply(), 250)
    expect(c.cmd("DATA"), 503, "5.5.1")
    expect(c.cmd("RSET"), 250)
    # After RSET the session is fine, and the half message was dropped.
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    c.send(chunk(make_message("after mix"), last=True))
    expect(c.read_reply(), 250)
    c.quit()
    msgs = wait_for_subjects(sam, NAME, PW, ["after mix"])
    assert [subject_of(m) for m in msgs] == ["after mix"]


def test_bdat_without_rcpt_is_503_and_its_octets_are_not_commands(sam):
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    c.send(chunk(f"RCPT TO:<{ADDR}>\r\n".encode(), last=True) + b"NOOP\r\n")
    expect(c.read_reply(), 503, "5.5.1")
    expect(c.read_reply(), 250)
    c.quit()


def test_bad_bdat_size_is_501_and_the_connection_closes(sam):
    c = bdat_session(sam)
    c.send(b"BDAT many LAST\r\nNOOP\r\n")
    expect(c.read_reply(), 501)
    closed, got = c.wait_closed(5)
    assert closed and got == b"", got


def test_size_limit_counts_across_chunks(make_server):
    """S4: max_message_size 1500; three chunks of 1000: the second passes the limit and gets
    552, the third (already sent, pipelined) is read and refused too; nothing is delivered."""
    srv = make_server(smtp={"max_message_size": 1500})
    srv.add_user(*SAM)
    part = b"x" * 998 + b"\r\n"
    c = bdat_session(srv)
    c.send(chunk(b"Subject: too big\r\n\r\n" + part[20:]) + chunk(part) + chunk(part, last=True) + b"NOOP\r\n")
    assert [c.read_reply().code for _ in range(4)] == [250, 552, 552, 250]
    c.quit()
    send_mail(srv, ADDR, make_message("sentinel"))
    msgs = wait_for_subjects(srv, NAME, PW, ["sentinel"])
    assert [subject_of(m) for m in msgs] == ["sentinel"]


@pytest.mark.timeout(60)
def test_client_that_stops_mid_chunk_gets_421_by_the_command_deadline(make_server):
    """S4: command_timeout_secs = 2, data_timeout_secs = 600: a chunk that stops halfway is cut
    by the command deadline (RFC 3030 has no data phase), and nothing is delivered."""
    srv = make_server(smtp={"command_timeout_secs": 2, "data_timeout_secs": 600})
    srv.add_user(*SAM)
    c = bdat_session(srv)
    start = time.monotonic()
    c.send(b"BDAT 1000 LAST\r\nSubject: stalled\r\n\r\nhalf")
    closed, got = c.wait_closed(10)
    elapsed = time.monotonic() - start
    assert closed, got
    assert got.startswith(b"421 4.4.2"), got
    assert elapsed < 6, elapsed
    send_mail(srv, ADDR, make_message("sentinel"))
    msgs = wait_for_subjects(srv, NAME, PW, ["sentinel"])
    assert [subject_of(m) for m in msgs] == ["sentinel"]


@pytest.mark.parametrize("bare", [b"\n", b"\r"], ids=["LF", "CR"])
def test_bare_line_ending_in_a_chunk_is_refused_without_hanging_up(sam, bare):
    """S5 as for DATA with allow_bare_lf = false: the message is refused (550 5.6.0); the chunk
    framing is intact, so the session goes on."""
    c = bdat_session(sam)
    c.send(chunk(b"Subject: bare\r\n\r\nline" + bare + b".\r\n", last=True))
    expect(c.read_reply(), 550, "5.6.0")
    expect(c.cmd("NOOP"), 250)
    c.quit()


def test_bare_lf_in_a_chunk_is_stored_as_crlf_when_allowed(make_server):
    srv = make_server(smtp={"allow_bare_lf": True})
    srv.add_user(*SAM)
    c = bdat_session(srv)
    c.send(chunk(b"Subject: bdat lf\r\n\r\none\ntwo\r\n.\nthree", last=True))
    expect(c.read_reply(), 250)
    c.quit()
    assert delivered(srv, "bdat lf") == b"Subject: bdat lf\r\n\r\none\r\ntwo\r\n.\r\nthree\r\n"


@pytest.mark.parametrize("seq", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r\n"],
                         ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CRLF", "CRLF.CRLF"])
@pytest.mark.parametrize("allow_bare_lf", [False, True], ids=["strict", "bare-lf-allowed"])
def test_no_smuggling_through_bdat(make_server, seq, allow_bare_lf):
    """S5 with BDAT in the mix: an end-of-DATA look-alike and a second transaction inside a
    chunk are content. At most the outer message arrives, never a smuggled one."""
    srv = make_server(smtp={"allow_bare_lf": allow_bare_lf})
    srv.add_user(*SAM)
    payload = (b"Subject: outer\r\n\r\nfirst part" + seq
               + f"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<{ADDR}>\r\nDATA\r\n".encode()
               + b"Subject: smuggled\r\n\r\nevil body\r\n.\r\n")
    c = bdat_session(srv)
    c.send(chunk(payload, last=True) + b"QUIT\r\n")
    replies = []
    try:
        while True:
            replies.append(c.read_reply())
    except (Closed, OSError):
        pass
    c.close()
    assert replies[-1].code == 221, replies
    send_mail(srv, ADDR, make_message("sentinel"))
    msgs = wait_for_subjects(srv, NAME, PW, ["sentinel"])
    assert all(subject_of(m) != "smuggled" for m in msgs)
    assert all(b"Return-Path: <evil@remote.example>" not in m for m in msgs)
    outer = [m for m in msgs if subject_of(m) == "outer"]
    assert len(outer) == (1 if allow_bare_lf or seq == b"\r\n.\r\n" else 0), replies
    if outer:
        assert b"evil body" in outer[0], outer[0]


# ------------------------------------------------------------------------------------------
# Outbound: a next hop that offers CHUNKING gets BDAT
# ------------------------------------------------------------------------------------------

from dnsstub import mx_dns_stub  # noqa: E402,F401  (fixture)
from smtppeer import DEFAULT_CAPS, SAM_ADDR, bare_line_endings, net, relay  # noqa: E402,F401


def test_outbound_bdat_to_a_host_offering_chunking(net):
    """A 1.5 MB message with dot lines goes to a CHUNKING host in BDAT chunks (the last one
    LAST), not dot-stuffed, no DATA; the host gets exactly the message, after our trace fields."""
    net.mx1.caps = DEFAULT_CAPS + ["CHUNKING"]
    body = b"".join((b"." if i % 5 == 0 else b"") + f"line {i} ".encode() + b"y" * 70 + b"\r\n"
                    for i in range(20000))
    m = make_message("bdat out", body, sender=SAM_ADDR, to="a@remote.example")
    srv = net.server()
    relay(srv, SAM_ADDR, ["a@remote.example"], m)
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert len(tx.chunks) >= 2, tx.chunks
    assert tx.message.endswith(m)
    assert b"\r\n..line" not in tx.raw_data, "BDAT content is never dot-stuffed"
    conn = net.mx1.connections[tx.connection]
    assert not any(c.upper() == "DATA" for c in conn.commands), conn.commands[:20]
    assert any(c.upper().endswith(" LAST") for c in conn.commands if c.upper().startswith("BDAT")), conn.commands
    assert bare_line_endings(bytes(conn.raw)) == []


def test_outbound_data_when_chunking_is_not_offered(net):
    srv = net.server()
    m = make_message("data out", AWKWARD_BODY, sender=SAM_ADDR, to="a@remote.example")
    relay(srv, SAM_ADDR, ["a@remote.example"], m)
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert tx.chunks == [] and tx.message.endswith(m)


def test_outbound_bdat_keeps_the_dkim_signature_valid(net):
    """The DKIM signature covers the octets sent in the chunks: dkimpy verifies it."""
    from test_dkim_sign import assert_signed, signed_server

    net.mx1.caps = DEFAULT_CAPS + ["CHUNKING"]
    srv = signed_server(net, "rsa")
    relay(srv, SAM_ADDR, ["a@remote.example"],
          make_message("bdat dkim", AWKWARD_BODY, sender=SAM_ADDR, to="a@remote.example"))
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert tx.chunks, "sent with BDAT"
    assert_signed(net, tx.message)
