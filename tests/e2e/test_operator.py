"""The operator's view (issue 14 items 19, 20, 21, 23, 25): `config check` loads the TLS files
`serve` would load, and an error names its cause once; commands that read refuse a data directory
without a database; no command panics when its reader goes away (`| head -1`); `status` shows a
storage-threshold pause; `queue show` says "held"; QUIT during a shutdown gets 221; the journal's
`from=` of POP rows and relay refusals; the [dns] comment of etc/postroom.toml."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from conftest import SAM
from helpers import (
    BIN,
    JANE,
    REPO,
    Server,
    expect,
    has_ip,
    make_message,
    pop_login,
    send_mail,
    smtp_session,
    submit,
    wait_for_count,
    wait_journal,
)

NAME, ADDR, PW = SAM
FAR = "someone@far.example"

# A command ended because its reader went away exits like a program SIGPIPE ended (128 + 13).
BROKEN_PIPE = 141


def _no_panic(r) -> None:
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
    assert r.returncode != 101 and "panicked" not in err and "Broken pipe" not in err, (r.returncode, err)


# ------------------------------------------------------------------------------------------
# Item 19: config check loads the certificate; causes are named once
# ------------------------------------------------------------------------------------------

def _generated_pair(make_server) -> tuple[str, str]:
    """A certificate and key of their own: the self-signed pair a server generates at start."""
    srv = make_server()
    srv.stop()
    return str(srv.data_dir / "tls-cert.pem"), str(srv.data_dir / "tls-key.pem")


def test_config_check_refuses_missing_tls_files(tmp_path):
    """`config check` says what `serve` would say about [tls] files that do not exist: exit 1,
    the path named, the cause once."""
    cert, key = tmp_path / "missing-cert.pem", tmp_path / "missing-key.pem"
    srv = Server(tmp_path / "cfg", {"tls": {"cert": str(cert), "key": str(key)}})
    r = srv.cli("config", "check")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert str(cert) in r.stderr, r.stderr
    assert r.stderr.count("(os error 2)") == 1, r.stderr
    assert "configuration OK" not in r.stderr, r.stderr


def test_config_check_refuses_a_cert_and_key_that_do_not_match(make_server, tmp_path):
    """A certificate with another certificate's key: `config check` refuses it as `serve` does."""
    cert_a, _ = _generated_pair(make_server)
    _, key_b = _generated_pair(make_server)
    srv = Server(tmp_path / "cfg", {"tls": {"cert": cert_a, "key": key_b}})
    r = srv.cli("config", "check")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert re.search(r"(?i)do not fit|mismatch|does not match", r.stderr), r.stderr
    s = srv.cli("serve", timeout=30)
    assert s.returncode == 1, (s.returncode, s.stderr)


