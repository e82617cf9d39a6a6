//! Calls that never finish: a call whose end-of-call report never arrived is settled against
//! VAPI's record of it (the VAPI-compatible stub), billed exactly once through the pipeline,
//! or marked ended without billing when VAPI cannot finish it.

use crate::helpers::{TestApp, lifecycle};
use callplane_core::OrgId;
use callplane_core::seams::TranscriptStore;
use callplane_storage::PgTranscriptStore;
use callplane_testkit::vapi_stub::{VapiStub, ended_call, open_call};
use callplane_workflow::reconcile::{
    CallOutcome, ReconcileReport, ReconcileScope, ReconcileSettings, Reconciler, VapiCalls, spawn_sweeper,
};
use chrono::{DateTime, Duration, Utc};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::Value;
use std::sync::Arc;

const VAPI_KEY: &str = "vapi-private-test-key";

/// `vapi.max_call_seconds` (3600) plus a ten-minute grace.
fn stale_after() -> Duration {
    Duration::seconds(3600 + 600)
}

fn reconciler(app: &TestApp, vapi_url: &str, key: &str) -> Reconciler {
    let vapi = VapiCalls::new(vapi_url, SecretString::from(key), std::time::Duration::from_secs(5)).unwrap();
    Reconciler::new(
        app.app.store.clone(),
        vapi,
        app.app.pipeline.clone(),
        app.app.state.bus.clone(),
        ReconcileSettings::new(stale_after()),
    )
}

fn last_week() -> ReconcileScope {
    ReconcileScope::since(Utc::now() - Duration::days(7))
}

/// Runs the reconciler over the last week; returns its report and each call's outcome.
async fn run(r: &Reconciler, scope: &ReconcileScope) -> (ReconcileReport, Vec<(String, CallOutcome)>) {
    let mut seen = Vec::new();
    let report = r.run(scope, Utc::now(), |p| seen.push((p.call.id.clone(), p.outcome.clone()))).await.unwrap();
    (report, seen)
}

/// The call got its `assistant-request` and `status-update` in-progress, then nothing.
async fn start_call(app: &TestApp, org: OrgId, id: &str, created: DateTime<Utc>) {
    for event in &lifecycle(id, created, 0.0)[..2] {
        assert_eq!(app.post_vapi(org, event).await.0, StatusCode::OK);
    }
    assert_eq!(app.call(org, id).await.unwrap().status, "in-progress");
}

async fn reconciled(app: &TestApp, id: &str) -> (Option<DateTime<Utc>>, Option<String>) {
    sqlx::query_as("SELECT reconciled_at, reconcile_note FROM calls WHERE id = $1")
        .bind(id)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap()
}

async fn usage(app: &TestApp, key: &str) -> Value {
    let (status, usage) = app.get("/v1/usage", key).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    usage
}

async fn live_count(app: &TestApp, key: &str) -> u64 {
    let (status, live) = app.get("/v1/calls/live", key).await;
    assert_eq!(status, StatusCode::OK, "{live}");
    live["count"].as_u64().unwrap()
}

