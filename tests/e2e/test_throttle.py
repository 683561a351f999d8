"""Failed-login throttling (SPEC A5, with the R9 penalty box): a burst of wrong passwords from one
address locks that address out for a while; other addresses are unaffected; a relay-listed
network (an office behind NAT) is not locked out as a whole, only the attacked user; and a wrong
password costs the same time whether or not the user exists.

Servers here use [penalty] login_failures = 3, login_window_minutes = 15, deny_minutes = 10.
Clients connect from chosen 127.0.0.x source addresses.
"""

from __future__ import annotations

import ssl
import statistics
import time

import pytest

from conftest_tls import (  # noqa: F401  (make_tls_server is a fixture)
    ADMIN_NAME,
    ADMIN_PW,
    SAM_NAME,
    SAM_PW,
    client_ctx,
    make_tls_server,
    plain_token,
    pop_plain,
    smtp_plain,
)
from helpers import CLIENT_NAME, HOSTNAME, Closed, has_ip, journal_lines

PENALTY = {"login_failures": 3, "login_window_minutes": 15, "deny_minutes": 10}
WRONG = "not-the-password"
REFUSED = "closed"


def smtp_auth_from(srv, ip: str, user: str, password: str):
    """Submission from `ip`: EHLO, STARTTLS, EHLO, AUTH PLAIN. Returns the AUTH reply code, the
    first refusing reply code before it, or "closed" if the server hung up."""
    try:
        c = smtp_plain(srv.submission, ip)
    except (Closed, OSError):
        return REFUSED
    try:
        if c.greeting.code != 220:
            return c.greeting.code
        for step in ("EHLO", "STARTTLS", "EHLO2"):
            if step == "STARTTLS":
                r = c.cmd("STARTTLS")
                if r.code != 220:
                    return r.code
                c.sock = client_ctx().wrap_socket(c.sock, server_hostname=HOSTNAME)
                continue
            r = c.cmd(f"EHLO {CLIENT_NAME}")
            if r.code != 250:
                return r.code
        return c.cmd(f"AUTH PLAIN {plain_token(user, password)}").code
    except (Closed, OSError, ssl.SSLError):
        return REFUSED
    finally:
        c.quit()


def pop_login_from(srv, ip: str, user: str, password: str):
    """POP3 USER/PASS from `ip` (plaintext from loopback is allowed by default). Returns the
    first line that is not +OK (bytes), b"+OK" if logged in, or "closed"."""
    try:
        p = pop_plain(srv.pop3, ip)
    except (Closed, OSError):
        return REFUSED
    try:
        if not p.greeting.startswith(b"+OK"):
            return p.greeting
        for line in (f"USER {user}", f"PASS {password}"):
            r = p.cmd(line)
            if not r.startswith(b"+OK"):
                return r
        p.cmd("QUIT")
        return b"+OK"
    except (Closed, OSError):
        return REFUSED
    finally:
        p.close()


def ip_lines(srv, ip: str) -> int:
    return len([line for line in journal_lines(srv) if has_ip(line, ip)])


