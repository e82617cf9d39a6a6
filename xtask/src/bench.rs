//! `cargo xtask bench [--quick]`: callplane's benchmarks, each next to the raw limit of the same
//! machine measured in the same run on the same services.
//!
//! The xtask starts its own PostgreSQL cluster (`target/xtask/pg-bench`), a throwaway
//! `redis-server` (`target/xtask/redis-bench`, for benchmarks 2 and 3) and a `callplane serve`
//! built with every phase's backends (`--features phase3`), then drives them with
//! `callplane-loadgen`, `pgbench` and `redis-benchmark`. The server counts usage and serves
//! function data from Postgres; the benchmarks that measure the Redis backends restart it on
//! them and back:
//!
//! 1. Ingest: end-of-call reports per second through the whole HTTP pipeline, against pgbench
//!    running the same writes (call key, partitioned call row, ledger row, counter) as one
//!    transaction.
//! 2. Agent latency: `assistant-request` and `tool-calls` percentiles with many calls in flight,
//!    against `GET /healthz` on the same server at the same concurrency and rate; once on the
//!    Postgres backends, once on the Redis ones.
//! 3. Hot organization: all traffic on one organization, with the Postgres counter and with the
//!    Redis counter, against uniform ingest (benchmark 1's simulation), pgbench's hot-row update
//!    and `redis-benchmark`'s INCR.
//! 4. Dashboard: `GET /v1/calls` (first page, and `status=ended`) on a bulk-loaded history,
//!    against the same query on an unpartitioned copy of the table (full mode: 1M and 10M calls).
//! 5. Real time: WebSocket delivery to many subscribers, against NOTIFY → LISTEN → plain
//!    WebSockets.
//! 6. Memory: the server's resident set idle and at its peak during benchmark 1.
//! 7. Pipeline: benchmark 1's reports through the Temporal pipeline against the inline one, on
//!    a Temporal development server (`target/xtask/temporal-bench`): reports accepted per
//!    second, reports per second until the last ledger row, and each report's time from
//!    arrival to its ledger row's commit (the server's `callplane_report_to_ledger_seconds`).
//!    Each also against Temporal's own limit on the same server: `callplane-temporal-baseline`
//!    runs empty workflows of the same shape (signal-with-start carrying a report's body, three
//!    local activities that do nothing) from as many clients, with no database and no HTTP.
//! 8. Storage (phase 3): on a bulk-loaded database of its own (every call with a transcript),
//!    the database's size before and after `callplane transcripts move --to object-store` and
//!    after `callplane partitions archive` of the months older than six, both into an `s3s-fs`
//!    server; and `GET /v1/calls/{id}` with the transcript in the store against the same calls
//!    with it in Postgres.
//!
//! Every simulation checks its books (each call recorded once, every second billed once) and
//! the run fails if they do not balance. Results go to `target/bench/results.json` and a
//! markdown table: `docs/BENCHMARKS.md` in full mode, `target/bench/results.md` in quick mode.
//! `--quick` runs everything small (a dev build, well under three minutes on two cores) and
//! asserts only that each benchmark ran and the books balanced, never a timing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::http;
use crate::pg;
use crate::redis::{self, Durability, Redis};
use crate::stack::Binaries;
use crate::stack::{
    self, CpuSampler, CpuSeconds, DATABASE, Loadgen, Postgres, RssSampler, RunOptions, ServerProcess, ServerSpec,
    rss_kb, run_with_timeout, utc_now,
};
use crate::temporal::Temporal;
use crate::util::{self, Report, describe};

/// Where the generated results go in `docs/BENCHMARKS.md`.
const MARKERS: (&str, &str) = ("<!-- bench:results:start -->", "<!-- bench:results:end -->");

/// The benchmarks, by the names `--only` takes.
const ALL: &[&str] = &["ingest", "hot", "agent", "realtime", "dashboard", "memory", "pipeline", "storage", "replica"];

/// Benchmark 8's own database, in the same cluster.
const STORAGE_DATABASE: &str = "callplane_storage";

/// The benchmarks that run the Temporal pipeline (and need a Temporal server).
const ON_TEMPORAL: &[&str] = &["pipeline"];
const PIPELINE_SETTING: &str = "CALLPLANE__BACKENDS__EVENT_PIPELINE";
const TEMPORAL_ADDRESS_SETTING: &str = "CALLPLANE__TEMPORAL__ADDRESS";

/// The benchmarks that measure phase 2's Redis backends too (and need a `redis-server`).
const ON_REDIS: &[&str] = &["hot", "agent"];

/// The server settings that phase 2 moves to Redis, and the Redis it uses.
const BACKEND_SETTINGS: [&str; 2] = ["CALLPLANE__BACKENDS__USAGE_COUNTER", "CALLPLANE__BACKENDS__FUNCTION_DATA"];
const REDIS_URL_SETTING: &str = "CALLPLANE__REDIS__URL";

/// Requests per second of the `/healthz` probe the agent simulation sends meanwhile (a second
/// baseline, under the same load; small beside the simulation's ~280 webhooks a second).
const LOADED_PROBE_RATE: u32 = 20;

/// Benchmark 3's raw limit of the Redis counter: `redis-benchmark`'s INCR on the same Redis.
const INCR_ARGS: &[&str] = &["-t", "incr", "-n", "100000", "-c", "50", "-q", "--csv"];

const USAGE: &str = "\
Usage: cargo xtask bench [--quick] [--release] [--only NAME,...] [--profile]

  --quick      small sizes, a dev build; checks that every benchmark runs and the books balance
  --release    build the release profile in quick mode too (full mode always does)
  --only       run some benchmarks: ingest, hot, agent, realtime, dashboard, memory, pipeline,
               storage
  --profile    sample the whole machine with `perf` while callplane is measured (a release build
               with frame pointers in target/profiling); writes target/bench/profile-NAME.md
               (CPU by process and by part of callplane's work) and .folded (flame graph input)

CALLPLANE_BIN=/path/to/callplane benchmarks that binary instead of building callplane-server
(built with `--features phase3`: benchmarks 2 and 3 also run it on Redis, 8 on object storage).
";

/// Command-line options.
type Options = RunOptions;

/// How big each benchmark is.
struct Sizes {
    /// Concurrent HTTP clients (and pgbench clients) for the ingest benchmarks.
    ingest_clients: usize,
    ingest_orgs: usize,
    ingest_seconds: u64,
    /// Calls in flight for the agent-latency benchmark, and how many calls in all.
    agent_in_flight: usize,
    agent_calls: usize,
    agent_gap_ms: u64,
    agent_duration_mean: u64,
    probe_seconds: u64,
    realtime_subscribers: Vec<usize>,
    realtime_events: usize,
    /// Calls to add before each dashboard measurement (cumulative sizes 1M, 10M in full mode),
    /// with organizations in proportion.
    dashboard_loads: Vec<(u64, u64)>,
    dashboard_months: u32,
    dashboard_transcript_share: f64,
    dashboard_requests: usize,
    /// Benchmark 8: calls loaded (each with a transcript) over 12 months, organizations, and
    /// `GET /v1/calls/{id}` requests per backend.
    storage_calls: u64,
    storage_orgs: u64,
    storage_requests: usize,
    /// Time limits for one loadgen invocation.
    short_timeout: Duration,
    long_timeout: Duration,
    settings: &'static [&'static str],
}

impl Sizes {
    fn quick() -> Self {
        Self {
            ingest_clients: 8,
            ingest_orgs: 10,
            ingest_seconds: 5,
            agent_in_flight: 40,
            agent_calls: 100,
            agent_gap_ms: 250,
            agent_duration_mean: 60,
            probe_seconds: 4,
            realtime_subscribers: vec![20],
            realtime_events: 30,
            dashboard_loads: vec![(20_000, 200)],
            dashboard_months: 12,
            dashboard_transcript_share: 1.0,
            dashboard_requests: 100,
            storage_calls: 3_000,
            storage_orgs: 10,
            storage_requests: 100,
            short_timeout: Duration::from_secs(120),
            long_timeout: Duration::from_secs(300),
            // Speed over durability: nothing timed is asserted.
            settings: &[
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
                "max_connections=200",
                "shared_buffers=256MB",
            ],
        }
    }

    fn full() -> Self {
        Self {
            ingest_clients: 16,
            ingest_orgs: 100,
            ingest_seconds: 30,
            agent_in_flight: 1000,
            agent_calls: 2500,
            agent_gap_ms: 3000,
            agent_duration_mean: 90,
            probe_seconds: 20,
            realtime_subscribers: vec![100, 1000, 5000],
            realtime_events: 60,
            dashboard_loads: vec![(1_000_000, 2_000), (9_000_000, 18_000)],
            dashboard_months: 24,
            dashboard_transcript_share: 0.11,
            dashboard_requests: 500,
            storage_calls: 200_000,
            storage_orgs: 100,
            storage_requests: 1000,
            short_timeout: Duration::from_secs(900),
            long_timeout: Duration::from_secs(3600),
            // Production-like durability: every commit is flushed.
            settings: &[
                "max_connections=300",
                "shared_buffers=1GB",
                "max_wal_size=8GB",
                "checkpoint_timeout=15min",
                "effective_cache_size=8GB",
            ],
        }
    }
}

/// One line of the results table. `ratio` is callplane / baseline: for a throughput, the share
/// of the raw limit callplane reaches; for a latency, how many times the raw time it takes.
#[derive(Clone, Debug)]
struct Row {
    benchmark: String,
    metric: String,
    unit: &'static str,
    callplane: f64,
    baseline: Option<f64>,
    baseline_is: String,
    note: String,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.baseline.filter(|b| *b > 0.0).map(|b| self.callplane / b)
    }

    fn to_json(&self) -> Value {
        json!({
            "benchmark": self.benchmark, "metric": self.metric, "unit": self.unit,
            "callplane": self.callplane, "baseline": self.baseline, "ratio": self.ratio(),
            "baseline_is": self.baseline_is, "note": self.note,
        })
    }
}

/// Where the server counts usage and reads function data: phase 1's Postgres, or phase 2's
/// Redis (a counter hash per organization and period, a read-through cache).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Backends {
    Postgres,
    Redis,
}

impl Backends {
    /// The value of both [`BACKEND_SETTINGS`].
    fn setting(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Postgres => "Postgres",
            Self::Redis => "Redis",
        }
    }
}

/// A simulation's books, for the results.
struct BooksLine {
    benchmark: String,
    calls: u64,
    seconds: i64,
    balanced: bool,
}

