"""SIGHUP reload and the service manager's notifications (SPEC O6).

SIGHUP re-reads the configuration file: relay mode, limits, delivery and report settings,
certificates apply to sessions that start afterwards, while open sessions keep the settings they
started with. A file that fails `config check` changes nothing and the log says why; settings
that need a restart (listen addresses, data_dir) are named in the log and keep their running
values. With $NOTIFY_SOCKET set, `serve` sends READY=1 once every listener is bound,
RELOADING=1 (with MONOTONIC_USEC) and READY=1 around a reload, and STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from conftest_tls import OPENSSL, make_cert_pair, make_tls_server, peer_cert  # noqa: F401  (make_tls_server is a fixture)
from smtppeer import Peer
from helpers import (
    HOSTNAME,
    JANE,
    SmtpClient,
    base_config,
    expect,
    make_message,
    render_toml,
    rewrite_config,
    server_pid,
    smtp_session,
    submit,
)

REMOTE = "friend@far.example"
RELOADED = "configuration reloaded"
REFUSED = "configuration not reloaded"


def reload(srv, expect_line: str = RELOADED, timeout: float = 10.0) -> str:
    """SIGHUP the server and wait until it logs `expect_line`; returns what it logged since the
    signal."""
    offset = srv.stderr_path.stat().st_size
    os.kill(server_pid(srv), signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        text = srv.stderr_path.read_bytes()[offset:].decode(errors="replace")
        if expect_line in text:
            return text
        assert srv.proc.poll() is None, f"the server died on SIGHUP:\n{text}"
        assert time.monotonic() < deadline, f"no {expect_line!r} in the log {timeout}s after SIGHUP:\n{text}"
        time.sleep(0.05)


def write_with(srv, extra: str) -> None:
    """The server's test configuration (as helpers.base_config) followed by `extra` TOML."""
    srv.config_path.write_text(render_toml(base_config(srv.data_dir)) + "\n" + extra)


def rcpt_remote(c) -> int:
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    code = c.cmd(f"RCPT TO:<{REMOTE}>").code
    expect(c.cmd("RSET"), 250)
    return code


# ------------------------------------------------------------------------------------------
# What a reload applies
# ------------------------------------------------------------------------------------------

def test_relay_mode_applies_to_new_sessions_not_open_ones(make_server):
    """O6: relay mode none -> all by SIGHUP: a session opened afterwards may relay; one opened
    before keeps the settings it started with; no restart (same pid, same port)."""
    srv = make_server(relay={"mode": "none"})
    pid, port = server_pid(srv), srv.smtp
    before = smtp_session(srv)
    try:
        assert rcpt_remote(before) == 550
        rewrite_config(srv, {"relay": {"mode": "all"}})
        log = reload(srv)
        assert "relay.mode" in log, log
        assert "OPEN RELAY" in log, f"the reloaded configuration's warnings are not logged:\n{log}"
        after = smtp_session(srv)
        try:
            assert rcpt_remote(after) == 250, "a new session does not see relay.mode = all"
        finally:
            after.quit()
        assert rcpt_remote(before) == 550, "an open session changed its relay rule in mid-session"
    finally:
        before.quit()
    assert (server_pid(srv), srv.smtp) == (pid, port)


def test_size_limit_and_session_limits_apply(make_server):
    """O6: smtp.max_message_size changes the SIZE a new session advertises and enforces."""
    srv = make_server(smtp={"max_message_size": 1_000_000})
    c = smtp_session(srv, ehlo=False)
    assert "SIZE 1000000" in c.ehlo().text
    c.quit()
    rewrite_config(srv, {"smtp": {"max_message_size": 4096, "max_sessions": 1, "max_sessions_per_ip": 1}})
    reload(srv)
    c = smtp_session(srv, ehlo=False)
    try:
        assert "SIZE 4096" in c.ehlo().text
        expect(c.cmd(f"MAIL FROM:<{JANE}> SIZE=5000"), 552)
        # The session pool took its new size: a second session is refused.
        second = SmtpClient(srv.smtp)
        try:
            expect(second.greeting, 421)
        finally:
            second.close()
    finally:
        c.quit()


