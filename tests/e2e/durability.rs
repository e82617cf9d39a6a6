//! What VAPI and the books see when the database goes away: events are kept on local disk and
//! processed once it is back, answers VAPI waits for still come within the deadline, and
//! webhooks are refused (503, Retry-After) only when nothing can take them.

use crate::helpers::{SECRET, TestApp, lifecycle, sample};
use chrono::{Duration, Utc};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Instant;

/// A figure from `/metrics`.
pub(crate) async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in /metrics"))
}

/// Waits (up to 20 s) until `check` holds.
pub(crate) async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually_within(what, 20, check).await;
}

/// Waits (up to `seconds`) until `check` holds.
pub(crate) async fn eventually_within(what: &str, seconds: u64, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(seconds) {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within {seconds} s");
}

async fn timed_post(
    app: &TestApp,
    org: callplane_core::OrgId,
    body: &Value,
) -> (StatusCode, Value, std::time::Duration) {
    let started = Instant::now();
    let (status, answer) = app.post_vapi(org, body).await;
    (status, answer, started.elapsed())
}

#[tokio::test]
async fn a_call_finished_while_the_database_is_unreachable_is_kept_and_billed_once_it_returns() {
    let (app, proxy) = TestApp::spawn_behind_proxy(&[]).await;
    let org = app.org("pro").await;
    let events = lifecycle("outage-call", Utc::now() - Duration::minutes(3), 95.2);
    let (status, answer) = app.post_vapi(org.id, &events[0]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    proxy.cut();
    for event in &events[1..] {
        let (status, answer, took) = timed_post(&app, org.id, event).await;
        assert_eq!(status, StatusCode::OK, "{} while the database is away: {answer}", event["message"]["type"]);
        assert!(took < std::time::Duration::from_secs(3), "{} took {took:?}", event["message"]["type"]);
    }
    assert!(metric(&app, "callplane_inbox_depth").await >= 1.0, "the report waits in the inbox");
    let started = Instant::now();
    let ready = app.http.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "/readyz took {:?}", started.elapsed());
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let why: Value = ready.json().await.unwrap();
    assert!(why["reason"].as_str().unwrap().contains("database"), "{why}");
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger").await, 0);

    proxy.restore();
    eventually("the report is billed", async || app.seconds_used(org.id).await == 96).await;
    eventually("the inbox drains", async || metric(&app, "callplane_inbox_depth").await == 0.0).await;
    let call = app.call(org.id, "outage-call").await.unwrap();
    assert_eq!(call.status, "ended");
    assert_eq!(app.count("SELECT count(*) FROM usage_ledger WHERE call_id = 'outage-call'").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(metric(&app, "callplane_events_lost_total").await, 0.0);

    // Delivered again now, the report changes nothing.
    let (status, answer) = app.post_vapi(org.id, events.last().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(app.seconds_used(org.id).await, 96);
}

#[tokio::test]
async fn answers_vapi_waits_for_come_from_memory_within_the_deadline_while_the_database_is_unreachable() {
    let (app, proxy) = TestApp::spawn_behind_proxy(&[("vapi.answer_deadline_ms", "600")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let put = app
        .http
        .put(format!("{}/v1/function-data/lookup_order", app.base))
        .bearer_auth(&key)
        .json(&serde_json::json!("Order found: Thursday 10am."))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let events = lifecycle("remembered-call", Utc::now() - Duration::minutes(1), 30.0);
    let (status, first) = app.post_vapi(org.id, &events[0]).await;
    assert_eq!((status, first["assistantId"].is_string()), (StatusCode::OK, true), "{first}");

    proxy.cut();
    let mut ask = sample("01-assistant-request.json");
    ask["message"]["call"]["id"] = "second-call".into();
    let (status, answer, took) = timed_post(&app, org.id, &ask).await;
    assert_eq!(status, StatusCode::OK);
    assert!(took < std::time::Duration::from_millis(900), "answered after {took:?}");
    assert_eq!(answer["assistantId"], first["assistantId"], "the organization answered from memory: {answer}");
    assert_eq!(answer["assistantOverrides"]["variableValues"]["lookup_order"], "Order found: Thursday 10am.");

    let tools = events.iter().find(|e| e["message"]["type"] == "tool-calls").unwrap();
    let (status, answer, took) = timed_post(&app, org.id, tools).await;
    assert_eq!(status, StatusCode::OK);
    assert!(took < std::time::Duration::from_millis(900), "answered after {took:?}");
    let results = answer["results"].as_array().unwrap();
    assert!(!results.is_empty() && results.iter().all(|r| r["toolCallId"].is_string()), "{answer}");
    assert!(results.iter().any(|r| r["result"] == "Order found: Thursday 10am."), "{answer}");

    // An organization made while this server cannot reach the database: nothing is known of
    // it, VAPI speaks an error.
    let stranger = app.org("pro").await;
    let mut stranger_ask = sample("01-assistant-request.json");
    stranger_ask["message"]["call"]["id"] = "stranger-call".into();
    let (status, answer, took) = timed_post(&app, stranger.id, &stranger_ask).await;
    assert_eq!(status, StatusCode::OK);
    assert!(took < std::time::Duration::from_millis(900), "answered after {took:?}");
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("right now")), "{answer}");

    // The asks were kept, and are recorded once the database is back.
    proxy.restore();
    eventually("the calls are recorded", async || {
        app.count("SELECT count(*) FROM calls WHERE id IN ('second-call', 'stranger-call')").await == 2
    })
    .await;
    let owners: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT organization_id FROM calls WHERE id IN ('second-call', 'stranger-call') ORDER BY id",
    )
    .fetch_all(app.db.store.pool())
    .await
    .unwrap();
    assert_eq!(owners, vec![org.id.0, stranger.id.0]);
    assert_eq!(metric(&app, "callplane_events_lost_total").await, 0.0);
}

#[tokio::test]
async fn a_locked_organizations_table_delays_no_answer_past_the_deadline_and_loses_no_report() {
    let app = TestApp::spawn_with(&[("vapi.answer_deadline_ms", "800"), ("inbox.inline_budget_ms", "500")]).await;
    let org = app.org("starter").await;
    // Starter stops at 6,000 s: after 5,900 s, the next call may last 100 s.
    let earlier = lifecycle("earlier-call", Utc::now() - Duration::hours(3), 5900.0);
    assert_eq!(app.post_vapi(org.id, earlier.last().unwrap()).await.0, StatusCode::OK);
    let events = lifecycle("locked-call", Utc::now() - Duration::minutes(2), 61.0);
    assert_eq!(app.post_vapi(org.id, &events[0]).await.0, StatusCode::OK);

    let mut lock = app.db.store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE organizations IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    // A report that changes the organization makes its next answer read it again.
    let (status, answer, took) = timed_post(&app, org.id, events.last().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(took < std::time::Duration::from_millis(1500), "the report waited {took:?}");
    let mut ask = sample("01-assistant-request.json");
    ask["message"]["call"]["id"] = "during-the-lock".into();
    for _ in 0..3 {
        let (status, answer, took) = timed_post(&app, org.id, &ask).await;
        assert_eq!(status, StatusCode::OK);
        assert!(took < std::time::Duration::from_millis(1100), "answered after {took:?}: {answer}");
        assert!(answer["assistantId"].is_string() || answer["error"].is_string(), "{answer}");
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    lock.rollback().await.unwrap();

    eventually("the report is billed", async || app.seconds_used(org.id).await == 5961).await;
    // The next answer knows what is left.
    let (_, answer) = app.post_vapi(org.id, &ask).await;
    assert_eq!(answer["assistantOverrides"]["maxDurationSeconds"], 39, "{answer}");
}

#[tokio::test]
async fn with_the_inbox_full_and_the_database_away_webhooks_are_refused_with_retry_after_and_answers_counted_lost() {
    // The inline pipeline: with the inbox full, the database is the only other place an event
    // can go. (The Temporal pipeline has a third, which does not share the database's failure.)
    let (app, proxy) =
        TestApp::spawn_behind_proxy(&[("inbox.max_events", "1"), ("backends.event_pipeline", "inline")]).await;
    let org = app.org("pro").await;
    let events = lifecycle("full-call", Utc::now() - Duration::minutes(2), 10.0);
    proxy.cut();
    let (status, _) = app.post_vapi(org.id, &events[1]).await;
    assert_eq!(status, StatusCode::OK, "the first event fits");
    let report = events.last().unwrap();
    let r =
        app.http.post(format!("{}/vapi/{}", app.base, org.id)).bearer_auth(SECRET).json(report).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().get("retry-after").is_some(), "503 says when to retry");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "overloaded");
    assert_eq!(metric(&app, "callplane_webhook_shed_total").await, 1.0);
    assert_eq!(metric(&app, "callplane_events_lost_total").await, 0.0, "a refused event is not lost: VAPI was told");

    // An answer VAPI waits for is answered regardless; its event had nowhere to go.
    let (status, _) = app.post_vapi(org.id, &events[0]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(metric(&app, "callplane_events_lost_total").await, 1.0);

    proxy.restore();
    let (status, _) = app.post_vapi(org.id, report).await;
    assert_eq!(status, StatusCode::OK, "the report goes through once the database is back");
    eventually("the report is billed", async || app.seconds_used(org.id).await == 10).await;
}

/// Starts `callplane serve` with the given database URL and inbox; waits until it answers.
async fn serve(cli: &crate::cli::Cli, database_url: &str, inbox: &str) -> crate::cli::Server {
    cli.serve_with(inbox, &[("CALLPLANE__DATABASE__URL", database_url.to_owned())]).await
}

/// A migrated database with one organization, and the real binary serving it through a
/// `FaultProxy`, on an inbox of its own.
struct Stack {
    cli: crate::cli::Cli,
    /// The organization's VAPI server URL.
    url: String,
    proxy: callplane_testkit::fault_proxy::FaultProxy,
    inbox: crate::helpers::ScratchDir,
    server: crate::cli::Server,
}

impl Stack {
    async fn start() -> Self {
        let cli = crate::cli::Cli::new().await;
        cli.json(&["migrate", "--json"]);
        let org = cli.json(&["org", "create", "--name", "Acme", "--plan", "pro", "--assistant-id", "asst-x", "--json"]);
        let url = org["vapi_server_url"].as_str().unwrap().to_owned();
        let target = cli.db_url.split_once('@').map_or("", |(_, h)| h.split(['/', '?']).next().unwrap_or(""));
        let proxy = callplane_testkit::fault_proxy::FaultProxy::start(target).await.unwrap();
        let inbox = crate::helpers::inbox_dir();
        let server = serve(&cli, &proxy.url_through(&cli.db_url), &inbox).await;
        Self { cli, url, proxy, inbox, server }
    }
}

#[tokio::test]
async fn a_report_acknowledged_before_the_server_is_killed_is_billed_by_the_next_server_on_its_inbox() {
    let Stack { cli, url, proxy, inbox, server: mut first } = Stack::start().await;

    // The database goes away; the report is acknowledged from the inbox; the server dies.
    proxy.cut();
    // Created after the organization, so it counts in its current period.
    let report = lifecycle("crash-call", Utc::now(), 42.5).pop().unwrap();
    let http = reqwest::Client::new();
    let r = http.post(&url).bearer_auth(SECRET).json(&report).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    first.0.kill().unwrap(); // SIGKILL: nothing is flushed on the way out
    first.0.wait().unwrap();
    proxy.restore();

    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&cli.db_url).await.unwrap();
    let billed = || sqlx::query_scalar::<_, i64>("SELECT count(*) FROM usage_ledger WHERE call_id = 'crash-call'");
    assert_eq!(billed().fetch_one(&mut db).await.unwrap(), 0);

    // The next server on the same inbox drains it at start.
    let second = serve(&cli, &cli.db_url, &inbox).await;
    let started = Instant::now();
    while billed().fetch_one(&mut db).await.unwrap() == 0 && started.elapsed() < std::time::Duration::from_secs(20) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(billed().fetch_one(&mut db).await.unwrap(), 1, "the report was drained from the inbox");
    // The counter is added after the ledger row commits (its own step): wait for it.
    let used = || sqlx::query_scalar::<_, i64>("SELECT seconds_used FROM organizations");
    let started = Instant::now();
    while used().fetch_one(&mut db).await.unwrap() != 43 && started.elapsed() < std::time::Duration::from_secs(20) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(second);
    assert_eq!(used().fetch_one(&mut db).await.unwrap(), 43);
}

#[tokio::test]
async fn the_inbox_commands_show_what_waits_and_drain_it_into_the_database() {
    let Stack { cli, url, proxy, inbox, mut server } = Stack::start().await;
    let inbox_command = |args: &[&str]| {
        let mut command = cli.command(args);
        command.env("CALLPLANE__INBOX__DIR", &*inbox);
        command
    };

    proxy.cut();
    let report = lifecycle("inbox-call", Utc::now(), 20.0).pop().unwrap();
    let r = reqwest::Client::new().post(&url).bearer_auth(SECRET).json(&report).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A running server holds its inbox; the command says where to look instead.
    let held = inbox_command(&["inbox", "status"]).output().unwrap();
    assert!(!held.status.success());
    assert!(String::from_utf8_lossy(&held.stderr).contains("/metrics"), "{}", String::from_utf8_lossy(&held.stderr));
    server.0.kill().unwrap();
    server.0.wait().unwrap();

    let status = inbox_command(&["inbox", "status", "--json"]).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["depth"], 1, "{status}");
    assert!(status["events"][0]["bytes"].as_u64().unwrap() > 1000, "{status}");

    let drained = inbox_command(&["inbox", "drain", "--json"]).output().unwrap();
    assert!(drained.status.success(), "{}", String::from_utf8_lossy(&drained.stderr));
    let drained: Value = serde_json::from_slice(&drained.stdout).unwrap();
    assert_eq!((drained["processed"].as_u64(), drained["left"].as_u64()), (Some(1), Some(0)), "{drained}");
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&cli.db_url).await.unwrap();
    let used: i64 = sqlx::query_scalar("SELECT seconds_used FROM organizations").fetch_one(&mut db).await.unwrap();
    assert_eq!(used, 20);
    let again: Value =
        serde_json::from_slice(&inbox_command(&["inbox", "status", "--json"]).output().unwrap().stdout).unwrap();
    assert_eq!(again["depth"], 0);
}
