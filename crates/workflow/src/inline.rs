//! `InlinePipeline`: process a VAPI event inside the request that delivered it.

use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::billing::BillingRules;
use callplane_core::seams::{
    EventPipeline, InboundEvent, OrgDirectory, PipelineError, Processed, RealtimeBus, RealtimeEvent, StoreError,
    Transcript, TranscriptStore, UsageCounter,
};
use callplane_core::vapi::{MessageKind, parse_message};
use callplane_storage::{CallApplied, DeadLetterFilter, NewDeadLetter, PgStore};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use std::sync::Arc;
use tracing::{error, info, instrument, warn};

#[derive(Clone, Debug)]
pub struct PipelineSettings {
    pub rules: BillingRules,
    /// A call created further than this in the future is refused: it would need a partition
    /// that should not exist yet.
    pub max_future_skew: Duration,
}

#[derive(Clone)]
pub struct InlinePipeline {
    store: PgStore,
    counter: Arc<dyn UsageCounter>,
    transcripts: Arc<dyn TranscriptStore>,
    bus: Arc<dyn RealtimeBus>,
    settings: PipelineSettings,
}

/// What a replay did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReplayReport {
    pub attempted: usize,
    pub succeeded: usize,
    pub failed: usize,
}

/// Why one event could not be processed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("call created at {created_at} is more than {max_hours}h in the future")]
    FutureTimestamp { created_at: DateTime<Utc>, max_hours: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Failure {
    fn code(&self) -> &'static str {
        match self {
            Failure::FutureTimestamp { .. } => "future_timestamp",
            Failure::Store(StoreError::Invalid(_)) => "invalid_event",
            Failure::Store(StoreError::Backend { .. }) => "processing_failed",
        }
    }

    /// Whether the sender should be told its event is wrong (4xx) rather than acknowledged.
    fn is_rejection(&self) -> bool {
        !matches!(self, Failure::Store(StoreError::Backend { .. }))
    }
}

fn event(org: OrgId, kind: &str, call_id: &str, data: Value) -> RealtimeEvent {
    RealtimeEvent { org_id: org, kind: kind.to_owned(), call_id: Some(call_id.to_owned()), data }
}

impl InlinePipeline {
    pub fn new(
        store: PgStore,
        counter: Arc<dyn UsageCounter>,
        transcripts: Arc<dyn TranscriptStore>,
        bus: Arc<dyn RealtimeBus>,
        settings: PipelineSettings,
    ) -> Self {
        Self { store, counter, transcripts, bus, settings }
    }

    async fn process(&self, ev: &InboundEvent) -> Result<Processed, Failure> {
        let msg = &ev.message;
        if msg.kind == MessageKind::Unknown || msg.call_id.is_none() {
            return Ok(Processed::Ignored);
        }
        if let Some(created) = msg.call_created_at.or(msg.timestamp)
            && created > ev.received_at + self.settings.max_future_skew
        {
            return Err(Failure::FutureTimestamp {
                created_at: created,
                max_hours: self.settings.max_future_skew.num_hours(),
            });
        }
        let raise_in_tx = self.counter.raised_in_ledger_transaction();
        let Some(applied) =
            self.store.apply_call_event(ev.org_id, msg, ev.received_at, &self.settings.rules, raise_in_tx).await?
        else {
            return Ok(Processed::Ignored);
        };
        if let (Some((seconds, period)), false) = (applied.billed, raise_in_tx)
            && seconds > 0
        {
            // The ledger row is committed; a counter that fails here is rebuilt from it.
            self.counter.add(ev.org_id, period, seconds).await?;
        }
        let transcript_changed = self.store_transcript(ev, &applied).await?;
        self.publish(ev.org_id, &applied, transcript_changed).await;
        let changed =
            applied.inserted || applied.status_changed.is_some() || applied.billed.is_some() || transcript_changed;
        Ok(if changed { Processed::Applied } else { Processed::NoChange })
    }

    async fn store_transcript(&self, ev: &InboundEvent, applied: &CallApplied) -> Result<bool, Failure> {
        let msg = &ev.message;
        let transcript = match (&msg.report, &msg.conversation) {
            (Some(r), _) => Transcript {
                text: r.transcript.clone(),
                messages: r.messages.clone().unwrap_or_default(),
                is_final: true,
            },
            (None, Some(messages)) => Transcript { text: None, messages: messages.clone(), is_final: false },
            _ => return Ok(false),
        };
        self.transcripts.put(ev.org_id, &applied.call_id, applied.created_at, &transcript).await?;
        Ok(true)
    }

