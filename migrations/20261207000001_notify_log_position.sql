-- Each notification of a published event says where the primary's log ended when it was
-- published (`lsn`, as a number): past the commit of the change the event announces, which
-- was committed before its event could be published. A process that hears of a change makes
-- its dashboard reads of that organization wait for a read replica to replay at least that
-- far, so a client that saw the event never reads an older state from the replica.
-- Otherwise the same function as 20261204000002.
--
CREATE OR REPLACE FUNCTION callplane_publish_outbox(max_events integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    published integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('callplane_publish_outbox'));
    WITH batch AS (
        DELETE FROM realtime_outbox
        WHERE id IN (SELECT id FROM realtime_outbox ORDER BY id LIMIT max_events)
        RETURNING *
    ), shares AS (
        SELECT organization_id, count(*) AS n FROM batch GROUP BY organization_id
    ), advanced AS (
        INSERT INTO realtime_cursors AS c (organization_id, last_seq)
        SELECT organization_id, n FROM shares
        ON CONFLICT (organization_id) DO UPDATE SET last_seq = c.last_seq + EXCLUDED.last_seq
        RETURNING c.organization_id, c.last_seq
    ), numbered AS (
        SELECT b.id, b.organization_id, b.kind, b.call_id, b.data, b.created_at,
               a.last_seq - s.n + row_number() OVER (PARTITION BY b.organization_id ORDER BY b.id) AS seq
        FROM batch b JOIN advanced a USING (organization_id) JOIN shares s USING (organization_id)
    ), stored AS (
        INSERT INTO realtime_events (organization_id, seq, kind, call_id, data, created_at)
        SELECT organization_id, seq, kind, call_id, data, created_at FROM numbered
    )
    SELECT count(*)::integer INTO published FROM (
        SELECT pg_notify('callplane_events', json_build_object(
                   'org_id', organization_id, 'seq', seq, 'kind', kind, 'call_id', call_id,
                   'data', data, 'at', created_at,
                   'lsn', (pg_current_wal_insert_lsn() - '0/0')::bigint)::text)
        FROM (SELECT * FROM numbered ORDER BY id) in_queue_order
    ) notified;
    RETURN published;
END $$;
