//! `POST /stripe/webhook`: verify, deduplicate, apply in order.

use crate::events::{Event, Facts, invoice_facts, storable_time, subscription_facts};
use crate::signature::verify_signature;
use async_trait::async_trait;
use callplane_core::ErrorCode;
use callplane_core::seams::{BillingOutcome, BillingStore, BillingWebhooks, SubscriptionChange, WebhookError};
use callplane_core::{OrgId, OrgStatus};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{info, warn};

pub struct StripeWebhooks {
    store: Arc<dyn BillingStore>,
    secrets: Vec<Vec<u8>>,
    tolerance_seconds: i64,
    /// Stripe price id -> callplane plan name.
    plans_by_price: HashMap<String, String>,
}

impl StripeWebhooks {
    pub fn new(
        store: Arc<dyn BillingStore>,
        secrets: Vec<Vec<u8>>,
        tolerance_seconds: i64,
        plans_by_price: HashMap<String, String>,
    ) -> Self {
        Self { store, secrets, tolerance_seconds, plans_by_price }
    }

    async fn org_for(&self, facts: &Facts) -> Result<Option<OrgId>, WebhookError> {
        if let Some(org) = facts.org_hint.as_deref().and_then(|h| h.parse::<OrgId>().ok()) {
            return Ok(Some(org));
        }
        match &facts.customer {
            Some(c) => Ok(self.store.org_by_customer(c).await?),
            None => Ok(None),
        }
    }

    /// The change an event asks for, if it is one callplane acts on.
    fn change(&self, event: &Event, org: OrgId, facts: &Facts, at: DateTime<Utc>) -> Option<SubscriptionChange> {
        let status = match event.event_type.as_str() {
            "customer.subscription.deleted" => OrgStatus::Canceled,
            "customer.subscription.created" | "customer.subscription.updated" => facts.status?,
            "invoice.paid" => OrgStatus::Active,
            "invoice.payment_failed" => OrgStatus::PastDue,
            _ => return None,
        };
        let plan = facts.price_ids.iter().find_map(|p| self.plans_by_price.get(p)).cloned();
        Some(SubscriptionChange {
            org,
            plan,
            status,
            period: facts.period,
            customer_id: facts.customer.clone(),
            subscription_id: facts.subscription.clone(),
            event_at: at,
        })
    }
}

fn refused(code: ErrorCode, message: impl Into<String>) -> WebhookError {
    WebhookError::Refused { code, message: message.into() }
}

/// The longest id (event, customer, subscription) or event type accepted; Stripe's are far
/// shorter.
const MAX_ID_CHARS: usize = 255;

/// Refuses an id or type that is stored but could not be Stripe's: empty, too long, or holding
/// a NUL (which PostgreSQL's `text` cannot store, so the insert would fail as a 500 that
/// Stripe resends for days). The signature only proves who sent the event, not that it is
/// well formed.
fn storable(field: &str, value: &str) -> Result<(), WebhookError> {
    if value.is_empty() || value.chars().count() > MAX_ID_CHARS || value.contains('\0') {
        return Err(refused(
            ErrorCode::MalformedEvent,
            format!("`{field}` must be 1 to {MAX_ID_CHARS} characters with no NUL (\\u0000)"),
        ));
    }
    Ok(())
}

/// Everything of an event that reaches the store, checked by [`storable`].
fn check_storable(event: &Event, facts: &Facts) -> Result<(), WebhookError> {
    storable("id", &event.id)?;
    storable("type", &event.event_type)?;
    for (field, value) in [("customer", &facts.customer), ("subscription", &facts.subscription)] {
        if let Some(value) = value {
            storable(field, value)?;
        }
    }
    Ok(())
}

#[async_trait]
impl BillingWebhooks for StripeWebhooks {
    async fn receive(
        &self,
        signature: Option<&str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<BillingOutcome, WebhookError> {
        if self.secrets.is_empty() {
            return Err(refused(
                ErrorCode::WebhookNotConfigured,
                "stripe.webhook_secrets is not set; no Stripe event can be verified",
            ));
        }
        verify_signature(signature, body, &self.secrets, self.tolerance_seconds, now)
            .map_err(|e| refused(e.code(), e.to_string()))?;
        let event: Event = serde_json::from_slice(body)
            .map_err(|e| refused(ErrorCode::MalformedEvent, format!("not a Stripe event: {e}")))?;
        let at = storable_time(event.created)
            .ok_or_else(|| refused(ErrorCode::MalformedEvent, "`created` is not a time in the years 1970 to 9999"))?;
        let facts = match event.event_type.as_str() {
            t if t.starts_with("customer.subscription.") => subscription_facts(&event.data.object),
            t if t.starts_with("invoice.") => invoice_facts(&event.data.object),
            _ => Facts::default(),
        };
        check_storable(&event, &facts)?;
        if !self.store.record_event(&event.id, &event.event_type, at).await? {
            return Ok(BillingOutcome::Duplicate);
        }
        let org = self.org_for(&facts).await?;
        let outcome = match org.and_then(|org| self.change(&event, org, &facts, at)) {
            Some(change) => self.store.apply_subscription(&change).await?,
            None => BillingOutcome::Ignored,
        };
        match outcome {
            BillingOutcome::Applied => {
                info!(event = %event.id, kind = %event.event_type, org_id = ?org, "stripe event applied")
            }
            BillingOutcome::Stale => {
                warn!(event = %event.id, kind = %event.event_type, "stripe event older than the organization's state; not applied")
            }
            _ => {}
        }
        self.store.finish_event(&event.id, org, outcome).await?;
        Ok(outcome)
    }
}
