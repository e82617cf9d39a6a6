-- Publishes all the events of one change with one step of the organization's sequence: the
-- cursor row is locked once per change instead of once per event (it was the largest share
-- of database time when ingesting end-of-call reports, see docs/BENCHMARKS.md).
CREATE FUNCTION callplane_publish_batch(org uuid, kinds text[], call_ids text[], datas jsonb[])
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(array_length(kinds, 1), 0);
    last bigint;
    at timestamptz := clock_timestamp();
    i integer;
BEGIN
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    INSERT INTO realtime_cursors AS c (organization_id, last_seq) VALUES (org, n)
    ON CONFLICT (organization_id) DO UPDATE SET last_seq = c.last_seq + n
    RETURNING last_seq INTO last;
    FOR i IN 1..n LOOP
        INSERT INTO realtime_events (organization_id, seq, kind, call_id, data, created_at)
        VALUES (org, last - n + i, kinds[i], call_ids[i], datas[i], at);
        PERFORM pg_notify('callplane_events', json_build_object(
            'org_id', org, 'seq', last - n + i, 'kind', kinds[i], 'call_id', call_ids[i], 'data', datas[i], 'at', at)::text);
    END LOOP;
    RETURN last;
END $$;
