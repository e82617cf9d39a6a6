//! The one error type of the HTTP surface: a stable `code` and a message a developer can act
//! on for 4xx; an opaque body for 5xx, with the cause chain logged.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use callplane_core::auth::AuthError;
use callplane_core::seams::{IntakeError, PipelineError, StoreError};
use callplane_core::vapi::ParseError;
use serde_json::json;

/// Every error body: a stable code to branch on, and a message for the developer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable, e.g. `invalid_filter`, `call_not_found`, `invalid_api_key`.
    pub code: String,
    pub message: String,
}

#[derive(Debug)]
pub enum ApiError {
    /// A 4xx with a stable code.
    Client { status: StatusCode, code: &'static str, message: String },
    /// A 5xx; the source is logged, never sent.
    Internal(Box<dyn std::error::Error + Send + Sync>),
    /// A 503 with `Retry-After`: a backend is away or full; the same request can succeed
    /// later. The source is logged, never sent.
    Unavailable { retry_after_seconds: u32, source: Option<Box<dyn std::error::Error + Send + Sync>> },
    /// A 429 with `Retry-After`: too many failed authentication attempts.
    Throttled(crate::throttle::Throttled),
}

impl From<crate::throttle::Throttled> for ApiError {
    fn from(t: crate::throttle::Throttled) -> Self {
        ApiError::Throttled(t)
    }
}

impl ApiError {
    pub fn client(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Client { status, code, message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Client { status, .. } => *status,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Client { code, .. } => code,
            ApiError::Internal(_) => "internal_error",
            ApiError::Unavailable { .. } => "overloaded",
            ApiError::Throttled(_) => crate::throttle::THROTTLED_CODE,
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::client(StatusCode::UNAUTHORIZED, e.code(), e.to_string())
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        ApiError::client(StatusCode::BAD_REQUEST, e.code(), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(message) => ApiError::client(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message),
            StoreError::Backend { .. } => ApiError::Internal(Box::new(e)),
            StoreError::Unavailable { .. } => {
                ApiError::Unavailable { retry_after_seconds: 5, source: Some(Box::new(e)) }
            }
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Rejected { code, message, dead_letter_id } => ApiError::client(
                StatusCode::UNPROCESSABLE_ENTITY,
                code,
                format!("{message} (kept as dead letter {dead_letter_id})"),
            ),
            PipelineError::Unavailable(_) => {
                ApiError::Unavailable { retry_after_seconds: 5, source: Some(Box::new(e)) }
            }
            PipelineError::DeadLettered { .. } | PipelineError::Lost(_) => ApiError::Internal(Box::new(e)),
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        match e {
            IntakeError::Rejected { code, message } => {
                ApiError::client(StatusCode::UNPROCESSABLE_ENTITY, code, format!("{message} (kept as a dead letter)"))
            }
            IntakeError::Overloaded { retry_after_seconds, .. } => {
                ApiError::Unavailable { retry_after_seconds, source: Some(Box::new(e)) }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Throttled(t) => t.into_response(),
            ApiError::Client { status, code, message } => {
                tracing::info!(status = status.as_u16(), code, %message, "request refused");
                (status, Json(json!({ "code": code, "message": message }))).into_response()
            }
            ApiError::Internal(e) => {
                tracing::error!(error = %callplane_core::error_chain(e.as_ref()), "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({ "code": "internal_error", "message": "Something went wrong on our side; it has been logged." })),
                )
                    .into_response()
            }
            ApiError::Unavailable { retry_after_seconds, source } => {
                match &source {
                    Some(e) => {
                        tracing::warn!(error = %callplane_core::error_chain(e.as_ref()), "unavailable; asked to retry")
                    }
                    None => tracing::warn!("unavailable; asked to retry"),
                }
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, retry_after_seconds.to_string())],
                    Json(json!({ "code": "overloaded", "message": format!("Unavailable for now; retry in {retry_after_seconds} s.") })),
                )
                    .into_response()
            }
        }
    }
}
