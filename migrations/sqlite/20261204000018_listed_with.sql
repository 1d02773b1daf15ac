-- The code a reconciliation run's listing cursor came from (the active
-- version's sha256 when the page was listed). A cursor's format is its
-- connector version's own: when another version is active by the next
-- page, the listing starts again from the first page with it.
ALTER TABLE reconciliation_runs ADD COLUMN listed_with TEXT;
