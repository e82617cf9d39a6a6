//! Phase 2's Temporal pipeline on a real Temporal server each test owns: it passes the pipeline
//! contract, and the books balance (nothing lost, nothing billed twice) when, in the middle of
//! traffic, the Temporal server restarts, the worker is killed, or PostgreSQL is away for 30 s.

use crate::durability::{eventually_within, metric};
use crate::helpers::{TestApp, books_balance, lifecycle, traffic};
use callplane_testkit::contracts;
use callplane_testkit::temporal::TemporalServer;
use chrono::{Duration, Utc};
use reqwest::StatusCode;
use std::process::{Child, Command, Stdio};

/// The Temporal pipeline on `temporal`; answers come as soon as Temporal has the event.
fn temporal_settings(temporal: &TemporalServer) -> Vec<(&'static str, String)> {
    vec![
        ("backends.event_pipeline", "temporal".into()),
        ("temporal.address", temporal.address()),
        ("temporal.task_queue", "callplane-calls".into()),
        ("temporal.answer_wait_ms", "0".into()),
        // An event Temporal cannot take waits in the inbox; the sender hears so quickly.
        ("inbox.inline_budget_ms", "500".into()),
    ]
}

async fn app_on(temporal: &TemporalServer, extra: &[(&str, &str)]) -> TestApp {
    let settings = temporal_settings(temporal);
    let mut all: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    TestApp::spawn_with(&all).await
}

async fn dead_letters(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM dead_letters").await
}

async fn inbox_empties(app: &TestApp) {
    eventually_within("the inbox empties", 60, async || app.app.intake.inbox().depth() == 0).await;
}

#[tokio::test]
async fn the_temporal_pipeline_passes_the_contract() {
    let temporal = TemporalServer::start();
    // The contract reads what each event did: the answer waits for this process's worker.
    let app = app_on(&temporal, &[("temporal.answer_wait_ms", "10000")]).await;
    assert_eq!(app.app.pipeline.backend(), "temporal");
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::event_pipeline(app.app.pipeline.as_ref(), &app.db.store, a.id, b.id).await;
}

