-- Daily usage: billed usage per organization and day, the day taken in the organization's
-- billing time zone (UTC unless set), kept in step with usage_ledger by the transaction that
-- writes each ledger row. `GET /v1/usage/daily` reads it instead of summing the ledger.
ALTER TABLE organizations ADD COLUMN billing_timezone text NOT NULL DEFAULT 'UTC';

-- Each day is spread over 8 rows (by call) so that an organization's concurrent reports do not
-- queue on one row lock until they commit; readers add the shards up. No foreign key to
-- organizations: its check locks the organization's row (FOR KEY SHARE), and a rebuild holding
-- the advisory lock below would then wait behind a counter update (FOR UPDATE) that waits for a
-- ledger writer that waits for the rebuild: a deadlock. The rows are derived from the ledger,
-- whose own key holds.
CREATE TABLE daily_usage (
    organization_id  uuid NOT NULL,
    day              date NOT NULL,
    shard            smallint NOT NULL CHECK (shard BETWEEN 0 AND 7),
    calls            bigint NOT NULL DEFAULT 0 CHECK (calls >= 0),
    -- The calls' durations, and what was billed of them.
    seconds          double precision NOT NULL DEFAULT 0,
    billable_seconds bigint NOT NULL DEFAULT 0 CHECK (billable_seconds >= 0),
    PRIMARY KEY (organization_id, day, shard)
);

-- Writers of an organization's days share this lock; a rebuild takes it alone, so that no
-- ledger row is added to a day the rebuild is replacing, nor left out of it.
CREATE FUNCTION callplane_daily_usage_lock(org uuid) RETURNS bigint LANGUAGE sql IMMUTABLE AS
$$ SELECT hashtextextended('callplane_daily_usage:' || org::text, 0) $$;

-- Adds one ledger row (just written, in the caller's transaction) to its day.
CREATE FUNCTION callplane_add_daily_usage(org uuid, call text, started timestamptz,
                                          duration double precision, billable bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(callplane_daily_usage_lock(org));
    INSERT INTO daily_usage AS d (organization_id, day, shard, calls, seconds, billable_seconds)
    SELECT org, (started AT TIME ZONE o.billing_timezone)::date, hashtext(call) & 7, 1, duration, billable
    FROM organizations o WHERE o.id = org
    ON CONFLICT (organization_id, day, shard) DO UPDATE
        SET calls = d.calls + 1,
            seconds = d.seconds + EXCLUDED.seconds,
            billable_seconds = d.billable_seconds + EXCLUDED.billable_seconds;
END
$$;

-- Rebuilds an organization's days from the ledger (in its billing time zone as it is now);
-- returns how many day rows it wrote.
CREATE FUNCTION callplane_rebuild_daily_usage(org uuid) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(callplane_daily_usage_lock(org));
    DELETE FROM daily_usage WHERE organization_id = org;
    INSERT INTO daily_usage (organization_id, day, shard, calls, seconds, billable_seconds)
    SELECT org, (l.call_started_at AT TIME ZONE o.billing_timezone)::date, hashtext(l.call_id) & 7,
           count(*), sum(l.duration_seconds), sum(l.billable_seconds)
    FROM usage_ledger l JOIN organizations o ON o.id = l.organization_id
    WHERE l.organization_id = org
    GROUP BY 2, 3;
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END
$$;

-- The days of the ledger as it stands.
SELECT callplane_rebuild_daily_usage(id) FROM organizations;
