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

    # The dashboard's rates per minute (sampled every 15 s; shown once there are 10 s of
    # history) count the message just received.
    def rate_shown():
        page.goto("/")
        cell = page.locator("#rate-received")
        return cell.count() == 1 and float(cell.inner_text()) > 0
    wait_for(rate_shown, "a rate of messages received on the dashboard", timeout=30)
    assert "Per minute, last" in page.locator("main").inner_text()
    shot(page, "dashboard-rates")

    page.get_by_role("link", name="Queue", exact=True).click()
    assert page.get_by_role("heading", name="Queue").is_visible()
    shot(page, "queue")

    # Logging out ends the session on the server, not only in the browser.
    page.get_by_role("button", name=re.compile("Log out")).click()
    assert page.url.endswith("/login")
    page.goto("/users")
    assert page.url.endswith("/login")


def test_the_dashboard_refreshes_itself(console, page):
    """The dashboard's one script fetches it again every 15 s (CSP: script-src 'self' only)."""
    srv = console
    log_in(page)
    page.goto("/")
    before = float(page.locator("#total-received").inner_text())
    subject = f"live refresh {time.monotonic_ns()}"
    smtp_send(srv, "boss@example.test", make_message(subject, to="boss@example.test"))
    # No navigation from here: only the script can change what the page shows.
    # (Polled from here: the CSP refuses Playwright's own evaluated scripts, as it should.)
    wait_for(lambda: float(page.locator("#total-received").inner_text()) > before, "the dashboard's own refresh", timeout=40)
    shot(page, "dashboard-refreshed")


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
                       ("/quarantine", "quarantine"), ("/users", "users"), ("/users/sam", "user"),
                       ("/domains", "domains"), ("/aliases", "aliases"), ("/lists", "lists"),
                       ("/explain", "explain"), ("/dkim", "dkim"), ("/filters", "filters")]:
        page.goto(path)
        fields = page.locator("input:not([type=hidden]), select, textarea")
        ids = [fields.nth(i).get_attribute("id") for i in range(fields.count())]
        for field_id in ids:
            assert field_id, f"{path}: a form field without an id"
            assert page.locator(f"label[for='{field_id}']").count() == 1, f"{path}: no label for #{field_id}"
        # Tab from the top reaches every field and every button, in order.
        page.locator("body").focus()
        reached = []
        for _ in range(120):
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


def test_full_name_addresses_and_forwarding_on_the_user_page(console, page):
    srv = console
    srv.cli_ok("user", "add", "dora", "--address", "dora@example.test")
    log_in(page)
    page.goto("/users/dora")
    page.get_by_label("Full name").fill("Dora Marquez")
    page.get_by_role("button", name="Set full name").click()
    page.get_by_label("Address", exact=True).fill("d.marquez@example.test")
    page.get_by_role("button", name="Add address").click()
    page.get_by_role("button", name="Make d.marquez@example.test the preferred address").click()
    assert page.get_by_role("status").inner_text() == "User dora: d.marquez@example.test is the preferred address."
    page.get_by_role("button", name="Remove dora@example.test").click()
    page.get_by_label("Forward mail to").fill("dora@remote.example")
    page.get_by_label("Keep a copy in the mailbox").check()
    page.get_by_role("button", name="Set forwarding").click()
    shot(page, "user-extras")
    show = srv.cli_ok("user", "show", "dora").stdout
    assert "Dora Marquez" in show, show
    assert "d.marquez@example.test (preferred)" in show and "dora@example.test" not in show.replace("d.marquez@", ""), show
    assert "dora@remote.example (keeps a copy)" in show, show
    log = journal(srv)
    for change in ["full name changed", "address dora@example.test removed", "mail forwarded to dora@remote.example, a copy kept"]:
        assert re.search(rf"WC .*from=boss .*user dora: {re.escape(change)}", log), (change, log)


def test_add_and_remove_a_domain(console, page):
    srv = console
    log_in(page)
    page.get_by_role("link", name="Domains").click()
    assert "example.test" in page.locator("main table").inner_text(), "the configured domain is listed"
    page.get_by_label("Domain name").fill("branch.example.org")
    page.get_by_role("button", name="Add domain").click()
    assert page.get_by_role("status").inner_text() == "Domain branch.example.org added."
    assert "branch.example.org" in srv.cli_ok("domain", "list").stdout
    assert re.search(r"WC .*from=boss .*domain branch.example.org added by boss", journal(srv)), journal(srv)
    shot(page, "domains")
    page.get_by_role("button", name="Remove domain branch.example.org").click()
    assert page.get_by_role("status").inner_text() == "Domain branch.example.org removed."
    assert "branch.example.org" not in srv.cli_ok("domain", "list").stdout
    assert re.search(r"WC .*from=boss .*domain branch.example.org removed by boss", journal(srv)), journal(srv)


