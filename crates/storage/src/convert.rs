//! Converting an unpartitioned `calls` table to the monthly layout with the service running
//! (`callplane partitions convert --table calls`), the way online re-partitioning is done:
//!
//! 1. a partitioned copy of the table is made, `calls_converting`, its monthly partitions
//!    already named as they will be (`calls_2026_11`), with the source's indexes;
//! 2. a trigger on the source writes every insert, update and delete to the copy in the same
//!    transaction, so from then on every committed state of the two agrees;
//! 3. the rows already there are copied in batches of pages, in order, each batch committed
//!    with its checkpoint (a rerun resumes), filling the call-key registry on the way;
//! 4. each month is compared, count and checksum, source and copy in one statement (one
//!    snapshot, so writes arriving meanwhile cannot make them differ); a month that differs is
//!    copied again under a short lock;
//! 5. the names are swapped in one transaction whose lock is held for milliseconds, and the old
//!    table is kept, as `calls_unpartitioned`, until `--drop-old`.
//!
//! A legacy table of another shape (`--from`) is copied into the partitioned `calls` the same
//! way, its columns mapped to ours (same names by default), and kept in sync by the trigger
//! until `--drop-old`.

use crate::{PgStore, db};
use callplane_core::seams::{StoreError, StoreResult};
use chrono::{DateTime, Months, Utc};
use serde::Serialize;
use sqlx::{Executor, Row};
use std::collections::BTreeMap;
use std::time::Instant;

/// The table conversions exist for.
pub const CONVERTIBLE: &str = "calls";
const TARGET: &str = "calls_converting";
const OLD: &str = "calls_unpartitioned";
const TRIGGER: &str = "callplane_convert_sync";

/// What a conversion is asked to do.
#[derive(Clone, Debug, Default)]
pub struct ConvertRequest {
    /// A legacy table to copy from; `None`: `calls` itself, unpartitioned.
    pub from: Option<String>,
    /// Target column -> source column, where they differ.
    pub mapping: BTreeMap<String, String>,
    /// Rows per batch (about).
    pub batch_rows: i64,
    /// Drop the old table once the conversion is done.
    pub drop_old: bool,
    /// Months kept ahead (partitions).
    pub months_ahead: u32,
}

/// One month compared.
#[derive(Clone, Debug, Serialize)]
pub struct MonthCheck {
    pub month: String,
    pub rows: i64,
    pub checksum: String,
    /// Copied again because it differed at first.
    pub recopied: bool,
}

/// What a conversion did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConvertReport {
    pub table: String,
    pub source: String,
    /// `swapped` (in place, done), `synced` (from a legacy table, kept in sync until
    /// `--drop-old`), `dropped` (the old table is gone), or `already` (nothing to do).
    pub state: String,
    pub mapping: BTreeMap<String, String>,
    pub copied_rows: i64,
    pub resumed_from_page: i64,
    pub total_pages: i64,
    pub call_keys_added: i64,
    pub months: Vec<MonthCheck>,
    /// How long the swap held its exclusive lock, in milliseconds.
    pub swap_lock_ms: Option<f64>,
    pub dropped_old: bool,
    pub took_ms: u64,
}

/// Progress of a long step.
pub struct ConvertProgress<'a> {
    pub stage: &'a str,
    pub done: i64,
    pub of: i64,
    pub rows: i64,
}

/// A quoted identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What the database holds does not allow the operation asked for (a conversion, an archive or
/// a restore); the message says why and what to do.
pub(crate) fn refused(message: String) -> StoreError {
    StoreError::Internal(message)
}

/// A column of the target, with its type and where it comes from.
#[derive(Clone, Debug)]
struct Column {
    name: String,
    sql_type: String,
    /// The source column, if any (else the column's default).
    source: Option<String>,
}

impl Column {
    /// The source's value cast to the target's type, from a row alias (`s`, `NEW`).
    fn from(&self, row: &str) -> Option<String> {
        self.source.as_ref().map(|s| format!("({row}.{})::{}", ident(s), self.sql_type))
    }
}

