//! Organizations, their VAPI registries and API keys.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::ErrorCode;
use callplane_core::domain::{ApiKeyInfo, NewApiKey, NewOrganization};
use callplane_core::seams::{OrgDirectory, StoreError, StoreResult, TimeZoneChange};
use callplane_core::{OrgId, OrgStatus, Organization};
use chrono::Months;
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::postgres::PgRow;
use tracing::instrument;

const ORG_COLUMNS: &str = "id, name, plan, status, status_changed_at, period_start, period_end, billing_anchor, \
                           seconds_used, default_assistant_id, billing_timezone, created_at";

fn org_from_row(row: &PgRow) -> StoreResult<Organization> {
    let status: String = row.try_get("status").map_err(db)?;
    Ok(Organization {
        id: OrgId(row.try_get("id").map_err(db)?),
        name: row.try_get("name").map_err(db)?,
        plan: row.try_get("plan").map_err(db)?,
        status: OrgStatus::parse(&status)
            .ok_or_else(|| StoreError::Internal(format!("unknown organization status {status} in the database")))?,
        status_changed_at: row.try_get("status_changed_at").map_err(db)?,
        period_start: row.try_get("period_start").map_err(db)?,
        billing_anchor: row.try_get("billing_anchor").map_err(db)?,
        period_end: row.try_get("period_end").map_err(db)?,
        seconds_used: row.try_get("seconds_used").map_err(db)?,
        default_assistant_id: row.try_get("default_assistant_id").map_err(db)?,
        billing_timezone: row.try_get("billing_timezone").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
    })
}