def test_config_check_refuses_a_file_that_is_no_certificate(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    key = tmp_path / "junk-key.pem"
    key.write_text("not a key\n")
    os.chmod(key, 0o600)
    srv = Server(tmp_path / "cfg", {"tls": {"cert": str(junk), "key": str(key)}})
    r = srv.cli("config", "check")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert str(junk) in r.stderr and "no certificate" in r.stderr, r.stderr


def test_config_check_accepts_a_matching_pair(make_server, tmp_path):
    cert, key = _generated_pair(make_server)
    srv = Server(tmp_path / "cfg", {"tls": {"cert": cert, "key": key}})
    r = srv.cli("config", "check")
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "configuration OK" in r.stderr, r.stderr


def test_serve_error_names_its_cause_once(tmp_path):
    """'No such file or directory (os error 2): No such file or directory (os error 2)': once
    is enough."""
    cert = tmp_path / "gone.pem"
    srv = Server(tmp_path / "cfg", {"tls": {"cert": str(cert), "key": str(tmp_path / "gone-key.pem")}})
    r = srv.cli("serve", timeout=30)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert str(cert) in r.stderr, r.stderr
    assert r.stderr.count("(os error 2)") == 1, r.stderr


# ------------------------------------------------------------------------------------------
# Item 20: a data directory without a database
# ------------------------------------------------------------------------------------------

NEEDS_DATABASE = [
    ("user", "list"),
    ("user", "show", "sam"),
    ("user", "disable", "sam"),
    ("queue", "list"),
    ("queue", "show", "Q1"),
    ("queue", "hold", "Q1"),
    ("journal",),
    ("list", "show", "relay"),
    ("list", "remove", "relay", "10.0.0.1"),
    ("explain", "--ip", "127.0.0.1", "--from", JANE, "--to", ADDR),
    ("status",),
    ("filter", "list"),
    ("quarantine", "list"),
    ("quarantine", "show", "1"),
    ("domain", "list"),
    ("alias", "list"),
]


@pytest.mark.parametrize("args", NEEDS_DATABASE, ids=lambda a: " ".join(a[:2]))
def test_mistyped_data_dir_is_refused(tmp_path, args):
    """A command that reads (or changes what exists) with a --data-dir holding no database
    exits 1 naming the directory and how to point at the right one, and creates nothing."""
    srv = Server(tmp_path / "cfg")
    typo = tmp_path / "dtaa"
    r = subprocess.run([str(BIN), "--config", str(srv.config_path), "--data-dir", str(typo), *args],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    # explain as grep: 2 when the question cannot be answered.
    assert r.returncode == (2 if args[0] == "explain" else 1), (r.returncode, r.stdout, r.stderr)
    assert str(typo) in r.stderr, r.stderr
    assert "--config" in r.stderr and "--data-dir" in r.stderr, r.stderr
    assert "queue is empty" not in r.stdout, r.stdout
    assert not (typo / "postroom.db").exists(), "an empty database was created"


@pytest.mark.parametrize("args", [("user", "list"), ("queue", "list"), ("journal",)], ids=" ".join)
def test_without_config_is_refused(tmp_path, args):
    """No --config: the built-in default's data_dir (postroom-data, in the working directory)
    holds no database; the command says so instead of answering from an empty one."""
    env = {k: v for k, v in os.environ.items() if k not in ("POSTROOM_CONFIG", "POSTROOM_DATA")}
    r = subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "postroom-data" in r.stderr and "--config" in r.stderr, r.stderr
    assert not (tmp_path / "postroom-data" / "postroom.db").exists()


def test_first_setup_still_creates_the_database(tmp_path):
    """The commands that add (how a first setup starts, before `serve`) create the database."""
    srv = Server(tmp_path / "cfg")
    srv.cli_ok("domain", "add", "other.test")
    assert (srv.data_dir / "postroom.db").exists()
    assert "other.test" in srv.cli_ok("domain", "list").stdout
    srv.add_user(*SAM)
    assert NAME in srv.cli_ok("user", "list").stdout


# ------------------------------------------------------------------------------------------
# Item 21: output into a closed pipe
# ------------------------------------------------------------------------------------------

def _closed_stdout(srv: Server, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the command with standard output a pipe whose reader is already gone: every write
    fails with EPIPE (`| head -0` without the race)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([str(BIN), "--config", str(srv.config_path), *args], stdout=w,
                              stderr=subprocess.PIPE, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL, timeout=60)
    finally:
        os.close(w)


@pytest.fixture
def busy(make_server):
    """A server with something in every list: a user, an alias, a filter, a delivered message
    (journal rows), one waiting for a dead mail router and one in the quarantine."""
    srv = make_server(start=False, relay={"mode": "list"}, delivery={"mail_router": "127.0.0.1:9"})
    srv.cli_ok("list", "add", "relay", "127.0.0.0/8")
    srv.add_user(*SAM)
    srv.cli_ok("alias", "add", "team@example.test", ADDR)
    srv.cli_ok("filter", "add", "--subject", "*quarantine me*", "--action", "keep")
    srv.start()
    send_mail(srv, ADDR, make_message("hello"))
    wait_for_count(srv, NAME, PW, 1)
    srv.waiting_qid = submit(srv, FAR, make_message("waiting", to=FAR))
    submit(srv, ADDR, make_message("please quarantine me"))
    deadline = time.monotonic() + 20
    while not re.search(r"(?m)^\s*\d+\s", srv.cli_ok("quarantine", "list").stdout):
        assert time.monotonic() < deadline, srv.cli("quarantine", "list").stdout
        time.sleep(0.2)
    srv.quarantine_id = re.search(r"(?m)^\s*(\d+)\s", srv.cli_ok("quarantine", "list").stdout).group(1)
    return srv


def _printing_commands(srv) -> list[tuple[str, ...]]:
    return [
        ("user", "list"),
        ("user", "show", NAME),
        ("queue", "list"),
        ("queue", "show", srv.waiting_qid),
        ("journal",),
        ("list", "show", "relay"),
        ("list", "show", "deny"),
        ("list", "show", "hostauth"),
        ("explain", "--ip", "127.0.0.1", "--from", JANE, "--to", ADDR, "--to", FAR),
        ("status",),
        ("filter", "list"),
        ("quarantine", "list"),
        ("quarantine", "show", srv.quarantine_id),
        ("domain", "list"),
        ("alias", "list"),
        ("config", "check"),
        ("domain", "add", "third.test"),
        ("list", "add", "reject", "192.0.2.1"),
    ]


def test_no_command_panics_into_a_closed_pipe(busy):
    """Every command that prints, its standard output a closed pipe: no panic, no backtrace,
    no status 101; the status of a program SIGPIPE ended (141)."""
    problems = []
    for args in _printing_commands(busy):
        r = _closed_stdout(busy, *args)
        err = r.stderr.decode(errors="replace")
        if r.returncode != BROKEN_PIPE or "panicked" in err or "Broken pipe" in err or "standard output" in err:
            problems.append(f"`postroom {' '.join(args)}` exited {r.returncode}: {err[:300]!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("head", ["head -0", "head -1"])
def test_commands_piped_into_head(busy, head):
    """The shell's view: `postroom ... | head -N` never panics and exits 0 (all written before
    head left) or 141 (head left first)."""
    problems = []
    for args in _printing_commands(busy)[:16]:
        cmd = " ".join(f"'{a}'" for a in (str(BIN), "--config", str(busy.config_path), *args))
        r = subprocess.run(["bash", "-c", f"{cmd} | {head}; exit ${{PIPESTATUS[0]}}"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        ok = {0, BROKEN_PIPE} | ({1} if args[0] == "explain" else set())
        if r.returncode not in ok or "panicked" in r.stderr:
            problems.append(f"`postroom {' '.join(args)} | {head}` exited {r.returncode}: {r.stderr[:300]!r}")
    assert not problems, "\n".join(problems)


def test_journal_follow_ends_quietly_when_the_reader_goes(busy):
    """`journal --follow | head -1`: the first line, then a quiet end when head has gone and the
    next row arrives."""
    p = subprocess.Popen([str(BIN), "--config", str(busy.config_path), "journal", "--follow"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert p.stdout.readline(), "journal --follow printed nothing"
        p.stdout.close()
        send_mail(busy, ADDR, make_message("one more row"))
        status = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read().decode(errors="replace")
    assert status == BROKEN_PIPE and "panicked" not in err, (status, err)


# ------------------------------------------------------------------------------------------
# Item 23: status and storage, queue show held, QUIT at shutdown, journal from=
# ------------------------------------------------------------------------------------------

def test_status_shows_the_storage_pause(make_server):
    """Below [storage] min_free_mb: `status` says new mail is refused and the framework paused,
    and exits 1."""
    srv = make_server(storage={"min_free_mb": 10**9})
    deadline = time.monotonic() + 10
    while True:
        r = srv.cli("status")
        if re.search(r"(?m)^storage: LOW", r.stdout):
            break
        assert time.monotonic() < deadline, f"status does not show the storage pause:\n{r.stdout}"
        time.sleep(0.3)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("storage:"))
    assert "452" in line and "paused" in line, line
    assert r.returncode == 1, (r.returncode, r.stdout)


def test_status_storage_ok(sam):
    r = sam.cli("status")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert re.search(r"(?m)^storage: ok", r.stdout), r.stdout


def test_queue_show_says_held(make_server):
    """`queue show` on a held recipient says held, never when the next attempt is."""
    srv = make_server(start=False, relay={"mode": "list"}, delivery={"mail_router": "127.0.0.1:9"})
    srv.cli_ok("list", "add", "relay", "127.0.0.0/8")
    srv.start()
    qid = submit(srv, FAR, make_message("to hold", to=FAR))
    deadline = time.monotonic() + 15
    while "next attempt" not in srv.cli_ok("queue", "show", qid).stdout:
        assert time.monotonic() < deadline, srv.cli("queue", "show", qid).stdout
        time.sleep(0.2)
    srv.cli_ok("queue", "hold", qid)
    out = srv.cli_ok("queue", "show", qid).stdout
    assert re.search(r"(?m)^\s*state:.*\bheld\b", out), out
    assert "next attempt" not in out, out
    listed = [ln for ln in srv.cli_ok("queue", "list").stdout.splitlines() if qid in ln]
    assert listed and all("held" in ln for ln in listed), listed


def _sigterm(srv):
    proc = srv.proc
    proc.send_signal(signal.SIGTERM)
    return proc


def test_quit_during_shutdown_gets_221(sam):
    """RFC 5321 §4.1.1.10: QUIT gets 221, also while the server shuts down."""
    c = smtp_session(sam)
    proc = _sigterm(sam)
    time.sleep(0.3)
    r = c.cmd("QUIT")
    c.close()
    assert r.code == 221, r
    assert proc.wait(15) == 0


def test_quit_after_a_message_finished_during_shutdown_gets_221(sam):
    """A message in DATA at SIGTERM finishes (250); the client's QUIT after it gets 221."""
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.cmd("DATA"), 354)
    message = make_message("finished at shutdown")
    c.send(message[:40])
    proc = _sigterm(sam)
    time.sleep(0.5)
    c.send(message[40:] + b".\r\n")
    expect(c.read_reply(), 250)
    r = c.cmd("QUIT")
    c.close()
    assert r.code == 221, r
    assert proc.wait(15) == 0


def test_other_commands_and_silence_during_shutdown_get_421(sam):
    """During a shutdown anything but QUIT gets 421, and a silent client gets it unasked."""
    busy_client = smtp_session(sam)
    silent = smtp_session(sam)
    proc = _sigterm(sam)
    time.sleep(0.2)
    expect(busy_client.cmd(f"MAIL FROM:<{JANE}>"), 421)
    busy_client.close()
    expect(silent.read_reply(), 421)
    silent.close()
    assert proc.wait(15) == 0


def _journal_rows(srv, code):
    return [ln for ln in srv.cli_ok("journal", "--code", code).stdout.splitlines() if ln.strip()]


def test_pop_journal_rows_name_the_user(sam):
    """DL, DR and DD rows: from= is the POP user (who acted), as to= (whose maildrop)."""
    send_mail(sam, ADDR, make_message("for the journal"))
    wait_for_count(sam, NAME, PW, 1)
    p = pop_login(sam, NAME, PW)
    p.retr(1)
    p.dele(1)
    p.quit()
    for code in ("DL", "DR", "DD"):
        wait_journal(sam, lambda ln: True, code=code, timeout=10)
        rows = _journal_rows(sam, code)
        assert rows and all(f"from={NAME} " in ln and f"to={NAME} " in ln for ln in rows), (code, rows)


def test_failed_pop_login_row_names_the_name_tried(sam):
    p = sam.pop3
    import poplib
    c = poplib.POP3(p[0], p[1], timeout=15)
    c.user("nosuchuser")
    with pytest.raises(poplib.error_proto):
        c.pass_("wrong")
    c.quit()
    wait_journal(sam, lambda ln: "nosuchuser" in ln, code="DF", timeout=10)
    rows = [ln for ln in _journal_rows(sam, "DF") if "nosuchuser" in ln]
    assert all("from=nosuchuser " in ln for ln in rows), rows


def test_relay_refusal_row_names_the_sender(server):
    """9V: from= is the transaction's MAIL FROM."""
    c = smtp_session(server)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{FAR}>"), 550, "5.7.1")
    c.quit()
    rows = wait_journal(server, lambda ln: FAR in ln and has_ip(ln, "127.0.0.1"), code="9V")
    assert all(f"from={JANE} " in ln for ln in rows), rows
    # A second transaction on another connection, another sender: each row its own.
    c = smtp_session(server)
    expect(c.cmd("MAIL FROM:<other@remote.example>"), 250)
    expect(c.cmd("RCPT TO:<second@far.example>"), 550, "5.7.1")
    expect(c.cmd("RSET"), 250)
    expect(c.cmd("MAIL FROM:<>"), 250)
    expect(c.cmd("RCPT TO:<third@far.example>"), 550, "5.7.1")
    c.quit()
    rows = wait_journal(server, lambda ln: "second@far.example" in ln, code="9V")
    assert all("from=other@remote.example " in ln for ln in rows), rows
    rows = wait_journal(server, lambda ln: "third@far.example" in ln, code="9V")
    assert all(" from= " in ln for ln in rows), rows


# ------------------------------------------------------------------------------------------
# Item 25: the [dns] comment
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["etc/postroom.toml", "fuzz/seeds/config/default.toml"])
def test_dns_comment_says_mx_lookups_work(path):
    text = (REPO / path).read_text()
    section = text.split("\n[dns]\n", 1)[1].split("\n[", 1)[0]
    assert "MX" in section, section
    assert "later" not in section, section