/// Without a wait, the webhook is answered `queued` once Temporal holds the event, and the
/// worker applies it after.
#[tokio::test]
async fn an_event_is_answered_once_temporal_holds_it_and_applied_by_the_worker() {
    let temporal = TemporalServer::start();
    let app = app_on(&temporal, &[]).await;
    let org = app.org("pro").await;
    for event in lifecycle("handed-off", Utc::now() - Duration::minutes(5), 61.0) {
        let (status, body) = app.post_vapi(org.id, &event).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let queued = r#"callplane_webhook_events_total{type="end-of-call-report",outcome="queued"}"#;
    assert_eq!(metric(&app, queued).await, 1.0, "the report was answered on hand-over, not after processing");
    eventually_within("the worker bills the call", 30, async || {
        app.call(org.id, "handed-off").await.is_some_and(|c| c.billable_seconds == Some(61))
    })
    .await;
    assert_eq!(app.app.intake.inbox().depth(), 0, "handed-off events leave the inbox");
    // What the operator reads: every event handed over, processed by the worker, none failed.
    let sent = lifecycle("x", Utc::now(), 1.0).len() as f64;
    assert_eq!(metric(&app, "callplane_temporal_events_handed_off_total").await, sent);
    eventually_within("the worker counts what it processed", 30, async || {
        metric(&app, "callplane_events_processed_total").await == sent
    })
    .await;
    assert_eq!(metric(&app, "callplane_events_failed_total").await, 0.0);
    assert_eq!(metric(&app, "callplane_report_to_ledger_seconds_count").await, 1.0, "one report reached the ledger");
    assert!(metric(&app, "callplane_temporal_activity_attempts_total").await >= sent);
    assert!(metric(&app, "callplane_temporal_workflows_completed_total").await >= 1.0, "the call's workflow completed");
}

/// The Temporal server stops in the middle of traffic and comes back after 3 s with its
/// workflows. Webhooks keep being answered 200; what Temporal could not take waits in the inbox
/// and is handed over when it returns.
#[tokio::test]
async fn a_temporal_restart_in_the_middle_of_traffic_loses_and_doubles_nothing() {
    let mut temporal = TemporalServer::start();
    let app = app_on(&temporal, &[]).await;
    let orgs = [app.org("starter").await.id, app.org("pro").await.id, app.org("business").await.id];
    let mut expected = traffic(&app, &orgs, 16, async || {
        temporal.stop();
        for e in &lifecycle("while-temporal-is-down", Utc::now() - Duration::minutes(5), 42.0) {
            assert_eq!(app.post_vapi(orgs[1], e).await.0, StatusCode::OK);
        }
        assert!(app.app.intake.inbox().depth() >= 1, "what Temporal could not take waits in the inbox");
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        temporal.start_again();
    })
    .await;
    *expected.get_mut(&orgs[1]).unwrap() += 42;
    books_balance(&app, &expected).await;
    inbox_empties(&app).await;
    assert_eq!(dead_letters(&app).await, 0);
    assert!(metric(&app, "callplane_temporal_handoff_failures_total").await >= 1.0, "the outage is counted");
}

/// A `callplane worker` process, the app's own settings in its environment, serving its
/// `/metrics` on `metrics_port` behind [`WORKER_METRICS_TOKEN`].
fn worker_process(app: &TestApp, temporal: &TemporalServer, metrics_port: u16) -> Child {
    let s = &app.app.settings;
    let counter: &str = s.backends.usage_counter.into();
    Command::new(env!("CARGO_BIN_EXE_callplane"))
        .arg("worker")
        .env("CALLPLANE__TEMPORAL__WORKER_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("CALLPLANE__SERVER__METRICS_TOKEN", WORKER_METRICS_TOKEN)
        .env("CALLPLANE__DATABASE__URL", &app.db.url)
        .env("CALLPLANE__TEMPORAL__ADDRESS", temporal.address())
        .env("CALLPLANE__TEMPORAL__TASK_QUEUE", &s.temporal.task_queue)
        .env("CALLPLANE__BACKENDS__USAGE_COUNTER", counter)
        .env("CALLPLANE__REDIS__URL", secrecy::ExposeSecret::expose_secret(&s.redis.url))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting `callplane worker`")
}

/// The workers run apart from the server (`callplane worker`); one is killed (SIGKILL) in the
/// middle of traffic, with workflows and activities in hand, and another takes over.
///
/// The replacement's own counters are on its `/metrics` (`temporal.worker_metrics_addr`),
/// behind the metrics token as `serve`'s are.
#[tokio::test]
async fn a_worker_killed_mid_workflow_loses_and_doubles_nothing() {
    let temporal = TemporalServer::start();
    let app = app_on(&temporal, &[("temporal.worker", "off")]).await;
    let mut worker = worker_process(&app, &temporal, free_port());
    let replacement_port = free_port();
    let orgs = [app.org("pro").await.id, app.org("business").await.id];
    let expected = traffic(&app, &orgs, 16, async || {
        worker.kill().expect("killing the worker");
        worker.wait().expect("the worker exits");
        // Events keep arriving with no worker at all: Temporal holds them.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        worker = worker_process(&app, &temporal, replacement_port);
    })
    .await;
    books_balance(&app, &expected).await;
    assert_eq!(dead_letters(&app).await, 0);

    let url = format!("http://127.0.0.1:{replacement_port}/metrics");
    let http = reqwest::Client::new();
    let refused = http.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "the worker's metrics need the token");
    let text = http.get(&url).bearer_auth(WORKER_METRICS_TOKEN).send().await.unwrap().text().await.unwrap();
    let figure = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} is not on the worker's /metrics:\n{text}"))
    };
    // The replacement finished the killed worker's workflows and the calls after them.
    assert!(figure("callplane_events_processed_total") > 0.0, "{text}");
    assert!(figure("callplane_temporal_workflows_completed_total") > 0.0, "{text}");
    assert!(figure("callplane_temporal_activity_attempts_total") > 0.0, "{text}");
    assert_eq!(figure("callplane_events_failed_total"), 0.0, "{text}");
    let _ = worker.kill();
    let _ = worker.wait();
}

