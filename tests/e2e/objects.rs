//! Phase 3's transcripts in object storage, against a real S3-compatible server (`s3s-fs`, one
//! per test) and a directory: the transcript contract, what the rows and the bucket hold, the
//! webhooks through to `GET /v1/calls/{id}`, and an outage of the store that loses nothing.

use crate::durability::eventually;
use crate::helpers::{TestApp, lifecycle};
use callplane_core::seams::{Transcript, TranscriptStore};
use callplane_storage::{ObjectStoreConfig, ObjectTranscriptStore, Objects};
use callplane_testkit::contracts;
use callplane_testkit::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use chrono::{Duration, Utc};
use reqwest::StatusCode;
use serde_json::Value;

fn s3_config(s3: &S3Server, prefix: &str) -> ObjectStoreConfig {
    ObjectStoreConfig {
        url: s3.url(prefix),
        endpoint: Some(s3.endpoint()),
        region: None,
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        timeout: std::time::Duration::from_secs(2),
    }
}

/// The settings that put a test server's transcripts in the S3 server at `endpoint`.
fn on_s3<'a>(url: &'a str, endpoint: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("backends.transcripts", "object-store"),
        ("object_store.url", url),
        ("object_store.endpoint", endpoint),
        ("object_store.access_key_id", ACCESS_KEY),
        ("object_store.secret_access_key", SECRET_KEY),
        ("object_store.timeout_seconds", "2"),
        ("inbox.max_backoff_seconds", "1"),
    ]
}

/// The contract, then what it left: each call's row points at one object and keeps no
/// messages, and the versions it replaced are gone from the store.
async fn contract_on(app: &TestApp, objects: Objects, listed: impl Fn() -> Vec<String>) {
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    let store = ObjectTranscriptStore::new(app.db.store.clone(), objects);
    contracts::transcript_store(&store, a.id, b.id, "contract-call", Utc::now()).await;
    let rows: Vec<(String, Option<String>, Value, Option<i32>)> =
        sqlx::query_as("SELECT call_id, object_key, messages, message_count FROM call_transcripts ORDER BY call_id")
            .fetch_all(app.db.store.pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let mut keys = Vec::new();
    for (call_id, key, messages, count) in rows {
        let key = key.unwrap_or_else(|| panic!("the row of {call_id} names no object"));
        assert_eq!(messages, serde_json::json!([]), "the row of {call_id} still holds its messages");
        assert!(count.is_some_and(|n| n > 0), "{call_id}: message count {count:?}");
        assert!(key.contains(&format!("transcripts/{}/", a.id.0)), "{key} is not under its organization");
        keys.push(key);
    }
    let stored = listed();
    assert_eq!(stored.len(), 2, "replaced versions were left in the store: {stored:?}");
    for key in keys {
        assert!(stored.iter().any(|s| s.ends_with(key.rsplit('/').next().unwrap())), "{key} not in {stored:?}");
    }

    // VAPI delivering the same report several times at once: one object, kept.
    let report = Transcript {
        text: Some("AI: same\nUser: same\n".into()),
        messages: vec![serde_json::json!({"role": "bot", "message": "same"})],
        is_final: true,
    };
    let at = Utc::now();
    let puts = futures::future::join_all((0..8).map(|_| store.put(a.id, "same-report", at, &report))).await;
    assert!(puts.iter().all(Result::is_ok), "{puts:?}");
    assert_eq!(store.get(a.id, "same-report").await.unwrap(), Some(report), "the one version kept was deleted");
    assert_eq!(listed().len(), 3, "the same report made more than one object");
}

#[tokio::test]
async fn object_transcripts_pass_the_contract_on_s3() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    let objects = Objects::open(&s3_config(&s3, "contract")).unwrap();
    contract_on(&app, objects, || s3.objects("contract/transcripts")).await;
}