/// Everything a benchmark needs.
struct Bench {
    options: Options,
    sizes: Sizes,
    out_dir: PathBuf,
    loadgen_binary: PathBuf,
    cluster: Option<Postgres>,
    /// Running when a benchmark in [`ON_REDIS`] is.
    redis: Option<Redis>,
    /// Running when a benchmark in [`ON_TEMPORAL`] is.
    temporal: Option<Temporal>,
    /// `callplane-temporal-baseline`, built when a benchmark in [`ON_TEMPORAL`] runs.
    temporal_baseline: Option<PathBuf>,
    /// Set once the cluster is up.
    loadgen: Option<Loadgen>,
    server: Option<ServerProcess>,
    /// What the running server is configured with.
    backends: Backends,
    http_port: u16,
    /// Benchmark 1's reports per second, which benchmark 3 compares the hot organization with.
    uniform_reports: Option<f64>,
    rows: Vec<Row>,
    books: Vec<BooksLine>,
    raw: serde_json::Map<String, Value>,
    idle_rss_kb: Option<u64>,
    peak_rss_kb: Option<u64>,
    /// `--profile`: every profile's summary, by name.
    profiles: Option<Vec<(String, String)>>,
}

/// `cargo xtask bench ...`.
pub fn bench(args: &[String]) -> Result<ExitCode> {
    let profile = args.iter().any(|a| a == "--profile");
    let args: Vec<String> = args.iter().filter(|a| *a != "--profile").cloned().collect();
    let mut options = Options::parse(&args, ALL, "benchmark", USAGE)?;
    if profile {
        crate::profile::check_available()?;
        // Stacks of a debug build would profile the debug build.
        options.release = true;
    }
    util::install_ctrlc_handler()?;
    let mut report = Report::default();
    run(options, profile, &mut report)?;
    report.print_summary();
    Ok(report.exit_code())
}

/// The quick benchmarks as one step of `cargo xtask test` (which installed the Ctrl-C handler).
pub fn quick_for_tests() -> Result<()> {
    let options = Options::all(true, ALL);
    let mut report = Report::default();
    run(options, false, &mut report)?;
    report.print_summary();
    if !report.all_passed() {
        bail!("a benchmark failed (see the summary above)");
    }
    Ok(())
}

fn run(options: Options, profile: bool, report: &mut Report) -> Result<()> {
    let bin = pg::bin_dir()?;
    let sizes = if options.quick { Sizes::quick() } else { Sizes::full() };
    let started_at = utc_now();
    // One binary serves both backends: the configuration picks them.
    // A profile needs the server built with frame pointers: that build replaces the usual one.
    let mut profiling_server = None;
    if profile && std::env::var_os("CALLPLANE_BIN").is_none_or(|v| v.is_empty()) {
        report.step("build callplane with frame pointers (target/profiling)", || {
            profiling_server = Some(crate::profile::build_server(&["phase3"])?);
            Ok(())
        });
        if profiling_server.is_none() {
            return Ok(());
        }
    }
    let Some(binaries) = Binaries::build_with(report, &options, &["phase3"], profiling_server) else { return Ok(()) };
    let temporal_baseline = match ON_TEMPORAL.iter().any(|name| options.runs(name)) {
        true => match build_temporal_baseline(report, &options) {
            Some(path) => Some(path),
            None => return Ok(()),
        },
        false => None,
    };
    let mut bench = Bench {
        sizes,
        out_dir: util::target_dir().join("bench"),
        loadgen_binary: binaries.loadgen,
        temporal_baseline,
        cluster: None,
        redis: None,
        temporal: None,
        loadgen: None,
        server: None,
        backends: Backends::Postgres,
        http_port: pg::free_port()?,
        uniform_reports: None,
        rows: Vec::new(),
        books: Vec::new(),
        raw: serde_json::Map::new(),
        idle_rss_kb: None,
        peak_rss_kb: None,
        profiles: profile.then(Vec::new),
        options: options.clone(),
    };
    fs::create_dir_all(&bench.out_dir).with_context(|| format!("could not create {}", bench.out_dir.display()))?;

    let callplane = binaries.callplane;

    let mut ready = false;
    report.step("start PostgreSQL, Redis and callplane", || {
        bench.start(&bin, &callplane)?;
        ready = true;
        Ok(())
    });
    if ready {
        let facts = bench.machine_facts(&started_at);
        bench.run_benchmarks(report);
        report.always("stop callplane serve", || bench.server.take().map_or(Ok(()), |mut s| s.stop()));
        report.always("stop Redis", || bench.redis.take().map_or(Ok(()), |mut r| r.stop()));
        report.always("stop Temporal", || bench.temporal.take().map_or(Ok(()), |mut t| t.stop()));
        report.always("stop PostgreSQL bench cluster", || bench.cluster.take().map_or(Ok(()), |mut c| c.stop()));
        // A run with a failed benchmark never replaces the published results.
        let all_passed = report.all_passed();
        report.always("write results", || bench.write_results(&facts?, &started_at, all_passed));
    } else {
        bench.server = None;
        bench.redis = None;
        bench.temporal = None;
        bench.cluster = None;
    }
    Ok(())
}

/// Builds `callplane-temporal-baseline` (Temporal's own limit for benchmark 7) in the
/// benchmarks' profile; `None` when the build failed (the report says why). Built with the
/// server's packages and features selected, so that the dependencies they share resolve to the
/// same features and are not compiled a second time.
fn build_temporal_baseline(report: &mut Report, options: &Options) -> Option<PathBuf> {
    let profile = if options.release_build() { "release" } else { "debug" };
    let mut built = false;
    report.step("build callplane-temporal-baseline", || {
        let mut command = util::cargo();
        command.args(["build", "-p", "callplane-loadgen", "-p", "callplane-server", "-p", "callplane-temporal"]);
        command.args(["--features", "callplane-server/phase2", "--bin", "callplane-temporal-baseline"]);
        if options.release_build() {
            command.arg("--release");
        }
        util::run(&mut command)?;
        built = true;
        Ok(())
    });
    built.then(|| util::target_dir().join(profile).join("callplane-temporal-baseline"))
}

/// Starts a `redis-server` that keeps nothing, in a fresh `target/xtask/redis-bench`, on a free
/// loopback port.
fn start_redis() -> Result<Redis> {
    redis::check_installed()?;
    let dir = util::target_dir().join("xtask/redis-bench");
    redis::stop_leftover(&dir)?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("could not remove {}", dir.display()))?;
    }
    Redis::start(&dir, pg::free_port()?, Durability::Throwaway)
}

impl Bench {
    /// Starts a fresh cluster (and Redis, when a benchmark needs it), migrates, and starts
    /// `callplane serve` on the Postgres backends.
    fn start(&mut self, bin: &Path, callplane: &Path) -> Result<()> {
        let data = util::target_dir().join("xtask/pg-bench");
        let cluster = Postgres::start_fresh(bin, data, self.sizes.settings)?;
        if ON_REDIS.iter().any(|name| self.options.runs(name)) {
            let redis = start_redis()?;
            eprintln!("xtask: started Redis on port {}", redis.port());
            self.redis = Some(redis);
        }
        if ON_TEMPORAL.iter().any(|name| self.options.runs(name)) {
            let dir = util::target_dir().join("xtask/temporal-bench");
            if dir.exists() {
                fs::remove_dir_all(&dir).with_context(|| format!("could not remove {}", dir.display()))?;
            }
            let temporal = Temporal::start(&dir, pg::free_port()?)?;
            eprintln!("xtask: started Temporal on {}", temporal.address());
            self.temporal = Some(temporal);
        }
        let log = self.out_dir.join("server.log");
        // A fresh log each run (the server appends to it).
        fs::write(&log, "").with_context(|| format!("could not create {}", log.display()))?;
        // Its own inbox, empty: the default (`.data/inbox`) belongs to `cargo xtask run`'s server,
        // and a server drains whatever it finds there at start.
        let inbox = self.out_dir.join("inbox");
        if inbox.exists() {
            fs::remove_dir_all(&inbox).with_context(|| format!("could not remove {}", inbox.display()))?;
        }
        fs::create_dir_all(&inbox).with_context(|| format!("could not create {}", inbox.display()))?;
        let mut spec = ServerSpec::new(callplane.to_path_buf(), self.http_port, &cluster.database_url(), log)
            .with_env("CALLPLANE__INBOX__DIR", inbox.to_string_lossy())
            // Benchmark 5 fans one organization's events out to up to 5,000 sockets on one key.
            .with_env("CALLPLANE__REALTIME__MAX_CONNECTIONS_PER_ORG", "10000")
            .with_env("CALLPLANE__REALTIME__MAX_CONNECTIONS_PER_KEY", "10000")
            // Benchmark 4 times transcript search.
            .with_env("CALLPLANE__BACKENDS__SEARCH", "postgres");
        // Set even to their defaults, so that none comes from the caller's environment. The
        // loadgen reads the counter's too, to know where to check it.
        for name in BACKEND_SETTINGS {
            spec = spec.with_env(name, Backends::Postgres.setting());
        }
        spec = spec.with_env(PIPELINE_SETTING, "inline");
        if let Some(temporal) = &self.temporal {
            spec = spec.with_env(TEMPORAL_ADDRESS_SETTING, temporal.address());
        }
        if let Some(redis) = &self.redis {
            spec = spec.with_env(REDIS_URL_SETTING, redis.url());
        }
        self.cluster = Some(cluster);
        spec.migrate()?;
        self.server = Some(spec.start(Duration::from_secs(60))?);
        self.loadgen = Some(Loadgen { binary: self.loadgen_binary.clone(), spec });
        // Settle before measuring the idle footprint.
        thread::sleep(Duration::from_secs(2));
        self.idle_rss_kb = self.server.as_ref().and_then(|s| rss_kb(s.pid()));
        Ok(())
    }

    /// Restarts the server with its usage counter and function data on `backends`, unless it
    /// already runs on them.
    fn use_backends(&mut self, backends: Backends) -> Result<()> {
        if self.backends == backends && self.server.is_some() {
            return Ok(());
        }
        let loadgen = self.loadgen.as_mut().context("the server was never started")?;
        let mut spec = loadgen.spec.clone();
        for name in BACKEND_SETTINGS {
            spec = spec.with_env(name, backends.setting());
        }
        if let Some(mut server) = self.server.take() {
            server.stop()?;
        }
        eprintln!("xtask: restarting callplane serve on the {} backends", backends.label());
        self.server = Some(spec.start(Duration::from_secs(60))?);
        loadgen.spec = spec;
        self.backends = backends;
        Ok(())
    }

    /// Restarts the server with `backends.event_pipeline = pipeline` (its metrics start afresh).
    fn use_pipeline(&mut self, pipeline: &str) -> Result<()> {
        let loadgen = self.loadgen.as_mut().context("the server was never started")?;
        let spec = loadgen.spec.clone().with_env(PIPELINE_SETTING, pipeline);
        if let Some(mut server) = self.server.take() {
            server.stop()?;
        }
        eprintln!("xtask: restarting callplane serve on the {pipeline} pipeline");
        self.server = Some(spec.start(Duration::from_secs(60))?);
        loadgen.spec = spec;
        Ok(())
    }

