//! A local `redis-server` from the system package, for phase 2's Redis backends: a throwaway one
//! for `cargo xtask test` and one that keeps its data in `.data/redis` for `cargo xtask run`.
//!
//! The server is a child of xtask in its own process group, so that Ctrl-C reaches callplane
//! alone: callplane drains with Redis still up, then xtask stops Redis.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::describe;

/// The server from Debian's `redis-server` package, found on PATH.
pub const SERVER: &str = "redis-server";

/// What to install when it is missing.
pub const INSTALL: &str = "apt-get install -y redis-server";

/// Fails, saying how to install it, when `redis-server` is not installed.
pub fn check_installed() -> Result<()> {
    let installed = Command::new(SERVER)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        bail!("{SERVER} not found (phase 2 runs its backends on Redis): {INSTALL}");
    }
    Ok(())
}

/// How long a starting server may take to answer PING, and a stopping one to exit.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the server keeps its data across restarts.
#[derive(Clone, Copy, PartialEq)]
pub enum Durability {
    /// Nothing is written to disk (the test server).
    Throwaway,
    /// Every write goes to an append-only file in the directory (`cargo xtask run` keeps its
    /// counters and cached function data across restarts).
    AppendOnly,
}

/// A running `redis-server`, stopped when dropped.
pub struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    /// Starts `redis-server` on 127.0.0.1:`port` with its files in `dir` (created if needed) and
    /// waits until it answers PING. A server that an earlier, killed xtask left on `dir` is
    /// stopped first: two servers must never share one append-only file.
    pub fn start(dir: &Path, port: u16, durability: Durability) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
        stop_leftover(dir)?;
        let appendonly = if durability == Durability::AppendOnly { "yes" } else { "no" };
        let mut command = Command::new(SERVER);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .arg("--pidfile")
            .arg(dir.join("redis.pid"))
            // No snapshots: the test server keeps nothing, the development one its AOF.
            .args(["--save", "", "--appendonly", appendonly, "--daemonize", "no"])
            .stdin(Stdio::null())
            .process_group(0);
        let line = describe(&command);
        eprintln!("xtask: $ {line}");
        let child = command.spawn().with_context(|| format!("could not start `{line}`: {INSTALL}"))?;
        let mut redis = Self { child, port, dir: dir.to_path_buf() };
        redis.wait_for_pong()?;
        Ok(redis)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL callplane and the tests connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server with SIGTERM (it finishes writing its append-only file), SIGKILL after
    /// the timeout. Does nothing when it has already exited.
    pub fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        terminate(self.child.id())?;
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.child.kill().context("could not kill redis-server")?;
        self.child.wait()?;
        Ok(())
    }

    /// Polls with PING until the server answers `+PONG`; fails early, with its log, if it exits.
    fn wait_for_pong(&mut self) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("redis-server exited at start ({status})\n{}", self.log_tail());
            }
            match ping(addr) {
                Ok(()) => return Ok(()),
                // The drop that follows the error stops the server.
                Err(error) if started.elapsed() >= TIMEOUT => {
                    bail!(
                        "redis-server on {addr} did not answer PING within {TIMEOUT:?}: {error:#}\n{}",
                        self.log_tail()
                    );
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The last lines of the server log, to explain a failed start.
    fn log_tail(&self) -> String {
        let log = self.dir.join("redis.log");
        match fs::read_to_string(&log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                format!("last lines of {}:\n{}", log.display(), lines[lines.len().saturating_sub(20)..].join("\n"))
            }
            Err(_) => format!("(no server log at {})", log.display()),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // Already stopped (or exited at start): nothing to do or say.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        match self.stop() {
            Ok(()) => eprintln!("xtask: stopped Redis on port {}", self.port),
            Err(error) => eprintln!("xtask: warning: could not stop redis-server: {error:#}"),
        }
    }
}

/// One PING over the Redis protocol (an inline command), expecting `+PONG`.
fn ping(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"PING\r\n")?;
    let mut answer = [0; 7];
    stream.read_exact(&mut answer)?;
    if &answer != b"+PONG\r\n" {
        bail!("answered {:?}", String::from_utf8_lossy(&answer));
    }
    Ok(())
}

/// Stops the `redis-server` whose pid file is in `dir`, if one is still running: xtask was killed
/// before it could stop it. Says whether there was one.
pub fn stop_leftover(dir: &Path) -> Result<bool> {
    let Some(pid) = fs::read_to_string(dir.join("redis.pid")).ok().and_then(|text| text.trim().parse::<u32>().ok())
    else {
        return Ok(false);
    };
    // The pid may have been reused by another program since; only a redis-server is ours.
    let is_redis =
        |pid: u32| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| cmd.starts_with(SERVER.as_bytes()));
    if !is_redis(pid) {
        return Ok(false);
    }
    eprintln!("xtask: stopping the redis-server (pid {pid}) an earlier run left on {}", dir.display());
    terminate(pid)?;
    let deadline = Instant::now() + TIMEOUT;
    while is_redis(pid) {
        if Instant::now() >= deadline {
            bail!("redis-server (pid {pid}) on {} did not stop within {TIMEOUT:?}", dir.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(true)
}

/// Sends SIGTERM to one process, by its id.
fn terminate(pid: u32) -> Result<()> {
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().context("could not run `kill`")?;
    if !status.success() {
        bail!("`kill -TERM {pid}` failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::free_port;

    /// The server answers PING on its port, stops when asked, and one left running by a killed
    /// xtask (here: forgotten) is found through its pid file and stopped.
    #[test]
    fn a_server_answers_stops_and_is_found_when_left_over() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-redis-{}", uuid::Uuid::new_v4().simple()));
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));

        let mut redis = Redis::start(&dir, port, Durability::Throwaway)?;
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
        ping(addr)?;
        redis.stop()?;
        assert!(ping(addr).is_err(), "stopped");

        std::mem::forget(Redis::start(&dir, port, Durability::AppendOnly)?);
        ping(addr)?;
        assert!(stop_leftover(&dir)?);
        assert!(ping(addr).is_err(), "the leftover is stopped");
        assert!(!stop_leftover(&dir)?, "and only once");

        fs::remove_dir_all(dir)?;
        Ok(())
    }
}
