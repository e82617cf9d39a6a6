//! Old months archived to object storage, and restored (phase 3, the `object-store` feature):
//! `callplane partitions archive --before YYYY-MM` and `callplane partitions restore YYYY-MM`.
//!
//! A month's partitions of `calls` and `call_transcripts` leave the database in this order, and
//! each step can be run again after a crash:
//!
//! 1. The month is recorded as `archiving` in `partition_archives`: from then on
//!    `callplane_ensure_month` refuses to make its partitions again.
//! 2. Both partitions are detached (`DETACH PARTITION ... CONCURRENTLY`, which lets reads and
//!    writes of other months go on; one a crash left half-detached is finalized).
//! 3. Each is counted and checksummed (the MD5 of its rows' MD5s in key order, as
//!    `partitions convert` compares months), then exported to one Parquet file (zstd, typed
//!    columns: text, integers, floats, booleans, timestamps in UTC; `jsonb` and `uuid` as their
//!    text), under `<prefix>/archive/month=YYYY-MM/` so that DuckDB, Spark or pandas read a
//!    whole archive as one Hive-partitioned table.
//! 4. Each file is read back into a scratch table, with the code a restore uses, and its count
//!    and checksum must equal the partition's.
//! 5. The manifest (`manifest.json`: rows, checksum, columns and size of each file, the schema
//!    version) is written, and only then are the partitions dropped, in the transaction that
//!    marks the month `archived`.
//!
//! A restore loads each file into a new table, checks its count and checksum against the
//! manifest, then renames and attaches both tables and forgets the month in one transaction.
//! The archive's objects are kept (they are still a valid copy; archiving the month again
//! rewrites them). Transcripts already in object storage stay there: their rows keep
//! `object_key`, which is valid again once the month is back. One archive or restore runs at a
//! time (a session advisory lock).

use crate::convert::{ident, refused};
use crate::objects::{Objects, object_error, stored_key};
use crate::{PgStore, db};
use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int16Type, Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use callplane_core::billing::month_start;
use callplane_core::seams::{StoreError, StoreResult};
use chrono::{DateTime, Months, Utc};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::buffered::{BufReader, BufWriter};
use object_store::path::{Path as ObjectPath, PathPart};
use parquet::arrow::{AsyncArrowWriter, ParquetRecordBatchStreamBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{Connection, PgConnection, Row};
use std::sync::Arc;
use std::time::Instant;
use tracing::info;

/// The tables a month is archived from, each with the key its rows are checksummed in order of.
const TABLES: [(&str, &str); 2] = [("calls", "id, created_at"), ("call_transcripts", "call_id, created_at")];
/// Rows per Parquet row group and per batch written or loaded.
const ROW_GROUP: usize = 8192;
const BATCH: usize = 2048;
const FORMAT: &str = "callplane-archive";
const LOCK: &str = "SELECT pg_try_advisory_lock(hashtext('callplane_archive'))";

/// A column as archived: its name and its PostgreSQL type (`format_type`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedColumn {
    pub name: String,
    pub pg_type: String,
}

/// One table of an archived month, as its manifest records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchivedTable {
    pub table: String,
    /// The Parquet object's key in the store.
    pub object: String,
    pub rows: i64,
    /// MD5 of the rows' MD5s (each of `ROW(columns)::text`), in key order.
    pub checksum: String,
    pub bytes: u64,
    pub columns: Vec<ArchivedColumn>,
}

/// `manifest.json`, next to the month's Parquet files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// `YYYY-MM`.
    pub month: String,
    /// The last migration applied to the database the month came from.
    pub schema_version: i64,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub tables: Vec<ArchivedTable>,
}

impl Manifest {
    /// The rows the manifest records for `table` (0 when it has none).
    fn rows(&self, table: &str) -> i64 {
        self.tables.iter().find(|t| t.table == table).map_or(0, |t| t.rows)
    }
}

