"""Aliases and forwarding (SPEC F7, D1 forwarding address, D3; F2 address resolution).

Same world as test_outbound.py (smtppeer.Net): remote.example's MX mx1 is a scripted peer on
127.0.0.51. Users: sam (sam@example.test) and admin (admin@example.test).

CLI: `postroom alias add ADDRESS TARGET...`, `alias list`, `alias remove ADDRESS`;
`postroom user forward NAME ADDRESS [--keep]`.
"""

import time

import pytest

from dnsstub import mx_dns_stub  # noqa: F401  (fixture)
from helpers import JANE, eventually, expect, fetch_all, make_message, rcpt_code, subject_of
from smtppeer import (  # noqa: F401  (net is a fixture)
    ADMIN_ADDR,
    ADMIN_PW,
    ADMIN_USER,
    OUT_TIMEOUT,
    SAM_ADDR,
    SAM_PW,
    SAM_USER,
    assert_bounce,
    is_bounce,
    mailbox_stays,
    net,
    parse_bounce,
    relay,
    wait_bounces,
    wait_queue_empty,
)

# A client that is in no relay list: mail to an alias is local mail (R2), not relay.
OUTSIDER = "127.0.0.20"


def wait_subject(srv, user, pw, subject, timeout=OUT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        msgs = fetch_all(srv, user, pw)
        if any(subject_of(m) == subject for m in msgs):
            return msgs
        if time.monotonic() > deadline:
            raise AssertionError(f"{user} has no message {subject!r} after {timeout}s: "
                                 f"{[subject_of(m) for m in msgs]}\n" + srv.cli("queue", "list").stdout)
        time.sleep(0.3)


def send_from_outside(srv, rcpt: str, subject: str) -> bytes:
    m = make_message(subject, b"Hi.\r\n", sender=JANE, to=rcpt)
    relay(srv, JANE, [rcpt], m, source_ip=OUTSIDER)
    return m


def alias_server(net, *aliases, **kw):
    srv = net.server(start=False, **kw)
    for a in aliases:
        srv.cli_ok("alias", "add", *a)
    srv.start()
    return srv


def set_forward(srv, user: str, address: str, keep: bool = False):
    return srv.cli_ok("user", "forward", user, address, *(["--keep"] if keep else []))


# ------------------------------------------------------------------------------------------
# Aliases
# ------------------------------------------------------------------------------------------

def test_alias_to_two_local_users(net):
    """F7: mail to an alias with two local targets reaches both mailboxes, once each."""
    srv = alias_server(net, ("staff@example.test", SAM_ADDR, ADMIN_ADDR))
    send_from_outside(srv, "staff@example.test", "to the staff")
    wait_subject(srv, SAM_USER, SAM_PW, "to the staff")
    wait_subject(srv, ADMIN_USER, ADMIN_PW, "to the staff")
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 1.0)
    mailbox_stays(srv, ADMIN_USER, ADMIN_PW, 1, 0.5)
    assert not net.mx1.connections


def test_alias_added_while_running(net):
    """F7/D3: an alias added while the server runs is accepted at RCPT (within 2 s) and works."""
    srv = net.server()
    expect(rcpt_code(srv, OUTSIDER, "team@example.test"), 550)
    srv.cli_ok("alias", "add", "team@example.test", SAM_ADDR)
    assert eventually(lambda: rcpt_code(srv, OUTSIDER, "team@example.test").code == 250)
    send_from_outside(srv, "team@example.test", "team mail")
    wait_subject(srv, SAM_USER, SAM_PW, "team mail")


def test_alias_to_remote_address_is_forwarded(net):
    """F7/F2: an alias to a remote address: accepted as local mail from any client, then
    forwarded to the remote MX with the target as RCPT."""
    srv = alias_server(net, ("ext@example.test", "far@remote.example"))
    m = send_from_outside(srv, "ext@example.test", "to the outside")
    (tx,) = net.mx1.wait_delivered("far@remote.example")
    assert [a.lower() for a in tx.accepted] == ["far@remote.example"]
    assert tx.message.endswith(m)
    wait_queue_empty(srv)


def test_group_of_local_and_remote_targets(net):
    """F7: one alias, a local and two remote targets: the local copy is delivered, the remote
    ones go in one transaction."""
    srv = alias_server(net, ("mixed@example.test", SAM_ADDR, "r1@remote.example", "r2@remote.example"))
    send_from_outside(srv, "mixed@example.test", "mixed group")
    (tx,) = net.mx1.wait_delivered("r1@remote.example")
    assert sorted(a.lower() for a in tx.accepted) == ["r1@remote.example", "r2@remote.example"]
    wait_subject(srv, SAM_USER, SAM_PW, "mixed group")
    wait_queue_empty(srv)


