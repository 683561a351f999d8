"""Inbound sender authentication on the MX listener (SPEC E1, issue 16): SPF (RFC 7208), DKIM
(RFC 6376) and DMARC (RFC 7489), recorded in one Authentication-Results header (RFC 8601).

Every lookup goes to a DNS stub on loopback (dnsstub.py): the server's `[dns] servers`, and the
DNS functions of the independent implementations it is compared with, dkimpy (DKIM) and pyspf
(SPF). Messages are signed by dkimpy. The client is 127.0.0.1 with HELO client.remote.example
(which publishes nothing).

One server takes every case in one pass (module fixture), so the file stays fast; each case is
then its own test.
"""

from __future__ import annotations

import base64
import email
import email.policy
import subprocess
import time
from dataclasses import dataclass, field

import dkim
import pytest
import spf

from conftest import SAM
from dnsstub import DnsStub, query_txt
from helpers import (
    CLIENT_NAME,
    HOSTNAME,
    Server,
    SmtpClient,
    expect,
    fetch_all,
    queued_id,
    smtp_from,
    subject_of,
    wait_for_subjects,
    wait_journal,
)

NAME, ADDR, PW = SAM
CLIENT_IP = "127.0.0.1"
RELAY_LISTED = "127.0.0.10"


# --------------------------------------------------------------------------------------------
# Keys and signatures (dkimpy)
# --------------------------------------------------------------------------------------------

def new_key() -> tuple[bytes, str]:
    """(private key PEM for dkimpy, the p= value of its DNS record), made by openssl."""
    pem = subprocess.run(["openssl", "genrsa", "-traditional", "2048"], check=True, capture_output=True).stdout
    spki = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=pem, check=True, capture_output=True).stdout
    return pem, base64.b64encode(spki).decode()


KEY, KEY_P = new_key()
OTHER_KEY, OTHER_P = new_key()
SIGNED_HEADERS = [b"from", b"to", b"subject"]


class ExpiredDKIM(dkim.DKIM):
    """dkimpy writes no x= tag: this one signs with t= two days ago and x= an hour after it
    (RFC 6376 §3.5), beyond dkimpy's 10 h of slack."""

    def gen_header(self, fields, *args, **kw):
        past = int(time.time()) - 2 * 86400
        fields = [(k, str(past).encode()) if k == b"t" else (k, v) for k, v in fields]
        fields.insert(-1, (b"x", str(past + 3600).encode()))
        return super().gen_header(fields, *args, **kw)


def sign(message: bytes, domain: str, selector: str = "sel", key: bytes = KEY, expired: bool = False) -> bytes:
    signer = ExpiredDKIM(message) if expired else dkim.DKIM(message)
    sig = signer.sign(selector.encode(), domain.encode(), key, include_headers=SIGNED_HEADERS)
    return sig + message


def message(subject: str, author: str, body: str = "Hello.\r\n", extra: tuple[str, ...] = ()) -> bytes:
    headers = [f"From: <{author}>", f"To: <{ADDR}>", f"Subject: {subject}",
               "Date: Mon, 02 Mar 2026 10:00:00 +0000", f"Message-ID: <{subject}@remote.example>", *extra]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    mail_from: str
    message: bytes
    # The reply to DATA: 250 delivered (or quarantined), 550, 451.
    code: int = 250
    enhanced: str | None = None
    spf: str | None = None           # expected spf= for smtp.mailfrom
    dkim: str | None = None          # expected dkim= (first statement)
    dmarc: str | None = None         # expected dmarc=
    quarantined: bool = False
    source_ip: str = CLIENT_IP
    auth: bool = False
    # Filled in when sent.
    reply: object = None
    delivered: bytes | None = None
    extra: dict = field(default_factory=dict)


