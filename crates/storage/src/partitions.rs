//! Monthly partitions of `calls` and `call_transcripts`.
//!
//! Partitions exist at least `months_ahead` months past the current one (made by `migrate`,
//! at `serve` start-up and hourly). A call from a past month gets its partition on first
//! sight. There is no default partition: a row without a partition would hide there and make
//! every later `CREATE ... PARTITION OF` for that month fail, so instead the far-future
//! guard in the pipeline refuses timestamps that would need a partition too far ahead.

use crate::{PgStore, db};
use callplane_core::billing::month_start;
use callplane_core::seams::StoreResult;
use chrono::{DateTime, Datelike, Months, Utc};
use serde::Serialize;
use sqlx::Row;
use tracing::{info, instrument};

#[derive(Clone, Debug, Serialize)]
pub struct PartitionReport {
    /// Partitions this run created, e.g. `calls_2027_02`.
    pub created: Vec<String>,
    /// Every monthly partition of `calls`, oldest first.
    pub calls_partitions: Vec<String>,
    /// The last month covered, as `YYYY-MM`.
    pub covered_through: Option<String>,
}

/// A month of `partition_archives`: archived to object storage (`callplane partitions
/// archive`), or on its way out or back.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct ArchivedMonth {
    pub month: DateTime<Utc>,
    /// `archiving`, `archived` or `restoring`.
    pub state: String,
    pub manifest_key: Option<String>,
    pub calls: Option<i64>,
    pub transcripts: Option<i64>,
    /// Size of its Parquet files.
    pub bytes: Option<i64>,
    pub archived_at: Option<DateTime<Utc>>,
}

/// The month of a partition named `calls_YYYY_MM`.
pub(crate) fn partition_month(name: &str) -> Option<DateTime<Utc>> {
    let date = chrono::NaiveDate::parse_from_str(&format!("{}_01", name.strip_prefix("calls_")?), "%Y_%m_%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc())
}

fn month_key(t: DateTime<Utc>) -> i32 {
    t.year() * 12 + t.month0() as i32
}

impl PgStore {
    /// Makes sure the partition holding `created_at` exists. Cached, so the common case is a
    /// hash lookup.
    pub(crate) async fn ensure_partition_for(&self, created_at: DateTime<Utc>) -> StoreResult<()> {
        let key = month_key(created_at);
        if self.known_months.lock().map(|m| m.contains(&key)).unwrap_or(false) {
            return Ok(());
        }
        let created: bool = sqlx::query_scalar("SELECT callplane_ensure_month($1)")
            .bind(month_start(created_at))
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        if created {
            info!(month = %month_start(created_at).format("%Y-%m"), "created monthly partitions");
        }
        if let Ok(mut m) = self.known_months.lock() {
            m.insert(key);
        }
        Ok(())
    }

    /// Creates the partitions for the current month and `months_ahead` after it, then
    /// ANALYZEs the parents so the planner knows about them.
    #[instrument(skip(self))]
    pub async fn ensure_partitions(&self, now: DateTime<Utc>, months_ahead: u32) -> StoreResult<PartitionReport> {
        let mut created = Vec::new();
        let first = month_start(now);
        for i in 0..=months_ahead {
            let Some(month) = first.checked_add_months(Months::new(i)) else { break };
            let made: bool = sqlx::query_scalar("SELECT callplane_ensure_month($1)")
                .bind(month)
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
            if made {
                created.push(format!("calls_{}", month.format("%Y_%m")));
            }
            if let Ok(mut m) = self.known_months.lock() {
                m.insert(month_key(month));
            }
        }
        if !created.is_empty() {
            sqlx::query("ANALYZE calls").execute(&self.pool).await.map_err(db)?;
            sqlx::query("ANALYZE call_transcripts").execute(&self.pool).await.map_err(db)?;
        }
        let mut report = self.partition_report().await?;
        report.created = created;
        Ok(report)
    }

    pub async fn partition_report(&self) -> StoreResult<PartitionReport> {
        let rows = sqlx::query(
            "SELECT c.relname AS name FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent \
             WHERE p.relname = 'calls' ORDER BY c.relname",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let calls_partitions: Vec<String> =
            rows.iter().map(|r| r.try_get::<String, _>("name")).collect::<Result<_, _>>().map_err(db)?;
        let covered_through =
            calls_partitions.last().and_then(|n| n.strip_prefix("calls_")).map(|s| s.replacen('_', "-", 1));
        Ok(PartitionReport { created: Vec::new(), calls_partitions, covered_through })
    }

    /// The months `calls` has a partition for, oldest first.
    pub async fn partition_months(&self) -> StoreResult<Vec<DateTime<Utc>>> {
        let report = self.partition_report().await?;
        Ok(report.calls_partitions.iter().filter_map(|name| partition_month(name)).collect())
    }

    /// Every month in `partition_archives`, oldest first.
    pub async fn archived_months(&self) -> StoreResult<Vec<ArchivedMonth>> {
        sqlx::query_as(
            "SELECT month, state, manifest_key, calls, transcripts, bytes, archived_at \
             FROM partition_archives ORDER BY month",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }
}
