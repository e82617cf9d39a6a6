//! VAPI server messages for simulated calls.
//!
//! Every message starts from one of the sample payloads in `tests/fixtures/vapi` (compiled in),
//! so field names and shapes are exactly VAPI's; the simulator then replaces what differs per
//! call: the call id, `createdAt`, the caller, the conversation, the times and the durations.
//! A [`CallScript`] holds one call's facts and renders each of its messages on demand, so a
//! thousand calls in flight do not keep thousands of large bodies in memory.

use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rand::Rng;
use serde_json::{Value, json};

use crate::plan::{CallSpec, Lifecycle};
use crate::random::{chance, pick};

/// The call id used throughout the fixtures; replaced by a placeholder when they are loaded.
const FIXTURE_CALL_ID: &str = "019cd8a1-3b2e-7c4d-9f1a-6e5b4c3d2a10";
/// Stands for the call id inside templates; swapped for the real id in the serialized body,
/// which also reaches the ids embedded in recording, log and monitor URLs.
const CALL_ID_SLOT: &str = "__LOADGEN_CALL_ID__";
/// Whole-call cost of the fixture's 1.2339-minute call; per-call costs scale from it.
const FIXTURE_MINUTES: f64 = 1.2339;

/// The `message` objects of the fixtures the simulator builds on.
struct Templates {
    assistant_request: Value,
    status_update: Value,
    status_ended: Value,
    tool_calls: Value,
    transcript: Value,
    conversation_update: Value,
    end_of_call_report: Value,
}

static TEMPLATES: OnceLock<Result<Templates, String>> = OnceLock::new();

/// Parses one fixture and returns its `message` object, with the call id made a placeholder.
fn template(name: &str, text: &str) -> Result<Value, String> {
    let text = text.replace(FIXTURE_CALL_ID, CALL_ID_SLOT);
    let mut root: Value = serde_json::from_str(&text).map_err(|e| format!("fixture {name}: {e}"))?;
    match root.get_mut("message") {
        Some(message @ Value::Object(_)) => Ok(message.take()),
        _ => Err(format!("fixture {name} has no `message` object")),
    }
}

fn templates() -> Result<&'static Templates> {
    macro_rules! fixture {
        ($file:literal) => {
            template($file, include_str!(concat!("../../../tests/fixtures/vapi/", $file)))
        };
    }
    let loaded = TEMPLATES.get_or_init(|| {
        Ok(Templates {
            assistant_request: fixture!("01-assistant-request.json")?,
            status_update: fixture!("02-status-update-in-progress.json")?,
            status_ended: fixture!("03-status-update-ended.json")?,
            tool_calls: fixture!("04-tool-calls-two-calls.json")?,
            transcript: fixture!("06-transcript-final.json")?,
            conversation_update: fixture!("07-conversation-update.json")?,
            end_of_call_report: fixture!("09-end-of-call-report.json")?,
        })
    });
    loaded.as_ref().map_err(|e| anyhow!("{e}"))
}

/// One entry of the conversation, with its start (and end) time in epoch milliseconds.
#[derive(Clone, Debug)]
pub enum Turn {
    System { text: String, at: f64 },
    Bot { text: String, at: f64, end: f64 },
    User { text: String, at: f64, end: f64 },
    ToolCalls { calls: Vec<ToolCall>, at: f64 },
    ToolResult { id: String, name: &'static str, result: String, at: f64 },
}

/// A function call the model makes during the conversation.
#[derive(Clone, Debug)]
pub struct ToolCall {
    pub id: String,
    pub name: &'static str,
    pub arguments: Value,
}

/// One webhook of a call's lifecycle, in the order VAPI sends them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSpec {
    AssistantRequest,
    /// `status-update` with `queued`, `ringing`, `in-progress` or `ended`.
    Status(&'static str),
    /// A final `transcript` of the conversation entry at this index.
    Transcript(usize),
    /// `conversation-update` with the conversation up to (not including) this index.
    ConversationUpdate(usize),
    /// `tool-calls` for the conversation entry at this index.
    ToolCalls(usize),
    EndOfCallReport,
}

impl EventSpec {
    /// VAPI's `message.type` of this event.
    pub fn kind(self) -> &'static str {
        match self {
            Self::AssistantRequest => "assistant-request",
            Self::Status(_) => "status-update",
            Self::Transcript(_) => "transcript",
            Self::ConversationUpdate(_) => "conversation-update",
            Self::ToolCalls(_) => "tool-calls",
            Self::EndOfCallReport => "end-of-call-report",
        }
    }
}

