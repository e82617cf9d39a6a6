//! A local PostgreSQL cluster driven by the server binaries (`initdb`, `pg_ctl`), without a system
//! service. Used for the throwaway test cluster and for the persistent development cluster.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::util::{self, describe, run_captured};

/// Where Debian installs one directory per PostgreSQL major version.
const PG_LIB_DIR: &str = "/usr/lib/postgresql";

/// The operating-system user that owns clusters when xtask runs as root.
const PG_OS_USER: &str = "postgres";

/// Finds the `bin` directory of the newest PostgreSQL installed under `/usr/lib/postgresql`.
pub fn bin_dir() -> Result<PathBuf> {
    let missing = "PostgreSQL server binaries not found (looked for /usr/lib/postgresql/*/bin/initdb): \
                   apt-get install -y postgresql";
    let Ok(entries) = fs::read_dir(PG_LIB_DIR) else {
        bail!("{missing}");
    };
    let mut newest: Option<(Vec<u32>, PathBuf)> = None;
    for entry in entries.flatten() {
        let bin = entry.path().join("bin");
        if !bin.join("initdb").is_file() || !bin.join("pg_ctl").is_file() {
            continue;
        }
        // Versions are directory names such as `15` or `9.6`; compare them numerically.
        let name = entry.file_name().to_string_lossy().into_owned();
        let version: Vec<u32> = name.split('.').filter_map(|part| part.parse().ok()).collect();
        if newest.as_ref().is_none_or(|(best, _)| version > *best) {
            newest = Some((version, bin));
        }
    }
    match newest {
        Some((_, bin)) => Ok(bin),
        None => bail!("{missing}"),
    }
}

/// Asks the kernel for a free loopback port by binding port 0, then releases it for Postgres.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("could not bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// One cluster: a data directory, the port it listens on and how to run the server binaries.
pub struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// initdb and pg_ctl refuse to run as root, so as root they run as the `postgres` user.
    as_postgres_user: bool,
}

