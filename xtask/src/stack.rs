//! What the benchmark and fault suites run against, and how they watch it: a fresh PostgreSQL
//! cluster with the `callplane` database, `callplane serve` started from a built binary on a
//! loopback port, `callplane-loadgen` run in the foreground or the background, the server's
//! resident memory, and the facts about the machine that go next to published results.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::http;
use crate::pg::{self, Cluster, StopOnDrop};
use crate::util::{self, describe};

/// The database callplane uses in a suite's cluster.
pub const DATABASE: &str = "callplane";
const VAPI_SECRET: &str = "xtask-vapi-secret";
const HMAC_SECRET: &str = "xtask-hmac-secret";
const ADMIN_TOKEN: &str = "xtask-admin-token";

/// A suite's own PostgreSQL cluster with the `callplane` database, stopped when dropped.
/// The command line shared by `bench` and `chaos`: `[--quick] [--release] [--only A,B]`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub quick: bool,
    pub release: bool,
    /// The parts to run, by name.
    pub only: Vec<String>,
}

impl RunOptions {
    /// Every part of `all`.
    pub fn all(quick: bool, all: &[&str]) -> Self {
        Self { quick, release: false, only: all.iter().map(|s| s.to_string()).collect() }
    }

    /// Parses the arguments; `what` names a part in errors ("benchmark", "experiment").
    pub fn parse(args: &[String], all: &[&str], what: &str, usage: &str) -> Result<Self> {
        let mut options = Self::all(false, all);
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--release" => options.release = true,
                "--only" => {
                    let list = args.next().with_context(|| format!("--only needs a list of {what}s"))?;
                    options.only = list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
                    if let Some(unknown) = options.only.iter().find(|name| !all.contains(&name.as_str())) {
                        bail!("unknown {what} {unknown:?}; known: {}", all.join(", "));
                    }
                }
                "-h" | "--help" => {
                    print!("{usage}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{usage}"),
            }
        }
        Ok(options)
    }

    pub fn runs(&self, name: &str) -> bool {
        self.only.iter().any(|n| n == name)
    }

    /// Full sizes always build the release profile; quick ones only when asked.
    pub fn release_build(&self) -> bool {
        self.release || !self.quick
    }
}

/// The binaries a run drives.
pub struct Binaries {
    pub callplane: PathBuf,
    pub loadgen: PathBuf,
}

impl Binaries {
    /// Builds `callplane-loadgen`, and `callplane-server` with `features` unless
    /// `CALLPLANE_BIN` names a callplane built elsewhere (another checkout, another commit), in
    /// the profile the options ask for. `None` when the build failed (the report says why).
    pub fn build(report: &mut util::Report, options: &RunOptions, features: &[&str]) -> Option<Self> {
        Self::build_with(report, options, features, None)
    }

    /// [`build`](Self::build), with `prebuilt` (when given) as the callplane binary, before
    /// `CALLPLANE_BIN`.
    pub fn build_with(
        report: &mut util::Report,
        options: &RunOptions,
        features: &[&str],
        prebuilt: Option<PathBuf>,
    ) -> Option<Self> {
        let profile = if options.release_build() { "release" } else { "debug" };
        let target = util::target_dir().join(profile);
        let prebuilt =
            prebuilt.or_else(|| std::env::var_os("CALLPLANE_BIN").filter(|v| !v.is_empty()).map(PathBuf::from));
        let mut built = false;
        let step = match features {
            [] => "build callplane and callplane-loadgen".to_owned(),
            _ => format!("build callplane (--features {}) and callplane-loadgen", features.join(",")),
        };
        report.step(&step, || {
            let mut command = util::cargo();
            command.args(["build", "-p", "callplane-loadgen"]);
            if prebuilt.is_none() {
                command.args(["-p", "callplane-server"]);
                for feature in features {
                    command.args(["--features", &format!("callplane-server/{feature}")]);
                }
            }
            if options.release_build() {
                command.arg("--release");
            }
            util::run(&mut command)?;
            built = true;
            Ok(())
        });
        built.then(|| Self {
            callplane: prebuilt.unwrap_or_else(|| target.join("callplane")),
            loadgen: target.join("callplane-loadgen"),
        })
    }
}

