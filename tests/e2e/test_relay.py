"""Relay rules (SPEC §3 R1, R2, R3, R11 explain): who may relay to whom.

The heart of this file is one table: relay mode x client kind x recipient kind -> RCPT reply.
Every cell is written out; each is its own test with a readable id such as
`test_relay_matrix[list+pop-pop_outside-remote-550]`.

Client kinds (each connects from its own loopback source address):
- listed:      127.0.0.10, in the relay (accept) list
- unlisted:    127.0.0.20, in no list
- pop_inside:  127.0.0.30, logged in to POP3 (USER/PASS) just before
- pop_outside: 127.0.0.40, logged in to POP3, then the login made 20 minutes old by editing the
               SQLite database directly (pop_logins.at = now - 20 min): the only way to leave the
               15-minute window without waiting 15 minutes.
Recipient kinds: local (SamJones@example.test, a local user), near (a near-domains entry:
friend@partner.example), remote (someone@remote.example).
"""

import pytest

from conftest import SAM
from helpers import (
    JANE,
    SourcePop,
    age_pop_login,
    eventually,
    expect,
    explain,
    has_ip,
    make_message,
    pop_login_from,
    queue_entries,
    smtp_from,
    wait_for_subjects,
    wait_journal,
    wait_queued,
)

NAME, ADDR, PW = SAM

LISTED = "127.0.0.10"
UNLISTED = "127.0.0.20"
POP_INSIDE = "127.0.0.30"
POP_OUTSIDE = "127.0.0.40"
CLIENT_IPS = {"listed": LISTED, "unlisted": UNLISTED, "pop_inside": POP_INSIDE,
              "pop_outside": POP_OUTSIDE}

NEAR_DOMAIN = "partner.example"
RECIPIENTS = {"local": ADDR, "near": f"friend@{NEAR_DOMAIN}", "remote": "someone@remote.example"}

MODES = {
    "all": {"mode": "all", "pop_minutes": 0},
    "none": {"mode": "none", "pop_minutes": 0},
    "near": {"mode": "near", "pop_minutes": 0},
    "list": {"mode": "list", "pop_minutes": 0},
    "both": {"mode": "both", "pop_minutes": 0},
    "none+pop": {"mode": "none", "pop_minutes": 15},
    "list+pop": {"mode": "list", "pop_minutes": 15},
}

# mode, client kind, then the RCPT reply for each recipient kind: local, near, remote.
MATRIX = [
    # mode        client          local  near  remote
    ("all",      "listed",        250,   250,  250),
    ("all",      "unlisted",      250,   250,  250),
    ("all",      "pop_inside",    250,   250,  250),
    ("all",      "pop_outside",   250,   250,  250),

    ("none",     "listed",        250,   550,  550),
    ("none",     "unlisted",      250,   550,  550),
    ("none",     "pop_inside",    250,   550,  550),
    ("none",     "pop_outside",   250,   550,  550),

    ("near",     "listed",        250,   250,  550),
    ("near",     "unlisted",      250,   250,  550),
    ("near",     "pop_inside",    250,   250,  550),
    ("near",     "pop_outside",   250,   250,  550),

    ("list",     "listed",        250,   250,  250),
    ("list",     "unlisted",      250,   550,  550),
    ("list",     "pop_inside",    250,   550,  550),
    ("list",     "pop_outside",   250,   550,  550),

    ("both",     "listed",        250,   250,  250),
    ("both",     "unlisted",      250,   250,  550),
    ("both",     "pop_inside",    250,   250,  550),
    ("both",     "pop_outside",   250,   250,  550),

    ("none+pop", "listed",        250,   550,  550),
    ("none+pop", "unlisted",      250,   550,  550),
    ("none+pop", "pop_inside",    250,   250,  250),
    ("none+pop", "pop_outside",   250,   550,  550),

    ("list+pop", "listed",        250,   250,  250),
    ("list+pop", "unlisted",      250,   550,  550),
    ("list+pop", "pop_inside",    250,   250,  250),
    ("list+pop", "pop_outside",   250,   550,  550),
]

CELLS = [
    pytest.param(mode, client, rkind, code, id=f"{mode}-{client}-{rkind}-{code}")
    for (mode, client, local, near, remote) in MATRIX
    for rkind, code in (("local", local), ("near", near), ("remote", remote))
]


