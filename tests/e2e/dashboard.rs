//! The dashboard REST API: authentication, isolation, pagination, usage, export, function
//! data, admin, OpenAPI and metrics, through real HTTP.

use crate::helpers::{ADMIN_TOKEN, TestApp, lifecycle};
use callplane_core::OrgId;
use chrono::{DateTime, Duration, TimeZone, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashSet;

fn jwt_fixtures() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/jwt/supabase-tokens.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn api_keys_authenticate_and_revoked_or_unknown_keys_are_refused() {
    // Without the key cache a revocation is seen at once (with it, within its lifetime:
    // auth_limits.rs).
    let app = TestApp::spawn_with(&[("auth.api_key_cache_seconds", "0")]).await;
    let org = app.org("pro").await;
    let key = app.db.store.create_api_key(org.id, "dashboard").await.unwrap();
    assert_eq!(app.get("/v1/calls", &key.secret).await.0, StatusCode::OK);

    let r = app.http.get(format!("{}/v1/calls", app.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "missing_credentials");
    let (status, body) = app.get("/v1/calls", "cp_notARealKeyAtAllxxxxxxxxxxxxxxxxxxxxxxx").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_api_key")));

    let listed = app.db.store.api_keys(org.id).await.unwrap();
    assert_eq!(listed[0].prefix, &key.secret[..11]);
    assert!(listed[0].last_used_at.is_some(), "last use is recorded");
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT key_hash FROM api_keys").fetch_one(app.db.store.pool()).await.unwrap();
    assert_ne!(stored, key.secret.as_bytes(), "the key itself is never stored");

    assert!(app.db.store.revoke_api_key(org.id, key.id).await.unwrap());
    let (status, body) = app.get("/v1/calls", &key.secret).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_api_key")));
}

#[tokio::test]
async fn supabase_jwts_work_and_expired_forged_wrong_audience_or_org_less_ones_do_not() {
    let f = jwt_fixtures();
    // The fixtures were minted to last until 2100, far past the default maximum lifetime.
    let app = TestApp::spawn_with(&[
        ("auth.jwt_secret", f["secret"].as_str().unwrap()),
        ("auth.jwt_max_lifetime_seconds", "3000000000"),
    ])
    .await;
    // The fixture tokens name a fixed organization; give it a row.
    let org: OrgId = f["organization_id"].as_str().unwrap().parse().unwrap();
    sqlx::query("INSERT INTO organizations (id, name, plan, period_start, period_end, billing_anchor) VALUES ($1, 'JWT Org', 'pro', now(), now() + interval '1 month', now())")
        .bind(org.0)
        .execute(app.db.store.pool())
        .await
        .unwrap();
    let (status, body) = app.get("/v1/usage", f["valid"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["plan"], "pro");
    for (name, code) in [
        ("expired", "token_expired"),
        ("wrong_signature", "invalid_token_signature"),
        ("wrong_audience", "token_wrong_audience"),
        ("missing_org_claim", "token_missing_organization"),
        ("alg_none", "unsupported_token_algorithm"),
    ] {
        let (status, body) = app.get("/v1/usage", f[name].as_str().unwrap()).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some(code)), "{name}: {body}");
    }
}

#[tokio::test]
async fn org_a_key_never_reaches_org_b_data_on_any_endpoint() {
    let app = TestApp::spawn().await;
    let a = app.org("pro").await;
    let b = app.org("pro").await;
    let key_a = app.api_key(a.id).await;
    let key_b = app.api_key(b.id).await;
    for event in lifecycle("b-call", Utc::now() - Duration::hours(1), 120.0) {
        app.post_vapi(b.id, &event).await;
    }
    app.post_vapi(
        b.id,
        &json!({"message": {"type": "status-update", "status": "in-progress",
        "call": {"id": "b-live", "createdAt": crate::helpers::iso(Utc::now())}}}),
    )
    .await;
    let put = app
        .http
        .put(format!("{}/v1/function-data/secret_prices", app.base))
        .bearer_auth(&key_b)
        .json(&json!({"drain": 149}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);

    let (s, body) = app.get("/v1/calls/b-call", &key_a).await;
    assert_eq!((s, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("call_not_found")));
    assert_eq!(app.get("/v1/calls", &key_a).await.1["data"], json!([]));
    assert_eq!(app.get("/v1/calls/live", &key_a).await.1["count"], 0);
    let (_, usage) = app.get("/v1/usage", &key_a).await;
    assert_eq!((usage["seconds_used"].as_i64(), usage["calls"].as_i64()), (Some(0), Some(0)));
    assert_eq!(app.get("/v1/usage/daily", &key_a).await.1["data"], json!([]));
    assert_eq!(app.get("/v1/function-data/secret_prices", &key_a).await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.get("/v1/function-data", &key_a).await.1["data"], json!([]));
    let del = app
        .http
        .delete(format!("{}/v1/function-data/secret_prices", app.base))
        .bearer_auth(&key_a)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::NOT_FOUND);
    let csv = app
        .http
        .get(format!("{}/v1/calls/export.csv", app.base))
        .bearer_auth(&key_a)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(csv.lines().count(), 1, "only the header: {csv}");
    // The admin surface is not reachable with an organization's key.
    let r =
        app.http.get(format!("{}/admin/v1/organizations/{}", app.base, b.id)).bearer_auth(&key_a).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // B still sees all of it.
    assert_eq!(app.get("/v1/calls/b-call", &key_b).await.0, StatusCode::OK);
    assert_eq!(app.get("/v1/calls/live", &key_b).await.1["count"], 1);
    assert_eq!(app.get("/v1/function-data/secret_prices", &key_b).await.1["value"], json!({"drain": 149}));
}

/// Inserts calls straight into the partitioned table (the API under test only reads them).
async fn insert_calls(app: &TestApp, org: OrgId, times: &[DateTime<Utc>]) {
    for month in times.iter().map(|t| callplane_core::billing::month_start(*t)).collect::<HashSet<_>>() {
        sqlx::query("SELECT callplane_ensure_month($1)").bind(month).execute(app.db.store.pool()).await.unwrap();
    }
    let ids: Vec<String> = (0..times.len()).map(|i| format!("call-{i:05}")).collect();
    let statuses: Vec<&str> = (0..times.len()).map(|i| if i % 3 == 0 { "ended" } else { "in-progress" }).collect();
    sqlx::query(
        "INSERT INTO calls (id, organization_id, created_at, status, status_rank) \
         SELECT id, $1, t, s, CASE WHEN s = 'ended' THEN 5 ELSE 3 END FROM unnest($2::text[], $3::timestamptz[], $4::text[]) AS u(id, t, s)",
    )
    .bind(org.0)
    .bind(&ids)
    .bind(times)
    .bind(&statuses)
    .execute(app.db.store.pool())
    .await
    .unwrap();
}

async fn walk(app: &TestApp, key: &str, query: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/calls?limit=97&from=2025-10-01T00:00:00Z&to=2026-06-01T00:00:00Z{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = app.get(&path, key).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        ids.extend(page["data"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return ids,
        }
    }
}

#[tokio::test]
async fn paging_through_thousands_of_calls_across_month_boundaries_skips_and_repeats_nothing() {
    let app = TestApp::spawn().await;
    let org = app.org("business").await;
    let key = app.api_key(org.id).await;
    // 3,000 calls from November 2025 to April 2026, crowded around midnight at month ends,
    // with many sharing the same instant.
    let boundary = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
    let mut times = Vec::new();
    for i in 0..3000_i64 {
        let t = match i % 4 {
            0 => boundary - Duration::seconds(i % 7),
            1 => boundary + Duration::milliseconds((i % 5) * 250),
            2 => Utc.with_ymd_and_hms(2025, 11, 1, 0, 0, 0).unwrap() + Duration::minutes(i * 61),
            _ => Utc.with_ymd_and_hms(2026, 4, 30, 23, 59, 59).unwrap() - Duration::seconds(i % 3),
        };
        times.push(t);
    }
    insert_calls(&app, org.id, &times).await;

    let expected: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM calls WHERE organization_id = $1 AND created_at >= '2025-10-01' AND created_at < '2026-06-01' ORDER BY created_at DESC, id DESC",
    )
    .bind(org.id.0)
    .fetch_all(app.db.store.pool())
    .await
    .unwrap();
    assert_eq!(expected.len(), 3000);
    let got = walk(&app, &key, "").await;
    assert_eq!(got.len(), expected.len(), "rows skipped or repeated");
    assert_eq!(got, expected);
    let unique: HashSet<_> = got.iter().collect();
    assert_eq!(unique.len(), 3000);

    let ended: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM calls WHERE organization_id = $1 AND status = 'ended' ORDER BY created_at DESC, id DESC",
    )
    .bind(org.id.0)
    .fetch_all(app.db.store.pool())
    .await
    .unwrap();
    assert_eq!(walk(&app, &key, "&status=ended").await, ended);
}

