//! Calls that never reached `ended`: found for reconciliation against VAPI's record, and
//! marked when VAPI cannot finish them.
//!
//! Every read is bounded in time on both sides so only the partitions that can hold the
//! answer are scanned (the `calls_org_live` partial index keeps the scan to calls not yet
//! ended). Every write names the organization, the call and its partition key.

use crate::{PgStore, db};
use callplane_core::OrgId;
use callplane_core::seams::{StoreError, StoreResult};
use callplane_core::vapi::status_rank;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::QueryBuilder;
use tracing::instrument;

/// A call short of `ended`, as the reconciler sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnfinishedCall {
    pub organization_id: OrgId,
    pub id: String,
    /// VAPI's `createdAt`, the call's partition key.
    pub created_at: DateTime<Utc>,
    pub status: String,
}

#[derive(sqlx::FromRow)]
struct UnfinishedRow {
    organization_id: uuid::Uuid,
    id: String,
    created_at: DateTime<Utc>,
    status: String,
}

impl From<UnfinishedRow> for UnfinishedCall {
    fn from(r: UnfinishedRow) -> Self {
        Self { organization_id: OrgId(r.organization_id), id: r.id, created_at: r.created_at, status: r.status }
    }
}

/// Which unfinished calls to list: created in `[created_from, created_before)`, optionally of
/// one organization, after a position in `(created_at, id)` order.
#[derive(Clone, Debug)]
pub struct UnfinishedFilter {
    pub org: Option<OrgId>,
    pub created_from: DateTime<Utc>,
    pub created_before: DateTime<Utc>,
    /// `(created_at, id)` of the last call of the previous page.
    pub after: Option<(DateTime<Utc>, String)>,
    pub limit: i64,
}

/// The status a reconciled call ends in.
const ENDED: &str = "ended";

impl PgStore {
    /// Calls not yet ended matching `f`, oldest first.
    #[instrument(skip_all, fields(org_id = ?f.org.map(|o| o.0)))]
    pub async fn unfinished_calls(&self, f: &UnfinishedFilter) -> StoreResult<Vec<UnfinishedCall>> {
        let Some(ended) = status_rank(ENDED) else {
            return Err(StoreError::Internal(format!("no status rank for {ENDED:?}")));
        };
        // The rank is written into the statement, not bound: only a literal lets the planner
        // match the `calls_org_live` partial index (`WHERE status_rank < 5`). It is core's
        // constant, never input.
        self.page_of_calls(
            format!("SELECT organization_id, id, created_at, status FROM calls WHERE status_rank < {ended}"),
            f,
        )
        .await
    }

    /// Calls waiting for review (ended connected, duration unknown) matching `f`, oldest
    /// first. `status` is the review reason.
    #[instrument(skip_all, fields(org_id = ?f.org.map(|o| o.0)))]
    pub async fn calls_for_review(&self, f: &UnfinishedFilter) -> StoreResult<Vec<UnfinishedCall>> {
        let select = "SELECT organization_id, id, created_at, review_reason AS status FROM calls \
                      WHERE review_reason IS NOT NULL";
        self.page_of_calls(select.to_owned(), f).await
    }

    /// One page of `select` (a query over `calls` ending in a WHERE clause) within `f`'s
    /// bounds, in `(created_at, id)` order.
    async fn page_of_calls(&self, select: String, f: &UnfinishedFilter) -> StoreResult<Vec<UnfinishedCall>> {
        let mut q = QueryBuilder::new(select);
        q.push(" AND created_at >= ").push_bind(f.created_from);
        q.push(" AND created_at < ").push_bind(f.created_before);
        if let Some(org) = f.org {
            q.push(" AND organization_id = ").push_bind(org.0);
        }
        if let Some((created_at, id)) = &f.after {
            q.push(" AND (created_at, id) > (").push_bind(*created_at).push(", ").push_bind(id.clone()).push(")");
        }
        q.push(" ORDER BY created_at, id LIMIT ").push_bind(f.limit.max(1));
        let rows: Vec<UnfinishedRow> = q.build_query_as().fetch_all(&self.pool).await.map_err(db)?;
        Ok(rows.into_iter().map(UnfinishedCall::from).collect())
    }

    /// Holds the advisory lock `name` while `work` runs, when no other process holds it: then
    /// one process does the work at a time (a sweep, a phase move, a conversion), however many
    /// run. Returns `None` (without running `work`) when another holds it. The lock is the
    /// session's, on one direct connection kept for the whole run (a transaction pooler would
    /// hand the unlock to another session), and is let go when `work` ends or the connection
    /// drops.
    pub async fn exclusively<T>(&self, name: &str, work: impl Future<Output = T>) -> StoreResult<Option<T>> {
        let mut conn = self.direct.acquire().await.map_err(db)?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(name)
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        if !got {
            return Ok(None);
        }
        let result = work.await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))").bind(name).execute(&mut *conn).await;
        if unlocked.is_err() {
            // The lock must not outlive the run on a pooled connection.
            conn.detach();
        }
        Ok(Some(result))
    }

    /// Why a call waits for review, if it does.
    pub async fn review_reason(
        &self,
        org: OrgId,
        call_id: &str,
        created_at: DateTime<Utc>,
    ) -> StoreResult<Option<String>> {
        let reason: Option<Option<String>> = sqlx::query_scalar(
            "SELECT review_reason FROM calls WHERE organization_id = $1 AND id = $2 AND created_at = $3",
        )
        .bind(org.0)
        .bind(call_id)
        .bind(created_at)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(reason.flatten())
    }

    /// How many calls wait for review, for operators (`/metrics`).
    pub async fn calls_for_review_count(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT count(*) FROM calls WHERE review_reason IS NOT NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }

    /// Moves a call that VAPI cannot finish to `ended` without billing it, recording why.
    /// Returns false when the call had ended meanwhile (its report arrived): nothing changes.
    /// The ended reason stays empty: VAPI gave none. A report that arrives later still bills
    /// the call, once, through the pipeline.
    #[instrument(skip_all, fields(org_id = %org, call_id = %call_id))]
    pub async fn mark_call_unfinished(
        &self,
        org: OrgId,
        call_id: &str,
        created_at: DateTime<Utc>,
        note: &str,
    ) -> StoreResult<bool> {
        let rank = status_rank(ENDED);
        let changed = sqlx::query(
            "UPDATE calls SET status = $4, status_rank = $5, reconciled_at = now(), reconcile_note = $6, \
                              updated_at = now() \
             WHERE organization_id = $1 AND id = $2 AND created_at = $3 AND status_rank < $5",
        )
        .bind(org.0)
        .bind(call_id)
        .bind(created_at)
        .bind(ENDED)
        .bind(rank)
        .bind(note)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(changed == 1)
    }

    /// Records that a call was finished from VAPI's record rather than from a report it sent.
    #[instrument(skip_all, fields(org_id = %org, call_id = %call_id))]
    pub async fn note_call_reconciled(
        &self,
        org: OrgId,
        call_id: &str,
        created_at: DateTime<Utc>,
        note: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE calls SET reconciled_at = now(), reconcile_note = $4, updated_at = now() \
             WHERE organization_id = $1 AND id = $2 AND created_at = $3",
        )
        .bind(org.0)
        .bind(call_id)
        .bind(created_at)
        .bind(note)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }
}
