//! The dashboard's reads on a streaming replica (phase 3), against the replica `cargo xtask
//! test` makes with `pg_basebackup`: reads go to it, a client always reads its own writes, a
//! change the real-time stream announced is read at once, lag is measured and a lagging or
//! stopped replica hands its reads to the primary without an error. The replica is shared, and
//! these tests pause and stop it, so they run one at a time (`.config/nextest.toml`).

use crate::helpers::{ADMIN_TOKEN, TestApp, lifecycle};
use crate::realtime::{connect, events, until_ready};
use callplane_core::seams::FunctionData;
use callplane_core::{OrgId, Organization};
use callplane_storage::PgFunctionData;
use callplane_testkit::replica::TestReplica;
use chrono::{Duration, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use std::time::{Duration as StdDuration, Instant};

/// Function data on Postgres, so that its reads reach the replica (in the phase-3 run the
/// harness otherwise serves it from Redis).
const ON_POSTGRES: (&str, &str) = ("backends.function_data", "postgres");

/// A server reading from the replica, with an organization and its API key.
async fn setup(replica: &TestReplica, overrides: &[(&str, &str)]) -> (TestApp, Organization, String) {
    // As the last test may have left it, had it failed half way.
    replica.ensure_replaying().await;
    let mut all = vec![ON_POSTGRES, ("database.replica_check_ms", "50")];
    all.extend_from_slice(overrides);
    let app = TestApp::spawn_with_replica(replica, &all).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    caught_up(replica, &app).await;
    (app, org, key)
}

/// Waits until the replica has replayed everything the primary has written so far, and the
/// server's router has seen it answer.
async fn caught_up(replica: &TestReplica, app: &TestApp) {
    let lsn: String =
        sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text").fetch_one(app.db.store.pool()).await.unwrap();
    let mut conn = PgConnection::connect(&replica.url(&app.db.name)).await.unwrap();
    let until = Instant::now() + StdDuration::from_secs(20);
    loop {
        let done: bool = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&lsn)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if done && replica_state(app).await["state"] == "streaming" {
            return;
        }
        assert!(Instant::now() < until, "the replica did not replay {lsn} within 20 s");
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
}

/// `/readyz`'s replica detail.
async fn replica_state(app: &TestApp) -> Value {
    let r = app.http.get(format!("{}/readyz", app.base)).send().await.unwrap();
    let body: Value = r.json().await.unwrap();
    body["checks"]["replica"].clone()
}

/// GET with an optional `Callplane-Read-After`.
async fn get_after(app: &TestApp, path: &str, key: &str, after: Option<&str>) -> (StatusCode, Value) {
    let mut request = app.http.get(format!("{}{path}", app.base)).bearer_auth(key);
    if let Some(after) = after {
        request = request.header("callplane-read-after", after);
    }
    let r = request.send().await.unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// Writes `value` under `name` straight into the primary, as nothing that tells this server
/// would (another tool, another server whose client sends no header).
async fn write_behind_its_back(app: &TestApp, org: OrgId, name: &str, value: Value) {
    PgFunctionData(app.db.store.clone()).put(org, name, &value).await.unwrap();
}

#[tokio::test]
async fn reads_go_to_the_replica_and_a_client_always_reads_its_own_writes() {
    let replica = TestReplica::from_env();
    let (app, org, key) = setup(&replica, &[]).await;
    let other = app.org("pro").await;
    let other_key = app.api_key(other.id).await;
    write_behind_its_back(&app, other.id, "greeting", json!("old")).await;
    let written = app.put_function_data(&key, "greeting", &json!("hello")).await;
    let after = written.headers().get("callplane-read-after").expect("a write's answer carries its position");
    let after: callplane_core::reads::Lsn = after.to_str().unwrap().parse().unwrap();
    caught_up(&replica, &app).await;

    // The replica answers.
    let before = app.metric("callplane_replica_reads_total").await;
    let (status, body) = app.get("/v1/function-data/greeting", &key).await;
    assert_eq!((status, &body["value"]), (StatusCode::OK, &json!("hello")));
    assert!(app.metric("callplane_replica_reads_total").await > before, "the read went to the replica");

    // The replica stops replaying: it still answers, with what it has.
    replica.pause_replay().await;
    let paused = async {
        // A change this server's client made is read at once, from the primary.
        let written = app.put_function_data(&key, "greeting", &json!("hi again")).await;
        let next: callplane_core::reads::Lsn =
            written.headers()["callplane-read-after"].to_str().unwrap().parse().unwrap();
        assert!(next > after, "positions move forward: {after} then {next}");
        let behind = app.metric("callplane_replica_fallbacks_total{reason=\"behind\"}").await;
        let (_, body) = app.get("/v1/function-data/greeting", &key).await;
        assert_eq!(body["value"], json!("hi again"), "a client reads its own write");
        let (_, body) = app.get("/v1/function-data", &key).await;
        assert!(body["data"].as_array().unwrap().iter().any(|e| e["value"] == "hi again"), "{body}");
        assert!(app.metric("callplane_replica_fallbacks_total{reason=\"behind\"}").await >= behind + 2.0);

        // A change nothing announced is not seen on the replica until it replays it: the
        // read really is the replica's.
        write_behind_its_back(&app, other.id, "greeting", json!("new")).await;
        let (_, body) = app.get("/v1/function-data/greeting", &other_key).await;
        assert_eq!(body["value"], json!("old"), "served by the paused replica");
        // Unless the client says which write it must see (as it would from another server).
        let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(app.db.store.pool())
            .await
            .unwrap();
        let (_, body) = get_after(&app, "/v1/function-data/greeting", &other_key, Some(&lsn)).await;
        assert_eq!(body["value"], json!("new"), "Callplane-Read-After {lsn} makes the read see the write");

        // A key made a moment ago works at once (credentials are read on the primary).
        let r = app
            .http
            .post(format!("{}/admin/v1/organizations/{}/api-keys", app.base, org.id))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"name": "fresh"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let fresh: Value = r.json().await.unwrap();
        let (status, _) = app.get("/v1/usage", fresh["key"].as_str().unwrap()).await;
        assert_eq!(status, StatusCode::OK);
    };
    paused.await;
    replica.resume_replay().await;

    // Replayed, the replica has the change too.
    caught_up(&replica, &app).await;
    let (_, body) = app.get("/v1/function-data/greeting", &other_key).await;
    assert_eq!(body["value"], json!("new"));

    // A position that is not one is refused with its code.
    let (status, body) = get_after(&app, "/v1/function-data", &key, Some("not-a-position")).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_read_after")), "{body}");
}

#[tokio::test]
async fn a_call_the_stream_announced_is_read_at_once_whatever_the_replica_has_replayed() {
    let replica = TestReplica::from_env();
    let (app, org, key) = setup(&replica, &[]).await;
    let mut ws = connect(&app.ws_url(""), Some(&key)).await.unwrap();
    assert!(until_ready(&mut ws).await.is_empty());

    replica.pause_replay().await;
    let watched = async {
        for e in lifecycle("watched", Utc::now() - Duration::minutes(3), 61.0) {
            app.post_vapi_in_turn(org.id, &e).await;
        }
        let got = events(&mut ws, 8).await;
        assert!(got.iter().any(|e| e["kind"] == "call.ended"), "{got:?}");
        // Everything the client was told of is there to read, though the replica has none of it.
        let (status, body) = app.get("/v1/calls/watched", &key).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ended");
        assert_eq!(body["billable_seconds"], 61);
        let (_, body) = app.get("/v1/calls", &key).await;
        assert_eq!(body["data"][0]["id"], "watched");
        let (_, body) = app.get("/v1/usage", &key).await;
        assert_eq!(body["calls"], 1, "{body}");
    };
    watched.await;
    replica.resume_replay().await;
}

#[tokio::test]
async fn lag_is_measured_and_a_replica_too_far_behind_gets_no_reads() {
    let replica = TestReplica::from_env();
    // The suite's primary commits asynchronously, so the replica receives the log when the WAL
    // writer flushes it (every 200 ms): a second is well past that.
    let (app, org, key) = setup(&replica, &[("database.replica_max_lag_ms", "1000")]).await;
    assert!(replica_state(&app).await["lag_seconds"].as_f64().unwrap() < 1.0);

    replica.pause_replay().await;
    let lagging = async {
        // The primary goes on writing; the replica replays none of it.
        let until = Instant::now() + StdDuration::from_secs(5);
        loop {
            write_behind_its_back(&app, org.id, "tick", json!(Utc::now().to_rfc3339())).await;
            let state = replica_state(&app).await;
            if state["state"] == "lagging" {
                assert!(state["lag_seconds"].as_f64().unwrap() > 1.0, "{state}");
                assert!(state["lag_bytes"].as_u64().unwrap() > 0, "{state}");
                break;
            }
            assert!(Instant::now() < until, "the replica never counted as lagging: {state}");
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
        assert!(app.metric("callplane_replica_lag_seconds").await > 1.0);
        // Ready all the same: the primary answers the reads.
        let r = app.http.get(format!("{}/readyz", app.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let before = app.metric("callplane_replica_fallbacks_total{reason=\"lagging\"}").await;
        let (_, body) = app.get("/v1/function-data/tick", &key).await;
        assert!(body["value"].is_string(), "{body}");
        assert_eq!(app.metric("callplane_replica_fallbacks_total{reason=\"lagging\"}").await, before + 1.0);
    };
    lagging.await;
    replica.resume_replay().await;
    caught_up(&replica, &app).await;
    assert!(replica_state(&app).await["lag_seconds"].as_f64().unwrap() < 1.0);
}

#[tokio::test]
async fn the_replica_stopped_mid_traffic_costs_no_reader_an_error() {
    let replica = TestReplica::from_env();
    let (app, org, key) = setup(&replica, &[]).await;
    for e in lifecycle("kept", Utc::now() - Duration::minutes(3), 30.0) {
        app.post_vapi_in_turn(org.id, &e).await;
    }
    app.put_function_data(&key, "greeting", &json!("hello")).await;
    caught_up(&replica, &app).await;

    // Readers read all along while the replica stops, stays away and comes back.
    let reading = async {
        let mut reads = 0;
        let until = Instant::now() + StdDuration::from_secs(4);
        while Instant::now() < until {
            for path in ["/v1/calls", "/v1/calls/kept", "/v1/usage", "/v1/function-data/greeting", "/v1/usage/daily"] {
                let (status, body) = app.get(path, &key).await;
                assert_eq!(status, StatusCode::OK, "{path}: {body}");
                reads += 1;
            }
            let (_, body) = app.get("/v1/calls/kept", &key).await;
            assert_eq!(body["billable_seconds"], 30);
        }
        reads
    };
    let stopping = async {
        tokio::time::sleep(StdDuration::from_millis(500)).await;
        tokio::task::spawn_blocking(|| TestReplica::from_env().stop()).await.unwrap();
        tokio::time::sleep(StdDuration::from_millis(1500)).await;
        let state = replica_state(&app).await;
        assert_eq!(state["state"], "down", "{state}");
        let r = app.http.get(format!("{}/readyz", app.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "a replica down is no reason to be unready");
    };
    let (reads, ()) = tokio::join!(reading, stopping);
    assert!(reads > 20, "only {reads} reads");
    let away = app.metric("callplane_replica_fallbacks_total{reason=\"down\"}").await
        + app.metric("callplane_replica_fallbacks_total{reason=\"failed\"}").await;
    assert!(away > 0.0, "reads went to the primary while the replica was away");

    // Back, it serves reads again.
    tokio::task::spawn_blocking(|| TestReplica::from_env().start()).await.unwrap();
    caught_up(&replica, &app).await;
    let before = app.metric("callplane_replica_reads_total").await;
    let (status, _) = app.get("/v1/calls/kept", &key).await;
    assert_eq!(status, StatusCode::OK);
    assert!(app.metric("callplane_replica_reads_total").await > before);
}
