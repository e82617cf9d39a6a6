//! `PgTranscriptStore`: transcripts in their own partitioned table, the phase-1 backend.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{StoreError, StoreResult, Transcript, TranscriptStore};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use tracing::instrument;

#[derive(Clone)]
pub struct PgTranscriptStore(pub PgStore);

/// Whether a stored transcript gives way to another: a final transcript is never replaced by
/// a live one, a live one only by one with at least as many messages (counted in the row, or
/// given by `message_count` when they are in object storage), and nothing is rewritten by the
/// same transcript again (a duplicate delivery). `EXCLUDED` is the arriving row.
pub(crate) const REPLACES: &str = "call_transcripts.organization_id = EXCLUDED.organization_id AND ( \
    EXCLUDED.is_final OR (NOT call_transcripts.is_final \
    AND coalesce(EXCLUDED.message_count, jsonb_array_length(EXCLUDED.messages)) \
        >= coalesce(call_transcripts.message_count, jsonb_array_length(call_transcripts.messages))))";

/// Stores (replaces) a call's transcript in the row; returns whether the stored one changed
/// (see [`REPLACES`]). A transcript kept in object storage before is replaced by this one,
/// which no longer points at the object. The caller has made the month's partition.
pub(crate) async fn write<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    org: OrgId,
    call_id: &str,
    call_created_at: DateTime<Utc>,
    t: &Transcript,
) -> StoreResult<bool> {
    let written = sqlx::query(&format!(
        "INSERT INTO call_transcripts (call_id, organization_id, created_at, transcript, messages, is_final) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (call_id, created_at) DO UPDATE SET transcript = EXCLUDED.transcript, \
            messages = EXCLUDED.messages, is_final = EXCLUDED.is_final, object_key = NULL, \
            message_count = NULL, updated_at = now() \
         WHERE {REPLACES} \
         AND (call_transcripts.is_final, call_transcripts.transcript, call_transcripts.messages, \
              call_transcripts.object_key) \
             IS DISTINCT FROM (EXCLUDED.is_final, EXCLUDED.transcript, EXCLUDED.messages, NULL)"
    ))
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

/// A call's transcript row: the transcript itself, or where in object storage it is.
pub(crate) struct StoredTranscript {
    pub transcript: Transcript,
    /// Set when the messages (and a copy of the text) are in this object, not in the row.
    pub object_key: Option<String>,
}

/// Reads the organization's row for the call; another organization's call id finds nothing.
pub(crate) async fn read(store: &PgStore, org: OrgId, call_id: &str) -> StoreResult<Option<StoredTranscript>> {
    let row = sqlx::query(
        "SELECT transcript, messages, is_final, object_key FROM call_transcripts \
         WHERE organization_id = $1 AND call_id = $2",
    )
    .bind(org.0)
    .bind(call_id)
    .fetch_optional(store.pool())
    .await
    .map_err(db)?;
    let Some(r) = row else { return Ok(None) };
    let messages: Value = r.try_get("messages").map_err(db)?;
    Ok(Some(StoredTranscript {
        transcript: Transcript {
            text: r.try_get("transcript").map_err(db)?,
            messages: match messages {
                Value::Array(a) => a,
                _ => Vec::new(),
            },
            is_final: r.try_get("is_final").map_err(db)?,
        },
        object_key: r.try_get("object_key").map_err(db)?,
    }))
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
        match read(&self.0, org, call_id).await? {
            None => Ok(None),
            Some(StoredTranscript { transcript, object_key: None }) => Ok(Some(transcript)),
            // Moved by `callplane transcripts move --to object-store`, or written by that backend.
            Some(StoredTranscript { object_key: Some(key), .. }) => Err(StoreError::Internal(format!(
                "the transcript of call {call_id} is kept in object storage ({key}); read it with \
                 `backends.transcripts = \"object-store\"` (a build with the object-store feature), \
                 or move it back with `callplane transcripts move --to postgres`"
            ))),
        }
    }
}
