"""What an attack on the running server found (issue 13), each against the real binary where the
attack is: a removed user who could still relay (A1, D2), journal and terminal injection through
names a client sends (F4), filters that failed open on mail they could not inspect (F3), and the
quota bypassed through aliases (D2).
"""

from __future__ import annotations

import time

import pytest

from conftest_tls import (  # noqa: F401  (make_tls_server is a fixture)
    KIM_USER,
    SAM_USER,
    make_tls_server,
    plain_token,
    smtp_auth_plain,
    smtp_tls_session,
)
from helpers import (
    JANE,
    expect,
    fetch_all,
    journal_lines,
    make_message,
    pop_login,
    pop_login_fails,
    smtp_session,
    submit,
    wait_for_subjects,
    wait_journal,
)
from test_filter import add_filter, not_quarantined, wait_quarantined

SAM, SAM_ADDRS, SAM_PW = SAM_USER
KIM, KIM_ADDRS, KIM_PW = KIM_USER


# --- A1/D2: a removed user keeps POP3 for what is left, never SMTP AUTH ------------------------

def test_removed_user_cannot_authenticate_to_send_but_may_collect(make_tls_server):
    """`user remove kim` while kim's mailbox holds mail: POP3 still lets kim collect it, but
    AUTH on submission answers 535 (it gave 235 and kim relayed anywhere); `user disable kim`
    works on the removed account and then POP3 refuses too."""
    srv = make_tls_server()
    submit(srv, KIM_ADDRS[0], make_message("left over"))
    wait_for_subjects(srv, KIM, KIM_PW, ["left over"])
    srv.cli_ok("user", "remove", KIM)

    c = smtp_tls_session(srv, "submission")
    expect(smtp_auth_plain(c, KIM, KIM_PW), 535)
    expect(c.cmd(f"MAIL FROM:<{KIM_ADDRS[0]}>"), 530)
    c.quit()
    # The same password still collects what is left.
    p = pop_login(srv, KIM, KIM_PW)
    assert p.stat()[0] == 1
    p.quit()

    r = srv.cli("user", "disable", KIM)
    assert r.returncode == 0, r.stderr
    assert pop_login_fails(srv, KIM, KIM_PW) is not None


# --- F4: nothing a client sends can forge a journal line or drive the terminal ----------------

def test_user_names_cannot_forge_journal_lines_or_escape_codes(make_tls_server):
    """An AUTH PLAIN user name with a line feed and an ESC sequence, and a 3,000-character
    AUTH LOGIN user name: `postroom journal` shows one line each, control characters escaped,
    the long name cut and marked as cut."""
    srv = make_tls_server()
    forged = "mallory\n2026-12-07 94 forged entry\x1b[2J\x1b]0;pwned\x07"
    c = smtp_tls_session(srv, "submission")
    expect(c.cmd(f"AUTH PLAIN {plain_token(forged, 'x')}"), 535)
    c.quit()
    c = smtp_tls_session(srv, "submission")
    import base64
    expect(c.cmd("AUTH LOGIN"), 334)
    expect(c.cmd(base64.b64encode(b"L" * 3000).decode()), 334)
    expect(c.cmd(base64.b64encode(b"wrong").decode()), 535)
    c.quit()

    wait_journal(srv, lambda line: "mallory" in line, code="9F")
    out = srv.cli_ok("journal").stdout
    assert "\x1b" not in out and "\x07" not in out, "raw escape codes reach the terminal"
    assert not any(line.startswith("2026-12-07 94") for line in out.splitlines()), "a forged line"
    mallory = [line for line in out.splitlines() if "mallory" in line]
    assert len(mallory) == 1 and "\\n2026-12-07 94 forged" in mallory[0] and "\\u{1b}[2J" in mallory[0], mallory
    long = [line for line in out.splitlines() if "LLLL" in line]
    assert len(long) == 1, long
    assert "L" * 3000 not in long[0] and "cut" in long[0], long[0][:400]


# --- F3: filters fail closed ------------------------------------------------------------------

