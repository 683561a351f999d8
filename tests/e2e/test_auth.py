"""SMTP authentication (SPEC A1 AUTH PLAIN/LOGIN, A2 modes per listener, A3 verify mail-from
user, S3 Received/Message-ID/Date on submitted mail).

The heart of this file is one table: listener x smtp.auth mode x credentials x recipient ->
the reply a client gets (530 at MAIL, or the RCPT reply). Each cell is its own test, e.g.
`test_auth_matrix[submission-none-bad-remote-530]`.

Users (conftest_tls): sam (sam@example.test, SamJones@example.test), kim (kim@example.test),
admin. Every AUTH here is over TLS (STARTTLS, or implicit TLS on smtps).
"""

from __future__ import annotations

import email.utils
import re
import time

import pytest

from conftest_tls import (  # noqa: F401  (make_tls_server is a fixture)
    KIM_ADDR,
    KIM_NAME,
    KIM_PW,
    REMOTE,
    SAM_ADDR,
    SAM_NAME,
    SAM_PW,
    b64,
    make_tls_server,
    plain_token,
    smtp_auth_plain,
    smtp_login,
    smtp_plain,
    smtp_tls_session,
    smtplib_submit,
    starttls,
)
from helpers import (
    JANE,
    expect,
    has_ip,
    journal_lines,
    make_message,
    queue_entries,
    split_trace,
    wait_for_subjects,
    wait_journal,
    wait_queued,
)

WRONG = "not-the-password"
RECIPIENTS = {"local": KIM_ADDR, "remote": REMOTE}

# listener, smtp.auth (the mode of `listen`), then the reply for each credential kind and
# recipient kind. 530 means MAIL FROM was refused (530 5.7.0); 550 is a relay refusal (5.7.1).
MATRIX = [
    # listener     smtp.auth           none:local remote   bad:local remote   good:local remote
    ("smtp",       "none",             250,  550,          250,  550,         250,  250),
    ("smtp",       "relay",            250,  550,          250,  550,         250,  250),
    ("smtp",       "local-and-relay",  530,  530,          530,  530,         250,  250),
    # submission and implicit TLS always require AUTH, whatever `listen` is set to.
    ("submission", "none",             530,  530,          530,  530,         250,  250),
    ("submission", "relay",            530,  530,          530,  530,         250,  250),
    ("smtps",      "none",             530,  530,          530,  530,         250,  250),
    ("smtps",      "relay",            530,  530,          530,  530,         250,  250),
]

CELLS = [
    pytest.param(listener, mode, creds, rkind, code, id=f"{listener}-{mode}-{creds}-{rkind}-{code}")
    for (listener, mode, nl, nr, bl, br, gl, gr) in MATRIX
    for creds, rkind, code in (("none", "local", nl), ("none", "remote", nr),
                               ("bad", "local", bl), ("bad", "remote", br),
                               ("good", "local", gl), ("good", "remote", gr))
]


def attempt(srv, listener: str, creds: str, recipient: str):
    """One session over TLS: AUTH (none, a wrong password, the right one), MAIL FROM, RCPT TO.
    Returns ("MAIL", reply) if MAIL was refused, else ("RCPT", reply)."""
    c = smtp_tls_session(srv, listener)
    try:
        if creds == "bad":
            expect(smtp_auth_plain(c, SAM_NAME, WRONG), 535, "5.7.8")
        elif creds == "good":
            expect(smtp_auth_plain(c, SAM_NAME, SAM_PW), 235, "2.7.0")
        sender = SAM_ADDR if creds == "good" else JANE
        r = c.cmd(f"MAIL FROM:<{sender}>")
        if r.code != 250:
            return "MAIL", r
        return "RCPT", c.cmd(f"RCPT TO:<{recipient}>")
    finally:
        c.quit()


