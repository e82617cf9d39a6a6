-- callplane phase 1 schema. One linear history for every phase: later phases add to it,
-- never edit it. Every tenant table leads its indexes with organization_id.

CREATE TABLE organizations (
    id                   uuid PRIMARY KEY,
    name                 text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    plan                 text NOT NULL,
    status               text NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'past_due', 'canceled', 'suspended')),
    status_changed_at    timestamptz NOT NULL DEFAULT now(),
    period_start         timestamptz NOT NULL,
    period_end           timestamptz NOT NULL CHECK (period_end > period_start),
    -- The phase-1 usage counter: billed seconds in the current period. Rebuildable from
    -- usage_ledger at any time.
    seconds_used         bigint NOT NULL DEFAULT 0 CHECK (seconds_used >= 0),
    default_assistant_id text,
    stripe_customer_id   text,
    stripe_subscription_id text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id              uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name            text NOT NULL DEFAULT '',
    -- The first characters of the key, shown in listings; the key itself is never stored.
    prefix          text NOT NULL,
    key_hash        bytea NOT NULL UNIQUE,
    last_used_at    timestamptz,
    revoked_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_org ON api_keys (organization_id);

-- VAPI ids registered to an organization, used to resolve the shared webhook URL.
CREATE TABLE phone_numbers (
    vapi_phone_number_id text PRIMARY KEY,
    organization_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    number               text,
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX phone_numbers_org ON phone_numbers (organization_id);

CREATE TABLE assistants (
    vapi_assistant_id text PRIMARY KEY,
    organization_id   uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX assistants_org ON assistants (organization_id);

CREATE TABLE function_data (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    key             text NOT NULL CHECK (length(key) BETWEEN 1 AND 128),
    value           jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, key)
);

-- Global uniqueness of VAPI call ids, and which partition holds each call.
CREATE TABLE call_keys (
    vapi_call_id    text PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    created_at      timestamptz NOT NULL
);
CREATE INDEX call_keys_org ON call_keys (organization_id, created_at);

-- Calls, partitioned by month on VAPI's createdAt from day one.
CREATE TABLE calls (
    id               text NOT NULL,
    organization_id  uuid NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    call_type        text,
    status           text NOT NULL,
    -- Forward-only position of status (scheduled 0 .. ended 5).
    status_rank      smallint NOT NULL,
    ended_reason     text,
    started_at       timestamptz,
    ended_at         timestamptz,
    duration_seconds double precision,
    cost             double precision,
    costs            jsonb,
    summary          text,
    analysis         jsonb,
    recording_url    text,
    assistant_id     text,
    phone_number_id  text,
    customer_number  text,
    billable_seconds bigint,
    -- Set once the end-of-call report has been applied; its fields are authoritative.
    reported_at      timestamptz,
    last_event_at    timestamptz,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX calls_org_created ON calls (organization_id, created_at DESC, id DESC);
CREATE INDEX calls_org_status ON calls (organization_id, status) WHERE status_rank < 5;

CREATE TABLE call_transcripts (
    call_id         text NOT NULL,
    organization_id uuid NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    transcript      text,
    messages        jsonb NOT NULL DEFAULT '[]',
    -- Phase 3 keeps the full text in object storage under this key.
    object_key      text,
    -- Whether the transcript came from the end-of-call report (final) or a live update.
    is_final        boolean NOT NULL DEFAULT false,
    search          tsvector GENERATED ALWAYS AS (to_tsvector('english', coalesce(transcript, ''))) STORED,
    PRIMARY KEY (call_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX call_transcripts_org ON call_transcripts (organization_id, created_at DESC);

-- One row per ended call: the truth behind every usage counter. Usage is attributed to the
-- billing period containing the call's start.
CREATE TABLE usage_ledger (
    call_id          text PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id),
    period_start     timestamptz NOT NULL,
    call_started_at  timestamptz NOT NULL,
    duration_seconds double precision NOT NULL,
    billable_seconds bigint NOT NULL CHECK (billable_seconds >= 0),
    ended_reason     text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_ledger_org_period ON usage_ledger (organization_id, period_start);

-- Events that passed authentication but failed to process. Kept until replayed.
CREATE TABLE dead_letters (
    id              bigserial PRIMARY KEY,
    organization_id uuid,
    call_id         text,
    message_type    text,
    error_code      text NOT NULL,
    error           text NOT NULL,
    payload         jsonb NOT NULL,
    received_at     timestamptz NOT NULL,
    attempts        integer NOT NULL DEFAULT 1,
    last_attempt_at timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_open ON dead_letters (received_at) WHERE resolved_at IS NULL;
CREATE INDEX dead_letters_org ON dead_letters (organization_id, received_at);

-- Creates the monthly partition of calls and call_transcripts containing `month`.
CREATE FUNCTION callplane_ensure_month(month timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    lo timestamptz := date_trunc('month', month AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi timestamptz := lo + interval '1 month';
    suffix text := to_char(lo AT TIME ZONE 'UTC', 'YYYY_MM');
    created boolean := false;
    parent text;
BEGIN
    -- Serialise partition creation: concurrent CREATE ... PARTITION OF would collide.
    PERFORM pg_advisory_xact_lock(hashtext('callplane_partitions'));
    FOREACH parent IN ARRAY ARRAY['calls', 'call_transcripts'] LOOP
        IF to_regclass(format('%I', parent || '_' || suffix)) IS NULL THEN
            EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           parent || '_' || suffix, parent, lo, hi);
            created := true;
        END IF;
    END LOOP;
    RETURN created;
END $$;
