"""Helpers for the Postroom end-to-end tests.

Everything here talks to a real `postroom serve` process over loopback sockets only
(127.0.0.1, ports the server bound itself and wrote to `data_dir/listening`).
No DNS lookups: smtplib always gets an explicit local_hostname.
"""

from __future__ import annotations

import collections
import hashlib
import os
import poplib
import re
import select
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("POSTROOM_BIN", str(REPO / "target" / "debug" / "postroom")))

HOSTNAME = "mail.example.test"
DOMAIN = "example.test"
POSTMASTER = "admin@example.test"
CLIENT_NAME = "client.remote.example"
JANE = "jane@remote.example"

# How long to wait for the asynchronous framework to deliver a message.
DELIVERY_TIMEOUT = 20.0
IO_TIMEOUT = 15.0


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def render_toml(cfg: dict) -> str:
    """Render a two-level dict (top-level scalars, then [tables]) as TOML."""
    out = []
    for k, v in cfg.items():
        if not isinstance(v, dict):
            out.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.append("")
            out.append(f"[{k}]")
            for k2, v2 in v.items():
                out.append(f"{_toml_key(k2)} = {_toml_value(v2)}")
    return "\n".join(out) + "\n"


def base_config(data_dir: Path) -> dict:
    return {
        "data_dir": str(data_dir),
        "hostname": HOSTNAME,
        "domains": [DOMAIN],
        "postmaster": POSTMASTER,
        "smtp": {
            "listen": ["127.0.0.1:0"],
            "submission_listen": [],
            "tls_listen": [],
        },
        "pop3": {
            "listen": ["127.0.0.1:0"],
            "tls_listen": [],
        },
        # Hermetic: a loopback port where nothing answers, never the system's resolvers.
        "dns": {"servers": ["127.0.0.1:9"]},
        # E1 checks would ask that dead port about every message (and defer it): off unless a
        # test turns them on with its own DNS stub (test_sender_auth.py).
        "auth": {"checks": False},
        "storage": {"min_free_mb": 0},
    }


def merge_config(cfg: dict, overrides: dict) -> dict:
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------

class ServerError(AssertionError):
    pass


class Server:
    """One `postroom serve` process with its own config and data_dir under a tmp dir."""

    def __init__(self, tmp: Path, overrides: dict | None = None, name: str = "server"):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.tmp / "data"
        self.config_path = self.tmp / "postroom.toml"
        self.stderr_path = self.tmp / f"{name}.stderr.log"
        self.name = name
        cfg = merge_config(base_config(self.data_dir), overrides or {})
        self.config_path.write_text(render_toml(cfg))
        self.proc: subprocess.Popen | None = None
        self.smtp: tuple[str, int] | None = None
        self.pop3: tuple[str, int] | None = None
        self.submission = self.smtps = self.pop3s = None
        self.listeners: dict[str, tuple[str, int]] = {}
        # Run in the child before exec (e.g. to lower its resource limits).
        self.preexec_fn = None
        self._log = None

    # -- lifecycle ---------------------------------------------------------------------------
    def expected_listeners(self) -> set[str]:
        """The listeners whose lines in data_dir/listening mean the server is ready."""
        return {"smtp", "pop3"}

    def start(self, ready_timeout: float = 20.0) -> "Server":
        listening = self.data_dir / "listening"
        if listening.exists():
            listening.unlink()
        self._log = open(self.stderr_path, "ab")
        self._log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
        self._log.flush()
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        self.proc = subprocess.Popen(
            [str(BIN), "--config", str(self.config_path), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
            preexec_fn=self.preexec_fn,
        )
        want = self.expected_listeners()
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"postroom serve exited with status {self.proc.returncode} before it was ready\n"
                    + self.stderr_text()
                )
            if listening.exists():
                parsed = self._parse_listening(listening.read_text(errors="replace"))
                if want <= set(parsed):
                    self.listeners = parsed
                    for name in ("smtp", "pop3", "submission", "smtps", "pop3s"):
                        setattr(self, name, parsed.get(name))
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(
                    f"postroom serve did not write {listening} with {sorted(want)} within "
                    f"{ready_timeout}s\n" + self.stderr_text()
                )
            time.sleep(0.05)

    @staticmethod
    def _parse_listening(text: str) -> dict:
        out = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue
            name, addr = parts
            host, _, port = addr.rpartition(":")
            host = host.strip("[]")
            if not port.isdigit():
                continue
            out.setdefault(name, (host, int(port)))
        return out

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL if needed. Returns the exit status."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._close_log()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the server (crash simulation)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        self._close_log()

    def restart(self) -> "Server":
        self.stop()
        return self.start()

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None

    def stderr_text(self) -> str:
        try:
            data = self.stderr_path.read_bytes()
        except OSError:
            return "(no server stderr)"
        if len(data) > 20000:
            data = b"...(truncated)...\n" + data[-20000:]
        return data.decode(errors="replace")

    # -- CLI ---------------------------------------------------------------------------------
    def cli(self, *args: str, input: str | bytes | None = None, timeout: float = 60.0,
            stdin_devnull: bool = True) -> subprocess.CompletedProcess:
        """Run `postroom --config FILE ARGS...`; returns the CompletedProcess (text mode)."""
        if isinstance(input, bytes):
            input = input.decode()
        return subprocess.run(
            [str(BIN), "--config", str(self.config_path), *args],
            input=input,
            stdin=subprocess.DEVNULL if (input is None and stdin_devnull) else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli_ok(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        r = self.cli(*args, input=input)
        assert r.returncode == 0, (
            f"`postroom {' '.join(args)}` exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
        )
        return r

    def add_user(self, name: str, addresses, password: str) -> None:
        if isinstance(addresses, str):
            addresses = [addresses]
        args = ["user", "add", name]
        for a in addresses:
            args += ["--address", a]
        args.append("--password-stdin")
        self.cli_ok(*args, input=password + "\n")


# --------------------------------------------------------------------------------------------
# Raw SMTP
# --------------------------------------------------------------------------------------------

class Closed(Exception):
    """The peer closed the connection."""


class Reply:
    def __init__(self, code: int, lines: list[str]):
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})(\s|$)", self.lines[0] if self.lines else "")
        return m.group(1) if m else None

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"


