//! `dashboard`: latency of the dashboard's call list on a loaded database, against the same
//! query on an unpartitioned copy of the calls.
//!
//! For a sample of organizations (from a bulk load) it times `GET /v1/calls` (the first page,
//! newest first) and `GET /v1/calls?status=ended` through the API, then the equivalent SQL
//! straight on `calls` and on `calls_flat`, a plain-table copy with the same
//! `(organization_id, created_at DESC, id DESC)` index. The API walks the partitions a month at
//! a time; the flat table answers in one index scan. Both use the API's default window (the
//! last 366 days) and page size (50, fetching 51 to know whether there is a next page).
//!
//! When the server has transcript search on, it also times `GET /v1/search` (a first page of
//! 20, over the widest window, 366 days) for the same organizations and a few queries, and the
//! search's own SQL (`callplane_storage::SEARCH_SQL`) straight on the database.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::client::Server;
use crate::stats::{LatencySummary, Recorder};

/// The columns the API reads (`CALL_COLUMNS` in callplane-storage).
const CALL_COLUMNS: &str = "id, organization_id, created_at, call_type, status, ended_reason, started_at, ended_at, \
    duration_seconds, cost, costs, summary, analysis, recording_url, assistant_id, phone_number_id, customer_number, \
    billable_seconds, reported_at, last_event_at";

#[derive(Clone, Debug)]
pub struct DashboardConfig {
    pub database_url: String,
    /// Organizations sampled (each gets an API key).
    pub orgs: usize,
    /// Requests per query and side.
    pub requests: usize,
    pub concurrency: usize,
    /// Only organizations whose name starts with this (a bulk load's prefix).
    pub org_prefix: String,
    /// Rebuild `calls_flat` even if it exists with as many rows as `calls`.
    pub rebuild_flat: bool,
    pub quiet: bool,
}

/// The figures of one query.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct QueryFigures {
    pub api: LatencySummary,
    pub sql_partitioned: LatencySummary,
    pub sql_flat: LatencySummary,
    /// Mean calls per page through the API (to show the pages were full).
    pub mean_page_size: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DashboardSummary {
    pub stored_calls: i64,
    pub orgs_sampled: usize,
    pub flat_build_seconds: f64,
    pub first_page: QueryFigures,
    pub filtered_page: QueryFigures,
    /// `GET /v1/search`, when the server has search on.
    pub search: Option<SearchFigures>,
    pub errors: u64,
}

/// Transcript search: the API, and the same SQL straight on the database.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SearchFigures {
    pub transcripts: i64,
    pub api: LatencySummary,
    pub sql: LatencySummary,
    /// Mean hits per page through the API (20 at most).
    pub mean_hits: f64,
    pub queries: Vec<String>,
}

/// The search's SQL (`SEARCH_SQL` in callplane-storage; a test keeps them equal): `$1`
/// organization, `$2` query, `[$3, $4)` window, `$5` limit, `$6`-`$8` the cursor or NULLs.
const SEARCH_SQL: &str = "\
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

/// What the search benchmark asks, in turn: a rare word, a common phrase, a phrase in quotes,
/// an exclusion (the bulk loader's conversations are built from a small bank of lines).
const SEARCH_QUERIES: &[&str] = &["warranty", "water heater", "\"kitchen sink\"", "invoice -appointment"];

/// `dashboard --prepare-only`: builds `calls_flat` (unless it is up to date) and nothing else,
/// so that a profiled run of [`run`] samples the requests only. Returns the seconds it took.
pub async fn prepare(config: &DashboardConfig) -> Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&config.database_url)
        .await
        .context("connecting to Postgres")?;
    let (_, seconds) = ensure_flat(&pool, config).await?;
    pool.close().await;
    Ok(seconds)
}

