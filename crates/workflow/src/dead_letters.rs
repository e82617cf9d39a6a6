//! `DeadLetters`: events that could not be processed, kept in the dead-letter table with
//! their reason, and replayed through the processor once the cause is fixed. Every pipeline
//! backend keeps its failures here.

use crate::processor::{Failure, Processor};
use callplane_core::seams::{InboundEvent, OrgDirectory, PipelineError, StoreError};
use callplane_core::vapi::{parse_body, parse_message};
use callplane_core::{ErrorCode, OrgId};
use callplane_storage::{DeadLetterFilter, NewDeadLetter, PgStore};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tracing::{error, info};

/// What a replay did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReplayReport {
    pub attempted: usize,
    pub succeeded: usize,
    pub failed: usize,
}

#[derive(Clone)]
pub struct DeadLetters {
    store: PgStore,
    processor: Processor,
}

impl DeadLetters {
    pub fn new(store: PgStore, processor: Processor) -> Self {
        Self { store, processor }
    }

    /// What a failed event becomes, whichever pipeline met the failure: kept as a dead letter
    /// and reported as rejected (the event is at fault) or dead-lettered (we are); lost only
    /// when it could not even be kept. A transient failure is not kept here: the caller's
    /// durable copy (the inbox, a workflow's retries) tries again.
    pub async fn fail(&self, ev: &InboundEvent, failure: Failure) -> PipelineError {
        let failure = match failure {
            Failure::Store(e) if e.is_transient() => return PipelineError::Unavailable(e),
            f => f,
        };
        match self.keep(ev, &failure).await {
            Ok(id) if failure.is_rejection() => {
                info!(dead_letter_id = id, code = failure.code().as_str(), error = %failure, "event rejected and dead-lettered");
                PipelineError::Rejected { code: failure.code(), message: failure.to_string(), dead_letter_id: id }
            }
            Ok(id) => {
                error!(dead_letter_id = id, error = ?failure, "event processing failed; dead-lettered");
                PipelineError::DeadLettered { dead_letter_id: id, source: Box::new(failure) }
            }
            Err(dl) => {
                error!(error = ?failure, dead_letter_error = ?dl, "event processing failed and could not be dead-lettered");
                PipelineError::Lost(Box::new(failure))
            }
        }
    }

    /// Keeps an event that failed processing, with the reason; returns its id.
    pub async fn keep(&self, ev: &InboundEvent, failure: &Failure) -> Result<i64, StoreError> {
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

    /// Keeps an authenticated message that could not be routed or parsed; returns its id.
    pub async fn keep_unprocessed(
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
                            callplane_core::agent::resolve_org(
                                orgs,
                                None,
                                &msg,
                                self.processor.settings().org_hint_key.as_deref(),
                            )
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
                            match self.processor.process(&ev).await {
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
