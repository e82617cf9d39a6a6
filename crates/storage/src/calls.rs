//! Calls and the usage ledger: applying a VAPI event to a call, exactly once.
//!
//! Every event of a call is merged into one row. The rules that make any order and any
//! number of duplicates give the same final row:
//! - `call_keys` fixes the call's `created_at` (its partition) and organization the first
//!   time the call is seen; an event for the same call id from another organization is refused.
//! - status only moves forward (`status_rank`); a stale snapshot never moves it back.
//! - descriptive fields fill in once (`COALESCE`); the end-of-call report's fields win.
//! - the ledger row is unique per call and starts uncounted; the counter seam adds the call
//!   after the row commits (`callplane_core::metering`), once, whatever the backend.

use crate::{PgStore, db};
use callplane_core::ErrorCode;
use callplane_core::OrgId;
use callplane_core::billing::{BillingRules, period_containing};
use callplane_core::domain::{Billed, CallChange, REVIEW_DURATION_UNKNOWN};
use callplane_core::seams::{StoreError, StoreResult, Transcript};
use callplane_core::vapi::{CallReport, MAX_CALL_DURATION_SECONDS, MessageKind, ServerMessage, span, status_rank};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use tracing::instrument;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LedgerRow {
    pub call_id: String,
    pub organization_id: uuid::Uuid,
    pub period_start: DateTime<Utc>,
    pub call_started_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub billable_seconds: i64,
    pub ended_reason: Option<String>,
}

/// How an event is applied.
pub struct ApplyOptions<'a> {
    pub rules: &'a BillingRules,
    /// Queue the change's realtime events in the transaction (the Postgres bus's outbox).
    pub queue_events: bool,
    /// The transcript the event carries, to store in the transaction (the Postgres
    /// transcript store); `None` when there is none or another backend keeps it.
    pub transcript: Option<&'a Transcript>,
}

/// Refusals that no retry can fix.
#[derive(Debug, thiserror::Error)]
pub enum CallRefusal {
    #[error("call {call_id} belongs to another organization")]
    OtherOrganization { call_id: String },
}

type Tx<'t> = sqlx::Transaction<'t, sqlx::Postgres>;

/// What the end-of-call report did to its call.
struct ReportApplied {
    /// Seconds, from the best source present; `None` when no source gave it.
    duration: Option<f64>,
    /// `None` while the duration is unknown for a call that connected: not billed yet.
    billable: Option<i64>,
    duration_unknown: bool,
}

