"""POP3 server (SPEC §7): poplib, raw sockets and curl."""

import poplib
import re
import shutil
import subprocess
import time

import pytest

from conftest import SAM
from helpers import (
    RawPop,
    fetch_all,
    login_retry,
    make_message,
    pop_connect,
    pop_login,
    pop_login_fails,
    retr,
    send_mail,
    strip_trace,
    subject_of,
    wait_for_count,
    wait_for_subjects,
)

NAME, ADDR, PW = SAM

BODIES = [
    b"First message.\r\nIt has two lines.\r\n",
    b"Second message\r\n.dotted line\r\n..double dotted\r\n.\r\nafter the lone dot\r\n",
    b"Third\r\nline 2\r\nline 3\r\nline 4\r\nline 5\r\n",
]


@pytest.fixture
def mailbox(sam):
    """Sam's maildrop holding three messages (subjects m1, m2, m3, in that order)."""
    sent = []
    for i, body in enumerate(BODIES, 1):
        msg = make_message(f"m{i}", body)
        send_mail(sam, ADDR, msg)
        sent.append(msg)
        wait_for_count(sam, NAME, PW, i)
    return sam, sent


def test_capa_lists_top_uidl_user(server):
    """P1 (RFC 2449): CAPA lists TOP, UIDL and USER."""
    p = pop_connect(server)
    caps = p.capa()
    p.quit()
    for cap in ("TOP", "UIDL", "USER"):
        assert cap in caps, caps


def test_transaction_commands_need_login(sam):
    """P1 (RFC 1939 §4): STAT, LIST, RETR, DELE before login are refused; PASS needs USER first."""
    p = RawPop(sam.pop3)
    assert p.greeting.startswith(b"+OK"), p.greeting
    for cmd in ("STAT", "LIST", "RETR 1", "DELE 1", "UIDL", "TOP 1 0"):
        r = p.cmd(cmd)
        assert r.startswith(b"-ERR"), (cmd, r)
    assert p.cmd(f"PASS {PW}").startswith(b"-ERR")
    p.login(NAME, PW)
    assert p.cmd("STAT").startswith(b"+OK 0 0")
    assert p.cmd("QUIT").startswith(b"+OK")
    p.close()


def test_stat_list_retr_exact_octets(mailbox):
    """P1, P4: STAT and LIST give exact octet counts (RFC 1939: CRLF line ends, before
    dot-stuffing); RETR returns the messages in delivery order, byte-exact."""
    srv, sent = mailbox
    p = pop_login(srv, NAME, PW)
    count, total = p.stat()
    assert count == 3
    _, listing, _ = p.list()
    sizes = {}
    for line in listing:
        n, size = line.split()
        sizes[int(n)] = int(size)
    assert sorted(sizes) == [1, 2, 3]
    assert sum(sizes.values()) == total
    for n in (1, 2, 3):
        assert int(p.list(n).split()[2]) == sizes[n]
        _, lines, octets = p.retr(n)
        content = b"".join(line + b"\r\n" for line in lines)
        assert sizes[n] == len(content) == octets, f"message {n}"
        assert strip_trace(content) == sent[n - 1]
    assert p.noop().startswith(b"+OK")
    p.quit()


def test_retr_on_the_wire_is_dot_stuffed_crlf(mailbox):
    """P4: on the wire every line ends CRLF and every line starting with '.' is stuffed."""
    srv, sent = mailbox
    p = RawPop(srv.pop3)
    p.login(NAME, PW)
    listed = p.cmd("LIST 2")
    assert listed.startswith(b"+OK"), listed
    size = int(listed.split()[2])
    assert p.cmd("RETR 2").startswith(b"+OK")
    lines = p.read_multiline_raw()
    p.cmd("QUIT")
    p.close()
    for line in lines:
        assert line.endswith(b"\r\n") and b"\r" not in line[:-2] and b"\n" not in line[:-2], line
        if line.startswith(b"."):
            assert line.startswith(b".."), f"unstuffed line {line!r}"
    unstuffed = b"".join(line[1:] if line.startswith(b".") else line for line in lines)
    assert len(unstuffed) == size
    assert unstuffed.endswith(sent[1])


