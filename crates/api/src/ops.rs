//! Health, readiness and metrics.

use crate::{ApiError, AppState};
use async_trait::async_trait;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::IntoResponse;
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

pub async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.readiness.check().await {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ready" }))),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not_ready", "reason": why }))),
    }
}

pub async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let gauges = s.readiness.gauges().await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render(&gauges))
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::client(StatusCode::NOT_FOUND, "not_found", format!("no route for {}", uri.path()))
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], crate::openapi::openapi_json())
}
