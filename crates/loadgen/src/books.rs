//! Checking the books after a simulation: every simulated call recorded exactly once, in the
//! right organization, ended, billed what its duration says; one ledger row per call; each
//! organization's counter equal to the sum of its calls; nothing dead-lettered. A counter kept
//! in Redis (`backends.usage_counter = "redis"`) is out of the database's reach: it is checked
//! through `GET /v1/usage`, which reads it.
//!
//! The comparison ([`check`]) is pure; [`read_database`] and [`read_api`] gather what callplane
//! recorded, from Postgres and from `GET /v1/usage`.
//!
//! A run can be saved ([`RunRecord`], `--run-file`) and its books checked later
//! (`callplane-loadgen books`): a server that accepts events into a durable inbox and processes
//! them afterwards balances only once its inbox is drained, and the fault suite waits for that.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::client::Server;
use crate::simulate::Org;

/// At most this many problems are listed; the count covers all of them.
const PROBLEMS_LISTED: usize = 20;

/// A call the simulator completed, and what it must have cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpectedCall {
    pub call_id: String,
    pub org_id: Uuid,
    pub billable_seconds: i64,
}

/// Where callplane counts each organization's seconds: its `backends.usage_counter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CounterStore {
    /// `organizations.seconds_used`, read with the other rows.
    #[default]
    Postgres,
    /// Redis: the counter is read through `GET /v1/usage` only.
    Redis,
}

/// A row of `calls`.
#[derive(Clone, Debug, PartialEq)]
pub struct CallRow {
    pub call_id: String,
    pub org_id: Uuid,
    pub status: String,
    pub billable_seconds: Option<i64>,
}

/// A row of `call_keys` or of `usage_ledger` (keys carry no seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRow {
    pub call_id: String,
    pub org_id: Uuid,
    pub billable_seconds: i64,
}

/// What callplane recorded for the simulated organizations.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    pub calls: Vec<CallRow>,
    pub keys: Vec<KeyRow>,
    pub ledger: Vec<KeyRow>,
    /// `organizations.seconds_used`; `None` when callplane counts in Redis.
    pub counters: Option<HashMap<Uuid, i64>>,
    pub open_dead_letters: i64,
    /// Days whose `daily_usage` differs from the ledger summed by day (in the organization's
    /// billing time zone), described; empty when the server keeps no daily usage.
    pub daily_mismatches: Vec<String>,
}

/// An organization's usage as `GET /v1/usage` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiUsage {
    pub org_id: Uuid,
    pub seconds_used: i64,
    pub calls: i64,
}

/// The outcome of the check.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Books {
    pub expected_calls: usize,
    pub calls_found: usize,
    pub ledger_rows: usize,
    /// Simulated calls without a ledger row: their end-of-call report was lost or never
    /// processed (database checked only).
    pub unbilled_calls: usize,
    /// Simulated calls with more than one ledger row.
    pub double_billed_calls: usize,
    /// Seconds counted beyond the calls' sum, over every organization whose counter (or
    /// `GET /v1/usage`) says more than its calls add up to.
    pub over_counted_seconds: i64,
    pub expected_seconds: i64,
    pub ledger_seconds: i64,
    pub counter_seconds: i64,
    pub open_dead_letters: i64,
    /// Whether the rows were read from Postgres (otherwise only the API was compared).
    pub database_checked: bool,
    /// Organizations whose `GET /v1/usage` was compared (0 when not checked through the API).
    pub api_orgs_checked: usize,
    pub problem_count: usize,
    pub problems: Vec<String>,
}

impl Books {
    pub fn balanced(&self) -> bool {
        self.problem_count == 0
    }

    fn problem(&mut self, text: String) {
        self.problem_count += 1;
        if self.problems.len() < PROBLEMS_LISTED {
            self.problems.push(text);
        }
    }

    /// A one-line verdict for the console.
    pub fn line(&self) -> String {
        let verdict = if self.balanced() { "BALANCED" } else { "DO NOT BALANCE" };
        if !self.database_checked {
            return format!(
                "books {verdict} (API only, no database): {} organizations, {} calls, {} seconds, {} problems",
                self.api_orgs_checked, self.expected_calls, self.expected_seconds, self.problem_count
            );
        }
        format!(
            "books {verdict}: {}/{} calls, {} ledger rows, seconds expected {} / ledger {} / counters {}, \
             {} open dead letters, {} organizations checked through the API, {} problems",
            self.calls_found,
            self.expected_calls,
            self.ledger_rows,
            self.expected_seconds,
            self.ledger_seconds,
            self.counter_seconds,
            self.open_dead_letters,
            self.api_orgs_checked,
            self.problem_count
        )
    }
}

