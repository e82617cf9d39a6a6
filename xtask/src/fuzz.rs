//! `cargo xtask fuzz`: every property test (a test whose name starts with `prop_`) with far more
//! cases than `cargo xtask test` gives it (proptest's default, 256), at least a million in all,
//! on a release build. Properties live next to the code they test or in `crates/*/tests/props.rs`;
//! proptest reads the number of cases from `PROPTEST_CASES`, and saves a failing input under
//! `proptest-regressions/` beside the test, where the next run tries it first.

use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util;

/// The cases run in all when `--cases` is not given, shared out evenly.
const TOTAL_CASES: u64 = 1_000_000;

/// nextest's filter for property tests: `prop_` at the start of the name or of its last part.
const FILTER: &str = "test(/(^|::)prop_/)";

pub fn fuzz(args: &[String]) -> Result<ExitCode> {
    let cases_per_property = match args {
        [] => None,
        [flag, n] if flag == "--cases" => Some(n.parse::<u64>().with_context(|| format!("--cases {n:?}"))?),
        _ => bail!("usage: cargo xtask fuzz [--cases N]"),
    };
    let packages = packages_with_properties()?;
    if packages.is_empty() {
        bail!("no crate under crates/ has a test named prop_*");
    }
    let nextest = |subcommand: &str| {
        let mut command = util::cargo();
        command.args(["nextest", subcommand, "--cargo-profile", "release", "-E", FILTER]);
        for package in &packages {
            command.args(["-p", package]);
        }
        command
    };

    // Listing builds the test binaries, with the build's progress on the terminal.
    let mut list = nextest("list");
    list.args(["--message-format", "oneline"]).stderr(Stdio::inherit());
    let listed = util::run_captured(&mut list)?;
    let properties: Vec<String> =
        String::from_utf8_lossy(&listed.stdout).lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect();
    if properties.is_empty() {
        bail!("nextest found no property test in {}", packages.join(", "));
    }
    let count = properties.len() as u64;
    let cases = cases_per_property.unwrap_or(TOTAL_CASES.div_ceil(count));
    eprintln!("xtask: {count} properties in {}, {cases} cases each:", packages.join(", "));
    for property in &properties {
        eprintln!("  {property}");
    }

    let started = Instant::now();
    let mut run = nextest("run");
    run.arg("--no-fail-fast").env("PROPTEST_CASES", cases.to_string());
    let outcome = util::run(&mut run);
    let elapsed = util::format_duration(started.elapsed());
    let total = count * cases;
    match outcome {
        Ok(()) => {
            eprintln!(
                "\nxtask: fuzz passed: {count} properties x {cases} cases = {total} cases in {elapsed}; no panic and no broken property"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!(
                "\nxtask: fuzz FAILED after {elapsed} ({count} properties x {cases} cases): {error:#}\n\
                 The minimal failing input of each failing property is printed above and saved under proptest-regressions/."
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The packages under `crates/` with a `fn prop_` in their sources or tests.
fn packages_with_properties() -> Result<Vec<String>> {
    let crates = util::repo_root().join("crates");
    let mut packages = Vec::new();
    for entry in std::fs::read_dir(&crates).with_context(|| format!("reading {}", crates.display()))? {
        let dir = entry?.path();
        let manifest = dir.join("Cargo.toml");
        if !manifest.is_file() || !(mentions_property(&dir.join("src"))? || mentions_property(&dir.join("tests"))?) {
            continue;
        }
        let text = std::fs::read_to_string(&manifest)?;
        let name = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = \"")?.strip_suffix('"'))
            .with_context(|| format!("no package name in {}", manifest.display()))?;
        packages.push(name.to_owned());
    }
    packages.sort();
    Ok(packages)
}

/// Whether any `.rs` file under `dir` defines a `prop_` function.
fn mentions_property(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let found = if path.is_dir() {
            mentions_property(&path)?
        } else {
            path.extension().is_some_and(|e| e == "rs") && std::fs::read_to_string(&path)?.contains("fn prop_")
        };
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}
