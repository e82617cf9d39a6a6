//! `POST /vapi/{org_id}` and `POST /vapi`: every VAPI server message.
//!
//! Order of work: read the body (size-limited), authenticate the raw bytes, parse, resolve
//! the organization, hand the event to the intake (durable on local disk before it is
//! acknowledged), then answer. Messages that need an answer (`assistant-request`,
//! `tool-calls`, `function-call`, `transfer-destination-request`) are answered from memory
//! as soon as the answer is ready, within `vapi.answer_deadline_ms` whatever the database
//! does, while their event is recorded beside them; the rest are acknowledged with `{}` once
//! processed, or once queued when processing cannot finish now.
//!
//! An answer (`assistant-request`, `tool-calls`, `function-call`,
//! `transfer-destination-request`) does not wait for its event to be recorded: the answer does
//! not depend on it, the caller is on the line, and VAPI never sends an answered message again,
//! so waiting would protect nothing: a crash before the inbox's commit loses the event whether
//! or not the answer went out. What such an event tells (a call starting, a tool asked for),
//! the call's later events tell again, the end-of-call report with the whole call. Its event is
//! stored by the inbox's next group commit, a few milliseconds later, and processed as any other;
//! one that processing refuses (another organization's call id, a far-future time) becomes a
//! dead letter, logged, instead of a refused answer that would drop a caller.

use crate::throttle::ClientAddr;
use crate::{ApiError, AppState};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use callplane_core::ErrorCode;
use callplane_core::OrgId;
use callplane_core::agent::{self, Refusal};
use callplane_core::auth::AuthError;
use callplane_core::seams::{
    Accepted, InboundEvent, IntakeError, Processed, ReceivedWebhook, StoreError, Unprocessable,
};
use callplane_core::vapi::{self, MessageKind, ServerMessage};
use chrono::Utc;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tracing::{Instrument, info_span, warn};

pub async fn org_url(
    State(s): State<AppState>,
    client: ClientAddr,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(s, client, Some(org), headers, body).await
}

pub async fn shared_url(State(s): State<AppState>, client: ClientAddr, headers: HeaderMap, body: Body) -> Response {
    handle(s, client, None, headers, body).await
}

async fn handle(s: AppState, client: ClientAddr, path_org: Option<String>, headers: HeaderMap, body: Body) -> Response {
    let span = info_span!("vapi_webhook", org_id = tracing::field::Empty, kind = tracing::field::Empty);
    async move {
        let started = std::time::Instant::now();
        let mut kind = "unparsed";
        let result = receive(&s, &client, path_org, &headers, body, &mut kind).await;
        let outcome = match &result {
            Ok((_, outcome)) => *outcome,
            Err(e) => refused_outcome(e.code()),
        };
        s.metrics.webhook_event(kind, outcome, started.elapsed());
        match result {
            Ok((answer, _)) => (StatusCode::OK, Json(answer)).into_response(),
            Err(e) => e.into_response(),
        }
    }
    .instrument(span)
    .await
}

/// Keeps the metric's label set closed.
fn refused_outcome(code: ErrorCode) -> &'static str {
    use ErrorCode as C;
    match code {
        C::Overloaded => "shed",
        C::PayloadTooLarge => "too_large",
        C::MissingCredentials | C::InvalidCredentials | C::InvalidSignatureTimestamp | C::ExpiredSignature => {
            "unauthorized"
        }
        C::TooManyFailedAttempts => "throttled",
        C::UnknownOrganization => "unknown_organization",
        C::InternalError | C::ParserPanic => "failed",
        C::FutureTimestamp | C::StaleTimestamp | C::InvalidEvent | C::ProcessingFailed => "rejected",
        _ => "bad_request",
    }
}

