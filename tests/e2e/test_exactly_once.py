"""Exactly once, proven (issue 12).

SPEC F1 (250 only after the message is committed with synchronous=FULL; durable; exactly-once
local delivery), F2 (the snap-in pipeline: every recipient resolved, delivered or forwarded once),
C3 (the outbound queue: a recipient's outcome is recorded once and never retried after a
success), O3 (SIGTERM lets work in progress finish within the 8 s grace).

The peers are a real Postfix `smtp-sink` (Debian package postfix; .ci/run installs it without
configuring a Postfix daemon) and the scripted smtppeer.Peer. Every address is loopback: the
server listens on 127.0.0.1, peers on 127.0.0.140-149 (no other test uses them); routing is by
`[delivery] mail_router = "127.0.0.14x:PORT"`, so no DNS is ever asked.

test_fsync_before_250 shows F1 under strace (Debian package strace) rather than assuming it.
The randomised invariant under SIGTERM and kill -9 is tests/e2e/test_invariant.py.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import (
    CLIENT_NAME,
    JANE,
    Server,
    expect,
    fetch_all,
    make_message,
    smtp_session,
    subject_of,
)
from smtppeer import Peer, free_port, is_bounce, parse_bounce, queue_rows

SINK_IP = "127.0.0.140"
PEER_IP = "127.0.0.141"
SIGTERM_PEER_IP = "127.0.0.142"
DSN_PEER_IP = "127.0.0.143"
SUB_PEER_IP = "127.0.0.144"

SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None)
STRACE = shutil.which("strace")

SAM_NAME, SAM_PW = "sam", "sam-secret-1"
SAM_ADDRS = ["sam@example.test", "SamJones@example.test"]
ADMIN_NAME, ADMIN_ADDR, ADMIN_PW = "admin", "admin@example.test", "admin-secret-1"
FAR = "far@remote.example"

BURST = 300

# Header fields Postroom itself adds at the top of a message it passes on or delivers
# (S3 Received, Return-Path on local delivery, Delivered-To on alias expansion).
TRACE_FIELDS = (b"received:", b"return-path:", b"delivered-to:")


# --------------------------------------------------------------------------------------------
# Small tools
# --------------------------------------------------------------------------------------------

def strip_added_trace(message: bytes, eol: bytes = b"\r\n") -> bytes:
    """The message without the trace header fields Postroom put in front of it (each with its
    folded continuation lines). Only the leading ones: the original's own fields stay."""
    lines = message.split(eol)
    i = 0
    while i < len(lines) and lines[i].lower().startswith(TRACE_FIELDS):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return eol.join(lines[i:])


def distinct_message(token: str, sender: str = JANE, to: str = FAR) -> bytes:
    """A message whose Subject and body carry `token`; one body line starts with a dot (it must
    survive dot-stuffing both ways byte for byte)."""
    body = (f"Body of {token}.\r\n"
            f".{token} starts with a dot\r\n"
            f"Last line of {token}.\r\n")
    return make_message(token, body, sender=sender, to=to)


