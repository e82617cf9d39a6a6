//! The backend routes a phase move changes (`backend_routes`) and the processes that follow
//! them (`servers`).

use crate::{PgStore, db};
use callplane_core::routes::{Route, Seam, backend_name};
use callplane_core::seams::{StoreError, StoreResult};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::BTreeMap;

/// The routes the database holds, and the version of the latest change (0: none ever made).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredRoutes {
    pub version: i64,
    pub routes: BTreeMap<Seam, Route>,
}

/// A running process, as its last heartbeat described it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerBeat {
    pub id: uuid::Uuid,
    /// `serve` or `worker`.
    pub kind: String,
    pub host: String,
    pub pid: i32,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
    pub route_version: i64,
    /// The backends it can serve beyond Postgres, e.g. `{"redis": "redis://host:6379/0"}`.
    pub capabilities: Value,
    /// Seam name -> why it could not take the route the database gives it.
    pub problems: Value,
}

impl PgStore {
    pub async fn stored_routes(&self) -> StoreResult<StoredRoutes> {
        let rows: Vec<(String, String, Option<String>, i64)> =
            sqlx::query_as("SELECT seam, backend, also, version FROM backend_routes")
                .fetch_all(self.pool())
                .await
                .map_err(db)?;
        let mut stored = StoredRoutes::default();
        for (seam, backend, also, version) in rows {
            let unknown = || {
                StoreError::Internal(format!(
                    "backend_routes holds {seam} = {backend:?} (also {also:?}), which this build does not know"
                ))
            };
            let (Some(seam_), Some(backend_)) = (Seam::parse(&seam), backend_name(&backend)) else {
                return Err(unknown());
            };
            let also_ = match &also {
                Some(a) => Some(backend_name(a).ok_or_else(unknown)?),
                None => None,
            };
            let (seam, backend, also) = (seam_, backend_, also_);
            stored.version = stored.version.max(version);
            stored.routes.insert(seam, Route { backend, also });
        }
        Ok(stored)
    }

    /// Sets a seam's route; returns the new version.
    pub async fn set_route(&self, seam: Seam, route: Route, changed_by: &str) -> StoreResult<i64> {
        sqlx::query_scalar(
            "INSERT INTO backend_routes (seam, backend, also, changed_by) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (seam) DO UPDATE SET backend = $2, also = $3, changed_by = $4, changed_at = now(), \
             version = nextval('backend_route_version') RETURNING version",
        )
        .bind(seam.name())
        .bind(route.backend)
        .bind(route.also)
        .bind(changed_by)
        .fetch_one(self.pool())
        .await
        .map_err(db)
    }

    /// Records a process's heartbeat.
    pub async fn heartbeat(&self, beat: &ServerBeat) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO servers (id, kind, host, pid, started_at, seen_at, route_version, capabilities, problems) \
             VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET seen_at = now(), route_version = $6, capabilities = $7, problems = $8",
        )
        .bind(beat.id)
        .bind(&beat.kind)
        .bind(&beat.host)
        .bind(beat.pid)
        .bind(beat.started_at)
        .bind(beat.route_version)
        .bind(&beat.capabilities)
        .bind(&beat.problems)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    /// A stopping process says goodbye; processes gone quietly are pruned after a day.
    pub async fn forget_server(&self, id: uuid::Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM servers WHERE id = $1 OR seen_at < now() - interval '1 day'")
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(())
    }

    /// The processes that heartbeated within `within`, by the database's clock.
    pub async fn live_servers(&self, within: std::time::Duration) -> StoreResult<Vec<ServerBeat>> {
        type Row = (uuid::Uuid, String, String, i32, DateTime<Utc>, DateTime<Utc>, i64, Value, Value);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, kind, host, pid, started_at, seen_at, route_version, capabilities, problems FROM servers \
             WHERE seen_at > now() - make_interval(secs => $1) ORDER BY started_at",
        )
        .bind(within.as_secs_f64())
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(id, kind, host, pid, started_at, seen_at, route_version, capabilities, problems)| ServerBeat {
                id,
                kind,
                host,
                pid,
                started_at,
                seen_at,
                route_version,
                capabilities,
                problems,
            })
            .collect())
    }

    /// Counted ledger calls of an organization's period: each has had its counter add (a call
    /// billed 0 s is written counted and never goes to a counter).
    pub async fn counted_calls_in_period(
        &self,
        org: callplane_core::OrgId,
        period_start: DateTime<Utc>,
    ) -> StoreResult<Vec<(String, i64)>> {
        sqlx::query_as(
            "SELECT call_id, billable_seconds FROM usage_ledger \
             WHERE organization_id = $1 AND period_start = $2 AND counted AND billable_seconds > 0",
        )
        .bind(org.0)
        .bind(period_start)
        .fetch_all(self.pool())
        .await
        .map_err(db)
    }

    /// Checks the Postgres counter of an organization's current period against the ledger's
    /// counted rows, exactly: the organization's row is held (as adds hold it) while both are
    /// read. Returns (counter, counted ledger seconds), or `None` when the row's period is not
    /// `period_start`.
    pub async fn check_pg_counter(
        &self,
        org: callplane_core::OrgId,
        period_start: DateTime<Utc>,
    ) -> StoreResult<Option<(i64, i64)>> {
        let mut tx = self.pool().begin().await.map_err(db)?;
        let counter: Option<i64> =
            sqlx::query_scalar("SELECT seconds_used FROM organizations WHERE id = $1 AND period_start = $2 FOR UPDATE")
                .bind(org.0)
                .bind(period_start)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let Some(counter) = counter else { return Ok(None) };
        let counted = self.counted_total_in(&mut tx, org, period_start).await?;
        tx.commit().await.map_err(db)?;
        Ok(Some((counter, counted)))
    }
}
