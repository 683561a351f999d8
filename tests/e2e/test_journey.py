"""The journey of one message (SPEC §1): Jane -> SMTP -> framework -> Sam's POP3 maildrop."""

import random

from conftest import SAM
from helpers import (
    HOSTNAME,
    JANE,
    expect,
    fetch_all,
    make_message,
    pop_login,
    send_mail,
    sha256,
    smtp_session,
    split_trace,
    strip_trace,
    subject_of,
    wait_for_count,
    wait_for_subjects,
)

NAME, ADDR, PW = SAM

BODY_8BIT = (
    b"Hello Sam,\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"Caf\xc3\xa9 cr\xc3\xa8me br\xc3\xbbl\xc3\xa9e, latin-1 \xe9\xe8\xff and \x80\x81 raw 8-bit\r\n"
    b"   leading spaces and trailing tab\t\r\n"
    b"\r\n"
    b"-- \r\n"
    b"Jane\r\n"
)


def test_jane_to_sam_raw_smtp_then_pop3(sam):
    """§1 steps 1-5, S3: 250 after DATA, then the message is in Sam's maildrop with
    Return-Path and a Received header naming the server, original bytes unchanged; Sam
    lists, retrieves and deletes it (P1)."""
    msg = make_message("Lunch on Friday", BODY_8BIT,
                       extra_headers=["MIME-Version: 1.0",
                                      "Content-Type: text/plain; charset=utf-8",
                                      "Content-Transfer-Encoding: 8bit"])
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}> BODY=8BITMIME"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.data(msg), 250)
    c.quit()

    msgs = wait_for_subjects(sam, NAME, PW, ["Lunch on Friday"])
    assert len(msgs) == 1
    rp, received, rest = split_trace(msgs[0])
    assert rp == b"Return-Path: <jane@remote.example>"
    unfolded = b" ".join(received.split())
    assert HOSTNAME.encode() in unfolded, received
    assert rest == msg

    # Sam deletes it; it is gone in the next session.
    p = pop_login(sam, NAME, PW)
    assert p.stat()[0] == 1
    p.dele(1)
    p.quit()
    assert fetch_all(sam, NAME, PW) == []


def test_smtplib_delivery_is_byte_exact(sam):
    """S3, S5, P4: smtplib's dot-stuffing and poplib's un-stuffing round-trip; 8-bit bytes kept."""
    msg = make_message("smtplib 8bit", BODY_8BIT)
    send_mail(sam, ADDR, msg)
    (m,) = wait_for_subjects(sam, NAME, PW, ["smtplib 8bit"])
    rp, received, rest = split_trace(m)
    assert rp == b"Return-Path: <jane@remote.example>"
    assert HOSTNAME.encode() in received
    assert rest == msg


def test_recipient_address_is_case_insensitive(sam):
    """§1 step 3 / D1: samjones@EXAMPLE.TEST reaches the user enrolled as SamJones@example.test."""
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd("RCPT TO:<samjones@EXAMPLE.TEST>"), 250)
    expect(c.data(make_message("case test", to="samjones@EXAMPLE.TEST")), 250)
    c.quit()
    wait_for_subjects(sam, NAME, PW, ["case test"])


def test_one_data_to_three_local_users(server):
    """§1 step 4: one DATA with three local recipients reaches all three maildrops."""
    users = [("sam", "SamJones@example.test", "pw-sam-1"),
             ("bob", "bob@example.test", "pw-bob-1"),
             ("carol", "carol@example.test", "pw-carol-1")]
    for u in users:
        server.add_user(*u)
    msg = make_message("team meeting", b"All hands at 10.\r\n", to="team@example.test")
    c = smtp_session(server)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    for _, addr, _ in users:
        expect(c.cmd(f"RCPT TO:<{addr}>"), 250)
    expect(c.data(msg), 250)
    c.quit()
    for name, _, pw in users:
        msgs = wait_for_subjects(server, name, pw, ["team meeting"])
        assert len(msgs) == 1, f"{name} has {len(msgs)} messages"
        assert strip_trace(msgs[0]) == msg
    # One recipient deleting its copy leaves the others' copies intact.
    p = pop_login(server, "sam", "pw-sam-1")
    p.dele(1)
    p.quit()
    assert fetch_all(server, "sam", "pw-sam-1") == []
    for name, _, pw in users[1:]:
        (m,) = fetch_all(server, name, pw)
        assert strip_trace(m) == msg


def test_user_with_two_addresses_gets_both(server):
    """D1: a user with several SMTP addresses receives mail sent to any of them in one maildrop."""
    server.add_user("sam", ["SamJones@example.test", "sales@example.test"], "pw-sam-1")
    send_mail(server, "SamJones@example.test", make_message("to preferred"))
    send_mail(server, "sales@example.test", make_message("to sales", to="sales@example.test"))
    msgs = wait_for_subjects(server, "sam", "pw-sam-1", ["to preferred", "to sales"])
    assert len(msgs) == 2


def test_null_sender_is_accepted(sam):
    """S3 / RFC 5321 §4.5.5: MAIL FROM:<> (a bounce) is accepted and delivered with Return-Path: <>."""
    msg = make_message("Undelivered Mail Returned to Sender", sender="MAILER-DAEMON@remote.example")
    c = smtp_session(sam)
    expect(c.cmd("MAIL FROM:<>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.data(msg), 250)
    c.quit()
    (m,) = wait_for_subjects(sam, NAME, PW, ["Undelivered Mail Returned to Sender"])
    rp, _, rest = split_trace(m)
    assert rp == b"Return-Path: <>"
    assert rest == msg


def test_two_messages_in_one_session(sam):
    """S1: after a completed transaction the session accepts another one; both are delivered."""
    c = smtp_session(sam)
    for subject in ("first of two", "second of two"):
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
        expect(c.data(make_message(subject)), 250)
    c.quit()
    msgs = wait_for_subjects(sam, NAME, PW, ["first of two", "second of two"])
    assert len(msgs) == 2


def test_ten_megabyte_message_arrives_byte_exact(sam):
    """S4, P4: a 10 MB message via smtplib arrives byte-exact (sha256 compared)."""
    rnd = random.Random(1234)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    lines = []
    size = 0
    while size < 10 * 1024 * 1024:
        n = rnd.randint(1, 76)
        line = bytes(rnd.choice(alphabet) for _ in range(n))
        if rnd.random() < 0.01:
            line = b"." + line  # some lines need dot-stuffing
        lines.append(line + b"\r\n")
        size += n + 2
    body = b"".join(lines)
    msg = make_message("big one", body)
    send_mail(sam, ADDR, msg, timeout=120)
    wait_for_count(sam, NAME, PW, 1, timeout=60)
    p = pop_login(sam, NAME, PW)
    p.sock.settimeout(60)
    count, _ = p.stat()
    assert count == 1
    listed = int(p.list(1).split()[2])
    _, got_lines, octets = p.retr(1)
    p.quit()
    got = b"".join(line + b"\r\n" for line in got_lines)
    assert listed == len(got) == octets, "LIST size must equal the retrieved octets"
    assert subject_of(got) == "big one"
    rest = strip_trace(got)
    assert len(rest) == len(msg)
    assert sha256(rest) == sha256(msg)
