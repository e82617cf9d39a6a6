//! Every shared VAPI sample through the real endpoint, with the stored rows and the answers
//! checked field by field.

use crate::helpers::{TestApp, sample};
use callplane_core::OrgId;
use callplane_core::seams::{FunctionData, TranscriptStore};
use callplane_storage::{PgFunctionData, PgTranscriptStore};
use chrono::{DateTime, TimeZone, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};

const CALL: &str = "019cd8a1-3b2e-7c4d-9f1a-6e5b4c3d2a10";

/// The function data that makes callplane answer exactly the sample responses.
/// The organization's function data, set as its dashboard would (`PUT /v1/function-data`).
async fn acme_function_data(app: &TestApp, org: OrgId) {
    let key = app.api_key(org).await;
    let put = |name: String, value: Value| {
        let (app, key) = (&app, &key);
        async move {
            app.put_function_data(key, &name, &value).await;
        }
    };
    let expected_tools = sample("responses/tool-calls-response.json");
    let lookup = &expected_tools["results"][0];
    let slot = &expected_tools["results"][1];
    put("lookup_order".into(), json!({"by": "orderNumber", "entries": {"A-10442": lookup["result"]}})).await;
    put("get_next_available_slot".into(), json!({"error": slot["error"]})).await;
    put("transferDestination".into(), sample("responses/transfer-destination-response.json")).await;
    let vars = &sample("responses/assistant-request-response-assistantId.json")["assistantOverrides"]["variableValues"];
    for (k, v) in vars.as_object().unwrap() {
        put(k.clone(), v.clone()).await;
    }
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

#[tokio::test]
async fn every_sample_is_answered_like_the_sample_responses_and_stored_field_by_field() {
    let app = TestApp::spawn().await;
    // The samples' call happened on 2026-03-10; this org's period covers it.
    let org = app.org_from("pro", Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()).await;
    acme_function_data(&app, org.id).await;

    // assistant-request: the org's assistant, its function data preloaded, the org in metadata.
    let (status, answer) = app.post_vapi(org.id, &sample("01-assistant-request.json")).await;
    assert_eq!(status, StatusCode::OK);
    let shape = sample("responses/assistant-request-response-assistantId.json");
    assert_eq!(answer["assistantId"], json!(org.default_assistant_id));
    // All of the org's function data is preloaded (so tools need no round trip), which
    // includes the sample's variables.
    let preloaded = answer["assistantOverrides"]["variableValues"].as_object().unwrap();
    let all = PgFunctionData(app.db.store.clone()).preload(org.id).await.unwrap();
    assert_eq!(preloaded, &all);
    for (k, v) in shape["assistantOverrides"]["variableValues"].as_object().unwrap() {
        assert_eq!(preloaded.get(k), Some(v), "{k}");
    }
    // The org id rides along in the call's metadata, signed, for the shared URL.
    let metadata = &answer["assistantOverrides"]["metadata"];
    assert_eq!(metadata["callplaneOrgId"], org.id.to_string());
    assert_eq!(metadata["callplaneOrgSig"].as_str().map(str::len), Some(64));
    // Pro has no hard limit: the cap is the configured maximum call length.
    assert_eq!(answer["assistantOverrides"]["maxDurationSeconds"], json!(3600));
    let row = app.recorded_call(org.id, CALL).await; // assistant-request creates the call
    assert_eq!(row.status, "ringing");
    assert_eq!(row.created_at, at("2026-03-10T17:02:11.482Z"));

    for name in ["02-status-update-in-progress.json", "05-transcript-partial.json", "06-transcript-final.json"] {
        assert_eq!(app.post_vapi(org.id, &sample(name)).await, (StatusCode::OK, json!({})), "{name}");
    }
    assert_eq!(app.call(org.id, CALL).await.unwrap().status, "in-progress");

    assert_eq!(app.post_vapi(org.id, &sample("07-conversation-update.json")).await, (StatusCode::OK, json!({})));
    let live = PgTranscriptStore(app.db.store.clone()).get(org.id, CALL).await.unwrap().expect("live transcript");
    assert!(!live.is_final);
    assert_eq!(live.messages, sample("07-conversation-update.json")["message"]["messages"].as_array().unwrap().clone());

    // tool-calls: exactly the sample response (one result, one error, ids matching).
    let (status, answer) = app.post_vapi(org.id, &sample("04-tool-calls-two-calls.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, sample("responses/tool-calls-response.json"));

    // Legacy function-call: `{"result": ...}`.
    let (status, answer) = app.post_vapi(org.id, &sample("11-function-call-legacy.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({"result": sample("responses/tool-calls-response.json")["results"][0]["result"]}));

    assert_eq!(app.post_vapi(org.id, &sample("08-speech-update.json")).await, (StatusCode::OK, json!({})));
    let (status, answer) = app.post_vapi(org.id, &sample("10-transfer-destination-request.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, sample("responses/transfer-destination-response.json"));

    assert_eq!(app.post_vapi(org.id, &sample("03-status-update-ended.json")).await, (StatusCode::OK, json!({})));
    let row = app.call(org.id, CALL).await.unwrap();
    assert_eq!((row.status.as_str(), row.ended_reason.as_deref()), ("ended", Some("customer-ended-call")));
    assert_eq!(row.billable_seconds, None, "nothing is billed before the end-of-call report");

    let report = sample("09-end-of-call-report.json");
    assert_eq!(app.post_vapi(org.id, &report).await, (StatusCode::OK, json!({})));
    let m = &report["message"];
    let row = app.call(org.id, CALL).await.unwrap();
    assert_eq!(row.organization_id, org.id);
    assert_eq!(row.status, "ended");
    assert_eq!(row.ended_reason.as_deref(), Some("customer-ended-call"));
    assert_eq!(row.started_at, Some(at("2026-03-10T17:02:13.353Z")));
    assert_eq!(row.ended_at, Some(at("2026-03-10T17:03:27.386Z")));
    assert_eq!(row.duration_seconds, Some(74.033));
    assert_eq!(row.cost, m["cost"].as_f64());
    assert_eq!(row.costs.map(|c| c.to_value()).as_ref(), Some(&m["costs"]));
    assert_eq!(row.summary.as_deref(), m["analysis"]["summary"].as_str());
    assert_eq!(row.analysis.map(|a| a.to_value()).as_ref(), Some(&m["analysis"]));
    assert_eq!(row.recording_url.as_deref(), m["artifact"]["recording"]["mono"]["combinedUrl"].as_str());
    assert_eq!(row.customer_number.as_deref(), Some("+14155550123"));
    assert_eq!(row.phone_number_id.as_deref(), m["call"]["phoneNumberId"].as_str());
    assert_eq!(row.call_type.as_deref(), Some("inboundPhoneCall"));
    assert_eq!(row.billable_seconds, Some(75), "74.033 s rounds up to 75");

    let t = PgTranscriptStore(app.db.store.clone()).get(org.id, CALL).await.unwrap().unwrap();
    assert!(t.is_final);
    assert_eq!(t.text.as_deref(), m["artifact"]["transcript"].as_str());
    assert_eq!(t.messages, m["artifact"]["messages"].as_array().unwrap().clone());

    let ledger = app.db.store.ledger(org.id).await.unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!((ledger[0].billable_seconds, ledger[0].call_started_at), (75, at("2026-03-10T17:02:13.353Z")));
    assert_eq!(ledger[0].period_start, org.period_start);
    assert_eq!(app.seconds_used(org.id).await, 75);

    // A late conversation-update never replaces the final transcript.
    app.post_vapi(org.id, &sample("07-conversation-update.json")).await;
    assert!(PgTranscriptStore(app.db.store.clone()).get(org.id, CALL).await.unwrap().unwrap().is_final);
    assert_eq!(app.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test]
async fn unknown_message_types_are_acknowledged_and_counted_without_storing_anything() {
    let app = TestApp::spawn().await;
    let org = app.org("starter").await;
    let body = json!({"message": {"type": "assistant.started", "call": {"id": "c-unknown", "createdAt": "2026-11-01T00:00:00Z"}}});
    assert_eq!(app.post_vapi(org.id, &body).await, (StatusCode::OK, json!({})));
    assert_eq!(app.post_vapi(org.id, &body).await, (StatusCode::OK, json!({})));
    assert_eq!(app.app.state.metrics.webhook_count("unknown", "ignored"), 2);
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 0);
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("callplane_webhook_events_total{type=\"unknown\",outcome=\"ignored\"} 2"), "{metrics}");
}

#[tokio::test]
async fn the_shared_url_resolves_the_org_from_metadata_phone_number_or_assistant() {
    let app = TestApp::spawn().await;
    let by_phone = app.org("pro").await;
    let by_assistant = app.org("pro").await;
    let by_metadata = app.org("pro").await;
    app.db.store.register_phone_number(by_phone.id, "phone-1", Some("+16505550199")).await.unwrap();
    app.db.store.register_assistant(by_assistant.id, "assistant-1").await.unwrap();
    let post = |body: Value| {
        let app = &app;
        async move {
            app.http
                .post(format!("{}/vapi", app.base))
                .bearer_auth(crate::helpers::SECRET)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let msg = |call: &str, extra: Value| {
        let mut call_obj = json!({"id": call, "createdAt": "2026-11-20T10:00:00Z", "status": "in-progress"});
        call_obj.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"message": {"type": "status-update", "status": "in-progress", "call": call_obj}})
    };
    assert_eq!(post(msg("via-phone", json!({"phoneNumberId": "phone-1"}))).await.status(), StatusCode::OK);
    assert_eq!(post(msg("via-assistant", json!({"assistantId": "assistant-1"}))).await.status(), StatusCode::OK);
    // Metadata routes a call only with the signature callplane gave it at assistant-request.
    // The signature is bound to the call it was given for; forget that call so only the
    // metadata can route it.
    let mut request = sample("01-assistant-request.json");
    request["message"]["call"]["id"] = json!("via-metadata");
    let (_, answer) = app.post_vapi(by_metadata.id, &request).await;
    let signed = answer["assistantOverrides"]["metadata"].clone();
    app.forget_call(by_metadata.id, "via-metadata").await;
    assert_eq!(
        post(msg("via-metadata", json!({"assistantOverrides": {"metadata": signed}}))).await.status(),
        StatusCode::OK
    );
    for forged in [
        json!({"callplaneOrgId": by_phone.id.to_string()}),
        json!({"callplaneOrgId": by_phone.id.to_string(), "callplaneOrgSig": signed["callplaneOrgSig"]}),
    ] {
        let r = post(msg("forged", json!({"assistantOverrides": {"metadata": forged, "variableValues": {}}}))).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "unsigned or mis-signed metadata routed a call");
    }
    assert!(app.call(by_phone.id, "forged").await.is_none());
    assert!(app.call(by_phone.id, "via-phone").await.is_some());
    assert!(app.call(by_assistant.id, "via-assistant").await.is_some());
    assert!(app.call(by_metadata.id, "via-metadata").await.is_some());

    let r = post(msg("nobody", json!({"phoneNumberId": "unregistered"}))).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "unknown_organization");
    // An assistant-request nobody can route is still answered, with a spoken error.
    let mut ar = sample("01-assistant-request.json");
    ar["message"]["call"]["id"] = json!("unroutable-call");
    ar["message"]["call"]["phoneNumberId"] = json!("unregistered");
    ar["message"]["phoneNumber"]["id"] = json!("unregistered");
    let r = post(ar).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
}