    /// Realtime delivery is best effort here; the dashboard can always re-read the call.
    async fn publish(&self, org: OrgId, a: &CallApplied, transcript_changed: bool) {
        let mut events = Vec::new();
        if a.inserted {
            events.push(event(org, "call.created", &a.call_id, json!({ "created_at": a.created_at })));
        }
        if let Some(status) = &a.status_changed {
            events.push(event(org, "call.status", &a.call_id, json!({ "status": status })));
        }
        if transcript_changed {
            events.push(event(org, "call.transcript", &a.call_id, json!({})));
        }
        if let Some((seconds, period)) = a.billed {
            events.push(event(org, "call.ended", &a.call_id, json!({ "billable_seconds": seconds })));
            events.push(RealtimeEvent {
                org_id: org,
                kind: "usage.changed".into(),
                call_id: Some(a.call_id.clone()),
                data: json!({ "period_start": period, "added_seconds": seconds }),
            });
        }
        for e in &events {
            if let Err(err) = self.bus.publish(e).await {
                warn!(error = %err, kind = %e.kind, "realtime publish failed");
            }
        }
    }

    async fn dead_letter(&self, ev: &InboundEvent, failure: &Failure) -> Result<i64, StoreError> {
        let payload = json!({ "message": ev.message.raw });
        let message = failure.to_string();
        self.store
            .record_dead_letter(&NewDeadLetter {
                org: Some(ev.org_id),
                call_id: ev.message.call_id.as_deref(),
                message_type: Some(&ev.message.message_type),
                error_code: failure.code(),
                error: &message,
                payload: &payload,
                received_at: ev.received_at,
            })
            .await
    }

    /// Reprocesses the unresolved dead letters matching `filter`, oldest first. Each either
    /// resolves or records one more attempt. Events with no organization are resolved
    /// through `orgs` (the registries and the call's metadata).
    pub async fn replay(
        &self,
        filter: &DeadLetterFilter,
        orgs: &dyn OrgDirectory,
        mut progress: impl FnMut(&ReplayReport),
    ) -> Result<ReplayReport, StoreError> {
        let letters = self.store.dead_letters(filter).await?;
        let mut report = ReplayReport::default();
        for letter in letters {
            report.attempted += 1;
            let message = letter.payload.get("message").cloned().unwrap_or(Value::Null);
            let outcome = match parse_message(message) {
                Err(e) => Err(("invalid_message", e.to_string())),
                Ok(msg) => {
                    let org = match letter.organization_id {
                        Some(id) => Some(OrgId(id)),
                        None => callplane_core::agent::resolve_org(orgs, None, &msg).await?,
                    };
                    match org {
                        None => {
                            Err(("unknown_organization", "no organization could be resolved for this event".to_owned()))
                        }
                        Some(org_id) => {
                            let ev = InboundEvent { org_id, received_at: letter.received_at, message: msg };
                            match self.process(&ev).await {
                                Ok(_) => Ok(org_id),
                                Err(f) => Err((f.code(), f.to_string())),
                            }
                        }
                    }
                }
            };
            match outcome {
                Ok(org) => {
                    report.succeeded += 1;
                    self.store.finish_dead_letter_attempt(letter.id, Some(org), None).await?;
                }
                Err((code, message)) => {
                    report.failed += 1;
                    self.store.finish_dead_letter_attempt(letter.id, None, Some((code, &message))).await?;
                }
            }
            progress(&report);
        }
        Ok(report)
    }
}

#[async_trait]
impl EventPipeline for InlinePipeline {
    fn backend(&self) -> &'static str {
        "inline"
    }

    #[instrument(skip_all, fields(org_id = %ev.org_id, kind = ev.message.kind.label(), call_id = ev.message.call_id.as_deref().unwrap_or("")))]
    async fn submit(&self, ev: InboundEvent) -> Result<Processed, PipelineError> {
        let failure = match self.process(&ev).await {
            Ok(p) => return Ok(p),
            Err(f) => f,
        };
        match self.dead_letter(&ev, &failure).await {
            Ok(id) if failure.is_rejection() => {
                info!(dead_letter_id = id, code = failure.code(), error = %failure, "event rejected and dead-lettered");
                Err(PipelineError::Rejected { code: failure.code(), message: failure.to_string(), dead_letter_id: id })
            }
            Ok(id) => {
                error!(dead_letter_id = id, error = ?failure, "event processing failed; dead-lettered");
                Err(PipelineError::DeadLettered { dead_letter_id: id, source: Box::new(failure) })
            }
            Err(dl) => {
                error!(error = ?failure, dead_letter_error = ?dl, "event processing failed and could not be dead-lettered");
                Err(PipelineError::Lost(Box::new(failure)))
            }
        }
    }
}
