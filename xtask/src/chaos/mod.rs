//! `cargo xtask chaos [--quick] [--only NAME,...]`: the fault suite. Each experiment breaks
//! something under simulated VAPI traffic and then checks that nothing was lost, nothing was
//! billed twice and VAPI's questions were still answered in time:
//!
//! 1. `db-stop`: PostgreSQL stops (`pg_ctl stop -m immediate`) for 15 s mid-traffic, then starts.
//! 2. `server-kill`: `kill -9` of callplane mid-traffic, restarted at once with the same
//!    configuration and inbox directory.
//! 3. `table-lock`: a session holds `LOCK TABLE organizations IN ACCESS EXCLUSIVE MODE` for 10 s.
//! 4. `burst`: 2,000 webhooks opened at once (assistant requests, end-of-call reports and the
//!    messages in between, of distinct calls), with the server's resident memory at its peak and
//!    60 s after it goes idle.
//!
//! Then the same on the Temporal pipeline (`backends.event_pipeline = "temporal"`, phase 2),
//! against a Temporal development server the suite starts (its state in a SQLite file, so a
//! restart keeps the workflows), at a lower call rate the development server can keep up with:
//!
//! 5. `temporal-restart`: the Temporal server stops (SIGTERM) for 10 s mid-traffic, then starts
//!    again on its database: hand-overs wait in the inbox meanwhile.
//! 6. `worker-kill`: `serve` runs no worker (`temporal.worker = "off"`); the `callplane worker`
//!    process is killed with `kill -9` mid-traffic, with workflows and activities in hand, and a
//!    new one started at once.
//! 7. `temporal-db-stop`: PostgreSQL stops for 30 s mid-traffic; the workflows' steps retry
//!    until it is back.
//!
//! Every experiment runs a fresh `callplane serve` (with its own inbox directory under
//! `target/chaos/<experiment>`) against one PostgreSQL cluster the suite starts and stops. Its
//! traffic comes from `callplane-loadgen`, which retries a delivery after a refused or reset
//! connection or a 503 (honouring `Retry-After`), as a load balancer with a healthy peer would,
//! so that every simulated call reaches the server once it is back. Each experiment ends by
//! waiting for the inbox to drain (`callplane_inbox_depth` = 0), and on Temporal for the books to
//! balance (the workflows finish after the last webhook is answered), then checks:
//!
//! - the books balance: every simulated call recorded once; ledger = counters = `GET /v1/usage`
//!   = the simulated seconds (the loadgen's books check);
//! - nothing lost: `callplane_events_lost_total` = 0 (after a restart the counter starts again,
//!   so the books are the proof there), every call billed;
//! - nothing double-billed;
//! - no 5xx other than 503s, and every 503 carries `Retry-After`;
//! - every `assistant-request` answered 200, admitting the call, within the answer deadline
//!   (1 s, checked at 1.25 s to allow for the client), and `/readyz` answering within 1 s
//!   (checked the same way) throughout;
//! - for the burst, a peak RSS under 256 MiB and an idle RSS under 100 MiB.
//!
//! `--quick` runs the same experiments small (5 s outages, 3 s lock, 300-request burst, 20 s idle
//! wait, 3 s Temporal outage) on the dev build `cargo xtask test` already made. A full run in which every experiment
//! passed rewrites the results in `docs/RELIABILITY.md`; other runs write
//! `target/chaos/results.md`. The suite exits non-zero when any check fails, naming it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::http::{self, FailureKind};
use crate::pg;

mod findings;

use crate::stack::Binaries;
use crate::stack::{
    self, Background, Loadgen, Postgres, RssSampler, RunOptions, ServerProcess, ServerSpec, last_json, rss_kb, utc_now,
    wait_for_ok,
};
use crate::temporal::Temporal;
use crate::util::{self, Report, format_duration};
use findings::{ANSWER_DEADLINE_MS, CLIENT_SLACK_MS, ProbeStats, READYZ_LIMIT, Row, table_header, table_line};

/// The experiments, by the names `--only` takes, in the order they run.
const ALL: &[&str] =
    &["db-stop", "server-kill", "table-lock", "burst", "temporal-restart", "worker-kill", "temporal-db-stop"];

/// The experiments on the Temporal pipeline (the build needs `phase2`, the suite a Temporal
/// server).
const ON_TEMPORAL: &[&str] = &["temporal-restart", "worker-kill", "temporal-db-stop"];

/// Where the generated results go in `docs/RELIABILITY.md`.
const MARKERS: (&str, &str) = ("<!-- chaos:results:start -->", "<!-- chaos:results:end -->");

const USAGE: &str = "\
Usage: cargo xtask chaos [--quick] [--release] [--only NAME,...]

  --quick      small sizes on a dev build (about 2 minutes); part of cargo xtask test
  --release    build the release profile in quick mode too (full mode always does)
  --only       run some experiments: db-stop, server-kill, table-lock, burst, temporal-restart,
               worker-kill, temporal-db-stop

