"""SMTP server (SPEC §2, §3 R2/R3): exact reply codes on raw sockets."""

import time

import pytest

from conftest import SAM
from helpers import (
    JANE,
    Closed,
    RawPop,
    SmtpClient,
    dot_stuff,
    expect,
    fetch_all,
    make_message,
    send_mail,
    smtp_session,
    strip_trace,
    subject_of,
    wait_for_subjects,
)

NAME, ADDR, PW = SAM


def deliver_sentinel(srv, subject="sentinel"):
    """Send one good message to Sam and wait for it: everything sent before it has settled."""
    send_mail(srv, ADDR, make_message(subject))
    return wait_for_subjects(srv, NAME, PW, [subject])


# ------------------------------------------------------------------------------------------
# Greeting, EHLO, simple verbs
# ------------------------------------------------------------------------------------------

def test_greeting_and_ehlo_extensions(make_server):
    """S1, S2, S4: 220 greeting; EHLO lists PIPELINING, SIZE <max_message_size>, 8BITMIME,
    ENHANCEDSTATUSCODES."""
    srv = make_server(smtp={"max_message_size": 10000})
    c = SmtpClient(srv.smtp)
    expect(c.greeting, 220)
    r = c.ehlo()
    keywords = [line.upper() for line in r.lines[1:]]
    assert "PIPELINING" in keywords, r
    assert "SIZE 10000" in keywords, r
    assert "8BITMIME" in keywords, r
    assert "ENHANCEDSTATUSCODES" in keywords, r
    c.quit()


def test_helo_is_accepted(server):
    """S1: HELO works as well as EHLO, and mail can follow it."""
    c = smtp_session(server, ehlo=False)
    expect(c.cmd("HELO client.remote.example"), 250)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    c.quit()


@pytest.mark.parametrize("verb", ["EXPN staff", "SEND FROM:<a@remote.example>",
                                  "SOML FROM:<a@remote.example>", "SAML FROM:<a@remote.example>",
                                  "TURN"])
def test_unsupported_verbs_get_502(server, verb):
    """S1: EXPN, SEND, SOML, SAML and TURN are not supported: 502."""
    c = smtp_session(server)
    expect(c.cmd(verb), 502)
    expect(c.cmd("NOOP"), 250)  # the session goes on
    c.quit()


def test_help_noop_rset_quit(server):
    """S1: HELP 214, NOOP 250, RSET 250, QUIT 221 and the connection is closed."""
    c = smtp_session(server)
    expect(c.cmd("HELP"), 214)
    expect(c.cmd("NOOP"), 250)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd("RSET"), 250)
    # RSET cleared the transaction: RCPT now needs a MAIL first.
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 503)
    expect(c.cmd("QUIT"), 221)
    closed, _ = c.wait_closed(5)
    assert closed, "server did not close the connection after QUIT"


def test_vrfy_on_gives_252_without_harvesting(sam):
    """S1: with vrfy = true (default), VRFY answers 252 for known and unknown names alike."""
    c = smtp_session(sam)
    known = c.cmd("VRFY SamJones@example.test")
    unknown = c.cmd("VRFY nobody@example.test")
    expect(known, 252)
    expect(unknown, 252)
    c.quit()


def test_vrfy_off_gives_502(make_server):
    """S1: vrfy = false -> 502, as IMail does."""
    srv = make_server(smtp={"vrfy": False})
    srv.add_user(*SAM)
    c = smtp_session(srv)
    expect(c.cmd("VRFY SamJones@example.test"), 502)
    c.quit()


# ------------------------------------------------------------------------------------------
# Recipients: relay, unknown users, postmaster
# ------------------------------------------------------------------------------------------

def test_relay_refused_550_5_7_1(sam):
    """R1 (mode none), R3: a non-local recipient is refused with 550 5.7.1; a local one still works (R2)."""
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd("RCPT TO:<user@elsewhere.example>"), 550, "5.7.1")
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    c.quit()


