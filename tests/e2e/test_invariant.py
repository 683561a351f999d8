"""The exactly-once invariant under faults (issue 12).

SPEC F1 (a message answered 250 is committed with synchronous=FULL and survives kill -9), F2
(the snap-in pipeline delivers each recipient once: duplicates, aliases with overlapping
members and several addresses of one user still give one copy per mailbox), C3 (the outbound
queue: temporary failures are retried, a permanent failure bounces once, a success is never
repeated), C4 (one RFC 3464 bounce per refused recipient), O3 (SIGTERM lets work in progress
finish within the 8 s grace).

While many clients - port-25 style SMTP from a relay-listed 127.0.0.1 and authenticated
submission - send messages with distinct content, the server is stopped with SIGTERM and killed
with SIGKILL at random moments and restarted. Remote recipients go through the mail router, a
scripted peer on 127.0.0.150 that decides per message: accept (250), tempfail (451, then 250),
refuse (550), delay its reply by 1-3 s, or drop the connection after the final dot (then accept
the retry). At the end every acknowledged message is in each local recipient's mailbox exactly
once, byte-identical apart from Postroom's trace fields; each remote recipient has it once
(except the unavoidable RFC 1047 duplicates: the connection was lost between the dot and the
reply, by the peer's DROP or by a kill -9 at that moment - counted and printed separately); each
refusal made exactly one bounce to the (local) sender; nothing is left queued; no empty message
anywhere. A message whose DATA got no reply because of a kill is "unknown": at most once.

Length: POSTROOM_INVARIANT_SECONDS of sending (default 60), at most POSTROOM_INVARIANT_MESSAGES
messages (default 600), POSTROOM_INVARIANT_KILLS SIGTERMs and as many kill -9s (default: one of
each per 20 s, at least 2); POSTROOM_INVARIANT_SEED replays a run. Marked `soak`: `make soak`
runs it longer.
"""

from __future__ import annotations

import base64
import collections
import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

from helpers import (
    CLIENT_NAME,
    Closed,
    Reply,
    SmtpClient,
    dot_stuff,
    fetch_all,
    make_message,
)
from smtppeer import Peer, bounce_for, is_bounce, parse_bounce, queue_rows