CALLPLANE_BIN=/path/to/callplane runs the experiments against that binary instead of building
callplane-server.
";

type Options = RunOptions;

/// Whether a run may replace the published results: full sizes, every experiment.
fn publishes(options: &Options) -> bool {
    !options.quick && ALL.iter().all(|name| options.runs(name))
}

/// How big each experiment is.
struct Sizes {
    orgs: usize,
    /// Calls started per second, each playing its whole lifecycle `event_gap_ms` apart.
    calls_per_second: f64,
    event_gap_ms: u64,
    duration_mean: u64,
    max_turns: u32,
    /// Traffic before the fault, and after it.
    warmup: Duration,
    tail: Duration,
    db_outage: Duration,
    lock_hold: Duration,
    /// How long a killed server is expected to be away (only sizes the traffic).
    restart_allowance: Duration,
    burst_requests: usize,
    burst_orgs: usize,
    idle_wait: Duration,
    /// The Temporal experiments' traffic: fewer calls, shorter ones (each event is a workflow
    /// signal, and the development server takes about a hundred a second).
    temporal_calls_per_second: f64,
    temporal_max_turns: u32,
    temporal_outage: Duration,
    temporal_db_outage: Duration,
    drain_timeout: Duration,
    /// The loadgen's retry budget per delivery and its request timeout.
    retry: Duration,
    request_timeout: Duration,
    loadgen_timeout: Duration,
    settings: &'static [&'static str],
}

impl Sizes {
    fn quick() -> Self {
        Self {
            orgs: 10,
            calls_per_second: 4.0,
            event_gap_ms: 100,
            duration_mean: 30,
            max_turns: 6,
            warmup: Duration::from_secs(3),
            tail: Duration::from_secs(4),
            db_outage: Duration::from_secs(5),
            lock_hold: Duration::from_secs(3),
            restart_allowance: Duration::from_secs(3),
            burst_requests: 300,
            burst_orgs: 20,
            idle_wait: Duration::from_secs(20),
            temporal_calls_per_second: 1.0,
            temporal_max_turns: 4,
            temporal_outage: Duration::from_secs(3),
            temporal_db_outage: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(120),
            retry: Duration::from_secs(30),
            request_timeout: Duration::from_secs(15),
            loadgen_timeout: Duration::from_secs(180),
            // A crashed PostgreSQL keeps what it wrote to the kernel, so fsync can stay off in
            // the quick run; synchronous_commit stays on, or an immediate stop would lose
            // acknowledged commits and blame callplane for it.
            settings: &["fsync=off", "full_page_writes=off", "max_connections=200", "shared_buffers=128MB"],
        }
    }

    fn full() -> Self {
        Self {
            orgs: 50,
            calls_per_second: 10.0,
            event_gap_ms: 250,
            duration_mean: 90,
            max_turns: 20,
            warmup: Duration::from_secs(10),
            tail: Duration::from_secs(15),
            db_outage: Duration::from_secs(15),
            lock_hold: Duration::from_secs(10),
            restart_allowance: Duration::from_secs(5),
            burst_requests: 2000,
            burst_orgs: 100,
            idle_wait: Duration::from_secs(60),
            temporal_calls_per_second: 2.0,
            temporal_max_turns: 10,
            temporal_outage: Duration::from_secs(10),
            temporal_db_outage: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(300),
            retry: Duration::from_secs(60),
            request_timeout: Duration::from_secs(20),
            loadgen_timeout: Duration::from_secs(900),
            // Production-like durability: every commit is flushed.
            settings: &["max_connections=300", "shared_buffers=512MB"],
        }
    }

    /// Calls for traffic at `per_second` that covers the warm-up, a fault of `fault` and the tail.
    fn calls_at(&self, per_second: f64, fault: Duration) -> usize {
        let seconds = (self.warmup + fault + self.tail).as_secs_f64();
        (seconds * per_second).ceil() as usize
    }
}

/// Polls `/readyz` twice a second on a thread. Refused connections (a killed server) are not
/// counted: only a server that is there and slow to answer is.
struct ReadyProbe {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<ProbeStats>>,
    thread: Option<JoinHandle<()>>,
}