def test_unknown_local_user_550_5_1_1(sam):
    """§1 step 3, D2: an unknown local recipient is refused at RCPT with 550 5.1.1."""
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd("RCPT TO:<nobody@example.test>"), 550, "5.1.1")
    c.quit()


def test_postmaster_any_case_delivered_to_admin(server):
    """S3: postmaster in any case, with or without the domain, is accepted and delivered to the
    user owning the configured postmaster address (admin@example.test)."""
    server.add_user("admin", "admin@example.test", "admin-pw-1")
    forms = ["postmaster", "POSTMASTER", "Postmaster@example.test"]
    for form in forms:
        c = smtp_session(server)
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        expect(c.cmd(f"RCPT TO:<{form}>"), 250)
        expect(c.data(make_message(f"to {form}", to=form)), 250)
        c.quit()
    msgs = wait_for_subjects(server, "admin", "admin-pw-1", [f"to {f}" for f in forms])
    assert sorted(subject_of(m) for m in msgs) == sorted(f"to {f}" for f in forms)


# ------------------------------------------------------------------------------------------
# Command sequence and syntax
# ------------------------------------------------------------------------------------------

def test_mail_before_helo_is_503(server):
    """S1: MAIL before EHLO/HELO -> 503."""
    c = smtp_session(server, ehlo=False)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 503)
    c.quit()


def test_rcpt_before_mail_is_503(sam):
    """S1: RCPT before MAIL -> 503."""
    c = smtp_session(sam)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 503)
    c.quit()


def test_data_before_rcpt_is_503(sam):
    """S1: DATA with no accepted recipient -> 503."""
    c = smtp_session(sam)
    expect(c.cmd("DATA"), 503)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd("DATA"), 503)
    c.quit()


def test_mail_from_without_angle_brackets_is_501(server):
    """S1 / RFC 5321 §4.1.2: MAIL FROM:jane@x (no angle brackets) is a syntax error: 501."""
    c = smtp_session(server)
    expect(c.cmd("MAIL FROM:jane@x"), 501)
    c.quit()


def test_unknown_mail_parameter_is_555(server):
    """S2 / RFC 5321 §4.1.1.11: an unrecognised MAIL parameter -> 555."""
    c = smtp_session(server)
    expect(c.cmd(f"MAIL FROM:<{JANE}> FOO=BAR"), 555)
    c.quit()


def test_mail_size_over_limit_is_552(make_server):
    """S4: MAIL FROM with SIZE= above max_message_size -> 552; within the limit -> 250."""
    srv = make_server(smtp={"max_message_size": 10000})
    c = smtp_session(srv)
    expect(c.cmd(f"MAIL FROM:<{JANE}> SIZE=10001"), 552)
    expect(c.cmd(f"MAIL FROM:<{JANE}> SIZE=9000"), 250)
    c.quit()


def test_too_many_recipients_is_452(make_server):
    """S4: the RCPT beyond max_recipients gets 452; the message still goes to the accepted ones."""
    srv = make_server(smtp={"max_recipients": 3})
    users = [(f"user{i}", f"user{i}@example.test", f"pw-{i}-secret") for i in range(4)]
    for u in users:
        srv.add_user(*u)
    c = smtp_session(srv)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    for _, addr, _ in users[:3]:
        expect(c.cmd(f"RCPT TO:<{addr}>"), 250)
    expect(c.cmd(f"RCPT TO:<{users[3][1]}>"), 452)
    expect(c.data(make_message("three only")), 250)
    c.quit()
    for name, _, pw in users[:3]:
        wait_for_subjects(srv, name, pw, ["three only"])
    assert fetch_all(srv, users[3][0], users[3][2]) == []


