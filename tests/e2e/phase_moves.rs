//! Phase moves with traffic running: `callplane phase apply 2 --step ...` (the real binary, as
//! an operator runs it) against a database a serving callplane uses, while VAPI's events keep
//! arriving. Afterwards the books balance (every call once; ledger = counter = what was sent),
//! no event was refused, and the server serves from where the move put it.

use crate::helpers::{TestApp, books_balance, traffic_during};
use callplane_core::OrgId;
use callplane_core::routes::Seam;
use callplane_testkit::redis::RedisServer;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A server on phase 1's backends, with a Redis of its own to move to.
async fn phase1_app(redis: &RedisServer) -> TestApp {
    let url = redis.url();
    TestApp::spawn_with(&[
        ("redis.url", url.as_str()),
        ("backends.usage_counter", "postgres"),
        ("backends.function_data", "postgres"),
        ("backends.search", "off"),
        ("backends.event_pipeline", "inline"),
    ])
    .await
}

async fn callplane(app: &TestApp, _redis_url: &str, args: &[&str]) -> std::process::Output {
    app.callplane(args).await
}

async fn phase_json(app: &TestApp, _redis_url: &str, args: &[&str]) -> Value {
    app.callplane_json(args).await
}

fn stages(report: &Value) -> Vec<String> {
    report["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap().to_owned()).collect()
}

/// The counters move to Redis and back while reports arrive: no call lost or counted twice on
/// either way, each way checked call by call, and running a step twice changes nothing.
#[tokio::test]
async fn counters_move_to_redis_and_back_with_reports_arriving() {
    let redis = RedisServer::start();
    let url = redis.url();
    let app = phase1_app(&redis).await;
    let orgs: Vec<OrgId> = vec![app.org("starter").await.id, app.org("pro").await.id, app.org("business").await.id];
    assert_eq!(app.app.state.metering.backend(), "postgres");

    let (expected, report, rounds) =
        traffic_during(&app, &orgs, 3, phase_json(&app, &url, &["phase", "apply", "2", "--step", "counters"])).await;
    assert!(rounds >= 2, "traffic ran through the move ({rounds} rounds)");
    eprintln!("{rounds} rounds of traffic during the move: {report}");
    assert_eq!(report["to"], "redis", "{report}");
    assert_eq!(report["already"], false);
    let done = stages(&report);
    assert!(done.iter().any(|s| s.starts_with("writing both: postgres (writing redis too)")), "{done:?}");
    assert!(done.iter().any(|s| s.starts_with("seeded 3 organizations")), "{done:?}");
    assert!(done.iter().any(|s| s.starts_with("Redis alone: redis")), "{done:?}");
    assert!(
        report["stages"].as_array().unwrap().iter().filter(|s| s["processes"].is_number()).all(|s| s["processes"] == 1),
        "the serving process took every stage: {report}"
    );
    // Checked call by call against the ledger, and nothing needed rebuilding: the move itself
    // left no gap and no double count.
    assert_eq!(report["verified"]["organizations"], 3, "{report}");
    assert_eq!(report["verified"]["rebuilt"], 0, "{report}");
    assert_eq!(app.app.routes.route(Seam::UsageCounter).backend, "redis");
    assert_eq!(app.app.state.metering.backend(), "redis", "the running server counts in Redis now");
    books_balance(&app, &expected).await;

    // Twice: nothing moves, the check runs again.
    let again = phase_json(&app, &url, &["phase", "apply", "2", "--step", "counters"]).await;
    assert_eq!(again["already"], true, "{again}");
    assert_eq!(again["verified"]["rebuilt"], 0, "{again}");

    // And back, with reports arriving: Postgres is recounted from the ledger, because Redis
    // alone counted the calls since.
    let (more, back, rounds) = traffic_during(
        &app,
        &orgs,
        3,
        phase_json(&app, &url, &["phase", "apply", "2", "--step", "counters", "--rollback"]),
    )
    .await;
    assert!(rounds >= 1, "traffic ran through the rollback ({rounds} rounds)");
    assert_eq!(back["to"], "postgres", "{back}");
    assert!(stages(&back).iter().any(|s| s.starts_with("recounted 3 organizations")), "{back}");
    assert_eq!(back["verified"]["repaired"], 0, "{back}");
    assert_eq!(app.app.state.metering.backend(), "postgres");
    let mut total = expected.clone();
    for (org, s) in more {
        *total.entry(org).or_default() += s;
    }
    books_balance(&app, &total).await;
    for org in &orgs {
        assert_eq!(app.seconds_used(*org).await, total[org], "organizations.seconds_used holds every call once");
    }
    let again = phase_json(&app, &url, &["phase", "apply", "2", "--step", "counters", "--rollback"]).await;
    assert_eq!(again["already"], true, "{again}");

    // To Redis once more: the counters Redis kept from the first time miss every call Postgres
    // counted since, so the move drops them and seeds afresh.
    let (last, report, _) =
        traffic_during(&app, &orgs, 2, phase_json(&app, &url, &["phase", "apply", "2", "--step", "counters"])).await;
    assert_eq!(report["verified"]["rebuilt"], 0, "{report}");
    for (org, s) in last {
        *total.entry(org).or_default() += s;
    }
    books_balance(&app, &total).await;
}

/// Two servers on one database, each taking events: every stage waits for both, both end on
/// Redis, and the books balance across them.
#[tokio::test]
async fn a_move_waits_for_every_running_server() {
    let redis = RedisServer::start();
    let app = phase1_app(&redis).await;
    // A second server: the same database and Redis, an inbox of its own.
    let mut settings = app.app.settings.clone();
    let inbox = crate::helpers::inbox_dir();
    settings.inbox.dir = (*inbox).into();
    let second = callplane_server::App::with_store(settings, app.db.store.clone()).await.unwrap();
    let orgs: Vec<OrgId> = vec![app.org("pro").await.id, app.org("business").await.id];
    crate::durability::eventually("both servers heartbeat", async || {
        app.count("SELECT count(*) FROM servers WHERE seen_at > now() - interval '2 seconds'").await == 2
    })
    .await;
    let (expected, report, _) =
        traffic_during(&app, &orgs, 2, app.callplane_json(&["phase", "apply", "2", "--step", "counters"])).await;
    let waited: Vec<i64> =
        report["stages"].as_array().unwrap().iter().filter_map(|s| s["processes"].as_i64()).collect();
    assert!(!waited.is_empty() && waited.iter().all(|n| *n == 2), "each stage waited for both servers: {report}");
    assert_eq!(second.routes.route(Seam::UsageCounter).backend, "redis", "the second server follows");
    assert_eq!(second.state.metering.backend(), "redis");
    books_balance(&app, &expected).await;
}

/// Redis goes away after the counters moved there: the rollback needs nothing from it, moves
/// straight back to Postgres and recounts it, with reports arriving; nothing is lost.
#[tokio::test]
async fn counters_roll_back_to_postgres_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let app = phase1_app(&redis).await;
    let orgs: Vec<OrgId> = vec![app.org("starter").await.id, app.org("pro").await.id];
    let (expected, report, _) =
        traffic_during(&app, &orgs, 2, app.callplane_json(&["phase", "apply", "2", "--step", "counters"])).await;
    assert_eq!(report["to"], "redis", "{report}");
    books_balance(&app, &expected).await;
    redis.stop();
    let (more, back, rounds) = traffic_during(
        &app,
        &orgs,
        2,
        app.callplane_json(&["phase", "apply", "2", "--step", "counters", "--rollback"]),
    )
    .await;
    assert!(rounds >= 1, "{rounds} rounds during the rollback");
    assert_eq!(back["to"], "postgres", "{back}");
    assert!(stages(&back).iter().any(|s| s.starts_with("Postgres alone (Redis away)")), "{back}");
    assert_eq!(back["verified"]["repaired"], 0, "{back}");
    let mut total = expected;
    for (org, s) in more {
        *total.entry(org).or_default() += s;
    }
    books_balance(&app, &total).await;
    for org in &orgs {
        assert_eq!(app.seconds_used(*org).await, total[org]);
    }
}