def test_top(mailbox):
    """P1: TOP n 0 gives the headers and the blank line; TOP n 2 adds two body lines."""
    srv, sent = mailbox
    p = pop_login(srv, NAME, PW)
    full = p.retr(3)[1]
    blank = full.index(b"")
    _, top0, _ = p.top(3, 0)
    _, top2, _ = p.top(3, 2)
    p.quit()
    assert top0 == full[: blank + 1]
    assert top2 == full[: blank + 3]
    assert top2[-2:] == [b"Third", b"line 2"]


def test_uidl(mailbox):
    """P4: UIDL gives one unique id per message, 1-70 chars in 0x21-0x7E; UIDL n agrees."""
    srv, _ = mailbox
    p = pop_login(srv, NAME, PW)
    _, lines, _ = p.uidl()
    uids = {}
    for line in lines:
        n, uid = line.split()
        uids[int(n)] = uid
    assert sorted(uids) == [1, 2, 3]
    assert len(set(uids.values())) == 3
    for n, uid in uids.items():
        assert re.fullmatch(rb"[\x21-\x7e]{1,70}", uid), uid
        assert p.uidl(n).split()[2] == uid
    p.quit()


def test_dele_rset(mailbox):
    """P1: DELE marks, a deleted message cannot be retrieved, STAT excludes it, RSET unmarks."""
    srv, _ = mailbox
    p = pop_login(srv, NAME, PW)
    total = p.stat()[1]
    size1 = int(p.list(1).split()[2])
    assert p.dele(1).startswith(b"+OK")
    assert p.stat() == (2, total - size1)
    with pytest.raises(poplib.error_proto):
        p.retr(1)
    with pytest.raises(poplib.error_proto):
        p.dele(1)
    with pytest.raises(poplib.error_proto):
        p.list(1)
    with pytest.raises(poplib.error_proto):
        p.retr(4)  # no such message
    assert p.rset().startswith(b"+OK")
    assert p.stat() == (3, total)
    p.quit()
    assert len(fetch_all(srv, NAME, PW)) == 3


def test_dele_then_drop_deletes_nothing(mailbox):
    """P3: deletions happen only at QUIT; a dropped connection deletes nothing."""
    srv, _ = mailbox
    p = pop_login(srv, NAME, PW)
    p.dele(1)
    p.dele(2)
    p.close()  # no QUIT
    msgs = [subject_of(m) for m in fetch_all(srv, NAME, PW)]
    assert msgs == ["m1", "m2", "m3"]


def test_dele_quit_deletes(mailbox):
    """P3: DELE + QUIT removes the message for good."""
    srv, _ = mailbox
    p = pop_login(srv, NAME, PW)
    p.dele(2)
    assert p.quit().startswith(b"+OK")
    msgs = [subject_of(m) for m in fetch_all(srv, NAME, PW)]
    assert msgs == ["m1", "m3"]


def test_wrong_password_and_unknown_user_same_error(sam):
    """P1, A5: a wrong password is refused with -ERR; an unknown user gets the same text."""
    replies = []
    for user, pw in ((NAME, "wrong-password"), ("nosuchuser", "whatever-pw")):
        p = RawPop(sam.pop3)
        assert p.greeting.startswith(b"+OK"), p.greeting
        r_user = p.cmd(f"USER {user}")
        r_pass = p.cmd(f"PASS {pw}") if r_user.startswith(b"+OK") else r_user
        p.close()
        replies.append((r_user, r_pass))
    (u1, p1), (u2, p2) = replies
    assert p1.startswith(b"-ERR"), p1
    assert u1[:3] == u2[:3], (u1, u2)
    assert p1 == p2, f"wrong password {p1!r} vs unknown user {p2!r}"
    assert pop_login_fails(sam, NAME, PW) is None  # the real password still works


