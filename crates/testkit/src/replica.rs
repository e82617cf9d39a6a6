//! Phase 3's database servers, started by `cargo xtask test` for the phase-3 run: a streaming
//! replica of the suite's cluster (`CALLPLANE_TEST_REPLICA_URL`, its data directory in
//! `CALLPLANE_TEST_REPLICA_DATA`), which a test can pause, stop and start, and PgBouncer in
//! transaction mode in front of the primary (`CALLPLANE_TEST_PGBOUNCER_URL`).

#![allow(clippy::expect_used)] // Test harness: a server that cannot be reached is a failed test.
use crate::db::with_database;
use sqlx::{Connection, PgConnection};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The URL of test database `name` through PgBouncer, when the run has one.
pub fn pooled(name: &str) -> Option<String> {
    Some(with_database(&env("CALLPLANE_TEST_PGBOUNCER_URL")?, name))
}

/// The suite's streaming replica.
#[derive(Clone)]
pub struct TestReplica {
    url: String,
    data: PathBuf,
    bin: PathBuf,
}

impl TestReplica {
    /// The replica `cargo xtask test` started for the phase-3 run.
    pub fn from_env() -> Self {
        let missing = |name: &str| {
            format!("{name} is not set: the replica tests run in `cargo xtask test`'s phase-3 run, which starts one")
        };
        let get = |name: &str| env(name).unwrap_or_else(|| panic!("{}", missing(name)));
        Self {
            url: get("CALLPLANE_TEST_REPLICA_URL"),
            data: get("CALLPLANE_TEST_REPLICA_DATA").into(),
            bin: get("CALLPLANE_TEST_PG_BIN").into(),
        }
    }

    /// The URL of database `name` on the replica.
    pub fn url(&self, name: &str) -> String {
        with_database(&self.url, name)
    }

    /// Waits (up to 30 s) until the replica has replayed the creation of database `name`.
    pub async fn wait_for_database(&self, name: &str) {
        let until = Instant::now() + Duration::from_secs(30);
        while PgConnection::connect(&self.url(name)).await.is_err() {
            assert!(Instant::now() < until, "the replica did not replay database {name} within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn admin(&self, sql: &str) {
        let mut conn = PgConnection::connect(&self.url).await.expect("connecting to the replica");
        sqlx::query(sql).execute(&mut conn).await.unwrap_or_else(|e| panic!("{sql} on the replica: {e}"));
    }

    /// Starts the replica if it is stopped and resumes its replay if it is paused (a test that
    /// failed half way may have left it so).
    pub async fn ensure_replaying(&self) {
        if PgConnection::connect(&self.url).await.is_err() {
            let replica = self.clone();
            tokio::task::spawn_blocking(move || replica.start()).await.expect("starting the replica");
        }
        self.resume_replay().await;
    }

    /// Stops replaying the primary's log: the replica keeps answering, with what it has.
    pub async fn pause_replay(&self) {
        self.admin("SELECT pg_wal_replay_pause()").await;
    }

    pub async fn resume_replay(&self) {
        self.admin("SELECT pg_wal_replay_resume()").await;
    }

    fn pg_ctl(&self, args: &[&str]) {
        let pg_ctl = self.bin.join("pg_ctl");
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let mut command = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            Command::new(pg_ctl)
        };
        let log = self.data.parent().expect("the replica's data directory has a parent").join("pg.log");
        command.arg("-D").arg(&self.data).arg("-l").arg(log).args(args);
        let out = command.output().expect("running pg_ctl");
        assert!(out.status.success(), "pg_ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Stops the replica as a crash would (`-m immediate`).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"]);
    }

    /// Starts it again (its settings are in its `postgresql.auto.conf`) and waits until it
    /// accepts connections.
    pub fn start(&self) {
        self.pg_ctl(&["-w", "start"]);
    }
}
