//! `cargo xtask bench --profile`: where the machine's CPU goes while callplane is measured.
//!
//! `perf record -a -g` samples every CPU (callplane, PostgreSQL, the load generator, the
//! kernel, idle) at 499 Hz for the window a benchmark measures callplane in. The samples are
//! folded into stacks (`profile-<name>.folded`, the input of any flame graph tool, e.g.
//! `inferno-flamegraph < profile-ingest.folded > ingest.svg`), and summed two ways in
//! `profile-<name>.md`: the share of the machine each process takes, and within callplane the
//! share of each part of the work. A sample is given to the first part named on its stack,
//! from the leaf up, so the parts add up to callplane's whole; the frames below them (the
//! allocator, `memcpy`, the kernel's side of a syscall) count for the part that called them.
//!
//! The server is built with frame pointers (`-C force-frame-pointers=yes`) and line tables in
//! its own target directory, `target/profiling`, so the stacks are whole and the usual build
//! is left alone.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::util;

/// Sampling frequency: prime, so it does not beat with a periodic timer.
const HZ: &str = "499";

/// The parts of callplane's work, each by the symbols that are its own. Checked in this order
/// on each frame, leaf first.
const PARTS: &[(&str, &[&str])] = &[
    ("inbox (redb)", &["redb::"]),
    ("JSON (serde_json)", &["serde_json::", "serde::de", "serde::ser", "<serde_json"]),
    ("HMAC / SHA-256", &["sha2::", "hmac::", "ring::"]),
    ("PostgreSQL client (sqlx)", &["sqlx_postgres::", "sqlx_core::", "sqlx::"]),
    ("Redis client", &["redis::"]),
    ("logging (tracing)", &["tracing_subscriber::", "tracing_core::", "tracing::"]),
    ("HTTP (hyper, axum)", &["hyper::", "hyper_util::", "axum::", "tower::", "h2::", "http_body"]),
    ("callplane's own code", &["callplane_"]),
    ("async runtime (tokio)", &["tokio::"]),
];

/// Builds `callplane` (with `features`) with frame pointers and line tables, in release mode,
/// into `target/profiling`, and returns its path.
pub fn build_server(features: &[&str]) -> Result<PathBuf> {
    let target = util::target_dir().join("profiling");
    let mut command = util::cargo();
    command.args(["build", "--release", "-p", "callplane-server"]);
    for feature in features {
        command.args(["--features", &format!("callplane-server/{feature}")]);
    }
    command.env("CARGO_TARGET_DIR", &target);
    command.env("CARGO_PROFILE_RELEASE_DEBUG", "line-tables-only");
    command.env("RUSTFLAGS", "-C force-frame-pointers=yes");
    util::run(&mut command)?;
    Ok(target.join("release").join("callplane"))
}

/// A running `perf record`.
pub struct Recording {
    child: Child,
    data: PathBuf,
    name: String,
    server_pid: u32,
}