#[tokio::test]
async fn a_call_whose_end_of_call_report_never_arrived_is_finished_from_vapis_record_and_billed_once() {
    let app = TestApp::spawn().await;
    let (stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let created = Utc::now() - Duration::hours(3);
    start_call(&app, org.id, "lost-report", created).await;
    stub.put_call(ended_call("lost-report", created, 187.25, "customer-ended-call"));
    assert_eq!(live_count(&app, &key).await, 1);

    let r = reconciler(&app, &url, VAPI_KEY);
    let (report, seen) = run(&r, &last_week()).await;
    assert_eq!(report, ReconcileReport { examined: 1, finished: 1, ..Default::default() });
    assert_eq!(seen, vec![("lost-report".to_owned(), CallOutcome::Finished)]);

    let row = app.call(org.id, "lost-report").await.unwrap();
    assert_eq!(row.status, "ended");
    assert_eq!(row.ended_reason.as_deref(), Some("customer-ended-call"));
    assert_eq!(row.billable_seconds, Some(188));
    assert_eq!(row.duration_seconds, Some(187.25));
    assert!(row.summary.is_some() && row.recording_url.is_some() && row.cost.is_some(), "{row:?}");
    let (at, note) = reconciled(&app, "lost-report").await;
    assert!(at.is_some() && note.as_deref().unwrap().starts_with("finished-from-vapi"), "{note:?}");
    let transcript = PgTranscriptStore(app.db.store.clone()).get(org.id, "lost-report").await.unwrap().unwrap();
    assert!(transcript.is_final && !transcript.messages.is_empty() && transcript.text.is_some());
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 1);
    assert_eq!(app.seconds_used(org.id).await, 188);
    let u = usage(&app, &key).await;
    assert_eq!((u["seconds_used"].as_i64(), u["calls"].as_i64()), (Some(188), Some(1)), "{u}");
    assert_eq!(live_count(&app, &key).await, 0);

    // A second run finds nothing to do; the real report arriving late bills nothing more.
    let (again, _) = run(&r, &last_week()).await;
    assert_eq!(again, ReconcileReport::default());
    let late = lifecycle("lost-report", created, 187.25).pop().unwrap();
    assert_eq!(late["message"]["type"], "end-of-call-report");
    assert_eq!(app.post_vapi(org.id, &late).await.0, StatusCode::OK);
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 1);
    assert_eq!(app.seconds_used(org.id).await, 188);
    assert_eq!(usage(&app, &key).await["seconds_used"].as_i64(), Some(188));
    assert_eq!(stub.requests().len(), 1, "one question to VAPI for one unfinished call");
}

#[tokio::test]
async fn a_call_vapi_does_not_know_is_marked_ended_without_billing_and_is_no_longer_live() {
    let app = TestApp::spawn().await;
    let (_stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    start_call(&app, org.id, "unknown-to-vapi", Utc::now() - Duration::hours(2)).await;
    assert_eq!(live_count(&app, &key).await, 1);

    let (report, seen) = run(&reconciler(&app, &url, VAPI_KEY), &last_week()).await;
    assert_eq!(report, ReconcileReport { examined: 1, marked: 1, ..Default::default() });
    assert!(matches!(&seen[0].1, CallOutcome::Marked { note } if note.starts_with("not-found-at-vapi")), "{seen:?}");

    let row = app.call(org.id, "unknown-to-vapi").await.unwrap();
    assert_eq!((row.status.as_str(), row.billable_seconds), ("ended", None));
    let (at, note) = reconciled(&app, "unknown-to-vapi").await;
    assert!(at.is_some() && note.unwrap().contains("404"));
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 0);
    assert_eq!(app.seconds_used(org.id).await, 0);
    assert_eq!(usage(&app, &key).await["seconds_used"].as_i64(), Some(0));
    assert_eq!(live_count(&app, &key).await, 0);
    // The dashboard's stream is told the call ended.
    let history = app.app.state.bus.history(org.id, 0, 1000).await.unwrap();
    assert!(
        history.iter().any(|e| e.kind == "call.status"
            && e.call_id.as_deref() == Some("unknown-to-vapi")
            && e.data["status"] == "ended"
            && e.data["reconciled"] == true),
        "{history:?}"
    );
}

#[tokio::test]
async fn a_call_vapi_still_reports_in_progress_under_the_ceiling_is_left_for_the_next_run() {
    let app = TestApp::spawn().await;
    let (stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let org = app.org("pro").await;
    let created = Utc::now() - Duration::hours(5);
    start_call(&app, org.id, "still-talking", created).await;
    stub.put_call(open_call("still-talking", created, "in-progress"));

    let (report, seen) = run(&reconciler(&app, &url, VAPI_KEY), &last_week()).await;
    assert_eq!(report, ReconcileReport { examined: 1, still_open: 1, ..Default::default() });
    assert_eq!(seen[0].1, CallOutcome::StillOpen { vapi_status: Some("in-progress".into()) });
    assert_eq!(app.call(org.id, "still-talking").await.unwrap().status, "in-progress");
    assert_eq!(reconciled(&app, "still-talking").await, (None, None));
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 0);
}