def relay_server(make_server, mode: str, client: str | None = None, **overrides):
    """A server in relay mode `mode` (a MODES key) with Sam enrolled, LISTED in the relay list and
    partner.example in the near list (both entered before the server starts), and, for the POP
    client kinds, that client's POP3 login done (and aged, for pop_outside)."""
    srv = make_server(start=False, relay=dict(MODES[mode]), **overrides)
    srv.add_user(*SAM)
    srv.cli_ok("list", "add", "relay", LISTED)
    srv.cli_ok("list", "add", "near", NEAR_DOMAIN)
    srv.start()
    if client in ("pop_inside", "pop_outside"):
        pop_login_from(srv, CLIENT_IPS[client], NAME, PW)
    if client == "pop_outside":
        age_pop_login(srv, POP_OUTSIDE, 20)
    return srv


def rcpt(srv, ip: str, recipient: str):
    c = smtp_from(srv, ip)
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        return c.cmd(f"RCPT TO:<{recipient}>")
    finally:
        c.quit()


@pytest.mark.parametrize("mode,client,rkind,code", CELLS)
def test_relay_matrix(make_server, mode, client, rkind, code):
    """R1, R2, R3: the RCPT reply for one cell of the table; a refusal is 550 5.7.1."""
    srv = relay_server(make_server, mode, client)
    r = rcpt(srv, CLIENT_IPS[client], RECIPIENTS[rkind])
    assert r.code == code, (f"mode {mode}, client {client} ({CLIENT_IPS[client]}), "
                            f"recipient {RECIPIENTS[rkind]}: expected {code}, got {r!r}")
    if code == 550:
        assert r.enhanced == "5.7.1", f"relay refusal without 5.7.1: {r!r}"


# ------------------------------------------------------------------------------------------
# explain agrees with the server
# ------------------------------------------------------------------------------------------

EXPLAIN_CELLS = [
    pytest.param(mode, client, local, near, remote, id=f"{mode}-{client}")
    for (mode, client, local, near, remote) in MATRIX
    if client in ("listed", "unlisted", "pop_inside")
]


@pytest.mark.parametrize("mode,client,local,near,remote", EXPLAIN_CELLS)
def test_explain_matches_server(make_server, mode, client, local, near, remote):
    """R11/INTERFACE explain: for the same client and recipients, `postroom explain` says
    deliver locally / relay / refuse exactly where the server answered 250 / 250 / 550."""
    srv = relay_server(make_server, mode, client)
    ip = CLIENT_IPS[client]
    got = {k: rcpt(srv, ip, RECIPIENTS[k]).code for k in RECIPIENTS}
    assert got == {"local": local, "near": near, "remote": remote}, got
    ex = explain(srv, ip, JANE, list(RECIPIENTS.values()), pop_login=(client == "pop_inside"))
    assert ex["connect"] == "accept", ex["raw"]
    assert ex["sender"] == "accept", ex["raw"]
    for kind, addr in RECIPIENTS.items():
        verdict = ex["recipients"].get(addr.lower())
        if got[kind] == 550:
            want = "refuse"
        else:
            want = "deliver locally" if kind == "local" else "relay"
        assert verdict == want, (f"{addr}: server said {got[kind]}, explain says {verdict!r}:\n"
                                 f"{ex['raw']}")


def test_explain_names_the_rule(make_server):
    """explain prints `(rule: TEXT)` for every line, so an administrator sees why."""
    srv = relay_server(make_server, "list")
    ex = explain(srv, UNLISTED, JANE, [ADDR, RECIPIENTS["remote"]])
    lines = [line for line in ex["raw"].splitlines()
             if line.strip().lower().startswith(("connect", "sender", "recipient"))]
    assert len(lines) == 4, ex["raw"]
    for line in lines:
        assert "(rule:" in line and not line.rstrip().endswith("(rule: )"), line


