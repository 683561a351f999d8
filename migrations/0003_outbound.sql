-- Outbound delivery (SPEC C1-C3, C6), aliases (F7) and forwarding (D1).
-- Recipient states now: queued -> delivered | forward -> sent | bounce -> failed | expanded.
--   forward: waiting for the SMTP client (next_attempt says when)
--   bounce:  failed after acceptance; the non-delivery snap-in reports it to the sender
ALTER TABLE recipients ADD COLUMN held INTEGER NOT NULL DEFAULT 0;   -- postroom queue hold
ALTER TABLE recipients ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;  -- alias/forward expansion depth
-- The alias or forwarding address this recipient came from: mail sent on carries
-- "Delivered-To: <it>", so a message that comes back is recognised as a loop (5.4.6).
ALTER TABLE recipients ADD COLUMN expanded_from TEXT;
CREATE INDEX recipients_due ON recipients(state, next_attempt);

-- The system alias table: an address in a local domain that stands for other addresses.
CREATE TABLE aliases (
    address  TEXT NOT NULL COLLATE NOCASE,   -- local@domain, lowercase
    target   TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    PRIMARY KEY (address, target)
);

-- A user's forwarding address (D1): keep_copy = also deliver into the user's own mailbox.
ALTER TABLE users ADD COLUMN keep_copy INTEGER NOT NULL DEFAULT 0;