/// What `archive` did for one month.
#[derive(Clone, Debug, Serialize)]
pub struct MonthArchived {
    pub month: String,
    pub calls: i64,
    pub transcripts: i64,
    /// Size of the Parquet files.
    pub bytes: u64,
    /// Size the two partitions took in the database (tables, TOAST and indexes).
    pub database_bytes: i64,
    pub manifest: String,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ArchiveReport {
    pub store: String,
    pub before: String,
    pub archived: Vec<MonthArchived>,
    /// Months before the cut-off that were archived already.
    pub already_archived: Vec<String>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub store: String,
    pub month: String,
    pub calls: i64,
    pub transcripts: i64,
    pub seconds: f64,
}

/// Where a long operation is: the month, the stage, and rows done of the stage's total.
#[derive(Clone, Copy, Debug)]
pub struct ArchiveProgress<'a> {
    pub month: &'a str,
    pub stage: &'a str,
    pub rows: i64,
    pub of: i64,
}

pub struct Archiver {
    pg: PgStore,
    objects: Objects,
}

impl Archiver {
    pub fn new(pg: PgStore, objects: Objects) -> Self {
        Self { pg, objects }
    }

    /// Archives every month before `before` (a month's first instant) that still has
    /// partitions, and finishes any a crash interrupted. `stale_before` is the oldest creation
    /// time an event may still have (`partitions.max_past_days` ago): a month that can still
    /// receive events is refused.
    pub async fn archive(
        &self,
        before: DateTime<Utc>,
        stale_before: DateTime<Utc>,
        mut progress: impl FnMut(ArchiveProgress<'_>),
    ) -> StoreResult<ArchiveReport> {
        let started = Instant::now();
        let before = month_start(before);
        let latest = month_start(stale_before);
        if before > latest {
            return Err(refused(format!(
                "months from {} on can still receive events (partitions.max_past_days); archive before {} at the latest",
                latest.format("%Y-%m"),
                latest.format("%Y-%m"),
            )));
        }
        let lock = self.lock().await?;
        let mut months: Vec<DateTime<Utc>> =
            self.pg.partition_months().await?.into_iter().filter(|m| *m < before).collect();
        let states: Vec<(DateTime<Utc>, String)> =
            sqlx::query_as("SELECT month, state FROM partition_archives WHERE month < $1")
                .bind(before)
                .fetch_all(self.pg.pool())
                .await
                .map_err(db)?;
        let mut already_archived = Vec::new();
        for (month, state) in &states {
            match state.as_str() {
                "archiving" => months.push(*month),
                "restoring" => {
                    return Err(refused(format!(
                        "{} is being restored; run `callplane partitions restore {}` again first",
                        month.format("%Y-%m"),
                        month.format("%Y-%m")
                    )));
                }
                _ => already_archived.push(month.format("%Y-%m").to_string()),
            }
        }
        months.sort();
        months.dedup();
        let mut archived = Vec::new();
        for month in months {
            archived.push(self.archive_month(month, &mut progress).await?);
        }
        release(lock).await;
        Ok(ArchiveReport {
            store: self.objects.describe().to_owned(),
            before: before.format("%Y-%m").to_string(),
            archived,
            already_archived,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    async fn archive_month(
        &self,
        month: DateTime<Utc>,
        progress: &mut impl FnMut(ArchiveProgress<'_>),
    ) -> StoreResult<MonthArchived> {
        let started = Instant::now();
        let label = month.format("%Y-%m").to_string();
        let pool = self.pg.pool();
        sqlx::query(
            "INSERT INTO partition_archives (month, state) VALUES ($1, 'archiving') ON CONFLICT (month) DO NOTHING",
        )
        .bind(month)
        .execute(pool)
        .await
        .map_err(db)?;
        let mut database_bytes = 0;
        for (parent, _) in TABLES {
            let part = partition_name(parent, month);
            self.detach(parent, &part).await?;
            database_bytes += sqlx::query_scalar::<_, Option<i64>>("SELECT pg_total_relation_size(to_regclass($1))")
                .bind(&part)
                .fetch_one(pool)
                .await
                .map_err(db)?
                .unwrap_or(0);
        }
        let mut tables = Vec::new();
        for (parent, key) in TABLES {
            let part = partition_name(parent, month);
            let columns = self.columns(parent).await?;
            let (rows, checksum) = self.checksum(&part, &columns, key).await?;
            let object = self.object(month, &format!("{parent}.parquet"));
            let stage = format!("exporting {parent}");
            let bytes = self.export(&part, &columns, key, &object, rows, &label, &stage, progress).await?;
            // Read it back the way a restore would, and compare.
            let check = format!("archive_check_{part}");
            self.scratch_table(parent, &check, true).await?;
            let loaded = self.load(&object, &columns, &check, rows, &label, "checking", progress).await;
            let compared = match loaded {
                Ok(_) => self.checksum(&check, &columns, key).await,
                Err(e) => Err(e),
            };
            drop_table(pool, &check).await?;
            let (back_rows, back_checksum) = compared?;
            if (back_rows, &back_checksum) != (rows, &checksum) {
                return Err(StoreError::Internal(format!(
                    "{object} read back {back_rows} rows (checksum {back_checksum}), the partition {part} has {rows} \
                     ({checksum}); nothing was dropped"
                )));
            }
            tables.push(ArchivedTable {
                table: parent.to_owned(),
                object: object.to_string(),
                rows,
                checksum,
                bytes,
                columns,
            });
        }
        let manifest = Manifest {
            format: FORMAT.to_owned(),
            format_version: 1,
            month: label.clone(),
            schema_version: self.schema_version().await?,
            created_at: Utc::now(),
            created_by: format!("callplane {}", env!("CARGO_PKG_VERSION")),
            tables,
        };
        let manifest_key = self.object(month, "manifest.json");
        let body = serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.objects.put(&manifest_key, body.into()).await?;

        // The commit point: the partitions go, and the month is archived, together.
        let (calls, transcripts) = (manifest.rows("calls"), manifest.rows("call_transcripts"));
        let bytes: u64 = manifest.tables.iter().map(|t| t.bytes).sum();
        let mut tx = pool.begin().await.map_err(db)?;
        for (parent, _) in TABLES {
            sqlx::query(&format!("DROP TABLE {}", partition_name(parent, month)))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        sqlx::query(
            "UPDATE partition_archives SET state = 'archived', manifest_key = $2, calls = $3, transcripts = $4, \
             bytes = $5, archived_at = now() WHERE month = $1",
        )
        .bind(month)
        .bind(manifest_key.to_string())
        .bind(calls)
        .bind(transcripts)
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        info!(month = %label, calls, transcripts, bytes, "month archived");
        Ok(MonthArchived {
            month: label,
            calls,
            transcripts,
            bytes,
            database_bytes,
            manifest: manifest_key.to_string(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Brings an archived month back: loaded from its Parquet files, checked against the
    /// manifest, then attached.
    pub async fn restore(
        &self,
        month: DateTime<Utc>,
        mut progress: impl FnMut(ArchiveProgress<'_>),
    ) -> StoreResult<RestoreReport> {
        let started = Instant::now();
        let month = month_start(month);
        let label = month.format("%Y-%m").to_string();
        let pool = self.pg.pool();
        let lock = self.lock().await?;
        let found: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT state, manifest_key FROM partition_archives WHERE month = $1")
                .bind(month)
                .fetch_optional(pool)
                .await
                .map_err(db)?;
        let manifest_key = match found {
            None => {
                return Err(refused(format!("{label} is not archived (its calls are in the database)")));
            }
            Some((state, _)) if state == "archiving" => {
                return Err(refused(format!(
                    "{label} was being archived when that stopped; finish it first (callplane partitions archive \
                     --before {})",
                    month.checked_add_months(Months::new(1)).unwrap_or(month).format("%Y-%m")
                )));
            }
            Some((_, None)) => return Err(StoreError::Internal(format!("{label} is archived without a manifest"))),
            Some((_, Some(key))) => key,
        };
        let manifest = self.manifest(&manifest_key).await?;
        if manifest.format != FORMAT || manifest.month != label {
            return Err(StoreError::Internal(format!("{manifest_key} is not the manifest of {label}")));
        }
        sqlx::query("UPDATE partition_archives SET state = 'restoring' WHERE month = $1")
            .bind(month)
            .execute(pool)
            .await
            .map_err(db)?;
        for (parent, key) in TABLES {
            let table = manifest
                .tables
                .iter()
                .find(|t| t.table == parent)
                .ok_or_else(|| StoreError::Internal(format!("the manifest of {label} has no {parent}")))?;
            let current = self.columns(parent).await?;
            if let Some(gone) = table.columns.iter().find(|c| !current.contains(c)) {
                return Err(StoreError::Internal(format!(
                    "{parent}.{} ({}) of the archive is not a column of today's {parent}; a newer callplane may \
                     restore it",
                    gone.name, gone.pg_type
                )));
            }
            let scratch = format!("{}_restoring", partition_name(parent, month));
            self.scratch_table(parent, &scratch, false).await?;
            let object = stored_key(&table.object)?;
            self.load(&object, &table.columns, &scratch, table.rows, &label, "restoring", &mut progress).await?;
            let (rows, checksum) = self.checksum(&scratch, &table.columns, key).await?;
            if (rows, &checksum) != (table.rows, &table.checksum) {
                drop_table(pool, &scratch).await?;
                return Err(StoreError::Internal(format!(
                    "{} gave {rows} rows (checksum {checksum}), its manifest says {} ({}); the month stays archived",
                    table.object, table.rows, table.checksum
                )));
            }
        }
        progress(ArchiveProgress { month: &label, stage: "attaching", rows: 0, of: 0 });
        let next = month.checked_add_months(Months::new(1)).ok_or_else(|| refused(label.clone()))?;
        let mut tx = pool.begin().await.map_err(db)?;
        for (parent, _) in TABLES {
            let part = partition_name(parent, month);
            sqlx::query(&format!("ALTER TABLE {part}_restoring RENAME TO {part}"))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            // The bounds are instants formatted by chrono, not input.
            sqlx::query(&format!(
                "ALTER TABLE {parent} ATTACH PARTITION {part} FOR VALUES FROM ('{}') TO ('{}')",
                month.to_rfc3339(),
                next.to_rfc3339()
            ))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        sqlx::query("DELETE FROM partition_archives WHERE month = $1")
            .bind(month)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        for (parent, _) in TABLES {
            sqlx::query(&format!("ANALYZE {}", partition_name(parent, month))).execute(pool).await.map_err(db)?;
        }
        release(lock).await;
        let (calls, transcripts) = (manifest.rows("calls"), manifest.rows("call_transcripts"));
        info!(month = %label, calls, transcripts, "month restored");
        Ok(RestoreReport {
            store: self.objects.describe().to_owned(),
            month: label,
            calls,
            transcripts,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The session lock that keeps archives and restores one at a time, on a connection of
    /// its own (closed, and the lock with it, when the run ends or its task dies).
    async fn lock(&self) -> StoreResult<PgConnection> {
        let mut conn = self.pg.direct().acquire().await.map_err(db)?.detach();
        let got: bool = sqlx::query_scalar(LOCK).fetch_one(&mut conn).await.map_err(db)?;
        if !got {
            return Err(refused("another archive or restore is running".into()));
        }
        Ok(conn)
    }

    /// Detaches `part` from `parent`, finishing a detach a crash interrupted; nothing to do
    /// when it is detached already. A partition that was never made is made empty and apart.
    async fn detach(&self, parent: &str, part: &str) -> StoreResult<()> {
        let pool = self.pg.pool();
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(part).fetch_one(pool).await.map_err(db)?;
        if !exists {
            return self.scratch_table(parent, part, false).await;
        }
        let pending: Option<bool> = sqlx::query_scalar(
            "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass($1) AND inhparent = to_regclass($2)",
        )
        .bind(part)
        .bind(parent)
        .fetch_optional(pool)
        .await
        .map_err(db)?;
        let how = match pending {
            None => return Ok(()),
            Some(true) => "FINALIZE",
            Some(false) => "CONCURRENTLY",
        };
        // Not allowed in a transaction block, so sent as a simple query.
        sqlx::raw_sql(&format!("ALTER TABLE {parent} DETACH PARTITION {part} {how}"))
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(db)
    }

    /// The columns a table's rows are archived with: every stored column, in order (generated
    /// ones are computed again on restore).
    async fn columns(&self, table: &str) -> StoreResult<Vec<ArchivedColumn>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
        )
        .bind(table)
        .fetch_all(self.pg.pool())
        .await
        .map_err(db)?;
        if rows.is_empty() {
            return Err(StoreError::Internal(format!("{table} has no columns")));
        }
        Ok(rows.into_iter().map(|(name, pg_type)| ArchivedColumn { name, pg_type }).collect())
    }

    /// The table's row count and checksum over `columns`.
    async fn checksum(&self, table: &str, columns: &[ArchivedColumn], key: &str) -> StoreResult<(i64, String)> {
        let row = columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ");
        sqlx::query_as(&format!(
            "SELECT count(*), coalesce(md5(string_agg(md5(ROW({row})::text), '' ORDER BY {key})), '') FROM {table}"
        ))
        .fetch_one(self.pg.pool())
        .await
        .map_err(db)
    }

    /// A table shaped like `parent` (columns, defaults, generated columns, checks), empty and
    /// standing alone; one of that name left by an interrupted run is replaced.
    async fn scratch_table(&self, parent: &str, name: &str, unlogged: bool) -> StoreResult<()> {
        let pool = self.pg.pool();
        drop_table(pool, name).await?;
        let kind = if unlogged { "UNLOGGED TABLE" } else { "TABLE" };
        sqlx::query(&format!(
            "CREATE {kind} {name} (LIKE {parent} INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING CONSTRAINTS)"
        ))
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(db)
    }

    /// Writes `part`'s rows, in key order, to one Parquet object; its size.
    #[allow(clippy::too_many_arguments)]
    async fn export(
        &self,
        part: &str,
        columns: &[ArchivedColumn],
        key: &str,
        object: &ObjectPath,
        total: i64,
        month: &str,
        stage: &str,
        progress: &mut impl FnMut(ArchiveProgress<'_>),
    ) -> StoreResult<u64> {
        let schema = arrow_schema(columns);
        let select = columns.iter().map(select_expr).collect::<Vec<_>>().join(", ");
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(parquet_error)?))
            .set_max_row_group_row_count(Some(ROW_GROUP))
            .set_created_by(format!("callplane {}", env!("CARGO_PKG_VERSION")))
            .build();
        let sink = BufWriter::new(Arc::clone(&self.objects.store), object.clone());
        let mut writer =
            AsyncArrowWriter::try_new(sink, Arc::clone(&schema), Some(properties)).map_err(parquet_error)?;
        let sql = format!("SELECT {select} FROM {part} ORDER BY {key}");
        let mut rows = sqlx::query(&sql).fetch(self.pg.pool());
        let mut batch = Batch::new(columns);
        let mut done = 0;
        while let Some(row) = rows.try_next().await.map_err(db)? {
            batch.append(&row)?;
            if batch.len == BATCH {
                writer.write(&batch.finish(&schema)?).await.map_err(parquet_error)?;
                done += BATCH as i64;
                progress(ArchiveProgress { month, stage, rows: done, of: total });
            }
        }
        drop(rows);
        if batch.len > 0 {
            done += batch.len as i64;
            writer.write(&batch.finish(&schema)?).await.map_err(parquet_error)?;
            progress(ArchiveProgress { month, stage, rows: done, of: total });
        }
        writer.close().await.map_err(parquet_error)?;
        let meta = self.objects.store.head(object).await.map_err(object_error)?;
        Ok(meta.size)
    }

    /// Loads a Parquet object written by `export` into `table`, a batch per statement; the
    /// rows loaded. Its columns must be `columns`, in order.
    #[allow(clippy::too_many_arguments)]
    async fn load(
        &self,
        object: &ObjectPath,
        columns: &[ArchivedColumn],
        table: &str,
        total: i64,
        month: &str,
        stage: &str,
        progress: &mut impl FnMut(ArchiveProgress<'_>),
    ) -> StoreResult<i64> {
        let meta = self.objects.store.head(object).await.map_err(object_error)?;
        let source = BufReader::with_capacity(Arc::clone(&self.objects.store), &meta, 1 << 20);
        let builder = ParquetRecordBatchStreamBuilder::new(source).await.map_err(parquet_error)?;
        let expected = arrow_schema(columns);
        let found: Vec<(&String, &DataType)> =
            builder.schema().fields().iter().map(|f| (f.name(), f.data_type())).collect();
        let wanted: Vec<(&String, &DataType)> = expected.fields().iter().map(|f| (f.name(), f.data_type())).collect();
        if found != wanted {
            return Err(StoreError::Internal(format!("{object} does not have the columns its manifest lists")));
        }
        let mut batches = builder.with_batch_size(BATCH).build().map_err(parquet_error)?;
        let names = columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ");
        let arrays = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}[]", i + 1, Kind::of(&c.pg_type).array_type()))
            .collect::<Vec<_>>()
            .join(", ");
        let aliases = (0..columns.len()).map(|i| format!("c{i}")).collect::<Vec<_>>().join(", ");
        let values = columns
            .iter()
            .enumerate()
            .map(|(i, c)| match Kind::of(&c.pg_type) {
                Kind::Text => format!("c{i}::{}", c.pg_type),
                _ => format!("c{i}"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let insert = format!("INSERT INTO {table} ({names}) SELECT {values} FROM unnest({arrays}) AS u({aliases})");
        let mut done = 0;
        while let Some(batch) = batches.try_next().await.map_err(parquet_error)? {
            let mut query = sqlx::query(&insert);
            for (i, c) in columns.iter().enumerate() {
                query = bind_column(query, batch.column(i), Kind::of(&c.pg_type), &c.name)?;
            }
            query.execute(self.pg.pool()).await.map_err(db)?;
            done += batch.num_rows() as i64;
            progress(ArchiveProgress { month, stage, rows: done, of: total });
        }
        Ok(done)
    }

    async fn manifest(&self, key: &str) -> StoreResult<Manifest> {
        let body =
            self.objects.get(&stored_key(key)?).await?.ok_or_else(|| {
                StoreError::Internal(format!("the manifest {key} is not in {}", self.objects.describe()))
            })?;
        serde_json::from_slice(&body).map_err(|e| StoreError::Internal(format!("{key}: {e}")))
    }

    async fn schema_version(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM _sqlx_migrations")
            .fetch_one(self.pg.pool())
            .await
            .map_err(db)
    }

    /// `<prefix>/archive/month=YYYY-MM/<name>`.
    fn object(&self, month: DateTime<Utc>, name: &str) -> ObjectPath {
        let parts = [
            PathPart::from("archive"),
            PathPart::from(format!("month={}", month.format("%Y-%m"))),
            PathPart::from(name),
        ];
        self.objects.prefix.parts().chain(parts).collect()
    }
}

/// `calls_2024_03` for `calls` and March 2024.
fn partition_name(parent: &str, month: DateTime<Utc>) -> String {
    format!("{parent}_{}", month.format("%Y_%m"))
}

async fn drop_table(pool: &sqlx::PgPool, name: &str) -> StoreResult<()> {
    sqlx::query(&format!("DROP TABLE IF EXISTS {name}")).execute(pool).await.map(|_| ()).map_err(db)
}

/// Closes the lock's connection, which releases the lock.
async fn release(lock: PgConnection) {
    let _ = lock.close().await;
}

fn parquet_error(e: parquet::errors::ParquetError) -> StoreError {
    match e {
        parquet::errors::ParquetError::External(inner) => StoreError::Internal(format!("object store: {inner}")),
        other => StoreError::Internal(format!("parquet: {other}")),
    }
}

/// How a PostgreSQL type is kept in Parquet: as itself where Arrow has the type, else as its
/// text (`jsonb`, `uuid`, `numeric`, ...), which PostgreSQL reads back exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    I16,
    I32,
    I64,
    F64,
    Bool,
    Timestamp,
}

impl Kind {
    fn of(pg_type: &str) -> Self {
        match pg_type {
            "smallint" => Self::I16,
            "integer" => Self::I32,
            "bigint" => Self::I64,
            "double precision" => Self::F64,
            "boolean" => Self::Bool,
            "timestamp with time zone" => Self::Timestamp,
            _ => Self::Text,
        }
    }

    fn data_type(self) -> DataType {
        match self {
            Self::Text => DataType::Utf8,
            Self::I16 => DataType::Int16,
            Self::I32 => DataType::Int32,
            Self::I64 => DataType::Int64,
            Self::F64 => DataType::Float64,
            Self::Bool => DataType::Boolean,
            Self::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }

    /// The array type a batch of this kind is bound as.
    fn array_type(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::I16 => "int2",
            Self::I32 => "int4",
            Self::I64 => "int8",
            Self::F64 => "float8",
            Self::Bool => "bool",
            Self::Timestamp => "timestamptz",
        }
    }
}

fn arrow_schema(columns: &[ArchivedColumn]) -> SchemaRef {
    Arc::new(Schema::new(
        columns.iter().map(|c| Field::new(&c.name, Kind::of(&c.pg_type).data_type(), true)).collect::<Vec<_>>(),
    ))
}

fn select_expr(c: &ArchivedColumn) -> String {
    match Kind::of(&c.pg_type) {
        Kind::Text => format!("{}::text", ident(&c.name)),
        _ => ident(&c.name),
    }
}

/// Rows being gathered into a record batch, a builder per column.
struct Batch {
    columns: Vec<Builder>,
    len: usize,
}

enum Builder {
    Text(StringBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl Batch {
    fn new(columns: &[ArchivedColumn]) -> Self {
        let columns = columns
            .iter()
            .map(|c| match Kind::of(&c.pg_type) {
                Kind::Text => Builder::Text(StringBuilder::new()),
                Kind::I16 => Builder::I16(Int16Builder::new()),
                Kind::I32 => Builder::I32(Int32Builder::new()),
                Kind::I64 => Builder::I64(Int64Builder::new()),
                Kind::F64 => Builder::F64(Float64Builder::new()),
                Kind::Bool => Builder::Bool(BooleanBuilder::new()),
                Kind::Timestamp => Builder::Timestamp(TimestampMicrosecondBuilder::new().with_timezone("UTC")),
            })
            .collect();
        Self { columns, len: 0 }
    }

    fn append(&mut self, row: &PgRow) -> StoreResult<()> {
        for (i, column) in self.columns.iter_mut().enumerate() {
            match column {
                Builder::Text(b) => b.append_option(row.try_get::<Option<&str>, _>(i).map_err(db)?),
                Builder::I16(b) => b.append_option(row.try_get::<Option<i16>, _>(i).map_err(db)?),
                Builder::I32(b) => b.append_option(row.try_get::<Option<i32>, _>(i).map_err(db)?),
                Builder::I64(b) => b.append_option(row.try_get::<Option<i64>, _>(i).map_err(db)?),
                Builder::F64(b) => b.append_option(row.try_get::<Option<f64>, _>(i).map_err(db)?),
                Builder::Bool(b) => b.append_option(row.try_get::<Option<bool>, _>(i).map_err(db)?),
                Builder::Timestamp(b) => b.append_option(
                    row.try_get::<Option<DateTime<Utc>>, _>(i).map_err(db)?.map(|t| t.timestamp_micros()),
                ),
            }
        }
        self.len += 1;
        Ok(())
    }

    /// The gathered rows as a record batch; the builders start empty again.
    fn finish(&mut self, schema: &SchemaRef) -> StoreResult<RecordBatch> {
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|column| -> ArrayRef {
                match column {
                    Builder::Text(b) => Arc::new(b.finish()),
                    Builder::I16(b) => Arc::new(b.finish()),
                    Builder::I32(b) => Arc::new(b.finish()),
                    Builder::I64(b) => Arc::new(b.finish()),
                    Builder::F64(b) => Arc::new(b.finish()),
                    Builder::Bool(b) => Arc::new(b.finish()),
                    Builder::Timestamp(b) => Arc::new(b.finish()),
                }
            })
            .collect();
        self.len = 0;
        RecordBatch::try_new(Arc::clone(schema), arrays).map_err(|e| StoreError::Internal(format!("arrow: {e}")))
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds one column of a batch as an array of its kind.
fn bind_column<'q>(query: Query<'q>, array: &ArrayRef, kind: Kind, name: &str) -> StoreResult<Query<'q>> {
    let wrong = || StoreError::Internal(format!("column {name} of the archive is not {kind:?}"));
    Ok(match kind {
        Kind::Text => {
            let values: Vec<Option<String>> =
                array.as_string_opt::<i32>().ok_or_else(wrong)?.iter().map(|v| v.map(str::to_owned)).collect();
            query.bind(values)
        }
        Kind::I16 => query.bind(array.as_primitive_opt::<Int16Type>().ok_or_else(wrong)?.iter().collect::<Vec<_>>()),
        Kind::I32 => query.bind(array.as_primitive_opt::<Int32Type>().ok_or_else(wrong)?.iter().collect::<Vec<_>>()),
        Kind::I64 => query.bind(array.as_primitive_opt::<Int64Type>().ok_or_else(wrong)?.iter().collect::<Vec<_>>()),
        Kind::F64 => query.bind(array.as_primitive_opt::<Float64Type>().ok_or_else(wrong)?.iter().collect::<Vec<_>>()),
        Kind::Bool => query.bind(array.as_boolean_opt().ok_or_else(wrong)?.iter().collect::<Vec<_>>()),
        Kind::Timestamp => {
            let values = array
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(wrong)?
                .iter()
                .map(|v| match v {
                    None => Ok(None),
                    Some(micros) => DateTime::from_timestamp_micros(micros).map(Some).ok_or_else(wrong),
                })
                .collect::<StoreResult<Vec<Option<DateTime<Utc>>>>>()?;
            query.bind(values)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partitions::partition_month;

    #[test]
    fn partitions_are_named_by_month() {
        let march = partition_month("calls_2024_03").unwrap_or_default();
        assert_eq!(march.to_rfc3339(), "2024-03-01T00:00:00+00:00");
        assert_eq!(partition_name("call_transcripts", march), "call_transcripts_2024_03");
        assert_eq!(partition_month("calls_unpartitioned"), None);
        assert_eq!(partition_month("call_transcripts_2024_03"), None);
    }

    #[test]
    fn types_without_an_arrow_twin_are_kept_as_text() {
        assert_eq!(Kind::of("jsonb"), Kind::Text);
        assert_eq!(Kind::of("uuid"), Kind::Text);
        assert_eq!(Kind::of("timestamp with time zone"), Kind::Timestamp);
        assert_eq!(Kind::of("double precision").data_type(), DataType::Float64);
    }
}
