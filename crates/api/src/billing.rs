//! Billing: Stripe's webhooks (`POST /stripe/webhook`) and the hosted pages an organization
//! is sent to (`POST /v1/billing/checkout`, `POST /v1/billing/portal`).

use crate::auth::Caller;
use crate::{ApiError, AppState};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use callplane_core::ErrorCode;
use callplane_core::seams::{BillingError, WebhookError};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

/// Stripe's webhook. 2xx for everything Stripe should not resend (applied, duplicate, stale,
/// ignored); 400 for a bad signature or body; 5xx when storage failed, so Stripe retries.
pub async fn stripe_webhook(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
    match s.billing_webhooks.receive(signature, &body, Utc::now()).await {
        Ok(outcome) => {
            // A plan or status changed: this process's next answers read organizations again
            // (other processes hear of it by notification).
            if outcome == callplane_core::seams::BillingOutcome::Applied {
                s.agents.invalidate_all();
            }
            Ok(Json(json!({ "received": true, "outcome": outcome.as_str() })))
        }
        Err(WebhookError::Refused { code, message }) => Err(ApiError::client(code, message)),
        Err(WebhookError::Store(e)) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// `starter`, `pro` or `business` (the configured plans).
    pub plan: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BillingLinkView {
    /// Send the user here.
    pub url: String,
}

fn billing_error(e: BillingError) -> ApiError {
    match e {
        BillingError::NotConfigured(m) => ApiError::client(ErrorCode::BillingNotConfigured, m),
        e @ BillingError::Provider { .. } => {
            tracing::error!(error = %callplane_core::error_chain(&e), "the billing provider refused a request");
            ApiError::client(
                ErrorCode::BillingProviderError,
                "the billing provider refused the request; try again later",
            )
        }
        BillingError::Store(e) => e.into(),
    }
}

async fn caller_org(s: &AppState, caller: Caller) -> Result<callplane_core::Organization, ApiError> {
    s.orgs
        .get(caller.org_id)
        .await?
        .ok_or_else(|| ApiError::client(ErrorCode::OrganizationNotFound, "the organization no longer exists"))
}

/// A Stripe Checkout link to subscribe to (or switch to) a plan.
#[utoipa::path(post, path = "/v1/billing/checkout", tag = "billing", request_body = CheckoutRequest,
    responses((status = 200, body = BillingLinkView), (status = 400, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn checkout(
    State(s): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<BillingLinkView>, ApiError> {
    let req: CheckoutRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::client(ErrorCode::InvalidBody, e.to_string()))?;
    if !s.plans.contains_key(&req.plan) {
        return Err(ApiError::client(ErrorCode::UnknownPlan, format!("plan {:?} is not offered", req.plan)));
    }
    let org = caller_org(&s, caller).await?;
    let link = s.billing.checkout(&org, &req.plan).await.map_err(billing_error)?;
    Ok(Json(BillingLinkView { url: link.url }))
}

/// A Stripe customer-portal link to manage the subscription.
#[utoipa::path(post, path = "/v1/billing/portal", tag = "billing",
    responses((status = 200, body = BillingLinkView), (status = 409, body = crate::error::ErrorBody)), security(("bearer" = [])))]
pub async fn portal(State(s): State<AppState>, caller: Caller) -> Result<Json<BillingLinkView>, ApiError> {
    let org = caller_org(&s, caller).await?;
    let link = s.billing.portal(&org).await.map_err(billing_error)?;
    Ok(Json(BillingLinkView { url: link.url }))
}
