//! `cargo xtask run` and `cargo xtask stop`: a local callplane on a persistent PostgreSQL cluster in
//! `.data/pg`, with a demo organization, a demo call dated today and ready-to-paste commands. In
//! phase 2 it also runs a `redis-server` in `.data/redis` for the Redis backends and a Temporal
//! development server in `.data/temporal` for the event pipeline (the worker runs in `serve`).

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::{Number, Value};

use crate::pg::{self, Cluster, StopOnDrop};
use crate::redis::{self, Durability, Redis};
use crate::stack;
use crate::temporal::{self, Temporal};
use crate::util::{self, shell_quote};

const DEFAULT_PG_PORT: u16 = 54329;
/// Next to Redis's usual 6379 rather than on it, so that a system Redis does not get in the way.
const DEFAULT_REDIS_PORT: u16 = 63790;
/// Next to Temporal's usual 7233, for the same reason.
const DEFAULT_TEMPORAL_PORT: u16 = 17233;
const DEFAULT_HTTP_PORT: u16 = 8080;
const DEFAULT_VAPI_SECRET: &str = "dev-vapi-secret";
const DATABASE: &str = "callplane";

/// Tenant data for the demo organization: function-data keys and their JSON values.
const DEMO_FUNCTION_DATA: &[(&str, &str)] = &[
    ("businessHours", r#""Mon-Fri 8am-6pm, Sat 9am-1pm""#),
    (
        "lookup_order",
        r#"{"by":"orderNumber","entries":{"A-10442":"Order A-10442: water heater repair, technician scheduled Thursday between 10am and 12pm."}}"#,
    ),
];

/// The fixtures of `tests/fixtures/vapi` that make the demo call, in the order a call sends
/// them; the first one creates the call.
const DEMO_FIXTURES: &[&str] =
    &["01-assistant-request.json", "04-tool-calls-two-calls.json", "09-end-of-call-report.json"];

/// Numbers in this range in a webhook are epoch milliseconds (2001 to 2286).
const EPOCH_MS: std::ops::Range<f64> = 1e12..1e13;

/// How long one request of the demo call may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `.data` directory at the repository root (gitignored).
fn data_dir() -> PathBuf {
    util::repo_root().join(".data")
}

/// The development cluster, on `CALLPLANE_PG_PORT` or 54329.
fn dev_cluster() -> Result<Cluster> {
    let port = util::env_port("CALLPLANE_PG_PORT", DEFAULT_PG_PORT)?;
    Cluster::new(pg::bin_dir()?, data_dir().join("pg"), port)
}

/// The phase `cargo xtask run` serves: which features it builds and which backends it picks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// PostgreSQL only.
    One,
    /// Usage counters and function data in Redis.
    Two,
}

const RUN_USAGE: &str = "usage: cargo xtask run [--phase 1|2]";

/// Reads `[--phase N]`; phase 1 when it is not given.
fn parse_phase(args: &[String]) -> Result<Phase> {
    let value = match args {
        [] => return Ok(Phase::One),
        [flag, value] if flag == "--phase" => value.as_str(),
        [flag] => {
            flag.strip_prefix("--phase=").with_context(|| format!("unexpected argument {flag:?}; {RUN_USAGE}"))?
        }
        _ => bail!("unexpected arguments {args:?}; {RUN_USAGE}"),
    };
    match value {
        "1" => Ok(Phase::One),
        "2" => Ok(Phase::Two),
        "3" => {
            bail!("phase 3 is not built yet (no object storage or search backends); --phase 2 is the latest")
        }
        other => bail!("there is no phase {other:?}; {RUN_USAGE}"),
    }
}