    /// Benchmark 1's reports through each pipeline: accepted per second, per second until the
    /// books balance (the last ledger row), and the server's arrival-to-ledger latency.
    fn pipeline(&mut self) -> Result<()> {
        let s = &self.sizes;
        let (clients, seconds, calls, orgs) =
            (s.ingest_clients, s.ingest_seconds, s.ingest_seconds * 5_000, s.ingest_orgs);
        let mut figures = serde_json::Map::new();
        for pipeline in ["inline", "temporal"] {
            self.use_pipeline(pipeline)?;
            let run_file = self.out_dir.join(format!("pipeline-{pipeline}.json"));
            let started = std::time::Instant::now();
            let summary = self.loadgen_json(
                &format!(
                    "simulate --lifecycle report-only --orgs {orgs} --plans pro=1,business=1 --calls {calls} \
                     --max-concurrent {clients} --time-limit-secs {seconds} --skew 0 --duplicate-rate 0 \
                     --out-of-order-rate 0 --label pipeline-{pipeline} --seed 13 --no-check --run-file {} --json",
                    run_file.display()
                ),
                self.sizes.short_timeout,
                false,
            )?;
            let accepted = number(&summary, "/reports_per_second")?;
            let books = self.books_when_balanced(&run_file, self.sizes.short_timeout)?;
            let settled = started.elapsed().as_secs_f64();
            let sent = books.get("expected_calls").and_then(Value::as_u64).unwrap_or(0);
            self.check_simulation(&format!("7. pipeline, {pipeline}"), &json!({ "errors": 0, "books": books }))?;
            let metrics = http::get(self.http_addr(), "/metrics", Duration::from_secs(5))
                .map_err(|e| anyhow::anyhow!("GET /metrics failed: {e:?}"))?
                .body;
            let ledger = |q: f64| histogram_quantile(&metrics, "callplane_report_to_ledger_seconds", "", q);
            let figure = json!({
                "accepted_per_second": accepted,
                "calls": sent,
                "seconds_until_balanced": settled,
                "ledger_per_second": sent as f64 / settled,
                "report_to_ledger_p50_ms": ledger(0.5),
                "report_to_ledger_p99_ms": ledger(0.99),
                "simulation": summary,
            });
            eprintln!("xtask: {pipeline} pipeline: {figure:#}");
            figures.insert(pipeline.into(), figure);
        }
        self.use_pipeline("inline")?;
        // Temporal's own limit: the same shape with nothing in it, on the same server.
        let raw = self.temporal_baseline(clients, seconds)?;
        eprintln!("xtask: Temporal's own limit (no-op workflows): {raw:#}");
        let raw_figure = |key: &str| raw.get(key).and_then(Value::as_f64);
        figures.insert(
            "temporal_raw".into(),
            json!({
                "accepted_per_second": raw_figure("accepted_per_second"),
                "ledger_per_second": raw_figure("finished_per_second"),
                "report_to_ledger_p50_ms": raw_figure("handover_to_finish_p50_ms"),
                "report_to_ledger_p99_ms": raw_figure("handover_to_finish_p99_ms"),
                "baseline": raw,
            }),
        );
        let get = |pipeline: &str, key: &str| figures.get(pipeline).and_then(|f| f.get(key)).and_then(Value::as_f64);
        let rows = [
            ("end-of-call reports/s accepted (answered 200)", "accepted_per_second", "/s", ""),
            (
                "end-of-call reports/s until the last ledger row committed",
                "ledger_per_second",
                "/s",
                "from the first report sent until the books balance",
            ),
            (
                "report arrival → ledger row committed, p50",
                "report_to_ledger_p50_ms",
                "ms",
                "server-side histogram: the upper bound of the bucket",
            ),
            ("report arrival → ledger row committed, p99", "report_to_ledger_p99_ms", "ms", ""),
        ];
        let baselines = [
            ("inline", "the inline pipeline, same run, same reports"),
            ("temporal_raw", "Temporal's own limit: empty workflows of the same shape, same server, as many clients"),
        ];
        for (baseline, baseline_is) in baselines {
            for (metric, key, unit, note) in rows {
                let Some(temporal) = get("temporal", key) else { bail!("the temporal run has no {key}") };
                self.rows.push(Row {
                    benchmark: "7. Pipeline".into(),
                    metric: format!("{metric}, {clients} clients, {orgs} orgs, Temporal pipeline"),
                    unit,
                    callplane: temporal,
                    baseline: get(baseline, key),
                    baseline_is: baseline_is.into(),
                    note: match (baseline, key) {
                        ("temporal_raw", "ledger_per_second") => "the baseline: from the first hand-over until the \
                                                                   last workflow finished"
                            .into(),
                        ("temporal_raw", "report_to_ledger_p50_ms") => {
                            "the baseline: hand-over to the last activity, exact".into()
                        }
                        _ => note.into(),
                    },
                });
            }
        }
        self.raw.insert("pipeline".into(), Value::Object(figures));
        Ok(())
    }

    /// `callplane-temporal-baseline` against the benchmark's Temporal server, `clients` at once
    /// for `seconds`: its figures.
    fn temporal_baseline(&self, clients: usize, seconds: u64) -> Result<Value> {
        let binary = self.temporal_baseline.as_ref().context("callplane-temporal-baseline was not built")?;
        let temporal = self.temporal.as_ref().context("Temporal is not running")?;
        let payload = util::repo_root().join("tests/fixtures/vapi/09-end-of-call-report.json");
        let mut command = Command::new(binary);
        command.args(["--address", &temporal.address(), "--clients", &clients.to_string()]);
        command.args(["--seconds", &seconds.to_string(), "--settle-seconds"]);
        command.arg(self.sizes.short_timeout.as_secs().to_string()).arg("--payload").arg(payload);
        command.stdout(Stdio::piped());
        eprintln!("xtask: $ {}", describe(&command));
        let (status, output) =
            stack::Background::spawn(command)?.finish(self.sizes.short_timeout + Duration::from_secs(60))?;
        if !status.success() {
            bail!("callplane-temporal-baseline failed ({status}): {output}");
        }
        let raw = stack::last_json(&output)?;
        let handed = raw.get("handed_over").and_then(Value::as_u64).unwrap_or(0);
        let finished = raw.get("finished").and_then(Value::as_u64).unwrap_or(0);
        if handed == 0 || finished != handed {
            bail!("the Temporal baseline finished {finished} of {handed} workflows: {raw}");
        }
        Ok(raw)
    }