/// Whether `perf` is there and may sample the whole machine.
pub fn check_available() -> Result<()> {
    let out = Command::new("perf").arg("--version").output().context(
        "`perf` is not installed (apt-get install linux-perf, or linux-tools-$(uname -r)); --profile needs it",
    )?;
    if !out.status.success() {
        bail!("`perf --version` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Recording {
    /// Starts sampling every CPU; `server_pid` is callplane's.
    pub fn start(out_dir: &Path, name: &str, server_pid: u32) -> Result<Self> {
        let data = out_dir.join(format!("perf-{name}.data"));
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-F", HZ, "-q", "-o"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("could not start `perf record`")?;
        eprintln!("xtask: profiling {name} (perf record -a -g -F {HZ})");
        Ok(Self { child, data, name: name.to_string(), server_pid })
    }

    /// Stops sampling and writes `profile-<name>.folded` and `profile-<name>.md` beside the
    /// data; returns the summary's markdown.
    pub fn finish(mut self) -> Result<String> {
        let pid = self.child.id().to_string();
        // perf writes its data on SIGINT.
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        self.child.wait().context("waiting for perf record")?;
        let out_dir = self.data.parent().map(Path::to_path_buf).unwrap_or_default();
        let script = Command::new("perf")
            .args(["script", "-F", "comm,pid,ip,sym,dso", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("could not run `perf script`")?;
        let text = String::from_utf8_lossy(&script.stdout);
        let samples = parse_script(&text, self.server_pid);
        if samples.is_empty() {
            bail!("perf recorded no samples for {}", self.name);
        }
        let folded = fold(&samples);
        fs::write(out_dir.join(format!("profile-{}.folded", self.name)), folded)?;
        let summary = summarize(&self.name, &samples);
        fs::write(out_dir.join(format!("profile-{}.md", self.name)), &summary)?;
        let _ = fs::remove_file(&self.data);
        eprintln!("xtask: wrote {}", out_dir.join(format!("profile-{}.md", self.name)).display());
        Ok(summary)
    }
}

/// One sample: which process it was in, and its stack, leaf first.
#[derive(Debug)]
struct Sample {
    process: String,
    frames: Vec<String>,
}

/// Reads `perf script -F comm,pid,ip,sym,dso`: a header line `comm pid` per sample, then one
/// line per frame (`addr sym+off (dso)`), then a blank line.
fn parse_script(text: &str, server_pid: u32) -> Vec<Sample> {
    // (comm, pid, frames, dsos) per sample.
    let mut raw: Vec<(String, u32, Vec<String>, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(|c: char| c.is_whitespace()) {
            // `comm` may hold spaces; the pid is the last word.
            let mut words = line.split_whitespace().collect::<Vec<_>>();
            let pid = words.pop().and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
            raw.push((words.join(" "), pid, Vec::new(), Vec::new()));
            continue;
        }
        let Some((_, _, frames, dsos)) = raw.last_mut() else { continue };
        let line = line.trim();
        // `addr sym+0xoff (dso)`
        let (rest, dso) = match line.rfind(" (") {
            Some(at) => (&line[..at], line[at + 2..].trim_end_matches(')')),
            None => (line, ""),
        };
        let sym = rest.split_once(' ').map_or("[unknown]", |(_, s)| s);
        let sym = sym.rsplit_once("+0x").map_or(sym, |(s, _)| s);
        frames.push(sym.to_string());
        dsos.push(dso.rsplit('/').next().unwrap_or(dso).to_string());
    }
    // A process is the load generator when any of its stacks runs in its binary (its samples
    // in the kernel alone show only the thread's name).
    let loadgen: std::collections::HashSet<u32> = raw
        .iter()
        .filter(|(_, _, _, dsos)| dsos.iter().any(|d| d == "callplane-loadgen"))
        .map(|(_, pid, _, _)| *pid)
        .collect();
    raw.into_iter()
        .map(|(comm, pid, frames, _)| Sample {
            process: process_of(&comm, pid, server_pid, loadgen.contains(&pid)),
            frames,
        })
        .collect()
}

/// The process a sample belongs to, named for the reader (the benchmarks' CPU sampler names
/// processes the same way).
pub(crate) fn process_of(comm: &str, pid: u32, server_pid: u32, is_loadgen: bool) -> String {
    if pid == server_pid {
        return "callplane".into();
    }
    if pid == 0 || comm == "swapper" {
        return "idle".into();
    }
    if is_loadgen {
        return "load generator".into();
    }
    match comm {
        "postgres" => "PostgreSQL".into(),
        "pgbench" => "pgbench".into(),
        "redis-server" => "Redis".into(),
        _ if comm.starts_with("kworker") || comm.starts_with("ksoftirqd") => "kernel threads".into(),
        _ => "everything else".into(),
    }
}

/// The part of callplane's work a stack belongs to: the first named part from the leaf up.
fn part_of(frames: &[String]) -> &'static str {
    for frame in frames {
        for (part, prefixes) in PARTS {
            if prefixes.iter().any(|p| frame.contains(p)) {
                return part;
            }
        }
    }
    if frames.first().is_some_and(|f| f.starts_with("[unknown]")) || frames.is_empty() {
        "unresolved"
    } else {
        "other (libc, kernel)"
    }
}

/// Stacks folded to `process;root;...;leaf count`, the flame graph tools' input.
fn fold(samples: &[Sample]) -> String {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for s in samples {
        let mut key = s.process.replace(';', ":");
        for frame in s.frames.iter().rev() {
            key.push(';');
            key.push_str(&frame.replace(';', ":"));
        }
        *counts.entry(key).or_default() += 1;
    }
    let mut lines: Vec<_> = counts.into_iter().collect();
    lines.sort();
    lines.into_iter().fold(String::new(), |mut out, (k, n)| {
        let _ = writeln!(out, "{k} {n}");
        out
    })
}

fn share(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 * 100.0 / of as f64 }
}

/// The summary: the machine by process, callplane by part, callplane's hottest symbols.
fn summarize(name: &str, samples: &[Sample]) -> String {
    let total = samples.len() as u64;
    let mut by_process: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_part: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_leaf: HashMap<&str, u64> = HashMap::new();
    let mut callplane = 0u64;
    for s in samples {
        *by_process.entry(&s.process).or_default() += 1;
        if s.process == "callplane" {
            callplane += 1;
            *by_part.entry(part_of(&s.frames)).or_default() += 1;
            let leaf = s.frames.iter().find(|f| !f.starts_with("[unknown]")).map_or("[unknown]", String::as_str);
            *by_leaf.entry(leaf).or_default() += 1;
        }
    }
    let mut out = format!("#### Profile: {name} ({total} samples at {HZ} Hz on every CPU)\n\n");
    out.push_str("| Process | Share of the machine |\n|---|---:|\n");
    for (process, n) in sorted(by_process) {
        let _ = writeln!(out, "| {process} | {:.1}% |", share(n, total));
    }
    out.push_str("\n| callplane's work | Share of callplane | Share of the machine |\n|---|---:|---:|\n");
    for (part, n) in sorted(by_part) {
        let _ = writeln!(out, "| {part} | {:.1}% | {:.1}% |", share(n, callplane), share(n, total));
    }
    out.push_str("\n| callplane's hottest symbols (self) | Share of callplane |\n|---|---:|\n");
    for (leaf, n) in sorted(by_leaf).into_iter().take(15) {
        let leaf: String = leaf.chars().take(100).collect();
        let _ = writeln!(out, "| `{}` | {:.1}% |", leaf.replace('|', "\\|"), share(n, callplane));
    }
    out
}

fn sorted<K: Ord, I: IntoIterator<Item = (K, u64)>>(counts: I) -> Vec<(K, u64)> {
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
tokio-runtime-w 4242
\t    55d0c1 serde_json::de::Deserializer<R>::parse_str+0x21 (/work/target/profiling/release/callplane)
\t    55d0c2 callplane_core::vapi::parse_body+0x10 (/work/target/profiling/release/callplane)

tokio-runtime-w 4242
\t    7f0001 __memmove_avx_unaligned_erms+0x3 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t    55d0c3 sqlx_postgres::connection::stream::PgStream::send+0x5 (/work/target/profiling/release/callplane)

postgres 777
\t    ffff01 copy_user_generic+0x1 ([kernel.kallsyms])

swapper 0
\t    ffff02 default_idle+0x1 ([kernel.kallsyms])

tokio-runtime-w 999
\t    5500 hyper::proto::h1::role::encode+0x1 (/work/target/release/callplane-loadgen)
";

    #[test]
    fn samples_are_read_split_by_process_and_given_to_the_part_nearest_the_leaf() {
        let samples = parse_script(SCRIPT, 4242);
        let processes: Vec<_> = samples.iter().map(|s| s.process.as_str()).collect();
        assert_eq!(processes, ["callplane", "callplane", "PostgreSQL", "idle", "load generator"]);
        assert_eq!(part_of(&samples[0].frames), "JSON (serde_json)");
        assert_eq!(part_of(&samples[1].frames), "PostgreSQL client (sqlx)", "memmove counts for its caller");
        let folded = fold(&samples);
        assert!(
            folded
                .contains("callplane;callplane_core::vapi::parse_body;serde_json::de::Deserializer<R>::parse_str 1\n"),
            "{folded}"
        );
        let summary = summarize("ingest", &samples);
        assert!(summary.contains("| callplane | 40.0% |"), "{summary}");
        assert!(summary.contains("| JSON (serde_json) | 50.0% | 20.0% |"), "{summary}");
    }
}
