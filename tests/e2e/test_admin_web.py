"""The administrator's web console (SPEC E6, issue 19) in a real browser.

Playwright for Python drives Debian's `chromium` (its path is given: Playwright downloads no
browser), headless, on loopback only, with every background network feature of Chromium off. The
console is served over HTTPS with the generated self-signed certificate (the browser context
ignores that it is not trusted). Screenshots of every page go to tests/e2e/artifacts/admin-web/.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import time
from pathlib import Path

import pytest

from conftest import SAM
from helpers import CLIENT_NAME, DELIVERY_TIMEOUT, JANE, fetch_all, make_message, subject_of

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r tests/e2e/requirements.txt")

CHROMIUM = os.environ.get("POSTROOM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "admin-web"
BOSS = ("boss", "boss@example.test", "boss-secret-1")

# Chromium must not reach the network: no proxy, no update checks, no sync, no metrics upload.
CHROMIUM_ARGS = [
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-domain-reliability",
]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    args = list(CHROMIUM_ARGS)
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


@pytest.fixture
def console(make_server):
    """A server with the console on an HTTPS loopback port and an administrator, boss."""
    srv = make_server(admin={"listen": ["127.0.0.1:0"]})
    name, address, password = BOSS
    srv.cli_ok("user", "add", name, "--address", address, "--admin", "--password-stdin", input=password + "\n")
    host, port = srv.listeners["admin"]
    srv.console_url = f"https://{host}:{port}"
    return srv


@pytest.fixture
def page(browser, console):
    context = browser.new_context(ignore_https_errors=True, base_url=console.console_url,
                                  viewport={"width": 1200, "height": 900})
    p = context.new_page()
    p.set_default_timeout(15_000)
    yield p
    context.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def log_in(page, user: str = BOSS[0], password: str = BOSS[2]):
    page.goto("/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    with page.expect_navigation() as nav:
        page.get_by_role("button", name="Log in").click()
    return nav.value


def journal(srv, *args) -> str:
    return srv.cli_ok("journal", *args).stdout


def smtp_send(srv, to: str, message: bytes) -> None:
    with smtplib.SMTP(*srv.smtp, local_hostname=CLIENT_NAME, timeout=30) as s:
        s.sendmail(JANE, [to], message)


def wait_for(check, what: str, timeout: float = DELIVERY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.25)


def test_log_in_add_a_user_and_trace_a_message(console, page):
    srv = console
    response = page.goto("/")
    assert page.url.endswith("/login"), "without a session every page leads to the login"
    shot(page, "login")
    headers = response.all_headers()
    assert headers["content-security-policy"].startswith("default-src 'none'")
    assert headers["x-content-type-options"] == "nosniff"
    assert "no-store" in headers["cache-control"]

    assert log_in(page).status == 200
    assert page.get_by_role("heading", name=re.compile("Dashboard")).is_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "__Host-postroom")
    assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
    body = page.locator("main").inner_text()
    for fact in ["smtp", "pop3", "admin", "framework", "outbound client", "For delivery", "Messages received",
                 "Free storage", "Certificate"]:
        assert fact in body, f"the dashboard does not show {fact!r}:\n{body}"
    assert "DOWN" not in body, body
    shot(page, "dashboard")

    # Add a user in the users page: the same directory functions as `postroom user add`.
    page.get_by_role("link", name="Users").click()
    page.get_by_label("User name").fill("carol")
    page.get_by_label("Address").fill("carol@example.test")
    page.get_by_label("Password").fill("carol-secret-1")
    page.get_by_role("button", name="Add user").click()
    assert page.get_by_role("status").inner_text() == "User carol added."
    shot(page, "user")
    show = srv.cli_ok("user", "show", "carol").stdout
    assert "carol@example.test" in show and "admin:     no" in show, show
    assert re.search(r"WC .*from=boss .*user carol added with carol@example.test by boss", journal(srv)), journal(srv)
    page.get_by_role("link", name="Users").click()
    shot(page, "users")

    # Mail to the new user, found in the trace by address, with its whole story on one page.
    subject = f"console trace {time.monotonic_ns()}"
    smtp_send(srv, "carol@example.test", make_message(subject, to="carol@example.test"))
    wait_for(lambda: any(subject_of(m) == subject for m in fetch_all(srv, "carol", "carol-secret-1")), "delivery to carol")
    page.get_by_role("link", name="Message trace").click()
    page.get_by_label("Address or queue id").fill("carol@example.test")
    page.get_by_role("button", name="Search the journal").click()
    shot(page, "trace-search")
    qid = page.locator("main table a").first.inner_text()
    page.locator("main table a").first.click()
    story = page.locator("main").inner_text()
    for step in ["received for local delivery", "address resolved", "delivered to mailbox", "POP3 retrieval", qid]:
        assert step in story, f"the trace of {qid} lacks {step!r}:\n{story}"
    shot(page, "trace-message")

    page.get_by_role("link", name="Queue", exact=True).click()
    assert page.get_by_role("heading", name="Queue").is_visible()
    shot(page, "queue")

    # Logging out ends the session on the server, not only in the browser.
    page.get_by_role("button", name=re.compile("Log out")).click()
    assert page.url.endswith("/login")
    page.goto("/users")
    assert page.url.endswith("/login")


def test_release_a_quarantined_message(console, page):
    srv = console
    srv.add_user(*SAM)
    name, address, password = SAM
    srv.cli_ok("filter", "add", "--subject", "*quarantine me*", "--action", "keep")
    subject = f"please quarantine me {time.monotonic_ns()}"
    html = ("<html><body><p>Win a prize</p><script>document.title='pwned'</script>"
            "<img src=\"http://tracker.invalid/x.png\"></body></html>")
    message = make_message(subject, body=html, extra_headers=["Content-Type: text/html; charset=utf-8"])
    smtp_send(srv, address, message)
    wait_for(lambda: subject in srv.cli_ok("quarantine", "list").stdout, "the quarantine")

    log_in(page)
    page.get_by_role("link", name="Quarantine").click()
    shot(page, "quarantine")
    page.locator("main table a").first.click()
    # Active content neutralised: the message's HTML is text, nothing of it runs or loads.
    text = page.locator("main").inner_text()
    assert "Win a prize" in text and subject in text, text
    assert page.locator("main img").count() == 0 and page.locator("script").count() == 0
    assert page.title() != "pwned"
    shot(page, "quarantine-message")

    page.get_by_role("button", name="Release (deliver)").click()
    assert "released, 1 recipient(s) queued" in page.get_by_role("status").inner_text()
    wait_for(lambda: any(subject_of(m) == subject for m in fetch_all(srv, name, password)), "delivery after the release")
    assert re.search(r"WC .*from=boss .*quarantine \d+: released", journal(srv)), journal(srv)


def test_a_forged_csrf_token_is_refused(console, page):
    srv = console
    log_in(page)
    page.get_by_role("link", name="Users").click()
    page.get_by_label("User name").fill("mallory")
    page.get_by_label("Address").fill("mallory@example.test")
    page.locator("form[action='/users'] input[name=csrf]").evaluate("e => e.value = 'f'.repeat(64)")
    with page.expect_navigation() as nav:
        page.get_by_role("button", name="Add user").click()
    assert nav.value.status == 403
    assert "security token" in page.locator("main").inner_text()
    shot(page, "csrf-refused")
    assert srv.cli("user", "show", "mallory").returncode != 0, "nothing changed"

    # The same post without any token, from the session's own cookie jar.
    r = page.request.post("/users", form={"name": "mallory", "address": "mallory@example.test"}, max_redirects=0)
    assert r.status == 403
    assert srv.cli("user", "show", "mallory").returncode != 0
    assert "WC" not in journal(srv, "--code", "WC")


def test_repeated_wrong_passwords_lock_the_login(console, page, make_server):
    srv = console
    for _ in range(5):  # [penalty] login_failures
        assert log_in(page, password="wrong-password").status == 401
        assert "Wrong user name or password" in page.get_by_role("alert").inner_text()
    # Now even the right password is refused until the cool-down ends.
    assert log_in(page).status == 429
    assert "Too many failed logins" in page.get_by_role("alert").inner_text()
    shot(page, "locked-out")
    rows = journal(srv, "--code", "WF")
    assert "cool-down started" in rows and "refused during a cool-down" in rows, rows

    # Not an administrator: refused exactly like a wrong password (on a server of its own, so the
    # lock above does not decide).
    other = make_server(admin={"listen": ["127.0.0.1:0"]})
    other.add_user(*SAM)
    host, port = other.listeners["admin"]
    page.goto(f"https://{host}:{port}/login")
    page.get_by_label("User name").fill(SAM[0])
    page.get_by_label("Password").fill(SAM[2])
    with page.expect_navigation() as nav:
        page.get_by_role("button", name="Log in").click()
    assert nav.value.status == 401


def test_every_page_has_labels_and_works_from_the_keyboard(console, page):
    srv = console
    srv.add_user(*SAM)
    log_in(page)
    for path, name in [("/login", "login"), ("/", "dashboard"), ("/queue", "queue"), ("/trace", "trace"),
                       ("/quarantine", "quarantine"), ("/users", "users"), ("/users/sam", "user")]:
        page.goto(path)
        fields = page.locator("input:not([type=hidden]), select, textarea")
        ids = [fields.nth(i).get_attribute("id") for i in range(fields.count())]
        for field_id in ids:
            assert field_id, f"{path}: a form field without an id"
            assert page.locator(f"label[for='{field_id}']").count() == 1, f"{path}: no label for #{field_id}"
        # Tab from the top reaches every field and every button, in order.
        page.locator("body").focus()
        reached = []
        for _ in range(80):
            page.keyboard.press("Tab")
            reached.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        missing = [i for i in ids if i not in reached]
        assert not missing, f"{path}: Tab never reaches {missing}"
        assert "BUTTON" in reached or path == "/login" or not page.locator("button").count()
        # Usable on a phone: nothing wider than the screen but the tables' own scroll boxes.
        page.set_viewport_size({"width": 375, "height": 800})
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{path} scrolls sideways on a phone ({overflow}px)"
        shot(page, f"phone-{name}")
        page.set_viewport_size({"width": 1200, "height": 900})
