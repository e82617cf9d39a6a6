//! Bad input: a 4xx with a stable code and a useful message, and nothing written.

use crate::helpers::{SECRET, TestApp, sample};
use chrono::Utc;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::Sha256;

async fn nothing_written(app: &TestApp) {
    for table in ["calls", "call_keys", "usage_ledger", "call_transcripts"] {
        assert_eq!(app.count(&format!("SELECT count(*) FROM {table}")).await, 0, "{table} has rows");
    }
}

/// Authenticated JSON that could not be processed is kept, with its code, for replay.
async fn kept(app: &TestApp, code: &str) -> i64 {
    app.count(&format!("SELECT count(*) FROM dead_letters WHERE error_code = '{code}'")).await
}

async fn refused(r: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(r.status(), status);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.len() > 10), "{body}");
    body
}

#[tokio::test]
async fn malformed_bodies_get_a_stable_code_and_write_nothing() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let url = format!("{}/vapi/{}", app.base, org.id);
    let post = |body: &'static str| {
        app.http.post(&url).bearer_auth(SECRET).header("content-type", "application/json").body(body).send()
    };
    refused(post("{\"message\": ").await.unwrap(), StatusCode::BAD_REQUEST, "malformed_json").await;
    refused(post("{\"type\": \"status-update\"}").await.unwrap(), StatusCode::BAD_REQUEST, "missing_message").await;
    refused(post("{\"message\": {\"status\": \"ended\"}}").await.unwrap(), StatusCode::BAD_REQUEST, "missing_type")
        .await;
    refused(
        post("{\"message\": {\"type\": \"status-update\", \"timestamp\": \"yesterday\"}}").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_timestamp",
    )
    .await;
    refused(
        post("{\"message\": {\"type\": \"status-update\", \"status\": 7}}").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_message",
    )
    .await;
    nothing_written(&app).await;
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_parsing() {
    let app = TestApp::spawn_with(&[("server.max_body_bytes", "4096")]).await;
    let org = app.org("pro").await;
    let mut body = sample("09-end-of-call-report.json");
    body["message"]["artifact"]["transcript"] = Value::String("x".repeat(10_000));
    let r =
        app.http.post(format!("{}/vapi/{}", app.base, org.id)).bearer_auth(SECRET).json(&body).send().await.unwrap();
    let body = refused(r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(body["message"].as_str().unwrap().contains("4096"));
    nothing_written(&app).await;
    assert_eq!(app.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test]
async fn unknown_organizations_are_refused_with_404() {
    let app = TestApp::spawn().await;
    for org in ["not-a-uuid", "0190f0f0-0000-7000-8000-000000000000"] {
        let r = app
            .http
            .post(format!("{}/vapi/{org}", app.base))
            .bearer_auth(SECRET)
            .json(&sample("02-status-update-in-progress.json"))
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::NOT_FOUND, "unknown_organization").await;
    }
    nothing_written(&app).await;
    // Kept in the inbox before the answer; written as dead letters within the inline budget,
    // or by the drainer soon after when the machine is busy.
    crate::durability::eventually("unroutable events are kept for replay", async || {
        kept(&app, "unknown_organization").await == 2
    })
    .await;
}

fn hmac_hex(secret: &str, payload: &str) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(payload.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

#[tokio::test]
async fn credentials_are_checked_on_the_raw_body_bearer_secret_header_and_hmac() {
    let app = TestApp::spawn_with(&[("vapi.hmac.secrets", "old-hmac,new-hmac")]).await;
    let org = app.org("pro").await;
    let url = format!("{}/vapi/{}", app.base, org.id);
    let body = serde_json::to_string(&sample("02-status-update-in-progress.json")).unwrap();
    let send = |headers: Vec<(&'static str, String)>, body: String| {
        let mut rb = app.http.post(&url).header("content-type", "application/json").body(body);
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        rb.send()
    };

    refused(send(vec![], body.clone()).await.unwrap(), StatusCode::UNAUTHORIZED, "missing_credentials").await;
    refused(
        send(vec![("authorization", "Bearer wrong".into())], body.clone()).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    refused(
        send(vec![("x-vapi-secret", "wrong".into())], body.clone()).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    let now = Utc::now().timestamp().to_string();
    let forged = hmac_hex("guess", &format!("{now}.{body}"));
    refused(
        send(vec![("x-signature", forged), ("x-timestamp", now.clone())], body.clone()).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    let stale = (Utc::now().timestamp() - 3600).to_string();
    let sig = hmac_hex("new-hmac", &format!("{stale}.{body}"));
    refused(
        send(vec![("x-signature", sig), ("x-timestamp", stale)], body.clone()).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "expired_signature",
    )
    .await;
    // A valid signature over a different body does not carry over.
    let sig = hmac_hex("new-hmac", &format!("{now}.{body}"));
    let tampered = body.replace("in-progress", "ended");
    refused(
        send(vec![("x-signature", sig.clone()), ("x-timestamp", now.clone())], tampered).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    nothing_written(&app).await;

    assert_eq!(
        send(vec![("x-signature", sig), ("x-timestamp", now.clone())], body.clone()).await.unwrap().status(),
        StatusCode::OK
    );
    let millis = Utc::now().timestamp_millis().to_string();
    let old_secret = hmac_hex("old-hmac", &format!("{millis}.{body}"));
    assert_eq!(
        send(vec![("x-signature", old_secret), ("x-timestamp", millis)], body.clone()).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(send(vec![("x-vapi-secret", SECRET.into())], body.clone()).await.unwrap().status(), StatusCode::OK);
    assert_eq!(send(vec![("authorization", format!("Bearer {SECRET}"))], body).await.unwrap().status(), StatusCode::OK);
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 1);
}