def test_oversized_data_read_to_end_then_552(make_server):
    """S4: a DATA body above max_message_size is read to its end, then 552 5.3.4; the session
    continues (RSET 250) and nothing is delivered."""
    srv = make_server(smtp={"max_message_size": 10000})
    srv.add_user(*SAM)
    c = smtp_session(srv)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    body = b"".join(b"%05d this line makes the message too large for the limit\r\n" % i
                    for i in range(400))  # ~24 KB
    assert len(body) > 20000
    expect(c.data(make_message("too big", body)), 552, "5.3.4")
    expect(c.cmd("RSET"), 250)
    # The same session can still send a message that fits.
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.data(make_message("small enough")), 250)
    c.quit()
    msgs = wait_for_subjects(srv, NAME, PW, ["small enough"])
    assert [subject_of(m) for m in msgs] == ["small enough"]


def test_connection_lost_during_data_delivers_nothing(sam):
    """§1 step 2, F1: a message whose DATA never reached CRLF.CRLF is not delivered."""
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.cmd("DATA"), 354)
    c.send(make_message("cut off", b"half a message\r\n"))
    time.sleep(0.5)
    c.close()
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.cmd("DATA"), 354)
    c.send(make_message("quit instead", b"no end\r\n") + b"QUIT\r\n")
    time.sleep(0.5)
    c.close()
    msgs = deliver_sentinel(sam)
    assert [subject_of(m) for m in msgs] == ["sentinel"]


def test_command_line_over_512_octets_is_500(server):
    """S4: a command line longer than 512 octets -> 500."""
    c = smtp_session(server)
    expect(c.cmd("NOOP " + "x" * 600), 500)
    c.close()


def test_more_than_max_hops_received_is_554_5_4_6(make_server):
    """S7: a message with more Received headers than max_hops is refused 554 5.4.6; a message
    with few Received headers is accepted."""
    srv = make_server(smtp={"max_hops": 5})
    srv.add_user(*SAM)

    def received(n):
        return [f"Received: from hop{i}.remote.example by hop{i + 1}.remote.example; "
                f"Mon, 02 Mar 2026 09:0{i % 10}:00 +0000" for i in range(n)]

    c = smtp_session(srv)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.data(make_message("looping", extra_headers=received(6))), 554, "5.4.6")
    expect(c.cmd("RSET"), 250)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.data(make_message("two hops", extra_headers=received(2))), 250)
    c.quit()
    msgs = wait_for_subjects(srv, NAME, PW, ["two hops"])
    assert [subject_of(m) for m in msgs] == ["two hops"]


def test_twenty_errors_then_421_and_close(server):
    """S4: after 20 errors in a session the server answers 421 and closes."""
    c = smtp_session(server)
    replies = []
    got_421_at = None
    for i in range(1, 26):
        try:
            c.send(f"BOGUS{i}\r\n")
            r = c.read_reply()
        except (Closed, BrokenPipeError, ConnectionResetError):
            break
        replies.append(r.code)
        if r.code == 421:
            got_421_at = i
            break
    assert got_421_at is not None, f"no 421 after 25 bad commands; replies: {replies}"
    assert all(500 <= code < 600 for code in replies[:-1]), replies
    assert got_421_at in (20, 21), f"421 after {got_421_at} bad commands: {replies}"
    closed, _ = c.wait_closed(5)
    assert closed, "connection still open after 421"


# ------------------------------------------------------------------------------------------
# Pipelining
# ------------------------------------------------------------------------------------------

def test_pipelined_commands_answered_in_order(server):
    """S2 PIPELINING (RFC 2920): EHLO, MAIL, RCPT, RCPT, DATA in one write; replies in order."""
    server.add_user(*SAM)
    server.add_user("bob", "bob@example.test", "bob-pw-1")
    c = SmtpClient(server.smtp)
    expect(c.greeting, 220)
    c.send("EHLO client.remote.example\r\n"
           f"MAIL FROM:<{JANE}>\r\n"
           f"RCPT TO:<{ADDR}>\r\n"
           "RCPT TO:<nobody@example.test>\r\n"
           "RCPT TO:<bob@example.test>\r\n"
           "DATA\r\n")
    codes = [c.read_reply().code for _ in range(6)]
    assert codes == [250, 250, 250, 550, 250, 354]
    msg = make_message("pipelined")
    c.send(dot_stuff(msg) + b".\r\nQUIT\r\n")
    expect(c.read_reply(), 250)
    expect(c.read_reply(), 221)
    c.close()
    (m,) = wait_for_subjects(server, NAME, PW, ["pipelined"])
    assert strip_trace(m) == msg
    wait_for_subjects(server, "bob", "bob-pw-1", ["pipelined"])