#[tokio::test]
async fn a_call_vapi_still_reports_open_a_day_after_its_creation_is_marked_without_billing() {
    let app = TestApp::spawn().await;
    let (stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let org = app.org_from("pro", Utc::now() - Duration::days(3)).await;
    let created = Utc::now() - Duration::hours(25);
    start_call(&app, org.id, "stuck", created).await;
    stub.put_call(open_call("stuck", created, "in-progress"));

    let (report, seen) = run(&reconciler(&app, &url, VAPI_KEY), &last_week()).await;
    assert_eq!(report, ReconcileReport { examined: 1, marked: 1, ..Default::default() });
    assert!(matches!(&seen[0].1, CallOutcome::Marked { note } if note.starts_with("open-past-ceiling")), "{seen:?}");
    assert_eq!(app.call(org.id, "stuck").await.unwrap().status, "ended");
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 0);
    assert_eq!(app.seconds_used(org.id).await, 0);
}

#[tokio::test]
async fn an_organization_scoped_run_leaves_other_organizations_calls_alone() {
    let app = TestApp::spawn().await;
    let (stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let ours = app.org("pro").await;
    let theirs = app.org("pro").await;
    let created = Utc::now() - Duration::hours(3);
    for (org, id) in [(ours.id, "ours"), (theirs.id, "theirs")] {
        start_call(&app, org, id, created).await;
        stub.put_call(ended_call(id, created, 60.0, "customer-ended-call"));
    }

    let scope = ReconcileScope { org: Some(ours.id), ..last_week() };
    let (report, seen) = run(&reconciler(&app, &url, VAPI_KEY), &scope).await;
    assert_eq!(report, ReconcileReport { examined: 1, finished: 1, ..Default::default() });
    assert_eq!(seen[0].0, "ours");
    assert_eq!(app.call(ours.id, "ours").await.unwrap().status, "ended");
    assert_eq!(app.call(theirs.id, "theirs").await.unwrap().status, "in-progress");
    assert_eq!((app.seconds_used(ours.id).await, app.seconds_used(theirs.id).await), (60, 0));
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 1);
    assert!(stub.requests().iter().all(|r| r.path == "/call/ours"), "{:?}", stub.requests());
}

#[tokio::test]
async fn a_wrong_vapi_api_key_is_reported_as_failed_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let (stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let org = app.org("pro").await;
    let created = Utc::now() - Duration::hours(3);
    for id in ["first", "second"] {
        start_call(&app, org.id, id, created).await;
        stub.put_call(ended_call(id, created, 90.0, "customer-ended-call"));
    }

    let (report, seen) = run(&reconciler(&app, &url, "not-the-key"), &last_week()).await;
    // Every call would be refused the same way: the run stops at the first.
    assert_eq!((report.examined, report.failed, report.finished, report.marked), (1, 1, 0, 0), "{report:?}");
    assert!(report.stopped.as_deref().unwrap().contains("API key"), "{report:?}");
    assert!(matches!(&seen[0].1, CallOutcome::Failed { error } if error.contains("401")), "{seen:?}");
    for id in ["first", "second"] {
        assert_eq!(app.call(org.id, id).await.unwrap().status, "in-progress");
        assert_eq!(reconciled(&app, id).await, (None, None));
    }
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 0);
    assert_eq!(app.seconds_used(org.id).await, 0);
    let requests = stub.requests();
    assert_eq!(requests.len(), 1);
    assert!(!requests[0].authorized);
}

#[tokio::test]
async fn a_vapi_outage_leaves_the_call_open_and_counts_it_failed() {
    let app = TestApp::spawn().await;
    let (stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let org = app.org("pro").await;
    let created = Utc::now() - Duration::hours(3);
    start_call(&app, org.id, "during-outage", created).await;
    stub.put_call(ended_call("during-outage", created, 45.0, "customer-ended-call"));
    stub.fail_call("during-outage", 503);

    let r = reconciler(&app, &url, VAPI_KEY);
    let (report, _) = run(&r, &last_week()).await;
    assert_eq!(report, ReconcileReport { examined: 1, failed: 1, ..Default::default() });
    assert_eq!(app.call(org.id, "during-outage").await.unwrap().status, "in-progress");
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 0);

    // Once VAPI answers again, the next run finishes it.
    stub.clear_failure("during-outage");
    let (report, _) = run(&r, &last_week()).await;
    assert_eq!(report, ReconcileReport { examined: 1, finished: 1, ..Default::default() });
    assert_eq!(app.seconds_used(org.id).await, 45);
}

