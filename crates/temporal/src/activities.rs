//! The processor's steps as Temporal activities. Each runs its work on the process's runtime
//! (where the database pool lives), reports retryable failures to Temporal, and keeps what
//! retrying cannot fix as a dead letter, as the inline pipeline does.

use crate::stats::TemporalStats;
use crate::workflow::Envelope;
use callplane_core::domain::{CallChange, UsageAlert};
use callplane_core::seams::{InboundEvent, PipelineError, Processed};
use callplane_core::vapi::parse_message;
use callplane_core::{OrgId, error_chain};
use callplane_workflow::{DeadLetters, Failure, ProcessingStats, Processor};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::{ActivityContext, ActivityError};
use tokio::sync::oneshot;

/// What `apply` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Applied {
    /// Nothing more to do for this event (nothing applied, or kept as a dead letter).
    Done,
    /// The change committed; `count` and `finish` say which steps follow.
    Changed { change: CallChange, count: bool, finish: bool },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CountStep {
    pub key: uuid::Uuid,
    pub org_id: OrgId,
    pub change: CallChange,
    /// Whether `finish` follows even without alerts.
    pub finish: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinishStep {
    pub event: Envelope,
    pub change: CallChange,
    pub alerts: Vec<UsageAlert>,
}

/// The outcome of an event, for a request in this process waiting for it.
pub type Outcome = Result<Processed, PipelineError>;

/// Requests waiting for their event's outcome, by hand-over key.
#[derive(Clone, Default)]
pub struct Waiters(Arc<Mutex<HashMap<uuid::Uuid, oneshot::Sender<Outcome>>>>);

impl Waiters {
    pub fn wait(&self, key: uuid::Uuid) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, tx);
        }
        rx
    }

    pub fn forget(&self, key: &uuid::Uuid) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(key);
        }
    }

    fn tell(&self, key: &uuid::Uuid, outcome: Outcome) {
        let waiter = self.0.lock().ok().and_then(|mut m| m.remove(key));
        if let Some(tx) = waiter {
            let _ = tx.send(outcome);
        }
    }
}

/// Attempts at an event whose processing panics before it is kept as a dead letter.
const PANICS_BEFORE_DEAD_LETTER: u32 = 3;

#[derive(Clone)]
pub struct CallActivities {
    pub processor: Processor,
    pub dead_letters: DeadLetters,
    pub waiters: Waiters,
    pub stats: Arc<TemporalStats>,
    pub processing: Arc<ProcessingStats>,
    /// The process's runtime: the activities' work runs there.
    pub runtime: tokio::runtime::Handle,
}

/// A failure Temporal retries with backoff.
fn retry(why: String) -> ActivityError {
    ApplicationFailure::new(why).into()
}

impl CallActivities {
    /// Notes the attempt, then runs `work` on the process's runtime. A panic is a failed
    /// attempt; after a few, the step gives up with `on_give_up`: the event is kept as a dead
    /// letter (`event`), or the step is left to a repair loop (`None`: counting).
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        ctx: &ActivityContext,
        event: Option<&Envelope>,
        work: impl Future<Output = Result<T, String>> + Send + 'static,
        on_give_up: T,
    ) -> Result<T, ActivityError> {
        let info = ctx.info();
        let waited = match (info.current_attempt_scheduled_time, info.started_time) {
            (Some(scheduled), Some(started)) => started.duration_since(scheduled).ok(),
            _ => None,
        };
        self.stats.activity_started(info.attempt, waited);
        let attempt = info.attempt;
        let result = match self.runtime.spawn(work).await {
            Ok(result) => result,
            Err(join) if join.is_panic() && attempt >= PANICS_BEFORE_DEAD_LETTER => {
                let why = format!("processing panicked {attempt} times (see the log)");
                if let Some(event) = event {
                    self.give_up(event, &why).await.map_err(retry)?;
                }
                return Ok(on_give_up);
            }
            Err(join) => Err(format!("processing stopped: {join}")),
        };
        result.map_err(|why| {
            crate::stats::bump(&self.stats.activity_failures);
            retry(why)
        })
    }

    /// Keeps an event that keeps failing as a dead letter, and tells a waiting request.
    async fn give_up(&self, event: &Envelope, why: &str) -> Result<(), String> {
        let body = json!({ "message": event.message });
        let id = self
            .dead_letters
            .keep_unprocessed(Some(event.org_id), &body, None, "processing_failed", why, event.received_at)
            .await
            .map_err(|e| error_chain(&e))?;
        let outcome = Err(PipelineError::DeadLettered { dead_letter_id: id, source: why.to_owned().into() });
        self.processing.record(&outcome);
        self.waiters.tell(&event.key, outcome);
        Ok(())
    }

    /// A step's failure: kept as a dead letter when retrying cannot fix it (the waiting request
    /// is told), else an error for Temporal to retry.
    async fn failed(&self, event: &InboundEvent, key: &uuid::Uuid, failure: Failure) -> Result<Applied, String> {
        match self.dead_letters.fail(event, failure).await {
            e @ (PipelineError::Unavailable(_) | PipelineError::Lost(_)) => Err(error_chain(&e)),
            e => {
                let outcome = Err(e);
                self.processing.record(&outcome);
                self.waiters.tell(key, outcome);
                Ok(Applied::Done)
            }
        }
    }

    fn done(&self, key: &uuid::Uuid, processed: Processed) {
        let outcome = Ok(processed);
        self.processing.record(&outcome);
        self.waiters.tell(key, outcome);
    }
}

