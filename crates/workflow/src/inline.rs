//! `InlinePipeline`: process a VAPI event inside the request that delivered it.

use async_trait::async_trait;
use callplane_core::ErrorCode;
use callplane_core::OrgId;
use callplane_core::billing::BillingRules;
use callplane_core::events;
use callplane_core::metering::Metering;
use callplane_core::seams::{
    EventPipeline, InboundEvent, OrgDirectory, PipelineError, Processed, RealtimeBus, RealtimeEvent, StoreError,
    Transcript, TranscriptStore,
};
use callplane_core::vapi::{MessageKind, parse_body, parse_message};
use callplane_storage::{ApplyOptions, DeadLetterFilter, NewDeadLetter, PgStore};
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
    /// A call created longer ago than this is refused: it would open a partition for a
    /// month long gone (and VAPI does not deliver such events).
    pub max_past: Duration,
    /// Verifies organization ids in call metadata when replaying events that had none.
    pub org_hint_key: Option<Vec<u8>>,
}

#[derive(Clone)]
pub struct InlinePipeline {
    store: PgStore,
    metering: Arc<Metering>,
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
    #[error("`{field}` {at} is more than {max_hours}h in the future")]
    FutureTimestamp { field: &'static str, at: DateTime<Utc>, max_hours: i64 },
    #[error("`{field}` {at} is more than {max_days} days in the past")]
    PastTimestamp { field: &'static str, at: DateTime<Utc>, max_days: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Failure {
    fn code(&self) -> ErrorCode {
        match self {
            Failure::FutureTimestamp { .. } => ErrorCode::FutureTimestamp,
            Failure::PastTimestamp { .. } => ErrorCode::StaleTimestamp,
            Failure::Store(StoreError::Refused { code, .. }) => *code,
            Failure::Store(StoreError::Backend { .. } | StoreError::Internal(_)) => ErrorCode::ProcessingFailed,
            Failure::Store(StoreError::Unavailable { .. }) => ErrorCode::Overloaded,
        }
    }

    /// Whether the sender should be told its event is wrong (4xx) rather than acknowledged:
    /// only when the event itself is at fault, never for the system's own failures.
    fn is_rejection(&self) -> bool {
        !matches!(
            self,
            Failure::Store(StoreError::Backend { .. } | StoreError::Unavailable { .. } | StoreError::Internal(_))
        )
    }
}

/// The transcript a message carries: the report's (final) or the live conversation.
fn carried_transcript(msg: &callplane_core::vapi::ServerMessage) -> Option<Transcript> {
    match (&msg.report, &msg.conversation) {
        (Some(r), _) => Some(Transcript {
            text: r.transcript.clone(),
            messages: r.messages.clone().unwrap_or_default(),
            is_final: true,
        }),
        (None, Some(messages)) => Some(Transcript { text: None, messages: messages.clone(), is_final: false }),
        _ => None,
    }
}

impl InlinePipeline {
    pub fn new(
        store: PgStore,
        metering: Arc<Metering>,
        transcripts: Arc<dyn TranscriptStore>,
        bus: Arc<dyn RealtimeBus>,
        settings: PipelineSettings,
    ) -> Self {
        Self { store, metering, transcripts, bus, settings }
    }

    /// Times that would open partitions (or billing periods) far from now are refused.
    fn check_times(&self, ev: &InboundEvent) -> Result<(), Failure> {
        let msg = &ev.message;
        let report = msg.report.as_ref();
        let times = [
            ("call.createdAt", msg.call_created_at.or(msg.timestamp)),
            ("timestamp", msg.timestamp),
            ("startedAt", report.and_then(|r| r.started_at)),
            ("endedAt", report.and_then(|r| r.ended_at)),
        ];
        let latest = ev.received_at + self.settings.max_future_skew;
        let earliest = ev.received_at - self.settings.max_past;
        for (field, at) in times {
            match at {
                Some(at) if at > latest => {
                    return Err(Failure::FutureTimestamp {
                        field,
                        at,
                        max_hours: self.settings.max_future_skew.num_hours(),
                    });
                }
                Some(at) if at < earliest => {
                    return Err(Failure::PastTimestamp { field, at, max_days: self.settings.max_past.num_days() });
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn process(&self, ev: &InboundEvent) -> Result<Processed, Failure> {
        let msg = &ev.message;
        if msg.kind == MessageKind::Unknown || msg.call_id.is_none() {
            return Ok(Processed::Ignored);
        }
        self.check_times(ev)?;
        let queue_events = self.bus.queues_in_transaction();
        let transcript = carried_transcript(msg);
        let transcript_in_tx = transcript.as_ref().filter(|_| self.transcripts.stores_in_transaction());
        let Some(mut change) = self
            .store
            .apply_call_event(
                ev.org_id,
                msg,
                ev.received_at,
                &ApplyOptions { rules: &self.settings.rules, queue_events, transcript: transcript_in_tx },
            )
            .await?
        else {
            return Ok(Processed::Ignored);
        };
        if queue_events {
            self.bus.queued();
        }
        let mut alerts = Vec::new();
        if let Some(billed) = change.billed.as_ref().filter(|b| b.seconds > 0) {
            // The ledger row is committed: a counter that fails now leaves the row uncounted,
            // and the repair loop adds it once the counter answers again.
            match self
                .metering
                .count_call(ev.org_id, &change.call_id, billed.period_start, billed.seconds, &billed.plan)
                .await
            {
                Ok(counted) => alerts = counted.alerts,
                Err(e) => warn!(error = %callplane_core::error_chain(&e), call_id = %change.call_id,
                                "counting the call failed; it stays uncounted in the ledger and is added later"),
            }
        }
        if change.duration_unknown {
            warn!(call_id = %change.call_id, "the call ended connected but no source gave its duration; \
                   not billed yet, marked for review (reconciliation asks VAPI)");
        }
        // A transcript kept elsewhere is stored after the call's commit.
        if let Some(t) = transcript.as_ref().filter(|_| transcript_in_tx.is_none()) {
            self.transcripts.put(ev.org_id, &change.call_id, change.created_at, t).await?;
            change.transcript = Some(t.is_final);
        }
        let mut after_commit = Vec::new();
        if !queue_events {
            after_commit = events::for_change(ev.org_id, &change);
        } else if transcript_in_tx.is_none() {
            after_commit.extend(change.transcript.map(|f| events::transcript_changed(ev.org_id, &change.call_id, f)));
        }
        after_commit.extend(alerts.iter().map(|a| events::usage_alert(ev.org_id, &change.call_id, a)));
        self.publish(&after_commit).await;
        let changed = change.inserted
            || change.status_changed.is_some()
            || change.billed.is_some()
            || change.transcript.is_some();
        Ok(if changed { Processed::Applied } else { Processed::NoChange })
    }

    /// Events published after commit are best effort: the dashboard can always re-read.
    async fn publish(&self, events: &[RealtimeEvent]) {
        if events.is_empty() {
            return;
        }
        if let Err(err) = self.bus.publish(events).await {
            warn!(error = %err, events = events.len(), "realtime publish failed");
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
                error_code: failure.code().as_str(),
                error: &message,
                payload: &payload,
                raw_body: None,
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
            // The exact bytes received, when kept; else the readable copy.
            let parsed = match &letter.raw_body {
                Some(raw) => parse_body(raw),
                None => parse_message(letter.payload.get("message").cloned().unwrap_or(Value::Null)),
            };
            let outcome = match parsed {
                Err(e) => Err((e.code(), e.to_string())),
                Ok(msg) => {
                    let org = match letter.organization_id {
                        Some(id) => Some(OrgId(id)),
                        None => {
                            callplane_core::agent::resolve_org(orgs, None, &msg, self.settings.org_hint_key.as_deref())
                                .await?
                        }
                    };
                    match org {
                        None => Err((
                            ErrorCode::UnknownOrganization,
                            "no organization could be resolved for this event".to_owned(),
                        )),
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
                    self.store.finish_dead_letter_attempt(letter.id, None, Some((code.as_str(), &message))).await?;
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

    async fn keep_unprocessed(
        &self,
        org: Option<OrgId>,
        body: &Value,
        raw: Option<&[u8]>,
        code: &str,
        error: &str,
        received_at: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        let message = body.get("message");
        let text = |key: &str| message.and_then(|m| m.get(key)).and_then(Value::as_str);
        let call_id = message.and_then(|m| m.get("call")).and_then(|c| c.get("id")).and_then(Value::as_str);
        self.store
            .record_dead_letter(&NewDeadLetter {
                org,
                call_id,
                message_type: text("type"),
                error_code: code,
                error,
                payload: body,
                raw_body: raw,
                received_at,
            })
            .await
    }

    #[instrument(skip_all, fields(org_id = %ev.org_id, kind = ev.message.kind.label(), call_id = ev.message.call_id.as_deref().unwrap_or("")))]
    async fn submit(&self, ev: InboundEvent) -> Result<Processed, PipelineError> {
        let failure = match self.process(&ev).await {
            Ok(p) => return Ok(p),
            // The database is away: nothing to keep here, the caller's durable copy (the
            // inbox, a workflow) is tried again later.
            Err(Failure::Store(e)) if e.is_transient() => return Err(PipelineError::Unavailable(e)),
            Err(f) => f,
        };
        match self.dead_letter(&ev, &failure).await {
            Ok(id) if failure.is_rejection() => {
                info!(dead_letter_id = id, code = failure.code().as_str(), error = %failure, "event rejected and dead-lettered");
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
