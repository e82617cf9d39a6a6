//! `load`: fills a callplane database with synthetic history at COPY speed, for the dashboard
//! benchmarks: thousands of organizations, millions of calls spread over many months, and
//! their transcripts.
//!
//! Rows go straight into `organizations`, `call_keys`, `calls` and `call_transcripts` with
//! `COPY ... FROM STDIN` (text format), the monthly partitions created first with
//! `callplane_ensure_month`. Each call is a pure function of `(seed, index)`, so the three call
//! tables are written by three tasks on three connections at once and still agree. Loaded
//! history has no usage-ledger rows: it is for reads, not billing.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Datelike, Months, TimeZone, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::messages::{stored_messages, synthetic_conversation, transcript_text};
use crate::plan::{DurationDist, PLANS, stream};
use crate::random::{chance, item_rng, mix, pick};

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub database_url: String,
    pub calls: u64,
    pub orgs: u64,
    /// Calls are spread over this many months back from now.
    pub months: u32,
    /// Share of calls stored with a transcript (0 to 1).
    pub transcript_share: f64,
    /// Longest synthetic conversation, in turns.
    pub max_turns: u32,
    /// Rows per COPY statement (each commits on its own).
    pub batch: u64,
    pub seed: u64,
    pub quiet: bool,
}

/// What was loaded.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoadSummary {
    pub orgs: u64,
    pub calls: u64,
    pub transcripts: u64,
    pub months: u32,
    pub partitions: usize,
    pub seconds: f64,
    pub calls_per_second: f64,
    /// The name prefix of the loaded organizations (for picking some afterwards).
    pub org_prefix: String,
}

/// Ended reasons of loaded calls that connected.
const ENDED_REASONS: &[&str] =
    &["customer-ended-call", "customer-ended-call", "customer-ended-call", "assistant-ended-call", "silence-timed-out"];
/// Relative call volume by plan: bigger plans make more calls.
const PLAN_VOLUME: [(&str, f64); 3] = [("starter", 1.0), ("pro", 3.0), ("business", 8.0)];

/// Everything needed to generate any row, shared by the writer tasks.
struct Generator {
    config: LoadConfig,
    /// Distinguishes this load's ids from every other load's (not derived from the seed).
    salt: u64,
    now: DateTime<Utc>,
    window_ms: i64,
    /// Cumulative call volume per organization, for picking a call's organization.
    cumulative: Vec<f64>,
    org_ids: Vec<Uuid>,
    org_names: Vec<String>,
    durations: DurationDist,
}

/// The facts of one loaded call.
struct SyntheticCall {
    id: String,
    org: usize,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    ended_at: DateTime<Utc>,
    duration_ms: u64,
    ended_reason: &'static str,
    customer_number: String,
}

impl Generator {
    fn new(config: LoadConfig) -> Result<Self> {
        if config.orgs == 0 || config.months == 0 {
            bail!("--orgs and --months must be at least 1");
        }
        let salt = mix(Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64 ^ u64::from(std::process::id()));
        let now = Utc::now();
        let from = now.checked_sub_months(Months::new(config.months)).unwrap_or(now);
        let window_ms = (now - from).num_milliseconds() - 60_000;
        let mut cumulative = Vec::with_capacity(config.orgs as usize);
        let mut total = 0.0;
        let mut org_ids = Vec::with_capacity(config.orgs as usize);
        let mut org_names = Vec::with_capacity(config.orgs as usize);
        for org in 0..config.orgs {
            let plan = org_plan(org);
            total += PLAN_VOLUME.iter().find(|(p, _)| *p == plan).map_or(1.0, |(_, v)| *v);
            cumulative.push(total);
            org_ids.push(uuid_from_pair(salt, org, 0x06));
            org_names.push(format!("bulk {:x} #{org}", salt & 0xffff_ffff));
        }
        Ok(Self { config, salt, now, window_ms, cumulative, org_ids, org_names, durations: DurationDist::default() })
    }

    fn org_prefix(&self) -> String {
        format!("bulk {:x} #", self.salt & 0xffff_ffff)
    }

