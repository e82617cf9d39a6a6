//! A call's whole lifecycle: duplicated, shuffled, concurrent. Exactly once, always.

use crate::helpers::{TestApp, lifecycle, sample};
use callplane_core::CallRecord;
use callplane_core::OrgStatus;
use callplane_core::seams::TranscriptStore;
use callplane_storage::PgTranscriptStore;
use chrono::{Duration, TimeZone, Utc};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The parts of a row that must not depend on arrival order.
fn comparable(mut row: CallRecord) -> CallRecord {
    row.id = String::new();
    row
}

#[tokio::test]
async fn any_order_with_every_event_duplicated_gives_the_in_order_row_and_bills_once() {
    let app = TestApp::spawn().await;
    let org = app.org("business").await;
    let created = Utc::now() - Duration::hours(1);
    let duration = 187.25;

    for event in lifecycle("in-order", created, duration) {
        assert_eq!(app.post_vapi(org.id, &event).await.0, StatusCode::OK);
    }
    let expected = comparable(app.call(org.id, "in-order").await.unwrap());
    assert_eq!(expected.status, "ended");
    assert_eq!(expected.billable_seconds, Some(188));
    let transcripts = PgTranscriptStore(app.db.store.clone());
    let expected_transcript = transcripts.get(org.id, "in-order").await.unwrap().unwrap();
    assert!(expected_transcript.is_final);

    let permutations = 40;
    let mut rng = StdRng::seed_from_u64(20261128);
    for p in 0..permutations {
        let call = format!("shuffled-{p}");
        let mut events = lifecycle(&call, created, duration);
        events.extend(events.clone());
        events.shuffle(&mut rng);
        for event in &events {
            assert_eq!(app.post_vapi(org.id, event).await.0, StatusCode::OK);
        }
        let row = app.call(org.id, &call).await.unwrap();
        assert_eq!(comparable(row), expected, "permutation {p} ended with a different row");
        assert_eq!(transcripts.get(org.id, &call).await.unwrap().unwrap(), expected_transcript, "permutation {p}");
    }

    let calls = permutations + 1;
    assert_eq!(app.count("SELECT count(*) FROM calls").await, calls);
    assert_eq!(app.count("SELECT count(*) FROM call_keys").await, calls);
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, calls);
    assert_eq!(app.seconds_used(org.id).await, 188 * calls);
    assert_eq!(app.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test]
async fn fifty_concurrent_end_of_call_reports_for_one_call_bill_it_once() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let report = lifecycle("raced", Utc::now() - Duration::minutes(10), 61.5).pop().unwrap();
    let posts = (0..50).map(|_| app.post_vapi(org.id, &report));
    let results = futures::future::join_all(posts).await;
    assert!(results.iter().all(|(s, b)| *s == StatusCode::OK && *b == json!({})), "{results:?}");
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 1);
    assert_eq!(app.seconds_used(org.id).await, 62);
}

#[tokio::test]
async fn hard_limit_plans_cap_calls_to_the_minutes_left_and_then_refuse() {
    let app = TestApp::spawn().await;
    let org = app.org("starter").await; // 100 minutes, hard limit
    let ask = |call: &str| {
        let mut body = sample("01-assistant-request.json");
        body["message"]["call"]["id"] = json!(call);
        body["message"]["call"]["createdAt"] = json!(crate::helpers::iso(Utc::now()));
        body
    };
    let (_, answer) = app.post_vapi(org.id, &ask("first")).await;
    assert_eq!(answer["assistantOverrides"]["maxDurationSeconds"], json!(3600));

    // 95 minutes used: 5 minutes left caps the next call.
    let report = lifecycle("long", Utc::now() - Duration::hours(3), 95.0 * 60.0).pop().unwrap();
    app.post_vapi(org.id, &report).await;
    assert_eq!(app.seconds_used(org.id).await, 5700);
    let (_, answer) = app.post_vapi(org.id, &ask("second")).await;
    assert_eq!(answer["assistantOverrides"]["maxDurationSeconds"], json!(300));

    let report = lifecycle("last", Utc::now() - Duration::hours(2), 300.0).pop().unwrap();
    app.post_vapi(org.id, &report).await;
    let (status, answer) = app.post_vapi(org.id, &ask("third")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer["error"].as_str().unwrap().contains("no call minutes left"), "{answer}");
    assert!(answer.get("assistantId").is_none());

    // A canceled organization is refused whatever its minutes.
    let other = app.org("business").await;
    app.db.store.set_organization_status(other.id, OrgStatus::Canceled).await.unwrap();
    // Answers read organizations from memory, refreshed by the database's change notice:
    // the change is seen within moments, not necessarily by the very next request.
    let mut answer = Value::Null;
    for attempt in 0..40 {
        answer = app.post_vapi(other.id, &ask(&format!("fourth-{attempt}"))).await.1;
        if answer.get("error").is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(answer["error"].as_str().unwrap().contains("not in service"), "{answer}");
}

#[tokio::test]
async fn calls_that_never_connected_are_recorded_but_not_billed() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let mut report = lifecycle("busy", Utc::now() - Duration::minutes(5), 12.0).pop().unwrap();
    report["message"]["endedReason"] = json!("customer-busy");
    app.post_vapi(org.id, &report).await;
    let row = app.call(org.id, "busy").await.unwrap();
    assert_eq!((row.ended_reason.as_deref(), row.billable_seconds), (Some("customer-busy"), Some(0)));
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger WHERE billable_seconds = 0").await, 1);
    assert_eq!(app.seconds_used(org.id).await, 0);
}

