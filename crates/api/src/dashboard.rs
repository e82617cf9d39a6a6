//! The dashboard's REST API under `/v1`. Every handler takes a [`Caller`] and reads only that
//! organization's data; another organization's ids are simply not found.

use crate::auth::Caller;
use crate::extract::{JsonBody, ValidQuery};
use crate::{ApiError, AppState};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use callplane_core::seams::{CallCursor, CallFilter};
use callplane_core::vapi::status_rank;
use callplane_core::{CallRecord, OrgId};
use chrono::{DateTime, Duration, NaiveDate, Utc};
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
    #[schema(value_type = Option<Object>)]
    pub analysis: Option<Value>,
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
    pub billable_seconds: i64,
    pub minutes: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DailyUsageList {
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
    /// Created at or after (RFC 3339). Default: 12 months before `to`.
    pub from: Option<DateTime<Utc>>,
    /// Created before (RFC 3339). Default: now (plus a day of clock skew).
    pub to: Option<DateTime<Utc>>,
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
    /// First day (YYYY-MM-DD, UTC). Default: 29 days before `to`.
    pub from: Option<NaiveDate>,
    /// Last day, inclusive. Default: today.
    pub to: Option<NaiveDate>,
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::client(StatusCode::BAD_REQUEST, code, message)
}

fn encode_cursor(c: &CallCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{}", c.created_at.timestamp_micros(), c.id))
}

fn decode_cursor(s: &str) -> Result<CallCursor, ApiError> {
    let invalid = || bad("invalid_cursor", "`cursor` is not a cursor this API returned");
    let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid())?;
    let text = String::from_utf8(raw).map_err(|_| invalid())?;
    let (micros, id) = text.split_once('|').ok_or_else(invalid)?;
    let created_at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(invalid)?;
    Ok(CallCursor { created_at, id: id.to_owned() })
}

const MAX_PAGE: i64 = 200;
const MAX_WINDOW_DAYS: i64 = 3 * 366;

fn filter(q: &CallQuery, now: DateTime<Utc>) -> Result<CallFilter, ApiError> {
    if let Some(s) = &q.status
        && status_rank(s).is_none()
    {
        return Err(bad(
            "invalid_filter",
            format!("`status` {s:?} is not one of scheduled, queued, ringing, in-progress, forwarding, ended"),
        ));
    }
    let to = q.to.unwrap_or(now + Duration::days(1));
    let from = q.from.unwrap_or(to - Duration::days(366));
    if from >= to {
        return Err(bad("invalid_filter", "`from` must be before `to`"));
    }
    // Each page walks the window a month at a time; keep that walk bounded.
    if to - from > Duration::days(MAX_WINDOW_DAYS) {
        return Err(bad("invalid_filter", format!("the window from `from` to `to` is at most {MAX_WINDOW_DAYS} days")));
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
        return Err(bad("invalid_filter", format!("`limit` must be between 1 and {MAX_PAGE}")));
    }
    let cursor = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let page = s.calls.list_calls(caller.org_id, &f, cursor.as_ref(), limit).await?;
    s.metrics.api_query("calls.list", started.elapsed());
    Ok(Json(CallList {
        data: page.calls.into_iter().map(CallView::from).collect(),
        next_cursor: page.next.as_ref().map(encode_cursor),
    }))
}

/// One call, with its transcript and messages.
#[utoipa::path(get, path = "/v1/calls/{id}", tag = "calls", params(("id" = String, Path, description = "VAPI call id")),
    responses((status = 200, body = CallDetail), (status = 404, body = crate::error::ErrorBody)), security(("bearer" = [])))]