def wait_until(pred, timeout: float, interval: float = 0.1, what="condition"):
    """Poll pred() until truthy (returned) or timeout; `what` (a string, or a callable giving one
    at the time of failure) names it in the error."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what} not met within {timeout}s")
        time.sleep(interval)


def queue_pending(srv: Server) -> str:
    """The recipient lines of `postroom queue list` (empty string when nothing is pending)."""
    return "\n".join(r["line"] for r in queue_rows(srv))


class SmtpSink:
    """Postfix's smtp-sink on (ip, port): one dump file per mail transaction that got to the
    final dot (-d), and every command it saw on stdout (-v). AUTH, XCLIENT and XFORWARD are not
    announced (-a -C -F), so Postroom talks plain ESMTP with PIPELINING, 8BITMIME, DSN."""

    def __init__(self, workdir: Path, ip: str = SINK_IP):
        self.ip = ip
        self.dir = workdir / "sink-dump"
        self.log_path = workdir / "smtp-sink.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, attempts: int = 20) -> "SmtpSink":
        assert SMTP_SINK, "smtp-sink not installed (Debian package postfix; .ci/run installs it)"
        user = ["-u", "root"] if os.geteuid() == 0 else []
        for _ in range(attempts):
            port = free_port(self.ip)
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [SMTP_SINK, *user, "-v", "-a", "-C", "-F", "-t", "100",
                 "-d", f"{self.dir}/%H%M%S.", f"{self.ip}:{port}", "100"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection((self.ip, port), timeout=1).close()
                    self.port = port
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"smtp-sink did not start on {self.ip}; log:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def command_counts(self) -> collections.Counter:
        """How many times each command was seen ("mail", "rcpt", "data", "." ...)."""
        c = collections.Counter()
        for line in self.log().splitlines():
            m = re.match(r"\S*smtp-sink: (mail|rcpt|data|rset|quit|ehlo|helo\b|\.$)", line, re.I)
            if m:
                c[m.group(1).lower()] += 1
        return c

    def files(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted(p for p in self.dir.rglob("*") if p.is_file())

    def messages(self) -> list[dict]:
        """Each dump file as {"path", "mail", "rcpts", "message"} where message is what the
        client sent after DATA (un-stuffed, LF line ends, as smtp-sink writes it)."""
        out = []
        for p in self.files():
            data = p.read_bytes()
            lines = data.split(b"\n")
            mail, rcpts, i = None, [], 0
            while i < len(lines) and not lines[i].startswith(b"Received: from "):
                if lines[i].startswith(b"X-Mail-Args: "):
                    mail = lines[i][13:].decode(errors="replace")
                elif lines[i].startswith(b"X-Rcpt-Args: "):
                    rcpts.append(lines[i][13:].decode(errors="replace"))
                i += 1
            i += 1  # smtp-sink's own three-line Received field
            while i < len(lines) and lines[i][:1] == b"\t":
                i += 1
            msg = b"\n".join(lines[i:])
            # The dump ends with one empty line after the message.
            if msg.endswith(b"\n\n"):
                msg = msg[:-1]
            out.append({"path": p, "mail": mail, "rcpts": rcpts, "message": msg})
        return out


@pytest.fixture
def smtp_sink(tmp_path):
    sinks: list[SmtpSink] = []

    def _make(ip: str = SINK_IP) -> SmtpSink:
        s = SmtpSink(tmp_path / f"sink{len(sinks)}", ip)
        s.dir.parent.mkdir(parents=True, exist_ok=True)
        sinks.append(s.start())
        return s

    yield _make
    for s in sinks:
        s.stop()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def _make(ip: str, **kw) -> Peer:
        p = Peer(ip, 0, **kw).start()
        made.append(p)
        return p

    yield _make
    for p in made:
        p.stop()


def router_server(make_server, router: tuple[str, int], *, submission: bool = False, users: bool = True,
                  delivery: dict | None = None, **overrides) -> Server:
    """A server that relays for 127.0.0.1 (`[relay] mode = "list"` and `postroom list add relay
    127.0.0.1`) and sends every remote recipient to the mail router (C2)."""
    d = {"mail_router": f"{router[0]}:{router[1]}",
         "first_retry_count": 2, "first_retry_interval_secs": 1,
         "second_retry_count": 1, "second_retry_interval_secs": 2}
    d.update(delivery or {})
    if submission:
        overrides["smtp"] = {**overrides.get("smtp", {}), "submission_listen": ["127.0.0.1:0"]}
    srv = make_server(start=False, relay={"mode": "list"}, delivery=d, **overrides)
    srv.cli_ok("list", "add", "relay", "127.0.0.1")
    if users:
        srv.add_user(SAM_NAME, SAM_ADDRS, SAM_PW)
        srv.add_user(ADMIN_NAME, ADMIN_ADDR, ADMIN_PW)
    srv.start()
    if submission:
        assert srv.submission is not None, "no submission listener in data_dir/listening"
    return srv


def send_burst(addr, n: int, prefix: str, sender: str = JANE, to: str = FAR,
               login: tuple[str, str] | None = None) -> dict[str, bytes]:
    """One smtplib session sending n messages (each its own transaction); returns token -> bytes.
    Every message must be answered 250."""
    sent: dict[str, bytes] = {}
    with smtplib.SMTP(addr[0], addr[1], local_hostname=CLIENT_NAME, timeout=60) as s:
        s.ehlo()
        if login:
            s.login(*login)
        for i in range(n):
            token = f"{prefix}-{i:04d}"
            m = distinct_message(token, sender=sender, to=to)
            refused = s.sendmail(sender, [to], m)
            assert not refused, refused
            sent[token] = m
    return sent


def check_each_once_sink(sink: SmtpSink, sent: dict[str, bytes], srv: Server, settle: float = 3.0) -> None:
    """C3/F1 at the sink: exactly len(sent) transactions (MAIL commands), each with a body,
    every sent message there once, byte-identical apart from Postroom's trace fields."""
    n = len(sent)
    wait_until(lambda: len(sink.files()) >= n and not queue_rows(srv), 120, 0.5,
               lambda: f"{n} messages at smtp-sink and an empty queue "
                       f"(have {len(sink.files())} files; queue:\n{queue_pending(srv)})")
    time.sleep(settle)  # duplicates, if any, come late: give them the chance
    counts = sink.command_counts()
    msgs = sink.messages()
    by_token = collections.defaultdict(list)
    empty = []
    for m in msgs:
        body = m["message"]
        if not body.strip():
            empty.append(m["path"].name)
            continue
        by_token[subject_of(body.replace(b"\n", b"\r\n"))].append(m)
    dups = {t: len(v) for t, v in by_token.items() if len(v) > 1}
    missing = sorted(set(sent) - set(by_token))
    strangers = sorted(set(by_token) - set(sent))
    print(f"smtp-sink: {counts['mail']} MAIL, {counts['rcpt']} RCPT, {counts['data']} DATA, "
          f"{counts['.']} final dots, {len(msgs)} dump files, {len(dups)} duplicated, "
          f"{len(empty)} empty, {len(missing)} missing")
    assert counts["mail"] == n, (
        f"smtp-sink saw {counts['mail']} mail transactions (MAIL FROM) for {n} messages "
        f"({counts['.']} final dots, {len(msgs)} dump files); {len(empty)} of the messages are "
        f"empty (MAIL, RCPT, DATA and the dot with no message: {empty[:10]}); duplicated: {dups}")
    assert not empty, f"empty messages at the sink: {empty}"
    assert not dups, f"delivered more than once: {dups}"
    assert not missing, f"never delivered: {missing[:20]}"
    assert not strangers, f"messages nobody sent: {strangers[:20]}"
    assert len(msgs) == n, f"{len(msgs)} dump files for {n} messages"
    for token, (m,) in by_token.items():
        want = sent[token].replace(b"\r\n", b"\n")
        got = strip_added_trace(m["message"], b"\n")
        assert got == want, f"{token} changed on the way:\nsent {want!r}\ngot  {got!r}"
        assert [r.strip("<>").split()[0].strip("<>").lower() for r in m["rcpts"]] == [FAR], m["rcpts"]
    assert counts["."] == n, counts


