//! Hostile and odd VAPI webhooks (issue 9): text PostgreSQL cannot store, numbers no call has,
//! ids no one uses, reports without a duration, routing hints lifted from another call. Each
//! is either applied with its text made storable, or refused with a stable code and kept byte
//! for byte: never lost, never a dropped connection, never billed 0 in silence.

use crate::helpers::{SECRET, TestApp, iso, lifecycle, sample};
use callplane_core::OrgId;
use callplane_storage::DeadLetterFilter;
use callplane_testkit::vapi_stub::{VapiStub, ended_call};
use callplane_workflow::reconcile::{ReconcileReport, ReconcileScope, ReconcileSettings, Reconciler, VapiCalls};
use chrono::{DateTime, Duration, Utc};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::{Value, json};

/// Posts exactly `bytes` to the organization's webhook URL.
async fn post_raw(app: &TestApp, org: OrgId, bytes: Vec<u8>) -> (StatusCode, Value) {
    let r = app
        .http
        .post(format!("{}/vapi/{}", app.base, org))
        .bearer_auth(SECRET)
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .expect("the server answers (no dropped connection)");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// An end-of-call report for `call_id` with only the fields given: no duration, no times,
/// unless `message` or `call` add them.
fn bare_report(call_id: &str, created: DateTime<Utc>, message: Value, call: Value) -> Value {
    let mut call_obj = json!({ "id": call_id, "createdAt": iso(created), "type": "inboundPhoneCall" });
    call_obj.as_object_mut().unwrap().extend(call.as_object().unwrap().clone());
    let mut m = json!({
        "type": "end-of-call-report",
        "timestamp": (created + Duration::minutes(5)).timestamp_millis(),
        "endedReason": "customer-ended-call",
        "call": call_obj,
    });
    m.as_object_mut().unwrap().extend(message.as_object().unwrap().clone());
    json!({ "message": m })
}

struct Kept {
    code: String,
    call_id: Option<String>,
    payload: Value,
    raw_body: Option<Vec<u8>>,
}

/// The dead letters, once there are `n` (refused bodies are kept through the intake, which
/// writes them on its own after the answer).
async fn dead_letters_when(app: &TestApp, n: usize) -> Vec<Kept> {
    for _ in 0..100 {
        let kept = dead_letters(app).await;
        if kept.len() >= n {
            return kept;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    dead_letters(app).await
}

async fn dead_letters(app: &TestApp) -> Vec<Kept> {
    let letters = app.db.store.dead_letters(&DeadLetterFilter::default()).await.unwrap();
    letters
        .into_iter()
        .map(|d| Kept { code: d.error_code, call_id: d.call_id, payload: d.payload, raw_body: d.raw_body })
        .collect()
}

#[tokio::test]
async fn nul_in_a_call_id_customer_number_or_transcript_is_stored_replaced_and_the_call_billed() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let created = Utc::now() - Duration::minutes(10);
    let mut events = lifecycle("nul\u{0}call", created, 42.5);
    for event in &mut events {
        let m = &mut event["message"];
        if m["call"].is_object() {
            m["call"]["customer"] = json!({ "number": "+1415\u{0}5550100" });
        }
        if m["type"] == "end-of-call-report" {
            m["artifact"]["transcript"] = json!("AI: hello\u{0}\nUser: bye\n");
            m["summary"] = json!("a\u{0}b");
        }
    }
    for event in &events {
        let (status, body) = app.post_vapi(org.id, event).await;
        assert_eq!(status, StatusCode::OK, "{} -> {body}", event["message"]["type"]);
    }
    let call = app.call(org.id, "nul\u{FFFD}call").await.expect("the call is stored under its id, NUL replaced");
    assert_eq!(call.status, "ended");
    assert_eq!(call.billable_seconds, Some(43));
    assert_eq!(call.customer_number.as_deref(), Some("+1415\u{FFFD}5550100"));
    assert_eq!(app.seconds_used(org.id).await, 43);
    let transcript: String = sqlx::query_scalar("SELECT transcript FROM call_transcripts WHERE call_id = $1")
        .bind("nul\u{FFFD}call")
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    assert_eq!(transcript, "AI: hello\u{FFFD}\nUser: bye\n");
    assert!(dead_letters(&app).await.is_empty(), "nothing failed");
}

#[tokio::test]
async fn a_refused_event_with_nul_is_kept_as_a_dead_letter_with_its_exact_bytes_and_replays_from_them() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    // Far in the future: refused (future_timestamp), so it must be kept whole.
    let created = Utc::now() + Duration::days(30);
    let body = bare_report("late\u{0}call", created, json!({ "durationSeconds": 30 }), json!({}));
    let bytes = serde_json::to_vec(&body).unwrap();
    assert!(bytes.windows(6).any(|w| w == b"\\u0000"), "the body carries an escaped NUL");
    let (status, answer) = post_raw(&app, org.id, bytes.clone()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["code"], "future_timestamp");

    let kept = dead_letters(&app).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].code, "future_timestamp");
    assert_eq!(kept[0].call_id.as_deref(), Some("late\u{FFFD}call"));
    assert_eq!(kept[0].payload["message"]["call"]["id"], "late\u{FFFD}call");

    // An unroutable body (shared URL, nothing matches) is kept byte for byte.
    let lost = bare_report("orphan\u{0}", Utc::now(), json!({ "durationSeconds": 30 }), json!({}));
    let orphan_bytes = serde_json::to_vec(&lost).unwrap();
    let r = app
        .http
        .post(format!("{}/vapi", app.base))
        .bearer_auth(SECRET)
        .header("content-type", "application/json")
        .body(orphan_bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let kept = dead_letters_when(&app, 2).await;
    let orphan = kept.iter().find(|k| k.code == "unknown_organization").expect("the unroutable body is kept");
    assert_eq!(orphan.raw_body.as_deref(), Some(&orphan_bytes[..]), "kept byte for byte");

    // Replay reads the exact bytes: once the call's organization is known, it is applied.
    sqlx::query("INSERT INTO call_keys (vapi_call_id, organization_id, created_at) VALUES ($1, $2, now())")
        .bind("orphan\u{FFFD}")
        .bind(org.id.0)
        .execute(app.db.store.pool())
        .await
        .unwrap();
    let filter = DeadLetterFilter { call_id: Some("orphan\u{FFFD}".into()), ..Default::default() };
    let report = app.app.dead_letters.replay(&filter, app.app.state.orgs.as_ref(), |_| {}).await.unwrap();
    assert_eq!((report.attempted, report.succeeded), (1, 1), "{report:?}");
    assert_eq!(app.call(org.id, "orphan\u{FFFD}").await.unwrap().billable_seconds, Some(30));
}