#[tokio::test]
async fn a_call_younger_than_the_longest_allowed_call_is_not_asked_about() {
    let app = TestApp::spawn().await;
    let (stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let org = app.org("pro").await;
    start_call(&app, org.id, "just-started", Utc::now() - Duration::minutes(30)).await;

    let (report, _) = run(&reconciler(&app, &url, VAPI_KEY), &last_week()).await;
    assert_eq!(report, ReconcileReport::default());
    assert!(stub.requests().is_empty());
    assert_eq!(app.call(org.id, "just-started").await.unwrap().status, "in-progress");
}

#[tokio::test]
async fn the_sweeper_finishes_unfinished_calls_on_its_own() {
    let app = TestApp::spawn().await;
    let (stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let org = app.org("pro").await;
    let created = Utc::now() - Duration::hours(3);
    start_call(&app, org.id, "swept", created).await;
    stub.put_call(ended_call("swept", created, 30.0, "assistant-ended-call"));

    let sweeper = spawn_sweeper(Arc::new(reconciler(&app, &url, VAPI_KEY)), std::time::Duration::from_secs(3600));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.call(org.id, "swept").await.unwrap().status != "ended" {
        assert!(tokio::time::Instant::now() < deadline, "the sweeper did not finish the call");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The call is counted right after its commit (or by the repair loop): wait for it
    // before stopping the sweeper, which could otherwise be stopped between the two.
    crate::durability::eventually("the swept call counted", async || app.seconds_used(org.id).await == 30).await;
    sweeper.abort();
    assert_eq!(app.seconds_used(org.id).await, 30);
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 1);
}

#[tokio::test]
async fn the_reconcile_command_finishes_a_call_from_vapis_record_and_says_what_it_did() {
    let app = TestApp::spawn().await;
    let (stub, url) = VapiStub::start(VAPI_KEY).await.unwrap();
    let org = app.org("pro").await;
    let created = Utc::now() - Duration::hours(3);
    start_call(&app, org.id, "cli-call", created).await;
    stub.put_call(ended_call("cli-call", created, 125.0, "customer-ended-call"));
    let cli = crate::cli::Cli { db_url: app.db.url.clone(), addr: crate::cli::free_addr() };
    let since = crate::helpers::iso(Utc::now() - Duration::days(2));

    let without_key = cli.command(&["reconcile", "calls", "--since", &since]).output().unwrap();
    assert!(!without_key.status.success());
    let said = String::from_utf8_lossy(&without_key.stderr);
    assert!(said.contains("CALLPLANE__VAPI__API_KEY"), "{said}");

    let mut command = cli.command(&["reconcile", "calls", "--since", &since, "--json"]);
    command.env("CALLPLANE__VAPI__API_KEY", VAPI_KEY).env("CALLPLANE__VAPI__API_URL", &url);
    // The stub answers on this test's runtime: wait for the command off it.
    let out = tokio::task::spawn_blocking(move || command.output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["examined"].as_u64(), report["finished"].as_u64()), (Some(1), Some(1)), "{report}");
    assert_eq!(app.call(org.id, "cli-call").await.unwrap().status, "ended");
    assert_eq!(app.seconds_used(org.id).await, 125);
}

/// With several `serve` processes, one sweeps at a time: a sweep that finds the lock taken
/// skips its turn, and the lock is free again once the running sweep ends.
#[tokio::test]
async fn one_process_sweeps_at_a_time() {
    let app = TestApp::spawn().await;
    let store = &app.db.store;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .exclusively(callplane_workflow::reconcile::SWEEP_LOCK, async move {
                    started_tx.send(()).unwrap();
                    finish_rx.await.unwrap();
                    "first"
                })
                .await
        })
    };
    started_rx.await.unwrap();
    let second = store.exclusively(callplane_workflow::reconcile::SWEEP_LOCK, async { "second" }).await.unwrap();
    assert_eq!(second, None, "the lock is taken: the second sweep skips");
    finish_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), Some("first"));
    let third = store.exclusively(callplane_workflow::reconcile::SWEEP_LOCK, async { "third" }).await.unwrap();
    assert_eq!(third, Some("third"), "released when the running sweep ended");
}
