-- The phase advisor's figures over time: what each `callplane serve` measured, one row per UTC
-- day and figure. Counts (`dashboard_requests`, `answers_slow`, ...) are added to by every
-- server; figures named `*_peak` keep the day's highest. Small: about ten rows a day, pruned
-- past a year by partition maintenance.
CREATE TABLE advisor_daily (
    day        date NOT NULL,
    metric     text NOT NULL,
    value      bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, metric)
);