@pytest.mark.parametrize("listener,mode,creds,rkind,code", CELLS)
def test_auth_matrix(make_tls_server, listener, mode, creds, rkind, code):
    """A2: the reply for one cell of the table. 530 5.7.0 comes at MAIL FROM; a relay refusal is
    550 5.7.1 at RCPT; a wrong password never lets a client relay."""
    srv = make_tls_server(smtp={"auth": mode})
    stage, r = attempt(srv, listener, creds, RECIPIENTS[rkind])
    where = f"{listener} (smtp.auth={mode}), credentials {creds}, recipient {RECIPIENTS[rkind]}"
    if code == 530:
        assert (stage, r.code) == ("MAIL", 530), f"{where}: expected 530 at MAIL FROM, got {stage} {r!r}"
        assert r.enhanced == "5.7.0", f"{where}: 530 without 5.7.0: {r!r}"
    else:
        assert stage == "RCPT", f"{where}: MAIL FROM refused: {r!r}"
        assert r.code == code, f"{where}: expected {code}, got {r!r}"
        if code == 550:
            assert r.enhanced == "5.7.1", f"{where}: relay refusal without 5.7.1: {r!r}"


@pytest.mark.parametrize("mode,local,remote", [("relay", 250, 550), ("local-and-relay", 530, 530)])
def test_plaintext_mx_client_by_mode(make_tls_server, mode, local, remote):
    """A2: a plain MX client (no TLS, no AUTH) on `listen`: with "relay" mail to local users
    keeps flowing and relay is refused; with "local-and-relay" MAIL FROM gets 530."""
    srv = make_tls_server(smtp={"auth": mode})
    for rcpt, want in ((KIM_ADDR, local), (REMOTE, remote)):
        c = smtp_plain(srv.smtp)
        try:
            expect(c.greeting, 220)
            c.ehlo()
            r = c.cmd(f"MAIL FROM:<{JANE}>")
            if want == 530:
                expect(r, 530, "5.7.0")
                continue
            expect(r, 250)
            assert c.cmd(f"RCPT TO:<{rcpt}>").code == want, rcpt
        finally:
            c.quit()


@pytest.mark.parametrize("listener", ["smtp", "submission", "smtps"])
def test_authenticated_remote_mail_is_queued_for_forwarding(make_tls_server, listener):
    """A2: an authenticated user may relay: the message is accepted and shows in
    `postroom queue list` as forward."""
    srv = make_tls_server()
    rcpt = f"friend-{listener}@remote.example"
    refused = smtplib_submit(srv, listener, SAM_NAME, SAM_PW, SAM_ADDR, rcpt,
                             make_message(f"relay via {listener}", sender=SAM_ADDR, to=rcpt))
    assert not refused, refused
    wait_queued(srv, rcpt, "forward")


def test_wrong_password_never_queues_remote_mail(make_tls_server):
    """A2: after a failed AUTH the client is still anonymous: nothing for a remote recipient is
    accepted or queued."""
    srv = make_tls_server()
    c = smtp_tls_session(srv, "smtp")
    try:
        expect(smtp_auth_plain(c, SAM_NAME, WRONG), 535, "5.7.8")
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
        expect(c.cmd(f"RCPT TO:<{REMOTE}>"), 550, "5.7.1")
    finally:
        c.quit()
    assert REMOTE not in [a for _, a in queue_entries(srv)]


# ------------------------------------------------------------------------------------------
# AUTH mechanics (RFC 4954, 4616, draft-murchison-sasl-login)
# ------------------------------------------------------------------------------------------

def test_auth_plain_initial_response(make_tls_server):
    """A1: AUTH PLAIN with an initial response and the right password: 235 2.7.0."""
    srv = make_tls_server()
    c = smtp_tls_session(srv, "submission")
    try:
        expect(smtp_auth_plain(c, SAM_NAME, SAM_PW), 235, "2.7.0")
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
    finally:
        c.quit()


def test_auth_plain_continuation(make_tls_server):
    """A1: AUTH PLAIN without an initial response gets "334 " and takes the response next."""
    srv = make_tls_server()
    c = smtp_tls_session(srv, "submission")
    try:
        r = c.cmd("AUTH PLAIN")
        expect(r, 334)
        assert r.lines[0].strip() == "", f"the PLAIN challenge must be empty: {r!r}"
        expect(c.cmd(plain_token(SAM_NAME, SAM_PW)), 235, "2.7.0")
    finally:
        c.quit()


