//! `CallWorkflow`: one call's events, one at a time, through the processor's steps.
//!
//! Workflow code must replay to the same decisions from its history, so it only orders
//! activities; everything that touches the database is in `activities`.

use crate::activities::{Applied, CallActivities, CountStep, FinishStep};
use crate::stats::{WORKFLOWS_COMPLETED, WORKFLOWS_CONTINUED, WORKFLOWS_FAILED, WORKFLOWS_STARTED, bump};
use callplane_core::OrgId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::VecDeque;
use std::time::Duration;
use temporalio_common::RetryPolicy;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{LocalActivityOptions, SyncWorkflowContext, WorkflowContext, WorkflowResult};
use temporalio_workflow::ContinueAsNewOptions;

/// One event as handed to Temporal: the message as received, with what routed it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// This hand-over; the process that made it may be waiting for its outcome.
    pub key: uuid::Uuid,
    pub org_id: OrgId,
    pub received_at: DateTime<Utc>,
    /// The `message` object of the webhook's body.
    pub message: Value,
}

impl Envelope {
    fn ends_call(&self) -> bool {
        self.message.get("type").and_then(Value::as_str) == Some("end-of-call-report")
    }
}

/// The workflow's input: which call it is. Kept for readability in Temporal's UI and CLI.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CallRef {
    pub org_id: String,
    pub call_id: String,
}

/// Events handled before a run continues as new, so its history stays short (a long call
/// sends hundreds of transcript and status messages).
const CONTINUE_AFTER_HISTORY_EVENTS: u32 = 4_000;

/// The steps are local activities: the worker that runs the workflow task runs them and
/// records each result in the history, so an event costs one round trip to Temporal instead of
/// one per step (measured on the dev server: ~50 ms an event with three activity tasks). Each
/// is retried until it succeeds: what fails for good is kept as a dead letter by the activity
/// itself, so an error here is always one that time can fix (the database down). Backoffs past
/// a second wait on a durable timer, so a worker that dies meanwhile loses nothing.
pub(crate) fn step_options() -> LocalActivityOptions {
    LocalActivityOptions::builder()
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_millis(200))
                .backoff_coefficient(2.0)
                .maximum_interval(Duration::from_secs(10))
                .maximum_attempts(0)
                .build(),
        )
        .start_to_close_timeout(Duration::from_secs(60))
        .timer_backoff_threshold(Duration::from_secs(1))
        .build()
}

#[workflow]
#[derive(Default)]
pub struct CallWorkflow {
    pending: VecDeque<Envelope>,
    /// The call's end-of-call report was handled in this run.
    ended: bool,
}

#[workflow_methods]
impl CallWorkflow {
    #[run]
    pub async fn run(ctx: &mut WorkflowContext<Self>, call: CallRef) -> WorkflowResult<u32> {
        if !ctx.is_replaying() {
            bump(&WORKFLOWS_STARTED);
        }
        let mut handled = 0;
        loop {
            ctx.wait_condition(|s| !s.pending.is_empty()).await?;
            let Some(event) = ctx.state_mut(|s| s.pending.pop_front()) else { continue };
            if let Err(e) = Self::handle(ctx, &event).await {
                if !ctx.is_replaying() {
                    bump(&WORKFLOWS_FAILED);
                }
                return Err(e);
            }
            handled += 1;
            if event.ends_call() {
                ctx.state_mut(|s| s.ended = true);
            }
            if !ctx.state(|s| s.pending.is_empty()) {
                continue;
            }
            // The report handled and nothing waiting: the call's work is done. Should an event
            // arrive as this run completes, Temporal refuses the completion and the run takes
            // it; one arriving later starts a new run.
            if ctx.state(|s| s.ended) {
                if !ctx.is_replaying() {
                    bump(&WORKFLOWS_COMPLETED);
                }
                return Ok(handled);
            }
            if ctx.continue_as_new_suggested() || ctx.history_length() > CONTINUE_AFTER_HISTORY_EVENTS {
                if !ctx.is_replaying() {
                    bump(&WORKFLOWS_CONTINUED);
                }
                ctx.continue_as_new(call.clone(), ContinueAsNewOptions::default())?;
            }
        }
    }

    /// One event through the steps it needs.
    async fn handle(ctx: &mut WorkflowContext<Self>, event: &Envelope) -> WorkflowResult<()> {
        let applied = ctx.execute_local_activity(CallActivities::apply, event.clone(), step_options()).await?;
        let Applied::Changed { change, count, finish } = applied else { return Ok(()) };
        let alerts = match count {
            true => {
                let step = CountStep { key: event.key, org_id: event.org_id, change: change.clone(), finish };
                ctx.execute_local_activity(CallActivities::count, step, step_options()).await?
            }
            false => Vec::new(),
        };
        if finish || !alerts.is_empty() {
            let step = FinishStep { event: event.clone(), change, alerts };
            ctx.execute_local_activity(CallActivities::finish, step, step_options()).await?;
        }
        Ok(())
    }

    /// A new event of the call.
    #[signal]
    pub fn event(&mut self, _ctx: &mut SyncWorkflowContext<Self>, event: Envelope) {
        self.pending.push_back(event);
    }
}
