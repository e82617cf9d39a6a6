//! The phase advisor (`GET /admin/v1/advice`): each trigger of the plan is driven over its
//! threshold the way a growing business would cross it (slow dashboards, slow answers, failed
//! events, concurrent calls, refused searches, live transcripts, stored calls and transcripts,
//! connections, Redis memory), and the advice moves with it.

use crate::helpers::{ADMIN_TOKEN, SECRET, TestApp, lifecycle, redis_url, sample};
use callplane_core::OrgId;
use chrono::{Duration, DurationRound, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};

async fn advice(app: &TestApp) -> Value {
    let (status, body) = app.get("/admin/v1/advice", ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn trigger<'a>(advice: &'a Value, id: &str) -> &'a Value {
    advice["triggers"].as_array().unwrap().iter().find(|t| t["id"] == id).unwrap_or_else(|| panic!("no trigger {id}"))
}

fn fired(advice: &Value) -> Vec<String> {
    let triggers = advice["triggers"].as_array().unwrap();
    triggers.iter().filter(|t| t["fired"] == true).map(|t| t["id"].as_str().unwrap().to_owned()).collect()
}

/// Today's figures (the last day of the window).
fn today(advice: &Value) -> &Value {
    advice["days"].as_array().unwrap().last().unwrap()
}

/// Posts every body concurrently (a few at a time); each must be answered 200.
async fn post_all(app: &TestApp, org: OrgId, bodies: Vec<Value>) {
    use futures::StreamExt;
    futures::stream::iter(bodies)
        .for_each_concurrent(8, |body| async move {
            let (status, answer) = app.post_vapi(org, &body).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
        })
        .await;
}

