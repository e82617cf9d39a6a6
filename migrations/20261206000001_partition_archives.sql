-- Old months archived to object storage (`callplane partitions archive`, phase 3): a month's
-- partitions of calls and call_transcripts are exported to Parquet with a manifest, checked by
-- reading them back, and dropped. `callplane partitions restore` brings them back. The usage
-- ledger (the billing truth), call_keys and the daily usage are never archived.
--
-- A month is here from the moment its archiving starts until its restore has re-attached it:
-- 'archiving' (detached, being exported), 'archived' (dropped; the manifest is the record),
-- 'restoring' (being loaded back). While it is here nothing may make its partitions again,
-- so callplane_ensure_month refuses it.
CREATE TABLE partition_archives (
    month        timestamptz PRIMARY KEY,
    state        text NOT NULL CHECK (state IN ('archiving', 'archived', 'restoring')),
    -- The manifest's key in the object store, once written.
    manifest_key text,
    calls        bigint,
    transcripts  bigint,
    -- The Parquet objects' size.
    bytes        bigint,
    started_at   timestamptz NOT NULL DEFAULT now(),
    archived_at  timestamptz
);

CREATE OR REPLACE FUNCTION callplane_ensure_month(month timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    lo timestamptz := date_trunc('month', month AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi timestamptz := lo + interval '1 month';
    suffix text := to_char(lo AT TIME ZONE 'UTC', 'YYYY_MM');
    created boolean := false;
    parent text;
    target text;
BEGIN
    -- Serialise partition creation: concurrent CREATE ... PARTITION OF would collide.
    PERFORM pg_advisory_xact_lock(hashtext('callplane_partitions'));
    IF EXISTS (SELECT 1 FROM partition_archives a WHERE a.month = lo) THEN
        RAISE EXCEPTION 'month % is archived; restore it first (callplane partitions restore %)',
            to_char(lo AT TIME ZONE 'UTC', 'YYYY-MM'), to_char(lo AT TIME ZONE 'UTC', 'YYYY-MM')
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    FOREACH parent IN ARRAY ARRAY['calls', 'call_transcripts'] LOOP
        SELECT c.relname INTO target FROM pg_class c
        WHERE c.relname IN (parent, parent || '_converting') AND c.relkind = 'p'
          AND c.relnamespace = current_schema()::regnamespace
        ORDER BY c.relname = parent DESC LIMIT 1;
        IF target IS NOT NULL AND to_regclass(format('%I', parent || '_' || suffix)) IS NULL THEN
            EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           parent || '_' || suffix, target, lo, hi);
            created := true;
        END IF;
    END LOOP;
    RETURN created;
END $$;
