//! The parts of Stripe's event objects callplane reads (API version 2026-09-30, as pinned by
//! async-stripe). Read from JSON with every field optional, so a new field or an older shape
//! (e.g. `current_period_*` on the subscription instead of its items, `invoice.subscription`
//! instead of `invoice.parent.subscription_details`) never breaks a webhook.

use callplane_core::OrgStatus;
use chrono::{DateTime, Datelike, Utc};
use serde::Deserialize;
use serde_json::Value;

/// The metadata key callplane sets on subscriptions (via Checkout) and customers.
pub const ORG_METADATA_KEY: &str = "callplane_organization_id";

#[derive(Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub created: i64,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    pub object: Value,
}

/// What a subscription or invoice event says about an organization's subscription.
#[derive(Debug, Default, PartialEq)]
pub struct Facts {
    pub customer: Option<String>,
    pub subscription: Option<String>,
    pub org_hint: Option<String>,
    pub status: Option<OrgStatus>,
    pub price_ids: Vec<String>,
    pub period: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Unix seconds as a time PostgreSQL stores, years 1970 to 9999 (chrono reaches further back
/// than PostgreSQL does, and no Stripe time is outside them).
pub fn storable_time(seconds: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(seconds, 0).filter(|t| (1970..=9999).contains(&t.year()))
}

fn time(v: Option<&Value>) -> Option<DateTime<Utc>> {
    v.and_then(Value::as_i64).and_then(storable_time)
}

fn org_hint(metadata: Option<&Value>) -> Option<String> {
    metadata?.get(ORG_METADATA_KEY)?.as_str().map(str::to_owned)
}

/// Stripe's subscription statuses, as an organization's status.
pub fn status_of(stripe_status: &str) -> Option<OrgStatus> {
    Some(match stripe_status {
        "active" | "trialing" => OrgStatus::Active,
        "past_due" | "unpaid" | "incomplete" => OrgStatus::PastDue,
        "canceled" | "incomplete_expired" => OrgStatus::Canceled,
        "paused" => OrgStatus::Suspended,
        _ => return None,
    })
}

pub fn subscription_facts(sub: &Value) -> Facts {
    let items: Vec<&Value> = sub
        .get("items")
        .and_then(|i| i.get("data"))
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let price_ids = items.iter().filter_map(|i| id_of(i.get("price"))).collect();
    // Since API 2025-03-31 the period lives on each item; before, on the subscription.
    let period = items
        .iter()
        .find_map(|i| Some((time(i.get("current_period_start"))?, time(i.get("current_period_end"))?)))
        .or_else(|| Some((time(sub.get("current_period_start"))?, time(sub.get("current_period_end"))?)));
    Facts {
        customer: id_of(sub.get("customer")),
        subscription: sub.get("id").and_then(Value::as_str).map(str::to_owned),
        org_hint: org_hint(sub.get("metadata")),
        status: sub.get("status").and_then(Value::as_str).and_then(status_of),
        price_ids,
        period,
    }
}

pub fn invoice_facts(inv: &Value) -> Facts {
    let details = inv.get("parent").and_then(|p| p.get("subscription_details"));
    Facts {
        customer: id_of(inv.get("customer")),
        subscription: id_of(details.and_then(|d| d.get("subscription"))).or_else(|| id_of(inv.get("subscription"))),
        org_hint: org_hint(details.and_then(|d| d.get("metadata"))),
        status: None,
        price_ids: Vec::new(),
        period: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subscription_facts_read_the_current_and_the_older_shape() {
        let new = json!({"id": "sub_1", "customer": "cus_1", "status": "past_due",
            "metadata": {"callplane_organization_id": "o"},
            "items": {"data": [{"price": {"id": "price_pro"}, "current_period_start": 1767225600, "current_period_end": 1769904000}]}});
        let f = subscription_facts(&new);
        assert_eq!(f.status, Some(OrgStatus::PastDue));
        assert_eq!(f.price_ids, vec!["price_pro"]);
        assert_eq!(f.period.unwrap().0.timestamp(), 1767225600);
        let old = json!({"id": "sub_1", "customer": {"id": "cus_1"}, "status": "active",
            "current_period_start": 1, "current_period_end": 2, "items": {"data": [{"price": "price_x"}]}});
        let f = subscription_facts(&old);
        assert_eq!((f.customer.as_deref(), f.period.map(|p| p.1.timestamp())), (Some("cus_1"), Some(2)));
    }

    #[test]
    fn invoices_name_their_subscription_in_either_place() {
        let f = invoice_facts(
            &json!({"customer": "cus_1", "parent": {"subscription_details": {"subscription": "sub_9", "metadata": {"callplane_organization_id": "o"}}}}),
        );
        assert_eq!((f.subscription.as_deref(), f.org_hint.as_deref()), (Some("sub_9"), Some("o")));
        let f = invoice_facts(&json!({"customer": "cus_1", "subscription": "sub_8"}));
        assert_eq!(f.subscription.as_deref(), Some("sub_8"));
    }
}
