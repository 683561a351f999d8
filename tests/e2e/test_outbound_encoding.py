"""What leaves Postroom fits the next hop (RFC 6152 §3, RFC 5321 §4.5.3.1.6; issue 14 items 2, 3).

Two scripted peers on one port (`[delivery] remote_port`), reached through the host table (no
DNS): seven.example's host does not offer 8BITMIME, eight.example's does.

- A host without 8BITMIME gets 7-bit MIME: 8-bit text parts quoted-printable, other 8-bit parts
  base64, multiparts and message/rfc822 parts keep their structure; no BODY=8BITMIME on MAIL.
  A message whose header fields have 8-bit octets cannot be converted: it is not sent there at
  all and the sender gets a 5.6.3 report.
- A host with 8BITMIME gets the 8-bit message byte for byte.
- No line longer than 998 octets goes to either: a part with a longer line is encoded, a long
  header line folded. The server itself keeps long lines: local delivery over POP3 gives the
  message back byte for byte.

Sam (sam@example.test, local) submits from 127.0.0.1, which is in the relay list.
"""

from __future__ import annotations

import email
import email.policy
import re
import time

import pytest

from helpers import RawPop, make_message, wait_for_count
from smtppeer import (
    ADMIN_ADDR,
    ADMIN_PW,
    ADMIN_USER,
    FAST_RETRY,
    SAM_ADDR,
    SAM_PW,
    SAM_USER,
    assert_bounce,
    esmtp_params,
    relay,
    start_peers,
    unstuff,
    wait_bounces,
)

SEVEN_IP, EIGHT_IP = "127.0.0.81", "127.0.0.82"
SEVEN, EIGHT = "x@seven.example", "y@eight.example"
CAPS_WITHOUT_8BITMIME = ["PIPELINING", "SIZE 52428800", "ENHANCEDSTATUSCODES"]


class World:
    def __init__(self, make_server):
        self.seven, self.eight = start_peers([SEVEN_IP, EIGHT_IP])
        self.seven.name, self.eight.name = "mx.seven.example", "mx.eight.example"
        self.seven.caps = list(CAPS_WITHOUT_8BITMIME)
        assert "8BITMIME" in self.eight.caps
        delivery = {
            "remote_port": self.seven.port,
            "host_table": {"seven.example": SEVEN_IP, "eight.example": EIGHT_IP},
            **FAST_RETRY,
        }
        self.srv = make_server(start=False, delivery=delivery, relay={"mode": "list"})
        self.srv.add_user(SAM_USER, SAM_ADDR, SAM_PW)
        self.srv.add_user(ADMIN_USER, ADMIN_ADDR, ADMIN_PW)
        self.srv.cli_ok("list", "add", "relay", "127.0.0.0/8")
        self.srv.start()

    def stop(self):
        self.seven.stop()
        self.eight.stop()


@pytest.fixture
def world(make_server):
    w = World(make_server)
    yield w
    w.stop()


# ------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------

TEXT = "Grüße aus Köln — naïve café\r\nZweite Zeile: Ümlaut, ½ €.\r\n".encode()
HTML = "<p>Grüße aus <b>Köln</b></p>\r\n".encode()
BLOB = bytes(b for b in range(128, 256)) * 3 + b"tail"
INNER = "From: Inner <inner@remote.example>\r\nSubject: inner\r\n\r\nInnerer Text: süß\r\n".encode()


def mixed_message(subject: str, to: str) -> bytes:
    """multipart/mixed: multipart/alternative (8-bit text/plain and text/html), an 8-bit
    application/octet-stream and a message/rfc822 with an 8-bit body; ASCII header fields."""
    body = (
        b"This is a multi-part message in MIME format.\r\n"
        b"--outer\r\n"
        b"Content-Type: multipart/alternative; boundary=\"inner\"\r\n"
        b"\r\n"
        b"--inner\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + TEXT + b"--inner\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + HTML + b"--inner--\r\n"
        b"--outer\r\n"
        b"Content-Type: application/octet-stream; name=\"blob.bin\"\r\n"
        b"Content-Disposition: attachment; filename=\"blob.bin\"\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + BLOB + b"\r\n"
        b"--outer\r\n"
        b"Content-Type: message/rfc822\r\n"
        b"\r\n" + INNER + b"--outer--\r\n"
    )
    return make_message(subject, body, sender=SAM_ADDR, to=to, extra_headers=[
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="outer"',
    ])