    /// Call `index`: drawn in a fixed order from its own generator, so every table agrees.
    fn call(&self, index: u64) -> SyntheticCall {
        let mut rng = item_rng(self.config.seed, stream::LOAD, index);
        let point = rng.random::<f64>() * self.cumulative.last().copied().unwrap_or(1.0);
        let org = self.cumulative.partition_point(|c| *c <= point).min(self.cumulative.len() - 1);
        let created_at = self.now - chrono::Duration::milliseconds(60_000 + rng.random_range(0..self.window_ms.max(1)));
        let answered = !chance(&mut rng, 0.07);
        let ring = chrono::Duration::milliseconds(rng.random_range(1_500..6_000));
        let duration_ms = if answered { self.durations.sample_ms(&mut rng) } else { 0 };
        let ended_reason = if answered { *pick(&mut rng, ENDED_REASONS) } else { "customer-did-not-answer" };
        let customer_number = format!("+1{}{:07}", rng.random_range(201..990), rng.random_range(0..10_000_000));
        SyntheticCall {
            id: uuid_from_pair(self.salt, index, 0xca11).to_string(),
            org,
            created_at,
            started_at: answered.then_some(created_at + ring),
            ended_at: created_at + ring + chrono::Duration::milliseconds(duration_ms as i64),
            duration_ms,
            ended_reason,
            customer_number,
        }
    }
}

/// Plans across loaded organizations: half starter, a third pro, the rest business.
fn org_plan(org: u64) -> &'static str {
    match org % 6 {
        0..=2 => PLANS[0],
        3 | 4 => PLANS[1],
        _ => PLANS[2],
    }
}

/// A version-4 shaped UUID from a salt, an index and a tag (distinct tags, distinct ids).
fn uuid_from_pair(salt: u64, index: u64, tag: u64) -> Uuid {
    let high = mix(salt ^ mix(tag) ^ index.rotate_left(17));
    let low = mix(high ^ index ^ tag.rotate_left(40));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&high.to_be_bytes());
    bytes[8..].copy_from_slice(&low.to_be_bytes());
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// Appends a value in COPY text format: backslash, tab and line breaks escaped.
fn push_text(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// Appends a timestamp in a form Postgres reads unambiguously.
fn push_time(out: &mut String, t: DateTime<Utc>) {
    let _ = write!(out, "{}", t.format("%Y-%m-%d %H:%M:%S%.3f+00"));
}

const NULL: &str = "\\N";

/// Which table a writer fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    CallKeys,
    Calls,
    Transcripts,
}

impl Table {
    fn copy_statement(self) -> &'static str {
        match self {
            Self::CallKeys => "COPY call_keys (vapi_call_id, organization_id, created_at) FROM STDIN",
            Self::Calls => {
                "COPY calls (id, organization_id, created_at, updated_at, call_type, status, status_rank, \
                 ended_reason, started_at, ended_at, duration_seconds, cost, summary, assistant_id, \
                 phone_number_id, customer_number, billable_seconds, reported_at, last_event_at) FROM STDIN"
            }
            Self::Transcripts => {
                "COPY call_transcripts (call_id, organization_id, created_at, updated_at, transcript, messages, \
                 is_final) FROM STDIN"
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::CallKeys => "call_keys",
            Self::Calls => "calls",
            Self::Transcripts => "call_transcripts",
        }
    }
}

