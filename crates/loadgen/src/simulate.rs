//! `simulate`: plays VAPI call lifecycles against a running callplane, then checks the books.
//!
//! Organizations (and an API key for each) are created through the admin API, so the run
//! never touches data it did not make. Calls start at `--rate` per second with at most
//! `--max-concurrent` in flight; each plays its webhooks in order (give or take the
//! duplicates and reorderings the plan asks for), `--event-gap-ms` apart. A line of progress is
//! printed every second. At the end the books are read from Postgres and `GET /v1/usage`.
//!
//! Every attempt is counted by class and message kind (2xx, 503, other 5xx, connection errors),
//! with the slowest answer of each kind. With `--retry-secs` a delivery that meets a refused
//! connection or a 503 is sent again within that budget, as a load balancer with a healthy peer
//! would; without it every delivery is sent once. `--run-file` saves what was sent so that
//! `callplane-loadgen books` can check the books later.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::books::{self, Books, CounterStore, ExpectedCall, RunRecord};
use crate::client::{RetryPolicy, Server};
use crate::messages::{CallOwner, CallScript, EventSpec};
use crate::plan::{CallSpec, TrafficConfig, TrafficPlan, deliveries, stream};
use crate::random::item_rng;
use crate::stats::{AnswerTally, LatencySummary, Recorder, StatusCounts, micros};

/// How the simulation runs (the traffic's shape is in [`TrafficConfig`]).
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub traffic: TrafficConfig,
    /// Calls started per second; 0 starts them as fast as the concurrency allows.
    pub rate: f64,
    pub max_concurrent: usize,
    /// Mean pause between two deliveries of one call (uniformly 0.5x to 1.5x).
    pub event_gap: Duration,
    /// Stop starting calls after this long (calls in flight finish).
    pub time_limit: Option<Duration>,
    /// Record latencies only while at least this many calls are in flight.
    pub steady_in_flight: Option<usize>,
    /// A path to GET meanwhile, and how many times a second: a request that does no work,
    /// timed in the same steady window as the answers (`Summary::probe`).
    pub probe: Option<(String, f64)>,
    /// Postgres, for the books; without it only the API is checked.
    pub database_url: Option<String>,
    /// Where the server counts usage, for the books.
    pub usage_counter: CounterStore,
    pub check_books: bool,
    /// When to send a delivery again (never, by default).
    pub retry: RetryPolicy,
    /// Where to save what was sent, for a later books check.
    pub run_file: Option<PathBuf>,
    /// A label for the organizations' names.
    pub label: String,
    pub quiet: bool,
}

/// An organization created for the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Org {
    pub id: Uuid,
    pub name: String,
    pub plan: String,
    pub assistant_id: String,
    pub url: String,
    pub api_key: String,
}

/// What a run did, printed as JSON with `--json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Summary {
    pub calls_planned: usize,
    pub calls_started: u64,
    pub calls_completed: u64,
    pub deliveries: u64,
    pub reports: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub elapsed_seconds: f64,
    pub deliveries_per_second: f64,
    /// Deliveries per second while at least `--steady-in-flight` calls were in flight (the
    /// whole run without it).
    pub steady_deliveries_per_second: f64,
    pub reports_per_second: f64,
    pub max_in_flight: i64,
    pub latency: BTreeMap<String, LatencySummary>,
    /// The probe's latency in the steady window (with `RunConfig::probe`).
    #[serde(default)]
    pub probe: Option<LatencySummary>,
    /// Every attempt by message kind and class, retries included.
    #[serde(default)]
    pub statuses: BTreeMap<String, StatusCounts>,
    #[serde(default)]
    pub status_total: StatusCounts,
    /// The slowest answer of each message kind, in milliseconds, whatever its status and
    /// whether or not the steady state held.
    #[serde(default)]
    pub max_answer_ms: BTreeMap<String, f64>,
    /// 2xx answers VAPI could not use, by kind: an assistant refused, a tool call without a
    /// result (each also counts in `errors`).
    #[serde(default)]
    pub unusable_answers: BTreeMap<String, u64>,
    #[serde(default)]
    pub retry_budget_seconds: f64,
    pub books: Option<Books>,
    pub hot_org: Option<Uuid>,
}