/// Who the call belongs to, as the simulated VAPI assistant knows it.
#[derive(Clone, Debug)]
pub struct CallOwner {
    pub org_id: String,
    pub org_name: String,
    pub assistant_id: String,
}

/// Everything about one simulated call needed to render its messages.
#[derive(Clone, Debug)]
pub struct CallScript {
    pub call_id: String,
    pub owner: CallOwner,
    pub created_at: DateTime<Utc>,
    /// When the call connected; `None` for calls that were never answered.
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub ended_reason: &'static str,
    pub customer_number: String,
    pub caller_name: &'static str,
    provider_call_sid: String,
    summary: String,
    pub conversation: Vec<Turn>,
    pub events: Vec<EventSpec>,
}

const CALLER_NAMES: &[&str] =
    &["Dana", "Sam", "Priya", "Marco", "Lena", "Jordan", "Aiko", "Tomasz", "Grace", "Omar", "Inés", "Kofi"];

const BOT_LINES: &[&str] = &[
    "Sure, I can help with that.",
    "Let me check the schedule for you.",
    "Our technicians are available Monday through Saturday.",
    "I've noted that on your account.",
    "Could you confirm the address for the visit?",
    "The standard call-out fee is eighty-nine dollars, which is waived if you go ahead with the repair.",
    "I can book you in for Thursday morning between eight and ten.",
    "Is there anything else I can help you with today?",
    "I'm sorry about the trouble with your water heater.",
    "You'll get a text message confirming the appointment shortly.",
    "Our dispatcher will call you back within the hour.",
    "That part is in stock, so the technician can bring it along.",
    "Can I have a phone number we can reach you on?",
    "Got it, thanks for your patience.",
];

const USER_LINES: &[&str] = &[
    "Hi, my kitchen sink has been leaking since this morning.",
    "Do you have anything available this week?",
    "Yes, that works for me.",
    "It's 42 Elm Street, apartment three.",
    "How much will that cost roughly?",
    "Can the technician come after five?",
    "I placed an order last week and wanted to check on it.",
    "The water heater is making a loud banging noise.",
    "No, that's everything, thank you.",
    "Actually, can I move my appointment to Friday?",
    "My number is the one I'm calling from.",
    "Is there a warranty on the repair?",
    "Okay, great.",
    "I'd rather talk to a person about the invoice.",
];

const SERVICE_TYPES: &[&str] = &["repair", "install", "inspection"];

/// Joins one to three different lines from `bank` into an utterance.
fn utterance(rng: &mut impl Rng, bank: &[&str]) -> String {
    let sentences = rng.random_range(1..=3).min(bank.len());
    rand::seq::index::sample(rng, bank.len(), sentences).iter().map(|i| bank[i]).collect::<Vec<_>>().join(" ")
}

/// An OpenAI-style tool call id, e.g. `call_Qm3kX8vTz1LcR7pA2bN9wEyH`.
fn tool_call_id(rng: &mut impl Rng) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..24).map(|_| char::from(*pick(rng, ALPHABET))).collect();
    format!("call_{suffix}")
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn epoch_ms(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64
}

impl CallScript {
    /// Builds a call that VAPI creates at `created_at`, following `spec`, with details (words,
    /// caller, tool arguments) drawn from `rng`.
    pub fn new(
        spec: &CallSpec,
        call_id: String,
        owner: CallOwner,
        created_at: DateTime<Utc>,
        rng: &mut impl Rng,
    ) -> Self {
        let answered = spec.duration_ms > 0;
        // Ringing takes a few seconds before the call connects (or is given up on).
        let ring_ms = rng.random_range(1_500..6_000);
        let connect = created_at + Duration::milliseconds(ring_ms);
        let started_at = answered.then_some(connect);
        let ended_at = connect + Duration::milliseconds(spec.duration_ms as i64);
        let caller_name = *pick(rng, CALLER_NAMES);
        let customer_number = format!("+1{}{:07}", rng.random_range(201..990), rng.random_range(0..10_000_000));
        let provider_call_sid = format!("CA{}", uuid::Uuid::from_u128(rng.random()).simple());

        let conversation = match started_at {
            Some(start) => conversation(spec, &owner, caller_name, start, rng),
            None => vec![Turn::System { text: system_prompt(&owner, caller_name), at: epoch_ms(connect) }],
        };
        let summary = if answered {
            format!(
                "{caller_name} called {} about a plumbing issue; the assistant answered {} turns and the caller ended the call.",
                owner.org_name, spec.turns
            )
        } else {
            format!("The call to {} was not answered.", owner.org_name)
        };
        let mut script = Self {
            call_id,
            owner,
            created_at,
            started_at,
            ended_at,
            duration_ms: spec.duration_ms,
            ended_reason: spec.ended_reason,
            customer_number,
            caller_name,
            provider_call_sid,
            summary,
            conversation,
            events: Vec::new(),
        };
        script.events = script.lifecycle(spec.lifecycle);
        script
    }

