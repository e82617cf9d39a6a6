//! `LocalIntake`: the phase-1 `EventIntake`. Every accepted webhook goes to the local inbox
//! first (durable on return), then through the pipeline: at once in the request when a worker
//! is free within the budget, else by the drainer. An event leaves the inbox only once its
//! effects have committed, or once it is kept as a dead letter in the database.
//!
//! Processing is bounded by one semaphore shared by requests and the drainer, so a burst of
//! webhooks fills the inbox (cheap, on disk) instead of memory and database connections.

use crate::inbox::{Failure, Inbox, InboxError, StoredEvent};
use async_trait::async_trait;
use callplane_core::ErrorCode;
use callplane_core::seams::{
    Accepted, AgentDirectory, EventIntake, EventPipeline, InboundEvent, IntakeError, IntakeStatus, PipelineError,
    Processed, ReceivedWebhook,
};
use callplane_core::vapi;
use callplane_core::{OrgId, error_chain};
use chrono::Utc;
use futures::FutureExt;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct IntakeSettings {
    /// Events processed at once, by requests and the drainer together.
    pub workers: usize,
    /// Failed attempts (every backend answering but the event still failing) before the event
    /// is kept as a dead letter instead. Attempts stopped by a backend being down do not count.
    pub max_attempts: u32,
    /// The longest pause between two attempts at one event.
    pub max_backoff: Duration,
    /// Verifies organization ids in signed call metadata.
    pub org_hint_key: Option<Vec<u8>>,
}

/// What one attempt at an event came to.
enum Outcome {
    Done(Processed),
    /// Failed, and kept as a dead letter by the pipeline.
    DeadLettered,
    /// Kept as a dead letter; the sender is told why.
    Rejected {
        code: ErrorCode,
        message: String,
    },
    /// Not processed; try again later.
    Retry(String),
    /// Not processed because a backend is down (the database, Temporal): try again later,
    /// without counting towards `max_attempts`; the event waits as long as the outage lasts.
    Wait(String),
}

/// Events read from the inbox per drain pass. Each is held (body and all) until its turn for
/// a worker, so the pass is kept small: memory, not throughput, is what a backlog costs.
const DRAIN_BATCH: usize = 64;

/// How long an event the inbox could not take may take to process directly.
const DIRECT_BUDGET: Duration = Duration::from_secs(5);

struct Inner {
    inbox: Inbox,
    pipeline: Arc<dyn EventPipeline>,
    /// Resolves organizations, and is told when one changed so answers read it again.
    orgs: Arc<dyn AgentDirectory>,
    settings: IntakeSettings,
    workers: Arc<Semaphore>,
    /// Events being processed now, which the drainer must not pick up again.
    claimed: Mutex<HashSet<u64>>,
    wake: Notify,
    drained: AtomicU64,
    lost: AtomicU64,
    shed: AtomicU64,
}

#[derive(Clone)]
pub struct LocalIntake {
    inner: Arc<Inner>,
}

/// What a drain did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DrainReport {
    pub processed: u64,
    pub dead_lettered: u64,
    pub retrying: u64,
    pub left: u64,
}

impl LocalIntake {
    pub fn new(
        inbox: Inbox,
        pipeline: Arc<dyn EventPipeline>,
        orgs: Arc<dyn AgentDirectory>,
        settings: IntakeSettings,
    ) -> Self {
        let workers = Arc::new(Semaphore::new(settings.workers.max(1)));
        Self {
            inner: Arc::new(Inner {
                inbox,
                pipeline,
                orgs,
                settings,
                workers,
                claimed: Mutex::new(HashSet::new()),
                wake: Notify::new(),
                drained: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                shed: AtomicU64::new(0),
            }),
        }
    }

    pub fn inbox(&self) -> &Inbox {
        &self.inner.inbox
    }