def test_nested_alias_is_not_a_loop(net):
    """F7: an alias whose target is another alias resolves through both."""
    srv = alias_server(net, ("outer@example.test", "inner@example.test"),
                       ("inner@example.test", SAM_ADDR))
    send_from_outside(srv, "outer@example.test", "nested")
    wait_subject(srv, SAM_USER, SAM_PW, "nested")
    msgs = fetch_all(srv, SAM_USER, SAM_PW)
    assert not [m for m in msgs if is_bounce(m)]


def test_alias_list_and_remove(net):
    """F7/D3: `alias list` shows the alias and its targets; `alias remove` ends it (550 at RCPT)."""
    srv = alias_server(net, ("staff@example.test", SAM_ADDR, ADMIN_ADDR))
    out = srv.cli_ok("alias", "list").stdout.lower()
    line = [x for x in out.splitlines() if "staff@example.test" in x]
    assert line, out
    assert SAM_ADDR in out and ADMIN_ADDR in out, out
    expect(rcpt_code(srv, OUTSIDER, "staff@example.test"), 250)
    srv.cli_ok("alias", "remove", "staff@example.test")
    assert "staff@example.test" not in srv.cli_ok("alias", "list").stdout.lower()
    assert eventually(lambda: rcpt_code(srv, OUTSIDER, "staff@example.test").code == 550)
    r = srv.cli("alias", "remove", "staff@example.test")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)


def test_alias_remove_one_target(net):
    """F7: `alias remove ALIAS TARGET` drops one target; the rest still get the mail."""
    srv = alias_server(net, ("staff@example.test", SAM_ADDR, ADMIN_ADDR))
    srv.cli_ok("alias", "remove", "staff@example.test", ADMIN_ADDR)
    out = srv.cli_ok("alias", "list").stdout.lower()
    assert SAM_ADDR in out and ADMIN_ADDR not in out, out
    time.sleep(2.0)
    send_from_outside(srv, "staff@example.test", "one target left")
    wait_subject(srv, SAM_USER, SAM_PW, "one target left")
    wait_queue_empty(srv)
    assert fetch_all(srv, ADMIN_USER, ADMIN_PW) == []


def test_alias_outside_local_domains_is_refused(net):
    """F7: an alias must be in a local domain (else it would capture foreign mail)."""
    srv = net.server(start=False)
    r = srv.cli("alias", "add", "someone@remote.example", SAM_ADDR)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip()


# ------------------------------------------------------------------------------------------
# A user's forwarding address (D1)
# ------------------------------------------------------------------------------------------

def test_user_forward_sends_mail_away(net):
    """D1: Sam's forwarding address -> his mail goes to the remote address, not his mailbox."""
    srv = net.server(start=False)
    set_forward(srv, SAM_USER, "sam.away@remote.example")
    assert "sam.away@remote.example" in srv.cli_ok("user", "show", SAM_USER).stdout
    srv.start()
    m = send_from_outside(srv, SAM_ADDR, "for sam, forwarded")
    (tx,) = net.mx1.wait_delivered("sam.away@remote.example")
    assert tx.message.endswith(m)
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 0, 1.5)


def test_user_forward_keep_leaves_a_local_copy(net):
    """D1: with --keep the mail is forwarded and a copy stays in Sam's mailbox."""
    srv = net.server(start=False)
    set_forward(srv, SAM_USER, "sam.away@remote.example", keep=True)
    srv.start()
    send_from_outside(srv, SAM_ADDR, "forward and keep")
    net.mx1.wait_delivered("sam.away@remote.example")
    wait_subject(srv, SAM_USER, SAM_PW, "forward and keep")
    wait_queue_empty(srv)
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 1.0)


def test_user_forward_set_while_running(net):
    """D1: a forwarding address set while the server runs applies to the next message."""
    srv = net.server()
    send_from_outside(srv, SAM_ADDR, "before forward")
    wait_subject(srv, SAM_USER, SAM_PW, "before forward")
    set_forward(srv, SAM_USER, "sam.away@remote.example")
    time.sleep(2.0)
    send_from_outside(srv, SAM_ADDR, "after forward")
    net.mx1.wait_delivered("sam.away@remote.example")
    mailbox_stays(srv, SAM_USER, SAM_PW, 1, 1.0)


