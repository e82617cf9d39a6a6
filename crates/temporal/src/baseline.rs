//! Temporal's own limit on this machine, for benchmark 7: the call workflow's shape with
//! nothing in it. Each "event" is a signal-with-start of a new workflow carrying the same
//! payload as a report, three local activities that do nothing (`apply`, `count`, `finish`,
//! with the call workflow's options), then completion. No database, no HTTP: what is left is
//! the SDK, the worker and the Temporal server, the part of the Temporal pipeline callplane
//! cannot make faster.

use crate::pipeline::{connect, start_options};
use crate::worker::{Register, spawn};
use crate::workflow::{CallRef, step_options};
use crate::{TemporalSettings, workflow_id};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use temporalio_macros::{activities, workflow, workflow_methods};
use temporalio_sdk::activities::{ActivityContext, ActivityError};
use temporalio_sdk::{SyncWorkflowContext, WorkflowContext, WorkflowResult};

/// One event: when it was handed over, and a body as large as a report's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Probe {
    pub sent_at: DateTime<Utc>,
    pub message: Value,
}

#[workflow]
#[derive(Default)]
pub struct NoopWorkflow {
    probe: Option<Probe>,
}

#[workflow_methods]
impl NoopWorkflow {
    #[run]
    pub async fn run(ctx: &mut WorkflowContext<Self>, _call: CallRef) -> WorkflowResult<u32> {
        ctx.wait_condition(|s| s.probe.is_some()).await?;
        let Some(probe) = ctx.state_mut(|s| s.probe.take()) else { return Ok(0) };
        ctx.execute_local_activity(NoopActivities::apply, probe.clone(), step_options()).await?;
        ctx.execute_local_activity(NoopActivities::count, probe.sent_at, step_options()).await?;
        ctx.execute_local_activity(NoopActivities::finish, probe.sent_at, step_options()).await?;
        Ok(1)
    }

    #[signal]
    pub fn event(&mut self, _ctx: &mut SyncWorkflowContext<Self>, probe: Probe) {
        self.probe = Some(probe);
    }
}

/// What the workflows finished, and how long each took from its hand-over.
#[derive(Default)]
struct Tally {
    finished: AtomicU64,
    latencies_ms: Mutex<Vec<f64>>,
}

#[derive(Clone)]
pub struct NoopActivities {
    tally: Arc<Tally>,
}

#[activities]
impl NoopActivities {
    #[activity]
    pub async fn apply(self: Arc<Self>, _ctx: ActivityContext, probe: Probe) -> Result<bool, ActivityError> {
        Ok(probe.message.is_object())
    }

    #[activity]
    pub async fn count(self: Arc<Self>, _ctx: ActivityContext, _sent_at: DateTime<Utc>) -> Result<bool, ActivityError> {
        Ok(true)
    }

    #[activity]
    pub async fn finish(self: Arc<Self>, _ctx: ActivityContext, sent_at: DateTime<Utc>) -> Result<bool, ActivityError> {
        let took = (Utc::now() - sent_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0;
        if let Ok(mut l) = self.tally.latencies_ms.lock() {
            l.push(took);
        }
        self.tally.finished.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

impl std::fmt::Debug for NoopActivities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoopActivities")
    }
}

/// How hard to drive the baseline.
#[derive(Clone, Debug)]
pub struct BaselineConfig {
    /// Hand-overs in flight at once (benchmark 7's clients).
    pub clients: usize,
    /// How long to hand over new workflows.
    pub duration: Duration,
    /// How long the worker may take to finish them afterwards.
    pub settle_timeout: Duration,
    /// Each probe's body (the `message` of a report).
    pub message: Value,
}

/// The baseline's figures, in benchmark 7's terms.
#[derive(Clone, Debug, Serialize)]
pub struct BaselineFigures {
    pub handed_over: u64,
    pub failed_handovers: u64,
    pub finished: u64,
    pub accepted_per_second: f64,
    pub seconds_until_finished: f64,
    pub finished_per_second: f64,
    pub handover_to_finish_p50_ms: Option<f64>,
    pub handover_to_finish_p99_ms: Option<f64>,
}

/// Runs the baseline on `settings.task_queue` (its own queue: nothing else may poll it) with a
/// worker in this process, tuned as callplane's. Progress goes to stderr.
pub async fn run_baseline(settings: TemporalSettings, config: BaselineConfig) -> anyhow::Result<BaselineFigures> {
    let tally = Arc::new(Tally::default());
    let activities = NoopActivities { tally: tally.clone() };
    let register: Register =
        Box::new(move |o| Ok(o.register_workflow::<NoopWorkflow>()?.register_activities(activities.clone())));
    let worker = spawn(settings.clone(), register)?;
    let client = connect(&settings).await?;
    let org = callplane_core::OrgId::new();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (handed, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..config.clients.max(1) {
        let (client, settings, config, run) = (client.clone(), settings.clone(), config.clone(), run.clone());
        let (handed, failed) = (handed.clone(), failed.clone());
        clients.spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < config.duration {
                let call_id = format!("baseline-{run}-{c}-{n}");
                n += 1;
                let options = start_options(&settings.task_queue, workflow_id(org, &call_id));
                let call = CallRef { org_id: org.to_string(), call_id };
                let probe = Probe { sent_at: Utc::now(), message: config.message.clone() };
                match client
                    .signal_with_start_workflow(NoopWorkflow::run, call, NoopWorkflow::event, probe, options)
                    .await
                {
                    Ok(_) => handed.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    let mut last = Instant::now();
    loop {
        tokio::select! {
            next = clients.join_next() => if next.is_none() { break },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                eprintln!("baseline: {} handed over, {} finished", handed.load(Ordering::Relaxed), finished(&tally));
            }
        }
    }
    let handed_over = handed.load(Ordering::Relaxed);
    let accepted_per_second = handed_over as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "baseline: {handed_over} handed over ({accepted_per_second:.1}/s); waiting for the worker to finish them"
    );
    let settle = Instant::now();
    while finished(&tally) < handed_over && settle.elapsed() < config.settle_timeout {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if last.elapsed() >= Duration::from_secs(5) {
            eprintln!("baseline: {} of {handed_over} finished", finished(&tally));
            last = Instant::now();
        }
    }
    let seconds_until_finished = started.elapsed().as_secs_f64();
    worker.stop().await;
    let mut latencies = tally.latencies_ms.lock().map(|l| l.clone()).unwrap_or_default();
    latencies.sort_by(f64::total_cmp);
    let quantile =
        |q: f64| (!latencies.is_empty()).then(|| latencies[((latencies.len() - 1) as f64 * q).round() as usize]);
    let done = finished(&tally);
    Ok(BaselineFigures {
        handed_over,
        failed_handovers: failed.load(Ordering::Relaxed),
        finished: done,
        accepted_per_second,
        seconds_until_finished,
        finished_per_second: done as f64 / seconds_until_finished,
        handover_to_finish_p50_ms: quantile(0.5),
        handover_to_finish_p99_ms: quantile(0.99),
    })
}

fn finished(tally: &Tally) -> u64 {
    tally.finished.load(Ordering::Relaxed)
}
