"""Outbound connection reuse and PIPELINING to the next hop (issue 17, "Performance, round two";
SPEC C1, C3, C6).

Several messages due for one next hop go over one connection, RSET between them, the way
Postfix's connection cache does: after a message's final reply the connection waits up to
`[delivery] connection_reuse_secs` for the next one. MAIL, every RCPT and DATA go in one write
when the next hop offers PIPELINING (RFC 2920), one at a time when it does not. Each recipient's
outcome is recorded as before, and each message still arrives exactly once.

The next hop is a scripted smtppeer.Peer on 127.0.0.160-163 reached through `[delivery]
mail_router`, so no DNS is asked; every address is loopback.
"""

from __future__ import annotations

import collections
import time
import uuid

import pytest

from helpers import subject_of
from smtppeer import assert_bounce, queue_rows, wait_bounces
from test_exactly_once import (  # noqa: F401 (peers is a fixture)
    SAM_ADDRS,
    SAM_NAME,
    SAM_PW,
    check_each_once_peer,
    peers,
    queue_pending,
    router_server,
    send_burst,
    strip_added_trace,
    wait_until,
)

REUSE_IP = "127.0.0.160"
PLAIN_IP = "127.0.0.161"
REFUSE_IP = "127.0.0.162"
DROP_IP = "127.0.0.163"

N = 50


def transactions_by_connection(peer) -> dict[int, list]:
    with peer.lock:
        txs = list(peer.transactions)
    by_conn = collections.defaultdict(list)
    for t in txs:
        by_conn[t.connection].append(t)
    return by_conn


def mail_batches(peer) -> list[tuple[list[str], list[bool]]]:
    """For every MAIL command: the commands from it to the next reply the client waited for
    (RFC 2920: what it sent in one go), and whether each was followed by more."""
    out = []
    with peer.lock:
        conns = [(list(c.commands), list(c.followed)) for c in peer.connections]
    for cmds, followed in conns:
        for i, c in enumerate(cmds):
            if c.upper().startswith("MAIL"):
                j = i
                while j < len(cmds) and followed[j]:
                    j += 1
                out.append((cmds[i:j + 1], followed[i:j + 1]))
    return out


def assert_rset_between_transactions(peer) -> None:
    """On each connection, every MAIL after the first comes after an RSET, and the client never
    starts a second transaction without one."""
    with peer.lock:
        conns = [list(c.commands) for c in peer.connections]
    for cmds in conns:
        verbs = [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in cmds]
        mails = [i for i, v in enumerate(verbs) if v == "MAIL"]
        for a, b in zip(mails, mails[1:]):
            assert "RSET" in verbs[a:b], f"no RSET between two transactions: {cmds[a:b + 1]!r}"


@pytest.mark.timeout(180)
def test_fifty_messages_share_few_connections_each_once_byte_identical(make_server, peers):
    """Issue 17: 50 messages for one next hop go over far fewer than 50 connections (< 10),
    RSET between transactions, each message exactly once and byte-identical apart from the
    trace fields Postroom adds; the queue ends empty (each recorded delivered, C3)."""
    peer = peers(REUSE_IP)
    srv = router_server(make_server, (REUSE_IP, peer.port))
    sent = send_burst(srv.smtp, N, f"reuse-{uuid.uuid4().hex[:8]}")
    check_each_once_peer(peer, sent, srv)
    with peer.lock:
        n_conn = len(peer.connections)
    by_conn = transactions_by_connection(peer)
    assert n_conn < 10, f"{n_conn} connections for {N} messages: {[len(v) for v in by_conn.values()]}"
    assert max(len(v) for v in by_conn.values()) > 1, "no connection carried two messages"
    assert_rset_between_transactions(peer)
    # Idle connections say QUIT once no mail waits (connection_reuse_secs, 2 s by default).
    wait_until(lambda: all(c.closed is not None for c in peer.connections), 15,
               what=lambda: f"open connections: {[c.commands[-3:] for c in peer.connections if c.closed is None]}")
    with peer.lock:
        assert all(c.commands and c.commands[-1].upper() == "QUIT" for c in peer.connections), \
            [c.commands[-2:] for c in peer.connections]


