//! Supabase-style JWTs for the dashboard API: HS256 with a shared secret, the organization
//! in a configured claim (e.g. `app_metadata.organization_id`).
//!
//! Only HS256 is accepted (never `none`, never another algorithm named by the token), the
//! signature is compared in constant time, `exp` is required, `nbf` and the audience are
//! checked when present/configured.
//!
//! A token cannot live longer than `max_lifetime_seconds` (from `iat` to `exp`, or from now to
//! `exp` when there is no `iat`), so a leaked token with a far-future `exp` is not a permanent
//! credential. `exp`, `iat` and `nbf` must be numbers within the range of an `i64`: anything
//! else (a string, `1e300`) is malformed, never rounded into a valid time.

use crate::ErrorCode;
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
    /// Allowed clock skew for `exp`/`nbf`/`iat`, in seconds.
    pub leeway_seconds: i64,
    /// The longest a token may be valid for, in seconds.
    pub max_lifetime_seconds: i64,
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
    #[error("the token is valid for longer than the {max_seconds} s accepted")]
    LifetimeTooLong { max_seconds: i64 },
    #[error("the token's `iat` is in the future")]
    IssuedInFuture,
    #[error("the token's audience is not {0:?}")]
    Audience(String),
    #[error("the token has no organization in the `{0}` claim")]
    MissingOrganization(String),
}

