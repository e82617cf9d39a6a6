//! `Stripe-Signature` verification: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "{t}.{body}">`,
//! possibly several `v1` entries (Stripe sends one per active secret while a secret is being
//! rolled) and we may hold several secrets too. Any match within the tolerance passes.

use callplane_core::ErrorCode;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("no Stripe-Signature header")]
    Missing,
    #[error("the Stripe-Signature header has no timestamp or no v1 signature")]
    Malformed,
    #[error("the signature is {age_seconds}s old; at most {tolerance}s is accepted")]
    Stale { age_seconds: i64, tolerance: i64 },
    #[error("no v1 signature matches a configured webhook secret")]
    Mismatch,
}

impl SignatureError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SignatureError::Missing => ErrorCode::MissingSignature,
            SignatureError::Malformed => ErrorCode::MalformedSignature,
            SignatureError::Stale { .. } => ErrorCode::StaleSignature,
            SignatureError::Mismatch => ErrorCode::InvalidSignature,
        }
    }
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(timestamp.as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

pub fn verify_signature(
    header: Option<&str>,
    body: &[u8],
    secrets: &[Vec<u8>],
    tolerance_seconds: i64,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = Some(t.trim()),
            Some(("v1", sig)) => {
                if let Ok(bytes) = hex::decode(sig.trim()) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    let at = t.parse::<i64>().ok().and_then(|s| DateTime::from_timestamp(s, 0)).ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let age = (now - at).num_seconds();
    if age.abs() > tolerance_seconds {
        return Err(SignatureError::Stale { age_seconds: age, tolerance: tolerance_seconds });
    }
    for secret in secrets {
        let expected = mac(secret, t, body);
        if signatures.iter().any(|s| s.len() == expected.len() && bool::from(s.ct_eq(&expected))) {
            return Ok(at);
        }
    }
    Err(SignatureError::Mismatch)
}

/// A header as Stripe would send it, for tests and the simulator.
pub fn sign_for_tests(secret: &[u8], body: &[u8], at: DateTime<Utc>) -> String {
    let t = at.timestamp().to_string();
    format!("t={t},v1={}", hex::encode(mac(secret, &t, body)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn any_v1_against_any_secret_within_tolerance_passes() {
        let now = Utc::now();
        let body = br#"{"id":"evt_1"}"#;
        let good = sign_for_tests(b"whsec_new", body, now);
        let sig = good.split_once(",v1=").unwrap().1;
        let header = format!("t={},v1=deadbeef,v1={sig},v0=ignored", now.timestamp());
        let secrets = vec![b"whsec_old".to_vec(), b"whsec_new".to_vec()];
        assert!(verify_signature(Some(&header), body, &secrets, 300, now).is_ok());
        assert_eq!(verify_signature(Some(&header), b"{}", &secrets, 300, now), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(Some(&good), body, &[b"other".to_vec()], 300, now), Err(SignatureError::Mismatch));
        let old = sign_for_tests(b"whsec_new", body, now - chrono::Duration::seconds(301));
        assert!(matches!(verify_signature(Some(&old), body, &secrets, 300, now), Err(SignatureError::Stale { .. })));
        assert_eq!(verify_signature(Some("v1=ab"), body, &secrets, 300, now), Err(SignatureError::Malformed));
        assert_eq!(verify_signature(None, body, &secrets, 300, now), Err(SignatureError::Missing));
    }

    fn chrono_seconds() -> std::ops::RangeInclusive<i64> {
        DateTime::<Utc>::MIN_UTC.timestamp()..=DateTime::<Utc>::MAX_UTC.timestamp()
    }

    fn header() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "(t=-?[0-9]{0,20}|v1=[0-9a-f]{0,70}|v0=[a-z]*|[ ,=]){0,6}",
            (any::<i64>(), "[0-9a-fA-F]{0,70}").prop_map(|(t, sig)| format!("t={t},v1={sig}")),
        ]
    }

    proptest! {
        #[test]
        fn prop_stripe_signature_checks_never_panic(
            header in prop::option::of(header()),
            body in prop::collection::vec(any::<u8>(), 0..256),
            secrets in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..3),
            tolerance in any::<i64>(),
            now in chrono_seconds(),
        ) {
            let now = DateTime::from_timestamp(now, 0).unwrap();
            let _ = verify_signature(header.as_deref(), &body, &secrets, tolerance, now);
        }

        #[test]
        fn prop_stripe_signatures_verify_exactly_the_signed_body(
            secret in prop::collection::vec(any::<u8>(), 1..40),
            body in prop::collection::vec(any::<u8>(), 1..512),
            age in -300i64..=300,
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let now = DateTime::from_timestamp(1_767_225_600, 0).unwrap();
            let header = sign_for_tests(&secret, &body, now - chrono::Duration::seconds(age));
            let secrets = [b"whsec_other".to_vec(), secret];
            prop_assert!(verify_signature(Some(&header), &body, &secrets, 300, now).is_ok());
            let mut changed = body.clone();
            changed[at.index(body.len())] ^= flip;
            prop_assert_eq!(verify_signature(Some(&header), &changed, &secrets, 300, now), Err(SignatureError::Mismatch));
        }
    }
}
