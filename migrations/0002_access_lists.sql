-- Access lists (SPEC R4, R6, R8, R11): relay (ACCEPTRLY), reject (REJECTCNN), near domains,
-- kill (senders), rbl (DNS blackhole list zones). One table, a kind column.
CREATE TABLE access_lists (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    kind     TEXT NOT NULL,
    entry    TEXT NOT NULL,     -- canonical text of the entry
    added_at INTEGER NOT NULL,
    UNIQUE (kind, entry)
);

-- Servers reload the lists when this number changes: list changes apply to new sessions
-- without a restart (R11), and checking one integer per session costs next to nothing.
INSERT INTO meta (key, value) VALUES ('lists_version', '0');
CREATE TRIGGER access_lists_insert AFTER INSERT ON access_lists BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'lists_version';
END;
CREATE TRIGGER access_lists_delete AFTER DELETE ON access_lists BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'lists_version';
END;