class LineSocket:
    def __init__(self, addr, timeout: float = IO_TIMEOUT):
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buf = b""

    def send(self, data) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise Closed(str(e)) from e
        if not chunk:
            raise Closed("connection closed by server")
        self.buf += chunk

    def read_line(self) -> bytes:
        """One line without its CRLF (or LF)."""
        while b"\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\n", 1)
        return line[:-1] if line.endswith(b"\r") else line

    def read_raw_line(self) -> bytes:
        """One line with its line ending, exactly as sent."""
        while b"\n" not in self.buf:
            self._fill()
        i = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def wait_closed(self, timeout: float) -> tuple[bool, bytes]:
        """Read until EOF or timeout. Returns (closed, bytes read meanwhile)."""
        deadline = time.monotonic() + timeout
        got = self.buf
        self.buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, got
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return False, got
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return True, got
            if not chunk:
                return True, got
            got += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class SmtpClient(LineSocket):
    """A raw SMTP client that reads multi-line replies, for exact reply codes."""

    def __init__(self, addr, timeout: float = IO_TIMEOUT, read_greeting: bool = True):
        super().__init__(addr, timeout)
        self.greeting = self.read_reply() if read_greeting else None

    def read_reply(self) -> Reply:
        lines = []
        while True:
            raw = self.read_line().decode("utf-8", errors="replace")
            if len(raw) < 3 or not raw[:3].isdigit():
                raise AssertionError(f"malformed SMTP reply line {raw!r} (so far {lines!r})")
            code = int(raw[:3])
            lines.append(raw[4:])
            if raw[3:4] != "-":
                return Reply(code, lines)

    def cmd(self, line: str | bytes) -> Reply:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.read_reply()

    def ehlo(self, name: str = CLIENT_NAME) -> Reply:
        r = self.cmd(f"EHLO {name}")
        expect(r, 250)
        return r

    def data(self, message: bytes) -> Reply:
        """Send DATA, the dot-stuffed message and the terminator; return the final reply."""
        r = self.cmd("DATA")
        expect(r, 354)
        self.send(dot_stuff(message) + b".\r\n")
        return self.read_reply()

    def quit(self) -> None:
        try:
            self.cmd("QUIT")
        except (Closed, OSError):
            pass
        self.close()


