//! Phase 2 on a real Redis this test owns: the books balance when Redis restarts or is flushed
//! in the middle of traffic, and the Redis backends pass the seams' contracts.

use crate::helpers::{TestApp, books_balance, lifecycle, traffic, uncounted_gauge};
use callplane_core::OrgId;
use callplane_testkit::contracts;
use callplane_testkit::redis::RedisServer;
use chrono::{Duration, Utc};
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashMap;

async fn app_on(redis: &RedisServer) -> TestApp {
    let url = redis.url();
    TestApp::spawn_with(&[
        ("redis.url", url.as_str()),
        ("backends.usage_counter", "redis"),
        ("backends.function_data", "redis"),
    ])
    .await
}

async fn alert_thresholds(app: &TestApp, org: OrgId) -> Vec<i32> {
    sqlx::query_scalar("SELECT threshold FROM usage_alerts WHERE organization_id = $1 ORDER BY threshold")
        .bind(org.0)
        .fetch_all(app.db.store.pool())
        .await
        .unwrap()
}

/// Redis goes away for two seconds in the middle of traffic and comes back empty. Reports
/// keep being answered 200 and billed in the ledger; the calls Redis missed are counted once
/// it is back; the alerts crossed while it was away fire, once.
#[tokio::test]
async fn a_redis_restart_in_the_middle_of_traffic_loses_and_doubles_nothing() {
    let mut redis = RedisServer::start();
    let app = app_on(&redis).await;
    // Starter includes 6,000 s: 30 calls of 150-350 s cross 80, 90 and 100%.
    let orgs = [app.org("starter").await.id, app.org("pro").await.id, app.org("business").await.id];
    let expected = traffic(&app, &orgs, 30, async || {
        redis.stop();
        let report = lifecycle("while-redis-is-down", Utc::now() - Duration::minutes(5), 42.0);
        for e in &report {
            assert_eq!(app.post_vapi(orgs[1], e).await.0, StatusCode::OK);
        }
        assert!(uncounted_gauge(&app).await >= 1.0, "the call billed while Redis is down waits, counted in /metrics");
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        redis.start_again();
    })
    .await;
    let mut expected = expected;
    *expected.get_mut(&orgs[1]).unwrap() += 42;
    books_balance(&app, &expected).await;
    assert_eq!(uncounted_gauge(&app).await, 0.0);
    assert_eq!(alert_thresholds(&app, orgs[0]).await, [80, 90, 100], "each alert fires once");
}

/// `FLUSHALL` in the middle of traffic: every counter is rebuilt from the ledger before it is
/// used again, and the reports sent again afterwards are not counted twice.
#[tokio::test]
async fn a_flushall_in_the_middle_of_traffic_loses_and_doubles_nothing() {
    let redis = RedisServer::start();
    let app = app_on(&redis).await;
    let orgs = [app.org("starter").await.id, app.org("pro").await.id];
    let expected = traffic(&app, &orgs, 30, async || redis.flushall()).await;
    books_balance(&app, &expected).await;
    assert_eq!(alert_thresholds(&app, orgs[0]).await, [80, 90, 100], "each alert fires once");
    assert!(alert_thresholds(&app, orgs[1]).await.is_empty(), "pro (30,000 s) is not near its limit");
}

/// With Redis stopped, the agent's answers are still served (from memory, then Postgres),
/// function data is still written, and an admission on a hard-limit plan still sees the
/// minutes used.
#[tokio::test]
async fn with_redis_stopped_answers_are_served_and_function_data_is_written() {
    let mut redis = RedisServer::start();
    let app = app_on(&redis).await;
    let org = app.org("starter").await;
    let key = app.api_key(org.id).await;
    redis.stop();
    let put = app
        .http
        .put(format!("{}/v1/function-data/hours", app.base))
        .bearer_auth(&key)
        .json(&json!("9-5"))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{:?}", put.text().await);
    let mut request = crate::helpers::sample("01-assistant-request.json");
    request["message"]["call"]["id"] = json!("redis-down-call");
    let started = std::time::Instant::now();
    let (status, answer) = app.post_vapi(org.id, &request).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "answered in {:?}", started.elapsed());
    assert_eq!(answer["assistantOverrides"]["variableValues"]["hours"], "9-5", "{answer}");
    assert!(answer["assistantOverrides"]["maxDurationSeconds"].as_i64().unwrap() > 0, "{answer}");
    assert_eq!(app.get("/v1/usage", &key).await.0, StatusCode::OK);
}