def nested_exe(depth: int, subject: str) -> bytes:
    """A message whose .exe attachment sits `depth` multipart levels deep."""
    head = [f"From: {JANE}", "To: sam@example.test", f"Subject: {subject}", "MIME-Version: 1.0"]
    body = ("Content-Type: application/octet-stream\r\n"
            "Content-Disposition: attachment; filename=\"invoice.exe\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n")
    for level in range(depth):
        b = f"b{level}"
        body = (f"Content-Type: multipart/mixed; boundary=\"{b}\"\r\n\r\n"
                f"--{b}\r\nContent-Type: text/plain\r\n\r\nlevel {level}\r\n"
                f"--{b}\r\n{body}--{b}--\r\n")
    return ("\r\n".join(head) + "\r\n").encode() + body.encode()


@pytest.mark.parametrize("depth", [25])
def test_attachment_nested_too_deep_is_kept_not_delivered(make_tls_server, depth):
    """`filter add --attachment '*.exe' --action keep`: an .exe nested 25 MIME levels deep (past
    what the scanner walks) was delivered unfiltered; now the message is kept with the reason,
    and a shallow one is still caught by the rule itself."""
    srv = make_tls_server()
    add_filter(srv, "--attachment", "*.exe")
    submit(srv, SAM_ADDRS[0], nested_exe(depth, "deep exe"))
    submit(srv, SAM_ADDRS[0], nested_exe(2, "shallow exe"))
    submit(srv, SAM_ADDRS[0], make_message("plain note"))
    wait_for_subjects(srv, SAM, SAM_PW, ["plain note"])
    deep = wait_quarantined(srv, "deep exe")
    wait_quarantined(srv, "shallow exe")
    shown = srv.cli_ok("quarantine", "show", deep).stdout
    assert "could not be inspected completely" in shown and "nested deeper" in shown, shown
    subjects = [m for m in fetch_all(srv, SAM, SAM_PW) if b"exe" in m]
    assert subjects == [], "an attachment the filter could not see was delivered"


def test_unscannable_mail_is_delivered_when_configured(make_tls_server):
    """`[storage] filter_unscannable = "deliver"` chooses the old behaviour."""
    srv = make_tls_server(storage={"min_free_mb": 0, "filter_unscannable": "deliver"})
    add_filter(srv, "--attachment", "*.exe")
    submit(srv, SAM_ADDRS[0], nested_exe(25, "deep exe"))
    wait_for_subjects(srv, SAM, SAM_PW, ["deep exe"])
    not_quarantined(srv, "deep exe")


# --- D2: the quota holds through aliases, and at delivery ---------------------------------------

def _rcpt(srv, sender: str, rcpt: str):
    c = smtp_session(srv)
    try:
        expect(c.cmd(f"MAIL FROM:<{sender}>"), 250)
        return c.cmd(f"RCPT TO:<{rcpt}>")
    finally:
        c.quit()


def test_quota_holds_for_aliases_at_rcpt_and_at_delivery(make_tls_server):
    """sam's mailbox at its quota: RCPT to sam's alias gets 452 4.2.2 like sam's own address; a
    group of sam and kim is accepted (kim has room), kim gets the message, sam gets none and the
    sender a non-delivery report with 5.2.2."""
    srv = make_tls_server()
    srv.cli_ok("alias", "add", "boss@example.test", SAM_ADDRS[0])
    srv.cli_ok("alias", "add", "team@example.test", SAM_ADDRS[0], KIM_ADDRS[0])
    srv.cli_ok("user", "quota", SAM, "1000")
    submit(srv, SAM_ADDRS[0], make_message("fills the box", body="x" * 2000 + "\r\n"))
    wait_for_subjects(srv, SAM, SAM_PW, ["fills the box"])

    deadline = time.monotonic() + 5
    while (r := _rcpt(srv, JANE, "boss@example.test")).code != 452 and time.monotonic() < deadline:
        time.sleep(0.2)
    expect(r, 452, "4.2.2")
    expect(_rcpt(srv, JANE, "team@example.test"), 250)

    submit(srv, "team@example.test", make_message("to the team"), sender=KIM_ADDRS[0])
    wait_for_subjects(srv, KIM, KIM_PW, ["to the team"])
    # The report to kim (the sender) names sam's full mailbox.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msgs = fetch_all(srv, KIM, KIM_PW)
        reports = [m for m in msgs if b"5.2.2" in m]
        if reports:
            break
        time.sleep(0.3)
    assert len(reports) == 1, [m[:300] for m in msgs]
    sam_subjects = [m for m in fetch_all(srv, SAM, SAM_PW) if b"to the team" in m]
    assert sam_subjects == [], "delivered past the quota"
    assert [line for line in journal_lines(srv, "A1") if "5.2.2" in line]


