-- A link's snapshot is what ferry and the remote agreed on at the last
-- sync, and since round 38 an update names the metadata keys the snapshot
-- holds and the customer does not as removed, for the remote to remove.
-- Snapshots taken before from a push's answer held keys another system
-- had set at the remote, which ferry never took in: read as agreed, the
-- next update would remove them there. Such keys leave the snapshots, so
-- the next event that carries them adds them to ferry instead.
UPDATE sync_links AS l
SET snapshot = jsonb_set(
        l.snapshot,
        '{metadata}',
        COALESCE(
            (SELECT jsonb_object_agg(e.key, e.value)
             FROM jsonb_each(l.snapshot -> 'metadata') AS e
             WHERE c.metadata ? e.key),
            '{}'::jsonb))
FROM customers AS c
WHERE c.id = l.customer_id
  AND jsonb_typeof(l.snapshot -> 'metadata') = 'object'
  AND EXISTS (SELECT 1 FROM jsonb_object_keys(l.snapshot -> 'metadata') AS k
              WHERE NOT c.metadata ? k);
