-- The counter seam: every backend adds a call to its counter after the call's ledger row
-- commits, and marks the row counted. A row left uncounted (the add failed, or the process
-- stopped between the commit and the add) is added again by the repair loop; adds are
-- idempotent on the call, so nothing is lost or counted twice.
--
-- Rows already in the ledger were counted in their own transaction (phase 1): they start
-- counted. New rows start uncounted.
ALTER TABLE usage_ledger ADD COLUMN counted boolean NOT NULL DEFAULT true;
ALTER TABLE usage_ledger ALTER COLUMN counted SET DEFAULT false;
CREATE INDEX usage_ledger_uncounted ON usage_ledger (created_at) WHERE NOT counted;

-- A key revoked or deleted: every `callplane serve` hears of it at once (`keys:<org id>`) and
-- checks the organization's verified keys again. (Recording a key's use, `last_used_at`,
-- notifies nobody.)
CREATE FUNCTION callplane_notify_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('callplane_cache', 'keys:' || COALESCE(NEW.organization_id, OLD.organization_id)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER api_keys_cache AFTER DELETE OR UPDATE OF revoked_at ON api_keys
    FOR EACH ROW EXECUTE FUNCTION callplane_notify_keys_changed();

-- Admission asks the counter now, not the organization row: a change to the Postgres counter
-- alone (`seconds_used`, once per billed call) no longer makes every process read the
-- organization again.
DROP TRIGGER organizations_cache ON organizations;
CREATE TRIGGER organizations_cache AFTER INSERT OR DELETE ON organizations
    FOR EACH ROW EXECUTE FUNCTION callplane_notify_org_changed();
CREATE TRIGGER organizations_cache_update AFTER UPDATE ON organizations
    FOR EACH ROW
    WHEN ((to_jsonb(OLD) - 'seconds_used' - 'updated_at') IS DISTINCT FROM (to_jsonb(NEW) - 'seconds_used' - 'updated_at'))
    EXECUTE FUNCTION callplane_notify_org_changed();
