-- The inbox's page fill factor (PostgreSQL, issue 15, docs/performance.md
-- round 19) has no SQLite counterpart; this keeps both backends at the
-- same migration version.
SELECT 1;
