"""The send-mail API from the command line (SPEC F6, A4).

`postroom sendmail` reads a message on stdin like /usr/sbin/sendmail and submits it over the
server's Unix socket `[smtp] local_socket` (default DATA_DIR-sock/sendmail.sock: a 0755 directory
beside the 0700 data directory, the socket 0666) that every local user can reach; `postroom send`
builds a MIME message. The tests run as root, and as nobody (setpriv) where another local user is
the point: the socket identifies the caller (SO_PEERCRED), whose envelope sender is
<user>@<first local domain> unless -f says otherwise; only root may send as anyone.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import SAM
from helpers import (
    BIN,
    DOMAIN,
    HOSTNAME,
    JANE,
    cli_bytes,
    fetch_all,
    mailbox_count,
    subject_of,
    wait_for_subjects,
)

NAME, ADDR, PW = SAM
BOB = ("bob", "bob@example.test", "bob-secret-1")
CAROL = ("carol", "carol@example.test", "carol-secret-1")

EX_USAGE, EX_NOUSER, EX_TEMPFAIL, EX_NOPERM = 64, 67, 75, 77
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs sendmail as another user (needs root)")


def sendmail(srv, *args: str, message: bytes | str, timeout: float = 60.0):
    if isinstance(message, str):
        message = message.encode()
    return cli_bytes(srv, "sendmail", *args, input=message, timeout=timeout)


def ok(r) -> None:
    assert r.returncode == 0, (f"exit {r.returncode}\nstdout: {r.stdout.decode(errors='replace')}\n"
                               f"stderr: {r.stderr.decode(errors='replace')}")


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def return_path(raw: bytes) -> str:
    first = raw.split(b"\r\n", 1)[0].decode()
    assert first.lower().startswith("return-path:"), first
    return first.split(":", 1)[1].strip().strip("<>").lower()


def only_message(srv, user, pw, subject) -> bytes:
    msgs = wait_for_subjects(srv, user, pw, [subject])
    hits = [m for m in msgs if subject_of(m) == subject]
    assert len(hits) == 1, f"{subject!r} delivered {len(hits)} times to {user}"
    return hits[0]


def no_defects(msg) -> None:
    for part in msg.walk():
        assert not part.defects, f"MIME defects in {part.get_content_type()}: {part.defects}"


# ------------------------------------------------------------------------------------------
# sendmail
# ------------------------------------------------------------------------------------------

def test_socket_is_created(server):
    """F6, A4: `serve` creates DATA_DIR-sock/sendmail.sock: a Unix socket every local user may
    connect to (0666) in a directory of the server's user that every local user may enter
    (0755) and nobody else may write in; the data directory stays 0700."""
    path = server.data_dir.parent / (server.data_dir.name + "-sock") / "sendmail.sock"
    assert path.exists(), f"{path} missing"
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket"
    assert stat.S_IMODE(st.st_mode) == 0o666, oct(st.st_mode)
    d = os.lstat(path.parent)
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o755 and d.st_uid == os.geteuid(), oct(d.st_mode)
    assert stat.S_IMODE(os.stat(server.data_dir).st_mode) == 0o700
    assert not (server.data_dir / "sendmail.sock").exists()
    assert server.stop() == 0
    assert not path.exists(), "the socket outlives the server"


def test_sendmail_delivers_and_completes_headers(sam):
    """F6, A4: `sendmail RCPT` delivers a bare message (LF line endings, no From, Date or
    Message-ID); the envelope sender is root@<first local domain>, so a bounce comes back here
    (not root@<hostname>, which is no mail domain); Message-ID and Date are added."""
    r = sendmail(sam, ADDR, message=f"To: {ADDR}\nSubject: plain sendmail\n\nHello from cron.\n")
    ok(r)
    raw = only_message(sam, NAME, PW, "plain sendmail")
    assert return_path(raw) == f"root@{DOMAIN}", raw[:300]
    m = parse(raw)
    assert m["Message-ID"] and "@" in m["Message-ID"], raw[:600]
    assert m["Date"] and m["Date"].datetime is not None, raw[:600]
    assert m["From"] and f"root@{DOMAIN}" in str(m["From"]).lower(), raw[:600]
    assert m.get_content().strip() == "Hello from cron."


def test_sendmail_exit_0_means_accepted(sam):
    """F6: exit 0 only after the server accepted the message: a kill -9 right after sendmail
    returns loses nothing."""
    ok(sendmail(sam, ADDR, message="Subject: durable sendmail\n\nbody\n"))
    sam.kill()
    sam.start()
    only_message(sam, NAME, PW, "durable sendmail")


def test_sendmail_f_sets_envelope_sender(sam):
    """F6, A4: root may set the envelope sender with -f; the header From is kept."""
    msg = "From: Jane <jane@remote.example>\nSubject: with -f\n\nbody\n"
    ok(sendmail(sam, "-f", "jane@remote.example", ADDR, message=msg))
    raw = only_message(sam, NAME, PW, "with -f")
    assert return_path(raw) == "jane@remote.example", raw[:300]
    assert "jane@remote.example" in str(parse(raw)["From"])


def test_sendmail_t_reads_recipients_and_drops_bcc(sam):
    """F6: -t takes recipients from To, Cc and Bcc; everyone gets the message exactly once and
    nobody sees the Bcc header."""
    sam.add_user(*BOB)
    sam.add_user(*CAROL)
    msg = (f"From: root@{HOSTNAME}\nTo: Sam <{ADDR}>\nCc: {BOB[1]}\nBcc: {CAROL[1]}\n"
           f"Subject: with -t\n\nfor three\n")
    ok(sendmail(sam, "-t", message=msg))
    for user, pw in ((NAME, PW), (BOB[0], BOB[2]), (CAROL[0], CAROL[2])):
        raw = only_message(sam, user, pw, "with -t")
        head = raw.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\r\nbcc:" not in head and not head.startswith(b"bcc:"), f"{user} sees Bcc:\n{raw[:800]!r}"
        assert CAROL[1].encode() not in raw, f"{user} can see the Bcc recipient"
        assert b"for three" in raw


def test_sendmail_F_sets_full_name(sam):
    """F6: -F sets the full name in the From header the server adds."""
    ok(sendmail(sam, "-F", "Backup Robot", ADDR, message="Subject: with -F\n\nnightly\n"))
    frm = parse(only_message(sam, NAME, PW, "with -F"))["From"]
    assert frm.addresses and frm.addresses[0].display_name == "Backup Robot", str(frm)
    assert frm.addresses[0].addr_spec.lower().startswith("root@"), str(frm)


def test_sendmail_ignored_flags_and_lone_dot(sam):
    """F6: -i -oi -oem -odi -B8BITMIME are accepted; with -i a line holding a single dot is
    content, not the end; 8-bit text and leading dots arrive intact."""
    body = "line one\n.\nline after dot\n..two dots\nGrüße, Zoë\n"
    msg = f"Subject: flags\nContent-Type: text/plain; charset=utf-8\n\n{body}"
    ok(sendmail(sam, "-i", "-oi", "-oem", "-odi", "-B8BITMIME", ADDR, message=msg))
    raw = only_message(sam, NAME, PW, "flags")
    got = raw.split(b"\r\n\r\n", 1)[1]
    assert got.replace(b"\r\n", b"\n").rstrip(b"\n") == body.encode().rstrip(b"\n"), got


def test_sendmail_no_recipients_is_usage_error(sam):
    """F6: no recipients and no -t → exit 64; -t with no recipient headers → 64; nothing sent."""
    r = sendmail(sam, message="Subject: nobody\n\nx\n")
    assert r.returncode == EX_USAGE, (r.returncode, r.stderr)
    r = sendmail(sam, "-t", message="Subject: nobody either\n\nx\n")
    assert r.returncode == EX_USAGE, (r.returncode, r.stderr)
    time.sleep(1)
    assert mailbox_count(sam, NAME, PW) == 0


def test_sendmail_unknown_user_exit_67(sam):
    """F6: a local recipient that does not exist (550 5.1.1) → exit 67, the address named on
    stderr, nothing delivered."""
    r = sendmail(sam, "nosuchuser@example.test", message="Subject: lost\n\nx\n")
    assert r.returncode == EX_NOUSER, (r.returncode, r.stderr)
    assert b"nosuchuser" in r.stderr.lower(), r.stderr
    ok(sendmail(sam, ADDR, message="Subject: after 67\n\nx\n"))
    msgs = wait_for_subjects(sam, NAME, PW, ["after 67"])
    assert [subject_of(m) for m in msgs] == ["after 67"]


@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
def test_sendmail_server_down_exit_75(sam, how):
    """F6: with the server stopped (socket gone, or left behind by kill -9: connection refused)
    sendmail exits 75 at once, and nothing is delivered when the server comes back."""
    if how == "sigterm":
        assert sam.stop() == 0
    else:
        sam.kill()
    t0 = time.monotonic()
    r = sendmail(sam, ADDR, message="Subject: while down\n\nx\n", timeout=30)
    assert r.returncode == EX_TEMPFAIL, (r.returncode, r.stderr)
    assert time.monotonic() - t0 < 15, "sendmail hung while the server was down"
    sam.start()
    ok(sendmail(sam, ADDR, message="Subject: back up\n\nx\n"))
    wait_for_subjects(sam, NAME, PW, ["back up"])
    time.sleep(1.5)
    assert [subject_of(m) for m in fetch_all(sam, NAME, PW)] == ["back up"]


def test_sendmail_partly_refused_exits_0_and_names_the_refused(sam):
    """F6: one recipient refused, one accepted -> the message went out: exit 0 (a script that
    retried would send the accepted ones a duplicate), the refused address named on stderr."""
    r = sendmail(sam, "nosuchuser@example.test", ADDR, message="Subject: partly\n\nx\n")
    ok(r)
    assert b"nosuchuser@example.test" in r.stderr.lower(), r.stderr
    only_message(sam, NAME, PW, "partly")


def test_sendmail_bare_name_is_a_local_user(sam):
    """F6: `sendmail carol` (no domain) reaches carol@<first local domain>, as postmaster
    does; -t reads a bare name in To too."""
    sam.add_user(*CAROL)
    ok(sendmail(sam, "carol", message="Subject: bare name\n\nx\n"))
    only_message(sam, CAROL[0], CAROL[2], "bare name")
    ok(sendmail(sam, "-t", message="To: Carol <carol>\nSubject: bare in To\n\nx\n"))
    only_message(sam, CAROL[0], CAROL[2], "bare in To")


# ------------------------------------------------------------------------------------------
# sendmail as another local user (A4): the socket is where every local user reaches it
# ------------------------------------------------------------------------------------------

@pytest.fixture
def public_dir():
    """A world-enterable directory outside pytest's 0700 tmp tree, for the socket and a
    world-readable copy of the configuration."""
    d = Path(tempfile.mkdtemp(prefix="prsock-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shared(make_server, public_dir):
    """A server whose socket is in public_dir/s (created by `serve`), Sam enrolled."""
    srv = make_server(smtp={"local_socket": str(public_dir / "s" / "sendmail.sock")})
    srv.add_user(*SAM)
    cfg = public_dir / "postroom.toml"
    cfg.write_text(srv.config_path.read_text())
    cfg.chmod(0o644)
    srv.public_config = cfg
    return srv


def sendmail_as_nobody(srv, *args: str, message: str, timeout: float = 60.0):
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
           str(BIN), "--config", str(srv.public_config), "sendmail", *args]
    probe = subprocess.run(cmd[:4] + [str(BIN), "--version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run {BIN}: {probe.stderr.decode(errors='replace')}")
    return subprocess.run(cmd, input=message.encode(), capture_output=True, timeout=timeout,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})


@needs_root
def test_sendmail_works_for_every_local_user(shared):
    """F6, A4: a local user other than the server's (nobody) submits through the socket: exit 0,
    delivered, identified by the kernel as that user (Received), envelope sender
    nobody@<first local domain>."""
    r = sendmail_as_nobody(shared, ADDR, message="Subject: from nobody\n\ncron of another user\n")
    ok(r)
    raw = only_message(shared, NAME, PW, "from nobody")
    assert return_path(raw) == f"nobody@{DOMAIN}", raw[:300]
    head = raw.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
    assert "(authenticated sender: nobody)" in head, head


@needs_root
def test_other_local_user_cannot_send_as_someone_else(shared):
    """A4: the socket lets nobody in, but not as Sam or root: refused (77, not permitted),
    nothing delivered."""
    for sender in (ADDR, f"root@{DOMAIN}"):
        r = sendmail_as_nobody(shared, "-f", sender, ADDR, message="Subject: forged\n\nx\n")
        assert r.returncode == EX_NOPERM, (sender, r.returncode, r.stderr)
        assert b"5.7" in r.stderr, r.stderr
    ok(sendmail_as_nobody(shared, "-f", f"nobody@{HOSTNAME}", ADDR, message="Subject: own\n\nx\n"))
    msgs = wait_for_subjects(shared, NAME, PW, ["own"])
    assert [subject_of(m) for m in msgs] == ["own"]


@needs_root
def test_socket_directory_closed_exits_77(shared, public_dir):
    """F6: the administrator closes the socket's directory (0700): a user who may not enter it
    gets exit 77 (EX_NOPERM) naming the socket, not 75 "not running"; root still can."""
    sock_dir = public_dir / "s"
    sock_dir.chmod(0o700)
    r = sendmail_as_nobody(shared, ADDR, message="Subject: shut out\n\nx\n")
    assert r.returncode == EX_NOPERM, (r.returncode, r.stderr)
    err = r.stderr.decode(errors="replace")
    assert str(sock_dir / "sendmail.sock") in err and "permission" in err.lower(), err
    ok(sendmail(shared, ADDR, message="Subject: root still\n\nx\n"))
    msgs = wait_for_subjects(shared, NAME, PW, ["root still"])
    assert [subject_of(m) for m in msgs] == ["root still"]


@needs_root
def test_unreadable_configuration_exits_77(shared):
    """F6: sendmail finds the socket in the configuration; a user who may not read that file
    gets 77 (EX_NOPERM) naming it, not 75 "try again later"."""
    shared.public_config.chmod(0o600)
    r = sendmail_as_nobody(shared, ADDR, message="Subject: no config\n\nx\n")
    assert r.returncode == EX_NOPERM, (r.returncode, r.stderr)
    assert str(shared.public_config).encode() in r.stderr, r.stderr


@needs_root
@pytest.mark.parametrize("plant", ["symlink", "foreign-owner", "group-writable", "regular-file", "live-socket"])
def test_planted_socket_directory_is_refused(make_server, public_dir, plant):
    """F6, A4: `serve` never follows or trusts what another user could have put at the socket's
    place: a directory that is a link, owned by another user or writable by group, or a file
    that is not a socket, is refused with a message naming it; nothing is changed there. A
    socket another server still answers on is not taken over."""
    sock_dir = public_dir / "s"
    sock = sock_dir / "sendmail.sock"
    victim = public_dir / "victim"
    victim.mkdir(mode=0o700)
    if plant == "symlink":
        sock_dir.symlink_to(victim)
    else:
        sock_dir.mkdir(mode=0o755)
    if plant == "foreign-owner":
        os.chown(sock_dir, NOBODY, NOBODY)
    if plant == "group-writable":
        sock_dir.chmod(0o775)
    if plant == "regular-file":
        sock.write_text("keep me")
    first = None
    if plant == "live-socket":
        first = make_server(smtp={"local_socket": str(sock)})
        first.add_user(*SAM)
    srv = make_server(start=False, smtp={"local_socket": str(sock)})
    with pytest.raises(AssertionError) as failed:
        srv.start()
    msg = str(failed.value)
    assert "smtp.local_socket" in msg and str(sock_dir) in msg, msg[-2000:]
    assert list(victim.iterdir()) == [], "wrote through the link"
    if plant == "regular-file":
        assert sock.read_text() == "keep me"
    if first is not None:
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        ok(sendmail(first, ADDR, message="Subject: still mine\n\nx\n"))
        only_message(first, NAME, PW, "still mine")


# ------------------------------------------------------------------------------------------
# send: MIME building
# ------------------------------------------------------------------------------------------

def test_send_builds_mime_with_attachments_and_html(sam, tmp_path):
    """F6: `send` builds a well-formed MIME message: text body, HTML alternative, attachments
    whose bytes and names arrive unchanged, RFC 2047 subject; every --to receives it."""
    sam.add_user(*BOB)
    blob = os.urandom(2_000_000) + b"\r\n.\r\n" + bytes(range(256))
    (tmp_path / "data.bin").write_bytes(blob)
    (tmp_path / "notes.txt").write_bytes(b"first line\n.\nno final newline")
    (tmp_path / "page.html").write_text("<html><body><p>Gr\u00fc\u00dfe <b>bold</b></p></body></html>\n")
    subject = "Gr\u00fc\u00dfe vom B\u00fcro"
    body = "Hallo Sam,\n\nanbei die Dateien.\n\u20ac 10\n"
    r = sam.cli("send", "--from", "SamJones@example.test", "--to", ADDR, "--to", BOB[1],
                "--subject", subject, "--attach", str(tmp_path / "data.bin"),
                "--attach", str(tmp_path / "notes.txt"), "--html", str(tmp_path / "page.html"),
                input=body)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    for user, pw in ((NAME, PW), (BOB[0], BOB[2])):
        deadline = time.monotonic() + 20
        while True:
            msgs = [parse(m) for m in fetch_all(sam, user, pw)]
            if msgs or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert len(msgs) == 1, f"{user} has {len(msgs)} messages"
        m = msgs[0]
        no_defects(m)
        assert m["MIME-Version"], "no MIME-Version header"
        assert str(m["Subject"]) == subject
        assert m["Message-ID"] and m["Date"]
        assert "samjones@example.test" in str(m["From"]).lower()
        plain = m.get_body(("plain",))
        html = m.get_body(("html",))
        assert plain is not None and plain.get_content().replace("\r\n", "\n").rstrip() == body.rstrip()
        assert html is not None and "<b>bold</b>" in html.get_content() and "Gr\u00fc\u00dfe" in html.get_content()
        atts = {a.get_filename(): a.get_content() for a in m.iter_attachments()}
        assert set(atts) == {"data.bin", "notes.txt"}, set(atts)
        data = atts["data.bin"]
        assert isinstance(data, bytes) and data == blob, "data.bin arrived changed"
        notes = atts["notes.txt"]
        notes = notes if isinstance(notes, bytes) else notes.encode()
        assert notes.replace(b"\r\n", b"\n") == b"first line\n.\nno final newline", notes


def test_send_plain_text(sam):
    """F6: `send` without attachments delivers a plain text message with the body from stdin."""
    r = sam.cli("send", "--from", "root@" + "mail.example.test", "--to", ADDR, "--subject",
                "plain send", input="just text\n")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    m = parse(only_message(sam, NAME, PW, "plain send"))
    no_defects(m)
    assert m.get_body(("plain",)).get_content().strip() == "just text"


def test_send_missing_attachment_is_user_error(sam, tmp_path):
    """INTERFACE: `send --attach` of a file that does not exist exits 1 naming it; nothing sent."""
    missing = str(tmp_path / "nope.pdf")
    r = sam.cli("send", "--from", "root@mail.example.test", "--to", ADDR, "--subject", "broken",
                "--attach", missing, input="x\n")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "nope.pdf" in r.stderr, r.stderr
    time.sleep(1)
    assert mailbox_count(sam, NAME, PW) == 0


def test_send_unknown_recipient_fails(sam):
    """F6: `send` to an unknown local user fails (non-zero exit, the address named)."""
    r = sam.cli("send", "--from", "root@mail.example.test", "--to", "ghost@example.test",
                "--subject", "to ghost", input="x\n")
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "ghost" in r.stderr.lower(), r.stderr


def test_send_message_id_names_the_configured_hostname(sam):
    """F6: `send` makes its Message-ID from the configured `hostname`, not the system's name."""
    r = sam.cli("send", "--from", ADDR, "--to", ADDR, "--subject", "msgid", input="x\n")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    mid = parse(only_message(sam, NAME, PW, "msgid"))["Message-ID"]
    assert mid and mid.strip().endswith(f"@{HOSTNAME}>"), mid


