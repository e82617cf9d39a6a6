//! `cargo xtask test`: a check that every tool it needs is installed, the quality gate (`cargo fmt
//! --check`, then clippy with warnings denied), the whole test suite against a throwaway
//! PostgreSQL cluster, the server's, the cache's and the Temporal pipeline's tests again built
//! with phase 3 (phase 2's Redis backends and Temporal pipeline, phase 3's object store) against a
//! throwaway `redis-server`, Temporal development server and S3-compatible servers, the quick
//! benchmarks (`cargo xtask bench --quick`) and the quick fault
//! suite (`cargo xtask chaos --quick`).

use std::fs;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};

use crate::pg::{self, Cluster, StopOnDrop};
use crate::pooler;
use crate::redis::{self, Durability, Redis};
use crate::s3;
use crate::temporal::{self, Temporal};
use crate::util::{self, Report};
use crate::{bench, chaos};

/// The variable through which tests find the database server (the testkit creates a database
/// per test in it).
const TEST_DATABASE_ENV: &str = "CALLPLANE_TEST_DATABASE_URL";

/// The variable through which tests find the Redis server: built with the `redis` feature, the
/// end-to-end harness serves on the Redis backends with it; without, it is ignored.
const TEST_REDIS_ENV: &str = "CALLPLANE_TEST_REDIS_URL";

/// The phase 2 and 3 run, after the main one: the server's tests (end-to-end included) and the
/// cache's, built with every phase's backends (`phase3` holds `phase2`): Redis, Temporal, and
/// transcripts in object storage against a real S3-compatible server. `--workspace` with the
/// feature named through its package keeps every dependency's features as in the main run, so
/// only what the feature changes is rebuilt (`-p callplane-server` alone would unify fewer
/// features, and rebuild uuid, sqlx and every callplane crate); the filterset then picks the
/// packages' tests.
const PHASE2_ARGS: &[&str] = &[
    "nextest",
    "run",
    "--workspace",
    "--no-fail-fast",
    "--features",
    "callplane-server/phase3",
    "-E",
    "package(callplane-server) | package(callplane-cache) | package(callplane-temporal)",
];

/// The variable through which tests find the Temporal server: built with the `temporal` feature,
/// the end-to-end harness hands its events to Temporal workflows with it.
const TEST_TEMPORAL_ENV: &str = "CALLPLANE_TEST_TEMPORAL_ADDRESS";

/// Server settings for a disposable cluster: durability off for speed, room for parallel tests.
const TEST_SETTINGS: &[&str] =
    &["fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=400", "shared_buffers=256MB"];

/// The oldest Node.js the Stripe SDK in `tests/stripe-node` supports.
const NODE_MAJOR: u32 = 16;

/// Runs the test suite; `nextest_args` are appended to `cargo nextest run`.
pub fn test(nextest_args: &[String]) -> Result<ExitCode> {
    let bin = check_prerequisites()?;
    util::install_ctrlc_handler()?;
    let mut report = Report::default();

    // The quality gate first: it takes seconds, where the suites take minutes. Its failures are
    // reported with the rest rather than stopping the run.
    report.step("cargo fmt --all --check", || util::run(util::cargo().args(["fmt", "--all", "--check"])));
    // All features: the phases are cumulative umbrellas, so this lints the largest build.
    report.step("cargo clippy --workspace --all-targets --all-features -- -D warnings", || {
        util::run(util::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]))
    });

    with_test_cluster(report, bin, |report, cluster| {
        let url = cluster.url("postgres");

        let mut redis = None;
        report.step("start Redis (redis-server)", || {
            redis = Some(start_test_redis()?);
            Ok(())
        });
        let redis_url = redis.as_ref().map(Redis::url);
        if let Some(redis_url) = &redis_url {
            eprintln!("xtask: {TEST_REDIS_ENV}={redis_url}");
        }

        report.step("cargo nextest run --workspace", || {
            let mut command = util::cargo();
            command
                .args(["nextest", "run", "--workspace", "--no-fail-fast"])
                .args(nextest_args)
                .env(TEST_DATABASE_ENV, &url)
                .envs(redis_url.iter().map(|redis_url| (TEST_REDIS_ENV, redis_url)));
            util::run(&mut command)
        });

        let mut temporal = None;
        report.step("start Temporal (temporal server start-dev)", || {
            temporal = Some(start_test_temporal()?);
            Ok(())
        });
        let temporal_address = temporal.as_ref().map(Temporal::address);
        let temporal_cli = temporal.as_ref().map(|t| t.cli().to_path_buf());

        let mut s3fs = None;
        report.step(&format!("install s3s-fs {} (phase 3's S3-compatible server)", s3::VERSION), || {
            s3fs = Some(s3::binary()?);
            Ok(())
        });

        let mut replicated = None;
        report.step("start phase 3's PostgreSQL: a primary, its streaming replica, and PgBouncer in front", || {
            replicated = Some(Replicated::start(cluster.bin_dir())?);
            Ok(())
        });

        let phase2 = format!(
            "phases 2 and 3 (Redis backends, Temporal pipeline, transcripts in S3, reads on a replica, \
             the pool behind PgBouncer): {}",
            util::describe(&with_args(util::cargo(), PHASE2_ARGS))
        );
        match (&redis_url, &temporal_address, &s3fs, &replicated) {
            (Some(redis_url), Some(temporal_address), Some(s3fs), Some(replicated)) => report.step(&phase2, || {
                let mut command = util::cargo();
                command
                    .args(PHASE2_ARGS)
                    .args(nextest_args)
                    .envs(replicated.test_env())
                    .env(TEST_REDIS_ENV, redis_url)
                    .env(TEST_TEMPORAL_ENV, temporal_address)
                    .envs(temporal_cli.iter().map(|cli| ("CALLPLANE_TEST_TEMPORAL_CLI", cli)))
                    .env(s3::TEST_ENV, s3fs);
                util::run(&mut command)
            }),
            _ => report.skip(&phase2, "Redis, Temporal, s3s-fs, the replica or PgBouncer did not start"),
        }
        if let Some(mut replicated) = replicated {
            report.always("stop phase 3's PostgreSQL and PgBouncer", || replicated.stop());
        }
        // Runs even after Ctrl-C, before the benchmarks, which need neither.
        if let Some(mut redis) = redis {
            report.always("stop Redis", || redis.stop());
        }
        if let Some(mut temporal) = temporal {
            report.always("stop Temporal", || temporal.stop());
        }

        // Every benchmark at small sizes, on its own cluster and server: they run, and the
        // simulations' books balance. No timing is asserted.
        if util::env_flag("XTASK_SKIP_BENCH") {
            report.skip("benchmarks (cargo xtask bench --quick)", "XTASK_SKIP_BENCH is set");
        } else {
            report.step("benchmarks (cargo xtask bench --quick)", bench::quick_for_tests);
        }

        // Every fault experiment at small sizes, each on its own server, against the binaries
        // the steps above built: nothing lost, nothing billed twice, answers in time.
        if util::env_flag("XTASK_SKIP_CHAOS") {
            report.skip("fault suite (cargo xtask chaos --quick)", "XTASK_SKIP_CHAOS is set");
        } else {
            report.step("fault suite (cargo xtask chaos --quick)", chaos::quick_for_tests);
        }
    })
}