impl PgStore {
    /// Merges one event into its call, in one transaction and one commit, step by step:
    /// register the call (its organization and partition), merge the event into the row, for
    /// an end-of-call report apply the report and write the ledger row (uncounted: the counter
    /// seam adds it after commit), store the transcript when given one, and queue the change's
    /// realtime events when asked. Returns `Ok(None)` for messages that carry no call id.
    #[instrument(skip_all, fields(org_id = %org, call_id = msg.call_id.as_deref().unwrap_or("")))]
    pub async fn apply_call_event(
        &self,
        org: OrgId,
        msg: &ServerMessage,
        received_at: DateTime<Utc>,
        opts: &ApplyOptions<'_>,
    ) -> StoreResult<Option<CallChange>> {
        let Some(call_id) = msg.call_id.clone() else { return Ok(None) };
        let event_at = msg.timestamp.unwrap_or(received_at);
        let claimed_created_at = msg.call_created_at.or(msg.timestamp).unwrap_or(received_at);
        self.ensure_partition_for(claimed_created_at).await?;

        let mut tx = self.pool.begin().await.map_err(db)?;
        let created_at = register_call(&mut tx, org, &call_id, claimed_created_at).await?;
        let (inserted, status_changed, applied) = match &msg.report {
            None => {
                let (inserted, status_changed) = merge_event(&mut tx, org, &call_id, created_at, msg, event_at).await?;
                (inserted, status_changed, None)
            }
            Some(report) => {
                let merged =
                    merge_report(&mut tx, org, &call_id, created_at, msg, report, event_at, opts.rules).await?;
                (merged.inserted, merged.status_changed, Some(merged.applied))
            }
        };
        let mut change = CallChange {
            call_id,
            created_at,
            inserted,
            status_changed,
            billed: None,
            duration_unknown: false,
            transcript: None,
        };
        if let (Some(report), Some(applied)) = (&msg.report, applied) {
            change.duration_unknown = applied.duration_unknown;
            if let Some(billable) = applied.billable {
                change.billed = write_ledger(&mut tx, org, &change, report, applied.duration, billable).await?;
            }
        }
        if let Some(t) = opts.transcript {
            let written = crate::transcripts::write(&mut *tx, org, &change.call_id, created_at, t).await?;
            change.transcript = written.then_some(t.is_final);
        }
        if opts.queue_events {
            crate::realtime::queue_realtime_events(&mut tx, &callplane_core::events::for_change(org, &change)).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(Some(change))
    }
}

/// Step 1: the call's home. The first event registers the call (its organization and the
/// `created_at` that fixes its partition); later events use what was registered. An event
/// for the call id from another organization is refused.
async fn register_call(
    tx: &mut Tx<'_>,
    org: OrgId,
    call_id: &str,
    claimed_created_at: DateTime<Utc>,
) -> StoreResult<DateTime<Utc>> {
    let registered = sqlx::query(
        "INSERT INTO call_keys (vapi_call_id, organization_id, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (vapi_call_id) DO NOTHING RETURNING organization_id, created_at",
    )
    .bind(call_id)
    .bind(org.0)
    .bind(claimed_created_at)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db)?;
    let key = match registered {
        Some(row) => row,
        // Registered before (possibly by a transaction that committed while we waited); a new
        // statement sees it.
        None => sqlx::query("SELECT organization_id, created_at FROM call_keys WHERE vapi_call_id = $1")
            .bind(call_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(db)?,
    };
    let owner: uuid::Uuid = key.try_get("organization_id").map_err(db)?;
    if owner != org.0 {
        let call_id = call_id.to_owned();
        return Err(StoreError::Refused {
            code: ErrorCode::InvalidEvent,
            message: CallRefusal::OtherOrganization { call_id }.to_string(),
        });
    }
    key.try_get("created_at").map_err(db)
}

/// Step 2: inserts the call, or merges the event into it under a row lock so the status
/// change reported is exact. (Partitioned tables cannot return `xmax`, hence two statements.)
/// Returns whether the row was inserted and the status this event moved it to, if any.
async fn merge_event(
    tx: &mut Tx<'_>,
    org: OrgId,
    call_id: &str,
    created_at: DateTime<Utc>,
    msg: &ServerMessage,
    event_at: DateTime<Utc>,
) -> StoreResult<(bool, Option<String>)> {
    let (status, rank) = reported_status(msg);
    // Status updates record when the call connected and ended: the last source of its
    // duration when the end-of-call report carries none.
    let (seen_start, seen_end) = match (msg.kind, status.as_str()) {
        (MessageKind::StatusUpdate, "in-progress") => (msg.timestamp, None),
        (MessageKind::StatusUpdate, "ended") => (None, msg.timestamp),
        _ => (None, None),
    };
    let inserted = sqlx::query(
        "INSERT INTO calls (id, organization_id, created_at, call_type, status, status_rank, ended_reason, \
                            assistant_id, phone_number_id, customer_number, last_event_at, started_at, ended_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (id, created_at) DO NOTHING",
    )
    .bind(call_id)
    .bind(org.0)
    .bind(created_at)
    .bind(&msg.call_type)
    .bind(&status)
    .bind(rank)
    .bind(&msg.ended_reason)
    .bind(&msg.assistant_id)
    .bind(&msg.phone_number_id)
    .bind(&msg.customer_number)
    .bind(event_at)
    .bind(seen_start)
    .bind(seen_end)
    .execute(&mut **tx)
    .await
    .map_err(db)?
    .rows_affected()
        == 1;
    let status_changed = if inserted {
        (rank >= 0).then(|| status.clone())
    } else {
        let before: i16 =
            sqlx::query_scalar("SELECT status_rank FROM calls WHERE id = $1 AND created_at = $2 FOR UPDATE")
                .bind(call_id)
                .bind(created_at)
                .fetch_one(&mut **tx)
                .await
                .map_err(db)?;
        sqlx::query(
            "UPDATE calls SET \
                status = CASE WHEN $3 > status_rank THEN $4 ELSE status END, \
                status_rank = GREATEST(status_rank, $3), \
                call_type = COALESCE(call_type, $5), \
                ended_reason = COALESCE(ended_reason, $6), \
                assistant_id = COALESCE(assistant_id, $7), \
                phone_number_id = COALESCE(phone_number_id, $8), \
                customer_number = COALESCE(customer_number, $9), \
                last_event_at = GREATEST(last_event_at, $10), \
                started_at = COALESCE(started_at, $11), ended_at = COALESCE(ended_at, $12), \
                updated_at = now() \
             WHERE id = $1 AND created_at = $2",
        )
        .bind(call_id)
        .bind(created_at)
        .bind(rank)
        .bind(&status)
        .bind(&msg.call_type)
        .bind(&msg.ended_reason)
        .bind(&msg.assistant_id)
        .bind(&msg.phone_number_id)
        .bind(&msg.customer_number)
        .bind(event_at)
        .bind(seen_start)
        .bind(seen_end)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        (rank > before).then(|| status.clone())
    };
    Ok((inserted, status_changed))
}

/// The status an event reports and its rank; `unknown` (-1) when it reports none.
fn reported_status(msg: &ServerMessage) -> (String, i16) {
    match msg.status.as_deref().and_then(|s| status_rank(s).map(|r| (s, r))) {
        Some((s, r)) => (s.to_owned(), r),
        None => ("unknown".to_owned(), -1),
    }
}

/// A report's call: whether its row was inserted, the status the event moved it to, and what
/// the report did.
struct ReportMerged {
    inserted: bool,
    status_changed: Option<String>,
    applied: ReportApplied,
}

/// The duration from the best source present: the report's duration fields, its times, the
/// call object's times (see `vapi::report`), else the times the status updates recorded.
fn report_duration(
    report: &CallReport,
    recorded_start: Option<DateTime<Utc>>,
    recorded_end: Option<DateTime<Utc>>,
) -> Option<f64> {
    report.duration_seconds.or_else(|| {
        span(report.started_at.or(recorded_start), report.ended_at.or(recorded_end))
            .filter(|d| *d <= MAX_CALL_DURATION_SECONDS as f64)
    })
}

/// Seconds to bill; `None` while the duration of a call that connected is unknown.
fn billable_seconds(rules: &BillingRules, report: &CallReport, duration: Option<f64>) -> Option<i64> {
    match (rules.is_billed_reason(report.ended_reason.as_deref()), duration) {
        (false, _) => Some(0),
        (true, Some(d)) => Some(rules.billable_seconds(Some(d), report.ended_reason.as_deref())),
        (true, None) => None,
    }
}

/// The values a report writes to its call, bound in this order as `$1`..`$19` by both the
/// insert of a new call and the update of a known one.
#[derive(Clone, Copy)]
struct ReportValues<'a> {
    call_id: &'a str,
    created_at: DateTime<Utc>,
    msg: &'a ServerMessage,
    report: &'a CallReport,
    event_at: DateTime<Utc>,
    duration: Option<f64>,
    billable: Option<i64>,
}

