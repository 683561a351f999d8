"""Milters (issue 21) with real Debian milters: opendkim signs mail submitted on the submission
listener (verified with dkimpy against the key opendkim-genkey made, no DNS); spamass-milter with
spamd on the MX listener refuses GTUBE and adds X-Spam headers to a plain message; a milter where
nothing listens means 451 4.7.1 (default_action "tempfail") or delivery ("accept").

Every daemon listens on 127.0.0.1 only, on a port the kernel chose, and none reaches the network:
spamd runs with -L (local tests only: no DNS lists, no Razor/Pyzor/DCC), opendkim only signs.
They are started by module fixtures (bounded waits) and killed at teardown.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import dkim
import pytest

from conftest import SAM
from conftest_tls import plain_token
from helpers import (
    CLIENT_NAME,
    SmtpClient,
    expect,
    fetch_all,
    journal_lines,
    make_message,
    queued_id,
    smtp_session,
    wait_for_count,
    wait_journal,
)

NAME, ADDR, PW = SAM

MISSING = [tool for tool in ("opendkim", "opendkim-genkey", "spamass-milter", "spamd", "spamc")
           if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]


@pytest.fixture(autouse=True)
def _the_milters_are_installed():
    # A failure, not a skip: .ci/run installs them, and a skipped test would pass unseen.
    if MISSING:
        pytest.fail(f"{', '.join(MISSING)} not installed (apt-get install opendkim opendkim-tools spamass-milter spamd)")

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"


# The spamd and spamass-milter processes of the module's fixture, for the connect() trace.
SPAMASS_PIDS: list[int] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{proc.args[0]} did not listen on 127.0.0.1:{port} within {timeout}s:\n"
                         + log.read_text(errors="replace"))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def daemon(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)


@pytest.fixture(scope="module")
def opendkim(tmp_path_factory):
    """opendkim signing (Mode s) for example.test, selector "sel"; yields (port, public key TXT)."""
    d = tmp_path_factory.mktemp("opendkim")
    os.chmod(d, 0o700)
    subprocess.run(["opendkim-genkey", "-D", str(d), "-d", "example.test", "-s", "sel", "-b", "2048"],
                   check=True, capture_output=True, timeout=60)
    os.chmod(d / "sel.private", 0o600)
    # sel.txt: sel._domainkey IN TXT ( "v=DKIM1; h=sha256; k=rsa; " "p=..." "..." ) ; comment
    record = "".join(re.findall(r'"([^"]*)"', (d / "sel.txt").read_text()))
    assert "p=" in record, record
    port = free_port()
    (d / "keytable").write_text(f"sel._domainkey.example.test example.test:sel:{d}/sel.private\n")
    (d / "signingtable").write_text("*@example.test sel._domainkey.example.test\n")
    conf = d / "opendkim.conf"
    conf.write_text(
        "Mode s\n"
        "Syslog no\n"
        "Background no\n"
        f"Socket inet:{port}@127.0.0.1\n"
        f"PidFile {d}/opendkim.pid\n"
        f"KeyTable file:{d}/keytable\n"
        f"SigningTable refile:{d}/signingtable\n"
        "Canonicalization relaxed/simple\n"
        "InternalHosts 127.0.0.1\n"
        "UMask 077\n"
        # The key is 0600 in this 0700 directory, but opendkim's safety check of the key's path
        # also refuses the world-writable /tmp above pytest's directories (TEMPFAIL at EOH).
        "RequireSafeKeys false\n"
    )
    os.chmod(conf, 0o600)
    for f in ("keytable", "signingtable"):
        os.chmod(d / f, 0o600)
    log = d / "opendkim.log"
    proc = daemon(["opendkim", "-f", "-x", str(conf)], log)
    try:
        wait_port(port, proc, log)
        yield port, record
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def spamass(tmp_path_factory):
    """spamd (local tests only) and spamass-milter refusing a score >= 5; yields the milter's port."""
    d = tmp_path_factory.mktemp("spamass")
    spamd_port, milter_port = free_port(), free_port()
    spamd_log, milter_log = d / "spamd.log", d / "spamass-milter.log"
    spamd = daemon(["spamd", "-L", "-x", "-u", "nobody", f"--listen=127.0.0.1:{spamd_port}",
                    "--max-children=1", "--min-children=1", "--syslog=stderr",
                    f"--pidfile={d}/spamd.pid"], spamd_log)
    milter = None
    try:
        wait_port(spamd_port, spamd, spamd_log, timeout=90)
        milter = daemon(["spamass-milter", "-p", f"inet:{milter_port}@127.0.0.1", "-r", "5",
                         "--", "-d", "127.0.0.1", "-p", str(spamd_port)], milter_log)
        wait_port(milter_port, milter, milter_log)
        SPAMASS_PIDS[:] = [spamd.pid, milter.pid]
        yield milter_port
    finally:
        if milter is not None:
            stop(milter)
        stop(spamd)


