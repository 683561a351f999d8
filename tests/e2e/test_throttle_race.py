"""Login throttling under concurrency (SPEC A5, issue 13 item 3): the penalty box reserves an
attempt before the password is checked, so simultaneous wrong passwords from one address get no
more argon2 verifications than the limit; and the argon2 pool gives each client a fair share,
so a flood from a few addresses neither fills the queue for everyone nor starves a login from
elsewhere.

Everything is plaintext over loopback (credentials without TLS are allowed from loopback by
default); clients bind chosen 127.0.0.x source addresses.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from conftest_tls import plain_token
from helpers import CLIENT_NAME, Closed, SourcePop, has_ip, journal_lines, smtp_from

SAM, SAM_PW = "sam", "sam-secret-1"
WRONG = "not-the-password"
LIMIT = 5

POP_BAD = b"-ERR [AUTH]"
POP_TEMP = b"-ERR [SYS/TEMP]"


def enrolled(make_server, **overrides):
    srv = make_server(start=False, **overrides)
    srv.add_user(SAM, ["sam@example.test"], SAM_PW)
    return srv.start()


def login_journal(srv, ip: str) -> list[tuple[str, str]]:
    """(code, detail) of the 9F (SMTP AUTH) and DF (POP3 login) journal lines naming `ip`."""
    out = []
    for code in ("9F", "DF"):
        for line in journal_lines(srv, code):
            m = re.search(r" ip=(\S*) (.*)$", line)
            if m and has_ip(m.group(1), ip):
                out.append((code, m.group(2)))
    return out


def wait_login_journal(srv, ip: str, at_least: int, timeout: float = 10.0) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = login_journal(srv, ip)
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------
# A burst from one address
# ------------------------------------------------------------------------------------------

def test_simultaneous_wrong_passwords_get_at_most_the_limit_of_verifications(make_server):
    """A5: 20 SMTP sessions (AUTH PLAIN) and 20 POP3 sessions (USER/PASS) from 127.0.0.40 send a
    wrong password at the same moment. At most login_failures = 5 of them are verified (535 /
    -ERR [AUTH], journaled as "failed login"); every other one is refused as throttled before any
    argon2 work (454 4.7.0 / -ERR [SYS/TEMP], journaled as refused)."""
    srv = enrolled(make_server, penalty={"login_failures": LIMIT, "login_window_minutes": 15, "deny_minutes": 10})
    ip = "127.0.0.40"
    n_smtp = n_pop = 20
    start = threading.Barrier(n_smtp + n_pop)
    answers: dict[str, list] = {"smtp": [], "pop3": []}
    errors: list[str] = []
    lock = threading.Lock()

    def smtp_one():
        c = None
        try:
            c = smtp_from(srv, ip)
            assert c.greeting.code == 220, c.greeting
            assert c.cmd(f"EHLO {CLIENT_NAME}").code == 250
            start.wait(30)
            r = c.cmd(f"AUTH PLAIN {plain_token(SAM, WRONG)}")
            with lock:
                answers["smtp"].append((r.code, r.enhanced))
        except Exception as e:  # noqa: BLE001  (reported below)
            start.abort()
            with lock:
                errors.append(f"smtp: {e!r}")
        finally:
            if c is not None:
                c.quit()

    def pop_one():
        p = None
        try:
            p = SourcePop(srv.pop3, ip)
            assert p.greeting.startswith(b"+OK"), p.greeting
            assert p.cmd(f"USER {SAM}").startswith(b"+OK")
            start.wait(30)
            r = p.cmd(f"PASS {WRONG}")
            with lock:
                answers["pop3"].append(r)
        except Exception as e:  # noqa: BLE001
            start.abort()
            with lock:
                errors.append(f"pop3: {e!r}")
        finally:
            if p is not None:
                p.close()

    threads = [threading.Thread(target=smtp_one) for _ in range(n_smtp)]
    threads += [threading.Thread(target=pop_one) for _ in range(n_pop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, "sessions failed before or at the burst:\n" + "\n".join(errors[:10])
    assert len(answers["smtp"]) == n_smtp and len(answers["pop3"]) == n_pop, answers

    smtp_failed = [a for a in answers["smtp"] if a[0] == 535]
    smtp_throttled = [a for a in answers["smtp"] if a == (454, "4.7.0")]
    pop_failed = [a for a in answers["pop3"] if a.startswith(POP_BAD)]
    pop_throttled = [a for a in answers["pop3"] if a.startswith(POP_TEMP)]
    assert len(smtp_failed) + len(smtp_throttled) == n_smtp, f"unexpected SMTP answers: {answers['smtp']}"
    assert len(pop_failed) + len(pop_throttled) == n_pop, f"unexpected POP3 answers: {answers['pop3']}"
    verified = len(smtp_failed) + len(pop_failed)
    print(f"\n{verified} wrong passwords verified, {len(smtp_throttled)} SMTP 454 and "
          f"{len(pop_throttled)} POP3 -ERR [SYS/TEMP] (limit {LIMIT})")
    assert 1 <= verified <= LIMIT, (
        f"{verified} of 40 simultaneous wrong passwords from {ip} were verified (535 / -ERR [AUTH]); "
        f"login_failures = {LIMIT}")

    # The journal agrees: every attempt is there, at most LIMIT of them as failed verifications.
    lines = wait_login_journal(srv, ip, n_smtp + n_pop)
    checked = [(c, d) for c, d in lines if d.startswith("failed login")]
    refused = [(c, d) for c, d in lines if not d.startswith("failed login")]
    assert len(checked) <= LIMIT, (
        f"{len(checked)} failed verifications journaled (9F/DF) for {ip}, limit {LIMIT}:\n"
        + "\n".join(f"{c} {d}" for c, d in lines))
    assert len(checked) == verified, (checked, verified)
    assert len(refused) == n_smtp + n_pop - verified, lines
    assert all("refused" in d for _, d in refused), refused


# ------------------------------------------------------------------------------------------
# A flood from a few addresses against a login from elsewhere
# ------------------------------------------------------------------------------------------

ATTACKERS = [f"127.0.0.{50 + i}" for i in range(9)]
LEGIT_IP = "127.0.0.70"


class Flood:
    """Per attacker address, 20 SMTP and 20 POP3 workers that each, until stopped or the
    deadline, open a session and send one wrong password (so every session slot an address has
    holds a pending check)."""

    def __init__(self, srv, addresses, per_protocol: int = 20, deadline: float = 12.0):
        self.srv = srv
        self.stop = threading.Event()
        self.until = time.monotonic() + deadline
        self.lock = threading.Lock()
        self.counts = {"wrong": 0, "throttled": 0, "other": 0}
        self.threads = [
            threading.Thread(target=fn, args=(ip,), daemon=True)
            for ip in addresses
            for fn in (self.smtp_worker, self.pop_worker)
            for _ in range(per_protocol)
        ]

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.until

    def count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1

    def smtp_worker(self, ip: str) -> None:
        while self.running():
            c = None
            try:
                c = smtp_from(self.srv, ip, timeout=5)
                if c.greeting.code != 220 or c.cmd(f"EHLO {CLIENT_NAME}").code != 250:
                    self.count("other")
                    time.sleep(0.05)
                    continue
                code = c.cmd(f"AUTH PLAIN {plain_token(SAM, WRONG)}").code
                self.count("wrong" if code == 535 else "throttled" if code == 454 else "other")
            except (Closed, OSError):
                self.count("other")
                time.sleep(0.05)
            finally:
                if c is not None:
                    c.close()

    def pop_worker(self, ip: str) -> None:
        while self.running():
            p = None
            try:
                p = SourcePop(self.srv.pop3, ip, timeout=5)
                if not p.greeting.startswith(b"+OK") or not p.cmd(f"USER {SAM}").startswith(b"+OK"):
                    self.count("other")
                    time.sleep(0.05)
                    continue
                r = p.cmd(f"PASS {WRONG}")
                self.count("wrong" if r.startswith(POP_BAD) else "throttled" if r.startswith(POP_TEMP) else "other")
            except (Closed, OSError):
                self.count("other")
                time.sleep(0.05)
            finally:
                if p is not None:
                    p.close()

    def __enter__(self) -> "Flood":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


@pytest.mark.timeout(120)
def test_a_flood_from_nine_addresses_does_not_starve_a_legitimate_login(make_server):
    """A5: nine attacker addresses keep every session slot they may have (20 SMTP + 20 POP3
    each, 360 in all: more than the argon2 queue holds) busy with wrong passwords; the failure
    limit is set high so none of them is locked out and the pool's fairness alone is tested.
    A POP3 login with the right password from a tenth address still succeeds: each attacker has
    only its share of the queue. The latency is printed, not asserted."""
    srv = enrolled(make_server, penalty={"login_failures": 100_000, "login_window_minutes": 15, "deny_minutes": 10})
    with Flood(srv, ATTACKERS) as flood:
        # Let the flood build up: the queue is as full as the attackers can make it.
        time.sleep(2.0)
        with flood.lock:
            before = dict(flood.counts)
        p = SourcePop(srv.pop3, LEGIT_IP, timeout=30)
        try:
            assert p.greeting.startswith(b"+OK"), p.greeting
            assert p.cmd(f"USER {SAM}").startswith(b"+OK")
            t0 = time.perf_counter()
            r = p.cmd(f"PASS {SAM_PW}")
            latency = time.perf_counter() - t0
            if r.startswith(b"+OK"):
                p.cmd("QUIT")
        finally:
            p.close()
        time.sleep(0.5)
    print(f"\nlegitimate POP3 login from {LEGIT_IP} during the flood: {r!r} after {latency * 1000:.0f} ms; "
          f"attacker answers before it {before}, in all {flood.counts}")
    assert r.startswith(b"+OK"), (
        f"the legitimate login from {LEGIT_IP} was refused during a flood from {len(ATTACKERS)} addresses "
        f"after {latency * 1000:.0f} ms: {r!r} (attacker answers: {flood.counts})")
    assert flood.counts["wrong"] > 0, f"the flood never got a password checked: {flood.counts}"
