"""A scripted SMTP peer for the outbound-delivery tests (standard library only).

A `Peer` is a small threaded SMTP server on one loopback address (127.0.0.x) and port. It plays
a remote MX (or mail router) for Postroom's SMTP client and records everything it was sent:

    peer = Peer("127.0.0.51", port)            # port 0: the kernel picks one
    peer.rcpt["x@remote.example"] = "550 5.1.1 no such user here"
    peer.rcpt["y@remote.example"] = ["451 4.3.0 later", "451 4.3.0 later", "250 2.1.5 ok"]
    peer.data_reply = "250 2.0.0 queued"        # or a list: one reply per DATA, the last repeats
    peer.start()
    ...
    peer.transactions                           # every MAIL transaction, in order
    peer.connections                            # every TCP connection (client IP, TLS, times)
    peer.stop(); peer.start()                   # same address and port again

Replies are whole reply lines ("451 4.3.0 try later"); a list means "one per attempt" (the n-th
RCPT of that address, the n-th DATA, the n-th connection's greeting), its last element repeating.
A DATA reply "DROP" closes the connection after the message was received, without a reply.
`data_script(transaction)` may script the reply to each message's final dot instead: it returns
None (the defaults apply) or (delay_seconds, reply); `dot_at`/`replied_at` record when the dot came
and when the reply went out.
The peer offers PIPELINING, SIZE and 8BITMIME, and STARTTLS when `starttls=True` (a self-signed
certificate made with `openssl req -x509`, or `certfile`/`keyfile`); `tls_broken=True` accepts
STARTTLS and then answers the handshake with garbage, so the client's TLS handshake fails.

Every transaction keeps the DATA bytes exactly as received on the wire (`raw_data`, still
dot-stuffed, without the terminating ".\\r\\n") and un-stuffed (`message`); every connection keeps
all the bytes the client sent (`raw`). With "CHUNKING" in `caps` the peer also takes BDAT (RFC
3030): `raw_data` and `message` are then the chunks' octets joined, `chunks` their sizes, and the
reply to the LAST chunk is the DATA reply above.

`start_peers(ips)` binds several peers on the same port number (Postroom's `remote_port` is one
port for every MX host); the helpers at the end build a Postroom server wired to the peers and
to the DNS stub, and read bounces (RFC 3464) and `postroom queue` output.
"""

from __future__ import annotations

import email
import email.policy
import errno
import re
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CAPS = ["PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES"]


def _pick(spec, n: int) -> str:
    """The n-th (0-based) reply of spec: a string, or a list whose last element repeats."""
    if isinstance(spec, (list, tuple)):
        return spec[min(n, len(spec) - 1)]
    return spec


def unstuff(data: bytes) -> bytes:
    """Undo SMTP dot-stuffing (RFC 5321 §4.5.2): one leading dot removed from every line."""
    return re.sub(rb"(?m)^\.", b"", data)


def bare_line_endings(raw: bytes) -> list[int]:
    """Offsets of every CR not followed by LF and every LF not preceded by CR."""
    out = [m.start() for m in re.finditer(rb"\r(?!\n)", raw)]
    out += [m.start() for m in re.finditer(rb"(?<!\r)\n", raw)]
    return sorted(out)


_CERT_LOCK = threading.Lock()
_CERT_CACHE: dict[str, tuple[str, str]] = {}


def self_signed_cert(cn: str = "mx.remote.example") -> tuple[str, str]:
    """(cert.pem, key.pem) paths of a self-signed certificate for cn, made once per process."""
    with _CERT_LOCK:
        if cn in _CERT_CACHE:
            return _CERT_CACHE[cn]
        d = Path(tempfile.mkdtemp(prefix="smtppeer-cert-"))
        cert, key = d / "cert.pem", d / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}",
             "-addext", f"subjectAltName=DNS:{cn}"],
            check=True, capture_output=True, timeout=60,
        )
        _CERT_CACHE[cn] = (str(cert), str(key))
        return _CERT_CACHE[cn]


@dataclass
class Connection:
    index: int
    client_ip: str
    client_port: int
    opened: float
    closed: float | None = None
    tls: bool = False
    tls_failed: bool = False
    starttls_offered: bool = False
    helo: str | None = None
    authed: bool = False
    commands: list[str] = field(default_factory=list)
    # Per command: more of the client's bytes were already waiting when it was read, so the
    # client sent what followed without waiting for this reply (RFC 2920 pipelining).
    followed: list[bool] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)


@dataclass
class Transaction:
    connection: int
    client_ip: str
    tls: bool
    helo: str | None
    mail_from: str
    mail_params: str
    rcpts: list[tuple[str, int]] = field(default_factory=list)   # (address, reply code)
    raw_data: bytes | None = None
    # BDAT (RFC 3030): the size of each chunk received; empty when the message came by DATA.
    chunks: list[int] = field(default_factory=list)
    data_reply: int | None = None
    mail_reply: int | None = None
    at: float = 0.0
    # When the final dot arrived, and when the reply to it was sent (None: never sent).
    dot_at: float | None = None
    replied_at: float | None = None

    @property
    def accepted(self) -> list[str]:
        return [a for a, c in self.rcpts if 200 <= c < 300]

    @property
    def delivered(self) -> bool:
        return self.data_reply is not None and 200 <= self.data_reply < 300

    @property
    def message(self) -> bytes | None:
        if self.raw_data is None:
            return None
        return self.raw_data if self.chunks else unstuff(self.raw_data)


