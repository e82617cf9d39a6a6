//! Webhook authentication on the raw body, before any parsing (SPEC §10).
//!
//! VAPI can send a shared secret (`Authorization: Bearer`, or `X-Vapi-Secret`), or sign the
//! body with HMAC (`x-signature` over `{timestamp}.{body}` by default). Several secrets may be
//! valid at once so they can be rotated without dropping calls. Every comparison is
//! constant-time.

use crate::ErrorCode;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmacAlgorithm {
    Sha256,
    Sha512,
}

impl HmacAlgorithm {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sha256" => Some(Self::Sha256),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct HmacSettings {
    pub secrets: Vec<Vec<u8>>,
    pub algorithm: HmacAlgorithm,
    pub signature_header: String,
    pub timestamp_header: String,
    /// e.g. `sha256=`; stripped from the header before comparing.
    pub signature_prefix: String,
    /// Template with `{timestamp}` and `{body}`.
    pub payload_format: String,
    pub max_skew_seconds: i64,
}

#[derive(Clone, Debug, Default)]
pub struct WebhookAuth {
    /// Accepted as `Authorization: Bearer <secret>` or `X-Vapi-Secret: <secret>`.
    pub shared_secrets: Vec<Vec<u8>>,
    pub hmac: Option<HmacSettings>,
    /// Only for local development: accept requests with no credentials at all.
    pub allow_unauthenticated: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no credentials: send `Authorization: Bearer <secret>`, `X-Vapi-Secret`, or an HMAC signature")]
    Missing,
    #[error("the credentials do not match any configured secret")]
    Invalid,
    #[error("the signature timestamp `{0}` is not a number of seconds or milliseconds")]
    BadTimestamp(String),
    #[error("the signature timestamp is {skew_seconds}s away from now; at most {max}s is accepted")]
    Expired { skew_seconds: i64, max: i64 },
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Missing => ErrorCode::MissingCredentials,
            AuthError::Invalid => ErrorCode::InvalidCredentials,
            AuthError::BadTimestamp(_) => ErrorCode::InvalidSignatureTimestamp,
            AuthError::Expired { .. } => ErrorCode::ExpiredSignature,
        }
    }
}

fn digest_eq(a: &[u8], b: &[u8]) -> bool {
    // Hash both sides so the comparison leaks neither content nor length.
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

fn sign(alg: HmacAlgorithm, key: &[u8], payload: &[u8]) -> Vec<u8> {
    match alg {
        HmacAlgorithm::Sha256 => {
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
            m.update(payload);
            m.finalize().into_bytes().to_vec()
        }
        HmacAlgorithm::Sha512 => {
            let mut m = <Hmac<Sha512> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
            m.update(payload);
            m.finalize().into_bytes().to_vec()
        }
    }
}

/// Decodes a signature given as hex or as (standard or URL-safe) base64.
fn decode_signature(s: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if let Ok(b) = hex::decode(s) {
        out.push(b);
    }
    for engine in [&base64::engine::general_purpose::STANDARD, &base64::engine::general_purpose::URL_SAFE] {
        if let Ok(b) = engine.decode(s) {
            out.push(b);
        }
    }
    out
}

/// Timestamps may be seconds or milliseconds (VAPI does not document which).
fn parse_signature_time(s: &str) -> Option<DateTime<Utc>> {
    let n: i64 = s.trim().parse().ok()?;
    if n > 100_000_000_000 { DateTime::from_timestamp_millis(n) } else { DateTime::from_timestamp(n, 0) }
}

impl HmacSettings {
    /// Renders the signed payload for a timestamp and body.
    pub fn payload(&self, timestamp: &str, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 32);
        let mut rest = self.payload_format.as_str();
        while let Some(i) = rest.find('{') {
            out.extend_from_slice(&rest.as_bytes()[..i]);
            let tail = &rest[i..];
            if let Some(t) = tail.strip_prefix("{timestamp}") {
                out.extend_from_slice(timestamp.as_bytes());
                rest = t;
            } else if let Some(t) = tail.strip_prefix("{body}") {
                out.extend_from_slice(body);
                rest = t;
            } else {
                out.push(b'{');
                rest = &tail[1..];
            }
        }
        out.extend_from_slice(rest.as_bytes());
        out
    }

    /// The hex signature for a payload with the first secret; used by the simulator and tests.
    pub fn sign_hex(&self, timestamp: &str, body: &[u8]) -> String {
        let key = self.secrets.first().map(Vec::as_slice).unwrap_or_default();
        format!("{}{}", self.signature_prefix, hex::encode(sign(self.algorithm, key, &self.payload(timestamp, body))))
    }

    fn verify(
        &self,
        signature: &str,
        timestamp: Option<&str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), AuthError> {
        let ts = timestamp.unwrap_or("");
        if self.payload_format.contains("{timestamp}") {
            let at = parse_signature_time(ts).ok_or_else(|| AuthError::BadTimestamp(ts.to_owned()))?;
            let skew = (now - at).num_seconds().abs();
            if skew > self.max_skew_seconds {
                return Err(AuthError::Expired { skew_seconds: skew, max: self.max_skew_seconds });
            }
        }
        let sig = signature.trim();
        let sig = sig.strip_prefix(self.signature_prefix.as_str()).unwrap_or(sig);
        let candidates = decode_signature(sig);
        let payload = self.payload(ts, body);
        for secret in &self.secrets {
            let expected = sign(self.algorithm, secret, &payload);
            if candidates.iter().any(|c| c.len() == expected.len() && bool::from(c.ct_eq(&expected))) {
                return Ok(());
            }
        }
        Err(AuthError::Invalid)
    }
}

