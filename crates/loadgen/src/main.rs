//! `callplane-loadgen`: the command line of the traffic simulator, the bulk loader and the
//! benchmark drivers. See the library documentation for what each command does.
//!
//! Connection settings default to the environment variables callplane itself reads
//! (`CALLPLANE__AUTH__ADMIN_TOKEN`, `CALLPLANE__VAPI__HMAC__SECRETS`, `CALLPLANE__VAPI__SECRET`,
//! `CALLPLANE__DATABASE__URL`), so one environment serves both. With `--json` a command prints
//! its summary as one JSON object on stdout; progress always goes to stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use callplane_loadgen::books::{self, CounterStore, RunRecord};
use callplane_loadgen::client::{RetryPolicy, Server, WebhookAuth, wait_ready};
use callplane_loadgen::messages::{CallOwner, CallScript};
use callplane_loadgen::plan::{CallSpec, DurationDist, Lifecycle, PlanMix, TrafficConfig, stream};
use callplane_loadgen::random::item_rng;
use callplane_loadgen::{burst, dashboard, load, probe, realtime, simulate};

#[derive(Parser)]
#[command(name = "callplane-loadgen", version, about = "VAPI traffic simulator and benchmark drivers for callplane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Play VAPI call lifecycles against a running callplane, then check the books.
    Simulate(SimulateArgs),
    /// Open many webhooks at once (assistant requests, end-of-call reports and the messages in
    /// between, of distinct calls), completing every call around them; then check the books.
    Burst(BurstArgs),
    /// Check the books of a run saved with `--run-file`.
    Books(BooksArgs),
    /// Fill a database with synthetic calls and transcripts, COPY-fast.
    Load(LoadArgs),
    /// Time a plain GET at a given concurrency and rate (the latency baseline).
    Probe(ProbeArgs),
    /// Time WebSocket delivery to many subscribers, and the raw NOTIFY baseline.
    Realtime(RealtimeArgs),
    /// Time the dashboard's call list against the same query on an unpartitioned copy.
    Dashboard(DashboardArgs),
    /// Time `GET /v1/calls/{id}` (a call and its whole transcript) for calls with a transcript.
    Details(DashboardArgs),
    /// Open many idle WebSockets over many organizations and read the server's RSS with them
    /// open and after they close.
    RealtimeHold(RealtimeHoldArgs),
    /// Print the webhooks of one simulated call (as the simulator would send them), one JSON
    /// body a line, to see exactly what is sent.
    Sample {
        /// Only messages of this `message.type`, e.g. `end-of-call-report`.
        #[arg(long)]
        kind: Option<String>,
        /// Call duration in seconds (0: a call nobody answered).
        #[arg(long, default_value_t = 74.033)]
        duration: f64,
        #[arg(long, default_value_t = 10)]
        turns: u32,
        #[arg(long, default_value_t = 1)]
        tool_calls: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Wait until a URL answers 200.
    Wait {
        url: String,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

/// Where the server counts usage, for the books.
#[derive(Args)]
struct CounterArgs {
    /// Where the server counts usage (its `backends.usage_counter`): in Postgres the books
    /// compare `organizations.seconds_used`, in Redis they read the counter through the API.
    #[arg(long, env = "CALLPLANE__BACKENDS__USAGE_COUNTER", value_enum, default_value_t = CounterStore::Postgres)]
    usage_counter: CounterStore,
}

/// Where the server is and how to authenticate to it.
#[derive(Args, Clone)]
struct ServerArgs {
    /// callplane's base URL.
    #[arg(long, env = "LOADGEN_BASE_URL", default_value = "http://127.0.0.1:8080")]
    base_url: String,
    /// The admin token the server was started with.
    #[arg(long, env = "CALLPLANE__AUTH__ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Sign webhooks with this HMAC secret (the first of a comma-separated list).
    #[arg(long, env = "CALLPLANE__VAPI__HMAC__SECRETS", hide_env_values = true)]
    hmac_secret: Option<String>,
    /// Or send this shared secret as `Authorization: Bearer`.
    #[arg(long, env = "CALLPLANE__VAPI__SECRET", hide_env_values = true)]
    vapi_secret: Option<String>,
    /// Give up on a request after this many seconds (counted as a timeout).
    #[arg(long, default_value_t = 60.0)]
    request_timeout_secs: f64,
}

impl ServerArgs {
    fn server(&self) -> Result<Server> {
        let hmac = self.hmac_secret.as_deref().and_then(|s| s.split(',').map(str::trim).find(|s| !s.is_empty()));
        let auth = match (hmac, self.vapi_secret.as_deref().filter(|s| !s.is_empty())) {
            (Some(secret), _) => WebhookAuth::Hmac(secret.to_owned()),
            (None, Some(secret)) => WebhookAuth::Bearer(secret.to_owned()),
            (None, None) => bail!("no webhook credentials: give --hmac-secret or --vapi-secret"),
        };
        let timeout = Duration::from_secs_f64(self.request_timeout_secs.max(0.1));
        Server::with_timeout(&self.base_url, self.admin_token.clone().filter(|t| !t.is_empty()), auth, timeout)
    }
}

/// How deliveries are retried and where the run is saved.
#[derive(Args, Clone)]
struct DeliveryArgs {
    /// Send a delivery again after a refused or reset connection, or a 503 (after its
    /// Retry-After), for up to this many seconds; 0 sends each delivery once.
    #[arg(long, default_value_t = 0.0)]
    retry_secs: f64,
    /// Save the organizations and calls sent, for `callplane-loadgen books --run-file`.
    #[arg(long)]
    run_file: Option<PathBuf>,
}

impl DeliveryArgs {
    fn retry(&self) -> RetryPolicy {
        RetryPolicy::within(Duration::from_secs_f64(self.retry_secs.max(0.0)))
    }
}

#[derive(Args)]
struct SimulateArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Postgres, to read the books from (without it only `GET /v1/usage` is compared).
    #[arg(long, env = "CALLPLANE__DATABASE__URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    counter: CounterArgs,
    /// Organizations to create.
    #[arg(long, default_value_t = 10)]
    orgs: usize,
    /// Plan mix, as relative weights.
    #[arg(long, default_value = "starter=0.5,pro=0.35,business=0.15")]
    plans: PlanMix,
    /// Calls to simulate.
    #[arg(long, default_value_t = 100)]
    calls: usize,
    /// Most calls in flight at once.
    #[arg(long, default_value_t = 50)]
    max_concurrent: usize,
    /// Calls started per second (0: as fast as the concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Mean call duration in seconds (log-normal).
    #[arg(long, default_value_t = 180.0)]
    duration_mean: f64,
    /// Shape of the duration distribution (0: every call lasts the mean).
    #[arg(long, default_value_t = 0.8)]
    duration_sigma: f64,
    #[arg(long, default_value_t = 5.0)]
    duration_min: f64,
    #[arg(long, default_value_t = 1800.0)]
    duration_max: f64,
    /// Most assistant and caller turns in a call.
    #[arg(long, default_value_t = 60)]
    max_turns: u32,
    /// Share of calls on one hot organization (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    skew: f64,
    /// Share of calls that are never answered.
    #[arg(long, default_value_t = 0.05)]
    unanswered_rate: f64,
    /// Probability that a delivery is sent twice.
    #[arg(long, default_value_t = 0.02)]
    duplicate_rate: f64,
    /// Probability that a delivery swaps places with the next.
    #[arg(long, default_value_t = 0.05)]
    out_of_order_rate: f64,
    /// `full` lifecycles, or `report-only` (just the end-of-call report).
    #[arg(long, default_value = "full")]
    lifecycle: Lifecycle,
    /// Mean pause between a call's deliveries, in milliseconds.
    #[arg(long, default_value_t = 0)]
    event_gap_ms: u64,
    /// Stop starting calls after this many seconds (calls in flight finish).
    #[arg(long)]
    time_limit_secs: Option<f64>,
    /// Record latencies only while at least this many calls are in flight.
    #[arg(long)]
    steady_in_flight: Option<usize>,
    /// Also GET this path on the server (for example `/healthz`) while the calls play, timed
    /// in the same steady window: a request that does no work, under the same load.
    #[arg(long)]
    probe_path: Option<String>,
    /// The probe's requests per second.
    #[arg(long, default_value_t = 50.0)]
    probe_rate: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the books check.
    #[arg(long)]
    no_check: bool,
    #[command(flatten)]
    delivery: DeliveryArgs,
    /// A word for the organizations' names.
    #[arg(long, default_value = "loadgen")]
    label: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BurstArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Postgres, to read the books from (without it only `GET /v1/usage` is compared).
    #[arg(long, env = "CALLPLANE__DATABASE__URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    counter: CounterArgs,
    /// Requests opened at once.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    #[arg(long, default_value_t = 50)]
    orgs: usize,
    #[arg(long, default_value = "starter=0.5,pro=0.35,business=0.15")]
    plans: PlanMix,
    /// Calls played at once before and after the burst.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Mean call duration in seconds (log-normal); short calls keep the lifecycles around the
    /// burst short.
    #[arg(long, default_value_t = 40.0)]
    duration_mean: f64,
    #[arg(long, default_value_t = 8)]
    max_turns: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    no_check: bool,
    #[command(flatten)]
    delivery: DeliveryArgs,
    #[arg(long, default_value = "burst")]
    label: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BooksArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[arg(long, env = "CALLPLANE__DATABASE__URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    counter: CounterArgs,
    /// The file a run saved with `--run-file`.
    #[arg(long)]
    run_file: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LoadArgs {
    #[arg(long, env = "CALLPLANE__DATABASE__URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, default_value_t = 100_000)]
    calls: u64,
    #[arg(long, default_value_t = 2_000)]
    orgs: u64,
    /// Months of history, ending now.
    #[arg(long, default_value_t = 24)]
    months: u32,
    /// Share of calls stored with a transcript.
    #[arg(long, default_value_t = 1.0)]
    transcript_share: f64,
    #[arg(long, default_value_t = 8)]
    max_turns: u32,
    /// Rows per COPY statement.
    #[arg(long, default_value_t = 500_000)]
    batch: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ProbeArgs {
    /// The URL to GET.
    #[arg(long)]
    url: String,
    /// A Bearer token to send.
    #[arg(long)]
    bearer: Option<String>,
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Requests per second across all clients (0: back to back).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RealtimeArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Postgres, for the raw LISTEN/NOTIFY baseline (skipped without it).
    #[arg(long, env = "CALLPLANE__DATABASE__URL", hide_env_values = true)]
    database_url: Option<String>,
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Webhooks to send, each a new call.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// Webhooks per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RealtimeHoldArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[arg(long, default_value_t = 2000)]
    sockets: usize,
    /// Organizations to spread them over (the server caps sockets per key and per organization).
    #[arg(long, default_value_t = 100)]
    orgs: usize,
    /// The server's process id, for its RSS (same machine only).
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 12)]
    settle_secs: u64,
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DashboardArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[arg(long, env = "CALLPLANE__DATABASE__URL", hide_env_values = true)]
    database_url: String,
    /// Organizations to sample.
    #[arg(long, default_value_t = 20)]
    orgs: usize,
    /// Requests per query and side.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Sample organizations whose name starts with this (the bulk loader's names start `bulk `).
    #[arg(long, default_value = "bulk ")]
    org_prefix: String,
    /// Rebuild `calls_flat` even when it is up to date.
    #[arg(long)]
    rebuild_flat: bool,
    /// Only build `calls_flat` (unless it is up to date), and time nothing.
    #[arg(long)]
    prepare_only: bool,
    #[arg(long)]
    json: bool,
}

impl DashboardArgs {
    fn config(self) -> dashboard::DashboardConfig {
        dashboard::DashboardConfig {
            database_url: self.database_url,
            orgs: self.orgs,
            requests: self.requests,
            concurrency: self.concurrency,
            org_prefix: self.org_prefix,
            rebuild_flat: self.rebuild_flat,
            quiet: false,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("loadgen: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints the summary as JSON when asked.
fn emit<T: Serialize>(json: bool, summary: &T) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary).context("serializing the summary")?);
    }
    Ok(())
}

/// Runs a command; `Ok(false)` means it ran but what it measured failed its checks.
async fn run(command: Command) -> Result<bool> {
    match command {
        Command::Simulate(args) => {
            let traffic = TrafficConfig {
                orgs: args.orgs,
                plans: args.plans,
                calls: args.calls,
                durations: DurationDist {
                    mean_seconds: args.duration_mean,
                    sigma: args.duration_sigma,
                    min_seconds: args.duration_min,
                    max_seconds: args.duration_max,
                },
                skew: args.skew.clamp(0.0, 1.0),
                unanswered_rate: args.unanswered_rate.clamp(0.0, 1.0),
                duplicate_rate: args.duplicate_rate.clamp(0.0, 1.0),
                out_of_order_rate: args.out_of_order_rate.clamp(0.0, 1.0),
                max_turns: args.max_turns,
                lifecycle: args.lifecycle,
                seed: args.seed,
            };
            let config = simulate::RunConfig {
                traffic,
                rate: args.rate,
                max_concurrent: args.max_concurrent,
                event_gap: Duration::from_millis(args.event_gap_ms),
                time_limit: args.time_limit_secs.map(Duration::from_secs_f64),
                steady_in_flight: args.steady_in_flight,
                probe: args.probe_path.map(|path| (path, args.probe_rate)),
                database_url: args.database_url,
                usage_counter: args.counter.usage_counter,
                check_books: !args.no_check,
                retry: args.delivery.retry(),
                run_file: args.delivery.run_file.clone(),
                label: args.label,
                quiet: false,
            };
            let summary = simulate::run(args.server.server()?, config).await?;
            emit(args.json, &summary)?;
            let books_ok = summary.books.as_ref().is_none_or(|b| b.balanced());
            Ok(summary.errors == 0 && books_ok)
        }
        Command::Burst(args) => {
            let traffic = TrafficConfig {
                orgs: args.orgs,
                plans: args.plans,
                durations: DurationDist { mean_seconds: args.duration_mean, ..DurationDist::default() },
                max_turns: args.max_turns,
                seed: args.seed,
                ..TrafficConfig::default()
            };
            let summary = burst::run(
                args.server.server()?,
                burst::BurstConfig {
                    traffic,
                    requests: args.requests,
                    concurrency: args.concurrency,
                    retry: args.delivery.retry(),
                    database_url: args.database_url,
                    usage_counter: args.counter.usage_counter,
                    check_books: !args.no_check,
                    run_file: args.delivery.run_file.clone(),
                    label: args.label,
                    quiet: false,
                },
            )
            .await?;
            emit(args.json, &summary)?;
            let books_ok = summary.books.as_ref().is_none_or(|b| b.balanced());
            Ok(summary.errors == 0 && books_ok)
        }
        Command::Books(args) => {
            let record = RunRecord::load(&args.run_file)?;
            let books = books::check_run(
                &args.server.server()?,
                &record,
                args.database_url.as_deref(),
                args.counter.usage_counter,
            )
            .await?;
            eprintln!("loadgen: {}", books.line());
            for problem in &books.problems {
                eprintln!("loadgen:   {problem}");
            }
            emit(args.json, &books)?;
            Ok(books.balanced())
        }
        Command::Load(args) => {
            let summary = load::run(load::LoadConfig {
                database_url: args.database_url,
                calls: args.calls,
                orgs: args.orgs,
                months: args.months,
                transcript_share: args.transcript_share.clamp(0.0, 1.0),
                max_turns: args.max_turns,
                batch: args.batch,
                seed: args.seed,
                quiet: false,
            })
            .await?;
            emit(args.json, &summary)?;
            Ok(true)
        }
        Command::Probe(args) => {
            let summary = probe::run(probe::ProbeConfig {
                url: args.url,
                bearer: args.bearer,
                concurrency: args.concurrency,
                rate: args.rate,
                duration: Duration::from_secs_f64(args.duration_secs.max(0.1)),
                quiet: false,
            })
            .await?;
            emit(args.json, &summary)?;
            Ok(summary.errors == 0 && summary.latency.count > 0)
        }
        Command::Realtime(args) => {
            let summary = realtime::run(
                args.server.server()?,
                realtime::RealtimeConfig {
                    subscribers: args.subscribers,
                    events: args.events,
                    rate: args.rate,
                    database_url: args.database_url,
                    timeout: Duration::from_secs(args.timeout_secs.max(1)),
                    quiet: false,
                },
            )
            .await?;
            emit(args.json, &summary)?;
            let complete = |d: &realtime::Deliveries| d.delivered == d.expected;
            Ok(complete(&summary.callplane) && summary.baseline.as_ref().is_none_or(complete))
        }
        Command::RealtimeHold(args) => {
            let summary = realtime::hold(
                args.server.server()?,
                realtime::HoldConfig {
                    sockets: args.sockets,
                    orgs: args.orgs,
                    server_pid: args.server_pid,
                    settle: Duration::from_secs(args.settle_secs),
                    timeout: Duration::from_secs(args.timeout_secs.max(1)),
                    quiet: false,
                },
            )
            .await?;
            emit(args.json, &summary)?;
            Ok(summary.failed == 0 && summary.refused == 0 && summary.opened == summary.sockets)
        }
        Command::Dashboard(args) if args.prepare_only => {
            let json = args.json;
            let flat_build_seconds = dashboard::prepare(&args.config()).await?;
            emit(json, &serde_json::json!({ "flat_build_seconds": flat_build_seconds }))?;
            Ok(true)
        }
        Command::Dashboard(args) => {
            let json = args.json;
            let summary = dashboard::run(args.server.server()?, args.config()).await?;
            emit(json, &summary)?;
            Ok(summary.errors == 0)
        }
        Command::Details(args) => {
            let json = args.json;
            let summary = dashboard::details(args.server.server()?, args.config()).await?;
            emit(json, &summary)?;
            Ok(summary.errors == 0)
        }
        Command::Sample { kind, duration, turns, tool_calls, seed } => {
            let answered = duration > 0.0;
            let spec = CallSpec {
                index: 0,
                org: 0,
                duration_ms: (duration.max(0.0) * 1000.0).round() as u64,
                ended_reason: if answered { "customer-ended-call" } else { "customer-did-not-answer" },
                turns: if answered { turns } else { 0 },
                tool_calls,
                lifecycle: Lifecycle::Full,
            };
            let owner = CallOwner {
                org_id: uuid::Uuid::nil().to_string(),
                org_name: "Sample Plumbing".into(),
                assistant_id: "asst-sample".into(),
            };
            let mut rng = item_rng(seed, stream::SCRIPT, 0);
            let script = CallScript::new(&spec, uuid::Uuid::now_v7().to_string(), owner, chrono::Utc::now(), &mut rng);
            for &event in &script.events {
                if kind.as_deref().is_none_or(|k| k == event.kind()) {
                    println!("{}", String::from_utf8_lossy(&script.render(event)?));
                }
            }
            Ok(true)
        }
        Command::Wait { url, timeout_secs } => {
            wait_ready(&url, Duration::from_secs(timeout_secs)).await?;
            Ok(true)
        }
    }
}
