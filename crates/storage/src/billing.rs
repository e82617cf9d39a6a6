//! `BillingStore` on Postgres: Stripe event deduplication and subscription changes.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{BillingOutcome, BillingStore, StoreResult, SubscriptionChange};
use chrono::{DateTime, Utc};
use tracing::instrument;

#[async_trait]
impl BillingStore for PgStore {
    async fn record_event(&self, id: &str, event_type: &str, created: DateTime<Utc>) -> StoreResult<bool> {
        let n = sqlx::query(
            "INSERT INTO stripe_events (id, event_type, stripe_created) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(event_type)
        .bind(created)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn finish_event(&self, id: &str, org: Option<OrgId>, outcome: BillingOutcome) -> StoreResult<()> {
        sqlx::query("UPDATE stripe_events SET organization_id = $2, outcome = $3 WHERE id = $1")
            .bind(id)
            .bind(org.map(|o| o.0))
            .bind(outcome.as_str())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// One statement: the event applies only if it is not older than the newest one the
    /// organization reflects. A new period starts its counter from the ledger (usually
    /// zero) and re-anchors the monthly periods on the provider's date; the old period's
    /// total stays in the ledger.
    #[instrument(skip_all, fields(org_id = %c.org))]
    async fn apply_subscription(&self, c: &SubscriptionChange) -> StoreResult<BillingOutcome> {
        let (start, end) = c.period.unzip();
        let n = sqlx::query(
            "UPDATE organizations o SET \
                plan = COALESCE($2, o.plan), \
                status_changed_at = CASE WHEN o.status <> $3 THEN now() ELSE o.status_changed_at END, \
                status = $3, \
                seconds_used = CASE WHEN $4::timestamptz IS NULL OR o.period_start = $4 THEN o.seconds_used \
                    ELSE (SELECT COALESCE(sum(billable_seconds), 0)::bigint FROM usage_ledger \
                          WHERE organization_id = o.id AND period_start = $4) END, \
                billing_anchor = CASE WHEN $4::timestamptz IS NULL OR o.period_start = $4 THEN o.billing_anchor ELSE $4 END, \
                period_start = COALESCE($4, o.period_start), \
                period_end = COALESCE($5, o.period_end), \
                stripe_customer_id = COALESCE($6, o.stripe_customer_id), \
                stripe_subscription_id = COALESCE($7, o.stripe_subscription_id), \
                stripe_event_at = $8, updated_at = now() \
             WHERE o.id = $1 AND (o.stripe_event_at IS NULL OR o.stripe_event_at <= $8)",
        )
        .bind(c.org.0)
        .bind(&c.plan)
        .bind(c.status.as_str())
        .bind(start)
        .bind(end)
        .bind(&c.customer_id)
        .bind(&c.subscription_id)
        .bind(c.event_at)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(if n == 1 { BillingOutcome::Applied } else { BillingOutcome::Stale })
    }

    async fn org_by_customer(&self, customer_id: &str) -> StoreResult<Option<OrgId>> {
        let id: Option<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM organizations WHERE stripe_customer_id = $1")
            .bind(customer_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(id.map(OrgId))
    }

    async fn set_customer(&self, org: OrgId, customer_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE organizations SET stripe_customer_id = $2, updated_at = now() WHERE id = $1")
            .bind(org.0)
            .bind(customer_id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn customer_of(&self, org: OrgId) -> StoreResult<Option<String>> {
        let c: Option<Option<String>> =
            sqlx::query_scalar("SELECT stripe_customer_id FROM organizations WHERE id = $1")
                .bind(org.0)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(c.flatten())
    }
}
