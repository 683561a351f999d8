"""Directory and command line (SPEC §8 D1-D4, INTERFACE commands, F4 journal)."""

import os
import re
import stat

from conftest import SAM
from helpers import (
    JANE,
    Server,
    expect,
    fetch_all,
    make_message,
    pop_login,
    pop_login_fails,
    send_mail,
    smtp_session,
    subject_of,
    wait_for_count,
    wait_for_subjects,
)

NAME, ADDR, PW = SAM


def test_user_disable_refuses_login_but_mail_is_delivered(sam):
    """D2: a disabled user cannot log in; mail is still accepted and delivered (seen after enable)."""
    sam.cli_ok("user", "disable", NAME)
    assert pop_login_fails(sam, NAME, PW) is not None, "disabled user could log in"
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
    expect(c.data(make_message("while disabled")), 250)
    c.quit()
    sam.cli_ok("user", "enable", NAME)
    wait_for_subjects(sam, NAME, PW, ["while disabled"])


def test_user_remove_refuses_rcpt_but_mailbox_still_readable(sam):
    """D2: after `user remove`, RCPT gets 550 5.1.1; the user can still log in while the
    mailbox holds mail."""
    send_mail(sam, ADDR, make_message("kept"))
    wait_for_count(sam, NAME, PW, 1)
    sam.cli_ok("user", "remove", NAME)
    c = smtp_session(sam)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd(f"RCPT TO:<{ADDR}>"), 550, "5.1.1")
    c.quit()
    msgs = fetch_all(sam, NAME, PW)
    assert [subject_of(m) for m in msgs] == ["kept"]


def test_removed_user_cannot_log_in_once_mailbox_empty(sam):
    """D2: a removed user may log in only until the mailbox is empty."""
    send_mail(sam, ADDR, make_message("last one"))
    wait_for_count(sam, NAME, PW, 1)
    sam.cli_ok("user", "remove", NAME)
    p = pop_login(sam, NAME, PW)
    p.dele(1)
    p.quit()
    assert pop_login_fails(sam, NAME, PW) is not None


def test_user_passwd(sam):
    """D2: `user passwd NAME --password-stdin` changes the password: the old fails, the new works."""
    sam.cli_ok("user", "passwd", NAME, "--password-stdin", input="new-secret-2\n")
    assert pop_login_fails(sam, NAME, PW) is not None, "old password still accepted"
    assert pop_login_fails(sam, NAME, "new-secret-2") is None, "new password refused"


def test_user_list_and_show(sam):
    """D2: `user list` and `user show` print the user and its addresses."""
    sam.add_user("bob", ["bob@example.test", "robert@example.test"], "bob-pw-1")
    out = sam.cli_ok("user", "list").stdout
    assert re.search(r"\bsam\b", out) and re.search(r"\bbob\b", out), out
    assert "samjones@example.test" in out.lower() or "SamJones@example.test" in out, out
    show = sam.cli_ok("user", "show", "bob").stdout
    assert re.search(r"\bbob\b", show), show
    assert "bob@example.test" in show.lower() and "robert@example.test" in show.lower(), show
    assert "samjones" not in show.lower(), show


def test_user_show_unknown_is_user_error(server):
    """INTERFACE: a user error exits 1 with a message on stderr naming what was wrong."""
    r = server.cli("user", "show", "nosuchuser")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "nosuchuser" in r.stderr, r.stderr


def test_duplicate_user_is_user_error(sam):
    """INTERFACE / D2: enrolling an existing name exits 1 naming it."""
    r = sam.cli("user", "add", NAME, "--address", "other@example.test", "--password-stdin",
                input="x-secret-9\n")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert NAME in r.stderr, r.stderr
    assert pop_login_fails(sam, NAME, PW) is None


def test_usage_error_exits_2(server):
    """INTERFACE: a usage error (unknown subcommand) exits 2."""
    r = server.cli("user", "frobnicate")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)


def test_password_never_taken_from_arguments(server):
    """INTERFACE / D1: there is no --password flag; a password on the command line never works."""
    r = server.cli("user", "add", "eve", "--address", "eve@example.test", "--password", "hunter2")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert pop_login_fails(server, "eve", "hunter2") is not None


def test_user_add_without_password_stdin_has_no_usable_password(server):
    """D1: `user add` without --password-stdin refuses or makes a user nobody can log in as."""
    r = server.cli("user", "add", "nopw", "--address", "nopw@example.test")
    assert r.returncode in (0, 1, 2), r
    for guess in ("", "nopw", "password", "nopw@example.test"):
        assert pop_login_fails(server, "nopw", guess) is not None, f"logged in with {guess!r}"


