-- Throughput (issue 15, docs/performance.md). The sync rewrites these rows
-- many times: the inbox row when it is claimed and when it is applied, the
-- customer and its link at every remote change. Room left on each page lets
-- an update that changes no indexed column stay on its page (a HOT update:
-- no new index entries, no index bloat); without it a claim rewrote every
-- index of the inbox for each of its rows. Autovacuum visits them after 2 %
-- churn instead of 20 %, so the dead versions a backlog leaves are cleared
-- while it drains. Only pages written from now on take the fill factor.
ALTER TABLE inbox SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE customers SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE sync_links SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02);
