"""Durability (SPEC F1, §1 step 2): a message answered 250 survives kill -9 and is delivered
exactly once; a message that never got 250 is delivered at most once."""

import collections
import queue
import smtplib
import threading
import time

import pytest

from conftest import SAM
from helpers import CLIENT_NAME, JANE, login_retry, make_message, subject_of

NAME, ADDR, PW = SAM
N = 200
THREADS = 8


def _sender(srv, work: queue.Queue, acked: list, attempted: list, lock: threading.Lock,
            stop: threading.Event):
    conn = None
    try:
        conn = smtplib.SMTP(srv.smtp[0], srv.smtp[1], local_hostname=CLIENT_NAME, timeout=30)
        while not stop.is_set():
            try:
                subject = work.get_nowait()
            except queue.Empty:
                return
            with lock:
                attempted.append(subject)
            conn.sendmail(JANE, [ADDR], make_message(subject))
            with lock:
                acked.append(subject)
    except (smtplib.SMTPException, OSError):
        return  # the server died under us
    finally:
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass


def _subjects(srv):
    p = login_retry(srv, NAME, PW, timeout=20)
    try:
        count, _ = p.stat()
        return [subject_of(b"\r\n".join(p.top(i, 0)[1]) + b"\r\n") for i in range(1, count + 1)]
    finally:
        p.quit()


@pytest.mark.timeout(180)
def test_kill_9_loses_no_acknowledged_message(sam):
    """F1: N messages from 8 threads; SIGKILL after about half got 250; after a restart every
    acknowledged subject is in the maildrop exactly once, any other subject at most once."""
    work = queue.Queue()
    subjects = [f"crash-{i:03d}" for i in range(N)]
    for s in subjects:
        work.put(s)
    acked, attempted = [], []
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=_sender, args=(sam, work, acked, attempted, lock, stop),
                                daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    while True:
        with lock:
            n = len(acked)
        if n >= N // 2:
            break
        if not any(t.is_alive() for t in threads):
            pytest.fail(f"all senders stopped after only {n} acknowledged messages")
        assert time.monotonic() < deadline, f"only {n} messages acknowledged in 90 s"
        time.sleep(0.005)
    sam.kill()
    stop.set()
    for t in threads:
        t.join(30)
    with lock:
        acked_set = set(acked)
    assert len(acked_set) >= N // 2
    assert len(acked_set) < N, "the kill came too late to test anything"

    sam.start()
    deadline = time.monotonic() + 60
    while True:
        got = _subjects(sam)
        missing = acked_set - set(got)
        if not missing:
            break
        assert time.monotonic() < deadline, (
            f"{len(missing)} acknowledged message(s) lost after kill -9: {sorted(missing)[:20]}"
        )
        time.sleep(0.5)
    # Let anything still queued settle, then count.
    time.sleep(2)
    got = _subjects(sam)
    counts = collections.Counter(got)
    dup_acked = {s: c for s, c in counts.items() if s in acked_set and c != 1}
    assert not dup_acked, f"acknowledged messages delivered more than once: {dup_acked}"
    dup_other = {s: c for s, c in counts.items() if c > 1}
    assert not dup_other, f"messages delivered more than once: {dup_other}"
    assert set(counts) <= set(subjects), set(counts) - set(subjects)
    assert acked_set <= set(counts)
