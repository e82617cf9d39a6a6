//! `POST /vapi/{org_id}` and `POST /vapi`: every VAPI server message.
//!
//! Order of work: read the body (size-limited), authenticate the raw bytes, parse, resolve
//! the organization, then answer. Messages that need an answer (`assistant-request`,
//! `tool-calls`, `function-call`, `transfer-destination-request`) are answered while the
//! event is recorded alongside; the rest are recorded and acknowledged with `{}`.

use crate::{ApiError, AppState};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use callplane_core::OrgId;
use callplane_core::agent::{self, Refusal};
use callplane_core::seams::{InboundEvent, PipelineError, Processed};
use callplane_core::vapi::{self, MessageKind, ParseError, ServerMessage};
use chrono::Utc;
use serde_json::{Value, json};
use tracing::{Instrument, info_span, warn};

pub async fn org_url(State(s): State<AppState>, Path(org): Path<String>, headers: HeaderMap, body: Body) -> Response {
    handle(s, Some(org), headers, body).await
}

pub async fn shared_url(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    handle(s, None, headers, body).await
}

async fn handle(s: AppState, path_org: Option<String>, headers: HeaderMap, body: Body) -> Response {
    let span = info_span!("vapi_webhook", org_id = tracing::field::Empty, kind = tracing::field::Empty);
    async move {
        let started = std::time::Instant::now();
        let mut kind = "unparsed";
        let result = receive(&s, path_org, &headers, body, &mut kind).await;
        let outcome = match &result {
            Ok((_, outcome)) => *outcome,
            Err(e) => e.code(),
        };
        s.metrics.webhook_event(kind, outcome_label(outcome), started.elapsed());
        match result {
            Ok((answer, _)) => (StatusCode::OK, Json(answer)).into_response(),
            Err(e) => e.into_response(),
        }
    }
    .instrument(span)
    .await
}

/// Keeps the metric's label set closed.
fn outcome_label(outcome: &str) -> &'static str {
    match outcome {
        "applied" => "applied",
        "no_change" => "no_change",
        "ignored" => "ignored",
        "answered" => "answered",
        "payload_too_large" => "too_large",
        "missing_credentials" | "invalid_credentials" | "invalid_signature_timestamp" | "expired_signature" => {
            "unauthorized"
        }
        "unknown_organization" => "unknown_organization",
        "internal_error" => "dead_lettered",
        "future_timestamp" | "stale_timestamp" | "invalid_event" => "rejected",
        _ => "bad_request",
    }
}

/// How long an answer waits to learn whether recording the event was refused. The answer
/// never waits longer for storage: the caller is on the line.
const RECORDING_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

async fn receive(
    s: &AppState,
    path_org: Option<String>,
    headers: &HeaderMap,
    body: Body,
    kind: &mut &'static str,
) -> Result<(Value, &'static str), ApiError> {
    let received_at = Utc::now();
    let bytes: Bytes = axum::body::to_bytes(body, s.max_body_bytes).await.map_err(|_| {
        ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than the {} bytes accepted", s.max_body_bytes),
        )
    })?;
    s.webhook_auth.verify(|name| headers.get(name).and_then(|v| v.to_str().ok()), &bytes, received_at)?;
    let from_path = path_org.as_deref().and_then(|raw| raw.parse::<OrgId>().ok());
    let msg = match vapi::parse_body(&bytes) {
        Ok(msg) => msg,
        Err(e) => {
            // Authenticated JSON in a shape we cannot read yet is kept for replay; garbage
            // and bodies without a type are only refused.
            if matches!(e, ParseError::InvalidTimestamp { .. } | ParseError::InvalidMessage(_)) {
                keep(s, from_path, &bytes, e.code(), &e.to_string(), received_at).await;
            }
            return Err(e.into());
        }
    };
    *kind = msg.kind.label();
    tracing::Span::current().record("kind", msg.kind.label());

    let resolved = match (&path_org, from_path) {
        (Some(_), None) => None,
        _ => agent::resolve_org(s.orgs.as_ref(), from_path, &msg, s.agent.org_hint_key.as_deref()).await?,
    };
    let Some(org_id) = resolved else {
        if msg.kind == MessageKind::AssistantRequest {
            // The caller is waiting: VAPI speaks an `error` answered with 200.
            return Ok((agent::refusal_answer("Sorry, this number is not in service."), "answered"));
        }
        let e = unknown_org(path_org.as_deref().unwrap_or("(none in the URL, and no registry matched)"));
        if msg.kind != MessageKind::Unknown {
            let why = "no organization matched the URL, the call, the phone number, the assistant or signed metadata";
            keep(s, None, &bytes, e.code(), why, received_at).await;
        }
        return Err(e);
    };
    tracing::Span::current().record("org_id", tracing::field::display(org_id));

    let event = InboundEvent { org_id, received_at, message: msg.clone() };
    match msg.kind {
        MessageKind::AssistantRequest
        | MessageKind::ToolCalls
        | MessageKind::FunctionCall
        | MessageKind::TransferDestinationRequest => {
            let pipeline = s.pipeline.clone();
            let mut recording = tokio::spawn(async move { pipeline.submit(event).await });
            let answer = answer(s, org_id, &msg).await;
            match tokio::time::timeout(RECORDING_BUDGET, &mut recording).await {
                Ok(Ok(Err(e @ PipelineError::Rejected { .. }))) => return Err(e.into()),
                // Dead-lettered: the answer still goes out, the event waits for replay.
                Ok(Ok(Err(e))) => warn!(error = %e, "recording the event failed; answering anyway"),
                Ok(Err(e)) => warn!(error = %e, "recording the event panicked; answering anyway"),
                Ok(Ok(Ok(_))) => {}
                Err(_) => warn!("recording is slow; answering without waiting (it continues)"),
            }
            Ok((answer, "answered"))
        }
        MessageKind::Unknown => Ok((json!({}), "ignored")),
        _ => {
            let outcome = match s.pipeline.submit(event).await? {
                Processed::Applied => "applied",
                Processed::NoChange => "no_change",
                Processed::Ignored => "ignored",
            };
            Ok((json!({}), outcome))
        }
    }
}

