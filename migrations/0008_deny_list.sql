-- The temporary deny list (SPEC R9, A5) as the running server holds it: mirrored every few
-- seconds so `postroom list show deny` and `postroom explain` can see it, and reloaded at start,
-- so a restart does not forgive an attacker. `postroom list remove deny` asks the running server
-- to lift an entry through deny_lifts; it applies the request within seconds.
CREATE TABLE denied (
    key    TEXT PRIMARY KEY,   -- an address (IPv6 by its /64) or 'user NAME'
    until  INTEGER NOT NULL,   -- unix seconds
    reason TEXT NOT NULL CHECK (reason IN ('command-line', 'failed-logins'))
);
CREATE TABLE deny_lifts (
    key TEXT PRIMARY KEY,
    at  INTEGER NOT NULL
);