    /// Drains the inbox for as long as the process runs: whatever a previous process left at
    /// start, then whatever requests could not process at once.
    pub fn spawn_drainer(&self) -> tokio::task::JoinHandle<()> {
        let intake = self.clone();
        tokio::spawn(async move {
            loop {
                let report = intake.drain_due().await;
                if report.processed + report.dead_lettered > 0 {
                    info!(
                        processed = report.processed,
                        dead_lettered = report.dead_lettered,
                        left = report.left,
                        "inbox drained"
                    );
                }
                // A pass that moved events on goes again at once: more may be waiting. One that
                // moved nothing, or met failures, sleeps until a request wakes it or a second
                // has passed (postponed events come due).
                if report.processed + report.dead_lettered == 0 || report.retrying > 0 {
                    let _ = tokio::time::timeout(Duration::from_secs(1), intake.inner.wake.notified()).await;
                }
            }
        })
    }

    /// One pass over the events due now, processed with the shared workers.
    pub async fn drain_due(&self) -> DrainReport {
        let inner = &self.inner;
        let skip = inner.claimed.lock().map(|c| c.clone()).unwrap_or_default();
        let due = match inner.inbox.due(Utc::now(), DRAIN_BATCH, &skip) {
            Ok(due) => due,
            Err(e) => {
                warn!(error = %e, "reading the inbox failed");
                return DrainReport { left: inner.inbox.depth(), ..DrainReport::default() };
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        for stored in due {
            let Ok(permit) = inner.workers.clone().acquire_owned().await else { break };
            if !self.claim(stored.id) {
                continue;
            }
            let intake = self.clone();
            tasks.spawn(async move {
                let mut outcome = intake.attempt(&stored, None).await;
                if matches!(outcome, Outcome::Retry(_)) && stored.failures + 1 >= intake.inner.settings.max_attempts {
                    outcome = intake.give_up(&stored, &outcome).await;
                }
                let kind = intake.settle(&stored, outcome).await;
                drop(permit);
                kind
            });
        }
        let mut report = DrainReport::default();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Settled::Processed) => report.processed += 1,
                Ok(Settled::DeadLettered) => report.dead_lettered += 1,
                Ok(Settled::Retrying) => report.retrying += 1,
                Err(e) => warn!(error = %e, "an inbox task panicked; the event stays for the next pass"),
            }
        }
        report.left = inner.inbox.depth();
        report
    }

    /// Drains until nothing is due (what `callplane inbox drain` runs); events postponed
    /// past `patience` are left for later.
    pub async fn drain_all(&self, patience: Duration, mut progress: impl FnMut(&DrainReport)) -> DrainReport {
        let started = tokio::time::Instant::now();
        let mut total = DrainReport::default();
        loop {
            let pass = self.drain_due().await;
            total.processed += pass.processed;
            total.dead_lettered += pass.dead_lettered;
            total.retrying = pass.retrying;
            total.left = pass.left;
            progress(&total);
            if pass.left == 0 || started.elapsed() >= patience {
                if let Err(e) = self.inner.inbox.flush().await {
                    warn!(error = %e, "making the drained inbox durable failed; some events may be processed again");
                }
                return total;
            }
            if pass.processed + pass.dead_lettered == 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    fn claim(&self, id: u64) -> bool {
        self.inner.claimed.lock().map(|mut c| c.insert(id)).unwrap_or(false)
    }

    fn release(&self, id: u64) {
        if let Ok(mut c) = self.inner.claimed.lock() {
            c.remove(&id);
        }
    }

    /// Processes one stored event. `event` is the parsed message when the receiver had it. A
    /// panic while processing is one more failed attempt, never a lost event: after
    /// `max_attempts` the event is kept as a dead letter.
    async fn attempt(&self, stored: &StoredEvent, event: Option<InboundEvent>) -> Outcome {
        match std::panic::AssertUnwindSafe(self.try_attempt(stored, event)).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Retry("processing panicked (see the log)".into()),
        }
    }

    async fn try_attempt(&self, stored: &StoredEvent, event: Option<InboundEvent>) -> Outcome {
        let inner = &self.inner;
        let webhook = &stored.webhook;
        if let Some(why) = &webhook.unprocessable {
            return self.keep(webhook, None, &why.code, &why.reason).await;
        }
        let event = match event {
            Some(event) => event,
            None => {
                let message = match vapi::parse_body(&webhook.body) {
                    Ok(message) => message,
                    Err(e) => return self.keep(webhook, None, e.code().as_str(), &e.to_string()).await,
                };
                let from_path = webhook.path_org.as_deref().and_then(|raw| raw.parse::<OrgId>().ok());
                let org = match webhook.org {
                    Some(org) => Some(org),
                    None => {
                        match callplane_core::agent::resolve_org(
                            inner.orgs.as_ref(),
                            from_path,
                            &message,
                            inner.settings.org_hint_key.as_deref(),
                        )
                        .await
                        {
                            Ok(org) => org,
                            Err(e) => return Outcome::Wait(error_chain(&e)),
                        }
                    }
                };
                let Some(org_id) = org else {
                    let why =
                        "no organization matched the URL, the call, the phone number, the assistant or signed metadata";
                    return self.keep(webhook, None, "unknown_organization", why).await;
                };
                InboundEvent { org_id, received_at: webhook.received_at, message }
            }
        };
        let org_id = event.org_id;
        match inner.pipeline.submit(event).await {
            Ok(processed) => {
                // A report changes what the organization has left: its next answer reads it.
                if processed == Processed::Applied {
                    inner.orgs.invalidate(org_id);
                }
                Outcome::Done(processed)
            }
            Err(PipelineError::Rejected { code, message, .. }) => Outcome::Rejected { code, message },
            // Kept in the dead-letter table by the pipeline: the database has it now.
            Err(PipelineError::DeadLettered { .. }) => Outcome::DeadLettered,
            Err(e @ PipelineError::Unavailable(_)) => Outcome::Wait(error_chain(&e)),
            Err(e @ PipelineError::Lost(_)) => Outcome::Retry(error_chain(&e)),
        }
    }

    /// Keeps an event that can never be processed as sent as a dead letter.
    async fn keep(&self, webhook: &ReceivedWebhook, org: Option<OrgId>, code: &str, reason: &str) -> Outcome {
        let body: Value = serde_json::from_slice(&webhook.body)
            .unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&webhook.body) }));
        let org = org.or(webhook.org);
        match self
            .inner
            .pipeline
            .keep_unprocessed(org, &body, Some(&webhook.body), code, reason, webhook.received_at)
            .await
        {
            Ok(id) => {
                info!(dead_letter_id = id, code, "unprocessable webhook kept as a dead letter");
                Outcome::Done(Processed::Ignored)
            }
            Err(e) => Outcome::Retry(format!("keeping it as a dead letter failed: {}", error_chain(&e))),
        }
    }

    /// Removes a finished event from the inbox or postpones it; then releases its claim, so
    /// the drainer never sees a finished event again nor retries one before its time.
    async fn settle(&self, stored: &StoredEvent, outcome: Outcome) -> Settled {
        let inner = &self.inner;
        let (error, failures) = match outcome {
            Outcome::Retry(error) => (error, stored.failures.saturating_add(1)),
            Outcome::Wait(error) => (error, stored.failures),
            done => {
                let settled = match done {
                    Outcome::Rejected { .. } | Outcome::DeadLettered => Settled::DeadLettered,
                    _ => Settled::Processed,
                };
                // The effects are committed; should the removal fail, the event is processed
                // again later, which changes nothing.
                if let Err(e) = inner.inbox.remove(stored.id).await {
                    warn!(event = stored.id, error = %e, "removing a processed event from the inbox failed");
                }
                inner.drained.fetch_add(1, Ordering::Relaxed);
                self.release(stored.id);
                return settled;
            }
        };
        let attempts = stored.attempts.saturating_add(1);
        let backoff =
            Duration::from_millis(500u64.saturating_mul(1 << attempts.min(16))).min(inner.settings.max_backoff);
        let next_attempt_at = Utc::now() + chrono::Duration::from_std(backoff).unwrap_or_default();
        warn!(event = stored.id, attempts, failures, %error, "event not processed; it stays in the inbox");
        let failure = Failure { attempts, failures, next_attempt_at, error };
        if let Err(e) = inner.inbox.record_failure(stored.id, failure).await {
            warn!(event = stored.id, error = %e, "recording the failed attempt failed");
        }
        self.release(stored.id);
        Settled::Retrying
    }

    /// The last resort for an event that keeps failing while the database answers: keep it as
    /// a dead letter so it is replayable and the inbox moves on.
    async fn give_up(&self, stored: &StoredEvent, last: &Outcome) -> Outcome {
        let Outcome::Retry(why) = last else { return Outcome::Retry("nothing to give up".into()) };
        let why = format!("failed {} times; last: {why}", stored.failures + 1);
        match self.keep(&stored.webhook, stored.webhook.org, "processing_failed", &why).await {
            Outcome::Done(_) => Outcome::DeadLettered,
            other => other,
        }
    }
}

