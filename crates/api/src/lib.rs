//! callplane-api: the HTTP surface. The VAPI webhook endpoint (`POST /vapi/{org_id}`,
//! `POST /vapi`), the dashboard API (`/v1`, with a WebSocket stream), the admin API
//! (`/admin/v1`), `/openapi.json`, and the operational routes (`/healthz`, `/readyz`,
//! `/metrics`).
//!
//! It knows no backend and has no features: everything it touches is a seam trait object in
//! [`AppState`]. Only this crate knows HTTP; every error leaves through [`ApiError`].

mod admin;
pub mod advice;
mod auth;
mod billing;
mod consistency;
mod dashboard;
mod error;
mod extract;
mod metrics;
mod openapi;
mod ops;
mod realtime;
mod search;
mod throttle;
mod vapi;

pub use auth::{ApiKeyCache, DashboardAuth};
pub use error::ApiError;
pub use metrics::{AdvisorLimits, Metrics};
pub use openapi::openapi_json;
pub use ops::{Readiness, WorkerOps, worker_router};
pub use realtime::RealtimeSettings;
pub use throttle::{AuthThrottle, ThrottleSettings};

use axum::Router;
use axum::extract::Request;
use axum::routing::{get, post};
use callplane_core::agent::AgentSettings;
use callplane_core::auth::WebhookAuth;
use callplane_core::billing::Plan;
use callplane_core::reads::Reads;
use callplane_core::seams::{
    AgentDirectory, BillingProvider, BillingWebhooks, EventIntake, FunctionData, OrgAdmin, OrgDirectory, RealtimeBus,
};
use std::collections::HashMap;
use std::sync::Arc;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// Everything a request may use. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub webhook_auth: Arc<WebhookAuth>,
    pub dashboard_auth: Arc<DashboardAuth>,
    /// Failed authentication, counted per address and API-key prefix on every surface.
    pub auth_throttle: Arc<AuthThrottle>,
    pub orgs: Arc<dyn OrgDirectory>,
    pub admin: Arc<dyn OrgAdmin>,
    /// Where webhooks go: durable first, processed at once or later.
    pub intake: Arc<dyn EventIntake>,
    /// What processes the intake's events (its counters are on `/metrics`).
    pub pipeline: Arc<dyn callplane_core::seams::EventPipeline>,
    /// What the agent's answers are read from, in memory.
    pub agents: Arc<dyn AgentDirectory>,
    /// Answers VAPI waits for go out within this, whatever the database does.
    pub answer_deadline: std::time::Duration,
    /// How long a state-changing webhook waits for its processing before it is answered as
    /// queued.
    pub inline_budget: std::time::Duration,
    /// `/readyz` reports not ready while the intake's oldest event is older than this.
    pub ready_max_backlog_seconds: f64,
    /// Function data, as the dashboard writes it (its reads go through `reads`).
    pub function_data: Arc<dyn FunctionData>,
    /// The dashboard's reads (calls, transcripts, search, usage, function data): on a read
    /// replica when one is configured and has what the reader must see, else on the primary.
    pub reads: Reads,
    /// The usage counter with its rules (alerts, admission).
    pub metering: Arc<callplane_core::metering::Metering>,
    pub bus: Arc<dyn RealtimeBus>,
    pub billing: Arc<dyn BillingProvider>,
    pub billing_webhooks: Arc<dyn BillingWebhooks>,
    pub plans: Arc<HashMap<String, Plan>>,
    pub agent: AgentSettings,
    /// Answered when an organization has no assistant of its own.
    pub fallback_assistant_id: Option<String>,
    /// Where VAPI reaches this server; organizations' webhook URLs start with it.
    pub public_url: String,
    pub max_body_bytes: usize,
    pub max_function_data_bytes: usize,
    pub realtime: RealtimeSettings,
    pub metrics: Arc<Metrics>,
    /// When set, `/metrics` answers only `Authorization: Bearer <this>`.
    pub metrics_token: Option<Vec<u8>>,
    pub readiness: Arc<dyn Readiness>,
    /// The phase advisor's figures and judgement (`GET /admin/v1/advice`).
    pub advice: Arc<dyn advice::AdviceSource>,
    /// Turns true when the server is shutting down; WebSocket sessions close on it.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

pub fn router(state: AppState) -> Router {
    let request_id = axum::http::HeaderName::from_static("x-request-id");
    let metrics = state.metrics.clone();
    Router::new()
        .route("/vapi", post(vapi::shared_url))
        .route("/vapi/{org_id}", post(vapi::org_url))
        .route("/v1/calls", get(dashboard::list_calls))
        .route("/v1/calls/live", get(dashboard::live_calls))
        .route("/v1/calls/export.csv", get(dashboard::export_csv))
        .route("/v1/calls/{id}", get(dashboard::get_call))
        .route("/v1/usage", get(dashboard::usage))
        .route("/v1/usage/daily", get(dashboard::usage_daily))
        .route("/v1/search", get(search::search))
        .route("/v1/function-data", get(dashboard::list_function_data))
        .route(
            "/v1/function-data/{key}",
            get(dashboard::get_function_data).put(dashboard::put_function_data).delete(dashboard::delete_function_data),
        )
        .route("/v1/realtime", get(realtime::realtime))
        .route("/v1/billing/checkout", post(billing::checkout))
        .route("/v1/billing/portal", post(billing::portal))
        .route("/stripe/webhook", post(billing::stripe_webhook))
        .route("/admin/v1/organizations", post(admin::create_org).get(admin::list_orgs))
        .route("/admin/v1/organizations/{id}", get(admin::get_org).patch(admin::update_org))
        .route("/admin/v1/organizations/{id}/api-keys", post(admin::create_key))
        .route("/admin/v1/organizations/{id}/api-keys/{key_id}", axum::routing::delete(admin::revoke_key))
        .route("/admin/v1/advice", get(advice::advice))
        .route("/openapi.json", get(ops::openapi))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .with_state(state)
        .layer(panic_layer(metrics))
        // Every request gets an id (or keeps the caller's), echoed back and on every log line
        // of its span; the organization is recorded on the span once known. Query strings
        // are never logged: they may carry an access token.
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id, org_id = tracing::field::Empty)
        }))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// A panic in a handler becomes a 500 with the usual error body and a counter, never a dropped
/// connection. (A webhook's body is kept before anything that can panic runs.)
fn panic_layer(
    metrics: Arc<Metrics>,
) -> tower_http::catch_panic::CatchPanicLayer<impl Fn(Box<dyn std::any::Any + Send>) -> axum::response::Response + Clone>
{
    tower_http::catch_panic::CatchPanicLayer::custom(move |_: Box<dyn std::any::Any + Send>| {
        metrics.panicked();
        axum::response::IntoResponse::into_response(ApiError::Internal("a request handler panicked".into()))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_the_error_body_and_is_counted() {
        let metrics = Arc::new(Metrics::default());
        let app: Router = Router::new()
            .route("/boom", get(|| async { if true { panic!("a bug") } else { "never" } }))
            .layer(panic_layer(metrics.clone()));
        let response = app.oneshot(Request::get("/boom").body(axum::body::Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "internal_error");
        assert_eq!(metrics.panics(), 1);
    }
}