/// Compares what was simulated with what callplane recorded. `orgs` are the organizations the
/// simulation created (each must have exactly its simulated calls, no more). Without database
/// rows (`recorded` is `None`) only the API's figures are compared.
pub fn check(expected: &[ExpectedCall], orgs: &[Uuid], recorded: Option<&Recorded>, api: Option<&[ApiUsage]>) -> Books {
    let mut books = Books {
        expected_calls: expected.len(),
        expected_seconds: expected.iter().map(|c| c.billable_seconds).sum(),
        ..Books::default()
    };
    let mut by_id: HashMap<&str, &ExpectedCall> = HashMap::with_capacity(expected.len());
    for call in expected {
        if by_id.insert(call.call_id.as_str(), call).is_some() {
            books.problem(format!("call {} was simulated twice", call.call_id));
        }
    }
    // Seconds and calls per organization, as simulated.
    let mut per_org: HashMap<Uuid, (i64, i64)> = orgs.iter().map(|o| (*o, (0, 0))).collect();
    for call in expected {
        let entry = per_org.entry(call.org_id).or_default();
        entry.0 += call.billable_seconds;
        entry.1 += 1;
    }
    if let Some(recorded) = recorded {
        check_rows(&mut books, expected, &by_id, &per_org, orgs, recorded);
    }

    // The API: GET /v1/usage agrees with the books.
    // Without counters from the database, the API's figures are the counters.
    if let Some(api) = api {
        books.api_orgs_checked = api.len();
        let api_is_counter = recorded.is_none_or(|r| r.counters.is_none());
        if api_is_counter {
            books.counter_seconds = api.iter().map(|u| u.seconds_used).sum();
        }
        for usage in api {
            let (seconds, calls) = per_org.get(&usage.org_id).copied().unwrap_or((0, 0));
            if api_is_counter {
                books.over_counted_seconds += (usage.seconds_used - seconds).max(0);
            }
            if usage.seconds_used != seconds || usage.calls != calls {
                books.problem(format!(
                    "GET /v1/usage for {} says {} seconds in {} calls; simulated {} seconds in {} calls",
                    usage.org_id, usage.seconds_used, usage.calls, seconds, calls
                ));
            }
        }
    }
    books
}

