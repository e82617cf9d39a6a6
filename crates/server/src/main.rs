//! `callplane`: serve the webhook and API, and operate the database.

use anyhow::{Context, bail};
use callplane_core::OrgId;
use callplane_core::seams::{FunctionData, OrgDirectory};
use callplane_server::phase::{Mover, Step};
use callplane_server::{App, Settings, telemetry};
use callplane_storage::{DeadLetterFilter, NewOrganization, PgFunctionData, PgStore};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use std::collections::HashSet;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::info;

// jemalloc, with background threads that purge freed pages on a decay: after a burst the
// memory goes back to the system even though the request threads are idle. glibc's malloc
// (and mimalloc, whose idle threads never collect what other threads freed) kept RSS near
// its peak long after the burst.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "callplane", version, about = "The backend of a voice-AI business on VAPI")]
struct Cli {
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the VAPI webhook, the API and the operational routes.
    Serve,
    /// Run a Temporal worker alone (phase 2, the `temporal` feature): it processes the call
    /// workflows that `serve` hands events to, so workers scale apart from the HTTP servers.
    Worker,
    /// Apply database migrations and create the partitions ahead.
    Migrate,
    /// Print the resolved configuration, secrets masked.
    Config,
    /// Organizations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// API keys.
    #[command(subcommand)]
    Apikey(ApikeyCommand),
    /// The data an organization's agent uses during calls.
    #[command(subcommand, name = "function-data")]
    FunctionData(FunctionDataCommand),
    /// Monthly partitions of calls and transcripts.
    #[command(subcommand)]
    Partitions(PartitionsCommand),
    /// Dead-lettered events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Stripe billing.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// The local inbox of accepted webhooks (`inbox.dir`).
    #[command(subcommand)]
    Inbox(InboxCommand),
    /// Reconcile with VAPI's own records.
    #[command(subcommand)]
    Reconcile(ReconcileCommand),
    /// Usage counters.
    #[command(subcommand)]
    Usage(UsageCommand),
    /// Transcript search.
    #[command(subcommand)]
    Search(SearchCommand),
    /// Transcripts in object storage (phase 3, the `object-store` feature).
    #[command(subcommand)]
    Transcripts(TranscriptsCommand),
    /// Phase moves, with traffic running.
    #[command(subcommand)]
    Phase(PhaseCommand),
    /// Which phase to be on, and why: every trigger of the plan measured from the servers'
    /// daily figures and the database, with the evidence beside each threshold, and what each
    /// phase costs a month.
    Advise,
}

#[derive(Subcommand)]
enum PhaseCommand {
    /// The steps to a phase: what each needs, where each seam is, and whether this build, this
    /// configuration and the running processes can take it now.
    Plan {
        #[arg(value_parser = clap::value_parser!(u8).range(2..=3))]
        phase: u8,
    },
    /// Moves one seam to the phase's backend while every running process follows, then checks
    /// it. Safe to run again; `--rollback` moves it back the same way.
    Apply {
        #[arg(value_parser = clap::value_parser!(u8).range(2..=2))]
        phase: u8,
        #[arg(long, value_enum)]
        step: Step,
        #[arg(long)]
        rollback: bool,
    },
}

#[derive(Subcommand)]
enum SearchCommand {
    /// Build the transcript search index on every partition that lacks it, without blocking
    /// writes (`CREATE INDEX CONCURRENTLY`, then attached). Safe to run again.
    Index,
}