/// Waits (10 s at most) until `sql` counts `n`: events may be processed after their answer
/// (the inbox, a Temporal worker).
async fn wait_for_count(app: &TestApp, sql: &str, n: i64) {
    for _ in 0..200 {
        if app.count(sql).await == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(app.count(sql).await, n, "{sql}");
}

/// The end-of-call report of a call created at `created_at` that lasted `seconds`.
fn report(call_id: &str, created_at: chrono::DateTime<Utc>, seconds: f64) -> Value {
    lifecycle(call_id, created_at, seconds).pop().unwrap()
}

#[tokio::test]
async fn the_advice_is_for_operators_and_a_quiet_system_is_told_to_stay_with_the_costs_beside_it() {
    // The connection trigger is left out here: the test cluster is shared by every test.
    let app = TestApp::spawn_with(&[("advisor.db_connections_share", "1")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let anonymous = app.http.get(format!("{}/admin/v1/advice", app.base)).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = app.get("/admin/v1/advice", &key).await;
    assert!(status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN, "an API key got {status}");

    let a = advice(&app).await;
    assert_eq!(fired(&a), Vec::<String>::new(), "{a:#}");
    assert_eq!(a["current_phase"], 1, "search is off, so the system is on phase 1");
    assert_eq!(a["recommended_phase"], 1);
    assert_eq!(a["summary"], "Stay on phase 1: no trigger for phase 2 has fired.");
    let ids: Vec<&str> = a["triggers"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "dashboard_p95",
            "answers_near_timeout",
            "webhook_failures",
            "concurrent_calls",
            "search_demand",
            "db_connections",
            "redis_memory",
            "transcripts_size",
            "live_transcripts",
            "calls_stored"
        ]
    );
    for t in a["triggers"].as_array().unwrap() {
        assert!(!t["evidence"].as_str().unwrap().is_empty(), "{t}");
        assert!(t["threshold"].is_number() && t["value"].is_number(), "{t}");
    }
    // The plan's thresholds, as configured by default.
    assert_eq!(trigger(&a, "concurrent_calls")["threshold"], 3.0);
    assert_eq!(trigger(&a, "calls_stored")["threshold"], 1_000_000.0);
    assert_eq!(trigger(&a, "redis_memory")["threshold"], 256.0);
    assert_eq!(trigger(&a, "transcripts_size")["threshold"], 10.0);
    let costs: Vec<(u64, f64, bool)> = a["costs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["phase"].as_u64().unwrap(), c["monthly_usd"].as_f64().unwrap(), c["current"] == true))
        .collect();
    assert_eq!(costs, vec![(1, 50.0, true), (2, 250.0, false), (3, 700.0, false)]);
    assert_eq!(a["days"].as_array().unwrap().len(), 7);
    if redis_url().is_none() {
        let redis = trigger(&a, "redis_memory");
        assert_eq!(redis["measured"], false);
        assert!(redis["evidence"].as_str().unwrap().contains("no Redis"), "{redis}");
    }
    // Too few requests to judge a rate: not measured, not fired.
    assert_eq!(trigger(&a, "dashboard_p95")["measured"], false);
}

#[tokio::test]
async fn slow_dashboard_queries_fire_the_p95_trigger() {
    let app = TestApp::spawn_with(&[("advisor.min_samples", "40"), ("advisor.db_connections_share", "1")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    for _ in 0..40 {
        assert_eq!(app.get("/v1/calls", &key).await.0, StatusCode::OK);
    }
    let before = advice(&app).await;
    let t = trigger(&before, "dashboard_p95");
    assert_eq!((t["measured"].clone(), t["fired"].clone()), (json!(true), json!(false)), "{t}");
    assert_eq!(today(&before)["dashboard_requests"], 40);

    // The calls table is locked (a migration, a long transaction): four dashboard requests
    // wait past 200 ms, over 5% of all.
    let mut lock = PgConnection::connect(&app.db.url).await.unwrap();
    lock.execute("BEGIN").await.unwrap();
    lock.execute("LOCK TABLE calls IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let slow = futures::future::join_all((0..4).map(|_| app.get("/v1/calls", &key)));
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        lock.execute("COMMIT").await.unwrap();
    };
    let (answers, ()) = tokio::join!(slow, release);
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK));

    let after = advice(&app).await;
    let t = trigger(&after, "dashboard_p95");
    assert_eq!(t["fired"], true, "{t}");
    assert_eq!(today(&after)["dashboard_requests"], 44);
    assert!(today(&after)["dashboard_slow"].as_u64().unwrap() >= 4, "{after:#}");
    assert!(
        t["evidence"].as_str().unwrap().contains("of 44 dashboard requests took over 200 ms in the last 7 days"),
        "{t}"
    );
    assert_eq!(after["recommended_phase"], 2);
    assert_eq!(after["summary"], "Move to phase 2: dashboard_p95 fired.");
}

#[tokio::test]
async fn answers_held_up_by_the_database_fire_the_near_timeout_trigger() {
    // Near the timeout: over 40% of the 1,000 ms answer deadline.
    let app = TestApp::spawn_with(&[
        ("advisor.min_samples", "40"),
        ("advisor.answer_near_deadline", "0.4"),
        ("advisor.db_connections_share", "1"),
    ])
    .await;
    let org = app.org("pro").await;
    let tool_calls = sample("04-tool-calls-two-calls.json");
    for _ in 0..40 {
        let (status, body) = app.post_vapi(org.id, &tool_calls).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let before = advice(&app).await;
    let t = trigger(&before, "answers_near_timeout");
    assert_eq!((t["measured"].clone(), t["fired"].clone()), (json!(true), json!(false)), "{t}");
    assert_eq!(today(&before)["answers"], 40);

    // An assistant-request for a number not yet known while the phone registry is locked: the
    // lookup waits on the lock until the answer pool's lock timeout (half the deadline).
    let mut request = sample("01-assistant-request.json");
    request["message"]["phoneNumber"]["id"] = json!(format!("ph-{}", uuid::Uuid::new_v4().simple()));
    request["message"]["call"]["phoneNumberId"] = request["message"]["phoneNumber"]["id"].clone();
    request["message"]["call"]["id"] = json!(format!("call-{}", uuid::Uuid::new_v4().simple()));
    let mut lock = PgConnection::connect(&app.db.url).await.unwrap();
    lock.execute("BEGIN").await.unwrap();
    lock.execute("LOCK TABLE phone_numbers IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let started = std::time::Instant::now();
    let answer = app.http.post(format!("{}/vapi", app.base)).bearer_auth(SECRET).json(&request).send().await.unwrap();
    let took = started.elapsed();
    lock.execute("COMMIT").await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(took >= std::time::Duration::from_millis(400), "the answer took {took:?}");

    let after = advice(&app).await;
    let t = trigger(&after, "answers_near_timeout");
    assert_eq!(t["fired"], true, "{t}");
    assert_eq!(today(&after)["answers"], 41);
    assert!(t["evidence"].as_str().unwrap().contains("took over 400 ms"), "{t}");
    assert_eq!(after["recommended_phase"], 2);
}

#[tokio::test]
async fn events_that_fail_processing_fire_the_failure_rate_trigger() {
    // The refusal is answered once processing has decided, which a Temporal worker under load
    // may take past the default inline budget (2 s).
    let app = TestApp::spawn_with(&[
        ("advisor.min_samples", "40"),
        ("advisor.db_connections_share", "1"),
        ("inbox.inline_budget_ms", "10000"),
    ])
    .await;
    let org = app.org("pro").await;
    let update = |id: String, created_at: chrono::DateTime<Utc>| {
        let mut body = sample("02-status-update-in-progress.json");
        body["message"]["call"]["id"] = json!(id);
        body["message"]["call"]["createdAt"] = json!(crate::helpers::iso(created_at));
        body
    };
    let fine = (0..40).map(|i| update(format!("fine-{i}-{}", uuid::Uuid::new_v4().simple()), Utc::now())).collect();
    post_all(&app, org.id, fine).await;
    let before = advice(&app).await;
    let t = trigger(&before, "webhook_failures");
    assert_eq!(
        (t["measured"].clone(), t["fired"].clone(), t["value"].clone()),
        (json!(true), json!(false), json!(0.0))
    );

    // A call created a month in the future cannot be recorded: refused, kept as a dead letter.
    let future = update(format!("future-{}", uuid::Uuid::new_v4().simple()), Utc::now() + Duration::days(30));
    assert_eq!(app.post_vapi(org.id, &future).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    wait_for_count(&app, "SELECT count(*) FROM dead_letters", 1).await;
    let after = advice(&app).await;
    let t = trigger(&after, "webhook_failures");
    assert_eq!(t["fired"], true, "{t}");
    assert_eq!((today(&after)["webhooks"].clone(), today(&after)["failed_events"].clone()), (json!(41), json!(1)));
    assert!(t["evidence"].as_str().unwrap().starts_with("1 of 41 webhook events failed processing"), "{t}");
}

#[tokio::test]
async fn fifty_calls_at_once_on_three_days_fire_the_concurrency_trigger() {
    let app = TestApp::spawn_with(&[("advisor.db_connections_share", "1")]).await;
    let org = app.org_from("business", Utc::now() - Duration::days(10)).await;
    let noon = Utc::now().duration_trunc(Duration::days(1)).unwrap() + Duration::hours(12);
    // Fifty ten-minute calls starting a second apart: all fifty in progress at once.
    let day_of_calls = |days_ago: i64| {
        (0..50)
            .map(|i| report(&format!("d{days_ago}-{i}"), noon - Duration::days(days_ago) + Duration::seconds(i), 600.0))
            .collect::<Vec<_>>()
    };
    post_all(&app, org.id, day_of_calls(1)).await;
    post_all(&app, org.id, day_of_calls(2)).await;
    // A quieter day: 49 at once.
    let mut quiet = day_of_calls(4);
    quiet.pop();
    post_all(&app, org.id, quiet).await;
    wait_for_count(&app, "SELECT count(*) FROM calls WHERE reported_at IS NOT NULL", 149).await;
    let before = advice(&app).await;
    let t = trigger(&before, "concurrent_calls");
    assert_eq!((t["fired"].clone(), t["value"].clone()), (json!(false), json!(2.0)), "{t}");
    let peaks: Vec<u64> =
        before["days"].as_array().unwrap().iter().map(|d| d["concurrent_calls_peak"].as_u64().unwrap()).collect();
    assert_eq!(peaks, vec![0, 0, 49, 0, 50, 50, 0], "peaks by day, oldest first");

    post_all(&app, org.id, day_of_calls(3)).await;
    wait_for_count(&app, "SELECT count(*) FROM calls WHERE reported_at IS NOT NULL", 199).await;
    let after = advice(&app).await;
    let t = trigger(&after, "concurrent_calls");
    assert_eq!((t["fired"].clone(), t["value"].clone()), (json!(true), json!(3.0)), "{t}");
    assert!(t["evidence"].as_str().unwrap().starts_with("3 of 7 days had 50+ calls in progress at once"), "{t}");
    assert_eq!(after["recommended_phase"], 2);
}

#[tokio::test]
async fn refused_searches_and_live_transcripts_fire_their_triggers() {
    let app = TestApp::spawn_with(&[("backends.search", "off"), ("advisor.db_connections_share", "1")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let before = advice(&app).await;
    assert!(
        !fired(&before).contains(&"search_demand".to_owned())
            && !fired(&before).contains(&"live_transcripts".to_owned())
    );

    assert_eq!(app.get("/v1/search?q=refund", &key).await.0, StatusCode::CONFLICT);
    let after_search = advice(&app).await;
    assert_eq!(trigger(&after_search, "search_demand")["fired"], true);
    assert_eq!(today(&after_search)["searches_refused"], 1);
    assert_eq!(after_search["summary"], "Move to phase 2: search_demand fired.");

    // VAPI sends live transcripts only to an assistant set up to stream them.
    assert_eq!(app.post_vapi(org.id, &sample("05-transcript-partial.json")).await.0, StatusCode::OK);
    let after = advice(&app).await;
    let t = trigger(&after, "live_transcripts");
    assert_eq!((t["fired"].clone(), t["phase"].clone()), (json!(true), json!(3)), "{t}");
    assert_eq!(after["recommended_phase"], 3);
    assert_eq!(
        after["summary"],
        "Move to phase 3 (through phase 2's steps first): search_demand, live_transcripts fired."
    );
    let recommended: Vec<bool> = after["costs"].as_array().unwrap().iter().map(|c| c["recommended"] == true).collect();
    assert_eq!(recommended, vec![false, false, true]);
}

#[tokio::test]
async fn stored_calls_and_transcript_bytes_fire_their_triggers() {
    // 30 calls, and 2 MB of transcripts, stand for the plan's 1M calls and 10 GB.
    let app = TestApp::spawn_with(&[
        ("advisor.calls_stored", "30"),
        ("advisor.transcripts_gb", "0.002"),
        ("advisor.db_connections_share", "1"),
    ])
    .await;
    let org = app.org_from("business", Utc::now() - Duration::days(10)).await;
    let at = Utc::now() - Duration::hours(2);
    post_all(&app, org.id, (0..29).map(|i| report(&format!("small-{i}"), at, 30.0)).collect()).await;
    wait_for_count(&app, "SELECT count(*) FROM calls WHERE reported_at IS NOT NULL", 29).await;
    let before = advice(&app).await;
    assert_eq!(trigger(&before, "calls_stored")["value"], 29.0);
    assert_eq!(trigger(&before, "calls_stored")["fired"], false);
    let small = trigger(&before, "transcripts_size");
    assert_eq!(small["fired"], false, "{small}");

    // Long calls: transcripts of 600 kB each (words too long to index, as noise that does not
    // compress away).
    let long_transcript = || {
        (0..300)
            .map(|_| (0..64).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect::<String>())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let big = (0..8)
        .map(|i| {
            let mut body = report(&format!("long-{i}"), at, 1800.0);
            let text = long_transcript();
            body["message"]["transcript"] = json!(text);
            body["message"]["artifact"]["transcript"] = json!(text);
            body
        })
        .collect();
    post_all(&app, org.id, big).await;
    wait_for_count(&app, "SELECT count(*) FROM call_transcripts WHERE call_id LIKE 'long-%' AND is_final", 8).await;
    let after = advice(&app).await;
    let calls = trigger(&after, "calls_stored");
    assert_eq!(
        (calls["fired"].clone(), calls["evidence"].clone()),
        (json!(true), json!("more than 30 calls are stored"))
    );
    let size = trigger(&after, "transcripts_size");
    assert_eq!(size["fired"], true, "{size}");
    assert!(size["value"].as_f64().unwrap() > 0.002, "{size}");
    assert_eq!(after["recommended_phase"], 3);
}

#[tokio::test]
async fn connections_near_the_database_limit_fire_the_trigger_and_the_peak_is_kept() {
    let app = TestApp::spawn().await;
    // A hosted database limits callplane's connections (here, the database's own limit).
    let mut admin = PgConnection::connect(&app.db.url).await.unwrap();
    admin.execute(format!("ALTER DATABASE {} CONNECTION LIMIT 25", app.db.name).as_str()).await.unwrap();
    let before = advice(&app).await;
    let t = trigger(&before, "db_connections");
    assert_eq!(t["fired"], false, "{t}");
    assert!(t["evidence"].as_str().unwrap().contains("of 25 (the database limit)"), "{t}");

    // A burst of clients holds 25 more connections.
    let mut held = Vec::new();
    for _ in 0..25 {
        held.push(PgConnection::connect(&app.db.url).await.unwrap());
    }
    let during = advice(&app).await;
    let t = trigger(&during, "db_connections");
    assert_eq!(t["fired"], true, "{t}");
    assert!(t["value"].as_f64().unwrap() >= 1.0, "{t}");
    assert_eq!(during["recommended_phase"], 3);

    // They are gone; the day's peak is not.
    for c in held {
        c.close().await.unwrap();
    }
    let in_use = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()";
    for _ in 0..200 {
        if app.count(in_use).await < 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(app.count(in_use).await < 20, "the held connections are gone");
    let after = advice(&app).await;
    let t = trigger(&after, "db_connections");
    assert_eq!(t["fired"], true, "{t}");
    assert!(today(&after)["db_connections_peak_share"].as_f64().unwrap() >= 1.0, "{after:#}");
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_memory_over_the_threshold_fires_the_trigger_and_the_peak_is_kept() {
    use callplane_testkit::redis::RedisServer;
    let redis = RedisServer::start();
    let url = redis.url();
    let app = TestApp::spawn_with(&[
        ("redis.url", url.as_str()),
        ("backends.usage_counter", "redis"),
        ("backends.function_data", "redis"),
        ("advisor.redis_memory_mb", "8"),
        ("advisor.db_connections_share", "1"),
    ])
    .await;
    let before = advice(&app).await;
    let t = trigger(&before, "redis_memory");
    assert_eq!((t["measured"].clone(), t["fired"].clone()), (json!(true), json!(false)), "{t}");
    assert!(t["value"].as_f64().unwrap() < 8.0, "{t}");

    redis.set_bytes("advisor-test-ballast", 16 << 20);
    let during = advice(&app).await;
    let t = trigger(&during, "redis_memory");
    assert_eq!(t["fired"], true, "{t}");
    assert!(t["value"].as_f64().unwrap() >= 16.0, "{t}");

    redis.delete("advisor-test-ballast");
    let after = advice(&app).await;
    let t = trigger(&after, "redis_memory");
    assert_eq!(t["fired"], true, "the day's peak is kept: {t}");
    assert!(today(&after)["redis_memory_peak_bytes"].as_u64().unwrap() >= 16 << 20);
}