#[tokio::test]
async fn bad_filters_unknown_parameters_and_oversized_function_data_get_clear_400s() {
    let app = TestApp::spawn_with(&[("api.max_function_data_bytes", "1024")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    for (path, code) in [
        ("/v1/calls?status=bogus", "invalid_filter"),
        ("/v1/calls?limit=0", "invalid_filter"),
        ("/v1/calls?limit=201", "invalid_filter"),
        ("/v1/calls?from=2026-05-01T00:00:00Z&to=2026-04-01T00:00:00Z", "invalid_filter"),
        ("/v1/calls?from=yesterday", "invalid_query"),
        ("/v1/calls?colour=blue", "invalid_query"),
        ("/v1/calls?from=2000-01-01T00:00:00Z", "invalid_filter"),
        ("/v1/calls?cursor=bm90LWEtY3Vyc29y", "invalid_cursor"),
        ("/v1/usage/daily?from=2026-05-01&to=2026-01-01", "invalid_filter"),
        ("/v1/calls/export.csv?status=bogus", "invalid_filter"),
    ] {
        let (status, body) = app.get(path, &key).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some(code)), "{path}: {body}");
        assert!(body["message"].as_str().unwrap().len() > 5, "{body}");
    }
    let put = |key_name: &str, body: String| {
        app.http
            .put(format!("{}/v1/function-data/{key_name}", app.base))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = put("big", format!("\"{}\"", "x".repeat(2000))).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "function_data_too_large");
    let r = put("bad%20key", "1".into()).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "invalid_key");
    let r = put("callplaneOrgId", "\"forged\"".into()).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "reserved_key");
    let r = put("ok", "{not json".into()).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "malformed_json");
    assert_eq!(app.get("/v1/function-data", &key).await.1["data"], json!([]), "nothing was stored");
}

