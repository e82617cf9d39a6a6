-- Converting an unpartitioned `calls` table to the monthly layout with the service running
-- (`callplane partitions convert --table calls`).

-- The conversion's state, so an interrupted run resumes where it stopped.
CREATE TABLE partition_conversions (
    table_name   text PRIMARY KEY,
    source       text NOT NULL,
    -- target column -> source column
    mapping      jsonb NOT NULL,
    -- copying, copied, swapped, dropped
    state        text NOT NULL,
    -- the source's pages are copied in order; every page before this one is done
    next_page    bigint NOT NULL DEFAULT 0,
    total_pages  bigint NOT NULL DEFAULT 0,
    copied_rows  bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    swapped_at   timestamptz,
    -- the longest the swap held its lock, in milliseconds
    swap_lock_ms double precision,
    -- the source's indexes copied to the new table (as <name>_converting), renamed at the swap
    indexes      jsonb NOT NULL DEFAULT '[]'
);

-- A month's partitions. While `calls` is an unpartitioned table being converted, its month goes
-- to the partitioned table it is being copied into (`calls_converting`), and none is made for
-- an unpartitioned `calls` that is not being converted.
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