def test_auth_login(make_tls_server):
    """A1: AUTH LOGIN asks "Username:" then "Password:" (base64) and answers 235 2.7.0."""
    srv = make_tls_server()
    c = smtp_tls_session(srv, "submission")
    try:
        r = c.cmd("AUTH LOGIN")
        expect(r, 334)
        assert r.lines[0].strip() == "VXNlcm5hbWU6", r
        r = c.cmd(b64(SAM_NAME))
        expect(r, 334)
        assert r.lines[0].strip() == "UGFzc3dvcmQ6", r
        expect(c.cmd(b64(SAM_PW)), 235, "2.7.0")
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
    finally:
        c.quit()


# name, the lines sent (all but the last answered 334), final code, enhanced code or None.
AUTH_FAILURES = [
    ("plain-wrong-password", [f"AUTH PLAIN {plain_token(SAM_NAME, WRONG)}"], 535, "5.7.8"),
    ("plain-unknown-user", [f"AUTH PLAIN {plain_token('nobody', WRONG)}"], 535, "5.7.8"),
    ("login-wrong-password", ["AUTH LOGIN", b64(SAM_NAME), b64(WRONG)], 535, "5.7.8"),
    ("plain-cancel", ["AUTH PLAIN", "*"], 501, None),
    ("login-cancel-at-username", ["AUTH LOGIN", "*"], 501, None),
    ("login-cancel-at-password", ["AUTH LOGIN", b64(SAM_NAME), "*"], 501, None),
    ("unknown-mechanism", ["AUTH NOSUCH-MECH"], 504, "5.5.4"),
    ("plain-malformed-base64", ["AUTH PLAIN !!!not*base64!!!"], 501, None),
    ("plain-malformed-continuation", ["AUTH PLAIN", "%%%%"], 501, None),
    ("login-malformed-base64", ["AUTH LOGIN", "@@@"], 501, None),
]


@pytest.mark.parametrize("lines,code,enhanced",
                         [pytest.param(lines, code, enh, id=name) for name, lines, code, enh in AUTH_FAILURES])
def test_auth_failures(make_tls_server, lines, code, enhanced):
    """A1 (RFC 4954 §4): wrong credentials 535 5.7.8, "*" cancels with 501, an unknown mechanism
    is 504 5.5.4, bad base64 is 501. Afterwards the client is not authenticated (530 at MAIL on
    submission) but may try again and succeed."""
    srv = make_tls_server()
    c = smtp_tls_session(srv, "submission")
    try:
        for line in lines[:-1]:
            expect(c.cmd(line), 334)
        expect(c.cmd(lines[-1]), code, enhanced)
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 530)
        expect(smtp_auth_plain(c, SAM_NAME, SAM_PW), 235, "2.7.0")
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
    finally:
        c.quit()


def test_auth_twice_is_503(make_tls_server):
    """A1 (RFC 4954 §4): AUTH after a successful AUTH is 503."""
    srv = make_tls_server()
    c = smtp_tls_session(srv, "submission")
    try:
        smtp_login(c, SAM_NAME, SAM_PW)
        expect(c.cmd(f"AUTH PLAIN {plain_token(KIM_NAME, KIM_PW)}"), 503)
    finally:
        c.quit()


def test_auth_plain_cannot_act_as_another_user(make_tls_server):
    """A1 (RFC 4616 §2): sam's password with authorization identity "kim" does not make sam kim."""
    srv = make_tls_server()
    c = smtp_tls_session(srv, "submission")
    try:
        r = c.cmd(f"AUTH PLAIN {plain_token(SAM_NAME, SAM_PW, authzid=KIM_NAME)}")
        assert r.code != 235, f"sam authenticated as kim: {r!r}"
        assert 500 <= r.code < 600, r
    finally:
        c.quit()


# ------------------------------------------------------------------------------------------
# config check, verify_from_user
# ------------------------------------------------------------------------------------------