const WORKER_METRICS_TOKEN: &str = "worker-scrape-token";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// PostgreSQL is unreachable for 30 s in the middle of traffic: the workflows' steps retry
/// with backoff until it is back, and every call is billed once.
#[tokio::test]
async fn postgres_away_for_30_s_in_the_middle_of_traffic_loses_and_doubles_nothing() {
    let temporal = TemporalServer::start();
    let settings = temporal_settings(&temporal);
    let all: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (app, proxy) = TestApp::spawn_behind_proxy(&all).await;
    let orgs = [app.org("pro").await.id, app.org("business").await.id];
    let mut expected = traffic(&app, &orgs, 12, async || {
        proxy.cut();
        let started = std::time::Instant::now();
        for e in &lifecycle("while-postgres-is-away", Utc::now() - Duration::minutes(5), 42.0) {
            assert_eq!(app.post_vapi(orgs[0], e).await.0, StatusCode::OK);
        }
        tokio::time::sleep(std::time::Duration::from_secs(30).saturating_sub(started.elapsed())).await;
        proxy.restore();
    })
    .await;
    *expected.get_mut(&orgs[0]).unwrap() += 42;
    books_balance(&app, &expected).await;
    inbox_empties(&app).await;
    assert_eq!(dead_letters(&app).await, 0);
}

/// `callplane serve` on `cli`'s database and address, with `inbox`, the pipeline `pipeline`
/// and a worker as `worker` says; waits until it answers.
async fn serve(
    cli: &crate::cli::Cli,
    inbox: &str,
    temporal: &TemporalServer,
    pipeline: &str,
    worker: &str,
) -> crate::cli::Server {
    let env = [
        ("CALLPLANE__BACKENDS__EVENT_PIPELINE", pipeline.to_owned()),
        ("CALLPLANE__TEMPORAL__ADDRESS", temporal.address()),
        ("CALLPLANE__TEMPORAL__WORKER", worker.to_owned()),
    ];
    cli.serve_with(inbox, &env).await
}

/// Stops a server as a process manager does (SIGTERM): it answers what it holds, then exits.
fn terminate(server: &mut crate::cli::Server) {
    let _ = Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status();
    let _ = server.0.wait();
}

/// A figure from the `/metrics` of the server on `addr`.
async fn metric_at(addr: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in /metrics"))
}