pub async fn run(server: Server, config: DashboardConfig) -> Result<DashboardSummary> {
    let pool = PgPoolOptions::new()
        .max_connections(config.concurrency.max(1) as u32 + 1)
        .connect(&config.database_url)
        .await
        .context("connecting to Postgres")?;
    let (stored_calls, flat_build_seconds) = ensure_flat(&pool, &config).await?;
    let orgs = sample_orgs(&pool, &config).await?;
    let mut keys = Vec::with_capacity(orgs.len());
    for org in &orgs {
        keys.push((*org, server.create_api_key(&org.to_string()).await?));
    }

    let mut errors = 0;
    let mut figures = Vec::new();
    for status in [None, Some("ended")] {
        let (api, mean_page_size, failed) = time_api(&server, &keys, status, &config).await;
        errors += failed;
        let sql_partitioned = time_sql(&pool, "calls", &orgs, status, &config).await?;
        let sql_flat = time_sql(&pool, "calls_flat", &orgs, status, &config).await?;
        if !config.quiet {
            let what = if status.is_some() { "?status=ended" } else { "first page  " };
            eprintln!("loadgen: GET /v1/calls {what} API         {}", api.line());
            eprintln!("loadgen:                          SQL on calls {}", sql_partitioned.line());
            eprintln!("loadgen:                          SQL on flat  {}", sql_flat.line());
        }
        figures.push(QueryFigures { api, sql_partitioned, sql_flat, mean_page_size });
    }
    let search = match time_search_api(&server, &keys, &config).await {
        Some((api, mean_hits, failed)) => {
            errors += failed;
            let sql = time_search_sql(&pool, &orgs, &config).await?;
            let transcripts: i64 = sqlx::query_scalar("SELECT count(*) FROM call_transcripts").fetch_one(&pool).await?;
            if !config.quiet {
                eprintln!("loadgen: GET /v1/search ({transcripts} transcripts) API {}", api.line());
                eprintln!("loadgen:                          SQL         {}", sql.line());
            }
            Some(SearchFigures {
                transcripts,
                api,
                sql,
                mean_hits,
                queries: SEARCH_QUERIES.iter().map(|q| q.to_string()).collect(),
            })
        }
        None => {
            if !config.quiet {
                eprintln!("loadgen: GET /v1/search is off on this server; not timed");
            }
            None
        }
    };
    pool.close().await;
    let mut figures = figures.into_iter();
    Ok(DashboardSummary {
        stored_calls,
        orgs_sampled: orgs.len(),
        flat_build_seconds,
        first_page: figures.next().unwrap_or_default(),
        filtered_page: figures.next().unwrap_or_default(),
        search,
        errors,
    })
}

/// A sample of the bulk loader's organizations (`config.orgs` of those named
/// `config.org_prefix`...), the same on every run over the same data.
async fn sample_orgs(pool: &PgPool, config: &DashboardConfig) -> Result<Vec<Uuid>> {
    let orgs: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM organizations WHERE starts_with(name, $1) ORDER BY md5(id::text) LIMIT $2")
            .bind(&config.org_prefix)
            .bind(config.orgs.max(1) as i64)
            .fetch_all(pool)
            .await?;
    if orgs.is_empty() {
        bail!("no organization's name starts with {:?}; run `load` first", config.org_prefix);
    }
    Ok(orgs)
}

/// `details`: `GET /v1/calls/{id}` for calls that have a transcript.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DetailsSummary {
    pub calls_sampled: usize,
    pub api: LatencySummary,
    /// Mean messages per transcript read (to show the transcripts were there).
    pub mean_messages: f64,
    pub errors: u64,
}

/// Times `GET /v1/calls/{id}` (the call and its whole transcript) for a sample of calls with a
/// transcript, of a sample of organizations, each with its organization's key.
pub async fn details(server: Server, config: DashboardConfig) -> Result<DetailsSummary> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&config.database_url)
        .await
        .context("connecting to Postgres")?;
    let orgs = sample_orgs(&pool, &config).await?;
    let calls: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT organization_id, call_id FROM call_transcripts WHERE organization_id = ANY($1) \
         ORDER BY md5(call_id) LIMIT $2",
    )
    .bind(&orgs)
    .bind(config.requests.max(1) as i64)
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    if calls.is_empty() {
        bail!(
            "no call of an organization whose name starts with {:?} has a transcript; run `load` first",
            config.org_prefix
        );
    }
    let mut keys = std::collections::HashMap::new();
    for org in &orgs {
        keys.insert(*org, server.create_api_key(&org.to_string()).await?);
    }
    let (api, mean_messages, errors) = time_gets(&server, &config, |i| {
        let (org, id) = &calls[i % calls.len()];
        Some((format!("{}/v1/calls/{id}", server.base), keys.get(org)?.clone()))
    })
    .await;
    if !config.quiet {
        eprintln!(
            "loadgen: GET /v1/calls/{{id}} ({} calls, {mean_messages:.1} messages each) {}",
            calls.len(),
            api.line()
        );
    }
    Ok(DetailsSummary { calls_sampled: calls.len(), api, mean_messages, errors })
}

