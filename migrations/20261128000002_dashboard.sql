-- The dashboard: a resumable per-organization event stream, and reads the API needs.

-- One sequence per organization. Taking the next number locks the organization's cursor row
-- until commit, so an organization's events commit (and are notified) in sequence order.
CREATE TABLE realtime_cursors (
    organization_id uuid PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
    last_seq        bigint NOT NULL
);

-- Every published event, kept for the retention window so a reconnecting client can resume.
CREATE TABLE realtime_events (
    organization_id uuid NOT NULL,
    seq             bigint NOT NULL,
    kind            text NOT NULL,
    call_id         text,
    data            jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, seq)
);
CREATE INDEX realtime_events_created ON realtime_events (created_at);

-- Publishes an event: the next sequence number, the stored copy and the notification, in
-- the caller's transaction.
CREATE FUNCTION callplane_publish(org uuid, event_kind text, event_call text, event_data jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    s bigint;
    at timestamptz := clock_timestamp();
BEGIN
    INSERT INTO realtime_cursors AS c (organization_id, last_seq) VALUES (org, 1)
    ON CONFLICT (organization_id) DO UPDATE SET last_seq = c.last_seq + 1
    RETURNING last_seq INTO s;
    INSERT INTO realtime_events (organization_id, seq, kind, call_id, data, created_at)
    VALUES (org, s, event_kind, event_call, event_data, at);
    PERFORM pg_notify('callplane_events', json_build_object(
        'org_id', org, 'seq', s, 'kind', event_kind, 'call_id', event_call, 'data', event_data, 'at', at)::text);
    RETURN s;
END $$;

-- Live calls are found by status; ended calls are the vast majority and stay out of it.
CREATE INDEX calls_org_live ON calls (organization_id, created_at) WHERE status_rank < 5;
DROP INDEX calls_org_status;
