"""Relay tricks (SPEC §3 R7): addresses that try to smuggle a remote recipient past the relay rules.

Each trick is tried in every setup where it must be refused, after which the same session sends a
message to a local user: the trick's recipient must never be queued (`queue list` holds nothing
once the local copy is delivered) nor delivered to the local user "user" (user@example.test), whom
a careless parser could pick out of the trick.

Setups (client address in brackets; * = the client may relay):
  all* (127.0.0.20), none, near (partner.example is near), list-unlisted (127.0.0.20),
  list-listed* (127.0.0.10 in the relay list), both-unlisted, pop-nologin (none + pop_minutes 15),
  pop-login* (none + pop_minutes 15, the client logged in to POP3 just before).
"""

import re
import time

import pytest

from conftest import SAM
from helpers import (
    JANE,
    expect,
    explain,
    fetch_all,
    make_message,
    pop_login_from,
    queue_entries,
    smtp_from,
    wait_for_subjects,
    wait_queued,
)

NAME, ADDR, PW = SAM
DECOY = ("user", "user@example.test", "user-secret-1")

LISTED, UNLISTED, POP_CLIENT = "127.0.0.10", "127.0.0.20", "127.0.0.30"

SETUPS = {
    # name:          (relay config,                              client,     POP login first)
    "all":           ({"mode": "all", "pop_minutes": 0},          UNLISTED,   False),
    "none":          ({"mode": "none", "pop_minutes": 0},         UNLISTED,   False),
    "near":          ({"mode": "near", "pop_minutes": 0},         UNLISTED,   False),
    "list-unlisted": ({"mode": "list", "pop_minutes": 0},         UNLISTED,   False),
    "list-listed":   ({"mode": "list", "pop_minutes": 0},         LISTED,     False),
    "both-unlisted": ({"mode": "both", "pop_minutes": 0},         UNLISTED,   False),
    "pop-nologin":   ({"mode": "none", "pop_minutes": 15},        POP_CLIENT, False),
    "pop-login":     ({"mode": "none", "pop_minutes": 15},        POP_CLIENT, True),
}
RELAY_ALLOWED = ["all", "list-listed", "pop-login"]
RELAY_REFUSED = [s for s in SETUPS if s not in RELAY_ALLOWED]

# Refused 550 5.7.1 in every setup, even where the client may relay (percent_routing off).
ALWAYS_REFUSED = [
    pytest.param("user%remote.example@example.test", id="percent-hack"),
    pytest.param('"user@remote.example"@example.test', id="quoted-at"),
    pytest.param('"user%remote.example"@example.test', id="quoted-percent"),
    pytest.param('"remote.example!user"@example.test', id="quoted-bang"),
    pytest.param("remote.example!user@example.test", id="bang-path"),
    pytest.param("user@[192.0.2.1]", id="ip-literal"),
]

# Remote recipients in disguise: refused 550 5.7.1 wherever the client may not relay.
REFUSED_UNLESS_RELAY = [
    pytest.param("<@example.test:user@remote.example>", id="source-route"),
    pytest.param("<@example.test,@mail.example.test:user@remote.example>", id="source-route-2hops"),
    pytest.param("user@remote.example.", id="trailing-dot"),
    pytest.param("USER@REMOTE.EXAMPLE", id="uppercase"),
    pytest.param("postmaster@remote.example", id="postmaster-remote"),
]

# Not an address at all: 501 everywhere.
SYNTAX = [
    pytest.param("user@remote.example@example.test", id="double-at"),
]


def trick_server(make_server, setup: str, **overrides):
    relay, client, login = SETUPS[setup]
    srv = make_server(start=False, relay=dict(relay), **overrides)
    srv.add_user(*SAM)
    srv.add_user(*DECOY)
    srv.cli_ok("list", "add", "relay", LISTED)
    srv.cli_ok("list", "add", "near", "partner.example")
    srv.start()
    if login:
        pop_login_from(srv, client, NAME, PW)
    return srv, client


def rcpt_line(addr: str) -> str:
    return f"RCPT TO:{addr}" if addr.startswith("<") else f"RCPT TO:<{addr}>"


