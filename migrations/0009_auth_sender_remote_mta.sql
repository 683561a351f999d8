-- RFC 4954 §5: the submitter a message is passed on with (AUTH= on MAIL FROM to next hops we
-- authenticate to): the authenticated user's mailbox, or NULL when it is unknown or not trusted
-- (sent as AUTH=<>).
ALTER TABLE messages ADD COLUMN auth_sender TEXT;
-- RFC 3464 §2.3.5: the host whose reply decided a recipient's last attempt (Remote-MTA of its
-- report); NULL when no remote host answered (DNS trouble, no connection).
ALTER TABLE recipients ADD COLUMN remote_mta TEXT;
