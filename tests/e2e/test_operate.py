"""Operating the server (SPEC O2 status, O3 shutdown and logs, F4 journal, F5 storage threshold,
D2 quota)."""

from __future__ import annotations

import json
import queue
import re
import select
import signal
import smtplib
import sqlite3
import subprocess
import threading
import time

import pytest

from conftest import SAM
from helpers import (
    BIN,
    assert_delivered_exactly_once,
    CLIENT_NAME,
    JANE,
    db_path,
    expect,
    fetch_all,
    mailbox_count,
    make_message,
    pop_login,
    queue_entries,
    rewrite_config,
    smtp_session,
    subject_of,
    submit,
    wait_for_subjects,
    wait_journal,
)

NAME, ADDR, PW = SAM
BOB = ("bob", "bob@example.test", "bob-secret-1")


# ------------------------------------------------------------------------------------------
# O2: status
# ------------------------------------------------------------------------------------------

def _line_with(out: str, pattern: str) -> str | None:
    for line in out.splitlines():
        if re.search(pattern, line, re.I):
            return line
    return None


def test_status_all_up(sam):
    """O2: `status` exits 0 and prints each listener with its address and "up", the framework
    worker and the outbound client, the queue depths and the oldest message's age."""
    _wait_status_ok(sam)  # right after start: test_status_up_as_soon_as_ready
    r = sam.cli("status")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    out = r.stdout
    for name in ("smtp", "pop3"):
        host, port = sam.listeners[name]
        line = _line_with(out, re.escape(f"{host}:{port}"))
        assert line, f"status does not show {name} at {host}:{port}:\n{out}"
        assert re.search(rf"(?i)\b{name}\b", line) and re.search(r"(?i)\bup\b", line), line
        assert not re.search(r"(?i)\bdown\b", line), line
    fw = _line_with(out, r"framework")
    assert fw and re.search(r"(?i)\b(up|running)\b", fw), f"no framework line saying up:\n{out}"
    client = _line_with(out, r"outbound|smtp client|\bclient\b")
    assert client and re.search(r"(?i)\b(up|running)\b", client), f"no outbound client line saying up:\n{out}"
    assert re.search(r"(?i)bounce", out), f"no bounce queue depth:\n{out}"
    assert re.search(r"(?i)oldest", out), f"no oldest-message age:\n{out}"
    assert not re.search(r"(?i)\bdown\b", out), out