def test_user_forward_off(net):
    """D1: `user forward NAME --off` ends forwarding: mail is delivered to the mailbox again."""
    srv = net.server(start=False)
    set_forward(srv, SAM_USER, "sam.away@remote.example")
    srv.cli_ok("user", "forward", SAM_USER, "--off")
    assert "sam.away@remote.example" not in srv.cli_ok("user", "show", SAM_USER).stdout
    srv.start()
    send_from_outside(srv, SAM_ADDR, "not forwarded")
    wait_subject(srv, SAM_USER, SAM_PW, "not forwarded")
    wait_queue_empty(srv)
    assert not net.mx1.connections


# ------------------------------------------------------------------------------------------
# Loops and expansion limits
# ------------------------------------------------------------------------------------------

def _loop_outcome(srv, rcpt: str, subject: str, statuses):
    """Sam sends to rcpt. Either RCPT is refused with 5xx at once, or the message is accepted
    and bounced to Sam with one of `statuses`. Either way nothing is left in the queue."""
    from helpers import smtp_from
    c = smtp_from(srv, "127.0.0.1")
    try:
        expect(c.greeting, 220)
        c.ehlo()
        expect(c.cmd(f"MAIL FROM:<{SAM_ADDR}>"), 250)
        r = c.cmd(f"RCPT TO:<{rcpt}>")
        if r.code == 250:
            expect(c.data(make_message(subject, b"Hi.\r\n", sender=SAM_ADDR, to=rcpt)), 250)
    finally:
        c.quit()
    if r.code != 250:
        assert 500 <= r.code < 600, r
        assert r.enhanced in statuses, r
    else:
        (b,) = wait_bounces(srv, SAM_USER, SAM_PW, 1)
        parsed = parse_bounce(b)
        st = [f.get("status", "").split()[0] for f in parsed["recipients"] if f.get("status")]
        assert st and all(s in statuses for s in st), parsed["recipients"]
        assert_bounce(b, parsed["recipients"][0]["final-recipient"].split(";", 1)[1].strip(),
                      status_re="|".join(x.replace(".", r"\.") for x in statuses))
    wait_queue_empty(srv)
    return r


def test_alias_loop_is_stopped(net):
    """F7: a -> b, b -> a: the message is not passed around forever: it ends in a bounce to the
    sender with 5.4.6 or 5.2.4 (or is refused at RCPT with that status)."""
    srv = alias_server(net, ("loopa@example.test", "loopb@example.test"),
                       ("loopb@example.test", "loopa@example.test"))
    _loop_outcome(srv, "loopa@example.test", "round and round", {"5.4.6", "5.2.4"})
    time.sleep(1.5)
    msgs = fetch_all(srv, SAM_USER, SAM_PW)
    assert len(msgs) <= 1, [subject_of(m) for m in msgs]
    assert not net.mx1.connections


def test_alias_loop_through_remote_target_is_stopped(net):
    """F7: a self-referencing alias with one remote target still delivers the remote copy at
    most once and stops."""
    srv = alias_server(net, ("selfish@example.test", "selfish@example.test", "far@remote.example"))
    send_from_outside(srv, "selfish@example.test", "self reference")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not net.mx1.delivered_to("far@remote.example"):
        time.sleep(0.2)
    wait_queue_empty(srv)
    time.sleep(1.5)
    assert len(net.mx1.delivered_to("far@remote.example")) <= 1, net.mx1.summary()


def test_more_than_100_expanded_addresses_bounces_5_2_4(net):
    """F7 (RFC 5321 §4.5.3.1.8 spirit): an alias expanding to more than 100 addresses is refused
    as a whole: bounce (or RCPT refusal) with 5.2.4; nothing delivered to the peer."""
    targets = [f"m{i}@remote.example" for i in range(101)]
    srv = alias_server(net, ("everyone@example.test", *targets))
    _loop_outcome(srv, "everyone@example.test", "too many", {"5.2.4"})
    time.sleep(1.0)
    assert not net.mx1.delivered(), net.mx1.summary()


@pytest.mark.parametrize("n", [100])
def test_exactly_100_expanded_addresses_is_fine(net, n):
    """F7: 100 expanded addresses is within the limit; all are delivered."""
    targets = [f"m{i}@remote.example" for i in range(n)]
    srv = alias_server(net, ("hundred@example.test", *targets))
    send_from_outside(srv, "hundred@example.test", "one hundred")
    deadline = time.monotonic() + OUT_TIMEOUT
    while True:
        got = {a.lower() for t in net.mx1.delivered() for a in t.accepted}
        if len(got) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert got == set(targets), f"{len(got)} of {n} delivered"
    wait_queue_empty(srv)
    assert not [m for m in fetch_all(srv, SAM_USER, SAM_PW) if is_bounce(m)]
