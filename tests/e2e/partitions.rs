//! Monthly partitions: made ahead, month boundaries, and far-future timestamps refused.

use crate::helpers::{TestApp, iso, lifecycle};
use chrono::{Datelike, Duration, Months, TimeZone, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn status_update(call: &str, created_at: &str) -> Value {
    json!({"message": {"type": "status-update", "status": "in-progress",
                       "call": {"id": call, "createdAt": created_at, "status": "in-progress"}}})
}

async fn partition_of(app: &TestApp, call: &str) -> String {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM calls WHERE id = $1")
        .bind(call)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn partitions_exist_three_months_ahead() {
    let app = TestApp::spawn().await;
    let report = app.db.store.ensure_partitions(Utc::now(), 3).await.unwrap();
    let ahead = Utc::now().checked_add_months(Months::new(3)).unwrap();
    let name = format!("calls_{:04}_{:02}", ahead.year(), ahead.month());
    assert!(report.calls_partitions.contains(&name), "{:?}", report.calls_partitions);
    assert_eq!(report.covered_through, Some(format!("{:04}-{:02}", ahead.year(), ahead.month())));
    let transcripts = format!("call_transcripts_{:04}_{:02}", ahead.year(), ahead.month());
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&transcripts)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    assert!(exists, "{transcripts} missing");
    // Idempotent.
    assert!(app.db.store.ensure_partitions(Utc::now(), 3).await.unwrap().created.is_empty());
}

#[tokio::test]
async fn a_call_created_at_the_last_second_of_a_month_lands_in_that_month() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let last_second = Utc.with_ymd_and_hms(2026, 1, 31, 23, 59, 59).unwrap();
    let first_second = last_second + Duration::seconds(1);
    assert_eq!(app.post_vapi(org.id, &status_update("jan", &iso(last_second))).await.0, StatusCode::OK);
    assert_eq!(app.post_vapi(org.id, &status_update("feb", &iso(first_second))).await.0, StatusCode::OK);
    assert_eq!(partition_of(&app, "jan").await, "calls_2026_01");
    assert_eq!(partition_of(&app, "feb").await, "calls_2026_02");

    // Its report and transcript follow it there, whatever month the report arrives in.
    let mut events = lifecycle("jan", last_second, 42.0);
    let report = events.pop().unwrap();
    assert_eq!(app.post_vapi(org.id, &report).await.0, StatusCode::OK);
    assert_eq!(partition_of(&app, "jan").await, "calls_2026_01");
    let t: String = sqlx::query_scalar("SELECT tableoid::regclass::text FROM call_transcripts WHERE call_id = 'jan'")
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    assert_eq!(t, "call_transcripts_2026_01");
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 2);
}

#[tokio::test]
async fn a_far_future_created_at_is_refused_dead_lettered_and_makes_no_partition() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let future = Utc::now() + Duration::days(400);
    let (status, body) = app.post_vapi(org.id, &status_update("from-the-future", &iso(future))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "future_timestamp");
    assert!(body["message"].as_str().unwrap().contains("in the future"), "{body}");
    let name = format!("calls_{:04}_{:02}", future.year(), future.month());
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&name)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    assert!(!exists, "a far-future event created {name}");
    assert_eq!(app.count("SELECT count(*) FROM call_keys").await, 0);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM dead_letters WHERE error_code = 'future_timestamp' AND call_id = 'from-the-future'"
        )
        .await,
        1
    );

    // Within a day ahead is clock skew, not an attack: accepted.
    let soon = Utc::now() + Duration::hours(2);
    assert_eq!(app.post_vapi(org.id, &status_update("slightly-ahead", &iso(soon))).await.0, StatusCode::OK);
}
