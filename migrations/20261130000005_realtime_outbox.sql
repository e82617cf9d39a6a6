-- Realtime events leave the transaction that makes them.
--
-- Until now a change published its events inside its own transaction: it took the next
-- numbers of its organization's sequence (locking the `realtime_cursors` row) and called
-- NOTIFY, whose commit takes a database-wide lock. An organization's writers, and every
-- notifying commit in the database, went one at a time, each holding its locks through its
-- WAL flush.
--
-- Now a change only queues its events here, in its own transaction: no shared row, no
-- NOTIFY, so commits group freely. After commit, a publisher (any `callplane serve`, one at a
-- time by an advisory lock) moves queued events into each organization's stream in queue
-- order: numbered, stored and notified in one short transaction per batch. The stream's
-- guarantees stay: an event is published only once its change has committed and never lost
-- after (the queue is durable), numbers have no gap and no duplicate, and a call's events
-- keep the order of its changes (its changes serialize on the call's row before they queue).
CREATE TABLE realtime_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    kind            text NOT NULL,
    call_id         text,
    data            jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Publishes up to `max_events` queued events, oldest first; returns how many.
CREATE FUNCTION callplane_publish_outbox(max_events integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    e record;
    s bigint;
    ids bigint[] := '{}';
BEGIN
    -- One publisher at a time: the queue's order becomes the streams' order. The batch is
    -- read after the lock, so it sees everything the previous publisher left.
    PERFORM pg_advisory_xact_lock(hashtext('callplane_publish_outbox'));
    FOR e IN SELECT * FROM realtime_outbox ORDER BY id LIMIT max_events LOOP
        INSERT INTO realtime_cursors AS c (organization_id, last_seq) VALUES (e.organization_id, 1)
        ON CONFLICT (organization_id) DO UPDATE SET last_seq = c.last_seq + 1
        RETURNING last_seq INTO s;
        INSERT INTO realtime_events (organization_id, seq, kind, call_id, data, created_at)
        VALUES (e.organization_id, s, e.kind, e.call_id, e.data, e.created_at);
        PERFORM pg_notify('callplane_events', json_build_object(
            'org_id', e.organization_id, 'seq', s, 'kind', e.kind, 'call_id', e.call_id,
            'data', e.data, 'at', e.created_at)::text);
        ids := ids || e.id;
    END LOOP;
    -- Exactly the rows published: one queued meanwhile with a lower id waits for the next batch.
    DELETE FROM realtime_outbox WHERE id = ANY (ids);
    RETURN coalesce(array_length(ids, 1), 0);
END $$;
