"""Filters and quarantine (SPEC F3, F4 journal OW).

`postroom filter add [--from P] [--subject P] [--attachment P] [--mime-type P] --action keep|discard`
matches `*` wildcards case-insensitively on decoded values (RFC 2047 subjects, RFC 2231 / name= /
filename= attachment names, inside nested multipart and message/rfc822). A matching message is
delivered to nobody: *keep* puts it in `postroom quarantine` (list, show, release, delete),
*discard* drops it. Each test sends a harmless control message after the filtered one: once the
control is in the mailbox, the framework has dealt with the filtered one too (it also shows the
filter does not catch everything).
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import time
from email.message import EmailMessage

import pytest

from conftest import SAM
from helpers import (
    DELIVERY_TIMEOUT,
    JANE,
    fetch_all,
    make_message,
    peak_rss_mb,
    server_pid,
    smtp_session,
    expect,
    subject_of,
    submit,
    wait_for_subjects,
)

NAME, ADDR, PW = SAM
BOB = ("bob", "bob@example.test", "bob-secret-1")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def _id_from_line(line: str) -> str:
    return line.split()[0].strip("#:[](),")


def _rows(out: str) -> list[str]:
    rows = []
    for line in out.splitlines():
        tokens = line.split()
        if not tokens or tokens[0].lower().strip("#:") in ("id", "no", "none") or set(line.strip()) <= set("-= "):
            continue
        if re.search(r"(?i)\bempty\b|^no \w+$|^\(none\)$", line.strip()):
            continue
        rows.append(line)
    return rows


def add_filter(srv, *criteria: str, action: str = "keep") -> str:
    """`filter add CRITERIA --action ACTION`; returns the new filter's id as `filter list` shows it."""
    before = {_id_from_line(r) for r in _rows(srv.cli_ok("filter", "list").stdout)}
    srv.cli_ok("filter", "add", *criteria, "--action", action)
    after = _rows(srv.cli_ok("filter", "list").stdout)
    new = [r for r in after if _id_from_line(r) not in before]
    assert len(new) == 1, "`filter list` should show exactly one new rule:\n" + "\n".join(after)
    pattern = criteria[-1]
    assert pattern.lower() in new[0].lower(), f"`filter list` line does not show {pattern!r}: {new[0]!r}"
    assert action in new[0].lower(), f"`filter list` line does not show the action {action}: {new[0]!r}"
    return _id_from_line(new[0])


def quarantine_rows(srv) -> list[str]:
    return _rows(srv.cli_ok("quarantine", "list").stdout)


