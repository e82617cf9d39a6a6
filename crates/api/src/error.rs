//! The one error type of the HTTP surface: a stable `code` and a message a developer can act
//! on for 4xx; an opaque body for 5xx, with the cause chain logged.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use callplane_core::ErrorCode;
use callplane_core::auth::AuthError;
use callplane_core::seams::{IntakeError, PipelineError, StoreError};
use callplane_core::vapi::ParseError;
use serde_json::json;

/// Every error body: a stable code to branch on, and a message for the developer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable; one of the codes listed in the `ErrorCode` schema.
    #[schema(schema_with = error_code_schema)]
    pub code: ErrorCode,
    pub message: String,
}

/// The `code` schema: every code with what it means.
fn error_code_schema() -> utoipa::openapi::schema::Object {
    let described: Vec<String> =
        ErrorCode::ALL.iter().map(|c| format!("- `{}` ({}): {}", c, status(*c).as_u16(), c.describe())).collect();
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
        .description(Some(format!("A stable error code, with its HTTP status:\n{}", described.join("\n"))))
        .build()
}

/// The HTTP status of each code: one status per code, whichever endpoint answers it.
pub fn status(code: ErrorCode) -> StatusCode {
    use ErrorCode as C;
    match code {
        C::MalformedJson
        | C::MissingMessage
        | C::MissingType
        | C::InvalidMessage
        | C::InvalidTimestamp
        | C::InvalidDuration
        | C::IdTooLong
        | C::InvalidQuery
        | C::InvalidFilter
        | C::InvalidCursor
        | C::InvalidReadAfter
        | C::InvalidPath
        | C::InvalidBody
        | C::InvalidKey
        | C::ReservedKey
        | C::WebsocketRequired
        | C::UnknownPlan
        | C::InvalidStatus
        | C::InvalidTimeZone
        | C::MalformedEvent
        | C::MissingSignature
        | C::MalformedSignature
        | C::StaleSignature
        | C::InvalidSignature => StatusCode::BAD_REQUEST,
        C::MissingCredentials
        | C::InvalidCredentials
        | C::InvalidSignatureTimestamp
        | C::ExpiredSignature
        | C::InvalidApiKey
        | C::JwtNotConfigured
        | C::MalformedToken
        | C::UnsupportedTokenAlgorithm
        | C::InvalidTokenSignature
        | C::TokenExpired
        | C::TokenNotYetValid
        | C::TokenMissingExpiry
        | C::TokenLifetimeTooLong
        | C::TokenIssuedInFuture
        | C::TokenWrongAudience
        | C::TokenMissingOrganization
        | C::InvalidMetricsToken => StatusCode::UNAUTHORIZED,
        C::Forbidden => StatusCode::FORBIDDEN,
        C::UnknownOrganization
        | C::NotFound
        | C::CallNotFound
        | C::KeyNotFound
        | C::OrganizationNotFound
        | C::ApiKeyNotFound => StatusCode::NOT_FOUND,
        C::CallArchived => StatusCode::GONE,
        C::BillingNotConfigured | C::WebhookNotConfigured | C::SearchOff => StatusCode::CONFLICT,
        C::PayloadTooLarge | C::FunctionDataTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        C::FutureTimestamp | C::StaleTimestamp | C::InvalidEvent => StatusCode::UNPROCESSABLE_ENTITY,
        C::TooManyFailedAttempts | C::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
        C::BillingProviderError => StatusCode::BAD_GATEWAY,
        C::ProcessingFailed | C::ParserPanic | C::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        C::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
    }
}

#[derive(Debug)]
pub enum ApiError {
    /// A 4xx: the request is at fault. The status comes from the code; `Retry-After` is sent
    /// when set (429s).
    Client { code: ErrorCode, message: String, retry_after_seconds: Option<u64> },
    /// A 5xx; the source is logged, never sent.
    Internal(Box<dyn std::error::Error + Send + Sync>),
    /// A 503 with `Retry-After`: a backend is away or full; the same request can succeed
    /// later. The source is logged, never sent.
    Unavailable { retry_after_seconds: u32, source: Option<Box<dyn std::error::Error + Send + Sync>> },
}

impl ApiError {
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError::Client { code, message: message.into(), retry_after_seconds: None }
    }

    /// A 429: come back after `retry_after_seconds`.
    pub fn too_many(code: ErrorCode, message: impl Into<String>, retry_after_seconds: u64) -> Self {
        ApiError::Client { code, message: message.into(), retry_after_seconds: Some(retry_after_seconds) }
    }

    pub fn status(&self) -> StatusCode {
        status(self.code())
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Client { code, .. } => *code,
            ApiError::Internal(_) => ErrorCode::InternalError,
            ApiError::Unavailable { .. } => ErrorCode::Overloaded,
        }
    }
}

impl From<crate::throttle::Throttled> for ApiError {
    fn from(t: crate::throttle::Throttled) -> Self {
        ApiError::too_many(ErrorCode::TooManyFailedAttempts, t.message(), t.retry_after_seconds)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::client(e.code(), e.to_string())
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        ApiError::client(e.code(), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused { code, message } => ApiError::client(code, message),
            StoreError::Backend { .. } | StoreError::Internal(_) => ApiError::Internal(Box::new(e)),
            StoreError::Unavailable { .. } => {
                ApiError::Unavailable { retry_after_seconds: 5, source: Some(Box::new(e)) }
            }
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Rejected { code, message, dead_letter_id } => {
                ApiError::client(code, format!("{message} (kept as dead letter {dead_letter_id})"))
            }
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
                ApiError::client(code, format!("{message} (kept as a dead letter)"))
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
            ApiError::Client { code, message, retry_after_seconds } => {
                let status = status(code);
                tracing::info!(status = status.as_u16(), code = code.as_str(), %message, "request refused");
                let mut response = (status, Json(json!({ "code": code, "message": message }))).into_response();
                if let Some(seconds) = retry_after_seconds {
                    response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
                }
                response
            }
            ApiError::Internal(e) => {
                tracing::error!(error = %callplane_core::error_chain(e.as_ref()), "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({ "code": ErrorCode::InternalError, "message": "Something went wrong on our side; it has been logged." })),
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
                    Json(json!({ "code": ErrorCode::Overloaded, "message": format!("Unavailable for now; retry in {retry_after_seconds} s.") })),
                )
                    .into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_status_and_4xx_codes_are_the_callers_fault() {
        for code in ErrorCode::ALL {
            let status = status(*code);
            assert!(status.is_client_error() || status.is_server_error(), "{code}: {status}");
        }
        assert_eq!(status(ErrorCode::InvalidEvent), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(ApiError::from(StoreError::Internal("poisoned".into())).status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