#[tokio::test]
async fn usage_detail_live_calls_and_csv_show_what_the_webhooks_recorded() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let start = Utc::now() - Duration::hours(2);
    for (id, secs) in [("first", 90.0), ("second", 29.5)] {
        for event in lifecycle(id, start, secs) {
            app.post_vapi(org.id, &event).await;
        }
    }
    // A report handed to a Temporal workflow is answered before it is counted.
    crate::durability::eventually("both calls are counted", async || {
        app.get("/v1/usage", &key).await.1["seconds_used"] == 120
    })
    .await;
    let (_, usage) = app.get("/v1/usage", &key).await;
    assert_eq!(usage["seconds_used"], 120);
    assert_eq!(usage["minutes_used"], 2);
    assert_eq!(usage["minutes_included"], 500);
    assert_eq!(usage["minutes_left"], 498);
    assert_eq!(usage["overage_minutes"], 0);
    assert_eq!(usage["calls"], 2);
    assert_eq!(usage["hard_limit"], false);

    let (_, daily) = app.get("/v1/usage/daily", &key).await;
    let days = daily["data"].as_array().unwrap();
    assert_eq!(days.iter().map(|d| d["billable_seconds"].as_i64().unwrap()).sum::<i64>(), 120);
    assert_eq!(days.iter().map(|d| d["calls"].as_i64().unwrap()).sum::<i64>(), 2);

    let (status, detail) = app.get("/v1/calls/first", &key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail["status"], "ended");
    assert_eq!(detail["billable_seconds"], 90);
    assert_eq!(detail["transcript_final"], true);
    assert!(detail["transcript"].as_str().unwrap().starts_with("AI: "));
    assert!(detail["messages"].as_array().unwrap().len() > 5);
    // VAPI's analysis goes out as the JSON object the report carried (written as stored, not
    // as a string of it), on the detail and on the listing.
    let analysis = &crate::helpers::sample("09-end-of-call-report.json")["message"]["analysis"];
    assert!(analysis["summary"].is_string(), "the sample carries an analysis");
    assert_eq!(&detail["analysis"], analysis);
    let (_, list) = app.get("/v1/calls", &key).await;
    let listed: Vec<&Value> = list["data"].as_array().unwrap().iter().map(|c| &c["analysis"]).collect();
    assert_eq!(listed, [analysis, analysis]);

    app.post_vapi(
        org.id,
        &json!({"message": {"type": "status-update", "status": "ringing",
        "call": {"id": "ringing-now", "createdAt": crate::helpers::iso(Utc::now())}}}),
    )
    .await;
    let (_, live) = app.get("/v1/calls/live", &key).await;
    assert_eq!(live["count"], 1);
    assert_eq!(live["data"][0]["id"], "ringing-now");

    let csv =
        app.http.get(format!("{}/v1/calls/export.csv?status=ended", app.base)).bearer_auth(&key).send().await.unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let text = csv.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("id,created_at,status"));
    assert!(lines[1..].iter().all(|l| l.contains(",ended,customer-ended-call,")), "{text}");
}

