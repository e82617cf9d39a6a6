//! `/admin/v1`: operators create organizations, change plans and status, read any
//! organization, and manage API keys. Authenticated with the admin token only.

use crate::auth::Admin;
use crate::extract::{ValidPath, refuse_nul_in_json};
use crate::{ApiError, AppState};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use callplane_core::ErrorCode;
use callplane_core::domain::NewOrganization;
use callplane_core::seams::TimeZoneChange;
use callplane_core::{OrgId, OrgStatus, Organization};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct OrganizationView {
    #[schema(value_type = String, format = Uuid)]
    pub id: OrgId,
    pub name: String,
    pub plan: String,
    /// `active`, `past_due`, `canceled` or `suspended`.
    pub status: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub seconds_used: i64,
    pub default_assistant_id: Option<String>,
    /// The IANA time zone daily usage is counted in.
    pub billing_timezone: String,
    /// The URL to set as this organization's assistants' server URL in VAPI.
    pub vapi_server_url: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganization {
    pub name: String,
    pub plan: String,
    pub assistant_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrganization {
    pub plan: Option<String>,
    /// `active`, `past_due`, `canceled` or `suspended`.
    pub status: Option<String>,
    /// The IANA time zone (`Europe/Paris`) usage is counted by day in; the organization's
    /// daily usage is recounted in it.
    pub billing_timezone: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    pub id: uuid::Uuid,
    pub prefix: String,
    /// Shown once; only a hash is stored.
    pub key: String,
}

/// An organization as operators see it; its usage is the counter's.
async fn view(s: &AppState, o: Organization) -> Result<OrganizationView, ApiError> {
    let o = o.as_of(Utc::now());
    let seconds_used = s.metering.used(o.id, o.period_start).await?;
    Ok(OrganizationView {
        vapi_server_url: format!("{}/vapi/{}", s.public_url.trim_end_matches('/'), o.id),
        id: o.id,
        name: o.name,
        plan: o.plan,
        status: o.status.as_str().to_owned(),
        period_start: o.period_start,
        period_end: o.period_end,
        seconds_used,
        default_assistant_id: o.default_assistant_id,
        billing_timezone: o.billing_timezone,
        created_at: o.created_at,
    })
}

fn bad(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::client(code, message)
}

fn check_plan(s: &AppState, plan: &str) -> Result<(), ApiError> {
    if s.plans.contains_key(plan) {
        Ok(())
    } else {
        let mut names: Vec<&str> = s.plans.keys().map(String::as_str).collect();
        names.sort_unstable();
        Err(bad(ErrorCode::UnknownPlan, format!("plan {plan:?} is not configured; plans: {}", names.join(", "))))
    }
}

fn org_not_found(id: OrgId) -> ApiError {
    ApiError::client(ErrorCode::OrganizationNotFound, format!("no organization {id}"))
}

fn org_id(raw: &str) -> Result<OrgId, ApiError> {
    raw.parse().map_err(|_| ApiError::client(ErrorCode::OrganizationNotFound, format!("no organization {raw}")))
}

/// A request body as `T`. Text with a NUL is refused first: it would reach PostgreSQL, which
/// cannot store it.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(ErrorCode::InvalidBody, e.to_string()))?;
    refuse_nul_in_json(&value)?;
    serde_json::from_value(value).map_err(|e| bad(ErrorCode::InvalidBody, e.to_string()))
}

/// Create an organization.
#[utoipa::path(post, path = "/admin/v1/organizations", tag = "admin", request_body = CreateOrganization,
    responses((status = 201, body = OrganizationView), (status = 400, body = crate::error::ErrorBody)), security(("admin" = [])))]
pub async fn create_org(
    State(s): State<AppState>,
    _: Admin,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<OrganizationView>), ApiError> {
    let req: CreateOrganization = parse_json(&body)?;
    if req.name.trim().is_empty() || req.name.len() > 200 {
        return Err(bad(ErrorCode::InvalidBody, "`name` must be 1 to 200 characters"));
    }
    check_plan(&s, &req.plan)?;
    let org = s
        .admin
        .create(&NewOrganization {
            name: req.name,
            plan: req.plan,
            default_assistant_id: req.assistant_id,
            period_start: Utc::now(),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view(&s, org).await?)))
}

/// All organizations (first 1,000, oldest first).
#[utoipa::path(get, path = "/admin/v1/organizations", tag = "admin", responses((status = 200, body = Vec<OrganizationView>)), security(("admin" = [])))]
pub async fn list_orgs(State(s): State<AppState>, _: Admin) -> Result<Json<Vec<OrganizationView>>, ApiError> {
    let orgs = s.admin.list(1000).await?;
    let mut views = Vec::with_capacity(orgs.len());
    for o in orgs {
        views.push(view(&s, o).await?);
    }
    Ok(Json(views))
}