def test_add_an_alias_and_remove_a_member(console, page):
    srv = console
    srv.add_user(*SAM)
    log_in(page)
    page.get_by_role("link", name="Aliases").click()
    page.get_by_label("Alias address").fill("sales@example.test")
    page.get_by_label("Members (addresses").fill("SamJones@example.test, boss@example.test")
    page.get_by_role("button", name="Add members").click()
    assert "sales@example.test" in page.get_by_role("status").inner_text()
    listed = srv.cli_ok("alias", "list").stdout
    assert re.search(r"sales@example.test\t.*boss@example.test", listed), listed
    shot(page, "aliases")
    page.get_by_role("button", name="Remove member boss@example.test from sales@example.test").click()
    assert "member boss@example.test removed" in page.get_by_role("status").inner_text()
    listed = srv.cli_ok("alias", "list").stdout
    assert "sales@example.test" in listed and "boss@example.test" not in listed, listed
    assert re.search(r"WC .*from=boss .*alias sales@example.test: member boss@example.test removed by boss", journal(srv))


def test_access_lists_add_and_remove(console, page):
    srv = console
    log_in(page)
    page.get_by_role("link", name="Access lists").click()
    page.get_by_label("Add to relay").fill("192.0.2.0/24")
    page.get_by_role("button", name="Add to relay").click()
    assert "Relay list: added 192.0.2.0" in page.get_by_role("status").inner_text()
    assert "192.0.2.0" in srv.cli_ok("list", "show", "relay").stdout
    assert re.search(r"WC .*from=boss .*relay list: added 192.0.2.0\S* by boss", journal(srv)), journal(srv)
    page.get_by_label("Add to kill").fill("@spam.example")
    page.get_by_role("button", name="Add to kill").click()
    assert "spam.example" in srv.cli_ok("list", "show", "kill").stdout
    # A bad entry is refused with the library's reason and changes nothing.
    page.get_by_label("Add to reject").fill("not an address")
    with page.expect_navigation() as nav:
        page.get_by_role("button", name="Add to reject").click()
    assert nav.value.status == 422
    page.go_back()
    page.reload()
    shot(page, "lists")
    page.get_by_role("button", name=re.compile("Remove 192.0.2.0.* from the relay list")).click()
    assert "Relay list: removed" in page.get_by_role("status").inner_text()
    assert "192.0.2.0" not in srv.cli_ok("list", "show", "relay").stdout
    assert re.search(r"WC .*from=boss .*relay list: removed 192.0.2.0\S* by boss", journal(srv)), journal(srv)


def test_explain_answers_as_the_cli_does(console, page):
    srv = console
    srv.add_user(*SAM)
    srv.cli_ok("list", "add", "reject", "198.51.100.7")
    log_in(page)
    page.get_by_role("link", name="Explain").click()
    page.get_by_label("Client address").fill("198.51.100.7")
    page.get_by_label("HELO name").fill("client.example")
    page.get_by_label("Sender").fill(JANE)
    page.get_by_label("Recipients").fill(SAM[1])
    page.get_by_role("button", name="Explain").click()
    answer = page.locator("main section").inner_text()
    assert "refused" in answer, answer
    cli = srv.cli("explain", "--ip", "198.51.100.7", "--helo", "client.example", "--from", JANE, "--to", SAM[1])
    assert cli.returncode == 1, cli.stdout
    for line in cli.stdout.splitlines():
        if line.startswith(("connect:", "recipient", "sender")):
            assert line in answer, f"{line!r} not in the console's answer:\n{answer}"
    assert "connect: refuse" in answer
    shot(page, "explain")


def test_make_a_dkim_key_and_see_its_record(console, page):
    srv = console
    log_in(page)
    page.get_by_role("link", name="DKIM keys").click()
    page.get_by_label("Local domain").fill("example.test")
    page.get_by_label("Algorithm").select_option("ed25519")
    page.get_by_role("button", name="Make a key").click()
    assert "key for example.test made" in page.get_by_role("status").inner_text()
    listed = srv.cli_ok("dkim", "list").stdout
    selector = next(line.split()[1] for line in listed.splitlines() if line.startswith("example.test"))
    text = page.locator("main").inner_text()
    assert f"{selector}._domainkey.example.test" in text and "v=DKIM1" in text and "k=ed25519" in text, text
    assert re.search(rf"WC .*from=boss .*DKIM ed25519-sha256 key for example.test made, selector {selector} by boss", journal(srv))
    shot(page, "dkim")
    # Only local domains get keys.
    page.get_by_label("Local domain").fill("elsewhere.example")
    with page.expect_navigation() as nav:
        page.get_by_role("button", name="Make a key").click()
    assert nav.value.status == 422


def test_add_and_remove_a_filter(console, page):
    srv = console
    log_in(page)
    page.get_by_role("link", name="Filters").click()
    page.get_by_label("Match on").select_option("attachment")
    page.get_by_label("Pattern").fill("*.vbs")
    page.get_by_label("Action").select_option("discard")
    page.get_by_role("button", name="Add filter").click()
    assert "attachment *.vbs -> discard" in page.get_by_role("status").inner_text()
    listed = srv.cli_ok("filter", "list").stdout
    assert re.search(r"attachment \*\.vbs\s+discard", listed), listed
    rule_id = re.search(r"^\s*(\d+)\s+attachment", listed, re.M).group(1)
    assert re.search(rf"WC .*from=boss .*filter {rule_id} added: attachment \*\.vbs -> discard by boss", journal(srv))
    shot(page, "filters")
    page.get_by_role("button", name=f"Remove filter {rule_id}").click()
    assert f"Filter {rule_id} removed" in page.get_by_role("status").inner_text()
    assert "no filters" in srv.cli_ok("filter", "list").stdout
