"""Per-listener session limits and session deadlines (issue 13 item 6, SPEC S4).

Each SMTP service has its own session pool: the MX port (`[smtp] max_sessions`,
`max_sessions_per_ip`), submission and implicit TLS together (`submission_max_sessions`,
`submission_max_sessions_per_ip`) and the local socket of `postroom sendmail`
(`local_max_sessions`); POP3 and POP3S share the POP3 pool. A client has
`greeting_timeout_secs` from the greeting to HELO/EHLO, and a session lasts at most
`max_session_secs`: after it, 421 at the next command boundary, never in the middle of DATA.

Clients connect from loopback addresses only (127.0.0.0/8); the MX flood uses its own source
addresses (127.0.6.x). No DNS.
"""

from __future__ import annotations

import select
import socket
import time

import pytest

from conftest import SAM
from conftest_tls import (  # noqa: F401  (make_tls_server is a fixture)
    SAM_ADDR,
    SAM_NAME,
    SAM_PW,
    make_tls_server,
    smtp_login,
    smtp_plain,
    smtp_tls_session,
    smtps_client,
)
from helpers import (
    JANE,
    Closed,
    cli_bytes,
    expect,
    make_message,
    rewrite_config,
    smtp_from,
    wait_for_subjects,
)

# 200 idle connections to the MX port from 10 addresses: 20 each, exactly the default per-address
# limit, and 200 in all, exactly the default MX max_sessions.
FLOOD_SOURCES = [f"127.0.6.{i}" for i in range(1, 11)]
FLOOD_PER_SOURCE = 20
FLOOD_TOTAL = len(FLOOD_SOURCES) * FLOOD_PER_SOURCE
TOO_MANY = "too many connections"


def open_idle_flood(addr) -> list[socket.socket]:
    """FLOOD_TOTAL connections that read their greeting and then say nothing. Every one must be
    greeted with 220: the flood fills the MX pool exactly."""
    socks: list[socket.socket] = []
    try:
        for source in FLOOD_SOURCES:
            for _ in range(FLOOD_PER_SOURCE):
                s = socket.create_connection(addr, timeout=10, source_address=(source, 0))
                socks.append(s)
                line = b""
                while not line.endswith(b"\n") and len(line) < 1024:
                    b = s.recv(1)
                    if not b:
                        break
                    line += b
                assert line.startswith(b"220 "), (
                    f"flood connection {len(socks)} from {source} got {line!r}, not the greeting")
    except BaseException:
        close_all(socks)
        raise
    return socks


def closed_within(c, timeout: float) -> bool:
    """Does the server end the connection (EOF, reset, TLS EOF) within `timeout` seconds?
    Anything it sends meanwhile is read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        c.sock.settimeout(left)
        try:
            if not c.sock.recv(4096):
                return True
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True


def noop_until_421(c, every: float, give_up: float):
    """NOOP every `every` seconds (each answered 250) until the server says something
    unprompted or answers otherwise; returns that reply, or None after `give_up` seconds. Waits
    for unprompted bytes before each NOOP, so a 421 sent between two NOOPs is read, not raced."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < give_up:
        if c.buf or select.select([c.sock], [], [], every)[0] or getattr(c.sock, "pending", lambda: 0)():
            return c.read_reply()
        try:
            r = c.cmd("NOOP")
        except (Closed, OSError) as e:
            pytest.fail(f"connection ended without a 421 after {time.monotonic() - t0:.1f}s: {e!r}")
        if r.code != 250:
            return r
    return None


def close_all(socks) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def assert_mx_full(srv) -> None:
    """A further MX client (from an address outside the flood) is refused: the flood still holds
    every MX slot, so whatever else is served is served beside it, not after it."""
    c = smtp_from(srv, "127.0.0.1", timeout=10)
    try:
        assert c.greeting.code == 421 and TOO_MANY in c.greeting.text, (
            f"the MX pool is not full during the flood: {c.greeting!r}")
    finally:
        c.close()


@pytest.mark.timeout(90)
def test_idle_mx_flood_does_not_starve_submission_smtps_or_the_local_socket(make_tls_server):
    """S4 (issue 13): 200 idle connections to the MX port from 10 addresses fill the MX pool
    (a 201st MX client reads 421 too many connections). Meanwhile submission (STARTTLS) and
    smtps (implicit TLS) still greet with 220 and accept a login, a message submitted on each is
    accepted, and `postroom sendmail` over the local socket still delivers."""
    srv = make_tls_server()
    flood = open_idle_flood(srv.smtp)
    try:
        assert_mx_full(srv)
        subjects = []
        for listener in ("submission", "smtps"):
            c = smtp_tls_session(srv, listener)
            try:
                smtp_login(c, SAM_NAME, SAM_PW)
                subject = f"beside the flood via {listener}"
                expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
                expect(c.cmd(f"RCPT TO:<{SAM_ADDR}>"), 250)
                expect(c.data(make_message(subject, sender=SAM_ADDR, to=SAM_ADDR)), 250)
                subjects.append(subject)
            finally:
                c.quit()
        r = cli_bytes(srv, "sendmail", SAM_ADDR,
                      input=b"Subject: beside the flood via sendmail\n\nfrom cron\n", timeout=30)
        assert r.returncode == 0, (f"sendmail exited {r.returncode} during the MX flood: "
                                   f"{r.stderr.decode(errors='replace')}")
        subjects.append("beside the flood via sendmail")
        # Still full: nothing above was served because flood connections had gone away.
        assert_mx_full(srv)
    finally:
        close_all(flood)
    wait_for_subjects(srv, SAM_NAME, SAM_PW, subjects)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("listener", ["smtp", "submission", "smtps"])