def check_each_once_peer(peer: Peer, sent: dict[str, bytes], srv: Server, settle: float = 3.0) -> None:
    """As check_each_once_sink, for a smtppeer.Peer (every MAIL makes a Transaction)."""
    n = len(sent)
    wait_until(lambda: len(peer.delivered()) >= n and not queue_rows(srv), 120, 0.5,
               lambda: f"{n} deliveries at the peer and an empty queue "
                       f"(have {len(peer.delivered())}; queue:\n{queue_pending(srv)})")
    time.sleep(settle)
    with peer.lock:
        txs = list(peer.transactions)
    no_body = [t for t in txs if not (t.raw_data or b"").strip()]
    by_token = collections.defaultdict(list)
    for t in txs:
        if t.raw_data:
            by_token[subject_of(t.message)].append(t)
    dups = {k: len(v) for k, v in by_token.items() if len(v) > 1}
    missing = sorted(set(sent) - set(by_token))
    print(f"peer: {len(txs)} transactions, {len(no_body)} without a message, {len(dups)} duplicated, "
          f"{len(missing)} missing")
    assert len(txs) == n, (
        f"the peer saw {len(txs)} mail transactions for {n} messages: {len(no_body)} without a "
        f"message (MAIL, RCPT and no DATA, or DATA and the dot at once: "
        f"{[(t.mail_from, t.rcpts, t.raw_data, t.data_reply) for t in no_body[:5]]}), duplicated: {dups}")
    assert not dups, f"delivered more than once: {dups}"
    assert not missing, f"never delivered: {missing[:20]}"
    for token, (t,) in by_token.items():
        assert token in sent, f"a message nobody sent: {token}"
        assert t.delivered, (token, t.data_reply)
        got = strip_added_trace(t.message)
        assert got == sent[token], f"{token} changed on the way:\nsent {sent[token]!r}\ngot  {got!r}"


