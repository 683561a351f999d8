-- A user's full name for the LDAP address book (SPEC O5, issue 18): `postroom user add NAME
-- --name "Sam Jones"`, `postroom user set NAME --name ...`. NULL: no name; the book shows the
-- user name.
ALTER TABLE users ADD COLUMN display_name TEXT;
