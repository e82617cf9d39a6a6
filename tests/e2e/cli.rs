//! The `callplane` binary, run the way an operator runs it.

use crate::helpers::{SECRET, iso, lifecycle, sample};
use callplane_testkit::admin_url;
use chrono::{Datelike, Months, Utc};
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

#[derive(Clone)]
pub struct Cli {
    pub db_url: String,
    pub addr: String,
}

/// A free loopback address for a server to bind, below the kernel's ephemeral ports (32768 and
/// up): a port the kernel handed out could be taken by a concurrent test's outgoing connection
/// between this check and the server's bind.
pub fn free_addr() -> String {
    loop {
        let port: u16 = rand::random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return format!("127.0.0.1:{port}");
        }
    }
}

impl Cli {
    /// A brand-new, empty database (no template), as on a fresh install.
    pub async fn new() -> Self {
        let admin = admin_url().unwrap();
        let name = format!("cp_cli_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin).await.unwrap();
        conn.execute(format!("CREATE DATABASE {name}").as_str()).await.unwrap();
        let db_url = format!("{}/{name}", &admin[..admin.rfind('/').unwrap()]);
        Self { db_url, addr: free_addr() }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_callplane"));
        c.args(args)
            .env("CALLPLANE_ENV", "test")
            .env("CALLPLANE_CONFIG_DIR", PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config"))
            .env("CALLPLANE__DATABASE__URL", &self.db_url)
            .env("CALLPLANE__SERVER__ADDR", &self.addr)
            .env("CALLPLANE__SERVER__PUBLIC_URL", format!("http://{}", self.addr))
            .env("CALLPLANE__VAPI__SECRET", SECRET)
            .env("RUST_LOG", "warn");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(out.status.success(), "callplane {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    pub async fn serve(&self) -> Server {
        let inbox = crate::helpers::inbox_dir();
        let mut command = self.command(&["serve"]);
        command.env("CALLPLANE__INBOX__DIR", &*inbox);
        let mut server = self.start(command, "/readyz", 100).await;
        server.1 = Some(inbox);
        server
    }

    /// Starts `command` (a `callplane serve`) and waits until `path` answers 200, trying `tries`
    /// times 100 ms apart. A server that exits or never answers fails the test with what it
    /// printed on stderr.
    async fn start(&self, mut command: Command, path: &str, tries: u32) -> Server {
        let log = std::env::temp_dir().join(format!("callplane-cli-serve-{}.log", uuid::Uuid::new_v4().simple()));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut server = Server(command.stdout(Stdio::null()).stderr(stderr).spawn().unwrap(), None);
        let url = format!("http://{}{path}", self.addr);
        let mut exited = None;
        for _ in 0..tries {
            if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
                // The server keeps writing to the file, unlinked.
                let _ = std::fs::remove_file(&log);
                return server;
            }
            exited = server.0.try_wait().unwrap();
            if exited.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let printed = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        match exited {
            Some(status) => panic!("callplane serve on {} exited ({status}):\n{printed}", self.addr),
            None => panic!("callplane serve on {} did not answer {path}:\n{printed}", self.addr),
        }
    }
}

impl Cli {
    /// `callplane serve` on `inbox` with `env` added (later entries win); waits until it answers
    /// `/healthz`.
    pub async fn serve_with(&self, inbox: &str, env: &[(&str, String)]) -> Server {
        let mut command = self.command(&["serve"]);
        command.env("CALLPLANE__INBOX__DIR", inbox).envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        self.start(command, "/healthz", 200).await
    }
}

/// A `callplane serve`, killed when dropped; with the inbox it was given, if it owns it.
pub struct Server(pub Child, Option<crate::helpers::ScratchDir>);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_operator_migrates_creates_an_org_and_a_key_serves_and_replays_a_dead_letter() {
    let cli = Cli::new().await;

    let migrated = cli.json(&["migrate", "--json"]);
    let ahead = Utc::now().checked_add_months(Months::new(3)).unwrap();
    assert_eq!(migrated["partitions"]["covered_through"], format!("{:04}-{:02}", ahead.year(), ahead.month()));
    // Migrating twice is harmless.
    cli.json(&["migrate", "--json"]);

    let bad = cli.run(&["org", "create", "--name", "Acme", "--plan", "platinum"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown plan"), "{}", String::from_utf8_lossy(&bad.stderr));

    let org = cli.json(&[
        "org",
        "create",
        "--name",
        "Acme Plumbing",
        "--plan",
        "starter",
        "--assistant-id",
        "asst-acme",
        "--json",
    ]);
    let org_id = org["id"].as_str().unwrap().to_owned();
    assert_eq!(org["vapi_server_url"], format!("http://{}/vapi/{org_id}", cli.addr));

    let key = cli.json(&["apikey", "create", "--org", &org_id, "--json"]);
    let secret = key["key"].as_str().unwrap();
    assert!(secret.starts_with("cp_") && secret.len() == 43, "{secret}");
    assert_eq!(key["prefix"].as_str().unwrap(), &secret[..11]);
    let listed = cli.json(&["apikey", "list", "--org", &org_id, "--json"]);
    assert_eq!(listed[0]["prefix"], key["prefix"]);
    assert!(!listed.to_string().contains(secret), "a listing never shows the key");
    let spare = cli.json(&["apikey", "create", "--org", &org_id, "--json"]);
    cli.json(&["apikey", "revoke", "--org", &org_id, "--id", spare["id"].as_str().unwrap(), "--json"]);
    let again = cli.run(&["apikey", "revoke", "--org", &org_id, "--id", spare["id"].as_str().unwrap()]);
    assert!(!again.status.success(), "revoking twice is an error");

    let config = cli.command(&["config", "--json"]).output().unwrap();
    let printed = String::from_utf8_lossy(&config.stdout);
    assert!(!printed.contains(SECRET) && printed.contains("********"), "{printed}");

    let _server = cli.serve().await;
    let http = reqwest::Client::new();
    let mut ask = sample("01-assistant-request.json");
    ask["message"]["call"]["createdAt"] = Value::String(iso(Utc::now()));
    let answer: Value = http
        .post(org["vapi_server_url"].as_str().unwrap())
        .bearer_auth(SECRET)
        .json(&ask)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["assistantId"], "asst-acme");

    // Break transcript storage, deliver a report: it is kept as a dead letter (acknowledged:
    // it is safe, and replayable).
    let mut db = PgConnection::connect(&cli.db_url).await.unwrap();
    db.execute("ALTER TABLE call_transcripts RENAME TO call_transcripts_away").await.unwrap();
    let report = lifecycle("replayed-call", Utc::now(), 33.3).pop().unwrap();
    let r = http.post(org["vapi_server_url"].as_str().unwrap()).bearer_auth(SECRET).json(&report).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let listed = cli.json(&["events", "list", "--call", "replayed-call", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["error_code"], "processing_failed");

    // Mend it and replay by call: processed once, resolved, billed once.
    db.execute("ALTER TABLE call_transcripts_away RENAME TO call_transcripts").await.unwrap();
    let replay = cli.json(&["events", "replay", "--call", "replayed-call", "--json"]);
    assert_eq!((replay["attempted"].as_u64(), replay["succeeded"].as_u64()), (Some(1), Some(1)));
    let transcripts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM call_transcripts WHERE call_id = 'replayed-call' AND is_final")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(transcripts, 1);
    let billed: i64 = sqlx::query_scalar("SELECT billable_seconds FROM usage_ledger WHERE call_id = 'replayed-call'")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(billed, 34);
    let used: i64 = sqlx::query_scalar("SELECT seconds_used FROM organizations").fetch_one(&mut db).await.unwrap();
    assert_eq!(used, 34);
    assert!(cli.json(&["events", "list", "--json"]).as_array().unwrap().is_empty());
    let replay_again = cli.json(&["events", "replay", "--json"]);
    assert_eq!(replay_again["attempted"], 0);
}

#[test]
fn a_misspelt_variable_or_a_missing_environment_file_stops_the_start() {
    let cli = Cli { db_url: "postgres://postgres@127.0.0.1:1/unused".into(), addr: free_addr() };

    let out = cli.command(&["config"]).env("CALLPLANE__DATABSE__URL", "postgres://elsewhere/db").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(
        stderr
            .contains("CALLPLANE__DATABSE__URL: there is no key `databse.url`; did you mean CALLPLANE__DATABASE__URL?"),
        "{stderr}"
    );

    let out = cli.command(&["config"]).env("CALLPLANE_ENV", "prod").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(stderr.contains("CALLPLANE_ENV=prod: ") && stderr.contains("prod.toml does not exist"), "{stderr}");
    assert!(stderr.contains("local, production, test)"), "the environments there are listed: {stderr}");

    // The same command, correctly configured, starts.
    assert!(cli.command(&["config"]).output().unwrap().status.success());
}

#[test]
fn a_database_that_cannot_be_reached_is_named_at_once_without_its_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cli = Cli { db_url: format!("postgres://app:hunter2@127.0.0.1:{port}/callplane"), addr: free_addr() };
    let org = uuid::Uuid::new_v4().to_string();
    for args in [&["apikey", "create", "--org", org.as_str()][..], &["serve"]] {
        let started = std::time::Instant::now();
        let out = cli.command(args).env("CALLPLANE__INBOX__DIR", &*crate::helpers::inbox_dir()).output().unwrap();
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(elapsed < std::time::Duration::from_secs(2), "{args:?} took {elapsed:?} to fail");
        let masked = format!("cannot connect to the database at postgres://app:********@127.0.0.1:{port}/callplane: ");
        assert!(stderr.contains(&masked) && stderr.contains("Connection refused"), "{args:?}: {stderr}");
        assert!(stderr.contains("CALLPLANE__DATABASE__URL") && !stderr.contains("hunter2"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn replay_prints_one_summary_and_why_each_event_failed_again() {
    let cli = Cli::new().await;
    cli.json(&["migrate", "--json"]);
    let org = cli.json(&["org", "create", "--name", "Acme", "--plan", "starter", "--json"]);
    let _server = cli.serve().await;

    // A call created three days ahead is refused and kept as a dead letter; replaying it
    // fails the same way.
    let report = lifecycle("call-from-the-future", Utc::now() + chrono::Duration::days(3), 20.0).pop().unwrap();
    let http = reqwest::Client::new();
    http.post(org["vapi_server_url"].as_str().unwrap()).bearer_auth(SECRET).json(&report).send().await.unwrap();
    let mut letters = Value::Null;
    for _ in 0..50 {
        letters = cli.json(&["events", "list", "--json"]);
        if letters.as_array().is_some_and(|l| !l.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(letters[0]["error_code"], "future_timestamp", "{letters}");
    let id = letters[0]["id"].as_i64().unwrap();

    let out = cli.run(&["events", "replay"]);
    assert_eq!(out.status.code(), Some(1), "a replay with failures exits 1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "1 replayed: 0 succeeded, 1 failed", "{stdout}");
    assert!(lines[1].starts_with(&format!("  dead letter {id}: future_timestamp: ")), "{stdout}");
    assert!(lines[1].contains("in the future") && lines.len() == 2, "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("replayed"), "the summary is printed once, on stdout: {stderr}");

    let out = cli.command(&["events", "replay", "--json"]).output().unwrap();
    let replay: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(replay["failed"], 1);
    assert_eq!(replay["failures"][0]["id"], id);
    assert_eq!(replay["failures"][0]["code"], "future_timestamp");
    assert!(replay["failures"][0]["message"].as_str().unwrap().contains("in the future"), "{replay}");
}

/// `callplane advise` is a process of its own: it reads what the servers wrote to the
/// database (every `advisor.sample_interval_seconds`), so the figures outlive the server.
#[tokio::test]
async fn callplane_advise_reads_what_the_servers_counted_and_says_what_to_do() {
    let cli = Cli::new().await;
    cli.json(&["migrate", "--json"]);
    let org = cli.json(&["org", "create", "--name", "Acme", "--plan", "pro", "--json"]);
    let key = cli.json(&["apikey", "create", "--org", org["id"].as_str().unwrap(), "--json"]);
    let secret = key["key"].as_str().unwrap().to_owned();
    let quiet = cli.json(&["advise", "--json"]);
    assert_eq!((quiet["current_phase"].clone(), quiet["recommended_phase"].clone()), (1.into(), 1.into()), "{quiet:#}");

    let inbox = crate::helpers::inbox_dir();
    let server = cli
        .serve_with(
            &inbox,
            &[
                ("CALLPLANE__ADVISOR__SAMPLE_INTERVAL_SECONDS", "1".into()),
                ("CALLPLANE__BACKENDS__SEARCH", "off".into()),
            ],
        )
        .await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let r = http.get(format!("http://{}/v1/search?q=refund", cli.addr)).bearer_auth(&secret).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::CONFLICT);
    }
    let refused = |a: &Value| a["days"].as_array().unwrap().last().unwrap()["searches_refused"].as_u64().unwrap();
    let mut advice = cli.json(&["advise", "--json"]);
    for _ in 0..100 {
        if refused(&advice) == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        advice = cli.json(&["advise", "--json"]);
    }
    assert_eq!(refused(&advice), 3, "the server's figures reached the database: {advice:#}");
    // The server is killed (no chance to write anything more): what it wrote stays.
    drop(server);
    let advice = cli.json(&["advise", "--json"]);
    assert_eq!(refused(&advice), 3);
    assert_eq!(advice["recommended_phase"], 2);
    assert_eq!(advice["summary"], "Move to phase 2: search_demand fired.");

    let text = cli.run(&["advise"]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("Move to phase 2: search_demand fired.\n"), "{text}");
    assert!(
        text.contains(
            "FIRED  search_demand         3 searches were asked for and refused (search is off) in the last 7 days"
        ),
        "{text}"
    );
    assert!(text.contains("monthly cost: phase 1 $50 (current), phase 2 $250 (recommended), phase 3 $700"), "{text}");
}