def milter_config(servers: list[dict], mx=(), submission=()) -> dict:
    return {"milter": {"servers": servers, "mx": list(mx), "submission": list(submission)}}


def mx_send(srv, message: bytes, rcpt: str = ADDR, sender: str = "jane@remote.example"):
    """One MX transaction from 127.0.0.1; returns the reply to the end of DATA."""
    c = smtp_session(srv)
    try:
        expect(c.cmd(f"MAIL FROM:<{sender}>"), 250)
        expect(c.cmd(f"RCPT TO:<{rcpt}>"), 250)
        return c.data(message)
    finally:
        c.quit()


def test_opendkim_signs_submitted_mail(make_server, opendkim):
    port, record = opendkim
    srv = make_server(smtp={"submission_listen": ["127.0.0.1:0"]},
                      **milter_config([{"name": "opendkim", "address": f"127.0.0.1:{port}", "timeout_secs": 30}],
                                      submission=["opendkim"]))
    srv.add_user(*SAM)
    assert srv.submission, "no submission listener"
    c = SmtpClient(srv.submission)
    try:
        expect(c.greeting, 220)
        c.ehlo(CLIENT_NAME)
        expect(c.cmd(f"AUTH PLAIN {plain_token(NAME, PW)}"), 235)
        expect(c.cmd(f"MAIL FROM:<{ADDR}>"), 250)
        expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
        message = make_message("signed by opendkim", sender=ADDR, to=ADDR)
        qid = queued_id(expect(c.data(message), 250))
    finally:
        c.quit()
    wait_for_count(srv, NAME, PW, 1)
    delivered = fetch_all(srv, NAME, PW)[0]
    assert b"DKIM-Signature:" in delivered, delivered[:2000]
    assert b"d=example.test" in delivered and b"s=sel" in delivered

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        assert name.rstrip(".") == "sel._domainkey.example.test", name
        return record.encode()

    assert dkim.verify(delivered, dnsfunc=dnsfunc), delivered[:3000]
    # A changed body no longer verifies: the signature covers what was stored.
    assert not dkim.verify(delivered.replace(b"Hello.", b"Hellp."), dnsfunc=dnsfunc)
    wait_journal(srv, lambda l: qid in l and "milter opendkim: accept" in l and "header change" in l, code="9M")


def process_tree(pids: list[int]) -> list[int]:
    """The processes and their children, as /proc lists them now."""
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return out


def test_spamass_milter_refuses_gtube_and_marks_plain_mail(make_server, spamass):
    # Issue 21, network: every connect() the filter processes make while they judge mail goes to
    # loopback or a Unix socket (spamd -L; no DNS lists, no Razor/Pyzor/DCC).
    trace = Path(os.environ.get("TMPDIR", "/tmp")) / f"spamass-connect-{os.getpid()}-{time.monotonic_ns()}.trace"
    args = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace)]
    for pid in process_tree(SPAMASS_PIDS):
        args += ["-p", str(pid)]
    tracer = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    srv = make_server(**milter_config([{"name": "spamass", "address": f"127.0.0.1:{spamass}", "timeout_secs": 60}],
                                      mx=["spamass"]))
    srv.add_user(*SAM)
    reply = mx_send(srv, make_message("gtube", body=GTUBE, to=ADDR))
    assert 500 <= reply.code < 600, reply
    assert "SpamAssassin" in reply.text or reply.enhanced == "5.7.1", reply
    wait_journal(srv, lambda l: "milter spamass: reject" in l, code="9M")
    # A plain message passes with the X-Spam fields spamass-milter added.
    expect(mx_send(srv, make_message("plain mail", to=ADDR)), 250)
    wait_for_count(srv, NAME, PW, 1)
    time.sleep(0.5)
    delivered = fetch_all(srv, NAME, PW)
    assert len(delivered) == 1, "the GTUBE message must not be delivered"
    m = delivered[0]
    assert b"Subject: plain mail" in m
    assert re.search(rb"(?m)^X-Spam-Status: No, score=", m), m[:2000]
    assert b"X-Spam-Checker-Version:" in m
    # Our Received field is still first after Return-Path.
    assert m.split(b"\r\n")[1].startswith(b"Received: from "), m[:500]
    tracer.terminate()  # strace detaches; the daemons go on
    tracer.wait(timeout=10)
    calls = [l for l in trace.read_text().splitlines() if "connect(" in l]
    trace.unlink()
    assert calls, "the trace saw spamass-milter ask spamd: it traced the right processes"
    beyond = [l for l in calls
              if "AF_UNIX" not in l and 'inet_addr("127.' not in l and '"::1"' not in l and "AF_UNSPEC" not in l]
    assert not beyond, "a filter process connected beyond loopback:\n" + "\n".join(beyond)


