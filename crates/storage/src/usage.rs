//! `PgUsageCounter`: the phase-1 counter, `organizations.seconds_used`; and the usage ledger
//! as every counter sees it (`impl UsageLedger for PgStore`).
//!
//! A call is added in a short transaction of its own after its ledger row commits: flipping
//! the row's `counted` flag is what makes the add happen once. For a period other than the
//! organization's current one the total is the ledger's.
//!
//! Adds and marks commit asynchronously (`synchronous_commit = off`): they are derived from
//! the ledger, which commits durably first. A crash can lose the last few of them, and loses
//! each one whole (the flag with the total it raised): the row is uncounted again and the
//! repair loop adds it once. So an add does not hold the organization's row through a WAL
//! flush, which is what serialized a busy organization's reports.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::domain::UsageAlert;
use callplane_core::seams::{Counted, StoreResult, UncountedCall, UsageCounter, UsageLedger};
use chrono::{DateTime, Utc};
use tracing::instrument;

#[derive(Clone)]
pub struct PgUsageCounter(pub PgStore);

/// The transaction's commit does not wait for its WAL flush (see the module's note on why
/// that is safe for counting).
async fn relaxed_commit(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> StoreResult<()> {
    sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut **tx).await.map_err(db)?;
    Ok(())
}

#[async_trait]
impl UsageCounter for PgUsageCounter {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    /// The organization row is locked first (the same order as `rebuild`), then the ledger row
    /// flipped to counted; only a flip raises the total.
    #[instrument(skip_all, fields(org_id = %org, call_id))]
    async fn add_call(
        &self,
        org: OrgId,
        period_start: DateTime<Utc>,
        call_id: &str,
        seconds: i64,
    ) -> StoreResult<Counted> {
        // One statement, one round trip: see `callplane_count_call` (migration 20261204000001).
        let (before, after, new): (i64, i64, bool) =
            sqlx::query_as("SELECT total_before, total_after, counted_now FROM callplane_count_call($1, $2, $3, $4)")
                .bind(org.0)
                .bind(period_start)
                .bind(call_id)
                .bind(seconds)
                .fetch_one(self.0.pool())
                .await
                .map_err(db)?;
        Ok(Counted { before: Some(before), after, new })
    }

    /// The organization row is locked first, then the counted ledger rows summed by a later
    /// statement: in READ COMMITTED that statement sees every add that committed before we got
    /// the lock, and an add still in flight waits for ours and adds on top. Rows not counted
    /// yet are left to their add (or the repair loop), which raises the rebuilt total.
    #[instrument(skip_all, fields(org_id = %org))]
    async fn rebuild(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        let mut tx = self.0.pool().begin().await.map_err(db)?;
        let current: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT period_start FROM organizations WHERE id = $1 FOR UPDATE")
                .bind(org.0)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        if current != Some(period_start) {
            // Only the current period is counted on the row; earlier ones are the ledger's.
            let total = self.0.ledger_total_in(&mut tx, org, period_start).await?;
            tx.commit().await.map_err(db)?;
            return Ok(total);
        }
        let total = self.0.counted_total_in(&mut tx, org, period_start).await?;
        sqlx::query("UPDATE organizations SET seconds_used = $2, updated_at = now() WHERE id = $1")
            .bind(org.0)
            .bind(total)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(total)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn used(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        sqlx::query_scalar(
            "SELECT COALESCE((SELECT seconds_used FROM organizations WHERE id = $1 AND period_start = $2), \
                             (SELECT sum(billable_seconds)::bigint FROM usage_ledger \
                              WHERE organization_id = $1 AND period_start = $2), 0)",
        )
        .bind(org.0)
        .bind(period_start)
        .fetch_one(self.0.pool())
        .await
        .map_err(db)
    }
}

impl PgStore {
    /// The ledger's total for an organization's billing period: the truth every counter is
    /// checked against.
    pub async fn ledger_total(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        let mut conn = self.pool().acquire().await.map_err(db)?;
        self.ledger_total_in(&mut conn, org, period_start).await
    }

    async fn ledger_total_in(
        &self,
        conn: &mut sqlx::PgConnection,
        org: OrgId,
        period_start: DateTime<Utc>,
    ) -> StoreResult<i64> {
        sum_ledger(conn, org, period_start, false).await
    }

    /// The period's total of the ledger rows whose counter add is done.
    pub(crate) async fn counted_total_in(
        &self,
        conn: &mut sqlx::PgConnection,
        org: OrgId,
        period_start: DateTime<Utc>,
    ) -> StoreResult<i64> {
        sum_ledger(conn, org, period_start, true).await
    }

    /// Ledger rows whose counter add is not done yet, across organizations.
    pub async fn uncounted_calls(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT count(*) FROM usage_ledger WHERE NOT counted")
            .fetch_one(self.pool())
            .await
            .map_err(db)
    }
}

/// The billable seconds of an organization's period in the ledger, all rows or the counted ones.
async fn sum_ledger(
    conn: &mut sqlx::PgConnection,
    org: OrgId,
    period_start: DateTime<Utc>,
    counted_only: bool,
) -> StoreResult<i64> {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(billable_seconds), 0)::bigint FROM usage_ledger \
         WHERE organization_id = $1 AND period_start = $2 AND (counted OR NOT $3)",
    )
    .bind(org.0)
    .bind(period_start)
    .bind(counted_only)
    .fetch_one(conn)
    .await
    .map_err(db)
}

#[async_trait]
impl UsageLedger for PgStore {
    async fn calls_in_period(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>> {
        sqlx::query_as(
            "SELECT call_id, billable_seconds FROM usage_ledger WHERE organization_id = $1 AND period_start = $2",
        )
        .bind(org.0)
        .bind(period_start)
        .fetch_all(self.pool())
        .await
        .map_err(db)
    }

    async fn total(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        self.ledger_total(org, period_start).await
    }

    async fn mark_counted(&self, org: OrgId, call_ids: &[String]) -> StoreResult<()> {
        let mut tx = self.pool().begin().await.map_err(db)?;
        relaxed_commit(&mut tx).await?;
        sqlx::query(
            "UPDATE usage_ledger SET counted = true WHERE organization_id = $1 AND call_id = ANY($2) AND NOT counted",
        )
        .bind(org.0)
        .bind(call_ids)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn uncounted(&self, older_than: std::time::Duration, limit: i64) -> StoreResult<Vec<UncountedCall>> {
        let rows: Vec<(uuid::Uuid, String, DateTime<Utc>, i64, String)> = sqlx::query_as(
            "SELECT l.organization_id, l.call_id, l.period_start, l.billable_seconds, o.plan \
             FROM usage_ledger l JOIN organizations o ON o.id = l.organization_id \
             WHERE NOT l.counted AND l.created_at < now() - make_interval(secs => $1) \
             ORDER BY l.created_at LIMIT $2",
        )
        .bind(older_than.as_secs_f64())
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(org, call_id, period_start, seconds, plan)| UncountedCall {
                org: OrgId(org),
                call_id,
                period_start,
                seconds,
                plan,
            })
            .collect())
    }

    async fn record_alert(&self, org: OrgId, a: &UsageAlert) -> StoreResult<bool> {
        let recorded = sqlx::query(
            "INSERT INTO usage_alerts (organization_id, period_start, threshold, seconds_used) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(org.0)
        .bind(a.period_start)
        .bind(a.threshold)
        .bind(a.seconds_used)
        .execute(self.pool())
        .await
        .map_err(db)?
        .rows_affected()
            == 1;
        Ok(recorded)
    }
}