#[tokio::test]
async fn operators_create_orgs_change_plans_and_manage_keys_with_the_admin_token() {
    // Without the key cache a revocation is seen at once (with it, within its lifetime:
    // auth_limits.rs).
    let app = TestApp::spawn_with(&[("auth.api_key_cache_seconds", "0")]).await;
    let admin = |method: reqwest::Method, path: &str| {
        app.http.request(method, format!("{}{path}", app.base)).bearer_auth(ADMIN_TOKEN)
    };
    let r = admin(reqwest::Method::POST, "/admin/v1/organizations")
        .json(&json!({"name": "Acme", "plan": "starter"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let org: Value = r.json().await.unwrap();
    let id = org["id"].as_str().unwrap();
    assert_eq!(org["vapi_server_url"], format!("http://127.0.0.1:8080/vapi/{id}"));

    let r = admin(reqwest::Method::POST, "/admin/v1/organizations")
        .json(&json!({"name": "Acme", "plan": "platinum"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "unknown_plan");
    let r = admin(reqwest::Method::POST, "/admin/v1/organizations")
        .json(&json!({"name": "Acme", "plan": "pro", "colour": "red"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "invalid_body");

    let r = admin(reqwest::Method::PATCH, &format!("/admin/v1/organizations/{id}"))
        .json(&json!({"plan": "business", "status": "past_due"}))
        .send()
        .await
        .unwrap();
    let updated: Value = r.json().await.unwrap();
    assert_eq!((updated["plan"].as_str(), updated["status"].as_str()), (Some("business"), Some("past_due")));

    let key: Value = admin(reqwest::Method::POST, &format!("/admin/v1/organizations/{id}/api-keys"))
        .json(&json!({"name": "dash"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = key["key"].as_str().unwrap();
    assert_eq!(app.get("/v1/usage", secret).await.1["plan"], "business");
    let r = admin(
        reqwest::Method::DELETE,
        &format!("/admin/v1/organizations/{id}/api-keys/{}", key["id"].as_str().unwrap()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.get("/v1/usage", secret).await.0, StatusCode::UNAUTHORIZED);

    let r =
        app.http.get(format!("{}/admin/v1/organizations", app.base)).bearer_auth("not-the-token").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let listed: Value =
        admin(reqwest::Method::GET, "/admin/v1/organizations").send().await.unwrap().json().await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_served_openapi_document_is_the_committed_one() {
    let app = TestApp::spawn().await;
    let served = app.http.get(format!("{}/openapi.json", app.base)).send().await.unwrap().text().await.unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, format!("{served}\n")).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    // Compared without printing both documents: the message says what to do.
    assert!(
        committed.trim_end() == served,
        "docs/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo xtask test` and commit it"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    for path in [
        "/v1/calls",
        "/v1/calls/{id}",
        "/v1/calls/live",
        "/v1/calls/export.csv",
        "/v1/usage",
        "/v1/usage/daily",
        "/v1/function-data/{key}",
        "/v1/realtime",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
}

#[tokio::test]
async fn metrics_report_latencies_by_message_type_and_route() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    for event in lifecycle("m", Utc::now() - Duration::minutes(5), 10.0) {
        app.post_vapi(org.id, &event).await;
    }
    app.get("/v1/calls", &key).await;
    let text = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    for needle in [
        "callplane_webhook_seconds_count{type=\"assistant-request\"} 1",
        "callplane_webhook_seconds_count{type=\"tool-calls\"} 1",
        "callplane_webhook_events_total{type=\"end-of-call-report\",outcome=\"applied\"} 1",
        "callplane_api_seconds_count{route=\"calls.list\"} 1",
        "callplane_concurrent_calls 0",
        "callplane_dead_letters_open 0",
        "callplane_realtime_subscribers 0",
        "callplane_realtime_queued_events ",
        "callplane_db_pool_connections",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[tokio::test]
async fn readiness_follows_the_database_and_its_migrations() {
    let app = TestApp::spawn().await;
    let ready = app.http.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(app.http.get(format!("{}/healthz", app.base)).send().await.unwrap().status(), StatusCode::OK);
    // A migration this build expects is missing: not ready, and it says why.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)")
        .execute(app.db.store.pool())
        .await
        .unwrap();
    let r = app.http.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.json::<Value>().await.unwrap()["reason"].as_str().unwrap().contains("callplane migrate"));
}

/// A dashboard request reads its organization from memory: a change made the normal way
/// reaches every reader within a second; a change nobody is told of (the notification trigger
/// switched off) is not seen, which only a query would see.
#[tokio::test]
async fn the_organization_behind_a_dashboard_request_is_read_from_memory_and_kept_current() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    assert_eq!(app.get("/v1/usage", &key).await.1["plan"], "pro");
    let set_plan = async |plan: &str| {
        sqlx::query("UPDATE organizations SET plan = $2 WHERE id = $1")
            .bind(org.id.0)
            .bind(plan)
            .execute(app.db.store.pool())
            .await
            .unwrap();
    };
    let seen_within_a_second = async |plan: &str| {
        let changed = std::time::Instant::now();
        while app.get("/v1/usage", &key).await.1["plan"] != plan {
            assert!(
                changed.elapsed() < std::time::Duration::from_secs(1),
                "the change to {plan} was not seen within a second"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    // A change made the normal way. Seeing it also shows the server's listener is up (it
    // starts in the background, and on connecting reads every organization again, which would
    // pick up the silent change below), and the reads it started settle before that change.
    set_plan("starter").await;
    seen_within_a_second("starter").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut tx = app.db.store.pool().begin().await.unwrap();
    sqlx::query("ALTER TABLE organizations DISABLE TRIGGER organizations_cache_update")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE organizations SET plan = 'business' WHERE id = $1")
        .bind(org.id.0)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE organizations ENABLE TRIGGER organizations_cache_update").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    for _ in 0..10 {
        assert_eq!(app.get("/v1/usage", &key).await.1["plan"], "starter", "the request asked the database");
    }
    set_plan("pro").await;
    seen_within_a_second("pro").await;
}