#[derive(Subcommand)]
enum TranscriptsCommand {
    /// Move transcripts between the database and object storage (`[object_store]`), with
    /// traffic running: each one written and read back before its row lets go of it. Safe to
    /// stop and run again. Set `backends.transcripts` to the same side so that new transcripts
    /// go there too.
    Move {
        #[arg(long, value_enum)]
        to: MoveTo,
        /// Only this organization's transcripts.
        #[arg(long)]
        org: Option<uuid::Uuid>,
        /// Only those of calls created before this month (YYYY-MM), day (YYYY-MM-DD, UTC) or
        /// instant (RFC 3339).
        #[arg(long)]
        before: Option<String>,
        /// Rows read per statement.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch: i64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MoveTo {
    ObjectStore,
    Postgres,
}

#[derive(Subcommand)]
enum UsageCommand {
    /// Compare every organization's counter for its current billing period with the usage
    /// ledger (the truth) and print the differences; exits 1 when there are some.
    Reconcile {
        /// Set each differing counter to the ledger's total.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        org: Option<OrgId>,
    },
    /// Rebuild the daily usage (`/v1/usage/daily`) from the usage ledger, each organization in
    /// its billing time zone. Safe while reports arrive.
    #[command(name = "rebuild-daily")]
    RebuildDaily {
        #[arg(long)]
        org: Option<OrgId>,
    },
}

#[derive(Subcommand)]
enum ReconcileCommand {
    /// Ask VAPI about calls created in a window that never reached `ended` (older than the
    /// longest allowed call): finish and bill them from VAPI's record, or mark them.
    Calls {
        /// RFC 3339, e.g. 2026-11-01T00:00:00Z
        #[arg(long)]
        since: DateTime<Utc>,
        #[arg(long)]
        until: Option<DateTime<Utc>>,
        #[arg(long)]
        org: Option<OrgId>,
    },
}

#[derive(Subcommand)]
enum InboxCommand {
    /// What the inbox holds: depth, size, the oldest event, and the events failing.
    Status {
        /// Events to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Process what the inbox holds now (with `callplane serve` stopped; a running server
    /// drains its own inbox).
    Drain {
        /// Give up on events still failing after this many seconds.
        #[arg(long, default_value_t = 60)]
        patience_secs: u64,
    },
}

#[derive(Subcommand)]
enum BillingCommand {
    /// Create (or find) the Stripe products, prices and overage meter for the configured plans
    /// and print the ids to put in configuration. Safe to run again.
    Setup,
}

#[derive(Subcommand)]
enum OrgCommand {
    /// Create an organization; prints its id and VAPI server URL.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        plan: String,
        /// The VAPI assistant answered to this organization's assistant-requests.
        #[arg(long)]
        assistant_id: Option<String>,
    },
    /// Register a VAPI phone-number id to an organization (for the shared URL `/vapi`).
    RegisterPhone {
        #[arg(long)]
        org: OrgId,
        #[arg(long)]
        vapi_id: String,
        #[arg(long)]
        number: Option<String>,
    },
    /// Register a VAPI assistant id to an organization (for the shared URL `/vapi`).
    RegisterAssistant {
        #[arg(long)]
        org: OrgId,
        #[arg(long)]
        vapi_id: String,
    },
}

#[derive(Subcommand)]
enum ApikeyCommand {
    /// Create an API key; it is printed once and stored only as a hash.
    Create {
        #[arg(long)]
        org: OrgId,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List an organization's keys (prefixes, never the keys).
    List {
        #[arg(long)]
        org: OrgId,
    },
    /// Revoke a key by its id.
    Revoke {
        #[arg(long)]
        org: OrgId,
        #[arg(long)]
        id: uuid::Uuid,
    },
}

#[derive(Subcommand)]
enum FunctionDataCommand {
    /// Set KEY to a JSON VALUE.
    Put {
        #[arg(long)]
        org: OrgId,
        key: String,
        value: String,
    },
    /// Print an organization's function data.
    List {
        #[arg(long)]
        org: OrgId,
    },
}

#[derive(Subcommand)]
enum PartitionsCommand {
    /// Create partitions from this month to N months ahead.
    Ensure {
        #[arg(long)]
        months_ahead: Option<u32>,
    },
    /// Turn an unpartitioned calls table into the monthly layout with the service running:
    /// copied in batches (resumable), kept in sync by a trigger, checked month by month, then
    /// swapped in under a lock held for milliseconds. The old table is kept as
    /// `calls_unpartitioned` until `--drop-old`. With `--from`, a legacy table of another shape
    /// is copied into the partitioned calls table instead, and kept in sync until `--drop-old`.
    Convert {
        /// The table to convert; `calls` is the one callplane partitions.
        #[arg(long, default_value = "calls")]
        table: String,
        /// A legacy table to copy from instead of converting `calls` in place.
        #[arg(long)]
        from: Option<String>,
        /// `calls_column=legacy_column`, where the names differ (repeatable).
        #[arg(long = "map", value_name = "CALLS_COLUMN=LEGACY_COLUMN")]
        map: Vec<String>,
        /// A file of `calls_column = legacy_column` lines (`#` starts a comment).
        #[arg(long)]
        mapping: Option<std::path::PathBuf>,
        /// Rows copied per batch (each batch commits with its checkpoint).
        #[arg(long, default_value_t = 10_000)]
        batch_rows: i64,
        /// Drop the old table (or, with --from, stop syncing it) once the conversion is done.
        #[arg(long)]
        drop_old: bool,
    },
    /// Archive every month before YYYY-MM to object storage (`[object_store]`, phase 3): its
    /// calls and transcripts are detached, exported to Parquet with a manifest (row counts,
    /// checksums, columns), read back and compared, and only then dropped. The usage ledger
    /// stays. Months that can still receive events (`partitions.max_past_days`) are refused.
    /// Safe to stop and run again.
    Archive {
        /// The first month kept: every month before it is archived (YYYY-MM).
        #[arg(long)]
        before: String,
    },
    /// Bring an archived month (YYYY-MM) back from object storage, checked against its
    /// manifest, and attach it again.
    Restore { month: String },
    /// The archived months.
    Archived,
}

/// `calls_column=legacy_column` pairs from `--map` and a mapping file.
fn column_mapping(
    map: &[String],
    file: Option<&std::path::Path>,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut lines: Vec<(String, String)> = Vec::new();
    if let Some(path) = file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the mapping file {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                lines.push((format!("{}:{}", path.display(), n + 1), line.to_owned()));
            }
        }
    }
    lines.extend(map.iter().map(|m| ("--map".to_owned(), m.clone())));
    let mut out = std::collections::BTreeMap::new();
    for (place, line) in lines {
        let Some((to, from)) = line.split_once('=').map(|(a, b)| (a.trim(), b.trim().trim_matches('"'))) else {
            bail!("{place}: {line:?} is not `calls_column = legacy_column`");
        };
        let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid(to) || !valid(from) {
            bail!("{place}: {line:?}: column names are letters, digits and underscores");
        }
        out.insert(to.to_owned(), from.to_owned());
    }
    Ok(out)
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Reprocess dead-lettered events, by organization, call or time range.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// List dead-lettered events.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Include events already replayed successfully.
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args)]
struct FilterArgs {
    #[arg(long)]
    org: Option<OrgId>,
    #[arg(long)]
    call: Option<String>,
    /// RFC 3339, e.g. 2026-11-01T00:00:00Z
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    #[arg(long)]
    until: Option<DateTime<Utc>>,
}

impl FilterArgs {
    fn filter(&self, include_resolved: bool) -> DeadLetterFilter {
        DeadLetterFilter {
            org: self.org,
            call_id: self.call.clone(),
            since: self.since,
            until: self.until,
            include_resolved,
        }
    }
}

/// Prints the result; a reader that went away (`| head`) is not an error.
fn print(json_mode: bool, value: &Value, human: impl FnOnce() -> String) {
    use std::io::Write;
    let text = if json_mode { value.to_string() } else { human() };
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// Redraws a progress line in place, on a terminal only: in a pipe or a log it would just
/// repeat the summary printed at the end.
fn progress(line: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K{line}");
    }
}