def wait_ip_lines(srv, ip: str, at_least: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = ip_lines(srv, ip)
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def test_smtp_auth_failures_lock_out_the_address(make_tls_server):
    """A5: three wrong SMTP passwords from 127.0.0.5 (535 each, each journaled): then even the
    right password from 127.0.0.5 is refused, while 127.0.0.6 logs in."""
    srv = make_tls_server(penalty=PENALTY)
    bad_ip, good_ip = "127.0.0.5", "127.0.0.6"
    before = ip_lines(srv, bad_ip)
    for i in range(3):
        got = smtp_auth_from(srv, bad_ip, SAM_NAME, WRONG)
        assert got == 535, f"wrong password #{i + 1} from {bad_ip}: expected 535, got {got!r}"
    got = smtp_auth_from(srv, bad_ip, SAM_NAME, SAM_PW)
    assert got != 235, f"{bad_ip} logged in right after 3 failures (login_failures = 3)"
    assert got == REFUSED or 400 <= got < 600, got
    assert smtp_auth_from(srv, good_ip, SAM_NAME, SAM_PW) == 235, \
        f"{good_ip} was locked out by failures from {bad_ip}"
    after = wait_ip_lines(srv, bad_ip, before + 3)
    assert after >= before + 3, f"journal lines naming {bad_ip}: {before} before, {after} after 3 failures"
    # The journal tells the administrator why: failed logins, not an overlong command (R9).
    wrong = [line for line in journal_lines(srv) if has_ip(line, bad_ip) and "beyond the limits" in line]
    assert not wrong, "the login lockout is journaled as an overlong command line:\n" + "\n".join(wrong)


def test_pop3_failures_lock_out_the_address(make_tls_server):
    """A5: three wrong POP3 passwords from 127.0.0.7 (-ERR each, journaled): then the right
    password from 127.0.0.7 is refused, while 127.0.0.8 logs in."""
    srv = make_tls_server(penalty=PENALTY)
    bad_ip, good_ip = "127.0.0.7", "127.0.0.8"
    before = ip_lines(srv, bad_ip)
    for i in range(3):
        got = pop_login_from(srv, bad_ip, SAM_NAME, WRONG)
        assert isinstance(got, bytes) and got.startswith(b"-ERR"), \
            f"wrong password #{i + 1} from {bad_ip}: {got!r}"
    got = pop_login_from(srv, bad_ip, SAM_NAME, SAM_PW)
    assert got != b"+OK", f"{bad_ip} logged in right after 3 failures (login_failures = 3)"
    assert pop_login_from(srv, good_ip, SAM_NAME, SAM_PW) == b"+OK", \
        f"{good_ip} was locked out by failures from {bad_ip}"
    after = wait_ip_lines(srv, bad_ip, before + 3)
    assert after >= before + 3, f"journal lines naming {bad_ip}: {before} before, {after} after 3 failures"


def test_fewer_failures_than_the_limit_do_not_lock_out(make_tls_server):
    """A5: two wrong passwords (below login_failures = 3) then the right one: logged in."""
    srv = make_tls_server(penalty=PENALTY)
    ip = "127.0.0.11"
    for _ in range(2):
        assert smtp_auth_from(srv, ip, SAM_NAME, WRONG) == 535
    assert smtp_auth_from(srv, ip, SAM_NAME, SAM_PW) == 235


def test_relay_listed_network_is_not_banned_only_the_user(make_tls_server):
    """A5/R9 (NAT): 127.0.0.0/8 is relay-listed. Three wrong passwords for sam from 127.0.0.9 do
    not lock out the office address: admin still logs in from there, but sam (even with the right
    password) is refused for the cool-down."""
    srv = make_tls_server(penalty=PENALTY, relay_list=["127.0.0.0/8"])
    ip = "127.0.0.9"
    for i in range(3):
        got = smtp_auth_from(srv, ip, SAM_NAME, WRONG)
        assert got == 535, f"wrong password #{i + 1} for sam: expected 535, got {got!r}"
    assert smtp_auth_from(srv, ip, ADMIN_NAME, ADMIN_PW) == 235, \
        f"the relay-listed address {ip} was banned as a whole"
    got = smtp_auth_from(srv, ip, SAM_NAME, SAM_PW)
    assert got != 235, "sam logged in right after 3 failures for sam (login_failures = 3)"


# ------------------------------------------------------------------------------------------
# No user enumeration by timing
# ------------------------------------------------------------------------------------------

def _timed_pass(srv, ip: str, user: str) -> float:
    """Seconds between sending PASS (wrong password) and the -ERR, over POP3 from `ip`."""
    p = pop_plain(srv.pop3, ip, timeout=30)
    try:
        assert p.greeting.startswith(b"+OK"), p.greeting
        r = p.cmd(f"USER {user}")
        assert r.startswith(b"+OK"), f"USER {user}: {r!r} (USER must not reveal unknown users)"
        t0 = time.perf_counter()
        r = p.cmd(f"PASS {WRONG}")
        dt = time.perf_counter() - t0
        assert r.startswith(b"-ERR"), r
        return dt
    finally:
        p.close()


@pytest.mark.timeout(150)
def test_wrong_password_timing_does_not_reveal_users(make_tls_server):
    """A5/D1: the median time to refuse a wrong password is about the same for an existing user
    and a nonexistent one (within 50%): the password hash is checked either way. Five of each,
    interleaved, each from its own address (no lockout); up to three rounds, against noise."""
    srv = make_tls_server(penalty={**PENALTY, "login_failures": 100})
    n = 0
    rounds = []
    for _ in range(3):
        real, ghost = [], []
        for i in range(6):
            order = [("real", SAM_NAME), ("ghost", "nobody-here")]
            if i % 2:
                order.reverse()
            for kind, user in order:
                n += 1
                dt = _timed_pass(srv, f"127.0.3.{n}", user)
                if i == 0:
                    continue  # warm-up pair
                (real if kind == "real" else ghost).append(dt)
        a, b = statistics.median(real), statistics.median(ghost)
        rounds.append((a, b))
        if max(a, b) < 1.5 * min(a, b):
            return
    pytest.fail("median time of a wrong password, existing vs nonexistent user, differs by 50% or "
                "more in every round: " + ", ".join(f"{a * 1000:.1f} ms vs {b * 1000:.1f} ms" for a, b in rounds))
