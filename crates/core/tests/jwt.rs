//! The JWT verifier against tokens made by PyJWT (tests/fixtures/jwt), not only our own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use callplane_core::OrgId;
use callplane_core::jwt::{JwtError, JwtSettings, sign_hs256, verify};
use chrono::Utc;
use serde_json::{Value, json};

fn fixtures() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/jwt/supabase-tokens.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn settings(f: &Value) -> JwtSettings {
    JwtSettings {
        secret: f["secret"].as_str().unwrap().as_bytes().to_vec(),
        org_claim: "app_metadata.organization_id".into(),
        audience: Some("authenticated".into()),
        leeway_seconds: 30,
        // The fixtures were minted to last until 2100.
        max_lifetime_seconds: i64::MAX,
    }
}

#[test]
fn tokens_made_by_pyjwt_verify_or_fail_for_the_right_reason() {
    let f = fixtures();
    let s = settings(&f);
    let now = Utc::now();
    let org: OrgId = f["organization_id"].as_str().unwrap().parse().unwrap();
    let check = |name: &str| verify(f[name].as_str().unwrap(), &s, now);
    assert_eq!(check("valid"), Ok(org));
    assert_eq!(check("expired"), Err(JwtError::Expired));
    assert_eq!(check("wrong_signature"), Err(JwtError::Signature));
    assert_eq!(check("wrong_audience"), Err(JwtError::Audience("authenticated".into())));
    assert_eq!(check("missing_org_claim"), Err(JwtError::MissingOrganization("app_metadata.organization_id".into())));
    assert_eq!(check("not_yet_valid"), Err(JwtError::NotYetValid));
    assert_eq!(check("hs512"), Err(JwtError::Algorithm("HS512".into())));
    assert_eq!(check("alg_none"), Err(JwtError::Algorithm("none".into())));
    assert_eq!(verify("cp_notajwt", &s, now), Err(JwtError::Malformed));
}

#[test]
fn our_signer_round_trips_and_a_tampered_payload_fails() {
    let f = fixtures();
    let s = settings(&f);
    let org = OrgId::new();
    let token = sign_hs256(
        &json!({"aud": "authenticated", "exp": Utc::now().timestamp() + 60, "app_metadata": {"organization_id": org.to_string()}}),
        &s.secret,
    );
    assert_eq!(verify(&token, &s, Utc::now()), Ok(org));
    let mut parts: Vec<&str> = token.split('.').collect();
    let other = sign_hs256(
        &json!({"aud": "authenticated", "exp": 4102444800_i64, "app_metadata": {"organization_id": OrgId::new().to_string()}}),
        b"x",
    );
    parts[1] = other.split('.').nth(1).unwrap();
    assert_eq!(verify(&parts.join("."), &s, Utc::now()), Err(JwtError::Signature));
}