impl Generator {
    /// Appends row `index` of `table` (transcripts: only for the calls that have one); returns
    /// whether a row was written.
    fn row(&self, table: Table, index: u64, out: &mut String) -> bool {
        let call = self.call(index);
        let org_id = self.org_ids[call.org];
        match table {
            Table::CallKeys => {
                let _ = write!(out, "{}\t{org_id}\t", call.id);
                push_time(out, call.created_at);
                out.push('\n');
            }
            Table::Calls => {
                let billable = if call.duration_ms == 0 { 0 } else { call.duration_ms.div_ceil(1000) };
                let _ = write!(out, "{}\t{org_id}\t", call.id);
                push_time(out, call.created_at);
                out.push('\t');
                push_time(out, call.ended_at + chrono::Duration::seconds(5));
                let _ = write!(out, "\tinboundPhoneCall\tended\t5\t{}\t", call.ended_reason);
                match call.started_at {
                    Some(started) => push_time(out, started),
                    None => out.push_str(NULL),
                }
                out.push('\t');
                push_time(out, call.ended_at);
                let seconds = call.duration_ms as f64 / 1000.0;
                let _ = write!(out, "\t{seconds}\t{:.4}\t", seconds / 60.0 * 0.095);
                if call.duration_ms == 0 {
                    out.push_str(NULL);
                } else {
                    push_text(out, "The caller asked about an appointment; the assistant booked a visit.");
                }
                let _ = write!(
                    out,
                    "\tasst-bulk-{}\tphone-bulk-{}\t{}\t{billable}\t",
                    call.org, call.org, call.customer_number
                );
                push_time(out, call.ended_at + chrono::Duration::seconds(4));
                out.push('\t');
                push_time(out, call.ended_at + chrono::Duration::seconds(4));
                out.push('\n');
            }
            Table::Transcripts => {
                let mut rng = item_rng(self.config.seed, stream::LOAD + 100, index);
                let Some(started) = call.started_at else { return false };
                if !chance(&mut rng, self.config.transcript_share) {
                    return false;
                }
                let turns = rng.random_range(2..=self.config.max_turns.max(2));
                let conversation =
                    synthetic_conversation(turns, call.duration_ms, started, &self.org_names[call.org], &mut rng);
                let _ = write!(out, "{}\t{org_id}\t", call.id);
                push_time(out, call.created_at);
                out.push('\t');
                push_time(out, call.ended_at + chrono::Duration::seconds(5));
                out.push('\t');
                push_text(out, &transcript_text(&conversation));
                out.push('\t');
                push_text(out, &stored_messages(&conversation, Some(started)).to_string());
                out.push_str("\tt\n");
            }
        }
        true
    }
}

/// Rows written so far, per table, for the progress line.
#[derive(Default)]
struct Progress {
    call_keys: AtomicU64,
    calls: AtomicU64,
    transcripts: AtomicU64,
}

impl Progress {
    fn counter(&self, table: Table) -> &AtomicU64 {
        match table {
            Table::CallKeys => &self.call_keys,
            Table::Calls => &self.calls,
            Table::Transcripts => &self.transcripts,
        }
    }
}

/// Runs the whole load.
pub async fn run(config: LoadConfig) -> Result<LoadSummary> {
    let started = Instant::now();
    let quiet = config.quiet;
    let generator = Arc::new(Generator::new(config.clone())?);

    let mut conn = PgConnection::connect(&config.database_url).await.context("connecting to Postgres")?;
    let partitions = ensure_months(&mut conn, generator.now, config.months).await?;
    copy_orgs(&mut conn, &generator).await?;
    if !quiet {
        eprintln!(
            "loadgen: {} monthly partitions ready, {} organizations loaded; loading {} calls",
            partitions, config.orgs, config.calls
        );
    }

    let progress = Arc::new(Progress::default());
    let reporter = (!quiet).then(|| tokio::spawn(report(progress.clone(), config.calls, started)));
    let mut writers = tokio::task::JoinSet::new();
    for table in [Table::CallKeys, Table::Calls, Table::Transcripts] {
        if table == Table::Transcripts && config.transcript_share <= 0.0 {
            continue;
        }
        let (generator, progress, url) = (generator.clone(), progress.clone(), config.database_url.clone());
        writers.spawn(async move { write_table(&url, &generator, table, &progress).await });
    }
    while let Some(result) = writers.join_next().await {
        result.context("a writer task failed")??;
    }
    if let Some(reporter) = reporter {
        reporter.abort();
    }

    if !quiet {
        eprintln!("loadgen: vacuuming and analyzing");
    }
    // As autovacuum leaves old months: hint bits set and pages all-visible, so that what reads
    // them next is not timed doing vacuum's work (or racing autovacuum for the cores).
    sqlx::query("VACUUM (ANALYZE) organizations, call_keys, calls, call_transcripts")
        .execute(&mut conn)
        .await
        .context("VACUUM (ANALYZE)")?;
    conn.close().await.ok();

    let seconds = started.elapsed().as_secs_f64();
    let summary = LoadSummary {
        orgs: config.orgs,
        calls: config.calls,
        transcripts: progress.transcripts.load(Ordering::Relaxed),
        months: config.months,
        partitions,
        seconds,
        calls_per_second: config.calls as f64 / seconds.max(1e-9),
        org_prefix: generator.org_prefix(),
    };
    if !quiet {
        eprintln!(
            "loadgen: loaded {} calls ({} transcripts) for {} organizations over {} months in {:.1}s ({:.0} calls/s)",
            summary.calls, summary.transcripts, summary.orgs, summary.months, seconds, summary.calls_per_second
        );
    }
    Ok(summary)
}

