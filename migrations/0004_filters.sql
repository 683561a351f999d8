-- Filters (SPEC F3; i5/OS SMTP properties "Filters" page, IMail filters) and the quarantine
-- the *keep* action fills. Recipient states now also: quarantined | discarded.

-- One rule = one selector: a field and a pattern with '*' wildcards, matched
-- case-insensitively against decoded values. The lowest id that matches decides.
CREATE TABLE filters (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    field    TEXT NOT NULL,                 -- from | subject | attachment | mime-type
    pattern  TEXT NOT NULL COLLATE NOCASE,
    action   TEXT NOT NULL,                 -- keep | discard
    added_at INTEGER NOT NULL,
    UNIQUE (field, pattern)
);

-- A message kept aside by a *keep* rule: delivered to nobody until released. The body stays
-- in body_chunks while an unreleased row references the message (garbage collection checks
-- `released = 0`); once released and delivered the message is freed and the row goes with it.
CREATE TABLE quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
    rule        TEXT NOT NULL,                -- which rule matched, on what value
    at          INTEGER NOT NULL,
    released    INTEGER NOT NULL DEFAULT 0,   -- 1: `quarantine release`: the filter skips it
    released_at INTEGER
);
