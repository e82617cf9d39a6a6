//! Who is calling the dashboard API: an organization (API key or Supabase-style JWT), or an
//! operator (the admin token). Every dashboard query is scoped to the caller's organization.

use crate::{ApiError, AppState};
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use callplane_core::OrgId;
use callplane_core::jwt::{self, JwtSettings};
use chrono::Utc;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone, Debug, Default)]
pub struct DashboardAuth {
    /// Supabase-style JWTs are accepted when set.
    pub jwt: Option<JwtSettings>,
    /// The operators' token for `/admin`; the admin surface is off when unset.
    pub admin_token: Option<Vec<u8>>,
}

/// The organization a dashboard request acts for.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub org_id: OrgId,
}

/// An operator, authenticated with the admin token.
#[derive(Clone, Copy, Debug)]
pub struct Admin;

pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?.trim();
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim)
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::client(StatusCode::UNAUTHORIZED, code, message)
}

/// Resolves an API key (`cp_...`) or a JWT to its organization.
pub(crate) async fn authenticate(s: &AppState, token: Option<&str>) -> Result<OrgId, ApiError> {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Err(unauthorized("missing_credentials", "send `Authorization: Bearer <API key or JWT>`"));
    };
    let org = if jwt::looks_like_jwt(token) {
        let Some(settings) = &s.dashboard_auth.jwt else {
            return Err(unauthorized("jwt_not_configured", "this server does not accept JWTs; use an API key"));
        };
        jwt::verify(token, settings, Utc::now()).map_err(|e| unauthorized(e.code(), e.to_string()))?
    } else {
        s.orgs
            .by_api_key(token)
            .await?
            .ok_or_else(|| unauthorized("invalid_api_key", "the API key is unknown or revoked"))?
    };
    tracing::Span::current().record("org_id", tracing::field::display(org));
    Ok(org)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        Ok(Caller { org_id: authenticate(s, bearer(&parts.headers)).await? })
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = &s.dashboard_auth.admin_token else {
            return Err(ApiError::client(StatusCode::NOT_FOUND, "not_found", "the admin API is not enabled"));
        };
        let given = bearer(&parts.headers)
            .ok_or_else(|| unauthorized("missing_credentials", "send `Authorization: Bearer <admin token>`"))?;
        if bool::from(Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected))) {
            Ok(Admin)
        } else {
            Err(ApiError::client(StatusCode::FORBIDDEN, "forbidden", "not the admin token"))
        }
    }
}