impl JwtError {
    pub fn code(&self) -> ErrorCode {
        match self {
            JwtError::Malformed => ErrorCode::MalformedToken,
            JwtError::Algorithm(_) => ErrorCode::UnsupportedTokenAlgorithm,
            JwtError::Signature => ErrorCode::InvalidTokenSignature,
            JwtError::Expired => ErrorCode::TokenExpired,
            JwtError::NotYetValid => ErrorCode::TokenNotYetValid,
            JwtError::MissingExpiry => ErrorCode::TokenMissingExpiry,
            JwtError::LifetimeTooLong { .. } => ErrorCode::TokenLifetimeTooLong,
            JwtError::IssuedInFuture => ErrorCode::TokenIssuedInFuture,
            JwtError::Audience(_) => ErrorCode::TokenWrongAudience,
            JwtError::MissingOrganization(_) => ErrorCode::TokenMissingOrganization,
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

/// A NumericDate claim, when present: whole seconds (a fraction is floored, as RFC 7519
/// allows one). A claim that is not a number, or outside the range of an `i64`, is malformed.
fn numeric(claims: &Value, name: &str) -> Result<Option<i64>, JwtError> {
    let Some(v) = claims.get(name) else { return Ok(None) };
    if let Some(n) = v.as_i64() {
        return Ok(Some(n));
    }
    // 2^63 is exactly representable; every float in [-2^63, 2^63) converts without saturating.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    match v.as_f64().map(f64::floor) {
        Some(f) if (-LIMIT..LIMIT).contains(&f) => Ok(Some(f as i64)),
        _ => Err(JwtError::Malformed),
    }
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
    let exp = numeric(&claims, "exp")?.ok_or(JwtError::MissingExpiry)?;
    let nbf = numeric(&claims, "nbf")?;
    let iat = numeric(&claims, "iat")?;
    if now > exp.saturating_add(s.leeway_seconds) {
        return Err(JwtError::Expired);
    }
    if nbf.is_some_and(|nbf| now.saturating_add(s.leeway_seconds) < nbf) {
        return Err(JwtError::NotYetValid);
    }
    if iat.is_some_and(|iat| now.saturating_add(s.leeway_seconds) < iat) {
        return Err(JwtError::IssuedInFuture);
    }
    if exp.saturating_sub(iat.unwrap_or(now)) > s.max_lifetime_seconds {
        return Err(JwtError::LifetimeTooLong { max_seconds: s.max_lifetime_seconds });
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    const SECRET: &[u8] = b"a-test-secret-of-at-least-32-characters";

    fn settings() -> JwtSettings {
        JwtSettings {
            secret: SECRET.to_vec(),
            org_claim: "org".into(),
            audience: None,
            leeway_seconds: 30,
            max_lifetime_seconds: 86_400,
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000, 0).unwrap()
    }

    /// Signs `claims` (a JSON object) with an organization added, and verifies it at `now()`.
    fn check(mut claims: Value) -> Result<(), JwtError> {
        let org = OrgId::new();
        claims["org"] = json!(org.to_string());
        verify(&sign_hs256(&claims, SECRET), &settings(), now()).map(|got| assert_eq!(got, org))
    }

    #[test]
    fn a_token_within_its_lifetime_is_accepted_with_or_without_iat() {
        let t = now().timestamp();
        assert!(check(json!({"iat": t - 60, "exp": t + 3600})).is_ok());
        assert!(check(json!({"exp": t + 86_400})).is_ok());
        assert!(check(json!({"iat": t, "exp": t + 86_400, "nbf": t - 1})).is_ok());
        assert!(check(json!({"iat": t as f64 + 0.5, "exp": t as f64 + 60.25})).is_ok());
    }

    #[test]
    fn an_exp_of_1e300_is_malformed_not_a_token_that_never_expires() {
        let t = now().timestamp();
        assert_eq!(check(json!({"exp": 1e300})), Err(JwtError::Malformed));
        assert_eq!(check(json!({"exp": -1e300})), Err(JwtError::Malformed));
        assert_eq!(check(json!({"exp": 9_223_372_036_854_775_808_u64})), Err(JwtError::Malformed), "i64::MAX + 1");
        assert_eq!(check(json!({"exp": 9.3e18})), Err(JwtError::Malformed));
        assert_eq!(check(json!({"exp": t + 60, "iat": 1e300})), Err(JwtError::Malformed));
        assert_eq!(check(json!({"exp": t + 60, "nbf": 1e19})), Err(JwtError::Malformed));
    }

    #[test]
    fn numeric_claims_that_are_not_numbers_are_malformed() {
        let t = now().timestamp();
        for bad in [json!("NaN"), json!("Infinity"), json!("1800000060"), json!(null), json!(true), json!([t])] {
            assert_eq!(check(json!({"exp": bad})), Err(JwtError::Malformed), "exp {bad}");
            assert_eq!(check(json!({"exp": t + 60, "iat": bad})), Err(JwtError::Malformed), "iat {bad}");
            assert_eq!(check(json!({"exp": t + 60, "nbf": bad})), Err(JwtError::Malformed), "nbf {bad}");
        }
        assert_eq!(check(json!({"iat": t})), Err(JwtError::MissingExpiry));
    }

    #[test]
    fn a_token_living_longer_than_the_maximum_is_refused() {
        let t = now().timestamp();
        let too_long = Err(JwtError::LifetimeTooLong { max_seconds: 86_400 });
        assert_eq!(check(json!({"iat": t, "exp": t + 86_401})), too_long);
        assert_eq!(check(json!({"exp": t + 86_401})), too_long, "no iat: counted from now");
        assert_eq!(check(json!({"exp": i64::MAX})), too_long);
        assert_eq!(check(json!({"iat": i64::MIN, "exp": t + 60})), too_long, "no overflow on exp - iat");
        assert_eq!(check(json!({"iat": -1, "exp": t + 60})), too_long);
    }

    #[test]
    fn negative_and_past_times_are_expired_not_wrapped() {
        let t = now().timestamp();
        assert_eq!(check(json!({"exp": -1})), Err(JwtError::Expired));
        assert_eq!(check(json!({"exp": i64::MIN})), Err(JwtError::Expired));
        assert_eq!(check(json!({"iat": t - 120, "exp": t - 31})), Err(JwtError::Expired));
        assert!(check(json!({"iat": t - 120, "exp": t - 29})).is_ok(), "within the leeway");
    }

    #[test]
    fn a_token_issued_in_the_future_beyond_the_leeway_is_refused() {
        let t = now().timestamp();
        assert_eq!(check(json!({"iat": t + 31, "exp": t + 3600})), Err(JwtError::IssuedInFuture));
        assert_eq!(check(json!({"iat": i64::MAX, "exp": i64::MAX})), Err(JwtError::IssuedInFuture));
        assert!(check(json!({"iat": t + 29, "exp": t + 3600})).is_ok(), "within the leeway");
    }

    #[test]
    fn the_new_refusals_have_stable_codes() {
        assert_eq!(JwtError::LifetimeTooLong { max_seconds: 1 }.code().as_str(), "token_lifetime_too_long");
        assert_eq!(JwtError::IssuedInFuture.code().as_str(), "token_issued_in_future");
        assert_eq!(JwtError::Malformed.code().as_str(), "malformed_token");
    }
}