enum Settled {
    Processed,
    DeadLettered,
    Retrying,
}

#[async_trait]
impl EventIntake for LocalIntake {
    fn backend(&self) -> &'static str {
        "inbox"
    }

    async fn accept(
        &self,
        webhook: ReceivedWebhook,
        event: Option<InboundEvent>,
        budget: Duration,
        acknowledged: bool,
    ) -> Result<Accepted, IntakeError> {
        let inner = &self.inner;
        let started = tokio::time::Instant::now();
        // With every worker busy (a burst), the parsed event is let go before waiting for the
        // disk: a parsed report is several times its body, and whoever processes it later
        // parses the body again.
        let event = if inner.workers.available_permits() == 0 { None } else { event };
        let id = match inner.inbox.append(&webhook).await {
            Ok(id) => id,
            Err(e) => {
                let result = self.without_inbox(webhook, event, e).await;
                if acknowledged && matches!(result, Err(IntakeError::Overloaded { .. })) {
                    inner.lost.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("an acknowledged event could be stored nowhere; it is lost");
                }
                return result;
            }
        };
        let stored =
            StoredEvent { id, webhook, attempts: 0, failures: 0, next_attempt_at: Utc::now(), last_error: None };
        // With every worker busy, the parsed event is let go while this request waits: under
        // a burst, waiting requests hold only their bodies, and whatever is not processed
        // within the budget is the drainer's, from disk. An answer VAPI waits for does not
        // wait for a worker at all: its event is safe on disk, and the caller is on the line.
        let permit_wait = if acknowledged { Duration::ZERO } else { budget };
        let (permit, event) = match inner.workers.clone().try_acquire_owned() {
            Ok(permit) => (permit, event),
            Err(_) => {
                drop(event);
                match tokio::time::timeout(permit_wait, inner.workers.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => (permit, None),
                    _ => {
                        inner.wake.notify_one();
                        return Ok(Accepted::Queued);
                    }
                }
            }
        };
        if !self.claim(id) {
            return Ok(Accepted::Queued);
        }
        // Processing runs on its own task: a request that stops waiting (its budget spent,
        // or the client gone) never leaves an event half-handled.
        let intake = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let outcome = intake.attempt(&stored, event).await;
            let answer = match &outcome {
                // Handed to a workflow: durable there, processed later.
                Outcome::Done(Processed::Scheduled) => Ok(Accepted::Queued),
                Outcome::Done(p) => Ok(Accepted::Processed(*p)),
                Outcome::DeadLettered => Ok(Accepted::DeadLettered),
                Outcome::Rejected { code, message } => {
                    Err(IntakeError::Rejected { code: *code, message: message.clone() })
                }
                Outcome::Retry(_) | Outcome::Wait(_) => Ok(Accepted::Queued),
            };
            // The sender hears first; settling the inbox is this task's own business.
            let _ = tx.send(answer);
            intake.settle(&stored, outcome).await;
            drop(permit);
        });
        match tokio::time::timeout(budget.saturating_sub(started.elapsed()), rx).await {
            Ok(Ok(answer)) => answer,
            _ => Ok(Accepted::Queued),
        }
    }

    fn status(&self) -> IntakeStatus {
        let inner = &self.inner;
        let depth = inner.inbox.depth();
        IntakeStatus {
            backend: "inbox",
            depth,
            bytes: inner.inbox.bytes(),
            oldest_age_seconds: if depth == 0 {
                0.0
            } else {
                inner.inbox.oldest().map_or(0.0, |t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
            },
            drained_total: inner.drained.load(Ordering::Relaxed),
            lost_total: inner.lost.load(Ordering::Relaxed),
            shed_total: inner.shed.load(Ordering::Relaxed),
            accepting: inner.inbox.has_room(0),
        }
    }
}

