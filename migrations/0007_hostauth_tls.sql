-- How the SMTP client checks a host's certificate before it gives the host its credentials
-- (SPEC C5). Credentials only ever go over TLS whose certificate was verified: by the system's
-- roots plus, optionally, the CA certificates stored here, or by a pinned certificate.
ALTER TABLE hostauth ADD COLUMN tls_ca TEXT;           -- PEM certificates trusted for this host (NULL: the system's roots only)
ALTER TABLE hostauth ADD COLUMN tls_fingerprint TEXT;  -- SHA-256 of the host's certificate, 64 lowercase hex digits (NULL: none)