/// Creates `calls_flat` (an unpartitioned copy of `calls` with the list index) unless it is
/// already there with every call. Returns the calls stored and how long building took (0 when
/// reused).
async fn ensure_flat(pool: &PgPool, config: &DashboardConfig) -> Result<(i64, f64)> {
    let stored_calls: i64 = sqlx::query_scalar("SELECT count(*) FROM call_keys").fetch_one(pool).await?;
    let existing: Option<i64> = sqlx::query_scalar(
        "SELECT CASE WHEN to_regclass('calls_flat') IS NULL THEN NULL ELSE (SELECT count(*) FROM calls_flat) END",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(None);
    if !config.rebuild_flat && existing == Some(stored_calls) {
        return Ok((stored_calls, 0.0));
    }
    if !config.quiet {
        eprintln!("loadgen: building calls_flat, an unpartitioned copy of {stored_calls} calls");
    }
    let started = Instant::now();
    for statement in [
        "DROP TABLE IF EXISTS calls_flat",
        "CREATE TABLE calls_flat AS SELECT * FROM calls",
        "CREATE INDEX calls_flat_org_created ON calls_flat (organization_id, created_at DESC, id DESC)",
        // Vacuumed like the bulk load's `calls`.
        "VACUUM (ANALYZE) calls_flat",
    ] {
        sqlx::query(statement).execute(pool).await.with_context(|| statement.to_owned())?;
    }
    Ok((stored_calls, started.elapsed().as_secs_f64()))
}

/// Requests sent first and not timed, so that caches and prepared statements are warm: enough
/// for each of the server's pooled connections (a dozen or more under this load, each taken in
/// turn) to have planned the statement past PostgreSQL's five custom plans and built its
/// generic plan, as a server that has run a while has. 50 left most of them cold.
fn warmup(requests: usize) -> usize {
    (requests / 2).clamp(5, 250)
}

/// Times `GET /v1/calls` (with `?status=`), each request with the next organization's key.
async fn time_api(
    server: &Server,
    keys: &[(Uuid, String)],
    status: Option<&str>,
    config: &DashboardConfig,
) -> (LatencySummary, f64, u64) {
    let query = status.map(|s| format!("?status={s}")).unwrap_or_default();
    let url = format!("{}/v1/calls{query}", server.base);
    time_gets(server, config, |i| Some((url.clone(), keys[i % keys.len()].1.clone()))).await
}

/// What [`time_gets`] reads of an answer: how many items its list holds (`data` for a page,
/// `messages` for a call). The items are checked to be JSON and skipped, not built into a
/// tree: the SQL baselines receive their rows without decoding a field, and building objects
/// on the client is not the server's time.
#[derive(Deserialize)]
struct Page {
    data: Option<Vec<serde::de::IgnoredAny>>,
    messages: Option<Vec<serde::de::IgnoredAny>>,
}

/// Times the GET requests `request(i)` names (URL and API key), after a warm-up, as many at
/// once as `config.concurrency`: latency, the mean page size (`data`'s length; for a call's
/// detail, its `messages`'), and how many failed.
async fn time_gets(
    server: &Server,
    config: &DashboardConfig,
    request: impl Fn(usize) -> Option<(String, String)>,
) -> (LatencySummary, f64, u64) {
    let recorder = Arc::new(Recorder::default());
    let warmup = warmup(config.requests);
    let results: Vec<Option<usize>> = futures::stream::iter(0..warmup + config.requests)
        .map(|i| {
            let (recorder, request) = (recorder.clone(), request(i));
            async move {
                let (url, key) = request?;
                let sent = Instant::now();
                let response = server.http().get(url).bearer_auth(key).send().await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                let page: Page = response.json().await.ok()?;
                if i >= warmup {
                    recorder.record(sent.elapsed());
                }
                page.data.or(page.messages).map(|items| items.len())
            }
        })
        .buffer_unordered(config.concurrency.max(1))
        .collect()
        .await;
    let pages: Vec<usize> = results.iter().flatten().copied().collect();
    let failed = (results.len() - pages.len()) as u64;
    let mean = pages.iter().sum::<usize>() as f64 / pages.len().max(1) as f64;
    (recorder.summary(), mean, failed)
}

/// Times the list query straight on `table`, with the API's default window.
async fn time_sql(
    pool: &PgPool,
    table: &str,
    orgs: &[Uuid],
    status: Option<&str>,
    config: &DashboardConfig,
) -> Result<LatencySummary> {
    let filter = if status.is_some() { " AND status = $4" } else { "" };
    let sql = format!(
        "SELECT {CALL_COLUMNS} FROM {table} WHERE organization_id = $1 AND created_at >= $2 AND created_at < $3{filter} \
         ORDER BY created_at DESC, id DESC LIMIT 51"
    );
    time_queries(config, |i| {
        let (sql, org) = (sql.clone(), orgs[i % orgs.len()]);
        async move {
            let to = Utc::now() + chrono::Duration::days(1);
            let from = to - chrono::Duration::days(366);
            let mut query = sqlx::query(&sql).bind(org).bind(from).bind(to);
            if let Some(status) = status {
                query = query.bind(status);
            }
            query.fetch_all(pool).await?;
            Ok(())
        }
    })
    .await
}

/// Times the queries `query(i)` runs, after a warm-up, as many at once as
/// `config.concurrency`; any that fails fails the measurement.
async fn time_queries<F, Q>(config: &DashboardConfig, query: F) -> Result<LatencySummary>
where
    F: Fn(usize) -> Q,
    Q: std::future::Future<Output = Result<()>>,
{
    let recorder = Arc::new(Recorder::default());
    let warmup = warmup(config.requests);
    let results: Vec<Result<()>> = futures::stream::iter(0..warmup + config.requests)
        .map(|i| {
            let (recorder, query) = (recorder.clone(), query(i));
            async move {
                let sent = Instant::now();
                query.await?;
                if i >= warmup {
                    recorder.record(sent.elapsed());
                }
                Ok(())
            }
        })
        .buffer_unordered(config.concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(recorder.summary())
}

/// The search window: the API's widest (366 days), ending tomorrow, over what was loaded.
fn search_window() -> (chrono::DateTime<Utc>, chrono::DateTime<Utc>) {
    let to = Utc::now() + chrono::Duration::days(1);
    (to - chrono::Duration::days(366), to)
}

/// Times `GET /v1/search` over the sampled organizations and [`SEARCH_QUERIES`]; `None` when
/// the server has search off (409). Returns the latencies, the mean hits and the failures.
async fn time_search_api(
    server: &Server,
    keys: &[(Uuid, String)],
    config: &DashboardConfig,
) -> Option<(LatencySummary, f64, u64)> {
    let (from, to) = search_window();
    let url = |i: usize| {
        let params = [
            ("q", SEARCH_QUERIES[i % SEARCH_QUERIES.len()].to_owned()),
            ("from", from.to_rfc3339()),
            ("to", to.to_rfc3339()),
        ];
        reqwest::Url::parse_with_params(&format!("{}/v1/search", server.base), &params).ok()
    };
    let probe = server.http().get(url(0)?).bearer_auth(&keys.first()?.1).send().await.ok()?;
    if probe.status() == reqwest::StatusCode::CONFLICT {
        return None;
    }
    let key = |i: usize| keys[(i / SEARCH_QUERIES.len()) % keys.len()].1.clone();
    Some(time_gets(server, config, |i| Some((url(i)?.to_string(), key(i)))).await)
}

/// Times the search's own SQL ([`SEARCH_SQL`], first page of 20) straight on
/// the database, with the same organizations, queries and window.
async fn time_search_sql(pool: &PgPool, orgs: &[Uuid], config: &DashboardConfig) -> Result<LatencySummary> {
    let (from, to) = search_window();
    time_queries(config, |i| {
        let org = orgs[(i / SEARCH_QUERIES.len()) % orgs.len()];
        async move {
            sqlx::query(SEARCH_SQL)
                .bind(org)
                .bind(SEARCH_QUERIES[i % SEARCH_QUERIES.len()])
                .bind(from)
                .bind(to)
                .bind(20_i64)
                .bind(None::<f32>)
                .bind(None::<chrono::DateTime<Utc>>)
                .bind(None::<&str>)
                .fetch_all(pool)
                .await?;
            Ok(())
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_search_sql_timed_raw_is_the_servers() {
        assert_eq!(super::SEARCH_SQL, callplane_storage::SEARCH_SQL);
    }
}