    /// `callplane-loadgen books` on a saved run until it balances (a pipeline still catching up
    /// has not written every row yet), or `timeout`; returns the last books.
    fn books_when_balanced(&self, run_file: &Path, timeout: Duration) -> Result<Value> {
        let started = std::time::Instant::now();
        let loadgen = self.loadgen.as_ref().context("the server is not running")?;
        let args = format!("books --run-file {} --json", run_file.display());
        eprintln!("xtask: $ callplane-loadgen {args} (until the books balance)");
        loop {
            // It exits 1 while they do not balance yet: the JSON says why.
            let (_, output) = stack::Background::spawn(loadgen.command(&args, false))?.finish(timeout)?;
            let books = stack::last_json(&output)?;
            let balanced = books.get("problem_count").and_then(Value::as_u64) == Some(0);
            if balanced || started.elapsed() >= timeout || util::interrupted() {
                return Ok(books);
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    fn http_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn database_url(&self) -> Result<String> {
        Ok(self.cluster.as_ref().context("no cluster")?.database_url())
    }

    fn run_benchmarks(&mut self, report: &mut Report) {
        type Step = fn(&mut Bench) -> Result<()>;
        let steps: [(&str, &str, Step); 9] = [
            ("ingest", "1. ingest: end-of-call reports vs pgbench", Bench::ingest),
            ("hot", "3. hot organization (Postgres and Redis counters) vs uniform ingest", Bench::hot_org),
            ("agent", "2. agent latency with calls in flight (Postgres and Redis) vs /healthz", Bench::agent_latency),
            ("realtime", "5. real time: WebSocket delivery vs raw NOTIFY", Bench::realtime),
            ("dashboard", "4. dashboard: /v1/calls vs an unpartitioned table", Bench::dashboard),
            ("memory", "6. memory: server RSS idle and under ingest", Bench::memory),
            ("pipeline", "7. pipeline: Temporal vs inline, accepted, to the ledger, latency", Bench::pipeline),
            ("storage", "8. storage: transcripts moved and months archived to s3s-fs, call detail", Bench::storage),
            (
                "replica",
                "9. replica and pooler: dashboard under ingest, primary connections with calls in flight",
                Bench::replica,
            ),
        ];
        for (name, title, step) in steps {
            if self.options.runs(name) {
                // Each starts on the Postgres backends, whatever the one before left.
                report.step(title, || {
                    self.use_backends(Backends::Postgres)?;
                    step(self)
                });
            } else {
                report.skip(title, "not in --only");
            }
        }
    }

    /// Runs `measure`, sampled by `perf` under `name` when `--profile` asked for it. A profile
    /// that fails is reported and costs the benchmark nothing.
    fn profiled<T>(&mut self, name: &str, measure: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let server_pid = self.server.as_ref().map(ServerProcess::pid);
        let recording = match (&self.profiles, server_pid) {
            (Some(_), Some(pid)) => crate::profile::Recording::start(&self.out_dir, name, pid)
                .inspect_err(|e| eprintln!("xtask: not profiling {name}: {e:#}"))
                .ok(),
            _ => None,
        };
        let result = measure(self);
        if let Some((recording, profiles)) = recording.zip(self.profiles.as_mut()) {
            match recording.finish() {
                Ok(summary) => profiles.push((name.to_string(), summary)),
                Err(e) => eprintln!("xtask: the profile of {name} failed: {e:#}"),
            }
        }
        result
    }

    /// Runs the loadgen with the server's environment and returns the JSON it printed. `args` is
    /// split on whitespace (no argument contains any). Progress (stderr) goes to the terminal.
    /// The process is killed after `timeout`.
    fn loadgen_json(&self, args: &str, timeout: Duration, raise_limit: bool) -> Result<Value> {
        self.loadgen.as_ref().context("the server is not running")?.json(args, timeout, raise_limit)
    }

    /// Runs psql on the bench database and returns its unaligned output.
    fn psql(&self, sql: &str) -> Result<String> {
        self.cluster.as_ref().context("no cluster")?.psql(sql)
    }

    /// Runs pgbench with a script for `seconds` and returns its transactions per second.
    fn pgbench(
        &self,
        script: &str,
        name: &str,
        clients: usize,
        seconds: u64,
        defines: &[(&str, String)],
    ) -> Result<f64> {
        let path = self.out_dir.join(format!("{name}.sql"));
        fs::write(&path, script).with_context(|| format!("could not write {}", path.display()))?;
        let cluster = self.cluster.as_ref().context("no cluster")?;
        let port = cluster.port().to_string();
        let mut command = cluster.cluster().client("pgbench");
        command.args(["-n", "-M", "prepared", "-c", &clients.to_string(), "-j", &clients.min(2).to_string()]);
        command.args(["-T", &seconds.to_string(), "-P", "5", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"]);
        for (name, value) in defines {
            command.arg("-D").arg(format!("{name}={value}"));
        }
        command.arg("-f").arg(&path).arg(DATABASE);
        command.stdout(Stdio::piped()).stderr(Stdio::inherit());
        eprintln!("xtask: $ {}", describe(&command));
        let output = run_with_timeout(command, Duration::from_secs(seconds + 120))?;
        let tps = output
            .lines()
            .find_map(|line| line.trim().strip_prefix("tps = "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse::<f64>().ok());
        match tps {
            Some(tps) if tps > 0.0 => {
                eprintln!("xtask: pgbench {name}: {tps:.0} transactions/s");
                Ok(tps)
            }
            _ => bail!("pgbench {name} reported no throughput:\n{output}"),
        }
    }

    /// Runs `redis-benchmark`'s INCR on the bench Redis and returns its CSV figures (`rps`,
    /// `p50_latency_ms`, ...).
    fn redis_incr(&self) -> Result<serde_json::Map<String, Value>> {
        let port = self.redis.as_ref().context("Redis is not running")?.port().to_string();
        let mut command = Command::new("redis-benchmark");
        command.args(["-h", "127.0.0.1", "-p", &port]).args(INCR_ARGS);
        command.stdout(Stdio::piped()).stderr(Stdio::inherit());
        eprintln!("xtask: $ {}", describe(&command));
        let output = run_with_timeout(command, self.sizes.short_timeout)
            .context("redis-benchmark failed (it comes with redis-server, in redis-tools)")?;
        let figures =
            csv_row(&output, "INCR").with_context(|| format!("redis-benchmark printed no INCR:\n{output}"))?;
        match figures.get("rps").and_then(Value::as_f64) {
            Some(rps) if rps > 0.0 => eprintln!("xtask: redis-benchmark INCR: {rps:.0} requests/s"),
            _ => bail!("redis-benchmark reported no INCR rate:\n{output}"),
        }
        Ok(figures)
    }

    /// Organizations for pgbench, listed in `bench_orgs(n, id)` so scripts can pick one by number.
    fn pgbench_orgs(&self, count: usize) -> Result<()> {
        self.psql(&format!(
            "DROP TABLE IF EXISTS bench_orgs; \
             CREATE TABLE bench_orgs (n int PRIMARY KEY, id uuid NOT NULL); \
             INSERT INTO bench_orgs SELECT g, gen_random_uuid() FROM generate_series(1, {count}) g; \
             INSERT INTO organizations (id, name, plan, period_start, period_end, billing_anchor) \
             SELECT id, 'pgbench ' || n, 'business', date_trunc('month', now()), \
                    date_trunc('month', now()) + interval '1 month', date_trunc('month', now()) FROM bench_orgs;"
        ))?;
        Ok(())
    }

    /// Checks a simulation's summary: no errors, books balanced; records the books.
    fn check_simulation(&mut self, benchmark: &str, summary: &Value) -> Result<()> {
        let errors = summary.get("errors").and_then(Value::as_u64).unwrap_or(u64::MAX);
        let books = summary.get("books").context("the simulation did not check its books")?;
        let balanced = books.get("problem_count").and_then(Value::as_u64) == Some(0)
            && books.get("database_checked").and_then(Value::as_bool) == Some(true);
        let calls = books.get("expected_calls").and_then(Value::as_u64).unwrap_or(0);
        self.books.push(BooksLine {
            benchmark: benchmark.to_string(),
            calls,
            seconds: books.get("expected_seconds").and_then(Value::as_i64).unwrap_or(0),
            balanced,
        });
        if errors != 0 {
            bail!("{benchmark}: {errors} requests failed: {}", summary.get("error_samples").unwrap_or(&Value::Null));
        }
        if !balanced {
            bail!("{benchmark}: the books do not balance: {}", books.get("problems").unwrap_or(&Value::Null));
        }
        if calls == 0 {
            bail!("{benchmark}: no call was simulated");
        }
        Ok(())
    }

    /// A report-only simulation: end-of-call reports as fast as `clients` connections allow.
    fn ingest_simulation(&self, label: &str, orgs: usize, skew: &str) -> Result<Value> {
        let s = &self.sizes;
        let (clients, seconds, calls) = (s.ingest_clients, s.ingest_seconds, s.ingest_seconds * 5_000);
        self.loadgen_json(
            &format!(
                "simulate --lifecycle report-only --orgs {orgs} --plans pro=1,business=1 --calls {calls} \
                 --max-concurrent {clients} --time-limit-secs {seconds} --skew {skew} --duplicate-rate 0 \
                 --out-of-order-rate 0 --label {label} --seed 11 --json"
            ),
            s.short_timeout,
            false,
        )
    }

    fn ingest(&mut self) -> Result<()> {
        let pid = self.server.as_ref().context("no server")?.pid();
        let sampler = RssSampler::start(pid);
        let cpu = CpuSampler::start(pid);
        let orgs = self.sizes.ingest_orgs;
        let summary = self.profiled("ingest", |b| b.ingest_simulation("ingest", orgs, "0"));
        let cpu = cpu.stop();
        self.peak_rss_kb = Some(sampler.stop());
        let summary = summary?;
        self.check_simulation("1. ingest", &summary)?;
        let reports = number(&summary, "/reports_per_second")?;
        let report_count = number(&summary, "/reports")?;
        self.uniform_reports = Some(reports);

        self.pgbench_orgs(self.sizes.ingest_orgs)?;
        let (clients, seconds) = (self.sizes.ingest_clients, self.sizes.ingest_seconds);
        let orgs = self.sizes.ingest_orgs.to_string();
        let tps = self.pgbench(INGEST_SCRIPT, "ingest", clients, seconds, &[("orgs", orgs)])?;
        // The same transaction with the transcript row too, using a median transcript of the run
        // (its full-text column is computed on insert, as callplane's are).
        self.psql(
            "DROP TABLE IF EXISTS bench_transcript; \
             CREATE TABLE bench_transcript AS SELECT transcript, messages FROM call_transcripts \
             WHERE transcript IS NOT NULL ORDER BY length(transcript) \
             OFFSET (SELECT count(*) / 2 FROM call_transcripts WHERE transcript IS NOT NULL) LIMIT 1",
        )?;
        let transcript_bytes = self.psql("SELECT length(transcript) + length(messages::text) FROM bench_transcript")?;
        let script = INGEST_SCRIPT.replace("END;", &format!("{TRANSCRIPT_INSERT}END;"));
        let orgs = self.sizes.ingest_orgs.to_string();
        let pgbench_cpu = CpuSampler::start(pid);
        let with_transcript = self.pgbench(&script, "ingest-with-transcript", clients, seconds, &[("orgs", orgs)]);
        let (pgbench_cpu, with_transcript) = (pgbench_cpu.stop(), with_transcript?);
        let metric = format!("end-of-call reports/s, {clients} clients, {} orgs", self.sizes.ingest_orgs);
        self.rows.push(Row {
            benchmark: "1. Ingest".into(),
            metric: metric.clone(),
            unit: "/s",
            callplane: reports,
            baseline: Some(tps),
            baseline_is: "pgbench: call key + partitioned call + ledger row + counter, one transaction".into(),
            note: "callplane also stores the transcript and publishes realtime events".into(),
        });
        self.rows.push(Row {
            benchmark: "1. Ingest".into(),
            metric,
            unit: "/s",
            callplane: reports,
            baseline: Some(with_transcript),
            baseline_is: format!(
                "pgbench: the same plus the transcript row ({transcript_bytes} bytes, median of the run)"
            ),
            note: String::new(),
        });
        self.push_cpu_row(&cpu, report_count, &pgbench_cpu, with_transcript * seconds as f64);
        self.raw.insert("ingest".into(), summary);
        Ok(())
    }

    /// The CPU each process took per end-of-call report during the ingest simulation (`cpu`,
    /// over `reports`), next to PostgreSQL's and pgbench's per transaction of the transcript
    /// baseline (`raw`, over `transactions`): where a report's cost goes when everything shares
    /// the machine's cores.
    fn push_cpu_row(&mut self, cpu: &CpuSeconds, reports: f64, raw: &CpuSeconds, transactions: f64) {
        let per = |seconds: &CpuSeconds, process: &str, n: f64| {
            seconds.get(process).copied().unwrap_or(0.0) * 1000.0 / n.max(1.0)
        };
        let (postgres, server, loadgen) =
            (per(cpu, "PostgreSQL", reports), per(cpu, "callplane", reports), per(cpu, "load generator", reports));
        let (raw_postgres, raw_client) = (per(raw, "PostgreSQL", transactions), per(raw, "pgbench", transactions));
        let total = postgres + server + loadgen;
        self.rows.push(Row {
            benchmark: "1. Ingest".into(),
            metric: "PostgreSQL CPU per end-of-call report".into(),
            unit: "ms",
            callplane: postgres,
            baseline: Some(raw_postgres),
            baseline_is: "PostgreSQL CPU per pgbench transaction (the same writes plus the transcript row)".into(),
            note: format!(
                "on the same cores per report: callplane {server:.2} ms, load generator {loadgen:.2} ms \
                 (total {total:.2} ms); per pgbench transaction: pgbench {raw_client:.2} ms"
            ),
        });
        self.raw.insert(
            "ingest_cpu".into(),
            json!({
                "ingest_seconds": cpu, "reports": reports,
                "pgbench_seconds": raw, "pgbench_transactions": transactions,
            }),
        );
    }

    /// The hot organization on each counter, next to uniform ingest: phase 2's Redis counter is
    /// meant to take the organization's row lock out of the report's transaction.
    fn hot_org(&mut self) -> Result<()> {
        let (clients, seconds, orgs) = (self.sizes.ingest_clients, self.sizes.ingest_seconds, self.sizes.ingest_orgs);
        let uniform = match self.uniform_reports {
            Some(reports) => reports,
            None => {
                let summary = self.ingest_simulation("uniform", orgs, "0")?;
                self.check_simulation("3. uniform ingest", &summary)?;
                let reports = number(&summary, "/reports_per_second")?;
                self.raw.insert("uniform".into(), summary);
                self.uniform_reports = Some(reports);
                reports
            }
        };
        let (postgres, postgres_run) = self.hot_simulation(Backends::Postgres)?;
        let (redis, redis_run) = self.hot_simulation(Backends::Redis)?;
        let incr = self.redis_incr()?;
        self.use_backends(Backends::Postgres)?;

        let hot_id = self.psql("SELECT id FROM bench_orgs WHERE n = 1").or_else(|_| {
            self.pgbench_orgs(1)?;
            self.psql("SELECT id FROM bench_orgs WHERE n = 1")
        })?;
        let update = self.pgbench(HOT_ROW_SCRIPT, "hot-row", clients, seconds, &[("hot", hot_id)])?;
        let one_org = self.pgbench(INGEST_SCRIPT, "ingest-one-org", clients, seconds, &[("orgs", "1".into())])?;

        let row = |backends: Backends, baseline: Option<f64>, baseline_is: &str, note: &str| Row {
            benchmark: "3. Hot organization".into(),
            metric: format!("end-of-call reports/s, all on one org, {} counter, {clients} clients", backends.label()),
            unit: "/s",
            callplane: if backends == Backends::Redis { redis } else { postgres },
            baseline,
            baseline_is: baseline_is.into(),
            note: note.into(),
        };
        let uniform_is = format!("callplane: the same reports over {orgs} orgs (benchmark 1), Postgres counter");
        self.rows.extend([
            row(Backends::Postgres, Some(uniform), &uniform_is, ""),
            row(Backends::Redis, Some(uniform), &uniform_is, "target: ratio ≥ 0.90"),
            row(
                Backends::Redis,
                incr.get("rps").and_then(Value::as_f64),
                "redis-benchmark INCR, 50 clients, the same Redis",
                "",
            ),
            row(
                Backends::Postgres,
                Some(update),
                "pgbench: UPDATE organizations SET seconds_used = seconds_used + 1 on one row",
                "",
            ),
            row(Backends::Postgres, Some(one_org), "pgbench: benchmark 1's raw transaction, all on one org", ""),
        ]);
        self.raw.insert(
            "hot_org".into(),
            json!({
                "uniform_reports_per_second": uniform,
                "postgres": postgres_run,
                "redis": redis_run,
                "redis_benchmark_incr": incr,
            }),
        );
        Ok(())
    }

    /// All reports on one organization with the server on `backends`: the reports per second
    /// and the loadgen's summary.
    fn hot_simulation(&mut self, backends: Backends) -> Result<(f64, Value)> {
        self.use_backends(backends)?;
        let label = format!("hot-{}", backends.setting());
        let summary = self.profiled(&label, |b| b.ingest_simulation(&label, 1, "1"))?;
        self.check_simulation(&format!("3. hot organization, {} counter", backends.label()), &summary)?;
        Ok((number(&summary, "/reports_per_second")?, summary))
    }

    /// The agent's answers on the Postgres backends, then on the Redis ones (the counter that
    /// admissions read, the function data that tool calls read).
    fn agent_latency(&mut self) -> Result<()> {
        let postgres = self.agent_run(Backends::Postgres)?;
        self.raw.insert("agent".into(), postgres);
        let redis = self.agent_run(Backends::Redis)?;
        self.raw.insert("agent_redis".into(), redis);
        Ok(())
    }

    /// One agent-latency run with the server on `backends`, and its `/healthz` baseline; adds
    /// the rows and returns the loadgen's summaries.
    fn agent_run(&mut self, backends: Backends) -> Result<Value> {
        self.use_backends(backends)?;
        let s = &self.sizes;
        let (in_flight, steady, calls) = (s.agent_in_flight, s.agent_in_flight * 3 / 4, s.agent_calls);
        let (gap, mean, probe_seconds) = (s.agent_gap_ms, s.agent_duration_mean, s.probe_seconds);
        let (long_timeout, short_timeout) = (s.long_timeout, s.short_timeout);
        // A call sends about 1.25 webhooks a turn (a turn every 9 s) plus six, `gap` apart. Calls
        // start 1.5 times as fast as they finish at full concurrency, so the in-flight count
        // ramps up over two thirds of a call and then stays at the limit.
        let call_seconds = (mean as f64 / 9.0 * 1.25 + 6.0) * gap as f64 / 1000.0;
        let rate = in_flight as f64 / call_seconds * 1.5;
        let args = format!(
            "simulate --orgs 20 --plans pro=1,business=1 --calls {calls} --max-concurrent {in_flight} \
             --rate {rate:.2} --event-gap-ms {gap} --duration-mean {mean} --duration-max {max} \
             --steady-in-flight {steady} --probe-path /healthz --probe-rate {LOADED_PROBE_RATE} \
             --label agent-{label} --seed 22 --json",
            max = mean * 5,
            label = backends.setting(),
        );
        let name = format!("agent-{}", backends.setting());
        let summary = self.profiled(&name, |b| b.loadgen_json(&args, long_timeout, true))?;
        self.check_simulation(&format!("2. agent latency, {} backends", backends.label()), &summary)?;
        // The server's own histogram (from handler start to answer) splits a client's time into
        // the handler's and everything before it (accepting, reading, waiting for a core).
        let metrics = http::get(self.http_addr(), "/metrics", Duration::from_secs(5))
            .map_err(|e| anyhow::anyhow!("GET /metrics failed: {e:?}"))?
            .body;
        // The baseline gets the rate of the steady state, not of the whole run with its ramps.
        let events_per_second = number(&summary, "/steady_deliveries_per_second")?;
        if events_per_second <= 0.0 {
            bail!("the simulation never reached {steady} calls in flight");
        }
        let peak = number(&summary, "/max_in_flight")?;

        let health = format!("{}/healthz", self.base_url());
        let probe = self.loadgen_json(
            &format!(
                "probe --url {health} --concurrency {in_flight} --rate {events_per_second:.1} \
                 --duration-secs {probe_seconds} --json"
            ),
            short_timeout,
            true,
        )?;
        let probe_rate = number(&probe, "/requests_per_second")?;
        if number(&probe, "/latency/count")? <= 0.0 {
            bail!("the /healthz probe measured nothing");
        }
        for kind in ["assistant-request", "tool-calls"] {
            let count = number(&summary, &format!("/latency/{kind}/count"))?;
            if count <= 0.0 {
                bail!("no {kind} latency was recorded with the calls in flight");
            }
            for (label, field) in [("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")] {
                // Phase 2's aim for the Redis function-data cache.
                let target = backends == Backends::Redis && kind == "tool-calls" && label == "p99";
                self.rows.push(Row {
                    benchmark: "2. Agent latency".into(),
                    metric: format!(
                        "{kind} {label}, {peak:.0} calls in flight, {} backends ({count:.0} samples)",
                        backends.label()
                    ),
                    unit: "ms",
                    callplane: number(&summary, &format!("/latency/{kind}/{field}"))?,
                    baseline: Some(number(&probe, &format!("/latency/{field}"))?),
                    baseline_is: format!("GET /healthz, same server idle, {in_flight} clients at {probe_rate:.0}/s"),
                    note: {
                        let mut note = Vec::new();
                        if target {
                            note.push("target: < 2 ms, ratio ≤ 3".to_owned());
                        }
                        if let Some(bound) = server_side_quantile(&metrics, kind, 0.99).filter(|_| label == "p99") {
                            note.push(format!("in the handler: p99 ≤ {bound} ms (whole run)"));
                        }
                        note.join("; ")
                    },
                });
            }
        }
        // The same answers next to `/healthz` sent meanwhile: what the idle baseline leaves out
        // is the wait for a core that every request has under this load.
        let loaded = summary.get("probe").filter(|p| !p.is_null()).context("the simulation ran no /healthz probe")?;
        if number(loaded, "/count")? <= 0.0 {
            bail!("the /healthz probe under load measured nothing");
        }
        for kind in ["assistant-request", "tool-calls"] {
            for (label, field) in [("p50", "p50_ms"), ("p99", "p99_ms")] {
                self.rows.push(Row {
                    benchmark: "2. Agent latency".into(),
                    metric: format!("{kind} {label}, {peak:.0} calls in flight, {} backends", backends.label()),
                    unit: "ms",
                    callplane: number(&summary, &format!("/latency/{kind}/{field}"))?,
                    baseline: Some(number(loaded, &format!("/{field}"))?),
                    baseline_is: format!(
                        "GET /healthz sent meanwhile ({LOADED_PROBE_RATE}/s, the same steady window, {:.0} samples)",
                        number(loaded, "/count")?
                    ),
                    note: String::new(),
                });
            }
        }
        Ok(json!({ "simulation": summary, "healthz": probe }))
    }

    fn realtime(&mut self) -> Result<()> {
        let mut runs = Vec::new();
        for &subscribers in &self.sizes.realtime_subscribers.clone() {
            let (events, timeout) = (self.sizes.realtime_events, self.sizes.short_timeout);
            let args =
                format!("realtime --subscribers {subscribers} --events {events} --rate 20 --timeout-secs 120 --json");
            let summary =
                self.profiled(&format!("realtime-{subscribers}"), |b| b.loadgen_json(&args, timeout, true))?;
            for side in ["callplane", "baseline"] {
                let delivered = number(&summary, &format!("/{side}/delivered"))?;
                let expected = number(&summary, &format!("/{side}/expected"))?;
                if delivered != expected || expected <= 0.0 {
                    bail!("{side}: {delivered} of {expected} events delivered to {subscribers} subscribers");
                }
            }
            for (label, field) in [("p50", "p50_ms"), ("p99", "p99_ms")] {
                self.rows.push(Row {
                    benchmark: "5. Real time".into(),
                    metric: format!("webhook sent → event on the WebSocket, {label}, {subscribers} subscribers"),
                    unit: "ms",
                    callplane: number(&summary, &format!("/callplane/latency/{field}"))?,
                    baseline: Some(number(&summary, &format!("/baseline/latency/{field}"))?),
                    baseline_is: "pg_notify → one LISTEN → broadcast → plain tokio-tungstenite sockets".into(),
                    note: String::new(),
                });
            }
            runs.push(summary);
        }
        self.raw.insert("realtime".into(), Value::Array(runs));
        Ok(())
    }

    fn dashboard(&mut self) -> Result<()> {
        let mut loaded = 0;
        let mut runs = Vec::new();
        let db = self.database_url()?;
        for (seed, &(calls, orgs)) in self.sizes.dashboard_loads.clone().iter().enumerate() {
            let (months, share) = (self.sizes.dashboard_months, self.sizes.dashboard_transcript_share);
            let load = self.loadgen_json(
                &format!(
                    "load --database-url {db} --calls {calls} --orgs {orgs} --months {months} \
                     --transcript-share {share} --seed {} --json",
                    100 + seed
                ),
                self.sizes.long_timeout,
                false,
            )?;
            loaded += calls;
            let (requests, timeout) = (self.sizes.dashboard_requests, self.sizes.long_timeout);
            let args = format!("dashboard --database-url {db} --requests {requests} --orgs 50 --json");
            // The unpartitioned copy first, so that a profile samples the requests only.
            let flat = self.loadgen_json(&format!("{args} --prepare-only"), timeout, false)?;
            let name = format!("dashboard-{}", human_count(loaded));
            let summary = self.profiled(&name, |b| b.loadgen_json(&args, timeout, false))?;
            if number(&summary, "/errors")? != 0.0 {
                bail!("dashboard requests failed at {loaded} calls");
            }
            let stored = number(&summary, "/stored_calls")?;
            let size = human_count(loaded);
            for (page, pointer) in [("first page", "first_page"), ("?status=ended", "filtered_page")] {
                if number(&summary, &format!("/{pointer}/mean_page_size"))? <= 0.0 {
                    bail!("GET /v1/calls {page} returned empty pages");
                }
                for (label, field) in [("p50", "p50_ms"), ("p95", "p95_ms")] {
                    let partitioned = number(&summary, &format!("/{pointer}/sql_partitioned/{field}"))?;
                    self.rows.push(Row {
                        benchmark: "4. Dashboard".into(),
                        metric: format!("GET /v1/calls {page} {label}, {size} calls loaded"),
                        unit: "ms",
                        callplane: number(&summary, &format!("/{pointer}/api/{field}"))?,
                        baseline: Some(number(&summary, &format!("/{pointer}/sql_flat/{field}"))?),
                        baseline_is: "the same SQL on an unpartitioned copy with the same index".into(),
                        note: format!(
                            "SQL on the partitioned table {partitioned:.2} ms (ratio {:.2}); {stored:.0} calls stored",
                            number(&summary, &format!("/{pointer}/api/{field}"))? / partitioned.max(f64::MIN_POSITIVE)
                        ),
                    });
                }
            }
            if summary.get("search").is_some_and(|s| !s.is_null()) {
                if number(&summary, "/search/mean_hits")? <= 0.0 {
                    bail!("GET /v1/search found nothing at {loaded} calls");
                }
                let transcripts = number(&summary, "/search/transcripts")?;
                for (label, field) in [("p50", "p50_ms"), ("p95", "p95_ms")] {
                    self.rows.push(Row {
                        benchmark: "4. Dashboard".into(),
                        metric: format!("GET /v1/search {label}, {} transcripts", human_count(transcripts as u64)),
                        unit: "ms",
                        callplane: number(&summary, &format!("/search/api/{field}"))?,
                        baseline: Some(number(&summary, &format!("/search/sql/{field}"))?),
                        baseline_is: "the search's own SQL straight on the database".into(),
                        note:
                            "first page of 20 over 366 days; queries: a word, a phrase, a quoted phrase, an exclusion"
                                .into(),
                    });
                }
            }
            runs.push(json!({ "load": load, "flat": flat, "dashboard": summary }));
        }
        self.raw.insert("dashboard".into(), Value::Array(runs));
        Ok(())
    }

    /// Benchmark 9 (phase 3), on a cluster of its own, loaded by the bulk loader, then given a
    /// streaming replica (`pg_basebackup`) and PgBouncer in transaction mode in front: the
    /// dashboard's first page under webhook ingest with every read on the primary, then with
    /// reads on the replica; and the primary's client connections, sampled while calls are in
    /// flight, with callplane connecting straight to it, then through PgBouncer.
    fn replica(&mut self) -> Result<()> {
        let (calls, requests, in_flight) =
            (self.sizes.storage_calls, self.sizes.storage_requests, self.sizes.agent_in_flight);
        let (short, long, settings) = (self.sizes.short_timeout, self.sizes.long_timeout, self.sizes.settings);
        let bin = self.cluster.as_ref().context("no cluster")?.cluster().bin_dir().to_path_buf();
        let root = util::target_dir().join("xtask/bench-replica");
        let mut primary = Postgres::start_fresh(&bin, root.join("primary/data"), settings)?;
        let url = primary.database_url();
        let inbox = self.out_dir.join("replica-inbox");
        if inbox.exists() {
            fs::remove_dir_all(&inbox).with_context(|| format!("could not remove {}", inbox.display()))?;
        }
        let base = &self.loadgen.as_ref().context("the server is not running")?.spec;
        let mut spec =
            ServerSpec::new(base.binary.clone(), pg::free_port()?, &url, self.out_dir.join("replica-server.log"))
                .with_env("CALLPLANE__INBOX__DIR", inbox.to_string_lossy())
                .with_env(PIPELINE_SETTING, "inline")
                .with_env("CALLPLANE__DATABASE__MAX_CONNECTIONS", "40");
        for name in BACKEND_SETTINGS {
            spec = spec.with_env(name, Backends::Postgres.setting());
        }
        spec.migrate()?;
        let loadgen_binary = self.loadgen_binary.clone();
        let loadgen = |spec: &ServerSpec| Loadgen { binary: loadgen_binary.clone(), spec: spec.clone() };
        loadgen(&spec).json(
            &format!("load --database-url {url} --calls {calls} --orgs 50 --months 3 --transcript-share 0.2 --seed 400 --json"),
            long,
            false,
        )?;
        let replica = pg::Cluster::new(bin.clone(), root.join("replica/data"), pg::free_port()?)?;
        replica.destroy()?;
        replica.replicate(primary.cluster(), settings)?;
        replica.start(settings)?;
        let mut replica = pg::StopOnDrop::new(replica);
        let replica_url = replica.cluster().url(stack::DATABASE);

        // Calls of about ten webhooks a second apart: `in_flight` of them at once, started at the
        // pace that keeps that many in flight, three times over (about 30 s).
        let simulate = |label: &str, in_flight: usize| {
            format!(
                "simulate --orgs 20 --plans pro=1,business=1 --calls {calls} --max-concurrent {in_flight} \
                 --rate {rate:.1} --event-gap-ms 1000 --duration-mean 30 --duration-max 60 --label {label} --seed 43 --json",
                calls = in_flight * 3,
                rate = in_flight as f64 / 10.0,
            )
        };
        let dashboard = |spec: &ServerSpec, label: &str| -> Result<(Value, Value, String)> {
            let mut server = spec.start(Duration::from_secs(60))?;
            let lg = loadgen(spec);
            let ingest = lg.spawn(&simulate(label, in_flight), true)?;
            // Let the ingest reach its pace before measuring.
            std::thread::sleep(Duration::from_secs(3));
            let measured = lg.json(
                &format!("dashboard --database-url {url} --requests {requests} --orgs 50 --json"),
                short,
                false,
            );
            let metrics = http::get(
                std::net::SocketAddr::from(([127, 0, 0, 1], spec.http_port)),
                "/metrics",
                Duration::from_secs(5),
            )
            .map(|r| r.body)
            .unwrap_or_default();
            let ingested = stack::last_json(&ingest.wait(long)?)?;
            server.stop()?;
            Ok((measured?, ingested, metrics))
        };
        let (on_primary, ingest_a, _) = dashboard(&spec, "replica-off")?;
        let with_replica = spec.clone().with_env("CALLPLANE__DATABASE__REPLICA_URL", &replica_url);
        let (on_replica, ingest_b, metrics) = dashboard(&with_replica, "replica-on")?;
        for (summary, what) in [(&on_primary, "primary"), (&on_replica, "replica")] {
            if number(summary, "/errors")? != 0.0 {
                bail!("dashboard requests failed with reads on the {what}: {summary}");
            }
        }
        self.check_simulation("9. ingest beside the dashboard, reads on the primary", &ingest_a)?;
        self.check_simulation("9. ingest beside the dashboard, reads on the replica", &ingest_b)?;
        let on = http::metric(&metrics, "callplane_replica_reads_total").unwrap_or(0.0);
        let fell_back = http::metric(&metrics, "callplane_replica_fallbacks_total").unwrap_or(0.0);
        for (label, field) in [("p50", "p50_ms"), ("p95", "p95_ms")] {
            self.rows.push(Row {
                benchmark: "9. Replica".into(),
                metric: format!("GET /v1/calls first page {label} under ingest, reads on the replica, {} calls", human_count(calls)),
                unit: "ms",
                callplane: number(&on_replica, &format!("/first_page/api/{field}"))?,
                baseline: Some(number(&on_primary, &format!("/first_page/api/{field}"))?),
                baseline_is: "the same, every read on the primary".into(),
                note: format!(
                    "{in_flight} calls in flight alongside; the replica answered {on:.0} reads, the primary {fell_back:.0} in its stead"
                ),
            });
        }

        // The primary's client connections while calls are in flight.
        let bouncer = crate::pooler::binary()?;
        let mut pooler =
            crate::pooler::PgBouncer::start(&bouncer, &root.join("pgbouncer"), pg::free_port()?, primary.port())?;
        let pooled_url = format!("{}/{}", pooler.url().trim_end_matches("/postgres"), stack::DATABASE);
        let connections = |spec: &ServerSpec, label: &str| -> Result<(f64, Value)> {
            let mut server = spec.start(Duration::from_secs(60))?;
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sampler = {
                let (done, mut psql) = (done.clone(), primary.psql_command());
                psql.arg("-c").arg(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND application_name <> 'psql'",
                );
                std::thread::spawn(move || {
                    let mut most = 0.0_f64;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(out) = psql.output() {
                            most = most.max(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0.0));
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    most
                })
            };
            let summary = loadgen(spec).json(&simulate(label, in_flight), long, true);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let most = sampler.join().unwrap_or(0.0);
            server.stop()?;
            Ok((most, summary?))
        };
        let (direct, sim_direct) = connections(&spec, "pool-direct")?;
        let pooled = spec
            .clone()
            .with_env("CALLPLANE__DATABASE__URL", &pooled_url)
            .with_env("CALLPLANE__DATABASE__DIRECT_URL", &url);
        let (through, sim_pooled) = connections(&pooled, "pool-pgbouncer")?;
        pooler.stop();
        self.check_simulation("9. calls in flight, straight to the primary", &sim_direct)?;
        self.check_simulation("9. calls in flight, through PgBouncer", &sim_pooled)?;
        let peak = number(&sim_pooled, "/max_in_flight")?;
        let p99 = |s: &Value| number(s, "/latency/assistant-request/p99_ms").unwrap_or(f64::NAN);
        self.rows.push(Row {
            benchmark: "9. Pooler".into(),
            metric: format!("primary's client connections (most seen), {peak:.0} calls in flight, through PgBouncer"),
            unit: "conns",
            callplane: through,
            baseline: Some(direct),
            baseline_is: "the same load, callplane straight to the primary".into(),
            note: format!(
                "database.max_connections 40, PgBouncer default_pool_size 20; the answer pool (4) and the listeners stay direct; \
                 assistant-request p99 {:.1} ms through it, {:.1} ms direct",
                p99(&sim_pooled),
                p99(&sim_direct)
            ),
        });
        self.raw.insert(
            "replica".into(),
            json!({ "dashboard_on_primary": on_primary, "dashboard_on_replica": on_replica,
                    "connections_direct": direct, "connections_pooled": through,
                    "simulate_direct": sim_direct, "simulate_pooled": sim_pooled }),
        );
        replica.stop()?;
        primary.stop()?;
        Ok(())
    }

    /// Benchmark 8 (phase 3), on a database of its own in the same cluster, with a server of
    /// its own and an `s3s-fs`: the bulk loader's calls, every one with a transcript; the
    /// database's size before and after moving the transcripts to the store (then `VACUUM
    /// FULL`, without which the space is reused but the files keep their size) and after
    /// archiving the months older than six; `GET /v1/calls/{id}` for the same calls with the
    /// transcript in Postgres, then in the store.
    fn storage(&mut self) -> Result<()> {
        let (calls, orgs, requests) = (self.sizes.storage_calls, self.sizes.storage_orgs, self.sizes.storage_requests);
        let timeout = self.sizes.long_timeout;
        let cluster = self.cluster.as_ref().context("no cluster")?;
        cluster.psql(&format!("DROP DATABASE IF EXISTS {STORAGE_DATABASE}"))?;
        cluster.psql(&format!("CREATE DATABASE {STORAGE_DATABASE}"))?;
        let url = cluster.cluster().url(STORAGE_DATABASE);
        let s3 = crate::s3::Server::start(&self.out_dir.join("s3"), pg::free_port()?)?;
        let inbox = self.out_dir.join("storage-inbox");
        if inbox.exists() {
            fs::remove_dir_all(&inbox).with_context(|| format!("could not remove {}", inbox.display()))?;
        }
        let base = &self.loadgen.as_ref().context("the server is not running")?.spec;
        let port = pg::free_port()?;
        let mut spec = ServerSpec::new(base.binary.clone(), port, &url, self.out_dir.join("storage-server.log"))
            .with_env("CALLPLANE__INBOX__DIR", inbox.to_string_lossy())
            .with_env("CALLPLANE__BACKENDS__TRANSCRIPTS", "postgres")
            .with_env(PIPELINE_SETTING, "inline");
        for name in BACKEND_SETTINGS {
            spec = spec.with_env(name, Backends::Postgres.setting());
        }
        for (name, value) in s3.settings("storage") {
            spec = spec.with_env(name, value);
        }
        spec.migrate()?;
        let loadgen = |spec: &ServerSpec| Loadgen { binary: self.loadgen_binary.clone(), spec: spec.clone() };
        let load = loadgen(&spec).json(
            &format!(
                "load --database-url {url} --calls {calls} --orgs {orgs} --months 12 --transcript-share 1 --seed 300 --json"
            ),
            timeout,
            false,
        )?;
        let sizes = |what: &str| -> Result<Value> {
            let mut psql = cluster.psql_command();
            psql.args(["-d", STORAGE_DATABASE, "-c"]).arg(
                "SELECT json_build_object('database', pg_database_size(current_database()),                  'calls', (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits                            WHERE inhparent = 'calls'::regclass),                  'transcripts', (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits                                  WHERE inhparent = 'call_transcripts'::regclass))",
            );
            let out = util::run_captured(&mut psql)?;
            let sizes: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("sizes {what}"))?;
            eprintln!("xtask: storage: sizes {what}: {sizes}");
            Ok(sizes)
        };
        let mib = |v: &Value, key: &str| -> Result<f64> { Ok(number(v, &format!("/{key}"))? / (1024.0 * 1024.0)) };
        let details = |spec: &ServerSpec| -> Result<Value> {
            let mut server = spec.start(Duration::from_secs(60))?;
            let summary = loadgen(spec).json(
                &format!("details --database-url {url} --requests {requests} --orgs 20 --json"),
                self.sizes.short_timeout,
                false,
            );
            server.stop()?;
            let summary = summary?;
            if number(&summary, "/errors")? != 0.0 || number(&summary, "/mean_messages")? <= 0.0 {
                bail!("GET /v1/calls/{{id}} failed or read no messages: {summary}");
            }
            Ok(summary)
        };
        let cli = |spec: &ServerSpec, args: &[&str]| -> Result<Value> {
            let mut command = Command::new(&spec.binary);
            command
                .arg("--json")
                .args(args)
                .envs(spec.env.iter().cloned())
                .current_dir(util::repo_root())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            eprintln!("xtask: $ callplane --json {}", args.join(" "));
            stack::last_json(&run_with_timeout(command, timeout)?)
        };

        let loaded = sizes("loaded")?;
        let in_postgres = details(&spec)?;
        let moved = cli(&spec, &["transcripts", "move", "--to", "object-store", "--batch", "1000"])?;
        if number(&moved, "/left")? != 0.0 {
            bail!("transcripts were left in the database: {moved}");
        }
        util::run_captured(cluster.psql_command().args([
            "-d",
            STORAGE_DATABASE,
            "-c",
            "VACUUM FULL call_transcripts",
        ]))?;
        let after_move = sizes("after moving the transcripts")?;
        let on_objects = spec.clone().with_env("CALLPLANE__BACKENDS__TRANSCRIPTS", "object-store");
        let in_store = details(&on_objects)?;
        // The months older than six; the CLI is told that no event older than 150 days arrives.
        let today = chrono::Utc::now().date_naive();
        let cut = chrono::NaiveDate::from_ymd_opt(chrono::Datelike::year(&today), chrono::Datelike::month(&today), 1)
            .and_then(|d| d.checked_sub_months(chrono::Months::new(6)))
            .context("six months ago")?
            .format("%Y-%m")
            .to_string();
        let archiving = on_objects.clone().with_env("CALLPLANE__PARTITIONS__MAX_PAST_DAYS", "150");
        let archived = cli(&archiving, &["partitions", "archive", "--before", &cut])?;
        let months = archived["archived"].as_array().cloned().unwrap_or_default();
        if months.is_empty() {
            bail!("no month was archived before {cut}: {archived}");
        }
        let sum = |key: &str| months.iter().filter_map(|m| m[key].as_f64()).sum::<f64>();
        let after_archive = sizes("after archiving")?;
        drop(s3);

        let bench = "8. Storage (phase 3)";
        let transcripts = number(&moved, "/moved")?;
        self.rows.push(Row {
            benchmark: bench.into(),
            metric: format!("database size after moving {} transcripts to s3s-fs", human_count(transcripts as u64)),
            unit: "MiB",
            callplane: mib(&after_move, "database")?,
            baseline: Some(mib(&loaded, "database")?),
            baseline_is: format!("the same database before: {} calls, each with a transcript", human_count(calls)),
            note: format!(
                "call_transcripts {:.0} → {:.0} MiB (VACUUM FULL); moved at {:.0}/s",
                mib(&loaded, "transcripts")?,
                mib(&after_move, "transcripts")?,
                transcripts / number(&moved, "/seconds")?.max(0.001)
            ),
        });
        self.rows.push(Row {
            benchmark: bench.into(),
            metric: format!("database size after archiving the {} months before {cut}", months.len()),
            unit: "MiB",
            callplane: mib(&after_archive, "database")?,
            baseline: Some(mib(&after_move, "database")?),
            baseline_is: "the same database before archiving".into(),
            note: format!(
                "{:.0} calls and {:.0} transcripts in {:.1} MiB of Parquet ({:.0} MiB in the database), in {:.1} s",
                sum("calls"),
                sum("transcripts"),
                sum("bytes") / (1024.0 * 1024.0),
                sum("database_bytes") / (1024.0 * 1024.0),
                sum("seconds"),
            ),
        });
        let sampled = number(&in_store, "/calls_sampled")?;
        for (label, field) in [("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms")] {
            self.rows.push(Row {
                benchmark: bench.into(),
                metric: format!("GET /v1/calls/{{id}} {label}, transcript in s3s-fs ({sampled:.0} calls)"),
                unit: "ms",
                callplane: number(&in_store, &format!("/api/{field}"))?,
                baseline: Some(number(&in_postgres, &format!("/api/{field}"))?),
                baseline_is: "the same calls, transcript in Postgres".into(),
                note: format!("{:.0} messages per transcript", number(&in_store, "/mean_messages")?),
            });
        }
        self.raw.insert(
            "storage".into(),
            json!({ "load": load, "sizes": { "loaded": loaded, "after_move": after_move, "after_archive": after_archive },
                    "move": moved, "archive": archived, "details": { "postgres": in_postgres, "object_store": in_store } }),
        );
        Ok(())
    }

    fn memory(&mut self) -> Result<()> {
        let idle = self.idle_rss_kb.context("the idle RSS was not measured")?;
        if idle == 0 {
            bail!("the idle RSS reads as zero");
        }
        self.rows.push(Row {
            benchmark: "6. Memory".into(),
            metric: "server RSS, idle after start".into(),
            unit: "MiB",
            callplane: idle as f64 / 1024.0,
            baseline: None,
            baseline_is: "—".into(),
            note: String::new(),
        });
        match self.peak_rss_kb {
            Some(peak) if peak > 0 => self.rows.push(Row {
                benchmark: "6. Memory".into(),
                metric: "server RSS, peak during benchmark 1".into(),
                unit: "MiB",
                callplane: peak as f64 / 1024.0,
                baseline: Some(idle as f64 / 1024.0),
                baseline_is: "the same server idle".into(),
                note: String::new(),
            }),
            Some(_) => bail!("the RSS under load reads as zero"),
            None => eprintln!("xtask: benchmark 1 did not run, so there is no RSS under load"),
        }
        // Idle WebSockets across organizations: what each costs, and that closing them gives
        // the memory back.
        let pid = self.server.as_ref().context("no server")?.pid();
        let (sockets, orgs, settle) = if self.options.quick { (200, 10, 2) } else { (2000, 100, 12) };
        let hold = self.loadgen_json(
            &format!(
                "realtime-hold --sockets {sockets} --orgs {orgs} --server-pid {pid} --settle-secs {settle} --json"
            ),
            self.sizes.short_timeout,
            true,
        )?;
        for (metric, field) in [
            (format!("server RSS, {sockets} idle WebSockets open ({orgs} organizations)"), "/rss_open_kib"),
            ("server RSS after those WebSockets closed".to_owned(), "/rss_closed_kib"),
        ] {
            self.rows.push(Row {
                benchmark: "6. Memory".into(),
                metric,
                unit: "MiB",
                callplane: number(&hold, field)? / 1024.0,
                baseline: Some(number(&hold, "/rss_idle_kib")? / 1024.0),
                baseline_is: "the same server before opening them".into(),
                note: String::new(),
            });
        }
        self.raw.insert("realtime_hold".into(), hold);
        Ok(())
    }

    /// Facts about the machine and the database, recorded with the results.
    fn machine_facts(&self, started_at: &str) -> Result<Value> {
        let settings = [
            "shared_buffers",
            "max_connections",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "work_mem",
            "max_wal_size",
            "effective_cache_size",
        ];
        let mut facts = stack::run_facts(started_at, &self.options, &settings, |sql| self.psql(sql))?;
        if self.redis.is_some() {
            let version = stack::command_output(redis::SERVER, &["--version"]);
            // `Redis server v=7.0.15 sha=...`
            let version = version.split_whitespace().find_map(|w| w.strip_prefix("v=")).unwrap_or(&version);
            facts["redis"] = json!(version);
        }
        Ok(facts)
    }

    /// Writes `results.json` and the markdown table.
    fn write_results(&self, facts: &Value, started_at: &str, all_passed: bool) -> Result<()> {
        let results = json!({
            "machine": facts,
            "started_at": started_at,
            "finished_at": utc_now(),
            "results": self.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "books": self.books.iter().map(|b| json!({
                "benchmark": b.benchmark, "calls": b.calls, "billable_seconds": b.seconds, "balanced": b.balanced,
            })).collect::<Vec<_>>(),
            "raw": self.raw,
            "profiles": self.profiles.as_ref().map(|p| p.iter().map(|(name, summary)| json!({
                "name": name, "summary": summary,
            })).collect::<Vec<_>>()),
        });
        if let Some(profiles) = &self.profiles {
            let text = profiles.iter().map(|(_, summary)| summary.as_str()).collect::<Vec<_>>().join("\n");
            let path = self.out_dir.join("profiles.md");
            fs::write(&path, text).with_context(|| format!("could not write {}", path.display()))?;
            eprintln!("xtask: profiles in {}", path.display());
        }
        let json_path = self.out_dir.join("results.json");
        fs::write(&json_path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("could not write {}", json_path.display()))?;
        let markdown = self.markdown(facts);
        eprintln!("\n{markdown}");
        // Only a successful full run of every benchmark, unprofiled, replaces the published
        // results (sampling costs a little of the machine).
        if self.options.quick || self.options.only.len() < ALL.len() || !all_passed || self.profiles.is_some() {
            let path = self.out_dir.join("results.md");
            fs::write(&path, &markdown).with_context(|| format!("could not write {}", path.display()))?;
            eprintln!("xtask: results in {} and {}", json_path.display(), path.display());
        } else {
            let path = util::repo_root().join("docs/BENCHMARKS.md");
            stack::update_section(&path, MARKERS, &markdown)?;
            eprintln!("xtask: results in {} and {}", json_path.display(), path.display());
        }
        Ok(())
    }

    fn markdown(&self, facts: &Value) -> String {
        let text = |key: &str| facts.get(key).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
        let mut out = String::new();
        out.push_str(&format!(
            "### Results: {} run of {}\n\n",
            text("mode").unwrap_or_default(),
            text("date").unwrap_or_default()
        ));
        out.push_str(&format!(
            "Machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}. PostgreSQL {} ({}).{} callplane {}, {} build; \
             server, databases and load generator share the machine.\n\n",
            text("nproc").unwrap_or_default(),
            text("cpu").unwrap_or_default(),
            facts.get("memory_gib").and_then(Value::as_f64).unwrap_or(0.0),
            text("kernel").unwrap_or_default(),
            text("postgres").unwrap_or_default(),
            text("postgres_settings").unwrap_or_default(),
            text("redis").map_or_else(String::new, |v| format!(" Redis {v} (no persistence).")),
            match facts.get("callplane_bin").and_then(Value::as_str) {
                Some(path) => format!("binary {path}"),
                None => format!("{} with `--features phase3`", text("commit").unwrap_or_default()),
            },
            text("build").unwrap_or_default(),
        ));
        out.push_str("| Benchmark | Metric | callplane | Raw baseline | Ratio | Baseline | Note |\n");
        out.push_str("|---|---|---:|---:|---:|---|---|\n");
        for row in &self.rows {
            let baseline = row.baseline.map_or_else(|| "—".to_string(), |b| format_value(b, row.unit));
            let ratio = row.ratio().map_or_else(|| "—".to_string(), |r| format!("{r:.2}"));
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                row.benchmark,
                row.metric,
                format_value(row.callplane, row.unit),
                baseline,
                ratio,
                row.baseline_is,
                row.note
            ));
        }
        out.push_str("\nBooks (every simulated call recorded once; ledger, counters and `GET /v1/usage` equal to the simulated billable seconds, a Redis counter read through `GET /v1/usage`; no dead letters):\n\n");
        for books in &self.books {
            out.push_str(&format!(
                "- {}: {} calls, {} billable seconds: {}\n",
                books.benchmark,
                books.calls,
                books.seconds,
                if books.balanced { "balanced" } else { "DO NOT BALANCE" }
            ));
        }
        out
    }
}

/// Benchmark 1's raw transaction, per call: what the pipeline writes for an end-of-call report.
const INGEST_SCRIPT: &str = r"\set n random(1, 1000000000000)
\set org random(1, :orgs)
BEGIN;
INSERT INTO call_keys (vapi_call_id, organization_id, created_at)
  SELECT 'pgb-' || :client_id || '-' || :n, id, now() FROM bench_orgs WHERE n = :org;
INSERT INTO calls (id, organization_id, created_at, call_type, status, status_rank, ended_reason, started_at, ended_at,
                   duration_seconds, billable_seconds, reported_at, last_event_at)
  SELECT 'pgb-' || :client_id || '-' || :n, id, now(), 'inboundPhoneCall', 'ended', 5, 'customer-ended-call',
         now() - interval '181 seconds', now(), 180.5, 181, now(), now() FROM bench_orgs WHERE n = :org;
INSERT INTO usage_ledger (call_id, organization_id, period_start, call_started_at, duration_seconds, billable_seconds,
                          ended_reason)
  SELECT 'pgb-' || :client_id || '-' || :n, id, date_trunc('month', now()), now() - interval '181 seconds', 180.5, 181,
         'customer-ended-call' FROM bench_orgs WHERE n = :org;
UPDATE organizations SET seconds_used = seconds_used + 181, updated_at = now()
  WHERE id = (SELECT id FROM bench_orgs WHERE n = :org);
END;
";

/// The transcript row, added to [`INGEST_SCRIPT`] for the second baseline.
const TRANSCRIPT_INSERT: &str = r"INSERT INTO call_transcripts (call_id, organization_id, created_at, transcript, messages, is_final)
  SELECT 'pgb-' || :client_id || '-' || :n, o.id, now(), t.transcript, t.messages, true
  FROM bench_orgs o, bench_transcript t WHERE o.n = :org;
";

/// Benchmark 3's raw limit: one row updated by every client.
const HOT_ROW_SCRIPT: &str =
    "UPDATE organizations SET seconds_used = seconds_used + 1 WHERE id = CAST(:hot AS uuid);\n";

/// A number at a JSON pointer, or an error naming it.
fn number(value: &Value, pointer: &str) -> Result<f64> {
    value
        .pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("no number at {pointer} in the loadgen's summary"))
}

/// The row of `test` in `redis-benchmark --csv` output, as {column: number} after its header
/// (`"test","rps","avg_latency_ms",...`).
fn csv_row(output: &str, test: &str) -> Option<serde_json::Map<String, Value>> {
    let fields = |line: &str| line.split(',').map(|f| f.trim().trim_matches('"').to_owned()).collect::<Vec<_>>();
    let mut rows = output.lines().map(fields);
    let header = rows.find(|row| row.first().is_some_and(|f| f == "test"))?;
    let row = rows.find(|row| row.first().is_some_and(|f| f == test))?;
    let numbers =
        header.into_iter().zip(row).skip(1).filter_map(|(name, value)| Some((name, json!(value.parse::<f64>().ok()?))));
    Some(numbers.collect())
}

/// The smallest bucket bound (ms) of the server's webhook latency histogram for `kind` that holds
/// the `quantile` share of its requests, from `/metrics`' text.
fn server_side_quantile(metrics: &str, kind: &str, quantile: f64) -> Option<f64> {
    histogram_quantile(metrics, "callplane_webhook_seconds", &format!("type=\"{kind}\""), quantile)
}

/// The upper bound (ms) of the bucket of a server-side histogram `name` (with `labels`, as in
/// `type="tool-calls"`, or none) that holds the `quantile`.
fn histogram_quantile(metrics: &str, name: &str, labels: &str, quantile: f64) -> Option<f64> {
    let sep = if labels.is_empty() { "" } else { "," };
    let prefix = format!("{name}_bucket{{{labels}{sep}le=\"");
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.parse::<f64>().ok()?, count.trim().parse::<f64>().ok()?))
        })
        .collect();
    let total = metrics
        .lines()
        .find_map(|l| {
            let count = if labels.is_empty() { format!("{name}_count ") } else { format!("{name}_count{{{labels}}} ") };
            l.strip_prefix(&count).map(str::to_owned)
        })?
        .trim()
        .parse::<f64>()
        .ok()?;
    buckets.iter().find(|(_, count)| total > 0.0 && *count / total >= quantile).map(|(le, _)| le * 1000.0)
}