/// Hidden command: starts the test cluster, runs `select 1` through psql and stops it again.
pub fn pg_smoke() -> Result<ExitCode> {
    let bin = pg::bin_dir()?;
    util::install_ctrlc_handler()?;
    with_test_cluster(Report::default(), bin, |report, cluster| {
        report.step("psql -c 'select 1'", || {
            let port = cluster.port().to_string();
            let mut command = cluster.client("psql");
            command.args(["-X", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-c", "select 1"]);
            util::run(&mut command)
        });
    })
}

/// Starts a fresh test cluster, runs `steps` against it, always stops it, prints the summary of
/// `report` and returns the exit code.
fn with_test_cluster(mut report: Report, bin: PathBuf, steps: impl FnOnce(&mut Report, &Cluster)) -> Result<ExitCode> {
    let mut guard = None;
    report.step("start PostgreSQL test cluster", || {
        guard = Some(start_test_cluster(bin)?);
        Ok(())
    });

    if let Some(mut guard) = guard {
        eprintln!("xtask: {TEST_DATABASE_ENV}={}", guard.cluster().url("postgres"));
        steps(&mut report, guard.cluster());
        // Runs even after Ctrl-C; should it fail, the guard's drop has nothing left to do.
        report.always("stop PostgreSQL test cluster", || guard.stop());
    }

    report.print_summary();
    Ok(report.exit_code())
}

/// Recreates `target/xtask/pg-test` from scratch and starts it on a free loopback port.
fn start_test_cluster(bin: PathBuf) -> Result<StopOnDrop> {
    let data = util::repo_root().join("target/xtask/pg-test");
    let cluster = Cluster::new(bin, data, pg::free_port()?)?;
    cluster.destroy()?;
    cluster.init()?;
    cluster.start(TEST_SETTINGS)?;
    Ok(StopOnDrop::new(cluster))
}

/// Phase 3's database servers: a primary, a streaming replica made from it at birth (so it
/// replays only what this run writes), and PgBouncer in transaction mode in front of the
/// primary. Stopped when dropped.
struct Replicated {
    primary: StopOnDrop,
    replica: StopOnDrop,
    pooler: pooler::PgBouncer,
}

impl Replicated {
    fn start(bin: &std::path::Path) -> Result<Self> {
        let root = util::repo_root().join("target/xtask");
        let primary = Cluster::new(bin.to_path_buf(), root.join("pg-phase3/data"), pg::free_port()?)?;
        let replica = Cluster::new(bin.to_path_buf(), root.join("pg-phase3-replica/data"), pg::free_port()?)?;
        replica.destroy()?;
        primary.destroy()?;
        primary.init()?;
        primary.start(TEST_SETTINGS)?;
        let primary = StopOnDrop::new(primary);
        replica.replicate(primary.cluster(), TEST_SETTINGS)?;
        replica.start(TEST_SETTINGS)?;
        let replica = StopOnDrop::new(replica);
        let bouncer = pooler::binary()?;
        let pooler = pooler::PgBouncer::start(
            &bouncer,
            &root.join("pgbouncer-test"),
            pg::free_port()?,
            primary.cluster().port(),
        )?;
        eprintln!(
            "xtask: phase 3: primary on port {}, replica on {}, PgBouncer on {}",
            primary.cluster().port(),
            replica.cluster().port(),
            pooler.url()
        );
        Ok(Self { primary, replica, pooler })
    }

    /// What the tests find these servers by: the primary is the suite's database server.
    fn test_env(&self) -> Vec<(&'static str, String)> {
        let replica = self.replica.cluster();
        vec![
            (TEST_DATABASE_ENV, self.primary.cluster().url("postgres")),
            ("CALLPLANE_TEST_REPLICA_URL", replica.url("postgres")),
            ("CALLPLANE_TEST_REPLICA_DATA", replica.data_dir().display().to_string()),
            ("CALLPLANE_TEST_PG_BIN", replica.bin_dir().display().to_string()),
            (pooler::TEST_ENV, self.pooler.url()),
        ]
    }

    fn stop(&mut self) -> Result<()> {
        self.pooler.stop();
        // The tests stop and start the replica; one left stopped is no error here.
        let replica = self.replica.stop();
        self.primary.stop()?;
        replica.or_else(|e| if self.replica.cluster().is_running()? { Err(e) } else { Ok(()) })
    }
}

/// Starts a `redis-server` that keeps nothing, in a fresh `target/xtask/redis-test`, on a free
/// loopback port.
fn start_test_redis() -> Result<Redis> {
    let dir = util::repo_root().join("target/xtask/redis-test");
    redis::stop_leftover(&dir)?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("could not remove {}", dir.display()))?;
    }
    Redis::start(&dir, pg::free_port()?, Durability::Throwaway)
}