def expect(reply: Reply, code: int, enhanced: str | None = None) -> Reply:
    assert reply.code == code, f"expected {code}, got {reply!r}"
    if enhanced is not None:
        assert reply.enhanced == enhanced, f"expected enhanced code {enhanced}, got {reply!r}"
    return reply


def dot_stuff(message: bytes) -> bytes:
    """CRLF-terminated message -> dot-stuffed, ending with CRLF (terminator not included)."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    return stuffed


def smtp_session(srv: Server, ehlo: bool = True) -> SmtpClient:
    c = SmtpClient(srv.smtp)
    expect(c.greeting, 220)
    if ehlo:
        c.ehlo()
    return c


def make_message(subject: str, body: bytes | str = b"Hello.\r\n", sender: str = JANE,
                 to: str = "SamJones@example.test", extra_headers: list[str] = ()) -> bytes:
    if isinstance(body, str):
        body = body.encode()
    msgid = re.sub(r"[^A-Za-z0-9.-]", "-", subject)[:60]
    headers = [
        f"From: Jane <{sender}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        "Date: Mon, 02 Mar 2026 10:00:00 +0000",
        f"Message-ID: <{msgid}.{time.monotonic_ns()}@remote.example>",
        *extra_headers,
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


def send_mail(srv: Server, to, message: bytes, sender: str = JANE, timeout: float = 60.0) -> None:
    """Send with smtplib (the happy path); raises on any refusal."""
    if isinstance(to, str):
        to = [to]
    with smtplib.SMTP(srv.smtp[0], srv.smtp[1], local_hostname=CLIENT_NAME, timeout=timeout) as s:
        refused = s.sendmail(sender, to, message, mail_options=["BODY=8BITMIME"])
        assert not refused, f"recipients refused: {refused}"


# --------------------------------------------------------------------------------------------
# POP3
# --------------------------------------------------------------------------------------------

def pop_connect(srv: Server, timeout: float = IO_TIMEOUT) -> poplib.POP3:
    return poplib.POP3(srv.pop3[0], srv.pop3[1], timeout=timeout)


def pop_login(srv: Server, user: str, password: str, in_use_wait: float = 5.0) -> poplib.POP3:
    """Log in. A session that has just QUIT or dropped may hold the lock for a moment:
    retry on -ERR [IN-USE] for up to in_use_wait seconds."""
    deadline = time.monotonic() + in_use_wait
    while True:
        p = pop_connect(srv)
        try:
            p.user(user)
            p.pass_(password)
            return p
        except poplib.error_proto as e:
            p.close()
            if b"IN-USE" not in (e.args[0] if e.args else b"") or time.monotonic() > deadline:
                raise
        except Exception:
            p.close()
            raise
        time.sleep(0.1)


def pop_login_fails(srv: Server, user: str, password: str, in_use_wait: float = 5.0) -> bytes | None:
    """Try to log in; return the -ERR response if refused, None if it succeeded.

    -ERR [IN-USE] is retried for in_use_wait seconds (0: returned at once)."""
    deadline = time.monotonic() + in_use_wait
    while True:
        p = pop_connect(srv)
        try:
            p.user(user)
            p.pass_(password)
        except poplib.error_proto as e:
            p.close()
            resp = e.args[0] if e.args else b"-ERR"
            if b"IN-USE" in resp and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            return resp
        try:
            p.quit()
        except Exception:
            p.close()
        return None


def retr(p: poplib.POP3, n: int) -> bytes:
    _, lines, _ = p.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


def login_retry(srv: Server, user: str, password: str, timeout: float = 10.0) -> poplib.POP3:
    """Log in, retrying while the mailbox is locked ([IN-USE]) by a session going away."""
    return pop_login(srv, user, password, in_use_wait=timeout)


def fetch_all(srv: Server, user: str, password: str) -> list[bytes]:
    """All messages in the maildrop, as CRLF bytes (dot-unstuffed by poplib)."""
    p = login_retry(srv, user, password)
    try:
        count, _ = p.stat()
        return [retr(p, i) for i in range(1, count + 1)]
    finally:
        p.quit()


def wait_for_count(srv: Server, user: str, password: str, n: int,
                   timeout: float = DELIVERY_TIMEOUT) -> int:
    """Poll STAT until the maildrop holds at least n messages; returns the count seen."""
    deadline = time.monotonic() + timeout
    count = -1
    while True:
        p = login_retry(srv, user, password)
        try:
            count, _ = p.stat()
        finally:
            p.quit()
        if count >= n:
            return count
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{user}'s maildrop holds {count} message(s), expected >= {n} within {timeout}s"
            )
        time.sleep(0.25)


def subject_of(message: bytes) -> str | None:
    head = message.split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"(?mi)^Subject: ?(.*)$", head)
    return m.group(1).decode(errors="replace").strip() if m else None


def wait_for_subjects(srv: Server, user: str, password: str, subjects,
                      timeout: float = DELIVERY_TIMEOUT) -> list[bytes]:
    """Poll until every subject in `subjects` is in the maildrop; returns all messages."""
    want = set(subjects)
    deadline = time.monotonic() + timeout
    while True:
        msgs = fetch_all(srv, user, password)
        have = {subject_of(m) for m in msgs}
        if want <= have:
            return msgs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{user}'s maildrop lacks {sorted(want - have)} after {timeout}s; has {sorted(map(str, have))}"
            )
        time.sleep(0.25)


def split_trace(message: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a delivered message into (Return-Path line, Received header, the rest).

    Asserts the message starts with Return-Path then a (possibly folded) Received header.
    """
    lines = message.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path:"), f"first line is not Return-Path: {lines[:3]!r}"
    assert lines[1].startswith(b"Received: from "), f"second header is not Received: {lines[:4]!r}"
    i = 2
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        i += 1
    return lines[0], b"\r\n".join(lines[1:i]), b"\r\n".join(lines[i:])