# ------------------------------------------------------------------------------------------
# Journal and queue
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,recipient", [
    pytest.param("none", "victim@remote.example", id="none"),
    pytest.param("near", "victim@remote.example", id="near"),
    pytest.param("list", "victim@remote.example", id="list"),
    pytest.param("both", "victim@remote.example", id="both"),
    pytest.param("all", "victim%remote.example@example.test", id="all-percent-hack"),
])
def test_relay_refusal_is_journaled_9v(make_server, mode, recipient):
    """R3: a refused relay is journaled with code 9V, the client IP, the recipient and the rule -
    the same rule text `explain` gives for it."""
    srv = relay_server(make_server, mode)
    r = rcpt(srv, UNLISTED, recipient)
    expect(r, 550, "5.7.1")
    hits = wait_journal(srv, lambda line: has_ip(line, UNLISTED) and recipient in line, code="9V")
    line = hits[0]
    assert " 9V " in f" {line} ", line
    ex = explain(srv, UNLISTED, JANE, [recipient])
    assert ex["order"] and ex["order"][0][1] == "refuse", ex["raw"]
    rline = [x for x in ex["raw"].splitlines() if x.strip().lower().startswith("recipient")][0]
    rule = rline.split("(rule:", 1)[1].strip()[:-1].strip()
    assert rule and rule in line, f"9V entry {line!r} does not give the rule {rule!r}"
    # Local mail from the same client is not a relay and is not journaled as 9V.
    expect(rcpt(srv, UNLISTED, ADDR), 250)
    assert not [x for x in srv.cli_ok("journal", "--code", "9V").stdout.splitlines()
                if ADDR.lower() in x.lower()]


def _send(srv, ip, recipients, subject):
    c = smtp_from(srv, ip)
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{JANE}>"), 250)
        codes = {rc: c.cmd(f"RCPT TO:<{rc}>").code for rc in recipients}
        if 250 in codes.values():
            expect(c.data(make_message(subject)), 250)
        return codes
    finally:
        c.quit()


def test_accepted_relay_is_queued_for_forwarding(make_server):
    """R1: a relay-listed client's remote recipient is accepted and waits in `queue list` as
    forward; the local recipient of the same message is delivered; a refused recipient from
    another client is never queued."""
    srv = relay_server(make_server, "list")
    codes = _send(srv, LISTED, [ADDR, "far@remote.example"], "relayed")
    assert codes == {ADDR: 250, "far@remote.example": 250}, codes
    wait_queued(srv, "far@remote.example", "forward")
    wait_for_subjects(srv, NAME, PW, ["relayed"])
    codes = _send(srv, UNLISTED, [ADDR, "sneaky@remote.example"], "not relayed")
    assert codes == {ADDR: 250, "sneaky@remote.example": 550}, codes
    wait_for_subjects(srv, NAME, PW, ["relayed", "not relayed"])
    assert "sneaky@remote.example" not in [a for _, a in queue_entries(srv)]


def test_near_domain_is_queued_for_forwarding(make_server):
    """R1 near: a recipient in a near domain is accepted from any client and queued as forward."""
    srv = relay_server(make_server, "near")
    codes = _send(srv, UNLISTED, [f"friend@{NEAR_DOMAIN}"], "to partner")
    assert codes == {f"friend@{NEAR_DOMAIN}": 250}, codes
    wait_queued(srv, f"friend@{NEAR_DOMAIN}", "forward")


def test_pop_before_smtp_relay_is_queued(make_server):
    """R1 pop: a client that logged in to POP3 just before relays, and the recipient is queued."""
    srv = relay_server(make_server, "none+pop", "pop_inside")
    codes = _send(srv, POP_INSIDE, ["far@remote.example"], "pop relay")
    assert codes == {"far@remote.example": 250}, codes
    wait_queued(srv, "far@remote.example", "forward")


@pytest.mark.parametrize("rcpt_addr,code", [
    pytest.param(f"friend@mail.{NEAR_DOMAIN}", 250, id="subdomain-250"),
    pytest.param(f"friend@{NEAR_DOMAIN.upper()}", 250, id="uppercase-250"),
    pytest.param(f"friend@not{NEAR_DOMAIN}", 550, id="lookalike-550"),
    pytest.param(f"friend@{NEAR_DOMAIN}.evil.example", 550, id="suffix-550"),
])
def test_near_domain_matching(make_server, rcpt_addr, code):
    """R1 near: subdomains of a near domain match, case does not matter, look-alikes do not."""
    srv = relay_server(make_server, "near")
    r = rcpt(srv, UNLISTED, rcpt_addr)
    assert r.code == code, f"{rcpt_addr}: expected {code}, got {r!r}"


