"""Greylisting (issue 21, postgrey's behaviour), against the real binary.

Servers here use `[greylist] enabled = true, delay_secs = 2`: the server has no test hook, the
tests wait the 2 seconds. Every loopback client (127.0.0.x) is in the network 127.0.0.0/24, so
each test has its own server and database; clients connect from chosen 127.0.0.x addresses.

Issue 21 is done when greylisting holds a new triplet and lets its retry through after the
delay: test_new_triplet_is_held_and_its_retry_after_the_delay_is_delivered.
"""

from __future__ import annotations

import re
import smtplib
import time

from conftest import SAM
from helpers import (
    CLIENT_NAME,
    JANE,
    expect,
    journal_lines,
    make_message,
    pop_login_from,
    smtp_from,
    subject_of,
    wait_for_subjects,
    wait_journal,
)

NAME, ADDR, PW = SAM
DELAY = 2
GREYLIST = {"enabled": True, "delay_secs": DELAY}
BOB = "bob@remote.example"


def greylist_server(make_server, greylist: dict | None = None, relay_listed: str | None = None, **overrides):
    """A server with greylisting as `greylist` says (GREYLIST by default) and Sam enrolled."""
    srv = make_server(start=False, greylist=greylist if greylist is not None else dict(GREYLIST), **overrides)
    srv.add_user(*SAM)
    if relay_listed:
        srv.cli_ok("list", "add", "relay", relay_listed)
    return srv.start()


