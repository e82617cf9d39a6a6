//! The realtime events a change to a call produces, in the order the dashboard sees them.

use crate::domain::{CallChange, OrgId};
use crate::seams::RealtimeEvent;
use serde_json::json;

fn event(org: OrgId, kind: &str, call_id: &str, data: serde_json::Value) -> RealtimeEvent {
    RealtimeEvent { org_id: org, kind: kind.to_owned(), call_id: Some(call_id.to_owned()), data }
}

/// `call.created`, `call.status`, `call.ended`, `usage.changed` and `call.transcript`, as they
/// apply.
pub fn for_change(org: OrgId, c: &CallChange) -> Vec<RealtimeEvent> {
    let mut events = Vec::new();
    if c.inserted {
        events.push(event(org, "call.created", &c.call_id, json!({ "created_at": c.created_at })));
    }
    if let Some(status) = &c.status_changed {
        events.push(event(org, "call.status", &c.call_id, json!({ "status": status })));
    }
    if let Some(b) = &c.billed {
        events.push(event(org, "call.ended", &c.call_id, json!({ "billable_seconds": b.seconds })));
        events.push(event(
            org,
            "usage.changed",
            &c.call_id,
            json!({ "period_start": b.period_start, "added_seconds": b.seconds }),
        ));
    }
    if let Some(is_final) = c.transcript {
        events.push(transcript_changed(org, &c.call_id, is_final));
    }
    events
}

/// `call.transcript`: the call's transcript was stored or replaced.
pub fn transcript_changed(org: OrgId, call_id: &str, is_final: bool) -> RealtimeEvent {
    event(org, "call.transcript", call_id, json!({ "final": is_final }))
}

/// `usage.alert`: 80, 90 or 100% of the included minutes reached in this period.
pub fn usage_alert(org: OrgId, call_id: &str, a: &crate::domain::UsageAlert) -> RealtimeEvent {
    event(
        org,
        "usage.alert",
        call_id,
        json!({ "threshold": a.threshold, "period_start": a.period_start, "seconds_used": a.seconds_used,
                "included_seconds": a.included_seconds }),
    )
}