impl WebhookAuth {
    /// Verifies a request. `header` looks a header up case-insensitively.
    pub fn verify<'a>(
        &self,
        header: impl Fn(&str) -> Option<&'a str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), AuthError> {
        let mut presented = false;
        let bearer = header("authorization").and_then(|v| {
            let v = v.trim();
            v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))
        });
        for token in [bearer, header("x-vapi-secret")].into_iter().flatten() {
            presented = true;
            let token = token.trim().as_bytes();
            if self.shared_secrets.iter().any(|s| digest_eq(s, token)) {
                return Ok(());
            }
        }
        if let Some(h) = &self.hmac
            && let Some(sig) = header(&h.signature_header)
        {
            return h.verify(sig, header(&h.timestamp_header), body, now);
        }
        if presented {
            Err(AuthError::Invalid)
        } else if self.allow_unauthenticated {
            Ok(())
        } else {
            Err(AuthError::Missing)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn hmac(alg: HmacAlgorithm) -> HmacSettings {
        HmacSettings {
            secrets: vec![b"old".to_vec(), b"new".to_vec()],
            algorithm: alg,
            signature_header: "x-signature".into(),
            timestamp_header: "x-timestamp".into(),
            signature_prefix: String::new(),
            payload_format: "{timestamp}.{body}".into(),
            max_skew_seconds: 300,
        }
    }

    fn check(auth: &WebhookAuth, headers: &[(&str, String)], body: &[u8], now: DateTime<Utc>) -> Result<(), AuthError> {
        auth.verify(
            |name| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()),
            body,
            now,
        )
    }

    #[test]
    fn bearer_and_x_vapi_secret_accept_any_rotated_secret_and_refuse_others() {
        let auth = WebhookAuth { shared_secrets: vec![b"s1".to_vec(), b"s2".to_vec()], ..Default::default() };
        let now = Utc::now();
        assert_eq!(check(&auth, &[("Authorization", "Bearer s2".into())], b"{}", now), Ok(()));
        assert_eq!(check(&auth, &[("X-Vapi-Secret", "s1".into())], b"{}", now), Ok(()));
        assert_eq!(check(&auth, &[("Authorization", "Bearer s3".into())], b"{}", now), Err(AuthError::Invalid));
        assert_eq!(check(&auth, &[], b"{}", now), Err(AuthError::Missing));
    }

    #[test]
    fn hmac_accepts_hex_and_base64_seconds_and_millis_with_either_secret() {
        let now = Utc::now();
        let body = br#"{"message":{"type":"hang"}}"#;
        for alg in [HmacAlgorithm::Sha256, HmacAlgorithm::Sha512] {
            let h = hmac(alg);
            let auth = WebhookAuth { hmac: Some(h.clone()), ..Default::default() };
            for ts in [now.timestamp().to_string(), now.timestamp_millis().to_string()] {
                let raw = sign(alg, b"new", &h.payload(&ts, body));
                for sig in [hex::encode(&raw), base64::engine::general_purpose::STANDARD.encode(&raw)] {
                    let headers = [("x-signature", sig), ("x-timestamp", ts.clone())];
                    assert_eq!(check(&auth, &headers, body, now), Ok(()));
                    assert_eq!(check(&auth, &headers, b"{\"tampered\":1}", now), Err(AuthError::Invalid));
                }
            }
        }
    }

    #[test]
    fn hmac_refuses_stale_timestamps_and_wrong_secrets() {
        let now = Utc::now();
        let body = b"{}";
        let h = hmac(HmacAlgorithm::Sha256);
        let auth = WebhookAuth { hmac: Some(h.clone()), ..Default::default() };
        let old = (now.timestamp() - 301).to_string();
        let sig = hex::encode(sign(HmacAlgorithm::Sha256, b"new", &h.payload(&old, body)));
        assert!(matches!(
            check(&auth, &[("x-signature", sig), ("x-timestamp", old)], body, now),
            Err(AuthError::Expired { .. })
        ));
        let ts = now.timestamp().to_string();
        let wrong = hex::encode(sign(HmacAlgorithm::Sha256, b"guess", &h.payload(&ts, body)));
        assert_eq!(check(&auth, &[("x-signature", wrong), ("x-timestamp", ts)], body, now), Err(AuthError::Invalid));
    }
}
