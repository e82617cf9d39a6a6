//! callplane-temporal: phase 2's event pipeline on [Temporal](https://temporal.io) workflows.
//!
//! The webhook's event is already safe in the local inbox when the pipeline sees it. The
//! pipeline hands it to Temporal as a signal to the call's workflow (`call-<org>-<call>`,
//! started by the same request if it is not running): once Temporal accepts the signal, the
//! event is durable there and leaves the inbox. Temporal unreachable, the event stays in the
//! inbox and is handed over when it answers again.
//!
//! The workflow takes its call's events one at a time, in the order Temporal received them,
//! and runs the processor's steps for each as activities, each retried on its own with
//! backoff: `apply` (the call, its ledger row, transcript and realtime events in one
//! transaction), `count` (the usage counter and its alerts), `finish` (what is published after
//! commit). An event that retrying cannot fix is kept as a dead letter by the activity, as the
//! inline pipeline keeps it. The workflow completes after the call's end-of-call report; an
//! event arriving later starts a new run, which changes nothing it should not, since the
//! processor is idempotent on the call.
//!
//! The worker runs inside `callplane serve` or alone (`callplane worker`). It polls on its own
//! thread, because the SDK's worker future is not `Send`; the activities' work runs on the
//! process's runtime, where the database pool lives.

mod activities;
pub mod baseline;
mod pipeline;
mod stats;
mod worker;
mod workflow;

pub use pipeline::{TemporalPipeline, connect};
pub use stats::TemporalStats;
pub use worker::{WorkerHandle, spawn_worker};

use std::time::Duration;

/// Where Temporal is and how callplane uses it (`[temporal]` in the configuration).
#[derive(Clone, Debug)]
pub struct TemporalSettings {
    /// The frontend's gRPC address, `http://host:port`.
    pub address: String,
    pub namespace: String,
    /// The task queue the call workflows and their activities run on.
    pub task_queue: String,
    /// How long the webhook's answer may wait for the event to be processed by a worker in
    /// this process (0: answer as soon as Temporal has accepted it). With a wait, the answer
    /// says what processing did (`applied`, a rejection), as the inline pipeline's does.
    pub answer_wait: Duration,
    /// Activities this process's worker runs at once (bounded by the database pool).
    pub max_concurrent_activities: usize,
}

/// The workflow id of a call's events: its organization and call id.
pub fn workflow_id(org: callplane_core::OrgId, call_id: &str) -> String {
    format!("call-{org}-{call_id}")
}
