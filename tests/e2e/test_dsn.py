"""Delivery status notifications (SPEC §6 C4; RFC 3461 SMTP DSN extension, RFC 3464 reports).

Same world as test_outbound.py / test_bounce.py (smtppeer.Net): remote.example has MX hosts
mx1/mx2 (127.0.0.51/52), other.example one MX (127.0.0.53), all scripted peers on
`[delivery] remote_port`. Sam (sam@example.test) and the postmaster admin (admin@example.test)
are local POP users, so every report Sam asks for is read back over POP3 and parsed with the
`email` package.

What is checked, as a user sees it:
  * EHLO lists DSN; RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT are accepted, bad values get 501;
  * NOTIFY=SUCCESS: "delivered" for local mail, "relayed" for a peer without DSN;
  * a peer that speaks DSN receives the parameters unchanged, and we stay silent;
  * NOTIFY=DELAY (and no NOTIFY) gives one "delayed" report, however many retries follow;
  * failures: "failed" with the headers (RET=HDRS) or the whole message (RET=FULL);
    NOTIFY=NEVER gives nothing;
  * ENVID and ORCPT come back as Original-Envelope-Id / Original-Recipient;
  * `dsn_responsible_person` -> Reply-To; the NONDELIVERY user gets a copy of each failure report.
"""

from __future__ import annotations

import email
import email.policy
import re
import time

import pytest

from dnsstub import mx_dns_stub  # noqa: F401  (fixture)
from helpers import (
    JANE,
    dot_stuff,
    expect,
    fetch_all,
    make_message,
    smtp_from,
    smtp_session,
)
from smtppeer import (  # noqa: F401  (net is a fixture)
    ADMIN_ADDR,
    ADMIN_PW,
    ADMIN_USER,
    DEFAULT_CAPS,
    OUT_TIMEOUT,
    SAM_ADDR,
    SAM_PW,
    SAM_USER,
    bounce_for,
    esmtp_params,
    is_bounce,
    mailbox_stays,
    net,
    parse_bounce,
    rcpt_lines,
    wait_queue_empty,
)

REFUSAL = "550 5.1.1 <x@other.example>: no such user here (dsn-test)"
NONDELIVERY_USER, NONDELIVERY_ADDR, NONDELIVERY_PW = "nondelivery", "nondelivery@example.test", "nd-secret-1"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def submit_dsn(srv, sender: str, rcpts, message: bytes, mail_params: str = "",
               source_ip: str = "127.0.0.1") -> None:
    """One transaction from a relay-listed loopback address with DSN parameters.
    rcpts: [(address, "NOTIFY=... ORCPT=...")]; every command must get 250."""
    c = smtp_from(srv, source_ip)
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{sender}> {mail_params}".rstrip()), 250)
        for addr, params in rcpts:
            expect(c.cmd(f"RCPT TO:<{addr}> {params}".rstrip()), 250)
        expect(c.cmd("DATA"), 354)
        c.send(dot_stuff(message) + b".\r\n")
        expect(c.read_reply(), 250)
    finally:
        c.quit()


def report(raw: bytes, recipient: str, action: str, status_re: str, to: str = SAM_ADDR) -> dict:
    """Check one RFC 3464 report as the sender receives it; returns
    {"parsed": parse_bounce(...), "fields": the recipient's block, "parts": the MIME parts}."""
    assert raw.startswith(b"Return-Path: <>\r\n"), f"report not sent with MAIL FROM:<>: {raw[:300]!r}"
    parsed = parse_bounce(raw)
    msg = parsed["msg"]
    assert "mailer-daemon" in (msg.get("From") or "").lower(), msg.get("From")
    assert to.lower() in (msg.get("To") or "").lower(), f"report To: {msg.get('To')!r}, expected {to}"
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert (msg.get_param("report-type") or "").lower() == "delivery-status", msg.get("Content-Type")
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) >= 2, f"report has {len(parts)} part(s)"
    assert parts[1].get_content_type() == "message/delivery-status", [p.get_content_type() for p in parts]
    assert "reporting-mta" in parsed["per_message"], parsed["per_message"]
    f = bounce_for(parsed, recipient)
    assert f is not None, f"no per-recipient block for {recipient}: {parsed['recipients']!r}\n{raw[:3000]!r}"
    assert f["final-recipient"].split(";", 1)[0].strip().lower() == "rfc822", f
    assert f.get("action", "").lower() == action, f"Action {f.get('action')!r}, expected {action}: {f!r}"
    status = (f.get("status") or "").split()
    assert status and re.fullmatch(status_re, status[0]), \
        f"Status {f.get('status')!r} does not match {status_re}: {f!r}"
    return {"parsed": parsed, "fields": f, "parts": parts}


