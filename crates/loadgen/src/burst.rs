//! `burst`: many webhooks at the same instant, in the middle of real call lifecycles.
//!
//! A burst of `--requests` concurrent deliveries is made of distinct calls' messages: a quarter
//! are `assistant-request`s of calls starting, a quarter `end-of-call-report`s of calls ending,
//! and the rest the messages in between of other calls (status updates, transcripts,
//! conversation updates, tool calls), a few consecutive ones per call. Each call's messages
//! before its part of the burst are played first (a few calls at a time), then every burst
//! request is opened at once, then each call's remaining messages are played, so every call is
//! complete and the books can be checked like a simulation's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::books::{self, Books, CounterStore, ExpectedCall, RunRecord};
use crate::client::{Delivery, DeliveryError, RetryPolicy, Server};
use crate::messages::{CallOwner, CallScript, EventSpec};
use crate::plan::{TrafficConfig, TrafficPlan, stream};
use crate::random::item_rng;
use crate::simulate::{Org, check_answer, create_orgs};
use crate::stats::{AnswerTally, LatencySummary, Recorder, StatusCounts};

/// At most this many consecutive messages of one call go into the burst.
const MIDDLE_CHUNK: usize = 4;

/// How the burst runs.
#[derive(Clone, Debug)]
pub struct BurstConfig {
    /// Organizations, plans, durations, turns and the seed; duplicates and reordering are not
    /// used (the burst's requests are distinct by construction).
    pub traffic: TrafficConfig,
    /// Requests opened at once.
    pub requests: usize,
    /// Calls played at once before and after the burst.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub database_url: Option<String>,
    /// Where the server counts usage, for the books.
    pub usage_counter: CounterStore,
    pub check_books: bool,
    pub run_file: Option<PathBuf>,
    pub label: String,
    pub quiet: bool,
}

/// What a call contributes to the burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Its `assistant-request`.
    Starting,
    /// Its `end-of-call-report`.
    Ending,
    /// Up to this many consecutive messages between the two.
    Middle(usize),
}

/// A call's messages (indices into its events), split around the burst.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub before: Vec<usize>,
    pub burst: Vec<usize>,
    pub after: Vec<usize>,
}

/// Splits a call's lifecycle (`events`, in VAPI's order: the assistant request first, the
/// end-of-call report last) by its role in the burst.
pub fn split(events: &[EventSpec], role: Role) -> Split {
    let n = events.len();
    let all: Vec<usize> = (0..n).collect();
    if n == 0 {
        return Split::default();
    }
    match role {
        Role::Starting => Split { before: Vec::new(), burst: vec![0], after: all[1..].to_vec() },
        Role::Ending => Split { before: all[..n - 1].to_vec(), burst: vec![n - 1], after: Vec::new() },
        Role::Middle(most) => {
            // The messages strictly between the first and the last, a chunk from their middle.
            let inner = n.saturating_sub(2);
            let take = most.min(inner);
            let start = 1 + (inner - take) / 2;
            Split {
                before: all[..start].to_vec(),
                burst: all[start..start + take].to_vec(),
                after: all[start + take..].to_vec(),
            }
        }
    }
}

/// How many burst requests of each role: a quarter starting calls, a quarter ending ones, the
/// rest in between.
pub fn mix(requests: usize) -> (usize, usize, usize) {
    let starting = requests / 4;
    let ending = requests / 4;
    (starting, ending, requests - starting - ending)
}

/// What the burst did, printed as JSON with `--json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BurstSummary {
    pub requests: usize,
    pub calls: usize,
    /// Burst requests by message kind.
    pub mix: BTreeMap<String, usize>,
    /// From releasing the burst to its last answer.
    pub burst_seconds: f64,
    /// The burst's own attempts (retries included) and latencies, by kind.
    pub burst_statuses: BTreeMap<String, StatusCounts>,
    pub burst_latency: BTreeMap<String, LatencySummary>,
    /// Every phase: deliveries, end-of-call reports, attempts by kind and class, the slowest
    /// answer of each kind.
    pub deliveries: u64,
    pub reports: u64,
    pub statuses: BTreeMap<String, StatusCounts>,
    pub status_total: StatusCounts,
    pub max_answer_ms: BTreeMap<String, f64>,
    /// 2xx answers VAPI could not use, by kind (each also counts in `errors`).
    pub unusable_answers: BTreeMap<String, u64>,
    pub retry_budget_seconds: f64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub elapsed_seconds: f64,
    pub books: Option<Books>,
}