def attempt(srv, ip: str, rcpts, sender: str = JANE, subject: str | None = None):
    """One session from `ip`: MAIL FROM `sender`, RCPT TO each of `rcpts`; when every RCPT got
    250 and `subject` is given, DATA too. Returns the RCPT replies (and the DATA reply or None)."""
    rcpts = [rcpts] if isinstance(rcpts, str) else rcpts
    c = smtp_from(srv, ip)
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{sender}>"), 250)
        replies = [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
        data = None
        if subject is not None and all(r.code == 250 for r in replies):
            data = expect(c.data(make_message(subject, sender=sender)), 250)
        return replies, data
    finally:
        c.quit()


def explain_greylist(srv, ip: str, sender: str, rcpt: str):
    """`postroom explain`'s greylist line for the triplet, and its exit status."""
    r = srv.cli("explain", "--ip", ip, "--from", sender, "--to", rcpt)
    assert r.returncode in (0, 1), (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stdout.splitlines() if line.startswith("greylist ")]
    assert len(lines) == 1, r.stdout
    return lines[0], r.returncode


def assert_greylisted(reply, wait: int | None = None):
    assert reply.code == 450 and reply.enhanced == "4.2.0", reply
    assert len(reply.lines) == 1, reply
    m = re.fullmatch(r"4\.2\.0 Greylisted: try again in (\d+) seconds", reply.lines[0])
    assert m, reply
    if wait is not None:
        assert int(m.group(1)) <= wait, reply


def test_new_triplet_is_held_and_its_retry_after_the_delay_is_delivered(make_server):
    """Issue 21: the first attempt gets 450 4.2.0 at RCPT, an immediate retry 450 again (the
    delay still counts from the first), the retry after the delay is accepted and delivered;
    9G and 9P journaled with the triplet's network."""
    srv = greylist_server(make_server)
    (first,), _ = attempt(srv, "127.0.0.5", ADDR)
    assert_greylisted(first, DELAY)
    (again,), _ = attempt(srv, "127.0.0.5", ADDR)
    assert_greylisted(again, DELAY)
    time.sleep(DELAY + 0.5)
    (passed,), data = attempt(srv, "127.0.0.5", ADDR, subject="after the delay")
    expect(passed, 250)
    assert data is not None
    wait_for_subjects(srv, NAME, PW, ["after the delay"])
    # Known from now on: the next message passes at once.
    (known,), _ = attempt(srv, "127.0.0.5", ADDR, subject="known triplet")
    expect(known, 250)
    wait_for_subjects(srv, NAME, PW, ["after the delay", "known triplet"])
    held = wait_journal(srv, lambda line: "127.0.0.0/24" in line and "new triplet" in line, code="9G")
    assert any(JANE in line for line in held), held
    assert any("still greylisted" in line for line in journal_lines(srv, "9G"))
    wait_journal(srv, lambda line: "greylisting passed" in line, code="9P")


def test_a_neighbour_in_the_same_24_shares_the_triplet(make_server):
    """Issue 21: the triplet is keyed by the client's /24: a retry from 127.0.0.6 passes for a
    first attempt from 127.0.0.5 (a provider's outbound pool), and the null sender is a sender
    of its own."""
    srv = greylist_server(make_server)
    assert_greylisted(attempt(srv, "127.0.0.5", ADDR)[0][0])
    assert_greylisted(attempt(srv, "127.0.0.6", ADDR)[0][0])
    time.sleep(DELAY + 0.5)
    expect(attempt(srv, "127.0.0.6", ADDR)[0][0], 250)
    assert_greylisted(attempt(srv, "127.0.0.6", ADDR, sender="")[0][0])


def test_unknown_user_still_gets_550_and_postmaster_is_not_greylisted(make_server):
    """Issue 21: only mail that would be accepted is greylisted; RFC 5321 §4.5.1: postmaster."""
    srv = greylist_server(make_server)
    (unknown, postmaster), _ = attempt(srv, "127.0.0.5", ["nobody@example.test", "postmaster@example.test"])
    expect(unknown, 550, "5.1.1")
    expect(postmaster, 250)


def test_the_office_own_clients_are_never_greylisted(make_server):
    """Issue 21: an authenticated submission, a relay-listed client and a POP-before-SMTP client
    are accepted at the first attempt; a stranger in the same /24 is greylisted."""
    srv = greylist_server(make_server, relay_listed="127.0.0.10", relay={"pop_minutes": 15},
                          smtp={"submission_listen": ["127.0.0.1:0"]})
    assert srv.submission is not None
    with smtplib.SMTP(*srv.submission, local_hostname=CLIENT_NAME, timeout=30) as s:
        s.ehlo()
        s.login(NAME, PW)
        refused = s.sendmail(ADDR, [ADDR], make_message("submitted", sender=ADDR))
        assert not refused, refused
    expect(attempt(srv, "127.0.0.10", ADDR, subject="relay-listed")[0][0], 250)
    pop_login_from(srv, "127.0.0.30", NAME, PW)
    expect(attempt(srv, "127.0.0.30", ADDR, subject="after POP")[0][0], 250)
    assert_greylisted(attempt(srv, "127.0.0.20", ADDR)[0][0])
    wait_for_subjects(srv, NAME, PW, ["submitted", "relay-listed", "after POP"])
    line, status = explain_greylist(srv, "127.0.0.10", JANE, ADDR)
    assert "not greylisted" in line and "relay list entry 127.0.0.10" in line and status == 0, line


def test_a_client_that_retried_enough_is_auto_allowed(make_server):
    """Issue 21: with auto_allow_after = 2, once two triplets of the /24 passed, a new triplet
    from it is accepted at the first attempt."""
    srv = greylist_server(make_server, greylist={**GREYLIST, "auto_allow_after": 2})
    for sender in (JANE, BOB):
        assert_greylisted(attempt(srv, "127.0.0.5", ADDR, sender=sender)[0][0])
    assert_greylisted(attempt(srv, "127.0.0.5", ADDR, sender="carol@remote.example")[0][0])
    time.sleep(DELAY + 0.5)
    for sender in (JANE, BOB):
        expect(attempt(srv, "127.0.0.5", ADDR, sender=sender)[0][0], 250)
    wait_journal(srv, lambda line: "auto-allowed from now on" in line, code="9P")
    expect(attempt(srv, "127.0.0.7", ADDR, sender="dave@remote.example", subject="auto-allowed")[0][0], 250)
    wait_for_subjects(srv, NAME, PW, ["auto-allowed"])
    line, status = explain_greylist(srv, "127.0.0.9", "erin@remote.example", ADDR)
    assert "client network auto-allowed" in line and status == 0, line


def test_explain_shows_the_triplet_state(make_server):
    """Issue 21: `postroom explain` reads the store: new, waiting, ready to pass, passed before;
    exit 1 while the recipient would be greylisted."""
    srv = greylist_server(make_server)
    line, status = explain_greylist(srv, "127.0.0.5", JANE, ADDR)
    assert "new triplet" in line and "127.0.0.0/24" in line and status == 1, line
    assert "450 4.2.0 Greylisted" in line, line
    assert_greylisted(attempt(srv, "127.0.0.5", ADDR)[0][0])
    line, status = explain_greylist(srv, "127.0.0.77", JANE, ADDR)
    assert "waiting" in line and status == 1, line
    time.sleep(DELAY + 0.5)
    line, status = explain_greylist(srv, "127.0.0.5", JANE, ADDR)
    assert "a retry now passes" in line and status == 0, line
    # explain records nothing: the server still sees the first pass (9P).
    expect(attempt(srv, "127.0.0.5", ADDR)[0][0], 250)
    wait_journal(srv, lambda line: "greylisting passed" in line, code="9P")
    line, status = explain_greylist(srv, "127.0.0.5", JANE, ADDR)
    assert "passed before" in line and status == 0, line


def test_off_by_default_changes_nothing(make_server):
    """Issue 21: without [greylist] the first attempt is accepted; nothing is journaled 9G."""
    srv = greylist_server(make_server, greylist={})
    expect(attempt(srv, "127.0.0.5", ADDR, subject="not greylisted")[0][0], 250)
    wait_for_subjects(srv, NAME, PW, ["not greylisted"])
    assert journal_lines(srv, "9G") == []
    line, status = explain_greylist(srv, "127.0.0.5", JANE, ADDR)
    assert line.startswith(f"greylist {ADDR}: off") and status == 0, line


def test_many_clients_at_once_share_one_triplet_record(make_server):
    """Issue 21 under concurrency: 16 sessions of one /24 racing on a new triplet are all held,
    and only one of them records it as new (the decision and the record are one write); after
    the delay 16 sessions at once all pass, and each message arrives exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    srv = greylist_server(make_server)
    ips = [f"127.0.0.{10 + i}" for i in range(16)]
    with ThreadPoolExecutor(len(ips)) as pool:
        held = list(pool.map(lambda ip: attempt(srv, ip, ADDR)[0][0], ips))
    for reply in held:
        assert_greylisted(reply, DELAY)
    time.sleep(1)
    new = [line for line in journal_lines(srv, "9G") if "127.0.0.0/24" in line and "new triplet" in line]
    assert len(new) == 1, new
    time.sleep(DELAY + 0.5)
    subjects = [f"concurrent {i}" for i in range(len(ips))]
    with ThreadPoolExecutor(len(ips)) as pool:
        results = list(pool.map(lambda a: attempt(srv, a[0], ADDR, subject=a[1]), zip(ips, subjects)))
    for (rcpt,), data in results:
        expect(rcpt, 250)
        assert data is not None
    got = [subject_of(m) for m in wait_for_subjects(srv, NAME, PW, subjects)]
    assert sorted(got) == sorted(subjects), f"each exactly once: {got}"