/// Keeps an unprocessable body as a dead letter; failures are logged, never surfaced.
async fn keep(
    s: &AppState,
    org: Option<OrgId>,
    bytes: &[u8],
    code: &str,
    error: &str,
    received_at: chrono::DateTime<Utc>,
) {
    let body: Value =
        serde_json::from_slice(bytes).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(bytes) }));
    match s.pipeline.keep_unprocessed(org, &body, code, error, received_at).await {
        Ok(id) => tracing::info!(dead_letter_id = id, code, "unprocessable webhook kept"),
        Err(e) => tracing::error!(error = %e, code, "could not keep an unprocessable webhook"),
    }
}

fn unknown_org(raw: &str) -> ApiError {
    ApiError::client(
        StatusCode::NOT_FOUND,
        "unknown_organization",
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
            let unavailable = "The service is temporarily unavailable; please try again in a moment.";
            match msg.kind {
                MessageKind::ToolCalls => {
                    agent::tool_calls_answer(msg.tool_calls.iter().map(|c| (c, Err(unavailable.to_owned()))).collect())
                }
                MessageKind::FunctionCall => json!({ "result": unavailable }),
                _ => agent::refusal_answer("Sorry, we cannot take your call right now. Please try again later."),
            }
        }
    }
}

async fn answer_or_fail(s: &AppState, org_id: OrgId, msg: &ServerMessage) -> Result<Value, ApiError> {
    match msg.kind {
        MessageKind::AssistantRequest => assistant_request(s, org_id).await,
        MessageKind::ToolCalls => {
            let mut results = Vec::with_capacity(msg.tool_calls.len());
            for call in &msg.tool_calls {
                let data = s.function_data.get(org_id, &call.name).await?;
                results.push((call, agent::tool_result(call, data.as_ref())));
            }
            Ok(agent::tool_calls_answer(results))
        }
        MessageKind::FunctionCall => {
            let Some(call) = msg.tool_calls.first() else {
                return Ok(json!({ "result": "No function was named." }));
            };
            let data = s.function_data.get(org_id, &call.name).await?;
            Ok(match agent::tool_result(call, data.as_ref()) {
                Ok(result) => json!({ "result": result }),
                Err(error) => json!({ "result": error }),
            })
        }
        // `transferDestination` holds either the whole answer (`{"destination", "message"}`)
        // or just the destination.
        MessageKind::TransferDestinationRequest => {
            Ok(match s.function_data.get(org_id, "transferDestination").await? {
                Some(answer) if answer.get("destination").is_some() => answer,
                Some(destination) => json!({ "destination": destination }),
                None => json!({ "error": "No transfer destination is configured." }),
            })
        }
        _ => Ok(json!({})),
    }
}

async fn assistant_request(s: &AppState, org_id: OrgId) -> Result<Value, ApiError> {
    let now = Utc::now();
    let Some(org) = s.orgs.get(org_id).await? else {
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
    let max_seconds = match agent::admit(&org, plan, now, &s.agent) {
        Ok(seconds) => seconds,
        Err(r) => return refuse(r),
    };
    let Some(assistant_id) = org.default_assistant_id.clone().or_else(|| s.fallback_assistant_id.clone()) else {
        return refuse(Refusal { code: "no_assistant", spoken: "Sorry, this line is not set up yet.".into() });
    };
    let preload = s.function_data.preload(org_id).await?;
    Ok(agent::assistant_answer(&org, &assistant_id, max_seconds, preload, s.agent.org_hint_key.as_deref()))
}