#[tokio::test]
async fn periods_anchored_on_the_31st_do_not_drift_and_usage_stays_in_its_period() {
    let app = TestApp::spawn().await;
    let org = app.org_from("pro", Utc.with_ymd_and_hms(2026, 1, 31, 0, 0, 0).unwrap()).await;
    for (call, day) in [("mar-1", 1), ("mar-29", 29)] {
        let report = lifecycle(call, Utc.with_ymd_and_hms(2026, 3, day, 12, 0, 0).unwrap(), 60.0).pop().unwrap();
        assert_eq!(app.post_vapi(org.id, &report).await.0, StatusCode::OK);
    }
    // Both calls are in the period Feb 28 - Mar 31 (anchored on the 31st), and so is the counter.
    let feb_28 = Utc.with_ymd_and_hms(2026, 2, 28, 0, 0, 0).unwrap();
    let ledger = app.db.store.ledger(org.id).await.unwrap();
    assert!(ledger.iter().all(|l| l.period_start == feb_28), "{ledger:?}");
    assert_eq!(app.seconds_used(org.id).await, 120);
    let (start, end): (chrono::DateTime<Utc>, chrono::DateTime<Utc>) =
        sqlx::query_as("SELECT period_start, period_end FROM organizations WHERE id = $1")
            .bind(org.id.0)
            .fetch_one(app.db.store.pool())
            .await
            .unwrap();
    assert_eq!((start, end), (feb_28, Utc.with_ymd_and_hms(2026, 3, 31, 0, 0, 0).unwrap()));
}

#[tokio::test]
async fn a_report_claiming_a_far_future_start_is_refused_and_moves_no_period() {
    let app = TestApp::spawn().await;
    let org = app.org("starter").await;
    let mut report = lifecycle("time-travel", Utc::now() - Duration::minutes(5), 60.0).pop().unwrap();
    report["message"]["startedAt"] = json!(crate::helpers::iso(Utc::now() + Duration::days(90)));
    let (status, body) = app.post_vapi(org.id, &report).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("future_timestamp")));
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 0);
    let start: chrono::DateTime<Utc> = sqlx::query_scalar("SELECT period_start FROM organizations WHERE id = $1")
        .bind(org.id.0)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    assert_eq!(start, org.period_start);
}

#[tokio::test]
async fn when_function_data_cannot_be_read_the_agent_still_gets_200_answers() {
    let app = TestApp::spawn().await;
    sqlx::query("ALTER TABLE function_data RENAME TO function_data_away").execute(app.db.store.pool()).await.unwrap();
    // Created after the break, so nothing about it is in memory either.
    let org = app.org("pro").await;
    let (status, answer) = app.post_vapi(org.id, &sample("04-tool-calls-two-calls.json")).await;
    assert_eq!(status, StatusCode::OK);
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r["error"].as_str().unwrap().contains("temporarily unavailable")), "{answer}");
    assert_eq!(results[0]["toolCallId"], "call_Qm3kX8vTz1LcR7pA2bN9wEyH");
    let (status, answer) = app.post_vapi(org.id, &sample("01-assistant-request.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer["error"].is_string(), "{answer}");
    sqlx::query("ALTER TABLE function_data_away RENAME TO function_data").execute(app.db.store.pool()).await.unwrap();
}