/// Function data moves to the Redis cache while it is written and read: each write is read
/// back at once through whatever route the server is on, and afterwards the cache holds what
/// Postgres holds. The books balance with reports arriving all along.
#[tokio::test]
async fn function_data_moves_to_redis_warmed_while_it_is_written() {
    let redis = RedisServer::start();
    let url = redis.url();
    let app = phase1_app(&redis).await;
    let orgs: Vec<OrgId> = vec![app.org("pro").await.id, app.org("business").await.id];
    let key = app.api_key(orgs[0]).await;
    let put = async |value: i64| {
        let r = app
            .http
            .put(format!("{}/v1/function-data/menu", app.base))
            .bearer_auth(&key)
            .json(&json!({ "version": value }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        let (status, body) = app.get("/v1/function-data/menu", &key).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["value"]["version"], value, "a write is read back at once: {body}");
    };
    put(0).await;
    let writes = std::sync::atomic::AtomicI64::new(0);
    let moving = async {
        let (report, ()) =
            tokio::join!(phase_json(&app, &url, &["phase", "apply", "2", "--step", "function-data"]), async {
                for v in 1..=15 {
                    put(v).await;
                    writes.store(v, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                }
            });
        report
    };
    let (expected, report, _) = traffic_during(&app, &orgs, 2, moving).await;
    assert_eq!(report["to"], "redis", "{report}");
    assert!(stages(&report).iter().any(|s| s.starts_with("warmed 2 organizations")), "{report}");
    assert_eq!(app.app.state.function_data.backend(), "redis");
    books_balance(&app, &expected).await;
    put(100).await;
    // Read through the cache now: the last write is what it holds (or it holds nothing yet and
    // reads Postgres).
    crate::durability::eventually("the cache holds the last write", async || {
        let cached = redis.get(&format!("callplane:fd:{}", orgs[0]));
        cached.is_none_or(|c| serde_json::from_str::<Value>(&c).unwrap()["menu"]["version"] == 100)
    })
    .await;
    assert_eq!(writes.into_inner(), 15);
    let back = phase_json(&app, &url, &["phase", "apply", "2", "--step", "function-data", "--rollback"]).await;
    assert_eq!(back["to"], "postgres", "{back}");
    assert_eq!(app.app.state.function_data.backend(), "postgres");
    put(101).await;
}

/// Search is switched on (its index built with progress) and off again while reports arrive.
#[tokio::test]
async fn search_is_switched_on_and_off_while_reports_arrive() {
    let redis = RedisServer::start();
    let url = redis.url();
    let app = phase1_app(&redis).await;
    let orgs: Vec<OrgId> = vec![app.org("pro").await.id];
    let key = app.api_key(orgs[0]).await;
    let (status, body) = app.get("/v1/search?q=hello", &key).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("search_off")), "{body}");
    let (expected, report, _) =
        traffic_during(&app, &orgs, 2, phase_json(&app, &url, &["phase", "apply", "2", "--step", "search"])).await;
    assert_eq!(report["to"], "postgres", "{report}");
    assert_eq!(report["verified"]["index_valid"], true, "{report}");
    books_balance(&app, &expected).await;
    let (status, body) = app.get("/v1/search?q=hello", &key).await;
    assert_eq!(status, StatusCode::OK, "search answers once the step is done: {body}");
    let back = phase_json(&app, &url, &["phase", "apply", "2", "--step", "search", "--rollback"]).await;
    assert_eq!(back["to"], "off", "{back}");
    let (status, _) = app.get("/v1/search?q=hello", &key).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

/// A step whose prerequisite is missing is refused before anything changes, saying what is
/// missing; `phase plan` says the same, and what is done.
#[tokio::test]
async fn a_step_is_refused_clearly_when_redis_is_down_and_the_plan_says_why() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let app = phase1_app(&redis).await;
    let plan = phase_json(&app, &url, &["phase", "plan", "2"]).await;
    let step = |plan: &Value, name: &str| {
        plan["steps"].as_array().unwrap().iter().find(|s| s["step"] == name).cloned().unwrap()
    };
    assert_eq!(step(&plan, "counters")["status"], "ready", "{plan}");
    assert_eq!(step(&plan, "search")["now"], "off", "{plan}");
    assert!(plan["processes"].as_array().unwrap().len() == 1, "the serving process is listed: {plan}");
    let phase3 = phase_json(&app, &url, &["phase", "plan", "3"]).await;
    assert_eq!(phase3["ready"], false, "phase 3's moves are not in this version: {phase3}");

    redis.stop();
    let out = callplane(&app, &url, &["phase", "apply", "2", "--step", "counters"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not answer"), "{stderr}");
    assert_eq!(app.app.routes.route(Seam::UsageCounter).backend, "postgres", "nothing moved");
    let stored: i64 = app.count("SELECT count(*) FROM backend_routes").await;
    assert_eq!(stored, 0, "no route was written");
    let plan = phase_json(&app, &url, &["phase", "plan", "2"]).await;
    assert_eq!(step(&plan, "counters")["status"], "blocked", "{plan}");
    assert!(step(&plan, "counters")["blocked_by"].as_str().unwrap().contains("does not answer"), "{plan}");
}

/// The event pipeline moves to Temporal and back while events arrive: the server starts its
/// worker when events are routed to Temporal, what was in hand inline finishes there, and the
/// books balance each way.
#[cfg(feature = "temporal")]
#[tokio::test]
async fn the_pipeline_moves_to_temporal_and_back_with_events_arriving() {
    let temporal = callplane_testkit::temporal::TemporalServer::start();
    let redis = RedisServer::start();
    let url = redis.url();
    let address = temporal.address();
    let app = TestApp::spawn_with(&[
        ("redis.url", url.as_str()),
        ("backends.event_pipeline", "inline"),
        ("temporal.address", address.as_str()),
        ("temporal.worker", "auto"),
        // The answer waits for this server's worker, so a 200 means applied, on either route.
        ("temporal.answer_wait_ms", "10000"),
        ("inbox.inline_budget_ms", "10000"),
    ])
    .await;
    let orgs: Vec<OrgId> = vec![app.org("pro").await.id, app.org("business").await.id];
    assert_eq!(app.app.state.pipeline.backend(), "inline");
    let (expected, report, rounds) =
        traffic_during(&app, &orgs, 3, phase_json(&app, &url, &["phase", "apply", "2", "--step", "pipeline"])).await;
    assert!(rounds >= 1, "traffic ran through the move ({rounds} rounds)");
    assert_eq!(report["to"], "temporal", "{report}");
    assert!(
        stages(&report).iter().any(|s| s.starts_with("inline events drained; 1 Temporal workers running")),
        "{report}"
    );
    assert_eq!(report["verified"]["workers_running"], 1, "{report}");
    assert_eq!(app.app.state.pipeline.backend(), "temporal");
    books_balance(&app, &expected).await;
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    let started = metrics
        .lines()
        .find_map(|l| l.strip_prefix("callplane_temporal_workflows_started_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(started.is_some_and(|n| n > 0.0), "events went through Temporal workflows: {metrics}");

    let (more, back, _) = traffic_during(
        &app,
        &orgs,
        2,
        phase_json(&app, &url, &["phase", "apply", "2", "--step", "pipeline", "--rollback"]),
    )
    .await;
    assert_eq!(back["to"], "inline", "{back}");
    assert_eq!(app.app.state.pipeline.backend(), "inline");
    let mut total = expected;
    for (org, s) in more {
        *total.entry(org).or_default() += s;
    }
    books_balance(&app, &total).await;
}
