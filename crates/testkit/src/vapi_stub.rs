//! A VAPI-compatible stub of the REST API callplane calls to reconcile calls that never
//! finished: `GET /call/{id}` answers the Call object a test registered, in VAPI's schema
//! (shared/vapi/SPEC.md §3.1 and §16, built from the shared samples so the same parser reads
//! both), 404 for an id it does not know, 401 without the right bearer key. It records every
//! request for tests to assert.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The shared sample end-of-call report: its `call` snapshot, artifact, analysis and costs
/// are what VAPI's Call object holds once the call is over.
const SAMPLE_REPORT: &str = include_str!("../../../tests/fixtures/vapi/09-end-of-call-report.json");

/// What VAPI answers to a key it does not accept.
const INVALID_KEY: &str =
    "Invalid Key. Hot tip, you may be using the private key instead of the public key, or vice versa.";

/// One request as the stub received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Whether it carried the stub's API key as a bearer token.
    pub authorized: bool,
}

#[derive(Default)]
struct Calls {
    api_key: String,
    calls: HashMap<String, Value>,
    /// Ids answered with this HTTP status instead of their call.
    failures: HashMap<String, u16>,
    requests: Vec<Recorded>,
}

#[derive(Clone, Default)]
pub struct VapiStub {
    state: Arc<Mutex<Calls>>,
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn nest_error(status: StatusCode, message: &str, error: Option<&str>) -> Response {
    let mut body = json!({ "message": message, "statusCode": status.as_u16() });
    if let Some(e) = error {
        body["error"] = json!(e);
    }
    (status, axum::Json(body)).into_response()
}

impl VapiStub {
    /// Serves on a random loopback port, accepting `api_key` as VAPI's private key; returns
    /// the stub and its base URL (the `vapi.api_url` to use).
    pub async fn start(api_key: &str) -> anyhow::Result<(Self, String)> {
        let stub = VapiStub::default();
        stub.with(|s| s.api_key = api_key.to_owned());
        let app = Router::new()
            .route("/call/{id}", get(get_call))
            .fallback(|method: Method, uri: Uri| async move {
                nest_error(StatusCode::NOT_FOUND, &format!("Cannot {method} {}", uri.path()), Some("Not Found"))
            })
            .layer(axum::middleware::from_fn_with_state(stub.clone(), authorize))
            .with_state(stub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((stub, url))
    }

    /// Registers (or replaces) a Call object under its `id`.
    pub fn put_call(&self, call: Value) {
        let Some(id) = call.get("id").and_then(Value::as_str).map(str::to_owned) else { return };
        self.with(|s| s.calls.insert(id, call));
    }

    /// Answers `GET /call/{id}` with `status` (e.g. 500, 503, 429) from now on.
    pub fn fail_call(&self, id: &str, status: u16) {
        self.with(|s| s.failures.insert(id.to_owned(), status));
    }

    /// Answers `GET /call/{id}` with its call again.
    pub fn clear_failure(&self, id: &str) {
        self.with(|s| s.failures.remove(id));
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.with(|s| s.requests.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&mut Calls) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }
}

/// Checks the private key like VAPI does and records the request.
async fn authorize(
    State(stub): State<VapiStub>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let authorized = stub.with(|s| {
        let ok = given.is_some_and(|k| !s.api_key.is_empty() && k == s.api_key);
        s.requests.push(Recorded {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            authorized: ok,
        });
        ok
    });
    if !authorized {
        return nest_error(StatusCode::UNAUTHORIZED, INVALID_KEY, Some("Unauthorized"));
    }
    next.run(req).await
}

async fn get_call(State(stub): State<VapiStub>, Path(id): Path<String>) -> Response {
    let (call, failure) = stub.with(|s| (s.calls.get(&id).cloned(), s.failures.get(&id).copied()));
    if let Some(status) = failure.and_then(|f| StatusCode::from_u16(f).ok()) {
        let message = status.canonical_reason().unwrap_or("Error");
        return nest_error(status, message, None);
    }
    match call {
        Some(call) => axum::Json(call).into_response(),
        None => nest_error(StatusCode::NOT_FOUND, "Not Found", None),
    }
}

fn sample_report() -> Value {
    serde_json::from_str::<Value>(SAMPLE_REPORT).map(|mut v| v["message"].take()).unwrap_or(Value::Null)
}

/// The sample call as VAPI holds it at creation, re-addressed to `id` and `created_at`.
fn snapshot(report: &Value, id: &str, created_at: DateTime<Utc>, status: &str) -> Value {
    let mut call = report.get("call").cloned().unwrap_or_else(|| json!({}));
    call["id"] = json!(id);
    call["createdAt"] = json!(iso(created_at));
    call["updatedAt"] = json!(iso(created_at));
    call["status"] = json!(status);
    call
}

/// A Call object as `GET /call/{id}` answers it once the call is over: started two seconds
/// after `created_at`, lasting `duration_seconds`, with the sample's costs, artifact
/// (transcript, messages, recording) and analysis.
pub fn ended_call(id: &str, created_at: DateTime<Utc>, duration_seconds: f64, ended_reason: &str) -> Value {
    let report = sample_report();
    let started = created_at + Duration::seconds(2);
    let ended = started + Duration::milliseconds((duration_seconds * 1000.0).round() as i64);
    let mut call = snapshot(&report, id, created_at, "ended");
    call["updatedAt"] = json!(iso(ended + Duration::seconds(4)));
    call["endedReason"] = json!(ended_reason);
    call["startedAt"] = json!(iso(started));
    call["endedAt"] = json!(iso(ended));
    for key in ["cost", "costBreakdown", "costs", "artifact", "analysis"] {
        call[key] = report.get(key).cloned().unwrap_or(Value::Null);
    }
    call["messages"] = report.pointer("/artifact/messages").cloned().unwrap_or_else(|| json!([]));
    call
}

/// A Call object for a call VAPI has not finished: `status` is `queued`, `ringing`,
/// `in-progress` or `forwarding`; a call in progress has started.
pub fn open_call(id: &str, created_at: DateTime<Utc>, status: &str) -> Value {
    let report = sample_report();
    let mut call = snapshot(&report, id, created_at, status);
    if matches!(status, "in-progress" | "forwarding") {
        call["startedAt"] = json!(iso(created_at + Duration::seconds(2)));
    }
    call
}
