-- Greylisting (issue 21, postgrey's behaviour): `[greylist] enabled`. A triplet is a client
-- network, an envelope sender and a recipient; its first attempt is answered 450 4.2.0, and a
-- retry after `delay_secs` (within `retry_window_hours` of the first) passes. A client network
-- with `auto_allow_after` passed triplets is no longer greylisted. Rows not seen for
-- `max_age_days`, and triplets whose retry window is over, are removed in the background.
CREATE TABLE greylist_triplets (
    network    TEXT NOT NULL,             -- IPv4 /24 "192.0.2.0/24", IPv6 /64 "2001:db8::/64"
    sender     TEXT NOT NULL,             -- envelope sender, lowercase; '' for the null sender
    recipient  TEXT NOT NULL,             -- lowercase
    first_seen INTEGER NOT NULL,          -- unix seconds
    last_seen  INTEGER NOT NULL,
    passed     INTEGER NOT NULL DEFAULT 0 CHECK (passed >= 0),  -- attempts accepted; 0 = greylisted
    PRIMARY KEY (network, sender, recipient)
) WITHOUT ROWID;
CREATE INDEX greylist_triplets_last_seen ON greylist_triplets (last_seen);
CREATE TABLE greylist_clients (
    network         TEXT PRIMARY KEY,
    passed_triplets INTEGER NOT NULL CHECK (passed_triplets >= 0),
    last_seen       INTEGER NOT NULL
) WITHOUT ROWID;