#[tokio::test]
async fn object_transcripts_pass_the_contract_in_a_directory() {
    let dir = std::env::temp_dir().join(format!("callplane-objects-{}", uuid::Uuid::new_v4().simple()));
    let app = TestApp::spawn().await;
    let config = ObjectStoreConfig { url: dir.to_string_lossy().into_owned(), ..s3_free_config() };
    let objects = Objects::open(&config).unwrap();
    let listed = || files_under(&dir.join("transcripts"));
    contract_on(&app, objects, listed).await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn s3_free_config() -> ObjectStoreConfig {
    ObjectStoreConfig { timeout: std::time::Duration::from_secs(2), ..ObjectStoreConfig::default() }
}

/// A call's webhooks with `backends.transcripts = "object-store"` on S3: the report's transcript
/// is one object in the bucket, the row keeps its text for search but not its messages, and
/// `GET /v1/calls/{id}` reads it back whole.
#[tokio::test]
async fn webhooks_keep_the_transcript_in_s3_and_the_api_reads_it_back() {
    let s3 = S3Server::start();
    let (url, endpoint) = (s3.url("calls"), s3.endpoint());
    let app = TestApp::spawn_with(&on_s3(&url, &endpoint)).await;
    let org = app.org("pro").await;
    let events = lifecycle("s3-call", Utc::now() - Duration::minutes(3), 95.0);
    for event in &events {
        assert_eq!(app.post_vapi_in_turn(org.id, event).await.0, StatusCode::OK);
    }
    let report = &events.last().unwrap()["message"];
    let key = app.api_key(org.id).await;
    let mut detail = Value::Null;
    eventually("the report's transcript is readable", async || {
        let (status, body) = app.get("/v1/calls/s3-call", &key).await;
        detail = body;
        status == StatusCode::OK && detail["transcript_final"] == true
    })
    .await;
    assert_eq!(detail["transcript"], report["artifact"]["transcript"]);
    assert_eq!(detail["messages"], report["artifact"]["messages"]);
    let (object_key, messages, text): (Option<String>, Value, Option<String>) =
        sqlx::query_as("SELECT object_key, messages, transcript FROM call_transcripts WHERE call_id = 's3-call'")
            .fetch_one(app.db.store.pool())
            .await
            .unwrap();
    assert_eq!(messages, serde_json::json!([]));
    assert_eq!(text.as_deref(), report["artifact"]["transcript"].as_str(), "search reads the text from the row");
    let stored = s3.objects("calls/transcripts");
    assert_eq!(stored.len(), 1, "one object for the call, the live versions replaced: {stored:?}");
    assert!(object_key.is_some_and(|k| stored[0].ends_with(k.rsplit('/').next().unwrap())));
}

/// The store stops before the report arrives: the report is answered and billed, and its
/// transcript, which has nowhere to go, waits in the inbox until the store is back.
#[tokio::test]
async fn an_object_store_outage_loses_no_transcript() {
    let mut s3 = S3Server::start();
    let (url, endpoint) = (s3.url("outage"), s3.endpoint());
    // The inline pipeline, whose inbox the report waits in (a Temporal workflow retries it
    // the same way, out of sight of this test).
    let mut settings = on_s3(&url, &endpoint);
    settings.push(("backends.event_pipeline", "inline"));
    let app = TestApp::spawn_with(&settings).await;
    let org = app.org("pro").await;
    let events = lifecycle("outage-call", Utc::now() - Duration::minutes(3), 61.0);
    let (report, before) = events.split_last().unwrap();
    for event in before {
        assert_eq!(app.post_vapi_in_turn(org.id, event).await.0, StatusCode::OK);
    }
    s3.stop();
    assert_eq!(app.post_vapi(org.id, report).await.0, StatusCode::OK, "the report is answered while S3 is down");
    eventually("the call is billed without its store", async || app.seconds_used(org.id).await == 61).await;
    let key = app.api_key(org.id).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (_, detail) = app.get("/v1/calls/outage-call", &key).await;
    assert_ne!(detail["transcript_final"], true, "the final transcript cannot be stored yet: {detail}");
    assert!(app.app.intake.inbox().depth() > 0, "the report waits in the inbox while S3 is down");
    s3.start_again();
    eventually("the transcript arrives once S3 is back", async || {
        let (status, detail) = app.get("/v1/calls/outage-call", &key).await;
        status == StatusCode::OK
            && detail["transcript_final"] == true
            && detail["messages"] == report["message"]["artifact"]["messages"]
    })
    .await;
    assert_eq!(app.seconds_used(org.id).await, 61, "retrying the report billed nothing twice");
    assert_eq!(s3.objects("outage/transcripts").len(), 1);
}

/// 10,000 transcripts of one organization moved out of the database with
/// `callplane transcripts move`, while a call's webhooks arrive, and moved back (their
/// messages carry floats of 17 digits, which must keep every digit on the way): every object
/// is in the store in between, every row comes back as it was, the store is empty again, and
/// another organization's transcripts are never touched. `--before` moves only older months.
async fn move_round_trip(app: &TestApp, objects: Objects, listed: impl Fn(&str) -> Vec<String>) {
    const N: i64 = 10_000;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    let this_month = callplane_core::billing::month_start(Utc::now());
    let last_month = this_month - Duration::days(10);
    sqlx::query("SELECT callplane_ensure_month($1)").bind(last_month).execute(app.db.store.pool()).await.unwrap();
    for (org, n) in [(a.id, N), (b.id, 10)] {
        // Half of each organization's calls last month, half this month.
        sqlx::query(
            "INSERT INTO call_transcripts (call_id, organization_id, created_at, transcript, messages, is_final) \
             SELECT $1 || '-' || i, $2, CASE WHEN i % 2 = 0 THEN $3 ELSE $4 END + i * interval '1 ms', \
                    'AI: hello ' || i || E'\\nUser: bye ' || i, \
                    jsonb_build_array(jsonb_build_object('role', 'bot', 'message', 'hello ' || i), \
                                      jsonb_build_object('role', 'user', 'message', 'bye ' || i, \
                                                         'time', ((1.7e12 + i * 1234.5678901)::float8)::text::jsonb)), \
                    i % 3 <> 0 \
             FROM generate_series(1, $5) i",
        )
        .bind(format!("bulk-{}", org.0.simple()))
        .bind(org.0)
        .bind(last_month)
        .bind(this_month)
        .bind(n)
        .execute(app.db.store.pool())
        .await
        .unwrap();
    }
    type Row = (String, Option<String>, Value, bool);
    let rows = async |org: callplane_core::OrgId| -> Vec<Row> {
        sqlx::query_as(
            "SELECT call_id, transcript, messages, is_final FROM call_transcripts \
             WHERE organization_id = $1 AND call_id LIKE 'bulk-%' ORDER BY call_id",
        )
        .bind(org.0)
        .fetch_all(app.db.store.pool())
        .await
        .unwrap()
    };
    let (before_a, before_b) = (rows(a.id).await, rows(b.id).await);
    let org_a = a.id.0.to_string();

    // Out, with a call's webhooks arriving meanwhile.
    let traffic = async {
        for event in lifecycle("moving-call", Utc::now() - Duration::minutes(2), 30.0) {
            assert_eq!(app.post_vapi_in_turn(a.id, &event).await.0, StatusCode::OK);
        }
    };
    let args = ["transcripts", "move", "--to", "object-store", "--org", &org_a, "--batch", "700"];
    let (out, ()) = tokio::join!(app.callplane_json(&args), traffic);
    assert_eq!(out["moved"], N, "{out}");
    assert_eq!(out["left"], 0, "{out}");
    assert_eq!(listed(&org_a).len() as i64, N + 1, "every transcript of the organization is one object");
    let in_rows: i64 = app.count(&format!(
        "SELECT count(*) FROM call_transcripts WHERE organization_id = '{org_a}' AND (object_key IS NULL OR messages <> '[]')"
    )).await;
    assert_eq!(in_rows, 0, "a moved row still holds its messages");
    assert_eq!(rows(b.id).await, before_b, "another organization's transcripts moved");
    let store = ObjectTranscriptStore::new(app.db.store.clone(), objects);
    let (call_id, text, messages, is_final) = &before_a[1234];
    let read = store.get(a.id, call_id).await.unwrap().unwrap();
    assert_eq!((&read.text, &Value::from(read.messages.clone()), &read.is_final), (text, messages, is_final));

    // Only the older month of the other organization.
    let older = app
        .callplane_json(&[
            "transcripts",
            "move",
            "--to",
            "object-store",
            "--org",
            &b.id.0.to_string(),
            "--before",
            &this_month.format("%Y-%m").to_string(),
        ])
        .await;
    assert_eq!(older["moved"], 5, "{older}");

    // `phase plan 3` says what is left, and then that it is done.
    let moved_step = async || {
        let plan = app.callplane_json(&["phase", "plan", "3"]).await;
        let steps = plan["steps"].as_array().unwrap();
        let step = |name: &str| steps.iter().find(|s| s["step"] == name).cloned().unwrap();
        assert_eq!(step("new transcripts in object storage")["status"], "done", "{plan}");
        step("existing transcripts moved to object storage")["status"].clone()
    };
    assert_eq!(moved_step().await, "ready", "this month's transcripts of the other organization are in rows");
    let rest = app.callplane_json(&["transcripts", "move", "--to", "object-store"]).await;
    assert_eq!(rest["left"], 0, "{rest}");
    assert_eq!(moved_step().await, "done");

    // And back: the rows as they were, the store empty.
    let back = app.callplane_json(&["transcripts", "move", "--to", "postgres", "--org", &org_a]).await;
    assert_eq!(back["moved"], N + 1, "{back}");
    assert_eq!(back["left"], 0, "{back}");
    assert_eq!(rows(a.id).await, before_a, "a transcript came back different");
    assert_eq!(listed(&org_a), Vec::<String>::new(), "objects were left behind after moving back");
}

#[tokio::test]
async fn transcripts_move_to_s3_and_back_with_traffic_running() {
    let s3 = S3Server::start();
    let (url, endpoint) = (s3.url("moves"), s3.endpoint());
    let app = TestApp::spawn_with(&on_s3(&url, &endpoint)).await;
    let objects = Objects::open(&s3_config(&s3, "moves")).unwrap();
    move_round_trip(&app, objects, |org| s3.objects(&format!("moves/transcripts/{org}"))).await;
}

#[tokio::test]
async fn transcripts_move_to_a_directory_and_back_with_traffic_running() {
    let app = TestApp::spawn_with(&[("backends.transcripts", "object-store")]).await;
    let dir = std::path::PathBuf::from(&app.app.settings.object_store.url);
    let objects =
        Objects::open(&ObjectStoreConfig { url: dir.to_string_lossy().into_owned(), ..s3_free_config() }).unwrap();
    move_round_trip(&app, objects, |org| files_under(&dir.join("transcripts").join(org))).await;
}

/// Every file under `dir`.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(entry.path().to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}