def wait_quarantined(srv, subject: str, timeout: float = DELIVERY_TIMEOUT) -> str:
    """Poll `quarantine list` until a line shows `subject`; returns that entry's id."""
    deadline = time.monotonic() + timeout
    while True:
        hits = [r for r in quarantine_rows(srv) if subject.lower() in r.lower()]
        if hits:
            assert len(hits) == 1, f"{subject!r} quarantined more than once: {hits}"
            return _id_from_line(hits[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"{subject!r} not in `quarantine list` after {timeout}s:\n"
                                 + srv.cli("quarantine", "list").stdout)
        time.sleep(0.25)


def not_quarantined(srv, subject: str) -> None:
    rows = quarantine_rows(srv)
    assert not [r for r in rows if subject.lower() in r.lower()], \
        f"{subject!r} is in the quarantine:\n" + "\n".join(rows)


def subjects(srv, user=NAME, pw=PW) -> list[str]:
    return [decoded_subject(m) for m in fetch_all(srv, user, pw)]


def decoded_subject(raw: bytes) -> str:
    return str(email.message_from_bytes(raw, policy=email.policy.default)["Subject"])


def control(srv, subject: str = "control message") -> None:
    """Send a harmless message and wait until it is delivered: the framework has caught up."""
    submit(srv, ADDR, make_message(subject))
    wait_for_subjects(srv, NAME, PW, [subject])


def as_bytes(m: EmailMessage) -> bytes:
    return m.as_bytes(policy=email.policy.SMTP)


def base_msg(subject: str, sender: str = JANE, to: str = ADDR) -> EmailMessage:
    m = EmailMessage()
    m["From"] = f"Jane <{sender}>"
    m["To"] = to
    m["Subject"] = subject
    m["Date"] = "Mon, 02 Mar 2026 10:00:00 +0000"
    m["Message-ID"] = f"<{re.sub(r'[^A-Za-z0-9]', '-', subject)}.{time.monotonic_ns()}@remote.example>"
    m.set_content("Please see the attachment.\n")
    return m


def with_attachment(subject: str, filename: str, data: bytes = b"MsgBox \"hi\"\r\n",
                    maintype: str = "application", subtype: str = "octet-stream") -> bytes:
    m = base_msg(subject)
    m.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return as_bytes(m)


def raw_attachment_msg(subject: str, part_headers: str) -> bytes:
    """A multipart/mixed message whose second part has exactly the given MIME headers."""
    b = "b-" + str(time.monotonic_ns())
    return (
        f"From: Jane <{JANE}>\r\nTo: <{ADDR}>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
        f"Message-ID: <raw.{time.monotonic_ns()}@remote.example>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"{b}\"\r\n\r\n"
        f"--{b}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee attached.\r\n"
        f"--{b}\r\n{part_headers}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{base64.b64encode(b'MsgBox 1').decode()}\r\n--{b}--\r\n"
    ).encode()


def journal_ow(srv, qid: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in srv.cli_ok("journal", "--code", "OW").stdout.splitlines() if qid in ln]
        if lines:
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no journal OW entry for {qid} after {timeout}s; journal:\n"
                                 + srv.cli_ok("journal").stdout)
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------
# keep / discard / quarantine commands
# ------------------------------------------------------------------------------------------

def test_keep_quarantines_then_release_delivers(sam):
    """F3: --action keep: the message reaches nobody and shows in `quarantine list` and
    `quarantine show`; the journal has OW naming the rule; `quarantine release` delivers it
    (exactly once) to its local recipients and takes it out of the quarantine."""
    sam.add_user(*BOB)
    fid = add_filter(sam, "--subject", "*invoice*")
    qid = submit(sam, [ADDR, BOB[1]], make_message("Your INVOICE 4711", body="pay now\r\n"))
    control(sam)
    assert "Your INVOICE 4711" not in subjects(sam), "a kept message was delivered"
    assert subjects(sam, BOB[0], BOB[2]) == [], "a kept message was delivered to bob"
    q = wait_quarantined(sam, "Your INVOICE 4711")

    show = sam.cli_ok("quarantine", "show", q).stdout
    assert "Your INVOICE 4711" in show, show
    assert ADDR.lower() in show.lower() and BOB[1] in show.lower(), f"recipients not shown:\n{show}"

    ow = journal_ow(sam, qid)
    assert any("*invoice*" in ln.lower() or re.search(rf"(?<![0-9A-Za-z]){re.escape(fid)}(?![0-9A-Za-z])", ln)
               for ln in ow), f"journal OW does not name the rule ({fid}, *invoice*): {ow}"

    sam.cli_ok("quarantine", "release", q)
    msgs = wait_for_subjects(sam, NAME, PW, ["Your INVOICE 4711"])
    wait_for_subjects(sam, BOB[0], BOB[2], ["Your INVOICE 4711"])
    not_quarantined(sam, "Your INVOICE 4711")
    time.sleep(1.5)  # a released message must not be filtered or delivered again
    assert subjects(sam).count("Your INVOICE 4711") == 1, subjects(sam)
    assert subjects(sam, BOB[0], BOB[2]) == ["Your INVOICE 4711"]
    body = [m for m in msgs if subject_of(m) == "Your INVOICE 4711"][0]
    assert b"pay now" in body


def test_discard_drops_the_message(sam):
    """F3: --action discard: the message reaches nobody and is not kept; journal OW."""
    add_filter(sam, "--subject", "*lottery*", action="discard")
    qid = submit(sam, ADDR, make_message("You won the LOTTERY"))
    control(sam)
    journal_ow(sam, qid)
    assert "You won the LOTTERY" not in subjects(sam)
    not_quarantined(sam, "You won the LOTTERY")