@pytest.mark.timeout(120)
def test_pipelining_when_offered_and_lock_step_when_not(make_server, peers):
    """RFC 2920 to the next hop: with PIPELINING offered, MAIL, the RCPTs and DATA arrive before
    the peer answered MAIL — on a reused connection too; without it, each command waits for its
    reply. Both deliver everything once."""
    piped = peers(REUSE_IP)
    plain = peers(PLAIN_IP, caps=["SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES"])
    for peer, pipelined in ((piped, True), (plain, False)):
        srv = router_server(make_server, (peer.host, peer.port))
        sent = send_burst(srv.smtp, 5, f"pipe-{pipelined}-{uuid.uuid4().hex[:8]}")
        check_each_once_peer(peer, sent, srv, settle=0.5)
        batches = mail_batches(peer)
        assert len(batches) == 5, batches
        for cmds, _ in batches:
            verbs = [c.split(":", 1)[0].split(" ", 1)[0].upper() for c in cmds]
            if pipelined:
                assert verbs == ["MAIL", "RCPT", "DATA"], f"not one batch: {cmds!r}"
            else:
                assert verbs == ["MAIL"], f"sent before the MAIL reply without PIPELINING: {cmds!r}"
        assert_rset_between_transactions(peer)
        srv.stop()


@pytest.mark.timeout(120)
def test_refused_recipient_then_accepted_one_over_one_connection(make_server, peers):
    """A 550 to one message's RCPT does not end reuse: that recipient bounces (the bounce
    reaches the sender), the next message's recipient (250) is delivered, both over one
    connection, RSET between them."""
    peer = peers(REFUSE_IP)
    peer.rcpt["nobody@remote.example"] = "550 5.1.1 no such user here"
    # One connection at a time, so the second message waits for the first one's connection.
    srv = router_server(make_server, (REFUSE_IP, peer.port), delivery={"max_connections_per_domain": 1})
    tag = uuid.uuid4().hex[:8]
    sender = SAM_ADDRS[0]
    refused = send_burst(srv.smtp, 1, f"refused-{tag}", sender=sender, to="nobody@remote.example")
    accepted = send_burst(srv.smtp, 1, f"accepted-{tag}", sender=sender, to="far@remote.example")
    wait_until(lambda: len(peer.delivered()) == 1 and not queue_rows(srv), 30,
               what=lambda: f"one delivery and an empty queue: {peer.summary()}\n{queue_pending(srv)}")
    (tx,) = peer.delivered()
    assert subject_of(tx.message) == next(iter(accepted))
    assert strip_added_trace(tx.message) == next(iter(accepted.values()))
    with peer.lock:
        txs = list(peer.transactions)
    assert [t.rcpts for t in txs] == [[("nobody@remote.example", 550)], [("far@remote.example", 250)]], \
        [t.rcpts for t in txs]
    assert txs[0].connection == txs[1].connection, "the refusal ended the connection"
    assert_rset_between_transactions(peer)
    # The refused recipient bounced to its sender (C4); nothing went twice.
    (bounce,) = wait_bounces(srv, SAM_NAME, SAM_PW, 1)
    assert_bounce(bounce, "nobody@remote.example")
    assert subject_of(next(iter(refused.values()))) not in [subject_of(t.message) for t in peer.delivered()]


@pytest.mark.timeout(180)
def test_connection_dropped_mid_batch_loses_and_duplicates_nothing(make_server, peers):
    """The next hop drops the connection after one message's final dot, before its reply
    (RFC 1047: that message was not taken, as far as anyone knows). Nothing is lost and nothing
    delivered twice: every message gets one 250 eventually (the dropped one on a retry, over a
    new connection), within a bounded wait."""
    dropped: list[str] = []

    def drop_once(tx):
        # The 10th message with a body: dropped once, before its reply.
        with peer.lock:
            n = sum(1 for t in peer.transactions if t.raw_data is not None)
        if n == 10 and not dropped:
            dropped.append(subject_of(tx.message) or "")
            return (0, "DROP")
        return None

    peer = peers(DROP_IP, data_script=drop_once)
    srv = router_server(make_server, (DROP_IP, peer.port))
    sent = send_burst(srv.smtp, 30, f"drop-{uuid.uuid4().hex[:8]}")
    wait_until(lambda: len(peer.delivered()) >= len(sent) and not queue_rows(srv), 90, 0.5,
               what=lambda: f"{len(sent)} deliveries and an empty queue (have {len(peer.delivered())}; "
                            f"queue:\n{queue_pending(srv)})")
    time.sleep(2)
    assert dropped, "the peer never dropped a connection"
    delivered = collections.Counter(subject_of(t.message) for t in peer.delivered())
    assert set(delivered) == set(sent), (set(sent) - set(delivered), set(delivered) - set(sent))
    assert all(n == 1 for n in delivered.values()), {k: n for k, n in delivered.items() if n > 1}
    for t in peer.delivered():
        assert strip_added_trace(t.message) == sent[subject_of(t.message)]
    with peer.lock:
        n_conn = len(peer.connections)
    assert 2 <= n_conn < 10, f"{n_conn} connections"
