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
