//! `cargo xtask test`: a check that every tool it needs is installed, the quality gate (`cargo fmt
//! --check`, then clippy with warnings denied), the whole test suite against a throwaway
//! PostgreSQL cluster, a check that every phase feature combination builds and validates its
//! default configuration, the quick benchmarks (`cargo xtask bench --quick`) and the quick fault
//! suite (`cargo xtask chaos --quick`).

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Result, bail};

use crate::pg::{self, Cluster, StopOnDrop};
use crate::util::{self, Report};
use crate::{bench, chaos};

/// The variable through which tests find the database server (the testkit creates a database
/// per test in it).
const TEST_DATABASE_ENV: &str = "CALLPLANE_TEST_DATABASE_URL";

/// Server settings for a disposable cluster: durability off for speed, room for parallel tests.
const TEST_SETTINGS: &[&str] =
    &["fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=400", "shared_buffers=256MB"];

/// The feature umbrellas checked besides the default build (which the main run covers).
const PHASES: &[&str] = &["phase2", "phase3"];

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

        report.step("cargo nextest run --workspace", || {
            let mut command = util::cargo();
            command
                .args(["nextest", "run", "--workspace", "--no-fail-fast"])
                .args(nextest_args)
                .env(TEST_DATABASE_ENV, &url);
            util::run(&mut command)
        });

        if util::env_flag("XTASK_SKIP_FEATURE_CHECKS") {
            report.skip("phase feature checks", "XTASK_SKIP_FEATURE_CHECKS is set");
        } else {
            for phase in PHASES {
                report.step(&format!("default configuration with --features {phase}"), || {
                    let mut command = util::cargo();
                    command
                        .args(["test", "-p", "callplane-server", "--lib", "--no-default-features"])
                        .args(["--features", phase, "--", "default_configuration"])
                        .env(TEST_DATABASE_ENV, &url);
                    util::run(&mut command)
                });
            }
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

/// Checks every tool the run needs and names each one missing with how to install it, before
/// any work starts. Returns PostgreSQL's `bin` directory.
fn check_prerequisites() -> Result<PathBuf> {
    let bin = pg::bin_dir();
    let mut missing: Vec<String> = bin.as_ref().err().map(|error| format!("{error:#}")).into_iter().collect();
    let tools = [
        ("rustfmt (cargo fmt)", with_args(util::cargo(), &["fmt", "--version"]), "rustup component add rustfmt"),
        ("clippy (cargo clippy)", with_args(util::cargo(), &["clippy", "--version"]), "rustup component add clippy"),
        ("cargo-nextest", with_args(util::cargo(), &["nextest", "--version"]), "cargo install cargo-nextest --locked"),
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
