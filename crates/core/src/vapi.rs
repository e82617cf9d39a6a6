//! VAPI's server messages (`{"message": {...}}`), parsed the way real payloads need.
//!
//! Every field is optional and unknown keys are ignored (SPEC.md §2, §14). Timestamps arrive as
//! epoch milliseconds or ISO-8601 strings, tool arguments as an object or a JSON string, and
//! the `call` inside a message may be a stale snapshot, so the message's own fields win.

use crate::ErrorCode;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Why a body could not be read as a VAPI server message. Each has a stable code.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the body has no `message` object; VAPI sends {{\"message\": {{\"type\": ...}}}}")]
    MissingMessage,
    #[error("`message.type` is missing or not a string")]
    MissingType,
    #[error("`message` does not match VAPI's schema: {0}")]
    InvalidMessage(String),
    #[error("`{field}` is not a valid timestamp between 1970 and 9999: {value}")]
    InvalidTimestamp { field: &'static str, value: String },
    #[error("`{field}` is not a call duration (0 to {max} seconds): {value}")]
    InvalidDuration { field: &'static str, value: f64, max: i64 },
    #[error("`{field}` is {chars} characters long; ids are at most {max}")]
    IdTooLong { field: &'static str, chars: usize, max: usize },
}

impl ParseError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::MalformedJson(_) => ErrorCode::MalformedJson,
            ParseError::MissingMessage => ErrorCode::MissingMessage,
            ParseError::MissingType => ErrorCode::MissingType,
            ParseError::InvalidMessage(_) => ErrorCode::InvalidMessage,
            ParseError::InvalidTimestamp { .. } => ErrorCode::InvalidTimestamp,
            ParseError::InvalidDuration { .. } => ErrorCode::InvalidDuration,
            ParseError::IdTooLong { .. } => ErrorCode::IdTooLong,
        }
    }

    /// Whether the body is authentic VAPI JSON that callplane refuses to apply as sent: it is
    /// kept (as a dead letter) so nothing is lost, rather than only refused.
    pub fn keeps_body(&self) -> bool {
        matches!(
            self,
            ParseError::InvalidMessage(_)
                | ParseError::InvalidTimestamp { .. }
                | ParseError::InvalidDuration { .. }
                | ParseError::IdTooLong { .. }
        )
    }
}

/// The message types callplane acts on; everything else is acknowledged and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    AssistantRequest,
    ToolCalls,
    FunctionCall,
    StatusUpdate,
    EndOfCallReport,
    ConversationUpdate,
    Transcript,
    SpeechUpdate,
    Hang,
    UserInterrupted,
    TransferDestinationRequest,
    Unknown,
}

impl MessageKind {
    pub fn from_type(t: &str) -> Self {
        match t {
            "assistant-request" => MessageKind::AssistantRequest,
            "tool-calls" => MessageKind::ToolCalls,
            "function-call" => MessageKind::FunctionCall,
            "status-update" => MessageKind::StatusUpdate,
            "end-of-call-report" => MessageKind::EndOfCallReport,
            "conversation-update" => MessageKind::ConversationUpdate,
            // SPEC §5.6: the finals-only subscription sends this literal as the type.
            "transcript" | "transcript[transcriptType=\"final\"]" => MessageKind::Transcript,
            "speech-update" => MessageKind::SpeechUpdate,
            "hang" => MessageKind::Hang,
            "user-interrupted" => MessageKind::UserInterrupted,
            "transfer-destination-request" => MessageKind::TransferDestinationRequest,
            _ => MessageKind::Unknown,
        }
    }

    /// A label for metrics and logs; unknown types share one label so they cannot blow up
    /// the metric cardinality.
    pub fn label(self) -> &'static str {
        match self {
            MessageKind::AssistantRequest => "assistant-request",
            MessageKind::ToolCalls => "tool-calls",
            MessageKind::FunctionCall => "function-call",
            MessageKind::StatusUpdate => "status-update",
            MessageKind::EndOfCallReport => "end-of-call-report",
            MessageKind::ConversationUpdate => "conversation-update",
            MessageKind::Transcript => "transcript",
            MessageKind::SpeechUpdate => "speech-update",
            MessageKind::Hang => "hang",
            MessageKind::UserInterrupted => "user-interrupted",
            MessageKind::TransferDestinationRequest => "transfer-destination-request",
            MessageKind::Unknown => "unknown",
        }
    }
}

