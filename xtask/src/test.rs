//! `cargo xtask test`: the whole test suite against a throwaway PostgreSQL cluster, followed by a
//! check that every phase feature combination builds and validates its default configuration,
//! by the quick benchmarks (`cargo xtask bench --quick`) and by the quick fault suite
//! (`cargo xtask chaos --quick`).

use std::process::{ExitCode, Stdio};

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

/// Runs the test suite; `nextest_args` are appended to `cargo nextest run`.
pub fn test(nextest_args: &[String]) -> Result<ExitCode> {
    // Report missing tools before doing any work.
    let bin = pg::bin_dir()?;
    check_nextest()?;

    with_test_cluster(bin, |report, cluster| {
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
    with_test_cluster(bin, |report, cluster| {
        report.step("psql -c 'select 1'", || {
            let port = cluster.port().to_string();
            let mut command = cluster.client("psql");
            command.args(["-X", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-c", "select 1"]);
            util::run(&mut command)
        });
    })
}

/// Starts a fresh test cluster, runs `steps` against it, always stops it, prints the summary and
/// returns the exit code.
fn with_test_cluster(bin: std::path::PathBuf, steps: impl FnOnce(&mut Report, &Cluster)) -> Result<ExitCode> {
    util::install_ctrlc_handler()?;
    let mut report = Report::default();

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
fn start_test_cluster(bin: std::path::PathBuf) -> Result<StopOnDrop> {
    let data = util::repo_root().join("target/xtask/pg-test");
    let cluster = Cluster::new(bin, data, pg::free_port()?)?;
    cluster.destroy()?;
    cluster.init()?;
    cluster.start(TEST_SETTINGS)?;
    Ok(StopOnDrop::new(cluster))
}

/// Fails with an installation hint when `cargo nextest` is not available.
fn check_nextest() -> Result<()> {
    let available = util::cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !available {
        bail!("cargo-nextest not found: cargo install cargo-nextest --locked");
    }
    Ok(())
}