# --------------------------------------------------------------------------------------------
# 1. A burst through the mail router (C3, F1, F2)
# --------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("peer_kind", ["smtp-sink", "smtppeer"])
def test_burst_to_mail_router_delivers_each_once(make_server, smtp_sink, peers, peer_kind):
    """C3, F1, F2: one SMTP session sends 300 distinct messages to far@remote.example; the mail
    router (C2) receives exactly 300 mail transactions, each with its message, each message once
    and byte-identical apart from the trace fields Postroom adds. The bug: 308 transactions, 8
    of them MAIL/RCPT/DATA with an empty message, sent besides the real one. The smtp-sink variant
    uses Postfix's own test server as the router; the smtppeer variant records every MAIL."""
    if peer_kind == "smtp-sink":
        sink = smtp_sink(SINK_IP)
        srv = router_server(make_server, (SINK_IP, sink.port))
    else:
        peer = peers(PEER_IP)
        srv = router_server(make_server, (PEER_IP, peer.port))
    sent = send_burst(srv.smtp, BURST, f"burst-{uuid.uuid4().hex[:8]}")
    if peer_kind == "smtp-sink":
        check_each_once_sink(sink, sent, srv)
    else:
        check_each_once_peer(peer, sent, srv)
    assert not queue_rows(srv), queue_pending(srv)


@pytest.mark.timeout(300)
def test_burst_from_parallel_submission_clients_delivers_each_once(make_server, smtp_sink):
    """C3, F1, F2 (and A2): 8 authenticated submission clients at once, 40 messages each, all to
    one remote recipient through the mail router (smtp-sink): 320 transactions, each message
    once, byte-identical apart from the trace fields."""
    sink = smtp_sink(SUB_PEER_IP)
    srv = router_server(make_server, (SUB_PEER_IP, sink.port), submission=True)
    run = uuid.uuid4().hex[:8]
    results: dict[int, dict[str, bytes]] = {}
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            results[k] = send_burst(srv.submission, 40, f"sub-{run}-{k}", sender=SAM_ADDRS[0],
                                    login=(SAM_NAME, SAM_PW))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert len(results) == 8
    sent = {tok: m for r in results.values() for tok, m in r.items()}
    assert len(sent) == 320
    check_each_once_sink(sink, sent, srv)


# --------------------------------------------------------------------------------------------
# 2. SIGTERM while the outbound client waits for the reply to its final dot (O3, C3)
# --------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_sigterm_waits_for_outbound_reply(make_server, peers):
    """O3, C3, F1: the router takes 3 s to answer the final dot. SIGTERM 1.5 s after the dot
    arrived: the server waits for the reply within its 8 s grace and records the outcome, so
    after a restart the message is not sent again (the router has it exactly once) and nothing
    is pending. (RFC 1047: a connection lost between the dot and the reply is the one duplicate
    that cannot be avoided - here the reply does come, in time.)  The bug: the server exits at
    once, drops the connection, and sends the message again after the restart."""
    peer = peers(SIGTERM_PEER_IP, data_delay=3.0)
    srv = router_server(make_server, (SIGTERM_PEER_IP, peer.port))
    sent = send_burst(srv.smtp, 1, f"sigterm-{uuid.uuid4().hex[:8]}")   # one message, one session
    (tok,) = sent

    def dot_arrived():
        with peer.lock:
            return [t for t in peer.transactions if t.raw_data is not None]

    wait_until(dot_arrived, 30, 0.02, "the router received the final dot")
    dot_at = time.monotonic()
    time.sleep(1.5)
    proc = srv.proc
    assert proc is not None and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("postroom did not exit within 15 s of SIGTERM")
    exited_after = time.monotonic() - dot_at
    with peer.lock:
        replied = [t for t in peer.transactions if t.data_reply is not None]
    print(f"postroom exited {exited_after:.1f} s after the dot; the router replied to "
          f"{len(replied)} transaction(s) before that")
    srv.stop()  # already exited: just forgets the process and closes its log
    srv.start()
    time.sleep(5.0)
    with peer.lock:
        got = [t for t in peer.transactions if t.raw_data is not None]
    assert len(got) == 1, (
        f"the router received the message {len(got)} times (server exited {exited_after:.1f} s "
        f"after the dot, the reply was due 3 s after it): {peer.summary()}")
    assert subject_of(got[0].message) == tok
    assert strip_added_trace(got[0].message) == sent[tok]
    wait_until(lambda: not queue_rows(srv), 10, 0.25, "an empty queue")
    assert not queue_rows(srv), queue_pending(srv)