LONG_LINE = ("0123456789 abcdefghij=KLMNOPQRST\t" * 160)[:5000].encode()
LONG_HEADER = " ".join(f"word{i}" for i in range(250))  # about 2,100 octets, foldable


def long_line_message(subject: str, to: str) -> bytes:
    """A plain (non-MIME) message with a 5,000-octet body line and a 2,000-octet header field."""
    assert len(LONG_LINE) == 5000
    body = b"First line.\r\n" + LONG_LINE + b"\r\nLast line.\r\n"
    return make_message(subject, body, sender=SAM_ADDR, to=to, extra_headers=[f"X-Long: {LONG_HEADER}"])


# ------------------------------------------------------------------------------------------
# Reading what arrived
# ------------------------------------------------------------------------------------------

def parse(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def leaves(raw: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded content) of every leaf part, in order, message/rfc822 entered;
    text line endings as LF (a quoted-printable decoder gives LF)."""
    out = []
    for part in parse(raw).walk():
        if part.is_multipart():
            continue
        data = part.get_payload(decode=True) or b""
        if part.get_content_maintype() == "text":
            data = data.replace(b"\r\n", b"\n")
        out.append((part.get_content_type(), data))
    return out


def transfer_encodings(raw: bytes) -> dict[str, str]:
    return {p.get_content_type(): (p.get("Content-Transfer-Encoding") or "").strip().lower()
            for p in parse(raw).walk() if not p.is_multipart()}


def long_lines(raw: bytes, limit: int = 998) -> list[int]:
    """Lengths of the lines (CRLF not counted) over the limit."""
    return [len(line) for line in raw.split(b"\r\n") if len(line) > limit]


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def mail_params(tx) -> dict[str, str]:
    return esmtp_params(tx.mail_params)


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------

def test_host_without_8bitmime_gets_7bit_mime_with_the_same_parts(world):
    """(a) RFC 6152 §3: the host that does not offer 8BITMIME gets a 7-bit message (every octet of
    the DATA < 128), its text parts quoted-printable, the octet stream base64, the multiparts and
    the encapsulated message kept; decoded, every leaf part is what was sent. MAIL has no
    BODY=8BITMIME. (Fails before issue 14: the 8-bit body went raw.)"""
    m = mixed_message("to a 7-bit host", SEVEN)
    relay(world.srv, SAM_ADDR, SEVEN, m)
    (tx,) = world.seven.wait_delivered(SEVEN)
    assert "BODY" not in mail_params(tx), tx.mail_params
    eight_bit = [i for i, b in enumerate(tx.raw_data) if b >= 128]
    assert not eight_bit, f"{len(eight_bit)} 8-bit octets on the wire, first at {eight_bit[0]}: " \
                          f"{tx.raw_data[max(0, eight_bit[0] - 80):eight_bit[0] + 40]!r}"
    assert leaves(tx.message) == leaves(m)
    assert [t for t, _ in leaves(tx.message)] == ["text/plain", "text/html", "application/octet-stream", "text/plain"]
    assert transfer_encodings(tx.message) == {
        "text/plain": "quoted-printable",   # the encapsulated message's body (the last text/plain)
        "text/html": "quoted-printable",
        "application/octet-stream": "base64",
    }
    got = parse(tx.message)
    assert got.get_content_type() == "multipart/mixed" and got.get_boundary() == "outer"
    inner = [p for p in got.walk() if p.get_content_type() == "message/rfc822"][0].get_payload(0)
    assert inner["Subject"] == "inner"
    assert not long_lines(tx.raw_data)


def test_host_with_8bitmime_gets_the_8bit_message_unchanged(world):
    """(b) The host that offers 8BITMIME gets the message byte for byte, announced with
    BODY=8BITMIME. (A guard: this held before issue 14 too.)"""
    m = mixed_message("to an 8-bit host", EIGHT)
    relay(world.srv, SAM_ADDR, EIGHT, m)
    (tx,) = world.eight.wait_delivered(EIGHT)
    assert mail_params(tx).get("BODY") == "8BITMIME", tx.mail_params
    assert tx.message.endswith(m)
    added = tx.message[: len(tx.message) - len(m)]
    assert added.startswith(b"Received: "), added[:300]


@pytest.mark.parametrize("to", [SEVEN, EIGHT])
def test_no_line_over_998_octets_to_any_host(world, to):
    """(c) A 5,000-octet body line and a 2,000-octet header field: no line on the wire is longer
    than 998 octets, for the host without 8BITMIME and the one with it. The body goes
    quoted-printable (with MIME-Version, which the message lacked), the header field is folded at
    whitespace; decoded and unfolded, both are what was sent. (Fails before issue 14: the lines
    went out as they came.)"""
    m = long_line_message(f"long line to {to}", to)
    relay(world.srv, SAM_ADDR, to, m)
    peer = world.seven if to == SEVEN else world.eight
    (tx,) = peer.wait_delivered(to)
    assert not long_lines(tx.raw_data), f"lines of {long_lines(tx.raw_data)} octets on the wire"
    got = parse(tx.message)
    assert (got["Content-Transfer-Encoding"] or "").strip().lower() == "quoted-printable"
    assert (got["MIME-Version"] or "").strip() == "1.0"
    lf = lambda b: b.replace(b"\r\n", b"\n")  # noqa: E731  (a QP decoder may give LF or CRLF)
    assert lf(got.get_payload(decode=True)) == lf(m.split(b"\r\n\r\n", 1)[1])
    assert unfold(got["X-Long"]) == LONG_HEADER
    assert got["Subject"] == f"long line to {to}"
    if to == SEVEN:
        assert all(b < 128 for b in tx.raw_data)


def test_long_line_in_an_attachment_goes_base64_and_8bit_text_stays(world):
    """(c) For the 8BITMIME host only the part with the long line changes: the 8-bit text part
    goes as it is, the attachment with a 5,000-octet line as base64; decoded, all parts are what
    was sent."""
    data = (b'{"k": "' + b"v" * 4990 + b'"}')
    body = (b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + TEXT
            + b"--b\r\nContent-Type: application/json\r\n\r\n" + data + b"\r\n--b--\r\n")
    m = make_message("json attachment", body, sender=SAM_ADDR, to=EIGHT, extra_headers=[
        "MIME-Version: 1.0", "Content-Type: multipart/mixed; boundary=b"])
    relay(world.srv, SAM_ADDR, EIGHT, m)
    (tx,) = world.eight.wait_delivered(EIGHT)
    assert not long_lines(tx.raw_data)
    assert leaves(tx.message) == leaves(m)
    assert transfer_encodings(tx.message) == {"text/plain": "8bit", "application/json": "base64"}
    assert b"\r\n\r\n" + TEXT + b"--b\r\n" in tx.message


def test_local_delivery_keeps_long_lines_byte_for_byte(world):
    """(d) The server accepts and stores a 5,000-octet line (RFC 5321 §4.5.3.1.6 allows a server
    to); POP3 gives the message back byte for byte: only relaying encodes. (A guard: this held
    before issue 14 too.)"""
    m = long_line_message("long line kept locally", SAM_ADDR)
    relay(world.srv, SAM_ADDR, SAM_ADDR, m)
    wait_for_count(world.srv, SAM_USER, SAM_PW, 1)
    pop = RawPop(world.srv.pop3)
    try:
        pop.login(SAM_USER, SAM_PW)
        assert pop.cmd("RETR 1").startswith(b"+OK")
        got = unstuff(b"".join(pop.read_multiline_raw()))
        pop.cmd("QUIT")
    finally:
        pop.close()
    assert got.endswith(m), got[-300:]
    assert LONG_LINE + b"\r\n" in got


def test_8bit_header_to_a_host_without_8bitmime_bounces_with_5_6_3(world):
    """RFC 6152 §3 leaves two choices for what cannot be converted — 8-bit octets in a header
    field: convert, or treat it as a permanent failure. The host without 8BITMIME gets nothing
    (not even MAIL FROM); the sender gets a 5.6.3 report (conversion required but not
    supported). The same message goes unchanged to the host with 8BITMIME. (Fails before issue
    14: the header went raw.)"""
    m = make_message("Grüße", "Hallo\r\n".encode(), sender=SAM_ADDR, to=SEVEN)
    relay(world.srv, SAM_ADDR, [SEVEN, EIGHT], m)
    (tx,) = world.eight.wait_delivered(EIGHT)
    assert tx.message.endswith(m)
    (bounce,) = wait_bounces(world.srv, SAM_USER, SAM_PW)
    assert_bounce(bounce, SEVEN, status_re=r"5\.6\.3", diagnostic="8BITMIME")
    time.sleep(1.0)
    assert not world.seven.transactions, world.seven.summary()
    assert world.seven.connections, "the host without 8BITMIME was never asked"
    assert not any(c.upper().startswith("MAIL") for conn in world.seven.connections for c in conn.commands)
