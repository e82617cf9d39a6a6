//! The phase-1 backends pass their seams' contract suites.

use crate::cli::{Cli, free_addr};
use crate::helpers::{TestApp, lifecycle};
use callplane_core::seams::UsageCounter;
use callplane_storage::{PgFunctionData, PgRealtimeBus, PgTranscriptStore, PgUsageCounter};
use callplane_testkit::contracts;
use chrono::{Duration, Utc};
use serde_json::{Value, json};
use std::sync::Arc;

#[tokio::test]
async fn pg_function_data_passes_the_contract() {
    let app = TestApp::spawn().await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::function_data(&PgFunctionData(app.db.store.clone()), a.id, b.id).await;
}

#[tokio::test]
async fn pg_transcript_store_passes_the_contract() {
    let app = TestApp::spawn().await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::transcript_store(&PgTranscriptStore(app.db.store.clone()), a.id, b.id, "contract-call", Utc::now())
        .await;
}

#[tokio::test]
async fn pg_usage_counter_passes_the_contract() {
    let app = TestApp::spawn().await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::usage_counter(Arc::new(PgUsageCounter(app.db.store.clone())), &app.db.store, &a, &b, 500 * 60).await;
}

#[tokio::test]
async fn pg_realtime_bus_passes_the_contract() {
    let app = TestApp::spawn().await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::realtime_bus(&PgRealtimeBus::start(app.db.store.clone(), 64).await.unwrap(), a.id, b.id).await;
}

/// A counter that drifted from the ledger (a bug, a restore, a hand edit) is found and repaired
/// by `callplane usage reconcile`, and what the dashboard shows follows the ledger again.
#[tokio::test]
async fn usage_reconcile_finds_a_counter_that_drifted_from_the_ledger_and_repairs_it() {
    // The drift is made by hand in the Postgres counter; the CLI runs with the default backend.
    let app = TestApp::spawn_with(&[("backends.usage_counter", "postgres")]).await;
    let (drifted, fine) = (app.org("pro").await, app.org("pro").await);
    let key = app.api_key(drifted.id).await;
    for (org, call, seconds) in [(drifted.id, "d-1", 30.0), (drifted.id, "d-2", 45.0), (fine.id, "f-1", 12.0)] {
        let report = lifecycle(call, Utc::now() - Duration::minutes(5), seconds).pop().unwrap();
        assert_eq!(app.post_vapi(org, &report).await.0, reqwest::StatusCode::OK);
    }
    assert_eq!(app.seconds_used(drifted.id).await, 75);
    sqlx::query("UPDATE organizations SET seconds_used = 7 WHERE id = $1")
        .bind(drifted.id.0)
        .execute(app.db.store.pool())
        .await
        .unwrap();

    let cli = Cli { db_url: app.db.url.clone(), addr: free_addr() };
    let out = cli.command(&["usage", "reconcile", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "differences exit 1: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["checked"], 2);
    let differences = report["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 1, "{report}");
    assert_eq!(differences[0]["organization_id"], drifted.id.to_string());
    assert_eq!((differences[0]["counter"].as_i64(), differences[0]["ledger"].as_i64()), (Some(7), Some(75)));
    assert!(differences[0]["repaired_to"].is_null());

    let repaired = cli.json(&["usage", "reconcile", "--repair", "--json"]);
    assert_eq!(repaired["differences"][0]["repaired_to"], 75);
    assert_eq!(app.seconds_used(drifted.id).await, 75);
    assert_eq!(app.get("/v1/usage", &key).await.1["seconds_used"], 75);
    assert_eq!(cli.json(&["usage", "reconcile", "--json"])["differences"], json!([]));
}

/// A rebuild that arrives while a call's add is in flight (the organization row locked, the
/// ledger row flipped to counted, the total raised, not yet committed) waits for it and counts
/// its seconds: none is lost, none counted twice.
#[tokio::test]
async fn a_rebuild_racing_an_add_in_flight_loses_and_doubles_nothing() {
    let app = TestApp::spawn_with(&[("backends.usage_counter", "postgres")]).await;
    let org = app.org("business").await;
    let report = lifecycle("before", Utc::now() - Duration::minutes(5), 20.0).pop().unwrap();
    assert_eq!(app.post_vapi(org.id, &report).await.0, reqwest::StatusCode::OK);
    contracts::ledger_row(&app.db.store, org.id, org.period_start, "in-flight", 10).await;

    // What `PgUsageCounter::add_call` does, held open.
    let mut in_flight = app.db.store.pool().begin().await.unwrap();
    for statement in [
        "SELECT 1 FROM organizations WHERE id = $1 FOR UPDATE",
        "UPDATE usage_ledger SET counted = true WHERE call_id = 'in-flight' AND organization_id = $1",
        "UPDATE organizations SET seconds_used = seconds_used + 10 WHERE id = $1",
    ] {
        sqlx::query(statement).bind(org.id.0).execute(&mut *in_flight).await.unwrap();
    }

    let counter = PgUsageCounter(app.db.store.clone());
    let rebuild = tokio::spawn(async move { counter.rebuild(org.id, org.period_start).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!rebuild.is_finished(), "the rebuild waits for the report's transaction");
    in_flight.commit().await.unwrap();
    assert_eq!(rebuild.await.unwrap().unwrap(), 30);
    assert_eq!(app.seconds_used(org.id).await, 30, "the counter equals the ledger");
    let again = PgUsageCounter(app.db.store.clone()).add_call(org.id, org.period_start, "in-flight", 10).await.unwrap();
    assert!(!again.new && again.after == 30, "the call was counted again: {again:?}");
    assert_eq!(app.db.store.ledger_total(org.id, org.period_start).await.unwrap(), 30);
}

#[tokio::test]
async fn the_inline_pipeline_passes_the_contract() {
    let app = TestApp::spawn_with(&[("backends.event_pipeline", "inline")]).await;
    assert_eq!(app.app.pipeline.backend(), "inline");
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::event_pipeline(app.app.pipeline.as_ref(), &app.db.store, a.id, b.id).await;
    // What the operator reads: the contract's five billed calls reached the ledger, and its two
    // refused events are counted as failures.
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    for line in ["callplane_report_to_ledger_seconds_count 5", "callplane_events_failed_total 2"] {
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in /metrics");
    }
}
