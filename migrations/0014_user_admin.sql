-- Administrators of the web console (SPEC E6, issue 19): `postroom user add NAME --admin`,
-- `postroom user admin NAME on|off`. Only an enabled administrator logs in to the console; the
-- flag gives no power over SMTP or POP3.
ALTER TABLE users ADD COLUMN admin INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1));