/// Any organization.
#[utoipa::path(get, path = "/admin/v1/organizations/{id}", tag = "admin", params(("id" = String, Path)),
    responses((status = 200, body = OrganizationView), (status = 404, body = crate::error::ErrorBody)), security(("admin" = [])))]
pub async fn get_org(
    State(s): State<AppState>,
    _: Admin,
    ValidPath(id): ValidPath<String>,
) -> Result<Json<OrganizationView>, ApiError> {
    let id = org_id(&id)?;
    let org = s.orgs.get(id).await?.ok_or_else(|| org_not_found(id))?;
    Ok(Json(view(&s, org).await?))
}

/// Change an organization's plan, status or billing time zone.
#[utoipa::path(patch, path = "/admin/v1/organizations/{id}", tag = "admin", params(("id" = String, Path)), request_body = UpdateOrganization,
    responses((status = 200, body = OrganizationView), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("admin" = [])))]
pub async fn update_org(
    State(s): State<AppState>,
    _: Admin,
    ValidPath(id): ValidPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<OrganizationView>, ApiError> {
    let id = org_id(&id)?;
    let req: UpdateOrganization = parse_json(&body)?;
    let status = match req.status.as_deref() {
        Some(raw) => Some(OrgStatus::parse(raw).ok_or_else(|| {
            bad(ErrorCode::InvalidStatus, format!("status {raw:?} is not active, past_due, canceled or suspended"))
        })?),
        None => None,
    };
    if let Some(plan) = &req.plan {
        check_plan(&s, plan)?;
    }
    let bad_zone = |raw: &str| {
        bad(ErrorCode::InvalidTimeZone, format!("{raw:?} is not an IANA time zone name such as Europe/Paris or UTC"))
    };
    if let Some(zone) = &req.billing_timezone
        && (zone.is_empty() || zone.len() > 64)
    {
        return Err(bad_zone(zone));
    }
    s.orgs.get(id).await?.ok_or_else(|| org_not_found(id))?;
    if let Some(zone) = &req.billing_timezone {
        match s.admin.set_billing_timezone(id, zone).await? {
            TimeZoneChange::Set => {}
            TimeZoneChange::UnknownTimeZone => return Err(bad_zone(zone)),
            TimeZoneChange::NoOrganization => return Err(org_not_found(id)),
        }
    }
    if let Some(plan) = &req.plan {
        s.admin.set_plan(id, plan).await?;
    }
    if let Some(status) = status {
        s.admin.set_status(id, status).await?;
    }
    s.agents.invalidate(id);
    let org = s.orgs.get(id).await?.ok_or_else(|| org_not_found(id))?;
    Ok(Json(view(&s, org).await?))
}

/// Create an API key for an organization; the key is in this response only.
#[utoipa::path(post, path = "/admin/v1/organizations/{id}/api-keys", tag = "admin", params(("id" = String, Path)), request_body = CreateApiKey,
    responses((status = 201, body = CreatedApiKey), (status = 404, body = crate::error::ErrorBody)), security(("admin" = [])))]
pub async fn create_key(
    State(s): State<AppState>,
    _: Admin,
    ValidPath(id): ValidPath<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let id = org_id(&id)?;
    let req: CreateApiKey = if body.is_empty() { CreateApiKey { name: String::new() } } else { parse_json(&body)? };
    s.orgs.get(id).await?.ok_or_else(|| org_not_found(id))?;
    let key = s.admin.create_api_key(id, &req.name).await?;
    Ok((StatusCode::CREATED, Json(CreatedApiKey { id: key.id, prefix: key.prefix, key: key.secret })))
}

/// Revoke an organization's API key.
#[utoipa::path(delete, path = "/admin/v1/organizations/{id}/api-keys/{key_id}", tag = "admin",
    params(("id" = String, Path), ("key_id" = String, Path)),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)), security(("admin" = [])))]
pub async fn revoke_key(
    State(s): State<AppState>,
    _: Admin,
    ValidPath((id, key_id)): ValidPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = org_id(&id)?;
    let key_id =
        uuid::Uuid::parse_str(&key_id).map_err(|_| ApiError::client(ErrorCode::ApiKeyNotFound, "no such key"))?;
    if s.admin.revoke_api_key(id, key_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::client(ErrorCode::ApiKeyNotFound, "no such unrevoked key for this organization"))
    }
}