def strip_trace(message: bytes) -> bytes:
    return split_trace(message)[2]


class RawPop(LineSocket):
    """A raw POP3 client, to see exact bytes on the wire."""

    def __init__(self, addr, timeout: float = IO_TIMEOUT):
        super().__init__(addr, timeout)
        self.greeting = self.read_line()

    def cmd(self, line: str) -> bytes:
        self.send(line.encode() + b"\r\n")
        return self.read_line()

    def read_multiline_raw(self) -> list[bytes]:
        """Lines (with their endings, still dot-stuffed) up to but excluding '.\\r\\n'."""
        out = []
        while True:
            line = self.read_raw_line()
            if line == b".\r\n":
                return out
            out.append(line)

    def login(self, user: str, password: str, in_use_wait: float = 5.0) -> None:
        """USER/PASS; on -ERR [IN-USE] (a session that just ended may still hold the lock for a
        moment, RFC 1939 §6) reconnect and retry for up to in_use_wait seconds."""
        deadline = time.monotonic() + in_use_wait
        while True:
            r = self.cmd(f"USER {user}")
            assert r.startswith(b"+OK"), r
            r = self.cmd(f"PASS {password}")
            if r.startswith(b"+OK"):
                return
            assert b"[IN-USE]" in r and time.monotonic() < deadline, r
            addr, timeout = self.sock.getpeername(), self.sock.gettimeout() or IO_TIMEOUT
            self.close()
            time.sleep(0.1)
            self.__init__(addr, timeout)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------------------------
# Relay and connection rules (SPEC §3): clients from chosen 127.0.0.x source addresses,
# POP-before-SMTP records, queue and journal inspection, `explain`.
# --------------------------------------------------------------------------------------------

import sqlite3  # noqa: E402  (pop_logins, for POP-before-SMTP tests)

# List changes apply to new sessions within this many seconds (R11).
LIST_APPLY_TIMEOUT = 2.0


def _connect_from(addr, source_ip: str | None, timeout: float) -> socket.socket:
    host, port = addr
    if source_ip is None:
        return socket.create_connection((host, port), timeout=timeout)
    return socket.create_connection((host, port), timeout=timeout, source_address=(source_ip, 0))


def smtp_from(srv_or_addr, source_ip: str | None, timeout: float = IO_TIMEOUT,
              read_greeting: bool = True) -> SmtpClient:
    """A raw SmtpClient whose socket is bound to source_ip (e.g. "127.0.0.5").
    The greeting is read (c.greeting) unless read_greeting is False; a server that closes at
    once raises Closed."""
    addr = srv_or_addr.smtp if isinstance(srv_or_addr, Server) else srv_or_addr
    c = SmtpClient.__new__(SmtpClient)
    c.sock = _connect_from(addr, source_ip, timeout)
    c.buf = b""
    c.greeting = None
    if read_greeting:
        try:
            c.greeting = c.read_reply()
        except BaseException:
            c.close()
            raise
    return c