pub async fn get_call(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CallDetail>, ApiError> {
    let started = Instant::now();
    let call = s.calls.get_call(caller.org_id, &id).await?.ok_or_else(|| call_not_found(&id))?;
    let transcript = s.transcripts.get(caller.org_id, &id).await?.unwrap_or_default();
    s.metrics.api_query("calls.get", started.elapsed());
    Ok(Json(CallDetail {
        call: call.into(),
        transcript: transcript.text,
        messages: transcript.messages,
        transcript_final: transcript.is_final,
    }))
}

fn call_not_found(id: &str) -> ApiError {
    ApiError::client(StatusCode::NOT_FOUND, "call_not_found", format!("no call {id} in this organization"))
}

/// Calls in progress now.
#[utoipa::path(get, path = "/v1/calls/live", tag = "calls", responses((status = 200, body = LiveCalls)), security(("bearer" = [])))]
pub async fn live_calls(State(s): State<AppState>, caller: Caller) -> Result<Json<LiveCalls>, ApiError> {
    let started = Instant::now();
    // A call still "live" after a day lost its end events; it is not counted as in progress.
    let calls = s.calls.live_calls(caller.org_id, Utc::now() - Duration::days(1)).await?;
    s.metrics.api_query("calls.live", started.elapsed());
    Ok(Json(LiveCalls { count: calls.len(), data: calls.into_iter().map(CallView::from).collect() }))
}

const CSV_HEADER: &str = "id,created_at,status,ended_reason,started_at,ended_at,duration_seconds,billable_seconds,cost,customer_number,assistant_id,phone_number_id\n";

fn csv_field(out: &mut String, v: &str) {
    if v.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

fn csv_row(c: &CallRecord) -> String {
    let t = |d: Option<DateTime<Utc>>| d.map(|d| d.to_rfc3339()).unwrap_or_default();
    let fields = [
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
    ];
    let mut out = String::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(&mut out, f);
    }
    out.push('\n');
    out
}

/// Every call matching the filters as CSV, streamed page by page.
#[utoipa::path(get, path = "/v1/calls/export.csv", tag = "calls", params(CallQuery),
    responses((status = 200, content_type = "text/csv", body = String)), security(("bearer" = [])))]
pub async fn export_csv(
    State(s): State<AppState>,
    caller: Caller,
    ValidQuery(q): ValidQuery<CallQuery>,
) -> Result<Response, ApiError> {
    let f = filter(&q, Utc::now())?;
    let org: OrgId = caller.org_id;
    let calls = s.calls.clone();
    // State: (cursor, finished). Each step is one page of 500.
    let pages = stream::unfold((None::<CallCursor>, false), move |(cursor, done)| {
        let calls = calls.clone();
        let f = f.clone();
        async move {
            if done {
                return None;
            }
            match calls.list_calls(org, &f, cursor.as_ref(), 500).await {
                Ok(page) => {
                    let chunk: String = page.calls.iter().map(csv_row).collect();
                    let finished = page.next.is_none();
                    Some((Ok::<_, std::io::Error>(chunk), (page.next, finished)))
                }
                Err(e) => {
                    tracing::error!(error = %e, "CSV export failed mid-stream");
                    Some((Err(std::io::Error::other("export failed")), (None, true)))
                }
            }
        }
    });
    let body = stream::once(async { Ok(CSV_HEADER.to_owned()) }).chain(pages);
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
    let org = s.orgs.get(caller.org_id).await?.ok_or_else(|| {
        ApiError::client(StatusCode::NOT_FOUND, "organization_not_found", "the organization no longer exists")
    })?;
    let org = org.as_of(Utc::now());
    let plan = s.plans.get(&org.plan);
    let seconds_used = s.usage.used(org.id, org.period_start).await?;
    let included = plan.map(|p| p.included_minutes).unwrap_or(0);
    let minutes_used = (seconds_used + 59) / 60;
    let hard_limit = plan.is_some_and(|p| p.hard_limit);
    let overage_minutes = if hard_limit { 0 } else { (minutes_used - included).max(0) };
    let calls = s.calls.period_calls(org.id, org.period_start).await?;
    let alerts = s.calls.usage_alerts(org.id, org.period_start).await?;
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

/// Billed usage per day (UTC), from the usage ledger.
#[utoipa::path(get, path = "/v1/usage/daily", tag = "usage", params(DailyQuery),
    responses((status = 200, body = DailyUsageList), (status = 400, body = crate::error::ErrorBody)), security(("bearer" = [])))]
