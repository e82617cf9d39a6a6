//! The S3-compatible server phase 3's tests run against: `s3s-fs` (objects kept as files), from
//! crates.io, built once by `cargo install` into `target/xtask/s3s-fs`. Each test starts its own
//! server on a free port (`callplane_testkit::s3::S3Server`); xtask only provides the binary,
//! named in `CALLPLANE_TEST_S3FS`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::util;

/// The release the suite is tested with.
pub const VERSION: &str = "0.14.1";

/// The variable through which tests find the binary.
pub const TEST_ENV: &str = "CALLPLANE_TEST_S3FS";

/// The `s3s-fs` binary, installing it first when it is not there yet (a few minutes, once).
pub fn binary() -> Result<PathBuf> {
    let root = util::target_dir().join("xtask/s3s-fs");
    let bin = root.join("bin/s3s-fs");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("xtask: installing s3s-fs {VERSION} (an S3-compatible server) into {}", root.display());
    util::run(
        util::cargo()
            .args(["install", "s3s-fs", "--version", VERSION, "--features", "binary", "--locked", "--root"])
            .arg(&root),
    )
    .with_context(|| format!("cargo install s3s-fs {VERSION}"))?;
    if !bin.exists() {
        bail!("cargo installed s3s-fs but {} is not there", bin.display());
    }
    Ok(bin)
}

/// An `s3s-fs` server xtask runs itself (benchmark 8), with one bucket; killed when dropped.
pub struct Server {
    child: std::process::Child,
    port: u16,
}

/// The bucket, keys and secret of the servers xtask runs.
pub const BUCKET: &str = "callplane-bench";
pub const ACCESS_KEY: &str = "callplane-bench-access";
pub const SECRET_KEY: &str = "callplane-bench-secret-key";

impl Server {
    /// Starts a server on `port` keeping its objects under `root` (emptied first), and waits
    /// until it accepts connections.
    pub fn start(root: &std::path::Path, port: u16) -> Result<Self> {
        if root.exists() {
            std::fs::remove_dir_all(root).with_context(|| format!("could not remove {}", root.display()))?;
        }
        // s3s-fs serves each directory of its root as a bucket.
        std::fs::create_dir_all(root.join(BUCKET)).with_context(|| format!("could not create {}", root.display()))?;
        let binary = binary()?;
        let child = std::process::Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("could not start {}", binary.display()))?;
        let mut server = Self { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                bail!("s3s-fs exited at start-up ({status})");
            }
            if std::time::Instant::now() > deadline {
                bail!("s3s-fs did not listen on port {port} within 10 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(server)
    }

    /// The settings that point callplane's `[object_store]` at this server, under `prefix`.
    pub fn settings(&self, prefix: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CALLPLANE__OBJECT_STORE__URL", format!("s3://{BUCKET}/{prefix}")),
            ("CALLPLANE__OBJECT_STORE__ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("CALLPLANE__OBJECT_STORE__ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("CALLPLANE__OBJECT_STORE__SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