def original_recipient(fields: dict) -> tuple[str, str]:
    """Original-Recipient "rfc822;addr" -> ("rfc822", "addr")."""
    v = fields.get("original-recipient")
    assert v, f"no Original-Recipient field: {fields!r}"
    typ, _, addr = v.partition(";")
    return typ.strip().lower(), addr.strip()


def reports_of(srv, user: str, password: str) -> list[bytes]:
    return [m for m in fetch_all(srv, user, password) if is_bounce(m)]


def wait_report_with(srv, user, password, recipient: str, action: str,
                     timeout: float = OUT_TIMEOUT) -> bytes:
    """The first report in the maildrop whose block for recipient has this Action."""
    deadline = time.monotonic() + timeout
    while True:
        for raw in reports_of(srv, user, password):
            f = bounce_for(parse_bounce(raw), recipient)
            if f and f.get("action", "").lower() == action:
                return raw
        if time.monotonic() > deadline:
            got = [(bounce_for(parse_bounce(r), recipient) or {}).get("action")
                   for r in reports_of(srv, user, password)]
            raise AssertionError(f"no report with Action {action} for {recipient} in {user}'s "
                                 f"maildrop after {timeout}s; actions seen: {got!r}\nqueue:\n"
                                 + srv.cli("queue", "list").stdout)
        time.sleep(0.3)


def actions_for(srv, user, password, recipient: str) -> list[str]:
    out = []
    for raw in reports_of(srv, user, password):
        f = bounce_for(parse_bounce(raw), recipient)
        if f:
            out.append(f.get("action", "").lower())
    return out


# ------------------------------------------------------------------------------------------
# The SMTP server side: EHLO and parameters
# ------------------------------------------------------------------------------------------

def test_ehlo_lists_dsn(server):
    """RFC 3461 §4: the server announces DSN in its EHLO reply."""
    c = smtp_session(server, ehlo=False)
    try:
        r = c.ehlo()
        keywords = [line.split()[0].upper() for line in r.lines[1:] if line.split()]
        assert "DSN" in keywords, r.lines
    finally:
        c.quit()


def test_dsn_parameters_are_accepted_and_mail_is_delivered(sam):
    """RFC 3461 §4.1-4.4: RET, ENVID on MAIL and NOTIFY, ORCPT on RCPT (any combination, xtext
    encoded) get 250, and the message is delivered."""
    from helpers import wait_for_subjects
    c = smtp_session(sam)
    try:
        expect(c.cmd(f"MAIL FROM:<{JANE}> RET=HDRS ENVID=QQ+2B314"), 250)
        expect(c.cmd("RCPT TO:<SamJones@example.test> NOTIFY=FAILURE,DELAY "
                     "ORCPT=rfc822;Sam+2BJones@example.test"), 250)
        expect(c.data(make_message("dsn params one")), 250)
        expect(c.cmd(f"MAIL FROM:<{JANE}> ENVID=abc.def RET=FULL"), 250)
        expect(c.cmd("RCPT TO:<SamJones@example.test> ORCPT=RFC822;SamJones@example.test "
                     "NOTIFY=NEVER"), 250)
        expect(c.data(make_message("dsn params two")), 250)
        expect(c.cmd(f"MAIL FROM:<{JANE}> RET=full"), 250)   # keywords and values: any case
        expect(c.cmd("RCPT TO:<SamJones@example.test> notify=failure"), 250)
        expect(c.data(make_message("dsn params three")), 250)
    finally:
        c.quit()
    wait_for_subjects(sam, "sam", "sam-secret-1", ["dsn params one", "dsn params two", "dsn params three"])


BAD_PARAMS = [
    ("MAIL", "RET=SOMETIMES"),
    ("MAIL", "RET="),
    ("MAIL", "ENVID=+ZZbad"),              # "+" must be followed by two hex digits (xtext)
    ("RCPT", "NOTIFY=MAYBE"),
    ("RCPT", "NOTIFY="),
    ("RCPT", "NOTIFY=NEVER,SUCCESS"),      # NEVER must stand alone (RFC 3461 §4.1)
    ("RCPT", "ORCPT=sam@example.test"),    # no address type
]