pub struct Postgres {
    guard: StopOnDrop,
    settings: Vec<String>,
}

impl Postgres {
    /// Deletes whatever is in `data`, creates a cluster there, starts it with `settings` (extra
    /// `-c name=value` options) on a free port and creates the `callplane` database.
    pub fn start_fresh(bin: &Path, data: PathBuf, settings: &[&str]) -> Result<Self> {
        let cluster = Cluster::new(bin.to_path_buf(), data, pg::free_port()?)?;
        cluster.destroy()?;
        cluster.init()?;
        cluster.start(settings)?;
        let postgres =
            Self { guard: StopOnDrop::new(cluster), settings: settings.iter().map(|s| s.to_string()).collect() };
        let port = postgres.port().to_string();
        let mut createdb = postgres.cluster().client("createdb");
        createdb.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", DATABASE]);
        util::run_captured(&mut createdb)?;
        Ok(postgres)
    }

    pub fn cluster(&self) -> &Cluster {
        self.guard.cluster()
    }

    pub fn port(&self) -> u16 {
        self.cluster().port()
    }

    pub fn database_url(&self) -> String {
        self.cluster().url(DATABASE)
    }

    /// `psql` on the `callplane` database, stopping at the first error; add `-c SQL` arguments.
    pub fn psql_command(&self) -> Command {
        let port = self.port().to_string();
        let mut command = self.cluster().client("psql");
        command.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &port]);
        command.args(["-U", "postgres", "-d", DATABASE]);
        command
    }

    /// Runs one SQL string and returns psql's unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let mut command = self.psql_command();
        command.args(["-c", sql]);
        let output = util::run_captured(&mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`: no checkpoint, every
    /// session cut); the next start recovers from the WAL.
    pub fn crash(&self) -> Result<()> {
        self.cluster().stop_immediately()
    }

    /// Starts the server again with the settings it first started with.
    pub fn restart(&self) -> Result<()> {
        let settings: Vec<&str> = self.settings.iter().map(String::as_str).collect();
        self.cluster().start(&settings)
    }

    /// Stops the server now (fast shutdown); dropping it later does nothing more.
    pub fn stop(&mut self) -> Result<()> {
        self.guard.stop()
    }
}

/// How to run `callplane`: the binary, the port it serves on, its environment and its log.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub binary: PathBuf,
    pub http_port: u16,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl ServerSpec {
    /// The configuration both suites use: loopback, the cluster's database, the suites' own
    /// secrets (webhooks signed with HMAC, the admin API on).
    pub fn new(binary: PathBuf, http_port: u16, database_url: &str, log: PathBuf) -> Self {
        let base_url = format!("http://127.0.0.1:{http_port}");
        let env = [
            ("CALLPLANE__DATABASE__URL", database_url.to_string()),
            ("CALLPLANE__SERVER__ADDR", format!("127.0.0.1:{http_port}")),
            ("CALLPLANE__SERVER__PUBLIC_URL", base_url),
            ("CALLPLANE__VAPI__SECRET", VAPI_SECRET.to_string()),
            ("CALLPLANE__VAPI__HMAC__SECRETS", HMAC_SECRET.to_string()),
            ("CALLPLANE__AUTH__ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ];
        Self { binary, http_port, env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), log }
    }

    /// Adds (or replaces) a configuration variable.
    pub fn with_env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_string(), value.into()));
        self
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    /// `callplane migrate`.
    pub fn migrate(&self) -> Result<()> {
        let mut migrate = Command::new(&self.binary);
        migrate.arg("migrate").envs(self.env.iter().cloned()).current_dir(util::repo_root()).stdout(Stdio::null());
        util::run(&mut migrate)
    }

    /// Starts `callplane serve` (its output appended to the log) and waits until `/healthz`
    /// answers.
    pub fn start(&self, ready_within: Duration) -> Result<ServerProcess> {
        let mut server = self.spawn()?;
        match wait_for_ok(self.addr(), "/healthz", ready_within) {
            Ok(_) => Ok(server),
            Err(error) => {
                let exited = server.exited();
                let _ = server.stop();
                match exited {
                    Some(status) => bail!("callplane serve exited ({status}); see {}", self.log.display()),
                    None => Err(error.context(format!("callplane serve did not start; see {}", self.log.display()))),
                }
            }
        }
    }

    /// Starts `callplane serve` without waiting for it, with the open-files limit raised for
    /// thousands of connections.
    pub fn spawn(&self) -> Result<ServerProcess> {
        self.spawn_command("serve", &self.log)
    }

    /// Starts `callplane <command>` with this configuration, its output appended to `log`.
    pub fn spawn_command(&self, command: &str, log: &Path) -> Result<ServerProcess> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("could not open {}", log.display()))?;
        let mut process = raise_open_files(&self.binary);
        process
            .arg(command)
            .envs(self.env.iter().cloned())
            .current_dir(util::repo_root())
            .stdout(file.try_clone()?)
            .stderr(file);
        eprintln!("xtask: $ {} (log: {})", describe(&process), log.display());
        Ok(ServerProcess { child: process.spawn().with_context(|| format!("could not start callplane {command}"))? })
    }
}

/// Polls `GET path` until it answers 200 and returns how long that took; fails after `timeout`.
pub fn wait_for_ok(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let last = match http::get(addr, path, Duration::from_secs(2)) {
            Ok(response) if response.status == 200 => return Ok(started.elapsed()),
            Ok(response) => format!("answers {}", response.status),
            Err(error) => format!("{error:#}"),
        };
        if started.elapsed() >= timeout || util::interrupted() {
            bail!("http://{addr}{path} did not answer 200 within {timeout:?}: {last}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A running `callplane serve`, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops the server the way an operator would: SIGTERM, then SIGKILL after 15 s.
    pub fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // Only this process, by its id: it closes its WebSockets and drains.
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().context("could not kill callplane serve")?;
        self.child.wait()?;
        Ok(())
    }

    /// `kill -9`: the process ends at once, without any chance to clean up.
    pub fn kill_now(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            bail!("callplane serve had already exited");
        }
        self.child.kill().context("could not kill callplane serve")?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("xtask: warning: could not stop callplane serve: {error:#}");
        }
    }
}

/// The `callplane-loadgen` binary, run with the server's environment.
pub struct Loadgen {
    pub binary: PathBuf,
    pub spec: ServerSpec,
}

impl Loadgen {
    /// The loadgen with `args` (split on whitespace: no argument contains any), progress on the
    /// terminal, the JSON summary captured. `raise_limit` lifts the open-files limit.
    pub fn command(&self, args: &str, raise_limit: bool) -> Command {
        let mut command = if raise_limit { raise_open_files(&self.binary) } else { Command::new(&self.binary) };
        command
            .args(args.split_whitespace())
            .envs(self.spec.env.iter().cloned())
            .env("LOADGEN_BASE_URL", self.spec.base_url())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        command
    }

    /// Runs the loadgen and returns the JSON it printed; fails when it does not succeed within
    /// `timeout`.
    pub fn json(&self, args: &str, timeout: Duration, raise_limit: bool) -> Result<Value> {
        eprintln!("xtask: $ callplane-loadgen {args}");
        last_json(&run_with_timeout(self.command(args, raise_limit), timeout)?)
    }

    /// Starts the loadgen in the background.
    pub fn spawn(&self, args: &str, raise_limit: bool) -> Result<Background> {
        eprintln!("xtask: $ callplane-loadgen {args}");
        Background::spawn(self.command(args, raise_limit))
    }
}

/// The last line of `output` that is a JSON object (the loadgen's summary), or null.
pub fn last_json(output: &str) -> Result<Value> {
    match output.lines().rev().find(|l| l.trim_start().starts_with('{')) {
        Some(line) => serde_json::from_str(line).context("the loadgen printed invalid JSON"),
        None => Ok(Value::Null),
    }
}

/// A child process running in the background with its stdout collected; killed (by its own
/// process id) if it is dropped while still running.
pub struct Background {
    child: Child,
    line: String,
    reader: Option<JoinHandle<String>>,
}

impl Background {
    pub fn spawn(mut command: Command) -> Result<Self> {
        let line = describe(&command);
        let mut child = command.spawn().with_context(|| format!("could not start `{line}`"))?;
        let reader = child.stdout.take().map(|mut stdout| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = stdout.read_to_string(&mut text);
                text
            })
        });
        Ok(Self { child, line, reader })
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process and returns its exit status and stdout; kills it after `timeout`
    /// or on Ctrl-C and fails.
    pub fn finish(mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline || util::interrupted() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("`{}` did not finish within {timeout:?}; stopped it", self.line);
            }
            thread::sleep(Duration::from_millis(100));
        };
        let output = self.reader.take().map(|r| r.join().unwrap_or_default()).unwrap_or_default();
        Ok((status, output))
    }

    /// Like [`Background::finish`], failing as well when the process does not exit successfully.
    pub fn wait(self, timeout: Duration) -> Result<String> {
        let line = self.line.clone();
        let (status, output) = self.finish(timeout)?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
        Ok(output)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `command` (stdout captured), killing it past `timeout` or on Ctrl-C; fails when it does
/// not exit successfully.
pub fn run_with_timeout(command: Command, timeout: Duration) -> Result<String> {
    Background::spawn(command)?.wait(timeout)
}

/// A command that runs `program` with the open-files limit raised to the hard limit (thousands
/// of connections need thousands of descriptors; setrlimit itself needs libc).
pub fn raise_open_files(program: &Path) -> Command {
    let mut command = Command::new("sh");
    command.args(["-c", r#"ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$0" "$@""#]).arg(program);
    command
}

/// The resident set of a process in KiB, from `/proc/<pid>/status`.
pub fn rss_kb(pid: u32) -> Option<u64> {
    parse_vm_rss(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
fn parse_vm_rss(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|r| r.split_whitespace().next())?.parse().ok()
}

/// A thread that runs `tick` on its state every `every` until stopped, then once more, and
/// hands back what `finish` makes of the state. Dropping it unstopped ends the thread too.
struct Sampling<T> {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Sampling<T> {
    fn start<S: Send + 'static>(
        every: Duration,
        mut state: S,
        mut tick: impl FnMut(&mut S) + Send + 'static,
        finish: impl FnOnce(S) -> T + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = thread::spawn(move || {
            loop {
                let last = stop_flag.load(Ordering::Relaxed);
                tick(&mut state);
                if last {
                    return finish(state);
                }
                thread::sleep(every);
            }
        });
        Self { stop, thread: Some(thread) }
    }

    fn stop(mut self) -> Option<T> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take()?.join().ok()
    }
}

impl<T> Drop for Sampling<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Samples a process's RSS every 100 ms on a thread and keeps the peak. The process can be
/// swapped for another (a restarted server) while sampling.
pub struct RssSampler {
    sampling: Sampling<u64>,
    pid: Arc<AtomicU32>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let pid = Arc::new(AtomicU32::new(pid));
        let watched = pid.clone();
        let tick = move |peak: &mut u64| {
            if let Some(kb) = rss_kb(watched.load(Ordering::Relaxed)) {
                *peak = (*peak).max(kb);
            }
        };
        Self { sampling: Sampling::start(Duration::from_millis(100), 0, tick, |peak| peak), pid }
    }

    /// Samples another process from now on.
    pub fn follow(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// Stops sampling and returns the peak in KiB.
    pub fn stop(self) -> u64 {
        self.sampling.stop().unwrap_or_default()
    }
}

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The command name and the user plus system CPU ticks from the text of `/proc/<pid>/stat`.
/// The name is in parentheses and may hold spaces or parentheses itself, so the fields are
/// counted from its last `)`.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // After the name: state (0), ppid, ..., utime (11), stime (12).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((stat.get(open + 1..close)?, ticks))
}

/// What a process found in `/proc` is, named as the profiles name it (`server` is callplane's
/// pid); the load generator is known by its main thread's name, which the kernel cuts to 15
/// bytes.
fn process_name(comm: &str, pid: u32, server: u32) -> String {
    crate::profile::process_of(comm, pid, server, comm.starts_with("callplane-loadg"))
}

/// Every process now: its pid, what it is (named as the profiles name it, with `server` as
/// callplane) and its CPU ticks so far.
fn cpu_ticks(server: u32) -> Vec<(u32, String, u64)> {
    let entries = fs::read_dir("/proc").into_iter().flatten().flatten();
    entries
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            let (comm, ticks) = parse_stat(&stat)?;
            Some((pid, process_name(comm, pid, server), ticks))
        })
        .collect()
}

/// CPU seconds per process, named as in the profiles ("PostgreSQL", "callplane", "load
/// generator", "pgbench", ...).
pub type CpuSeconds = BTreeMap<String, f64>;

/// Adds up the CPU time each kind of process uses while it runs, reading every process's
/// `/proc/<pid>/stat` every 250 ms on a thread. A process running at the start counts from
/// then, one that starts later from its start; one that exits loses at most its last 250 ms
/// (pgbench's backends, at its end).
pub struct CpuSampler(Sampling<CpuSeconds>);

impl CpuSampler {
    pub fn start(server: u32) -> Self {
        let seen: HashMap<u32, u64> = cpu_ticks(server).into_iter().map(|(pid, _, ticks)| (pid, ticks)).collect();
        let tick = move |(seen, totals): &mut (HashMap<u32, u64>, CpuSeconds)| {
            for (pid, process, ticks) in cpu_ticks(server) {
                let before = seen.insert(pid, ticks).unwrap_or(0);
                *totals.entry(process).or_default() += ticks.saturating_sub(before) as f64 / TICKS_PER_SECOND;
            }
        };
        Self(Sampling::start(Duration::from_millis(250), (seen, CpuSeconds::new()), tick, |(_, totals)| totals))
    }

    /// Stops sampling (after one last sample) and returns the CPU seconds per process.
    pub fn stop(self) -> CpuSeconds {
        self.0.stop().unwrap_or_default()
    }
}

/// What a run records next to its results: the machine, the mode and build, and the
/// PostgreSQL version and `settings` (read through `psql`).
pub fn run_facts(
    started_at: &str,
    options: &RunOptions,
    settings: &[&str],
    psql: impl Fn(&str) -> Result<String>,
) -> Result<Value> {
    let names = settings.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
    let values = psql(&format!(
        "SELECT string_agg(name || '=' || setting || COALESCE(unit, ''), ', ' ORDER BY name) FROM pg_settings \
         WHERE name IN ({names})"
    ))?;
    let mut facts = machine_facts(started_at);
    facts.insert("mode".into(), json!(if options.quick { "quick" } else { "full" }));
    facts.insert("build".into(), json!(if options.release_build() { "release" } else { "dev" }));
    facts.insert("postgres".into(), json!(psql("SHOW server_version")?));
    facts.insert("postgres_settings".into(), json!(values));
    Ok(Value::Object(facts))
}

/// The machine, for the record next to published results: CPUs, memory, kernel, commit.
pub fn machine_facts(started_at: &str) -> serde_json::Map<String, Value> {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .map(str::trim)
        .unwrap_or("unknown")
        .to_string();
    let facts = json!({
        "date": started_at,
        "nproc": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_gib": memory_kb as f64 / 1024.0 / 1024.0,
        "kernel": command_output("uname", &["-r"]),
        "commit": command_output("git", &["-C", &util::repo_root().to_string_lossy(), "describe", "--always", "--dirty"]),
        "callplane_bin": std::env::var("CALLPLANE_BIN").ok().filter(|v| !v.is_empty()),
    });
    match facts {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// The current UTC time as `2026-11-28T12:00:00Z` (from `date`, to need no time crate).
pub fn utc_now() -> String {
    command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

/// A command's trimmed stdout, or `unknown`.
pub fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Replaces the generated section of `path` between the `start` and `end` markers, or appends
/// one.
pub fn update_section(path: &Path, (start, end): (&str, &str), section: &str) -> Result<()> {
    let current = fs::read_to_string(path).unwrap_or_default();
    let block = format!("{start}\n{section}{end}\n");
    let updated = match (current.find(start), current.find(end)) {
        (Some(s), Some(e)) if e > s => {
            format!("{}{block}{}", &current[..s], current[e + end.len()..].trim_start_matches('\n'))
        }
        _ => format!("{}\n{block}", current.trim_end()),
    };
    fs::write(path, updated).with_context(|| format!("could not write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_between_markers() {
        let dir = std::env::temp_dir().join(format!("xtask-stack-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("B.md");
        let markers = ("<!-- x:start -->", "<!-- x:end -->");
        fs::write(&path, "# Title\n\nIntro.\n").unwrap();
        update_section(&path, markers, "first\n").unwrap();
        update_section(&path, markers, "second\n").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Title\n\nIntro.\n"));
        assert!(text.contains("second") && !text.contains("first"));
        assert_eq!(text.matches(markers.0).count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rss_is_read_from_proc_status() {
        let status = "Name:\tcallplane\nVmPeak:\t  900000 kB\nVmRSS:\t   48236 kB\nRssAnon:\t 30000 kB\n";
        assert_eq!(parse_vm_rss(status), Some(48_236));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        // This very process has a resident set.
        assert!(rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
    }

    #[test]
    fn cpu_time_is_read_from_proc_stat_and_counted_for_its_part() {
        // A command name may hold spaces and parentheses: fields count from the last `)`.
        let stat = "4242 (postgres: callplane (idle)) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 1 0";
        assert_eq!(parse_stat(stat), Some(("postgres: callplane (idle)", 1234 + 567)));
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        // Processes are named as the profiles name them; `/proc` gives the load generator's
        // main thread name, cut to 15 bytes.
        let named = |comm: &str, pid| process_name(comm, pid, 7);
        assert_eq!(named("postgres", 4242), "PostgreSQL");
        assert_eq!(named("callplane", 7), "callplane");
        assert_ne!(named("callplane", 8), "callplane", "only the server's pid is callplane");
        assert_eq!(named("callplane-loadg", 9), "load generator");
        assert_eq!(named("pgbench", 10), "pgbench");
        // This process burns 0.7 s of CPU on its own pid while a sampler counts it as "the
        // server". It spins until the kernel has counted that much CPU to it, not for 0.7 s of
        // wall time, which a busy machine may give it a fraction of.
        let own_ticks = || parse_stat(&fs::read_to_string("/proc/self/stat").unwrap()).unwrap().1;
        let sampler = CpuSampler::start(std::process::id());
        let (from, give_up) = (own_ticks(), Instant::now() + Duration::from_secs(60));
        while own_ticks() < from + 70 && Instant::now() < give_up {
            for i in 0..100_000u64 {
                std::hint::black_box(i);
            }
        }
        let seconds = sampler.stop();
        assert!((0.65..3.0).contains(&seconds.get("callplane").copied().unwrap_or(0.0)), "{seconds:?}");
    }

    #[test]
    fn the_last_json_line_is_the_summary() {
        let output = "progress\n{\"a\": 1}\nmore\n{\"b\": 2}\ntrailing\n";
        assert_eq!(last_json(output).unwrap(), json!({"b": 2}));
        assert_eq!(last_json("nothing").unwrap(), Value::Null);
    }
}
