//! `CallReads` on Postgres: the dashboard's reads, each bounded in time so only the
//! partitions that can hold the answer are scanned.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::seams::{CallCursor, CallFilter, CallPage, CallReads, DailyUsage, StoreResult};
use callplane_core::{CallRecord, OrgId, RawJson};
use chrono::{DateTime, Duration, Months, NaiveDate, Utc};
use serde_json::value::RawValue;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{QueryBuilder, Row};
use tracing::instrument;

pub(crate) const CALL_COLUMNS: &str = "id, organization_id, created_at, call_type, status, ended_reason, started_at, \
    ended_at, duration_seconds, cost, costs, summary, analysis, recording_url, assistant_id, phone_number_id, \
    customer_number, billable_seconds, reported_at, last_event_at";

/// A call from a row of [`CALL_COLUMNS`], read by position (in that order: no name lookup per
/// field of every row of a page).
pub(crate) fn call_from_row(r: &PgRow) -> Result<CallRecord, sqlx::Error> {
    Ok(CallRecord {
        id: r.try_get(0)?,
        organization_id: OrgId(r.try_get(1)?),
        created_at: r.try_get(2)?,
        call_type: r.try_get(3)?,
        status: r.try_get(4)?,
        ended_reason: r.try_get(5)?,
        started_at: r.try_get(6)?,
        ended_at: r.try_get(7)?,
        duration_seconds: r.try_get(8)?,
        cost: r.try_get(9)?,
        costs: raw_json(r, 10)?,
        summary: r.try_get(11)?,
        analysis: raw_json(r, 12)?,
        recording_url: r.try_get(13)?,
        assistant_id: r.try_get(14)?,
        phone_number_id: r.try_get(15)?,
        customer_number: r.try_get(16)?,
        billable_seconds: r.try_get(17)?,
        reported_at: r.try_get(18)?,
        last_event_at: r.try_get(19)?,
    })
}

/// A `jsonb` column as the text PostgreSQL sends: checked as JSON, not built into a tree.
fn raw_json(r: &PgRow, i: usize) -> Result<Option<RawJson>, sqlx::Error> {
    let v: Option<Json<Box<RawValue>>> = r.try_get(i)?;
    Ok(v.map(|Json(raw)| RawJson(raw)))
}

/// Months the first statement of a listing covers (see `list_calls`).
const FIRST_STEP_MONTHS: u32 = 3;

impl PgStore {
    /// One step of a listing: calls in `[lo, hi)` matching the filter, before the
    /// cursor, newest first.
    async fn calls_in(
        &self,
        org: OrgId,
        f: &CallFilter,
        lo: DateTime<Utc>,
        hi: DateTime<Utc>,
        before: Option<&CallCursor>,
        limit: i64,
    ) -> Result<Vec<CallRecord>, sqlx::Error> {
        let mut q = QueryBuilder::new(format!("SELECT {CALL_COLUMNS} FROM calls WHERE organization_id = "));
        q.push_bind(org.0).push(" AND created_at >= ").push_bind(lo).push(" AND created_at < ").push_bind(hi);
        if let Some(c) = before {
            q.push(" AND (created_at, id) < (").push_bind(c.created_at).push(", ").push_bind(c.id.clone()).push(")");
        }
        for (column, value) in [
            ("status", &f.status),
            ("ended_reason", &f.ended_reason),
            ("assistant_id", &f.assistant_id),
            ("customer_number", &f.customer_number),
        ] {
            if let Some(v) = value {
                q.push(format!(" AND {column} = ")).push_bind(v.clone());
            }
        }
        q.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(limit);
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(call_from_row).collect()
    }
}