def _wait_status_ok(srv, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = srv.cli("status")
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, f"status not 0 after {timeout}s:\n{r.stdout}{r.stderr}"
        time.sleep(0.2)


def test_status_up_as_soon_as_ready(make_server):
    """O2: as soon as `serve` is ready (it wrote data_dir/listening), `status` says everything
    is up and exits 0 - a script that starts the server and then checks it must not see DOWN."""
    srv = make_server()
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        r = srv.cli("status")
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        time.sleep(0.1)


def _delivery_depth(out: str) -> int | None:
    m = (re.search(r"(?i)(\d+)\s+(?:messages?\s+)?(?:waiting\s+)?for\s+delivery", out)
         or re.search(r"(?i)deliver\w*\b[^0-9\n]{0,40}?(\d+)", out))
    return int(m.group(1)) if m else None


def test_status_shows_waiting_mail(make_server):
    """O2: a message waiting for delivery (its mail router is down) shows in the delivery queue
    depth and gives an oldest age."""
    srv = make_server(start=False, relay={"mode": "list"},
                      delivery={"mail_router": "127.0.0.1:9"})
    srv.cli_ok("list", "add", "relay", "127.0.0.0/8")
    srv.start()
    _wait_status_ok(srv)
    before = srv.cli_ok("status").stdout
    assert _delivery_depth(before) == 0, f"empty server shows a delivery depth other than 0:\n{before}"
    submit(srv, "someone@far.example", make_message("waiting", to="someone@far.example"))
    deadline = time.monotonic() + 15
    while True:
        out = srv.cli_ok("status").stdout
        if (_delivery_depth(out) or 0) >= 1:
            break
        assert time.monotonic() < deadline, f"status never shows the waiting message:\n{out}"
        time.sleep(0.3)
    time.sleep(2.2)
    oldest = _line_with(srv.cli_ok("status").stdout, "oldest")
    assert oldest and re.search(r"\d", oldest), f"no age on the oldest line: {oldest!r}"


@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
def test_status_when_server_down(sam, how):
    """O2: with the server stopped, `status` exits 1 and says the server is down."""
    if how == "sigterm":
        sam.stop()
    else:
        sam.kill()
    r = sam.cli("status", timeout=30)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert re.search(r"(?i)\bdown\b|not running", r.stdout + r.stderr), (r.stdout, r.stderr)


# ------------------------------------------------------------------------------------------
# O3: graceful shutdown, logs
# ------------------------------------------------------------------------------------------

N = 200
THREADS = 8


def _sender(srv, work, acked, attempted, lock):
    conn = None
    try:
        conn = smtplib.SMTP(srv.smtp[0], srv.smtp[1], local_hostname=CLIENT_NAME, timeout=30)
        while True:
            try:
                subject = work.get_nowait()
            except queue.Empty:
                return
            with lock:
                attempted.append(subject)
            conn.sendmail(JANE, [ADDR], make_message(subject))
            with lock:
                acked.append(subject)
    except (smtplib.SMTPException, OSError):
        return
    finally:
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass


@pytest.mark.timeout(180)
def test_sigterm_under_load_loses_nothing(sam):
    """O3: SIGTERM while 8 clients send: the server exits 0 within 10 s; after a restart every
    message that got 250 is delivered exactly once, any other at most once."""
    work = queue.Queue()
    subjects = [f"term-{i:03d}" for i in range(N)]
    for s in subjects:
        work.put(s)
    acked, attempted = [], []
    lock = threading.Lock()
    threads = [threading.Thread(target=_sender, args=(sam, work, acked, attempted, lock), daemon=True)
               for _ in range(THREADS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    while True:
        with lock:
            n = len(acked)
        if n >= N // 2:
            break
        assert any(t.is_alive() for t in threads), f"senders stopped after {n} messages"
        assert time.monotonic() < deadline, f"only {n} messages acknowledged in 90 s"
        time.sleep(0.005)
    proc = sam.proc
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        status = proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("server still running 15 s after SIGTERM")
    took = time.monotonic() - t0
    for t in threads:
        t.join(30)
    assert status == 0, f"exit status {status} after SIGTERM"
    assert took <= 11, f"SIGTERM took {took:.1f} s"
    sam.stop()
    with lock:
        acked_set = set(acked)
    assert len(acked_set) < N, "SIGTERM came too late to test anything"

    sam.start()
    assert_delivered_exactly_once(sam, NAME, PW, acked_set, subjects, "SIGTERM")


def _mid_data_session(srv):
    c = smtp_session(srv)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.cmd("DATA"), 354)
    c.send(make_message("never finished")[:-2] + b"\r\nhalf a line")
    return c


def test_second_sigterm_exits_at_once(sam):
    """O3: a session held open mid-DATA; SIGTERM, then SIGTERM again: the server exits within
    3 s of the second one; the unfinished message is never delivered."""
    c = _mid_data_session(sam)
    proc = sam.proc
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        pytest.fail("server still running 3 s after the second SIGTERM")
    finally:
        c.close()
    sam.stop()
    sam.start()
    submit(sam, ADDR, make_message("after restart"))
    msgs = wait_for_subjects(sam, NAME, PW, ["after restart"])
    assert [subject_of(m) for m in msgs] == ["after restart"]


def test_sigterm_with_stalled_client_exits_in_time(sam):
    """O3: one SIGTERM with a client stalled mid-DATA: the server does not wait for it forever;
    it exits with status 0 within about 10 s."""
    c = _mid_data_session(sam)
    proc = sam.proc
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        status = proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("server still running 30 s after SIGTERM (a stalled client holds it)")
    finally:
        c.close()
    took = time.monotonic() - t0
    assert took <= 12, f"a stalled client delayed the exit by {took:.1f} s (expected about 10 s)"
    assert status == 0, status


def test_json_logs(make_server):
    """O3: [log] format = "json": every line the server writes to stderr is a JSON object."""
    srv = make_server(start=False, log={"format": "json"})
    srv.add_user(*SAM)
    srv.start()
    submit(srv, ADDR, make_message("json logging"))
    wait_for_subjects(srv, NAME, PW, ["json logging"])
    assert srv.stop() == 0
    lines = [ln for ln in srv.stderr_path.read_text(errors="replace").splitlines()
             if ln.strip() and not ln.startswith("===== start")]
    assert lines, "the server logged nothing"
    bad = []
    for ln in lines:
        try:
            if not isinstance(json.loads(ln), dict):
                bad.append(ln)
        except ValueError:
            bad.append(ln)
    assert not bad, f"{len(bad)} of {len(lines)} stderr lines are not JSON objects: {bad[:5]}"


# ------------------------------------------------------------------------------------------
# F4: journal
# ------------------------------------------------------------------------------------------

CODE_RE = re.compile(r"[+-]\d{4}\s+(\S+)\s")


def _codes(out: str) -> list[str]:
    return [m.group(1) for m in (CODE_RE.search(ln) for ln in out.splitlines()) if m]


def _lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.strip()]


def test_journal_code_filter(sam):
    """F4: `journal --code 94` shows only receive entries."""
    submit(sam, ADDR, make_message("code filter"))
    wait_for_subjects(sam, NAME, PW, ["code filter"])
    wait_journal(sam, lambda ln: True, code="B8")
    allc = _codes(sam.cli_ok("journal").stdout)
    assert "94" in allc and "B8" in allc, allc
    out = sam.cli_ok("journal", "--code", "94").stdout
    assert _lines(out), "journal --code 94 printed nothing"
    assert set(_codes(out)) == {"94"}, out


def test_journal_message_filter(sam):
    """F4: `journal --message QID` shows that message's entries (receive, delivery) and no other."""
    q1 = submit(sam, ADDR, make_message("first"))
    q2 = submit(sam, ADDR, make_message("second"))
    wait_for_subjects(sam, NAME, PW, ["first", "second"])
    wait_journal(sam, lambda ln: q1 in ln, code="B8")
    out = sam.cli_ok("journal", "--message", q1).stdout
    lines = _lines(out)
    assert lines and all(q1 in ln for ln in lines), out
    assert q2 not in out, out
    assert {"94", "B8"} <= set(_codes(out)), out


def test_journal_since(sam):
    """F4: `journal --since 1h` shows recent entries and not older ones (entries of the first
    message are made two hours old in the database)."""
    q_old = submit(sam, ADDR, make_message("old one"))
    wait_for_subjects(sam, NAME, PW, ["old one"])
    wait_journal(sam, lambda ln: q_old in ln, code="B8")
    con = sqlite3.connect(str(db_path(sam)), timeout=10)
    try:
        with con:
            n = con.execute("UPDATE journal SET at = at - 7200 WHERE qid = ?", (q_old,)).rowcount
    finally:
        con.close()
    assert n >= 2
    q_new = submit(sam, ADDR, make_message("new one"))
    wait_for_subjects(sam, NAME, PW, ["new one"])
    out = sam.cli_ok("journal", "--since", "1h").stdout
    assert q_new in out, out
    assert q_old not in out, out
    assert q_old in sam.cli_ok("journal", "--since", "3h").stdout


def test_journal_follow(sam):
    """F4: `journal --follow` keeps running and prints entries of a message sent after it
    started."""
    proc = subprocess.Popen([str(BIN), "--config", str(sam.config_path), "journal", "--follow"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, f"journal --follow exited {proc.returncode}: {proc.stderr.read()!r}"
        qid = submit(sam, ADDR, make_message("followed"))
        buf = b""
        deadline = time.monotonic() + 15
        while qid.encode() not in buf:
            left = deadline - time.monotonic()
            assert left > 0, f"journal --follow printed nothing about {qid} in 15 s: {buf[-2000:]!r}"
            r, _, _ = select.select([proc.stdout], [], [], left)
            if r:
                chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.readline()
                assert chunk, f"journal --follow ended (status {proc.poll()})"
                buf += chunk
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)


def test_journal_disabled(make_server):
    """F4: [journal] enabled = false: mail flows and no journal rows are written."""
    srv = make_server(start=False, journal={"enabled": False})
    srv.add_user(*SAM)
    srv.start()
    qid = submit(srv, ADDR, make_message("unjournaled"))
    wait_for_subjects(srv, NAME, PW, ["unjournaled"])
    time.sleep(1)
    out = srv.cli_ok("journal").stdout
    assert qid not in out and not _codes(out), f"journal written while disabled:\n{out}"


# ------------------------------------------------------------------------------------------
# F5: storage threshold
# ------------------------------------------------------------------------------------------

def _refused_431(srv) -> object:
    c = smtp_session(srv)
    try:
        r = c.cmd(f"MAIL FROM:<{JANE}>")
        if r.code == 250:
            r = c.cmd(f"RCPT TO:<{ADDR}>")
        return r if r.code == 452 else None
    finally:
        c.quit()


def test_low_disk_answers_452_and_recovers(make_server):
    """F5: min_free_mb above the disk's free space: MAIL FROM or RCPT gets 452 4.3.1, nothing
    is queued, the journal has 7L; after a restart with min_free_mb = 0 mail is accepted."""
    srv = make_server(start=False, storage={"min_free_mb": 10**9})
    srv.add_user(*SAM)
    srv.start()
    deadline = time.monotonic() + 15
    while True:
        r = _refused_431(srv)
        if r is not None:
            break
        assert time.monotonic() < deadline, "mail still accepted with min_free_mb = 10^9"
        time.sleep(0.5)
    expect(r, 452, "4.3.1")
    c = smtp_session(srv)
    r1 = c.cmd(f"MAIL FROM:<{JANE}>")
    if r1.code == 250:
        expect(c.cmd(f"RCPT TO:<{ADDR}>"), 452, "4.3.1")
        d = c.cmd("DATA")
        assert d.code >= 500 or d.code == 452 or d.code == 503, d
    else:
        expect(r1, 452, "4.3.1")
    c.quit()
    wait_journal(srv, lambda ln: True, code="7L", timeout=10)
    assert queue_entries(srv) == [], srv.cli("queue", "list").stdout
    rewrite_config(srv, {"storage": {"min_free_mb": 0}})
    srv.restart()
    submit(srv, ADDR, make_message("space again"))
    msgs = wait_for_subjects(srv, NAME, PW, ["space again"])
    assert [subject_of(m) for m in msgs] == ["space again"]


# ------------------------------------------------------------------------------------------
# D2: quota
# ------------------------------------------------------------------------------------------

def _rcpt(srv, rcpt: str):
    c = smtp_session(srv)
    try:
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        return c.cmd(f"RCPT TO:<{rcpt}>")
    finally:
        c.quit()


def _eventually_code(srv, rcpt: str, code: int, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        r = _rcpt(srv, rcpt)
        if r.code == code or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_quota_full_mailbox_gets_452_until_mail_deleted(sam):
    """D2: with a quota of 1000 bytes, a mailbox holding >= 1000 bytes makes RCPT answer
    452 4.2.2; after the user deletes mail over POP3 RCPT is accepted again; `user show` shows
    the quota."""
    sam.cli_ok("user", "quota", NAME, "1000")
    show = sam.cli_ok("user", "show", NAME).stdout
    assert re.search(r"(?i)quota", show) and re.search(r"1\s?000|1000", show), show
    submit(sam, ADDR, make_message("big one", body="x" * 2000 + "\r\n"))
    wait_for_subjects(sam, NAME, PW, ["big one"])
    expect(_eventually_code(sam, ADDR, 452), 452, "4.2.2")
    p = pop_login(sam, NAME, PW)
    p.dele(1)
    p.quit()
    expect(_eventually_code(sam, ADDR, 250), 250)
    submit(sam, ADDR, make_message("fits again"))
    wait_for_subjects(sam, NAME, PW, ["fits again"])


def test_quota_none_lifts_the_limit(sam):
    """D2: `user quota NAME none` removes the limit: RCPT accepted again; `user show` no longer
    shows the old number."""
    sam.cli_ok("user", "quota", NAME, "500")
    submit(sam, ADDR, make_message("fills it", body="y" * 1000 + "\r\n"))
    wait_for_subjects(sam, NAME, PW, ["fills it"])
    expect(_eventually_code(sam, ADDR, 452), 452, "4.2.2")
    sam.cli_ok("user", "quota", NAME, "none")
    expect(_eventually_code(sam, ADDR, 250), 250)
    show = sam.cli_ok("user", "show", NAME).stdout
    assert not re.search(r"(?i)quota\D*500\b", show), show


def test_quota_refuses_only_the_full_mailbox(sam):
    """D2: one transaction to a full mailbox and another: the full one gets 452 4.2.2, the
    other gets the message, the full mailbox does not."""
    sam.add_user(*BOB)
    sam.cli_ok("user", "quota", NAME, "300")
    submit(sam, ADDR, make_message("first fill", body="z" * 600 + "\r\n"))
    wait_for_subjects(sam, NAME, PW, ["first fill"])
    deadline = time.monotonic() + 5
    while True:
        c = smtp_session(sam)
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        r = c.cmd(f"RCPT TO:<{ADDR}>")
        if r.code == 452 or time.monotonic() > deadline:
            break
        c.quit()
        time.sleep(0.2)
    expect(r, 452, "4.2.2")
    expect(c.cmd(f"RCPT TO:<{BOB[1]}>"), 250)
    expect(c.data(make_message("only bob")), 250)
    c.quit()
    wait_for_subjects(sam, BOB[0], BOB[2], ["only bob"])
    time.sleep(1)
    assert [subject_of(m) for m in fetch_all(sam, NAME, PW)] == ["first fill"]


def test_quota_errors(sam):
    """INTERFACE: quota for an unknown user exits 1 naming it; a non-number is refused."""
    r = sam.cli("user", "quota", "nosuchuser", "1000")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "nosuchuser" in r.stderr
    r = sam.cli("user", "quota", NAME, "lots")
    assert r.returncode in (1, 2), (r.returncode, r.stdout, r.stderr)
    assert mailbox_count(sam, NAME, PW) == 0


# ------------------------------------------------------------------------------------------
# Open-file limit (S4: the session limits only hold if every session can have a descriptor)
# ------------------------------------------------------------------------------------------

def _open_file_limit(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def test_soft_open_file_limit_is_raised_to_the_hard_one(make_server):
    """A soft limit of 300 (a common default is 1024) cannot hold 200 SMTP + 200 POP3 sessions:
    the server raises it to the hard limit, and says nothing about it."""
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1000:
        pytest.skip(f"hard open-file limit {hard} here")
    srv = make_server(start=False)
    srv.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
    srv.start()
    assert _open_file_limit(srv.proc.pid) == (hard, hard)
    assert "open-file limit" not in srv.stderr_text()


def test_open_file_limit_too_low_for_the_sessions_is_reported(make_server):
    """With a hard limit of 300 the server still runs, but warns which settings do not fit."""
    import resource
    srv = make_server(start=False)
    srv.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))
    srv.start()
    assert _open_file_limit(srv.proc.pid) == (300, 300)
    log = srv.stderr_text()
    assert "open-file limit is below smtp.max_sessions + pop3.max_sessions" in log, log
    # 200 MX + 50 local socket + 200 POP3 sessions + 20 outbound + 256 reserve (the test
    # configuration runs no submission listener).
    assert "limit=300" in log and "wanted=726" in log, log
    assert "\x1b[" not in log, "colour escape codes in a log that is not a terminal"