@pytest.mark.parametrize("entry,inside,outside", [
    pytest.param("127.0.2.0 255.255.255.0", "127.0.2.77", "127.0.3.77", id="address+mask"),
    pytest.param("127.0.4.0/24", "127.0.4.9", "127.0.5.9", id="cidr"),
    pytest.param("127.6.0.5 255.255.0.255", "127.6.88.5", "127.6.88.6", id="noncontiguous-mask"),
])
def test_relay_list_entry_forms(make_server, entry, inside, outside):
    """R6: relay list entries with a mask, in CIDR, and with a non-contiguous mask
    ((ip & mask) == (entry & mask)) let exactly the matching clients relay in mode list."""
    srv = relay_server(make_server, "list")
    srv.cli_ok("list", "add", "relay", entry)
    ok = lambda: rcpt(srv, inside, "far@remote.example").code == 250  # noqa: E731
    assert eventually(ok), f"{inside} (inside {entry!r}) may not relay"
    r = rcpt(srv, outside, "far@remote.example")
    expect(r, 550, "5.7.1")


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------

def test_config_check_warns_about_open_relay(make_server):
    """R1: relay mode all is an open relay; `config check` says so loudly."""
    srv = make_server(start=False, relay={"mode": "all"})
    r = srv.cli("config", "check")
    assert "open relay" in r.stderr.lower(), f"rc {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"


def test_config_check_quiet_without_open_relay(make_server):
    """No open-relay warning when the server relays for nobody."""
    srv = make_server(start=False, relay={"mode": "none"})
    r = srv.cli_ok("config", "check")
    assert "open relay" not in r.stderr.lower(), r.stderr


@pytest.mark.parametrize("relay,key", [
    pytest.param({"pop_minutes": 5}, "pop_minutes", id="pop_minutes-5"),
    pytest.param({"pop_minutes": 65536}, "pop_minutes", id="pop_minutes-65536"),
    pytest.param({"mode": "sometimes"}, "mode", id="mode-bogus"),
])
def test_bad_relay_settings_are_refused(make_server, relay, key):
    """R1: pop_minutes is 0 or 15..65535, mode one of the five; anything else is an error that
    names the setting."""
    srv = make_server(start=False, relay=relay)
    r = srv.cli("config", "check")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert key in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------
# POP-before-SMTP details
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pop_minutes,age,code", [
    pytest.param(15, 14, 250, id="15min-window-14min-old-250"),
    pytest.param(15, 16, 550, id="15min-window-16min-old-550"),
    pytest.param(60, 20, 250, id="60min-window-20min-old-250"),
    pytest.param(60, 61, 550, id="60min-window-61min-old-550"),
])
def test_pop_window_length(make_server, pop_minutes, age, code):
    """R1: the POP-before-SMTP window is pop_minutes long (the login is aged by editing
    pop_logins.at in the SQLite file)."""
    srv = make_server(start=False, relay={"mode": "none", "pop_minutes": pop_minutes})
    srv.add_user(*SAM)
    srv.start()
    pop_login_from(srv, POP_INSIDE, NAME, PW)
    age_pop_login(srv, POP_INSIDE, age)
    r = rcpt(srv, POP_INSIDE, RECIPIENTS["remote"])
    assert r.code == code, f"login {age} min old, window {pop_minutes} min: {r!r}"


def test_failed_pop_login_grants_no_relay(make_server):
    """R1/P5: only a successful POP3 login opens the window; a wrong password does not."""
    srv = relay_server(make_server, "none+pop")
    p = SourcePop(srv.pop3, POP_INSIDE)
    try:
        assert p.cmd(f"USER {NAME}").startswith(b"+OK")
        assert p.cmd("PASS wrong-password").startswith(b"-ERR")
        p.cmd("QUIT")
    finally:
        p.close()
    r = rcpt(srv, POP_INSIDE, RECIPIENTS["remote"])
    expect(r, 550, "5.7.1")
    # A login from another address does not help this one either.
    pop_login_from(srv, "127.0.0.31", NAME, PW)
    expect(rcpt(srv, POP_INSIDE, RECIPIENTS["remote"]), 550, "5.7.1")
    expect(rcpt(srv, "127.0.0.31", RECIPIENTS["remote"]), 250)


def test_explain_pop_login_only_pretends(make_server):
    """explain --pop-login answers as if the address had logged in, but records nothing: the
    server still refuses that address afterwards."""
    srv = relay_server(make_server, "none+pop")
    ex = explain(srv, UNLISTED, JANE, [RECIPIENTS["remote"]], pop_login=True)
    assert ex["recipients"].get(RECIPIENTS["remote"]) == "relay", ex["raw"]
    ex = explain(srv, UNLISTED, JANE, [RECIPIENTS["remote"]])
    assert ex["recipients"].get(RECIPIENTS["remote"]) == "refuse", ex["raw"]
    expect(rcpt(srv, UNLISTED, RECIPIENTS["remote"]), 550, "5.7.1")