/// Formats a figure for the table: rates and sizes without decimals, latencies with two.
fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "ms" => format!("{value:.2} ms"),
        "MiB" => format!("{value:.1} MiB"),
        "/s" => format!("{value:.0}/s"),
        other => format!("{value:.2} {other}"),
    }
}

/// `1000000` → `1M`, `20000` → `20k`.
fn human_count(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let options =
            Options::parse(&["--quick".into(), "--only".into(), "ingest,memory".into()], ALL, "benchmark", USAGE)
                .unwrap();
        assert!(options.quick && !options.release_build());
        assert!(options.runs("ingest") && options.runs("memory") && !options.runs("agent"));
        assert!(Options::parse(&["--only".into(), "nope".into()], ALL, "benchmark", USAGE).is_err());
        assert!(Options::parse(&[], ALL, "benchmark", USAGE).unwrap().release_build());
    }

    #[test]
    fn figures_are_formatted() {
        assert_eq!(human_count(1_000_000), "1M");
        assert_eq!(human_count(20_000), "20k");
        assert_eq!(human_count(1_234), "1234");
        assert_eq!(format_value(1.234, "ms"), "1.23 ms");
        assert_eq!(format_value(1234.4, "/s"), "1234/s");
        let row = Row {
            benchmark: "b".into(),
            metric: "m".into(),
            unit: "/s",
            callplane: 50.0,
            baseline: Some(200.0),
            baseline_is: String::new(),
            note: String::new(),
        };
        assert_eq!(row.ratio(), Some(0.25));
    }

    #[test]
    fn histogram_quantiles_are_read_with_and_without_labels() {
        let metrics = "callplane_webhook_seconds_bucket{type=\"tool-calls\",le=\"0.001\"} 50\n\
                       callplane_webhook_seconds_bucket{type=\"tool-calls\",le=\"0.005\"} 99\n\
                       callplane_webhook_seconds_bucket{type=\"tool-calls\",le=\"+Inf\"} 100\n\
                       callplane_webhook_seconds_count{type=\"tool-calls\"} 100\n\
                       callplane_report_to_ledger_seconds_bucket{le=\"0.01\"} 1\n\
                       callplane_report_to_ledger_seconds_bucket{le=\"0.1\"} 4\n\
                       callplane_report_to_ledger_seconds_bucket{le=\"+Inf\"} 4\n\
                       callplane_report_to_ledger_seconds_count 4\n";
        assert_eq!(server_side_quantile(metrics, "tool-calls", 0.5), Some(1.0));
        assert_eq!(server_side_quantile(metrics, "tool-calls", 0.99), Some(5.0));
        assert_eq!(histogram_quantile(metrics, "callplane_report_to_ledger_seconds", "", 0.5), Some(100.0));
        assert_eq!(histogram_quantile(metrics, "callplane_report_to_ledger_seconds", "", 0.25), Some(10.0));
        assert_eq!(server_side_quantile(metrics, "assistant-request", 0.5), None);
    }

    #[test]
    fn redis_benchmark_csv_is_read() {
        let output =
            "\"test\",\"rps\",\"avg_latency_ms\",\"p50_latency_ms\"\n\"INCR\",\"64474.53\",\"0.520\",\"0.343\"\n";
        let incr = csv_row(output, "INCR").unwrap();
        assert_eq!(incr.get("rps").and_then(Value::as_f64), Some(64474.53));
        assert_eq!(incr.get("p50_latency_ms").and_then(Value::as_f64), Some(0.343));
        assert!(csv_row(output, "SET").is_none() && csv_row("", "INCR").is_none());
    }
}