/// Posts like VAPI: a refused connection or a 5xx is sent again until it is answered 200.
async fn post_until_answered(http: &reqwest::Client, url: &str, body: &serde_json::Value) {
    for _ in 0..600 {
        match http.post(url).bearer_auth(crate::helpers::SECRET).json(body).send().await {
            Ok(r) if r.status() == StatusCode::OK => return,
            Ok(r) => assert!(r.status().is_server_error(), "{url} answered {}", r.status()),
            Err(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{url} never answered");
}

/// `backends.event_pipeline` switched from `inline` to `temporal` and back while webhooks keep
/// arriving, each switch a restart on the same inbox, as an operator rolls out a configuration
/// change. The server going back to `inline` runs a worker (`temporal.worker = "on"`) until
/// the workflows in flight are done. Every call is billed exactly once.
#[tokio::test]
async fn switching_the_pipeline_inline_to_temporal_and_back_under_traffic_loses_and_doubles_nothing() {
    let temporal = TemporalServer::start();
    let cli = crate::cli::Cli::new().await;
    cli.json(&["migrate", "--json"]);
    let urls = two_orgs(&cli);
    let inbox = crate::helpers::inbox_dir();
    let mut server = serve(&cli, &inbox, &temporal, "inline", "auto").await;

    // Calls keep coming the whole time, until the last server has taken some: each a
    // lifecycle, then its report again (a retry).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = calls_until_stopped(&urls, &stop, "switch");

    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(metric_at(&cli.addr, "callplane_events_processed_total").await > 0.0, "the inline server processed");
    terminate(&mut server);
    let mut server = serve(&cli, &inbox, &temporal, "temporal", "auto").await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let handed = metric_at(&cli.addr, "callplane_temporal_events_handed_off_total").await;
    assert!(handed > 0.0, "the Temporal server handed events to Temporal");
    terminate(&mut server);
    let server = serve(&cli, &inbox, &temporal, "inline", "on").await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let expected = traffic.await.unwrap();
    assert!(metric_at(&cli.addr, "callplane_events_processed_total").await > 0.0, "traffic ran until the end");

    let store = callplane_storage::PgStore::connect(&cli.db_url, 2).await.unwrap();
    every_call_billed_once(&store, &urls, &expected).await;
    // The counters equal the ledger (once the repair loop has counted everything).
    eventually_within("the counters equal the ledger", 30, async || {
        cli.command(&["usage", "reconcile"]).output().is_ok_and(|o| o.status.success())
    })
    .await;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(store.pool()).await.unwrap();
    assert_eq!(dead, 0);
    drop(server);
}

/// The pipeline moved by `callplane phase apply` where the servers run no worker
/// (`temporal.worker = "off"`) and a `callplane worker` runs apart: refused until a worker
/// runs, then moved to Temporal and back with calls arriving, every call billed once.
#[tokio::test]
async fn the_pipeline_step_with_a_worker_apart_waits_for_one_and_moves_under_traffic() {
    let temporal = TemporalServer::start();
    let cli = crate::cli::Cli::new().await;
    cli.json(&["migrate", "--json"]);
    let urls = two_orgs(&cli);
    let inbox = crate::helpers::inbox_dir();
    let server = serve(&cli, &inbox, &temporal, "inline", "off").await;
    let apply = |args: &[&str]| {
        let mut c = cli.command(args);
        c.env("CALLPLANE__TEMPORAL__ADDRESS", temporal.address());
        c.output().unwrap()
    };
    // The server has heartbeated (twice a second) and runs no worker: the step is refused.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let refused = apply(&["phase", "apply", "2", "--step", "pipeline"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no running process would run a Temporal worker"), "{stderr}");

    let mut worker = cli
        .command(&["worker"])
        .env("CALLPLANE__TEMPORAL__ADDRESS", temporal.address())
        .env("CALLPLANE__TEMPORAL__WORKER_METRICS_ADDR", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = calls_until_stopped(&urls, &stop, "apart");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let moved = apply(&["--json", "phase", "apply", "2", "--step", "pipeline"]);
    assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));
    let report: serde_json::Value = serde_json::from_slice(&moved.stdout).unwrap();
    assert_eq!(report["verified"]["workers_running"], 1, "the worker apart runs: {report}");
    tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    let handed = metric_at(&cli.addr, "callplane_temporal_events_handed_off_total").await;
    assert!(handed > 0.0, "the server hands events to Temporal now");
    let back = apply(&["--json", "phase", "apply", "2", "--step", "pipeline", "--rollback"]);
    assert!(back.status.success(), "{}", String::from_utf8_lossy(&back.stderr));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let expected = traffic.await.unwrap();

    let store = callplane_storage::PgStore::connect(&cli.db_url, 2).await.unwrap();
    every_call_billed_once(&store, &urls, &expected).await;
    eventually_within("the counters equal the ledger", 30, async || {
        cli.command(&["usage", "reconcile"]).output().is_ok_and(|o| o.status.success())
    })
    .await;
    let _ = worker.kill();
    let _ = worker.wait();
    drop(server);
}

/// Two business organizations on `cli`'s database; their VAPI server URLs.
fn two_orgs(cli: &crate::cli::Cli) -> Vec<String> {
    ["A", "B"]
        .iter()
        .map(|name| {
            let org = cli.json(&["org", "create", "--name", name, "--plan", "business", "--json"]);
            org["vapi_server_url"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Calls to every URL, round after round, until `stop` is set (and at least 10 rounds): each a
/// lifecycle created now (in the organization's current period), then its report again (a
/// retry). Returns the seconds billed per URL.
fn calls_until_stopped(
    urls: &[String],
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    prefix: &'static str,
) -> tokio::task::JoinHandle<Vec<i64>> {
    let (urls, stop) = (urls.to_vec(), stop.clone());
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut expected = vec![0i64; urls.len()];
        for i in 0..1000 {
            if i >= 10 && stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let sends = urls.iter().enumerate().map(|(n, url)| {
                let http = http.clone();
                let seconds = 60 + (i * 11 + n * 17) as i64 % 240;
                let events = lifecycle(&format!("{prefix}-{n}-{i}"), Utc::now(), seconds as f64);
                async move {
                    for e in events.iter().chain(events.last()) {
                        post_until_answered(&http, url, e).await;
                    }
                    (n, seconds)
                }
            });
            for (n, seconds) in futures::future::join_all(sends).await {
                expected[n] += seconds;
            }
        }
        expected
    })
}

/// Each organization's ledger holds exactly the seconds sent to its URL.
async fn every_call_billed_once(store: &callplane_storage::PgStore, urls: &[String], expected: &[i64]) {
    for (url, seconds) in urls.iter().zip(expected) {
        let org: callplane_core::OrgId = url.rsplit('/').next().unwrap().parse().unwrap();
        let o = callplane_core::seams::OrgDirectory::get(store, org).await.unwrap().unwrap();
        eventually_within("every call reaches the ledger", 90, async || {
            store.ledger_total(org, o.period_start).await.unwrap() >= *seconds
        })
        .await;
        assert_eq!(store.ledger_total(org, o.period_start).await.unwrap(), *seconds, "lost or doubled");
    }
}
