-- The outbox keeps one row per change, not one per event.
--
-- An end-of-call report queued its five events (call.created, call.status, call.ended,
-- usage.changed, call.transcript) as five rows: five heap tuples and five index entries
-- written in the report's transaction, and five deleted again by the publisher. A change now
-- queues one row per organization whose `events` holds its events in order
-- (`[{"kind", "call_id", "data"}, ...]`); the publisher takes each row's events apart and
-- numbers, stores and notifies them one by one as before. The streams do not change: the
-- same events, numbers, order and notifications.
--
-- A row of the old shape (one event in kind, call_id and data; `events` null), queued before
-- this migration or by a process still running the previous version, is published as before,
-- in queue order with the rest. A batch is now bounded in rows, each holding a handful of
-- events.
ALTER TABLE realtime_outbox
    ADD COLUMN events jsonb,
    ALTER COLUMN kind DROP NOT NULL,
    ADD CONSTRAINT realtime_outbox_one_shape CHECK ((events IS NULL) <> (kind IS NULL));

-- Replaced in place (same name and argument), so a running process's prepared call to it
-- carries on; the argument now counts rows.
CREATE OR REPLACE FUNCTION callplane_publish_outbox(max_events integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    max_rows ALIAS FOR max_events;
    published integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('callplane_publish_outbox'));
    WITH batch AS (
        DELETE FROM realtime_outbox
        WHERE id IN (SELECT id FROM realtime_outbox ORDER BY id LIMIT max_rows)
        RETURNING *
    ), queued AS (
        SELECT b.id, e.pos, b.organization_id, e.ev ->> 'kind' AS kind, e.ev ->> 'call_id' AS call_id,
               coalesce(e.ev -> 'data', '{}') AS data, b.created_at
        FROM batch b CROSS JOIN LATERAL jsonb_array_elements(coalesce(b.events,
            jsonb_build_array(jsonb_build_object('kind', b.kind, 'call_id', b.call_id, 'data', b.data))))
            WITH ORDINALITY AS e(ev, pos)
    ), shares AS (
        SELECT organization_id, count(*) AS n FROM queued GROUP BY organization_id
    ), advanced AS (
        INSERT INTO realtime_cursors AS c (organization_id, last_seq)
        SELECT organization_id, n FROM shares
        ON CONFLICT (organization_id) DO UPDATE SET last_seq = c.last_seq + EXCLUDED.last_seq
        RETURNING c.organization_id, c.last_seq
    ), numbered AS (
        SELECT q.id, q.pos, q.organization_id, q.kind, q.call_id, q.data, q.created_at,
               a.last_seq - s.n + row_number() OVER (PARTITION BY q.organization_id ORDER BY q.id, q.pos) AS seq
        FROM queued q JOIN advanced a USING (organization_id) JOIN shares s USING (organization_id)
    ), stored AS (
        INSERT INTO realtime_events (organization_id, seq, kind, call_id, data, created_at)
        SELECT organization_id, seq, kind, call_id, data, created_at FROM numbered
    )
    SELECT count(*)::integer INTO published FROM (
        SELECT pg_notify('callplane_events', json_build_object(
                   'org_id', organization_id, 'seq', seq, 'kind', kind, 'call_id', call_id,
                   'data', data, 'at', created_at,
                   'lsn', (pg_current_wal_insert_lsn() - '0/0')::bigint)::text)
        FROM (SELECT * FROM numbered ORDER BY id, pos) in_queue_order
    ) notified;
    RETURN published;
END $$;