def try_trick(srv, client, trick, subject):
    """One session: the trick's RCPT, then a local recipient and a message.
    Returns the trick's reply; the local message has been sent."""
    c = smtp_from(srv, client)
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        r = c.cmd(rcpt_line(trick))
        expect(c.cmd(f"RCPT TO:<{ADDR}>"), 250)
        expect(c.data(make_message(subject)), 250)
    finally:
        c.quit()
    return r


def assert_nothing_smuggled(srv, subject):
    """Once Sam has the message, nothing is left on the queue and the decoy user got nothing."""
    wait_for_subjects(srv, NAME, PW, [subject])
    entries = queue_entries(srv)
    assert entries == [], f"refused recipient queued: {entries}\n{srv.cli('queue', 'list').stdout}"
    assert fetch_all(srv, DECOY[0], DECOY[2]) == [], "the trick was delivered to the local user 'user'"


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("trick", ALWAYS_REFUSED)
def test_trick_always_refused(make_server, setup, trick):
    """R7: percent hack (percent routing off), quoted local parts with @ % !, bang paths and
    foreign IP literals are refused 550 5.7.1 in every mode, even for a client that may relay."""
    srv, client = trick_server(make_server, setup)
    r = try_trick(srv, client, trick, "after the trick")
    assert r.code == 550 and r.enhanced == "5.7.1", f"{setup}: RCPT {trick}: {r!r}"
    assert_nothing_smuggled(srv, "after the trick")


@pytest.mark.parametrize("setup", RELAY_REFUSED)
@pytest.mark.parametrize("trick", REFUSED_UNLESS_RELAY)
def test_disguised_remote_refused(make_server, setup, trick):
    """R7: a source route is decided on its final mailbox, a trailing dot or upper case does not
    make a remote domain local, postmaster at a remote domain is remote: 550 5.7.1 where the
    client may not relay."""
    srv, client = trick_server(make_server, setup)
    r = try_trick(srv, client, trick, "after the disguise")
    assert r.code == 550 and r.enhanced == "5.7.1", f"{setup}: RCPT {trick}: {r!r}"
    assert_nothing_smuggled(srv, "after the disguise")


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("trick", SYNTAX)
def test_double_at_is_a_syntax_error(make_server, setup, trick):
    """R7: user@remote@local is not an address: 501."""
    srv, client = trick_server(make_server, setup)
    r = try_trick(srv, client, trick, "after the syntax error")
    assert r.code == 501, f"{setup}: RCPT {trick}: {r!r}"
    assert_nothing_smuggled(srv, "after the syntax error")


# ------------------------------------------------------------------------------------------
# Percent routing switched on
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setup,code", [
    pytest.param("all", 250, id="all-250"),
    pytest.param("list-listed", 250, id="list-listed-250"),
    pytest.param("pop-login", 250, id="pop-login-250"),
    pytest.param("none", 550, id="none-550"),
    pytest.param("near", 550, id="near-550"),
    pytest.param("list-unlisted", 550, id="list-unlisted-550"),
    pytest.param("both-unlisted", 550, id="both-unlisted-550"),
    pytest.param("pop-nologin", 550, id="pop-nologin-550"),
])
def test_percent_routing_on(make_server, setup, code):
    """R7: with percent_routing = true, user%remote.example@example.test is the remote recipient
    user@remote.example: accepted and queued as forward where the client may relay, refused
    550 5.7.1 (and not queued) elsewhere."""
    srv, client = trick_server(make_server, setup, smtp={"percent_routing": True})
    r = try_trick(srv, client, "user%remote.example@example.test", "percent")
    assert r.code == code, f"{setup}: {r!r}"
    if code == 250:
        wait_queued(srv, "user@remote.example", "forward")
        wait_for_subjects(srv, NAME, PW, ["percent"])
        assert fetch_all(srv, DECOY[0], DECOY[2]) == []
    else:
        assert r.enhanced == "5.7.1", r
        assert_nothing_smuggled(srv, "percent")


@pytest.mark.parametrize("trick", [p for p in ALWAYS_REFUSED if p.id != "percent-hack"])
def test_other_tricks_refused_with_percent_routing(make_server, trick):
    """R7: turning percent routing on does not open the other tricks, even in mode all."""
    srv, client = trick_server(make_server, "all", smtp={"percent_routing": True})
    r = try_trick(srv, client, trick, "still refused")
    assert r.code == 550 and r.enhanced == "5.7.1", f"RCPT {trick}: {r!r}"
    assert_nothing_smuggled(srv, "still refused")