/// API keys look like `cp_` followed by 40 random alphanumerics; the first 11 characters are
/// the visible prefix.
pub fn hash_api_key(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

impl PgStore {
    /// Every organization with its function data, up to `limit` organizations (for warming
    /// the answers' directory).
    pub async fn organizations_with_data(
        &self,
        limit: i64,
    ) -> StoreResult<Vec<(Organization, serde_json::Map<String, serde_json::Value>)>> {
        let rows = sqlx::query(&format!(
            "SELECT {ORG_COLUMNS}, \
                    (SELECT COALESCE(jsonb_object_agg(key, value), '{{}}') FROM function_data f \
                      WHERE f.organization_id = o.id) AS data \
             FROM organizations o ORDER BY id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                let data: serde_json::Value = row.try_get("data").map_err(db)?;
                let data = match data {
                    serde_json::Value::Object(map) => map,
                    _ => serde_json::Map::new(),
                };
                Ok((org_from_row(row)?, data))
            })
            .collect()
    }

    #[instrument(skip_all, fields(plan = %new.plan))]
    pub async fn create_organization(&self, new: &NewOrganization) -> StoreResult<Organization> {
        let id = OrgId::new();
        let period_end = new.period_start.checked_add_months(Months::new(1)).ok_or_else(|| StoreError::Refused {
            code: ErrorCode::InvalidBody,
            message: "the period start is out of range".into(),
        })?;
        let row = sqlx::query(&format!(
            "INSERT INTO organizations (id, name, plan, period_start, period_end, billing_anchor, default_assistant_id) \
             VALUES ($1, $2, $3, $4, $5, $4, $6) RETURNING {ORG_COLUMNS}"
        ))
        .bind(id.0)
        .bind(&new.name)
        .bind(&new.plan)
        .bind(new.period_start)
        .bind(period_end)
        .bind(&new.default_assistant_id)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        org_from_row(&row)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    pub async fn register_phone_number(&self, org: OrgId, vapi_id: &str, number: Option<&str>) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO phone_numbers (vapi_phone_number_id, organization_id, number) VALUES ($1, $2, $3) \
             ON CONFLICT (vapi_phone_number_id) DO UPDATE SET number = EXCLUDED.number \
             WHERE phone_numbers.organization_id = EXCLUDED.organization_id",
        )
        .bind(vapi_id)
        .bind(org.0)
        .bind(number)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    #[instrument(skip_all, fields(org_id = %org))]
    pub async fn register_assistant(&self, org: OrgId, vapi_id: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO assistants (vapi_assistant_id, organization_id) VALUES ($1, $2) \
             ON CONFLICT (vapi_assistant_id) DO NOTHING",
        )
        .bind(vapi_id)
        .bind(org.0)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    #[instrument(skip_all, fields(org_id = %org))]
    pub async fn create_api_key(&self, org: OrgId, name: &str) -> StoreResult<NewApiKey> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let body: String = {
            let mut rng = rand::rng();
            (0..40).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
        };
        let secret = format!("cp_{body}");
        let prefix = secret[..11].to_owned();
        let id = uuid::Uuid::now_v7();
        sqlx::query("INSERT INTO api_keys (id, organization_id, name, prefix, key_hash) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(org.0)
            .bind(name)
            .bind(&prefix)
            .bind(hash_api_key(&secret))
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(NewApiKey { id, prefix, secret })
    }

    /// An organization's API keys, newest first (never the keys themselves).
    pub async fn api_keys(&self, org: OrgId) -> StoreResult<Vec<ApiKeyInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, prefix, created_at, last_used_at, revoked_at FROM api_keys \
             WHERE organization_id = $1 ORDER BY created_at DESC",
        )
        .bind(org.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(ApiKeyInfo {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    prefix: r.try_get("prefix")?,
                    created_at: r.try_get("created_at")?,
                    last_used_at: r.try_get("last_used_at")?,
                    revoked_at: r.try_get("revoked_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db)
    }

    /// Revokes one of an organization's keys; false if it has no such unrevoked key.
    pub async fn revoke_api_key(&self, org: OrgId, key_id: uuid::Uuid) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND organization_id = $2 AND revoked_at IS NULL",
        )
        .bind(key_id)
        .bind(org.0)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(n == 1)
    }

    /// Every organization, oldest first (the admin surface).
    pub async fn organizations(&self, limit: i64) -> StoreResult<Vec<Organization>> {
        let rows = sqlx::query(&format!("SELECT {ORG_COLUMNS} FROM organizations ORDER BY created_at LIMIT $1"))
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(org_from_row).collect()
    }

    #[instrument(skip_all, fields(org_id = %org))]
    pub async fn set_organization_plan(&self, org: OrgId, plan: &str) -> StoreResult<bool> {
        let n = sqlx::query("UPDATE organizations SET plan = $2, updated_at = now() WHERE id = $1")
            .bind(org.0)
            .bind(plan)
            .execute(&self.pool)
            .await
            .map_err(db)?
            .rows_affected();
        Ok(n == 1)
    }

    pub async fn organization_by_name(&self, name: &str) -> StoreResult<Option<Organization>> {
        let row = sqlx::query(&format!(
            "SELECT {ORG_COLUMNS} FROM organizations WHERE name = $1 ORDER BY created_at LIMIT 1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(org_from_row).transpose()
    }

    #[instrument(skip_all, fields(org_id = %org))]
    pub async fn set_organization_status(&self, org: OrgId, status: OrgStatus) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE organizations SET status = $2, status_changed_at = now(), updated_at = now() \
             WHERE id = $1 AND status <> $2",
        )
        .bind(org.0)
        .bind(status.as_str())
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(n == 1)
    }
}

#[async_trait]
impl OrgDirectory for PgStore {
    #[instrument(skip_all, fields(org_id = %org))]
    async fn get(&self, org: OrgId) -> StoreResult<Option<Organization>> {
        let row = sqlx::query(&format!("SELECT {ORG_COLUMNS} FROM organizations WHERE id = $1"))
            .bind(org.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(org_from_row).transpose()
    }

    async fn by_phone_number(&self, vapi_phone_number_id: &str) -> StoreResult<Option<OrgId>> {
        let id: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT organization_id FROM phone_numbers WHERE vapi_phone_number_id = $1")
                .bind(vapi_phone_number_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(id.map(OrgId))
    }

    async fn by_assistant(&self, vapi_assistant_id: &str) -> StoreResult<Option<OrgId>> {
        let id: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT organization_id FROM assistants WHERE vapi_assistant_id = $1")
                .bind(vapi_assistant_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(id.map(OrgId))
    }

    async fn by_call(&self, vapi_call_id: &str) -> StoreResult<Option<OrgId>> {
        let id: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT organization_id FROM call_keys WHERE vapi_call_id = $1")
                .bind(vapi_call_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(id.map(OrgId))
    }

    async fn by_api_key(&self, secret: &str) -> StoreResult<Option<OrgId>> {
        // `last_used_at` is refreshed at most once a minute, so busy keys do not write on
        // every request.
        let id: Option<uuid::Uuid> = sqlx::query_scalar(
            "WITH k AS (SELECT id, organization_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL), \
                  touched AS (UPDATE api_keys SET last_used_at = now() WHERE id IN (SELECT id FROM k) \
                              AND (last_used_at IS NULL OR last_used_at < now() - interval '60 seconds')) \
             SELECT organization_id FROM k",
        )
        .bind(hash_api_key(secret))
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(id.map(OrgId))
    }
}

impl PgStore {
    /// Sets the time zone an organization's usage is counted by day in, and rebuilds its daily
    /// usage in it, in one transaction. The name must be one PostgreSQL knows (IANA).
    #[instrument(skip_all, fields(org_id = %org))]
    pub async fn set_organization_billing_timezone(&self, org: OrgId, time_zone: &str) -> StoreResult<TimeZoneChange> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = $1)")
            .bind(time_zone)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        if !known {
            return Ok(TimeZoneChange::UnknownTimeZone);
        }
        let found = sqlx::query("UPDATE organizations SET billing_timezone = $2, updated_at = now() WHERE id = $1")
            .bind(org.0)
            .bind(time_zone)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected()
            == 1;
        if !found {
            return Ok(TimeZoneChange::NoOrganization);
        }
        sqlx::query("SELECT callplane_rebuild_daily_usage($1)").bind(org.0).execute(&mut *tx).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(TimeZoneChange::Set)
    }

    /// Rebuilds an organization's daily usage from the ledger (`callplane usage rebuild-daily`):
    /// returns the day rows written. Safe with reports arriving: their writers wait for it.
    #[instrument(skip_all, fields(org_id = %org))]
    pub async fn rebuild_daily_usage(&self, org: OrgId) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let written: i64 = sqlx::query_scalar("SELECT callplane_rebuild_daily_usage($1)")
            .bind(org.0)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(written)
    }
}

#[async_trait]
impl callplane_core::seams::OrgAdmin for PgStore {
    async fn create(&self, new: &NewOrganization) -> StoreResult<Organization> {
        self.create_organization(new).await
    }

    async fn list(&self, limit: i64) -> StoreResult<Vec<Organization>> {
        self.organizations(limit).await
    }

    async fn set_plan(&self, org: OrgId, plan: &str) -> StoreResult<bool> {
        self.set_organization_plan(org, plan).await
    }

    async fn set_billing_timezone(&self, org: OrgId, time_zone: &str) -> StoreResult<TimeZoneChange> {
        self.set_organization_billing_timezone(org, time_zone).await
    }

    async fn set_status(&self, org: OrgId, status: OrgStatus) -> StoreResult<bool> {
        // Unchanged status is still "found".
        Ok(self.set_organization_status(org, status).await? || OrgDirectory::get(self, org).await?.is_some())
    }

    async fn create_api_key(&self, org: OrgId, name: &str) -> StoreResult<NewApiKey> {
        PgStore::create_api_key(self, org, name).await
    }

    async fn api_keys(&self, org: OrgId) -> StoreResult<Vec<ApiKeyInfo>> {
        PgStore::api_keys(self, org).await
    }

    async fn revoke_api_key(&self, org: OrgId, key_id: uuid::Uuid) -> StoreResult<bool> {
        PgStore::revoke_api_key(self, org, key_id).await
    }
}
