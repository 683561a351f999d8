"""Issue 15, "Metrics": `[metrics] listen` serves `/metrics` for Prometheus — sessions by listener,
accepts and refusals by rule (SPEC ids), queue depth by state, delivery attempts by outcome and
latency, POP3 logins and RETRs, the argon2 queue, free storage — and `postroom status --json`
gives scripts the status as JSON.

The scrapes are read by real parsers: the Python prometheus_client parsers for the classic text
format and for OpenMetrics, and `promtool check metrics` (Debian's `prometheus` package, which
`.ci/run` installs; without it, and outside CI, that check is skipped).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from conftest import SAM
from helpers import (
    expect,
    fetch_all,
    make_message,
    pop_login_fails,
    send_mail,
    smtp_session,
    wait_for_count,
)
from smtppeer import Peer

NAME, ADDR, PW = SAM
METRICS = {"metrics": {"listen": "127.0.0.1:0"}}


def url(srv, path: str = "/metrics") -> str:
    host, port = srv.listeners["metrics"]
    return f"http://{host}:{port}{path}"


def scrape(srv, openmetrics: bool = False) -> tuple[str, str]:
    """(content type, body) of GET /metrics."""
    req = urllib.request.Request(url(srv))
    if openmetrics:
        req.add_header("Accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        return r.headers["Content-Type"], r.read().decode()


def samples(text: str, parser=parse_text) -> dict:
    """{(sample name, frozenset(labels)): value}, read by a real parser."""
    out = {}
    for family in parser(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, frozenset(labels.items())))


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (Debian package prometheus)")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool check metrics: {r.stdout}{r.stderr}\n{text}"


def test_metrics_count_sessions_decisions_mail_and_pop3(make_server):
    srv = make_server(**METRICS)
    srv.add_user(*SAM)
    # One message accepted (R2 local recipient), one relay attempt refused (R1).
    send_mail(srv, ADDR, make_message("counted"))
    c = smtp_session(srv)
    expect(c.cmd("MAIL FROM:<jane@remote.example>"), 250)
    expect(c.cmd("RCPT TO:<someone@elsewhere.example>"), 550)
    c.quit()
    # One POP3 login with a RETR, one failed login.
    wait_for_count(srv, NAME, PW, 1)
    assert len(fetch_all(srv, NAME, PW)) == 1
    assert pop_login_fails(srv, NAME, "wrong-password") is not None

    ctype, text = scrape(srv)
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, ctype
    found = samples(text)
    assert value(found, "postroom_sessions_total", listener="smtp") >= 2, text
    assert value(found, "postroom_sessions_total", listener="pop3") >= 3, text
    assert value(found, "postroom_messages_received_total") >= 1, text
    assert value(found, "postroom_accepts_total", stage="connect", rule="R4") >= 2, text
    assert value(found, "postroom_accepts_total", stage="rcpt", rule="R2") >= 1, text
    assert value(found, "postroom_refusals_total", stage="rcpt", rule="R1") == 1, text
    assert value(found, "postroom_pop3_logins_total", outcome="ok") >= 2, text
    assert value(found, "postroom_pop3_logins_total", outcome="failed") == 1, text
    assert value(found, "postroom_pop3_retrieved_total") == 1, text
    for state in ("framework", "delivery", "attempt", "held", "bounce"):
        assert value(found, "postroom_queue_depth", state=state) is not None, f"no queue depth {state}\n{text}"
    assert value(found, "postroom_queue_oldest_age_seconds") is not None, text
    assert value(found, "postroom_argon2_queue_capacity") == 256, text
    assert value(found, "postroom_argon2_queue_waiting") is not None, text
    assert value(found, "postroom_storage_free_bytes") > 0, text
    assert value(found, "postroom_delivery_latency_seconds_count") is not None, text
    # Bounded labels: no client address, user or domain ever becomes one.
    for forbidden in ("127.0.0.1", "sam", "example", "jane"):
        assert forbidden not in "".join(line for line in text.splitlines() if not line.startswith("#")), forbidden
    promtool_check(text)

    # OpenMetrics for a scraper that asks for it (as Prometheus does), read by the strict parser.
    ctype, text = scrape(srv, openmetrics=True)
    assert ctype.startswith("application/openmetrics-text"), ctype
    assert text.endswith("# EOF\n")
    found = samples(text, parse_openmetrics)
    assert value(found, "postroom_messages_received_total") >= 1, text


def test_metrics_count_outbound_deliveries(make_server):
    """Delivery attempts by outcome, and the latency histogram, through a loopback next hop."""
    peer = Peer("127.0.0.1", 0)
    peer.rcpt["no@remote.example"] = "550 5.1.1 no such user"
    peer.rcpt["later@remote.example"] = "451 4.3.0 try later"
    peer.start()
    try:
        srv = make_server(start=False, relay={"mode": "list"}, delivery={"mail_router": f"127.0.0.1:{peer.port}"}, **METRICS)
        srv.cli_ok("list", "add", "relay", "127.0.0.0/8")
        srv.start()
        for rcpt in ("yes@remote.example", "no@remote.example", "later@remote.example"):
            send_mail(srv, rcpt, make_message(f"out {rcpt}", to=rcpt))
        deadline = time.monotonic() + 30
        while True:
            found = samples(scrape(srv)[1])
            outcomes = {o: value(found, "postroom_delivery_attempts_total", outcome=o) for o in ("delivered", "failed", "retry")}
            if all(outcomes.values()):
                break
            assert time.monotonic() < deadline, f"delivery attempts not all counted: {outcomes}"
            time.sleep(0.3)
        assert value(found, "postroom_delivery_latency_seconds_count") >= 1
        assert value(found, "postroom_delivery_latency_seconds_bucket", le="+Inf") >= 1
        # The deferred recipient waits in the queue, counted by state at scrape time.
        assert value(found, "postroom_queue_depth", state="delivery") + value(found, "postroom_queue_depth", state="attempt") >= 1
    finally:
        peer.stop()


def test_metrics_endpoint_answers_only_get_metrics(make_server):
    srv = make_server(**METRICS)
    for path, want in (("/", 404), ("/metrics/x", 404), ("/favicon.ico", 404)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url(srv, path), timeout=10)
        assert e.value.code == want, path
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url(srv), data=b"x", method="POST"), timeout=10)
    assert e.value.code == 405 and e.value.headers["Allow"] == "GET, HEAD"
    # A request head past 8 KiB is refused, not read for ever.
    host, port = srv.listeners["metrics"]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 20000 + b"\r\n\r\n")
        reply = s.recv(100)
    assert reply.startswith(b"HTTP/1.1 431"), reply
    # `status` shows the endpoint among the listeners, up.
    out = srv.cli_ok("status").stdout
    assert any(line.split()[:2] == ["listener", "metrics"] and line.endswith("up") for line in out.splitlines()), out


def test_metrics_are_off_by_default(server):
    assert "metrics" not in server.listeners
    assert "metrics" not in (server.data_dir / "listening").read_text()


def test_status_json_for_scripts(make_server):
    srv = make_server(**METRICS)
    srv.add_user(*SAM)
    send_mail(srv, ADDR, make_message("for status"))
    deadline = time.monotonic() + 10
    while True:
        r = srv.cli("status", "--json")
        report = json.loads(r.stdout)
        if r.returncode == 0:
            break
        assert time.monotonic() < deadline, (r.returncode, r.stdout, r.stderr)
        time.sleep(0.2)
    assert report["ok"] is True and report["running"] is True
    names = {entry["name"]: entry for entry in report["listeners"]}
    assert {"smtp", "pop3", "metrics"} <= set(names), report
    host, port = srv.listeners["smtp"]
    assert names["smtp"]["address"] == f"{host}:{port}" and names["smtp"]["up"] is True
    for worker in ("framework", "outbound"):
        assert report["workers"][worker]["up"] is True, report
        assert isinstance(report["workers"][worker]["last_active_secs_ago"], int)
    queue = report["queue"]
    for key in ("for_framework", "for_delivery", "in_attempt", "held", "bounces"):
        assert isinstance(queue[key], int) and queue[key] >= 0, queue
    assert "oldest_age_secs" in queue

    srv.stop()
    r = srv.cli("status", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["ok"] is False and report["running"] is False, (r.stdout, r.stderr)
    assert report["workers"]["framework"]["up"] is False