def test_quarantine_delete(sam):
    """F3: `quarantine delete ID` removes a kept message for good: not listed, `show` fails,
    nothing is ever delivered."""
    add_filter(sam, "--subject", "*invoice*")
    submit(sam, ADDR, make_message("invoice to delete"))
    q = wait_quarantined(sam, "invoice to delete")
    sam.cli_ok("quarantine", "delete", q)
    not_quarantined(sam, "invoice to delete")
    r = sam.cli("quarantine", "show", q)
    assert r.returncode != 0, f"`quarantine show` of a deleted entry exited 0:\n{r.stdout}"
    r = sam.cli("quarantine", "release", q)
    assert r.returncode != 0, f"`quarantine release` of a deleted entry exited 0:\n{r.stdout}"
    control(sam)
    assert "invoice to delete" not in subjects(sam)


def test_quarantine_unknown_id_is_user_error(server):
    """INTERFACE: show/release/delete of an id that does not exist exit 1."""
    for verb in ("show", "release", "delete"):
        r = server.cli("quarantine", verb, "999999")
        assert r.returncode == 1, (verb, r.returncode, r.stdout, r.stderr)


def test_filter_remove_stops_filtering(sam):
    """F3: `filter remove ID` takes the rule out of `filter list`; matching mail flows again."""
    fid = add_filter(sam, "--subject", "*invoice*")
    sam.cli_ok("filter", "remove", fid)
    assert not [r for r in _rows(sam.cli_ok("filter", "list").stdout) if _id_from_line(r) == fid]
    submit(sam, ADDR, make_message("invoice after removal"))
    wait_for_subjects(sam, NAME, PW, ["invoice after removal"])
    not_quarantined(sam, "invoice after removal")


def test_filter_add_refuses_bad_action(server):
    """INTERFACE: an unknown action is refused (non-zero exit) and adds no rule."""
    r = server.cli("filter", "add", "--subject", "*x*", "--action", "explode")
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert not _rows(server.cli_ok("filter", "list").stdout)


# ------------------------------------------------------------------------------------------
# what matches: decoded subjects, originators, attachment names, MIME types
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoded,pattern", [
    ("=?UTF-8?Q?Urgent_PAYMENT_due?=", "*payment*"),
    ("=?UTF-8?B?" + base64.b64encode("Rechnung FÄLLIG heute".encode()).decode() + "?=", "*fällig*"),
    ("=?ISO-8859-1?Q?Rechnung_f=E4llig?= =?UTF-8?Q?_morgen?=", "rechnung fällig morgen"),
], ids=["q-ascii", "b-utf8-casefold", "latin1-adjacent-words"])
def test_subject_matched_after_rfc2047_decoding(sam, encoded, pattern):
    """F3: subjects are matched on their RFC 2047-decoded text, case-insensitively."""
    add_filter(sam, "--subject", pattern)
    submit(sam, ADDR, make_message(encoded))
    control(sam)
    assert [s for s in subjects(sam)] == ["control message"], subjects(sam)
    rows = quarantine_rows(sam)
    assert len(rows) == 1, rows


def test_from_pattern(sam):
    """F3: --from "*@spam.example" catches X@SPAM.Example (case-insensitive), not jane."""
    add_filter(sam, "--from", "*@spam.example")
    submit(sam, ADDR, make_message("from spammer", sender="X@SPAM.Example"),
           sender="X@SPAM.Example")
    submit(sam, ADDR, make_message("from jane"))
    wait_for_subjects(sam, NAME, PW, ["from jane"])
    control(sam)
    assert "from spammer" not in subjects(sam)
    wait_quarantined(sam, "from spammer")
    not_quarantined(sam, "from jane")


@pytest.mark.parametrize("how", ["rfc2231", "rfc2231-continuation", "name-only", "rfc2047-name",
                                 "upper-case"])