async fn receive(
    s: &AppState,
    client: &ClientAddr,
    path_org: Option<String>,
    headers: &HeaderMap,
    body: Body,
    kind: &mut &'static str,
) -> Result<(Value, &'static str), ApiError> {
    let started = Instant::now();
    let received_at = Utc::now();
    let bytes: Bytes = axum::body::to_bytes(body, s.max_body_bytes).await.map_err(|_| {
        ApiError::client(
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than the {} bytes accepted", s.max_body_bytes),
        )
    })?;
    // A valid signature is always let through, throttled address or not: VAPI sends every
    // customer's webhooks from the same addresses, and does not retry a refused one. Checking
    // a signature costs no query; what a stream of wrong ones costs is the log, so past the
    // limit they are answered 429 without a log line each.
    let verified = s.webhook_auth.verify(|name| headers.get(name).and_then(|v| v.to_str().ok()), &bytes, received_at);
    if let Err(e) = verified {
        if e != AuthError::Missing {
            if let Err(throttled) = s.auth_throttle.check(client, None) {
                return Err(throttled.into());
            }
            s.auth_throttle.record_failure(client, None);
        }
        return Err(e.into());
    }
    let from_path = path_org.as_deref().and_then(|raw| raw.parse::<OrgId>().ok());
    let webhook = |org: Option<OrgId>, unprocessable: Option<Unprocessable>| ReceivedWebhook {
        received_at,
        path_org: path_org.clone(),
        org,
        body: bytes.clone(),
        unprocessable,
    };
    // A bug in the parser must not cost the event: it is kept for replay, and the sender is
    // told we failed (a 500), not that its body was wrong.
    let parsed = std::panic::catch_unwind(|| vapi::parse_body(&bytes));
    let msg = match parsed {
        Ok(Ok(msg)) => msg,
        Err(_) => {
            s.metrics.panicked();
            let why = "parsing the body panicked (a bug in callplane; see the log)";
            keep(s, webhook(from_path, Some(Unprocessable { code: "parser_panic".into(), reason: why.into() }))).await;
            return Err(ApiError::Internal(why.into()));
        }
        Ok(Err(e)) => {
            // Authenticated JSON in a shape we cannot read yet is kept for replay; garbage
            // and bodies without a type are only refused.
            if e.keeps_body() {
                keep(
                    s,
                    webhook(from_path, Some(Unprocessable { code: e.code().as_str().into(), reason: e.to_string() })),
                )
                .await;
            }
            return Err(e.into());
        }
    };
    *kind = msg.kind.label();
    tracing::Span::current().record("kind", msg.kind.label());
    let answers = matches!(
        msg.kind,
        MessageKind::AssistantRequest
            | MessageKind::ToolCalls
            | MessageKind::FunctionCall
            | MessageKind::TransferDestinationRequest
    );
    let deadline = s.answer_deadline;

    // The organization, from memory when known. A lookup the database cannot finish in time
    // leaves it open: the event is kept all the same and resolved when it is processed.
    let resolved = match (&path_org, from_path) {
        (Some(_), None) => Ok(None),
        _ => {
            let lookup = agent::resolve_org(s.agents.as_ref(), from_path, &msg, s.agent.org_hint_key.as_deref());
            match tokio::time::timeout(deadline, lookup).await {
                Ok(result) => result.map_err(Unresolved::Store),
                Err(_) => Err(Unresolved::Deadline),
            }
        }
    };
    let org_id = match resolved {
        Ok(Some(org_id)) => Some(org_id),
        Ok(None) => {
            if msg.kind == MessageKind::AssistantRequest {
                // The caller is waiting: VAPI speaks an `error` answered with 200.
                return Ok((agent::refusal_answer("Sorry, this number is not in service."), "answered"));
            }
            let e = unknown_org(path_org.as_deref().unwrap_or("(none in the URL, and no registry matched)"));
            if msg.kind != MessageKind::Unknown {
                let why =
                    "no organization matched the URL, the call, the phone number, the assistant or signed metadata";
                keep(s, webhook(None, Some(Unprocessable { code: e.code().as_str().into(), reason: why.into() })))
                    .await;
            }
            return Err(e);
        }
        Err(e) => {
            warn!(error = %e, "the organization could not be resolved now; keeping the event to resolve later");
            None
        }
    };
    if let Some(org_id) = org_id {
        tracing::Span::current().record("org_id", tracing::field::display(org_id));
    }
    if msg.kind == MessageKind::Unknown {
        return Ok((json!({}), "ignored"));
    }

    let webhook = webhook(org_id, None);
    if !answers {
        let event = org_id.map(|org_id| InboundEvent { org_id, received_at, message: msg });
        let outcome = match s.intake.accept(webhook, event, s.inline_budget, false).await? {
            Accepted::Processed(Processed::Applied) => "applied",
            Accepted::Processed(Processed::NoChange) => "no_change",
            Accepted::Processed(Processed::Ignored) => "ignored",
            Accepted::Queued | Accepted::Processed(Processed::Scheduled) => "queued",
            Accepted::DeadLettered => "dead_lettered",
        };
        return Ok((json!({}), outcome));
    }

    // The caller is on the line: the event is recorded in its own task, spawned first so that
    // it is recorded even if this request is dropped, and the answer goes as soon as it is
    // ready, within the deadline whatever happens.
    let event = org_id.map(|org_id| InboundEvent { org_id, received_at, message: msg.clone() });
    let intake = s.intake.clone();
    tokio::spawn(async move { log_answered_recording(&intake.accept(webhook, event, Duration::ZERO, true).await) });
    let remaining = deadline.saturating_sub(started.elapsed());
    let answer = match org_id {
        Some(org_id) => match tokio::time::timeout(remaining, answer(s, org_id, &msg)).await {
            Ok(answer) => answer,
            Err(_) => {
                warn!(deadline_ms = deadline.as_millis() as u64, "the answer was not ready by the deadline");
                unavailable_answer(&msg)
            }
        },
        None => unavailable_answer(&msg),
    };
    Ok((answer, "answered"))
}

