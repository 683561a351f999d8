"""S3 with A2/A3: the Message-ID and Date the server adds to submitted (authenticated) mail that
lacks them, whatever the size of the message (issue 12, defect 8).

A message larger than one body chunk (256 KiB) used to go out without them: they were inserted
at the end of DATA, when the queue had long written the first chunk. Each test submits over TLS
with AUTH (smtplib, or a raw client that trickles the header section in small writes), then
fetches the message from Kim's maildrop over POP3 and checks: exactly one Message-ID and one
Date, the client's own fields kept (not duplicated), the client's header lines and the body
bytes intact.
"""

from __future__ import annotations

import email.utils
import re
import time

import pytest

from conftest_tls import (  # noqa: F401  (make_tls_server is a fixture)
    KIM_ADDR,
    KIM_NAME,
    KIM_PW,
    SAM_ADDR,
    SAM_NAME,
    SAM_PW,
    make_tls_server,
    smtp_login,
    smtp_tls_session,
    smtplib_submit,
)
from helpers import dot_stuff, expect, strip_trace, subject_of, wait_for_subjects

OWN_ID = "<own-id-0815@client.remote.example>"
OWN_DATE = "Mon, 02 Mar 2026 10:00:00 +0000"


def big_body(kib: int) -> bytes:
    """About `kib` KiB of body lines, with lines that a careless scan could take for header
    fields or the end of DATA (their dots are stuffed on the wire)."""
    lines = []
    size, i = 0, 0
    while size < kib * 1024:
        if i % 1000 == 0:
            line = f"Date: {i} is a body line, not a header field"
        elif i % 1000 == 1:
            line = f"Message-ID: <body-{i}@not.a.header>"
        elif i % 1000 == 2:
            line = "."
        elif i % 1000 == 3:
            line = f".leading dot {i}"
        else:
            line = f"line {i:07d} of the body: the quick brown fox jumps over the lazy dog"
        lines.append(line)
        size += len(line) + 2
        i += 1
    return ("\r\n".join(lines) + "\r\n").encode()


def message(subject: str, body: bytes, own: bool = False, extra: str = "") -> tuple[bytes, bytes]:
    """(header section without its empty line, the whole message)."""
    head = (f"From: Sam <{SAM_ADDR}>\r\nTo: <{KIM_ADDR}>\r\nSubject: {subject}\r\n"
            f"X-Folded: a field folded onto a line\r\n\tDate: that is no Date field\r\n{extra}")
    if own:
        head += f"Message-Id: {OWN_ID}\r\nDATE: {OWN_DATE}\r\n"
    head_b = head.encode()
    return head_b, head_b + b"\r\n" + body


def header_fields(msg: bytes, name: str) -> list[bytes]:
    head = msg.split(b"\r\n\r\n", 1)[0]
    return re.findall(rb"(?mi)^" + re.escape(name.encode()) + rb"[ \t]*:[ \t]*(.*)$", head)


def delivered(srv, subjects) -> dict[str, bytes]:
    msgs = wait_for_subjects(srv, KIM_NAME, KIM_PW, subjects, timeout=60)
    return {subject_of(m): m for m in msgs}


def check_added(got: bytes, head: bytes, body: bytes) -> None:
    """One well-formed Message-ID and Date; besides them (and the trace) the client's header
    lines as sent, in order; the body byte for byte."""
    ids, dates = header_fields(got, "Message-ID"), header_fields(got, "Date")
    assert len(ids) == 1, f"Message-ID fields: {ids} in {got[:1500]!r}"
    assert len(dates) == 1, f"Date fields: {dates} in {got[:1500]!r}"
    assert re.fullmatch(rb"<[^<>@\s]+@[^<>@\s]+>", ids[0].strip()), ids
    assert email.utils.parsedate_to_datetime(dates[0].decode().strip()) is not None, dates
    got_head, got_body = strip_trace(got).split(b"\r\n\r\n", 1)
    kept = [line for line in got_head.split(b"\r\n") if not re.match(rb"(?i)(Message-ID|Date):", line)]
    assert kept == head.rstrip(b"\r\n").split(b"\r\n"), f"header lines changed: {got_head!r}"
    assert got_body == body, f"body changed: {len(got_body)} bytes, sent {len(body)}"