def _client_gone(sock) -> bool:
    """Has the client closed its side (EOF or reset waiting on the socket)?"""
    import select
    try:
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return False
        if isinstance(sock, ssl.SSLSocket):
            return sock.pending() == 0 and sock.recv(1) == b""
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ssl.SSLError, ValueError):
        return True


class _Wire:
    """Line reader over a (possibly TLS-upgraded) socket that keeps every byte read."""

    def __init__(self, sock: socket.socket, conn: Connection):
        self.sock = sock
        self.conn = conn
        self.buf = b""

    def readline(self) -> bytes | None:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except (OSError, ssl.SSLError):
                return None
            if not chunk:
                if self.buf:
                    line, self.buf = self.buf, b""
                    return line
                return None
            self.conn.raw += chunk
            self.buf += chunk
        i = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def read_exact(self, n: int) -> bytes | None:
        """Exactly n octets (a BDAT chunk), or None when the client goes away first."""
        while len(self.buf) < n:
            try:
                chunk = self.sock.recv(65536)
            except (OSError, ssl.SSLError):
                return None
            if not chunk:
                return None
            self.conn.raw += chunk
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\r\n")


class Peer:
    """One scripted SMTP server on (host, port)."""

    def __init__(self, host: str = "127.0.0.51", port: int = 0, name: str | None = None,
                 greeting="220 {name} ESMTP scripted peer", caps=None, starttls: bool = False,
                 tls_broken: bool = False, rcpt_default="250 2.1.5 ok", mail_reply="250 2.1.0 ok",
                 data_reply="250 2.0.0 queued", data_delay: float = 0.0, io_timeout: float = 60.0,
                 data_script=None, certfile: str | None = None, keyfile: str | None = None):
        self.host = host
        self.port = port
        self.name = name or f"peer-{host}"
        self.greeting = greeting
        self.caps = list(DEFAULT_CAPS if caps is None else caps)
        self.starttls = starttls
        self.tls_broken = tls_broken
        self.rcpt: dict[str, object] = {}
        self.rcpt_default = rcpt_default
        self.mail_reply = mail_reply
        self.data_reply = data_reply
        self.data_delay = data_delay
        self.io_timeout = io_timeout
        # Optional per-message script: data_script(transaction) is called once the final dot has
        # arrived and returns None (data_reply/data_delay apply) or (delay_seconds, reply), the
        # reply being a reply line or "DROP".
        self.data_script = data_script
        # The STARTTLS certificate chain and key (PEM files; keyfile None: in certfile); None: a
        # self-signed certificate for the peer's name.
        self.certfile = certfile
        self.keyfile = keyfile
        self.lock = threading.Lock()
        self.connections: list[Connection] = []
        self.transactions: list[Transaction] = []
        self.rcpt_params: list[tuple[str, str]] = []
        self._rcpt_seen: dict[str, int] = {}
        self._data_seen = 0
        self._mail_seen = 0
        self._active = 0
        self.max_active = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self._ssl_ctx: ssl.SSLContext | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def bind(self) -> "Peer":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.host, self.port))
            s.listen(64)
        except OSError:
            s.close()
            raise
        self.port = s.getsockname()[1]
        self._listener = s
        return self

    def start(self) -> "Peer":
        """Bind (again, on the same port once known) and serve."""
        if self._listener is None:
            deadline = time.monotonic() + 5
            while True:
                try:
                    self.bind()
                    break
                except OSError as e:
                    # Restart on the same port: a lingering socket may need a moment.
                    if e.errno != errno.EADDRINUSE or self.port == 0 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        if self.starttls and not self.tls_broken and self._ssl_ctx is None:
            if self.certfile:
                cert, key = self.certfile, self.keyfile
            else:
                cert, key = self_signed_cert(self.name if "." in self.name else "mx.remote.example")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self._ssl_ctx = ctx
        self._stop = threading.Event()
        t = threading.Thread(target=self._accept_loop, args=(self._listener, self._stop),
                             name=f"smtppeer-{self.host}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        """Close the listener and every open connection (the port is refused afterwards)."""
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
            self._listener = None
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(3)
        self._threads = [t for t in self._threads if t.is_alive()]

    @property
    def running(self) -> bool:
        return self._listener is not None

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        try:
            listener.settimeout(0.1)
        except OSError:  # stopped before this thread ran
            return
        while not stop.is_set():
            try:
                sock, addr = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock, addr), daemon=True)
            t.start()
            self._threads.append(t)

    # -- one connection ----------------------------------------------------------------------
    def _serve(self, sock: socket.socket, addr) -> None:
        with self.lock:
            conn = Connection(index=len(self.connections), client_ip=addr[0], client_port=addr[1],
                              opened=time.monotonic())
            self.connections.append(conn)
            self._active += 1
            self.max_active = max(self.max_active, self._active)
            self._socks.add(sock)
        try:
            sock.settimeout(self.io_timeout)
            self._session(sock, conn)
        except (OSError, ssl.SSLError, ValueError):  # ValueError: closed by stop()
            pass
        finally:
            with self.lock:
                self._active -= 1
                conn.closed = time.monotonic()
                self._socks.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _caps_reply(self, wire: _Wire, helo: str, conn: Connection) -> None:
        caps = list(self.caps)
        if (self.starttls or self.tls_broken) and not conn.tls:
            caps.append("STARTTLS")
            conn.starttls_offered = True
        lines = [f"{self.name} hello {helo}"] + caps
        for i, line in enumerate(lines):
            wire.send(("250 " if i == len(lines) - 1 else "250-") + line)

    def _session(self, sock, conn: Connection) -> None:
        wire = _Wire(sock, conn)
        greeting = _pick(self.greeting, conn.index).format(name=self.name)
        wire.send(greeting)
        refusing = not greeting.startswith("2")
        tx: Transaction | None = None
        while not self._stop.is_set():
            line = wire.readline()
            if line is None:
                return
            text = line.rstrip(b"\r\n").decode("latin-1")
            with self.lock:
                conn.commands.append(text)
                conn.followed.append(bool(wire.buf))
            verb = text.split(" ", 1)[0].upper()
            arg = text[len(verb):].strip()
            if verb == "QUIT":
                wire.send("221 2.0.0 bye")
                return
            if refusing:
                wire.send("503 5.5.1 go away")
                continue
            if verb in ("EHLO", "HELO"):
                conn.helo = arg
                tx = None
                if verb == "EHLO":
                    self._caps_reply(wire, arg, conn)
                else:
                    wire.send(f"250 {self.name}")
            elif verb == "STARTTLS":
                if not (self.starttls or self.tls_broken) or conn.tls:
                    wire.send("502 5.5.1 not offered")
                    continue
                wire.send("220 2.0.0 ready to start TLS")
                if self.tls_broken:
                    conn.tls_failed = True
                    time.sleep(0.05)
                    sock.sendall(b"this is not a TLS server hello\r\n" * 4)
                    return
                try:
                    tsock = self._ssl_ctx.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.tls_failed = True
                    return
                with self.lock:
                    self._socks.discard(sock)
                    self._socks.add(tsock)
                sock = tsock
                wire.sock = tsock
                wire.buf = b""
                conn.tls = True
                conn.helo = None
                conn.authed = False
                tx = None
            elif verb == "MAIL":
                if not self._mail_allowed(wire, conn):
                    continue
                m = re.match(r"(?i)FROM:\s*<([^>]*)>\s*(.*)$", arg)
                if not m:
                    wire.send("501 5.5.4 syntax")
                    continue
                tx = Transaction(connection=conn.index, client_ip=conn.client_ip, tls=conn.tls,
                                 helo=conn.helo, mail_from=m.group(1), mail_params=m.group(2),
                                 at=time.monotonic())
                with self.lock:
                    self.transactions.append(tx)
                    n = self._mail_seen
                    self._mail_seen += 1
                reply = _pick(self.mail_reply, n)
                tx.mail_reply = int(reply[:3])
                if not reply.startswith("2"):
                    tx = None  # refused: no transaction; RCPT gets 503
                wire.send(reply)
            elif verb == "RCPT":
                m = re.match(r"(?i)TO:\s*<([^>]*)>\s*(.*)$", arg)
                if tx is None or not m:
                    wire.send("503 5.5.1 need MAIL" if tx is None else "501 5.5.4 syntax")
                    continue
                addr = m.group(1)
                key = addr.lower()
                with self.lock:
                    n = self._rcpt_seen.get(key, 0)
                    self._rcpt_seen[key] = n + 1
                    spec = self.rcpt.get(key, self.rcpt.get(addr, self.rcpt_default))
                    self.rcpt_params.append((addr, m.group(2)))
                reply = _pick(spec, n)
                with self.lock:
                    tx.rcpts.append((addr, int(reply[:3])))
                wire.send(reply)
            elif verb == "DATA":
                if tx is None or not tx.accepted:
                    wire.send("554 5.5.1 no valid recipients")
                    continue
                wire.send("354 go ahead")
                chunks = []
                while True:
                    dl = wire.readline()
                    if dl is None:
                        return
                    if dl == b".\r\n":
                        break
                    chunks.append(dl)
                with self.lock:
                    tx.raw_data = b"".join(chunks)
                if not self._end_of_message(wire, sock, tx):
                    return
                tx = None
            elif verb == "BDAT" and "CHUNKING" in self.caps:
                m = re.fullmatch(r"(\d+)(\s+LAST)?\s*", arg, re.I)
                if not m:
                    wire.send("501 5.5.4 BDAT size [LAST]")
                    return  # the chunk's length is unknown
                data = wire.read_exact(int(m.group(1)))
                if data is None:
                    return
                if tx is None or not tx.accepted or (tx.raw_data is not None and not tx.chunks):
                    wire.send("503 5.5.1 no valid recipients")
                    continue
                with self.lock:
                    tx.raw_data = (tx.raw_data or b"") + data
                    tx.chunks.append(len(data))
                if not m.group(2):
                    wire.send(f"250 2.0.0 {len(data)} octets received")
                    continue
                if not self._end_of_message(wire, sock, tx):
                    return
                tx = None
            elif verb == "RSET":
                tx = None
                wire.send("250 2.0.0 ok")
            elif verb == "NOOP":
                wire.send("250 2.0.0 ok")
            else:
                handled = self._extra_verb(verb, arg, wire, conn)
                if handled is None:
                    return
                if not handled:
                    wire.send("502 5.5.2 not implemented")

    def _end_of_message(self, wire: "_Wire", sock, tx: Transaction) -> bool:
        """The message is in (the final dot, or the LAST chunk): reply as scripted. False when
        the connection is to end without a reply."""
        with self.lock:
            tx.dot_at = time.monotonic()
            n = self._data_seen
            self._data_seen += 1
        scripted = self.data_script(tx) if self.data_script is not None else None
        delay = self.data_delay if scripted is None else scripted[0]
        if delay:
            time.sleep(delay)
            if _client_gone(sock):
                return False  # nobody to hear the reply: not a delivery
        reply = _pick(self.data_reply, n) if scripted is None else scripted[1]
        if reply == "DROP":  # the message arrived, but the connection dies before the reply
            return False
        with self.lock:
            tx.data_reply = int(reply[:3])
        wire.send(reply)
        with self.lock:
            tx.replied_at = time.monotonic()
        return True

    def _mail_allowed(self, wire: "_Wire", conn: Connection) -> bool:
        """Hook: may MAIL proceed on this connection? (ExtPeer demands AUTH.)"""
        return True

    def _extra_verb(self, verb: str, arg: str, wire: "_Wire", conn: Connection) -> bool | None:
        """Hook for verbs the base peer does not know: True handled, False not, None = hang up."""
        return False

    # -- what was seen -----------------------------------------------------------------------
    def delivered(self) -> list[Transaction]:
        with self.lock:
            return [t for t in self.transactions if t.delivered]

    def delivered_to(self, address: str) -> list[Transaction]:
        a = address.lower()
        return [t for t in self.delivered() if a in (x.lower() for x in t.accepted)]

    def rcpt_count(self, address: str) -> int:
        with self.lock:
            return self._rcpt_seen.get(address.lower(), 0)

    def reset_counts(self) -> None:
        with self.lock:
            self._rcpt_seen.clear()
            self._data_seen = 0
            self._mail_seen = 0

    def wait_delivered(self, address: str, n: int = 1, timeout: float = 30.0) -> list[Transaction]:
        """Wait until at least n transactions delivered (DATA accepted) to address."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.delivered_to(address)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} ({self.host}:{self.port}): {len(got)} delivery(ies) to {address}, "
                    f"expected {n} within {timeout}s; transactions: {self.summary()}")
            time.sleep(0.1)

    def wait_rcpt(self, address: str, n: int = 1, timeout: float = 30.0) -> None:
        """Wait until RCPT TO:<address> has been seen at least n times."""
        deadline = time.monotonic() + timeout
        while self.rcpt_count(address) < n:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: RCPT {address} seen {self.rcpt_count(address)} time(s), expected "
                    f"{n} within {timeout}s; transactions: {self.summary()}")
            time.sleep(0.1)

    def summary(self) -> str:
        with self.lock:
            txs = [(t.client_ip, t.mail_from, t.rcpts, t.data_reply, "tls" if t.tls else "plain")
                   for t in self.transactions]
            return f"{len(self.connections)} connection(s), transactions {txs!r}"


