//! `cargo xtask run` and `cargo xtask stop`: a local callplane on a persistent PostgreSQL cluster in
//! `.data/pg`, with a demo organization and ready-to-paste curl commands.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::pg::{self, Cluster, StopOnDrop};
use crate::util::{self, shell_quote};

const DEFAULT_PG_PORT: u16 = 54329;
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

/// Fixtures worth sending by hand, in the order a call produces them.
const DEMO_FIXTURES: &[&str] = &[
    "tests/fixtures/vapi/01-assistant-request.json",
    "tests/fixtures/vapi/04-tool-calls-two-calls.json",
    "tests/fixtures/vapi/09-end-of-call-report.json",
];

/// The `.data` directory at the repository root (gitignored).
fn data_dir() -> PathBuf {
    util::repo_root().join(".data")
}

/// The development cluster, on `CALLPLANE_PG_PORT` or 54329.
fn dev_cluster() -> Result<Cluster> {
    let port = util::env_port("CALLPLANE_PG_PORT", DEFAULT_PG_PORT)?;
    Cluster::new(pg::bin_dir()?, data_dir().join("pg"), port)
}

/// Builds and serves callplane against the development cluster until it exits or Ctrl-C.
pub fn run() -> Result<ExitCode> {
    util::install_ctrlc_handler()?;
    let cluster = dev_cluster()?;
    let http_port = util::env_port("CALLPLANE_PORT", DEFAULT_HTTP_PORT)?;
    let secret = std::env::var("CALLPLANE__VAPI__SECRET")
        .ok()
        .filter(|secret| !secret.is_empty())
        .unwrap_or_else(|| DEFAULT_VAPI_SECRET.to_string());

    // Build first: a compile error should not leave a database running.
    util::run(util::cargo().args(["build", "-p", "callplane-server", "--bin", "callplane"]))?;
    let binary = util::target_dir().join("debug").join("callplane");

    start_dev_cluster(&cluster)?;
    // From here on, PostgreSQL stops however xtask ends, unless asked to keep it.
    let mut guard = StopOnDrop::new(cluster);
    if util::env_flag("XTASK_KEEP_PG") {
        guard.keep_running();
    }
    let cluster = guard.cluster();
    let database_is_new = create_database(cluster)?;

    let public_url = format!("http://127.0.0.1:{http_port}");
    let callplane = Callplane {
        binary,
        env: vec![
            ("CALLPLANE__DATABASE__URL", cluster.url(DATABASE)),
            ("CALLPLANE__SERVER__ADDR", format!("127.0.0.1:{http_port}")),
            ("CALLPLANE__SERVER__PUBLIC_URL", public_url.clone()),
            ("CALLPLANE__VAPI__SECRET", secret.clone()),
        ],
    };

    util::run(&mut callplane.command(&["migrate"]))?;
    let org = demo_org(&callplane, database_is_new)?;
    print_next_steps(&org, &secret, &public_url, &cluster.url(DATABASE));

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

/// Stops the development cluster if it is running.
pub fn stop() -> Result<ExitCode> {
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
/// is missing or the database is new.
fn demo_org(callplane: &Callplane, database_is_new: bool) -> Result<DemoOrg> {
    let path = data_dir().join("demo-org.json");
    if path.exists() && !database_is_new {
        let text = fs::read_to_string(&path).with_context(|| format!("could not read {}", path.display()))?;
        return parse_org(&text)
            .with_context(|| format!("{} is not valid; delete it to create a new demo organization", path.display()));
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
    parse_org(&text)
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

/// Prints the webhook URL, the secret and curl commands to paste into another terminal.
fn print_next_steps(org: &DemoOrg, secret: &str, public_url: &str, database_url: &str) {
    let url = shell_quote(&org.vapi_server_url);
    let auth = shell_quote(&format!("Authorization: Bearer {secret}"));
    eprintln!();
    eprintln!("xtask: starting callplane on {public_url}");
    eprintln!("  demo organization: {} (Demo Plumbing)", org.id);
    eprintln!("  VAPI webhook URL:  {}", org.vapi_server_url);
    eprintln!("  VAPI secret:       {secret}");
    eprintln!("  database:          {database_url}");
    eprintln!();
    eprintln!("Try it from another terminal, in {}:", util::repo_root().display());
    eprintln!("  curl -s {public_url}/healthz");
    for fixture in DEMO_FIXTURES {
        eprintln!("  curl -s -X POST {url} -H {auth} -H 'Content-Type: application/json' --data @{fixture}");
    }
    let key = shell_quote(&format!("Authorization: Bearer {}", org.api_key));
    eprintln!("The dashboard API (API key {}):", org.api_key);
    for path in ["/v1/calls", "/v1/usage", "/v1/calls/live", "/v1/function-data"] {
        eprintln!("  curl -s {public_url}{path} -H {key}");
    }
    eprintln!(
        "  live events: a WebSocket client on {}/v1/realtime?access_token={}",
        public_url.replace("http", "ws"),
        org.api_key
    );
    eprintln!();
    eprintln!("Ctrl-C stops callplane and PostgreSQL (XTASK_KEEP_PG=1 keeps PostgreSQL; `cargo xtask stop` stops it).");
    eprintln!();
}