# --- R9: hack auto-deny exempts authenticated clients, can be switched off, is visible ---------

from conftest_tls import smtp_plain  # noqa: E402


def _overlong(srv, source_ip: str, login: bool = False) -> None:
    """One session from source_ip that sends a command line beyond the limits (R9)."""
    if login:
        c = smtp_tls_session(srv, "submission", source_ip)
        expect(smtp_auth_plain(c, SAM, SAM_PW), 235)
    else:
        c = smtp_plain(srv.smtp, source_ip)
        expect(c.greeting, 220)
    c.send(b"NOOP " + b"x" * 5000 + b"\r\n")
    try:
        expect(c.read_reply(), 500)
    finally:
        c.close()


def _greeting(srv, source_ip: str) -> int:
    c = smtp_plain(srv.smtp, source_ip)
    try:
        return c.greeting.code
    finally:
        c.close()


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def test_authenticated_client_is_not_auto_denied(make_tls_server):
    """R9 exempts authenticated clients: sam, logged in on submission, sends one over-long line
    from the office's address; that address is not put on the deny list (it was: a whole
    office behind NAT locked out)."""
    srv = make_tls_server()
    _overlong(srv, "127.0.7.21", login=True)
    assert _greeting(srv, "127.0.7.21") == 220
    assert "127.0.7.21" not in srv.cli_ok("list", "show", "deny").stdout


def test_auto_deny_can_be_switched_off(make_tls_server):
    """`[penalty] deny_minutes = 0` switches the hack auto-deny off: the over-long line gets its
    500, the address is not denied."""
    srv = make_tls_server(penalty={"deny_minutes": 0})
    _overlong(srv, "127.0.7.22")
    assert _greeting(srv, "127.0.7.22") == 220
    assert "127.0.7.22" not in srv.cli_ok("list", "show", "deny").stdout


def test_deny_list_is_shown_explained_lifted_and_survives_a_restart(make_tls_server):
    """A denied address shows in `list show deny`, `explain` says why (exit 1), it stays denied
    across a restart, and `list remove deny ADDRESS` lets it in again within seconds, without a
    restart."""
    srv = make_tls_server()
    _overlong(srv, "127.0.7.23")
    assert _greeting(srv, "127.0.7.23") == 421
    assert _wait(lambda: "127.0.7.23" in srv.cli_ok("list", "show", "deny").stdout), srv.cli_ok("list", "show", "deny").stdout
    r = srv.cli("explain", "--ip", "127.0.7.23", "--from", JANE, "--to", SAM_ADDRS[0])
    assert r.returncode == 1 and "temporary deny list" in r.stdout, (r.returncode, r.stdout, r.stderr)
    srv.restart()
    assert _greeting(srv, "127.0.7.23") == 421, "a restart forgave the attacker"
    r = srv.cli("list", "remove", "deny", "127.0.7.23")
    assert r.returncode == 0, r.stderr
    assert _wait(lambda: _greeting(srv, "127.0.7.23") == 220), "still denied after `list remove deny`"
    assert "127.0.7.23" not in srv.cli_ok("list", "show", "deny").stdout
    r = srv.cli("explain", "--ip", "127.0.7.23", "--from", JANE, "--to", SAM_ADDRS[0])
    assert r.returncode == 0, r.stdout
    r = srv.cli("explain", "--ip", "127.0.7.23", "--user", "nosuch", "--from", JANE, "--to", SAM_ADDRS[0])
    assert r.returncode == 2 and "no such user" in r.stderr, (r.returncode, r.stdout, r.stderr)