#[async_trait]
impl CallReads for PgStore {
    /// Walks back from the cursor (or `to`) until the page is full or `from` is reached: the
    /// three months before it in one statement, then twice as long each step. Each statement's
    /// bounds prune it to the partitions they overlap (four at most for the first), read newest
    /// first, stopping once the page is full. A busy organization's page costs one statement
    /// that reads one partition; a quiet one's, one or two instead of one per month. The steps
    /// are spans of time, not calendar months: early in a month, the first still covers three
    /// months of calls.
    #[instrument(skip_all, fields(org_id = %org))]
    async fn list_calls(
        &self,
        org: OrgId,
        f: &CallFilter,
        after: Option<&CallCursor>,
        limit: i64,
    ) -> StoreResult<CallPage> {
        let limit = limit.max(1);
        let mut calls: Vec<CallRecord> = Vec::new();
        // The cursor's instant itself may hold its same-instant siblings (the cursor's
        // condition keeps the ones after it); timestamps are whole microseconds.
        let mut hi = match after {
            Some(c) => c.created_at.checked_add_signed(Duration::microseconds(1)).map_or(f.to, |at| at.min(f.to)),
            None => f.to,
        };
        let mut months = FIRST_STEP_MONTHS;
        while hi > f.from && (calls.len() as i64) <= limit {
            let lo = hi.checked_sub_months(Months::new(months)).map_or(f.from, |lo| lo.max(f.from));
            let want = limit + 1 - calls.len() as i64;
            calls.extend(self.calls_in(org, f, lo, hi, after, want).await.map_err(db)?);
            hi = lo;
            months = months.saturating_mul(2);
        }
        let next = if calls.len() as i64 > limit {
            calls.truncate(limit as usize);
            calls.last().map(|c| CallCursor { created_at: c.created_at, id: c.id.clone() })
        } else {
            None
        };
        Ok(CallPage { calls, next })
    }

    async fn archived_month(&self, org: OrgId, call_id: &str) -> StoreResult<Option<String>> {
        sqlx::query_scalar(
            "SELECT to_char(a.month AT TIME ZONE 'UTC', 'YYYY-MM') FROM call_keys k JOIN partition_archives a \
             ON a.month = date_trunc('month', k.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' \
             WHERE k.vapi_call_id = $2 AND k.organization_id = $1",
        )
        .bind(org.0)
        .bind(call_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn get_call(&self, org: OrgId, call_id: &str) -> StoreResult<Option<CallRecord>> {
        // call_keys says which partition holds the call; another organization's id finds
        // nothing.
        let row = sqlx::query(&format!(
            "SELECT {CALL_COLUMNS} FROM calls c WHERE c.organization_id = $1 AND c.id = $2 \
             AND c.created_at = (SELECT created_at FROM call_keys WHERE vapi_call_id = $2 AND organization_id = $1)"
        ))
        .bind(org.0)
        .bind(call_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(call_from_row).transpose().map_err(db)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn live_calls(&self, org: OrgId, since: DateTime<Utc>) -> StoreResult<Vec<CallRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {CALL_COLUMNS} FROM calls WHERE organization_id = $1 AND created_at >= $2 AND status_rank < 5 \
             ORDER BY created_at DESC, id DESC LIMIT 10000"
        ))
        .bind(org.0)
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(call_from_row).collect::<Result<_, _>>().map_err(db)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn billing_day(&self, org: OrgId) -> StoreResult<Option<(String, NaiveDate)>> {
        sqlx::query_as(
            "SELECT billing_timezone, (now() AT TIME ZONE billing_timezone)::date FROM organizations WHERE id = $1",
        )
        .bind(org.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn daily_usage(&self, org: OrgId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<DailyUsage>> {
        let rows = sqlx::query(
            "SELECT day, sum(calls)::bigint AS calls, sum(seconds) AS seconds, \
                    sum(billable_seconds)::bigint AS billable_seconds \
             FROM daily_usage WHERE organization_id = $1 AND day BETWEEN $2 AND $3 \
             GROUP BY day ORDER BY day",
        )
        .bind(org.0)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(DailyUsage {
                    day: r.try_get("day")?,
                    calls: r.try_get("calls")?,
                    seconds: r.try_get("seconds")?,
                    billable_seconds: r.try_get("billable_seconds")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn period_calls(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT count(*) FROM usage_ledger WHERE organization_id = $1 AND period_start = $2")
            .bind(org.0)
            .bind(period_start)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn usage_alerts(
        &self,
        org: OrgId,
        period_start: DateTime<Utc>,
    ) -> StoreResult<Vec<callplane_core::domain::UsageAlert>> {
        let rows = sqlx::query(
            "SELECT a.threshold, a.period_start, a.seconds_used, a.created_at FROM usage_alerts a \
             WHERE a.organization_id = $1 AND a.period_start = $2 ORDER BY a.threshold",
        )
        .bind(org.0)
        .bind(period_start)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(callplane_core::domain::UsageAlert {
                    threshold: r.try_get("threshold")?,
                    period_start: r.try_get("period_start")?,
                    seconds_used: r.try_get("seconds_used")?,
                    included_seconds: 0,
                    at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db)
    }
}

impl PgStore {
    /// Calls in progress across every organization (created within the last day).
    pub async fn concurrent_calls(&self) -> StoreResult<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM calls WHERE created_at >= now() - interval '1 day' AND status_rank < 5",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }
}
