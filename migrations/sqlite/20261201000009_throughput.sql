-- Throughput (issue 15): PostgreSQL's page fill factors and autovacuum
-- thresholds have no SQLite counterpart; this keeps both backends at the
-- same migration version.
SELECT 1;
