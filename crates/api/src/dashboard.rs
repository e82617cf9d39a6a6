//! The dashboard's REST API under `/v1`. Every handler takes a [`Caller`] and reads only that
//! organization's data; another organization's ids are simply not found.

use crate::auth::Caller;
use crate::consistency::written;
use crate::extract::{JsonBody, ValidPath, ValidQuery, refuse_nul_in_json};
use crate::{ApiError, AppState};
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use callplane_core::ErrorCode;
use callplane_core::seams::{CallCursor, CallFilter};
use callplane_core::vapi::status_rank;
use callplane_core::{CallRecord, OrgId, RawJson};
use chrono::{DateTime, Datelike, Days, Duration, NaiveDate, Utc};
use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Instant;
use utoipa::{IntoParams, ToSchema};

/// A call as the dashboard sees it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CallView {
    /// VAPI's call id.
    pub id: String,
    /// When VAPI created the call (the partition key).
    pub created_at: DateTime<Utc>,
    /// `inboundPhoneCall`, `outboundPhoneCall`, `webCall`, ...
    pub call_type: Option<String>,
    /// `scheduled`, `queued`, `ringing`, `in-progress`, `forwarding`, `ended`; only moves forward.
    pub status: String,
    pub ended_reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_seconds: Option<f64>,
    /// Billed seconds (set once the end-of-call report arrived).
    pub billable_seconds: Option<i64>,
    /// VAPI's cost in USD.
    pub cost: Option<f64>,
    pub summary: Option<String>,
    /// VAPI's analysis, as stored (written out as read, not rebuilt).
    #[schema(value_type = Option<Object>)]
    pub analysis: Option<RawJson>,
    pub recording_url: Option<String>,
    pub assistant_id: Option<String>,
    pub phone_number_id: Option<String>,
    pub customer_number: Option<String>,
}

