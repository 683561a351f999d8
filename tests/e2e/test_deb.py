"""The Debian package and the systemd unit (issue 15: service, Debian package).

test_deb_install_serve_purge builds the .deb with cargo-deb from the binary under test (no
release build: `cargo deb --no-build --profile dev --strip`, seconds instead of minutes; `make
deb` makes the real one from a release build), installs it with dpkg, runs the installed binary
as the `postroom` user the package made — with CAP_NET_BIND_SERVICE as an ambient capability
through setpriv, as the unit's AmbientCapabilities gives it, since this machine runs no systemd —
on privileged ports of 127.0.0.1, receives a message over SMTP and one through /usr/sbin/sendmail
from an unprivileged user, serves both over POP3, reloads on SIGHUP; then removes and purges the
package and checks that the machine is as it was. Another mail transport agent on the machine
(the test suite installs postfix for its smtp-sink) stays installed: the package conflicts with
it, as Debian's MTAs conflict with each other, so the test shows that plain `dpkg -i` refuses,
then diverts the other MTA's /usr/sbin/sendmail for the duration and installs with
--force-conflicts, and puts everything back.
"""

from __future__ import annotations

import hashlib
import os
import poplib
import pwd
import grp
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import BIN, CLIENT_NAME, JANE, REPO, make_message, subject_of

UNIT = REPO / "etc" / "postroom.service"
PKG = "postroom"
DATA = Path("/var/lib/postroom")
RUN = Path("/run/postroom")
MTA_FILES = ["/usr/sbin/sendmail", "/usr/lib/sendmail"]
SAM = ("sam", "SamJones@example.test", "sam-secret-1")
CAP_NET_BIND_SERVICE = 1 << 10