/// Starts a Temporal development server with a fresh database in `target/xtask/temporal-test`,
/// on a free loopback port.
fn start_test_temporal() -> Result<Temporal> {
    let dir = util::repo_root().join("target/xtask/temporal-test");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("could not remove {}", dir.display()))?;
    }
    Temporal::start(&dir, pg::free_port()?)
}

/// Checks every tool the run needs and names each one missing with how to install it, before
/// any work starts. Returns PostgreSQL's `bin` directory.
fn check_prerequisites() -> Result<PathBuf> {
    let bin = pg::bin_dir();
    let mut missing: Vec<String> = bin.as_ref().err().map(|error| format!("{error:#}")).into_iter().collect();
    let tools = [
        ("rustfmt (cargo fmt)", with_args(util::cargo(), &["fmt", "--version"]), "rustup component add rustfmt"),
        ("clippy (cargo clippy)", with_args(util::cargo(), &["clippy", "--version"]), "rustup component add clippy"),
        ("cargo-nextest", with_args(util::cargo(), &["nextest", "--version"]), "cargo install cargo-nextest --locked"),
        ("redis-server (phase 2's backends)", with_args(Command::new(redis::SERVER), &["--version"]), redis::INSTALL),
        (
            "protoc (the Temporal SDK's build)",
            with_args(Command::new("protoc"), &["--version"]),
            "apt-get install -y protobuf-compiler",
        ),
        (
            "python3 with venv (installs the Temporal CLI from PyPI)",
            with_args(Command::new("python3"), &["-c", "import venv, ensurepip"]),
            temporal::INSTALL,
        ),
        (
            "npm (installs the Stripe SDK for tests/stripe-node)",
            with_args(Command::new("npm"), &["--version"]),
            "apt-get install -y npm",
        ),
    ];
    for (tool, mut command, install) in tools {
        if version(&mut command).is_none() {
            missing.push(format!("{tool} not found: {install}"));
        }
    }
    let node = version(&mut with_args(Command::new("node"), &["--version"]));
    let major = node.as_deref().and_then(|v| v.trim_start_matches('v').split('.').next()?.parse::<u32>().ok());
    if major.is_none_or(|major| major < NODE_MAJOR) {
        let found = node.map(|v| format!(" (found {v})")).unwrap_or_default();
        missing.push(format!(
            "Node.js {NODE_MAJOR} or newer, for the Stripe SDK tests in tests/stripe-node, not found{found}: \
             apt-get install -y nodejs npm"
        ));
    }
    match bin {
        Ok(bin) if missing.is_empty() => Ok(bin),
        _ => bail!("missing prerequisites:\n  {}", missing.join("\n  ")),
    }
}

/// `command` with `args` added, as one expression.
fn with_args(mut command: Command, args: &[&str]) -> Command {
    command.args(args);
    command
}

/// What a `--version` command prints, or `None` when it cannot run or fails.
fn version(command: &mut Command) -> Option<String> {
    let output = command.stderr(Stdio::null()).output().ok().filter(|output| output.status.success())?;
    Some(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