def greeting_from(srv_or_addr, source_ip: str | None, timeout: float = IO_TIMEOUT) -> Reply | None:
    """The greeting a client from source_ip gets, then QUIT; None if the server closed (or reset)
    the connection without a greeting."""
    try:
        c = smtp_from(srv_or_addr, source_ip, timeout=timeout)
    except (Closed, ConnectionResetError, ConnectionRefusedError):
        return None
    g = c.greeting
    c.quit()
    return g


def eventually(fn, timeout: float = LIST_APPLY_TIMEOUT, interval: float = 0.1):
    """Call fn() until it returns a truthy value or timeout passes; returns the last value.
    For list changes made while the server runs (they apply to new sessions within 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def rcpt_code(srv: Server, source_ip: str | None, rcpt: str, sender: str = JANE,
              helo: str = CLIENT_NAME) -> Reply:
    """One session from source_ip: EHLO, MAIL FROM sender, RCPT TO rcpt; returns the RCPT reply."""
    c = smtp_from(srv, source_ip)
    try:
        expect(c.greeting, 220)
        expect(c.cmd(f"EHLO {helo}"), 250)
        expect(c.cmd(f"MAIL FROM:<{sender}>"), 250)
        return c.cmd(f"RCPT TO:{rcpt if rcpt.startswith('<') else '<' + rcpt + '>'}")
    finally:
        c.quit()


class SourcePop(RawPop):
    """RawPop with its socket bound to a chosen source address."""

    def __init__(self, addr, source_ip: str | None = None, timeout: float = IO_TIMEOUT):
        self.source_ip = source_ip
        self.sock = _connect_from(addr, source_ip, timeout)
        self.buf = b""
        self.greeting = self.read_line()

    def login(self, user: str, password: str, in_use_wait: float = 5.0) -> None:
        deadline = time.monotonic() + in_use_wait
        while True:
            r = self.cmd(f"USER {user}")
            assert r.startswith(b"+OK"), r
            r = self.cmd(f"PASS {password}")
            if r.startswith(b"+OK"):
                return
            assert b"[IN-USE]" in r and time.monotonic() < deadline, r
            addr, timeout = self.sock.getpeername(), self.sock.gettimeout() or IO_TIMEOUT
            self.close()
            time.sleep(0.1)
            self.__init__(addr, self.source_ip, timeout)


def db_path(srv: Server) -> Path:
    return srv.data_dir / "postroom.db"


def pop_login_row(srv: Server, ip: str):
    """The pop_logins row (ip, user_id, at) for ip, or None."""
    con = sqlite3.connect(str(db_path(srv)), timeout=10)
    try:
        return con.execute("SELECT ip, user_id, at FROM pop_logins WHERE ip = ?", (ip,)).fetchone()
    finally:
        con.close()


def pop_login_from(srv: Server, source_ip: str, user: str, password: str,
                   record_timeout: float = 10.0) -> None:
    """Log in to POP3 (USER/PASS) from source_ip, QUIT, and wait until the server has recorded
    the login for POP-before-SMTP (P5: the record is written asynchronously)."""
    before = pop_login_row(srv, source_ip)
    p = SourcePop(srv.pop3, source_ip)
    try:
        assert p.greeting.startswith(b"+OK"), p.greeting
        p.login(user, password)
        p.cmd("QUIT")
    finally:
        p.close()
    deadline = time.monotonic() + record_timeout
    while True:
        row = pop_login_row(srv, source_ip)
        if row is not None and (before is None or row[2] >= before[2]) and row[2] >= time.time() - 60:
            return
        if time.monotonic() > deadline:
            con = sqlite3.connect(str(db_path(srv)), timeout=10)
            try:
                rows = con.execute("SELECT ip, user_id, at FROM pop_logins").fetchall()
            finally:
                con.close()
            raise AssertionError(f"POP3 login from {source_ip} not recorded in pop_logins after "
                                 f"{record_timeout}s; rows: {rows!r}")
        time.sleep(0.05)


def age_pop_login(srv: Server, source_ip: str, minutes: float) -> None:
    """Make the recorded POP3 login of source_ip `minutes` old, by editing the SQLite database
    directly (pop_logins.at is unix seconds): the only way to step outside the POP-before-SMTP
    window without waiting for it."""
    con = sqlite3.connect(str(db_path(srv)), timeout=10)
    try:
        with con:
            n = con.execute("UPDATE pop_logins SET at = ? WHERE ip = ?",
                            (int(time.time() - minutes * 60), source_ip)).rowcount
        assert n == 1, f"no pop_logins row for {source_ip}"
    finally:
        con.close()


def queue_entries(srv: Server) -> list[tuple[str, str]]:
    """(state, recipient) of every line of `postroom queue list` (lowercased recipient)."""
    r = srv.cli_ok("queue", "list")
    out = []
    for line in r.stdout.splitlines():
        tokens = line.split()
        if len(tokens) < 3 or tokens[0] == "id":
            continue
        state = tokens[1]
        for t in tokens[2:]:
            if "@" in t:
                out.append((state, t.strip("<>").lower()))
                break
    return out


def wait_queued(srv: Server, recipient: str, state: str = "forward", timeout: float = 10.0) -> list:
    """Poll `queue list` until recipient shows in state; returns the entries seen."""
    want = (state, recipient.lower())
    deadline = time.monotonic() + timeout
    while True:
        entries = queue_entries(srv)
        if want in entries:
            return entries
        if time.monotonic() > deadline:
            raise AssertionError(f"`queue list` does not show {recipient} in state {state} after "
                                 f"{timeout}s:\n{srv.cli('queue', 'list').stdout}")
        time.sleep(0.2)


def journal_lines(srv: Server, code: str | None = None) -> list[str]:
    args = ["journal"] + (["--code", code] if code else [])
    return [line for line in srv.cli_ok(*args).stdout.splitlines() if line.strip()]


def wait_journal(srv: Server, pred, code: str | None = None, timeout: float = 5.0) -> list[str]:
    """Poll the journal until a line satisfies pred(line); returns the matching lines."""
    deadline = time.monotonic() + timeout
    while True:
        lines = journal_lines(srv, code)
        hits = [line for line in lines if pred(line)]
        if hits:
            return hits
        if time.monotonic() > deadline:
            raise AssertionError(f"no journal entry{' with code ' + code if code else ''} "
                                 f"matching after {timeout}s; journal:\n" + "\n".join(journal_lines(srv)))
        time.sleep(0.2)


def has_ip(line: str, ip: str) -> bool:
    """Does a journal line mention exactly this IP (not 127.0.0.10 for 127.0.0.1)?"""
    return re.search(r"(?<![0-9.])" + re.escape(ip) + r"(?![0-9])", line) is not None


def explain(srv: Server, ip: str, sender: str, recipients, pop_login: bool = False,
            user: str | None = None) -> dict:
    """Run `postroom explain`; returns {"connect": verdict, "sender": verdict,
    "recipients": {addr_lower: verdict}, "order": [(addr as printed, verdict)...], "raw": stdout}
    with verdict lowercased ("accept", "refuse", "deliver locally", "relay")."""
    args = ["explain", "--ip", ip]
    if pop_login:
        args.append("--pop-login")
    if user:
        args += ["--user", user]
    args += ["--from", sender]
    for r in ([recipients] if isinstance(recipients, str) else recipients):
        args += ["--to", r]
    r = srv.cli(*args)
    # Exit status as grep's: 0 all accepted, 1 something refused, 2 a wrong question.
    assert r.returncode in (0, 1), f"`postroom {' '.join(args)}` exited {r.returncode}: {r.stderr}"
    refused = bool(re.search(r"(?mi):\s*refuse\b", r.stdout))
    assert r.returncode == int(refused), f"exit {r.returncode} but refused={refused}:\n{r.stdout}"
    out = {"connect": None, "sender": None, "recipients": {}, "order": [], "raw": r.stdout}
    for line in r.stdout.splitlines():
        line = line.strip()
        m = re.match(r"(?i)connect\s*:\s*(accept|refuse)\b", line)
        if m:
            out["connect"] = m.group(1).lower()
            continue
        m = re.match(r"(?i)sender\s+<?([^\s>]*)>?\s*:\s*(accept|refuse)\b", line)
        if m:
            out["sender"] = m.group(2).lower()
            continue
        m = re.match(r"(?i)recipient\s+<?([^\s>]+?)>?\s*:\s*(deliver locally|relay|refuse)\b", line)
        if m:
            out["recipients"][m.group(1).lower()] = m.group(2).lower()
        m = re.match(r"(?i)recipient\s+(.*?):\s*(deliver locally|relay|refuse)\s*(\(rule:.*)?$", line)
        if m:
            out["order"].append((m.group(1), m.group(2).lower()))
    return out


# --------------------------------------------------------------------------------------------
# Operator features (SPEC F3-F6, D2 quota, O1-O3): queue ids from 250 replies, CLI with bytes
# on stdin, config rewrites between restarts, process memory.
# --------------------------------------------------------------------------------------------

def queued_id(reply: Reply) -> str:
    """The queue id in a DATA reply ("250 2.0.0 Ok: queued as QID")."""
    m = re.search(r"queued as\s+<?([A-Za-z0-9._-]+)>?", reply.text)
    assert m, f"no queue id in the DATA reply {reply!r}"
    return m.group(1)


def submit(srv: Server, rcpts, message: bytes, sender: str = JANE) -> str:
    """One SMTP transaction from 127.0.0.1 (every RCPT must get 250); returns the queue id."""
    if isinstance(rcpts, str):
        rcpts = [rcpts]
    c = smtp_session(srv)
    try:
        expect(c.cmd(f"MAIL FROM:<{sender}> BODY=8BITMIME"), 250)
        for r in rcpts:
            expect(c.cmd(f"RCPT TO:<{r}>"), 250)
        return queued_id(expect(c.data(message), 250))
    finally:
        c.quit()


def cli_bytes(srv: Server, *args: str, input: bytes = b"", timeout: float = 60.0,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`postroom --config FILE ARGS...` with raw bytes on stdin; stdout/stderr are bytes."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([str(BIN), "--config", str(srv.config_path), *args], input=input,
                          capture_output=True, timeout=timeout, env=e)


def rewrite_config(srv: Server, overrides: dict) -> None:
    """Rewrite the server's config file (base test config + overrides), e.g. between restarts."""
    srv.config_path.write_text(render_toml(merge_config(base_config(srv.data_dir), overrides)))