pub async fn usage_daily(
    State(s): State<AppState>,
    caller: Caller,
    ValidQuery(q): ValidQuery<DailyQuery>,
) -> Result<Json<DailyUsageList>, ApiError> {
    let started = Instant::now();
    let to = q.to.unwrap_or_else(|| Utc::now().date_naive());
    let from = q.from.unwrap_or(to - Duration::days(29));
    if from > to || (to - from).num_days() > 366 {
        return Err(bad("invalid_filter", "`from` must not be after `to`, and the range is at most 366 days"));
    }
    let rows = s.calls.daily_usage(caller.org_id, from, to).await?;
    s.metrics.api_query("usage.daily", started.elapsed());
    Ok(Json(DailyUsageList {
        from,
        to,
        data: rows
            .into_iter()
            .map(|d| DailyUsageView {
                day: d.day,
                calls: d.calls,
                billable_seconds: d.billable_seconds,
                minutes: (d.billable_seconds + 59) / 60,
            })
            .collect(),
    }))
}

fn validate_key(key: &str) -> Result<(), ApiError> {
    let ok = (1..=128).contains(&key.len())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        return Err(bad("invalid_key", "keys are 1 to 128 characters of A-Z, a-z, 0-9, _, - and ."));
    }
    // Function data is preloaded into the call's variables, next to callplane's own.
    if key.to_ascii_lowercase().starts_with("callplane") {
        return Err(bad("reserved_key", "keys starting with `callplane` are reserved"));
    }
    Ok(())
}

/// All of the organization's function data.
#[utoipa::path(get, path = "/v1/function-data", tag = "function-data", responses((status = 200, body = FunctionDataList)), security(("bearer" = [])))]
pub async fn list_function_data(State(s): State<AppState>, caller: Caller) -> Result<Json<FunctionDataList>, ApiError> {
    let all = s.function_data.preload(caller.org_id).await?;
    Ok(Json(FunctionDataList { data: all.into_iter().map(|(key, value)| FunctionDataEntry { key, value }).collect() }))
}

/// One function-data value.
#[utoipa::path(get, path = "/v1/function-data/{key}", tag = "function-data", params(("key" = String, Path)),
    responses((status = 200, body = FunctionDataEntry), (status = 404, body = crate::error::ErrorBody)), security(("bearer" = [])))]
pub async fn get_function_data(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> Result<Json<FunctionDataEntry>, ApiError> {
    validate_key(&key)?;
    let value = s.function_data.get(caller.org_id, &key).await?.ok_or_else(|| key_not_found(&key))?;
    Ok(Json(FunctionDataEntry { key, value }))
}

fn key_not_found(key: &str) -> ApiError {
    ApiError::client(StatusCode::NOT_FOUND, "key_not_found", format!("no function data under {key:?}"))
}

/// Sets a function-data value (any JSON). The agent sees it from the next call on.
#[utoipa::path(put, path = "/v1/function-data/{key}", tag = "function-data", params(("key" = String, Path)),
    request_body(content = Object, description = "Any JSON value"),
    responses((status = 200, body = FunctionDataEntry), (status = 400, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_function_data(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<FunctionDataEntry>, ApiError> {
    validate_key(&key)?;
    if body.len() > s.max_function_data_bytes {
        return Err(ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "function_data_too_large",
            format!("a value is at most {} bytes of JSON; this one is {}", s.max_function_data_bytes, body.len()),
        ));
    }
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| bad("malformed_json", format!("the body is not valid JSON: {e}")))?;
    s.function_data.put(caller.org_id, &key, &value).await?;
    // This process's next answer reads the change (others hear of it by notification).
    s.agents.invalidate(caller.org_id);
    Ok(Json(FunctionDataEntry { key, value }))
}

/// Deletes a function-data value.
#[utoipa::path(delete, path = "/v1/function-data/{key}", tag = "function-data", params(("key" = String, Path)),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)), security(("bearer" = [])))]
pub async fn delete_function_data(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    validate_key(&key)?;
    if s.function_data.delete(caller.org_id, &key).await? {
        s.agents.invalidate(caller.org_id);
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(key_not_found(&key))
    }
}
