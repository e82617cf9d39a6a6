//! Query and JSON extractors whose rejections are `ApiError`s with stable codes.

use crate::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// `Query<T>` that answers 400 `invalid_query` naming the offending parameter.
pub struct ValidQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ValidQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ValidQuery(v)),
            Err(e) => Err(ApiError::client(StatusCode::BAD_REQUEST, "invalid_query", e.body_text())),
        }
    }
}

/// A JSON body of at most `limit` bytes (checked by the handler's state), parsed to `T`.
pub struct JsonBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(JsonBody)
            .map_err(|e| ApiError::client(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e.body_text()))
    }
}