def run(*args, check: bool = True, input: str | None = None, timeout: float = 300, env=None):
    r = subprocess.run([str(a) for a in args], input=input, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, f"`{' '.join(map(str, args))}` exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def package_status(name: str) -> str:
    r = run("dpkg-query", "-W", "-f=${Status}", name, check=False)
    return r.stdout.strip() if r.returncode == 0 else "not-installed"


def owners(path: str) -> set[str]:
    """The packages that ship `path` (while a diversion is in place, both the diverting package
    and the one whose file was diverted)."""
    r = run("dpkg", "-S", path, check=False)
    for line in r.stdout.splitlines():
        if not line.startswith("diversion by"):
            return set(line.split(":", 1)[0].split(", "))
    return set()


def fingerprint(path: str):
    """What is at `path`: a link's target, a file's hash, or None."""
    p = Path(path)
    if p.is_symlink():
        return ("link", os.readlink(p))
    if p.is_file():
        return ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return None


def free_privileged_port(taken: set[int]) -> int:
    for port in range(999, 600, -1):
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no free privileged port on 127.0.0.1 in 601..999")


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def as_postroom(*args, input: str | None = None, check: bool = True, config: Path | str = "/etc/postroom/postroom.toml"):
    """The administrator's way (README): `sudo -u postroom postroom --config FILE ...`."""
    return run("runuser", "-u", "postroom", "--", "/usr/bin/postroom", "--config", config, *args, input=input, check=check)


class Notify:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET, reachable by postroom."""

    def __init__(self, directory: Path):
        self.path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o666)
        self.sock.settimeout(30)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


def test_unit_file(tmp_path):
    """The unit: Type=notify, the postroom user, CAP_NET_BIND_SERVICE and the hardening the
    package promises; `systemd-analyze verify` accepts it (with ExecStart pointing at the
    binary under test, since /usr/bin/postroom exists only when the package is installed)."""
    text = UNIT.read_text()
    directives = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            directives.setdefault(k.strip(), []).append(v.strip())
    want = {
        "Type": "notify",
        "User": "postroom",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/postroom",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "ExecStart": "/usr/bin/postroom --config /etc/postroom/postroom.toml serve",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "RuntimeDirectory": "postroom",
        "StateDirectory": "postroom",
    }
    for key, value in want.items():
        assert value in directives.get(key, []), f"{key}={value} missing from {UNIT}: {directives.get(key)}"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd): the unit's directives are checked, not verified")
    copy = tmp_path / "postroom.service"
    copy.write_text(text.replace("/usr/bin/postroom", str(BIN)))
    r = run(analyze, "verify", copy, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), f"systemd-analyze verify: {r.returncode}\n{r.stdout}{r.stderr}"


def build_deb(out: Path) -> Path:
    """cargo-deb from the binary under test: no build, stripped, quick compression."""
    profile = "release" if BIN.parent.name == "release" else "dev"
    r = run("cargo", "deb", "-p", "postroom", "--no-build", "--profile", profile, "--strip", "--fast", "-o", out, timeout=600)
    debs = sorted(out.glob("postroom_*.deb"))
    assert len(debs) == 1, f"cargo deb made {debs}\n{r.stdout}{r.stderr}"
    return debs[0]


@pytest.mark.timeout(900)
def test_deb_install_serve_purge(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("installing a package needs root")
    for tool in ("dpkg", "dpkg-deb", "dpkg-divert", "setpriv", "runuser", "deluser"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: not a Debian machine")
    if shutil.which("cargo-deb") is None:
        pytest.fail("cargo-deb is not installed: `cargo install cargo-deb --locked` (.ci/run does)", pytrace=False)
    if package_status(PKG) != "not-installed" and "not-installed" not in package_status(PKG):
        pytest.skip(f"a {PKG} package is on this machine ({package_status(PKG)}): not touching it")
    if user_exists("postroom") or group_exists("postroom") or DATA.exists() or RUN.exists():
        pytest.skip("a postroom user or group, /var/lib/postroom or /run/postroom exists here: not touching them")

    deb = build_deb(tmp_path / "deb")

    # -- the package: what Debian users expect of a mail transport agent
    fields = {f: run("dpkg-deb", "-f", deb, f).stdout.strip() for f in ("Package", "Provides", "Conflicts", "Replaces", "Depends", "Section")}
    assert fields["Package"] == PKG
    for f in ("Provides", "Conflicts", "Replaces"):
        assert "mail-transport-agent" in fields[f], fields
    assert "adduser" in fields["Depends"] and fields["Section"] == "mail", fields
    listing = run("dpkg-deb", "-c", deb).stdout
    for path in ("./usr/bin/postroom", "./usr/sbin/sendmail", "./etc/postroom/postroom.toml", "/systemd/system/postroom.service"):
        assert path in listing, f"{path} is not in the package:\n{listing}"
    assert re.search(r"\./usr/lib/sendmail -> \.\./sbin/sendmail", listing), listing
    control = tmp_path / "control"
    run("dpkg-deb", "-e", deb, control)
    assert (control / "conffiles").read_text().split() == ["/etc/postroom/postroom.toml"]

    # -- what is here now, to be found again at the end
    others = {path: owners(path) for path in MTA_FILES}
    others = {path: pkgs for path, pkgs in others.items() if pkgs}
    found = {path: fingerprint(path) for path in MTA_FILES}
    other_status = {pkg: package_status(pkg) for pkgs in others.values() for pkg in pkgs}
    diversions_before = run("dpkg-divert", "--list").stdout

    work = Path(tempfile.mkdtemp(prefix="postroom-deb-"))
    os.chmod(work, 0o755)
    diverted: list[str] = []
    proc = None
    log = work / "serve.log"
    try:
        # -- install
        if others:
            r = run("dpkg", "-i", deb, check=False)
            assert r.returncode != 0 and "conflicting packages" in r.stdout + r.stderr, (
                f"dpkg -i installed {PKG} beside {sorted(other_status)}: it must conflict with "
                f"mail-transport-agent\n{r.stdout}{r.stderr}")
            assert {pkg: package_status(pkg) for pkg in other_status} == other_status, "the other MTA was touched"
            for path in others:
                run("dpkg-divert", "--package", PKG, "--add", "--rename", "--divert", f"{path}.postroom-test", path)
                diverted.append(path)
            run("dpkg", "-i", "--force-conflicts", deb)
        else:
            run("dpkg", "-i", deb)
        assert package_status(PKG) == "install ok installed"

        # -- what postinst made: the system user and its 0700 data directory
        user = pwd.getpwnam("postroom")
        assert user.pw_uid < 1000 and user.pw_dir == str(DATA) and user.pw_shell.endswith("nologin"), user
        assert grp.getgrgid(user.pw_gid).gr_name == "postroom"
        st = DATA.stat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)
        assert PKG in owners("/usr/sbin/sendmail") and os.access("/usr/sbin/sendmail", os.X_OK)
        assert os.readlink("/usr/lib/sendmail") == "../sbin/sendmail"
        # The shipped configuration passes `config check` as the service user.
        as_postroom("config", "check")
        unit = next(line for line in run("dpkg", "-L", PKG).stdout.splitlines() if line.endswith("/postroom.service"))
        if shutil.which("systemd-analyze"):
            r = run("systemd-analyze", "verify", unit, check=False)
            assert r.returncode == 0 and not r.stderr.strip(), f"systemd-analyze verify {unit}:\n{r.stdout}{r.stderr}"

        # -- run it as the unit would: user postroom, CAP_NET_BIND_SERVICE ambient, Type=notify
        smtp_port = free_privileged_port(set())
        pop3_port = free_privileged_port({smtp_port})
        # The administrator edits the conffile (README): here, privileged ports of 127.0.0.1 and the
        # test's domain; /usr/sbin/sendmail reads the same file.
        config = Path("/etc/postroom/postroom.toml")
        config.write_text(
            'data_dir = "/var/lib/postroom"\nhostname = "mail.example.test"\ndomains = ["example.test"]\n'
            'postmaster = "admin@example.test"\n'
            f'[smtp]\nlisten = ["127.0.0.1:{smtp_port}"]\nsubmission_listen = []\ntls_listen = []\n'
            'local_socket = "/run/postroom/sendmail.sock"\n'
            f'[pop3]\nlisten = ["127.0.0.1:{pop3_port}"]\ntls_listen = []\n'
            '[dns]\nservers = ["127.0.0.1:9"]\n[auth]\nchecks = false\n[storage]\nmin_free_mb = 0\n')
        # systemd makes it for the service (RuntimeDirectory=postroom, mode 0755).
        RUN.mkdir(mode=0o755)
        os.chown(RUN, user.pw_uid, user.pw_gid)
        os.chmod(RUN, 0o755)
        as_postroom("user", "add", SAM[0], "--address", SAM[1], "--password-stdin", input=SAM[2] + "\n", config=config)
        notify = Notify(work)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["setpriv", "--reuid=postroom", "--regid=postroom", "--init-groups", "--no-new-privs",
                 "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service",
                 "--", "/usr/bin/postroom", "--config", str(config), "serve"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd="/")
        try:
            ready = notify.next()
        except socket.timeout:
            raise AssertionError(f"no READY=1 within 30 s:\n{log.read_text(errors='replace')}") from None
        assert ready.get("READY") == "1", ready
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uids = re.search(r"(?m)^Uid:\s+(.*)$", status).group(1).split()
        assert set(uids) == {str(user.pw_uid)}, f"not running as postroom: Uid {uids}"
        cap_eff = int(re.search(r"(?m)^CapEff:\s+([0-9a-f]+)$", status).group(1), 16)
        assert cap_eff == CAP_NET_BIND_SERVICE, f"effective capabilities {cap_eff:#x}, want only CAP_NET_BIND_SERVICE"

        # -- mail in over SMTP on a privileged port, and through /usr/sbin/sendmail from any user
        with smtplib.SMTP("127.0.0.1", smtp_port, local_hostname=CLIENT_NAME, timeout=30) as s:
            s.sendmail(JANE, [SAM[1]], make_message("over smtp on a privileged port", to=SAM[1]))
        message = f"To: {SAM[1]}\nSubject: through /usr/sbin/sendmail\n\nFrom a local user.\n"
        r = run("runuser", "-u", "nobody", "--", "/usr/sbin/sendmail", "-t", input=message, check=False)
        assert r.returncode == 0, f"/usr/sbin/sendmail as nobody exited {r.returncode}: {r.stdout}{r.stderr}\n{log.read_text(errors='replace')}"

        # -- and out over POP3
        want = {"over smtp on a privileged port", "through /usr/sbin/sendmail"}
        deadline = time.monotonic() + 30
        while True:
            p = poplib.POP3("127.0.0.1", pop3_port, timeout=30)
            try:
                p.user(SAM[0])
                p.pass_(SAM[2])
                subjects = {subject_of(b"\r\n".join(p.retr(i)[1]) + b"\r\n") for i in range(1, p.stat()[0] + 1)}
            finally:
                p.quit()
            if want <= subjects:
                break
            assert time.monotonic() < deadline, f"POP3 shows {subjects}, want {want}\n{log.read_text(errors='replace')}"
            time.sleep(0.3)

        # -- the administrator: as postroom it works, as root the data directory is refused
        assert "sam" in as_postroom("user", "list", config=config).stdout
        r = run("/usr/bin/postroom", "--config", config, "user", "list", check=False)
        assert r.returncode != 0 and "uid" in r.stderr, (r.returncode, r.stdout, r.stderr)

        # -- systemctl reload, then stop
        proc.send_signal(signal.SIGHUP)
        assert notify.next().get("RELOADING") == "1"
        assert notify.next().get("READY") == "1"
        proc.send_signal(signal.SIGTERM)
        assert notify.next().get("STOPPING") == "1"
        assert proc.wait(30) == 0, log.read_text(errors="replace")
        proc = None

        # -- remove keeps the configuration and the mail; purge the configuration only
        run("dpkg", "--remove", PKG)
        assert package_status(PKG) == "deinstall ok config-files"
        assert not Path("/usr/bin/postroom").exists() and not Path("/usr/sbin/sendmail").exists()
        assert Path("/etc/postroom/postroom.toml").is_file() and (DATA / "postroom.db").is_file()
        r = run("dpkg", "--purge", PKG)
        assert package_status(PKG) == "not-installed" or "not-installed" in package_status(PKG)
        assert not Path("/etc/postroom").exists(), list(Path("/etc/postroom").iterdir())
        # README: purge keeps the mail and the user that owns it, and says so.
        assert (DATA / "postroom.db").is_file() and user_exists("postroom")
        assert "/var/lib/postroom" in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if package_status(PKG) not in ("not-installed",) and "not-installed" not in package_status(PKG):
            run("dpkg", "--purge", PKG, check=False)
        for path in diverted:
            run("dpkg-divert", "--package", PKG, "--remove", "--rename", "--divert", f"{path}.postroom-test", path, check=False)
        shutil.rmtree(RUN, ignore_errors=True)
        # README: what purge keeps goes with these two commands.
        shutil.rmtree(DATA, ignore_errors=True)
        if user_exists("postroom"):
            run("deluser", "--system", "--quiet", "postroom", check=False)
        if group_exists("postroom"):
            run("delgroup", "--system", "--quiet", "postroom", check=False)
        shutil.rmtree(work, ignore_errors=True)

    # -- the machine as it was found
    assert {path: owners(path) for path in MTA_FILES if owners(path)} == others
    assert {path: fingerprint(path) for path in MTA_FILES} == found
    assert {pkg: package_status(pkg) for pkg in other_status} == other_status
    assert run("dpkg-divert", "--list").stdout == diversions_before
    assert not user_exists("postroom") and not group_exists("postroom"), "the postroom user or group is left"
    assert not DATA.exists() and not RUN.exists()
