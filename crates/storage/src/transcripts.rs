//! `PgTranscriptStore`: transcripts in their own partitioned table, the phase-1 backend.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{StoreResult, Transcript, TranscriptStore};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use tracing::instrument;

#[derive(Clone)]
pub struct PgTranscriptStore(pub PgStore);

/// Stores (replaces) a call's transcript; returns whether the stored one changed. A final
/// transcript is never replaced by a live one, a live one only by one with as many messages,
/// and nothing is rewritten by the same transcript again (a duplicate delivery).
/// The caller has made the month's partition.
pub(crate) async fn write<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    org: OrgId,
    call_id: &str,
    call_created_at: DateTime<Utc>,
    t: &Transcript,
) -> StoreResult<bool> {
    let written = sqlx::query(
        "INSERT INTO call_transcripts (call_id, organization_id, created_at, transcript, messages, is_final) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (call_id, created_at) DO UPDATE SET transcript = EXCLUDED.transcript, \
            messages = EXCLUDED.messages, is_final = EXCLUDED.is_final, updated_at = now() \
         WHERE call_transcripts.organization_id = EXCLUDED.organization_id AND ( \
            EXCLUDED.is_final OR (NOT call_transcripts.is_final \
            AND jsonb_array_length(EXCLUDED.messages) >= jsonb_array_length(call_transcripts.messages))) \
         AND (call_transcripts.is_final, call_transcripts.transcript, call_transcripts.messages) \
             IS DISTINCT FROM (EXCLUDED.is_final, EXCLUDED.transcript, EXCLUDED.messages)",
    )
    .bind(call_id)
    .bind(org.0)
    .bind(call_created_at)
    .bind(&t.text)
    .bind(sqlx::types::Json(&t.messages))
    .bind(t.is_final)
    .execute(exec)
    .await
    .map_err(db)?;
    Ok(written.rows_affected() == 1)
}

#[async_trait]
impl TranscriptStore for PgTranscriptStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn stores_in_transaction(&self) -> bool {
        true
    }

    #[instrument(skip_all, fields(org_id = %org, call_id))]
    async fn put(&self, org: OrgId, call_id: &str, call_created_at: DateTime<Utc>, t: &Transcript) -> StoreResult<()> {
        self.0.ensure_partition_for(call_created_at).await?;
        write(self.0.pool(), org, call_id, call_created_at, t).await?;
        Ok(())
    }

    #[instrument(skip_all, fields(org_id = %org, call_id))]
    async fn get(&self, org: OrgId, call_id: &str) -> StoreResult<Option<Transcript>> {
        let row = sqlx::query(
            "SELECT transcript, messages, is_final FROM call_transcripts WHERE organization_id = $1 AND call_id = $2",
        )
        .bind(org.0)
        .bind(call_id)
        .fetch_optional(self.0.pool())
        .await
        .map_err(db)?;
        let Some(r) = row else { return Ok(None) };
        let messages: Value = r.try_get("messages").map_err(db)?;
        Ok(Some(Transcript {
            text: r.try_get("transcript").map_err(db)?,
            messages: match messages {
                Value::Array(a) => a,
                _ => Vec::new(),
            },
            is_final: r.try_get("is_final").map_err(db)?,
        }))
    }
}