def publish(stub: DnsStub) -> None:
    t = stub.txt
    # SPF (RFC 7208 §2.6): one domain per result. The client is 127.0.0.1.
    t("pass.example.test", "v=spf1 ip4:127.0.0.1 -all")
    t("fail.example.test", "v=spf1 ip4:192.0.2.1 -all")
    t("softfail.example.test", "v=spf1 ip4:192.0.2.1 ~all")
    t("neutral.example.test", "v=spf1 ?all")
    # none.example.test publishes nothing.
    # §4.6.4: eleven includes, each a DNS lookup: permerror (none of them is void).
    t("permerror.example.test", "v=spf1 " + " ".join(f"include:l{i}.permerror.example.test" for i in range(11)) + " -all")
    for i in range(11):
        t(f"l{i}.permerror.example.test", "v=spf1 ip4:192.0.2.1")
    stub.servfail("temperror.example.test")
    # DKIM keys (RFC 6376 §3.6.1): "sel" is the signing key, "other" a different key, "missing"
    # is not published.
    for domain in ("dkim.example.test", "sign.dkrelaxed.test", "sign.dkstrict.test", "dkstrict.test"):
        t(f"sel._domainkey.{domain}", f"v=DKIM1; k=rsa; p={KEY_P}")
    t("other._domainkey.dkim.example.test", f"v=DKIM1; k=rsa; p={OTHER_P}")
    # DMARC (RFC 7489 §6.3).
    t("office.test", "v=spf1 ip4:192.0.2.1 -all")
    t("_dmarc.office.test", "v=DMARC1; p=reject")
    t("pnone.test", "v=spf1 -all")
    t("_dmarc.pnone.test", "v=DMARC1; p=none")
    t("pquar.test", "v=spf1 -all")
    t("_dmarc.pquar.test", "v=DMARC1; p=quarantine")
    t("mail.aligned.test", "v=spf1 ip4:127.0.0.1 -all")
    t("_dmarc.aligned.test", "v=DMARC1; p=reject")
    t("mail.strict.test", "v=spf1 ip4:127.0.0.1 -all")
    t("_dmarc.strict.test", "v=DMARC1; p=reject; aspf=s")
    t("_dmarc.dkrelaxed.test", "v=DMARC1; p=reject")
    t("_dmarc.dkstrict.test", "v=DMARC1; p=reject; adkim=s")
    t("other.test", "v=spf1 ip4:127.0.0.1 -all")
    t("_dmarc.unaligned.test", "v=DMARC1; p=reject")
    t("_dmarc.parent.test", "v=DMARC1; p=none; sp=reject")
    stub.servfail("_dmarc.tempfail.test")
    stub.drop("_dmarc.dropped.test")