impl<'a> ReportValues<'a> {
    fn bind(
        self,
        q: sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let (msg, report) = (self.msg, self.report);
        q.bind(self.call_id)
            .bind(self.created_at)
            .bind(&msg.call_type)
            .bind(&report.ended_reason)
            .bind(&msg.ended_reason)
            .bind(&msg.assistant_id)
            .bind(&msg.phone_number_id)
            .bind(&msg.customer_number)
            .bind(self.event_at)
            .bind(report.started_at)
            .bind(report.ended_at)
            .bind(self.duration)
            .bind(report.cost)
            .bind(&report.costs)
            .bind(&report.summary)
            .bind(&report.analysis)
            .bind(&report.recording_url)
            .bind(self.billable)
            // Used only while the duration is unknown.
            .bind(self.billable.is_none().then_some(REVIEW_DURATION_UNKNOWN))
    }
}

/// Step 2 for an end-of-call report: the event and the report's authoritative fields merged
/// into the call. A call that connected but whose length nobody knows is never billed 0 in
/// silence: it waits for review (reconciliation asks VAPI) and is not billed yet. The first
/// report that knows the duration sets it, with the ledger: a late duplicate never changes
/// what was billed.
///
/// A call not seen before is inserted as the report leaves it, in one statement. A call seen
/// before is locked, its recorded times read (the duration's last source), and the event and
/// the report merged in one update, as `merge_event` and the report's fields would have been
/// one after the other.
#[allow(clippy::too_many_arguments)]
async fn merge_report(
    tx: &mut Tx<'_>,
    org: OrgId,
    call_id: &str,
    created_at: DateTime<Utc>,
    msg: &ServerMessage,
    report: &CallReport,
    event_at: DateTime<Utc>,
    rules: &BillingRules,
) -> StoreResult<ReportMerged> {
    let (status, rank) = reported_status(msg);
    let duration = report_duration(report, None, None);
    let billable = billable_seconds(rules, report, duration);
    let values = ReportValues { call_id, created_at, msg, report, event_at, duration, billable };
    let inserted = values
        .bind(sqlx::query(
            "INSERT INTO calls (id, created_at, call_type, ended_reason, assistant_id, phone_number_id, \
                                customer_number, last_event_at, started_at, ended_at, duration_seconds, cost, \
                                costs, summary, analysis, recording_url, billable_seconds, review_reason, \
                                reported_at, organization_id, status, status_rank) \
             VALUES ($1, $2, $3, COALESCE($4, $5), $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
                     $19, $9, $20, 'ended', 5) \
             ON CONFLICT (id, created_at) DO NOTHING",
        ))
        .bind(org.0)
        .execute(&mut **tx)
        .await
        .map_err(db)?
        .rows_affected()
        == 1;
    if inserted {
        let applied = ReportApplied { duration, billable, duration_unknown: billable.is_none() };
        return Ok(ReportMerged { inserted, status_changed: (rank >= 0).then_some(status), applied });
    }

    let (before, recorded_start, recorded_end): (i16, Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT status_rank, started_at, ended_at FROM calls WHERE id = $1 AND created_at = $2 FOR UPDATE",
    )
    .bind(call_id)
    .bind(created_at)
    .fetch_one(&mut **tx)
    .await
    .map_err(db)?;
    let duration = report_duration(report, recorded_start, recorded_end);
    let billable = billable_seconds(rules, report, duration);
    let values = ReportValues { duration, billable, ..values };
    let review = values
        .bind(sqlx::query(
            "UPDATE calls SET status = 'ended', status_rank = 5, \
                call_type = COALESCE(call_type, $3), \
                ended_reason = COALESCE($4, ended_reason, $5), \
                assistant_id = COALESCE(assistant_id, $6), \
                phone_number_id = COALESCE(phone_number_id, $7), \
                customer_number = COALESCE(customer_number, $8), \
                last_event_at = GREATEST(last_event_at, $9), \
                started_at = COALESCE($10, started_at), ended_at = COALESCE($11, ended_at), \
                duration_seconds = COALESCE(duration_seconds, $12), \
                cost = COALESCE($13, cost), costs = COALESCE($14, costs), summary = COALESCE($15, summary), \
                analysis = COALESCE($16, analysis), recording_url = COALESCE($17, recording_url), \
                review_reason = CASE WHEN billable_seconds IS NOT NULL OR $18::bigint IS NOT NULL THEN NULL \
                                     ELSE $19 END, \
                billable_seconds = COALESCE(billable_seconds, $18), \
                reported_at = COALESCE(reported_at, $9), updated_at = now() \
             WHERE id = $1 AND created_at = $2 RETURNING review_reason IS NOT NULL",
        ))
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?
        .map(|row| row.try_get::<bool, _>(0))
        .transpose()
        .map_err(db)?;
    let applied = ReportApplied { duration, billable, duration_unknown: review.unwrap_or(false) };
    Ok(ReportMerged { inserted, status_changed: (rank > before).then_some(status), applied })
}