def test_second_session_in_use_until_quit(mailbox):
    """P3: a second concurrent session gets -ERR [IN-USE]; after the first QUITs a login works."""
    srv, _ = mailbox
    first = pop_login(srv, NAME, PW)
    err = pop_login_fails(srv, NAME, PW, in_use_wait=0)
    assert err is not None and err.startswith(b"-ERR [IN-USE]"), err
    first.quit()
    p = pop_login(srv, NAME, PW, in_use_wait=0)
    assert p.stat()[0] == 3
    p.quit()


def test_login_right_after_quit_is_never_in_use(mailbox):
    """P3: the lock is released before the +OK to QUIT, so a client that logs in as soon as it
    reads that +OK always gets in. The next connection is opened (and USER sent) before the
    QUIT, so its PASS follows the +OK immediately; no retry is allowed."""
    srv, _ = mailbox
    p = pop_login(srv, NAME, PW, in_use_wait=0)
    for _ in range(30):
        nxt = pop_connect(srv)
        nxt.user(NAME)
        retr(p, 1)
        p.quit()
        nxt.pass_(PW)
        p = nxt
    p.quit()


def test_lock_released_when_socket_dropped(mailbox):
    """P3: the lock is released on disconnect, without QUIT."""
    srv, _ = mailbox
    first = pop_login(srv, NAME, PW)
    err = pop_login_fails(srv, NAME, PW, in_use_wait=0)
    assert err is not None and err.startswith(b"-ERR [IN-USE]"), err
    first.close()
    err = pop_login_fails(srv, NAME, PW, in_use_wait=5)
    assert err is None, f"still locked 5 s after the socket was dropped: {err!r}"


def test_maildrop_is_a_snapshot_at_login(sam):
    """P3: a message delivered during a session is not in that session's STAT, but is in the next."""
    sam.add_user("bob", "bob@example.test", "bob-pw-1")
    send_mail(sam, ADDR, make_message("before"))
    wait_for_count(sam, NAME, PW, 1)
    p = pop_login(sam, NAME, PW)
    assert p.stat()[0] == 1
    # Deliver to Sam and Bob in one message; Bob's copy tells us the framework has run.
    send_mail(sam, [ADDR, "bob@example.test"], make_message("during"))
    wait_for_subjects(sam, "bob", "bob-pw-1", ["during"])
    time.sleep(1)
    assert p.stat()[0] == 1
    assert len(p.list()[1]) == 1
    assert len(p.uidl()[1]) == 1
    p.quit()
    msgs = wait_for_subjects(sam, NAME, PW, ["before", "during"])
    assert len(msgs) == 2


def test_uidl_stable_across_sessions_restart_never_reused(mailbox):
    """P4: UIDLs are stable across sessions and a restart, and a new message never reuses the
    UIDL of a deleted one."""
    srv, _ = mailbox

    def uidls():
        p = login_retry(srv, NAME, PW)
        _, lines, _ = p.uidl()
        subjects = [subject_of(retr(p, int(line.split()[0]))) for line in lines]
        p.quit()
        return {s: line.split()[1] for s, line in zip(subjects, lines)}

    first = uidls()
    assert sorted(first) == ["m1", "m2", "m3"]
    assert uidls() == first
    srv.restart()
    assert uidls() == first
    # Delete m1 (the oldest) and m3 (the newest: a reused row id would show here), restart,
    # then new messages arrive: their UIDLs are new.
    p = pop_login(srv, NAME, PW)
    p.dele(1)
    p.dele(3)
    p.quit()
    srv.restart()
    assert uidls() == {"m2": first["m2"]}
    seen = set(first.values())
    for subject in ("m4", "m5"):
        send_mail(srv, ADDR, make_message(subject))
        wait_for_subjects(srv, NAME, PW, [subject])
        after = uidls()
        assert after["m2"] == first["m2"]
        assert after[subject] not in seen, f"{subject} reuses a UIDL: {after} vs {first}"
        seen.add(after[subject])
    # The same holds for a message delivered to another user in between (ids are global).
    srv.add_user("bob", "bob@example.test", "bob-pw-1")
    p = pop_login(srv, NAME, PW)
    p.dele(len(p.uidl()[1]))  # the newest, m5
    p.quit()
    send_mail(srv, "bob@example.test", make_message("for bob"))
    wait_for_subjects(srv, "bob", "bob-pw-1", ["for bob"])
    send_mail(srv, ADDR, make_message("m6"))
    wait_for_subjects(srv, NAME, PW, ["m6"])
    after = uidls()
    assert sorted(after) == ["m2", "m4", "m6"]
    assert after["m6"] not in seen


