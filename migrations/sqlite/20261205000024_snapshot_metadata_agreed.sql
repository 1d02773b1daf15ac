-- A link's snapshot is what ferry and the remote agreed on at the last
-- sync, and since round 38 an update names the metadata keys the snapshot
-- holds and the customer does not as removed, for the remote to remove.
-- Snapshots taken before from a push's answer held keys another system
-- had set at the remote, which ferry never took in: read as agreed, the
-- next update would remove them there. Such keys leave the snapshots, so
-- the next event that carries them adds them to ferry instead.
UPDATE sync_links
SET snapshot = json_set(
        snapshot,
        '$.metadata',
        json((SELECT json_group_object(e.key, e.value)
              FROM json_each(sync_links.snapshot, '$.metadata') AS e
              WHERE EXISTS (SELECT 1 FROM customers AS c, json_each(c.metadata) AS m
                            WHERE c.id = sync_links.customer_id AND m.key = e.key))))
WHERE json_type(snapshot, '$.metadata') = 'object'
  AND EXISTS (SELECT 1 FROM json_each(sync_links.snapshot, '$.metadata') AS e
              WHERE NOT EXISTS (SELECT 1 FROM customers AS c, json_each(c.metadata) AS m
                                WHERE c.id = sync_links.customer_id AND m.key = e.key));