def _mx_warnings(srv) -> list[str]:
    r = srv.cli("config", "check")
    assert r.returncode == 0, f"config check failed:\n{r.stdout}\n{r.stderr}"
    return [line for line in r.stderr.splitlines() if "MX port" in line or "smtp.listen" in line]


def test_config_check_warns_local_and_relay_on_mx_port(make_tls_server):
    """A2: `config check` warns when smtp.auth = "local-and-relay" is set on the MX listener."""
    quiet = make_tls_server(start=False, users=False, smtp={"auth": "none"})
    loud = make_tls_server(start=False, users=False, smtp={"auth": "local-and-relay"})
    assert _mx_warnings(quiet) == [], _mx_warnings(quiet)
    warns = _mx_warnings(loud)
    assert warns, "no warning about local-and-relay on the MX port (smtp.listen)"


def test_verify_from_user_all(make_tls_server):
    """A3: verify_from_user = "all": an authenticated user may send as any of his own addresses,
    not as someone else's (553 5.7.1, journaled)."""
    srv = make_tls_server(smtp={"verify_from_user": "all"})
    c = smtp_tls_session(srv, "submission")
    try:
        smtp_login(c, SAM_NAME, SAM_PW)
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
        expect(c.cmd("RSET"), 250)
        expect(c.cmd("MAIL FROM:<SamJones@example.test>"), 250)
        expect(c.cmd("RSET"), 250)
        expect(c.cmd("MAIL FROM:<boss@example.test>"), 553, "5.7.1")
        expect(c.cmd(f"MAIL FROM:<{KIM_ADDR}>"), 553, "5.7.1")
    finally:
        c.quit()
    wait_journal(srv, lambda line: "boss@example.test" in line.lower())


def test_verify_from_user_off(make_tls_server):
    """A3: verify_from_user = "off": an authenticated user may use any sender."""
    srv = make_tls_server(smtp={"verify_from_user": "off"})
    c = smtp_tls_session(srv, "submission")
    try:
        smtp_login(c, SAM_NAME, SAM_PW)
        expect(c.cmd("MAIL FROM:<boss@example.test>"), 250)
        expect(c.cmd(f"RCPT TO:<{KIM_ADDR}>"), 250)
    finally:
        c.quit()


# ------------------------------------------------------------------------------------------
# S3: what submitted mail looks like in the mailbox
# ------------------------------------------------------------------------------------------

def _header_block(msg: bytes) -> bytes:
    return msg.split(b"\r\n\r\n", 1)[0]


def _headers(msg: bytes, name: bytes) -> list[bytes]:
    return re.findall(rb"(?mi)^" + re.escape(name) + rb":[ \t]*(.*)$", _header_block(msg))


@pytest.mark.parametrize("listener", ["submission", "smtps"])
def test_received_header_records_tls_and_auth(make_tls_server, listener):
    """S3 (RFC 3848): the Received header of mail sent with TLS and AUTH says ESMTPSA, names the
    TLS version and the authenticated user."""
    srv = make_tls_server()
    subject = f"received via {listener}"
    assert not smtplib_submit(srv, listener, SAM_NAME, SAM_PW, SAM_ADDR, KIM_ADDR,
                              make_message(subject, sender=SAM_ADDR, to=KIM_ADDR))
    msgs = wait_for_subjects(srv, KIM_NAME, KIM_PW, [subject])
    _, received, _ = split_trace(msgs[0])
    assert b"ESMTPSA" in received, received
    assert re.search(rb"TLS ?v?1\.[23]", received), f"no TLS version in {received!r}"
    assert re.search(rb"(?<![A-Za-z0-9])sam(?![A-Za-z0-9])", received), \
        f"the authenticated user is not named in {received!r}"