/// The event as the processor takes it; `None` when the message cannot be read (kept as a
/// dead letter by the caller).
fn inbound(event: &Envelope) -> Result<InboundEvent, callplane_core::vapi::ParseError> {
    let message = parse_message(event.message.clone())?;
    Ok(InboundEvent { org_id: event.org_id, received_at: event.received_at, message })
}

#[activities]
impl CallActivities {
    /// Step 1: the call, its ledger row, transcript and realtime events, in one transaction.
    #[activity]
    pub async fn apply(self: Arc<Self>, ctx: ActivityContext, event: Envelope) -> Result<Applied, ActivityError> {
        let this = self.clone();
        let ev = event.clone();
        let work = async move {
            let inbound = match inbound(&ev) {
                Ok(inbound) => inbound,
                Err(e) => {
                    this.give_up(&ev, &format!("the message cannot be read: {e}")).await?;
                    return Ok(Applied::Done);
                }
            };
            match this.processor.apply(&inbound).await {
                Ok(None) => {
                    this.done(&ev.key, Processed::Ignored);
                    Ok(Applied::Done)
                }
                Ok(Some(change)) => {
                    let count = Processor::counts(&change);
                    let finish = this.processor.finishes(&inbound, false);
                    if !count && !finish {
                        this.done(&ev.key, Processor::outcome(&change));
                    }
                    Ok(Applied::Changed { change, count, finish })
                }
                Err(failure) => this.failed(&inbound, &ev.key, failure).await,
            }
        };
        self.run(&ctx, Some(&event), work, Applied::Done).await
    }

    /// Step 2: the seconds billed added to the usage counter; returns the alerts reached. Never
    /// fails: a counter that does not answer leaves the call to the repair loop.
    #[activity]
    pub async fn count(
        self: Arc<Self>,
        ctx: ActivityContext,
        step: CountStep,
    ) -> Result<Vec<UsageAlert>, ActivityError> {
        let this = self.clone();
        let work = async move {
            let alerts = this.processor.count(step.org_id, &step.change).await;
            if !step.finish && alerts.is_empty() {
                this.done(&step.key, Processor::outcome(&step.change));
            }
            Ok(alerts)
        };
        // Given up, the ledger row stays uncounted and the repair loop counts it.
        self.run(&ctx, None, work, Vec::new()).await
    }

    /// Step 3: a transcript kept outside the database, and what is published after commit.
    #[activity]
    pub async fn finish(self: Arc<Self>, ctx: ActivityContext, step: FinishStep) -> Result<(), ActivityError> {
        let this = self.clone();
        let event = step.event.clone();
        let work = async move {
            let FinishStep { event, mut change, alerts } = step;
            let inbound = inbound(&event).map_err(|e| e.to_string())?;
            match this.processor.finish(&inbound, &mut change, &alerts).await {
                Ok(()) => this.done(&event.key, Processor::outcome(&change)),
                Err(failure) => {
                    this.failed(&inbound, &event.key, failure).await?;
                }
            }
            Ok(())
        };
        self.run(&ctx, Some(&event), work, ()).await
    }
}

impl std::fmt::Debug for CallActivities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallActivities")
    }
}
