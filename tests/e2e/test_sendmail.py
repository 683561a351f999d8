"""The send-mail API from the command line (SPEC F6, A4).

`postroom sendmail` reads a message on stdin like /usr/sbin/sendmail and submits it over the
server's Unix socket DATA_DIR/sendmail.sock; `postroom send` builds a MIME message. The tests run
as root: the socket identifies the caller, whose envelope sender is root@<hostname> unless -f says
otherwise.
"""

from __future__ import annotations

import email
import email.policy
import os
import socket
import stat
import time

import pytest

from conftest import SAM
from helpers import (
    HOSTNAME,
    cli_bytes,
    fetch_all,
    mailbox_count,
    subject_of,
    wait_for_subjects,
)

NAME, ADDR, PW = SAM
BOB = ("bob", "bob@example.test", "bob-secret-1")
CAROL = ("carol", "carol@example.test", "carol-secret-1")

EX_USAGE, EX_NOUSER, EX_TEMPFAIL = 64, 67, 75
ROOT_SENDERS = {f"root@{HOSTNAME}".lower(), f"root@{socket.gethostname()}".lower(),
                f"root@{socket.getfqdn()}".lower()}


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
    """F6: `serve` creates DATA_DIR/sendmail.sock, a Unix socket."""
    path = server.data_dir / "sendmail.sock"
    assert path.exists(), f"{path} missing"
    assert stat.S_ISSOCK(os.stat(path).st_mode), f"{path} is not a socket"


def test_sendmail_delivers_and_completes_headers(sam):
    """F6, A4: `sendmail RCPT` delivers a bare message (LF line endings, no From, Date or
    Message-ID); the envelope sender is root@<hostname>; Message-ID and Date are added."""
    r = sendmail(sam, ADDR, message=f"To: {ADDR}\nSubject: plain sendmail\n\nHello from cron.\n")
    ok(r)
    raw = only_message(sam, NAME, PW, "plain sendmail")
    assert return_path(raw) in ROOT_SENDERS, raw[:300]
    m = parse(raw)
    assert m["Message-ID"] and "@" in m["Message-ID"], raw[:600]
    assert m["Date"] and m["Date"].datetime is not None, raw[:600]
    assert m["From"] and "root@" in str(m["From"]).lower(), raw[:600]
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
