-- A call's add to the Postgres usage counter in one statement, so that counting costs one
-- round trip instead of six (BEGIN, SET LOCAL, the row lock, the ledger flip, the add, COMMIT).
--
-- The organization row is locked first (the order `rebuild` takes too), then the ledger row
-- is flipped to counted; only a flip raises the total. A period other than the organization's
-- current one answers from the ledger. The commit does not wait for the WAL flush: a crash
-- that loses it loses the flip with the add, and the repair loop counts the durable ledger
-- row again. Called alone (autocommit), so `set_config(..., true)` covers exactly this
-- statement's transaction.
CREATE FUNCTION callplane_count_call(org uuid, period timestamptz, call text, seconds bigint)
RETURNS TABLE (total_before bigint, total_after bigint, counted_now boolean)
LANGUAGE plpgsql AS $$
DECLARE
    current_period timestamptz;
    used bigint;
    flipped boolean;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    -- NO KEY UPDATE: the lock the add's own UPDATE takes. It does not wait for the reports
    -- in flight, whose rows hold KEY SHARE locks on the organization (their foreign keys)
    -- until they commit, as FOR UPDATE would; adds still take turns on the row.
    SELECT o.period_start, o.seconds_used INTO current_period, used
    FROM organizations o WHERE o.id = org FOR NO KEY UPDATE;
    UPDATE usage_ledger SET counted = true
    WHERE usage_ledger.call_id = call AND organization_id = org AND period_start = period AND NOT counted;
    flipped := FOUND;
    IF current_period IS NOT NULL AND current_period = period THEN
        IF flipped THEN
            -- Saturating, as the counter's other backends are.
            UPDATE organizations SET seconds_used = LEAST(used, 9223372036854775807 - seconds) + seconds,
                                     updated_at = now()
            WHERE id = org;
            RETURN QUERY SELECT used, LEAST(used, 9223372036854775807 - seconds) + seconds, true;
        ELSE
            RETURN QUERY SELECT used, used, false;
        END IF;
    ELSE
        SELECT COALESCE(sum(l.billable_seconds), 0)::bigint INTO used
        FROM usage_ledger l WHERE l.organization_id = org AND l.period_start = period;
        RETURN QUERY SELECT CASE WHEN flipped THEN used - seconds ELSE used END, used, flipped;
    END IF;
END
$$;
