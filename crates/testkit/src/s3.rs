//! `S3Server`: a real S3-compatible server per test (`s3s-fs`, which keeps objects as files in
//! a directory of its own), on its own loopback port, with one bucket, that a test can stop and
//! start again. `cargo xtask test` installs the binary and names it in `CALLPLANE_TEST_S3FS`;
//! without it, `s3s-fs` is looked for on the PATH.

#![allow(clippy::expect_used)] // Test harness: a server that cannot start is a failed test.
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The variable that names the `s3s-fs` binary.
pub const BINARY_ENV: &str = "CALLPLANE_TEST_S3FS";
const STARTUP: Duration = Duration::from_secs(10);
pub const BUCKET: &str = "callplane-test";
pub const ACCESS_KEY: &str = "callplane-test-access";
pub const SECRET_KEY: &str = "callplane-test-secret-key";

pub struct S3Server {
    port: u16,
    root: PathBuf,
    child: Option<Child>,
}

/// The `s3s-fs` binary the tests run.
pub fn binary() -> String {
    std::env::var(BINARY_ENV).ok().filter(|b| !b.is_empty()).unwrap_or_else(|| "s3s-fs".into())
}

impl S3Server {
    /// Starts a server on a free loopback port, with the bucket [`BUCKET`], and waits until it
    /// accepts connections.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("no free loopback port").port();
        let root = std::env::temp_dir().join(format!("callplane-s3-{}", uuid::Uuid::new_v4().simple()));
        // s3s-fs serves each directory of its root as a bucket.
        std::fs::create_dir_all(root.join(BUCKET)).expect("creating the bucket's directory");
        let mut server = Self { port, root, child: None };
        server.spawn();
        server
    }

    /// `http://127.0.0.1:<port>`, the endpoint to give an S3 client.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://<bucket>/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The directory holding the bucket's objects, to look at what the server stored.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(BUCKET)
    }

    /// Every object file under `prefix` of the bucket, relative to the bucket.
    pub fn objects(&self, prefix: &str) -> Vec<String> {
        let mut found = Vec::new();
        collect(&self.bucket_dir(), &self.bucket_dir().join(prefix), &mut found);
        found.sort();
        found
    }

    /// The server's log: its warnings and errors.
    pub fn log(&self) -> PathBuf {
        self.root.join("s3s-fs.log")
    }

    /// Kills the server and waits for it to exit; the port refuses connections after this.
    /// What it stored stays on disk.
    pub fn stop(&mut self) {
        crate::kill(self.child.take());
    }

    /// Starts a stopped server again on the same port, with what it had stored.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    fn spawn(&mut self) {
        let binary = binary();
        // Its errors (it logs to stdout), for a failing test to point at.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("opening the S3 server's log");
        let child = Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .env("RUST_LOG", "warn")
            .stdout(log)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "could not start `{binary}` ({e}): `cargo xtask test` installs it, or \
                     `cargo install s3s-fs --features binary` and set {BINARY_ENV}"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("`{binary}` on port {} exited at startup with {status}", self.port);
            }
            assert!(Instant::now() < deadline, "`{binary}` on port {} did not listen within {STARTUP:?}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn collect(bucket: &Path, dir: &Path, found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(bucket, &path, found);
        } else if let Ok(relative) = path.strip_prefix(bucket) {
            found.push(relative.to_string_lossy().into_owned());
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        // A failing test shows what the server said.
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.log())
        {
            eprintln!("--- the S3 server's log ({}):\n{log}", self.log().display());
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
