-- Delivery status notifications (SPEC C4, RFC 3461), host authentication (C5) and ETRN (C7).
ALTER TABLE messages ADD COLUMN dsn_ret TEXT;        -- FULL | HDRS | NULL (not given)
ALTER TABLE messages ADD COLUMN dsn_envid TEXT;      -- ENVID, decoded
ALTER TABLE recipients ADD COLUMN notify TEXT;       -- NEVER | SUCCESS,FAILURE,DELAY subset | NULL
ALTER TABLE recipients ADD COLUMN orcpt TEXT;        -- ORCPT as given: addr-type;xtext
ALTER TABLE recipients ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0;

-- Credentials for remote hosts that require AUTH (ADDSMTPLE *HOSTAUTH). The database file is
-- 0600 and the password is never printed.
CREATE TABLE hostauth (
    host     TEXT PRIMARY KEY COLLATE NOCASE,
    user     TEXT NOT NULL,
    password TEXT NOT NULL,
    added_at INTEGER NOT NULL
);