# --------------------------------------------------------------------------------------------
# 3. Duplicate recipients in one transaction (F2, C3, C4)
# --------------------------------------------------------------------------------------------

def transaction(srv: Server, sender: str, rcpts: list[str], message: bytes) -> None:
    """One transaction from 127.0.0.1: every RCPT (a full "<addr> PARAMS" or an address) must be
    accepted, and the message answered 250."""
    c = smtp_session(srv)
    try:
        expect(c.cmd(f"MAIL FROM:<{sender}>"), 250)
        for r in rcpts:
            arg = r if r.startswith("<") else f"<{r}>"
            expect(c.cmd(f"RCPT TO:{arg}"), 250)
        expect(c.data(message), 250)
    finally:
        c.quit()


def mailbox_settles(srv: Server, user: str, password: str, want_at_least: int, settle: float = 3.0,
                    timeout: float = 30.0) -> list[bytes]:
    """Wait until the maildrop holds want_at_least messages and the queue is empty, then a few
    seconds more; returns the messages."""
    wait_until(lambda: len(fetch_all(srv, user, password)) >= want_at_least and not queue_rows(srv),
               timeout, 0.3, f"{want_at_least} message(s) for {user} and an empty queue")
    time.sleep(settle)
    return fetch_all(srv, user, password)


CASES = ["addresses-of-one-user", "postmaster-spellings", "alias-and-member", "notify-success-x100"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES)
def test_duplicate_recipients_get_one_copy(make_server, peers, case):
    """F2 (one delivery per mailbox), S3 (postmaster in any case, with or without a domain),
    F7 (aliases expand to new recipients, still one copy), C4 (one delivery report per recipient,
    RFC 3464 "delivered"): one transaction naming the same mailbox several ways leaves exactly
    one copy in it.

    addresses-of-one-user: <sam@example.test> <SamJones@example.test> <sam@example.test>.
    postmaster-spellings: <postmaster> <PostMaster> <POSTMASTER@EXAMPLE.TEST> -> the admin.
    alias-and-member: team@example.test (alias of sam) and sam@example.test.
    notify-success-x100: 100 x <sam@example.test> NOTIFY=SUCCESS from a remote sender: one copy,
    and the sender (through the mail router) gets exactly one "delivered" report covering sam."""
    peer = peers(DSN_PEER_IP)
    srv = router_server(make_server, (DSN_PEER_IP, peer.port))
    token = f"{case}-{uuid.uuid4().hex[:8]}"
    if case == "addresses-of-one-user":
        user, pw = SAM_NAME, SAM_PW
        rcpts = ["sam@example.test", "SamJones@example.test", "sam@example.test"]
    elif case == "postmaster-spellings":
        user, pw = ADMIN_NAME, ADMIN_PW
        rcpts = ["postmaster", "PostMaster", "POSTMASTER@EXAMPLE.TEST"]
    elif case == "alias-and-member":
        srv.cli_ok("alias", "add", "team@example.test", "sam@example.test")
        user, pw = SAM_NAME, SAM_PW
        rcpts = ["team@example.test", "sam@example.test"]
    else:
        user, pw = SAM_NAME, SAM_PW
        rcpts = ["<sam@example.test> NOTIFY=SUCCESS"] * 100
    m = make_message(token, f"One copy of {token}.\r\n", sender=JANE, to=rcpts[0].split()[0].strip("<>"))
    transaction(srv, JANE, rcpts, m)
    msgs = mailbox_settles(srv, user, pw, 1)
    mine = [x for x in msgs if subject_of(x) == token]
    assert len(mine) == 1, (f"{user}'s maildrop holds {len(mine)} copies of one message sent to "
                            f"{rcpts[:3]}{' x100' if len(rcpts) == 100 else ''}")
    assert strip_added_trace(mine[0]) == m

    if case == "notify-success-x100":
        # The report goes to jane@remote.example, through the mail router.
        wait_until(lambda: peer.delivered_to(JANE), 30, 0.2, "a delivery report at the router")
        time.sleep(3.0)
        with peer.lock:
            txs = list(peer.transactions)
        to_jane = [t for t in txs if JANE in [a.lower() for a, _ in t.rcpts]]
        assert len(to_jane) == 1, f"{len(to_jane)} transactions to {JANE}: {peer.summary()}"
        (t,) = to_jane
        assert t.mail_from == "", f"a report comes from the null sender, not <{t.mail_from}>"
        report = parse_bounce(t.message)
        msg = report["msg"]
        assert msg.get_content_type() == "multipart/report", msg.get_content_type()
        blocks = [f for f in report["recipients"]
                  if f.get("final-recipient", "").split(";", 1)[-1].strip().strip("<>").lower()
                  == "sam@example.test"]
        actions = [f.get("action", "").lower() for f in report["recipients"]]
        assert len(blocks) == 1, (f"the report has {len(blocks)} per-recipient blocks for "
                                  f"sam@example.test (of {len(report['recipients'])}: {actions[:10]})")
        assert blocks[0].get("action", "").lower() == "delivered", blocks[0]
        others = [x for x in txs if x is not t]
        assert not others, f"other transactions at the router: {peer.summary()}"
    else:
        assert not peer.transactions, (f"nothing should leave the server: {peer.summary()}\n"
                                       + "\n".join((t.message or b"").decode(errors="replace")[:3000]
                                                   for t in peer.transactions))
    assert not [x for x in fetch_all(srv, user, pw) if is_bounce(x)], "a bounce in the maildrop"
    assert not queue_rows(srv), queue_pending(srv)