/// Creates the monthly partitions from `months` back to the current month.
async fn ensure_months(conn: &mut PgConnection, now: DateTime<Utc>, months: u32) -> Result<usize> {
    let this_month = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .context("the first of this month does not exist")?;
    let mut count = 0;
    for back in 0..=months {
        let Some(month) = this_month.checked_sub_months(Months::new(back)) else { break };
        sqlx::query("SELECT callplane_ensure_month($1)")
            .bind(month)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("creating the partitions for {}", month.format("%Y-%m")))?;
        count += 1;
    }
    Ok(count)
}

/// COPYs the organizations: each with a current monthly billing period.
async fn copy_orgs(conn: &mut PgConnection, generator: &Generator) -> Result<()> {
    let now = generator.now;
    let mut out = String::with_capacity(generator.org_ids.len() * 160);
    for (org, id) in generator.org_ids.iter().enumerate() {
        // Billing anchors on a day of the month; the current period is the one containing now.
        let day = (mix(generator.salt ^ org as u64) % 28) as u32 + 1;
        let anchor = Utc
            .with_ymd_and_hms(now.year(), now.month(), day, 0, 0, 0)
            .single()
            .context("a billing anchor does not exist")?;
        let period_start =
            if anchor > now { anchor.checked_sub_months(Months::new(1)).unwrap_or(anchor) } else { anchor };
        let period_end = period_start.checked_add_months(Months::new(1)).unwrap_or(period_start);
        let _ = write!(out, "{id}\t");
        push_text(&mut out, &generator.org_names[org]);
        let _ = write!(out, "\t{}\tactive\t", org_plan(org as u64));
        push_time(&mut out, period_start);
        out.push('\t');
        push_time(&mut out, period_end);
        out.push('\t');
        push_time(&mut out, period_start);
        let _ = writeln!(out, "\t0\tasst-bulk-{org}");
    }
    let mut copy = conn
        .copy_in_raw(
            "COPY organizations (id, name, plan, status, period_start, period_end, billing_anchor, seconds_used, \
             default_assistant_id) FROM STDIN",
        )
        .await
        .context("COPY organizations")?;
    copy.send(out.as_bytes()).await.context("COPY organizations")?;
    copy.finish().await.context("COPY organizations")?;
    Ok(())
}

/// Writes every row of one table, a COPY statement per batch.
async fn write_table(url: &str, generator: &Generator, table: Table, progress: &Progress) -> Result<()> {
    const CHUNK_BYTES: usize = 4 << 20;
    let mut conn = PgConnection::connect(url).await.context("connecting to Postgres")?;
    // Synthetic history: losing the last moments of it in a crash does not matter.
    sqlx::query("SET synchronous_commit = off").execute(&mut conn).await?;
    let total = generator.config.calls;
    let batch = generator.config.batch.max(1);
    let mut first = 0;
    while first < total {
        let last = (first + batch).min(total);
        let mut copy =
            conn.copy_in_raw(table.copy_statement()).await.with_context(|| format!("COPY {}", table.name()))?;
        let mut out = String::with_capacity(CHUNK_BYTES + 64 * 1024);
        for index in first..last {
            if generator.row(table, index, &mut out) {
                progress.counter(table).fetch_add(1, Ordering::Relaxed);
            }
            if out.len() >= CHUNK_BYTES {
                copy.send(out.as_bytes()).await.with_context(|| format!("COPY {}", table.name()))?;
                out.clear();
            }
        }
        if !out.is_empty() {
            copy.send(out.as_bytes()).await.with_context(|| format!("COPY {}", table.name()))?;
        }
        copy.finish().await.with_context(|| format!("COPY {}", table.name()))?;
        first = last;
    }
    conn.close().await.ok();
    Ok(())
}