def server_pid(srv: Server) -> int:
    assert srv.proc is not None and srv.proc.poll() is None, "server is not running"
    return srv.proc.pid


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"(?m)^VmHWM:\s+(\d+)\s+kB", text)
    assert m, text
    return int(m.group(1)) / 1024.0


def mailbox_count(srv: Server, user: str, password: str) -> int:
    p = login_retry(srv, user, password)
    try:
        return p.stat()[0]
    finally:
        p.quit()


def maildrop_subjects(srv: Server, user: str, password: str) -> list[str]:
    """The Subject of every message in the maildrop, in order (TOP n 0: headers only)."""
    p = login_retry(srv, user, password, timeout=20)
    try:
        count, _ = p.stat()
        return [subject_of(b"\r\n".join(p.top(i, 0)[1]) + b"\r\n") for i in range(1, count + 1)]
    finally:
        p.quit()


def assert_delivered_exactly_once(srv: Server, user: str, password: str, acked, sent, event: str,
                                  timeout: float = 60.0) -> None:
    """F1 after `event` (kill -9, SIGTERM...): every subject in `acked` (answered 250) reaches the
    maildrop; once the queue is empty no subject is there twice and none that was not in `sent`."""
    acked = set(acked)
    deadline = time.monotonic() + timeout
    while True:
        missing = acked - set(maildrop_subjects(srv, user, password))
        if not missing:
            break
        assert time.monotonic() < deadline, (
            f"{len(missing)} of {len(acked)} acknowledged message(s) lost after {event}: "
            f"{sorted(missing)[:20]}")
        time.sleep(0.5)
    # Mail that was committed but never acknowledged may still be on its way: let it settle.
    deadline = time.monotonic() + 30
    while queue_entries(srv):
        assert time.monotonic() < deadline, srv.cli("queue", "list").stdout
        time.sleep(0.25)
    counts = collections.Counter(maildrop_subjects(srv, user, password))
    dups = {s: c for s, c in counts.items() if c > 1}
    assert not dups, (f"delivered more than once after {event} "
                      f"({sum(1 for s in dups if s in acked)} of them acknowledged): "
                      f"{dict(list(dups.items())[:20])}")
    strangers = set(counts) - set(sent)
    assert not strangers, f"messages nobody sent: {sorted(strangers)[:20]}"
