//! What callplane answers the phone agent, within VAPI's time limits (SPEC §8).
//!
//! `assistant-request` is admitted or refused from the organization's status and minutes,
//! and answered with its assistant, its function data preloaded as `variableValues`, and
//! `maxDurationSeconds` capped to what is left on a hard-limit plan. `tool-calls` are
//! answered from function data, one single-line `result` or `error` per `toolCallId`.
//!
//! Function data values answer a tool named like their key:
//! - a string is the result;
//! - `{"error": "..."}` answers with that error;
//! - `{"by": "<argument>", "entries": {"<value>": <answer>}, "default": <answer>}` picks the
//!   entry named by one of the call's arguments;
//! - any other JSON is sent as its one-line JSON text.

use crate::billing::Plan;
use crate::domain::{OrgId, OrgStatus, Organization};
use crate::seams::{OrgDirectory, StoreResult};
use crate::vapi::{ORG_METADATA_KEY, ORG_SIGNATURE_KEY, ServerMessage, ToolCall};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value, json};

#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    /// The longest call callplane lets VAPI run, whatever the plan.
    pub max_call_seconds: i64,
    /// How long a `past_due` organization keeps taking calls.
    pub past_due_grace: Duration,
    /// Signs the organization id callplane puts in a call's metadata, so the shared URL can
    /// trust it later. Without a key, metadata never routes a call.
    pub org_hint_key: Option<Vec<u8>>,
}