#[tokio::test]
async fn an_absurd_duration_is_refused_with_a_code_and_kept_never_a_panic_or_a_bill() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let created = Utc::now() - Duration::minutes(10);
    for (field, value, call_id) in [
        ("durationSeconds", json!(1e300), "huge-seconds"),
        ("durationMs", json!(-5), "negative-ms"),
        ("durationMinutes", json!(1e200), "huge-minutes"),
    ] {
        let body = bare_report(call_id, created, json!({ field: value }), json!({}));
        let (status, answer) = app.post_vapi(org.id, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {answer}");
        assert_eq!(answer["code"], "invalid_duration");
        assert!(answer["message"].as_str().unwrap().contains(field), "{answer}");
    }
    let kept = dead_letters_when(&app, 3).await;
    assert_eq!(kept.len(), 3);
    assert!(kept.iter().all(|k| k.code == "invalid_duration" && k.raw_body.is_some()));
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 0);
    // The server is still there.
    let (status, _) = app.post_vapi(org.id, &lifecycle("after", created, 3.0)[1]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn ids_longer_than_256_characters_and_times_outside_1970_to_9999_are_refused_and_kept() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let created = Utc::now() - Duration::minutes(10);
    let long_id = "x".repeat(9000);
    let (status, answer) = app.post_vapi(org.id, &bare_report(&long_id, created, json!({}), json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["code"], "id_too_long");
    let mut tool = sample("04-tool-calls-two-calls.json");
    tool["message"]["toolCallList"][0]["id"] = json!("t".repeat(300));
    let (status, answer) = app.post_vapi(org.id, &tool).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some("id_too_long")));
    for at in [json!("-262143-01-01T00:00:00Z"), json!("+275760-09-13T00:00:00Z"), json!(-8.64e15), json!(1e300)] {
        let body = bare_report("odd-time", created, json!({ "startedAt": at, "durationSeconds": 3 }), json!({}));
        let (status, answer) = app.post_vapi(org.id, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{at}: {answer}");
        assert_eq!(answer["code"], "invalid_timestamp");
    }
    let kept = dead_letters_when(&app, 6).await;
    assert_eq!(kept.len(), 6, "every refused body is kept");
    let long = kept.iter().find(|k| k.code == "id_too_long" && k.call_id.is_some()).unwrap();
    assert_eq!(long.call_id.as_deref().map(str::len), Some(256), "the column keeps a prefix; the body keeps it all");
    assert_eq!(long.payload["message"]["call"]["id"].as_str().map(str::len), Some(9000));
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 0);
}

