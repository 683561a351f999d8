"""Real mail programs against the certificate Postroom generates (issue 14 item 24, README "Mail
programs"): msmtp submits, fetchmail and mpop collect — each trusting the certificate file, or
pinning a fingerprint that Postroom printed (serve's log, `postroom status`, `postroom cert
show`), never "accept any certificate". A wrong file or fingerprint is refused, so the trust is
real.

Every program connects by IP address (127.0.0.1: no DNS for the server), reads an explicit
configuration file written 0600 (fetchmail and msmtp refuse looser ones) with HOME pointing into
the test's directory, so no user configuration, .netrc or keyring is read, and writes its state
(UIDs, pid file) there. fetchmail still canonicalises the machine's own name at start, through
/etc/hosts as any program on the machine does; it is never told a host name to look up.

The programs come from Debian (.ci/run installs fetchmail, mpop and msmtp); a test whose program
is missing is skipped with a note.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from conftest_tls import (  # noqa: F401  (make_tls_server is a fixture)
    KIM_ADDR,
    KIM_NAME,
    KIM_PW,
    OPENSSL,
    SAM_ADDR,
    SAM_NAME,
    SAM_PW,
    make_cert_pair,
    make_tls_server,
    needs_openssl,
    peer_cert,
    smtplib_submit,
    tls_base_overrides,
)
from helpers import CLIENT_NAME, HOSTNAME, merge_config, rewrite_config, wait_for_subjects

MSMTP = shutil.which("msmtp")
FETCHMAIL = shutil.which("fetchmail")
MPOP = shutil.which("mpop")
needs_msmtp = pytest.mark.skipif(MSMTP is None, reason="msmtp is not installed (.ci/run installs it)")
needs_fetchmail = pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed (.ci/run installs it)")
needs_mpop = pytest.mark.skipif(MPOP is None, reason="mpop is not installed (.ci/run installs it)")

# A body that must arrive byte for byte: dot-stuffing on the wire, a lone dot, trailing blanks,
# a tab, a "From " line, 8-bit UTF-8. The programs hand it on with LF line ends.
BODY = (
    b"First line of a body that must arrive byte for byte.\r\n"
    b".A line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b".\r\n"
    b"\r\n"
    b"trailing blanks   \r\n"
    b"\ttab first\r\n"
    b"From the start of a line\r\n"
    b"caf\xc3\xa9 cr\xc3\xa8me br\xc3\xbbl\xc3\xa9e\r\n"
    b"last line\r\n"
)
HEX_PAIRS = r"(?:[0-9A-F]{2}:)+[0-9A-F]{2}"


# --------------------------------------------------------------------------------------------
# What Postroom says about its certificate
# --------------------------------------------------------------------------------------------

def cert_show(srv) -> dict[str, str]:
    """`postroom cert show` as {"file": ..., "subject": ..., "names": ..., "SHA-256": ..., ...}."""
    r = srv.cli("cert", "show")
    assert r.returncode == 0, f"`postroom cert show` exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    shown = {}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            shown[key.strip()] = value.strip()
    for key in ("file", "subject", "names", "valid", "SHA-256", "MD5"):
        assert key in shown, f"`cert show` prints no {key!r} line:\n{r.stdout}"
    shown["file"] = shown["file"].split(" (", 1)[0]
    shown["MD5"] = shown["MD5"].split()[0]
    return shown


def log_fingerprints(srv) -> dict[str, str]:
    """The SHA-256 and MD5 serve logged at start-up for the certificate it loaded (the last start)."""
    text = srv.stderr_text().rsplit("===== start", 1)[-1]
    sha = re.findall(rf"sha256=({HEX_PAIRS})", text)
    md5 = re.findall(rf"md5=({HEX_PAIRS})", text)
    assert sha and md5, f"serve logged no sha256=/md5= fingerprint of its certificate:\n{text[-3000:]}"
    return {"SHA-256": sha[-1], "MD5": md5[-1]}


def status_fingerprints(srv) -> dict[str, str]:
    r = srv.cli("status")
    m = re.search(rf"(?m)^certificate\s.*SHA-256 ({HEX_PAIRS}).*MD5 ({HEX_PAIRS})", r.stdout)
    assert m, f"`postroom status` shows no certificate fingerprints:\n{r.stdout}\n{r.stderr}"
    return {"SHA-256": m.group(1), "MD5": m.group(2)}


def openssl_fingerprint(pem: Path, digest: str) -> str:
    r = subprocess.run([OPENSSL, "x509", "-in", str(pem), "-noout", "-fingerprint", f"-{digest}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split("=", 1)[1]


def generated_cert(srv) -> Path:
    return srv.data_dir / "tls-cert.pem"


# --------------------------------------------------------------------------------------------
# Running the programs
# --------------------------------------------------------------------------------------------

def private_file(path: Path, text: str) -> Path:
    """A configuration file only its owner may read (fetchmail, msmtp and mpop insist on it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path


def run_program(args, home: Path, input: bytes | None = None, timeout: float = 60):
    """Run a mail program with HOME (and fetchmail's FETCHMAILHOME) in the test's directory."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MAILRC", "NETRC", "FETCHMAILUSER")}
    env.update(HOME=str(home), FETCHMAILHOME=str(home), LC_ALL="C.UTF-8")
    r = subprocess.run(args, input=input, capture_output=True, timeout=timeout, env=env)
    r.text = (r.stdout + r.stderr).decode(errors="replace")
    return r


def deliver_to_sam(srv, subject: str) -> None:
    """Kim submits a message with BODY to Sam (smtplib, TLS, AUTH); wait until it is there."""
    msg = (f"From: <{KIM_ADDR}>\r\nTo: <{SAM_ADDR}>\r\nSubject: {subject}\r\n"
           f"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@example.test>\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + BODY
    assert not smtplib_submit(srv, "submission", KIM_NAME, KIM_PW, KIM_ADDR, SAM_ADDR, msg)
    wait_for_subjects(srv, SAM_NAME, SAM_PW, [subject])


def body_of(message: bytes) -> bytes:
    """The body of a message as POP3 serves it (CRLF)."""
    return message.split(b"\r\n\r\n", 1)[1]


def assert_lf_body(message: bytes, subject: str) -> None:
    assert f"Subject: {subject}".encode() in message, message[:2000]
    assert b"\r" not in message, "the program hands mail on with LF line ends; CR found"
    assert message.split(b"\n\n", 1)[1] == BODY.replace(b"\r\n", b"\n"), \
        f"body changed on the way:\n{message!r}"


# --------------------------------------------------------------------------------------------
# msmtp: submission port, STARTTLS, AUTH PLAIN
# --------------------------------------------------------------------------------------------

def msmtp_config(home: Path, srv, trust_line: str, name: str = "msmtprc") -> Path:
    host, port = srv.submission
    assert host == "127.0.0.1"
    return private_file(home / name, f"""\
defaults
logfile {home / 'msmtp.log'}
account postroom
host {host}
port {port}
domain {CLIENT_NAME}
tls on
tls_starttls on
{trust_line}
auth plain
user {KIM_NAME}
password {KIM_PW}
from {KIM_ADDR}
""")


def msmtp_send(srv, conf: Path, home: Path, subject: str):
    msg = (f"From: <{KIM_ADDR}>\r\nTo: <{SAM_ADDR}>\r\nSubject: {subject}\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + BODY
    return run_program([MSMTP, "-C", str(conf), "-a", "postroom", SAM_ADDR], home, input=msg)


@needs_msmtp
@needs_openssl
@pytest.mark.parametrize("trust", ["tls_trust_file", "tls_fingerprint"])
def test_msmtp_submits_over_starttls_by_ip(make_tls_server, tmp_path, trust):
    """msmtp on the submission port of 127.0.0.1 with STARTTLS and AUTH PLAIN, trusting the
    generated certificate file (its names must hold the IP address it is reached by) or the
    SHA-256 serve logged; a certificate it was not given is refused and nothing is sent."""
    srv = make_tls_server()
    home = tmp_path / "msmtp"
    # The control: another certificate for the same host name is not trusted.
    other, _, _ = make_cert_pair(tmp_path / "other", HOSTNAME, "other")
    wrong = (f"tls_trust_file {other}" if trust == "tls_trust_file"
             else "tls_fingerprint " + openssl_fingerprint(other, "sha256"))
    r = msmtp_send(srv, msmtp_config(home, srv, wrong, "wrong.msmtprc"), home, "msmtp wrong trust")
    assert r.returncode != 0, f"msmtp sent with a certificate it was not given:\n{r.text}"
    right = (f"tls_trust_file {generated_cert(srv)}" if trust == "tls_trust_file"
             else f"tls_fingerprint {log_fingerprints(srv)['SHA-256']}")
    subject = f"msmtp with {trust}"
    r = msmtp_send(srv, msmtp_config(home, srv, right), home, subject)
    assert r.returncode == 0, f"msmtp failed (exit {r.returncode}):\n{r.text}"
    msgs = wait_for_subjects(srv, SAM_NAME, SAM_PW, [subject])
    got = [m for m in msgs if f"Subject: {subject}".encode() in m]
    assert len(got) == 1 and body_of(got[0]) == BODY, got
    assert not [m for m in msgs if b"msmtp wrong trust" in m], "the refused attempt sent something"


# --------------------------------------------------------------------------------------------
# fetchmail: POP3S or STLS, sslcertck + sslcertfile, or sslfingerprint (MD5)
# --------------------------------------------------------------------------------------------

def fetchmail_run(srv, home: Path, tls: str, how: str, name: str):
    out = home / f"{name}.eml"
    port = srv.pop3s[1] if how == "pop3s" else srv.pop3[1]
    assert (srv.pop3s if how == "pop3s" else srv.pop3)[0] == "127.0.0.1"
    conf = private_file(home / f"{name}.fetchmailrc", f"""\
set no syslog
poll 127.0.0.1 with proto POP3 port {port}
  user "{SAM_NAME}" there with password "{SAM_PW}"
  {"ssl" if how == "pop3s" else 'sslproto "tls1.2+"'} {tls}
  mda "cat > {out}"
  keep
""")
    r = run_program([FETCHMAIL, "-f", str(conf), "--nosyslog", "--pidfile", str(home / f"{name}.pid"),
                     "--idfile", str(home / f"{name}.ids"), "-v", "-a"], home)
    return r, out


@needs_fetchmail
@pytest.mark.parametrize("how,trust", [("pop3s", "sslcertfile"), ("pop3s", "sslfingerprint"), ("stls", "sslcertfile")])
def test_fetchmail_retrieves_with_the_certificate(make_tls_server, tmp_path, how, trust):
    """fetchmail by 127.0.0.1, over POP3S or STLS, with sslcertck and the file `cert show` names
    (fetchmail checks DNS names only, never an IP address: sslcommonname names the host), or
    with the MD5 `cert show` prints as sslfingerprint — the hash this fetchmail reports for the
    server's key. The message reaches the MDA byte for byte; a wrong fingerprint is refused."""
    srv = make_tls_server()
    subject = f"fetchmail {how} {trust}"
    deliver_to_sam(srv, subject)
    shown = cert_show(srv)
    home = tmp_path / "fetchmail"
    if trust == "sslfingerprint":
        wrong = "00:" * 15 + "00"
        r, out = fetchmail_run(srv, home, f'sslfingerprint "{wrong}" no sslcertck', how, "wrong")
        assert r.returncode != 0 and not out.exists(), f"fetchmail accepted a wrong fingerprint:\n{r.text}"
        assert "fingerprints do not match" in r.text, r.text
        tls = f'sslfingerprint "{shown["MD5"]}" no sslcertck'
    else:
        tls = f'sslcertck sslcertfile "{shown["file"]}" sslcommonname "{HOSTNAME}"'
    r, out = fetchmail_run(srv, home, tls, how, "right")
    assert r.returncode == 0, f"fetchmail failed (exit {r.returncode}):\n{r.text}"
    assert f"key fingerprint: {shown['MD5']}" in r.text, \
        f"fetchmail reports another fingerprint than `cert show`'s MD5 {shown['MD5']}:\n{r.text}"
    assert_lf_body(out.read_bytes(), subject)


# --------------------------------------------------------------------------------------------
# mpop: POP3S or STLS, tls_trust_file or tls_fingerprint, into a maildir
# --------------------------------------------------------------------------------------------

@needs_mpop
@pytest.mark.parametrize("how,trust", [("pop3s", "tls_trust_file"), ("stls", "tls_trust_file"), ("pop3s", "tls_fingerprint")])
def test_mpop_retrieves_into_a_maildir(make_tls_server, tmp_path, how, trust):
    """mpop by 127.0.0.1 (POP3S, or STLS on the plain port) trusting the generated certificate
    file — its names must hold the address — or pinning the SHA-256 `postroom status` shows,
    delivering into a maildir byte for byte."""
    srv = make_tls_server()
    subject = f"mpop {how} {trust}"
    deliver_to_sam(srv, subject)
    home = tmp_path / "mpop"
    maildir = home / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    host, port = srv.pop3s if how == "pop3s" else srv.pop3
    assert host == "127.0.0.1"
    trust_line = (f"tls_trust_file {generated_cert(srv)}" if trust == "tls_trust_file"
                  else f"tls_fingerprint {status_fingerprints(srv)['SHA-256']}")
    conf = private_file(home / "mpoprc", f"""\
defaults
uidls_file {home / 'uidls'}
account postroom
host {host}
port {port}
tls on
tls_starttls {"off" if how == "pop3s" else "on"}
{trust_line}
auth user
user {SAM_NAME}
password {SAM_PW}
delivery maildir {maildir}
received_header off
keep on
""")
    r = run_program([MPOP, "-C", str(conf), "-q", "postroom"], home)
    assert r.returncode == 0, f"mpop failed (exit {r.returncode}):\n{r.text}"
    got = list((maildir / "new").iterdir())
    assert len(got) == 1, got
    assert_lf_body(got[0].read_bytes(), subject)


# --------------------------------------------------------------------------------------------
# The certificate itself: cert show, status, the log; names; regeneration
# --------------------------------------------------------------------------------------------

@needs_openssl
@pytest.mark.parametrize("source", ["generated", "configured"])
def test_cert_show_prints_what_openssl_computes(make_tls_server, tmp_path, source):
    """`postroom cert show` names the PEM file in use (the generated one, or [tls] cert) and prints
    its subject, names, validity and the SHA-256 and MD5 openssl computes for it; serve's log and
    `postroom status` print the same fingerprints, of the certificate the listeners present."""
    overrides = {}
    if source == "configured":
        cert, key, _ = make_cert_pair(tmp_path / "certs", HOSTNAME, "own")
        overrides = {"tls": {"cert": str(cert), "key": str(key)}}
    srv = make_tls_server(**overrides)
    shown = cert_show(srv)
    pem = generated_cert(srv) if source == "generated" else cert
    assert Path(shown["file"]) == pem.resolve(), shown
    assert shown["SHA-256"] == openssl_fingerprint(pem, "sha256"), shown
    assert shown["MD5"] == openssl_fingerprint(pem, "md5"), shown
    assert shown["subject"] == f"CN={HOSTNAME}", shown
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC to \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", shown["valid"]), shown
    presented = ssl.DER_cert_to_PEM_cert(peer_cert(srv, "smtps"))
    assert ssl.PEM_cert_to_DER_cert(presented) == ssl.PEM_cert_to_DER_cert(pem.read_text()), \
        "cert show describes another certificate than the listeners present"
    want = {"SHA-256": shown["SHA-256"], "MD5": shown["MD5"]}
    assert log_fingerprints(srv) == want
    assert status_fingerprints(srv) == want
    if source == "generated":
        names = [n.strip() for n in shown["names"].split(",")]
        assert names == [f"DNS:{HOSTNAME}", "DNS:localhost", "IP:127.0.0.1"], shown


def test_cert_show_before_the_first_start_says_so(make_tls_server):
    """No certificate generated yet: `cert show` says where `serve` will make one, exit 1."""
    srv = make_tls_server(start=False)
    r = srv.cli("cert", "show")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no certificate yet" in r.stderr and str(srv.data_dir) in r.stderr, r.stderr
    assert not generated_cert(srv).exists(), "cert show generated a certificate"


def _restart_with(srv, overrides: dict) -> None:
    srv.stop()
    merged = tls_base_overrides()
    for k, v in overrides.items():
        merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
    rewrite_config(srv, merged)
    srv.cfg = merge_config(srv.cfg, overrides)
    srv.start()


def test_changed_names_regenerate_the_certificate(make_tls_server):
    """The generated certificate names hostname and the listen addresses. A listener on another
    address, or another hostname, makes the next start generate a new pair (and say so, naming
    the old names); an unchanged configuration keeps the pair; the files stay 0600."""
    srv = make_tls_server()
    first = peer_cert(srv, "smtps")
    srv.restart()
    assert peer_cert(srv, "smtps") == first, "a restart without changes replaced the certificate"
    assert "generated a new one" not in srv.stderr_text()

    # One more submission address: 127.0.0.2 (loopback, so no interface is needed).
    _restart_with(srv, {"smtp": {"submission_listen": ["127.0.0.1:0", "127.0.0.2:0"]}})
    log = srv.stderr_text().rsplit("===== start", 1)[-1]
    assert "generated a new one" in log and f"CN={HOSTNAME}; DNS:{HOSTNAME}, DNS:localhost, IP:127.0.0.1" in log, log
    second = peer_cert(srv, "smtps")
    assert second != first
    shown = cert_show(srv)
    assert shown["names"] == f"DNS:{HOSTNAME}, DNS:localhost, IP:127.0.0.1, IP:127.0.0.2", shown

    # Another host name.
    _restart_with(srv, {"hostname": "post.example.test", "smtp": {"submission_listen": ["127.0.0.1:0", "127.0.0.2:0"]}})
    log = srv.stderr_text().rsplit("===== start", 1)[-1]
    assert "generated a new one" in log, log
    shown = cert_show(srv)
    assert shown["subject"] == "CN=post.example.test", shown
    assert peer_cert(srv, "smtps") not in (first, second)
    for name in ("tls-cert.pem", "tls-key.pem"):
        st = os.lstat(srv.data_dir / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
    assert not [p.name for p in srv.data_dir.iterdir() if p.name.endswith(".tmp")]
