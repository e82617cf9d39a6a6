//! What the phase advisor reads from the database: the servers' daily figures
//! (`advisor_daily`), and what only the database knows (failed events, concurrent calls,
//! connections, sizes).

use crate::{PgStore, db};
use callplane_core::seams::StoreResult;
use chrono::{DateTime, NaiveDate, Utc};

/// Client connections against a limit, and whose limit it is (`server`, `database`, `role`).
#[derive(Clone, Copy, Debug)]
pub struct Connections {
    pub used: i64,
    pub limit: i64,
    pub scope: &'static str,
}

impl PgStore {
    /// Adds a server's counts to `day` and raises its peaks: a figure whose name ends `_peak`
    /// keeps the day's highest value; the others are added to.
    pub async fn record_advisor_day(&self, day: NaiveDate, figures: &[(&str, i64)]) -> StoreResult<()> {
        if figures.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = figures.iter().map(|(n, _)| *n).collect();
        let values: Vec<i64> = figures.iter().map(|(_, v)| *v).collect();
        sqlx::query(
            "INSERT INTO advisor_daily (day, metric, value) SELECT $1, m, v FROM unnest($2::text[], $3::bigint[]) AS t(m, v) \
             ON CONFLICT (day, metric) DO UPDATE SET updated_at = now(), value = CASE \
                 WHEN right(advisor_daily.metric, 5) = '_peak' THEN greatest(advisor_daily.value, EXCLUDED.value) \
                 ELSE advisor_daily.value + EXCLUDED.value END",
        )
        .bind(day)
        .bind(&names)
        .bind(&values)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Every daily figure from `from` on: (day, name, value).
    pub async fn advisor_days(&self, from: NaiveDate) -> StoreResult<Vec<(NaiveDate, String, i64)>> {
        sqlx::query_as("SELECT day, metric, value FROM advisor_daily WHERE day >= $1 ORDER BY day, metric")
            .bind(from)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    /// Removes daily figures older than `before`.
    pub async fn prune_advisor_days(&self, before: NaiveDate) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM advisor_daily WHERE day < $1").bind(before).execute(&self.pool).await;
        Ok(done.map_err(db)?.rows_affected())
    }

    /// Events kept as dead letters (they could not be processed), by the UTC day they arrived.
    pub async fn dead_letters_by_day(&self, from: DateTime<Utc>) -> StoreResult<Vec<(NaiveDate, i64)>> {
        sqlx::query_as(
            "SELECT (received_at AT TIME ZONE 'UTC')::date, count(*) FROM dead_letters \
             WHERE received_at >= $1 GROUP BY 1 ORDER BY 1",
        )
        .bind(from)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// The most calls in progress at once, by UTC day, from the calls' start and end times. A
    /// call still in progress counts until now; one that started more than a day ago and never
    /// ended (its report lost, not yet reconciled) does not count.
    pub async fn concurrent_call_peaks(&self, from: DateTime<Utc>) -> StoreResult<Vec<(NaiveDate, i64)>> {
        sqlx::query_as(
            "WITH spans AS ( \
                 SELECT started_at AS s, coalesce(ended_at, now()) AS e FROM calls \
                 WHERE created_at >= $1 - interval '1 day' AND started_at IS NOT NULL \
                   AND (ended_at IS NOT NULL OR (status_rank < 5 AND started_at > now() - interval '1 day')) \
             ), edges AS ( \
                 SELECT s AS t, 1 AS d FROM spans UNION ALL SELECT e, -1 FROM spans \
             ), running AS ( \
                 SELECT t, sum(d) OVER (ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS n FROM edges \
             ) \
             SELECT (t AT TIME ZONE 'UTC')::date, max(n)::bigint FROM running WHERE t >= $1 GROUP BY 1 ORDER BY 1",
        )
        .bind(from)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// Client connections against the tightest limit that applies to callplane's: the
    /// server's `max_connections` (less the superusers' reserve), the database's `CONNECTION
    /// LIMIT`, the role's. A hosted database often sets the last two.
    pub async fn database_connections(&self) -> StoreResult<Connections> {
        let (server, server_limit, database, database_limit, role, role_limit): (i64, i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT count(*), \
                        current_setting('max_connections')::bigint - current_setting('superuser_reserved_connections')::bigint, \
                        count(*) FILTER (WHERE datname = current_database()), \
                        (SELECT datconnlimit FROM pg_database WHERE datname = current_database())::bigint, \
                        count(*) FILTER (WHERE usename = current_user), \
                        (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user)::bigint \
                 FROM pg_stat_activity WHERE backend_type = 'client backend'",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        let candidates =
            [("server", server, server_limit), ("database", database, database_limit), ("role", role, role_limit)];
        let share = |c: &(&str, i64, i64)| c.1 as f64 / c.2 as f64;
        let binding = candidates
            .into_iter()
            .filter(|c| c.2 > 0)
            .max_by(|a, b| share(a).total_cmp(&share(b)))
            .unwrap_or(("server", server, server_limit));
        Ok(Connections { used: binding.1, limit: binding.2, scope: binding.0 })
    }

    /// The transcripts' size on disk: every partition with its indexes and TOAST.
    pub async fn transcripts_bytes(&self) -> StoreResult<i64> {
        sqlx::query_scalar(
            "SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint \
             FROM pg_partition_tree('call_transcripts') WHERE isleaf",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    /// How many calls are stored, counted up to `cap` (a count past it is not needed, and
    /// would read the whole table).
    pub async fn calls_stored_up_to(&self, cap: i64) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT count(*) FROM (SELECT 1 FROM calls LIMIT $1) c")
            .bind(cap)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }
}
