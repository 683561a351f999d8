"""SPEC D4 (issue 13 item 2): Postroom trusts only a data directory of its own, never writes through
a link someone planted in it, and refuses a private key other users may read.

* A data directory writable by group or others, owned by another user, or a symbolic link is
  refused with a message that names the path and the fix; one we own that is merely readable by
  others is tightened to 0700.
* `listening`, `status` and the generated certificate and key are written as new 0600 files
  (O_EXCL, O_NOFOLLOW) and renamed into place: a link planted as `.listening.tmp`, `status.tmp`
  or `tls-key.pem` is never written through.
* `[tls] key` with group or other permissions is refused, as OpenSSH refuses a loose key.
`config check` reports the same problems.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from conftest_tls import make_cert_pair, needs_openssl
from helpers import ServerError

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def refused(srv, timeout: float = 10.0) -> str:
    """Start `srv`, which must exit non-zero before it is ready; returns its stderr."""
    with pytest.raises(ServerError) as e:
        srv.start(ready_timeout=timeout)
    msg = str(e.value)
    assert "exited with status" in msg and "status 0 " not in msg, msg[-2000:]
    return msg


def victim(tmp_path: Path, name: str) -> Path:
    """A file of someone else's that a planted link points at."""
    v = tmp_path / "elsewhere" / name
    v.parent.mkdir(exist_ok=True)
    v.write_text(f"precious {name}\n")
    v.chmod(0o644)
    return v


def assert_untouched(v: Path) -> None:
    assert v.read_text() == f"precious {v.name}\n", f"written through a link: {v}"
    assert mode_of(v) == 0o644, f"{v} chmodded through a link: {mode_of(v):o}"


def assert_private_file(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), f"{path} is not a regular file (a link?)"
    assert stat.S_IMODE(st.st_mode) == 0o600, f"{path} has mode {stat.S_IMODE(st.st_mode):o}"
    assert st.st_uid == os.geteuid()


def test_data_dir_writable_by_others_is_refused_and_a_readable_one_tightened(make_server):
    srv = make_server(start=False)
    srv.data_dir.mkdir()
    for mode in (0o777, 0o770):
        srv.data_dir.chmod(mode)
        msg = refused(srv)
        assert str(srv.data_dir) in msg and "writable by group or others" in msg, msg[-2000:]
        assert f"chmod 700 {srv.data_dir}" in msg, msg[-2000:]
        assert mode_of(srv.data_dir) == mode, "a refused directory is left as it was"
        assert not (srv.data_dir / "postroom.db").exists(), "nothing is created in a refused directory"
        r = srv.cli("config", "check")
        assert r.returncode != 0 and "writable by group or others" in r.stderr, r.stderr
        r = srv.cli("user", "list")
        assert r.returncode != 0 and str(srv.data_dir) in r.stderr, r.stderr
    # Ours and only readable by others (as a packaged /var/lib directory may be): tightened, used.
    srv.data_dir.chmod(0o755)
    srv.start()
    assert mode_of(srv.data_dir) == 0o700
    assert_private_file(srv.data_dir / "postroom.db")
    srv.cli_ok("config", "check")


@needs_root
def test_data_dir_of_another_user_is_refused(make_server):
    srv = make_server(start=False)
    srv.data_dir.mkdir(mode=0o700)
    os.chown(srv.data_dir, NOBODY, NOBODY)
    msg = refused(srv)
    assert f"data directory {srv.data_dir} is owned by uid {NOBODY}" in msg, msg[-2000:]
    assert f"chown -R 0 {srv.data_dir} && chmod 700 {srv.data_dir}" in msg, msg[-2000:]
    assert list(srv.data_dir.iterdir()) == []
    r = srv.cli("config", "check")
    assert r.returncode != 0 and f"owned by uid {NOBODY}" in r.stderr, r.stderr
    # The fix the message gives works.
    os.chown(srv.data_dir, 0, 0)
    srv.start()