SECONDS = int(os.environ.get("POSTROOM_INVARIANT_SECONDS", "60"))
MAX_MESSAGES = int(os.environ.get("POSTROOM_INVARIANT_MESSAGES", "600"))
KILLS = int(os.environ.get("POSTROOM_INVARIANT_KILLS", str(max(2, SECONDS // 20))))
SEED = int(os.environ.get("POSTROOM_INVARIANT_SEED", str(random.randrange(1 << 30))))
DRAIN_SECONDS = 120 + MAX_MESSAGES // 20
TIMEOUT = SECONDS + 30 * KILLS + DRAIN_SECONDS + 120

ROUTER_IP = "127.0.0.150"
SMTP_CLIENTS = 4
SUBMISSION_CLIENTS = 2

PW = "inv-secret-1"
# user -> addresses
USERS = {
    "alice": ["alice@example.test", "Alice.Smith@example.test"],
    "bob": ["bob@example.test"],
    "carol": ["carol@example.test"],
    "sender": ["sender@example.test"],   # the port-25 clients' envelope sender: gets the bounces
    "sam": ["sam@example.test"],         # the submission clients' user and sender
    "admin": ["admin@example.test"],     # the postmaster (base config)
}
ALIASES = {
    "team@example.test": ["alice@example.test", "bob@example.test"],
    "crew@example.test": ["bob@example.test", "carol@example.test"],
}
# Local addresses a message may name, and whose mailboxes they reach.
LOCAL_POOL = {
    "alice@example.test": {"alice"},
    "Alice.Smith@example.test": {"alice"},
    "ALICE@EXAMPLE.TEST": {"alice"},
    "bob@example.test": {"bob"},
    "carol@example.test": {"carol"},
    "team@example.test": {"alice", "bob"},
    "crew@example.test": {"bob", "carol"},
}
REMOTE_KINDS = [("accept", 40), ("tempfail", 15), ("refuse", 15), ("delay", 15), ("drop", 15)]
OK_REPLY = "250 2.0.0 queued by the test router"

TOKEN_RE = re.compile(rb"inv[0-9a-f]{8}-[a-z]\d+-\d{6}")
TRACE_FIELDS = (b"received:", b"return-path:", b"delivered-to:")


def strip_added_trace(message: bytes) -> bytes:
    """The message without the trace fields Postroom put in front of it (Received, Return-Path,
    Delivered-To, each with its continuation lines)."""
    lines = message.split(b"\r\n")
    i = 0
    while i < len(lines) and lines[i].lower().startswith(TRACE_FIELDS):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


def token_in(data: bytes | None) -> str | None:
    m = TOKEN_RE.search(data or b"")
    return m.group(0).decode() if m else None


@dataclass
class Sent:
    token: str
    client: str
    listener: str
    sender_user: str
    rcpts: list[str]
    local_users: set[str]
    remote: str | None
    kind: str | None          # the router's behaviour for this message
    tempfails: int = 0
    delay: float = 0.0
    message: bytes = b""
    state: str = "unsent"     # acked | unknown | refused (non-250 to DATA) | unsent
    reply: str = ""


@dataclass
class World:
    run: str
    sent: dict[str, Sent] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: collections.Counter = field(default_factory=collections.Counter)
    kill_times: list[float] = field(default_factory=list)
    term_times: list[float] = field(default_factory=list)
    term_durations: list[float] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)   # (category, detail)
    budget: int = MAX_MESSAGES
    in_data: int = 0          # clients that sent a final dot and wait for its reply

    def take(self) -> bool:
        with self.lock:
            if self.budget <= 0:
                return False
            self.budget -= 1
            return True


def router_script(world: World):
    """The peer's per-message decision (smtppeer data_script), keyed by the token in the body."""

    def script(tx):
        token = token_in(tx.raw_data)
        with world.lock:
            s = world.sent.get(token) if token else None
            n = world.attempts[token]
            world.attempts[token] += 1
        if s is None or s.kind is None:
            return None  # not ours (or an empty message): the default 250
        if s.kind == "tempfail":
            return (0, "451 4.3.0 try again later" if n < s.tempfails else OK_REPLY)
        if s.kind == "refuse":
            return (0, "550 5.7.1 refused by the test router")
        if s.kind == "delay":
            return (s.delay, OK_REPLY)
        if s.kind == "drop":
            return (0, "DROP" if n == 0 else OK_REPLY)
        return (0, OK_REPLY)

    return script


def plan_message(world: World, rng: random.Random, client: str, seq: int, listener: str) -> Sent:
    token = f"inv{world.run}-{client}-{seq:06d}"
    n_local = rng.choice([0, 1, 1, 2, 3])
    rcpts = rng.sample(sorted(LOCAL_POOL), n_local)
    if rcpts and rng.random() < 0.3:
        rcpts.append(rng.choice(rcpts))           # a duplicate RCPT, same spelling
    users = set().union(*(LOCAL_POOL[r] for r in rcpts)) if rcpts else set()
    remote = kind = None
    tempfails, delay = 0, 0.0
    if not rcpts or rng.random() < 0.6:
        remote = f"r-{token}@remote.example"
        kind = rng.choices([k for k, _ in REMOTE_KINDS], [w for _, w in REMOTE_KINDS])[0]
        tempfails = rng.choice([1, 2]) if kind == "tempfail" else 0
        delay = rng.uniform(1.0, 3.0) if kind == "delay" else 0.0
        rcpts.append(remote)
    rng.shuffle(rcpts)
    sender_user = "sam" if listener == "submission" else "sender"
    sender = USERS[sender_user][0]
    body = (f"Token {token}.\r\n"
            f".{token} starts with a dot\r\n"
            + "".join(f"line {k} of {token}\r\n" for k in range(rng.randint(1, 30))))
    msg = make_message(token, body, sender=sender, to=rcpts[0])
    return Sent(token, client, listener, sender_user, rcpts, users, remote, kind, tempfails, delay, msg)


def client_loop(srv, world: World, name: str, listener: str, up: threading.Event,
                stop: threading.Event, interval: float, seed: int) -> None:
    """Send messages until stop (or the budget is spent), one every `interval` s, several per
    session; reconnect after any error. Every message gets a fresh token: nothing is re-sent."""
    rng = random.Random(seed)
    seq = 0
    next_at = time.monotonic()
    while not stop.is_set():
        if not up.wait(0.5):
            continue
        addr = getattr(srv, listener)
        try:
            c = SmtpClient(addr, timeout=20)
        except (OSError, Closed):
            time.sleep(0.2)
            continue
        try:
            if c.greeting.code != 220:
                raise Closed(f"greeting {c.greeting!r}")
            if c.cmd(f"EHLO {CLIENT_NAME}").code != 250:
                raise Closed("EHLO refused")
            if listener == "submission":
                token = base64.b64encode(f"\0sam\0{PW}".encode()).decode()
                r = c.cmd(f"AUTH PLAIN {token}")
                if r.code != 235:
                    raise Closed(f"AUTH: {r!r}")
            for _ in range(rng.randint(1, 6)):
                if stop.is_set():
                    break
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at + interval, time.monotonic() - interval)
                if not world.take():
                    stop.wait(1.0)
                    break
                seq += 1
                s = plan_message(world, rng, name, seq, listener)
                with world.lock:
                    world.sent[s.token] = s
                if not send_one(c, s, world):
                    break
            c.quit()
        except (OSError, Closed, AssertionError):
            c.close()
            time.sleep(0.1)


def send_one(c: SmtpClient, s: Sent, world: World) -> bool:
    """One transaction on an open session; sets s.state. False: the session is unusable."""
    sender = USERS[s.sender_user][0]
    r = c.cmd(f"MAIL FROM:<{sender}>")
    if r.code != 250:
        s.reply = f"MAIL {r.code}"
        return False
    for rc in s.rcpts:
        r = c.cmd(f"RCPT TO:<{rc}>")
        if r.code != 250:
            s.reply = f"RCPT {r.code} {rc} {r.text}"
            try:
                c.cmd("RSET")
            except (OSError, Closed):
                return False
            return r.code != 421
    r = c.cmd("DATA")
    if r.code != 354:
        s.reply = f"DATA {r.code}"
        return False
    body = dot_stuff(s.message)
    c.send(body)
    s.state = "unknown"        # from here on the server may have taken it
    with world.lock:
        world.in_data += 1
    try:
        c.send(b".\r\n")
        r: Reply = c.read_reply()
    except (OSError, Closed, AssertionError):
        return False
    finally:
        with world.lock:
            world.in_data -= 1
    s.reply = f"{r.code} {r.text}"
    s.state = "acked" if r.code == 250 else "refused"
    return r.code != 421


@pytest.mark.soak
@pytest.mark.timeout(TIMEOUT)
def test_exactly_once_under_faults(make_server):
    """F1, F2, C3, C4, O3: see the module docstring. Prints one summary line."""
    rng = random.Random(SEED)
    world = World(run=uuid.uuid4().hex[:8])
    peer = Peer(ROUTER_IP, 0, name="router.remote.example", data_script=router_script(world)).start()
    srv = None
    stop = threading.Event()
    up = threading.Event()
    threads: list[threading.Thread] = []
    try:
        srv = make_server(
            start=False,
            smtp={"submission_listen": ["127.0.0.1:0"]},
            relay={"mode": "list"},
            delivery={"mail_router": f"{ROUTER_IP}:{peer.port}",
                      "first_retry_count": 4, "first_retry_interval_secs": 1,
                      "second_retry_count": 4, "second_retry_interval_secs": 2},
        )
        srv.cli_ok("list", "add", "relay", "127.0.0.1")
        for user, addrs in USERS.items():
            srv.add_user(user, addrs, PW)
        for alias, targets in ALIASES.items():
            srv.cli_ok("alias", "add", alias, *targets)
        srv.start()
        assert srv.submission is not None, "no submission listener"
        up.set()

        n_clients = SMTP_CLIENTS + SUBMISSION_CLIENTS
        interval = max(0.02, SECONDS * n_clients / max(1, MAX_MESSAGES))
        for k in range(n_clients):
            listener = "smtp" if k < SMTP_CLIENTS else "submission"
            name = f"{'m' if listener == 'smtp' else 's'}{k}"
            t = threading.Thread(target=client_loop, daemon=True,
                                 args=(srv, world, name, listener, up, stop, interval, SEED + k))
            t.start()
            threads.append(t)

        # Faults at random moments, at least 4 s apart, within the sending time.
        events = ["term"] * KILLS + ["kill"] * KILLS
        rng.shuffle(events)
        slot = (SECONDS - 6) / max(1, len(events))
        t0 = time.monotonic()
        for i, ev in enumerate(events):
            at = t0 + 3 + i * slot + rng.uniform(0, max(0.0, slot - 4))
            time.sleep(max(0.0, at - time.monotonic()))
            up.clear()
            if ev == "kill":
                if rng.random() < 0.5:
                    # Aim at a message whose final dot is on its way (its client's state is
                    # "unknown" until the reply): the DATA the kill interrupts.
                    aim = time.monotonic() + 2.0
                    while world.in_data == 0 and time.monotonic() < aim:
                        time.sleep(0.0005)
                world.kill_times.append(time.monotonic())
                srv.kill()
            else:
                world.term_times.append(time.monotonic())
                t = time.monotonic()
                proc = srv.proc
                srv.stop(timeout=20)
                took = time.monotonic() - t
                world.term_durations.append(took)
                if took > 15 or (proc is not None and proc.returncode == -9):
                    world.problems.append(("SIGTERM: no exit within the grace",
                                           f"the server took {took:.1f} s and was killed"))
            srv.start()
            up.set()
        time.sleep(max(0.0, t0 + SECONDS - time.monotonic()))
        stop.set()
        for t in threads:
            t.join(60)
        assert not [t for t in threads if t.is_alive()], "a client thread did not finish"

        # Drain: the queue empties (tempfails retried, bounces delivered), bounded.
        deadline = time.monotonic() + DRAIN_SECONDS
        empty_since = None
        while time.monotonic() < deadline:
            if queue_rows(srv):
                empty_since = None
            elif empty_since is None:
                empty_since = time.monotonic()
            elif time.monotonic() - empty_since > 4:
                break
            time.sleep(0.5)
        time.sleep(2)
        check(world, srv, peer)
    finally:
        stop.set()
        up.set()
        for t in threads:
            t.join(10)
        peer.stop()


def check(world: World, srv, peer: Peer) -> None:
    sent = dict(world.sent)
    states = collections.Counter(s.state for s in sent.values())
    problems = list(world.problems)

    def bad(category: str, detail: str) -> None:
        problems.append((category, detail))

    # -- local mailboxes ------------------------------------------------------------------------
    boxes = {u: fetch_all(srv, u, PW) for u in USERS}
    copies: dict[tuple[str, str], list[bytes]] = collections.defaultdict(list)
    bounces: dict[str, list[tuple[str, bytes]]] = collections.defaultdict(list)
    local_copies = 0
    for user, msgs in boxes.items():
        for m in msgs:
            if is_bounce(m):
                toks = {t.decode() for t in TOKEN_RE.findall(m)}
                if len(toks) != 1:
                    bad("bounce for several messages",
                        f"a bounce in {user}'s mailbox for {len(toks)} messages: {m[:600]!r}")
                for t in toks:
                    bounces[t].append((user, m))
                continue
            body = strip_added_trace(m)
            if not body.strip() or not m.strip():
                bad("empty message",
                    f"an empty message in {user}'s mailbox: {m[:300]!r}")
                continue
            tok = token_in(m)
            if tok is None or tok not in sent:
                bad("stranger",
                    f"a message nobody sent in {user}'s mailbox: {m[:300]!r}")
                continue
            copies[(tok, user)].append(m)
            local_copies += 1

    for tok, s in sent.items():
        for user in USERS:
            got = copies.get((tok, user), [])
            want = user in s.local_users
            if s.state == "acked" and want and len(got) != 1:
                bad("local: acknowledged not exactly once",
                    f"{tok} (acknowledged) reached {user} {len(got)} times; rcpts {s.rcpts}")
            elif s.state == "unknown" and want and len(got) > 1:
                bad("local: unknown more than once",
                    f"{tok} (unknown) reached {user} {len(got)} times; rcpts {s.rcpts}")
            elif s.state in ("refused", "unsent") and got:
                bad("local: refused/unsent delivered",
                    f"{tok} ({s.state}: {s.reply}) reached {user} {len(got)} times")
            elif not want and got:
                bad("local: wrong mailbox",
                    f"{tok} reached {user}, who was not a recipient; rcpts {s.rcpts}")
            for m in got:
                if strip_added_trace(m) != s.message:
                    bad("changed on the way",
                        f"{tok} changed on the way to {user}:\nsent {s.message[:400]!r}\n"
                        f"got  {strip_added_trace(m)[:400]!r}")

    # -- the router -----------------------------------------------------------------------------
    with peer.lock:
        txs = list(peer.transactions)
    remote_tx: dict[str, list] = collections.defaultdict(list)
    for t in txs:
        if t.raw_data is None:
            continue  # no DATA in this transaction (e.g. refused RCPT): nothing was handed over
        if not t.raw_data.strip():
            bad("empty message",
                f"an empty message at the router: MAIL FROM:<{t.mail_from}> {t.rcpts}")
            continue
        tok = token_in(t.raw_data)
        if tok is None or tok not in sent:
            bad("stranger",
                f"a message nobody sent at the router: {t.raw_data[:300]!r}")
            continue
        remote_tx[tok].append(t)

    def a_kill_during(t, s: Sent) -> bool:
        """Was there a kill -9 while this attempt's outcome was unknown to Postroom: the dot had
        arrived at the router (0.5 s of slack before: the dot may have been on its way), its
        reply not yet recorded (2 s after the reply: QUIT and a FULL commit on a busy machine)?"""
        start = (t.dot_at or t.at) - 0.5
        end = (t.replied_at if t.replied_at is not None else (t.dot_at or t.at) + s.delay) + 2.0
        return any(start <= k <= end for k in world.kill_times)

    rfc1047_drop = rfc1047_kill = remote_once = tempfailed = refused = 0
    for tok, s in sent.items():
        ts = sorted(remote_tx.get(tok, []), key=lambda t: t.dot_at or t.at)
        if s.remote is None:
            if ts:
                bad("remote: unexpected",
                    f"{tok} had no remote recipient but reached the router {len(ts)} times")
            continue
        for t in ts:
            if [a.lower() for a in t.accepted] != [s.remote.lower()]:
                bad("remote: wrong RCPT",
                    f"{tok}: the router got RCPT {t.rcpts}, expected only {s.remote}")
            if strip_added_trace(t.message) != s.message:
                bad("changed on the way",
                    f"{tok} changed on the way to the router:\nsent {s.message[:400]!r}\n"
                    f"got  {strip_added_trace(t.message)[:400]!r}")
        # A copy: a 2xx to the dot, or no reply at all (the router took it: RFC 1047).
        taken = [t for t in ts if t.data_reply is None or 200 <= t.data_reply < 300]
        excused = 0
        for t in taken[:-1]:
            if t.data_reply is None and s.kind == "drop" and t is ts[0]:
                rfc1047_drop += 1
                excused += 1
            elif a_kill_during(t, s):
                rfc1047_kill += 1
                excused += 1
        if s.kind == "refuse":
            if s.state == "acked" and len(ts) < 1:
                bad("remote: acknowledged never arrived",
                    f"{tok} (acknowledged) never reached the router")
            refused += s.state == "acked"
            continue
        if s.state == "acked" and not taken:
            bad("remote: acknowledged never arrived",
                f"{tok} (acknowledged, router: {s.kind}) never delivered to {s.remote}; "
                f"attempts {[t.data_reply for t in ts]}")
        elif len(taken) > 1 + excused:
            bad("remote: delivered more than once",
                f"{tok} (router: {s.kind}, {s.state}) delivered {len(taken)} times to "
                f"{s.remote}; replies {[t.data_reply for t in ts]}; "
                f"dots at {[round(t.dot_at or 0, 2) for t in ts]}, kills "
                f"{[round(k, 2) for k in world.kill_times]}, SIGTERMs "
                f"{[round(k, 2) for k in world.term_times]}")
        elif s.state in ("refused", "unsent") and taken:
            bad("remote: refused/unsent delivered",
                f"{tok} ({s.state}: {s.reply}) reached the router")
        elif len(taken) == 1:
            remote_once += 1
        tempfailed += s.kind == "tempfail" and bool(taken)

    # -- bounces ----------------------------------------------------------------------------------
    def reports_refusal(m: bytes, s: Sent) -> bool:
        f = bounce_for(parse_bounce(m), s.remote) if s.remote else None
        return f is not None and f.get("action", "").lower() == "failed"

    for tok, s in sent.items():
        got = bounces.get(tok, [])
        for user, _ in got:
            if user != s.sender_user:
                bad("bounces: wrong mailbox",
                    f"the bounce for {tok} went to {user}, not to its sender {s.sender_user}")
        refusals = [m for _, m in got if s.kind == "refuse" and reports_refusal(m, s)]
        others = [m for _, m in got if not (s.kind == "refuse" and reports_refusal(m, s))]
        if s.kind == "refuse" and s.state == "acked" and len(refusals) != 1:
            bad("bounces: not exactly one per refusal",
                f"{tok} was refused by the router: {len(refusals)} bounces reporting "
                f"{s.remote} failed, expected 1")
        elif s.kind == "refuse" and s.state == "unknown" and len(refusals) > 1:
            bad("bounces: not exactly one per refusal",
                f"{tok} (unknown, refused): {len(refusals)} bounces")
        if others:
            bad("bounces: unexpected",
                f"{tok} (router: {s.kind}, rcpts {s.rcpts}) got {len(others)} unexpected "
                f"bounce(s): {[parse_bounce(m)['text'][-200:].strip() for m in others]}")

    queued = queue_rows(srv)
    if queued:
        bad("still queued",
            f"{len(queued)} recipient(s) still queued:\n"
            + "\n".join(r["line"] for r in queued[:20]))

    unsent_why = collections.Counter(" ".join(s.reply.split()[:2]) or "connection lost"
                                     for s in sent.values() if s.state == "unsent")
    print(f"\ninvariant (seed {SEED}): {len(sent)} messages: {states['acked']} acknowledged, "
          f"{states['unknown']} unknown (no reply to DATA), {states['refused']} refused at DATA, "
          f"{states['unsent']} not sent {dict(unsent_why.most_common(4))}; {local_copies} local "
          f"copies; remote: {remote_once} "
          f"delivered once, {tempfailed} after tempfails, {refused} refused -> "
          f"{sum(len(v) for v in bounces.values())} bounces; RFC 1047 duplicates: {rfc1047_drop} "
          f"dropped after the dot, {rfc1047_kill} in flight at a kill -9; {len(world.kill_times)} "
          f"kill -9, {len(world.term_times)} SIGTERM (exit after "
          f"{', '.join(f'{d:.1f}' for d in world.term_durations)} s); {len(txs)} router "
          f"transactions; {len(problems)} problem(s)")
    assert states["acked"] > 0, "no message was acknowledged"
    by_cat: dict[str, list[str]] = collections.defaultdict(list)
    for cat, text in problems:
        by_cat[cat].append(text)
    assert not problems, (
        f"{len(problems)} violation(s) of exactly-once (seed {SEED}): "
        + ", ".join(f"{len(v)} {k}" for k, v in by_cat.items()) + "\n"
        + "\n".join(f"[{k}] {t}" for k, v in by_cat.items() for t in v[:6]))