# ------------------------------------------------------------------------------------------
# Decided on the final mailbox
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trick", [
    pytest.param("<@example.test:user@remote.example>", id="source-route"),
    pytest.param("user@remote.example.", id="trailing-dot"),
    pytest.param("USER@REMOTE.EXAMPLE", id="uppercase"),
])
def test_disguised_remote_relayed_as_final_mailbox(make_server, trick):
    """R7: where the client may relay, the disguised address is relayed to its final mailbox
    user@remote.example (the route dropped, the trailing dot and case ignored)."""
    srv, client = trick_server(make_server, "list-listed")
    r = try_trick(srv, client, trick, "relayed disguise")
    assert r.code == 250, r
    entries = queue_entries(srv)
    deadline = time.monotonic() + 10
    while not any(st == "forward" and a.rstrip(".") == "user@remote.example" for st, a in entries):
        assert time.monotonic() < deadline, f"user@remote.example not queued as forward: {entries}"
        time.sleep(0.2)
        entries = queue_entries(srv)
    assert all("example.test:" not in a for _, a in entries), entries


@pytest.mark.parametrize("rcpt", [
    pytest.param(f"<@remote.example:{ADDR}>", id="source-route-to-local"),
    pytest.param(f"{ADDR}.", id="trailing-dot-local"),
    pytest.param(ADDR.upper(), id="uppercase-local"),
    pytest.param("SamJones@[127.0.0.1]", id="our-ip-literal"),
])
def test_final_mailbox_local_is_delivered(make_server, rcpt):
    """R2, R7: a source route, trailing dot, upper case or an IP literal naming this server
    (the client connects to 127.0.0.1) whose final mailbox is local is local mail: accepted in
    mode none and delivered to Sam."""
    srv, client = trick_server(make_server, "none")
    c = smtp_from(srv, client)
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        expect(c.cmd(rcpt_line(rcpt)), 250)
        expect(c.data(make_message("final mailbox local")), 250)
    finally:
        c.quit()
    wait_for_subjects(srv, NAME, PW, ["final mailbox local"])


@pytest.mark.parametrize("trick", ALWAYS_REFUSED)
def test_explain_refuses_tricks(make_server, trick):
    """explain says refuse for every trick, even in mode all, as the server does."""
    srv, client = trick_server(make_server, "all")
    ex = explain(srv, client, JANE, [trick.strip("<>")])
    assert [v for _, v in ex["order"]] == ["refuse"], ex["raw"]


@pytest.mark.parametrize("trick", SYNTAX)
def test_explain_double_at(make_server, trick):
    """explain refuses user@remote@local too: a refuse line (exit 1), or a user error (exit 2)
    that names the address."""
    srv, client = trick_server(make_server, "all")
    r = srv.cli("explain", "--ip", client, "--from", JANE, "--to", trick)
    if r.returncode == 2:
        assert trick in r.stderr, r.stderr
    else:
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert re.search(r"(?mi)^recipient .*: refuse\b", r.stdout), r.stdout


@pytest.mark.parametrize("trick,percent_routing", [
    pytest.param("user@[IPv6:2001:db8::1]", False, id="ipv6-literal"),
    pytest.param('"user@remote.example"@[127.0.0.1]', False, id="quoted-at-our-literal"),
    pytest.param("user%remote.example@[127.0.0.1]", False, id="percent-at-our-literal"),
    pytest.param("user%[192.0.2.1]@example.test", True, id="percent-routed-to-literal"),
    pytest.param("user%remote.example!x@example.test", True, id="percent-routed-bang"),
])
def test_more_tricks_never_relay(make_server, trick, percent_routing):
    """R7: combinations of tricks are refused (a 5xx reply) even in mode all, and nothing is
    queued or delivered."""
    srv, client = trick_server(make_server, "all", smtp={"percent_routing": percent_routing})
    r = try_trick(srv, client, trick, "combined trick")
    assert 500 <= r.code < 600, f"RCPT {trick}: {r!r}"
    assert_nothing_smuggled(srv, "combined trick")