struct Plan {
    source: String,
    target: String,
    columns: Vec<Column>,
    in_place: bool,
}

impl Plan {
    fn mapped(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| c.source.is_some())
    }

    fn target_list(&self) -> String {
        self.mapped().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ")
    }

    fn source_list(&self, row: &str) -> String {
        self.mapped().filter_map(|c| c.from(row)).collect::<Vec<_>>().join(", ")
    }

    /// `col = EXCLUDED.col` for every mapped column but the key, for an upsert.
    fn update_list(&self) -> String {
        self.mapped()
            .filter(|c| c.name != "id" && c.name != "created_at")
            .map(|c| format!("{0} = EXCLUDED.{0}", ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn column(&self, name: &str) -> StoreResult<&Column> {
        self.columns.iter().find(|c| c.name == name).ok_or_else(|| StoreError::Internal(format!("no column {name}")))
    }

    /// The source's expression for a target column.
    fn source_of(&self, name: &str, row: &str) -> StoreResult<String> {
        self.column(name)?.from(row).ok_or_else(|| refused(format!("calls.{name} must be mapped from a source column")))
    }
}

impl PgStore {
    async fn relkind(&self, table: &str) -> StoreResult<Option<String>> {
        sqlx::query_scalar(
            "SELECT relkind::text FROM pg_class WHERE relname = $1 AND relnamespace = current_schema()::regnamespace",
        )
        .bind(table)
        .fetch_optional(self.pool())
        .await
        .map_err(db)
    }

    /// A table's columns and their types, in order.
    async fn table_columns(&self, table: &str) -> StoreResult<Vec<(String, String, bool, bool)>> {
        let rows = sqlx::query(
            "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS sql_type, a.attnotnull AS not_null, \
                    a.atthasdef AS has_default \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace AND a.attnum > 0 \
               AND NOT a.attisdropped ORDER BY a.attnum",
        )
        .bind(table)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok((r.try_get("name")?, r.try_get("sql_type")?, r.try_get("not_null")?, r.try_get("has_default")?))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db)
    }

    /// Converts `calls` (see the module's note), resuming an interrupted run. One run at a
    /// time: a second is refused while the first holds its lock.
    pub async fn convert_calls(
        &self,
        request: &ConvertRequest,
        progress: impl Fn(ConvertProgress<'_>),
    ) -> StoreResult<ConvertReport> {
        match self.exclusively("callplane_partitions_convert", self.convert_calls_locked(request, progress)).await? {
            Some(converted) => converted,
            None => Err(refused("another `callplane partitions convert` is running against this database".into())),
        }
    }

    async fn convert_calls_locked(
        &self,
        request: &ConvertRequest,
        progress: impl Fn(ConvertProgress<'_>),
    ) -> StoreResult<ConvertReport> {
        let started = Instant::now();
        let mut report = ConvertReport { table: CONVERTIBLE.into(), ..Default::default() };
        let state: Option<(String, String)> =
            sqlx::query_as("SELECT state, source FROM partition_conversions WHERE table_name = $1")
                .bind(CONVERTIBLE)
                .fetch_optional(self.pool())
                .await
                .map_err(db)?;
        let calls_kind = self.relkind(CONVERTIBLE).await?;
        // Done before: only the old table may be left to drop.
        if let Some((done @ ("swapped" | "synced"), source)) = state.as_ref().map(|(s, src)| (s.as_str(), src)) {
            if request.from.as_deref().is_some_and(|f| f != source.as_str()) && done == "synced" {
                return Err(refused(format!("calls is being kept in sync from {source}; drop it first (--drop-old)")));
            }
            report.source = source.clone();
            report.state = if request.drop_old { "dropped".into() } else { "already".into() };
            if request.drop_old {
                self.drop_old(done, source).await?;
                report.dropped_old = true;
            }
            report.took_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
        if state.as_ref().is_some_and(|(s, _)| s == "dropped")
            && calls_kind.as_deref() == Some("p")
            && request.from.is_none()
        {
            report.source = state.map(|(_, source)| source).unwrap_or_default();
            report.state = "already".into();
            report.took_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
        let plan = self.plan(request, calls_kind.as_deref()).await?;
        report.source = plan.source.clone();
        report.mapping = plan.mapped().map(|c| (c.name.clone(), c.source.clone().unwrap_or_default())).collect();
        let resume: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT next_page, total_pages, copied_rows FROM partition_conversions WHERE table_name = $1 AND state = 'copying'",
        )
        .bind(CONVERTIBLE)
        .fetch_optional(self.pool())
        .await
        .map_err(db)?;
        let (next_page, copied) = match resume {
            Some((next, _, copied)) => {
                // Stopped part way: the trigger may not have gone in before it stopped.
                self.install_trigger(&plan).await?;
                (next, copied)
            }
            None => {
                self.prepare(&plan, request).await?;
                (0, 0)
            }
        };
        report.resumed_from_page = next_page;
        let (copied, total_pages, keys) =
            self.copy(&plan, request.batch_rows.max(100), next_page, copied, &progress).await?;
        report.copied_rows = copied;
        report.total_pages = total_pages;
        report.call_keys_added = keys;
        report.months = self.compare_months(&plan, &progress).await?;
        if plan.in_place {
            report.swap_lock_ms = Some(self.swap(&plan).await?);
            report.state = "swapped".into();
            sqlx::query("ANALYZE calls").execute(self.pool()).await.map_err(db)?;
        } else {
            sqlx::query("UPDATE partition_conversions SET state = 'synced', updated_at = now() WHERE table_name = $1")
                .bind(CONVERTIBLE)
                .execute(self.pool())
                .await
                .map_err(db)?;
            report.state = "synced".into();
        }
        if request.drop_old {
            self.drop_old(&report.state, &plan.source).await?;
            report.dropped_old = true;
        }
        report.took_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Where rows come from and go, and how each column is mapped.
    async fn plan(&self, request: &ConvertRequest, calls_kind: Option<&str>) -> StoreResult<Plan> {
        let (source, target, in_place) = match (&request.from, calls_kind) {
            (None, Some("r")) => (CONVERTIBLE.to_owned(), TARGET.to_owned(), true),
            (None, Some("p")) => {
                return Err(refused(
                    "calls is partitioned already; to copy a legacy table into it, name it with --from".into(),
                ));
            }
            (None, _) => return Err(refused("there is no calls table; run `callplane migrate`".into())),
            (Some(from), Some("p")) => (from.clone(), CONVERTIBLE.to_owned(), false),
            (Some(_), _) => {
                return Err(refused(
                    "--from copies into a partitioned calls table; run `callplane migrate` first".into(),
                ));
            }
        };
        if self.relkind(&source).await?.as_deref() != Some("r") {
            return Err(refused(format!("there is no table {source} to convert")));
        }
        let source_columns: Vec<String> = self.table_columns(&source).await?.into_iter().map(|c| c.0).collect();
        // The layout is the source's own when converting in place, else the partitioned calls'.
        let layout = self.table_columns(if in_place { &source } else { CONVERTIBLE }).await?;
        for (to, from) in &request.mapping {
            if !layout.iter().any(|c| &c.0 == to) {
                return Err(refused(format!("--map {to}={from}: calls has no column {to}")));
            }
            if !source_columns.contains(from) {
                return Err(refused(format!("--map {to}={from}: {source} has no column {from}")));
            }
        }
        let mut columns = Vec::new();
        let mut unmapped = Vec::new();
        for (name, sql_type, not_null, has_default) in layout {
            let source =
                request.mapping.get(&name).cloned().or_else(|| source_columns.contains(&name).then(|| name.clone()));
            if source.is_none() && not_null && !has_default {
                unmapped.push(name.clone());
            }
            columns.push(Column { name, sql_type, source });
        }
        if !unmapped.is_empty() {
            return Err(refused(format!(
                "{source} has no column for calls.{} (required): map one with --map {}=<column>",
                unmapped.join(", calls."),
                unmapped[0]
            )));
        }
        Ok(Plan { source, target, columns, in_place })
    }

    /// Makes the partitioned copy (in place), its partitions, and the trigger that keeps it
    /// current; records the conversion.
    async fn prepare(&self, plan: &Plan, request: &ConvertRequest) -> StoreResult<()> {
        let source = ident(&plan.source);
        // A trigger left by an earlier, interrupted run would write into the table about to be
        // made again, before it has partitions.
        sqlx::query(&format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {source}")).execute(self.pool()).await.map_err(db)?;
        let mut copied_indexes: Vec<String> = Vec::new();
        if plan.in_place {
            self.refuse_what_is_not_carried_over(&plan.source).await?;
            let indexes: Vec<(String, String)> = sqlx::query_as(
                "SELECT i.relname::text, pg_get_indexdef(i.oid) FROM pg_index x \
                 JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid \
                 WHERE t.relname = $1 AND t.relnamespace = current_schema()::regnamespace AND NOT x.indisprimary",
            )
            .bind(&plan.source)
            .fetch_all(self.pool())
            .await
            .map_err(db)?;
            let grants: Vec<(String, String)> = sqlx::query_as(
                "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(a.grantee::regrole::text) END, \
                        a.privilege_type FROM pg_class c, aclexplode(c.relacl) a \
                 WHERE c.oid = $1::regclass AND a.grantee <> c.relowner",
            )
            .bind(&source)
            .fetch_all(self.pool())
            .await
            .map_err(db)?;
            let mut tx = self.pool().begin().await.map_err(db)?;
            tx.execute(format!("DROP TABLE IF EXISTS {} CASCADE", ident(TARGET)).as_str()).await.map_err(db)?;
            tx.execute(
                format!(
                    "CREATE TABLE {} (LIKE {source} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED, \
                     PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at)",
                    ident(TARGET)
                )
                .as_str(),
            )
            .await
            .map_err(db)?;
            for (name, def) in indexes {
                // `CREATE [UNIQUE] INDEX name ON public.calls USING ...` for the copy, named apart.
                let Some((_, rest)) = def.split_once(" ON ") else { continue };
                let Some((_, using)) = rest.split_once(" USING ") else { continue };
                let unique = if def.starts_with("CREATE UNIQUE") { "UNIQUE " } else { "" };
                let sql = format!(
                    "CREATE {unique}INDEX {} ON {} USING {using}",
                    ident(&format!("{name}_converting")),
                    ident(TARGET)
                );
                tx.execute(sql.as_str()).await.map_err(db)?;
                copied_indexes.push(name);
            }
            // Whoever could read or write the old table can the new one.
            for (grantee, privilege) in grants {
                tx.execute(format!("GRANT {privilege} ON {} TO {grantee}", ident(TARGET)).as_str())
                    .await
                    .map_err(db)?;
            }
            tx.commit().await.map_err(db)?;
        }
        // Partitions for every month the source holds, every month the pipeline still accepts
        // events for, and the months ahead.
        let created_at = plan.source_of("created_at", "s")?;
        let (lo, hi): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
            sqlx::query_as(&format!("SELECT min({created_at}), max({created_at}) FROM {source} s"))
                .fetch_one(self.pool())
                .await
                .map_err(db)?;
        let now = Utc::now();
        let first = lo.unwrap_or(now).min(now.checked_sub_months(Months::new(14)).unwrap_or(now));
        let last = hi.unwrap_or(now).max(now.checked_add_months(Months::new(request.months_ahead)).unwrap_or(now));
        let mut month = first;
        while month <= last + chrono::Duration::days(31) {
            sqlx::query("SELECT callplane_ensure_month($1)").bind(month).execute(self.pool()).await.map_err(db)?;
            let Some(next) = month.checked_add_months(Months::new(1)) else { break };
            month = next;
        }
        // Recorded before the trigger goes in: a run stopped after this resumes, and puts the
        // trigger in again.
        sqlx::query(
            "INSERT INTO partition_conversions (table_name, source, mapping, state, indexes) \
             VALUES ($1, $2, $3, 'copying', $4) \
             ON CONFLICT (table_name) DO UPDATE SET source = $2, mapping = $3, state = 'copying', next_page = 0, \
             copied_rows = 0, indexes = $4, started_at = now(), updated_at = now()",
        )
        .bind(CONVERTIBLE)
        .bind(&plan.source)
        .bind(serde_json::json!(plan.mapped().map(|c| (c.name.clone(), c.source.clone())).collect::<BTreeMap<_, _>>()))
        .bind(serde_json::json!(copied_indexes))
        .execute(self.pool())
        .await
        .map_err(db)?;
        self.install_trigger(plan).await
    }

    /// Refuses a source whose triggers, row security, publications or foreign keys the
    /// conversion would not carry over.
    async fn refuse_what_is_not_carried_over(&self, source: &str) -> StoreResult<()> {
        let (triggers, rls, publications, references): (i64, bool, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal AND tgname <> $2), \
                    c.relrowsecurity, \
                    (SELECT count(*) FROM pg_publication_rel WHERE prrelid = c.oid), \
                    (SELECT count(*) FROM pg_constraint WHERE confrelid = c.oid OR (conrelid = c.oid AND contype = 'f')) \
             FROM pg_class c WHERE c.oid = $1::regclass",
        )
        .bind(ident(source))
        .bind(TRIGGER)
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        let mut what = Vec::new();
        if triggers > 0 {
            what.push(format!("{triggers} triggers"));
        }
        if rls {
            what.push("row-level security".to_owned());
        }
        if publications > 0 {
            what.push(format!("{publications} publications (logical replication)"));
        }
        if references > 0 {
            what.push(format!("{references} foreign keys"));
        }
        if !what.is_empty() {
            return Err(refused(format!(
                "{source} has {}, which the conversion does not carry over: move them off first",
                what.join(", ")
            )));
        }
        Ok(())
    }

    /// The trigger writing each change of the source to the target, and its call key, in the
    /// same transaction.
    async fn install_trigger(&self, plan: &Plan) -> StoreResult<()> {
        let target = ident(&plan.target);
        let updates = plan.update_list();
        let (new_id, new_at) = (plan.source_of("id", "NEW")?, plan.source_of("created_at", "NEW")?);
        let (old_id, old_at) = (plan.source_of("id", "OLD")?, plan.source_of("created_at", "OLD")?);
        let new_org = plan.source_of("organization_id", "NEW")?;
        let function = format!(
            "CREATE OR REPLACE FUNCTION {TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF TG_OP = 'DELETE' OR ({old_id}, {old_at}) IS DISTINCT FROM ({new_id}, {new_at}) THEN
            DELETE FROM {target} WHERE id = {old_id} AND created_at = {old_at};
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO {target} ({cols}) VALUES ({vals})
            ON CONFLICT (id, created_at) DO UPDATE SET {updates};
        INSERT INTO call_keys (vapi_call_id, organization_id, created_at) VALUES ({new_id}, {new_org}, {new_at})
            ON CONFLICT (vapi_call_id) DO NOTHING;
    END IF;
    RETURN NULL;
END $f$",
            cols = plan.target_list(),
            vals = plan.source_list("NEW"),
        );
        let mut tx = self.pool().begin().await.map_err(db)?;
        tx.execute(function.as_str()).await.map_err(db)?;
        tx.execute(format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {}", ident(&plan.source)).as_str())
            .await
            .map_err(db)?;
        tx.execute(
            format!(
                "CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {TRIGGER}()",
                ident(&plan.source)
            )
            .as_str(),
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// Copies the source's pages from `next_page` in batches, each committed with its
    /// checkpoint. Rows written since the trigger went in reach the target through it; a row
    /// copied here that the trigger wrote first is left as the trigger wrote it.
    async fn copy(
        &self,
        plan: &Plan,
        batch_rows: i64,
        mut next_page: i64,
        mut copied: i64,
        progress: &impl Fn(ConvertProgress<'_>),
    ) -> StoreResult<(i64, i64, i64)> {
        let source = ident(&plan.source);
        let (pages, tuples): (i64, f64) = sqlx::query_as(
            "SELECT (pg_relation_size($1::regclass) / current_setting('block_size')::bigint), \
                    GREATEST(reltuples, 0)::float8 FROM pg_class WHERE oid = $1::regclass",
        )
        .bind(&source)
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        let per_page = if pages > 0 && tuples > 0.0 { (tuples / pages as f64).max(1.0) } else { 50.0 };
        let step = ((batch_rows as f64 / per_page).ceil() as i64).max(1);
        sqlx::query("UPDATE partition_conversions SET total_pages = $2 WHERE table_name = $1")
            .bind(CONVERTIBLE)
            .bind(pages)
            .execute(self.pool())
            .await
            .map_err(db)?;
        let insert = format!(
            "INSERT INTO {} ({}) SELECT {} FROM {source} s WHERE s.ctid >= $1::tid AND s.ctid < $2::tid \
             ON CONFLICT (id, created_at) DO NOTHING",
            ident(&plan.target),
            plan.target_list(),
            plan.source_list("s")
        );
        let keys = format!(
            "INSERT INTO call_keys (vapi_call_id, organization_id, created_at) \
             SELECT {}, {}, {} FROM {source} s WHERE s.ctid >= $1::tid AND s.ctid < $2::tid \
             ON CONFLICT (vapi_call_id) DO NOTHING",
            plan.source_of("id", "s")?,
            plan.source_of("organization_id", "s")?,
            plan.source_of("created_at", "s")?
        );
        let mut keys_added = 0;
        while next_page < pages {
            let end = (next_page + step).min(pages);
            let (lo, hi) = (format!("({next_page},0)"), format!("({end},0)"));
            let mut tx = self.pool().begin().await.map_err(db)?;
            let n = sqlx::query(&insert).bind(&lo).bind(&hi).execute(&mut *tx).await.map_err(db)?.rows_affected();
            keys_added += sqlx::query(&keys).bind(&lo).bind(&hi).execute(&mut *tx).await.map_err(db)?.rows_affected();
            copied += n as i64;
            sqlx::query(
                "UPDATE partition_conversions SET next_page = $2, copied_rows = $3, updated_at = now() WHERE table_name = $1",
            )
            .bind(CONVERTIBLE)
            .bind(end)
            .bind(copied)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            next_page = end;
            progress(ConvertProgress { stage: "copying", done: next_page, of: pages, rows: copied });
        }
        Ok((copied, pages, keys_added as i64))
    }

    /// Compares every month, source and target, in one statement each; a month that differs is
    /// copied again with the source's writes held back, then compared again.
    async fn compare_months(
        &self,
        plan: &Plan,
        progress: &impl Fn(ConvertProgress<'_>),
    ) -> StoreResult<Vec<MonthCheck>> {
        let source = ident(&plan.source);
        let target = ident(&plan.target);
        let created_at = plan.source_of("created_at", "s")?;
        // In place, the months of both sides (a month only the copy holds must be found too);
        // from a legacy table, the legacy table's months (calls holds the service's own as well).
        let target_months = if plan.in_place {
            format!(
                "UNION SELECT date_trunc('month', t.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' FROM {target} t"
            )
        } else {
            String::new()
        };
        let months: Vec<DateTime<Utc>> = sqlx::query_scalar(&format!(
            "SELECT m FROM (SELECT date_trunc('month', {created_at} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS m \
             FROM {source} s {target_months}) months GROUP BY m ORDER BY m"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        let row_of = |alias: &str, mapped: bool| -> String {
            let values: Vec<String> = plan
                .mapped()
                .map(|c| if mapped { c.from(alias).unwrap_or_default() } else { format!("{alias}.{}", ident(&c.name)) })
                .collect();
            format!("md5(ROW({})::text)", values.join(", "))
        };
        let (id_s, id_t) = (plan.source_of("id", "s")?, "t.id".to_owned());
        // From a legacy table, calls holds the service's own calls too: only the rows with the
        // legacy table's keys are compared.
        let only_copied = if plan.in_place {
            String::new()
        } else {
            format!("AND EXISTS (SELECT 1 FROM {source} s WHERE {id_s} = t.id AND {created_at} = t.created_at)")
        };
        let compare = format!(
            "SELECT (SELECT count(*) FROM {source} s WHERE {created_at} >= $1 AND {created_at} < $2), \
                    (SELECT count(*) FROM {target} t WHERE t.created_at >= $1 AND t.created_at < $2 {only_copied}), \
                    (SELECT coalesce(md5(string_agg({}, '' ORDER BY {id_s}, {created_at})), '') FROM {source} s \
                     WHERE {created_at} >= $1 AND {created_at} < $2), \
                    (SELECT coalesce(md5(string_agg({}, '' ORDER BY {id_t}, t.created_at)), '') FROM {target} t \
                     WHERE t.created_at >= $1 AND t.created_at < $2 {only_copied})",
            row_of("s", true),
            row_of("t", false),
        );
        let mut checks = Vec::new();
        for (i, month) in months.iter().enumerate() {
            let next = month.checked_add_months(Months::new(1)).unwrap_or(*month);
            let same = async || -> StoreResult<(bool, i64, String)> {
                let (a, b, x, y): (i64, i64, String, String) =
                    sqlx::query_as(&compare).bind(month).bind(next).fetch_one(self.pool()).await.map_err(db)?;
                Ok((a == b && x == y, a, x))
            };
            let (mut ok, mut rows, mut checksum) = same().await?;
            let recopied = !ok;
            if !ok {
                self.recopy_month(plan, *month, next).await?;
                (ok, rows, checksum) = same().await?;
                if !ok {
                    return Err(StoreError::Internal(format!(
                        "month {} of {} still differs from its copy after copying it again",
                        month.format("%Y-%m"),
                        plan.source
                    )));
                }
            }
            checks.push(MonthCheck { month: month.format("%Y-%m").to_string(), rows, checksum, recopied });
            progress(ConvertProgress { stage: "comparing months", done: i as i64 + 1, of: months.len() as i64, rows });
        }
        Ok(checks)
    }

    /// Copies a month again, the source's writes held back meanwhile (`SHARE` lock: reads go
    /// on; given up after a second, and tried again, so writers never queue long behind it). In
    /// place the copy's month is replaced; from a legacy table its rows are written over, and
    /// nothing else of calls is touched.
    async fn recopy_month(&self, plan: &Plan, month: DateTime<Utc>, next: DateTime<Utc>) -> StoreResult<()> {
        let (source, target) = (ident(&plan.source), ident(&plan.target));
        let created_at = plan.source_of("created_at", "s")?;
        let updates = plan.update_list();
        {
            let (mut tx, _) = self.locked(&plan.source, "SHARE").await?;
            if plan.in_place {
                sqlx::query(&format!("DELETE FROM {target} WHERE created_at >= $1 AND created_at < $2"))
                    .bind(month)
                    .bind(next)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
            }
            sqlx::query(&format!(
                "INSERT INTO {target} ({}) SELECT {} FROM {source} s WHERE {created_at} >= $1 AND {created_at} < $2 \
                 ON CONFLICT (id, created_at) DO UPDATE SET {updates}",
                plan.target_list(),
                plan.source_list("s")
            ))
            .bind(month)
            .bind(next)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)
        }
    }

    /// A transaction holding `table` in `mode`, waiting at most a second for the lock at a time
    /// (so writers never queue long behind the request), tried up to ten times; and when the
    /// lock was got.
    async fn locked(&self, table: &str, mode: &str) -> StoreResult<(sqlx::Transaction<'_, sqlx::Postgres>, Instant)> {
        let mut last = None;
        for attempt in 0..10u64 {
            let mut tx = self.pool().begin().await.map_err(db)?;
            tx.execute("SET LOCAL lock_timeout = '1s'").await.map_err(db)?;
            match tx.execute(format!("LOCK TABLE {} IN {mode} MODE", ident(table)).as_str()).await {
                Ok(_) => return Ok((tx, Instant::now())),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(200 * (attempt + 1))).await;
        }
        Err(last.map(db).unwrap_or_else(|| StoreError::Internal(format!("{table} never gave its lock"))))
    }

    /// Swaps the names in one short transaction; returns how long it held the lock (ms). Waits
    /// at most a second for the lock, and tries again, so it never stalls writers for long.
    async fn swap(&self, plan: &Plan) -> StoreResult<f64> {
        // The indexes copied when the conversion began (one made on the old table since then
        // stays with it).
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT jsonb_array_elements_text(indexes) FROM partition_conversions WHERE table_name = $1",
        )
        .bind(CONVERTIBLE)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        let pkey: String = sqlx::query_scalar(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'p'",
        )
        .bind(ident(&plan.source))
        .fetch_optional(self.pool())
        .await
        .map_err(db)?
        .ok_or_else(|| refused(format!("{} has no primary key", plan.source)))?;
        {
            let (mut tx, locked) = self.locked(&plan.source, "ACCESS EXCLUSIVE").await?;
            let mut ddl = vec![
                format!("DROP TRIGGER {TRIGGER} ON {}", ident(&plan.source)),
                format!("ALTER TABLE {} RENAME TO {}", ident(CONVERTIBLE), ident(OLD)),
                format!(
                    "ALTER TABLE {} RENAME CONSTRAINT {} TO {}",
                    ident(OLD),
                    ident(&pkey),
                    ident(&format!("{OLD}_pkey"))
                ),
            ];
            for name in &indexes {
                ddl.push(format!("ALTER INDEX {} RENAME TO {}", ident(name), ident(&format!("{name}_unpartitioned"))));
            }
            ddl.push(format!("ALTER TABLE {} RENAME TO {}", ident(TARGET), ident(CONVERTIBLE)));
            ddl.push(format!(
                "ALTER TABLE {} RENAME CONSTRAINT {} TO calls_pkey",
                ident(CONVERTIBLE),
                ident(&format!("{TARGET}_pkey"))
            ));
            for name in &indexes {
                ddl.push(format!("ALTER INDEX {} RENAME TO {}", ident(&format!("{name}_converting")), ident(name)));
            }
            for statement in ddl {
                tx.execute(statement.as_str()).await.map_err(db)?;
            }
            let held_ms = locked.elapsed().as_secs_f64() * 1000.0;
            sqlx::query(
                "UPDATE partition_conversions SET state = 'swapped', swapped_at = now(), swap_lock_ms = $2, \
                 updated_at = now() WHERE table_name = $1",
            )
            .bind(CONVERTIBLE)
            .bind(held_ms)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(locked.elapsed().as_secs_f64() * 1000.0)
        }
    }

    /// Drops what a finished conversion kept: the old unpartitioned table, or the legacy table's
    /// trigger (its rows are copied; the table itself is the operator's).
    async fn drop_old(&self, state: &str, source: &str) -> StoreResult<()> {
        let mut tx = self.pool().begin().await.map_err(db)?;
        if state == "swapped" {
            tx.execute(format!("DROP TABLE IF EXISTS {}", ident(OLD)).as_str()).await.map_err(db)?;
        } else {
            tx.execute(format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {}", ident(source)).as_str()).await.map_err(db)?;
        }
        tx.execute(format!("DROP FUNCTION IF EXISTS {TRIGGER}()").as_str()).await.map_err(db)?;
        sqlx::query("UPDATE partition_conversions SET state = 'dropped', updated_at = now() WHERE table_name = $1")
            .bind(CONVERTIBLE)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }
}
