"""Issue 15, "Backup": `postroom backup FILE` takes a consistent copy while the server runs
(SQLite's online backup API), certificates and keys included; `postroom restore FILE` refuses
while a server runs on that data directory, and over an existing database unless --force.

Under load: clients send a stream of messages to two local mailboxes and one remote recipient
(held in the queue: its mail router is down); every message answered 250 before `postroom
backup` started must be in the restored copy — in its mailbox exactly once, or in the queue —
after a fresh server is started on the restored data directory.
"""

from __future__ import annotations

import collections
import os
import smtplib
import stat
import subprocess
import tarfile
import threading
import time

from helpers import (
    BIN,
    CLIENT_NAME,
    JANE,
    maildrop_subjects,
    make_message,
    queued_id,
    Reply,
)

SAM = ("sam", "sam@example.test", "sam-secret-1")
BOB = ("bob", "bob@example.test", "bob-secret-1")
REMOTE = "far@remote.example"
# Mail to REMOTE waits in the queue: nothing listens on the mail router's port (discard, 9).
OVERRIDES = {"relay": {"mode": "list"}, "delivery": {"mail_router": "127.0.0.1:9"}}
SENDERS = 4


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def setup(make_server):
    srv = make_server(start=False, **OVERRIDES)
    srv.add_user(*SAM)
    srv.add_user(*BOB)
    srv.cli_ok("list", "add", "relay", "127.0.0.0/8")
    srv.start()
    return srv


class Load:
    """SENDERS clients, each sending one message after another on its own connection, cycling
    through sam, bob and the remote recipient; records every message answered 250."""

    def __init__(self, srv):
        self.srv = srv
        self.lock = threading.Lock()
        self.acked: list[tuple[str, str, str]] = []  # (subject, recipient, queue id)
        self.sent: set[str] = set()
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(SENDERS)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def snapshot(self) -> list[tuple[str, str, str]]:
        with self.lock:
            return list(self.acked)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors[:5]

    def run(self, k: int):
        rcpts = [SAM[1], BOB[1], REMOTE]
        try:
            s = smtplib.SMTP(self.srv.smtp[0], self.srv.smtp[1], local_hostname=CLIENT_NAME, timeout=30)
            s.ehlo()
            i = 0
            while not self.stop.is_set():
                rcpt, subject = rcpts[i % 3], f"load-{k}-{i}"
                with self.lock:
                    self.sent.add(subject)
                assert s.mail(JANE)[0] == 250
                assert s.rcpt(rcpt)[0] == 250
                code, text = s.data(make_message(subject, to=rcpt))
                if code == 250:
                    qid = queued_id(Reply(code, [text.decode()]))
                    with self.lock:
                        self.acked.append((subject, rcpt, qid))
                i += 1
            s.quit()
        except Exception as e:  # noqa: BLE001 (reported by finish)
            self.errors.append(f"sender {k}: {e!r}")


def queue_ids(srv, recipient: str) -> collections.Counter:
    """How often each queue id shows with `recipient` in `postroom queue list`."""
    out = srv.cli_ok("queue", "list").stdout
    ids = collections.Counter()
    for line in out.splitlines():
        tokens = line.split()
        if len(tokens) >= 3 and any(t.strip("<>,").lower() == recipient for t in tokens[2:]):
            ids[tokens[0]] += 1
    return ids


