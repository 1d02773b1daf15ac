-- The open conflict an inbox event waits on (its link is held until a
-- person resolves it), set each time the event is parked behind it and
-- cleared when it waits or fails for another reason, or when the conflict
-- closes; read only while the event is pending. The backlog's age leaves
-- such events out: they wait on a person, not on ferry.
ALTER TABLE inbox ADD COLUMN held_by TEXT;
-- A conflict's resolution (or its customer's delete) wakes the events it
-- held at once, rather than at their next look.
CREATE INDEX inbox_held ON inbox (held_by)
    WHERE held_by IS NOT NULL AND state IN ('pending', 'retry');
