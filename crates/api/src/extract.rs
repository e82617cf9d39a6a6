//! Query, path and JSON extractors whose rejections are `ApiError`s with stable codes.
//!
//! PostgreSQL's `text` and `jsonb` cannot hold the NUL character, so a NUL that reached a query
//! would fail it with an error that looks like ours (a 500). Every text a client sends is
//! refused here with a 400 instead, before a handler sees it. In a URL the only way to write a
//! NUL is `%00` (a raw NUL byte is not a valid request target, and form decoding turns other
//! invalid sequences into U+FFFD); in JSON it is the escape `\u0000`.

use crate::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use callplane_core::ErrorCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// `Query<T>` that answers 400 `invalid_query` naming the offending parameter.
pub struct ValidQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ValidQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if let Some(name) = parts.uri.query().and_then(parameter_with_nul) {
            return Err(ApiError::client(
                ErrorCode::InvalidQuery,
                format!("the query parameter `{name}` contains a NUL character (%00)"),
            ));
        }
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ValidQuery(v)),
            Err(e) => Err(ApiError::client(ErrorCode::InvalidQuery, e.body_text())),
        }
    }
}

/// The name (as written, shortened) of the first query parameter whose name or value holds a
/// percent-encoded NUL.
fn parameter_with_nul(query: &str) -> Option<String> {
    let pair = query.split('&').find(|pair| pair.contains("%00"))?;
    let name = pair.split_once('=').map_or(pair, |(name, _)| name);
    Some(name.chars().take(64).collect())
}

/// `Path<T>` that answers 400 `invalid_path` for a segment that does not decode to `T` or holds
/// a NUL.
pub struct ValidPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ValidPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let invalid = |message: String| ApiError::client(ErrorCode::InvalidPath, message);
        if parts.uri.path().contains("%00") {
            return Err(invalid("the path contains a NUL character (%00)".to_owned()));
        }
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ValidPath(v)),
            Err(e) => Err(invalid(e.body_text())),
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
            .map_err(|e| ApiError::client(ErrorCode::PayloadTooLarge, e.body_text()))
    }
}

/// 400 `invalid_body` when any string or object key in `v` holds a NUL, naming where (as a
/// JSON pointer, `""` for the whole value).
pub fn refuse_nul_in_json(v: &Value) -> Result<(), ApiError> {
    match nul_pointer(v) {
        None => Ok(()),
        Some(pointer) => Err(ApiError::client(
            ErrorCode::InvalidBody,
            format!("the JSON at {pointer:?} contains a NUL character (\\u0000), which cannot be stored"),
        )),
    }
}

/// The JSON pointer of the first string or key holding a NUL.
fn nul_pointer(v: &Value) -> Option<String> {
    // Pointer tokens escape `~` and `/` (RFC 6901).
    let token = |key: &str| key.replace('~', "~0").replace('/', "~1");
    match v {
        Value::String(s) => s.contains('\0').then(String::new),
        Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, item)| nul_pointer(item).map(|rest| format!("/{i}{rest}")))
        }
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let here = format!("/{}", token(key));
            if key.contains('\0') { Some(here) } else { nul_pointer(item).map(|rest| format!("{here}{rest}")) }
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_parameter_holding_a_nul_is_named() {
        assert_eq!(parameter_with_nul("status=ended&to=a%00b").as_deref(), Some("to"));
        assert_eq!(parameter_with_nul("x%00y").as_deref(), Some("x%00y"));
        assert_eq!(parameter_with_nul("status=ended&to=2026-01-01"), None);
    }

    #[test]
    fn nul_is_found_in_strings_and_keys_at_any_depth() {
        assert_eq!(nul_pointer(&json!("a\u{0}b")).as_deref(), Some(""));
        assert_eq!(nul_pointer(&json!({"a/b": [1, {"c": "x\u{0}"}]})).as_deref(), Some("/a~1b/1/c"));
        assert_eq!(nul_pointer(&json!({"k\u{0}": 1})).as_deref(), Some("/k\u{0}"));
        assert_eq!(nul_pointer(&json!({"fine": ["yes", 1, null, {"a": true}]})), None);
    }
}