@pytest.mark.parametrize("verb,param", BAD_PARAMS, ids=[f"{v}-{p}" for v, p in BAD_PARAMS])
def test_bad_dsn_parameter_gets_501_and_session_goes_on(sam, verb, param):
    """RFC 3461: a malformed DSN parameter value is refused with 501; the same command without
    it then succeeds in the same session."""
    c = smtp_session(sam)
    try:
        if verb == "MAIL":
            r = c.cmd(f"MAIL FROM:<{JANE}> {param}")
            assert r.code == 501, f"MAIL ... {param} -> {r!r}"
            expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
            expect(c.cmd("RCPT TO:<SamJones@example.test>"), 250)
        else:
            expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
            r = c.cmd(f"RCPT TO:<SamJones@example.test> {param}")
            assert r.code == 501, f"RCPT ... {param} -> {r!r}"
            expect(c.cmd("RCPT TO:<SamJones@example.test>"), 250)
    finally:
        c.quit()


# ------------------------------------------------------------------------------------------
# Success reports
# ------------------------------------------------------------------------------------------

def test_local_delivery_with_notify_success_reports_delivered(net):
    """C4: Sam sends to a local user with NOTIFY=SUCCESS, ENVID and ORCPT -> Sam gets a
    multipart/report with Action: delivered, Status 2.0.0, the ENVID as Original-Envelope-Id
    and the ORCPT as Original-Recipient; the recipient has the message."""
    srv = net.server()
    m = make_message("local success", b"Hello admin.\r\n", sender=SAM_ADDR, to=ADMIN_ADDR)
    submit_dsn(srv, SAM_ADDR, [(ADMIN_ADDR, "NOTIFY=SUCCESS ORCPT=rfc822;Boss.Admin@example.test")],
               m, mail_params="RET=HDRS ENVID=local-env-0001")
    raw = wait_report_with(srv, SAM_USER, SAM_PW, ADMIN_ADDR, "delivered")
    r = report(raw, ADMIN_ADDR, "delivered", r"2\.0\.0")
    assert r["parsed"]["per_message"].get("original-envelope-id") == "local-env-0001", r["parsed"]["per_message"]
    assert original_recipient(r["fields"]) == ("rfc822", "Boss.Admin@example.test"), r["fields"]
    admin_msgs = fetch_all(srv, ADMIN_USER, ADMIN_PW)
    assert any(b"Hello admin." in x and not is_bounce(x) for x in admin_msgs), admin_msgs
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 2.0)


def test_no_success_report_without_notify_success(net):
    """RFC 3461 §4.1: without NOTIFY=SUCCESS a successful delivery is silent."""
    srv = net.server()
    submit_dsn(srv, SAM_ADDR, [(ADMIN_ADDR, "NOTIFY=FAILURE,DELAY"), ("a@remote.example", "")],
               make_message("quiet success", sender=SAM_ADDR, to=ADMIN_ADDR), "ENVID=quiet-1")
    net.mx1.wait_delivered("a@remote.example")
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 0, 3.0)


def test_relay_to_peer_without_dsn_reports_relayed(net):
    """C4 / RFC 3461 §5.2.2: the next hop does not offer DSN -> Sam's NOTIFY=SUCCESS is answered
    by us with Action: relayed, Status 2.0.0; the peer is not sent DSN parameters it never
    offered."""
    assert "DSN" not in net.mx1.caps
    srv = net.server()
    m = make_message("relayed success", b"Over there.\r\n", sender=SAM_ADDR, to="a@remote.example")
    submit_dsn(srv, SAM_ADDR, [("a@remote.example", "NOTIFY=SUCCESS ORCPT=rfc822;first.a@remote.example")],
               m, mail_params="RET=FULL ENVID=relay-env-0002")
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert tx.message.endswith(m)
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "a@remote.example", "relayed")
    r = report(raw, "a@remote.example", "relayed", r"2\.0\.0")
    assert r["parsed"]["per_message"].get("original-envelope-id") == "relay-env-0002", r["parsed"]["per_message"]
    assert original_recipient(r["fields"]) == ("rfc822", "first.a@remote.example"), r["fields"]
    params = esmtp_params(tx.mail_params)
    assert "RET" not in params and "ENVID" not in params, f"MAIL to a non-DSN peer: {tx.mail_params!r}"
    for line in rcpt_lines(net.mx1, "a@remote.example"):
        assert not re.search(r"(?i)\b(NOTIFY|ORCPT)=", line), f"RCPT to a non-DSN peer: {line!r}"
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 2.0)