def test_certificate_paths_change_on_reload(make_tls_server, tmp_path):
    """O6: `[tls] cert`/`key` pointed at another pair: new handshakes present it after SIGHUP."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    d = tmp_path / "certs"
    cert_a, key_a, der_a = make_cert_pair(d, HOSTNAME, "a")
    cert_b, key_b, der_b = make_cert_pair(d, HOSTNAME, "b")
    srv = make_tls_server(users=False, tls={"cert": str(cert_a), "key": str(key_a)})
    assert peer_cert(srv, "smtps") == der_a
    cfg = srv.cfg
    cfg["tls"] = {"cert": str(cert_b), "key": str(key_b)}
    srv.config_path.write_text(render_toml(cfg))
    log = reload(srv)
    assert "tls.cert" in log and "TLS certificate replaced" in log, log
    for listener in ("smtps", "smtp", "pop3s"):
        assert peer_cert(srv, listener) == der_b, f"{listener} still presents the old certificate"


def test_delivery_settings_apply_to_the_next_attempt(make_server):
    """O6: `[delivery] mail_router` changed by SIGHUP: mail waiting for a router that never
    answered goes to the new one at its next attempt (`queue retry`), without a restart."""
    peer = Peer("127.0.0.1", 0).start()
    try:
        srv = make_server(start=False, relay={"mode": "list"}, delivery={"mail_router": "127.0.0.1:9"})
        srv.cli_ok("list", "add", "relay", "127.0.0.0/8")
        srv.start()
        qid = submit(srv, REMOTE, make_message("waits for its router", to=REMOTE))
        time.sleep(1.0)
        assert not peer.transactions
        rewrite_config(srv, {"relay": {"mode": "list"}, "delivery": {"mail_router": f"127.0.0.1:{peer.port}"}})
        assert "delivery.mail_router" in reload(srv)
        srv.cli_ok("queue", "retry", qid)
        deadline = time.monotonic() + 20
        while not peer.transactions:
            assert time.monotonic() < deadline, srv.cli("queue", "list").stdout
            time.sleep(0.1)
        assert [a.lower() for a, _ in peer.transactions[0].rcpts] == [REMOTE]
    finally:
        peer.stop()


# ------------------------------------------------------------------------------------------
# What a reload refuses, and what it leaves for a restart
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("broken, named", [
    ('[relay]\nmode = "all"\npop_minutes = 5\n', "relay.pop_minutes = 5"),
    ('[relay]\nmode = "all"\n[penalty]\nbogus_key = 1\n', "bogus_key"),
    ('[relay]\nmode = "all\n', "line"),
], ids=["invalid-value", "unknown-key", "toml-syntax"])
def test_broken_file_keeps_the_running_configuration(make_server, broken, named):
    """O6: a file that fails `config check` changes nothing; the log says why (naming the key
    or the line); a fixed file is applied by the next SIGHUP."""
    srv = make_server(relay={"mode": "none"})
    write_with(srv, broken)
    log = reload(srv, expect_line=REFUSED)
    assert named in log[log.index(REFUSED):], log
    assert RELOADED not in log, log
    c = smtp_session(srv)
    try:
        assert rcpt_remote(c) == 550, "a refused file changed the relay rule"
    finally:
        c.quit()
    # Fixed: applied.
    write_with(srv, '[relay]\nmode = "all"\n')
    reload(srv)
    c = smtp_session(srv)
    try:
        assert rcpt_remote(c) == 250
    finally:
        c.quit()


def test_listen_address_change_needs_a_restart(make_server):
    """O6: a changed listen address (and data_dir) is named in the log as needing a restart;
    the server keeps listening where it did; a live change in the same file is applied."""
    srv = make_server(relay={"mode": "none"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        other = s.getsockname()[1]
    old = srv.smtp
    listening = (srv.data_dir / "listening").read_text()
    rewrite_config(srv, {"relay": {"mode": "all"}, "smtp": {"listen": [f"127.0.0.1:{other}"]}})
    log = reload(srv)
    warned = [line for line in log.splitlines() if "restart" in line and "smtp.listen" in line]
    assert warned, f"the log does not say smtp.listen needs a restart:\n{log}"
    assert f"127.0.0.1:{other}" in warned[0], warned[0]
    assert "relay.mode" in log
    c = smtp_session(srv)  # still the old port
    try:
        assert c.sock.getpeername()[1] == old[1]
        assert rcpt_remote(c) == 250, "the live key in the same file was not applied"
    finally:
        c.quit()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", other), timeout=2).close()
    assert (srv.data_dir / "listening").read_text() == listening


# ------------------------------------------------------------------------------------------
# sd_notify
# ------------------------------------------------------------------------------------------

class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, abstract: bool):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"postroom-notify-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
            self.dir = None
        else:
            # sun_path holds 108 bytes: a short directory of its own.
            self.dir = tempfile.mkdtemp(prefix="prn-")
            path = os.path.join(self.dir, "notify")
            self.sock.bind(path)
            self.env = path
        self.sock.settimeout(15)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def close(self):
        self.sock.close()
        if self.dir:
            for f in Path(self.dir).iterdir():
                f.unlink()
            os.rmdir(self.dir)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_reloading_stopping(make_server, monkeypatch, abstract):
    """O6 (Type=notify): READY=1 once every listener is bound; RELOADING=1 with MONOTONIC_USEC
    then READY=1 around a reload (a refused one too); STOPPING=1 on SIGTERM."""
    notify = NotifySocket(abstract)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.env)
        srv = make_server(start=False)
        srv.start()
        ready = notify.next()
        assert ready.get("READY") == "1", ready
        # Every listener was bound before READY=1.
        for name in ("smtp", "pop3"):
            socket.create_connection(srv.listeners[name], timeout=5).close()

        # A reload that applies, then one that is refused: both end with READY=1.
        for extra in ('[relay]\nmode = "list"\n', '[relay]\npop_minutes = 5\n'):
            write_with(srv, extra)
            os.kill(server_pid(srv), signal.SIGHUP)
            reloading = notify.next()
            assert reloading.get("RELOADING") == "1", reloading
            usec = int(reloading["MONOTONIC_USEC"])
            # CLOCK_MONOTONIC, as Python's time.monotonic() on Linux.
            assert abs(usec / 1e6 - time.monotonic()) < 30, (usec, time.monotonic())
            again = notify.next()
            assert again.get("READY") == "1", again

        srv.proc.send_signal(signal.SIGTERM)
        stopping = notify.next()
        assert stopping.get("STOPPING") == "1", stopping
        assert srv.stop() == 0
    finally:
        notify.close()