/// Step 3: the ledger row, unique per call, written uncounted. A call in a later billing
/// period than the organization's current one moves the organization into that period. Returns
/// what was billed when this event wrote the row (`None`: written before).
async fn write_ledger(
    tx: &mut Tx<'_>,
    org: OrgId,
    change: &CallChange,
    report: &CallReport,
    duration: Option<f64>,
    billable: i64,
) -> StoreResult<Option<Billed>> {
    // A call cannot start before VAPI created it; the pipeline has refused far-future times.
    let started = report.started_at.map_or(change.created_at, |s| s.max(change.created_at));
    let (anchor, plan): (DateTime<Utc>, String) =
        sqlx::query_as("SELECT billing_anchor, plan FROM organizations WHERE id = $1")
            .bind(org.0)
            .fetch_one(&mut **tx)
            .await
            .map_err(db)?;
    let (period_start, period_end) = period_containing(anchor, started);
    // One statement: the ledger row (a row with nothing to add is counted as written); when
    // this statement wrote it, the organization rolled into the call's period if it is a later
    // one (matching, and locking, the row only then: a call of the current period leaves it
    // alone), and the day's usage, kept in step with the ledger. (`daily` is read by the final
    // SELECT because a WITH query that only selects runs only when it is read.)
    let written: bool = sqlx::query_scalar(
        "WITH written AS ( \
             INSERT INTO usage_ledger (call_id, organization_id, period_start, call_started_at, \
                                       duration_seconds, billable_seconds, ended_reason, counted) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $6 = 0) ON CONFLICT (call_id) DO NOTHING RETURNING 1), \
         rolled AS ( \
             UPDATE organizations SET period_start = $3, period_end = $8, seconds_used = 0, updated_at = now() \
             WHERE id = $2 AND period_start < $3 AND EXISTS (SELECT 1 FROM written) RETURNING 1), \
         daily AS (SELECT callplane_add_daily_usage($2, $1, $4, $5, $6) FROM written) \
         SELECT EXISTS (SELECT 1 FROM written) AND (SELECT count(*) FROM daily) = 1",
    )
    .bind(&change.call_id)
    .bind(org.0)
    .bind(period_start)
    .bind(started)
    .bind(duration.unwrap_or(0.0))
    .bind(billable)
    .bind(&report.ended_reason)
    .bind(period_end)
    .fetch_one(&mut **tx)
    .await
    .map_err(db)?;
    if !written {
        return Ok(None);
    }
    Ok(Some(Billed { seconds: billable, period_start, plan }))
}

impl PgStore {
    /// The ledger rows of an organization, oldest call first.
    #[instrument(skip_all, fields(org_id = %org))]
    pub async fn ledger(&self, org: OrgId) -> StoreResult<Vec<LedgerRow>> {
        let rows = sqlx::query(
            "SELECT call_id, organization_id, period_start, call_started_at, duration_seconds, billable_seconds, \
                    ended_reason FROM usage_ledger WHERE organization_id = $1 ORDER BY call_started_at, call_id",
        )
        .bind(org.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(LedgerRow {
                    call_id: r.try_get("call_id")?,
                    organization_id: r.try_get("organization_id")?,
                    period_start: r.try_get("period_start")?,
                    call_started_at: r.try_get("call_started_at")?,
                    duration_seconds: r.try_get("duration_seconds")?,
                    billable_seconds: r.try_get("billable_seconds")?,
                    ended_reason: r.try_get("ended_reason")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db)
    }
}