def test_relay_to_dsn_peer_passes_parameters_on_and_reports_nothing(net):
    """C4 / RFC 3461 §5.2.1: the next hop offers DSN -> it receives RET, ENVID, NOTIFY and ORCPT
    exactly as Sam gave them (xtext untouched); reporting is its job now, so Sam gets nothing
    from us."""
    net.mx1.caps = DEFAULT_CAPS + ["DSN"]
    net.mx2.caps = DEFAULT_CAPS + ["DSN"]
    srv = net.server()
    m = make_message("dsn peer", b"Pass it on.\r\n", sender=SAM_ADDR, to="a@remote.example")
    submit_dsn(srv, SAM_ADDR,
               [("a@remote.example", "NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;orig+2Ba@remote.example"),
                ("b@remote.example", "NOTIFY=NEVER")],
               m, mail_params="RET=HDRS ENVID=env+2Bpass+3Don-7")
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    assert tx.message.endswith(m)
    assert sorted(a.lower() for a in tx.accepted) == ["a@remote.example", "b@remote.example"], tx.rcpts
    params = esmtp_params(tx.mail_params)
    assert params.get("RET", "").upper() == "HDRS", tx.mail_params
    assert params.get("ENVID") == "env+2Bpass+3Don-7", tx.mail_params
    (a_line,) = rcpt_lines(net.mx1, "a@remote.example")
    a = esmtp_params(a_line.split(">", 1)[1])
    assert sorted(a.get("NOTIFY", "").upper().split(",")) == ["DELAY", "FAILURE", "SUCCESS"], a_line
    typ, _, addr = a.get("ORCPT", "").partition(";")
    assert typ.lower() == "rfc822" and addr == "orig+2Ba@remote.example", a_line
    (b_line,) = rcpt_lines(net.mx1, "b@remote.example")
    b = esmtp_params(b_line.split(">", 1)[1])
    assert b.get("NOTIFY", "").upper() == "NEVER", b_line
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 0, 3.0)


# ------------------------------------------------------------------------------------------
# Delay reports
# ------------------------------------------------------------------------------------------

SLOW_SCHEDULE = {
    "delay_warning_secs": 2,
    "first_retry_count": 40,
    "first_retry_interval_secs": 1,
    "second_retry_count": 1,
    "second_retry_interval_secs": 1,
}


@pytest.mark.parametrize("notify", ["NOTIFY=DELAY", "NOTIFY=FAILURE,DELAY", ""],
                         ids=["delay", "failure-delay", "no-notify"])
def test_long_temporary_failure_sends_one_delay_report(net, notify):
    """C4 / RFC 3464 §2.3.3: the peer answers 451 for a long time; after `delay_warning_secs`
    Sam gets a report with Action: delayed and a 4.x.x Status - one only, however many retries
    follow. The message is still queued, not bounced."""
    net.other.rcpt["o@other.example"] = "451 4.3.0 try again later (slowpoke)"
    srv = net.server(SLOW_SCHEDULE)
    submit_dsn(srv, SAM_ADDR, [("o@other.example", notify)],
               make_message("slow going", b"Eventually.\r\n", sender=SAM_ADDR, to="o@other.example"),
               mail_params="ENVID=delay-env-3")
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "o@other.example", "delayed")
    r = report(raw, "o@other.example", "delayed", r"4\.\d{1,3}\.\d{1,3}")
    assert r["parsed"]["per_message"].get("original-envelope-id") == "delay-env-3", r["parsed"]["per_message"]
    tried = net.other.rcpt_count("o@other.example")
    net.other.wait_rcpt("o@other.example", tried + 3, timeout=20)
    assert actions_for(srv, SAM_USER, SAM_PW, "o@other.example") == ["delayed"], \
        "more than one report while the message keeps being retried"
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 2.0)
    assert not net.other.delivered()


