-- Postroom schema, version 1. One SQLite file holds directory, queue, mailboxes and journal,
-- so a recipient's state change and its effect commit in one transaction (DESIGN "Storage").

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Directory (SPEC D1-D4) ------------------------------------------------------------------
CREATE TABLE domains (
    name TEXT PRIMARY KEY COLLATE NOCASE
);

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT,                      -- argon2 PHC string; NULL = no password, no login
    enabled       INTEGER NOT NULL DEFAULT 1, -- 0: logins refused, mail still delivered (D2)
    removed       INTEGER NOT NULL DEFAULT 0, -- 1: RCPT refused, login allowed until the box is empty
    forward_to    TEXT,
    quota_bytes   INTEGER,
    used_bytes    INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
);

CREATE TABLE addresses (
    address   TEXT PRIMARY KEY COLLATE NOCASE,  -- local@domain, lowercase
    user_id   INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    preferred INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX addresses_user ON addresses(user_id);

-- Last POP3 login per client address, for POP-before-SMTP (P5, R1, R5).
CREATE TABLE pop_logins (
    ip      TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL,
    at      INTEGER NOT NULL
);

-- Framework queue (F1) ----------------------------------------------------------------------
CREATE TABLE messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    qid         TEXT NOT NULL UNIQUE,
    complete    INTEGER NOT NULL DEFAULT 0,   -- 0 while DATA streams in; removed at start-up
    mail_from   TEXT NOT NULL DEFAULT '',     -- '' = null reverse-path <>
    size        INTEGER NOT NULL DEFAULT 0,   -- octets of the stored body
    received_at INTEGER NOT NULL,
    client_ip   TEXT NOT NULL DEFAULT '',
    helo        TEXT NOT NULL DEFAULT '',
    origin      TEXT NOT NULL DEFAULT 'smtp'
);

-- Bodies are stored once per message, in chunks, while DATA arrives.
CREATE TABLE body_chunks (
    id         INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    data       BLOB NOT NULL,
    UNIQUE (message_id, seq)
);

CREATE TABLE recipients (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address      TEXT NOT NULL,
    state        TEXT NOT NULL,     -- queued | forward | delivered | failed
    user_id      INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER,
    last_reply   TEXT
);
CREATE INDEX recipients_state ON recipients(state, id);
CREATE INDEX recipients_message ON recipients(message_id);

-- Mailboxes: one row per delivered copy; the id is the UIDL basis and is never reused.
CREATE TABLE mailbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    message_id   INTEGER NOT NULL REFERENCES messages(id),
    recipient_id INTEGER NOT NULL,
    prefix       BLOB NOT NULL,      -- Return-Path written at local delivery (S3)
    size         INTEGER NOT NULL,   -- prefix + body octets, as POP3 LIST reports (P4)
    delivered_at INTEGER NOT NULL,
    UNIQUE (message_id, recipient_id)
);
CREATE INDEX mailbox_user ON mailbox(user_id, id);
CREATE INDEX mailbox_message ON mailbox(message_id);

-- Journal (F4): i5/OS function codes (9x SMTP server, P address resolution, B local delivery, D POP).
CREATE TABLE journal (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,     -- unix seconds
    code       TEXT NOT NULL,
    qid        TEXT NOT NULL DEFAULT '',
    originator TEXT NOT NULL DEFAULT '',
    recipient  TEXT NOT NULL DEFAULT '',
    size       INTEGER,
    ip         TEXT NOT NULL DEFAULT '',
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX journal_at ON journal(at);
CREATE INDEX journal_qid ON journal(qid);

-- UIDLs are "<epoch>.<mailbox id>": the epoch differs per database, so a recreated database
-- never hands out a UIDL a client has seen for another message (P4).
INSERT INTO meta (key, value) VALUES ('uidl_epoch', lower(hex(randomblob(4))));
