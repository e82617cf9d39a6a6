//! `TestApp`: a callplane on a random port with its own database.

use callplane_core::CallRecord;
use callplane_core::seams::CallReads;
use callplane_core::{OrgId, Organization};
use callplane_server::{App, Settings};
use callplane_storage::NewOrganization;
use callplane_testkit::TestDb;
use callplane_testkit::fault_proxy::FaultProxy;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::PathBuf;

pub const SECRET: &str = "test-vapi-secret";

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub db: TestDb,
    pub app: App,
    /// Dropping or sending on this shuts the server down.
    pub shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// The server's inbox and object store directories, removed with it.
    _scratch: [ScratchDir; 2],
}

pub const ADMIN_TOKEN: &str = "test-admin-token";

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vapi")
}

/// A sample body from `tests/fixtures/vapi` (copied from VAPI's shared samples).
pub fn sample(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// A directory of its own under the system's temporary directory, removed with everything in
/// it when dropped (a `tempfile::TempDir`): a suite run leaves no inboxes or object stores
/// behind. It reads as the `&str` that settings and environment variables take.
pub struct ScratchDir(tempfile::TempDir);

impl ScratchDir {
    pub fn new(prefix: &str) -> Self {
        Self(tempfile::Builder::new().prefix(&format!("{prefix}-")).tempdir().unwrap())
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = str;
    fn deref(&self) -> &str {
        self.0.path().to_str().unwrap()
    }
}

/// A new inbox directory for one server, removed when the returned guard is dropped.
pub fn inbox_dir() -> ScratchDir {
    ScratchDir::new("callplane-test-inbox")
}

pub fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The Redis the suite runs against in a build with the `redis` feature
/// (`CALLPLANE_TEST_REDIS_URL`, set by `cargo xtask test`): every `TestApp` then counts usage and
/// caches function data in it, unless a test asks for another backend.
pub fn redis_url() -> Option<String> {
    if !cfg!(feature = "redis") {
        return None;
    }
    std::env::var("CALLPLANE_TEST_REDIS_URL").ok().filter(|u| !u.is_empty())
}

/// The Temporal server the suite runs against in a build with the `temporal` feature
/// (`CALLPLANE_TEST_TEMPORAL_ADDRESS`, set by `cargo xtask test`): every `TestApp` then hands its
/// events to Temporal workflows, run by a worker inside it, unless a test asks for another
/// pipeline.
pub fn temporal_address() -> Option<String> {
    if !cfg!(feature = "temporal") {
        return None;
    }
    std::env::var("CALLPLANE_TEST_TEMPORAL_ADDRESS").ok().filter(|u| !u.is_empty())
}

impl TestApp {
    /// `callplane <args>` (the real binary) against this server's database, Redis, Temporal and
    /// object store, run to its end.
    pub async fn callplane(&self, args: &[&str]) -> std::process::Output {
        let mut command = self.callplane_command(args);
        tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
    }

    /// The `callplane <args>` command against this server's database, Redis, Temporal and object
    /// store.
    pub fn callplane_command(&self, args: &[&str]) -> std::process::Command {
        use secrecy::ExposeSecret;
        let settings = &self.app.settings;
        // Behind the pooler as the server is; else straight to the database (not through a
        // fault proxy the test may cut).
        let direct = settings.database.direct_url().unwrap_or_default();
        let url = if direct.is_empty() { self.db.url.as_str() } else { settings.database.url.expose_secret() };
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_callplane"));
        command
            .args(args)
            .env("CALLPLANE_ENV", "test")
            .env("CALLPLANE_CONFIG_DIR", PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config"))
            .env("CALLPLANE__DATABASE__URL", url)
            .env("CALLPLANE__DATABASE__DIRECT_URL", direct)
            .env("CALLPLANE__REDIS__URL", settings.redis.url.expose_secret())
            .env("CALLPLANE__TEMPORAL__ADDRESS", &settings.temporal.address)
            .env("CALLPLANE__TEMPORAL__TASK_QUEUE", &settings.temporal.task_queue)
            .env("CALLPLANE__VAPI__SECRET", SECRET)
            .env("CALLPLANE__PARTITIONS__ARCHIVE_AFTER_MONTHS", settings.partitions.archive_after_months.to_string())
            .env("RUST_LOG", "warn");
        let o = &settings.object_store;
        let transcripts: &'static str = settings.backends.transcripts.into();
        command
            .env("CALLPLANE__BACKENDS__TRANSCRIPTS", transcripts)
            .env("CALLPLANE__OBJECT_STORE__URL", &o.url)
            .env("CALLPLANE__OBJECT_STORE__ENDPOINT", &o.endpoint)
            .env("CALLPLANE__OBJECT_STORE__ACCESS_KEY_ID", o.access_key_id.expose_secret())
            .env("CALLPLANE__OBJECT_STORE__SECRET_ACCESS_KEY", o.secret_access_key.expose_secret());
        command
    }

    /// `callplane --json <args>`, which must succeed; what it printed.
    pub async fn callplane_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.callplane(&all).await;
        assert!(out.status.success(), "callplane {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    /// A callplane on a fresh database; in a run with PgBouncer (phase 3's), its pool goes
    /// through the pooler in transaction mode and its sessions straight to the database
    /// (`database.direct_url`), as a user behind a pooler configures it.
    pub async fn spawn_with(overrides: &[(&str, &str)]) -> Self {
        let db = TestDb::fresh().await.expect("a fresh test database");
        let Some(pooled) = callplane_testkit::replica::pooled(&db.name) else {
            let store = db.store.clone();
            return Self::serve_on(db, store, overrides).await;
        };
        let store = callplane_storage::PgStore::connect(&pooled, 10)
            .await
            .expect("connects through PgBouncer")
            .with_direct_url(&db.url)
            .unwrap();
        let direct = db.url.clone();
        let mut all = vec![("database.url", pooled.as_str()), ("database.direct_url", direct.as_str())];
        all.extend_from_slice(overrides);
        Self::serve_on(db, store, &all).await
    }

    /// A callplane whose dashboard reads go to the suite's streaming replica
    /// (`database.replica_url`), once the replica has this test's database.
    #[cfg(feature = "read-replica")]
    pub async fn spawn_with_replica(
        replica: &callplane_testkit::replica::TestReplica,
        overrides: &[(&str, &str)],
    ) -> Self {
        let db = TestDb::fresh().await.expect("a fresh test database");
        replica.wait_for_database(&db.name).await;
        let url = replica.url(&db.name);
        let store = db.store.clone();
        let mut all = vec![("database.replica_url", url.as_str())];
        all.extend_from_slice(overrides);
        Self::serve_on(db, store, &all).await
    }

    /// A callplane that reaches its database only through `FaultProxy`, which the test can
    /// cut off. `db.store` still reaches the database directly, for the test's own reads.
    pub async fn spawn_behind_proxy(overrides: &[(&str, &str)]) -> (Self, FaultProxy) {
        let db = TestDb::fresh().await.expect("a fresh test database");
        let target = db.url.split_once('@').map_or("", |(_, h)| h.split(['/', '?']).next().unwrap_or(""));
        let proxy = FaultProxy::start(target).await.expect("the fault proxy starts");
        let url = proxy.url_through(&db.url);
        let store = callplane_storage::PgStore::connect(&url, 8).await.expect("connects through the proxy");
        let mut all = vec![("database.url", url.as_str())];
        all.extend_from_slice(overrides);
        (Self::serve_on(db, store, &all).await, proxy)
    }

    async fn serve_on(db: TestDb, store: callplane_storage::PgStore, overrides: &[(&str, &str)]) -> Self {
        // Logs appear in the output of failing tests (nextest captures them).
        callplane_server::telemetry::init("pretty");
        let inbox = inbox_dir();
        // A build with an object store opens it (a directory by default): one per server.
        let objects = ScratchDir::new("callplane-test-objects");
        let mut all: Vec<(&str, &str)> = vec![
            ("database.url", db.url.as_str()),
            ("vapi.secret", SECRET),
            ("auth.admin_token", ADMIN_TOKEN),
            ("inbox.dir", &inbox),
            ("object_store.url", &objects),
        ];
        let redis = redis_url();
        if let Some(url) = &redis {
            all.extend([
                ("redis.url", url.as_str()),
                ("backends.usage_counter", "redis"),
                ("backends.function_data", "redis"),
            ]);
        }
        // Each server has its own database, so its own task queue: no worker takes another
        // test's events. The answer waits for the worker, so tests read what it applied.
        let temporal = temporal_address();
        let task_queue = format!("callplane-test-{}", uuid::Uuid::new_v4().simple());
        if let Some(address) = &temporal {
            all.extend([
                ("backends.event_pipeline", "temporal"),
                ("temporal.address", address.as_str()),
                ("temporal.task_queue", task_queue.as_str()),
                ("temporal.answer_wait_ms", "10000"),
            ]);
        }
        all.extend_from_slice(overrides);
        let settings = Settings::defaults_with(&all).expect("test settings");
        let app = App::with_store(settings, store).await.expect("app builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.clone().serve(listener, async move {
            let _ = rx.await;
        }));
        Self { base, http: reqwest::Client::new(), db, app, shutdown: Some(tx), _scratch: [inbox, objects] }
    }

    /// An organization whose current billing period started a day ago.
    pub async fn org(&self, plan: &str) -> Organization {
        self.org_from(plan, Utc::now() - Duration::days(1)).await
    }

    pub async fn org_from(&self, plan: &str, period_start: DateTime<Utc>) -> Organization {
        self.db
            .store
            .create_organization(&NewOrganization {
                name: format!("Org {}", uuid::Uuid::new_v4().simple()),
                plan: plan.into(),
                default_assistant_id: Some(format!("asst-{}", uuid::Uuid::new_v4().simple())),
                period_start,
            })
            .await
            .unwrap()
    }

    /// Posts a body to `/vapi/{org}` with the shared secret; returns status and JSON body.
    pub async fn post_vapi(&self, org: OrgId, body: &Value) -> (StatusCode, Value) {
        let r =
            self.http.post(format!("{}/vapi/{org}", self.base)).bearer_auth(SECRET).json(body).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Posts a webhook and waits until an event more has been settled and the inbox holds none
    /// (up to 10 s): a sequence sent this way is processed one event after the other, as
    /// VAPI's deliveries of one call usually are. (An answer does not wait for its event to be
    /// recorded, so the next event could otherwise overtake it.)
    pub async fn post_vapi_in_turn(&self, org: OrgId, body: &Value) -> (StatusCode, Value) {
        use callplane_core::seams::EventIntake;
        let settled = |app: &Self| app.app.intake.status().drained_total;
        let before = settled(self);
        let answer = self.post_vapi(org, body).await;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while (settled(self) == before || self.app.intake.inbox().depth() > 0) && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        answer
    }

    /// A new API key for an organization.
    pub async fn api_key(&self, org: OrgId) -> String {
        self.db.store.create_api_key(org, "test").await.unwrap().secret
    }

    /// Sets function data as the dashboard does (`PUT /v1/function-data/{name}`), which must
    /// succeed; the answer.
    pub async fn put_function_data(&self, key: &str, name: &str, value: &Value) -> reqwest::Response {
        let r = self
            .http
            .put(format!("{}/v1/function-data/{name}", self.base))
            .bearer_auth(key)
            .json(value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "PUT /v1/function-data/{name}");
        r
    }

    /// A series from `/metrics` (a name, with its labels when it has some), which must be there.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} is not in /metrics"))
    }

    /// GET with a bearer credential; returns status and JSON (Null if not JSON).
    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let r = self.http.get(format!("{}{path}", self.base)).bearer_auth(token).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("{}/v1/realtime{query}", self.base.replace("http://", "ws://"))
    }

    pub async fn call(&self, org: OrgId, id: &str) -> Option<CallRecord> {
        self.db.store.get_call(org, id).await.unwrap()
    }

    /// The organization's usage in its current period, from the configured counter.
    pub async fn seconds_used(&self, org: OrgId) -> i64 {
        let period: DateTime<Utc> = sqlx::query_scalar("SELECT period_start FROM organizations WHERE id = $1")
            .bind(org.0)
            .fetch_one(self.db.store.pool())
            .await
            .unwrap();
        self.app.state.metering.used(org, period).await.unwrap()
    }

    /// The call once it is recorded: an answered event (`assistant-request`, a tool call) is
    /// recorded on its own, after its answer, so a test reading the row waits for it (10 s).
    pub async fn recorded_call(&self, org: OrgId, id: &str) -> CallRecord {
        for _ in 0..200 {
            if let Some(call) = self.call(org, id).await {
                return call;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("call {id} was not recorded within 10 s");
    }

    /// Waits for the call to be recorded (an answered event is recorded on its own), then
    /// deletes every trace of it, so only what a later message carries can route it.
    pub async fn forget_call(&self, org: OrgId, id: &str) {
        self.recorded_call(org, id).await;
        for sql in ["DELETE FROM calls WHERE id = $1", "DELETE FROM call_keys WHERE vapi_call_id = $1"] {
            sqlx::query(sql).bind(id).execute(self.db.store.pool()).await.unwrap();
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(self.db.store.pool()).await.unwrap()
    }
}

/// The shared samples re-addressed to a new call: every message's `call.id` and
/// `call.createdAt`, its `timestamp`, and the report's start, end and duration move so the
/// call was created at `created_at` and lasted `duration_s` seconds. Returns the messages in
/// the order VAPI sends them.
pub fn lifecycle(call_id: &str, created_at: DateTime<Utc>, duration_s: f64) -> Vec<Value> {
    let names = [
        "01-assistant-request.json",
        "02-status-update-in-progress.json",
        "05-transcript-partial.json",
        "06-transcript-final.json",
        "07-conversation-update.json",
        "04-tool-calls-two-calls.json",
        "11-function-call-legacy.json",
        "08-speech-update.json",
        "10-transfer-destination-request.json",
        "03-status-update-ended.json",
        "09-end-of-call-report.json",
    ];
    let started = created_at + Duration::seconds(2);
    let ended = started + Duration::milliseconds((duration_s * 1000.0) as i64);
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut body = sample(name);
            let m = body["message"].as_object_mut().unwrap();
            m.insert("timestamp".into(), json!((created_at + Duration::seconds(i as i64 + 1)).timestamp_millis()));
            if let Some(call) = m.get_mut("call").and_then(Value::as_object_mut) {
                call.insert("id".into(), json!(call_id));
                call.insert("createdAt".into(), json!(iso(created_at)));
                call.insert("updatedAt".into(), json!(iso(created_at)));
            }
            if m["type"] == "end-of-call-report" {
                m.insert("startedAt".into(), json!(iso(started)));
                m.insert("endedAt".into(), json!(iso(ended)));
                m.insert("durationSeconds".into(), json!(duration_s));
                m.insert("durationMs".into(), json!(duration_s * 1000.0));
                m.insert("durationMinutes".into(), json!(duration_s / 60.0));
            }
            body
        })
        .collect()
}

/// Calls of every organization in turn, each a whole lifecycle ending in its report, `calls`
/// per organization; `fault` runs once half of them are in. Every report is sent a second
/// time at the end (VAPI retries): nothing may count twice. Returns the seconds billed per
/// organization, from what was sent.
#[cfg(any(feature = "redis", feature = "temporal"))] // the phase-2 suites
pub async fn traffic(
    app: &TestApp,
    orgs: &[OrgId],
    calls: usize,
    fault: impl AsyncFnOnce(),
) -> std::collections::HashMap<OrgId, i64> {
    let mut sent = Sent::default();
    let mut fault = Some(fault);
    for i in 0..calls {
        if i == calls / 2
            && let Some(f) = fault.take()
        {
            f().await;
        }
        sent.round(app, orgs, i).await;
    }
    sent.again(app).await
}

/// Traffic while `during` runs: a call of every organization at a time, round after round,
/// from before it starts until `after` rounds past its end; then every report again. Returns
/// the seconds billed per organization, what `during` returned, and the rounds sent while it
/// ran.
pub async fn traffic_during<T>(
    app: &TestApp,
    orgs: &[OrgId],
    after: usize,
    during: impl Future<Output = T>,
) -> (std::collections::HashMap<OrgId, i64>, T, usize) {
    let mut sent = Sent { unbilled: true, ..Sent::default() };
    let done = std::sync::atomic::AtomicBool::new(false);
    let rounds_during = std::sync::atomic::AtomicUsize::new(0);
    let (out, ()) = tokio::join!(
        async {
            // Traffic is flowing before the move starts.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let out = during.await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            out
        },
        async {
            let mut i = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                sent.round(app, orgs, i).await;
                rounds_during.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                i += 1;
            }
            for _ in 0..after {
                sent.round(app, orgs, i).await;
                i += 1;
            }
        }
    );
    (sent.again(app).await, out, rounds_during.into_inner())
}

/// What traffic sent: seconds per organization, and each report to send again.
struct Sent {
    /// Calls are named `{org}-{run}-{i}`: each traffic its own calls.
    run: String,
    /// Each round adds a call nobody answered (billed 0 s), as real traffic has.
    unbilled: bool,
    expected: std::collections::HashMap<OrgId, i64>,
    reports: Vec<(OrgId, Value)>,
}

impl Default for Sent {
    fn default() -> Self {
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        Self { run, unbilled: false, expected: Default::default(), reports: Vec::new() }
    }
}

impl Sent {
    /// One call of every organization, at once; each event must be answered 200.
    async fn round(&mut self, app: &TestApp, orgs: &[OrgId], i: usize) {
        let unbilled = self.unbilled.then(|| orgs[i % orgs.len()]);
        let sends = orgs.iter().copied().chain(unbilled).enumerate().map(|(n, org)| {
            let unanswered = n >= orgs.len();
            let seconds = if unanswered { 0 } else { 150 + (i * 7 + n * 13) as i64 % 200 };
            let call_id = format!("{org}-{}-{i}{}", self.run, if unanswered { "-unanswered" } else { "" });
            let events = lifecycle(&call_id, Utc::now() - Duration::minutes(10), seconds as f64);
            async move {
                for e in &events {
                    let (status, body) = app.post_vapi(org, e).await;
                    assert_eq!(status, StatusCode::OK, "{body}");
                }
                (org, seconds, events.last().cloned().unwrap())
            }
        });
        for (org, seconds, report) in futures::future::join_all(sends).await {
            *self.expected.entry(org).or_default() += seconds;
            self.reports.push((org, report));
        }
    }

    /// Every report once more (VAPI retries): nothing may count twice.
    async fn again(self, app: &TestApp) -> std::collections::HashMap<OrgId, i64> {
        for (org, report) in &self.reports {
            assert_eq!(app.post_vapi(*org, report).await.0, StatusCode::OK);
        }
        self.expected
    }
}

/// What every reader of usage says, once the pipeline and the repair loop have caught up: the
/// ledger, the counter itself and the dashboard API all equal what was billed.
pub async fn books_balance(app: &TestApp, expected: &std::collections::HashMap<OrgId, i64>) {
    let counter = app.app.state.metering.counter().clone();
    for (org, seconds) in expected {
        let o = callplane_core::seams::OrgDirectory::get(&app.db.store, *org).await.unwrap().unwrap();
        let ledger_total = async || app.db.store.ledger_total(*org, o.period_start).await.unwrap();
        // After an outage, the pipeline's retries back off up to 10 s before they find it over.
        crate::durability::eventually_within("the ledger reaches what was billed", 90, async || {
            ledger_total().await >= *seconds
        })
        .await;
        let ledger = ledger_total().await;
        assert_eq!(ledger, *seconds, "the ledger of {org} lost or doubled a call");
        crate::durability::eventually("the counter catches up with the ledger", async || {
            uncounted_gauge(app).await == 0.0 && counter.used(*org, o.period_start).await.ok() == Some(ledger)
        })
        .await;
        let key = app.api_key(*org).await;
        assert_eq!(app.get("/v1/usage", &key).await.1["seconds_used"].as_i64(), Some(ledger));
        // The daily roll-up, written in the ledger's transactions, says the same.
        let utc = chrono::FixedOffset::east_opt(0).unwrap();
        crate::daily_usage::daily_usage_matches_the_ledger(app, *org, utc, "UTC").await;
    }
}

pub async fn uncounted_gauge(app: &TestApp) -> f64 {
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    let line = metrics.lines().find(|l| l.starts_with("callplane_usage_uncounted_calls "));
    line.and_then(|l| l.split(' ').nth(1)?.parse().ok()).unwrap_or_else(|| panic!("no gauge in {metrics}"))
}
