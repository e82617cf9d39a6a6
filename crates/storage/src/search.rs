//! Transcript search on PostgreSQL: the GIN index on `call_transcripts.search`, built without
//! blocking writes, and ranked full-text queries that stay in the partitions of their window.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::seams::{SearchError, SearchHit, SearchRequest, StoreResult, TranscriptSearch};
use serde::Serialize;
use sqlx::Row;
use tracing::instrument;

/// The partitioned index on the parent; each partition's own index is attached to it.
const PARENT_INDEX: &str = "call_transcripts_search";

/// What building the search index did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SearchIndexReport {
    pub partitions: usize,
    /// Partitions whose index this run built and attached.
    pub built: Vec<String>,
    /// Whether the parent's index is valid now (every partition has its index attached), so the
    /// planner uses it.
    pub valid: bool,
}

/// One step of the build, for progress.
#[derive(Clone, Debug)]
pub struct SearchIndexStep<'a> {
    pub partition: &'a str,
    pub done: usize,
    pub of: usize,
    /// Rows in the partition (the planner's estimate).
    pub rows: i64,
}

impl PgStore {
    /// Builds the search index of every transcript partition that lacks one, each with
    /// `CREATE INDEX CONCURRENTLY` (writes go on) and then attached to the parent's index
    /// (a brief lock). New partitions get theirs when they are made. Safe to run again, and
    /// after an interrupted run (an invalid leftover index is dropped and built again).
    pub async fn build_search_index(
        &self,
        mut progress: impl FnMut(SearchIndexStep<'_>),
    ) -> StoreResult<SearchIndexReport> {
        let partitions: Vec<(String, i64)> = sqlx::query_as(
            "SELECT c.relname::text, GREATEST(c.reltuples, 0)::bigint FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'call_transcripts'::regclass ORDER BY c.relname",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut report = SearchIndexReport { partitions: partitions.len(), ..SearchIndexReport::default() };
        for (done, (partition, rows)) in partitions.iter().enumerate() {
            progress(SearchIndexStep { partition, done, of: partitions.len(), rows: *rows });
            if self.search_index_attached(partition).await? {
                continue;
            }
            let index = format!("{partition}_search");
            // A concurrent build that was interrupted leaves an invalid index behind.
            let valid: Option<bool> = sqlx::query_scalar(
                "SELECT x.indisvalid FROM pg_class c JOIN pg_index x ON x.indexrelid = c.oid WHERE c.relname = $1",
            )
            .bind(&index)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            if valid == Some(false) {
                sqlx::raw_sql(&format!("DROP INDEX CONCURRENTLY IF EXISTS \"{index}\""))
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
            }
            sqlx::raw_sql(&format!(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS \"{index}\" ON \"{partition}\" USING gin (search)"
            ))
            .execute(&self.pool)
            .await
            .map_err(db)?;
            sqlx::raw_sql(&format!("ALTER INDEX {PARENT_INDEX} ATTACH PARTITION \"{index}\""))
                .execute(&self.pool)
                .await
                .map_err(db)?;
            report.built.push(partition.clone());
        }
        progress(SearchIndexStep { partition: "", done: partitions.len(), of: partitions.len(), rows: 0 });
        report.valid = self.search_index_valid().await?;
        Ok(report)
    }

    /// Whether `partition` has an index attached to the parent's search index.
    async fn search_index_attached(&self, partition: &str) -> StoreResult<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_index x ON x.indexrelid = i.inhrelid \
             WHERE i.inhparent = $1::regclass AND x.indrelid = $2::regclass)",
        )
        .bind(PARENT_INDEX)
        .bind(partition)
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    /// Whether the parent's search index is valid (every partition's index attached).
    pub async fn search_index_valid(&self) -> StoreResult<bool> {
        let valid: Option<bool> = sqlx::query_scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = $1::regclass")
            .bind(PARENT_INDEX)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(valid == Some(true))
    }
}

/// The ranked page (`$1` organization, `$2` query, `[$3, $4)` window, `$5` limit, `$6`-`$8`
/// the cursor or NULLs): the hits first (rank, then newest), then the snippets of those only
/// (`ts_headline` reads the whole transcript, so it runs on the page, not on every match).
/// Matches are marked with \u{1} and \u{2}, which the API turns into HTML.
pub const SEARCH_SQL: &str = "\
WITH q AS (SELECT websearch_to_tsquery('english', $2) AS q), \
hits AS ( \
    SELECT t.call_id, t.created_at, ts_rank(t.search, q.q) AS rank \
    FROM call_transcripts t, q \
    WHERE t.organization_id = $1 AND t.created_at >= $3 AND t.created_at < $4 AND t.search @@ q.q \
      AND ($6::real IS NULL OR (ts_rank(t.search, q.q), t.created_at, t.call_id) < ($6::real, $7, $8)) \
    ORDER BY rank DESC, t.created_at DESC, t.call_id DESC \
    LIMIT $5) \
SELECT h.call_id, h.created_at, h.rank, \
       ts_headline('english', coalesce(t.transcript, ''), q.q, \
                   'StartSel=\"\u{1}\", StopSel=\"\u{2}\", MaxFragments=2, MaxWords=18, MinWords=6, FragmentDelimiter=\" … \"') \
           AS snippet \
FROM hits h JOIN call_transcripts t ON t.call_id = h.call_id AND t.created_at = h.created_at \
     AND t.organization_id = $1, q \
ORDER BY h.rank DESC, h.created_at DESC, h.call_id DESC";

#[async_trait]
impl TranscriptSearch for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    #[instrument(skip_all, fields(org_id = %r.org))]
    async fn search(&self, r: &SearchRequest) -> Result<Vec<SearchHit>, SearchError> {
        let after = r.after.as_ref();
        let rows = sqlx::query(SEARCH_SQL)
            .bind(r.org.0)
            .bind(&r.query)
            .bind(r.from)
            .bind(r.to)
            .bind(r.limit)
            .bind(after.map(|a| a.rank))
            .bind(after.map(|a| a.created_at))
            .bind(after.map(|a| a.call_id.as_str()))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                Ok(SearchHit {
                    call_id: row.try_get("call_id")?,
                    created_at: row.try_get("created_at")?,
                    rank: row.try_get("rank")?,
                    snippet: row.try_get("snippet")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| SearchError::Store(db(e)))
    }
}
