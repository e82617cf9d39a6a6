//! Abuse limits on authentication: failed attempts throttled per address and API-key prefix,
//! valid API keys served from memory for `auth.api_key_cache_seconds`, JWT lifetimes capped,
//! and `/metrics` behind its token when one is set.

use crate::helpers::{ADMIN_TOKEN, TestApp};
use callplane_core::jwt::sign_hs256;
use chrono::Utc;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const JWT_SECRET: &str = "a-jwt-secret-for-the-auth-limits-tests";

/// A request with a bearer credential, from `from` (an `X-Forwarded-For` address) when given.
async fn send(app: &TestApp, method: Method, path: &str, token: &str, from: Option<&str>) -> reqwest::Response {
    let mut r = app.http.request(method, format!("{}{path}", app.base)).bearer_auth(token);
    if let Some(ip) = from {
        r = r.header("x-forwarded-for", ip);
    }
    r.send().await.unwrap()
}

/// Status and error code of a GET.
async fn get_code(app: &TestApp, path: &str, token: &str, from: Option<&str>) -> (StatusCode, Option<String>) {
    let r = send(app, Method::GET, path, token, from).await;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body["code"].as_str().map(str::to_owned))
}

fn wrong_key(prefix_char: char, i: usize) -> String {
    format!("cp_{}{i:032}", prefix_char.to_string().repeat(8))
}

async fn last_used(app: &TestApp, key_id: uuid::Uuid) -> Option<chrono::DateTime<Utc>> {
    sqlx::query_scalar("SELECT last_used_at FROM api_keys WHERE id = $1")
        .bind(key_id)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn after_too_many_wrong_api_keys_an_address_gets_429_before_any_query_while_known_keys_still_work() {
    let app = TestApp::spawn_with(&[("auth.failure_limit", "3"), ("auth.failure_window_seconds", "60")]).await;
    let org = app.org("pro").await;
    let known = app.api_key(org.id).await;
    assert_eq!(get_code(&app, "/v1/usage", &known, None).await.0, StatusCode::OK);

    for i in 0..3 {
        let refused = get_code(&app, "/v1/calls", &wrong_key('a', i), None).await;
        assert_eq!(refused, (StatusCode::UNAUTHORIZED, Some("invalid_api_key".into())), "attempt {i}");
    }
    let r = send(&app, Method::GET, "/v1/calls", &wrong_key('b', 3), None).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "too_many_failed_attempts");
    assert!(body["message"].as_str().unwrap().contains("retry in"), "{body}");

    // A key this server has verified before is not a guess: it keeps working.
    assert_eq!(get_code(&app, "/v1/usage", &known, None).await.0, StatusCode::OK);
    // A valid key never seen before waits out the window, and is not even looked up.
    let unseen = app.db.store.create_api_key(org.id, "unseen").await.unwrap();
    let refused = get_code(&app, "/v1/usage", &unseen.secret, None).await;
    assert_eq!(refused, (StatusCode::TOO_MANY_REQUESTS, Some("too_many_failed_attempts".into())));
    assert_eq!(last_used(&app, unseen.id).await, None, "the database was never asked about it");

    assert_eq!(app.metric("callplane_auth_failures_total").await, 3.0);
    assert_eq!(app.metric("callplane_auth_throttled_total").await, 2.0);
}