/// One call of the burst.
struct BurstCall {
    script: CallScript,
    org_id: Uuid,
    url: String,
    billable_seconds: i64,
    split: Split,
}

/// What every phase records.
#[derive(Default)]
struct Tallies {
    answers: AnswerTally,
    deliveries: std::sync::atomic::AtomicU64,
    reports: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    error_samples: Mutex<Vec<String>>,
}

impl Tallies {
    fn error(&self, text: String) {
        self.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut samples) = self.error_samples.lock()
            && samples.len() < 10
        {
            samples.push(text);
        }
    }

    /// Counts a finished delivery and checks its answer.
    fn finish(&self, call: &BurstCall, event: EventSpec, result: &Result<Delivery, DeliveryError>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.deliveries.fetch_add(1, Relaxed);
        let id = &call.script.call_id;
        match result {
            Err(error) => self.error(format!("{} of call {id}: {error}", event.kind())),
            Ok(delivery) => {
                if event == EventSpec::EndOfCallReport {
                    self.reports.fetch_add(1, Relaxed);
                }
                if !delivery.status.is_success() {
                    let text = String::from_utf8_lossy(&delivery.body);
                    self.error(format!("{} of call {id} answered {}: {text}", event.kind(), delivery.status));
                } else if let Err(problem) = check_answer(&call.script, event, &delivery.body) {
                    self.answers.unusable(event.kind());
                    self.error(format!("{} of call {id}: {problem}", event.kind()));
                }
            }
        }
    }
}