#[tokio::test]
async fn the_duration_comes_from_the_best_source_present() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let created = Utc::now() - Duration::minutes(30);
    let started = created + Duration::seconds(2);
    let at = |secs: i64| iso(started + Duration::seconds(secs));
    let cases = [
        ("by-seconds", json!({ "durationSeconds": 10.2, "durationMs": 99000 }), json!({}), 11),
        ("by-ms", json!({ "durationMs": 20500 }), json!({}), 21),
        ("by-report-times", json!({ "startedAt": at(0), "endedAt": at(30) }), json!({}), 30),
        // Only the call object has the times (no top-level times, no duration fields).
        ("by-call-times", json!({}), json!({ "startedAt": at(0), "endedAt": at(40) }), 40),
    ];
    for (id, message, call, _) in &cases {
        let (status, body) = app.post_vapi(org.id, &bare_report(id, created, message.clone(), call.clone())).await;
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
    }
    for (id, _, _, billed) in &cases {
        assert_eq!(app.call(org.id, id).await.unwrap().billable_seconds, Some(*billed), "{id}");
    }

    // Last source: the times the status updates recorded.
    let status_update = |status: &str, at: DateTime<Utc>| {
        json!({ "message": {
            "type": "status-update", "status": status, "timestamp": at.timestamp_millis(),
            "call": { "id": "by-status-updates", "createdAt": iso(created) }
        }})
    };
    assert_eq!(app.post_vapi(org.id, &status_update("in-progress", started)).await.0, StatusCode::OK);
    let ended = status_update("ended", started + Duration::seconds(50));
    assert_eq!(app.post_vapi(org.id, &ended).await.0, StatusCode::OK);
    let report = bare_report("by-status-updates", created, json!({}), json!({}));
    assert_eq!(app.post_vapi(org.id, &report).await.0, StatusCode::OK);
    assert_eq!(app.call(org.id, "by-status-updates").await.unwrap().billable_seconds, Some(50));
    assert_eq!(app.seconds_used(org.id).await, 11 + 21 + 30 + 40 + 50);
}

