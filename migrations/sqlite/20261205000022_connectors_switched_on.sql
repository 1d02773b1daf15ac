-- Set once any replica has had the connector switched on (through the API,
-- or by its own file or environment): from then on every replica queues
-- changes for it, including one whose environment does not configure it
-- (its pushes wait there for a replica that can make them). Without it, a
-- replica that does not configure the connector took changes off the
-- queue and queued them for nobody. Cleared when the connector is deleted.
ALTER TABLE connectors ADD COLUMN switched_on INTEGER NOT NULL DEFAULT FALSE;