# --------------------------------------------------------------------------------------------
# 5. fsync before 250, shown with strace (F1)
# --------------------------------------------------------------------------------------------

_ST_LINE = re.compile(r"^(\d+)\s+(\d\d:\d\d:\d\d\.\d+)\s+(.*)$")
_ST_CALL = re.compile(r"^([a-z0-9_]+)\((\d+)<([^>]*)>(.*)$", re.S)
_ST_RESUMED = re.compile(r"^<\.\.\. ([a-z0-9_]+) resumed>(.*)$", re.S)


class Syscall:
    __slots__ = ("pid", "name", "fd", "path", "text", "start", "end", "at")

    def __init__(self, pid, name, fd, path, text, start, at):
        self.pid, self.name, self.fd, self.path, self.text = pid, name, fd, path, text
        self.start = self.end = start   # line numbers of entry and of completion
        self.at = at

    def __repr__(self) -> str:
        return f"{self.at} {self.name}({self.fd}<{self.path}>) lines {self.start}-{self.end}"


def parse_strace(text: str) -> list[Syscall]:
    """`strace -f -tt -yy -o FILE` output -> calls on file descriptors (unfinished calls are
    joined with their resumption: `start` is the entry line, `end` the completion line)."""
    calls: list[Syscall] = []
    pending: dict[tuple[str, str], Syscall] = {}
    for n, line in enumerate(text.splitlines()):
        m = _ST_LINE.match(line)
        if not m:
            continue
        pid, at, rest = m.groups()
        r = _ST_RESUMED.match(rest)
        if r:
            call = pending.pop((pid, r.group(1)), None)
            if call is not None:
                call.text += r.group(2)
                call.end = n
            continue
        c = _ST_CALL.match(rest)
        if not c:
            continue
        name, fd, path, tail = c.groups()
        call = Syscall(pid, name, int(fd), path, tail, n, at)
        if tail.rstrip().endswith("<unfinished ...>"):
            pending[(pid, name)] = call
        calls.append(call)
    return calls


