//! callplane-api: the HTTP surface. The VAPI webhook endpoint (`POST /vapi/{org_id}`,
//! `POST /vapi`) and the operational routes (`/healthz`, `/readyz`, `/metrics`).
//!
//! It knows no backend and has no features: everything it touches is a seam trait object in
//! [`AppState`]. Only this crate knows HTTP; every error leaves through [`ApiError`].

mod error;
mod metrics;
mod ops;
mod vapi;

pub use error::ApiError;
pub use metrics::Metrics;
pub use ops::Readiness;

use axum::Router;
use axum::routing::{get, post};
use callplane_core::agent::AgentSettings;
use callplane_core::auth::WebhookAuth;
use callplane_core::billing::Plan;
use callplane_core::seams::{EventPipeline, FunctionData, OrgDirectory};
use std::collections::HashMap;
use std::sync::Arc;

/// Everything a request may use. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub webhook_auth: Arc<WebhookAuth>,
    pub orgs: Arc<dyn OrgDirectory>,
    pub pipeline: Arc<dyn EventPipeline>,
    pub function_data: Arc<dyn FunctionData>,
    pub plans: Arc<HashMap<String, Plan>>,
    pub agent: AgentSettings,
    /// Answered when an organization has no assistant of its own.
    pub fallback_assistant_id: Option<String>,
    pub max_body_bytes: usize,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<dyn Readiness>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/vapi", post(vapi::shared_url))
        .route("/vapi/{org_id}", post(vapi::org_url))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .with_state(state)
}