/// The database half of [`check`].
fn check_rows(
    books: &mut Books,
    expected: &[ExpectedCall],
    by_id: &HashMap<&str, &ExpectedCall>,
    per_org: &HashMap<Uuid, (i64, i64)>,
    orgs: &[Uuid],
    recorded: &Recorded,
) {
    books.database_checked = true;
    books.ledger_rows = recorded.ledger.len();
    books.ledger_seconds = recorded.ledger.iter().map(|r| r.billable_seconds).sum();
    books.open_dead_letters = recorded.open_dead_letters;

    // calls: exactly one row per simulated call, ended, in its organization, billed right.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for row in &recorded.calls {
        *seen.entry(row.call_id.as_str()).or_default() += 1;
        let Some(want) = by_id.get(row.call_id.as_str()) else {
            books.problem(format!("call {} was never simulated", row.call_id));
            continue;
        };
        if row.org_id != want.org_id {
            books.problem(format!("call {} is in organization {}, not {}", row.call_id, row.org_id, want.org_id));
        }
        if row.status != "ended" {
            books.problem(format!("call {} has status {:?}, not ended", row.call_id, row.status));
        }
        if row.billable_seconds != Some(want.billable_seconds) {
            books.problem(format!(
                "call {} bills {:?} seconds, not {}",
                row.call_id, row.billable_seconds, want.billable_seconds
            ));
        }
    }
    for call in expected {
        match seen.get(call.call_id.as_str()).copied().unwrap_or(0) {
            1 => books.calls_found += 1,
            0 => books.problem(format!("call {} is missing from calls", call.call_id)),
            n => books.problem(format!("call {} is in calls {n} times", call.call_id)),
        }
    }

    // call_keys and usage_ledger: one row each per simulated call.
    for (table, rows, compare_seconds) in
        [("call_keys", &recorded.keys, false), ("usage_ledger", &recorded.ledger, true)]
    {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for row in rows {
            *counts.entry(row.call_id.as_str()).or_default() += 1;
            let Some(want) = by_id.get(row.call_id.as_str()) else {
                books.problem(format!("{table} has call {} that was never simulated", row.call_id));
                continue;
            };
            if row.org_id != want.org_id {
                books.problem(format!("{table} puts call {} in organization {}", row.call_id, row.org_id));
            }
            if compare_seconds && row.billable_seconds != want.billable_seconds {
                books.problem(format!(
                    "{table} bills call {} {} seconds, not {}",
                    row.call_id, row.billable_seconds, want.billable_seconds
                ));
            }
        }
        for call in expected {
            let n = counts.get(call.call_id.as_str()).copied().unwrap_or(0);
            if n != 1 {
                books.problem(format!("{table} has {n} rows for call {}", call.call_id));
            }
            if compare_seconds {
                match n {
                    0 => books.unbilled_calls += 1,
                    1 => {}
                    _ => books.double_billed_calls += 1,
                }
            }
        }
    }

    // Counters: each organization's seconds_used is the sum of its calls.
    if let Some(counters) = &recorded.counters {
        books.counter_seconds = orgs.iter().map(|o| counters.get(o).copied().unwrap_or(0)).sum();
        let mut org_ids: Vec<&Uuid> = per_org.keys().collect();
        org_ids.sort();
        for org in org_ids {
            let (seconds, _) = per_org[org];
            let counter = counters.get(org).copied();
            books.over_counted_seconds += counter.map_or(0, |c| (c - seconds).max(0));
            if counter != Some(seconds) {
                books.problem(format!("organization {org} counts {counter:?} seconds, the calls add up to {seconds}"));
            }
        }
    }

    for mismatch in &recorded.daily_mismatches {
        books.problem(mismatch.clone());
    }
    if recorded.open_dead_letters != 0 {
        books.problem(format!("{} events were dead-lettered", recorded.open_dead_letters));
    }
}