def fsync_before_reply(calls: list[Syscall], tokens: list[str], db: str) -> list[str]:
    """For each token: its final dot read from a socket, the message written to the database
    (or its -wal), an fsync/fdatasync of either completed after both, and only then the
    "250 ... queued" written on that socket. Raises AssertionError; returns one line per token."""

    def on_socket(c: Syscall) -> bool:
        return c.path.startswith("TCP:") or c.path.startswith("socket:")

    def on_db(c: Syscall) -> bool:
        return c.path in (db, db + "-wal")

    def ends_data(c: Syscall) -> bool:
        return "\\r\\n.\\r\\n" in c.text or c.text.lstrip(", ").startswith('".\\r\\n')

    reads = [c for c in calls if c.name in ("read", "readv", "recvfrom", "recvmsg") and on_socket(c)]
    writes = [c for c in calls if c.name in ("write", "writev", "sendto", "sendmsg") and on_socket(c)]
    db_writes = [c for c in calls if c.name in ("pwrite64", "pwritev", "write", "writev") and on_db(c)]
    syncs = [c for c in calls if c.name in ("fsync", "fdatasync") and on_db(c)]
    report = []
    for tok in tokens:
        got = [c for c in reads if tok in c.text]
        assert got, f"no socket read carries {tok}"
        first = got[0]
        dot = next((c for c in reads if c.fd == first.fd and c.end >= first.end and ends_data(c)), None)
        assert dot is not None, f"no read of the final dot after {tok} on fd {first.fd}"
        reply = next((c for c in writes if c.fd == dot.fd and c.start > dot.end
                      and "250" in c.text and "queued" in c.text), None)
        assert reply is not None, f"no '250 ... queued' written on fd {dot.fd} after the dot of {tok}"
        stored = [c for c in db_writes if tok in c.text and first.end <= c.end < reply.start]
        assert stored, (f"{tok}: no write of the message to {db}(-wal) between its arrival "
                        f"(line {first.end}) and the 250 (line {reply.start})")
        after = max(stored[-1].end, dot.end)
        synced = [c for c in syncs if after < c.end < reply.start]
        assert synced, (f"{tok}: the 250 (line {reply.start}, {reply.at}) was written before any "
                        f"fsync/fdatasync of {db} or its -wal completed after the final dot (line "
                        f"{dot.end}) and the message's last write to it (line {stored[-1].end})")
        report.append(f"{tok}: dot {dot.at} -> written {stored[-1].at} -> {synced[0].name} "
                      f"done (line {synced[0].end}) -> 250 {reply.at}")
    return report


@pytest.fixture
def strace_attach():
    """attach(pid, out_path) runs `strace -f -p pid` writing to out_path; detached at teardown
    (before the server is stopped: the fixture is set up after make_server)."""
    procs: list[subprocess.Popen] = []

    def _attach(pid: int, out: Path) -> subprocess.Popen:
        err = open(out.with_suffix(".err"), "wb")
        p = subprocess.Popen(
            [STRACE, "-f", "-tt", "-yy", "-s", "65535",
             "-e", "trace=fsync,fdatasync,write,writev,sendto,sendmsg,"
                   "read,readv,recvfrom,recvmsg,pwrite64,pwritev",
             "-o", str(out), "-p", str(pid)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.close()
        procs.append(p)
        # strace says "Process PID attached" on stderr once every thread is traced.
        wait_until(lambda: b"attached" in out.with_suffix(".err").read_bytes() or p.poll() is not None,
                   15, 0.05, "strace attached")
        assert p.poll() is None, out.with_suffix(".err").read_text(errors="replace")
        return p

    def _detach(p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)   # strace -p: detach and exit
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    _attach.detach = _detach
    yield _attach
    for p in procs:
        _detach(p)


@pytest.mark.timeout(120)
def test_fsync_before_250(make_server, strace_attach, tmp_path):
    """F1, shown not assumed: under strace, for each of 5 messages, the server (1) reads the
    message's final dot from the client's socket, (2) writes the message (its unique token) to
    the database's write-ahead log, (3) completes an fsync/fdatasync of the database or its
    -wal file, and only then (4) writes "250 ... queued" to that socket."""
    assert STRACE, "strace not installed (Debian package strace; .ci/run installs it)"
    srv = make_server()
    srv.add_user(SAM_NAME, SAM_ADDRS, SAM_PW)
    db = str(srv.data_dir / "postroom.db")
    out = tmp_path / "strace.txt"
    tracer = strace_attach(srv.proc.pid, out)
    run = uuid.uuid4().hex[:8]
    tokens = [f"fsyncproof{run}x{i}" for i in range(5)]
    for tok in tokens:
        body = "".join(f"{tok} line {k}\r\n" for k in range(3))
        transaction(srv, JANE, ["sam@example.test"], make_message(tok, body, to="sam@example.test"))
        time.sleep(0.3)
    time.sleep(0.5)
    strace_attach.detach(tracer)
    calls = parse_strace(out.read_text(errors="replace"))
    assert calls, f"strace recorded nothing: {out.with_suffix('.err').read_text(errors='replace')}"

    print("\n".join(fsync_before_reply(calls, tokens, db)))