@pytest.mark.parametrize("listener", ["submission", "smtps"])
def test_large_submitted_message_gets_message_id_and_date(make_tls_server, listener):
    """The defect: ~600 KiB without Message-ID and Date gets exactly one of each."""
    srv = make_tls_server()
    body = big_body(600)
    head, msg = message(f"large bare via {listener}", body)
    assert len(msg) > 3 * 256 * 1024 // 2
    assert not smtplib_submit(srv, listener, SAM_NAME, SAM_PW, SAM_ADDR, KIM_ADDR, msg)
    got = delivered(srv, [f"large bare via {listener}"])[f"large bare via {listener}"]
    check_added(got, head, body)


def test_small_submitted_message_gets_message_id_and_date(make_tls_server):
    srv = make_tls_server()
    body = b"Short.\r\n"
    head, msg = message("small bare", body)
    assert not smtplib_submit(srv, "submission", SAM_NAME, SAM_PW, SAM_ADDR, KIM_ADDR, msg)
    check_added(delivered(srv, ["small bare"])["small bare"], head, body)


@pytest.mark.parametrize("size_kib", [1, 600])
def test_submitted_message_with_both_keeps_its_own(make_tls_server, size_kib):
    """Names in any case; nothing added, nothing duplicated; the message is stored as sent."""
    srv = make_tls_server()
    subject = f"has both {size_kib} KiB"
    body = big_body(size_kib)
    head, msg = message(subject, body, own=True)
    assert not smtplib_submit(srv, "submission", SAM_NAME, SAM_PW, SAM_ADDR, KIM_ADDR, msg)
    got = delivered(srv, [subject])[subject]
    assert [i.strip() for i in header_fields(got, "Message-ID")] == [OWN_ID.encode()]
    assert [d.strip() for d in header_fields(got, "Date")] == [OWN_DATE.encode()]
    assert strip_trace(got) == msg, "the message is not stored as sent"


def test_only_the_missing_one_is_added(make_tls_server):
    srv = make_tls_server()
    body = big_body(600)
    head, msg = message("has an id", body, extra=f"Message-ID: {OWN_ID}\r\n")
    assert not smtplib_submit(srv, "submission", SAM_NAME, SAM_PW, SAM_ADDR, KIM_ADDR, msg)
    got = delivered(srv, ["has an id"])["has an id"]
    assert [i.strip() for i in header_fields(got, "Message-ID")] == [OWN_ID.encode()]
    assert len(header_fields(got, "Date")) == 1
    got_head, got_body = strip_trace(got).split(b"\r\n\r\n", 1)
    assert [line for line in got_head.split(b"\r\n") if not line.startswith(b"Date:")] == \
        head.rstrip(b"\r\n").split(b"\r\n")
    assert got_body == body


def test_header_section_trickled_in_small_writes(make_tls_server):
    """The header section arrives in many small TLS records (many reads on the server), the
    body in one go: the fields are still added once, the message intact."""
    srv = make_tls_server()
    body = big_body(600)
    head, msg = message("trickled", body)
    c = smtp_tls_session(srv, "submission")
    try:
        smtp_login(c, SAM_NAME, SAM_PW)
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
        expect(c.cmd(f"RCPT TO:<{KIM_ADDR}>"), 250)
        expect(c.cmd("DATA"), 354)
        wire = dot_stuff(msg)
        cut = len(head) + 2 + 100
        for i in range(0, cut, 7):
            c.send(wire[i:min(i + 7, cut)])
            time.sleep(0.005)
        c.send(wire[cut:] + b".\r\n")
        expect(c.read_reply(), 250)
    finally:
        c.quit()
    check_added(delivered(srv, ["trickled"])["trickled"], head, body)


def test_huge_header_section_still_gets_the_fields(make_tls_server):
    """A header section longer than the server holds back (256 KiB) and no Message-ID or
    Date: they are added anyway (at the top), once."""
    srv = make_tls_server()
    filler = "".join(f"X-Filler-{i:05d}: {'f' * 70}\r\n" for i in range(3500))
    body = b"Body after a very long header section.\r\n"
    head, msg = message("huge header", body, extra=filler)
    assert len(head) > 256 * 1024
    assert not smtplib_submit(srv, "submission", SAM_NAME, SAM_PW, SAM_ADDR, KIM_ADDR, msg)
    check_added(delivered(srv, ["huge header"])["huge header"], head, body)