impl LocalIntake {
    /// The inbox refused the event (full, or its disk failing): the database is the other
    /// durable place. Processing it there at once keeps it; if that fails too, the sender is
    /// told to come back later.
    async fn without_inbox(
        &self,
        webhook: ReceivedWebhook,
        event: Option<InboundEvent>,
        why: InboxError,
    ) -> Result<Accepted, IntakeError> {
        let inner = &self.inner;
        warn!(error = %why, "the inbox cannot take the event; processing it directly");
        let stored =
            StoredEvent { id: 0, webhook, attempts: 0, failures: 0, next_attempt_at: Utc::now(), last_error: None };
        let outcome = match inner.workers.clone().try_acquire_owned() {
            Ok(_permit) => tokio::time::timeout(DIRECT_BUDGET, self.attempt(&stored, event)).await.ok(),
            Err(_) => None,
        };
        match outcome {
            Some(Outcome::Done(Processed::Scheduled)) => Ok(Accepted::Queued),
            Some(Outcome::Done(p)) => Ok(Accepted::Processed(p)),
            Some(Outcome::DeadLettered) => Ok(Accepted::DeadLettered),
            Some(Outcome::Rejected { code, message }) => Err(IntakeError::Rejected { code, message }),
            Some(Outcome::Retry(_) | Outcome::Wait(_)) | None => {
                inner.shed.fetch_add(1, Ordering::Relaxed);
                Err(IntakeError::Overloaded { retry_after_seconds: 5, source: Some(Box::new(why)) })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::inbox::InboxLimits;
    use callplane_core::Organization;
    use callplane_core::seams::{OrgDirectory, StoreResult};
    use serde_json::Map;
    use std::sync::atomic::AtomicUsize;

    /// A pipeline whose processing panics, as a bug on some input would.
    #[derive(Default)]
    struct Panicking {
        submitted: AtomicUsize,
        kept: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl EventPipeline for Panicking {
        fn backend(&self) -> &'static str {
            "panicking"
        }

        async fn submit(&self, _event: InboundEvent) -> Result<Processed, PipelineError> {
            self.submitted.fetch_add(1, Ordering::SeqCst);
            panic!("a bug in processing");
        }

        async fn keep_unprocessed(
            &self,
            _org: Option<OrgId>,
            _body: &Value,
            _raw: Option<&[u8]>,
            code: &str,
            _error: &str,
            _received_at: chrono::DateTime<Utc>,
        ) -> StoreResult<i64> {
            self.kept.lock().unwrap().push(code.to_owned());
            Ok(1)
        }
    }

    /// A pipeline whose backend is down for its first `down_for` submissions.
    struct Outage {
        down_for: usize,
        submitted: AtomicUsize,
    }

    #[async_trait]
    impl EventPipeline for Outage {
        fn backend(&self) -> &'static str {
            "outage"
        }

        async fn submit(&self, _event: InboundEvent) -> Result<Processed, PipelineError> {
            if self.submitted.fetch_add(1, Ordering::SeqCst) < self.down_for {
                let source = "connection refused".into();
                return Err(PipelineError::Unavailable(callplane_core::seams::StoreError::Unavailable {
                    backend: "temporal",
                    source,
                }));
            }
            Ok(Processed::Applied)
        }

        async fn keep_unprocessed(
            &self,
            _org: Option<OrgId>,
            _body: &Value,
            _raw: Option<&[u8]>,
            _code: &str,
            _error: &str,
            _received_at: chrono::DateTime<Utc>,
        ) -> StoreResult<i64> {
            panic!("an event was dead-lettered during an outage");
        }
    }

    #[tokio::test]
    async fn an_event_waits_out_a_backend_outage_longer_than_max_attempts_and_is_processed_once_it_ends() {
        let dir = tempfile::Builder::new().prefix("callplane-intake-test-").tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), InboxLimits { max_events: 10, max_bytes: 1 << 20 }).unwrap();
        let pipeline = Arc::new(Outage { down_for: 7, submitted: AtomicUsize::new(0) });
        let settings =
            IntakeSettings { workers: 2, max_attempts: 3, max_backoff: Duration::from_millis(10), org_hint_key: None };
        let intake = LocalIntake::new(inbox, pipeline.clone(), Arc::new(Everyone), settings);
        let body = br#"{"message":{"type":"status-update","status":"in-progress","call":{"id":"c1"}}}"#;
        let webhook = ReceivedWebhook {
            received_at: Utc::now(),
            path_org: None,
            org: Some(OrgId::new()),
            body: bytes::Bytes::from_static(body),
            unprocessable: None,
        };
        assert_eq!(intake.accept(webhook, None, Duration::from_secs(2), false).await.unwrap(), Accepted::Queued);
        let report = intake.drain_all(Duration::from_secs(30), |_| {}).await;
        assert_eq!((report.processed, report.dead_lettered, report.left), (1, 0, 0), "{report:?}");
        assert_eq!(pipeline.submitted.load(Ordering::SeqCst), 8, "tried until the outage ended");
    }