#[tokio::test]
async fn a_throttled_address_is_served_again_once_its_window_ends() {
    let app = TestApp::spawn_with(&[("auth.failure_limit", "2"), ("auth.failure_window_seconds", "1")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    for i in 0..2 {
        get_code(&app, "/v1/calls", &wrong_key('c', i), None).await;
    }
    assert_eq!(get_code(&app, "/v1/calls", &key, None).await.0, StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(get_code(&app, "/v1/calls", &key, None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn one_api_key_prefix_tried_from_many_addresses_is_throttled_and_other_prefixes_are_not() {
    let app = TestApp::spawn_with(&[("auth.failure_limit", "3"), ("auth.trust_forwarded_for", "true")]).await;
    for i in 0..3 {
        let from = format!("203.0.113.{i}");
        let refused = get_code(&app, "/v1/calls", &wrong_key('d', i), Some(&from)).await;
        assert_eq!(refused.0, StatusCode::UNAUTHORIZED);
    }
    let fresh = Some("198.51.100.77");
    let same_prefix = get_code(&app, "/v1/calls", &wrong_key('d', 99), fresh).await;
    assert_eq!(same_prefix, (StatusCode::TOO_MANY_REQUESTS, Some("too_many_failed_attempts".into())));
    let other_prefix = get_code(&app, "/v1/calls", &wrong_key('e', 99), fresh).await;
    assert_eq!(other_prefix, (StatusCode::UNAUTHORIZED, Some("invalid_api_key".into())));
}

#[tokio::test]
async fn wrong_admin_tokens_are_throttled_and_then_even_the_right_one_waits_from_that_address() {
    let app = TestApp::spawn_with(&[("auth.failure_limit", "3"), ("auth.trust_forwarded_for", "true")]).await;
    let attacker = Some("203.0.113.50");
    for i in 0..3 {
        let r = send(&app, Method::GET, "/admin/v1/organizations", &format!("guess-{i}"), attacker).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "attempt {i}");
    }
    let r = send(&app, Method::GET, "/admin/v1/organizations", "guess-3", attacker).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    // Answering the right token here would tell a guesser it was right.
    let r = send(&app, Method::GET, "/admin/v1/organizations", ADMIN_TOKEN, attacker).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = send(&app, Method::GET, "/admin/v1/organizations", ADMIN_TOKEN, Some("198.51.100.8")).await;
    assert_eq!(r.status(), StatusCode::OK, "other addresses are not affected");
}

#[tokio::test]
async fn jwts_that_never_expire_live_too_long_or_come_from_the_future_are_refused_with_their_codes() {
    let app = TestApp::spawn_with(&[("auth.jwt_secret", JWT_SECRET), ("auth.jwt_max_lifetime_seconds", "86400")]).await;
    let org = app.org("pro").await;
    let now = Utc::now().timestamp();
    let token = |claims: Value| {
        let mut claims = claims;
        claims["aud"] = json!("authenticated");
        claims["app_metadata"] = json!({ "organization_id": org.id.to_string() });
        sign_hs256(&claims, JWT_SECRET.as_bytes())
    };
    assert_eq!(
        get_code(&app, "/v1/usage", &token(json!({"iat": now, "exp": now + 3600})), None).await.0,
        StatusCode::OK
    );
    for (claims, code) in [
        (json!({"exp": 1e300}), "malformed_token"),
        (json!({"exp": now + 3600, "iat": -1e300}), "malformed_token"),
        (json!({"exp": "NaN"}), "malformed_token"),
        (json!({"iat": now, "exp": now + 86_401}), "token_lifetime_too_long"),
        (json!({"exp": now + 30 * 86_400}), "token_lifetime_too_long"),
        (json!({"iat": -5, "exp": now + 60}), "token_lifetime_too_long"),
        (json!({"iat": now + 3600, "exp": now + 7200}), "token_issued_in_future"),
    ] {
        let refused = get_code(&app, "/v1/usage", &token(claims.clone()), None).await;
        assert_eq!(refused, (StatusCode::UNAUTHORIZED, Some(code.into())), "{claims}");
    }
}

#[tokio::test]
async fn metrics_need_the_bearer_token_when_one_is_configured() {
    let app = TestApp::spawn_with(&[("server.metrics_token", "scrape-me")]).await;
    let url = format!("{}/metrics", app.base);
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "missing_credentials");
    let r = app.http.get(&url).bearer_auth("scrape-you").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "invalid_metrics_token");
    let r = app.http.get(&url).bearer_auth("scrape-me").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(text.contains("callplane_auth_failures_total 1"), "{text}");
}

#[tokio::test]
async fn metrics_are_open_when_no_token_is_configured() {
    let app = TestApp::spawn().await;
    let r = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("callplane_auth_throttled_total 0"));
}

/// Creates an organization and a key through the admin API; returns (org id, key id, key).
async fn admin_key(app: &TestApp) -> (String, String, String) {
    let post = |path: String, body: Value| async move {
        let r = app.http.post(format!("{}{path}", app.base)).bearer_auth(ADMIN_TOKEN).json(&body).send().await;
        r.unwrap().json::<Value>().await.unwrap()
    };
    let org = post("/admin/v1/organizations".into(), json!({"name": "Acme", "plan": "pro"})).await;
    let org_id = org["id"].as_str().unwrap().to_owned();
    let key = post(format!("/admin/v1/organizations/{org_id}/api-keys"), json!({"name": "dash"})).await;
    (org_id, key["id"].as_str().unwrap().to_owned(), key["key"].as_str().unwrap().to_owned())
}

async fn revoke(app: &TestApp, org_id: &str, key_id: &str) {
    let path = format!("/admin/v1/organizations/{org_id}/api-keys/{key_id}");
    assert_eq!(send(app, Method::DELETE, &path, ADMIN_TOKEN, None).await.status(), StatusCode::NO_CONTENT);
}

/// The revocation reaches the key cache through the database's change notification, the
/// way it reaches every other `serve` process, long before the cache lifetime (300 s) ends.
#[tokio::test]
async fn a_key_revoked_through_the_admin_api_is_refused_within_a_second() {
    let app = TestApp::spawn_with(&[("auth.api_key_cache_seconds", "300")]).await;
    let (org_id, key_id, key) = admin_key(&app).await;
    assert_eq!(get_code(&app, "/v1/usage", &key, None).await.0, StatusCode::OK);
    revoke(&app, &org_id, &key_id).await;
    let revoked_at = std::time::Instant::now();
    loop {
        match get_code(&app, "/v1/usage", &key, None).await {
            (StatusCode::UNAUTHORIZED, Some(code)) if code == "invalid_api_key" => break,
            (StatusCode::OK, _) if revoked_at.elapsed() < std::time::Duration::from_secs(1) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            other => panic!("a revoked key still answered {other:?} after {:?}", revoked_at.elapsed()),
        }
    }
}

#[tokio::test]
async fn a_valid_key_is_answered_from_memory_without_asking_the_database() {
    let app = TestApp::spawn_with(&[("auth.api_key_cache_seconds", "300")]).await;
    let (_, key_id, key) = admin_key(&app).await;
    assert_eq!(get_code(&app, "/v1/usage", &key, None).await.0, StatusCode::OK);
    // The stored hash no longer matches the key (no revocation, so nobody is told): only a
    // request that asked the database would notice.
    sqlx::query("UPDATE api_keys SET key_hash = sha256(key_hash) WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&key_id).unwrap())
        .execute(app.db.store.pool())
        .await
        .unwrap();
    for _ in 0..20 {
        assert_eq!(get_code(&app, "/v1/usage", &key, None).await, (StatusCode::OK, None));
    }
}

#[tokio::test]
async fn wrong_vapi_secrets_are_throttled_but_a_valid_signature_always_passes() {
    let app = TestApp::spawn_with(&[("auth.failure_limit", "3")]).await;
    let org = app.org("pro").await;
    let post = |secret: &str| {
        app.http
            .post(format!("{}/vapi/{}", app.base, org.id))
            .bearer_auth(secret)
            .json(&json!({"message": {"type": "status-update", "status": "ringing"}}))
            .send()
    };
    for i in 0..3 {
        assert_eq!(post(&format!("wrong-{i}")).await.unwrap().status(), StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let r = post("wrong-3").await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "too_many_failed_attempts");
    // VAPI sends every customer's webhooks from the same addresses and never retries: a valid
    // secret is served even from a throttled address (a 256-bit secret is not guessed).
    let ok = post(crate::helpers::SECRET).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK, "{:?}", ok.text().await);
    assert_eq!(app.metric("callplane_auth_failures_total").await, 3.0);
}

#[tokio::test]
async fn wrong_realtime_access_tokens_are_throttled_by_address() {
    let app = TestApp::spawn_with(&[("auth.failure_limit", "2")]).await;
    let url = app.ws_url("").replace("ws://", "http://");
    for i in 0..2 {
        let r = app.http.get(&url).query(&[("access_token", wrong_key('f', i))]).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let r = app.http.get(&url).query(&[("access_token", wrong_key('g', 9))]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
}