def test_no_delay_report_when_notify_leaves_out_delay(net):
    """RFC 3461 §4.1: NOTIFY=FAILURE (no DELAY) -> no delay report, however long it waits."""
    net.other.rcpt["o@other.example"] = "451 4.3.0 try again later"
    srv = net.server(SLOW_SCHEDULE)
    submit_dsn(srv, SAM_ADDR, [("o@other.example", "NOTIFY=FAILURE")],
               make_message("slow, quietly", sender=SAM_ADDR, to="o@other.example"))
    net.other.wait_rcpt("o@other.example", 2)
    time.sleep(3.0)   # past delay_warning_secs, with retries going on
    net.other.wait_rcpt("o@other.example", 4, timeout=20)
    mailbox_stays(srv, SAM_USER, SAM_PW, 0, 2.0)


# ------------------------------------------------------------------------------------------
# Failure reports
# ------------------------------------------------------------------------------------------

BODY_MARKER = "The secret body line frotz-9731 must only travel with RET=FULL."


@pytest.mark.parametrize("ret", ["HDRS", "FULL"])
def test_failure_report_returns_headers_or_full_message(net, ret):
    """C4 / RFC 3461 §4.3: 550 from the peer -> Action: failed, 5.x.x; with RET=HDRS the third
    part is text/rfc822-headers (the original headers, none of the body); with RET=FULL it is
    message/rfc822 holding the whole message, body included. ENVID and ORCPT come back."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = net.server()
    body = f"First line.\r\n{BODY_MARKER}\r\n".encode()
    subject = f"returned {ret.lower()}"
    m = make_message(subject, body, sender=SAM_ADDR, to="x@other.example")
    submit_dsn(srv, SAM_ADDR, [("x@other.example", "NOTIFY=FAILURE ORCPT=rfc822;Xavier@other.example")],
               m, mail_params=f"RET={ret} ENVID=fail-env-{ret}")
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "x@other.example", "failed")
    r = report(raw, "x@other.example", "failed", r"5\.1\.1")
    assert "dsn-test" in r["fields"].get("diagnostic-code", ""), r["fields"]
    assert r["parsed"]["per_message"].get("original-envelope-id") == f"fail-env-{ret}", r["parsed"]["per_message"]
    assert original_recipient(r["fields"]) == ("rfc822", "Xavier@other.example"), r["fields"]
    parts = r["parts"]
    assert len(parts) >= 3, f"no returned content: {[p.get_content_type() for p in parts]}"
    third = parts[2]
    if ret == "HDRS":
        assert third.get_content_type() == "text/rfc822-headers", third.get_content_type()
        text = third.get_payload(decode=True).decode("utf-8", "replace")
        assert f"Subject: {subject}" in text, text[:2000]
        assert BODY_MARKER not in raw.decode("utf-8", "replace"), "RET=HDRS report contains the body"
    else:
        assert third.get_content_type() == "message/rfc822", third.get_content_type()
        inner = third.get_payload()
        inner = inner[0] if isinstance(inner, list) else inner
        assert inner["Subject"] == subject, inner["Subject"]
        assert BODY_MARKER in inner.as_string(), inner.as_string()[:3000]
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 2.0)


def test_notify_never_means_no_report_at_all(net):
    """C4 / RFC 3461 §4.1: NOTIFY=NEVER -> a permanent failure is not reported to anyone."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = net.server()
    submit_dsn(srv, SAM_ADDR, [("x@other.example", "NOTIFY=NEVER")],
               make_message("never tell me", sender=SAM_ADDR, to="x@other.example"), "RET=FULL")
    net.other.wait_rcpt("x@other.example")
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 0, 3.0)
    assert reports_of(srv, ADMIN_USER, ADMIN_PW) == []


def test_only_recipients_that_asked_are_reported(net):
    """C4: two recipients refused in one transaction, one NOTIFY=NEVER, one NOTIFY=FAILURE ->
    exactly one report, naming only the second."""
    net.other.rcpt["x@other.example"] = REFUSAL
    net.other.rcpt["y@other.example"] = "550 5.1.1 <y@other.example>: unknown too"
    srv = net.server()
    submit_dsn(srv, SAM_ADDR, [("x@other.example", "NOTIFY=NEVER"), ("y@other.example", "NOTIFY=FAILURE")],
               make_message("pick and choose", sender=SAM_ADDR, to="x@other.example"))
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "y@other.example", "failed")
    r = report(raw, "y@other.example", "failed", r"5\.\d{1,3}\.\d{1,3}")
    assert bounce_for(r["parsed"], "x@other.example") is None, "the NOTIFY=NEVER recipient is reported"
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 2.0)