/// Builds and serves callplane against the development cluster until it exits or Ctrl-C.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let phase = parse_phase(args)?;
    if phase == Phase::Two {
        redis::check_installed()?;
    }
    util::install_ctrlc_handler()?;
    let cluster = dev_cluster()?;
    let http_port = util::env_port("CALLPLANE_PORT", DEFAULT_HTTP_PORT)?;
    let secret = std::env::var("CALLPLANE__VAPI__SECRET")
        .ok()
        .filter(|secret| !secret.is_empty())
        .unwrap_or_else(|| DEFAULT_VAPI_SECRET.to_string());

    // Build first: a compile error should not leave a database running.
    let mut build = util::cargo();
    build.args(["build", "-p", "callplane-server", "--bin", "callplane"]);
    if phase == Phase::Two {
        build.args(["--features", "phase2"]);
    }
    util::run(&mut build)?;
    let binary = util::target_dir().join("debug").join("callplane");

    start_dev_cluster(&cluster)?;
    // From here on, PostgreSQL stops however xtask ends, unless asked to keep it.
    let mut guard = StopOnDrop::new(cluster);
    if util::env_flag("XTASK_KEEP_PG") {
        guard.keep_running();
    }
    let cluster = guard.cluster();
    let database_is_new = create_database(cluster)?;
    // Stopped when dropped, before PostgreSQL, after callplane has exited.
    let redis = match phase {
        Phase::One => None,
        Phase::Two => {
            let port = util::env_port("CALLPLANE_REDIS_PORT", DEFAULT_REDIS_PORT)?;
            let redis = Redis::start(&data_dir().join("redis"), port, Durability::AppendOnly)?;
            eprintln!("xtask: started Redis on port {port}");
            Some(redis)
        }
    };
    let temporal = match phase {
        Phase::One => None,
        Phase::Two => {
            let port = util::env_port("CALLPLANE_TEMPORAL_PORT", DEFAULT_TEMPORAL_PORT)?;
            let temporal = Temporal::start(&data_dir().join("temporal"), port)?;
            eprintln!("xtask: started Temporal on port {port}");
            Some(temporal)
        }
    };

    let public_url = format!("http://127.0.0.1:{http_port}");
    let mut callplane = Callplane {
        binary,
        env: vec![
            ("CALLPLANE__DATABASE__URL", cluster.url(DATABASE)),
            ("CALLPLANE__SERVER__ADDR", format!("127.0.0.1:{http_port}")),
            ("CALLPLANE__SERVER__PUBLIC_URL", public_url.clone()),
            ("CALLPLANE__VAPI__SECRET", secret.clone()),
        ],
    };
    if let Some(redis) = &redis {
        callplane.env.extend([
            ("CALLPLANE__REDIS__URL", redis.url()),
            ("CALLPLANE__BACKENDS__USAGE_COUNTER", "redis".to_string()),
            ("CALLPLANE__BACKENDS__FUNCTION_DATA", "redis".to_string()),
        ]);
    }
    if let Some(temporal) = &temporal {
        callplane.env.extend([
            ("CALLPLANE__TEMPORAL__ADDRESS", temporal.address()),
            ("CALLPLANE__BACKENDS__EVENT_PIPELINE", "temporal".to_string()),
        ]);
    }
    if phase == Phase::Two {
        // Transcript search is phase 2's: `GET /v1/search` answers instead of 409 search_off.
        callplane.env.push(("CALLPLANE__BACKENDS__SEARCH", "postgres".to_string()));
    }

    util::run(&mut callplane.command(&["migrate"]))?;
    let (org, org_is_new) = demo_org(&callplane, database_is_new)?;
    let demo = write_demo_call(&data_dir().join("demo"), Utc::now())?;
    let phase2 = redis.as_ref().zip(temporal.as_ref());
    print_next_steps(&org, &secret, &public_url, &callplane, &demo, org_is_new, phase2);

    // A new demo organization gets the demo call as soon as the server answers, so that the
    // dashboard API has a call and minutes to show.
    if org_is_new {
        let addr = SocketAddr::from(([127, 0, 0, 1], http_port));
        thread::spawn(move || match play_demo_call(addr, &org, &secret, &demo) {
            Ok(outcome) => eprintln!("\nxtask: {outcome}\n"),
            Err(_) if util::interrupted() => {}
            Err(error) => eprintln!("\nxtask: error: the demo call failed: {error:#}\n"),
        });
    }

    let status = callplane.command(&["serve"]).status().context("could not start `callplane serve`")?;

    if util::env_flag("XTASK_KEEP_PG") {
        eprintln!(
            "xtask: PostgreSQL keeps running on port {} (XTASK_KEEP_PG); `cargo xtask stop` stops it",
            cluster.port()
        );
    }
    // Stopping the server after Ctrl-C is the normal way out, whatever its exit status.
    if status.success() || util::interrupted() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("xtask: callplane serve exited with {status}");
        Ok(ExitCode::FAILURE)
    }
}

