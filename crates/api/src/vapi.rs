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
use callplane_core::vapi::{self, MessageKind, ServerMessage};
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
        "future_timestamp" | "invalid_event" => "rejected",
        _ => "bad_request",
    }
}

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
    let msg = vapi::parse_body(&bytes)?;
    *kind = msg.kind.label();
    tracing::Span::current().record("kind", msg.kind.label());

    let from_path = match path_org {
        Some(raw) => Some(raw.parse::<OrgId>().map_err(|_| unknown_org(&raw))?),
        None => None,
    };
    let Some(org_id) = agent::resolve_org(s.orgs.as_ref(), from_path, &msg).await? else {
        if msg.kind == MessageKind::AssistantRequest {
            // The caller is waiting: VAPI speaks an `error` answered with 200.
            return Ok((agent::refusal_answer("Sorry, this number is not in service."), "answered"));
        }
        return Err(unknown_org(&from_path.map(|o| o.to_string()).unwrap_or_else(|| "(none in the URL)".into())));
    };
    tracing::Span::current().record("org_id", tracing::field::display(org_id));

    let event = InboundEvent { org_id, received_at, message: msg.clone() };
    match msg.kind {
        MessageKind::AssistantRequest
        | MessageKind::ToolCalls
        | MessageKind::FunctionCall
        | MessageKind::TransferDestinationRequest => {
            let (recorded, answer) = tokio::join!(s.pipeline.submit(event), answer(s, org_id, &msg));
            // The agent's answer goes out even if recording failed: the event is in the
            // dead-letter table and the caller should not pay for our storage trouble.
            match recorded {
                Err(e @ PipelineError::Rejected { .. }) => return Err(e.into()),
                Err(e) => warn!(error = %e, "recording the event failed; answering anyway"),
                Ok(_) => {}
            }
            Ok((answer?, "answered"))
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

fn unknown_org(raw: &str) -> ApiError {
    ApiError::client(
        StatusCode::NOT_FOUND,
        "unknown_organization",
        format!("no organization {raw}; use the vapi_server_url printed by `callplane org create`"),
    )
}

async fn answer(s: &AppState, org_id: OrgId, msg: &ServerMessage) -> Result<Value, ApiError> {
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
    Ok(agent::assistant_answer(&org, &assistant_id, max_seconds, preload))
}