# ------------------------------------------------------------------------------------------
# The send scheduler's ETRN is an outbound connection like any other (C6, C7, C8)
# ------------------------------------------------------------------------------------------

def test_upstream_etrn_comes_from_bind_address(make_server):
    """C7, C8: the scheduler's ETRN to `etrn_upstream` comes from `[delivery] bind_address`."""
    from smtppeer import ExtPeer
    upstream = ExtPeer("127.0.0.66", 0, name="upstream.example", etrn=True).start()
    try:
        make_server(delivery={"send_interval_secs": 1, "bind_address": "127.0.0.67",
                              "etrn_upstream": f"127.0.0.66:{upstream.port}",
                              "etrn_upstream_domains": [DOMAIN]})
        (e, *_) = upstream.wait_etrn(1, timeout=20)
        assert e.client_ip == "127.0.0.67", e
    finally:
        upstream.stop()


def test_upstream_etrn_counts_against_max_connections(make_server):
    """C6, C7: with `max_connections = 1` a delivery that holds the only connection keeps the
    scheduler's ETRN waiting: never two outbound connections at once."""
    from smtppeer import ExtPeer, Peer
    router = Peer("127.0.0.68", 0, name="router.example", data_delay=5.0).start()
    upstream = ExtPeer("127.0.0.69", 0, name="upstream.example", etrn=True).start()
    try:
        srv = make_server(delivery={"send_interval_secs": 1, "max_connections": 1,
                                    "mail_router": f"127.0.0.68:{router.port}",
                                    "etrn_upstream": f"127.0.0.69:{upstream.port}",
                                    "etrn_upstream_domains": [DOMAIN]})
        upstream.wait_etrn(1, timeout=20)
        ok(sendmail(srv, JANE, message="Subject: slow\n\nx\n"))
        (tx,) = router.wait_delivered(JANE, timeout=30)
        time.sleep(2.5)   # two or three more scheduler runs
        with router.lock:
            # From the connect to the reply after the dot (5 s) the delivery surely holds its slot.
            held = (router.connections[tx.connection].opened, tx.replied_at)
        with upstream.lock:
            etrn_opened = [c.opened for c in upstream.connections]
        overlap = [t for t in etrn_opened if held[0] < t < held[1]]
        assert overlap == [], f"ETRN connections opened while the delivery held the only slot: {overlap}, {held}"
        assert etrn_opened[-1] > held[1], "no ETRN after the delivery: the scheduler stopped"
    finally:
        router.stop()
        upstream.stop()