def test_attachment_name_decoded(sam, how):
    """F3: --attachment "*.vbs" matches the decoded file name however it is written: RFC 2231
    filename* (with a non-ASCII character, and split into continuations), only a Content-Type
    name=, an RFC 2047 encoded name=, upper case."""
    add_filter(sam, "--attachment", "*.vbs")
    subject = f"attached {how}"
    if how == "rfc2231":
        msg = with_attachment(subject, "€invoice.VBS")
        assert b"filename*=utf-8''%E2%82%ACinvoice.VBS" in msg
    elif how == "rfc2231-continuation":
        msg = raw_attachment_msg(subject, "Content-Type: application/octet-stream\r\n"
                                 "Content-Disposition: attachment;\r\n"
                                 " filename*0*=utf-8''%E2%82%ACinv;\r\n filename*1*=oice.V;\r\n filename*2=BS")
    elif how == "name-only":
        msg = raw_attachment_msg(subject, 'Content-Type: application/octet-stream; name="SCRIPT.VBS"')
    elif how == "rfc2047-name":
        enc = "=?UTF-8?B?" + base64.b64encode("€rechnung.vbs".encode()).decode() + "?="
        msg = raw_attachment_msg(subject, f'Content-Type: application/octet-stream; name="{enc}"')
    else:
        msg = with_attachment(subject, "LOVE-LETTER-FOR-YOU.TXT.VBS")
    submit(sam, ADDR, msg)
    control(sam)
    assert subject not in subjects(sam), f"{how}: the .vbs attachment was delivered"
    wait_quarantined(sam, subject)


def test_attachment_pattern_is_anchored(sam):
    """F3: "*.vbs" is a whole-name pattern: script.vbs.txt and report.pdf are delivered."""
    add_filter(sam, "--attachment", "*.vbs")
    submit(sam, ADDR, with_attachment("txt attachment", "script.vbs.txt"))
    submit(sam, ADDR, with_attachment("pdf attachment", "report.pdf", maintype="application",
                                      subtype="pdf"))
    wait_for_subjects(sam, NAME, PW, ["txt attachment", "pdf attachment"])
    assert not quarantine_rows(sam)


def test_attachment_inside_attached_message(sam):
    """F3: an attachment evil.vbs inside a message/rfc822 part inside nested multipart/mixed is
    found."""
    inner = base_msg("inner message")
    inner.add_attachment(b"WScript.Echo 1\r\n", maintype="application", subtype="octet-stream",
                         filename="evil.vbs")
    wrapper = EmailMessage()
    wrapper.set_content("forwarded for you\n")
    wrapper.add_attachment(inner)  # -> multipart/mixed [text/plain, message/rfc822]
    outer = base_msg("forwarded evil")
    outer.make_mixed()
    outer.attach(wrapper)
    raw = as_bytes(outer)
    assert b"message/rfc822" in raw and b"evil.vbs" in raw and raw.count(b"multipart/mixed") >= 2
    add_filter(sam, "--attachment", "*.VBS")
    submit(sam, ADDR, raw)
    control(sam)
    assert "forwarded evil" not in subjects(sam)
    wait_quarantined(sam, "forwarded evil")


def test_mime_type_wildcard(sam):
    """F3: --mime-type "image/*" catches a message with an image/png part; text-only mail and a
    PDF attachment pass."""
    add_filter(sam, "--mime-type", "image/*")
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    m = base_msg("picture")
    m.add_attachment(png, maintype="image", subtype="png", filename="dot.png")
    raw = as_bytes(m).replace(b"Content-Type: image/png", b"Content-Type: IMAGE/PNG")
    submit(sam, ADDR, raw)
    submit(sam, ADDR, with_attachment("a pdf", "a.pdf", maintype="application", subtype="pdf"))
    wait_for_subjects(sam, NAME, PW, ["a pdf"])
    control(sam)
    assert "picture" not in subjects(sam)
    wait_quarantined(sam, "picture")


def test_filtered_sendmail_submission(sam):
    """F3 applies to every door: a message submitted with `postroom sendmail` is filtered too."""
    add_filter(sam, "--attachment", "*.vbs", action="discard")
    r = sam.cli("sendmail", ADDR, input=with_attachment("via sendmail", "x.vbs").decode())
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    control(sam)
    assert "via sendmail" not in subjects(sam)