def test_plain_mx_received_header_is_not_esmtpsa(make_tls_server):
    """S3: mail from an anonymous plaintext MX client is not labelled authenticated or TLS."""
    srv = make_tls_server()
    c = smtp_plain(srv.smtp)
    try:
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        expect(c.cmd(f"RCPT TO:<{KIM_ADDR}>"), 250)
        expect(c.data(make_message("plain mx", to=KIM_ADDR)), 250)
    finally:
        c.quit()
    msgs = wait_for_subjects(srv, KIM_NAME, KIM_PW, ["plain mx"])
    _, received, _ = split_trace(msgs[0])
    assert b"ESMTPSA" not in received and b"ESMTPS " not in received, received
    assert not re.search(rb"TLS ?v?1\.[23]", received), received


def test_submission_adds_message_id_and_date(make_tls_server):
    """S3: authenticated mail without Message-ID and Date gets exactly one of each (well-formed);
    mail that has them keeps its own, not duplicated."""
    srv = make_tls_server()
    bare = (f"From: Sam <{SAM_ADDR}>\r\nTo: <{KIM_ADDR}>\r\nSubject: bare\r\n\r\nNo ids.\r\n").encode()
    own_id = "<own-id-4711@client.remote.example>"
    own_date = "Mon, 02 Mar 2026 10:00:00 +0000"
    full = (f"From: Sam <{SAM_ADDR}>\r\nTo: <{KIM_ADDR}>\r\nSubject: full\r\n"
            f"Date: {own_date}\r\nMessage-ID: {own_id}\r\n\r\nHas ids.\r\n").encode()
    for m in (bare, full):
        assert not smtplib_submit(srv, "submission", SAM_NAME, SAM_PW, SAM_ADDR, KIM_ADDR, m)
    msgs = {m_subject: m for m in wait_for_subjects(srv, KIM_NAME, KIM_PW, ["bare", "full"])
            for m_subject in [_headers(m, b"Subject")[0].decode().strip()]}

    ids, dates = _headers(msgs["bare"], b"Message-ID"), _headers(msgs["bare"], b"Date")
    assert len(ids) == 1, f"Message-ID headers: {ids}"
    assert len(dates) == 1, f"Date headers: {dates}"
    assert re.fullmatch(rb"<[^<>@\s]+@[^<>@\s]+>", ids[0].strip()), ids
    assert email.utils.parsedate_to_datetime(dates[0].decode().strip()) is not None, dates

    ids, dates = _headers(msgs["full"], b"Message-ID"), _headers(msgs["full"], b"Date")
    assert [i.strip() for i in ids] == [own_id.encode()], ids
    assert [d.strip() for d in dates] == [own_date.encode()], dates


def test_auth_failure_is_journaled(make_tls_server):
    """A5/F4: a failed SMTP AUTH leaves a journal entry naming the client address."""
    srv = make_tls_server()
    before = len([line for line in journal_lines(srv) if has_ip(line, "127.0.0.1")])
    c = smtp_tls_session(srv, "submission")
    try:
        expect(smtp_auth_plain(c, SAM_NAME, WRONG), 535, "5.7.8")
    finally:
        c.quit()
    deadline = time.monotonic() + 5
    while len([line for line in journal_lines(srv) if has_ip(line, "127.0.0.1")]) <= before:
        assert time.monotonic() < deadline, "no journal entry for the failed AUTH:\n" + \
            "\n".join(journal_lines(srv))
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------
# State across STARTTLS, directory changes, long SASL responses, not-on-accept-list
# ------------------------------------------------------------------------------------------

def test_starttls_forgets_plaintext_authentication(make_tls_server):
    """A1 (RFC 3207 §4.2): AUTH done in plaintext (allowed from loopback) is forgotten by
    STARTTLS: after the handshake the client must authenticate again (530 at MAIL)."""
    srv = make_tls_server(tls={"allow_plaintext_auth": "loopback"})
    c = smtp_plain(srv.submission)
    try:
        c.ehlo()
        expect(smtp_auth_plain(c, SAM_NAME, SAM_PW), 235)
        starttls(c)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 530)
        smtp_login(c, SAM_NAME, SAM_PW)
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
    finally:
        c.quit()