/// Stops the development cluster if it is running, and a Redis that a killed `run` left behind
/// (a `run` that ends normally stops its Redis itself).
pub fn stop() -> Result<ExitCode> {
    if redis::stop_leftover(&data_dir().join("redis"))? {
        eprintln!("xtask: stopped the development Redis (.data/redis)");
    }
    if temporal::stop_leftover(&data_dir().join("temporal"))? {
        eprintln!("xtask: stopped the development Temporal server (.data/temporal)");
    }
    let cluster = dev_cluster()?;
    if !cluster.is_initialized() {
        eprintln!("xtask: there is no development cluster in .data/pg");
    } else if cluster.is_running()? {
        cluster.stop()?;
        eprintln!("xtask: stopped the development PostgreSQL cluster (.data/pg)");
    } else {
        eprintln!("xtask: the development PostgreSQL cluster (.data/pg) is not running");
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates the cluster if needed and starts it if it is not running.
fn start_dev_cluster(cluster: &Cluster) -> Result<()> {
    if !cluster.is_initialized() {
        eprintln!("xtask: creating the development PostgreSQL cluster in .data/pg");
        cluster.init()?;
    }
    if cluster.is_running()? {
        check_running_port(cluster)?;
        eprintln!("xtask: PostgreSQL is already running on port {}", cluster.port());
    } else {
        cluster.start(&[])?;
        eprintln!("xtask: started PostgreSQL on port {}", cluster.port());
    }
    Ok(())
}

/// Creates the `callplane` database unless it exists. Returns whether it is new, in which case
/// demo data saved by an earlier run refers to nothing.
fn create_database(cluster: &Cluster) -> Result<bool> {
    let port = cluster.port().to_string();
    let mut createdb = cluster.client("createdb");
    createdb.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", DATABASE]);
    let output = createdb.output().with_context(|| format!("could not run `{}`", util::describe(&createdb)))?;
    if output.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("already exists") {
        Ok(false)
    } else {
        bail!("`{}` failed: {}", util::describe(&createdb), stderr.trim())
    }
}

/// A server left running by an earlier `XTASK_KEEP_PG=1` run may listen on another port than the
/// one asked for now; the fourth line of `postmaster.pid` says which.
fn check_running_port(cluster: &Cluster) -> Result<()> {
    let pid_file = data_dir().join("pg/postmaster.pid");
    let Ok(text) = fs::read_to_string(&pid_file) else {
        return Ok(());
    };
    let running_port = text.lines().nth(3).and_then(|line| line.trim().parse::<u16>().ok());
    match running_port {
        Some(port) if port != cluster.port() => bail!(
            "the development PostgreSQL is already running on port {port}, not {}: \
             run `cargo xtask stop` or set CALLPLANE_PG_PORT={port}",
            cluster.port()
        ),
        _ => Ok(()),
    }
}

/// The built callplane binary and the environment every invocation gets.
struct Callplane {
    binary: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Callplane {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.args(args).envs(self.env.iter().map(|(name, value)| (name, value))).current_dir(util::repo_root());
        command
    }
}

/// The demo organization as `callplane org create --json` describes it.
struct DemoOrg {
    id: String,
    vapi_server_url: String,
    /// A dashboard API key for the demo organization.
    api_key: String,
}

/// Reads the demo organization from `.data/demo-org.json`, or creates and seeds it when that file
/// is missing or the database is new. Says whether it was created.
fn demo_org(callplane: &Callplane, database_is_new: bool) -> Result<(DemoOrg, bool)> {
    let path = data_dir().join("demo-org.json");
    if path.exists() && !database_is_new {
        let text = fs::read_to_string(&path).with_context(|| format!("could not read {}", path.display()))?;
        let org = parse_org(&text)
            .with_context(|| format!("{} is not valid; delete it to create a new demo organization", path.display()))?;
        return Ok((org, false));
    }

    eprintln!("xtask: creating the demo organization");
    let mut create = callplane.command(&[
        "org",
        "create",
        "--name",
        "Demo Plumbing",
        "--plan",
        "pro",
        "--assistant-id",
        "demo-assistant",
        "--json",
    ]);
    // stdout carries the JSON answer; logs on stderr go straight to the terminal.
    create.stderr(Stdio::inherit());
    let output = util::run_captured(&mut create)?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let mut value: Value =
        serde_json::from_str(&text).context("`callplane org create --json` printed unexpected output")?;
    let id = value.get("id").and_then(Value::as_str).unwrap_or_default().to_string();

    for (key, data) in DEMO_FUNCTION_DATA {
        util::run(&mut callplane.command(&["function-data", "put", "--org", &id, key, data]))?;
    }
    let mut key = callplane.command(&["apikey", "create", "--org", &id, "--name", "demo dashboard", "--json"]);
    key.stderr(Stdio::inherit());
    let key_output = util::run_captured(&mut key)?;
    let key_json: Value = serde_json::from_slice(&key_output.stdout)
        .context("`callplane apikey create --json` printed unexpected output")?;
    if let (Some(object), Some(secret)) = (value.as_object_mut(), key_json.get("key")) {
        object.insert("api_key".into(), secret.clone());
    }
    let text = value.to_string();

    // Saved last, so that the file only exists for a fully seeded organization.
    write_file(&path, &format!("{text}\n"))?;
    Ok((parse_org(&text)?, true))
}

/// Extracts `id` and `vapi_server_url` from the organization JSON.
fn parse_org(text: &str) -> Result<DemoOrg> {
    let value: Value =
        serde_json::from_str(text.trim()).with_context(|| format!("expected one JSON object, got {text:?}"))?;
    let field = |name: &str| -> Result<String> {
        match value.get(name) {
            Some(Value::String(text)) => Ok(text.clone()),
            Some(Value::Number(number)) => Ok(number.to_string()),
            _ => bail!("the organization JSON has no `{name}` field: {text}"),
        }
    };
    Ok(DemoOrg { id: field("id")?, vapi_server_url: field("vapi_server_url")?, api_key: field("api_key")? })
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("could not write {}", path.display()))
}

/// The demo call: the fixtures' one call under a new id, written to `.data/demo`.
struct DemoCall {
    id: String,
    bodies: Vec<PathBuf>,
}

/// Writes the demo call's webhooks to `dir` (`.data/demo`), moved in time so that the call starts at
/// `now`: dated as in the fixtures, it would fall in a billing period gone by (and once older
/// than `partitions.max_past_days`, be refused as `stale_timestamp`). A new call id each time
/// makes it a new call.
fn write_demo_call(dir: &Path, now: DateTime<Utc>) -> Result<DemoCall> {
    let fixtures = util::repo_root().join("tests/fixtures/vapi");
    let texts = DEMO_FIXTURES
        .iter()
        .map(|name| fs::read_to_string(fixtures.join(name)).with_context(|| format!("could not read {name}")))
        .collect::<Result<Vec<_>>>()?;
    let first: Value = serde_json::from_str(&texts[0]).context("the first demo fixture is not JSON")?;
    let call = &first["message"]["call"];
    let (Some(fixture_id), Some(created)) = (call["id"].as_str(), call["createdAt"].as_str()) else {
        bail!("{} has no message.call.id and createdAt", DEMO_FIXTURES[0]);
    };
    let shift = now - DateTime::parse_from_rfc3339(created).context("message.call.createdAt")?.to_utc();
    let id = uuid::Uuid::now_v7().to_string();

    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let mut bodies = Vec::new();
    for (name, text) in DEMO_FIXTURES.iter().zip(&texts) {
        let mut body: Value = serde_json::from_str(&text.replace(fixture_id, &id))?;
        shift_times(&mut body, shift);
        let path = dir.join(name);
        write_file(&path, &format!("{}\n", serde_json::to_string_pretty(&body)?))?;
        bodies.push(path);
    }
    Ok(DemoCall { id, bodies })
}

/// Moves every time in a webhook body by `shift`: RFC 3339 strings and epoch milliseconds.
fn shift_times(value: &mut Value, shift: TimeDelta) {
    match value {
        Value::String(text) => {
            if let Ok(at) = DateTime::parse_from_rfc3339(text) {
                *text = (at.to_utc() + shift).to_rfc3339_opts(SecondsFormat::Millis, true);
            }
        }
        Value::Number(number) => {
            if let Some(at) = number.as_f64().filter(|at| EPOCH_MS.contains(at)) {
                let moved = at + shift.num_milliseconds() as f64;
                *number = if number.is_f64() {
                    Number::from_f64(moved).unwrap_or(number.clone())
                } else {
                    (moved as i64).into()
                };
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| shift_times(item, shift)),
        Value::Object(fields) => fields.values_mut().for_each(|field| shift_times(field, shift)),
        Value::Null | Value::Bool(_) => {}
    }
}

/// Sends the demo call once the server is ready, as VAPI would, and reads back what
/// `/v1/usage` shows for it.
fn play_demo_call(addr: SocketAddr, org: &DemoOrg, secret: &str, demo: &DemoCall) -> Result<String> {
    stack::wait_for_ok(addr, "/readyz", Duration::from_secs(60))?;
    let webhook = format!("/vapi/{}", org.id);
    for path in &demo.bodies {
        let body = fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?;
        let (status, answer) = request(addr, "POST", &webhook, secret, &body)?;
        if status != 200 {
            bail!("POST {webhook} with {} answered {status}: {answer}", path.display());
        }
    }
    // The end-of-call report may be processed just after it is answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, answer) = request(addr, "GET", "/v1/usage", &org.api_key, "")?;
        let usage: Value = serde_json::from_str(&answer).unwrap_or_default();
        if status == 200 && usage["seconds_used"].as_i64().is_some_and(|seconds| seconds > 0) {
            return Ok(format!(
                "sent the demo call {}: /v1/usage shows {} s, {} of the {} minutes included",
                demo.id, usage["seconds_used"], usage["minutes_used"], usage["minutes_included"]
            ));
        }
        if Instant::now() > deadline {
            bail!("GET /v1/usage still answers {status} {answer} 10 s after the end-of-call report");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// One HTTP/1.1 request with a bearer token to the local server; its status and body.
fn request(addr: SocketAddr, method: &str, path: &str, token: &str, body: &str) -> Result<(u16, String)> {
    let what = format!("{method} {path}");
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).with_context(|| format!("{what}: connecting"))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .with_context(|| format!("{what}: sending"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).with_context(|| format!("{what}: reading the answer"))?;
    let status = answer.split_whitespace().nth(1).and_then(|code| code.parse().ok());
    let status = status.with_context(|| format!("{what}: not an HTTP answer: {answer:?}"))?;
    Ok((status, answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned()))
}

/// Prints the organization, how to run the CLI against this database (and Redis), and curl
/// commands to paste into another terminal.
fn print_next_steps(
    org: &DemoOrg,
    secret: &str,
    public_url: &str,
    callplane: &Callplane,
    demo: &DemoCall,
    sent: bool,
    phase2: Option<(&Redis, &Temporal)>,
) {
    let (redis, temporal) = (phase2.map(|p| p.0), phase2.map(|p| p.1));
    let root = util::repo_root();
    let url = shell_quote(&org.vapi_server_url);
    let auth = shell_quote(&format!("Authorization: Bearer {secret}"));
    eprintln!();
    eprintln!("xtask: starting callplane on {public_url}");
    eprintln!("  demo organization: {} (Demo Plumbing)", org.id);
    eprintln!("  VAPI webhook URL:  {}", org.vapi_server_url);
    eprintln!("  VAPI secret:       {secret}");
    eprintln!("  dashboard API key: {}", org.api_key);
    if let Some(redis) = redis {
        eprintln!("  Redis (phase 2):   {} (data in .data/redis; redis-cli -p {})", redis.url(), redis.port());
    }
    if let Some(temporal) = temporal {
        eprintln!(
            "  Temporal (phase 2): {} (data in .data/temporal; `callplane serve` runs the worker)",
            temporal.address()
        );
    }
    eprintln!();
    eprintln!("The callplane CLI on this database, from another terminal in {}:", root.display());
    for (name, value) in &callplane.env {
        if !matches!(*name, "CALLPLANE__SERVER__ADDR" | "CALLPLANE__VAPI__SECRET") {
            eprintln!("  export {name}={}", shell_quote(value));
        }
    }
    eprintln!("  alias callplane={}", shell_quote(&callplane.binary.to_string_lossy()));
    eprintln!("  callplane apikey list --org {}", org.id);
    if redis.is_some() {
        eprintln!("  callplane usage reconcile    # Redis's counters against the usage ledger (--repair fixes them)");
    }
    if let Some(temporal) = temporal {
        eprintln!("  callplane worker             # another Temporal worker, apart from the server");
        eprintln!(
            "  {} workflow list --address 127.0.0.1:{}   # the calls' workflows",
            shell_quote(&temporal.cli().to_string_lossy()),
            temporal.port()
        );
    }
    eprintln!();
    if sent {
        eprintln!("The demo call {}, dated now, goes out as soon as callplane answers; sent again, it is", demo.id);
        eprintln!("recorded and billed once. Its webhooks:");
    } else {
        eprintln!("A call dated now ({}), not sent yet; each run writes a new one:", demo.id);
    }
    for path in &demo.bodies {
        let body = path.strip_prefix(&root).unwrap_or(path).display().to_string();
        eprintln!("  curl -s -X POST {url} -H {auth} -H 'Content-Type: application/json' --data @{body}");
    }
    let key = shell_quote(&format!("Authorization: Bearer {}", org.api_key));
    eprintln!("The dashboard API:");
    for path in ["/v1/usage", "/v1/calls", "/v1/calls/live", "/v1/function-data"] {
        eprintln!("  curl -s {public_url}{path} -H {key}");
    }
    eprintln!(
        "  live events: a WebSocket client on {}/v1/realtime?access_token={}",
        public_url.replace("http", "ws"),
        org.api_key
    );
    eprintln!("Which phase to be on, and why (with the CLI set up as above):");
    eprintln!("  callplane advise");
    eprintln!("  callplane phase plan 2      # the moves to phase 2, each one command with the server running");
    eprintln!();
    let services =
        if redis.is_some() { "callplane, Redis, Temporal and PostgreSQL" } else { "callplane and PostgreSQL" };
    eprintln!("Ctrl-C stops {services} (XTASK_KEEP_PG=1 keeps PostgreSQL; `cargo xtask stop` stops it).");
    eprintln!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_is_1_unless_asked_and_3_is_refused() -> Result<()> {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_phase(&[])?, Phase::One);
        assert_eq!(parse_phase(&args(&["--phase", "2"]))?, Phase::Two);
        assert_eq!(parse_phase(&args(&["--phase=1"]))?, Phase::One);
        let refused = parse_phase(&args(&["--phase", "3"])).unwrap_err().to_string();
        assert!(refused.contains("phase 3 is not built yet"), "{refused}");
        assert!(parse_phase(&args(&["--phase", "two"])).is_err());
        assert!(parse_phase(&args(&["--quick"])).is_err());
        Ok(())
    }

    /// The demo call is the fixtures' call under a new id, starting at `now`, every time in it
    /// moved alike, so that it is billed as long and in the current period.
    #[test]
    fn the_demo_call_is_the_fixtures_call_moved_to_now() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-demo-{}", uuid::Uuid::new_v4().simple()));
        let now = DateTime::parse_from_rfc3339("2031-07-04T09:30:00.250Z")?.to_utc();
        let demo = write_demo_call(&dir, now)?;
        let read = |i: usize| -> Result<(String, Value)> {
            let text = fs::read_to_string(&demo.bodies[i])?;
            Ok((text.clone(), serde_json::from_str(&text)?))
        };

        let (text, first) = read(0)?;
        assert_eq!(first["message"]["call"]["id"], demo.id.as_str());
        assert_eq!(first["message"]["call"]["createdAt"], "2031-07-04T09:30:00.250Z");
        // 128 ms after createdAt in the fixture.
        assert_eq!(first["message"]["timestamp"], now.timestamp_millis() + 128);
        assert!(!text.contains("019cd8a1-3b2e-7c4d-9f1a-6e5b4c3d2a10") && !text.contains("2026-03"), "{text}");

        let (text, report) = read(2)?;
        assert!(!text.contains("019cd8a1-3b2e-7c4d-9f1a-6e5b4c3d2a10"), "the call id is replaced everywhere");
        let at = |field: &str| -> Result<DateTime<Utc>> {
            Ok(DateTime::parse_from_rfc3339(report["message"][field].as_str().unwrap_or_default())?.to_utc())
        };
        assert_eq!(at("startedAt")?, now + TimeDelta::milliseconds(1_871));
        assert_eq!(at("endedAt")? - at("startedAt")?, TimeDelta::milliseconds(74_033), "as long as the fixture");
        assert_eq!(report["message"]["durationSeconds"], 74.033, "durations are not times");

        fs::remove_dir_all(dir)?;
        Ok(())
    }
}