def test_backup_under_load_restores_every_acknowledged_message(make_server, tmp_path):
    srv = setup(make_server)
    load = Load(srv).start()
    # Let the stream run, then note what was acknowledged before the backup starts.
    deadline = time.monotonic() + 30
    while len(load.snapshot()) < 30:
        assert time.monotonic() < deadline and not load.errors, f"the load does not flow: {load.errors[:3]}"
        time.sleep(0.1)
    before = load.snapshot()
    archive = tmp_path / "postroom-backup.tar"
    r = srv.cli("backup", str(archive), timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    during = len(load.snapshot()) - len(before)
    time.sleep(0.5)

    # Restore is refused while the server runs on its data directory, and changes nothing.
    db = srv.data_dir / "postroom.db"
    inode = os.stat(db).st_ino
    r = srv.cli("restore", str(archive), "--force")
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "running" in r.stderr and str(srv.data_dir) in r.stderr, r.stderr
    assert os.stat(db).st_ino == inode

    load.finish()
    assert during > 0, "no message was acknowledged while the backup ran: it was not under load"
    srv.stop()

    # The archive: 0600, the database, the generated certificate and key, a manifest.
    assert mode_of(archive) == 0o600
    with tarfile.open(archive) as t:
        names = t.getnames()
        manifest = t.extractfile("MANIFEST").read().decode()
    assert names[0] == "MANIFEST" and {"postroom.db", "tls-cert.pem", "tls-key.pem"} <= set(names), names
    assert manifest.startswith("postroom-backup 1\n") and "\ncreated " in manifest, manifest

    # A fresh data directory, restored, and a server started on it.
    srv2 = make_server(start=False, **OVERRIDES)
    assert not srv2.data_dir.exists()
    r = srv2.cli("restore", str(archive))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert mode_of(srv2.data_dir) == 0o700
    for name in ("postroom.db", "tls-cert.pem", "tls-key.pem"):
        assert mode_of(srv2.data_dir / name) == 0o600, name
    assert (srv2.data_dir / "tls-key.pem").read_bytes() == (srv.data_dir / "tls-key.pem").read_bytes()
    srv2.start()

    # Every message acknowledged before the backup started is there, each exactly once: in its
    # mailbox (delivered before the copy, or by the restored server's framework now) ...
    for user, address, password in (SAM, BOB):
        want = {s for s, rcpt, _ in before if rcpt == address}
        assert want, f"nothing was sent to {address}"
        deadline = time.monotonic() + 60
        while True:
            have = collections.Counter(maildrop_subjects(srv2, user, password))
            missing = want - set(have)
            if not missing:
                break
            assert time.monotonic() < deadline, f"{len(missing)} of {len(want)} acknowledged message(s) for {user} lost: {sorted(missing)[:10]}"
            time.sleep(0.5)
        time.sleep(1.0)  # let the framework finish whatever else the copy held
        have = collections.Counter(maildrop_subjects(srv2, user, password))
        assert not {s: n for s, n in have.items() if n > 1}, f"duplicates for {user}: {have.most_common(5)}"
        assert set(have) <= load.sent, f"messages nobody sent: {sorted(set(have) - load.sent)[:5]}"
    # ... and the remote one in the queue, still waiting for its mail router.
    queued = queue_ids(srv2, REMOTE)
    want = [qid for _, rcpt, qid in before if rcpt == REMOTE]
    assert want
    missing = [qid for qid in want if queued[qid] != 1]
    assert not missing, f"{len(missing)} acknowledged remote message(s) not queued exactly once: {missing[:10]}\n{srv2.cli('queue', 'list').stdout}"


def test_restore_refuses_an_existing_database_unless_forced(make_server, tmp_path):
    srv = setup(make_server)
    archive = tmp_path / "b.tar"
    srv.cli_ok("backup", str(archive))
    srv.stop()
    other = make_server(start=False)
    other.add_user("carol", "carol@example.test", "carol-secret-1")
    r = other.cli("restore", str(archive))
    assert r.returncode != 0 and "already holds a database" in r.stderr and "--force" in r.stderr, r.stderr
    assert "carol" in other.cli_ok("user", "list").stdout
    other.cli_ok("restore", str(archive), "--force")
    users = other.cli_ok("user", "list").stdout
    assert "sam" in users and "bob" in users and "carol" not in users, users


def test_backup_writes_only_a_new_file_never_through_a_link(make_server, tmp_path):
    srv = setup(make_server)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "link.tar"
    link.symlink_to(victim)
    for target in (link, victim):
        r = srv.cli("backup", str(target))
        assert r.returncode != 0 and "already exists" in r.stderr, r.stderr
    assert victim.read_text() == "precious\n"
    # Nothing but what was there: no working directory or partial archive left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".postroom-backup")) == []
    r = srv.cli("backup", str(tmp_path / "no-such-dir" / "b.tar"))
    assert r.returncode != 0, r.stdout


def test_restore_refuses_what_is_not_a_backup(make_server, tmp_path):
    srv = make_server(start=False)
    junk = tmp_path / "junk.tar"
    with tarfile.open(junk, "w") as t:
        t.add(__file__, arcname="postroom.db")
    r = subprocess.run([str(BIN), "--config", str(srv.config_path), "restore", str(junk)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a postroom backup" in r.stderr, r.stderr
    assert not (srv.data_dir / "postroom.db").exists()
