"""Fixture and helpers for the TLS and authentication tests (SPEC S2, S3, S6, A1-A5, P1, P2).

Imported by test_tls.py, test_auth.py and test_throttle.py:
    from conftest_tls import make_tls_server  # noqa: F401  (the fixture)

`make_tls_server(**overrides)` starts a server with every listener on 127.0.0.1 port 0:
smtp (`listen`, STARTTLS), submission (`submission_listen`, STARTTLS + AUTH), smtps
(`tls_listen`, implicit TLS), pop3 (STLS) and pop3s (implicit TLS), and enrols three users
(sam, kim, admin). It waits until `data_dir/listening` names every listener the configuration
asks for (socket_layer decides which POP3 ones), so it also works with pop3 or pop3s absent.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from helpers import (
    CLIENT_NAME,
    HOSTNAME,
    IO_TIMEOUT,
    Closed,
    RawPop,
    Reply,
    Server,
    SmtpClient,
    SourcePop,
    _connect_from,
    base_config,
    expect,
    merge_config,
)

# Users enrolled by make_tls_server: (name, addresses, password).
SAM_USER = ("sam", ["sam@example.test", "SamJones@example.test"], "sam-secret-1")
KIM_USER = ("kim", ["kim@example.test"], "kim-secret-2")
ADMIN_USER = ("admin", ["admin@example.test"], "admin-secret-3")
SAM_NAME, SAM_ADDR, SAM_PW = "sam", "sam@example.test", "sam-secret-1"
KIM_NAME, KIM_ADDR, KIM_PW = "kim", "kim@example.test", "kim-secret-2"
ADMIN_NAME, ADMIN_PW = "admin", "admin-secret-3"
REMOTE = "someone@remote.example"

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
SWAKS = shutil.which("swaks")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (add it to .ci/run)")


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

def tls_base_overrides() -> dict:
    return {
        "smtp": {
            "listen": ["127.0.0.1:0"],
            "submission_listen": ["127.0.0.1:0"],
            "tls_listen": ["127.0.0.1:0"],
        },
        "pop3": {
            "listen": ["127.0.0.1:0"],
            "tls_listen": ["127.0.0.1:0"],
        },
        "dns": {"servers": ["127.0.0.1:9"]},
    }


class TlsServer(Server):
    """A Server whose readiness is every listener its configuration asks for."""

    def __init__(self, tmp: Path, overrides: dict | None = None, name: str = "server"):
        merged = tls_base_overrides()
        for k, v in (overrides or {}).items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
        super().__init__(tmp, merged, name=name)
        self.cfg = merge_config(base_config(self.data_dir), merged)

    def expected_listeners(self) -> set[str]:
        smtp, pop3 = self.cfg.get("smtp", {}), self.cfg.get("pop3", {})
        layer = pop3.get("socket_layer", "both")
        want = set()
        if smtp.get("listen"):
            want.add("smtp")
        if smtp.get("submission_listen"):
            want.add("submission")
        if smtp.get("tls_listen"):
            want.add("smtps")
        if pop3.get("listen") and layer != "secure":
            want.add("pop3")
        if pop3.get("tls_listen") and layer != "nonsecure":
            want.add("pop3s")
        return want

    def listening_names(self) -> list[str]:
        text = (self.data_dir / "listening").read_text(errors="replace")
        return [line.split()[0] for line in text.splitlines() if line.split()]


@pytest.fixture
def make_tls_server(tmp_path, request):
    """Factory: make_tls_server(start=True, users=True, relay_list=(), **overrides) -> TlsServer."""
    servers: list[TlsServer] = []
    request.node.postroom_servers = servers

    def _make(start: bool = True, users: bool = True, relay_list=(), **overrides) -> TlsServer:
        name = f"server{len(servers) + 1}" if servers else "server"
        srv = TlsServer(tmp_path / name, overrides, name=name)
        servers.append(srv)
        if users:
            for u in (SAM_USER, KIM_USER, ADMIN_USER):
                srv.add_user(*u)
        for entry in relay_list:
            srv.cli_ok("list", "add", "relay", entry)
        if start:
            srv.start()
        return srv

    yield _make
    for srv in servers:
        srv.stop()


# --------------------------------------------------------------------------------------------
# TLS clients
# --------------------------------------------------------------------------------------------

def client_ctx() -> ssl.SSLContext:
    """A client context that accepts any certificate (the test certificates are self-signed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def b64(s: str | bytes) -> str:
    if isinstance(s, str):
        s = s.encode()
    return base64.b64encode(s).decode()


def plain_token(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def ehlo_keywords(reply: Reply) -> dict[str, list[str]]:
    """EHLO reply -> {KEYWORD: [params...]} (uppercased)."""
    out = {}
    for line in reply.lines[1:]:
        parts = line.split()
        if parts:
            out[parts[0].upper()] = [p.upper() for p in parts[1:]]
    return out


def smtp_plain(addr, source_ip: str | None = None, timeout: float = IO_TIMEOUT) -> SmtpClient:
    """Raw SMTP client (greeting read into c.greeting), optionally bound to source_ip."""
    c = SmtpClient.__new__(SmtpClient)
    c.sock = _connect_from(addr, source_ip, timeout)
    c.buf = b""
    c.greeting = None
    try:
        c.greeting = c.read_reply()
    except BaseException:
        c.close()
        raise
    return c


def starttls(c: SmtpClient) -> ssl.SSLSocket:
    """STARTTLS (220), then the TLS handshake on the same socket."""
    r = c.cmd("STARTTLS")
    expect(r, 220)
    assert c.buf == b"", f"the server sent bytes after its 220 to STARTTLS: {c.buf!r}"
    c.sock = client_ctx().wrap_socket(c.sock, server_hostname=HOSTNAME)
    return c.sock


def smtps_client(addr, source_ip: str | None = None, timeout: float = IO_TIMEOUT) -> SmtpClient:
    """Implicit TLS SMTP client: handshake first, then the greeting."""
    raw = _connect_from(addr, source_ip, timeout)
    c = SmtpClient.__new__(SmtpClient)
    c.buf = b""
    c.greeting = None
    try:
        c.sock = client_ctx().wrap_socket(raw, server_hostname=HOSTNAME)
        c.greeting = c.read_reply()
    except BaseException:
        raw.close()
        raise
    return c


def smtp_tls_session(srv: TlsServer, listener: str, source_ip: str | None = None) -> SmtpClient:
    """A session over TLS on `listener` ("smtp", "submission": STARTTLS; "smtps": implicit),
    with EHLO done after TLS. The post-TLS EHLO reply is in c.ehlo_reply."""
    addr = getattr(srv, listener)
    assert addr is not None, f"no {listener} listener"
    if listener == "smtps":
        c = smtps_client(addr, source_ip)
        expect(c.greeting, 220)
    else:
        c = smtp_plain(addr, source_ip)
        expect(c.greeting, 220)
        c.ehlo()
        starttls(c)
    c.ehlo_reply = c.ehlo()
    return c


def smtp_auth_plain(c: SmtpClient, user: str, password: str) -> Reply:
    return c.cmd(f"AUTH PLAIN {plain_token(user, password)}")


def smtp_login(c: SmtpClient, user: str, password: str) -> SmtpClient:
    expect(smtp_auth_plain(c, user, password), 235)
    return c


def nothing_arrives(sock, seconds: float = 0.7) -> bytes:
    """Bytes the server sends unprompted within `seconds` (b"" if none; EOF raises Closed)."""
    old = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
        if not data:
            raise Closed("connection closed by server")
        return data
    except (socket.timeout, TimeoutError):
        return b""
    except ssl.SSLWantReadError:
        return b""
    finally:
        sock.settimeout(old)


# POP3 -------------------------------------------------------------------------------------

def pop_plain(addr, source_ip: str | None = None, timeout: float = IO_TIMEOUT) -> SourcePop:
    return SourcePop(addr, source_ip, timeout)


def pop_stls(p: RawPop) -> ssl.SSLSocket:
    r = p.cmd("STLS")
    assert r.startswith(b"+OK"), f"STLS: {r!r}"
    assert p.buf == b"", f"the server sent bytes after its +OK to STLS: {p.buf!r}"
    p.sock = client_ctx().wrap_socket(p.sock, server_hostname=HOSTNAME)
    return p.sock


def pops_client(addr, source_ip: str | None = None, timeout: float = IO_TIMEOUT) -> SourcePop:
    raw = _connect_from(addr, source_ip, timeout)
    p = SourcePop.__new__(SourcePop)
    p.source_ip = source_ip
    p.buf = b""
    try:
        p.sock = client_ctx().wrap_socket(raw, server_hostname=HOSTNAME)
        p.greeting = p.read_line()
    except BaseException:
        raw.close()
        raise
    return p


def pop_capa(p: RawPop) -> list[str]:
    r = p.cmd("CAPA")
    assert r.startswith(b"+OK"), f"CAPA: {r!r}"
    return [line.decode(errors="replace").rstrip("\r\n") for line in p.read_multiline_raw()]


def capa_has(caps: list[str], word: str) -> bool:
    return any(c.split()[:1] == [word] for c in caps if c.split())


def capa_sasl(caps: list[str]) -> list[str]:
    for c in caps:
        parts = c.split()
        if parts and parts[0].upper() == "SASL":
            return [m.upper() for m in parts[1:]]
    return []


def pop3_ssl(srv: TlsServer, timeout: float = IO_TIMEOUT) -> poplib.POP3_SSL:
    return poplib.POP3_SSL(srv.pop3s[0], srv.pop3s[1], timeout=timeout, context=client_ctx())


# Certificates -----------------------------------------------------------------------------

def peer_cert(srv: TlsServer, listener: str, timeout: float = IO_TIMEOUT) -> bytes:
    """DER of the certificate the server presents on `listener`."""
    addr = getattr(srv, listener)
    if listener == "smtps":
        c = smtps_client(addr, timeout=timeout)
    elif listener in ("smtp", "submission"):
        c = smtp_plain(addr, timeout=timeout)
        expect(c.greeting, 220)
        c.ehlo()
        starttls(c)
    elif listener == "pop3s":
        c = pops_client(addr, timeout=timeout)
    elif listener == "pop3":
        c = pop_plain(addr, timeout=timeout)
        pop_stls(c)
    else:
        raise ValueError(listener)
    try:
        return c.sock.getpeercert(binary_form=True)
    finally:
        c.close()


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def make_cert_pair(directory: Path, cn: str, stem: str) -> tuple[Path, Path, bytes]:
    """openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=cn: returns (cert, key, cert DER)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{stem}-cert.pem", directory / f"{stem}-key.pem"
    r = subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
         "-addext", f"subjectAltName=DNS:{cn}", "-days", "2",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return cert, key, der


def partial_client_hello() -> bytes:
    """The first half of a genuine TLS ClientHello: a handshake that started but never ends."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx().wrap_bio(inc, out, server_hostname=HOSTNAME)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert len(hello) > 40, hello
    return hello[: len(hello) // 2]


def smtplib_submit(srv: TlsServer, listener: str, user: str, password: str, sender: str,
                   rcpts, message: bytes, timeout: float = 60.0) -> dict:
    """Send with smtplib over TLS (STARTTLS on submission/smtp, implicit on smtps) after AUTH."""
    if isinstance(rcpts, str):
        rcpts = [rcpts]
    host, port = getattr(srv, listener)
    if listener == "smtps":
        s = smtplib.SMTP_SSL(host, port, local_hostname=CLIENT_NAME, timeout=timeout,
                             context=client_ctx())
    else:
        s = smtplib.SMTP(host, port, local_hostname=CLIENT_NAME, timeout=timeout)
        s.ehlo()
        s.starttls(context=client_ctx())
    try:
        s.ehlo()
        s.login(user, password)
        return s.sendmail(sender, rcpts, message)
    finally:
        try:
            s.quit()
        except Exception:
            s.close()
