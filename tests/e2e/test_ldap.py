"""The address book over LDAP (SPEC O5, issue 18), searched with Debian's `ldapsearch`
(ldap-utils) as a mail program's address book would: StartTLS (-ZZ) or ldaps://, the server's
generated certificate trusted through LDAPTLS_CACERT. Loopback only; no DNS lookups.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from helpers import Server

LDAPSEARCH = shutil.which("ldapsearch")
pytestmark = pytest.mark.skipif(LDAPSEARCH is None, reason="ldapsearch is not installed (apt-get install ldap-utils)")

BASE = "dc=example,dc=test"
SAM_DN = f"uid=sam,ou=people,{BASE}"
# What Thunderbird sends for "smi" typed into the address book.
THUNDERBIRD = "(|(cn=*smi*)(mail=*smi*)(sn=*smi*)(givenName=*smi*))"
PENALTY = {"login_failures": 3, "login_window_minutes": 15, "deny_minutes": 10}


class LdapServer(Server):
    def expected_listeners(self) -> set[str]:
        return {"smtp", "pop3", "ldap", "ldaps"}


@pytest.fixture
def make_ldap_server(tmp_path, request):
    """make_ldap_server(ldap={...}, penalty={...}): a server with ldap (StartTLS) and ldaps on
    127.0.0.1 and four users: sam and ann (both Smiths), bob, and dis (disabled)."""
    servers: list[Server] = []
    request.node.postroom_servers = servers

    def _make(**overrides) -> Server:
        ldap = {"listen": ["127.0.0.1:0"], "tls_listen": ["127.0.0.1:0"], **overrides.pop("ldap", {})}
        srv = LdapServer(tmp_path / f"server{len(servers) + 1}", {"ldap": ldap, **overrides})
        servers.append(srv)
        srv.start()
        users = [
            ("sam", "Sam Smith", ["sam@example.test", "SamJones@example.test"], "sam-secret-1"),
            ("ann", "Ann Smithers", ["ann@example.test"], "ann-secret-2"),
            ("bob", "Bob Jones", ["bob@example.test"], "bob-secret-3"),
            ("dis", "Dis Smithson", ["dis@example.test"], "dis-secret-4"),
        ]
        for name, full, addresses, password in users:
            args = ["user", "add", name, "--name", full, "--password-stdin"]
            for a in addresses:
                args += ["--address", a]
            srv.cli_ok(*args, input=password + "\n")
        srv.cli_ok("user", "disable", "dis")
        srv.cli_ok("alias", "add", "staff@example.test", "sam@example.test", "bob@example.test", "far@remote.example")
        return srv

    yield _make
    for srv in servers:
        srv.stop()


def ldapsearch(srv: Server, *args: str, tls: str = "starttls", bind: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ldapsearch against srv: tls is "starttls" (-ZZ on ldap://), "ldaps" or "none"."""
    name = "ldaps" if tls == "ldaps" else "ldap"
    host, port = srv.listeners[name]
    url = f"{name}://{host}:{port}"
    cmd = [LDAPSEARCH, "-LLL", "-x", "-o", "nettimeout=10", "-H", url]
    if tls == "starttls":
        cmd.append("-ZZ")
    if bind:
        cmd += ["-D", bind[0], "-w", bind[1]]
    env = {
        **os.environ,
        "LDAPTLS_CACERT": str(srv.data_dir / "tls-cert.pem"),
        "LDAPTLS_REQCERT": "demand",
        # /etc/ldap/ldap.conf may not change what is tested (LDAPNOINIT would also ignore the
        # two variables above).
        "LDAPCONF": "/dev/null",
    }
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=30, env=env)


def entries(ldif: str) -> dict[str, dict[str, list[str]]]:
    """LDIF (-LLL, unwrapped with -o ldif-wrap=no) as {dn: {attr: [values]}}."""
    out: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in ldif.splitlines():
        if not line.strip():
            current = None
            continue
        attr, _, value = line.partition(": ")
        if attr == "dn":
            current = out.setdefault(value, {})
        elif current is not None:
            current.setdefault(attr, []).append(value)
    return out


def result_code(r: subprocess.CompletedProcess) -> int:
    """ldapsearch exits with the LDAP result code of the bind or the search."""
    return r.returncode


def test_thunderbird_search_over_starttls_and_ldaps(make_ldap_server):
    """O5: a bind with the DN (StartTLS) or the address (LDAPS) and the mail password, then
    Thunderbird's substring search: the Smiths with cn, sn, givenName and every address."""
    srv = make_ldap_server()
    for tls, who in (("starttls", SAM_DN), ("ldaps", "SamJones@example.test")):
        r = ldapsearch(srv, "-o", "ldif-wrap=no", "-b", BASE, THUNDERBIRD, "cn", "sn", "givenName", "mail", tls=tls, bind=(who, "sam-secret-1"))
        assert r.returncode == 0, r.stderr
        found = entries(r.stdout)
        assert set(found) == {SAM_DN, f"uid=ann,ou=people,{BASE}"}, r.stdout
        sam = found[SAM_DN]
        assert sam["cn"] == ["Sam Smith"] and sam["sn"] == ["Smith"] and sam["givenName"] == ["Sam"], sam
        assert sorted(sam["mail"]) == ["sam@example.test", "samjones@example.test"], sam


def test_disabled_users_are_absent_and_cannot_bind(make_ldap_server):
    srv = make_ldap_server()
    r = ldapsearch(srv, "-b", BASE, "(uid=*)", "uid", bind=(SAM_DN, "sam-secret-1"))
    assert r.returncode == 0, r.stderr
    uids = set(re.findall(r"^uid: (\S+)$", r.stdout, re.M))
    assert uids == {"sam", "ann", "bob"}, r.stdout
    r = ldapsearch(srv, "-b", BASE, "(uid=dis)", bind=("dis@example.test", "dis-secret-4"))
    assert result_code(r) == 49, (r.returncode, r.stderr)