/// What became of an answered event, recorded without the answer waiting for it.
fn log_answered_recording(recorded: &Result<Accepted, IntakeError>) {
    match recorded {
        Ok(_) => {}
        // Kept as a dead letter by the intake.
        Err(IntakeError::Rejected { code, .. }) => {
            tracing::info!(code = code.as_str(), "an answered event was refused; answered all the same")
        }
        // Counted as lost by the intake.
        Err(e) => tracing::error!(error = ?e, "an answered event could not be stored"),
    }
}

/// Why the organization is not known yet.
#[derive(Debug, thiserror::Error)]
enum Unresolved {
    #[error("looking it up took past the answer deadline")]
    Deadline,
    #[error(transparent)]
    Store(StoreError),
}

/// Keeps an unprocessable body (through the intake, so it survives the database being away)
/// to become a dead letter; failures are logged, never surfaced.
async fn keep(s: &AppState, webhook: ReceivedWebhook) {
    let code = webhook.unprocessable.as_ref().map(|u| u.code.clone()).unwrap_or_default();
    if let Err(e) = s.intake.accept(webhook, None, Duration::ZERO, true).await {
        tracing::error!(error = %e, code, "could not keep an unprocessable webhook");
    }
}

/// What VAPI is told when the answer cannot be made in time.
fn unavailable_answer(msg: &ServerMessage) -> Value {
    let unavailable = "The service is temporarily unavailable; please try again in a moment.";
    match msg.kind {
        MessageKind::ToolCalls => {
            agent::tool_calls_answer(msg.tool_calls.iter().map(|c| (c, Err(unavailable.to_owned()))).collect())
        }
        MessageKind::FunctionCall => json!({ "result": unavailable }),
        MessageKind::TransferDestinationRequest => json!({ "error": unavailable }),
        _ => agent::refusal_answer("Sorry, we cannot take your call right now. Please try again later."),
    }
}

fn unknown_org(raw: &str) -> ApiError {
    ApiError::client(
        ErrorCode::UnknownOrganization,
        format!("no organization {raw}; use the vapi_server_url printed by `callplane org create`"),
    )
}

