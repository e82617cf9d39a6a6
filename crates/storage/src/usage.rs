//! `PgUsageCounter`: the phase-1 counter, `organizations.seconds_used`.
//!
//! The pipeline raises it inside the ledger transaction; `add` is for rebuilding and tests.
//! For a period other than the current one the total comes from the ledger.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{StoreResult, UsageCounter};
use chrono::{DateTime, Utc};
use tracing::instrument;

#[derive(Clone)]
pub struct PgUsageCounter(pub PgStore);

#[async_trait]
impl UsageCounter for PgUsageCounter {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn raised_in_ledger_transaction(&self) -> bool {
        true
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn add(&self, org: OrgId, period_start: DateTime<Utc>, seconds: i64) -> StoreResult<i64> {
        let total: Option<i64> = sqlx::query_scalar(
            "UPDATE organizations SET seconds_used = seconds_used + $3, updated_at = now() \
             WHERE id = $1 AND period_start = $2 RETURNING seconds_used",
        )
        .bind(org.0)
        .bind(period_start)
        .bind(seconds)
        .fetch_optional(self.0.pool())
        .await
        .map_err(db)?;
        match total {
            Some(t) => Ok(t),
            None => self.used(org, period_start).await,
        }
    }

    /// The organization row is locked first, then the ledger summed by a later statement: in
    /// READ COMMITTED that statement sees every ledger row whose transaction raised the counter
    /// before we got the lock, and a transaction still to raise it waits for ours and adds on
    /// top. (Summing in the UPDATE itself would use a snapshot from before the wait and lose
    /// the call that held the lock.)
    #[instrument(skip_all, fields(org_id = %org))]
    async fn rebuild(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        let mut tx = self.0.pool().begin().await.map_err(db)?;
        let current: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT period_start FROM organizations WHERE id = $1 FOR UPDATE")
                .bind(org.0)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let total = self.0.ledger_total_in(&mut tx, org, period_start).await?;
        // Only the current period is counted on the row; earlier ones are read from the ledger.
        if current == Some(period_start) {
            sqlx::query("UPDATE organizations SET seconds_used = $2, updated_at = now() WHERE id = $1")
                .bind(org.0)
                .bind(total)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
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
        sqlx::query_scalar(
            "SELECT COALESCE(sum(billable_seconds), 0)::bigint FROM usage_ledger \
             WHERE organization_id = $1 AND period_start = $2",
        )
        .bind(org.0)
        .bind(period_start)
        .fetch_one(conn)
        .await
        .map_err(db)
    }
}
