-- Phase moves (`callplane phase apply`): which backend serves each seam, held here so every
-- running process follows a move without a restart, and the processes that follow it.

-- A seam's backend while a move is under way or once one has run. A row here wins over the
-- seam's `[backends]` setting. `also` is a second backend written to while a move is under
-- way (reads come from `backend`). `version` rises with every change, from one sequence, so a
-- process can say which change it has applied.
CREATE SEQUENCE backend_route_version;

CREATE TABLE backend_routes (
    seam text PRIMARY KEY,
    backend text NOT NULL,
    also text,
    version bigint NOT NULL DEFAULT nextval('backend_route_version'),
    changed_at timestamptz NOT NULL DEFAULT now(),
    -- what made the change, e.g. "phase apply 2 --step counters: seed"
    changed_by text NOT NULL,
    CHECK (also IS DISTINCT FROM backend)
);

-- Every running `serve` and `worker`, heartbeating about once a second: which route version
-- it has applied, what it can serve, and what it could not apply.
CREATE TABLE servers (
    id uuid PRIMARY KEY,
    kind text NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at timestamptz NOT NULL,
    route_version bigint NOT NULL,
    -- the backends this process can serve, e.g. {"redis": "redis://127.0.0.1:6379/0"}
    capabilities jsonb NOT NULL,
    -- seam -> why this process could not take the route the table gives it
    problems jsonb NOT NULL DEFAULT '{}'
);