# ------------------------------------------------------------------------------------------
# hostile messages: bounded parsing
# ------------------------------------------------------------------------------------------

def _handled(srv, subject: str, timeout: float = 60.0) -> str:
    """Wait until `subject` is delivered or quarantined; returns which."""
    deadline = time.monotonic() + timeout
    while True:
        if any(subject.lower() in r.lower() for r in quarantine_rows(srv)):
            return "quarantined"
        if subject in subjects(srv):
            return "delivered"
        assert srv.proc.poll() is None, f"server died (status {srv.proc.returncode})"
        if time.monotonic() > deadline:
            raise AssertionError(f"{subject!r} neither delivered nor quarantined after {timeout}s")
        time.sleep(0.5)


def _still_serving(srv, subject: str) -> None:
    assert srv.proc.poll() is None, f"server died (status {srv.proc.returncode})"
    c = smtp_session(srv)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.data(make_message(subject)), 250)
    c.quit()
    wait_for_subjects(srv, NAME, PW, [subject])


def nested_multipart(depth: int, subject: str) -> bytes:
    out = [f"From: <{JANE}>\r\nTo: <{ADDR}>\r\nSubject: {subject}\r\n"
           f"Message-ID: <deep.{time.monotonic_ns()}@remote.example>\r\n"
           f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n"]
    for i in range(depth):
        out.append(f"--b{i}\r\nContent-Type: multipart/mixed; boundary=\"b{i + 1}\"\r\n\r\n")
    out.append(f"--b{depth}\r\nContent-Type: application/octet-stream; name=\"evil.vbs\"\r\n"
               f"Content-Disposition: attachment; filename=\"evil.vbs\"\r\n\r\nAAAA\r\n--b{depth}--\r\n")
    for i in reversed(range(depth)):
        out.append(f"--b{i}--\r\n")
    return "".join(out).encode()


def nested_rfc822(depth: int, subject: str) -> bytes:
    head = (f"From: <{JANE}>\r\nTo: <{ADDR}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <deep822.{time.monotonic_ns()}@remote.example>\r\nMIME-Version: 1.0\r\n")
    inner = ("Content-Type: application/octet-stream; name=\"evil.vbs\"\r\n\r\nAAAA\r\n")
    body = inner
    for i in range(depth):
        body = f"Content-Type: message/rfc822\r\n\r\nSubject: level {i}\r\nMIME-Version: 1.0\r\n" + body
    return (head + body).encode()


@pytest.mark.parametrize("kind", ["multipart", "rfc822"])
def test_500_levels_of_nesting(sam, kind):
    """F3: a message nested 500 levels deep is delivered or quarantined in time; the server
    stays up and keeps serving."""
    add_filter(sam, "--attachment", "*.vbs")
    subject = f"deep {kind}"
    raw = nested_multipart(500, subject) if kind == "multipart" else nested_rfc822(500, subject)
    submit(sam, ADDR, raw)
    _handled(sam, subject)
    _still_serving(sam, f"after deep {kind}")
    assert peak_rss_mb(server_pid(sam)) < 300


@pytest.mark.timeout(180)
def test_20_mb_message(sam):
    """F3: a 20 MB message with an attachment filter active is delivered or quarantined within
    the timeout; the server stays up and its peak RSS stays below 300 MB."""
    add_filter(sam, "--attachment", "*.vbs")
    m = base_msg("twenty megabytes")
    m.add_attachment(os.urandom(14_500_000), maintype="application", subtype="octet-stream",
                     filename="big.bin")
    m.add_attachment(b"WScript.Echo 1\r\n", maintype="application", subtype="octet-stream",
                     filename="tail.vbs")
    raw = as_bytes(m)
    assert len(raw) > 19_000_000, len(raw)
    submit(sam, ADDR, raw)
    how = _handled(sam, "twenty megabytes", timeout=90)
    _still_serving(sam, "after twenty megabytes")
    rss = peak_rss_mb(server_pid(sam))
    assert rss < 300, f"server peak RSS {rss:.0f} MB after a 20 MB message ({how})"
