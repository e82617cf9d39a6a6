-- Stripe billing: event deduplication, out-of-order protection, usage alerts.

-- The `created` time of the newest Stripe event applied to the organization: an older event
-- arriving late never rolls the organization back.
ALTER TABLE organizations ADD COLUMN stripe_event_at timestamptz;
CREATE UNIQUE INDEX organizations_stripe_customer ON organizations (stripe_customer_id) WHERE stripe_customer_id IS NOT NULL;

-- Every Stripe event received, by id: a redelivered event is recognised and not applied again.
CREATE TABLE stripe_events (
    id              text PRIMARY KEY,
    event_type      text NOT NULL,
    stripe_created  timestamptz NOT NULL,
    organization_id uuid,
    outcome         text NOT NULL DEFAULT 'received',
    received_at     timestamptz NOT NULL DEFAULT now()
);

-- 80%, 90% and 100% of the included minutes, at most once per organization and period.
CREATE TABLE usage_alerts (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    period_start    timestamptz NOT NULL,
    threshold       integer NOT NULL CHECK (threshold IN (80, 90, 100)),
    seconds_used    bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, period_start, threshold)
);
