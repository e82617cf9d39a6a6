//! PgBouncer in transaction mode, which phase 3's suite runs the application's pool through.
//!
//! sqlx prepares every statement by name and binds it in a later protocol round, so a
//! transaction-mode pooler must carry prepared statements across server connections: PgBouncer
//! does from 1.21 (`max_prepared_statements`). Debian 12's own package is 1.18, so unless a
//! `pgbouncer` of 1.21 or newer is installed, xtask builds Debian's next source package (the
//! same sources and patches Debian 13 ships) into `target/xtask/pgbouncer-1.24.1`, once; `.ci/run`
//! adds that source package's repository and the build's dependencies.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util;

/// The Debian source package built when no recent enough PgBouncer is installed.
pub const SOURCE_VERSION: &str = "1.24.1-1+deb13u2";
const UPSTREAM: &str = "1.24.1";
/// The oldest PgBouncer that keeps prepared statements in transaction mode.
const OLDEST: (u32, u32) = (1, 21);

/// What to install when the build cannot run.
pub const INSTALL: &str = "apt-get install -y libevent-dev libssl-dev libc-ares-dev pkg-config dpkg-dev, and a \
                           deb-src entry for Debian 13 (trixie) so that `apt-get source pgbouncer` finds it (see .ci/run)";

/// The variable through which tests find the pooler: a URL whose database part each test
/// replaces with its own.
pub const TEST_ENV: &str = "CALLPLANE_TEST_PGBOUNCER_URL";

/// A `pgbouncer` binary of 1.21 or newer: the installed one, or one built from Debian's source
/// package (a minute, once).
pub fn binary() -> Result<PathBuf> {
    for installed in ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"] {
        let path = PathBuf::from(installed);
        if path.exists() && version(&path).is_some_and(|v| v >= OLDEST) {
            return Ok(path);
        }
    }
    let root = util::target_dir().join(format!("xtask/pgbouncer-{UPSTREAM}"));
    let bin = root.join("bin/pgbouncer");
    if bin.exists() {
        return Ok(bin);
    }
    let src = util::target_dir().join("xtask/pgbouncer-src");
    if src.exists() {
        fs::remove_dir_all(&src).with_context(|| format!("could not remove {}", src.display()))?;
    }
    fs::create_dir_all(&src).with_context(|| format!("could not create {}", src.display()))?;
    eprintln!("xtask: building PgBouncer from Debian's source package {SOURCE_VERSION} into {}", root.display());
    util::run(
        Command::new("apt-get")
            .args(["source", "--download-only", "-qq", &format!("pgbouncer={SOURCE_VERSION}")])
            .current_dir(&src),
    )
    .with_context(|| format!("fetching Debian's pgbouncer {SOURCE_VERSION} sources: {INSTALL}"))?;
    let tarball = format!("pgbouncer_{UPSTREAM}.orig.tar.gz");
    util::run(Command::new("tar").args(["xzf", &tarball]).current_dir(&src))?;
    let tree = src.join(format!("pgbouncer-{UPSTREAM}"));
    let prefix = format!("--prefix={}", root.display());
    util::run(
        Command::new("./configure")
            .args([prefix.as_str(), "--without-systemd", "--without-pam"])
            .current_dir(&tree)
            .stdout(Stdio::null()),
    )
    .with_context(|| format!("configuring PgBouncer: {INSTALL}"))?;
    util::run(Command::new("make").args(["-j2", "install"]).current_dir(&tree).stdout(Stdio::null()))
        .context("building PgBouncer")?;
    fs::remove_dir_all(&src).with_context(|| format!("could not remove {}", src.display()))?;
    if !bin.exists() {
        bail!("PgBouncer was built but {} is not there", bin.display());
    }
    Ok(bin)
}

/// `pgbouncer --version`'s major and minor.
fn version(bin: &Path) -> Option<(u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let number = text.lines().next()?.split_whitespace().nth(1)?;
    let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// A PgBouncer in transaction mode in front of one PostgreSQL server, every database of it
/// reachable under its own name; killed when dropped.
pub struct PgBouncer {
    child: Child,
    port: u16,
}

impl PgBouncer {
    /// Starts PgBouncer on `port` for the server on `server_port`, keeping its files in `dir`,
    /// and waits until it accepts connections. As root it runs as `postgres` (it refuses root).
    pub fn start(bin: &Path, dir: &Path, port: u16, server_port: u16) -> Result<Self> {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("could not remove {}", dir.display()))?;
        }
        fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
        let users = dir.join("users.txt");
        fs::write(&users, "\"postgres\" \"\"\n")?;
        // Transaction pooling with prepared statements carried across server connections; idle
        // server connections of finished tests' databases are closed soon, so that hundreds of
        // per-database pools never hold the server's connection slots.
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={server_port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {users}\n\
             pool_mode = transaction\nmax_prepared_statements = 200\n\
             max_client_conn = 4000\ndefault_pool_size = 20\nmax_db_connections = 40\n\
             server_idle_timeout = 5\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {log}\nadmin_users = postgres\n",
            users = users.display(),
            log = dir.join("pgbouncer.log").display(),
        );
        let config = dir.join("pgbouncer.ini");
        fs::write(&config, ini)?;
        let mut command = Command::new(bin);
        if util::running_as_root()? {
            use std::os::unix::process::CommandExt;
            util::run_captured(Command::new("chown").args(["-R", "postgres:"]).arg(dir))?;
            let id = |flag: &str| -> Result<u32> {
                let out = util::run_captured(Command::new("id").args([flag, "postgres"]))?;
                Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
            };
            command.gid(id("-g")?).uid(id("-u")?);
        }
        command.arg(&config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = command.spawn().with_context(|| format!("could not start {}", bin.display()))?;
        let mut pooler = Self { child, port };
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = pooler.child.try_wait()? {
                let log = fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default();
                bail!("PgBouncer exited at start ({status}):\n{log}");
            }
            if Instant::now() > until {
                pooler.stop();
                bail!("PgBouncer did not listen on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pooler)
    }

    /// The pooler's URL for the `postgres` database (tests put their own database's name in).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}