@needs_root
def test_shared_working_directory_with_a_planted_default_data_dir(make_server, tmp_path):
    """The default data_dir is relative: run from a shared (sticky, world-writable) directory where
    another user made `postroom-data` first and planted `tls-key.pem` there."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = shared / "postroom-data"
    planted.mkdir(mode=0o700)
    target = victim(tmp_path, "their-file")
    (planted / "tls-key.pem").symlink_to(target)
    for p in (planted, planted / "tls-key.pem"):
        os.lchown(p, NOBODY, NOBODY)
    srv = make_server(start=False, data_dir="postroom-data")
    srv.data_dir = planted
    srv.preexec_fn = lambda: os.chdir(shared)
    msg = refused(srv)
    assert "data directory postroom-data is owned by uid 65534" in msg, msg[-2000:]
    assert_untouched(target)
    assert sorted(p.name for p in planted.iterdir()) == ["tls-key.pem"]


def test_data_dir_that_is_a_symbolic_link_is_refused(make_server, tmp_path):
    srv = make_server(start=False)
    real = tmp_path / "real-data"
    real.mkdir(mode=0o700)
    srv.data_dir.symlink_to(real)
    msg = refused(srv)
    assert f"data directory {srv.data_dir} is a symbolic link" in msg, msg[-2000:]
    assert "set data_dir to the real directory" in msg
    assert list(real.iterdir()) == []


def test_planted_links_are_never_written_through(make_server, tmp_path):
    """A data directory that passes the checks but holds links someone left there (before it was
    chowned to us, say): the server writes none of its files through them."""
    srv = make_server(start=False)
    srv.data_dir.mkdir(mode=0o700)
    targets = {name: victim(tmp_path, name) for name in (".listening.tmp", "status.tmp", "tls-key.pem")}
    for name, target in targets.items():
        (srv.data_dir / name).symlink_to(target)
    # The key link would hand the attacker our key (or theirs to us): refused, naming it and the fix.
    msg = refused(srv)
    assert f"{srv.data_dir / 'tls-key.pem'} is a symbolic link" in msg and "remove it" in msg, msg[-2000:]
    for target in targets.values():
        assert_untouched(target)
    # Following the advice: remove the key link. The other two are names the server no longer
    # writes to; it starts, and `listening` and `status` are its own private files.
    (srv.data_dir / "tls-key.pem").unlink()
    srv.start()
    time.sleep(2.5)  # the status file is rewritten every 2 s
    for target in targets.values():
        assert_untouched(target)
    for name in ("listening", "status", "tls-key.pem", "tls-cert.pem", "postroom.db"):
        assert_private_file(srv.data_dir / name)
    assert (srv.data_dir / ".listening.tmp").is_symlink() and (srv.data_dir / "status.tmp").is_symlink()
    leftovers = [p.name for p in srv.data_dir.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    srv.stop()
    assert_untouched(targets[".listening.tmp"])


def test_fresh_relative_data_dir_as_in_the_readme(make_server, tmp_path):
    """`postroom serve` from a directory of one's own with the default relative data_dir: the
    directory is created 0700, the key 0600; a restart uses it again."""
    work = tmp_path / "work"
    work.mkdir()
    srv = make_server(start=False, data_dir="postroom-data")
    srv.data_dir = work / "postroom-data"
    srv.preexec_fn = lambda: os.chdir(work)
    srv.start()
    assert mode_of(srv.data_dir) == 0o700
    assert_private_file(srv.data_dir / "tls-key.pem")
    key = (srv.data_dir / "tls-key.pem").read_bytes()
    srv.restart()
    assert (srv.data_dir / "tls-key.pem").read_bytes() == key, "the generated key is reused"


@needs_openssl
def test_configured_key_readable_by_others_is_refused(make_server, tmp_path):
    cert, key, _ = make_cert_pair(tmp_path / "pki", "mail.example.test", "mx")
    srv = make_server(start=False, tls={"cert": str(cert), "key": str(key)})
    for mode in (0o644, 0o640):
        key.chmod(mode)
        msg = refused(srv)
        assert f"permissions {mode:04o} for {key} are too open" in msg, msg[-2000:]
        assert f"chmod 600 {key}" in msg, msg[-2000:]
        r = srv.cli("config", "check")
        assert r.returncode != 0 and f"permissions {mode:04o} for {key} are too open" in r.stderr, r.stderr
    key.chmod(0o600)
    srv.cli_ok("config", "check")
    srv.start()
    assert mode_of(key) == 0o600