def test_bind_without_tls_is_refused(make_ldap_server):
    """RFC 4513 §6.3.1: a password over plain LDAP is refused (13) before it is looked at."""
    srv = make_ldap_server()
    r = ldapsearch(srv, "-b", BASE, "(uid=sam)", tls="none", bind=(SAM_DN, "sam-secret-1"))
    assert result_code(r) == 13, (r.returncode, r.stderr)
    assert "TLS" in r.stderr, r.stderr


def test_wrong_password_is_refused_then_throttled_like_pop3(make_ldap_server):
    """A5: 49 for a wrong password, journaled (LF); after login_failures of them even the right
    password is refused for a while."""
    srv = make_ldap_server(penalty=PENALTY)
    for _ in range(3):
        r = ldapsearch(srv, "-b", BASE, "(uid=sam)", bind=(SAM_DN, "wrong"))
        assert result_code(r) == 49, (r.returncode, r.stderr)
    r = ldapsearch(srv, "-b", BASE, "(uid=sam)", bind=(SAM_DN, "sam-secret-1"))
    assert result_code(r) not in (0, 49), (r.returncode, r.stdout, r.stderr)
    journal = srv.cli_ok("journal").stdout
    assert len([ln for ln in journal.splitlines() if " LF " in f" {ln} " or "LF" in ln.split()]) >= 3, journal


def test_anonymous_search_only_from_listed_networks(make_ldap_server):
    """Anonymous clients read the root DSE anywhere, search only from anonymous_networks."""
    closed = make_ldap_server()
    r = ldapsearch(closed, "-b", BASE, THUNDERBIRD, tls="none")
    assert result_code(r) == 50, (r.returncode, r.stdout, r.stderr)
    assert "anonymous_networks" in r.stderr, r.stderr
    # The root DSE (RFC 4512 §5.1): where the book is, LDAPv3, StartTLS.
    r = ldapsearch(closed, "-s", "base", "-b", "", "(objectClass=*)", "+", tls="none")
    assert r.returncode == 0, r.stderr
    assert f"namingContexts: {BASE}" in r.stdout, r.stdout
    assert "supportedLDAPVersion: 3" in r.stdout and "supportedExtension: 1.3.6.1.4.1.1466.20037" in r.stdout, r.stdout

    listed = make_ldap_server(ldap={"anonymous_networks": ["127.0.0.0/8"]})
    r = ldapsearch(listed, "-b", BASE, THUNDERBIRD, "mail", tls="none")
    assert r.returncode == 0, r.stderr
    assert set(entries(r.stdout)) == {SAM_DN, f"uid=ann,ou=people,{BASE}"}, r.stdout


def test_size_limit(make_ldap_server):
    """[ldap] size_limit: that many entries, then sizeLimitExceeded (4)."""
    srv = make_ldap_server(ldap={"size_limit": 2})
    r = ldapsearch(srv, "-b", f"ou=people,{BASE}", "-s", "one", "(objectClass=*)", "uid", bind=(SAM_DN, "sam-secret-1"))
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert len(entries(r.stdout)) == 2, r.stdout


def test_group_entry_names_its_local_members(make_ldap_server):
    srv = make_ldap_server()
    r = ldapsearch(srv, "-o", "ldif-wrap=no", "-b", f"ou=groups,{BASE}", "(cn=staff)", bind=("sam@example.test", "sam-secret-1"))
    assert r.returncode == 0, r.stderr
    group = entries(r.stdout)[f"cn=staff,ou=groups,{BASE}"]
    assert "groupOfNames" in group["objectClass"], group
    assert group["mail"] == ["staff@example.test"], group
    assert sorted(group["member"]) == [f"uid=bob,ou=people,{BASE}", SAM_DN], group


def test_user_set_name_shows_in_the_book_at_once(make_ldap_server):
    """The book is read from the store for every search: a new name shows without a restart."""
    srv = make_ldap_server()
    out = srv.cli_ok("user", "set", "bob", "--name", "Robert Q. Jones").stdout
    assert "Robert Q. Jones" in out, out
    assert "name:      Robert Q. Jones" in srv.cli_ok("user", "show", "bob").stdout
    r = ldapsearch(srv, "-o", "ldif-wrap=no", "-b", BASE, "(givenName=robert*)", "cn", "sn", "givenName", tls="ldaps", bind=(SAM_DN, "sam-secret-1"))
    assert r.returncode == 0, r.stderr
    bob = entries(r.stdout)[f"uid=bob,ou=people,{BASE}"]
    assert bob == {"cn": ["Robert Q. Jones"], "sn": ["Jones"], "givenName": ["Robert Q."]}, bob


def test_writes_are_refused(make_ldap_server):
    """The book is read-only: a modify is unwillingToPerform (53)."""
    ldapmodify = shutil.which("ldapmodify")
    if ldapmodify is None:
        pytest.skip("ldapmodify is not installed")
    srv = make_ldap_server()
    host, port = srv.listeners["ldaps"]
    change = f"dn: {SAM_DN}\nchangetype: modify\nreplace: cn\ncn: Mallory\n"
    env = {**os.environ, "LDAPTLS_CACERT": str(srv.data_dir / "tls-cert.pem"), "LDAPTLS_REQCERT": "demand", "LDAPCONF": "/dev/null"}
    r = subprocess.run([ldapmodify, "-x", "-H", f"ldaps://{host}:{port}", "-D", SAM_DN, "-w", "sam-secret-1"],
                       input=change, capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 53, (r.returncode, r.stderr)