/// A timestamp as VAPI sends it: epoch milliseconds (possibly fractional) or ISO-8601.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RawTime {
    Millis(f64),
    Text(String),
}

impl RawTime {
    /// The instant, when it is one callplane accepts: between 1970 and 9999 (what every date
    /// library and PostgreSQL handle with room to spare).
    pub fn to_utc(&self) -> Option<DateTime<Utc>> {
        self.instant().filter(|t| (1970..=9999).contains(&t.year()))
    }

    fn instant(&self) -> Option<DateTime<Utc>> {
        match self {
            // Outside i64 the cast would saturate into a wrong, in-range instant.
            RawTime::Millis(ms) if ms.is_finite() && ms.abs() < 1e17 => {
                Utc.timestamp_millis_opt(ms.round() as i64).single()
            }
            RawTime::Millis(_) => None,
            RawTime::Text(s) => {
                if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                    return Some(t.with_timezone(&Utc));
                }
                // Some payloads carry epoch milliseconds as a string.
                s.trim().parse::<f64>().ok().and_then(|ms| RawTime::Millis(ms).to_utc())
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            RawTime::Millis(ms) => ms.to_string(),
            RawTime::Text(s) => s.clone(),
        }
    }
}

fn time(field: &'static str, raw: &Option<RawTime>) -> Result<Option<DateTime<Utc>>, ParseError> {
    match raw {
        None => Ok(None),
        Some(r) => r.to_utc().map(Some).ok_or_else(|| ParseError::InvalidTimestamp { field, value: r.describe() }),
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawCustomer {
    pub number: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawOverrides {
    pub variable_values: Option<Map<String, Value>>,
    pub metadata: Option<Map<String, Value>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawCall {
    pub id: Option<String>,
    pub org_id: Option<String>,
    pub created_at: Option<RawTime>,
    #[serde(rename = "type")]
    pub call_type: Option<String>,
    pub status: Option<String>,
    pub ended_reason: Option<String>,
    pub started_at: Option<RawTime>,
    pub ended_at: Option<RawTime>,
    pub cost: Option<f64>,
    pub phone_number_id: Option<String>,
    pub assistant_id: Option<String>,
    pub customer: Option<RawCustomer>,
    pub assistant_overrides: Option<RawOverrides>,
    /// Legacy: older payloads carried `call.metadata`.
    pub metadata: Option<Map<String, Value>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawPhoneNumber {
    pub id: Option<String>,
    pub number: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawMono {
    pub combined_url: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawRecording {
    pub mono: Option<RawMono>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawArtifact {
    pub transcript: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub recording_url: Option<String>,
    pub recording: Option<RawRecording>,
    pub variable_values: Option<Map<String, Value>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawAnalysis {
    pub summary: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawFunction {
    pub name: Option<String>,
    pub arguments: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawToolCall {
    pub id: Option<String>,
    pub function: Option<RawFunction>,
    // Flat shapes seen in docs and skills (SPEC §13.1).
    pub name: Option<String>,
    pub arguments: Option<Value>,
    pub parameters: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawToolWithToolCall {
    pub tool_call: Option<RawToolCall>,
    pub function: Option<RawFunction>,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawFunctionCall {
    pub name: Option<String>,
    pub parameters: Option<Value>,
}

/// The fields of `message` callplane reads. Everything else stays in the raw payload.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawMessage {
    #[serde(rename = "type")]
    pub message_type: Option<Value>,
    pub timestamp: Option<RawTime>,
    pub call: Option<RawCall>,
    pub phone_number: Option<RawPhoneNumber>,
    pub customer: Option<RawCustomer>,
    pub artifact: Option<RawArtifact>,
    pub analysis: Option<RawAnalysis>,
    pub status: Option<String>,
    pub ended_reason: Option<String>,
    pub started_at: Option<RawTime>,
    pub ended_at: Option<RawTime>,
    pub cost: Option<f64>,
    pub duration_ms: Option<f64>,
    pub duration_seconds: Option<f64>,
    pub duration_minutes: Option<f64>,
    pub summary: Option<String>,
    pub transcript: Option<String>,
    pub transcript_type: Option<String>,
    pub role: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub recording_url: Option<String>,
    pub tool_call_list: Option<Vec<RawToolCall>>,
    pub tool_calls: Option<Vec<RawToolCall>>,
    pub tool_with_tool_call_list: Option<Vec<RawToolWithToolCall>>,
    pub function_call: Option<RawFunctionCall>,
}

/// One tool invocation to answer, normalised from the several shapes VAPI has used.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Map<String, Value>,
}

/// The final facts of a call, from `end-of-call-report` (message fields first, the stale
/// `call` snapshot never).
#[derive(Clone, Debug, PartialEq)]
pub struct CallReport {
    pub ended_reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_seconds: Option<f64>,
    pub cost: Option<f64>,
    pub summary: Option<String>,
    pub recording_url: Option<String>,
    pub transcript: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub analysis: Option<Value>,
    pub costs: Option<Value>,
}

/// A parsed VAPI server message: what callplane needs, normalised, plus the raw object.
#[derive(Clone, Debug)]
pub struct ServerMessage {
    pub kind: MessageKind,
    /// The `type` exactly as sent.
    pub message_type: String,
    pub timestamp: Option<DateTime<Utc>>,
    pub call_id: Option<String>,
    pub call_created_at: Option<DateTime<Utc>>,
    pub call_type: Option<String>,
    /// The status this message asserts: `status-update.status`, `ended` for an
    /// end-of-call report, else the (possibly stale) snapshot's status.
    pub status: Option<String>,
    pub ended_reason: Option<String>,
    pub phone_number_id: Option<String>,
    pub phone_number: Option<String>,
    pub assistant_id: Option<String>,
    pub customer_number: Option<String>,
    /// `callplaneOrgId` from the call's metadata, if present, with its signature
    /// `callplaneOrgSig`. Trusted only when the signature verifies for this organization and
    /// this call id: web and outbound callers can set metadata themselves.
    pub metadata_org_id: Option<(String, String)>,
    pub report: Option<CallReport>,
    pub tool_calls: Vec<ToolCall>,
    /// Conversation so far (`conversation-update`), full history each time.
    pub conversation: Option<Vec<Value>>,
    /// The raw `message` object.
    pub raw: Value,
}

/// The metadata key callplane puts in `assistantOverrides.metadata` so later messages of the
/// call can be traced back to the organization.
pub const ORG_METADATA_KEY: &str = "callplaneOrgId";
/// The signature of `callplaneOrgId`, next to it.
pub const ORG_SIGNATURE_KEY: &str = "callplaneOrgSig";

/// Parses a webhook body. Only `message.type` is required.
pub fn parse_body(body: &[u8]) -> Result<ServerMessage, ParseError> {
    let mut root: Value = serde_json::from_slice(body).map_err(|e| ParseError::MalformedJson(e.to_string()))?;
    let message = match root.get_mut("message") {
        Some(m @ Value::Object(_)) => m.take(),
        _ => return Err(ParseError::MissingMessage),
    };
    parse_message(message)
}

/// The longest call callplane bills: a week, far past VAPI's own limit (`maxDurationSeconds`
/// is at most 12 hours). A longer or negative duration is not a call's.
pub const MAX_CALL_DURATION_SECONDS: i64 = 7 * 24 * 3600;

pub fn parse_message(mut message: Value) -> Result<ServerMessage, ParseError> {
    // Text PostgreSQL cannot store never costs an event (see `text`).
    crate::text::make_storable(&mut message);
    let message_type = match message.get("type") {
        Some(Value::String(t)) if !t.trim().is_empty() => t.clone(),
        _ => return Err(ParseError::MissingType),
    };
    // Read from the tree in place: cloning a 10-60 KB report's tree first cost more than
    // reading it.
    let raw = RawMessage::deserialize(&message).map_err(|e| ParseError::InvalidMessage(e.to_string()))?;
    let kind = MessageKind::from_type(&message_type);
    let call = raw.call.clone().unwrap_or_default();

    let timestamp = time("message.timestamp", &raw.timestamp)?;
    let call_created_at = time("message.call.createdAt", &call.created_at)?;

    let report = if kind == MessageKind::EndOfCallReport { Some(report(&raw, &message)?) } else { None };
    let status = match kind {
        MessageKind::EndOfCallReport => Some("ended".to_owned()),
        MessageKind::StatusUpdate => raw.status.clone(),
        _ => call.status.clone(),
    };
    let ended_reason = match kind {
        MessageKind::EndOfCallReport | MessageKind::StatusUpdate => raw.ended_reason.clone(),
        _ => None,
    };
    let tool_calls = match kind {
        MessageKind::ToolCalls => tool_calls(&raw),
        MessageKind::FunctionCall => legacy_function_call(&raw).into_iter().collect(),
        _ => Vec::new(),
    };
    let conversation = match kind {
        MessageKind::ConversationUpdate => raw.messages.clone(),
        _ => None,
    };
    let metadata_org_id = org_hint(&call);

    let parsed = ServerMessage {
        kind,
        message_type,
        timestamp,
        call_id: non_empty(call.id.clone()),
        call_created_at,
        call_type: call.call_type.clone(),
        status,
        ended_reason,
        phone_number_id: non_empty(
            call.phone_number_id.clone().or(raw.phone_number.as_ref().and_then(|p| p.id.clone())),
        ),
        phone_number: raw.phone_number.as_ref().and_then(|p| p.number.clone()),
        assistant_id: non_empty(call.assistant_id.clone()),
        customer_number: call
            .customer
            .as_ref()
            .and_then(|c| c.number.clone())
            .or(raw.customer.as_ref().and_then(|c| c.number.clone())),
        metadata_org_id,
        report,
        tool_calls,
        conversation,
        raw: message,
    };
    check_ids(&parsed)?;
    Ok(parsed)
}

/// Ids longer than any real one are refused: they are abuse, and would overflow indexes and
/// notification payloads downstream.
fn check_ids(m: &ServerMessage) -> Result<(), ParseError> {
    let ids = [
        ("message.call.id", m.call_id.as_deref()),
        ("message.call.phoneNumberId", m.phone_number_id.as_deref()),
        ("message.phoneNumber.number", m.phone_number.as_deref()),
        ("message.call.assistantId", m.assistant_id.as_deref()),
        ("message.call.customer.number", m.customer_number.as_deref()),
    ];
    let tool_ids = m.tool_calls.iter().map(|c| ("message.toolCallList[].id", Some(c.id.as_str())));
    for (field, id) in ids.into_iter().chain(tool_ids) {
        let chars = id.map_or(0, |id| id.chars().count());
        if chars > crate::text::MAX_ID_CHARS {
            return Err(ParseError::IdTooLong { field, chars, max: crate::text::MAX_ID_CHARS });
        }
    }
    Ok(())
}

/// A duration field, checked: finite, not negative, at most a week.
fn duration(field: &'static str, value: Option<f64>, to_seconds: f64) -> Result<Option<f64>, ParseError> {
    let Some(value) = value else { return Ok(None) };
    let seconds = value * to_seconds;
    if seconds.is_finite() && (0.0..=MAX_CALL_DURATION_SECONDS as f64).contains(&seconds) {
        Ok(Some(seconds))
    } else {
        Err(ParseError::InvalidDuration { field, value, max: MAX_CALL_DURATION_SECONDS })
    }
}

/// The seconds between two instants, when they are in order.
pub fn span(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> Option<f64> {
    match (start, end) {
        (Some(s), Some(e)) if e >= s => Some((e - s).num_milliseconds() as f64 / 1000.0),
        _ => None,
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// The signed organization hint, read only from the call's metadata (which callplane set at
/// `assistant-request`). Variable values are the caller's to set, so they are never read.
fn org_hint(call: &RawCall) -> Option<(String, String)> {
    let from = |m: Option<&Map<String, Value>>| {
        let m = m?;
        let id = m.get(ORG_METADATA_KEY).and_then(Value::as_str)?;
        let sig = m.get(ORG_SIGNATURE_KEY).and_then(Value::as_str)?;
        Some((id.to_owned(), sig.to_owned()))
    };
    from(call.assistant_overrides.as_ref().and_then(|o| o.metadata.as_ref())).or_else(|| from(call.metadata.as_ref()))
}

fn report(raw: &RawMessage, message: &Value) -> Result<CallReport, ParseError> {
    let started_at = time("message.startedAt", &raw.started_at)?;
    let ended_at = time("message.endedAt", &raw.ended_at)?;
    let call = raw.call.clone().unwrap_or_default();
    let call_started_at = time("message.call.startedAt", &call.started_at)?;
    let call_ended_at = time("message.call.endedAt", &call.ended_at)?;
    let no_artifact = RawArtifact::default();
    let artifact = raw.artifact.as_ref().unwrap_or(&no_artifact);
    // The best source present (BILLING in the README): the report's own duration fields,
    // then its times, then the call object's times. With none, the store falls back to the
    // times it recorded from status updates, and else marks the call for review.
    let duration_seconds = duration("message.durationSeconds", raw.duration_seconds, 1.0)?
        .or(duration("message.durationMs", raw.duration_ms, 0.001)?)
        .or(duration("message.durationMinutes", raw.duration_minutes, 60.0)?)
        .or(span(started_at, ended_at))
        .or(span(call_started_at, call_ended_at))
        .filter(|d| *d <= MAX_CALL_DURATION_SECONDS as f64);
    // SPEC §5.5: artifact first, legacy top-level copies second; an empty artifact list does
    // not hide a full legacy one.
    let messages = match (&artifact.messages, &raw.messages) {
        (Some(a), Some(legacy)) if a.is_empty() => Some(legacy.clone()),
        (Some(a), _) => Some(a.clone()),
        (None, legacy) => legacy.clone(),
    };
    // The analysis and cost items are kept whole, as VAPI sent them.
    let keep = |key: &str| message.get(key).filter(|v| !v.is_null()).cloned();
    Ok(CallReport {
        ended_reason: raw.ended_reason.clone(),
        started_at: started_at.or(call_started_at),
        ended_at: ended_at.or(call_ended_at),
        duration_seconds,
        cost: raw.cost,
        summary: raw.analysis.as_ref().and_then(|a| a.summary.clone()).or(raw.summary.clone()),
        recording_url: artifact
            .recording
            .as_ref()
            .and_then(|r| r.mono.as_ref())
            .and_then(|m| m.combined_url.clone())
            .or_else(|| artifact.recording_url.clone())
            .or_else(|| raw.recording_url.clone()),
        transcript: artifact.transcript.clone().or_else(|| raw.transcript.clone()),
        messages,
        analysis: keep("analysis"),
        costs: keep("costs"),
    })
}

/// Tool arguments arrive as an object or as a JSON-encoded string (SPEC §3.2).
pub fn arguments_object(v: Option<&Value>) -> Map<String, Value> {
    match v {
        Some(Value::Object(m)) => m.clone(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        },
        _ => Map::new(),
    }
}

fn normalise_tool_call(tc: &RawToolCall) -> Option<ToolCall> {
    let id = non_empty(tc.id.clone())?;
    let name = tc.function.as_ref().and_then(|f| f.name.clone()).or(tc.name.clone()).unwrap_or_default();
    let args =
        tc.function.as_ref().and_then(|f| f.arguments.as_ref()).or(tc.arguments.as_ref()).or(tc.parameters.as_ref());
    Some(ToolCall { id, name, arguments: arguments_object(args) })
}

fn tool_calls(raw: &RawMessage) -> Vec<ToolCall> {
    // `toolCallList` is authoritative; fall back to the other shapes VAPI has sent.
    let from_list = |list: &Option<Vec<RawToolCall>>| -> Vec<ToolCall> {
        list.iter().flatten().filter_map(normalise_tool_call).collect()
    };
    let mut calls = from_list(&raw.tool_call_list);
    if calls.is_empty() {
        calls = from_list(&raw.tool_calls);
    }
    if calls.is_empty() {
        calls = raw
            .tool_with_tool_call_list
            .iter()
            .flatten()
            .filter_map(|t| {
                let mut call = normalise_tool_call(t.tool_call.as_ref()?)?;
                if call.name.is_empty() {
                    call.name = t.function.as_ref().and_then(|f| f.name.clone()).or(t.name.clone()).unwrap_or_default();
                }
                Some(call)
            })
            .collect();
    }
    calls
}

fn legacy_function_call(raw: &RawMessage) -> Option<ToolCall> {
    let f = raw.function_call.as_ref()?;
    Some(ToolCall {
        id: String::new(),
        name: f.name.clone().unwrap_or_default(),
        arguments: arguments_object(f.parameters.as_ref()),
    })
}

/// How far a call has got. A call's status only moves forward (SPEC §7): a stale snapshot
/// or a late duplicate never moves it back.
pub fn status_rank(status: &str) -> Option<i16> {
    Some(match status {
        "scheduled" => 0,
        "queued" => 1,
        "ringing" => 2,
        "in-progress" => 3,
        "forwarding" => 4,
        "ended" | "not-found" | "deletion-failed" => 5,
        _ => return None,
    })
}