#[tokio::test]
async fn a_connected_call_with_no_known_duration_is_marked_for_review_not_billed_0_and_repaired_from_vapi() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let created = Utc::now() - Duration::hours(3);
    let report = bare_report("no-duration", created, json!({}), json!({}));
    assert_eq!(app.post_vapi(org.id, &report).await.0, StatusCode::OK);
    let call = app.call(org.id, "no-duration").await.unwrap();
    assert_eq!((call.status.as_str(), call.billable_seconds), ("ended", None), "not billed 0 in silence");
    let reason: Option<String> = sqlx::query_scalar("SELECT review_reason FROM calls WHERE id = 'no-duration'")
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    assert_eq!(reason.as_deref(), Some("duration-unknown"));
    assert_eq!(app.db.store.calls_for_review_count().await.unwrap(), 1);
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 0);
    // A call that never connected has nothing to review.
    let unanswered = bare_report("no-answer", created, json!({ "endedReason": "customer-did-not-answer" }), json!({}));
    assert_eq!(app.post_vapi(org.id, &unanswered).await.0, StatusCode::OK);
    assert_eq!(app.call(org.id, "no-answer").await.unwrap().billable_seconds, Some(0));
    assert_eq!(app.db.store.calls_for_review_count().await.unwrap(), 1);

    // Operators see it.
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("callplane_calls_needing_review 1"), "{metrics}");

    // Reconciliation asks VAPI, whose record has the times: billed once, review cleared.
    let (stub, url) = VapiStub::start("vapi-key").await.unwrap();
    stub.put_call(ended_call("no-duration", created, 64.2, "customer-ended-call"));
    let vapi = VapiCalls::new(&url, SecretString::from("vapi-key"), std::time::Duration::from_secs(5)).unwrap();
    let settings = ReconcileSettings::new(Duration::minutes(70));
    let r = Reconciler::new(app.app.store.clone(), vapi, app.app.pipeline.clone(), app.app.state.bus.clone(), settings);
    let scope = ReconcileScope::since(Utc::now() - Duration::days(1));
    let report = r.run(&scope, Utc::now(), |_| {}).await.unwrap();
    assert_eq!(report, ReconcileReport { examined: 1, finished: 1, ..Default::default() });
    let call = app.call(org.id, "no-duration").await.unwrap();
    assert_eq!(call.billable_seconds, Some(65));
    assert_eq!(app.db.store.calls_for_review_count().await.unwrap(), 0);
    assert_eq!(app.seconds_used(org.id).await, 65);
    let (status, usage) = app.get("/v1/usage", &key).await;
    assert_eq!((status, usage["seconds_used"].as_i64()), (StatusCode::OK, Some(65)), "{usage}");

    // The report arriving again, or a second run, bills nothing more.
    assert_eq!(app.post_vapi(org.id, &report_again(created)).await.0, StatusCode::OK);
    assert_eq!(r.run(&scope, Utc::now(), |_| {}).await.unwrap(), ReconcileReport::default());
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 2);
    assert_eq!(app.seconds_used(org.id).await, 65);
}

fn report_again(created: DateTime<Utc>) -> Value {
    bare_report("no-duration", created, json!({ "durationSeconds": 999 }), json!({}))
}

#[tokio::test]
async fn a_routing_hint_routes_only_its_own_call_and_only_from_call_metadata() {
    let app = TestApp::spawn().await;
    let owner = app.org("pro").await;
    let mut request = sample("01-assistant-request.json");
    request["message"]["call"]["id"] = json!("hinted-call");
    let (status, answer) = app.post_vapi(owner.id, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let signed = answer["assistantOverrides"]["metadata"].clone();
    assert_eq!(signed["callplaneOrgId"], owner.id.to_string());
    // Forget the call so only the hint can route it.
    app.forget_call(owner.id, "hinted-call").await;
    callplane_core::seams::AgentDirectory::invalidate_all(&app.app.agents);

    let shared = |call_id: &str, call: Value| {
        let mut call_obj = json!({ "id": call_id, "createdAt": iso(Utc::now()), "status": "in-progress" });
        call_obj.as_object_mut().unwrap().extend(call.as_object().unwrap().clone());
        json!({ "message": { "type": "status-update", "status": "in-progress", "call": call_obj } })
    };
    let post = |body: Value| {
        let app = &app;
        async move {
            let r = app.http.post(format!("{}/vapi", app.base)).bearer_auth(SECRET).json(&body).send().await.unwrap();
            r.status()
        }
    };
    // Another call carrying this call's signed hint: refused (the signature is bound).
    let lifted = shared("other-call", json!({ "assistantOverrides": { "metadata": signed.clone() } }));
    assert_eq!(post(lifted).await, StatusCode::NOT_FOUND);
    // The hint in variable values (the caller's to set) is never read.
    let in_values = shared("hinted-call", json!({ "assistantOverrides": { "variableValues": signed.clone() } }));
    assert_eq!(post(in_values).await, StatusCode::NOT_FOUND);
    // In this call's metadata: routed to its organization.
    let own = shared("hinted-call", json!({ "assistantOverrides": { "metadata": signed } }));
    assert_eq!(post(own).await, StatusCode::OK);
    assert!(app.call(owner.id, "hinted-call").await.is_some());
    assert!(app.call(owner.id, "other-call").await.is_none());
}