# ------------------------------------------------------------------------------------------
# Responsible person and the NONDELIVERY user
# ------------------------------------------------------------------------------------------

def test_reports_carry_reply_to_of_the_responsible_person(net):
    """C4: `[delivery] dsn_responsible_person` -> every report has Reply-To: that address
    (failure and success alike)."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = net.server({"dsn_responsible_person": ADMIN_ADDR})
    submit_dsn(srv, SAM_ADDR, [("x@other.example", "NOTIFY=FAILURE")],
               make_message("who to ask", sender=SAM_ADDR, to="x@other.example"))
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "x@other.example", "failed")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert ADMIN_ADDR in (str(msg.get("Reply-To") or "")).lower(), f"Reply-To: {msg.get('Reply-To')!r}"
    submit_dsn(srv, SAM_ADDR, [(ADMIN_ADDR, "NOTIFY=SUCCESS")],
               make_message("who to ask, success", sender=SAM_ADDR, to=ADMIN_ADDR))
    raw = wait_report_with(srv, SAM_USER, SAM_PW, ADMIN_ADDR, "delivered")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert ADMIN_ADDR in (str(msg.get("Reply-To") or "")).lower(), f"Reply-To: {msg.get('Reply-To')!r}"


def _nondelivery_server(net, **kw):
    srv = net.server(start=False, **kw)
    srv.add_user(NONDELIVERY_USER, NONDELIVERY_ADDR, NONDELIVERY_PW)
    srv.start()
    return srv


def test_nondelivery_user_gets_a_copy_of_a_failure_report(net):
    """C4 (i5/OS NONDELIVERY user): Sam's failure report also lands, as a copy, in the maildrop
    of the local user nondelivery@example.test; Sam still gets his."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = _nondelivery_server(net)
    submit_dsn(srv, SAM_ADDR, [("x@other.example", "")],
               make_message("copy me", sender=SAM_ADDR, to="x@other.example"))
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "x@other.example", "failed")
    report(raw, "x@other.example", "failed", r"5\.1\.1")
    copy = wait_report_with(srv, NONDELIVERY_USER, NONDELIVERY_PW, "x@other.example", "failed")
    f = bounce_for(parse_bounce(copy), "x@other.example")
    assert f["status"].startswith("5.1.1"), f
    assert b"copy me" in copy, "the copy does not identify the failed message"
    wait_queue_empty(srv)
    mailbox_stays(srv, NONDELIVERY_USER, NONDELIVERY_PW, 1, 2.0)


def test_nondelivery_user_gets_a_copy_when_the_sender_is_remote(net):
    """C4: Jane (remote) relays mail that fails -> her report goes to her MX with MAIL FROM:<>,
    and the NONDELIVERY user gets a copy too ("every non-delivery report")."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = _nondelivery_server(net)
    submit_dsn(srv, JANE, [("x@other.example", "NOTIFY=FAILURE")],
               make_message("copy jane", sender=JANE, to="x@other.example"))
    (tx,) = net.mx1.wait_delivered(JANE)
    assert tx.mail_from == "", tx.mail_from
    report(b"Return-Path: <>\r\n" + tx.message, "x@other.example", "failed", r"5\.1\.1", to=JANE)
    copy = wait_report_with(srv, NONDELIVERY_USER, NONDELIVERY_PW, "x@other.example", "failed")
    assert b"copy jane" in copy
    wait_queue_empty(srv)


def test_nondelivery_copy_is_not_made_of_success_reports(net):
    """C4: the NONDELIVERY user collects non-delivery reports; a "delivered" report goes only to
    the sender."""
    srv = _nondelivery_server(net)
    submit_dsn(srv, SAM_ADDR, [(ADMIN_ADDR, "NOTIFY=SUCCESS")],
               make_message("fine, thanks", sender=SAM_ADDR, to=ADMIN_ADDR))
    wait_report_with(srv, SAM_USER, SAM_PW, ADMIN_ADDR, "delivered")
    mailbox_stays(srv, NONDELIVERY_USER, NONDELIVERY_PW, 0, 2.0)


def test_each_report_has_its_own_message_id(net):
    """RFC 5322 §3.6.4: one message whose recipients end differently (one delivered with
    NOTIFY=SUCCESS, one refused) -> however many reports Sam gets, no two share a Message-ID
    (mail clients drop or thread "duplicates" by Message-ID)."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = net.server()
    submit_dsn(srv, SAM_ADDR, [(ADMIN_ADDR, "NOTIFY=SUCCESS"), ("x@other.example", "NOTIFY=FAILURE"),
                               ("o@other.example", "NOTIFY=SUCCESS")],
               make_message("two outcomes", sender=SAM_ADDR, to=ADMIN_ADDR), "ENVID=two-outcomes")
    wait_report_with(srv, SAM_USER, SAM_PW, ADMIN_ADDR, "delivered")
    wait_report_with(srv, SAM_USER, SAM_PW, "x@other.example", "failed")
    wait_report_with(srv, SAM_USER, SAM_PW, "o@other.example", "relayed")
    wait_queue_empty(srv)
    time.sleep(1.0)
    ids = [email.message_from_bytes(r).get("Message-ID") for r in reports_of(srv, SAM_USER, SAM_PW)]
    assert all(ids), f"a report without Message-ID: {ids!r}"
    assert len(set(ids)) == len(ids), f"reports share a Message-ID: {ids!r}"


