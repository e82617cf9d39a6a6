//! Events that passed authentication but failed to process, kept for replay.

use crate::{PgStore, db};
use callplane_core::OrgId;
use callplane_core::seams::StoreResult;
use callplane_core::text::{MAX_ID_CHARS, storable, storable_json, truncate_chars};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{QueryBuilder, Row};

#[derive(Clone, Debug)]
pub struct NewDeadLetter<'a> {
    pub org: Option<OrgId>,
    pub call_id: Option<&'a str>,
    pub message_type: Option<&'a str>,
    pub error_code: &'a str,
    pub error: &'a str,
    /// The whole body as received (`{"message": {...}}`).
    pub payload: &'a Value,
    /// The body's exact bytes, when they are at hand: replay reads these first.
    pub raw_body: Option<&'a [u8]>,
    pub received_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub organization_id: Option<uuid::Uuid>,
    pub call_id: Option<String>,
    pub message_type: Option<String>,
    pub error_code: String,
    pub error: String,
    pub payload: Value,
    /// The body exactly as received, when it was kept.
    #[serde(skip)]
    pub raw_body: Option<Vec<u8>>,
    pub received_at: DateTime<Utc>,
    pub attempts: i32,
    pub resolved_at: Option<DateTime<Utc>>,
}

/// Which dead letters to replay or list. Empty means every unresolved one.
#[derive(Clone, Debug, Default)]
pub struct DeadLetterFilter {
    pub org: Option<OrgId>,
    pub call_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub include_resolved: bool,
}

impl PgStore {
    /// Keeps an event. Whatever it holds, it is stored: text is made storable (NUL replaced),
    /// ids and types are cut to a length an index takes, and the exact bytes go to `raw_body`.
    pub async fn record_dead_letter(&self, d: &NewDeadLetter<'_>) -> StoreResult<i64> {
        let short = |s: Option<&str>| s.map(|s| storable(truncate_chars(s, MAX_ID_CHARS)).into_owned());
        sqlx::query_scalar(
            "INSERT INTO dead_letters (organization_id, call_id, message_type, error_code, error, payload, raw_body, \
                                       received_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(d.org.map(|o| o.0))
        .bind(short(d.call_id))
        .bind(short(d.message_type))
        .bind(storable(d.error_code))
        .bind(storable(d.error))
        .bind(storable_json(d.payload).as_ref())
        .bind(d.raw_body)
        .bind(d.received_at)
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    pub async fn dead_letters(&self, f: &DeadLetterFilter) -> StoreResult<Vec<DeadLetter>> {
        let mut q = QueryBuilder::new(
            "SELECT id, organization_id, call_id, message_type, error_code, error, payload, raw_body, received_at, \
             attempts, resolved_at FROM dead_letters WHERE true",
        );
        if !f.include_resolved {
            q.push(" AND resolved_at IS NULL");
        }
        if let Some(org) = f.org {
            q.push(" AND organization_id = ").push_bind(org.0);
        }
        if let Some(call) = &f.call_id {
            q.push(" AND call_id = ").push_bind(call.clone());
        }
        if let Some(since) = f.since {
            q.push(" AND received_at >= ").push_bind(since);
        }
        if let Some(until) = f.until {
            q.push(" AND received_at < ").push_bind(until);
        }
        q.push(" ORDER BY received_at, id");
        let rows = q.build().fetch_all(&self.pool).await.map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetter {
                    id: r.try_get("id")?,
                    organization_id: r.try_get("organization_id")?,
                    call_id: r.try_get("call_id")?,
                    message_type: r.try_get("message_type")?,
                    error_code: r.try_get("error_code")?,
                    error: r.try_get("error")?,
                    payload: r.try_get("payload")?,
                    raw_body: r.try_get("raw_body")?,
                    received_at: r.try_get("received_at")?,
                    attempts: r.try_get("attempts")?,
                    resolved_at: r.try_get("resolved_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db)
    }

    /// Records the outcome of a replay attempt.
    pub async fn finish_dead_letter_attempt(
        &self,
        id: i64,
        org: Option<OrgId>,
        error: Option<(&str, &str)>,
    ) -> StoreResult<()> {
        match error {
            None => sqlx::query(
                "UPDATE dead_letters SET attempts = attempts + 1, last_attempt_at = now(), resolved_at = now(), \
                 organization_id = COALESCE(organization_id, $2) WHERE id = $1",
            )
            .bind(id)
            .bind(org.map(|o| o.0)),
            Some((code, message)) => sqlx::query(
                "UPDATE dead_letters SET attempts = attempts + 1, last_attempt_at = now(), error_code = $2, error = $3 \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(storable(code).into_owned())
            .bind(storable(message).into_owned()),
        }
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    pub async fn open_dead_letter_count(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }
}