/// Runs the burst with organizations created for it.
pub async fn run(server: Server, config: BurstConfig) -> Result<BurstSummary> {
    if config.requests == 0 {
        bail!("a burst needs at least one request");
    }
    let started = Instant::now();
    let run_started_at = Utc::now() - chrono::Duration::seconds(1);
    let (starting, ending, middle) = mix(config.requests);
    // Enough calls for any split: a middle call takes at least one request.
    let traffic = TrafficConfig {
        calls: starting + ending + middle,
        duplicate_rate: 0.0,
        out_of_order_rate: 0.0,
        ..config.traffic.clone()
    };
    let plan = TrafficPlan::new(&traffic)?;
    let orgs = create_orgs(&server, &plan.org_plans, &config.label, config.quiet).await?;
    let calls = build_calls(&plan, &orgs, &traffic, (starting, ending, middle));
    let burst_requests: usize = calls.iter().map(|c| c.split.burst.len()).sum();
    if burst_requests != config.requests {
        bail!("planned {burst_requests} burst requests instead of {}", config.requests);
    }
    let mut mix: BTreeMap<String, usize> = BTreeMap::new();
    for call in &calls {
        for &i in &call.split.burst {
            *mix.entry(call.script.events[i].kind().to_string()).or_default() += 1;
        }
    }
    if !config.quiet {
        let parts: Vec<String> = mix.iter().map(|(k, n)| format!("{n} {k}")).collect();
        eprintln!("loadgen: {} calls; the burst: {}", calls.len(), parts.join(", "));
    }
    let calls: Arc<Vec<BurstCall>> = Arc::new(calls);
    let tallies = Arc::new(Tallies::default());

    // Before: each call's messages up to its part of the burst.
    phase(&server, &calls, &tallies, &config, "before the burst", |c| &c.split.before).await;

    // The burst: every request rendered, then all released at once.
    let burst_tally = Arc::new(AnswerTally::default());
    let latency: Arc<BTreeMap<&'static str, Recorder>> =
        Arc::new(crate::simulate::KINDS.iter().map(|k| (*k, Recorder::default())).collect());
    let barrier = Arc::new(Barrier::new(config.requests + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for (c, call) in calls.iter().enumerate() {
        for &i in &call.split.burst {
            let event = call.script.events[i];
            let body = call.script.render(event)?;
            let (server, calls, tallies, burst_tally, latency, barrier) =
                (server.clone(), calls.clone(), tallies.clone(), burst_tally.clone(), latency.clone(), barrier.clone());
            let retry = config.retry;
            tasks.spawn(async move {
                let call = &calls[c];
                let kind = event.kind();
                barrier.wait().await;
                let result = server
                    .deliver(&call.url, &body, retry, |attempt| {
                        tallies.answers.observe(kind, attempt);
                        burst_tally.observe(kind, attempt);
                    })
                    .await;
                if let (Ok(delivery), Some(recorder)) = (&result, latency.get(kind))
                    && delivery.status.is_success()
                {
                    recorder.record(delivery.elapsed);
                }
                tallies.finish(call, event, &result);
            });
        }
    }
    if !config.quiet {
        eprintln!("loadgen: releasing {} requests at once", config.requests);
    }
    barrier.wait().await;
    let burst_started = Instant::now();
    while tasks.join_next().await.is_some() {}
    let burst_seconds = burst_started.elapsed().as_secs_f64();
    if !config.quiet {
        eprintln!("loadgen: the burst took {burst_seconds:.2}s: {}", burst_tally.total().line());
    }

    // After: the rest of every call.
    phase(&server, &calls, &tallies, &config, "after the burst", |c| &c.split.after).await;

    let record = RunRecord {
        started_at: run_started_at,
        orgs,
        expected: calls
            .iter()
            .map(|c| ExpectedCall {
                call_id: c.script.call_id.clone(),
                org_id: c.org_id,
                billable_seconds: c.billable_seconds,
            })
            .collect(),
    };
    if let Some(path) = &config.run_file {
        record.save(path)?;
    }
    let books = if config.check_books {
        Some(books::check_run(&server, &record, config.database_url.as_deref(), config.usage_counter).await?)
    } else {
        None
    };
    use std::sync::atomic::Ordering::Relaxed;
    let summary = BurstSummary {
        requests: config.requests,
        calls: calls.len(),
        mix,
        burst_seconds,
        burst_statuses: burst_tally.statuses(),
        burst_latency: latency
            .iter()
            .map(|(kind, recorder)| (kind.to_string(), recorder.summary()))
            .filter(|(_, summary)| summary.count > 0)
            .collect(),
        deliveries: tallies.deliveries.load(Relaxed),
        reports: tallies.reports.load(Relaxed),
        statuses: tallies.answers.statuses(),
        status_total: tallies.answers.total(),
        max_answer_ms: tallies.answers.max_answer_ms(),
        unusable_answers: tallies.answers.unusable_answers(),
        retry_budget_seconds: config.retry.budget.as_secs_f64(),
        errors: tallies.errors.load(Relaxed),
        error_samples: tallies.error_samples.lock().map(|s| s.clone()).unwrap_or_default(),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        books,
    };
    if !config.quiet {
        print_summary(&summary);
    }
    Ok(summary)
}

/// Builds the calls, in plan order, giving each its role until the burst is full.
fn build_calls(
    plan: &TrafficPlan,
    orgs: &[Org],
    traffic: &TrafficConfig,
    (starting, ending, middle): (usize, usize, usize),
) -> Vec<BurstCall> {
    let mut calls = Vec::new();
    let mut middle_left = middle;
    for (i, spec) in plan.calls.iter().enumerate() {
        let role = if i < starting {
            Role::Starting
        } else if i < starting + ending {
            Role::Ending
        } else if middle_left > 0 {
            Role::Middle(MIDDLE_CHUNK.min(middle_left))
        } else {
            break;
        };
        let org = &orgs[spec.org];
        let owner = CallOwner {
            org_id: org.id.to_string(),
            org_name: org.name.clone(),
            assistant_id: org.assistant_id.clone(),
        };
        let mut rng = item_rng(traffic.seed, stream::SCRIPT, spec.index as u64);
        let script = CallScript::new(spec, Uuid::now_v7().to_string(), owner, Utc::now(), &mut rng);
        let split = split(&script.events, role);
        if let Role::Middle(_) = role {
            middle_left -= split.burst.len();
        }
        calls.push(BurstCall {
            script,
            org_id: org.id,
            url: org.url.clone(),
            billable_seconds: spec.billable_seconds(),
            split,
        });
    }
    calls
}

/// Plays, for every call, the messages `part` picks, in order, `concurrency` calls at a time.
async fn phase(
    server: &Server,
    calls: &Arc<Vec<BurstCall>>,
    tallies: &Arc<Tallies>,
    config: &BurstConfig,
    name: &str,
    part: fn(&BurstCall) -> &Vec<usize>,
) {
    let started = Instant::now();
    let total: usize = calls.iter().map(|c| part(c).len()).sum();
    if total == 0 {
        return;
    }
    if !config.quiet {
        eprintln!("loadgen: {name}: {total} messages");
    }
    let progress = (!config.quiet).then(|| {
        let tallies = tallies.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let answers = tallies.answers.total();
                eprintln!(
                    "loadgen: {:>4}s  {name}: events {}  errors {}  503 {}  5xx {}  refused/reset {}",
                    started.elapsed().as_secs(),
                    tallies.deliveries.load(std::sync::atomic::Ordering::Relaxed),
                    tallies.errors.load(std::sync::atomic::Ordering::Relaxed),
                    answers.status_503,
                    answers.other_5xx,
                    answers.connection_errors
                );
            }
        })
    });
    futures::stream::iter(0..calls.len())
        .map(|c| {
            let (calls, tallies) = (calls.clone(), tallies.clone());
            async move {
                let call = &calls[c];
                for &i in part(call) {
                    let event = call.script.events[i];
                    let kind = event.kind();
                    let body = match call.script.render(event) {
                        Ok(body) => body,
                        Err(error) => {
                            tallies.error(format!("rendering {kind}: {error:#}"));
                            continue;
                        }
                    };
                    let result =
                        server.deliver(&call.url, &body, config.retry, |a| tallies.answers.observe(kind, a)).await;
                    tallies.finish(call, event, &result);
                }
            }
        })
        .buffer_unordered(config.concurrency.max(1))
        .collect::<Vec<()>>()
        .await;
    if let Some(progress) = progress {
        progress.abort();
    }
}

