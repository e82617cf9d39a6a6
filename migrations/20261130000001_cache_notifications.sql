-- Change notifications for the in-process caches that answer VAPI within its deadline
-- (organizations, their function data, and the registries that route the shared URL).
-- Every `callplane serve` listens on `callplane_cache` and forgets what changed; the payload
-- is `org:<organization id>` or `registry:`.

CREATE FUNCTION callplane_notify_org_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'organizations' THEN
        PERFORM pg_notify('callplane_cache', 'org:' || COALESCE(NEW.id, OLD.id)::text);
    ELSE
        PERFORM pg_notify('callplane_cache', 'org:' || COALESCE(NEW.organization_id, OLD.organization_id)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION callplane_notify_registry_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('callplane_cache', 'registry:');
    RETURN NULL;
END
$$;

CREATE TRIGGER organizations_cache AFTER INSERT OR UPDATE OR DELETE ON organizations
    FOR EACH ROW EXECUTE FUNCTION callplane_notify_org_changed();
CREATE TRIGGER function_data_cache AFTER INSERT OR UPDATE OR DELETE ON function_data
    FOR EACH ROW EXECUTE FUNCTION callplane_notify_org_changed();
CREATE TRIGGER phone_numbers_cache AFTER INSERT OR UPDATE OR DELETE ON phone_numbers
    FOR EACH STATEMENT EXECUTE FUNCTION callplane_notify_registry_changed();
CREATE TRIGGER assistants_cache AFTER INSERT OR UPDATE OR DELETE ON assistants
    FOR EACH STATEMENT EXECUTE FUNCTION callplane_notify_registry_changed();
