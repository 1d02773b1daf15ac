-- The open dead letters, by connector: what the backlog counts every few
-- seconds, what the console and the API list by default, and what a
-- connector's replay takes. Replayed letters stay (history) and may
-- outnumber the open ones by far after an outage; every one of those
-- reads scanned them all.
CREATE INDEX dead_letters_open ON dead_letters (connector, id)
    WHERE replayed_at IS NULL;