    /// The webhooks VAPI sends for this call, in order.
    fn lifecycle(&self, lifecycle: Lifecycle) -> Vec<EventSpec> {
        if lifecycle == Lifecycle::ReportOnly {
            return vec![EventSpec::EndOfCallReport];
        }
        let mut events = vec![EventSpec::AssistantRequest, EventSpec::Status("queued"), EventSpec::Status("ringing")];
        if self.started_at.is_some() {
            events.push(EventSpec::Status("in-progress"));
            let mut spoken = 0;
            for (index, turn) in self.conversation.iter().enumerate() {
                match turn {
                    Turn::Bot { .. } | Turn::User { .. } => {
                        events.push(EventSpec::Transcript(index));
                        spoken += 1;
                        // VAPI sends the conversation so far after turns; every fourth keeps
                        // the volume realistic without repeating the history on every line.
                        if spoken % 4 == 0 {
                            events.push(EventSpec::ConversationUpdate(index + 1));
                        }
                    }
                    Turn::ToolCalls { .. } => events.push(EventSpec::ToolCalls(index)),
                    Turn::System { .. } | Turn::ToolResult { .. } => {}
                }
            }
        }
        events.push(EventSpec::Status("ended"));
        events.push(EventSpec::EndOfCallReport);
        events
    }

    /// The call's duration as VAPI reports it (`durationSeconds`).
    pub fn duration_seconds(&self) -> f64 {
        self.duration_ms as f64 / 1000.0
    }

    /// The tool calls the event at `index` of the conversation makes (empty for other turns).
    pub fn tool_calls_at(&self, index: usize) -> &[ToolCall] {
        match self.conversation.get(index) {
            Some(Turn::ToolCalls { calls, .. }) => calls,
            _ => &[],
        }
    }

    /// Renders one event as the HTTP body VAPI would POST.
    pub fn render(&self, event: EventSpec) -> Result<Vec<u8>> {
        let t = templates()?;
        let message = match event {
            EventSpec::AssistantRequest => self.assistant_request(t),
            EventSpec::Status("ended") => self.status_ended(t),
            EventSpec::Status(status) => self.status_update(t, status),
            EventSpec::Transcript(index) => self.transcript(t, index),
            EventSpec::ConversationUpdate(upto) => self.conversation_update(t, upto),
            EventSpec::ToolCalls(index) => self.tool_calls(t, index),
            EventSpec::EndOfCallReport => self.end_of_call_report(t),
        };
        let body = json!({ "message": message }).to_string().replace(CALL_ID_SLOT, &self.call_id);
        Ok(body.into_bytes())
    }

    /// The moment VAPI sends `event` (its `message.timestamp`), in simulated call time.
    pub fn event_time(&self, event: EventSpec) -> f64 {
        let created = epoch_ms(self.created_at);
        let connected = self.started_at.map_or(epoch_ms(self.ended_at), epoch_ms);
        match event {
            EventSpec::AssistantRequest => created + 120.0,
            EventSpec::Status("queued") => created + 250.0,
            EventSpec::Status("ringing") => created + 600.0,
            EventSpec::Status("in-progress") => connected + 20.0,
            EventSpec::Status(_) => epoch_ms(self.ended_at) + 350.0,
            EventSpec::Transcript(index) => match self.conversation.get(index) {
                Some(Turn::Bot { end, .. } | Turn::User { end, .. }) => end + 150.0,
                _ => connected,
            },
            EventSpec::ConversationUpdate(upto) => {
                upto.checked_sub(1).and_then(|i| self.conversation.get(i)).map_or(connected, turn_end) + 300.0
            }
            EventSpec::ToolCalls(index) => self.conversation.get(index).map_or(connected, turn_start) + 70.0,
            EventSpec::EndOfCallReport => epoch_ms(self.ended_at) + 4_500.0,
        }
    }