impl ReadyProbe {
    fn start(spec: &ServerSpec) -> Self {
        let (stop, stats) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(ProbeStats::default())));
        let (stop_flag, shared) = (stop.clone(), stats.clone());
        let addr = spec.addr();
        let thread = thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                let result = http::get(addr, "/readyz", Duration::from_secs(3));
                if let Ok(mut stats) = shared.lock() {
                    match result {
                        Ok(response) => {
                            stats.answers += 1;
                            stats.slowest = stats.slowest.max(response.elapsed);
                            if response.elapsed > READYZ_LIMIT + Duration::from_millis(CLIENT_SLACK_MS) {
                                stats.slow += 1;
                            }
                        }
                        Err(failure) if failure.kind == FailureKind::NoAnswer => stats.unanswered += 1,
                        Err(_) => {}
                    }
                }
                thread::sleep(Duration::from_millis(500));
            }
        });
        Self { stop, stats, thread: Some(thread) }
    }

    fn stop(mut self) -> ProbeStats {
        self.halt();
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ReadyProbe {
    fn drop(&mut self) {
        self.halt();
    }
}

/// What a fault did.
struct Fault {
    description: String,
    /// Whether traffic was still flowing when the fault ended.
    mid_traffic: bool,
}

/// Everything the experiments share.
struct Suite {
    options: Options,
    sizes: Sizes,
    out_dir: PathBuf,
    callplane: PathBuf,
    loadgen: PathBuf,
    pg: Option<Postgres>,
    /// Running when an experiment in [`ON_TEMPORAL`] runs.
    temporal: Option<Temporal>,
    rows: Vec<Row>,
    raw: serde_json::Map<String, Value>,
}

/// `cargo xtask chaos ...`.
pub fn chaos(args: &[String]) -> Result<ExitCode> {
    let options = Options::parse(args, ALL, "experiment", USAGE)?;
    util::install_ctrlc_handler()?;
    let mut report = Report::default();
    run(options, &mut report)?;
    report.print_summary();
    Ok(report.exit_code())
}

/// The quick fault suite as one step of `cargo xtask test` (which installed the Ctrl-C handler).
pub fn quick_for_tests() -> Result<()> {
    let mut report = Report::default();
    run(Options::all(true, ALL), &mut report)?;
    report.print_summary();
    if !report.all_passed() {
        bail!("a fault experiment failed (see the summary above)");
    }
    Ok(())
}

fn run(options: Options, report: &mut Report) -> Result<()> {
    let bin = pg::bin_dir()?;
    let sizes = if options.quick { Sizes::quick() } else { Sizes::full() };
    let started_at = utc_now();
    let out_dir = util::target_dir().join("chaos");
    fs::create_dir_all(&out_dir).with_context(|| format!("could not create {}", out_dir.display()))?;
    let on_temporal = ON_TEMPORAL.iter().any(|name| options.runs(name));
    let features: &[&str] = if on_temporal { &["phase2"] } else { &[] };
    let Some(binaries) = Binaries::build(report, &options, features) else { return Ok(()) };
    let mut suite = Suite {
        callplane: binaries.callplane,
        loadgen: binaries.loadgen,
        options,
        sizes,
        out_dir,
        pg: None,
        temporal: None,
        rows: Vec::new(),
        raw: serde_json::Map::new(),
    };

    report.step("start PostgreSQL and migrate", || suite.start(&bin));
    if suite.pg.is_none() {
        return Ok(());
    }
    if on_temporal {
        report.step("start Temporal", || suite.start_temporal());
        if suite.temporal.is_none() {
            report.always("stop PostgreSQL chaos cluster", || suite.pg.take().map_or(Ok(()), |mut pg| pg.stop()));
            return Ok(());
        }
    }
    let facts = suite.machine_facts(&started_at);
    for &name in ALL {
        let title = format!("chaos: {name}");
        if suite.options.runs(name) {
            report.step(&title, || suite.experiment(name));
        } else {
            report.skip(&title, "not in --only");
        }
    }
    if on_temporal {
        report.always("stop Temporal", || suite.temporal.take().map_or(Ok(()), |mut t| t.stop()));
    }
    report.always("stop PostgreSQL chaos cluster", || suite.pg.take().map_or(Ok(()), |mut pg| pg.stop()));
    let all_passed = report.all_passed();
    report.always("write results", || suite.write_results(&facts?, &started_at, all_passed));
    Ok(())
}

impl Suite {
    /// Starts a fresh cluster and migrates it once; each experiment starts its own server.
    fn start(&mut self, bin: &Path) -> Result<()> {
        let pg = Postgres::start_fresh(bin, util::target_dir().join("xtask/pg-chaos"), self.sizes.settings)?;
        let spec = ServerSpec::new(self.callplane.clone(), pg::free_port()?, &pg.database_url(), PathBuf::new());
        self.pg = Some(pg);
        spec.migrate()
    }

    /// Starts a Temporal development server with a fresh database in `target/xtask/temporal-chaos`.
    fn start_temporal(&mut self) -> Result<()> {
        let dir = temporal_dir();
        crate::temporal::stop_leftover(&dir)?;
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("could not remove {}", dir.display()))?;
        }
        let temporal = Temporal::start(&dir, pg::free_port()?)?;
        eprintln!("xtask: started Temporal on {}", temporal.address());
        self.temporal = Some(temporal);
        Ok(())
    }

    fn temporal(&self) -> Result<&Temporal> {
        self.temporal.as_ref().context("Temporal is not running")
    }

    fn pg(&self) -> Result<&Postgres> {
        self.pg.as_ref().context("PostgreSQL is not running")
    }

    /// Runs one experiment and records its row, whether it passed, failed a check or broke.
    fn experiment(&mut self, name: &str) -> Result<()> {
        let mut row = Row { experiment: name.to_string(), ..Row::default() };
        let outcome = self.run_experiment(name, &mut row);
        if let Err(error) = &outcome {
            row.failures.push(format!("error: {error:#}"));
        }
        eprintln!("\n{}", table_header());
        eprintln!("{}", table_line(&row));
        let failures = row.failures.clone();
        self.rows.push(row);
        if !failures.is_empty() {
            bail!("{name}: {}", failures.join("; "));
        }
        Ok(())
    }

    fn run_experiment(&mut self, name: &str, row: &mut Row) -> Result<()> {
        let dir = self.out_dir.join(name);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("could not remove {}", dir.display()))?;
        }
        let inbox = dir.join("inbox");
        fs::create_dir_all(&inbox).with_context(|| format!("could not create {}", inbox.display()))?;
        let spec = ServerSpec::new(
            self.callplane.clone(),
            pg::free_port()?,
            &self.pg()?.database_url(),
            dir.join("server.log"),
        )
        .with_env("CALLPLANE__INBOX__DIR", inbox.to_string_lossy())
        .with_env("CALLPLANE__VAPI__ANSWER_DEADLINE_MS", ANSWER_DEADLINE_MS.to_string());
        let on_temporal = ON_TEMPORAL.contains(&name);
        let spec = if on_temporal {
            spec.with_env("CALLPLANE__BACKENDS__EVENT_PIPELINE", "temporal")
                .with_env("CALLPLANE__TEMPORAL__ADDRESS", self.temporal()?.address())
                // Its own queue: nothing another experiment left in Temporal reaches it.
                .with_env("CALLPLANE__TEMPORAL__TASK_QUEUE", format!("chaos-{name}"))
                .with_env("CALLPLANE__TEMPORAL__WORKER", if name == "worker-kill" { "off" } else { "auto" })
        } else {
            spec
        };
        // The workers apart from `serve`, for the experiment that kills one.
        let mut worker = match name {
            "worker-kill" => Some(Worker::start(&spec, &dir)?),
            _ => None,
        };
        let mut server = spec.start(Duration::from_secs(60))?;
        let rss = RssSampler::start(server.pid());
        let probe = ReadyProbe::start(&spec);
        let loadgen = Loadgen { binary: self.loadgen.clone(), spec: spec.clone() };
        let run_file = dir.join("run.json");

        let mut traffic = loadgen.spawn(&self.traffic_args(name, &run_file), true)?;
        let fault = match name {
            "db-stop" => self.db_stop(name, self.sizes.db_outage, &spec, &mut traffic),
            "server-kill" => self.server_kill(&spec, &mut server, &mut traffic, &rss),
            "table-lock" => self.table_lock(&spec, &mut traffic),
            "temporal-restart" => self.temporal_restart(&spec, &mut traffic),
            "worker-kill" => match worker.as_mut() {
                Some(worker) => self.worker_kill(&spec, worker, &mut traffic),
                None => Err(anyhow::anyhow!("no worker was started")),
            },
            "temporal-db-stop" => self.db_stop(name, self.sizes.temporal_db_outage, &spec, &mut traffic),
            _ => Ok(Fault { description: String::new(), mid_traffic: true }),
        };
        // On a failed fault the experiment is void; traffic, probe and sampler stop as dropped.
        let fault = fault?;
        eprintln!("xtask: [{name}] waiting for the traffic to finish");
        let (status, output) = traffic.finish(self.sizes.loadgen_timeout)?;
        let summary = last_json(&output)?;
        if summary.is_null() {
            bail!("the loadgen printed no summary ({status})");
        }
        row.fault = if name == "burst" {
            format!(
                "{} webhooks at once (answered in {:.1} s)",
                self.sizes.burst_requests,
                summary.get("burst_seconds").and_then(Value::as_f64).unwrap_or(0.0)
            )
        } else {
            fault.description
        };
        if !fault.mid_traffic {
            row.failures
                .push("traffic: the loadgen had finished before the fault ended; it was not mid-traffic".into());
        }
        row.record_traffic(&summary);

        self.wait_drained(name, &spec, row);
        if on_temporal {
            // Drained means handed over: the workflows may still be working.
            self.wait_balanced(name, &loadgen, &run_file)?;
        }
        // Idle means idle: the probe stops before the burst's idle wait.
        row.readyz = probe.stop();
        if name == "burst" {
            eprintln!(
                "xtask: [{name}] idle for {}, then reading the server's RSS",
                format_duration(self.sizes.idle_wait)
            );
            sleep_with_progress(name, "idle", self.sizes.idle_wait, None)?;
            row.rss_idle_kb = rss_kb(server.pid());
        }
        self.read_metrics(&spec, row, on_temporal);
        self.read_books(&loadgen, &run_file, row)?;
        row.rss_peak_kb = Some(rss.stop());
        if let Some(status) = server.exited() {
            row.failures.push(format!("server: callplane exited on its own ({status}); see {}", spec.log.display()));
        }
        server.stop()?;
        if let Some(worker) = worker.as_mut() {
            if let Some(status) = worker.process.exited() {
                row.failures.push(format!(
                    "worker: callplane worker exited on its own ({status}); see {}",
                    worker.log.display()
                ));
            }
            worker.process.stop()?;
        }
        self.raw.insert(name.to_string(), summary);
        row.check((name == "burst").then_some(self.sizes.idle_wait));
        Ok(())
    }

    /// The loadgen command line of an experiment's traffic.
    fn traffic_args(&self, name: &str, run_file: &Path) -> String {
        let s = &self.sizes;
        let common = format!(
            "--retry-secs {} --request-timeout-secs {} --run-file {} --no-check --label {name} --json",
            s.retry.as_secs(),
            s.request_timeout.as_secs(),
            run_file.display()
        );
        if name == "burst" {
            return format!(
                "burst --requests {} --orgs {} --concurrency 16 --duration-mean 30 --max-turns 6 --seed 44 {common}",
                s.burst_requests, s.burst_orgs
            );
        }
        let fault = match name {
            "db-stop" => s.db_outage + Duration::from_secs(2),
            "server-kill" => s.restart_allowance,
            "temporal-restart" => s.temporal_outage + Duration::from_secs(2),
            "worker-kill" => s.restart_allowance,
            "temporal-db-stop" => s.temporal_db_outage + Duration::from_secs(2),
            _ => s.lock_hold,
        };
        let seed = match name {
            "db-stop" => 41,
            "server-kill" => 42,
            "temporal-restart" => 45,
            "worker-kill" => 46,
            "temporal-db-stop" => 47,
            _ => 43,
        };
        let (rate, max_turns) = match ON_TEMPORAL.contains(&name) {
            true => (s.temporal_calls_per_second, s.temporal_max_turns),
            false => (s.calls_per_second, s.max_turns),
        };
        // Calls keep starting while the server stalls, so the concurrency limit is high.
        format!(
            "simulate --orgs {} --calls {} --rate {rate} --max-concurrent 2000 --event-gap-ms {} --duration-mean {} \
             --duration-max {} --max-turns {max_turns} --seed {seed} {common}",
            s.orgs,
            s.calls_at(rate, fault),
            s.event_gap_ms,
            s.duration_mean,
            s.duration_mean * 4,
        )
    }

    /// Waits until the server has taken its first webhook, then for the warm-up.
    fn wait_for_traffic(&self, name: &str, spec: &ServerSpec, traffic: &mut Background) -> Result<()> {
        let started = Instant::now();
        loop {
            if !traffic.is_running() {
                bail!("the loadgen exited before sending any traffic");
            }
            let seen = http::get(spec.addr(), "/metrics", Duration::from_secs(2))
                .ok()
                .and_then(|r| http::metric(&r.body, "callplane_webhook_events_total"))
                .unwrap_or(0.0);
            if seen > 0.0 {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) || util::interrupted() {
                bail!("no webhook reached the server within 120 s");
            }
            thread::sleep(Duration::from_millis(200));
        }
        eprintln!("xtask: [{name}] traffic is flowing; the fault comes in {}", format_duration(self.sizes.warmup));
        sleep_with_progress(name, "warm-up", self.sizes.warmup, Some(traffic))
    }

    fn db_stop(&self, name: &str, outage: Duration, spec: &ServerSpec, traffic: &mut Background) -> Result<Fault> {
        self.wait_for_traffic(name, spec, traffic)?;
        let pg = self.pg()?;
        eprintln!("xtask: [{name}] pg_ctl stop -m immediate; PostgreSQL stays down for {}", format_duration(outage));
        let down = Instant::now();
        pg.crash()?;
        let slept = sleep_with_progress(name, "PostgreSQL down", outage, Some(traffic));
        // Start it again even after Ctrl-C: the other experiments and the cleanup need it.
        let restarted = pg.restart();
        let downtime = down.elapsed();
        slept?;
        restarted.context("PostgreSQL did not start again")?;
        eprintln!("xtask: [{name}] PostgreSQL is back after {}", format_duration(downtime));
        Ok(Fault {
            description: format!("PostgreSQL down {:.1} s", downtime.as_secs_f64()),
            mid_traffic: traffic.is_running(),
        })
    }

    fn server_kill(
        &self,
        spec: &ServerSpec,
        server: &mut ServerProcess,
        traffic: &mut Background,
        rss: &RssSampler,
    ) -> Result<Fault> {
        let name = "server-kill";
        self.wait_for_traffic(name, spec, traffic)?;
        eprintln!("xtask: [{name}] kill -9 {} and restart at once with the same configuration and inbox", server.pid());
        let killed = Instant::now();
        server.kill_now()?;
        note_in_log(&spec.log, "xtask chaos: the server was killed with SIGKILL here and restarted");
        *server = spec.spawn()?;
        rss.follow(server.pid());
        let ready = wait_for_ok(spec.addr(), "/readyz", Duration::from_secs(60));
        let downtime = killed.elapsed();
        ready.context("the restarted server did not become ready")?;
        eprintln!("xtask: [{name}] the new server is ready after {}", format_duration(downtime));
        Ok(Fault {
            description: format!("kill -9; ready again after {:.1} s", downtime.as_secs_f64()),
            mid_traffic: traffic.is_running(),
        })
    }

    fn temporal_restart(&mut self, spec: &ServerSpec, traffic: &mut Background) -> Result<Fault> {
        let name = "temporal-restart";
        self.wait_for_traffic(name, spec, traffic)?;
        let outage = self.sizes.temporal_outage;
        let mut temporal = self.temporal.take().context("Temporal is not running")?;
        let port = temporal.port();
        eprintln!("xtask: [{name}] stopping Temporal (SIGTERM); it stays down for {}", format_duration(outage));
        let down = Instant::now();
        temporal.stop()?;
        drop(temporal);
        let slept = sleep_with_progress(name, "Temporal down", outage, Some(traffic));
        // Start it again even after Ctrl-C: the cleanup expects it.
        let started = Temporal::start(&temporal_dir(), port);
        let downtime = down.elapsed();
        self.temporal = Some(started.context("Temporal did not start again")?);
        slept?;
        eprintln!("xtask: [{name}] Temporal is back after {}", format_duration(downtime));
        Ok(Fault {
            description: format!("Temporal down {:.1} s", downtime.as_secs_f64()),
            mid_traffic: traffic.is_running(),
        })
    }

    fn worker_kill(&self, spec: &ServerSpec, worker: &mut Worker, traffic: &mut Background) -> Result<Fault> {
        let name = "worker-kill";
        self.wait_for_traffic(name, spec, traffic)?;
        eprintln!("xtask: [{name}] kill -9 callplane worker {} and start another at once", worker.process.pid());
        let killed = Instant::now();
        worker.process.kill_now()?;
        note_in_log(&worker.log, "xtask chaos: the worker was killed with SIGKILL here and another started");
        worker.restart(spec)?;
        let downtime = killed.elapsed();
        eprintln!("xtask: [{name}] the new worker answers after {}", format_duration(downtime));
        Ok(Fault {
            description: format!("worker kill -9; another up after {:.1} s", downtime.as_secs_f64()),
            mid_traffic: traffic.is_running(),
        })
    }

    fn table_lock(&self, spec: &ServerSpec, traffic: &mut Background) -> Result<Fault> {
        let name = "table-lock";
        self.wait_for_traffic(name, spec, traffic)?;
        let hold = self.sizes.lock_hold;
        let mut psql = self.pg()?.psql_command();
        // One session: the lock is held until COMMIT, `hold` after it was granted.
        psql.args(["-c", "SET lock_timeout = '10s'", "-c", "BEGIN"])
            .args(["-c", "LOCK TABLE organizations IN ACCESS EXCLUSIVE MODE"])
            .args(["-c", &format!("SELECT pg_sleep({})", hold.as_secs_f64()), "-c", "COMMIT"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        eprintln!("xtask: [{name}] LOCK TABLE organizations IN ACCESS EXCLUSIVE MODE for {}", format_duration(hold));
        let started = Instant::now();
        let lock = Background::spawn(psql)?;
        let slept = sleep_with_progress(name, "organizations locked", hold, Some(traffic));
        let (status, _) = lock.finish(Duration::from_secs(30))?;
        let held = started.elapsed();
        slept?;
        if !status.success() {
            bail!("the psql session holding the lock failed ({status})");
        }
        Ok(Fault {
            description: format!("organizations locked {:.1} s", held.as_secs_f64()),
            mid_traffic: traffic.is_running(),
        })
    }

    /// Reads `GET /metrics` into the row; on Temporal, checks that the events went there.
    fn read_metrics(&self, spec: &ServerSpec, row: &mut Row, on_temporal: bool) {
        match http::get(spec.addr(), "/metrics", Duration::from_secs(5)) {
            Ok(response) => {
                row.record_metrics(&response.body);
                let handed_off = http::metric(&response.body, "callplane_temporal_events_handed_off_total");
                if on_temporal && !handed_off.is_some_and(|n| n > 0.0) {
                    row.failures.push(format!("temporal: no event was handed to Temporal ({handed_off:?})"));
                }
            }
            Err(error) => row.failures.push(format!("lost: GET /metrics failed: {error}")),
        }
    }

    /// `callplane-loadgen books` on the saved run, into the row.
    fn read_books(&self, loadgen: &Loadgen, run_file: &Path, row: &mut Row) -> Result<()> {
        let args = format!("books --run-file {} --json", run_file.display());
        eprintln!("xtask: $ callplane-loadgen {args}");
        let (_, output) = Background::spawn(loadgen.command(&args, false))?.finish(Duration::from_secs(300))?;
        let books = last_json(&output)?;
        if books.is_null() {
            bail!("the books check printed nothing");
        }
        row.record_books(&books);
        Ok(())
    }

    /// Runs the books check until the books balance (the workflows finish after the webhooks
    /// were answered), bounded by the drain timeout and with progress; the final check is
    /// `read_books`'.
    fn wait_balanced(&self, name: &str, loadgen: &Loadgen, run_file: &Path) -> Result<()> {
        let started = Instant::now();
        let timeout = self.sizes.drain_timeout;
        let mut last_print = Instant::now();
        let args = format!("books --run-file {} --json", run_file.display());
        loop {
            let (_, output) = Background::spawn(loadgen.command(&args, false))?.finish(Duration::from_secs(300))?;
            let books = last_json(&output)?;
            let problems = books.get("problem_count").and_then(Value::as_u64);
            if problems == Some(0) {
                eprintln!("xtask: [{name}] the books balance ({})", format_duration(started.elapsed()));
                return Ok(());
            }
            if started.elapsed() >= timeout || util::interrupted() {
                eprintln!("xtask: [{name}] the books did not balance within {}", format_duration(timeout));
                return Ok(());
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                let found = books.get("ledger_rows").and_then(Value::as_u64).unwrap_or(0);
                let expected = books.get("expected_calls").and_then(Value::as_u64).unwrap_or(0);
                eprintln!(
                    "xtask: [{name}] waiting for the workflows: {found} of {expected} calls billed ({} of at most {})",
                    format_duration(started.elapsed()),
                    format_duration(timeout)
                );
                last_print = Instant::now();
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits, bounded and with progress, until `callplane_inbox_depth` reads 0.
    fn wait_drained(&self, name: &str, spec: &ServerSpec, row: &mut Row) {
        let started = Instant::now();
        let timeout = self.sizes.drain_timeout;
        let mut last_print = Instant::now();
        loop {
            let depth = match http::get(spec.addr(), "/metrics", Duration::from_secs(5)) {
                Ok(response) => match http::metric(&response.body, "callplane_inbox_depth") {
                    Some(depth) => Some(depth),
                    None => {
                        row.failures.push("drain: callplane_inbox_depth is not on /metrics".into());
                        return;
                    }
                },
                Err(_) => None,
            };
            if depth == Some(0.0) {
                eprintln!("xtask: [{name}] the inbox is drained ({})", format_duration(started.elapsed()));
                return;
            }
            if started.elapsed() >= timeout || util::interrupted() {
                let what = depth.map_or_else(|| "/metrics did not answer".to_string(), |d| format!("{d} events left"));
                row.failures
                    .push(format!("drain: the inbox did not drain within {}: {what}", format_duration(timeout)));
                return;
            }
            if last_print.elapsed() >= Duration::from_secs(2) {
                let what = depth.map_or_else(|| "/metrics did not answer".to_string(), |d| format!("depth {d}"));
                eprintln!(
                    "xtask: [{name}] waiting for the inbox to drain: {what} ({} of at most {})",
                    format_duration(started.elapsed()),
                    format_duration(timeout)
                );
                last_print = Instant::now();
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    fn machine_facts(&self, started_at: &str) -> Result<Value> {
        let pg = self.pg()?;
        let settings = ["shared_buffers", "max_connections", "fsync", "synchronous_commit", "full_page_writes"];
        stack::run_facts(started_at, &self.options, &settings, |sql| pg.psql(sql))
    }

    /// Writes `results.json` and the table; a full run in which every experiment passed
    /// replaces the results in `docs/RELIABILITY.md`.
    fn write_results(&self, facts: &Value, started_at: &str, all_passed: bool) -> Result<()> {
        let results = json!({
            "machine": facts,
            "started_at": started_at,
            "finished_at": utc_now(),
            "answer_deadline_ms": ANSWER_DEADLINE_MS,
            "rows": self.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "raw": self.raw,
        });
        let json_path = self.out_dir.join("results.json");
        fs::write(&json_path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("could not write {}", json_path.display()))?;
        let markdown = self.markdown(facts);
        eprintln!("\n{markdown}");
        let complete = self.rows.len() == ALL.len() && self.rows.iter().all(Row::passed);
        let path = if publishes(&self.options) && all_passed && complete {
            let path = util::repo_root().join("docs/RELIABILITY.md");
            stack::update_section(&path, MARKERS, &markdown)?;
            path
        } else {
            let path = self.out_dir.join("results.md");
            fs::write(&path, &markdown).with_context(|| format!("could not write {}", path.display()))?;
            path
        };
        eprintln!("xtask: results in {} and {}", json_path.display(), path.display());
        Ok(())
    }

    fn markdown(&self, facts: &Value) -> String {
        let text = |key: &str| {
            facts.get(key).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).unwrap_or_default()
        };
        let s = &self.sizes;
        let mut out = format!("### Results: {} run of {}\n\n", text("mode"), text("date"));
        out.push_str(&format!(
            "Machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}. PostgreSQL {} ({}). callplane {}, {} build; server, \
             PostgreSQL and load generator share the machine. Answer deadline {ANSWER_DEADLINE_MS} ms (checked at \
             {} ms from the client); traffic: {} calls/s over {} organizations, retried for up to {} s after a refused \
             connection or a 503.\n\n",
            text("nproc"),
            text("cpu"),
            facts.get("memory_gib").and_then(Value::as_f64).unwrap_or(0.0),
            text("kernel"),
            text("postgres"),
            text("postgres_settings"),
            match facts.get("callplane_bin").and_then(Value::as_str) {
                Some(path) => format!("binary {path}"),
                None => text("commit"),
            },
            text("build"),
            ANSWER_DEADLINE_MS + CLIENT_SLACK_MS,
            s.calls_per_second,
            s.orgs,
            s.retry.as_secs(),
        ));
        out.push_str(&table_header());
        out.push('\n');
        for row in &self.rows {
            out.push_str(&table_line(row));
            out.push('\n');
        }
        let failed: Vec<&Row> = self.rows.iter().filter(|r| !r.passed()).collect();
        if !failed.is_empty() {
            out.push_str("\nFailed checks:\n\n");
            for row in failed {
                for failure in &row.failures {
                    out.push_str(&format!("- {}: {failure}\n", row.experiment));
                }
            }
        }
        out
    }
}

/// Sleeps `duration`, printing how far along it is every 5 s; fails on Ctrl-C. With `traffic`,
/// also says when the traffic ends early.
fn sleep_with_progress(name: &str, what: &str, duration: Duration, mut traffic: Option<&mut Background>) -> Result<()> {
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut warned = false;
    while started.elapsed() < duration {
        if util::interrupted() {
            bail!("interrupted");
        }
        if let Some(traffic) = traffic.as_deref_mut()
            && !warned
            && !traffic.is_running()
        {
            eprintln!("xtask: [{name}] warning: the traffic ended during the {what}");
            warned = true;
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "xtask: [{name}] {what}: {} of {}",
                format_duration(started.elapsed()),
                format_duration(duration)
            );
            last_print = Instant::now();
        }
        thread::sleep(Duration::from_millis(100).min(duration.saturating_sub(started.elapsed())));
    }
    Ok(())
}

/// Where the suite's Temporal server keeps its database.
fn temporal_dir() -> PathBuf {
    util::target_dir().join("xtask/temporal-chaos")
}

/// A `callplane worker` apart from `serve`, with `serve`'s configuration, its `/metrics` on a
/// port of its own.
struct Worker {
    process: ServerProcess,
    log: PathBuf,
}

impl Worker {
    fn start(spec: &ServerSpec, dir: &Path) -> Result<Self> {
        let log = dir.join("worker.log");
        let process = Self::spawn(spec, &log)?;
        Ok(Self { process, log })
    }

    /// Starts another worker in place of this one (which has exited).
    fn restart(&mut self, spec: &ServerSpec) -> Result<()> {
        self.process = Self::spawn(spec, &self.log)?;
        Ok(())
    }

    /// Starts the worker and waits until its `/healthz` answers (it polls Temporal by then).
    fn spawn(spec: &ServerSpec, log: &Path) -> Result<ServerProcess> {
        let port = pg::free_port()?;
        let spec = spec.clone().with_env("CALLPLANE__TEMPORAL__WORKER_METRICS_ADDR", format!("127.0.0.1:{port}"));
        let mut process = spec.spawn_command("worker", log)?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(error) = wait_for_ok(addr, "/healthz", Duration::from_secs(60)) {
            let _ = process.stop();
            return Err(error.context(format!("callplane worker did not start; see {}", log.display())));
        }
        Ok(process)
    }
}

/// Appends a line to the server's log, to mark where the suite did something to it.
fn note_in_log(log: &Path, text: &str) {
    use std::io::Write;
    if let Ok(mut file) = fs::OpenOptions::new().append(true).open(log) {
        let _ = writeln!(file, "\n==== {text} ====\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let options =
            Options::parse(&["--quick".into(), "--only".into(), "burst,db-stop".into()], ALL, "experiment", USAGE)
                .unwrap();
        assert!(options.quick && !options.release_build());
        assert!(options.runs("burst") && options.runs("db-stop") && !options.runs("server-kill"));
        assert!(!publishes(&options));
        assert!(Options::parse(&["--only".into(), "nope".into()], ALL, "experiment", USAGE).is_err());
        let full = Options::parse(&[], ALL, "experiment", USAGE).unwrap();
        assert!(full.release_build() && publishes(&full));
    }

    #[test]
    fn traffic_covers_the_fault() {
        let quick = Sizes::quick();
        // 3 s warm-up + 5 s outage + 4 s tail at 4 calls a second.
        assert_eq!(quick.calls_at(quick.calls_per_second, quick.db_outage), 48);
        let full = Sizes::full();
        assert_eq!(full.calls_at(full.calls_per_second, full.lock_hold), 350);
        // On Temporal: 10 s warm-up + 30 s outage + 15 s tail at 2 calls a second.
        assert_eq!(full.calls_at(full.temporal_calls_per_second, full.temporal_db_outage), 110);
    }
}