impl From<CallRecord> for CallView {
    fn from(c: CallRecord) -> Self {
        CallView {
            id: c.id,
            created_at: c.created_at,
            call_type: c.call_type,
            status: c.status,
            ended_reason: c.ended_reason,
            started_at: c.started_at,
            ended_at: c.ended_at,
            duration_seconds: c.duration_seconds,
            billable_seconds: c.billable_seconds,
            cost: c.cost,
            summary: c.summary,
            analysis: c.analysis,
            recording_url: c.recording_url,
            assistant_id: c.assistant_id,
            phone_number_id: c.phone_number_id,
            customer_number: c.customer_number,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CallList {
    pub data: Vec<CallView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CallDetail {
    #[serde(flatten)]
    pub call: CallView,
    /// The transcript text (`AI: ...\nUser: ...`), once known.
    pub transcript: Option<String>,
    /// VAPI's conversation messages.
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    /// Whether the transcript is the end-of-call report's (final) or a live one.
    pub transcript_final: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LiveCalls {
    pub count: usize,
    pub data: Vec<CallView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub plan: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub seconds_used: i64,
    /// Started minutes: `ceil(seconds_used / 60)`.
    pub minutes_used: i64,
    pub minutes_included: i64,
    pub minutes_left: i64,
    pub overage_minutes: i64,
    pub overage_cents: i64,
    /// Whether calls stop when the included minutes are used up.
    pub hard_limit: bool,
    /// Calls billed in this period.
    pub calls: i64,
    /// Thresholds of the included minutes reached this period (80, 90, 100), oldest first.
    pub alerts: Vec<UsageAlertView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageAlertView {
    /// 80, 90 or 100 (% of the included minutes).
    pub threshold: i32,
    pub seconds_used: i64,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DailyUsageView {
    pub day: NaiveDate,
    pub calls: i64,
    /// The calls' durations, in seconds.
    pub seconds: f64,
    pub billable_seconds: i64,
    /// Billed minutes, rounded up.
    pub minutes: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DailyUsageList {
    /// The organization's billing time zone (IANA name), in which the days are counted.
    pub time_zone: String,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub data: Vec<DailyUsageView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunctionDataEntry {
    pub key: String,
    #[schema(value_type = Object)]
    pub value: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunctionDataList {
    pub data: Vec<FunctionDataEntry>,
}

/// Filters shared by the call listing and the CSV export.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CallQuery {
    /// Only calls in this status.
    pub status: Option<String>,
    /// Created at or after (RFC 3339, years 1970 to 9999). Default: 12 months before `to`.
    #[param(value_type = Option<DateTime<Utc>>)]
    pub from: Option<String>,
    /// Created before (RFC 3339, years 1970 to 9999). Default: now (plus a day of clock skew).
    #[param(value_type = Option<DateTime<Utc>>)]
    pub to: Option<String>,
    pub ended_reason: Option<String>,
    pub assistant_id: Option<String>,
    /// E.164, e.g. +14155550123.
    pub customer_number: Option<String>,
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DailyQuery {
    /// First day (YYYY-MM-DD, in the organization's billing time zone, years 1970 to 9999).
    /// Default: 29 days before `to`.
    #[param(value_type = Option<NaiveDate>)]
    pub from: Option<String>,
    /// Last day, inclusive. Default: today in the billing time zone.
    #[param(value_type = Option<NaiveDate>)]
    pub to: Option<String>,
}

fn bad(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::client(code, message)
}

/// The years a date in a query may name. Calls are only recorded from 1970 to 9999 (see
/// `callplane_core::vapi::RawTime`); within them every date library and PostgreSQL agree, and a
/// window's arithmetic (a year either side) cannot leave what chrono represents.
const YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;

/// A query parameter's time, RFC 3339 with any offset, within [`YEARS`] (in UTC).
pub(crate) fn parse_time(param: &str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    let t: DateTime<Utc> = raw.parse().map_err(|_| {
        bad(
            ErrorCode::InvalidQuery,
            format!("`{param}` is not an RFC 3339 time such as 2026-05-01T00:00:00Z: {}", shown(raw)),
        )
    })?;
    in_years(param, raw, t.year())?;
    Ok(t)
}

/// A query parameter's day, `YYYY-MM-DD`, within [`YEARS`].
pub(crate) fn parse_day(param: &str, raw: &str) -> Result<NaiveDate, ApiError> {
    let day: NaiveDate = raw.parse().map_err(|_| {
        bad(ErrorCode::InvalidQuery, format!("`{param}` is not a day such as 2026-05-01: {}", shown(raw)))
    })?;
    in_years(param, raw, day.year())?;
    Ok(day)
}

fn in_years(param: &str, raw: &str, year: i32) -> Result<(), ApiError> {
    if YEARS.contains(&year) {
        Ok(())
    } else {
        let (first, last) = (YEARS.start(), YEARS.end());
        Err(bad(ErrorCode::InvalidQuery, format!("`{param}` must be in the years {first} to {last}: {}", shown(raw))))
    }
}

/// A client's value, quoted and shortened, for a message.
fn shown(raw: &str) -> String {
    format!("{:?}", raw.chars().take(64).collect::<String>())
}

/// An opaque page position: `{created_at micros}|{id}`, base64url.
pub(crate) fn encode_cursor(c: &CallCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{}", c.created_at.timestamp_micros(), c.id))
}

/// The inverse of [`encode_cursor`]. A cursor comes from the client, so anything that could
/// not have been encoded from a stored call (a time outside [`YEARS`], a NUL in the id) is
/// refused here rather than by the database.
pub(crate) fn decode_cursor(s: &str) -> Result<CallCursor, ApiError> {
    let invalid = || bad(ErrorCode::InvalidCursor, "`cursor` is not a cursor this API returned");
    let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid())?;
    let text = String::from_utf8(raw).map_err(|_| invalid())?;
    let (micros, id) = text.split_once('|').ok_or_else(invalid)?;
    let created_at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .filter(|t| YEARS.contains(&t.year()))
        .ok_or_else(invalid)?;
    if id.contains('\0') {
        return Err(invalid());
    }
    Ok(CallCursor { created_at, id: id.to_owned() })
}

const MAX_PAGE: i64 = 200;
const MAX_WINDOW_DAYS: i64 = 3 * 366;

/// `t + by`, or a 400 where that leaves what chrono represents (which no `now` in [`YEARS`] does).
fn shifted(t: DateTime<Utc>, by: Duration) -> Result<DateTime<Utc>, ApiError> {
    t.checked_add_signed(by).ok_or_else(|| bad(ErrorCode::InvalidQuery, "the default window is out of range"))
}

pub(crate) fn filter(q: &CallQuery, now: DateTime<Utc>) -> Result<CallFilter, ApiError> {
    if let Some(s) = &q.status
        && status_rank(s).is_none()
    {
        return Err(bad(
            ErrorCode::InvalidFilter,
            format!("`status` {s:?} is not one of scheduled, queued, ringing, in-progress, forwarding, ended"),
        ));
    }
    let to = match &q.to {
        Some(raw) => parse_time("to", raw)?,
        None => shifted(now, Duration::days(1))?,
    };
    let from = match &q.from {
        Some(raw) => parse_time("from", raw)?,
        None => shifted(to, -Duration::days(366))?,
    };
    if from >= to {
        return Err(bad(ErrorCode::InvalidFilter, "`from` must be before `to`"));
    }
    // Each page walks the window back a few months per statement; keep that walk bounded.
    if to - from > Duration::days(MAX_WINDOW_DAYS) {
        return Err(bad(
            ErrorCode::InvalidFilter,
            format!("the window from `from` to `to` is at most {MAX_WINDOW_DAYS} days"),
        ));
    }
    Ok(CallFilter {
        from,
        to,
        status: q.status.clone(),
        ended_reason: q.ended_reason.clone(),
        assistant_id: q.assistant_id.clone(),
        customer_number: q.customer_number.clone(),
    })
}

/// List calls, newest first.
#[utoipa::path(get, path = "/v1/calls", tag = "calls", params(CallQuery),
    responses((status = 200, body = CallList), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_calls(
    State(s): State<AppState>,
    caller: Caller,
    ValidQuery(q): ValidQuery<CallQuery>,
) -> Result<Json<CallList>, ApiError> {
    let started = Instant::now();
    let f = filter(&q, Utc::now())?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(bad(ErrorCode::InvalidFilter, format!("`limit` must be between 1 and {MAX_PAGE}")));
    }
    let cursor = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let org = caller.org_id;
    let (f, cursor) = (&f, cursor.as_ref());
    let page =
        s.reads.run(org, caller.read_after, |r| async move { r.calls.list_calls(org, f, cursor, limit).await }).await?;
    s.metrics.api_query("calls.list", started.elapsed());
    Ok(Json(CallList {
        data: page.calls.into_iter().map(CallView::from).collect(),
        next_cursor: page.next.as_ref().map(encode_cursor),
    }))
}

/// One call, with its transcript and messages.
#[utoipa::path(get, path = "/v1/calls/{id}", tag = "calls", params(("id" = String, Path, description = "VAPI call id")),
    responses((status = 200, body = CallDetail), (status = 404, body = crate::error::ErrorBody),
        (status = 410, description = "`call_archived`: the call's month is archived", body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_call(
    State(s): State<AppState>,
    caller: Caller,
    ValidPath(id): ValidPath<String>,
) -> Result<Json<CallDetail>, ApiError> {
    let started = Instant::now();
    let org = caller.org_id;
    let id = id.as_str();
    let found = s
        .reads
        .run(org, caller.read_after, |r| async move {
            Ok(match r.calls.get_call(org, id).await? {
                Some(call) => Ok((call, r.transcripts.get(org, id).await?.unwrap_or_default())),
                // Not found: it may be in a month archived to object storage.
                None => Err(r.calls.archived_month(org, id).await?),
            })
        })
        .await?;
    let (call, transcript) = found.map_err(|archived| match archived {
        Some(month) => ApiError::client(
            ErrorCode::CallArchived,
            format!("call {id} is in {month}, archived to object storage; `callplane partitions restore {month}` brings it back"),
        ),
        None => call_not_found(id),
    })?;
    s.metrics.api_query("calls.get", started.elapsed());
    Ok(Json(CallDetail {
        call: call.into(),
        transcript: transcript.text,
        messages: transcript.messages,
        transcript_final: transcript.is_final,
    }))
}

fn call_not_found(id: &str) -> ApiError {
    ApiError::client(ErrorCode::CallNotFound, format!("no call {id} in this organization"))
}

/// Calls in progress now.
#[utoipa::path(get, path = "/v1/calls/live", tag = "calls", responses((status = 200, body = LiveCalls)), security(("bearer" = [])))]
pub async fn live_calls(State(s): State<AppState>, caller: Caller) -> Result<Json<LiveCalls>, ApiError> {
    let started = Instant::now();
    // A call still "live" after a day lost its end events; it is not counted as in progress.
    let (org, since) = (caller.org_id, Utc::now() - Duration::days(1));
    let calls = s.reads.run(org, caller.read_after, |r| async move { r.calls.live_calls(org, since).await }).await?;
    s.metrics.api_query("calls.live", started.elapsed());
    Ok(Json(LiveCalls { count: calls.len(), data: calls.into_iter().map(CallView::from).collect() }))
}

const CSV_HEADER: &str = "id,created_at,status,ended_reason,started_at,ended_at,duration_seconds,billable_seconds,cost,customer_number,assistant_id,phone_number_id\n";

/// Calls per page of the export.
const EXPORT_PAGE: i64 = 500;

/// Whether a spreadsheet opening the CSV would run `v` as a formula: it starts with one of
/// OWASP's triggers (`=`, `+`, `-`, `@`, tab, carriage return), and is not a plain E.164 phone
/// number (`+` and 1 to 15 digits), the one harmless value here that starts with one. A negative
/// number is neutralised too: the rule stays one line, and none of the exported numbers is
/// negative.
fn runs_as_formula(v: &str) -> bool {
    let e164 =
        v.strip_prefix('+').is_some_and(|d| (1..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()));
    v.starts_with(['=', '+', '-', '@', '\t', '\r']) && !e164
}

/// Appends one RFC 4180 cell. Text that would run as a formula (see [`runs_as_formula`]) gets a
/// leading `'` and is quoted, so a spreadsheet shows it as the text it is (OWASP's advice for
/// CSV injection); otherwise a cell is quoted only when it holds a comma, a quote or a line
/// break. Quotes inside are doubled.
fn csv_field(out: &mut String, v: &str) {
    let formula = runs_as_formula(v);
    if formula || v.contains([',', '"', '\n', '\r']) {
        out.push('"');
        if formula {
            out.push('\'');
        }
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

/// One CSV record: the cells separated by commas, ending in a newline.
pub(crate) fn csv_line<S: AsRef<str>>(cells: &[S]) -> String {
    let mut out = String::new();
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(&mut out, cell.as_ref());
    }
    out.push('\n');
    out
}

fn csv_row(c: &CallRecord) -> String {
    let t = |d: Option<DateTime<Utc>>| d.map(|d| d.to_rfc3339()).unwrap_or_default();
    csv_line(&[
        c.id.clone(),
        c.created_at.to_rfc3339(),
        c.status.clone(),
        c.ended_reason.clone().unwrap_or_default(),
        t(c.started_at),
        t(c.ended_at),
        c.duration_seconds.map(|d| d.to_string()).unwrap_or_default(),
        c.billable_seconds.map(|d| d.to_string()).unwrap_or_default(),
        c.cost.map(|d| d.to_string()).unwrap_or_default(),
        c.customer_number.clone().unwrap_or_default(),
        c.assistant_id.clone().unwrap_or_default(),
        c.phone_number_id.clone().unwrap_or_default(),
    ])
}

/// Every call matching the filters as CSV, streamed page by page.
///
/// The first page is read before answering, so a request the database refuses gets its error
/// status; a failure on a later page can only cut the body short (and is logged).
#[utoipa::path(get, path = "/v1/calls/export.csv", tag = "calls", params(CallQuery),
    responses((status = 200, content_type = "text/csv", body = String)), security(("bearer" = [])))]
pub async fn export_csv(
    State(s): State<AppState>,
    caller: Caller,
    ValidQuery(q): ValidQuery<CallQuery>,
) -> Result<Response, ApiError> {
    let f = filter(&q, Utc::now())?;
    let org: OrgId = caller.org_id;
    // Every page from the database the first came from.
    let calls = s.reads.choose(org, caller.read_after).await.calls.clone();
    let first = calls.list_calls(org, &f, None, EXPORT_PAGE).await?;
    let head: String = std::iter::once(CSV_HEADER.to_owned()).chain(first.calls.iter().map(csv_row)).collect();
    // State: where the next page starts; `None` once the last page was sent.
    let rest = stream::unfold(first.next, move |cursor| {
        let calls = calls.clone();
        let f = f.clone();
        async move {
            let cursor = cursor?;
            match calls.list_calls(org, &f, Some(&cursor), EXPORT_PAGE).await {
                Ok(page) => Some((Ok(page.calls.iter().map(csv_row).collect::<String>()), page.next)),
                Err(e) => {
                    tracing::error!(error = %e, "CSV export failed mid-stream");
                    Some((Err(std::io::Error::other("export failed")), None))
                }
            }
        }
    });
    let body = stream::once(async { Ok(head) }).chain(rest);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"calls.csv\""),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// Usage in the current billing period.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", responses((status = 200, body = Usage)), security(("bearer" = [])))]
pub async fn usage(State(s): State<AppState>, caller: Caller) -> Result<Json<Usage>, ApiError> {
    let started = Instant::now();
    let org = s
        .orgs
        .get(caller.org_id)
        .await?
        .ok_or_else(|| ApiError::client(ErrorCode::OrganizationNotFound, "the organization no longer exists"))?;
    let org = org.as_of(Utc::now());
    let plan = s.plans.get(&org.plan);
    let seconds_used = s.metering.used(org.id, org.period_start).await?;
    let included = plan.map(|p| p.included_minutes).unwrap_or(0);
    let minutes_used = (seconds_used + 59) / 60;
    let hard_limit = plan.is_some_and(|p| p.hard_limit);
    let overage_minutes = if hard_limit { 0 } else { (minutes_used - included).max(0) };
    let (calls, alerts) = s
        .reads
        .run(org.id, caller.read_after, |r| async move {
            Ok((
                r.calls.period_calls(org.id, org.period_start).await?,
                r.calls.usage_alerts(org.id, org.period_start).await?,
            ))
        })
        .await?;
    s.metrics.api_query("usage", started.elapsed());
    Ok(Json(Usage {
        plan: org.plan.clone(),
        period_start: org.period_start,
        period_end: org.period_end,
        seconds_used,
        minutes_used,
        minutes_included: included,
        minutes_left: (included - minutes_used).max(0),
        overage_minutes,
        overage_cents: overage_minutes * plan.map(|p| p.overage_cents_per_minute).unwrap_or(0),
        hard_limit,
        calls,
        alerts: alerts
            .into_iter()
            .map(|a| UsageAlertView { threshold: a.threshold, seconds_used: a.seconds_used, at: a.at })
            .collect(),
    }))
}

/// Billed usage per day, the days counted in the organization's billing time zone (UTC unless
/// set): the daily roll-up kept in the same transaction as each ledger row.
#[utoipa::path(get, path = "/v1/usage/daily", tag = "usage", params(DailyQuery),
    responses((status = 200, body = DailyUsageList), (status = 400, body = crate::error::ErrorBody)), security(("bearer" = [])))]
pub async fn usage_daily(
    State(s): State<AppState>,
    caller: Caller,
    ValidQuery(q): ValidQuery<DailyQuery>,
) -> Result<Json<DailyUsageList>, ApiError> {
    let started = Instant::now();
    let org = caller.org_id;
    let day = s.reads.run(org, caller.read_after, |r| async move { r.calls.billing_day(org).await }).await?;
    let (time_zone, today) = day.ok_or_else(|| {
        ApiError::client(ErrorCode::OrganizationNotFound, "the organization of this key no longer exists")
    })?;
    let (from, to) = days(&q, today)?;
    let rows = s.reads.run(org, caller.read_after, |r| async move { r.calls.daily_usage(org, from, to).await }).await?;
    s.metrics.api_query("usage.daily", started.elapsed());
    Ok(Json(DailyUsageList {
        time_zone,
        from,
        to,
        data: rows
            .into_iter()
            .map(|d| DailyUsageView {
                day: d.day,
                calls: d.calls,
                seconds: d.seconds,
                billable_seconds: d.billable_seconds,
                minutes: (d.billable_seconds + 59) / 60,
            })
            .collect(),
    }))
}

/// The inclusive range of days a daily-usage query asks for.
pub(crate) fn days(q: &DailyQuery, today: NaiveDate) -> Result<(NaiveDate, NaiveDate), ApiError> {
    let to = match &q.to {
        Some(raw) => parse_day("to", raw)?,
        None => today,
    };
    let from = match &q.from {
        Some(raw) => parse_day("from", raw)?,
        None => to
            .checked_sub_days(Days::new(29))
            .ok_or_else(|| bad(ErrorCode::InvalidQuery, "the default range is out of range"))?,
    };
    if from > to || (to - from).num_days() > 366 {
        return Err(bad(ErrorCode::InvalidFilter, "`from` must not be after `to`, and the range is at most 366 days"));
    }
    Ok((from, to))
}

fn validate_key(key: &str) -> Result<(), ApiError> {
    let ok = (1..=128).contains(&key.len())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        return Err(bad(ErrorCode::InvalidKey, "keys are 1 to 128 characters of A-Z, a-z, 0-9, _, - and ."));
    }
    // Function data is preloaded into the call's variables, next to callplane's own.
    if key.to_ascii_lowercase().starts_with("callplane") {
        return Err(bad(ErrorCode::ReservedKey, "keys starting with `callplane` are reserved"));
    }
    Ok(())
}

/// All of the organization's function data.
#[utoipa::path(get, path = "/v1/function-data", tag = "function-data", responses((status = 200, body = FunctionDataList)), security(("bearer" = [])))]
pub async fn list_function_data(State(s): State<AppState>, caller: Caller) -> Result<Json<FunctionDataList>, ApiError> {
    let org = caller.org_id;
    let all = s.reads.run(org, caller.read_after, |r| async move { r.function_data.preload(org).await }).await?;
    Ok(Json(FunctionDataList { data: all.into_iter().map(|(key, value)| FunctionDataEntry { key, value }).collect() }))
}

/// One function-data value.
#[utoipa::path(get, path = "/v1/function-data/{key}", tag = "function-data", params(("key" = String, Path)),
    responses((status = 200, body = FunctionDataEntry), (status = 404, body = crate::error::ErrorBody)), security(("bearer" = [])))]
pub async fn get_function_data(
    State(s): State<AppState>,
    caller: Caller,
    ValidPath(key): ValidPath<String>,
) -> Result<Json<FunctionDataEntry>, ApiError> {
    validate_key(&key)?;
    let org = caller.org_id;
    let k = key.as_str();
    let value = s.reads.run(org, caller.read_after, |r| async move { r.function_data.get(org, k).await }).await?;
    let value = value.ok_or_else(|| key_not_found(&key))?;
    Ok(Json(FunctionDataEntry { key, value }))
}

fn key_not_found(key: &str) -> ApiError {
    ApiError::client(ErrorCode::KeyNotFound, format!("no function data under {key:?}"))
}

/// Sets a function-data value (any JSON). The agent sees it from the next call on.
#[utoipa::path(put, path = "/v1/function-data/{key}", tag = "function-data", params(("key" = String, Path)),
    request_body(content = Object, description = "Any JSON value"),
    responses((status = 200, body = FunctionDataEntry, headers(("callplane-read-after" = String, description = "When a read replica serves the dashboard's reads: the primary's log position after this write. Sent back as a request header, it makes reads on any server see this write."))),
        (status = 400, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_function_data(
    State(s): State<AppState>,
    caller: Caller,
    ValidPath(key): ValidPath<String>,
    JsonBody(body): JsonBody,
) -> Result<(HeaderMap, Json<FunctionDataEntry>), ApiError> {
    validate_key(&key)?;
    if body.len() > s.max_function_data_bytes {
        return Err(ApiError::client(
            ErrorCode::FunctionDataTooLarge,
            format!("a value is at most {} bytes of JSON; this one is {}", s.max_function_data_bytes, body.len()),
        ));
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| bad(ErrorCode::MalformedJson, format!("the body is not valid JSON: {e}")))?;
    refuse_nul_in_json(&value)?;
    s.function_data.put(caller.org_id, &key, &value).await?;
    // This process's next answer reads the change (others hear of it by notification).
    s.agents.invalidate(caller.org_id);
    Ok((written(&s, caller.org_id).await, Json(FunctionDataEntry { key, value })))
}

/// Deletes a function-data value.
#[utoipa::path(delete, path = "/v1/function-data/{key}", tag = "function-data", params(("key" = String, Path)),
    responses((status = 204, headers(("callplane-read-after" = String, description = "When a read replica serves the dashboard's reads: the primary's log position after this write. Sent back as a request header, it makes reads on any server see this write."))),
        (status = 404, body = crate::error::ErrorBody)), security(("bearer" = [])))]
pub async fn delete_function_data(
    State(s): State<AppState>,
    caller: Caller,
    ValidPath(key): ValidPath<String>,
) -> Result<(StatusCode, HeaderMap), ApiError> {
    validate_key(&key)?;
    if s.function_data.delete(caller.org_id, &key).await? {
        s.agents.invalidate(caller.org_id);
        Ok((StatusCode::NO_CONTENT, written(&s, caller.org_id).await))
    } else {
        Err(key_not_found(&key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TRIGGERS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

    /// Reads RFC 4180 records (LF line ends, as the export writes them) back into cells; an
    /// error for anything a strict reader would not accept.
    fn read_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
        enum At {
            CellStart,
            Plain,
            Quoted,
            QuoteInQuoted,
        }
        let (mut records, mut record, mut cell, mut at) = (Vec::new(), Vec::new(), String::new(), At::CellStart);
        for c in text.chars() {
            at = match (at, c) {
                (At::CellStart, '"') => At::Quoted,
                (At::CellStart | At::Plain | At::QuoteInQuoted, ',') => {
                    record.push(std::mem::take(&mut cell));
                    At::CellStart
                }
                (At::CellStart | At::Plain | At::QuoteInQuoted, '\n') => {
                    record.push(std::mem::take(&mut cell));
                    records.push(std::mem::take(&mut record));
                    At::CellStart
                }
                (At::CellStart | At::Plain, '"' | '\r') => return Err(format!("{c:?} in an unquoted cell")),
                (At::CellStart | At::Plain, c) => {
                    cell.push(c);
                    At::Plain
                }
                (At::Quoted, '"') => At::QuoteInQuoted,
                (At::Quoted, c) => {
                    cell.push(c);
                    At::Quoted
                }
                (At::QuoteInQuoted, '"') => {
                    cell.push('"');
                    At::Quoted
                }
                (At::QuoteInQuoted, c) => return Err(format!("{c:?} after a closing quote")),
            };
        }
        match at {
            At::CellStart if record.is_empty() && cell.is_empty() => Ok(records),
            _ => Err("the text ends inside a record".to_owned()),
        }
    }

    fn is_e164(v: &str) -> bool {
        v.len() >= 2 && v.len() <= 16 && v.starts_with('+') && v[1..].bytes().all(|b| b.is_ascii_digit())
    }

    fn cell() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[=+@\t\r\n\",' a-z0-9-]{0,12}", "\\+[0-9]{0,17}", "[=+@-][0-9=+A-Z!|' ]{0,12}",]
    }

    #[test]
    fn formula_cells_are_neutralised_and_e164_numbers_are_not() {
        let line =
            csv_line(&["=cmd|' /C calc'!A0", "+1=2+3", "+14155550100", "@SUM(A1)", "-2+3", "\tx", "plain, \"q\""]);
        assert_eq!(
            line,
            "\"'=cmd|' /C calc'!A0\",\"'+1=2+3\",+14155550100,\"'@SUM(A1)\",\"'-2+3\",\"'\tx\",\"plain, \"\"q\"\"\"\n"
        );
        assert_eq!(csv_line(&["+1234567890123456"]), "\"'+1234567890123456\"\n", "16 digits are not E.164");
        assert_eq!(csv_line(&["+"]), "\"'+\"\n");
    }

    #[test]
    fn out_of_range_dates_are_invalid_queries_naming_the_parameter() {
        for raw in
            ["-262143-01-01T00:00:00Z", "+262142-12-31T23:59:59Z", "1969-12-31T23:59:59Z", "10000-01-01T00:00:00Z"]
        {
            let e = parse_time("to", raw).unwrap_err();
            assert_eq!(e.code().as_str(), "invalid_query", "{raw}");
            assert!(format!("{e:?}").contains("`to`"), "{e:?}");
        }
        assert_eq!(parse_day("from", "-262143-01-01").unwrap_err().code().as_str(), "invalid_query");
        let q = CallQuery { to: Some("-262143-01-01T00:00:00Z".into()), ..CallQuery::default() };
        assert_eq!(filter(&q, Utc::now()).unwrap_err().code().as_str(), "invalid_query");
        let q = DailyQuery { to: Some("-262143-01-01".into()), from: None };
        assert_eq!(days(&q, Utc::now().date_naive()).unwrap_err().code().as_str(), "invalid_query");
        assert!(parse_time("to", "9999-12-31T23:59:59.999999999Z").is_ok());
        assert!(parse_time("from", "1970-01-01T00:00:00Z").is_ok());
    }

    #[test]
    fn cursors_holding_a_nul_or_an_unstorable_time_are_refused() {
        for text in ["1767225600000000|a\0b", "-8210266876800000000|x", "253402300800000000|x"] {
            assert_eq!(
                decode_cursor(&URL_SAFE_NO_PAD.encode(text)).unwrap_err().code().as_str(),
                "invalid_cursor",
                "{text}"
            );
        }
    }

    fn chrono_seconds() -> std::ops::RangeInclusive<i64> {
        DateTime::<Utc>::MIN_UTC.timestamp()..=DateTime::<Utc>::MAX_UTC.timestamp()
    }

    /// Any time chrono can write, as RFC 3339.
    fn any_time_text() -> impl Strategy<Value = String> {
        (chrono_seconds(), 0u32..1_000_000_000)
            .prop_filter_map("in chrono's range", |(s, n)| DateTime::from_timestamp(s, n))
            .prop_map(|t| t.to_rfc3339())
    }

    fn query_time() -> impl Strategy<Value = Option<String>> {
        prop::option::of(prop_oneof![any_time_text(), any::<String>(), "[0-9T:+Z.-]{0,30}"])
    }

    proptest! {
        #[test]
        fn prop_csv_rows_read_back_as_their_cells_and_none_starts_a_formula(
            a in prop::collection::vec(cell(), 1..12),
            b in prop::collection::vec(cell(), 1..12),
        ) {
            let text = format!("{}{}", csv_line(&a), csv_line(&b));
            let records = read_csv(&text).map_err(TestCaseError::fail)?;
            prop_assert_eq!(records.len(), 2, "{:?}", text);
            for (written, read) in [(&a, &records[0]), (&b, &records[1])] {
                prop_assert_eq!(written.len(), read.len());
                for (w, r) in written.iter().zip(read) {
                    let neutralised = r.strip_prefix('\'').filter(|rest| rest == w).is_some();
                    prop_assert!(r == w || neutralised, "{:?} came back as {:?}", w, r);
                    prop_assert!(!r.starts_with(TRIGGERS) || is_e164(r), "{:?} starts a formula", r);
                }
            }
        }

        #[test]
        fn prop_cursors_round_trip(micros in 0i64..=253_402_300_799_999_999, id in any::<String>()) {
            let id = id.replace('\0', "");
            let created_at = DateTime::from_timestamp_micros(micros).unwrap();
            let cursor = CallCursor { created_at, id };
            let decoded = decode_cursor(&encode_cursor(&cursor)).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!(decoded, cursor);
        }

        #[test]
        fn prop_cursor_decoding_never_panics_and_only_accepts_storable_cursors(
            text in prop_oneof![
                any::<String>(),
                prop::collection::vec(any::<u8>(), 0..48).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
                (any::<i64>(), any::<String>()).prop_map(|(m, id)| URL_SAFE_NO_PAD.encode(format!("{m}|{id}"))),
            ],
        ) {
            match decode_cursor(&text) {
                Ok(c) => prop_assert!(YEARS.contains(&c.created_at.year()) && !c.id.contains('\0')),
                Err(e) => prop_assert_eq!(e.code().as_str(), "invalid_cursor"),
            }
        }

        #[test]
        fn prop_query_times_round_trip_within_the_years_and_are_refused_outside(
            s in chrono_seconds(),
            nanos in 0u32..1_000_000_000,
        ) {
            let Some(t) = DateTime::from_timestamp(s, nanos) else { return Ok(()) };
            let parsed = parse_time("from", &t.to_rfc3339());
            if YEARS.contains(&t.year()) {
                prop_assert_eq!(parsed.map_err(|e| TestCaseError::fail(format!("{e:?}")))?, t);
            } else {
                prop_assert_eq!(parsed.unwrap_err().code().as_str(), "invalid_query");
            }
            let day = t.date_naive();
            match parse_day("to", &day.to_string()) {
                Ok(parsed) => prop_assert!(YEARS.contains(&day.year()) && parsed == day),
                Err(e) => prop_assert!(!YEARS.contains(&day.year()) && e.code().as_str() == "invalid_query"),
            }
        }

        #[test]
        fn prop_call_filters_never_panic_and_stay_within_bounds(
            from in query_time(),
            to in query_time(),
            now in chrono_seconds(),
        ) {
            let now = DateTime::from_timestamp(now, 0).unwrap();
            let q = CallQuery { from, to, ..CallQuery::default() };
            match filter(&q, now) {
                Ok(f) => {
                    prop_assert!(f.from < f.to);
                    prop_assert!(f.to - f.from <= Duration::days(MAX_WINDOW_DAYS));
                }
                Err(e) => prop_assert!(["invalid_query", "invalid_filter"].contains(&e.code().as_str())),
            }
        }

        #[test]
        fn prop_daily_ranges_never_panic_and_stay_within_bounds(
            from in prop::option::of(prop_oneof![any::<String>(), any_time_text().prop_map(|t| t[..t.find('T').unwrap()].to_owned())]),
            to in prop::option::of(prop_oneof![any::<String>(), any_time_text().prop_map(|t| t[..t.find('T').unwrap()].to_owned())]),
            today in chrono_seconds(),
        ) {
            let today = DateTime::from_timestamp(today, 0).unwrap().date_naive();
            match days(&DailyQuery { from, to }, today) {
                Ok((from, to)) => prop_assert!(from <= to && (to - from).num_days() <= 366),
                Err(e) => prop_assert!(["invalid_query", "invalid_filter"].contains(&e.code().as_str())),
            }
        }
    }
}
