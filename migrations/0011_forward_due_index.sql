-- Issue 17, "a deep queue": with 100,000 recipients deferred for an unreachable host, the SMTP
-- client's "when is the next one due" and "claim what is due" read every waiting row through
-- recipients_due (state, next_attempt), because `held = 0` and "NULL means now" are not in that
-- index. This partial index holds only what the client may take, keyed by when it falls due,
-- so both read the due rows alone (the queries name it: without ANALYZE statistics the planner
-- would keep choosing recipients_due).
CREATE INDEX recipients_forward_due ON recipients(coalesce(next_attempt, 0)) WHERE state = 'forward' AND held = 0;
