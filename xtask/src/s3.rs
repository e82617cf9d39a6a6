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
