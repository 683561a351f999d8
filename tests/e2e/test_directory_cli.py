"""Directory and CLI (issue 14, items 14-18): a user's addresses after enrolment (D1), the
catch-all alias (F7), references to removed users and aliases, IPv4-mapped list entries (R6,
R11) and the legacy importer's unreadable lines (R6).

CLI: `postroom user address add|remove|prefer NAME ADDRESS`, `user remove NAME [--force]`,
`alias add '*@DOMAIN' TARGET...`, `alias remove ALIAS [TARGET] [--force]`, `list add relay|reject
ENTRY`, `list import-legacy --accept FILE`.
"""

import re

from conftest import SAM
from helpers import (
    eventually,
    expect,
    greeting_from,
    make_message,
    rcpt_code,
    send_mail,
    wait_for_count,
    wait_for_subjects,
)

NAME, ADDR, PW = SAM
BOB = ("bob", "bob@example.test", "bob-secret-1")
SECOND = "second.test"
# A client in no list: mail to local addresses is local mail (R2), never relay.
OUTSIDER = "127.0.0.20"


def show(srv, name: str) -> str:
    return srv.cli_ok("user", "show", name).stdout


def fails(srv, *args, input=None):
    """Run a command that must fail: exit 1 and something on stderr. Returns the result."""
    r = srv.cli(*args, input=input)
    assert r.returncode == 1, (args, r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip(), (args, r.stdout)
    return r


def rcpt(srv, address: str) -> int:
    return rcpt_code(srv, OUTSIDER, address).code


# ------------------------------------------------------------------------------------------
# Item 14 (D1): a user's addresses after enrolment
# ------------------------------------------------------------------------------------------

def test_user_address_add_prefer_remove(sam):
    """D1: `user address add` gives sam a second address (accepted at RCPT, delivered to his
    mailbox); `prefer` makes it the preferred one (`user show` marks it); `remove` ends the
    first one (550 at RCPT)."""
    other = "sam.jones@example.test"
    assert rcpt(sam, other) == 550
    sam.cli_ok("user", "address", "add", NAME, other)
    out = show(sam, NAME)
    assert other in out and ADDR.lower() in out.lower(), out
    assert re.search(re.escape(ADDR) + r"\s*\(preferred\)", out, re.I), out
    assert eventually(lambda: rcpt(sam, other) == 250)
    send_mail(sam, other, make_message("to the new address", to=other))
    wait_for_subjects(sam, NAME, PW, ["to the new address"])

    sam.cli_ok("user", "address", "prefer", NAME, other)
    out = show(sam, NAME)
    assert re.search(re.escape(other) + r"\s*\(preferred\)", out), out
    assert not re.search(re.escape(ADDR) + r"\s*\(preferred\)", out, re.I), out

    sam.cli_ok("user", "address", "remove", NAME, ADDR)
    out = show(sam, NAME)
    assert ADDR.lower() not in out.lower(), out
    assert eventually(lambda: rcpt(sam, ADDR) == 550)
    assert rcpt(sam, other) == 250


def test_user_address_add_refuses_what_is_not_free(sam):
    """D1: the new address must be in a local domain and belong to no other user and no alias;
    nothing changes when it is refused."""
    sam.add_user(*BOB[:2], BOB[2])
    sam.cli_ok("alias", "add", "staff@example.test", ADDR)
    for address, why in ((BOB[1], "bob"), ("staff@example.test", "alias"),
                         ("sam@remote.example", "remote.example"), ("not an address", "address")):
        r = fails(sam, "user", "address", "add", NAME, address)
        assert why in r.stderr.lower(), (address, r.stderr)
    assert "remote.example" not in show(sam, NAME)
    fails(sam, "user", "address", "add", "nobody", "nobody@example.test")
    # A user may not take the catch-all form: `*@domain` is not a mailbox.
    fails(sam, "user", "address", "add", NAME, "*@example.test")


def test_user_address_remove_last_is_refused(sam):
    """D1: a user keeps at least one address: removing the last one is refused (use `user
    remove`); removing an address the user does not have is refused too."""
    r = fails(sam, "user", "address", "remove", NAME, ADDR)
    assert "user remove" in r.stderr, r.stderr
    assert ADDR.lower() in show(sam, NAME).lower()
    fails(sam, "user", "address", "remove", NAME, "other@example.test")
    fails(sam, "user", "address", "prefer", NAME, "other@example.test")


def test_removing_the_preferred_address_prefers_another(sam):
    """D1: when the preferred address is removed, one of the others becomes preferred."""
    sam.cli_ok("user", "address", "add", NAME, "b@example.test")
    sam.cli_ok("user", "address", "add", NAME, "c@example.test")
    sam.cli_ok("user", "address", "remove", NAME, ADDR)
    out = show(sam, NAME)
    marked = re.findall(r"([^\s,]+@example\.test)\s*\(preferred\)", out)
    assert len(marked) == 1 and marked[0] in ("b@example.test", "c@example.test"), out


def test_user_show_marks_the_forward_keep_flag(sam):
    """D1: `user show` says whether the forward keeps a copy in the mailbox."""
    sam.cli_ok("user", "forward", NAME, "sam.away@remote.example", "--keep")
    out = show(sam, NAME)
    assert re.search(r"forward:\s*sam\.away@remote\.example \(keeps a copy\)", out), out
    sam.cli_ok("user", "forward", NAME, "sam.away@remote.example")
    out = show(sam, NAME)
    assert "sam.away@remote.example" in out and "keeps a copy" not in out, out


# ------------------------------------------------------------------------------------------
# Item 15 (F7): the catch-all
# ------------------------------------------------------------------------------------------

def catch_all_server(make_server, start=True):
    srv = make_server(start=False, domains=["example.test", SECOND])
    srv.add_user(*BOB[:2], BOB[2])
    r = srv.cli_ok("alias", "add", f"*@{SECOND}", BOB[1])
    if start:
        srv.start()
    return srv, r


def test_catch_all_takes_unknown_addresses_of_its_domain(make_server):
    """F7: `alias add '*@second.test' bob@example.test` warns (the seeds' *ANY *ANY warning)
    and works: any address of second.test is accepted and reaches bob; the literal
    `*@second.test` is not a mailbox (550); other domains are untouched (550)."""
    srv, added = catch_all_server(make_server)
    warning = added.stderr.lower()
    assert "warning" in warning and "catch-all" in warning, added.stderr
    assert "every address" in warning and "spam" in warning, added.stderr
    assert rcpt(srv, f"anything@{SECOND}") == 250
    assert rcpt(srv, f"Someone.Else@{SECOND.upper()}") == 250
    assert rcpt(srv, f"*@{SECOND}") == 550
    assert rcpt(srv, "anything@example.test") == 550
    send_mail(srv, f"whoever@{SECOND}", make_message("caught", to=f"whoever@{SECOND}"))
    wait_for_subjects(srv, "bob", BOB[2], ["caught"])
    listed = srv.cli_ok("alias", "list").stdout
    assert re.search(r"\*@second\.test.*catch-all", listed), listed


def test_catch_all_comes_after_users_and_aliases(make_server):
    """F7: resolution order: a user's address, then an alias, then the domain's catch-all."""
    srv, _ = catch_all_server(make_server, start=False)
    srv.add_user(NAME, [ADDR, f"sam@{SECOND}"], PW)
    srv.add_user("carol", ["carol@example.test"], "carol-secret-1")
    srv.cli_ok("alias", "add", f"sales@{SECOND}", "carol@example.test")
    srv.start()
    send_mail(srv, f"sam@{SECOND}", make_message("for sam", to=f"sam@{SECOND}"))
    send_mail(srv, f"sales@{SECOND}", make_message("for sales", to=f"sales@{SECOND}"))
    send_mail(srv, f"nobody@{SECOND}", make_message("for nobody", to=f"nobody@{SECOND}"))
    wait_for_subjects(srv, NAME, PW, ["for sam"])
    wait_for_subjects(srv, "carol", "carol-secret-1", ["for sales"])
    msgs = wait_for_subjects(srv, "bob", BOB[2], ["for nobody"])
    assert len(msgs) == 1, len(msgs)
    assert wait_for_count(srv, NAME, PW, 1) == 1


def test_catch_all_to_a_full_mailbox_is_refused_at_rcpt(make_server):
    """F7/D2: a catch-all's targets count like an alias's: when they lead only to full
    mailboxes, RCPT answers 452 4.2.2."""
    srv, _ = catch_all_server(make_server)
    srv.cli_ok("user", "quota", "bob", "1")
    send_mail(srv, BOB[1], make_message("fills the box", to=BOB[1]))
    wait_for_count(srv, "bob", BOB[2], 1)
    assert eventually(lambda: rcpt_code(srv, OUTSIDER, f"x@{SECOND}").code == 452, timeout=5)
    expect(rcpt_code(srv, OUTSIDER, f"x@{SECOND}"), 452, "4.2.2")


def test_catch_all_pattern_must_be_the_whole_local_part(make_server):
    """F7: only `*@domain` is a catch-all; `sales-*@domain` (no wildcards) and a catch-all
    outside the local domains are refused."""
    srv = make_server(start=False)
    fails(srv, "alias", "add", "sales-*@example.test", ADDR)
    fails(srv, "alias", "add", "*@remote.example", ADDR)


# ------------------------------------------------------------------------------------------
# Item 16: removing what aliases and forwards point to
# ------------------------------------------------------------------------------------------

def test_removing_a_user_an_alias_points_to_is_refused(sam):
    """A user that aliases point to is not removed (the aliases are named); `--force` removes
    the references and says so; an alias left without targets goes too."""
    sam.add_user(*BOB[:2], BOB[2])
    sam.cli_ok("alias", "add", "staff@example.test", ADDR, BOB[1])
    sam.cli_ok("alias", "add", "samonly@example.test", ADDR)
    r = fails(sam, "user", "remove", NAME)
    assert "staff@example.test" in r.stderr and "samonly@example.test" in r.stderr, r.stderr
    assert "--force" in r.stderr, r.stderr
    assert "enabled" in show(sam, NAME)
    assert rcpt(sam, ADDR) == 250

    r = sam.cli_ok("user", "remove", NAME, "--force")
    assert "staff@example.test" in r.stdout and "samonly@example.test" in r.stdout, r.stdout
    aliases = sam.cli_ok("alias", "list").stdout.lower()
    assert ADDR.lower() not in aliases, aliases
    assert "staff@example.test" in aliases and BOB[1] in aliases, aliases
    assert "samonly@example.test" not in aliases, aliases
    assert eventually(lambda: rcpt(sam, ADDR) == 550)


def test_removing_an_alias_another_alias_points_to_is_refused(sam):
    """`alias remove` of an alias another alias points to is refused, naming it; removing the
    last target of such an alias too; `--force` removes the references."""
    sam.cli_ok("alias", "add", "outer@example.test", "inner@example.test", "far@remote.example")
    sam.cli_ok("alias", "add", "inner@example.test", ADDR)
    r = fails(sam, "alias", "remove", "inner@example.test")
    assert "outer@example.test" in r.stderr, r.stderr
    r = fails(sam, "alias", "remove", "inner@example.test", ADDR)
    assert "outer@example.test" in r.stderr, r.stderr
    assert "inner@example.test" in sam.cli_ok("alias", "list").stdout
    r = sam.cli_ok("alias", "remove", "inner@example.test", "--force")
    assert "outer@example.test" in r.stdout, r.stdout
    aliases = sam.cli_ok("alias", "list").stdout.lower()
    assert "inner@example.test" not in aliases, aliases
    assert "outer@example.test" in aliases and "far@remote.example" in aliases, aliases


def test_removing_a_user_another_forwards_to_is_refused(sam):
    """A user another user forwards to is not removed (the forward is named); `--force` turns
    that forward off (the mail stays in the forwarding user's own mailbox) and says so."""
    sam.add_user(*BOB[:2], BOB[2])
    sam.cli_ok("user", "forward", "bob", ADDR)
    r = fails(sam, "user", "remove", NAME)
    assert "bob" in r.stderr and "forward" in r.stderr.lower(), r.stderr
    r = sam.cli_ok("user", "remove", NAME, "--force")
    assert "bob" in r.stdout and "forward" in r.stdout.lower(), r.stdout
    assert ADDR.lower() not in show(sam, "bob").lower()


def test_removing_an_address_an_alias_points_to_is_refused(sam):
    """`user address remove` of an address an alias points to is refused like `user remove`."""
    sam.cli_ok("user", "address", "add", NAME, "b@example.test")
    sam.cli_ok("alias", "add", "staff@example.test", "b@example.test")
    r = fails(sam, "user", "address", "remove", NAME, "b@example.test")
    assert "staff@example.test" in r.stderr, r.stderr
    sam.cli_ok("user", "address", "remove", NAME, "b@example.test", "--force")
    assert "staff@example.test" not in sam.cli_ok("alias", "list").stdout


# ------------------------------------------------------------------------------------------
# Item 17 (R6, R11): IPv4-mapped IPv6 list entries
# ------------------------------------------------------------------------------------------

def test_ipv4_mapped_list_entries_are_normalised(make_server):
    """R4/R6: entries written as IPv4-mapped IPv6 are stored as IPv4 (the form clients are
    matched in) and work: `::ffff:127.0.0.95` relays, `::ffff:127.0.7.0/120` (127.0.7.0/24) is
    refused at the greeting; the mapped form removes the entry too."""
    srv = make_server(relay={"mode": "list"})
    r = srv.cli_ok("list", "add", "relay", "::ffff:127.0.0.95")
    assert "127.0.0.95" in r.stdout and "::ffff" not in r.stdout.lower(), r.stdout
    srv.cli_ok("list", "add", "reject", "::FFFF:127.0.7.0/120")
    relay = srv.cli_ok("list", "show", "relay").stdout
    reject = srv.cli_ok("list", "show", "reject").stdout
    assert "::ffff" not in (relay + reject).lower(), relay + reject
    assert re.search(r"(?m)^127\.0\.0\.95\s", relay), relay
    assert re.search(r"(?m)^127\.0\.7\.0/24\s", reject), reject
    assert eventually(lambda: rcpt(srv, "far@remote.example") == 550)
    assert eventually(lambda: rcpt_code(srv, "127.0.0.95", "far@remote.example").code == 250)
    assert eventually(lambda: (g := greeting_from(srv, "127.0.7.5")) is None or g.code == 554)
    g = greeting_from(srv, "127.0.8.5")
    assert g is not None and g.code == 220, g
    srv.cli_ok("list", "remove", "relay", "::ffff:127.0.0.95")
    assert "127.0.0.95" not in srv.cli_ok("list", "show", "relay").stdout


# ------------------------------------------------------------------------------------------
# Item 18 (R6): the importer reads whole addresses only
# ------------------------------------------------------------------------------------------

def test_import_legacy_reports_the_seed_example_line(make_server, tmp_path):
    """R6: the seeds' own example `7 .8.9.3 255.255.255.255` (a blank inside the address) is
    not the entry 255.255.255.255: the line is reported unreadable by number, the command fails,
    and the whole-address lines are imported."""
    srv = make_server(start=False)
    acc = tmp_path / "ACCEPTRLY.txt"
    acc.write_text(
        "1.2.3.4 255.255.0.0\n"            # 1
        "7 .8.9.3 255.255.255.255\n"       # 2 unreadable
        "7.8.9.3\n"                        # 3
        "10.0.0.1 10 10.0.0.2\n"           # 4 unreadable: junk between two addresses
        "0001.00 000000 10.0.0.3\n"        # 5 sequence and date, then the address
    )
    r = srv.cli("list", "import-legacy", "--accept", str(acc))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert re.search(r":2\b", r.stderr) and re.search(r":4\b", r.stderr), r.stderr
    assert not re.search(r":(1|3|5)\b", r.stderr), r.stderr
    relay = srv.cli_ok("list", "show", "relay").stdout
    entries = [line.split("added")[0].strip() for line in relay.splitlines() if line.strip()]
    assert sorted(entries) == sorted(["1.2.3.4 255.255.0.0", "7.8.9.3", "10.0.0.3"]), relay
