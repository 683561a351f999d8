-- The message model gets typed states (issue 12): the words of mail-framework's
-- RecipientState, Hold and Origin, enforced by CHECK constraints; an outbound attempt claims
-- its recipients (state 'attempt', attempt_id, lease_until); the framework counts its failures
-- per recipient so one poison message cannot stall the others (held = 3 after too many).
-- SQLite adds CHECK constraints only by rebuilding a table; the migration runs with foreign
-- keys off, so the rebuild does not cascade, and checks them before it commits.

CREATE TABLE messages_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    qid         TEXT NOT NULL UNIQUE,
    complete    INTEGER NOT NULL DEFAULT 0 CHECK (complete IN (0, 1)),
    mail_from   TEXT NOT NULL DEFAULT '',
    size        INTEGER NOT NULL DEFAULT 0,
    received_at INTEGER NOT NULL,
    client_ip   TEXT NOT NULL DEFAULT '',
    helo        TEXT NOT NULL DEFAULT '',
    origin      TEXT NOT NULL DEFAULT 'smtp' CHECK (origin IN ('smtp', 'bounce', 'double-bounce')),
    dsn_ret     TEXT CHECK (dsn_ret IN ('FULL', 'HDRS')),
    dsn_envid   TEXT
);
INSERT INTO messages_new (id, qid, complete, mail_from, size, received_at, client_ip, helo, origin, dsn_ret, dsn_envid)
    SELECT id, qid, complete, mail_from, size, received_at, client_ip, helo, origin, dsn_ret, dsn_envid FROM messages;
DELETE FROM sqlite_sequence WHERE name = 'messages_new';
INSERT INTO sqlite_sequence (name, seq) SELECT 'messages_new', seq FROM sqlite_sequence WHERE name = 'messages';
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;

CREATE TABLE recipients_new (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id     INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address        TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('queued', 'forward', 'attempt', 'sent', 'delivered', 'bounce', 'failed',
                                                  'expanded', 'quarantined', 'discarded', 'deleted', 'duplicate')),
    user_id        INTEGER,
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_attempt   INTEGER,
    last_reply     TEXT,
    held           INTEGER NOT NULL DEFAULT 0 CHECK (held IN (0, 1, 2, 3)),
    depth          INTEGER NOT NULL DEFAULT 0,
    expanded_from  TEXT,
    notify         TEXT,
    orcpt          TEXT,
    delay_notified INTEGER NOT NULL DEFAULT 0 CHECK (delay_notified IN (0, 1)),
    attempt_id     INTEGER,            -- the outbound attempt that claimed it (state 'attempt')
    lease_until    INTEGER,            -- a claim older than this was left by a crash: retried
    failures       INTEGER NOT NULL DEFAULT 0,  -- framework failures on this recipient
    CHECK ((state = 'attempt') = (attempt_id IS NOT NULL AND lease_until IS NOT NULL))
);
INSERT INTO recipients_new (id, message_id, address, state, user_id, attempts, next_attempt, last_reply, held, depth,
                            expanded_from, notify, orcpt, delay_notified)
    SELECT id, message_id, address, state, user_id, attempts, next_attempt, last_reply, held, depth,
           expanded_from, notify, orcpt, delay_notified FROM recipients;
DELETE FROM sqlite_sequence WHERE name = 'recipients_new';
INSERT INTO sqlite_sequence (name, seq) SELECT 'recipients_new', seq FROM sqlite_sequence WHERE name = 'recipients';
DROP TABLE recipients;
ALTER TABLE recipients_new RENAME TO recipients;
CREATE INDEX recipients_state ON recipients(state, id);
CREATE INDEX recipients_message ON recipients(message_id);
CREATE INDEX recipients_due ON recipients(state, next_attempt);

-- One copy per mailbox per message: local delivery looks for the user's copy.
CREATE INDEX mailbox_message_user ON mailbox(message_id, user_id);

-- The outbound client's attempt ids never repeat, across restarts.
INSERT INTO meta (key, value) VALUES ('attempt_seq', '0');
