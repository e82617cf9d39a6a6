//! `PgFunctionData`: function data in Postgres, the phase-1 backend.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{AgentDirectory, FunctionData, StoreResult};
use serde_json::{Map, Value};
use sqlx::Row;
use tracing::instrument;

#[derive(Clone)]
pub struct PgFunctionData(pub PgStore);

#[async_trait]
impl FunctionData for PgFunctionData {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn preload(&self, org: OrgId) -> StoreResult<Map<String, Value>> {
        let rows = sqlx::query("SELECT key, value FROM function_data WHERE organization_id = $1 ORDER BY key")
            .bind(org.0)
            .fetch_all(self.0.pool())
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>("key")?, r.try_get::<Value, _>("value")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn get(&self, org: OrgId, key: &str) -> StoreResult<Option<Value>> {
        sqlx::query_scalar("SELECT value FROM function_data WHERE organization_id = $1 AND key = $2")
            .bind(org.0)
            .bind(key)
            .fetch_optional(self.0.pool())
            .await
            .map_err(db)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn put(&self, org: OrgId, key: &str, value: &Value) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO function_data (organization_id, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (organization_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
        )
        .bind(org.0)
        .bind(key)
        .bind(value)
        .execute(self.0.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn delete(&self, org: OrgId, key: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM function_data WHERE organization_id = $1 AND key = $2")
            .bind(org.0)
            .bind(key)
            .execute(self.0.pool())
            .await
            .map_err(db)?
            .rows_affected();
        Ok(n == 1)
    }
}

/// The directory read straight from the database, with nothing remembered (for commands that
/// process events without serving answers).
#[async_trait]
impl AgentDirectory for PgStore {
    async fn function_data(&self, org: OrgId) -> StoreResult<std::sync::Arc<Map<String, Value>>> {
        Ok(std::sync::Arc::new(PgFunctionData(self.clone()).preload(org).await?))
    }

    fn invalidate(&self, _org: OrgId) {}

    fn invalidate_all(&self) {}
}