/// Prints rows written per table every second.
async fn report(progress: Arc<Progress>, total: u64, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let calls = progress.calls.load(Ordering::Relaxed);
        eprintln!(
            "loadgen: {:>4}s  call_keys {}/{total}  calls {calls}/{total} ({:.0}/s)  transcripts {}",
            started.elapsed().as_secs(),
            progress.call_keys.load(Ordering::Relaxed),
            calls as f64 / started.elapsed().as_secs_f64().max(1e-9),
            progress.transcripts.load(Ordering::Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(calls: u64) -> Generator {
        Generator::new(LoadConfig {
            database_url: String::new(),
            calls,
            orgs: 60,
            months: 12,
            transcript_share: 1.0,
            max_turns: 6,
            batch: 1000,
            seed: 7,
            quiet: true,
        })
        .unwrap()
    }

    #[test]
    fn copy_text_escapes_special_characters() {
        let mut out = String::new();
        push_text(&mut out, "a\tb\nc\\d\re");
        assert_eq!(out, "a\\tb\\nc\\\\d\\re");
    }

    #[test]
    fn every_table_agrees_on_a_call() {
        let generator = generator(10);
        for index in 0..10 {
            let (mut keys, mut calls, mut transcripts) = (String::new(), String::new(), String::new());
            assert!(generator.row(Table::CallKeys, index, &mut keys));
            assert!(generator.row(Table::Calls, index, &mut calls));
            let has_transcript = generator.row(Table::Transcripts, index, &mut transcripts);
            let key_fields: Vec<&str> = keys.trim_end().split('\t').collect();
            let call_fields: Vec<&str> = calls.trim_end().split('\t').collect();
            assert_eq!(key_fields.len(), 3);
            assert_eq!(call_fields.len(), 19, "{calls}");
            // Same id, organization and creation time.
            assert_eq!(key_fields[..3], call_fields[..3]);
            if has_transcript {
                let fields: Vec<&str> = transcripts.trim_end().split('\t').collect();
                assert_eq!(fields.len(), 7);
                assert_eq!(fields[..3], key_fields[..3]);
                // The messages column is JSON once the COPY escapes are undone.
                let json = fields[5].replace("\\\\", "\\");
                let messages: serde_json::Value = serde_json::from_str(&json).unwrap();
                assert!(messages.as_array().is_some_and(|m| m.len() >= 2));
            }
        }
    }

    #[test]
    fn calls_are_reproducible_and_inside_the_window() {
        let generator = generator(1000);
        let oldest = generator.now.checked_sub_months(Months::new(12)).unwrap();
        for index in 0..1000 {
            let a = generator.call(index);
            let b = generator.call(index);
            assert_eq!((a.id.as_str(), a.org, a.created_at), (b.id.as_str(), b.org, b.created_at));
            assert!(a.created_at > oldest && a.created_at < generator.now);
            assert!(a.ended_at >= a.created_at);
            if let Some(started) = a.started_at {
                assert_eq!((a.ended_at - started).num_milliseconds() as u64, a.duration_ms);
            }
        }
        // Business organizations (every sixth, from the fifth) get more calls than starter ones.
        let mut per_plan = std::collections::HashMap::new();
        for index in 0..1000 {
            *per_plan.entry(org_plan(generator.call(index).org as u64)).or_insert(0) += 1;
        }
        assert!(per_plan["business"] > per_plan["starter"]);
    }

    #[test]
    fn ids_differ_by_index_and_tag() {
        assert_ne!(uuid_from_pair(1, 2, 3), uuid_from_pair(1, 3, 3));
        assert_ne!(uuid_from_pair(1, 2, 3), uuid_from_pair(1, 2, 4));
        assert_eq!(uuid_from_pair(1, 2, 3).get_version_num(), 4);
    }
}