/// Reads what callplane recorded for `orgs` from Postgres, the counters only when they are kept
/// there. Dead letters count if they belong to one of `orgs` or arrived since `since` (some have
/// no organization).
pub async fn read_database(
    pool: &PgPool,
    orgs: &[Uuid],
    since: DateTime<Utc>,
    counter: CounterStore,
) -> Result<Recorded> {
    let calls =
        sqlx::query("SELECT id, organization_id, status, billable_seconds FROM calls WHERE organization_id = ANY($1)")
            .bind(orgs)
            .fetch_all(pool)
            .await
            .context("reading calls")?
            .iter()
            .map(|r| {
                Ok(CallRow {
                    call_id: r.try_get("id")?,
                    org_id: r.try_get("organization_id")?,
                    status: r.try_get("status")?,
                    billable_seconds: r.try_get("billable_seconds")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;

    let keys = sqlx::query(
        "SELECT vapi_call_id AS call_id, organization_id, 0::bigint AS billable_seconds FROM call_keys \
         WHERE organization_id = ANY($1)",
    )
    .bind(orgs)
    .fetch_all(pool)
    .await
    .context("reading call_keys")?;
    let ledger = sqlx::query(
        "SELECT call_id, organization_id, billable_seconds FROM usage_ledger WHERE organization_id = ANY($1)",
    )
    .bind(orgs)
    .fetch_all(pool)
    .await
    .context("reading usage_ledger")?;
    let key_rows = |rows: Vec<sqlx::postgres::PgRow>| {
        rows.iter()
            .map(|r| {
                Ok(KeyRow {
                    call_id: r.try_get("call_id")?,
                    org_id: r.try_get("organization_id")?,
                    billable_seconds: r.try_get("billable_seconds")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
    };

    let counters = match counter {
        CounterStore::Postgres => Some(
            sqlx::query("SELECT id, seconds_used FROM organizations WHERE id = ANY($1)")
                .bind(orgs)
                .fetch_all(pool)
                .await
                .context("reading organizations")?
                .iter()
                .map(|r| Ok((r.try_get("id")?, r.try_get("seconds_used")?)))
                .collect::<Result<HashMap<Uuid, i64>, sqlx::Error>>()?,
        ),
        CounterStore::Redis => None,
    };

    let open_dead_letters: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL \
         AND (organization_id = ANY($1) OR received_at >= $2)",
    )
    .bind(orgs)
    .bind(since)
    .fetch_one(pool)
    .await
    .context("reading dead_letters")?;

    let daily_mismatches = read_daily_mismatches(pool, orgs).await?;
    Ok(Recorded {
        calls,
        keys: key_rows(keys)?,
        ledger: key_rows(ledger)?,
        counters,
        open_dead_letters,
        daily_mismatches,
    })
}

/// The days whose daily usage differs from the ledger (calls or billable seconds), compared in
/// the database; none when this server has no `daily_usage` (an older build).
async fn read_daily_mismatches(pool: &PgPool, orgs: &[Uuid]) -> Result<Vec<String>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('daily_usage') IS NOT NULL")
        .fetch_one(pool)
        .await
        .context("looking for daily_usage")?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "WITH ledger AS ( \
             SELECT l.organization_id, (l.call_started_at AT TIME ZONE o.billing_timezone)::date AS day, \
                    count(*)::bigint AS calls, sum(l.billable_seconds)::bigint AS billable \
             FROM usage_ledger l JOIN organizations o ON o.id = l.organization_id \
             WHERE l.organization_id = ANY($1) GROUP BY 1, 2), \
         daily AS ( \
             SELECT organization_id, day, sum(calls)::bigint AS calls, sum(billable_seconds)::bigint AS billable \
             FROM daily_usage WHERE organization_id = ANY($1) GROUP BY 1, 2) \
         SELECT organization_id, day::text AS day, ledger.calls AS ledger_calls, daily.calls AS daily_calls, \
                ledger.billable AS ledger_billable, daily.billable AS daily_billable \
         FROM ledger FULL JOIN daily USING (organization_id, day) \
         WHERE (ledger.calls, ledger.billable) IS DISTINCT FROM (daily.calls, daily.billable) \
         ORDER BY 1, 2 LIMIT 100",
    )
    .bind(orgs)
    .fetch_all(pool)
    .await
    .context("comparing daily_usage with usage_ledger")?;
    rows.iter()
        .map(|r| {
            let (org, day): (Uuid, String) = (r.try_get("organization_id")?, r.try_get("day")?);
            let figures = |calls: Option<i64>, billable: Option<i64>| {
                format!("{} calls, {} s", calls.unwrap_or(0), billable.unwrap_or(0))
            };
            Ok(format!(
                "daily usage of organization {org} on {day} says {}; the ledger {}",
                figures(r.try_get("daily_calls")?, r.try_get("daily_billable")?),
                figures(r.try_get("ledger_calls")?, r.try_get("ledger_billable")?)
            ))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(Into::into)
}

/// Reads `GET /v1/usage` for each organization, with its API key, a few at a time.
pub async fn read_api(server: &Server, orgs: &[(Uuid, String)]) -> Result<Vec<ApiUsage>> {
    use futures::StreamExt;
    let results: Vec<Result<ApiUsage>> = futures::stream::iter(orgs.iter().cloned())
        .map(|(org_id, key)| async move {
            let usage = server.usage(&key).await?;
            let number = |field: &str| usage.get(field).and_then(serde_json::Value::as_i64);
            match (number("seconds_used"), number("calls")) {
                (Some(seconds_used), Some(calls)) => Ok(ApiUsage { org_id, seconds_used, calls }),
                _ => anyhow::bail!("GET /v1/usage for {org_id} lacks seconds_used or calls: {usage}"),
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

/// What a run sent, saved so that its books can be checked later: the organizations it created
/// (with their API keys), every call it completed, and when it began.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub started_at: DateTime<Utc>,
    pub orgs: Vec<Org>,
    pub expected: Vec<ExpectedCall>,
}

impl RunRecord {
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).context("serializing the run record")?;
        std::fs::write(path, text).with_context(|| format!("could not write {}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a run record", path.display()))
    }
}

/// Reads the books of `record` from `GET /v1/usage` and, given a URL, from Postgres, and
/// compares them with what was sent. `counter` says where callplane counts usage.
pub async fn check_run(
    server: &Server,
    record: &RunRecord,
    database_url: Option<&str>,
    counter: CounterStore,
) -> Result<Books> {
    let org_ids: Vec<Uuid> = record.orgs.iter().map(|o| o.id).collect();
    let keys: Vec<(Uuid, String)> = record.orgs.iter().map(|o| (o.id, o.api_key.clone())).collect();
    let api = read_api(server, &keys).await?;
    let recorded = match database_url {
        Some(url) => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .context("connecting to Postgres to check the books")?;
            let recorded = read_database(&pool, &org_ids, record.started_at, counter).await?;
            pool.close().await;
            Some(recorded)
        }
        None => None,
    };
    Ok(check(&record.expected, &org_ids, recorded.as_ref(), Some(&api)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Two organizations with three calls and one without any (its counter zero), recorded
    /// perfectly.
    fn balanced() -> (Vec<ExpectedCall>, Vec<Uuid>, Recorded) {
        let expected = vec![
            ExpectedCall { call_id: "a".into(), org_id: org(1), billable_seconds: 75 },
            ExpectedCall { call_id: "b".into(), org_id: org(1), billable_seconds: 0 },
            ExpectedCall { call_id: "c".into(), org_id: org(2), billable_seconds: 30 },
        ];
        let calls = expected
            .iter()
            .map(|c| CallRow {
                call_id: c.call_id.clone(),
                org_id: c.org_id,
                status: "ended".into(),
                billable_seconds: Some(c.billable_seconds),
            })
            .collect();
        let ledger: Vec<KeyRow> = expected
            .iter()
            .map(|c| KeyRow { call_id: c.call_id.clone(), org_id: c.org_id, billable_seconds: c.billable_seconds })
            .collect();
        let keys = ledger.iter().map(|r| KeyRow { billable_seconds: 0, ..r.clone() }).collect();
        let recorded = Recorded {
            calls,
            keys,
            ledger,
            counters: Some([(org(1), 75), (org(2), 30), (org(3), 0)].into_iter().collect()),
            open_dead_letters: 0,
            daily_mismatches: Vec::new(),
        };
        (expected, vec![org(1), org(2), org(3)], recorded)
    }

    #[test]
    fn a_daily_usage_that_differs_from_the_ledger_is_a_problem() {
        let (expected, orgs, mut recorded) = balanced();
        recorded.daily_mismatches.push("daily usage of organization x on 2026-11-30 says 1 calls".into());
        let books = check(&expected, &orgs, Some(&recorded), None);
        assert!(!books.balanced());
        assert!(books.problems.iter().any(|p| p.starts_with("daily usage of organization x")), "{:?}", books.problems);
    }

    #[test]
    fn perfect_books_balance() {
        let (expected, orgs, recorded) = balanced();
        let api = [
            ApiUsage { org_id: org(1), seconds_used: 75, calls: 2 },
            ApiUsage { org_id: org(2), seconds_used: 30, calls: 1 },
        ];
        let books = check(&expected, &orgs, Some(&recorded), Some(&api));
        assert!(books.balanced(), "{:?}", books.problems);
        assert_eq!((books.expected_calls, books.calls_found, books.ledger_rows), (3, 3, 3));
        assert_eq!((books.expected_seconds, books.ledger_seconds, books.counter_seconds), (105, 105, 105));
        assert_eq!(books.api_orgs_checked, 2);
        assert!(books.line().contains("BALANCED"));
        // The API alone agrees as well.
        let api_only = check(&expected, &orgs, None, Some(&api));
        assert!(api_only.balanced() && !api_only.database_checked);
        let wrong = [ApiUsage { org_id: org(2), seconds_used: 31, calls: 1 }];
        let books = check(&expected, &orgs, None, Some(&wrong));
        assert!(!books.balanced());
        assert_eq!(books.over_counted_seconds, 1);
    }

    /// With the counter in Redis, the database has no counters to compare: `GET /v1/usage`
    /// is the counter, and a wrong total there is caught as over-counted seconds.
    #[test]
    fn a_counter_kept_in_redis_is_checked_through_the_api() {
        let (expected, orgs, mut recorded) = balanced();
        recorded.counters = None;
        let api = [
            ApiUsage { org_id: org(1), seconds_used: 75, calls: 2 },
            ApiUsage { org_id: org(2), seconds_used: 30, calls: 1 },
            ApiUsage { org_id: org(3), seconds_used: 0, calls: 0 },
        ];
        let books = check(&expected, &orgs, Some(&recorded), Some(&api));
        assert!(books.balanced() && books.database_checked, "{:?}", books.problems);
        assert_eq!((books.ledger_seconds, books.counter_seconds), (105, 105));
        let mut wrong = api.clone();
        wrong[1].seconds_used = 60;
        let books = check(&expected, &orgs, Some(&recorded), Some(&wrong));
        assert_eq!((books.problem_count, books.over_counted_seconds, books.counter_seconds), (1, 30, 135));
        assert!(books.problems[0].contains("says 60 seconds in 1 calls; simulated 30"), "{:?}", books.problems);
    }

    #[test]
    fn a_missing_call_and_a_double_ledger_row_are_found() {
        let (expected, orgs, mut recorded) = balanced();
        recorded.calls.retain(|c| c.call_id != "c");
        let duplicate = recorded.ledger[0].clone();
        recorded.ledger.push(duplicate);
        let books = check(&expected, &orgs, Some(&recorded), None);
        assert!(!books.balanced());
        assert!(books.problems.iter().any(|p| p.contains("call c is missing")), "{:?}", books.problems);
        assert!(
            books.problems.iter().any(|p| p.contains("usage_ledger has 2 rows for call a")),
            "{:?}",
            books.problems
        );
        assert_eq!(books.calls_found, 2);
        assert_eq!((books.unbilled_calls, books.double_billed_calls), (0, 1));
    }

    #[test]
    fn wrong_seconds_wrong_counters_and_dead_letters_are_found() {
        let (expected, orgs, mut recorded) = balanced();
        recorded.calls[0].billable_seconds = Some(74);
        recorded.calls[2].status = "in-progress".into();
        recorded.counters.as_mut().unwrap().insert(org(2), 60);
        recorded.open_dead_letters = 2;
        let books = check(&expected, &orgs, Some(&recorded), None);
        let text = books.problems.join("\n");
        assert!(text.contains("call a bills Some(74) seconds, not 75"), "{text}");
        assert!(text.contains("call c has status \"in-progress\""), "{text}");
        assert!(text.contains("counts Some(60) seconds, the calls add up to 30"), "{text}");
        assert!(text.contains("2 events were dead-lettered"), "{text}");
        assert_eq!(books.problem_count, 4);
        assert_eq!(books.over_counted_seconds, 30);
        assert_eq!((books.unbilled_calls, books.double_billed_calls), (0, 0));
    }

    #[test]
    fn unexpected_rows_and_api_disagreements_are_found() {
        let (expected, orgs, mut recorded) = balanced();
        recorded.calls.push(CallRow {
            call_id: "zzz".into(),
            org_id: org(3),
            status: "ended".into(),
            billable_seconds: Some(1),
        });
        let api = [ApiUsage { org_id: org(1), seconds_used: 75, calls: 3 }];
        let books = check(&expected, &orgs, Some(&recorded), Some(&api));
        let text = books.problems.join("\n");
        assert!(text.contains("call zzz was never simulated"), "{text}");
        assert!(text.contains("75 seconds in 3 calls; simulated 75 seconds in 2 calls"), "{text}");
    }

    #[test]
    fn problem_lists_are_capped_but_counted() {
        let expected: Vec<ExpectedCall> = (0..50)
            .map(|i| ExpectedCall { call_id: format!("call-{i}"), org_id: org(1), billable_seconds: 10 })
            .collect();
        let recorded = Recorded { counters: Some([(org(1), 500)].into_iter().collect()), ..Recorded::default() };
        let books = check(&expected, &[org(1)], Some(&recorded), None);
        // Each call is missing from calls, call_keys and the ledger.
        assert_eq!(books.problem_count, 150);
        assert_eq!(books.problems.len(), PROBLEMS_LISTED);
    }

    #[test]
    fn run_records_round_trip_through_a_file() {
        let record = RunRecord {
            started_at: Utc::now(),
            orgs: vec![Org {
                id: org(1),
                name: "o".into(),
                plan: "pro".into(),
                assistant_id: "a".into(),
                url: "http://x/vapi/1".into(),
                api_key: "cp_k".into(),
            }],
            expected: vec![ExpectedCall { call_id: "a".into(), org_id: org(1), billable_seconds: 75 }],
        };
        let path = std::env::temp_dir().join(format!("loadgen-run-{}.json", std::process::id()));
        record.save(&path).unwrap();
        let loaded = RunRecord::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded.expected, record.expected);
        assert_eq!(loaded.orgs[0].api_key, "cp_k");
        assert_eq!(loaded.started_at, record.started_at);
        // A summary from before these fields existed still reads.
        let old: Books = serde_json::from_str(r#"{"expected_calls": 3, "problem_count": 0}"#).unwrap();
        assert!(old.balanced() && old.double_billed_calls == 0);
    }
}
