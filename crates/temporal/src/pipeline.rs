//! `TemporalPipeline`: the `EventPipeline` that hands each event to its call's workflow.

use crate::activities::Waiters;
use crate::stats::{TemporalStats, bump};
use crate::workflow::{CallRef, CallWorkflow, Envelope};
use crate::{TemporalSettings, workflow_id};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{EventPipeline, InboundEvent, PipelineError, Processed, StoreError, StoreResult};
use callplane_core::vapi::MessageKind;
use callplane_workflow::{DeadLetters, ProcessingStats};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use temporalio_client::{
    Client, ClientOptions, Connection, ConnectionOptions, Url, WorkflowIdConflictPolicy, WorkflowIdReusePolicy,
    WorkflowStartOptions,
};
use tokio::sync::Mutex;
use tracing::{info, instrument, warn};

/// How long a hand-over may take before the event is left in the inbox for the next try.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting to Temporal may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct TemporalPipeline {
    inner: Arc<Inner>,
}

struct Inner {
    settings: TemporalSettings,
    /// Made on first use, and again after a failed connection: Temporal may be down when the
    /// process starts.
    client: Mutex<Option<Client>>,
    dead_letters: DeadLetters,
    waiters: Waiters,
    stats: Arc<TemporalStats>,
    processing: Arc<ProcessingStats>,
}

/// A Temporal error, as the seams say it: unavailable for now.
fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::Unavailable { backend: "temporal", source: e.into() }
}

/// Connects a client to Temporal's frontend.
pub async fn connect(settings: &TemporalSettings) -> Result<Client, StoreError> {
    let url = Url::from_str(&settings.address).map_err(|e| StoreError::Internal(format!("temporal.address: {e}")))?;
    let options = ConnectionOptions::new(url).identity(worker_identity()).connect_timeout(CONNECT_TIMEOUT).build();
    let connection = Connection::connect(options).await.map_err(unavailable)?;
    Client::new(connection, ClientOptions::new(settings.namespace.clone()).build()).map_err(unavailable)
}

/// How a hand-over starts its call's workflow: joins the run in progress, or starts a new one
/// (a finished call's workflow id may run again: a late event is applied by a new run).
pub(crate) fn start_options(task_queue: &str, workflow_id: String) -> WorkflowStartOptions {
    WorkflowStartOptions::new(task_queue.to_owned(), workflow_id)
        .id_reuse_policy(WorkflowIdReusePolicy::AllowDuplicate)
        .id_conflict_policy(WorkflowIdConflictPolicy::UseExisting)
        .build()
}

fn worker_identity() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    format!("callplane-{}@{host}", std::process::id())
}

impl TemporalPipeline {
    /// `processing`: the stats of the processor the worker runs (`Processor::stats`).
    pub fn new(settings: TemporalSettings, dead_letters: DeadLetters, processing: Arc<ProcessingStats>) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                client: Mutex::new(None),
                dead_letters,
                waiters: Waiters::default(),
                stats: Arc::default(),
                processing,
            }),
        }
    }

    pub fn settings(&self) -> &TemporalSettings {
        &self.inner.settings
    }

    pub(crate) fn waiters(&self) -> Waiters {
        self.inner.waiters.clone()
    }

    pub fn stats(&self) -> Arc<TemporalStats> {
        self.inner.stats.clone()
    }

    /// The client, connecting when there is none yet.
    pub async fn client(&self) -> Result<Client, StoreError> {
        let mut client = self.inner.client.lock().await;
        if let Some(c) = client.as_ref() {
            return Ok(c.clone());
        }
        let c = connect(&self.inner.settings).await?;
        info!(address = %self.inner.settings.address, namespace = %self.inner.settings.namespace, "connected to Temporal");
        *client = Some(c.clone());
        Ok(c)
    }

    /// Signals the call's workflow with the event, starting the workflow if it is not running.
    async fn hand_off(&self, envelope: Envelope, call_id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let settings = &self.inner.settings;
        let options = start_options(&settings.task_queue, workflow_id(envelope.org_id, call_id));
        let call = CallRef { org_id: envelope.org_id.to_string(), call_id: call_id.to_owned() };
        let signal = client.signal_with_start_workflow(CallWorkflow::run, call, CallWorkflow::event, envelope, options);
        match tokio::time::timeout(HANDOFF_TIMEOUT, signal).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable(format!("Temporal did not accept the event within {HANDOFF_TIMEOUT:?}"))),
        }
    }
}

#[async_trait]
impl EventPipeline for TemporalPipeline {
    fn backend(&self) -> &'static str {
        "temporal"
    }

    #[instrument(skip_all, fields(org_id = %ev.org_id, kind = ev.message.kind.label(), call_id = ev.message.call_id.as_deref().unwrap_or("")))]
    async fn submit(&self, ev: InboundEvent) -> Result<Processed, PipelineError> {
        // Nothing to apply: no workflow either (the processor would ignore it all the same).
        let Some(call_id) = ev.message.call_id.clone().filter(|_| ev.message.kind != MessageKind::Unknown) else {
            return Ok(Processed::Ignored);
        };
        let key = uuid::Uuid::new_v4();
        let wait = self.inner.settings.answer_wait;
        let outcome = (!wait.is_zero()).then(|| self.inner.waiters.wait(key));
        let envelope = Envelope { key, org_id: ev.org_id, received_at: ev.received_at, message: ev.message.raw };
        if let Err(e) = self.hand_off(envelope, &call_id).await {
            self.inner.waiters.forget(&key);
            bump(&self.inner.stats.handoff_failures);
            warn!(error = %callplane_core::error_chain(&e), "Temporal did not take the event; it stays in the inbox");
            // A client that failed may be stale: the next hand-over connects again.
            *self.inner.client.lock().await = None;
            return Err(PipelineError::Unavailable(e));
        }
        bump(&self.inner.stats.handed_off);
        let Some(outcome) = outcome else { return Ok(Processed::Scheduled) };
        match tokio::time::timeout(wait, outcome).await {
            Ok(Ok(result)) => result,
            _ => {
                self.inner.waiters.forget(&key);
                Ok(Processed::Scheduled)
            }
        }
    }

    async fn keep_unprocessed(
        &self,
        org: Option<OrgId>,
        body: &Value,
        raw: Option<&[u8]>,
        code: &str,
        error: &str,
        received_at: DateTime<Utc>,
    ) -> StoreResult<i64> {
        self.inner.dead_letters.keep_unprocessed(org, body, raw, code, error, received_at).await
    }

    fn render_metrics(&self, out: &mut String) {
        self.inner.processing.render(out);
        self.inner.stats.render(out);
    }
}