    /// Fills in the call snapshot a message carries. Like VAPI's, the snapshot keeps the status
    /// it had when it was taken (often stale); only ids, times and the caller are updated.
    fn patch_call(&self, message: &mut Value) {
        let Some(call) = message.get_mut("call").and_then(Value::as_object_mut) else { return };
        call.insert("createdAt".into(), iso(self.created_at).into());
        call.insert("updatedAt".into(), iso(self.created_at).into());
        call.insert("phoneCallProviderId".into(), self.provider_call_sid.clone().into());
        if let Some(transport) = call.get_mut("transport").and_then(Value::as_object_mut) {
            transport.insert("callSid".into(), self.provider_call_sid.clone().into());
        }
        if let Some(customer) = call.get_mut("customer").and_then(Value::as_object_mut) {
            customer.insert("number".into(), self.customer_number.clone().into());
        }
        if call.get("assistantId").is_some_and(|v| !v.is_null()) {
            call.insert("assistantId".into(), self.owner.assistant_id.clone().into());
        }
        if let Some(overrides) = call.get_mut("assistantOverrides").and_then(Value::as_object_mut) {
            overrides.insert("variableValues".into(), self.variable_values());
        }
        if call.contains_key("startedAt") {
            match self.started_at {
                Some(started) => call.insert("startedAt".into(), iso(started).into()),
                None => call.remove("startedAt"),
            };
        }
        if let Some(customer) = message.get_mut("customer").and_then(Value::as_object_mut) {
            customer.insert("number".into(), self.customer_number.clone().into());
        }
    }

    /// The tenant data VAPI substitutes into the assistant's prompts.
    fn variable_values(&self) -> Value {
        json!({
            "orgName": self.owner.org_name,
            "orgId": self.owner.org_id,
            "businessHours": "Mon-Fri 8am-6pm, Sat 9am-1pm",
            "callerName": self.caller_name,
        })
    }

    /// Starts a message from `template`: its timestamp and call snapshot.
    fn base(&self, template: &Value, event: EventSpec) -> Value {
        let mut message = template.clone();
        if let Some(object) = message.as_object_mut() {
            object.insert("timestamp".into(), json!(self.event_time(event) as i64));
        }
        self.patch_call(&mut message);
        message
    }

    /// Sets `artifact.messages`, `artifact.messagesOpenAIFormatted` (and the transcript, when
    /// the template has one) to the conversation up to `upto`.
    fn set_artifact(&self, message: &mut Value, upto: usize) {
        let Some(artifact) = message.get_mut("artifact").and_then(Value::as_object_mut) else { return };
        let turns = &self.conversation[..upto.min(self.conversation.len())];
        artifact.insert("messages".into(), vapi_messages(turns, self.started_at));
        artifact.insert("messagesOpenAIFormatted".into(), openai_messages(turns));
        if artifact.contains_key("transcript") {
            artifact.insert("transcript".into(), transcript_text(turns).into());
        }
        if artifact.contains_key("variableValues") {
            artifact.insert("variableValues".into(), self.variable_values());
        }
    }

    fn assistant_request(&self, t: &Templates) -> Value {
        self.base(&t.assistant_request, EventSpec::AssistantRequest)
    }

    fn status_update(&self, t: &Templates, status: &'static str) -> Value {
        let mut message = self.base(&t.status_update, EventSpec::Status(status));
        insert(&mut message, "status", status.into());
        // Before the call connects the artifact holds the system prompt at most.
        self.set_artifact(&mut message, 1);
        message
    }

    fn status_ended(&self, t: &Templates) -> Value {
        let mut message = self.base(&t.status_ended, EventSpec::Status("ended"));
        insert(&mut message, "status", "ended".into());
        insert(&mut message, "endedReason", self.ended_reason.into());
        self.set_artifact(&mut message, self.conversation.len());
        message
    }

    fn transcript(&self, t: &Templates, index: usize) -> Value {
        let mut message = self.base(&t.transcript, EventSpec::Transcript(index));
        let (role, text) = match self.conversation.get(index) {
            Some(Turn::Bot { text, .. }) => ("assistant", text.as_str()),
            Some(Turn::User { text, .. }) => ("user", text.as_str()),
            _ => ("assistant", ""),
        };
        insert(&mut message, "role", role.into());
        insert(&mut message, "transcriptType", "final".into());
        insert(&mut message, "transcript", text.into());
        message
    }

