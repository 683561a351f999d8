-- S/MIME on the send API (SPEC F8, issue 18): `postroom smime import` keeps a user's own
-- certificate and private key, `postroom smime add-recipient` the certificates of the people
-- they write to; `postroom send --sign/--encrypt` reads both (crates/smime/src/table.rs).
-- The private key is PKCS#8 DER and lives only here, in the private database (0600 in the 0700
-- data directory), so `postroom backup` carries it, as it carries the DKIM keys.
CREATE TABLE smime_identities (
    user_id     INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    certificate BLOB NOT NULL,     -- PEM: the user's certificate, then its chain
    private_key BLOB NOT NULL,     -- PKCS#8 DER
    subject     TEXT NOT NULL,
    emails      TEXT NOT NULL,     -- the certificate's rfc822Names, lower case, space-separated
    not_after   INTEGER NOT NULL,  -- unix seconds
    imported    INTEGER NOT NULL   -- unix seconds
);

-- Certificates of recipients, by address; a local user's own certificate serves too (joined
-- through `addresses`), so it need not be added twice.
CREATE TABLE smime_recipients (
    address     TEXT PRIMARY KEY,  -- lower case
    certificate BLOB NOT NULL,     -- PEM
    subject     TEXT NOT NULL,
    not_after   INTEGER NOT NULL,
    imported    INTEGER NOT NULL
);