#[tokio::test]
async fn redis_usage_counter_passes_the_contract() {
    let redis = RedisServer::start();
    let app = app_on(&redis).await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    let counter = app.app.state.metering.counter().clone();
    assert_eq!(counter.backend(), "redis");
    contracts::usage_counter(counter, &app.db.store, &a, &b, 500 * 60).await;
}

#[tokio::test]
async fn redis_function_data_passes_the_contract() {
    let redis = RedisServer::start();
    let app = app_on(&redis).await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    assert_eq!(app.app.state.function_data.backend(), "redis");
    contracts::function_data(app.app.state.function_data.as_ref(), a.id, b.id).await;
}

/// A server started while Redis is down serves at once (usage from the ledger), and counts
/// what it billed in Redis once Redis is up.
#[tokio::test]
async fn a_server_started_while_redis_is_down_serves_and_counts_once_it_is_up() {
    let mut redis = RedisServer::start();
    redis.stop();
    let app = app_on(&redis).await;
    let org = app.org("pro").await;
    for e in lifecycle("started-without-redis", Utc::now() - Duration::minutes(5), 60.0) {
        assert_eq!(app.post_vapi(org.id, &e).await.0, StatusCode::OK);
    }
    let key = app.api_key(org.id).await;
    assert_eq!(app.get("/v1/usage", &key).await.1["seconds_used"].as_i64(), Some(60), "read from the ledger");
    redis.start_again();
    books_balance(&app, &HashMap::from([(org.id, 60)])).await;
}

/// A Redis counter that drifted from the ledger (a total set by hand, a restore from an old
/// snapshot) is found by `callplane usage reconcile` and replaced by the ledger's total with
/// `--repair`; the dashboard follows.
#[tokio::test]
async fn usage_reconcile_finds_and_repairs_a_drifted_redis_counter() {
    let redis = RedisServer::start();
    let app = app_on(&redis).await;
    let org = app.org("pro").await;
    for (call, seconds) in [("r-1", 30.0), ("r-2", 45.0)] {
        for e in lifecycle(call, Utc::now() - Duration::minutes(5), seconds) {
            assert_eq!(app.post_vapi(org.id, &e).await.0, StatusCode::OK);
        }
    }
    let key = app.api_key(org.id).await;
    assert_eq!(app.get("/v1/usage", &key).await.1["seconds_used"].as_i64(), Some(75));
    let hash = format!("callplane:usage:{}:{}", org.id, org.period_start.timestamp());
    let drift = std::process::Command::new("redis-cli")
        .args(["-u", &redis.url(), "HSET", &hash, "total", "7000"])
        .output()
        .unwrap();
    assert!(drift.status.success(), "{drift:?}");
    assert_eq!(app.get("/v1/usage", &key).await.1["seconds_used"].as_i64(), Some(7000));

    let cli = crate::cli::Cli { db_url: app.db.url.clone(), addr: crate::cli::free_addr() };
    let reconcile = |repair: bool| {
        let mut c = cli.command(&["usage", "reconcile", "--json"]);
        if repair {
            c.arg("--repair");
        }
        c.env("CALLPLANE__REDIS__URL", redis.url()).env("CALLPLANE__BACKENDS__USAGE_COUNTER", "redis");
        c.output().unwrap()
    };
    let found = reconcile(false);
    assert_eq!(found.status.code(), Some(1), "a difference exits 1: {found:?}");
    let report: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(report["counter"], "redis");
    let d = &report["differences"][0];
    assert_eq!((d["counter"].as_i64(), d["ledger"].as_i64()), (Some(7000), Some(75)), "{report}");

    let repaired = reconcile(true);
    assert!(repaired.status.success(), "{repaired:?}");
    let report: serde_json::Value = serde_json::from_slice(&repaired.stdout).unwrap();
    assert_eq!(report["differences"][0]["repaired_to"].as_i64(), Some(75), "{report}");
    assert_eq!(app.get("/v1/usage", &key).await.1["seconds_used"].as_i64(), Some(75));
    assert_eq!(reconcile(false).status.code(), Some(0), "nothing differs after the repair");
}
