-- The findings a person's resolution claimed and whose repair is still
-- being scheduled: the reconciler looks for stalled ones every minute (a
-- process that died between the claim and the schedule), so that look
-- must not read every finding of every run.
CREATE INDEX reconciliation_mismatches_scheduling ON reconciliation_mismatches (resolved_at)
    WHERE state = 'resolved' AND repair LIKE '%: being scheduled';