@pytest.mark.timeout(60)
def test_inactivity_timeout_closes_session(make_server):
    """P6: inactivity_timeout_secs = 2: an idle session is closed, and its lock released."""
    srv = make_server(pop3={"inactivity_timeout_secs": 2})
    srv.add_user(*SAM)
    p = RawPop(srv.pop3)
    p.login(NAME, PW)
    start = time.monotonic()
    closed, got = p.wait_closed(10)
    elapsed = time.monotonic() - start
    p.close()
    assert closed, f"idle session still open after {elapsed:.1f}s (got {got!r})"
    assert 1.5 < elapsed < 6, elapsed
    assert pop_login_fails(srv, NAME, PW) is None


def test_idle_before_login_closes_too(make_server):
    """P6: the inactivity timeout also applies before login."""
    srv = make_server(pop3={"inactivity_timeout_secs": 2})
    p = RawPop(srv.pop3)
    closed, _ = p.wait_closed(10)
    p.close()
    assert closed


# ------------------------------------------------------------------------------------------
# curl as a POP3 client
# ------------------------------------------------------------------------------------------

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def _curl(srv, path):
    url = f"pop3://{srv.pop3[0]}:{srv.pop3[1]}/{path}"
    return subprocess.run([CURL, "-s", "-S", "--max-time", "30", url, "-u", f"{NAME}:{PW}"],
                          capture_output=True, timeout=60)


@needs_curl
def test_curl_lists_messages(mailbox):
    """P1: curl pop3://HOST:PORT/ lists the maildrop as LIST does."""
    srv, _ = mailbox
    r = _curl(srv, "")
    assert r.returncode == 0, r.stderr
    p = pop_login(srv, NAME, PW)
    listing = p.list()[1]
    p.quit()
    assert r.stdout.split(b"\r\n")[:-1] == listing, r.stdout


@needs_curl
def test_curl_retrieves_message(mailbox):
    """P1: curl pop3://HOST:PORT/1 retrieves message 1 exactly."""
    srv, sent = mailbox
    r = _curl(srv, "1")
    assert r.returncode == 0, r.stderr
    assert strip_trace(r.stdout) == sent[0]


def test_utf8_capability_and_command(sam):
    """RFC 6856 (issue 20): CAPA lists UTF8, poplib's utf8() gets +OK before login, and an
    ASCII user logs in after it. User names are ASCII in the directory, so there is no
    `UTF8 USER` tag."""
    send_mail(sam, ADDR, make_message("utf8 pop"))
    wait_for_count(sam, NAME, PW, 1)
    p = pop_connect(sam)
    caps = p.capa()
    assert "UTF8" in caps and caps["UTF8"] == [], caps
    assert p.utf8().startswith(b"+OK"), "UTF8 refused"
    p.user(NAME)
    p.pass_(PW)
    assert p.stat()[0] == 1
    with pytest.raises(poplib.error_proto, match="not valid in this state"):
        p.utf8()
    p.quit()


def test_utf8_user_name_gets_a_clean_err(sam):
    """RFC 6856: after UTF8 a UTF-8 user name is taken, and fails like any unknown name."""
    p = RawPop(sam.pop3)
    assert p.cmd("UTF8").startswith(b"+OK")
    p.send("USER jörg\r\n".encode())
    assert p.read_line().startswith(b"+OK")
    p.send("PASS pässwörd\r\n".encode())
    assert p.read_line().startswith(b"-ERR [AUTH]")
    assert p.cmd("QUIT").startswith(b"+OK")
    p.close()