impl Cluster {
    /// Describes a cluster in `data`; nothing is created or started yet.
    pub fn new(bin: PathBuf, data: PathBuf, port: u16) -> Result<Self> {
        let as_postgres_user = util::running_as_root()?;
        if as_postgres_user {
            let known = Command::new("id")
                .args(["-u", PG_OS_USER])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if !known {
                bail!(
                    "running as root, but there is no `{PG_OS_USER}` user to run PostgreSQL as: \
                     apt-get install -y postgresql (creates it)"
                );
            }
        }
        Ok(Self { bin, data, port, as_postgres_user })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of a database in this cluster, over TCP with trust authentication.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The server log, `pg.log` next to the data directory.
    pub fn log_file(&self) -> PathBuf {
        self.parent_dir().join("pg.log")
    }

    /// A client tool from the same installation (`psql`, `createdb`); clients may run as root.
    pub fn client(&self, tool: &str) -> Command {
        Command::new(self.bin.join(tool))
    }

    /// Whether `initdb` has already run in the data directory.
    pub fn is_initialized(&self) -> bool {
        self.data.join("PG_VERSION").is_file()
    }

    /// Whether a server is running on the data directory (`pg_ctl status` exits 0).
    pub fn is_running(&self) -> Result<bool> {
        if !self.is_initialized() {
            return Ok(false);
        }
        let mut command = self.server_tool("pg_ctl");
        command.arg("-D").arg(&self.data).arg("status");
        let output = command.output().with_context(|| format!("could not run `{}`", describe(&command)))?;
        Ok(output.status.success())
    }

    /// Creates the data directory and runs `initdb` in it.
    pub fn init(&self) -> Result<()> {
        fs::create_dir_all(&self.data).with_context(|| format!("could not create {}", self.data.display()))?;
        if self.as_postgres_user {
            // The server writes its log next to the data directory, so the parent must be
            // writable by `postgres` too.
            give_to_postgres(&self.parent_dir(), false)?;
            give_to_postgres(&self.data, true)?;
        }
        let mut command = self.server_tool("initdb");
        command.arg("-D").arg(&self.data).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]);
        run_captured(&mut command)?;
        Ok(())
    }

    /// Makes this (not yet existing) cluster a streaming replica of `primary` with
    /// `pg_basebackup -R`, configured so that a plain `pg_ctl start` serves it on its own port
    /// with `settings` (the tests stop and start it themselves).
    pub fn replicate(&self, primary: &Cluster, settings: &[&str]) -> Result<()> {
        let parent = self.parent_dir();
        fs::create_dir_all(&parent).with_context(|| format!("could not create {}", parent.display()))?;
        if self.as_postgres_user {
            give_to_postgres(&parent, false)?;
        }
        let mut command = self.server_tool("pg_basebackup");
        let port = primary.port.to_string();
        command.arg("-D").arg(&self.data).args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"]);
        command.args(["--write-recovery-conf", "--wal-method=stream", "--checkpoint=fast"]);
        run_captured(&mut command)?;
        let mut conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            self.port,
            self.data.display()
        );
        for setting in settings {
            conf.push_str(setting);
            conf.push('\n');
        }
        let auto = self.data.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&auto).with_context(|| format!("could not read {}", auto.display()))?;
        text.push_str(&conf);
        fs::write(&auto, text).with_context(|| format!("could not write {}", auto.display()))?;
        Ok(())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The directory of the server binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Starts the server on loopback and waits until it accepts connections. `settings` are extra
    /// `-c name=value` server options.
    pub fn start(&self, settings: &[&str]) -> Result<()> {
        let mut options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.data.display());
        for setting in settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
        let mut command = self.server_tool("pg_ctl");
        command.arg("-D").arg(&self.data).arg("-l").arg(self.log_file()).args(["-o", &options, "-w", "start"]);
        if let Err(error) = run_captured(&mut command) {
            bail!("{error:#}\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Stops the server with a fast shutdown (open sessions are disconnected).
    pub fn stop(&self) -> Result<()> {
        self.stop_with_mode("fast")
    }

    /// Stops the server as a crash would (`-m immediate`: no shutdown checkpoint; the next start
    /// recovers from the WAL). The fault suite's database outage.
    pub fn stop_immediately(&self) -> Result<()> {
        self.stop_with_mode("immediate")
    }

    /// Stops a server if one is running. `immediate` is used for leftovers that are about to be
    /// deleted anyway.
    fn stop_with_mode(&self, mode: &str) -> Result<()> {
        let mut command = self.server_tool("pg_ctl");
        command.arg("-D").arg(&self.data).args(["-m", mode, "stop"]);
        run_captured(&mut command)?;
        Ok(())
    }

    /// Deletes the cluster and its log, first stopping a server that a killed earlier run may have
    /// left behind.
    pub fn destroy(&self) -> Result<()> {
        if self.data.join("postmaster.pid").exists() && self.is_running()? {
            self.stop_with_mode("immediate")?;
        }
        if self.data.exists() {
            fs::remove_dir_all(&self.data).with_context(|| format!("could not remove {}", self.data.display()))?;
        }
        let log = self.log_file();
        if log.exists() {
            fs::remove_file(&log).with_context(|| format!("could not remove {}", log.display()))?;
        }
        Ok(())
    }

    /// A server tool (`initdb`, `pg_ctl`), run as `postgres` when xtask is root. It runs from the
    /// cluster's parent directory, which that user can always enter.
    fn server_tool(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres_user {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", PG_OS_USER, "--"]).arg(program);
            runuser
        } else {
            Command::new(program)
        };
        command.current_dir(self.parent_dir());
        command
    }

    fn parent_dir(&self) -> PathBuf {
        self.data.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
    }

    /// The last lines of the server log, to explain a failed start.
    fn log_tail(&self) -> String {
        let log = self.log_file();
        match fs::read_to_string(&log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                format!("last lines of {}:\n{tail}", log.display())
            }
            Err(_) => format!("(no server log at {})", log.display()),
        }
    }
}

/// Hands a directory (and, when `recursive`, its contents) to the `postgres` user.
fn give_to_postgres(dir: &Path, recursive: bool) -> Result<()> {
    let mut command = Command::new("chown");
    if recursive {
        command.arg("-R");
    }
    command.arg(format!("{PG_OS_USER}:")).arg(dir);
    run_captured(&mut command)?;
    Ok(())
}

/// Stops a cluster when dropped, so that it goes away on errors, early returns and Ctrl-C too.
pub struct StopOnDrop {
    cluster: Cluster,
    armed: bool,
}

impl StopOnDrop {
    pub fn new(cluster: Cluster) -> Self {
        Self { cluster, armed: true }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Stops the cluster now and reports the result; the later drop then does nothing.
    pub fn stop(&mut self) -> Result<()> {
        if !self.armed {
            return Ok(());
        }
        self.armed = false;
        self.cluster.stop()
    }

    /// Leaves the cluster running when the guard is dropped (for `XTASK_KEEP_PG=1`).
    pub fn keep_running(&mut self) {
        self.armed = false;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.armed {
            match self.stop() {
                Ok(()) => eprintln!("xtask: stopped PostgreSQL on port {}", self.cluster.port()),
                Err(error) => eprintln!("xtask: warning: could not stop PostgreSQL: {error:#}"),
            }
        }
    }
}