def test_client_that_never_says_ehlo_is_closed_after_the_greeting_deadline(make_tls_server, listener):
    """S4 (issue 13): greeting_timeout_secs = 2. A client that reads the greeting and says
    nothing reads 421 4.4.2 after about 2 s and is disconnected; one that sends only NOOPs (no
    HELO/EHLO) is closed just as soon; one that says EHLO at once is not held to the deadline."""
    srv = make_tls_server(users=False, smtp={"greeting_timeout_secs": 2})
    addr = getattr(srv, listener)
    connect = smtps_client if listener == "smtps" else smtp_plain

    # Silent.
    c = connect(addr)
    try:
        expect(c.greeting, 220)
        t0 = time.monotonic()
        r = c.read_reply()
        took = time.monotonic() - t0
        expect(r, 421, "4.4.2")
        assert 1.5 <= took <= 6, f"421 after {took:.1f}s with greeting_timeout_secs = 2"
        assert closed_within(c, 5), "the server did not close the silent connection after its 421"
    finally:
        c.close()

    # NOOPs, but never EHLO: commands before EHLO do not extend the deadline.
    c = connect(addr)
    try:
        expect(c.greeting, 220)
        t0 = time.monotonic()
        got = noop_until_421(c, every=0.5, give_up=8)
        took = time.monotonic() - t0
        assert got is not None, "NOOP without EHLO kept the session open past the greeting deadline"
        expect(got, 421, "4.4.2")
        assert 1.5 <= took <= 6, f"421 after {took:.1f}s with greeting_timeout_secs = 2"
    finally:
        c.close()

    # EHLO at once: the greeting deadline no longer applies.
    c = connect(addr)
    try:
        expect(c.greeting, 220)
        c.ehlo()
        time.sleep(3)
        expect(c.cmd("NOOP"), 250)
    finally:
        c.quit()


@pytest.mark.timeout(60)
def test_noop_every_second_gets_421_after_max_session_secs(make_server):
    """S4 (issue 13): max_session_secs = 3. A client that says EHLO and then NOOP every second
    (each well inside the command deadline) reads 421 4.4.2 about 3 s after it connected, and
    the server closes the connection; the slot is given back (max_sessions_per_ip = 1: the next
    client from the same address is greeted with 220)."""
    srv = make_server(smtp={"max_session_secs": 3, "max_sessions_per_ip": 1})
    t0 = time.monotonic()
    c = smtp_from(srv, "127.0.0.1")
    try:
        expect(c.greeting, 220)
        c.ehlo()
        got = noop_until_421(c, every=1, give_up=15)
        took = time.monotonic() - t0
        assert got is not None, "NOOP every second held the session for 15 s with max_session_secs = 3"
        expect(got, 421, "4.4.2")
        assert 2.5 <= took <= 6, f"421 after {took:.1f}s with max_session_secs = 3"
        assert closed_within(c, 5), "the server did not close the session after its 421"
    finally:
        c.close()
    deadline = time.monotonic() + 5
    while True:
        c = smtp_from(srv, "127.0.0.1")
        code = c.greeting.code
        c.quit()
        if code == 220:
            break
        assert time.monotonic() < deadline, "the slot of the expired session was not given back"
        time.sleep(0.2)


@pytest.mark.timeout(60)
def test_long_data_is_not_cut_at_the_session_lifetime(make_server):
    """S4 (issue 13): the lifetime ends a session only at a command boundary. With
    max_session_secs = 3 a message whose DATA trickles in for about 5 s (a line every 0.25 s)
    is accepted with 250 and delivered; only then does the session get 421 4.4.2."""
    srv = make_server(smtp={"max_session_secs": 3})
    srv.add_user(*SAM)
    c = smtp_from(srv, "127.0.0.1")
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        expect(c.cmd("RCPT TO:<SamJones@example.test>"), 250)
        t0 = time.monotonic()
        expect(c.cmd("DATA"), 354)
        head = make_message("long data past the lifetime", body=b"")
        c.send(head)
        for i in range(20):
            c.send(f"line {i} of a slow message\r\n")
            time.sleep(0.25)
        assert time.monotonic() - t0 > 4, "DATA did not outlast the session lifetime"
        c.send(b".\r\n")
        r = c.read_reply()
        expect(r, 250)
        # The lifetime is over: 421 at this command boundary, then the connection ends.
        bye = c.read_reply()
        expect(bye, 421, "4.4.2")
        assert closed_within(c, 5), "the server did not close the session after its 421"
    finally:
        c.close()
    msgs = wait_for_subjects(srv, SAM[0], SAM[2], ["long data past the lifetime"])
    body = next(m for m in msgs if b"long data past the lifetime" in m)
    assert b"line 19 of a slow message" in body, body[-300:]


def test_config_check_shows_the_per_listener_limits(make_server):
    """S4 (issue 13): `config check` prints the new keys with their defaults, and refuses a
    submission per-address limit above the submission total, naming the key."""
    srv = make_server(start=False)
    r = srv.cli("config", "check")
    assert r.returncode == 0, r.stderr
    for line in ("max_sessions = 200", "max_sessions_per_ip = 20", "submission_max_sessions = 100",
                 "submission_max_sessions_per_ip = 10", "local_max_sessions = 50",
                 "greeting_timeout_secs = 30", "max_session_secs = 1800"):
        assert any(l.strip() == line for l in r.stdout.splitlines()), f"no {line!r} in:\n{r.stdout}"
    rewrite_config(srv, {"smtp": {"listen": ["127.0.0.1:0"], "submission_max_sessions": 5,
                                  "submission_max_sessions_per_ip": 6}})
    r = srv.cli("config", "check")
    assert r.returncode != 0, r.stdout
    assert "smtp.submission_max_sessions_per_ip = 6" in r.stderr + r.stdout, r.stderr