# ------------------------------------------------------------------------------------------
# Line endings and smuggling (S5)
# ------------------------------------------------------------------------------------------

def test_bare_lf_refused_by_default(sam):
    """S5: with allow_bare_lf = false a message containing bare LF is refused (5xx) and nothing
    is delivered."""
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.cmd("DATA"), 354)
    c.send(b"Subject: bare lf\r\n\r\nline one\nline two\r\n.\r\n")
    try:
        r = c.read_reply()
    except Closed:
        pytest.fail("connection closed without a 5xx reply to a bare-LF message")
    assert 500 <= r.code < 600, f"bare LF message got {r!r}"
    c.close()
    msgs = deliver_sentinel(sam)
    assert [subject_of(m) for m in msgs] == ["sentinel"]


def test_bare_lf_allowed_is_normalised_to_crlf(make_server):
    """S5: with allow_bare_lf = true a bare-LF message is accepted and stored with CRLF."""
    srv = make_server(smtp={"allow_bare_lf": True})
    srv.add_user(*SAM)
    c = smtp_session(srv)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.cmd("DATA"), 354)
    c.send(b"Subject: lf allowed\nX-Test: yes\n\nline one\nline two\r\n.\r\n")
    expect(c.read_reply(), 250)
    c.quit()
    (m,) = wait_for_subjects(srv, NAME, PW, ["lf allowed"])
    assert strip_trace(m) == b"Subject: lf allowed\r\nX-Test: yes\r\n\r\nline one\r\nline two\r\n"
    # On the wire (raw POP3) every line ends in CRLF.
    p = RawPop(srv.pop3)
    p.login(NAME, PW)
    assert p.cmd("RETR 1").startswith(b"+OK")
    raw = b"".join(p.read_multiline_raw())
    p.cmd("QUIT")
    p.close()
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF or CR left in the stored message"


SMUGGLE_SEQUENCES = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
}


def _smuggle(srv, seq: bytes):
    """One transaction whose body holds `seq` then a smuggled second transaction."""
    c = smtp_session(srv)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.cmd("DATA"), 354)
    payload = (b"Subject: outer\r\n\r\nfirst part" + seq
               + b"MAIL FROM:<evil@remote.example>\r\n"
               + f"RCPT TO:<{ADDR}>\r\n".encode()
               + b"DATA\r\n"
               + b"Subject: smuggled\r\n\r\nevil body\r\n"
               + b".\r\n"
               + b"QUIT\r\n")
    c.send(payload)
    replies = []
    try:
        while True:
            replies.append(c.read_reply())
    except (Closed, OSError):
        pass
    c.close()
    return replies


def _assert_no_smuggled(msgs):
    for m in msgs:
        assert b"Return-Path: <evil@remote.example>" not in m.split(b"\r\n\r\n")[0], m[:500]
        assert subject_of(m) != "smuggled", m[:500]


@pytest.mark.parametrize("seq", list(SMUGGLE_SEQUENCES.values()), ids=list(SMUGGLE_SEQUENCES))
def test_no_smuggling_bare_lf_refused(sam, seq):
    """S5: with allow_bare_lf = false no sequence but CRLF.CRLF ends DATA: the smuggled
    MAIL/RCPT/DATA never becomes a second delivered message."""
    replies = _smuggle(sam, seq)
    msgs = deliver_sentinel(sam)
    _assert_no_smuggled(msgs)
    others = [m for m in msgs if subject_of(m) != "sentinel"]
    assert len(others) <= 1, [subject_of(m) for m in msgs]
    assert sum(1 for r in replies if r.code == 250) <= 1, replies