    fn conversation_update(&self, t: &Templates, upto: usize) -> Value {
        let mut message = self.base(&t.conversation_update, EventSpec::ConversationUpdate(upto));
        let turns = &self.conversation[..upto.min(self.conversation.len())];
        insert(&mut message, "messages", vapi_messages(turns, self.started_at));
        insert(&mut message, "messagesOpenAIFormatted", openai_messages(turns));
        self.set_artifact(&mut message, upto);
        message
    }

    fn tool_calls(&self, t: &Templates, index: usize) -> Value {
        let mut message = self.base(&t.tool_calls, EventSpec::ToolCalls(index));
        let calls = self.tool_calls_at(index);
        // Webhook-level arguments are JSON objects (inside artifacts they are strings).
        let list: Vec<Value> = calls
            .iter()
            .map(
                |c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }),
            )
            .collect();
        // `toolWithToolCallList` pairs each call with its tool definition from the template.
        let definitions: Vec<Value> =
            t.tool_calls.get("toolWithToolCallList").and_then(Value::as_array).cloned().unwrap_or_default();
        let with_tools: Vec<Value> = calls
            .iter()
            .zip(&list)
            .map(|(call, entry)| {
                let mut tool = definitions
                    .iter()
                    .find(|d| d.pointer("/function/name").and_then(Value::as_str) == Some(call.name))
                    .cloned()
                    .unwrap_or_else(|| json!({ "type": "function", "function": { "name": call.name } }));
                insert(&mut tool, "toolCall", entry.clone());
                tool
            })
            .collect();
        insert(&mut message, "toolCalls", Value::Array(list.clone()));
        insert(&mut message, "toolCallList", Value::Array(list));
        insert(&mut message, "toolWithToolCallList", Value::Array(with_tools));
        self.set_artifact(&mut message, index + 1);
        message
    }

    fn end_of_call_report(&self, t: &Templates) -> Value {
        let mut message = self.base(&t.end_of_call_report, EventSpec::EndOfCallReport);
        let turns = &self.conversation[..];
        let transcript = transcript_text(turns);
        let minutes = self.duration_ms as f64 / 60_000.0;
        let scale = minutes / FIXTURE_MINUTES;
        self.set_artifact(&mut message, self.conversation.len());
        let Some(object) = message.as_object_mut() else { return message };
        match self.started_at {
            Some(started) => object.insert("startedAt".into(), iso(started).into()),
            None => object.remove("startedAt"),
        };
        object.insert("endedAt".into(), iso(self.ended_at).into());
        object.insert("endedReason".into(), self.ended_reason.into());
        object.insert("durationMs".into(), json!(self.duration_ms));
        object.insert("durationSeconds".into(), json!(self.duration_seconds()));
        object.insert("durationMinutes".into(), json!((minutes * 10_000.0).round() / 10_000.0));
        object.insert("summary".into(), self.summary.clone().into());
        object.insert("transcript".into(), transcript.into());
        object.insert("messages".into(), vapi_messages(turns, self.started_at));
        if let Some(analysis) = object.get_mut("analysis") {
            insert(analysis, "summary", self.summary.clone().into());
        }
        // Costs scale with the call's minutes.
        let mut total = 0.0;
        if let Some(costs) = object.get_mut("costs").and_then(Value::as_array_mut) {
            for item in costs {
                let cost = round4(item.get("cost").and_then(Value::as_f64).unwrap_or(0.0) * scale);
                total += cost;
                insert(item, "cost", json!(cost));
                if item.get("minutes").is_some() {
                    insert(item, "minutes", json!(round4(minutes)));
                }
            }
        }
        object.insert("cost".into(), json!(round4(total)));
        if let Some(breakdown) = object.get_mut("costBreakdown").and_then(Value::as_object_mut) {
            for (key, value) in breakdown.iter_mut() {
                if let Some(number) = value.as_f64()
                    && !key.ends_with("Tokens")
                    && key != "ttsCharacters"
                {
                    *value = json!(round4(number * scale));
                }
            }
            breakdown.insert("total".into(), json!(round4(total)));
        }
        message
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Sets `key` on a JSON object (does nothing on other values).
fn insert(value: &mut Value, key: &str, new: Value) {
    if let Some(object) = value.as_object_mut() {
        object.insert(key.to_owned(), new);
    }
}

fn turn_start(turn: &Turn) -> f64 {
    match turn {
        Turn::System { at, .. }
        | Turn::Bot { at, .. }
        | Turn::User { at, .. }
        | Turn::ToolCalls { at, .. }
        | Turn::ToolResult { at, .. } => *at,
    }
}

fn turn_end(turn: &Turn) -> f64 {
    match turn {
        Turn::Bot { end, .. } | Turn::User { end, .. } => *end,
        other => turn_start(other),
    }
}

fn system_prompt(owner: &CallOwner, caller_name: &str) -> String {
    format!(
        "You are the phone receptionist for {}. Business hours: Mon-Fri 8am-6pm, Sat 9am-1pm. \
         The caller's name is {caller_name}. Use lookup_order for order questions.",
        owner.org_name
    )
}

/// Lays out the conversation of a connected call over its duration: the system prompt, then
/// alternating assistant and caller turns, with tool calls (and their results) after some of
/// the caller's turns.
fn conversation(
    spec: &CallSpec,
    owner: &CallOwner,
    caller_name: &str,
    start: DateTime<Utc>,
    rng: &mut impl Rng,
) -> Vec<Turn> {
    let start_ms = epoch_ms(start);
    let turns = spec.turns.max(2) as usize;
    let slot = spec.duration_ms as f64 / turns as f64;
    // The caller turns after which the model calls tools.
    let caller_turns: Vec<usize> = (0..turns).filter(|k| k % 2 == 1).collect();
    let mut tool_after: Vec<usize> = Vec::new();
    for _ in 0..spec.tool_calls {
        let candidates: Vec<usize> = caller_turns.iter().copied().filter(|k| !tool_after.contains(k)).collect();
        if candidates.is_empty() {
            break;
        }
        tool_after.push(*pick(rng, &candidates));
    }

    let mut out = vec![Turn::System { text: system_prompt(owner, caller_name), at: start_ms }];
    for k in 0..turns {
        let at = start_ms + k as f64 * slot + slot * 0.05;
        let end = at + slot * 0.6;
        if k == 0 {
            let text = format!("Thanks for calling {}, this is Riley. How can I help?", owner.org_name);
            out.push(Turn::Bot { text, at, end });
        } else if k % 2 == 0 {
            out.push(Turn::Bot { text: utterance(rng, BOT_LINES), at, end });
        } else {
            out.push(Turn::User { text: utterance(rng, USER_LINES), at, end });
        }
        if tool_after.contains(&k) {
            // Between the end of the caller's turn and the start of the next slot.
            let gap = (start_ms + (k + 1) as f64 * slot) - end;
            let calls_at = end + gap * 0.2;
            let mut calls = vec![ToolCall {
                id: tool_call_id(rng),
                name: "lookup_order",
                arguments: json!({ "orderNumber": format!("A-{}", rng.random_range(10_000..99_999)) }),
            }];
            if chance(rng, 0.4) {
                calls.push(ToolCall {
                    id: tool_call_id(rng),
                    name: "get_next_available_slot",
                    arguments: json!({ "serviceType": *pick(rng, SERVICE_TYPES) }),
                });
            }
            let results: Vec<Turn> = calls
                .iter()
                .enumerate()
                .map(|(i, call)| Turn::ToolResult {
                    id: call.id.clone(),
                    name: call.name,
                    result: match call.name {
                        "lookup_order" => "Order found: technician scheduled Thursday between 10am and 12pm.".into(),
                        _ => "Next slot: Wednesday 2pm-4pm.".into(),
                    },
                    at: calls_at + gap * 0.3 + i as f64 * 30.0,
                })
                .collect();
            out.push(Turn::ToolCalls { calls, at: calls_at });
            out.extend(results);
        }
    }
    out
}

fn seconds_from_start(at: f64, started: Option<DateTime<Utc>>) -> f64 {
    let start = started.map_or(at, epoch_ms);
    ((at - start) / 10.0).round() / 100.0
}

/// The conversation in VAPI's `artifact.messages` shape (tool arguments as JSON strings).
fn vapi_messages(turns: &[Turn], started: Option<DateTime<Utc>>) -> Value {
    let items = turns
        .iter()
        .map(|turn| match turn {
            Turn::System { text, at } => {
                json!({ "role": "system", "message": text, "time": at, "secondsFromStart": seconds_from_start(*at, started) })
            }
            Turn::Bot { text, at, end } => json!({
                "role": "bot", "message": text, "time": at, "endTime": end,
                "secondsFromStart": seconds_from_start(*at, started), "duration": (end - at).round(), "source": "",
            }),
            Turn::User { text, at, end } => json!({
                "role": "user", "message": text, "time": at, "endTime": end,
                "secondsFromStart": seconds_from_start(*at, started), "duration": (end - at).round(),
            }),
            Turn::ToolCalls { calls, at } => json!({
                "role": "tool_calls", "message": "", "time": at, "secondsFromStart": seconds_from_start(*at, started),
                "toolCalls": calls.iter().map(string_arguments).collect::<Vec<_>>(),
            }),
            Turn::ToolResult { id, name, result, at } => json!({
                "role": "tool_call_result", "time": at, "secondsFromStart": seconds_from_start(*at, started),
                "name": name, "toolCallId": id, "result": result,
            }),
        })
        .collect();
    Value::Array(items)
}

/// A tool call as it appears inside artifacts: `arguments` is a JSON-encoded string.
fn string_arguments(call: &ToolCall) -> Value {
    json!({ "id": call.id, "type": "function", "function": { "name": call.name, "arguments": call.arguments.to_string() } })
}

/// The conversation in OpenAI chat format (`messagesOpenAIFormatted`).
fn openai_messages(turns: &[Turn]) -> Value {
    let items = turns
        .iter()
        .map(|turn| match turn {
            Turn::System { text, .. } => json!({ "role": "system", "content": text }),
            Turn::Bot { text, .. } => json!({ "role": "assistant", "content": text }),
            Turn::User { text, .. } => json!({ "role": "user", "content": text }),
            Turn::ToolCalls { calls, .. } => json!({
                "role": "assistant", "content": "", "tool_calls": calls.iter().map(string_arguments).collect::<Vec<_>>(),
            }),
            Turn::ToolResult { id, result, .. } => json!({ "role": "tool", "tool_call_id": id, "content": result }),
        })
        .collect();
    Value::Array(items)
}

/// VAPI's plain transcript: `AI: ...` and `User: ...` lines.
pub fn transcript_text(turns: &[Turn]) -> String {
    let mut text = String::new();
    for turn in turns {
        match turn {
            Turn::Bot { text: line, .. } => {
                text.push_str("AI: ");
                text.push_str(line);
                text.push('\n');
            }
            Turn::User { text: line, .. } => {
                text.push_str("User: ");
                text.push_str(line);
                text.push('\n');
            }
            _ => {}
        }
    }
    text
}

/// The conversation as stored `messages` JSON, for the bulk loader (no call snapshot needed).
pub fn stored_messages(turns: &[Turn], started: Option<DateTime<Utc>>) -> Value {
    vapi_messages(turns, started)
}

/// A short synthetic conversation for the bulk loader: `turns` alternating lines over
/// `duration_ms` from `start`.
pub fn synthetic_conversation(
    turns: u32,
    duration_ms: u64,
    start: DateTime<Utc>,
    org_name: &str,
    rng: &mut impl Rng,
) -> Vec<Turn> {
    let spec = CallSpec {
        index: 0,
        org: 0,
        duration_ms,
        ended_reason: "customer-ended-call",
        turns,
        tool_calls: 0,
        lifecycle: Lifecycle::Full,
    };
    let owner = CallOwner { org_id: String::new(), org_name: org_name.to_owned(), assistant_id: String::new() };
    let caller_name = *pick(rng, CALLER_NAMES);
    let mut turns = conversation(&spec, &owner, caller_name, start, rng);
    // The loader stores what was said; the system prompt is the same for every call.
    turns.retain(|t| !matches!(t, Turn::System { .. }));
    turns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::CallSpec;
    use callplane_core::billing::BillingRules;
    use callplane_core::vapi::{MessageKind, parse_body};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn owner() -> CallOwner {
        CallOwner {
            org_id: "5b0c7a8e-0000-4000-8000-000000000001".into(),
            org_name: "Loadgen Plumbing".into(),
            assistant_id: "asst-loadgen".into(),
        }
    }

    fn spec(duration_ms: u64, ended_reason: &'static str, turns: u32, tool_calls: u32) -> CallSpec {
        CallSpec { index: 0, org: 0, duration_ms, ended_reason, turns, tool_calls, lifecycle: Lifecycle::Full }
    }

    fn script(spec: &CallSpec, seed: u64) -> CallScript {
        let mut rng = StdRng::seed_from_u64(seed);
        CallScript::new(spec, uuid::Uuid::now_v7().to_string(), owner(), Utc::now(), &mut rng)
    }

    #[test]
    fn end_of_call_report_parses_with_consistent_duration() {
        let spec = spec(74_033, "customer-ended-call", 12, 1);
        let script = script(&spec, 1);
        let body = script.render(EventSpec::EndOfCallReport).unwrap();
        let message = parse_body(&body).unwrap();
        assert_eq!(message.kind, MessageKind::EndOfCallReport);
        assert_eq!(message.call_id.as_deref(), Some(script.call_id.as_str()));
        let report = message.report.unwrap();
        assert_eq!(report.duration_seconds, Some(74.033));
        let (started, ended) = (report.started_at.unwrap(), report.ended_at.unwrap());
        assert_eq!((ended - started).num_milliseconds(), 74_033);
        assert!(started > message.call_created_at.unwrap());
        assert_eq!(report.ended_reason.as_deref(), Some("customer-ended-call"));
        // What callplane bills is what the plan expects.
        let billed = BillingRules::default().billable_seconds(report.duration_seconds, report.ended_reason.as_deref());
        assert_eq!(billed, 75);
        assert_eq!(billed, spec.billable_seconds());
        // The body carries no trace of the fixture's call id.
        assert!(!String::from_utf8(body).unwrap().contains(FIXTURE_CALL_ID));
    }

    #[test]
    fn unanswered_calls_bill_nothing_and_have_no_start() {
        let spec = spec(0, "customer-did-not-answer", 0, 0);
        let script = script(&spec, 2);
        assert_eq!(
            script.events,
            vec![
                EventSpec::AssistantRequest,
                EventSpec::Status("queued"),
                EventSpec::Status("ringing"),
                EventSpec::Status("ended"),
                EventSpec::EndOfCallReport
            ]
        );
        let report = parse_body(&script.render(EventSpec::EndOfCallReport).unwrap()).unwrap().report.unwrap();
        assert_eq!(report.started_at, None);
        assert_eq!(
            BillingRules::default().billable_seconds(report.duration_seconds, report.ended_reason.as_deref()),
            0
        );
        assert_eq!(spec.billable_seconds(), 0);
    }

    #[test]
    fn every_event_of_a_long_call_parses_as_its_kind() {
        let spec = spec(25 * 60_000 + 417, "assistant-ended-call", 60, 3);
        let script = script(&spec, 3);
        let mut tool_call_events = 0;
        for &event in &script.events {
            let body = script.render(event).unwrap();
            let message = parse_body(&body).unwrap();
            assert_eq!(message.message_type, event.kind(), "{event:?}");
            assert_eq!(message.call_id.as_deref(), Some(script.call_id.as_str()));
            assert_eq!(message.call_created_at, Some(script.created_at.with_nanosecond_millis()));
            if let EventSpec::ToolCalls(index) = event {
                tool_call_events += 1;
                let expected: Vec<&str> = script.tool_calls_at(index).iter().map(|c| c.id.as_str()).collect();
                let parsed: Vec<&str> = message.tool_calls.iter().map(|c| c.id.as_str()).collect();
                assert_eq!(parsed, expected);
                assert!(!parsed.is_empty());
            }
            if let EventSpec::Status(status) = event {
                assert_eq!(message.status.as_deref(), Some(status));
            }
        }
        assert_eq!(tool_call_events, 3);
        // A 60-turn report runs to tens of kilobytes, as real ones do.
        let report = script.render(EventSpec::EndOfCallReport).unwrap();
        assert!((10_000..200_000).contains(&report.len()), "{} bytes", report.len());
        let parsed = parse_body(&report).unwrap().report.unwrap();
        assert_eq!(parsed.transcript.unwrap().lines().count(), 60);
    }

    #[test]
    fn event_times_follow_the_lifecycle() {
        let script = script(&spec(90_000, "customer-ended-call", 10, 1), 4);
        let times: Vec<f64> = script.events.iter().map(|&e| script.event_time(e)).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        assert!(times[0] >= epoch_ms(script.created_at));
    }

    #[test]
    fn report_only_lifecycle_sends_just_the_report() {
        let mut spec = spec(30_000, "customer-ended-call", 4, 0);
        spec.lifecycle = Lifecycle::ReportOnly;
        let script = script(&spec, 5);
        assert_eq!(script.events, vec![EventSpec::EndOfCallReport]);
        let message = parse_body(&script.render(EventSpec::EndOfCallReport).unwrap()).unwrap();
        assert_eq!(message.report.unwrap().duration_seconds, Some(30.0));
    }

    /// `createdAt` is rendered with millisecond precision.
    trait Millis {
        fn with_nanosecond_millis(self) -> Self;
    }

    impl Millis for DateTime<Utc> {
        fn with_nanosecond_millis(self) -> Self {
            DateTime::from_timestamp_millis(self.timestamp_millis()).unwrap()
        }
    }
}