fn print_summary(summary: &BurstSummary) {
    eprintln!(
        "loadgen: {} burst requests over {} calls in {:.2}s; {} deliveries in all, {} end-of-call reports, {} errors",
        summary.requests, summary.calls, summary.burst_seconds, summary.deliveries, summary.reports, summary.errors
    );
    for (kind, latency) in &summary.burst_latency {
        eprintln!("loadgen:   burst {kind:<20} {}", latency.line());
    }
    crate::simulate::print_outcomes(
        &summary.status_total,
        &summary.max_answer_ms,
        &summary.error_samples,
        summary.books.as_ref(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifecycle(middle: usize) -> Vec<EventSpec> {
        let mut events = vec![EventSpec::AssistantRequest];
        events.extend((0..middle).map(EventSpec::Transcript));
        events.push(EventSpec::EndOfCallReport);
        events
    }

    #[test]
    fn every_message_is_sent_once_whatever_the_role() {
        for middle in [0, 1, 3, 10] {
            let events = lifecycle(middle);
            for role in [Role::Starting, Role::Ending, Role::Middle(4), Role::Middle(1)] {
                let s = split(&events, role);
                let all: Vec<usize> = s.before.iter().chain(&s.burst).chain(&s.after).copied().collect();
                assert_eq!(all, (0..events.len()).collect::<Vec<_>>(), "{middle} {role:?}");
            }
        }
    }

    #[test]
    fn roles_pick_their_part_of_the_lifecycle() {
        let events = lifecycle(10);
        let starting = split(&events, Role::Starting);
        assert_eq!((starting.before.len(), starting.burst.clone(), starting.after.len()), (0, vec![0], 11));
        let ending = split(&events, Role::Ending);
        assert_eq!((ending.before.len(), ending.burst.clone(), ending.after.len()), (11, vec![11], 0));
        // Four from the middle of the ten in between, never the first or the last message.
        let middle = split(&events, Role::Middle(4));
        assert_eq!(middle.burst, vec![4, 5, 6, 7]);
        let short = split(&lifecycle(2), Role::Middle(4));
        assert_eq!(short.burst, vec![1, 2]);
        assert!(split(&lifecycle(0), Role::Middle(4)).burst.is_empty());
        assert_eq!(split(&[], Role::Starting), Split::default());
    }

    #[test]
    fn the_mix_adds_up() {
        assert_eq!(mix(2000), (500, 500, 1000));
        assert_eq!(mix(301), (75, 75, 151));
        assert_eq!(mix(1), (0, 0, 1));
    }
}