/// Erases the progress line, so that the summary is the only one left.
fn end_progress() {
    progress("");
}

/// How long a command waits for the database to take a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

const DATABASE_HINT: &str = "Set CALLPLANE__DATABASE__URL (or database.url); \
                             `cargo xtask run` prints the URL of its development database.";

/// Tries one connection to `database.url`, so that a database that is down, unreachable or
/// refusing the credentials stops the command at once with the reason and the URL (password
/// masked), instead of after the pool's retries.
async fn check_database(settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database_url_masked();
    let attempt = PgConnection::connect(settings.database.url.expose_secret());
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(connection)) => {
            // Only the answer mattered; a failure to say goodbye does not.
            let _ = connection.close().await;
            Ok(())
        }
        Ok(Err(error)) => bail!("cannot connect to the database at {url}: {error}\n{DATABASE_HINT}"),
        Err(_) => bail!(
            "cannot connect to the database at {url}: no answer within {} s\n{DATABASE_HINT}",
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

/// The store on `database.url`, once `check_database` found it answering.
/// `--before`: a month (its first instant), a day (midnight UTC) or an RFC 3339 instant.
fn parse_before(raw: &str) -> anyhow::Result<DateTime<Utc>> {
    let day = |d: &str| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok();
    let instant = day(raw)
        .or_else(|| day(&format!("{raw}-01")))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .or_else(|| DateTime::parse_from_rfc3339(raw).ok().map(|t| t.with_timezone(&Utc)));
    instant
        .with_context(|| format!("--before {raw:?}: give a month (2026-01), a day (2026-01-31) or an RFC 3339 instant"))
}

/// A month given as YYYY-MM: its first instant, UTC.
fn parse_month(raw: &str, what: &str) -> anyhow::Result<DateTime<Utc>> {
    chrono::NaiveDate::parse_from_str(&format!("{raw}-01"), "%Y-%m-%d")
        .ok()
        .filter(|_| raw.len() == 7)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .with_context(|| format!("{what} {raw:?}: give a month as YYYY-MM (2025-03)"))
}

/// One line of an archive's or a restore's progress.
#[cfg(feature = "object-store")]
fn archive_progress(p: callplane_storage::ArchiveProgress<'_>) {
    let share = if p.of > 0 { format!(" ({:.0}%)", 100.0 * p.rows as f64 / p.of as f64) } else { String::new() };
    progress(&format!("{}: {} {}/{}{share}", p.month, p.stage, p.rows, p.of));
}

#[cfg(feature = "object-store")]
async fn archive(settings: &Settings, before: DateTime<Utc>, json_out: bool) -> anyhow::Result<()> {
    let archiver = callplane_server::archiver(settings, connect(settings).await?)?;
    let report = archiver
        .archive(before, settings.stale_before(Utc::now()), archive_progress)
        .await
        .context("archiving old months")?;
    end_progress();
    let v = serde_json::to_value(&report)?;
    print(json_out, &v, || {
        let mut lines: Vec<String> = report
            .archived
            .iter()
            .map(|m| {
                format!(
                    "archived {}: {} calls and {} transcripts, {:.1} MB of Parquet ({:.1} MB in the database), in {:.1} s",
                    m.month,
                    m.calls,
                    m.transcripts,
                    m.bytes as f64 / 1e6,
                    m.database_bytes as f64 / 1e6,
                    m.seconds
                )
            })
            .collect();
        if lines.is_empty() {
            lines.push(format!("no month before {} is left in the database", report.before));
        }
        if !report.already_archived.is_empty() {
            lines.push(format!("archived before: {}", report.already_archived.join(", ")));
        }
        lines.push(format!("store: {}", report.store));
        lines.join("\n")
    });
    Ok(())
}

#[cfg(feature = "object-store")]
async fn restore(settings: &Settings, month: DateTime<Utc>, json_out: bool) -> anyhow::Result<()> {
    let archiver = callplane_server::archiver(settings, connect(settings).await?)?;
    let report = archiver.restore(month, archive_progress).await.context("restoring an archived month")?;
    end_progress();
    let v = serde_json::to_value(&report)?;
    print(json_out, &v, || {
        format!(
            "restored {}: {} calls and {} transcripts, checked against the manifest, attached, in {:.1} s",
            report.month, report.calls, report.transcripts, report.seconds
        )
    });
    Ok(())
}

#[cfg(not(feature = "object-store"))]
async fn archive(_: &Settings, _: DateTime<Utc>, _: bool) -> anyhow::Result<()> {
    bail!("this build has no object store; build with the `object-store` feature (`--features phase3`)")
}

#[cfg(not(feature = "object-store"))]
async fn restore(_: &Settings, _: DateTime<Utc>, _: bool) -> anyhow::Result<()> {
    bail!("this build has no object store; build with the `object-store` feature (`--features phase3`)")
}

#[cfg(feature = "object-store")]
async fn move_transcripts(
    settings: &Settings,
    to: MoveTo,
    org: Option<OrgId>,
    before: Option<DateTime<Utc>>,
    batch: i64,
    json_out: bool,
) -> anyhow::Result<()> {
    use callplane_storage::{MoveRequest, MoveTarget, ObjectTranscriptStore, Objects};
    let store = connect(settings).await?;
    let objects = Objects::open(&settings.object_store_config())?;
    let to = match to {
        MoveTo::ObjectStore => MoveTarget::ObjectStore,
        MoveTo::Postgres => MoveTarget::Postgres,
    };
    let request = MoveRequest { to, org, before, batch };
    let started = std::time::Instant::now();
    let report = ObjectTranscriptStore::new(store, objects)
        .move_transcripts(&request, |p| {
            let rate = p.moved as f64 / started.elapsed().as_secs_f64().max(0.001);
            let share = if p.total > 0 { 100.0 * (p.moved + p.skipped) as f64 / p.total as f64 } else { 100.0 };
            progress(&format!(
                "moving transcripts: {}/{} ({share:.0}%), {rate:.0}/s, {:.1} MB of messages, {} changed meanwhile",
                p.moved,
                p.total,
                p.message_bytes as f64 / 1e6,
                p.skipped
            ));
        })
        .await
        .context("moving transcripts")?;
    end_progress();
    let v = serde_json::to_value(&report)?;
    print(json_out, &v, || {
        format!(
            "moved {} transcript(s) to {} in {:.1} s ({:.1} MB of messages){}; {} left on the other side{}",
            report.progress.moved,
            match report.to {
                MoveTarget::ObjectStore => format!("object storage ({})", report.store),
                MoveTarget::Postgres => "the database".to_owned(),
            },
            report.seconds,
            report.progress.message_bytes as f64 / 1e6,
            if report.progress.skipped > 0 {
                format!(", {} changed while moving and were left for another run", report.progress.skipped)
            } else {
                String::new()
            },
            report.left,
            if report.left > 0 { " (run it again)" } else { "" },
        )
    });
    Ok(())
}

#[cfg(not(feature = "object-store"))]
async fn move_transcripts(
    _: &Settings,
    _: MoveTo,
    _: Option<OrgId>,
    _: Option<DateTime<Utc>>,
    _: i64,
    _: bool,
) -> anyhow::Result<()> {
    bail!("this build has no object store; build with the `object-store` feature (`--features phase3`)")
}

async fn connect(settings: &Settings) -> anyhow::Result<PgStore> {
    check_database(settings).await?;
    App::connect(settings).await
}

/// Errors are printed as one message with its causes, never as a backtrace (which
/// `RUST_BACKTRACE=1` would add to `main`'s returned error): they are for operators.
#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load()?;
    telemetry::init(&settings.server.log_format);
    let j = cli.json;
    match cli.command {
        Command::Config => {
            let v = settings.redacted();
            print(j, &v, || serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Command::Serve => serve(settings).await?,
        Command::Worker => worker(settings).await?,
        Command::Migrate => {
            let store = connect(&settings).await?;
            eprintln!("applying migrations...");
            store.migrate().await.context("applying migrations")?;
            eprintln!("creating partitions {} months ahead...", settings.partitions.months_ahead);
            let r = store.ensure_partitions(Utc::now(), settings.partitions.months_ahead).await?;
            let search = mover(&settings).await?.build_search_index().await?;
            let v = json!({ "migrated": true, "partitions": r, "search_index": search });
            print(j, &v, || format!("migrated; partitions through {}", r.covered_through.clone().unwrap_or_default()));
        }
        Command::Org(cmd) => {
            let store = connect(&settings).await?;
            match cmd {
                OrgCommand::Create { name, plan, assistant_id } => {
                    if !settings.plans.contains_key(&plan) {
                        bail!(
                            "unknown plan {plan:?}; configured plans: {}",
                            settings.plans.keys().cloned().collect::<Vec<_>>().join(", ")
                        );
                    }
                    let org = store
                        .create_organization(&NewOrganization {
                            name,
                            plan,
                            default_assistant_id: assistant_id,
                            period_start: Utc::now(),
                        })
                        .await?;
                    let url = settings.vapi_server_url(&org.id);
                    let v = json!({ "id": org.id, "name": org.name, "plan": org.plan, "vapi_server_url": url,
                                    "period_start": org.period_start, "period_end": org.period_end });
                    print(j, &v, || format!("organization {}\nVAPI server URL: {url}", org.id));
                }
                OrgCommand::RegisterPhone { org, vapi_id, number } => {
                    store.register_phone_number(org, &vapi_id, number.as_deref()).await?;
                    print(j, &json!({ "org": org, "vapi_phone_number_id": vapi_id }), || "registered".into());
                }
                OrgCommand::RegisterAssistant { org, vapi_id } => {
                    store.register_assistant(org, &vapi_id).await?;
                    print(j, &json!({ "org": org, "vapi_assistant_id": vapi_id }), || "registered".into());
                }
            }
        }
        Command::Apikey(cmd) => {
            let store = connect(&settings).await?;
            match cmd {
                ApikeyCommand::Create { org, name } => {
                    let key = store.create_api_key(org, &name).await?;
                    let v = json!({ "id": key.id, "prefix": key.prefix, "key": key.secret });
                    print(j, &v, || format!("{}\n(shown once; store it now)", key.secret));
                }
                ApikeyCommand::List { org } => {
                    let keys = store.api_keys(org).await?;
                    let v = serde_json::to_value(&keys)?;
                    print(j, &v, || {
                        keys.iter()
                            .map(|k| {
                                let state = if k.revoked_at.is_some() { "revoked" } else { "active" };
                                format!("{} {}... {} {state}", k.id, k.prefix, k.name)
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                ApikeyCommand::Revoke { org, id } => {
                    if !store.revoke_api_key(org, id).await? {
                        bail!("organization {org} has no unrevoked key {id}");
                    }
                    print(j, &json!({ "revoked": id }), || format!("revoked {id}"));
                }
            }
        }
        Command::FunctionData(cmd) => {
            let data = PgFunctionData(connect(&settings).await?);
            match cmd {
                FunctionDataCommand::Put { org, key, value } => {
                    let value: Value =
                        serde_json::from_str(&value).context("VALUE must be JSON (quote strings: '\"text\"')")?;
                    data.put(org, &key, &value).await?;
                    print(j, &json!({ "key": key, "value": value }), || format!("set {key}"));
                }
                FunctionDataCommand::List { org } => {
                    let all = Value::Object(data.preload(org).await?);
                    print(j, &all, || serde_json::to_string_pretty(&all).unwrap_or_default());
                }
            }
        }
        Command::Partitions(PartitionsCommand::Ensure { months_ahead }) => {
            let store = connect(&settings).await?;
            let ahead = months_ahead.unwrap_or(settings.partitions.months_ahead);
            let r = store.ensure_partitions(Utc::now(), ahead).await?;
            let v = serde_json::to_value(&r)?;
            print(j, &v, || {
                format!("created {} partition(s); calls partitions: {}", r.created.len(), r.calls_partitions.join(", "))
            });
        }
        Command::Partitions(PartitionsCommand::Convert { table, from, map, mapping, batch_rows, drop_old }) => {
            if table != callplane_storage::CONVERTIBLE {
                bail!("only the calls table is converted (call_transcripts is partitioned by every migration)");
            }
            let request = callplane_storage::ConvertRequest {
                from,
                mapping: column_mapping(&map, mapping.as_deref())?,
                batch_rows,
                drop_old,
                months_ahead: settings.partitions.months_ahead,
            };
            let store = connect(&settings).await?;
            let started = std::time::Instant::now();
            let r = store
                .convert_calls(&request, |p| {
                    let rate = p.rows as f64 / started.elapsed().as_secs_f64().max(0.001);
                    progress(&format!("{}: {}/{} ({} rows, {rate:.0} rows/s)", p.stage, p.done, p.of, p.rows));
                })
                .await
                .context("converting the calls table")?;
            end_progress();
            let v = serde_json::to_value(&r)?;
            print(j, &v, || convert_text(&r));
        }
        Command::Partitions(PartitionsCommand::Archive { before }) => {
            archive(&settings, parse_month(&before, "--before")?, j).await?;
        }
        Command::Partitions(PartitionsCommand::Restore { month }) => {
            restore(&settings, parse_month(&month, "the month")?, j).await?;
        }
        Command::Partitions(PartitionsCommand::Archived) => {
            let store = connect(&settings).await?;
            let months = store.archived_months().await?;
            let v = serde_json::to_value(&months)?;
            print(j, &v, || {
                if months.is_empty() {
                    return "no month is archived".to_owned();
                }
                months
                    .iter()
                    .map(|m| {
                        format!(
                            "{} {} ({} calls, {} transcripts, {:.1} MB) {}",
                            m.month.format("%Y-%m"),
                            m.state,
                            m.calls.unwrap_or(0),
                            m.transcripts.unwrap_or(0),
                            m.bytes.unwrap_or(0) as f64 / 1e6,
                            m.manifest_key.as_deref().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Billing(BillingCommand::Setup) => {
            let Some(stripe) = settings.stripe_settings() else {
                bail!("stripe.secret_key is not set (CALLPLANE__STRIPE__SECRET_KEY)");
            };
            let plans: Vec<callplane_billing::PlanCatalog> = settings
                .plans
                .iter()
                .map(|(name, p)| callplane_billing::PlanCatalog {
                    name: name.clone(),
                    price_cents: p.price_cents,
                    overage_cents_per_minute: if p.hard_limit { 0 } else { p.overage_cents_per_minute },
                })
                .collect();
            let ids = callplane_billing::setup_catalog(
                &stripe.secret_key,
                &stripe.api_base,
                &settings.stripe.currency,
                &settings.stripe.meter_event_name,
                &plans,
                |step| eprintln!("{step}"),
            )
            .await?;
            let v = serde_json::to_value(&ids)?;
            print(j, &v, || {
                let mut out = String::from(
                    "# Put these in your configuration (or CALLPLANE__PLANS__<PLAN>__STRIPE_PRICE_ID=...):\n",
                );
                for (name, p) in &ids.plans {
                    out.push_str(&format!("[plans.{name}]\nstripe_price_id = \"{}\"\n", p.price_id));
                    if let Some(o) = &p.overage_price_id {
                        out.push_str(&format!("stripe_overage_price_id = \"{o}\"\n"));
                    }
                }
                out.push_str(&format!(
                    "# overage meter: {} ({})\n# created this run: {}",
                    ids.meter_id,
                    ids.meter_event_name,
                    if ids.created.is_empty() { "nothing".to_owned() } else { ids.created.join(", ") }
                ));
                out
            });
        }
        Command::Inbox(cmd) => inbox(cmd, settings, j).await?,
        Command::Usage(UsageCommand::Reconcile { repair, org }) => {
            let store = App::connect(&settings).await?;
            let clients = callplane_server::app::Clients::connect(&settings, &store).await?;
            let routes = clients.routes(&settings).await?;
            // Counting follows the routes while this runs, as `serve` does.
            let follower = std::sync::Arc::new(callplane_server::routes::Follower::new(
                "cli",
                &settings,
                store.clone(),
                routes.clone(),
                &clients,
            ));
            follower.clone().spawn();
            let metering = clients.metering(&settings, &routes);
            // Calls whose counter add has not happened yet are counted first, as `serve` would.
            let mut pending = 0;
            loop {
                let (n, _) = metering.repair(std::time::Duration::ZERO, 1000).await?;
                pending += n;
                if n < 1000 {
                    break;
                }
            }
            let orgs = match org {
                Some(id) => {
                    vec![OrgDirectory::get(&store, id).await?.with_context(|| format!("no organization {id}"))?]
                }
                None => store.organizations(i64::MAX).await?,
            };
            let mut differences = Vec::new();
            for (done, o) in orgs.iter().enumerate() {
                let counted = metering.used(o.id, o.period_start).await?;
                let ledger = store.ledger_total(o.id, o.period_start).await?;
                if counted != ledger {
                    let repaired =
                        if repair { Some(metering.rebuild(o.id, o.period_start, &o.plan).await?.0) } else { None };
                    differences.push(json!({
                        "organization_id": o.id, "period_start": o.period_start,
                        "counter": counted, "ledger": ledger, "repaired_to": repaired,
                    }));
                }
                progress(&format!("checked {}/{} organizations, {} differ", done + 1, orgs.len(), differences.len()));
            }
            end_progress();
            let v = json!({ "checked": orgs.len(), "counter": metering.backend(), "pending_counted": pending,
                            "differences": differences });
            print(j, &v, || {
                let mut s = format!(
                    "{} organizations checked ({} counter, {} pending calls counted first): {} differ from the ledger",
                    orgs.len(),
                    metering.backend(),
                    pending,
                    differences.len()
                );
                for d in &differences {
                    s.push_str(&format!(
                        "\n  {} period {}: counter {} s, ledger {} s{}",
                        d["organization_id"].as_str().unwrap_or(""),
                        d["period_start"].as_str().unwrap_or(""),
                        d["counter"],
                        d["ledger"],
                        if d["repaired_to"].is_null() {
                            String::new()
                        } else {
                            format!(", repaired to {}", d["repaired_to"])
                        }
                    ));
                }
                s
            });
            if !differences.is_empty() && !repair {
                std::process::exit(1);
            }
        }
        Command::Search(SearchCommand::Index) => {
            let r = mover(&settings).await?.build_search_index().await?;
            let v = json!(r);
            print(j, &v, || {
                format!(
                    "search index: {} partitions, built on {} ({}); {}",
                    r.partitions,
                    r.built.len(),
                    if r.built.is_empty() { "none needed it".to_owned() } else { r.built.join(", ") },
                    if r.valid { "valid, in use" } else { "not valid yet" }
                )
            });
        }
        Command::Transcripts(TranscriptsCommand::Move { to, org, before, batch }) => {
            let before = before.as_deref().map(parse_before).transpose()?;
            move_transcripts(&settings, to, org.map(OrgId), before, batch, j).await?;
        }
        Command::Phase(PhaseCommand::Plan { phase }) => {
            let plan = mover(&settings).await?.plan(phase).await?;
            print(j, &plan, || plan_text(&plan));
        }
        Command::Phase(PhaseCommand::Apply { phase: _, step, rollback }) => {
            let report = mover(&settings).await?.apply(step, rollback).await?;
            end_progress();
            let v = json!(report);
            print(j, &v, || {
                let mut s = format!(
                    "{} {}: {} -> {}{} in {} ms",
                    step.name(),
                    if rollback { "rolled back" } else { "applied" },
                    report.from,
                    report.to,
                    if report.already { " (already there; checked again)" } else { "" },
                    report.took_ms
                );
                for stage in &report.stages {
                    s.push_str(&format!("\n  {} ({} ms)", stage.stage, stage.took_ms));
                }
                s.push_str(&format!("\n  check: {}", report.verified));
                s
            });
        }
        Command::Advise => {
            let store = connect(&settings).await?;
            let clients = callplane_server::app::Clients::connect(&settings, &store).await?;
            let routes = clients.routes(&settings).await?;
            let advisor =
                callplane_server::advisor::Advisor::new(&settings, store, clients.memory_probe(&routes), None, routes);
            let advice = callplane_api::advice::AdviceSource::advice(&advisor).await?;
            let v = json!(advice);
            print(j, &v, || advice_text(&advice));
        }
        Command::Usage(UsageCommand::RebuildDaily { org }) => {
            let store = connect(&settings).await?;
            let orgs = match org {
                Some(id) => {
                    vec![OrgDirectory::get(&store, id).await?.with_context(|| format!("no organization {id}"))?]
                }
                None => store.organizations(i64::MAX).await?,
            };
            let mut days = 0;
            for (done, o) in orgs.iter().enumerate() {
                days += store.rebuild_daily_usage(o.id).await?;
                progress(&format!("rebuilt {}/{} organizations ({days} rows)", done + 1, orgs.len()));
            }
            end_progress();
            let v = json!({ "organizations": orgs.len(), "rows": days });
            print(j, &v, || {
                format!(
                    "daily usage rebuilt from the ledger: {} organizations, {days} rows (a day is up to 8 rows)",
                    orgs.len()
                )
            });
        }
        Command::Reconcile(ReconcileCommand::Calls { since, until, org }) => {
            let store = connect(&settings).await?;
            let Some(reconciler) = App::reconciler(&settings, &store).await? else {
                bail!("vapi.api_key is not set (CALLPLANE__VAPI__API_KEY): reconciling needs VAPI's private API key");
            };
            let scope = callplane_workflow::reconcile::ReconcileScope { org, since, until };
            let report = reconciler
                .run(&scope, Utc::now(), |p| {
                    let r = p.report;
                    progress(&format!(
                        "examined {} ({} finished, {} marked, {} still open, {} left for review, {} failed)",
                        r.examined, r.finished, r.marked, r.still_open, r.left_for_review, r.failed
                    ));
                })
                .await?;
            end_progress();
            let v = serde_json::to_value(&report)?;
            print(j, &v, || {
                let mut s = format!(
                    "{} examined: {} finished and billed, {} marked ended unbilled, {} still open, \
                     {} left for review (no duration anywhere), {} failed",
                    report.examined,
                    report.finished,
                    report.marked,
                    report.still_open,
                    report.left_for_review,
                    report.failed
                );
                if let Some(why) = &report.stopped {
                    s.push_str(&format!("\nstopped early: {why}"));
                }
                s
            });
            if report.failed > 0 {
                std::process::exit(1);
            }
        }
        Command::Events(cmd) => {
            let store = connect(&settings).await?;
            match cmd {
                EventsCommand::List { filter, all } => {
                    let letters = store.dead_letters(&filter.filter(all)).await?;
                    let v = serde_json::to_value(&letters)?;
                    print(j, &v, || {
                        letters
                            .iter()
                            .map(|d| {
                                format!(
                                    "{} {} {} call={} {}: {}",
                                    d.id,
                                    d.received_at,
                                    d.message_type.as_deref().unwrap_or("-"),
                                    d.call_id.as_deref().unwrap_or("-"),
                                    d.error_code,
                                    d.error
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                EventsCommand::Replay { filter } => {
                    let filter = filter.filter(false);
                    // Of the letters taken on, those still open afterwards failed again; the
                    // store has the reason.
                    let taken: HashSet<i64> = store.dead_letters(&filter).await?.iter().map(|d| d.id).collect();
                    let dead_letters = App::pipeline(&settings, &store, "cli").await?.dead_letters;
                    let report = dead_letters
                        .replay(&filter, &store, |r| {
                            progress(&format!("replayed {} ({} ok, {} failed)", r.attempted, r.succeeded, r.failed));
                        })
                        .await?;
                    end_progress();
                    let mut failures = store.dead_letters(&filter).await?;
                    failures.retain(|d| taken.contains(&d.id));
                    let mut v = serde_json::to_value(&report)?;
                    v["failures"] = failures
                        .iter()
                        .map(|d| json!({ "id": d.id, "code": d.error_code, "message": d.error }))
                        .collect();
                    print(j, &v, || {
                        let mut out = format!(
                            "{} replayed: {} succeeded, {} failed",
                            report.attempted, report.succeeded, report.failed
                        );
                        for d in &failures {
                            out.push_str(&format!("\n  dead letter {}: {}: {}", d.id, d.error_code, d.error));
                        }
                        out
                    });
                    if report.failed > 0 {
                        std::process::exit(1);
                    }
                }
            }
        }
    }
    Ok(())
}

async fn inbox(cmd: InboxCommand, settings: Settings, j: bool) -> anyhow::Result<()> {
    let inbox = App::open_inbox(&settings)?;
    match cmd {
        InboxCommand::Status { limit } => {
            let events = inbox.list(limit)?;
            let oldest = inbox.oldest();
            let v = json!({
                "dir": settings.inbox.dir,
                "depth": inbox.depth(),
                "bytes": inbox.bytes(),
                "oldest_received_at": oldest,
                "events": events.iter().map(|e| json!({
                    "id": e.id, "received_at": e.webhook.received_at, "org": e.webhook.org,
                    "path_org": e.webhook.path_org, "bytes": e.webhook.body.len(), "attempts": e.attempts,
                    "next_attempt_at": e.next_attempt_at, "last_error": e.last_error,
                })).collect::<Vec<_>>(),
            });
            print(j, &v, || {
                let mut out = format!(
                    "{}: {} events, {} bytes{}",
                    settings.inbox.dir.display(),
                    inbox.depth(),
                    inbox.bytes(),
                    oldest.map(|t| format!(", oldest received {t}")).unwrap_or_default()
                );
                for e in &events {
                    out.push_str(&format!(
                        "\n{} {} {} attempts{}",
                        e.id,
                        e.webhook.received_at,
                        e.attempts,
                        e.last_error.as_deref().map(|x| format!(": {x}")).unwrap_or_default()
                    ));
                }
                out
            });
        }
        InboxCommand::Drain { patience_secs } => {
            let store = connect(&settings).await?;
            let pipeline = App::pipeline(&settings, &store, "cli").await?.pipeline;
            let intake = callplane_workflow::LocalIntake::new(
                inbox,
                pipeline,
                std::sync::Arc::new(store),
                settings.intake_settings(),
            );
            let report = intake
                .drain_all(Duration::from_secs(patience_secs), |r| {
                    progress(&format!("processed {}, dead-lettered {}, left {}", r.processed, r.dead_lettered, r.left));
                })
                .await;
            end_progress();
            let v = serde_json::to_value(&report)?;
            print(j, &v, || {
                format!("processed {}, dead-lettered {}, {} left", report.processed, report.dead_lettered, report.left)
            });
            if report.left > 0 {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    settings.validate_for_serving()?;
    check_database(&settings).await?;
    let app = App::build(settings).await?;
    if !app.store.migrations_current().await? {
        bail!("the database is not migrated; run `callplane migrate` first");
    }
    let r = app.store.ensure_partitions(Utc::now(), app.settings.partitions.months_ahead).await?;
    info!(covered_through = ?r.covered_through, "partitions ready");
    app.spawn_maintenance();
    app.spawn_reconciler()?;
    let listener = TcpListener::bind(&app.settings.server.addr)
        .await
        .with_context(|| format!("binding server.addr {}", app.settings.server.addr))?;
    info!(addr = %listener.local_addr()?, "callplane serving");
    let inbox = app.intake.inbox().clone();
    app.serve(listener, async {
        shutdown_signal().await;
        info!("shutting down");
    })
    .await?;
    // What was drained stays drained across the restart.
    inbox.flush().await.context("flushing the inbox")
}

#[cfg(feature = "temporal")]
async fn worker(settings: Settings) -> anyhow::Result<()> {
    check_database(&settings).await?;
    let store = connect(&settings).await?;
    if !store.migrations_current().await? {
        bail!("the database is not migrated; run `callplane migrate` first");
    }
    // The worker's own process: its pipeline is Temporal's, whatever `serve` is configured with.
    let mut settings = settings;
    settings.backends.event_pipeline = callplane_server::settings::PipelineBackend::Temporal;
    let pipeline = App::pipeline(&settings, &store, "worker").await?;
    let worker = pipeline.spawn_worker()?;
    // It counts usage: it follows the backend routes a phase move changes, as `serve` does.
    let follower = pipeline.follower.clone();
    follower.report_pipeline(pipeline.routed.clone(), || "running");
    info!(address = %settings.temporal.address, namespace = %settings.temporal.namespace,
          task_queue = %settings.temporal.task_queue, "callplane worker running; Ctrl-C stops it");
    // Its own counters, where a scraper finds them: they live in this process, not in `serve`'s.
    if !settings.temporal.worker_metrics_addr.is_empty() {
        let addr = &settings.temporal.worker_metrics_addr;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding temporal.worker_metrics_addr {addr} (empty for none)"))?;
        info!(addr = %listener.local_addr()?, "the worker's /metrics and /healthz");
        let temporal = pipeline.temporal.clone().context("this worker has no Temporal pipeline")?;
        let router = callplane_api::worker_router(callplane_api::WorkerOps {
            pipeline: std::sync::Arc::new(temporal),
            metrics_token: settings.metrics_token(),
            auth_throttle: std::sync::Arc::new(settings.auth_throttle()),
        });
        let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, service).await {
                tracing::error!(error = %e, "the worker's metrics endpoint stopped");
            }
        });
    }
    // Calls left uncounted (a worker stopped between a ledger row and its count) are counted.
    let metering = pipeline.processor.metering();
    callplane_workflow::counting::spawn_counter_repair(metering, pipeline.processor.bus(), Duration::from_secs(1));
    shutdown_signal().await;
    info!("stopping the worker: the activities in hand finish first");
    worker.stop().await;
    follower.goodbye().await;
    Ok(())
}

#[cfg(not(feature = "temporal"))]
async fn worker(_settings: Settings) -> anyhow::Result<()> {
    bail!("this build has no Temporal worker; build with the `temporal` feature (`--features phase2`)")
}

/// The phase mover, printing progress and stages to stderr.
async fn mover(settings: &Settings) -> anyhow::Result<Mover> {
    let store = connect(settings).await?;
    Mover::new(settings, store, Box::new(progress), Box::new(|line| eprintln!("{line}"))).await
}

/// Ctrl-C or SIGTERM (what process managers send).
/// What a conversion did, for a terminal.
fn convert_text(r: &callplane_storage::ConvertReport) -> String {
    let recopied = r.months.iter().filter(|m| m.recopied).count();
    let copied = format!(
        "{} rows copied{}, {} call keys added; {} months checked (count and checksum), {recopied} copied again",
        r.copied_rows,
        if r.resumed_from_page > 0 { format!(" (resumed at page {})", r.resumed_from_page) } else { String::new() },
        r.call_keys_added,
        r.months.len()
    );
    let done = match r.state.as_str() {
        "swapped" => format!(
            "calls is partitioned by month now: {copied}; the swap held its lock {:.1} ms. The old table is kept as \
             calls_unpartitioned: `--drop-old` drops it",
            r.swap_lock_ms.unwrap_or_default()
        ),
        "synced" => format!("calls holds {}'s rows: {copied}; kept in sync until `--drop-old`", r.source),
        "dropped" if r.copied_rows == 0 => "the conversion was done; what it kept is dropped now".to_owned(),
        "dropped" => format!("calls is converted ({copied}); what it kept is dropped"),
        _ => format!("calls is converted already (from {})", r.source),
    };
    format!("{done} ({} ms)", r.took_ms)
}

/// A phase plan for a terminal.
fn plan_text(plan: &Value) -> String {
    let mut out = format!("to phase {}:\n", plan["phase"]);
    for step in plan["steps"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  [{}] {}{}\n      {}\n",
            step["status"].as_str().unwrap_or(""),
            step["step"].as_str().unwrap_or(""),
            step["what"].as_str().map(|w| format!(": {w}")).unwrap_or_default(),
            step["command"].as_str().unwrap_or("")
        ));
        if let Some(now) = step["now"].as_str() {
            out.push_str(&format!("      now: {now}; target: {}\n", step["target"].as_str().unwrap_or("")));
        }
        for need in step["needs"].as_array().into_iter().flatten() {
            out.push_str(&format!("      needs {}\n", need.as_str().unwrap_or("")));
        }
        if let Some(why) = step["blocked_by"].as_str() {
            out.push_str(&format!("      blocked: {why}\n"));
        }
    }
    let processes = plan["processes"].as_array().map_or(0, Vec::len);
    out.push_str(&format!("\n{processes} callplane processes running against this database"));
    out
}

/// The advice for a terminal: the verdict, each trigger with its evidence, the costs.
fn advice_text(a: &callplane_api::advice::Advice) -> String {
    let mut out = format!("{}\n", a.summary);
    for (from, to) in [(1, 2), (2, 3)] {
        out.push_str(&format!("\nphase {from} -> {to} (last {} days)\n", a.window_days));
        for t in a.triggers.iter().filter(|t| t.phase == to) {
            let mark = match (t.fired, t.measured) {
                (true, _) => "FIRED",
                (false, true) => "ok",
                (false, false) => "n/a",
            };
            out.push_str(&format!("  {mark:<5}  {:<21} {}\n", t.id, t.evidence));
        }
    }
    let components: Vec<String> = a.components.iter().map(|c| format!("{} = {}", c.component, c.backend)).collect();
    out.push_str(&format!("\nnow on phase {}: {}\n", a.current_phase, components.join(", ")));
    let costs: Vec<String> = a
        .costs
        .iter()
        .map(|c| {
            let mark = match (c.current, c.recommended) {
                (true, true) => " (current, recommended)",
                (true, false) => " (current)",
                (false, true) => " (recommended)",
                _ => "",
            };
            format!("phase {} ${:.0}{mark}", c.phase, c.monthly_usd)
        })
        .collect();
    out.push_str(&format!("monthly cost: {}", costs.join(", ")));
    out
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