def cases() -> list[Case]:
    out = []
    # SPF: each result, compared with pyspf.
    for result in ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"):
        sender = f"jane@{result}.example.test"
        out.append(Case(f"spf-{result}", sender, message(f"spf-{result}", sender), spf=result, dkim="none", dmarc="none"))
    # DKIM: each signature, compared with dkimpy.
    author = "news@dkim.example.test"
    base = message("dkim-valid", author)
    out.append(Case("dkim-valid", author, sign(base, "dkim.example.test"), dkim="pass", dmarc="none"))
    body = sign(message("dkim-body-altered", author), "dkim.example.test").replace(b"Hello.", b"Hellp.")
    out.append(Case("dkim-body-altered", author, body, dkim="fail"))
    header = sign(message("dkim-header-altered", author), "dkim.example.test").replace(b"To: <", b"To: Sam <")
    out.append(Case("dkim-header-altered", author, header, dkim="fail"))
    out.append(Case("dkim-wrong-key", author, sign(message("dkim-wrong-key", author), "dkim.example.test", selector="other"), dkim="fail"))
    out.append(Case("dkim-expired", author, sign(message("dkim-expired", author), "dkim.example.test", expired=True), dkim="neutral"))
    out.append(Case("dkim-no-key", author, sign(message("dkim-no-key", author), "dkim.example.test", selector="missing"), dkim="permerror"))
    # DMARC.
    boss = "boss@office.test"
    out.append(Case("dmarc-reject-forged", boss, message("dmarc-reject-forged", boss), code=550, enhanced="5.7.1"))
    out.append(Case("dmarc-reject-forged-authenticated", boss, message("dmarc-reject-forged-authenticated", boss), auth=True))
    out.append(Case("dmarc-reject-relay-listed", boss, message("dmarc-reject-relay-listed", boss), source_ip=RELAY_LISTED))
    out.append(Case("dmarc-none", "a@pnone.test", message("dmarc-none", "a@pnone.test"), spf="fail", dmarc="fail"))
    out.append(Case("dmarc-quarantine", "a@pquar.test", message("dmarc-quarantine", "a@pquar.test"), quarantined=True))
    out.append(Case("dmarc-spf-aligned-relaxed", "bounce@mail.aligned.test", message("dmarc-spf-aligned-relaxed", "a@aligned.test"),
                    spf="pass", dmarc="pass"))
    out.append(Case("dmarc-spf-unaligned-strict", "bounce@mail.strict.test", message("dmarc-spf-unaligned-strict", "a@strict.test"),
                    code=550, enhanced="5.7.1"))
    out.append(Case("dmarc-dkim-aligned-relaxed", "a@dkrelaxed.test",
                    sign(message("dmarc-dkim-aligned-relaxed", "a@dkrelaxed.test"), "sign.dkrelaxed.test"), dkim="pass", dmarc="pass"))
    out.append(Case("dmarc-dkim-unaligned-strict", "a@dkstrict.test",
                    sign(message("dmarc-dkim-unaligned-strict", "a@dkstrict.test"), "sign.dkstrict.test"), code=550, enhanced="5.7.1"))
    out.append(Case("dmarc-dkim-aligned-strict", "a@dkstrict.test",
                    sign(message("dmarc-dkim-aligned-strict", "a@dkstrict.test"), "dkstrict.test"), dkim="pass", dmarc="pass"))
    out.append(Case("dmarc-unaligned", "x@other.test", sign(message("dmarc-unaligned", "a@unaligned.test"), "dkim.example.test"),
                    code=550, enhanced="5.7.1"))
    out.append(Case("dmarc-subdomain-policy", "a@sub.parent.test", message("dmarc-subdomain-policy", "a@sub.parent.test"),
                    code=550, enhanced="5.7.1"))
    out.append(Case("dmarc-parent-policy", "a@parent.test", message("dmarc-parent-policy", "a@parent.test"), dmarc="fail"))
    out.append(Case("dmarc-temperror-servfail", "a@tempfail.test", message("dmarc-temperror-servfail", "a@tempfail.test"),
                    code=451, enhanced="4.7.1"))
    out.append(Case("dmarc-temperror-timeout", "a@dropped.test", message("dmarc-temperror-timeout", "a@dropped.test"),
                    code=451, enhanced="4.7.1"))
    # RFC 8601 §5: results that claim our name are removed; another receiver's stay.
    forged = message("results-forged", "a@pass.example.test", extra=(
        f"Authentication-Results: {HOSTNAME.upper()}; dmarc=pass header.from=office.test",
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=a@pass.example.test"))
    out.append(Case("results-forged", "a@pass.example.test", forged, spf="pass"))
    return out


CASES = cases()
BY_ID = {c.id: c for c in CASES}


def send(srv: Server, case: Case) -> None:
    c = SmtpClient(srv.smtp) if case.source_ip == CLIENT_IP else smtp_from(srv, case.source_ip)
    try:
        expect(c.greeting, 220)
        c.ehlo(CLIENT_NAME)
        if case.auth:
            token = base64.b64encode(f"\0{NAME}\0{PW}".encode()).decode()
            expect(c.cmd(f"AUTH PLAIN {token}"), 235)
        expect(c.cmd(f"MAIL FROM:<{case.mail_from}>"), 250)
        expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
        case.reply = c.data(case.message)
    finally:
        c.quit()


@pytest.fixture(scope="module")
def stub():
    s = DnsStub().start()
    publish(s)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def checked(tmp_path_factory, stub):
    """One server with the checks on, every case sent to it, the delivered copies collected."""
    srv = Server(tmp_path_factory.mktemp("sender-auth"), {"dns": {"servers": [stub.address]}, "auth": {"checks": True}})
    srv.start()
    try:
        srv.add_user(NAME, [ADDR], PW)
        srv.cli_ok("list", "add", "relay", RELAY_LISTED)
        for case in CASES:
            send(srv, case)
        delivered = [c.id for c in CASES if c.code == 250 and not c.quarantined]
        for m in wait_for_subjects(srv, NAME, PW, delivered):
            if subject_of(m) in BY_ID:
                BY_ID[subject_of(m)].delivered = m
        yield srv
    finally:
        srv.stop()


def results(m: bytes) -> list[str]:
    """The Authentication-Results fields of a delivered message, unfolded, in order."""
    parsed = email.message_from_bytes(m, policy=email.policy.compat32)
    return [" ".join(v.split()) for v in parsed.get_all("Authentication-Results") or []]


def ours(m: bytes) -> str:
    mine = [r for r in results(m) if r.split(";")[0].strip().lower() == HOSTNAME]
    assert len(mine) == 1, f"want one Authentication-Results of ours, got {results(m)}"
    return mine[0]


def statement(header: str, method: str, prop: str | None = None) -> str:
    """The result of the first `method=` statement (with `prop` in it, when given)."""
    for part in header.split(";")[1:]:
        part = part.strip()
        if part.startswith(method + "=") and (prop is None or prop in part):
            return part.split()[0].split("=", 1)[1]
    raise AssertionError(f"no {method} statement{' with ' + prop if prop else ''} in {header!r}")


# --------------------------------------------------------------------------------------------
# The independent implementations, on the same stub
# --------------------------------------------------------------------------------------------

def pyspf_result(server: str, ip: str, mail_from: str, helo: str) -> str:
    def lookup(name, qtype, strict=True, timeout=None):
        if qtype not in ("TXT", "SPF"):
            return []  # the stub answers only TXT here; every other name is NXDOMAIN
        try:
            return [((name, qtype), [text]) for text in query_txt(server, name)]
        except OSError as e:
            raise spf.TempError(f"DNS {e}")
    saved = spf.DNSLookup
    spf.DNSLookup = lookup
    try:
        return spf.check2(i=ip, s=mail_from, h=helo)[0]
    finally:
        spf.DNSLookup = saved


def dkimpy_verifies(server: str, m: bytes) -> bool:
    def dnsfunc(name, timeout=5):
        texts = query_txt(server, name.decode() if isinstance(name, bytes) else name)
        return texts[0] if texts else None
    return dkim.verify(m, dnsfunc=dnsfunc)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

SPF_CASES = [c for c in CASES if c.id.startswith("spf-")]
DKIM_CASES = [c for c in CASES if c.id.startswith("dkim-")]
DMARC_CASES = [c for c in CASES if c.id.startswith("dmarc-")]


@pytest.mark.parametrize("case", SPF_CASES, ids=lambda c: c.id)
def test_spf_verdict_is_pyspfs(checked, stub, case):
    """RFC 7208: the spf= of smtp.mailfrom equals pyspf's check2 on the same records."""
    expect(case.reply, 250)
    header = ours(case.delivered)
    got = statement(header, "spf", "smtp.mailfrom=")
    assert got == pyspf_result(stub.address, CLIENT_IP, case.mail_from, CLIENT_NAME) == case.spf, header
    # §2.3: the HELO identity is checked too (client.remote.example publishes nothing).
    assert statement(header, "spf", f"smtp.helo={CLIENT_NAME}") == "none", header


@pytest.mark.parametrize("case", DKIM_CASES, ids=lambda c: c.id)
def test_dkim_verdict_is_dkimpys(checked, stub, case):
    """RFC 6376: dkim=pass exactly when dkimpy verifies the message as sent (dkimpy answers
    only pass or not; the kind of failure is Postroom's own, per RFC 8601 §2.7.1)."""
    expect(case.reply, 250)
    header = ours(case.delivered)
    got = statement(header, "dkim")
    assert (got == "pass") == dkimpy_verifies(stub.address, case.message), header
    assert got == case.dkim, header
    if got != "none":
        assert "header.d=dkim.example.test" in header and "header.b=" in header, header


@pytest.mark.parametrize("case", DMARC_CASES, ids=lambda c: c.id)
def test_dmarc_policy(checked, case):
    """RFC 7489 §6.6: p=reject refused with 550 5.7.1, p=quarantine kept, p=none delivered;
    relaxed and strict alignment, the subdomain policy; a DNS failure is 451, never 5xx. Mail
    from an authenticated or relay-listed client is not checked."""
    expect(case.reply, case.code, case.enhanced)
    if case.code != 250:
        assert case.delivered is None
        return
    if case.auth or case.source_ip == RELAY_LISTED:
        assert case.delivered is not None and results(case.delivered) == [], "not checked: no header"
        return
    if case.quarantined:
        return
    header = ours(case.delivered)
    if case.dmarc:
        assert statement(header, "dmarc") == case.dmarc, header
    if case.spf:
        assert statement(header, "spf", "smtp.mailfrom=") == case.spf, header
    if case.dkim:
        assert statement(header, "dkim") == case.dkim, header


def test_forged_office_mail_is_refused_and_not_delivered(checked):
    """Issue 16's 'done when': From the office's domain with p=reject published, no valid
    DKIM, SPF fail, from an unauthenticated client: 550 5.7.1 and nothing delivered; the
    same message with AUTH is accepted. The refusal is journaled with its rule."""
    forged, authed = BY_ID["dmarc-reject-forged"], BY_ID["dmarc-reject-forged-authenticated"]
    expect(forged.reply, 550, "5.7.1")
    expect(authed.reply, 250)
    subjects = {subject_of(m) for m in fetch_all(checked, NAME, PW)}
    assert "dmarc-reject-forged" not in subjects and "dmarc-reject-forged-authenticated" in subjects
    wait_journal(checked, lambda line: "DMARC p=reject" in line and "office.test" in line, code="9W")


def test_quarantine_keeps_the_message_with_the_verdict(checked):
    case = BY_ID["dmarc-quarantine"]
    expect(case.reply, 250)
    qid = queued_id(case.reply)
    show = None
    for _ in range(50):
        r = checked.cli("quarantine", "show", qid)
        if r.returncode == 0:
            show = r.stdout
            break
        time.sleep(0.2)
    assert show is not None, f"message {qid} not in the quarantine"
    assert "DMARC p=quarantine" in show and "pquar.test" in show and "SPF fail" in show, show
    assert "dmarc-quarantine" not in {subject_of(m) for m in fetch_all(checked, NAME, PW)}


def test_one_results_header_first_and_forgeries_removed(checked):
    """RFC 8601 §5: ours is prepended, once; incoming fields claiming our authserv-id are gone,
    another receiver's stays; the Received field follows ours."""
    m = BY_ID["results-forged"].delivered
    fields = results(m)
    assert [f.split(";")[0].lower() for f in fields] == [HOSTNAME, "other.example"], fields
    assert "dmarc=pass header.from=office.test" not in ours(m)
    head = m.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0].startswith(b"Return-Path:") and head[1].startswith(b"Authentication-Results: " + HOSTNAME.encode()), head[:3]
    received = next(i for i, line in enumerate(head) if line.startswith(b"Received:"))
    assert all(line[:1] in (b" ", b"\t") for line in head[2:received]), head[:received + 1]


def test_dns_answers_are_cached(checked, stub):
    """The verifier's cache is shared by the sessions: another message of an SPF-checked
    domain asks DNS nothing new."""
    stub.clear()
    case = Case("cache-again", "jane@pass.example.test", message("cache-again", "jane@pass.example.test"))
    send(checked, case)
    expect(case.reply, 250)
    assert not stub.asked("pass.example.test", "TXT"), stub.queries


def test_explain_shows_spf_and_dmarc(checked):
    r = checked.cli("explain", "--ip", CLIENT_IP, "--helo", CLIENT_NAME, "--from", "boss@office.test", "--to", ADDR)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "SPF for boss@office.test from 127.0.0.1: accept (rule: SPF fail for office.test (E1))" in r.stdout, r.stdout
    assert "DMARC policy of office.test: reject; an unsigned message From: boss@office.test: refuse" in r.stdout, r.stdout
    r = checked.cli("explain", "--ip", CLIENT_IP, "--from", "jane@pass.example.test", "--to", ADDR)
    assert r.returncode == 0 and "SPF for jane@pass.example.test from 127.0.0.1: accept (rule: SPF pass" in r.stdout, r.stdout
    r = checked.cli("explain", "--ip", CLIENT_IP, "--user", NAME, "--from", "boss@office.test", "--to", ADDR)
    assert r.returncode == 0 and "SPF, DKIM, DMARC: not checked (rule: authenticated as sam (A2))" in r.stdout, r.stdout


def test_spf_fail_refused_at_mail_from_when_asked(tmp_path, stub):
    """`[auth] spf_refuse_fail`: SPF fail is refused at MAIL FROM with 550 5.7.23 (RFC 7208
    §8.4); softfail and temperror are not."""
    srv = Server(tmp_path / "refuse", {"dns": {"servers": [stub.address]}, "auth": {"checks": True, "spf_refuse_fail": True}})
    srv.start()
    try:
        srv.add_user(NAME, [ADDR], PW)
        c = SmtpClient(srv.smtp)
        try:
            c.ehlo(CLIENT_NAME)
            expect(c.cmd("MAIL FROM:<jane@fail.example.test>"), 550, "5.7.23")
            expect(c.cmd("MAIL FROM:<jane@softfail.example.test>"), 250)
            expect(c.cmd("RSET"), 250)
            expect(c.cmd("MAIL FROM:<jane@temperror.example.test>"), 250)
        finally:
            c.quit()
        wait_journal(srv, lambda line: "spf_refuse_fail" in line and "fail.example.test" in line, code="9W")
    finally:
        srv.stop()