def test_unreachable_milter_tempfails_by_default(make_server):
    port = free_port()
    srv = make_server(**milter_config([{"name": "gone", "address": f"127.0.0.1:{port}", "timeout_secs": 5}], mx=["gone"]))
    srv.add_user(*SAM)
    reply = mx_send(srv, make_message("milter gone", to=ADDR))
    expect(reply, 451, "4.7.1")
    wait_journal(srv, lambda l: "milter gone: tempfail" in l and "cannot connect" in l, code="9M")
    time.sleep(0.5)
    assert fetch_all(srv, NAME, PW) == []


class FakeMilter:
    """A milter on 127.0.0.1 that negotiates and says continue to everything, then misbehaves:
    "stall" never answers the end of the body, "close" hangs up at the first header."""

    def __init__(self, mode: str):
        import threading
        self.mode, self.done = mode, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        import struct

        def recv(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    raise EOFError
                data += chunk
            return data

        def send(reply: bytes) -> None:
            conn.sendall(struct.pack("!I", len(reply)) + reply)

        conn.settimeout(30)
        try:
            while not self.done.is_set():
                packet = recv(struct.unpack("!I", recv(4))[0])
                command = packet[:1]
                if command == b"O":
                    send(b"O" + struct.pack("!III", 6, 0, 0))
                elif command in (b"D", b"A"):
                    continue  # macros and abort are not answered
                elif command == b"Q":
                    return
                elif self.mode == "close" and command == b"L":
                    return  # hang up in the middle of the headers
                elif self.mode == "stall" and command == b"E":
                    self.done.wait(30)  # never answer the end of the body
                    return
                else:
                    send(b"c")
        except (EOFError, OSError):
            return

    def stop(self) -> None:
        self.done.set()
        self.sock.close()


@pytest.mark.parametrize("mode", ["stall", "close"])
def test_a_milter_that_stalls_or_hangs_up_mid_message_tempfails_and_stores_nothing(make_server, mode):
    milter = FakeMilter(mode)
    try:
        srv = make_server(**milter_config([{"name": mode, "address": f"127.0.0.1:{milter.port}", "timeout_secs": 2}],
                                          mx=[mode]))
        srv.add_user(*SAM)
        reply = mx_send(srv, make_message(f"milter {mode}", to=ADDR))
        expect(reply, 451, "4.7.1")
        wait_journal(srv, lambda l: f"milter {mode}: tempfail" in l, code="9M")
        time.sleep(0.5)
        assert fetch_all(srv, NAME, PW) == [], "nothing stored, nothing half-applied"
        queue = srv.cli_ok("queue", "list").stdout
        assert "jane@remote.example" not in queue, queue
    finally:
        milter.stop()


def test_unreachable_milter_with_accept_delivers(make_server):
    port = free_port()
    servers = [{"name": "gone", "address": f"127.0.0.1:{port}", "timeout_secs": 5, "default_action": "accept"},
               {"name": "sock", "address": "unix:/nonexistent/milter.sock", "default_action": "accept"}]
    srv = make_server(**milter_config(servers, mx=["gone", "sock"]))
    srv.add_user(*SAM)
    expect(mx_send(srv, make_message("milter gone but accepted", to=ADDR)), 250)
    wait_for_count(srv, NAME, PW, 1)
    assert b"Subject: milter gone but accepted" in fetch_all(srv, NAME, PW)[0]
    lines = journal_lines(srv, "9M")
    assert any("milter gone: accept" in l for l in lines) and any("milter sock: accept" in l for l in lines), lines


def test_explain_names_the_milters_a_client_would_meet(make_server):
    port = free_port()
    servers = [{"name": "spam", "address": f"127.0.0.1:{port}"}, {"name": "sign", "address": f"127.0.0.1:{port}"}]
    srv = make_server(**milter_config(servers, mx=["spam"], submission=["sign"]))
    srv.add_user(*SAM)
    outside = srv.cli("explain", "--ip", "198.51.100.7", "--from", "jane@remote.example", "--to", ADDR).stdout
    assert "milters (MX listener): spam, in that order, at the end of DATA" in outside, outside
    own = srv.cli("explain", "--ip", "127.0.0.1", "--user", NAME, "--from", ADDR, "--to", "x@remote.example").stdout
    assert "milters (submission listener): sign" in own, own


def test_milter_config_is_checked(make_server):
    srv = make_server(start=False, **milter_config([{"name": "m", "address": "192.0.2.1:8891"}], mx=["m", "x"]))
    r = srv.cli("config", "check")
    assert r.returncode != 0
    assert "milter.servers.address" in r.stderr + r.stdout and "loopback" in r.stderr + r.stdout
    assert "milter.mx" in r.stderr + r.stdout
