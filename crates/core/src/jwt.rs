//! Supabase-style JWTs for the dashboard API: HS256 with a shared secret, the organization
//! in a configured claim (e.g. `app_metadata.organization_id`).
//!
//! Only HS256 is accepted (never `none`, never another algorithm named by the token), the
//! signature is compared in constant time, `exp` is required, `nbf` and the audience are
//! checked when present/configured.

use crate::OrgId;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

#[derive(Clone, Debug)]
pub struct JwtSettings {
    pub secret: Vec<u8>,
    /// Dotted path of the claim holding the organization id.
    pub org_claim: String,
    /// Required `aud` (a string or one element of an array), if set.
    pub audience: Option<String>,
    /// Allowed clock skew for `exp`/`nbf`, in seconds.
    pub leeway_seconds: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("the token is not a JWT (header.payload.signature, base64url JSON)")]
    Malformed,
    #[error("the token's algorithm is {0:?}; only HS256 is accepted")]
    Algorithm(String),
    #[error("the token's signature does not match")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token has no `exp` claim")]
    MissingExpiry,
    #[error("the token's audience is not {0:?}")]
    Audience(String),
    #[error("the token has no organization in the `{0}` claim")]
    MissingOrganization(String),
}

impl JwtError {
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed_token",
            JwtError::Algorithm(_) => "unsupported_token_algorithm",
            JwtError::Signature => "invalid_token_signature",
            JwtError::Expired => "token_expired",
            JwtError::NotYetValid => "token_not_yet_valid",
            JwtError::MissingExpiry => "token_missing_expiry",
            JwtError::Audience(_) => "token_wrong_audience",
            JwtError::MissingOrganization(_) => "token_missing_organization",
        }
    }
}

/// Whether a bearer credential looks like a JWT rather than an API key.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.matches('.').count() == 2
}

fn decode_json(part: &str) -> Result<Value, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

fn numeric(claims: &Value, name: &str) -> Option<i64> {
    claims.get(name).and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
}

/// Verifies a token and returns the organization it names.
pub fn verify(token: &str, s: &JwtSettings, now: DateTime<Utc>) -> Result<OrgId, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed);
    };
    let header = decode_json(h)?;
    match header.get("alg").and_then(Value::as_str) {
        Some("HS256") => {}
        other => return Err(JwtError::Algorithm(other.unwrap_or("").to_owned())),
    }
    let signature = URL_SAFE_NO_PAD.decode(sig).map_err(|_| JwtError::Signature)?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&s.secret).map_err(|_| JwtError::Signature)?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    mac.verify_slice(&signature).map_err(|_| JwtError::Signature)?;

    let claims = decode_json(p)?;
    let now = now.timestamp();
    let exp = numeric(&claims, "exp").ok_or(JwtError::MissingExpiry)?;
    if now > exp.saturating_add(s.leeway_seconds) {
        return Err(JwtError::Expired);
    }
    if numeric(&claims, "nbf").is_some_and(|nbf| now.saturating_add(s.leeway_seconds) < nbf) {
        return Err(JwtError::NotYetValid);
    }
    if let Some(want) = &s.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => a == want,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(want)),
            _ => false,
        };
        if !ok {
            return Err(JwtError::Audience(want.clone()));
        }
    }
    let org = s
        .org_claim
        .split('.')
        .try_fold(&claims, |v, key| v.get(key))
        .and_then(Value::as_str)
        .and_then(|id| id.parse::<OrgId>().ok());
    org.ok_or_else(|| JwtError::MissingOrganization(s.org_claim.clone()))
}

/// Signs claims with HS256: for tests and tools only (the dashboard's tokens come from the
/// identity provider).
pub fn sign_hs256(claims: &Value, secret: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(format!("{header}.{payload}").as_bytes());
    format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}