def start_peers(ips, start: bool = True, attempts: int = 50, **kwargs) -> list[Peer]:
    """One Peer per IP, all on the same port number (chosen by the kernel for the first)."""
    last = None
    for _ in range(attempts):
        peers: list[Peer] = []
        try:
            port = 0
            for ip in ips:
                p = Peer(ip, port, **kwargs)
                p.bind()
                peers.append(p)
                port = p.port
        except OSError as e:
            last = e
            for p in peers:
                p.stop()
            continue
        if start:
            for p in peers:
                p.start()
        return peers
    raise RuntimeError(f"could not bind peers on {ips} to one port: {last}")


def max_overlap(connections) -> int:
    """The largest number of connections open at the same moment."""
    events = []
    now = time.monotonic()
    for c in connections:
        events.append((c.opened, 1))
        events.append((c.closed if c.closed is not None else now, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def free_port(host: str = "127.0.0.1") -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------------------------
# Outbound test harness: a Postroom server wired to the DNS stub and the peers
# --------------------------------------------------------------------------------------------

SAM_USER, SAM_ADDR, SAM_PW = "sam", "sam@example.test", "sam-secret-1"
ADMIN_USER, ADMIN_ADDR, ADMIN_PW = "admin", "admin@example.test", "admin-secret-1"

# Fast schedule for tests: one first-level retry after 1 s, one second-level retry after 1 s.
FAST_RETRY = {
    "first_retry_count": 1,
    "first_retry_interval_secs": 1,
    "second_retry_count": 1,
    "second_retry_interval_secs": 1,
}

OUT_TIMEOUT = 30.0


def outbound_server(make_server, stub, port: int, delivery: dict | None = None,
                    start: bool = True, users: bool = True, **overrides):
    """A Postroom server whose DNS is the stub, whose remote_port is the peers' port, that relays
    for 127.0.0.0/8 (relay list), with users sam (sam@example.test) and admin (admin@example.test,
    the postmaster) enrolled."""
    d = {"remote_port": port, **FAST_RETRY}
    d.update(delivery or {})
    relay = overrides.pop("relay", {"mode": "list"})
    srv = make_server(start=False, dns={"servers": [stub.address]}, delivery=d, relay=relay,
                      **overrides)
    if users:
        srv.add_user(SAM_USER, SAM_ADDR, SAM_PW)
        srv.add_user(ADMIN_USER, ADMIN_ADDR, ADMIN_PW)
    srv.cli_ok("list", "add", "relay", "127.0.0.0/8")
    if start:
        srv.start()
    return srv


def queue_rows(srv) -> list[dict]:
    """Lines of `postroom queue list` that name a recipient: {"id", "state", "recipient", "line"}."""
    r = srv.cli_ok("queue", "list")
    rows = []
    for line in r.stdout.splitlines():
        tokens = line.split()
        if len(tokens) < 3 or tokens[0].lower() == "id":
            continue
        rcpt = next((t.strip("<>,").lower() for t in tokens[2:] if "@" in t), None)
        if rcpt is None:
            continue
        rows.append({"id": tokens[0], "state": tokens[1], "recipient": rcpt, "line": line})
    return rows


def queue_row(srv, recipient: str) -> dict | None:
    for r in queue_rows(srv):
        if r["recipient"] == recipient.lower():
            return r
    return None


def wait_queue_row(srv, recipient: str, pred=lambda row: True, timeout: float = OUT_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = queue_row(srv, recipient)
        if row is not None and pred(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"`queue list` has no matching row for {recipient} after {timeout}s:\n"
                                 + srv.cli("queue", "list").stdout)
        time.sleep(0.2)


def wait_not_queued(srv, recipient: str, timeout: float = OUT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while queue_row(srv, recipient) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{recipient} still in `queue list` after {timeout}s:\n"
                                 + srv.cli("queue", "list").stdout)
        time.sleep(0.2)


def wait_queue_empty(srv, timeout: float = OUT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while queue_rows(srv):
        if time.monotonic() > deadline:
            raise AssertionError(f"queue not empty after {timeout}s:\n" + srv.cli("queue", "list").stdout)
        time.sleep(0.2)


_JOURNAL_CODE = re.compile(r"[+-]\d{4}\s+(\S+)\s")


def journal_entries(srv, code: str | None = None) -> list[tuple[str, str]]:
    """(code, line) of every journal line (optionally only codes starting with `code`)."""
    args = ["journal"] + (["--code", code] if code else [])
    out = []
    for line in srv.cli_ok(*args).stdout.splitlines():
        m = _JOURNAL_CODE.search(line)
        if m:
            out.append((m.group(1), line))
    return out


def wait_journal_code(srv, codes, pred=lambda line: True, timeout: float = OUT_TIMEOUT) -> list[str]:
    """Poll the journal until a line with one of `codes` satisfies pred; returns those lines."""
    if isinstance(codes, str):
        codes = [codes]
    deadline = time.monotonic() + timeout
    while True:
        entries = journal_entries(srv)
        hits = [line for c, line in entries if c in codes and pred(line)]
        if hits:
            return hits
        if time.monotonic() > deadline:
            raise AssertionError(f"no journal entry with code in {codes} matching after {timeout}s; "
                                 "journal:\n" + "\n".join(line for _, line in entries[-60:]))
        time.sleep(0.2)


def is_bounce(raw: bytes) -> bool:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return re.search(rb"(?mi)^From:.*MAILER-DAEMON", head) is not None


def parse_bounce(raw: bytes) -> dict:
    """Parse an RFC 3464 bounce. Returns {"msg", "per_message", "recipients": [fields dict...],
    "original": str (the attached headers or message), "text": the human-readable part}.
    Field names are lowercased; values whitespace-normalised."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    out = {"msg": msg, "per_message": {}, "recipients": [], "original": None, "text": ""}
    for part in msg.walk():
        ct = part.get_content_type()
        if ct == "message/delivery-status":
            blocks = part.get_payload()
            if isinstance(blocks, str):  # not parsed into blocks: do it by hand
                blocks = [email.message_from_string(b.strip() + "\n")
                          for b in re.split(r"\r?\n\r?\n", blocks) if b.strip()]
            for i, b in enumerate(blocks):
                fields = {k.lower(): " ".join(str(v).split()) for k, v in b.items()}
                if i == 0 and "final-recipient" not in fields:
                    out["per_message"] = fields
                else:
                    out["recipients"].append(fields)
        elif ct in ("text/rfc822-headers", "message/rfc822") and out["original"] is None:
            if ct == "message/rfc822":
                inner = part.get_payload()
                inner = inner[0] if isinstance(inner, list) and inner else inner
                out["original"] = inner.as_string() if hasattr(inner, "as_string") else str(inner)
            else:
                payload = part.get_payload(decode=True)
                out["original"] = payload.decode("utf-8", "replace") if payload else str(part.get_payload())
        elif ct == "text/plain" and not out["text"]:
            payload = part.get_payload(decode=True)
            out["text"] = payload.decode("utf-8", "replace") if payload else ""
    return out


def bounce_for(bounce: dict, recipient: str) -> dict | None:
    """The per-recipient DSN fields whose Final-Recipient is recipient."""
    for f in bounce["recipients"]:
        fr = f.get("final-recipient", "")
        typ, _, addr = fr.partition(";")
        if addr.strip().strip("<>").lower() == recipient.lower():
            return f
    return None


def assert_bounce(raw: bytes, recipient: str, status_re: str = r"5\.\d{1,3}\.\d{1,3}",
                  diagnostic: str | None = None, original_subject: str | None = None) -> dict:
    """Check one bounce message for recipient (SPEC C4, RFC 3464); returns the recipient fields."""
    b = parse_bounce(raw)
    msg = b["msg"]
    assert "mailer-daemon" in (msg.get("From") or "").lower(), msg.get("From")
    assert (msg.get("Auto-Submitted") or "").strip().lower().startswith("auto-replied"), \
        f"Auto-Submitted: {msg.get('Auto-Submitted')!r}"
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert (msg.get_param("report-type") or "").lower() == "delivery-status", msg.get("Content-Type")
    f = bounce_for(b, recipient)
    assert f is not None, f"no per-recipient block for {recipient}: {b['recipients']!r}\n{raw[:3000]!r}"
    typ = f["final-recipient"].split(";", 1)[0].strip().lower()
    assert typ == "rfc822", f["final-recipient"]
    assert f.get("action", "").lower() == "failed", f
    assert re.fullmatch(status_re, f.get("status", "").split()[0] if f.get("status") else ""), \
        f"Status {f.get('status')!r} does not match {status_re}; fields {f!r}"
    if diagnostic is not None:
        assert diagnostic.lower() in f.get("diagnostic-code", "").lower(), \
            f"Diagnostic-Code {f.get('diagnostic-code')!r} lacks {diagnostic!r}"
    if original_subject is not None:
        assert b["original"] is not None, "no text/rfc822-headers or message/rfc822 part"
        assert original_subject in b["original"], b["original"][:2000]
    return f


def wait_bounces(srv, user: str, password: str, n: int = 1, timeout: float = OUT_TIMEOUT) -> list[bytes]:
    """Poll the user's maildrop until it holds at least n bounces (From MAILER-DAEMON)."""
    from helpers import fetch_all
    deadline = time.monotonic() + timeout
    while True:
        msgs = fetch_all(srv, user, password)
        bounces = [m for m in msgs if is_bounce(m)]
        if len(bounces) >= n:
            return bounces
        if time.monotonic() > deadline:
            raise AssertionError(f"{user} has {len(bounces)} bounce(s) (of {len(msgs)} messages), "
                                 f"expected {n} within {timeout}s; queue:\n"
                                 + srv.cli("queue", "list").stdout)
        time.sleep(0.3)


def mailbox_stays(srv, user: str, password: str, n: int, seconds: float = 3.0) -> list[bytes]:
    """Assert the user's maildrop holds exactly n messages for `seconds`; returns them."""
    from helpers import fetch_all
    deadline = time.monotonic() + seconds
    while True:
        msgs = fetch_all(srv, user, password)
        assert len(msgs) == n, f"{user} has {len(msgs)} messages, expected {n}: " \
                               f"{[m[:300] for m in msgs]!r}"
        if time.monotonic() > deadline:
            return msgs
        time.sleep(0.5)


def relay(srv, sender: str, recipients, message: bytes, source_ip: str = "127.0.0.1") -> None:
    """Submit one message over SMTP from a relay-listed loopback address; every RCPT must be 250."""
    from helpers import dot_stuff, expect, smtp_from
    if isinstance(recipients, str):
        recipients = [recipients]
    c = smtp_from(srv, source_ip)
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{sender}> BODY=8BITMIME"), 250)
        for r in recipients:
            expect(c.cmd(f"RCPT TO:<{r}>"), 250)
        expect(c.cmd("DATA"), 354)
        c.send(dot_stuff(message) + b".\r\n")
        expect(c.read_reply(), 250)
    finally:
        c.quit()


# --------------------------------------------------------------------------------------------
# The usual remote world: remote.example has two MX hosts, other.example one
# --------------------------------------------------------------------------------------------

MX1_IP, MX2_IP, OTHER_IP = "127.0.0.51", "127.0.0.52", "127.0.0.53"


class Net:
    """DNS stub + three peers on one port:

        remote.example  MX 10 mx1.remote.example (127.0.0.51), MX 20 mx2.remote.example (127.0.0.52)
                        (listed in the answer in the order 20, 10: the client must sort)
        other.example   MX 10 mx.other.example (127.0.0.53)  - one MX host only
    """

    def __init__(self, make_server, stub, **peer_kwargs):
        self.make_server = make_server
        self.stub = stub
        self.mx1, self.mx2, self.other = start_peers([MX1_IP, MX2_IP, OTHER_IP], **peer_kwargs)
        self.mx1.name, self.mx2.name, self.other.name = \
            "mx1.remote.example", "mx2.remote.example", "mx.other.example"
        self.peers = [self.mx1, self.mx2, self.other]
        self.port = self.mx1.port
        stub.mx("remote.example", (20, "mx2.remote.example"), (10, "mx1.remote.example"))
        stub.a("mx1.remote.example", MX1_IP)
        stub.a("mx2.remote.example", MX2_IP)
        stub.mx("other.example", (10, "mx.other.example"))
        stub.a("mx.other.example", OTHER_IP)

    def server(self, delivery: dict | None = None, **kw):
        return outbound_server(self.make_server, self.stub, self.port, delivery, **kw)

    def extra_peer(self, ip: str, **kw) -> Peer:
        """One more peer on the same port (another 127.0.0.x)."""
        p = Peer(ip, self.port, **kw).start()
        self.peers.append(p)
        return p

    def stop(self) -> None:
        for p in self.peers:
            p.stop()


try:
    import pytest as _pytest

    @_pytest.fixture
    def net(make_server, mx_dns_stub):
        """A Net (DNS stub with MX records, peers mx1/mx2/other on one port); see Net."""
        n = Net(make_server, mx_dns_stub)
        yield n
        n.stop()
except ImportError:  # pragma: no cover
    pass


# --------------------------------------------------------------------------------------------
# Added for test_dsn / test_hostauth / test_etrn (SPEC C4, C5 host authentication, C7):
# a Peer subclass that can also advertise DSN, take AUTH (and require it), and answer ETRN.
# Peer itself is unchanged.
# --------------------------------------------------------------------------------------------

import base64 as _base64  # noqa: E402


@dataclass
class AuthRecord:
    connection: int
    client_ip: str
    tls: bool                     # was the connection under TLS when AUTH was sent?
    mechanism: str
    authzid: str | None
    user: str | None
    password: str | None
    reply: int


@dataclass
class EtrnRecord:
    connection: int
    client_ip: str
    tls: bool
    argument: str
    reply: int


def _b64decode(text: str) -> bytes | None:
    try:
        return _base64.b64decode(text.strip(), validate=True)
    except (ValueError, _base64.binascii.Error):
        return None


class ExtPeer(Peer):
    """A Peer with optional extensions (everything else behaves as Peer):

        dsn=True                 advertise DSN (RFC 3461) in EHLO
        auth=["PLAIN", "LOGIN"]  advertise AUTH with these mechanisms and accept AUTH
        auth_before_tls=True     advertise AUTH before STARTTLS too (False: only under TLS)
        require_auth=True        MAIL FROM without a successful AUTH gets 530 5.7.0
        auth_reply="235 ..."     reply to a complete AUTH exchange (a list: one per AUTH)
        etrn=True                advertise ETRN (RFC 1985) and record ETRN commands
        etrn_reply="250 ..."     reply to ETRN (a list: one per ETRN)

    `auths` records every AUTH (decoded credentials, and whether it came under TLS); `etrns`
    every ETRN. MAIL/RCPT parameters are in `transactions[i].mail_params` and in `rcpt_params`
    [(address, parameter string)], as well as in each connection's `commands`.
    """

    def __init__(self, host: str = "127.0.0.61", port: int = 0, *, dsn: bool = False,
                 auth=None, auth_before_tls: bool = True, require_auth: bool = False,
                 auth_reply="235 2.7.0 authenticated", etrn: bool = False,
                 etrn_reply="250 2.0.0 queuing started", **kwargs):
        super().__init__(host, port, **kwargs)
        self.dsn = dsn
        self.auth = list(auth) if auth else []
        self.auth_before_tls = auth_before_tls
        self.require_auth = require_auth
        self.auth_reply = auth_reply
        self.etrn = etrn
        self.etrn_reply = etrn_reply
        self.auths: list[AuthRecord] = []
        self.etrns: list[EtrnRecord] = []
        self._auth_seen = 0
        self._etrn_seen = 0

    def _caps_reply(self, wire: _Wire, helo: str, conn: Connection) -> None:
        caps = list(self.caps)
        if self.dsn:
            caps.append("DSN")
        if self.etrn:
            caps.append("ETRN")
        if self.auth and (conn.tls or self.auth_before_tls):
            caps.append("AUTH " + " ".join(self.auth))
        if (self.starttls or self.tls_broken) and not conn.tls:
            caps.append("STARTTLS")
            conn.starttls_offered = True
        lines = [f"{self.name} hello {helo}"] + caps
        for i, line in enumerate(lines):
            wire.send(("250 " if i == len(lines) - 1 else "250-") + line)

    def _read_sasl(self, wire: _Wire, conn: Connection) -> str | None:
        line = wire.readline()
        if line is None:
            return None
        text = line.rstrip(b"\r\n").decode("latin-1")
        with self.lock:
            conn.commands.append(text)
        return text

    def _auth(self, wire: _Wire, conn: Connection, arg: str) -> bool | None:
        """One AUTH exchange. True: authenticated; False: not; None: connection gone."""
        if not self.auth:
            wire.send("502 5.5.1 AUTH not offered")
            return False
        parts = arg.split()
        mech = parts[0].upper() if parts else ""
        initial = parts[1] if len(parts) > 1 else None
        if mech not in [m.upper() for m in self.auth]:
            wire.send("504 5.5.4 mechanism not supported")
            return False
        authzid = user = password = None
        if mech == "PLAIN":
            if initial is None:
                wire.send("334 ")
                initial = self._read_sasl(wire, conn)
                if initial is None:
                    return None
            if initial.strip() == "*":
                wire.send("501 5.0.0 cancelled")
                return False
            raw = _b64decode(initial)
            fields = raw.split(b"\0") if raw is not None else []
            if len(fields) != 3:
                wire.send("501 5.5.2 malformed PLAIN response")
                return False
            authzid, user, password = (f.decode("utf-8", "replace") for f in fields)
        elif mech == "LOGIN":
            if initial is None:
                wire.send("334 VXNlcm5hbWU6")
                initial = self._read_sasl(wire, conn)
                if initial is None:
                    return None
            u = _b64decode(initial) if initial.strip() != "*" else None
            if u is None:
                wire.send("501 5.0.0 cancelled or malformed")
                return False
            wire.send("334 UGFzc3dvcmQ6")
            pw_line = self._read_sasl(wire, conn)
            if pw_line is None:
                return None
            p = _b64decode(pw_line) if pw_line.strip() != "*" else None
            if p is None:
                wire.send("501 5.0.0 cancelled or malformed")
                return False
            user, password = u.decode("utf-8", "replace"), p.decode("utf-8", "replace")
        else:  # another advertised mechanism (e.g. CRAM-MD5): not implemented here
            wire.send("504 5.5.4 mechanism not implemented by the scripted peer")
            return False
        with self.lock:
            n = self._auth_seen
            self._auth_seen += 1
        reply = _pick(self.auth_reply, n)
        with self.lock:
            self.auths.append(AuthRecord(conn.index, conn.client_ip, conn.tls, mech, authzid, user,
                                         password, int(reply[:3])))
        wire.send(reply)
        return reply.startswith("2")

    def _mail_allowed(self, wire: _Wire, conn: Connection) -> bool:
        if self.require_auth and not conn.authed:
            wire.send("530 5.7.0 Authentication required")
            return False
        return True

    def _extra_verb(self, verb: str, arg: str, wire: _Wire, conn: Connection) -> bool | None:
        if verb == "AUTH":
            if conn.authed:
                wire.send("503 5.5.1 already authenticated")
                return True
            ok = self._auth(wire, conn, arg)
            if ok is None:
                return None
            conn.authed = conn.authed or ok
            return True
        if verb == "ETRN" and self.etrn:
            with self.lock:
                n = self._etrn_seen
                self._etrn_seen += 1
            reply = _pick(self.etrn_reply, n)
            with self.lock:
                self.etrns.append(EtrnRecord(conn.index, conn.client_ip, conn.tls, arg, int(reply[:3])))
            wire.send(reply)
            return True
        return False

    def wait_etrn(self, n: int = 1, timeout: float = 30.0) -> list[EtrnRecord]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                got = list(self.etrns)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {len(got)} ETRN command(s), expected {n} within "
                                     f"{timeout}s; connections: {len(self.connections)}, commands: "
                                     f"{[c.commands for c in self.connections]!r}")
            time.sleep(0.1)


def ext_peer(net: "Net", ip: str, name: str, **kwargs) -> ExtPeer:
    """An ExtPeer on another 127.0.0.x, on the Net's port (remote_port), stopped with the Net."""
    p = ExtPeer(ip, net.port, name=name, **kwargs).start()
    net.peers.append(p)
    return p


def commands_of(peer: Peer) -> list[str]:
    """Every command line the peer received, over all connections, in order."""
    with peer.lock:
        return [c for conn in peer.connections for c in conn.commands]


def rcpt_lines(peer: Peer, address: str) -> list[str]:
    """Every "RCPT TO:<address> ..." line the peer received (any Peer, case-insensitive)."""
    want = address.lower()
    out = []
    for c in commands_of(peer):
        m = re.match(r"(?i)RCPT\s+TO:\s*<([^>]*)>", c)
        if m and m.group(1).lower() == want:
            out.append(c)
    return out


def esmtp_params(param_text: str) -> dict[str, str]:
    """"RET=FULL ENVID=x BODY=8BITMIME" -> {"RET": "FULL", "ENVID": "x", "BODY": "8BITMIME"}
    (keywords uppercased, values exactly as sent)."""
    out = {}
    for tok in param_text.split():
        k, _, v = tok.partition("=")
        out[k.upper()] = v
    return out
