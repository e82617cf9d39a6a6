//! Hostile input on the dashboard, admin and billing surface, through real HTTP: NUL characters
//! (which PostgreSQL cannot store), dates at the edge of what chrono represents, signed Stripe
//! events carrying either, and spreadsheet formulas in exported calls. Each is refused with a
//! 4xx and a stable code before it reaches the database, or exported as inert text.

use crate::helpers::{ADMIN_TOKEN, TestApp, lifecycle};
use callplane_billing::sign_for_tests;
use chrono::{Duration, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Asserts a 400 with `code` whose message contains `mentions`.
fn assert_refused((status, body): (StatusCode, Value), code: &str, mentions: &str, what: &str) {
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some(code)), "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(mentions), "{what}: {message:?} should mention {mentions:?}");
}

#[tokio::test]
async fn nul_characters_in_queries_paths_and_bodies_are_400s_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;

    for (path, parameter) in [
        ("/v1/calls?ended_reason=a%00b", "`ended_reason`"),
        ("/v1/calls?status=ended&customer_number=%2B1%00", "`customer_number`"),
        ("/v1/calls?assistant_id=%00", "`assistant_id`"),
        ("/v1/calls/export.csv?ended_reason=a%00b", "`ended_reason`"),
        ("/v1/usage/daily?to=2026-01-01%00", "`to`"),
    ] {
        assert_refused(app.get(path, &key).await, "invalid_query", parameter, path);
    }
    assert_refused(app.get("/v1/calls/a%00b", &key).await, "invalid_path", "NUL", "a call id");
    // A cursor is opaque but comes from the client all the same.
    let cursor = base64_url(&format!("{}|a\0b", Utc::now().timestamp_micros()));
    assert_refused(app.get(&format!("/v1/calls?cursor={cursor}"), &key).await, "invalid_cursor", "cursor", "cursor");

    let put = app
        .http
        .put(format!("{}/v1/function-data/greeting", app.base))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(r#"{"text": ["fine", "a\u0000b"]}"#)
        .send()
        .await
        .unwrap();
    let status = put.status();
    assert_refused((status, put.json().await.unwrap()), "invalid_body", "/text/1", "function data");
    assert_eq!(app.get("/v1/function-data", &key).await.1["data"], json!([]), "nothing was stored");

    let admin = |path: &str, body: &str| {
        app.http
            .post(format!("{}{path}", app.base))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    let r = admin("/admin/v1/organizations", r#"{"name": "a\u0000b", "plan": "pro"}"#).await.unwrap();
    assert_refused((r.status(), r.json().await.unwrap()), "invalid_body", "/name", "organization name");
    let r = admin(&format!("/admin/v1/organizations/{}/api-keys", org.id), r#"{"name": "\u0000"}"#).await.unwrap();
    assert_refused((r.status(), r.json().await.unwrap()), "invalid_body", "/name", "key name");
    assert_eq!(app.count("SELECT count(*) FROM organizations").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM api_keys").await, 1);

    // The same requests without the NUL are served.
    assert_eq!(app.get("/v1/calls?ended_reason=ab", &key).await.0, StatusCode::OK);
    assert_eq!(app.get("/v1/calls/ab", &key).await.0, StatusCode::NOT_FOUND);
}

fn base64_url(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test]
async fn dates_outside_the_years_1970_to_9999_are_400s_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    for (path, parameter) in [
        ("/v1/calls?to=-262143-01-01T00:00:00Z", "`to`"),
        ("/v1/calls?from=2026-01-01T00:00:00Z&to=-262143-01-01T00:00:00Z", "`to`"),
        ("/v1/calls?from=-262143-01-01T00:00:00Z", "`from`"),
        ("/v1/calls?to=%2B262142-12-31T23:59:59Z", "`to`"),
        ("/v1/calls?from=1969-12-31T23:59:59Z&to=1970-01-02T00:00:00Z", "`from`"),
        ("/v1/calls/export.csv?to=-262143-01-01T00:00:00Z", "`to`"),
        ("/v1/calls/export.csv?from=-262143-01-01T00:00:00Z&to=2026-01-01T00:00:00Z", "`from`"),
        ("/v1/usage/daily?to=-262143-01-01", "`to`"),
        ("/v1/usage/daily?from=-262143-01-01&to=2026-01-01", "`from`"),
        ("/v1/usage/daily?from=%2B262142-01-01", "`from`"),
    ] {
        assert_refused(app.get(path, &key).await, "invalid_query", parameter, path);
    }
    let cursor = base64_url("-8210266876800000000|call");
    assert_refused(app.get(&format!("/v1/calls?cursor={cursor}"), &key).await, "invalid_cursor", "cursor", "cursor");
    // The edges themselves are served.
    assert_eq!(app.get("/v1/calls?from=9999-01-01T00:00:00Z&to=9999-12-31T23:59:59Z", &key).await.0, StatusCode::OK);
    assert_eq!(app.get("/v1/usage/daily?from=1970-01-01&to=1970-01-31", &key).await.0, StatusCode::OK);
}

#[tokio::test]
async fn signed_stripe_events_that_could_not_be_stored_are_refused_with_400_and_not_recorded() {
    const WHSEC: &str = "whsec_hostile";
    let app = TestApp::spawn_with(&[("stripe.webhook_secrets", WHSEC)]).await;
    let org = app.org("pro").await;
    let event = |id: &str, customer: &str, created: i64| {
        json!({"id": id, "object": "event", "type": "customer.subscription.updated", "created": created,
            "data": {"object": {"id": "sub_1", "object": "subscription", "customer": customer, "status": "canceled",
                "metadata": {"callplane_organization_id": org.id.to_string()}}}})
    };
    let now = Utc::now().timestamp();
    for (what, event) in [
        ("a NUL in the event id", event("evt_\u{0}", "cus_1", now)),
        ("a NUL in the customer", event("evt_2", "cus_\u{0}", now)),
        ("an empty event id", event("", "cus_1", now)),
        ("a creation time PostgreSQL cannot store", event("evt_3", "cus_1", -8_210_266_876_800)),
    ] {
        let body = event.to_string();
        let r = app
            .http
            .post(format!("{}/stripe/webhook", app.base))
            .header("stripe-signature", sign_for_tests(WHSEC.as_bytes(), body.as_bytes(), Utc::now()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let answer: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_event")), "{what}");
    }
    assert_eq!(app.count("SELECT count(*) FROM stripe_events").await, 0);
    let status: String = sqlx::query_scalar("SELECT status FROM organizations WHERE id = $1")
        .bind(org.id.0)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    assert_eq!(status, "active");
}

/// The cells of one CSV record (RFC 4180: quoted cells, quotes doubled).
fn cells(line: &str) -> Vec<String> {
    let (mut out, mut cell, mut quoted, mut chars) = (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cell)),
            (c, _) => cell.push(c),
        }
    }
    out.push(cell);
    out
}

/// A whole call through the signed webhook, with its ended reason and customer number set.
async fn call_with(app: &TestApp, org: callplane_core::OrgId, id: &str, ended_reason: &str, customer: &str) {
    for mut event in lifecycle(id, Utc::now() - Duration::minutes(30), 42.0) {
        let m = event["message"].as_object_mut().unwrap();
        if m.contains_key("endedReason") {
            m.insert("endedReason".into(), json!(ended_reason));
        }
        m.insert("customer".into(), json!({"number": customer}));
        if let Some(call) = m.get_mut("call").and_then(Value::as_object_mut) {
            call.insert("customer".into(), json!({"number": customer}));
        }
        let (status, body) = app.post_vapi(org, &event).await;
        assert!(status.is_success(), "{id}: {status} {body}");
    }
}

#[tokio::test]
async fn the_csv_export_neutralises_spreadsheet_formulas_and_keeps_e164_numbers() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    call_with(&app, org.id, "formula", "=cmd|' /C calc'!A0", "+1=2+3").await;
    call_with(&app, org.id, "at-sign", "@SUM(1+1)*cmd|' /C calc'!A0", "-2+3").await;
    call_with(&app, org.id, "plain", "customer-ended-call", "+14155550100").await;

    let r = app.http.get(format!("{}/v1/calls/export.csv", app.base)).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    let row = |id: &str| {
        let line = text.lines().find(|l| l.starts_with(&format!("{id},"))).unwrap_or_else(|| panic!("{id}: {text}"));
        (line.to_owned(), cells(line))
    };
    // Columns: id, created_at, status, ended_reason, ..., customer_number (10th), assistant_id, phone_number_id.
    let (line, formula) = row("formula");
    assert_eq!((formula[3].as_str(), formula[9].as_str()), ("'=cmd|' /C calc'!A0", "'+1=2+3"), "{line}");
    assert!(line.contains(r#","'=cmd|' /C calc'!A0","#) && line.contains(r#","'+1=2+3","#), "{line}");
    let (line, at_sign) = row("at-sign");
    assert_eq!((at_sign[3].as_str(), at_sign[9].as_str()), ("'@SUM(1+1)*cmd|' /C calc'!A0", "'-2+3"), "{line}");
    let (line, plain) = row("plain");
    assert_eq!((plain[3].as_str(), plain[9].as_str()), ("customer-ended-call", "+14155550100"), "{line}");
    assert!(line.contains(",+14155550100,"), "an E.164 number is exported as it is: {line}");
}

#[tokio::test]
async fn a_csv_export_the_database_cannot_serve_is_an_error_status_not_a_cut_off_200() {
    let (app, proxy) = TestApp::spawn_behind_proxy(&[]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    assert_eq!(app.get("/v1/calls", &key).await.0, StatusCode::OK, "the key is known before the outage");
    proxy.cut();
    let r = app.http.get(format!("{}/v1/calls/export.csv", app.base)).bearer_auth(&key).send().await.unwrap();
    let (status, retry_after) = (r.status(), r.headers().get("retry-after").cloned());
    let body = r.text().await.expect("a whole body, not one cut off");
    assert!(retry_after.is_some(), "Retry-After is set");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(!body.starts_with("id,created_at"), "no CSV is sent: {body}");
}