/// Function data every simulated organization gets, so tool calls find answers.
fn function_data() -> [(&'static str, Value); 3] {
    [
        ("businessHours", json!("Mon-Fri 8am-6pm, Sat 9am-1pm")),
        (
            "lookup_order",
            json!({
                "by": "orderNumber",
                "entries": { "A-10442": "Order A-10442: water heater repair, Thursday 10am-12pm." },
                "default": "Order found: technician scheduled Thursday between 10am and 12pm.",
            }),
        ),
        ("get_next_available_slot", json!("Next slot: Wednesday 2pm-4pm.")),
    ]
}

/// Creates `plans.len()` organizations through the admin API, each with an API key and the
/// function data tools need, a few at a time.
pub async fn create_orgs(server: &Server, plans: &[&'static str], label: &str, quiet: bool) -> Result<Vec<Org>> {
    let started = Instant::now();
    let run = Uuid::now_v7().simple().to_string();
    let run = &run[run.len() - 8..];
    let results: Vec<Result<Org>> = futures::stream::iter(plans.iter().enumerate())
        .map(|(i, plan)| async move {
            let name = format!("{label} {run} #{i} ({plan})");
            let assistant_id = format!("asst-loadgen-{run}-{i}");
            let created = server.create_org(&name, plan, &assistant_id).await?;
            let api_key = server.create_api_key(&created.id).await?;
            for (key, value) in function_data() {
                server.put_function_data(&api_key, key, &value).await?;
            }
            let id: Uuid = created.id.parse().with_context(|| format!("organization id {:?}", created.id))?;
            Ok(Org { id, name, plan: (*plan).to_owned(), assistant_id, url: created.vapi_server_url, api_key })
        })
        .buffered(8)
        .collect()
        .await;
    let orgs = results.into_iter().collect::<Result<Vec<_>>>()?;
    if !quiet {
        eprintln!("loadgen: created {} organizations in {:.1}s", orgs.len(), started.elapsed().as_secs_f64());
    }
    Ok(orgs)
}

/// Counters shared by every call task and the progress printer.
#[derive(Default)]
struct Counters {
    started: AtomicU64,
    completed: AtomicU64,
    deliveries: AtomicU64,
    reports: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicI64,
    max_in_flight: AtomicI64,
    /// Deliveries made while the steady state held, and when it first and last held
    /// (microseconds since the start).
    steady_deliveries: AtomicU64,
    steady_first_us: AtomicU64,
    steady_last_us: AtomicU64,
}

struct Shared {
    started: Instant,
    server: Server,
    orgs: Vec<Org>,
    config: RunConfig,
    counters: Counters,
    latency: BTreeMap<&'static str, Recorder>,
    probe: Recorder,
    answers: AnswerTally,
    error_samples: Mutex<Vec<String>>,
    expected: Mutex<Vec<ExpectedCall>>,
}

impl Shared {
    fn error(&self, text: String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut samples) = self.error_samples.lock()
            && samples.len() < 10
        {
            samples.push(text);
        }
    }

    /// Whether enough calls are in flight for measurements to count (always, without
    /// `--steady-in-flight`).
    fn steady(&self) -> bool {
        self.config.steady_in_flight.is_none_or(|n| self.counters.in_flight.load(Ordering::Relaxed) >= n as i64)
    }

    fn record_latency(&self, kind: &'static str, elapsed: Duration) {
        if self.steady()
            && let Some(recorder) = self.latency.get(kind)
        {
            recorder.record(elapsed);
        }
    }

    /// Counts a delivery made in the steady state and widens the steady window to include now.
    fn record_steady_delivery(&self) {
        if !self.steady() {
            return;
        }
        let now = micros(self.started.elapsed()) as u64;
        let c = &self.counters;
        c.steady_deliveries.fetch_add(1, Ordering::Relaxed);
        c.steady_first_us.fetch_min(now, Ordering::Relaxed);
        c.steady_last_us.fetch_max(now, Ordering::Relaxed);
    }

    /// Deliveries per second while the steady state lasted (0 if it never began).
    fn steady_rate(&self) -> f64 {
        let c = &self.counters;
        let (first, last) = (c.steady_first_us.load(Ordering::Relaxed), c.steady_last_us.load(Ordering::Relaxed));
        let seconds = last.saturating_sub(first) as f64 / 1e6;
        if seconds <= 0.0 { 0.0 } else { c.steady_deliveries.load(Ordering::Relaxed) as f64 / seconds }
    }
}

pub(crate) const KINDS: [&str; 6] =
    ["assistant-request", "status-update", "transcript", "conversation-update", "tool-calls", "end-of-call-report"];

/// Runs the simulation with organizations created for it.
pub async fn run(server: Server, config: RunConfig) -> Result<Summary> {
    let plan = TrafficPlan::new(&config.traffic)?;
    let orgs = create_orgs(&server, &plan.org_plans, &config.label, config.quiet).await?;
    run_with_orgs(server, config, plan, orgs).await
}

/// Runs the simulation on organizations that already exist (one per entry of the plan's
/// `org_plans`).
pub async fn run_with_orgs(server: Server, config: RunConfig, plan: TrafficPlan, orgs: Vec<Org>) -> Result<Summary> {
    if orgs.len() != plan.org_plans.len() {
        bail!("{} organizations for a plan of {}", orgs.len(), plan.org_plans.len());
    }
    let run_started_at = Utc::now() - chrono::Duration::seconds(1);
    let hot_org = (config.traffic.skew > 0.0).then(|| orgs[plan.hot_org].id);
    let counters = Counters { steady_first_us: AtomicU64::new(u64::MAX), ..Counters::default() };
    let shared = Arc::new(Shared {
        started: Instant::now(),
        server,
        orgs,
        config: config.clone(),
        counters,
        latency: KINDS.iter().map(|k| (*k, Recorder::default())).collect(),
        probe: Recorder::default(),
        answers: AnswerTally::default(),
        error_samples: Mutex::new(Vec::new()),
        expected: Mutex::new(Vec::with_capacity(plan.calls.len())),
    });

    let started = shared.started;
    let progress = (!config.quiet).then(|| tokio::spawn(progress(shared.clone(), plan.calls.len(), started)));
    let prober = config.probe.clone().map(|(path, rate)| tokio::spawn(probe(shared.clone(), path, rate)));
    let permits = Arc::new(Semaphore::new(config.max_concurrent.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, spec) in plan.calls.into_iter().enumerate() {
        if config.time_limit.is_some_and(|limit| started.elapsed() >= limit) {
            break;
        }
        if config.rate > 0.0 {
            tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / config.rate)).into()).await;
        }
        let permit = permits.clone().acquire_owned().await.context("the concurrency limit closed")?;
        let shared = shared.clone();
        tasks.spawn(async move {
            shared.counters.started.fetch_add(1, Ordering::Relaxed);
            let in_flight = shared.counters.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            shared.counters.max_in_flight.fetch_max(in_flight, Ordering::Relaxed);
            if let Err(error) = play(&shared, &spec).await {
                shared.error(format!("call #{}: {error:#}", spec.index));
            }
            shared.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            shared.counters.completed.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(progress) = progress {
        progress.abort();
    }
    if let Some(prober) = prober {
        prober.abort();
    }

    let counters = &shared.counters;
    let deliveries = counters.deliveries.load(Ordering::Relaxed);
    let reports = counters.reports.load(Ordering::Relaxed);
    let record = RunRecord {
        started_at: run_started_at,
        orgs: shared.orgs.clone(),
        expected: shared.expected.lock().map(|e| e.clone()).unwrap_or_default(),
    };
    if let Some(path) = &config.run_file {
        record.save(path)?;
    }
    let books = if config.check_books {
        Some(books::check_run(&shared.server, &record, config.database_url.as_deref(), config.usage_counter).await?)
    } else {
        None
    };
    let summary = Summary {
        calls_planned: config.traffic.calls,
        calls_started: counters.started.load(Ordering::Relaxed),
        calls_completed: counters.completed.load(Ordering::Relaxed),
        deliveries,
        reports,
        errors: counters.errors.load(Ordering::Relaxed),
        error_samples: shared.error_samples.lock().map(|s| s.clone()).unwrap_or_default(),
        elapsed_seconds: elapsed,
        deliveries_per_second: deliveries as f64 / elapsed.max(1e-9),
        steady_deliveries_per_second: shared.steady_rate(),
        reports_per_second: reports as f64 / elapsed.max(1e-9),
        max_in_flight: counters.max_in_flight.load(Ordering::Relaxed),
        latency: shared
            .latency
            .iter()
            .map(|(kind, recorder)| (kind.to_string(), recorder.summary()))
            .filter(|(_, summary)| summary.count > 0)
            .collect(),
        probe: config.probe.is_some().then(|| shared.probe.summary()),
        statuses: shared.answers.statuses(),
        status_total: shared.answers.total(),
        max_answer_ms: shared.answers.max_answer_ms(),
        unusable_answers: shared.answers.unusable_answers(),
        retry_budget_seconds: config.retry.budget.as_secs_f64(),
        books,
        hot_org,
    };
    if !config.quiet {
        print_summary(&summary);
    }
    Ok(summary)
}

/// Plays one call: renders each delivery, posts it, checks the answers that matter to VAPI.
async fn play(shared: &Shared, spec: &CallSpec) -> Result<()> {
    let config = &shared.config;
    let seed = config.traffic.seed;
    let org = &shared.orgs[spec.org];
    let owner =
        CallOwner { org_id: org.id.to_string(), org_name: org.name.clone(), assistant_id: org.assistant_id.clone() };
    let mut rng = item_rng(seed, stream::SCRIPT, spec.index as u64);
    // Call ids are new on every run (VAPI's recent ids are UUIDv7); the rest follows the seed.
    let script = CallScript::new(spec, Uuid::now_v7().to_string(), owner, Utc::now(), &mut rng);
    let mut delivery_rng = item_rng(seed, stream::DELIVERY, spec.index as u64);
    let order = deliveries(
        script.events.len(),
        config.traffic.duplicate_rate,
        config.traffic.out_of_order_rate,
        &mut delivery_rng,
    );
    if let Ok(mut expected) = shared.expected.lock() {
        expected.push(ExpectedCall {
            call_id: script.call_id.clone(),
            org_id: org.id,
            billable_seconds: spec.billable_seconds(),
        });
    }

    for (n, &index) in order.iter().enumerate() {
        if n > 0 && !config.event_gap.is_zero() {
            let jitter: f64 = delivery_rng.random_range(0.5..1.5);
            tokio::time::sleep(config.event_gap.mul_f64(jitter)).await;
        }
        let event = script.events[index];
        let body = script.render(event)?;
        let kind = event.kind();
        let delivery =
            shared.server.deliver(&org.url, &body, config.retry, |attempt| shared.answers.observe(kind, attempt)).await;
        shared.counters.deliveries.fetch_add(1, Ordering::Relaxed);
        shared.record_steady_delivery();
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(error) => {
                shared.error(format!("{} of call {}: {error}", event.kind(), script.call_id));
                continue;
            }
        };
        if event == EventSpec::EndOfCallReport {
            shared.counters.reports.fetch_add(1, Ordering::Relaxed);
        }
        if !delivery.status.is_success() {
            let text = String::from_utf8_lossy(&delivery.body);
            shared.error(format!("{} of call {} answered {}: {text}", event.kind(), script.call_id, delivery.status));
            continue;
        }
        shared.record_latency(event.kind(), delivery.elapsed);
        if let Err(problem) = check_answer(&script, event, &delivery.body) {
            shared.answers.unusable(kind);
            shared.error(format!("{kind} of call {}: {problem}", script.call_id));
        }
    }
    Ok(())
}

/// Checks the answers VAPI acts on: an admitted assistant with room for the whole call, and a
/// result (or error) for every tool call.
pub(crate) fn check_answer(script: &CallScript, event: EventSpec, body: &[u8]) -> Result<(), String> {
    let answer: Value = serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    match event {
        EventSpec::AssistantRequest => {
            if let Some(error) = answer.get("error") {
                return Err(format!("refused: {error}"));
            }
            if answer.get("assistantId").and_then(Value::as_str).is_none() {
                return Err(format!("no assistantId in {answer}"));
            }
            let max = answer.pointer("/assistantOverrides/maxDurationSeconds").and_then(Value::as_f64);
            match max {
                Some(max) if max < script.duration_seconds() => {
                    Err(format!("maxDurationSeconds {max} is shorter than the call ({}s)", script.duration_seconds()))
                }
                _ => Ok(()),
            }
        }
        EventSpec::ToolCalls(index) => {
            let wanted: Vec<&str> = script.tool_calls_at(index).iter().map(|c| c.id.as_str()).collect();
            let results = answer.get("results").and_then(Value::as_array).cloned().unwrap_or_default();
            let answered: Vec<&str> =
                results.iter().filter_map(|r| r.get("toolCallId").and_then(Value::as_str)).collect();
            if answered != wanted {
                return Err(format!("answered tool calls {answered:?}, asked {wanted:?}"));
            }
            match results.iter().find(|r| r.get("error").is_some()) {
                Some(failed) => Err(format!("a tool call failed: {failed}")),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// GETs `path` on the server `rate` times a second until aborted, each request in a task of
/// its own so a slow answer never delays the next, and times those sent and answered (2xx)
/// while the steady state holds: what a request that does no work waits under the same load.
async fn probe(shared: Arc<Shared>, path: String, rate: f64) {
    let url = format!("{}{path}", shared.server.base);
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let (shared, url) = (shared.clone(), url.clone());
        tokio::spawn(async move {
            let steady = shared.steady();
            let sent = Instant::now();
            let answered = match shared.server.http().get(&url).send().await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            if steady && answered && shared.steady() {
                shared.probe.record(sent.elapsed());
            }
        });
    }
}

/// Prints a line every second: calls done, deliveries per second, errors.
async fn progress(shared: Arc<Shared>, planned: usize, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let c = &shared.counters;
        let deliveries = c.deliveries.load(Ordering::Relaxed);
        let answers = shared.answers.total();
        eprintln!(
            "loadgen: {:>4}s  calls {}/{} done, {} in flight  events {} ({}/s)  reports {}  errors {}  \
             503 {}  5xx {}  refused/reset {}",
            started.elapsed().as_secs(),
            c.completed.load(Ordering::Relaxed),
            planned,
            c.in_flight.load(Ordering::Relaxed),
            deliveries,
            deliveries - last,
            c.reports.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
            answers.status_503,
            answers.other_5xx,
            answers.connection_errors,
        );
        last = deliveries;
    }
}

fn print_summary(summary: &Summary) {
    eprintln!(
        "loadgen: {} calls in {:.1}s: {} events ({:.0}/s), {} end-of-call reports ({:.1}/s), peak {} in flight, {} errors",
        summary.calls_completed,
        summary.elapsed_seconds,
        summary.deliveries,
        summary.deliveries_per_second,
        summary.reports,
        summary.reports_per_second,
        summary.max_in_flight,
        summary.errors
    );
    if summary.steady_deliveries_per_second > 0.0 {
        eprintln!("loadgen:   steady state: {:.0} events/s", summary.steady_deliveries_per_second);
    }
    for (kind, latency) in &summary.latency {
        eprintln!("loadgen:   {kind:<20} {}", latency.line());
    }
    if let Some(probe) = &summary.probe {
        eprintln!("loadgen:   {:<20} {}", "probe (no work)", probe.line());
    }
    print_outcomes(&summary.status_total, &summary.max_answer_ms, &summary.error_samples, summary.books.as_ref());
}

/// The end of a run's printout, shared by `simulate` and `burst`: answers by class, the
/// slowest answer per kind, sample errors and the books.
pub fn print_outcomes(
    status: &StatusCounts,
    max_answer_ms: &BTreeMap<String, f64>,
    error_samples: &[String],
    books: Option<&Books>,
) {
    eprintln!("loadgen:   answers: {}", status.line());
    for (kind, ms) in max_answer_ms {
        eprintln!("loadgen:   slowest {kind:<20} {ms:.1}ms");
    }
    for sample in error_samples {
        eprintln!("loadgen:   error: {sample}");
    }
    if let Some(books) = books {
        eprintln!("loadgen: {}", books.line());
        for problem in &books.problems {
            eprintln!("loadgen:   {problem}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Lifecycle;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn script() -> CallScript {
        let spec = CallSpec {
            index: 0,
            org: 0,
            duration_ms: 120_500,
            ended_reason: "customer-ended-call",
            turns: 10,
            tool_calls: 1,
            lifecycle: Lifecycle::Full,
        };
        let owner = CallOwner { org_id: "o".into(), org_name: "Org".into(), assistant_id: "a".into() };
        CallScript::new(&spec, "call-1".into(), owner, Utc::now(), &mut StdRng::seed_from_u64(1))
    }

    #[test]
    fn assistant_answers_are_checked() {
        let script = script();
        let ok = br#"{"assistantId":"a","assistantOverrides":{"maxDurationSeconds":3600}}"#;
        assert!(check_answer(&script, EventSpec::AssistantRequest, ok).is_ok());
        let short = br#"{"assistantId":"a","assistantOverrides":{"maxDurationSeconds":60}}"#;
        assert!(check_answer(&script, EventSpec::AssistantRequest, short).unwrap_err().contains("shorter"));
        let refused = br#"{"error":"Sorry, this line has no call minutes left this month."}"#;
        assert!(check_answer(&script, EventSpec::AssistantRequest, refused).unwrap_err().contains("refused"));
        assert!(check_answer(&script, EventSpec::AssistantRequest, b"nope").is_err());
    }

    #[test]
    fn tool_call_answers_must_cover_every_call() {
        let script = script();
        let index = script.events.iter().find_map(|e| if let EventSpec::ToolCalls(i) = e { Some(*i) } else { None });
        let index = index.expect("the script has a tool call");
        let ids: Vec<String> = script.tool_calls_at(index).iter().map(|c| c.id.clone()).collect();
        let results: Vec<Value> = ids.iter().map(|id| json!({ "toolCallId": id, "result": "ok" })).collect();
        let answer = json!({ "results": results }).to_string();
        assert!(check_answer(&script, EventSpec::ToolCalls(index), answer.as_bytes()).is_ok());
        let missing = json!({ "results": [] }).to_string();
        assert!(check_answer(&script, EventSpec::ToolCalls(index), missing.as_bytes()).is_err());
        let failed: Vec<Value> = ids.iter().map(|id| json!({ "toolCallId": id, "error": "no data" })).collect();
        let failed = json!({ "results": failed }).to_string();
        assert!(check_answer(&script, EventSpec::ToolCalls(index), failed.as_bytes()).unwrap_err().contains("failed"));
    }
}