    /// Every organization exists.
    struct Everyone;

    #[async_trait]
    impl OrgDirectory for Everyone {
        async fn get(&self, _org: OrgId) -> StoreResult<Option<Organization>> {
            Ok(None)
        }
        async fn by_phone_number(&self, _id: &str) -> StoreResult<Option<OrgId>> {
            Ok(None)
        }
        async fn by_assistant(&self, _id: &str) -> StoreResult<Option<OrgId>> {
            Ok(None)
        }
        async fn by_call(&self, _id: &str) -> StoreResult<Option<OrgId>> {
            Ok(None)
        }
        async fn by_api_key(&self, _secret: &str) -> StoreResult<Option<OrgId>> {
            Ok(None)
        }
    }

    #[async_trait]
    impl AgentDirectory for Everyone {
        async fn function_data(&self, _org: OrgId) -> StoreResult<Arc<Map<String, Value>>> {
            Ok(Arc::default())
        }
        fn invalidate(&self, _org: OrgId) {}
        fn invalidate_all(&self) {}
    }

    #[tokio::test]
    async fn an_event_whose_processing_panics_is_retried_then_kept_as_a_dead_letter_never_dropped() {
        let dir = tempfile::Builder::new().prefix("callplane-intake-test-").tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), InboxLimits { max_events: 10, max_bytes: 1 << 20 }).unwrap();
        let pipeline = Arc::new(Panicking::default());
        let settings =
            IntakeSettings { workers: 2, max_attempts: 3, max_backoff: Duration::from_millis(10), org_hint_key: None };
        let intake = LocalIntake::new(inbox, pipeline.clone(), Arc::new(Everyone), settings);
        let org = OrgId::new();
        let body = br#"{"message":{"type":"status-update","status":"in-progress","call":{"id":"c1"}}}"#;
        let webhook = ReceivedWebhook {
            received_at: Utc::now(),
            path_org: None,
            org: Some(org),
            body: bytes::Bytes::from_static(body),
            unprocessable: None,
        };
        let accepted = intake.accept(webhook, None, Duration::from_secs(2), false).await.unwrap();
        assert_eq!(accepted, Accepted::Queued, "the panic left the event in the inbox");
        assert_eq!(intake.inbox().depth(), 1);

        let report = intake.drain_all(Duration::from_secs(10), |_| {}).await;
        assert_eq!((report.dead_lettered, report.left), (1, 0), "{report:?}");
        assert_eq!(pipeline.submitted.load(Ordering::SeqCst), 3, "tried max_attempts times");
        assert_eq!(*pipeline.kept.lock().unwrap(), vec!["processing_failed".to_owned()]);
        assert_eq!(intake.status().lost_total, 0);
    }
}
