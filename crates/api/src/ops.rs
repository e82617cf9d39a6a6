//! Health, readiness and metrics.

use crate::auth::{bearer, operator_token_matches};
use crate::throttle::{AuthThrottle, ClientAddr};
use crate::{ApiError, AppState};
use async_trait::async_trait;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::IntoResponse;
use callplane_core::ErrorCode;
use serde_json::json;

/// What `/readyz` and `/metrics` ask of the backends.
#[async_trait]
pub trait Readiness: Send + Sync {
    /// Ok when the database is reachable and every migration is applied; else why not.
    async fn check(&self) -> Result<(), String>;
    /// Gauges for `/metrics`: (name, help, value).
    async fn gauges(&self) -> Vec<(&'static str, &'static str, f64)>;
}

pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database answers with every migration applied and the intake keeps up.
/// Answers within a second whatever the database does (its check has its own timeout), and
/// says why when not ready.
pub async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let database = match tokio::time::timeout(std::time::Duration::from_millis(800), s.readiness.check()).await {
        Ok(result) => result,
        Err(_) => Err("the database check did not finish within 800 ms".into()),
    };
    let intake = s.intake.status();
    let mut reasons = Vec::new();
    if let Err(why) = &database {
        reasons.push(why.clone());
    }
    if !intake.accepting {
        reasons.push("the inbox is full: new events are processed directly or refused".into());
    }
    if intake.oldest_age_seconds > s.ready_max_backlog_seconds {
        reasons.push(format!(
            "the inbox's oldest event has waited {:.0} s (backlog of {} events)",
            intake.oldest_age_seconds, intake.depth
        ));
    }
    let mut detail = json!({
        "database": match &database { Ok(()) => json!({ "ok": true }), Err(why) => json!({ "ok": false, "error": why }) },
        "intake": intake,
    });
    // A replica in trouble sends reads to the primary: shown, never a reason to be unready.
    if let Some(replica) = s.reads.replica_status() {
        detail["replica"] = json!(replica);
    }
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready", "checks": detail })))
    } else {
        let reason = reasons.join("; ");
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not_ready", "reason": reason, "checks": detail })))
    }
}

/// Open unless `server.metrics_token` is set; then only `Authorization: Bearer <token>`,
/// compared in constant time and throttled like every credential.
fn metrics_allowed(
    token: Option<&[u8]>,
    throttle: &AuthThrottle,
    client: &ClientAddr,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let Some(expected) = token else { return Ok(()) };
    let unauthorized = ApiError::client;
    let Some(given) = bearer(headers) else {
        return Err(unauthorized(ErrorCode::MissingCredentials, "send `Authorization: Bearer <metrics token>`"));
    };
    if operator_token_matches(throttle, client, given, expected)? {
        Ok(())
    } else {
        Err(unauthorized(ErrorCode::InvalidMetricsToken, "not the metrics token"))
    }
}

pub async fn metrics(
    State(s): State<AppState>,
    client: ClientAddr,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    metrics_allowed(s.metrics_token.as_deref(), &s.auth_throttle, &client, &headers)?;
    let mut gauges = s.readiness.gauges().await;
    let intake = s.intake.status();
    gauges.extend([
        ("callplane_inbox_depth", "Accepted events waiting in the intake to be processed.", intake.depth as f64),
        ("callplane_inbox_bytes", "Bytes of accepted events waiting in the intake.", intake.bytes as f64),
        ("callplane_inbox_oldest_seconds", "Age of the oldest event waiting in the intake.", intake.oldest_age_seconds),
    ]);
    let counters = [
        (
            "callplane_inbox_drained_total",
            "Events processed (or kept as dead letters) out of the intake by this process.",
            intake.drained_total,
        ),
        (
            "callplane_events_lost_total",
            "Events acknowledged to VAPI that could be stored nowhere. Should read 0.",
            intake.lost_total,
        ),
        (
            "callplane_webhook_shed_total",
            "Webhooks refused with 503 because neither the inbox nor the database could take them.",
            intake.shed_total,
        ),
        (
            "callplane_http_panics_total",
            "Requests whose handler panicked: answered 500, a webhook's body kept as a dead letter.",
            s.metrics.panics(),
        ),
        (
            "callplane_auth_failures_total",
            "Credentials presented and not accepted (API keys, JWTs, admin and metrics tokens, webhook secrets).",
            s.auth_throttle.failures_total(),
        ),
        (
            "callplane_auth_throttled_total",
            "Authentication attempts refused with 429 after too many failures from an address or key prefix.",
            s.auth_throttle.throttled_total(),
        ),
    ];
    let mut text = s.metrics.render(&gauges, &counters);
    if let Some(replica) = s.reads.replica_status() {
        render_replica(&mut text, &replica);
    }
    s.pipeline.render_metrics(&mut text);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

/// The read replica's lag and where reads went.
fn render_replica(out: &mut String, r: &callplane_core::reads::ReplicaStatus) {
    use std::fmt::Write;
    let gauges = [
        (
            "callplane_replica_up",
            "1 while the read replica answers its checks.",
            f64::from(u8::from(r.state != "down")),
        ),
        (
            "callplane_replica_lag_seconds",
            "How long ago the primary wrote the oldest change the read replica has not replayed.",
            r.lag_seconds,
        ),
        (
            "callplane_replica_lag_bytes",
            "Bytes of the primary's log the read replica has not replayed.",
            r.lag_bytes as f64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    }
    let name = "callplane_replica_reads_total";
    let _ = writeln!(out, "# HELP {name} Dashboard reads answered by the read replica.\n# TYPE {name} counter");
    let _ = writeln!(out, "{name} {}", r.reads_on_replica);
    let name = "callplane_replica_fallbacks_total";
    let _ = writeln!(
        out,
        "# HELP {name} Dashboard reads sent to the primary instead of the replica, by reason (down, lagging, \
         behind: had not replayed the reader's writes in time, failed: the read failed there).\n# TYPE {name} counter"
    );
    for (reason, n) in &r.fallbacks {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
    }
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::client(ErrorCode::NotFound, format!("no route for {}", uri.path()))
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], crate::openapi::openapi_json())
}

/// What `callplane worker` serves on `temporal.worker_metrics_addr`: its pipeline's counters
/// (`GET /metrics`, behind the same `server.metrics_token` as `serve`'s) and `GET /healthz`.
#[derive(Clone)]
pub struct WorkerOps {
    pub pipeline: std::sync::Arc<dyn callplane_core::seams::EventPipeline>,
    pub metrics_token: Option<Vec<u8>>,
    pub auth_throttle: std::sync::Arc<AuthThrottle>,
}

pub fn worker_router(ops: WorkerOps) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/metrics", axum::routing::get(worker_metrics))
        .fallback(not_found)
        .with_state(ops)
}

async fn worker_metrics(
    State(ops): State<WorkerOps>,
    headers: HeaderMap,
    request: axum::extract::Request,
) -> Result<impl IntoResponse, ApiError> {
    let (parts, _) = request.into_parts();
    let client = ClientAddr::of(&parts, &ops.auth_throttle);
    metrics_allowed(ops.metrics_token.as_deref(), &ops.auth_throttle, &client, &headers)?;
    let mut out = String::new();
    ops.pipeline.render_metrics(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