def test_delay_report_then_failure_report(net):
    """C4: 451 long enough for a "delayed" report, then 550 -> Sam gets exactly one "delayed"
    and then one "failed" report for the recipient, and the message leaves the queue."""
    net.other.rcpt["o@other.example"] = ["451 4.3.0 busy (later)"] * 6 + ["550 5.1.1 gone now (finally)"]
    srv = net.server(SLOW_SCHEDULE)
    submit_dsn(srv, SAM_ADDR, [("o@other.example", "NOTIFY=DELAY,FAILURE")],
               make_message("delayed then failed", sender=SAM_ADDR, to="o@other.example"))
    wait_report_with(srv, SAM_USER, SAM_PW, "o@other.example", "delayed")
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "o@other.example", "failed")
    f = report(raw, "o@other.example", "failed", r"5\.1\.1")["fields"]
    assert "finally" in f.get("diagnostic-code", ""), f
    wait_queue_empty(srv)
    time.sleep(1.0)
    assert sorted(actions_for(srv, SAM_USER, SAM_PW, "o@other.example")) == ["delayed", "failed"]


def test_dsn_peer_refusing_at_rcpt_is_reported_by_us(net):
    """C4 / RFC 3461 §5.2: the next hop speaks DSN but refuses the recipient at RCPT - the
    message never reached it, so reporting the failure is still our job: Sam gets Action:
    failed with the peer's reply."""
    net.other.caps = DEFAULT_CAPS + ["DSN"]
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = net.server()
    submit_dsn(srv, SAM_ADDR, [("x@other.example", "NOTIFY=FAILURE ORCPT=rfc822;x@other.example")],
               make_message("dsn peer says no", sender=SAM_ADDR, to="x@other.example"), "RET=HDRS ENVID=peer-no")
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "x@other.example", "failed")
    r = report(raw, "x@other.example", "failed", r"5\.1\.1")
    assert "dsn-test" in r["fields"].get("diagnostic-code", ""), r["fields"]
    assert r["parsed"]["per_message"].get("original-envelope-id") == "peer-no"
    (line,) = rcpt_lines(net.other, "x@other.example")
    assert re.search(r"(?i)\bNOTIFY=FAILURE\b", line), line
    wait_queue_empty(srv)


def test_relay_adds_no_dsn_parameters_the_client_did_not_give(net):
    """RFC 3461 §5.2.1 (b), (c): a message that came without RET, ENVID or NOTIFY goes on to a
    DSN-capable next hop without them - nothing is made up."""
    net.mx1.caps = DEFAULT_CAPS + ["DSN"]
    net.mx2.caps = DEFAULT_CAPS + ["DSN"]
    srv = net.server()
    submit_dsn(srv, SAM_ADDR, [("a@remote.example", "")],
               make_message("no dsn asked", sender=SAM_ADDR, to="a@remote.example"))
    (tx,) = net.mx1.wait_delivered("a@remote.example")
    params = esmtp_params(tx.mail_params)
    assert "RET" not in params and "ENVID" not in params, tx.mail_params
    (line,) = rcpt_lines(net.mx1, "a@remote.example")
    assert not re.search(r"(?i)\bNOTIFY=", line), line


