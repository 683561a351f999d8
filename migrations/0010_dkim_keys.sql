-- DKIM signing keys (RFC 6376 §3.6, RFC 8463), one or more per local domain: `postroom dkim
-- keygen` adds them; the outbound client signs with one key of each algorithm of the domain it
-- chose: the newest that `dkim check` saw published, else the newest (sender-auth::key_store).
-- The private key is PKCS#8 DER and lives only here, in the private database (0600 in the 0700
-- data directory), so `postroom backup` carries it.
-- AUTOINCREMENT: ids are never reused, so (count, max id, checked count) changes with every
-- keygen, --force replacement, removal and check; the running server reloads its keys then.
CREATE TABLE dkim_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    domain      TEXT NOT NULL,     -- lower case, no trailing dot
    selector    TEXT NOT NULL,     -- lower case DNS label(s): SELECTOR._domainkey.DOMAIN
    algorithm   TEXT NOT NULL CHECK (algorithm IN ('rsa-sha256', 'ed25519-sha256')),
    private_key BLOB NOT NULL,     -- PKCS#8 DER
    created     INTEGER NOT NULL,  -- unix seconds
    checked     INTEGER,           -- unix seconds `postroom dkim check` last saw it published
    UNIQUE (domain, selector)
);