/// The agent's answer. Storage trouble becomes a spoken or per-tool error with HTTP 200, as
/// VAPI requires, never a 5xx the caller would hear as silence.
async fn answer(s: &AppState, org_id: OrgId, msg: &ServerMessage) -> Value {
    match answer_or_fail(s, org_id, msg).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = ?e, "answering the agent failed; sending a spoken error");
            unavailable_answer(msg)
        }
    }
}

async fn answer_or_fail(s: &AppState, org_id: OrgId, msg: &ServerMessage) -> Result<Value, ApiError> {
    match msg.kind {
        MessageKind::AssistantRequest => assistant_request(s, org_id, msg).await,
        MessageKind::ToolCalls => {
            let data = s.agents.function_data(org_id).await?;
            let results = msg.tool_calls.iter().map(|call| (call, agent::tool_result(call, data.get(&call.name))));
            Ok(agent::tool_calls_answer(results.collect()))
        }
        MessageKind::FunctionCall => {
            let Some(call) = msg.tool_calls.first() else {
                return Ok(json!({ "result": "No function was named." }));
            };
            let data = s.agents.function_data(org_id).await?;
            Ok(match agent::tool_result(call, data.get(&call.name)) {
                Ok(result) => json!({ "result": result }),
                Err(error) => json!({ "result": error }),
            })
        }
        // `transferDestination` holds either the whole answer (`{"destination", "message"}`)
        // or just the destination.
        MessageKind::TransferDestinationRequest => {
            let data = s.agents.function_data(org_id).await?;
            Ok(match data.get("transferDestination").cloned() {
                Some(answer) if answer.get("destination").is_some() => answer,
                Some(destination) => json!({ "destination": destination }),
                None => json!({ "error": "No transfer destination is configured." }),
            })
        }
        _ => Ok(json!({})),
    }
}

/// The period's total for a hard-limit admission, from the counter within a quarter of the
/// answer deadline; past it (or when the counter fails), the last total this process saw.
async fn admission_usage(s: &AppState, org: &callplane_core::Organization) -> i64 {
    let budget = s.answer_deadline / 4;
    let fallback = || s.metering.last_seen(org.id, org.period_start).unwrap_or(org.seconds_used);
    match tokio::time::timeout(budget, s.metering.used(org.id, org.period_start)).await {
        Ok(Ok(used)) => used,
        Ok(Err(e)) => {
            warn!(error = %callplane_core::error_chain(&e), "the usage counter failed; admitting on the last total seen");
            fallback()
        }
        Err(_) => {
            warn!(
                budget_ms = budget.as_millis() as u64,
                "the usage counter did not answer in time; admitting on the last total seen"
            );
            fallback()
        }
    }
}

async fn assistant_request(s: &AppState, org_id: OrgId, msg: &ServerMessage) -> Result<Value, ApiError> {
    let now = Utc::now();
    let Some(org) = s.agents.get(org_id).await? else {
        return Ok(agent::refusal_answer("Sorry, this number is not in service."));
    };
    let org = org.as_of(now);
    let refuse = |r: Refusal| {
        tracing::info!(code = r.code, "assistant-request refused");
        Ok(agent::refusal_answer(&r.spoken))
    };
    let Some(plan) = s.plans.get(&org.plan) else {
        tracing::error!(plan = %org.plan, "organization is on a plan missing from configuration");
        return refuse(Refusal { code: "unknown_plan", spoken: "Sorry, this line is not available right now.".into() });
    };
    let used = if plan.hard_limit { admission_usage(s, &org).await } else { 0 };
    let max_seconds = match agent::admit(&org, plan, used, now, &s.agent) {
        Ok(seconds) => seconds,
        Err(r) => return refuse(r),
    };
    let Some(assistant_id) = org.default_assistant_id.clone().or_else(|| s.fallback_assistant_id.clone()) else {
        return refuse(Refusal { code: "no_assistant", spoken: "Sorry, this line is not set up yet.".into() });
    };
    let preload = s.agents.function_data(org_id).await?;
    Ok(agent::assistant_answer(
        &org,
        msg.call_id.as_deref(),
        &assistant_id,
        max_seconds,
        (*preload).clone(),
        s.agent.org_hint_key.as_deref(),
    ))
}