def test_disabled_user_cannot_authenticate(make_tls_server):
    """A1/D2: `user disable` refuses SMTP AUTH (535) with the right password; `user enable`
    lets the user in again."""
    srv = make_tls_server()
    srv.cli_ok("user", "disable", SAM_NAME)
    c = smtp_tls_session(srv, "submission")
    try:
        expect(smtp_auth_plain(c, SAM_NAME, SAM_PW), 535)
    finally:
        c.quit()
    srv.cli_ok("user", "enable", SAM_NAME)
    c = smtp_tls_session(srv, "submission")
    try:
        expect(smtp_auth_plain(c, SAM_NAME, SAM_PW), 235)
    finally:
        c.quit()


def test_password_change_applies_to_smtp_auth(make_tls_server):
    """A1/D2: after `user passwd` the old password gets 535 and the new one 235."""
    srv = make_tls_server()
    srv.cli_ok("user", "passwd", SAM_NAME, "--password-stdin", input="brand-new-pw-9\n")
    c = smtp_tls_session(srv, "submission")
    try:
        expect(smtp_auth_plain(c, SAM_NAME, SAM_PW), 535)
        expect(smtp_auth_plain(c, SAM_NAME, "brand-new-pw-9"), 235)
    finally:
        c.quit()


LONG_PW = "Long-Passphrase-" + "x7" * 300  # 616 characters: the AUTH line is ~840 octets


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_long_password_over_512_octets(make_tls_server, mech):
    """S4/A1 (RFC 4954 §4): SASL responses may be up to 12,288 octets, so an AUTH line longer
    than the 512-octet command limit (a long passphrase) logs in, and is not treated as an
    overlong command (no 500, no hang-up, no auto-deny)."""
    srv = make_tls_server()
    srv.add_user("longpw", ["longpw@example.test"], LONG_PW)
    c = smtp_tls_session(srv, "submission")
    try:
        if mech == "PLAIN":
            expect(c.cmd(f"AUTH PLAIN {plain_token('longpw', LONG_PW)}"), 235, "2.7.0")
        else:
            expect(c.cmd("AUTH LOGIN"), 334)
            expect(c.cmd(b64("longpw")), 334)
            expect(c.cmd(b64(LONG_PW)), 235, "2.7.0")
    finally:
        c.quit()
    c = smtp_tls_session(srv, "submission")  # not on the deny list afterwards
    c.quit()


def test_verify_from_user_not_on_accept_list(make_tls_server):
    """A3 (VFYFROMUSR *not-on-accept-list*): the sender check applies to authenticated clients
    outside the relay (accept) list; a relay-listed client may use any sender."""
    srv = make_tls_server(smtp={"verify_from_user": "not-on-accept-list"}, relay_list=["127.0.0.20"])
    for ip, want in (("127.0.0.20", 250), ("127.0.0.21", 553)):
        c = smtp_tls_session(srv, "submission", source_ip=ip)
        try:
            smtp_login(c, SAM_NAME, SAM_PW)
            expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
            expect(c.cmd("RSET"), 250)
            r = c.cmd("MAIL FROM:<boss@example.test>")
            assert r.code == want, f"client {ip}: expected {want}, got {r!r}"
        finally:
            c.quit()


def test_starttls_without_auth_received_says_esmtps(make_tls_server):
    """S3 (RFC 3848): an MX client that used STARTTLS but no AUTH: Received says ESMTPS (not
    ESMTPSA) with the TLS version, and names no authenticated user."""
    srv = make_tls_server()
    c = smtp_tls_session(srv, "smtp")
    try:
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        expect(c.cmd(f"RCPT TO:<{KIM_ADDR}>"), 250)
        expect(c.data(make_message("mx over tls", to=KIM_ADDR)), 250)
    finally:
        c.quit()
    msgs = wait_for_subjects(srv, KIM_NAME, KIM_PW, ["mx over tls"])
    _, received, _ = split_trace(msgs[0])
    assert re.search(rb"\bESMTPS\b", received), received
    assert b"ESMTPSA" not in received, received
    assert re.search(rb"TLS ?v?1\.[23]", received), received
    assert b"authenticated" not in received.lower(), received