def test_only_the_recipient_that_asked_gets_a_relayed_report(net):
    """RFC 3461 §5.2.2: two recipients relayed to a peer without DSN, only one with
    NOTIFY=SUCCESS -> the report names that one only; a recipient without ORCPT has no
    Original-Recipient field (RFC 3461 §6.3 (d))."""
    srv = net.server()
    submit_dsn(srv, SAM_ADDR, [("a@remote.example", "NOTIFY=SUCCESS"), ("b@remote.example", "")],
               make_message("one asked", sender=SAM_ADDR, to="a@remote.example"))
    net.mx1.wait_delivered("b@remote.example")
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "a@remote.example", "relayed")
    r = report(raw, "a@remote.example", "relayed", r"2\.0\.0")
    assert bounce_for(r["parsed"], "b@remote.example") is None, r["parsed"]["recipients"]
    assert "original-recipient" not in r["fields"], r["fields"]
    assert "original-envelope-id" not in r["parsed"]["per_message"], r["parsed"]["per_message"]
    wait_queue_empty(srv)
    time.sleep(1.0)
    assert actions_for(srv, SAM_USER, SAM_PW, "b@remote.example") == []


def test_envid_comes_back_xtext_decoded(net):
    """RFC 3461 §4.4, §6.3 (a): ENVID travels as xtext ("+2B" is "+"); the report's
    Original-Envelope-Id carries the decoded value, "QQ+314159"."""
    net.other.rcpt["x@other.example"] = REFUSAL
    srv = net.server()
    submit_dsn(srv, SAM_ADDR, [("x@other.example", "NOTIFY=FAILURE")],
               make_message("xtext envid", sender=SAM_ADDR, to="x@other.example"), "ENVID=QQ+2B314159")
    raw = wait_report_with(srv, SAM_USER, SAM_PW, "x@other.example", "failed")
    r = report(raw, "x@other.example", "failed", r"5\.1\.1")
    assert r["parsed"]["per_message"].get("original-envelope-id") == "QQ+314159", r["parsed"]["per_message"]


def test_success_report_returns_headers_only_even_with_ret_full(net):
    """RFC 3461 §4.3: "FULL requests that the entire message be returned in any 'failed' DSN" -
    RET concerns failure reports; a "delivered" report does not carry the whole message (here a
    stand-in for a large attachment) back to the sender, even with RET=FULL: at most its headers."""
    srv = net.server()
    body = f"Big attachment stand-in.\r\n{BODY_MARKER}\r\n".encode()
    submit_dsn(srv, SAM_ADDR, [(ADMIN_ADDR, "NOTIFY=SUCCESS")],
               make_message("success full", body, sender=SAM_ADDR, to=ADMIN_ADDR), "RET=FULL")
    raw = wait_report_with(srv, SAM_USER, SAM_PW, ADMIN_ADDR, "delivered")
    r = report(raw, ADMIN_ADDR, "delivered", r"2\.0\.0")
    assert BODY_MARKER not in raw.decode("utf-8", "replace"), "the success report returns the body"
    if len(r["parts"]) >= 3:
        assert r["parts"][2].get_content_type() == "text/rfc822-headers", r["parts"][2].get_content_type()


def test_no_delay_report_for_a_null_sender(net):
    """C4: a message from <> (itself a report) that is delayed gets no delay report - there is
    nobody to send it to, and neither the postmaster nor anyone else gets one."""
    net.other.rcpt["o@other.example"] = "451 4.3.0 try again later"
    srv = net.server(SLOW_SCHEDULE)
    submit_dsn(srv, "", [("o@other.example", "")],
               make_message("null sender, slow", sender="mailer-daemon@remote.example", to="o@other.example"))
    net.other.wait_rcpt("o@other.example", 5, timeout=30)   # well past delay_warning_secs
    assert reports_of(srv, ADMIN_USER, ADMIN_PW) == []
    assert reports_of(srv, SAM_USER, SAM_PW) == []
    assert not [t for p in (net.mx1, net.mx2) for t in p.transactions], "a report went out"