/// The signature of an organization id in a call's metadata (HMAC-SHA256, hex), bound to the
/// call: a signature seen on one call routes no other call.
pub fn org_hint_signature(key: &[u8], org: OrgId, call_id: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(b"callplane-org-hint:v2:");
    mac.update(org.to_string().as_bytes());
    mac.update(b":");
    mac.update(call_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The organization a message's signed hint names, when the signature verifies for that
/// organization and the message's call.
fn verified_hint(key: Option<&[u8]>, msg: &ServerMessage) -> Option<OrgId> {
    use subtle::ConstantTimeEq;
    let (key, (id, sig), call_id) = (key?, msg.metadata_org_id.as_ref()?, msg.call_id.as_deref()?);
    let org = id.parse::<OrgId>().ok()?;
    bool::from(org_hint_signature(key, org, call_id).as_bytes().ct_eq(sig.as_bytes())).then_some(org)
}

/// Why a call is refused; the text is spoken to the caller, the code is for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub spoken: String,
}

/// Decides whether an organization may take a new call now, and for how long. `used` is the
/// period's total from the usage counter (only hard-limit plans look at it).
pub fn admit(
    org: &Organization,
    plan: &Plan,
    used: i64,
    now: DateTime<Utc>,
    settings: &AgentSettings,
) -> Result<i64, Refusal> {
    let refuse = |code, spoken: &str| Err(Refusal { code, spoken: spoken.to_owned() });
    match org.status {
        OrgStatus::Active => {}
        OrgStatus::PastDue if now - org.status_changed_at <= settings.past_due_grace => {}
        OrgStatus::PastDue => {
            return refuse("payment_overdue", "Sorry, this line is unavailable right now. Please try again later.");
        }
        OrgStatus::Canceled | OrgStatus::Suspended => {
            return refuse("organization_inactive", "Sorry, this line is not in service.");
        }
    }
    if plan.hard_limit {
        let left = plan.included_seconds().saturating_sub(used);
        if left <= 0 {
            return refuse("minutes_exhausted", "Sorry, this line has no call minutes left this month.");
        }
        Ok(left.min(settings.max_call_seconds))
    } else {
        Ok(settings.max_call_seconds)
    }
}

/// The `assistant-request` answer for an admitted call. The organization id goes into the
/// call's metadata, signed together with the call id, so later messages of this call (and of
/// no other) can find their organization.
pub fn assistant_answer(
    org: &Organization,
    call_id: Option<&str>,
    assistant_id: &str,
    max_seconds: i64,
    preload: Map<String, Value>,
    hint_key: Option<&[u8]>,
) -> Value {
    let mut metadata = Map::new();
    if let (Some(key), Some(call_id)) = (hint_key, call_id) {
        metadata.insert(ORG_METADATA_KEY.into(), Value::String(org.id.to_string()));
        metadata.insert(ORG_SIGNATURE_KEY.into(), Value::String(org_hint_signature(key, org.id, call_id)));
    }
    json!({
        "assistantId": assistant_id,
        "assistantOverrides": {
            "variableValues": preload,
            "maxDurationSeconds": max_seconds,
            "metadata": metadata,
        }
    })
}

pub fn refusal_answer(spoken: &str) -> Value {
    json!({ "error": spoken })
}

/// Collapses text to one line: VAPI fails to parse tool results with line breaks.
pub fn single_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn answer_text(v: &Value) -> String {
    match v {
        Value::String(s) => single_line(s),
        other => other.to_string(),
    }
}

/// The answer to one tool call from the function data stored under the tool's name.
pub fn tool_result(call: &ToolCall, data: Option<&Value>) -> Result<String, String> {
    let Some(data) = data else {
        return Err(format!("No data is configured for the tool {}.", call.name));
    };
    if let Some(err) = data.get("error").and_then(Value::as_str) {
        return Err(single_line(err));
    }
    if let (Some(by), Some(entries)) =
        (data.get("by").and_then(Value::as_str), data.get("entries").and_then(Value::as_object))
    {
        let wanted = call.arguments.get(by).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        return match wanted.as_deref().and_then(|w| entries.get(w)) {
            Some(hit) => Ok(answer_text(hit)),
            None => match data.get("default") {
                Some(d) => Ok(answer_text(d)),
                None => Err(match wanted {
                    Some(w) => single_line(&format!("Nothing found for {by} {w}.")),
                    None => format!("The argument {by} is required."),
                }),
            },
        };
    }
    Ok(answer_text(data))
}

/// The `tool-calls` answer: one result per call, in the order asked.
pub fn tool_calls_answer(results: Vec<(&ToolCall, Result<String, String>)>) -> Value {
    let results: Vec<Value> = results
        .into_iter()
        .map(|(call, r)| match r {
            Ok(result) => json!({ "name": call.name, "toolCallId": call.id, "result": result }),
            Err(error) => json!({ "name": call.name, "toolCallId": call.id, "error": error }),
        })
        .collect();
    json!({ "results": results })
}

/// The organization a message belongs to (DESIGN §6): the one named in the webhook URL if
/// any (and only that one); else the organization that already owns the call; else the
/// phone-number registry, the assistant registry, and last the call's metadata, only when
/// its signature (made by callplane at `assistant-request`) verifies.
pub async fn resolve_org(
    dir: &dyn OrgDirectory,
    from_path: Option<OrgId>,
    msg: &ServerMessage,
    hint_key: Option<&[u8]>,
) -> StoreResult<Option<OrgId>> {
    if let Some(org) = from_path {
        return Ok(dir.get(org).await?.map(|o| o.id));
    }
    if let Some(call) = &msg.call_id
        && let Some(org) = dir.by_call(call).await?
    {
        return Ok(Some(org));
    }
    if let Some(phone) = &msg.phone_number_id
        && let Some(org) = dir.by_phone_number(phone).await?
    {
        return Ok(Some(org));
    }
    if let Some(assistant) = &msg.assistant_id
        && let Some(org) = dir.by_assistant(assistant).await?
    {
        return Ok(Some(org));
    }
    match verified_hint(hint_key, msg) {
        Some(org) => Ok(dir.get(org).await?.map(|o| o.id)),
        None => Ok(None),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn org(status: OrgStatus, used: i64) -> Organization {
        let now = Utc::now();
        Organization {
            id: OrgId::new(),
            name: "Acme".into(),
            plan: "starter".into(),
            status,
            status_changed_at: now - Duration::days(2),
            period_start: now,
            billing_anchor: now,
            period_end: now,
            seconds_used: used,
            default_assistant_id: Some("a".into()),
            billing_timezone: "UTC".into(),
            created_at: now,
        }
    }

    fn plan(hard: bool) -> Plan {
        Plan {
            name: "starter".into(),
            price_cents: 2900,
            included_minutes: 100,
            hard_limit: hard,
            overage_cents_per_minute: 0,
        }
    }

    const SETTINGS: AgentSettings =
        AgentSettings { max_call_seconds: 1800, past_due_grace: Duration::days(3), org_hint_key: None };

    #[test]
    fn hard_limit_plans_cap_calls_to_the_minutes_left_and_refuse_when_none_are() {
        let now = Utc::now();
        assert_eq!(admit(&org(OrgStatus::Active, 0), &plan(true), 0, now, &SETTINGS), Ok(1800));
        assert_eq!(admit(&org(OrgStatus::Active, 5940), &plan(true), 5940, now, &SETTINGS), Ok(60));
        assert_eq!(
            admit(&org(OrgStatus::Active, 6000), &plan(true), 6000, now, &SETTINGS).unwrap_err().code,
            "minutes_exhausted"
        );
        assert_eq!(admit(&org(OrgStatus::Active, 9000), &plan(false), 9000, now, &SETTINGS), Ok(1800));
    }

    #[test]
    fn past_due_orgs_keep_calling_within_the_grace_period_and_canceled_ones_do_not() {
        let now = Utc::now();
        assert!(admit(&org(OrgStatus::PastDue, 0), &plan(true), 0, now, &SETTINGS).is_ok());
        let late = AgentSettings { past_due_grace: Duration::days(1), ..SETTINGS.clone() };
        assert_eq!(admit(&org(OrgStatus::PastDue, 0), &plan(true), 0, now, &late).unwrap_err().code, "payment_overdue");
        assert_eq!(
            admit(&org(OrgStatus::Canceled, 0), &plan(true), 0, now, &SETTINGS).unwrap_err().code,
            "organization_inactive"
        );
    }

    #[test]
    fn tool_results_follow_the_function_data_shapes() {
        let call = ToolCall {
            id: "t1".into(),
            name: "lookup_order".into(),
            arguments: serde_json::from_value(json!({"orderNumber": "A-1"})).unwrap(),
        };
        let keyed = json!({"by": "orderNumber", "entries": {"A-1": "Order A-1:\nscheduled"}});
        assert_eq!(tool_result(&call, Some(&keyed)), Ok("Order A-1: scheduled".into()));
        let miss = json!({"by": "orderNumber", "entries": {"B-2": "x"}});
        assert_eq!(tool_result(&call, Some(&miss)), Err("Nothing found for orderNumber A-1.".into()));
        assert_eq!(tool_result(&call, Some(&json!({"error": "down"}))), Err("down".into()));
        assert_eq!(tool_result(&call, Some(&json!({"a": 1}))), Ok(r#"{"a":1}"#.into()));
        assert!(tool_result(&call, None).is_err());
    }
}