def test_domain_add_makes_domain_local(server):
    """D3, C8: `domain add` makes a domain local: before it, mail there is relay (550 5.7.1);
    after it, a user with an address there receives mail; `domain list` shows it."""
    c = smtp_session(server)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd("RCPT TO:<carol@other.test>"), 550, "5.7.1")
    c.quit()
    server.cli_ok("domain", "add", "other.test")
    out = server.cli_ok("domain", "list").stdout
    assert "other.test" in out and "example.test" in out, out
    server.add_user("carol", "carol@other.test", "carol-pw-1")
    c = smtp_session(server)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd("RCPT TO:<carol@other.test>"), 250)
    expect(c.data(make_message("new domain", to="carol@other.test")), 250)
    c.quit()
    wait_for_subjects(server, "carol", "carol-pw-1", ["new domain"])


def test_domain_remove(server):
    """D3: `domain remove` takes the domain out of `domain list` and mail to it becomes relay."""
    server.cli_ok("domain", "add", "gone.test")
    server.cli_ok("domain", "remove", "gone.test")
    assert "gone.test" not in server.cli_ok("domain", "list").stdout
    c = smtp_session(server)
    expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
    expect(c.cmd("RCPT TO:<someone@gone.test>"), 550, "5.7.1")
    c.quit()


def test_data_dir_is_private(sam):
    """D4: the data directory is 0700 and its files 0600 (the tests run with umask 022)."""
    send_mail(sam, ADDR, make_message("private"))
    wait_for_count(sam, NAME, PW, 1)
    data = sam.data_dir
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700, oct(os.stat(data).st_mode)
    problems = []
    for root, dirs, files in os.walk(data):
        for d in dirs:
            mode = stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode)
            if mode != 0o700:
                problems.append(f"{os.path.join(root, d)} dir {oct(mode)}")
        for f in files:
            path = os.path.join(root, f)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != 0o600:
                problems.append(f"{path} {oct(stat.S_IMODE(st.st_mode))}")
    assert not problems, problems


def test_config_check_ok(server):
    """INTERFACE: `config check` accepts the test configuration (exit 0)."""
    r = server.cli("config", "check")
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_config_check_unknown_key_top_level(tmp_path):
    """INTERFACE / O1: an unknown key is an error that names the key: exit 1."""
    srv = Server(tmp_path / "cfg", {"frobnicate_level": 3})
    r = srv.cli("config", "check")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "frobnicate_level" in r.stderr, r.stderr


def test_config_check_unknown_key_in_table(tmp_path):
    """INTERFACE: an unknown key inside a table is refused too, and named."""
    srv = Server(tmp_path / "cfg", {"smtp": {"max_mesage_size": 1000}})
    r = srv.cli("config", "check")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "max_mesage_size" in r.stderr, r.stderr


def test_serve_refuses_unknown_key(tmp_path):
    """INTERFACE: `serve` refuses a config with an unknown key (exit 1, key named)."""
    srv = Server(tmp_path / "cfg", {"pop3": {"bogus_knob": True}})
    r = srv.cli("serve", timeout=30)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "bogus_knob" in r.stderr, r.stderr


def test_journal_records_each_step(sam):
    """F4: the journal shows SMTP receive (9x), address resolution (P), local delivery (B) and
    POP login (D) entries; `journal --code` filters."""
    send_mail(sam, ADDR, make_message("journaled"))
    wait_for_subjects(sam, NAME, PW, ["journaled"])  # includes POP logins
    r = sam.cli_ok("journal")
    out = r.stdout
    lines = [line for line in out.splitlines() if line.strip()]
    tokens = set(re.findall(r"(?<![0-9A-Za-z])[0-9A-Z]{1,2}(?![0-9A-Za-z])", out))
    found = {}
    for family, pattern in (("smtp", r"9[0-9A-Z]"), ("resolution", r"P[0-9A-Z]?"),
                            ("delivery", r"B[0-9A-Z]?"), ("pop", r"D[0-9A-Z]?")):
        match = sorted(t for t in tokens if re.fullmatch(pattern, t))
        assert match, f"no {family} journal code ({pattern}) in:\n{out}"
        found[family] = match[0]
    for family, code in found.items():
        f = sam.cli_ok("journal", "--code", code).stdout
        flines = [line for line in f.splitlines() if line.strip()]
        assert flines and code in f, f"journal --code {code} printed nothing"
        assert len(flines) < len(lines), f"journal --code {code} did not filter:\n{f}"


def test_queue_list_runs(sam):
    """O2: `queue list` runs and exits 0."""
    send_mail(sam, ADDR, make_message("queued"))
    r = sam.cli("queue", "list")
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_sigterm_is_a_clean_shutdown(sam):
    """O3: SIGTERM stops the server cleanly (exit 0) and a restart finds users and mail intact."""
    send_mail(sam, ADDR, make_message("survives restart"))
    wait_for_count(sam, NAME, PW, 1)
    status = sam.stop()
    assert status == 0, f"exit status {status} after SIGTERM"
    sam.start()
    msgs = fetch_all(sam, NAME, PW)
    assert [subject_of(m) for m in msgs] == ["survives restart"]