@pytest.mark.parametrize("seq", list(SMUGGLE_SEQUENCES.values()), ids=list(SMUGGLE_SEQUENCES))
def test_no_smuggling_bare_lf_allowed(make_server, seq):
    """S5: even with allow_bare_lf = true, only CRLF.CRLF ends a message: no smuggled message."""
    srv = make_server(smtp={"allow_bare_lf": True})
    srv.add_user(*SAM)
    replies = _smuggle(srv, seq)
    msgs = deliver_sentinel(srv)
    _assert_no_smuggled(msgs)
    others = [m for m in msgs if subject_of(m) != "sentinel"]
    assert len(others) <= 1, [subject_of(m) for m in msgs]
    assert sum(1 for r in replies if r.code == 250) <= 1, replies


def test_lf_dot_lf_does_not_end_data_when_bare_lf_allowed(make_server):
    """S5: with allow_bare_lf = true, <LF>.<LF> is message content, not the end of DATA: the
    whole text up to CRLF.CRLF is one message."""
    srv = make_server(smtp={"allow_bare_lf": True})
    srv.add_user(*SAM)
    replies = _smuggle(srv, b"\n.\n")
    assert [r.code for r in replies] == [250, 221], replies
    msgs = deliver_sentinel(srv)
    (outer,) = [m for m in msgs if subject_of(m) == "outer"]
    assert b"MAIL FROM:<evil@remote.example>" in outer
    assert b"evil body" in outer
    assert len(msgs) == 2


# ------------------------------------------------------------------------------------------
# Timeouts and session limits (S4)
# ------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_trickle_does_not_extend_command_deadline(make_server):
    """S4: command_timeout_secs = 2; one byte every 0.5 s without a line end gets 421 and the
    connection closed within ~3-4 s: the trickle does not extend the deadline."""
    srv = make_server(smtp={"command_timeout_secs": 2})
    c = smtp_session(srv, ehlo=False)
    start = time.monotonic()
    received = b""
    closed = False
    for b in b"NOOPNOOPNOOPNOOPNOOPNOOPNOOP":
        if time.monotonic() - start > 8:
            break
        try:
            c.send(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        closed, got = c.wait_closed(0.5)
        received += got
        if closed:
            break
    elapsed = time.monotonic() - start
    if not closed:
        closed, got = c.wait_closed(1)
        received += got
    c.close()
    assert closed, f"still open after {elapsed:.1f}s of trickling; got {received!r}"
    assert received.startswith(b"421"), f"expected 421 before close, got {received!r}"
    assert elapsed < 4.5, f"closed only after {elapsed:.1f}s"


def test_idle_client_gets_421(make_server):
    """S4: a client that sends nothing gets 421 and is closed after the command deadline."""
    srv = make_server(smtp={"command_timeout_secs": 2})
    c = smtp_session(srv)
    start = time.monotonic()
    closed, got = c.wait_closed(8)
    c.close()
    assert closed and got.startswith(b"421"), got
    assert 1.5 < time.monotonic() - start < 6


def test_max_sessions_per_ip(make_server):
    """S4: max_sessions_per_ip = 2: a 3rd concurrent connection gets 421; once one session has
    ended a new connection is served again."""
    srv = make_server(smtp={"max_sessions_per_ip": 2})
    a = smtp_session(srv)
    b = smtp_session(srv)
    c = SmtpClient(srv.smtp, read_greeting=False)
    try:
        r = c.read_reply()
    except Closed:
        pytest.fail("third connection closed without a 421")
    expect(r, 421)
    c.close()
    a.quit()
    deadline = time.monotonic() + 5
    while True:
        d = SmtpClient(srv.smtp)
        if d.greeting.code == 220:
            break
        d.close()
        assert time.monotonic() < deadline, "slot not released after QUIT"
        time.sleep(0.2)
    d.quit()
    b.quit()
