-- PostgreSQL's migration 15 adds `ferry_refuse`, which its one-statement
-- group create needs. SQLite commits a group create as a transaction of
-- several statements and rolls it back from ferry instead: nothing to add.
SELECT 1;
